"""Kafka session per topic and under failure (issue 13 item 4 and 5), sans-I/O with a Playbook.

Case table
| input | expected |
|---|---|
| Metadata naming orders (allowed) and secret (denied) | orders forwarded alone; the client's answer lists orders as the broker said, secret with 29 |
| Produce of the same two topics | the broker sees orders only; 29 for secret in the answer |
| a kind without per-topic errors naming both | refused whole; the flow says why |
| allowed request, then a malformed frame | the allowed one is forwarded and answered, then the connection closes |
| a frame prefix over max_frame_bytes | closed at once (nothing owed), an ERROR flow with too_large |
| broker closes while an answer is owed | NETWORK_EXCEPTION (13) for it, then close |
| broker unreachable with a split request owed | 13 on the allowed topic, 29 on the denied one |
"""

from __future__ import annotations

import struct
from typing import Any

from membrane.parsers import kafka
from membrane.parsers.events import Direction, Reason
from membrane.proxy.session import Close, DataReceived, Forward, Log, PeerClosed, Reply, UpstreamFailed
from membrane.proxy.session_kafka import KafkaSession

from tests.helpers.playbook import LogMatch, Playbook
from tests.proxy.test_session import INFO, KAFKA_POLICY, _gateway, session_factory

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT
REQUESTS, RESPONSES = kafka.message_classes()


def _session() -> Any:
    gw = _gateway(KAFKA_POLICY, src="shop/order-service", dst="shop/kafka", port=9092)
    return session_factory(gw, "10.244.3.10")(INFO)


def _metadata(correlation_id: int, *topics: str) -> bytes:
    cls = REQUESTS[3]
    req = cls(version=1, topics=[cls.MetadataRequestTopic(name=t) for t in topics])
    req.with_header(correlation_id=correlation_id, client_id="t")
    return bytes(req.encode(header=True, framed=True))


def _metadata_answer(correlation_id: int, *topics: str) -> bytes:
    cls = RESPONSES[3]
    tf = cls._struct.fields["topics"]
    resp = cls(version=1, brokers=[], controller_id=0, topics=[
        tf.data_class(version=1, error_code=0, name=t, is_internal=False, partitions=[]) for t in topics])
    resp.with_header(correlation_id=correlation_id)
    return bytes(resp.encode(header=True, framed=True))


def _produce(correlation_id: int, *topics: str, acks: int = 1) -> bytes:
    cls = REQUESTS[0]
    f = cls._struct.fields["topic_data"]
    pd = f.fields["partition_data"].data_class
    req = cls(version=7, transactional_id=None, acks=acks, timeout_ms=100, topic_data=[
        f.data_class(version=7, name=t, partition_data=[pd(version=7, index=0, records=b"")]) for t in topics])
    req.with_header(correlation_id=correlation_id, client_id="t")
    return bytes(req.encode(header=True, framed=True))


def _produce_answer(correlation_id: int, *topics: str) -> bytes:
    cls = RESPONSES[0]
    rf = cls._struct.fields["responses"]
    pr = rf.fields["partition_responses"].data_class
    resp = cls(version=7, throttle_time_ms=0, responses=[
        rf.data_class(version=7, name=t, partition_responses=[pr(version=7, index=0, error_code=0, base_offset=5)])
        for t in topics])
    resp.with_header(correlation_id=correlation_id)
    return bytes(resp.encode(header=True, framed=True))


def _errors_by_topic(raw: bytes, api_key: int, version: int) -> list[tuple[str, int]]:
    decoded = RESPONSES[api_key].decode(raw, version=version, header=True, framed=True)
    assert decoded.header.correlation_id is not None
    if api_key == 3:
        return [(t.name, t.error_code) for t in decoded.topics]
    return [(t.name, p.error_code) for t in decoded.responses for p in t.partition_responses]


def _forwards(actions: list[Any], direction: Direction) -> list[bytes]:
    return [a.data for a in actions if isinstance(a, Forward) and a.direction is direction]


def test_metadata_split_per_topic() -> None:
    """Metadata for orders and secret: the broker is asked for orders only; the client gets both, secret with 29."""
    session = _session()
    actions = session.handle(DataReceived(C2S, _metadata(1, "orders", "secret")))
    assert _forwards(actions, C2S) == [_metadata(1, "orders")]
    logs = [a.flow for a in actions if isinstance(a, Log)]
    assert [f.verdict for f in logs] == ["FORWARDED", "DROPPED"]
    assert "split" in logs[1].summary
    answer = session.handle(DataReceived(S2C, _metadata_answer(1, "orders")))
    (merged,) = _forwards(answer, S2C)
    assert struct.unpack_from(">i", merged, 4)[0] == 1
    assert _errors_by_topic(merged, 3, 1) == [("orders", 0), ("secret", 29)]


def test_produce_split_per_topic() -> None:
    """Produce to orders and secret: only orders reaches the broker; the answer carries 29 for secret."""
    session = _session()
    actions = session.handle(DataReceived(C2S, _produce(4, "secret", "orders")))
    assert _forwards(actions, C2S) == [_produce(4, "orders")]
    answer = session.handle(DataReceived(S2C, _produce_answer(4, "orders")))
    (merged,) = _forwards(answer, S2C)
    assert _errors_by_topic(merged, 0, 7) == [("secret", 29), ("orders", 0)]


def test_acks0_produce_split_answers_nothing() -> None:
    """Produce acks=0 naming both topics: orders goes upstream, nothing is answered (the client reads nothing)."""
    session = _session()
    actions = session.handle(DataReceived(C2S, _produce(4, "secret", "orders", acks=0)))
    assert _forwards(actions, C2S) == [_produce(4, "orders", acks=0)]
    assert not [a for a in actions if isinstance(a, Reply)]
    assert session.is_idle


def test_unsplittable_kind_is_refused_whole_with_the_reason() -> None:
    """A DeleteRecords naming orders and secret has no per-topic split here: refused whole, the flow says why."""
    cls = REQUESTS[21]
    f = cls._struct.fields["topics"]
    pd = f.fields["partitions"].data_class
    req = cls(version=2, timeout_ms=10, topics=[f.data_class(version=2, name=t, partitions=[
        pd(version=2, partition_index=0, offset=1)]) for t in ("orders", "secret")])
    req.with_header(correlation_id=9, client_id="t")
    frame = bytes(req.encode(header=True, framed=True))
    actions = _session().handle(DataReceived(C2S, frame))
    assert _forwards(actions, C2S) == []
    flow, answered = [a.flow for a in actions if isinstance(a, Log)]
    assert flow.verdict == "DROPPED"
    assert "no per-topic errors" in flow.summary
    assert (answered.verdict, answered.l7_type, answered.l7["kafka"]["error_code"]) == ("FORWARDED", "RESPONSE", 29)
    assert [type(a) for a in actions if not isinstance(a, Log)] == [Reply]


def test_valid_request_before_a_malformed_one_is_answered() -> None:
    """An allowed request then a broken frame in one read: the allowed one is forwarded and its answer
    relayed before the connection closes (issue 13: valid requests before a malformed one keep their answers)."""
    garbage = struct.pack(">i", 8) + b"\x00\x03\x00\x04\xff\xff\xff\xff"  # Metadata v4 cut after the header
    assert (
        Playbook(_session(), logs=True)
        >> DataReceived(C2S, _metadata(1, "orders") + garbage + _metadata(2, "orders"))
        << Forward(C2S, _metadata(1, "orders"))
        << LogMatch(verdict="FORWARDED", l7_type="REQUEST")
        << LogMatch(verdict="ERROR", reason="malformed")
        >> DataReceived(C2S, _metadata(3, "orders"))
        >> DataReceived(S2C, _metadata_answer(1, "orders"))
        << Forward(S2C, _metadata_answer(1, "orders"))
        << LogMatch(verdict="FORWARDED", l7_type="RESPONSE")
        << Close()
    )


def test_oversized_frame_closes_without_buffering() -> None:
    """A size prefix over max_frame_bytes closes the connection at once with a too_large ERROR flow."""
    session = KafkaSession(context=_session().context, policy=_session().policy, max_frame_bytes=1024)
    assert (
        Playbook(session, logs=True)
        >> DataReceived(C2S, struct.pack(">i", 1025) + b"x" * 100)
        << LogMatch(verdict="ERROR", reason="too_large")
        << Close()
    )
    assert session.requests.buffered_bytes <= 1024 + 4


def test_broker_closing_with_answers_owed_gets_network_exception() -> None:
    """The broker closes while a request waits: the client gets NETWORK_EXCEPTION (13) for it, then the connection closes."""
    session = _session()
    session.handle(DataReceived(C2S, _metadata(1, "orders")))
    actions = session.handle(PeerClosed(S2C))
    (reply,) = [a.data for a in actions if isinstance(a, Reply)]
    assert _errors_by_topic(reply, 3, 1) == [("orders", 13)]
    assert actions[-1] == Close()


def test_broker_unreachable_with_a_split_request_owed() -> None:
    """Upstream failure of a split request: 13 on the allowed topic, 29 on the denied one, in request order."""
    session = _session()
    session.handle(DataReceived(C2S, _produce(4, "orders", "secret")))
    actions = session.handle(UpstreamFailed(Reason.UPSTREAM_FAILED))
    (reply,) = [a.data for a in actions if isinstance(a, Reply)]
    assert _errors_by_topic(reply, 0, 7) == [("orders", 13), ("secret", 29)]
    assert actions[-1] == Close()
