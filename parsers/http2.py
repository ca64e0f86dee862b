"""HTTP/2 (h2c) for the proxy: a server side facing the client and a client side facing the upstream.

Owns per-stream request/response events, flow control and refusal bytes over an HTTP/2 connection
engine: the lean frame layer `parsers.http2_wire` (+ `parsers.hpack`, the default) or python-hyper `h2`,
the reference (`lean=False`, or `LEAN_BY_DEFAULT`); fuzz/http2_frames.py holds them to the same events.
Never does I/O or policy. Raises only `ParseError` subclasses: every engine exception (WireError, and
h2/hpack/hyperframe's) is translated in `_EngineErrors` (one `except`).

Theory of operation
-------------------
* The proxy bridges two connections stream by stream with the SAME stream id on both: the client's
  odd stream N downstream is stream N upstream (`Http2ClientSide.send_request` opens it). Denied
  streams are simply never opened upstream (skipped ids are legal, RFC 9113 §5.1.1). Upstream's
  MAX_CONCURRENT_STREAMS is honoured by queueing opens in id order.
* Flow control (RFC 9113 §5.2): received DATA is never acknowledged on arrival. Each `Data` event
  is "owed"; the proxy hands it to the other side with `send_data`, which frames it as the peer's
  windows allow and buffers the rest. Bytes that leave that buffer (framed, or dropped because the stream
  died) are reported by `pop_delivered()`; the proxy passes each `(stream_id, n)` to
  `acknowledge()` on the side the bytes came from, which only then opens the sender's windows.
  A slow reader therefore stalls its sender. Padding is acknowledged at once (never relayed).
* Per-stream lifecycle here (h2 keeps the RFC state machine, `H2Stream`): OPEN -> request/response
  ends (`remote_ended`/`local_ended`) or RESET (either side; `refusal()` counts as reset for inbound
  data). A refused or reset stream's unacknowledged bytes are released at once, later DATA on it is
  acknowledged and dropped, and `acknowledge()` for it is a no-op.
* Refusals: `Http2ServerSide.refusal()` answers on that stream only (403 + `Access denied\r\n`, or the
  gRPC trailers-only response); other streams go on. A request whose :path fails
  `normalize_target`, a gRPC call whose path is not /pkg.Service/Method, and CONNECT (a tunnel
  would escape L7 policy) are refused here and reported as `RequestRejected`. So is a gRPC request
  whose DATA breaks the message framing (flag byte not 0/1): that stream was already forwarded, so
  a `StreamReset` follows the `RequestRejected` and the proxy cuts its upstream half.
* Limits (constants below, each GOAWAY ENHANCE_YOUR_CALM + `LimitExceeded(limit=...)`): control
  frames, WINDOW_UPDATE, PRIORITY, empty frames, header block bytes across CONTINUATION, streams
  over SETTINGS_MAX_CONCURRENT_STREAMS, rapid reset. `header_block_pending` lets the proxy time an
  unfinished header block; the public counters (`control_frames`, `rst_stream_frames`,
  `premature_resets`, ...) let it aggregate across connections.
* h2c: prior knowledge on both sides; `Http2ServerSide.from_h2c_upgrade()` takes the HTTP/1.1
  `Upgrade: h2c` request as stream 1 (RFC 7540 §3.2) and emits the 101 itself.
* Rapid reset (CVE-2023-44487): after 500 streams, a client that reset at least half of them before
  their answer gets GOAWAY(ENHANCE_YOUR_CALM) and a ProtocolViolation (Envoy's rule).
* After a `ParseError` from `feed()`, h2 has queued a GOAWAY: send `data_to_send()`, then close.

The proxy loop (tests/parsers/test_http2.py `LoopbackBridge` runs exactly this against grpcio/httpx):
    down.feed(b): HttpRequest|GrpcCall -> judge -> up.send_request(e) | down.refusal(sid, reason);
                  Data -> up.send_data; Trailers -> up.send_trailers; EndOfMessage -> up.end_stream;
                  StreamReset -> up.reset_stream   (skip later events of refused streams)
    up.feed(b):   HttpResponse -> down.send_response; Data/Trailers/EndOfMessage likewise;
                  StreamReset -> down.refusal(sid, Reason.UPSTREAM_FAILED); GoAway -> stop new streams
    then: for sid, n in up.pop_delivered(): down.acknowledge(sid, n)  (and the mirror),
          write down.data_to_send() and up.data_to_send().
"""

from __future__ import annotations

import binascii
import enum
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack.exceptions
import hyperframe.exceptions
from membrane.parsers import grpc, http1, http2_wire
from membrane.parsers.errors import LimitExceeded, MalformedMessage, MessageTooLarge, ParseError, ProtocolViolation
from membrane.parsers.events import (
    Data,
    Direction,
    EndOfMessage,
    GrpcCall,
    Headers,
    HttpRequest,
    HttpResponse,
    Parser,
    Reason,
    StreamReset,
    Trailers,
)
from membrane.parsers.http2_wire import (
    ConnectionTerminated,
    DataReceived,
    FlowChanged,
    HeadersReceived,
    LeanConnection,
    PushedStreamReceived,
    StreamEnded,
    WireError,
    WireEvent,
)
from membrane.parsers.http_target import normalize_target, split_target

__all__ = [
    "DEFAULT_CONNECTION_WINDOW",
    "DEFAULT_INITIAL_WINDOW",
    "ErrorCode",
    "Event",
    "GoAway",
    "Http2ClientSide",
    "Http2ServerSide",
    "RequestRejected",
    "is_h2c_upgrade",
]

# 256 KiB per stream, 1 MiB per connection: large enough that loopback throughput is not window
# bound, small enough that a stalled reader pins at most 1 MiB of proxy memory per connection.
DEFAULT_INITIAL_WINDOW = 256 * 1024
DEFAULT_CONNECTION_WINDOW = 1024 * 1024
DEFAULT_MAX_CONCURRENT_STREAMS = 100  # h2's and nginx's default (RFC 9113 §6.5.2 recommends >= 100)
DEFAULT_MAX_HEADER_LIST_BYTES = 64 * 1024  # h2's default; a header block past it is ENHANCE_YOUR_CALM
DENIED_BODY = b"Access denied\r\n"  # Cilium's default text
_RAPID_RESET_MIN_STREAMS = 500  # Envoy's premature_reset_total_stream_count

# --- limits on what a peer may make this side do (issue 13 item 5); each crossing is GOAWAY
# ENHANCE_YOUR_CALM + LimitExceeded naming the limit, which the proxy counts, logs and closes on.
# Control frames (PING, SETTINGS, PRIORITY, RST_STREAM, unknown types, ACKs included) carry no request
# but each costs a parse and often an answer: one connection sending ~1 MB/s of PING saturated a worker.
# A token bucket: CONTROL_FRAME_BURST at once, refilled at CONTROL_FRAMES_PER_SECOND from the `now_s`
# the proxy passes to feed(), by CONTROL_FRAMES_PER_STREAM per stream the peer opens and by
# CONTROL_FRAMES_PER_DATA_FRAME_SENT per DATA frame this side sends. Keepalive
# (one PING per 10 s), gRPC's BDP pings (one per burst of data) and a reset per stream stay far below.
CONTROL_FRAME_BURST = 1000
CONTROL_FRAMES_PER_SECOND = 100
CONTROL_FRAMES_PER_STREAM = 10
# gRPC's BDP estimator (grpc-go, grpc-core) answers received DATA with a PING, so each DATA frame this
# side sends refills the budget too: a fast download is never mistaken for a flood.
CONTROL_FRAMES_PER_DATA_FRAME_SENT = 2
# WINDOW_UPDATE is owed per DATA frame received, so its allowance grows with the DATA frames this
# side sent: Envoy's max_inbound_window_update_frames_per_data_frame_sent (10), over a base of 1000.
WINDOW_UPDATE_BURST = 1000
WINDOW_UPDATES_PER_DATA_FRAME_SENT = 10
# DATA/HEADERS/CONTINUATION with an empty payload and no END_STREAM do nothing but cost a parse:
# Envoy's max_consecutive_inbound_frames_with_empty_payload (1), CVE-2019-9518.
MAX_CONSECUTIVE_EMPTY_FRAMES = 1
# PRIORITY is deprecated (RFC 9113 §5.3.2) yet legal on any stream: Envoy's
# max_inbound_priority_frames_per_stream (100) per stream opened, over one stream's worth.
PRIORITY_FRAMES_PER_STREAM = 100
# The HPACK dynamic tables: the decoder's is what we advertise in SETTINGS_HEADER_TABLE_SIZE (a
# larger size update from the peer is a COMPRESSION_ERROR); the encoder's is clamped to the same
# even when the peer allows more (RFC 7541 §4.2 lets an encoder use less), so no peer can make this
# side hold more than 4 KiB of header history per direction. 4096 is the RFC 7541 default.
MAX_HPACK_TABLE_BYTES = 4096

ErrorCode = h2.errors.ErrorCodes
# Which HTTP/2 engine the sides use unless told (`lean=`): the lean frame layer of parsers.http2_wire
# (HPACK and frames of our own, issue 11 item 4) or python-hyper h2, kept as the reference that the
# differential fuzz target and the parametrized tests check the lean layer against.
LEAN_BY_DEFAULT = True
_GRPC_ANY_MESSAGE_SIZE = 0xFFFFFFFF  # the 4-byte length's own maximum: size is the upstream's limit

# Frame types and flags (RFC 9113 §6), read from frame headers before h2 sees the frame.
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, \
    _CONTINUATION = range(10)
_END_STREAM = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY_FLAG = 0x20

# Connection-specific fields that must not cross into HTTP/2 (RFC 9113 §8.2.2), plus the upgrade's own.
_HOP_BY_HOP = frozenset(
    {"connection", "upgrade", "http2-settings", "keep-alive", "proxy-connection", "transfer-encoding", "host"}
)
_UPGRADE_RESPONSE = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRejected:
    """A request this module refused by itself (malformed :path, bad gRPC path, CONNECT).

    The refusal (400, or a gRPC status per `grpc.grpc_status`) is already queued on that stream;
    the proxy only records the flow. Nothing of that stream may go upstream.
    """

    stream_id: int
    reason: Reason
    detail: str
    grpc: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class GoAway:
    """The peer sent GOAWAY: streams above `last_stream_id` were not processed (each also gets a
    StreamReset with REFUSED_STREAM from the client side), and no new stream may be opened."""

    error_code: int
    last_stream_id: int
    additional_data: bytes = b""


Event = HttpRequest | GrpcCall | HttpResponse | Data | Trailers | EndOfMessage | StreamReset | RequestRejected | GoAway


def is_h2c_upgrade(request: HttpRequest) -> bool:
    """True when an HTTP/1.1 request asks for `Upgrade: h2c` with one HTTP2-Settings (RFC 7540 §3.2)."""
    upgrade = connection = ""
    settings = 0
    for name, value in request.headers:
        lname = name.lower()
        if lname == "upgrade":
            upgrade += "," + value
        elif lname == "connection":
            connection += "," + value
        elif lname == "http2-settings":
            settings += 1
    upgrades = {t.strip().lower() for t in upgrade.split(",")}
    options = {t.strip().lower() for t in connection.split(",")}
    return "h2c" in upgrades and "upgrade" in options and "http2-settings" in options and settings == 1


def _translate(exc: Exception, direction: Direction) -> ParseError:
    message = f"HTTP/2: {type(exc).__name__}: {exc}"
    if isinstance(exc, h2.exceptions.TooManyStreamsError):  # over our SETTINGS_MAX_CONCURRENT_STREAMS
        return LimitExceeded(message, direction=direction, limit="max_concurrent_streams")
    if isinstance(exc, h2.exceptions.FrameTooLargeError | h2.exceptions.DenialOfServiceError):
        return MessageTooLarge(message, direction=direction)
    if isinstance(exc, hpack.exceptions.HPACKError | hyperframe.exceptions.HyperframeError | binascii.Error):
        return MalformedMessage(message, direction=direction)
    return ProtocolViolation(message, direction=direction)


def _translate_wire(exc: WireError, direction: Direction) -> ParseError:
    message = f"HTTP/2: {exc}"
    if exc.kind == "streams":
        return LimitExceeded(message, direction=direction, limit="max_concurrent_streams")
    if exc.kind == "header_list":
        return MessageTooLarge(message, direction=direction)
    if exc.kind in ("compression", "frame_size"):
        return MalformedMessage(message, direction=direction)
    return ProtocolViolation(message, direction=direction)


_LIBRARY_ERRORS = (h2.exceptions.H2Error, hpack.exceptions.HPACKError, hyperframe.exceptions.HyperframeError,
                   binascii.Error)


class _EngineErrors:
    """The one place where engine exceptions become ParseError subclasses (STYLE.md §3.1).

    A plain context manager rather than @contextmanager: it wraps every send on the hot path, and a
    generator-based one costs several times more per use."""

    __slots__ = ("direction",)

    def __init__(self, direction: Direction) -> None:
        self.direction = direction

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None:
            return
        if isinstance(exc, WireError):
            raise _translate_wire(exc, self.direction) from exc
        if isinstance(exc, _LIBRARY_ERRORS):
            raise _translate(exc, self.direction) from exc


_H2_HEADER_KINDS: dict[type, int] = {
    h2.events.RequestReceived: http2_wire.REQUEST,
    h2.events.ResponseReceived: http2_wire.RESPONSE,
    h2.events.InformationalResponseReceived: http2_wire.INFORMATIONAL,
    h2.events.TrailersReceived: http2_wire.TRAILERS,
}


class _H2Connection:
    """python-hyper h2 behind LeanConnection's interface: the reference the lean layer is checked against."""

    def __init__(self, *, client_side: bool, max_concurrent_streams: int, max_header_list_size: int,
                 header_table_size: int, initial_window_size: int | None) -> None:
        config = h2.config.H2Configuration(
            client_side=client_side, header_encoding=None, validate_inbound_headers=True,
            normalize_inbound_headers=True, validate_outbound_headers=True, normalize_outbound_headers=True,
            split_outbound_cookies=False,
        )
        self.h2 = h2.connection.H2Connection(config)
        initial: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
            h2.settings.SettingCodes.HEADER_TABLE_SIZE: header_table_size,
        }
        if initial_window_size is not None:
            initial[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = initial_window_size
        if client_side:
            initial[h2.settings.SettingCodes.ENABLE_PUSH] = 0  # a proxy never relays server push
        self.h2.local_settings = h2.settings.Settings(client=client_side, initial_values=initial)
        self.h2.decoder.max_header_list_size = max_header_list_size
        self.encoder = self.h2.encoder
        self.client_side = client_side

    @property
    def max_inbound_frame_size(self) -> int:
        return self.h2.max_inbound_frame_size

    @property
    def max_outbound_frame_size(self) -> int:
        return self.h2.max_outbound_frame_size

    @property
    def highest_inbound_stream_id(self) -> int:
        return self.h2.highest_inbound_stream_id

    @property
    def open_outbound_streams(self) -> int:
        return self.h2.open_outbound_streams

    @property
    def remote_max_concurrent_streams(self) -> int:
        return self.h2.remote_settings.max_concurrent_streams

    def initiate_connection(self) -> None:
        self.h2.initiate_connection()

    def initiate_upgrade_connection(self, settings_header: bytes) -> None:
        self.h2.initiate_upgrade_connection(settings_header)

    def update_initial_window(self, size: int) -> None:
        self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: size})

    def increment_flow_control_window(self, increment: int) -> None:
        self.h2.increment_flow_control_window(increment)

    def receive_preface(self, data: bytes) -> None:
        self.h2.receive_data(data)

    def receive_frame(self, buf: bytes | bytearray, pos: int, length: int) -> list[WireEvent]:
        out: list[WireEvent] = []
        for event in self.h2.receive_data(bytes(buf[pos : pos + 9 + length])):
            kind = _H2_HEADER_KINDS.get(type(event))
            if kind == http2_wire.REQUEST and self.client_side:
                # h2 lets a server open an even stream with HEADERS; a server may only push (RFC 9113 §8.4),
                # so a client never receives a request: a connection error PROTOCOL_ERROR, as in nghttp2
                # ("request HEADERS: client received request") and the lean layer (fuzz/http2_frames:
                # corpus diff_request_headers_to_client.bin).
                self.h2.close_connection(ErrorCode.PROTOCOL_ERROR)
                raise h2.exceptions.ProtocolError("HEADERS opening a stream the peer may not open")
            if kind is not None:
                assert isinstance(event, h2.events.RequestReceived | h2.events.ResponseReceived
                                  | h2.events.InformationalResponseReceived | h2.events.TrailersReceived)
                ended = kind != http2_wire.INFORMATIONAL and event.stream_ended is not None  # type: ignore[union-attr]
                out.append(HeadersReceived(kind, event.stream_id or 0, list(event.headers or []), ended))
            elif isinstance(event, h2.events.DataReceived):
                out.append(DataReceived(event.stream_id or 0, bytes(event.data or b""),
                                        event.flow_controlled_length or 0, event.stream_ended is not None))
            elif isinstance(event, h2.events.StreamEnded):
                out.append(StreamEnded(event.stream_id or 0))
            elif isinstance(event, h2.events.StreamReset):
                out.append(http2_wire.StreamReset(event.stream_id or 0, int(event.error_code or 0)))
            elif isinstance(event, h2.events.ConnectionTerminated):
                # hyperframe keeps GOAWAY's reserved bit in last_stream_id; RFC 9113 §6.8 says to ignore it
                # (fuzz/http2_frames: corpus diff_goaway_reserved_bit.bin)
                out.append(ConnectionTerminated(int(event.error_code or 0), int(event.last_stream_id or 0) & 0x7FFFFFFF,
                                                bytes(event.additional_data or b"")))
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                out.append(FlowChanged())
            elif isinstance(event, h2.events.PushedStreamReceived):
                out.append(PushedStreamReceived(event.pushed_stream_id or 0))
        return out

    def data_to_send(self) -> bytes:
        return self.h2.data_to_send()

    def is_stream_open(self, stream_id: int) -> bool:
        stream = self.h2.streams.get(stream_id)
        return stream is not None and not stream.closed

    def knows_stream(self, stream_id: int) -> bool:
        return stream_id in self.h2.streams

    def local_flow_control_window(self, stream_id: int) -> int:
        return self.h2.local_flow_control_window(stream_id)

    def acknowledge_received_data(self, n: int, stream_id: int) -> None:
        self.h2.acknowledge_received_data(n, stream_id)

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False) -> None:
        self.h2.send_headers(stream_id, headers, end_stream=end_stream)

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        self.h2.send_data(stream_id, data, end_stream=end_stream)

    def end_stream(self, stream_id: int) -> None:
        self.h2.end_stream(stream_id)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        self.h2.reset_stream(stream_id, error_code)

    def close_connection(self, error_code: int = 0) -> None:
        self.h2.close_connection(error_code)


# Header names and short values as text, by their bytes: they repeat on every request and response (HPACK
# hands back its table's own bytes objects, hashes cached), so a lookup replaces a decode. At most 4096
# entries of at most 128 bytes; cleared when full.
_TEXTS: dict[bytes, str] = {}
_TEXTS_MAX = 4096
_TEXT_LONGEST = 128


def _remember_text(raw: bytes) -> str:
    text = bytes(raw).decode("latin-1")
    if len(raw) <= _TEXT_LONGEST:
        if len(_TEXTS) >= _TEXTS_MAX:
            _TEXTS.clear()
        _TEXTS[bytes(raw)] = text
    return text


def _text(headers: list[tuple[bytes, bytes]]) -> tuple[dict[str, str], Headers]:
    """Split an h2 header list into (pseudo-headers, regular headers) as latin-1 text (lossless)."""
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    texts = _TEXTS
    for raw_name, raw_value in headers:
        name = texts.get(raw_name) if type(raw_name) is bytes else None  # (h2 may hand back bytearray)
        if name is None:
            name = _remember_text(raw_name)
        value = texts.get(raw_value) if type(raw_value) is bytes else None
        if value is None:
            value = _remember_text(raw_value)
        if name.startswith(":"):
            pseudo[name] = value
        else:
            regular.append((name, value))
    return pseudo, tuple(regular)


def _wire(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]


def _header(headers: Headers, name: str) -> str | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def _content_length(headers: Headers) -> int | None:
    value = _header(headers, "content-length")
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


class _Kind(enum.Enum):
    HTTP = "http"
    GRPC = "grpc"


class _Stream:
    # A plain class, not a dataclass: mypyc compiles its __init__ (a dataclass's generated __init__ stays
    # interpreted Python, ~4% of the HTTP/2 session's CPU with two of these per proxied stream).
    __slots__ = ("end_after", "grpc_framing", "headers_sent", "kind", "local_ended", "out", "pending_headers",
                 "refused", "remote_ended", "reset", "trailers_after", "trailers_sent", "unacked")

    def __init__(self, kind: _Kind = _Kind.HTTP) -> None:
        self.kind = kind
        self.unacked = 0  # DATA bytes emitted as events and not yet acknowledged
        self.remote_ended = False
        self.local_ended = False
        self.reset = False  # reset by either side: nothing more is sent or relayed
        self.refused = False  # answered by refuse(): inbound DATA is acknowledged and dropped
        self.headers_sent = False  # a final response (server) / the request (client) went out
        self.trailers_sent = False
        self.out: deque[tuple[memoryview, bool]] = deque()  # (bytes, counted as delivered)
        self.end_after = False  # END_STREAM once `out` drains
        self.trailers_after: Headers | None = None  # trailers to send once `out` drains
        self.pending_headers: list[tuple[bytes, bytes]] | None = None  # client side: not opened yet
        self.grpc_framing: grpc.GrpcParser | None = None  # server side, gRPC streams: the request's message framing

    @property
    def is_finished(self) -> bool:
        done = self.reset or (self.local_ended and (self.remote_ended or self.refused))
        return done and self.unacked == 0 and not self.out

    @property
    def is_relaying(self) -> bool:
        """Inbound frames of this stream still become events."""
        return not (self.reset or self.refused)


class _Http2Side:
    """What both sides share: feeding, flow-controlled sending, acknowledgements, GOAWAY."""

    _CLIENT_SIDE = False

    def __init__(
        self,
        *,
        initial_window_size: int = DEFAULT_INITIAL_WINDOW,
        connection_window_size: int = DEFAULT_CONNECTION_WINDOW,
        max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        max_header_list_bytes: int = DEFAULT_MAX_HEADER_LIST_BYTES,
        lean: bool | None = None,
    ) -> None:
        client = self._CLIENT_SIDE
        self._inbound = Direction.SERVER_TO_CLIENT if client else Direction.CLIENT_TO_SERVER
        self._outbound = Direction.CLIENT_TO_SERVER if client else Direction.SERVER_TO_CLIENT
        # A window above the default may apply at once (the peer just sends less than we allow); a
        # smaller one only once the peer acknowledged our SETTINGS (RFC 9113 §6.9.2), so it is sent
        # as a settings update after the preface.
        self._window_update: int | None = None
        if initial_window_size < 65_535:
            self._window_update = initial_window_size
        self.is_lean = LEAN_BY_DEFAULT if lean is None else lean
        self._conn: LeanConnection | _H2Connection
        if self.is_lean:
            self._conn = LeanConnection(
                client_side=client, max_concurrent_streams=max_concurrent_streams,
                max_header_list_size=max_header_list_bytes, header_table_size=MAX_HPACK_TABLE_BYTES,
                initial_window_size=None if self._window_update is not None else initial_window_size)
        else:
            self._conn = _H2Connection(
                client_side=client, max_concurrent_streams=max_concurrent_streams,
                max_header_list_size=max_header_list_bytes, header_table_size=MAX_HPACK_TABLE_BYTES,
                initial_window_size=None if self._window_update is not None else initial_window_size)
        self._connection_window_increment = max(0, connection_window_size - 65_535)
        self._streams: dict[int, _Stream] = {}
        self._delivered: dict[int, int] = {}
        self._prefix = b""
        self._inbuf = bytearray()
        self._preface_left = 0 if client else 24  # the client magic (RFC 9113 §3.4), checked by h2
        self._failed = False
        self._goaway_received = False
        self._max_header_block_bytes = max_header_list_bytes
        # Limit state (see the constants above); the counters are public so the proxy can sum them
        # across connections (rapid reset spread over many connections is only visible that way).
        self._control_tokens = float(CONTROL_FRAME_BURST)
        self._control_refilled_s: float | None = None
        self._empty_frames_in_a_row = 0
        self._header_block_bytes: int | None = None  # compressed bytes of a header block awaiting END_HEADERS
        self.control_frames = 0  # PING, SETTINGS, PRIORITY, RST_STREAM, unknown frames received
        self.rst_stream_frames = 0  # RST_STREAM received, on any stream
        self.window_update_frames = 0
        self.priority_frames = 0
        self.peer_streams_opened = 0  # HEADERS that opened a stream, as counted from frames
        self.data_frames_sent = 0
        self._raw_fields: list[tuple[bytes, bytes]] | None = None  # the last header list made text, and its text
        self._text_fields: tuple[dict[str, str], Headers] = ({}, ())

    def _start(self, upgrade_settings: bytes | None = None) -> None:
        with _EngineErrors(self._inbound if upgrade_settings else self._outbound):
            if upgrade_settings is None:
                self._conn.initiate_connection()
            else:
                self._conn.initiate_upgrade_connection(upgrade_settings)
            if self._window_update is not None:
                self._conn.update_initial_window(self._window_update)
            if self._connection_window_increment:
                self._conn.increment_flow_control_window(self._connection_window_increment)

    # --- input ------------------------------------------------------------------------------------

    def feed(self, data: bytes, *, now_s: float | None = None) -> list[Event]:
        """Consume bytes from the peer; returns the events they complete ([] = need more data).

        `now_s` (a monotonic clock in seconds) refills the control-frame budget; without it only
        streams opened refill it.

        Raises:
            ParseError: the peer broke HTTP/2 (MessageTooLarge for frame/header-list limits,
                LimitExceeded for a flood or a limit crossed (`limit` names it; the GOAWAY says
                ENHANCE_YOUR_CALM), MalformedMessage for undecodable frames/HPACK, ProtocolViolation
                otherwise). A GOAWAY is queued: send data_to_send(), then close the connection.
                Later calls raise again.
        """
        if self._failed:
            raise ProtocolViolation("HTTP/2 connection already failed", direction=self._inbound)
        if now_s is not None:
            if self._control_refilled_s is not None and now_s > self._control_refilled_s:
                self._control_tokens = min(float(CONTROL_FRAME_BURST), self._control_tokens
                                           + (now_s - self._control_refilled_s) * CONTROL_FRAMES_PER_SECOND)
            self._control_refilled_s = now_s
        out: list[Event] = []
        reflow = False
        try:
            with _EngineErrors(self._inbound):
                conn = self._conn
                buf = self._inbuf
                for pos, length in self._units(data):
                    if length < 0:
                        conn.receive_preface(bytes(buf[pos : pos - length]))
                        continue
                    for event in conn.receive_frame(buf, pos, length):
                        if type(event) is FlowChanged:
                            reflow = True
                        else:
                            self._handle(event, out)
                if self._conn.encoder.header_table_size > MAX_HPACK_TABLE_BYTES:  # see MAX_HPACK_TABLE_BYTES
                    self._conn.encoder.header_table_size = MAX_HPACK_TABLE_BYTES
                if reflow:
                    for stream_id in list(self._streams):
                        self._flush(stream_id)
                self._after_feed()
        except ParseError:
            self._failed = True
            raise
        return out

    def _units(self, data: bytes) -> Iterator[tuple[int, int]]:
        """Cut the input at frame boundaries and yield (offset in self._inbuf, payload length) per whole
        frame, or (offset, -n) for n bytes of the client preface.

        h2 acts on every complete frame it holds before returning its events, so a stream this module
        resets or refuses on frame N would still see frames N+1.. of the same read processed as if it
        were open. One frame per receive_data() call makes every decision take effect at once, and
        the outcome independent of how the bytes were split. Holds at most one frame: a length over
        SETTINGS_MAX_FRAME_SIZE is refused from the 9-byte header, before its payload is awaited.
        """
        buf = self._inbuf
        buf += data
        pos = 0
        while True:
            if self._preface_left:
                unit = self._preface_left
            elif len(buf) - pos < 9:
                break
            else:
                length = int.from_bytes(buf[pos : pos + 3], "big")
                if length > self._conn.max_inbound_frame_size:  # RFC 9113 §4.2: FRAME_SIZE_ERROR
                    self._conn.close_connection(ErrorCode.FRAME_SIZE_ERROR)
                    raise MessageTooLarge(f"HTTP/2 frame of {length} bytes exceeds SETTINGS_MAX_FRAME_SIZE "
                                          f"{self._conn.max_inbound_frame_size}", direction=self._inbound)
                unit = 9 + length
            if len(buf) - pos < unit and not self._preface_left:
                if not self._preface_left and self._header_block_bytes is not None \
                        and buf[pos + 3] == _CONTINUATION:  # bound the block before its bytes are awaited
                    self._count_header_block(length)
                break
            if not self._preface_left:
                self._account(buf[pos + 3], buf[pos + 4], length, buf, pos)
            take = min(unit, len(buf) - pos)
            if take == 0:
                break
            start = pos
            pos += take
            if self._preface_left:
                self._preface_left -= take
                yield start, -take
            else:
                yield start, length
        del buf[:pos]

    # --- limits -----------------------------------------------------------------------------------

    @property
    def header_block_pending(self) -> bool:
        """A HEADERS (or PUSH_PROMISE) without END_HEADERS was received and its CONTINUATION frames have
        not ended it yet. The proxy times this state (a block left pending is a slowloris: nothing
        else may be sent on the connection meanwhile, RFC 9113 §6.10)."""
        return self._header_block_bytes is not None

    def _flood(self, limit: str, message: str) -> None:
        self._conn.close_connection(ErrorCode.ENHANCE_YOUR_CALM)
        raise LimitExceeded(f"HTTP/2 {message}", direction=self._inbound, limit=limit)

    def _count_header_block(self, length: int) -> None:
        assert self._header_block_bytes is not None
        if self._header_block_bytes + length > self._max_header_block_bytes:
            self._flood("header_block_bytes", f"header block of over {self._max_header_block_bytes} bytes "
                        "across CONTINUATION frames")

    def _account(self, ftype: int, flags: int, length: int, buf: bytearray, pos: int) -> None:
        """Charge one whole inbound frame (header at buf[pos:pos+9]) against the limits, before h2 sees it."""
        if ftype in (_DATA, _HEADERS, _CONTINUATION):
            payload = length
            if ftype != _CONTINUATION and flags & _PADDED and length:
                payload = length - 1 - buf[pos + 9]
            if ftype == _HEADERS and flags & _PRIORITY_FLAG:
                payload -= 5
            if (payload <= 0 and not flags & _END_STREAM and ftype != _CONTINUATION) or \
                    (ftype == _CONTINUATION and length == 0 and not flags & _END_HEADERS):
                self._empty_frames_in_a_row += 1
                if self._empty_frames_in_a_row > MAX_CONSECUTIVE_EMPTY_FRAMES:
                    self._flood("empty_frames", f"{self._empty_frames_in_a_row} frames in a row with an empty "
                                "payload and no END_STREAM")
            else:
                self._empty_frames_in_a_row = 0
            if ftype == _HEADERS:
                stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                if not self._conn.knows_stream(stream_id) and stream_id > self._conn.highest_inbound_stream_id:
                    self.peer_streams_opened += 1
                    self._control_tokens = min(float(CONTROL_FRAME_BURST),
                                               self._control_tokens + CONTROL_FRAMES_PER_STREAM)
            if ftype == _CONTINUATION:
                if self._header_block_bytes is not None:
                    self._count_header_block(length)
                    self._header_block_bytes += length
                    if flags & _END_HEADERS:
                        self._header_block_bytes = None
            elif ftype == _HEADERS and not flags & _END_HEADERS:
                self._header_block_bytes = 0
                self._count_header_block(length)
                self._header_block_bytes = length
            return
        if ftype == _PUSH_PROMISE:
            if not flags & _END_HEADERS:
                self._header_block_bytes = 0
                self._count_header_block(length)
                self._header_block_bytes = length
            return
        if ftype == _GOAWAY:
            return
        if ftype == _WINDOW_UPDATE:
            self.window_update_frames += 1
            allowed = WINDOW_UPDATE_BURST + WINDOW_UPDATES_PER_DATA_FRAME_SENT * self.data_frames_sent
            if self.window_update_frames > allowed:
                self._flood("window_update_frames", f"{self.window_update_frames} WINDOW_UPDATE frames for "
                            f"{self.data_frames_sent} DATA frames sent")
            return
        self.control_frames += 1
        if ftype == _RST_STREAM:
            self.rst_stream_frames += 1
        elif ftype == _PRIORITY:
            self.priority_frames += 1
            if self.priority_frames > PRIORITY_FRAMES_PER_STREAM * (self.peer_streams_opened + 1):
                self._flood("priority_frames", f"{self.priority_frames} PRIORITY frames for "
                            f"{self.peer_streams_opened} streams")
        self._control_tokens -= 1
        if self._control_tokens < 0:
            self._flood("control_frames", f"control frames over budget ({self.control_frames} received: "
                        f"{CONTROL_FRAME_BURST} at once, {CONTROL_FRAMES_PER_SECOND}/s)")

    def _handle(self, event: WireEvent, out: list[Event]) -> None:
        kind = type(event)
        if kind is DataReceived:
            assert isinstance(event, DataReceived)
            self._on_data(event, out)
        elif kind is HeadersReceived and event.kind == http2_wire.TRAILERS:  # type: ignore[union-attr]
            assert isinstance(event, HeadersReceived)
            stream = self._streams.get(event.stream_id)
            if stream is not None and stream.is_relaying:
                _, regular = self._fields(event.headers)
                out.append(Trailers(headers=regular, stream_id=event.stream_id))
        elif kind is StreamEnded:
            assert isinstance(event, StreamEnded)
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                stream.remote_ended = True
                if stream.is_relaying:
                    out.append(EndOfMessage(stream_id=event.stream_id))
                self._forget_if_finished(event.stream_id or 0)
        elif kind is http2_wire.StreamReset:
            assert isinstance(event, http2_wire.StreamReset)
            stream_id = event.stream_id
            stream = self._streams.get(stream_id)
            if stream is not None and not stream.reset:
                relaying = stream.is_relaying
                if not stream.local_ended:
                    self._on_premature_reset()
                self._drop(stream_id, stream)
                if relaying:
                        out.append(StreamReset(stream_id=stream_id, error_code=int(event.error_code or 0)))
                self._forget_if_finished(stream_id)
        elif kind is ConnectionTerminated:
            assert isinstance(event, ConnectionTerminated)
            self._on_goaway(event, out)
        else:
            self._handle_side(event, out)

    def _fields(self, headers: list[tuple[bytes, bytes]]) -> tuple[dict[str, str], Headers]:
        """_text(headers), once per list: the lean layer's decoder hands back the same list for a repeated head."""
        if headers is not self._raw_fields:
            self._text_fields = _text(headers)
            self._raw_fields = headers
        return self._text_fields

    def _on_premature_reset(self) -> None:
        """The peer reset a stream before its answer completed (a hook for the server side's limit)."""

    def _handle_side(self, event: WireEvent, out: list[Event]) -> None:
        """Side-specific events (requests / responses); everything else (PING, SETTINGS ack,
        PRIORITY, unknown frames) is answered by h2 or has no meaning across the proxy."""

    def _after_feed(self) -> None:
        pass

    def _on_data(self, event: DataReceived, out: list[Event]) -> None:
        stream_id = event.stream_id
        data = event.data
        padding = event.flow_controlled_length - len(data)
        if padding > 0:  # padding is never relayed, so it is consumed right here
            self._conn.acknowledge_received_data(padding, stream_id)
        stream = self._streams.get(stream_id)
        if stream is None or not stream.is_relaying:
            if data:
                self._conn.acknowledge_received_data(len(data), stream_id)
            return
        if data and not self._accepts_data(stream_id, stream, data, out):
            self._conn.acknowledge_received_data(len(data), stream_id)
            return
        if data:
            stream.unacked += len(data)
            out.append(Data(data=data, stream_id=stream_id))

    def _accepts_data(self, stream_id: int, stream: _Stream, data: bytes, out: list[Event]) -> bool:
        """Whether a relayed stream's DATA may go on (the server side checks gRPC framing here)."""
        return True

    def _on_goaway(self, event: ConnectionTerminated, out: list[Event]) -> None:
        self._goaway_received = True
        out.append(GoAway(error_code=event.error_code, last_stream_id=event.last_stream_id,
                          additional_data=event.additional_data))

    # --- output -----------------------------------------------------------------------------------

    @property
    def direction(self) -> Direction:
        """The direction this side reads: CLIENT_TO_SERVER for the server side, the other for the client side."""
        return self._inbound

    def data_to_send(self) -> bytes:
        """The bytes to write to this side's socket now (may be b"")."""
        prefix, self._prefix = self._prefix, b""
        return prefix + self._conn.data_to_send()

    def pop_delivered(self) -> list[tuple[int, int]]:
        """(stream_id, n) for bytes given to send_data() that left this side's buffer since the last call.

        They were framed into data_to_send(), or dropped because the stream was reset. Pass each to
        `acknowledge(stream_id, n)` on the OTHER side (the one whose Data events carried them).
        """
        delivered = list(self._delivered.items())
        self._delivered.clear()
        return delivered

    def acknowledge(self, stream_id: int, nbytes: int) -> None:
        """`nbytes` of this side's Data on `stream_id` were delivered; reopen the peer's windows.

        Extra bytes beyond what is owed, and unknown, refused or reset streams, are ignored.
        """
        stream = self._streams.get(stream_id)
        if stream is None or nbytes <= 0:
            return
        nbytes = min(nbytes, stream.unacked)
        if nbytes:
            stream.unacked -= nbytes
            with _EngineErrors(self._outbound):
                self._conn.acknowledge_received_data(nbytes, stream_id)
        self._forget_if_finished(stream_id)

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue body bytes on a stream; they are framed as the peer's flow-control windows allow.

        Data for a stream that is closed, reset or refused is dropped (and reported delivered).
        """
        stream = self._streams.get(stream_id)
        if stream is None or not stream.is_relaying or stream.local_ended or stream.end_after:
            if data:
                self._note_delivered(stream_id, len(data))
            return
        if data:
            stream.out.append((memoryview(data), True))
        if end_stream:
            stream.end_after = True
        self._flush(stream_id)

    def send_trailers(self, stream_id: int, headers: Headers) -> None:
        """Queue trailers (regular fields only) after the stream's buffered data; they end the stream."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.is_relaying or stream.local_ended or stream.end_after:
            return
        stream.trailers_after = headers
        stream.end_after = True
        self._flush(stream_id)

    def end_stream(self, stream_id: int) -> None:
        """END_STREAM after the stream's buffered data (an empty DATA frame if nothing is buffered)."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """RST_STREAM now; buffered outbound data is dropped (reported delivered) and owed bytes released."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.reset:
            return
        self._drop(stream_id, stream)
        self._reset_h2(stream_id, error_code)
        self._forget_if_finished(stream_id)

    def _reset_h2(self, stream_id: int, error_code: int) -> None:
        """RST_STREAM if h2 still has the stream open (never for one never opened or already closed)."""
        if self._conn.is_stream_open(stream_id):
            with _EngineErrors(self._outbound):
                self._conn.reset_stream(stream_id, error_code)

    def close(self, error_code: int = ErrorCode.NO_ERROR) -> None:
        """Queue GOAWAY (graceful when NO_ERROR: streams already open may finish)."""
        with _EngineErrors(self._outbound):
            self._conn.close_connection(error_code)

    @property
    def open_stream_ids(self) -> tuple[int, ...]:
        """Streams this side still tracks (open, or owing acknowledgements/buffered data)."""
        return tuple(self._streams)

    def buffered_bytes(self, stream_id: int | None = None) -> int:
        """Outbound bytes waiting for flow-control window (one stream, or all)."""
        streams = self._streams.values() if stream_id is None else [self._streams.get(stream_id) or _Stream()]
        return sum(len(chunk) for s in streams for chunk, _ in s.out)

    # --- internals --------------------------------------------------------------------------------

    def _note_delivered(self, stream_id: int, nbytes: int) -> None:
        self._delivered[stream_id] = self._delivered.get(stream_id, 0) + nbytes

    def _drop(self, stream_id: int, stream: _Stream) -> None:
        """The stream is dead here: release owed bytes, drop (and report) buffered output."""
        stream.reset = True
        self._release(stream_id, stream)

    def _release(self, stream_id: int, stream: _Stream) -> None:
        """Acknowledge every owed byte of the stream and drop (and report) its buffered output."""
        for chunk, counted in stream.out:
            if counted:
                self._note_delivered(stream_id, len(chunk))
        stream.out.clear()
        stream.end_after = False
        stream.trailers_after = None
        if stream.unacked:
            owed, stream.unacked = stream.unacked, 0
            with _EngineErrors(self._outbound):
                self._conn.acknowledge_received_data(owed, stream_id)

    def _forget_if_finished(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and stream.is_finished and stream.pending_headers is None:
            del self._streams[stream_id]

    def _flush(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.reset or stream.pending_headers is not None:
            return
        with _EngineErrors(self._outbound):
            while stream.out:
                window = self._conn.local_flow_control_window(stream_id)
                if window <= 0:
                    return
                chunk, counted = stream.out[0]
                n = min(window, self._conn.max_outbound_frame_size, len(chunk))
                last = (n == len(chunk) and len(stream.out) == 1 and stream.end_after
                        and stream.trailers_after is None)
                self._conn.send_data(stream_id, bytes(chunk[:n]), end_stream=last)
                self.data_frames_sent += 1
                self._control_tokens = min(float(CONTROL_FRAME_BURST),
                                           self._control_tokens + CONTROL_FRAMES_PER_DATA_FRAME_SENT)
                if n == len(chunk):
                    stream.out.popleft()
                else:
                    stream.out[0] = (chunk[n:], counted)
                if counted:
                    self._note_delivered(stream_id, n)
                if last:
                    stream.end_after = False
                    stream.local_ended = True
            if stream.trailers_after is not None:
                self._conn.send_headers(stream_id, _wire(stream.trailers_after), end_stream=True)
                stream.trailers_after = None
                stream.trailers_sent = True
                stream.end_after = False
                stream.local_ended = True
            elif stream.end_after:
                self._conn.end_stream(stream_id)
                stream.end_after = False
                stream.local_ended = True
        self._forget_if_finished(stream_id)


class Http2ServerSide(_Http2Side):
    """The connection facing the client: requests in, responses and refusals out.

    Construct with prior knowledge (`Http2ServerSide()`, then feed the client's preface), or from an
    HTTP/1.1 upgrade with `from_h2c_upgrade()`. The server preface is queued at once.
    """

    _CLIENT_SIDE = False

    def __init__(
        self,
        *,
        initial_window_size: int = DEFAULT_INITIAL_WINDOW,
        connection_window_size: int = DEFAULT_CONNECTION_WINDOW,
        max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        max_header_list_bytes: int = DEFAULT_MAX_HEADER_LIST_BYTES,
        denied_body: bytes = DENIED_BODY,
        lean: bool | None = None,
        _upgrade_settings: str | None = None,
    ) -> None:
        super().__init__(initial_window_size=initial_window_size, connection_window_size=connection_window_size,
                         max_concurrent_streams=max_concurrent_streams, max_header_list_bytes=max_header_list_bytes,
                         lean=lean)
        self.denied_body = denied_body
        # The last response headers put on the wire (by identity) and their wire form (see _fields).
        self._last_response_headers: Headers | None = None
        self._last_response_wire: list[tuple[bytes, bytes]] = []
        self.streams_opened = 0
        self.premature_resets = 0
        if _upgrade_settings is None:
            self._start()
            return
        self._prefix = _UPGRADE_RESPONSE
        padded = _upgrade_settings.strip() + "=" * (-len(_upgrade_settings.strip()) % 4)
        try:
            settings = padded.encode("ascii", "strict")
        except UnicodeEncodeError as e:
            raise MalformedMessage("HTTP2-Settings is not base64url", direction=self._inbound) from e
        self._start(settings)

    @classmethod
    def from_h2c_upgrade(
        cls,
        request: HttpRequest,
        *,
        initial_window_size: int = DEFAULT_INITIAL_WINDOW,
        connection_window_size: int = DEFAULT_CONNECTION_WINDOW,
        max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
        max_header_list_bytes: int = DEFAULT_MAX_HEADER_LIST_BYTES,
        denied_body: bytes = DENIED_BODY,
        lean: bool | None = None,
    ) -> tuple[Http2ServerSide, list[Event]]:
        """Switch an HTTP/1.1 `Upgrade: h2c` request (RFC 7540 §3.2) to HTTP/2; it becomes stream 1.

        Returns the server side (its data_to_send() starts with the `101 Switching Protocols`, then
        the server preface) and stream 1's events: the request (or RequestRejected), EndOfMessage.
        Judge and forward stream 1 like any other stream.

        Raises:
            MalformedMessage: not exactly one HTTP2-Settings, or it does not decode; answer 400 on HTTP/1.1.
            ProtocolViolation: the request has a body. Do not upgrade: strip the h2c upgrade headers
                and go on in HTTP/1.1, as Envoy does.
        """
        direction = Direction.CLIENT_TO_SERVER
        if not is_h2c_upgrade(request):
            raise MalformedMessage("not an h2c upgrade request (Upgrade, Connection, HTTP2-Settings)",
                                   direction=direction)
        if request.has_body:
            raise ProtocolViolation("h2c upgrade of a request with a body is not supported", direction=direction)
        value = next(v for n, v in request.headers if n.lower() == "http2-settings")
        side = cls(initial_window_size=initial_window_size, connection_window_size=connection_window_size,
                   max_concurrent_streams=max_concurrent_streams, max_header_list_bytes=max_header_list_bytes,
                   denied_body=denied_body, lean=lean, _upgrade_settings=value)
        pseudo = {":method": request.method, ":path": request.target, ":scheme": request.scheme or "http"}
        if request.host is not None:
            pseudo[":authority"] = request.host
        regular = tuple((n.lower(), v) for n, v in request.headers
                        if n.lower() not in _HOP_BY_HOP and not (n.lower() == "te" and v.lower() != "trailers"))
        events: list[Event] = []
        side._on_request_fields(1, pseudo, regular, ended=True, out=events)
        stream = side._streams.get(1)
        if stream is not None:
            stream.remote_ended = True
            if stream.is_relaying:
                events.append(EndOfMessage(stream_id=1))
            side._forget_if_finished(1)
        return side, events

    # --- requests ---------------------------------------------------------------------------------

    def _handle_side(self, event: WireEvent, out: list[Event]) -> None:
        if type(event) is HeadersReceived and event.kind == http2_wire.REQUEST:  # type: ignore[union-attr]
            assert isinstance(event, HeadersReceived)
            pseudo, regular = self._fields(event.headers)
            self._on_request_fields(event.stream_id, pseudo, regular, ended=event.stream_ended, out=out)

    def _on_request_fields(self, stream_id: int, pseudo: dict[str, str], regular: Headers, *, ended: bool,
                           out: list[Event]) -> None:
        method = pseudo.get(":method", "")
        host = pseudo.get(":authority") or _header(regular, "host")
        is_grpc = method == "POST" and grpc.is_grpc_content_type(_header(regular, "content-type"))
        stream = _Stream(kind=_Kind.GRPC if is_grpc else _Kind.HTTP)
        self._streams[stream_id] = stream
        self.streams_opened += 1
        try:
            if method == "CONNECT":
                raise MalformedMessage("CONNECT tunnels are not relayed (they would escape L7 policy)",
                                       direction=self._inbound)
            target = normalize_target(pseudo.get(":path", ""), direction=self._inbound)
            if is_grpc:
                service, rpc = grpc.split_path(target, direction=self._inbound)
        except MalformedMessage as e:
            out.append(RequestRejected(stream_id=stream_id, reason=e.reason, detail=str(e), grpc=is_grpc))
            self.refusal(stream_id, e.reason)
            return
        if is_grpc:
            out.append(GrpcCall(service=service, method=rpc, path=target, authority=host, headers=regular,
                                stream_id=stream_id, has_body=not ended, scheme=pseudo.get(":scheme")))
            return
        path, query = split_target(target)
        out.append(HttpRequest(
            method=method, target=target, path=path, query=query, host=host, headers=regular,
            scheme=pseudo.get(":scheme"), http_version="2", stream_id=stream_id, has_body=not ended,
            content_length=_content_length(regular),
        ))

    def _accepts_data(self, stream_id: int, stream: _Stream, data: bytes, out: list[Event]) -> bool:
        # gRPC requests must be Length-Prefixed-Messages with a flag byte of 0 or 1 (PROTOCOL-HTTP2.md):
        # anything else is not gRPC and is refused with INTERNAL, and the stream already opened upstream
        # is cut (StreamReset), so not a byte of it reaches the upstream. Message sizes are the
        # upstream's business here (payloads are never buffered): only the framing is judged.
        if stream.kind is not _Kind.GRPC:
            return True
        if stream.grpc_framing is None:
            stream.grpc_framing = grpc.GrpcParser(self._inbound, max_message_bytes=_GRPC_ANY_MESSAGE_SIZE)
        try:
            stream.grpc_framing.feed(data)
        except ParseError as e:
            out.append(RequestRejected(stream_id=stream_id, reason=e.reason, detail=str(e), grpc=True))
            out.append(StreamReset(stream_id=stream_id, error_code=ErrorCode.CANCEL))
            self.refusal(stream_id, e.reason, message="malformed gRPC message framing")
            return False
        return True

    def _on_premature_reset(self) -> None:
        # HTTP/2 "Rapid Reset" (CVE-2023-44487): a client that opens streams and resets them before
        # the answer makes the upstream work for free. Envoy's rule: once 500 streams were opened,
        # close the connection when at least half of them were reset prematurely.
        self.premature_resets += 1
        if self.streams_opened >= _RAPID_RESET_MIN_STREAMS and 2 * self.premature_resets >= self.streams_opened:
            self._flood("rapid_reset", f"{self.premature_resets} of {self.streams_opened} streams reset before "
                        "their response (rapid reset, CVE-2023-44487)")

    # --- responses and refusals -------------------------------------------------------------------

    def send_response(self, response: HttpResponse, *, end_stream: bool | None = None) -> None:
        """Send a response head (a 1xx too) on `response.stream_id`; regular headers only.

        `end_stream` defaults to `not response.has_body` for final responses. Ignored for a stream
        that is gone, reset or refused.
        """
        stream_id = response.stream_id or 0
        stream = self._streams.get(stream_id)
        if stream is None or stream.reset or stream.headers_sent:
            return
        informational = 100 <= response.status < 200
        end = False if informational else (not response.has_body if end_stream is None else end_stream)
        if response.headers is not self._last_response_headers:
            self._last_response_wire = _wire(response.headers)
            self._last_response_headers = response.headers
        fields = [(b":status", str(response.status).encode("ascii")), *self._last_response_wire]
        with _EngineErrors(self._outbound):
            self._conn.send_headers(stream_id, fields, end_stream=end)
        if not informational:
            stream.headers_sent = True
        if end:
            stream.local_ended = True
            self._forget_if_finished(stream_id)

    def refusal(self, stream_id: int, reason: Reason, *, grpc_call: bool | None = None,
                message: str | None = None) -> None:
        """Answer this stream with the protocol's refusal; the connection and other streams go on.

        Plain HTTP: `http1.refusal_status(reason)` with a text body (`denied_body` for 403). gRPC (`grpc_call`,
        default: as the request was recognised): trailers-only `:status 200`, `grpc-status` from
        `grpc.grpc_status(reason)`, percent-encoded `grpc-message`. If a response already started,
        a gRPC stream ends with trailers carrying the status, a plain one is reset (INTERNAL_ERROR).
        The rest of the request body is acknowledged and dropped. No-op for unknown/closed streams.
        """
        stream = self._streams.get(stream_id)
        if stream is None or not stream.is_relaying:
            return
        is_grpc = stream.kind is _Kind.GRPC if grpc_call is None else grpc_call
        if stream.local_ended or (stream.headers_sent and not is_grpc):
            self.reset_stream(stream_id, ErrorCode.INTERNAL_ERROR)
            return
        # Stop relaying the request (owed bytes released, later DATA acknowledged and dropped: RFC 9113
        # §8.1 lets a server answer before the request is complete) and drop what was queued for the
        # client; the stream stays writable for the refusal itself.
        self._release(stream_id, stream)
        stream.refused = True
        with _EngineErrors(self._outbound):
            if is_grpc and stream.headers_sent:
                grpc_trailers = grpc.status_trailers(reason, message)[2:]
                self._conn.send_headers(stream_id, _wire(grpc_trailers), end_stream=True)
                stream.local_ended = True
            elif is_grpc:
                self._conn.send_headers(stream_id, _wire(grpc.status_trailers(reason, message)),
                                        end_stream=True)
                stream.local_ended = True
            else:
                status = http1.refusal_status(reason)
                body = self.denied_body if status == 403 else f"{http1.REASON_PHRASES[status]}\r\n".encode()
                head = ((":status", str(status)), ("content-type", "text/plain; charset=utf-8"),
                        ("content-length", str(len(body))))
                self._conn.send_headers(stream_id, _wire(head), end_stream=not body)
                if body:
                    stream.out.append((memoryview(body), False))
                    stream.end_after = True
                else:
                    stream.local_ended = True
        stream.headers_sent = True
        self._flush(stream_id)
        self._forget_if_finished(stream_id)


class Http2ClientSide(_Http2Side):
    """The connection facing the upstream (prior-knowledge h2c): requests out, responses in.

    Streams are opened with the downstream's stream ids, in the order `send_request` is called,
    queued while the upstream's MAX_CONCURRENT_STREAMS is reached.
    """

    _CLIENT_SIDE = True

    def __init__(
        self,
        *,
        initial_window_size: int = DEFAULT_INITIAL_WINDOW,
        connection_window_size: int = DEFAULT_CONNECTION_WINDOW,
        max_header_list_bytes: int = DEFAULT_MAX_HEADER_LIST_BYTES,
        lean: bool | None = None,
    ) -> None:
        super().__init__(initial_window_size=initial_window_size, connection_window_size=connection_window_size,
                         max_concurrent_streams=DEFAULT_MAX_CONCURRENT_STREAMS,
                         max_header_list_bytes=max_header_list_bytes, lean=lean)
        self._pending: deque[int] = deque()
        # The last request head put on the wire (its headers, by identity, and pseudo-header fields) and its
        # wire form: a client repeating a head hands over the same headers tuple (see _fields).
        self._last_request_headers: Headers | None = None
        self._last_request_pseudo: list[tuple[str, str]] = []
        self._last_request_fields: list[tuple[bytes, bytes]] = []
        self._start()

    @property
    def allows_new_streams(self) -> bool:
        """False once the upstream sent GOAWAY or the connection failed: refuse new requests
        downstream with Reason.UPSTREAM_FAILED (or open a new upstream connection)."""
        return not (self._goaway_received or self._failed)

    def send_request(self, request: HttpRequest | GrpcCall, *, end_stream: bool | None = None) -> bool:
        """Open `request.stream_id` upstream with the request's (normalised) head.

        `end_stream` defaults to `not request.has_body`. Returns False (nothing sent) when the
        connection no longer allows new streams; then refuse the stream downstream.
        """
        stream_id = request.stream_id or 0
        if not self.allows_new_streams or stream_id in self._streams:
            return False
        if isinstance(request, GrpcCall):
            pseudo = [(":method", "POST"), (":scheme", request.scheme or "http")]
            authority, path = request.authority, request.path
        else:
            pseudo = [(":method", request.method), (":scheme", request.scheme or "http")]
            authority, path = request.host, request.target
        if authority is not None:
            pseudo.append((":authority", authority))
        pseudo.append((":path", path))
        stream = _Stream(kind=_Kind.GRPC if isinstance(request, GrpcCall) else _Kind.HTTP)
        if request.headers is self._last_request_headers and pseudo == self._last_request_pseudo:
            fields = self._last_request_fields  # a repeated head (shared, never changed once built)
        else:
            regular = tuple((n, v) for n, v in request.headers if not (authority is not None and n == "host"))
            fields = _wire((*pseudo, *regular))
            self._last_request_headers, self._last_request_pseudo, self._last_request_fields = \
                request.headers, pseudo, fields
        stream.pending_headers = fields
        stream.end_after = not request.has_body if end_stream is None else end_stream
        self._streams[stream_id] = stream
        self._pending.append(stream_id)
        self._open_pending()
        return True

    def _open_pending(self) -> None:
        while self._pending and not self._goaway_received:
            if self._conn.open_outbound_streams >= self._conn.remote_max_concurrent_streams:
                return
            stream_id = self._pending.popleft()
            stream = self._streams.get(stream_id)
            if stream is None or stream.pending_headers is None:
                continue
            fields, stream.pending_headers = stream.pending_headers, None
            end = stream.end_after and not stream.out and stream.trailers_after is None
            with _EngineErrors(self._outbound):
                self._conn.send_headers(stream_id, fields, end_stream=end)
            stream.headers_sent = True
            if end:
                stream.end_after = False
                stream.local_ended = True
            self._flush(stream_id)

    def _after_feed(self) -> None:
        self._open_pending()

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and stream.pending_headers is not None:
            stream.pending_headers = None  # never opened upstream: nothing to send
            self._drop(stream_id, stream)
            self._forget_if_finished(stream_id)
            return
        super().reset_stream(stream_id, error_code)

    def _handle_side(self, event: WireEvent, out: list[Event]) -> None:
        if type(event) is HeadersReceived and event.kind != http2_wire.REQUEST:  # type: ignore[union-attr]
            assert isinstance(event, HeadersReceived)
            stream_id = event.stream_id
            stream = self._streams.get(stream_id)
            if stream is None or stream.reset:
                return
            pseudo, regular = self._fields(event.headers)
            status = pseudo.get(":status", "")
            if not (len(status) == 3 and status.isascii() and status.isdigit()) or status == "101":
                # Malformed response (RFC 9113 §8.3.2, §8.6): a stream error, reported like a reset.
                self._drop(stream_id, stream)
                self._reset_h2(stream_id, ErrorCode.PROTOCOL_ERROR)
                out.append(StreamReset(stream_id=stream_id, error_code=int(ErrorCode.PROTOCOL_ERROR)))
                self._forget_if_finished(stream_id)
                return
            informational = event.kind == http2_wire.INFORMATIONAL
            ended = not informational and event.stream_ended
            out.append(HttpResponse(
                status=int(status), headers=regular, http_version="2", stream_id=stream_id,
                has_body=not informational and not ended, content_length=_content_length(regular),
            ))
        elif type(event) is PushedStreamReceived:  # push is disabled; refuse it anyway
            assert isinstance(event, PushedStreamReceived)
            with _EngineErrors(self._inbound):
                self._reset_h2(event.pushed_stream_id, ErrorCode.REFUSED_STREAM)

    def _on_goaway(self, event: ConnectionTerminated, out: list[Event]) -> None:
        super()._on_goaway(event, out)
        last = event.last_stream_id
        for stream_id in sorted(self._streams):
            stream = self._streams[stream_id]
            if stream_id > last and not stream.reset:
                stream.pending_headers = None
                self._drop(stream_id, stream)
                out.append(StreamReset(stream_id=stream_id, error_code=int(ErrorCode.REFUSED_STREAM)))
                self._forget_if_finished(stream_id)
        self._pending.clear()


if TYPE_CHECKING:  # mypy proves the parser contract (events.Parser) holds

    def _server_contract(parser: Http2ServerSide) -> Parser[Event]:
        return parser

    def _client_contract(parser: Http2ClientSide) -> Parser[Event]:
        return parser
