# Invariant: for any bytes (one UDP datagram), DnsParser(direction).feed() - what the proxy's UDP
# session runs - returns exactly one event and never raises: a DnsQuery/DnsResponse that keeps its bytes
# (`raw`) with its normalized_name lower-cased, or an UnreadableMessage whose offset lies in the datagram;
# refusal() of an accepted query reads back (with our reader and with dnspython) as a response with the
# same ID and question and the reason's RCODE; refusal() of an unreadable one never raises and never
# answers a response.
"""Fuzz target: DNS messages over UDP, both directions (parsers/dns.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports():
        from membrane.parsers import dns
        from membrane.parsers.events import Direction, DnsQuery, DnsResponse, Reason
else:
    from membrane.parsers import dns
    from membrane.parsers.events import Direction, DnsQuery, DnsResponse, Reason

from dns import message as dp_message
from dns import opcode as dp_opcode


def _check_query(data: bytes) -> None:
    [q] = dns.DnsParser(Direction.CLIENT_TO_SERVER).feed(data)
    if type(q) is dns.UnreadableMessage:
        assert q.offset is not None
        assert 0 <= q.offset <= len(data), q.offset
        reply = dns.refusal(q, Reason.MALFORMED)
        if reply is not None:
            assert len(data) >= 12
            assert not data[2] & 0x80
            assert dns.read_response(reply).rcode == dns.FORMERR
        return
    assert type(q) is DnsQuery
    assert q.raw is data
    assert q.normalized_name == q.name.lower()
    assert q.name.endswith(".")
    assert q == dns.read_query(data)  # deterministic (the name cache is per message)
    for reason in (Reason.POLICY_DENIED, Reason.UPSTREAM_TIMEOUT):
        rcode = dns.dns_rcode(reason)
        reply = dns.refusal(q, reason)
        r = dns.read_response(reply)
        assert (r.id, r.name, r.qtype, r.rcode, r.addresses, r.cnames) == (q.id, q.name, q.qtype, rcode, (), ())
        if q.opcode == 5:
            continue  # dnspython reads UPDATE (RFC 2136) sections by their own rules (zone must be SOA)
        m = dp_message.from_wire(reply)  # dnspython reads any label bytes (dnslib insists on UTF-8)
        assert (m.id, m.rcode(), m.opcode(), m.flags & 0x8000) == (q.id, rcode, dp_opcode.Opcode(q.opcode), 0x8000)
        assert (bool(m.flags & 0x0100), bool(m.flags & 0x0010), len(m.question)) == (q.rd, q.cd, 1)
        rrset = m.question[0]
        assert (dns.name_text(rrset.name.labels[:-1]), rrset.rdtype, rrset.rdclass) == (q.name, q.qtype, q.qclass)
        assert not m.answer
        assert not m.authority


def _check_response(data: bytes) -> None:
    [r] = dns.DnsParser(Direction.SERVER_TO_CLIENT).feed(data)
    if type(r) is dns.UnreadableMessage:
        assert r.offset is not None
        assert 0 <= r.offset <= len(data), r.offset
        assert dns.refusal(r, Reason.MALFORMED) is None or not data[2] & 0x80  # a response is never answered
        return
    assert type(r) is DnsResponse
    assert r.raw is data
    assert r.normalized_name == r.name.lower()
    assert r.min_ttl is None if not (r.addresses or r.cnames) else 0 <= r.min_ttl <= 0x7FFFFFFF  # type: ignore[operator]
    assert all(c.endswith(".") and c == c.lower() for c in r.cnames)
    assert r == dns.read_response(data)


def check(data: bytes) -> None:
    _check_query(data)
    _check_response(data)


def TestOneInput(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
