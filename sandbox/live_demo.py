"""The live demo (`membrane demo` -> `run_live_demo()`): real pods, the real agent, real traffic.

Builds network-namespace pods on this machine (10.244.0.0/16, names `mbr<tag>-*`), one per
endpoint of the examples (HTTP, gRPC, DNS + toFQDNs, Kafka), starts `membrane run` on
`examples/policies`, drives curl, a grpcio client, dig and kafka-python producers/consumers
through it, and prints what happened next to the agent's own flow records. Everything it creates
is removed on exit, also on Ctrl-C or failure: the agent keeps its kernel state pinned (on a
private bpffs here) after SIGTERM, so the demo runs `membrane uninstall` after stopping it. The pod-side server scripts live here too (the
agent's integration tests start the same ones). Needs root; traffic never leaves these pods.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

EXAMPLES = Path(str(resources.files("membrane.examples")))  # shipped as package data
GATEWAY4 = "169.254.1.1"

# --- pod-side programs (run with `python -c SCRIPT ARGS...` inside a namespace) ---------------------

# HTTP/1.1 on [::]:PORT (dual stack); every answer names the client address the server saw.
HTTP_SERVER = """
import http.server, socket, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n: self.rfile.read(n)
        client = self.client_address[0].removeprefix("::ffff:")
        body = f"hello {client} {self.command} {self.path}\\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = _answer
    def log_message(self, *a): pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); super().server_bind()
s = S(("::", int(sys.argv[1])), H)
s.daemon_threads = True
print("ready", flush=True); s.serve_forever()
"""

# Authoritative DNS (dnslib) over UDP and TCP on ADDR:53; argv: ADDR then NAME=IP pairs.
DNS_SERVER = """
import socket, struct, sys, threading
from dnslib import DNSRecord, RR, QTYPE, RCODE, A
addr = sys.argv[1]
zone = {k.lower().rstrip(".") + ".": v for k, v in (a.split("=") for a in sys.argv[2:])}
def answer(data):
    q = DNSRecord.parse(data); r = q.reply(); name = str(q.q.qname).lower()
    if name in zone and q.q.qtype == QTYPE.A: r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(zone[name]), ttl=60))
    elif name not in zone: r.header.rcode = RCODE.NXDOMAIN
    return r.pack()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((addr, 53))
    while True:
        data, peer = s.recvfrom(4096)
        try: s.sendto(answer(data), peer)
        except Exception: pass
def conn(c):
    try:
        while True:
            h = c.recv(2)
            if len(h) < 2: return
            n = struct.unpack("!H", h)[0]; data = b""
            while len(data) < n:
                chunk = c.recv(n - len(data))
                if not chunk: return
                data += chunk
            out = answer(data); c.sendall(struct.pack("!H", len(out)) + out)
    finally: c.close()
def tcp():
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((addr, 53)); s.listen(16)
    ready.set()
    while True:
        c, _ = s.accept(); threading.Thread(target=conn, args=(c,), daemon=True).start()
ready = threading.Event()
threading.Thread(target=udp, daemon=True).start(); threading.Thread(target=tcp, daemon=True).start()
ready.wait(); print("ready", flush=True); threading.Event().wait()
"""

# gRPC without generated code: raw-bytes handlers for helloworld.Greeter/{SayHello,SayGoodbye}.
GRPC_SERVER = """
import sys, grpc
from concurrent import futures
def hello(req, ctx): return b"hello " + req
def bye(req, ctx): return b"bye " + req
handler = grpc.method_handlers_generic_handler("helloworld.Greeter", {
    "SayHello": grpc.unary_unary_rpc_method_handler(hello),
    "SayGoodbye": grpc.unary_unary_rpc_method_handler(bye)})
server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[handler])
server.add_insecure_port(f"0.0.0.0:{sys.argv[1]}"); server.start()
print("ready", flush=True); server.wait_for_termination()
"""

# One unary call; prints "OK <reply>" or the status code name. argv: TARGET METHOD.
GRPC_CLIENT = """
import sys, grpc
ch = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
try:
    print("OK", ch.unary_unary(sys.argv[2])(b"membrane", timeout=5).decode())
except grpc.RpcError as e:
    print(e.code().name)
"""

# The Kafka-protocol test broker (tests/helpers/kafka_broker.py) on ADDR:9092.
KAFKA_BROKER = """
import sys, threading
from membrane.sandbox.kafka_broker import KafkaTestBroker
b = KafkaTestBroker(sys.argv[1], 9092); b.start(); b.create_topic("orders"); b.create_topic("payments")
print("ready", flush=True); threading.Event().wait()
"""

# kafka-python: produce one message (argv: BOOTSTRAP produce TOPIC) or consume (BOOTSTRAP consume TOPIC).
KAFKA_CLIENT = """
import sys, logging
logging.disable(logging.CRITICAL)
from kafka import KafkaConsumer, KafkaProducer
boot, op, topic = sys.argv[1:4]
try:
    if op == "produce":
        p = KafkaProducer(bootstrap_servers=boot, max_block_ms=3000, request_timeout_ms=4000, retries=0)
        p.send(topic, b"order-42").get(timeout=6); p.close(timeout=2)
        print("OK produced")
    else:
        c = KafkaConsumer(topic, bootstrap_servers=boot, group_id="billing", auto_offset_reset="earliest",
                          consumer_timeout_ms=5000)
        got = [m.value.decode() for m in c]; c.close()
        print("OK consumed " + ",".join(got) if got else "EMPTY")
except Exception as e:
    print("ERROR " + type(e).__name__)
"""

# TCP connect with a timeout; prints "CONNECTED", "TIMEOUT" or "REFUSED". argv: HOST PORT TIMEOUT.
TCP_PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close(); print("CONNECTED")
except (socket.timeout, TimeoutError): print("TIMEOUT")
except ConnectionRefusedError: print("REFUSED")
except OSError as e: print("ERROR", e.errno)
"""


# --- pods -------------------------------------------------------------------------------------------


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


@dataclass
class DemoPod:
    """A network namespace `<prefix>-<name>` with a veth; `ipv4` is its /32."""

    name: str
    ns: str
    host_if: str
    ipv4: str

    def run(self, argv: Sequence[str], *, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], capture_output=True, text=True, timeout=timeout)

    def python(self, script: str, *args: str, timeout: float = 30) -> str:
        return self.run([sys.executable, "-c", textwrap.dedent(script), *args], timeout=timeout).stdout.strip()

    def popen(self, script: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-u", "-c", textwrap.dedent(script), *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True,
        )


@dataclass
class Cluster:
    """The demo's pods and processes; `close()` removes all of it (idempotent)."""

    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: int = field(default_factory=lambda: 1 + secrets.randbelow(250))
    pods: dict[str, DemoPod] = field(default_factory=dict)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"mbr{self.tag}"

    def add_pod(self, name: str) -> DemoPod:
        idx = len(self.pods) + 1
        pod = DemoPod(name=name, ns=f"{self.prefix}-{name}", host_if=f"{self.prefix}h{idx}",
                      ipv4=str(ipaddress.IPv4Address(f"10.244.{self.subnet}.{idx}")))
        _sh("ip", "netns", "add", pod.ns)
        self.pods[name] = pod  # registered first: a failure below still removes the namespace
        _sh("ip", "link", "add", pod.host_if, "type", "veth", "peer", "name", "eth0", "netns", pod.ns)
        for key in ("proxy_arp", "forwarding"):
            Path(f"/proc/sys/net/ipv4/conf/{pod.host_if}/{key}").write_text("1")
        # proxied ARP answered at once (as Calico sets it), not after a random 0-0.8 s (proxy_delay 80)
        Path(f"/proc/sys/net/ipv4/neigh/{pod.host_if}/proxy_delay").write_text("0")
        _sh("ip", "link", "set", pod.host_if, "up")
        _sh("ip", "route", "add", f"{pod.ipv4}/32", "dev", pod.host_if)
        for argv in (
            ("ip", "link", "set", "lo", "up"),
            ("ip", "link", "set", "eth0", "up"),
            ("ip", "addr", "add", f"{pod.ipv4}/32", "dev", "eth0"),
            ("ip", "route", "add", GATEWAY4, "dev", "eth0", "scope", "link"),
            ("ip", "route", "add", "default", "via", GATEWAY4, "dev", "eth0"),
        ):
            _sh("ip", "netns", "exec", pod.ns, *argv)
        return pod

    def start(self, pod: DemoPod, script: str, *args: str, timeout_s: float = 20) -> subprocess.Popen[str]:
        """Start a server script in `pod` and wait for its `ready` line."""
        proc = pod.popen(script, *args)
        self.procs.append(proc)
        wait_line(proc, "ready", timeout_s)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(5)
        self.procs.clear()
        for pod in self.pods.values():
            _sh("ip", "link", "del", pod.host_if, check=False)
            _sh("ip", "netns", "del", pod.ns, check=False)
        self.pods.clear()


def wait_line(proc: subprocess.Popen[str], expected: str, timeout_s: float) -> str:
    """Read proc's stdout until a line containing `expected`. Raises RuntimeError on exit or timeout."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sel.select(timeout=0.1):
            line = proc.stdout.readline()
            if expected in line:
                return line
            if not line:
                break
    raise RuntimeError(f"never saw {expected!r} from {proc.args!r} (exit status {proc.poll()})")


# --- the agent as a subprocess -----------------------------------------------------------------------


@dataclass
class AgentProcess:
    """`membrane run` started by the demo or a test, with its flows file and status file."""

    proc: subprocess.Popen[str]
    flows_path: Path
    status_path: Path
    stderr_path: Path
    pin_dir: Path | None = None  # --bpf-pin-dir it was given (None: the agent's default)

    def flows(self) -> list[dict[str, Any]]:
        if not self.flows_path.exists():
            return []
        out = []
        for line in self.flows_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                out.append(record.get("flow", record))  # Hubble's {"flow": ...} envelope
        return out

    def status(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}
        return doc

    def wait_reloads(self, n: int, timeout_s: float = 10) -> dict[str, Any]:
        """Wait until the agent applied `n` policies (or reported an error); returns the status."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            doc = self.status()
            if doc.get("reloads", 0) >= n or doc.get("errors"):
                return doc
            time.sleep(0.1)
        return self.status()

    def uninstall(self, *, force: bool = False) -> subprocess.CompletedProcess[str]:
        """`membrane uninstall` for this agent's pin directory (refused while it runs unless force)."""
        cmd = [sys.executable, "-m", "membrane.cli", "uninstall", "--status-file", str(self.status_path)]
        if self.pin_dir is not None:
            cmd += ["--bpf-pin-dir", str(self.pin_dir)]
        if force:
            cmd.append("--force")
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    def stop(self, timeout_s: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_agent(
    policies: Sequence[Path | str],
    endpoints: Path,
    workdir: Path,
    *,
    sockmap: bool = False,
    workers: int = 1,
    timeout_s: float = 60,
    pin_dir: Path | None = None,
    extra_args: Sequence[str] = (),
) -> AgentProcess:
    """Start `membrane run` (with `extra_args`, e.g. `--metrics ADDR:PORT`) and wait for `agent ready`. Raises RuntimeError if it never gets there.

    `pin_dir` (on a bpffs, see private_bpffs()) keeps this agent's kernel state apart from any other
    agent's on the machine; the caller runs `agent.uninstall()` after `agent.stop()`.
    """
    flows = workdir / "flows.jsonl"
    status = workdir / "status.json"
    stderr_path = workdir / f"agent-{time.monotonic_ns()}.err"
    cmd = [sys.executable, "-m", "membrane.cli", "run"]
    for p in policies:
        cmd += ["--policies", str(p)]
    cmd += ["--endpoints", str(endpoints), "--flows", str(flows), "--status-file", str(status)]
    if sockmap:
        cmd.append("--sockmap")
    cmd += ["--workers", str(workers)]  # always: the agent's default is one per core
    if pin_dir is not None:
        cmd += ["--bpf-pin-dir", str(pin_dir)]
    cmd += list(extra_args)
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    agent = AgentProcess(proc=proc, flows_path=flows, status_path=status, stderr_path=stderr_path, pin_dir=pin_dir)
    try:
        wait_line(proc, "agent ready", timeout_s)
    except BaseException:
        with contextlib.suppress(Exception):
            agent.stop()
        raise RuntimeError(f"the agent did not start: {stderr_path.read_text()[-2000:]}") from None
    return agent


@contextlib.contextmanager
def private_bpffs(workdir: Path) -> Iterator[Path]:
    """A bpffs mounted under `workdir` for one agent's pins; yields the pin directory in it.

    On exit, whatever is still pinned there is uninstalled (filters, routing, pins), then the mount
    goes. A real node uses /sys/fs/bpf/membrane; the demo and tests must not share that.
    """
    from membrane.bpf.stale import uninstall

    mnt = workdir / "bpffs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mnt)], check=True, capture_output=True)
    try:
        yield mnt / "membrane"
    finally:
        try:
            uninstall(mnt / "membrane")
        finally:
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
            with contextlib.suppress(OSError):
                mnt.rmdir()


# --- the demo ---------------------------------------------------------------------------------------

# Example endpoint name -> the pod the demo creates for it (every example endpoint gets one).
DEMO_PODS = ("frontend", "backend", "debug", "greeter", "greeter-client", "coredns", "crawler", "web",
             "kafka", "order-service", "billing")


def demo_endpoints(cluster: Cluster) -> str:
    """examples/endpoints.yaml with each endpoint's IP and `interface:` replaced by its demo pod's."""
    import yaml

    doc = yaml.safe_load((EXAMPLES / "endpoints.yaml").read_text())
    for ep in doc["endpoints"]:
        pod = cluster.pods[ep["name"]]
        ep["ips"] = [pod.ipv4]
        ep["interface"] = pod.host_if
    return str(yaml.safe_dump(doc, sort_keys=False))


@dataclass(frozen=True, slots=True)
class Step:
    """One thing the demo does and what the policy says should happen."""

    title: str
    source: str
    destination: str
    port: str
    request: str
    expected: str  # ALLOWED, L7_DENIED or DROPPED
    run: Callable[[], str]  # returns the client's own output
    judge: Callable[[str, list[dict[str, Any]]], str]  # (client output, agent's flows) -> observed verdict


def _http(code: str, flows: list[dict[str, Any]]) -> str:
    return {"200": "ALLOWED", "403": "L7_DENIED"}.get(code, "DROPPED")


def _first(out: str, flows: list[dict[str, Any]]) -> str:
    word = out.split()[0] if out.split() else ""
    return {"OK": "ALLOWED", "PERMISSION_DENIED": "L7_DENIED", "REFUSED": "L7_DENIED", "NOERROR": "ALLOWED",
            "CONNECTED": "ALLOWED"}.get(word, "DROPPED")


def _kafka(topic: str) -> Callable[[str, list[dict[str, Any]]], str]:
    """kafka-python 3 retries a refused Metadata request until max_block_ms, so its own error is a
    timeout: the refusal is read from the agent's flow records (error 29, TOPIC_AUTHORIZATION_FAILED)."""

    def judge(out: str, flows: list[dict[str, Any]]) -> str:
        if out.startswith("OK"):
            return "ALLOWED"
        if "Authorization" in out:
            return "L7_DENIED"
        for f in flows:
            kafka = f.get("l7", {}).get("kafka", {})
            if f.get("verdict") == "DROPPED" and topic in (kafka.get("topics") or [kafka.get("topic", "")]):
                return "L7_DENIED"
        return "DROPPED"

    return judge


def demo_steps(c: Cluster) -> list[Step]:
    p = c.pods
    fe, web, kafka = p["frontend"].ipv4, p["web"].ipv4, p["kafka"].ipv4
    boot = f"{kafka}:9092"

    def curl(pod: str, method: str, url: str) -> Callable[[], str]:
        return lambda: p[pod].run(["curl", "-s", "-o", "/dev/null", "-m", "3", "-w", "%{http_code}", "-X", method, url]).stdout

    def grpc(method: str) -> Callable[[], str]:
        return lambda: p["greeter-client"].python(GRPC_CLIENT, f"{p['greeter'].ipv4}:50051", method)

    def dig(name: str, tcp: bool = False) -> Callable[[], str]:
        argv = ["dig", f"@{p['coredns'].ipv4}", name, "A", "+time=2", "+tries=1", "+noall", "+comments"]
        if tcp:
            argv.append("+tcp")

        def run() -> str:
            out = p["crawler"].run(argv).stdout
            for line in out.splitlines():
                if "status:" in line:
                    return line.split("status:")[1].split(",")[0].strip()
            return "TIMEOUT"

        return run

    def probe(pod: str, host: str, port: int) -> Callable[[], str]:
        return lambda: p[pod].python(TCP_PROBE, host, str(port), "2")

    def kafka_op(pod: str, op: str, topic: str) -> Callable[[], str]:
        return lambda: p[pod].python(KAFKA_CLIENT, boot, op, topic, timeout=40)

    return [
        Step("HTTP allowed", "backend", "frontend", "80/TCP", "GET /api", "ALLOWED", curl("backend", "GET", f"http://{fe}/api"), _http),
        Step("HTTP other path", "backend", "frontend", "80/TCP", "GET /admin", "L7_DENIED", curl("backend", "GET", f"http://{fe}/admin"), _http),
        Step("HTTP other method", "backend", "frontend", "80/TCP", "POST /api", "L7_DENIED", curl("backend", "POST", f"http://{fe}/api"), _http),
        Step("HTTP other pod", "debug", "frontend", "80/TCP", "GET /api", "DROPPED", curl("debug", "GET", f"http://{fe}/api"), _http),
        Step("gRPC allowed method", "greeter-client", "greeter", "50051/TCP", "/helloworld.Greeter/SayHello", "ALLOWED", grpc("/helloworld.Greeter/SayHello"), _first),
        Step("gRPC other method", "greeter-client", "greeter", "50051/TCP", "/helloworld.Greeter/SayGoodbye", "L7_DENIED", grpc("/helloworld.Greeter/SayGoodbye"), _first),
        Step("HTTPS before DNS", "crawler", "web", "443/TCP", "connect (IP not learned yet)", "DROPPED", probe("crawler", web, 443), _first),
        Step("DNS allowed name (UDP)", "crawler", "coredns", "53/UDP", "A docs.cilium.io", "ALLOWED", dig("docs.cilium.io"), _first),
        Step("DNS allowed name (TCP)", "crawler", "coredns", "53/TCP", "A api.github.com", "ALLOWED", dig("api.github.com", tcp=True), _first),
        Step("DNS other name", "crawler", "coredns", "53/UDP", "A evil.example.com", "L7_DENIED", dig("evil.example.com"), _first),
        Step("HTTPS after DNS (toFQDNs)", "crawler", "web", "443/TCP", "connect docs.cilium.io's IP", "ALLOWED", probe("crawler", web, 443), _first),
        Step("Kafka produce orders", "order-service", "kafka", "9092/TCP", "produce topic=orders", "ALLOWED", kafka_op("order-service", "produce", "orders"), _kafka("orders")),
        Step("Kafka produce payments", "order-service", "kafka", "9092/TCP", "produce topic=payments", "L7_DENIED", kafka_op("order-service", "produce", "payments"), _kafka("payments")),
        Step("Kafka consume orders", "billing", "kafka", "9092/TCP", "consume topic=orders", "ALLOWED", kafka_op("billing", "consume", "orders"), _kafka("orders")),
        Step("Kafka from other pod", "debug", "kafka", "9092/TCP", "connect", "DROPPED", probe("debug", kafka, 9092), _first),
    ]


def build_cluster(cluster: Cluster, workdir: Path, say: Callable[[str], None]) -> Path:
    """Create the pods, start their servers, write the endpoints file. Returns its path."""
    for name in DEMO_PODS:
        cluster.add_pod(name)
    p = cluster.pods
    say(f"created {len(p)} pods ({cluster.prefix}-*) in 10.244.{cluster.subnet}.0/24")
    cluster.start(p["frontend"], HTTP_SERVER, "80")
    cluster.start(p["web"], HTTP_SERVER, "443")
    cluster.start(p["greeter"], GRPC_SERVER, "50051")
    web = p["web"].ipv4
    cluster.start(p["coredns"], DNS_SERVER, p["coredns"].ipv4, f"docs.cilium.io={web}", f"api.github.com={web}",
                  f"evil.example.com={web}")
    cluster.start(p["kafka"], KAFKA_BROKER, p["kafka"].ipv4)
    say("servers up: HTTP (frontend:80, web:443), gRPC (greeter:50051), DNS (coredns:53), Kafka (kafka:9092)")
    endpoints = workdir / "endpoints.yaml"
    endpoints.write_text(demo_endpoints(cluster))
    return endpoints


def _summary_of(flow: dict[str, Any]) -> str:
    src = flow.get("source", {})
    dst = flow.get("destination", {})
    ip = flow.get("IP", {})
    who = f"{src.get('pod_name') or ip.get('source')} -> {dst.get('pod_name') or ip.get('destination')}"
    return f"{flow.get('verdict', '?'):9} {flow.get('Type', '?'):5} {who:28} {flow.get('Summary', '')}"


def decided_by(flows: Sequence[dict[str, Any]]) -> str:
    """What the agent's records say decided a step: the first denial's rule or kernel reason, else the allowing rule."""
    requests = [f for f in flows if not f.get("is_reply")]
    for f in requests:
        if f.get("verdict") == "DROPPED":
            kernel = re.search(r"dropped \((\w+)\)$", str(f.get("Summary", "")))
            if f.get("Type") == "L3_L4" and kernel:  # the kernel's drop, its own reason in the summary
                return f"kernel: {kernel.group(1)}"
            if f.get("Type") == "L3_L4":  # a connection the proxy refused before any L7 parsing
                return f"proxy: {str(f.get('drop_reason_desc', '')).lower()} at L3/L4"
            return "proxy: no L7 rule matches"  # an L7 request DROPPED is a policy denial (errors are ERROR)
    for f in requests:
        for key in ("ingress_allowed_by", "egress_allowed_by"):
            for policy in f.get(key) or ():
                name = f"{policy['namespace']}/{policy['name']}" if policy.get("namespace") else policy["name"]
                return f"proxy: {name} ({key.split('_')[0]})"
    return "kernel: allowed" if not requests else "proxy: allowed"


def fold_flows(flows: Sequence[dict[str, Any]]) -> list[tuple[str, int]]:
    """One line per distinct request flow (client ports, correlation ids and latencies folded), first-seen order."""
    counts: dict[str, int] = {}
    for flow in flows:
        if flow.get("is_reply"):
            continue  # responses: the request line already says who and what
        line = re.sub(r":\d+ ->", " ->", _summary_of(flow))
        line = re.sub(r"( corr=\d+)|( \d+(\.\d+)?(ms|us|µs|s) )", " ", line)
        line = re.sub(r"  +", " ", line).strip()
        counts[line] = counts.get(line, 0) + 1
    return list(counts.items())


def run_live_demo(out: Callable[[str], None] = print) -> int:
    """Run the whole live demo. Returns 0 when every step got the verdict the policy predicts, else 1.

    Needs root (namespaces, BPF). Removes everything it created before returning, also on Ctrl-C.
    """
    from membrane.sandbox.demo import VerdictRow, format_verdict_table

    if os.geteuid() != 0:
        out("membrane demo: the live demo needs root (network namespaces and eBPF)")
        return 2
    cluster = Cluster()
    agent: AgentProcess | None = None
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM tears down like Ctrl-C
    try:
        with tempfile.TemporaryDirectory(prefix="membrane-demo-") as tmp, private_bpffs(Path(tmp)) as pins:
            workdir = Path(tmp)
            endpoints = build_cluster(cluster, workdir, out)
            agent = start_agent([EXAMPLES / "policies"], endpoints, workdir, pin_dir=pins)
            out(f"agent ready: {len(agent.status().get('endpoints', []))} endpoints, policies from examples/policies")
            rows: list[VerdictRow] = []
            for step in demo_steps(cluster):
                before = len(agent.flows())
                try:
                    output = step.run()
                except subprocess.TimeoutExpired:
                    output = "TIMEOUT"
                time.sleep(0.15)  # the agent reads kernel drop events every 100 ms
                flows = agent.flows()
                seen = step.judge(output.strip(), flows)
                why = decided_by(flows[before:])
                rows.append(VerdictRow(step.source, step.destination, step.port, step.request, seen,
                                       f"{output.strip()[:36] or '-'}  [{why}]", step.expected))
            time.sleep(0.3)  # the agent reads drop events every 100 ms
            out("")
            out(format_verdict_table(rows, color=sys.stdout.isatty()))
            flows = agent.flows()
            out("")
            out(f"flow records written by the agent ({len(flows)}, repeats folded):")
            for line, count in fold_flows(flows):
                out(f"  {line}" + (f"  (x{count})" if count > 1 else ""))
            code = agent.stop()
            removed = agent.uninstall()  # SIGTERM kept the kernel side enforcing; the demo is over
            agent = None
            if removed.returncode != 0:
                out(f"membrane uninstall failed: {removed.stderr.strip()}")
                code = code or removed.returncode
            ok = all(r.as_expected for r in rows)
            out("")
            out(f"{sum(r.as_expected for r in rows)}/{len(rows)} steps as the policy predicts; agent exit status {code}")
            return 0 if ok and code == 0 else 1
    except KeyboardInterrupt:
        out("interrupted: tearing down")
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        out(f"membrane demo failed: {e}")
        return 1
    finally:
        if agent is not None:
            with contextlib.suppress(Exception):
                agent.stop()
            with contextlib.suppress(Exception):
                agent.uninstall()
        cluster.close()
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def cluster_of(*names: str) -> Iterator[Cluster]:
    """Pods `names` (more via add_pod) removed on exit, also on failure."""
    c = Cluster()
    try:
        for name in names:
            c.add_pod(name)
        yield c
    finally:
        c.close()


if __name__ == "__main__":
    sys.exit(run_live_demo())
