"""`membrane policy validate|trace` through the installed console script: the exact CLI contract of issue 2.

| contract                                                             | test                                   |
|----------------------------------------------------------------------|----------------------------------------|
| validate: 0 + one summary line per object                            | test_validate_ok                       |
| validate: 1 + one located line per problem                           | test_validate_reports_each_problem     |
| trace -o json: exact keys, verdicts ALLOWED / DROPPED / L7_DENIED    | test_trace_json_*                      |
| response only for the traced protocol, only when L7_DENIED           | test_trace_json_responses              |
| exit 1 invalid policy, 2 usage errors, 0 whatever the verdict         | test_exit_codes                        |
| --exit-code: 3 DROPPED, 4 L7_DENIED                                  | test_exit_code_flag                    |
| --http-path without --http-method: usage error                        | test_http_path_needs_a_method          |
| trace JSON: reason, considered rules, identities                      | test_trace_json_reason_and_identities  |
| --src-labels / --dst-labels without an endpoints file                 | test_trace_by_labels                   |
| validate - (stdin), -o json, every problem at its line               | test_validate_stdin_and_json           |
| membrane --version                                                   | test_version                           |
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
MEMBRANE = ROOT / ".venv" / "bin" / "membrane"
EXAMPLES = ROOT / "examples"
POLICIES = EXAMPLES / "policies"
ENDPOINTS = EXAMPLES / "endpoints.yaml"


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    exe = [str(MEMBRANE)] if MEMBRANE.exists() else [sys.executable, "-m", "membrane.cli"]
    return subprocess.run([*exe, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def trace(*args: str, policies: Path = POLICIES, endpoints: Path = ENDPOINTS) -> dict[str, Any]:
    proc = run("policy", "trace", "--policies", str(policies), "--endpoints", str(endpoints), *args, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    assert set(out) == {"verdict", "egress", "ingress", "response", "header_actions", "reason", "identities"}
    for side in ("egress", "ingress"):
        assert set(out[side]) == {"verdict", "enforced", "l7", "matched", "reason", "endpoint", "considered"}
    return out


ISSUE2_SIDE_KEYS = ("verdict", "enforced", "l7", "matched")


def issue2(out: dict[str, Any]) -> dict[str, Any]:
    """The trace JSON cut to issue 2's contract (the keys it fixed, which must never change)."""
    keep = {k: out[k] for k in ("verdict", "response", "header_actions")}
    keep.update({side: {k: out[side][k] for k in ISSUE2_SIDE_KEYS} for side in ("egress", "ingress")})
    return keep


def test_validate_ok() -> None:
    """validate exits 0 and prints one `file:line: ns/name: ok ...` line per object."""
    proc = run("policy", "validate", "examples/policies")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 6
    assert any(line.startswith("examples/policies/http.yaml:4: default/frontend-api: ok (CiliumNetworkPolicy") for line in lines)
    assert any(line.startswith("examples/policies/dns-fqdn.yaml:") and "kube-dns-ingress: ok (CiliumClusterwideNetworkPolicy" in line for line in lines)
    whole = run("policy", "validate", "examples")  # the endpoints file next to the policies is skipped
    assert whole.returncode == 0, whole.stdout
    whole_lines = whole.stdout.splitlines()
    assert [ln for ln in whole_lines if ln.startswith("examples/policies/")] == lines
    assert [ln.split(": ok ")[1].split(",")[0] for ln in whole_lines if ln.startswith("examples/kubernetes/")] == ["(NetworkPolicy"] * 2


def test_validate_reports_each_problem(tmp_path: Path) -> None:
    """validate exits 1 with one line per problem, naming file, the field's own line, object and field path."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "web.yaml").write_text(
        "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: default}\n"
        "specs:\n  - endpointSelector: {}\n    ingress:\n      - toPorts:\n          - ports: [{port: '80', protocol: UDP}]\n"
        "            rules: {http: [{method: GET}]}\n"
        "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: typo}\nspec:\n  endpointSelector: {}\n  ingress: [{toPort: []}]\n"
        "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: fine}\nspec: {endpointSelector: {}, ingress: [{}]}\n"
    )
    proc = run("policy", "validate", "policies", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        "policies/web.yaml:9: default/web: specs[0].ingress[0].toPorts[0]: L7 rules require protocol TCP",
        'policies/web.yaml:17: default/typo: spec.ingress[0].toPort: unknown field "toPort" (did you mean "toPorts"?)',
    ]
    assert "Traceback" not in proc.stderr


def test_validate_yaml_error_and_missing_path(tmp_path: Path) -> None:
    """A YAML syntax error is a located problem (exit 1); a missing PATH is a usage error (exit 2)."""
    (tmp_path / "bad.yaml").write_text("kind: [\n")
    proc = run("policy", "validate", str(tmp_path / "bad.yaml"))
    assert proc.returncode == 1
    assert "YAML syntax error" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert run("policy", "validate", str(tmp_path / "nope.yaml")).returncode == 2


def test_trace_json_allowed() -> None:
    """The allowed HTTP request: ALLOWED, ingress enforced with l7 http and the matching rule."""
    out = issue2(trace("--src", "default/backend", "--dst", "default/frontend", "--dport", "80/TCP", "--http-method", "GET", "--http-path", "/api"))
    assert out == {
        "verdict": "ALLOWED",
        "egress": {"verdict": "ALLOWED", "enforced": False, "l7": None, "matched": []},
        "ingress": {"verdict": "ALLOWED", "enforced": True, "l7": "http", "matched": ["default/frontend-api: ingress[0].toPorts[0].rules.http[0]"]},
        "response": {},
        "header_actions": [],
    }


def test_trace_policies_takes_several_paths_after_one_flag() -> None:
    """`--policies A B` reads both paths, as repeated `--policies A --policies B` does (argparse extend)."""
    args = ("--src", "default/backend", "--dst", "default/frontend", "--dport", "80/TCP", "--http-method", "GET",
            "--http-path", "/api", "-o", "json")
    one_flag = run("policy", "trace", "--policies", str(POLICIES / "deny.yaml"), str(POLICIES / "http.yaml"),
                   "--endpoints", str(ENDPOINTS), *args)
    repeated = run("policy", "trace", "--policies", str(POLICIES / "deny.yaml"), "--policies", str(POLICIES / "http.yaml"),
                   "--endpoints", str(ENDPOINTS), *args)
    assert one_flag.returncode == 0, one_flag.stderr
    assert json.loads(one_flag.stdout)["verdict"] == "ALLOWED"
    assert one_flag.stdout == repeated.stdout


def test_trace_json_dropped() -> None:
    """A peer no rule allows is DROPPED at L3/L4 (and by IP: the same endpoint)."""
    out = trace("--src-ip", "10.244.1.30", "--dst", "default/frontend", "--dport", "80/TCP", "--http-method", "GET", "--http-path", "/api")
    assert out["verdict"] == "DROPPED"
    assert issue2(out)["ingress"] == {"verdict": "DROPPED", "enforced": True, "l7": None, "matched": ["default/frontend-no-debug: ingressDeny[0]"]}
    assert out["response"] == {}


@pytest.mark.parametrize(
    ("args", "response"),
    [
        (("--src", "default/backend", "--dst", "default/frontend", "--dport", "80/TCP", "--http-method", "POST", "--http-path", "/api"), {"http_status": 403}),
        (("--src", "default/greeter-client", "--dst", "default/greeter", "--dport", "50051/TCP", "--grpc", "/helloworld.Greeter/Nope"), {"grpc_status": 7}),
        (("--src", "default/crawler", "--dst", "kube-system/coredns", "--dport", "53/UDP", "--dns-name", "example.com"), {"dns_rcode": "REFUSED"}),
        (("--src", "shop/order-service", "--dst", "shop/kafka", "--dport", "9092/TCP", "--kafka-api-key", "0", "--kafka-topic", "orders", "--kafka-topic", "payments"), {"kafka_error_code": 29}),
        (("--src", "default/backend", "--dst", "default/frontend", "--dport", "80/TCP", "--http-method", "GET", "--http-path", "/%2e%2e/api/%2Fx"), {"http_status": 400}),
    ],
    ids=["http", "grpc", "dns", "kafka-multi-topic", "http-malformed-target"],
)
def test_trace_json_responses(args: tuple[str, ...], response: dict[str, Any]) -> None:
    """An L7 denial names the protocol's own refusal, and only that protocol's field."""
    out = trace(*args)
    assert out["verdict"] == "L7_DENIED"
    assert out["response"] == response


def test_trace_json_fqdn_and_world() -> None:
    """toFQDNs allows an IP learned for a matching name (--learned-dns); another world IP is DROPPED."""
    args = ("--src", "default/crawler", "--dport", "443/TCP", "--learned-dns", "www.cilium.io=104.198.14.52,2a00::1")
    assert trace(*args, "--dst-ip", "104.198.14.52")["verdict"] == "ALLOWED"
    assert trace(*args, "--dst-ip", "2a00::1")["verdict"] == "ALLOWED"
    out = trace(*args, "--dst-ip", "1.2.3.4")
    assert out["verdict"] == "DROPPED"
    assert out["egress"]["enforced"] is True
    assert issue2(out)["ingress"] == {"verdict": "ALLOWED", "enforced": False, "l7": None, "matched": []}


def test_trace_header_actions_are_redacted(tmp_path: Path) -> None:
    """header_actions lists mismatch actions with values redacted."""
    (tmp_path / "p.yaml").write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: tok}\nspec:\n"
        "  endpointSelector: {matchLabels: {app: frontend}}\n  ingress:\n  - toPorts:\n    - ports: [{port: '80', protocol: TCP}]\n"
        "      rules:\n        http:\n        - headerMatches: [{name: X-Token, value: s3cret, mismatch: REPLACE}]\n"
    )
    out = trace("--src", "default/backend", "--dst", "default/frontend", "--dport", "80/TCP", "--http-method", "GET", "--http-path", "/", policies=tmp_path)
    assert out["verdict"] == "ALLOWED"
    assert out["header_actions"] == [{"action": "REPLACE", "name": "X-Token", "value": "<redacted>"}]


def test_trace_text_explains() -> None:
    """Without -o json the trace prints which rules were considered and the verdict line."""
    proc = run("policy", "trace", "--policies", str(POLICIES), "--endpoints", str(ENDPOINTS), "--src", "default/backend",
               "--dst", "default/frontend", "--dport", "80/TCP", "--http-method", "GET", "--http-path", "/api")
    assert proc.returncode == 0
    assert "default/frontend-api: ingress[0].toPorts[0].rules.http[0]" in proc.stdout
    assert proc.stdout.rstrip().endswith("verdict: ALLOWED")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("--src", "default/nobody", "--dst", "default/frontend", "--dport", "80/TCP"), 2),
        (("--src", "default/backend", "--dst", "default/frontend", "--dport", "80/XTP"), 2),
        (("--src", "default/backend", "--dst", "default/frontend", "--dport", "eighty"), 2),
        (("--src", "default/backend", "--dst", "default/frontend"), 2),
        (("--src", "default/backend", "--src-ip", "10.0.0.1", "--dst", "default/frontend", "--dport", "80/TCP"), 2),
        (("--src-ip", "not-an-ip", "--dst", "default/frontend", "--dport", "80/TCP"), 2),
        (("--src", "default/backend", "--dst", "default/frontend", "--dport", "80/TCP", "--kafka-api-key", "nope"), 2),
        (("--src", "default/backend", "--dst", "default/frontend", "--dport", "80/TCP", "--learned-dns", "x"), 2),
        (("--src", "default/backend", "--dst", "default/frontend", "--dport", "80/TCP", "--grpc", "nope"), 2),
        (("--src", "default/debug", "--dst", "default/frontend", "--dport", "80/TCP"), 0),
    ],
)
def test_exit_codes(args: tuple[str, ...], code: int) -> None:
    """Exit status: 0 when the trace ran (even DROPPED), 2 on usage errors; never a traceback."""
    proc = run("policy", "trace", "--policies", str(POLICIES), "--endpoints", str(ENDPOINTS), *args)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_trace_invalid_policy_exits_1(tmp_path: Path) -> None:
    """An invalid policy (or endpoints file) makes trace exit 1 with the located problem."""
    (tmp_path / "bad.yaml").write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: b}\nspec: {endpointSelector: {}, egres: []}\n")
    proc = run("policy", "trace", "--policies", str(tmp_path / "bad.yaml"), "--endpoints", str(ENDPOINTS),
               "--src", "default/backend", "--dst", "default/frontend", "--dport", "80/TCP")
    assert proc.returncode == 1
    assert 'unknown field "egres"' in proc.stderr
    (tmp_path / "eps.yaml").write_text("endpoints: [{name: a, ips: [bad]}]\n")
    proc = run("policy", "trace", "--policies", str(POLICIES), "--endpoints", str(tmp_path / "eps.yaml"), "--src-ip", "10.0.0.1", "--dst-ip", "10.0.0.2", "--dport", "80/TCP")
    assert proc.returncode == 1
    assert "endpoints[0].ips[0]" in proc.stderr


def test_exit_code_flag() -> None:
    """`--exit-code` gates CI: 3 for DROPPED, 4 for L7_DENIED, 0 for ALLOWED (without it: 0 for all)."""
    base = ("policy", "trace", "--policies", str(POLICIES), "--endpoints", str(ENDPOINTS), "--exit-code")
    http_flow = ("--src", "default/backend", "--dst", "default/frontend", "--dport", "80/TCP", "--http-method")
    assert run(*base, *http_flow, "GET", "--http-path", "/api").returncode == 0
    assert run(*base, *http_flow, "POST", "--http-path", "/api").returncode == 4
    assert run(*base, "--src", "default/debug", "--dst", "default/frontend", "--dport", "80/TCP").returncode == 3
    denied_json = run(*base, *http_flow, "POST", "--http-path", "/api", "-o", "json")
    assert denied_json.returncode == 4
    assert json.loads(denied_json.stdout)["verdict"] == "L7_DENIED"


@pytest.mark.parametrize("flag", ["--http-path", "--http-host", "--http-header"])
def test_http_path_needs_a_method(flag: str) -> None:
    """An HTTP request without --http-method is a usage error (exit 2), never a silent GET."""
    value = {"--http-path": "/api", "--http-host": "a.example", "--http-header": "X-A: b"}[flag]
    proc = run("policy", "trace", "--policies", str(POLICIES), "--endpoints", str(ENDPOINTS), "--src", "default/backend",
               "--dst", "default/frontend", "--dport", "80/TCP", flag, value)
    assert proc.returncode == 2
    assert "needs --http-method" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_trace_json_reason_and_identities() -> None:
    """The JSON says why (per side and overall), which rules were considered, and both identities."""
    denied = trace("--src", "default/backend", "--dst", "default/frontend", "--dport", "80/TCP", "--http-method", "POST", "--http-path", "/api")
    assert denied["reason"] == "ingress: no http rule matches"
    assert denied["ingress"]["reason"] == "no http rule matches"
    assert denied["egress"]["reason"] == "not enforced"
    assert "default/frontend-api: ingress[0].toPorts[0]" in denied["ingress"]["considered"]
    assert denied["identities"]["src"]["endpoint"] == "default/backend"
    assert "k8s:app=backend" in denied["identities"]["src"]["labels"]
    assert denied["identities"]["dst"]["ip"] == "10.244.1.10"
    assert isinstance(denied["identities"]["dst"]["id"], int)
    dropped = trace("--src", "default/debug", "--dst", "default/frontend", "--dport", "80/TCP")
    assert dropped["ingress"]["reason"] == "denied by a deny rule"
    default_deny = trace("--src", "default/greeter-client", "--dst", "default/frontend", "--dport", "81/TCP")
    assert default_deny["reason"] == "ingress: default deny"
    world = trace("--src-ip", "8.8.8.8", "--dst", "default/frontend", "--dport", "80/TCP")
    assert world["egress"]["reason"] == "not a local endpoint (no policy of its own)"
    assert world["identities"]["src"]["id"] == 9  # reserved:world-ipv4


def test_trace_by_labels() -> None:
    """--src-labels/--dst-labels trace label sets without an endpoints file, like `cilium policy trace -s/-d`."""
    base = ("policy", "trace", "--policies", str(POLICIES), "--dport", "80/TCP", "--http-method", "GET", "--http-path", "/api", "-o", "json")
    ok = run(*base, "--src-labels", "k8s:app=backend,k8s:env=prod", "--dst-labels", "k8s:app=frontend", "-d", "k8s:env=prod")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["verdict"] == "ALLOWED"
    assert out["ingress"]["matched"] == ["default/frontend-api: ingress[0].toPorts[0].rules.http[0]"]
    assert "k8s:io.kubernetes.pod.namespace=default" in out["identities"]["src"]["labels"]
    other_ns = run(*base, "--src-labels", "k8s:app=backend,k8s:env=prod,k8s:io.kubernetes.pod.namespace=shop",
                   "--dst-labels", "k8s:app=frontend,k8s:env=prod")
    assert json.loads(other_ns.stdout)["verdict"] == "DROPPED"
    world = run(*base, "--src-labels", "reserved:world", "--dst-labels", "k8s:app=frontend,k8s:env=prod")
    assert json.loads(world.stdout)["identities"]["src"]["id"] == 2
    bad = run(*base, "--src-labels", "cidr:1.2.3.4/32", "--dst-labels", "k8s:app=frontend")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr


def test_validate_stdin_and_json(tmp_path: Path) -> None:
    """`validate -` reads stdin; `-o json` lists valid objects and every problem, each at its field's line."""
    text = (POLICIES / "http.yaml").read_text()
    proc = subprocess.run([str(MEMBRANE), "policy", "validate", "-"], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("<stdin>:4: default/frontend-api: ok (CiliumNetworkPolicy")
    bad = (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: two}\nspec:\n"
        "  endpointSelector: {}\n  ingress:\n  - fromEntities: [wrld]\n  - toPort: []\n"
    )
    proc = subprocess.run([str(MEMBRANE), "policy", "validate", "-o", "json", "-", str(POLICIES / "deny.yaml")], input=bad,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["valid"] is False
    assert [(e["line"], e["path"]) for e in out["errors"]] == [(7, "spec.ingress[0].fromEntities[0]"), (8, "spec.ingress[1].toPort")]
    assert {e["object"] for e in out["errors"]} == {"default/two"}
    assert [p["kind"] for p in out["policies"]] == ["CiliumNetworkPolicy"]
    assert out["policies"][0]["source"].endswith("deny.yaml")


def test_version() -> None:
    """`membrane --version` prints the installed distribution's version."""
    from importlib.metadata import version

    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"membrane {version('membrane')}"


def test_network_policy_example_validates_and_traces() -> None:
    """The NetworkPolicy example in examples/kubernetes validates and is enforced like a CNP."""
    example = EXAMPLES / "kubernetes"
    proc = run("policy", "validate", str(example))
    assert proc.returncode == 0, proc.stdout
    assert ": ok (NetworkPolicy" in proc.stdout
    allowed = trace("--src", "shop/order-service", "--dst", "shop/kafka", "--dport", "9092/TCP", policies=example)
    assert allowed["verdict"] == "ALLOWED"
    dropped = trace("--src", "default/debug", "--dst", "shop/kafka", "--dport", "9092/TCP", policies=example)
    assert dropped["verdict"] == "DROPPED"


def test_network_policy_example_egress() -> None:
    """The example's egress NetworkPolicy: DNS to kube-dns by namespace name label, nothing else."""
    example = EXAMPLES / "kubernetes"
    dns = trace("--src", "shop/order-service", "--dst", "kube-system/coredns", "--dport", "53/UDP", policies=example)
    assert dns["verdict"] == "ALLOWED"
    assert dns["egress"]["matched"] == ["shop/order-service-egress: egress[1].ports[0]"]
    other = trace("--src", "shop/order-service", "--dst-ip", "1.1.1.1", "--dport", "53/UDP", policies=example)
    assert other["verdict"] == "DROPPED"
    assert other["reason"] == "egress: default deny"
