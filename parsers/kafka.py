"""Kafka wire protocol, sans-I/O: request framing and topics, response correlation, synthesised refusals.

Owns: the 4-byte size framing (a frame over `max_frame_bytes` is MessageTooLarge as soon as its
prefix is read, before any allocation), request headers v1/v2 (KIP-482 tagged fields), the topics
each request names for every api key/version in Kafka 4.1's message schemas (as shipped with
kafka-python), response matching by correlation id, and the bytes of a refusal. Never decides a
verdict, never touches sockets. Invariant: every exception leaving this module is a ParseError.

Rules / theory of operation
* Requests: `KafkaRequestParser.feed()` cuts frames, reads api key, version, correlation id and
  client id, then walks the body with a reader compiled from the schema (`_kafka_schema`), which
  must consume the body exactly. Topics: every `entityType: topicName` string, plus topic
  resources (type 2) of DescribeConfigs/AlterConfigs/IncrementalAlterConfigs/CreateAcls.
* What can and cannot be decided. `topics` is complete whenever `topics_known` is True.
  `topics_known` is False when (a) the request names a topic by a non-zero TopicId only (Fetch v13+,
  Produce v13+, Metadata v10+ by id, DeleteTopics v6+ by id, OffsetCommit/OffsetFetch v10+): ids
  are in `topic_ids`, the names are not on the wire; a proxy can only resolve them from Metadata
  responses it saw (`metadata_topic_ids`), or (b) the api key is unknown here (ConsumerGroupHeartbeat,
  ShareFetch, ... are not in the schema set), or (c) the version is outside the schema's valid
  range for an api key that names topics (versions Kafka 4 removed, or newer than 4.1). A topic
  rule cannot be decided then; api-key-only rules can. Metadata with a null or empty topic list
  asks for *all* topics: `topics == ()` and `topics_known` True.
* Responses: `KafkaResponseParser.expect()` is told, in order, every request forwarded upstream
  that expects an answer (not Produce acks=0); each response frame must carry the correlation id
  at the head of that queue, else ProtocolViolation (Kafka answers strictly in request order).
* Parser states: OPEN --frame--> OPEN; OPEN --ParseError--> ERROR; ERROR --any--> ProtocolViolation.
* A refusal answers the whole request (as Cilium does): a Metadata request naming an allowed and a
  denied topic gets 29 for both. Metadata refusals need the broker list (`brokers=`, learned with
  `metadata_brokers`): kafka-python and aiokafka drop a Metadata response without brokers.

Refusals (`refusal`): same api key, version and correlation id, error code 29
TOPIC_AUTHORIZATION_FAILED on every topic/partition the request named, encoded by kafka-python's
schema-driven encoder (flexible versions included). Kinds without per-topic errors get the closest
authorisation error that the client surfaces:

| api keys | error |
|---|---|
| topic-naming kinds (Produce, Fetch, ListOffsets, Metadata, OffsetCommit, OffsetFetch, CreateTopics, DeleteTopics, DeleteRecords, OffsetForLeaderEpoch, AddPartitionsToTxn, TxnOffsetCommit, DescribeProducers, DescribeTopicPartitions, CreatePartitions, OffsetDelete, AlterReplicaLogDirs) | 29 per topic/partition, top level 0 |
| DescribeConfigs, AlterConfigs, IncrementalAlterConfigs | 29 on topic resources, 31 on other resources |
| ElectLeaders, AlterPartitionReassignments, ListPartitionReassignments, WriteTxnMarkers, DescribeQuorum, CreateAcls, DescribeLogDirs | 31 CLUSTER_AUTHORIZATION_FAILED (top level), 29 per topic |
| FindCoordinator (group key), JoinGroup, Heartbeat, LeaveGroup, SyncGroup, DescribeGroups, DeleteGroups, OffsetFetch/OffsetCommit/OffsetDelete without topics | 30 GROUP_AUTHORIZATION_FAILED |
| FindCoordinator (transaction key), InitProducerId with a transactional id, AddOffsetsToTxn, EndTxn, DescribeTransactions | 53 TRANSACTIONAL_ID_AUTHORIZATION_FAILED |
| SaslHandshake | 33 UNSUPPORTED_SASL_MECHANISM; SaslAuthenticate: 58 SASL_AUTHENTICATION_FAILED |
| everything else (ApiVersions (answered as v0, which clients read on error), ListGroups, InitProducerId without transactional id, ACL/quota/SCRAM/cluster admin kinds) | 31 CLUSTER_AUTHORIZATION_FAILED |
| Produce with acks=0 | nothing: the client never reads an answer (`b""`) |
| unknown api key or version | no refusal possible (`None`): close the connection |
"""

from __future__ import annotations

import dataclasses
import struct
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, assert_never

from membrane.parsers._kafka_schema import Found as _Found
from membrane.parsers._kafka_schema import SchemaError, api_schemas, request_reader, skip_tagged
from membrane.parsers.errors import MalformedMessage, MessageTooLarge, ParseError, ProtocolViolation
from membrane.parsers.events import Direction, KafkaRequest, KafkaResponse, Parser, Reason

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "Broker",
    "KafkaRequestParser",
    "KafkaResponseParser",
    "kafka_error_code",
    "metadata_brokers",
    "metadata_topic_ids",
    "parse_request",
    "refusal",
    "resolve_topic_ids",
]

# Kafka's own default for socket.request.max.bytes (100 MiB): a broker refuses bigger requests too.
DEFAULT_MAX_FRAME_BYTES = 104_857_600


_HEAD = struct.Struct(">hhi")  # api key, api version, correlation id
_INT32 = struct.Struct(">i")
_INT16 = struct.Struct(">h")
_ZERO_UUID = "0" * 32
_PRODUCE, _METADATA, _API_VERSIONS, _CONTROLLED_SHUTDOWN = 0, 3, 18, 7

ERR_NONE = 0
ERR_REQUEST_TIMED_OUT = 7
ERR_MESSAGE_TOO_LARGE = 10
ERR_NETWORK_EXCEPTION = 13
ERR_TOPIC_AUTHORIZATION_FAILED = 29
ERR_GROUP_AUTHORIZATION_FAILED = 30
ERR_CLUSTER_AUTHORIZATION_FAILED = 31
ERR_UNSUPPORTED_SASL_MECHANISM = 33
ERR_INVALID_REQUEST = 42
ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53
ERR_SASL_AUTHENTICATION_FAILED = 58


def kafka_error_code(reason: Reason) -> int:
    """The Kafka error code a refusal for `reason` carries on each topic/partition.

    Returns: POLICY_DENIED -> 29 TOPIC_AUTHORIZATION_FAILED, MALFORMED -> 42 INVALID_REQUEST,
    TOO_LARGE -> 10 MESSAGE_TOO_LARGE, UPSTREAM_FAILED -> 13 NETWORK_EXCEPTION (retriable),
    UPSTREAM_TIMEOUT -> 7 REQUEST_TIMED_OUT (retriable).
    """
    match reason:
        case Reason.POLICY_DENIED:
            return ERR_TOPIC_AUTHORIZATION_FAILED
        case Reason.MALFORMED:
            return ERR_INVALID_REQUEST
        case Reason.TOO_LARGE:
            return ERR_MESSAGE_TOO_LARGE
        case Reason.UPSTREAM_FAILED:
            return ERR_NETWORK_EXCEPTION
        case Reason.UPSTREAM_TIMEOUT:
            return ERR_REQUEST_TIMED_OUT
        case _:
            assert_never(reason)


# --- framing --------------------------------------------------------------------------------------


class _Framer:
    """Cuts a byte stream into size-prefixed frames; never holds more than one frame plus 4 bytes."""

    __slots__ = ("_buf", "_direction", "_failed", "_max", "_offset")

    def __init__(self, direction: Direction, max_frame_bytes: int) -> None:
        self._buf = bytearray()
        self._direction = direction
        self._max = max_frame_bytes
        self._offset = 0  # stream offset of _buf[0], for error messages
        self._failed = False

    def add(self, data: bytes) -> None:
        if self._failed:
            raise ProtocolViolation("stream already failed to parse", direction=self._direction, offset=self._offset)
        self._buf += data

    def next(self) -> bytes | None:
        """The next whole frame, or None until more data arrives. Frames are cut one at a time so a bad
        frame fails before the prefix of the next one is even looked at, however the input was split."""
        buf = self._buf
        if len(buf) < 4:
            return None
        size = _INT32.unpack_from(buf, 0)[0]
        if size < 0:
            self._failed = True
            raise MalformedMessage(f"negative frame size {size}", direction=self._direction, offset=self._offset)
        if size > self._max:
            self._failed = True
            raise MessageTooLarge(f"frame of {size} bytes exceeds the {self._max}-byte limit",
                                  direction=self._direction, offset=self._offset)
        if len(buf) < 4 + size:
            return None
        frame = bytes(buf[: 4 + size])
        del buf[: 4 + size]
        self._offset += 4 + size
        return frame

    def fail(self) -> None:
        self._failed = True

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def buffered(self) -> int:
        return len(self._buf)


# --- requests -------------------------------------------------------------------------------------


def parse_request(frame: bytes, *, offset: int | None = None) -> KafkaRequest:
    """Read one whole request frame (4-byte size prefix included).

    Returns: the KafkaRequest, `raw` being `frame`.
    Raises: MalformedMessage when the frame is shorter than its header, its size prefix disagrees
    with its length, or its body does not follow the schema of its api key and version (the
    caller refuses the connection: a broker would close it too).
    """
    d = Direction.CLIENT_TO_SERVER
    try:
        if len(frame) < 4 or _INT32.unpack_from(frame, 0)[0] != len(frame) - 4:
            raise MalformedMessage("frame size prefix does not match its length", direction=d, offset=offset)
        if len(frame) < 4 + 8:
            raise MalformedMessage("request shorter than its header", direction=d, offset=offset)
        api_key, version, correlation_id = _HEAD.unpack_from(frame, 4)
        if api_key < 0 or version < 0:
            raise MalformedMessage(f"negative api key {api_key} or version {version}", direction=d, offset=offset)
        pos = 12
        client_id: str | None = None
        if not (api_key == _CONTROLLED_SHUTDOWN and version == 0):  # header v0 has no client id
            if len(frame) < pos + 2:
                raise MalformedMessage("truncated client id", direction=d, offset=offset)
            n = _INT16.unpack_from(frame, pos)[0]
            pos += 2
            if n >= 0:
                if pos + n > len(frame):
                    raise MalformedMessage("truncated client id", direction=d, offset=offset)
                client_id = frame[pos : pos + n].decode("utf-8", errors="replace")
                pos += n
            elif n != -1:
                raise MalformedMessage("negative client id length", direction=d, offset=offset)
        size = len(frame) - 4
        schema = api_schemas().get(api_key)
        reader = request_reader(api_key, version)
        if schema is None or reader is None:
            # Unknown kind or version: framed and reported, topics undecidable unless the kind never names any.
            # Produce v0-2 (removed in Kafka 4) start with Acks: read it, or an acks=0 request would leave
            # the response tracker waiting for an answer that never comes.
            acks0 = api_key == _PRODUCE and version <= 2 and frame[pos : pos + 2] == b"\x00\x00"
            return KafkaRequest(api_key=api_key, api_version=version, correlation_id=correlation_id,
                                client_id=client_id, topics_known=schema is not None and not schema.names_topics,
                                size=size, raw=frame, expects_response=not acks0)
        found = _Found()
        if schema.is_flexible(version):  # request header v2: tagged fields after the client id
            pos = skip_tagged(frame, pos)
        pos = reader(frame, pos, found)  # positions are frame offsets: no copy of the body
        if pos != len(frame):
            raise MalformedMessage(f"{len(frame) - pos} bytes after the request body", direction=d, offset=offset)
    except SchemaError as e:
        raise MalformedMessage(f"api key {api_key} v{version}: {e}", direction=d, offset=offset) from e
    except (struct.error, IndexError, ValueError) as err:  # belt and braces: the readers check bounds
        # (its own name: compiled with mypyc, one name bound by two except clauses keeps the first one's type)
        raise MalformedMessage(f"unreadable request: {err}", direction=d, offset=offset) from err
    ids = tuple(dict.fromkeys(i for i in found.topic_ids if i != _ZERO_UUID))
    return KafkaRequest(
        api_key=api_key,
        api_version=version,
        correlation_id=correlation_id,
        client_id=client_id,
        topics=tuple(dict.fromkeys(found.topics)),
        topic_ids=ids,
        topics_known=not ids,
        size=size,
        raw=frame,
        expects_response=not (api_key == _PRODUCE and found.acks == 0),
    )


class KafkaRequestParser:
    """Client-to-server byte stream -> KafkaRequest events, one per frame, in order (the parser contract).

    Kafka's two directions read different events, so each has its class; the response parser learns
    which responses are due from `expect()`, called for each request forwarded upstream.
    """

    direction: ClassVar[Direction] = Direction.CLIENT_TO_SERVER

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._framer = _Framer(Direction.CLIENT_TO_SERVER, max_frame_bytes)

    def data_to_send(self) -> bytes:
        """Always b"": Kafka never answers on its own (refusals come from `refusal`)."""
        return b""

    def feed(self, data: bytes) -> list[KafkaRequest]:
        """Bytes in, every request completed by them out ([] = need more data).

        Raises: MessageTooLarge (a size prefix over the limit: close, counting it), MalformedMessage
        (unreadable request: close), ProtocolViolation (fed again after an error). The error's
        `events_before` holds the requests completed by this call before the bad frame: judge and
        answer them first, then close.
        """
        self._framer.add(data)
        out: list[KafkaRequest] = []
        try:
            while (frame := self._framer.next()) is not None:
                out.append(parse_request(frame, offset=self._framer.offset - len(frame)))
        except ParseError as e:
            self._framer.fail()
            e.events_before = tuple(out)  # requests before the bad frame still get their answers
            raise
        return out

    @property
    def buffered_bytes(self) -> int:
        return self._framer.buffered


# --- responses ------------------------------------------------------------------------------------


class KafkaResponseParser:
    """Server-to-client byte stream -> KafkaResponse events, matched to the requests sent, in order."""

    direction: ClassVar[Direction] = Direction.SERVER_TO_CLIENT

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._framer = _Framer(Direction.SERVER_TO_CLIENT, max_frame_bytes)
        self._pending: deque[tuple[int, int, int]] = deque()

    def data_to_send(self) -> bytes:
        """Always b"": Kafka never answers on its own."""
        return b""

    def expect(self, request: KafkaRequest) -> None:
        """Record a request forwarded upstream. Requests that get no answer (Produce acks=0) are ignored."""
        if request.expects_response:
            self._pending.append((request.correlation_id, request.api_key, request.api_version))

    @property
    def pending(self) -> int:
        """How many forwarded requests still wait for their response."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[KafkaResponse]:
        """Bytes in, responses out ([] = need more data).

        Raises: ProtocolViolation for a response whose correlation id is not the oldest outstanding
        request's (or with none outstanding); MessageTooLarge / MalformedMessage for bad framing.
        The connection is unusable after any of them: send the responses in the error's
        `events_before` to the client, then close.
        """
        out: list[KafkaResponse] = []
        self._framer.add(data)
        try:
            self._cut(out)
        except ParseError as e:
            e.events_before = tuple(out)  # responses before the bad frame still go to the client
            raise
        return out

    def _cut(self, out: list[KafkaResponse]) -> None:
        d = Direction.SERVER_TO_CLIENT
        while (frame := self._framer.next()) is not None:
            if len(frame) < 8:
                self._framer.fail()
                raise MalformedMessage("response shorter than its correlation id", direction=d,
                                       offset=self._framer.offset - len(frame))
            correlation_id = _INT32.unpack_from(frame, 4)[0]
            if not self._pending:
                self._framer.fail()
                raise ProtocolViolation(f"response {correlation_id} with no request outstanding", direction=d,
                                        offset=self._framer.offset - len(frame))
            expected, api_key, version = self._pending[0]
            if correlation_id != expected:
                self._framer.fail()
                raise ProtocolViolation(f"response {correlation_id} where {expected} was due", direction=d,
                                        offset=self._framer.offset - len(frame))
            self._pending.popleft()
            out.append(KafkaResponse(api_key=api_key, api_version=version, correlation_id=correlation_id,
                                     size=len(frame) - 4, raw=frame))


# --- refusals -------------------------------------------------------------------------------------

# Kinds whose top-level error is an authorisation error of their own even when topics are named.
_TOP_LEVEL_ERROR: dict[int, int] = {
    27: ERR_CLUSTER_AUTHORIZATION_FAILED,  # WriteTxnMarkers
    30: ERR_CLUSTER_AUTHORIZATION_FAILED,  # CreateAcls
    35: ERR_CLUSTER_AUTHORIZATION_FAILED,  # DescribeLogDirs (its results are per log dir, not per topic asked)
    43: ERR_CLUSTER_AUTHORIZATION_FAILED,  # ElectLeaders
    45: ERR_CLUSTER_AUTHORIZATION_FAILED,  # AlterPartitionReassignments
    46: ERR_CLUSTER_AUTHORIZATION_FAILED,  # ListPartitionReassignments
    55: ERR_CLUSTER_AUTHORIZATION_FAILED,  # DescribeQuorum
}
_GROUP_KINDS = {8, 9, 11, 12, 13, 14, 15, 42, 47}
_TXN_KINDS = {25, 26, 65}
_PARTITION_NAMES = ("partition_index", "partition", "index", "partition_id")
_KEY_STRING_NAMES = ("name", "topic", "group_id", "key", "transactional_id", "resource_name")


def _fallback_error(api_key: int, decoded: Any) -> int:
    """The authorisation error of a kind that has no per-topic error (see the module table)."""
    if api_key == 10:  # FindCoordinator: KeyType 0 = group, 1 = transaction
        return ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED if getattr(decoded, "key_type", 0) == 1 \
            else ERR_GROUP_AUTHORIZATION_FAILED
    if api_key == 22:  # InitProducerId
        return ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED if getattr(decoded, "transactional_id", None) \
            else ERR_CLUSTER_AUTHORIZATION_FAILED
    if api_key in _GROUP_KINDS:
        return ERR_GROUP_AUTHORIZATION_FAILED
    if api_key in _TXN_KINDS:
        return ERR_TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    if api_key == 17:
        return ERR_UNSUPPORTED_SASL_MECHANISM
    if api_key == 36:
        return ERR_SASL_AUTHENTICATION_FAILED
    return ERR_CLUSTER_AUTHORIZATION_FAILED


def _message_classes() -> tuple[dict[int, Any], dict[int, Any]]:
    import kafka.protocol.admin
    import kafka.protocol.consumer
    import kafka.protocol.metadata
    import kafka.protocol.producer  # noqa: F401  (registers the classes)
    from kafka.protocol.api_message import ApiMessage

    requests: dict[int, Any] = {}
    responses: dict[int, Any] = {}
    todo = list(ApiMessage.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls._class_version is not None:
            continue
        (requests if cls.is_request() else responses)[cls.API_KEY] = cls
    return requests, responses


_CLASSES: tuple[dict[int, Any], dict[int, Any]] | None = None


def message_classes() -> tuple[dict[int, Any], dict[int, Any]]:
    """kafka-python's request and response classes by api key (loaded on first use: off the hot path)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _message_classes()
    return _CLASSES


def _is_error_field(name: str, field: Any) -> bool:
    return field.type_str == "int16" and (name == "error_code" or name.endswith("_error_code"))


def _identity_names(struct_field: Any, version: int) -> list[str]:
    """Fields of a response element that say which request element it answers."""
    out = []
    for name, f in struct_field.fields.items():
        if not f.for_version_q(version) or f.is_struct() or f.is_struct_array() or f.is_array():
            continue
        json = f._json
        if (json.get("entityType") in ("topicName", "groupId", "transactionalId") or name in _PARTITION_NAMES
                or name in ("topic_id", "resource_name", "resource_type", "key")):
            out.append(name)
    return out


def _score(identity: list[str], item: Any) -> int:
    if isinstance(item, dict):
        score = sum(1 for n in identity if n in item)
        if any(n in _PARTITION_NAMES for n in identity) and any(n in _PARTITION_NAMES for n in item):
            score += 1
        return score
    if isinstance(item, bool):
        return 0
    if isinstance(item, int):
        return 1 if any(n in _PARTITION_NAMES for n in identity) else 0
    if isinstance(item, str):
        return 1 if any(n in _KEY_STRING_NAMES for n in identity) else 0
    return 0


def _pair(resp_field: Any, version: int, req: dict[str, Any] | None, used: set[str]) -> list[Any]:
    """The request array that a response array answers, element by element ([] when none)."""
    if req is None:
        return []
    identity = _identity_names(resp_field, version)
    if not identity:
        return []
    best: tuple[int, str] | None = None
    for name, value in req.items():
        if name in used or not isinstance(value, list) or not value:
            continue
        score = _score(identity, value[0])
        if score and (best is None or score > best[0]):
            best = (score, name)
    if best is None:
        return []
    used.add(best[1])
    return list(req[best[1]])


def _is_topicish(struct_field: Any, version: int, item: Any) -> bool:
    for name, f in struct_field.fields.items():
        if not f.for_version_q(version):
            continue
        if f._json.get("entityType") == "topicName" or name == "topic_id":
            return True
    return isinstance(item, dict) and item.get("resource_type") == 2


def _build(struct_field: Any, version: int, item: Any, errors: tuple[int, int], in_topic: bool) -> dict[str, Any]:
    """Response struct values mirroring request element `item`; errors = (per-topic, elsewhere)."""
    topic_error, other_error = errors
    vals: dict[str, Any] = {}
    used: set[str] = set()
    req = item if isinstance(item, dict) else None
    for name, f in struct_field.fields.items():
        if not f.for_version_q(version):
            continue
        if f.is_struct_array():
            children = _pair(f, version, req, used)
            elems = []
            for child in children:
                child_topic = in_topic or _is_topicish(f, version, child)
                values = _build(f, version, child, errors, child_topic)
                elems.append(f.data_class(version=version, **values))
            vals[name] = elems
        elif f.is_struct():
            if f._json.get("nullableVersions") and f.for_version_q(version):
                nullable = f._nullable_versions
                if nullable and nullable[0] <= version <= nullable[1]:
                    vals[name] = None
                    continue
            values = _build(f, version, req.get(name) if req else None, errors, in_topic)
            vals[name] = f.data_class(version=version, **values)
        elif _is_error_field(name, f):
            if in_topic:
                vals[name] = topic_error
            elif isinstance(item, dict) and "resource_type" in item:
                vals[name] = other_error if other_error else ERR_CLUSTER_AUTHORIZATION_FAILED
            else:
                vals[name] = other_error
        elif req is not None and name in req and not f.is_array():
            vals[name] = req[name]
        elif req is not None and name in _PARTITION_NAMES and not f.is_array():
            for alias in _PARTITION_NAMES:
                if alias in req:
                    vals[name] = req[alias]
                    break
        elif isinstance(item, bool):
            pass
        elif isinstance(item, int) and name in _PARTITION_NAMES and not f.is_array():
            vals[name] = item
        elif isinstance(item, str) and name in _KEY_STRING_NAMES and f.type_str == "string":
            vals[name] = item
            item = None  # only the first identity string takes the value
    return vals


def _carries(struct_field: Any, version: int, values: dict[str, Any], code: int) -> bool:
    """Whether any error field in the built response carries `code`."""
    for name, f in struct_field.fields.items():
        if name not in values:
            continue
        v = values[name]
        if f.is_struct_array() and v:
            if any(_carries(f, version, _as_dict(f, item), code) for item in v):
                return True
        elif f.is_struct() and v is not None:
            if _carries(f, version, _as_dict(f, v), code):
                return True
        elif _is_error_field(name, f) and v == code:
            return True
    return False


def _as_dict(struct_field: Any, obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in struct_field.fields}


Broker = tuple[int, str, int, "str | None"]
"""A broker as Metadata lists it: node id, host, port, rack."""


def refusal(request: KafkaRequest, reason: Reason, *, brokers: Sequence[Broker] = ()) -> bytes | None:
    """The response frame (size prefix included) a broker would send to refuse `request` for `reason`.

    `brokers` (learned from an earlier Metadata response with `metadata_brokers`) go into a Metadata
    refusal: kafka-python and aiokafka ignore a Metadata response without brokers, so without them a
    denied Metadata request makes those clients wait for their metadata timeout instead of raising
    TopicAuthorizationFailedError. librdkafka surfaces the error either way.

    Returns: the frame; b"" for a request the broker never answers (Produce acks=0: send nothing);
    None when no refusal can be encoded (unknown api key or version, or a body kafka-python cannot
    decode): the caller closes the connection instead.
    Raises: nothing.
    """
    if not request.expects_response:
        return b""
    requests, responses = message_classes()
    req_cls = requests.get(request.api_key)
    resp_cls = responses.get(request.api_key)
    schema = api_schemas().get(request.api_key)
    if req_cls is None or resp_cls is None or schema is None:
        return None
    version = request.api_version
    if not schema.min_version <= version <= schema.max_version or version > resp_cls.max_version:
        return None
    try:
        decoded = req_cls.decode(request.raw, version=version, header=True, framed=True)
        req_dict = decoded.to_dict(json=False)
    except Exception:
        return None
    per_topic = kafka_error_code(reason)
    if reason is Reason.POLICY_DENIED:
        names_topics = bool(request.topics or request.topic_ids)
        if request.api_key in _TOP_LEVEL_ERROR:
            other = _TOP_LEVEL_ERROR[request.api_key]
        elif names_topics and schema.names_topics:
            other = ERR_NONE
        else:
            other = _fallback_error(request.api_key, decoded)
    else:
        other = per_topic
    if request.api_key == _API_VERSIONS:
        # Clients read an ApiVersions response that carries an error as v0 (KIP-511; kafka-python does so
        # unconditionally), so the refusal is a v0 body whatever version was asked.
        version = 0
    try:
        values = _build(resp_cls._struct, version, req_dict, (per_topic, other), in_topic=False)
        if other == ERR_NONE and not _carries(resp_cls._struct, version, values, per_topic):
            # Topics named only where the response has no place for them (e.g. Fetch forgotten topics):
            # put the error at the top level rather than answer with a silent success.
            values = _build(resp_cls._struct, version, req_dict, (per_topic, per_topic), in_topic=False)
        if request.api_key == _METADATA and brokers:
            broker_cls = resp_cls._struct.fields["brokers"].data_class
            values["brokers"] = [broker_cls(version=version, node_id=b[0], host=b[1], port=b[2], rack=b[3])
                                 for b in brokers]
            if "controller_id" in values or version >= 1:
                values["controller_id"] = brokers[0][0]
        response = resp_cls(version=version, **values)
        response.with_header(correlation_id=request.correlation_id)
        return bytes(response.encode(header=True, framed=True))
    except Exception:
        return None


def resolve_topic_ids(request: KafkaRequest, names_by_id: dict[str, str]) -> KafkaRequest:
    """`request` with the topic ids it names translated through `names_by_id` (learned by `metadata_topic_ids`).

    Returns: a copy whose `topics` gain the resolved names and whose `topics_known` is True only if every
    id resolved (unresolved ids stay in `topic_ids`); `request` itself when it names no ids.
    Raises: nothing.
    """
    if not request.topic_ids:
        return request
    resolved = [names_by_id[i] for i in request.topic_ids if i in names_by_id]
    left = tuple(i for i in request.topic_ids if i not in names_by_id)
    return dataclasses.replace(request, topics=tuple(dict.fromkeys((*request.topics, *resolved))), topic_ids=left,
                               topics_known=not left)


def metadata_brokers(response: KafkaResponse) -> tuple[Broker, ...]:
    """The brokers a Metadata response lists, for later Metadata refusals (see `refusal`).

    Returns: () for other kinds or an undecodable body. Raises: nothing.
    """
    if response.api_key != _METADATA:
        return ()
    _, responses = message_classes()
    try:
        decoded = responses[_METADATA].decode(response.raw, version=response.api_version, header=True, framed=True)
        return tuple((int(b.node_id), str(b.host), int(b.port), getattr(b, "rack", None)) for b in decoded.brokers)
    except Exception:
        return ()


def metadata_topic_ids(response: KafkaResponse) -> dict[str, str]:
    """Topic id (hex) -> name from a Metadata response (v10+ carry both), for resolving `topic_ids`.

    Returns: {} for other kinds, older versions, or an undecodable body (nothing learned).
    Raises: nothing.
    """
    if response.api_key != 3 or response.api_version < 10:
        return {}
    _, responses = message_classes()
    try:
        decoded = responses[3].decode(response.raw, version=response.api_version, header=True, framed=True)
        out = {}
        for t in decoded.topics:
            if t.name and t.topic_id is not None:
                hexid = t.topic_id.hex if hasattr(t.topic_id, "hex") else str(t.topic_id)
                if hexid != _ZERO_UUID:
                    out[hexid] = t.name
        return out
    except Exception:
        return {}


if TYPE_CHECKING:  # mypy proves the parser contract (events.Parser) holds

    def _requests_contract(parser: KafkaRequestParser) -> Parser[KafkaRequest]:
        return parser

    def _responses_contract(parser: KafkaResponseParser) -> Parser[KafkaResponse]:
        return parser
