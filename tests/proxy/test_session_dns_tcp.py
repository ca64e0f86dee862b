"""DNS over TCP under hostile input (issue 13 item 5), sans-I/O with a Playbook.

Case table
| input | expected |
|---|---|
| an allowed query, then a frame shorter than a DNS header | the query is forwarded and its answer relayed, then the connection closes |
| a broken frame with nothing owed | ERROR flow, close at once |
| more pipelined queries than MAX_TCP_QUERIES_OUTSTANDING | the extra ones get SERVFAIL without going upstream; the first of them carries the limit (counted, logged) |
"""

from __future__ import annotations

from typing import Any

from membrane.parsers import dns
from membrane.parsers.events import Direction, Reason
from membrane.proxy.session import Close, DataReceived, Forward, Learn, Log, Reply

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


def test_pipelined_queries_beyond_the_bound_get_servfail() -> None:
    """Queries past MAX_TCP_QUERIES_OUTSTANDING unanswered ones are answered SERVFAIL and never forwarded."""
    session = _session()
    n = dns.MAX_TCP_QUERIES_OUTSTANDING
    queries = [_query("www.cilium.io", i) for i in range(1, n + 3)]
    actions = session.handle(DataReceived(C2S, b"".join(dns.frame_tcp(q) for q in queries)))
    forwarded = [a.data for a in actions if isinstance(a, Forward)]
    assert forwarded == [dns.frame_tcp(q) for q in queries[:n]]
    replies = [a.data for a in actions if isinstance(a, Reply)]
    assert replies == [dns.frame_tcp(dns.refusal(dns.read_query(q), Reason.UPSTREAM_FAILED)) for q in queries[n:]]
    refused = [a.flow for a in actions if isinstance(a, Log) and a.flow.verdict == "ERROR"]
    assert len(refused) == 2
    assert [f.limit for f in refused] == ["dns_queries_outstanding", None]  # one count and log line per connection
