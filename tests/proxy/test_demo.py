"""`membrane demo --policy-only` (issue 2's policy demo): validates the examples and prints the verdict table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from membrane.sandbox.demo import EXAMPLES, SCENARIOS, VerdictRow, format_verdict_table, run_scenarios

ROOT = Path(__file__).resolve().parents[2]
MEMBRANE = ROOT / ".venv" / "bin" / "membrane"


def test_demo_runs_and_every_scenario_gets_its_verdict() -> None:
    """`membrane demo --policy-only` exits 0, validates every example policy and prints one table row per scenario."""
    exe = [str(MEMBRANE)] if MEMBRANE.exists() else [sys.executable, "-m", "membrane.cli"]
    proc = subprocess.run([*exe, "demo", "--policy-only"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # One "ok" line per policy object in the shipped examples, counted independently of the demo's code.
    objects = sum(1 for f in (EXAMPLES / "policies").glob("*.yaml") for doc in yaml.safe_load_all(f.read_text()) if doc)
    assert objects > 0
    assert proc.stdout.count(": ok (") == objects
    assert f"{len(SCENARIOS)}/{len(SCENARIOS)} flows got their expected verdict." in proc.stdout
    for verdict in ("ALLOWED", "DROPPED", "L7_DENIED"):
        assert verdict in proc.stdout


def test_scenarios_cover_every_example_and_verdict() -> None:
    """The demo's scenarios trace HTTP, gRPC, DNS, toFQDNs and Kafka and reach all three verdicts."""
    rows = run_scenarios(EXAMPLES / "policies", EXAMPLES / "endpoints.yaml")
    assert all(r.as_expected for r in rows), [r for r in rows if not r.as_expected]
    assert {r.verdict for r in rows} == {"ALLOWED", "DROPPED", "L7_DENIED"}
    kinds = {r.request.split(" ")[0] for r in rows if r.request}
    assert kinds == {"HTTP", "gRPC", "DNS", "Kafka"}


def test_table_format_is_reusable() -> None:
    """format_verdict_table aligns columns and flags a row whose verdict differs from the expected one."""
    rows = [
        VerdictRow("a/x", "b/y", "80/TCP", "HTTP GET /", "ALLOWED", "rule-1", expected="ALLOWED"),
        VerdictRow("a/longer-name", "1.2.3.4", "53/UDP", "", "DROPPED", "default deny", expected="ALLOWED"),
    ]
    lines = format_verdict_table(rows).splitlines()
    assert lines[0].split() == ["#", "from", "to", "port", "request", "verdict", "decided", "by"]
    assert lines[2].index("b/y") == lines[3].index("1.2.3.4")
    assert "DROPPED (expected ALLOWED)" in lines[3]
