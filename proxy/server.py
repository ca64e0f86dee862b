"""The proxy's I/O: listeners, client and upstream connections, timers, drain. The only module that awaits.

Owns sockets (transparent or gateway), backpressure, timeouts and limits, and carries out the actions a
`Session` returns; it never parses bytes or decides a verdict. Each connection runs its callbacks under
one error boundary (`Connection._guard`, and `UdpListener._guard` per peer), which reports through
`Proxy.internal_error`: the traceback is logged with the connection id, an ERROR flow is written,
`membrane_proxy_internal_errors_total` is bumped and only that connection (or UDP peer) is closed.

Rules: reading from one side pauses while the other side's write buffer is above `max_buffer_bytes`
(asyncio's pause_writing/resume_writing), and before the upstream is connected at most
`max_buffer_bytes` are held. One upstream connection per client connection (transparent semantics).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from membrane.parsers.events import Direction, Reason
from membrane.proxy.flows import ERROR, REQUEST, RESPONSE, Flow, FlowContext, FlowSink, L3L4Flow
from membrane.proxy.metrics import Metrics
from membrane.proxy.session import (
    Action,
    Close,
    DatagramSession,
    DataReceived,
    Forward,
    Input,
    Learn,
    Log,
    PeerClosed,
    Reply,
    Session,
    TimedOut,
    TimeoutKind,
    UpstreamFailed,
)

log = logging.getLogger("membrane.proxy")

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT

# Linux values (not all exported by the socket module).
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IP_RECVORIGDSTADDR = getattr(socket, "IP_RECVORIGDSTADDR", 20)
IP_ORIGDSTADDR = IP_RECVORIGDSTADDR
IPV6_TRANSPARENT = 75
IPV6_RECVORIGDSTADDR = 74
SOL_IPV6 = socket.IPPROTO_IPV6

Address = tuple[str, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    """Timeouts and limits; every one is configurable from the command line."""

    header_timeout_s: float = 10.0  # whole request head (nginx client_header_timeout: 60 s; Envoy: none)
    idle_timeout_s: float = 300.0  # nothing moved either way (Envoy's idle_timeout default is 1 h)
    connect_timeout_s: float = 5.0  # upstream TCP connect (Envoy's default)
    dns_timeout_s: float = 5.0  # a forwarded UDP DNS query without an answer gets SERVFAIL
    max_connections: int = 10_000  # per worker; beyond it new connections are closed at once
    max_buffer_bytes: int = 1 << 20  # per direction per connection: write-buffer high-water mark
    drain_timeout_s: float = 10.0  # on SIGTERM: how long in-flight requests may finish
    transparent: bool = False  # IP_TRANSPARENT listeners; upstream = original dst, bound to the client's IP


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionInfo:
    """What the session factory needs to look up policy for one connection or datagram."""

    client: Address  # the peer's address (a pod, in transparent mode)
    original_dst: Address  # getsockname() in transparent mode; the listener's address in gateway mode
    transport: str = "TCP"


SessionFactory = Callable[[ConnectionInfo], Session]
DatagramFactory = Callable[[ConnectionInfo], DatagramSession | None]  # None: dropped at L3/L4
# Carries out a session's `Learn` (toFQDNs). None: done already, go on; an awaitable: the connection
# (or UDP peer) that emitted it holds its later actions until it completes. Must not block.
LearnHook = Callable[[Learn], Awaitable[None] | None]
T = TypeVar("T")


class _Upstream(asyncio.Protocol):
    """The proxy's connection to the server; every callback is forwarded to its `Connection`."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        self.conn.upstream_data(data)

    def eof_received(self) -> bool:
        return self.conn.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.conn.set_client_reading(False, "upstream_buffer")

    def resume_writing(self) -> None:
        self.conn.set_client_reading(True, "upstream_buffer")


class Connection(asyncio.Protocol):
    """One client connection, its upstream connection and its session.

    Every callback reaches the session through `_guard`, the connection's one error boundary: an
    exception anywhere in a step becomes an abort of this connection only, an ERROR flow, a log line
    with the connection id and `proxy_internal_errors_total` (mitmproxy's single dispatch point).
    """

    _ids = itertools.count(1)

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.cid = next(Connection._ids)
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.session: Session | None = None
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.upstream_eof_pending = False
        self.client_eof_sent = False  # write_eof() done on the client: nothing more can be written to it
        self.closed = False
        self.counted = False
        self.last_activity = proxy.clock()
        self.head_started: float | None = None
        self.held: list[Action] | None = None  # actions waiting behind a Learn the proxy's hook is carrying out
        self._client_pauses: set[str] = set()
        self._upstream_pauses: set[str] = set()
        self._connect_task: asyncio.Task[None] | None = None
        self._learn_task: asyncio.Task[None] | None = None

    # --- the error boundary -----------------------------------------------------------------------
    def _guard(self, step: Callable[[T], None], arg: T) -> None:
        """Run one step of this connection; a failure closes this connection only (see the class doc)."""
        try:
            step(arg)
        except Exception:
            self.proxy.internal_error(f"connection {self.cid}", self.session.context if self.session else None)
            self.close(abort=True)

    def _input(self, event: Input) -> None:
        session = self.session
        if session is None or self.closed:
            return
        self.apply(session.handle(event))

    # --- client side ------------------------------------------------------------------------------
    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = self.client = cast(asyncio.Transport, base)  # uvloop's transports are not subclasses
        proxy = self.proxy
        if proxy.draining or len(proxy.connections) >= proxy.config.max_connections:
            proxy.metrics.connections_rejected.inc("draining" if proxy.draining else "max_connections")
            self.closed = True
            transport.abort()
            return
        self.counted = True
        proxy.connections.add(self)
        proxy.metrics.connections.inc("tcp")
        proxy.metrics.active_connections.set(len(proxy.connections))
        self._guard(self._open, transport)

    def _open(self, transport: asyncio.Transport) -> None:
        proxy = self.proxy
        _set_nodelay(transport)
        transport.set_write_buffer_limits(high=proxy.config.max_buffer_bytes)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        info = ConnectionInfo(client=(peer[0], peer[1]), original_dst=(local[0], local[1]))
        self.session = proxy.factory(info)
        if self.session.reading_head:
            self.head_started = self.last_activity
        self.apply(self.session.start())
        if not self.closed:
            upstream = proxy.upstream or info.original_dst
            task = self._connect_task = asyncio.get_running_loop().create_task(self._connect(info.client, upstream))
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            self._guard(_result, task)

    def data_received(self, data: bytes) -> None:
        self._guard(self._client_data, data)

    def _client_data(self, data: bytes) -> None:
        session = self.session
        if session is None or self.closed:
            return
        self.last_activity = now = self.proxy.clock()
        self.apply(session.handle(DataReceived(C2S, data)))
        delegate = session.delegate
        if delegate is not None:  # the protocol is known: talk to its session directly from now on
            self.session = session = delegate
        if session.reading_head:
            if self.head_started is None:
                self.head_started = now
        else:
            self.head_started = None

    def eof_received(self) -> bool:
        self._guard(self._input, PeerClosed(C2S))
        return not self.closed  # keep our sending side open until the session closes it

    def connection_lost(self, exc: Exception | None) -> None:
        self._teardown()

    def pause_writing(self) -> None:
        self.set_upstream_reading(False, "client_buffer")

    def resume_writing(self) -> None:
        self.set_upstream_reading(True, "client_buffer")

    # --- upstream side ----------------------------------------------------------------------------
    async def _connect(self, client: Address, upstream: Address) -> None:
        """Connect upstream; an expected failure (refused, unreachable, timeout) is the session's input.
        Anything else propagates to `_task_done`, inside the error boundary."""
        loop = asyncio.get_running_loop()
        config = self.proxy.config
        try:
            if config.transparent:
                sock = _transparent_upstream_socket(client[0], upstream[0])
                try:
                    await asyncio.wait_for(loop.sock_connect(sock, upstream), config.connect_timeout_s)
                except BaseException:
                    sock.close()
                    raise
                transport, _ = await loop.create_connection(lambda: _Upstream(self), sock=sock)
            else:
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(lambda: _Upstream(self), upstream[0], upstream[1]),
                    config.connect_timeout_s,
                )
        except TimeoutError:
            self._upstream_failed(Reason.UPSTREAM_TIMEOUT, "timeout")
            return
        except OSError as e:
            self._upstream_failed(Reason.UPSTREAM_FAILED, errno.errorcode.get(e.errno or 0, "oserror"))
            return
        self._connected(transport)

    def _connected(self, transport: asyncio.Transport) -> None:
        if self.closed:
            transport.close()
            return
        self.upstream = transport
        _set_nodelay(transport)
        transport.set_write_buffer_limits(high=self.proxy.config.max_buffer_bytes)
        if self.pending:
            transport.writelines(self.pending)
            self.pending.clear()
            self.pending_bytes = 0
        if self.upstream_eof_pending and transport.can_write_eof():
            transport.write_eof()
        self.set_client_reading(True, "pending")
        if self._upstream_pauses:
            transport.pause_reading()

    def _upstream_failed(self, reason: Reason, label: str) -> None:
        self.proxy.metrics.upstream_failures.inc(label)
        self._input(UpstreamFailed(reason))

    def upstream_data(self, data: bytes) -> None:
        self.last_activity = self.proxy.clock()
        self._guard(self._input, DataReceived(S2C, data))

    def upstream_eof(self) -> bool:
        self._guard(self._input, PeerClosed(S2C))
        return not self.closed

    def upstream_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            # A reset from the upstream: the client sees its connection end too.
            self.close(abort=exc is not None)

    # --- actions ----------------------------------------------------------------------------------
    def apply(self, actions: list[Action]) -> None:
        """Carry out a session's actions in order.

        Consecutive bytes for the same peer are joined into one write: a socket call costs more than
        the copy (a response head and its body leave in one segment, as HAProxy sends them). A `Learn`
        that the proxy's hook must wait for holds every later action of this connection (reading both
        ways pauses) until the hook is done; other connections go on meanwhile.
        """
        if self.held is not None:
            self.held.extend(actions)
            return
        up: list[bytes] = []
        down: list[bytes] = []
        for i, action in enumerate(actions):
            kind = type(action)
            if kind is Forward:
                (up if action.direction is C2S else down).append(action.data)  # type: ignore[union-attr]
            elif kind is Reply:
                down.append(action.data)  # type: ignore[union-attr]
            elif kind is Log:
                self.proxy.record(action)  # type: ignore[arg-type]
            elif kind is Learn:
                waiting = self.proxy.learning(action)  # type: ignore[arg-type]
                if waiting is not None:
                    self._flush(up, down)
                    self._hold(waiting, actions[i + 1 :])
                    return
            elif kind is Close:
                self._flush(up, down)
                up, down = [], []
                direction = action.direction  # type: ignore[union-attr]
                if direction is None:
                    self.close()
                    return
                if direction is C2S:
                    if self.upstream is None:
                        self.upstream_eof_pending = True
                    elif self.upstream.can_write_eof():
                        self.upstream.write_eof()
                elif self.client is not None and self.client.can_write_eof():
                    self.client.write_eof()
                    self.client_eof_sent = True
        if up or down:
            self._flush(up, down)

    def _hold(self, waiting: Awaitable[None], rest: list[Action]) -> None:
        self.held = list(rest)
        self.set_client_reading(False, "learn")
        self.set_upstream_reading(False, "learn")
        task = self._learn_task = asyncio.get_running_loop().create_task(self._release(waiting))
        task.add_done_callback(self._task_done)

    async def _release(self, waiting: Awaitable[None]) -> None:
        # A hook that fails raises into the error boundary (`_task_done`): the held answer is never
        # released, since the kernel may not know its IPs (fail closed; the client retries).
        await waiting
        held, self.held = self.held or [], None
        self.set_client_reading(True, "learn")
        self.set_upstream_reading(True, "learn")
        if not self.closed:
            self.apply(held)

    def _flush(self, up: list[bytes], down: list[bytes]) -> None:
        if up:
            self._to_upstream(up[0] if len(up) == 1 else b"".join(up))
        if down and self.client is not None and not self.client.is_closing() and not self.client_eof_sent:
            self.client.write(down[0] if len(down) == 1 else b"".join(down))

    def _to_upstream(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes > self.proxy.config.max_buffer_bytes:
            self.set_client_reading(False, "pending")

    def set_client_reading(self, on: bool, why: str) -> None:
        _set_reading(self.client, self._client_pauses, on, why)

    def set_upstream_reading(self, on: bool, why: str) -> None:
        _set_reading(self.upstream, self._upstream_pauses, on, why)
        if not on and self.upstream is None:
            self._upstream_pauses.add(why)

    def timeout(self, kind: TimeoutKind) -> None:
        if self.session is None or self.closed:
            return
        self.proxy.metrics.timeouts.inc(kind.value)
        self._guard(self._input, TimedOut(kind))

    def close(self, abort: bool = False) -> None:
        """End both connections (flushing what is buffered unless `abort`)."""
        if self.closed:
            return
        self.closed = True
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        for transport in (self.client, self.upstream):
            if transport is not None and not transport.is_closing():
                if abort:
                    transport.abort()
                else:
                    transport.close()
        self._teardown()

    def _teardown(self) -> None:
        if not self.closed:
            self.close()
            return
        if self.counted:
            self.counted = False
            self.proxy.connections.discard(self)
            self.proxy.metrics.active_connections.set(len(self.proxy.connections))
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.close()


def _result(task: asyncio.Task[None]) -> None:
    task.result()  # re-raises the task's exception inside the caller's error boundary


def _set_nodelay(transport: asyncio.Transport) -> None:
    """Small writes (HTTP/2 frames, refusals) must not wait for Nagle's algorithm."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _set_reading(transport: asyncio.Transport | None, pauses: set[str], on: bool, why: str) -> None:
    if on:
        if why not in pauses:
            return
        pauses.discard(why)
        if not pauses and transport is not None and not transport.is_closing():
            transport.resume_reading()
    else:
        if why in pauses:
            return
        pauses.add(why)
        if len(pauses) == 1 and transport is not None and not transport.is_closing():
            transport.pause_reading()


def _transparent_upstream_socket(client_ip: str, upstream_ip: str) -> socket.socket:
    """A socket bound to the client's own IP (source preserved), ready to connect to the original destination."""
    family = socket.AF_INET6 if ":" in upstream_ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((client_ip, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listening_socket(
    host: str, port: int, *, udp: bool = False, transparent: bool = False, reuse_port: bool = True, backlog: int = 1024
) -> socket.socket:
    """A bound (and, for TCP, listening) socket with SO_REUSEPORT so that workers can share the port.

    Raises OSError if the address cannot be bound (or IP_TRANSPARENT is not permitted).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            if family == socket.AF_INET6:
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        if udp and transparent:
            if family == socket.AF_INET6:
                sock.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        if not udp:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        if not udp:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def parse_origdst(ancdata: list[tuple[int, int, bytes]]) -> Address | None:
    """The original destination from IP_ORIGDSTADDR / IPV6_ORIGDSTADDR control data, if present."""
    for level, kind, data in ancdata:
        if level == socket.SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            port = struct.unpack("!H", data[2:4])[0]
            return socket.inet_ntop(socket.AF_INET, data[4:8]), port
        if level == SOL_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            port = struct.unpack("!H", data[2:4])[0]
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    return None


_CODES: dict[int, str] = {}


def _code_text(code: Any) -> str:
    """A status code as a label value, interned (no formatting per request)."""
    if not isinstance(code, int):
        return str(code)
    text = _CODES.get(code)
    if text is None:
        text = _CODES[code] = str(code) if len(_CODES) < 1000 else "other"
    return text


@dataclass
class Proxy:
    """One worker's listeners and connections."""

    config: ProxyConfig
    factory: SessionFactory
    upstream: Address | None  # gateway mode: the fixed upstream; None in transparent mode
    flows: FlowSink = field(default_factory=FlowSink)
    metrics: Metrics = field(default_factory=Metrics)
    datagram_factory: DatagramFactory | None = None
    learn: LearnHook | None = None  # None: Learn actions are ignored (the gateway compiles its policy once)
    clock: Callable[[], float] = time.monotonic  # seconds; timeouts and drain read it (tests inject their own)

    def __post_init__(self) -> None:
        self.connections: set[Connection] = set()
        self.draining = False
        self._servers: list[asyncio.AbstractServer] = []
        self._udp: list[UdpListener] = []
        self._sweeper: asyncio.Task[None] | None = None

    def learning(self, action: Learn) -> Awaitable[None] | None:
        """Hand a session's Learn to the hook. Returns what the emitting connection must wait for, or None."""
        return self.learn(action) if self.learn is not None else None

    def internal_error(self, what: str, context: FlowContext | None) -> None:
        """The one report of a failure inside the proxy: log with the traceback, count it, and an ERROR flow.
        Called from the error boundaries (`Connection._guard`, `UdpListener._guard`) only."""
        log.exception("internal error on %s; closing it", what)
        self.metrics.internal_errors.inc()
        if context is not None:
            with contextlib.suppress(Exception):  # the report must not fail the boundary itself
                self.flows.emit(
                    L3L4Flow(context=context, verdict=ERROR, l7_type=REQUEST, l7={}, summary=f"internal error on {what}",
                             time_ns=time.time_ns(), reason="internal_error")
                )

    def record(self, action: Log) -> None:
        flow = action.flow
        if flow.l7_type == REQUEST:
            protocol = flow.context.transport.lower() if not flow.l7 else next(iter(flow.l7))
            self.metrics.requests.inc(protocol, flow.verdict)
            if flow.reason in ("malformed", "too_large"):
                self.metrics.parse_errors.inc(protocol, flow.reason)
            if flow.limit is not None:
                self.metrics.limits_exceeded.inc(protocol, flow.limit)
                source = flow.context.source
                log.warning("%s limit %s crossed by %s:%d: %s", protocol, flow.limit, source.ip, source.port,
                            flow.summary)
        elif flow.l7_type == RESPONSE and flow.latency_ns:
            self.metrics.request_duration.observe(flow.latency_ns / 1e9, next(iter(flow.l7), "tcp"))
        if flow.l7:
            self._count_l7(flow)
        self.flows.emit(flow)

    def _count_l7(self, flow: Flow) -> None:
        """The workload-labelled L7 families: plain dict increments; the label tuple is made once per connection."""
        metrics = self.metrics
        context = flow.context
        cached = context.metric_labels
        workloads = cached[0] if cached else None
        if workloads is None:
            workloads = metrics.workloads(context.source, context.destination)
            cached.append(workloads)
        protocol, body = next(iter(flow.l7.items()))
        if flow.l7_type == REQUEST:
            method = body.get("method", "") if protocol == "http" else ""
            metrics.l7_requests.inc(protocol, flow.verdict, method, *workloads)
            if protocol == "dns":
                for qtype in body.get("qtypes") or ("",):
                    metrics.dns_queries.inc(flow.verdict, qtype)
        elif flow.l7_type == RESPONSE:
            if protocol == "http":
                code = _code_text(body.get("code", 0))
            elif protocol == "dns":
                rcode = body.get("rcode")
                code = metrics.dns_rcode(rcode) if isinstance(rcode, int) else ""
                for qtype in body.get("qtypes") or ("",):
                    metrics.dns_responses.inc(code, qtype)
            else:
                code = _code_text(body.get("error_code", 0)) if protocol == "kafka" else ""
            metrics.l7_responses.inc(protocol, code, *workloads)

    async def start(self, tcp_sockets: Iterable[socket.socket], udp_sockets: Iterable[socket.socket] = ()) -> None:
        loop = asyncio.get_running_loop()
        # Flow lines are written once per loop pass (after the reads it handled), not once per record.
        self.flows.defer_writes(loop.call_soon)
        for sock in tcp_sockets:
            self._servers.append(await loop.create_server(lambda: Connection(self), sock=sock, backlog=1024))
        for sock in udp_sockets:
            if self.datagram_factory is None:
                raise ValueError("a UDP listener needs a datagram factory")
            listener = UdpListener(self, sock, self.datagram_factory)
            listener.start()
            self._udp.append(listener)
        self._sweeper = loop.create_task(self._sweep())

    def _tick_s(self) -> float:
        c = self.config
        return max(0.02, min(1.0, c.header_timeout_s / 4, c.idle_timeout_s / 4))

    async def _sweep(self) -> None:
        """One timer per worker: header, idle and drain deadlines are checked here, not per connection."""
        config = self.config
        tick = self._tick_s()
        while True:
            await asyncio.sleep(tick)
            now = self.clock()
            for listener in self._udp:
                listener.sweep()
            for conn in list(self.connections):
                session = conn.session
                if conn.closed or session is None:
                    continue
                if self.draining and session.is_idle:
                    conn.timeout(TimeoutKind.DRAIN)
                elif conn.head_started is not None and now - conn.head_started > config.header_timeout_s:
                    conn.timeout(TimeoutKind.HEADER)
                elif now - conn.last_activity > config.idle_timeout_s:
                    conn.timeout(TimeoutKind.IDLE)

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish (up to drain_timeout_s), then close everything."""
        self.draining = True
        for server in self._servers:
            server.close()
        deadline = self.clock() + self.config.drain_timeout_s
        while (self.connections or any(u.has_outstanding for u in self._udp)) and self.clock() < deadline:
            for conn in list(self.connections):
                if conn.session is not None and conn.session.is_idle:
                    conn.timeout(TimeoutKind.DRAIN)
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.close()
        for listener in self._udp:
            listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self.flows.close()


@dataclass(eq=False)
class _UdpPeer:
    """One (client address, original destination) pair: its session and its connected upstream socket."""

    client: Address
    original_dst: Address
    session: DatagramSession
    upstream: socket.socket | None = None
    held: list[Action] | None = None  # actions waiting behind a Learn (see Connection.apply)


class UdpListener:
    """A UDP listener (DNS): datagrams read with recvmsg (for IP_ORIGDSTADDR), one upstream socket per peer pair.

    In transparent mode each reply leaves from a transparent socket bound to the original
    destination, so the client sees the answer come from the server it asked; the upstream socket
    is bound to the client's own IP. In gateway mode replies leave from the listener itself.
    """

    MAX_DATAGRAM = 65535
    BATCH = 64  # datagrams per wakeup, so one busy client cannot starve the loop

    def __init__(self, proxy: Proxy, sock: socket.socket, factory: DatagramFactory) -> None:
        self.proxy = proxy
        self.sock = sock
        self.factory = factory
        self.peers: dict[tuple[Address, Address], _UdpPeer] = {}
        self._reply_socks: dict[Address, socket.socket] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # held answers waiting for a Learn (strong references)
        self._loop = asyncio.get_running_loop()
        self._closed = False

    @property
    def has_outstanding(self) -> bool:
        return any(p.session.has_outstanding for p in self.peers.values())

    def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(self.BATCH):
            try:
                data, ancdata, _flags, addr = self.sock.recvmsg(self.MAX_DATAGRAM, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                log.exception("UDP listener receive failed")
                return
            self._guard(None, self._datagram, (data, ancdata, (addr[0], addr[1])))

    def _guard(self, peer: _UdpPeer | None, step: Callable[[T], None], arg: T) -> None:
        """The UDP error boundary: a failure forgets that peer only (its sockets closed) and is reported once."""
        try:
            step(arg)
        except Exception:
            context = getattr(peer.session, "context", None) if peer is not None else None
            what = f"UDP peer {peer.client[0]}:{peer.client[1]}" if peer is not None else "a UDP datagram"
            self.proxy.internal_error(what, context)
            if peer is not None:
                self._forget((peer.client, peer.original_dst), peer)

    def _datagram(self, item: tuple[bytes, list[tuple[int, int, bytes]], Address]) -> None:
        data, ancdata, client = item
        if self.proxy.draining:
            return
        local = self.sock.getsockname()
        original_dst = (parse_origdst(ancdata) if self.proxy.config.transparent else None) or (local[0], local[1])
        key = (client, original_dst)
        peer = self.peers.get(key)
        if peer is None:
            session = self.factory(ConnectionInfo(client=client, original_dst=original_dst, transport="UDP"))
            if session is None:
                self.proxy.metrics.connections_rejected.inc("udp_denied")
                return
            peer = _UdpPeer(client=client, original_dst=original_dst, session=session)
            self.peers[key] = peer
            self.proxy.metrics.connections.inc("udp")
        self._guard(peer, lambda d: self._apply(peer, peer.session.on_query(d)), data)

    def _upstream(self, peer: _UdpPeer) -> socket.socket | None:
        if peer.upstream is not None:
            return peer.upstream
        target = self.proxy.upstream or peer.original_dst
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if self.proxy.config.transparent:
                if family == socket.AF_INET6:
                    sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
                else:
                    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                sock.bind((peer.client[0], 0))
            sock.setblocking(False)
            sock.connect(target)
        except OSError:
            sock.close()
            self.proxy.metrics.upstream_failures.inc("udp")
            self._apply(peer, peer.session.on_upstream_failed(Reason.UPSTREAM_FAILED))
            return None
        peer.upstream = sock
        self._loop.add_reader(sock.fileno(), self._answers, peer)
        return sock

    def _answers(self, peer: _UdpPeer) -> None:
        sock = peer.upstream
        if sock is None:
            return
        for _ in range(self.BATCH):
            try:
                data = sock.recv(self.MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNREFUSED from an ICMP port unreachable: the upstream is not there
                self.proxy.metrics.upstream_failures.inc("udp")
                self._guard(peer, lambda r: self._apply(peer, peer.session.on_upstream_failed(r)), Reason.UPSTREAM_FAILED)
                return
            self._guard(peer, lambda d: self._apply(peer, peer.session.on_answer(d)), data)
            if peer.upstream is None:  # forgotten by the boundary
                return

    def _reply_socket(self, peer: _UdpPeer) -> socket.socket:
        if not self.proxy.config.transparent:
            return self.sock
        sock = self._reply_socks.get(peer.original_dst)
        if sock is None:
            family = socket.AF_INET6 if ":" in peer.original_dst[0] else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(peer.original_dst)
            sock.setblocking(False)
            self._reply_socks[peer.original_dst] = sock
        return sock

    def _apply(self, peer: _UdpPeer, actions: list[Action]) -> None:
        if peer.held is not None:
            peer.held.extend(actions)
            return
        for i, action in enumerate(actions):
            if type(action) is Learn:
                assert isinstance(action, Learn)
                waiting = self.proxy.learning(action)
                if waiting is not None:
                    peer.held = list(actions[i + 1 :])
                    task = self._loop.create_task(self._release(peer, waiting))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    task.add_done_callback(lambda t: None if t.cancelled() else self._guard(peer, _result, t))
                    return
                continue
            if type(action) is Forward:
                assert isinstance(action, Forward)
                if action.direction is C2S:
                    sock = self._upstream(peer)
                    if sock is not None:
                        with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                            sock.send(action.data)
                    continue
                data = action.data
            elif type(action) is Reply:
                assert isinstance(action, Reply)
                data = action.data
            elif type(action) is Log:
                assert isinstance(action, Log)
                self.proxy.record(action)
                continue
            else:
                continue
            with contextlib.suppress(BlockingIOError):
                self._reply_socket(peer).sendto(data, peer.client)

    async def _release(self, peer: _UdpPeer, waiting: Awaitable[None]) -> None:
        await waiting  # a failure reaches the boundary through the done callback: the answer stays held
        held, peer.held = peer.held or [], None
        if self.peers.get((peer.client, peer.original_dst)) is peer:
            self._apply(peer, held)

    def sweep(self) -> None:
        """SERVFAIL for unanswered queries past dns_timeout_s; forget peers idle for idle_timeout_s."""
        config = self.proxy.config
        timeout_ns = int(config.dns_timeout_s * 1e9)
        idle_ns = int(min(config.idle_timeout_s, 60.0) * 1e9)
        now = time.time_ns()
        for key, peer in list(self.peers.items()):
            self._guard(peer, functools.partial(self._expire, peer), timeout_ns)
            if not peer.session.has_outstanding and now - peer.session.last_activity_ns > idle_ns:
                self._forget(key, peer)

    def _expire(self, peer: _UdpPeer, timeout_ns: int) -> None:
        self._apply(peer, peer.session.expire(timeout_ns))

    def _forget(self, key: tuple[Address, Address], peer: _UdpPeer) -> None:
        self.peers.pop(key, None)
        if peer.upstream is not None:
            self._loop.remove_reader(peer.upstream.fileno())
            peer.upstream.close()
            peer.upstream = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self.sock.fileno())
        for key, peer in list(self.peers.items()):
            self._forget(key, peer)
        for sock in self._reply_socks.values():
            sock.close()
        self.sock.close()
