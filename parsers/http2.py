"""HTTP/2 (h2c) for the proxy: a server side facing the client and a client side facing the upstream.

Owns HTTP/2 framing, HPACK, per-stream request/response events, flow control and refusal bytes,
on top of python-hyper `h2` (sans-I/O). Never does I/O or policy. Raises only `ParseError`
subclasses: every h2/hpack/hyperframe exception is translated in `_h2_errors` (one `except`).

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
  would escape L7 policy) are refused here and reported as `RequestRejected`.
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack.exceptions
import hyperframe.exceptions
from membrane.parsers import grpc, http1
from membrane.parsers.errors import MalformedMessage, MessageTooLarge, ParseError, ProtocolViolation
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

ErrorCode = h2.errors.ErrorCodes

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
    if isinstance(exc, h2.exceptions.FrameTooLargeError | h2.exceptions.DenialOfServiceError):
        return MessageTooLarge(message, direction=direction)
    if isinstance(exc, hpack.exceptions.HPACKError | hyperframe.exceptions.HyperframeError | binascii.Error):
        return MalformedMessage(message, direction=direction)
    return ProtocolViolation(message, direction=direction)


@contextmanager
def _h2_errors(direction: Direction) -> Iterator[None]:
    """The one place where library exceptions become ParseError subclasses (STYLE.md §3.1)."""
    try:
        yield
    except (h2.exceptions.H2Error, hpack.exceptions.HPACKError, hyperframe.exceptions.HyperframeError,
            binascii.Error) as e:
        raise _translate(e, direction) from e


def _text(headers: list[tuple[bytes, bytes]]) -> tuple[dict[str, str], Headers]:
    """Split an h2 header list into (pseudo-headers, regular headers) as latin-1 text (lossless)."""
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    for raw_name, raw_value in headers:
        name = bytes(raw_name).decode("latin-1")
        value = bytes(raw_value).decode("latin-1")
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


@dataclass(slots=True)
class _Stream:
    kind: _Kind = _Kind.HTTP
    unacked: int = 0  # DATA bytes emitted as events and not yet acknowledged
    remote_ended: bool = False
    local_ended: bool = False
    reset: bool = False  # reset by either side: nothing more is sent or relayed
    refused: bool = False  # answered by refuse(): inbound DATA is acknowledged and dropped
    headers_sent: bool = False  # a final response (server) / the request (client) went out
    trailers_sent: bool = False
    out: deque[tuple[memoryview, bool]] = field(default_factory=deque)  # (bytes, counted as delivered)
    end_after: bool = False  # END_STREAM once `out` drains
    trailers_after: Headers | None = None  # trailers to send once `out` drains
    pending_headers: list[tuple[bytes, bytes]] | None = None  # client side: not opened yet

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
    ) -> None:
        client = self._CLIENT_SIDE
        self._inbound = Direction.SERVER_TO_CLIENT if client else Direction.CLIENT_TO_SERVER
        self._outbound = Direction.CLIENT_TO_SERVER if client else Direction.SERVER_TO_CLIENT
        config = h2.config.H2Configuration(
            client_side=client, header_encoding=None, validate_inbound_headers=True,
            normalize_inbound_headers=True, validate_outbound_headers=True, normalize_outbound_headers=True,
            split_outbound_cookies=False,
        )
        self._conn = h2.connection.H2Connection(config)
        initial: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_bytes,
        }
        # A window above the default may apply at once (the peer just sends less than we allow); a
        # smaller one only once the peer acknowledged our SETTINGS (RFC 9113 §6.9.2), so it is sent
        # as a settings update after the preface.
        self._window_update: int | None = None
        if initial_window_size >= 65_535:
            initial[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = initial_window_size
        else:
            self._window_update = initial_window_size
        if client:
            initial[h2.settings.SettingCodes.ENABLE_PUSH] = 0  # a proxy never relays server push
        self._conn.local_settings = h2.settings.Settings(client=client, initial_values=initial)
        self._conn.decoder.max_header_list_size = max_header_list_bytes
        self._connection_window_increment = max(0, connection_window_size - 65_535)
        self._streams: dict[int, _Stream] = {}
        self._delivered: dict[int, int] = {}
        self._prefix = b""
        self._inbuf = bytearray()
        self._preface_left = 0 if client else 24  # the client magic (RFC 9113 §3.4), checked by h2
        self._failed = False
        self._goaway_received = False

    def _start(self, upgrade_settings: bytes | None = None) -> None:
        with _h2_errors(self._inbound if upgrade_settings else self._outbound):
            if upgrade_settings is None:
                self._conn.initiate_connection()
            else:
                self._conn.initiate_upgrade_connection(upgrade_settings)
            if self._window_update is not None:
                self._conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self._window_update})
            if self._connection_window_increment:
                self._conn.increment_flow_control_window(self._connection_window_increment)

    # --- input ------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        """Consume bytes from the peer; returns the events they complete ([] = need more data).

        Raises:
            ParseError: the peer broke HTTP/2 (MessageTooLarge for frame/header-list limits,
                MalformedMessage for undecodable frames/HPACK, ProtocolViolation otherwise). A GOAWAY
                is queued: send data_to_send(), then close the connection. Later calls raise again.
        """
        if self._failed:
            raise ProtocolViolation("HTTP/2 connection already failed", direction=self._inbound)
        out: list[Event] = []
        reflow = False
        try:
            with _h2_errors(self._inbound):
                for unit in self._units(data):
                    for event in self._conn.receive_data(unit):
                        if isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                            reflow = True
                        else:
                            self._handle(event, out)
                if reflow:
                    for stream_id in list(self._streams):
                        self._flush(stream_id)
                self._after_feed()
        except ParseError:
            self._failed = True
            raise
        return out

    def _units(self, data: bytes) -> Iterator[bytes]:
        """Cut the input at frame boundaries (the preface counts as one unit) and yield whole units.

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
                break
            take = min(unit, len(buf) - pos)
            if take == 0:
                break
            chunk = bytes(buf[pos : pos + take])
            pos += take
            if self._preface_left:
                self._preface_left -= take
            yield chunk
        del buf[:pos]

    def _handle(self, event: h2.events.Event, out: list[Event]) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._on_data(event, out)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None:
                stream.remote_ended = True
                if stream.is_relaying:
                    out.append(EndOfMessage(stream_id=event.stream_id))
                self._forget_if_finished(event.stream_id or 0)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self._streams.get(event.stream_id or 0)
            if stream is not None and stream.is_relaying:
                _, regular = _text(list(event.headers or []))
                out.append(Trailers(headers=regular, stream_id=event.stream_id))
        elif isinstance(event, h2.events.StreamReset):
            stream_id = event.stream_id or 0
            stream = self._streams.get(stream_id)
            if stream is not None and not stream.reset:
                relaying = stream.is_relaying
                if not stream.local_ended:
                    self._on_premature_reset()
                self._drop(stream_id, stream)
                if relaying:
                        out.append(StreamReset(stream_id=stream_id, error_code=int(event.error_code or 0)))
                self._forget_if_finished(stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event, out)
        else:
            self._handle_side(event, out)

    def _on_premature_reset(self) -> None:
        """The peer reset a stream before its answer completed (a hook for the server side's limit)."""

    def _handle_side(self, event: h2.events.Event, out: list[Event]) -> None:
        """Side-specific events (requests / responses); everything else (PING, SETTINGS ack,
        PRIORITY, unknown frames) is answered by h2 or has no meaning across the proxy."""

    def _after_feed(self) -> None:
        pass

    def _on_data(self, event: h2.events.DataReceived, out: list[Event]) -> None:
        stream_id = event.stream_id or 0
        data = bytes(event.data or b"")
        padding = (event.flow_controlled_length or 0) - len(data)
        if padding > 0:  # padding is never relayed, so it is consumed right here
            self._conn.acknowledge_received_data(padding, stream_id)
        stream = self._streams.get(stream_id)
        if stream is None or not stream.is_relaying:
            if data:
                self._conn.acknowledge_received_data(len(data), stream_id)
            return
        if data:
            stream.unacked += len(data)
            out.append(Data(data=data, stream_id=stream_id))

    def _on_goaway(self, event: h2.events.ConnectionTerminated, out: list[Event]) -> None:
        self._goaway_received = True
        last = int(event.last_stream_id or 0)
        out.append(GoAway(error_code=int(event.error_code or 0), last_stream_id=last,
                          additional_data=bytes(event.additional_data or b"")))

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
            with _h2_errors(self._outbound):
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
        h2_stream = self._conn.streams.get(stream_id)
        if h2_stream is not None and not h2_stream.closed:
            with _h2_errors(self._outbound):
                self._conn.reset_stream(stream_id, error_code)

    def close(self, error_code: int = ErrorCode.NO_ERROR) -> None:
        """Queue GOAWAY (graceful when NO_ERROR: streams already open may finish)."""
        with _h2_errors(self._outbound):
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
            with _h2_errors(self._outbound):
                self._conn.acknowledge_received_data(owed, stream_id)

    def _forget_if_finished(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and stream.is_finished and stream.pending_headers is None:
            del self._streams[stream_id]

    def _flush(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.reset or stream.pending_headers is not None:
            return
        with _h2_errors(self._outbound):
            while stream.out:
                window = self._conn.local_flow_control_window(stream_id)
                if window <= 0:
                    return
                chunk, counted = stream.out[0]
                n = min(window, self._conn.max_outbound_frame_size, len(chunk))
                last = (n == len(chunk) and len(stream.out) == 1 and stream.end_after
                        and stream.trailers_after is None)
                self._conn.send_data(stream_id, bytes(chunk[:n]), end_stream=last)
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
        _upgrade_settings: str | None = None,
    ) -> None:
        super().__init__(initial_window_size=initial_window_size, connection_window_size=connection_window_size,
                         max_concurrent_streams=max_concurrent_streams, max_header_list_bytes=max_header_list_bytes)
        self.denied_body = denied_body
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
                   denied_body=denied_body, _upgrade_settings=value)
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

    def _handle_side(self, event: h2.events.Event, out: list[Event]) -> None:
        if isinstance(event, h2.events.RequestReceived):
            pseudo, regular = _text(list(event.headers or []))
            self._on_request_fields(event.stream_id or 0, pseudo, regular,
                                    ended=event.stream_ended is not None, out=out)

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

    def _on_premature_reset(self) -> None:
        # HTTP/2 "Rapid Reset" (CVE-2023-44487): a client that opens streams and resets them before
        # the answer makes the upstream work for free. Envoy's rule: once 500 streams were opened,
        # close the connection when at least half of them were reset prematurely.
        self.premature_resets += 1
        if self.streams_opened >= _RAPID_RESET_MIN_STREAMS and 2 * self.premature_resets >= self.streams_opened:
            self._conn.close_connection(ErrorCode.ENHANCE_YOUR_CALM)
            raise ProtocolViolation(
                f"{self.premature_resets} of {self.streams_opened} streams reset before their response "
                "(HTTP/2 rapid reset)", direction=self._inbound)

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
        fields = [(b":status", str(response.status).encode("ascii")), *_wire(response.headers)]
        with _h2_errors(self._outbound):
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
        with _h2_errors(self._outbound):
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
    ) -> None:
        super().__init__(initial_window_size=initial_window_size, connection_window_size=connection_window_size,
                         max_concurrent_streams=DEFAULT_MAX_CONCURRENT_STREAMS,
                         max_header_list_bytes=max_header_list_bytes)
        self._pending: deque[int] = deque()
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
        regular = tuple((n, v) for n, v in request.headers if not (authority is not None and n == "host"))
        stream = _Stream(kind=_Kind.GRPC if isinstance(request, GrpcCall) else _Kind.HTTP)
        stream.pending_headers = _wire((*pseudo, *regular))
        stream.end_after = not request.has_body if end_stream is None else end_stream
        self._streams[stream_id] = stream
        self._pending.append(stream_id)
        self._open_pending()
        return True

    def _open_pending(self) -> None:
        while self._pending and not self._goaway_received:
            if self._conn.open_outbound_streams >= self._conn.remote_settings.max_concurrent_streams:
                return
            stream_id = self._pending.popleft()
            stream = self._streams.get(stream_id)
            if stream is None or stream.pending_headers is None:
                continue
            fields, stream.pending_headers = stream.pending_headers, None
            end = stream.end_after and not stream.out and stream.trailers_after is None
            with _h2_errors(self._outbound):
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

    def _handle_side(self, event: h2.events.Event, out: list[Event]) -> None:
        if isinstance(event, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            stream_id = event.stream_id or 0
            stream = self._streams.get(stream_id)
            if stream is None or stream.reset:
                return
            pseudo, regular = _text(list(event.headers or []))
            status = pseudo.get(":status", "")
            if not (len(status) == 3 and status.isascii() and status.isdigit()) or status == "101":
                # Malformed response (RFC 9113 §8.3.2, §8.6): a stream error, reported like a reset.
                self._drop(stream_id, stream)
                self._reset_h2(stream_id, ErrorCode.PROTOCOL_ERROR)
                out.append(StreamReset(stream_id=stream_id, error_code=int(ErrorCode.PROTOCOL_ERROR)))
                self._forget_if_finished(stream_id)
                return
            informational = isinstance(event, h2.events.InformationalResponseReceived)
            ended = not informational and event.stream_ended is not None  # type: ignore[union-attr]
            out.append(HttpResponse(
                status=int(status), headers=regular, http_version="2", stream_id=stream_id,
                has_body=not informational and not ended, content_length=_content_length(regular),
            ))
        elif isinstance(event, h2.events.PushedStreamReceived):  # push is disabled; refuse it anyway
            with _h2_errors(self._inbound):
                self._reset_h2(event.pushed_stream_id or 0, ErrorCode.REFUSED_STREAM)

    def _on_goaway(self, event: h2.events.ConnectionTerminated, out: list[Event]) -> None:
        super()._on_goaway(event, out)
        last = int(event.last_stream_id or 0)
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
