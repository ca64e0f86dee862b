"""Pod-to-pod HTTP through the eBPF data path: what the steering itself costs. Prints numbers, asserts nothing.

Rows (wrk in pod A -> nginx in pod B, keep-alive, tiny body; two network namespaces on this host):
  direct           no program attached
  l4-allow         tc_steer attached on both veths, both endpoints enforced, an L3/L4 PASS entry
  redirect         REDIRECT to a trivial transparent forwarder on the host (HAProxy, `transparent` +
                   `usesrc clientip`, server 0.0.0.0:0 = the original destination): steering + sk_assign
  redirect+sockmap the same with the sockmap accelerator on
Run as root:  .venv/bin/python bench/datapath_bench.py [--duration 5] [--connections 50] [--rounds 1]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bpf.maps import IPPROTO_TCP, Endpoint, PolicyEntry, PolicyKey, Verdict  # noqa: E402
from bpf.steer import ProxyPorts, Steering  # noqa: E402
from tests.helpers.netns import Pod, Topology, topology  # noqa: E402

PORT = 80
PROXY_PORT = 15080
ID_A, ID_B, EP_A, EP_B = 1001, 1002, 1, 2

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp};
    proxy_temp_path {tmp};
    fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp};
    scgi_temp_path {tmp};
    keepalive_requests 1000000;
    server {{ listen {port} reuseport; location / {{ return 200 "ok\\n"; }} }}
}}
"""

HAPROXY_CONF = """
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend mbr_bench
    bind 0.0.0.0:{port} transparent
    default_backend orig
backend orig
    source 0.0.0.0 usesrc clientip
    server s 0.0.0.0:0
"""


def wrk(pod: Pod, url: str, *, connections: int, duration_s: int) -> dict[str, float]:
    out = pod.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", url], timeout=duration_s + 30
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]

    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(m.group(1)) if m else 0
    if errors:
        print(f"  note: {errors} errors in: {out.strip()}", file=sys.stderr)
    return {"req_s": rate, "p50_us": pct("50"), "p99_us": pct("99"), "errors": float(errors)}


@contextmanager
def nginx(topo: Topology, pod: Pod) -> Iterator[None]:
    with tempfile.TemporaryDirectory(prefix="mbr-bench-") as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=PORT))
        proc = topo.track(pod.popen(["nginx", "-c", str(conf)]))
        time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {proc.stderr.read() if proc.stderr else ''}")
        yield


@contextmanager
def haproxy() -> Iterator[None]:
    with tempfile.TemporaryDirectory(prefix="mbr-bench-") as tmp:
        conf = Path(tmp) / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(port=PROXY_PORT))
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.5)
        try:
            if proc.poll() is not None:
                raise RuntimeError(f"haproxy exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            yield
        finally:
            proc.kill()
            proc.wait()


def steering(topo: Topology, verdict: Verdict | None, *, sockmap: bool = False) -> Steering | None:
    if verdict is None:
        return None
    a, b = topo.pods["a"], topo.pods["b"]
    st = Steering(proxy_ports=ProxyPorts(tcp4=PROXY_PORT), sockmap=sockmap, sockmap_ports=[PORT])
    st.__enter__()
    m = st.maps
    for pod, ident in ((a, ID_A), (b, ID_B)):
        m.set_identity(f"{pod.ipv4}/32", ident, ifindex=pod.host_ifindex)
    m.set_policy(
        egress={PolicyKey(endpoint_id=EP_A, identity=ID_B, port=PORT, proto=IPPROTO_TCP): PolicyEntry(verdict=verdict)},
        ingress={PolicyKey(endpoint_id=EP_B, identity=ID_A, port=PORT, proto=IPPROTO_TCP): PolicyEntry(verdict=Verdict.PASS)},
    )
    m.set_endpoint(a.host_ifindex, Endpoint(endpoint_id=EP_A, identity=ID_A, enforce_egress=True, enforce_ingress=True))
    m.set_endpoint(b.host_ifindex, Endpoint(endpoint_id=EP_B, identity=ID_B, enforce_egress=True, enforce_ingress=True))
    st.attach(a.host_if)
    st.attach(b.host_if)
    return st


ROWS: list[tuple[str, Verdict | None, bool]] = [
    ("direct", None, False),
    ("l4-allow", Verdict.PASS, False),
    ("redirect", Verdict.REDIRECT, False),
    ("redirect+sockmap", Verdict.REDIRECT, True),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions; medians are reported")
    args = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"NOT AVAILABLE: {tool} (apt-get install wrk nginx-light)")
    have_haproxy = shutil.which("haproxy") is not None
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _v, _s in ROWS}
    with topology("a", "b") as topo, nginx(topo, topo.pods["b"]):
        url = f"http://{topo.pods['b'].ipv4}:{PORT}/"
        for _ in range(args.rounds):
            for name, verdict, sockmap in ROWS:
                if verdict is Verdict.REDIRECT and not have_haproxy:
                    continue
                with ExitStack() as stack:
                    if verdict is Verdict.REDIRECT:
                        stack.enter_context(haproxy())
                    st = steering(topo, verdict, sockmap=sockmap)
                    if st is not None:
                        stack.callback(st.close)
                    results[name].append(wrk(topo.pods["a"], url, connections=args.connections, duration_s=args.duration))
                    if st is not None and st.sockmap is not None:
                        results[name][-1]["sockmap_redirected"] = float(st.sockmap.stats()["redirected"])
    base = statistics.median(r["req_s"] for r in results["direct"])
    print(f"| path (wrk -t1 -c{args.connections} -d{args.duration}s, pod A -> nginx in pod B) | req/s | vs direct | p50 us | p99 us |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        if not runs:
            print(f"| {name} | NOT AVAILABLE (haproxy) | | | |")
            continue
        rate = statistics.median(r["req_s"] for r in runs)
        p50 = statistics.median(r["p50_us"] for r in runs)
        p99 = statistics.median(r["p99_us"] for r in runs)
        extra = f" (sockmap redirected {int(runs[-1]['sockmap_redirected'])} msgs)" if "sockmap_redirected" in runs[-1] else ""
        print(f"| {name}{extra} | {rate:.0f} | {rate / base:.2f}x | {p50:.0f} | {p99:.0f} |")


if __name__ == "__main__":
    main()
