"""Remove Membrane from one node after `helm uninstall` (the post-delete hook DaemonSet's init container).

It first waits for the old agent to be gone: helm has deleted the agent DaemonSet, but its pod may
still be stopping, and an agent that is still running would put back what `membrane uninstall` takes
away. Gone means its socket refuses connections (or no longer exists). After `--wait-seconds` it goes
on anyway and says so. Then it runs each command given after `--`, in order, stopping at the first
that fails. Standard library only.
"""

from __future__ import annotations

import argparse
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path


def agent_is_running(sock_path: Path) -> bool:
    """True when something accepts connections on the agent's unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(sock_path))
        except OSError:  # ENOENT, ECONNREFUSED, a stale socket file: nobody serves it
            return False
    return True


def wait_for_agent_exit(sock_path: Path, wait_s: float, poll_s: float = 0.5) -> bool:
    """Returns: True once the agent is gone, False when wait_s passed with the agent still serving."""
    deadline = time.monotonic() + wait_s
    while agent_is_running(sock_path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="node_cleanup")
    parser.add_argument("--socket", type=Path, default=Path("/var/run/membrane/agent.sock"))
    parser.add_argument("--wait-seconds", type=float, default=60.0)
    parser.add_argument("commands", nargs="+", help="shell-quoted commands, run in order")
    args = parser.parse_args(argv)
    if wait_for_agent_exit(args.socket, args.wait_seconds):
        print(f"node_cleanup: no agent serves {args.socket}")
    else:
        print(f"node_cleanup: an agent still serves {args.socket} after {args.wait_seconds:g}s; cleaning up anyway")
    for command in args.commands:
        print(f"node_cleanup: $ {command}", flush=True)
        rc = subprocess.run(shlex.split(command), check=False).returncode
        if rc != 0:
            print(f"node_cleanup: {command!r} exited with {rc}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
