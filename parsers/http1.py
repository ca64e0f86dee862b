"""HTTP/1.1, sans-I/O: one `Http1Parser` per direction of a connection, bytes in, events out; plus the bytes to send on.

Owns message framing (where a message starts and ends), head limits, the refusal responses and the
re-serialisation of forwarded messages. Never touches sockets, clocks or policy. Invariant: every byte
is either part of an event, held (bounded) for the next call, or the reason for a `ParseError`.

Theory of operation
-------------------
llhttp (through httptools) validates each *head* in C; this module does the framing. A head is
located with one `find(b"\\r\\n\\r\\n")` (at most `max_header_bytes`, buffered only when it is split
across reads); llhttp is fed exactly the head's bytes as they arrive (so a malformed head fails at
once) with no per-field callbacks, and the fields are then split from the complete head with str
methods. The body is sliced out of the stream here: Content-Length bodies by counting, chunked bodies
by a small chunk reader that works per chunk, never per byte. llhttp is reused for the next head
when it finished the message itself (no body, keep-alive), else a fresh one (0.8 µs) is made.
Each reader remembers its last head and the fields split from it: a head equal byte for byte to the
previous one (keep-alive clients repeat theirs) reuses them; llhttp still validates every head.
Doing the framing here, not in llhttp, gives:
* exact limits: httptools would otherwise accumulate a header value without bound;
* HEAD responses and 2xx answers to CONNECT, which llhttp cannot frame (it never sees the request);
* keep-alive computed from the head itself (RFC 9112 §9.3), so the httptools trap
  (`should_keep_alive()` is only meaningful inside `on_message_complete`) cannot bite;
* whole-input and byte-at-a-time feeding give identical events (the fuzz targets check it).

Framing rules (each violation raises `MalformedMessage`, i.e. 400 for a request, 502 for a response):
1. RFC 9112 §2.2: CR and LF only as the CRLF pair (bare CR or LF rejected by llhttp's strict mode);
   no empty line before the request line (llhttp would skip it; h11 and this parser refuse it).
2. RFC 9112 §3: request line is exactly `method SP target SP HTTP/1.x` (llhttp tolerates a double SP).
   Only HTTP/1.0 and HTTP/1.1. The target must pass `normalize_target` (origin, absolute or `*` for
   OPTIONS); CONNECT takes authority form `host:port`. RFC 9112 §4: a status line is
   `HTTP/1.x SP 3DIGIT [SP reason]`, status 100-999, no control characters in the reason (llhttp
   accepts status 000 and NUL in the reason; h11 does not).
3. RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host; more than one is rejected in any version.
4. RFC 9112 §5.1: no whitespace between field name and colon. §5.2: no obs-fold (line folding).
5. RFC 9112 §6.1: Transfer-Encoding only as the single value `chunked` (any other coding, a list or
   a repeated field is rejected: only a final `chunked` frames safely, and we accept only that);
   Transfer-Encoding in an HTTP/1.0 message is rejected.
6. RFC 9112 §6.3 (3): Content-Length together with Transfer-Encoding is rejected (requests and responses).
7. RFC 9112 §6.3 (5): Content-Length must be one field of 1-18 ASCII digits; repeated fields or lists
   (even equal ones) are rejected.
8. RFC 9112 §7.1: chunk-size is 1-16 hex digits, no whitespace, optional well-formed extensions; the
   line ends in CRLF; chunk data is followed by exactly CRLF. §7.1.2: trailer fields follow the
   field syntax; Content-Length, Transfer-Encoding and Host are refused as trailers.
9. RFC 9112 §6.3 (1)/(2), RFC 9110 §9.3.6/§15.2: responses to HEAD, 1xx, 204 and 304 have no body
   whatever their headers say; a 2xx to CONNECT and a 101 to an Upgrade request end HTTP/1.1 on the
   connection (`ConnectionUpgraded`, then opaque `Data` both ways). A 101 that was not asked for, or
   a response with no request in flight, is a `ProtocolViolation`.
10. RFC 9112 §6.3 (8): a request without Content-Length or chunked has no body; a response without
   them is read until the server closes (`feed_eof`) and ends keep-alive.
11. RFC 9112 §9.3: HTTP/1.1 persists unless `Connection: close`; HTTP/1.0 never persists here (a
   proxy must not keep an HTTP/1.0 client's connection alive, §9.3). After the last message of a
   closing connection, more bytes are a `ProtocolViolation` (h11 does the same).
Limits (`MessageTooLarge`, 431): the head (`max_header_bytes`, 16 KiB as IIS; RFC 6585 §5), the field
count (100, as Apache's LimitRequestFields), one line (8 KiB, as Apache's LimitRequestLine), a
chunk-size line (1 KiB, as h11 caps chunk headers) and the bytes held while a protocol switch is pending.

Directions: each `Direction` has its own `Http1Parser` with the state table `_TRANSITIONS`; the two
share the requests in flight (`_Exchanges`). The transitions written as code are the three ends of a
message (`_end_message`: next IDLE, MUST_CLOSE or PAUSED) and a switch (`_Exchanges.switched`: both
parsers to TUNNEL). After a request that proposes a switch (Upgrade with `Connection: upgrade`, or
CONNECT) the client parser PAUSES and holds further bytes until the answer: a 101 / 2xx-to-CONNECT
turns them into tunnel `Data`, anything else (or `refusal()`) resumes HTTP parsing; call
`client.feed(b"")` when `client.has_held_input()` says so.

Forwarding (decided here, the proxy just writes what `forward()` returns): a head that needs no change
(target already normal, no header actions, the event object as emitted) goes out as the exact bytes
received and validated; otherwise it is re-serialised (normalised target, header actions applied,
framing headers owned by this module: any
Content-Length/Transfer-Encoding in supplied headers is replaced by the parsed framing); bodies are
re-framed, not passed through: Content-Length bodies go out as the same bytes, chunked bodies are
re-chunked one chunk per `Data` with trailers re-serialised. The upstream therefore only ever sees
the framing this parser read, so chunk extensions or other framing quirks cannot reach it.
"""

from __future__ import annotations

import enum
import functools
import re
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, assert_never

import httptools
from membrane.parsers.errors import MalformedMessage, MessageTooLarge, ParseError, ProtocolViolation
from membrane.parsers.events import (
    ConnectionUpgraded,
    Data,
    Direction,
    EndOfMessage,
    Headers,
    HttpRequest,
    HttpResponse,
    Parser,
    Reason,
    Trailers,
)
from membrane.parsers.http_target import normalize_target

Http1Event = HttpRequest | HttpResponse | Data | Trailers | EndOfMessage | ConnectionUpgraded

C2S: Final = Direction.CLIENT_TO_SERVER
S2C: Final = Direction.SERVER_TO_CLIENT

DEFAULT_MAX_HEADER_BYTES: Final = 16384
ACCESS_DENIED: Final = b"Access denied\r\n"  # Cilium's default 403 body

_EOM: Final = EndOfMessage()
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:;"
    + _TOKEN
    + rb"(?:=(?:"
    + _TOKEN
    + rb'|"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"))?)*)\r\n'
)
_FIELD_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*((?:[!-~\x80-\xff](?:[ \t]*[!-~\x80-\xff])*)?)[ \t]*\r\n")
_CTL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN_STR = re.compile(_TOKEN.decode())
_FIELD_VALUE_STR = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_AUTHORITY = re.compile(r"[^\s/?#@\\]+:[0-9]{1,5}")
_FRAMING_NAMES: Final = frozenset({"content-length", "transfer-encoding"})
_TRAILER_FORBIDDEN: Final = frozenset({b"content-length", b"transfer-encoding", b"host"})


class State(enum.Enum):
    """Where one direction's reader is. UPPER_CASE per STYLE.md §2."""

    __hash__ = object.__hash__  # identity hash: Enum's own __hash__ is Python code, on the per-message path

    IDLE = "idle"  # between messages
    HEAD = "head"  # part of a head buffered
    BODY_LENGTH = "body_length"  # Content-Length body, `remaining` bytes to go
    CHUNK_SIZE = "chunk_size"  # expecting a chunk-size line
    CHUNK_DATA = "chunk_data"  # inside a chunk
    CHUNK_END = "chunk_end"  # expecting the CRLF after chunk data
    TRAILERS = "trailers"  # after the last chunk: trailer fields until an empty line
    BODY_UNTIL_CLOSE = "body_until_close"  # response without framing: body ends at EOF
    DONE = "done"  # a message just ended; decides what follows
    PAUSED = "paused"  # client proposed a switch; holding bytes until the answer
    MUST_CLOSE = "must_close"  # last message said close; only EOF may follow
    TUNNEL = "tunnel"  # upgraded: opaque bytes
    CLOSED = "closed"  # EOF seen
    ERROR = "error"  # a ParseError was raised; the reader is unusable


class Input(enum.Enum):
    """What a reader saw or was told; the keys of `_TRANSITIONS` with `State`."""

    __hash__ = object.__hash__

    HEAD_START = "head_start"
    HEAD_NO_BODY = "head_no_body"
    HEAD_LENGTH = "head_length"
    HEAD_CHUNKED = "head_chunked"
    HEAD_UNTIL_CLOSE = "head_until_close"
    HEAD_INTERIM = "head_interim"  # 1xx other than 101: the final response still follows
    HEAD_SWITCH = "head_switch"  # 101, or 2xx to CONNECT
    BODY_COMPLETE = "body_complete"
    CHUNK_HEADER = "chunk_header"
    LAST_CHUNK = "last_chunk"
    CHUNK_DATA_COMPLETE = "chunk_data_complete"
    CHUNK_CRLF = "chunk_crlf"
    TRAILERS_COMPLETE = "trailers_complete"
    NEXT = "next"  # keep-alive: another message may follow
    CLOSE = "close"  # the message ended the connection
    PAUSE = "pause"  # the request proposed a protocol switch
    RESUME = "resume"  # the switch was declined (or refused by the proxy)
    SWITCH = "switch"  # the switch was accepted
    EOF = "eof"


_S, _I = State, Input
_TRANSITIONS: Final[dict[tuple[State, Input], State]] = {
    (_S.IDLE, _I.HEAD_START): _S.HEAD,
    (_S.HEAD, _I.HEAD_NO_BODY): _S.DONE,
    (_S.HEAD, _I.HEAD_LENGTH): _S.BODY_LENGTH,
    (_S.HEAD, _I.HEAD_CHUNKED): _S.CHUNK_SIZE,
    (_S.HEAD, _I.HEAD_UNTIL_CLOSE): _S.BODY_UNTIL_CLOSE,
    (_S.HEAD, _I.HEAD_INTERIM): _S.IDLE,
    (_S.HEAD, _I.HEAD_SWITCH): _S.TUNNEL,
    (_S.BODY_LENGTH, _I.BODY_COMPLETE): _S.DONE,
    (_S.CHUNK_SIZE, _I.CHUNK_HEADER): _S.CHUNK_DATA,
    (_S.CHUNK_SIZE, _I.LAST_CHUNK): _S.TRAILERS,
    (_S.CHUNK_DATA, _I.CHUNK_DATA_COMPLETE): _S.CHUNK_END,
    (_S.CHUNK_END, _I.CHUNK_CRLF): _S.CHUNK_SIZE,
    (_S.TRAILERS, _I.TRAILERS_COMPLETE): _S.DONE,
    (_S.BODY_UNTIL_CLOSE, _I.EOF): _S.CLOSED,
    (_S.DONE, _I.NEXT): _S.IDLE,
    (_S.DONE, _I.CLOSE): _S.MUST_CLOSE,
    (_S.DONE, _I.PAUSE): _S.PAUSED,
    (_S.PAUSED, _I.RESUME): _S.IDLE,
    (_S.PAUSED, _I.SWITCH): _S.TUNNEL,
    (_S.IDLE, _I.EOF): _S.CLOSED,
    (_S.MUST_CLOSE, _I.EOF): _S.CLOSED,
    (_S.PAUSED, _I.EOF): _S.CLOSED,
    (_S.TUNNEL, _I.EOF): _S.CLOSED,
    (_S.CLOSED, _I.EOF): _S.CLOSED,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Per-connection ceilings; each crossing raises `MessageTooLarge`."""

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES  # whole head incl. request/status line and final CRLF
    max_headers: int = 100  # fields in one head (and in one trailer section)
    max_line_bytes: int = 8192  # request/status line, one field line, one trailer line
    max_chunk_line_bytes: int = 1024  # chunk-size line incl. extensions and CRLF
    max_held_bytes: int = 65536  # client bytes held while a protocol switch is pending


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """A response the proxy writes instead of forwarding; `close` says the connection must close after it."""

    data: bytes
    close: bool


@dataclass(init=False, slots=True)
class _Exchange:
    """One request's framing facts, from its head until its response is complete. Its own __init__: a compiled
    dataclass's generated one is interpreted (parsers/events.py)."""

    method: str
    keep_alive: bool
    switch: str | None  # Upgrade token, "CONNECT", or None
    expect_continue: bool
    has_body: bool
    complete: bool  # the request's EndOfMessage was read
    answered: bool  # its final response arrived, or the proxy refused it
    request: HttpRequest | None  # the event, to recognise it in forward()
    raw_head: bytes | None  # the head as received, when forwarding it unchanged is exact

    def __init__(
        self, *, method: str, keep_alive: bool, switch: str | None, expect_continue: bool, has_body: bool,
        complete: bool = False, answered: bool = False, request: HttpRequest | None = None, raw_head: bytes | None = None,
    ) -> None:
        self.method = method
        self.keep_alive = keep_alive
        self.switch = switch
        self.expect_continue = expect_continue
        self.has_body = has_body
        self.complete = complete
        self.answered = answered
        self.request = request
        self.raw_head = raw_head


class _HeadDone:
    """The only httptools callbacks used: llhttp saw the end of the head / of a (bodiless) message.

    Field callbacks are deliberately not registered: httptools would accumulate each field value
    without bound and call into Python per field. llhttp validates the head in C; the fields are then
    split here from the complete head (bounded by `max_header_bytes`)."""

    __slots__ = ("complete", "message_complete")

    def __init__(self) -> None:
        self.complete = False
        self.message_complete = False

    def on_headers_complete(self) -> None:
        self.complete = True

    def on_message_complete(self) -> None:
        self.message_complete = True


_LlhttpParser = httptools.HttpRequestParser | httptools.HttpResponseParser


@dataclass(slots=True)
class _Fields:
    """What one head's fields say about framing and routing."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    content_length: int | None = None
    chunked: bool = False
    host: str | None = None
    host_count: int = 0
    upgrade: str | None = None
    connection: set[str] = field(default_factory=set)
    expect: str | None = None


_SPECIAL: Final = {"content-length": 0, "transfer-encoding": 1, "host": 2, "connection": 3, "upgrade": 4, "expect": 5}
_VERSIONS: Final = {"HTTP/1.1": "1.1", "HTTP/1.0": "1.0"}
# Targets normalize_target returns unchanged: '/'-separated segments of pchar without '%', none empty or
# starting with '.', then an optional query without CTL, space, '#' or backslash. Anything else takes the
# full normalize_target (tests/parsers/test_http1.py checks the two agree).
_SEG = r"A-Za-z0-9\-_~!$&'()*+,;=:@"
_NORMAL_TARGET = re.compile(rf"/(?:[{_SEG}][{_SEG}.]*(?:/[{_SEG}][{_SEG}.]*)*/?)?(?:\?[^\x00-\x20\x7f#\\]*)?")


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",")}


def _head_lines(head: bytes, limits: Limits, direction: Direction) -> list[str]:
    """The head's lines (start line first), checked against the line and field-count limits."""
    lines = head[:-4].decode("latin-1").split("\r\n")
    if len(lines) > limits.max_headers + 1:
        raise MessageTooLarge(f"more than {limits.max_headers} header fields", direction=direction)
    if len(head) > limits.max_line_bytes and max(map(len, lines)) > limits.max_line_bytes:  # no line is longer than the head
        raise MessageTooLarge(f"a head line is longer than {limits.max_line_bytes} bytes", direction=direction)
    return lines


def _parse_fields(lines: list[str], version: str, direction: Direction) -> _Fields:
    """Decode the field lines (llhttp already checked their syntax) and pull out the ones that frame."""
    f = _Fields()
    headers = f.headers
    for line in lines[1:]:
        name, _, value = line.partition(":")
        value = value.strip(" \t")
        headers.append((name, value))
        special = _SPECIAL.get(name.lower())
        if special is None:
            continue
        if special == 0:  # content-length
            if f.content_length is not None:
                raise MalformedMessage("repeated Content-Length (RFC 9112 §6.3)", direction=direction)
            if not (value.isascii() and value.isdigit() and len(value) <= 18):
                raise MalformedMessage(f"invalid Content-Length {value[:32]!r} (RFC 9112 §6.3)", direction=direction)
            f.content_length = int(value)
        elif special == 1:  # transfer-encoding
            if f.chunked or value.lower() != "chunked":
                raise MalformedMessage("Transfer-Encoding other than one final 'chunked' (RFC 9112 §6.1)",
                                       direction=direction)
            f.chunked = True
        elif special == 2:  # host
            f.host_count += 1
            f.host = value
        elif special == 3:  # connection
            f.connection |= _tokens(value)
        elif special == 4:  # upgrade
            f.upgrade = value
        else:  # expect
            f.expect = value.lower()
    if f.chunked:
        if f.content_length is not None:
            raise MalformedMessage("both Content-Length and Transfer-Encoding (RFC 9112 §6.3)", direction=direction)
        if version == "1.0":
            raise MalformedMessage("Transfer-Encoding in an HTTP/1.0 message (RFC 9112 §6.1)", direction=direction)
    return f


def _request_target(method: str, raw_target: str, f: _Fields, direction: Direction) -> tuple[str, str, str]:
    """(target, path, query) of a request line's target: authority form for CONNECT, `*` for OPTIONS,
    else origin or absolute form through `normalize_target` (RFC 9112 §3.2)."""
    if method == "CONNECT":
        if not _AUTHORITY.fullmatch(raw_target):
            raise MalformedMessage("CONNECT target is not host:port (RFC 9112 §3.2.3)", direction=direction)
        if f.chunked or f.content_length:
            raise MalformedMessage("CONNECT with a body (RFC 9110 §9.3.6)", direction=direction)
        return raw_target, raw_target, ""
    if raw_target == "*":
        if method != "OPTIONS":
            raise MalformedMessage("asterisk-form target outside OPTIONS (RFC 9112 §3.2.4)", direction=direction)
        return "*", "*", ""
    # An already normal target is what normalize_target would return unchanged.
    target = raw_target if _NORMAL_TARGET.fullmatch(raw_target) else normalize_target(raw_target, direction=direction)
    path, _, query = target.partition("?")
    return target, path, query


def _switch_proposed(method: str, f: _Fields) -> str | None:
    """The protocol a request asks to switch to: "CONNECT", the first Upgrade token (with
    `Connection: upgrade`), or None."""
    if method == "CONNECT":
        return "CONNECT"
    if f.upgrade is not None and "upgrade" in f.connection:
        return f.upgrade.split(",")[0].strip()
    return None


def _status_line(line: str, direction: Direction) -> tuple[str, int, str]:
    """(version, status, reason) of a status line `HTTP/1.x SP 3DIGIT [SP reason]` (RFC 9112 §4)."""
    parts = line.split(" ", 2)
    version = _VERSIONS.get(parts[0])
    if version is None:
        raise MalformedMessage(f"unsupported version {parts[0][:16]!r} (RFC 9112 §2.3)", direction=direction)
    code = parts[1] if len(parts) > 1 else ""
    if not (len(code) == 3 and code.isascii() and code.isdigit()) or code[0] == "0":
        raise MalformedMessage(f"status code {code[:8]!r} is not 100-999 (RFC 9112 §4)", direction=direction)
    reason = parts[2] if len(parts) > 2 else ""
    if _CTL.search(reason):
        raise MalformedMessage("control character in the reason phrase (RFC 9112 §4)", direction=direction)
    return version, int(code), reason


class _Exchanges:
    """What the two directions of one connection share: the requests, from their head until answered."""

    __slots__ = ("client", "current", "in_flight", "undecided", "upgraded")

    def __init__(self, client: Http1Parser) -> None:
        self.client = client  # the CLIENT_TO_SERVER parser, paused and resumed around protocol switches
        self.undecided: deque[_Exchange] = deque()  # parsed requests the proxy has not yet forwarded/refused
        self.in_flight: deque[_Exchange] = deque()  # forwarded requests awaiting their final response
        self.current: _Exchange | None = None  # the request being read
        self.upgraded: str | None = None  # the ConnectionUpgraded protocol once switched

    def parsed(self, exchange: _Exchange) -> None:
        self.undecided.append(exchange)
        self.current = exchange

    def forwarded(self, request: HttpRequest) -> bytes | None:
        """Record the oldest undecided request as forwarded. Returns its head as received when `request`
        is the event as emitted and its target needed no normalising (those bytes are exact), else None.
        Raises ValueError when no request waits for a decision."""
        if not self.undecided:
            raise ValueError("forward() of a request that was not read, or was already decided")
        exchange = self.undecided.popleft()
        self.in_flight.append(exchange)
        raw = exchange.raw_head if exchange.request is request else None
        exchange.raw_head = exchange.request = None
        return raw

    def refused(self, request: HttpRequest) -> tuple[str, bool]:
        """Record `request`, the oldest undecided one, as answered by the proxy. Returns its method and
        whether the connection must close after the refusal (see `Http1Parser.refusal`).
        Raises ValueError when `request` is not the oldest undecided request."""
        if not self.undecided or self.undecided[0].request is not request:
            raise ValueError("refusal() of a request that is not the oldest one waiting for a decision")
        exchange = self.undecided.popleft()
        exchange.answered = True
        exchange.raw_head = exchange.request = None
        close = not exchange.keep_alive or (exchange.expect_continue and exchange.has_body and not exchange.complete)
        if exchange.switch is not None:
            if exchange.complete:
                self.resume_client()
            else:
                close = True
        return exchange.method, close

    def answering(self) -> _Exchange | None:
        return self.in_flight[0] if self.in_flight else None

    def answered(self, exchange: _Exchange) -> None:
        self.in_flight.popleft()
        exchange.answered = True
        if exchange.switch is not None:
            self.resume_client()

    def resume_client(self) -> None:
        client = self.client
        if client.state is State.PAUSED:
            client.move(Input.RESUME)

    def switched(self, events: list[Http1Event], protocol: str) -> None:
        self.in_flight.popleft().answered = True
        client = self.client
        if client.state is not State.PAUSED:
            raise ProtocolViolation("protocol switch before the request was complete", direction=S2C)
        client.move(Input.SWITCH)
        self.upgraded = protocol
        events.append(ConnectionUpgraded(protocol=protocol))


class _Framing:
    """One direction's framing state machine: where each message and each body ends (`_TRANSITIONS`).

    Reads bodies (Content-Length, chunked, until close, tunnel) and holds input while a switch is
    pending; heads are read by `Http1Parser`, which builds on this class.
    """

    __slots__ = (
        "_buf",
        "_chunked_trailers",
        "_head_is_request",
        "_held",
        "_remaining",
        "_response_keep_alive",
        "_shared",
        "_trailer_bytes",
        "direction",
        "limits",
        "state",
    )

    def __init__(self, direction: Direction, shared: _Exchanges, limits: Limits) -> None:
        self.direction = direction
        self._head_is_request = direction is C2S
        self._shared = shared
        self.limits = limits
        self.state = State.IDLE
        self._buf = bytearray()  # a partial head / chunk line / trailer line
        self._held = bytearray()  # bytes received while PAUSED
        self._remaining = 0
        self._chunked_trailers: list[tuple[str, str]] = []
        self._trailer_bytes = 0
        self._response_keep_alive = True

    def _read_head(self, data: bytes, pos: int, events: list[Http1Event]) -> int:
        """Read (part of) a head from `data[pos:]`; returns the offset after what was used (Http1Parser)."""
        raise NotImplementedError

    # -- state table -------------------------------------------------------------------------------

    def move(self, event: Input) -> None:
        """Apply one transition of `_TRANSITIONS`; a missing pair is a ProtocolViolation and ERROR."""
        new = _TRANSITIONS.get((self.state, event))
        if new is None:
            old = self.state
            self.state = State.ERROR
            raise ProtocolViolation(f"{event.value} is not allowed in state {old.value}", direction=self.direction)
        self.state = new

    def _error(self, cls: type[ParseError], message: str) -> ParseError:
        self.state = State.ERROR
        return cls(message, direction=self.direction)

    # -- feeding -----------------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Http1Event]:
        """Parse `data` received from this direction's peer (b"" processes held input only).

        Returns:
            The events, in order; [] when more bytes are needed.
        Raises:
            MalformedMessage: the bytes break the framing rules (module docstring); answer with
                `error_response(refusal_status(e.reason, e.direction), keep_alive=False)` and close.
            MessageTooLarge: a limit was crossed; same as above (431 for a request).
            ProtocolViolation: bytes in an order HTTP/1.1 forbids; close the connection.
            The parser is unusable after any of them.
        """
        if self.state is State.ERROR:
            raise ProtocolViolation("parser already failed", direction=self.direction)
        if self._held and self.state is not State.PAUSED:
            data = bytes(self._held) + data
            self._held.clear()
        events: list[Http1Event] = []
        try:
            self._run(data, events)
        except ParseError:
            self.state = State.ERROR
            raise
        return events

    def _read_counted(self, data: bytes, pos: int, events: list[Http1Event]) -> int:
        """Deliver up to `_remaining` body bytes from `pos`. Returns where the counted part ended, or -1 when
        `data` ran out first (`_remaining` then holds what is still due)."""
        remaining = self._remaining
        n = len(data)
        if n - pos < remaining:
            events.append(Data(data=data[pos:] if pos else data))
            self._remaining = remaining - (n - pos)
            return -1
        events.append(Data(data=data[pos : pos + remaining]))
        self._remaining = 0
        return pos + remaining

    def _run(self, data: bytes, events: list[Http1Event]) -> None:
        pos = 0
        n = len(data)
        while pos < n:
            st = self.state
            if st is State.BODY_LENGTH:
                pos = self._read_counted(data, pos, events)
                if pos < 0:
                    return
                self.move(Input.BODY_COMPLETE)
                self._end_message(events)
            elif st is State.IDLE or st is State.HEAD:
                pos = self._read_head(data, pos, events)
            elif st is State.CHUNK_DATA:
                pos = self._read_counted(data, pos, events)
                if pos < 0:
                    return
                self._remaining = 2  # the CRLF after the chunk (CHUNK_END)
                self.move(Input.CHUNK_DATA_COMPLETE)
            elif st is State.CHUNK_END:
                # Exactly CRLF after chunk data (RFC 9112 §7.1); `_remaining` counts what is still due.
                want = b"\r\n"[2 - self._remaining :]
                got = data[pos : pos + len(want)]
                if not want.startswith(got):
                    raise self._error(MalformedMessage, "chunk data not followed by CRLF (RFC 9112 §7.1)")
                pos += len(got)
                self._remaining -= len(got)
                if self._remaining == 0:
                    self.move(Input.CHUNK_CRLF)
            elif st is State.CHUNK_SIZE:
                pos = self._read_chunk_size(data, pos)
            elif st is State.TRAILERS:
                pos = self._read_trailer_line(data, pos, events)
            elif st is State.BODY_UNTIL_CLOSE or st is State.TUNNEL:
                events.append(Data(data=data[pos:] if pos else data))
                return
            elif st is State.PAUSED:
                if len(self._held) + n - pos > self.limits.max_held_bytes:
                    raise self._error(MessageTooLarge, "too many bytes sent while a protocol switch is pending")
                self._held += data[pos:]
                return
            elif st is State.MUST_CLOSE or st is State.CLOSED:
                raise self._error(ProtocolViolation, f"data after the last message ({st.value})")
            else:  # DONE is transient and ERROR is caught in feed()
                raise self._error(ProtocolViolation, f"cannot read in state {st.value}")

    def _take(self, data: bytes, pos: int, term: bytes, limit: int, what: str) -> tuple[bytes | None, int]:
        """Bytes from `pos` through the first `term` (at most `limit` in all), buffering a partial one."""
        buf = self._buf
        if not buf:
            end = data.find(term, pos, pos + limit)
            if end >= 0:
                end += len(term)
                return data[pos:end], end
            if len(data) - pos >= limit:
                raise self._error(MessageTooLarge, f"{what} longer than {limit} bytes")
            buf += data[pos:]
            return None, len(data)
        old = len(buf)
        buf += data[pos : pos + limit - old]
        end = buf.find(term, max(0, old - len(term) + 1))
        if end >= 0:
            end += len(term)
            block = bytes(buf[:end])
            buf.clear()
            return block, pos + end - old
        if len(buf) >= limit:
            raise self._error(MessageTooLarge, f"{what} longer than {limit} bytes")
        return None, len(data)

    # -- chunked bodies ----------------------------------------------------------------------------

    def _read_chunk_size(self, data: bytes, pos: int) -> int:
        line, pos = self._take(data, pos, b"\r\n", self.limits.max_chunk_line_bytes, "chunk-size line")
        if line is None:
            return pos
        match = _CHUNK_LINE.fullmatch(line)
        if match is None:
            raise self._error(MalformedMessage, f"invalid chunk-size line {line[:32]!r} (RFC 9112 §7.1)")
        size = int(match.group(1), 16)
        if size:
            self._remaining = size
            self.move(Input.CHUNK_HEADER)
        else:
            self._chunked_trailers = []
            self._trailer_bytes = 0
            self.move(Input.LAST_CHUNK)
        return pos

    def _read_trailer_line(self, data: bytes, pos: int, events: list[Http1Event]) -> int:
        limits = self.limits
        line, pos = self._take(data, pos, b"\r\n", limits.max_line_bytes, "trailer line")
        if line is None:
            return pos
        self._trailer_bytes += len(line)
        if self._trailer_bytes > limits.max_header_bytes:
            raise self._error(MessageTooLarge, f"trailer section longer than {limits.max_header_bytes} bytes")
        if line == b"\r\n":
            if self._chunked_trailers:
                events.append(Trailers(headers=tuple(self._chunked_trailers)))
            self.move(Input.TRAILERS_COMPLETE)
            self._end_message(events)
            return pos
        match = _FIELD_LINE.fullmatch(line)
        if match is None:
            raise self._error(MalformedMessage, f"invalid trailer field {line[:32]!r} (RFC 9112 §7.1.2)")
        if match.group(1).lower() in _TRAILER_FORBIDDEN:
            raise self._error(MalformedMessage, "framing or routing field in trailers (RFC 9110 §6.5.1)")
        if len(self._chunked_trailers) >= limits.max_headers:
            raise self._error(MessageTooLarge, f"more than {limits.max_headers} trailer fields")
        self._chunked_trailers.append((match.group(1).decode("latin-1"), match.group(2).decode("latin-1")))
        return pos

    # -- message ends ------------------------------------------------------------------------------

    def _end_message(self, events: list[Http1Event]) -> None:
        events.append(_EOM)
        if self._head_is_request:
            exchange = self._shared.current
            assert exchange is not None  # a request's EndOfMessage always follows its head
            exchange.complete = True
            if exchange.switch is not None and not exchange.answered:
                self.move(Input.PAUSE)
            elif exchange.keep_alive:
                self.move(Input.NEXT)
            else:
                self.move(Input.CLOSE)
        else:
            self.move(Input.NEXT if self._response_keep_alive else Input.CLOSE)

    def feed_eof(self) -> list[Http1Event]:
        """This direction's peer closed its side.

        Returns:
            [EndOfMessage] when that ends a response read until close, else [].
        Raises:
            MalformedMessage: the peer closed in the middle of a message (truncated); close both sides.
        """
        st = self.state
        if st is State.BODY_UNTIL_CLOSE:
            self.move(Input.EOF)
            return [_EOM]
        if st is State.ERROR:
            raise ProtocolViolation("parser already failed", direction=self.direction)
        if (st, Input.EOF) not in _TRANSITIONS:
            self.state = State.ERROR
            raise MalformedMessage(
                f"connection closed in the middle of a message ({st.value})", direction=self.direction
            )
        self.move(Input.EOF)
        return []

    def has_held_input(self) -> bool:
        """True when bytes received during a pending switch can now be parsed: call feed(b"")."""
        return bool(self._held) and self.state is not State.PAUSED



class Http1Parser(_Framing):
    """One direction of an HTTP/1.1 connection: `feed(data) -> list[Http1Event]` (the parser contract).

    The CLIENT_TO_SERVER parser reads requests; the SERVER_TO_CLIENT parser reads responses and is made
    from it (`Http1Parser(S2C, requests=client)`, or both at once with `Http1Parser.pair()`), because a
    response is framed by its request's method and a switch changes both directions.
    Protocol with the proxy (all calls synchronous, no I/O):
    * `feed(data)` returns the events in `data`; `feed_eof()` when that peer closed; `data_to_send()`
      is always b"" (HTTP/1.1 never answers on its own: every byte written comes from `forward` or `refusal`).
    * Every `HttpRequest` the client parser returns must be answered, in order, by exactly one of
      `client.forward(request)` (it goes upstream; its response will be framed by its method) or
      `client.refusal(request, reason)` (the proxy answers it). The body events of a refused request are dropped.
    * `forward(event)` returns the bytes to write to the other peer for any event this parser read.
    * When `client.has_held_input()` is true after a response or a refusal, call `client.feed(b"")`.
    """

    __slots__ = ("_done", "_memo", "_out_chunked", "_out_trailers", "_parser", "_raw_responses", "rejected")

    def __init__(
        self,
        direction: Direction,
        *,
        requests: Http1Parser | None = None,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_headers: int = 100,
        max_line_bytes: int = 8192,
        max_chunk_line_bytes: int = 1024,
        max_held_bytes: int = 65536,
    ) -> None:
        """Raises ValueError: `requests` missing (or given) for SERVER_TO_CLIENT (CLIENT_TO_SERVER)."""
        limits = Limits(
            max_header_bytes=max_header_bytes,
            max_headers=max_headers,
            max_line_bytes=max_line_bytes,
            max_chunk_line_bytes=max_chunk_line_bytes,
            max_held_bytes=max_held_bytes,
        )
        if direction is C2S:
            if requests is not None:
                raise ValueError("a CLIENT_TO_SERVER parser reads the requests itself: no requests= parser")
            super().__init__(direction, _Exchanges(self), limits)
        else:
            if requests is None or requests.direction is not C2S:
                raise ValueError("a SERVER_TO_CLIENT parser needs requests=<the CLIENT_TO_SERVER parser>")
            super().__init__(direction, requests._shared, limits)
        self._done = _HeadDone()
        # The last head read and what _lines/_fields made of it: a keep-alive peer often sends the
        # same head again (a pure function of the bytes, so the fields are reused, never re-read).
        self._memo: tuple[bytes, list[str], _Fields] | None = None
        self._parser: _LlhttpParser | None = None  # llhttp for the current head; kept while reusable
        # (method, raw target, Host or "") of a request head being judged; None once it was accepted.
        # Set while a ParseError is raised for a head whose request line was split, so that the
        # proxy can say which request it refused.
        self.rejected: tuple[str, str, str] | None = None
        self._out_chunked = False  # what forward() writes is chunked (re-chunked one chunk per Data)
        self._out_trailers: Headers = ()
        # Response heads as received, forwarded unchanged when forward() gets the same event (bounded).
        self._raw_responses: deque[tuple[HttpResponse, bytes]] = deque(maxlen=8)

    @classmethod
    def pair(
        cls,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_headers: int = 100,
        max_line_bytes: int = 8192,
        max_chunk_line_bytes: int = 1024,
        max_held_bytes: int = 65536,
    ) -> tuple[Http1Parser, Http1Parser]:
        """The (CLIENT_TO_SERVER, SERVER_TO_CLIENT) parsers of one connection, with the same limits."""
        client = cls(
            C2S,
            max_header_bytes=max_header_bytes,
            max_headers=max_headers,
            max_line_bytes=max_line_bytes,
            max_chunk_line_bytes=max_chunk_line_bytes,
            max_held_bytes=max_held_bytes,
        )
        server = cls(
            S2C,
            requests=client,
            max_header_bytes=max_header_bytes,
            max_headers=max_headers,
            max_line_bytes=max_line_bytes,
            max_chunk_line_bytes=max_chunk_line_bytes,
            max_held_bytes=max_held_bytes,
        )
        return client, server

    # -- heads -------------------------------------------------------------------------------------

    def _read_head(self, data: bytes, pos: int, events: list[Http1Event]) -> int:
        done = self._done
        if self.state is State.IDLE:
            if data[pos] in b"\r\n":
                raise self._error(MalformedMessage, "empty line or bare CR/LF before the start line (RFC 9112 §2.2)")
            self.move(Input.HEAD_START)
            done.complete = done.message_complete = False
            if self._parser is None:
                self._parser = (
                    httptools.HttpRequestParser(done) if self._head_is_request else httptools.HttpResponseParser(done)
                )
        start = pos
        limit = self.limits.max_header_bytes
        end = -1 if self._buf else data.find(b"\r\n\r\n", pos, pos + limit)
        if end >= 0:  # the common case: a whole head in one read
            pos = end + 4
            piece = data if not start and pos == len(data) else data[start:pos]
            head: bytes | None = piece
        else:
            head, pos = self._take(data, pos, b"\r\n\r\n", limit, "header block")
            # llhttp sees every head byte once, as it arrives: a malformed head fails at once, not at the limit.
            piece = data[start:pos] if start or pos != len(data) else data
        parser = self._parser
        assert parser is not None
        stopped = False
        try:
            parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            stopped = True  # llhttp stops at the end of an Upgrade/CONNECT/101 head; the framing is decided here
        except httptools.HttpParserError as e:
            # The same stop is reported as an error when llhttp's upgrade flag is unset (a 101 without Upgrade).
            if not (done.complete and head is not None and str(e) == "Pause on CONNECT/Upgrade"):
                raise self._error(MalformedMessage, f"invalid head: {e}") from e
            stopped = True
        if done.complete is (head is None):
            raise self._error(MalformedMessage, "head does not end at the first CRLF CRLF (RFC 9112 §2.2)")
        if head is not None:
            reusable = self._request_head(head, events) if self._head_is_request else self._response_head(head, events)
            if stopped or not (reusable and done.message_complete):
                self._parser = None  # llhttp expects a body we slice ourselves, or stopped: start afresh
        return pos

    def _head_lines(self, head: bytes) -> tuple[list[str], bool]:
        """The head's lines and whether they are the previous head's (then its fields are reused too)."""
        memo = self._memo
        if memo is not None and memo[0] == head:
            return memo[1], True
        return _head_lines(head, self.limits, self.direction), False

    def _head_fields(self, head: bytes, lines: list[str], version: str, cached: bool) -> _Fields:
        """`_parse_fields(lines, version)`, reused when `head` is the previous head byte for byte (never mutated)."""
        if cached and self._memo is not None:
            return self._memo[2]
        f = _parse_fields(lines, version, self.direction)
        self._memo = (head, lines, f)
        return f

    def _request_head(self, head: bytes, events: list[Http1Event]) -> bool:
        """Emit the request; returns whether llhttp may read the next head (keep-alive, no switch)."""
        lines, cached = self._head_lines(head)
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise self._error(MalformedMessage, "request line is not 'method SP target SP version' (RFC 9112 §3)")
        method, raw_target, proto = parts
        self.rejected = (method, raw_target, "")
        version = _VERSIONS.get(proto)
        if version is None:
            raise self._error(MalformedMessage, f"unsupported version {proto[:16]!r} (RFC 9112 §2.3)")
        f = self._head_fields(head, lines, version, cached)
        self.rejected = (method, raw_target, f.host or "")
        if f.host_count > 1 or (f.host_count == 0 and version == "1.1"):
            raise self._error(MalformedMessage, f"{f.host_count} Host fields; exactly one is required (RFC 9112 §3.2)")
        target, path, query = _request_target(method, raw_target, f, self.direction)
        keep_alive = version == "1.1" and "close" not in f.connection
        switch = _switch_proposed(method, f)
        content_length = f.content_length
        has_body = f.chunked or bool(content_length)
        request = HttpRequest(
            method=method,
            target=target,
            path=path,
            query=query,
            host=f.host,
            headers=tuple(f.headers),
            http_version=version,
            has_body=has_body,
            content_length=content_length,
            keep_alive=keep_alive,
        )
        events.append(request)
        exchange = _Exchange(
            method=method,
            keep_alive=keep_alive,
            switch=switch,
            expect_continue=f.expect == "100-continue" and version == "1.1",
            has_body=has_body,
            request=request,
            raw_head=head if target == raw_target else None,
        )
        self._shared.parsed(exchange)
        self.rejected = None
        if f.chunked:
            self.move(Input.HEAD_CHUNKED)
        elif content_length:
            self.move(Input.HEAD_LENGTH)
            self._remaining = content_length
        else:
            self.move(Input.HEAD_NO_BODY)
            self._end_message(events)
        return keep_alive and switch is None

    def _response_head(self, head: bytes, events: list[Http1Event]) -> bool:
        """Emit the response (framed by its request's method); returns whether llhttp may be reused."""
        lines, cached = self._head_lines(head)
        version, status, reason = _status_line(lines[0], self.direction)
        f = self._head_fields(head, lines, version, cached)
        exchange = self._shared.answering()
        if exchange is None:
            raise self._error(ProtocolViolation, "response with no request in flight")
        switch = exchange.switch
        if status == 101 and (switch is None or switch == "CONNECT"):
            raise self._error(ProtocolViolation, "101 Switching Protocols without an Upgrade request")
        if status == 101 or (switch == "CONNECT" and 200 <= status < 300) or status < 200:
            # A switch (101, or 2xx to CONNECT) or an interim 1xx: a head only, the final response or the tunnel follows.
            response = HttpResponse(status=status, reason=reason, headers=tuple(f.headers), http_version=version)
            self._raw_responses.append((response, head))
            events.append(response)
            if status >= 200 or status == 101:
                assert switch is not None
                self.move(Input.HEAD_SWITCH)
                self._shared.switched(events, switch if switch == "CONNECT" else f.upgrade or switch)
                return False
            self.move(Input.HEAD_INTERIM)
            return True
        return self._final_response(head, exchange, version, status, reason, f, events)

    def _final_response(
        self, head: bytes, exchange: _Exchange, version: str, status: int, reason: str, f: _Fields,
        events: list[Http1Event],
    ) -> bool:
        """Emit a final (non-1xx, non-switching) response and frame its body (RFC 9112 §6.3)."""
        headers = tuple(f.headers)
        raw_responses = self._raw_responses
        self._shared.answered(exchange)
        keep_alive = exchange.keep_alive and version == "1.1" and "close" not in f.connection
        no_body = exchange.method == "HEAD" or status in (204, 304)
        content_length = f.content_length
        if no_body:
            framing = Input.HEAD_NO_BODY
        elif f.chunked:
            framing = Input.HEAD_CHUNKED
        elif content_length is not None:
            framing = Input.HEAD_LENGTH if content_length else Input.HEAD_NO_BODY
        else:
            framing = Input.HEAD_UNTIL_CLOSE
            keep_alive = False
        response = HttpResponse(
            status=status,
            reason=reason,
            headers=headers,
            http_version=version,
            has_body=framing is not Input.HEAD_NO_BODY,
            content_length=None if no_body else content_length,
            keep_alive=keep_alive,
        )
        raw_responses.append((response, head))
        events.append(response)
        self._response_keep_alive = keep_alive
        self.move(framing)
        if framing is Input.HEAD_LENGTH:
            self._remaining = content_length or 0
        elif framing is Input.HEAD_NO_BODY:
            self._end_message(events)
        return keep_alive and not no_body

    # -- the rest of the contract ------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes this parser itself wants written to its peer: always b"" for HTTP/1.1 (see the class doc)."""
        return b""

    @property
    def upgraded(self) -> str | None:
        """The ConnectionUpgraded protocol once the connection switched, else None."""
        return self._shared.upgraded

    def rejected_request(self) -> tuple[str, str, str] | None:
        """(method, raw target, Host or "") of the request head the last client ParseError refused, when
        its request line could be split; None otherwise (the error was elsewhere, or the line unreadable)."""
        return self.rejected

    def proposes_switch(self) -> bool:
        """True when the oldest request not yet forwarded or refused asks to switch protocols (an
        Upgrade with `Connection: upgrade`, or CONNECT). Cheap: the head was read already."""
        undecided = self._shared.undecided
        return bool(undecided) and undecided[0].switch is not None

    # -- decisions and writing ---------------------------------------------------------------------

    def forward(self, event: Http1Event, *, headers: Headers | None = None) -> bytes:
        """Bytes to write to the other peer for `event` read by this parser (re-framed, see module doc).

        `headers` replaces the head's fields (header actions applied); the framing fields are always
        this parser's. For an HttpRequest this also records it as forwarded, so its response is framed
        by its method; call it in the order the requests were read.

        Raises:
            ValueError: `headers` holds a name that is not a token or a value with CR, LF or NUL; or the
                request was not read, or was already forwarded or refused.
        """
        if type(event) is Data:
            if self._out_chunked:
                return b"%x\r\n%b\r\n" % (len(event.data), event.data) if event.data else b""
            return event.data
        if type(event) is EndOfMessage:
            if self._out_chunked:
                self._out_chunked = False
                trailers = self._out_trailers
                self._out_trailers = ()
                return b"0\r\n" + _fields_bytes(trailers) + b"\r\n"
            return b""
        if type(event) is HttpRequest:
            return self._forward_request(event, headers)
        if type(event) is HttpResponse:
            return self._forward_response(event, headers)
        if type(event) is Trailers:
            self._out_trailers = event.headers
            return b""
        return b""  # ConnectionUpgraded: nothing on the wire

    def _forward_request(self, event: HttpRequest, headers: Headers | None) -> bytes:
        if not self._head_is_request:
            raise ValueError("forward() of a request on the SERVER_TO_CLIENT parser")
        raw = self._shared.forwarded(event)
        self._out_chunked = event.has_body and event.content_length is None
        if headers is None and raw is not None:
            return raw  # exactly what was validated and framed: no need to re-serialise
        return serialize_request_head(event, headers)

    def _forward_response(self, event: HttpResponse, headers: Headers | None) -> bytes:
        chunked = event.has_body and event.content_length is None and _is_chunked(event.headers)
        if event.status >= 200:
            self._out_chunked = chunked
        raw_responses = self._raw_responses
        while raw_responses:
            seen, raw = raw_responses.popleft()
            if seen is event:
                if headers is None:
                    return raw
                break
        return serialize_response_head(event, headers)

    def refusal(self, request: HttpRequest, reason: Reason, *, body: bytes | None = None) -> Refusal:
        """The proxy answers `request` (the oldest undecided one) itself instead of forwarding it.

        The status is `refusal_status(reason)` (403 for a policy denial, body `Access denied`). The
        connection stays open unless the request asked to close, is HTTP/1.0, expects 100-continue
        with its body not yet read (the client may never send it), or proposed a protocol switch
        whose bytes the proxy will not read as HTTP. A refused switch proposal resumes HTTP parsing
        of what the client sent after it (see `has_held_input`).

        Returns:
            The response bytes (no body for HEAD) and whether to close after writing them; write
            them after the responses of the requests forwarded before this one.
        Raises:
            ValueError: called on the SERVER_TO_CLIENT parser, no request is waiting for a decision,
                or `request` is not the oldest undecided one.
        """
        if not self._head_is_request:
            raise ValueError("refusal() on the SERVER_TO_CLIENT parser")
        method, close = self._shared.refused(request)
        data = error_response(refusal_status(reason), keep_alive=not close, body=body, head_request=method == "HEAD")
        return Refusal(data=data, close=close)


def _is_chunked(headers: Headers) -> bool:
    return any(name.lower() == "transfer-encoding" for name, _ in headers)


def _check_fields(headers: Headers) -> None:
    for name, value in headers:
        if not _TOKEN_STR.fullmatch(name) or not _FIELD_VALUE_STR.fullmatch(value):
            raise ValueError(f"header field {name[:32]!r} cannot be serialised safely")


def _fields_bytes(headers: Headers) -> bytes:
    return "".join([f"{name}: {value}\r\n" for name, value in headers]).encode("latin-1")


def _reframe(headers: Headers, content_length: int | None, chunked: bool) -> Headers:
    _check_fields(headers)
    kept = tuple((n, v) for n, v in headers if n.lower() not in _FRAMING_NAMES)
    if chunked:
        return (*kept, ("Transfer-Encoding", "chunked"))
    if content_length is not None:
        return (*kept, ("Content-Length", str(content_length)))
    return kept


def serialize_request_head(req: HttpRequest, headers: Headers | None = None) -> bytes:
    """The head to send upstream: `req.target` (already normalised) and `headers` (default: req.headers).

    Supplied `headers` are validated and their Content-Length / Transfer-Encoding replaced by the
    request's own framing, so header actions can never change where the body ends.

    Raises:
        ValueError: a supplied header name is not a token or a value holds CR, LF or NUL.
    """
    if headers is None:
        headers = req.headers
    else:
        headers = _reframe(headers, req.content_length, req.has_body and req.content_length is None)
    line = f"{req.method} {req.target} HTTP/{req.http_version}\r\n"
    return (line + "".join([f"{n}: {v}\r\n" for n, v in headers]) + "\r\n").encode("latin-1")


def serialize_response_head(resp: HttpResponse, headers: Headers | None = None) -> bytes:
    """The head to send to the client for `resp` (same status, reason and fields unless `headers` given).

    Raises:
        ValueError: a supplied header name is not a token or a value holds CR, LF or NUL.
    """
    if headers is None:
        headers = resp.headers
    else:
        chunked = resp.has_body and resp.content_length is None and _is_chunked(resp.headers)
        headers = _reframe(headers, resp.content_length, chunked)
    line = f"HTTP/{resp.http_version} {resp.status} {resp.reason}\r\n"
    return (line + "".join([f"{n}: {v}\r\n" for n, v in headers]) + "\r\n").encode("latin-1")


REASON_PHRASES: Final = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@functools.lru_cache(maxsize=256)
def error_response(status: int, *, keep_alive: bool, body: bytes | None = None, head_request: bool = False) -> bytes:
    """A complete response the proxy writes itself: the bytes of every refusal, and of the error answers
    that have no request to refuse (408 on a head timeout, 400/431 on an unreadable head, 502/503/504).

    The body defaults to `Access denied\\r\\n` for 403 (Cilium's text) and the reason phrase plus CRLF
    otherwise; Content-Length is always exact, `Connection: close` when `keep_alive` is False and
    `Connection: keep-alive` otherwise. `head_request` leaves the body out (RFC 9110 §9.3.2) but keeps
    its Content-Length. Cached: repeated refusals cost a dictionary lookup.

    Raises:
        ValueError: `status` is not one this module has a reason phrase for.
    """
    reason = REASON_PHRASES.get(status)
    if reason is None:
        raise ValueError(f"no refusal for status {status}")
    if body is None:
        body = ACCESS_DENIED if status == 403 else f"{reason}\r\n".encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    ).encode()
    return head if head_request else head + body


def refusal_status(reason: Reason, direction: Direction = Direction.CLIENT_TO_SERVER) -> int:
    """The status the proxy answers with for `reason` (HTTP/1.1 and HTTP/2); a broken response from
    upstream (`direction` SERVER_TO_CLIENT) is 502 whatever the reason.

    Returns:
        403 policy denial, 400 malformed request, 431 request over a limit, 503 upstream
        unreachable, 504 upstream timed out; 502 for MALFORMED/TOO_LARGE read from the server.
    """
    match reason:
        case Reason.POLICY_DENIED:
            return 403
        case Reason.MALFORMED:
            return 400 if direction is Direction.CLIENT_TO_SERVER else 502
        case Reason.TOO_LARGE:
            return 431 if direction is Direction.CLIENT_TO_SERVER else 502
        case Reason.UPSTREAM_FAILED:
            return 503
        case Reason.UPSTREAM_TIMEOUT:
            return 504
        case _:
            assert_never(reason)


if TYPE_CHECKING:  # mypy proves the parser contract (events.Parser) holds

    def _contract(parser: Http1Parser) -> Parser[Http1Event]:
        return parser
