"""Pod-to-pod HTTP through the eBPF data path and the real agent: what steering and L7 cost. Prints numbers, asserts nothing.

Rows (wrk in pod A -> nginx in pod B, keep-alive, tiny body; two network namespaces on this host),
run interleaved (every round visits every row once; medians over rounds are reported):
  direct              no program attached
  l4-allow            tc_steer attached on both veths (maps set by this script), an L3/L4 PASS entry
  redirect            REDIRECT to a trivial transparent forwarder on the host (HAProxy, `transparent` +
                      `usesrc clientip`, server 0.0.0.0:0 = the original destination): steering + sk_assign
  redirect+sockmap    the same with the sockmap accelerator on
  agent-l4            `membrane run` with an L3/L4-only CiliumNetworkPolicy (client -> server:80, no rules:)
  agent-l7[+sockmap]  `membrane run` with an L7 HTTP rule (GET / from app=client), [--sockmap] [--workers 2]
Each row reports req/s and p50/p99 at -c<connections> (wrk --latency), and p50 at -c1 (a second wrk run).
Before each agent row a probe checks the policy is really in the path (GET / -> 200; GET /nope -> 403 under L7).
Run as root:  .venv/bin/python bench/datapath_bench.py [--duration 5] [--connections 50] [--rounds 1] [--workers 1 2]
              [--warmup 2] [--only ROW ...]; use --rounds >= 3 for numbers worth quoting (one round is noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from membrane.bpf.maps import IPPROTO_TCP, Endpoint, PolicyEntry, PolicyKey, Verdict  # noqa: E402
from membrane.bpf.steer import ProxyPorts, Steering  # noqa: E402
from membrane.sandbox.live_demo import AgentProcess, wait_line  # noqa: E402

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

# The agent's inputs: pod A is app=client, pod B app=server (modelled on examples/policies/http.yaml).
ENDPOINTS_YAML = """\
namespaces:
  - name: default
endpoints:
  - name: client
    namespace: default
    labels: {{app: client}}
    ips: [{ip_a}]
    interface: {if_a}
  - name: server
    namespace: default
    labels: {{app: server}}
    ips: [{ip_b}]
    interface: {if_b}
"""

POLICY_L4_YAML = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bench-server-l4
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: server
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: client
      toPorts:
        - ports:
            - port: "80"
              protocol: TCP
"""

POLICY_L7_YAML = POLICY_L4_YAML.replace("bench-server-l4", "bench-server-l7") + """\
          rules:
            http:
              - method: GET
                path: "/"
"""


@dataclass(frozen=True, slots=True)
class Row:
    """One configuration: a hand-set steering verdict (`verdict`), or the real agent with policy `agent`."""

    name: str
    verdict: Verdict | None = None
    sockmap: bool = False
    agent: str | None = None  # "l4" or "l7": `membrane run` with POLICY_L4_YAML / POLICY_L7_YAML
    workers: int = 1


def rows_for(workers: list[int]) -> list[Row]:
    rows = [
        Row("direct"),
        Row("l4-allow", Verdict.PASS),
        Row("redirect", Verdict.REDIRECT),
        Row("redirect+sockmap", Verdict.REDIRECT, sockmap=True),
        Row("agent-l4", agent="l4"),
    ]
    for w in workers:
        suffix = "" if w == 1 else f" w{w}"
        rows.append(Row(f"agent-l7{suffix}", agent="l7", workers=w))
        rows.append(Row(f"agent-l7+sockmap{suffix}", agent="l7", sockmap=True, workers=w))
    return rows


def wrk_argv(url: str, *, connections: int, duration_s: int) -> list[str]:
    return ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", url]


def wrk(pod: Pod, url: str, *, connections: int, duration_s: int) -> dict[str, float]:
    out = pod.run(wrk_argv(url, connections=connections, duration_s=duration_s), timeout=duration_s + 30).stdout
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


def http_code(pod: Pod, url: str) -> str:
    out = pod.run(["curl", "-s", "-o", "/dev/null", "-m", "3", "-w", "%{http_code}", url], check=False, timeout=10)
    return out.stdout.strip() or "none"


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
        try:
            time.sleep(0.5)
            if proc.poll() is not None:
                raise RuntimeError(f"haproxy exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            yield
        finally:
            proc.kill()
            proc.wait()


def steering(topo: Topology, verdict: Verdict, *, sockmap: bool = False) -> Steering:
    a, b = topo.pods["a"], topo.pods["b"]
    st = Steering(proxy_ports=ProxyPorts(tcp4=PROXY_PORT), sockmap=sockmap, sockmap_ports=[PORT])
    st.__enter__()
    try:
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
    except BaseException:
        st.close()
        raise
    return st


def agent_argv(policy: Path, endpoints: Path, status: Path, row: Row) -> list[str]:
    """`membrane run` (no --flows sink: the cost of enforcement, not of flow logging)."""
    argv = [sys.executable, "-m", "membrane.cli", "run", "--policies", str(policy), "--endpoints", str(endpoints),
            "--status-file", str(status)]
    if row.sockmap:
        argv.append("--sockmap")
    if row.workers != 1:
        argv += ["--workers", str(row.workers)]
    return argv


@contextmanager
def agent(workdir: Path, row: Row, stack_note: list[str]) -> Iterator[AgentProcess]:
    """The real node agent for `row`, stopped with SIGTERM on exit (also on failure / Ctrl-C)."""
    policy = workdir / f"policy-{row.agent}.yaml"
    argv = agent_argv(policy, workdir / "endpoints.yaml", workdir / "status.json", row)
    stack_note.append(shlex.join(["membrane", *argv[3:]]))
    err_path = workdir / "agent.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    ap = AgentProcess(proc=proc, flows_path=workdir / "none.jsonl", status_path=workdir / "status.json",
                      stderr_path=err_path)
    try:
        try:
            wait_line(proc, "agent ready", 90)
        except RuntimeError:
            raise RuntimeError(f"the agent did not start: {err_path.read_text()[-2000:]}") from None
        yield ap
    finally:
        with contextlib.suppress(Exception):
            code = ap.stop()
            if code != 0:
                print(f"  note: agent exit status {code}: {err_path.read_text()[-1000:]}", file=sys.stderr)


def probe(row: Row, client: Pod, base: str) -> str:
    """GET / must be 200 everywhere; GET /nope is 403 only when an L7 rule is in the path."""
    want = "403" if row.agent == "l7" else "200"
    got_ok, got_no = "none", "none"
    for _ in range(20):  # the first connection may race the agent's map writes by a few ms
        got_ok, got_no = http_code(client, base), http_code(client, base + "nope")
        if got_ok == "200" and got_no == want:
            return f"/ {got_ok}, /nope {got_no}"
        time.sleep(0.25)
    return f"UNEXPECTED: / {got_ok}, /nope {got_no} (want 200, {want})"


def fmt_us(v: float) -> str:
    return "-" if v != v else (f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (two runs per row: -cN and -c1)")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions; medians are reported")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="agent --workers values for the L7 rows")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured direct load before the first round")
    ap.add_argument("--only", nargs="+", default=None, help="row names to run (direct always runs)")
    args = ap.parse_args()
    for tool in ("wrk", "nginx", "curl"):
        if not shutil.which(tool):
            sys.exit(f"NOT AVAILABLE: {tool} (apt-get install wrk nginx-light curl)")
    have_haproxy = shutil.which("haproxy") is not None
    rows = [r for r in rows_for(args.workers) if args.only is None or r.name == "direct" or r.name in args.only]
    results: dict[str, list[dict[str, float]]] = {r.name: [] for r in rows}
    checks: dict[str, str] = {}
    agent_cmds: dict[str, list[str]] = {r.name: [] for r in rows}
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM tears down like Ctrl-C
    url = ""
    client_ns = ""
    try:
        with tempfile.TemporaryDirectory(prefix="mbr-bench-agent-") as tmp, topology("a", "b") as topo, \
                nginx(topo, topo.pods["b"]):
            workdir = Path(tmp)
            a, b = topo.pods["a"], topo.pods["b"]
            (workdir / "endpoints.yaml").write_text(
                ENDPOINTS_YAML.format(ip_a=a.ipv4, if_a=a.host_if, ip_b=b.ipv4, if_b=b.host_if))
            (workdir / "policy-l4.yaml").write_text(POLICY_L4_YAML)
            (workdir / "policy-l7.yaml").write_text(POLICY_L7_YAML)
            url = f"http://{b.ipv4}:{PORT}/"
            client_ns = a.ns
            if args.warmup > 0:  # the first measured row must not pay for cold caches and nginx start-up
                wrk(a, url, connections=args.connections, duration_s=args.warmup)
            for rnd in range(args.rounds):
                for row in rows:
                    if row.verdict is Verdict.REDIRECT and not have_haproxy:
                        continue
                    print(f"round {rnd + 1}/{args.rounds}: {row.name}", file=sys.stderr, flush=True)
                    with ExitStack() as stack:
                        st: Steering | None = None
                        if row.verdict is Verdict.REDIRECT:
                            stack.enter_context(haproxy())
                        if row.verdict is not None:
                            st = steering(topo, row.verdict, sockmap=row.sockmap)
                            stack.callback(st.close)
                        if row.agent is not None:
                            stack.enter_context(agent(workdir, row, agent_cmds[row.name]))
                        checks[row.name] = probe(row, a, url)
                        res = wrk(a, url, connections=args.connections, duration_s=args.duration)
                        res["p50_c1_us"] = wrk(a, url, connections=1, duration_s=args.duration)["p50_us"]
                        if st is not None and st.sockmap is not None:
                            res["sockmap_redirected"] = float(st.sockmap.stats()["redirected"])
                        results[row.name].append(res)
    except KeyboardInterrupt:
        print("interrupted: torn down", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    report(args, rows, results, checks, agent_cmds, url, client_ns)


def report(args: argparse.Namespace, rows: list[Row], results: dict[str, list[dict[str, float]]], checks: dict[str, str],
           agent_cmds: dict[str, list[str]], url: str, client_ns: str) -> None:
    direct = results["direct"]
    c = args.connections
    print(f"\nwrk -t1 pod A -> nginx in pod B, {args.duration}s per run, {args.rounds} interleaved round(s); "
          "ratio = median over rounds of (row req/s / that round's direct req/s)\n")
    print(f"host: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end "
          "(other work on the host shows up as round-to-round spread)\n")
    print(f"| path | req/s (-c{c}) | vs direct | p50 (-c{c}) | p99 (-c{c}) | p50 (-c1) | errors | req/s per round | probe |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        runs = results[row.name]
        if not runs:
            print(f"| {row.name} | NOT AVAILABLE (haproxy) | | | | | | | |")
            continue

        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        ratio = statistics.median(r["req_s"] / d["req_s"] for r, d in zip(runs, direct, strict=False))
        extra = f" (sockmap redirected {int(runs[-1]['sockmap_redirected'])} msgs)" if "sockmap_redirected" in runs[-1] else ""
        print(f"| {row.name}{extra} | {med('req_s'):.0f} | {ratio:.2f}x | {fmt_us(med('p50_us'))} | {fmt_us(med('p99_us'))} "
              f"| {fmt_us(med('p50_c1_us'))} | {int(sum(r['errors'] for r in runs))} "
              f"| {' '.join(str(round(r['req_s'])) for r in runs)} | {checks.get(row.name, '-')} |")
    print("\nCommands (load: the same two wrk runs for every row, in pod A's namespace):")
    for conns in (c, 1):
        print(f"  ip netns exec {client_ns} {shlex.join(wrk_argv(url, connections=conns, duration_s=args.duration))}")
    print("Per row, what is in the path while wrk runs:")
    for row in rows:
        if row.agent is not None:
            setup = (agent_cmds[row.name] or ["(not run)"])[0]
        elif row.verdict is None:
            setup = "nothing (no tc program)"
        else:
            setup = (f"membrane.bpf.steer.Steering(sockmap={row.sockmap}) attached to both host veths, egress entry "
                     f"{row.verdict.name}" + (f", haproxy transparent on :{PROXY_PORT}" if row.verdict is Verdict.REDIRECT else ""))
        print(f"  {row.name}: {setup}")
    print("  (membrane = .venv/bin/python -m membrane.cli; the endpoints/policy files are in a temp dir: "
          "endpoints = pods a (app=client) and b (app=server) with `interface:`; policies below)")
    print("\npolicy-l4.yaml:\n" + POLICY_L4_YAML + "\npolicy-l7.yaml:\n" + POLICY_L7_YAML)


if __name__ == "__main__":
    main()
