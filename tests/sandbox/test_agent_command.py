"""`SandboxConfig.agent_command` / `sandbox up --agent-command`: the command that starts the agent (no root,
no kernel: a stand-in agent records its argv; the real image run is tests/deploy/test_image.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from membrane.sandbox.cluster import Sandbox, SandboxConfig

FAKE_AGENT = """\
import json, sys, time
with open(sys.argv[1], "w") as f:
    json.dump(sys.argv[2:], f)
print("agent ready", flush=True)
time.sleep(60)
"""


def test_the_agent_command_is_run_with_the_run_flags_appended(tmp_path: Path) -> None:
    script = tmp_path / "fake_agent.py"
    script.write_text(FAKE_AGENT)
    seen = tmp_path / "argv.json"
    config = SandboxConfig(state_dir=tmp_path, pod_cidr="10.244.250.0/24", node_name="n1", agent_args=("--flows", "F"),
                           agent_command=(sys.executable, str(script), str(seen)), ready_timeout_s=30)
    sandbox = Sandbox(config)
    try:
        asyncio.run(sandbox._start_agent())
        argv = json.loads(seen.read_text())
    finally:
        assert sandbox.agent is not None
        os.killpg(sandbox.agent.pid, signal.SIGKILL)
        sandbox.agent.wait(10)
    assert argv == ["run", "--kubernetes", "--kubeconfig", str(tmp_path / "kubeconfig"), "--node-name", "n1",
                    "--socket", str(tmp_path / "agent.sock"), "--status-file", str(tmp_path / "agent-status.json"),
                    "--flows", "F"]


def test_an_empty_agent_command_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "membrane.cli", "sandbox", "up", "--state-dir", str(tmp_path),
                           "--agent-command", "  "], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--agent-command is empty" in proc.stderr
