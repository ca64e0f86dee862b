"""Kafka per-topic answers: split a request into allowed topics, merge the broker's answer with 29s.

Case table
| what | input | expected |
|---|---|---|
| round trip | any request of the six kinds kafka-python encodes, every version, random denied set | forward names no denied topic; merged answer decodes, original order and correlation id, 29 on denied, broker's code on allowed |
| exact | Produce/Fetch/ListOffsets/Metadata/OffsetCommit/OffsetFetch v-min and v-max, topics a,b,c with b denied | forward names a,c; answer a,b,c with 0/29/0 |
| no split | every topic denied, none denied, other kinds, unresolved ids, all-topics Metadata | NoSplit with a reason |
| upstream failed | split request, `failure(UPSTREAM_FAILED)` | 13 on allowed, 29 on denied; b"" for acks=0 |
| broker extras | Fetch answer with a topic nobody asked about, an allowed topic left out | kept at the end / stays out |
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from membrane.parsers._kafka_schema import api_schemas
from membrane.parsers.errors import MalformedMessage
from membrane.parsers.events import KafkaRequest, KafkaResponse, Reason
from membrane.parsers.kafka import message_classes, parse_request, refusal
from membrane.parsers.kafka_split import SPLITTABLE_API_KEYS, NoSplit, TopicSplit, split_by_topic

from tests.parsers.test_kafka import TOPIC_NAMES, _encode, _values

REQUESTS, RESPONSES = message_classes()
IDS = {uuid.UUID(int=1).hex: "orders", uuid.UUID(int=0xABCDEF).hex: "payments.v1"}
SPLIT_KINDS = sorted((k, v) for k in SPLITTABLE_API_KEYS
                     for v in range(api_schemas()[k].min_version, api_schemas()[k].max_version + 1))
ALLOWED_CODE = 7  # the fake broker answers every allowed topic with REQUEST_TIMED_OUT: distinguishable from 0 and 29


def _broker_answer(forward: KafkaRequest) -> KafkaResponse:
    """What a broker could answer to `forward`: every topic/partition it names, error 7."""
    raw = refusal(forward, Reason.UPSTREAM_TIMEOUT)
    assert raw
    return KafkaResponse(api_key=forward.api_key, api_version=forward.api_version,
                         correlation_id=forward.correlation_id, raw=raw)


def _decode(raw: bytes, api_key: int, version: int) -> Any:
    return RESPONSES[api_key].decode(raw, version=version, header=True, framed=True)


def _topic_lists(msg: Any, api_key: int, version: int, request: bool) -> list[list[Any]]:
    """The per-topic list(s) of a decoded request or response (one per group for OffsetFetch v8+)."""
    if api_key == 9 and version >= 8:
        return [list(g.topics or []) for g in (msg.groups or [])]
    name = {0: ("topic_data", "responses"), 1: ("topics", "responses")}.get(api_key, ("topics", "topics"))
    return [list(getattr(msg, name[0] if request else name[1]) or [])]


def _key(item: Any) -> str | None:
    name = getattr(item, "name", None) or getattr(item, "topic", None)
    if name:
        return str(name)
    tid = getattr(item, "topic_id", None)
    return IDS.get(tid.hex) if tid is not None else None


def _codes(item: Any) -> set[int]:
    """Every error code inside one response element (topic level and its partitions)."""
    out: set[int] = set()
    for name in item.fields if hasattr(item, "fields") else ():
        v = getattr(item, name, None)
        if (name == "error_code" or name.endswith("_error_code")) and isinstance(v, int):
            out.add(v)
        elif isinstance(v, list):
            for x in v:
                if hasattr(x, "fields"):
                    out |= _codes(x)
    return out


def _topic_element(draw: Any, field: Any, version: int, name: str) -> Any:
    """A random element of a per-topic list, naming `name` (by id where the version has one)."""
    vals = _values(draw, field, version, [])
    by_id = {v: k for k, v in IDS.items()}
    if "topic_id" in field.fields and field.fields["topic_id"].for_version_q(version):
        vals["topic_id"] = uuid.UUID(hex=by_id[name]) if name in by_id else uuid.uuid4()
    for n in ("name", "topic"):
        if n in field.fields and field.fields[n].for_version_q(version):
            vals[n] = name
    return field.data_class(version=version, **vals)


@st.composite
def split_cases(draw: Any) -> tuple[KafkaRequest, frozenset[str]]:
    """A request of a splittable kind whose per-topic list names 1-4 topics, and a denied set that
    usually holds some but not all of them (sometimes all, sometimes none)."""
    api_key, version = draw(st.sampled_from(SPLIT_KINDS))
    cls = REQUESTS[api_key]
    vals = _values(draw, cls._struct, version, [])
    names = draw(st.lists(st.sampled_from(TOPIC_NAMES), min_size=1, max_size=4))
    if api_key == 9 and version >= 8:
        groups = cls._struct.fields["groups"]
        topics = groups.fields["topics"]
        vals["groups"] = [groups.data_class(version=version, **{
            **_values(draw, groups, version, []),
            "topics": [_topic_element(draw, topics, version, n) for n in names]})
            for _ in range(draw(st.integers(1, 2)))]
    else:
        list_name = {0: "topic_data", 1: "topics"}.get(api_key, "topics")
        f = cls._struct.fields[list_name]
        vals[list_name] = [_topic_element(draw, f, version, n) for n in names]
    frame = _encode(cls(version=version, **vals), correlation_id=draw(st.integers(-(2**31), 2**31 - 1)))
    denied = frozenset(draw(st.sets(st.sampled_from(TOPIC_NAMES), min_size=1, max_size=3)))
    return parse_request(frame), denied


@settings(max_examples=max(600, settings.default.max_examples))
@given(split_cases())
def test_split_round_trip_every_kind_and_version(case: tuple[KafkaRequest, frozenset[str]]) -> None:
    """A split forwards no denied topic, and the merged answer lists every requested topic in order:
    29 on the denied ones, the broker's answer on the allowed ones, with the client's correlation id."""
    request, denied = case
    result = split_by_topic(request, denied, names_by_id=IDS)
    assume(isinstance(result, TopicSplit))
    assert isinstance(result, TopicSplit)
    forward = result.forward
    assert (forward.api_key, forward.api_version, forward.correlation_id) == \
        (request.api_key, request.api_version, request.correlation_id)
    assert not (set(forward.topics) | {IDS[i] for i in forward.topic_ids}) & denied
    assert forward.expects_response == request.expects_response
    if not request.expects_response:
        assert result.failure(Reason.UPSTREAM_FAILED) == b""
        return
    merged = _decode(result.merge(_broker_answer(forward)), request.api_key, request.api_version)
    assert merged.header.correlation_id == request.correlation_id
    original = REQUESTS[request.api_key].decode(request.raw, version=request.api_version, header=True, framed=True)
    want = _topic_lists(original, request.api_key, request.api_version, request=True)
    got = _topic_lists(merged, request.api_key, request.api_version, request=False)
    assert [[_key(t) for t in group] for group in got] == [[_key(t) for t in group] for group in want]
    for group in got:
        for item in group:
            assert _codes(item) <= ({29} if _key(item) in denied else {ALLOWED_CODE})


@settings(max_examples=max(300, settings.default.max_examples))
@given(split_cases())
def test_failure_answers_allowed_with_network_exception(case: tuple[KafkaRequest, frozenset[str]]) -> None:
    """When the broker cannot answer a split request, the allowed topics get 13 NETWORK_EXCEPTION and the denied 29."""
    request, denied = case
    result = split_by_topic(request, denied, names_by_id=IDS)
    assume(isinstance(result, TopicSplit) and request.expects_response)
    assert isinstance(result, TopicSplit)
    answer = _decode(result.failure(Reason.UPSTREAM_FAILED), request.api_key, request.api_version)
    assert answer.header.correlation_id == request.correlation_id
    for group in _topic_lists(answer, request.api_key, request.api_version, request=False):
        for item in group:
            assert _codes(item) <= ({29} if _key(item) in denied else {13})


@settings(max_examples=max(300, settings.default.max_examples))
@given(split_cases())
def test_no_split_says_why(case: tuple[KafkaRequest, frozenset[str]]) -> None:
    """A request that is not split names no allowed topic, no denied topic, or an unresolvable one, and says which."""
    request, denied = case
    result = split_by_topic(request, denied, names_by_id=IDS)
    assume(isinstance(result, NoSplit))
    assert isinstance(result, NoSplit)
    assert result.reason in {
        "every topic named is denied",
        "no denied topic is named in the per-topic list",
        "a topic is named by an id that is not resolved",
        "the request asks for all topics",
        "a denied topic is named outside the per-topic list",
    }


# --- exact answers, one per kind at its lowest and highest version ------------------------------------


def _request(api_key: int, version: int, topics: tuple[str, ...], *, acks: int = 1) -> KafkaRequest:
    """A request of `api_key` naming `topics`, each with partition 0 (by id where the version names topics by id)."""
    cls = REQUESTS[api_key]
    fields = cls._struct.fields
    by_id = {v: k for k, v in IDS.items()}

    def topic(field: Any, name: str, parts: dict[str, Any]) -> Any:
        vals: dict[str, Any] = dict(parts)
        if field.fields["topic_id"].for_version_q(version) if "topic_id" in field.fields else False:
            vals["topic_id"] = uuid.UUID(hex=by_id[name]) if name in by_id else uuid.UUID(int=0)
        for n in ("name", "topic"):
            if n in field.fields and field.fields[n].for_version_q(version):
                vals[n] = name
        return field.data_class(version=version, **vals)

    if api_key == 0:
        f = fields["topic_data"]
        pd = f.fields["partition_data"].data_class
        msg = cls(version=version, transactional_id=None, acks=acks, timeout_ms=100, topic_data=[
            topic(f, t, {"partition_data": [pd(version=version, index=0, records=b"")]}) for t in topics])
    elif api_key == 1:
        f = fields["topics"]
        pd = f.fields["partitions"].data_class
        msg = cls(version=version, replica_id=-1, max_wait_ms=10, min_bytes=1, topics=[
            topic(f, t, {"partitions": [pd(version=version, partition=0, fetch_offset=0)]}) for t in topics])
    elif api_key == 2:
        f = fields["topics"]
        pd = f.fields["partitions"].data_class
        msg = cls(version=version, replica_id=-1, topics=[
            topic(f, t, {"partitions": [pd(version=version, partition_index=0, timestamp=-1)]}) for t in topics])
    elif api_key == 3:
        f = fields["topics"]
        msg = cls(version=version, topics=[topic(f, t, {}) for t in topics])
    elif api_key == 8:
        f = fields["topics"]
        pd = f.fields["partitions"].data_class
        msg = cls(version=version, group_id="g", topics=[
            topic(f, t, {"partitions": [pd(version=version, partition_index=0, committed_offset=5)]}) for t in topics])
    elif version < 8:
        f = fields["topics"]
        msg = cls(version=version, group_id="g", topics=[topic(f, t, {"partition_indexes": [0]}) for t in topics])
    else:
        g = fields["groups"]
        f = g.fields["topics"]
        msg = cls(version=version, groups=[g.data_class(version=version, group_id="g", topics=[
            topic(f, t, {"partition_indexes": [0]}) for t in topics])])
    return parse_request(_encode(msg, correlation_id=4242))


EXACT = [(k, v) for k in sorted(SPLITTABLE_API_KEYS)
         for v in sorted({api_schemas()[k].min_version, api_schemas()[k].max_version})]


@pytest.mark.parametrize(("api_key", "version"), EXACT)
def test_one_denied_topic_among_three(api_key: int, version: int) -> None:
    """Topics orders, payments.v1 and t with payments.v1 denied: the broker sees orders and t, the client gets all three, in order."""
    names = ("orders", "payments.v1", "orders") if _by_id_only(api_key, version) else ("orders", "payments.v1", "t")
    request = _request(api_key, version, names)
    result = split_by_topic(request, {"payments.v1"}, names_by_id=IDS)
    assert isinstance(result, TopicSplit)
    forwarded = set(result.forward.topics) | {IDS[i] for i in result.forward.topic_ids}
    assert forwarded == set(names) - {"payments.v1"}
    assert result.denied == ("payments.v1",)
    merged = _decode(result.merge(_broker_answer(result.forward)), api_key, version)
    (got,) = _topic_lists(merged, api_key, version, request=False)
    assert [_key(t) for t in got] == list(names)
    assert [_codes(t) for t in got] == [{ALLOWED_CODE}, {29}, {ALLOWED_CODE}]
    assert merged.header.correlation_id == 4242


def _by_id_only(api_key: int, version: int) -> bool:
    """Versions that name topics by id only (only the two ids in IDS exist then)."""
    return (api_key, version) in {(0, 13), (1, 18), (8, 10), (9, 10)}


@pytest.mark.parametrize(("api_key", "version"), EXACT)
def test_every_topic_denied_is_not_split(api_key: int, version: int) -> None:
    """When every topic is denied there is nothing to forward: the whole refusal answers (NoSplit says so)."""
    result = split_by_topic(_request(api_key, version, ("orders", "payments.v1")), {"orders", "payments.v1"},
                            names_by_id=IDS)
    assert result == NoSplit(reason="every topic named is denied")


@pytest.mark.parametrize(("api_key", "version"), EXACT)
def test_no_denied_topic_is_not_split(api_key: int, version: int) -> None:
    """A request naming only allowed topics is not split (it is forwarded as it is)."""
    result = split_by_topic(_request(api_key, version, ("orders",)), {"payments.v1"}, names_by_id=IDS)
    assert result == NoSplit(reason="no denied topic is named in the per-topic list")


def test_unresolved_topic_id_is_not_split() -> None:
    """A Fetch v13+ naming a topic by an id never seen in Metadata cannot be judged per topic: refused whole."""
    request = _request(1, 13, ("orders", "payments.v1"))
    result = split_by_topic(request, {"payments.v1"}, names_by_id={})
    assert result == NoSplit(reason="a topic is named by an id that is not resolved")


def test_kind_without_per_topic_errors_is_not_split() -> None:
    """CreateTopics has no place for a per-topic authorisation answer here: refused whole, with the reason."""
    request = KafkaRequest(api_key=19, api_version=5, correlation_id=1, client_id="c", topics=("a", "b"))
    result = split_by_topic(request, {"b"})
    assert result == NoSplit(reason="api key 19 has no per-topic errors")


def test_metadata_for_all_topics_is_not_split() -> None:
    """Metadata with a null topic list asks for every topic: there is no list to split."""
    cls = REQUESTS[3]
    request = parse_request(_encode(cls(version=12, topics=None), correlation_id=3))
    assert split_by_topic(request, {"orders"}) == NoSplit(reason="the request asks for all topics")


def test_failure_of_a_split_produce() -> None:
    """Upstream failure on a split Produce v9: 13 on the allowed topic, 29 on the denied, in request order."""
    request = _request(0, 9, ("orders", "payments.v1"))
    result = split_by_topic(request, {"payments.v1"})
    assert isinstance(result, TopicSplit)
    answer = _decode(result.failure(Reason.UPSTREAM_FAILED), 0, 9)
    assert [(_key(t), _codes(t)) for t in answer.responses] == [("orders", {13}), ("payments.v1", {29})]


def test_acks0_split_forwards_and_expects_nothing() -> None:
    """Produce acks=0 is split too (the broker gets the allowed topics) and nothing is ever answered."""
    request = _request(0, 9, ("orders", "payments.v1"), acks=0)
    result = split_by_topic(request, {"payments.v1"})
    assert isinstance(result, TopicSplit)
    assert result.forward.expects_response is False
    assert result.forward.topics == ("orders",)
    assert result.failure(Reason.UPSTREAM_FAILED) == b""


def test_fetch_forgotten_denied_topics_are_dropped() -> None:
    """Fetch's forgotten_topics_data loses its denied topics: the broker never served them."""
    cls = REQUESTS[1]
    f = cls._struct.fields
    tp = f["topics"]
    fg = f["forgotten_topics_data"]
    pd = tp.fields["partitions"].data_class
    msg = cls(version=12, replica_id=-1, max_wait_ms=10, min_bytes=1, session_id=0, session_epoch=-1,
              topics=[tp.data_class(version=12, topic=t, partitions=[pd(version=12, partition=0, fetch_offset=0)])
                      for t in ("orders", "t")],
              forgotten_topics_data=[fg.data_class(version=12, topic=t, partitions=[0]) for t in ("t", "a_b-c")])
    request = parse_request(_encode(msg, correlation_id=9))
    result = split_by_topic(request, {"t"})
    assert isinstance(result, TopicSplit)
    assert result.forward.topics == ("orders", "a_b-c")


def test_broker_extras_kept_and_omissions_respected() -> None:
    """An incremental Fetch answer may leave an allowed topic out and add one from the session: both are kept as the broker said."""
    request = _request(1, 12, ("orders", "payments.v1", "t"))
    result = split_by_topic(request, {"payments.v1"})
    assert isinstance(result, TopicSplit)
    cls = RESPONSES[1]
    rf = cls._struct.fields["responses"]
    pd = rf.fields["partitions"].data_class
    broker = cls(version=12, throttle_time_ms=0, error_code=0, session_id=77, responses=[
        rf.data_class(version=12, topic=t, partitions=[pd(version=12, partition_index=0, error_code=0)])
        for t in ("a_b-c", "t")])
    broker.with_header(correlation_id=4242)
    raw = bytes(broker.encode(header=True, framed=True))
    merged = _decode(result.merge(KafkaResponse(api_key=1, api_version=12, correlation_id=4242, raw=raw)), 1, 12)
    assert [(_key(t), _codes(t)) for t in merged.responses] == [("payments.v1", {29}), ("t", {0}), ("a_b-c", {0})]
    assert merged.session_id == 77


def test_undecodable_broker_answer_is_malformed() -> None:
    """A broker answer that cannot be decoded at the request's version is MalformedMessage (the session closes)."""
    result = split_by_topic(_request(2, 5, ("orders", "t")), {"t"})
    assert isinstance(result, TopicSplit)
    bad = KafkaResponse(api_key=2, api_version=5, correlation_id=4242, raw=b"\x00\x00\x00\x06\x00\x00\x10\x92\xff\xff")
    with pytest.raises(MalformedMessage):
        result.merge(bad)
