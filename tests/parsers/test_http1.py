"""HTTP/1.1 connection parser: framing, smuggling rules, limits, pipelining, upgrades, refusals.

Every byte-level input is fed whole, byte by byte and split in two at many points, also with trailing
bytes (helpers.feed.all_chunkings); body `Data` pieces are merged before comparing, since their sizes
follow the reads.
"""

from __future__ import annotations

import itertools

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st
from membrane.parsers.errors import MalformedMessage, MessageTooLarge, ParseError, ProtocolViolation
from membrane.parsers.events import (
    ConnectionUpgraded,
    Data,
    Direction,
    EndOfMessage,
    HttpRequest,
    HttpResponse,
    Reason,
    Trailers,
)
from membrane.parsers.http1 import (
    _TRANSITIONS,
    ACCESS_DENIED,
    C2S,
    S2C,
    Http1Event,
    Http1Parser,
    Input,
    Refusal,
    State,
    error_response,
    refusal_status,
    serialize_request_head,
)

from tests.helpers.feed import all_chunkings

EOM = EndOfMessage()


def merged(events: list[Http1Event]) -> list[Http1Event]:
    """Join consecutive Data events so results compare independently of read sizes."""
    out: list[Http1Event] = []
    for event in events:
        if isinstance(event, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(data=out[-1].data + event.data)
        else:
            out.append(event)
    return out


Parsers = tuple[Http1Parser, Http1Parser]


def _parser(direction: Direction, parsers: Parsers | None) -> Http1Parser:
    client, server = parsers or Http1Parser.pair()
    return client if direction is C2S else server


def read(direction: Direction, chunks: list[bytes], parsers: Parsers | None = None) -> list[Http1Event]:
    parser = _parser(direction, parsers)
    return merged([e for c in chunks for e in parser.feed(c)])


def read_error(direction: Direction, chunks: list[bytes], parsers: Parsers | None = None) -> ParseError:
    parser = _parser(direction, parsers)
    with pytest.raises(ParseError) as info:
        for chunk in chunks:
            parser.feed(chunk)
    return info.value


def refuse_first(data: bytes) -> Refusal:
    """What a fresh connection answers when the proxy refuses the first request in `data`."""
    c2s, _ = Http1Parser.pair()
    request = c2s.feed(data)[0]
    assert isinstance(request, HttpRequest)
    return c2s.refusal(request, Reason.POLICY_DENIED)


def conversation(requests: bytes) -> Parsers:
    """A connection's two parsers after reading and forwarding every request in `requests`."""
    client, server = Http1Parser.pair()
    for event in client.feed(requests):
        if isinstance(event, HttpRequest):
            client.forward(event)
    return client, server


GET = b"GET /v1/pets?limit=10 HTTP/1.1\r\nHost: api\r\nAccept: */*\r\n\r\n"
GET_EVENT = HttpRequest(
    method="GET",
    target="/v1/pets?limit=10",
    path="/v1/pets",
    query="limit=10",
    host="api",
    headers=(("Host", "api"), ("Accept", "*/*")),
)


# --- requests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", all_chunkings(GET, trailing=b"GET /next HT"))
def test_request_survives_any_chunking(chunks: list[bytes]) -> None:
    """A request split at any byte boundary yields exactly one HttpRequest and EndOfMessage (RFC 9112 §2.2)."""
    assert read(C2S, chunks) == [GET_EVENT, EOM]


@pytest.mark.parametrize("chunks", all_chunkings(b"GET /a/./b/../c//d?x=%2F HTTP/1.1\r\nHost: h\r\n\r\n"))
def test_request_target_is_normalised(chunks: list[bytes]) -> None:
    """The target is normalised before anyone judges it; the query is kept as sent (RFC 3986 §6.2.2)."""
    request = read(C2S, chunks)[0]
    assert isinstance(request, HttpRequest)
    assert (request.target, request.path, request.query) == ("/a/c/d?x=%2F", "/a/c/d", "x=%2F")


@pytest.mark.parametrize(
    "target", [b"/a%2Fb", b"/a%5cb", b"/a\\b", b"/%zz", b"relative", b"*"], ids=lambda t: t.decode()
)
def test_request_target_that_servers_read_differently_is_malformed(target: bytes) -> None:
    """A target normalisation refuses is a MalformedMessage (400): encoded slashes, backslash, bad escapes (RFC 9112 §3.2)."""
    for chunks in all_chunkings(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n"):
        assert isinstance(read_error(C2S, chunks), MalformedMessage)


def test_absolute_form_and_asterisk_form() -> None:
    """Absolute form reduces to origin form (RFC 9112 §3.2.2); `*` is allowed only for OPTIONS (§3.2.4)."""
    events = read(C2S, [b"GET http://h/x/../y HTTP/1.1\r\nHost: h\r\n\r\nOPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n"])
    requests = [e for e in events if isinstance(e, HttpRequest)]
    assert [(r.method, r.target, r.path) for r in requests] == [("GET", "/y", "/y"), ("OPTIONS", "*", "*")]


PIPELINE = (
    b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
    b"POST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    b"PUT /3 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n"
    b"DELETE /4 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
)


@pytest.mark.parametrize("chunks", all_chunkings(PIPELINE))
def test_pipelined_requests_are_framed_one_by_one(chunks: list[bytes]) -> None:
    """Pipelined requests each end where their framing says: none, Content-Length, chunked (RFC 9112 §6.3, §9.3.2)."""
    events = read(C2S, chunks)
    kinds = [(type(e).__name__, getattr(e, "target", None) or getattr(e, "data", None)) for e in events]
    assert kinds == [
        ("HttpRequest", "/1"),
        ("EndOfMessage", None),
        ("HttpRequest", "/2"),
        ("Data", b"hello"),
        ("EndOfMessage", None),
        ("HttpRequest", "/3"),
        ("Data", b"abcde"),
        ("EndOfMessage", None),
        ("HttpRequest", "/4"),
        ("EndOfMessage", None),
    ]
    last = events[-2]
    assert isinstance(last, HttpRequest)
    assert not last.keep_alive


def test_body_is_streamed_in_pieces_never_buffered() -> None:
    """Body bytes come out as they arrive: each Data is at most one read, and the head is never re-buffered."""
    c2s = Http1Parser(C2S)
    head = b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 300000\r\n\r\n"
    assert [type(e) for e in c2s.feed(head)] == [HttpRequest]
    pieces = []
    for _ in range(3):
        events = c2s.feed(b"x" * 100000)
        assert all(isinstance(e, Data) and len(e.data) == 100000 for e in events[:1])
        pieces.extend(events)
    assert pieces[-1] == EOM
    assert sum(len(e.data) for e in pieces if isinstance(e, Data)) == 300000


@pytest.mark.parametrize(
    "chunks",
    all_chunkings(
        b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'A;name="q\\"v";flag\r\n0123456789\r\n0\r\nX-Checksum: abc \r\nX-Other:1\r\n\r\n',
        trailing=b"GE",
    ),
)
def test_chunked_body_with_extensions_and_trailers(chunks: list[bytes]) -> None:
    """Chunk extensions are accepted when well formed and dropped; trailers become a Trailers event (RFC 9112 §7.1)."""
    events = read(C2S, chunks)
    assert events[1:] == [
        Data(data=b"0123456789"),
        Trailers(headers=(("X-Checksum", "abc"), ("X-Other", "1"))),
        EOM,
    ]


# --- smuggling: each case must be rejected with MalformedMessage ------------------------------------

H = b"POST / HTTP/1.1\r\nHost: h\r\n"
SMUGGLING = {
    "cl_and_te": H + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_and_cl": H + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "te_gzip_chunked": H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te_chunked_gzip": H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te_identity": H + b"Transfer-Encoding: identity\r\n\r\n",
    "te_twice": H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_xchunked": H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te_vertical_tab": H + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
    "te_http10": b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "cl_twice_equal": H + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    "cl_twice_differ": H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
    "cl_list": H + b"Content-Length: 1, 1\r\n\r\nx",
    "cl_plus": H + b"Content-Length: +1\r\n\r\nx",
    "cl_negative": H + b"Content-Length: -1\r\n\r\n",
    "cl_hex": H + b"Content-Length: 0x1\r\n\r\nx",
    "cl_inner_space": H + b"Content-Length: 1 1\r\n\r\nx",
    "cl_superscript": H + b"Content-Length: \xb9\r\n\r\nx",
    "cl_huge": H + b"Content-Length: 1234567890123456789\r\n\r\n",
    "obs_fold": H + b"X-A: a\r\n b\r\n\r\n",
    "obs_fold_te": H + b"Transfer-Encoding: \r\n chunked\r\n\r\n0\r\n\r\n",
    "space_before_colon": H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "tab_before_colon": H + b"Content-Length\t: 1\r\n\r\nx",
    "bare_lf_lines": b"GET / HTTP/1.1\nHost: h\n\n",
    "bare_lf_in_head": b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n",
    "bare_cr_in_head": b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n",
    "leading_empty_line": b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
    "double_space_request_line": b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
    "no_host": b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
    "two_hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "http_1_2": b"GET / HTTP/1.2\r\nHost: h\r\n\r\n",
    "http_2_0": b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
    "http_0_9": b"GET / HTTP/0.9\r\nHost: h\r\n\r\n",
    "h2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "nul_in_name": H + b"X-\x00A: b\r\n\r\n",
    "ctl_in_value": H + b"X-A: b\x01c\r\n\r\n",
    "lowercase_method": b"get / HTTP/1.1\r\nHost: h\r\n\r\n",
    "chunk_size_g": H + b"Transfer-Encoding: chunked\r\n\r\ng\r\n",
    "chunk_size_0x": H + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "chunk_size_space_before": H + b"Transfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
    "chunk_size_space_after": H + b"Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
    "chunk_size_negative": H + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
    "chunk_size_17_digits": H + b"Transfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
    "chunk_size_bare_lf": H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    "chunk_data_no_crlf": H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    "chunk_data_bare_lf": H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n",
    "chunk_ext_bad_char": H + b"Transfer-Encoding: chunked\r\n\r\n5;a b\r\nhello\r\n0\r\n\r\n",
    "chunk_ext_unterminated_quote": H + b'Transfer-Encoding: chunked\r\n\r\n5;a="b\r\nhello\r\n0\r\n\r\n',
    "trailer_content_length": H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 5\r\n\r\n",
    "trailer_space_before_colon": H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-A : 5\r\n\r\n",
    "trailer_bare_lf": H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-A: 5\n\r\n",
    "connect_with_path": b"CONNECT /x HTTP/1.1\r\nHost: h\r\n\r\n",
    "connect_with_body": b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nxx",
    "asterisk_get": b"GET * HTTP/1.1\r\nHost: h\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_case_is_rejected(name: str) -> None:
    """Each framing two parsers could read differently is a MalformedMessage, at any chunking (RFC 9112 §2.2, §3, §5, §6, §7.1)."""
    for chunks in all_chunkings(SMUGGLING[name], trailing=b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"):
        c2s, s2c = Http1Parser.pair()
        error = read_error(C2S, chunks, (c2s, s2c))
        assert isinstance(error, MalformedMessage), (name, error)
        assert error.direction is C2S
        assert c2s.state is State.ERROR
        with pytest.raises(ProtocolViolation):
            c2s.feed(b"x")


def test_http10_request_never_keeps_alive_and_more_bytes_are_a_violation() -> None:
    """A proxy must not persist an HTTP/1.0 client connection (RFC 9112 §9.3); bytes after the last message are an error."""
    c2s = Http1Parser(C2S)
    events = c2s.feed(b"GET / HTTP/1.0\r\n\r\n")
    request = events[0]
    assert isinstance(request, HttpRequest)
    assert not request.keep_alive
    assert request.host is None
    assert c2s.state is State.MUST_CLOSE
    with pytest.raises(ProtocolViolation):
        c2s.feed(b"GET / HTTP/1.0\r\n\r\n")


# --- limits ---------------------------------------------------------------------------------------


def _head_of(size: int) -> bytes:
    base = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: \r\n\r\n"
    return base.replace(b"X-Pad: ", b"X-Pad: " + b"a" * (size - len(base)))


def test_header_block_limit_is_exact() -> None:
    """A head of exactly max_header_bytes passes; one byte more is MessageTooLarge, i.e. 431 (RFC 6585 §5)."""
    for size, ok in ((16384, True), (16385, False)):
        head = _head_of(size)
        assert len(head) == size
        for chunks in ([head], [head[:9000], head[9000:]], [head[:-1], head[-1:]]):
            c2s, s2c = Http1Parser.pair(max_line_bytes=20000)
            if ok:
                assert isinstance(read(C2S, chunks, (c2s, s2c))[0], HttpRequest)
            else:
                error = read_error(C2S, chunks, (c2s, s2c))
                assert isinstance(error, MessageTooLarge)
                assert refusal_status(error.reason) == 431


def test_header_block_limit_holds_without_a_terminator() -> None:
    """An endless head is refused once it crosses the limit, and the parser never holds more than the limit."""
    c2s = Http1Parser(C2S, max_header_bytes=1024)
    c2s.feed(b"GET / HTTP/1.1\r\nX: ")
    with pytest.raises(MessageTooLarge):
        for _ in range(200):
            c2s.feed(b"a" * 10)
    assert len(c2s._buf) <= 1024


def test_header_count_line_and_chunk_line_limits() -> None:
    """Field count, one field line, the target and a chunk-size line each have their own ceiling (MessageTooLarge)."""
    many = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: y\r\n" * 10 + b"\r\n"
    assert isinstance(read_error(C2S, [many], Http1Parser.pair(max_headers=10)), MessageTooLarge)
    assert isinstance(read(C2S, [many], Http1Parser.pair(max_headers=11))[0], HttpRequest)
    long_line = b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"y" * 200 + b"\r\n\r\n"
    assert isinstance(read_error(C2S, [long_line], Http1Parser.pair(max_line_bytes=100)), MessageTooLarge)
    long_target = b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    assert isinstance(read_error(C2S, [long_target], Http1Parser.pair(max_line_bytes=100)), MessageTooLarge)
    chunk_ext = H + b"Transfer-Encoding: chunked\r\n\r\n5;" + b"e" * 100
    for chunks in all_chunkings(chunk_ext):
        assert isinstance(read_error(C2S, chunks, Http1Parser.pair(max_chunk_line_bytes=64)), MessageTooLarge)


# --- responses ------------------------------------------------------------------------------------


def test_responses_are_framed_by_the_request_method() -> None:
    """HEAD, 1xx, 204 and 304 responses have no body whatever their headers say (RFC 9112 §6.3 (1))."""
    requests = b"".join(
        b"%s /%d HTTP/1.1\r\nHost: h\r\n\r\n" % (m, i) for i, m in enumerate([b"HEAD", b"GET", b"GET", b"GET"])
    )
    responses = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"
        b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    for chunks in all_chunkings(responses):
        events = read(S2C, chunks, conversation(requests))
        summary = [(e.status, e.has_body) if isinstance(e, HttpResponse) else e for e in events]
        assert summary == [
            (200, False),
            EOM,
            (100, False),
            (103, False),
            (204, False),
            EOM,
            (304, False),
            EOM,
            (200, True),
            Data(data=b"ok"),
            EOM,
        ]


def test_response_without_framing_reads_until_close() -> None:
    """A response with neither Content-Length nor chunked ends when the server closes (RFC 9112 §6.3 (8))."""
    _, s2c = conversation(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    events = s2c.feed(b"HTTP/1.1 200 OK\r\n\r\nsome")
    response = events[0]
    assert isinstance(response, HttpResponse)
    assert response.has_body
    assert not response.keep_alive
    assert s2c.feed(b" more") == [Data(data=b" more")]
    assert s2c.feed_eof() == [EOM]


def test_truncated_messages_are_malformed_at_eof() -> None:
    """EOF inside a head or a length-delimited body is a truncated message, never a silent end (RFC 9112 §8)."""
    c2s = Http1Parser(C2S)
    c2s.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nab")
    with pytest.raises(MalformedMessage):
        c2s.feed_eof()
    c2s = Http1Parser(C2S)
    c2s.feed(GET)
    assert c2s.feed_eof() == []
    assert c2s.state is State.CLOSED


def test_response_with_no_request_in_flight_is_a_violation() -> None:
    """A server may not answer what was never forwarded; a refused request has no upstream response."""
    c2s, s2c = Http1Parser.pair()
    request = c2s.feed(GET)[0]
    assert isinstance(request, HttpRequest)
    c2s.refusal(request, Reason.POLICY_DENIED)
    with pytest.raises(ProtocolViolation):
        s2c.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


def test_unsolicited_101_is_a_violation() -> None:
    """101 Switching Protocols only answers a request that asked for an upgrade (RFC 9110 §15.2.2)."""
    _, s2c = conversation(GET)
    with pytest.raises(ProtocolViolation):
        s2c.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1  200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 407 \x00Proxy\xa5 Auth\r\nContent-Length: 0\r\n\r\n",  # fuzz/corpus/http1_differential/crash_reason_nul
        b"HTTP/1.1 000 Continue\r\n\r\n",  # fuzz/corpus/http1_differential/crash_status_000
        b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_malformed_responses_are_rejected(response: bytes) -> None:
    """A response that frames ambiguously is a MalformedMessage, which the proxy answers with 502 (RFC 9112 §6.3)."""
    for chunks in all_chunkings(response):
        error = read_error(S2C, chunks, conversation(GET))
        assert isinstance(error, MalformedMessage)
        assert refusal_status(error.reason, error.direction) == 502


# --- upgrades and CONNECT -------------------------------------------------------------------------

WS = b"GET /chat HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"


def test_websocket_upgrade_becomes_an_opaque_relay() -> None:
    """After 101 both directions carry opaque Data; client bytes sent early are held, then released (RFC 9110 §7.8)."""
    c2s, s2c = Http1Parser.pair()
    events = c2s.feed(WS + b"\x81\x05early")
    assert [type(e) for e in events] == [HttpRequest, EndOfMessage]
    assert c2s.state is State.PAUSED
    c2s.forward(events[0])
    assert c2s.feed(b"more") == []
    assert not c2s.has_held_input()
    events = s2c.feed(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi"
    )
    assert [type(e) for e in events] == [HttpResponse, ConnectionUpgraded, Data]
    assert events[1] == ConnectionUpgraded(protocol="websocket")
    assert events[2] == Data(data=b"\x81\x02hi")
    assert c2s.has_held_input()
    assert c2s.feed(b"") == [Data(data=b"\x81\x05earlymore")]
    assert c2s.feed(b"GET / HTTP/1.1\r\n\r\n") == [Data(data=b"GET / HTTP/1.1\r\n\r\n")]
    assert c2s.forward(Data(data=b"raw")) == b"raw"


def test_declined_upgrade_resumes_http() -> None:
    """A non-101 answer to an Upgrade request keeps HTTP/1.1; the held bytes are parsed as the next request."""
    c2s, s2c = Http1Parser.pair()
    events = c2s.feed(WS + GET)
    c2s.forward(events[0])
    events = s2c.feed(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
    assert [type(e) for e in events] == [HttpResponse, EndOfMessage]
    assert c2s.has_held_input()
    assert c2s.feed(b"") == [GET_EVENT, EOM]


def test_refused_upgrade_resumes_http() -> None:
    """When the proxy refuses an upgrade, the connection stays HTTP and the next request is read."""
    c2s = Http1Parser(C2S)
    request = c2s.feed(WS + GET)[0]
    assert isinstance(request, HttpRequest)
    answer = c2s.refusal(request, Reason.POLICY_DENIED)
    assert not answer.close
    assert answer.data.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert c2s.feed(b"") == [GET_EVENT, EOM]


def test_connect_2xx_is_a_tunnel_and_non_2xx_is_not() -> None:
    """A 2xx to CONNECT starts a tunnel with no body; any other status is an ordinary response (RFC 9110 §9.3.6)."""
    connect = b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n"
    c2s, s2c = Http1Parser.pair()
    events = c2s.feed(connect)
    request = events[0]
    assert isinstance(request, HttpRequest)
    assert request.target == "db.internal:5432"
    c2s.forward(request)
    events = s2c.feed(b"HTTP/1.1 200 Connection established\r\nContent-Length: 99\r\n\r\nPGDATA")
    assert events[1:] == [ConnectionUpgraded(protocol="CONNECT"), Data(data=b"PGDATA")]

    c2s, s2c = Http1Parser.pair()
    c2s.forward(c2s.feed(connect + GET)[0])
    events = s2c.feed(b"HTTP/1.1 407 Proxy Auth\r\nContent-Length: 2\r\n\r\nno")
    assert events[1:] == [Data(data=b"no"), EOM]
    assert c2s.feed(b"") == [GET_EVENT, EOM]


# --- refusals and forwarding ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 403, 431, 502, 503, 504])
@pytest.mark.parametrize("keep_alive", [True, False])
def test_refusal_bytes_are_a_well_framed_response(status: int, keep_alive: bool) -> None:
    """Each refusal parses as exactly one complete response with an exact Content-Length and the right Connection."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "h")]))
    client.send(h11.EndOfMessage())
    client.receive_data(error_response(status, keep_alive=keep_alive))
    response = client.next_event()
    assert isinstance(response, h11.Response)
    assert response.status_code == status
    body = client.next_event()
    assert isinstance(body, h11.Data)
    assert body.data == (ACCESS_DENIED if status == 403 else response.reason + b"\r\n")
    assert isinstance(client.next_event(), h11.EndOfMessage)
    assert (b"connection", b"keep-alive" if keep_alive else b"close") in response.headers
    assert error_response(403, keep_alive=True, body=b"nope").endswith(
        b"Content-Length: 4\r\nConnection: keep-alive\r\n\r\nnope"
    )


def test_refused_request_keeps_the_connection_and_its_body_is_framed() -> None:
    """A denied request gets a 403 and the connection lives on: its body is still framed, and HEAD gets no body."""
    c2s = Http1Parser(C2S)
    post = c2s.feed(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n")[0]
    assert isinstance(post, HttpRequest)
    answer = c2s.refusal(post, Reason.POLICY_DENIED)
    assert not answer.close
    assert answer.data.endswith(b"\r\n\r\nAccess denied\r\n")
    assert c2s.feed(b"abc" + GET) == [Data(data=b"abc"), EOM, GET_EVENT, EOM]
    c2s.forward(GET_EVENT)
    head = c2s.feed(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")[0]
    assert isinstance(head, HttpRequest)
    assert c2s.refusal(head, Reason.POLICY_DENIED).data.endswith(b"Content-Length: 15\r\nConnection: keep-alive\r\n\r\n")


def test_refusal_closes_when_the_body_may_never_come() -> None:
    """Expect: 100-continue with the body unread, Connection: close and HTTP/1.0 refusals close (RFC 9110 §10.1.1)."""
    assert refuse_first(b"PUT /big HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n").close
    assert not refuse_first(b"PUT /big HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx").close
    for request in (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n"):
        answer = refuse_first(request)
        assert answer.close
        assert b"Connection: close\r\n" in answer.data


def test_refusal_of_a_request_out_of_order_is_an_error() -> None:
    """refusal() names the request it refuses: only the oldest undecided one can be, and never twice."""
    c2s, _ = Http1Parser.pair()
    first, _, second, _ = c2s.feed(GET + b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert isinstance(first, HttpRequest)
    assert isinstance(second, HttpRequest)
    with pytest.raises(ValueError):
        c2s.refusal(second, Reason.POLICY_DENIED)
    c2s.refusal(first, Reason.POLICY_DENIED)
    with pytest.raises(ValueError):
        c2s.refusal(first, Reason.POLICY_DENIED)


def test_refusal_status_maps_every_reason() -> None:
    """Every Reason has an HTTP answer; errors read from the upstream become 502 (STYLE.md §3.4)."""
    assert {r: refusal_status(r) for r in Reason} == {
        Reason.POLICY_DENIED: 403,
        Reason.MALFORMED: 400,
        Reason.TOO_LARGE: 431,
        Reason.UPSTREAM_FAILED: 503,
        Reason.UPSTREAM_TIMEOUT: 504,
    }
    assert refusal_status(Reason.MALFORMED, S2C) == 502
    assert refusal_status(Reason.TOO_LARGE, S2C) == 502


def test_forward_reframes_bodies_and_applies_header_actions() -> None:
    """Forwarded heads carry the normalised target and supplied headers, but the framing is always the parser's own."""
    c2s = Http1Parser(C2S)
    events = c2s.feed(
        b"POST /a//b HTTP/1.1\r\nHost: h\r\nX-Drop: 1\r\nTransfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n0\r\nT: 1\r\n\r\n",
    )
    request = events[0]
    assert isinstance(request, HttpRequest)
    actions = (("Host", "h"), ("X-Added", "yes"), ("Content-Length", "999"))
    wire = b"".join(c2s.forward(e, headers=actions if e is request else None) for e in events)
    assert wire == (
        b"POST /a/b HTTP/1.1\r\nHost: h\r\nX-Added: yes\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n"
    )
    h11_server = h11.Connection(h11.SERVER)
    h11_server.receive_data(wire)
    assert isinstance(h11_server.next_event(), h11.Request)
    body = h11_server.next_event()
    assert isinstance(body, h11.Data)
    assert body.data == b"abc"


@pytest.mark.parametrize("bad", [("X-A", "v\r\nX-Injected: 1"), ("X A", "v"), ("X-A", "v\x00")])
def test_header_actions_cannot_inject(bad: tuple[str, str]) -> None:
    """A header action whose name is not a token or whose value holds CR/LF/NUL is refused, never serialised."""
    with pytest.raises(ValueError):
        serialize_request_head(GET_EVENT, (bad,))


def test_forward_requires_a_decision_per_request_in_order() -> None:
    """Every request is forwarded or refused once; a second decision for it is a programming error."""
    c2s = Http1Parser(C2S)
    c2s.feed(GET)
    c2s.forward(GET_EVENT)
    with pytest.raises(ValueError):
        c2s.forward(GET_EVENT)
    with pytest.raises(ValueError):
        c2s.refusal(GET_EVENT, Reason.POLICY_DENIED)


# --- real clients ---------------------------------------------------------------------------------


def test_requests_captured_from_real_clients_parse() -> None:
    """What curl, wget, httpx and urllib actually send parses, whole and byte by byte, to one request each."""
    from pathlib import Path

    corpus = Path(__file__).resolve().parents[2] / "fuzz" / "corpus" / "http1_request"
    files = sorted(p for p in corpus.iterdir() if p.name.startswith(("curl_", "wget_", "httpx_", "urllib_")))
    assert len(files) >= 10
    for path in files:
        data = path.read_bytes()
        whole = read(C2S, [data])
        assert [type(e) for e in whole if not isinstance(e, Data)] == [HttpRequest, EndOfMessage], path.name
        assert read(C2S, [data[i : i + 1] for i in range(len(data))]) == whole, path.name


# --- state machine properties -----------------------------------------------------------------------


@given(st.sampled_from(list(State)), st.lists(st.sampled_from(list(Input)), max_size=20))
def test_every_state_input_pair_follows_the_table_or_errors(start: State, inputs: list[Input]) -> None:
    """Each (State, Input) moves per _TRANSITIONS or raises ProtocolViolation into ERROR, which absorbs (STYLE.md §4)."""
    reader = Http1Parser(C2S)
    reader.state = start
    for event in inputs:
        before = reader.state
        expected = _TRANSITIONS.get((before, event))
        if expected is None:
            with pytest.raises(ProtocolViolation):
                reader.move(event)
            assert reader.state is State.ERROR
        else:
            reader.move(event)
            assert reader.state is expected


_METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
_SEGMENT = st.text(alphabet="abcxyz019-_~", min_size=1, max_size=8)


@st.composite
def _requests(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, str, bytes]]]:
    wire = b""
    expected = []
    for _ in range(draw(st.integers(1, 4))):
        method = draw(_METHODS)
        path = "/" + "/".join(draw(st.lists(_SEGMENT, min_size=1, max_size=3)))
        body = draw(st.binary(max_size=64))
        framing = draw(st.sampled_from(["none", "length", "chunked"])) if body else "none"
        head = f"{method} {path} HTTP/1.1\r\nHost: h\r\n".encode()
        if framing == "length":
            wire += head + b"Content-Length: %d\r\n\r\n" % len(body) + body
        elif framing == "chunked":
            sizes = draw(st.lists(st.integers(1, 16), min_size=1, max_size=8))
            wire += head + b"Transfer-Encoding: chunked\r\n\r\n"
            rest = body
            for size in sizes:
                if rest:
                    wire += b"%x\r\n%b\r\n" % (len(rest[:size]), rest[:size])
                    rest = rest[size:]
            if rest:
                wire += b"%x\r\n%b\r\n" % (len(rest), rest)
            wire += b"0\r\n\r\n"
        else:
            wire += head + b"\r\n"
            body = b""
        expected.append((method, path, body))
    return wire, expected


@given(_requests(), st.lists(st.integers(0, 400), max_size=8))
def test_any_pipeline_at_any_split_reads_back_the_same_messages(
    generated: tuple[bytes, list[tuple[str, str, bytes]]], cuts: list[int]
) -> None:
    """Generated keep-alive pipelines, cut anywhere, read back to the same methods, paths and bodies (RFC 9112 §9.3.2)."""
    wire, expected = generated
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    chunks = [wire[a:b] for a, b in itertools.pairwise(points)]
    c2s = Http1Parser(C2S)
    got: list[tuple[str, str, bytes]] = []
    for event in (e for c in chunks for e in c2s.feed(c)):
        if isinstance(event, HttpRequest):
            got.append((event.method, event.path, b""))
        elif isinstance(event, Data):
            method, path, body = got[-1]
            got[-1] = (method, path, body + event.data)
    assert got == expected
    assert c2s.state is State.IDLE


_TARGET_CHARS = st.sampled_from([*list("/abcAZ09-._~!$&'()*+,;=:@%2F?#\\ "), "%2e", "%41", "//", "/./", "/../", "\x00"])


@given(st.lists(_TARGET_CHARS, max_size=24).map("".join))
def test_fast_target_path_agrees_with_normalize_target(tail: str) -> None:
    """The parser's fast check for already-normal targets never accepts one normalize_target would change or refuse."""
    from membrane.parsers.http1 import _NORMAL_TARGET
    from membrane.parsers.http_target import normalize_target

    target = "/" + tail
    if _NORMAL_TARGET.fullmatch(target):
        assert normalize_target(target) == target


@pytest.mark.parametrize(
    "chunks", all_chunkings(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
)
def test_transfer_coding_names_are_case_insensitive(chunks: list[bytes]) -> None:
    """`Chunked` frames like `chunked`: coding names are case-insensitive (RFC 9112 §7; fuzz/corpus/http1_differential/crash_te_value_case)."""
    events = read(S2C, chunks, conversation(GET))
    assert events[1:] == [Data(data=b"abc"), EOM]


def test_unchanged_heads_are_forwarded_byte_for_byte() -> None:
    """A head needing no change goes out exactly as received; a normalised target or header actions re-serialise it."""
    raw = b"GET /ok?x=1 HTTP/1.1\r\nHost: h\r\nX-Odd:   spaced  \r\n\r\n"
    c2s, s2c = Http1Parser.pair()
    request = c2s.feed(raw)[0]
    assert c2s.forward(request) == raw
    response_head = b"HTTP/1.1 200 Fine\r\nContent-Length: 0\r\nX-Y:z\r\n\r\n"
    response = s2c.feed(response_head)[0]
    assert s2c.forward(response) == response_head

    c2s, s2c = Http1Parser.pair()
    request = c2s.feed(b"GET /a//b HTTP/1.1\r\nHost: h\r\n\r\n")[0]
    assert c2s.forward(request) == b"GET /a/b HTTP/1.1\r\nHost: h\r\n\r\n"
    c2s, s2c = Http1Parser.pair()
    request = c2s.feed(raw)[0]
    assert c2s.forward(request, headers=(("Host", "h"),)) == b"GET /ok?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"


def test_101_without_upgrade_field_uses_the_requested_protocol() -> None:
    """A 101 that omits Upgrade still switches to what the request asked for (RFC 9110 §7.8), and EOF ends the tunnel."""
    c2s, s2c = Http1Parser.pair()
    c2s.forward(c2s.feed(WS)[0])
    events = s2c.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    assert events[1] == ConnectionUpgraded(protocol="websocket")
    assert s2c.feed_eof() == []
    assert s2c.state is State.CLOSED
