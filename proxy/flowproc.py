"""The flows formatter process: a worker's flow records made into JSON lines and written, outside its GIL.

Owns the child process (`python -m membrane.proxy.flowproc`), the pipe that feeds it and the pipe it answers
on. The worker's `FlowSink` sends each loop pass's records as one marshal'd list of plain tuples
(flows.py `WIRE_*`: a connection's fixed part once, then per record its fields); this process rebuilds the
`Flow`s, calls the same `to_line` and appends to the same size-rotated files (`RotatingFile`). Never blocks
the worker: the pipe is non-blocking, what it cannot take waits in a backlog of at most `max_queue` records,
beyond which a pass's records are dropped and counted by the sink (`membrane_flows_dropped_total`).
Lifetime: the child dies with its worker (end of file on the pipe; PR_SET_PDEATHSIG if the pipe is held open
elsewhere, e.g. by a forked process) after writing what it received; `close()` waits for it to flush and exit.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import json
import marshal
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from membrane.proxy.flows import (
    WIRE_CONTEXT,
    WIRE_FLOW,
    WIRE_FORGET,
    WIRE_L7,
    WIRE_LINE,
    WIRE_SYNC,
    FlowContext,
    FlowStream,
    RotatingFile,
    context_from_wire,
    flow_from_wire,
    reused_l7,
)

_HEADER = struct.Struct("<I")  # each frame: its length, then one marshal'd list of WIRE_* tuples
PIPE_BYTES = 1 << 20  # the records pipe's capacity (F_SETPIPE_SZ; Linux's default pipe-max-size)
BATCH_S = 0.005  # after each read the child lets records gather this long: one read, one file write per batch, and
# the worker's pipe writes seldom have to wake it (measured: a wake-up and a write per loop pass cost more than the JSON)
START_TIMEOUT_S = 20.0  # the child imports membrane.proxy.flows (and opens the files) before it answers
SYNC_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 30.0
_READY = b"r"
_PR_SET_PDEATHSIG = 1


class FormatterProcess:
    """The worker's end: starts the child for `streams` (RotatingFiles: their paths and rotation settings),
    sends it frames, and stops it. Every method is called on the worker's loop thread."""

    def __init__(self, streams: Sequence[FlowStream], *, node_name: str, max_queue: int) -> None:
        files = []
        for stream in streams:
            if not isinstance(stream, RotatingFile):
                raise TypeError(f"the formatter process writes RotatingFiles only, not {type(stream).__name__}")
            files.append([stream.path, stream.max_bytes, stream.max_backups])
        self.max_queue = max_queue
        self._backlog: collections.deque[tuple[memoryview, int]] = collections.deque()  # frames the pipe had no room for
        self._backlog_records = 0
        self._token = 0
        records_r, records_w = os.pipe()  # both ends close-on-exec: only the child's copy (pass_fds) survives exec
        answers_r, answers_w = os.pipe()
        try:
            with contextlib.suppress(OSError):  # a smaller pipe only means an earlier backlog
                fcntl.fcntl(records_w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            config = {"records_fd": records_r, "answers_fd": answers_w, "files": files, "node_name": node_name,
                      "parent": os.getpid()}
            self._child = subprocess.Popen(
                [sys.executable, "-m", "membrane.proxy.flowproc", json.dumps(config)],
                pass_fds=(records_r, answers_w), stdin=subprocess.DEVNULL,
            )
        except BaseException:
            for fd in (records_r, records_w, answers_r, answers_w):
                os.close(fd)
            raise
        os.close(records_r)
        os.close(answers_w)
        self._fd = records_w
        self._answers = answers_r
        try:
            self._read_answer(_READY, START_TIMEOUT_S)
        except OSError:
            self._abandon()
            raise
        os.set_blocking(records_w, False)

    @property
    def pid(self) -> int:
        return self._child.pid

    def send(self, items: list[Any], records: int) -> int:
        """Queue one loop pass's WIRE_* items (`records` of them flows). Returns how many records were dropped
        instead (0, or `records` when the child is `max_queue` records behind). Never blocks.

        Raises OSError when the child is gone (the caller writes the records itself from then on), ValueError
        when an item holds something marshal cannot carry (nothing was sent)."""
        payload = marshal.dumps(items)
        self._pump()
        if self._backlog_records + records > self.max_queue:
            return records
        frame = memoryview(_HEADER.pack(len(payload)) + payload)
        if not self._backlog:
            try:
                sent = os.write(self._fd, frame)
            except BlockingIOError:
                sent = 0
            if sent == len(frame):
                return 0
            frame = frame[sent:]
        self._backlog.append((frame, records))
        self._backlog_records += records
        return 0

    def _pump(self) -> None:
        """Write what the backlog holds, as far as the pipe takes it."""
        backlog = self._backlog
        while backlog:
            frame, records = backlog[0]
            try:
                sent = os.write(self._fd, frame)
            except BlockingIOError:
                return
            if sent < len(frame):
                backlog[0] = (frame[sent:], records)
                return
            backlog.popleft()
            self._backlog_records -= records

    def _send_all(self, deadline: float) -> None:
        """Write the whole backlog, waiting for the pipe (flush and close only)."""
        while self._backlog:
            self._pump()
            if self._backlog:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the flows formatter process does not read")
                select.select([], [self._fd], [], left)

    def sync(self) -> None:
        """Wait until the child wrote and flushed everything sent so far. Raises OSError if it is gone or stuck."""
        self._token += 1
        token = self._token.to_bytes(8, "little")
        payload = marshal.dumps([(WIRE_SYNC, token)])
        self._backlog.append((memoryview(_HEADER.pack(len(payload)) + payload), 0))
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        self._send_all(deadline)
        self._read_answer(token, max(0.0, deadline - time.monotonic()))

    def _read_answer(self, expected: bytes, timeout_s: float) -> None:
        got = b""
        deadline = time.monotonic() + timeout_s
        while len(got) < len(expected):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._answers], [], [], left)[0]:
                raise TimeoutError("the flows formatter process does not answer")
            chunk = os.read(self._answers, len(expected) - len(got))
            if not chunk:
                raise BrokenPipeError("the flows formatter process exited")
            got += chunk
        if got != expected:
            raise OSError(f"the flows formatter process answered {got!r}, not {expected!r}")

    def close(self, timeout_s: float = EXIT_TIMEOUT_S) -> None:
        """Send what is queued, close the pipe (the child writes the rest, flushes and exits) and wait for it.
        A child that does not exit in `timeout_s` is killed. Raises OSError if the backlog could not be sent."""
        try:
            self._send_all(time.monotonic() + timeout_s)
        finally:
            self._abandon(timeout_s)

    def _abandon(self, timeout_s: float = 5.0) -> None:
        for fd in (self._fd, self._answers):
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            self._child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()


# --- the child ------------------------------------------------------------------------------------------------


class _Formatter:
    """The child's state: the files, the connections' contexts by wire id, what is read but not yet a frame."""

    def __init__(self, files: list[list[Any]], node_name: str) -> None:
        self.streams = [RotatingFile(path, max_bytes=max_bytes, max_backups=backups) for path, max_bytes, backups in files]
        self.node_name = node_name
        self.contexts: dict[int, FlowContext] = {}
        self.l7s: dict[int, dict[str, Any]] = {}
        self.errors = 0

    def frames(self, buf: bytearray) -> list[Any]:
        """The items of every whole frame at the start of `buf` (removed from it)."""
        items: list[Any] = []
        at = 0
        while len(buf) - at >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, at)
            if len(buf) - at - _HEADER.size < size:
                break
            start = at + _HEADER.size
            items += marshal.loads(bytes(buf[start:start + size]))
            at = start + size
        del buf[:at]
        return items

    def handle(self, items: list[Any], answers_fd: int) -> None:
        """Format and write the items (one write per stream), answering each WIRE_SYNC after what precedes it."""
        lines: list[str] = []
        node = self.node_name
        contexts = self.contexts
        l7s = self.l7s
        for item in items:
            kind = item[0]
            try:
                if kind == WIRE_FLOW:
                    l7 = item[4]
                    flow = flow_from_wire(item, contexts[item[1]], l7s[l7] if type(l7) is int else None)
                    lines.append(flow.to_line(node))
                elif kind == WIRE_CONTEXT:
                    contexts[item[1]] = context_from_wire(item[2])
                elif kind == WIRE_L7:
                    l7s[item[1]] = reused_l7(item[2])  # its JSON is made once here too
                elif kind == WIRE_LINE:
                    lines.append(item[1])
                elif kind == WIRE_FORGET:
                    contexts.clear()
                    l7s.clear()
                elif kind == WIRE_SYNC:
                    self.write(lines)
                    lines = []
                    os.write(answers_fd, item[1])
            except (KeyError, TypeError, ValueError, IndexError):  # a record that cannot be formatted is lost, not the rest
                self.errors += 1
        self.write(lines)

    def write(self, lines: list[str]) -> None:
        if not lines:
            return
        text = "".join(lines)
        for stream in self.streams:
            try:
                stream.write(text)
                stream.flush()
            except (OSError, ValueError):
                self.errors += 1

    def close(self) -> None:
        for stream in self.streams:
            with contextlib.suppress(OSError, ValueError):
                stream.close()


def _die_with(parent: int) -> None:
    """Ask the kernel for SIGUSR1 when the parent dies (a forked process may hold the pipe open, so end of file
    alone may never come); the handler makes the pipe non-blocking, so the loop drains it and ends."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGUSR1), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: nobody will signal
        os.kill(os.getpid(), signal.SIGUSR1)


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    records_fd: int = config["records_fd"]
    answers_fd: int = config["answers_fd"]
    # The worker's process group gets the terminal's SIGINT and the service's SIGTERM; the worker then
    # drains and closes the pipe, and this process writes what it was sent: it ignores both.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    orphaned = False

    def parent_died(signum: int, frame: object) -> None:
        nonlocal orphaned
        orphaned = True
        os.set_blocking(records_fd, False)

    signal.signal(signal.SIGUSR1, parent_died)
    _die_with(config["parent"])
    formatter = _Formatter(config["files"], config["node_name"])
    os.write(answers_fd, _READY)
    buf = bytearray()
    try:
        while True:
            try:
                chunk = os.read(records_fd, PIPE_BYTES)
            except BlockingIOError:  # orphaned and the pipe is empty
                break
            if not chunk:  # the worker closed the pipe (or died): what is read is all there is
                break
            buf += chunk
            formatter.handle(formatter.frames(buf), answers_fd)
            if orphaned:
                os.set_blocking(records_fd, False)
            else:
                time.sleep(BATCH_S)
    finally:
        formatter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
