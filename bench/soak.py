"""Endurance soak (issue 13 item 7): a mixed-protocol load through the real agent for N minutes.

In network namespaces, `membrane run` (files mode, two proxy workers, private bpffs) enforces one policy
file on four upstreams, each driven by real clients in their own pod:
- HTTP/1.1 (frontend:80, http.client): GET /api allowed; GET /admin and POST /api denied (403); a new
  connection per request and one kept-alive connection alternating allowed and denied;
- gRPC (greeter:50051, grpcio): SayHello allowed, SayGoodbye denied (PERMISSION_DENIED), on one
  long-lived channel and on a fresh channel per call;
- DNS (coredns:53, dnspython, UDP and TCP): *.allowed.test allowed, www.denied.test REFUSED;
- Kafka (sandbox/kafka_broker.py, kafka-python): produce to `orders` allowed, to `payments` denied
  (TopicAuthorizationFailedError), on long-lived producers and on a fresh producer per message.

Every `--policy-period` seconds (default 3) the policy file is replaced (atomically) by the next
generation. Every generation differs from the previous one in unrelated rules (reload churn: a path,
a gRPC method, a DNS name and a Kafka topic that nobody requests, and an extra CNP every other time);
every 4th generation also flips two rules that ARE requested (GET /flip, DNS flip.test). A flip
request is judged only when it neither started nor ended between the write of a flipping generation
and the agent's status reporting that reload (its `reloads` counter) plus `APPLY_MARGIN_S` (the
workers re-read the files on the agent's word); every other request is judged always.

Mid-run each upstream is killed and restarted (down `DOWN_S` seconds). A request that overlaps
[kill, back ready + `GRACE_S`] of its upstream is counted apart as "outage" (failures expected there),
but a denied request answered during an outage is still a wrong verdict.

The agent's RSS (VmRSS) and open descriptors (/proc/PID/fd) are sampled every 10 s, summed over the
agent and its workers. Start = median of the samples of the first minute after warm-up (warm-up:
the first minute, or 20% of a shorter run); end = median of the last minute's samples (both under
load, medians so one burst does not decide). Criteria (exit status 1 if any fails):
- no wrong verdict (a denied request answered, an allowed one refused by policy);
- no lost allowed request outside the outage windows (an error or timeout instead of an answer);
- every upstream restarted and serving allowed requests through the agent again afterwards;
- every policy generation applied (reload seen in the status) and no reload the soak did not cause;
- RSS (agent + workers): end - start <= 10% of start and <= 20 MB;
- fds: the agent's connected DNS-over-UDP upstream sockets (one per client port, kept 60 s after its
  last query, so their number follows the query rate) end <= 1.25 x start; all other descriptors
  end <= start + 10;
- the agent ran to the end and exited 0 on SIGTERM; nothing of ours is left in the kernel after.

    .venv/bin/python bench/soak.py --minutes 30 [--out FILE.json]      (root; under the kernel lock)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.helpers: the topology, private bpffs and the leftovers check

from membrane.sandbox.live_demo import (  # noqa: E402
    DNS_SERVER,
    GRPC_SERVER,
    HTTP_SERVER,
    KAFKA_BROKER,
    AgentProcess,
    start_agent,
)

from tests.helpers import bpffs, kernel  # noqa: E402
from tests.helpers.netns import Pod, Topology, topology, wait_for_line  # noqa: E402

SAMPLE_S = 10.0  # RSS / fd sampling period
APPLY_MARGIN_S = 1.0  # after the status shows a reload: the workers recompile on the agent's word
DOWN_S = 3.0  # how long each upstream stays dead
GRACE_S = 3.0  # after an upstream is back: clients reconnect (gRPC backoff, Kafka metadata)
RELOAD_TIMEOUT_S = 15.0
RSS_GROWTH_PCT = 10.0
RSS_GROWTH_MB = 20.0
FD_GROWTH = 10  # descriptors other than the DNS UDP peer sockets: end <= start + 10
UDP_PEER_GROWTH = 1.25  # those follow the query rate (one per client port for 60 s): end <= 1.25 x start
FLIP_EVERY = 4  # every 4th generation flips the requested rules

# --- pod-side load drivers (python -c SCRIPT LOG STOP ARGS...) -----------------------------------------
# Each thread cycles through (kind, request) pairs until the stop file exists and logs one line per
# request: "<kind> <outcome> <t0> <t1>" (system-wide monotonic clock). kind = allowed|denied|flip + ":"
# + a label; outcome = ok (answered) | denied (refused by policy, the protocol's way) | error:<what>.

DRIVER_COMMON = """
import os, sys, threading, time
LOG = open(sys.argv[1], "a", buffering=1); STOP = sys.argv[2]; ARGS = sys.argv[3:]
_lock = threading.Lock()
def loop(items, pause):
    def run():
        i = 0
        while not os.path.exists(STOP):
            kind, fn = items[i % len(items)]; i += 1
            t0 = time.monotonic()
            try:
                outcome = fn()
            except Exception as e:
                outcome = "error:" + type(e).__name__
            t1 = time.monotonic()
            with _lock:
                LOG.write(f"{kind} {outcome} {t0:.4f} {t1:.4f}\\n")
            time.sleep(pause)
    t = threading.Thread(target=run, daemon=True); t.start(); return t
"""

HTTP_DRIVER = DRIVER_COMMON + """
import http.client
host = ARGS[0]
def verdict(status):
    return {200: "ok", 403: "denied"}.get(status, f"error:{status}")
def new(method, path):
    def fn():
        c = http.client.HTTPConnection(host, 80, timeout=5)
        try:
            try:
                c.connect()
            except OSError as e:
                return "error:connect-" + type(e).__name__
            c.request(method, path); r = c.getresponse(); r.read(); return verdict(r.status)
        finally:
            c.close()
    return fn
kept = {}
def keep(path):
    def fn():
        c = kept.get("c") or kept.setdefault("c", http.client.HTTPConnection(host, 80, timeout=5))
        try:
            c.request("GET", path); r = c.getresponse(); r.read()
        except Exception:
            kept.pop("c", None); c.close(); raise
        if r.will_close:
            kept.pop("c", None); c.close()
        return verdict(r.status)
    return fn
threads = [
    loop([("allowed:get-api", new("GET", "/api")), ("denied:get-admin", new("GET", "/admin")),
          ("denied:post-api", new("POST", "/api"))], 0.02),
    loop([("allowed:keep-api", keep("/api")), ("denied:keep-admin", keep("/admin"))], 0.02),
    loop([("flip:get-flip", new("GET", "/flip"))], 0.05),
]
print("running", flush=True)
for t in threads: t.join()
"""

GRPC_DRIVER = DRIVER_COMMON + """
import grpc
OPTS = [("grpc.enable_http_proxy", 0), ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
shared = grpc.insecure_channel(ARGS[0], options=OPTS)
def outcome(stub):
    try:
        stub(b"soak", timeout=5); return "ok"
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.PERMISSION_DENIED:
            return "denied"
        print(f"{time.monotonic():.4f} {e.code().name}: {e.details()}", file=sys.stderr, flush=True)
        return "error:" + e.code().name
def on_shared(method):
    stub = shared.unary_unary(method)
    return lambda: outcome(stub)
def fresh(method):
    def fn():
        with grpc.insecure_channel(ARGS[0], options=OPTS) as ch:
            return outcome(ch.unary_unary(method))
    return fn
HELLO, BYE = "/helloworld.Greeter/SayHello", "/helloworld.Greeter/SayGoodbye"
threads = [
    loop([("allowed:shared-hello", on_shared(HELLO)), ("denied:shared-bye", on_shared(BYE))], 0.02),
    loop([("allowed:fresh-hello", fresh(HELLO)), ("denied:fresh-bye", fresh(BYE))], 0.1),
]
print("running", flush=True)
for t in threads: t.join()
"""

DNS_DRIVER = DRIVER_COMMON + """
import dns.message, dns.query, dns.rcode
server = ARGS[0]
def query(name, tcp):
    def fn():
        q = dns.message.make_query(name, "A")
        r = (dns.query.tcp if tcp else dns.query.udp)(q, server, timeout=5)
        if r.rcode() == dns.rcode.NOERROR and r.answer: return "ok"
        if r.rcode() == dns.rcode.REFUSED: return "denied"
        return "error:" + dns.rcode.to_text(r.rcode())
    return fn
threads = [
    loop([("allowed:udp-www", query("www.allowed.test", False)), ("denied:udp-www", query("www.denied.test", False)),
          ("allowed:udp-api", query("api.allowed.test", False))], 0.02),
    loop([("allowed:tcp-www", query("www.allowed.test", True)), ("denied:tcp-www", query("www.denied.test", True))], 0.05),
    loop([("flip:udp-flip", query("flip.test", False))], 0.05),
]
print("running", flush=True)
for t in threads: t.join()
"""

KAFKA_DRIVER = DRIVER_COMMON + """
import logging
logging.disable(logging.CRITICAL)
from kafka import KafkaProducer
from kafka.errors import TopicAuthorizationFailedError
boot = ARGS[0]
def producer():
    return KafkaProducer(bootstrap_servers=boot, max_block_ms=4000, request_timeout_ms=4000, retries=0, linger_ms=0)
def send(p, topic):
    try:
        p.send(topic, b"soak").get(timeout=5); return "ok"
    except TopicAuthorizationFailedError:
        return "denied"
def kept(topic):
    state = {}
    def fn():
        p = state.get("p") or state.setdefault("p", producer())
        try:
            return send(p, topic)
        except Exception:
            state.pop("p", None); p.close(timeout=1); raise
    return fn
def fresh(topic):
    def fn():
        p = producer()
        try:
            return send(p, topic)
        finally:
            p.close(timeout=1)
    return fn
threads = [
    loop([("allowed:kept-orders", kept("orders"))], 0.05),
    loop([("denied:kept-payments", kept("payments"))], 0.05),
    loop([("allowed:fresh-orders", fresh("orders")), ("denied:fresh-payments", fresh("payments"))], 0.3),
]
print("running", flush=True)
for t in threads: t.join()
"""

# --- the policy generations ---------------------------------------------------------------------------


def _cnp(name: str, app: str, rule: dict[str, Any], direction: str = "ingress") -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": name},
            "spec": {"endpointSelector": {"matchLabels": {"app": app}}, direction: [rule]}}


def _ports(port: str, protocol: str, rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"ports": [{"port": port, "protocol": protocol}], "rules": rules}]


def policy_text(gen: int, flip: bool) -> str:
    """Generation `gen`: churn rules named after gen's parity (and an extra CNP on even gens); `flip`
    adds GET /flip and flip.test."""
    import yaml

    churn = "a" if gen % 2 == 0 else "b"
    http = [{"method": "GET", "path": "/api"}, {"method": "GET", "path": f"/churn-{churn}"}]
    dns = [{"matchPattern": "*.allowed.test"}, {"matchName": f"churn-{churn}.example"}]
    if flip:
        http.append({"method": "GET", "path": "/flip"})
        dns.append({"matchName": "flip.test"})
    docs = [
        _cnp("soak-http", "frontend", {"fromEndpoints": [{"matchLabels": {"app": "http-client"}}],
                                       "toPorts": _ports("80", "TCP", {"http": http})}),
        _cnp("soak-grpc", "greeter", {"fromEndpoints": [{"matchLabels": {"app": "grpc-client"}}],
                                      "toPorts": _ports("50051", "TCP", {"http": [
                                          {"method": "POST", "path": "/helloworld\\.Greeter/SayHello"},
                                          {"method": "POST", "path": f"/helloworld\\.Greeter/Churn{churn.upper()}"}]})}),
        _cnp("soak-dns", "dns-client", {"toEndpoints": [{"matchLabels": {"app": "coredns"}}],
                                        "toPorts": _ports("53", "ANY", {"dns": dns})}, "egress"),
        _cnp("soak-kafka", "kafka", {"fromEndpoints": [{"matchLabels": {"app": "kafka-client"}}],
                                     "toPorts": _ports("9092", "TCP", {"kafka": [
                                         {"role": "produce", "topic": "orders"},
                                         {"role": "produce", "topic": f"churn-{churn}"}]})}),
    ]
    if gen % 2 == 0:
        docs.append(_cnp("soak-churn-extra", "nobody", {"fromEndpoints": [{"matchLabels": {"app": f"nobody-{gen}"}}]}))
    return f"# soak generation {gen} (churn {churn}, flip {'on' if flip else 'off'})\n" + yaml.safe_dump_all(docs, sort_keys=False)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- the run -----------------------------------------------------------------------------------------

PODS = ("frontend", "greeter", "coredns", "kafka", "http-client", "grpc-client", "dns-client", "kafka-client")
PROTOCOLS = ("http", "grpc", "dns", "kafka")
SERVER_POD = {"http": "frontend", "grpc": "greeter", "dns": "coredns", "kafka": "kafka"}
CLIENT_POD = {"http": "http-client", "grpc": "grpc-client", "dns": "dns-client", "kafka": "kafka-client"}


@dataclass
class PolicyEvent:
    gen: int
    flip: bool  # the flip rules' state in this generation
    written: float
    applied: float = float("inf")  # status showed the reload (+ APPLY_MARGIN_S); inf: never seen


@dataclass
class Outage:
    protocol: str
    killed: float
    back: float = float("inf")  # upstream ready again (+ GRACE_S)


@dataclass
class Run:
    topo: Topology
    workdir: Path
    agent: AgentProcess | None = None
    servers: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    policy_events: list[PolicyEvent] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def _endpoints(topo: Topology) -> str:
    lines = ["endpoints:"]
    for name, pod in topo.pods.items():
        lines += [f"  - name: {name}", f"    labels: {{app: {name}}}", f"    ips: [{pod.ipv4}]", f"    interface: {pod.host_if}"]
    return "\n".join(lines) + "\n"


def _stderr_to_file(path: Path, argv: list[str]) -> list[str]:
    """argv with its stderr appended to `path`: nobody reads the pipe Pod.popen gives it, and a full pipe
    (tracebacks of reset connections, grpc core logs) would block the server or client mid-run."""
    return ["sh", "-c", f'exec "$0" "$@" 2>>{shlex.quote(str(path))}', *argv]


def start_server(run: Run, protocol: str) -> None:
    """(Re)start the upstream of `protocol` in its pod (the demo's server programs) and wait for `ready`."""
    pod = run.topo.pods[SERVER_POD[protocol]]
    ip = str(pod.ipv4)
    args = {
        "http": (HTTP_SERVER, "80"),
        "grpc": (GRPC_SERVER, "50051"),
        "dns": (DNS_SERVER, ip, f"www.allowed.test={ip}", f"api.allowed.test={ip}", f"www.denied.test={ip}",
                f"flip.test={ip}"),
        "kafka": (KAFKA_BROKER, ip),
    }[protocol]
    proc = run.topo.track(pod.popen(_stderr_to_file(run.workdir / f"{protocol}-server.err",
                                                    [sys.executable, "-u", "-c", textwrap.dedent(args[0]), *args[1:]])))
    wait_for_line(proc, "ready", timeout=30)
    run.servers[protocol] = proc


def start_driver(run: Run, protocol: str) -> None:
    pod: Pod = run.topo.pods[CLIENT_POD[protocol]]
    target = run.topo.pods[SERVER_POD[protocol]].ipv4
    script, arg = {
        "http": (HTTP_DRIVER, str(target)),
        "grpc": (GRPC_DRIVER, f"{target}:50051"),
        "dns": (DNS_DRIVER, str(target)),
        "kafka": (KAFKA_DRIVER, f"{target}:9092"),
    }[protocol]
    proc = run.topo.track(pod.popen(_stderr_to_file(run.workdir / f"{protocol}-client.err", [
        sys.executable, "-u", "-c", textwrap.dedent(script), str(run.workdir / f"{protocol}.log"),
        str(run.workdir / "stop"), arg])))
    wait_for_line(proc, "running", timeout=30)


def _proc_tree(root: int) -> list[int]:
    """root and its descendants (the agent and its worker processes)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, todo = [root], [root]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parents.items() if pp == pid]
        tree += kids
        todo += kids
    return tree


def socket_summary(pids: list[int]) -> dict[str, Any]:
    """The agent's sockets by protocol, state and the well-known port on either side (ss)."""
    out = subprocess.run(["ss", "-tuanpH"], capture_output=True, text=True).stdout
    marks = tuple(f"pid={p}," for p in pids)
    counts: Counter[str] = Counter()
    examples: list[str] = []
    for line in out.splitlines():
        if any(m in line for m in marks):
            f = line.split()
            ports = {a.rsplit(":", 1)[-1] for a in (f[4], f[5])} & {"80", "50051", "53", "9092"}
            counts[f"{f[0]} {f[1]} {','.join(sorted(ports)) or 'other'}"] += 1
            if f[1] not in ("ESTAB", "LISTEN", "UNCONN") and len(examples) < 8:
                examples.append(" ".join(f[:6]))
    return {**dict(counts.most_common()), **{f"example {i}": e for i, e in enumerate(examples)}}


def sample(pid: int, t: float) -> dict[str, Any]:
    procs = {}
    for p in _proc_tree(pid):
        with contextlib.suppress(OSError, ValueError):
            status = {k: v.split()[0] for k, _, v in (line.partition(":") for line in
                                                        Path(f"/proc/{p}/status").read_text().splitlines()) if v.strip()}
            # RssAnon (heap: Python objects, malloc arenas, bcc/LLVM) apart from RssFile (mapped libraries)
            procs[str(p)] = {"rss_kb": int(status["VmRSS"]), "anon_kb": int(status.get("RssAnon", 0)),
                             "file_kb": int(status.get("RssFile", 0)), "threads": int(status.get("Threads", 0)),
                             "fds": len(os.listdir(f"/proc/{p}/fd"))}
    udp_peers = sum(v for k, v in socket_summary([int(p) for p in procs]).items() if k.startswith("udp ESTAB"))
    return {"t": t, "procs": procs, "rss_kb": sum(v["rss_kb"] for v in procs.values()),
            "fds": sum(v["fds"] for v in procs.values()), "udp_peer_sockets": udp_peers}


def _sampler(run: Run) -> None:
    assert run.agent is not None
    while not run.stop.is_set():
        run.samples.append(sample(run.agent.proc.pid, time.monotonic()))
        run.stop.wait(SAMPLE_S)


def applied_reloads(agent: AgentProcess) -> Counter[str]:
    """The agent's applied policies so far by trigger, from its log ("policy applied (file change): ...").
    The status' `reloads` counter also counts recompiles for learned DNS names, so it cannot tell
    when one file generation is in force."""
    return Counter(re.findall(r"policy applied \(([^)]*)\)", agent.stderr_path.read_text(errors="replace")))


def _policy_churn(run: Run, policy: Path, period: float) -> None:
    assert run.agent is not None
    gen, flip = 0, False
    while not run.stop.wait(period):
        gen += 1
        if gen % FLIP_EVERY == 0:
            flip = not flip
        event = PolicyEvent(gen=gen, flip=flip, written=time.monotonic())
        write_atomic(policy, policy_text(gen, flip))
        run.policy_events.append(event)
        deadline = event.written + RELOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            if applied_reloads(run.agent)["file change"] >= gen:
                event.applied = time.monotonic() + APPLY_MARGIN_S
                break
            doc = run.agent.status()
            if doc.get("errors"):
                run.problems.append(f"gen {gen}: agent reports policy errors {doc['errors']}")
                return
            time.sleep(0.05)
        else:
            run.problems.append(f"gen {gen}: reload not seen within {RELOAD_TIMEOUT_S} s")
            return  # every later flip request stays unjudged; the criterion fails


def _restarts(run: Run, at: dict[str, float]) -> None:
    """Kill and restart each upstream at its time (monotonic)."""
    for protocol, when in sorted(at.items(), key=lambda kv: kv[1]):
        if run.stop.wait(max(0.0, when - time.monotonic())):
            return
        outage = Outage(protocol=protocol, killed=time.monotonic())
        run.outages.append(outage)
        proc = run.servers[protocol]
        proc.kill()
        proc.wait(10)
        time.sleep(DOWN_S)
        try:
            start_server(run, protocol)
        except (TimeoutError, OSError) as e:
            run.problems.append(f"{protocol} upstream did not come back: {e}")
            continue
        outage.back = time.monotonic() + GRACE_S


# --- judging -----------------------------------------------------------------------------------------


def flip_expected(events: list[PolicyEvent], t0: float, t1: float) -> bool | None:
    """The flip rules' state over [t0, t1], or None when a flipping reload was in transition then."""
    state = False
    for i, e in enumerate(events):
        changed = e.flip != (events[i - 1].flip if i else False)
        if changed and t0 <= e.applied and t1 >= e.written:
            return None
        if e.applied <= t0:
            state = e.flip
    return state


def judge(run: Run, protocol: str) -> dict[str, Any]:
    path = run.workdir / f"{protocol}.log"
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    wrong: list[str] = []
    lost: list[str] = []
    recovered = {id(o): 0 for o in run.outages if o.protocol == protocol}
    outages = [o for o in run.outages if o.protocol == protocol]
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split()
        if len(parts) != 4:
            continue
        kind, outcome, t0s, t1s = parts
        t0, t1 = float(t0s), float(t1s)
        cls = kind.split(":")[0]
        if cls == "flip":
            flip = flip_expected(run.policy_events, t0, t1)
            if flip is None:
                counts["flip_unjudged"] += 1
                continue
            cls = "allowed" if flip else "denied"
            counts[f"flip_judged_{cls}"] += 1
        in_outage = any(t0 <= o.back and t1 >= o.killed for o in outages)
        prefix = "outage_" if in_outage else ""
        for o in outages:
            if t0 > o.back and cls == "allowed" and outcome == "ok":
                recovered[id(o)] += 1
        if cls == "allowed":
            if outcome == "ok":
                counts[prefix + "allowed_ok"] += 1
            elif outcome == "denied":
                counts[prefix + "wrong"] += 1
                wrong.append(line)
            else:
                counts[prefix + "allowed_failed"] += 1
                errors[f"{kind} {outcome}"] += 1
                if not in_outage:
                    lost.append(line)
        else:
            if outcome == "ok":
                counts[prefix + "wrong"] += 1
                wrong.append(line)
            elif outcome == "denied":
                counts[prefix + "denied_ok"] += 1
            else:
                counts[prefix + "denied_error"] += 1  # not answered, but not the protocol's refusal either
                errors[f"{kind} {outcome}"] += 1
    return {
        "counts": dict(counts),
        "errors": dict(errors.most_common(12)),
        "wrong_examples": wrong[:10],
        "lost_examples": lost[:10],
        "recovered_after_restart": list(recovered.values()),
    }


def _median(samples: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(s[key] for s in samples))


def memory_report(samples: list[dict[str, Any]], warm_end: float, t_end: float) -> dict[str, Any]:
    window = 60.0 if t_end - warm_end >= 180 else (t_end - warm_end) / 3
    first = [s for s in samples if warm_end <= s["t"] < warm_end + window] or samples[-1:]
    last = [s for s in samples if s["t"] >= t_end - window] or samples[-1:]
    after = [s for s in samples if s["t"] >= warm_end] or samples[-1:]
    rss0, rss1 = _median(first, "rss_kb") / 1024, _median(last, "rss_kb") / 1024
    fd0, fd1 = _median(first, "fds"), _median(last, "fds")
    udp0, udp1 = _median(first, "udp_peer_sockets"), _median(last, "udp_peer_sockets")
    return {
        "window_s": window,
        "rss_mb": {"startup": samples[0]["rss_kb"] / 1024, "start": rss0, "end": rss1,
                   "max": max(s["rss_kb"] for s in after) / 1024, "growth": rss1 - rss0,
                   "growth_pct": 100 * (rss1 - rss0) / rss0},
        "fds": {"startup": samples[0]["fds"], "start": fd0, "end": fd1, "max": max(s["fds"] for s in after),
                "growth": fd1 - fd0},
        # the proxy keeps one connected upstream socket per DNS client port for 60 s after its last query
        "udp_peer_sockets": {"start": udp0, "end": udp1, "max": max(s["udp_peer_sockets"] for s in after)},
        "other_fds": {"start": fd0 - udp0, "end": fd1 - udp1, "growth": (fd1 - udp1) - (fd0 - udp0)},
        "processes": len(samples[-1]["procs"]),
    }


def _criteria(run: Run, results: dict[str, Any], memory: dict[str, Any], agent_exit: int | None,
              left: list[str]) -> dict[str, bool]:
    per = results["protocols"]
    expected_flips = sum(1 for e in run.policy_events)
    return {
        "no_wrong_verdict": all(p["counts"].get("wrong", 0) + p["counts"].get("outage_wrong", 0) == 0 for p in per.values()),
        "no_lost_allowed": all(p["counts"].get("allowed_failed", 0) == 0 for p in per.values()),
        "traffic_of_every_kind": all(p["counts"].get("allowed_ok", 0) > 0 and p["counts"].get("denied_ok", 0)
                                     + p["counts"].get("denied_error", 0) > 0 for p in per.values()),
        "every_upstream_restarted_and_recovered": {o.protocol for o in run.outages} == set(PROTOCOLS)
        and all(p["recovered_after_restart"] and all(n > 0 for n in p["recovered_after_restart"]) for p in per.values()),
        "every_reload_applied": expected_flips > 0 and all(e.applied < float("inf") for e in run.policy_events)
        and results["reloads"]["unexpected"] == 0 and not run.problems,
        "rss_growth_within_limits": memory["rss_mb"]["growth"] <= RSS_GROWTH_MB
        and memory["rss_mb"]["growth_pct"] <= RSS_GROWTH_PCT,
        "fd_growth_within_limits": memory["other_fds"]["growth"] <= FD_GROWTH
        and memory["udp_peer_sockets"]["end"] <= UDP_PEER_GROWTH * max(memory["udp_peer_sockets"]["start"], 100),
        "agent_ran_and_exited_cleanly": agent_exit == 0,
        "nothing_left_behind": not left,
    }


def soak(minutes: float, policy_period: float, workers: int, keep_log: Path | None = None) -> dict[str, Any]:
    duration = minutes * 60
    warmup = min(60.0, duration * 0.2)
    with tempfile.TemporaryDirectory(prefix="membrane-soak-") as tmp, topology(*PODS) as topo, bpffs.pin_dir() as pins:
        run = Run(topo=topo, workdir=Path(tmp))
        for protocol in PROTOCOLS:
            start_server(run, protocol)
        eps = run.workdir / "endpoints.yaml"
        eps.write_text(_endpoints(topo))
        policy = run.workdir / "policy.yaml"
        write_atomic(policy, policy_text(0, False))
        agent_exit: int | None = None
        threads: list[threading.Thread] = []
        try:
            run.agent = start_agent([policy], eps, run.workdir, pin_dir=pins, workers=workers,
                                    extra_args=["--socket", str(run.workdir / "agent.sock")])
            t_start = time.monotonic()
            for protocol in PROTOCOLS:
                start_driver(run, protocol)
            restart_at = {p: t_start + duration * f for p, f in zip(PROTOCOLS, (0.35, 0.45, 0.55, 0.65), strict=True)}
            threads = [threading.Thread(target=_sampler, args=(run,), daemon=True),
                       threading.Thread(target=_policy_churn, args=(run, policy, policy_period), daemon=True),
                       threading.Thread(target=_restarts, args=(run, restart_at), daemon=True)]
            for th in threads:
                th.start()
            t_end = t_start + duration
            next_note = t_start + 60
            while time.monotonic() < t_end:
                if run.agent.proc.poll() is not None:
                    run.problems.append(f"the agent exited early with status {run.agent.proc.returncode}")
                    break
                time.sleep(min(1.0, max(0.0, t_end - time.monotonic())))
                if time.monotonic() >= next_note and run.samples:
                    next_note += 60
                    last = run.samples[-1]
                    print(f"  {(time.monotonic() - t_start) / 60:4.1f} min: {len(run.policy_events)} generations, "
                          f"{len(run.outages)} restarts, rss {last['rss_kb'] / 1024:.1f} MB, fds {last['fds']}", flush=True)
            run.samples.append(sample(run.agent.proc.pid, time.monotonic()))
            t_end = time.monotonic()
            (run.workdir / "stop").touch()
            run.stop.set()
            for th in threads:
                th.join(30)
            time.sleep(6)  # the drivers finish their requests in flight (timeouts are 5 s)
            reloads = applied_reloads(run.agent)
            sockets = socket_summary(_proc_tree(run.agent.proc.pid))
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent_exit = run.agent.stop()
            stderr = run.agent.stderr_path.read_text(errors="replace")
            if keep_log is not None:
                keep_log.write_text(stderr)
                for f in sorted(run.workdir.glob("*.log")) + sorted(run.workdir.glob("*.err")):
                    shutil.copy(f, keep_log.with_name(f"{keep_log.stem}.{f.name}"))
        finally:
            (run.workdir / "stop").touch()
            run.stop.set()
            if run.agent is not None:
                with contextlib.suppress(Exception):
                    run.agent.stop()
                with contextlib.suppress(Exception):
                    run.agent.uninstall()
        results: dict[str, Any] = {"protocols": {p: judge(run, p) for p in PROTOCOLS}}
        results["pod_stderr_lines"] = {f.name: len(f.read_text(errors="replace").splitlines())
                                       for f in sorted(run.workdir.glob("*.err")) if not f.name.startswith("agent-")}
    left = kernel.leftovers()  # after the topology and the bpffs are gone
    applied = sum(1 for e in run.policy_events if e.applied < float("inf"))
    results["reloads"] = {"generations_written": len(run.policy_events), "applied_seen": applied,
                          "agent_applied_by_reason": dict(reloads),
                          "unexpected": max(0, reloads["file change"] - len(run.policy_events)),
                          "flips": sum(1 for e in run.policy_events if e.gen % FLIP_EVERY == 0),
                          "apply_latency_s": _latency(run.policy_events)}
    results["restarts"] = [{"protocol": o.protocol, "at_s": round(o.killed - t_start, 1),
                            "outage_s": round(o.back - o.killed, 2)} for o in run.outages]
    memory = memory_report(run.samples, t_start + warmup, t_end)
    criteria = _criteria(run, results, memory, agent_exit, left)
    log_lines = stderr.splitlines()
    results.update({
        "t_start_monotonic": t_start, "minutes": minutes, "duration_s": round(t_end - t_start, 1), "warmup_s": warmup, "workers": workers,
        "policy_period_s": policy_period, "memory": memory, "samples": run.samples, "problems": run.problems,
        "agent_exit": agent_exit, "left_behind": left, "agent_sockets_at_end": sockets,
        "agent_log": {"lines": len(log_lines), "errors": sum(" ERROR " in ln or "Traceback" in ln for ln in log_lines),
                      "warnings": sum(" WARNING " in ln for ln in log_lines),
                      "error_examples": [ln for ln in log_lines if " ERROR " in ln or "Traceback" in ln][:10]},
        "criteria": criteria, "passed": all(criteria.values()),
    })
    return results


def _latency(events: list[PolicyEvent]) -> dict[str, float]:
    lat = [e.applied - APPLY_MARGIN_S - e.written for e in events if e.applied < float("inf")]
    return {"median": statistics.median(lat), "max": max(lat)} if lat else {}


def print_report(r: dict[str, Any]) -> None:
    restarts = ", ".join(f"{x['protocol']}@{x['at_s']}s ({x['outage_s']} s)" for x in r["restarts"])
    print(f"\nsoak: {r['duration_s'] / 60:.1f} min, {r['workers']} workers, policy every {r['policy_period_s']} s "
          f"({r['reloads']['generations_written']} generations, applied by the agent: {r['reloads']['agent_applied_by_reason']}, "
          f"apply latency median {r['reloads']['apply_latency_s'].get('median', 0):.2f} s), "
          f"restarts: {restarts}")
    print("\n| protocol | allowed ok | allowed failed | denied refused | denied errored | wrong | flip judged / unjudged "
          "| outage: allowed ok / failed, denied refused / errored, wrong | recovered after restart |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p, v in r["protocols"].items():
        c = v["counts"]
        print(f"| {p} | {c.get('allowed_ok', 0)} | {c.get('allowed_failed', 0)} | {c.get('denied_ok', 0)} | "
              f"{c.get('denied_error', 0)} | {c.get('wrong', 0)} | "
              f"{c.get('flip_judged_allowed', 0) + c.get('flip_judged_denied', 0)} / {c.get('flip_unjudged', 0)} | "
              f"{c.get('outage_allowed_ok', 0)} / {c.get('outage_allowed_failed', 0)}, {c.get('outage_denied_ok', 0)} / "
              f"{c.get('outage_denied_error', 0)}, {c.get('outage_wrong', 0)} | {v['recovered_after_restart']} |")
    m = r["memory"]
    print(f"\n| agent + workers ({m['processes']} processes) | at start-up | start (after warm-up) | end | max | growth |")
    print("|---|---|---|---|---|---|")
    rss, fds = m["rss_mb"], m["fds"]
    print(f"| RSS (MB) | {rss['startup']:.1f} | {rss['start']:.1f} | {rss['end']:.1f} | {rss['max']:.1f} | "
          f"{rss['growth']:+.1f} ({rss['growth_pct']:+.1f}%) |")
    print(f"| open fds | {fds['startup']} | {fds['start']:.0f} | {fds['end']:.0f} | {fds['max']} | {fds['growth']:+.0f} |")
    udp, other = m["udp_peer_sockets"], m["other_fds"]
    print(f"| of which DNS UDP peer sockets | | {udp['start']:.0f} | {udp['end']:.0f} | {udp['max']} | "
          f"{udp['end'] - udp['start']:+.0f} |")
    print(f"| other fds | | {other['start']:.0f} | {other['end']:.0f} | | {other['growth']:+.0f} |")
    for p, v in r["protocols"].items():
        if v["errors"]:
            print(f"{p} errors: {v['errors']}")
        for line in v["wrong_examples"] + v["lost_examples"]:
            print(f"  {p}: {line}")
    print(f"agent sockets at the end: {r['agent_sockets_at_end']}")
    if r["problems"]:
        print("problems:", r["problems"])
    if r["agent_log"]["errors"]:
        print("agent log errors:", r["agent_log"]["error_examples"])
    print("\ncriteria: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in r["criteria"].items()))
    print("PASSED" if r["passed"] else "FAILED")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--policy-period", type=float, default=3.0, help="seconds between policy generations")
    parser.add_argument("--workers", type=int, default=2, help="the agent's proxy processes (default 2)")
    parser.add_argument("--out", type=Path, help="write the results (with every sample) here as JSON, the agent's log "
                        "next to it (.agent.log)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces, eBPF)", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM tears down like Ctrl-C
    try:
        keep_log = args.out.with_suffix(".agent.log") if args.out else None
        if keep_log is not None:
            keep_log.parent.mkdir(parents=True, exist_ok=True)
        results = soak(args.minutes, args.policy_period, args.workers, keep_log)
    except KeyboardInterrupt:
        print("interrupted: torn down", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_report(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
