"""The flow server: a local unix socket that streams a `FlowSink`'s records to `membrane observe`.

Owns the socket, one small request/response protocol and per-client bounded queues; never judges
traffic and never blocks the data path (a follower that reads too slowly loses records, counted and
reported to it as Hubble's `lost_events`, instead of holding memory or the loop).

Protocol: the client sends one JSON line and then only reads.
* Observe: `{"whitelist": [FlowFilter...], "blacklist": [...], "last": N|null, "follow": bool,
  "since_ns": int|null, "until_ns": int|null}` (filters as flow.proto FlowFilter dicts,
  proxy/flowfilter.py). The server answers with the matching records in the ring (the last N,
  or all when `last` is null), one `{"flow":...,"node_name":...,"time":...}` line each, then, with
  `follow`, each new matching record as it is emitted; without it, it closes. An unusable request
  gets `{"error": "..."}` and the connection is closed.
* Publish: `{"publish": true}`, then flow JSON lines: another process's records (a gateway worker's)
  go into this sink's ring and to its followers (`FlowPublisher` is that client).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import os
import socket
import stat
import threading
from typing import Any

from membrane.proxy.flowfilter import FilterError, FlowMatcher
from membrane.proxy.flows import FlowRecord, FlowSink

log = logging.getLogger("membrane.flowserver")

MAX_REQUEST_BYTES = 64 * 1024  # one request line; filters are small
REQUEST_TIMEOUT_S = 5.0
MAX_QUEUE = 8192  # records queued for one follower before it loses records (Hubble's ring is 4095 by default)


class SocketInUse(OSError):
    """Another process already serves flows on this path."""


def _prepare_path(path: str) -> None:
    """Remove a stale socket left by a process that died; refuse a path another server answers on or that is no socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise SocketInUse(errno.EADDRINUSE, f"{path} is in use by another running process")


class FlowServer:
    """Serves `sink`'s records on the unix socket `path` (mode 0660) until `close()`."""

    def __init__(self, sink: FlowSink, path: str, *, max_queue: int = MAX_QUEUE) -> None:
        self.sink = sink
        self.path = path
        self.max_queue = max_queue
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.clients_served = 0
        self.records_lost = 0

    async def start(self) -> None:
        """Bind and listen (creating the socket's directory, e.g. /var/run/membrane, when missing).

        Raises:
            OSError: cannot bind; SocketInUse when another server answers on `path` (the caller exits 2).
        """
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        _prepare_path(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=MAX_REQUEST_BYTES)
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        """Stop listening, end every client, remove the socket file."""
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            for task in list(self._clients):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.serve(reader, writer)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: dict[str, Any] | None = None) -> None:
        """Serve one client to its end (closing it), also for a socket someone else owns (the agent's,
        which reads the request line itself and passes it as `request`)."""
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            if request is None:
                await self._session(reader, writer)
            else:
                await self._handle(request, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:  # one bad client never takes the server down
            log.exception("flow server client failed")
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
        except (TimeoutError, ValueError):  # ValueError: the line is over MAX_REQUEST_BYTES
            await _send_error(writer, "no request line (one JSON object, at most 64 KiB, within 5 s)")
            return
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            await _send_error(writer, "the request must be one JSON object on one line")
            return
        await self._handle(request, reader, writer)

    async def _handle(self, request: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if request.get("publish") is True:
            await self._ingest(reader)
            return
        try:
            matcher = FlowMatcher.build(
                _filter_list(request, "whitelist"), _filter_list(request, "blacklist"),
                since_ns=_opt_int(request, "since_ns"), until_ns=_opt_int(request, "until_ns"),
            )
            last = _opt_int(request, "last")
        except (FilterError, TypeError) as e:
            await _send_error(writer, str(e))
            return
        self.clients_served += 1
        await self._observe(reader, writer, matcher, last, bool(request.get("follow")))

    async def _ingest(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # an over-long line: the publisher is broken
                return
            if not line:
                return
            self.sink.ingest(line.decode("utf-8", "replace"))

    async def _observe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, matcher: FlowMatcher,
                       last: int | None, follow: bool) -> None:
        node = self.sink.node_name
        queue: collections.deque[FlowRecord] = collections.deque()
        ready = asyncio.Event()
        lost = 0

        def listener(record: FlowRecord) -> None:
            nonlocal lost
            if len(queue) >= self.max_queue:
                lost += 1
                self.records_lost += 1
            else:
                queue.append(record)
            ready.set()

        if follow:  # subscribed before the snapshot, with no await between: no record falls in the gap
            self.sink.add_listener(listener)
        try:
            snapshot = [(r, r.to_json(node)) for r in self.sink.records()]
            matching = [r for r, flow in snapshot if matcher.matches(flow, node)]
            if last is not None:
                matching = matching[-last:] if last > 0 else []
            writer.write("".join(r.to_line(node) for r in matching).encode())
            await writer.drain()
            if not follow:
                return
            gone = asyncio.ensure_future(reader.read(1))  # the client sends nothing more: EOF means it left
            try:
                while not gone.done():
                    waiter = asyncio.ensure_future(ready.wait())
                    await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    ready.clear()
                    out = []
                    while queue:
                        record = queue.popleft()
                        if matcher.matches(record.to_json(node), node):
                            out.append(record.to_line(node))
                    if lost:
                        out.append(json.dumps({"lost_events": {"source": "HUBBLE_RING_BUFFER",
                                                               "num_events_lost": str(lost)}}) + "\n")
                        lost = 0
                    if out:
                        writer.write("".join(out).encode())
                        await writer.drain()
            finally:
                gone.cancel()
        finally:
            if follow:
                self.sink.remove_listener(listener)


def _filter_list(request: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = request.get(key) or []
    if not isinstance(value, list) or not all(isinstance(f, dict) for f in value):
        raise FilterError(f"{key} must be a list of FlowFilter objects")
    return value


def _opt_int(request: dict[str, Any], key: str) -> int | None:
    value = request.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise FilterError(f"{key} must be an integer")
    return value


async def _send_error(writer: asyncio.StreamWriter, message: str) -> None:
    writer.write((json.dumps({"error": message}) + "\n").encode())
    with contextlib.suppress(ConnectionError):
        await writer.drain()


class FlowPublisher:
    """A FlowSink stream that sends records to a `FlowServer` in another process (a gateway worker's to worker 0's).

    Never blocks and never raises into the sink: the socket is non-blocking, unsent bytes wait (at most
    `max_buffer_bytes`, beyond that records are dropped and counted in `dropped_bytes`) and go out when
    the socket is writable (with `loop`) or at the next write. Not connected yet (the server starts at the
    same time): it retries every `retry_s` with `loop`, else at the next write. Written from another thread
    (the sink's writer thread), the bytes are handed to `loop`'s thread, which alone owns the socket.
    """

    def __init__(self, path: str, *, loop: asyncio.AbstractEventLoop | None = None,
                 max_buffer_bytes: int = 4 << 20, retry_s: float = 0.2) -> None:
        self.path = path
        self.loop = loop
        self.max_buffer_bytes = max_buffer_bytes
        self.retry_s = retry_s
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._writer_registered = False
        self._retry: asyncio.TimerHandle | None = None
        self.dropped_bytes = 0
        self.closed = False
        self._owner = threading.get_ident()  # the loop's thread: the only one that touches the socket

    def write(self, text: str) -> int:
        data = text.encode()
        loop = self.loop
        if loop is not None and threading.get_ident() != self._owner:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing can send it any more
                loop.call_soon_threadsafe(self._append, data)
            return len(text)
        self._append(data)
        return len(text)

    def _append(self, data: bytes) -> None:
        if len(self._buf) + len(data) > self.max_buffer_bytes:
            self.dropped_bytes += len(data)
        else:
            self._buf += data
        self._pump()

    def flush(self) -> None:
        if self.loop is None or threading.get_ident() == self._owner:
            self._pump()

    def close(self) -> None:
        self.closed = True
        self._pump()
        if self._retry is not None:
            self._retry.cancel()
        self._disconnect()

    def _connect(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
            sock.setblocking(False)
            sock.sendall(b'{"publish":true}\n')
        except OSError:
            sock.close()
            self._schedule_retry()
            return False
        self._sock = sock
        return True

    def _schedule_retry(self) -> None:
        if self.loop is None or self._retry is not None or self.closed or self.loop.is_closed():
            return

        def retry() -> None:
            self._retry = None
            self._pump()

        self._retry = self.loop.call_later(self.retry_s, retry)

    def _disconnect(self) -> None:
        if self._sock is not None:
            if self._writer_registered and self.loop is not None and not self.loop.is_closed():
                self.loop.remove_writer(self._sock.fileno())
            self._writer_registered = False
            self._sock.close()
            self._sock = None

    def _pump(self) -> None:
        if not self._buf:
            return
        if self._sock is None and not self._connect():
            return
        assert self._sock is not None
        try:
            sent = self._sock.send(self._buf)
        except BlockingIOError:
            sent = 0
        except OSError:  # the server went away: reconnect later, keep what is unsent
            self._disconnect()
            self._schedule_retry()
            return
        del self._buf[:sent]
        if self.loop is not None and not self.loop.is_closed():
            if self._buf and not self._writer_registered:
                self.loop.add_writer(self._sock.fileno(), self._pump)
                self._writer_registered = True
            elif not self._buf and self._writer_registered:
                self.loop.remove_writer(self._sock.fileno())
                self._writer_registered = False
