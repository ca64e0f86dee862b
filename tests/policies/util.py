"""Shared helpers for policy tests: YAML snippets -> policies, endpoints, compiled maps, traced flows."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping

from membrane.parsers.events import DnsQuery, GrpcCall, HttpRequest, KafkaRequest
from membrane.policies import (
    FlowResult,
    L4Proto,
    Policy,
    PolicyMap,
    compile_policy,
    evaluate_flow,
    load_policies,
    parse_endpoints,
)
from membrane.policies.dnsmatch import fqdn
from membrane.policies.l7 import L7Request

ENDPOINTS = """
namespaces:
  - name: default
    labels: {team: web}
  - name: other
    labels: {team: data}
endpoints:
  - {name: frontend, namespace: default, labels: {app: frontend, env: prod}, ips: [10.244.1.10]}
  - {name: backend, namespace: default, labels: {app: backend, env: prod}, ips: [10.244.1.20]}
  - {name: debug, namespace: default, labels: {app: debug}, ips: [10.244.1.30]}
  - {name: backend, namespace: other, labels: {app: backend}, ips: [10.244.2.20], serviceAccount: robot}
  - {name: db, namespace: other, labels: {app: db}, ips: [10.244.2.30]}
  - {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}, ips: [10.244.0.10]}
"""


def policies(*docs: str) -> list[Policy]:
    """Load YAML documents that must be valid."""
    text = "\n---\n".join(textwrap.dedent(d) for d in docs)
    result = load_policies(text, "test.yaml")
    assert not result.errors, [str(e) for e in result.errors]
    return list(result.policies)


def cnp(name: str, spec: str, namespace: str = "default", kind: str = "CiliumNetworkPolicy") -> str:
    """A policy document with `spec` (YAML, indented freely) under `spec:`."""
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    ns = f"\n  namespace: {namespace}" if kind == "CiliumNetworkPolicy" else ""
    return f"apiVersion: cilium.io/v2\nkind: {kind}\nmetadata:\n  name: {name}{ns}\nspec:\n{body}\n"


def ccnp(name: str, spec: str) -> str:
    return cnp(name, spec, kind="CiliumClusterwideNetworkPolicy")


def compile_docs(*docs: str, endpoints: str = ENDPOINTS, learned: Mapping[str, Iterable[str]] | None = None) -> PolicyMap:
    return compile_policy(policies(*docs), parse_endpoints(textwrap.dedent(endpoints)), learned)


def flow(
    pmap: PolicyMap,
    src: str,
    dst: str,
    port: int,
    proto: str = "TCP",
    request: L7Request | None = None,
) -> FlowResult:
    """Trace src -> dst (each `ns/name` or an IP)."""
    s = pmap.peer_from_endpoint(src) if "/" in src else pmap.peer_from_ip(src)
    d = pmap.peer_from_endpoint(dst) if "/" in dst else pmap.peer_from_ip(dst)
    return evaluate_flow(pmap, src=s, dst=d, port=port, proto=L4Proto(proto), request=request)


def verdict(pmap: PolicyMap, src: str, dst: str, port: int, proto: str = "TCP", request: L7Request | None = None) -> str:
    return flow(pmap, src, dst, port, proto, request).verdict.value


def http(method: str = "GET", target: str = "/", host: str | None = None, headers: tuple[tuple[str, str], ...] = ()) -> HttpRequest:
    path, _, query = target.partition("?")
    return HttpRequest(method=method, target=target, path=path, query=query, host=host, headers=headers)


def grpc(path: str, headers: tuple[tuple[str, str], ...] = ()) -> GrpcCall:
    _, service, method = path.split("/")
    return GrpcCall(service=service, method=method, path=path, headers=(("content-type", "application/grpc"), *headers))


def dns(name: str, qtype: int = 1) -> DnsQuery:
    return DnsQuery(id=1, name=name, normalized_name=fqdn(name), qtype=qtype)


def kafka(api_key: int, *topics: str, version: int = 0, client_id: str | None = None, topics_known: bool = True) -> KafkaRequest:
    return KafkaRequest(api_key=api_key, api_version=version, correlation_id=1, client_id=client_id, topics=topics, topics_known=topics_known)
