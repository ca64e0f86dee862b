"""A lean HTTP/2 connection (RFC 9113) for the proxy's hot path: frames, HPACK header blocks, SETTINGS,
PING, flow-control windows, stream states, GOAWAY. Sans-I/O; no policy, no request semantics.

`parsers.http2` drives it through the same calls it makes on python-hyper's h2 (which stays the
reference: `Http2ServerSide(lean=False)`), one whole frame per `receive_frame()`. It raises only
`WireError` (its `error_code` is the GOAWAY's); a GOAWAY is queued before it is raised, except for a
bad client preface (nothing to say in HTTP/2 then). It mirrors h2's observable choices, so a
differential run (fuzz/http2_frames.py) gives the same events: header validation (RFC 9113 §8.2,
§8.3), content-length checks (§8.1.1), frames after a GOAWAY sent or received are connection errors,
RST_STREAM on an idle stream is ignored, frames on streams this side reset are dropped.

Rules / theory of operation
---------------------------
* A stream is (local_open, remote_open); it is closed when both are False. HEADERS from the peer
  opens it (server) or answers it (client). END_STREAM closes that direction; RST_STREAM closes both.
  Closed streams are remembered (how they closed) in a bounded map, to answer late frames.
* Inbound windows shrink on DATA; `acknowledge_received_data` gives bytes back and a WINDOW_UPDATE
  goes out once half a window is owed (h2's rule), so a peer is never stalled by a missing update.
"""

from __future__ import annotations

import base64
import binascii
import re

from membrane.parsers.hpack import Decoder, Encoder, HpackError, HpackTableSizeError, HpackTooLarge

__all__ = [
    "FlowChanged",
    "HeadersReceived",
    "LeanConnection",
    "WireError",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9113 §7 error codes
NO_ERROR = 0
PROTOCOL_ERROR = 1
INTERNAL_ERROR = 2
FLOW_CONTROL_ERROR = 3
STREAM_CLOSED = 5
FRAME_SIZE_ERROR = 6
REFUSED_STREAM = 7
COMPRESSION_ERROR = 9
ENHANCE_YOUR_CALM = 11

# Frame types (§6) and flags
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
ALTSVC = 10
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# SETTINGS identifiers (§6.5.2)
SETTINGS_HEADER_TABLE_SIZE = 1
SETTINGS_ENABLE_PUSH = 2
SETTINGS_MAX_CONCURRENT_STREAMS = 3
SETTINGS_INITIAL_WINDOW_SIZE = 4
SETTINGS_MAX_FRAME_SIZE = 5
SETTINGS_MAX_HEADER_LIST_SIZE = 6
SETTINGS_ENABLE_CONNECT_PROTOCOL = 8  # RFC 8441

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME_SIZE = 16_384
_CLOSED_MEMORY = 4096  # closed streams remembered for late frames; older ones count as "closed implicitly"

# How a stream closed (h2's StreamClosedBy), for late frames on it.
_BY_RESET_SENT = 1
_BY_RESET_RECEIVED = 2
_BY_END = 3

# Kinds of header block
REQUEST = 0
RESPONSE = 1
INFORMATIONAL = 2
TRAILERS = 3

_CONNECTION_HEADERS = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":status", b":protocol"})
_REQUEST_ONLY = frozenset({b":scheme", b":path", b":authority", b":method", b":protocol"})
# §8.2.1: a name is visible ASCII without upper case (a colon only first); a value has no NUL/CR/LF and
# no leading or trailing SP/HTAB. Names repeat on every request, so the ones already seen are remembered.
_BAD_NAME = re.compile(rb"[^\x21-\x40\x5b-\x7e]|.:")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_GOOD_NAMES: set[bytes] = set()
_GOOD_NAMES_MAX = 4096
# Values repeat too (methods, schemes, authorities, user agents, content types); short ones seen valid
# are remembered the same way (at most 4096 x 128 bytes). HPACK hands back its table's own bytes
# objects for indexed fields, whose hashes are cached, so a hit is one set lookup.
_GOOD_VALUES: set[bytes] = set()
_GOOD_VALUE_LONGEST = 128


class WireError(Exception):
    """A connection error (RFC 9113 §5.4.1); `error_code` went out in the GOAWAY.

    `kind` refines it for the caller's error mapping: "protocol", "frame_size", "compression",
    "header_list" (over SETTINGS_MAX_HEADER_LIST_SIZE), "streams" (over MAX_CONCURRENT_STREAMS), "flow".
    """

    def __init__(self, message: str, error_code: int = PROTOCOL_ERROR, kind: str = "protocol") -> None:
        super().__init__(message)
        self.error_code = error_code
        self.kind = kind


class HeadersReceived:
    """A complete header block: a request, a response (final or 1xx) or trailers."""

    __slots__ = ("headers", "kind", "stream_ended", "stream_id")

    def __init__(self, kind: int, stream_id: int, headers: list[tuple[bytes, bytes]], stream_ended: bool) -> None:
        self.kind = kind
        self.stream_id = stream_id
        self.headers = headers
        self.stream_ended = stream_ended


class DataReceived:
    __slots__ = ("data", "flow_controlled_length", "stream_ended", "stream_id")

    def __init__(self, stream_id: int, data: bytes, flow_controlled_length: int, stream_ended: bool) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_controlled_length = flow_controlled_length
        self.stream_ended = stream_ended


class StreamEnded:
    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StreamReset:
    __slots__ = ("error_code", "stream_id")

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code


class ConnectionTerminated:
    __slots__ = ("additional_data", "error_code", "last_stream_id")

    def __init__(self, error_code: int, last_stream_id: int, additional_data: bytes) -> None:
        self.error_code = error_code
        self.last_stream_id = last_stream_id
        self.additional_data = additional_data


class FlowChanged:
    """A WINDOW_UPDATE or SETTINGS may have opened send windows: retry buffered output."""

    __slots__ = ()


class PushedStreamReceived:
    __slots__ = ("pushed_stream_id",)

    def __init__(self, pushed_stream_id: int) -> None:
        self.pushed_stream_id = pushed_stream_id


WireEvent = HeadersReceived | DataReceived | StreamEnded | StreamReset | ConnectionTerminated | FlowChanged \
    | PushedStreamReceived
_FLOW_CHANGED = FlowChanged()


def frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """Serialise one frame (§4.1)."""
    n = len(payload)
    return bytes((n >> 16, (n >> 8) & 0xFF, n & 0xFF, ftype, flags)) + stream_id.to_bytes(4, "big") + payload


class _Stream:
    __slots__ = ("expected_length", "final_response", "headers_received", "inbound_owed", "inbound_window",
                 "local_open", "method_head", "outbound_window", "received_length", "remote_open")

    def __init__(self, inbound_window: int, outbound_window: int) -> None:
        self.local_open = True
        self.remote_open = True
        self.inbound_window = inbound_window
        self.outbound_window = outbound_window
        self.inbound_owed = 0  # bytes given back by the application, not yet announced by WINDOW_UPDATE
        self.headers_received = False  # the request (server) / a final response (client) arrived
        self.final_response = False
        self.expected_length = -1
        self.received_length = 0
        self.method_head = False

    @property
    def closed(self) -> bool:
        return not (self.local_open or self.remote_open)


class LeanConnection:
    """One HTTP/2 connection endpoint: the server side (facing a client) or the client side."""

    def __init__(self, *, client_side: bool, max_concurrent_streams: int, max_header_list_size: int,
                 header_table_size: int, initial_window_size: int | None) -> None:
        self.client_side = client_side
        self.local_max_concurrent_streams = max_concurrent_streams
        self.local_initial_window = initial_window_size if initial_window_size is not None else DEFAULT_WINDOW
        self._pending_initial_window: int | None = None  # sent in SETTINGS, applies once ACKed
        self._settings_sent: list[tuple[int, int]] = [
            (SETTINGS_HEADER_TABLE_SIZE, header_table_size),
            (SETTINGS_MAX_CONCURRENT_STREAMS, max_concurrent_streams),
            (SETTINGS_MAX_HEADER_LIST_SIZE, max_header_list_size),
        ]
        if initial_window_size is not None:
            self._settings_sent.append((SETTINGS_INITIAL_WINDOW_SIZE, initial_window_size))
        self.enable_push = False
        if client_side:
            self._settings_sent.insert(1, (SETTINGS_ENABLE_PUSH, 0))
        self.decoder = Decoder(max_table_size=header_table_size, max_header_list_size=max_header_list_size)
        self.encoder = Encoder()
        self.max_inbound_frame_size = DEFAULT_FRAME_SIZE
        self.max_outbound_frame_size = DEFAULT_FRAME_SIZE
        self.remote_max_concurrent_streams = 2**32 + 1  # unlimited until the peer's SETTINGS say otherwise
        self.remote_initial_window = DEFAULT_WINDOW
        self.outbound_window = DEFAULT_WINDOW
        self.inbound_window = DEFAULT_WINDOW
        self._inbound_max = DEFAULT_WINDOW
        self._inbound_owed = 0
        self.streams: dict[int, _Stream] = {}  # open and half-closed streams only: closing one removes it
        self._open_streams = [0, 0]  # len(self.streams) by stream id parity (even, odd)
        self._closed: dict[int, int] = {}
        self.highest_inbound_stream_id = 0
        self.highest_outbound_stream_id = 0
        self._out: list[bytes] = []
        self._closed_state = False  # a GOAWAY was sent or received (h2's CLOSED connection state)
        self._idle = True  # no HEADERS sent or received yet (h2's IDLE: RST_STREAM/DATA are errors then)
        self._preface_left = 0 if client_side else len(PREFACE)
        self._preface_seen = b""
        self._block: bytearray | None = None  # header block awaiting CONTINUATION
        self._block_stream = 0
        self._block_flags = 0
        self._block_promised = 0
        self._block_self_dependent = False
        self._valid_headers: list[tuple[bytes, bytes]] | None = None  # the last list _validate passed, and as what
        self._valid_kind = -1

    # --- setup ------------------------------------------------------------------------------------

    def _settings_frame(self) -> bytes:
        return frame(SETTINGS, 0, 0, b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big")
                                              for k, v in self._settings_sent))

    def initiate_connection(self) -> None:
        if self.client_side:
            self._out.append(PREFACE)
        self._out.append(self._settings_frame())

    def initiate_upgrade_connection(self, settings_header: bytes) -> None:
        """Server side of an h2c upgrade (RFC 7540 §3.2): apply the client's HTTP2-Settings, open stream 1."""
        try:
            payload = base64.urlsafe_b64decode(settings_header)
        except (binascii.Error, ValueError) as e:
            raise WireError(f"HTTP2-Settings does not decode: {e}", kind="compression") from e
        if len(payload) % 6:
            raise WireError("HTTP2-Settings is not a SETTINGS payload", FRAME_SIZE_ERROR, "compression")
        self._apply_settings(payload)
        self._out.append(self._settings_frame())
        stream = _Stream(self.local_initial_window, self.remote_initial_window)
        stream.remote_open = False
        stream.headers_received = True
        self._add_stream(1, stream)
        self._idle = False
        self.highest_inbound_stream_id = 1

    def update_initial_window(self, size: int) -> None:
        """Announce a new SETTINGS_INITIAL_WINDOW_SIZE; it applies to inbound windows once ACKed (§6.9.2)."""
        self._pending_initial_window = size
        self._out.append(frame(SETTINGS, 0, 0, SETTINGS_INITIAL_WINDOW_SIZE.to_bytes(2, "big") + size.to_bytes(4, "big")))

    def increment_flow_control_window(self, increment: int) -> None:
        self.inbound_window += increment
        self._inbound_max += increment
        self._out.append(frame(WINDOW_UPDATE, 0, 0, increment.to_bytes(4, "big")))

    # --- queries ------------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def is_stream_open(self, stream_id: int) -> bool:
        stream = self.streams.get(stream_id)
        return stream is not None and not stream.closed

    def knows_stream(self, stream_id: int) -> bool:
        return stream_id in self.streams

    @property
    def open_outbound_streams(self) -> int:
        return self._open_streams[1 if self.client_side else 0]

    def _open_inbound_streams(self) -> int:
        return self._open_streams[0 if self.client_side else 1]

    def _add_stream(self, stream_id: int, stream: _Stream) -> None:
        self.streams[stream_id] = stream
        self._open_streams[stream_id & 1] += 1

    def local_flow_control_window(self, stream_id: int) -> int:
        stream = self.streams.get(stream_id)
        if stream is None:
            return 0
        return min(self.outbound_window, stream.outbound_window)

    # --- receiving ----------------------------------------------------------------------------------

    def receive_preface(self, data: bytes) -> None:
        """Part of the client's 24-byte preface (server side). Raises WireError (no GOAWAY) if it differs."""
        start = len(PREFACE) - self._preface_left
        if data != PREFACE[start : start + len(data)]:
            raise WireError("Invalid HTTP/2 preamble")
        self._preface_left -= len(data)

    def receive_frame(self, buf: bytes | bytearray, pos: int, length: int) -> list[WireEvent]:
        """Handle the whole frame at buf[pos : pos + 9 + length]. Raises WireError (GOAWAY queued)."""
        try:
            return self._frame(buf, pos, length)
        # One name per clause: mypyc gives an `except ... as` name one type per function, so reusing `e`
        # for another class makes the second clause fail its own type check (TypeError when compiled).
        except HpackTooLarge as too_large:
            self.close_connection(PROTOCOL_ERROR)
            raise WireError(str(too_large), PROTOCOL_ERROR, "header_list") from too_large
        except HpackTableSizeError as table_size:
            self.close_connection(COMPRESSION_ERROR)
            raise WireError(str(table_size), COMPRESSION_ERROR, "protocol") from table_size
        except HpackError as undecodable:
            self.close_connection(COMPRESSION_ERROR)
            raise WireError(str(undecodable), COMPRESSION_ERROR, "compression") from undecodable
        except WireError as wire:
            self.close_connection(wire.error_code)
            raise

    def _frame(self, buf: bytes | bytearray, pos: int, length: int) -> list[WireEvent]:
        ftype = buf[pos + 3]
        flags = buf[pos + 4]
        stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        payload = bytes(buf[pos + 9 : pos + 9 + length])
        if self._block is not None:
            if ftype != CONTINUATION or stream_id != self._block_stream:
                raise WireError("a header block was interrupted by another frame (RFC 9113 §6.10)")
            self._block += payload
            if not flags & END_HEADERS:
                return []
            block, self._block = bytes(self._block), None
            if self._closed_state:  # h2 judges a header block's frame type against its state once it is whole
                raise WireError("frame received after GOAWAY")
            if self._block_promised:
                return self._push_promise(self._block_stream, self._block_promised, block)
            return self._headers(self._block_stream, self._block_flags, block)
        if ftype > CONTINUATION:
            if ftype == ALTSVC:  # RFC 7838: parsed (and judged) as h2 does, then ignored; a proxy has no use for it
                if length < 2 or int.from_bytes(payload[:2], "big") > length - 2:
                    raise WireError("Invalid ALTSVC frame body", FRAME_SIZE_ERROR)
                if self._closed_state:
                    raise WireError("frame received after GOAWAY")
                self._idle = False
            return []  # unknown frame types are ignored (§5.5)
        if self._closed_state and ftype != GOAWAY and not (ftype in (HEADERS, PUSH_PROMISE) and not flags & END_HEADERS):
            raise WireError("frame received after GOAWAY")
        if self._idle:
            if ftype in (DATA, RST_STREAM):  # (PUSH_PROMISE is refused when its block completes)
                raise WireError("frame received before any stream was opened")
            if ftype == HEADERS:
                self._idle = False
        if ftype == DATA:
            return self._data(stream_id, flags, payload)
        if ftype == HEADERS:
            if not stream_id:
                raise WireError("HEADERS on stream 0")
            body = self._unpad(flags, payload)
            self_dependent = False
            if flags & PRIORITY_FLAG:
                if len(body) < 5:
                    raise WireError("HEADERS priority fields truncated", FRAME_SIZE_ERROR, "frame_size")
                self_dependent = int.from_bytes(body[:4], "big") & 0x7FFFFFFF == stream_id
                body = body[5:]
            self._block_self_dependent = self_dependent  # judged once the block is whole, as h2 does
            if not flags & END_HEADERS:
                self._block = bytearray(body)
                self._block_stream = stream_id
                self._block_flags = flags
                self._block_promised = 0
                return []
            return self._headers(stream_id, flags, body)
        if ftype == PRIORITY:
            if not stream_id:
                raise WireError("PRIORITY on stream 0")
            if length != 5:
                raise WireError("PRIORITY must be 5 bytes", FRAME_SIZE_ERROR, "frame_size")
            if int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == stream_id:
                raise WireError(f"stream {stream_id} may not depend on itself")
            return []
        if ftype == RST_STREAM:
            if not stream_id:
                raise WireError("RST_STREAM on stream 0")
            if length != 4:
                raise WireError("RST_STREAM must be 4 bytes", FRAME_SIZE_ERROR, "frame_size")
            return self._rst_stream(stream_id, int.from_bytes(payload, "big"))
        if ftype == SETTINGS:
            if stream_id:
                raise WireError("SETTINGS on a stream")
            if flags & ACK:
                if length:
                    raise WireError("SETTINGS ACK with a payload", FRAME_SIZE_ERROR, "frame_size")
                self._settings_acked()
                return []
            if length % 6:
                raise WireError("SETTINGS length not a multiple of 6", FRAME_SIZE_ERROR, "frame_size")
            self._apply_settings(payload)
            self._out.append(frame(SETTINGS, ACK, 0, b""))
            return [_FLOW_CHANGED]
        if ftype == PUSH_PROMISE:
            if not stream_id:
                raise WireError("PUSH_PROMISE on stream 0")
            body = self._unpad(flags, payload)
            if len(body) < 4:
                raise WireError("PUSH_PROMISE truncated", FRAME_SIZE_ERROR, "frame_size")
            promised = int.from_bytes(body[:4], "big") & 0x7FFFFFFF
            if promised == 0 or promised % 2:
                raise WireError(f"invalid PUSH_PROMISE promised stream id {promised}")
            if not flags & END_HEADERS:
                self._block = bytearray(body[4:])
                self._block_stream = stream_id
                self._block_flags = flags
                self._block_promised = promised
                return []
            return self._push_promise(stream_id, promised, body[4:])
        if ftype == PING:
            if stream_id:
                raise WireError("PING on a stream")
            if length != 8:
                raise WireError("PING must be 8 bytes", FRAME_SIZE_ERROR, "frame_size")
            if not flags & ACK:
                self._out.append(frame(PING, ACK, 0, payload))
            return []
        if ftype == GOAWAY:
            if stream_id:
                raise WireError("GOAWAY on a stream")
            if length < 8:
                raise WireError("GOAWAY truncated", FRAME_SIZE_ERROR, "frame_size")
            self._closed_state = True
            self._out.clear()  # h2 clears its outbound buffer: nothing more may be sent
            last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            return [ConnectionTerminated(int.from_bytes(payload[4:8], "big"), last, payload[8:])]
        if ftype == WINDOW_UPDATE:
            if length != 4:
                raise WireError("WINDOW_UPDATE must be 4 bytes", FRAME_SIZE_ERROR, "frame_size")
            increment = int.from_bytes(payload, "big")
            if not increment:
                raise WireError("WINDOW_UPDATE of 0")
            if increment > MAX_WINDOW:  # the reserved bit set: h2 (hyperframe) refuses it, and so do we
                raise WireError("WINDOW_UPDATE with the reserved bit set")
            if not stream_id:
                self.outbound_window += increment
                if self.outbound_window > MAX_WINDOW:
                    raise WireError("connection window over 2^31-1", FLOW_CONTROL_ERROR, "flow")
                return [_FLOW_CHANGED]
            stream = self.streams.get(stream_id)
            if stream is None:
                self._check_not_idle(stream_id)
                return []
            if stream.closed:
                return []
            stream.outbound_window += increment
            if stream.outbound_window > MAX_WINDOW:
                raise WireError("stream window over 2^31-1", FLOW_CONTROL_ERROR, "flow")
            return [_FLOW_CHANGED]
        # CONTINUATION without a header block
        raise WireError("CONTINUATION without a header block")

    def _check_not_idle(self, stream_id: int) -> None:
        outbound = (stream_id % 2 == 1) == self.client_side
        highest = self.highest_outbound_stream_id if outbound else self.highest_inbound_stream_id
        if stream_id > highest:
            raise WireError(f"frame on idle stream {stream_id}")

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload:
            raise WireError("padded frame without a pad length", FRAME_SIZE_ERROR, "frame_size")
        pad = payload[0]
        if pad >= len(payload):
            raise WireError("padding longer than the frame")
        return payload[1 : len(payload) - pad]

    def _data(self, stream_id: int, flags: int, payload: bytes) -> list[WireEvent]:
        if not stream_id:
            raise WireError("DATA on stream 0")
        flow = len(payload)
        data = self._unpad(flags, payload)
        self.inbound_window -= flow
        if self.inbound_window < 0:
            raise WireError("DATA over the connection window", FLOW_CONTROL_ERROR, "flow")
        stream = self.streams.get(stream_id)
        if stream is None:
            self._check_not_idle(stream_id)
            # Closed: give the connection window back at once, answer STREAM_CLOSED (h2 does both).
            self._ack_connection(flow)
            self._out.append(frame(RST_STREAM, 0, stream_id, STREAM_CLOSED.to_bytes(4, "big")))
            return []
        if not stream.remote_open:  # half-closed (remote): a stream error STREAM_CLOSED (§5.1)
            self._ack_connection(flow)
            return self._stream_closed_error(stream_id)
        if self.client_side and not stream.final_response:
            raise WireError("cannot receive data before headers")
        stream.inbound_window -= flow
        if stream.inbound_window < 0:
            raise WireError("DATA over the stream window", FLOW_CONTROL_ERROR, "flow")
        ended = bool(flags & END_STREAM)
        stream.received_length += len(data)
        if stream.expected_length >= 0 and (stream.received_length > stream.expected_length
                                            or (ended and stream.received_length != stream.expected_length)):
            raise WireError(f"body of {stream.received_length} bytes vs content-length {stream.expected_length}")
        if not ended:
            return [DataReceived(stream_id, data, flow, False)]
        self._remote_end(stream_id, stream)
        return [DataReceived(stream_id, data, flow, True), StreamEnded(stream_id)]

    def _stream_closed_error(self, stream_id: int) -> list[WireEvent]:
        """A frame other than WINDOW_UPDATE, PRIORITY or RST_STREAM on a half-closed (remote) stream: RFC 9113
        §5.1 makes it a stream error STREAM_CLOSED, so the stream is reset (as by us) and the connection lives
        on. h2 and nghttp2 do the same; frames after a stream fully closed by END_STREAM stay connection errors."""
        self._forget(stream_id, _BY_RESET_SENT)
        self._out.append(frame(RST_STREAM, 0, stream_id, STREAM_CLOSED.to_bytes(4, "big")))
        return [StreamReset(stream_id, STREAM_CLOSED)]

    def _remote_end(self, stream_id: int, stream: _Stream) -> None:
        stream.remote_open = False
        if not stream.local_open:
            self._forget(stream_id, _BY_END)

    def _forget(self, stream_id: int, how: int) -> None:
        if self.streams.pop(stream_id, None) is not None:
            self._open_streams[stream_id & 1] -= 1
        closed = self._closed
        closed[stream_id] = how
        if len(closed) > _CLOSED_MEMORY:
            del closed[next(iter(closed))]

    def _headers(self, stream_id: int, flags: int, block: bytes) -> list[WireEvent]:
        if self._block_self_dependent:
            raise WireError(f"stream {stream_id} may not depend on itself")
        ended = bool(flags & END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is None:
            inbound = (stream_id % 2 == 1) != self.client_side
            if stream_id <= (self.highest_inbound_stream_id if inbound else self.highest_outbound_stream_id):
                how = self._closed.get(stream_id, 0)
                self.decoder.decode(block)  # keep the HPACK context in step
                if how in (_BY_RESET_SENT, _BY_RESET_RECEIVED):
                    if how == _BY_RESET_SENT:
                        return []
                    self._out.append(frame(RST_STREAM, 0, stream_id, STREAM_CLOSED.to_bytes(4, "big")))
                    return []
                raise WireError(f"HEADERS on closed stream {stream_id}", STREAM_CLOSED)
            if not inbound or self.client_side:
                raise WireError(f"HEADERS opening stream {stream_id} the peer may not open")
            if self._open_inbound_streams() + 1 > self.local_max_concurrent_streams:
                raise WireError(f"Max inbound streams is {self.local_max_concurrent_streams}", PROTOCOL_ERROR,
                                "streams")
            headers = self.decoder.decode(block)
            self.highest_inbound_stream_id = stream_id
            stream = _Stream(self.local_initial_window, self.remote_initial_window)
            self._add_stream(stream_id, stream)
            self._check_fields(headers, REQUEST)
            stream.headers_received = True
            stream.expected_length = _content_length(headers)
            if ended:
                stream.remote_open = False
                if stream.expected_length > 0:
                    raise WireError("request ended before its content-length")
                return [HeadersReceived(REQUEST, stream_id, headers, True), StreamEnded(stream_id)]
            return [HeadersReceived(REQUEST, stream_id, headers, False)]
        headers = self.decoder.decode(block)
        if not stream.remote_open:  # half-closed (remote): a stream error (§5.1), not a connection error
            return self._stream_closed_error(stream_id)
        if self.client_side and not stream.final_response:
            status = b""
            for name, value in headers:
                if name == b":status":
                    status = value
                    break
            kind = INFORMATIONAL if status[:1] == b"1" else RESPONSE
            self._check_fields(headers, kind)
            if kind == INFORMATIONAL:
                if ended:
                    raise WireError("informational response with END_STREAM")
                return [HeadersReceived(INFORMATIONAL, stream_id, headers, False)]
            stream.final_response = True
            stream.headers_received = True
            stream.expected_length = 0 if stream.method_head else _content_length(headers)
        else:
            kind = TRAILERS
            if not ended:
                raise WireError("trailers without END_STREAM")
            self._check_fields(headers, TRAILERS)
        if ended:
            if kind != TRAILERS and stream.expected_length > 0:
                raise WireError("response ended before its content-length")
            if kind == TRAILERS and stream.expected_length >= 0 and stream.received_length != stream.expected_length:
                raise WireError("body shorter than its content-length")
            self._remote_end(stream_id, stream)
            return [HeadersReceived(kind, stream_id, headers, True), StreamEnded(stream_id)]
        return [HeadersReceived(kind, stream_id, headers, False)]

    def _check_fields(self, headers: list[tuple[bytes, bytes]], kind: int) -> None:
        # The decoder hands back the same list for a repeated head (hpack.Decoder.decode), already judged.
        if headers is self._valid_headers and kind == self._valid_kind:
            return
        _validate(headers, kind)
        self._valid_headers, self._valid_kind = headers, kind

    def _push_promise(self, stream_id: int, promised: int, block: bytes) -> list[WireEvent]:
        # Judged once the block is whole, as h2 does. Push is disabled on the client side (SETTINGS_ENABLE_PUSH
        # 0) and a client may not push at all (RFC 9113 §8.4): always a connection error here.
        if not self.client_side or not self.enable_push:
            raise WireError("Received pushed stream")
        self.decoder.decode(block)
        return [PushedStreamReceived(promised)]

    def _rst_stream(self, stream_id: int, error_code: int) -> list[WireEvent]:
        stream = self.streams.get(stream_id)
        if stream is None:
            return []  # idle or already closed: nothing to do (h2 ignores it too)
        self._forget(stream_id, _BY_RESET_RECEIVED)
        return [StreamReset(stream_id, error_code)]

    def _apply_settings(self, payload: bytes) -> None:
        values: dict[int, int] = {}  # a setting repeated in one frame: the last value counts (as in h2)
        for i in range(0, len(payload) - len(payload) % 6, 6):
            values[int.from_bytes(payload[i : i + 2], "big")] = int.from_bytes(payload[i + 2 : i + 6], "big")
        for key, value in values.items():
            if key == SETTINGS_HEADER_TABLE_SIZE:
                self.encoder.header_table_size = value
            elif key == SETTINGS_ENABLE_PUSH:
                if value > 1 or (self.client_side and value):  # a server may not enable push (§6.5.2)
                    raise WireError(f"SETTINGS_ENABLE_PUSH {value}")
            elif key == SETTINGS_ENABLE_CONNECT_PROTOCOL:
                if value > 1:
                    raise WireError(f"SETTINGS_ENABLE_CONNECT_PROTOCOL {value}")
            elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                self.remote_max_concurrent_streams = value
            elif key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise WireError(f"SETTINGS_INITIAL_WINDOW_SIZE {value}", FLOW_CONTROL_ERROR, "flow")
                delta = value - self.remote_initial_window
                self.remote_initial_window = value
                for stream in self.streams.values():
                    stream.outbound_window += delta
                    if stream.outbound_window > MAX_WINDOW:
                        raise WireError("stream window over 2^31-1", FLOW_CONTROL_ERROR, "flow")
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= 16_777_215:
                    raise WireError(f"SETTINGS_MAX_FRAME_SIZE {value}")
                self.max_outbound_frame_size = value

    def _settings_acked(self) -> None:
        if self._pending_initial_window is None:
            return
        delta = self._pending_initial_window - self.local_initial_window
        self.local_initial_window = self._pending_initial_window
        self._pending_initial_window = None
        for stream in self.streams.values():
            stream.inbound_window += delta

    # --- flow control -------------------------------------------------------------------------------

    def _ack_connection(self, n: int) -> None:
        self._inbound_owed += n
        if self._inbound_owed >= self._inbound_max // 2 or (self.inbound_window + self._inbound_owed >= self._inbound_max \
                and self.inbound_window <= 0):
            increment, self._inbound_owed = self._inbound_owed, 0
            self.inbound_window += increment
            self._out.append(frame(WINDOW_UPDATE, 0, 0, increment.to_bytes(4, "big")))

    def acknowledge_received_data(self, n: int, stream_id: int) -> None:
        """`n` received bytes of `stream_id` were consumed: reopen the windows (WINDOW_UPDATE at half a window)."""
        if n <= 0:
            return
        self._ack_connection(n)
        stream = self.streams.get(stream_id)
        if stream is None or not stream.remote_open:
            return
        stream.inbound_owed += n
        if stream.inbound_owed >= self.local_initial_window // 2 or stream.inbound_window <= 0:
            increment, stream.inbound_owed = stream.inbound_owed, 0
            stream.inbound_window += increment
            self._out.append(frame(WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big")))

    # --- sending ------------------------------------------------------------------------------------

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False) -> None:
        """HEADERS (+ CONTINUATION) on a stream; the client side opens a new stream with it."""
        if self._closed_state:
            raise WireError("cannot send on a closed connection")
        stream = self.streams.get(stream_id)
        if stream is None:
            if not self.client_side or stream_id % 2 == 0 or stream_id <= self.highest_outbound_stream_id:
                raise WireError(f"cannot open stream {stream_id}")
            stream = _Stream(self.local_initial_window, self.remote_initial_window)
            self._add_stream(stream_id, stream)
            self.highest_outbound_stream_id = stream_id
            self._idle = False
            for name, value in headers:
                if name == b":method":
                    stream.method_head = value == b"HEAD"
                    break
        elif not stream.local_open:
            raise WireError(f"stream {stream_id} is closed for sending")
        fields = headers
        for name, _ in headers:
            if not name.islower() and name != name.lower():
                fields = [(n.lower(), v) for n, v in headers]
                break
        block = self.encoder.encode(fields)
        flags = END_STREAM if end_stream else 0
        size = self.max_outbound_frame_size
        if len(block) <= size:
            self._out.append(frame(HEADERS, flags | END_HEADERS, stream_id, block))
        else:
            self._out.append(frame(HEADERS, flags, stream_id, block[:size]))
            for start in range(size, len(block), size):
                last = start + size >= len(block)
                self._out.append(frame(CONTINUATION, END_HEADERS if last else 0, stream_id, block[start : start + size]))
        if end_stream:
            self._local_end(stream_id, stream)

    def _local_end(self, stream_id: int, stream: _Stream) -> None:
        stream.local_open = False
        if not stream.remote_open:
            self._forget(stream_id, _BY_END)

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """One DATA frame; the caller checked the windows (local_flow_control_window) and frame size."""
        if self._closed_state:
            raise WireError("cannot send on a closed connection")
        stream = self.streams.get(stream_id)
        if stream is None or not stream.local_open:
            raise WireError(f"stream {stream_id} is closed for sending")
        n = len(data)
        if n > min(self.outbound_window, stream.outbound_window):
            raise WireError("DATA over the peer's window", FLOW_CONTROL_ERROR, "flow")
        self.outbound_window -= n
        stream.outbound_window -= n
        self._out.append(frame(DATA, END_STREAM if end_stream else 0, stream_id, data))
        if end_stream:
            self._local_end(stream_id, stream)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        if self._closed_state:
            raise WireError("cannot send on a closed connection")
        if stream_id in self.streams:
            self._forget(stream_id, _BY_RESET_SENT)
        self._out.append(frame(RST_STREAM, 0, stream_id, error_code.to_bytes(4, "big")))

    def close_connection(self, error_code: int = NO_ERROR) -> None:
        """GOAWAY naming the highest stream the peer opened; nothing else is sent or accepted after it."""
        self._closed_state = True
        self._out.append(frame(GOAWAY, 0, 0, self.highest_inbound_stream_id.to_bytes(4, "big")
                               + error_code.to_bytes(4, "big")))


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    length = -1
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit():
                raise WireError(f"invalid content-length {value!r}")
            parsed = int(value)
            if length >= 0 and parsed != length:
                raise WireError("conflicting content-length fields")
            length = parsed
    return length


def _validate(headers: list[tuple[bytes, bytes]], kind: int) -> None:
    """h2's inbound header checks (RFC 9113 §8.2.1, §8.2.2, §8.3): any failure is a connection error."""
    pseudo: set[bytes] = set()
    regular_seen = False
    method = b""
    authority: bytes | None = None
    host: bytes | None = None
    good_names = _GOOD_NAMES
    good_values = _GOOD_VALUES
    for name, value in headers:
        if name not in good_names:
            if not name:
                raise WireError("empty header name")
            if _BAD_NAME.search(name) is not None:
                raise WireError(f"illegal character in header name {name!r}")
            if len(good_names) < _GOOD_NAMES_MAX:
                good_names.add(name)
        if value and value not in good_values:  # a regex search per field was half of this function's time
            if _BAD_VALUE.search(value) is not None:
                raise WireError(f"illegal character or surrounding whitespace in header value of {name!r}")
            if len(value) <= _GOOD_VALUE_LONGEST and len(good_values) < _GOOD_NAMES_MAX:
                good_values.add(value)
        if name[0] == 0x3A:
            if name in pseudo:
                raise WireError(f"duplicate pseudo-header {name!r}")
            pseudo.add(name)
            if regular_seen:
                raise WireError(f"pseudo-header {name!r} after a regular field")
            if name not in _PSEUDO:
                raise WireError(f"unknown pseudo-header {name!r}")
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value and kind == REQUEST:
                raise WireError("empty :path")
        else:
            regular_seen = True
            if name == b"te" and value.lower() != b"trailers":
                raise WireError(f"TE {value!r}")
            if name in _CONNECTION_HEADERS:
                raise WireError(f"connection-specific header {name!r}")
            if name == b"host" and kind == REQUEST:
                if host is not None:
                    raise WireError("multiple Host headers")
                host = value
    if kind == TRAILERS:
        if pseudo:
            raise WireError("pseudo-header in trailers")
        return
    if kind != REQUEST:
        if b":status" not in pseudo or pseudo & _REQUEST_ONLY:
            raise WireError("response pseudo-headers")
        return
    if b":method" not in pseudo or b":status" in pseudo:
        raise WireError("request pseudo-headers")
    connect = method == b"CONNECT"
    if connect and b":protocol" not in pseudo:
        if b":scheme" in pseudo or b":path" in pseudo:
            raise WireError("CONNECT with :scheme or :path")
    else:
        if b":scheme" not in pseudo or b":path" not in pseudo:
            raise WireError("request without :scheme or :path")
        if not connect and b":protocol" in pseudo:
            raise WireError(":protocol outside CONNECT")
    if authority is None and host is None:
        raise WireError("request without :authority or Host")
    if authority is not None and host is not None and authority != host:
        raise WireError("mismatched :authority and Host")
