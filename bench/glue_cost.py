"""What the proxy's I/O glue costs an HTTP/1.1 request, in process: `Connection` with stand-in transports.

Drives the real `proxy/server.py` `Connection` (gateway session, the bench policy: GET /api allowed) the
way uvloop does on a keep-alive connection: `data_received(request)` on the client side, then the upstream
protocol's `data_received(response)`, per request. The transports only count writes (no socket, no event
loop), so the figure is the Python work between the reads and the socket calls: session, policy, flow
records, metrics and the glue around them. `--session-only` feeds the same bytes to the session and records
its Log actions without the Connection (what `bench/flows_cost.py` measures as "off"): the difference is
the glue. Each mode runs in a fresh process; process CPU per request, the minimum over rounds.

    .venv/bin/python bench/glue_cost.py [--requests 50000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ("session", "connection")
REQUEST = b"GET /api HTTP/1.1\r\nHost: 127.0.0.1:18000\r\nUser-Agent: wrk\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 13:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n")


class _Transport:
    """The transport methods the Connection calls per request; writes are counted and dropped."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default


def measure(mode: str, requests: int) -> float:
    """Process CPU seconds per request in `mode` (run in a process of its own)."""
    from membrane.cli.gateway import read_endpoints, read_policies
    from membrane.policies import compile_policy
    from membrane.proxy.flows import FlowSink
    from membrane.proxy.metrics import Metrics
    from membrane.proxy.server import Connection, ConnectionInfo, Proxy, ProxyConfig, _Upstream
    from membrane.proxy.session import C2S, S2C, DataReceived, Log
    from membrane.proxy.wiring import FixedPeers, gateway_factory

    loaded = read_policies([str(ROOT / "bench/peers/policy.yaml")])
    pmap = compile_policy(loaded.policies, read_endpoints(str(ROOT / "bench/peers/endpoints.yaml")))
    peers = FixedPeers(dst="bench/backend", upstream=("127.0.0.1", 18080), src="bench/client", port=18080)
    sink = FlowSink([], node_name="bench")
    factory = gateway_factory(pmap, peers, sink).session
    proxy = Proxy(config=ProxyConfig(), factory=factory, upstream=("127.0.0.1", 18080), flows=sink, metrics=Metrics())
    info = ConnectionInfo(client=("127.0.0.1", 40000), original_dst=("127.0.0.1", 18000))
    client, server = _Transport(), _Transport()
    conn = Connection(proxy)
    conn.client, conn.upstream, conn.info = client, server, info  # type: ignore[assignment]
    conn.session = factory(info)
    upstream = _Upstream(conn)
    session = factory(info)

    def run(n: int) -> None:
        if mode == "connection":
            for _ in range(n):
                conn.data_received(REQUEST)
                upstream.data_received(RESPONSE)
        else:
            for _ in range(n):
                for data, direction in ((REQUEST, C2S), (RESPONSE, S2C)):
                    for action in session.handle(DataReceived(direction, data)):
                        if type(action) is Log:
                            proxy.record(action)

    run(2000)  # warm caches (head memo, policy)
    start = time.process_time()
    run(requests)
    spent = time.process_time() - start
    if mode == "connection" and (conn.closed or client.writes != server.writes):
        raise SystemExit(f"the connection did not relay every request: closed={conn.closed}, "
                         f"writes up {server.writes}, down {client.writes}")
    sink.close()
    return spent / requests


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one measurement, in a child process
    a = p.parse_args()
    if a.mode:
        print(f"{measure(a.mode, a.requests) * 1e6:.2f}")
        return 0
    results: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(a.rounds):
        for mode in MODES:  # interleaved, so a change in the machine's load hits both
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--requests", str(a.requests)],
                                 capture_output=True, text=True, check=True)
            results[mode].append(float(out.stdout.strip()))
    print(f"HTTP/1.1 in process, {a.requests:,} requests x {a.rounds} rounds (process CPU per request, min)")
    for mode in MODES:
        print(f"  {mode:<10} {min(results[mode]):6.2f} µs   rounds: {', '.join(f'{v:.2f}' for v in results[mode])}")
    print(f"  glue       {min(results['connection']) - min(results['session']):6.2f} µs (connection - session)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
