"""DNS load drivers for the bench: dnsperf at a fixed 1,000 q/s (lost queries, latency percentiles) and at saturation.

Latency percentiles come from `dnsperf -v`, which prints every answer with its latency in seconds (dnsperf's
summary only has the mean). Queries are bench/peers/dns_queries.txt (A records under bench.test, served by Knot).
Drivers only measure against 127.0.0.1; servers are started and stopped by bench/peers.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_bench import Result, _percentile, display
from peers import HOST, PEERS_DIR, require_tool, udp_dns_rcode

QUERY_FILE = PEERS_DIR / "dns_queries.txt"
RCODE_NOERROR, RCODE_REFUSED = 0, 5


def _dnsperf(argv_tail: list[str], timeout_s: float) -> tuple[list[str], str]:
    exe = require_tool("dnsperf", "dnsperf")
    argv = [exe, "-s", HOST, "-d", str(QUERY_FILE), *argv_tail]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"dnsperf exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")
    return argv, done.stdout


def _summary(out: str) -> dict[str, float]:
    sent = re.search(r"Queries sent:\s+(\d+)", out)
    done = re.search(r"Queries completed:\s+(\d+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    avg = re.search(r"Average Latency \(s\):\s+([\d.]+)", out)
    if not (sent and done and lost and qps and avg):
        raise RuntimeError(f"could not parse dnsperf output: {out[-400:]}")
    noerror = re.search(r"Response codes:.*?NOERROR (\d+)", out)
    return {
        "sent": int(sent.group(1)),
        "completed": int(done.group(1)),
        "lost": int(lost.group(1)),
        "qps": float(qps.group(1)),
        "mean_us": float(avg.group(1)) * 1e6,
        "not_noerror": int(done.group(1)) - (int(noerror.group(1)) if noerror else 0),
    }


def saturation(port: int, *, duration_s: float, clients: int = 4, outstanding: int = 100,
               mode: str = "udp") -> Result:
    """dnsperf as fast as the server answers: q/s, lost queries, mean latency (us)."""
    argv, out = _dnsperf(["-p", str(port), "-m", mode, "-l", f"{duration_s:g}", "-c", str(clients),
                          "-q", str(outstanding), "-t", "2"], duration_s + 30)
    values = _summary(out)
    note = f"{values['lost']:.0f} lost" if values["lost"] else ""
    if values["not_noerror"]:
        note = (note + ", " if note else "") + f"{values['not_noerror']:.0f} answers not NOERROR"
    return Result(command=display(argv), values=values, note=note)


def fixed_qps(port: int, *, qps: int = 1000, duration_s: float, mode: str = "udp") -> Result:
    """dnsperf -Q qps -v: lost queries and per-answer latency percentiles (us)."""
    argv, out = _dnsperf(["-p", str(port), "-m", mode, "-l", f"{duration_s:g}", "-Q", str(qps), "-t", "2", "-v"],
                         duration_s + 30)
    values = _summary(out)
    latencies = sorted(float(m.group(1)) * 1e6 for m in re.finditer(r"^> \w+ \S+ \S+ ([\d.]+)$", out, re.M))
    values.update(p50_us=_percentile(latencies, 50), p99_us=_percentile(latencies, 99),
                  p999_us=_percentile(latencies, 99.9), max_us=latencies[-1] if latencies else float("nan"))
    note = f"{values['lost']:.0f} lost" if values["lost"] else ""
    if values["not_noerror"]:
        note = (note + ", " if note else "") + f"{values['not_noerror']:.0f} answers not NOERROR"
    shown = display(argv).replace(" -v", " -v | grep '^>'  # latencies per answer")
    return Result(command=shown, values=values, note=note)


def rule_check(port: int) -> str:
    """'' when the DNS proxy on port answers api.bench.test and refuses api.other.test (which Knot would answer)."""
    got = (udp_dns_rcode(port, "api.bench.test", 2.0), udp_dns_rcode(port, "api.other.test", 2.0))
    return "" if got == (RCODE_NOERROR, RCODE_REFUSED) else f"RULE NOT ENFORCED: rcodes bench.test/other.test {got}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dnsperf driver against a DNS server already on 127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--qps", type=int, default=0, help="fixed rate; 0 = saturation")
    parser.add_argument("--mode", choices=("udp", "tcp"), default="udp")
    args = parser.parse_args(argv)
    if args.qps:
        res = fixed_qps(args.port, qps=args.qps, duration_s=args.duration, mode=args.mode)
    else:
        res = saturation(args.port, duration_s=args.duration, mode=args.mode)
    print(res.command)
    print(json.dumps(res.values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
