"""DNS messages (RFC 1035) over UDP and TCP: a hand-written reader for the proxy's hot path, TCP framing, refusals.

Owns reading queries and responses into `DnsQuery` / `DnsResponse`, the 2-byte TCP length framing
(RFC 1035 §4.2.2, RFC 7766 §8) and the bytes of synthetic refusals. Never decides policy, never
does I/O. Invariant: any bytes give an event or a `MalformedMessage` / `MessageTooLarge` naming
the byte offset; nothing else escapes, and the message bytes go upstream unchanged (`raw`).

Rules / Theory of operation
---------------------------
The reader is checked against dnslib by `fuzz/dns_differential.py`: when it accepts a message,
dnslib's own header, name and rdata decoders, walking records by RDLENGTH (RFC 1035 §4.1.3), read
the same values from it. (dnslib's whole-message parse ignores RDLENGTH for the types it knows and
rejects non-UTF-8 labels, which RFC 2181 §11 allows; the reference fixes both.) The reader may
reject more, never accept what dnslib reads differently. It is stricter in these ways (each an error):

* Names (RFC 1035 §3.1, §4.1.4): a label is 1-63 bytes (length bytes 0x40-0xBF are the reserved
  extended label types, RFC 6891 §5); a name is at most 255 bytes in wire form after
  decompression; a compression pointer points into the message body (not the 12-byte header) and
  strictly below the start of the segment being read, so every jump goes lower and no loop can
  exist. Each pointer target is decoded once per message (cached), so a pointer chain costs O(n).
* Counts are exact: every counted record is present and nothing follows the last one; the only
  exception is a response with TC set (RFC 2181 §9), where a record cut off by the end of the
  message ends the walk.
* Queries have QR=0 and QDCOUNT=1; responses have QR=1 and QDCOUNT 0 or 1 (0: a FORMERR-style
  reply with no question; `name` is then "" and `qtype` 0).
* At most one OPT record, only in the additional section, owned by the root (RFC 6891 §6.1.1).
* A/AAAA of class IN have RDLENGTH 4/16; a CNAME of class IN holds exactly one name that ends at
  RDLENGTH. Other RR types are skipped by RDLENGTH, not interpreted (the client reads them).

Names are returned in presentation form with a trailing dot, case as received, escaped as
miekg/dns (and so Cilium) prints them: `\\.`, `\\\\`, `\\ ` etc. for specials, `\\DDD` for bytes
outside 0x21-0x7E. `normalized_name` is that, lower-cased (ASCII only, RFC 4343), as Cilium matches.

From a response, toFQDNs learns A/AAAA addresses and CNAME targets of class IN in the answer
section whose owner is the question name or a CNAME target seen earlier in the answer section;
other records are skipped. `min_ttl` is the smallest TTL of those records (a TTL with the top bit
set counts as 0, RFC 2181 §8). `rcode` includes the EDNS extended bits (RFC 6891 §6.1.3).
Addresses are text exactly as `ipaddress` prints them: A as a dotted quad, AAAA as RFC 5952 §4
text (formatted here; IPv4-mapped ones, which Python versions print differently, via `ipaddress`).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, assert_never, overload

from membrane.parsers.errors import MalformedMessage, MessageTooLarge, ParseError, ProtocolViolation
from membrane.parsers.events import Direction, DnsQuery, DnsResponse, Parser, Reason

__all__ = [
    "FORMERR",
    "NOERROR",
    "NOTIMP",
    "NXDOMAIN",
    "REFUSED",
    "SERVFAIL",
    "DnsEvent",
    "DnsMessage",
    "DnsParser",
    "DnsTcpParser",
    "UnreadableMessage",
    "dns_rcode",
    "frame_tcp",
    "name_text",
    "read_message",
    "read_query",
    "read_response",
    "refusal",
]

# RCODEs (RFC 1035 §4.1.1, RFC 6895 §2.3).
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
TYPE_OPT = 41
CLASS_IN = 1

HEADER_BYTES = 12
MAX_NAME_BYTES = 255  # RFC 1035 §2.3.4, wire form including length bytes and the root label
MAX_TCP_MESSAGE_BYTES = 65535  # the 2-byte length prefix cannot say more (RFC 1035 §4.2.2)
# Queries one TCP connection may have pipelined without an answer yet (RFC 7766 §6.2.1.1 allows
# pipelining, and says nothing of a bound). Stub resolvers pipeline two (glibc: A + AAAA) and
# recursive forwarders a few dozen; 64 bounds what a connection pins (64 queries of up to 64 KiB,
# each held until answered) while leaving real clients untouched. The session enforces it (it owns
# the answers): queries read beyond it wait, and the connection's reading pauses until answers free
# room (TCP back-pressure on the client, never a refusal: dnsperf and resolvers pipeline 100 or more).
MAX_TCP_QUERIES_OUTSTANDING = 64
REFUSAL_UDP_PAYLOAD = 1232  # EDNS payload size advertised in our replies (DNS flag day 2020 default)

DnsMessage = DnsQuery | DnsResponse


@dataclass(frozen=True, slots=True, kw_only=True)
class UnreadableMessage:
    """A message whose framing was intact but whose bytes RFC 1035 cannot read; the stream goes on.

    Each TCP message has its own length prefix and each datagram stands alone, so the next message is
    still readable: answer a query with `refusal(event, Reason.MALFORMED)` (FORMERR, when there is
    anything to answer), and drop a response or close its stream.
    """

    direction: Direction
    detail: str  # the MalformedMessage text, with the offset counted from the stream's start over TCP
    offset: int | None
    reason: Reason = Reason.MALFORMED
    raw: bytes = field(default=b"", repr=False)


DnsEvent = DnsQuery | DnsResponse | UnreadableMessage

_HEADER = struct.Struct(">HHHHHH")
_U16 = struct.Struct(">H")
_U16U16 = struct.Struct(">HH")
_RR_FIXED = struct.Struct(">HHIH")  # TYPE, CLASS, TTL, RDLENGTH
_U8X4 = struct.Struct(">4B")
_LEARNED_TYPES = frozenset((TYPE_A, TYPE_AAAA, TYPE_CNAME))
_U16X8 = struct.Struct(">8H")
_IPV6_FULL = ":".join(["%x"] * 8)
_QR = 0x8000
_OPCODE = 0x7800
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080
_CD = 0x0010
_EDNS_DO = 0x8000

# Label bytes printed as they are; everything else is escaped (see the module docstring).
_PLAIN = bytes(b for b in range(0x21, 0x7F) if b not in b".'@;()\"\\")
_PLAIN_AND_DOT = _PLAIN + b"."
_SPECIAL = frozenset(b".'@;()\"\\ ")

NameCache = dict[int, tuple[tuple[bytes, ...], int]]


class _WireError(Exception):
    """Internal: what is wrong and where; public functions turn it into MalformedMessage."""

    def __init__(self, message: str, offset: int, *, truncated: bool = False) -> None:
        super().__init__(message)
        self.offset = offset
        self.truncated = truncated  # the message ended inside an item (vs. a wrong value)


# --- names ---------------------------------------------------------------------------------------


def _read_name(data: bytes, pos: int, cache: NameCache) -> tuple[list[bytes], int]:
    """Decode the name at `pos`. Returns (labels, offset just after the name as stored at `pos`)."""
    n = len(data)
    labels: list[bytes] = []
    wire = 1  # the root label's zero byte
    end = -1
    floor = pos
    jumps: list[tuple[int, int, int]] | None = None
    while True:
        if pos >= n:
            raise _WireError("name runs past the end of the message", pos, truncated=True)
        length = data[pos]
        if length == 0:
            if end < 0:
                end = pos + 1
            break
        if length < 64:
            wire += length + 1
            if wire > MAX_NAME_BYTES:
                raise _WireError("name longer than 255 bytes", pos)
            stop = pos + 1 + length
            if stop > n:
                raise _WireError("label runs past the end of the message", pos, truncated=True)
            labels.append(data[pos + 1 : stop])
            pos = stop
            continue
        if length < 0xC0:
            raise _WireError(f"label length byte 0x{length:02x}: over 63 (reserved label type)", pos)
        if pos + 1 >= n:
            raise _WireError("compression pointer cut off", pos, truncated=True)
        target = ((length & 0x3F) << 8) | data[pos + 1]
        if end < 0:
            end = pos + 2
        if target >= floor:
            raise _WireError(f"compression pointer to {target} does not point backwards", pos)
        if target < HEADER_BYTES:
            raise _WireError(f"compression pointer to {target} points into the header", pos)
        cached = cache.get(target)
        if cached is not None:
            suffix, suffix_wire = cached
            wire += suffix_wire - 1
            if wire > MAX_NAME_BYTES:
                raise _WireError("name longer than 255 bytes", pos)
            labels.extend(suffix)
            break
        if jumps is None:
            jumps = []
        jumps.append((target, len(labels), wire))
        pos = floor = target
    if jumps is not None:
        for target, index, wire_before in jumps:
            cache[target] = (tuple(labels[index:]), wire - wire_before + 1)
    return labels, end


def _escape_label(label: bytes) -> str:
    out = []
    for b in label:
        if b in _SPECIAL:
            out.append("\\" + chr(b))
        elif b < 0x21 or b > 0x7E:
            out.append(f"\\{b:03d}")
        else:
            out.append(chr(b))
    return "".join(out)


def name_text(labels: list[bytes] | tuple[bytes, ...]) -> str:
    """Presentation form of a name with a trailing dot, case kept, escaped as miekg/dns does ("." for the root)."""
    if not labels:
        return "."
    joined = b".".join(labels)
    if not joined.translate(None, _PLAIN_AND_DOT) and joined.count(b".") == len(labels) - 1:
        return joined.decode("ascii") + "."
    return ".".join(_escape_label(label) for label in labels) + "."


# --- records -------------------------------------------------------------------------------------


def _skip_records(
    data: bytes, pos: int, count: int, additional_from: int, tc: bool, cache: NameCache
) -> tuple[int, int, bool]:
    """Walk `count` records from `pos` without interpreting rdata.

    Records with index >= `additional_from` are in the additional section. Returns (end offset,
    OPT record offset or -1, whether a record was cut off by the end of a TC message).
    """
    n = len(data)
    opt = -1
    for i in range(count):
        start = pos
        try:
            labels, pos = _read_name(data, pos, cache)
            if pos + 10 > n:
                raise _WireError("record header runs past the end of the message", pos, truncated=True)
            rtype, _rclass, _ttl, rdlength = _RR_FIXED.unpack_from(data, pos)
            pos += 10
            if pos + rdlength > n:
                raise _WireError("record data runs past the end of the message", pos, truncated=True)
        except _WireError as e:
            if tc and e.truncated:
                return start, opt, True
            raise
        if rtype == TYPE_OPT:
            if i < additional_from:
                raise _WireError("OPT record outside the additional section", start)
            if opt >= 0:
                raise _WireError("more than one OPT record", start)
            if labels:
                raise _WireError("OPT record not owned by the root", start)
            opt = start
        pos += rdlength
    return pos, opt, False


def _read_header(data: bytes) -> tuple[int, int, int, int, int, int]:
    if len(data) < HEADER_BYTES:
        raise _WireError("message shorter than the 12-byte header", len(data), truncated=True)
    return _HEADER.unpack_from(data)


def _scan_query(data: bytes) -> tuple[int, int, list[bytes], int, int, int, int]:
    """Validate a whole query. Returns (id, flags, qname labels, qtype, qclass, question end, OPT offset or -1)."""
    qid, flags, qdcount, ancount, nscount, arcount = _read_header(data)
    if flags & _QR:
        raise _WireError("QR is set: a response where a query was expected", 2)
    if qdcount != 1:
        raise _WireError(f"QDCOUNT is {qdcount}, a query asks exactly one question", 4)
    cache: NameCache = {}
    labels, pos = _read_name(data, HEADER_BYTES, cache)
    if pos + 4 > len(data):
        raise _WireError("question runs past the end of the message", pos, truncated=True)
    qtype, qclass = _U16U16.unpack_from(data, pos)
    qend = pos + 4
    opt = -1
    pos = qend
    if ancount or nscount or arcount:
        pos, opt, _cut = _skip_records(data, pos, ancount + nscount + arcount, ancount + nscount, False, cache)
    if pos != len(data):
        raise _WireError(f"{len(data) - pos} bytes after the last record (counts too low?)", pos)
    return qid, flags, labels, qtype, qclass, qend, opt


# --- public: reading -----------------------------------------------------------------------------


def read_query(data: bytes) -> DnsQuery:
    """Read one DNS query (a UDP datagram, or a TCP message without its length prefix).

    Returns a `DnsQuery` whose `raw` is `data` itself: forward exactly those bytes upstream.
    Raises `MalformedMessage` (direction CLIENT_TO_SERVER, `offset` into `data`) for anything that
    is not a well-formed query; answer it with `refusal()` of an `UnreadableMessage` (what `DnsParser` emits) or drop it.
    """
    try:
        qid, flags, labels, qtype, qclass, _qend, _opt = _scan_query(data)
    except _WireError as e:
        raise MalformedMessage(str(e), direction=Direction.CLIENT_TO_SERVER, offset=e.offset) from e
    name = name_text(labels)
    return DnsQuery(
        id=qid,
        name=name,
        normalized_name=name.lower(),
        qtype=qtype,
        qclass=qclass,
        opcode=(flags & _OPCODE) >> 11,
        rd=bool(flags & _RD),
        cd=bool(flags & _CD),
        raw=data,
    )


def _ipv6_text(data: bytes, start: int) -> str:
    """RFC 5952 text of the 16 bytes at `start`, identical to `str(ipaddress.IPv6Address(...))`."""
    groups = _U16X8.unpack_from(data, start)
    if groups[5] == 0xFFFF and not (groups[0] | groups[1] | groups[2] | groups[3] | groups[4]):
        # IPv4-mapped: how ipaddress prints these differs between Python versions, so ask it.
        return str(ipaddress.IPv6Address(data[start : start + 16]))
    best_at = best_len = 0
    run_at = run_len = 0
    for i, group in enumerate(groups):
        if group:
            run_len = 0
            continue
        if not run_len:
            run_at = i
        run_len += 1
        if run_len > best_len:  # the first of equally long runs wins (RFC 5952 §4.2.3)
            best_at, best_len = run_at, run_len
    if best_len < 2:  # a single zero group is not shortened (RFC 5952 §4.2.2)
        return _IPV6_FULL % groups
    head = ":".join([f"{g:x}" for g in groups[:best_at]])
    return head + "::" + ":".join([f"{g:x}" for g in groups[best_at + best_len :]])


def read_response(data: bytes) -> DnsResponse:
    """Read one DNS response: rcode, and the addresses, CNAME chain and minimum TTL toFQDNs learns.

    Returns a `DnsResponse` whose `raw` is `data`: relay exactly those bytes to the client.
    Raises `MalformedMessage` (direction SERVER_TO_CLIENT, `offset` into `data`) when the message is
    not a well-formed response; answer the client with SERVFAIL (`refusal(query.raw, SERVFAIL)`).
    """
    try:
        return _read_response(data)
    except _WireError as e:
        raise MalformedMessage(str(e), direction=Direction.SERVER_TO_CLIENT, offset=e.offset) from e


def _read_response(data: bytes) -> DnsResponse:
    """`read_response` without the error translation: header, question, answers, then the other sections."""
    n = len(data)
    if n < HEADER_BYTES:
        raise _WireError("message shorter than the 12-byte header", n, truncated=True)
    qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if not flags & _QR:
        raise _WireError("QR is clear: a query where a response was expected", 2)
    if qdcount > 1:
        raise _WireError(f"QDCOUNT is {qdcount}, a response repeats at most one question", 4)
    tc = bool(flags & _TC)
    cache: NameCache = {}
    name, qtype, pos = _read_question(data, cache) if qdcount else ("", 0, HEADER_BYTES)
    normalized = name.lower()
    answers = _read_answers(data, pos, ancount, tc, cache, normalized if qdcount else None)
    pos, cut = answers.end, answers.cut
    opt = -1
    if not cut and (nscount or arcount):
        pos, opt, cut = _skip_records(data, pos, nscount + arcount, nscount, tc, cache)
    if pos != n and not cut:
        raise _WireError(f"{n - pos} bytes after the last record (counts too low?)", pos)
    rcode = flags & 0x000F
    if opt >= 0:
        rcode |= data[opt + 5] << 4  # the TTL's top byte is the extended RCODE (RFC 6891 §6.1.3)
    return DnsResponse(
        id=qid,
        name=name,
        normalized_name=normalized,
        qtype=qtype,
        rcode=rcode,
        addresses=tuple(answers.addresses),
        cnames=tuple(answers.cnames),
        rrtypes=tuple(answers.rrtypes),
        min_ttl=answers.min_ttl,
        raw=data,
    )


def _read_question(data: bytes, cache: NameCache) -> tuple[str, int, int]:
    """A response's one question. Returns (name as text, QTYPE, offset after the question)."""
    labels, pos = _read_name(data, HEADER_BYTES, cache)
    if pos + 4 > len(data):
        raise _WireError("question runs past the end of the message", pos, truncated=True)
    return name_text(labels), _U16.unpack_from(data, pos)[0], pos + 4


class _Answers:
    """What the answer section taught toFQDNs, and where the walk over it ended."""

    __slots__ = ("addresses", "cnames", "cut", "end", "min_ttl", "rrtypes")

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.cnames: list[str] = []
        self.rrtypes: list[int] = []  # the TYPE of every answer record, in order (Hubble's `rrtypes`)
        self.min_ttl: int | None = None
        self.end = 0  # offset after the last record read
        self.cut = False  # a record was cut off by the end of a TC message: the walk stopped there


def _read_answers(data: bytes, pos: int, count: int, tc: bool, cache: NameCache, question: str | None) -> _Answers:
    """Walk `count` answer records from `pos`, learning A/AAAA/CNAME records of class IN on the chain.

    The chain starts at the (normalised) question name; a CNAME whose owner is on it adds its
    target. One loop, no call per record but for names: this is the hot path of every DNS answer.
    """
    n = len(data)
    out = _Answers()
    chain: set[str] = set()
    # Normalised text of names already decoded, by the offset they start at: an owner that is just a
    # pointer to one of them (what compressors write) costs a dict lookup, not a decode.
    texts: dict[int, str] = {}
    if question is not None:
        chain.add(question)
        texts[HEADER_BYTES] = question
    for _ in range(count):
        start = pos
        owner: str | None = None
        labels: list[bytes] | None = None
        try:
            if pos + 1 < n and data[pos] >= 0xC0:
                target = ((data[pos] & 0x3F) << 8) | data[pos + 1]
                owner = texts.get(target)  # every key is an earlier name, so target < pos holds
            if owner is not None:
                pos += 2
            else:
                labels, pos = _read_name(data, pos, cache)
            if pos + 10 > n:
                raise _WireError("record header runs past the end of the message", pos, truncated=True)
            rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, pos)
            pos += 10
            if pos + rdlength > n:
                raise _WireError("record data runs past the end of the message", pos, truncated=True)
        except _WireError as e:
            if tc and e.truncated:
                out.end, out.cut = start, True
                return out
            raise
        rdstart, pos = pos, pos + rdlength
        if rtype == TYPE_OPT:
            raise _WireError("OPT record outside the additional section", start)
        out.rrtypes.append(rtype)
        if rclass != CLASS_IN or rtype not in _LEARNED_TYPES:
            continue
        if owner is None:
            assert labels is not None
            owner = texts[start] = name_text(labels).lower()
        if rtype == TYPE_CNAME:
            target_labels, target_end = _read_name(data, rdstart, cache)
            if target_end != pos:
                raise _WireError("CNAME target does not end at RDLENGTH", rdstart)
            target_name = texts[rdstart] = name_text(target_labels).lower()
            if owner not in chain:
                continue
            chain.add(target_name)
            out.cnames.append(target_name)
        elif rtype == TYPE_A:
            if rdlength != 4:
                raise _WireError(f"A record with RDLENGTH {rdlength}, not 4", rdstart - 2)
            if owner not in chain:
                continue
            a, b, c, d = _U8X4.unpack_from(data, rdstart)
            out.addresses.append(f"{a}.{b}.{c}.{d}")
        else:
            if rdlength != 16:
                raise _WireError(f"AAAA record with RDLENGTH {rdlength}, not 16", rdstart - 2)
            if owner not in chain:
                continue
            out.addresses.append(_ipv6_text(data, rdstart))
        if ttl & 0x80000000:
            ttl = 0  # RFC 2181 §8
        if out.min_ttl is None or ttl < out.min_ttl:
            out.min_ttl = ttl
    out.end = pos
    return out


def read_message(direction: Direction, data: bytes) -> DnsMessage:
    """`read_query` for CLIENT_TO_SERVER, `read_response` for SERVER_TO_CLIENT (same Returns/Raises)."""
    if direction is Direction.CLIENT_TO_SERVER:
        return read_query(data)
    return read_response(data)


# --- public: replies -----------------------------------------------------------------------------


def dns_rcode(reason: Reason) -> int:
    """The RCODE that answers a query refused for `reason` (STYLE.md §3.4)."""
    match reason:
        case Reason.POLICY_DENIED:
            return REFUSED
        case Reason.MALFORMED:
            return FORMERR
        case Reason.TOO_LARGE:
            return FORMERR
        case Reason.UPSTREAM_FAILED:
            return SERVFAIL
        case Reason.UPSTREAM_TIMEOUT:
            return SERVFAIL
        case _:
            assert_never(reason)


@overload
def refusal(request: DnsQuery, reason: Reason) -> bytes: ...
@overload
def refusal(request: UnreadableMessage, reason: Reason) -> bytes | None: ...
def refusal(request: DnsQuery | UnreadableMessage, reason: Reason) -> bytes | None:
    """The reply that refuses `request` for `reason` (RCODE `dns_rcode(reason)`), built from its bytes.

    For a `DnsQuery`: same ID, opcode, RD and CD bits and question (bytes as sent, so case kept); QR
    set; RA set when RD was (we answer for the pod's recursive resolver, so `dig` does not warn); AA,
    TC, AD clear; no answers. If the query had an EDNS OPT record, the reply carries one (version 0,
    the DO bit echoed, payload size 1232, no options). For an `UnreadableMessage`: a header-only
    reply (same ID and opcode, RD copied, QR set, counts zero).
    Returns the message bytes (add `frame_tcp` over TCP); None for an unreadable message there is
    nothing to answer (fewer than 12 bytes, or QR already set: answering a response invites loops).
    Raises `MalformedMessage` if a `DnsQuery`'s `raw` is not the well-formed query it came from.
    """
    if type(request) is UnreadableMessage:
        return _header_reply(request.raw, dns_rcode(reason))
    assert isinstance(request, DnsQuery)
    return _question_reply(request.raw, dns_rcode(reason))


def _question_reply(query_raw: bytes, rcode: int) -> bytes:
    """`refusal` of a readable query (`rcode` fits the header's 4 bits: `dns_rcode` returns no other)."""
    try:
        qid, flags, _labels, _qtype, _qclass, qend, opt = _scan_query(query_raw)
    except _WireError as e:
        raise MalformedMessage(str(e), direction=Direction.CLIENT_TO_SERVER, offset=e.offset) from e
    reply_flags = _QR | (flags & (_OPCODE | _RD | _CD)) | rcode
    if flags & _RD:
        reply_flags |= _RA
    head = _HEADER.pack(qid, reply_flags, 1, 0, 0, 1 if opt >= 0 else 0)
    question = query_raw[HEADER_BYTES:qend]
    if opt < 0:
        return head + question
    do = _U16.unpack_from(query_raw, opt + 7)[0] & _EDNS_DO  # OPT: root(1) TYPE(2) CLASS(2) TTL(4)
    return head + question + b"\x00" + _RR_FIXED.pack(TYPE_OPT, REFUSAL_UDP_PAYLOAD, do, 0)


def _header_reply(data: bytes, rcode: int) -> bytes | None:
    """`refusal` of an unreadable message: a header-only reply, or None when nothing can be answered."""
    if len(data) < HEADER_BYTES:
        return None
    qid, flags = _U16U16.unpack_from(data)
    if flags & _QR:
        return None
    return _HEADER.pack(qid, _QR | (flags & (_OPCODE | _RD)) | rcode, 0, 0, 0, 0)


# --- TCP framing ---------------------------------------------------------------------------------


def frame_tcp(message: bytes) -> bytes:
    """`message` with its 2-byte big-endian length prefix, for DNS over TCP (RFC 1035 §4.2.2).

    Raises `ValueError` for a message over 65535 bytes (no such message can be framed).
    """
    if len(message) > MAX_TCP_MESSAGE_BYTES:
        raise ValueError(f"a {len(message)}-byte message cannot be framed for TCP (max 65535)")
    return _U16.pack(len(message)) + message


class _TcpFramer:
    """Splits one direction of a DNS-over-TCP stream into messages (RFC 7766 §8: several per connection).

    Buffers at most one message (`max_message_bytes` + 2 bytes). A length under 12 cannot hold a
    header and is an error as soon as the prefix is read; a length over the limit is
    `MessageTooLarge` before any of it is buffered. After an error every call raises
    `ProtocolViolation`: the stream cannot be resynchronised.
    """

    def __init__(self, direction: Direction, max_message_bytes: int = MAX_TCP_MESSAGE_BYTES) -> None:
        if not HEADER_BYTES <= max_message_bytes <= MAX_TCP_MESSAGE_BYTES:
            raise ValueError(f"max_message_bytes must be in 12..65535, not {max_message_bytes}")
        self.direction = direction
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        self._offset = 0  # stream offset of self._buffer[0]
        self._failed = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for an incomplete message (0 at a message boundary)."""
        return len(self._buffer)

    @property
    def stream_offset(self) -> int:
        """Stream offset of the first byte not yet returned as part of a message."""
        return self._offset

    def push(self, data: bytes) -> None:
        """Add bytes from the stream (take messages out with `next_message`). Raises `ProtocolViolation` after an error."""
        if self._failed:
            raise ProtocolViolation("DNS TCP stream already failed", direction=self.direction, offset=self._offset)
        self._buffer += data

    def next_message(self) -> bytes | None:
        """The next complete message (without its prefix), or None until more bytes arrive.

        Raises `MalformedMessage` (length under 12), `MessageTooLarge` (length over the limit) or
        `ProtocolViolation` (called after an error), with `offset` counted from the start of the stream.
        """
        if self._failed:
            raise ProtocolViolation("DNS TCP stream already failed", direction=self.direction, offset=self._offset)
        buf = self._buffer
        if len(buf) < 2:
            return None
        length = (buf[0] << 8) | buf[1]
        if length < HEADER_BYTES:
            self._failed = True
            raise MalformedMessage(
                f"TCP length prefix {length} is shorter than a DNS header", direction=self.direction, offset=self._offset
            )
        if length > self.max_message_bytes:
            self._failed = True
            raise MessageTooLarge(
                f"TCP message of {length} bytes is over the {self.max_message_bytes}-byte limit",
                direction=self.direction,
                offset=self._offset,
            )
        stop = 2 + length
        if len(buf) < stop:
            return None
        message = bytes(buf[2:stop])
        del buf[:stop]  # O(1) amortised: bytearray keeps an offset for deletions at the front
        self._offset += stop
        return message

    def end_of_stream(self) -> None:
        """The peer closed its side. Raises `MalformedMessage` if a message was cut off, else returns."""
        if self._buffer and not self._failed:
            self._failed = True
            raise MalformedMessage(
                f"stream ended {len(self._buffer)} bytes into a message", direction=self.direction, offset=self._offset
            )


class DnsParser:
    """One direction of DNS over UDP: each `feed(datagram)` is one whole message (the parser contract).

    CLIENT_TO_SERVER reads queries, SERVER_TO_CLIENT responses. Never raises: a datagram that is not
    a readable message is an `UnreadableMessage` event, and the next datagram is read afresh.
    """

    __slots__ = ("_read", "direction")

    def __init__(self, direction: Direction) -> None:
        self.direction = direction
        self._read = read_query if direction is Direction.CLIENT_TO_SERVER else read_response

    def feed(self, data: bytes) -> list[DnsEvent]:
        """Returns [DnsQuery] / [DnsResponse] for the datagram `data`, or [UnreadableMessage]."""
        try:
            return [self._read(data)]
        except MalformedMessage as e:
            return [UnreadableMessage(direction=self.direction, detail=str(e), offset=e.offset, raw=data)]

    def data_to_send(self) -> bytes:
        """Always b"": DNS never answers on its own (replies come from `refusal`)."""
        return b""


class DnsTcpParser:
    """One direction of DNS over TCP, framed and read: `feed()` returns `DnsQuery`/`DnsResponse` events.

    CLIENT_TO_SERVER reads queries, SERVER_TO_CLIENT responses. A framed message that cannot be read
    is an `UnreadableMessage` event (its length prefix still delimits it, so the stream goes on);
    a broken frame (length under 12 or over the limit) raises and ends the stream. Offsets count
    from the start of the stream (the message's own offset plus where its bytes began).
    """

    __slots__ = ("_framer", "_read", "direction")

    def __init__(self, direction: Direction, max_message_bytes: int = MAX_TCP_MESSAGE_BYTES) -> None:
        self.direction = direction
        self._framer = _TcpFramer(direction, max_message_bytes)
        self._read = read_query if direction is Direction.CLIENT_TO_SERVER else read_response

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for an incomplete message (0 at a message boundary)."""
        return self._framer.buffered_bytes

    def feed(self, data: bytes) -> list[DnsEvent]:
        """Add stream bytes; returns the events of every message now complete ([] = need more data).

        Raises `MalformedMessage` (a length prefix under 12), `MessageTooLarge` (over the limit) or
        `ProtocolViolation` (fed after one of those), for the first bad frame in stream order whatever
        the read boundaries. The error's `events_before` holds the events of the messages before it
        in the same call: handle them (answer those queries), then close the connection.
        """
        framer = self._framer
        framer.push(data)
        events: list[DnsEvent] = []
        while True:
            base = framer.stream_offset
            try:
                message = framer.next_message()
            except ParseError as e:
                e.events_before = tuple(events)  # queries before the bad frame still get their answers
                raise
            if message is None:
                return events
            try:
                events.append(self._read(message))
            except MalformedMessage as e:
                offset = None if e.offset is None else e.offset + base + 2
                e.offset = offset
                events.append(UnreadableMessage(direction=self.direction, detail=str(e), offset=offset, raw=message))

    def data_to_send(self) -> bytes:
        """Always b"": DNS never answers on its own (replies come from `refusal`)."""
        return b""

    def end_of_stream(self) -> None:
        """The peer closed its side. Raises `MalformedMessage` if a message was cut off."""
        self._framer.end_of_stream()


if TYPE_CHECKING:  # mypy proves the parser contract (events.Parser) holds

    def _contract(parser: DnsParser) -> Parser[DnsEvent]:
        return parser

    def _tcp_contract(parser: DnsTcpParser) -> Parser[DnsEvent]:
        return parser
