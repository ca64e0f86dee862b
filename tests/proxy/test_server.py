"""proxy/server.py on loopback sockets: relaying, backpressure, limits, timeouts, internal errors, drain."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import cast

import pytest
import uvloop
from membrane.parsers.events import Direction, Reason
from membrane.proxy.flows import FlowContext, FlowSink, Peer
from membrane.proxy.server import ConnectionInfo, Proxy, ProxyConfig, listening_socket
from membrane.proxy.session import (
    Action,
    Close,
    DeniedSession,
    Forward,
    Learn,
    PassThroughSession,
    Reply,
    Session,
    TimeoutKind,
)

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT


def _ctx(info: ConnectionInfo) -> FlowContext:
    return FlowContext(
        source=Peer(ip=info.client[0], port=info.client[1]), destination=Peer(ip=info.original_dst[0], port=info.original_dst[1])
    )


def passthrough(info: ConnectionInfo) -> Session:
    return PassThroughSession(context=_ctx(info))


class EchoServer(asyncio.Protocol):
    received: list[bytes]

    def __init__(self, received: list[bytes]) -> None:
        self.received = received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self.received.append(data)
        self.transport.write(data)


@asynccontextmanager
async def running_proxy(
    factory: Callable[[ConnectionInfo], Session], upstream: tuple[str, int], config: ProxyConfig | None = None
) -> AsyncIterator[tuple[Proxy, int]]:
    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    proxy = Proxy(config=config or ProxyConfig(drain_timeout_s=0.5), factory=factory, upstream=upstream)
    await proxy.start([sock])
    try:
        yield proxy, port
    finally:
        await proxy.drain()


@asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[int, list[bytes]]]:
    received: list[bytes] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: EchoServer(received), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()


def run(coro: Callable[[], object]) -> None:
    uvloop.run(coro())  # type: ignore[arg-type]


def test_bytes_pass_through_both_ways() -> None:
    """A port allowed at L3/L4 without L7 rules relays bytes untouched in both directions."""

    async def main() -> None:
        async with echo_server() as (eport, received), running_proxy(passthrough, ("127.0.0.1", eport)) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            writer.write(b"x" * 100_000)
            assert await reader.readexactly(100_000) == b"x" * 100_000
            writer.close()
            assert b"".join(received) == b"hello" + b"x" * 100_000

    run(main)


def test_half_close_is_relayed() -> None:
    """A client FIN reaches the upstream as a FIN; the upstream's answer still reaches the client."""

    class Upper(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data

        def eof_received(self) -> bool:
            self.transport.write(self.buf.upper())
            self.transport.close()
            return True

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Upper, "127.0.0.1", 0)
        eport = server.sockets[0].getsockname()[1]
        async with running_proxy(passthrough, ("127.0.0.1", eport)) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"abc")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"ABC"
            writer.close()
        server.close()

    run(main)


def test_denied_port_closes_without_reaching_upstream() -> None:
    """A port without a rule set fails closed: the client is disconnected and the upstream sees nothing."""

    def deny(info: ConnectionInfo) -> Session:
        return DeniedSession(context=_ctx(info), reason="no_policy")

    async def main() -> None:
        async with echo_server() as (eport, received), running_proxy(deny, ("127.0.0.1", eport)) as (proxy, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"secret")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await asyncio.sleep(0.05)
            assert received == []
            assert proxy.flows.recent()[-1]["verdict"] == "DROPPED"
            assert proxy.metrics.requests.get("tcp", "DROPPED") == 1

    run(main)


def test_backpressure_bounds_buffering() -> None:
    """A client that does not read makes the proxy stop reading the upstream (no unbounded buffer)."""

    class Firehose(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
            self.sent = 0
            self.paused = False
            asyncio.get_running_loop().call_soon(self.pump)

        def pump(self) -> None:
            while not self.paused and self.sent < 64 << 20:
                self.transport.write(b"z" * 65536)
                self.sent += 65536

        def pause_writing(self) -> None:
            self.paused = True

        def resume_writing(self) -> None:
            self.paused = False
            self.pump()

    async def main() -> None:
        hoses: list[Firehose] = []
        loop = asyncio.get_running_loop()

        def make() -> Firehose:
            hoses.append(Firehose())
            return hoses[-1]

        server = await loop.create_server(make, "127.0.0.1", 0)
        eport = server.sockets[0].getsockname()[1]
        config = ProxyConfig(max_buffer_bytes=256 * 1024, drain_timeout_s=0.5)
        async with running_proxy(passthrough, ("127.0.0.1", eport), config) as (proxy, port):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            await asyncio.sleep(1.0)
            # The upstream could push 64 MiB; the proxy must have stopped long before.
            assert hoses
            assert hoses[0].sent < 16 << 20
            (conn,) = proxy.connections
            assert conn.client is not None
            assert conn.client.get_write_buffer_size() <= 2 * config.max_buffer_bytes + 65536
            # Reading resumes the flow.
            sock.setblocking(False)
            got = 0
            for _ in range(200):
                try:
                    got += len(sock.recv(1 << 20))
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            assert got > 0
            sock.close()
        server.close()

    run(main)


def test_max_connections() -> None:
    """Connections beyond max_connections are closed at once; the others keep working."""

    async def main() -> None:
        config = ProxyConfig(max_connections=2, drain_timeout_s=0.5)
        async with echo_server() as (eport, _), running_proxy(passthrough, ("127.0.0.1", eport), config) as (proxy, port):
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            for r, w in conns:
                w.write(b"a")
                assert await r.readexactly(1) == b"a"
            r3, w3 = await asyncio.open_connection("127.0.0.1", port)
            w3.write(b"b")
            assert await asyncio.wait_for(r3.read(), 5) == b""
            assert proxy.metrics.connections_rejected.get("max_connections") == 1
            r, w = conns[0]
            w.write(b"c")
            assert await r.readexactly(1) == b"c"

    run(main)


class _HeadSession(PassThroughSession):
    """A stand-in protocol session: a 'head' is everything up to a newline; a timeout answers 408."""

    def __init__(self, info: ConnectionInfo) -> None:
        super().__init__(context=_ctx(info))
        self.buf = b""
        self.seen_head = False
        self.answered = False  # the upstream's echo of the head began: no request in flight any more

    @property
    def reading_head(self) -> bool:
        return not self.seen_head

    @property
    def is_idle(self) -> bool:
        # As HTTP/1's: idle once the exchange is answered, not while the request waits for its answer (a drain
        # round in between must not close it; under load the echo can take longer than a round).
        return self.seen_head and self.answered

    def on_data(self, direction: Direction, data: bytes) -> list[Action]:
        if direction is C2S and not self.seen_head:
            self.buf += data
            if b"\n" in self.buf:
                self.seen_head = True
        elif direction is S2C and self.seen_head:
            self.answered = True
        return super().on_data(direction, data)

    def on_timeout(self, kind: TimeoutKind) -> list[Action]:
        self.closed = True
        return [Reply(f"timeout {kind.value}\n".encode()), Close()]

    def on_upstream_failed(self, reason: Reason) -> list[Action]:
        self.closed = True
        return [Reply(f"upstream {reason.value}\n".encode()), Close()]


def test_header_timeout_closes_slowloris() -> None:
    """A client that trickles a request head slower than header_timeout_s is answered and closed."""

    async def main() -> None:
        config = ProxyConfig(header_timeout_s=0.3)
        async with echo_server() as (eport, _), running_proxy(_HeadSession, ("127.0.0.1", eport), config) as (proxy, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for _ in range(4):  # bytes keep arriving, but the head never completes
                writer.write(b"x")
                await asyncio.sleep(0.05)
            data = await asyncio.wait_for(reader.read(), 5)
            assert data.endswith(b"timeout header\n")
            assert 0.25 < loop.time() - start < 1.5
            assert proxy.metrics.timeouts.get("header") == 1

    run(main)


def test_upstream_connect_timeout_and_refusal() -> None:
    """An upstream that never accepts gives UpstreamFailed(UPSTREAM_TIMEOUT); a closed port UPSTREAM_FAILED."""

    async def main() -> None:
        # A listener with a full accept queue drops SYNs: connects to it hang (loopback only).
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        fport = full.getsockname()[1]
        fillers = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", fport))
            except BlockingIOError:
                pass
            fillers.append(s)
        await asyncio.sleep(0.1)
        config = ProxyConfig(connect_timeout_s=0.3)
        async with running_proxy(_HeadSession, ("127.0.0.1", fport), config) as (proxy, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET\n")
            assert await asyncio.wait_for(reader.read(), 5) == b"upstream upstream_timeout\n"
            assert proxy.metrics.upstream_failures.get("timeout") == 1
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        cport = closed.getsockname()[1]
        closed.close()
        async with running_proxy(_HeadSession, ("127.0.0.1", cport), config) as (proxy, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 5) == b"upstream upstream_failed\n"
        for s in fillers:
            s.close()
        full.close()

    run(main)


def test_internal_error_closes_only_that_connection() -> None:
    """A bug in a session closes its own connection and bumps the error counter; others are unaffected."""

    class Buggy(PassThroughSession):
        def on_data(self, direction: Direction, data: bytes) -> list[Action]:
            if data == b"boom":
                raise RuntimeError("bug")
            return super().on_data(direction, data)

    def factory(info: ConnectionInfo) -> Session:
        return Buggy(context=_ctx(info))

    async def main() -> None:
        async with echo_server() as (eport, _), running_proxy(factory, ("127.0.0.1", eport)) as (proxy, port):
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            w1.write(b"boom")
            assert await asyncio.wait_for(r1.read(), 5) == b""
            w2.write(b"fine")
            assert await r2.readexactly(4) == b"fine"
            assert proxy.metrics.internal_errors.get() == 1

    run(main)


def test_drain_serves_the_first_request_of_a_connection_accepted_just_before() -> None:
    """A hand-over stops the old agent's listeners and drains it: a connection it accepted just before, whose
    first request arrives after the drain began, is served (not reset as idle); a silent one closes after
    DRAIN_FIRST_REQUEST_S."""

    class IdleUntilSpoken(_HeadSession):  # as HTTP/1: idle before the first request and between exchanges
        @property
        def is_idle(self) -> bool:
            return self.seen_head or not self.buf

    async def main() -> None:
        async with echo_server() as (eport, _):
            sock = listening_socket("127.0.0.1", 0)
            port = sock.getsockname()[1]
            proxy = Proxy(config=ProxyConfig(drain_timeout_s=3.0), factory=IdleUntilSpoken, upstream=("127.0.0.1", eport))
            await proxy.start([sock])
            r_late, w_late = await asyncio.open_connection("127.0.0.1", port)
            r_silent, _w_silent = await asyncio.open_connection("127.0.0.1", port)
            while len(proxy.connections) < 2:
                await asyncio.sleep(0.01)
            drain = asyncio.get_running_loop().create_task(proxy.drain())
            await asyncio.sleep(0.2)  # two drain rounds: an idle connection that had spoken would be closed by now
            w_late.write(b"late\n")
            assert await asyncio.wait_for(r_late.readexactly(5), 2) == b"late\n"
            assert (await asyncio.wait_for(r_silent.read(), 3)).endswith(b"timeout drain\n")
            await asyncio.wait_for(drain, 4)
            assert not proxy.connections

    run(main)


def test_drain_waits_for_busy_connections_and_closes_idle_ones() -> None:
    """On drain, idle connections close at once, listeners stop, and a request in flight completes."""

    async def main() -> None:
        async with echo_server() as (eport, _):
            sock = listening_socket("127.0.0.1", 0)
            port = sock.getsockname()[1]
            proxy = Proxy(config=ProxyConfig(drain_timeout_s=2.0), factory=_HeadSession, upstream=("127.0.0.1", eport))
            await proxy.start([sock])
            r_idle, w_idle = await asyncio.open_connection("127.0.0.1", port)
            w_idle.write(b"done\n")
            assert await r_idle.readexactly(5) == b"done\n"
            r_busy, w_busy = await asyncio.open_connection("127.0.0.1", port)
            w_busy.write(b"partial")
            assert await r_busy.readexactly(7) == b"partial"
            drain = asyncio.get_running_loop().create_task(proxy.drain())
            assert (await asyncio.wait_for(r_idle.read(), 1)).endswith(b"timeout drain\n")
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)
            w_busy.write(b" more\n")
            assert await r_busy.readexactly(6) == b" more\n"
            await asyncio.wait_for(drain, 3)
            assert not proxy.connections

    run(main)


def test_transparent_socket_options() -> None:
    """Transparent listeners carry IP_TRANSPARENT, and the upstream socket can bind a non-local (the pod's) address."""
    import struct as _struct

    from membrane.proxy.server import IP_TRANSPARENT, _transparent_upstream_socket, parse_origdst

    tcp = listening_socket("127.0.0.1", 0, transparent=True)
    udp = listening_socket("127.0.0.1", 0, udp=True, transparent=True)
    try:
        assert tcp.getsockopt(socket.SOL_IP, IP_TRANSPARENT) == 1
        assert udp.getsockopt(socket.SOL_IP, IP_TRANSPARENT) == 1
    finally:
        tcp.close()
        udp.close()
    # 10.244.250.7 is not an address of this host: only IP_TRANSPARENT lets a socket bind it (no packet is sent).
    up = _transparent_upstream_socket("10.244.250.7", "10.244.250.8")
    try:
        assert up.getsockname()[0] == "10.244.250.7"
    finally:
        up.close()
    v4 = _struct.pack("!HH4s8x", socket.AF_INET, 53, socket.inet_aton("10.244.0.10"))
    assert parse_origdst([(socket.SOL_IP, 20, v4)]) == ("10.244.0.10", 53)
    v6 = _struct.pack("!HHI16sI", socket.AF_INET6, 5353, 0, socket.inet_pton(socket.AF_INET6, "fd00::a"), 0)
    assert parse_origdst([(socket.IPPROTO_IPV6, 74, v6)]) == ("fd00::a", 5353)


class _Relay:
    """A DatagramSession that relays every datagram both ways (to test the UDP listener's I/O alone)."""

    has_outstanding = False
    message_ids = False

    def __init__(self) -> None:
        self.last_activity_ns = 0

    def on_query(self, datagram: bytes) -> list[Action]:
        return [Forward(C2S, datagram)]

    def on_answer(self, datagram: bytes) -> list[Action]:
        return [Forward(Direction.SERVER_TO_CLIENT, datagram)]

    def on_upstream_failed(self, reason: Reason) -> list[Action]:
        return []

    def expire(self, timeout_ns: int) -> list[Action]:
        return []


def test_transparent_udp_reply_leaves_from_the_original_destination() -> None:
    """A transparent UDP listener reads the original destination (IP_RECVORIGDSTADDR) and answers from a socket bound to it."""

    async def main() -> None:
        upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        upstream.bind(("127.0.0.1", 0))
        upstream.setblocking(False)
        loop = asyncio.get_running_loop()
        seen: list[tuple[bytes, tuple[str, int]]] = []

        def echo() -> None:
            data, addr = upstream.recvfrom(65535)
            seen.append((data, addr))
            upstream.sendto(data.upper(), addr)

        loop.add_reader(upstream.fileno(), echo)
        sock = listening_socket("127.0.0.1", 0, udp=True, transparent=True)
        port = sock.getsockname()[1]
        proxy = Proxy(
            config=ProxyConfig(transparent=True, drain_timeout_s=0.2), factory=passthrough,
            upstream=upstream.getsockname(), datagram_factory=lambda info: _Relay(),
        )
        await proxy.start([], [sock])
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)
        try:
            client.sendto(b"query", ("127.0.0.1", port))
            for _ in range(200):
                try:
                    data, addr = client.recvfrom(65535)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            else:
                raise AssertionError("no reply")
            assert data == b"QUERY"
            assert addr == ("127.0.0.1", port)  # from the address the client asked
            assert seen
            assert seen[0][1][0] == "127.0.0.1"  # upstream socket bound to the client's IP
            (listener,) = proxy._udp
            (peer,) = listener.peers.values()
            assert peer.original_dst == ("127.0.0.1", port)
        finally:
            client.close()
            loop.remove_reader(upstream.fileno())
            upstream.close()
            await proxy.drain()

    run(main)


def test_buffer_ceiling_before_upstream_connects() -> None:
    """While the upstream connect is pending, at most max_buffer_bytes (plus one read) are held; then reading pauses."""

    async def main() -> None:
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        fport = full.getsockname()[1]
        fillers = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", fport))
            except BlockingIOError:
                pass
            fillers.append(s)
        await asyncio.sleep(0.1)
        config = ProxyConfig(connect_timeout_s=3.0, max_buffer_bytes=64 * 1024, drain_timeout_s=0.2)
        async with running_proxy(passthrough, ("127.0.0.1", fport), config) as (proxy, port):
            client = socket.create_connection(("127.0.0.1", port))
            client.setblocking(False)
            sent = 0
            for _ in range(100):
                try:
                    sent += client.send(b"p" * 65536)
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            (conn,) = proxy.connections
            assert sent > 1 << 20  # the client pushed far more than the ceiling ...
            assert conn.pending_bytes <= 64 * 1024 + 256 * 1024  # ... the proxy held at most the ceiling plus one read
            assert "pending" in conn._client_pauses
            client.close()
        for s in fillers:
            s.close()
        full.close()

    run(main)


# --- one error boundary: a failure at any step of a connection closes that connection only ----------


class _Failing(PassThroughSession):
    """A session with a bug at one step: 'start', 'client_data', 'upstream_data' or 'client_eof'."""

    def __init__(self, info: ConnectionInfo, where: str) -> None:
        super().__init__(context=_ctx(info))
        self.where = where

    def start(self) -> list[Action]:
        if self.where == "start":
            raise RuntimeError("bug in start")
        return []

    def on_data(self, direction: Direction, data: bytes) -> list[Action]:
        if data == b"boom" and self.where == ("client_data" if direction is C2S else "upstream_data"):
            raise RuntimeError(f"bug in {self.where}")
        return super().on_data(direction, data)

    def on_peer_closed(self, direction: Direction) -> list[Action]:
        if self.where == "client_eof" and direction is C2S:
            raise RuntimeError("bug in eof")
        return super().on_peer_closed(direction)


@pytest.mark.parametrize("where", ["factory", "start", "client_data", "upstream_data", "client_eof"])
def test_error_boundary_turns_any_failure_into_close_flow_and_metric(where: str) -> None:
    """Wherever a connection's step fails (factory, start, client bytes, upstream bytes, FIN), that connection is
    closed, one ERROR flow (reason internal_error) is written, proxy_internal_errors_total counts 1, and another
    connection keeps working."""
    first = [True]

    def factory(info: ConnectionInfo) -> Session:
        if first[0]:
            first[0] = False
            if where == "factory":
                raise RuntimeError("bug in factory")
            return _Failing(info, where)
        return PassThroughSession(context=_ctx(info))

    async def main() -> None:
        out = io.StringIO()
        sock = listening_socket("127.0.0.1", 0)
        async with echo_server() as (eport, _):
            proxy = Proxy(config=ProxyConfig(drain_timeout_s=0.5), factory=factory, upstream=("127.0.0.1", eport),
                          flows=FlowSink([out]))
            await proxy.start([sock])
            r1, w1 = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            if where == "client_eof":
                w1.write_eof()
            elif where in ("client_data", "upstream_data"):
                w1.write(b"boom")  # the echo server sends it back: the upstream_data step sees it too
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(r1.read(), 5) == b""
            r2, w2 = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            w2.write(b"fine")
            assert await r2.readexactly(4) == b"fine"
            assert proxy.metrics.internal_errors.get() == 1
            w2.close()
            await proxy.drain()
        records = [json.loads(line)["flow"] for line in out.getvalue().splitlines()]
        errors = [r for r in records if r.get("verdict") == "ERROR"]
        if where == "factory":
            assert errors == []  # no session, so no flow context to report with: the log line and metric remain
        else:
            assert len(errors) == 1
            assert "internal error" in errors[0]["Summary"]  # flow.proto: only DROPPED records carry a drop reason

    run(main)


# --- Learn: a session's answer waits for the hook, its connection alone ---------------------------


class _LearningSession(PassThroughSession):
    """Upstream bytes starting with b'learn' teach a name: Learn first, then the Forward of those bytes."""

    def on_data(self, direction: Direction, data: bytes) -> list[Action]:
        if direction is not C2S and data.startswith(b"learn"):
            return [Learn(names=("a.test.",), ips=("192.0.2.1",), ttl_s=30.0), Forward(direction, data)]
        return super().on_data(direction, data)


def test_learn_holds_only_the_connection_that_emitted_it() -> None:
    """While the Learn hook's awaitable is pending, that connection's answer is held and the other connections keep
    flowing; when it completes, the answer is released in order, followed by what came after it."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[None] = loop.create_future()
        seen: list[Learn] = []

        def hook(action: Learn) -> asyncio.Future[None]:
            seen.append(action)
            return gate

        sock = listening_socket("127.0.0.1", 0)
        async with echo_server() as (eport, _):
            proxy = Proxy(config=ProxyConfig(drain_timeout_s=0.5), factory=lambda i: _LearningSession(context=_ctx(i)),
                          upstream=("127.0.0.1", eport), learn=hook)
            await proxy.start([sock])
            port = sock.getsockname()[1]
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            w1.write(b"learn!")
            while not seen:
                await asyncio.sleep(0)
            w1.write(b"after")  # reading is paused: this waits behind the held answer
            for _ in range(20):  # the other connection is served while the first one waits
                w2.write(b"ping")
                assert await r2.readexactly(4) == b"ping"
            assert r1._buffer == bytearray()  # type: ignore[attr-defined]  # nothing released yet
            gate.set_result(None)
            assert await asyncio.wait_for(r1.readexactly(11), 5) == b"learn!after"
            assert seen == [Learn(names=("a.test.",), ips=("192.0.2.1",), ttl_s=30.0)]
            w1.close()
            w2.close()
            await proxy.drain()

    run(main)


def test_learn_without_anything_to_wait_for_does_not_hold() -> None:
    """A hook that returns None (the names are known) lets the answer go on at once; no hook at all ignores Learn."""

    async def main() -> None:
        for hook in (lambda action: None, None):
            sock = listening_socket("127.0.0.1", 0)
            async with echo_server() as (eport, _):
                proxy = Proxy(config=ProxyConfig(drain_timeout_s=0.5), factory=lambda i: _LearningSession(context=_ctx(i)),
                              upstream=("127.0.0.1", eport), learn=hook)
                await proxy.start([sock])
                r, w = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
                w.write(b"learn")
                assert await asyncio.wait_for(r.readexactly(5), 5) == b"learn"
                w.close()
                await proxy.drain()

    run(main)


def test_idle_timeout_follows_the_injected_clock() -> None:
    """Idle time is measured on the proxy's clock: advancing a fake clock past idle_timeout_s closes the idle
    connection at the next sweep, while one that moved since stays open (no real waiting for the timeout)."""

    async def main() -> None:
        now = [1000.0]
        config = ProxyConfig(idle_timeout_s=0.3, drain_timeout_s=0.5)
        sock = listening_socket("127.0.0.1", 0)
        async with echo_server() as (eport, _):
            proxy = Proxy(config=config, factory=passthrough, upstream=("127.0.0.1", eport), clock=lambda: now[0])
            await proxy.start([sock])
            port = sock.getsockname()[1]
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            for r, w in ((r1, w1), (r2, w2)):
                w.write(b"k")
                assert await r.readexactly(1) == b"k"
            now[0] += 0.2
            w2.write(b"k")
            assert await r2.readexactly(1) == b"k"
            now[0] += 0.2  # the first connection has been idle 0.4 s, the second 0.2 s
            assert await asyncio.wait_for(r1.read(), 5) == b""
            w2.write(b"k")
            assert await r2.readexactly(1) == b"k"
            assert proxy.metrics.timeouts.get("idle") == 1
            w2.close()
            await proxy.drain()

    run(main)


class _AnswerAndClose(Session):
    """Answers the first bytes itself with a length-delimited response, then ends the connection."""

    protocol = "tcp"
    client_speaks_first = True
    BODY = b"x" * 20_000  # fits the socket buffers: all of it is acknowledged while the client sleeps

    def on_data(self, direction: Direction, data: bytes) -> list[Action]:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(self.BODY)
        return [Reply(head + self.BODY), *self.close()]


def _time_wait(port: int) -> list[str]:
    import subprocess

    out = subprocess.run(["ss", "-Htan", "state", "time-wait"], capture_output=True, text=True, check=True)
    # filtered here by the local port: other sockets of the host (other tests, agents) may be in TIME_WAIT too
    return [line for line in out.stdout.splitlines() if len(line.split()) >= 4 and line.split()[2] == f"127.0.0.1:{port}"]


async def _read_all(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the client can read, and how the stream ended ("eof" or "reset")."""
    chunks = []
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = await loop.sock_recv(sock, 65536)
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        if not data:
            return b"".join(chunks), "eof"
        chunks.append(data)


def test_transparent_client_leg_closed_first_leaves_no_time_wait() -> None:
    """Transparent mode: a pod-facing socket the proxy closes first is reset once the client acknowledged
    everything (no TIME_WAIT with the pod's tuple); the client still reads the whole response, even late."""

    async def main() -> None:
        sock = listening_socket("127.0.0.1", 0, transparent=True)
        port = sock.getsockname()[1]
        proxy = Proxy(config=ProxyConfig(transparent=True, drain_timeout_s=0.2), factory=lambda info: _AnswerAndClose(context=_ctx(info)), upstream=None)
        await proxy.start([sock])
        loop = asyncio.get_running_loop()
        try:
            for _ in range(3):
                client = socket.socket()
                client.setblocking(False)
                try:
                    await loop.sock_connect(client, ("127.0.0.1", port))
                    await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    await asyncio.sleep(0.3)  # the client reads nothing yet: the reset can arrive first
                    data, end = await _read_all(client)
                finally:
                    client.close()
                assert data.endswith(b"\r\n\r\n" + _AnswerAndClose.BODY)  # all of it, though read after the reset
                assert _time_wait(port) == []
                assert end == "reset"
        finally:
            await proxy.drain()

    run(main)


def test_transparent_upstream_eof_still_reaches_the_client_as_eof() -> None:
    """Transparent mode: when the upstream closed first, the client leg ends with a FIN (the EOF may end the message)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()

        class Once(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.Transport, transport)

            def data_received(self, data: bytes) -> None:
                self.transport.write(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
                self.transport.close()

        server = await loop.create_server(Once, "127.0.0.1", 0)
        sock = listening_socket("127.0.0.1", 0, transparent=True)
        proxy = Proxy(config=ProxyConfig(transparent=True, drain_timeout_s=0.2), factory=passthrough, upstream=server.sockets[0].getsockname()[:2])
        await proxy.start([sock])
        client = socket.socket()
        client.setblocking(False)
        try:
            await loop.sock_connect(client, sock.getsockname()[:2])
            await loop.sock_sendall(client, b"GET / HTTP/1.0\r\n\r\n")
            await asyncio.sleep(0.3)
            assert await _read_all(client) == (b"HTTP/1.0 200 OK\r\n\r\nuntil close", "eof")
        finally:
            client.close()
            await proxy.drain()
            server.close()

    run(main)


def test_udp_upstream_ids_expire_oldest_first_and_only_when_overdue() -> None:
    """A shared upstream socket forgets the IDs whose answers are overdue, and only those: answered ones are gone
    already, and the walk stops at the first ID still in time (IDs are kept in sending order)."""
    import time

    from membrane.proxy.server import UdpListener, _UdpPeer, _UdpUpstream

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer = _UdpPeer(client=("127.0.0.1", 5353), original_dst=("127.0.0.1", 53), session=_Relay())
        upstream = _UdpUpstream(key=("", ("127.0.0.1", 53)), sock=sock, users={peer})
        now = time.monotonic_ns()
        for n, age_s in enumerate((30, 20, 12, 5, 1)):
            upstream.ids[bytes([0, n])] = (peer, bytes([1, n]), now - int(age_s * 1e9))
        del upstream.ids[bytes([0, 1])]  # answered in the meantime
        UdpListener._expire_ids(upstream, 10 * 1_000_000_000)
        assert list(upstream.ids) == [bytes([0, 3]), bytes([0, 4])]
        UdpListener._expire_ids(upstream, 10 * 1_000_000_000)
        assert list(upstream.ids) == [bytes([0, 3]), bytes([0, 4])]
        UdpListener._expire_ids(upstream, 0)
        assert not upstream.ids
    finally:
        sock.close()
