"""The two errors bpf/ raises: a program that does not load, and an attachment that fails.

Callers (the agent) report them and stop; everything attached before the failure is already undone.
"""

from __future__ import annotations


class BpfLoadError(Exception):
    """A program failed to compile or the verifier rejected it; the message carries bcc's output."""


class AttachError(Exception):
    """Attaching `kind` ("tc", "cgroup", "sk_msg", "routing") to `target` failed with `errno`."""

    def __init__(self, kind: str, target: str, errno: int, detail: str = "") -> None:
        super().__init__(f"cannot attach {kind} to {target}: errno {errno}{': ' + detail if detail else ''}")
        self.kind = kind
        self.target = target
        self.errno = errno
