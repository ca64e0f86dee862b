"""CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy (cilium.io/v2) and Kubernetes NetworkPolicy
(networking.k8s.io/v1, translated as Cilium does: policies.netpol): model, validation, compile, evaluate.

Pure: takes strings and mappings, never paths or sockets. Raises `PolicyError` (with source, line,
object and field path) only at load or compile time; evaluation is total.

Public API
----------
Loading (text in, objects + errors out; one invalid object never stops the others):
    load_policies(text, source="<input>", *, default_namespace="default", skip_endpoints_documents=False) -> LoadResult
        LoadResult.policies: tuple[Policy, ...]; LoadResult.errors: tuple[PolicyError, ...]
    merge_results(results: list[LoadResult]) -> LoadResult        # several files; duplicate names are errors
    parse_policy(mapping, *, source="", line=0) -> Policy          # raises PolicyValidationError (.problems: all of them)
    parse_endpoints(text, source="<endpoints>") -> Endpoints       # raises EndpointsError

Compiling:
    compile_policy(policies, endpoints, learned: Mapping[name, Iterable[ip]] | None = None) -> PolicyMap
    PolicyMap.direction(endpoint_key, PolicyDirection) -> DirectionPolicy
        .enforced: bool; .default: VerdictKind
        .lookup(peer_identity, port, L4Proto) -> Verdict(kind DROP|ALLOW|REDIRECT, parser, rules: L7RuleSet, matched)
        .entries() -> list[MapEntry(identity, proto, port, end_port, verdict, parser)]  # resolved, for BPF maps
    PolicyMap.lookup(endpoint_key, direction, peer_identity, port, proto) -> Verdict
    PolicyMap.ipcache.lookup(ip) -> identity; PolicyMap.ipcache.entries() -> {prefix: identity}
    PolicyMap.identities: list[Identity]; .identity_of(endpoint_key); .peer_from_endpoint(key); .peer_from_ip(ip)
    PolicyMap.errors: list[PolicyError]   # L7 parser conflicts (those peers are dropped)
    FqdnCache(min_ttl_s=0).observe(DnsResponse, now=...) / .add(name, ips, ttl_s=, now=) / .snapshot(now=)

Semantics: see policies.compile (enforcement, union, deny wins, wildcarding, conflicts),
policies.l7 (per-request matching), policies.crd (validation, CNP/CCNP scoping), policies.identity.

Evaluating (never raises):
    L7RuleSet.evaluate(HttpRequest | GrpcCall | DnsQuery | KafkaRequest) -> Decision
    Decision(allowed, reason, rule, header_actions: tuple[HeaderAction, ...], matched)
    evaluate_flow(pmap, src=Peer, dst=Peer, port=, proto=, request=None, request_error=None) -> FlowResult
    evaluate_request(egress_verdict, ingress_verdict, request, ...) -> FlowResult   # per request on a known connection
    FlowResult(verdict: FlowVerdict ALLOWED|DROPPED|L7_DENIED, egress, ingress: DirectionResult, decision, header_actions)
    denial_response(result, request) -> {"http_status": 403} | {"grpc_status": 7} | {"dns_rcode": "REFUSED"} | {"kafka_error_code": 29}
"""

from membrane.policies.compile import (
    DirectionPolicy,
    MapEntry,
    Peer,
    PolicyDirection,
    PolicyMap,
    Verdict,
    VerdictKind,
    compile_policy,
)
from membrane.policies.crd import (
    DnsRule,
    EgressRule,
    Entity,
    HttpRule,
    IngressRule,
    KafkaRule,
    L4Proto,
    L7Rules,
    ParserType,
    Policy,
    PortRule,
    Rule,
    parse_policy,
)
from membrane.policies.endpoints import Endpoint, Endpoints, Namespace, parse_endpoints
from membrane.policies.errors import (
    EndpointsError,
    PolicyConflictError,
    PolicyError,
    PolicyValidationError,
    PolicyYamlError,
)
from membrane.policies.flow import (
    DirectionResult,
    FlowResult,
    FlowVerdict,
    denial_response,
    evaluate_flow,
    evaluate_request,
)
from membrane.policies.fqdn import FqdnCache
from membrane.policies.identity import Identity, IdentityKind, ReservedIdentity
from membrane.policies.l7 import Decision, HeaderAction, L7RuleSet
from membrane.policies.loader import LoadResult, load_policies, merge_results

__all__ = [
    "Decision",
    "DirectionPolicy",
    "DirectionResult",
    "DnsRule",
    "EgressRule",
    "Endpoint",
    "Endpoints",
    "EndpointsError",
    "Entity",
    "FlowResult",
    "FlowVerdict",
    "FqdnCache",
    "HeaderAction",
    "HttpRule",
    "Identity",
    "IdentityKind",
    "IngressRule",
    "KafkaRule",
    "L4Proto",
    "L7RuleSet",
    "L7Rules",
    "LoadResult",
    "MapEntry",
    "Namespace",
    "ParserType",
    "Peer",
    "Policy",
    "PolicyConflictError",
    "PolicyDirection",
    "PolicyError",
    "PolicyMap",
    "PolicyValidationError",
    "PolicyYamlError",
    "PortRule",
    "ReservedIdentity",
    "Rule",
    "Verdict",
    "VerdictKind",
    "compile_policy",
    "denial_response",
    "evaluate_flow",
    "evaluate_request",
    "load_policies",
    "merge_results",
    "parse_endpoints",
    "parse_policy",
]
