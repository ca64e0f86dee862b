"""Flow records: every L7 decision as a dict shaped after Hubble's flow JSON, and the sinks that keep them.

Owns the record shape (`Flow`, `Peer`, `l7_*` builders) and where records go: JSON lines to a text
stream and/or a file, and a bounded in-memory ring for the observe CLI. Never decides a verdict;
the session builds a `Flow` and the server hands it to a `FlowSink`. Writing never raises into the
data path: a failing sink is counted and dropped.
"""

from __future__ import annotations

import collections
import datetime
import json
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from parsers.events import Headers

FORWARDED = "FORWARDED"
DROPPED = "DROPPED"
ERROR = "ERROR"

INGRESS = "INGRESS"
EGRESS = "EGRESS"

REQUEST = "REQUEST"
RESPONSE = "RESPONSE"

# Header values Hubble redacts by default; we never write credentials into a flow log.
_REDACTED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Peer:
    """One end of a flow. `namespace`/`pod_name` are empty for `world` and other reserved identities."""

    ip: str
    port: int
    identity: int = 0
    namespace: str = ""
    pod_name: str = ""
    labels: tuple[str, ...] = ()  # "k8s:app=frontend", "reserved:world"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"identity": self.identity, "labels": list(self.labels), "ip": self.ip, "port": self.port}
        if self.namespace:
            out["namespace"] = self.namespace
        if self.pod_name:
            out["pod_name"] = self.pod_name
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowContext:
    """Who talks to whom on one connection (or datagram): fixed for its lifetime."""

    source: Peer
    destination: Peer
    traffic_direction: str = INGRESS  # INGRESS (judged for the destination) or EGRESS (for the source)
    transport: str = "TCP"  # "TCP" or "UDP"


@dataclass(frozen=True, slots=True, kw_only=True)
class Flow:
    """One L7 decision or observed response; `to_json()` is the Hubble-shaped record."""

    context: FlowContext
    verdict: str  # FORWARDED, DROPPED or ERROR
    l7_type: str  # REQUEST or RESPONSE
    l7: dict[str, Any]  # {"http": {...}} | {"dns": {...}} | {"kafka": {...}}
    summary: str
    time_ns: int  # wall-clock time of the decision, ns since the epoch
    latency_ns: int = 0  # for RESPONSE: time since the request was seen
    rule: str | None = None  # the policy rule that decided, when one did
    reason: str | None = None  # why DROPPED/ERROR: policy_denied, malformed, too_large, upstream_failed, ...
    flow_id: str = ""  # the uuid; made on first to_json() (records are often never serialised)

    def to_json(self) -> dict[str, Any]:
        if not self.flow_id:
            object.__setattr__(self, "flow_id", str(uuid.uuid4()))
        ctx = self.context
        ip_version = "IPv6" if ":" in ctx.source.ip else "IPv4"
        stamp = datetime.datetime.fromtimestamp(self.time_ns / 1e9, tz=datetime.UTC)
        out: dict[str, Any] = {
            "time": stamp.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z",
            "uuid": self.flow_id,
            "verdict": self.verdict,
            "IP": {"source": ctx.source.ip, "destination": ctx.destination.ip, "ipVersion": ip_version},
            "l4": {ctx.transport: {"source_port": ctx.source.port, "destination_port": ctx.destination.port}},
            "source": ctx.source.to_json(),
            "destination": ctx.destination.to_json(),
            "Type": "L7",
            "l7": {"type": self.l7_type, "latency_ns": str(self.latency_ns), **_render_l7(self.l7)},
            "traffic_direction": ctx.traffic_direction,
            "is_reply": self.l7_type == RESPONSE,
            "Summary": self.summary,
        }
        if self.rule is not None:
            out["policy_rule"] = self.rule
        if self.reason is not None:
            out["drop_reason_desc"] = self.reason.upper()
        return out


def _render_l7(l7: dict[str, Any]) -> dict[str, Any]:
    """Header tuples are kept raw in the record until it is serialised (most records never are)."""
    http = l7.get("http")
    if http is not None and isinstance(http.get("headers"), tuple):
        return {**l7, "http": {**http, "headers": json_headers(http["headers"])}}
    return l7


def json_headers(headers: Headers) -> list[dict[str, str]]:
    """Hubble's header list, with credential-bearing values redacted."""
    return [
        {"key": name.lower(), "value": "[REDACTED]" if name.lower() in _REDACTED_HEADERS else value}
        for name, value in headers
    ]


def l7_http(
    *, method: str, url: str, protocol: str, code: int = 0, headers: Headers = ()
) -> dict[str, Any]:
    http: dict[str, Any] = {"method": method, "url": url, "protocol": protocol, "headers": headers}
    if code:
        http["code"] = code
    return {"http": http}


def l7_dns(
    *, query: str, qtypes: Iterable[str], rcode: int | None = None, ips: Iterable[str] = (), ttl: int | None = None
) -> dict[str, Any]:
    dns: dict[str, Any] = {"query": query, "qtypes": list(qtypes), "ips": list(ips)}
    if rcode is not None:
        dns["rcode"] = rcode
    if ttl is not None:
        dns["ttl"] = ttl
    return {"dns": dns}


def l7_kafka(
    *, api_key: str, api_version: int, correlation_id: int, topics: Iterable[str] = (), error_code: int = 0
) -> dict[str, Any]:
    topic_list = list(topics)
    return {
        "kafka": {
            "api_key": api_key,
            "api_version": api_version,
            "correlation_id": correlation_id,
            "topic": {"name": topic_list[0]} if len(topic_list) == 1 else {"name": ",".join(topic_list)},
            "error_code": error_code,
        }
    }


class FlowSink:
    """Where flow records go: JSON lines to `streams`, plus a bounded ring of the latest records.

    Thread-safe enough for one event loop per process (the ring is a deque with maxlen).
    """

    def __init__(self, streams: Iterable[IO[str]] = (), ring_size: int = 10_000) -> None:
        self._streams = list(streams)
        self._ring: collections.deque[Flow] = collections.deque(maxlen=ring_size)
        self._lock = threading.Lock()
        self.write_errors = 0
        self.written = 0

    def emit(self, flow: Flow) -> None:
        """Record one flow. Never raises: a stream that fails is counted in `write_errors`."""
        self._ring.append(flow)
        self.written += 1
        if not self._streams:
            return
        line = json.dumps(flow.to_json(), separators=(",", ":")) + "\n"
        for stream in self._streams:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                self.write_errors += 1

    def recent(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The most recent records, oldest first (at most `limit`)."""
        items = list(self._ring)
        if limit is not None:
            items = items[-limit:]
        return [flow.to_json() for flow in items]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.recent())

    def close(self) -> None:
        for stream in self._streams:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
