"""Reading, filtering and printing flow records the way `hubble observe` does: pure functions, no I/O.

Owns: parsing one flow JSON line (the `{"flow":...}` envelope, or a bare flow), Hubble's `FlowFilter`
semantics (cilium/cilium pkg/hubble/filters and hubble/cmd/observe/flows_filter.go at v1.19.4), turning
`hubble observe`-style flags into filter lists, and the `compact`, `json` and `table` output forms.
Never opens a file or a socket (the CLI and the flow server do).

Filter semantics, as Hubble's:
* One `FlowFilter` (a dict with flow.proto FlowFilter field names: `source_pod`, `verdict`, ...) matches a
  flow when every field it sets matches (AND across fields); a field with several values matches when
  any value does (OR within a field).
* A whitelist matches when any of its filters matches (OR); an empty whitelist matches everything. A
  blacklist excludes a flow when any of its filters matches. A flow is shown when it passes both.
* Flags: repeating a flag adds values to the same field (OR); different flags AND. The either-way flags
  (`--pod`, `--ip`, `--label`, `--port`, `--namespace`) make two filters, one on the source side and
  one on the destination side, OR-ed: `--pod x --http-status 403` is (source pod x AND 403) OR
  (destination pod x AND 403). `--not` sends the next flag to the blacklist.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

FlowDict = dict[str, Any]
Predicate = Callable[[FlowDict], bool]

# pkg/monitor/api MessageTypeNames: the names `--type` accepts.
EVENT_TYPES = {
    "drop": 1, "debug": 2, "capture": 3, "trace": 4, "policy-verdict": 5, "trace-sock": 7, "l7": 129, "agent": 130,
}
VERDICTS = ("VERDICT_UNKNOWN", "FORWARDED", "DROPPED", "ERROR", "AUDIT", "REDIRECTED", "TRACED", "TRANSLATED")
_L4_PROTOCOLS = ("icmp", "icmpv4", "icmpv6", "tcp", "udp", "sctp", "vrrp", "igmp")
_L7_PROTOCOLS = ("dns", "http", "kafka")
_HTTP_STATUS_FULL = re.compile(r"^[1-5][0-9]{2}$")
_HTTP_STATUS_PREFIX = re.compile(r"^[1-5][0-9]?\+$")

# Cilium's reserved identities (pkg/identity/numericidentity.go reservedIdentityNames): printed by name.
RESERVED_IDENTITIES = {
    0: "unknown", 1: "host", 2: "world", 3: "unmanaged", 4: "health", 5: "init", 6: "remote-node",
    7: "kube-apiserver", 8: "ingress", 9: "world-ipv4", 10: "world-ipv6",
}


class FilterError(ValueError):
    """A filter value that cannot be used (names the flag or field and the value)."""


# --- reading ----------------------------------------------------------------------------------------


def parse_line(line: str) -> tuple[FlowDict, str] | None:
    """(flow, node_name) of one JSON line: the `{"flow":...}` envelope or a bare flow; None for a line that
    is not a flow record (blank, `lost_events`, or not JSON: the caller counts it).
    """
    line = line.strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    flow = record.get("flow")
    if isinstance(flow, dict):
        node = record.get("node_name") or flow.get("node_name") or ""
        return flow, str(node)
    if "verdict" in record and ("IP" in record or "Type" in record):  # a bare flow object
        return record, str(record.get("node_name", ""))
    return None


def flow_time_ns(flow: FlowDict) -> int:
    """The flow's `time` in ns since the epoch (0 if absent or unreadable)."""
    return parse_time(str(flow.get("time", ""))) or 0


def parse_time(text: str) -> int | None:
    """ns since the epoch of an RFC 3339 timestamp with any fraction and `Z` or an offset; None if unreadable."""
    text = text.strip()
    if not text:
        return None
    main, tz = text, "+00:00"
    if text[-1] in "Zz":
        main = text[:-1]
    else:
        for sign in ("+", "-"):
            idx = text.rfind(sign)
            if idx > 10:
                main, tz = text[:idx], text[idx:]
                break
    frac_ns = 0
    if "." in main:
        main, frac = main.split(".", 1)
        if not frac.isdigit() or len(frac) > 9:
            return None
        frac_ns = int(frac.ljust(9, "0"))
    try:
        moment = datetime.datetime.fromisoformat(main + tz)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp()) * 1_000_000_000 + frac_ns


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000,
            "h": 3_600_000_000_000}


def parse_since(text: str, *, now_ns: int | None = None) -> int:
    """`--since`: a Go duration back from now (`5m`, `1h30m`, `90s`) or an RFC 3339 time (as hubble's
    FromString). Returns ns since the epoch.

    Raises:
        FilterError: neither form (the message names the value).
    """
    text = text.strip()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    if text and pos == len(text):
        return (time.time_ns() if now_ns is None else now_ns) - int(total)
    for candidate in (text, text + "T00:00:00Z" if len(text) == 10 else ""):
        if candidate:
            value = parse_time(candidate)
            if value is not None:
                return value
    raise FilterError(f"--since {text!r}: not a duration (5m, 1h) or an RFC 3339 time (2025-11-26T04:06:40Z)")


# --- one filter -------------------------------------------------------------------------------------


def _endpoint(flow: FlowDict, side: str) -> FlowDict:
    ep = flow.get(side)
    return ep if isinstance(ep, dict) else {}


def _ports(flow: FlowDict) -> tuple[int | None, int | None]:
    l4 = flow.get("l4")
    if isinstance(l4, dict):
        for key in ("TCP", "UDP", "SCTP"):
            ports = l4.get(key)
            if isinstance(ports, dict):
                return int(ports.get("source_port", 0)), int(ports.get("destination_port", 0))
    return None, None


def _parse_namespaced(name: str) -> tuple[str, str]:
    """k8s.ParseNamespaceName: `ns/pod` -> (ns, pod); `pod` -> ("default", pod); `ns/` -> (ns, "")."""
    ns, sep, rest = name.partition("/")
    if sep:
        return ns, rest
    if not ns:
        return "", ""
    return "default", ns


def _pod_filter(values: Sequence[str], side: str) -> Predicate:
    wanted = []
    for value in values:
        if value == "":
            raise FilterError("invalid filter, name must not be empty")
        wanted.append(_parse_namespaced(value))

    def match(flow: FlowDict) -> bool:
        ep = _endpoint(flow, side)
        ns, pod = str(ep.get("namespace", "")), str(ep.get("pod_name", ""))
        if not ns and not pod:
            return False
        return any((not prefix or pod.startswith(prefix)) and (not want_ns or want_ns == ns) for want_ns, prefix in wanted)

    return match


def _ip_filter(values: Sequence[str], side: str) -> Predicate:
    exact: set[str] = set()
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for value in values:
        try:
            if "/" in value:
                nets.append(ipaddress.ip_network(value, strict=False))
            else:
                exact.add(str(ipaddress.ip_address(value)))
        except ValueError as e:
            raise FilterError(f"invalid IP {'prefix' if '/' in value else 'address'} {value!r} in filter: {e}") from None

    def match(flow: FlowDict) -> bool:
        ip = flow.get("IP")
        addr = str(ip.get(side, "")) if isinstance(ip, dict) else ""
        if not addr:
            return False
        if addr in exact:
            return True
        if nets:
            try:
                parsed = ipaddress.ip_address(addr)
            except ValueError:
                return False
            return any(parsed in net for net in nets)
        return False

    return match


def _port_filter(values: Sequence[str], index: int) -> Predicate:
    ports: set[int] = set()
    for value in values:
        if not value.isdigit() or int(value) > 65535:
            raise FilterError(f"invalid port {value!r}")
        ports.add(int(value))

    def match(flow: FlowDict) -> bool:
        port = _ports(flow)[index]
        return port is not None and port in ports

    return match


def _verdict_filter(values: Sequence[str]) -> Predicate:
    for value in values:
        if value not in VERDICTS:
            raise FilterError(f"invalid --verdict value: {value} (one of {', '.join(VERDICTS[1:])})")
    wanted = set(values)
    return lambda flow: str(flow.get("verdict", "VERDICT_UNKNOWN")) in wanted


def _event_type_filter(values: Sequence[dict[str, Any]]) -> Predicate:
    def match(flow: FlowDict) -> bool:
        event = flow.get("event_type")
        if not isinstance(event, dict):
            return False
        etype, sub = int(event.get("type", 0)), int(event.get("sub_type", 0))
        for want in values:
            t = int(want.get("type", 0))
            if t and t != etype:
                continue
            if want.get("match_sub_type") and int(want.get("sub_type", 0)) != sub:
                continue
            return True
        return False

    return match


def _protocol_filter(values: Sequence[str]) -> Predicate:
    wanted = []
    for value in values:
        proto = value.lower()
        if proto not in _L4_PROTOCOLS and proto not in _L7_PROTOCOLS:
            raise FilterError(f"unknown protocol: {value!r}")
        wanted.append(proto)

    def match(flow: FlowDict) -> bool:
        l4 = flow.get("l4") if isinstance(flow.get("l4"), dict) else {}
        l7 = flow.get("l7") if isinstance(flow.get("l7"), dict) else {}
        assert isinstance(l4, dict) and isinstance(l7, dict)
        for proto in wanted:
            if proto == "icmp" and ("ICMPv4" in l4 or "ICMPv6" in l4):
                return True
            if proto in ("icmpv4", "icmpv6") and ("ICMP" + proto[4:]) in l4:
                return True
            if proto in ("tcp", "udp", "sctp", "vrrp", "igmp") and proto.upper() in l4:
                return True
            if proto in _L7_PROTOCOLS and proto in l7:
                return True
        return False

    return match


def _http(flow: FlowDict) -> FlowDict | None:
    l7 = flow.get("l7")
    if not isinstance(l7, dict):
        return None
    http = l7.get("http")
    return http if isinstance(http, dict) else None


def _http_status_filter(values: Sequence[str]) -> Predicate:
    full: set[str] = set()
    prefixes: list[str] = []
    for value in values:
        if _HTTP_STATUS_FULL.match(value):
            full.add(value)
        elif _HTTP_STATUS_PREFIX.match(value):
            prefixes.append(value[:-1])
        else:
            raise FilterError(f"invalid http status code prefix: {value!r} (e.g. 404, 4+, 40+)")

    def match(flow: FlowDict) -> bool:
        http = _http(flow)
        if http is None or not http.get("code"):
            return False  # not an HTTP response record
        code = f"{int(http['code']):03d}"
        return code in full or any(code.startswith(p) for p in prefixes)

    return match


def _http_method_filter(values: Sequence[str]) -> Predicate:
    wanted = {v.upper() for v in values}

    def match(flow: FlowDict) -> bool:
        http = _http(flow)
        return http is not None and bool(http.get("method")) and str(http["method"]).upper() in wanted

    return match


def _compile_regexes(values: Sequence[str], what: str) -> list[re.Pattern[str]]:
    out = []
    for value in values:
        try:
            out.append(re.compile(value))
        except re.error as e:
            raise FilterError(f"invalid {what} filter: {value}: {e}") from None
    return out


def _http_path_filter(values: Sequence[str]) -> Predicate:
    patterns = _compile_regexes(values, "http path")

    def match(flow: FlowDict) -> bool:
        http = _http(flow)
        if http is None or not http.get("url"):
            return False
        try:
            path = urlsplit(str(http["url"])).path
        except ValueError:
            return False
        return any(p.search(path) for p in patterns)  # Go's MatchString: unanchored

    return match


def _dns_query_filter(values: Sequence[str]) -> Predicate:
    patterns = _compile_regexes(values, "dns query")

    def match(flow: FlowDict) -> bool:
        l7 = flow.get("l7")
        dns = l7.get("dns") if isinstance(l7, dict) else None
        if not isinstance(dns, dict):
            return False
        query = str(dns.get("query", ""))
        return any(p.search(query) for p in patterns)

    return match


def _identity_filter(values: Sequence[int], side: str) -> Predicate:
    wanted = set(values)
    return lambda flow: int(_endpoint(flow, side).get("identity", 0)) in wanted


def _reply_filter(values: Sequence[bool]) -> Predicate:
    wanted = set(values)
    return lambda flow: "is_reply" in flow and bool(flow["is_reply"]) in wanted


def _direction_filter(values: Sequence[str]) -> Predicate:
    wanted = {v.upper() for v in values}
    return lambda flow: str(flow.get("traffic_direction", "")) in wanted


def _drop_reason_filter(values: Sequence[str]) -> Predicate:
    wanted = set(values)
    return lambda flow: str(flow.get("drop_reason_desc", "")) in wanted


def _node_filter(values: Sequence[str]) -> Predicate:
    patterns = [re.compile("^" + re.escape(v).replace(r"\*", "[^/]*") + "$") for v in values]
    return lambda flow: any(p.match(str(flow.get("node_name", ""))) for p in patterns)


def _uuid_filter(values: Sequence[str]) -> Predicate:
    wanted = set(values)
    return lambda flow: str(flow.get("uuid", "")) in wanted


# --- label selectors (k8s syntax with Cilium's source prefixes, as `hubble observe --label`) ----------


@dataclass(frozen=True, slots=True)
class _Requirement:
    source: str  # "any" or a label source ("k8s", "reserved", ...)
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Sequence[tuple[str, str, str]]) -> bool:
        found = [v for src, k, v in labels if k == self.key and (self.source == "any" or src == self.source)]
        if self.op == "exists":
            return bool(found)
        if self.op == "!":
            return not found
        if self.op in ("=", "in"):
            return any(v in self.values for v in found)
        # "!=" and "notin" match when the label is absent or has another value (k8s semantics)
        return not any(v in self.values for v in found)


_TOKEN = re.compile(r"\s*(\(|\)|,|!=|==|=|!|[^\s(),!=]+)")


def _split_key(raw: str) -> tuple[str, str]:
    source, sep, key = raw.partition(":")
    return (source, key) if sep else ("any", raw)


def parse_selector(text: str) -> list[_Requirement]:
    """A label selector (`app=x`, `k8s:app in (a, b)`, `!env`, `team`, comma = AND) as its requirements.

    Raises:
        FilterError: the selector cannot be read (names it).
    """
    tokens = _TOKEN.findall(text)
    if "".join(tokens).replace(" ", "") != re.sub(r"\s+", "", text):
        raise FilterError(f"invalid label selector {text!r}")
    reqs: list[_Requirement] = []
    i = 0

    def fail() -> FilterError:
        return FilterError(f"invalid label selector {text!r}")

    while i < len(tokens):
        tok = tokens[i]
        if tok == "!":
            if i + 1 >= len(tokens):
                raise fail()
            src, key = _split_key(tokens[i + 1])
            reqs.append(_Requirement(src, key, "!"))
            i += 2
        else:
            src, key = _split_key(tok)
            nxt = tokens[i + 1] if i + 1 < len(tokens) else ","
            if nxt in ("=", "==", "!="):
                if i + 2 >= len(tokens) or tokens[i + 2] in (",", "(", ")"):
                    value = ""
                    i += 2
                else:
                    value = tokens[i + 2]
                    i += 3
                reqs.append(_Requirement(src, key, "!=" if nxt == "!=" else "=", frozenset({value})))
            elif nxt in ("in", "notin"):
                if i + 2 >= len(tokens) or tokens[i + 2] != "(":
                    raise fail()
                j = i + 3
                values: set[str] = set()
                while j < len(tokens) and tokens[j] != ")":
                    if tokens[j] != ",":
                        values.add(tokens[j])
                    j += 1
                if j >= len(tokens):
                    raise fail()
                reqs.append(_Requirement(src, key, nxt, frozenset(values)))
                i = j + 1
            else:
                reqs.append(_Requirement(src, key, "exists"))
                i += 1
        if i < len(tokens):
            if tokens[i] != ",":
                raise fail()
            i += 1
    if not reqs:
        raise fail()
    return reqs


def _flow_labels(ep: FlowDict) -> list[tuple[str, str, str]]:
    out = []
    for label in ep.get("labels", ()) or ():
        text = str(label)
        source, sep, rest = text.partition(":")
        if not sep:
            source, rest = "unspec", text
        key, _, value = rest.partition("=")
        out.append((source, key, value))
    return out


def _label_filter(values: Sequence[str], side: str) -> Predicate:
    selectors = [parse_selector(v) for v in values]

    def match(flow: FlowDict) -> bool:
        labels = _flow_labels(_endpoint(flow, side))
        return any(all(r.matches(labels) for r in sel) for sel in selectors)

    return match


# --- a FlowFilter, and lists of them ----------------------------------------------------------------

_BUILDERS: dict[str, Callable[[Any], Predicate]] = {
    "uuid": _uuid_filter,
    "source_ip": lambda v: _ip_filter(v, "source"),
    "destination_ip": lambda v: _ip_filter(v, "destination"),
    "source_pod": lambda v: _pod_filter(v, "source"),
    "destination_pod": lambda v: _pod_filter(v, "destination"),
    "source_label": lambda v: _label_filter(v, "source"),
    "destination_label": lambda v: _label_filter(v, "destination"),
    "source_port": lambda v: _port_filter(v, 0),
    "destination_port": lambda v: _port_filter(v, 1),
    "source_identity": lambda v: _identity_filter(v, "source"),
    "destination_identity": lambda v: _identity_filter(v, "destination"),
    "verdict": _verdict_filter,
    "event_type": _event_type_filter,
    "http_status_code": _http_status_filter,
    "http_method": _http_method_filter,
    "http_path": _http_path_filter,
    "dns_query": _dns_query_filter,
    "protocol": _protocol_filter,
    "reply": _reply_filter,
    "traffic_direction": _direction_filter,
    "drop_reason_desc": _drop_reason_filter,
    "node_name": _node_filter,
}
_HTTP_FIELDS = ("http_status_code", "http_method", "http_path")


def compile_filter(spec: FlowDict) -> Predicate:
    """One flow.proto `FlowFilter` (as a dict) -> a predicate: every field set must match (AND).

    Raises:
        FilterError: an unknown field, a bad value, or an HTTP filter with an event type other than l7
            (Hubble refuses that combination too).
    """
    preds: list[Predicate] = []
    for name, values in spec.items():
        if not values:
            continue
        builder = _BUILDERS.get(name)
        if builder is None:
            raise FilterError(f"unsupported filter field {name!r}")
        if not isinstance(values, list):
            raise FilterError(f"filter field {name!r} must be a list")
        preds.append(builder(values))
    types = spec.get("event_type") or []
    if any(spec.get(f) for f in _HTTP_FIELDS) and types and not any(int(t.get("type", 0)) == EVENT_TYPES["l7"] for t in types):
        raise FilterError("filtering by http status, method or path requires the event type filter to match 'l7' events")
    return lambda flow: all(p(flow) for p in preds)


@dataclass(frozen=True, slots=True)
class FlowMatcher:
    """A whitelist and a blacklist of FlowFilters, plus a time window: what `observe` shows."""

    whitelist: tuple[Predicate, ...] = ()
    blacklist: tuple[Predicate, ...] = ()
    since_ns: int | None = None
    until_ns: int | None = None

    @classmethod
    def build(cls, whitelist: Iterable[FlowDict] = (), blacklist: Iterable[FlowDict] = (), *,
              since_ns: int | None = None, until_ns: int | None = None) -> FlowMatcher:
        """Raises FilterError for a filter that cannot be used."""
        return cls(tuple(compile_filter(f) for f in whitelist), tuple(compile_filter(f) for f in blacklist),
                   since_ns, until_ns)

    def matches(self, flow: FlowDict, node_name: str = "") -> bool:
        if node_name and "node_name" not in flow:
            flow = {**flow, "node_name": node_name}
        if self.since_ns is not None or self.until_ns is not None:
            t = flow_time_ns(flow)
            if self.since_ns is not None and t < self.since_ns:
                return False
            if self.until_ns is not None and t > self.until_ns:
                return False
        if self.whitelist and not any(p(flow) for p in self.whitelist):
            return False
        return not any(p(flow) for p in self.blacklist)


# --- flags -> FlowFilters (hubble/cmd/observe/flows_filter.go) -------------------------------------

# Flags that cannot be combined (flows_filter.go's conflict groups, for the flags we offer).
_CONFLICTS = (
    ("from-ip", "ip", "from-namespace", "namespace"),
    ("from-ip", "ip", "from-pod", "pod"),
    ("to-ip", "ip", "to-namespace", "namespace"),
    ("to-ip", "ip", "to-pod", "pod"),
    ("to-pod", "namespace"),
    ("from-pod", "namespace"),
    ("label", "from-label"),
    ("label", "to-label"),
    ("port", "to-port"),
    ("port", "from-port"),
    ("identity", "to-identity"),
    ("identity", "from-identity"),
)


@dataclass
class _Tracker:
    """One side of the flags (whitelist or blacklist): the filter is `left OR right`."""

    left: FlowDict | None = None
    right: FlowDict | None = None
    ns: list[str] = field(default_factory=list)
    src_ns: list[str] = field(default_factory=list)
    dst_ns: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def add_left(self, key: str, value: Any) -> None:
        self.left = self.left if self.left is not None else {}
        self.left.setdefault(key, []).append(value)

    def add_right(self, key: str, value: Any) -> None:
        self.right = self.right if self.right is not None else {}
        self.right.setdefault(key, []).append(value)

    def add_both(self, key: str, value: Any) -> None:
        self.add_left(key, value)
        self.add_right(key, value)

    def filters(self) -> list[FlowDict]:
        if self.left is None and self.right is None and not (self.ns or self.src_ns or self.dst_ns):
            return []
        left = self.left if self.left is not None else {}
        right = self.right if self.right is not None else {}
        for ff in (left, right):
            if self.dst_ns:
                _apply_ns(ff, "destination_pod", self.dst_ns)
            if self.src_ns:
                _apply_ns(ff, "source_pod", self.src_ns)
        if self.ns:
            _apply_ns(left, "source_pod", self.ns)
            _apply_ns(right, "destination_pod", self.ns)
        return [left] if left == right else [left, right]


def _apply_ns(ff: FlowDict, key: str, namespaces: list[str]) -> None:
    pods = ff.get(key) or [""]
    out: list[str] = []
    for pod in pods:
        if "/" in pod:
            out.append(pod)
        else:
            out.extend(f"{ns}/{pod}" for ns in namespaces)
    ff[key] = out


def _event_type(value: str) -> dict[str, Any]:
    name, _, sub = value.partition(":")
    if name in EVENT_TYPES:
        out: dict[str, Any] = {"type": EVENT_TYPES[name]}
    elif name.isdigit():
        out = {"type": int(name)}
    else:
        raise FilterError(f"--type {value!r}: not one of {', '.join(EVENT_TYPES)} or a number")
    if sub:
        if not sub.isdigit():
            raise FilterError(f"--type {value!r}: the sub-type must be a number")
        out["match_sub_type"] = True
        out["sub_type"] = int(sub)
    return out


def _identity(value: str) -> int:
    for number, name in RESERVED_IDENTITIES.items():
        if value == name:
            return number
    if value.isdigit():
        return int(value)
    raise FilterError(f"invalid security identity {value!r}: one of {', '.join(RESERVED_IDENTITIES.values())} or a number")


@dataclass
class FilterBuilder:
    """Accumulates `hubble observe` filter flags in order (so `--not` applies to the next flag only)."""

    whitelist: _Tracker = field(default_factory=_Tracker)
    blacklist: _Tracker = field(default_factory=_Tracker)
    _negate_next: bool = False

    def add(self, flag: str, value: str) -> None:
        """Add one flag (without dashes: "pod", "from-label", "not"...). Raises FilterError on a bad value or
        a forbidden combination (e.g. `--pod` with `--from-pod`)."""
        if flag == "not":
            if self._negate_next:
                raise FilterError("consecutive --not statements")
            self._negate_next = True
            return
        tracker = self.blacklist if self._negate_next else self.whitelist
        self._negate_next = False
        if flag not in tracker.changed:
            tracker.changed.append(flag)
        for group in _CONFLICTS:
            present = [f for f in group if f in tracker.changed]
            if len(present) > 1:
                raise FilterError(f"filters --{present[0]} and --{present[1]} cannot be combined")
        _apply_flag(tracker, flag, value)

    def result(self) -> tuple[list[FlowDict], list[FlowDict]]:
        """(whitelist, blacklist) as flow.proto FlowFilter dicts. Raises FilterError on a trailing --not."""
        if self._negate_next:
            raise FilterError("trailing --not found in the arguments")
        return self.whitelist.filters(), self.blacklist.filters()


def _apply_flag(t: _Tracker, flag: str, value: str) -> None:
    match flag:
        case "pod":
            t.add_left("source_pod", value)
            t.add_right("destination_pod", value)
        case "from-pod":
            t.add_both("source_pod", value)
        case "to-pod":
            t.add_both("destination_pod", value)
        case "namespace":
            t.ns.append(value)
        case "from-namespace":
            t.src_ns.append(value)
        case "to-namespace":
            t.dst_ns.append(value)
        case "ip":
            t.add_left("source_ip", value)
            t.add_right("destination_ip", value)
        case "from-ip":
            t.add_both("source_ip", value)
        case "to-ip":
            t.add_both("destination_ip", value)
        case "label":
            parse_selector(value)
            t.add_left("source_label", value)
            t.add_right("destination_label", value)
        case "from-label":
            parse_selector(value)
            t.add_both("source_label", value)
        case "to-label":
            parse_selector(value)
            t.add_both("destination_label", value)
        case "port":
            t.add_left("source_port", value)
            t.add_right("destination_port", value)
        case "from-port":
            t.add_both("source_port", value)
        case "to-port":
            t.add_both("destination_port", value)
        case "identity":
            n = _identity(value)
            t.add_left("source_identity", n)
            t.add_right("destination_identity", n)
        case "from-identity":
            t.add_both("source_identity", _identity(value))
        case "to-identity":
            t.add_both("destination_identity", _identity(value))
        case "verdict":
            if value not in VERDICTS:
                raise FilterError(f"invalid --verdict value: {value} (one of {', '.join(VERDICTS[1:])})")
            t.add_both("verdict", value)
        case "type":
            t.add_both("event_type", _event_type(value))
        case "protocol":
            _protocol_filter([value])
            t.add_both("protocol", value)
        case "http-status":
            _http_status_filter([value])
            t.add_both("http_status_code", value)
        case "http-method":
            t.add_both("http_method", value)
        case "http-path":
            _compile_regexes([value], "http path")
            t.add_both("http_path", value)
        case "dns-query":
            _compile_regexes([value], "dns query")
            t.add_both("dns_query", value)
        case "traffic-direction":
            if value.upper() not in ("INGRESS", "EGRESS"):
                raise FilterError(f"invalid --traffic-direction {value!r} (ingress or egress)")
            t.add_both("traffic_direction", value.upper())
        case "drop-reason-desc":
            t.add_both("drop_reason_desc", value)
        case "node-name":
            t.add_both("node_name", value)
        case "uuid":
            t.add_both("uuid", value)
        case _:
            raise FilterError(f"unknown filter --{flag}")


# --- printing ---------------------------------------------------------------------------------------

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_DROP_NAMES = {133: "Policy denied", 181: "Policy denied by denylist", 132: "Invalid source ip",
               180: "Proxy redirection not supported for protocol"}
_TRACE_POINTS = {0: "to-endpoint", 1: "to-proxy", 2: "to-host", 3: "to-stack", 4: "to-overlay", 5: "from-endpoint",
                 6: "from-proxy", 7: "from-host", 8: "from-stack", 9: "from-overlay", 10: "from-network", 11: "to-network"}


def format_time(flow: FlowDict, layout: str = "StampMilli") -> str:
    """The flow's time as hubble prints it: StampMilli (`Nov 26 04:06:40.123`, UTC) or RFC3339/RFC3339Nano."""
    t = flow_time_ns(flow)
    if not t:
        return "N/A"
    seconds, ns = divmod(t, 1_000_000_000)
    tm = time.gmtime(seconds)
    if layout.lower() == "rfc3339":
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", tm)
    if layout.lower() == "rfc3339nano":
        frac = f".{ns:09d}".rstrip("0").rstrip(".")
        return time.strftime("%Y-%m-%dT%H:%M:%S", tm) + frac + "Z"
    return f"{_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:>2} {tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}.{ns // 1_000_000:03d}"


def _hostname(flow: FlowDict, side: str, port: int | None, names_key: str) -> str:
    ip = flow.get("IP")
    host = str(ip.get(side, "")) if isinstance(ip, dict) else ""
    ep = _endpoint(flow, side)
    pod, ns = str(ep.get("pod_name", "")), str(ep.get("namespace", ""))
    names = flow.get(names_key) or []
    if pod:
        host = f"{ns}/{pod}" if ns else pod
    elif names:
        host = ",".join(str(n) for n in names)
    if port:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return host


def _identity_text(flow: FlowDict, side: str) -> str:
    ident = int(_endpoint(flow, side).get("identity", 0))
    if ident in RESERVED_IDENTITIES:
        return f"({RESERVED_IDENTITIES[ident]})"
    return f"(ID:{ident})"


def flow_type(flow: FlowDict) -> str:
    """hubble's TYPE column: `http-request`, `dns-response proxy`, `Policy denied`, `to-endpoint`, ..."""
    l7 = flow.get("l7")
    if isinstance(l7, dict):
        kind = str(l7.get("type", "UNKNOWN_L7_TYPE")).lower()
        for proto in _L7_PROTOCOLS:
            if proto in l7:
                if proto == "dns":
                    dns = l7["dns"] if isinstance(l7["dns"], dict) else {}
                    return f"dns-{kind} {dns.get('observation_source', '')}"
                return f"{proto}-{kind}"
        return f"l7-{kind}"
    event = flow.get("event_type") if isinstance(flow.get("event_type"), dict) else {}
    assert isinstance(event, dict)
    etype, sub = int(event.get("type", 0)), int(event.get("sub_type", 0))
    if etype == EVENT_TYPES["drop"]:
        return _DROP_NAMES.get(sub, str(sub))
    if etype == EVENT_TYPES["trace"]:
        return _TRACE_POINTS.get(sub, str(sub))
    if etype == EVENT_TYPES["policy-verdict"]:
        return f"policy-verdict:{flow.get('policy_match_type', 0)} {flow.get('traffic_direction', '')}"
    return "UNKNOWN"


def _verdict_text(flow: FlowDict) -> str:
    verdict = str(flow.get("verdict", "VERDICT_UNKNOWN"))
    event = flow.get("event_type") if isinstance(flow.get("event_type"), dict) else {}
    assert isinstance(event, dict)
    if int(event.get("type", 0)) == EVENT_TYPES["policy-verdict"]:
        return {"FORWARDED": "ALLOWED", "REDIRECTED": "ALLOWED", "DROPPED": "DENIED", "ERROR": "DENIED",
                "AUDIT": "AUDITED"}.get(verdict, verdict)
    return verdict


def format_compact(flow: FlowDict, node_name: str = "", *, time_format: str = "StampMilli",
                   show_node: bool = False) -> str:
    """One line as `hubble observe -o compact` prints it (no colour):
    `TIME: SRC (ID) -> DST (ID) TYPE VERDICT (SUMMARY)`; a reply's arrow is `<-` with the ends flipped back.
    """
    sport, dport = _ports(flow)
    src = _hostname(flow, "source", sport, "source_names")
    dst = _hostname(flow, "destination", dport, "destination_names")
    src_id, dst_id = _identity_text(flow, "source"), _identity_text(flow, "destination")
    arrow = "->"
    if "is_reply" not in flow:
        arrow = "<>"
    elif flow["is_reply"]:
        src, dst, src_id, dst_id, arrow = dst, src, dst_id, src_id, "<-"
    node = f" [{node_name or flow.get('node_name', '')}]" if show_node else ""
    return (f"{format_time(flow, time_format)}{node}: {src} {src_id} {arrow} {dst} {dst_id} "
            f"{flow_type(flow)} {_verdict_text(flow)} ({flow.get('Summary', '')})")


TABLE_HEADER = ("TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")


def table_row(flow: FlowDict, *, time_format: str = "StampMilli") -> tuple[str, ...]:
    """The `-o table` columns of one flow (hubble's tab output)."""
    sport, dport = _ports(flow)
    return (format_time(flow, time_format), _hostname(flow, "source", sport, "source_names"),
            _hostname(flow, "destination", dport, "destination_names"), flow_type(flow), _verdict_text(flow),
            str(flow.get("Summary", "")))


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str] = TABLE_HEADER) -> str:
    """Columns padded as Go's tabwriter (minwidth 2, padding 3) pads them; the last column is not padded."""
    all_rows = [tuple(header), *(tuple(r) for r in rows)]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header) - 1)]
    lines = []
    for r in all_rows:
        cells = [r[i].ljust(max(widths[i] + 3, 2)) for i in range(len(header) - 1)]
        lines.append("".join(cells) + r[-1])
    return "\n".join(lines) + "\n"


def format_json(flow: FlowDict, node_name: str = "") -> str:
    """`-o json`: the `{"flow":...,"node_name":...,"time":...}` envelope, one line."""
    out: FlowDict = {"flow": flow}
    node = node_name or str(flow.get("node_name", ""))
    if node:
        out["node_name"] = node
    if "time" in flow:
        out["time"] = flow["time"]
    return json.dumps(out, separators=(",", ":"))
