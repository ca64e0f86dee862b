"""gRPC over HTTP/2: content types, `:path` splitting, the 5-byte message framing, statuses and refusals.

Owns the gRPC wire rules that sit on top of HTTP/2 (PROTOCOL-HTTP2.md of grpc/grpc); never HTTP/2
framing itself (parsers/http2.py) nor policy. Raises only `ParseError` subclasses. The framing
reader never buffers a message payload: memory per stream is the 5-byte prefix at most.

Theory of operation: `GrpcParser` is a two-state machine, `_State.PREFIX` (collecting the
5-byte prefix) and `_State.PAYLOAD` (skipping `length` bytes); a prefix whose flag byte is not 0/1
moves it to `_State.ERROR` (MalformedMessage) and one whose length is over the limit raises
MessageTooLarge. `end()` in `_State.PAYLOAD`, or with a partial prefix, is a truncated message.

Reason -> grpc-status (`grpc_status`), the choices made here:
  POLICY_DENIED    -> 7  PERMISSION_DENIED  (what the issue, Cilium and Envoy's RBAC filter answer)
  MALFORMED        -> 13 INTERNAL           (gRPC's own HTTP->gRPC mapping turns HTTP 400 into INTERNAL,
                                             and grpc-core reports protocol/framing errors as INTERNAL;
                                             INVALID_ARGUMENT is for the application's own argument checks)
  TOO_LARGE        -> 8  RESOURCE_EXHAUSTED (what grpc itself returns for a message over the receive limit)
  UPSTREAM_FAILED  -> 14 UNAVAILABLE        (HTTP 502/503 map to UNAVAILABLE; clients may retry it)
  UPSTREAM_TIMEOUT -> 4  DEADLINE_EXCEEDED  (HTTP 504 analogue)
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, assert_never

from membrane.parsers.errors import MalformedMessage, MessageTooLarge
from membrane.parsers.events import Direction, Headers, Parser, Reason

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "GrpcMessage",
    "GrpcParser",
    "GrpcStatus",
    "grpc_status",
    "is_grpc_content_type",
    "percent_decode_message",
    "percent_encode_message",
    "split_path",
    "status_trailers",
]

# 4 MiB: grpc's default max receive message size (GRPC_DEFAULT_MAX_RECV_MESSAGE_LENGTH).
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_PREFIX_BYTES = 5

# PROTOCOL-HTTP2.md: Content-Type -> "application/grpc" [("+proto" / "+json" / {custom})].
# Custom suffixes are accepted too (they are still gRPC calls, and must get gRPC refusals).
_CONTENT_TYPE = re.compile(r"application/grpc(?:\+[A-Za-z0-9!#$&^_.-]+)?", re.IGNORECASE)
# Service names are IDL identifiers joined by dots (protobuf: package.Service); methods identifiers.
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_PATH = re.compile(rf"/({_IDENT}(?:\.{_IDENT})*)/({_IDENT})")
_PERCENT_TRIPLET = re.compile(rb"%([0-9A-Fa-f]{2})")


class GrpcStatus(enum.IntEnum):
    """The canonical status codes (grpc/grpc doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def grpc_status(reason: Reason) -> GrpcStatus:
    """The grpc-status a refusal for `reason` carries (choices documented in the module docstring)."""
    match reason:
        case Reason.POLICY_DENIED:
            return GrpcStatus.PERMISSION_DENIED
        case Reason.MALFORMED:
            return GrpcStatus.INTERNAL
        case Reason.TOO_LARGE:
            return GrpcStatus.RESOURCE_EXHAUSTED
        case Reason.UPSTREAM_FAILED:
            return GrpcStatus.UNAVAILABLE
        case Reason.UPSTREAM_TIMEOUT:
            return GrpcStatus.DEADLINE_EXCEEDED
        case _:
            assert_never(reason)


_DEFAULT_MESSAGES: dict[Reason, str] = {
    Reason.POLICY_DENIED: "Access denied",
    Reason.MALFORMED: "Malformed request",
    Reason.TOO_LARGE: "Message too large",
    Reason.UPSTREAM_FAILED: "Upstream unavailable",
    Reason.UPSTREAM_TIMEOUT: "Upstream timed out",
}


def is_grpc_content_type(value: str | None) -> bool:
    """True for `application/grpc`, `application/grpc+proto`, `+json` (or another `+suffix`), any case.

    Media-type parameters (`; charset=...`) are ignored. `application/grpc-web*` is not gRPC over
    HTTP/2 and returns False.
    """
    if value is None:
        return False
    return _CONTENT_TYPE.fullmatch(value.partition(";")[0].strip()) is not None


def split_path(path: str, *, direction: Direction = Direction.CLIENT_TO_SERVER) -> tuple[str, str]:
    """Split a gRPC `:path` `/package.Service/Method` into `("package.Service", "Method")`.

    Raises:
        MalformedMessage: the path is not exactly `/` service `/` method with identifier characters
            (a query, empty segments, extra segments, percent-escapes). Refuse the call (INTERNAL).
    """
    match = _PATH.fullmatch(path)
    if match is None:
        raise MalformedMessage(f"gRPC path {path[:80]!r} is not /package.Service/Method", direction=direction)
    return match.group(1), match.group(2)


def percent_encode_message(text: str) -> str:
    """Percent-encode a grpc-message value as PROTOCOL-HTTP2.md requires.

    The UTF-8 bytes 0x20-0x7E except '%' stay as they are; every other byte becomes `%XX` (upper case).
    """
    out: list[str] = []
    for byte in text.encode("utf-8", "surrogatepass"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def percent_decode_message(value: str) -> str:
    """Decode a grpc-message value; malformed escapes are kept verbatim, as the spec tells receivers to."""
    raw = value.encode("latin-1", "replace")
    return _PERCENT_TRIPLET.sub(lambda m: bytes([int(m.group(1), 16)]), raw).decode("utf-8", "replace")


def status_trailers(reason: Reason, message: str | None = None) -> Headers:
    """The header block that ends a gRPC call with the status for `reason`: trailers-only when sent with
    END_STREAM and no DATA (how `Http2ServerSide.refusal` refuses a `GrpcCall`); its last two fields
    alone are the trailers of a call whose response already started.

    `:status 200`, `content-type: application/grpc`, `grpc-status` from `grpc_status(reason)`,
    `grpc-message` (percent-encoded) defaulting to "Access denied" for POLICY_DENIED.
    """
    text = message if message is not None else _DEFAULT_MESSAGES[reason]
    return (
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", str(int(grpc_status(reason)))),
        ("grpc-message", percent_encode_message(text)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class GrpcMessage:
    """One length-prefixed message was fully seen: its compressed flag and payload length in bytes."""

    compressed: bool
    length: int


class _State(enum.Enum):
    PREFIX = "prefix"
    PAYLOAD = "payload"
    ERROR = "error"


class GrpcParser:
    """Incremental reader of the gRPC Length-Prefixed-Message framing of one direction of one stream.

    Counts messages and their sizes without buffering payloads. `max_message_bytes` bounds one
    message (default 4 MiB, grpc's own default).
    """

    def __init__(
        self,
        direction: Direction = Direction.CLIENT_TO_SERVER,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.direction = direction
        self.max_message_bytes = max_message_bytes
        self.messages = 0  # complete messages seen
        self.payload_bytes = 0  # payload bytes of complete messages
        self._state = _State.PREFIX
        self._prefix = bytearray()
        self._remaining = 0
        self._current: GrpcMessage | None = None
        self._offset = 0

    def data_to_send(self) -> bytes:
        """Always b"": gRPC framing never answers on its own (HTTP/2 carries every reply)."""
        return b""

    def feed(self, data: bytes) -> list[GrpcMessage]:
        """Consume a piece of the stream's DATA; returns the messages completed by it.

        Raises:
            MalformedMessage: a flag byte other than 0 or 1 (the stream is not gRPC-framed); refuse
                the call with INTERNAL. The reader stays in error.
            MessageTooLarge: a message longer than `max_message_bytes`; refuse with RESOURCE_EXHAUSTED.
        """
        if self._state is _State.ERROR:
            raise MalformedMessage("gRPC message reader used after an error", direction=self.direction)
        out: list[GrpcMessage] = []
        view = memoryview(data)
        pos = 0
        size = len(view)
        while pos < size:
            if self._state is _State.PREFIX:
                take = min(_PREFIX_BYTES - len(self._prefix), size - pos)
                self._prefix += view[pos : pos + take]
                pos += take
                if len(self._prefix) < _PREFIX_BYTES:
                    break
                self._start_message(out, self._offset + pos - _PREFIX_BYTES)
            else:
                take = min(self._remaining, size - pos)
                self._remaining -= take
                pos += take
                if self._remaining == 0:
                    self._finish_message(out)
        self._offset += size
        return out

    def _start_message(self, out: list[GrpcMessage], offset: int) -> None:
        flag = self._prefix[0]
        length = int.from_bytes(self._prefix[1:5], "big")
        self._prefix.clear()
        if flag not in (0, 1):
            self._state = _State.ERROR
            raise MalformedMessage(f"gRPC compressed-flag byte is {flag}, not 0 or 1", direction=self.direction,
                                   offset=offset)
        if length > self.max_message_bytes:
            self._state = _State.ERROR
            raise MessageTooLarge(f"gRPC message of {length} bytes exceeds the limit of {self.max_message_bytes}",
                                  direction=self.direction, offset=offset)
        self._current = GrpcMessage(compressed=flag == 1, length=length)
        self._remaining = length
        self._state = _State.PAYLOAD
        if length == 0:
            self._finish_message(out)

    def _finish_message(self, out: list[GrpcMessage]) -> None:
        assert self._current is not None
        out.append(self._current)
        self.messages += 1
        self.payload_bytes += self._current.length
        self._current = None
        self._state = _State.PREFIX

    def end(self) -> None:
        """The stream's DATA ended (END_STREAM).

        Raises:
            MalformedMessage: a message was cut short (truncated prefix or payload); refuse with INTERNAL.
        """
        if self._state is _State.PAYLOAD or self._prefix:
            self._state = _State.ERROR
            raise MalformedMessage("gRPC stream ended inside a message", direction=self.direction)


if TYPE_CHECKING:  # mypy proves the parser contract (events.Parser) holds

    def _contract(parser: GrpcParser) -> Parser[GrpcMessage]:
        return parser
