"""Kafka through `membrane gateway` with raw frames, kafka-python, aiokafka and kcat against the test broker."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from membrane.parsers.kafka import message_classes
from membrane.sandbox.kafka_broker import KafkaTestBroker

from tests.integration.gateway_util import Gateway, gateway

pytestmark = pytest.mark.integration

TOPIC_AUTHORIZATION_FAILED = 29


def kafka_policy(port: int) -> str:
    """The order service may produce to and consume from `orders` only."""
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: kafka-orders
  namespace: shop
spec:
  endpointSelector:
    matchLabels:
      app: kafka
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: order-service
      toPorts:
        - ports:
            - port: "{port}"
              protocol: TCP
          rules:
            kafka:
              - role: produce
                topic: orders
              - role: consume
                topic: orders
"""


@contextmanager
def proxied_broker(tmp_path: Path) -> Iterator[tuple[KafkaTestBroker, Gateway]]:
    with KafkaTestBroker() as broker, gateway(
        tmp_path, kafka_policy(broker.port), upstream_port=broker.port, dst="shop/kafka", src="shop/order-service"
    ) as gw:
        broker.advertised_port = gw.port  # clients reconnect to the broker through the proxy
        broker.create_topic("orders")
        broker.create_topic("secret")
        yield broker, gw


def _metadata(correlation_id: int, topic: str) -> bytes:
    requests, _ = message_classes()
    req = requests[3](version=1, topics=[requests[3].MetadataRequestTopic(name=topic)])
    req.with_header(correlation_id=correlation_id, client_id="mbr-test")
    return bytes(req.encode(header=True, framed=True))


def _read_frames(sock: socket.socket, n: int) -> list[bytes]:
    buf = b""
    frames: list[bytes] = []
    while len(frames) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">i", buf[:4])[0]:
            size = struct.unpack(">i", buf[:4])[0]
            frames.append(buf[: 4 + size])
            buf = buf[4 + size :]
    return frames


def _topic_error(frame: bytes) -> tuple[int, int]:
    _, responses = message_classes()
    decoded: Any = responses[3].decode(frame, version=1, header=True, framed=True)
    as_dict = decoded.to_dict()
    return struct.unpack(">i", frame[4:8])[0], as_dict["topics"][0]["error_code"]


def test_pipelined_refusal_keeps_correlation_order(tmp_path: Path) -> None:
    """Pipelined requests are answered in correlation order: a refusal waits behind an earlier forwarded request; the broker never sees the denied one."""
    with proxied_broker(tmp_path) as (broker, gw):
        before = len(broker.requests)
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        sock.sendall(_metadata(1, "orders") + _metadata(2, "secret") + _metadata(3, "orders"))
        frames = _read_frames(sock, 3)
        assert [_topic_error(f) for f in frames] == [(1, 0), (2, TOPIC_AUTHORIZATION_FAILED), (3, 0)]
        # Same connection, a later denied and a later allowed request.
        sock.sendall(_metadata(4, "secret"))
        assert [_topic_error(f) for f in _read_frames(sock, 1)] == [(4, TOPIC_AUTHORIZATION_FAILED)]
        sock.sendall(_metadata(5, "orders"))
        assert [_topic_error(f) for f in _read_frames(sock, 1)] == [(5, 0)]
        sock.close()
        seen = broker.requests[before:]
        assert len(seen) == 3
        assert all(b"secret" not in frame for frame in seen)
        flows = gw.wait_flows(8)
        dropped = [f for f in flows if f["verdict"] == "DROPPED"]
        assert [f["l7"]["kafka"]["correlation_id"] for f in dropped] == [2, 4]
        assert all(f["l7"]["kafka"]["error_code"] == TOPIC_AUTHORIZATION_FAILED for f in dropped)


def test_kafka_python_produce_and_consume(tmp_path: Path) -> None:
    """kafka-python produces to and consumes `orders` through the proxy; producing to `secret` fails with TOPIC_AUTHORIZATION_FAILED."""
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.errors import KafkaError, TopicAuthorizationFailedError

    with proxied_broker(tmp_path) as (broker, gw):
        bootstrap = f"127.0.0.1:{gw.port}"
        producer = KafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000, max_block_ms=5000, retries=0)
        try:
            for i in range(10):
                producer.send("orders", f"order-{i}".encode()).get(timeout=10)
        finally:
            producer.close(timeout=5)
        # A fresh producer: kafka-python keeps a denied topic in every later Metadata request of a client.
        producer = KafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000, max_block_ms=5000, retries=0)
        try:
            # The Metadata request naming `secret` is refused with TOPIC_AUTHORIZATION_FAILED (with the
            # brokers the proxy learned, so kafka-python surfaces the error instead of waiting).
            with pytest.raises(KafkaError) as excinfo:
                producer.send("secret", b"leak").get(timeout=10)
            assert isinstance(excinfo.value, TopicAuthorizationFailedError)
        finally:
            producer.close(timeout=5)
        assert broker.messages("orders") == [f"order-{i}".encode() for i in range(10)]
        assert broker.messages("secret") == []
        consumer = KafkaConsumer(
            "orders", bootstrap_servers=bootstrap, group_id="billing", auto_offset_reset="earliest",
            consumer_timeout_ms=8000, request_timeout_ms=10000,
        )
        try:
            got = []
            for message in consumer:
                got.append(message.value)
                if len(got) == 10:
                    break
        finally:
            consumer.close()
        assert got == [f"order-{i}".encode() for i in range(10)]
        refused = [f for f in gw.flows() if f["verdict"] == "DROPPED"]
        assert refused
        assert all("secret" in f["l7"]["kafka"].get("topics", [f["l7"]["kafka"]["topic"]]) for f in refused)
        assert all(isinstance(f["l7"]["kafka"]["topic"], str) for f in refused)  # flow.proto: string topic
        assert all(f["l7"]["kafka"]["error_code"] == TOPIC_AUTHORIZATION_FAILED for f in refused)


def test_aiokafka_produce(tmp_path: Path) -> None:
    """aiokafka produces to `orders` through the proxy and is refused on `secret`."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import TopicAuthorizationFailedError

    async def main(bootstrap: str) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        await producer.start()
        try:
            await producer.send_and_wait("orders", b"from-aiokafka")
            with pytest.raises(TopicAuthorizationFailedError):
                await asyncio.wait_for(producer.send_and_wait("secret", b"leak"), 10)
        finally:
            await producer.stop()

    with proxied_broker(tmp_path) as (broker, gw):
        asyncio.run(main(f"127.0.0.1:{gw.port}"))
        assert broker.messages("orders") == [b"from-aiokafka"]
        assert broker.messages("secret") == []


def test_kcat_produce_and_consume(tmp_path: Path) -> None:
    """kcat (librdkafka) produces and consumes `orders` through the proxy; its produce to `secret` is refused."""
    with proxied_broker(tmp_path) as (broker, gw):
        bootstrap = f"127.0.0.1:{gw.port}"
        out = subprocess.run(
            ["kcat", "-b", bootstrap, "-t", "orders", "-P", "-X", "message.timeout.ms=8000"],
            input="one\ntwo\nthree\n", capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert broker.messages("orders") == [b"one", b"two", b"three"]
        out = subprocess.run(
            ["kcat", "-b", bootstrap, "-t", "orders", "-C", "-o", "beginning", "-e", "-q"],
            capture_output=True, text=True, timeout=30,
        )
        assert out.stdout.split() == ["one", "two", "three"], out.stderr
        out = subprocess.run(
            ["kcat", "-b", bootstrap, "-t", "secret", "-P", "-X", "message.timeout.ms=5000"],
            input="leak\n", capture_output=True, text=True, timeout=30,
        )
        assert broker.messages("secret") == []
        assert "authoriz" in (out.stderr + out.stdout).lower(), out.stderr
