"""Flow records: every decision as Hubble's flow JSON, and the sinks and files that keep them.

Owns the record shape (`Flow`, `L3L4Flow`, `Peer`, `l7_*` builders) and where records go: JSON lines to a text
stream and/or a size-rotated file, a bounded in-memory ring, and listeners (the flow server). Never decides
a verdict; the session builds a `Flow` and the server hands it to a `FlowSink`. Writing never raises into
the data path: a failing sink is counted and dropped.

The JSON is what `hubble observe -o json` prints (cilium/cilium api/v1/flow/flow.proto and
api/v1/observer/observer.proto at v1.19.4, protojson with UseProtoNames): one `GetFlowsResponse` per line,
`{"flow": {...}, "node_name": "...", "time": "..."}`. Fields appear in the order flow.proto declares them,
zero values are left out, 64-bit integers are strings, enums are their names: so `hubble observe
--input-file` reads our files. Nothing outside flow.proto is written. A record is cheap to make (the ring
keeps the object); its JSON is built only when written or read, with the connection's fixed part
serialised once and the HTTP record's JSON reused for a repeated head. A proxy's sink formats a loop
pass's records once, after the reads it handled, and a thread of its own writes them (`start_writer`) from
a bounded queue: lines beyond the bound are dropped and counted (`dropped`, `membrane_flows_dropped_total`)
rather than blocking traffic on a slow disk or pipe, as Hubble's ring loses events under load. With
$MEMBRANE_FLOWS_PROCESS=1 a formatter process (proxy/flowproc.py) formats and writes the files instead, fed
plain tuples once per loop pass (`WIRE_*`): less CPU in the worker, more in all (BENCHMARKS.md run 7b).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import itertools
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_str  # what json.dumps uses for str (ensure_ascii)
from typing import IO, Any, ClassVar, Protocol

from membrane.parsers.events import Headers
from membrane.proxy.flowfilter import parse_time as _parse_time  # the one RFC 3339 reader (observe's)
from mypy_extensions import mypyc_attr

FORWARDED = "FORWARDED"
DROPPED = "DROPPED"
ERROR = "ERROR"

INGRESS = "INGRESS"
EGRESS = "EGRESS"

REQUEST = "REQUEST"
RESPONSE = "RESPONSE"

EMITTER_NAME = "Membrane"
try:
    from importlib.metadata import version as _pkg_version

    EMITTER_VERSION = _pkg_version("membrane")
except Exception:  # running from a tree that is not installed: the version is unknown
    EMITTER_VERSION = ""

# Cilium's monitor message types (pkg/monitor/api/types.go), Hubble's `event_type.type`.
EVENT_DROP = 1
EVENT_TRACE = 4
EVENT_POLICY_VERDICT = 5
EVENT_L7 = 129

# flow.proto DropReason: the names (and codes, for the deprecated `drop_reason` and `event_type.sub_type`)
# that membrane's L3/L4 drops map to. POLICY_DENIED is a default-deny drop (no allow rule matched);
# POLICY_DENY a drop by a deny rule (ingressDeny/egressDeny).
DROP_REASON_CODES = {
    "INVALID_SOURCE_IP": 132,
    "POLICY_DENIED": 133,
    "INVALID_PACKET_DROPPED": 134,
    "UNSUPPORTED_L3_PROTOCOL": 139,
    "UNKNOWN_L4_PROTOCOL": 142,
    "IP_FRAGMENTATION_NOT_SUPPORTED": 157,
    "FRAG_NOT_FOUND": 175,
    "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL": 180,
    "POLICY_DENY": 181,
}

# Header values Hubble redacts by default; we never write credentials into a flow log.
_REDACTED_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})

# Each L7 record's fields in flow.proto order (message HTTP, DNS, Kafka); anything else a caller put in
# the dict is not part of the schema and is not written.
_L7_FIELDS = {
    "http": ("code", "method", "url", "protocol", "headers"),
    "dns": ("query", "ips", "ttl", "cnames", "observation_source", "rcode", "qtypes", "rrtypes"),
    "kafka": ("error_code", "api_version", "api_key", "correlation_id", "topic"),
}
_L4_KEYS = frozenset({"TCP", "UDP", "SCTP"})


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
    """RFC 3339 UTC as protojson writes a Timestamp: no fraction, or 3, 6 or 9 digits, the fewest that are exact."""
    global _stamp_cache
    seconds, ns = divmod(time_ns, 1_000_000_000)
    cached_s, prefix = _stamp_cache
    if seconds != cached_s:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _stamp_cache = (seconds, prefix)
    if ns == 0:
        return prefix + "Z"
    if ns % 1_000_000 == 0:
        return f"{prefix}.{ns // 1_000_000:03d}Z"
    if ns % 1000 == 0:
        return f"{prefix}.{ns // 1000:06d}Z"
    return f"{prefix}.{ns:09d}Z"


def default_node_name() -> str:
    """The node name flows carry when none is configured: $NODE_NAME (set by the DaemonSet), else the hostname."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """flow.proto `Workload`: the controller that owns a pod (e.g. name "frontend", kind "Deployment")."""

    name: str
    kind: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Peer:
    """One end of a flow. `namespace`/`pod_name` are empty for `world` and other reserved identities.

    `ip` and `port` go to the record's `IP` and `l4`, never into the endpoint object (flow.proto `Endpoint`
    has neither). `endpoint_id` is the agent's endpoint ID (0 = not a local endpoint: left out).
    """

    ip: str
    port: int
    identity: int = 0
    namespace: str = ""
    pod_name: str = ""
    labels: tuple[str, ...] = ()  # "k8s:app=frontend", "reserved:world"
    endpoint_id: int = 0
    workloads: tuple[Workload, ...] = ()
    cluster_name: str = ""

    def to_json(self) -> dict[str, Any]:
        """flow.proto `Endpoint` (ID, identity, cluster_name, namespace, labels, pod_name, workloads), zeros left out."""
        out: dict[str, Any] = {}
        if self.endpoint_id:
            out["ID"] = self.endpoint_id
        if self.identity:
            out["identity"] = self.identity
        if self.cluster_name:
            out["cluster_name"] = self.cluster_name
        if self.namespace:
            out["namespace"] = self.namespace
        if self.labels:
            out["labels"] = sorted(self.labels)  # Hubble sorts them (pkg/hubble/parser/seven decodeEndpoint)
        if self.pod_name:
            out["pod_name"] = self.pod_name
        if self.workloads:
            out["workloads"] = [{"name": w.name, "kind": w.kind} for w in self.workloads]
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowContext:
    """Who talks to whom on one connection (or datagram): fixed for its lifetime.

    `source_names`/`destination_names`: the DNS names the address is known by (toFQDNs), Hubble's
    `source_names`/`destination_names`; () = none known.
    """

    source: Peer
    destination: Peer
    traffic_direction: str = INGRESS  # INGRESS (judged for the destination) or EGRESS (for the source)
    transport: str = "TCP"  # "TCP", "UDP" or "SCTP" (anything else: no `l4` object)
    source_names: tuple[str, ...] = ()
    destination_names: tuple[str, ...] = ()
    # The JSON of the fixed fields (IP..destination, and names), made on first use, for each orientation.
    _json: dict[bool, tuple[str, str]] = field(default_factory=dict, init=False, repr=False, compare=False)
    # Metric workload label values, computed once per connection (proxy.metrics.Metrics.workloads).
    metric_labels: list[tuple[str, ...]] = field(default_factory=list, init=False, repr=False, compare=False)

    def json_parts(self, reply: bool = False) -> tuple[str, str]:
        """(`"IP":...,"l4":...,"source":...,"destination":...`, `,"source_names":...` or ""), serialised once.

        A reply (an L7 response) goes from the server to the client, as Hubble records it: the two ends swap.
        """
        parts = self._json.get(reply)
        if parts is None:
            head = _encode(self.fixed_json(reply))[1:-1]
            names: dict[str, Any] = {}
            src_names, dst_names = (self.destination_names, self.source_names) if reply else (self.source_names, self.destination_names)
            if src_names:
                names["source_names"] = list(src_names)
            if dst_names:
                names["destination_names"] = list(dst_names)
            parts = (head, "," + _encode(names)[1:-1] if names else "")
            self._json[reply] = parts
        return parts

    def fixed_json(self, reply: bool = False) -> dict[str, Any]:
        src, dst = (self.destination, self.source) if reply else (self.source, self.destination)
        out: dict[str, Any] = {
            "IP": {"source": src.ip, "destination": dst.ip, "ipVersion": "IPv6" if ":" in src.ip else "IPv4"},
        }
        if self.transport in _L4_KEYS:
            ports: dict[str, int] = {}
            if src.port:
                ports["source_port"] = src.port
            if dst.port:
                ports["destination_port"] = dst.port
            out["l4"] = {self.transport: ports}
        out["source"] = src.to_json()
        out["destination"] = dst.to_json()
        return out


@mypyc_attr(allow_interpreted_subclasses=True)  # tests subclass it
@dataclass(init=False, slots=True, kw_only=True)
class Flow:
    """One L7 decision or observed response; `to_json()` is Hubble's `flow` object, `to_line()` the JSON line.

    Not frozen only so that it is cheap to make on every request (a frozen dataclass sets each field
    through object.__setattr__); treat it as immutable.

    `rule` (and `matched`) are rule references, `ns/name: ingress[0].toPorts[0]...` (`name: ...` for a
    clusterwide policy): they become Hubble's `*_allowed_by`/`*_denied_by` policy objects.
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
    matched: tuple[str, ...] = ()  # further rules that matched (besides `rule`), for the policy lists
    policy_revision: int = 0  # the policy revision that judged (0 = unknown: left out)
    policy_match_type: int = 0  # Cilium's PolicyMatchType, for policy-verdict records only (0 = left out)
    limit: str | None = None  # the limit a peer crossed (control_frames, rapid_reset, ...): counted, never serialised

    # Its own __init__ (every field, keyword-only, with its default): compiled, the dataclasses module's
    # generated one stays interpreted, 3x the cost on every record (BENCHMARKS.md run 7). Subclasses that are
    # dataclasses generate their own as usual.
    def __init__(
        self, *, context: FlowContext, verdict: str, l7_type: str, l7: dict[str, Any], summary: str, time_ns: int,
        latency_ns: int = 0, rule: str | None = None, reason: str | None = None, flow_id: str = "",
        matched: tuple[str, ...] = (), policy_revision: int = 0, policy_match_type: int = 0, limit: str | None = None,
    ) -> None:
        self.context = context
        self.verdict = verdict
        self.l7_type = l7_type
        self.l7 = l7
        self.summary = summary
        self.time_ns = time_ns
        self.latency_ns = latency_ns
        self.rule = rule
        self.reason = reason
        self.flow_id = flow_id
        self.matched = matched
        self.policy_revision = policy_revision
        self.policy_match_type = policy_match_type
        self.limit = limit

    # --- the parts of the record -----------------------------------------------------------------
    def _is_l3l4(self) -> bool:
        return False

    def _drop_reason(self) -> str | None:
        """flow.proto DropReason name of a DROPPED record, or None (not a drop, or no Hubble name for it)."""
        if self.verdict != DROPPED:
            return None
        if self.reason in (None, "policy_denied", "policy_conflict"):
            refs = (self.rule, *self.matched) if self.rule is not None else self.matched
            return "POLICY_DENY" if any(_is_deny_ref(r) for r in refs) else "POLICY_DENIED"
        assert self.reason is not None
        if self.reason.startswith("no_") and self.reason.endswith("_session"):
            return "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL"
        name = self.reason.upper()
        return name if name in DROP_REASON_CODES else None

    def _event_type(self) -> dict[str, int]:
        return {"type": EVENT_L7}

    def _l7_json(self) -> dict[str, Any] | None:
        out: dict[str, Any] = {"type": self.l7_type}
        if self.latency_ns:
            out["latency_ns"] = str(self.latency_ns)
        out.update(_render_l7(self.l7))
        return out

    def _l7_line(self) -> str:
        """`_encode(self._l7_json())`, with the HTTP record's JSON made once per distinct (code, method, url,
        protocol, headers): a keep-alive client repeats its requests and a server its response heads."""
        http = self.l7.get("http") if len(self.l7) == 1 else None
        headers = http.get("headers", ()) if http is not None else None
        if http is None or type(headers) is not tuple or len(http) > 5:
            reused = _REUSED_L7.get(id(self.l7))
            if reused is None or reused[0] is not self.l7:
                return _encode(self._l7_json())
            body = reused[1] or _reused_body(reused)
            latency = f',"latency_ns":"{self.latency_ns}"' if self.latency_ns else ""
            return f'{{"type":{_json_str(self.l7_type)}{latency},{body}}}'
        key = (http.get("code", 0), http.get("method", ""), http.get("url", ""), http.get("protocol", ""), headers)
        body = _HTTP_JSON.get(key)
        if body is None:
            body = _encode(_render_l7(self.l7))[1:-1]
            if len(_HTTP_JSON) >= _HTTP_JSON_MAX:
                _HTTP_JSON.clear()
            _HTTP_JSON[key] = body
        latency = f',"latency_ns":"{self.latency_ns}"' if self.latency_ns else ""
        return f'{{"type":{_json_str(self.l7_type)}{latency},{body}}}'

    def _policy_refs(self) -> tuple[tuple[str, ...], int, str] | None:
        if self.verdict == FORWARDED:
            outcome = "allowed_by"
        elif self.verdict == DROPPED:
            outcome = "denied_by"
        else:
            return None
        refs = (self.rule, *self.matched) if self.rule is not None else self.matched
        return (refs, self.policy_revision, outcome) if refs else None

    def _policy_lists(self) -> dict[str, list[dict[str, Any]]]:
        key = self._policy_refs()
        return _policy_lists(*key) if key is not None else {}

    def _head(self) -> dict[str, Any]:
        out: dict[str, Any] = {"time": iso_time(self.time_ns), "uuid": self.flow_id}
        if EMITTER_VERSION:
            out["emitter"] = {"name": EMITTER_NAME, "version": EMITTER_VERSION}
        else:
            out["emitter"] = {"name": EMITTER_NAME}
        out["verdict"] = self.verdict
        return out

    def to_json(self, node_name: str = "") -> dict[str, Any]:
        """Hubble's `flow` object (flow.proto `Flow`), fields in declaration order, zero values left out."""
        if not self.flow_id:
            self.flow_id = new_flow_id()
        ctx = self.context
        l3l4 = self._is_l3l4()
        reply = self.l7_type == RESPONSE and not l3l4
        # Hubble's L7 records carry no drop reason (pkg/hubble/parser/seven sets DROP_REASON_UNKNOWN): only drops do.
        drop = self._drop_reason() if l3l4 else None
        out = self._head()
        if l3l4 and drop is not None:
            out["drop_reason"] = DROP_REASON_CODES[drop]
        out.update(ctx.fixed_json(reply))
        out["Type"] = "L3_L4" if l3l4 else "L7"
        if node_name:
            out["node_name"] = node_name
        src_names, dst_names = (ctx.destination_names, ctx.source_names) if reply else (ctx.source_names, ctx.destination_names)
        if src_names:
            out["source_names"] = list(src_names)
        if dst_names:
            out["destination_names"] = list(dst_names)
        l7 = None if l3l4 else self._l7_json()
        if l7 is not None:
            out["l7"] = l7
        if reply:
            out["reply"] = True  # the deprecated bool Hubble still fills beside is_reply
        out["event_type"] = self._event_type()
        out["traffic_direction"] = ctx.traffic_direction
        if self.policy_match_type:
            out["policy_match_type"] = self.policy_match_type
        if drop is not None:
            out["drop_reason_desc"] = drop
        out["is_reply"] = reply
        out["Summary"] = self.summary
        out.update(self._policy_lists())
        return out

    def to_line(self, node_name: str = "") -> str:
        """The record as one `hubble observe -o json` line: `{"flow":...,"node_name":...,"time":...}` + newline.

        Byte for byte `json.dumps(envelope(self.to_json(node_name), node_name), separators=(",", ":"))`,
        but built from the connection's pre-serialised fields for the common L7 record
        (tests/proxy/test_flows.py checks the two agree). Subclasses are serialised from `to_json()`.
        """
        if type(self).to_json is not Flow.to_json:  # a subclass's own shape (its to_json may take no node name)
            flow_json = self.to_json()
            if node_name:
                flow_json.setdefault("node_name", node_name)
            return _encode(envelope(flow_json, node_name)) + "\n"
        if self._is_l3l4():
            return _encode(envelope(self.to_json(node_name), node_name)) + "\n"
        if not self.flow_id:
            self.flow_id = new_flow_id()
        reply = self.l7_type == RESPONSE
        head, names = self.context.json_parts(reply)
        stamp = iso_time(self.time_ns)
        parts = [
            '{"flow":{"time":"', stamp, '","uuid":', _json_str(self.flow_id), _EMITTER_JSON,
            ',"verdict":', _json_str(self.verdict), ",", head, ',"Type":"L7"',
        ]
        if node_name:
            parts += (',"node_name":', _json_str(node_name))
        parts += (names, ',"l7":', self._l7_line(), ',"reply":true' if reply else "",
                  ',"event_type":{"type":129},"traffic_direction":', _json_str(self.context.traffic_direction))
        if self.policy_match_type:
            parts += (',"policy_match_type":', str(self.policy_match_type))
        parts += (',"is_reply":', "true" if reply else "false", ',"Summary":', _json_str(self.summary))
        key = self._policy_refs()
        if key is not None:
            parts.append(_policy_lists_json(*key))
        parts.append("}")
        if node_name:
            parts += (',"node_name":', _json_str(node_name))
        parts += (',"time":"', stamp, '"}\n')
        return "".join(parts)


_EMITTER_JSON = (
    ',"emitter":' + _encode({"name": EMITTER_NAME, "version": EMITTER_VERSION} if EMITTER_VERSION else {"name": EMITTER_NAME})
)


def envelope(flow_json: dict[str, Any], node_name: str = "") -> dict[str, Any]:
    """observer.proto `GetFlowsResponse` around one flow: `{"flow":..., "node_name":..., "time":...}`."""
    out: dict[str, Any] = {"flow": flow_json}
    if node_name:
        out["node_name"] = node_name
    if "time" in flow_json:
        out["time"] = flow_json["time"]
    return out


@mypyc_attr(allow_interpreted_subclasses=True)  # control/drops.py: DropFlow
@dataclass(init=False, slots=True, kw_only=True)
class L3L4Flow(Flow):
    """A connection or packet dropped at L3/L4: Hubble's drop event, `Type: L3_L4`, no `l7` object.

    `drop_reason_desc` is POLICY_DENY when a deny rule dropped it, POLICY_DENIED for a default-deny drop
    (flow.proto DropReason 181 and 133); `event_type` is the drop event `{type: 1, sub_type: <code>}`.
    `membrane_reason` (the kernel's own reason, e.g. `ingress_denied`) is accepted but not written: it
    has no place in Hubble's schema (the way a drop went is `traffic_direction`).
    """

    membrane_reason: str | None = None

    # Its own __init__ as Flow's (mypyc would otherwise call Flow's with the wrong arguments).
    def __init__(
        self, *, context: FlowContext, verdict: str, l7_type: str, l7: dict[str, Any], summary: str, time_ns: int,
        latency_ns: int = 0, rule: str | None = None, reason: str | None = None, flow_id: str = "",
        matched: tuple[str, ...] = (), policy_revision: int = 0, policy_match_type: int = 0, limit: str | None = None,
        membrane_reason: str | None = None,
    ) -> None:
        Flow.__init__(self, context=context, verdict=verdict, l7_type=l7_type, l7=l7, summary=summary, time_ns=time_ns,
                      latency_ns=latency_ns, rule=rule, reason=reason, flow_id=flow_id, matched=matched,
                      policy_revision=policy_revision, policy_match_type=policy_match_type, limit=limit)
        self.membrane_reason = membrane_reason

    def _is_l3l4(self) -> bool:
        return True

    def _event_type(self) -> dict[str, int]:
        drop = self._drop_reason()
        if drop is None:
            return {"type": EVENT_DROP}
        return {"type": EVENT_DROP, "sub_type": DROP_REASON_CODES[drop]}


def _policy_lists(refs: tuple[str, ...], revision: int, outcome: str) -> dict[str, list[dict[str, Any]]]:
    """The `*_allowed_by`/`*_denied_by` lists of these rule references, in flow.proto order (fresh objects)."""
    lists: dict[str, list[dict[str, Any]]] = {}
    seen: set[tuple[str, str]] = set()
    for ref in refs:
        parsed = policy_object(ref, revision=revision)
        if parsed is None:
            continue
        direction, policy = parsed
        key = f"{direction}_{outcome}"
        if (key, _policy_key(policy)) in seen:
            continue
        seen.add((key, _policy_key(policy)))
        lists.setdefault(key, []).append(policy)
    order = ("egress_allowed_by", "ingress_allowed_by", "egress_denied_by", "ingress_denied_by")
    return {k: lists[k] for k in order if k in lists}


@functools.lru_cache(maxsize=4096)
def _policy_lists_json(refs: tuple[str, ...], revision: int, outcome: str) -> str:
    """`,"ingress_allowed_by":[...]` for to_line(), made once per distinct rule set (a few per policy)."""
    lists = _policy_lists(refs, revision, outcome)
    return "," + _encode(lists)[1:-1] if lists else ""


def _policy_key(policy: dict[str, Any]) -> str:
    return f"{policy.get('kind', '')}/{policy.get('namespace', '')}/{policy['name']}"


def _split_ref(ref: str) -> tuple[str, str]:
    key, _, path = ref.partition(": ")
    return key, path


def _rule_path(path: str) -> str:
    """`specs[1].ingressDeny[0]...` -> `ingressDeny[0]...` (the rule's own path, without the spec index)."""
    if path.startswith("specs["):
        _, _, path = path.partition("].")
    elif path.startswith("spec."):
        path = path[5:]
    return path


def _is_deny_ref(ref: str) -> bool:
    return _rule_path(_split_ref(ref)[1]).startswith(("ingressDeny", "egressDeny"))


KIND_CNP = "CiliumNetworkPolicy"
KIND_CCNP = "CiliumClusterwideNetworkPolicy"


def policy_object(ref: str, *, revision: int = 0, kind: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """The direction ("ingress"/"egress") and flow.proto `Policy` of a rule reference, or None if it names no rule.

    Labels are the ones Cilium derives for the policy (`io.cilium.k8s.policy.derived-from`, `.name`,
    `.namespace`), so `hubble observe --print-policy-names` and Hubble UI show it; the kind is
    CiliumNetworkPolicy for a namespaced reference and CiliumClusterwideNetworkPolicy otherwise
    (`kind` overrides it).
    """
    key, path = _split_ref(ref)
    path = _rule_path(path)
    if path.startswith("ingress"):
        direction = "ingress"
    elif path.startswith("egress"):
        direction = "egress"
    else:
        return None
    namespace, _, name = key.rpartition("/")
    if not name:
        return None
    kind = kind or (KIND_CNP if namespace else KIND_CCNP)
    labels = [f"k8s:io.cilium.k8s.policy.derived-from={kind}", f"k8s:io.cilium.k8s.policy.name={name}"]
    policy: dict[str, Any] = {"name": name}
    if namespace:
        policy["namespace"] = namespace
        labels.append(f"k8s:io.cilium.k8s.policy.namespace={namespace}")
    policy["labels"] = labels
    if revision:
        policy["revision"] = str(revision)
    policy["kind"] = kind
    return direction, policy


# The `"http":{...}` JSON of recent HTTP records by (code, method, url, protocol, headers); see Flow._l7_line.
_HTTP_JSON: dict[tuple[Any, ...], str] = {}
_HTTP_JSON_MAX = 4096


# l7 records a session reuses for many flows (DNS: one per distinct query or answer read), by id: the dict
# (kept, so the id stays its own) and its `"dns":{...}` JSON once made. See `reused_l7`.
_REUSED_L7: dict[int, list[Any]] = {}
_REUSED_L7_MAX = 8192


def reused_l7(l7: dict[str, Any]) -> dict[str, Any]:
    """Mark `l7` (one non-empty record, never changed afterwards) as shared by many flows: its JSON is made
    once, not per record. Returns `l7`. At most _REUSED_L7_MAX are remembered (then it starts afresh)."""
    if len(_REUSED_L7) >= _REUSED_L7_MAX:
        _REUSED_L7.clear()
    _REUSED_L7[id(l7)] = [l7, ""]
    return l7


def _reused_body(reused: list[Any]) -> str:
    body: str = _encode(_render_l7(reused[0]))[1:-1]
    reused[1] = body
    return body


def _render_l7(l7: dict[str, Any]) -> dict[str, Any]:
    """The `http`/`dns`/`kafka` record in flow.proto's field order, zero values left out, headers as a list."""
    http = l7.get("http")
    if http is not None:  # the common record, without the generic loop
        out_http: dict[str, Any] = {}
        code = http.get("code")
        if code:
            out_http["code"] = code
        for name in ("method", "url", "protocol"):
            value = http.get(name)
            if value:
                out_http[name] = value
        headers = http.get("headers")
        if headers:
            out_http["headers"] = json_headers(headers) if isinstance(headers, tuple) else list(headers)
        return {"http": out_http}
    for kind, fields in _L7_FIELDS.items():
        record = l7.get(kind)
        if record is None:
            continue
        out: dict[str, Any] = {}
        for name in fields:
            value = record.get(name)
            if value is None or value == 0 or value == "" or value == [] or value == ():
                continue
            if kind == "http" and name == "headers":
                value = json_headers(value) if isinstance(value, tuple) else list(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return {kind: out}
    return {}


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
    *,
    query: str,
    qtypes: Iterable[str],
    rcode: int | None = None,
    ips: Iterable[str] = (),
    ttl: int | None = None,
    cnames: Iterable[str] = (),
    rrtypes: Iterable[str] = (),
    observation_source: str = "proxy",
) -> dict[str, Any]:
    """Hubble's `DNS` message. `cnames` are the answer's CNAME targets and `rrtypes` the types of its
    records ("A", "CNAME", ...); `observation_source` is "proxy" as Cilium's DNS proxy writes it."""
    dns: dict[str, Any] = {"query": query, "qtypes": list(qtypes), "ips": list(ips)}
    if rcode is not None:
        dns["rcode"] = rcode
    if ttl is not None:
        dns["ttl"] = ttl
    cname_list = list(cnames)
    if cname_list:
        dns["cnames"] = cname_list
    rr = list(rrtypes)
    if rr:
        dns["rrtypes"] = rr
    dns["observation_source"] = observation_source
    return {"dns": dns}


def l7_kafka(
    *, api_key: str, api_version: int, correlation_id: int, topics: Iterable[str] = (), error_code: int = 0
) -> dict[str, Any]:
    """Hubble's `Kafka` message; `topic` is a plain string as in flow.proto (the first topic, "" for none).

    A request naming several topics keeps the first here; the Summary names them all.
    """
    topic_list = list(topics)
    return {
        "kafka": {
            "api_key": api_key,
            "api_version": api_version,
            "correlation_id": correlation_id,
            "topic": topic_list[0] if topic_list else "",
            "error_code": error_code,
        }
    }


def refusal_response(request: Flow, *, time_ns: int, status: int) -> Flow:
    """The response record of a request the proxy refused itself, as Hubble shows it after the DROPPED request:
    an L7 RESPONSE, verdict FORWARDED (the refusal did reach the client), with the refusal's status.

    `status` is the HTTP status (403, 400, 431, 503 ...), the DNS RCODE (5 = REFUSED) or the Kafka error
    code (29 = TOPIC_AUTHORIZATION_FAILED), by the request's protocol.
    """
    latency = max(0, time_ns - request.time_ns)
    l7: dict[str, Any]
    if "http" in request.l7:
        http = request.l7["http"]
        l7 = l7_http(method=http.get("method", ""), url=http.get("url", ""), protocol=http.get("protocol", "HTTP/1.1"),
                     code=status)
        summary = f"{http.get('protocol', 'HTTP/1.1')} {status} {latency // 1_000_000}ms ({http.get('method', '')} {http.get('url', '')})"
    elif "dns" in request.l7:
        dns = request.l7["dns"]
        l7 = l7_dns(query=dns.get("query", ""), qtypes=dns.get("qtypes", ()), rcode=status)
        summary = f"DNS Answer RCode: {_RCODE_NAMES.get(status, str(status))} (Proxy {dns.get('query', '')} {' '.join(dns.get('qtypes', ()))})"
    elif "kafka" in request.l7:
        kafka = request.l7["kafka"]
        l7 = l7_kafka(api_key=kafka.get("api_key", ""), api_version=kafka.get("api_version", 0),
                      correlation_id=kafka.get("correlation_id", 0), topics=[kafka["topic"]] if kafka.get("topic") else (),
                      error_code=status)
        summary = f"Kafka response {kafka.get('api_key', '')} error {status}"
    else:
        l7, summary = {}, f"refused {status}"
    return Flow(context=request.context, verdict=FORWARDED, l7_type=RESPONSE, l7=l7, summary=summary, time_ns=time_ns,
                latency_ns=latency)


_RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


# --- records that came as JSON lines (from another worker) --------------------------------------------


@dataclass(slots=True, kw_only=True)
class RawFlow:
    """A record received as a JSON line (another process's flow): kept as it came, parsed once."""

    line: str
    record: dict[str, Any]
    time_ns: int

    def to_json(self, node_name: str = "") -> dict[str, Any]:
        flow = self.record.get("flow")
        return flow if isinstance(flow, dict) else {}

    def to_line(self, node_name: str = "") -> str:
        return self.line


class FlowStream(Protocol):
    """Where a FlowSink writes: a text file, stdout, a `RotatingFile` or a `FlowPublisher`."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


class FlowRecord(Protocol):
    """What the ring holds: a `Flow` made here, or a `RawFlow` published by another worker."""

    time_ns: int

    def to_json(self, node_name: str = "") -> dict[str, Any]: ...

    def to_line(self, node_name: str = "") -> str: ...


# --- files that rotate by size --------------------------------------------------------------------------


class RotatingFile:
    """A flows file that rotates by size, as hubble-exporter's files do: `name` -> `name.1` -> ... `name.N`.

    At most `max_backups` old files are kept (the oldest is removed). `max_bytes` 0 never rotates.
    Several processes (gateway workers) may append to one path: a rotation is done under an exclusive
    `flock` of the current file by whichever writer finds it full, and every writer reopens `name` when
    it sees that the file it holds is no longer `name` (another process rotated it).
    """

    def __init__(self, path: str, *, max_bytes: int = 0, max_backups: int = 5) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_backups = max_backups
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.rotations = 0

    def write(self, text: str) -> int:
        if self.max_bytes:
            self._reopen_if_moved()
        return self._file.write(text)

    def flush(self) -> None:
        self._file.flush()
        if self.max_bytes and os.fstat(self._file.fileno()).st_size >= self.max_bytes:
            self._rotate()

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def _is_current(self) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(self._file.fileno()).st_ino
        except FileNotFoundError:
            return False

    def _reopen_if_moved(self) -> None:
        if not self._is_current():
            self._file.close()
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def _rotate(self) -> None:
        fd = self._file.fileno()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if self._is_current() and os.fstat(fd).st_size >= self.max_bytes:
                if self.max_backups <= 0:
                    os.unlink(self.path)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{self.path}.{self.max_backups}")
                    for n in range(self.max_backups - 1, 0, -1):
                        with contextlib.suppress(FileNotFoundError):
                            os.rename(f"{self.path}.{n}", f"{self.path}.{n + 1}")
                    os.rename(self.path, f"{self.path}.1")
                self.rotations += 1
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self._reopen_if_moved()


def rotated_paths(path: str) -> list[str]:
    """The files of a rotated flows file that exist, oldest first: `name.N` ... `name.1`, `name`."""
    backups: list[tuple[int, str]] = []
    directory = os.path.dirname(path) or "."
    base = os.path.basename(path)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(directory):
            if entry.startswith(base + "."):
                suffix = entry[len(base) + 1:]
                if suffix.isdigit():
                    backups.append((int(suffix), os.path.join(directory, entry)))
    out = [p for _, p in sorted(backups, reverse=True)]
    if os.path.exists(path):
        out.append(path)
    return out


# --- records on the way to a formatter process (proxy/flowproc.py) ----------------------------------------
# A loop pass's records cross a pipe as one marshal'd list of plain tuples: a connection's FlowContext once
# (WIRE_CONTEXT, id, fields), then each record as (WIRE_FLOW, context id, its fields); a record of a class
# the other side cannot rebuild goes as its JSON line (WIRE_LINE). The formatter rebuilds `Flow`s and calls
# the same `to_line`, so the lines are the ones this process would have written.
WIRE_CONTEXT = 0
WIRE_FLOW = 1
WIRE_LINE = 2
WIRE_FORGET = 3  # the sender forgot its context ids (its table was full): forget them too
WIRE_SYNC = 4  # write and flush what came before, then answer with the token (FlowSink.flush)
WIRE_L7 = 5  # (WIRE_L7, id, l7): an l7 record many flows share; a WIRE_FLOW then carries its id (an int) for l7
WIRE_MAX_CONTEXTS = 16_384  # contexts the sender keeps an id for (it holds them: ids stay unique) before it starts afresh
WIRE_MAX_L7 = 4096  # shared l7 records the sender keeps an id for before it starts afresh (with WIRE_FORGET)


def peer_wire(peer: Peer) -> tuple[Any, ...]:
    return (peer.ip, peer.port, peer.identity, peer.namespace, peer.pod_name, tuple(peer.labels), peer.endpoint_id,
            tuple([(w.name, w.kind) for w in peer.workloads]), peer.cluster_name)


def peer_from_wire(t: Sequence[Any]) -> Peer:
    return Peer(ip=t[0], port=t[1], identity=t[2], namespace=t[3], pod_name=t[4], labels=tuple(t[5]), endpoint_id=t[6],
                workloads=tuple([Workload(name=n, kind=k) for n, k in t[7]]), cluster_name=t[8])


def context_wire(ctx: FlowContext) -> tuple[Any, ...]:
    return (peer_wire(ctx.source), peer_wire(ctx.destination), ctx.traffic_direction, ctx.transport,
            tuple(ctx.source_names), tuple(ctx.destination_names))


def context_from_wire(t: Sequence[Any]) -> FlowContext:
    return FlowContext(source=peer_from_wire(t[0]), destination=peer_from_wire(t[1]), traffic_direction=t[2],
                       transport=t[3], source_names=tuple(t[4]), destination_names=tuple(t[5]))


def flow_from_wire(t: Sequence[Any], context: FlowContext, l7: dict[str, Any] | None = None) -> Flow:
    """The record of a WIRE_FLOW tuple (see FlowSink._wire_pending), on `context`; `l7` when the tuple carries
    the id of a shared one."""
    cls = L3L4Flow if t[14] else Flow
    return cls(context=context, verdict=t[2], l7_type=t[3], l7=t[4] if l7 is None else l7, summary=t[5], time_ns=t[6], latency_ns=t[7],
               rule=t[8], reason=t[9], flow_id=t[10], matched=tuple(t[11]), policy_revision=t[12],
               policy_match_type=t[13])


# --- the sink -------------------------------------------------------------------------------------------


class FlowSink:
    """Where flow records go: JSON lines to `streams`, a bounded ring of the latest records, and listeners.

    Thread-safe enough for one event loop per process (the ring is a deque with maxlen). By default
    each record is written (and flushed) as it is emitted; after `defer_writes(loop.call_soon)` the
    records emitted on the loop's thread are queued and written together, one write and one flush per
    stream, when the scheduled `flush()` runs (or at once when `MAX_PENDING` are queued).
    After `start_writer(schedule)` (what a proxy uses) the batch is formatted as with `defer_writes`
    and handed to a thread of the sink's own, which writes it; after `start_writer()` that thread
    formats the records too; after `start_writer(schedule, process=True)` (MEMBRANE_FLOWS_PROCESS=1) the batch
    goes as tuples to a formatter process that formats and writes it (`--flows FILE` only; proxy/flowproc.py).
    Either way, records that find the writer `max_queue` records behind are
    dropped and counted in `dropped` (and through `on_dropped`), never waited for. The ring and the
    listeners (`membrane observe`) still get every record at once, on the emitting thread.
    `node_name` goes into every record (None = `default_node_name()`).
    """

    # ClassVar: class constants, not per-instance attributes, when mypyc compiles this module
    MAX_PENDING: ClassVar[int] = 512  # records queued before a write is forced (bounds memory and delay under load)
    MAX_QUEUE: ClassVar[int] = 65_536  # records waiting for the writer thread; more are dropped (about 10 s of a busy worker)
    BATCH_S: ClassVar[float] = 0.002  # the writer thread lets records gather this long after the first one of a batch
    MAX_BATCH: ClassVar[int] = 2048  # records per write
    YIELD_EVERY: ClassVar[int] = 32  # the writer thread lets the event loop run after formatting this many (~0.2 ms)

    def __init__(self, streams: Iterable[FlowStream] = (), ring_size: int = 10_000, *, node_name: str | None = None,
                 max_queue: int | None = None) -> None:
        self._streams = list(streams)
        self._ring: collections.deque[FlowRecord] = collections.deque(maxlen=ring_size)
        self._lock = threading.Lock()
        self._pending: list[Flow] = []
        self._schedule: Callable[[Callable[[], None]], object] | None = None
        self._owner = 0  # the thread whose emits may be deferred
        self._listeners: list[Callable[[FlowRecord], None]] = []
        self.node_name = default_node_name() if node_name is None else node_name
        self.write_errors = 0
        self.listener_errors = 0
        self.written = 0
        # None = MAX_QUEUE (a default argument cannot name a class attribute when mypyc compiles this module)
        self.max_queue = self.MAX_QUEUE if max_queue is None else max_queue
        self.dropped = 0  # records the writer thread's queue had no room for
        self.on_dropped: Callable[[], object] | None = None  # called once per dropped record (a metric's inc)
        self._queue: collections.deque[Flow] | None = None  # the writer thread's records to format, once started
        self._chunks: collections.deque[tuple[str, int]] | None = None  # or its formatted lines (and their count)
        self._queued = 0  # records in _chunks
        self._count_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._writer_thread: threading.Thread | None = None  # not `_thread`: mypyc would name its C field `__thread`, a C keyword
        self._process: Any = None  # the formatter process (proxy/flowproc.py FormatterProcess), once started
        self._context_ids: dict[int, tuple[FlowContext, int]] = {}  # id(context) -> (context, its wire id)
        self._next_context_id = 0
        # a shared l7's key (HTTP head fields, or id() of a reused_l7) -> (its wire id, the l7: held, so an id stays its own)
        self._l7_ids: dict[Any, tuple[int, dict[str, Any]]] = {}
        self._wire_forget = False  # a dropped pass took definitions with it: the next pass starts the tables afresh

    def start_writer(self, schedule: Callable[[Callable[[], None]], object] | None = None, *,
                     process: bool | None = None) -> None:
        """Write records on a thread or a process of this sink's own from now on (see the class doc).

        With `process` True, `schedule` and streams that are all `RotatingFile`s (`--flows FILE`), a formatter
        process (proxy/flowproc.py) formats and writes them: once per loop pass the records go to it as plain
        tuples over a pipe, so neither the JSON nor the writing takes this process's GIL. None means True
        when $MEMBRANE_FLOWS_PROCESS is set to anything but "" or "0". Off by default: it takes ~17 µs per
        HTTP/1.1 request off the worker but costs ~22 µs in the formatter, and on a machine whose cores are
        all busy (2 cores here) flows-on throughput was lower with it (BENCHMARKS.md run 7b). If the process
        cannot start, the thread is used.

        Without `schedule` the thread also formats them (JSON). With it (the server passes its loop's
        `call_soon`) the records emitted on this thread are formatted once per loop pass here, as
        `defer_writes` does, and only the writing (file, pipe, socket) is the thread's: measured on a
        busy 2-core machine, formatting on a second thread costs the loop more than formatting on it,
        because the two threads hand the GIL back and forth (BENCHMARKS.md, issue 11 run 4).
        Does nothing without streams (the ring alone needs no writer) or when already started."""
        if not self._streams or self._writer_thread is not None or self._process is not None:
            return
        self.flush()
        if process is None:
            process = os.environ.get("MEMBRANE_FLOWS_PROCESS", "") not in ("", "0")
        if process and schedule is not None and all(type(s) is RotatingFile for s in self._streams):
            from membrane.proxy.flowproc import FormatterProcess  # imports this module: not at the top

            try:
                self._process = FormatterProcess(self._streams, node_name=self.node_name, max_queue=self.max_queue)
            except OSError as e:
                sys.stderr.write(f"membrane: flows formatter process did not start ({e}); formatting on a thread\n")
            else:
                self._schedule = schedule
                self._owner = threading.get_ident()
                self._context_ids = {}
                self._l7_ids = {}
                return
        self._stop = False
        if schedule is None:
            self._schedule = None
            self._queue = collections.deque()
        else:
            self._schedule = schedule
            self._owner = threading.get_ident()
            self._chunks = collections.deque()
        self._writer_thread = threading.Thread(target=self._writer, name="membrane-flows", daemon=True)
        self._writer_thread.start()

    def _pass_end(self) -> None:
        """What the loop runs once per pass that emitted records: hand them to the formatter process or the
        writer thread, or write them."""
        if self._process is not None:
            self._wire_pending()
        elif self._chunks is not None:
            self._hand_pending()
        else:
            self.flush()

    def _wire_pending(self) -> None:
        """Send this loop pass's records to the formatter process as plain tuples (the connection's fixed part
        once per connection), one pipe write; drop and count them when it is `max_queue` records behind."""
        process = self._process
        pending = self._pending
        if process is None or not pending:
            return
        self._pending = []
        items: list[Any] = []
        ids = self._context_ids
        l7_ids = self._l7_ids
        if self._wire_forget:
            self._wire_forget = False
            items.append((WIRE_FORGET,))
        for flow in pending:
            kind = type(flow)
            if kind is Flow or kind is L3L4Flow:
                ctx = flow.context
                entry = ids.get(id(ctx))
                if entry is None:
                    if len(ids) >= WIRE_MAX_CONTEXTS:
                        ids.clear()
                        l7_ids.clear()
                        items.append((WIRE_FORGET,))
                    cid = self._next_context_id
                    self._next_context_id = cid + 1
                    ids[id(ctx)] = (ctx, cid)  # holding ctx keeps its id from being reused
                    items.append((WIRE_CONTEXT, cid, context_wire(ctx)))
                else:
                    cid = entry[1]
                if not flow.flow_id:  # made here, so the file and the ring (`membrane observe`) show one uuid
                    flow.flow_id = new_flow_id()
                # A keep-alive client repeats its request heads, a server its response heads, a DNS session its
                # records: such an l7 crosses once, then by id (the formatter also makes its JSON once).
                l7: Any = flow.l7
                key: Any = None
                http = l7.get("http") if len(l7) == 1 else None
                if http is not None:
                    headers = http.get("headers", ())
                    if type(headers) is tuple and len(http) <= 5:
                        key = (http.get("code", 0), http.get("method", ""), http.get("url", ""),
                               http.get("protocol", ""), headers)
                else:
                    reused = _REUSED_L7.get(id(l7))
                    if reused is not None and reused[0] is l7:
                        key = id(l7)
                if key is not None:
                    known = l7_ids.get(key)
                    if known is None:
                        if len(l7_ids) >= WIRE_MAX_L7:
                            ids.clear()
                            l7_ids.clear()
                            items.append((WIRE_FORGET,))
                            cid = self._next_context_id
                            self._next_context_id = cid + 1
                            ids[id(ctx)] = (ctx, cid)
                            items.append((WIRE_CONTEXT, cid, context_wire(ctx)))
                        lid = len(l7_ids)
                        l7_ids[key] = (lid, l7)
                        items.append((WIRE_L7, lid, l7))
                        l7 = lid
                    else:
                        l7 = known[0]
                items.append((WIRE_FLOW, cid, flow.verdict, flow.l7_type, l7, flow.summary, flow.time_ns,
                              flow.latency_ns, flow.rule, flow.reason, flow.flow_id, flow.matched,
                              flow.policy_revision, flow.policy_match_type, kind is L3L4Flow))
            else:  # a subclass with a shape of its own (control/drops.py DropFlow): its line, made here
                try:
                    items.append((WIRE_LINE, flow.to_line(self.node_name)))
                except Exception:
                    self.write_errors += 1
        try:
            try:
                lost = process.send(items, len(pending))
            except ValueError:  # a record holding what marshal cannot carry: this pass goes as lines made here
                ids.clear()
                l7_ids.clear()
                lines: list[Any] = [(WIRE_FORGET,)]
                for flow in pending:
                    with contextlib.suppress(Exception):
                        lines.append((WIRE_LINE, flow.to_line(self.node_name)))
                lost = process.send(lines, len(pending))
        except OSError:  # the formatter is gone: write in this process from now on
            self.write_errors += len(pending)
            self._process_failed()
            return
        if lost:  # the contexts and l7 records this pass defined never arrive: define them again
            ids.clear()
            l7_ids.clear()
            self._wire_forget = True
            self.dropped += lost
            if self.on_dropped is not None:
                for _ in range(lost):
                    self.on_dropped()

    def _process_failed(self) -> None:
        process = self._process
        self._process = None
        sys.stderr.write("membrane: the flows formatter process is gone; writing flows in the worker\n")
        if process is not None:
            with contextlib.suppress(Exception):
                process.close(timeout_s=1.0)

    def _hand_pending(self) -> None:
        """Format the records this loop pass emitted (one string) and queue it for the writer thread."""
        if self._chunks is None:  # the writer stopped since this was scheduled
            self.flush()
            return
        pending = self._pending
        if pending:
            self._pending = []
            node = self.node_name
            self._hand_over("".join([flow.to_line(node) for flow in pending]), len(pending))

    def _hand_over(self, text: str, records: int) -> None:
        """Queue formatted lines for the writer thread, or drop them (counted) when it is `max_queue` records behind."""
        chunks = self._chunks
        assert chunks is not None
        with self._count_lock:
            if self._queued + records > self.max_queue:
                full = True
            else:
                full = False
                self._queued += records
                chunks.append((text, records))
        if full:
            self.dropped += records
            if self.on_dropped is not None:
                for _ in range(records):
                    self.on_dropped()
            return
        if len(chunks) == 1:
            self._wake.set()

    def _writer(self) -> None:
        wake = self._wake
        while True:
            wake.wait()
            wake.clear()
            if self._stop:
                return
            time.sleep(self.BATCH_S)  # let a batch gather: one write (and one GIL hand-over) per batch
            self._drain()

    def _drain(self) -> None:
        """Write everything queued for the writer thread, in order, a batch per write. Never raises."""
        yielding = threading.current_thread() is self._writer_thread
        with self._lock:
            chunks = self._chunks
            while chunks:  # lines formatted on the loop: just write them, many chunks per write
                texts: list[str] = []
                taken = 0
                with contextlib.suppress(IndexError):
                    while len(texts) < 64:
                        text, records = chunks.popleft()
                        texts.append(text)
                        taken += records
                if texts:
                    self._write("".join(texts))
                with self._count_lock:  # after the write: lines being written still count as behind
                    self._queued -= taken
            queue = self._queue
            if not queue:
                return
            node = self.node_name
            popleft = queue.popleft
            while queue:
                batch: list[str] = []
                try:
                    while len(batch) < self.MAX_BATCH:
                        batch.append(popleft().to_line(node))
                        if yielding and len(batch) % self.YIELD_EVERY == 0:
                            time.sleep(0)  # hand the GIL back: the event loop waits at most this many records
                except IndexError:  # emptied
                    pass
                except Exception:  # a record that cannot be serialised is lost, not the writer
                    self.write_errors += 1
                if batch:
                    self._write("".join(batch))

    def stop_writer(self) -> None:
        """Stop the writer thread (or process) after it wrote what is queued; later records are written as they come."""
        if self._process is not None:
            self._wire_pending()
            process = self._process
            self._process = None
            if process is not None:
                try:
                    process.close()
                except OSError:
                    self.write_errors += 1
            self._context_ids = {}
            self._l7_ids = {}
        thread = self._writer_thread
        if thread is None:
            return
        self._stop = True
        self._wake.set()
        thread.join(timeout=5.0)
        self._writer_thread = None
        self.flush()  # what the loop still holds goes to the queue, then the queue to the streams
        self._drain()
        self._queue = None
        self._chunks = None

    def defer_writes(self, schedule: Callable[[Callable[[], None]], object] | None) -> None:
        """Batch the writes of records emitted on this thread: `schedule(flush)` runs once per batch
        (the server passes its loop's `call_soon`). None writes each record at once again."""
        self.flush()
        self._schedule = schedule if self._streams else None
        self._owner = threading.get_ident()

    def add_listener(self, listener: Callable[[FlowRecord], None]) -> None:
        """Call `listener(record)` for every record from now on (the flow server's followers). It must not block."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[FlowRecord], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _notify(self, record: FlowRecord) -> None:
        for listener in list(self._listeners):
            try:
                listener(record)
            except Exception:  # a broken follower must not break the data path
                self.listener_errors += 1

    def ingest(self, line: str) -> bool:
        """Take a record another process wrote (one JSON line): into the ring and to listeners, not to streams.

        Returns False (and keeps nothing) for a line that is not a flow record.
        """
        try:
            record = json.loads(line)
        except ValueError:
            return False
        if not isinstance(record, dict) or not isinstance(record.get("flow"), dict):
            return False
        raw = RawFlow(line=line if line.endswith("\n") else line + "\n", record=record,
                      time_ns=_parse_time(str(record["flow"].get("time", ""))) or 0)
        self._ring.append(raw)
        if self._listeners:
            self._notify(raw)
        return True

    def emit(self, flow: Flow) -> None:
        """Record one flow. Never raises: a stream that fails is counted in `write_errors`."""
        self._ring.append(flow)
        self.written += 1
        if self._listeners:
            self._notify(flow)
        if not self._streams:
            return
        queue = self._queue
        if queue is not None:
            if len(queue) >= self.max_queue:
                self.dropped += 1
                if self.on_dropped is not None:
                    self.on_dropped()
                return
            queue.append(flow)
            if len(queue) == 1:  # the writer may be asleep: the first record of a batch wakes it
                self._wake.set()
            return
        schedule = self._schedule
        if schedule is not None and threading.get_ident() == self._owner:
            pending = self._pending
            pending.append(flow)
            if len(pending) == 1:
                try:
                    schedule(self._pass_end)
                except RuntimeError:  # the loop is closed: nothing will run the flush
                    self.flush()
            elif len(pending) >= self.MAX_PENDING:
                self._pass_end()
            return
        with self._lock:
            self._write(flow.to_line(self.node_name))

    def flush(self) -> None:
        """Write the queued records now (one write and one flush per stream). Never raises."""
        if self._process is not None:  # the formatter writes them: wait until it did
            self._wire_pending()
            process = self._process
            if process is not None:
                try:
                    process.sync()
                except OSError:
                    self._process_failed()
            return
        if self._queue is not None:
            self._drain()
        if self._chunks is not None:
            self._hand_pending()
            self._drain()
            return
        with self._lock:
            pending = self._pending
            if not pending:
                return
            self._pending = []
            node = self.node_name
            self._write("".join([flow.to_line(node) for flow in pending]))

    def _write(self, text: str) -> None:
        for stream in self._streams:
            try:
                stream.write(text)
                stream.flush()
            except (OSError, ValueError):
                self.write_errors += 1

    def records(self, limit: int | None = None) -> list[FlowRecord]:
        """The most recent record objects, oldest first (at most `limit`)."""
        items = list(self._ring)
        if limit is not None:
            items = items[-limit:] if limit > 0 else []
        return items

    def recent(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The most recent records' `flow` objects, oldest first (at most `limit`)."""
        return [record.to_json(self.node_name) for record in self.records(limit)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.recent())

    def close(self) -> None:
        """Stop the writer thread, write what is queued and flush every stream (they stay open: their owner
        closes them)."""
        self.stop_writer()
        self.flush()
        for stream in self._streams:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass



def open_flow_streams(paths: Sequence[str], *, max_bytes: int = 0, max_backups: int = 5) -> list[FlowStream]:
    """The streams of `--flows PATH...`: '-' is stdout, anything else a `RotatingFile` (appending; rotated at
    `max_bytes`, 0 = never, keeping `max_backups` old files). Raises OSError for a path that cannot be opened."""
    streams: list[FlowStream] = []
    for path in paths:
        if path == "-":
            streams.append(sys.stdout)
        else:
            streams.append(RotatingFile(path, max_bytes=max_bytes, max_backups=max_backups))
    return streams


def close_flow_streams(streams: Iterable[FlowStream]) -> None:
    """Close what open_flow_streams opened (never stdout). Never raises."""
    for stream in streams:
        close = getattr(stream, "close", None)
        if stream is not sys.stdout and close is not None:
            with contextlib.suppress(OSError):
                close()
