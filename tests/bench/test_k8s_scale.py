"""The scale benchmark's seeded cluster (bench/k8s_scale.py) is the cluster it claims to be.

| fact                                                   | checked by                          |
|--------------------------------------------------------|-------------------------------------|
| object counts: pods, nodes, namespaces, CNPs           | counting the generator's output     |
| pods per node: `local_pods` here, the rest spread evenly | counting spec.nodeName              |
| every CNP is valid, the kinds mix is the documented one | parse_policy on each, rule shapes   |
| every edit (`revision`) really changes the CNP         | comparing specs of revisions        |
| BPF entries agree with lookups on the bench's policies  | compile, entries() vs lookup()      |
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
from membrane.control.sources.kubernetes import pod_endpoint
from membrane.policies import (
    Endpoints,
    L4Proto,
    MapEntry,
    Namespace,
    PolicyDirection,
    VerdictKind,
    compile_policy,
    parse_policy,
)

BENCH = Path(__file__).resolve().parents[2] / "bench" / "k8s_scale.py"


@pytest.fixture(scope="module")
def scale() -> ModuleType:
    spec = importlib.util.spec_from_file_location("k8s_scale", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["k8s_scale"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_the_default_cluster_has_the_intended_object_counts(scale: ModuleType) -> None:
    objs = list(scale.cluster(scale.Shape()))
    kinds = Counter(o["kind"] for o in objs)
    assert kinds["Pod"] == 5000
    assert kinds["Node"] == 100
    assert kinds["Namespace"] == 101  # 100 labelled + kube-system
    assert kinds["CiliumNetworkPolicy"] == 500
    assert len({o["metadata"]["namespace"] for o in objs if o["kind"] == "CiliumNetworkPolicy"}) == 100


def test_this_node_holds_local_pods_and_the_others_share_the_rest(scale: ModuleType) -> None:
    shape = scale.Shape()
    per_node = Counter(o["spec"]["nodeName"] for o in scale.cluster(shape) if o["kind"] == "Pod")
    assert per_node[scale.THIS_NODE] == 50
    others = [n for node, n in per_node.items() if node != scale.THIS_NODE]
    assert len(others) == 99
    assert max(others) - min(others) <= 1


def test_pod_ips_are_unique_and_pods_share_label_sets(scale: ModuleType) -> None:
    shape = scale.Shape()
    pods = [o for o in scale.cluster(shape) if o["kind"] == "Pod"]
    assert len({p["status"]["podIP"] for p in pods}) == len(pods)
    eps = [pod_endpoint(p, {}, set()) for p in pods]
    assert all(ep is not None for ep in eps)
    label_sets = {ep.label_set for ep in eps if ep is not None}
    assert len(label_sets) == 1000  # 100 namespaces x 10 deployments: replicas share an identity


def test_every_cnp_is_valid_and_the_kinds_are_mixed(scale: ModuleType) -> None:
    shape = scale.Shape()
    policies = [parse_policy(o, source=o["metadata"]["name"]) for o in scale.cluster(shape)
                if o["kind"] == "CiliumNetworkPolicy"]
    rules = [r for p in policies for r in p.rules]
    with_http = [r for r in rules if any(pr.rules is not None and pr.rules.http for e in r.ingress for pr in e.to_ports)]
    with_fqdns = [r for r in rules if any(e.fqdns for e in r.egress)]
    with_deny = [r for r in rules if r.ingress_deny]
    with_dns = [r for r in rules if any(pr.rules is not None and pr.rules.dns for e in r.egress for pr in e.to_ports)]
    assert len(with_http) == 100
    assert len(with_fqdns) == 25
    assert len(with_deny) == 50
    assert len(with_dns) == 75


def test_every_revision_changes_every_cnp(scale: ModuleType) -> None:
    """An edit that left a CNP as it was would send no watch event: the benchmark would wait forever."""
    shape = scale.Shape(cnps=40)
    for i in range(40):
        specs = [scale.cnp(shape, i, revision=r)["spec"] for r in range(6)]
        assert all(specs[a] != specs[b] for a in range(6) for b in range(a + 1, 6)), f"cnp {i}"


def test_bpf_entries_agree_with_lookups_on_the_bench_policies(scale: ModuleType) -> None:
    """entries() (grouped by identically-matched peers) against lookup() for every peer, at every port
    where any entry starts or ends: a MapEntry's verdict where one covers the port, else the default."""
    shape = scale.Shape(pods=300, nodes=10, local_pods=6, namespaces=10, cnps=60)
    objs = list(scale.cluster(shape))
    ns_labels = {o["metadata"]["name"]: o["metadata"]["labels"] for o in objs if o["kind"] == "Namespace"}
    seen: set[str] = set()
    eps = [ep for o in objs if o["kind"] == "Pod" and (ep := pod_endpoint(o, ns_labels, seen)) is not None]
    endpoints = Endpoints(namespaces=tuple(Namespace(name=n, labels=ls) for n, ls in ns_labels.items()), endpoints=tuple(eps))
    policies = [parse_policy(o) for o in objs if o["kind"] == "CiliumNetworkPolicy"]
    pmap = compile_policy(policies, endpoints, {"api7.partner.example": ["192.0.2.7"], "x.cdn.example.net": ["192.0.2.8"]})
    subjects = list({ep.label_set: ep.key for ep in eps}.values())  # one endpoint per identity
    checked = 0
    verdicts: set[VerdictKind] = set()
    for key in subjects:
        for direction in PolicyDirection:
            dp = pmap.direction(key, direction)
            entries = dp.entries()
            by_peer: dict[tuple[int, L4Proto], list[MapEntry]] = {}
            for e in entries:
                by_peer.setdefault((e.identity, e.proto), []).append(e)
                verdicts.add(e.verdict)
            ports = sorted({0, 53, 443, 8080, 65535} | {p for e in entries for p in (e.port, e.end_port, e.end_port + 1)} - {65536})
            for ident in pmap.identities:
                for proto in (L4Proto.TCP, L4Proto.UDP):
                    mine = by_peer.get((ident.id, proto), [])
                    for port in ports:
                        covering = [e for e in mine if e.port <= port <= e.end_port]
                        assert len(covering) <= 1
                        want = covering[0].verdict if covering else dp.default
                        got = dp.lookup(ident.id, port, proto).kind
                        assert got is want, f"{key} {direction.value} identity {ident.id} {proto.value}/{port}"
                        checked += 1
    assert checked > 100_000
    assert verdicts == {VerdictKind.ALLOW, VerdictKind.REDIRECT}  # deny is the default: never an entry
