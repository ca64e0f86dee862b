"""The agent's metric families: L7 by workload (with the cardinality cap and the off switch), DNS by
rcode and qtype, workload names, worker snapshots merged, and the Grafana dashboard's PromQL held to
the names the exposition really has."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from membrane.proxy.flows import (
    DROPPED,
    FORWARDED,
    REQUEST,
    RESPONSE,
    Flow,
    FlowContext,
    Peer,
    Workload,
    l7_dns,
    l7_http,
)
from membrane.proxy.metrics import Metrics, workload_name
from membrane.proxy.server import Proxy, ProxyConfig
from membrane.proxy.session import Log

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "membrane-dashboard.json"


def ctx(src_pod: str = "backend-7d4b9c8f6d-x2x9q", dst_pod: str = "frontend", dst_labels: tuple[str, ...] = ()) -> FlowContext:
    return FlowContext(
        source=Peer(ip="10.0.0.1", port=40000, namespace="shop", pod_name=src_pod),
        destination=Peer(ip="10.0.0.2", port=80, namespace="web", pod_name=dst_pod, labels=dst_labels),
    )


def proxy(metrics: Metrics) -> Proxy:
    return Proxy(config=ProxyConfig(), factory=lambda *a: None, upstream=None, metrics=metrics)  # type: ignore[arg-type,return-value]


def http(context: FlowContext, l7_type: str, verdict: str, method: str = "GET", code: int = 0) -> Log:
    return Log(flow=Flow(context=context, verdict=verdict, l7_type=l7_type,
                         l7=l7_http(method=method, url="http://x/", protocol="HTTP/1.1", code=code), summary="", time_ns=1,
                         latency_ns=1000 if l7_type == RESPONSE else 0))


def dns(context: FlowContext, l7_type: str, verdict: str, rcode: int | None = None) -> Log:
    return Log(flow=Flow(context=context, verdict=verdict, l7_type=l7_type,
                         l7=l7_dns(query="a.test.", qtypes=["AAAA"], rcode=rcode), summary="", time_ns=1))


def scrape_names(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_workload_name_prefers_owner_then_app_label_then_stripped_pod_name() -> None:
    assert workload_name("ns", "api-5f7c8d9b4-x2bvq", ("k8s:app=shop",), (Workload(name="api", kind="Deployment"),)) == "api"
    assert workload_name("ns", "api-5f7c8d9b4-x2bvq", ("k8s:app=shop",), ()) == "shop"
    assert workload_name("ns", "api-5f7c8d9b4-x2bvq", (), ()) == "api"
    assert workload_name("ns", "db-0", (), ()) == "db-0"  # a StatefulSet ordinal is not a hash
    assert workload_name("ns", "node-exporter-x7k2p", (), ()) == "node-exporter"  # DaemonSet pod
    assert workload_name("", "", ("reserved:world",), ()) == "world"


def test_http_requests_and_responses_by_verdict_method_code_and_workloads() -> None:
    m = Metrics()
    p = proxy(m)
    c = ctx()
    p.record(http(c, REQUEST, FORWARDED))
    p.record(http(c, RESPONSE, FORWARDED, code=200))
    p.record(http(c, REQUEST, DROPPED, method="POST"))
    wl = ("shop", "backend", "web", "frontend")
    assert m.l7_requests.get("http", FORWARDED, "GET", *wl) == 1
    assert m.l7_requests.get("http", DROPPED, "POST", *wl) == 1
    assert m.l7_responses.get("http", "200", *wl) == 1
    assert m.request_duration.count("http") == 1
    text = m.exposition()
    assert ('membrane_l7_requests_total{protocol="http",verdict="DROPPED",method="POST",source_namespace="shop",'
            'source_workload="backend",destination_namespace="web",destination_workload="frontend"} 1') in text


def test_label_tuple_is_made_once_per_connection() -> None:
    m = Metrics()
    p = proxy(m)
    c = ctx()
    p.record(http(c, REQUEST, FORWARDED))
    first = c.metric_labels[0]
    p.record(http(c, REQUEST, FORWARDED))
    assert c.metric_labels == [first]
    assert m.l7_requests.get("http", FORWARDED, "GET", *first) == 2


def test_workload_labels_off_leaves_them_empty() -> None:
    m = Metrics(workload_labels=False)
    proxy(m).record(http(ctx(), REQUEST, FORWARDED))
    assert m.l7_requests.get("http", FORWARDED, "GET", "", "", "", "") == 1
    assert "source_workload=\"backend\"" not in m.exposition()


def test_workload_pairs_beyond_the_cap_count_as_other() -> None:
    m = Metrics(max_workload_pairs=2)
    p = proxy(m)
    for i in range(5):
        p.record(http(ctx(dst_pod=f"svc{i}"), REQUEST, FORWARDED))
    assert m.l7_requests.get("http", FORWARDED, "GET", "other", "other", "other", "other") == 3
    assert len(m.l7_requests.values) == 3  # two pairs of their own, one `other`


def test_dns_queries_and_responses_by_qtype_and_rcode() -> None:
    m = Metrics()
    p = proxy(m)
    c = ctx()
    p.record(dns(c, REQUEST, DROPPED))
    p.record(dns(c, RESPONSE, FORWARDED, rcode=3))
    p.record(dns(c, RESPONSE, DROPPED, rcode=5))
    assert m.dns_queries.get(DROPPED, "AAAA") == 1
    assert m.dns_responses.get("NXDOMAIN", "AAAA") == 1
    assert m.dns_responses.get("REFUSED", "AAAA") == 1


def test_worker_snapshots_merge_new_families() -> None:
    main, worker = Metrics(), Metrics()
    main.drops.inc("POLICY_DENIED", "INGRESS")
    proxy(worker).record(http(ctx(), REQUEST, FORWARDED))
    worker.policy_delay.observe(0.02)
    merged = json.loads(json.dumps(worker.snapshot()))  # as it crosses the control channel
    total = main.merged([merged])
    assert total.drops.get("POLICY_DENIED", "INGRESS") == 1
    assert total.l7_requests.get("http", FORWARDED, "GET", "shop", "backend", "web", "frontend") == 1
    assert total.policy_delay.count() == 1


def dashboard_metric_names() -> dict[str, set[str]]:
    """Panel title -> the metric names its PromQL expressions reference (histogram suffixes removed)."""
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    functions = {"sum", "rate", "increase", "max", "min", "avg", "histogram_quantile", "by", "without", "le", "count"}
    out: dict[str, set[str]] = {}
    for panel in doc["panels"]:
        names: set[str] = set()
        for target in panel["targets"]:
            expr = re.sub(r'"[^"]*"', '""', target["expr"])  # label values are not metric names
            expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
            expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)  # grouping labels
            expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
            for ident in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
                if ident not in functions:
                    names.add(re.sub(r"_(bucket|sum|count)$", "", ident) if ident.endswith(("_bucket",)) else ident)
        out[panel["title"]] = names
    return out


def test_every_dashboard_panel_queries_only_metrics_the_agent_exposes() -> None:
    exposed = scrape_names(Metrics().exposition())
    panels = dashboard_metric_names()
    assert len(panels) >= 8
    for title, names in panels.items():
        assert names, f"panel {title!r} references no metric"
        assert names <= exposed, f"panel {title!r} references {sorted(names - exposed)}, not exposed"


def test_dashboard_check_catches_a_wrong_name() -> None:
    """The parser really sees names: a misspelt metric is not in the exposition."""
    exposed = scrape_names(Metrics().exposition())
    assert "membrane_drop_total" not in exposed
    assert "membrane_drop_count_total" in set().union(*dashboard_metric_names().values())
