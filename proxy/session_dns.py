"""DNS sessions: queries over TCP (`DnsTcpSession`) and UDP datagrams (`DnsDatagramSession`), judged per query.

Owns the wiring of `parsers.dns` to the policy: an allowed query goes upstream byte for byte over
the transport the client used; a denied one is answered REFUSED by the proxy (never forwarded); an
unreadable one FORMERR; an upstream that fails or stays silent gives SERVFAIL. Every answer relayed
teaches toFQDNs its names and IPs through a `Learn` action emitted before the answer's `Forward`
(the I/O layer holds the answer until the agent has pushed the IPs). Never parses bytes itself and
never calls out: a session is pure.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TypeVar

from membrane.parsers import dns
from membrane.parsers.dns import HEADER_BYTES
from membrane.parsers.errors import ParseError
from membrane.parsers.events import Direction, DnsQuery, DnsResponse, Reason
from membrane.proxy.flows import ERROR, FORWARDED, REQUEST, RESPONSE, Flow, FlowContext, l7_dns, reused_l7
from membrane.proxy.session import (
    C2S,
    S2C,
    Action,
    ConnectionPolicy,
    Forward,
    Learn,
    Log,
    PauseReading,
    Reply,
    ResumeReading,
    Session,
    TimeoutKind,
    flow_log,
    verdict_of,
    wall_clock_ns,
)

_QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV", 65: "HTTPS", 255: "ANY"}


_T = TypeVar("_T")
MAX_OUTSTANDING = 1024  # forwarded, unanswered queries per TCP connection or UDP peer

# Messages are read once per distinct content: a resolver or node-local cache repeats the same few
# queries, and an authoritative server (or a cache within a TTL second) the same answers. The bytes after
# the 2-byte ID key what was read from them (the ID is the only part that differs between repeats, and
# nothing read depends on it). Messages over MAX_CACHED_MESSAGE_BYTES are read every time; each cache
# holds at most MAX_CACHED_MESSAGES and starts afresh when full (no per-entry bookkeeping on the hot path).
MAX_CACHED_MESSAGE_BYTES = 512
MAX_CACHED_MESSAGES = 2048


def qtype_name(qtype: int) -> str:
    return _QTYPES.get(qtype, f"TYPE{qtype}")


class _QueryInfo:
    """What the bytes of a query say, read once (see MAX_CACHED_MESSAGES), and the last verdict on it.

    `query` is the first query read with these bytes: its `id` and `raw` are that one's, every other
    field holds for all (`_with_raw` makes the query of another ID). `l7`/`summary` are its REQUEST
    record's. `judged_by` is the policy whose verdict `allowed`..`rule` hold (None: not judged yet): a
    DNS verdict depends on the policy and the question only, so it is asked again only when another
    policy (a reload, another peer's) judges the same bytes.
    """

    __slots__ = ("allowed", "judged_by", "l7", "query", "reason", "rule", "summary", "verdict")

    def __init__(self, query: DnsQuery) -> None:
        self.query = query
        qtypes = [qtype_name(query.qtype)]
        self.l7 = reused_l7(l7_dns(query=query.normalized_name, qtypes=qtypes))
        self.summary = f"DNS Query {query.normalized_name} {qtypes[0]}"
        self.judged_by: ConnectionPolicy | None = None
        self.allowed = False
        self.verdict = ERROR
        self.reason: Reason | None = None
        self.rule: str | None = None


class _AnswerInfo:
    """What the bytes of an answer say, read once: the response (its `id`/`raw` are the first one's), the
    Learn it teaches toFQDNs (None: no addresses, or an error RCODE), and its RESPONSE record's l7/summary."""

    __slots__ = ("l7", "learn", "response", "summary")

    def __init__(self, response: DnsResponse) -> None:
        self.response = response
        self.learn: Learn | None = None
        if response.rcode == 0 and response.addresses:
            ttl = response.min_ttl if response.min_ttl is not None else 0
            self.learn = Learn(names=(response.normalized_name, *response.cnames), ips=tuple(response.addresses),
                               ttl_s=float(ttl))
        qtypes = [qtype_name(response.qtype)] if response.qtype else []
        self.l7 = reused_l7(l7_dns(
            query=response.normalized_name, qtypes=qtypes, rcode=response.rcode, ips=response.addresses,
            ttl=response.min_ttl, cnames=response.cnames, rrtypes=[qtype_name(t) for t in response.rrtypes],
        ))
        self.summary = _answer_summary(response, qtypes)


_QUERIES: dict[bytes, _QueryInfo] = {}
_ANSWERS: dict[bytes, _AnswerInfo] = {}


def _query_info(query: DnsQuery) -> _QueryInfo:
    """The (cached) reading of `query`'s bytes."""
    info = _cached(_QUERIES, query.raw)
    if info is None:
        info = _QueryInfo(query)
        _remember(_QUERIES, query.raw, info)
    return info


def _answer_info(response: DnsResponse) -> _AnswerInfo:
    """The (cached) reading of `response`'s bytes."""
    info = _cached(_ANSWERS, response.raw)
    if info is None:
        info = _AnswerInfo(response)
        _remember(_ANSWERS, response.raw, info)
    return info


def _cacheable(raw: bytes) -> bool:
    return HEADER_BYTES <= len(raw) <= MAX_CACHED_MESSAGE_BYTES


def _cached(table: dict[bytes, _T], raw: bytes) -> _T | None:
    """What `table` holds for a message with these bytes after its ID (None: not cached or not cacheable)."""
    return table.get(raw[2:]) if _cacheable(raw) else None


def _remember(table: dict[bytes, _T], raw: bytes, info: _T) -> None:
    """Keep `info` for these bytes after the ID; a full table starts afresh (bounded by MAX_CACHED_MESSAGES)."""
    if not _cacheable(raw):
        return
    if len(table) >= MAX_CACHED_MESSAGES:
        table.clear()
    table[raw[2:]] = info


def _with_raw(query: DnsQuery, qid: int, raw: bytes) -> DnsQuery:
    """`query` as read from `raw` (the same bytes but for the ID `qid`)."""
    if query.raw is raw:
        return query
    return DnsQuery(id=qid, name=query.name, normalized_name=query.normalized_name, qtype=query.qtype,
                    qclass=query.qclass, opcode=query.opcode, rd=query.rd, cd=query.cd, raw=raw)


class _Outstanding:
    """A forwarded query waiting for its answer: what was read from it, its bytes, when it was forwarded."""

    __slots__ = ("info", "raw", "started_ns")

    def __init__(self, info: _QueryInfo, raw: bytes, started_ns: int) -> None:
        self.info = info
        self.raw = raw
        self.started_ns = started_ns

    @property
    def query(self) -> DnsQuery:
        return _with_raw(self.info.query, (self.raw[0] << 8) | self.raw[1], self.raw)


class DnsJudge:
    """The per-query logic both transports share; `frame` wraps a message for the transport."""

    def __init__(
        self,
        *,
        context: FlowContext,
        policy: ConnectionPolicy,
        clock: Callable[[], int],
        frame: Callable[[bytes], bytes],
        max_outstanding: int = MAX_OUTSTANDING,
    ) -> None:
        self.context = context
        self.policy = policy
        # A policy that follows reloads (proxy.wiring.LiveConnectionPolicy) names the policy current now.
        self._resolve: Callable[[], ConnectionPolicy] | None = getattr(policy, "resolve", None)
        self.clock = clock
        self.frame = frame
        self.outstanding: dict[int, _Outstanding] = {}
        self.upstream_failed: Reason | None = None
        self.max_outstanding = max_outstanding
        self.limit_noted = False  # the bound's first crossing on this connection / peer is counted and logged

    def query(self, query: dns.DnsEvent, actions: list[Action]) -> None:
        now = self.clock()
        if type(query) is dns.UnreadableMessage:
            reply = dns.refusal(query, query.reason)
            if reply is not None:
                actions.append(Reply(self.frame(reply)))
            actions.append(self._flow(None, REQUEST, ERROR, now, reason=query.reason,
                                      summary=f"DNS query unreadable: {query.detail}"))
            return
        assert type(query) is DnsQuery
        self.judged(_query_info(query), query.id, query.raw, now, actions)

    def _verdict(self, info: _QueryInfo) -> None:
        """Fill `info`'s verdict for this connection's policy (asked only when another policy judged it last)."""
        resolve = self._resolve
        current = resolve() if resolve is not None else self.policy
        if info.judged_by is current and type(current) is ConnectionPolicy:
            return
        info.allowed, info.verdict, info.reason, info.rule = verdict_of(current.judge(info.query))
        info.judged_by = current

    def judged(self, info: _QueryInfo, qid: int, raw: bytes, now: int, actions: list[Action]) -> None:
        """The verdict on one readable query (`raw`, ID `qid`, read as `info`) and what follows from it."""
        self._verdict(info)
        allowed, verdict, reason, rule = info.allowed, info.verdict, info.reason, info.rule
        crossed = False
        if allowed and self.upstream_failed is not None:
            allowed, verdict, reason = False, ERROR, self.upstream_failed
        elif allowed and len(self.outstanding) >= self.max_outstanding:
            # Bound what one connection (or UDP peer) can keep waiting on the upstream: SERVFAIL beyond it.
            allowed, verdict, reason = False, ERROR, Reason.UPSTREAM_FAILED
            crossed = not self.limit_noted
            self.limit_noted = True
        if allowed:
            actions.append(Forward(C2S, self.frame(raw)))
            outstanding = self.outstanding
            if qid in outstanding:  # a reused ID takes the older query's place, at the end (sending order)
                del outstanding[qid]
            outstanding[qid] = _Outstanding(info, raw, now)
            actions.append(Log(Flow(context=self.context, verdict=FORWARDED, l7_type=REQUEST, l7=info.l7,
                                    summary=info.summary, time_ns=now, rule=rule)))
            return
        assert reason is not None
        query = _with_raw(info.query, qid, raw)
        rcode = dns.dns_rcode(reason)
        actions.append(Reply(self.frame(dns.refusal(query, reason))))
        refused = self._flow(query, REQUEST, verdict, now, rule=rule, reason=reason, rcode=rcode)
        if crossed:  # counted in membrane_proxy_limits_exceeded_total and logged once per connection, not per query
            refused.flow.limit = "dns_queries_outstanding"
        actions.append(refused)
        # The answer the client got, as Hubble shows it after a dropped query: a response record with the RCODE.
        actions.append(self._flow(query, RESPONSE, FORWARDED, self.clock(), rcode=rcode,
                                  summary=f"DNS Answer RCode: {_RCODE_NAMES.get(rcode, str(rcode))} (Query {query.normalized_name} "
                                          f"{qtype_name(query.qtype)})"))

    def response(self, response: dns.DnsEvent, actions: list[Action]) -> bool:
        """Relay one answer. Returns False when it cannot be read (the caller decides: drop or close)."""
        if type(response) is not DnsResponse:
            return False
        self.answered(_answer_info(response), response.id, response.raw, actions)
        return True

    def answered(self, info: _AnswerInfo, qid: int, raw: bytes, actions: list[Action]) -> None:
        """Relay one readable answer (`raw`, ID `qid`, read as `info`): Learn first, then the answer and its record."""
        pending = self.outstanding.pop(qid, None)
        if info.learn is not None:
            actions.append(info.learn)
        actions.append(Forward(S2C, self.frame(raw)))
        now = self.clock()
        started = pending.started_ns if pending is not None else now
        actions.append(Log(Flow(context=self.context, verdict=FORWARDED, l7_type=RESPONSE, l7=info.l7,
                                summary=info.summary, time_ns=now, latency_ns=now - started)))

    def fail_outstanding(self, reason: Reason, actions: list[Action]) -> None:
        """Answer every forwarded, unanswered query with SERVFAIL (upstream failed or timed out)."""
        self.fail(list(self.outstanding.values()), reason, actions)
        self.outstanding.clear()

    def fail(self, items: list[_Outstanding], reason: Reason, actions: list[Action]) -> None:
        """Answer these forwarded queries with SERVFAIL (the caller takes them out of `outstanding`)."""
        rcode = dns.dns_rcode(reason)
        for item in items:
            query = item.query
            actions.append(Reply(self.frame(dns.refusal(query, reason))))
            actions.append(
                self._flow(query, RESPONSE, ERROR, self.clock(), reason=reason, rcode=rcode,
                           latency_ns=self.clock() - item.started_ns)
            )

    def stream_error_flow(self, reason: Reason, summary: str) -> Log:
        """The ERROR flow of a stream that cannot be read on (a broken TCP frame)."""
        return self._flow(None, REQUEST, ERROR, self.clock(), reason=reason, summary=summary)

    def _flow(
        self,
        query: DnsQuery | None,
        l7_type: str,
        verdict: str,
        time_ns: int,
        *,
        rule: str | None = None,
        reason: Reason | None = None,
        rcode: int | None = None,
        latency_ns: int = 0,
        summary: str | None = None,
    ) -> Log:
        name = query.normalized_name if query is not None else ""
        qtypes = [qtype_name(query.qtype)] if query is not None else []
        if summary is None:
            summary = f"DNS Query {name} {' '.join(qtypes)}"
            if rcode is not None:
                summary += f" rcode={rcode}"
        return flow_log(
            self.context, verdict=verdict, l7_type=l7_type, l7=l7_dns(query=name, qtypes=qtypes, rcode=rcode), summary=summary,
            time_ns=time_ns, latency_ns=latency_ns, rule=rule, reason=reason,
        )


# RCODE names for flow summaries (RFC 1035 §4.1.1, RFC 2136 §2.2, RFC 6895 §2.3).
_RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED", 6: "YXDOMAIN",
                7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE"}


def _answer_summary(response: DnsResponse, qtypes: list[str]) -> str:
    """Hubble-like answer summary: the addresses and TTL, or the RCODE of an error answer; never 'None'."""
    query = f"(Query {response.normalized_name} {' '.join(qtypes)})".replace(" )", ")")
    if response.rcode:
        return f"DNS Answer RCode: {_RCODE_NAMES.get(response.rcode, str(response.rcode))} {query}"
    parts = ["DNS Answer"]
    if response.addresses:
        parts.append(" ".join(response.addresses))
    if response.min_ttl is not None:
        parts.append(f"TTL: {response.min_ttl}")
    parts.append(query)
    return " ".join(parts)


class DnsTcpSession(Session):
    """DNS over TCP (RFC 7766): several length-framed queries per connection, answered in any order.

    At most `dns.MAX_TCP_QUERIES_OUTSTANDING` forwarded queries wait for answers at a time. Queries read past
    that bound wait here, in order, and the session pauses reading the client (`PauseReading`) until answers
    free room (`ResumeReading`): a client pipelining more than the bound (a resolver, dnsperf) is slowed by
    TCP, as dnsdist does by reading one query at a time, and never refused; what waits here is at most one
    read's worth of queries.
    """

    protocol = "dns"

    def __init__(
        self,
        *,
        context: FlowContext,
        policy: ConnectionPolicy,
        clock: Callable[[], int] = wall_clock_ns,
    ) -> None:
        super().__init__(context=context, clock=clock)
        self.judge = DnsJudge(context=context, policy=policy, clock=clock, frame=dns.frame_tcp,
                              max_outstanding=dns.MAX_TCP_QUERIES_OUTSTANDING)
        self.client = dns.DnsTcpParser(C2S)
        self.server = dns.DnsTcpParser(S2C)
        self._client_failed = False  # the client's stream broke: answer what is owed, then close
        self._waiting: collections.deque[dns.DnsEvent] = collections.deque()  # read past the bound, not yet judged
        self._paused = False  # PauseReading(C2S) sent and not yet resumed
        self._eof_deferred = False  # the client's FIN, passed on once the waiting queries have gone upstream

    @property
    def is_idle(self) -> bool:
        return not self.judge.outstanding and not self._waiting and self.client.buffered_bytes == 0

    client_speaks_first = True

    @property
    def awaiting_response(self) -> bool:
        return bool(self.judge.outstanding)

    def on_data(self, direction: Direction, data: bytes) -> list[Action]:
        actions: list[Action] = []
        if direction is C2S:
            if self._client_failed:
                return actions  # nothing after a broken frame is read
            try:
                events = self.client.feed(data)
            except ParseError as e:
                # The queries before the broken frame are judged and answered; then nothing more is
                # read, and the connection closes once their answers are relayed.
                self._take(list(e.events_before), actions)  # type: ignore[arg-type]
                actions.append(self.judge.stream_error_flow(e.reason, f"DNS over TCP stream unreadable: {e}"))
                self._client_failed = True
                self._close_when_answered(actions)
                return actions
            self._take(events, actions)
            return actions
        try:
            events = self.server.feed(data)
        except ParseError as e:
            for event in e.events_before:
                self.judge.response(event, actions)  # type: ignore[arg-type]
            self.judge.upstream_failed = Reason.UPSTREAM_FAILED
            self.judge.fail_outstanding(Reason.UPSTREAM_FAILED, actions)
            self._judge_waiting(actions)
            actions.extend(self.close())
            return actions
        for event in events:
            if not self.judge.response(event, actions):
                actions.extend(self.close())
                return actions
        if self._waiting:
            self._judge_waiting(actions)
        self._close_when_answered(actions)
        return actions

    def _take(self, events: list[dns.DnsEvent], actions: list[Action]) -> None:
        """Judge the queries just read while the bound leaves room; the rest wait (and reading pauses)."""
        judge = self.judge
        if not self._waiting:
            outstanding = judge.outstanding
            bound = judge.max_outstanding
            for i, event in enumerate(events):
                if len(outstanding) >= bound and judge.upstream_failed is None:
                    self._waiting.extend(events[i:])
                    break
                judge.query(event, actions)
            else:
                return
        else:
            self._waiting.extend(events)
        self._judge_waiting(actions)

    def _judge_waiting(self, actions: list[Action]) -> None:
        """Judge waiting queries while there is room; pause or resume reading the client to match."""
        judge = self.judge
        waiting = self._waiting
        outstanding = judge.outstanding
        while waiting and (len(outstanding) < judge.max_outstanding or judge.upstream_failed is not None):
            judge.query(waiting.popleft(), actions)
        if waiting:
            if not self._paused:
                self._paused = True
                actions.append(PauseReading(C2S))
            return
        if self._paused:
            self._paused = False
            actions.append(ResumeReading(C2S))
        if self._eof_deferred:
            self._eof_deferred = False
            actions.extend(super().on_peer_closed(C2S))

    def on_peer_closed(self, direction: Direction) -> list[Action]:
        if direction is C2S and self._waiting:
            self._eof_deferred = True  # the waiting queries still go upstream before it learns of the EOF
            return []
        if direction is S2C and self._waiting:
            # The upstream is done: queries still waiting can no longer be forwarded; SERVFAIL them.
            actions: list[Action] = []
            self.judge.upstream_failed = Reason.UPSTREAM_FAILED
            self._judge_waiting(actions)
            actions.extend(super().on_peer_closed(direction))
            return actions
        return super().on_peer_closed(direction)

    def _close_when_answered(self, actions: list[Action]) -> None:
        if self._client_failed and not self.judge.outstanding and not self._waiting and not self.closed:
            actions.extend(self.close())

    def on_upstream_failed(self, reason: Reason) -> list[Action]:
        self.judge.upstream_failed = reason
        actions: list[Action] = []
        self.judge.fail_outstanding(reason, actions)
        self._judge_waiting(actions)
        self._close_when_answered(actions)
        return actions  # later queries on this connection are answered SERVFAIL too

    def on_timeout(self, kind: TimeoutKind) -> list[Action]:
        return self.close()


class DnsDatagramSession:
    """DNS over UDP between one client address and the upstream: each datagram is one message.

    Same actions as a Session: `Forward(C2S)` sends to the upstream, `Reply`/`Forward(S2C)` to the
    client. `expire(now_ns, timeout_ns)` answers SERVFAIL to queries without an answer in time.
    """

    protocol = "dns"
    message_ids = True  # the server may share an upstream socket between client ports, rewriting IDs

    def __init__(
        self,
        *,
        context: FlowContext,
        policy: ConnectionPolicy,
        clock: Callable[[], int] = wall_clock_ns,
    ) -> None:
        self.judge = DnsJudge(context=context, policy=policy, clock=clock, frame=lambda m: m)
        self.queries = dns.DnsParser(C2S)
        self.answers = dns.DnsParser(S2C)
        self.last_activity_ns = clock()
        self.clock = clock

    def on_query(self, datagram: bytes) -> list[Action]:
        now = self.clock()
        self.last_activity_ns = now
        actions: list[Action] = []
        n = len(datagram)
        info = _QUERIES.get(datagram[2:]) if HEADER_BYTES <= n <= MAX_CACHED_MESSAGE_BYTES else None
        if info is None:
            for event in self.queries.feed(datagram):
                if type(event) is not DnsQuery:
                    self.judge.query(event, actions)
                    return actions
                info = _query_info(event)
        if info is not None:
            self.judge.judged(info, (datagram[0] << 8) | datagram[1], datagram, now, actions)
        return actions

    def on_answer(self, datagram: bytes) -> list[Action]:
        """An answer from the upstream; unreadable or unasked-for answers are dropped (UDP has no stream to close)."""
        actions: list[Action] = []
        n = len(datagram)
        if n < 2:
            return actions
        qid = (datagram[0] << 8) | datagram[1]
        if qid not in self.judge.outstanding:
            return actions
        info = _ANSWERS.get(datagram[2:]) if n <= MAX_CACHED_MESSAGE_BYTES else None
        if info is None:
            for event in self.answers.feed(datagram):
                if type(event) is not DnsResponse:
                    return actions
                info = _answer_info(event)
        if info is not None:
            self.judge.answered(info, qid, datagram, actions)
        return actions

    def on_upstream_failed(self, reason: Reason) -> list[Action]:
        actions: list[Action] = []
        self.judge.fail_outstanding(reason, actions)
        return actions

    def expire(self, timeout_ns: int) -> list[Action]:
        """SERVFAIL for each query older than `timeout_ns` that has no answer yet."""
        now = self.clock()
        outstanding = self.judge.outstanding
        late = [qid for qid, o in outstanding.items() if now - o.started_ns > timeout_ns]
        if not late:
            return []
        actions: list[Action] = []
        self.judge.fail([outstanding.pop(qid) for qid in late], Reason.UPSTREAM_TIMEOUT, actions)
        return actions

    @property
    def has_outstanding(self) -> bool:
        return bool(self.judge.outstanding)
