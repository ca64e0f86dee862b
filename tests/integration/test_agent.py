"""The node agent end to end: `membrane run` on pods (network namespaces) on the real kernel.

Each test builds its pods, writes an endpoints file with `interface:` per pod, starts the agent as
a subprocess, drives real clients, and afterwards asserts that nothing of ours is left in the
kernel (tests/helpers/kernel.py). Every agent pins its state on a private bpffs of the test (a
SIGTERMed agent keeps enforcing), and `membrane uninstall` runs after it stops. Root only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from membrane.sandbox.live_demo import DNS_SERVER, HTTP_SERVER, TCP_PROBE, AgentProcess
from membrane.sandbox.live_demo import start_agent as _start_agent

from tests.helpers import bpffs, kernel
from tests.helpers.netns import Pod, Topology, topology, wait_for_line

pytestmark = [pytest.mark.integration, pytest.mark.bpf]

ROOT = Path(__file__).resolve().parents[2]
HTTP_POLICY = ROOT / "examples" / "policies" / "http.yaml"


@pytest.fixture(autouse=True)
def _root_and_clean() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("needs root (BPF, netns)")
    kernel.assert_clean()
    yield
    kernel.assert_clean()


_PIN_DIRS: list[Path] = []  # the current test's pin directory (set by _pins)


@pytest.fixture(autouse=True)
def _pins() -> Iterator[None]:
    """A private bpffs per test: agents of parallel runs never adopt each other's maps."""
    with bpffs.pin_dir() as path:
        _PIN_DIRS.append(path)
        try:
            yield
        finally:
            _PIN_DIRS.remove(path)


def start_agent(*args: Any, **kw: Any) -> AgentProcess:
    """live_demo.start_agent with this test's pin directory."""
    return _start_agent(*args, pin_dir=_PIN_DIRS[-1], **kw)


def endpoints_yaml(topo: Topology, labels: dict[str, str], *, listed: tuple[str, ...] | None = None) -> str:
    """An endpoints file: pod name -> `app` label, with the pod's IPs and host-side veth."""
    lines = ["endpoints:"]
    for name, pod in topo.pods.items():
        if listed is not None and name not in listed:
            continue
        lines += [
            f"  - name: {name}",
            f"    labels: {{app: {labels.get(name, name)}}}",
            f"    ips: [{pod.ipv4}, {pod.ipv6}]",
            f"    interface: {pod.host_if}",
        ]
    return "\n".join(lines) + "\n"


def start_server(topo: Topology, pod: Pod, script: str, *args: str) -> None:
    proc = topo.track(pod.popen([sys.executable, "-u", "-c", script, *args]))
    wait_for_line(proc, "ready", timeout=20)


def curl(pod: Pod, url: str, *, method: str = "GET", timeout_s: float = 3) -> tuple[str, str]:
    """(HTTP status, body) as curl in `pod` saw them; status "000" when no connection was made."""
    out = pod.run(["curl", "-s", "-m", str(timeout_s), "-X", method, "-w", "\n%{http_code}", url], check=False, timeout=30)
    body, _, code = out.stdout.rpartition("\n")
    return code.strip(), body.strip()


def probe(pod: Pod, host: object, port: int, timeout_s: float = 1.5) -> str:
    return pod.run([sys.executable, "-c", TCP_PROBE, str(host), str(port), str(timeout_s)], timeout=30).stdout.strip()


def dig(pod: Pod, server: object, name: str, *, tcp: bool = False) -> str:
    argv = ["dig", f"@{server}", name, "A", "+time=2", "+tries=1", "+noall", "+comments", "+answer"]
    if tcp:
        argv.append("+tcp")
    return pod.run(argv, check=False).stdout


def status_word(dig_output: str) -> str:
    for line in dig_output.splitlines():
        if "status:" in line:
            return line.split("status:")[1].split(",")[0].strip()
    return "TIMEOUT"


@pytest.fixture
def http_pods(tmp_path: Path) -> Iterator[tuple[Topology, Path]]:
    """frontend (HTTP :80), backend, debug; the endpoints file of examples/policies/http.yaml."""
    with topology("frontend", "backend", "debug") as topo:
        start_server(topo, topo.pods["frontend"], HTTP_SERVER, "80")
        eps = tmp_path / "endpoints.yaml"
        eps.write_text(endpoints_yaml(topo, {}))
        yield topo, eps


@pytest.fixture
def agent_box() -> Iterator[list[AgentProcess]]:
    """Agents a test started; each is stopped (SIGTERM, exit 0 asserted by the test) at teardown, then uninstalled."""
    agents: list[AgentProcess] = []
    yield agents
    for a in agents:
        if a.proc.poll() is None:
            a.stop()
    if agents:
        done = agents[-1].uninstall()  # SIGTERM kept the kernel side enforcing
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("sockmap", "workers"), [(False, 1), (True, 1), (False, 2)], ids=["sockmap-off", "sockmap-on", "two-workers"]
)
def test_http_allowed_denied_and_source_preserved(
    http_pods: tuple[Topology, Path], tmp_path: Path, agent_box: list[AgentProcess], sockmap: bool, workers: int
) -> None:
    """Seed example: frontend accepts only GET /api from backend on 80 (403 otherwise, other pods dropped); same with sockmap and with two workers."""
    topo, eps = http_pods
    fe, be, dbg = topo.pods["frontend"], topo.pods["backend"], topo.pods["debug"]
    agent = start_agent([HTTP_POLICY], eps, tmp_path, sockmap=sockmap, workers=workers)
    agent_box.append(agent)
    code, body = curl(be, f"http://{fe.ipv4}/api")
    assert (code, body) == ("200", f"hello {be.ipv4} GET /api")  # the server saw the client's own address
    assert curl(be, f"http://{fe.ipv4}/admin") == ("403", "Access denied")
    assert curl(be, f"http://{fe.ipv4}/api", method="POST")[0] == "403"
    assert curl(dbg, f"http://{fe.ipv4}/api", timeout_s=1.5)[0] == "000"
    code6, body6 = curl(be, f"http://[{fe.ipv6}]/api")
    assert (code6, body6) == ("200", f"hello {be.ipv6} GET /api")
    time.sleep(0.3)
    flows = agent.flows()
    l7 = [(f["verdict"], f["l7"]["http"]["url"]) for f in flows if f.get("Type") == "L7" and not f["is_reply"]]
    assert ("FORWARDED", f"http://{fe.ipv4}/api") in l7
    assert ("DROPPED", f"http://{fe.ipv4}/admin") in l7
    # requests go from backend; responses are recorded from the server back to the client (Hubble's is_reply)
    assert all(f["source"]["pod_name"] == ("frontend" if f["is_reply"] else "backend") for f in flows if f.get("Type") == "L7")
    stats = agent.status()["sockmap_stats"]
    if sockmap:
        assert stats["sockets_added"] > 0
        assert stats["redirected"] > 0  # the accelerator really carried bytes
    else:
        assert stats == {}
    assert agent.stop() == 0


def test_l3l4_drop_times_out_and_is_recorded(
    http_pods: tuple[Topology, Path], tmp_path: Path, agent_box: list[AgentProcess]
) -> None:
    """An L3/L4 deny drops the SYN in the kernel (connect times out) and becomes a DROPPED L3_L4 flow record."""
    topo, eps = http_pods
    fe, be, dbg = topo.pods["frontend"], topo.pods["backend"], topo.pods["debug"]
    agent = start_agent([HTTP_POLICY], eps, tmp_path)
    agent_box.append(agent)
    assert probe(dbg, fe.ipv4, 80) == "TIMEOUT"  # no allow for debug at all
    assert probe(be, fe.ipv4, 8080) == "TIMEOUT"  # backend, but another port
    deadline = time.monotonic() + 3
    drops: list[dict[str, object]] = []
    while time.monotonic() < deadline and len({(d["l4"]["TCP"]["destination_port"]) for d in drops}) < 2:  # type: ignore[index]
        drops = [f for f in agent.flows() if f.get("Type") == "L3_L4"]
        time.sleep(0.1)
    # Hubble's shape: POLICY_DENIED either way, the way in traffic_direction (the kernel's reason is in the Summary).
    seen = {
        (d["source"]["pod_name"], d["l4"]["TCP"]["destination_port"], d["drop_reason_desc"], d["traffic_direction"])  # type: ignore[index]
        for d in drops
    }
    assert ("debug", 80, "POLICY_DENIED", "INGRESS") in seen
    assert ("backend", 8080, "POLICY_DENIED", "INGRESS") in seen
    assert agent.status()["drops"]["ingress_denied"] >= 2
    assert agent.stop() == 0


DNS_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
    - toEndpoints: [{matchLabels: {app: dns}}]
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules:
            dns: [{matchPattern: "*.allowed.test"}]
    - toFQDNs: [{matchName: "www.allowed.test"}]
      toPorts:
        - ports: [{port: "80", protocol: TCP}]
"""


@pytest.mark.parametrize("workers", [1, 3], ids=["one-worker", "three-workers"])
def test_dns_steered_refused_and_tofqdns(tmp_path: Path, agent_box: list[AgentProcess], workers: int) -> None:
    """DNS over UDP and TCP goes through the proxy (REFUSED for names the rule lacks); toFQDNs opens the answered IP only after the answer."""
    with topology("client", "dns", "web") as topo:
        client, dns, web = topo.pods["client"], topo.pods["dns"], topo.pods["web"]
        start_server(topo, web, HTTP_SERVER, "80")
        start_server(topo, dns, DNS_SERVER, str(dns.ipv4), f"www.allowed.test={web.ipv4}", f"www.denied.test={web.ipv4}")
        eps = tmp_path / "endpoints.yaml"
        eps.write_text(endpoints_yaml(topo, {}, listed=("client", "dns")))  # web is outside the cluster: `world`
        pol = tmp_path / "dns.yaml"
        pol.write_text(DNS_POLICY)
        agent = start_agent([pol], eps, tmp_path, workers=workers)
        agent_box.append(agent)
        assert probe(client, web.ipv4, 80) == "TIMEOUT"  # not learned yet
        out = dig(client, dns.ipv4, "www.allowed.test")
        assert status_word(out) == "NOERROR"
        assert str(web.ipv4) in out
        assert probe(client, web.ipv4, 80) == "CONNECTED"  # learned from the answer
        assert probe(client, web.ipv4, 81) == "TIMEOUT"  # only the port the rule names
        assert status_word(dig(client, dns.ipv4, "www.denied.test")) == "REFUSED"
        assert status_word(dig(client, dns.ipv4, "www.denied.test", tcp=True)) == "REFUSED"
        assert status_word(dig(client, dns.ipv4, "other.allowed.test", tcp=True)) == "NXDOMAIN"  # allowed, forwarded
        time.sleep(0.3)
        dns_flows = [f for f in agent.flows() if "dns" in f.get("l7", {})]
        queries = {(f["verdict"], f["l7"]["dns"]["query"], f["l4"].get("TCP") is not None) for f in dns_flows if not f["is_reply"]}
        assert ("DROPPED", "www.denied.test.", False) in queries
        assert ("DROPPED", "www.denied.test.", True) in queries
        assert ("FORWARDED", "www.allowed.test.", False) in queries
        assert agent.status()["learned_fqdns"] == {"www.allowed.test.": [str(web.ipv4)]}
        assert agent.stop() == 0


KEEPALIVE_CLIENT = """
import http.client, os, sys, time
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=5)
for i in range(2):
    c.request("GET", "/api"); r = c.getresponse(); print(r.status, r.read().decode().strip(), flush=True)
    while i == 0 and not os.path.exists(sys.argv[2]): time.sleep(0.05)
"""


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
def test_policy_edit_applies_to_live_connection(
    http_pods: tuple[Topology, Path], tmp_path: Path, agent_box: list[AgentProcess], workers: int
) -> None:
    """An edited policy file is applied without a restart, to the next request of an open keep-alive connection; an invalid edit keeps the last good policy."""
    topo, eps = http_pods
    fe, be = topo.pods["frontend"], topo.pods["backend"]
    pol = tmp_path / "policy.yaml"
    pol.write_text(HTTP_POLICY.read_text())
    agent = start_agent([pol], eps, tmp_path, workers=workers)
    agent_box.append(agent)
    go = tmp_path / "go"
    proc = topo.track(be.popen([sys.executable, "-u", "-c", KEEPALIVE_CLIENT, str(fe.ipv4), str(go)]))
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("200 ")
    reloads = agent.status()["reloads"]
    pol.write_text(HTTP_POLICY.read_text().replace('path: "/api"', 'path: "/v2/.*"'))
    assert agent.wait_reloads(reloads + 1)["reloads"] == reloads + 1
    go.touch()
    assert proc.stdout.readline().startswith("403 ")  # same connection, new policy
    assert proc.wait(10) == 0
    assert curl(be, f"http://{fe.ipv4}/v2/items")[0] == "200"
    pol.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {endpointSelector: {}, ingress: [{toPort: []}]}\n")
    doc = agent.wait_reloads(reloads + 5, timeout_s=5)
    assert doc["errors"]
    assert "toPort" in " ".join(doc["errors"])
    assert curl(be, f"http://{fe.ipv4}/v2/items")[0] == "200"  # last good policy still enforced
    assert curl(be, f"http://{fe.ipv4}/api")[0] == "403"
    assert agent.stop() == 0


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
def test_sigkill_fails_closed_and_restart_leaves_no_strays(
    http_pods: tuple[Topology, Path], tmp_path: Path, agent_box: list[AgentProcess], workers: int
) -> None:
    """After SIGKILL the kernel keeps L3/L4 verdicts and L7 ports fail closed (workers exit with the agent); a new agent replaces the leftovers and leaves nothing after SIGTERM."""
    topo, eps = http_pods
    fe, be, dbg = topo.pods["frontend"], topo.pods["backend"], topo.pods["debug"]
    first = start_agent([HTTP_POLICY], eps, tmp_path, workers=workers)
    agent_box.append(first)
    assert curl(be, f"http://{fe.ipv4}/api")[0] == "200"
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "membrane.control.workers" in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout:
        time.sleep(0.1)  # workers notice their control socket closing and drain
    assert "membrane.control.workers" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert kernel.leftovers()  # the programs stay attached after a crash
    assert probe(dbg, fe.ipv4, 80) == "TIMEOUT"  # L3/L4 still enforced
    assert curl(be, f"http://{fe.ipv4}/api", timeout_s=1.5)[0] == "000"  # no proxy: the L7 port fails closed
    second = start_agent([HTTP_POLICY], eps, tmp_path)
    agent_box.append(second)
    filters = subprocess.run(["tc", "filter", "show", "dev", fe.host_if, "ingress"], capture_output=True, text=True).stdout
    assert filters.count("name mbr_tc_steer") == 1  # the stale filter was replaced, not doubled
    assert curl(be, f"http://{fe.ipv4}/api")[0] == "200"
    assert second.stop() == 0
    assert probe(dbg, fe.ipv4, 80) == "TIMEOUT"  # SIGTERM keeps enforcing
    done = second.uninstall()
    assert done.returncode == 0, done.stderr
    assert kernel_state_left() == []


def test_sigkill_and_restart_under_traffic_never_passes_denied_traffic(
    http_pods: tuple[Topology, Path], tmp_path: Path, agent_box: list[AgentProcess]
) -> None:
    """Agent SIGKILLed and restarted under continuous probing: no datagram of the denied pod reaches frontend and no L7-denied request reaches its server, at any moment; allowed requests work again after."""
    import textwrap

    from tests.helpers.probes import HTTP_PROBER, RECEIVER, SENDER

    topo, eps = http_pods
    fe, be, dbg = topo.pods["frontend"], topo.pods["backend"], topo.pods["debug"]
    first = start_agent([HTTP_POLICY], eps, tmp_path)
    agent_box.append(first)
    udp_log, http_log, stop = tmp_path / "udp.log", tmp_path / "http.log", tmp_path / "stop"
    receiver = topo.track(fe.popen([sys.executable, "-u", "-c", textwrap.dedent(RECEIVER), str(udp_log), "9999"]))
    wait_for_line(receiver, "ready")
    sender = topo.track(dbg.popen([sys.executable, "-u", "-c", textwrap.dedent(SENDER), str(fe.ipv4), str(stop), "9999"]))
    wait_for_line(sender, "sending")
    prober = topo.track(
        be.popen([sys.executable, "-u", "-c", textwrap.dedent(HTTP_PROBER), f"http://{fe.ipv4}/v2/items", str(http_log), str(stop)])
    )
    wait_for_line(prober, "probing")
    try:
        time.sleep(1.0)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        time.sleep(0.5)
        second = start_agent([HTTP_POLICY], eps, tmp_path)
        agent_box.append(second)
        time.sleep(1.0)
    finally:
        stop.touch()
    out, _err = sender.communicate(timeout=10)
    prober.communicate(timeout=10)
    sent = int(out.strip().splitlines()[-1].split("=")[1])
    assert sent > 500  # the denied pod really tried throughout
    assert udp_log.read_text() == ""  # not one datagram of debug reached frontend
    codes = [line.split()[0] for line in http_log.read_text().splitlines()]
    assert "403" in codes  # the proxy judged the path before and after
    assert "200" not in codes  # never answered by the server itself: L7 never bypassed
    assert curl(be, f"http://{fe.ipv4}/api")[0] == "200"
    assert curl(be, f"http://{fe.ipv4}/v2/items")[0] == "403"
    assert second.stop() == 0


def kernel_state_left(timeout_s: float = 3.0) -> list[str]:
    """Our kernel objects but the pods themselves, after waiting up to timeout_s for deferred frees."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [x for x in kernel.leftovers() if "link" not in x and "netns" not in x]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_sigterm_keeps_enforcing_until_uninstall_which_refuses_a_running_agent(
    http_pods: tuple[Topology, Path], tmp_path: Path, agent_box: list[AgentProcess]
) -> None:
    """After SIGTERM L3/L4 stays enforced and the L7 port fails closed; `membrane uninstall` refuses while an agent runs, --force does not, and afterwards nothing is left."""
    topo, eps = http_pods
    fe, be, dbg = topo.pods["frontend"], topo.pods["backend"], topo.pods["debug"]
    agent = start_agent([HTTP_POLICY], eps, tmp_path)
    agent_box.append(agent)
    refused = agent.uninstall()
    assert refused.returncode == 1
    assert "an agent is running" in refused.stderr
    assert curl(be, f"http://{fe.ipv4}/api")[0] == "200"  # refusing touched nothing
    assert agent.stop() == 0
    assert probe(dbg, fe.ipv4, 80) == "TIMEOUT"  # L3/L4 still enforced by the kept programs
    assert curl(be, f"http://{fe.ipv4}/api", timeout_s=1.5)[0] == "000"  # the L7 port: dropped, no proxy
    done = agent.uninstall()
    assert done.returncode == 0, done.stderr
    assert "removed pin" in done.stdout
    assert kernel_state_left() == []
    assert probe(dbg, fe.ipv4, 80) == "CONNECTED"  # nothing enforces any more
    assert agent.uninstall().stdout.strip() == "nothing to remove"  # idempotent

    forced = start_agent([HTTP_POLICY], eps, tmp_path)
    agent_box.append(forced)
    assert probe(dbg, fe.ipv4, 80) == "TIMEOUT"
    done = forced.uninstall(force=True)
    assert done.returncode == 0, done.stderr
    assert probe(dbg, fe.ipv4, 80) == "CONNECTED"  # forced: the running agent's kernel side is gone
    assert forced.stop() == 0
    assert kernel_state_left() == []


def test_status_and_endpoint_list(http_pods: tuple[Topology, Path], tmp_path: Path, agent_box: list[AgentProcess]) -> None:
    """`membrane status` and `membrane endpoint list` report the running agent's endpoints, identities and enforcement."""
    topo, eps = http_pods
    agent = start_agent([HTTP_POLICY], eps, tmp_path)
    agent_box.append(agent)
    cli = [sys.executable, "-m", "membrane.cli"]
    st = subprocess.run([*cli, "status", "--status-file", str(agent.status_path)], capture_output=True, text=True, cwd=ROOT)
    assert st.returncode == 0
    assert "agent ready" in st.stdout
    assert "3/3 ready" in st.stdout
    el = subprocess.run([*cli, "endpoint", "list", "--status-file", str(agent.status_path)], capture_output=True, text=True, cwd=ROOT)
    assert el.returncode == 0
    rows = {line.split()[1]: line for line in el.stdout.splitlines()[1:] if line.split() and line.split()[0].isdigit()}
    assert set(rows) == {"default/frontend", "default/backend", "default/debug"}
    assert "Enabled" in rows["default/frontend"]
    assert topo.pods["frontend"].host_if in rows["default/frontend"]
    assert rows["default/backend"].count("Disabled") == 2
    assert agent.stop() == 0
    gone = subprocess.run([*cli, "status", "--status-file", str(agent.status_path)], capture_output=True, text=True, cwd=ROOT)
    assert gone.returncode == 1


def test_grpc_and_kafka_through_the_steering(tmp_path: Path, agent_box: list[AgentProcess]) -> None:
    """gRPC (examples/policies/grpc.yaml) and Kafka (kafka.yaml) through the kernel steering: allowed calls pass, denied ones get PERMISSION_DENIED / TOPIC_AUTHORIZATION_FAILED."""
    from membrane.sandbox.live_demo import GRPC_CLIENT, GRPC_SERVER, KAFKA_BROKER, KAFKA_CLIENT

    with topology("greeter", "greeter-client", "kafka", "order-service") as topo:
        p = topo.pods
        start_server(topo, p["greeter"], GRPC_SERVER, "50051")
        start_server(topo, p["kafka"], KAFKA_BROKER, str(p["kafka"].ipv4))
        lines = ["endpoints:"]
        for name, ns in (("greeter", "default"), ("greeter-client", "default"), ("kafka", "shop"), ("order-service", "shop")):
            pod = p[name]
            lines += [f"  - name: {name}", f"    namespace: {ns}", f"    labels: {{app: {name}}}",
                      f"    ips: [{pod.ipv4}]", f"    interface: {pod.host_if}"]
        eps = tmp_path / "endpoints.yaml"
        eps.write_text("\n".join(lines) + "\n")
        pols = ROOT / "examples" / "policies"
        agent = start_agent([pols / "grpc.yaml", pols / "kafka.yaml"], eps, tmp_path)
        agent_box.append(agent)
        target = f"{p['greeter'].ipv4}:50051"
        client = p["greeter-client"]
        hello = client.run([sys.executable, "-c", GRPC_CLIENT, target, "/helloworld.Greeter/SayHello"], timeout=30).stdout
        bye = client.run([sys.executable, "-c", GRPC_CLIENT, target, "/helloworld.Greeter/SayGoodbye"], timeout=30).stdout
        assert hello.strip() == "OK hello membrane"
        assert bye.strip() == "PERMISSION_DENIED"
        boot = f"{p['kafka'].ipv4}:9092"
        producer = p["order-service"]
        ok = producer.run([sys.executable, "-c", KAFKA_CLIENT, boot, "produce", "orders"], timeout=60).stdout.strip()
        denied = producer.run([sys.executable, "-c", KAFKA_CLIENT, boot, "produce", "payments"], timeout=60).stdout.strip()
        assert ok == "OK produced"
        assert denied.startswith("ERROR")
        kafka_drops = [f for f in agent.flows() if f["verdict"] == "DROPPED" and "kafka" in f.get("l7", {})]
        assert kafka_drops
        assert all(f["l7"]["kafka"]["topic"] == "payments" for f in kafka_drops)
        assert all(f["l7"]["kafka"]["error_code"] == 29 for f in kafka_drops)
        assert agent.stop() == 0


def test_endpoints_file_edits_attach_and_detach(tmp_path: Path, agent_box: list[AgentProcess]) -> None:
    """An endpoint whose veth appears later is attached within a poll; one removed from the endpoints file is detached and unenforced."""
    with topology("frontend", "backend") as topo:
        fe = topo.pods["frontend"]
        start_server(topo, fe, HTTP_SERVER, "80")
        eps = tmp_path / "endpoints.yaml"
        late_if = f"{topo.prefix}h3"  # the name add_pod will give the third pod
        eps.write_text(endpoints_yaml(topo, {}) + f"  - name: debug\n    labels: {{app: debug}}\n    ips: [10.244.{topo.subnet}.3]\n    interface: {late_if}\n")
        agent = start_agent([HTTP_POLICY], eps, tmp_path)
        agent_box.append(agent)
        rows = {e["name"]: e["status"] for e in agent.status()["endpoints"]}
        assert rows == {"frontend": "ready", "backend": "ready", "debug": "waiting-for-interface"}
        dbg = topo.add_pod("debug")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and {e["name"]: e["status"] for e in agent.status()["endpoints"]}["debug"] != "ready":
            time.sleep(0.1)
        assert {e["name"]: e["status"] for e in agent.status()["endpoints"]}["debug"] == "ready"
        assert "name mbr_tc_steer" in subprocess.run(["tc", "filter", "show", "dev", dbg.host_if, "ingress"], capture_output=True, text=True).stdout
        assert curl(dbg, f"http://{fe.ipv4}/api", timeout_s=1.5)[0] == "000"  # enforced: debug is not allowed in
        reloads = agent.status()["reloads"]
        eps.write_text(endpoints_yaml(topo, {}, listed=("backend", "debug")))  # frontend is no longer ours
        assert agent.wait_reloads(reloads + 1)["reloads"] == reloads + 1
        assert "mbr_tc_steer" not in subprocess.run(["tc", "filter", "show", "dev", fe.host_if, "ingress"], capture_output=True, text=True).stdout
        assert curl(dbg, f"http://{fe.ipv4}/api")[0] == "200"  # no policy selects an unknown pod: allowed
        assert agent.stop() == 0


def test_invalid_policy_at_start_exits_1_and_touches_nothing(tmp_path: Path) -> None:
    """`membrane run` on an invalid policy reports it (file, object, field) and exits 1 before attaching anything."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {endpointSelector: {}, ingress: [{toPort: []}]}\n")
    eps = tmp_path / "endpoints.yaml"
    eps.write_text("endpoints: []\n")
    out = subprocess.run(
        [sys.executable, "-m", "membrane.cli", "run", "--policies", str(bad), "--endpoints", str(eps), "--status-file", str(tmp_path / "s.json")],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert out.returncode == 1
    assert "bad.yaml" in out.stderr
    assert "toPort" in out.stderr
    assert "agent ready" not in out.stdout
    assert not (tmp_path / "s.json").exists()


def test_empty_policy_file_at_start_exits_1_saying_how_to_run_with_none(tmp_path: Path) -> None:
    """A 0-byte policy file is not 'no policies' (issue 13): `membrane run` names the file, says how to write an
    explicit empty List, and exits 1 before attaching anything."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    eps = tmp_path / "endpoints.yaml"
    eps.write_text("endpoints: []\n")
    out = subprocess.run(
        [sys.executable, "-m", "membrane.cli", "run", "--policies", str(empty), "--endpoints", str(eps), "--status-file", str(tmp_path / "s.json")],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert out.returncode == 1
    assert f"{empty}: policy file is empty" in out.stderr
    assert "kind: List" in out.stderr
    assert "agent ready" not in out.stdout
    assert not (tmp_path / "s.json").exists()


def test_policy_file_truncated_while_running_keeps_enforcing(
    http_pods: tuple[Topology, Path], tmp_path: Path, agent_box: list[AgentProcess]
) -> None:
    """A policy file that turns empty while the agent runs keeps the last good policy in force (L7 denials still
    403) and `membrane status` names the file; an explicit empty List then removes the policy."""
    topo, eps = http_pods
    fe, be = topo.pods["frontend"], topo.pods["backend"]
    pol = tmp_path / "policy.yaml"
    pol.write_text(HTTP_POLICY.read_text())
    agent = start_agent([pol], eps, tmp_path)
    agent_box.append(agent)
    assert curl(be, f"http://{fe.ipv4}/private")[0] == "403"
    reloads = agent.status()["reloads"]
    pol.write_text("")
    doc = agent.wait_reloads(reloads + 1, timeout_s=5)
    assert doc["reloads"] == reloads
    assert any(e.startswith(f"{pol}: policy file is empty") for e in doc["errors"])
    assert curl(be, f"http://{fe.ipv4}/private")[0] == "403"  # still enforced
    assert curl(be, f"http://{fe.ipv4}/api")[0] == "200"
    pol.write_text("apiVersion: v1\nkind: List\nitems: []\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and agent.status()["reloads"] == reloads:
        time.sleep(0.1)
    doc = agent.status()
    assert doc["reloads"] == reloads + 1
    assert doc["errors"] == []
    assert curl(be, f"http://{fe.ipv4}/private")[0] == "200"  # no policy selects frontend any more
    assert agent.stop() == 0

HOST_AND_ICMP_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: frontend-ingress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  ingress:
    - fromEntities: [host]
      toPorts: [{ports: [{port: "80", protocol: TCP}]}]
    - fromEndpoints: [{matchLabels: {app: backend}}]
      icmps: [{fields: [{type: EchoRequest, family: IPv4}]}]
"""


def _host_get(url_host: object, port: int, timeout_s: float) -> str:
    """An HTTP GET from the node itself (this process, in the host namespace); "TIMEOUT" or "REFUSED"."""
    import socket

    try:
        with socket.create_connection((str(url_host), port), timeout=timeout_s) as s:
            s.sendall(b"GET /api HTTP/1.0\r\n\r\n")
            return s.recv(200).decode(errors="replace").split("\r\n", 1)[0]
    except TimeoutError:
        return "TIMEOUT"
    except ConnectionRefusedError:
        return "REFUSED"


def test_host_traffic_and_icmp_are_judged(tmp_path: Path, agent_box: list[AgentProcess]) -> None:
    """Through the agent: the node's own connection to a pod is judged as `host` (fromEntities: [host]
    allows port 80; another port is dropped, not refused), and ping is allowed by `icmps` for backend
    only (debug's echo request is dropped)."""
    from tests.bpf.test_unjudged import PING

    with topology("frontend", "backend", "debug") as topo:
        fe, be, dbg = topo.pods["frontend"], topo.pods["backend"], topo.pods["debug"]
        start_server(topo, fe, HTTP_SERVER, "80")
        start_server(topo, fe, HTTP_SERVER, "8081")
        eps = tmp_path / "endpoints.yaml"
        eps.write_text(endpoints_yaml(topo, {}))
        pol = tmp_path / "policy.yaml"
        pol.write_text(HOST_AND_ICMP_POLICY)
        agent = start_agent([pol], eps, tmp_path)
        agent_box.append(agent)
        assert _host_get(fe.ipv4, 80, 3) == "HTTP/1.1 200 OK"
        assert _host_get(fe.ipv4, 8081, 1.5) == "TIMEOUT"  # judged as host: no allow on 8081
        assert be.run([sys.executable, "-c", PING, str(fe.ipv4), "3"]).stdout.strip() == "REPLY"
        assert dbg.run([sys.executable, "-c", PING, str(fe.ipv4), "1"]).stdout.strip() == "TIMEOUT"
        assert probe(be, fe.ipv4, 80) == "TIMEOUT"  # icmps allow no port
        assert agent.status()["drops"]["ingress_denied"] >= 3
        assert agent.stop() == 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when none)."""
    import re

    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if m is None or m.group(1) != name:
            continue
        have = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total


def wait_for_metric(port: int, name: str, timeout_s: float = 10) -> str:
    """Scrape until `name` has a non-zero sample; returns that scrape. Fails the test at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = scrape(f"http://127.0.0.1:{port}/metrics")[1]
        if sample(text, name) > 0:
            return text
        assert time.monotonic() < deadline, f"{name} stayed 0:\n{text}"
        time.sleep(0.2)


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
def test_metrics_scrape_has_the_families_with_traffic(
    http_pods: tuple[Topology, Path], tmp_path: Path, agent_box: list[AgentProcess], workers: int
) -> None:
    """`--metrics`: L7 by verdict/method/workload (workers folded in), kernel drops, policy, endpoints; the dashboard's names exist."""
    import json
    import re

    topo, eps = http_pods
    fe, be, dbg = topo.pods["frontend"], topo.pods["backend"], topo.pods["debug"]
    port = free_port()
    pol = tmp_path / "http.yaml"
    pol.write_text(HTTP_POLICY.read_text())
    agent = start_agent([pol], eps, tmp_path, workers=workers, extra_args=["--metrics", f"127.0.0.1:{port}"])
    agent_box.append(agent)
    for _ in range(4):  # several connections: with two workers both get some
        assert curl(be, f"http://{fe.ipv4}/api")[0] == "200"
        assert curl(be, f"http://{fe.ipv4}/admin")[0] == "403"
    assert curl(dbg, f"http://{fe.ipv4}/api", timeout_s=1.5)[0] == "000"
    time.sleep(2.5)  # workers publish every second; the agent reads drop events every EVENTS_S
    status, text = scrape(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    wl = {"source_workload": "backend", "destination_workload": "frontend"}
    assert sample(text, "membrane_l7_requests_total", protocol="http", verdict="FORWARDED", method="GET", **wl) == 4
    assert sample(text, "membrane_l7_requests_total", protocol="http", verdict="DROPPED", method="GET", **wl) == 4
    assert sample(text, "membrane_l7_responses_total", protocol="http", code="200", **wl) == 4
    assert sample(text, "membrane_proxy_request_duration_seconds_count", protocol="http") >= 4
    assert sample(text, "membrane_drop_count_total", reason="POLICY_DENIED", direction="INGRESS") >= 1
    assert sample(text, "membrane_policy") == 1
    assert sample(text, "membrane_endpoint_state", state="ready") == 3
    assert sample(text, "membrane_policy_reloads_total") >= 1
    assert sample(text, "membrane_policy_import_errors") == 0
    exposed = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "membrane-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\bmembrane_[a-z0-9_]+", target["expr"]):
                assert re.sub(r"_bucket$", "", name) in exposed, f"{panel['title']}: {name}"
    assert scrape(f"http://127.0.0.1:{port}/")[0] == 404  # /metrics only
    assert sample(text, "membrane_policy_implementation_delay_seconds_count") == 0  # the start is not a change
    pol.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {endpointSelector: 7}\n")
    text = wait_for_metric(port, "membrane_policy_import_errors_total")
    assert sample(text, "membrane_policy_import_errors") >= 1
    pol.write_text(HTTP_POLICY.read_text() + "\n# edited\n")
    text = wait_for_metric(port, "membrane_policy_implementation_delay_seconds_count")
    assert sample(text, "membrane_policy_import_errors") == 0
    assert curl(be, f"http://{fe.ipv4}/admin")[0] == "403"  # still enforcing the same policy
    assert agent.stop() == 0
