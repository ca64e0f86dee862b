"""CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy (cilium.io/v2): the model and its validation.

Owns the mapping -> model step: every CRD field (camelCase appears only in this module) is checked
for type, unknown names and Cilium's validation rules (cilium/cilium v1.19 pkg/policy/api
rule_validation.go: Rule.Validate, PortRule.Validate, L7Rules.Validate), and selectors are scoped as
Cilium scopes them (CNP subjects and peers to the policy's namespace, CCNP peers cluster-wide).
Never does I/O. One invalid field rejects the whole object, and every problem of the object is
reported: `parse_policy` raises `PolicyValidationError` whose `problems` hold one error per field.
What Membrane cannot enforce (host policies) is rejected with a message saying so; `icmps` is
enforced in the kernel (ICMP/ICMPv6 type as the port, as Cilium keys it).
The model is frozen dataclasses; empty, absent and zero are documented per field.
"""

from __future__ import annotations

import contextvars
import difflib
import enum
import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import re2
from membrane.policies import dnsmatch
from membrane.policies.errors import PolicyValidationError
from membrane.policies.kafka_keys import API_KEYS, ROLE_API_KEYS
from membrane.policies.labels import (
    ANY_SOURCE,
    K8S,
    NAMESPACE_KEY,
    NAMESPACE_LABELS_PREFIX,
    RESERVED,
    Operator,
    Requirement,
    Selector,
    split_key,
)

API_VERSION = "cilium.io/v2"
KIND_CNP = "CiliumNetworkPolicy"
KIND_CCNP = "CiliumClusterwideNetworkPolicy"
MAX_PORTS = 40  # Cilium's maxPorts per toPorts entry

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False  # errors become PolicyValidationError, not stderr noise
    return options


_RE2_OPTIONS = re2_options()


def compile_regex(pattern: str) -> Any:
    """RE2-compile `pattern`; raises ValueError with RE2's message (look-arounds, back-references...)."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as e:
        msg = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(msg) from None
    except (TypeError, ValueError) as e:  # e.g. NUL or surrogate characters
        raise ValueError(str(e)) from None


# --- model ----------------------------------------------------------------------------------------


class L4Proto(enum.Enum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"
    ANY = "ANY"  # TCP, UDP and SCTP
    ICMP = "ICMP"  # only from `icmps` (family IPv4): the port is the ICMP type
    ICMPV6 = "ICMPv6"  # only from `icmps` (family IPv6)


CONCRETE_PROTOS = (L4Proto.TCP, L4Proto.UDP, L4Proto.SCTP)


class ParserType(enum.Enum):
    HTTP = "http"
    KAFKA = "kafka"
    DNS = "dns"


class Entity(enum.Enum):
    ALL = "all"
    WORLD = "world"
    WORLD_IPV4 = "world-ipv4"
    WORLD_IPV6 = "world-ipv6"
    CLUSTER = "cluster"
    HOST = "host"
    REMOTE_NODE = "remote-node"
    KUBE_APISERVER = "kube-apiserver"
    INIT = "init"
    HEALTH = "health"
    UNMANAGED = "unmanaged"
    INGRESS = "ingress"
    NONE = "none"


class MismatchAction(enum.Enum):
    LOG = "LOG"
    ADD = "ADD"
    DELETE = "DELETE"
    REPLACE = "REPLACE"


@dataclass(frozen=True, slots=True, kw_only=True)
class PortProtocol:
    """One port or port range. `port` 0 = every port; `end_port` None = just `port`."""

    port: int
    end_port: int | None = None
    protocol: L4Proto = L4Proto.ANY  # ANY = TCP, UDP and SCTP

    @property
    def range(self) -> tuple[int, int]:
        if self.port == 0:
            return 0, 65535
        return self.port, self.end_port if self.end_port is not None else self.port


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretRef:
    namespace: str | None
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderMatch:
    """The header `name` must equal `value` (or the secret's value; presence when both are absent).

    `mismatch` None = the rule does not match on a mismatch; otherwise the rule still matches and
    the proxy logs, adds, deletes or replaces the header.
    """

    name: str
    value: str | None = None
    secret: SecretRef | None = None
    mismatch: MismatchAction | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpRule:
    """One allowed request shape. Every field is optional; an empty HttpRule allows any request."""

    method: str | None = None  # RE2, full match on the method; None = any method
    path: str | None = None  # RE2, full match on the normalised target including '?query'; None = any
    host: str | None = None  # RE2, full match on Host / :authority; None = any host
    headers: tuple[str, ...] = ()  # each "Name" (present) or "Name: value" (equal); () = no requirement
    header_matches: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsRule:
    """Exactly one of `match_name` (exact, case-insensitive) or `match_pattern` (wildcards)."""

    match_name: str | None = None
    match_pattern: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaRule:
    """A Kafka request shape. Absent fields match anything; `api_keys` empty = any api key."""

    role: str | None = None
    api_key: str | None = None
    api_keys: frozenset[int] = frozenset()  # from `role` or `apiKey`
    api_version: int | None = None
    client_id: str | None = None
    topic: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class L7Rules:
    """At most one kind is non-empty. Only empty lists (`http: []`) mean plain L4 on any protocol.

    Cilium's `L7Rules.IsEmpty` is `Len() == 0`: a kind present with an empty list is no L7 rule
    at all, so `PortRule.Validate` applies the TCP-only and port-0 checks only to non-empty rules.
    """

    http: tuple[HttpRule, ...] | None = None
    kafka: tuple[KafkaRule, ...] | None = None
    dns: tuple[DnsRule, ...] | None = None

    @property
    def is_empty(self) -> bool:
        return not (self.http or self.kafka or self.dns)

    @property
    def parser(self) -> ParserType | None:
        if self.http:
            return ParserType.HTTP
        if self.kafka:
            return ParserType.KAFKA
        if self.dns:
            return ParserType.DNS
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class PortRule:
    """`toPorts[i]`: the ports, and the L7 rules that apply on them (None or no kind = L4 only)."""

    ports: tuple[PortProtocol, ...]
    rules: L7Rules | None = None
    path: str = ""  # e.g. "ingress[0].toPorts[1]", relative to the rule


@dataclass(frozen=True, slots=True, kw_only=True)
class CidrRule:
    """A prefix minus exceptions. Selects CIDR identities inside `cidr` and outside every `except_`."""

    cidr: IPNetwork
    except_: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class FqdnSelector:
    match_name: str | None = None
    match_pattern: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRule:
    """One ingress/egress (allow or deny) entry.

    Peer fields: None = absent; () = present and empty, which selects nothing (Cilium's explicit
    empty-slice rule). With every peer field absent, the entry applies to every peer when it has
    `to_ports`/ICMP, and allows nothing when it has neither (`ingress: [{}]`: default deny only).
    `to_ports` () = all ports (an L3-only entry).
    """

    endpoints: tuple[Selector, ...] | None = None  # already scoped (CNP namespace / CCNP pods)
    entities: tuple[Entity, ...] | None = None
    cidrs: tuple[CidrRule, ...] | None = None  # fromCIDR + fromCIDRSet
    fqdns: tuple[FqdnSelector, ...] | None = None  # egress allow only
    to_ports: tuple[PortRule, ...] = ()
    has_icmps: bool = False  # ICMP-only entry: covers no TCP/UDP/SCTP port
    icmps: tuple[tuple[L4Proto, int], ...] = ()  # (ICMP or ICMPV6, type) of every `icmps[].fields[]`
    deny: bool = False
    path: str = ""  # e.g. "ingress[0]" or "specs[1].egressDeny[0]"

    @property
    def selects_nothing(self) -> bool:
        fields = (self.endpoints, self.entities, self.cidrs, self.fqdns)
        if any(f is not None and len(f) == 0 for f in fields):
            return True
        if all(f is None for f in fields):
            return not self.to_ports and not self.has_icmps
        return False

    @property
    def is_wildcard_peer(self) -> bool:
        return all(f is None for f in (self.endpoints, self.entities, self.cidrs, self.fqdns))


class IngressRule(PeerRule):
    __slots__ = ()


class EgressRule(PeerRule):
    __slots__ = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One `spec` / `specs[i]`. Exactly one of the two selectors is set."""

    endpoint_selector: Selector | None  # scoped to the namespace for CNP
    node_selector: Selector | None = None  # host policy; never set today (nodeSelector is rejected)
    ingress: tuple[IngressRule, ...] = ()
    ingress_deny: tuple[IngressRule, ...] = ()
    egress: tuple[EgressRule, ...] = ()
    egress_deny: tuple[EgressRule, ...] = ()
    default_deny_ingress: bool = True  # enableDefaultDeny.ingress; absent = true
    default_deny_egress: bool = True
    description: str = ""
    path: str = "spec"  # "spec" or "specs[i]"


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """One CNP, CCNP or Kubernetes NetworkPolicy object. `namespace` is None for a CCNP."""

    kind: str
    name: str
    namespace: str | None
    rules: tuple[Rule, ...]
    source: str = ""
    line: int = 0

    @property
    def key(self) -> str:
        """`ns/name` for a CNP, `name` for a CCNP: the prefix of every rule reference."""
        return f"{self.namespace}/{self.name}" if self.namespace is not None else self.name

    @property
    def cluster_wide(self) -> bool:
        return self.namespace is None


# --- field reading ---------------------------------------------------------------------------------


class FieldError(Exception):
    """Internal: a field at `path` is invalid. Converted to PolicyValidationError with the object's location."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def fail(path: str, message: str) -> NoReturn:
    raise FieldError(path, message)


# Problems found while parsing one object. `fail` stops the field it is in; the parse then goes on
# with the next field or list item (see `attempt` and `each`), so one run reports every problem of
# an object. Outside `collecting()` (the endpoints file), the first problem is raised as before.
_PROBLEMS: contextvars.ContextVar[list[FieldError] | None] = contextvars.ContextVar("membrane_problems", default=None)
T = TypeVar("T")


def report(error: FieldError) -> None:
    """Record `error` and carry on when problems are being collected; raise it otherwise."""
    sink = _PROBLEMS.get()
    if sink is None:
        raise error
    if not any(e.path == error.path and e.message == error.message for e in sink):
        sink.append(error)


@contextmanager
def collecting() -> Iterator[list[FieldError]]:
    """Collect every problem reported inside the block (instead of stopping at the first)."""
    sink: list[FieldError] = []
    token = _PROBLEMS.set(sink)
    try:
        yield sink
    finally:
        _PROBLEMS.reset(token)


def attempt(parse: Callable[[], T], fallback: T) -> T:
    """`parse()`, or `fallback` after reporting its problem: one bad field does not hide the next."""
    try:
        return parse()
    except FieldError as e:
        report(e)
        return fallback


def each(value: object, path: str, parse_one: Callable[[Any, str], T]) -> list[T]:
    """Parse every item of the list at `path`; an invalid item is reported and left out."""
    out: list[T] = []
    for i, item in enumerate(as_list(value, path)):
        try:
            out.append(parse_one(item, f"{path}[{i}]"))
        except FieldError as e:
            report(e)
    return out


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def as_mapping(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        fail(path, f"expected a mapping, got {_type_name(value)}")
    for k in value:
        if not isinstance(k, str):
            fail(path, f"field names must be strings, got {_type_name(k)} {k!r}")
    return value


def as_list(value: object, path: str) -> list[Any]:
    if not isinstance(value, list):
        fail(path, f"expected a list, got {_type_name(value)}")
    return value


def as_str(value: object, path: str) -> str:
    if not isinstance(value, str):
        fail(path, f"expected a string, got {_type_name(value)}")
    return value


def as_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        fail(path, f"expected true or false, got {_type_name(value)}")
    return value


def check_fields(
    m: Mapping[str, Any],
    path: str,
    known: tuple[str, ...],
    unsupported: tuple[str, ...] | Mapping[str, str] = (),
) -> None:
    """Report each unsupported or unknown field of `m` (with a "did you mean" hint for typos).

    `unsupported` names fields Cilium has but Membrane does not enforce; a mapping gives each one
    the message to print (what to use instead).
    """
    for key in m:
        if key in unsupported:
            why = unsupported[key] if isinstance(unsupported, Mapping) else f"{key} is not supported by membrane"
            report(FieldError(join(path, key), why))
        elif key not in known:
            close = difflib.get_close_matches(key, known + tuple(unsupported), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            report(FieldError(join(path, key), f'unknown field "{key}"{hint}'))


def opt(m: Mapping[str, Any], key: str) -> Any:
    """The value of `key`, None when absent or null (Kubernetes treats null as absent)."""
    return m.get(key)


# --- selectors ------------------------------------------------------------------------------------


def parse_selector(value: object, path: str) -> Selector:
    """A Kubernetes LabelSelector with Cilium label sources (`k8s:`, `reserved:`, `any:`, none = any).

    Every invalid label or expression is reported; the selector keeps the valid ones.
    """
    if value is None:
        return Selector()
    m = as_mapping(value, path)
    check_fields(m, path, ("matchLabels", "matchExpressions"))
    reqs: list[Requirement] = []
    labels = opt(m, "matchLabels")
    if labels is not None:
        lp = join(path, "matchLabels")
        for k, v in as_mapping(labels, lp).items():
            try:
                reqs.append(_match_label(k, v, join(lp, k)))
            except FieldError as e:
                report(e)
    exprs = opt(m, "matchExpressions")
    if exprs is not None:
        reqs.extend(each(exprs, join(path, "matchExpressions"), _match_expression))
    return Selector(tuple(sorted(reqs, key=lambda r: (r.source, r.key, r.op.value, sorted(r.values)))))


def _match_label(key_text: str, value: object, path: str) -> Requirement:
    source, key = _label_key(key_text, path)
    return Requirement(source, key, Operator.IN, frozenset({as_str("" if value is None else value, path)}))


def _match_expression(value: object, p: str) -> Requirement:
    em = as_mapping(value, p)
    check_fields(em, p, ("key", "operator", "values"))
    if opt(em, "key") is None:
        fail(join(p, "key"), "key is required")
    source, key = _label_key(as_str(em["key"], join(p, "key")), join(p, "key"))
    op_text = as_str(opt(em, "operator"), join(p, "operator"))
    try:
        op = Operator(op_text)
    except ValueError:
        fail(join(p, "operator"), f"unknown operator {op_text!r} (In, NotIn, Exists, DoesNotExist)")
    raw_values = opt(em, "values")
    vp = join(p, "values")
    values = [as_str(v, f"{vp}[{j}]") for j, v in enumerate(as_list(raw_values, vp))] if raw_values is not None else []
    if op in (Operator.IN, Operator.NOT_IN) and not values:
        fail(vp, f"values must be non-empty for operator {op.value}")
    if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
        fail(vp, f"values must be empty for operator {op.value}")
    return Requirement(source, key, op, frozenset(values))


_LABEL_KEY = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def _label_key(text: str, path: str) -> tuple[str, str]:
    source, key = split_key(text)
    if not key:
        fail(path, f"empty label key in {text!r}")
    if source != RESERVED and not _LABEL_KEY.match(key):
        fail(path, f"invalid label key {key!r}")
    return source, key


_NS_REQ_SOURCES = (K8S, ANY_SOURCE)


def scope_subject(selector: Selector, namespace: str | None) -> Selector:
    """CNP: the subject always lives in the policy's namespace (a user namespace match is replaced)."""
    if namespace is None:
        return selector
    kept = tuple(r for r in selector.requirements if not (r.key == NAMESPACE_KEY and r.source in _NS_REQ_SOURCES))
    return Selector(kept).with_requirement(Requirement(K8S, NAMESPACE_KEY, Operator.IN, frozenset({namespace})))


def scope_peer(selector: Selector, namespace: str | None) -> Selector:
    """Cilium's getEndpointSelector: scope a fromEndpoints/toEndpoints selector.

    Reserved-label selectors stay as written. A selector naming the namespace label stays as written.
    CCNP: otherwise only pods (namespace label exists). CNP: otherwise the policy's namespace, unless
    the selector matches on namespace labels (`[k8s:|any:]io.cilium.k8s.namespace.labels.*`).
    """
    if selector.has_source(RESERVED):
        return selector
    if selector.has_key(NAMESPACE_KEY):
        return selector
    if namespace is None:
        return selector.with_requirement(Requirement(K8S, NAMESPACE_KEY, Operator.EXISTS))
    # Cilium checks both `k8s:` and `any:` (no source written) keys under the namespace-labels prefix.
    if any(selector.has_key_prefix(NAMESPACE_LABELS_PREFIX, src) for src in _NS_REQ_SOURCES):
        return selector
    return selector.with_requirement(Requirement(K8S, NAMESPACE_KEY, Operator.IN, frozenset({namespace})))


# --- ports and L7 ---------------------------------------------------------------------------------

_SVC_NAME = re.compile(r"^(?=.{1,15}$)(?=.*[a-zA-Z])[a-zA-Z0-9]+(-[a-zA-Z0-9]+)*$")


def _parse_port(value: object, path: str) -> int:
    if value is None or value == "":
        fail(path, "port must be specified")
    if isinstance(value, bool) or not isinstance(value, int | str):
        fail(path, f"expected a port number (string or integer), got {_type_name(value)}")
    if isinstance(value, int):
        n = value
    else:
        text = value.strip()
        if _SVC_NAME.match(text) and not text.isdigit():
            fail(path, f"named port {text!r} is not supported by membrane (use the port number)")
        try:
            n = int(text, 0) if not text.isdigit() else int(text, 10)
        except ValueError:
            fail(path, f"unable to parse port {text!r}")
    if not 0 <= n <= 65535:
        fail(path, f"port {n} is out of range 0-65535")
    return n


def _parse_proto(value: object, path: str) -> L4Proto:
    if value is None:
        return L4Proto.ANY
    text = as_str(value, path).upper()
    if text == "":
        return L4Proto.ANY
    if text not in ("TCP", "UDP", "SCTP", "ANY"):
        fail(path, f"unsupported protocol {value!r} (TCP, UDP, SCTP or ANY)")
    return L4Proto(text)


def _parse_port_protocol(value: object, path: str) -> PortProtocol:
    m = as_mapping(value, path)
    check_fields(m, path, ("port", "endPort", "protocol"))
    port = _parse_port(opt(m, "port"), join(path, "port"))
    end: int | None = None
    raw_end = opt(m, "endPort")
    if raw_end is not None:
        if isinstance(raw_end, bool) or not isinstance(raw_end, int):
            fail(join(path, "endPort"), f"expected an integer, got {_type_name(raw_end)}")
        if not 0 <= raw_end <= 65535:
            fail(join(path, "endPort"), f"endPort {raw_end} is out of range 0-65535")
        # Cilium ignores an endPort that does not extend the range.
        end = raw_end if port != 0 and raw_end > port else None
    return PortProtocol(port=port, end_port=end, protocol=_parse_proto(opt(m, "protocol"), join(path, "protocol")))


def _regex_field(m: Mapping[str, Any], key: str, path: str) -> str | None:
    value = opt(m, key)
    if value is None:
        return None
    text = as_str(value, join(path, key))
    if text == "":
        return None  # Cilium: empty = any
    try:
        compile_regex(text)
    except ValueError as e:
        fail(join(path, key), f"invalid regex {text!r}: {e}")
    return text


def _parse_http(value: object, path: str) -> HttpRule:
    m = as_mapping(value, path)
    check_fields(m, path, ("method", "path", "host", "headers", "headerMatches"))
    headers: list[str] = []
    if opt(m, "headers") is not None:
        headers = each(m["headers"], join(path, "headers"), _parse_header)
    matches: list[HeaderMatch] = []
    if opt(m, "headerMatches") is not None:
        matches = each(m["headerMatches"], join(path, "headerMatches"), _parse_header_match)
    return HttpRule(
        method=attempt(lambda: _regex_field(m, "method", path), None),
        path=attempt(lambda: _regex_field(m, "path", path), None),
        host=attempt(lambda: _regex_field(m, "host", path), None),
        headers=tuple(headers),
        header_matches=tuple(matches),
    )


def _parse_header(value: object, path: str) -> str:
    text = as_str(value, path).strip()
    if not text:
        fail(path, "empty header")
    return text


def _parse_header_match(value: object, p: str) -> HeaderMatch:
    mm = as_mapping(value, p)
    check_fields(mm, p, ("name", "value", "secret", "mismatch"))
    name = as_str(opt(mm, "name"), join(p, "name")) if opt(mm, "name") is not None else ""
    if not name:
        fail(join(p, "name"), "header name missing")
    hv = opt(mm, "value")
    secret: SecretRef | None = None
    if opt(mm, "secret") is not None:
        sp = join(p, "secret")
        sm = as_mapping(mm["secret"], sp)
        check_fields(sm, sp, ("namespace", "name"))
        sname = as_str(opt(sm, "name"), join(sp, "name")) if opt(sm, "name") is not None else ""
        if not sname:
            fail(join(sp, "name"), "secret name missing")
        sns = opt(sm, "namespace")
        secret = SecretRef(namespace=as_str(sns, join(sp, "namespace")) if sns is not None else None, name=sname)
    mismatch: MismatchAction | None = None
    raw_mm = opt(mm, "mismatch")
    if raw_mm is not None and raw_mm != "":
        try:
            mismatch = MismatchAction(as_str(raw_mm, join(p, "mismatch")))
        except ValueError:
            fail(join(p, "mismatch"), f"invalid header action {raw_mm!r} (LOG, ADD, DELETE or REPLACE)")
    return HeaderMatch(
        name=name,
        value=(as_str(hv, join(p, "value")) or None) if hv is not None else None,
        secret=secret,
        mismatch=mismatch,
    )


_KAFKA_CLIENT_ID = re.compile(r"^[a-zA-Z0-9._-]+$")
_KAFKA_TOPIC = re.compile(r"^[a-zA-Z0-9._-]+$")


def _parse_kafka(value: object, path: str) -> KafkaRule:
    m = as_mapping(value, path)
    check_fields(m, path, ("role", "apiKey", "apiVersion", "clientID", "topic"))

    def text(key: str) -> str | None:
        v = opt(m, key)
        if v is None:
            return None
        if key == "apiVersion" and isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        s = as_str(v, join(path, key))
        return s or None

    role, api_key, api_version, client_id, topic = (text(k) for k in ("role", "apiKey", "apiVersion", "clientID", "topic"))
    if role and api_key:
        fail(path, f"cannot set both role ({role!r}) and apiKey ({api_key!r})")
    keys: frozenset[int] = frozenset()
    if api_key:
        n = API_KEYS.get(api_key.lower())
        if n is None:
            fail(join(path, "apiKey"), f"unknown Kafka API key {api_key!r}")
        keys = frozenset({n})
    if role:
        role_keys = ROLE_API_KEYS.get(role.lower())
        if role_keys is None:
            fail(join(path, "role"), f"invalid Kafka role {role!r} (produce or consume)")
        keys = role_keys
    version: int | None = None
    if api_version:
        try:
            version = int(api_version, 10)
        except ValueError:
            fail(join(path, "apiVersion"), f"invalid Kafka API version {api_version!r}")
        if not -32768 <= version <= 32767:
            fail(join(path, "apiVersion"), f"invalid Kafka API version {api_version!r}")
    if client_id and not _KAFKA_CLIENT_ID.match(client_id):
        fail(join(path, "clientID"), f"invalid Kafka client ID {client_id!r}")
    if topic:
        if len(topic) > 255:
            fail(join(path, "topic"), "Kafka topic exceeds the maximum length of 255")
        if not _KAFKA_TOPIC.match(topic):
            fail(join(path, "topic"), f"invalid Kafka topic name {topic!r}")
    return KafkaRule(role=role, api_key=api_key, api_keys=keys, api_version=version, client_id=client_id, topic=topic)


def _parse_fqdn_selector(value: object, path: str, what: str) -> tuple[str | None, str | None]:
    m = as_mapping(value, path)
    check_fields(m, path, ("matchName", "matchPattern"))
    name = opt(m, "matchName")
    pattern = opt(m, "matchPattern")
    name = as_str(name, join(path, "matchName")) or None if name is not None else None
    pattern = as_str(pattern, join(path, "matchPattern")) or None if pattern is not None else None
    if name and pattern:
        fail(path, f"only one of matchName or matchPattern is allowed in a {what}")
    if not name and not pattern:
        fail(path, f"a {what} needs matchName or matchPattern")
    if name:
        err = dnsmatch.validate_match_name(name)
        if err:
            fail(join(path, "matchName"), err)
    if pattern:
        err = dnsmatch.validate_match_pattern(pattern)
        if err:
            fail(join(path, "matchPattern"), err)
    return name, pattern


def _parse_l7(value: object, path: str, ingress: bool) -> L7Rules:
    """The `rules` of one port rule. Cross-field checks are in `_check_l7_ports` (only when non-empty)."""
    m = as_mapping(value, path)
    check_fields(m, path, ("http", "kafka", "dns"), unsupported=("l7proto", "l7"))
    http = kafka = dns = None
    if opt(m, "http") is not None:
        http = tuple(each(m["http"], join(path, "http"), _parse_http))
    if opt(m, "kafka") is not None:
        kafka = tuple(each(m["kafka"], join(path, "kafka"), _parse_kafka))
    if opt(m, "dns") is not None:
        dp = join(path, "dns")
        dns = tuple(each(m["dns"], dp, _parse_dns_rule))
        if ingress and as_list(m["dns"], dp):  # PortRule.Validate: `len(pr.Rules.DNS) > 0` on ingress
            report(FieldError(dp, "DNS rules are not allowed on ingress"))
    return L7Rules(http=http, kafka=kafka, dns=dns)


def _parse_dns_rule(value: object, path: str) -> DnsRule:
    name, pattern = _parse_fqdn_selector(value, path, "DNS rule")
    return DnsRule(match_name=name, match_pattern=pattern)


def _check_l7_ports(rules: L7Rules, ports: list[PortProtocol], path: str) -> None:
    """Cilium's PortRule.Validate + L7Rules.Validate for non-empty L7 rules.

    Empty rules (`http: []`) skip all of this: they are plain L4 on any protocol (IsEmpty is Len() == 0).
    """
    if rules.is_empty:
        return
    present = [k for k, v in (("http", rules.http), ("kafka", rules.kafka), ("dns", rules.dns)) if v is not None]
    if len(present) > 1:  # nTypes counts every present kind, empty or not
        report(FieldError(join(path, "rules"), f"multiple L7 protocol rule types specified in one port rule ({', '.join(present)})"))
    is_dns = bool(rules.dns)
    if rules.dns is not None and not ports:
        report(FieldError(path, "port 53 must be specified for DNS rules"))
    for i, p in enumerate(ports):
        if not is_dns and p.protocol is not L4Proto.TCP:
            report(FieldError(path, "L7 rules require protocol TCP"))
        if p.port == 0:
            report(FieldError(join(path, f"ports[{i}]"), "L7 rules cannot be used when a port is 0"))
        if is_dns and p.end_port is not None:
            report(FieldError(join(path, f"ports[{i}]"), "DNS rules do not support port ranges"))


_TLS_UNSUPPORTED = ("terminatingTLS", "originatingTLS", "serverNames", "listener")


def _parse_port_rule(value: object, path: str, ref: str, ingress: bool, deny: bool) -> PortRule:
    m = as_mapping(value, path)
    check_fields(m, path, ("ports",) if deny else ("ports", "rules"), unsupported=() if deny else _TLS_UNSUPPORTED)
    ports: list[PortProtocol] = []
    raw_ports = opt(m, "ports")
    if raw_ports is not None:
        pp = join(path, "ports")
        if len(as_list(raw_ports, pp)) > MAX_PORTS:
            report(FieldError(pp, f"too many ports, the max is {MAX_PORTS}"))
        ports = each(raw_ports, pp, _parse_port_protocol)
    rules: L7Rules | None = None
    if not deny and opt(m, "rules") is not None:
        rules = attempt(lambda: _parse_l7(m["rules"], join(path, "rules"), ingress), None)
    if rules is not None:
        _check_l7_ports(rules, ports, path)
    return PortRule(ports=tuple(ports), rules=rules, path=ref)


# --- peers ----------------------------------------------------------------------------------------

_ENTITIES = {e.value: e for e in Entity}


def _parse_cidr(text: str, path: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        fail(path, f"invalid CIDR {text!r}")


def parse_cidr_rule(value: object, path: str) -> CidrRule:
    m = as_mapping(value, path)
    check_fields(m, path, ("cidr", "except"), unsupported=("cidrGroupRef", "cidrGroupSelector"))
    if opt(m, "cidr") is None:
        fail(join(path, "cidr"), "cidr is required")
    text = as_str(m["cidr"], join(path, "cidr"))
    if "/" not in text:
        fail(join(path, "cidr"), f"unable to parse CIDRRule {text!r}: no '/'")
    cidr = _parse_cidr(text, join(path, "cidr"))
    excepts: list[IPNetwork] = []
    raw = opt(m, "except")
    if raw is not None:
        ep = join(path, "except")
        for i, e in enumerate(as_list(raw, ep)):
            etext = as_str(e, f"{ep}[{i}]")
            if "/" not in etext:
                fail(f"{ep}[{i}]", f"unable to parse except prefix {etext!r}: no '/'")
            net = _parse_cidr(etext, f"{ep}[{i}]")
            if net.version != cidr.version or not net.subnet_of(cidr):  # type: ignore[arg-type]
                fail(f"{ep}[{i}]", f"allow CIDR prefix {cidr} does not contain exclude CIDR prefix {net}")
            excepts.append(net)
    return CidrRule(cidr=cidr, except_=tuple(excepts))


_INGRESS_L3 = ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities")
_EGRESS_L3 = ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities", "toFQDNs")
_INGRESS_UNSUPPORTED = ("fromRequires", "fromGroups", "fromNodes")
_EGRESS_UNSUPPORTED = ("toRequires", "toGroups", "toNodes", "toServices")
def _peer_unsupported(ingress: bool) -> dict[str, str]:
    names = _INGRESS_UNSUPPORTED if ingress else _EGRESS_UNSUPPORTED
    return {n: f"{n} is not supported by membrane" for n in names}


def _parse_peer_rule(
    value: object, path: str, ref: str, namespace: str | None, *, ingress: bool, deny: bool
) -> PeerRule:
    """One entry of ingress/ingressDeny/egress/egressDeny: its peers (L3) and its ports (L4/L7).

    Cilium: IngressCommonRule.Validate / EgressCommonRule.Validate (one L3 kind per entry) and
    PortRule.Validate per toPorts item. Peer fields absent = None, present and empty = ().
    """
    m = as_mapping(value, path)
    pre = "from" if ingress else "to"
    l3 = _l3_fields(ingress=ingress, deny=deny)
    check_fields(m, path, (*l3, "toPorts", "icmps") + (() if deny else ("authentication",)), unsupported=_peer_unsupported(ingress))
    present = [k for k in l3 if isinstance(opt(m, k), list) and len(m[k]) > 0]
    if len(present) > 1:
        report(FieldError(path, f"combining {present[0]} and {present[1]} is not supported yet"))
    fqdns = None
    if not ingress and not deny and opt(m, "toFQDNs") is not None:
        fqdns = tuple(each(m["toFQDNs"], join(path, "toFQDNs"), _parse_fqdn_peer))
    ports: tuple[PortRule, ...] = ()
    if opt(m, "toPorts") is not None:
        tp = join(path, "toPorts")
        ports = tuple(
            each(m["toPorts"], tp, lambda v, p: _parse_port_rule(v, p, ref + p[len(path):], ingress, deny))
        )
    icmps: list[tuple[L4Proto, int]] = []
    if opt(m, "icmps") is not None:
        for got in each(m["icmps"], join(path, "icmps"), _parse_icmp):
            icmps.extend(got)
        if as_list(m["icmps"], join(path, "icmps")) and ports:
            report(FieldError(path, "the icmps block may only be present without toPorts; define a separate rule for toPorts"))
    cls = IngressRule if ingress else EgressRule
    return cls(
        endpoints=_peer_endpoints(m, path, pre, namespace),
        entities=_peer_entities(m, path, pre),
        cidrs=_peer_cidrs(m, path, pre),
        fqdns=fqdns,
        to_ports=ports,
        has_icmps=bool(opt(m, "icmps")),
        icmps=tuple(dict.fromkeys(icmps)),
        deny=deny,
        path=ref,
    )


# Cilium's ICMP type names (pkg/policy/api/icmp.go, accepted since 1.15), per family.
ICMP_TYPES: dict[str, int] = {
    "EchoReply": 0,
    "DestinationUnreachable": 3,
    "Redirect": 5,
    "Echo": 8,
    "EchoRequest": 8,
    "RouterAdvertisement": 9,
    "RouterSelection": 10,
    "TimeExceeded": 11,
    "ParameterProblem": 12,
    "Timestamp": 13,
    "TimestampReply": 14,
    "Photuris": 40,
    "ExtendedEchoRequest": 42,
    "ExtendedEchoReply": 43,
}
ICMPV6_TYPES: dict[str, int] = {
    "DestinationUnreachable": 1,
    "PacketTooBig": 2,
    "TimeExceeded": 3,
    "ParameterProblem": 4,
    "EchoRequest": 128,
    "EchoReply": 129,
    "MulticastListenerQuery": 130,
    "MulticastListenerReport": 131,
    "MulticastListenerDone": 132,
    "RouterSolicitation": 133,
    "RouterAdvertisement": 134,
    "NeighborSolicitation": 135,
    "NeighborAdvertisement": 136,
    "RedirectMessage": 137,
    "RouterRenumbering": 138,
    "ICMPNodeInformationQuery": 139,
    "ICMPNodeInformationResponse": 140,
    "InverseNeighborDiscoverySolicitation": 141,
    "InverseNeighborDiscoveryAdvertisement": 142,
    "HomeAgentAddressDiscoveryRequest": 144,
    "HomeAgentAddressDiscoveryReply": 145,
    "MobilePrefixSolicitation": 146,
    "MobilePrefixAdvertisement": 147,
    "DuplicateAddressRequestCodeSuffix": 157,
    "DuplicateAddressConfirmationCodeSuffix": 158,
    "ExtendedEchoRequest": 160,
    "ExtendedEchoReply": 161,
}


def _parse_icmp(value: object, path: str) -> list[tuple[L4Proto, int]]:
    """One `icmps[i]`: (ICMP or ICMPV6, type) per field. Family defaults to IPv4 (as in Cilium); the
    type is 0-255, a decimal string of it, or a name of that family's table."""
    m = as_mapping(value, path)
    check_fields(m, path, ("fields",))
    fp = join(path, "fields")
    out: list[tuple[L4Proto, int]] = []
    for i, f in enumerate(as_list(opt(m, "fields") or [], fp)):
        p = f"{fp}[{i}]"
        fm = as_mapping(f, p)
        check_fields(fm, p, ("type", "family"))
        t = opt(fm, "type")
        tp = join(p, "type")
        if isinstance(t, bool) or not isinstance(t, int | str):
            fail(tp, f"expected an ICMP type (number or name), got {_type_name(t)}")
        fam = opt(fm, "family")
        family = "IPv4" if fam is None else as_str(fam, join(p, "family"))
        if family not in ("IPv4", "IPv6"):
            fail(join(p, "family"), f"invalid family {fam!r} (IPv4 or IPv6)")
        names = ICMP_TYPES if family == "IPv4" else ICMPV6_TYPES
        if isinstance(t, str) and t.isdigit():
            t = int(t, 10)
        if isinstance(t, str):
            if t not in names:
                fail(tp, f"ICMP type {t!r} not found in {family} ({', '.join(names)})")
            t = names[t]
        if not 0 <= t <= 255:
            fail(tp, f"ICMP type {t} out of range (0-255)")
        out.append((L4Proto.ICMP if family == "IPv4" else L4Proto.ICMPV6, t))
    return out


def _l3_fields(*, ingress: bool, deny: bool) -> tuple[str, ...]:
    if ingress:
        return _INGRESS_L3
    return tuple(k for k in _EGRESS_L3 if k != "toFQDNs") if deny else _EGRESS_L3


def _peer_endpoints(m: Mapping[str, Any], path: str, pre: str, namespace: str | None) -> tuple[Selector, ...] | None:
    """fromEndpoints/toEndpoints, each selector scoped as Cilium's getEndpointSelector scopes it."""
    key = pre + "Endpoints"
    if opt(m, key) is None:
        return None
    return tuple(each(m[key], join(path, key), lambda v, p: scope_peer(parse_selector(v, p), namespace)))


def _peer_entities(m: Mapping[str, Any], path: str, pre: str) -> tuple[Entity, ...] | None:
    key = pre + "Entities"
    if opt(m, key) is None:
        return None
    return tuple(each(m[key], join(path, key), _parse_entity))


def _parse_entity(value: object, path: str) -> Entity:
    e = _ENTITIES.get(as_str(value, path))
    if e is None:
        fail(path, f"unknown entity {value!r} ({', '.join(_ENTITIES)})")
    return e


def _peer_cidrs(m: Mapping[str, Any], path: str, pre: str) -> tuple[CidrRule, ...] | None:
    """fromCIDR + fromCIDRSet (toCIDR + toCIDRSet) as one list; None when both are absent.

    An explicitly empty list in either field keeps the explicit-empty marker (): Cilium treats a
    present empty peer list as selecting nothing.
    """
    plain, sets = opt(m, pre + "CIDR"), opt(m, pre + "CIDRSet")
    if plain is None and sets is None:
        return None
    cidrs: list[CidrRule] = []
    if plain is not None:
        cidrs += each(plain, join(path, pre + "CIDR"), lambda v, p: CidrRule(cidr=_parse_cidr(as_str(v, p), p)))
    if sets is not None:
        cidrs += each(sets, join(path, pre + "CIDRSet"), parse_cidr_rule)
    if plain == [] or sets == []:
        return ()
    return tuple(cidrs)


def _parse_fqdn_peer(value: object, path: str) -> FqdnSelector:
    name, pattern = _parse_fqdn_selector(value, path, "toFQDNs selector")
    return FqdnSelector(match_name=name, match_pattern=pattern)


# --- rules and objects ------------------------------------------------------------------------------

_RULE_FIELDS = (
    "endpointSelector",
    "ingress",
    "ingressDeny",
    "egress",
    "egressDeny",
    "labels",
    "description",
    "enableDefaultDeny",
    "log",
)
HOST_POLICY_UNSUPPORTED = (
    "nodeSelector (a host policy) is not supported: Membrane enforces pod traffic only, so this rule would "
    "enforce nothing; select pods with endpointSelector, or keep host policies in Cilium's host firewall"
)
_SECTIONS = (("ingress", True, False), ("ingressDeny", True, True), ("egress", False, False), ("egressDeny", False, True))


def _parse_rule(value: object, path: str, namespace: str | None) -> Rule:
    """One `spec`/`specs[i]` (Cilium's Rule.Validate)."""
    m = as_mapping(value, path)
    node_why = HOST_POLICY_UNSUPPORTED if namespace is None else "a CiliumNetworkPolicy rule cannot have nodeSelector"
    check_fields(m, path, _RULE_FIELDS, unsupported={"nodeSelector": node_why})
    ref_prefix = "" if path == "spec" else path + "."
    has_es = opt(m, "endpointSelector") is not None
    if not has_es and opt(m, "nodeSelector") is None:
        report(FieldError(path, "a rule needs endpointSelector or nodeSelector"))
    # Rule.Validate (since Cilium 1.17, PR #35904): `len()` of all four is 0 -> invalid; `ingress: []` counts as none.
    if all(opt(m, key) is None or opt(m, key) == [] for key, _, _ in _SECTIONS):
        report(FieldError(path, "rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny"))
    subject = None
    if has_es:
        subject = attempt(lambda: scope_subject(parse_selector(m["endpointSelector"], join(path, "endpointSelector")), namespace), None)
    sections: dict[str, list[PeerRule]] = {}
    for key, ingress, deny in _SECTIONS:
        raw = opt(m, key)
        if raw is None:
            sections[key] = []
            continue

        def entry(v: object, p: str, ingress: bool = ingress, deny: bool = deny) -> PeerRule:
            return _parse_peer_rule(v, p, ref_prefix + p[len(path) + 1 :], namespace, ingress=ingress, deny=deny)

        try:
            sections[key] = each(raw, join(path, key), entry)
        except FieldError as e:  # not a list: report it and go on with the other sections
            report(e)
            sections[key] = []
    dd_in, dd_eg = attempt(lambda: _default_deny(m, path), (True, True))
    desc = attempt(lambda: as_str(opt(m, "description") or "", join(path, "description")), "")
    attempt(lambda: _check_rule_extras(m, path), None)
    return Rule(
        endpoint_selector=subject,
        ingress=tuple(r for r in sections["ingress"] if isinstance(r, IngressRule)),
        ingress_deny=tuple(r for r in sections["ingressDeny"] if isinstance(r, IngressRule)),
        egress=tuple(r for r in sections["egress"] if isinstance(r, EgressRule)),
        egress_deny=tuple(r for r in sections["egressDeny"] if isinstance(r, EgressRule)),
        default_deny_ingress=dd_in,
        default_deny_egress=dd_eg,
        description=desc,
        path=path,
    )


def _default_deny(m: Mapping[str, Any], path: str) -> tuple[bool, bool]:
    """enableDefaultDeny.{ingress,egress}; absent = true (a direction with entries enters default deny)."""
    raw = opt(m, "enableDefaultDeny")
    if raw is None:
        return True, True
    dp = join(path, "enableDefaultDeny")
    dm = as_mapping(raw, dp)
    check_fields(dm, dp, ("ingress", "egress"))
    dd_in = attempt(lambda: as_bool(dm["ingress"], join(dp, "ingress")), True) if opt(dm, "ingress") is not None else True
    dd_eg = attempt(lambda: as_bool(dm["egress"], join(dp, "egress")), True) if opt(dm, "egress") is not None else True
    return dd_in, dd_eg


def _check_rule_extras(m: Mapping[str, Any], path: str) -> None:
    """`labels` and `log`: checked for shape only (they do not change enforcement)."""
    if opt(m, "labels") is not None:
        each(m["labels"], join(path, "labels"), lambda lab, lp: check_fields(as_mapping(lab, lp), lp, ("key", "value", "source")))
    if opt(m, "log") is not None:
        check_fields(as_mapping(m["log"], join(path, "log")), join(path, "log"), ("value",))


_DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
KIND_NP = "NetworkPolicy"
API_VERSION_NP = "networking.k8s.io/v1"


def object_name(doc: Mapping[str, Any], default_namespace: str = "default") -> str | None:
    """Best-effort `ns/name` of a document for error messages (None when it has no usable name)."""
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    if doc.get("kind") == KIND_CCNP:
        return str(meta["name"])
    ns = meta.get("namespace")
    return f"{ns if isinstance(ns, str) and ns else default_namespace}/{meta['name']}"


def parse_metadata(m: Mapping[str, Any], *, namespaced: bool, default_namespace: str) -> tuple[str, str | None]:
    """`metadata.name` (an RFC 1123 subdomain) and the namespace (default when absent; None if cluster-wide)."""
    meta = as_mapping(opt(m, "metadata"), "metadata")
    name = opt(meta, "name")
    if name is None or name == "":
        fail("metadata.name", "metadata.name is required")
    name = as_str(name, "metadata.name")
    if len(name) > 253 or not _DNS_1123_SUBDOMAIN.match(name):
        report(FieldError("metadata.name", f"invalid object name {name!r} (lower case RFC 1123 subdomain)"))
    if not namespaced:
        return name, None
    raw_ns = opt(meta, "namespace")
    namespace = attempt(lambda: as_str(raw_ns, "metadata.namespace"), "") if raw_ns is not None else ""
    return name, namespace or default_namespace


def raise_problems(problems: list[FieldError], *, source: str, line: int, obj: str | None) -> None:
    """Raise the PolicyValidationError of an object with problems (its `problems` hold all of them)."""
    if not problems:
        return
    errors = [PolicyValidationError(p.message, source=source, line=line, obj=obj, path=p.path) for p in problems]
    first = errors[0]
    first.problems = tuple(errors)
    raise first


def parse_policy(doc: object, *, source: str = "", line: int = 0, default_namespace: str = "default") -> Policy:
    """Build a Policy from one decoded YAML/JSON document: a CNP, a CCNP or a Kubernetes NetworkPolicy.

    Returns: the validated, namespace-scoped model.
    Raises:
        PolicyValidationError: the object is invalid. It names the first problem; `problems` holds
            every problem of the object (each with its field path; `line` is the document's line,
            which the loader refines to each field's own line). The caller rejects this object and
            keeps loading the others.
    """
    if isinstance(doc, dict) and doc.get("kind") == KIND_NP:
        from membrane.policies.netpol import parse_network_policy  # netpol builds on this module

        return parse_network_policy(doc, source=source, line=line, default_namespace=default_namespace)
    obj_name: str | None = None
    with collecting() as problems:
        policy = attempt(lambda: _parse_cilium_policy(doc, source, line, default_namespace), None)
        if isinstance(doc, dict):
            obj_name = object_name(doc, default_namespace)
    raise_problems(problems, source=source, line=line, obj=obj_name)
    assert policy is not None  # no problem reported means the parse completed
    return policy


def _parse_cilium_policy(doc: object, source: str, line: int, default_namespace: str) -> Policy:
    m = as_mapping(doc, "")
    check_fields(m, "", ("apiVersion", "kind", "metadata", "spec", "specs", "status", "description"))
    kind = opt(m, "kind")
    if kind not in (KIND_CNP, KIND_CCNP):
        fail("kind", f"unsupported kind {kind!r} (expected {KIND_CNP}, {KIND_CCNP} or {KIND_NP})")
    api = opt(m, "apiVersion")
    if api != API_VERSION:
        report(FieldError("apiVersion", f"unsupported apiVersion {api!r} (expected {API_VERSION})"))
    # Top-level `description` (Cilium's example policies carry one): free text, no effect.
    if opt(m, "description") is not None:
        attempt(lambda: as_str(m["description"], "description"), "")
    name, namespace = parse_metadata(m, namespaced=kind == KIND_CNP, default_namespace=default_namespace)
    spec, specs = opt(m, "spec"), opt(m, "specs")
    rules: list[Rule] = []
    if spec is not None:
        rules.extend(attempt(lambda: [_parse_rule(spec, "spec", namespace)], []))
    if specs is not None:
        rules.extend(each(specs, "specs", lambda v, p: _parse_rule(v, p, namespace)))
    if spec is None and specs is None:
        fail("spec", "a policy needs spec or specs")
    return Policy(kind=str(kind), name=name, namespace=namespace, rules=tuple(rules), source=source, line=line)
