"""CPU per HTTP/2 stream of the proxy's session alone (no sockets, no event loop): h2load's shape replayed in memory.

Records once what a gateway's HTTP/2 session reads when an h2 client sends batches of 10 GETs of /api (h2load's
request head) and an h2 server answers each like the bench's nginx (200, five fields, "ok\\n"), through the real
session of `membrane gateway` with bench/peers/policy.yaml; then feeds those exact reads to fresh sessions and
times only the session (process CPU time). The h2 peers' own cost is left out, so this is the share of the
gateway's CPU per stream that parsers/http2*.py, parsers/hpack.py and proxy/session_http2.py spend (the rest
is proxy/server.py, uvloop and the socket calls). Loopback-free; no lock needed.

    .venv/bin/python bench/h2_session_replay.py [--batches 300] [--repeats 7]

Prints min and median over the repeats. MEMBRANE_PURE=1 measures the pure modules.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
from membrane.parsers.events import Direction
from membrane.policies import compile_policy, load_policies, parse_endpoints
from membrane.proxy.server import ConnectionInfo
from membrane.proxy.session import DataReceived, Forward, Reply, Session
from membrane.proxy.wiring import FixedPeers, gateway_factory

PEERS = Path(__file__).resolve().parent / "peers"
C2S, S2C = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT
REQUEST = [(":method", "GET"), (":path", "/api"), (":scheme", "http"), (":authority", "127.0.0.1:40123"),
           ("accept", "*/*"), ("accept-encoding", "gzip, deflate"), ("user-agent", "h2load nghttp2/1.52.0")]
RESPONSE = [(":status", "200"), ("server", "nginx/1.22.1"), ("date", "Thu, 03 Dec 2026 19:30:00 GMT"),
            ("content-type", "text/plain"), ("content-length", "3")]


def _factory() -> object:
    loaded = load_policies((PEERS / "policy.yaml").read_text(), "policy.yaml")
    pmap = compile_policy(loaded.policies, parse_endpoints((PEERS / "endpoints.yaml").read_text()))
    return gateway_factory(pmap, FixedPeers(dst="bench/backend", upstream=("127.0.0.1", 18081), src="bench/client"))


def _session(factory: object) -> Session:
    info = ConnectionInfo(client=("127.0.0.1", 40000), original_dst=("127.0.0.1", 18081))
    return factory.session(info)  # type: ignore[attr-defined, no-any-return]


def record(factory: object, batches: int, streams: int = 10) -> tuple[list[tuple[Direction, bytes]], int]:
    """The session's reads for `batches` x `streams` requests, and how many streams completed."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    client.initiate_connection()
    server.initiate_connection()
    session = _session(factory)
    reads: list[tuple[Direction, bytes]] = []
    done = 0

    def feed(direction: Direction, data: bytes) -> tuple[bytes, bytes]:
        reads.append((direction, data))
        up = down = b""
        for action in session.handle(DataReceived(direction, data)):
            if isinstance(action, Forward) and action.direction is C2S:
                up += action.data
            elif isinstance(action, Forward | Reply):
                down += action.data
        return up, down

    def settle(up: bytes, down: bytes) -> None:
        nonlocal done
        while up or down:
            next_up = next_down = b""
            if up:
                for event in server.receive_data(up):
                    if isinstance(event, h2.events.RequestReceived) and event.stream_id:
                        server.send_headers(event.stream_id, RESPONSE)
                        server.send_data(event.stream_id, b"ok\n", end_stream=True)
                if out := server.data_to_send():
                    a, b = feed(S2C, out)
                    next_up, next_down = next_up + a, next_down + b
            if down:
                done += sum(isinstance(e, h2.events.StreamEnded) for e in client.receive_data(down))
                if out := client.data_to_send():
                    a, b = feed(C2S, out)
                    next_up, next_down = next_up + a, next_down + b
            up, down = next_up, next_down

    settle(*feed(C2S, client.data_to_send()))
    stream_id = 1
    for _ in range(batches):
        for _ in range(streams):
            client.send_headers(stream_id, REQUEST, end_stream=True)
            stream_id += 2
        settle(*feed(C2S, client.data_to_send()))
    return reads, done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    factory = _factory()
    reads, streams = record(factory, args.batches)
    if streams != args.batches * 10:
        print(f"only {streams} of {args.batches * 10} streams completed", file=sys.stderr)
        return 1
    per_stream = []
    for _ in range(args.repeats):
        session = _session(factory)
        started = time.process_time()
        for direction, data in reads:
            session.handle(DataReceived(direction, data))
        per_stream.append((time.process_time() - started) / streams * 1e6)
    per_stream.sort()
    print(f"{streams} streams, {len(reads)} reads: session CPU per stream min {per_stream[0]:.1f} us, "
          f"median {per_stream[len(per_stream) // 2]:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
