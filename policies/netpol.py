"""Kubernetes NetworkPolicy (networking.k8s.io/v1) -> the same `Policy` model as a CNP, as Cilium translates it.

Follows cilium/cilium pkg/k8s/network_policy.go (ParseNetworkPolicy, parseNetworkPolicyPeer,
parsePorts, ipBlockToCIDRRule); never does I/O. Field paths in errors are the NetworkPolicy's own.
- `spec.podSelector` -> endpointSelector: its keys as `k8s:` labels plus
  `k8s:io.kubernetes.pod.namespace=<namespace>` (absent namespace = the default one).
- A peer's `podSelector` alone -> one fromEndpoints/toEndpoints selector scoped to the policy's
  namespace. With a `namespaceSelector`, one selector over the namespace's labels
  (`k8s:io.cilium.k8s.namespace.labels.<key>`) and the pod's labels, in any namespace; an empty
  namespaceSelector selects every namespace (`k8s:io.kubernetes.pod.namespace` exists).
- `ipBlock` -> fromCIDRSet/toCIDRSet with its `except` list (CIDR rules never select cluster pods).
- Each peer of `from`/`to` is an entry of its own, sharing the rule's ports. `from`/`to` empty or
  absent -> every peer: Cilium's WildcardEndpointSelector, which selects every identity (world too).
- `ports[i]`: protocol absent = TCP; port absent = every port of that protocol; `endPort` makes a
  range (it needs a numeric port). Named ports are refused (Membrane matches numbers only).
- No ingress rules and `policyTypes` names Ingress or does not name Egress -> `ingress: [{}]`
  (default deny, nothing allowed); no egress rules and `policyTypes` names Egress -> `egress: [{}]`.
  As in Cilium, rules listed under a direction are used even when policyTypes omits it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from membrane.policies.crd import (
    API_VERSION_NP,
    KIND_NP,
    CidrRule,
    EgressRule,
    Entity,
    FieldError,
    IngressRule,
    L4Proto,
    PeerRule,
    Policy,
    PortProtocol,
    PortRule,
    Rule,
    as_list,
    as_mapping,
    as_str,
    attempt,
    check_fields,
    collecting,
    each,
    fail,
    join,
    object_name,
    opt,
    parse_cidr_rule,
    parse_metadata,
    parse_selector,
    raise_problems,
    report,
    scope_subject,
)
from membrane.policies.labels import K8S, NAMESPACE_KEY, NAMESPACE_LABELS_PREFIX, Operator, Requirement, Selector

_POLICY_TYPES = ("Ingress", "Egress")


def k8s_selector(value: object, path: str, *, key_prefix: str = "") -> Selector:
    """A plain Kubernetes LabelSelector: every key becomes a `k8s:` label key (NewESFromK8sLabelSelector).

    `key_prefix` (the namespace-labels prefix for a namespaceSelector) is joined in front of each key.
    """
    sel = parse_selector(value, path)
    reqs = []
    for r in sel.requirements:
        if ":" in r.key or r.source != "any":
            report(FieldError(path, f"label key {r.source}:{r.key} has a source prefix; a NetworkPolicy selector takes plain keys"))
        key = f"{key_prefix}.{r.key}" if key_prefix else r.key
        reqs.append(Requirement(K8S, key, r.op, r.values))
    return Selector(tuple(reqs))


def _peer_selector(m: Mapping[str, Any], path: str, namespace: str) -> Selector | None:
    """parseNetworkPolicyPeer: the endpoint selector of one peer (None for an ipBlock-only peer)."""
    pod_raw, ns_raw = opt(m, "podSelector"), opt(m, "namespaceSelector")
    pods = k8s_selector(pod_raw, join(path, "podSelector")) if pod_raw is not None else Selector()
    if ns_raw is not None:
        ns_sel = k8s_selector(ns_raw, join(path, "namespaceSelector"), key_prefix=NAMESPACE_LABELS_PREFIX)
        if not ns_sel.requirements:  # an empty namespaceSelector: every namespace
            ns_sel = Selector((Requirement(K8S, NAMESPACE_KEY, Operator.EXISTS),))
        return Selector(ns_sel.requirements + pods.requirements)
    if pod_raw is not None:
        return pods.with_requirement(Requirement(K8S, NAMESPACE_KEY, Operator.IN, frozenset({namespace})))
    return None


def _ip_block(value: object, path: str) -> CidrRule:
    """ipBlockToCIDRRule: `cidr` and `except` follow the CIDRSet rules (prefix notation, excepts inside)."""
    check_fields(as_mapping(value, path), path, ("cidr", "except"))
    return parse_cidr_rule(value, path)


def _peer(value: object, path: str, namespace: str, ingress: bool, ports: tuple[PortRule, ...], ref: str) -> PeerRule:
    m = as_mapping(value, path)
    check_fields(m, path, ("podSelector", "namespaceSelector", "ipBlock"))
    has_block = opt(m, "ipBlock") is not None
    if has_block and (opt(m, "podSelector") is not None or opt(m, "namespaceSelector") is not None):
        fail(path, "ipBlock cannot be combined with podSelector or namespaceSelector in one peer")
    if not has_block and opt(m, "podSelector") is None and opt(m, "namespaceSelector") is None:
        fail(path, "a peer needs podSelector, namespaceSelector or ipBlock")
    cls = IngressRule if ingress else EgressRule
    if has_block:
        return cls(cidrs=(_ip_block(m["ipBlock"], join(path, "ipBlock")),), to_ports=ports, path=ref)
    selector = _peer_selector(m, path, namespace)
    return cls(endpoints=(selector,) if selector is not None else (), to_ports=ports, path=ref)


def _port(value: object, path: str, ref: str) -> PortRule:
    """parsePorts: one NetworkPolicyPort -> one port rule (protocol absent = TCP, port absent = all)."""
    m = as_mapping(value, path)
    check_fields(m, path, ("protocol", "port", "endPort"))
    proto_text = as_str(opt(m, "protocol") or "TCP", join(path, "protocol"))
    if proto_text not in ("TCP", "UDP", "SCTP"):
        fail(join(path, "protocol"), f"unsupported protocol {proto_text!r} (TCP, UDP or SCTP)")
    raw_port, raw_end = opt(m, "port"), opt(m, "endPort")
    port = 0
    if raw_port is not None:
        if isinstance(raw_port, str) and not raw_port.isdigit():
            fail(join(path, "port"), f"named port {raw_port!r} is not supported by membrane (use the port number)")
        if isinstance(raw_port, bool) or not isinstance(raw_port, int | str):
            fail(join(path, "port"), "expected a port number or name")
        port = int(raw_port)
        if not 1 <= port <= 65535:
            fail(join(path, "port"), f"port {port} is out of range 1-65535")
    end: int | None = None
    if raw_end is not None:
        if isinstance(raw_end, bool) or not isinstance(raw_end, int):
            fail(join(path, "endPort"), "expected an integer")
        if raw_port is None:
            fail(join(path, "endPort"), "endPort needs a numeric port")
        if not port <= raw_end <= 65535:
            fail(join(path, "endPort"), f"endPort {raw_end} must be between port {port} and 65535")
        end = raw_end if raw_end > port else None
    return PortRule(ports=(PortProtocol(port=port, end_port=end, protocol=L4Proto(proto_text)),), path=ref)


def _direction(m: Mapping[str, Any], key: str, namespace: str) -> list[PeerRule]:
    """spec.ingress / spec.egress -> entries: one per peer (or one wildcard entry), each with the rule's ports."""
    ingress = key == "ingress"
    peers_key = "from" if ingress else "to"
    out: list[PeerRule] = []
    cls = IngressRule if ingress else EgressRule
    for i, raw in enumerate(as_list(m[key], join("spec", key))):
        rp = f"spec.{key}[{i}]"
        ref = f"{key}[{i}]"
        try:
            rm = as_mapping(raw, rp)
        except FieldError as e:
            report(e)
            continue
        check_fields(rm, rp, (peers_key, "ports"))
        ports: tuple[PortRule, ...] = ()
        if opt(rm, "ports") is not None:
            ports = tuple(each(rm["ports"], join(rp, "ports"), _Refs(rp, ref).port))
        try:
            peers = as_list(opt(rm, peers_key) or [], join(rp, peers_key))
        except FieldError as e:
            report(e)
            continue
        if not peers:
            # "If this field is empty or missing, this rule matches all sources/destinations."
            out.append(cls(entities=(Entity.ALL,), to_ports=ports, path=ref))
            continue
        out.extend(each(peers, join(rp, peers_key), _Refs(rp, ref, namespace, ingress, ports).peer))
    return out


@dataclass(frozen=True, slots=True)
class _Refs:
    """Parses items under one `spec.<direction>[i]` and names their references after their paths."""

    path: str  # spec.ingress[0]
    ref: str  # ingress[0]
    namespace: str = ""
    ingress: bool = True
    ports: tuple[PortRule, ...] = ()

    def port(self, value: object, path: str) -> PortRule:
        return _port(value, path, self.ref + path[len(self.path) :])

    def peer(self, value: object, path: str) -> PeerRule:
        return _peer(value, path, self.namespace, self.ingress, self.ports, self.ref + path[len(self.path) :])


def parse_network_policy(doc: Mapping[str, Any], *, source: str = "", line: int = 0, default_namespace: str = "default") -> Policy:
    """Build the Policy (one rule) Cilium makes of a NetworkPolicy.

    Returns: a Policy of kind NetworkPolicy; its rule references read `ingress[0]`, `egress[1].to[0]`,
        `ingress[0].ports[1]` (the NetworkPolicy's own fields).
    Raises:
        PolicyValidationError: with every problem of the object in `problems`.
    """
    with collecting() as problems:
        policy = attempt(lambda: _parse(doc, source, line, default_namespace), None)
    raise_problems(problems, source=source, line=line, obj=object_name(doc, default_namespace))
    assert policy is not None
    return policy


def _parse(doc: Mapping[str, Any], source: str, line: int, default_namespace: str) -> Policy:
    m = as_mapping(doc, "")
    check_fields(m, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    if opt(m, "apiVersion") != API_VERSION_NP:
        report(FieldError("apiVersion", f"unsupported apiVersion {opt(m, 'apiVersion')!r} (expected {API_VERSION_NP})"))
    name, namespace = parse_metadata(m, namespaced=True, default_namespace=default_namespace)
    assert namespace is not None
    if opt(m, "spec") is None:
        fail("spec", "spec is required")
    spec = as_mapping(m["spec"], "spec")
    check_fields(spec, "spec", ("podSelector", "policyTypes", "ingress", "egress"))
    if opt(spec, "podSelector") is None:
        report(FieldError("spec.podSelector", "spec.podSelector is required ({} selects every pod of the namespace)"))
    subject = attempt(lambda: k8s_selector(opt(spec, "podSelector"), "spec.podSelector"), Selector())
    types: list[str] = []
    if opt(spec, "policyTypes") is not None:
        types = each(spec["policyTypes"], "spec.policyTypes", _policy_type)
    ingress = _direction(spec, "ingress", namespace) if opt(spec, "ingress") is not None else []
    egress = _direction(spec, "egress", namespace) if opt(spec, "egress") is not None else []
    # Convert the Kubernetes default-deny model to Cilium's (ParseNetworkPolicy).
    if not ingress and ("Ingress" in types or "Egress" not in types):
        ingress = [IngressRule(path="ingress")]
    if not egress and "Egress" in types:
        egress = [EgressRule(path="egress")]
    rule = Rule(
        endpoint_selector=scope_subject(subject, namespace),
        ingress=tuple(r for r in ingress if isinstance(r, IngressRule)),
        egress=tuple(r for r in egress if isinstance(r, EgressRule)),
        path="spec",
    )
    return Policy(kind=KIND_NP, name=name, namespace=namespace, rules=(rule,), source=source, line=line)


def _policy_type(value: object, path: str) -> str:
    text = as_str(value, path)
    if text not in _POLICY_TYPES:
        fail(path, f"unknown policy type {text!r} (Ingress or Egress)")
    return text
