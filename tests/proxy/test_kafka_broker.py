"""The test-suite Kafka broker (tests/helpers/kafka_broker.py) serves real clients on loopback.

Case table
| client | produce | consume (group, commit) |
|---|---|---|
| kafka-python | 3 messages, acks=all, idempotent | from earliest, commit, re-read committed offset |
| aiokafka | 3 messages | from earliest, commit |
| kcat (librdkafka) | 2 lines | -C from beginning, and -G group |
| advertised address | Metadata and FindCoordinator name the configured host/port | |
| refusals (deny_topics) | all three clients raise/print TOPIC_AUTHORIZATION_FAILED | |
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from membrane.parsers.kafka import KafkaRequestParser, KafkaResponseParser
from membrane.sandbox.kafka_broker import KafkaTestBroker

pytestmark = pytest.mark.integration


def test_kafka_python_produces_and_consumes() -> None:
    """kafka-python produces three records and a consumer group reads them back and commits its offset."""
    with KafkaTestBroker() as broker:
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", enable_idempotence=True)
        for i in range(3):
            producer.send("kp", f"m{i}".encode()).get(timeout=10)
        producer.close()
        assert broker.messages("kp") == [b"m0", b"m1", b"m2"]
        consumer = KafkaConsumer("kp", bootstrap_servers=broker.bootstrap, group_id="g-kp",
                                 auto_offset_reset="earliest", consumer_timeout_ms=5000, enable_auto_commit=False)
        got = []
        for message in consumer:
            got.append(message.value)
            if len(got) == 3:
                break
        consumer.commit()
        assert consumer.committed(TopicPartition("kp", 0)) == 3
        consumer.close()
        assert got == [b"m0", b"m1", b"m2"]


def test_aiokafka_produces_and_consumes() -> None:
    """aiokafka produces three records and a consumer group reads them back and commits."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    async def run(bootstrap: str) -> list[bytes]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for i in range(3):
                await producer.send_and_wait("ak", f"a{i}".encode())
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer("ak", bootstrap_servers=bootstrap, group_id="g-ak", auto_offset_reset="earliest")
        await consumer.start()
        got: list[bytes] = []
        try:
            async with asyncio.timeout(20):
                async for message in consumer:
                    got.append(message.value)
                    if len(got) == 3:
                        break
            await consumer.commit()
        finally:
            await consumer.stop()
        return got

    with KafkaTestBroker() as broker:
        assert asyncio.run(run(broker.bootstrap)) == [b"a0", b"a1", b"a2"]
        assert broker.messages("ak") == [b"a0", b"a1", b"a2"]


def test_kcat_produces_and_consumes() -> None:
    """kcat (librdkafka) produces two lines and reads them back, plainly and as a consumer group."""
    assert shutil.which("kcat"), "kcat missing: `make setup` installs Debian's kcat"
    with KafkaTestBroker() as broker:
        subprocess.run(["kcat", "-b", broker.bootstrap, "-P", "-t", "kc"], input=b"k1\nk2\n", check=True, timeout=30)
        assert broker.messages("kc") == [b"k1", b"k2"]
        plain = subprocess.run(["kcat", "-b", broker.bootstrap, "-C", "-t", "kc", "-o", "beginning", "-e", "-q"],
                               check=True, timeout=30, capture_output=True)
        assert plain.stdout == b"k1\nk2\n"
        group = subprocess.run(["kcat", "-b", broker.bootstrap, "-G", "g-kc", "kc", "-o", "beginning", "-e", "-q"],
                               check=True, timeout=30, capture_output=True)
        assert group.stdout == b"k1\nk2\n"


def test_advertised_address_is_what_clients_are_told() -> None:
    """Metadata names the advertised host/port, not the listen address, so a proxy can sit in front."""
    with KafkaTestBroker(advertised_host="127.0.0.9", advertised_port=19092) as broker:
        from kafka.protocol.metadata import MetadataRequest, MetadataResponse

        req = MetadataRequest(version=4, topics=None, allow_auto_topic_creation=False)
        req.with_header(correlation_id=1, client_id="t")
        import socket

        with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
            sock.sendall(bytes(req.encode(header=True, framed=True)))
            head = sock.recv(4, socket.MSG_WAITALL)
            body = sock.recv(struct.unpack(">i", head)[0], socket.MSG_WAITALL)
        resp = MetadataResponse.decode(head + body, version=4, header=True, framed=True)
        assert [(b.host, b.port) for b in resp.brokers] == [("127.0.0.9", 19092)]


def test_broker_traffic_parses_with_our_parsers() -> None:
    """Every request a real client sent, and every response, goes through KafkaRequestParser/KafkaResponseParser."""
    with KafkaTestBroker() as broker:
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        producer.send("pp", b"x").get(timeout=10)
        producer.close()
        frames = list(broker.requests)
    requests = KafkaRequestParser().feed(b"".join(frames))
    assert len(requests) == len(frames)
    assert any(r.api_key == 0 and r.topics == ("pp",) for r in requests)
    responses = KafkaResponseParser()
    for r in requests:
        responses.expect(r)
    assert responses.pending == sum(r.expects_response for r in requests)


def test_real_clients_read_our_refusals_as_authorization_errors() -> None:
    """kafka.refusal() answers, served for a denied topic, surface as TOPIC_AUTHORIZATION_FAILED (29) in all three clients."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import TopicAuthorizationFailedError as AioTopicAuthorizationFailedError
    from kafka.errors import TopicAuthorizationFailedError

    with KafkaTestBroker(deny_topics=frozenset({"secret"})) as broker:
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_block_ms=10000)
        with pytest.raises(TopicAuthorizationFailedError):
            producer.send("secret", b"x").get(timeout=10)
        producer.close()
        # A whole request is refused when it names a denied topic (as Cilium does): kafka-python keeps the
        # denied topic in its next Metadata requests, so the allowed topic goes through a fresh producer.
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        producer.send("open", b"y").get(timeout=10)
        producer.close()
        assert broker.messages("open") == [b"y"]
        assert "secret" not in broker.topics

        async def aio() -> None:
            p = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
            await p.start()
            try:
                with pytest.raises(AioTopicAuthorizationFailedError):
                    await p.send_and_wait("secret", b"x")
            finally:
                await p.stop()

        asyncio.run(aio())
        kcat = subprocess.run(["kcat", "-b", broker.bootstrap, "-P", "-t", "secret"], input=b"k\n",
                              capture_output=True, timeout=30)
        assert kcat.returncode != 0
        assert b"Topic authorization failed" in kcat.stderr


def test_topic_id_versions_round_trip_and_resolve() -> None:
    """Produce v13 and Fetch v13 by topic id work against the broker; the parser resolves their ids from Metadata v12 (KIP-516)."""
    import socket

    from kafka.record.memory_records import MemoryRecordsBuilder
    from membrane.parsers.events import KafkaResponse
    from membrane.parsers.kafka import message_classes, metadata_topic_ids, parse_request, resolve_topic_ids

    requests, responses = message_classes()

    def call(sock: socket.socket, msg: Any, version: int, correlation_id: int) -> tuple[bytes, bytes]:
        msg.with_header(correlation_id=correlation_id, client_id="t")
        frame = bytes(msg.encode(header=True, framed=True))
        sock.sendall(frame)
        head = sock.recv(4, socket.MSG_WAITALL)
        return frame, head + sock.recv(struct.unpack(">i", head)[0], socket.MSG_WAITALL)

    with KafkaTestBroker() as broker, socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
        topic = broker.create_topic("by-id")
        M, P, F = requests[3], requests[0], requests[1]
        _, raw = call(sock, M(version=12, topics=[M.MetadataRequestTopic(version=12, topic_id=None, name="by-id")],
                              allow_auto_topic_creation=False, include_topic_authorized_operations=False), 12, 1)
        names = metadata_topic_ids(KafkaResponse(api_key=3, api_version=12, correlation_id=1, raw=raw))
        assert names == {topic.topic_id.hex: "by-id"}
        builder = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 20)
        builder.append(0, b"k", b"v13")
        builder.close()
        PD = P.TopicProduceData.PartitionProduceData
        frame, _ = call(sock, P(version=13, transactional_id=None, acks=1, timeout_ms=1000, topic_data=[
            P.TopicProduceData(version=13, topic_id=topic.topic_id,
                               partition_data=[PD(version=13, index=0, records=bytes(builder.buffer()))])]), 13, 2)
        produce = parse_request(frame)
        assert not produce.topics_known
        assert resolve_topic_ids(produce, names).topics == ("by-id",)
        FP = F.FetchTopic.FetchPartition
        frame, raw = call(sock, F(version=13, replica_id=-1, max_wait_ms=10, min_bytes=1, max_bytes=1 << 20,
                                  isolation_level=0, session_id=0, session_epoch=-1, topics=[F.FetchTopic(
                                      version=13, topic_id=topic.topic_id, partitions=[FP(
                                          version=13, partition=0, current_leader_epoch=-1, fetch_offset=0,
                                          last_fetched_epoch=-1, log_start_offset=-1, partition_max_bytes=1 << 20)])],
                                  forgotten_topics_data=[], rack_id=""), 13, 3)
        fetched = responses[1].decode(raw, version=13, header=True, framed=True).responses[0]
        assert fetched.topic_id == topic.topic_id
        assert fetched.partitions[0].high_watermark == 1
        assert resolve_topic_ids(parse_request(frame), names).topics_known
        assert broker.messages("by-id") == [b"v13"]


def test_admin_and_transactional_clients() -> None:
    """kafka-python's admin client creates, grows, describes, truncates and deletes a topic; a transaction commits."""
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

    with KafkaTestBroker() as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        try:
            admin.create_topics({"adm": {"num_partitions": 1, "replication_factor": 1}})
            admin.create_partitions({"adm": 2})
            assert len(broker.topics["adm"].partitions) == 2
            admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, "adm")])
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap, transactional_id="tx-adm")
            producer.init_transactions()
            producer.begin_transaction()
            producer.send("adm", b"tx", partition=0).get(timeout=10)
            producer.commit_transaction()
            producer.close()
            assert broker.messages("adm") == [b"tx"]
            admin.delete_records({TopicPartition("adm", 0): 0})
            admin.delete_topics(["adm"])
            assert "adm" not in broker.topics
        finally:
            admin.close()
