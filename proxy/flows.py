"""Flow records: every L7 decision as a dict shaped after Hubble's flow JSON, and the sinks that keep them.

Owns the record shape (`Flow`, `L3L4Flow`, `Peer`, `l7_*` builders) and where records go: JSON lines to a text
stream and/or a file, and a bounded in-memory ring for the observe CLI. Never decides a verdict;
the session builds a `Flow` and the server hands it to a `FlowSink`. Writing never raises into the
data path: a failing sink is counted and dropped. A record is cheap to make (the ring keeps the object);
its JSON is built only when written or read, with the connection's fixed part serialised once, and a
proxy's sink writes in batches (`defer_writes`: one write + flush per event-loop pass, not per record).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_str  # what json.dumps uses for str (ensure_ascii)
from typing import IO, Any

from membrane.parsers.events import Headers

FORWARDED = "FORWARDED"
DROPPED = "DROPPED"
ERROR = "ERROR"

INGRESS = "INGRESS"
EGRESS = "EGRESS"

REQUEST = "REQUEST"
RESPONSE = "RESPONSE"

# Header values Hubble redacts by default; we never write credentials into a flow log.
_REDACTED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})



def _no_default(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# json.dumps(x, separators=(",", ":")) without making an encoder per call (that costs more than the encoding).
_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)  # the C accelerator; None without _json
_c_encoder: Any = _make_encoder(None, _no_default, _json_str, None, ":", ",", False, False, True) if _make_encoder else None


def _encode(value: Any) -> str:
    if _c_encoder is None:
        return json.dumps(value, separators=(",", ":"))
    return "".join(_c_encoder(value, 0))


# Flow ids: uuid4-shaped, a random per-process prefix (made again in each forked worker) + a counter,
# instead of 16 bytes of os.urandom per record. Unique within a process by the counter, across processes
# by the 74 random bits of the prefix.
_id_prefix = ""
_id_counter: Iterator[int] = itertools.count()


def _reset_ids() -> None:
    global _id_prefix, _id_counter
    _id_prefix = str(uuid.uuid4())[:24]  # "xxxxxxxx-xxxx-4xxx-yxxx-": version and variant bits kept
    _id_counter = itertools.count()


_reset_ids()
os.register_at_fork(after_in_child=_reset_ids)


def new_flow_id() -> str:
    """A uuid4-shaped id, unique per record (36 characters)."""
    return f"{_id_prefix}{next(_id_counter) & 0xFFFFFFFFFFFF:012x}"


_stamp_cache: tuple[int, str] = (-1, "")


def iso_time(time_ns: int) -> str:
    """RFC 3339 UTC with microseconds, as Hubble writes it: `2025-11-26T04:06:40.123456Z` (truncated, not rounded)."""
    global _stamp_cache
    seconds, ns = divmod(time_ns, 1_000_000_000)
    cached_s, prefix = _stamp_cache
    if seconds != cached_s:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _stamp_cache = (seconds, prefix)
    return f"{prefix}.{ns // 1000:06d}Z"


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
    # The JSON of the fixed fields (IP, l4, source, destination; traffic_direction), made on first use.
    _json: tuple[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def json_parts(self) -> tuple[str, str]:
        """`"IP":...,"l4":...,"source":...,"destination":...` and `"traffic_direction":...`, serialised once."""
        parts = self._json
        if parts is None:
            ip_version = "IPv6" if ":" in self.source.ip else "IPv4"
            head = _encode({
                "IP": {"source": self.source.ip, "destination": self.destination.ip, "ipVersion": ip_version},
                "l4": {self.transport: {"source_port": self.source.port, "destination_port": self.destination.port}},
                "source": self.source.to_json(),
                "destination": self.destination.to_json(),
            })[1:-1]
            parts = (head, '"traffic_direction":' + _json_str(self.traffic_direction))
            object.__setattr__(self, "_json", parts)
        return parts


@dataclass(slots=True, kw_only=True)
class Flow:
    """One L7 decision or observed response; `to_json()` is the Hubble-shaped record, `to_line()` its JSON line.

    Not frozen only so that it is cheap to make on every request (a frozen dataclass sets each field
    through object.__setattr__); treat it as immutable.
    """

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
            self.flow_id = new_flow_id()
        ctx = self.context
        ip_version = "IPv6" if ":" in ctx.source.ip else "IPv4"
        out: dict[str, Any] = {
            "time": iso_time(self.time_ns),
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

    def to_line(self) -> str:
        """`json.dumps(self.to_json(), separators=(",", ":"))` plus a newline, byte for byte, but built
        from the connection's pre-serialised fields (tests/proxy/test_flows.py checks the two agree).
        A subclass that reshapes `to_json()` (the agent's L3/L4 drop records) is serialised from it."""
        if type(self).to_json is not Flow.to_json:
            return _encode(self.to_json()) + "\n"
        if not self.flow_id:
            self.flow_id = new_flow_id()
        head, direction = self.context.json_parts()
        l7 = _encode({"type": self.l7_type, "latency_ns": str(self.latency_ns), **_render_l7(self.l7)})
        parts = [
            '{"time":"', iso_time(self.time_ns), '","uuid":', _json_str(self.flow_id),
            ',"verdict":', _json_str(self.verdict), ",", head, ',"Type":"L7","l7":', l7, ",", direction,
            ',"is_reply":', "true" if self.l7_type == RESPONSE else "false", ',"Summary":', _json_str(self.summary),
        ]
        if self.rule is not None:
            parts += (',"policy_rule":', _json_str(self.rule))
        if self.reason is not None:
            parts += (',"drop_reason_desc":', _json_str(self.reason.upper()))
        parts.append("}\n")
        return "".join(parts)


@dataclass(slots=True, kw_only=True)
class L3L4Flow(Flow):
    """A connection or packet dropped at L3/L4: Hubble's `Type: L3_L4` record, with no `l7` object.

    Hubble names a policy drop `drop_reason_desc: POLICY_DENIED` whichever way it went (the way is
    `traffic_direction`); `membrane_reason`, when set, keeps the finer reason (not in Hubble's schema),
    e.g. the kernel's `ingress_denied`.
    """

    membrane_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = Flow.to_json(self)
        out["Type"] = "L3_L4"
        out.pop("l7", None)
        out["is_reply"] = False
        if self.membrane_reason is not None:
            out["membrane_reason"] = self.membrane_reason
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
    """Hubble's `Kafka` message; `topic` is a plain string as in flow.proto (the first topic, "" for none).

    A request naming several topics (Produce, Fetch, Metadata) also carries all of them, in request
    order, in an extra `topics` list (not in Hubble's schema; present only when there are several).
    """
    topic_list = list(topics)
    kafka: dict[str, Any] = {
        "api_key": api_key,
        "api_version": api_version,
        "correlation_id": correlation_id,
        "topic": topic_list[0] if topic_list else "",
        "error_code": error_code,
    }
    if len(topic_list) > 1:
        kafka["topics"] = topic_list
    return {"kafka": kafka}


class FlowSink:
    """Where flow records go: JSON lines to `streams`, plus a bounded ring of the latest records.

    Thread-safe enough for one event loop per process (the ring is a deque with maxlen). By default
    each record is written (and flushed) as it is emitted; after `defer_writes(loop.call_soon)` the
    records emitted on the loop's thread are queued and written together, one write and one flush per
    stream, when the scheduled `flush()` runs (or at once when `MAX_PENDING` are queued).
    """

    MAX_PENDING = 512  # records queued before a write is forced (bounds memory and delay under load)

    def __init__(self, streams: Iterable[IO[str]] = (), ring_size: int = 10_000) -> None:
        self._streams = list(streams)
        self._ring: collections.deque[Flow] = collections.deque(maxlen=ring_size)
        self._lock = threading.Lock()
        self._pending: list[Flow] = []
        self._schedule: Callable[[Callable[[], None]], object] | None = None
        self._owner = 0  # the thread whose emits may be deferred
        self.write_errors = 0
        self.written = 0

    def defer_writes(self, schedule: Callable[[Callable[[], None]], object] | None) -> None:
        """Batch the writes of records emitted on this thread: `schedule(flush)` runs once per batch
        (the server passes its loop's `call_soon`). None writes each record at once again."""
        self.flush()
        self._schedule = schedule if self._streams else None
        self._owner = threading.get_ident()

    def emit(self, flow: Flow) -> None:
        """Record one flow. Never raises: a stream that fails is counted in `write_errors`."""
        self._ring.append(flow)
        self.written += 1
        if not self._streams:
            return
        schedule = self._schedule
        if schedule is not None and threading.get_ident() == self._owner:
            pending = self._pending
            pending.append(flow)
            if len(pending) == 1:
                try:
                    schedule(self.flush)
                except RuntimeError:  # the loop is closed: nothing will run the flush
                    self.flush()
            elif len(pending) >= self.MAX_PENDING:
                self.flush()
            return
        with self._lock:
            self._write(flow.to_line())

    def flush(self) -> None:
        """Write the queued records now (one write and one flush per stream). Never raises."""
        with self._lock:
            pending = self._pending
            if not pending:
                return
            self._pending = []
            self._write("".join([flow.to_line() for flow in pending]))

    def _write(self, text: str) -> None:
        for stream in self._streams:
            try:
                stream.write(text)
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
        """Write what is queued and flush every stream (they stay open: their owner closes them)."""
        self.flush()
        for stream in self._streams:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


def open_flow_streams(paths: Sequence[str]) -> list[IO[str]]:
    """The streams of `--flows PATH...`: '-' is stdout, anything else a file opened for appending, line-buffered.
    Raises OSError for a path that cannot be opened."""
    streams: list[IO[str]] = []
    for path in paths:
        if path == "-":
            streams.append(sys.stdout)
        else:
            streams.append(open(path, "a", buffering=1, encoding="utf-8"))  # noqa: SIM115 - closed by close_flow_streams
    return streams


def close_flow_streams(streams: Iterable[IO[str]]) -> None:
    """Close what open_flow_streams opened (never stdout). Never raises."""
    for stream in streams:
        if stream is not sys.stdout:
            with contextlib.suppress(OSError):
                stream.close()
