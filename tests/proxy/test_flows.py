"""Flow records (proxy/flows.py) are shaped after Hubble's flow JSON, redact credentials, and the ring is bounded."""

from __future__ import annotations

import io
import json
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from membrane.proxy.flows import (
    DROPPED,
    REQUEST,
    RESPONSE,
    Flow,
    FlowContext,
    FlowSink,
    L3L4Flow,
    Peer,
    RotatingFile,
    envelope,
    iso_time,
    l7_dns,
    l7_http,
    l7_kafka,
    refusal_response,
    rotated_paths,
)
from membrane.proxy.metrics import Metrics

from tests.proxy.hubble_schema import schema_validator

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
    """A record has flow.proto's fields (time, uuid, verdict, IP, l4, source/destination, Type, l7, event_type,
    traffic_direction, is_reply, Summary); endpoints carry no ip/port; credentials are redacted."""
    record = _flow().to_json("node-1")
    assert record["verdict"] == "DROPPED"
    assert record["Type"] == "L7"
    assert record["traffic_direction"] == "INGRESS"
    assert record["node_name"] == "node-1"
    assert record["time"] == "2025-11-26T04:06:40Z"  # protojson: no fraction when there is none
    assert len(record["uuid"]) == 36
    assert record["source"] == {"identity": 1726, "namespace": "default", "labels": ["k8s:app=backend"], "pod_name": "backend"}
    assert record["IP"] == {"source": "10.244.1.20", "destination": "10.244.1.10", "ipVersion": "IPv4"}
    assert record["l4"] == {"TCP": {"source_port": 40000, "destination_port": 80}}
    assert record["l7"]["type"] == "REQUEST"
    assert "latency_ns" not in record["l7"]  # zero: left out, as protojson does
    assert record["l7"]["http"]["method"] == "GET"
    assert {"key": "authorization", "value": "[REDACTED]"} in record["l7"]["http"]["headers"]
    assert record["event_type"] == {"type": 129}
    assert record["is_reply"] is False
    assert "drop_reason_desc" not in record  # Hubble's L7 records carry no drop reason; L3/L4 drops do
    assert "policy_rule" not in record
    assert record["ingress_denied_by"] == [{
        "name": "p", "namespace": "default",
        "labels": ["k8s:io.cilium.k8s.policy.derived-from=CiliumNetworkPolicy", "k8s:io.cilium.k8s.policy.name=p",
                   "k8s:io.cilium.k8s.policy.namespace=default"],
        "kind": "CiliumNetworkPolicy",
    }]
    flow = _flow()
    assert flow.to_json()["uuid"] == flow.to_json()["uuid"]  # stable once made
    dns = l7_dns(query="www.cilium.io.", qtypes=["A"], rcode=0, ips=["192.0.2.1"], ttl=60, cnames=["x.cilium.io."],
                 rrtypes=["CNAME", "A"])
    assert dns == {"dns": {"query": "www.cilium.io.", "qtypes": ["A"], "ips": ["192.0.2.1"], "rcode": 0, "ttl": 60,
                           "cnames": ["x.cilium.io."], "rrtypes": ["CNAME", "A"], "observation_source": "proxy"}}


def test_envelope_is_hubbles_get_flows_response() -> None:
    """A written line is `hubble observe -o json`'s GetFlowsResponse: {"flow": ..., "node_name": ..., "time": ...}."""
    line = json.loads(_flow().to_line("node-1"))
    assert sorted(line) == ["flow", "node_name", "time"]
    assert line["node_name"] == "node-1"
    assert line["time"] == line["flow"]["time"]
    assert line["flow"]["node_name"] == "node-1"


def test_response_goes_from_server_to_client() -> None:
    """An L7 response is recorded from the server to the client (Hubble swaps the ends and sets is_reply)."""
    record = _variants()[1].to_json()
    assert record["is_reply"] is True
    assert record["reply"] is True  # the deprecated bool, still filled by Hubble
    assert record["IP"]["source"] == "10.244.1.10"
    assert record["source"]["pod_name"] == "frontend"
    assert record["l4"] == {"TCP": {"source_port": 80, "destination_port": 40000}}
    assert record["l7"]["latency_ns"] == "1234567"  # uint64: a string in protojson


@pytest.mark.parametrize(
    ("verdict", "rule", "key", "drop"),
    [
        ("FORWARDED", "default/api: ingress[0].toPorts[0].rules.http[1]", "ingress_allowed_by", None),
        ("FORWARDED", "web: egress[2]", "egress_allowed_by", None),
        ("DROPPED", "default/deny: specs[1].ingressDeny[0]", "ingress_denied_by", "POLICY_DENY"),
        ("DROPPED", "default/api: ingress[0].toPorts[0]", "ingress_denied_by", "POLICY_DENIED"),
        ("DROPPED", None, None, "POLICY_DENIED"),
    ],
)
def test_policy_objects_and_drop_reasons(verdict: str, rule: str | None, key: str | None, drop: str | None) -> None:
    """Rule references become flow.proto Policy objects in the list of their direction and outcome; a deny rule's
    drop is POLICY_DENY (181), a default-deny drop POLICY_DENIED (133), as flow.proto's DropReason names them."""
    flow = L3L4Flow(context=CTX, verdict=verdict, l7_type=REQUEST, l7={}, summary="s", time_ns=1, rule=rule,
                    reason="policy_denied" if verdict == DROPPED else None, policy_revision=7)
    record = flow.to_json()
    lists = [k for k in ("egress_allowed_by", "ingress_allowed_by", "egress_denied_by", "ingress_denied_by") if k in record]
    assert lists == ([key] if key else [])
    if key is not None:
        policy = record[key][0]
        assert policy["revision"] == "7"
        assert policy["kind"] == ("CiliumClusterwideNetworkPolicy" if rule and rule.startswith("web") else "CiliumNetworkPolicy")
    assert record.get("drop_reason_desc") == drop
    if drop is not None:
        assert record["event_type"] == {"type": 1, "sub_type": {"POLICY_DENY": 181, "POLICY_DENIED": 133}[drop]}
        assert record["drop_reason"] == record["event_type"]["sub_type"]


def test_refusal_response_record() -> None:
    """A refused request's response record is what Hubble shows after the DROPPED request: a FORWARDED
    http-response with the refusal's status, from the server to the client."""
    request = _flow()
    response = refusal_response(request, time_ns=request.time_ns + 2_000_000, status=403)
    record = response.to_json()
    assert record["verdict"] == "FORWARDED"
    assert record["is_reply"] is True
    assert record["l7"]["type"] == "RESPONSE"
    assert record["l7"]["http"]["code"] == 403
    assert record["l7"]["http"]["url"] == "http://a/0"
    assert record["Summary"] == "HTTP/1.1 403 2ms (GET http://a/0)"


def test_every_record_shape_validates_against_hubbles_schema() -> None:
    """Every record shape, as written, validates against the JSON Schema derived from flow.proto (v1.19.4):
    nothing outside Hubble's schema, every enum a flow.proto name, 64-bit integers as strings."""
    validator = schema_validator()
    for flow in [*_variants(), refusal_response(_flow(), time_ns=2, status=403)]:
        line = json.loads(flow.to_line("node-1"))
        errors = sorted(str(e.message) for e in validator.iter_errors(line))
        assert errors == [], (flow, errors)


def test_schema_rejects_what_is_not_hubbles() -> None:
    """The vendored schema is strict: an extra field, a wrong enum name and a numeric uint64 each fail."""
    validator = schema_validator()
    good = json.loads(_flow().to_line("n"))
    assert not list(validator.iter_errors(good))
    for mutate in (
        lambda r: r["flow"].__setitem__("policy_rule", "x"),
        lambda r: r["flow"]["source"].__setitem__("ip", "10.0.0.1"),
        lambda r: r["flow"].__setitem__("drop_reason_desc", "MALFORMED"),
        lambda r: r["flow"]["l7"].__setitem__("latency_ns", 5),
    ):
        bad = json.loads(json.dumps(good))
        mutate(bad)
        assert list(validator.iter_errors(bad)), bad


def test_node_name_defaults_to_env_then_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sink without a node name uses $NODE_NAME (the DaemonSet sets it), else the hostname."""
    monkeypatch.setenv("NODE_NAME", "worker-7")
    assert FlowSink().node_name == "worker-7"
    monkeypatch.delenv("NODE_NAME")
    assert FlowSink().node_name == socket.gethostname()
    assert FlowSink(node_name="n1").node_name == "n1"


def test_sink_writes_json_lines_and_ring_is_bounded() -> None:
    """Every record is one JSON line on each stream; the in-memory ring keeps only the newest ring_size records."""
    out = io.StringIO()
    sink = FlowSink([out], ring_size=3)
    for n in range(5):
        sink.emit(_flow(n))
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["flow"]["l7"]["http"]["url"] for line in lines] == [f"http://a/{n}" for n in range(5)]
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
    """to_line() is byte for byte json.dumps(envelope(to_json()), separators=(",", ":")) plus a newline, for every
    record shape, with and without a node name."""
    for node in ("", "node-1"):
        for flow in _variants():
            assert flow.to_line(node) == json.dumps(envelope(flow.to_json(node), node), separators=(",", ":")) + "\n"


def test_json_line_of_a_repeated_http_record_is_exact() -> None:
    """The HTTP record's JSON is reused for a record with the same code, method, url, protocol and headers:
    a request and a response, another latency or verdict, still give exactly the record's own JSON."""
    headers = (("Authorization", "Bearer x"), ("Content-Type", "text/plain"))
    for n, (l7_type, latency, verdict, code) in enumerate(
        [(REQUEST, 0, DROPPED, 0), (REQUEST, 0, "FORWARDED", 0), (RESPONSE, 1_234_567, "FORWARDED", 200),
         (RESPONSE, 7, "FORWARDED", 200), (RESPONSE, 7, "FORWARDED", 403)] * 2
    ):
        flow = Flow(context=CTX, verdict=verdict, l7_type=l7_type, latency_ns=latency, time_ns=1_764_130_000_000_000_000 + n,
                    l7=l7_http(method="GET", url="http://a/", protocol="HTTP/1.1", code=code, headers=headers),
                    summary=f"s{n}", rule="default/p: ingress[0]")
        assert flow.to_line("n") == json.dumps(envelope(flow.to_json("n"), "n"), separators=(",", ":")) + "\n"


def test_subclass_that_reshapes_the_record_is_written_as_reshaped() -> None:
    """A Flow subclass overriding to_json() (the agent's L3_L4 drop record) reaches the stream in its own shape."""

    @dataclass(kw_only=True)  # not slots=True: Flow may be compiled (native/modules.txt)
    class L4Flow(Flow):
        def to_json(self) -> dict[str, Any]:
            out = Flow.to_json(self)
            out["Type"] = "L3_L4"
            out.pop("l7", None)
            return out

    out = io.StringIO()
    FlowSink([out]).emit(L4Flow(context=CTX, verdict=DROPPED, l7_type=REQUEST, l7={}, summary="dropped", time_ns=0))
    record = json.loads(out.getvalue())["flow"]
    assert record["Type"] == "L3_L4"
    assert "l7" not in record


def test_flow_ids_are_unique_uuid4_strings() -> None:
    """Every record gets its own uuid4-shaped id (Hubble's `uuid`), made without os.urandom per record."""
    ids = [_flow().to_json()["uuid"] for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 36 and uuid.UUID(i).version == 4 for i in ids)


def test_time_is_protojson_timestamp_in_utc() -> None:
    """Timestamps are RFC 3339 UTC as protojson writes them: no fraction, or 3, 6 or 9 digits, never rounded."""
    assert iso_time(1_764_130_000_999_999_999) == "2025-11-26T04:06:40.999999999Z"
    assert iso_time(1_764_130_001_000_000_000) == "2025-11-26T04:06:41Z"
    assert iso_time(0) == "1970-01-01T00:00:00Z"
    assert iso_time(1_764_130_000_000_001_000) == "2025-11-26T04:06:40.000001Z"
    assert iso_time(1_764_130_000_120_000_000) == "2025-11-26T04:06:40.120Z"


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
    assert out.getvalue() == ""
    assert len(scheduled) == 1
    assert [r["l7"]["http"]["url"] for r in sink.recent()] == [f"http://a/{n}" for n in range(5)]  # the ring has them now
    scheduled.pop()()
    assert [json.loads(line)["flow"]["l7"]["http"]["url"] for line in out.getvalue().splitlines()] == [f"http://a/{n}" for n in range(5)]
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
    assert json.loads(out.getvalue())["flow"]["l7"]["http"]["url"] == "http://a/1"


class _GatedStream(io.StringIO):
    """A stream whose writes record their thread and can be held (a flows disk that fell behind)."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def write(self, s: str) -> int:
        self.threads.add(threading.get_ident())
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().write(s)


def test_writer_thread_formats_and_writes_off_the_emitting_thread() -> None:
    """After start_writer() the records reach the stream from the sink's own thread, in order, all of them."""
    out = _GatedStream()
    sink = FlowSink([out])
    sink.start_writer()
    for n in range(300):
        sink.emit(_flow(n))
    assert [r["l7"]["http"]["url"] for r in sink.recent()][-1] == "http://a/299"  # the ring has them at once
    assert out.entered.wait(30)
    assert threading.get_ident() not in out.threads  # the first batch was written by the writer thread
    sink.close()  # writes the rest and stops the thread
    urls = [json.loads(line)["flow"]["l7"]["http"]["url"] for line in out.getvalue().splitlines()]
    assert urls == [f"http://a/{n}" for n in range(300)]
    assert sink.dropped == 0
    sink.emit(_flow(300))  # after close the sink writes synchronously again
    assert json.loads(out.getvalue().splitlines()[-1])["flow"]["l7"]["http"]["url"] == "http://a/300"


def test_writer_queue_is_bounded_and_drops_are_counted() -> None:
    """A writer that is behind never holds up emit(): records beyond max_queue are dropped and counted
    (the metric membrane_flows_dropped_total through on_dropped); the ring and listeners still get them."""
    out = _GatedStream()
    out.gate.clear()  # the disk stalls
    metrics = Metrics()
    sink = FlowSink([out], max_queue=10)
    sink.on_dropped = metrics.flows_dropped.inc
    followed: list[Any] = []
    sink.add_listener(followed.append)
    sink.start_writer()
    sink.emit(_flow(0))
    assert out.entered.wait(30)  # the writer took record 0 and is stuck writing it
    for n in range(1, 16):
        sink.emit(_flow(n))
    assert sink.dropped == 5
    assert metrics.flows_dropped.get() == 5
    assert "membrane_flows_dropped_total 5" in metrics.exposition()
    assert len(followed) == 16 and len(sink.records()) == 16
    out.gate.set()
    sink.close()
    urls = [json.loads(line)["flow"]["l7"]["http"]["url"] for line in out.getvalue().splitlines()]
    assert urls == [f"http://a/{n}" for n in range(11)]


def test_writer_thread_writes_lines_formatted_on_the_loop() -> None:
    """start_writer(schedule), as the server runs it: a loop pass's records become one string when the scheduled
    callback runs, the writer thread writes it; when the writer is max_queue records behind, a pass's lines are
    dropped and counted, and emit() never waits."""
    out = _GatedStream()
    out.gate.clear()  # the disk stalls
    sink = FlowSink([out], max_queue=4)
    dropped: list[int] = []
    sink.on_dropped = lambda: dropped.append(1)
    scheduled: list[Callable[[], None]] = []
    sink.start_writer(scheduled.append)
    for n in range(3):
        sink.emit(_flow(n))
    assert len(scheduled) == 1 and out.getvalue() == ""
    scheduled.pop()()  # the loop pass ends: 3 records go to the writer as one chunk
    assert out.entered.wait(30)
    assert threading.get_ident() not in out.threads
    for n in range(3, 6):  # the next pass: 3 more would make 6 queued > 4: dropped, counted
        sink.emit(_flow(n))
    scheduled.pop()()
    assert sink.dropped == 3 and len(dropped) == 3
    sink.emit(_flow(6))
    scheduled.pop()()  # 3 + 1 <= 4: kept
    assert sink.dropped == 3
    out.gate.set()
    sink.close()
    urls = [json.loads(line)["flow"]["l7"]["http"]["url"] for line in out.getvalue().splitlines()]
    assert urls == ["http://a/0", "http://a/1", "http://a/2", "http://a/6"]
    assert len(sink.records()) == 7  # the ring (and `membrane observe`) had every record


def test_kafka_topic_is_a_string_like_hubble() -> None:
    """Hubble's flow.proto `Kafka.topic` is a string: the first topic; no `topics` list outside the schema."""
    one = l7_kafka(api_key="produce", api_version=3, correlation_id=9, topics=["payments"])["kafka"]
    assert one["topic"] == "payments"
    many = l7_kafka(api_key="produce", api_version=3, correlation_id=9, topics=["a", "b"])["kafka"]
    assert many["topic"] == "a"
    assert "topics" not in many
    none = l7_kafka(api_key="api_versions", api_version=3, correlation_id=1)["kafka"]
    record = Flow(context=CTX, verdict="FORWARDED", l7_type=REQUEST, l7={"kafka": none}, summary="k", time_ns=1).to_json()
    assert "topic" not in record["l7"]["kafka"]  # "" is protojson's zero value: left out


# --- rotation ---------------------------------------------------------------------------------------------


def test_rotating_file_keeps_bounded_backups_and_every_line(tmp_path: Path) -> None:
    """Two writers on one path (two gateway workers) rotate it at max_bytes into name.1 ... name.N: no line is lost
    or split while the backups last, and never more than max_backups old files exist."""
    path = tmp_path / "flows.jsonl"
    writers = [RotatingFile(str(path), max_bytes=4096, max_backups=50) for _ in range(2)]
    sinks = [FlowSink([w], node_name="n") for w in writers]
    sent = []
    for n in range(200):
        flow = _flow(n)
        sinks[n % 2].emit(flow)
        sent.append(flow.flow_id)
    for w in writers:
        w.close()
    files = rotated_paths(str(path))
    assert len(files) > 5  # it did rotate, many times
    got = [json.loads(line)["flow"]["uuid"] for f in files for line in Path(f).read_text().splitlines()]
    assert sorted(got) == sorted(sent)
    assert all(Path(f).stat().st_size < 4096 + 2048 for f in files)

    few = tmp_path / "few.jsonl"
    writer = RotatingFile(str(few), max_bytes=2048, max_backups=2)
    sink = FlowSink([writer])
    for n in range(50):
        sink.emit(_flow(n))
    writer.close()
    assert [Path(p).name for p in rotated_paths(str(few))] == ["few.jsonl.2", "few.jsonl.1", "few.jsonl"]
