"""`membrane` command line: a thin dispatcher; each command group lives in its own module.

Exit status: 0 on success, 1 when the input (a policy, an endpoints file) is invalid, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each module exposes `register(subparsers)`, which adds its parser(s) and sets `func` on them:
# `func(args) -> int` is the command's exit status.
_COMMAND_MODULES = ("proxy.policy_cmd", "proxy.demo", "proxy.gateway_cmd", "proxy.agent_cmd")
# The module that registers each top-level command. Only that module is imported for a command, so
# `membrane policy ...` does not pay for the proxy's and the agent's imports (bcc, pyroute2, kafka).
_COMMAND_OWNERS = {
    "policy": "proxy.policy_cmd",
    "demo": "proxy.demo",
    "gateway": "proxy.gateway_cmd",
    "run": "proxy.agent_cmd",
    "status": "proxy.agent_cmd",
    "endpoint": "proxy.agent_cmd",
    "cleanup-stale": "proxy.agent_cmd",
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: just the owning module's commands when argv names one, else every command."""
    parser = argparse.ArgumentParser(prog="membrane", description="Sidecar-free L7 network policy enforcer.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    first = next((a for a in (argv or ()) if not a.startswith("-")), None)
    owner = _COMMAND_OWNERS.get(first) if first is not None else None
    for name in (owner,) if owner else _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
