"""DNS over TCP under hostile input (issue 13 item 5), sans-I/O with a Playbook.

Case table
| input | expected |
|---|---|
| an allowed query, then a frame shorter than a DNS header | the query is forwarded and its answer relayed, then the connection closes |
| a broken frame with nothing owed | ERROR flow, close at once |
| more pipelined queries than MAX_TCP_QUERIES_OUTSTANDING | the extra ones wait and reading pauses; each answer lets one more go upstream; reading resumes when none waits; nothing refused |
| the client's FIN while queries wait | the FIN goes upstream only after the waiting queries |
| the upstream fails while queries wait | forwarded and waiting queries all get SERVFAIL, reading resumes |
"""

from __future__ import annotations

from typing import Any

from membrane.parsers import dns
from membrane.parsers.events import Direction, Reason
from membrane.proxy.session import (
    Close,
    DataReceived,
    Forward,
    Learn,
    Log,
    PauseReading,
    PeerClosed,
    Reply,
    ResumeReading,
    UpstreamFailed,
)

from tests.helpers.playbook import LogMatch, Playbook
from tests.proxy.test_session import DNS_POLICY, INFO, _answer, _gateway, _query, session_factory

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT


def _session() -> Any:
    gw = _gateway(DNS_POLICY, src="default/crawler", dst="kube-system/coredns", port=53)
    return session_factory(gw, "10.244.0.10")(INFO)


def test_valid_query_before_a_broken_frame_is_answered() -> None:
    """An allowed query then a length prefix under 12: the query goes upstream, its answer reaches the
    client, and only then does the connection close (issue 13: answers before a malformed message kept)."""
    allowed = _query("www.cilium.io", 2)
    answer = _answer(allowed, b"\xc0\x00\x02\x0a")
    assert (
        Playbook(_session(), logs=True)
        >> DataReceived(C2S, dns.frame_tcp(allowed) + b"\x00\x05hello")
        << Forward(C2S, dns.frame_tcp(allowed))
        << LogMatch(verdict="FORWARDED", l7_type="REQUEST")
        << LogMatch(verdict="ERROR", reason="malformed")
        >> DataReceived(C2S, dns.frame_tcp(_query("docs.cilium.io", 3)))
        >> DataReceived(S2C, dns.frame_tcp(answer))
        << Learn(names=("www.cilium.io.",), ips=("192.0.2.10",), ttl_s=60.0)
        << Forward(S2C, dns.frame_tcp(answer))
        << LogMatch(verdict="FORWARDED", l7_type="RESPONSE")
        << Close()
    )


def test_broken_frame_with_nothing_owed_closes_at_once() -> None:
    """A broken frame when no answer is owed closes the connection right away."""
    assert (
        Playbook(_session(), logs=True)
        >> DataReceived(C2S, b"\x00\x03abc")
        << LogMatch(verdict="ERROR", reason="malformed")
        << Close()
    )


def _pipelined(session: Any, extra: int) -> tuple[list[bytes], list[Any]]:
    n = dns.MAX_TCP_QUERIES_OUTSTANDING
    queries = [_query("www.cilium.io", i) for i in range(1, n + extra + 1)]
    return queries, session.handle(DataReceived(C2S, b"".join(dns.frame_tcp(q) for q in queries)))


def test_pipelined_queries_beyond_the_bound_wait_with_reading_paused() -> None:
    """Queries past MAX_TCP_QUERIES_OUTSTANDING unanswered ones are not refused: they wait, reading from the
    client pauses, each answer lets the next waiting query go upstream, and reading resumes when none waits."""
    session = _session()
    n = dns.MAX_TCP_QUERIES_OUTSTANDING
    queries, actions = _pipelined(session, 2)
    assert [a.data for a in actions if isinstance(a, Forward)] == [dns.frame_tcp(q) for q in queries[:n]]
    assert not [a for a in actions if isinstance(a, Reply)]
    assert actions[-1] == PauseReading(C2S)
    assert not session.is_idle
    answered = [session.handle(DataReceived(S2C, dns.frame_tcp(_answer(queries[i], b"\xc0\x00\x02\x0a")))) for i in range(2)]
    first = [a.data for a in answered[0] if isinstance(a, Forward) and a.direction is C2S]
    assert first == [dns.frame_tcp(queries[n])]
    assert not any(isinstance(a, ResumeReading) for a in answered[0])
    second = [a.data for a in answered[1] if isinstance(a, Forward) and a.direction is C2S]
    assert second == [dns.frame_tcp(queries[n + 1])]
    assert answered[1][-1] == ResumeReading(C2S)
    assert len(session.judge.outstanding) == n
    assert not [a for a in actions if isinstance(a, Log) and a.flow.verdict == "ERROR"]


def test_client_fin_waits_for_the_waiting_queries() -> None:
    """The client's FIN, read while queries wait, is passed upstream only after they have been forwarded."""
    session = _session()
    n = dns.MAX_TCP_QUERIES_OUTSTANDING
    queries, _ = _pipelined(session, 1)
    assert session.handle(PeerClosed(C2S)) == []
    actions = session.handle(DataReceived(S2C, dns.frame_tcp(_answer(queries[0], b"\xc0\x00\x02\x0a"))))
    ups = [a for a in actions if (isinstance(a, Forward) and a.direction is C2S) or isinstance(a, Close)]
    assert ups == [Forward(C2S, dns.frame_tcp(queries[n])), Close(C2S)]


def test_upstream_failure_answers_waiting_queries_servfail() -> None:
    """An upstream that fails while queries wait: every forwarded and every waiting query gets SERVFAIL."""
    session = _session()
    queries, _ = _pipelined(session, 3)
    actions = session.handle(UpstreamFailed(Reason.UPSTREAM_FAILED))
    replies = [a.data for a in actions if isinstance(a, Reply)]
    assert sorted(replies) == sorted(dns.frame_tcp(dns.refusal(dns.read_query(q), Reason.UPSTREAM_FAILED)) for q in queries)
    assert ResumeReading(C2S) in actions
    assert not [a for a in actions if isinstance(a, Forward)]
