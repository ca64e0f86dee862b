"""`run_live_demo()` end to end: pods, the agent, curl/grpcio/dig/kafka-python, and a clean teardown."""

from __future__ import annotations

import os

import pytest

from tests.helpers import kernel

pytestmark = [pytest.mark.integration, pytest.mark.bpf, pytest.mark.slow]


def test_live_demo_runs_every_step_as_predicted_and_leaves_nothing() -> None:
    """Every demo step gets the verdict the example policies predict (exit status 0), and nothing of ours is left after it."""
    if os.geteuid() != 0:
        pytest.skip("needs root (BPF, netns)")
    from membrane.sandbox.live_demo import run_live_demo

    kernel.assert_clean()
    lines: list[str] = []
    status = run_live_demo(out=lines.append)
    text = "\n".join(lines)
    assert status == 0, text
    assert "15/15 steps as the policy predicts; agent exit status 0" in text
    for verdict in ("ALLOWED", "L7_DENIED", "DROPPED"):
        assert verdict in text
    assert "L3_L4" in text
    assert "Kafka request produce" in text
    assert "DNS Query evil.example.com." in text
    kernel.assert_clean()
