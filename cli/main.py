"""`membrane` command line: a thin dispatcher; each command group lives in its own module.

Exit status: 0 on success, 1 when the input (a policy, an endpoints file) is invalid, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Sequence

# Each module exposes `register(subparsers)`, which adds its parser(s) and sets `func` on them:
# `func(args) -> int` is the command's exit status.
_COMMAND_MODULES = ("membrane.cli.policy", "membrane.sandbox.demo", "membrane.cli.gateway", "membrane.cli.agent", "membrane.cli.observe", "membrane.cli.sandbox")
# The module that registers each top-level command. Only that module is imported for a command, so
# `membrane policy ...` does not pay for the proxy's and the agent's imports (bcc, pyroute2, kafka).
_COMMAND_OWNERS = {
    "policy": "membrane.cli.policy",
    "demo": "membrane.sandbox.demo",
    "gateway": "membrane.cli.gateway",
    "run": "membrane.cli.agent",
    "status": "membrane.cli.agent",
    "endpoint": "membrane.cli.agent",
    "cleanup-stale": "membrane.cli.agent",
    "observe": "membrane.cli.observe",
    "uninstall": "membrane.cli.agent",
    "sandbox": "membrane.cli.sandbox",
}


def version() -> str:
    """The installed distribution's version (importlib.metadata), "unknown" when not installed."""
    try:
        return importlib.metadata.version("membrane")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: just the owning module's commands when argv names one, else every command."""
    parser = argparse.ArgumentParser(prog="membrane", description="Sidecar-free L7 network policy enforcer.")
    parser.add_argument("--version", action="version", version=f"membrane {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    first = next((a for a in (argv or ()) if not a.startswith("-")), None)
    owner = _COMMAND_OWNERS.get(first) if first is not None else None
    for name in (owner,) if owner else _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:  # answered without importing any command module
        print(f"membrane {version()}")
        return 0
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
