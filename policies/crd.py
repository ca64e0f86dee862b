"""CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy (cilium.io/v2): the model and its validation.

Owns the mapping -> model step: every CRD field (camelCase appears only in this module) is checked
for type, unknown names and Cilium's sanitize rules, and selectors are scoped as Cilium scopes them
(CNP subjects and peers to the policy's namespace, CCNP peers cluster-wide). Never does I/O. One
invalid field rejects the whole object: `parse_policy` raises `PolicyValidationError` with the field
path. The model is frozen dataclasses; empty, absent and zero are documented per field.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

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
    """At most one kind is present. A present but empty list (`http: []`) means plain L4."""

    http: tuple[HttpRule, ...] | None = None
    kafka: tuple[KafkaRule, ...] | None = None
    dns: tuple[DnsRule, ...] | None = None

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
    node_selector: Selector | None = None  # host policy; selects no pod
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
    """One CNP or CCNP object. `namespace` is None for a CCNP."""

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


def check_fields(m: Mapping[str, Any], path: str, known: tuple[str, ...], unsupported: tuple[str, ...] = ()) -> None:
    for key in m:
        if key in unsupported:
            fail(join(path, key), f"{key} is not supported by membrane")
        if key not in known:
            close = difflib.get_close_matches(key, known + unsupported, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            fail(join(path, key), f'unknown field "{key}"{hint}')


def opt(m: Mapping[str, Any], key: str) -> Any:
    """The value of `key`, None when absent or null (Kubernetes treats null as absent)."""
    return m.get(key)


# --- selectors ------------------------------------------------------------------------------------


def parse_selector(value: object, path: str) -> Selector:
    """A Kubernetes LabelSelector with Cilium label sources (`k8s:`, `reserved:`, `any:`, none = any)."""
    if value is None:
        return Selector()
    m = as_mapping(value, path)
    check_fields(m, path, ("matchLabels", "matchExpressions"))
    reqs: list[Requirement] = []
    labels = opt(m, "matchLabels")
    if labels is not None:
        lp = join(path, "matchLabels")
        for k, v in as_mapping(labels, lp).items():
            if v is None:
                v = ""
            source, key = _label_key(k, join(lp, k))
            reqs.append(Requirement(source, key, Operator.IN, frozenset({as_str(v, join(lp, k))})))
    exprs = opt(m, "matchExpressions")
    if exprs is not None:
        ep = join(path, "matchExpressions")
        for i, e in enumerate(as_list(exprs, ep)):
            p = f"{ep}[{i}]"
            em = as_mapping(e, p)
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
            values = [as_str(v, f"{join(p, 'values')}[{j}]") for j, v in enumerate(as_list(raw_values, join(p, "values")))] if raw_values is not None else []
            if op in (Operator.IN, Operator.NOT_IN) and not values:
                fail(join(p, "values"), f"values must be non-empty for operator {op.value}")
            if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
                fail(join(p, "values"), f"values must be empty for operator {op.value}")
            reqs.append(Requirement(source, key, op, frozenset(values)))
    return Selector(tuple(sorted(reqs, key=lambda r: (r.source, r.key, r.op.value, sorted(r.values)))))


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
    raw_headers = opt(m, "headers")
    if raw_headers is not None:
        for i, h in enumerate(as_list(raw_headers, join(path, "headers"))):
            text = as_str(h, f"{join(path, 'headers')}[{i}]").strip()
            if not text:
                fail(f"{join(path, 'headers')}[{i}]", "empty header")
            headers.append(text)
    matches: list[HeaderMatch] = []
    raw_matches = opt(m, "headerMatches")
    if raw_matches is not None:
        hp = join(path, "headerMatches")
        for i, hm in enumerate(as_list(raw_matches, hp)):
            p = f"{hp}[{i}]"
            mm = as_mapping(hm, p)
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
            matches.append(
                HeaderMatch(
                    name=name,
                    value=(as_str(hv, join(p, "value")) or None) if hv is not None else None,
                    secret=secret,
                    mismatch=mismatch,
                )
            )
    return HttpRule(
        method=_regex_field(m, "method", path),
        path=_regex_field(m, "path", path),
        host=_regex_field(m, "host", path),
        headers=tuple(headers),
        header_matches=tuple(matches),
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
    m = as_mapping(value, path)
    check_fields(m, path, ("http", "kafka", "dns"), unsupported=("l7proto", "l7"))
    present = [k for k in ("http", "kafka", "dns") if opt(m, k) is not None]
    if len(present) > 1:
        fail(path, f"multiple L7 protocol rule types specified in one port rule ({', '.join(present)})")
    http = kafka = dns = None
    if opt(m, "http") is not None:
        hp = join(path, "http")
        http = tuple(_parse_http(v, f"{hp}[{i}]") for i, v in enumerate(as_list(m["http"], hp)))
    if opt(m, "kafka") is not None:
        kp = join(path, "kafka")
        kafka = tuple(_parse_kafka(v, f"{kp}[{i}]") for i, v in enumerate(as_list(m["kafka"], kp)))
    if opt(m, "dns") is not None:
        dp = join(path, "dns")
        if ingress:
            fail(dp, "DNS rules are not allowed on ingress")
        dns_rules = []
        for i, v in enumerate(as_list(m["dns"], dp)):
            name, pattern = _parse_fqdn_selector(v, f"{dp}[{i}]", "DNS rule")
            dns_rules.append(DnsRule(match_name=name, match_pattern=pattern))
        dns = tuple(dns_rules)
    return L7Rules(http=http, kafka=kafka, dns=dns)


def _parse_port_rule(value: object, path: str, ref: str, ingress: bool, deny: bool) -> PortRule:
    m = as_mapping(value, path)
    if deny:
        check_fields(m, path, ("ports",))
    else:
        check_fields(
            m, path, ("ports", "rules"), unsupported=("terminatingTLS", "originatingTLS", "serverNames", "listener")
        )
    ports: list[PortProtocol] = []
    raw_ports = opt(m, "ports")
    if raw_ports is not None:
        pp = join(path, "ports")
        items = as_list(raw_ports, pp)
        if len(items) > MAX_PORTS:
            fail(pp, f"too many ports, the max is {MAX_PORTS}")
        ports = [_parse_port_protocol(v, f"{pp}[{i}]") for i, v in enumerate(items)]
    rules: L7Rules | None = None
    if not deny and opt(m, "rules") is not None:
        rules = _parse_l7(m["rules"], join(path, "rules"), ingress)
    if rules is not None and (rules.http is not None or rules.kafka is not None or rules.dns is not None):
        # Cilium's sanitize counts a present kind even when its list is empty.
        is_dns = rules.dns is not None
        if is_dns and not ports:
            fail(path, "port 53 must be specified for DNS rules")
        for i, p in enumerate(ports):
            if not is_dns and p.protocol is not L4Proto.TCP:
                fail(path, "L7 rules require protocol TCP")
            if p.port == 0:
                fail(join(path, f"ports[{i}]"), "L7 rules cannot be used when a port is 0")
            if is_dns and p.end_port is not None:
                fail(join(path, f"ports[{i}]"), "DNS rules do not support port ranges")
    return PortRule(ports=tuple(ports), rules=rules, path=ref)


# --- peers ----------------------------------------------------------------------------------------

_ENTITIES = {e.value: e for e in Entity}


def _parse_cidr(text: str, path: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        fail(path, f"invalid CIDR {text!r}")


def _parse_cidr_rule(value: object, path: str) -> CidrRule:
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


def _parse_peer_rule(
    value: object, path: str, ref: str, namespace: str | None, *, ingress: bool, deny: bool
) -> PeerRule:
    m = as_mapping(value, path)
    l3: tuple[str, ...] = _INGRESS_L3 if ingress else _EGRESS_L3
    if deny and not ingress:
        l3 = tuple(k for k in l3 if k != "toFQDNs")
    known = (*l3, "toPorts", "icmps") + (() if deny else ("authentication",))
    check_fields(m, path, known, unsupported=_INGRESS_UNSUPPORTED if ingress else _EGRESS_UNSUPPORTED)
    present = [k for k in l3 if isinstance(opt(m, k), list) and len(m[k]) > 0]
    if len(present) > 1:
        fail(path, f"combining {present[0]} and {present[1]} is not supported yet")
    pre = "from" if ingress else "to"

    def lst(key: str) -> list[Any] | None:
        v = opt(m, pre + key)
        return None if v is None else as_list(v, join(path, pre + key))

    endpoints: tuple[Selector, ...] | None = None
    raw = lst("Endpoints")
    if raw is not None:
        ep = join(path, pre + "Endpoints")
        endpoints = tuple(scope_peer(parse_selector(v, f"{ep}[{i}]"), namespace) if v is not None else scope_peer(Selector(), namespace) for i, v in enumerate(raw))
    entities: tuple[Entity, ...] | None = None
    raw = lst("Entities")
    if raw is not None:
        ents = []
        for i, v in enumerate(raw):
            p = f"{join(path, pre + 'Entities')}[{i}]"
            e = _ENTITIES.get(as_str(v, p))
            if e is None:
                fail(p, f"unknown entity {v!r} ({', '.join(_ENTITIES)})")
            ents.append(e)
        entities = tuple(ents)
    cidrs: list[CidrRule] | None = None
    raw = lst("CIDR")
    if raw is not None:
        cp = join(path, pre + "CIDR")
        cidrs = [CidrRule(cidr=_parse_cidr(as_str(v, f"{cp}[{i}]"), f"{cp}[{i}]")) for i, v in enumerate(raw)]
    raw = lst("CIDRSet")
    if raw is not None:
        sp = join(path, pre + "CIDRSet")
        cidrs = (cidrs or []) + [_parse_cidr_rule(v, f"{sp}[{i}]") for i, v in enumerate(raw)]
    fqdns: tuple[FqdnSelector, ...] | None = None
    if not ingress and not deny:
        raw = lst("FQDNs")
        if raw is not None:
            fp = join(path, "toFQDNs")
            sels = []
            for i, v in enumerate(raw):
                name, pattern = _parse_fqdn_selector(v, f"{fp}[{i}]", "toFQDNs selector")
                sels.append(FqdnSelector(match_name=name, match_pattern=pattern))
            fqdns = tuple(sels)
    ports: tuple[PortRule, ...] = ()
    raw_ports = opt(m, "toPorts")
    if raw_ports is not None:
        tp = join(path, "toPorts")
        ports = tuple(
            _parse_port_rule(v, f"{tp}[{i}]", f"{ref}.toPorts[{i}]", ingress, deny)
            for i, v in enumerate(as_list(raw_ports, tp))
        )
    has_icmps = False
    icmps: list[tuple[L4Proto, int]] = []
    raw_icmps = opt(m, "icmps")
    if raw_icmps is not None:
        ip = join(path, "icmps")
        for i, v in enumerate(as_list(raw_icmps, ip)):
            icmps.extend(_parse_icmp(v, f"{ip}[{i}]"))
        has_icmps = bool(raw_icmps)
        if has_icmps and ports:
            fail(path, "the icmps block may only be present without toPorts; define a separate rule for toPorts")
    cls = IngressRule if ingress else EgressRule
    # An explicitly empty toCIDR plus a non-empty toCIDRSet is a non-empty selection in Cilium only if
    # neither list is empty; keep the explicit-empty marker when either one was [].
    if cidrs is not None and any(opt(m, pre + k) == [] for k in ("CIDR", "CIDRSet")):
        cidrs = []
    return cls(
        endpoints=endpoints,
        entities=entities,
        cidrs=tuple(cidrs) if cidrs is not None else None,
        fqdns=fqdns,
        to_ports=ports,
        has_icmps=has_icmps,
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


# --- rules and objects ------------------------------------------------------------------------------

_RULE_FIELDS = (
    "endpointSelector",
    "nodeSelector",
    "ingress",
    "ingressDeny",
    "egress",
    "egressDeny",
    "labels",
    "description",
    "enableDefaultDeny",
    "log",
)


def _parse_rule(value: object, path: str, namespace: str | None) -> Rule:
    m = as_mapping(value, path)
    check_fields(m, path, _RULE_FIELDS)
    ref_prefix = "" if path == "spec" else path + "."
    has_es = opt(m, "endpointSelector") is not None
    has_ns = opt(m, "nodeSelector") is not None
    if has_es and has_ns:
        fail(path, "a rule cannot have both endpointSelector and nodeSelector")
    if not has_es and not has_ns:
        fail(path, "a rule needs endpointSelector or nodeSelector")
    if has_ns and namespace is not None:
        fail(join(path, "nodeSelector"), "a CiliumNetworkPolicy rule cannot have nodeSelector")
    subject = scope_subject(parse_selector(m["endpointSelector"], join(path, "endpointSelector")), namespace) if has_es else None
    node = parse_selector(m["nodeSelector"], join(path, "nodeSelector")) if has_ns else None

    def section(key: str, ingress: bool, deny: bool) -> list[PeerRule]:
        raw = opt(m, key)
        if raw is None:
            return []
        sp = join(path, key)
        return [
            _parse_peer_rule(v, f"{sp}[{i}]", f"{ref_prefix}{key}[{i}]", namespace, ingress=ingress, deny=deny)
            for i, v in enumerate(as_list(raw, sp))
        ]

    # A rule with no ingress/egress sections is valid in Cilium (Rule.Sanitize has no such check): it
    # selects its endpoints and, having no peer rules, enables default deny for neither direction.
    dd_in = dd_eg = True
    raw_dd = opt(m, "enableDefaultDeny")
    if raw_dd is not None:
        dp = join(path, "enableDefaultDeny")
        dm = as_mapping(raw_dd, dp)
        check_fields(dm, dp, ("ingress", "egress"))
        if opt(dm, "ingress") is not None:
            dd_in = as_bool(dm["ingress"], join(dp, "ingress"))
        if opt(dm, "egress") is not None:
            dd_eg = as_bool(dm["egress"], join(dp, "egress"))
    desc = opt(m, "description")
    if opt(m, "labels") is not None:
        for i, lab in enumerate(as_list(m["labels"], join(path, "labels"))):
            lp = f"{join(path, 'labels')}[{i}]"
            check_fields(as_mapping(lab, lp), lp, ("key", "value", "source"))
    if opt(m, "log") is not None:
        check_fields(as_mapping(m["log"], join(path, "log")), join(path, "log"), ("value",))
    return Rule(
        endpoint_selector=subject,
        node_selector=node,
        ingress=tuple(r for r in section("ingress", True, False) if isinstance(r, IngressRule)),
        ingress_deny=tuple(r for r in section("ingressDeny", True, True) if isinstance(r, IngressRule)),
        egress=tuple(r for r in section("egress", False, False) if isinstance(r, EgressRule)),
        egress_deny=tuple(r for r in section("egressDeny", False, True) if isinstance(r, EgressRule)),
        default_deny_ingress=dd_in,
        default_deny_egress=dd_eg,
        description=as_str(desc, join(path, "description")) if desc is not None else "",
        path=path,
    )


_DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def object_name(doc: Mapping[str, Any], default_namespace: str = "default") -> str | None:
    """Best-effort `ns/name` of a document for error messages (None when it has no usable name)."""
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    if doc.get("kind") == KIND_CCNP:
        return str(meta["name"])
    ns = meta.get("namespace")
    return f"{ns if isinstance(ns, str) and ns else default_namespace}/{meta['name']}"


def parse_policy(doc: object, *, source: str = "", line: int = 0, default_namespace: str = "default") -> Policy:
    """Build a Policy from one decoded YAML/JSON document.

    Returns: the validated, namespace-scoped model.
    Raises:
        PolicyValidationError: the object is invalid (the first problem, with its field path); the
            caller rejects this object and keeps loading the others.
    """
    obj_name: str | None = None
    try:
        m = as_mapping(doc, "")
        obj_name = object_name(m, default_namespace)
        check_fields(m, "", ("apiVersion", "kind", "metadata", "spec", "specs", "status"))
        kind = opt(m, "kind")
        if kind not in (KIND_CNP, KIND_CCNP):
            fail("kind", f"unsupported kind {kind!r} (expected {KIND_CNP} or {KIND_CCNP})")
        api = opt(m, "apiVersion")
        if api != API_VERSION:
            fail("apiVersion", f"unsupported apiVersion {api!r} (expected {API_VERSION})")
        meta = as_mapping(opt(m, "metadata"), "metadata")
        name = opt(meta, "name")
        if name is None or name == "":
            fail("metadata.name", "metadata.name is required")
        name = as_str(name, "metadata.name")
        if len(name) > 253 or not _DNS_1123_SUBDOMAIN.match(name):
            fail("metadata.name", f"invalid object name {name!r} (lower case RFC 1123 subdomain)")
        namespace: str | None = None
        if kind == KIND_CNP:
            raw_ns = opt(meta, "namespace")
            namespace = as_str(raw_ns, "metadata.namespace") if raw_ns is not None else ""
            namespace = namespace or default_namespace
        spec = opt(m, "spec")
        specs = opt(m, "specs")
        rules: list[Rule] = []
        if spec is not None:
            rules.append(_parse_rule(spec, "spec", namespace))
        if specs is not None:
            rules.extend(_parse_rule(s, f"specs[{i}]", namespace) for i, s in enumerate(as_list(specs, "specs")))
        if spec is None and specs is None:
            fail("spec", "a policy needs spec or specs")
        return Policy(kind=str(kind), name=name, namespace=namespace, rules=tuple(rules), source=source, line=line)
    except FieldError as e:
        raise PolicyValidationError(e.message, source=source, line=line, obj=obj_name, path=e.path) from None
