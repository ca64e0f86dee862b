"""Prometheus metrics named `membrane_*`, kept in process, exposed as text format 0.0.4.

Owns counters and histograms and their exposition; `serve_metrics` runs a tiny asyncio HTTP endpoint
that answers GET /metrics with the exposition (404 elsewhere). No dependency: the text format is written by hand. Label
values are escaped; a metric never raises into the data path.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

_DEFAULT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

LabelValues = tuple[str, ...]

# Workload labels: at most this many distinct (source, destination) workload pairs get their own series;
# later pairs are counted under "other" so a scan across many pods cannot grow the exposition without bound.
MAX_WORKLOAD_PAIRS = 500
OTHER = "other"
WORKLOAD_LABELS = ("source_namespace", "source_workload", "destination_namespace", "destination_workload")
_NO_WORKLOADS: LabelValues = ("", "", "", "")
_OVERFLOW: LabelValues = (OTHER, OTHER, OTHER, OTHER)  # empty label values: Prometheus treats them as absent
_DNS_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Counter:
    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)
        self.values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def expose(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        if not self.values and not self.label_names:
            lines.append(f"{self.name} 0")
        for labels, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.label_names, labels)} {value:g}")
        return lines


class Gauge(Counter):
    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = value

    def expose(self) -> list[str]:
        lines = super().expose()
        lines[1] = f"# TYPE {self.name} gauge"
        return lines


class Histogram:
    def __init__(
        self, name: str, help_text: str, label_names: Sequence[str] = (), buckets: Sequence[float] = _DEFAULT_BUCKETS
    ) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(label_names)
        self.buckets = tuple(buckets)
        self.counts: dict[LabelValues, list[int]] = {}
        self.sums: dict[LabelValues, float] = {}

    def observe(self, value: float, *labels: str) -> None:
        counts = self.counts.get(labels)
        if counts is None:
            counts = self.counts[labels] = [0] * (len(self.buckets) + 1)
            self.sums[labels] = 0.0
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[labels] += value

    def count(self, *labels: str) -> int:
        return sum(self.counts.get(labels, ()))

    def expose(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for labels, counts in sorted(self.counts.items()):
            running = 0
            for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
                running += n
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                le_label = 'le="' + le + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, labels, le_label)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, labels)} {self.sums[labels]:g}")
            lines.append(f"{self.name}_count{_labels(self.label_names, labels)} {running}")
        return lines


_SAFE_ALPHABET = frozenset("bcdfghjklmnpqrstvwxz2456789")  # k8s.io/apimachinery rand.SafeEncodeString


def _is_hash(part: str, shortest: int, longest: int) -> bool:
    return shortest <= len(part) <= longest and not part.isdigit() and set(part) <= _SAFE_ALPHABET


def workload_name(namespace: str, pod_name: str, labels: Sequence[str], workloads: Sequence[Any]) -> str:
    """The workload a peer belongs to, for metric labels: its owning controller's name when known
    (flow `workloads`), else its `app` (or `app.kubernetes.io/name`) label, else the pod name with a
    ReplicaSet/pod hash stripped, else its reserved identity (`world`, `host`, ...)."""
    if workloads:
        return str(workloads[0].name)
    reserved = ""
    for label in labels:
        source, _, kv = label.partition(":")
        key, _, value = kv.partition("=")
        if key in ("app", "app.kubernetes.io/name") and value:
            return value
        if source == "reserved" and not reserved:
            reserved = key
    if pod_name:
        parts = pod_name.split("-")
        # <deployment>-<ReplicaSet hash>-<pod suffix>, or <daemonset|job>-<pod suffix>: Kubernetes draws both
        # from its "safe" alphabet (no vowels, no 0/1/3), so a word like "exporter" is never mistaken for one.
        if len(parts) >= 3 and _is_hash(parts[-1], 5, 5) and _is_hash(parts[-2], 6, 10):
            return "-".join(parts[:-2])
        if len(parts) >= 2 and _is_hash(parts[-1], 5, 5):
            return "-".join(parts[:-1])
        return pod_name
    return reserved or ("world" if not namespace else "")


class Metrics:
    """Every metric the proxy (and, in `membrane run`, the agent) exports. One instance per process.

    `workload_labels=False` leaves the source/destination workload labels empty (absent in PromQL)."""

    def __init__(self, *, workload_labels: bool = True, max_workload_pairs: int = MAX_WORKLOAD_PAIRS) -> None:
        self.workload_labels = workload_labels
        self.max_workload_pairs = max_workload_pairs
        self._pairs: dict[LabelValues, LabelValues] = {}  # interned workload label tuples
        self.requests = Counter(
            "membrane_proxy_requests_total", "L7 requests judged, by protocol and verdict.", ("protocol", "verdict")
        )
        self.request_duration = Histogram(
            "membrane_proxy_request_duration_seconds",
            "Time from a request to its response head, by protocol.",
            ("protocol",),
        )
        self.internal_errors = Counter(
            "membrane_proxy_internal_errors_total", "Connections closed because of a bug in the proxy."
        )
        self.connections = Counter(
            "membrane_proxy_connections_total", "Client connections accepted, by listener kind.", ("kind",)
        )
        self.connections_rejected = Counter(
            "membrane_proxy_connections_rejected_total", "Client connections refused, by reason.", ("reason",)
        )
        self.active_connections = Gauge("membrane_proxy_active_connections", "Client connections open now.")
        self.timeouts = Counter("membrane_proxy_timeouts_total", "Connections closed by a timeout, by kind.", ("kind",))
        self.upstream_failures = Counter(
            "membrane_proxy_upstream_failures_total", "Upstream connects that failed, by reason.", ("reason",)
        )
        self.resource_exhausted = Counter(
            "membrane_proxy_resource_exhausted_total",
            "Sockets the proxy could not open for lack of a resource (file descriptors), by resource.", ("resource",),
        )
        self.parse_errors = Counter(
            "membrane_proxy_parse_errors_total", "Messages refused as unparsable, by protocol and reason.",
            ("protocol", "reason"),
        )
        self.limits_exceeded = Counter(
            "membrane_proxy_limits_exceeded_total", "Connections closed for crossing a limit, by protocol and limit.",
            ("protocol", "limit"),
        )
        self.flow_write_errors = Counter("membrane_flows_write_errors_total", "Flow records that a sink failed to write.")
        self.flows_dropped = Counter(
            "membrane_flows_dropped_total",
            "Flow records not written because the flows writer was behind (its queue full), as Hubble's lost events.",
        )
        # Hubble/Cilium-like families (hubble_http_requests_total, cilium_policy_l7_total, ...).
        self.l7_requests = Counter(
            "membrane_l7_requests_total",
            "L7 requests judged, by protocol, verdict, method (HTTP) and source/destination workload.",
            ("protocol", "verdict", "method", *WORKLOAD_LABELS),
        )
        self.l7_responses = Counter(
            "membrane_l7_responses_total",
            "L7 responses (from the upstream or made by the proxy, e.g. 403), by protocol, status code and workload.",
            ("protocol", "code", *WORKLOAD_LABELS),
        )
        self.dns_queries = Counter(
            "membrane_dns_queries_total", "DNS queries judged, by verdict and query type.", ("verdict", "qtype")
        )
        self.dns_responses = Counter(
            "membrane_dns_responses_total", "DNS responses relayed or made, by rcode and query type.", ("rcode", "qtype")
        )
        self.drops = Counter(
            "membrane_drop_count_total", "Packets dropped in the kernel, by Hubble drop reason and direction.",
            ("reason", "direction"),
        )
        self.policies = Gauge("membrane_policy", "Policy objects in force.")
        self.policy_import_errors = Gauge(
            "membrane_policy_import_errors", "Policy objects currently rejected as invalid."
        )
        self.policy_import_errors_total = Counter(
            "membrane_policy_import_errors_total", "Policy reloads rejected (the last good policy stayed in force)."
        )
        self.policy_reloads = Counter("membrane_policy_reloads_total", "Policies compiled and applied, by trigger.", ("reason",))
        self.policy_delay = Histogram(
            "membrane_policy_implementation_delay_seconds",
            "Time from a policy change (file change or watch event seen) to its enforcement in the kernel and proxy.",
            (),
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.endpoints = Gauge("membrane_endpoint_state", "Endpoints of this node by state.", ("state",))

    def all(self) -> list[Counter | Histogram]:
        return [
            self.requests,
            self.request_duration,
            self.internal_errors,
            self.connections,
            self.connections_rejected,
            self.active_connections,
            self.timeouts,
            self.upstream_failures,
            self.resource_exhausted,
            self.parse_errors,
            self.limits_exceeded,
            self.flow_write_errors,
            self.flows_dropped,
            self.l7_requests,
            self.l7_responses,
            self.dns_queries,
            self.dns_responses,
            self.drops,
            self.policies,
            self.policy_import_errors,
            self.policy_import_errors_total,
            self.policy_reloads,
            self.policy_delay,
            self.endpoints,
        ]

    def workloads(self, source: Any, destination: Any) -> LabelValues:
        """The four workload label values of a flow's peers (interned; cached by the caller per connection)."""
        if not self.workload_labels:
            return _NO_WORKLOADS
        key = (
            source.namespace,
            workload_name(source.namespace, source.pod_name, source.labels, source.workloads),
            destination.namespace,
            workload_name(destination.namespace, destination.pod_name, destination.labels, destination.workloads),
        )
        interned = self._pairs.get(key)
        if interned is None:
            if len(self._pairs) >= self.max_workload_pairs:
                return _OVERFLOW  # not stored: the table stays bounded too
            interned = self._pairs[key] = key
        return interned

    def dns_rcode(self, rcode: int) -> str:
        return _DNS_RCODES.get(rcode) or str(rcode)

    def exposition(self) -> str:
        return "\n".join(line for metric in self.all() for line in metric.expose()) + "\n"

    def snapshot(self) -> dict[str, Any]:
        """Every value, JSON-ready, for another process to add in (`merged`)."""
        out: dict[str, Any] = {}
        for metric in self.all():
            if isinstance(metric, Histogram):
                out[metric.name] = {
                    "counts": [[list(k), v] for k, v in metric.counts.items()],
                    "sums": [[list(k), v] for k, v in metric.sums.items()],
                }
            else:
                out[metric.name] = [[list(k), v] for k, v in metric.values.items()]
        return out

    def merged(self, snapshots: Iterable[dict[str, Any]]) -> Metrics:
        """A new Metrics holding this one's values plus those of `snapshots` (other workers)."""
        total = Metrics(workload_labels=self.workload_labels, max_workload_pairs=self.max_workload_pairs)
        by_name = {m.name: m for m in total.all()}
        for snap in [self.snapshot(), *snapshots]:
            for name, data in snap.items():
                metric = by_name.get(name)
                if isinstance(metric, Histogram) and isinstance(data, dict):
                    for labels, counts in data.get("counts", []):
                        key = tuple(labels)
                        mine = metric.counts.setdefault(key, [0] * (len(metric.buckets) + 1))
                        metric.counts[key] = [a + b for a, b in zip(mine, counts, strict=False)]
                    for labels, value in data.get("sums", []):
                        metric.sums[tuple(labels)] = metric.sums.get(tuple(labels), 0.0) + value
                elif isinstance(metric, Counter) and isinstance(data, list):
                    for labels, value in data:
                        metric.values[tuple(labels)] = metric.values.get(tuple(labels), 0.0) + value
        return total


class SharedMetrics:
    """Several worker processes, one endpoint: each worker publishes its snapshot to `directory`; the
    serving worker adds the others' latest snapshots (at most `publish_interval_s` old) to its own."""

    def __init__(self, metrics: Metrics, directory: Path | None, worker: int) -> None:
        self.metrics = metrics
        self.directory = directory
        self.worker = worker

    def publish(self) -> None:
        if self.directory is None:
            return
        path = self.directory / f"worker-{self.worker}.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.metrics.snapshot()))
            os.replace(tmp, path)
        except OSError:
            pass

    def exposition(self) -> str:
        if self.directory is None:
            return self.metrics.exposition()
        others = []
        for path in sorted(self.directory.glob("worker-*.json")):
            if path.name == f"worker-{self.worker}.json":
                continue
            try:
                others.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return self.metrics.merged(others).exposition()


Route = Callable[[], tuple[int, str, bytes]]  # () -> (status, content type, body)
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
_MAX_HEAD_BYTES = 8192


class _Http(asyncio.Protocol):
    """One GET per connection, answered from `routes` by path (query ignored); 404 elsewhere, 405 for
    other methods. Enough for Prometheus scrapes and kubelet probes; nothing else is served."""

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self._routes = routes
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        if b"\r\n\r\n" not in self._buffer and b"\n\n" not in self._buffer:
            if len(self._buffer) > _MAX_HEAD_BYTES:
                self._transport.close()
            return
        method, _, rest = self._buffer.split(b"\n", 1)[0].decode("latin-1").strip().partition(" ")
        path = rest.split(" ", 1)[0].split("?", 1)[0]
        route = self._routes.get(path)
        if route is None:
            status, ctype, body = 404, "text/plain; charset=utf-8", f"not found; try {', '.join(sorted(self._routes))}\n".encode()
        elif method not in ("GET", "HEAD"):
            status, ctype, body = 405, "text/plain; charset=utf-8", b"GET only\n"
        else:
            try:
                status, ctype, body = route()
            except Exception as e:  # an endpoint never takes the process down
                status, ctype, body = 503, "text/plain; charset=utf-8", f"{type(e).__name__}: {e}\n".encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        self._transport.write(head + (body if method != "HEAD" else b""))
        self._transport.close()


async def serve_http(routes: Mapping[str, Route], host: str, port: int) -> asyncio.Server:
    """A tiny HTTP endpoint for `routes`. Returns the server (close it to stop). Raises OSError if it cannot bind."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Http(routes), host, port, reuse_address=True)


def metrics_route(metrics: Metrics | SharedMetrics) -> Route:
    return lambda: (200, "text/plain; version=0.0.4; charset=utf-8", metrics.exposition().encode())


async def serve_metrics(metrics: Metrics | SharedMetrics, host: str, port: int) -> asyncio.Server:
    """Start the `/metrics` endpoint (only that path). Returns the server. Raises OSError if it cannot bind."""
    return await serve_http({"/metrics": metrics_route(metrics)}, host, port)
