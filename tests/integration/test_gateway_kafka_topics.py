"""Kafka per topic and under failure through `membrane gateway` (issue 13 items 4 and 5), with kafka-python,
aiokafka and raw frames against the test broker.

Case table
| client | what | expected |
|---|---|---|
| raw | Metadata naming orders and secret | one answer: orders as the broker said, secret 29; the broker never saw `secret` |
| kafka-python | one producer: secret refused, then orders | TopicAuthorizationFailedError for secret, orders delivered by the same producer |
| aiokafka | one producer: secret refused, then orders | the same |
| raw | an allowed Metadata, then a malformed frame | the allowed answer arrives, then EOF |
| raw | a 200 MiB size prefix, --max-buffer-bytes 64 KiB | EOF at once; limit counted in the log |
| raw | a broker that accepts and closes without answering | NETWORK_EXCEPTION (13) for the request, then EOF |
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from membrane.parsers.kafka import message_classes

from tests.integration.gateway_util import gateway
from tests.integration.test_gateway_kafka import _read_frames, kafka_policy, proxied_broker

pytestmark = pytest.mark.integration

REQUESTS, RESPONSES = message_classes()


def _metadata(correlation_id: int, *topics: str, version: int = 1) -> bytes:
    cls = REQUESTS[3]
    req = cls(version=version, topics=[cls.MetadataRequestTopic(name=t) for t in topics])
    req.with_header(correlation_id=correlation_id, client_id="mbr-test")
    return bytes(req.encode(header=True, framed=True))


def _metadata_errors(frame: bytes, version: int = 1) -> tuple[int, list[tuple[str, int]]]:
    decoded: Any = RESPONSES[3].decode(frame, version=version, header=True, framed=True)
    return decoded.header.correlation_id, [(t.name, t.error_code) for t in decoded.topics]


def _read_to_eof(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_metadata_answered_per_topic(tmp_path: Path) -> None:
    """Metadata naming an allowed and a denied topic: the broker answers for orders, the proxy adds 29 for secret."""
    with proxied_broker(tmp_path) as (broker, gw):
        before = len(broker.requests)
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(_metadata(7, "orders", "secret"))
            (frame,) = _read_frames(sock, 1)
        assert _metadata_errors(frame) == (7, [("orders", 0), ("secret", 29)])
        seen = broker.requests[before:]
        assert len(seen) == 1
        assert b"secret" not in seen[0]
        flows = gw.wait_flows(3)
        assert sorted(f["verdict"] for f in flows if f.get("Type") != "L3_L4") == ["DROPPED", "FORWARDED", "FORWARDED"]


def test_kafka_python_keeps_working_on_allowed_topics(tmp_path: Path) -> None:
    """One kafka-python producer is refused on secret and keeps producing to orders (no collateral damage)."""
    from kafka import KafkaProducer
    from kafka.errors import TopicAuthorizationFailedError

    with proxied_broker(tmp_path) as (broker, gw):
        producer = KafkaProducer(bootstrap_servers=f"127.0.0.1:{gw.port}", request_timeout_ms=5000,
                                 max_block_ms=5000, retries=0)
        try:
            producer.send("orders", b"before").get(timeout=10)
            with pytest.raises(TopicAuthorizationFailedError):
                producer.send("secret", b"leak").get(timeout=10)
            # The producer's later Metadata requests name both topics; they are answered per topic.
            for i in range(5):
                producer.send("orders", f"after-{i}".encode()).get(timeout=10)
        finally:
            producer.close(timeout=5)
        assert broker.messages("orders") == [b"before", *(f"after-{i}".encode() for i in range(5))]
        assert broker.messages("secret") == []


def test_aiokafka_keeps_working_on_allowed_topics(tmp_path: Path) -> None:
    """One aiokafka producer is refused on secret and keeps producing to orders."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import TopicAuthorizationFailedError

    async def main(bootstrap: str) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        await producer.start()
        try:
            with pytest.raises(TopicAuthorizationFailedError):
                await asyncio.wait_for(producer.send_and_wait("secret", b"leak"), 10)
            for i in range(3):
                await asyncio.wait_for(producer.send_and_wait("orders", f"ok-{i}".encode()), 10)
        finally:
            await producer.stop()

    with proxied_broker(tmp_path) as (broker, gw):
        asyncio.run(main(f"127.0.0.1:{gw.port}"))
        assert broker.messages("orders") == [b"ok-0", b"ok-1", b"ok-2"]
        assert broker.messages("secret") == []


def test_valid_request_before_a_malformed_frame_is_answered(tmp_path: Path) -> None:
    """An allowed Metadata and a malformed frame in one write: the answer to the first arrives, then EOF."""
    garbage = struct.pack(">i", 8) + b"\x00\x03\x00\x04\xff\xff\xff\xff"  # Metadata v4 cut after its header
    with proxied_broker(tmp_path) as (_broker, gw):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(_metadata(1, "orders") + garbage)
            data = _read_to_eof(sock)
        size = struct.unpack(">i", data[:4])[0]
        assert len(data) == 4 + size  # exactly one answer, then the close
        assert _metadata_errors(data) == (1, [("orders", 0)])


def test_oversized_frame_closes_at_once(tmp_path: Path) -> None:
    """A 200 MiB size prefix with --max-buffer-bytes 64 KiB is refused from its prefix: EOF, and the limit is logged."""
    from membrane.sandbox.kafka_broker import KafkaTestBroker

    with KafkaTestBroker() as broker, gateway(
        tmp_path, kafka_policy(broker.port), upstream_port=broker.port, dst="shop/kafka", src="shop/order-service",
        extra=["--max-buffer-bytes", "65536"],
    ) as gw:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(struct.pack(">i", 200 << 20) + b"\x00" * 65536)
            assert _read_to_eof(sock) == b""
        errors = [f for f in gw.wait_flows(1) if f["verdict"] == "ERROR"]
        assert len(errors) == 1
        assert "exceeds" in errors[0]["Summary"]
        gw.stop()
        assert "limit kafka_frame_bytes crossed" in gw.stderr_path.read_text()


@contextmanager
def _silent_broker() -> Iterator[int]:
    """A TCP server that reads one request per connection and closes without answering."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_broker_closing_unanswered_gets_network_exception(tmp_path: Path) -> None:
    """A broker that closes with the request unanswered: the client reads NETWORK_EXCEPTION (13), then EOF."""
    with _silent_broker() as port, gateway(
        tmp_path, kafka_policy(port), upstream_port=port, dst="shop/kafka", src="shop/order-service",
    ) as gw:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(_metadata(3, "orders"))
            data = _read_to_eof(sock)
        assert _metadata_errors(data) == (3, [("orders", 13)])
        errors = [f for f in gw.wait_flows(2) if f["verdict"] == "ERROR"]
        assert [f["l7"]["kafka"]["error_code"] for f in errors] == [13]
