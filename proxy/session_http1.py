"""HTTP/1.1 session: every request of a keep-alive or pipelined connection judged on its own.

Owns the wiring of `parsers.http1.Http1Parser` (one per direction) to the policy: an allowed request goes upstream
re-serialised by the parser (normalised target, header actions applied); a denied one is answered
by the proxy (403 `Access denied`) and never reaches the upstream, and the connection lives on.
Never parses bytes itself. Invariant: answers reach the client in request order, so a refusal of a
pipelined request waits behind the responses of the requests forwarded before it. A response that
does not persist the connection (HTTP/1.0, `Connection: close`, read until close) closes the client
connection once it is fully forwarded (RFC 9112 §9.3, §9.6).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from membrane.parsers import http1, http2
from membrane.parsers.errors import ParseError
from membrane.parsers.events import (
    ConnectionUpgraded,
    Data,
    Direction,
    EndOfMessage,
    Headers,
    HttpRequest,
    HttpResponse,
    Reason,
    Trailers,
)
from membrane.policies import HeaderAction
from membrane.policies.crd import MismatchAction
from membrane.proxy.flows import ERROR, FORWARDED, REQUEST, RESPONSE, Flow, FlowContext, l7_http
from membrane.proxy.session import (
    C2S,
    S2C,
    Action,
    Close,
    ConnectionPolicy,
    DataReceived,
    Forward,
    Input,
    Log,
    Reply,
    Session,
    TimeoutKind,
    flow_log,
    verdict_of,
    wall_clock_ns,
)

MAX_PIPELINED = 1024  # requests read but not yet answered on one connection; beyond it the connection closes


def apply_header_actions(headers: Headers, actions: tuple[HeaderAction, ...]) -> Headers:
    """The request's fields after `headerMatches` mismatch actions (ADD, DELETE, REPLACE; LOG changes nothing).

    A value that lives in a Kubernetes secret (`value` None) cannot be read here: ADD/REPLACE of it
    is skipped (the flow still records the action).
    """
    out = list(headers)
    for action in actions:
        lname = action.name.lower()
        match action.action:
            case MismatchAction.LOG:
                pass
            case MismatchAction.DELETE:
                out = [(n, v) for n, v in out if n.lower() != lname]
            case MismatchAction.ADD:
                if action.value is not None:
                    out.append((action.name, action.value))
            case MismatchAction.REPLACE:
                if action.value is not None:
                    out = [(n, v) for n, v in out if n.lower() != lname]
                    out.append((action.name, action.value))
    return tuple(out)


def strip_h2c_upgrade(headers: Headers) -> Headers:
    """The fields without `Upgrade: h2c`, `HTTP2-Settings` and their `Connection` options (RFC 7540 §3.2)."""
    out: list[tuple[str, str]] = []
    for name, value in headers:
        lname = name.lower()
        if lname in ("upgrade", "http2-settings"):
            continue
        if lname == "connection":
            tokens = [t.strip() for t in value.split(",") if t.strip().lower() not in ("upgrade", "http2-settings", "")]
            if not tokens:
                continue
            value = ", ".join(tokens)
        out.append((name, value))
    return tuple(out)


@dataclass(init=False, slots=True)
class _Pending:
    """One request in answer order: forwarded (awaiting its response) or refused (its reply waiting its turn).
    Its own __init__: a compiled dataclass's generated one is interpreted (parsers/events.py)."""

    method: str
    url: str
    headers: Headers
    started_ns: int
    refusal: bytes | None  # set when the proxy answers it
    close_after: bool
    response_started: bool
    status: int
    response_keep_alive: bool  # False: the client connection closes once this response is forwarded

    def __init__(
        self, *, method: str, url: str, headers: Headers, started_ns: int, refusal: bytes | None = None,
        close_after: bool = False, response_started: bool = False, status: int = 0, response_keep_alive: bool = True,
    ) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.started_ns = started_ns
        self.refusal = refusal
        self.close_after = close_after
        self.response_started = response_started
        self.status = status
        self.response_keep_alive = response_keep_alive


@dataclass(slots=True)
class _Stats:
    forwarded: int = 0
    refused: int = 0
    errors: int = 0
    responses: int = 0


_BETWEEN_RESPONSES = frozenset({http1.State.IDLE, http1.State.MUST_CLOSE})


class Http1Session(Session):
    """HTTP/1.1 between one client and its upstream, judged per request."""

    protocol = "http"

    def __init__(
        self,
        *,
        context: FlowContext,
        policy: ConnectionPolicy,
        clock: Callable[[], int] = wall_clock_ns,
        max_header_bytes: int = http1.DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        super().__init__(context=context, clock=clock)
        self.policy = policy
        self.requests, self.responses = http1.Http1Parser.pair(max_header_bytes=max_header_bytes)
        self._order: deque[_Pending] = deque()  # requests in the order their answers are due
        self._current: _Pending | None = None  # the request whose body is being read
        self._current_allowed = False
        self._seen_request = False
        self._upstream_failed: Reason | None = None
        self._tunnel = False
        self._client_broken = False  # the client's stream could not be parsed; its later bytes are ignored
        self.stats = _Stats()

    # --- state for the server ---------------------------------------------------------------------
    @property
    def reading_head(self) -> bool:
        if self._tunnel:
            return False
        state = self.requests.state
        return state is http1.State.HEAD or (state is http1.State.IDLE and not self._seen_request)

    @property
    def is_idle(self) -> bool:
        return not self._tunnel and not self._order and self.requests.state is http1.State.IDLE

    client_speaks_first = True

    @property
    def awaiting_response(self) -> bool:
        if self._tunnel or not self._order:
            return False
        front = self._order[0]
        return front.refusal is None and not front.response_started

    # --- inputs -----------------------------------------------------------------------------------
    def handle(self, event: Input) -> list[Action]:
        # Every read of the connection comes here: bytes go straight to their direction's parser, without
        # the base class's dispatch (one call fewer, a direct one when compiled); the rest as the base does.
        if type(event) is DataReceived and not self.closed:
            return self._client_data(event.data) if event.direction is C2S else self._server_data(event.data)
        return super().handle(event)

    def on_data(self, direction: Direction, data: bytes) -> list[Action]:
        if direction is C2S:
            return self._client_data(data)
        return self._server_data(data)

    def on_peer_closed(self, direction: Direction) -> list[Action]:
        # The upstream closing between responses (after a `Connection: close` one) ends no message.
        between = direction is S2C and not self._tunnel and self.responses.state in _BETWEEN_RESPONSES
        try:
            events = (self.requests if direction is C2S else self.responses).feed_eof()
        except ParseError:
            return self.close()
        actions: list[Action] = []
        if direction is S2C:
            self._server_events(events, actions)
            front = self._front_forwarded()
            if front is not None and not front.response_started and not self._tunnel:
                # The upstream closed before answering a forwarded request: 502, as a proxy answers it
                # (RFC 9110 §15.6.3), never an empty reply; nothing after it can be served.
                actions.append(Reply(http1.error_response(502, keep_alive=False)))
                closed_early = self._response_flow(front, 502, ERROR, Reason.UPSTREAM_FAILED)
                closed_early.flow.limit = "upstream_closed"  # counted and logged by the server
                actions.append(closed_early)
                actions.extend(self.close())
                return actions
            # Whatever is still due gets no response now: refusals queued behind it are sent, then FIN.
            while self._order and self._order[0].refusal is not None:
                pending = self._order.popleft()
                assert pending.refusal is not None
                actions.append(Reply(pending.refusal))
                actions.append(self._response_flow(pending, pending.status, FORWARDED, None, proxy_answer=True))
        if self.closed:
            return actions
        if between and not self._order:
            # Every response is framed and delivered: the EOF carries nothing for the client, so the
            # connection ends now without a FIN of ours first (see Session.upstream_eof_delimits).
            self.upstream_eof_delimits = False
            actions.extend(self.close())
            return actions
        actions.extend(super().on_peer_closed(direction))
        return actions

    def on_timeout(self, kind: TimeoutKind) -> list[Action]:
        if kind is TimeoutKind.HEADER and self.requests.state is http1.State.HEAD and not self._order:
            self.closed = True
            # A head not complete in time (slowloris): 408, an ERROR flow naming the limit (counted and
            # logged by the server), then close.
            flow = Flow(context=self.context, verdict=ERROR, l7_type=REQUEST,
                        l7=l7_http(method="", url="", protocol="HTTP/1.1", code=408),
                        summary="HTTP/1.1 408 request head not complete within the header timeout",
                        time_ns=self.clock(), reason="header_timeout", limit="header_timeout")
            return [Reply(http1.error_response(408, keep_alive=False)), Log(flow), Close()]
        return self.close()

    def on_upstream_failed(self, reason: Reason) -> list[Action]:
        self._upstream_failed = reason
        actions: list[Action] = []
        answered = False
        for pending in self._order:
            if pending.refusal is None and not pending.response_started:
                # The first forwarded request without a response gets 503/504; nothing after it can follow.
                actions.append(Reply(http1.error_response(http1.refusal_status(reason), keep_alive=False)))
                actions.append(self._response_flow(pending, http1.refusal_status(reason), ERROR, reason))
                answered = True
                break
            if pending.refusal is not None:
                actions.append(Reply(pending.refusal))
                actions.append(self._response_flow(pending, pending.status, FORWARDED, None, proxy_answer=True))
        if answered or self._order:
            actions.extend(self.close())
        return actions

    # --- client -> server -------------------------------------------------------------------------
    def _client_data(self, data: bytes) -> list[Action]:
        if self._client_broken:
            return []
        actions: list[Action] = []
        try:
            events = self.requests.feed(data)
            self._client_events(events, actions)
            while not self.closed and self.requests.has_held_input():
                self._client_events(self.requests.feed(b""), actions)
        except ParseError as e:
            self._refuse_error(e, actions)
        return actions

    def _client_events(self, events: list[http1.Http1Event], actions: list[Action]) -> None:
        for event in events:
            if self.closed:
                return
            kind = type(event)
            if kind is HttpRequest:
                assert isinstance(event, HttpRequest)
                self._request(event, actions)
            elif kind is Data or kind is Trailers or kind is EndOfMessage:
                if self._tunnel:
                    assert isinstance(event, Data)
                    if event.data:
                        actions.append(Forward(C2S, event.data))
                elif self._current_allowed:
                    out = self.requests.forward(event)  # type: ignore[arg-type]
                    if out:
                        actions.append(Forward(C2S, out))
                if kind is EndOfMessage:
                    self._current = None
                    self._current_allowed = False

    def _request(self, req: HttpRequest, actions: list[Action]) -> None:
        self._seen_request = True
        if len(self._order) >= MAX_PIPELINED:
            # Answers owed are held here, not in a socket buffer: bound them (a client pipelining
            # without reading would otherwise make the proxy queue refusals without limit).
            self._order.clear()
            actions.extend(self.close())
            return
        started = self.clock()
        url = f"http://{req.host or self.context.destination.ip}{req.target}"
        pending = _Pending(method=req.method, url=url, headers=req.headers, started_ns=started)
        result = self.policy.judge(req)
        allowed, verdict, reason, rule = verdict_of(result)
        self._current = pending
        self._current_allowed = allowed
        protocol = f"HTTP/{req.http_version}"
        flow_l7 = l7_http(method=req.method, url=url, protocol=protocol, headers=req.headers)
        summary = f"{protocol} {req.method} {url}"  # what _flow() would derive from flow_l7
        if allowed and self._upstream_failed is not None:
            # Allowed, but there is no upstream: the client gets 503/504, and the flow says ERROR with that code.
            allowed, verdict, reason = False, ERROR, self._upstream_failed
            self._current_allowed = False
            flow_l7 = l7_http(method=req.method, url=url, protocol=protocol, code=http1.refusal_status(reason),
                              headers=req.headers)
        if allowed:
            headers = apply_header_actions(req.headers, result.header_actions) if result.header_actions else None
            if self.requests.proposes_switch() and http2.is_h2c_upgrade(req):
                # Never an opaque relay after `Upgrade: h2c`: strip the upgrade, as Envoy does, and go on in HTTP/1.1.
                headers = strip_h2c_upgrade(req.headers if headers is None else headers)
            actions.append(Forward(C2S, self.requests.forward(req, headers=headers)))
            self._order.append(pending)
            self.stats.forwarded += 1
            actions.append(self._flow(REQUEST, FORWARDED, flow_l7, rule=rule, time_ns=started, summary=summary))
            return
        assert reason is not None
        status = http1.refusal_status(reason)
        refusal = self.requests.refusal(req, reason)
        pending.refusal = refusal.data
        pending.close_after = refusal.close
        if self._upstream_failed is not None:  # nothing more can be served on this connection
            pending.refusal = http1.error_response(status, keep_alive=False, head_request=req.method == "HEAD")
            pending.close_after = True
        pending.status = status
        self.stats.refused += 1
        actions.append(self._flow(REQUEST, verdict, flow_l7, rule=rule, reason=reason, time_ns=started, summary=summary))
        self._order.append(pending)
        self._flush(actions)

    def _refuse_error(self, e: ParseError, actions: list[Action]) -> None:
        """A request the parser cannot read: 400/431 in its turn, then close (the stream is unusable)."""
        self.stats.errors += 1
        status = http1.refusal_status(e.reason, e.direction)
        now = self.clock()
        # What the refused head said, when its request line could be read (the raw target, as sent).
        method, url = "", ""
        rejected = self.requests.rejected_request() if e.direction is C2S else None
        if rejected is not None:
            method, target, host = rejected
            url = f"http://{host or self.context.destination.ip}{target}" if target.startswith("/") else target
        flow_l7 = l7_http(method=method, url=url, protocol="HTTP/1.1", code=status)
        actions.append(self._flow(REQUEST, ERROR, flow_l7, reason=e.reason, time_ns=now, summary=f"HTTP/1.1 {status} {e}"))
        if self._current is not None and self._current_allowed:
            # The body of a forwarded request broke off: the upstream cannot be told; just close.
            actions.extend(self.close())
            return
        self._order.append(_Pending(method=method, url=url, headers=(), started_ns=now,
                                    refusal=http1.error_response(status, keep_alive=False), close_after=True, status=status))
        self._client_broken = True  # earlier responses may still be due; the refusal closes after them
        self._flush(actions)

    # --- server -> client -------------------------------------------------------------------------
    def _server_data(self, data: bytes) -> list[Action]:
        actions: list[Action] = []
        try:
            self._server_events(self.responses.feed(data), actions)
            while not self.closed and self.requests.has_held_input():
                self._client_events(self.requests.feed(b""), actions)
        except ParseError as e:
            front = self._order[0] if self._order else None
            if front is not None and front.refusal is None and not front.response_started:
                actions.append(Reply(http1.error_response(502, keep_alive=False)))
                actions.append(self._response_flow(front, 502, ERROR, e.reason))
            actions.extend(self.close())
        return actions

    def _server_events(self, events: list[http1.Http1Event], actions: list[Action]) -> None:
        for event in events:
            if self.closed:
                return
            kind = type(event)
            if self._tunnel:
                if kind is Data:
                    assert isinstance(event, Data)
                    if event.data:
                        actions.append(Forward(S2C, event.data))
                continue
            if kind is HttpResponse:
                assert isinstance(event, HttpResponse)
                actions.append(Forward(S2C, self.responses.forward(event)))
                if event.status >= 200 or event.status == 101:
                    front = self._front_forwarded()
                    if front is not None:
                        front.response_started = True
                        front.status = event.status
                        front.response_keep_alive = event.keep_alive or event.status == 101
                        actions.append(self._response_flow(front, event.status, FORWARDED, None, event.headers))
            elif kind is ConnectionUpgraded:
                self._tunnel = True
                if self._order:
                    self._order.popleft()
            elif kind is Data or kind is Trailers:
                out = self.responses.forward(event)  # type: ignore[arg-type]
                if out:
                    actions.append(Forward(S2C, out))
            elif kind is EndOfMessage:
                out = self.responses.forward(event)  # type: ignore[arg-type]
                if out:
                    actions.append(Forward(S2C, out))
                front = self._front_forwarded()
                if front is not None and front.response_started:
                    self._order.popleft()
                    if not front.response_keep_alive:
                        # RFC 9112 §9.3/§9.6: a response that does not persist the connection (HTTP/1.0,
                        # `Connection: close`, read until close) ends it once fully forwarded; the client
                        # must not send another request on it (the parser would refuse it with 400).
                        actions.extend(self.close())
                        return
                    self._flush(actions)

    def _front_forwarded(self) -> _Pending | None:
        if self._order and self._order[0].refusal is None:
            return self._order[0]
        return None

    def _flush(self, actions: list[Action]) -> None:
        """Send the refusals whose turn has come (no forwarded request still owes its response)."""
        while self._order and self._order[0].refusal is not None:
            pending = self._order.popleft()
            assert pending.refusal is not None
            actions.append(Reply(pending.refusal))
            # The refusal the client got, as Hubble shows it after the DROPPED request.
            actions.append(self._response_flow(pending, pending.status, FORWARDED, None, proxy_answer=True))
            if pending.close_after:
                actions.extend(self.close())
                return

    # --- flows ------------------------------------------------------------------------------------
    def _flow(
        self,
        l7_type: str,
        verdict: str,
        l7: dict[str, object],
        *,
        time_ns: int,
        rule: str | None = None,
        reason: Reason | None = None,
        latency_ns: int = 0,
        summary: str | None = None,
    ) -> Log:
        if summary is None:
            http = l7.get("http", {})
            assert isinstance(http, dict)
            if l7_type == REQUEST:
                summary = f"{http.get('protocol')} {http.get('method')} {http.get('url')}"
            else:
                summary = f"{http.get('protocol')} {http.get('code')} {latency_ns // 1_000_000}ms ({http.get('method')} {http.get('url')})"
        return flow_log(
            self.context, verdict=verdict, l7_type=l7_type, l7=l7, summary=summary,
            time_ns=time_ns, latency_ns=latency_ns, rule=rule, reason=reason,
        )

    def _response_flow(
        self, pending: _Pending, status: int, verdict: str, reason: Reason | None, headers: Headers = (),
        proxy_answer: bool = False,
    ) -> Log:
        """A response record; `proxy_answer`: the proxy's own refusal (no latency: the upstream latency
        histogram counts only what upstreams answered)."""
        now = self.clock()
        self.stats.responses += 1
        l7 = l7_http(method=pending.method, url=pending.url, protocol="HTTP/1.1", code=status, headers=headers)
        latency_ns = 0 if proxy_answer else max(0, now - pending.started_ns)
        summary = f"HTTP/1.1 {status} {latency_ns // 1_000_000}ms ({pending.method} {pending.url})"
        return self._flow(RESPONSE, verdict, l7, time_ns=now, latency_ns=latency_ns, reason=reason, summary=summary)
