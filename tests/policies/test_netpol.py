"""Kubernetes NetworkPolicy -> the CNP model, as cilium/cilium pkg/k8s/network_policy.go translates it.

| NetworkPolicy shape                                  | Cilium's translation (ParseNetworkPolicy)                 | test                                  |
|------------------------------------------------------|-----------------------------------------------------------|---------------------------------------|
| spec.podSelector {matchLabels}                       | endpointSelector k8s:keys + k8s:io.kubernetes.pod.namespace | test_subject_and_peer_selectors       |
| from: [{podSelector}]                                | fromEndpoints scoped to the policy's namespace            | test_subject_and_peer_selectors       |
| from: [{namespaceSelector, podSelector}]             | one selector: k8s:io.cilium.k8s.namespace.labels.* + pod  | test_subject_and_peer_selectors       |
| from: [{namespaceSelector: {}}]                      | k8s:io.kubernetes.pod.namespace exists                    | test_subject_and_peer_selectors       |
| from: [{ipBlock: {cidr, except}}]                    | fromCIDRSet with except                                   | test_ip_block_and_ports               |
| ports: [{port}] / [{protocol: UDP}] / endPort        | TCP default / port 0 / range                              | test_ip_block_and_ports               |
| from absent or []                                    | wildcard endpoint selector: every identity                | test_table                            |
| no ingress rules, policyTypes [] or [Ingress]        | ingress: [{}] (default deny)                              | test_table                            |
| no egress rules, policyTypes [Egress]                | egress: [{}] (default deny)                               | test_table                            |
| invalid shapes                                        | located errors with the NetworkPolicy's own paths         | test_errors                           |
"""

from __future__ import annotations

import textwrap

import pytest
from membrane.policies import Entity, L4Proto, PolicyDirection, load_policies
from membrane.policies.labels import K8S, Operator, Requirement

from tests.policies.util import compile_docs, verdict

NS = Requirement(K8S, "io.kubernetes.pod.namespace", Operator.IN, frozenset({"default"}))


def np(spec: str, name: str = "np", namespace: str = "default") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return f"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{body}\n"


def test_subject_and_peer_selectors() -> None:
    """podSelector keys become k8s: labels; peers are scoped (podSelector) or cross-namespace (namespaceSelector)."""
    result = load_policies(np("""
        podSelector: {matchLabels: {app: frontend}}
        ingress:
        - from:
          - podSelector: {matchLabels: {app: backend}}
          - namespaceSelector: {matchLabels: {team: data}}
            podSelector: {matchLabels: {app: db}}
          - namespaceSelector: {}
        """), "np.yaml")
    assert not result.errors, [str(e) for e in result.errors]
    (policy,) = result.policies
    assert policy.kind == "NetworkPolicy"
    rule = policy.rules[0]
    assert rule.endpoint_selector is not None
    assert set(rule.endpoint_selector.requirements) == {Requirement(K8S, "app", Operator.IN, frozenset({"frontend"})), NS}
    peers = [e.endpoints for e in rule.ingress]
    assert peers[0] is not None
    assert set(peers[0][0].requirements) == {Requirement(K8S, "app", Operator.IN, frozenset({"backend"})), NS}
    assert peers[1] is not None
    assert set(peers[1][0].requirements) == {
        Requirement(K8S, "io.cilium.k8s.namespace.labels.team", Operator.IN, frozenset({"data"})),
        Requirement(K8S, "app", Operator.IN, frozenset({"db"})),
    }
    assert peers[2] is not None
    assert peers[2][0].requirements == (Requirement(K8S, "io.kubernetes.pod.namespace", Operator.EXISTS),)
    assert [e.path for e in rule.ingress] == ["ingress[0].from[0]", "ingress[0].from[1]", "ingress[0].from[2]"]
    assert rule.egress == ()


def test_ip_block_and_ports() -> None:
    """ipBlock -> CIDR rule with except; ports: TCP by default, no port = all ports, endPort = range."""
    (policy,) = load_policies(np("""
        podSelector: {}
        egress:
        - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]
          ports:
          - port: 443
          - protocol: UDP
          - {protocol: SCTP, port: 3000, endPort: 3005}
        policyTypes: [Egress]
        """), "np.yaml").policies
    rule = policy.rules[0]
    assert rule.ingress == ()  # policyTypes [Egress] only: no ingress default deny
    (entry,) = rule.egress
    assert entry.cidrs is not None
    assert str(entry.cidrs[0].cidr) == "10.0.0.0/8"
    assert [str(x) for x in entry.cidrs[0].except_] == ["10.1.0.0/16"]
    ports = [pr.ports[0] for pr in entry.to_ports]
    assert [(p.range, p.protocol) for p in ports] == [((443, 443), L4Proto.TCP), ((0, 65535), L4Proto.UDP), ((3000, 3005), L4Proto.SCTP)]


NP_CASES = [
    # (id, spec, src, dst, port/proto, expected)
    ("empty-from-allows-world", "podSelector: {matchLabels: {app: frontend}}\ningress: [{}]", "8.8.8.8", "default/frontend", "80/TCP", "ALLOWED"),
    ("empty-from-list-allows-pods", "podSelector: {matchLabels: {app: frontend}}\ningress: [{from: []}]", "other/db", "default/frontend", "80/TCP", "ALLOWED"),
    ("default-deny-no-policy-types", "podSelector: {}", "default/backend", "default/frontend", "80/TCP", "DROPPED"),
    ("default-deny-ingress-type", "podSelector: {}\npolicyTypes: [Ingress]", "8.8.8.8", "default/frontend", "80/TCP", "DROPPED"),
    ("egress-type-only-leaves-ingress-open", "podSelector: {}\npolicyTypes: [Egress]", "8.8.8.8", "default/frontend", "80/TCP", "ALLOWED"),
    ("egress-default-deny", "podSelector: {}\npolicyTypes: [Egress]", "default/frontend", "8.8.8.8", "53/UDP", "DROPPED"),
    ("ports-only", "podSelector: {}\ningress: [{ports: [{port: 80}]}]", "8.8.8.8", "default/frontend", "80/TCP", "ALLOWED"),
    ("ports-only-other-port", "podSelector: {}\ningress: [{ports: [{port: 80}]}]", "8.8.8.8", "default/frontend", "81/TCP", "DROPPED"),
    ("ports-default-tcp", "podSelector: {}\ningress: [{ports: [{port: 80}]}]", "8.8.8.8", "default/frontend", "80/UDP", "DROPPED"),
    ("pod-peer-same-namespace", "podSelector: {}\ningress: [{from: [{podSelector: {matchLabels: {app: backend}}}]}]", "default/backend", "default/frontend", "80/TCP", "ALLOWED"),
    ("pod-peer-not-other-namespace", "podSelector: {}\ningress: [{from: [{podSelector: {matchLabels: {app: backend}}}]}]", "other/backend", "default/frontend", "80/TCP", "DROPPED"),
    ("ns-peer-by-label", "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {team: data}}}]}]", "other/db", "default/frontend", "80/TCP", "ALLOWED"),
    ("ns-peer-by-name-label", "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: other}}}]}]", "other/backend", "default/frontend", "80/TCP", "ALLOWED"),
    ("ns-peer-not-world", "podSelector: {}\ningress: [{from: [{namespaceSelector: {}}]}]", "8.8.8.8", "default/frontend", "80/TCP", "DROPPED"),
    ("ipblock-not-pods", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.244.0.0/16}}]}]", "default/backend", "default/frontend", "80/TCP", "DROPPED"),
]


@pytest.mark.parametrize(("spec", "src", "dst", "port", "expected"), [c[1:] for c in NP_CASES], ids=[c[0] for c in NP_CASES])
def test_table(spec: str, src: str, dst: str, port: str, expected: str) -> None:
    """Each NetworkPolicy shape gets the verdict Kubernetes documents, through Cilium's translation."""
    number, proto = port.split("/")
    assert verdict(compile_docs(np(spec)), src, dst, int(number), proto) == expected


def test_wildcard_from_is_entity_all() -> None:
    """An empty `from` is Cilium's WildcardEndpointSelector: every identity, world included."""
    (policy,) = load_policies(np("podSelector: {}\ningress: [{ports: [{port: 80}]}]"), "np.yaml").policies
    assert policy.rules[0].ingress[0].entities == (Entity.ALL,)


def test_kubernetes_and_cilium_policies_combine() -> None:
    """A NetworkPolicy and a CNP selecting one pod: allows are a union, and the direction is enforced once."""
    cilium = (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: np}\nspec:\n"
        "  endpointSelector: {matchLabels: {app: frontend}}\n  ingress: [{fromEntities: [world], toPorts: [{ports: [{port: '443', protocol: TCP}]}]}]\n"
    )
    pmap = compile_docs(np("podSelector: {matchLabels: {app: frontend}}\ningress: [{from: [{podSelector: {}}], ports: [{port: 80}]}]"), cilium)
    assert pmap.direction("default/frontend", PolicyDirection.INGRESS).enforced
    assert verdict(pmap, "default/backend", "default/frontend", 80) == "ALLOWED"
    assert verdict(pmap, "8.8.8.8", "default/frontend", 443) == "ALLOWED"
    assert verdict(pmap, "8.8.8.8", "default/frontend", 80) == "DROPPED"


ERRORS = [
    ("named-port", "podSelector: {}\ningress: [{ports: [{port: http}]}]", "spec.ingress[0].ports[0].port", "named port 'http' is not supported"),
    ("endport-without-port", "podSelector: {}\ningress: [{ports: [{endPort: 90}]}]", "spec.ingress[0].ports[0].endPort", "needs a numeric port"),
    ("endport-below-port", "podSelector: {}\ningress: [{ports: [{port: 90, endPort: 80}]}]", "spec.ingress[0].ports[0].endPort", "must be between"),
    ("bad-protocol", "podSelector: {}\ningress: [{ports: [{protocol: ICMP, port: 1}]}]", "spec.ingress[0].ports[0].protocol", "unsupported protocol"),
    ("ipblock-and-pods", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]", "spec.ingress[0].from[0]", "cannot be combined"),
    ("empty-peer", "podSelector: {}\negress: [{to: [{}]}]", "spec.egress[0].to[0]", "a peer needs podSelector"),
    ("bad-except", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/8]}}]}]", "spec.ingress[0].from[0].ipBlock.except[0]", "does not contain"),
    ("bad-policy-type", "podSelector: {}\npolicyTypes: [Both]", "spec.policyTypes[0]", "unknown policy type"),
    ("typo", "podSelector: {}\ningres: []", "spec.ingres", 'unknown field "ingres"'),
    ("missing-pod-selector", "ingress: [{}]", "spec.podSelector", "spec.podSelector is required"),
    ("prefixed-key", "podSelector: {matchLabels: {'k8s:app': x}}", "spec.podSelector", "takes plain keys"),
]


@pytest.mark.parametrize(("spec", "path", "message"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_errors(spec: str, path: str, message: str) -> None:
    """Invalid NetworkPolicies are located errors naming the NetworkPolicy's own field paths."""
    errors = [str(e) for e in load_policies(np(spec), "np.yaml").errors]
    assert len(errors) == 1, errors
    assert f": default/np: {path}: " in errors[0], errors[0]
    assert message in errors[0]


def test_same_name_as_a_cnp_is_not_a_duplicate() -> None:
    """A NetworkPolicy and a CiliumNetworkPolicy are different kinds: the same ns/name is allowed for both."""
    cilium = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: np}\nspec: {endpointSelector: {}, ingress: [{}]}\n"
    result = load_policies(np("podSelector: {}") + "---\n" + cilium, "both.yaml")
    assert not result.errors, [str(e) for e in result.errors]
    assert [p.kind for p in result.policies] == ["NetworkPolicy", "CiliumNetworkPolicy"]
