"""Merging is order-independent: any list of rules compiles to the same verdicts in any order.

| case                                                  | test                               |
|-------------------------------------------------------|------------------------------------|
| random allow/deny/L4/L7 rules, list and its reverse    | test_rule_order_never_matters      |
| random rules, any permutation of the policy objects    | test_policy_order_never_matters    |
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from membrane.policies import L4Proto, PolicyDirection, PolicyMap, compile_policy, parse_endpoints

from tests.policies.util import ENDPOINTS, cnp, http, policies

_peers = st.sampled_from([
    "fromEndpoints: [{matchLabels: {app: backend}}]",
    "fromEndpoints: [{matchLabels: {env: prod}}]",
    "fromEndpoints: [{}]",
    "fromEndpoints: []",
    "fromEntities: [world]",
    "fromEntities: [cluster]",
    "fromCIDR: [8.0.0.0/8]",
    "",
])
_ports = st.sampled_from([
    "",
    "toPorts: [{ports: [{port: '80', protocol: TCP}]}]",
    "toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{method: GET}]}}]",
    "toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{path: /x}]}}]",
    "toPorts: [{ports: [{port: '70', endPort: 90, protocol: ANY}]}]",
    "toPorts: [{ports: [{port: '0', protocol: UDP}]}]",
])


def _entry_text(deny: bool, peer: str, ports: str) -> tuple[bool, str]:
    if deny and "rules" in ports:  # deny entries carry no L7 rules
        ports = "toPorts: [{ports: [{port: '80', protocol: TCP}]}]"
    return deny, "{" + ", ".join(x for x in (peer, ports) if x) + "}"


_entry = st.builds(_entry_text, st.booleans(), _peers, _ports)

SUBJECT = "endpointSelector: {matchLabels: {app: frontend}}"
PORTS = [(53, L4Proto.UDP), (70, L4Proto.TCP), (80, L4Proto.TCP), (80, L4Proto.UDP), (443, L4Proto.TCP)]


def _doc(name: str, entries: list[tuple[bool, str]]) -> str:
    allow = [e for deny, e in entries if not deny]
    deny = [e for d, e in entries if d]
    lines = [SUBJECT]
    if allow:
        lines.append("ingress: [" + ", ".join(allow) + "]")
    if deny:
        lines.append("ingressDeny: [" + ", ".join(deny) + "]")
    if not allow and not deny:
        lines.append("ingress: [{}]")
    return cnp(name, "\n".join(lines))


def _table(pmap: PolicyMap) -> list[tuple[str, str | None, tuple[str, ...]]]:
    dp = pmap.direction("default/frontend", PolicyDirection.INGRESS)
    out = []
    for ident in pmap.identities:
        for port, proto in PORTS:
            v = dp.lookup(ident.id, port, proto)
            l7 = None
            if v.rules is not None:
                l7 = ",".join(str(v.rules.evaluate(r).allowed) for r in (http("GET", "/"), http("POST", "/x"), http("PUT", "/y")))
            out.append((v.kind.value, l7, tuple(sorted(v.matched))))
    return out


_ENDPOINTS = parse_endpoints(ENDPOINTS)


@settings(max_examples=60)
@given(entries=st.lists(_entry, min_size=1, max_size=6))
def test_rule_order_never_matters(entries: list[tuple[bool, str]]) -> None:
    """A rule list and its reverse, in one policy, give the same verdict for every peer and port."""
    forward = compile_policy(policies(_doc("p", entries)), _ENDPOINTS)
    backward = compile_policy(policies(_doc("p", entries[::-1])), _ENDPOINTS)
    assert _strip_index(_table(forward)) == _strip_index(_table(backward))


def _strip_index(table: list[tuple[str, str | None, tuple[str, ...]]]) -> list[tuple[str, str | None, int]]:
    # Rule references name list positions, which reversing changes; compare how many rules decided.
    return [(kind, l7, len(refs)) for kind, l7, refs in table]


@settings(max_examples=40)
@given(groups=st.lists(st.lists(_entry, min_size=1, max_size=3), min_size=2, max_size=4), data=st.data())
def test_policy_order_never_matters(groups: list[list[tuple[bool, str]]], data: st.DataObject) -> None:
    """Several policy objects compile to the same verdicts (and the same deciding rules) in any order."""
    docs = [_doc(f"p{i}", g) for i, g in enumerate(groups)]
    shuffled = data.draw(st.permutations(docs))
    a = compile_policy(policies(*docs), _ENDPOINTS)
    b = compile_policy(policies(*shuffled), _ENDPOINTS)
    assert _table(a) == _table(b)
