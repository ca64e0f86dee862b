"""The reconciler: makes the kernel hold a `KernelPlan`, in an order that never widens what is allowed.

Owns the diff between the plan in the kernel and the next one, the order of the writes (new and
changed identities; the whole policy in one flip; endpoints, then attachments; removals last:
detach, forget endpoints, then unused identities) and which endpoint interfaces are attached.
Every method runs on the agent's single kernel thread (pyroute2 runs a loop of its own, which
cannot nest in the agent's); what it returns is an immutable snapshot the event loop may read.
Never compiles policy, never reads sources.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from membrane.bpf.errors import AttachError
from membrane.bpf.steer import Steering
from membrane.control.plan import KernelPlan, plan_kernel
from membrane.control.sources import LOCAL_UNRESOLVED
from membrane.policies import Endpoints, PolicyMap

log = logging.getLogger("membrane.agent")


@dataclass(frozen=True, slots=True, kw_only=True)
class Applied:
    """What one reconciliation left in the kernel."""

    plan: KernelPlan
    attached: Mapping[str, int]  # endpoint key -> host ifindex
    waiting: Mapping[str, str]  # endpoint key -> why it is not attached (retried on the next poll)
    warnings: tuple[str, ...]  # compile conflicts and plan problems (their traffic is dropped)


def node_addresses() -> list[str]:
    """The host's own interface addresses (every device of this network namespace) for the ipcache's
    `host` entries: traffic from the node to a pod is judged as `host`. [] when they cannot be read."""
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            return sorted({str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS")})
    except OSError as e:
        log.warning("cannot read the node's addresses: %s", e)
        return []


def ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def interfaces_changed(endpoints: Endpoints, attached: Mapping[str, int]) -> bool:
    """True when an endpoint's interface appeared, went away or changed index since `attached` was made
    (a local endpoint whose interface is still to be found counts until it is attached)."""
    return any(
        ep.interface is not None
        and (ep.key not in attached or (ep.interface != LOCAL_UNRESOLVED and ifindex(ep.interface) != attached[ep.key]))
        for ep in endpoints.endpoints
    )


class Reconciler:
    """Owns the kernel side of the policy: the plan in the maps and the attached interfaces."""

    def __init__(self, steering: Steering, resolve: Callable[[str], str | None] | None = None) -> None:
        self.steering = steering
        self.resolve = resolve  # pod IP -> host interface name, for local endpoints the sources name no interface of
        self.plan: KernelPlan | None = None
        self.attached: dict[str, int] = {}

    def apply(self, pmap: PolicyMap, endpoints: Endpoints, endpoint_ids: Mapping[str, int]) -> Applied:
        """Write `pmap` into the kernel and attach/detach interfaces, in the never-widening order.
        Raises what bpf/ raises on a map write (the caller keeps the last good policy in force)."""
        st = self.steering
        wanted, waiting = _resolve(endpoints, endpoint_ids, self.resolve)
        plan = plan_kernel(pmap, wanted, endpoint_ids, node_addresses())
        m = st.maps
        old = self.plan
        old_ids = old.identities if old is not None else {}
        old_eps = old.endpoints if old is not None else {}
        # 1. new and changed identities (an endpoint's addresses gain their ifindex before it is registered)
        for net, (ident, idx) in plan.identities.items():
            if old_ids.get(net) != (ident, idx):
                m.set_identity(net, ident, ifindex=idx)
        # 2. the whole policy, one atomic flip
        m.set_policy(ingress=plan.ingress, egress=plan.egress)
        # 3. endpoints, then attachments
        for idx, ep in plan.endpoints.items():
            if old_eps.get(idx) != ep:
                m.set_endpoint(idx, ep)
        for key, idx in wanted.items():
            if self.attached.get(key) != idx:
                if key in self.attached:
                    st.detach(self.attached.pop(key))
                try:
                    st.attach(idx)
                except AttachError as e:  # e.g. the veth went away since we looked: retried on the next poll
                    log.warning("endpoint %s: %s", key, e)
                    waiting[key] = str(e)
                    continue
                self.attached[key] = idx
        # 4. removals: detach, forget endpoints, then identities nobody uses any more
        for key in [k for k in self.attached if k not in wanted]:
            st.detach(self.attached.pop(key))
        for idx in old_eps:
            if idx not in plan.endpoints:
                m.delete_endpoint(idx)
        for net in old_ids:
            if net not in plan.identities:
                m.delete_identity(net)
        if st.sockmap is not None:
            st.sockmap.set_ports(plan.redirect_ports)
        self.plan = plan
        warnings = (*(str(e) for e in pmap.errors), *plan.problems)
        return Applied(plan=plan, attached=dict(self.attached), waiting=waiting, warnings=warnings)


def _resolve(
    endpoints: Endpoints, endpoint_ids: Mapping[str, int], resolve: Callable[[str], str | None] | None = None
) -> tuple[dict[str, int], dict[str, str]]:
    """(endpoint key -> ifindex of the endpoints to attach, endpoint key -> why another one waits)."""
    wanted: dict[str, int] = {}
    waiting: dict[str, str] = {}
    for ep in endpoints.endpoints:
        if ep.interface is None:
            continue
        name: str | None = ep.interface
        if name == LOCAL_UNRESOLVED:
            name = next((n for n in map(resolve, ep.ips) if n), None) if resolve is not None else None
            if name is None:
                waiting[ep.key] = f"no host interface leads to {', '.join(ep.ips) or 'its IPs'} yet"
                continue
        assert name is not None
        idx = ifindex(name)
        if idx is None:
            waiting[ep.key] = f"interface {name} not found"
        elif ep.key not in endpoint_ids:
            waiting[ep.key] = "no endpoint id yet"
        else:
            wanted[ep.key] = idx
    return wanted, waiting
