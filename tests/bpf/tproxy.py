"""A tiny transparent proxy for tests (host namespace, threads): what the real proxy must do, minimally.

TCP: accept on an IP_TRANSPARENT wildcard listener, read the original destination with getsockname(),
connect upstream from a transparent socket bound to the client's own IP, relay both ways.
UDP: IP_RECVORIGDSTADDR gives the original destination; the answer goes back from a transparent
socket bound to that destination. Every accepted flow is recorded as (client, original destination).
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74


def _transparent(s: socket.socket, family: int) -> None:
    if family == socket.AF_INET:
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    else:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)


@dataclass
class TransparentProxy:
    """Listens on a free port of `family`; `flows` records (client addr, original dst addr) per flow."""

    family: int = socket.AF_INET
    udp: bool = False
    port: int = 0
    flows: list[tuple[tuple[str, int], tuple[str, int]]] = field(default_factory=list)
    upstream_ports: list[int] = field(default_factory=list)
    keep_source_port: bool = False

    def __post_init__(self) -> None:
        kind = socket.SOCK_DGRAM if self.udp else socket.SOCK_STREAM
        self._sock = socket.socket(self.family, kind)
        _transparent(self._sock, self.family)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.family == socket.AF_INET6:
            self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if self.udp:
            if self.family == socket.AF_INET:
                self._sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
            else:
                self._sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
        self._sock.bind(("0.0.0.0" if self.family == socket.AF_INET else "::", 0))
        if not self.udp:
            self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._spawn(self._serve_udp if self.udp else self._serve_tcp)

    def _spawn(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def __enter__(self) -> TransparentProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- TCP ---
    def _serve_tcp(self) -> None:
        while not self._closed:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return
            self._spawn(self._handle_tcp, conn, peer)

    def _handle_tcp(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        orig = conn.getsockname()
        self.flows.append(((peer[0], peer[1]), (orig[0], orig[1])))
        up = socket.socket(self.family, socket.SOCK_STREAM)
        _transparent(up, self.family)
        up.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        up.bind((peer[0], peer[1] if self.keep_source_port else 0))
        up.settimeout(5)
        try:
            up.connect((orig[0], orig[1]))
        except OSError:
            conn.close()
            up.close()
            return
        self.upstream_ports.append(up.getsockname()[1])
        up.settimeout(None)
        self._spawn(self._pipe, up, conn)
        self._pipe(conn, up)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # --- UDP ---
    def _serve_udp(self) -> None:
        while not self._closed:
            try:
                data, anc, _flags, peer = self._sock.recvmsg(65536, 1024)
            except OSError:
                return
            orig = None
            for level, kind, raw in anc:
                if self.family == socket.AF_INET and level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR:
                    port, addr = struct.unpack("!2xH4s", raw[:8])
                    orig = (socket.inet_ntop(socket.AF_INET, addr), port)
                if self.family == socket.AF_INET6 and level == socket.IPPROTO_IPV6 and kind == IPV6_RECVORIGDSTADDR:
                    port, addr = struct.unpack("!2xH4x16s", raw[:24])
                    orig = (socket.inet_ntop(socket.AF_INET6, addr), port)
            if orig is None:
                continue
            self.flows.append(((peer[0], peer[1]), orig))
            self._spawn(self._handle_udp, data, peer, orig)

    def _handle_udp(self, data: bytes, peer: tuple[str, int], orig: tuple[str, int]) -> None:
        up = socket.socket(self.family, socket.SOCK_DGRAM)
        _transparent(up, self.family)
        up.bind((peer[0], 0))
        up.settimeout(3)
        try:
            up.connect(orig)
            up.send(data)
            answer = up.recv(65536)
        except OSError:
            return
        finally:
            up.close()
        back = socket.socket(self.family, socket.SOCK_DGRAM)
        _transparent(back, self.family)
        back.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        back.bind(orig)
        back.sendto(b"proxied " + answer, peer[:2])
        back.close()
