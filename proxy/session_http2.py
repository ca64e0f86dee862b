"""HTTP/2 (h2c prior knowledge) and gRPC session, plus the sniffing session that picks HTTP/1.1 or HTTP/2.

Owns the bridging of `parsers.http2`'s two sides stream by stream: every request (or gRPC call) is
judged on its own; an allowed one is opened upstream with the same stream id, a denied one is
answered on its stream (403, or gRPC trailers-only PERMISSION_DENIED) while other streams go on.
Flow control: bytes are acknowledged to their sender only once the other side framed them
(`pop_delivered` -> `acknowledge`), so a slow reader stalls its writer. Never parses bytes itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from membrane.parsers import http1, http2
from membrane.parsers.errors import LimitExceeded, ParseError
from membrane.parsers.events import (
    Data,
    Direction,
    EndOfMessage,
    GrpcCall,
    Headers,
    HttpRequest,
    HttpResponse,
    Reason,
    StreamReset,
    Trailers,
)
from membrane.proxy.flows import ERROR, FORWARDED, REQUEST, RESPONSE, FlowContext, l7_http
from membrane.proxy.session import (
    C2S,
    S2C,
    Action,
    ConnectionPolicy,
    DataReceived,
    Forward,
    Input,
    Log,
    Session,
    TimeoutKind,
    UpstreamFailed,
    flow_log,
    verdict_of,
    wall_clock_ns,
)
from membrane.proxy.session_http1 import Http1Session, apply_header_actions

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


# Rapid reset spread over many connections (issue 13: 40 connections got 10,240 of 18,000 reset
# streams upstream while each stayed under the per-connection rule): the same rule as the parser's
# per-connection one (Envoy's: at least half of 500 streams reset before their answer), applied to
# the sum over every connection from one client address. Counts halve every RESET_WINDOW_S, so a
# client that once misbehaved is forgiven, and at most MAX_RESET_CLIENTS addresses are tracked.
RESET_WINDOW_S = 10.0
MAX_RESET_CLIENTS = 4096


class ResetLedger:
    """Streams opened and reset prematurely, per client address, summed over its HTTP/2 connections.
    One per proxy process (the session factory holds it, as it holds the Kafka memory)."""

    def __init__(self, *, min_streams: int = 500, window_s: float = RESET_WINDOW_S) -> None:
        self.min_streams = min_streams
        self.window_ns = int(window_s * 1e9)
        self._by_ip: dict[str, list[int]] = {}  # ip -> [streams opened, premature resets, window start ns]

    def note(self, ip: str, opened: int, resets: int, now_ns: int) -> bool:
        """Add one connection's new counts; True when this address crossed the rule (cut it off)."""
        entry = self._by_ip.get(ip)
        if entry is None:
            if len(self._by_ip) >= MAX_RESET_CLIENTS:
                self._by_ip.pop(next(iter(self._by_ip)))
            entry = self._by_ip[ip] = [0, 0, now_ns]
        while now_ns - entry[2] >= self.window_ns:
            entry[0] //= 2
            entry[1] //= 2
            entry[2] += self.window_ns
            if entry[0] == 0 and entry[1] == 0:
                entry[2] = now_ns
        entry[0] += opened
        entry[1] += resets
        return entry[0] >= self.min_streams and 2 * entry[1] >= entry[0]

    def over(self, ip: str, now_ns: int) -> bool:
        """Whether the address is past the rule now (counts decayed to `now_ns`), adding nothing; no entry is made."""
        return ip in self._by_ip and self.note(ip, 0, 0, now_ns)


class _StreamInfo:
    # A plain class: mypyc compiles its __init__ (a dataclass's stays interpreted)
    __slots__ = ("grpc", "method", "responded", "started_ns", "url")

    def __init__(self, *, method: str, url: str, grpc: bool, started_ns: int) -> None:
        self.method = method
        self.url = url
        self.grpc = grpc
        self.started_ns = started_ns
        self.responded = False  # the response head arrived

class Http2Session(Session):
    """HTTP/2 with prior knowledge on both sides (h2c), judged per stream."""

    protocol = "http"

    def __init__(self, *, context: FlowContext, policy: ConnectionPolicy, clock: Callable[[], int] = wall_clock_ns,
                 resets: ResetLedger | None = None) -> None:
        super().__init__(context=context, clock=clock)
        self.policy = policy
        self.server = http2.Http2ServerSide()
        self.client = http2.Http2ClientSide()
        self.streams: dict[int, _StreamInfo] = {}
        self._client_done = False
        self.resets = resets
        self._noted = (0, 0)  # (streams opened, premature resets) already added to the ledger

    @property
    def is_idle(self) -> bool:
        return not self.streams

    client_speaks_first = True

    @property
    def awaiting_response(self) -> bool:
        # gRPC streams may wait on purpose (server streaming, the client's own deadline decides)
        return any(not info.grpc and not info.responded for info in self.streams.values())

    @property
    def reading_head(self) -> bool:
        # A header block left without END_HEADERS blocks the whole connection (RFC 9113 §6.10): the
        # server's header timeout runs while one is pending, as for an HTTP/1.1 head.
        return self.server.header_block_pending

    def start(self) -> list[Action]:
        actions: list[Action] = []
        self._pump(actions)
        return actions

    def on_data(self, direction: Direction, data: bytes) -> list[Action]:
        actions: list[Action] = []
        if direction is C2S and self.resets is not None and self.resets.over(self.context.source.ip, self.clock()):
            # The address crossed the rule on its other connections: cut before parsing (or forwarding) anything, so
            # a burst spread over many connections costs one parse of the streams that crossed it, not all of them.
            return self._cut_for_resets(actions)
        side = self.server if direction is C2S else self.client
        try:
            events = side.feed(data, now_s=self.clock() / 1e9)  # the time refills the control-frame budget
        except ParseError as e:
            self._pump(actions)  # the GOAWAY h2 queued
            actions.append(self._error_flow(e))
            actions.extend(self.close())
            return actions
        last = len(events) - 1
        for i, event in enumerate(events):
            # DATA followed by the end of the same stream goes out as one DATA frame with END_STREAM, not two
            after = events[i + 1] if i < last else None
            ends = isinstance(event, Data) and isinstance(after, EndOfMessage) and after.stream_id == event.stream_id
            if direction is C2S:
                self._client_event(event, actions, ends)
            else:
                self._server_event(event, actions, ends)
        if direction is C2S and self.resets is not None and self._over_reset_rule():
            return self._cut_for_resets(actions)
        self._pump(actions)
        return actions

    def _cut_for_resets(self, actions: list[Action]) -> list[Action]:
        """GOAWAY ENHANCE_YOUR_CALM, the ERROR flow carrying the limit (counted and logged), close."""
        self.server.close(http2.ErrorCode.ENHANCE_YOUR_CALM)
        self._pump(actions)
        flow = self._log(REQUEST, ERROR, "", "HTTP/2 rapid reset across this client's connections", grpc=False,
                         reason=Reason.TOO_LARGE)
        flow.flow.limit = "rapid_reset_across_connections"
        actions.append(flow)
        actions.extend(self.close())
        return actions

    def _over_reset_rule(self) -> bool:
        assert self.resets is not None
        opened, resets = self.server.streams_opened, self.server.premature_resets
        new_opened, new_resets = opened - self._noted[0], resets - self._noted[1]
        if not new_opened and not new_resets:
            return False
        self._noted = (opened, resets)
        return self.resets.note(self.context.source.ip, new_opened, new_resets, self.clock())

    def on_peer_closed(self, direction: Direction) -> list[Action]:
        if direction is S2C:
            for stream_id in list(self.streams):
                self.server.refusal(stream_id, Reason.UPSTREAM_FAILED)
                self.streams.pop(stream_id, None)
            actions: list[Action] = []
            self._pump(actions)
            actions.extend(self.close())
            return actions
        return super().on_peer_closed(direction)

    def on_upstream_failed(self, reason: Reason) -> list[Action]:
        actions: list[Action] = []
        now = self.clock()
        for stream_id, info in list(self.streams.items()):
            self.server.refusal(stream_id, reason)
            self.streams.pop(stream_id, None)
            # The forwarded request never got its response: an ERROR flow with what the client got instead.
            actions.append(self._log(RESPONSE, ERROR, info.method, info.url, grpc=info.grpc, reason=reason,
                                     code=200 if info.grpc else http1.refusal_status(reason), time_ns=now,
                                     latency_ns=now - info.started_ns))
        self.server.close(http2.ErrorCode.NO_ERROR)
        self._pump(actions)
        actions.extend(self.close())
        return actions

    def on_timeout(self, kind: TimeoutKind) -> list[Action]:
        actions: list[Action] = []
        try:
            self.server.close(http2.ErrorCode.NO_ERROR)
        except ParseError:
            pass
        self._pump(actions)
        actions.extend(self.close())
        return actions

    # --- client -> upstream -----------------------------------------------------------------------
    def _client_event(self, event: http2.Event, actions: list[Action], ends: bool = False) -> None:
        kind = type(event)
        if kind is HttpRequest or kind is GrpcCall:
            assert isinstance(event, HttpRequest | GrpcCall)
            self._request(event, actions)
        elif kind is Data:
            assert isinstance(event, Data)
            self.client.send_data(event.stream_id or 0, event.data, end_stream=ends)
        elif kind is Trailers:
            assert isinstance(event, Trailers)
            self.client.send_trailers(event.stream_id or 0, event.headers)
        elif kind is EndOfMessage:
            assert isinstance(event, EndOfMessage)
            self.client.end_stream(event.stream_id or 0)
        elif kind is StreamReset:
            assert isinstance(event, StreamReset)
            self.client.reset_stream(event.stream_id, event.error_code)
            self.streams.pop(event.stream_id, None)
        elif kind is http2.RequestRejected:
            assert isinstance(event, http2.RequestRejected)
            actions.append(self._log(REQUEST, ERROR, "", event.detail, grpc=event.grpc, reason=event.reason))
        elif kind is http2.GoAway:
            self._client_done = True

    def _request(self, request: HttpRequest | GrpcCall, actions: list[Action]) -> None:
        stream_id = request.stream_id or 0
        now = self.clock()
        is_grpc = isinstance(request, GrpcCall)
        method = "POST" if is_grpc else request.method  # type: ignore[union-attr]
        target = request.path if is_grpc else request.target  # type: ignore[union-attr]
        host = request.authority if is_grpc else request.host  # type: ignore[union-attr]
        url = f"http://{host or self.context.destination.ip}{target}"
        result = self.policy.judge(request)
        allowed, verdict, reason, rule = verdict_of(result)
        if allowed:
            if result.header_actions:
                headers = apply_header_actions(request.headers, result.header_actions)
                request = dataclasses.replace(request, headers=headers)
            if self.client.send_request(request):
                self.streams[stream_id] = _StreamInfo(method=method, url=url, grpc=is_grpc, started_ns=now)
                actions.append(self._log(REQUEST, FORWARDED, method, url, grpc=is_grpc, rule=rule, time_ns=now,
                                         headers=request.headers))
                return
            allowed, verdict, reason = False, ERROR, Reason.UPSTREAM_FAILED
        assert reason is not None
        self.server.refusal(stream_id, reason)
        actions.append(self._log(REQUEST, verdict, method, url, grpc=is_grpc, rule=rule, reason=reason, time_ns=now,
                                 headers=request.headers))
        # The refusal the client got, as Hubble shows it after the DROPPED request (gRPC: HTTP 200, grpc-status in trailers).
        actions.append(self._log(RESPONSE, FORWARDED, method, url, grpc=is_grpc,
                                 code=200 if is_grpc else http1.refusal_status(reason), time_ns=self.clock()))

    # --- upstream -> client -----------------------------------------------------------------------
    def _server_event(self, event: http2.Event, actions: list[Action], ends: bool = False) -> None:
        kind = type(event)
        if kind is HttpResponse:
            assert isinstance(event, HttpResponse)
            self.server.send_response(event)
            info = self.streams.get(event.stream_id or 0)
            if info is not None and event.status >= 200:
                info.responded = True
                now = self.clock()
                actions.append(
                    self._log(RESPONSE, FORWARDED, info.method, info.url, grpc=info.grpc, code=event.status,
                              time_ns=now, latency_ns=now - info.started_ns)
                )
                if not event.has_body:
                    self.streams.pop(event.stream_id or 0, None)
        elif kind is Data:
            assert isinstance(event, Data)
            self.server.send_data(event.stream_id or 0, event.data, end_stream=ends)
        elif kind is Trailers:
            assert isinstance(event, Trailers)
            self.server.send_trailers(event.stream_id or 0, event.headers)
            self.streams.pop(event.stream_id or 0, None)
        elif kind is EndOfMessage:
            assert isinstance(event, EndOfMessage)
            self.server.end_stream(event.stream_id or 0)
            self.streams.pop(event.stream_id or 0, None)
        elif kind is StreamReset:
            assert isinstance(event, StreamReset)
            self.server.reset_stream(event.stream_id, event.error_code)
            self.streams.pop(event.stream_id, None)
        elif kind is http2.GoAway:
            self.server.close(http2.ErrorCode.NO_ERROR)

    # --- plumbing ---------------------------------------------------------------------------------
    def _pump(self, actions: list[Action]) -> None:
        """Move flow-control acknowledgements across and collect the bytes each side has to send."""
        for _ in range(8):
            moved = False
            for stream_id, n in self.client.pop_delivered():
                self.server.acknowledge(stream_id, n)
                moved = True
            for stream_id, n in self.server.pop_delivered():
                self.client.acknowledge(stream_id, n)
                moved = True
            if not moved:
                break
        upstream = self.client.data_to_send()
        if upstream:
            actions.append(Forward(C2S, upstream))
        downstream = self.server.data_to_send()
        if downstream:
            actions.append(Forward(S2C, downstream))

    def _log(
        self,
        l7_type: str,
        verdict: str,
        method: str,
        url: str,
        *,
        grpc: bool,
        rule: str | None = None,
        reason: Reason | None = None,
        code: int = 0,
        time_ns: int | None = None,
        latency_ns: int = 0,
        headers: Headers = (),
    ) -> Log:
        l7 = l7_http(method=method, url=url, protocol="HTTP/2", code=code, headers=headers)
        what = "gRPC" if grpc else "HTTP/2"
        summary = f"{what} {method} {url}" if l7_type == REQUEST else f"{what} {code} {latency_ns // 1_000_000}ms ({method} {url})"
        return flow_log(
            self.context, verdict=verdict, l7_type=l7_type, l7=l7, summary=summary,
            time_ns=self.clock() if time_ns is None else time_ns, latency_ns=latency_ns, rule=rule, reason=reason,
        )

    def _error_flow(self, e: ParseError) -> Log:
        log = self._log(REQUEST, ERROR, "", str(e), grpc=False, reason=e.reason)
        if isinstance(e, LimitExceeded):  # GOAWAY ENHANCE_YOUR_CALM went out: count and log the limit
            log.flow.limit = e.limit
        return log


class HttpSession(Session):
    """An HTTP port: the first bytes say HTTP/2 (the h2c connection preface) or HTTP/1.1; then delegate."""

    protocol = "http"

    def __init__(self, *, context: FlowContext, policy: ConnectionPolicy, clock: Callable[[], int] = wall_clock_ns,
                 resets: ResetLedger | None = None) -> None:
        super().__init__(context=context, clock=clock)
        self.policy = policy
        self.resets = resets
        self.inner: Session | None = None
        self._buffer = b""
        self._early = b""  # upstream bytes that arrived before the client's first bytes
        self._upstream_failed: Reason | None = None

    @property
    def reading_head(self) -> bool:
        return True if self.inner is None else self.inner.reading_head

    @property
    def is_idle(self) -> bool:
        return (self.inner is None and not self._buffer) or (self.inner is not None and self.inner.is_idle)

    client_speaks_first = True

    @property
    def awaiting_response(self) -> bool:
        return self.inner is not None and self.inner.awaiting_response

    @property
    def delegate(self) -> Session | None:
        return self.inner

    def handle(self, event: Input) -> list[Action]:
        if self.inner is not None:
            actions = self.inner.handle(event)
            self.closed = self.inner.closed
            return actions
        return super().handle(event)

    def on_data(self, direction: Direction, data: bytes) -> list[Action]:
        if direction is S2C:  # an HTTP/2 server sends its SETTINGS at once: hold them until the client speaks
            self._early += data
            if len(self._early) > 65536:
                return self.close()
            return []
        self._buffer += data
        n = min(len(self._buffer), len(PREFACE))
        if self._buffer[:n] == PREFACE[:n] and n < len(PREFACE):
            return []  # could still be the preface
        if self._buffer.startswith(PREFACE):
            inner: Session = Http2Session(context=self.context, policy=self.policy, clock=self.clock,
                                          resets=self.resets)
        else:
            inner = Http1Session(context=self.context, policy=self.policy, clock=self.clock)
        self.inner = inner
        buffered, self._buffer = self._buffer, b""
        actions = inner.start()
        if self._upstream_failed is not None:
            actions.extend(inner.handle(UpstreamFailed(self._upstream_failed)))
        actions.extend(inner.handle(DataReceived(C2S, buffered)))
        if self._early and not inner.closed:
            early, self._early = self._early, b""
            actions.extend(inner.handle(DataReceived(S2C, early)))
        self.closed = inner.closed
        return actions

    def on_peer_closed(self, direction: Direction) -> list[Action]:
        return self.close()  # before the first request: nothing to relay

    def on_upstream_failed(self, reason: Reason) -> list[Action]:
        self._upstream_failed = reason  # the first request is answered 503/504 once it arrives
        return []

    def on_timeout(self, kind: TimeoutKind) -> list[Action]:
        return self.close()

