"""Flow records (proxy/flows.py) are shaped after Hubble's flow JSON, redact credentials, and the ring is bounded."""

from __future__ import annotations

import io
import json

from proxy.flows import DROPPED, REQUEST, Flow, FlowContext, FlowSink, Peer, l7_dns, l7_http
from proxy.metrics import Metrics

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
