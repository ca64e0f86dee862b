"""Kafka parser: framing, request headers and topics at every version, correlation, refusals.

Case table
| what | input | expected |
|---|---|---|
| captures | requests kafka-python, aiokafka and kcat sent to the test broker | api key, version, topics as recorded |
| round trip | any request kafka-python encodes, every api key and version | the topics that were put in |
| framing | split anywhere, trailing bytes, size over the limit, negative size | same events / MessageTooLarge / Malformed |
| unknown | api key 9999, versions outside the schema range | framed, reported, topics_known per kind |
| responses | in order, out of order, none outstanding, acks=0 | events / ProtocolViolation |
| refusals | every api key and version | decodable response, same correlation id, error 29 per topic |
"""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from membrane.parsers._kafka_schema import (
    Found,
    SchemaError,
    api_schemas,
    reference_reader,
    request_reader,
    tagged_topic_fields,
)
from membrane.parsers.errors import MalformedMessage, MessageTooLarge, ParseError, ProtocolViolation
from membrane.parsers.events import Direction, KafkaRequest, Reason
from membrane.parsers.kafka import (
    KafkaRequestParser,
    KafkaResponseParser,
    kafka_error_code,
    message_classes,
    metadata_brokers,
    metadata_topic_ids,
    parse_request,
    resolve_topic_ids,
)
from membrane.parsers.kafka import refusal as kafka_refusal
from membrane.parsers.names import KAFKA_API_KEY_NAMES
from membrane.policies import kafka_keys

from tests.helpers.feed import all_chunkings, feed_all

CAPTURES = Path(__file__).resolve().parent / "kafka_captures"
EXPECTED: dict[str, dict[str, Any]] = json.loads((CAPTURES / "expected.json").read_text())
REQUESTS, RESPONSES = message_classes()
TOPIC_NAMES = ("orders", "payments.v1", "a_b-c", "t")
CLUSTER_KINDS = {27, 30, 35, 43, 45, 46, 55}  # refused with 31 at the top level (module table)


def _frame(api_key: int, version: int, correlation_id: int, body: bytes, client_id: bytes | None = b"c",
           flexible: bool = False) -> bytes:
    head = struct.pack(">hhi", api_key, version, correlation_id)
    head += struct.pack(">h", -1) if client_id is None else struct.pack(">h", len(client_id)) + client_id
    if flexible:
        head += b"\x00"
    payload = head + body
    return struct.pack(">i", len(payload)) + payload


def _encode(msg: Any, correlation_id: int = 7, client_id: str = "test") -> bytes:
    msg.with_header(correlation_id=correlation_id, client_id=client_id)
    return bytes(msg.encode(header=True, framed=True))


# --- captured requests from real clients ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_captured_request_parses_at_its_version(name: str) -> None:
    """Every request a real client sent parses whole, byte by byte and with trailing bytes (protocol guide, Requests)."""
    frame = (CAPTURES / name).read_bytes()
    want = EXPECTED[name]
    trailing = _frame(18, 0, 99, b"")  # the next request on the connection
    for chunks in all_chunkings(frame, trailing):
        parser = KafkaRequestParser()
        events = feed_all(parser.feed, chunks)
        assert len(events) == 2
        req = events[0]
        assert (req.api_key, req.api_version) == (want["api_key"], want["api_version"])
        assert list(req.topics) == want["topics"]
        assert req.topics_known
        assert req.topic_ids == ()
        assert req.expects_response == want["expects_response"]
        assert req.raw == frame
        assert req.size == len(frame) - 4
        assert events[1].correlation_id == 99


def test_captures_cover_all_three_clients_and_the_main_kinds() -> None:
    """The capture set holds kafka-python, aiokafka and kcat traffic: produce, fetch, metadata, groups, admin, transactions."""
    clients = {n.split("-new-")[0].split("-old-")[0] for n in EXPECTED}
    assert clients == {"kafka-python", "aiokafka", "kcat"}
    kinds = {v["api_key"] for v in EXPECTED.values()}
    assert {0, 1, 2, 3, 8, 9, 10, 11, 14, 18, 19, 20, 21, 22, 24, 25, 26, 28, 32, 37} <= kinds


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if EXPECTED[n]["expects_response"]))
def test_captured_request_gets_a_decodable_refusal(name: str) -> None:
    """A refusal of a captured request decodes as the same kind and version, with its correlation id (KIP-482 for flexible)."""
    req = parse_request((CAPTURES / name).read_bytes())
    refusal = kafka_refusal(req, Reason.POLICY_DENIED)
    assert refusal
    decoded = RESPONSES[req.api_key].decode(refusal, version=req.api_version, header=True, framed=True)
    assert decoded.header.correlation_id == req.correlation_id
    names, errors = _collect(RESPONSES[req.api_key]._struct, req.api_version, decoded)
    if req.topics:
        assert set(req.topics) <= names
        assert 29 in errors
    else:
        assert (errors and all(e != 0 for e in errors)) or not errors


# --- schema-driven round trips ----------------------------------------------------------------------


def _values(draw: Any, struct_field: Any, version: int, expected: list[str]) -> dict[str, Any]:
    """Random field values for `struct_field` at `version`; topic names drawn go to `expected`."""
    vals: dict[str, Any] = {}
    resource_type = None
    for name, f in struct_field.fields.items():
        if not f.for_version_q(version) or f.tag is not None:
            continue
        j = f._json
        nullable = f._nullable_versions is not None and f._nullable_versions[0] <= version <= f._nullable_versions[1]
        if f.is_struct_array():
            if nullable and draw(st.booleans()) and draw(st.booleans()):
                vals[name] = None
                continue
            n = draw(st.integers(0, 2))
            vals[name] = [f.data_class(version=version, **_values(draw, f, version, expected)) for _ in range(n)]
        elif f.is_struct():
            vals[name] = f.data_class(version=version, **_values(draw, f, version, expected))
        elif f.is_array():
            inner = j["type"][2:]
            if nullable and draw(st.booleans()) and draw(st.booleans()):
                vals[name] = None
            elif inner == "string":
                items = draw(st.lists(st.sampled_from(TOPIC_NAMES), max_size=2))
                if j.get("entityType") == "topicName":
                    expected.extend(items)
                vals[name] = items
            else:
                vals[name] = draw(st.lists(_simple(inner), max_size=3))
        else:
            t = j["type"]
            if j.get("entityType") == "topicName":
                if nullable and draw(st.booleans()):
                    vals[name] = None
                else:
                    vals[name] = draw(st.sampled_from(TOPIC_NAMES))
                    expected.append(vals[name])
            elif name == "resource_type":
                resource_type = draw(st.sampled_from([2, 4]))
                vals[name] = resource_type
            elif name == "resource_name":
                vals[name] = draw(st.sampled_from(TOPIC_NAMES))
                if resource_type == 2:
                    expected.append(vals[name])
            elif name == "topic_id":
                vals[name] = draw(st.sampled_from([None, uuid.UUID(int=1), uuid.UUID(int=0xABCDEF)]))
            elif nullable and t in ("string", "bytes", "records") and draw(st.booleans()):
                vals[name] = None
            else:
                vals[name] = draw(_simple(t))
    return vals


def _simple(t: str) -> st.SearchStrategy[Any]:
    bounds = {"int8": 7, "int16": 15, "int32": 31, "int64": 63}
    if t in bounds:
        return st.integers(-(2 ** bounds[t]), 2 ** bounds[t] - 1)
    if t == "uint16":
        return st.integers(0, 65535)
    if t == "bool":
        return st.booleans()
    if t == "float64":
        return st.floats(allow_nan=False)
    if t == "uuid":
        return st.uuids()
    if t == "string":
        return st.text(max_size=8)
    return st.binary(max_size=16)


KINDS = sorted((k, v) for k, s in api_schemas().items() if k in REQUESTS
               for v in range(s.min_version, s.max_version + 1))


@st.composite
def requests(draw: Any) -> tuple[bytes, int, int, list[str], list[str]]:
    api_key, version = draw(st.sampled_from(KINDS))
    cls = REQUESTS[api_key]
    expected: list[str] = []
    vals = _values(draw, cls._struct, version, expected)
    msg = cls(version=version, **vals)
    frame = _encode(msg, correlation_id=draw(st.integers(-(2**31), 2**31 - 1)))
    ids = sorted({v.hex for v in _uuids(cls._struct, version, msg)})
    return frame, api_key, version, expected, ids


def _uuids(struct_field: Any, version: int, obj: Any) -> list[uuid.UUID]:
    out = []
    for name, f in struct_field.fields.items():
        if not f.for_version_q(version) or f.tag is not None:
            continue
        v = getattr(obj, name)
        if f.is_struct_array() and v:
            for item in v:
                out.extend(_uuids(f, version, item))
        elif f.is_struct() and v is not None:
            out.extend(_uuids(f, version, v))
        elif name == "topic_id" and v is not None and v.int != 0:
            out.append(v)
    return out


@settings(max_examples=max(400, settings.default.max_examples))
@given(requests())
def test_round_trip_every_kind_and_version(case: tuple[bytes, int, int, list[str], list[str]]) -> None:
    """Any request kafka-python encodes parses to its own api key, version and topic names/ids (build -> parse == original)."""
    frame, api_key, version, topics, ids = case
    req = parse_request(frame)
    assert (req.api_key, req.api_version) == (api_key, version)
    assert req.topics == tuple(dict.fromkeys(topics))
    assert sorted(req.topic_ids) == ids
    assert req.topics_known == (not ids)
    assert req.client_id == "test"
    assert _walk(request_reader, frame) == _walk(reference_reader, frame)


def _walk(make: Any, frame: bytes) -> tuple[object, ...]:
    """Run one reader over a frame's body: (end position, topics, ids, acks), or the error class."""
    api_key, version = struct.unpack_from(">hh", frame, 4)
    reader = make(api_key, version)
    if reader is None:
        return ("no reader",)
    body = frame[4:]
    pos = 10 + max(0, struct.unpack_from(">h", body, 8)[0])
    if api_schemas()[api_key].is_flexible(version):
        pos += 1
    found = Found()
    try:
        end = reader(body, pos, found)
    except (SchemaError, IndexError, struct.error, ValueError):
        return ("error",)
    return end, found.topics, found.topic_ids, found.acks


@settings(max_examples=max(300, settings.default.max_examples))
@given(requests(), st.integers(0, 200), st.binary(min_size=1, max_size=3))
def test_generated_reader_agrees_with_reference_on_mutations(case: tuple[bytes, int, int, list[str], list[str]],
                                                            at: int, junk: bytes) -> None:
    """The generated reader and the closure reference accept and reject the same mutated bodies alike."""
    frame = case[0]
    at = 12 + at % max(1, len(frame) - 12)
    mutated = frame[:at] + junk + frame[at + len(junk):]
    assert _walk(request_reader, mutated) == _walk(reference_reader, mutated)


@settings(max_examples=max(300, settings.default.max_examples))
@given(requests())
def test_refusal_for_every_kind_and_version(case: tuple[bytes, int, int, list[str], list[str]]) -> None:
    """A refusal decodes as the same api key and version with the same correlation id, error 29 on named topics."""
    frame, api_key, version, topics, _ = case
    req = parse_request(frame)
    refusal = kafka_refusal(req, Reason.POLICY_DENIED)
    if not req.expects_response:
        assert refusal == b""
        return
    assert refusal, (api_key, version)
    decoded = RESPONSES[api_key].decode(refusal, version=version, header=True, framed=True)
    assert decoded.header.correlation_id == req.correlation_id
    names, errors = _collect(RESPONSES[api_key]._struct, version, decoded)
    response_names_topics = _has_topic_names(RESPONSES[api_key]._struct, version)
    if topics and response_names_topics and api_key not in CLUSTER_KINDS:
        # Every topic is echoed except where the response has no place for it (Fetch forgotten topics,
        # a DescribeTopicPartitions cursor): then the response carries the error or nothing at all.
        assert names & set(topics) or 29 in errors or not errors
    if topics or req.topic_ids:
        assert 29 in errors or 31 in errors or not errors
    elif errors:
        assert any(e != 0 for e in errors)


@given(requests(), st.integers(1, 40))
def test_round_trip_survives_any_chunking(case: tuple[bytes, int, int, list[str], list[str]], cut: int) -> None:
    """Two requests back to back, split at any point, give the same two events as whole feeding."""
    frame = case[0]
    whole = KafkaRequestParser().feed(frame + frame)
    parser = KafkaRequestParser()
    cut = min(cut, len(frame) * 2)
    pieced = parser.feed((frame + frame)[:cut]) + parser.feed((frame + frame)[cut:])
    assert whole == pieced
    assert len(whole) == 2


def _collect(struct_field: Any, version: int, obj: Any) -> tuple[set[str], list[int]]:
    names: set[str] = set()
    errors: list[int] = []
    for name, f in struct_field.fields.items():
        if not f.for_version_q(version):
            continue
        v = getattr(obj, name)
        if f.is_struct_array() and v:
            for item in v:
                n, e = _collect(f, version, item)
                names |= n
                errors += e
        elif f.is_struct() and v is not None:
            n, e = _collect(f, version, v)
            names |= n
            errors += e
        elif (f._json.get("entityType") == "topicName" and isinstance(v, str)) or (name == "resource_name" and v):
            names.add(v)
        elif f.type_str == "int16" and (name == "error_code" or name.endswith("_error_code")):
            errors.append(v)
    return names, errors


def _has_topic_names(struct_field: Any, version: int) -> bool:
    for name, f in struct_field.fields.items():
        if not f.for_version_q(version):
            continue
        if f._json.get("entityType") == "topicName" or name == "resource_name":
            return True
        if (f.is_struct() or f.is_struct_array()) and _has_topic_names(f, version):
            return True
    return False


def test_no_request_schema_names_topics_in_tagged_fields() -> None:
    """The topic reader skips tagged fields, which is only sound while no request schema tags a topic (KIP-482)."""
    for schema in api_schemas().values():
        assert tagged_topic_fields(schema.request["fields"]) == [], schema.name


# --- specific kinds ------------------------------------------------------------------------------------


def test_fetch_by_topic_id_is_undecidable() -> None:
    """Fetch v13+ names topics by id only: topic_ids filled, topics empty, topics_known False (KIP-516)."""
    F = REQUESTS[1]
    tid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    part = F.FetchTopic.FetchPartition(version=13, partition=0, current_leader_epoch=-1, fetch_offset=0,
                                       last_fetched_epoch=-1, log_start_offset=-1, partition_max_bytes=1024)
    msg = F(version=13, replica_id=-1, max_wait_ms=10, min_bytes=1, max_bytes=1024, isolation_level=0, session_id=0,
            session_epoch=-1, topics=[F.FetchTopic(version=13, topic_id=tid, partitions=[part])],
            forgotten_topics_data=[], rack_id="")
    req = parse_request(_encode(msg))
    assert req.topics == ()
    assert req.topic_ids == (tid.hex,)
    assert not req.topics_known


def test_metadata_for_all_topics_names_none() -> None:
    """Metadata v1+ with a null topic list asks for every topic: no topics, and that is known (Metadata API)."""
    M = REQUESTS[3]
    req = parse_request(_encode(M(version=12, topics=None, allow_auto_topic_creation=True,
                                  include_topic_authorized_operations=False)))
    assert req.topics == ()
    assert req.topics_known


def test_metadata_by_name_with_zero_topic_id_is_known() -> None:
    """Metadata v10+ sends the zero uuid beside a name: the name decides, no topic id is reported (KIP-516)."""
    M = REQUESTS[3]
    msg = M(version=12, topics=[M.MetadataRequestTopic(version=12, topic_id=None, name="orders")],
            allow_auto_topic_creation=False, include_topic_authorized_operations=False)
    req = parse_request(_encode(msg))
    assert req.topics == ("orders",)
    assert req.topic_ids == ()
    assert req.topics_known


def test_describe_configs_reports_topic_resources_only() -> None:
    """DescribeConfigs names a topic when its resource type is 2 (TOPIC); broker resources are not topics."""
    D = REQUESTS[32]
    res = [D.DescribeConfigsResource(version=4, resource_type=2, resource_name="orders", configuration_keys=None),
           D.DescribeConfigsResource(version=4, resource_type=4, resource_name="0", configuration_keys=None)]
    req = parse_request(_encode(D(version=4, resources=res, include_synonyms=False, include_documentation=False)))
    assert req.topics == ("orders",)


def test_produce_acks_zero_expects_no_response() -> None:
    """Produce with acks=0 gets no response from a broker, so none is expected and its refusal is empty."""
    P = REQUESTS[0]
    part = P.TopicProduceData.PartitionProduceData(version=9, index=0, records=b"x")
    msg = P(version=9, transactional_id=None, acks=0, timeout_ms=1,
            topic_data=[P.TopicProduceData(version=9, name="orders", partition_data=[part])])
    req = parse_request(_encode(msg))
    assert not req.expects_response
    assert kafka_refusal(req, Reason.POLICY_DENIED) == b""
    responses = KafkaResponseParser()
    responses.expect(req)
    assert responses.pending == 0


# --- framing -------------------------------------------------------------------------------------------


def test_frame_over_the_limit_is_refused_from_its_prefix() -> None:
    """A size prefix over max_frame_bytes is MessageTooLarge before the body arrives (no allocation)."""
    parser = KafkaRequestParser(max_frame_bytes=1000)
    with pytest.raises(MessageTooLarge) as e:
        parser.feed(struct.pack(">i", 1001))
    assert e.value.reason is Reason.TOO_LARGE
    assert e.value.direction is Direction.CLIENT_TO_SERVER
    assert parser.buffered_bytes <= 4


def test_frame_at_the_limit_is_accepted() -> None:
    """A frame exactly max_frame_bytes long is read (the limit is inclusive, as Kafka's socket.request.max.bytes)."""
    body = _frame(18, 0, 1, b"")[4:]
    parser = KafkaRequestParser(max_frame_bytes=len(body))
    assert len(parser.feed(struct.pack(">i", len(body)) + body)) == 1


@pytest.mark.parametrize("chunks", all_chunkings(struct.pack(">i", -5)))
def test_negative_frame_size_is_malformed(chunks: list[bytes]) -> None:
    """A negative size prefix is MalformedMessage however it arrives."""
    parser = KafkaRequestParser()
    with pytest.raises(MalformedMessage):
        feed_all(parser.feed, chunks)


def test_parser_is_unusable_after_an_error() -> None:
    """After a ParseError the stream has no reliable frame boundary: further input is a ProtocolViolation."""
    parser = KafkaRequestParser()
    with pytest.raises(MalformedMessage):
        parser.feed(_frame(3, 4, 1, b"\x00\x00\x00\x05"))  # 5 topics announced, none present
    with pytest.raises(ProtocolViolation):
        parser.feed(_frame(18, 0, 2, b""))


@pytest.mark.parametrize("body", [b"", b"\x00", b"\x00\x00\x00\x01\x00\x05abc", b"\x00\x00\x00\x00\x01\x00\x00\x00"])
def test_truncated_or_overlong_bodies_are_malformed(body: bytes) -> None:
    """A body shorter than its schema, or with bytes after it, is MalformedMessage (never a guess at topics)."""
    with pytest.raises(MalformedMessage):
        parse_request(_frame(3, 4, 1, body))


def test_header_shorter_than_fixed_part_is_malformed() -> None:
    """A frame too short for api key, version and correlation id is MalformedMessage."""
    with pytest.raises(MalformedMessage):
        KafkaRequestParser().feed(struct.pack(">i", 3) + b"\x00\x03\x00")


def test_unknown_api_key_is_framed_and_reported() -> None:
    """An api key this parser has no schema for is still framed and reported, with topics undecidable."""
    frame = _frame(9999, 3, 42, b"opaque body", client_id=b"cid")
    for chunks in all_chunkings(frame, _frame(18, 0, 43, b"")):
        events = feed_all(KafkaRequestParser().feed, chunks)
        assert events[0] == KafkaRequest(api_key=9999, api_version=3, correlation_id=42, client_id="cid",
                                         topics_known=False, size=len(frame) - 4)
        assert events[1].correlation_id == 43
    assert kafka_refusal(events[0], Reason.POLICY_DENIED) is None


def test_unknown_version_of_topic_free_kind_stays_decidable() -> None:
    """ApiVersions at a version newer than known is reported; it never names topics so topics_known stays True."""
    req = parse_request(_frame(18, 99, 1, b"\x00\x00\x00", client_id=None, flexible=True))
    assert req.api_version == 99
    assert req.client_id is None
    assert req.topics_known


def test_removed_version_of_topic_kind_is_undecidable() -> None:
    """Produce v2 (removed in Kafka 4) is framed but its topics are not read: topics_known is False."""
    req = parse_request(_frame(0, 2, 1, b"\x00\x01\x00\x00\x00\x10\x00\x00\x00\x00"))
    assert req.topics == ()
    assert not req.topics_known
    assert req.expects_response
    fire = parse_request(_frame(0, 2, 1, b"\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00"))
    assert not fire.expects_response  # acks=0 is readable even there: nothing will answer it


def test_request_header_v2_tagged_fields_are_skipped() -> None:
    """Flexible versions carry header tagged fields after the client id (KIP-482); a tag there does not move topics."""
    M = REQUESTS[3]
    msg = M(version=12, topics=[M.MetadataRequestTopic(version=12, topic_id=None, name="orders")],
            allow_auto_topic_creation=False, include_topic_authorized_operations=False)
    frame = _encode(msg, client_id="c")
    body = frame[4:]
    head_end = 8 + 2 + 1
    tagged = b"\x01\x05\x02hi"  # one tagged field, tag 5, 2 bytes
    new_body = body[:head_end] + tagged + body[head_end + 1:]
    req = parse_request(struct.pack(">i", len(new_body)) + new_body)
    assert req.topics == ("orders",)


# --- responses -----------------------------------------------------------------------------------------


def _response(correlation_id: int, body: bytes = b"\x00\x00") -> bytes:
    payload = struct.pack(">i", correlation_id) + body
    return struct.pack(">i", len(payload)) + payload


def _req(correlation_id: int, api_key: int = 3, version: int = 4) -> KafkaRequest:
    return KafkaRequest(api_key=api_key, api_version=version, correlation_id=correlation_id, client_id=None)


@pytest.mark.parametrize("chunks", all_chunkings(_response(1) + _response(2, b"xyz")))
def test_responses_match_requests_in_order(chunks: list[bytes]) -> None:
    """Responses come back in request order; each is matched to its request's api key and version."""
    parser = KafkaResponseParser()
    parser.expect(_req(1))
    parser.expect(_req(2, api_key=0, version=9))
    events = feed_all(parser.feed, chunks)
    assert [(e.correlation_id, e.api_key, e.api_version) for e in events] == [(1, 3, 4), (2, 0, 9)]
    assert parser.pending == 0


def test_response_out_of_order_is_a_violation() -> None:
    """A response whose correlation id is not the oldest outstanding request's is a ProtocolViolation."""
    parser = KafkaResponseParser()
    parser.expect(_req(1))
    parser.expect(_req(2))
    with pytest.raises(ProtocolViolation) as e:
        parser.feed(_response(2))
    assert e.value.direction is Direction.SERVER_TO_CLIENT


def test_response_without_request_is_a_violation() -> None:
    """A response when no request is outstanding is a ProtocolViolation."""
    with pytest.raises(ProtocolViolation):
        KafkaResponseParser().feed(_response(1))


def test_response_frame_over_the_limit() -> None:
    """Responses are bounded by max_frame_bytes too."""
    parser = KafkaResponseParser(max_frame_bytes=10)
    parser.expect(_req(1))
    with pytest.raises(MessageTooLarge):
        parser.feed(struct.pack(">i", 11))


def test_metadata_response_teaches_topic_ids() -> None:
    """A Metadata v10+ response maps topic ids to names, so a proxy can resolve Fetch v13+ topic ids."""
    R = RESPONSES[3]
    tid = uuid.UUID(int=77)
    msg = R(version=12, throttle_time_ms=0, brokers=[], cluster_id=None, controller_id=0,
            topics=[R.MetadataResponseTopic(version=12, error_code=0, name="orders", topic_id=tid, is_internal=False,
                                            partitions=[])])
    msg.with_header(correlation_id=5)
    frame = bytes(msg.encode(header=True, framed=True))
    parser = KafkaResponseParser()
    parser.expect(_req(5, api_key=3, version=12))
    [resp] = parser.feed(frame)
    names = metadata_topic_ids(resp)
    assert names == {tid.hex: "orders"}
    fetch = KafkaRequest(api_key=1, api_version=13, correlation_id=1, client_id=None,
                         topic_ids=(tid.hex, "ff" * 16), topics_known=False)
    partly = resolve_topic_ids(fetch, names)
    assert partly.topics == ("orders",)
    assert partly.topic_ids == ("ff" * 16,)
    assert not partly.topics_known
    fully = resolve_topic_ids(fetch, {**names, "ff" * 16: "audit"})
    assert fully.topics == ("orders", "audit")
    assert fully.topic_ids == ()
    assert fully.topics_known


# --- tables --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_has_a_kafka_error(reason: Reason) -> None:
    """Every Reason maps to a non-zero Kafka error code (STYLE.md §3.4)."""
    assert kafka_error_code(reason) > 0
    assert kafka_error_code(Reason.POLICY_DENIED) == 29


# Kafka protocol api keys that kafka-python ships no schema for (kafka.apache.org/protocol#protocol_api_keys).
_SPEC_KEYS_WITHOUT_SCHEMA = {
    "LeaderAndIsr": 4, "StopReplica": 5, "UpdateMetadata": 6, "ControlledShutdown": 7,
    "CreateDelegationToken": 38, "RenewDelegationToken": 39, "ExpireDelegationToken": 40,
    "DescribeDelegationToken": 41, "ConsumerGroupHeartbeat": 68, "ConsumerGroupDescribe": 69,
    "GetTelemetrySubscriptions": 71, "PushTelemetry": 72, "ShareGroupHeartbeat": 76, "ShareGroupDescribe": 77,
    "ShareFetch": 78, "ShareAcknowledge": 79, "StreamsGroupHeartbeat": 88, "StreamsGroupDescribe": 89,
    "DescribeShareGroupOffsets": 90, "AlterShareGroupOffsets": 91, "DeleteShareGroupOffsets": 92,
}
# Cilium 1.19 pkg/policy/api/kafka.go KafkaAPIKeyMap, copied as literals.
_CILIUM_KAFKA_API_KEY_MAP = {
    "produce": 0, "fetch": 1, "offsets": 2, "metadata": 3, "leaderandisr": 4, "stopreplica": 5,
    "updatemetadata": 6, "controlledshutdown": 7, "offsetcommit": 8, "offsetfetch": 9, "findcoordinator": 10,
    "joingroup": 11, "heartbeat": 12, "leavegroup": 13, "syncgroup": 14, "describegroups": 15,
    "listgroups": 16, "saslhandshake": 17, "apiversions": 18, "createtopics": 19, "deletetopics": 20,
    "deleterecords": 21, "initproducerid": 22, "offsetforleaderepoch": 23, "addpartitionstotxn": 24,
    "addoffsetstotxn": 25, "endtxn": 26, "writetxnmarkers": 27, "txnoffsetcommit": 28, "describeacls": 29,
    "createacls": 30, "deleteacls": 31, "describeconfigs": 32, "alterconfigs": 33,
}


@pytest.mark.parametrize("api_key", sorted(api_schemas()))
def test_api_key_name_matches_the_protocol_schema(api_key: int) -> None:
    """Each api key kafka-python has a schema for is named as that schema (lower case), except Cilium's "offsets"."""
    expected = "offsets" if api_key == 2 else api_schemas()[api_key].name.lower()
    assert KAFKA_API_KEY_NAMES[api_key] == expected


@pytest.mark.parametrize(("name", "api_key"), sorted(_SPEC_KEYS_WITHOUT_SCHEMA.items()))
def test_api_key_name_matches_the_protocol_spec(name: str, api_key: int) -> None:
    """Api keys without a kafka-python schema carry the Kafka protocol's number for that request name."""
    assert KAFKA_API_KEY_NAMES[api_key] == name.lower()


def test_name_table_has_no_key_beyond_schema_and_spec() -> None:
    """Every key in the table is vouched for by kafka-python's schemas or the spec literals above."""
    assert set(KAFKA_API_KEY_NAMES) == set(api_schemas()) | set(_SPEC_KEYS_WITHOUT_SCHEMA.values())


def test_policy_api_key_names_are_cilium_key_map() -> None:
    """The names a policy's `apiKey` accepts are exactly Cilium's KafkaAPIKeyMap, derived from the same table."""
    assert kafka_keys.API_KEYS == _CILIUM_KAFKA_API_KEY_MAP


def test_refusal_of_group_kind_uses_group_error() -> None:
    """A kind without topics (Heartbeat) is refused with 30 GROUP_AUTHORIZATION_FAILED."""
    H = REQUESTS[12]
    req = parse_request(_encode(H(version=4, group_id="g", generation_id=1, member_id="m", group_instance_id=None)))
    decoded = RESPONSES[12].decode(kafka_refusal(req, Reason.POLICY_DENIED), version=4, header=True, framed=True)
    assert decoded.error_code == 30


def test_refusal_for_non_policy_reason_carries_its_code() -> None:
    """A refusal for UPSTREAM_TIMEOUT carries REQUEST_TIMED_OUT on every partition."""
    frame = (CAPTURES / "kcat-new-produce-v7-topic.bin").read_bytes()
    req = parse_request(frame)
    decoded = RESPONSES[0].decode(kafka_refusal(req, Reason.UPSTREAM_TIMEOUT), version=7, header=True, framed=True)
    assert {p.error_code for t in decoded.responses for p in t.partition_responses} == {7}


def test_parse_errors_are_parse_errors() -> None:
    """Only ParseError subclasses leave the parser (STYLE.md §3.1)."""
    for junk in (b"\x00\x00\x00\x01\xff", _frame(1, 12, 1, b"\xff" * 40, flexible=True)):
        with pytest.raises(ParseError):
            KafkaRequestParser().feed(junk)


def test_metadata_refusal_lists_the_brokers_it_is_given() -> None:
    """A Metadata refusal carries the brokers learned from an earlier response: clients drop one without brokers."""
    frame = (CAPTURES / "kafka-python-new-metadata-v13-topic.bin").read_bytes()
    req = parse_request(frame)
    refusal = kafka_refusal(req, Reason.POLICY_DENIED, brokers=[(0, "10.244.0.7", 9092, None)])
    assert refusal
    decoded = RESPONSES[3].decode(refusal, version=13, header=True, framed=True)
    assert [(b.node_id, b.host, b.port) for b in decoded.brokers] == [(0, "10.244.0.7", 9092)]
    assert [(t.name, t.error_code) for t in decoded.topics] == [(req.topics[0], 29)]
    parser = KafkaResponseParser()
    parser.expect(req)
    [resp] = parser.feed(refusal)
    assert metadata_brokers(resp) == ((0, "10.244.0.7", 9092, None),)


def test_hostile_api_keys_and_versions_do_not_grow_caches() -> None:
    """Only api key/version pairs with a schema are cached: a client cycling through pairs cannot grow memory."""
    from membrane.parsers._kafka_schema import _generated_reader

    before = _generated_reader.cache_info().currsize
    parser = KafkaRequestParser()
    for key in range(200, 260):
        for version in range(0, 50):
            parser.feed(_frame(key, version, 1, b""))
    for version in range(100, 300):
        parser.feed(_frame(0, version, 1, b""))
    assert _generated_reader.cache_info().currsize == before
