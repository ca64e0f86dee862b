"""A small authoritative DNS server for tests: UDP and TCP on one loopback port, answers from zone records.

Independent of parsers/dns.py on purpose (dnslib parses and builds, the TCP framing is written
here), so proxy tests never check our reader against itself. UDP: one reply per datagram,
truncated with TC over 512 bytes (or the client's EDNS size). TCP: several queries per connection,
answered in order (RFC 7766 §6.2.1), until the client closes or `tcp_idle_timeout_s` passes.
Every query is logged in `queries` (name case as received), so a test can assert what reached
the server. Only loopback addresses are accepted. Use as a context manager:

    with DnsServer("www.example.test. 60 A 192.0.2.1") as server:
        host, port = server.address
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

from dnslib import EDNS0, QTYPE, RCODE, RR, DNSHeader, DNSRecord

UDP_DEFAULT_PAYLOAD = 512  # RFC 1035 §4.2.1, without EDNS
_POLL_S = 0.1


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedQuery:
    transport: str  # "udp" or "tcp"
    id: int
    name: str  # as received: case kept, trailing dot
    qtype: int
    client: tuple[str, int]
    raw: bytes = field(repr=False)


@dataclass(slots=True, kw_only=True)
class Behaviour:
    """Per-name override: answer `rcode` with no records, never answer (`drop`), or answer after `delay_s`."""

    rcode: int | None = None
    drop: bool = False
    delay_s: float = 0.0


class DnsServer:
    """Authoritative server for the zone records given (zone-file text or dnslib RRs); thread-based."""

    def __init__(
        self,
        zone: str | Iterable[RR] = "",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tcp_idle_timeout_s: float = 10.0,
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"test DNS server binds loopback only, not {host}")
        self.host = host
        self._requested_port = port
        self.tcp_idle_timeout_s = tcp_idle_timeout_s
        self._records: dict[str, list[RR]] = {}
        self._behaviour: dict[str, Behaviour] = {}
        self._lock = threading.Lock()
        self._queries: list[ReceivedQuery] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self.port = 0
        self.max_tcp_unanswered = 0  # most complete queries ever read and not yet answered on one TCP connection
        self.add_records(zone)

    # --- configuration ---------------------------------------------------------------------------

    def add_records(self, zone: str | Iterable[RR]) -> None:
        """Add zone-file lines ("name ttl class type rdata"; names are absolute) or dnslib RRs."""
        rrs = RR.fromZone(zone) if isinstance(zone, str) else list(zone)
        with self._lock:
            for rr in rrs:
                self._records.setdefault(str(rr.rname).lower(), []).append(rr)

    def set_behaviour(self, name: str, *, rcode: int | None = None, drop: bool = False, delay_s: float = 0.0) -> None:
        """Override answers for `name` (any case, with or without the trailing dot)."""
        with self._lock:
            self._behaviour[_key(name)] = Behaviour(rcode=rcode, drop=drop, delay_s=delay_s)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def queries(self) -> list[ReceivedQuery]:
        """Every query received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._queries)

    def clear_queries(self) -> None:
        with self._lock:
            self._queries.clear()

    # --- lifetime --------------------------------------------------------------------------------

    def start(self) -> DnsServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _attempt in range(50):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                udp.bind((self.host, self._requested_port))
                port = udp.getsockname()[1]
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                if self._requested_port:
                    raise
                continue
            break
        else:
            raise OSError("no port free for both UDP and TCP on loopback")
        tcp.listen(64)
        udp.settimeout(_POLL_S)
        tcp.settimeout(_POLL_S)
        self._udp, self._tcp, self.port = udp, tcp, port
        self._spawn(self._serve_udp, "udp")
        self._spawn(self._serve_tcp, "tcp-accept")
        return self

    def stop(self) -> None:
        """Stop serving and close every socket; joins all threads (idempotent)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = None

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _spawn(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=f"dns-server-{name}", daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    # --- serving ---------------------------------------------------------------------------------

    def _serve_udp(self) -> None:
        assert self._udp is not None
        sock = self._udp
        while not self._stop.is_set():
            try:
                data, client = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self._answer(data, "udp", client[:2])
            if reply is not None:
                try:
                    sock.sendto(reply, client)
                except OSError:
                    pass

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        while not self._stop.is_set():
            try:
                conn, client = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._serve_connection, "tcp-conn", conn, client[:2])

    def _serve_connection(self, conn: socket.socket, client: tuple[str, int]) -> None:
        conn.settimeout(_POLL_S)
        buffer = b""
        idle_since = time.monotonic()
        with conn:
            while not self._stop.is_set():
                if len(buffer) >= 2:
                    length = struct.unpack(">H", buffer[:2])[0]
                    if len(buffer) >= 2 + length:
                        message, buffer = buffer[2 : 2 + length], buffer[2 + length :]
                        reply = self._answer(message, "tcp", client)
                        if reply is not None:
                            conn.sendall(struct.pack(">H", len(reply)) + reply)
                        idle_since = time.monotonic()
                        continue
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    if time.monotonic() - idle_since > self.tcp_idle_timeout_s:
                        return
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                idle_since = time.monotonic()
                unanswered = _complete_frames(buffer)
                with self._lock:
                    self.max_tcp_unanswered = max(self.max_tcp_unanswered, unanswered)

    def _answer(self, data: bytes, transport: str, client: tuple[str, int]) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
            question = request.q
        except Exception:
            if len(data) < 12 or data[2] & 0x80:
                return None
            qid, flags = struct.unpack(">HH", data[:4])
            return struct.pack(">HHHHHH", qid, 0x8000 | (flags & 0x7900) | RCODE.FORMERR, 0, 0, 0, 0)
        if request.header.qr or len(request.questions) != 1:
            return None
        name = str(question.qname)
        with self._lock:
            self._queries.append(
                ReceivedQuery(transport=transport, id=request.header.id, name=name, qtype=question.qtype, client=client, raw=bytes(data))
            )
            behaviour = self._behaviour.get(_key(name))
        if behaviour is not None:
            if behaviour.drop:
                return None
            if behaviour.delay_s:
                time.sleep(behaviour.delay_s)
        reply = DNSRecord(DNSHeader(id=request.header.id, qr=1, aa=1, opcode=request.header.opcode, rd=request.header.rd), q=question)
        if behaviour is not None and behaviour.rcode is not None:
            reply.header.rcode = behaviour.rcode
        else:
            self._resolve(reply, name, question.qtype)
        opt = [rr for rr in request.ar if rr.rtype == QTYPE.OPT]
        if opt:
            reply.add_ar(EDNS0(udp_len=1232))
        wire = bytes(reply.pack())
        if transport == "udp":
            limit = max(UDP_DEFAULT_PAYLOAD, opt[0].rclass) if opt else UDP_DEFAULT_PAYLOAD
            if len(wire) > limit:  # TC with the question kept (dnslib's truncate() drops it)
                cut = DNSRecord(DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap, tc=1), q=question)
                wire = bytes(cut.pack())
        return wire

    def _resolve(self, reply: DNSRecord, name: str, qtype: int) -> None:
        """Answer from the zone, following CNAMEs inside it (RFC 1034 §4.3.2); NXDOMAIN for unknown names."""
        with self._lock:
            records = {k: list(v) for k, v in self._records.items()}
        current = _key(name)
        if current not in records:
            reply.header.rcode = RCODE.NXDOMAIN
            return
        for _ in range(16):
            rrs = records.get(current, [])
            matching = [rr for rr in rrs if qtype in (rr.rtype, QTYPE.ANY)]
            if matching:
                for rr in matching:
                    reply.add_answer(rr)
                return
            cname = [rr for rr in rrs if rr.rtype == QTYPE.CNAME]
            if not cname:
                if current not in records:
                    reply.header.rcode = RCODE.NXDOMAIN
                return
            reply.add_answer(cname[0])
            current = _key(str(cname[0].rdata.label))


def _key(name: str) -> str:
    name = name.lower()
    return name if name.endswith(".") else name + "."


def _complete_frames(buffer: bytes) -> int:
    """How many whole length-prefixed messages `buffer` starts with."""
    count = offset = 0
    while len(buffer) - offset >= 2:
        end = offset + 2 + struct.unpack(">H", buffer[offset : offset + 2])[0]
        if end > len(buffer):
            break
        count, offset = count + 1, end
    return count
