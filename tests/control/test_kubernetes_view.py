"""Pods, namespaces and nodes as the Kubernetes source turns them into the policy engine's endpoints.

| pod                                  | endpoint?                          |
|--------------------------------------|------------------------------------|
| running, podIPs dual stack           | yes, both IPs, labels + namespace  |
| hostNetwork                          | no (it is the node)                |
| no IP yet                            | no                                 |
| Succeeded / Failed                   | no (its IP may be reused)          |
| second pod claiming a taken IP       | keeps only its other IPs           |
"""

from __future__ import annotations

from typing import Any

import pytest
from membrane.control.sources.kubernetes import pod_endpoint, pod_ips
from membrane.control.sources.reflector import backoff_s, object_key


def _pod(name: str = "web", ns: str = "shop", *, ip: str | None = "10.244.1.5", ips: list[str] | None = None,
         phase: str = "Running", host_network: bool = False, labels: dict[str, str] | None = None,
         sa: str | None = "cart") -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if ip is not None:
        status["podIP"] = ip
    if ips is not None:
        status["podIPs"] = [{"ip": i} for i in ips]
    spec: dict[str, Any] = {"nodeName": "n1", "hostNetwork": host_network}
    if sa is not None:
        spec["serviceAccountName"] = sa
    return {"metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}}, "spec": spec, "status": status}


def test_a_running_pod_becomes_an_endpoint_with_cilium_labels() -> None:
    """Pod labels, namespace, service account and namespace labels make up the identity's label set."""
    ep = pod_endpoint(_pod(), {"shop": {"team": "retail"}}, set())
    assert ep is not None
    assert ep.key == "shop/web"
    assert ep.ips == ("10.244.1.5",)
    assert ep.interface is None
    labels = {str(label) for label in ep.label_set.labels}
    assert "k8s:app=web" in labels
    assert "k8s:io.kubernetes.pod.namespace=shop" in labels
    assert "k8s:io.cilium.k8s.policy.serviceaccount=cart" in labels
    assert "k8s:io.cilium.k8s.namespace.labels.team=retail" in labels


def test_dual_stack_pod_ips_are_canonical_and_deduplicated() -> None:
    """status.podIPs wins over podIP; IPv6 text is canonical (RFC 5952)."""
    pod = _pod(ip="10.244.1.5", ips=["10.244.1.5", "fd00:0:0::5", "10.244.1.5"])
    assert pod_ips(pod) == ("10.244.1.5", "fd00::5")


@pytest.mark.parametrize("pod", [
    _pod(host_network=True),
    _pod(ip=None),
    _pod(phase="Succeeded"),
    _pod(phase="Failed"),
    _pod(ip="not-an-ip"),
], ids=["host-network", "no-ip", "succeeded", "failed", "bad-ip"])
def test_pods_that_are_not_endpoints(pod: dict[str, Any]) -> None:
    """Host-network, IP-less and finished pods are no endpoints."""
    assert pod_endpoint(pod, {}, set()) is None


def test_an_ip_belongs_to_the_first_pod_that_claims_it() -> None:
    """Two pods reporting one IP (a stale status during reuse): the second does not take it."""
    seen: set[str] = set()
    first = pod_endpoint(_pod("a", ip="10.244.1.9"), {}, seen)
    second = pod_endpoint(_pod("b", ip="10.244.1.9"), {}, seen)
    assert first is not None
    assert second is None


def test_object_keys_are_namespace_slash_name_or_name() -> None:
    """Namespaced objects are keyed ns/name, cluster-scoped ones by name."""
    assert object_key({"metadata": {"namespace": "a", "name": "b"}}) == "a/b"
    assert object_key({"metadata": {"name": "node-1"}}) == "node-1"


def test_backoff_grows_to_a_cap_with_jitter() -> None:
    """Reconnect pauses double from 0.2 s up to 30 s, each within ±50% jitter."""
    assert backoff_s(1, rng=lambda: 0.5) == pytest.approx(0.2)
    assert backoff_s(4, rng=lambda: 0.5) == pytest.approx(1.6)
    assert backoff_s(50, rng=lambda: 0.5) == pytest.approx(30.0)
    assert backoff_s(50, rng=lambda: 0.0) == pytest.approx(15.0)
    assert backoff_s(50, rng=lambda: 0.999) < 45.0
