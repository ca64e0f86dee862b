"""Typed events the parsers emit and the shared vocabulary (`Direction`, `Reason`).

Owns the types only: no parsing here. `policies/` imports this module (types only) to evaluate
requests, so it must stay free of heavy imports. Every event is a frozen, slotted, keyword-only
dataclass; "need more data" is an empty list, never an event.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

Headers = tuple[tuple[str, str], ...]
"""Header fields in wire order; names as received (compare case-insensitively), values stripped."""


class Direction(enum.Enum):
    CLIENT_TO_SERVER = "client_to_server"
    SERVER_TO_CLIENT = "server_to_client"


class Reason(enum.Enum):
    """Why a request was refused; each protocol maps every member to its own answer."""

    POLICY_DENIED = "policy_denied"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    UPSTREAM_FAILED = "upstream_failed"
    UPSTREAM_TIMEOUT = "upstream_timeout"


Event_co = TypeVar("Event_co", covariant=True)


class Parser(Protocol[Event_co]):
    """The contract every protocol's parser follows: one object per direction of one connection.

    * `feed(data)` takes the bytes that direction's peer sent and returns the events they complete,
      in order ([] = need more data); it raises only `ParseError` subclasses (parsers/errors.py).
    * `data_to_send()` returns the bytes the parser itself must write to that same peer now (HTTP/2's
      SETTINGS, WINDOW_UPDATE, refusals); b"" for protocols that never answer on their own (HTTP/1.1,
      DNS, Kafka: every byte they send comes from a `forward` or `refusal` the session asked for).
    * Each protocol has one `refusal(request, reason)` that builds (or, for HTTP/1.1 and HTTP/2, on
      the request parser, queues) the protocol's own answer to a request the proxy will not forward.
    """

    @property
    def direction(self) -> Direction: ...

    def feed(self, data: bytes) -> Sequence[Event_co]: ...

    def data_to_send(self) -> bytes: ...


# --- HTTP/1.1 and HTTP/2 -------------------------------------------------------------------------


# HttpRequest, HttpResponse and Data are made for every message: they carry their own __init__. A compiled
# (mypyc) dataclass keeps the dataclasses module's generated __init__, which is interpreted: 3-8x the cost
# of a compiled one (BENCHMARKS.md run 7), more for frozen ones (object.__setattr__ per field). So these are
# not frozen but have a generated __hash__ (unsafe_hash), as proxy/session.py's actions: treat them as
# immutable all the same. The __init__ must list every field with its default, keyword-only.


@dataclass(init=False, slots=True, unsafe_hash=True, kw_only=True)
class HttpRequest:
    """A request head. `target` is the request target as sent (origin form: path + '?' + query)."""

    method: str
    target: str
    path: str  # target without the query ('' never: origin form starts with '/'; '*' for OPTIONS *)
    query: str = ""  # after '?', without it; '' when absent
    host: str | None = None  # Host header (HTTP/1.1) or :authority (HTTP/2); None when absent
    headers: Headers = ()
    scheme: str | None = None  # :scheme for HTTP/2; None for HTTP/1.1
    http_version: str = "1.1"  # "1.0", "1.1" or "2"
    stream_id: int | None = None  # HTTP/2 stream; None for HTTP/1.x
    has_body: bool = False  # a body (Content-Length > 0, chunked, or HTTP/2 without END_STREAM) follows
    content_length: int | None = None
    keep_alive: bool = True

    def __init__(
        self, *, method: str, target: str, path: str, query: str = "", host: str | None = None, headers: Headers = (),
        scheme: str | None = None, http_version: str = "1.1", stream_id: int | None = None, has_body: bool = False,
        content_length: int | None = None, keep_alive: bool = True,
    ) -> None:
        self.method = method
        self.target = target
        self.path = path
        self.query = query
        self.host = host
        self.headers = headers
        self.scheme = scheme
        self.http_version = http_version
        self.stream_id = stream_id
        self.has_body = has_body
        self.content_length = content_length
        self.keep_alive = keep_alive


@dataclass(init=False, slots=True, unsafe_hash=True, kw_only=True)
class HttpResponse:
    """A response head (also each 1xx interim response)."""

    status: int
    reason: str = ""
    headers: Headers = ()
    http_version: str = "1.1"
    stream_id: int | None = None
    has_body: bool = False
    content_length: int | None = None
    keep_alive: bool = True

    def __init__(
        self, *, status: int, reason: str = "", headers: Headers = (), http_version: str = "1.1",
        stream_id: int | None = None, has_body: bool = False, content_length: int | None = None, keep_alive: bool = True,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.http_version = http_version
        self.stream_id = stream_id
        self.has_body = has_body
        self.content_length = content_length
        self.keep_alive = keep_alive


@dataclass(init=False, slots=True, unsafe_hash=True, kw_only=True)
class Data:
    """A piece of a message body, streamed as it arrives (never buffered whole)."""

    data: bytes
    stream_id: int | None = None

    def __init__(self, *, data: bytes, stream_id: int | None = None) -> None:
        self.data = data
        self.stream_id = stream_id


@dataclass(frozen=True, slots=True, kw_only=True)
class Trailers:
    headers: Headers
    stream_id: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfMessage:
    """The current message (request or response) on this direction/stream is complete."""

    stream_id: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionUpgraded:
    """After a 101 (or a 2xx to CONNECT) the connection is an opaque byte relay from here on.

    `protocol` is the Upgrade token (e.g. "websocket") or "CONNECT".
    """

    protocol: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamReset:
    """HTTP/2 RST_STREAM seen on a stream."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GrpcCall:
    """An HTTP/2 request whose content-type is application/grpc[+proto|+json]."""

    service: str  # "package.Service"
    method: str  # "Method"
    path: str  # "/package.Service/Method"
    authority: str | None = None
    headers: Headers = ()
    stream_id: int | None = None
    has_body: bool = True  # False when the HEADERS frame carried END_STREAM (no request messages follow)
    scheme: str | None = None  # :scheme as received


# --- DNS ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsQuery:
    """A DNS query. `name` is as sent (case kept); `normalized_name` is lower case with a trailing dot."""

    id: int
    name: str
    normalized_name: str
    qtype: int  # numeric RR type (1 = A, 28 = AAAA, ...)
    qclass: int = 1
    opcode: int = 0
    rd: bool = True
    cd: bool = False
    raw: bytes = field(default=b"", repr=False, compare=False)  # the message as received (no TCP length prefix)


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsResponse:
    """What toFQDNs needs from an answer: rcode, addresses, the CNAME chain and the minimum TTL."""

    id: int
    name: str
    normalized_name: str
    qtype: int
    rcode: int
    addresses: tuple[str, ...] = ()  # A and AAAA rdata, text form
    cnames: tuple[str, ...] = ()  # CNAME targets in answer order, normalised
    rrtypes: tuple[int, ...] = ()  # the TYPE of every answer record read, in answer order
    min_ttl: int | None = None  # None when no address/CNAME answers
    raw: bytes = field(default=b"", repr=False, compare=False)


# --- Kafka ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaRequest:
    """One framed Kafka request.

    `topics` lists every topic name the request names; `topic_ids` the topic UUIDs (hex) of
    versions that name topics by id only. `topics_known` is False when the request names topics
    that cannot be resolved to names here (ids only), so a topic rule cannot be decided.
    """

    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    topics: tuple[str, ...] = ()
    topic_ids: tuple[str, ...] = ()
    topics_known: bool = True
    size: int = 0  # frame size in bytes, without the 4-byte length prefix
    raw: bytes = field(default=b"", repr=False, compare=False)  # the whole frame, length prefix included
    expects_response: bool = True  # False only for Produce with acks=0: the broker never answers it


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaResponse:
    api_key: int
    api_version: int
    correlation_id: int
    size: int = 0
    raw: bytes = field(default=b"", repr=False, compare=False)  # the whole frame, length prefix included
