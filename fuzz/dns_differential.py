# Invariant: whenever the hand reader (read_query / read_response) accepts bytes, a reference reader
# built from dnslib's own decoders (DNSHeader.parse, DNSQuestion.parse, DNSBuffer.decode_name, A/AAAA/
# CNAME.parse, RDLENGTH framing of RFC 1035 §4.1.3) accepts them too and reads the same ID, flags,
# question, rcode, addresses, CNAME chain and minimum TTL. When the reader rejects bytes that the
# reference accepts, the reason is one of the documented stricter rules (STRICTER below), never a
# framing or truncation disagreement.
"""Fuzz target: the hand-written DNS reader against dnslib (differential), parsers/dns.py."""

from __future__ import annotations

import ipaddress
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

from dnslib import AAAA, CNAME, A, DNSHeader, DNSQuestion, DNSRecord
from dnslib.bit import get_bits
from dnslib.buffer import BufferError as DnslibBufferError
from dnslib.label import DNSBuffer, DNSLabel

# Rules the hand reader enforces and the dnslib reference does not (parsers/dns.py docstring).
STRICTER = (
    "does not point backwards",  # dnslib allows a pointer to any offset below the pointer's own end
    "points into the header",
    "over 63",  # dnslib reads length bytes 0x40-0xBF as long labels
    "longer than 255",
    "QDCOUNT is",
    "QR is",
    "OPT record",
    "more than one OPT",
)


class _Buffer(DNSBuffer):  # type: ignore[misc]
    """dnslib's DNSBuffer.decode_name (0.9.26) without its UTF-8 check: RFC 2181 §11 allows any label byte."""

    def decode_name(self, last: int = -1) -> DNSLabel:
        label = []
        done = False
        while not done:
            (length,) = self.unpack("!B")
            if get_bits(length, 6, 2) == 3:
                self.offset -= 1
                pointer = get_bits(self.unpack("!H")[0], 0, 14)
                save = self.offset
                if last == save:
                    raise DnslibBufferError("Recursive pointer in DNSLabel")
                if pointer < self.offset:
                    self.offset = pointer
                else:
                    raise DnslibBufferError("Invalid pointer in DNSLabel")
                label.extend(self.decode_name(save).label)
                self.offset = save
                done = True
            elif length > 0:
                label.append(self.get(length))
            else:
                done = True
        return DNSLabel(label)


class RefReject(Exception):
    pass


class Ref:
    """What the reference walk read (a plain class: test_replay loads targets outside sys.modules)."""

    def __init__(self, header: DNSHeader) -> None:
        self.header = header
        self.questions: list[tuple[tuple[bytes, ...], int, int]] = []
        # (section 0/1/2, owner labels, type, class, ttl, value: address text, CNAME target labels or None)
        self.records: list[tuple[int, tuple[bytes, ...], int, int, int, object]] = []
        self.cut = False


def reference(data: bytes, *, response: bool) -> Ref:
    """Walk `data` with dnslib's decoders; a response's answers are interpreted, a query's records only framed."""
    buf = _Buffer(data)
    try:
        ref = Ref(DNSHeader.parse(buf))
        h = ref.header
        for _ in range(h.q):
            q = DNSQuestion.parse(buf)
            ref.questions.append((tuple(q.qname.label), q.qtype, q.qclass))
        tc = response and bool(h.tc)
        for section, count in ((0, h.a), (1, h.auth), (2, h.ar)):
            for _ in range(count):
                try:
                    owner = buf.decode_name()
                    rtype, rclass, ttl, rdlength = buf.unpack("!HHIH")
                    if buf.remaining() < rdlength:
                        raise DnslibBufferError("Not enough bytes")
                except DnslibBufferError as e:
                    if tc and str(e).startswith("Not enough bytes"):
                        ref.cut = True
                        return ref
                    raise
                start = buf.offset
                value: object = None
                if response and section == 0 and rclass == 1 and rtype in (1, 28, 5):
                    rd = {1: A, 28: AAAA, 5: CNAME}[rtype].parse(buf, rdlength)
                    if buf.offset - start != rdlength:
                        raise RefReject(f"rdata of type {rtype} is {buf.offset - start} bytes, RDLENGTH {rdlength}")
                    value = tuple(rd.label.label) if rtype == 5 else str(rd)
                else:
                    buf.get(rdlength)
                ref.records.append((section, tuple(owner.label), rtype, rclass, ttl, value))
        if buf.remaining():
            raise RefReject("trailing bytes")
        return ref
    except RefReject:
        raise
    except Exception as e:  # dnslib raises DNSError, BufferError, struct.error, RecursionError, ...
        raise RefReject(f"{type(e).__name__}: {e}") from e


def _norm(labels: tuple[bytes, ...]) -> str:
    return dns.name_text(labels).lower()


def _check_query(data: bytes) -> None:
    try:
        q = dns.read_query(data)
    except MalformedMessage as e:
        try:
            reference(data, response=False)
        except RefReject:
            return
        assert any(rule in str(e) for rule in STRICTER), f"reader rejects what dnslib reads: {e}"
        return
    try:
        ref = reference(data, response=False)
    except RefReject as e:
        raise AssertionError(f"reader accepts a query dnslib rejects: {e}") from e
    h = ref.header
    assert (q.id, q.opcode, q.rd, q.cd, h.qr, len(ref.questions)) == (h.id, h.opcode, bool(h.rd), bool(h.cd), 0, 1)
    labels, qtype, qclass = ref.questions[0]
    assert (q.name, q.qtype, q.qclass) == (dns.name_text(labels), qtype, qclass)
    try:
        full = DNSRecord.parse(data)
    except Exception:
        return  # dnslib's whole-message parse trips on rdata it interprets (or UTF-8); the walk above agreed
    assert (full.header.id, full.header.bitmap, tuple(full.q.qname.label)) == (q.id, h.bitmap, labels)


def _check_response(data: bytes) -> None:
    try:
        r = dns.read_response(data)
    except MalformedMessage as e:
        try:
            reference(data, response=True)
        except RefReject:
            return
        assert any(rule in str(e) for rule in STRICTER), f"reader rejects what dnslib reads: {e}"
        return
    try:
        ref = reference(data, response=True)
    except RefReject as e:
        raise AssertionError(f"reader accepts a response dnslib rejects: {e}") from e
    h = ref.header
    assert (r.id, h.qr) == (h.id, 1)
    if ref.questions:
        labels, qtype, _qclass = ref.questions[0]
        assert (r.name, r.qtype) == (dns.name_text(labels), qtype)
        chain = {_norm(labels)}
    else:
        assert (r.name, r.qtype) == ("", 0)
        chain = set()
    rcode = h.rcode
    addresses: list[str] = []
    cnames: list[str] = []
    ttls: list[int] = []
    for section, owner, rtype, rclass, ttl, value in ref.records:
        if section == 2 and rtype == 41:
            rcode |= (ttl >> 24) << 4
        if section != 0 or rclass != 1 or rtype not in (1, 28, 5) or _norm(owner) not in chain:
            continue
        if rtype == 5:
            assert isinstance(value, tuple)
            chain.add(_norm(value))
            cnames.append(_norm(value))
        else:
            addresses.append(str(ipaddress.ip_address(str(value))))
        ttls.append(0 if ttl & 0x80000000 else ttl)
    assert r.rcode == rcode, (r.rcode, rcode)
    assert [str(ipaddress.ip_address(a)) for a in r.addresses] == addresses, (r.addresses, addresses)
    assert list(r.cnames) == cnames, (r.cnames, cnames)
    assert r.min_ttl == (min(ttls) if ttls else None), (r.min_ttl, ttls)


def check(data: bytes) -> None:
    _check_query(data)
    _check_response(data)


def TestOneInput(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
