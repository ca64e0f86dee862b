"""The agent's local socket: one JSON object per line in, one per line out, dispatched by its "type".

Owns the unix socket that the CNI plugin, `membrane observe` and a successor agent talk to, and
the rule that only one agent listens on a node: `start()` refuses when a live agent answers on the
path, and takes the path over only from a dead one (connection refused), or serves the very socket a
running agent handed over (control/handover.py). A handler's failure is answered as an error line to
that client alone; the server keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("membrane.api")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
# A request without "type" (`membrane observe`'s, a flow publisher's) hands the whole connection over.
StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]], Awaitable[None]]
MAX_REQUEST_BYTES = 1 << 20  # a request line longer than this is refused (no unbounded buffering)


class AgentRunning(Exception):
    """Another agent already listens on the socket path."""


def is_listening(path: Path) -> bool:
    """True when something accepts connections on the unix socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class AgentSocket:
    """Serves `handlers` (request "type" -> coroutine returning the answer object) on a unix socket."""

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        stream: StreamHandler | None = None,
        takeover: Mapping[str, StreamHandler] | None = None,
    ) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self.stream = stream
        self.takeover = dict(takeover or {})  # request types that own their connection (the hand-over)
        self._server: asyncio.AbstractServer | None = None

    async def start(self, inherited: socket.socket | None = None) -> None:
        """Bind and listen, or serve `inherited` (the listening socket a running agent handed over, bound
        to the path already). Raises AgentRunning when a live agent holds the path; OSError if it cannot bind."""
        if inherited is not None:
            self._server = await asyncio.start_unix_server(self._serve, sock=inherited, limit=MAX_REQUEST_BYTES)
            return
        if is_listening(self.path):
            raise AgentRunning(f"an agent already listens on {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a dead agent's socket file: nobody answered on it
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST_BYTES)
        os.chmod(self.path, 0o600)  # root's agent, root's runtime: nobody else may attach or read flows

    def listening_socket(self) -> socket.socket | None:
        """The listening socket (to hand over), or None when not serving."""
        sockets = getattr(self._server, "sockets", None)  # asyncio.Server and uvloop's both have it
        if not sockets:
            return None
        return socket.socket(fileno=os.dup(sockets[0].fileno()))

    def stop_accepting(self) -> None:
        """Stop accepting new connections (open ones go on); the listening socket stays the successor's."""
        if self._server is not None:
            self._server.close()

    async def close(self, *, unlink: bool = True) -> None:
        """Stop accepting. unlink=False after a hand-over: the path is the successor's (same socket)."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):  # uvloop waits for open connections (an `observe -f`)
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
            if unlink:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than MAX_REQUEST_BYTES
                    await _send(writer, {"ok": False, "msg": f"request longer than {MAX_REQUEST_BYTES} bytes"})
                    return
                if not line:
                    return
                if self.stream is not None or self.takeover:
                    request = _parse(line)
                    if isinstance(request, dict) and self.stream is not None and "type" not in request:
                        await self.stream(reader, writer, request)  # it owns the connection from here
                        return
                    owner = self.takeover.get(str(request.get("type"))) if isinstance(request, dict) else None
                    if owner is not None and isinstance(request, dict):
                        await owner(reader, writer, request)
                        return
                await _send(writer, await self._answer(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError as e:
            return {"ok": False, "msg": f"request is not JSON: {e}"}
        if not isinstance(request, dict):
            return {"ok": False, "msg": "request is not a JSON object"}
        handler = self.handlers.get(str(request.get("type")))
        if handler is None:
            return {"ok": False, "msg": f"unknown request type {request.get('type')!r}; known: {sorted(self.handlers)}"}
        try:
            return await handler(request)
        except Exception as e:  # one client's bad request never stops the socket
            log.exception("agent socket: %s request failed", request.get("type"))
            return {"ok": False, "msg": f"{type(e).__name__}: {e}"}


def _parse(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


async def _send(writer: asyncio.StreamWriter, answer: Mapping[str, Any]) -> None:
    writer.write(json.dumps(answer).encode() + b"\n")
    await writer.drain()
