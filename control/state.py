"""The node's state: what every source feeds, and the compiled policy made of it.

Owns the last good input of each source (policies by source key, endpoints, namespaces, nodes),
each source's current problems, the names DNS taught toFQDNs (`FqdnCache`), stable endpoint ids,
and the live compiled policy (`LivePolicy`: identities and the ipcache live in its `PolicyMap`).
Never reads files, never touches the kernel. Invariant: a change that a source reports as a problem
never replaces what is in force; only a good input of that source does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import assert_never

from membrane.control.sources import (
    Change,
    EndpointsChanged,
    NamespacesChanged,
    NodesChanged,
    PoliciesChanged,
    SourceProblem,
)
from membrane.policies import Endpoints, FqdnCache, Namespace, Policy, PolicyMap, compile_policy
from membrane.policies.endpoints import endpoint_labels
from membrane.policies.identity import IdentityAllocators
from membrane.proxy.wiring import LivePolicy

Learned = Mapping[str, frozenset[str]]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Inputs:
    """One consistent set of compile inputs, captured on the event loop and compiled anywhere."""

    policies: tuple[Policy, ...]
    endpoints: Endpoints
    learned: Learned


class NodeState:
    """What the sources said last (good inputs only), what DNS taught, and the policy in force."""

    def __init__(self) -> None:
        self.policies: dict[str, tuple[Policy, ...]] = {}  # source key -> that source's last good policies
        self.endpoints = Endpoints()
        self.nodes: Mapping[str, tuple[str, ...]] = {}
        self.errors: dict[str, tuple[str, ...]] = {}  # source key -> why its latest input was rejected
        self.fqdn = FqdnCache()
        self.identities = IdentityAllocators.new()  # node-local numbers, stable while a label set lives
        self.endpoint_ids: dict[str, int] = {}  # endpoint key -> nonzero id, stable for the agent's lifetime
        self.live: LivePolicy | None = None
        self.compiled_learned: Learned = {}  # what the policy in force was compiled with

    def apply(self, change: Change) -> bool:
        """Take one change from a source. Returns True when the inputs of the policy changed."""
        match change:
            case PoliciesChanged(key=key, policies=policies):
                self.errors.pop(key, None)
                self.policies[key] = policies
                return True
            case EndpointsChanged(endpoints=endpoints):
                self._set_endpoints(endpoints)
                return True
            case NamespacesChanged(namespaces=namespaces):
                self._set_endpoints(_with_namespaces(self.endpoints, namespaces))
                return True
            case NodesChanged(nodes=nodes):
                # TODO(control, #kubernetes): node IPs become `remote-node` identities in the ipcache.
                self.nodes = dict(nodes)
                return False
            case SourceProblem(key=key, errors=errors):
                self.errors[key] = errors
                return False
        assert_never(change)

    def _set_endpoints(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        for ep in endpoints.endpoints:
            if ep.interface is not None and ep.key not in self.endpoint_ids:
                self.endpoint_ids[ep.key] = max(self.endpoint_ids.values(), default=0) + 1

    def learned(self) -> Learned:
        """The live names DNS taught, now."""
        return self.fqdn.snapshot(now=time.monotonic())

    def inputs(self) -> Inputs:
        """The inputs to compile now: every source's policies (in key order), endpoints, learned names."""
        policies = tuple(p for key in sorted(self.policies) for p in self.policies[key])
        return Inputs(policies=policies, endpoints=self.endpoints, learned=self.learned())

    @property
    def pmap(self) -> PolicyMap | None:
        return self.live.pmap if self.live is not None else None

    def put_in_force(self, pmap: PolicyMap, learned: Learned) -> None:
        """The kernel holds `pmap` now: the proxy judges by it from the next request on."""
        if self.live is None:
            self.live = LivePolicy(pmap)
        else:
            self.live.replace(pmap)
        self.compiled_learned = learned

    @property
    def error_lines(self) -> list[str]:
        return [line for key in sorted(self.errors) for line in self.errors[key]]


def compile_inputs(inputs: Inputs, identities: IdentityAllocators | None = None, *, allow_localhost: bool = False) -> PolicyMap:
    """Compile one captured set of inputs (safe on any thread; `identities` are the node's allocators, which
    keep a live label set's number across compilations: one compilation at a time may use them).
    `allow_localhost`: Cilium's allow-localhost=always (see `compile_policy`)."""
    return compile_policy(inputs.policies, inputs.endpoints, inputs.learned, identities=identities, allow_localhost=allow_localhost)


def _with_namespaces(endpoints: Endpoints, namespaces: tuple[Namespace, ...]) -> Endpoints:
    """`endpoints` with these namespaces' labels, each endpoint's identity labels recomputed."""
    labels = {n.name: n.labels for n in namespaces}
    eps = tuple(
        dataclasses.replace(
            ep, label_set=endpoint_labels(ep.labels, ep.namespace, labels.get(ep.namespace, {}), ep.service_account)
        )
        for ep in endpoints.endpoints
    )
    return Endpoints(namespaces=namespaces, endpoints=eps, reserved_ips=endpoints.reserved_ips)
