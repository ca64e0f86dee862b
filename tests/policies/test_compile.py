"""Compiled policy semantics: enforcement, union of allows, deny precedence, wildcarding, scoping,
entities, CIDR, toFQDNs, identities and the BPF-facing enumeration.

| rule                                             | test                                        |
|--------------------------------------------------|---------------------------------------------|
| selected endpoint is default-deny for the direction | test_default_deny_once_selected            |
| allows are a union, in any order                 | test_union_of_allows_both_orders            |
| deny wins over allow (L3 and L4), in any order   | test_deny_wins_both_orders                  |
| L3/L4-only allow voids that peer's L7 rules      | test_wildcarding_both_orders                |
| CNP peers namespace-scoped, CCNP cluster-wide     | test_cnp_vs_ccnp_peer_scope                 |
| fromEndpoints [] vs [{}]                         | test_empty_vs_wildcard_selector             |
| entities                                         | test_entities                               |
| CIDR with except                                 | test_cidr_except                            |
| toFQDNs selects learned IPs                      | test_to_fqdns                               |
| enableDefaultDeny false                          | test_enable_default_deny_false              |
| enableDefaultDeny false + L7 = visibility only   | test_default_deny_off_makes_l7_visibility_only |
| identities: reserved numbers, stable allocation  | test_identities                             |
"""

from __future__ import annotations

import pytest
from membrane.policies import (
    L4Proto,
    ParserType,
    PolicyDirection,
    ReservedIdentity,
    VerdictKind,
    compile_policy,
    parse_endpoints,
)
from membrane.policies.identity import LOCAL_IDENTITY_BASE, MAX_ENDPOINT_IDENTITY, MIN_ENDPOINT_IDENTITY

from tests.policies.util import ENDPOINTS, ccnp, cnp, compile_docs, dns, http, policies, verdict

FRONTEND = "default/frontend"
BACKEND = "default/backend"
DEBUG = "default/debug"
OTHER_BACKEND = "other/backend"

HTTP_RULE = cnp(
    "l7",
    """
    endpointSelector: {matchLabels: {app: frontend}}
    ingress:
      - fromEndpoints: [{matchLabels: {app: backend}}]
        toPorts:
          - ports: [{port: "80", protocol: TCP}]
            rules: {http: [{method: GET, path: /api}]}
    """,
)


def test_default_deny_once_selected() -> None:
    """An endpoint selected by a rule with ingress entries drops what no rule allows; others stay open."""
    pmap = compile_docs(HTTP_RULE)
    assert pmap.direction(FRONTEND, PolicyDirection.INGRESS).enforced
    assert not pmap.direction(FRONTEND, PolicyDirection.EGRESS).enforced
    assert not pmap.direction(BACKEND, PolicyDirection.INGRESS).enforced
    assert verdict(pmap, DEBUG, FRONTEND, 80) == "DROPPED"
    assert verdict(pmap, BACKEND, FRONTEND, 81) == "DROPPED"
    assert verdict(pmap, BACKEND, FRONTEND, 80, "UDP") == "DROPPED"
    assert verdict(pmap, FRONTEND, BACKEND, 80) == "ALLOWED"
    assert verdict(pmap, BACKEND, FRONTEND, 80, request=http("GET", "/api")) == "ALLOWED"
    assert verdict(pmap, BACKEND, FRONTEND, 80, request=http("GET", "/api/x")) == "L7_DENIED"


UNION_A = cnp("a", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [{matchLabels: {app: backend}}], toPorts: [{ports: [{port: '80', protocol: TCP}]}]}]")
UNION_B = cnp("b", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [{matchLabels: {app: debug}}], toPorts: [{ports: [{port: '8000', endPort: 8100, protocol: TCP}]}]}]")


@pytest.mark.parametrize("docs", [(UNION_A, UNION_B), (UNION_B, UNION_A)], ids=["a,b", "b,a"])
def test_union_of_allows_both_orders(docs: tuple[str, str]) -> None:
    """Allows from several policies add up; the result does not depend on their order."""
    pmap = compile_docs(*docs)
    assert verdict(pmap, BACKEND, FRONTEND, 80) == "ALLOWED"
    assert verdict(pmap, DEBUG, FRONTEND, 8050) == "ALLOWED"
    assert verdict(pmap, DEBUG, FRONTEND, 8100) == "ALLOWED"
    assert verdict(pmap, DEBUG, FRONTEND, 8101) == "DROPPED"
    assert verdict(pmap, DEBUG, FRONTEND, 80) == "DROPPED"
    assert verdict(pmap, BACKEND, FRONTEND, 8050) == "DROPPED"


ALLOW_ALL = cnp("allow-all", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEntities: [all]}]")
DENY_L3 = cnp("deny-debug", "endpointSelector: {matchLabels: {app: frontend}}\ningressDeny: [{fromEndpoints: [{matchLabels: {app: debug}}]}]")
DENY_L4 = cnp("deny-8080", "endpointSelector: {matchLabels: {app: frontend}}\ningressDeny: [{toPorts: [{ports: [{port: '8080', protocol: TCP}]}]}]")


@pytest.mark.parametrize(
    "docs",
    [(ALLOW_ALL, DENY_L3, DENY_L4, HTTP_RULE), (HTTP_RULE, DENY_L4, DENY_L3, ALLOW_ALL)],
    ids=["allow-first", "deny-first"],
)
def test_deny_wins_both_orders(docs: tuple[str, ...]) -> None:
    """A deny entry covering (peer, port) drops the flow even where allows (L3, L4 or L7) cover it."""
    pmap = compile_docs(*docs)
    assert verdict(pmap, DEBUG, FRONTEND, 80) == "DROPPED"
    assert verdict(pmap, BACKEND, FRONTEND, 8080) == "DROPPED"
    assert verdict(pmap, BACKEND, FRONTEND, 8081) == "ALLOWED"
    res = pmap.lookup(FRONTEND, PolicyDirection.INGRESS, pmap.endpoint_identity[DEBUG], 80, L4Proto.TCP)
    assert res.kind is VerdictKind.DROP
    assert res.matched == ("default/deny-debug: ingressDeny[0]",)


def test_deny_applies_without_default_deny() -> None:
    """Deny entries apply even when enableDefaultDeny turns default deny off for the direction."""
    pmap = compile_docs(
        cnp("d", "endpointSelector: {matchLabels: {app: frontend}}\nenableDefaultDeny: {ingress: false}\ningressDeny: [{fromEndpoints: [{matchLabels: {app: debug}}]}]")
    )
    assert not pmap.direction(FRONTEND, PolicyDirection.INGRESS).enforced
    assert verdict(pmap, DEBUG, FRONTEND, 80) == "DROPPED"
    assert verdict(pmap, BACKEND, FRONTEND, 80) == "ALLOWED"


def test_deny_only_policy_enables_default_deny() -> None:
    """A policy with only deny entries still puts the direction into default deny (Cilium)."""
    pmap = compile_docs(DENY_L3)
    assert pmap.direction(FRONTEND, PolicyDirection.INGRESS).enforced
    assert verdict(pmap, BACKEND, FRONTEND, 80) == "DROPPED"


L4_ONLY = cnp("l4", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [{matchLabels: {app: backend}}], toPorts: [{ports: [{port: '80', protocol: TCP}]}]}]")
L3_ONLY = cnp("l3", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [{matchLabels: {env: prod}}]}]")
L3_OTHER = cnp("l3-debug", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [{matchLabels: {app: debug}}]}]")


@pytest.mark.parametrize(
    ("docs", "voided_by"),
    [
        ((HTTP_RULE, L4_ONLY), "default/l4: ingress[0].toPorts[0]"),
        ((L4_ONLY, HTTP_RULE), "default/l4: ingress[0].toPorts[0]"),
        ((HTTP_RULE, L3_ONLY), "default/l3: ingress[0]"),
        ((L3_ONLY, HTTP_RULE), "default/l3: ingress[0]"),
    ],
    ids=["l7,l4", "l4,l7", "l7,l3", "l3,l7"],
)
def test_wildcarding_both_orders(docs: tuple[str, str], voided_by: str) -> None:
    """An L3-only or L4-only allow for the same peer voids the port's L7 rules for that peer (still proxied)."""
    pmap = compile_docs(*docs)
    v = pmap.lookup(FRONTEND, PolicyDirection.INGRESS, pmap.endpoint_identity[BACKEND], 80, L4Proto.TCP)
    assert v.kind is VerdictKind.REDIRECT
    assert v.parser is ParserType.HTTP
    result = verdict(pmap, BACKEND, FRONTEND, 80, request=http("DELETE", "/admin"))
    assert result == "ALLOWED"
    assert v.rules is not None
    assert v.rules.evaluate(http("DELETE", "/admin")).rule == voided_by


def test_wildcarding_is_per_peer() -> None:
    """An L3-only allow for another peer does not void the L7 rules of this peer."""
    pmap = compile_docs(HTTP_RULE, L3_OTHER)
    assert verdict(pmap, BACKEND, FRONTEND, 80, request=http("DELETE", "/admin")) == "L7_DENIED"
    assert verdict(pmap, DEBUG, FRONTEND, 80, request=http("DELETE", "/admin")) == "ALLOWED"
    v = pmap.lookup(FRONTEND, PolicyDirection.INGRESS, pmap.endpoint_identity[DEBUG], 80, L4Proto.TCP)
    assert v.kind is VerdictKind.ALLOW  # not proxied: no L7 rule selects this peer


def test_http_empty_list_is_l4_and_empty_rule_allows_all() -> None:
    """`http: []` is plain L4 (no proxy); `http: [{}]` proxies and allows every request."""
    plain = compile_docs(cnp("p", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: []}}]}]"))
    v = plain.lookup(FRONTEND, PolicyDirection.INGRESS, plain.endpoint_identity[BACKEND], 80, L4Proto.TCP)
    assert v.kind is VerdictKind.ALLOW
    allow_all = compile_docs(cnp("p", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{}]}}]}]"))
    v = allow_all.lookup(FRONTEND, PolicyDirection.INGRESS, allow_all.endpoint_identity[BACKEND], 80, L4Proto.TCP)
    assert v.kind is VerdictKind.REDIRECT
    assert verdict(allow_all, BACKEND, FRONTEND, 80, request=http("PATCH", "/x?y")) == "ALLOWED"


def test_cnp_vs_ccnp_peer_scope() -> None:
    """CNP peers default to the policy's namespace; CCNP peers and namespace-label selectors are cluster-wide."""
    cnp_map = compile_docs(cnp("c", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [{matchLabels: {app: backend}}]}]"))
    assert verdict(cnp_map, BACKEND, FRONTEND, 80) == "ALLOWED"
    assert verdict(cnp_map, OTHER_BACKEND, FRONTEND, 80) == "DROPPED"
    explicit = compile_docs(cnp("c", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [{matchLabels: {app: backend, 'k8s:io.kubernetes.pod.namespace': other}}]}]"))
    assert verdict(explicit, BACKEND, FRONTEND, 80) == "DROPPED"
    assert verdict(explicit, OTHER_BACKEND, FRONTEND, 80) == "ALLOWED"
    by_ns_label = compile_docs(cnp("c", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [{matchLabels: {'k8s:io.cilium.k8s.namespace.labels.team': data}}]}]"))
    assert verdict(by_ns_label, OTHER_BACKEND, FRONTEND, 80) == "ALLOWED"
    assert verdict(by_ns_label, BACKEND, FRONTEND, 80) == "DROPPED"
    cw = compile_docs(ccnp("w", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [{matchLabels: {app: backend}}]}]"))
    assert verdict(cw, BACKEND, FRONTEND, 80) == "ALLOWED"
    assert verdict(cw, OTHER_BACKEND, FRONTEND, 80) == "ALLOWED"
    assert verdict(cw, DEBUG, FRONTEND, 80) == "DROPPED"


def test_cnp_peer_namespace_labels_without_source_are_cluster_wide() -> None:
    """getEndpointSelector skips the namespace match for `any:` (no source) namespace-label keys too (Cilium utils.go)."""
    for key in ("io.cilium.k8s.namespace.labels.team", "any:io.cilium.k8s.namespace.labels.team"):
        pmap = compile_docs(cnp("c", f"endpointSelector: {{matchLabels: {{app: frontend}}}}\ningress: [{{fromEndpoints: [{{matchLabels: {{'{key}': data}}}}]}}]"))
        assert verdict(pmap, OTHER_BACKEND, FRONTEND, 80) == "ALLOWED", key
        assert verdict(pmap, BACKEND, FRONTEND, 80) == "DROPPED", key


def test_cnp_subject_is_namespace_scoped() -> None:
    """A CNP selects only endpoints of its namespace, a CCNP those of every namespace."""
    spec = "endpointSelector: {matchLabels: {app: backend}}\ningress: [{}]"
    local = compile_docs(cnp("s", spec))
    assert local.direction(BACKEND, PolicyDirection.INGRESS).enforced
    assert not local.direction(OTHER_BACKEND, PolicyDirection.INGRESS).enforced
    cw = compile_docs(ccnp("s", spec))
    assert cw.direction(BACKEND, PolicyDirection.INGRESS).enforced
    assert cw.direction(OTHER_BACKEND, PolicyDirection.INGRESS).enforced


def test_empty_vs_wildcard_selector() -> None:
    """`fromEndpoints: []` allows nothing; `[{}]` allows the namespace (CNP) or all pods (CCNP), never world."""
    none = compile_docs(cnp("n", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [], toPorts: [{ports: [{port: '80'}]}]}]"))
    assert verdict(none, BACKEND, FRONTEND, 80) == "DROPPED"
    ns = compile_docs(cnp("n", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [{}]}]"))
    assert verdict(ns, BACKEND, FRONTEND, 80) == "ALLOWED"
    assert verdict(ns, OTHER_BACKEND, FRONTEND, 80) == "DROPPED"
    assert verdict(ns, "8.8.8.8", FRONTEND, 80) == "DROPPED"
    cw = compile_docs(ccnp("n", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [{}]}]"))
    assert verdict(cw, OTHER_BACKEND, FRONTEND, 80) == "ALLOWED"
    assert verdict(cw, "8.8.8.8", FRONTEND, 80) == "DROPPED"
    l4_any_peer = compile_docs(cnp("n", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{toPorts: [{ports: [{port: '80'}]}]}]"))
    assert verdict(l4_any_peer, "8.8.8.8", FRONTEND, 80) == "ALLOWED"
    assert verdict(l4_any_peer, OTHER_BACKEND, FRONTEND, 80, "UDP") == "ALLOWED"
    assert verdict(l4_any_peer, OTHER_BACKEND, FRONTEND, 81) == "DROPPED"


@pytest.mark.parametrize(
    ("entity", "allowed_src", "dropped_src"),
    [
        ("world", ["8.8.8.8", "2001:db8::1"], [BACKEND]),
        ("world-ipv4", ["8.8.8.8"], ["2001:db8::1", BACKEND]),
        ("world-ipv6", ["2001:db8::1"], ["8.8.8.8"]),
        ("cluster", [BACKEND, OTHER_BACKEND], ["8.8.8.8"]),
        ("all", [BACKEND, "8.8.8.8", "2001:db8::1"], []),
        ("none", [], [BACKEND, "8.8.8.8"]),
    ],
)
def test_entities(entity: str, allowed_src: list[str], dropped_src: list[str]) -> None:
    """fromEntities selects Cilium's reserved identities (and CIDR identities for world)."""
    pmap = compile_docs(cnp("e", f"endpointSelector: {{matchLabels: {{app: frontend}}}}\ningress: [{{fromEntities: [{entity}]}}]"))
    for src in allowed_src:
        assert verdict(pmap, src, FRONTEND, 443) == "ALLOWED", src
    for src in dropped_src:
        assert verdict(pmap, src, FRONTEND, 443) == "DROPPED", src


@pytest.mark.parametrize("entity", ["host", "remote-node", "health", "init", "unmanaged", "kube-apiserver", "ingress"])
def test_reserved_entities_select_their_identity(entity: str) -> None:
    """Each reserved entity selects exactly its reserved identity; `cluster` includes it, `world` does not."""
    pmap = compile_docs(cnp("e", f"endpointSelector: {{matchLabels: {{app: frontend}}}}\ningress: [{{fromEntities: [{entity}]}}]"))
    dp = pmap.direction(FRONTEND, PolicyDirection.INGRESS)
    ident = ReservedIdentity[entity.upper().replace("-", "_")]
    allowed = [r for r in ReservedIdentity if dp.lookup(int(r), 80, L4Proto.TCP).kind is VerdictKind.ALLOW]
    assert allowed == [ident]


def test_cidr_except() -> None:
    """toCIDRSet selects addresses inside the prefix and outside every except; pod IPs are never CIDR-selected."""
    pmap = compile_docs(
        cnp(
            "c",
            """
            endpointSelector: {matchLabels: {app: frontend}}
            egress:
              - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]
              - toCIDR: [192.0.2.7/32, "2001:db8::/32"]
                toPorts: [{ports: [{port: "443", protocol: TCP}]}]
            """,
        )
    )
    assert verdict(pmap, FRONTEND, "10.1.2.3", 80) == "ALLOWED"
    assert verdict(pmap, FRONTEND, "10.96.0.1", 80) == "DROPPED"
    assert verdict(pmap, FRONTEND, "10.111.255.255", 80) == "DROPPED"
    assert verdict(pmap, FRONTEND, "10.112.0.0", 80) == "ALLOWED"
    assert verdict(pmap, FRONTEND, "192.0.2.7", 443) == "ALLOWED"
    assert verdict(pmap, FRONTEND, "192.0.2.7", 80) == "DROPPED"
    assert verdict(pmap, FRONTEND, "2001:db8:1::5", 443) == "ALLOWED"
    assert verdict(pmap, FRONTEND, "8.8.8.8", 80) == "DROPPED"
    assert verdict(pmap, FRONTEND, BACKEND, 80) == "DROPPED"  # 10.244.1.20 is a pod, not a CIDR identity


def test_to_fqdns() -> None:
    """toFQDNs selects the IPs DNS answers gave for matching names, and nothing else."""
    spec = """
        endpointSelector: {matchLabels: {app: frontend}}
        egress:
          - toFQDNs: [{matchName: api.github.com}, {matchPattern: "*.cilium.io"}]
            toPorts: [{ports: [{port: "443", protocol: TCP}]}]
        """
    learned = {"api.github.com": ["140.82.112.5"], "docs.cilium.io.": ["104.198.14.52", "2606:4700::1"], "evil.com": ["6.6.6.6"], "sub.docs.cilium.io": ["7.7.7.7"]}
    pmap = compile_docs(cnp("f", spec), learned=learned)
    assert verdict(pmap, FRONTEND, "140.82.112.5", 443) == "ALLOWED"
    assert verdict(pmap, FRONTEND, "104.198.14.52", 443) == "ALLOWED"
    assert verdict(pmap, FRONTEND, "2606:4700::1", 443) == "ALLOWED"
    assert verdict(pmap, FRONTEND, "140.82.112.5", 80) == "DROPPED"
    assert verdict(pmap, FRONTEND, "6.6.6.6", 443) == "DROPPED"
    assert verdict(pmap, FRONTEND, "7.7.7.7", 443) == "DROPPED"  # *.cilium.io is one label deep
    assert verdict(pmap, FRONTEND, "1.1.1.1", 443) == "DROPPED"
    nothing_learned = compile_docs(cnp("f", spec))
    assert verdict(nothing_learned, FRONTEND, "140.82.112.5", 443) == "DROPPED"


def test_dns_rules_on_port_53_any() -> None:
    """DNS rules on `port 53 protocol ANY` redirect UDP and TCP to the DNS parser."""
    pmap = compile_docs(
        cnp(
            "d",
            """
            endpointSelector: {matchLabels: {app: frontend}}
            egress:
              - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}}]
                toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
            """,
        )
    )
    for proto in ("UDP", "TCP"):
        v = pmap.lookup(FRONTEND, PolicyDirection.EGRESS, pmap.endpoint_identity["kube-system/coredns"], 53, L4Proto(proto))
        assert v.kind is VerdictKind.REDIRECT
        assert v.parser is ParserType.DNS
    assert verdict(pmap, FRONTEND, "kube-system/coredns", 53, "UDP", dns("anything.example.org")) == "ALLOWED"


def test_enable_default_deny_false() -> None:
    """enableDefaultDeny.ingress=false: the policy adds its allows and L7 rules but drops nothing else."""
    pmap = compile_docs(
        cnp(
            "o",
            """
            endpointSelector: {matchLabels: {app: frontend}}
            enableDefaultDeny: {ingress: false}
            ingress:
              - fromEndpoints: [{matchLabels: {app: backend}}]
                toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET}]}}]
            """,
        )
    )
    assert not pmap.direction(FRONTEND, PolicyDirection.INGRESS).enforced
    assert verdict(pmap, DEBUG, FRONTEND, 80) == "ALLOWED"
    assert verdict(pmap, BACKEND, FRONTEND, 81) == "ALLOWED"
    both = compile_docs(HTTP_RULE, cnp("o", "endpointSelector: {matchLabels: {app: frontend}}\nenableDefaultDeny: {ingress: false}\ningress: [{fromEndpoints: [{matchLabels: {app: debug}}]}]"))
    assert both.direction(FRONTEND, PolicyDirection.INGRESS).enforced  # another rule still enforces


VISIBILITY = cnp(
    "vis",
    """
    endpointSelector: {matchLabels: {app: frontend}}
    enableDefaultDeny: {ingress: false}
    ingress:
      - fromEndpoints: [{matchLabels: {app: backend}}]
        toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET}]}}]
    """,
)


@pytest.mark.parametrize("order", ["vis-first", "vis-last"])
def test_default_deny_off_makes_l7_visibility_only(order: str) -> None:
    """enableDefaultDeny false + L7 rules, and no rule turning default deny on: every request on the port is
    redirected, recorded and allowed (Cilium pkg/policy/l4.go ensureWildcard, PR #38841); with another
    rule enforcing the direction, the L7 rules judge again. Both rule orders give the same result."""
    pmap = compile_docs(VISIBILITY)
    unmatched = flow_result = None
    for peer in (BACKEND, DEBUG, "8.8.8.8"):
        v = pmap.lookup(FRONTEND, PolicyDirection.INGRESS, pmap.peer_from_endpoint(peer).identity if "/" in peer else 2, 80, L4Proto.TCP)
        assert v.kind is VerdictKind.REDIRECT, peer
    unmatched = verdict(pmap, BACKEND, FRONTEND, 80, request=http("POST", "/"))
    assert unmatched == "ALLOWED"
    from tests.policies.util import flow

    flow_result = flow(pmap, DEBUG, FRONTEND, 80, request=http("DELETE", "/x"))
    assert flow_result.verdict.value == "ALLOWED"
    assert flow_result.ingress.l7 is ParserType.HTTP
    assert any("visibility" in m for m in flow_result.ingress.matched)
    matched_rule = flow(pmap, BACKEND, FRONTEND, 80, request=http("GET", "/")).ingress.matched
    assert "default/vis: ingress[0].toPorts[0].rules.http[0]" in matched_rule
    enforcing = cnp("enf", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [{matchLabels: {app: debug}}]}]")
    docs = (VISIBILITY, enforcing) if order == "vis-first" else (enforcing, VISIBILITY)
    enforced = compile_docs(*docs)
    assert verdict(enforced, BACKEND, FRONTEND, 80, request=http("POST", "/")) == "L7_DENIED"
    assert verdict(enforced, BACKEND, FRONTEND, 80, request=http("GET", "/")) == "ALLOWED"
    assert verdict(enforced, DEBUG, FRONTEND, 80, request=http("POST", "/")) == "ALLOWED"


def test_egress_and_ingress_both_judged() -> None:
    """A flow between two endpoints needs the source's egress and the destination's ingress."""
    egress_block = cnp("eg", "endpointSelector: {matchLabels: {app: backend}}\negress: [{toEndpoints: [{matchLabels: {app: db}}]}]")
    pmap = compile_docs(HTTP_RULE, egress_block)
    result = verdict(pmap, BACKEND, FRONTEND, 80, request=http("GET", "/api"))
    assert result == "DROPPED"  # backend's egress allows only app=db (in its namespace)


def test_identities() -> None:
    """Reserved identities use Cilium's numbers; label-set identities are >= 256 and stable; CIDRs are local (1<<24+)."""
    docs = (cnp("c", "endpointSelector: {}\negress: [{toCIDR: [192.0.2.0/24]}]"),)
    a = compile_docs(*docs)
    b = compile_docs(*docs)
    assert {r.name: int(r) for r in ReservedIdentity} == {
        "HOST": 1, "WORLD": 2, "UNMANAGED": 3, "HEALTH": 4, "INIT": 5, "REMOTE_NODE": 6,
        "KUBE_APISERVER": 7, "INGRESS": 8, "WORLD_IPV4": 9, "WORLD_IPV6": 10,
    }
    assert a.endpoint_identity == b.endpoint_identity
    assert all(MIN_ENDPOINT_IDENTITY <= n <= MAX_ENDPOINT_IDENTITY for n in a.endpoint_identity.values())
    assert len(set(a.endpoint_identity.values())) == len(a.endpoint_identity)
    cidr = a.ipcache.lookup("192.0.2.9")
    assert cidr >= LOCAL_IDENTITY_BASE
    assert cidr == b.ipcache.lookup("192.0.2.9")
    assert a.ipcache.lookup("8.8.8.8") == ReservedIdentity.WORLD_IPV4
    assert a.ipcache.lookup("2001:db8::1") == ReservedIdentity.WORLD_IPV6
    assert a.ipcache.lookup("10.244.1.10") == a.endpoint_identity[FRONTEND]
    # Pods with the same labels share an identity; adding an unrelated pod keeps existing numbers.
    more = ENDPOINTS + "  - {name: extra, namespace: default, labels: {app: extra}, ips: [10.244.9.9]}\n"
    c = compile_policy(policies(*docs), parse_endpoints(more))
    assert all(c.endpoint_identity[k] == v for k, v in a.endpoint_identity.items())


def test_map_entries_enumerate_resolved_verdicts() -> None:
    """entries() lists non-default (identity, proto, port range) verdicts, with deny carved out of allows."""
    pmap = compile_docs(HTTP_RULE, DENY_L4, cnp("r", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [{matchLabels: {app: debug}}], toPorts: [{ports: [{port: '8000', endPort: 9000, protocol: TCP}]}]}]"))
    dp = pmap.direction(FRONTEND, PolicyDirection.INGRESS)
    entries = {(e.identity, e.proto, e.port, e.end_port, e.verdict) for e in dp.entries()}
    backend, debug = pmap.endpoint_identity[BACKEND], pmap.endpoint_identity[DEBUG]
    assert (backend, L4Proto.TCP, 80, 80, VerdictKind.REDIRECT) in entries
    assert (debug, L4Proto.TCP, 8000, 8079, VerdictKind.ALLOW) in entries
    assert (debug, L4Proto.TCP, 8081, 9000, VerdictKind.ALLOW) in entries
    assert not any(e[1] is L4Proto.UDP for e in entries)
    assert dp.default is VerdictKind.DROP


def test_conflicting_parsers_are_reported_and_fail_closed() -> None:
    """Two L7 parsers on one port for one peer: a PolicyConflictError, and that peer is dropped."""
    kafka = cnp("k", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [{matchLabels: {app: backend}}], toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {kafka: [{}]}}]}]")
    pmap = compile_docs(HTTP_RULE, kafka)
    assert pmap.errors
    assert "conflicting L7 parsers" in str(pmap.errors[0])
    assert verdict(pmap, BACKEND, FRONTEND, 80, request=http("GET", "/api")) == "DROPPED"


def test_reserved_label_selectors() -> None:
    """fromEndpoints with `reserved:` labels select reserved identities, unscoped (e.g. reserved:world, reserved:host)."""
    pmap = compile_docs(
        cnp("r", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{fromEndpoints: [{matchLabels: {'reserved:world': ''}}, {matchLabels: {'reserved:host': ''}}]}]")
    )
    assert verdict(pmap, "8.8.8.8", FRONTEND, 80) == "ALLOWED"
    assert verdict(pmap, "2001:db8::1", FRONTEND, 80) == "ALLOWED"
    assert verdict(pmap, BACKEND, FRONTEND, 80) == "DROPPED"
    dp = pmap.direction(FRONTEND, PolicyDirection.INGRESS)
    assert dp.lookup(int(ReservedIdentity.HOST), 80, L4Proto.TCP).kind is VerdictKind.ALLOW
    assert dp.lookup(int(ReservedIdentity.REMOTE_NODE), 80, L4Proto.TCP).kind is VerdictKind.DROP


def test_peer_from_ip_and_unknown_identity() -> None:
    """IPs resolve to their endpoint; an identity unknown to the map matches only wildcard peers (fail closed)."""
    pmap = compile_docs(HTTP_RULE, cnp("w", "endpointSelector: {matchLabels: {app: frontend}}\ningress: [{toPorts: [{ports: [{port: '443', protocol: TCP}]}]}]"))
    assert pmap.peer_from_ip("10.244.1.20").endpoint == BACKEND
    assert pmap.peer_from_ip("10.244.99.1").endpoint is None
    dp = pmap.direction(FRONTEND, PolicyDirection.INGRESS)
    assert dp.lookup(123456, 80, L4Proto.TCP).kind is VerdictKind.DROP
    assert dp.lookup(123456, 443, L4Proto.TCP).kind is VerdictKind.ALLOW
    unknown = pmap.direction("default/nobody", PolicyDirection.INGRESS)
    assert not unknown.enforced
    assert unknown.lookup(1, 1, L4Proto.TCP).kind is VerdictKind.ALLOW


def test_empty_l7_rules_compile_to_plain_l4() -> None:
    """`rules: {http: []}` on a port without protocol allows that port on TCP, UDP and SCTP, unproxied."""
    pmap = compile_docs(cnp("l4", 'endpointSelector: {matchLabels: {app: frontend}}\ningress: [{toPorts: [{ports: [{port: "80"}], rules: {http: []}}]}]'))
    for proto in ("TCP", "UDP", "SCTP"):
        v = pmap.lookup(FRONTEND, PolicyDirection.INGRESS, pmap.endpoint_identity[DEBUG], 80, L4Proto(proto))
        assert v.kind is VerdictKind.ALLOW, proto
    assert verdict(pmap, DEBUG, FRONTEND, 81) == "DROPPED"
