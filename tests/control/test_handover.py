"""The hand-over conversation (control/handover.py) on a real unix socket, without the kernel.

A fake running agent serves an AgentSocket whose "handover" handler passes a real listening TCP
socket (loopback) and its own listening socket with SCM_RIGHTS; the successor's `request` gets
them, a client connects through the passed socket, and `confirm` completes. Refusal, silence and a
peer that goes away each give HandoverError with a message saying so.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from membrane.control import handover
from membrane.control.api import AgentSocket
from membrane.control.handover import HandoverError


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "agent.sock"


class FakeRunningAgent:
    """An AgentSocket on its own loop (a thread) that hands over `listener` (or refuses) when asked."""

    def __init__(self, path: Path, listener: socket.socket, *, refuse: str | None = None) -> None:
        self.path, self.listener, self.refuse = path, listener, refuse
        self.after: list[str] = []  # what the successor said after the sockets: "ready" or "gone"
        self.loop = asyncio.new_event_loop()
        self.api = AgentSocket(path, {}, takeover={"handover": self._handover})
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handover(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: dict[str, Any]) -> None:
        if self.refuse is not None:
            writer.write((json.dumps({"ok": False, "msg": self.refuse}) + "\n").encode())
            await writer.drain()
            return
        own = self.api.listening_socket()
        assert own is not None
        handover.offer(writer.get_extra_info("socket").fileno(), [("tcp4", self.listener), ("api", own)])
        own.close()
        line = await reader.readline()
        if json.loads(line or b"null") == {"type": "ready"}:
            self.after.append("ready")
            writer.write(b'{"ok": true}\n')
            await writer.drain()
        else:
            self.after.append("gone")

    def __enter__(self) -> FakeRunningAgent:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.api.start(), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.api.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s
    s.close()


def test_sockets_pass_and_the_successor_accepts_on_them(sock_path: Path, listener: socket.socket) -> None:
    """The successor gets the very listening sockets (same port, same unix path), accepts a client on the TCP one, and confirms."""
    with FakeRunningAgent(sock_path, listener) as agent:
        granted = handover.request(sock_path, timeout_s=5)
        try:
            tcp = granted.take("tcp4")
            api = granted.take("api")
            assert tcp is not None and api is not None
            assert tcp.getsockname() == listener.getsockname()
            assert api.getsockname() == str(sock_path)
            client = socket.create_connection(listener.getsockname(), timeout=5)
            conn, _ = tcp.accept()  # the queue is shared: the successor's copy accepts the client
            conn.sendall(b"hi")
            assert client.recv(2) == b"hi"
            for s in (conn, client, tcp, api):
                s.close()
            granted.confirm(timeout_s=5)
        finally:
            granted.close()
        deadline = 50
        while not agent.after and deadline:
            threading.Event().wait(0.05)
            deadline -= 1
        assert agent.after == ["ready"]


def test_a_successor_that_goes_away_is_seen_by_the_running_agent(sock_path: Path, listener: socket.socket) -> None:
    """The successor closes without "ready": the running agent learns it (and keeps serving)."""
    with FakeRunningAgent(sock_path, listener) as agent:
        handover.request(sock_path, timeout_s=5).close()
        for _ in range(100):
            if agent.after:
                break
            threading.Event().wait(0.05)
        assert agent.after == ["gone"]


def test_refusal_is_an_error_naming_the_reason(sock_path: Path, listener: socket.socket) -> None:
    with FakeRunningAgent(sock_path, listener, refuse="the agent is still starting"), pytest.raises(HandoverError) as e:
        handover.request(sock_path, timeout_s=5)
    assert "refused the hand-over: the agent is still starting" in str(e.value)


def test_an_agent_that_does_not_answer_times_out(sock_path: Path) -> None:
    """A listening socket nobody serves (a stopped agent): connect succeeds (backlog), the answer never comes."""
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(sock_path))
    silent.listen(4)
    try:
        with pytest.raises(HandoverError) as e:
            handover.request(sock_path, timeout_s=0.3)
        assert "did not answer the hand-over request" in str(e.value)
    finally:
        silent.close()


def test_no_agent_is_an_error(sock_path: Path) -> None:
    with pytest.raises(HandoverError) as e:
        handover.request(sock_path, timeout_s=1)
    assert "hand-over request on" in str(e.value)
