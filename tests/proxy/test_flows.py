"""Flow records (proxy/flows.py) are shaped after Hubble's flow JSON, redact credentials, and the ring is bounded."""

from __future__ import annotations

import io
import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from membrane.proxy.flows import (
    DROPPED,
    REQUEST,
    Flow,
    FlowContext,
    FlowSink,
    Peer,
    iso_time,
    l7_dns,
    l7_http,
    l7_kafka,
)
from membrane.proxy.metrics import Metrics

CTX = FlowContext(
    source=Peer(ip="10.244.1.20", port=40000, identity=1726, namespace="default", pod_name="backend", labels=("k8s:app=backend",)),
    destination=Peer(ip="10.244.1.10", port=80, identity=9776, namespace="default", pod_name="frontend"),
)


def _flow(n: int = 0) -> Flow:
    return Flow(
        context=CTX, verdict=DROPPED, l7_type=REQUEST,
        l7=l7_http(method="GET", url=f"http://a/{n}", protocol="HTTP/1.1", headers=(("Authorization", "Bearer x"), ("Accept", "*/*"))),
        summary="HTTP/1.1 GET http://a/", time_ns=1_764_130_000_000_000_000, rule="default/p: ingress[0]", reason="policy_denied",
    )


def test_hubble_shape_and_redaction() -> None:
    """A record has Hubble's fields (time, uuid, verdict, source/destination, l4, l7, traffic_direction, Summary); credentials are redacted."""
    record = _flow().to_json()
    assert record["verdict"] == "DROPPED" and record["Type"] == "L7" and record["traffic_direction"] == "INGRESS"
    assert record["time"] == "2025-11-26T04:06:40.000000Z"
    assert len(record["uuid"]) == 36
    assert record["source"]["pod_name"] == "backend" and record["source"]["identity"] == 1726
    assert record["l4"] == {"TCP": {"source_port": 40000, "destination_port": 80}}
    assert record["l7"]["type"] == "REQUEST" and record["l7"]["http"]["method"] == "GET"
    assert {"key": "authorization", "value": "[REDACTED]"} in record["l7"]["http"]["headers"]
    assert record["policy_rule"] == "default/p: ingress[0]" and record["drop_reason_desc"] == "POLICY_DENIED"
    flow = _flow()
    assert flow.to_json()["uuid"] == flow.to_json()["uuid"]  # stable once made
    dns = l7_dns(query="www.cilium.io.", qtypes=["A"], rcode=0, ips=["192.0.2.1"], ttl=60)
    assert dns == {"dns": {"query": "www.cilium.io.", "qtypes": ["A"], "ips": ["192.0.2.1"], "rcode": 0, "ttl": 60}}


def test_sink_writes_json_lines_and_ring_is_bounded() -> None:
    """Every record is one JSON line on each stream; the in-memory ring keeps only the newest ring_size records."""
    out = io.StringIO()
    sink = FlowSink([out], ring_size=3)
    for n in range(5):
        sink.emit(_flow(n))
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["l7"]["http"]["url"] for line in lines] == [f"http://a/{n}" for n in range(5)]
    assert [r["l7"]["http"]["url"] for r in sink.recent()] == ["http://a/2", "http://a/3", "http://a/4"]


def test_metrics_exposition_format() -> None:
    """Counters and histograms render as Prometheus text format 0.0.4 with escaped labels."""
    metrics = Metrics()
    metrics.requests.inc("http", "DROPPED")
    metrics.request_duration.observe(0.0003, "http")
    text = metrics.exposition()
    assert '# TYPE membrane_proxy_requests_total counter' in text
    assert 'membrane_proxy_requests_total{protocol="http",verdict="DROPPED"} 1' in text
    assert 'membrane_proxy_request_duration_seconds_bucket{protocol="http",le="0.0005"} 1' in text
    assert 'membrane_proxy_request_duration_seconds_bucket{protocol="http",le="0.00025"} 0' in text
    assert 'membrane_proxy_request_duration_seconds_count{protocol="http"} 1' in text


# --- cheap records: the JSON line, ids, timestamps, batched writes -------------------------------------------


def _variants() -> list[Flow]:
    v6 = FlowContext(
        source=Peer(ip="fd00::20", port=1, labels=("reserved:world",)),
        destination=Peer(ip="fd00::10", port=53, identity=7, namespace="kube-system", pod_name="coredns"),
        traffic_direction="EGRESS", transport="UDP",
    )
    response = Flow(
        context=CTX, verdict="FORWARDED", l7_type="RESPONSE", latency_ns=1_234_567,
        l7=l7_http(method="GET", url="http://a/\u00e9\"\\", protocol="HTTP/1.1", code=200, headers=(("Set-Cookie", "x"),)),
        summary="HTTP/1.1 200 1ms (GET http://a/\u2603)", time_ns=1_764_130_000_999_999_999,
    )
    dns_flow = Flow(context=v6, verdict="FORWARDED", l7_type=REQUEST, time_ns=5,
                    l7=l7_dns(query="a.b.", qtypes=["AAAA"]), summary="DNS Query a.b. AAAA", rule="kube-system/r")
    kafka_flow = Flow(context=CTX, verdict="ERROR", l7_type=REQUEST, time_ns=1, reason="malformed", summary="Kafka",
                      l7=l7_kafka(api_key="produce", api_version=3, correlation_id=9, topics=["a", "b"]))
    bare = Flow(context=CTX, verdict=DROPPED, l7_type=REQUEST, l7={}, summary="TCP connection refused", time_ns=0)
    return [_flow(), response, dns_flow, kafka_flow, bare]


def test_json_line_is_exactly_the_record() -> None:
    """to_line() is byte for byte json.dumps(to_json(), separators=(",", ":")) plus a newline, for every record shape."""
    for flow in _variants():
        assert flow.to_line() == json.dumps(flow.to_json(), separators=(",", ":")) + "\n"


def test_subclass_that_reshapes_the_record_is_written_as_reshaped() -> None:
    """A Flow subclass overriding to_json() (the agent's L3_L4 drop record) reaches the stream in its own shape."""

    @dataclass(slots=True, kw_only=True)
    class L4Flow(Flow):
        def to_json(self) -> dict[str, Any]:
            out = Flow.to_json(self)
            out["Type"] = "L3_L4"
            out.pop("l7", None)
            return out

    out = io.StringIO()
    FlowSink([out]).emit(L4Flow(context=CTX, verdict=DROPPED, l7_type=REQUEST, l7={}, summary="dropped", time_ns=0))
    record = json.loads(out.getvalue())
    assert record["Type"] == "L3_L4" and "l7" not in record


def test_flow_ids_are_unique_uuid4_strings() -> None:
    """Every record gets its own uuid4-shaped id (Hubble's `uuid`), made without os.urandom per record."""
    ids = [_flow().to_json()["uuid"] for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 36 and uuid.UUID(i).version == 4 for i in ids)


def test_time_is_truncated_to_microseconds_in_utc() -> None:
    """Timestamps are RFC 3339 UTC with microseconds, truncated (never rounded into the next second)."""
    assert iso_time(1_764_130_000_999_999_999) == "2025-11-26T04:06:40.999999Z"
    assert iso_time(1_764_130_001_000_000_000) == "2025-11-26T04:06:41.000000Z"
    assert iso_time(0) == "1970-01-01T00:00:00.000000Z"
    assert iso_time(1_764_130_000_000_001_000) == "2025-11-26T04:06:40.000001Z"


class _CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_deferred_writes_go_out_in_one_write_per_batch() -> None:
    """After defer_writes(schedule), records are written when the scheduled flush runs: one write and one flush per batch."""
    out = _CountingStream()
    sink = FlowSink([out])
    scheduled: list[Callable[[], None]] = []
    sink.defer_writes(scheduled.append)
    for n in range(5):
        sink.emit(_flow(n))
    assert out.getvalue() == "" and len(scheduled) == 1  # one flush scheduled for the whole batch
    assert [r["l7"]["http"]["url"] for r in sink.recent()] == [f"http://a/{n}" for n in range(5)]  # the ring has them now
    scheduled.pop()()
    assert [json.loads(line)["l7"]["http"]["url"] for line in out.getvalue().splitlines()] == [f"http://a/{n}" for n in range(5)]
    assert (out.writes, out.flushes) == (1, 1)
    sink.emit(_flow(5))
    assert len(scheduled) == 1  # the next batch schedules its own flush
    sink.close()  # close writes what is still queued
    assert len(out.getvalue().splitlines()) == 6


def test_deferred_writes_are_bounded() -> None:
    """At MAX_PENDING queued records the batch is written at once, whatever the schedule does."""
    out = io.StringIO()
    sink = FlowSink([out])
    sink.defer_writes(lambda flush: None)  # a loop that never runs the flush
    for n in range(FlowSink.MAX_PENDING):
        sink.emit(_flow(n))
    assert len(out.getvalue().splitlines()) == FlowSink.MAX_PENDING


def test_records_from_another_thread_are_written_at_once() -> None:
    """Only the loop's own thread defers: a record emitted from another thread is written synchronously."""
    out = io.StringIO()
    sink = FlowSink([out])
    sink.defer_writes(lambda flush: None)
    worker = threading.Thread(target=sink.emit, args=(_flow(1),))
    worker.start()
    worker.join()
    assert json.loads(out.getvalue())["l7"]["http"]["url"] == "http://a/1"


def test_kafka_topic_is_a_string_like_hubble() -> None:
    """Hubble's flow.proto `Kafka.topic` is a string: one topic as `topic`, several as the first plus a `topics` list."""
    one = l7_kafka(api_key="produce", api_version=3, correlation_id=9, topics=["payments"])["kafka"]
    assert one["topic"] == "payments" and "topics" not in one
    many = l7_kafka(api_key="produce", api_version=3, correlation_id=9, topics=["a", "b"])["kafka"]
    assert many["topic"] == "a" and many["topics"] == ["a", "b"]
    none = l7_kafka(api_key="api_versions", api_version=3, correlation_id=1)["kafka"]
    assert none["topic"] == "" and "topics" not in none
