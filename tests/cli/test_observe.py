"""`membrane observe` on real flows: a real `membrane gateway` judging curl, dig and kafka-python, every filter
and output form, rotated files, following across rotation, and the gateway's flow socket.

Each flows line must also be Hubble's flow JSON: validated against the schema derived from flow.proto.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.dns_server import DnsServer
from tests.integration.gateway_util import ENDPOINTS, MEMBRANE, ROOT, gateway, http_backend, http_policy
from tests.proxy.hubble_schema import schema_validator

pytestmark = pytest.mark.integration

RULES = """              - method: GET
                path: "/api(/.*)?"
"""
ZONE = """
www.cilium.io. 120 IN A 192.0.2.10
evil.example. 60 IN A 192.0.2.66
"""


def dns_policy(port: int) -> str:
    """The crawler may resolve only *.cilium.io through kube-dns on `port` (tests/integration/test_gateway_dns.py)."""
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: crawler-dns
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: crawler
  egress:
    - toEndpoints:
        - matchLabels:
            "k8s:io.kubernetes.pod.namespace": kube-system
            "k8s:k8s-app": kube-dns
      toPorts:
        - ports:
            - port: "{port}"
              protocol: ANY
          rules:
            dns:
              - matchPattern: "*.cilium.io"
"""


def observe(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MEMBRANE, "observe", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def curl(url: str, *extra: str) -> str:
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", *extra, url],
                         capture_output=True, text=True, timeout=20)
    return out.stdout


def dig(port: int, name: str) -> str:
    return subprocess.run(["dig", "@127.0.0.1", "-p", str(port), name, "A", "+tries=1", "+time=3"],
                          capture_output=True, text=True, timeout=20).stdout


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_lines(path: Path, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(records(path)) >= n:
            break
        time.sleep(0.05)
    return records(path) if path.exists() else []


@dataclass
class Recorded:
    """One flows file written by two real gateways: HTTP (curl, from backend and from the world) and DNS (dig)."""

    path: Path
    lines: list[dict[str, Any]]

    def flows(self) -> list[dict[str, Any]]:
        return [line["flow"] for line in self.lines]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    tmp = tmp_path_factory.mktemp("observe")
    shared = tmp / "all.jsonl"
    endpoints = tmp / "endpoints.yaml"
    # 127.0.0.2 is the backend pod; any other client is the world.
    endpoints.write_text(ENDPOINTS.read_text().replace("ips: [10.244.1.20]", "ips: [10.244.1.20, 127.0.0.2]"))
    with http_backend() as server, gateway(
        tmp, http_policy(80, RULES), upstream_port=server.port, dst="default/frontend",
        extra=["--endpoints", str(endpoints), "--dport", "80", "--flows", str(shared), "--node-name", "node-a"],
    ) as gw:
        assert curl(f"http://127.0.0.1:{gw.port}/api/items", "--interface", "127.0.0.2") == "200"
        assert curl(f"http://127.0.0.1:{gw.port}/admin", "--interface", "127.0.0.2") == "403"
        assert curl(f"http://127.0.0.1:{gw.port}/api/items", "--interface", "127.0.0.2", "-X", "POST") == "403"
        assert curl(f"http://127.0.0.1:{gw.port}/api/items") == "000"  # the world: refused at L3/L4
        wait_lines(shared, 7)
        assert "warning" not in gw.stderr_path.read_text()  # --dport names the policy's port: nothing to warn about
    with DnsServer(ZONE) as dns_server, gateway(
        tmp, dns_policy(dns_server.port), upstream_port=dns_server.port, dst="kube-system/coredns",
        src="default/crawler", udp=True, extra=["--flows", str(shared), "--node-name", "node-b"],
    ) as gw:
        assert "status: NOERROR" in dig(gw.port, "www.cilium.io")
        assert "status: REFUSED" in dig(gw.port, "evil.example")
        wait_lines(shared, 11)
    yield Recorded(path=shared, lines=records(shared))


def test_recorded_flows_are_hubble_flow_json(recorded: Recorded) -> None:
    """Every line the gateways wrote, HTTP and DNS, allowed and denied, L7 and L3/L4, is valid Hubble flow JSON."""
    validator = schema_validator()
    assert len(recorded.lines) == 11
    for line in recorded.lines:
        assert [e.message for e in validator.iter_errors(line)] == [], line
    kinds = sorted((f["Type"], f["verdict"], f.get("l7", {}).get("type", "")) for f in recorded.flows())
    # every refused request (two HTTP 403s, one DNS REFUSED) is followed by the response record of its refusal
    assert kinds == sorted([("L7", "FORWARDED", "REQUEST"), ("L7", "FORWARDED", "RESPONSE"), ("L7", "DROPPED", "REQUEST"),
                            ("L7", "FORWARDED", "RESPONSE"), ("L7", "DROPPED", "REQUEST"), ("L7", "FORWARDED", "RESPONSE"),
                            ("L3_L4", "DROPPED", ""), ("L7", "FORWARDED", "REQUEST"), ("L7", "FORWARDED", "RESPONSE"),
                            ("L7", "DROPPED", "REQUEST"), ("L7", "FORWARDED", "RESPONSE")])
    codes = sorted(f["l7"]["http"]["code"] for f in recorded.flows() if f.get("l7", {}).get("type") == "RESPONSE" and "http" in f["l7"])
    assert codes == [200, 403, 403]
    assert {line["node_name"] for line in recorded.lines} == {"node-a", "node-b"}


def test_dport_names_the_judged_port(recorded: Recorded) -> None:
    """`gateway --dport 80`: the flows carry the policy's port 80 (the upstream listens elsewhere) and allow by it."""
    http = [f for f in recorded.flows() if "http" in f.get("l7", {}) and not f["is_reply"]]
    assert {f["l4"]["TCP"]["destination_port"] for f in http} == {80}
    allowed = next(f for f in http if f["verdict"] == "FORWARDED")
    assert [p["name"] for p in allowed["ingress_allowed_by"]] == ["frontend-api"]


def test_gateway_warns_when_no_policy_selects_the_port(tmp_path: Path) -> None:
    """Without --dport, a policy on port 80 and an upstream elsewhere: the gateway says at start why all will be refused."""
    with http_backend() as server, gateway(tmp_path, http_policy(80, RULES), upstream_port=server.port,
                                           dst="default/frontend", src="default/backend") as gw:
        time.sleep(0.2)
        err = gw.stderr_path.read_text()
    assert f"warning: no policy rule selects port {server.port}/TCP of default/frontend" in err
    assert "--dport" in err


# --- output forms -------------------------------------------------------------------------------------

COMPACT = re.compile(
    r"^[A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d\.\d{3}: (\S+) \((ID:\d+|[a-z0-9-]+)\) (->|<-) (\S+) \((ID:\d+|[a-z0-9-]+)\) "
    r"(http-request|http-response|dns-request proxy|dns-response proxy|Policy denied) (FORWARDED|DROPPED|ERROR) \((.*)\)$"
)


def test_compact_output_is_hubbles_line(recorded: Recorded) -> None:
    """`-o compact` (the default) prints hubble's one line per flow, responses with `<-` and the ends flipped back."""
    out = observe("--flows", str(recorded.path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 11
    parsed = [COMPACT.match(line) for line in lines]
    assert all(parsed), lines
    first = parsed[0]
    assert first is not None
    assert first.group(1).startswith("default/backend:")
    assert first.group(4) == "default/frontend:80"
    assert first.group(6) == "http-request"
    response = next(m for m in parsed if m is not None and m.group(6) == "http-response")
    assert response.group(3) == "<-"
    assert response.group(1).startswith("default/backend:")  # the client is on the left, as hubble prints it
    drop = next(m for m in parsed if m is not None and m.group(6) == "Policy denied")
    assert drop.group(2) == "world-ipv4"


def test_json_output_is_the_envelope(recorded: Recorded) -> None:
    """`-o json` prints each flow as hubble's `{"flow":...,"node_name":...,"time":...}`, valid against the schema."""
    out = observe("--flows", str(recorded.path), "-o", "json")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["flow"]["uuid"] for line in lines] == [r["flow"]["uuid"] for r in recorded.lines]
    validator = schema_validator()
    assert all(not list(validator.iter_errors(line)) for line in lines)


def test_table_output(recorded: Recorded) -> None:
    """`-o table` prints hubble's columns, aligned; it refuses --follow as hubble does."""
    out = observe("--flows", str(recorded.path), "-o", "table", "--verdict", "DROPPED")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    assert len(lines) == 1 + 4
    for column in ("SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"):  # every column starts where its header does
        start = lines[0].index(column)
        assert all(line[start - 1] == " " and line[start] != " " for line in lines[1:]), (column, lines)
    refused = observe("--flows", str(recorded.path), "-o", "table", "-f")
    assert refused.returncode == 2
    assert "table output is not compatible with --follow" in refused.stderr


# --- filters ------------------------------------------------------------------------------------------


def _uuids(out: subprocess.CompletedProcess[str]) -> list[str]:
    assert out.returncode == 0, out.stderr
    return [json.loads(line)["flow"]["uuid"] for line in out.stdout.splitlines()]


def _select(recorded: Recorded, pred: Any) -> list[str]:
    return [f["uuid"] for f in recorded.flows() if pred(f)]


def _http(f: dict[str, Any]) -> dict[str, Any]:
    return f.get("l7", {}).get("http", {})  # type: ignore[no-any-return]


FILTER_CASES: list[tuple[list[str], Any]] = [
    (["--verdict", "DROPPED"], lambda f: f["verdict"] == "DROPPED"),
    (["--verdict", "DROPPED", "--verdict", "FORWARDED"], lambda f: True),  # OR within one flag
    (["--not", "--verdict", "FORWARDED"], lambda f: f["verdict"] != "FORWARDED"),
    (["--type", "l7"], lambda f: f["Type"] == "L7"),
    (["--type", "drop"], lambda f: f["Type"] == "L3_L4"),
    (["--type", "drop:133"], lambda f: f["Type"] == "L3_L4"),
    (["--type", "trace"], lambda f: False),
    (["--protocol", "dns"], lambda f: "dns" in f.get("l7", {})),
    (["--protocol", "udp"], lambda f: "UDP" in f["l4"]),
    (["--protocol", "http", "--verdict", "DROPPED"], lambda f: "http" in f.get("l7", {}) and f["verdict"] == "DROPPED"),
    (["--http-status", "200"], lambda f: _http(f).get("code") == 200),
    (["--http-status", "2+"], lambda f: _http(f).get("code") == 200),
    (["--http-status", "5+"], lambda f: False),
    (["--http-method", "post"], lambda f: _http(f).get("method") == "POST"),
    (["--http-path", "^/api"], lambda f: _http(f).get("url", "").split("127.0.0.1")[-1].split("/", 1)[-1].startswith("api")),
    (["--dns-query", r"cilium\.io"], lambda f: f.get("l7", {}).get("dns", {}).get("query") == "www.cilium.io."),
    (["--port", "80"], lambda f: "http" in f.get("l7", {}) or f["Type"] == "L3_L4"),
    (["--pod", "backend"], lambda f: "http" in f.get("l7", {})),  # default/backend is one end of every HTTP flow
    (["--from-pod", "default/backend"], lambda f: "http" in f.get("l7", {}) and not f["is_reply"]),
    (["--to-pod", "kube-system/coredns"], lambda f: "dns" in f.get("l7", {}) and not f["is_reply"]),
    (["--namespace", "kube-system"], lambda f: "dns" in f.get("l7", {})),
    (["--from-label", "app=crawler"], lambda f: "dns" in f.get("l7", {}) and not f["is_reply"]),
    (["--to-label", "k8s:k8s-app=kube-dns"], lambda f: "dns" in f.get("l7", {}) and not f["is_reply"]),
    (["--label", "reserved:world-ipv4"], lambda f: f["Type"] == "L3_L4"),
    (["--from-label", "app in (backend, crawler)", "--verdict", "DROPPED"],
     lambda f: f["verdict"] == "DROPPED" and f["Type"] == "L7"),
    (["--ip", "127.0.0.2"], lambda f: "http" in f.get("l7", {})),
    (["--from-ip", "127.0.0.2"], lambda f: "http" in f.get("l7", {}) and not f["is_reply"]),
    (["--to-ip", "127.0.0.0/30", "--type", "drop"], lambda f: f["Type"] == "L3_L4"),
    (["--traffic-direction", "ingress"], lambda f: True),  # the gateway judges for its --dst: ingress
    (["--traffic-direction", "egress"], lambda f: False),
    (["--drop-reason-desc", "POLICY_DENIED"], lambda f: f["Type"] == "L3_L4"),  # L7 records have none, as Hubble's
    (["--node-name", "node-b"], lambda f: "dns" in f.get("l7", {})),
    (["--verdict", "FORWARDED", "--not", "--protocol", "dns"], lambda f: f["verdict"] == "FORWARDED" and "http" in f.get("l7", {})),
]


@pytest.mark.parametrize(("args", "expect"), FILTER_CASES, ids=[" ".join(a) for a, _ in FILTER_CASES])
def test_filter(recorded: Recorded, args: list[str], expect: Any) -> None:
    """Each filter flag selects what hubble's would: values of one flag OR, different flags AND, --not excludes."""
    want = _select(recorded, expect)
    assert _uuids(observe("--flows", str(recorded.path), "-o", "json", *args)) == want


def test_last_and_since(recorded: Recorded) -> None:
    """`--last N` keeps the newest N matching flows; `--since` a duration or an RFC 3339 time bounds them."""
    every = [f["uuid"] for f in recorded.flows()]
    assert _uuids(observe("--flows", str(recorded.path), "-o", "json", "--last", "3")) == every[-3:]
    assert _uuids(observe("--flows", str(recorded.path), "-o", "json", "--since", "1h")) == every
    assert _uuids(observe("--flows", str(recorded.path), "-o", "json", "--since", "2099-01-01T00:00:00Z")) == []
    middle = recorded.flows()[4]["time"]
    assert _uuids(observe("--flows", str(recorded.path), "-o", "json", "--since", middle)) == every[4:]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pod", "a", "--from-pod", "b"], "filters --from-pod and --pod cannot be combined"),
        (["--verdict", "MAYBE"], "invalid --verdict value: MAYBE"),
        (["--http-status", "99"], "invalid http status code prefix"),
        (["--since", "yesterday"], "--since 'yesterday'"),
        (["--verdict", "DROPPED", "--not"], "trailing --not"),
        (["--protocol", "gopher"], "unknown protocol"),
        (["--from-label", "app in (a"], "invalid label selector"),
    ],
)
def test_bad_filters_are_usage_errors(recorded: Recorded, args: list[str], message: str) -> None:
    """A filter that cannot be used exits 2 with a message naming it, before anything is read."""
    out = observe("--flows", str(recorded.path), *args)
    assert out.returncode == 2
    assert message in out.stderr


def test_missing_file_and_server_are_usage_errors(tmp_path: Path) -> None:
    """No flows file, or no server on the socket path: exit 2 saying what is missing."""
    out = observe("--flows", str(tmp_path / "nope.jsonl"))
    assert out.returncode == 2
    assert "no flows file at" in out.stderr
    out = observe("--server", str(tmp_path / "nope.sock"))
    assert out.returncode == 2
    assert "no flow server at" in out.stderr


# --- rotation -----------------------------------------------------------------------------------------


def _rotated_gateway(tmp_path: Path, server_port: int, *, backups: int) -> Any:
    return gateway(tmp_path, http_policy(server_port, RULES), upstream_port=server_port, dst="default/frontend",
                   src="default/backend", extra=["--flows-max-size-mb", "0.002", "--flows-max-backups", str(backups)])


def test_files_rotate_by_size_with_bounded_backups(tmp_path: Path) -> None:
    """A flows file rotates at --flows-max-size-mb into name.1, name.2 ...; at most --flows-max-backups are kept,
    and `observe --flows name` reads the rotated files oldest first."""
    with http_backend() as server, _rotated_gateway(tmp_path, server.port, backups=2) as gw:
        for n in range(12):
            assert curl(f"http://127.0.0.1:{gw.port}/api/{n}") == "200"
        time.sleep(0.3)
        path = gw.flows_path
        backups = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(path.name + "."))
        assert backups == [path.name + ".1", path.name + ".2"]
        for p in [path, *(tmp_path / b for b in backups)]:
            assert p.stat().st_size < 2 * 2048 + 4096  # rotated near the limit (one batch over it at most)
        on_disk = [r["flow"]["uuid"] for p in (path.with_name(path.name + ".2"), path.with_name(path.name + ".1"), path)
                   for r in records(p)]
        shown = _uuids(observe("--flows", str(path), "-o", "json"))
        assert shown == on_disk
        times = [json.loads(line)["time"] for line in observe("--flows", str(path), "-o", "json").stdout.splitlines()]
        assert times == sorted(times)
        assert gw.stop() == 0


def _read_lines(proc: subprocess.Popen[bytes], n: int, timeout: float) -> list[str]:
    """Up to `n` lines of the process's stdout, read from the pipe itself (no buffer that select cannot see)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while buf.count(b"\n") < n and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
    return [line.decode() + "\n" for line in buf.split(b"\n")[:-1]]


def test_follow_goes_on_across_rotation(tmp_path: Path) -> None:
    """`observe -f --flows name` prints every new record, also after the file it was reading is rotated away."""
    with http_backend() as server, _rotated_gateway(tmp_path, server.port, backups=50) as gw:
        assert curl(f"http://127.0.0.1:{gw.port}/api/first") == "200"
        wait_lines(gw.flows_path, 2)
        follower = subprocess.Popen([*MEMBRANE, "observe", "--flows", str(gw.flows_path), "-f", "-o", "json", "--last", "0"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        try:
            time.sleep(1.0)  # the follower is at the end of the file
            for n in range(10):
                assert curl(f"http://127.0.0.1:{gw.port}/api/{n}") == "200"
            got = _read_lines(follower, 20, timeout=10)
        finally:
            follower.terminate()
            follower.wait(10)
        assert follower.returncode == 0
        rotated = [p for p in tmp_path.iterdir() if p.name.startswith(gw.flows_path.name + ".")]
        assert rotated  # the follower really crossed a rotation
        urls = [json.loads(line)["flow"]["l7"]["http"]["url"].rsplit("/", 1)[-1] for line in got]
        assert urls == [str(n) for n in range(10) for _ in range(2)]  # request and response of each, in order


# --- the flow socket ----------------------------------------------------------------------------------


def test_observe_the_gateway_socket(tmp_path: Path) -> None:
    """`gateway --socket PATH` (two workers) serves its recent flows and follows new ones; filters apply server-side."""
    sock = tmp_path / "gw.sock"
    with http_backend() as server, gateway(
        tmp_path, http_policy(server.port, RULES), upstream_port=server.port, dst="default/frontend",
        src="default/backend", workers=2, extra=["--socket", str(sock), "--node-name", "gw-node"],
    ) as gw:
        assert curl(f"http://127.0.0.1:{gw.port}/api/a") == "200"
        assert curl(f"http://127.0.0.1:{gw.port}/secret") == "403"
        wait_lines(gw.flows_path, 3)
        time.sleep(0.5)  # the second worker's records reach the first one's socket
        recent = observe("--server", str(sock), "-o", "json")
        assert recent.returncode == 0, recent.stderr
        lines = [json.loads(line) for line in recent.stdout.splitlines()]
        assert sorted(line["flow"]["uuid"] for line in lines) == sorted(r["flow"]["uuid"] for r in records(gw.flows_path))
        assert {line["node_name"] for line in lines} == {"gw-node"}
        dropped = observe("--server", str(sock), "-o", "json", "--verdict", "DROPPED")
        assert [json.loads(line)["flow"]["l7"]["http"]["url"].rsplit("/", 1)[-1] for line in dropped.stdout.splitlines()] == ["secret"]
        follower = subprocess.Popen([*MEMBRANE, "observe", "--server", str(sock), "-f", "--http-method", "GET"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        try:
            time.sleep(1.0)
            for n in range(4):  # new connections: both workers serve some of them
                assert curl(f"http://127.0.0.1:{gw.port}/api/f{n}") == "200"
            got = _read_lines(follower, 8, timeout=10)
        finally:
            follower.terminate()
            follower.wait(10)
        assert len(got) == 8, got
        assert all(COMPACT.match(line.rstrip("\n")) for line in got), got
        assert sorted(re.findall(r"/api/f\d", "".join(got))) == sorted([f"/api/f{n}" for n in range(4)] * 2)
        assert gw.stop() == 0
    assert not os.path.exists(sock)  # removed at drain


def test_kafka_flows_are_hubble_flow_json(tmp_path: Path) -> None:
    """Kafka records from a real kafka-python producer through the gateway validate against the flow schema."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError
    from membrane.sandbox.kafka_broker import KafkaTestBroker

    from tests.integration.test_gateway_kafka import kafka_policy

    with KafkaTestBroker() as broker, gateway(
        tmp_path, kafka_policy(broker.port), upstream_port=broker.port, dst="shop/kafka", src="shop/order-service"
    ) as gw:
        broker.advertised_port = gw.port
        broker.create_topic("orders")
        broker.create_topic("secret")
        producer = KafkaProducer(bootstrap_servers=f"127.0.0.1:{gw.port}", request_timeout_ms=5000, max_block_ms=5000, retries=0)
        try:
            producer.send("orders", b"o-1").get(timeout=10)
            with pytest.raises(KafkaError):
                producer.send("secret", b"leak").get(timeout=10)
        finally:
            producer.close(timeout=5)
        flows_path = gw.flows_path
    # Flow lines are written off the data path, a few ms after the answers: read them once the gateway has drained.
    lines = records(flows_path)
    validator = schema_validator()
    kafka = [line for line in lines if "kafka" in line["flow"].get("l7", {})]
    assert kafka
    for line in kafka:
        assert [e.message for e in validator.iter_errors(line)] == [], line
    topics = {(line["flow"]["verdict"], line["flow"]["l7"]["kafka"].get("topic")) for line in kafka}
    assert ("FORWARDED", "orders") in topics
    # flow.proto's topic is one string (the request's first topic); the Summary names every topic
    assert any(line["flow"]["verdict"] == "DROPPED" and "secret" in line["flow"]["Summary"] for line in kafka), kafka
    shown = observe("--flows", str(gw.flows_path), "--protocol", "kafka", "--verdict", "DROPPED")
    assert shown.returncode == 0, shown.stderr
    assert "kafka-request DROPPED" in shown.stdout
