"""An upstream that goes away (the endurance soak, bench/soak.py, restarts upstreams under load).

After the upstream closed a keep-alive connection (its FIN forwarded to the client), a request the
client still sends is not an internal error of the proxy: it used to answer a denied one with a
write after write_eof() (RuntimeError, ERROR log line with a traceback, the connection aborted).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.gateway_util import gateway, http_policy

pytestmark = pytest.mark.integration

RULES = """              - method: GET
                path: "/api"
"""


def _read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return head


@contextmanager
def _one_answer_backend() -> Iterator[int]:
    """Answers the first request of each connection with 200 (keep-alive headers) and then closes it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()


def test_request_after_the_upstream_closed_is_no_internal_error(tmp_path: Path) -> None:
    with _one_answer_backend() as port, gateway(
        tmp_path, http_policy(port, RULES), upstream_port=port, dst="default/frontend", src="default/backend",
    ) as gw:
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        sock.sendall(b"GET /api HTTP/1.1\r\nHost: a\r\n\r\n")
        assert _read_response(sock).startswith(b"HTTP/1.1 200 ")
        assert sock.recv(65536) == b""  # the upstream's FIN, forwarded
        sock.sendall(b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n")  # denied: the proxy itself would answer 403
        try:
            sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            pass
        sock.close()
        assert gw.stop() == 0
    assert "internal error" not in gw.stderr_path.read_text()
