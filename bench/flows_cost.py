"""What flow records cost an HTTP/1.1 request, in process: no sockets, no event loop, the proxy's own code.

One `Http1Session` (the bench policy: GET /api allowed) is fed a request and an nginx-like response per
request; its Log actions go through `Proxy.record` (metrics + the flow sink), a loop pass is simulated every
`--per-pass` requests (the server's `call_soon` flush). Modes, each in a fresh process so threads and
caches do not carry over:
    off     no flows file (the ring only)
    loop    formatted and written on the loop, once per pass (`FlowSink.defer_writes`)
    thread  formatted on the loop once per pass, written by the sink's thread (`start_writer(schedule)`, what the server runs)
    thread-format   formatted and written by the sink's thread (`start_writer()`)
    process formatted and written by a formatter process fed tuples once per pass (`start_writer(schedule,
            process=True)`: the server's with MEMBRANE_FLOWS_PROCESS=1; proxy/flowproc.py, BENCHMARKS.md run 7b)
Prints CPU per request: this process (all threads) plus, for `process`, the formatter process's (from /proc,
10 ms ticks), and the two apart. The flows file is a real size-rotated file in a temporary directory.

    .venv/bin/python bench/flows_cost.py [--requests 20000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("off", "loop", "thread", "thread-format", "process")
REQUEST = b"GET /api HTTP/1.1\r\nHost: 127.0.0.1:18000\r\nUser-Agent: wrk\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 13:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n")


def _child_cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(mode: str, requests: int, per_pass: int, flows_path: str) -> tuple[float, float]:
    """(this process's, the formatter process's) CPU seconds per request in `mode` (run in a process of its own)."""
    from membrane.cli.gateway import read_endpoints, read_policies
    from membrane.policies import compile_policy
    from membrane.proxy.flows import FlowSink, FlowStream, RotatingFile
    from membrane.proxy.metrics import Metrics
    from membrane.proxy.server import ConnectionInfo, Proxy, ProxyConfig
    from membrane.proxy.session import C2S, S2C, DataReceived, Log
    from membrane.proxy.wiring import FixedPeers, gateway_factory

    loaded = read_policies([str(ROOT / "bench/peers/policy.yaml")])
    pmap = compile_policy(loaded.policies, read_endpoints(str(ROOT / "bench/peers/endpoints.yaml")))
    peers = FixedPeers(dst="bench/backend", upstream=("127.0.0.1", 18080), src="bench/client", port=18080)
    streams: list[FlowStream] = [] if mode == "off" else [RotatingFile(flows_path, max_bytes=10 << 20)]
    sink = FlowSink(streams, node_name="bench")
    proxy = Proxy(config=ProxyConfig(), factory=lambda info: None, upstream=None, flows=sink,  # type: ignore[arg-type, return-value]
                  metrics=Metrics())
    session = gateway_factory(pmap, peers, sink).session(
        ConnectionInfo(client=("127.0.0.1", 40000), original_dst=("127.0.0.1", 18000)))
    scheduled: list[Callable[[], None]] = []
    if mode == "loop":
        sink.defer_writes(scheduled.append)
    elif mode == "thread":
        sink.start_writer(scheduled.append, process=False)
    elif mode == "process":
        sink.start_writer(scheduled.append, process=True)
        assert sink._process is not None, "the formatter process did not start"
    elif mode == "thread-format":
        sink.start_writer()

    def run(n: int) -> None:
        for i in range(n):
            for data, direction in ((REQUEST, C2S), (RESPONSE, S2C)):
                for action in session.handle(DataReceived(direction, data)):
                    if type(action) is Log:
                        proxy.record(action)
            if i % per_pass == per_pass - 1:
                while scheduled:
                    scheduled.pop()()

    run(2000)  # warm caches (head memo, policy, JSON of the repeated HTTP records)
    sink.flush()
    child = sink._process.pid if sink._process is not None else None
    child_start = _child_cpu_s(child)
    start = time.process_time()
    run(requests)
    sink.flush()  # with the process: returns when it has written everything
    spent = time.process_time() - start
    child_spent = _child_cpu_s(child) - child_start
    sink.close()
    return spent / requests, child_spent / requests


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--per-pass", type=int, default=8, help="requests per simulated loop pass (default 8)")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one measurement, in a child process
    p.add_argument("--flows-path", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        own, child = measure(a.mode, a.requests, a.per_pass, a.flows_path)
        print(f"{own * 1e6:.2f} {child * 1e6:.2f}")
        return 0
    results: dict[str, list[float]] = {m: [] for m in MODES}
    own_cpu: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.rounds):
            for mode in MODES:  # interleaved, so a change in the machine's load hits every mode
                out = subprocess.run([sys.executable, __file__, "--mode", mode, "--requests", str(a.requests),
                                      "--per-pass", str(a.per_pass), "--flows-path", os.path.join(tmp, f"{mode}.jsonl")],
                                     capture_output=True, text=True, check=True)
                own, child = (float(v) for v in out.stdout.split())
                results[mode].append(own + child)
                own_cpu[mode].append(own)
    base = min(results["off"])
    print(f"HTTP/1.1 in process, {a.requests:,} requests x {a.rounds} rounds, a loop pass every {a.per_pass} requests")
    own_base = min(own_cpu["off"])
    print("| mode | CPU per request, all processes (min) | flows cost (min - off) | of it in the worker process | all rounds |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        best = min(results[mode])
        cost = "-" if mode == "off" else f"+{best - base:.1f} µs"
        own = "-" if mode == "off" else f"+{min(own_cpu[mode]) - own_base:.1f} µs"
        print(f"| {mode} | {best:.1f} µs | {cost} | {own} | {', '.join(f'{v:.1f}' for v in results[mode])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
