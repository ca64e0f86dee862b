"""The pure policy-to-kernel plan: a compiled `PolicyMap` -> the content the BPF maps should hold.

Owns the translation only (`plan_kernel`): the ipcache prefixes with their identity and host
ifindex, the per-endpoint policy keys of both directions (port ranges expanded), the endpoint
records and the ports redirected to the proxy. Pure: no kernel, no I/O, no clock; the reconciler
writes the plan. Fails closed: what cannot be expressed is left out (so the kernel drops it) and named.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from membrane.bpf import maps as bm
from membrane.policies import L4Proto, PolicyDirection, PolicyMap, VerdictKind

MAX_EXPANDED_PORTS = 4096  # per map entry: a wider range than this (not 1-65535) is not expanded
_PROTOS = {L4Proto.TCP: bm.IPPROTO_TCP, L4Proto.UDP: bm.IPPROTO_UDP}  # SCTP is not judged in the kernel


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


def plan_kernel(pmap: PolicyMap, attached: Mapping[str, int], endpoint_ids: Mapping[str, int]) -> KernelPlan:
    """Translate a compiled policy into map content.

    `attached`: endpoint key -> host-side ifindex of the endpoints enforced on this node;
    `endpoint_ids`: endpoint key -> nonzero endpoint id (stable for the agent's lifetime).
    Returns the plan. Never raises; an entry that cannot be expressed (a range wider than
    MAX_EXPANDED_PORTS) is left out, so the kernel drops that traffic (fail closed), and is named
    in `problems`.
    """
    identities: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, tuple[int, int]] = {}
    for net, ident in pmap.ipcache.entries().items():
        identities[net] = (ident, 0)
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
            for entry in dp.entries():
                proto = _PROTOS.get(entry.proto)
                if proto is None or entry.verdict is VerdictKind.DROP:
                    continue  # SCTP is not judged; DROP is the enforced default (no key = drop)
                ports = _port_keys(entry.port, entry.end_port)
                if ports is None:
                    problems.append(
                        f"{key} {direction.value}: ports {entry.port}-{entry.end_port}/{entry.proto.value} to identity "
                        f"{entry.identity} span more than {MAX_EXPANDED_PORTS} ports; that traffic is dropped"
                    )
                    continue
                redirect = entry.verdict is VerdictKind.REDIRECT
                value = bm.PolicyEntry(verdict=bm.Verdict.REDIRECT if redirect else bm.Verdict.PASS)
                for port in ports:
                    pkey = bm.PolicyKey(endpoint_id=ep_id, identity=entry.identity, port=port, proto=proto)
                    policy[direction][pkey] = value
                    if redirect and port:
                        redirect_ports.add(port)
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
