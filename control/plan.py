"""The pure policy-to-kernel plan: a compiled `PolicyMap` -> the content the BPF maps should hold.

Owns the translation only (`plan_kernel`): the ipcache prefixes with their identity and host
ifindex, the per-endpoint policy keys of both directions (port ranges expanded), the endpoint
records and the ports redirected to the proxy, and the node's own addresses as the `host` identity.
Pure: no kernel, no I/O, no clock; the reconciler writes the plan. Fails closed: what cannot be
expressed is left out or written as DROP (so the kernel drops it) and named.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from membrane.bpf import maps as bm
from membrane.policies import L4Proto, PolicyDirection, PolicyMap, VerdictKind

MAX_EXPANDED_PORTS = 4096  # per map entry: a wider range than this (not 1-65535) is not expanded
_PROTOS = {
    L4Proto.TCP: bm.IPPROTO_TCP,
    L4Proto.UDP: bm.IPPROTO_UDP,
    L4Proto.SCTP: bm.IPPROTO_SCTP,
    L4Proto.ICMP: bm.IPPROTO_ICMP,
    L4Proto.ICMPV6: bm.IPPROTO_ICMPV6,
}
HOST_IDENTITY = 1  # Cilium's reserved:host: the node's own addresses


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelPlan:
    """Everything the maps should hold for one compiled policy. Pure data; `apply` writes it."""

    identities: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, tuple[int, int]]  # prefix -> (identity, ifindex)
    ingress: dict[bm.PolicyKey, bm.PolicyEntry]
    egress: dict[bm.PolicyKey, bm.PolicyEntry]
    endpoints: dict[int, bm.Endpoint]  # host ifindex -> endpoint
    redirect_ports: frozenset[int]  # destination ports of L7-redirected flows (for sockmap)
    problems: tuple[str, ...] = ()  # entries that could not be expressed (their traffic is dropped)


def _port_keys(lo: int, hi: int) -> list[int] | None:
    """The PolicyKey ports for an inclusive range; [ANY_PORT] for every port; None = too wide to expand."""
    if lo <= 1 and hi >= 65535:
        return [bm.ANY_PORT]
    lo = max(lo, 1)
    if hi - lo + 1 > MAX_EXPANDED_PORTS:
        return None
    return list(range(lo, hi + 1))


def _keys_for(proto: L4Proto, lo: int, hi: int) -> list[int] | None:
    """PolicyKey ports of a run: TCP/UDP/SCTP ports, or ICMP types as `icmp_port(type)`."""
    if proto in (L4Proto.ICMP, L4Proto.ICMPV6):
        if lo <= 0 and hi >= 255:
            return [bm.ANY_PORT]
        return [bm.icmp_port(t) for t in range(lo, hi + 1)]
    return _port_keys(lo, hi)


def host_identities(host_ips: Iterable[str]) -> dict[ipaddress.IPv4Network | ipaddress.IPv6Network, tuple[int, int]]:
    """ipcache entries for the node's own addresses: identity 1 (`host`), not a local endpoint.

    Traffic from the node itself to a pod is then judged by the pod's ingress policy as `host`
    (`fromEntities: [host]`), and a pod's traffic to the node as `toEntities: [host]`. Link-local
    addresses and unparseable strings are skipped (they never reach the ipcache)."""
    out: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, tuple[int, int]] = {}
    for ip in host_ips:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            continue
        if addr.is_link_local or addr.is_multicast or addr.is_unspecified:
            continue
        out[ipaddress.ip_network(addr)] = (HOST_IDENTITY, 0)
    return out


def _direction_keys(
    ep_id: int, dp: Any, problems: list[str], what: str
) -> tuple[dict[bm.PolicyKey, bm.PolicyEntry], set[int]]:
    """The kernel keys of one enforced direction. The kernel's per-identity lookup is layered:
    (id, port, proto) -> (id, ANY_PORT, proto) -> (id, ANY_PORT, ANY_PROTO). The last is the L3-only
    verdict (PASS under an L3-only allow, covering ICMP and GRE too); every run that differs from
    the layer below it is written, DROP included, so a deny under an L3-only allow stays a deny.
    A run that cannot be expanded is never left to a wider PASS: its protocol's ANY_PORT key becomes
    DROP (fail closed) and the run is named in `problems`."""
    keys: dict[bm.PolicyKey, bm.PolicyEntry] = {}
    redirect_ports: set[int] = set()
    values = {
        VerdictKind.ALLOW: bm.PolicyEntry(verdict=bm.Verdict.PASS),
        VerdictKind.DROP: bm.PolicyEntry(verdict=bm.Verdict.DROP),
        VerdictKind.REDIRECT: bm.PolicyEntry(verdict=bm.Verdict.REDIRECT),
    }
    for ident, l3, runs in dp.layered_entries():
        if l3 is VerdictKind.ALLOW:
            keys[bm.PolicyKey(endpoint_id=ep_id, identity=ident)] = values[VerdictKind.ALLOW]
        by_proto: dict[L4Proto, list[Any]] = {}
        for run in runs:
            by_proto.setdefault(run.proto, []).append(run)
        for proto, proto_runs in by_proto.items():
            num = _PROTOS[proto]
            base = l3  # what the layer below says for this protocol
            whole = [r for r in proto_runs if _keys_for(proto, r.port, r.end_port) == [bm.ANY_PORT]]
            if whole and whole[0].verdict is not base:
                base = whole[0].verdict
                keys[bm.PolicyKey(endpoint_id=ep_id, identity=ident, proto=num)] = values[base]
            for run in proto_runs:
                if run.verdict is base:
                    continue
                ports = _keys_for(proto, run.port, run.end_port)
                if ports is None:
                    problems.append(
                        f"{what}: ports {run.port}-{run.end_port}/{proto.value} to identity {ident} span more than "
                        f"{MAX_EXPANDED_PORTS} ports; {proto.value} to that identity is dropped where not listed"
                    )
                    if base is not VerdictKind.DROP:
                        keys[bm.PolicyKey(endpoint_id=ep_id, identity=ident, proto=num)] = values[VerdictKind.DROP]
                    continue
                for port in ports:
                    keys[bm.PolicyKey(endpoint_id=ep_id, identity=ident, port=port, proto=num)] = values[run.verdict]
                    if run.verdict is VerdictKind.REDIRECT and port:
                        redirect_ports.add(port)
    # DROP keys are only needed above a PASS layer; a DROP with nothing wider is the enforced default
    return keys, redirect_ports


def plan_kernel(
    pmap: PolicyMap,
    attached: Mapping[str, int],
    endpoint_ids: Mapping[str, int],
    host_ips: Iterable[str] = (),
) -> KernelPlan:
    """Translate a compiled policy into map content.

    `attached`: endpoint key -> host-side ifindex of the endpoints enforced on this node;
    `endpoint_ids`: endpoint key -> nonzero endpoint id (stable for the agent's lifetime);
    `host_ips`: the node's own addresses, mapped to the `host` identity (`host_identities`).
    Returns the plan. Never raises; an entry that cannot be expressed (a range wider than
    MAX_EXPANDED_PORTS) is left out or made DROP, so the kernel drops that traffic (fail closed),
    and is named in `problems`. ICMP types are keyed as `bpf.maps.icmp_port(type)`.
    """
    identities: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, tuple[int, int]] = {}
    for net, ident in pmap.ipcache.entries().items():
        identities[net] = (ident, 0)
    identities.update(host_identities(host_ips))
    for key, idx in attached.items():
        ep = pmap.endpoints.get(key)
        ep_ident = pmap.identity_of(key)
        if ep is None or ep_ident is None:
            continue
        for ip in ep.ips:
            identities[ipaddress.ip_network(ip)] = (ep_ident, idx)
    policy: dict[PolicyDirection, dict[bm.PolicyKey, bm.PolicyEntry]] = {d: {} for d in PolicyDirection}
    endpoints: dict[int, bm.Endpoint] = {}
    redirect_ports: set[int] = set()
    problems: list[str] = []
    for key, idx in sorted(attached.items()):
        subject = pmap.identity_of(key)
        if subject is None:
            continue
        ep_id = endpoint_ids[key]
        enforced = {}
        for direction in PolicyDirection:
            dp = pmap.direction(key, direction)
            enforced[direction] = dp.enforced
            if not dp.enforced:
                continue  # the kernel passes an unenforced direction without looking at entries
            keys, ports = _direction_keys(ep_id, dp, problems, f"{key} {direction.value}")
            policy[direction].update(keys)
            redirect_ports |= ports
        endpoints[idx] = bm.Endpoint(
            endpoint_id=ep_id,
            identity=subject,
            enforce_ingress=enforced[PolicyDirection.INGRESS],
            enforce_egress=enforced[PolicyDirection.EGRESS],
        )
    return KernelPlan(
        identities=identities,
        ingress=policy[PolicyDirection.INGRESS],
        egress=policy[PolicyDirection.EGRESS],
        endpoints=endpoints,
        redirect_ports=frozenset(redirect_ports),
        problems=tuple(problems),
    )
