"""Where `--flows FILE` costs through the gateway: req/s and CPU per request of the worker and of the formatter
process apart, one worker in front of nginx, `wrk -t1 -c50`, each config started afresh, rounds interleaved.

Configs: `off` (the ring only), `thread` (the default: format on the loop, write on a thread;
MEMBRANE_FLOWS_PROCESS=0), `process` (the formatter process, proxy/flowproc.py; MEMBRANE_FLOWS_PROCESS=1);
`@shm` after a config puts the flows file on /dev/shm instead of the run's work directory.
Loopback only; run it under the kernel lock like the other benches (BENCHMARKS.md run 7b):

    flock /tmp/membrane-kernel.lock .venv/bin/python bench/flows_split.py --rounds 4 off thread process
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import http_bench
import peers


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="off, thread, process, each optionally @shm")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=5.0)
    a = p.parse_args()
    print("| config | req/s | worker CPU/req | formatter CPU/req |")
    print("|---|---|---|---|")
    with peers.Stack() as stack:
        peers.shift_ports(peers.pick_port_offset(), stack.workdir)  # another run may hold the fixed ports
        peers.start_nginx(stack)
        for _ in range(a.rounds):
            for config in a.configs:
                mode, _, where = config.partition("@")
                flows = None
                if mode != "off":
                    flows = (Path("/dev/shm") if where == "shm" else stack.workdir) / f"flows-{os.getpid()}-{config}.jsonl"
                os.environ["MEMBRANE_FLOWS_PROCESS"] = "1" if mode == "process" else "0"
                port = peers.free_port()
                proc = peers.start_membrane(stack, listen_port=port, upstream_port=peers.PORTS["http"],
                                            dst="bench/backend", flows_to=flows)
                try:
                    http_bench.wrk(port, connections=50, duration_s=1)  # warm up
                    tree = peers.process_tree(proc.pid)
                    before = {pid: _cpu_s(pid) for pid in tree}
                    res = http_bench.wrk(port, connections=50, duration_s=a.duration)
                    after = {pid: _cpu_s(pid) for pid in tree}
                finally:
                    stack.stop(proc)
                    if flows is not None and where == "shm":
                        flows.unlink(missing_ok=True)
                n = res.values["requests"]
                worker = (after[proc.pid] - before[proc.pid]) / n * 1e6
                formatter = sum(after[pid] - before[pid] for pid in tree if pid != proc.pid) / n * 1e6
                print(f"| {config} | {res.values['req_s']:,.0f} | {worker:.1f} µs | {formatter:.1f} µs |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
