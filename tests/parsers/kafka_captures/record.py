"""Re-record the Kafka request captures: real clients against tests/helpers/kafka_broker.py.

Usage: .venv/bin/python tests/parsers/kafka_captures/record.py
Writes `<client>-<round>-<api name>-v<version>.bin` (one request frame, size prefix included) for the
first request of each (client, api key, version) seen, and `expected.json` with what each must
parse to. Rounds: "new" (the broker's full version range) and "old" (the broker capped at Kafka 2.x-era
versions), so the clients' older code paths are captured too. kcat is librdkafka's CLI (Debian's
`kcat` package).
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from membrane.parsers.names import KAFKA_API_KEY_NAMES  # noqa: E402
from membrane.sandbox.kafka_broker import SUPPORTED, KafkaTestBroker  # noqa: E402

# Maximum versions of an older (Kafka 2.x era) broker for the APIs the test broker implements.
OLD_BROKER = {0: 8, 1: 11, 2: 5, 3: 9, 8: 8, 9: 7, 10: 3, 11: 7, 12: 4, 13: 4, 14: 5, 18: 3, 19: 5, 20: 4, 21: 1,
              22: 3, 23: 3, 24: 1, 25: 1, 26: 1, 28: 3, 32: 2, 37: 1}


TOPIC_KINDS = {0, 1, 2, 3, 8, 9, 19, 20, 21, 23, 24, 28, 32, 37}


def _acks(frame: bytes, version: int) -> int:
    from kafka.protocol.producer import ProduceRequest

    return int(ProduceRequest.decode(frame, version=version, header=True, framed=True).acks)


def _kafka_python(bootstrap: str, topic: str, group: str) -> None:
    from kafka import KafkaConsumer, KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    for i in range(3):
        producer.send(topic, key=b"k", value=f"kafka-python {i}".encode()).get(timeout=10)
    producer.close()
    fire = KafkaProducer(bootstrap_servers=bootstrap, acks=0)  # acks=0: a Produce with no response
    fire.send(topic, b"fire and forget")
    fire.flush()
    fire.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    for n, _ in enumerate(consumer, 1):
        if n == 4:
            break
    consumer.commit()
    consumer.close()


async def _aiokafka(bootstrap: str, topic: str, group: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    for i in range(3):
        await producer.send_and_wait(topic, f"aiokafka {i}".encode())
    await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                                auto_offset_reset="earliest")
    await consumer.start()
    n = 0
    async for _ in consumer:
        n += 1
        if n == 3:
            break
    await consumer.commit()
    await consumer.stop()


def _kafka_python_admin_and_txn(bootstrap: str, topic: str, group: str) -> None:
    from kafka import KafkaProducer
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
    from kafka.structs import OffsetAndMetadata, TopicPartition

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics({topic: {"num_partitions": 1, "replication_factor": 1}})
    admin.create_partitions({topic: 2})
    admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"tx-{topic}")
    producer.init_transactions()
    producer.begin_transaction()
    producer.send(topic, b"in a transaction", partition=0).get(timeout=10)
    producer.send_offsets_to_transaction({TopicPartition(topic, 0): OffsetAndMetadata(1, None, -1)}, group)
    producer.commit_transaction()
    producer.close()
    admin.delete_records({TopicPartition(topic, 0): 0})
    admin.delete_topics([topic])
    admin.close()


async def _aiokafka_admin_and_txn(bootstrap: str, topic: str, group: str) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic, RecordsToDelete
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
    from aiokafka.structs import TopicPartition

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
        await admin.create_partitions({topic: NewPartitions(2)})
        await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"tx-{topic}")
        await producer.start()
        try:
            async with producer.transaction():
                await producer.send_and_wait(topic, b"in a transaction", partition=0)
                await producer.send_offsets_to_transaction({TopicPartition(topic, 0): 1}, group)
        finally:
            await producer.stop()
        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(0)})
        await admin.delete_topics([topic])
    finally:
        await admin.close()


def _kcat(bootstrap: str, topic: str, group: str) -> None:
    subprocess.run(["kcat", "-b", bootstrap, "-P", "-t", topic], input=b"kcat 1\nkcat 2\n", check=True, timeout=30)
    subprocess.run(["kcat", "-b", bootstrap, "-C", "-t", topic, "-o", "beginning", "-e", "-q"], check=True,
                   timeout=30, capture_output=True)
    subprocess.run(["kcat", "-b", bootstrap, "-G", group, topic, "-o", "beginning", "-e", "-q"],
                   check=True, timeout=30, capture_output=True)


def record() -> dict[str, dict[str, object]]:
    expected: dict[str, dict[str, object]] = {}
    rounds = {"new": SUPPORTED, "old": {k: (lo, min(hi, OLD_BROKER[k])) for k, (lo, hi) in SUPPORTED.items()}}
    for round_name, supported in rounds.items():
        for client in ("kafka-python", "aiokafka", "kcat"):
            topic = f"cap-{client}-{round_name}"
            admin_topic = f"adm-{client}-{round_name}"  # admin and transactions
            group = f"grp-{client}-{round_name}"  # must not contain a topic name: frames are classified by them
            with KafkaTestBroker(supported=supported) as broker:
                if client == "kafka-python":
                    _kafka_python(broker.bootstrap, topic, group)
                    _kafka_python_admin_and_txn(broker.bootstrap, admin_topic, group)
                elif client == "aiokafka":
                    asyncio.run(_aiokafka(broker.bootstrap, topic, group))
                    asyncio.run(_aiokafka_admin_and_txn(broker.bootstrap, admin_topic, group))
                else:
                    _kcat(broker.bootstrap, topic, group)
                seen: set[tuple[int, int, bool, bool]] = set()
                for frame in broker.requests:
                    api_key, version = struct.unpack_from(">hh", frame, 4)
                    # Only these kinds name topics in fields; JoinGroup carries them inside opaque bytes.
                    named = [t for t in (topic, admin_topic) if api_key in TOPIC_KINDS and t.encode() in frame]
                    names_topic = bool(named)
                    acks0 = api_key == 0 and _acks(frame, version) == 0
                    if (api_key, version, names_topic, acks0) in seen:
                        continue
                    seen.add((api_key, version, names_topic, acks0))
                    suffix = ("-topic" if names_topic else "") + ("-acks0" if acks0 else "")
                    name = f"{client}-{round_name}-{KAFKA_API_KEY_NAMES[api_key]}-v{version}{suffix}.bin"
                    (HERE / name).write_bytes(frame)
                    expected[name] = {"api_key": api_key, "api_version": version,
                                      "topics": named, "expects_response": not acks0}
    return expected


if __name__ == "__main__":
    for old in HERE.glob("*.bin"):
        old.unlink()
    result = record()
    (HERE / "expected.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"{len(result)} captures written to {HERE}")
