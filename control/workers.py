"""Proxy worker processes and their control protocol (`membrane run --workers N`).

The agent process runs worker 0 and owns every kernel object; workers 1..N-1 are fresh
interpreters (`python -m membrane.control.workers SPEC`) that share the listening sockets (passed
as fds) and only proxy. One control socket per worker carries JSON lines, read by one
`ControlChannel` at both ends, from the event loop, never blocking:
  agent -> worker  {"type": "policy", "learned": {name: [ip, ...]}}  recompile (re-reading the files) with these names
                   {"type": "ack", "id": n}                            the learned names of request n are in the kernel
                   {"type": "stop_accepting"}                          handed over: a successor serves the listeners
  worker -> agent  {"type": "ready"}
                   {"type": "learned", "id": n, "names": [...], "ips": [...], "ttl": s}
A worker's DNS answer that teaches a new name waits (that connection alone) for its ack; the agent
sends the new policy before the ack, so the worker judges by it before the answer is relayed. A
worker whose control socket closes (the agent died) drains and exits: a crashed agent's L7 ports
fail closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from membrane.control.listeners import Listeners
from membrane.control.sources import SourceError
from membrane.control.sources.files import FileSource
from membrane.control.state import Inputs, NodeState, compile_inputs
from membrane.proxy.flows import FlowSink, close_flow_streams, open_flow_streams
from membrane.proxy.metrics import Metrics
from membrane.proxy.server import Proxy, ProxyConfig
from membrane.proxy.session import Learn
from membrane.proxy.wiring import IpcachePeers, SessionFactory

log = logging.getLogger("membrane.agent")

ACK_TIMEOUT_S = 2.0  # a learned name without an ack by then is relayed anyway (the agent is stuck or gone)
METRICS_PUBLISH_S = 1.0  # how stale a worker's share of /metrics may be


class ControlChannel:
    """One end of a control socket: JSON lines out (`send`), JSON lines in (`on_message`), from the loop.

    A line that is not JSON is skipped (the peer is our own process; a bad line must not kill the link).
    """

    def __init__(self, sock: socket.socket, on_message: Callable[[dict[str, Any]], None]) -> None:
        self.sock = sock
        self.on_message = on_message
        self.closed = asyncio.Event()
        self._buf = b""
        sock.setblocking(False)

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def send(self, msg: Mapping[str, Any]) -> None:
        """Send one message (small, on a local socket: a blocking write finishes at once). Logs a failure."""
        self.sock.setblocking(True)
        try:
            self.sock.sendall((json.dumps(msg) + "\n").encode())
        except OSError as e:
            log.warning("control socket: %s", e)
        finally:
            self.sock.setblocking(False)

    def _readable(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.stop()
            self.closed.set()
            return
        self._buf, messages = split_json_lines(self._buf, chunk)
        for msg in messages:
            self.on_message(msg)

    def stop(self) -> None:
        """Stop reading (the socket stays open until `close`)."""
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())

    def close(self) -> None:
        self.stop()
        self.sock.close()


def split_json_lines(buffered: bytes, chunk: bytes) -> tuple[bytes, list[dict[str, Any]]]:
    """Split a control-socket stream into JSON messages: returns (the unfinished tail, the messages)."""
    *lines, tail = (buffered + chunk).split(b"\n")
    messages = []
    for line in lines:
        with contextlib.suppress(ValueError):
            msg = json.loads(line)
            if isinstance(msg, dict):
                messages.append(msg)
    return tail, messages


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSpec:
    """What a worker process is started with (its only argument, as JSON)."""

    index: int
    policies: tuple[str, ...]
    endpoints: str | None
    flows: tuple[str, ...]
    drain_timeout_s: float
    ctl: int  # fd of the worker's end of the control socket
    tcp_fds: tuple[int, ...]
    udp_fds: tuple[int, ...]
    own_ports: tuple[int, ...]
    learned: Mapping[str, Sequence[str]]
    metrics_workload_labels: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        d = json.loads(text)
        return cls(
            index=int(d["index"]), policies=tuple(d["policies"]), endpoints=d["endpoints"], flows=tuple(d["flows"]),
            drain_timeout_s=float(d["drain_timeout_s"]), ctl=int(d["ctl"]), tcp_fds=tuple(d["tcp_fds"]),
            udp_fds=tuple(d["udp_fds"]), own_ports=tuple(d["own_ports"]), learned=d["learned"],
            metrics_workload_labels=bool(d.get("metrics_workload_labels", True)),
        )


class WorkerHandle:
    """The agent's end of one worker process."""

    def __init__(self, index: int, proc: subprocess.Popen[bytes], channel: ControlChannel) -> None:
        self.index = index
        self.proc = proc
        self.channel = channel
        self.ready = False

    @classmethod
    def spawn(
        cls,
        index: int,
        *,
        policies: Sequence[str],
        endpoints: str | None,
        flows: Sequence[str],
        drain_timeout_s: float,
        listeners: Listeners,
        learned: Mapping[str, Iterable[str]],
        on_message: Callable[[WorkerHandle, dict[str, Any]], None],
        metrics_workload_labels: bool = True,
    ) -> WorkerHandle:
        """Start worker `index` on the shared listeners and start reading its control socket."""
        ours, theirs = socket.socketpair()
        ports = listeners.ports
        spec = WorkerSpec(
            index=index, policies=tuple(policies), endpoints=endpoints, flows=tuple(flows), drain_timeout_s=drain_timeout_s,
            ctl=theirs.fileno(),
            tcp_fds=tuple(s.fileno() for s in (listeners.tcp4, listeners.tcp6) if s is not None),
            udp_fds=tuple(s.fileno() for s in (listeners.udp4, listeners.udp6) if s is not None),
            own_ports=tuple(sorted({ports.tcp4, ports.tcp6, ports.udp4, ports.udp6})),
            learned={k: sorted(v) for k, v in learned.items()},
            metrics_workload_labels=metrics_workload_labels,
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "membrane.control.workers", spec.to_json()],
            pass_fds=(spec.ctl, *spec.tcp_fds, *spec.udp_fds),
        )
        theirs.close()
        handle: WorkerHandle

        def received(msg: dict[str, Any]) -> None:
            on_message(handle, msg)

        handle = cls(index, proc, ControlChannel(ours, received))
        handle.channel.start()
        return handle


class WorkerLearner:
    """A worker's Learn hook: new names go to the agent; the answer waits for the agent's ack."""

    def __init__(self, channel: ControlChannel, state: NodeState, timeout_s: float = ACK_TIMEOUT_S) -> None:
        self.channel = channel
        self.state = state
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[None]] = {}

    def __call__(self, action: Learn) -> Awaitable[None] | None:
        fqdn = self.state.fqdn
        before = fqdn.generation
        now = time.monotonic()
        for name in action.names:
            fqdn.add(name, action.ips, ttl_s=action.ttl_s, now=now)
        if fqdn.generation == before:
            return None  # nothing new: the kernel knows these already
        n = next(self._ids)
        future = self._waiting[n] = asyncio.get_running_loop().create_future()
        self.channel.send({"type": "learned", "id": n, "names": list(action.names), "ips": list(action.ips), "ttl": action.ttl_s})
        return self._wait(n, future)

    async def _wait(self, n: int, future: asyncio.Future[None]) -> None:
        try:
            await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            log.warning("worker: no ack for learned names (request %d) in %.1f s; relaying the answer", n, self.timeout_s)
        finally:
            self._waiting.pop(n, None)

    def acked(self, n: int) -> None:
        future = self._waiting.get(n)
        if future is not None and not future.done():
            future.set_result(None)

    def release_all(self) -> None:
        """The agent is gone: nothing will be acked (the worker drains now)."""
        for future in self._waiting.values():
            if not future.done():
                future.set_result(None)


class _Worker:
    """One worker process's state: its copy of the policy (recompiled on the agent's word) and its proxy."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.source = FileSource(spec.policies, spec.endpoints)
        self.state = NodeState()
        for change in self.source.snapshot():
            self.state.apply(change)
        self._compile({k: frozenset(v) for k, v in spec.learned.items()})
        self.channel = ControlChannel(socket.socket(fileno=spec.ctl), self._message)
        self.learner = WorkerLearner(self.channel, self.state)
        self.proxy: Proxy | None = None

    def _compile(self, learned: Mapping[str, frozenset[str]]) -> None:
        inputs = self.state.inputs()
        inputs = Inputs(policies=inputs.policies, endpoints=inputs.endpoints, learned=learned)
        self.state.put_in_force(compile_inputs(inputs), learned)

    def _message(self, msg: dict[str, Any]) -> None:
        if msg.get("type") == "policy":
            try:
                changes = self.source.snapshot()
            except SourceError as e:
                log.warning("worker %d keeps its last good policy: %s", self.spec.index, e)
                changes = []
            for change in changes:
                self.state.apply(change)
            learned = msg.get("learned") or {}
            self._compile({str(k): frozenset(str(ip) for ip in v) for k, v in learned.items()})
        elif msg.get("type") == "ack":
            self.learner.acked(int(msg.get("id", 0)))
        elif msg.get("type") == "stop_accepting" and self.proxy is not None:
            self.proxy.stop_accepting()

    async def _publish_metrics(self, metrics: Metrics) -> None:
        """Send this worker's metric snapshot to the agent (which serves /metrics) every METRICS_PUBLISH_S."""
        while True:
            await asyncio.sleep(METRICS_PUBLISH_S)
            self.channel.send({"type": "metrics", "snapshot": metrics.snapshot()})

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        spec = self.spec
        streams = open_flow_streams(spec.flows)
        sink = FlowSink(streams)
        assert self.state.live is not None
        factory = SessionFactory(
            policy=self.state.live, resolver=IpcachePeers(own_ports=frozenset(spec.own_ports)), flows=sink, follow_reloads=True
        )
        proxy = self.proxy = Proxy(
            config=ProxyConfig(transparent=True, drain_timeout_s=spec.drain_timeout_s),
            factory=factory.session,
            upstream=None,
            flows=sink,
            metrics=Metrics(workload_labels=spec.metrics_workload_labels),
            datagram_factory=factory.datagram,
            learn=self.learner,
        )
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await proxy.start([socket.socket(fileno=fd) for fd in spec.tcp_fds], [socket.socket(fileno=fd) for fd in spec.udp_fds])
        self.channel.start()
        self.channel.send({"type": "ready"})
        publisher = asyncio.ensure_future(self._publish_metrics(proxy.metrics))
        closed = asyncio.ensure_future(self.channel.closed.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([closed, stopped], return_when=asyncio.FIRST_COMPLETED)
        for task in (closed, stopped, publisher):
            task.cancel()
        self.learner.release_all()
        await proxy.drain()
        close_flow_streams(streams)
        self.channel.close()
        return 0


def worker_main(spec_json: str) -> int:
    """Entry point of a proxy worker process (started by the agent; not a user command)."""
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    return uvloop.run(_Worker(WorkerSpec.from_json(spec_json)).run())


if __name__ == "__main__":  # a worker process, started by WorkerHandle.spawn
    sys.exit(worker_main(sys.argv[1]))
