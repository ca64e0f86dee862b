"""control/plan.py: how a compiled policy becomes BPF map content (`plan_kernel`), pure, without a kernel.

Case table (examples/policies + examples/endpoints.yaml, frontend on ifindex 11, backend 12, debug 13):
| endpoint  | direction | expectation                                                          |
| frontend  | ingress   | enforced; backend's identity on 80/TCP -> REDIRECT; nothing else      |
| backend   | both      | not enforced; no keys                                                |
| ipcache   |           | each local endpoint IP carries its ifindex; others ifindex 0; world  |
| ranges    |           | 1-65535 -> ANY_PORT; a short range expands; a huge one is a problem  |
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from membrane.bpf import maps as bm
from membrane.control.drops import drop_flow
from membrane.control.plan import MAX_EXPANDED_PORTS, plan_kernel
from membrane.control.sources.files import read_endpoints, read_policies
from membrane.policies import PolicyMap, compile_policy

ROOT = Path(__file__).resolve().parents[2]  # the repository (examples/)
ATTACHED = {"default/frontend": 11, "default/backend": 12, "default/debug": 13}
IDS = {"default/frontend": 1, "default/backend": 2, "default/debug": 3}


def _pmap(policy_text: str | None = None, tmp_path: Path | None = None) -> PolicyMap:
    paths = [str(ROOT / "examples" / "policies")]
    if policy_text is not None and tmp_path is not None:
        p = tmp_path / "extra.yaml"
        p.write_text(policy_text)
        paths = [str(p)]
    loaded = read_policies(paths)
    assert not loaded.errors
    return compile_policy(loaded.policies, read_endpoints(str(ROOT / "examples" / "endpoints.yaml")))


def test_seed_example_redirects_backend_to_frontend_port_80() -> None:
    """The seed example (frontend accepts GET /api from backend on 80) is one REDIRECT key on frontend's ingress."""
    pmap = _pmap()
    plan = plan_kernel(pmap, ATTACHED, IDS)
    backend = pmap.identity_of("default/backend")
    assert plan.ingress == {
        bm.PolicyKey(endpoint_id=1, identity=backend, port=80, proto=bm.IPPROTO_TCP): bm.PolicyEntry(verdict=bm.Verdict.REDIRECT)
    }
    assert plan.egress == {}
    assert plan.endpoints[11] == bm.Endpoint(endpoint_id=1, identity=pmap.identity_of("default/frontend"), enforce_ingress=True)
    assert plan.endpoints[12] == bm.Endpoint(endpoint_id=2, identity=backend)
    assert plan.redirect_ports == frozenset({80})


def test_ipcache_carries_ifindex_of_local_endpoints_only() -> None:
    """Anti-spoofing needs each attached endpoint's address mapped to its own veth; remote ones map to ifindex 0."""
    pmap = _pmap()
    plan = plan_kernel(pmap, ATTACHED, IDS)
    assert plan.identities[ipaddress.ip_network("10.244.1.10/32")] == (pmap.identity_of("default/frontend"), 11)
    assert plan.identities[ipaddress.ip_network("10.244.2.10/32")] == (pmap.identity_of("default/greeter"), 0)
    assert plan.identities[ipaddress.ip_network("0.0.0.0/0")] == (9, 0)  # world-ipv4


RANGES = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ranges, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  egress:
    - toEndpoints: [{matchLabels: {app: backend}}]
      toPorts: [{ports: [{port: "8000", endPort: 8002, protocol: TCP}]}]
    - toEndpoints: [{matchLabels: {app: debug}}]
    - toCIDR: [192.0.2.0/24]
      toPorts: [{ports: [{port: "1024", endPort: 65000, protocol: UDP}]}]
"""


def test_port_ranges_expand_and_overwide_ranges_fail_closed(tmp_path: Path) -> None:
    """A short range becomes one key per port, an all-ports allow one ANY_PORT key, and an overwide range is reported and left out (dropped)."""
    pmap = _pmap(RANGES, tmp_path)
    plan = plan_kernel(pmap, ATTACHED, IDS)
    backend, debug = pmap.identity_of("default/backend"), pmap.identity_of("default/debug")
    pass_ = bm.PolicyEntry(verdict=bm.Verdict.PASS)
    for port in (8000, 8001, 8002):
        assert plan.egress[bm.PolicyKey(endpoint_id=1, identity=backend, port=port, proto=bm.IPPROTO_TCP)] == pass_
    assert bm.PolicyKey(endpoint_id=1, identity=backend, port=8003, proto=bm.IPPROTO_TCP) not in plan.egress
    # an L3-only allow is one key for every protocol (ICMP and GRE included), none per protocol
    assert plan.egress[bm.PolicyKey(endpoint_id=1, identity=debug)] == pass_
    assert not [k for k in plan.egress if k.identity == debug and k.proto != bm.ANY_PROTO]
    assert MAX_EXPANDED_PORTS < 65000 - 1024 + 1
    assert len(plan.problems) == 1
    assert "1024-65000" in plan.problems[0]
    assert plan.endpoints[11].enforce_egress
    assert not plan.endpoints[11].enforce_ingress


@pytest.mark.parametrize(
    ("reason", "direction", "desc", "own"),
    [
        (bm.DropReason.INGRESS_DENIED, "INGRESS", "POLICY_DENIED", "ingress_denied"),
        (bm.DropReason.EGRESS_DENIED, "EGRESS", "POLICY_DENIED", "egress_denied"),
        (bm.DropReason.SPOOFED, "EGRESS", "INVALID_SOURCE_IP", "spoofed"),
    ],
)
def test_kernel_drop_record_uses_hubble_drop_reasons(reason: bm.DropReason, direction: str, desc: str, own: str) -> None:
    """A kernel policy drop is Hubble's L3_L4 record with `drop_reason_desc: POLICY_DENIED` either way (flow.proto
    DropReason); the way is `traffic_direction`; the kernel's own reason is in the Summary (not a flow.proto field)."""
    event = bm.DropEvent(
        src=ipaddress.ip_address("10.244.1.20"), dst=ipaddress.ip_address("10.244.1.10"), sport=40000, dport=81,
        proto=bm.IPPROTO_TCP, reason=reason, src_identity=2, dst_identity=1, ifindex=11,
    )
    record = drop_flow(_pmap(), event).to_json()
    assert record["Type"] == "L3_L4"
    assert "l7" not in record
    assert record["verdict"] == "DROPPED"
    assert record["drop_reason_desc"] == desc
    assert "membrane_reason" not in record  # not in flow.proto: the kernel's own reason stays in the Summary
    assert own in record["Summary"]
    assert record["traffic_direction"] == direction


ICMPS = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: icmps, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: backend}}]
      icmps: [{fields: [{type: EchoRequest}, {type: 128, family: IPv6}, {type: "0"}]}]
    - fromEndpoints: [{matchLabels: {app: debug}}]
  ingressDeny:
    - fromEndpoints: [{matchLabels: {app: debug}}]
      toPorts: [{ports: [{port: "22", protocol: TCP}]}]
"""


def test_icmps_are_keyed_by_type_and_l3_only_is_layered(tmp_path: Path) -> None:
    """`icmps` become (identity, icmp_port(type), ICMP/ICMPv6) keys (names resolved per family; type 0 is
    not ANY_PORT); an L3-only allow is one ANY_PROTO key, and a deny under it is written as an
    explicit DROP key, since without it the kernel would fall through to the L3-only PASS."""
    from membrane.policies import L4Proto, PolicyDirection, VerdictKind

    pmap = _pmap(ICMPS, tmp_path)
    backend, debug = pmap.identity_of("default/backend"), pmap.identity_of("default/debug")
    assert backend is not None
    assert debug is not None
    dp = pmap.direction("default/frontend", PolicyDirection.INGRESS)
    assert dp.lookup(backend, 8, L4Proto.ICMP).kind is VerdictKind.ALLOW
    assert dp.lookup(backend, 13, L4Proto.ICMP).kind is VerdictKind.DROP
    assert dp.lookup(backend, 8, L4Proto.ICMPV6).kind is VerdictKind.DROP  # 8 was IPv4 only
    assert dp.lookup(backend, 80, L4Proto.TCP).kind is VerdictKind.DROP  # icmps allow no port
    plan = plan_kernel(pmap, ATTACHED, IDS)
    pass_, drop = bm.PolicyEntry(verdict=bm.Verdict.PASS), bm.PolicyEntry(verdict=bm.Verdict.DROP)
    assert {k: v for k, v in plan.ingress.items() if k.identity == backend} == {
        bm.PolicyKey(endpoint_id=1, identity=backend, port=bm.icmp_port(8), proto=bm.IPPROTO_ICMP): pass_,
        bm.PolicyKey(endpoint_id=1, identity=backend, port=bm.icmp_port(0), proto=bm.IPPROTO_ICMP): pass_,
        bm.PolicyKey(endpoint_id=1, identity=backend, port=bm.icmp_port(128), proto=bm.IPPROTO_ICMPV6): pass_,
    }
    assert {k: v for k, v in plan.ingress.items() if k.identity == debug} == {
        bm.PolicyKey(endpoint_id=1, identity=debug): pass_,
        bm.PolicyKey(endpoint_id=1, identity=debug, port=22, proto=bm.IPPROTO_TCP): drop,
    }


def test_node_addresses_are_the_host_identity() -> None:
    """`host_ips` put the node's own addresses in the ipcache as identity 1 (host), not local endpoints;
    link-local addresses and garbage are skipped."""
    plan = plan_kernel(_pmap(), ATTACHED, IDS, ["192.0.2.7", "2001:db8::7", "fe80::1%eth0", "not-an-ip"])
    assert plan.identities[ipaddress.ip_network("192.0.2.7/32")] == (1, 0)
    assert plan.identities[ipaddress.ip_network("2001:db8::7/128")] == (1, 0)
    assert ipaddress.ip_network("fe80::1/128") not in plan.identities


DENY_HOST_SSH = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: no-host-ssh, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  ingressDeny:
    - fromEntities: [host]
      toPorts: [{ports: [{port: "22", protocol: TCP}]}]
  ingress:
    - fromEndpoints: [{matchLabels: {app: backend}}]
      toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""


def test_allow_localhost_always_is_an_l3_allow_for_host_that_a_deny_still_beats(tmp_path: Path) -> None:
    """Cilium's allow-localhost=always: every enforced ingress gets (host, any, any) PASS, and a deny for
    host is written under it as an explicit DROP; without the option host has no key (judged, dropped)."""
    from membrane.control.plan import HOST_IDENTITY
    from membrane.control.sources.files import read_endpoints, read_policies

    p = tmp_path / "deny.yaml"
    p.write_text(DENY_HOST_SSH)
    loaded = read_policies([str(p)])
    eps = read_endpoints(str(ROOT / "examples" / "endpoints.yaml"))
    judged = plan_kernel(compile_policy(loaded.policies, eps), ATTACHED, IDS)
    assert [k for k in judged.ingress if k.identity == HOST_IDENTITY] == []
    always = plan_kernel(compile_policy(loaded.policies, eps, allow_localhost=True), ATTACHED, IDS)
    assert {k: v.verdict for k, v in always.ingress.items() if k.identity == HOST_IDENTITY} == {
        bm.PolicyKey(endpoint_id=1, identity=HOST_IDENTITY): bm.Verdict.PASS,
        bm.PolicyKey(endpoint_id=1, identity=HOST_IDENTITY, port=22, proto=bm.IPPROTO_TCP): bm.Verdict.DROP,
    }
    assert [k for k in always.ingress if k.endpoint_id != 1] == []  # only enforced ingress directions get it
