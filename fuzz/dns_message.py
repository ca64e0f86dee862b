# Invariant: for any bytes (one UDP datagram), read_query() and read_response() each return an event
# or raise MalformedMessage, never anything else; an accepted message keeps its bytes (`raw`), its
# normalized_name is its name lower-cased; a refusal built from an accepted query reads back (with our
# reader and with dnslib) as a response with the same ID, question and the asked RCODE; error_reply()
# never raises and never answers a response.
"""Fuzz target: DNS messages over UDP, both directions (parsers/dns.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports():
        from membrane.parsers import dns
        from membrane.parsers.errors import MalformedMessage
else:
    from membrane.parsers import dns
    from membrane.parsers.errors import MalformedMessage

from dns import message as dp_message
from dns import opcode as dp_opcode


def _check_query(data: bytes) -> None:
    try:
        q = dns.read_query(data)
    except MalformedMessage as e:
        assert e.offset is not None and 0 <= e.offset <= len(data), e.offset
        reply = dns.error_reply(data, dns.FORMERR)
        if reply is not None:
            assert len(data) >= 12 and not data[2] & 0x80
            assert dns.read_response(reply).rcode == dns.FORMERR
        return
    assert q.raw is data
    assert q.normalized_name == q.name.lower() and q.name.endswith(".")
    assert q == dns.read_query(data)  # deterministic (the name cache is per message)
    for rcode in (dns.REFUSED, dns.NXDOMAIN):
        reply = dns.refusal(data, rcode)
        r = dns.read_response(reply)
        assert (r.id, r.name, r.qtype, r.rcode, r.addresses, r.cnames) == (q.id, q.name, q.qtype, rcode, (), ())
        if q.opcode == 5:
            continue  # dnspython reads UPDATE (RFC 2136) sections by their own rules (zone must be SOA)
        m = dp_message.from_wire(reply)  # dnspython reads any label bytes (dnslib insists on UTF-8)
        assert (m.id, m.rcode(), m.opcode(), m.flags & 0x8000) == (q.id, rcode, dp_opcode.Opcode(q.opcode), 0x8000)
        assert (bool(m.flags & 0x0100), bool(m.flags & 0x0010), len(m.question)) == (q.rd, q.cd, 1)
        rrset = m.question[0]
        assert (dns.name_text(rrset.name.labels[:-1]), rrset.rdtype, rrset.rdclass) == (q.name, q.qtype, q.qclass)
        assert not m.answer and not m.authority


def _check_response(data: bytes) -> None:
    try:
        r = dns.read_response(data)
    except MalformedMessage as e:
        assert e.offset is not None and 0 <= e.offset <= len(data), e.offset
        return
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
