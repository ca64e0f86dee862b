"""The Kubernetes source against the API server double: list, watch, and convergence after faults.

| fault                                   | the source converges to                       |
|-----------------------------------------|-----------------------------------------------|
| none: objects before and after the sync | everything, with labels, node-local set       |
| every watch stream cut mid-way          | objects created during the cut                |
| history compacted + object deleted      | the deletion (410 -> relist -> sweep)         |
| server restarted without its data       | the new server's state                        |
| token rotated (tokenFile re-read)       | new objects after the rotation                |
| an invalid CNP                          | one policy error naming it; others in force   |
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from membrane.control.sources.kubernetes import ClusterView, KubernetesSource, client_from
from membrane.sandbox.apiserver import ApiServerThread, write_kubeconfig

NODE = "node-a"


def _ns(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **labels}}}


def _pod(name: str, ip: str, *, ns: str = "default", node: str = NODE, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def _cnp(name: str, *, ns: str = "default", app: str = "web", valid: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {"endpointSelector": {"matchLabels": {"app": app}},
                            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                                         "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}
    if not valid:
        spec["ingress"][0]["toPorts"][0]["ports"][0]["port"] = "eighty"
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def _node(name: str, ip: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServerThread]:
    with ApiServerThread(state_dir=tmp_path / "api", bookmark_interval_s=0.2, history_size=200) as server:
        yield server


def put(api: ApiServerThread, *objs: dict[str, Any]) -> None:
    for obj in objs:
        api.call(lambda s, o=obj: s.store.put(o))  # type: ignore[misc]


def delete(api: ApiServerThread, group: str, plural: str, ns: str, name: str) -> None:
    rt = api.store_type(group, plural)
    api.call(lambda s: s.store.delete(rt, ns, name))


async def _until(source: KubernetesSource, predicate: Callable[[ClusterView], bool], timeout_s: float = 15.0) -> ClusterView:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        view = source.view()
        if predicate(view):
            return view
        if loop.time() > deadline:
            raise AssertionError(f"not converged in {timeout_s} s: {[p.key for p in view.policies]} "
                                 f"{[e.key for e in view.endpoints.endpoints]} "
                                 f"{ {n: r.last_error for n, r in source.reflectors.items()} }")
        await asyncio.sleep(0.05)


def run_source(api: ApiServerThread, body: Callable[[KubernetesSource], Any], kubeconfig: Path | None = None) -> None:
    async def main() -> None:
        changes: list[int] = []
        client = client_from(kubeconfig or api.kubeconfig)
        source = KubernetesSource(client, NODE, lambda: changes.append(1))
        await source.start()
        try:
            await source.wait_synced(15)
            await body(source)
        finally:
            await source.stop()
            await client.close()
    asyncio.run(main())


def _policy_keys(view: ClusterView) -> set[str]:
    return {p.key for p in view.policies}


def test_initial_sync_builds_the_engines_view(api: ApiServerThread) -> None:
    """Pods become endpoints with namespace labels; this node's pods are local; nodes and the API server's
    EndpointSlice give the node and kube-apiserver addresses; CNPs are parsed."""
    put(api, _ns("shop", team="retail"), _node(NODE, "192.0.2.10"), _node("node-b", "192.0.2.11"),
        _pod("web", "10.244.9.2", ns="shop"), _pod("far", "10.244.9.3", node="node-b"), _cnp("allow-web", ns="shop"))

    async def body(source: KubernetesSource) -> None:
        view = await _until(source, lambda v: len(v.endpoints.endpoints) == 2)
        assert view.synced
        assert _policy_keys(view) == {"shop/allow-web"}
        assert view.local == frozenset({"shop/web"})
        web = view.endpoints.by_key("shop/web")
        assert web is not None
        assert "k8s:io.cilium.k8s.namespace.labels.team=retail" in {str(label) for label in web.label_set.labels}
        assert view.node_ips == {NODE: ("192.0.2.10",), "node-b": ("192.0.2.11",)}
        assert view.apiserver_ips == ("127.0.0.1",)

    run_source(api, body)


def test_changes_after_the_sync_arrive_by_watch(api: ApiServerThread) -> None:
    """A CNP created, a pod relabelled and a CNP deleted after the sync all show in the view."""
    put(api, _pod("web", "10.244.9.2"))

    async def body(source: KubernetesSource) -> None:
        put(api, _cnp("p1"))
        await _until(source, lambda v: _policy_keys(v) == {"default/p1"})
        put(api, _pod("web", "10.244.9.2", app="api"))
        await _until(source, lambda v: (ep := v.endpoints.by_key("default/web")) is not None and ep.labels == {"app": "api"})
        delete(api, "cilium.io", "ciliumnetworkpolicies", "default", "p1")
        await _until(source, lambda v: _policy_keys(v) == set())

    run_source(api, body)


def test_cut_watches_resume_without_losing_objects(api: ApiServerThread) -> None:
    """Every watch cut mid-stream: objects created meanwhile still arrive (resume from the last version)."""

    async def body(source: KubernetesSource) -> None:
        await asyncio.to_thread(api.cut_watches)
        put(api, _cnp("during-cut"), _pod("new", "10.244.9.7"))
        await _until(source, lambda v: "default/during-cut" in _policy_keys(v) and v.endpoints.by_key("default/new") is not None)

    run_source(api, body)


def test_expired_history_relists_and_sweeps_deleted_objects(api: ApiServerThread) -> None:
    """A deletion the watch missed (history compacted, watches cut) disappears after the 410 relist."""
    put(api, _cnp("doomed"), _cnp("stays", app="db"))

    async def body(source: KubernetesSource) -> None:
        await _until(source, lambda v: _policy_keys(v) == {"default/doomed", "default/stays"})
        relists = source.reflectors["ciliumnetworkpolicies"].relists

        def gap() -> None:  # the deletion happens while no watch is open, then the history is gone
            api.stop()
            delete(api, "cilium.io", "ciliumnetworkpolicies", "default", "doomed")
            for _ in range(250):  # push the deletion out of the 200-event history
                put(api, _node("churn", "192.0.2.99"), _node("churn", "192.0.2.98"))
            api.compact()
            api.start()

        await asyncio.to_thread(gap)
        await _until(source, lambda v: _policy_keys(v) == {"default/stays"}, timeout_s=40)
        assert source.reflectors["ciliumnetworkpolicies"].relists > relists

    run_source(api, body)


def test_server_restarted_without_data_converges_to_its_new_state(api: ApiServerThread) -> None:
    """A restarted, emptied server: old versions answer 410, the source relists and drops what is gone."""
    put(api, _cnp("old"))

    async def body(source: KubernetesSource) -> None:
        await _until(source, lambda v: _policy_keys(v) == {"default/old"})
        await asyncio.to_thread(api.restart, keep_data=False)
        put(api, _cnp("new"))
        await _until(source, lambda v: _policy_keys(v) == {"default/new"}, timeout_s=40)

    run_source(api, body)


def test_rotated_token_file_is_reread(api: ApiServerThread, tmp_path: Path) -> None:
    """With a kubeconfig tokenFile (as in-cluster), a rotated token is picked up after the server's 401."""
    token_file = tmp_path / "token"
    token_file.write_text(api.token)
    kubeconfig = write_kubeconfig(tmp_path / "kc", server=api.url, ca_cert=api.ca_cert, token=api.token, token_file=token_file)

    async def body(source: KubernetesSource) -> None:
        new = await asyncio.to_thread(api.rotate_token)
        token_file.write_text(new)
        await asyncio.to_thread(api.cut_watches)
        put(api, _cnp("after-rotation"))
        await _until(source, lambda v: _policy_keys(v) == {"default/after-rotation"}, timeout_s=40)

    run_source(api, body, kubeconfig)


def test_an_invalid_cnp_is_an_error_and_the_rest_load(api: ApiServerThread) -> None:
    """One invalid object is reported by name; the valid ones stay in force."""
    put(api, _cnp("good"), _cnp("bad", valid=False))

    async def body(source: KubernetesSource) -> None:
        view = await _until(source, lambda v: bool(v.policy_errors))
        assert _policy_keys(view) == {"default/good"}
        (error,) = view.policy_errors
        assert "bad" in str(error)
        assert "port" in str(error)

    run_source(api, body)


def test_sources_name_what_is_missing_when_not_synced(tmp_path: Path) -> None:
    """No API server: waiting for the sync times out with the kinds not listed and why."""
    kc = tmp_path / "kc"
    kc.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "x", "cluster": {"server": "https://127.0.0.1:9", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "x", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}],
    }))

    async def main() -> None:
        client = client_from(kc)
        source = KubernetesSource(client, NODE, lambda: None)
        await source.start()
        try:
            with pytest.raises(TimeoutError, match="pods"):
                await source.wait_synced(1.0)
        finally:
            await source.stop()
            await client.close()

    asyncio.run(main())
