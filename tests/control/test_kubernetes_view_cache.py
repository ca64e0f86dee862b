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
Replicas with the same labels share one LabelSet object (memory per pod).
"""

from __future__ import annotations

from typing import Any, cast

from lightkube import AsyncClient
from membrane.control.sources.kubernetes import ClusterView, KubernetesSource
from membrane.control.sources.reflector import object_key

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
