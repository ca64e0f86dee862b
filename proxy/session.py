"""Sans-I/O session glue: inputs in (`DataReceived`, `PeerClosed`, `TimedOut`, `UpstreamFailed`), actions out.

Owns the per-connection enforcement step: feed bytes to the protocol's parser, ask the policy for a
verdict on every request, and answer with actions (`Forward`, `Reply`, `Close`, `Log`) that
`proxy/server.py` carries out. Never awaits, never touches a socket, never parses bytes itself or
decides a verdict itself (parsers/ and policies/ do). Time is injected (`clock`), so tests replay
a session with a Playbook.

Theory of operation: a `Session` is created per accepted connection after the policy lookup.
`start()` returns the first actions (a session for a port that denies at L3/L4 returns a DROPPED
`Log` of an `L3_L4` record and `Close()` at once: fail closed). Every later input goes through `handle()`.
`Close(direction)` half-closes one way (the peer sent FIN); `Close()` ends the whole connection.
The server keeps `reading_head` (a request head is being read: the header-timeout clock runs),
`awaiting_response` (a forwarded request waits for its response: the upstream-timeout clock runs) and
`is_idle` (no request in flight: drain may close it now) in step with these properties.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from membrane.parsers.events import Direction, DnsQuery, GrpcCall, HttpRequest, KafkaRequest, Reason
from membrane.policies import FlowResult, FlowVerdict, ParserType, Verdict, VerdictKind, evaluate_request
from membrane.proxy.flows import DROPPED, ERROR, FORWARDED, REQUEST, Flow, FlowContext, L3L4Flow
from mypy_extensions import mypyc_attr

L7Request = HttpRequest | GrpcCall | DnsQuery | KafkaRequest

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT


class TimeoutKind(enum.Enum):
    HEADER = "header"  # a request head took longer than header_timeout_s (slowloris)
    IDLE = "idle"  # nothing moved either way for idle_timeout_s
    DRAIN = "drain"  # the proxy is shutting down and this connection is idle, or drain time ran out
    UPSTREAM = "upstream"  # a forwarded request got no answer in time (DNS query, HTTP response head)


# --- inputs ---------------------------------------------------------------------------------------
# DataReceived, Forward, Reply and Log are made several times per request: they are plain slotted
# dataclasses with a generated __hash__ (unsafe_hash) rather than frozen ones, whose __init__ sets
# every field through object.__setattr__ (about 2.5x the cost). Treat them as immutable all the same.
# They carry their own __init__: compiled, the dataclasses module's generated one stays interpreted
# (about 3x the cost of a compiled one, see parsers/events.py).


@dataclass(init=False, slots=True, unsafe_hash=True)
class DataReceived:
    direction: Direction  # CLIENT_TO_SERVER: bytes from the client; SERVER_TO_CLIENT: from the upstream
    data: bytes

    def __init__(self, direction: Direction, data: bytes) -> None:
        self.direction = direction
        self.data = data


@dataclass(frozen=True, slots=True)
class PeerClosed:
    direction: Direction  # CLIENT_TO_SERVER: the client sent FIN; SERVER_TO_CLIENT: the upstream did


@dataclass(frozen=True, slots=True)
class TimedOut:
    kind: TimeoutKind


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """The upstream connection could not be made: refused/unreachable or timed out."""

    reason: Reason  # UPSTREAM_FAILED or UPSTREAM_TIMEOUT


Input = DataReceived | PeerClosed | TimedOut | UpstreamFailed


# --- actions --------------------------------------------------------------------------------------


@dataclass(init=False, slots=True, unsafe_hash=True)
class Forward:
    direction: Direction  # CLIENT_TO_SERVER: send to the upstream; SERVER_TO_CLIENT: send to the client
    data: bytes

    def __init__(self, direction: Direction, data: bytes) -> None:
        self.direction = direction
        self.data = data


@dataclass(init=False, slots=True, unsafe_hash=True)
class Reply:
    """Bytes the proxy itself answers to the client (a refusal)."""

    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(frozen=True, slots=True)
class Close:
    """None: end the connection both ways. A direction: half-close that way (send FIN onwards)."""

    direction: Direction | None = None


@dataclass(init=False, slots=True, unsafe_hash=True)
class Log:
    flow: Flow

    def __init__(self, flow: Flow) -> None:
        self.flow = flow


@dataclass(frozen=True, slots=True, kw_only=True)
class Learn:
    """A relayed DNS answer taught these names these IPs (toFQDNs). Emitted before the answer's `Forward`:
    the I/O layer hands it to its learning hook and holds the rest of this connection's (or UDP peer's)
    actions until the hook is done, so the kernel knows the IPs before the client can use them
    (Cilium's DNS proxy holds answers for the same reason). Other connections keep flowing."""

    names: tuple[str, ...]  # the question's name and every CNAME on the way, normalized (trailing dot)
    ips: tuple[str, ...]
    ttl_s: float


@dataclass(frozen=True, slots=True)
class PauseReading:
    """Stop reading from one peer (CLIENT_TO_SERVER: the client) until `ResumeReading`: the session's own flow
    control when it holds all the requests it will take for now (DNS over TCP pipelining past its bound). The
    kernel's socket buffers then push back on the peer, as TCP does; nothing is refused."""

    direction: Direction


@dataclass(frozen=True, slots=True)
class ResumeReading:
    direction: Direction


Action = Forward | Reply | Close | Log | Learn | PauseReading | ResumeReading


def wall_clock_ns() -> int:
    return time.time_ns()


@mypyc_attr(allow_interpreted_subclasses=True)  # proxy/wiring.py: LiveConnectionPolicy
@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionPolicy:
    """The two L3/L4 verdicts of one connection (looked up once), judging each of its requests.

    `egress` is the source endpoint's verdict, `ingress` the destination's; None = that side is not
    a local endpoint, so it has no policy of its own.
    """

    egress: Verdict | None
    ingress: Verdict | None
    src_endpoint: str | None = None
    dst_endpoint: str | None = None

    @property
    def is_dropped(self) -> bool:
        """Either side drops this connection at L3/L4 (or has conflicting L7 parsers: fail closed)."""
        return any(v is not None and v.kind is VerdictKind.DROP for v in (self.egress, self.ingress))

    @property
    def parser(self) -> ParserType | None:
        """The L7 parser the policy puts on this port; None = plain L4 (bytes pass through).

        Raises:
            ValueError: the two sides redirect to different parsers (the caller fails closed).
        """
        kinds = {v.parser for v in (self.egress, self.ingress) if v is not None and v.kind is VerdictKind.REDIRECT}
        if len(kinds) > 1:
            raise ValueError(f"conflicting L7 parsers {sorted(str(k) for k in kinds)}")
        return next(iter(kinds), None)

    @property
    def matched(self) -> str | None:
        refs = [r for v in (self.egress, self.ingress) if v is not None for r in v.matched]
        return refs[0] if refs else None

    def judge(self, request: L7Request | None, error: Reason | None = None) -> FlowResult:
        """The verdict on one request (or on an unparsable one, with `error`). Never raises."""
        return evaluate_request(
            self.egress,
            self.ingress,
            request,
            src_endpoint=self.src_endpoint,
            dst_endpoint=self.dst_endpoint,
            request_error=error,
        )


def verdict_of(result: FlowResult) -> tuple[bool, str, Reason | None, str | None]:
    """(allowed, flow verdict, reason, deciding rule) of a FlowResult.

    An allowed request names the allowing rule. A denied one names only a rule of a side that denied
    it (the denying decision's rule, else that side's matched rule), or none: the other side's
    allowing rule did not decide the denial (`policy trace` explains it the same way).
    """
    decision = result.decision
    if result.verdict is FlowVerdict.ALLOWED:
        rule = decision.rule if decision is not None else None
        if rule is None:
            for side in (result.egress, result.ingress):
                if side.matched:
                    rule = side.matched[0]
                    break
        return True, FORWARDED, None, rule
    denying = decision if decision is not None and not decision.allowed else None
    rule = denying.rule if denying is not None else None
    if rule is None:
        for side in (result.egress, result.ingress):
            if side.verdict is not FlowVerdict.ALLOWED and side.matched:
                rule = side.matched[0]
                break
    reason = denying.reason if denying is not None and denying.reason is not None else Reason.POLICY_DENIED
    return False, DROPPED if reason is Reason.POLICY_DENIED else ERROR, reason, rule


def flow_log(
    context: FlowContext,
    *,
    verdict: str,
    l7_type: str,
    l7: dict[str, Any],
    summary: str,
    time_ns: int,
    latency_ns: int = 0,
    rule: str | None = None,
    reason: Reason | None = None,
) -> Log:
    """One L7 flow record of a connection, as the `Log` action the server carries out."""
    return Log(
        Flow(
            context=context,
            verdict=verdict,
            l7_type=l7_type,
            l7=l7,
            summary=summary,
            time_ns=time_ns,
            latency_ns=latency_ns,
            rule=rule,
            reason=reason.value if reason is not None else None,
        )
    )


@mypyc_attr(allow_interpreted_subclasses=True)  # the HTTP/2 sessions and tests subclass it
class Session:
    """Base class: bytes pass through unchanged, FIN is relayed, timeouts close. Subclasses judge requests."""

    # ClassVar: each subclass names its own (a compiled class would make these per-instance attribute defaults)
    protocol: ClassVar[str] = "tcp"

    def __init__(self, *, context: FlowContext, clock: Callable[[], int] = wall_clock_ns) -> None:
        self.context = context
        self.clock = clock
        self.closed = False
        self._eof = {C2S: False, S2C: False}

    # --- state the server reads -------------------------------------------------------------------
    @property
    def reading_head(self) -> bool:
        """True while a request head is being read (the header timeout applies)."""
        return False

    @property
    def is_idle(self) -> bool:
        """True when no request is in flight, so closing now loses nothing (graceful drain)."""
        return False

    @property
    def awaiting_response(self) -> bool:
        """True while a forwarded request waits for the start of its response: the server's upstream
        response timeout runs (504 / SERVFAIL when it fires). Sessions whose requests may wait on
        purpose (Kafka's JoinGroup and long-poll Fetch, gRPC streams) leave it False."""
        return False

    # The client speaks first (HTTP, DNS, Kafka): the server opens the upstream connection only when
    # the first request has been judged and is forwarded, so an idle or slowloris client holds one
    # descriptor, not two. A relay of unknown bytes connects at once (the server may speak first).
    client_speaks_first: ClassVar[bool] = False

    # The upstream's EOF may mean something to the client (it ends a close-delimited body, or a
    # stream the server finished), so the server relays it as a FIN. A session sets this False when
    # the EOF ended nothing (HTTP/1 between framed responses): the server may then close the
    # client leg without a FIN of its own, which would leave TIME_WAIT on the pod's tuple.
    upstream_eof_delimits = True

    @property
    def delegate(self) -> Session | None:
        """A session that takes over from this one (a sniffing session, once it knows the protocol):
        the server may feed it directly from then on. None = keep using this one."""
        return None

    # --- inputs -----------------------------------------------------------------------------------
    def start(self) -> list[Action]:
        """Actions to run as soon as the connection is accepted."""
        return []

    def handle(self, event: Input) -> list[Action]:
        """Advance the session by one input and return what to do. Never raises ParseError."""
        if self.closed:
            return []
        kind = type(event)  # an identity test per input: this runs for every read of every connection
        if kind is DataReceived:
            return self.on_data(event.direction, event.data)  # type: ignore[union-attr]
        if kind is PeerClosed:
            return self.on_peer_closed(event.direction)  # type: ignore[union-attr]
        if kind is TimedOut:
            return self.on_timeout(event.kind)  # type: ignore[union-attr]
        if kind is UpstreamFailed:
            return self.on_upstream_failed(event.reason)  # type: ignore[union-attr]
        raise TypeError(f"unknown session input {event!r}")

    def on_data(self, direction: Direction, data: bytes) -> list[Action]:
        return [Forward(direction, data)]

    def on_peer_closed(self, direction: Direction) -> list[Action]:
        self._eof[direction] = True
        if all(self._eof.values()):
            return self.close()
        return [Close(direction)]

    def on_timeout(self, kind: TimeoutKind) -> list[Action]:
        return self.close()

    def on_upstream_failed(self, reason: Reason) -> list[Action]:
        return self.close()

    # --- helpers ----------------------------------------------------------------------------------
    def close(self) -> list[Action]:
        self.closed = True
        return [Close()]


class DatagramSession(Protocol):
    """One UDP peer pair (client address, original destination): each datagram is one message.

    `Forward(CLIENT_TO_SERVER)` goes to the upstream; `Reply` and `Forward(SERVER_TO_CLIENT)` to the client.
    """

    last_activity_ns: int
    # True when every datagram starts with a 16-bit message ID that answers echo (DNS): the server may
    # then send the queries of many client ports through one upstream socket, rewriting the ID.
    message_ids: bool

    def on_query(self, datagram: bytes) -> list[Action]: ...

    def on_answer(self, datagram: bytes) -> list[Action]: ...

    def on_upstream_failed(self, reason: Reason) -> list[Action]: ...

    def expire(self, timeout_ns: int) -> list[Action]: ...

    @property
    def has_outstanding(self) -> bool: ...


@mypyc_attr(allow_interpreted_subclasses=True)  # tests subclass it
class PassThroughSession(Session):
    """A port that policy allows at L3/L4 with no L7 rules: bytes are relayed untouched, nothing is judged."""

    protocol = "tcp"


class PassThroughDatagramSession:
    """A UDP port that policy allows at L3/L4 with no L7 rules: datagrams are relayed untouched both ways.

    Cilium treats such a port as plain L4 (no DNS proxy). In the agent the kernel passes these flows
    without redirecting them; a datagram still reaches the proxy only while a policy change is in flight.
    """

    protocol = "udp"
    message_ids = False  # opaque datagrams: one upstream socket per client port

    def __init__(self, *, clock: Callable[[], int] = wall_clock_ns) -> None:
        self.clock = clock
        self.last_activity_ns = clock()

    def on_query(self, datagram: bytes) -> list[Action]:
        self.last_activity_ns = self.clock()
        return [Forward(C2S, datagram)]

    def on_answer(self, datagram: bytes) -> list[Action]:
        self.last_activity_ns = self.clock()
        return [Forward(S2C, datagram)]

    def on_upstream_failed(self, reason: Reason) -> list[Action]:
        return []

    def expire(self, timeout_ns: int) -> list[Action]:
        return []

    @property
    def has_outstanding(self) -> bool:
        return False


class DeniedSession(Session):
    """A port whose rule set is missing or denies at L3/L4: the connection is closed at once (fail closed)."""

    protocol = "tcp"

    def __init__(
        self, *, context: FlowContext, reason: str, rule: str | None = None, clock: Callable[[], int] = wall_clock_ns
    ) -> None:
        super().__init__(context=context, clock=clock)
        self.reason = reason
        self.rule = rule

    def start(self) -> list[Action]:
        # Denied before any L7 parsing: Hubble's L3_L4 policy-drop record, not an L7 one.
        flow = L3L4Flow(
            context=self.context,
            verdict=DROPPED,
            l7_type=REQUEST,
            l7={},
            summary=f"{self.context.transport} connection refused: {self.reason}",
            time_ns=self.clock(),
            rule=self.rule,
            reason=self.reason,
        )
        return [Log(flow), *self.close()]

    def on_data(self, direction: Direction, data: bytes) -> list[Action]:
        return self.close()


def choose_session(
    context: FlowContext, policy: ConnectionPolicy, build: Callable[[ParserType], Session | None]
) -> Session:
    """The session a TCP connection gets from its policy, in gateway and transparent mode alike.

    L3/L4-dropped or conflicting ports and parsers without a session fail closed (`DeniedSession`);
    a port without L7 rules is relayed as is; otherwise `build(parser)` makes the judging session.
    """
    if policy.is_dropped:
        return DeniedSession(context=context, reason="policy_denied", rule=policy.matched)
    try:
        parser = policy.parser
    except ValueError:
        return DeniedSession(context=context, reason="policy_conflict", rule=policy.matched)
    if parser is None:
        return PassThroughSession(context=context)
    session = build(parser)
    if session is None:
        return DeniedSession(context=context, reason=f"no_{parser.value}_session", rule=policy.matched)
    return session
