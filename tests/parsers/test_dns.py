"""DNS reader, TCP framing and refusals (parsers/dns.py), checked against dnslib and dnspython.

Case table (malformed inputs): each row is a message that must be rejected with MalformedMessage
naming the rule and the byte offset; the rule's RFC section is in the row id or the assertion text.
"""

from __future__ import annotations

import ipaddress
import struct

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import pytest
from dnslib import AAAA, CNAME, EDNS0, QTYPE, RR, A, DNSHeader, DNSLabel, DNSQuestion, DNSRecord
from hypothesis import given
from hypothesis import strategies as st
from membrane.parsers.dns import (
    FORMERR,
    NOERROR,
    NXDOMAIN,
    REFUSED,
    SERVFAIL,
    DnsParser,
    DnsTcpParser,
    UnreadableMessage,
    dns_rcode,
    frame_tcp,
    name_text,
    read_message,
    read_query,
    read_response,
    refusal,
)
from membrane.parsers.errors import MalformedMessage, MessageTooLarge, ProtocolViolation
from membrane.parsers.events import Direction, DnsQuery, DnsResponse, Reason

from tests.helpers.feed import all_chunkings, feed_all

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT


def header(qid: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack(">HHHHHH", qid, flags, qd, an, ns, ar)


def wire_name(*labels: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def rr(owner: bytes, rtype: int, rdata: bytes, ttl: int = 60, rclass: int = 1) -> bytes:
    return owner + struct.pack(">HHIH", rtype, rclass, ttl, len(rdata)) + rdata


QUESTION = wire_name(b"www", b"example", b"com") + b"\x00\x01\x00\x01"  # www.example.com. A IN, at offset 12
QNAME_PTR = b"\xc0\x0c"  # pointer to the question name
OPT_RR = b"\x00" + struct.pack(">HHIH", 41, 4096, 0, 0)


def dnslib_query(name: str = "www.example.com", qtype: str = "A", edns: bool = False) -> bytes:
    q = DNSRecord.question(name, qtype)
    if edns:
        q.add_ar(EDNS0(udp_len=4096))
    return bytes(q.pack())


# --- queries -------------------------------------------------------------------------------------


def test_query_fields_and_case() -> None:
    """The question name keeps the client's case in `name`; `normalized_name` is Cilium's lower-case FQDN."""
    raw = dnslib_query("WwW.ExAmple.COM", "AAAA")
    q = read_query(raw)
    assert (q.name, q.normalized_name, q.qtype, q.qclass, q.opcode, q.rd, q.cd) == (
        "WwW.ExAmple.COM.", "www.example.com.", 28, 1, 0, True, False,
    )
    assert q.raw is raw  # the bytes that go upstream unchanged


def test_query_with_edns_and_cd() -> None:
    """A query with an EDNS OPT record (RFC 6891 §6.1.1) and the CD bit (RFC 4035 §3.2.2) is read."""
    q = DNSRecord(DNSHeader(id=7, rd=0, cd=1), q=DNSQuestion("a.b", QTYPE.TXT))
    q.add_ar(EDNS0(udp_len=1232, flags="do"))
    event = read_query(bytes(q.pack()))
    assert (event.id, event.rd, event.cd, event.qtype) == (7, False, True, 16)


def test_root_name() -> None:
    """The root name reads as "." (RFC 1035 §3.1)."""
    q = read_query(header() + b"\x00\x00\x02\x00\x01")
    assert (q.name, q.normalized_name, q.qtype) == (".", ".", 2)


@pytest.mark.parametrize(
    ("labels", "text"),
    [
        ((b"a.b", b"c"), "a\\.b.c."),
        ((b"sp ace", b"x"), "sp\\ ace.x."),
        ((b"\x00\xff", b"Z"), "\\000\\255.Z."),
        ((b'q"@;()\\\'', ), 'q\\"\\@\\;\\(\\)\\\\\\\'.'),
        ((b"_srv", b"*", b"-x-"), "_srv.*.-x-."),
    ],
)
def test_name_escaping_follows_miekg(labels: tuple[bytes, ...], text: str) -> None:
    """Label bytes print as miekg/dns prints them, so a label with a dot can never pose as two labels."""
    assert name_text(labels) == text
    q = read_query(header() + wire_name(*labels) + b"\x00\x01\x00\x01")
    assert q.name == text


def test_normalisation_lowercases_ascii_only() -> None:
    """Case folding is ASCII only (RFC 4343 §3): escaped bytes keep their value."""
    q = read_query(header() + wire_name(b"\xc9X", b"COM") + b"\x00\x01\x00\x01")
    assert (q.name, q.normalized_name) == ("\\201X.COM.", "\\201x.com.")


NAME_LABEL = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1, max_size=63)
NAMES = st.lists(NAME_LABEL, min_size=1, max_size=6).filter(lambda ls: sum(len(x) + 1 for x in ls) + 1 <= 255)


@given(
    labels=NAMES,
    qid=st.integers(0, 0xFFFF),
    qtype=st.integers(0, 0xFFFF),
    qclass=st.sampled_from([1, 3, 255]),
    rd=st.booleans(),
    cd=st.booleans(),
    opcode=st.sampled_from([0, 2, 4, 5]),
    edns=st.booleans(),
)
def test_query_round_trip(
    labels: list[str], qid: int, qtype: int, qclass: int, rd: bool, cd: bool, opcode: int, edns: bool
) -> None:
    """read_query(dnslib-built query) == the query's fields (RFC 1035 §4.1.1-§4.1.2)."""
    name = ".".join(labels)
    record = DNSRecord(DNSHeader(id=qid, rd=int(rd), cd=int(cd), opcode=opcode), q=DNSQuestion(name, qtype, qclass))
    if edns:
        record.add_ar(EDNS0(udp_len=4096))
    raw = bytes(record.pack())
    assert read_query(raw) == DnsQuery(
        id=qid, name=name + ".", normalized_name=name.lower() + ".", qtype=qtype, qclass=qclass,
        opcode=opcode, rd=rd, cd=cd,
    )


# --- responses -----------------------------------------------------------------------------------


def test_response_cname_chain_addresses_and_min_ttl() -> None:
    """toFQDNs data: A/AAAA along the CNAME chain, targets in order, the smallest TTL (RFC 1034 §3.6.2)."""
    q = DNSRecord.question("WWW.example.com")
    r = q.reply()
    r.add_answer(RR("WWW.example.com", QTYPE.CNAME, rdata=CNAME("Edge.CDN.net"), ttl=300))
    r.add_answer(RR("edge.cdn.net", QTYPE.CNAME, rdata=CNAME("a1.cdn.net"), ttl=200))
    r.add_answer(RR("a1.cdn.net", QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
    r.add_answer(RR("A1.cdn.net", QTYPE.AAAA, rdata=AAAA("2001:db8::1"), ttl=90))
    raw = bytes(r.pack())
    resp = read_response(raw)
    assert resp == DnsResponse(
        id=q.header.id, name="WWW.example.com.", normalized_name="www.example.com.", qtype=1, rcode=NOERROR,
        addresses=("192.0.2.1", "2001:db8::1"), cnames=("edge.cdn.net.", "a1.cdn.net."), rrtypes=(5, 5, 1, 28),
        min_ttl=60,
    )
    assert resp.raw is raw


_AAAA_GROUPS = [
    (0,) * 8, (0,) * 7 + (1,), (1,) + (0,) * 7, (1, 0, 2, 0, 3, 0, 4, 0), (1, 0, 0, 2, 0, 0, 3, 4),
    (1, 0, 0, 2, 0, 0, 0, 3), (0, 0, 1, 0, 0, 0, 0, 2), (0x2001, 0xDB8, 0, 0, 1, 0, 0, 1),
    (0xFFFF,) * 8, (0, 0, 0, 0, 0, 0xFFFF, 0xC000, 0x280), (0, 0, 0, 0, 0, 0, 0xC000, 0x280),
    (0xFE80, 0, 0, 0, 0x1FF, 0xFE23, 0x4567, 0x890A), (0xABC, 0xF, 0x10, 0x100, 0, 0xFFFF, 0, 0),
]


@pytest.mark.parametrize("groups", _AAAA_GROUPS)
def test_aaaa_text_is_rfc5952_as_ipaddress_prints_it(groups: tuple[int, ...]) -> None:
    """AAAA text is RFC 5952 §4 canonical (longest, then first, zero run as ::; lower-case hex), as ipaddress prints it."""
    rdata = struct.pack(">8H", *groups)
    raw = header(flags=_R, an=1) + QUESTION + rr(QNAME_PTR, 28, rdata)
    assert read_response(raw).addresses == (str(ipaddress.IPv6Address(rdata)),)


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=4, max_size=4))
def test_address_text_matches_ipaddress(v6: bytes, v4: bytes) -> None:
    """A (RFC 1035 §3.4.1) and AAAA (RFC 3596 §2.2) rdata read as the text ipaddress gives for the same bytes."""
    raw = header(flags=_R, an=2) + QUESTION + rr(QNAME_PTR, 28, v6) + rr(QNAME_PTR, 1, v4)
    assert read_response(raw).addresses == (str(ipaddress.IPv6Address(v6)), str(ipaddress.IPv4Address(v4)))


def test_records_off_the_chain_are_not_learned() -> None:
    """An address for a name the query did not lead to is skipped, so it never widens toFQDNs."""
    r = DNSRecord.question("a.example").reply()
    r.add_answer(RR("bank.example", QTYPE.A, rdata=A("203.0.113.9"), ttl=1))
    r.add_answer(RR("other.example", QTYPE.CNAME, rdata=CNAME("a.example"), ttl=1))
    r.add_answer(RR("a.example", QTYPE.A, rdata=A("192.0.2.7"), ttl=30))
    resp = read_response(bytes(r.pack()))
    assert (resp.addresses, resp.cnames, resp.min_ttl) == (("192.0.2.7",), (), 30)


def test_nxdomain_and_no_answers() -> None:
    """An NXDOMAIN answer carries the rcode and no addresses; min_ttl is None without answers."""
    r = DNSRecord.question("nope.example").reply()
    r.header.rcode = NXDOMAIN
    resp = read_response(bytes(r.pack()))
    assert (resp.rcode, resp.addresses, resp.min_ttl) == (NXDOMAIN, (), None)


def test_extended_rcode_from_opt() -> None:
    """The OPT TTL's top byte extends the rcode (RFC 6891 §6.1.3): BADVERS is 16, not NOERROR."""
    r = DNSRecord.question("a.example").reply()
    r.add_ar(EDNS0(udp_len=1232, ext_rcode=1))
    assert read_response(bytes(r.pack())).rcode == 16


def test_ttl_with_top_bit_counts_as_zero() -> None:
    """A TTL with the most significant bit set is treated as zero (RFC 2181 §8)."""
    msg = header(flags=0x8180, an=1) + QUESTION + rr(QNAME_PTR, 1, b"\x01\x02\x03\x04", ttl=0x80000001)
    assert read_response(msg).min_ttl == 0


def test_response_without_question() -> None:
    """A FORMERR-style reply with QDCOUNT 0 reads with an empty name (RFC 1035 §4.1.1)."""
    resp = read_response(header(flags=0x8001, qd=0))
    assert (resp.name, resp.qtype, resp.rcode) == ("", 0, FORMERR)


def test_truncated_response_with_tc_is_read_up_to_the_cut() -> None:
    """With TC set a record cut off by the end of the message ends the walk (RFC 2181 §9); without TC it is an error."""
    a1 = rr(QNAME_PTR, 1, b"\x01\x02\x03\x04")
    msg = QUESTION + a1 + a1[:7]
    resp = read_response(header(flags=0x8380, an=2) + msg)
    assert resp.addresses == ("1.2.3.4",)
    with pytest.raises(MalformedMessage, match="runs past the end"):
        read_response(header(flags=0x8180, an=2) + msg)
    with pytest.raises(MalformedMessage, match="bytes after the last record"):
        read_response(header(flags=0x8380, an=1) + QUESTION + a1 + b"\x00")  # TC excuses a cut, not garbage


def test_pointer_chain_reads_once_per_target() -> None:
    """A pointer to a pointer resolves (RFC 1035 §4.1.4) and repeated owners reuse the cached suffix."""
    a = rr(QNAME_PTR, 1, b"\x0a\x00\x00\x01")
    second_owner = 12 + len(QUESTION)  # the first answer's owner (a pointer) is itself a pointer target
    b = rr(struct.pack(">H", 0xC000 | second_owner), 1, b"\x0a\x00\x00\x02")
    resp = read_response(header(flags=0x8180, an=2) + QUESTION + a + b)
    assert resp.addresses == ("10.0.0.1", "10.0.0.2")


ADDRS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: str(ipaddress.IPv6Address(a))),
)


@given(
    qname=NAMES,
    chain=st.lists(NAMES, max_size=4),
    addresses=st.lists(st.tuples(ADDRS, st.integers(0, 0x7FFFFFFF)), max_size=6),
    cname_ttls=st.lists(st.integers(0, 0x7FFFFFFF), min_size=4, max_size=4),
    rcode=st.sampled_from([NOERROR, NXDOMAIN, SERVFAIL]),
)
def test_response_round_trip(
    qname: list[str], chain: list[list[str]], addresses: list[tuple[str, int]], cname_ttls: list[int], rcode: int
) -> None:
    """read_response(dnslib-built, compressed response) recovers its chain, addresses and minimum TTL."""
    q = DNSRecord.question(".".join(qname))
    r = q.reply()
    r.header.rcode = rcode
    owner = ".".join(qname)
    ttls: list[int] = []
    for target_labels, ttl in zip(chain, cname_ttls, strict=False):
        target = ".".join(target_labels)
        r.add_answer(RR(owner, QTYPE.CNAME, rdata=CNAME(target), ttl=ttl))
        ttls.append(ttl)
        owner = target
    for address, ttl in addresses:
        rd = AAAA(address) if ":" in address else A(address)
        r.add_answer(RR(owner, QTYPE.AAAA if ":" in address else QTYPE.A, rdata=rd, ttl=ttl))
        ttls.append(ttl)
    resp = read_response(bytes(r.pack()))
    assert resp.id == q.header.id
    assert (resp.name, resp.normalized_name) == (".".join(qname) + ".", ".".join(qname).lower() + ".")
    assert resp.rcode == rcode
    assert resp.cnames == tuple(".".join(t).lower() + "." for t in chain)
    assert resp.addresses == tuple(a for a, _ in addresses)
    assert resp.min_ttl == (min(ttls) if ttls else None)


# --- malformed -----------------------------------------------------------------------------------

MALFORMED_QUERIES: list[tuple[str, bytes, str, int]] = [
    ("short-header-§4.1.1", b"\x12\x34\x01", "shorter than the 12-byte header", 3),
    ("qr-set", header(flags=0x8100) + QUESTION, "QR is set", 2),
    ("qdcount-0", header(qd=0), "QDCOUNT is 0", 4),
    ("qdcount-2", header(qd=2) + QUESTION + QUESTION, "QDCOUNT is 2", 4),
    ("pointer-into-header-§4.1.4", header() + b"\x01a\xc0\x04\x00\x01\x00\x01", "points into the header", 14),
    ("pointer-to-self", header() + b"\xc0\x0c\x00\x01\x00\x01", "does not point backwards", 12),
    ("pointer-forward", header() + b"\x01a\xc0\x20\x00\x01\x00\x01", "does not point backwards", 14),
    ("pointer-out-of-range", header() + b"\xff\xff\x00\x01\x00\x01", "does not point backwards", 12),
    ("pointer-cut-off", header() + b"\x01a\xc0", "compression pointer cut off", 14),
    ("label-64-§2.3.4", header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", "over 63", 12),
    ("label-type-0x80", header() + b"\x80\x00\x00\x01\x00\x01", "over 63", 12),
    ("truncated-label", header() + b"\x05abc", "label runs past the end", 12),
    ("name-unterminated", header() + b"\x03abc", "name runs past the end", 16),
    ("name-over-255-§2.3.4", header() + b"\x3f" + b"a" * 63 + (b"\x3f" + b"b" * 63) * 3 + b"\x00\x00\x01\x00\x01", "longer than 255", 204),
    ("question-cut", header() + QUESTION[:-2], "question runs past the end", 29),
    ("ancount-too-high", header(ar=2) + QUESTION + OPT_RR, "name runs past the end", 44),
    ("arcount-too-low", header() + QUESTION + OPT_RR, "11 bytes after the last record", 33),
    ("rr-header-cut", header(ar=1) + QUESTION + OPT_RR[:6], "record header runs past", 34),
    ("rdata-cut", header(ar=1) + QUESTION + b"\x00" + struct.pack(">HHIH", 41, 512, 0, 8) + b"\x00\x0a", "record data runs past", 44),
    ("two-opt-§6.1.1", header(ar=2) + QUESTION + OPT_RR + OPT_RR, "more than one OPT", 44),
    ("opt-in-answer-§6.1.1", header(an=1) + QUESTION + OPT_RR, "OPT record outside the additional section", 33),
    ("opt-not-root-§6.1.2", header(ar=1) + QUESTION + b"\x01a" + OPT_RR, "not owned by the root", 33),
]


@pytest.mark.parametrize(("data", "needle", "offset"), [c[1:] for c in MALFORMED_QUERIES], ids=[c[0] for c in MALFORMED_QUERIES])
def test_malformed_query_rejected(data: bytes, needle: str, offset: int) -> None:
    """Each malformed query raises MalformedMessage naming the rule and the byte offset (RFC 1035 §4.1)."""
    with pytest.raises(MalformedMessage) as info:
        read_query(data)
    assert needle in str(info.value)
    assert info.value.offset == offset
    assert info.value.direction is C2S
    assert info.value.reason is Reason.MALFORMED


_R = 0x8180
MALFORMED_RESPONSES: list[tuple[str, bytes, str, int]] = [
    ("qr-clear", header(flags=0x0100) + QUESTION, "QR is clear", 2),
    ("qdcount-2", header(flags=_R, qd=2) + QUESTION + QUESTION, "QDCOUNT is 2", 4),
    ("owner-pointer-loop", header(flags=_R, an=1) + QUESTION + b"\xc0\x21" + struct.pack(">HHIH", 1, 1, 0, 4) + b"\x01\x02\x03\x04", "does not point backwards", 33),
    ("a-rdlength-5-§3.4.1", header(flags=_R, an=1) + QUESTION + rr(QNAME_PTR, 1, b"\x01\x02\x03\x04\x05"), "A record with RDLENGTH 5", 43),
    ("aaaa-rdlength-4-rfc3596", header(flags=_R, an=1) + QUESTION + rr(QNAME_PTR, 28, b"\x01\x02\x03\x04"), "AAAA record with RDLENGTH 4", 43),
    ("cname-short-of-rdlength-§3.3.1", header(flags=_R, an=1) + QUESTION + rr(QNAME_PTR, 5, QNAME_PTR + b"\x00"), "does not end at RDLENGTH", 45),
    ("cname-past-rdlength", header(flags=_R, an=1) + QUESTION + rr(QNAME_PTR, 5, b"\x03abc") + b"\x00", "does not end at RDLENGTH", 45),
    ("cname-pointer-loop", header(flags=_R, an=1) + QUESTION + rr(QNAME_PTR, 5, b"\x01a\xc0\x2d"), "does not point backwards", 47),
    ("ancount-too-high", header(flags=_R, an=3) + QUESTION + rr(QNAME_PTR, 1, b"\x01\x02\x03\x04"), "name runs past the end", 49),
    ("nscount-too-high", header(flags=_R, ns=1) + QUESTION, "name runs past the end", 33),
    ("trailing-garbage", header(flags=_R) + QUESTION + b"\x00\x00", "2 bytes after the last record", 33),
    ("opt-in-authority", header(flags=_R, ns=1) + QUESTION + OPT_RR, "OPT record outside", 33),
]


@pytest.mark.parametrize(("data", "needle", "offset"), [c[1:] for c in MALFORMED_RESPONSES], ids=[c[0] for c in MALFORMED_RESPONSES])
def test_malformed_response_rejected(data: bytes, needle: str, offset: int) -> None:
    """Each malformed response raises MalformedMessage naming the rule and the byte offset (RFC 1035 §4.1)."""
    with pytest.raises(MalformedMessage) as info:
        read_response(data)
    assert needle in str(info.value)
    assert info.value.offset == offset
    assert info.value.direction is S2C


def test_two_pointer_cycle_is_rejected_where_dnslib_recurses() -> None:
    """Two backward pointers whose labels span each other form a loop (RFC 9267 §2): typed error, not recursion."""
    # A first record pads the message so the second owner starts at 640 (0x280): pointer bytes to
    # 640 and 642 are then valid UTF-8, which dnslib insists on for label bytes. The owner: a 6-byte
    # label (641..646), at 647 a pointer to 642; at 642 a 2-byte label (643..644), at 645 a pointer
    # back to 640. Each pointer points below itself, so dnslib's "pointer < offset" check lets it
    # recurse until Python's stack runs out.
    pad = rr(QNAME_PTR, 0xFF00, b"\x00" * (640 - 33 - 12))
    owner = b"\x06" + b"x" + b"\x02" + b"yy" + b"\xc2\x80" + b"\xc2\x82"
    body = QUESTION + pad + owner + struct.pack(">HHIH", 1, 1, 0, 4) + b"\x01\x02\x03\x04"
    msg = header(flags=_R, an=2) + body
    with pytest.raises(MalformedMessage, match="does not point backwards") as info:
        read_response(msg)
    assert info.value.offset == 647
    with pytest.raises(RecursionError):
        DNSRecord.parse(msg)


def test_many_pointer_chain_stays_linear() -> None:
    """A long chain of pointers to pointers is either read or refused, and each target is decoded once (RFC 9267 §2)."""
    # Question www.example.com at 12; then 1000 answers, each owner a pointer to the previous owner
    # (1000 x 16 bytes keeps every target under the 14-bit pointer limit).
    body = bytearray(QUESTION)
    prev = 12
    count = 1000
    for _ in range(count):
        here = 12 + len(body)
        body += struct.pack(">H", 0xC000 | prev) + struct.pack(">HHIH", 1, 1, 5, 4) + b"\x0a\x00\x00\x01"
        prev = here
    resp = read_response(header(flags=_R, an=count) + bytes(body))
    assert len(resp.addresses) == count


# --- refusals ------------------------------------------------------------------------------------


def refuse(raw: bytes, reason: Reason = Reason.POLICY_DENIED) -> bytes:
    """The proxy's refusal of the query `raw` (read as the UDP parser reads it)."""
    [query] = DnsParser(C2S).feed(raw)
    assert isinstance(query, DnsQuery)
    return refusal(query, reason)


def dnslib_refusal(query_raw: bytes, rcode: int) -> bytes:
    """The reference: the same refusal built by dnslib from the parsed query."""
    q = DNSRecord.parse(query_raw)
    h = q.header
    r = DNSRecord(DNSHeader(id=h.id, qr=1, opcode=h.opcode, rd=h.rd, cd=h.cd, ra=h.rd, rcode=rcode), q=q.q)
    opt = [a for a in q.ar if a.rtype == QTYPE.OPT]
    if opt:
        r.add_ar(EDNS0(udp_len=1232, flags="do" if opt[0].ttl & 0x8000 else ""))
    return bytes(r.pack())


@pytest.mark.parametrize("reason", list(Reason))
@pytest.mark.parametrize("edns", [False, True])
def test_refusal_shape(reason: Reason, edns: bool) -> None:
    """The refusal keeps ID, opcode, RD, CD and the question as sent; QR set; no answers (RFC 1035 §4.1.1)."""
    q = DNSRecord(DNSHeader(id=0xBEEF, rd=1, cd=1), q=DNSQuestion("Api.Example.ORG", QTYPE.AAAA))
    if edns:
        q.add_ar(EDNS0(udp_len=4096, flags="do"))
    raw = bytes(q.pack())
    rcode = dns_rcode(reason)
    reply = refuse(raw, reason)
    assert reply == dnslib_refusal(raw, rcode)

    parsed = DNSRecord.parse(reply)
    assert (parsed.header.id, parsed.header.qr, parsed.header.rcode, parsed.header.rd, parsed.header.cd) == (0xBEEF, 1, rcode, 1, 1)
    assert parsed.header.ra == 1
    assert parsed.header.aa == 0
    assert parsed.rr == []
    assert str(parsed.q.qname) == "Api.Example.ORG."
    assert parsed.q.qtype == QTYPE.AAAA

    m = dns.message.from_wire(reply)
    assert m.id == 0xBEEF
    assert m.rcode() == dns.rcode.Rcode(rcode)
    assert m.opcode() == dns.opcode.QUERY
    assert m.flags & dns.flags.QR
    assert m.flags & dns.flags.RD
    assert m.flags & dns.flags.CD
    assert m.flags & dns.flags.RA
    assert not m.answer
    assert not m.authority
    assert m.question[0].name.to_text() == "Api.Example.ORG."
    assert m.edns == (0 if edns else -1)
    if edns:
        assert m.ednsflags & dns.flags.DO
        assert m.payload == 1232

    resp = read_response(reply)
    assert (resp.id, resp.name, resp.rcode, resp.addresses) == (0xBEEF, "Api.Example.ORG.", rcode, ())


@given(labels=NAMES, qid=st.integers(0, 0xFFFF), qtype=st.integers(0, 0xFFFF), rd=st.booleans(), cd=st.booleans(),
       opcode=st.sampled_from([0, 1, 2, 4, 5]), do=st.sampled_from([None, False, True]), reason=st.sampled_from(Reason))
def test_refusal_equals_dnslib(labels: list[str], qid: int, qtype: int, rd: bool, cd: bool, opcode: int,
                               do: bool | None, reason: Reason) -> None:
    """The hand-built refusal is byte-for-byte what dnslib builds from the same query."""
    q = DNSRecord(DNSHeader(id=qid, rd=int(rd), cd=int(cd), opcode=opcode), q=DNSQuestion(".".join(labels), qtype))
    if do is not None:
        q.add_ar(EDNS0(udp_len=512, flags="do" if do else ""))
    raw = bytes(q.pack())
    assert refuse(raw, reason) == dnslib_refusal(raw, dns_rcode(reason))


def test_refusal_without_rd_has_no_ra_and_keeps_opcode() -> None:
    """RA follows RD; the opcode is echoed (RFC 1035 §4.1.1)."""
    raw = bytes(DNSRecord(DNSHeader(id=1, rd=0, opcode=4), q=DNSQuestion("x.example", QTYPE.SOA)).pack())
    h = DNSRecord.parse(refuse(raw)).header
    assert (h.ra, h.rd, h.opcode, h.rcode) == (0, 0, 4, REFUSED)


def test_refusal_needs_the_query_bytes() -> None:
    """A DnsQuery whose raw bytes are not the query it claims to be cannot be refused from them."""
    forged = DnsQuery(id=1, name="a.", normalized_name="a.", qtype=1, raw=header(qd=0))
    with pytest.raises(MalformedMessage):
        refusal(forged, Reason.POLICY_DENIED)


def test_refusal_of_unreadable_message() -> None:
    """FORMERR answers keep ID/opcode/RD; nothing answers a short message or a response (no reply loops)."""
    data = header(qid=0x4242, flags=0x2100, qd=9) + b"junk"
    [unreadable] = DnsParser(C2S).feed(data)
    assert isinstance(unreadable, UnreadableMessage)
    reply = refusal(unreadable, Reason.MALFORMED)
    assert reply is not None
    m = dns.message.from_wire(reply)
    assert (m.id, m.rcode(), m.opcode(), bool(m.flags & dns.flags.RD), bool(m.flags & dns.flags.QR)) == (
        0x4242, dns.rcode.FORMERR, dns.opcode.NOTIFY, True, True,
    )
    assert len(m.question) == 0
    for short_or_response in (b"\x00" * 11, header(flags=0x8000)):
        [event] = DnsParser(C2S).feed(short_or_response)
        assert isinstance(event, UnreadableMessage)
        assert refusal(event, Reason.MALFORMED) is None


@pytest.mark.parametrize(
    ("reason", "rcode"),
    [
        (Reason.POLICY_DENIED, REFUSED),
        (Reason.MALFORMED, FORMERR),
        (Reason.TOO_LARGE, FORMERR),
        (Reason.UPSTREAM_FAILED, SERVFAIL),
        (Reason.UPSTREAM_TIMEOUT, SERVFAIL),
    ],
)
def test_dns_rcode(reason: Reason, rcode: int) -> None:
    """Every Reason maps to its RCODE (STYLE.md §3.4)."""
    assert dns_rcode(reason) == rcode


def test_dns_rcode_covers_every_reason() -> None:
    """No Reason is left unmapped."""
    assert {dns_rcode(r) for r in Reason} <= {REFUSED, FORMERR, SERVFAIL}


# --- TCP -----------------------------------------------------------------------------------------

Q1 = dnslib_query("one.example", "A")
Q2 = dnslib_query("Two.Example", "AAAA", edns=True)
STREAM = frame_tcp(Q1) + frame_tcp(Q2)


@pytest.mark.parametrize("chunks", all_chunkings(STREAM, trailing=b"\x00\x20\x12"))
def test_tcp_framing_any_chunking(chunks: list[bytes]) -> None:
    """Two messages on one connection split at any byte boundary come out whole, in order (RFC 7766 §8)."""
    parser = DnsTcpParser(C2S)
    assert [e.raw for e in feed_all(parser.feed, chunks)] == [Q1, Q2]
    assert parser.buffered_bytes == 3  # the trailing partial message waits
    with pytest.raises(MalformedMessage, match="stream ended 3 bytes into a message") as info:
        parser.end_of_stream()
    assert info.value.offset == len(STREAM)


@pytest.mark.parametrize("chunks", all_chunkings(STREAM))
def test_tcp_parser_any_chunking(chunks: list[bytes]) -> None:
    """DnsTcpParser yields one DnsQuery per framed message whatever the read boundaries."""
    parser = DnsTcpParser(C2S)
    events = feed_all(parser.feed, chunks)
    assert [(e.name, e.qtype) for e in events if isinstance(e, DnsQuery)] == [("one.example.", 1), ("Two.Example.", 28)]
    assert [e.raw for e in events] == [Q1, Q2]
    parser.end_of_stream()  # at a boundary: fine


def test_tcp_responses() -> None:
    """SERVER_TO_CLIENT reads responses."""
    r = DNSRecord.parse(Q1).reply()
    r.add_answer(RR("one.example", QTYPE.A, rdata=A("192.0.2.5"), ttl=9))
    events = DnsTcpParser(S2C).feed(frame_tcp(bytes(r.pack())))
    assert len(events) == 1
    assert isinstance(events[0], DnsResponse)
    assert events[0].addresses == ("192.0.2.5",)


def test_tcp_length_limits() -> None:
    """A length over the limit is MessageTooLarge before buffering; under 12 is malformed; the stream is dead after."""
    parser = DnsTcpParser(C2S, max_message_bytes=100)
    assert [e.raw for e in parser.feed(frame_tcp(Q1))] == [Q1]
    with pytest.raises(MessageTooLarge) as too_large:
        parser.feed(b"\x00\x65")
    assert too_large.value.offset == len(Q1) + 2
    assert too_large.value.reason is Reason.TOO_LARGE
    assert parser.buffered_bytes == 2
    with pytest.raises(ProtocolViolation):
        parser.feed(b"")
    with pytest.raises(MalformedMessage, match="shorter than a DNS header"):
        DnsTcpParser(C2S).feed(b"\x00\x0b")
    with pytest.raises(MalformedMessage, match="shorter than a DNS header"):
        DnsTcpParser(C2S).feed(b"\x00\x00")
    with pytest.raises(ValueError):
        DnsTcpParser(C2S, max_message_bytes=70000)


@pytest.mark.parametrize("chunks", all_chunkings(STREAM + b"\x00\x05abcde"))
def test_tcp_broken_frame_keeps_the_queries_before_it(chunks: list[bytes]) -> None:
    """A broken frame after two valid queries: every valid query is returned (as events or in the
    error's events_before) before the error, so their answers are not lost (issue 13: valid requests
    before a malformed one still get their answers)."""
    parser = DnsTcpParser(C2S)
    seen: list[bytes] = []
    with pytest.raises(MalformedMessage) as info:
        for chunk in chunks:
            seen.extend(e.raw for e in parser.feed(chunk))
    seen.extend(e.raw for e in info.value.events_before)
    assert seen == [Q1, Q2]
    assert info.value.offset == len(STREAM)


def test_tcp_parser_error_offset_counts_from_stream_start() -> None:
    """An unreadable second message is reported at its stream offset, and the stream goes on (its frame was intact)."""
    bad = header(qd=0)
    parser = DnsTcpParser(C2S)
    first, unreadable, third = parser.feed(frame_tcp(Q1) + frame_tcp(bad) + frame_tcp(Q2))
    assert isinstance(unreadable, UnreadableMessage)
    assert unreadable.offset == 2 + len(Q1) + 2 + 4
    assert unreadable.raw == bad
    assert [first.raw, third.raw] == [Q1, Q2]


def test_frame_tcp() -> None:
    """frame_tcp prefixes the 2-byte length (RFC 1035 §4.2.2) and refuses what cannot be framed."""
    assert frame_tcp(b"x" * 300)[:2] == b"\x01\x2c"
    with pytest.raises(ValueError):
        frame_tcp(b"x" * 65536)


def test_read_message_dispatches_on_direction() -> None:
    """CLIENT_TO_SERVER reads a query, SERVER_TO_CLIENT a response."""
    assert isinstance(read_message(C2S, Q1), DnsQuery)
    assert isinstance(read_message(S2C, refuse(Q1)), DnsResponse)
    with pytest.raises(MalformedMessage):
        read_message(S2C, Q1)


def test_label_bytes_round_trip_through_dnslib() -> None:
    """Names built by dnslib from raw label bytes read back as the same labels (escaped text)."""
    raw = bytes(DNSRecord(DNSHeader(id=1), q=DNSQuestion(DNSLabel([b"a.b", b"c d"]), 1)).pack())
    assert read_query(raw).name == "a\\.b.c\\ d."


# --- found by fuzzing (fuzz/corpus/dns_*/crash_*) -------------------------------------------------


def test_records_in_a_query_are_framed_not_interpreted() -> None:
    """A query's answer-section records are only framed by RDLENGTH (RFC 1035 §4.1.3): an AAAA of 4 bytes is not an error there."""
    data = header(flags=0x0080, an=1) + QUESTION + rr(QNAME_PTR, 28, b"\x01\x02\x03\x04")
    assert read_query(data).name == "www.example.com."
    with pytest.raises(MalformedMessage, match="AAAA record with RDLENGTH 4"):
        read_response(header(flags=0x8180, an=1) + QUESTION + rr(QNAME_PTR, 28, b"\x01\x02\x03\x04"))


def test_refusal_keeps_binary_label_bytes() -> None:
    """A refusal repeats a question with non-UTF-8 label bytes exactly (RFC 2181 §11); dnspython reads it back."""
    data = header(flags=0x2000) + b"\x04zone\x07examp\xff\xff\x00\x00\x06\x00\x01"
    q = read_query(data)
    assert q.name == "zone.examp\\255\\255."
    m = dns.message.from_wire(refuse(data))
    assert m.question[0].name.labels == (b"zone", b"examp\xff\xff", b"")
    assert m.opcode() == dns.opcode.NOTIFY
    assert m.rcode() == dns.rcode.REFUSED


def test_refusal_of_update_keeps_opcode_and_zone() -> None:
    """An UPDATE (RFC 2136 §2.3) with a non-SOA zone line is refused with its opcode and zone section echoed."""
    data = header(flags=0x2910, ar=1) + wire_name(b"api", b"svc") + b"\x00\x01\x00\x01" + OPT_RR
    reply = refuse(data)
    h = DNSRecord.parse(reply).header
    assert (h.opcode, h.rcode, h.cd, h.q, h.ar) == (5, REFUSED, 1, 1, 1)
    assert read_response(reply).name == "api.svc."
