"""Planned hand-over between two agents on one node (`membrane run` while one runs), as Envoy's hot restart.

Owns the conversation on the agent socket and the passing of listening sockets with SCM_RIGHTS:

  new -> old   {"type": "handover", "pid": N}
  old -> new   {"ok": true, "pid": M, "sockets": ["tcp4", "udp4", ..., "api"]}   + those fds (SCM_RIGHTS)
               or {"ok": false, "msg": "..."} (no fds)
  ... the new agent adopts the pinned kernel state, replaces the programs in place, and serves on the
      same listening sockets (both agents accept from one queue meanwhile, so no SYN is refused) ...
  new -> old   {"type": "ready"}
  old -> new   {"ok": true}    the old one has stopped accepting; it drains and exits 0, kernel state kept

The old agent freezes its kernel writes from the moment it hands the sockets over (the new one owns
the kernel from then on). When the conversation ends without "ready" (the new agent failed or died),
the old one keeps serving and writes its policy to the kernel again; when the new agent gets no
answer or no ack, it exits with an error. Either way the programs stay attached: enforcement is never
removed during a hand-over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ANSWER_S = 10.0  # how long the new agent waits for the running one to hand its sockets over
CONFIRM_S = 10.0  # how long it waits for the running one to acknowledge "ready"
READY_S = 180.0  # how long the running agent waits for its successor's "ready" (bcc compiles under load)
MAX_FDS = 16


class HandoverError(Exception):
    """The hand-over could not be done; the message says why and what state the node is in."""


@dataclass
class Granted:
    """The new agent's end: the sockets the running agent handed over, and the connection to confirm on."""

    conn: socket.socket
    pid: int
    sockets: dict[str, socket.socket] = field(default_factory=dict)

    def take(self, name: str) -> socket.socket | None:
        return self.sockets.pop(name, None)

    def confirm(self, timeout_s: float = CONFIRM_S) -> None:
        """Tell the running agent we serve; returns once it has stopped accepting. Raises HandoverError."""
        try:
            self.conn.settimeout(timeout_s)
            self.conn.sendall(b'{"type": "ready"}\n')
            answer = _read_line(self.conn)
        except OSError as e:
            raise HandoverError(f"the running agent (pid {self.pid}) did not acknowledge: {e}") from e
        if not answer.get("ok"):
            raise HandoverError(f"the running agent (pid {self.pid}) did not acknowledge: {answer.get('msg', 'connection closed')}")

    def close(self) -> None:
        """Close the connection and every socket not taken (the running agent keeps its own copies)."""
        self.conn.close()
        for s in self.sockets.values():
            s.close()
        self.sockets.clear()


def request(path: Path, timeout_s: float = ANSWER_S) -> Granted:
    """Ask the agent on `path` for its listening sockets. Raises HandoverError (nothing was touched)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fds: list[int] = []
    try:
        conn.settimeout(timeout_s)
        conn.connect(str(path))
        conn.sendall((json.dumps({"type": "handover", "pid": os.getpid()}) + "\n").encode())
        data, fds, flags, _ = socket.recv_fds(conn, 65536, MAX_FDS)
        if flags & socket.MSG_CTRUNC:
            raise HandoverError("the running agent sent more sockets than expected")
        answer = _read_line(conn, data)
    except TimeoutError as e:
        _close_all(conn, fds)
        raise HandoverError(f"the running agent on {path} did not answer the hand-over request in {timeout_s:.0f} s") from e
    except OSError as e:
        _close_all(conn, fds)
        raise HandoverError(f"hand-over request on {path}: {e.strerror or e}") from e
    except HandoverError:
        _close_all(conn, fds)
        raise
    names = answer.get("sockets")
    if not answer.get("ok") or not isinstance(names, list) or len(names) != len(fds):
        _close_all(conn, fds)
        raise HandoverError(f"the running agent refused the hand-over: {answer.get('msg') or answer}")
    granted = Granted(conn=conn, pid=int(answer.get("pid", 0)))
    for name, fd in zip(names, fds, strict=True):
        granted.sockets[str(name)] = socket.socket(fileno=fd)
    return granted


def offer(conn_fd: int, named: Sequence[tuple[str, socket.socket]]) -> None:
    """The running agent's end: send the listening sockets over the connection whose fd is `conn_fd`
    (an asyncio transport's; a small write on a local socket, finished at once)."""
    sock = socket.socket(fileno=os.dup(conn_fd))
    try:
        blocking = sock.getblocking()
        sock.setblocking(True)  # the flag is the open file's: the transport's too, restored below
        try:
            msg = {"ok": True, "pid": os.getpid(), "sockets": [name for name, _ in named]}
            socket.send_fds(sock, [(json.dumps(msg) + "\n").encode()], [s.fileno() for _, s in named])
        finally:
            sock.setblocking(blocking)
    finally:
        sock.close()


def _read_line(conn: socket.socket, data: bytes = b"") -> dict[str, Any]:
    while b"\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return {"ok": False, "msg": "connection closed"}
        data += chunk
    try:
        answer = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        return {"ok": False, "msg": f"not JSON: {data[:100]!r}"}
    return answer if isinstance(answer, dict) else {"ok": False, "msg": "not a JSON object"}


def _close_all(conn: socket.socket, fds: Sequence[int]) -> None:
    conn.close()
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
