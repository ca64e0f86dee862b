"""HTTP/2 and gRPC under hostile peers through `membrane gateway` (issue 13 item 5): raw h2 frames, httpx, grpcio.

Case table
| client | what | expected |
|---|---|---|
| raw frames | PING flood on one connection | GOAWAY ENHANCE_YOUR_CALM then EOF; httpx on another connection still served; the limit logged |
| raw frames | HEADERS without END_HEADERS, then silence (--header-timeout 0.5) | the connection is closed |
| raw frames | rapid reset spread over 4 connections of 150 streams each | the connection taking the sum past 500 gets ENHANCE_YOUR_CALM |
| raw frames + grpcio server | a gRPC message with flag byte 0x07 | grpc-status 13 on that stream; the server's handler never runs |
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import h2.errors
import hpack
import httpx
import pytest

from tests.helpers.frames import FrameBuilder, client_preface, grpc_headers, request_headers
from tests.integration.gateway_util import gateway, http_policy
from tests.integration.h2_server import H2TestServer
from tests.integration.test_gateway_grpc import greeter_server, grpc_policy

pytestmark = pytest.mark.integration

RULES = """              - method: GET
                path: "/api(/.*)?"
"""
ENHANCE_YOUR_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def _read_to_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of every whole frame the proxy sent (RFC 9113 §4.1)."""
    out = []
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        if pos + 9 + length > len(data):
            break
        out.append((data[pos + 3], data[pos + 4], int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF,
                    data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return out


def _goaway_codes(data: bytes) -> list[int]:
    return [int.from_bytes(p[4:8], "big") for t, _f, _s, p in _frames(data) if t == 7]


def _grpc_statuses(data: bytes) -> list[str]:
    decoder = hpack.Decoder()
    statuses = []
    for ftype, _flags, _sid, payload in _frames(data):
        if ftype == 1:  # HEADERS (the proxy sends no padding or priority)
            fields = dict(decoder.decode(payload))
            if "grpc-status" in fields:
                statuses.append(fields["grpc-status"])
    return statuses


def test_ping_flood_gets_goaway_and_others_are_served(tmp_path: Path) -> None:
    """2,000 PINGs at once on one connection: GOAWAY ENHANCE_YOUR_CALM and EOF; another client is served meanwhile."""
    with H2TestServer() as server, gateway(
        tmp_path, http_policy(server.port, RULES), upstream_port=server.port, dst="default/frontend", src="default/backend"
    ) as gw:
        b = FrameBuilder()
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(client_preface(b) + b"".join(b.ping(i.to_bytes(8, "big")) for i in range(2000)))
            data = _read_to_eof(sock)
        assert ENHANCE_YOUR_CALM in _goaway_codes(data)
        with httpx.Client(http1=False, http2=True, base_url=f"http://127.0.0.1:{gw.port}", timeout=10) as client:
            r = client.get("/api/after")
            assert r.status_code == 200
        gw.stop()
        assert "limit control_frames crossed" in gw.stderr_path.read_text()


def test_unfinished_header_block_is_timed_out(tmp_path: Path) -> None:
    """HEADERS without END_HEADERS followed by silence is closed by the header timeout (it blocks the connection)."""
    with H2TestServer() as server, gateway(
        tmp_path, http_policy(server.port, RULES), upstream_port=server.port, dst="default/frontend",
        src="default/backend", extra=["--header-timeout", "0.5"],
    ) as gw:
        b = FrameBuilder()
        frames = b.headers_split(1, request_headers("/api", extra=[("x-pad", "p" * 300)]), pieces=2, end_stream=True)
        first = int.from_bytes(frames[:3], "big") + 9
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(client_preface(b) + frames[:first])
            started = time.monotonic()
            _read_to_eof(sock, timeout=8)
            waited = time.monotonic() - started
        assert waited < 8  # closed by the proxy, not by our own read timeout
        assert server.seen == []


def test_rapid_reset_spread_over_connections(tmp_path: Path) -> None:
    """Four connections from one address each open and reset 150 streams (each under the per-connection
    rule): the connection that takes the address's sum past 500 is cut with ENHANCE_YOUR_CALM."""
    with H2TestServer() as server, gateway(
        tmp_path, http_policy(server.port, RULES), upstream_port=server.port, dst="default/frontend", src="default/backend"
    ) as gw:
        cut = []
        for _ in range(4):
            b = FrameBuilder()
            burst = b"".join(b.headers(sid, request_headers("/api/x"), end_stream=True) + b.rst_stream(sid)
                             for sid in range(1, 301, 2))
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
                sock.sendall(client_preface(b) + burst)
                sock.shutdown(socket.SHUT_WR)
                cut.append(ENHANCE_YOUR_CALM in _goaway_codes(_read_to_eof(sock)))
        assert cut == [False, False, False, True]


def test_grpc_flag_byte_0x07_is_not_forwarded(tmp_path: Path) -> None:
    """A gRPC message whose flag byte is 0x07 gets grpc-status 13 on its stream; the server's handler never runs."""
    with greeter_server() as (port, greeter), gateway(
        tmp_path, grpc_policy(port), upstream_port=port, dst="default/greeter", src="default/greeter-client"
    ) as gw:
        b = FrameBuilder()
        message = bytes([0x07]) + (5).to_bytes(4, "big") + b"world"
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(client_preface(b) + b.headers(1, grpc_headers("/helloworld.Greeter/SayHello"))
                         + b.data(1, message, end_stream=True))
            sock.settimeout(5)
            data = b""
            deadline = time.monotonic() + 5
            while not _grpc_statuses(data) and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        assert _grpc_statuses(data) == ["13"]
        time.sleep(0.5)
        assert greeter.calls == []
