"""HTTP/2 and gRPC parser throughput: requests/s through Http2ServerSide, DATA relayed between the two
sides (MB/s), gRPC message framing, and raw h2 as the reference floor; the requests and relay rows run on
both engines, the lean frame layer (the default) and h2 (`lean=False`).

Run alone: .venv/bin/python bench/parsers/http2.py   (or through bench/parsers_bench.py)
Inputs are built once with python-hyper h2 as the peer; only our code's work is timed, in CPU seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.settings
from membrane.parsers.events import Data, GrpcCall, HttpRequest
from membrane.parsers.grpc import GrpcParser
from membrane.parsers.http2 import Http2ClientSide, Http2ServerSide

STREAMS_PER_CONNECTION = 99  # under the default MAX_CONCURRENT_STREAMS of 100
BIG = 16 * 1024 * 1024 - 1


def _client(server_preface: bytes) -> h2.connection.H2Connection:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.receive_data(server_preface)
    return client


def _requests_wire(grpc: bool) -> bytes:
    client = _client(Http2ServerSide().data_to_send())
    for i in range(STREAMS_PER_CONNECTION):
        sid = 2 * i + 1
        if grpc:
            client.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "svc:50051"),
                                      (":path", "/demo.v1.Greeter/SayHello"), ("content-type", "application/grpc"),
                                      ("te", "trailers"), ("grpc-timeout", "5S"), ("user-agent", "grpc-python/1.6")])
            client.send_data(sid, b"\x00\x00\x00\x00\x07\n\x05world", end_stream=True)
        else:
            client.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "svc.local"),
                                      (":path", f"/v1/pets/{i}?limit=10"), ("user-agent", "python-httpx/0.28"),
                                      ("accept", "*/*"), ("accept-encoding", "gzip")], end_stream=True)
    return client.data_to_send()


def _timed(fn: Callable[[], tuple[int, int]], min_seconds: float = 1.0) -> tuple[float, float]:
    """Run fn for min_seconds of this process's CPU time; returns (messages/s, MB/s) per CPU second.

    CPU time, not wall time: the machine is shared (2 cores, other jobs), and a parser's cost is CPU.
    """
    messages = nbytes = 0
    start = time.process_time()
    while (elapsed := time.process_time() - start) < min_seconds:
        m, b = fn()
        messages += m
        nbytes += b
    return messages / elapsed, nbytes / elapsed / 1e6


def bench_requests(grpc: bool, lean: bool = True) -> dict[str, object]:
    wire = _requests_wire(grpc)
    kind = GrpcCall if grpc else HttpRequest

    def once() -> tuple[int, int]:
        side = Http2ServerSide(lean=lean)
        events = side.feed(wire)
        n = sum(1 for e in events if isinstance(e, kind))
        assert n == STREAMS_PER_CONNECTION
        for e in events:
            if isinstance(e, Data):
                side.acknowledge(e.stream_id or 0, len(e.data))
        return n, len(wire)

    mps, mbps = _timed(once)
    name = "server side: gRPC unary calls (headers+message)" if grpc else "server side: GET requests (headers only)"
    name += ", lean" if lean else ", h2"
    return {"name": name, "messages_per_s": mps, "mb_per_s": mbps}


def bench_h2_reference() -> dict[str, object]:
    """python-hyper h2 alone on the same bytes: the floor our wrapper adds to."""
    wire = _requests_wire(False)

    def once() -> tuple[int, int]:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        events = conn.receive_data(wire)
        return len(events) // 2, len(wire)

    mps, mbps = _timed(once)
    return {"name": "reference: bare h2 H2Connection, same GETs", "messages_per_s": mps, "mb_per_s": mbps}


def bench_relay(body_bytes: int = 8 * 1024 * 1024, lean: bool = True) -> dict[str, object]:
    """One request body relayed server side -> client side, with acknowledgements, as the proxy does."""
    down_preface = Http2ServerSide(initial_window_size=BIG, connection_window_size=BIG).data_to_send()
    client = _client(down_preface)
    client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", "/up")])
    chunk = b"b" * 16_384
    for _ in range(body_bytes // len(chunk)):
        client.send_data(1, chunk)
    client.end_stream(1)
    wire = client.data_to_send()
    upstream = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    upstream.local_settings = h2.settings.Settings(client=False, initial_values={
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: BIG})
    upstream.initiate_connection()
    upstream.increment_flow_control_window(BIG - 65_535)
    upstream_preface = upstream.data_to_send()
    reads = [wire[i : i + 65_536] for i in range(0, len(wire), 65_536)]

    def once() -> tuple[int, int]:
        down = Http2ServerSide(initial_window_size=BIG, connection_window_size=BIG, lean=lean)
        up = Http2ClientSide(initial_window_size=BIG, connection_window_size=BIG, lean=lean)
        up.feed(upstream_preface)
        relayed = 0
        for read in reads:
            for e in down.feed(read):
                if isinstance(e, HttpRequest):
                    up.send_request(e)
                elif isinstance(e, Data):
                    up.send_data(1, e.data)
                    relayed += len(e.data)
            for sid, n in up.pop_delivered():
                down.acknowledge(sid, n)
            up.data_to_send()
            down.data_to_send()
        assert relayed == body_bytes, relayed
        return 1, relayed

    _, mbps = _timed(once, 2.0)
    return {"name": f"relay: 8 MiB DATA server side -> client side, {'lean' if lean else 'h2'}", "messages_per_s": mbps * 1e6 / 16_384,
            "mb_per_s": mbps}


def bench_grpc_framing(message_bytes: int = 1024) -> dict[str, object]:
    one = b"\x00" + message_bytes.to_bytes(4, "big") + b"m" * message_bytes
    stream = one * 1000
    reads = [stream[i : i + 16_384] for i in range(0, len(stream), 16_384)]  # DATA-frame sized pieces

    def once() -> tuple[int, int]:
        reader = GrpcParser()
        n = sum(len(reader.feed(r)) for r in reads)
        return n, len(stream)

    mps, mbps = _timed(once)
    return {"name": f"gRPC framing: {message_bytes} B messages", "messages_per_s": mps, "mb_per_s": mbps}


def run() -> list[dict[str, object]]:
    return [bench_requests(False), bench_requests(False, lean=False), bench_requests(True),
            bench_requests(True, lean=False), bench_h2_reference(), bench_relay(), bench_relay(lean=False),
            bench_grpc_framing()]


if __name__ == "__main__":
    for row in run():
        print(f"{row['name']:52s} {row['messages_per_s']:12.0f} msg/s {row['mb_per_s']:9.1f} MB/s")
