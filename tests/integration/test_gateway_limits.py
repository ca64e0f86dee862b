"""Timeouts and limits of `membrane gateway`, each set from its command-line flag, against real sockets and curl."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.gateway_util import gateway, http_backend, http_policy

pytestmark = pytest.mark.integration

RULES = """              - method: GET
                path: "/api(/.*)?"
              - method: POST
                path: "/api/upload"
"""


def _recv_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return data
        if not chunk:
            return data
        data += chunk


def test_header_timeout_flag_stops_slowloris(tmp_path: Path) -> None:
    """--header-timeout: a head trickled byte by byte is answered 408 and closed once the timeout passes (slowloris)."""
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend",
        src="default/backend", extra=["--header-timeout", "0.5"],
    ) as gw:
        sock = socket.create_connection(("127.0.0.1", gw.port))
        start = time.monotonic()
        for byte in b"GET /api HTT":
            sock.send(bytes([byte]))
            time.sleep(0.02)
        data = _recv_all(sock)
        elapsed = time.monotonic() - start
        sock.close()
        assert data.startswith(b"HTTP/1.1 408 ")
        assert 0.4 < elapsed < 3.0
        assert backend.paths() == []
        # the limit has its flow (ERROR, 408) and its log line
        assert [(f["verdict"], f["l7"]["http"]["code"]) for f in gw.wait_flows(1)] == [("ERROR", 408)]
        assert "limit header_timeout crossed by 127.0.0.1" in gw.stderr_path.read_text()


def test_idle_timeout_flag_closes_quiet_keep_alive_connections(tmp_path: Path) -> None:
    """--idle-timeout: a keep-alive connection with nothing moving is closed; the request before it was served."""
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend",
        src="default/backend", extra=["--idle-timeout", "0.5"],
    ) as gw:
        sock = socket.create_connection(("127.0.0.1", gw.port))
        sock.sendall(b"GET /api/1 HTTP/1.1\r\nHost: a\r\n\r\n")
        start = time.monotonic()
        data = _recv_all(sock)
        assert data.startswith(b"HTTP/1.1 200 ")
        assert b'"/api/1"' in data
        assert 0.4 < time.monotonic() - start < 3.0  # the proxy closed it, after the idle timeout
        sock.close()


def test_max_connections_flag(tmp_path: Path) -> None:
    """--max-connections: connections beyond the limit are closed at once; those within it are served."""
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend",
        src="default/backend", extra=["--max-connections", "2"],
    ) as gw:
        kept = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(2)]
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", gw.port))
        extra.sendall(b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert _recv_all(extra) == b""
        extra.close()
        kept[0].sendall(b"GET /api/ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert _recv_all(kept[0]).startswith(b"HTTP/1.1 200 ")
        for s in kept:
            s.close()
        assert backend.paths() == ["/api/ok"]


def test_connect_timeout_flag_gives_504(tmp_path: Path) -> None:
    """--connect-timeout: an upstream that never completes the handshake is answered 504."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the accept queue: further SYNs are dropped, so connects hang (loopback only)
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    try:
        with gateway(
            tmp_path, http_policy(port, RULES), upstream_port=port, dst="default/frontend", src="default/backend",
            extra=["--connect-timeout", "0.5"],
        ) as gw:
            out = subprocess.run(
                ["curl", "-sS", "--max-time", "10", "-w", "%{http_code}", "-o", "/dev/null", f"http://127.0.0.1:{gw.port}/api"],
                capture_output=True, text=True, timeout=20,
            )
            assert out.stdout == "504"
    finally:
        for s in fillers:
            s.close()
        full.close()


def test_expect_100_continue_upload(tmp_path: Path) -> None:
    """curl's `Expect: 100-continue` upload passes when allowed; when denied, the 403 comes before the body is sent (RFC 9110 §10.1.1)."""
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"u" * (2 << 20))
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend", src="default/backend"
    ) as gw:
        base = f"http://127.0.0.1:{gw.port}"
        ok = subprocess.run(
            ["curl", "-sS", "-H", "Expect: 100-continue", "--data-binary", f"@{payload}", f"{base}/api/upload"],
            capture_output=True, text=True, timeout=30,
        )
        assert '"body_len": 2097152' in ok.stdout, ok.stderr
        denied = subprocess.run(
            ["curl", "-sS", "-v", "-H", "Expect: 100-continue", "--data-binary", f"@{payload}", f"{base}/api/other"],
            capture_output=True, text=True, timeout=30,
        )
        assert "< HTTP/1.1 403 Forbidden" in denied.stderr
        assert backend.paths() == ["/api/upload"]
