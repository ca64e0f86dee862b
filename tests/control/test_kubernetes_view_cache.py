"""The Kubernetes source builds each pod's Endpoint once per object version; its view must not go stale.

After every step below, the view of a source that has seen all earlier steps (warm per-pod cache)
equals the view of a source that sees the stores for the first time:

| step                                          | what a stale cache would get wrong          |
|-----------------------------------------------|---------------------------------------------|
| pod relabelled (new resourceVersion)          | the old labels                              |
| namespace labels changed                      | the old namespace labels in the label set   |
| a second pod claims a taken IP                | the IP twice                                |
| the first claimer deleted                     | the IP never handed to the second pod       |
| pod deleted                                   | a ghost endpoint                            |
Replicas with the same labels share one LabelSet object (memory per pod). Pods are stored slim
(`slim_pod`): the endpoint built from a slim pod is the one built from the whole pod, and an update
of only dropped fields (a status condition, a new resourceVersion) is no change for the reflector.
"""

from __future__ import annotations

import copy
import json
from typing import Any, cast

import pytest
from lightkube import AsyncClient
from membrane.control.sources.kubernetes import ClusterView, KubernetesSource, pod_endpoint, slim_pod
from membrane.control.sources.reflector import Kind, Reflector, object_key

NODE = "n1"


def _source() -> KubernetesSource:
    return KubernetesSource(cast(AsyncClient, None), NODE, lambda: None)  # view() never touches the client


def _ns(name: str, rv: int, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": str(rv), "labels": {"kubernetes.io/metadata.name": name, **labels}}}


def _pod(name: str, ip: str, rv: int, *, node: str = NODE, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "shop", "resourceVersion": str(rv), "labels": labels or {"app": "web"}},
            "spec": {"nodeName": node}, "status": {"phase": "Running", "podIP": ip}}


def _load(source: KubernetesSource, objs: dict[str, list[dict[str, Any]]]) -> None:
    for kind, items in objs.items():
        source.reflectors[kind].store = {object_key(o): o for o in items}


def _fresh_view(objs: dict[str, list[dict[str, Any]]]) -> ClusterView:
    fresh = _source()
    _load(fresh, objs)
    return fresh.view()


def test_the_cached_view_equals_a_fresh_one_after_every_change() -> None:
    warm = _source()
    objs: dict[str, list[dict[str, Any]]] = {
        "namespaces": [_ns("shop", 1, team="retail")],
        "pods": [_pod("a", "10.0.0.1", 2), _pod("b", "10.0.0.2", 3, node="n2")],
    }
    steps = [
        lambda: objs["pods"].__setitem__(0, _pod("a", "10.0.0.1", 4, app="api")),
        lambda: objs["namespaces"].__setitem__(0, _ns("shop", 5, team="payments")),
        lambda: objs["pods"].append(_pod("c", "10.0.0.1", 6)),  # claims a's IP: a keeps it (sorted first)
        lambda: objs["pods"].pop(0),  # a gone: c gets the IP now
        lambda: objs["pods"].pop(0),  # b gone
    ]
    _load(warm, objs)
    warm.view()
    for i, step in enumerate(steps):
        step()
        _load(warm, objs)
        got, want = warm.view(), _fresh_view(objs)
        assert got.endpoints == want.endpoints, f"after step {i}"
        assert got.local == want.local, f"after step {i}"
    final = warm.view().endpoints.by_key("shop/c")
    assert final is not None
    assert final.ips == ("10.0.0.1",)
    assert "k8s:io.cilium.k8s.namespace.labels.team=payments" in {str(label) for label in final.label_set.labels}


def test_replicas_share_one_label_set_object() -> None:
    source = _source()
    _load(source, {"namespaces": [_ns("shop", 1)],
                   "pods": [_pod("web-1", "10.0.0.1", 2), _pod("web-2", "10.0.0.2", 3), _pod("db-1", "10.0.0.3", 4, app="db")]})
    eps = {ep.name: ep for ep in source.view().endpoints.endpoints}
    assert eps["web-1"].label_set is eps["web-2"].label_set
    assert eps["web-1"].label_set != eps["db-1"].label_set


def _full_pod(**over: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1", "resourceVersion": "7", "labels": {"app": "web"},
                     "annotations": {"note": "x" * 2000}, "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
                     "ownerReferences": [{"kind": "ReplicaSet", "name": "web-abc"}]},
        "spec": {"nodeName": NODE, "serviceAccountName": "web", "containers": [{"name": "c", "image": "i", "env": []}],
                 "volumes": [{"name": "v"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.9", "podIPs": [{"ip": "10.0.0.9"}, {"ip": "fd00::9"}],
                   "conditions": [{"type": "Ready", "status": "True"}], "hostIP": "192.0.2.1"},
    }
    for path, value in over.items():
        section, _, field = path.partition("__")
        pod[section][field] = value
    return pod


@pytest.mark.parametrize("pod", [
    _full_pod(),
    _full_pod(spec__hostNetwork=True),
    _full_pod(status__phase="Succeeded"),
    _full_pod(spec__serviceAccountName=None, spec__serviceAccount="legacy"),
    _full_pod(status__podIPs=None),
], ids=["running", "host-network", "finished", "legacy-sa", "podIP-only"])
def test_a_slim_pod_makes_the_same_endpoint(pod: dict[str, Any]) -> None:
    ns_labels = {"shop": {"team": "retail"}}
    assert pod_endpoint(slim_pod(pod), ns_labels, set()) == pod_endpoint(pod, ns_labels, set())
    assert object_key(slim_pod(pod)) == object_key(pod)
    assert len(json.dumps(slim_pod(pod))) < len(json.dumps(pod)) / 4


def test_an_update_of_dropped_fields_is_no_change_but_a_label_is() -> None:
    changes: list[str] = []
    r = Reflector(cast(AsyncClient, None), Kind("pods", None, namespaced=True, keep=slim_pod), changes.append)
    pod = _full_pod()
    r._apply("ADDED", pod)
    assert changes == ["pods"]
    status_only = copy.deepcopy(pod)
    status_only["metadata"]["resourceVersion"] = "8"
    status_only["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    r._apply("MODIFIED", status_only)
    assert changes == ["pods"]
    assert r.resource_version == "8"  # the watch still resumes from the newest version
    relabelled = copy.deepcopy(status_only)
    relabelled["metadata"]["labels"] = {"app": "api"}
    r._apply("MODIFIED", relabelled)
    assert changes == ["pods", "pods"]
    assert r.store["shop/web-1"]["metadata"]["labels"] == {"app": "api"}
    assert "managedFields" not in r.store["shop/web-1"]["metadata"]
