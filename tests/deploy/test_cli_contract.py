"""The chart runs the membrane CLI: every command line it renders must parse with the CLI's own parser.
The Kubernetes mode (`run --kubernetes ...`, `--health`, `--metrics`) and `uninstall --force` are held
to the real CLI: a flag the chart renders that the CLI does not know fails here."""

from __future__ import annotations

import contextlib
import io

import pytest
from membrane.cli.main import build_parser

from tests.deploy.util import render

AGENT = "mbr-membrane"


def _parses(argv: list[str]) -> str:
    """'' when argv parses, else argparse's error text."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser(argv).parse_args(argv)
    except SystemExit:
        return err.getvalue() or "exit"
    return ""


def _agent_args(values: dict[str, str]) -> list[str]:
    (ds,) = [d for d in render(values) if d["kind"] == "DaemonSet" and d["metadata"]["name"] == AGENT]
    (agent,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent"]
    return [a.replace("$(NODE_NAME)", "node-1") for a in agent["args"]]


def test_the_parser_rejects_an_unknown_flag() -> None:
    """The check below can fail: an unknown flag does not parse."""
    assert _parses(["run", "--no-such-flag"]) != ""



@pytest.mark.parametrize("values", [{}, {"flows.enabled": "true", "metrics.enabled": "false"}], ids=["default", "flows-no-metrics"])
def test_agent_command_line_parses(values: dict[str, str]) -> None:
    """The agent container's args parse with `membrane`'s parser."""
    assert _parses(_agent_args(values)) == ""



def test_cleanup_command_line_parses() -> None:
    """The uninstall hook's `membrane uninstall --force` parses."""
    (ds,) = [d for d in render() if d["kind"] == "DaemonSet" and d["metadata"]["name"] == f"{AGENT}-cleanup"]
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    (command,) = [a for a in init["args"] if a.startswith("/usr/local/bin/membrane-entrypoint ")]
    assert _parses(command.split()[1:]) == ""
