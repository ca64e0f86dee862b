"""Failing and hostile peers against `membrane gateway` (issue 13 item 5), with real sockets, curl and DNS clients:
an upstream that never answers (504), clients that never send (no upstream opened), a stub resolver using a new
source port per query (no descriptor per port), and running out of descriptors (503 and a log line, then recovery)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from tests.helpers.dns_server import DnsServer
from tests.integration.gateway_util import gateway, http_backend, http_policy
from tests.integration.test_gateway_dns import ZONE, dns_policy

pytestmark = pytest.mark.integration

RULES = """              - method: GET
                path: "/api(/.*)?"
"""


class SilentServer:
    """A TCP server that accepts and reads but never answers; counts the connections it accepted."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.received = b""
        self._conns: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        try:
            while chunk := conn.recv(65536):
                self.received += chunk
        except OSError:
            pass

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        for conn in self._conns:
            conn.close()
        self.sock.close()


@contextmanager
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


def _curl(url: str, timeout_s: float = 10.0) -> tuple[str, float]:
    start = time.monotonic()
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", str(timeout_s), url],
                         capture_output=True, text=True, timeout=timeout_s + 5)
    return out.stdout.strip(), time.monotonic() - start


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_upstream_that_never_answers_gets_504(tmp_path: Path) -> None:
    """--upstream-timeout: a forwarded request whose upstream never answers is answered 504 once the timeout passes
    (not after the 300 s idle timeout), with an ERROR flow carrying 504, a log line, and both descriptors released."""
    with silent_server() as upstream, gateway(
        tmp_path, http_policy(upstream.port, RULES), upstream_port=upstream.port, dst="default/frontend",
        src="default/backend", extra=["--upstream-timeout", "1"],
    ) as gw:
        code, elapsed = _curl(f"http://127.0.0.1:{gw.port}/api/hang")
        assert code == "504"
        assert 0.9 < elapsed < 4.0
        assert b"GET /api/hang" in upstream.received  # it was forwarded: the upstream is what timed out
        flows = gw.wait_flows(2)
        errors = [f for f in flows if f["verdict"] == "ERROR"]
        assert [(f["l7"]["type"], f["l7"]["http"]["code"]) for f in errors] == [("RESPONSE", 504)]
        assert "did not answer" in gw.stderr_path.read_text()
        time.sleep(0.3)
        # nothing held: the gateway is back to its start-up descriptors (client and upstream sockets closed)
        assert not [t for t in os.listdir(f"/proc/{gw.proc.pid}/fd")
                    if "socket" in os.readlink(f"/proc/{gw.proc.pid}/fd/{t}")][4:]


def test_upstream_opened_only_for_the_first_forwarded_request(tmp_path: Path) -> None:
    """Clients that connect and send nothing, or only denied requests, never open an upstream connection
    (a slowloris client costs one descriptor, not two); the first allowed request opens it."""
    with silent_server() as counter, gateway(
        tmp_path, http_policy(counter.port, RULES), upstream_port=counter.port, dst="default/frontend",
        src="default/backend", extra=["--upstream-timeout", "1"],
    ) as gw:
        idle = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(20)]
        denied = socket.create_connection(("127.0.0.1", gw.port))
        denied.sendall(b"DELETE /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
        denied.settimeout(5)
        assert denied.recv(100).startswith(b"HTTP/1.1 403 ")
        time.sleep(0.5)
        assert counter.accepted == 0
        idle[0].sendall(b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
        deadline = time.monotonic() + 5
        while counter.accepted == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert counter.accepted == 1
        for sock in [*idle, denied]:
            sock.close()


def test_stub_resolver_with_a_port_per_query_costs_no_descriptor_per_port(tmp_path: Path) -> None:
    """DNS over UDP: 400 queries, each from a new client socket (a stub resolver's fresh source port), are all
    answered, and the gateway's descriptors do not grow with them (one upstream socket per client IP, IDs
    rewritten); the client sees its own query ID in every answer."""
    with DnsServer(ZONE) as server, gateway(
        tmp_path, dns_policy(server.port), upstream_port=server.port, dst="kube-system/coredns", src="default/crawler",
        udp=True,
    ) as gw:
        query = dns.message.make_query("www.cilium.io", "A")
        dns.query.udp(query, "127.0.0.1", port=gw.port, timeout=5)
        before = _open_fds(gw.proc.pid)
        ids = set()
        for i in range(400):
            q = dns.message.make_query("www.cilium.io" if i % 4 else "evil.example", "A")
            answer = dns.query.udp(q, "127.0.0.1", port=gw.port, timeout=5)  # a new socket (and port) each time
            assert answer.id == q.id
            assert answer.rcode() == (dns.rcode.NOERROR if i % 4 else dns.rcode.REFUSED)
            ids.add(q.id)
        assert _open_fds(gw.proc.pid) <= before + 2
        forwarded = [q for q in server.queries if q.name.lower() == "www.cilium.io."]
        assert len(forwarded) == 301
        assert len(ids) > 300


def test_out_of_descriptors_is_503_and_logged_then_recovers(tmp_path: Path) -> None:
    """With RLIMIT_NOFILE filled by idle clients, an allowed request whose upstream socket cannot be opened is
    answered 503 (never hangs), the exhaustion is logged, and once the idle clients leave requests are served again."""
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend",
        src="default/backend", nofile=64,
    ) as gw:
        first = socket.create_connection(("127.0.0.1", gw.port))
        hogs = []
        for _ in range(80):  # more than the gateway can hold: the rest wait in the backlog or are shed
            try:
                hogs.append(socket.create_connection(("127.0.0.1", gw.port), timeout=1))
            except OSError:
                break
        time.sleep(0.5)
        first.sendall(b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
        first.settimeout(5)
        assert first.recv(200).startswith(b"HTTP/1.1 503 ")
        assert "out of file descriptors" in gw.stderr_path.read_text()
        first.close()
        for sock in hogs:
            sock.close()
        time.sleep(0.5)
        code, _ = _curl(f"http://127.0.0.1:{gw.port}/api/again")
        assert code == "200"
        assert gw.proc.poll() is None


def test_one_client_cannot_take_every_connection(tmp_path: Path) -> None:
    """--max-connections-per-client: a client IP holding its share is refused more (counted, logged), while another
    client IP is still served."""
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend",
        src="default/backend", extra=["--max-connections", "40", "--max-connections-per-client", "10"],
    ) as gw:
        hog = [socket.create_connection(("127.0.0.1", gw.port), source_address=("127.0.0.2", 0)) for _ in range(30)]
        time.sleep(0.3)
        refused = 0
        for sock in hog:
            sock.settimeout(2)
            try:
                sock.sendall(b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
                refused += sock.recv(100) == b""
            except (ConnectionResetError, BrokenPipeError):
                refused += 1
        assert refused == 20  # 10 served, the other 20 were closed at once
        code, _ = _curl(f"http://127.0.0.1:{gw.port}/api/other")  # from 127.0.0.1: still served
        assert code == "200"
        assert "client 127.0.0.2 holds 10 connections" in gw.stderr_path.read_text()
        refusals = [f for f in gw.wait_flows(21) if f["verdict"] == "ERROR"]
        assert len(refusals) == 20
        assert {f["Summary"] for f in refusals} == {"TCP connection refused at accept: max_connections_per_client"}
        assert {f["IP"]["source"] for f in refusals} == {"127.0.0.2"}
        for sock in hog:
            sock.close()


def test_upstream_that_closes_before_answering_gets_502(tmp_path: Path) -> None:
    """An upstream that reads the request and closes without a response: the client gets 502 (not an empty reply),
    with an ERROR flow carrying 502."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with gateway(tmp_path, http_policy(port, RULES), upstream_port=port, dst="default/frontend",
                     src="default/backend") as gw:
            code, _ = _curl(f"http://127.0.0.1:{gw.port}/api/x")
            assert code == "502"
            flows = gw.wait_flows(2)
            assert [(f["verdict"], f["l7"]["http"]["code"]) for f in flows if f["l7"]["type"] == "RESPONSE"] == [("ERROR", 502)]
            assert "limit upstream_closed crossed by 127.0.0.1" in gw.stderr_path.read_text()
    finally:
        thread.join(5)
        listener.close()
