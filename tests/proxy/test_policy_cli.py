"""`membrane policy validate|trace` through the installed console script: the exact CLI contract of issue 2.

| contract                                                             | test                                   |
|----------------------------------------------------------------------|----------------------------------------|
| validate: 0 + one summary line per object                            | test_validate_ok                       |
| validate: 1 + one located line per problem                           | test_validate_reports_each_problem     |
| trace -o json: exact keys, verdicts ALLOWED / DROPPED / L7_DENIED    | test_trace_json_*                      |
| response only for the traced protocol, only when L7_DENIED           | test_trace_json_responses              |
| exit 1 invalid policy, 2 usage errors, 0 whatever the verdict         | test_exit_codes                        |
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
    assert set(out) == {"verdict", "egress", "ingress", "response", "header_actions"}
    for side in ("egress", "ingress"):
        assert set(out[side]) == {"verdict", "enforced", "l7", "matched"}
    return out


def test_validate_ok() -> None:
    """validate exits 0 and prints one `file:line: ns/name: ok ...` line per object."""
    proc = run("policy", "validate", "examples/policies")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 6
    assert any(line.startswith("examples/policies/http.yaml:4: default/frontend-api: ok (CiliumNetworkPolicy") for line in lines)
    assert any(line.startswith("examples/policies/dns-fqdn.yaml:") and "kube-dns-ingress: ok (CiliumClusterwideNetworkPolicy" in line for line in lines)
    whole = run("policy", "validate", "examples")  # the endpoints file next to the policies is skipped
    assert whole.returncode == 0 and whole.stdout == proc.stdout.replace("examples/policies", "examples/policies")


def test_validate_reports_each_problem(tmp_path: Path) -> None:
    """validate exits 1 with one line per problem, naming file, document line, object and field path."""
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
        "policies/web.yaml:2: default/web: specs[0].ingress[0].toPorts[0]: L7 rules require protocol TCP",
        'policies/web.yaml:12: default/typo: spec.ingress[0].toPort: unknown field "toPort" (did you mean "toPorts"?)',
    ]
    assert "Traceback" not in proc.stderr


def test_validate_yaml_error_and_missing_path(tmp_path: Path) -> None:
    """A YAML syntax error is a located problem (exit 1); a missing PATH is a usage error (exit 2)."""
    (tmp_path / "bad.yaml").write_text("kind: [\n")
    proc = run("policy", "validate", str(tmp_path / "bad.yaml"))
    assert proc.returncode == 1 and "YAML syntax error" in proc.stdout and "Traceback" not in proc.stderr
    assert run("policy", "validate", str(tmp_path / "nope.yaml")).returncode == 2


def test_trace_json_allowed() -> None:
    """The allowed HTTP request: ALLOWED, ingress enforced with l7 http and the matching rule."""
    out = trace("--src", "default/backend", "--dst", "default/frontend", "--dport", "80/TCP", "--http-method", "GET", "--http-path", "/api")
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
    assert out["ingress"] == {"verdict": "DROPPED", "enforced": True, "l7": None, "matched": ["default/frontend-no-debug: ingressDeny[0]"]}
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
    assert out["verdict"] == "DROPPED" and out["egress"]["enforced"] is True
    assert out["ingress"] == {"verdict": "ALLOWED", "enforced": False, "l7": None, "matched": []}


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
    assert proc.returncode == 1 and 'unknown field "egres"' in proc.stderr
    (tmp_path / "eps.yaml").write_text("endpoints: [{name: a, ips: [bad]}]\n")
    proc = run("policy", "trace", "--policies", str(POLICIES), "--endpoints", str(tmp_path / "eps.yaml"), "--src-ip", "10.0.0.1", "--dst-ip", "10.0.0.2", "--dport", "80/TCP")
    assert proc.returncode == 1 and "endpoints[0].ips[0]" in proc.stderr
