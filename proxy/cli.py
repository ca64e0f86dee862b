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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="membrane", description="Sidecar-free L7 network policy enforcer.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
