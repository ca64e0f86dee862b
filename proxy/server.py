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
import fcntl
import functools
import itertools
import logging
import random
import socket
import struct
import termios
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from membrane.parsers.events import Direction, Reason
from membrane.proxy.flows import ERROR, REQUEST, FlowContext, FlowSink, L3L4Flow
from membrane.proxy.metrics import Metrics
from membrane.proxy.relay import record, route
from membrane.proxy.session import (
    Action,
    Close,
    DatagramSession,
    DataReceived,
    Forward,
    Input,
    Learn,
    Log,
    PauseReading,
    PeerClosed,
    Reply,
    ResumeReading,
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

# A pod-facing socket the proxy closes first waits this long for the client to acknowledge every byte
# before it is reset (see `_close_client`); a client that has not acknowledged by then gets a FIN.
CLIENT_ACK_WAIT_S = 2.0

# Draining closes idle connections, but one accepted just before the listeners stopped (a hand-over) has its
# first request on the way: it is given this long to arrive and be served instead of a reset.
DRAIN_FIRST_REQUEST_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    """Timeouts and limits; every one is configurable from the command line."""

    header_timeout_s: float = 10.0  # whole request head (nginx client_header_timeout: 60 s; Envoy: none)
    idle_timeout_s: float = 300.0  # nothing moved either way (Envoy's idle_timeout default is 1 h)
    connect_timeout_s: float = 5.0  # upstream TCP connect (Envoy's default)
    dns_timeout_s: float = 5.0  # a forwarded UDP DNS query without an answer gets SERVFAIL
    # A forwarded request whose response has not started after this long gets 504 (HTTP) or SERVFAIL
    # (DNS over TCP) and the connection is closed; 0 turns it off. Envoy's route timeout default.
    upstream_timeout_s: float = 15.0
    max_connections: int = 10_000  # per worker; beyond it new connections are closed at once
    # per worker and client IP (a pod): one client opening thousands of connections cannot take every
    # slot from the others. 0 = a quarter of max_connections (all of it up to 64).
    max_connections_per_client: int = 0
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
        self.upstream_eof_sent = False  # the client half-closed and the upstream was told: nothing more goes up
        self.client_eof = False  # the client sent FIN
        self.upstream_eof_seen = False  # the upstream sent FIN: our EOF to the client may carry meaning
        self.awaiting_since: float | None = None  # when the sweep first saw a request waiting for its response
        self.info: ConnectionInfo | None = None
        self.client_ip = ""
        self.client_eof_sent = False  # write_eof() done on the client: nothing more can be written to it
        self.closed = False
        self.counted = False
        self.last_activity = self.accepted_at = proxy.clock()
        self.client_spoke = False  # the client has sent bytes (drain: a silent new connection gets a grace)
        self.head_started: float | None = None
        self.held: list[Action] | None = None  # actions waiting behind a Learn the proxy's hook is carrying out
        self._client_pauses: set[str] = set()
        self._upstream_pauses: set[str] = set()
        self._connect_task: asyncio.Task[None] | None = None
        self._learn_task: asyncio.Task[None] | None = None

    # --- the error boundary -----------------------------------------------------------------------
    def _guard(self, step: Callable[[T], None], arg: T) -> None:
        """Run one step of this connection; a failure closes this connection only (see the class doc). The two
        read callbacks (`data_received`, `upstream_data`) write the same boundary out inline."""
        try:
            step(arg)
        except Exception:
            self._failed()

    def _failed(self) -> None:
        """Called in an `except` clause of the boundary: report the exception being handled, abort this connection."""
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
            self._abort_client(transport)
            return
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        per_client = proxy.per_client
        if per_client.get(self.client_ip, 0) >= proxy.client_limit:
            proxy.metrics.connections_rejected.inc("max_connections_per_client")
            proxy.client_limit_hit(self.client_ip, "connections", proxy.client_limit)
            self.closed = True
            self._abort_client(transport)
            self._refused_flow(peer, transport.get_extra_info("sockname"), "max_connections_per_client")
            return
        per_client[self.client_ip] = per_client.get(self.client_ip, 0) + 1
        self.counted = True
        proxy.connections.add(self)
        proxy.metrics.connections.inc("tcp")
        proxy.metrics.active_connections.set(len(proxy.connections))
        self._guard(self._open, transport)

    def _refused_flow(self, peer: Any, local: Any, reason: str) -> None:
        """The ERROR flow of a connection refused at accept for a limit (who, to where, which limit)."""
        if not peer or not local:
            return
        info = ConnectionInfo(client=(peer[0], peer[1]), original_dst=(local[0], local[1]))
        try:
            context = self.proxy.factory(info).context
        except Exception:  # the refusal stands; only its record is lost
            return
        self.proxy.flows.emit(L3L4Flow(context=context, verdict=ERROR, l7_type=REQUEST, l7={},
                                       summary=f"TCP connection refused at accept: {reason}", time_ns=time.time_ns(),
                                       reason=reason))

    def _open(self, transport: asyncio.Transport) -> None:
        proxy = self.proxy
        _set_nodelay(transport)
        transport.set_write_buffer_limits(high=proxy.config.max_buffer_bytes)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        info = ConnectionInfo(client=(peer[0], peer[1]), original_dst=(local[0], local[1]))
        self.info = info
        self.session = proxy.factory(info)
        if self.session.reading_head:
            self.head_started = self.last_activity
        self.apply(self.session.start())
        if not self.closed and not self.session.client_speaks_first:
            self._start_connect()

    def _start_connect(self) -> None:
        """Open the upstream connection: at once for a relay, at the first forwarded bytes when the
        client speaks first (an idle or slowloris client then costs one descriptor, not two)."""
        if self._connect_task is not None or self.closed or self.info is None:
            return
        upstream = self.proxy.upstream or self.info.original_dst
        task = self._connect_task = asyncio.get_running_loop().create_task(self._connect(self.info.client, upstream))
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            self._guard(_result, task)

    def data_received(self, data: bytes) -> None:
        # The error boundary of `_guard`, written out: this runs for every read of every connection.
        try:
            session = self.session
            if session is None or self.closed:
                return
            self.last_activity = now = self.proxy.clock()
            self.client_spoke = True
            self.apply(session.handle(DataReceived(C2S, data)))
            delegate = session.delegate
            if delegate is not None:  # the protocol is known: talk to its session directly from now on
                self.session = session = delegate
            if session.reading_head:
                if self.head_started is None:
                    self.head_started = now
            else:
                self.head_started = None
        except Exception:
            self._failed()

    def eof_received(self) -> bool:
        self.client_eof = True
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
            if e.errno in (errno.EMFILE, errno.ENFILE):
                self.proxy.out_of_descriptors("an upstream connection", e)
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
        self.awaiting_since = None
        try:  # `_guard(self._input, ...)` written out: this runs for every read of every upstream
            session = self.session
            if session is not None and not self.closed:
                self.apply(session.handle(DataReceived(S2C, data)))
        except Exception:
            self._failed()

    def upstream_eof(self) -> bool:
        self.upstream_eof_seen = True
        self._guard(self._input, PeerClosed(S2C))
        return not self.closed

    def upstream_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            # A reset from the upstream: the client sees its connection end too.
            self.close(abort=exc is not None)

    # --- actions ----------------------------------------------------------------------------------
    def apply(self, actions: list[Action]) -> None:
        """Carry out a session's actions in order.

        Records and bytes go through `relay.route` (compiled): consecutive bytes for the same peer are
        joined into one write, since a socket call costs more than the copy (a response head and its body
        leave in one segment, as HAProxy sends them). A `Learn` that the proxy's hook must wait for holds
        every later action of this connection (reading both ways pauses) until the hook is done; other
        connections go on meanwhile.
        """
        if self.held is not None:
            self.held.extend(actions)
            return
        proxy = self.proxy
        up, down, i = route(actions, 0, proxy.metrics, proxy.flows)
        if up is not None:
            self._to_upstream(up)
        if down is not None:
            self._to_client(down)
        n = len(actions)
        while i < n:
            action = actions[i]
            i += 1
            kind = type(action)
            if kind is Learn:
                waiting = proxy.learning(action)  # type: ignore[arg-type]
                if waiting is not None:
                    self._hold(waiting, actions[i:])
                    return
            elif kind is PauseReading or kind is ResumeReading:
                on = kind is ResumeReading
                if action.direction is C2S:  # type: ignore[union-attr]
                    self.set_client_reading(on, "session")
                else:
                    self.set_upstream_reading(on, "session")
            elif kind is Close:
                direction = action.direction  # type: ignore[union-attr]
                if direction is None:
                    self.close()
                    return
                if direction is C2S:
                    if self.upstream is None and self._connect_task is None:
                        # The client is done before anything went upstream: no upstream to tell, nothing owed.
                        self.close()
                        return
                    self.upstream_eof_sent = True
                    if self.upstream is None:
                        self.upstream_eof_pending = True
                    elif self.upstream.can_write_eof():
                        self.upstream.write_eof()
                elif self.client is not None and self.client.can_write_eof():
                    self.client.write_eof()
                    self.client_eof_sent = True
            up, down, i = route(actions, i, proxy.metrics, proxy.flows)
            if up is not None:
                self._to_upstream(up)
            if down is not None:
                self._to_client(down)

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

    def _to_client(self, data: bytes) -> None:
        client = self.client
        if client is not None and not self.client_eof_sent and not client.is_closing():
            client.write(data)

    def _to_upstream(self, data: bytes) -> None:
        if self.upstream_eof_sent:
            # The upstream was told the client is done (write_eof): protocol chatter after it (an HTTP/2
            # SETTINGS ACK or WINDOW_UPDATE) has nowhere to go. Dropped, never written after the EOF.
            return
        if self.upstream is not None:
            self.upstream.write(data)
            return
        if self._connect_task is None:
            self._start_connect()
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

    def drain_may_close(self, now: float) -> bool:
        """While draining, an idle connection closes at once, unless it is new and silent: its first request
        may be on the way (accepted just before the listeners stopped), so it gets DRAIN_FIRST_REQUEST_S."""
        return self.client_spoke or now - self.accepted_at >= DRAIN_FIRST_REQUEST_S

    def timeout(self, kind: TimeoutKind) -> None:
        if self.session is None or self.closed:
            return
        self.proxy.metrics.timeouts.inc(kind.value)
        if kind is TimeoutKind.UPSTREAM:
            # The upstream took too long to start answering: 504 (HTTP) / SERVFAIL (DNS), then close.
            info = self.info
            log.warning("upstream %s did not answer connection %d within %.0f s; answering 504/SERVFAIL and closing",
                        f"{info.original_dst[0]}:{info.original_dst[1]}" if info is not None else "?", self.cid,
                        self.proxy.config.upstream_timeout_s)
            self._guard(self._input, UpstreamFailed(Reason.UPSTREAM_TIMEOUT))
            return
        self._guard(self._input, TimedOut(kind))

    def close(self, abort: bool = False) -> None:
        """End both connections (flushing what is buffered unless `abort`)."""
        if self.closed:
            return
        self.closed = True
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        client, upstream = self.client, self.upstream
        if client is not None and not client.is_closing():
            if abort:
                self._abort_client(client)
            else:
                self._close_client(client)
        if upstream is not None and not upstream.is_closing():
            if abort:
                upstream.abort()
            else:
                upstream.close()
        self._teardown()

    # --- closing the client leg without TIME_WAIT -------------------------------------------------
    # In transparent mode the accepted socket carries the pod's own tuple (server:port, pod:port). The
    # side that closes first keeps a TIME_WAIT socket for 60 s; in the host namespace it has that
    # tuple, and when the pod reuses the source port the kernel finds it when the new SYN (steered to
    # our listener with bpf_sk_assign) creates its request socket: the SYN is dropped, the client's
    # connect times out. A server closing first would have taken the SYN over from its TIME_WAIT
    # socket (it has a listener on that address); the steered SYN cannot. So the proxy never leaves
    # TIME_WAIT behind on a pod-facing socket unless the close itself carries meaning (docs/design.md).

    def _abort_client(self, transport: asyncio.Transport) -> None:
        if self.proxy.config.transparent:
            _reset(transport)
        else:
            transport.abort()

    def _close_client(self, transport: asyncio.Transport) -> None:
        """Close the client leg, flushing what is buffered.

        Transparent mode: once the client has acknowledged every byte it is reset (SO_LINGER 0): no
        TIME_WAIT, and the client, which has everything in its receive queue, reads it all before
        the reset shows. A FIN is sent instead when the client already sent its own (a passive close
        leaves no TIME_WAIT) or the upstream closed first and its EOF means something (it may delimit
        the last response or relay the server's end of a stream: it must arrive as EOF; an HTTP/1
        upstream closing between framed responses does not, `Session.upstream_eof_delimits`). While it waits, a client FIN
        closes it normally (`eof_received` returns False once the connection is closed); later
        client bytes are dropped.
        """
        session = self.session
        delimits = self.upstream_eof_seen and (session is None or session.upstream_eof_delimits)
        if not self.proxy.config.transparent or self.client_eof or delimits:
            transport.close()
            return
        loop = asyncio.get_running_loop()
        _reset_when_acked(transport, loop, loop.time() + CLIENT_ACK_WAIT_S, 0.001)

    def _teardown(self) -> None:
        if not self.closed:
            self.close()
            return
        if self.counted:
            self.counted = False
            self.proxy.connections.discard(self)
            per_client = self.proxy.per_client
            left = per_client.get(self.client_ip, 1) - 1
            if left > 0:
                per_client[self.client_ip] = left
            else:
                per_client.pop(self.client_ip, None)
            self.proxy.metrics.active_connections.set(len(self.proxy.connections))
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.close()


def _random_id() -> bytes:
    """A random 16-bit DNS message ID, as its 2 bytes (what the upstream echoes)."""
    return random.randbytes(2)


def _result(task: asyncio.Task[None]) -> None:
    task.result()  # re-raises the task's exception inside the caller's error boundary


def _reset(transport: asyncio.Transport) -> None:
    """Close with an RST (SO_LINGER on, 0 s), discarding what is unsent: no TIME_WAIT socket is left."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _unacknowledged(transport: asyncio.Transport) -> int:
    """Bytes buffered in the transport plus those the kernel sent or holds that the peer has not acknowledged."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return transport.get_write_buffer_size()
    try:
        out = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]  # SIOCOUTQ
    except OSError:
        return 0  # the socket is gone
    return transport.get_write_buffer_size() + int(out)


def _reset_when_acked(transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, deadline: float, delay: float) -> None:
    """Reset `transport` once the peer acknowledged every byte; FIN if that takes past `deadline`."""
    if transport.is_closing():
        return  # the client's FIN closed it meanwhile (passive close), or it was lost
    if _unacknowledged(transport) == 0:
        _reset(transport)
    elif loop.time() >= deadline:
        transport.close()  # a client that does not acknowledge: an ordinary close, TIME_WAIT and all
    else:
        loop.call_later(delay, _reset_when_acked, transport, loop, deadline, min(delay * 2, 0.1))


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
        self._logged_at: dict[str, float] = {}  # rate-limited log lines: kind -> when last written
        self.per_client: dict[str, int] = {}  # open connections by client IP
        configured = self.config.max_connections_per_client
        most = self.config.max_connections
        self.client_limit = configured if configured > 0 else max(most // 4, min(most, 64))

    def _due_log(self, kind: str, every_s: float = 10.0) -> bool:
        """True (and noted) when a rate-limited log line of `kind` may be written now."""
        now = self.clock()
        if now - self._logged_at.get(kind, -1e9) < every_s:
            return False
        self._logged_at[kind] = now
        return True

    def client_limit_hit(self, client_ip: str, what: str, limit: int) -> None:
        """One client IP holds its share of connections or UDP peers: more are refused (logged at most every 10 s)."""
        if self._due_log("client_limit"):
            log.warning("client %s holds %d %s (the per-client limit of this worker): refusing more",
                        client_ip, limit, what)

    def out_of_descriptors(self, what: str, error: OSError) -> None:
        """Running out of file descriptors is logged (at most every 10 s) and counted, never silent."""
        self.metrics.resource_exhausted.inc("descriptors")
        if self._due_log("descriptors"):
            log.error("out of file descriptors opening %s (%s): raise the limit (ulimit -n / LimitNOFILE) or "
                      "shed load; affected requests get 503/SERVFAIL", what, error.strerror or error)

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
        """A session's flow record: metrics, a log line for a crossed limit, the flow sink (`relay.record`)."""
        record(self.metrics, self.flows, action.flow)

    async def start(self, tcp_sockets: Iterable[socket.socket], udp_sockets: Iterable[socket.socket] = ()) -> None:
        loop = asyncio.get_running_loop()
        # Flow lines are formatted once per loop pass (after the reads it handled) and written by the sink's
        # own thread; lines the writer has no room for are dropped and counted, never waited for.
        self.flows.on_dropped = self.metrics.flows_dropped.inc
        self.flows.start_writer(loop.call_soon)
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
        upstream = c.upstream_timeout_s / 4 if c.upstream_timeout_s > 0 else 1.0
        return max(0.02, min(1.0, c.header_timeout_s / 4, c.idle_timeout_s / 4, upstream))

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
                    if conn.drain_may_close(now):
                        conn.timeout(TimeoutKind.DRAIN)
                elif conn.head_started is not None and now - conn.head_started > config.header_timeout_s:
                    conn.timeout(TimeoutKind.HEADER)
                elif now - conn.last_activity > config.idle_timeout_s:
                    conn.timeout(TimeoutKind.IDLE)
                elif config.upstream_timeout_s > 0 and session.awaiting_response:
                    if conn.awaiting_since is None:
                        conn.awaiting_since = now
                    elif now - conn.awaiting_since > config.upstream_timeout_s:
                        conn.timeout(TimeoutKind.UPSTREAM)
                else:
                    conn.awaiting_since = None

    def stop_accepting(self) -> None:
        """Accept no new connection and read no new datagram; open ones go on (a successor agent serves the
        same listening sockets now, see control/handover.py). `drain()` later closes what is open."""
        for server in self._servers:
            server.close()
        for listener in self._udp:
            with contextlib.suppress(OSError, ValueError):
                listener._loop.remove_reader(listener.sock.fileno())

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish (up to drain_timeout_s), then close everything."""
        self.draining = True
        for server in self._servers:
            server.close()
        deadline = self.clock() + self.config.drain_timeout_s
        while (self.connections or any(u.has_outstanding for u in self._udp)) and self.clock() < deadline:
            now = self.clock()
            for conn in list(self.connections):
                if conn.session is not None and conn.session.is_idle and conn.drain_may_close(now):
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
    """One (client address, original destination) pair: its session and the upstream socket it sends through."""

    client: Address
    original_dst: Address
    session: DatagramSession
    upstream: _UdpUpstream | None = None
    held: list[Action] | None = None  # actions waiting behind a Learn (see Connection.apply)
    reply_sock: socket.socket | None = None  # where answers to the client leave from (see UdpListener._reply_socket)


@dataclass(eq=False)
class _UdpUpstream:
    """A connected upstream UDP socket. For DNS it is shared by every port of one client IP (per
    original destination): each query leaves with a fresh random ID, mapped back to its peer and the
    client's own ID when the answer comes, as dnsdist does. A stub resolver that uses a new source
    port per query then costs one descriptor per client IP, not one per query for a minute."""

    key: tuple[str, Address] | None  # (bind IP, target) of a shared socket; None: one peer's own socket
    sock: socket.socket
    users: set[_UdpPeer] = field(default_factory=set)
    # upstream ID (its 2 bytes) -> (peer, the client's ID, when sent in monotonic ns). In sending order:
    # an ID is only added when new, so the oldest come first and expiry stops at the first one in time.
    ids: dict[bytes, tuple[_UdpPeer, bytes, int]] = field(default_factory=dict)


class UdpListener:
    """A UDP listener (DNS): datagrams read with recvmsg (for IP_ORIGDSTADDR); upstream sockets shared per client IP.

    In transparent mode each reply leaves from a transparent socket bound to the original
    destination, so the client sees the answer come from the server it asked; the upstream socket
    is bound to the client's own IP. In gateway mode replies leave from the listener itself.
    A peer pair without outstanding queries is forgotten after PEER_IDLE_S; at most MAX_PEERS exist.
    """

    MAX_DATAGRAM = 65535
    BATCH = 64  # datagrams per wakeup, so one busy client cannot starve the loop
    PEER_IDLE_S = 10.0
    MAX_PEERS = 16384
    MAX_PEERS_PER_CLIENT = 4096  # one client IP cannot take every peer slot from the others
    MAX_IDS = 32768  # queries in flight through one shared upstream socket (half the ID space)

    def __init__(self, proxy: Proxy, sock: socket.socket, factory: DatagramFactory) -> None:
        self.proxy = proxy
        self.sock = sock
        self.factory = factory
        self.peers: dict[tuple[Address, Address], _UdpPeer] = {}
        self.peers_by_ip: dict[str, int] = {}
        self.upstreams: dict[tuple[str, Address], _UdpUpstream] = {}
        self._reply_socks: dict[Address, socket.socket] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # held answers waiting for a Learn (strong references)
        self._loop = asyncio.get_running_loop()
        self._closed = False
        local = sock.getsockname()
        self._local: Address = (local[0], local[1])

    @property
    def has_outstanding(self) -> bool:
        return any(p.session.has_outstanding for p in self.peers.values())

    def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        """Drain the listener (up to BATCH datagrams a wakeup): each is judged and carried out before the next."""
        sock = self.sock
        transparent = self.proxy.config.transparent
        local = self._local
        peers = self.peers
        for _ in range(self.BATCH):
            try:
                if transparent:  # the original destination comes with the datagram (IP_ORIGDSTADDR)
                    data, ancdata, _flags, addr = sock.recvmsg(self.MAX_DATAGRAM, 256)
                else:
                    data, addr = sock.recvfrom(self.MAX_DATAGRAM)
                    ancdata = None
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                log.exception("UDP listener receive failed")
                return
            try:
                if self.proxy.draining:  # read and dropped: nothing new is judged while draining
                    continue
                original_dst = (parse_origdst(ancdata) or local) if ancdata is not None else local
                client = addr if len(addr) == 2 else (addr[0], addr[1])
                peer = peers.get((client, original_dst))
                if peer is None:
                    peer = self._new_peer(client, original_dst)
                    if peer is None:
                        continue
            except Exception:
                self.proxy.internal_error("a UDP datagram", None)
                continue
            try:
                self._apply(peer, peer.session.on_query(data))
            except Exception:
                self._peer_failed(peer)

    def _guard(self, peer: _UdpPeer | None, step: Callable[[T], None], arg: T) -> None:
        """The UDP error boundary: a failure forgets that peer only (its sockets closed) and is reported once."""
        try:
            step(arg)
        except Exception:
            if peer is None:
                self.proxy.internal_error("a UDP datagram", None)
            else:
                self._peer_failed(peer)

    def _peer_failed(self, peer: _UdpPeer) -> None:
        """Called in an `except` around one step of `peer`: report it, and forget the peer (its sockets closed)."""
        context = getattr(peer.session, "context", None)
        self.proxy.internal_error(f"UDP peer {peer.client[0]}:{peer.client[1]}", context)
        self._forget((peer.client, peer.original_dst), peer)

    def _new_peer(self, client: Address, original_dst: Address) -> _UdpPeer | None:
        """The peer of a datagram from a new (client, original destination) pair; None: refused (counted)."""
        if len(self.peers) >= self.MAX_PEERS or self.peers_by_ip.get(client[0], 0) >= self.MAX_PEERS_PER_CLIENT:
            self._forget_idle(0)
            if len(self.peers) >= self.MAX_PEERS:
                self.proxy.metrics.connections_rejected.inc("udp_peers")
                return None
            if self.peers_by_ip.get(client[0], 0) >= self.MAX_PEERS_PER_CLIENT:
                self.proxy.metrics.connections_rejected.inc("udp_peers_per_client")
                self.proxy.client_limit_hit(client[0], "UDP source ports with queries in flight",
                                            self.MAX_PEERS_PER_CLIENT)
                return None
        session = self.factory(ConnectionInfo(client=client, original_dst=original_dst, transport="UDP"))
        if session is None:
            self.proxy.metrics.connections_rejected.inc("udp_denied")
            return None
        peer = _UdpPeer(client=client, original_dst=original_dst, session=session)
        self.peers[(client, original_dst)] = peer
        self.peers_by_ip[client[0]] = self.peers_by_ip.get(client[0], 0) + 1
        self.proxy.metrics.connections.inc("udp")
        return peer

    def _upstream(self, peer: _UdpPeer) -> _UdpUpstream | None:
        if peer.upstream is not None:
            return peer.upstream
        target = self.proxy.upstream or peer.original_dst
        transparent = self.proxy.config.transparent
        shared_key = (peer.client[0] if transparent else "", target) if peer.session.message_ids else None
        if shared_key is not None:
            shared = self.upstreams.get(shared_key)
            if shared is not None:
                shared.users.add(peer)
                peer.upstream = shared
                return shared
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                self.proxy.out_of_descriptors("an upstream UDP socket", e)
            self.proxy.metrics.upstream_failures.inc("udp")
            self._apply(peer, peer.session.on_upstream_failed(Reason.UPSTREAM_FAILED))
            return None
        try:
            if transparent:
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
        upstream = _UdpUpstream(key=shared_key, sock=sock, users={peer})
        if shared_key is not None:
            self.upstreams[shared_key] = upstream
        peer.upstream = upstream
        self._loop.add_reader(sock.fileno(), self._answers, upstream)
        return upstream

    def _failed(self, peer: _UdpPeer, reason: Reason) -> None:
        self._apply(peer, peer.session.on_upstream_failed(reason))

    def _send_up(self, peer: _UdpPeer, data: bytes) -> None:
        upstream = peer.upstream or self._upstream(peer)
        if upstream is None:
            return
        if upstream.key is not None and len(data) >= 2:
            ids = upstream.ids
            if len(ids) >= self.MAX_IDS:
                self._expire_ids(upstream, 0)
            new_id = _random_id()
            while new_id in ids:
                new_id = _random_id()
            ids[new_id] = (peer, data[:2], time.monotonic_ns())
            data = new_id + data[2:]
        try:
            upstream.sock.send(data)
        except (BlockingIOError, ConnectionRefusedError):
            pass

    def _answers(self, upstream: _UdpUpstream) -> None:
        """Drain an upstream socket (up to BATCH answers a wakeup), each relayed to the peer that asked."""
        sock = upstream.sock
        ids = upstream.ids
        shared = upstream.key is not None
        peers = self.peers
        for _ in range(self.BATCH):
            try:
                data = sock.recv(self.MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNREFUSED from an ICMP port unreachable: the upstream is not there
                self.proxy.metrics.upstream_failures.inc("udp")
                waiting = {entry[0] for entry in ids.values()} if shared else set(upstream.users)
                ids.clear()
                for failed in waiting:
                    self._guard(failed, functools.partial(self._failed, failed), Reason.UPSTREAM_FAILED)
                return
            target: _UdpPeer | None
            if shared:
                entry = ids.pop(data[:2], None)  # a datagram under 2 bytes is no key (every key is 2 bytes)
                if entry is None:  # late, unasked for or forged: no client is waiting for it
                    continue
                target, client_id, _sent = entry
                data = client_id + data[2:]
            else:
                target = next(iter(upstream.users), None)
                if target is None:
                    continue
            if peers.get((target.client, target.original_dst)) is not target:
                continue
            try:
                self._apply(target, target.session.on_answer(data))
            except Exception:
                self._peer_failed(target)
                if sock.fileno() < 0:  # closed by the boundary
                    return

    def _reply_socket(self, peer: _UdpPeer) -> socket.socket:
        """The socket answers to `peer` leave from (kept on the peer): the listener in gateway mode, in
        transparent mode one bound to the original destination (shared by the peers that asked it)."""
        if not self.proxy.config.transparent:
            peer.reply_sock = self.sock
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
        peer.reply_sock = sock
        return sock

    def _apply(self, peer: _UdpPeer, actions: list[Action]) -> None:
        if peer.held is not None:
            peer.held.extend(actions)
            return
        record = self.proxy.record
        for i, action in enumerate(actions):
            if type(action) is Forward:
                if action.direction is C2S:
                    self._send_up(peer, action.data)
                    continue
                data = action.data
            elif type(action) is Log:
                record(action)
                continue
            elif type(action) is Reply:
                data = action.data
            elif type(action) is Learn:
                waiting = self.proxy.learning(action)
                if waiting is not None:
                    peer.held = list(actions[i + 1 :])
                    task = self._loop.create_task(self._release(peer, waiting))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    task.add_done_callback(lambda t: None if t.cancelled() else self._guard(peer, _result, t))
                    return
                continue
            else:
                continue
            try:
                (peer.reply_sock or self._reply_socket(peer)).sendto(data, peer.client)
            except BlockingIOError:
                pass

    async def _release(self, peer: _UdpPeer, waiting: Awaitable[None]) -> None:
        await waiting  # a failure reaches the boundary through the done callback: the answer stays held
        held, peer.held = peer.held or [], None
        if self.peers.get((peer.client, peer.original_dst)) is peer:
            self._apply(peer, held)

    def sweep(self) -> None:
        """SERVFAIL for unanswered queries past dns_timeout_s; forget peers idle for PEER_IDLE_S."""
        config = self.proxy.config
        timeout_ns = int(config.dns_timeout_s * 1e9)
        for peer in [p for p in self.peers.values() if p.session.has_outstanding]:  # nothing to expire elsewhere
            self._guard(peer, functools.partial(self._expire, peer), timeout_ns)
        for upstream in list(self.upstreams.values()):
            self._expire_ids(upstream, 2 * timeout_ns)
        self._forget_idle(int(min(config.idle_timeout_s, self.PEER_IDLE_S) * 1e9))

    def _forget_idle(self, idle_ns: int) -> None:
        now = time.time_ns()
        for key, peer in list(self.peers.items()):
            if not peer.session.has_outstanding and now - peer.session.last_activity_ns >= idle_ns and peer.held is None:
                self._forget(key, peer)

    @staticmethod
    def _expire_ids(upstream: _UdpUpstream, older_ns: int) -> None:
        """Forget upstream IDs whose answer is overdue (their clients had SERVFAIL already): the oldest come
        first (see `_UdpUpstream.ids`), so this stops at the first one still in time, O(expired)."""
        ids = upstream.ids
        if not ids:
            return
        cutoff = time.monotonic_ns() - older_ns
        late = []
        for qid, (_p, _c, sent) in ids.items():
            if sent > cutoff:
                break
            late.append(qid)
        for qid in late:
            del ids[qid]

    def _expire(self, peer: _UdpPeer, timeout_ns: int) -> None:
        self._apply(peer, peer.session.expire(timeout_ns))

    def _forget(self, key: tuple[Address, Address], peer: _UdpPeer) -> None:
        if self.peers.pop(key, None) is not None:
            left = self.peers_by_ip.get(peer.client[0], 1) - 1
            if left > 0:
                self.peers_by_ip[peer.client[0]] = left
            else:
                self.peers_by_ip.pop(peer.client[0], None)
        upstream, peer.upstream = peer.upstream, None
        if upstream is None:
            return
        upstream.users.discard(peer)
        if upstream.users:
            return
        if upstream.key is not None:
            self.upstreams.pop(upstream.key, None)
        self._loop.remove_reader(upstream.sock.fileno())
        upstream.sock.close()

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
