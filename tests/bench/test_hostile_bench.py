"""bench/hostile_bench.py runs and reports what it claims, in its quick mode, on two scenarios.

| fact | checked by |
|---|---|
| the script runs `membrane gateway` and exits 0 | running it with `--quick --only ... --json` |
| each scenario prints its table and the summary table | the markdown headings and header rows in stdout |
| the JSON holds every field the tables are made from | the keys of each scenario |
| the numbers come from real traffic: 504s after the upstream timeout, SERVFAIL past the DNS bound, counters scraped | the attacker's results and the /metrics deltas |
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"name", "title", "sent", "got", "fired_after", "attack_s", "window_s", "counters", "log_lines", "logs",
        "error_flows", "gateway_cpu_s", "rss_mib", "fds", "legit_baseline", "legit_during", "gateway_alive"}


def test_quick_run_of_two_scenarios(tmp_path: Path) -> None:
    out = tmp_path / "hostile.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "hostile_bench.py"), "--quick", "--only", "upstream-never-answers",
         "--only", "dns-tcp-pipelining", "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "#### An upstream that never answers (`upstream-never-answers`)" in run.stdout
    assert "#### DNS over TCP pipelining past the bound (`dns-tcp-pipelining`)" in run.stdout
    assert "| scenario | attacker got | fired after | counters |" in run.stdout
    report = json.loads(out.read_text())
    hang, pipelined = report["scenarios"]
    for scenario in (hang, pipelined):
        assert set(scenario) >= KEYS
        assert scenario["gateway_alive"]
        assert len(scenario["rss_mib"]) == len(scenario["fds"]) == 3
        assert scenario["legit_baseline"]["ok"] > 0
        assert scenario["legit_during"]["ok"] > 0
    assert hang["statuses"] == {"504": 20}
    assert hang["counters"]['membrane_proxy_timeouts_total{kind="upstream"}'] == 20
    assert hang["fds"][2] <= hang["fds"][0]  # every abandoned request released
    # Past the bound nothing is refused: the queries wait (the client's reading paused) and all reach the server.
    assert pipelined["rcodes"] == {"NOERROR": pipelined["upstream_could_see"]}
    assert pipelined["unanswered"] == 0
    assert pipelined["upstream_saw"] == pipelined["upstream_could_see"]
