"""The Kubernetes source: policies, pods, namespaces, nodes and the API server's endpoints, from the API server.

Mirrors, each with its own reflector (LIST then WATCH, relist on 410, jittered reconnects):
CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy (cilium.io/v2), Pods (all of them: every
pod IP feeds the ipcache; the ones on this node become its endpoints), Namespaces (labels for
namespace selectors), Nodes (the `host` / `remote-node` entities) and the `default/kubernetes`
EndpointSlices (the `kube-apiserver` entity). `view()` turns the mirrors into the same model the
file source yields (policies, `Endpoints`), so the rest of the agent does not care where an object
came from. Host-network pods are skipped (they have the node's identity, as in Cilium), and so are
pods without an IP yet or already finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightkube import AsyncClient, KubeConfig
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.resources.core_v1 import Namespace as K8sNamespace
from lightkube.resources.core_v1 import Node, Pod
from lightkube.resources.discovery_v1 import EndpointSlice
from membrane.control.sources import (
    LOCAL_UNRESOLVED,
    Change,
    EndpointsChanged,
    NodesChanged,
    PoliciesChanged,
    SourceProblem,
)
from membrane.control.sources.reflector import Kind, Reflector
from membrane.policies import Endpoints
from membrane.policies.crd import Policy, parse_policy
from membrane.policies.endpoints import Endpoint, Namespace, endpoint_labels
from membrane.policies.errors import PolicyError
from membrane.policies.labels import LabelSet

log = logging.getLogger("membrane.k8s")

CiliumNetworkPolicy = create_namespaced_resource("cilium.io", "v2", "CiliumNetworkPolicy", "ciliumnetworkpolicies")
CiliumClusterwideNetworkPolicy = create_global_resource(
    "cilium.io", "v2", "CiliumClusterwideNetworkPolicy", "ciliumclusterwidenetworkpolicies"
)
APISERVER_SERVICE_LABEL = {"kubernetes.io/service-name": "kubernetes"}
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterView:
    """What the cluster says now, in the policy engine's terms."""

    policies: tuple[Policy, ...]
    policy_errors: tuple[PolicyError, ...]
    endpoints: Endpoints  # every pod with an IP; `interface` is None (the agent binds local ones)
    local: frozenset[str]  # endpoint keys of the pods scheduled on this node
    awaiting_ip: Mapping[str, Mapping[str, Any]]  # local pods with no IP in their status yet (CNI gives it): key -> Pod
    node_ips: Mapping[str, tuple[str, ...]]  # node name -> its InternalIP/ExternalIP addresses
    apiserver_ips: tuple[str, ...]
    synced: bool  # every mirror has listed at least once


def client_from(kubeconfig: Path | None) -> AsyncClient:
    """An API client: the kubeconfig file when given, else the pod's service account (in-cluster).

    lightkube re-reads a service-account (or kubeconfig `tokenFile`) token when the server answers 401,
    so a rotated token is picked up. Raises lightkube's ConfigError when neither is usable.
    """
    config = KubeConfig.from_file(str(kubeconfig)) if kubeconfig is not None else KubeConfig.from_service_account()
    return AsyncClient(config=config, lazy=True, field_manager="membrane")


class KubernetesSource:
    """Runs the reflectors; calls `on_change()` (coalesced, on the loop) whenever any mirror changed."""

    def __init__(self, client: AsyncClient, node_name: str, on_change: Callable[[], None], *,
                 coalesce_s: float = 0.02) -> None:
        self.node_name = node_name
        self._on_change = on_change
        self._coalesce_s = coalesce_s
        self._pending: asyncio.TimerHandle | None = None
        kinds = [
            Kind("ciliumnetworkpolicies", CiliumNetworkPolicy, namespaced=True),
            Kind("ciliumclusterwidenetworkpolicies", CiliumClusterwideNetworkPolicy, namespaced=False),
            Kind("pods", Pod, namespaced=True, keep=slim_pod),
            Kind("namespaces", K8sNamespace, namespaced=False),
            Kind("nodes", Node, namespaced=False),
            Kind("endpointslices", EndpointSlice, namespaced=True, namespace="default", labels=APISERVER_SERVICE_LABEL),
        ]
        self.reflectors = {k.name: Reflector(client, k, self._changed) for k in kinds}
        self._tasks: list[asyncio.Task[None]] = []
        self._parsed: dict[tuple[str, str], tuple[Policy | None, PolicyError | None]] = {}
        # pod key -> (the stored pod, its namespace's labels, Endpoint or None): a pod's Endpoint is built
        # once per stored object (and namespace labels), not for every pod of the cluster on each change.
        self._pod_cache: dict[str, tuple[dict[str, Any], dict[str, str], Endpoint | None]] = {}
        # one LabelSet object per distinct label set: the replicas of a deployment share it
        self._label_sets: dict[LabelSet, LabelSet] = {}

    # --- lifetime -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks = [asyncio.create_task(r.run(), name=f"k8s-{name}") for name, r in self.reflectors.items()]

    async def wait_synced(self, timeout_s: float | None = None) -> None:
        """Wait until every mirror has listed once. Raises TimeoutError naming the kinds still missing."""
        try:
            await asyncio.wait_for(asyncio.gather(*(r.synced.wait() for r in self.reflectors.values())), timeout_s)
        except TimeoutError:
            missing = [n for n, r in self.reflectors.items() if not r.synced.is_set()]
            errors = {n: r.last_error for n, r in self.reflectors.items() if n in missing and r.last_error}
            raise TimeoutError(f"Kubernetes not synced after {timeout_s:g} s: {', '.join(missing)} {errors or ''}") from None

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        if self._pending is not None:
            self._pending.cancel()

    @property
    def synced(self) -> bool:
        return all(r.synced.is_set() for r in self.reflectors.values())

    def _changed(self, kind: str) -> None:
        if self._pending is None:  # a burst (a relist, many pods at once) becomes one recompile
            loop = asyncio.get_running_loop()
            self._pending = loop.call_later(self._coalesce_s, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self._on_change()

    # --- the view -----------------------------------------------------------------------------------
    def view(self) -> ClusterView:
        policies, errors = self._policies()
        endpoints, local, awaiting = self._endpoints()
        return ClusterView(
            policies=policies,
            policy_errors=errors,
            endpoints=endpoints,
            local=local,
            awaiting_ip=awaiting,
            node_ips=self._node_ips(),
            apiserver_ips=self._apiserver_ips(),
            synced=self.synced,
        )

    def _policies(self) -> tuple[tuple[Policy, ...], tuple[PolicyError, ...]]:
        policies: list[Policy] = []
        errors: list[PolicyError] = []
        live: set[tuple[str, str]] = set()
        for kind in ("ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"):
            for key, obj in sorted(self.reflectors[kind].store.items()):
                meta = obj.get("metadata") or {}
                cache_key = (f"{kind}/{key}", str(meta.get("resourceVersion", "")))
                live.add(cache_key)
                hit = self._parsed.get(cache_key)
                if hit is None:  # parse each object version once, not on every pod change
                    hit = _parse(obj, source=f"{kind}/{key}")
                    self._parsed[cache_key] = hit
                policy, error = hit
                if policy is not None:
                    policies.append(policy)
                if error is not None:
                    errors.append(error)
        for stale in set(self._parsed) - live:
            del self._parsed[stale]
        return tuple(policies), tuple(errors)

    def _endpoints(self) -> tuple[Endpoints, frozenset[str], dict[str, Mapping[str, Any]]]:
        ns_labels = {
            str(obj["metadata"]["name"]): dict(obj["metadata"].get("labels") or {})
            for obj in self.reflectors["namespaces"].store.values()
        }
        namespaces = {name: Namespace(name=name, labels=labels) for name, labels in ns_labels.items()}
        endpoints: list[Endpoint] = []
        local: set[str] = set()
        awaiting: dict[str, Mapping[str, Any]] = {}
        seen_ips: set[str] = set()
        store = self.reflectors["pods"].store
        cache = self._pod_cache
        for key in sorted(store):
            pod = store[key]
            here = (pod.get("spec") or {}).get("nodeName") == self.node_name
            ep = self._cached_endpoint(key, pod, ns_labels)
            if ep is None:
                if here and is_endpoint_pod(pod) and not pod_ips(pod):
                    awaiting[key] = pod  # its IP comes from the CNI plugin before the kubelet reports it
                continue
            if seen_ips.isdisjoint(ep.ips):
                seen_ips.update(ep.ips)
            else:  # another pod claims one of its IPs (rare): build it again without those
                ep = pod_endpoint(pod, ns_labels, seen_ips)
                if ep is None:
                    continue
            namespaces.setdefault(ep.namespace, Namespace(name=ep.namespace, labels={}))
            endpoints.append(ep)
            if here:
                local.add(ep.key)
        for gone in [k for k in cache if k not in store]:
            del cache[gone]
        if len(self._label_sets) > 2 * len(endpoints) + 64:  # forget label sets no pod has any more
            self._label_sets = {ep.label_set: ep.label_set for ep in endpoints}
        return Endpoints(namespaces=tuple(namespaces.values()), endpoints=tuple(endpoints)), frozenset(local), awaiting

    def _cached_endpoint(self, key: str, pod: dict[str, Any], ns_labels: Mapping[str, dict[str, str]]) -> Endpoint | None:
        """pod_endpoint() for a pod alone (no IP conflicts considered), cached per stored object and
        namespace labels; equal label sets become one shared object. The store replaces an object on
        every change and never edits one in place, so the same object means the same pod."""
        ns = str((pod.get("metadata") or {}).get("namespace") or "default")
        labels = ns_labels.get(ns, {})
        hit = self._pod_cache.get(key)
        if hit is not None and (hit[0] is pod or hit[0] == pod) and hit[1] == labels:
            return hit[2]
        ep = pod_endpoint(pod, ns_labels, set())
        if ep is not None:
            shared = self._label_sets.setdefault(ep.label_set, ep.label_set)
            if shared is not ep.label_set:
                ep = dataclasses.replace(ep, label_set=shared)
        self._pod_cache[key] = (pod, dict(labels), ep)
        return ep

    def _node_ips(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {}
        for obj in self.reflectors["nodes"].store.values():
            addresses = (obj.get("status") or {}).get("addresses") or []
            ips = [a.get("address") for a in addresses if a.get("type") in ("InternalIP", "ExternalIP")]
            out[str(obj["metadata"]["name"])] = tuple(ip for ip in ips if _is_ip(ip))
        return out

    def _apiserver_ips(self) -> tuple[str, ...]:
        ips: set[str] = set()
        for obj in self.reflectors["endpointslices"].store.values():
            for ep in obj.get("endpoints") or []:
                ips.update(a for a in ep.get("addresses") or [] if _is_ip(a))
        return tuple(sorted(ips))


def _parse(obj: Mapping[str, Any], *, source: str) -> tuple[Policy | None, PolicyError | None]:
    try:
        return parse_policy(dict(obj), source=source), None
    except PolicyError as e:
        return None, e


def _is_ip(value: object) -> bool:
    try:
        ipaddress.ip_address(str(value))
    except ValueError:
        return False
    return True


POD_FIELDS = {"metadata": ("name", "namespace", "uid", "labels"),
              "spec": ("nodeName", "hostNetwork", "serviceAccountName", "serviceAccount"),
              "status": ("phase", "podIP", "podIPs")}


def slim_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """The part of a Pod the agent reads (POD_FIELDS); the rest (managedFields, containers, volumes,
    conditions, ..., about 90% of a pod's bytes) is dropped on arrival, as client-go informers' transforms
    do. resourceVersion goes too, so a status update that changes none of these fields (a probe, a
    restart count) changes nothing in the store and costs no recompile."""
    out: dict[str, Any] = {}
    for section, fields in POD_FIELDS.items():
        src = pod.get(section) or {}
        out[section] = {f: src[f] for f in fields if f in src}
    return out


def pod_ips(pod: Mapping[str, Any]) -> tuple[str, ...]:
    """A pod's addresses: status.podIPs (dual stack) or status.podIP, canonical text, no duplicates."""
    status = pod.get("status") or {}
    raw = [p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, Mapping)] or [status.get("podIP")]
    out: list[str] = []
    for ip in raw:
        try:
            text = str(ipaddress.ip_address(str(ip)))
        except ValueError:
            continue
        if text not in out:
            out.append(text)
    return tuple(out)


def is_endpoint_pod(pod: Mapping[str, Any]) -> bool:
    """False for host-network pods (they are the node) and finished pods (their IP may be reused)."""
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    return not spec.get("hostNetwork") and status.get("phase") not in FINISHED_PHASES


def with_ips(pod: Mapping[str, Any], ips: tuple[str, ...]) -> dict[str, Any]:
    """A copy of `pod` whose status reports `ips` (what the CNI plugin assigned before the kubelet says so)."""
    status = {**(pod.get("status") or {}), "podIP": ips[0] if ips else None, "podIPs": [{"ip": ip} for ip in ips]}
    return {**pod, "status": status}


def pod_endpoint(pod: Mapping[str, Any], ns_labels: Mapping[str, Mapping[str, str]], seen_ips: set[str]) -> Endpoint | None:
    """The policy engine's Endpoint for a Pod object, or None for pods that are not endpoints.

    Not endpoints: host-network pods (they are the node), pods without an IP, finished pods (their
    IP may already belong to a new pod). When two pods claim one IP, the first (sorted by key) keeps it.
    """
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    if not is_endpoint_pod(pod):
        return None
    ips = tuple(ip for ip in pod_ips(pod) if ip not in seen_ips)
    if not ips:
        return None
    seen_ips.update(ips)
    namespace = str(meta.get("namespace") or "default")
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    sa = str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")
    return Endpoint(
        name=str(meta.get("name")),
        namespace=namespace,
        labels=labels,
        ips=ips,
        service_account=sa,
        interface=None,
        label_set=endpoint_labels(labels, namespace, ns_labels.get(namespace, {}), sa),
    )


def local_pods(view: ClusterView) -> Iterable[Endpoint]:
    return (ep for ep in view.endpoints.endpoints if ep.key in view.local)


class KubernetesChanges:
    """The Kubernetes source seen through the agent's Source interface (`snapshot()` / `poll()`).

    Local pods get the host interface the CNI plugin named for them (`bindings`, pod key -> name), else
    `LOCAL_UNRESOLVED`, which the reconciler resolves from the pod's IP. An invalid CNP is reported under
    its own problem key while every valid one stays in force (Cilium skips an invalid policy; it does not
    freeze the others). `poll()` returns changes only when a mirror or a binding changed since the last call.
    """

    key = "kubernetes"
    problems_key = "kubernetes: invalid policies"

    def __init__(self, source: KubernetesSource) -> None:
        self.source = source
        self.bindings: dict[str, str] = {}  # pod key -> host interface (from CNI ADD)
        self.binding_ips: dict[str, tuple[str, ...]] = {}  # pod key -> IPs from CNI ADD
        self._dirty = True

    def mark_dirty(self) -> None:
        self._dirty = True

    def snapshot(self) -> list[Change]:
        self._dirty = False
        view = self.source.view()
        eps = [
            dataclasses.replace(ep, interface=self.bindings.get(ep.key, LOCAL_UNRESOLVED)) if ep.key in view.local else ep
            for ep in view.endpoints.endpoints
        ]
        taken = {ip for ep in eps for ip in ep.ips}
        ns_labels = {n.name: n.labels for n in view.endpoints.namespaces}
        for key, pod in view.awaiting_ip.items():
            ips = self.binding_ips.get(key, ())
            if key in self.bindings and ips:
                ep = pod_endpoint(with_ips(pod, ips), ns_labels, taken)
                if ep is not None:
                    eps.append(dataclasses.replace(ep, interface=self.bindings[key]))
        endpoints = Endpoints(namespaces=view.endpoints.namespaces, endpoints=tuple(eps))
        return [
            PoliciesChanged(key=self.key, policies=view.policies),
            SourceProblem(key=self.problems_key, errors=tuple(str(e) for e in view.policy_errors)),
            EndpointsChanged(endpoints=endpoints),
            NodesChanged(nodes=view.node_ips),
        ]

    def poll(self) -> list[Change]:
        return self.snapshot() if self._dirty else []
