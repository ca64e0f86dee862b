"""The API server double against real clients: kubectl 1.37 for the user's verbs, httpx for the protocol
(LIST paging, WATCH with bookmarks and timeouts, 410 after compaction, selectors, 409 preconditions,
/status), faults (cut watches, restart, token rotation), and lightkube as the agent will use it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from membrane.sandbox.apiserver import ApiServerThread

from tests.sandbox.conftest import Kubectl, client_for

pytestmark = pytest.mark.integration  # real kubectl, lightkube and httpx against a server on loopback

CNPS = "/apis/cilium.io/v2/namespaces/default/ciliumnetworkpolicies"
PODS = "/api/v1/namespaces/default/pods"


def cnp(name: str, *, labels: dict[str, str] | None = None, method: str = "GET") -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                     "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                               "rules": {"http": [{"method": method}]}}]}]}}


def pod(name: str, *, node: str = "node-a", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "nginx"}]}}


def create(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = http.post(path, json=body)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def watch_lines(http: httpx.Client, path: str, params: dict[str, str], count: int) -> list[dict[str, Any]]:
    """Reads `count` watch events (or fewer if the server ends the stream)."""
    events: list[dict[str, Any]] = []
    with http.stream("GET", path, params={"watch": "true", **params}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line:
                events.append(json.loads(line))
            if len(events) >= count:
                break
    return events


CNP_YAML = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-get
  labels: {team: a}
spec:
  endpointSelector:
    matchLabels: {app: web}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: METHOD}]
"""

POD_YAML = """\
apiVersion: v1
kind: Pod
metadata:
  name: x
  labels: {app: web}
spec:
  containers:
  - name: c
    image: nginx
"""


# ---- kubectl ------------------------------------------------------------------------------------------------


def test_kubectl_discovers_cilium_short_names(kubectl: Kubectl) -> None:
    """kubectl api-resources lists cnp and ccnp with their scope, from aggregated discovery."""
    out = kubectl.run("api-resources", "--api-group=cilium.io").stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["ciliumnetworkpolicies"][1] == "cnp,ciliumnp"
    assert rows["ciliumnetworkpolicies"][3] == "true"
    assert rows["ciliumclusterwidenetworkpolicies"][1:4] == ["ccnp", "cilium.io/v2", "false"]


def test_kubectl_get_namespaces_prints_the_table(kubectl: Kubectl) -> None:
    """`kubectl get ns` prints the server's Table: NAME STATUS AGE, the default namespaces Active."""
    lines = kubectl.run("get", "ns").stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "AGE"]
    assert lines[1].split()[:2] == ["default", "Active"]


def test_kubectl_apply_twice_then_changed(kubectl: Kubectl, api: ApiServerThread) -> None:
    """apply creates, a second apply is unchanged, an edited apply is configured via a JSON merge patch (a CR)."""
    manifest = CNP_YAML.replace("METHOD", "GET")
    assert kubectl.run("apply", "-f", "-", stdin=manifest).stdout.strip() == \
        "ciliumnetworkpolicy.cilium.io/allow-get created"
    assert kubectl.run("apply", "-f", "-", stdin=manifest).stdout.strip() == \
        "ciliumnetworkpolicy.cilium.io/allow-get unchanged"
    out = kubectl.run("apply", "-f", "-", stdin=manifest.replace("GET", "POST")).stdout.strip()
    assert out == "ciliumnetworkpolicy.cilium.io/allow-get configured"
    stored = api.store.get(api.store_type("cilium.io", "ciliumnetworkpolicies"), "default", "allow-get")
    assert stored["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"] == [{"method": "POST"}]
    assert stored["metadata"]["generation"] == 2
    patches = [r for r in api.server.requests if r.method == "PATCH"]
    assert [p.content_type for p in patches] == ["application/merge-patch+json"]


def test_kubectl_create_validates_on_the_server(kubectl: Kubectl, api: ApiServerThread) -> None:
    """kubectl create works without --validate=false: the OpenAPI v3 documents advertise fieldValidation."""
    kubectl.run("create", "-f", "-", stdin=POD_YAML)
    posts = [r.target for r in api.server.requests if r.method == "POST"]
    assert posts == ["/api/v1/namespaces/default/pods?fieldManager=kubectl-create&fieldValidation=Strict"]


def test_kubectl_get_cnp_all_namespaces_by_short_name(kubectl: Kubectl, http: httpx.Client) -> None:
    """`kubectl get cnp -A` lists policies of every namespace with a NAMESPACE column."""
    create(http, "/api/v1/namespaces", {"metadata": {"name": "team-b"}})
    create(http, CNPS, cnp("p1"))
    create(http, "/apis/cilium.io/v2/namespaces/team-b/ciliumnetworkpolicies", cnp("p2"))
    lines = kubectl.run("get", "cnp", "-A").stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "AGE"]
    assert [line.split()[:2] for line in lines[1:]] == [["default", "p1"], ["team-b", "p2"]]


def test_kubectl_ccnp_is_cluster_scoped(kubectl: Kubectl) -> None:
    """A CCNP applies without a namespace and `kubectl get ccnp` finds it."""
    manifest = CNP_YAML.replace("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy").replace("METHOD", "GET")
    kubectl.run("apply", "-f", "-", stdin=manifest)
    obj = kubectl.json("get", "ccnp", "allow-get")
    assert "namespace" not in obj["metadata"]  # type: ignore[operator]


def test_kubectl_label_overwrite_pod(kubectl: Kubectl, api: ApiServerThread) -> None:
    """`kubectl label pod x app=y --overwrite` changes the label (kubectl 1.37 sends a JSON merge patch)."""
    kubectl.run("create", "-f", "-", stdin=POD_YAML)
    assert kubectl.run("label", "pod", "x", "app=y", "--overwrite").stdout.strip() == "pod/x labeled"
    assert api.store.get(api.store_type("", "pods"), "default", "x")["metadata"]["labels"] == {"app": "y"}
    patches = [r.content_type for r in api.server.requests if r.method == "PATCH"]
    assert patches == ["application/merge-patch+json"]


def test_kubectl_label_without_overwrite_refuses(kubectl: Kubectl) -> None:
    """Relabeling without --overwrite fails in kubectl, as against a real cluster."""
    kubectl.run("create", "-f", "-", stdin=POD_YAML)
    proc = kubectl.run("label", "pod", "x", "app=y", check=False)
    assert "already has a value" in proc.stderr


def test_kubectl_delete_cnp(kubectl: Kubectl, api: ApiServerThread) -> None:
    """`kubectl delete cnp x` removes it; a second delete says NotFound."""
    kubectl.run("apply", "-f", "-", stdin=CNP_YAML.replace("METHOD", "GET"))
    assert 'deleted' in kubectl.run("delete", "cnp", "allow-get").stdout
    assert api.store.objects(api.store_type("cilium.io", "ciliumnetworkpolicies")) == []
    proc = kubectl.run("delete", "cnp", "allow-get", check=False)
    assert 'ciliumnetworkpolicies.cilium.io "allow-get" not found' in proc.stderr


def test_kubectl_pod_lifecycle_and_wide_output(kubectl: Kubectl, http: httpx.Client) -> None:
    """Pods: create, status written by a kubelet shows in -o wide (IP, NODE), delete waits until gone."""
    kubectl.run("create", "-f", "-", stdin=POD_YAML)
    r = http.patch(f"{PODS}/x/status", json={"status": {"phase": "Running", "podIP": "10.244.0.7"}},
                   headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200, r.text
    lines = kubectl.run("get", "pods", "-o", "wide").stdout.splitlines()
    assert lines[0].split()[:7] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    cells = lines[1].split()
    assert [cells[0], cells[2], cells[5]] == ["x", "Running", "10.244.0.7"]
    assert 'pod "x" deleted' in kubectl.run("delete", "pod", "x").stdout
    assert "No resources found" in kubectl.run("get", "pods").stderr


def test_kubectl_namespace_create_and_cascading_delete(kubectl: Kubectl, http: httpx.Client) -> None:
    """Deleting a namespace deletes what is in it."""
    kubectl.run("create", "namespace", "team-c")
    kubectl.run("apply", "-n", "team-c", "-f", "-", stdin=CNP_YAML.replace("METHOD", "GET"))
    kubectl.run("delete", "namespace", "team-c")
    assert http.get("/apis/cilium.io/v2/namespaces/team-c/ciliumnetworkpolicies/allow-get").status_code == 404


def test_kubectl_with_a_wrong_token_is_refused(kubectl: Kubectl, api: ApiServerThread) -> None:
    """A kubeconfig with a token the server does not accept gets 401, which kubectl reports."""
    api.rotate_token("a-new-token")
    stale = kubectl.kubeconfig.read_text().replace("a-new-token", "stale")
    kubectl.kubeconfig.write_text(stale)
    proc = kubectl.run("get", "pods", check=False)
    assert "error: You must be logged in to the server" in proc.stderr


def test_kubectl_get_watch_prints_new_objects(kubectl: Kubectl, http: httpx.Client) -> None:
    """`kubectl get cnp -w` (a Table watch) prints the existing objects, then one created after it started."""
    create(http, CNPS, cnp("first"))
    proc = kubectl.popen("get", "cnp", "-w", "--request-timeout=20s")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split() == ["NAME", "AGE"]
        assert proc.stdout.readline().split()[0] == "first"
        create(http, CNPS, cnp("second"))
        assert proc.stdout.readline().split()[0] == "second"
    finally:
        proc.terminate()
        proc.wait(10)


# ---- protocol: auth -------------------------------------------------------------------------------------------


def test_no_token_is_401(api: ApiServerThread) -> None:
    """A request without a bearer token gets a 401 Status."""
    with client_for(api, token="") as anon:
        r = anon.get("/api/v1/pods")
    assert r.status_code == 401
    assert r.json()["reason"] == "Unauthorized"


def test_rotated_token_rejects_the_old_one(api: ApiServerThread) -> None:
    """After rotation the old token is refused and the new one accepted."""
    old = api.token
    new = api.rotate_token()
    with client_for(api, token=old) as c:
        assert c.get("/api/v1/pods").status_code == 401
    with client_for(api, token=new) as c:
        assert c.get("/api/v1/pods").status_code == 200


def test_health_needs_no_token(api: ApiServerThread) -> None:
    """/readyz answers without credentials, like the real server's health probes."""
    with client_for(api, token="") as anon:
        assert anon.get("/readyz").status_code == 200


# ---- protocol: LIST ---------------------------------------------------------------------------------------


def test_list_pages_with_limit_and_continue(http: httpx.Client) -> None:
    """limit + continue walk every object once, in name order, with remainingItemCount."""
    for i in range(7):
        create(http, CNPS, cnp(f"p{i}"))
    first = http.get(CNPS, params={"limit": "3"}).json()
    assert first["metadata"]["remainingItemCount"] == 4
    names = [o["metadata"]["name"] for o in first["items"]]
    token = first["metadata"]["continue"]
    while token:
        page = http.get(CNPS, params={"limit": "3", "continue": token}).json()
        names += [o["metadata"]["name"] for o in page["items"]]
        token = page["metadata"].get("continue")
    assert names == [f"p{i}" for i in range(7)]


def test_list_pages_are_one_snapshot(http: httpx.Client) -> None:
    """Pages after the first show the list's resourceVersion: later creates and deletes do not appear."""
    for i in range(4):
        create(http, CNPS, cnp(f"p{i}"))
    first = http.get(CNPS, params={"limit": "2"}).json()
    create(http, CNPS, cnp("p9"))
    assert http.delete(f"{CNPS}/p3").status_code == 200
    rest = http.get(CNPS, params={"limit": "10", "continue": first["metadata"]["continue"]}).json()
    assert [o["metadata"]["name"] for o in rest["items"]] == ["p2", "p3"]
    assert rest["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]


def test_continue_after_compaction_is_410(api: ApiServerThread, http: httpx.Client) -> None:
    """A continue token from before a compaction answers 410 Expired, as etcd compaction does."""
    for i in range(3):
        create(http, CNPS, cnp(f"p{i}"))
    first = http.get(CNPS, params={"limit": "1"}).json()
    create(http, CNPS, cnp("later"))
    api.compact()
    r = http.get(CNPS, params={"limit": "1", "continue": first["metadata"]["continue"]})
    assert r.status_code == 410
    assert r.json()["reason"] == "Expired"


def test_field_selectors(http: httpx.Client) -> None:
    """fieldSelector on spec.nodeName, metadata.name and metadata.namespace (= and !=)."""
    create(http, PODS, pod("a", node="n1"))
    create(http, PODS, pod("b", node="n2"))
    create(http, "/api/v1/namespaces", {"metadata": {"name": "other"}})
    create(http, "/api/v1/namespaces/other/pods", pod("c", node="n1"))

    def names(sel: str) -> list[str]:
        r = http.get("/api/v1/pods", params={"fieldSelector": sel})
        assert r.status_code == 200, r.text
        return [o["metadata"]["name"] for o in r.json()["items"]]

    assert names("spec.nodeName=n1") == ["a", "c"]
    assert names("spec.nodeName!=n1") == ["b"]
    assert names("metadata.name==b") == ["b"]
    assert names("metadata.namespace=other,spec.nodeName=n1") == ["c"]


def test_unsupported_field_selector_is_400(http: httpx.Client) -> None:
    """A field the resource cannot be selected by is refused with the real server's message."""
    r = http.get(CNPS, params={"fieldSelector": "spec.nodeName=n1"})
    assert r.status_code == 400
    assert r.json()["message"] == "field label not supported: spec.nodeName"


@pytest.mark.parametrize(("selector", "expected"), [
    ("app=web", ["a", "b"]),
    ("app==web,tier=db", ["b"]),
    ("app!=web", ["c", "d"]),
    ("tier in (db, cache)", ["b", "c"]),
    ("tier notin (db)", ["a", "c", "d"]),
    ("tier", ["b", "c"]),
    ("!tier", ["a", "d"]),
    ("", ["a", "b", "c", "d"]),
])
def test_label_selectors(http: httpx.Client, selector: str, expected: list[str]) -> None:
    """labelSelector with every operator apimachinery accepts."""
    create(http, CNPS, cnp("a", labels={"app": "web"}))
    create(http, CNPS, cnp("b", labels={"app": "web", "tier": "db"}))
    create(http, CNPS, cnp("c", labels={"app": "api", "tier": "cache"}))
    create(http, CNPS, cnp("d"))
    r = http.get(CNPS, params={"labelSelector": selector})
    assert [o["metadata"]["name"] for o in r.json()["items"]] == expected


def test_bad_label_selector_is_400(http: httpx.Client) -> None:
    """A selector that does not parse is a 400 naming it."""
    r = http.get(CNPS, params={"labelSelector": "tier in ()"})
    assert r.status_code == 400
    assert "tier in ()" in r.json()["message"]


def test_table_for_a_list(http: httpx.Client) -> None:
    """Accept as=Table answers a meta.k8s.io/v1 Table with NAME and AGE for a CR."""
    create(http, CNPS, cnp("a"))
    r = http.get(CNPS, headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"})
    body = r.json()
    assert body["kind"] == "Table"
    assert [c["name"] for c in body["columnDefinitions"]] == ["Name", "Age"]
    assert body["rows"][0]["cells"][0] == "a"


# ---- protocol: WATCH --------------------------------------------------------------------------------------


def test_watch_from_resource_version_streams_changes_and_bookmarks(api: ApiServerThread, http: httpx.Client) -> None:
    """A watch from the list's RV replays later changes in order, then sends bookmarks with the current RV."""
    create(http, CNPS, cnp("before"))
    rv = http.get(CNPS).json()["metadata"]["resourceVersion"]
    create(http, CNPS, cnp("after"))
    http.patch(f"{CNPS}/after", json={"metadata": {"labels": {"x": "y"}}},
               headers={"Content-Type": "application/merge-patch+json"})
    assert http.delete(f"{CNPS}/before").status_code == 200
    events = watch_lines(http, CNPS, {"resourceVersion": rv, "allowWatchBookmarks": "true"}, 4)
    assert [(e["type"], e["object"]["metadata"].get("name")) for e in events] == [
        ("ADDED", "after"), ("MODIFIED", "after"), ("DELETED", "before"), ("BOOKMARK", None)]
    assert events[3]["object"]["metadata"]["resourceVersion"] == str(api.store.resource_version)


def test_watch_without_resource_version_starts_with_the_current_state(http: httpx.Client) -> None:
    """A watch without resourceVersion first sends ADDED for every existing object."""
    create(http, CNPS, cnp("a"))
    create(http, CNPS, cnp("b"))
    events = watch_lines(http, CNPS, {}, 2)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "a"), ("ADDED", "b")]


def test_watch_send_initial_events_ends_with_a_marked_bookmark(http: httpx.Client) -> None:
    """sendInitialEvents=true (the watch-list protocol) ends the initial ADDEDs with an initial-events-end bookmark."""
    create(http, CNPS, cnp("a"))
    events = watch_lines(http, CNPS, {"sendInitialEvents": "true", "allowWatchBookmarks": "true",
                                      "resourceVersionMatch": "NotOlderThan"}, 2)
    assert events[1]["type"] == "BOOKMARK"
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_timeout_seconds_ends_the_stream(api: ApiServerThread, http: httpx.Client) -> None:
    """timeoutSeconds=1 makes the server end the chunked stream cleanly (after a last bookmark)."""
    rv = str(api.store.resource_version)
    events = watch_lines(http, CNPS, {"resourceVersion": rv, "timeoutSeconds": "1", "allowWatchBookmarks": "true"},
                         1000)
    assert events[-1]["type"] == "BOOKMARK"
    assert {e["type"] for e in events} == {"BOOKMARK"}


def test_watch_live_events_with_a_label_selector(api: ApiServerThread, http: httpx.Client) -> None:
    """A watch with a labelSelector sees an object ADDED when it starts matching and DELETED when it stops."""
    rv = str(api.store.resource_version)
    create(http, CNPS, cnp("a"))
    merge = {"Content-Type": "application/merge-patch+json"}
    http.patch(f"{CNPS}/a", json={"metadata": {"labels": {"app": "web"}}}, headers=merge)
    http.patch(f"{CNPS}/a", json={"metadata": {"labels": {"app": "db"}}}, headers=merge)
    events = watch_lines(http, CNPS, {"resourceVersion": rv, "labelSelector": "app=web"}, 2)
    assert [e["type"] for e in events] == ["ADDED", "DELETED"]
    # DELETED carries the last state that matched, at the resourceVersion of the change that unmatched it.
    assert events[1]["object"]["metadata"]["labels"] == {"app": "web"}
    assert events[1]["object"]["metadata"]["resourceVersion"] == str(api.store.resource_version)


def test_watch_field_selector_on_node_name(api: ApiServerThread, http: httpx.Client) -> None:
    """A watch with fieldSelector=spec.nodeName sees only that node's pods (as Cilium's agent watches)."""
    rv = str(api.store.resource_version)
    create(http, PODS, pod("other", node="n2"))
    create(http, PODS, pod("mine", node="n1"))
    events = watch_lines(http, "/api/v1/pods", {"resourceVersion": rv, "fieldSelector": "spec.nodeName=n1"}, 1)
    assert [e["object"]["metadata"]["name"] for e in events] == ["mine"]


def test_watch_receives_events_committed_while_it_is_open(api: ApiServerThread, http: httpx.Client) -> None:
    """Events committed after the watch started arrive on the open stream."""
    rv = str(api.store.resource_version)
    with client_for(api) as writer, http.stream("GET", CNPS, params={"watch": "1", "resourceVersion": rv}) as r:
        create(writer, CNPS, cnp("live"))
        line = next(r.iter_lines())
    assert json.loads(line)["object"]["metadata"]["name"] == "live"


def test_watch_from_compacted_version_is_410_error_event(api: ApiServerThread, http: httpx.Client) -> None:
    """A watch from a resourceVersion older than the history answers 200 with one ERROR event: a 410 Status."""
    old = str(api.store.resource_version)
    create(http, CNPS, cnp("a"))
    api.compact()
    events = watch_lines(http, CNPS, {"resourceVersion": old}, 10)
    assert len(events) == 1
    assert events[0]["type"] == "ERROR"
    assert (events[0]["object"]["code"], events[0]["object"]["reason"]) == (410, "Expired")


def test_bounded_history_expires_old_versions(tmp_path: Path) -> None:
    """With a history of 5 events, a watch from 10 changes ago gets 410 while a recent version works."""
    with ApiServerThread(state_dir=tmp_path / "api", history_size=5) as api, client_for(api) as http:
        old = str(api.store.resource_version)
        for i in range(10):
            create(http, CNPS, cnp(f"p{i}"))
        assert watch_lines(http, CNPS, {"resourceVersion": old}, 1)[0]["type"] == "ERROR"
        recent = str(api.store.resource_version - 2)
        events = watch_lines(http, CNPS, {"resourceVersion": recent}, 2)
        assert [e["object"]["metadata"]["name"] for e in events] == ["p8", "p9"]


# ---- protocol: writes -------------------------------------------------------------------------------------


def test_create_twice_is_409_already_exists(http: httpx.Client) -> None:
    """A second POST of the same name is 409 AlreadyExists."""
    create(http, CNPS, cnp("a"))
    r = http.post(CNPS, json=cnp("a"))
    assert r.status_code == 409
    assert r.json()["reason"] == "AlreadyExists"


def test_create_in_missing_namespace_is_404(http: httpx.Client) -> None:
    """Namespaced objects need their namespace to exist."""
    r = http.post("/apis/cilium.io/v2/namespaces/nope/ciliumnetworkpolicies", json=cnp("a"))
    assert r.status_code == 404
    assert r.json()["message"] == 'namespaces "nope" not found'


def test_stale_update_is_409_conflict(http: httpx.Client) -> None:
    """PUT with an old metadata.resourceVersion is 409 Conflict; with the current one it succeeds."""
    obj = create(http, CNPS, cnp("a"))
    obj["metadata"]["labels"] = {"v": "1"}
    fresh = http.put(f"{CNPS}/a", json=obj)
    assert fresh.status_code == 200
    obj["metadata"]["labels"] = {"v": "2"}
    stale = http.put(f"{CNPS}/a", json=obj)
    assert stale.status_code == 409
    assert stale.json()["reason"] == "Conflict"


def test_generation_counts_spec_changes_only(http: httpx.Client) -> None:
    """generation is bumped by a spec change, not by a label change."""
    create(http, CNPS, cnp("a"))
    merge = {"Content-Type": "application/merge-patch+json"}
    labeled = http.patch(f"{CNPS}/a", json={"metadata": {"labels": {"x": "y"}}}, headers=merge).json()
    assert labeled["metadata"]["generation"] == 1
    changed = http.patch(f"{CNPS}/a", json={"spec": {"endpointSelector": {"matchLabels": {"app": "db"}}}},
                         headers=merge).json()
    assert changed["metadata"]["generation"] == 2


def test_status_merge_patch_changes_status_only(http: httpx.Client) -> None:
    """PATCH /status merges status, ignores spec in the same patch, and leaves generation alone."""
    create(http, CNPS, cnp("a"))
    cond = {"type": "membrane.io/Valid", "status": "False", "reason": "BadRegex"}
    r = http.patch(f"{CNPS}/a/status", json={"status": {"conditions": [cond]}, "spec": {"endpointSelector": {}}},
                   headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"]["conditions"] == [cond]
    assert body["spec"]["endpointSelector"] == {"matchLabels": {"app": "web"}}
    assert body["metadata"]["generation"] == 1


def test_status_patch_with_stale_resource_version_is_409(http: httpx.Client) -> None:
    """A status merge patch carrying an old metadata.resourceVersion is 409 (optimistic concurrency)."""
    obj = create(http, CNPS, cnp("a"))
    merge = {"Content-Type": "application/merge-patch+json"}
    http.patch(f"{CNPS}/a/status", json={"status": {"x": 1}}, headers=merge)
    r = http.patch(f"{CNPS}/a/status", json={"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                                            "status": {"x": 2}}, headers=merge)
    assert r.status_code == 409


def test_main_resource_update_keeps_status(http: httpx.Client) -> None:
    """A write to the object itself does not change its status (the status subresource owns it)."""
    create(http, CNPS, cnp("a"))
    merge = {"Content-Type": "application/merge-patch+json"}
    http.patch(f"{CNPS}/a/status", json={"status": {"x": 1}}, headers=merge)
    r = http.patch(f"{CNPS}/a", json={"status": {"x": 2}}, headers=merge)
    assert r.json()["status"] == {"x": 1}


def test_json_patch(http: httpx.Client) -> None:
    """application/json-patch+json applies RFC 6902 operations; a failed test op is 422."""
    create(http, CNPS, cnp("a"))
    ops = [{"op": "add", "path": "/metadata/labels/k", "value": "v"}]
    r = http.patch(f"{CNPS}/a", content=json.dumps(ops), headers={"Content-Type": "application/json-patch+json"})
    assert r.json()["metadata"]["labels"] == {"k": "v"}
    bad = [{"op": "test", "path": "/metadata/labels/k", "value": "other"}]
    r = http.patch(f"{CNPS}/a", content=json.dumps(bad), headers={"Content-Type": "application/json-patch+json"})
    assert r.status_code == 422


def test_strategic_merge_patch_on_a_custom_resource_is_415(http: httpx.Client) -> None:
    """Custom resources refuse strategic merge patches, as a real server does (kubectl then uses merge)."""
    create(http, CNPS, cnp("a"))
    r = http.patch(f"{CNPS}/a", json={"metadata": {"labels": {"k": "v"}}},
                   headers={"Content-Type": "application/strategic-merge-patch+json"})
    assert r.status_code == 415


def test_server_side_apply_creates_then_merges(http: httpx.Client) -> None:
    """application/apply-patch+yaml with a fieldManager creates a missing object and merges into an existing one."""
    headers = {"Content-Type": "application/apply-patch+yaml"}
    r = http.patch(f"{CNPS}/a", params={"fieldManager": "t"}, content=json.dumps(cnp("a")), headers=headers)
    assert r.status_code == 201
    r = http.patch(f"{CNPS}/a", params={"fieldManager": "t"}, headers=headers,
                   content=json.dumps({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                                       "metadata": {"name": "a", "labels": {"k": "v"}}}))
    assert r.json()["metadata"]["labels"] == {"k": "v"}


def test_delete_with_stale_precondition_is_409(http: httpx.Client) -> None:
    """DeleteOptions.preconditions.resourceVersion must match."""
    create(http, CNPS, cnp("a"))
    r = http.request("DELETE", f"{CNPS}/a", json={"preconditions": {"resourceVersion": "1"}})
    assert r.status_code == 409


def test_finalizers_hold_deletion_until_removed(http: httpx.Client) -> None:
    """An object with finalizers is only marked on DELETE; removing the last finalizer deletes it."""
    body = cnp("a")
    body["metadata"]["finalizers"] = ["example.com/hold"]
    create(http, CNPS, body)
    marked = http.delete(f"{CNPS}/a").json()
    assert "deletionTimestamp" in marked["metadata"]
    http.patch(f"{CNPS}/a", json={"metadata": {"finalizers": None}},
               headers={"Content-Type": "application/merge-patch+json"})
    assert http.get(f"{CNPS}/a").status_code == 404


# ---- faults ---------------------------------------------------------------------------------------------


def test_cut_watches_breaks_open_streams(api: ApiServerThread, http: httpx.Client) -> None:
    """cut_watches aborts every open watch connection: the client sees the stream fail."""
    with http.stream("GET", CNPS, params={"watch": "1", "resourceVersion": str(api.store.resource_version)}) as r:
        lines = r.iter_lines()
        create(http, CNPS, cnp("a"))
        next(lines)
        assert api.watching_resources() == ["ciliumnetworkpolicies.cilium.io"]
        assert api.cut_watches() == 1
        with pytest.raises(httpx.HTTPError):
            list(lines)
    assert api.call(lambda s: s.open_watches) == 0


def test_restart_keeps_data_and_port(api: ApiServerThread, http: httpx.Client) -> None:
    """A restart with data keeps objects, port and resourceVersions (watches resume from them)."""
    create(http, CNPS, cnp("a"))
    url, rv = api.url, str(api.store.resource_version)
    api.restart(keep_data=True)
    assert api.url == url
    with client_for(api) as fresh:
        assert fresh.get(f"{CNPS}/a").status_code == 200
        create(fresh, CNPS, cnp("b"))
        events = watch_lines(fresh, CNPS, {"resourceVersion": rv}, 1)
    assert events[0]["object"]["metadata"]["name"] == "b"


def test_restart_without_data_forgets_objects_and_old_versions(api: ApiServerThread, http: httpx.Client) -> None:
    """A restart without data empties the store (defaults seeded again) and old versions get 410."""
    create(http, CNPS, cnp("a"))
    rv = str(api.store.resource_version)
    api.restart(keep_data=False)
    with client_for(api) as fresh:
        assert fresh.get(f"{CNPS}/a").status_code == 404
        assert fresh.get("/api/v1/namespaces/default").status_code == 200
        assert watch_lines(fresh, CNPS, {"resourceVersion": rv}, 1)[0]["object"]["code"] == 410


def test_injected_errors(api: ApiServerThread, http: httpx.Client) -> None:
    """inject_errors answers the next N matching requests with the given code, then serves normally."""
    api.inject_errors(2, code=503, path_prefix="/apis/cilium.io")
    assert http.get(CNPS).status_code == 503
    assert http.get("/api/v1/pods").status_code == 200
    assert http.get(CNPS).status_code == 503
    assert http.get(CNPS).status_code == 200


def test_default_kubernetes_endpointslice_names_the_server(api: ApiServerThread, http: httpx.Client) -> None:
    """default/kubernetes EndpointSlice holds the server's address (the kube-apiserver entity's source)."""
    eps = http.get("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes").json()
    assert eps["endpoints"][0]["addresses"] == ["127.0.0.1"]
    assert eps["ports"][0]["port"] == api.server.port


# ---- lightkube ----------------------------------------------------------------------------------------------


def test_lightkube_lists_and_watches_cnps(api: ApiServerThread, http: httpx.Client) -> None:
    """lightkube (what the agent uses) lists CNPs as generic resources, watches from the list's RV, and gets
    ApiError 410 on an expired version."""
    from lightkube import AsyncClient, KubeConfig
    from lightkube.core.exceptions import ApiError
    from lightkube.generic_resource import create_namespaced_resource

    cnp_type = create_namespaced_resource("cilium.io", "v2", "CiliumNetworkPolicy", "ciliumnetworkpolicies")
    create(http, CNPS, cnp("existing"))

    async def scenario() -> tuple[list[str], list[tuple[str, str]], int]:
        client = AsyncClient(config=KubeConfig.from_file(api.kubeconfig))
        listing = client.list(cnp_type, namespace="*")
        names = [o.metadata.name async for o in listing]  # type: ignore[union-attr]
        rv = listing.resourceVersion  # type: ignore[attr-defined]
        await client.create(cnp_type(metadata={"name": "new", "namespace": "default"}, spec={}))
        await client.delete(cnp_type, "existing", namespace="default")
        seen: list[tuple[str, str]] = []
        async for typ, obj in client.watch(cnp_type, namespace="*", resource_version=rv):
            seen.append((typ, obj.metadata.name))  # type: ignore[union-attr]
            if len(seen) == 2:
                break
        api.compact()
        code = 0
        try:
            async for _ in client.watch(cnp_type, namespace="*", resource_version=rv):
                break
        except ApiError as e:
            code = e.status.code or 0
        await client.close()
        return names, seen, code

    names, seen, code = asyncio.run(scenario())
    assert names == ["existing"]
    assert seen == [("ADDED", "new"), ("DELETED", "existing")]
    assert code == 410


def test_python_entry_point_prints_the_kubeconfig(tmp_path: Path) -> None:
    """`python -m membrane.sandbox.apiserver --port 0 --state-dir D` prints its kubeconfig and stops on SIGTERM."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "membrane.sandbox.apiserver", "--port", "0", "--state-dir",
                             str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"apiserver ready kubeconfig={tmp_path / 'kubeconfig'} ")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0




def test_lightkube_rereads_a_rotated_token_file(api: ApiServerThread, tmp_path: Path) -> None:
    """With a kubeconfig naming a tokenFile, lightkube keeps working across a rotation: it re-reads the file on 401."""
    from lightkube import AsyncClient, KubeConfig
    from lightkube.resources.core_v1 import Namespace

    kubeconfig = api.call(lambda s: s.write_kubeconfig(tmp_path / "kc-file", use_token_file=True))

    async def names(client: AsyncClient) -> list[str]:
        return [ns.metadata.name async for ns in client.list(Namespace)]  # type: ignore[union-attr,misc]

    async def scenario() -> tuple[list[str], list[str]]:
        client = AsyncClient(config=KubeConfig.from_file(kubeconfig))
        before = await names(client)
        api.rotate_token()
        after = await names(client)
        await client.close()
        return before, after

    before, after = asyncio.run(scenario())
    assert before == after
    assert "default" in after


def test_kubectl_apply_pod_twice_uses_strategic_merge(kubectl: Kubectl, api: ApiServerThread) -> None:
    """kubectl apply on a Pod: created, unchanged, then configured with a strategic merge patch."""
    assert kubectl.run("apply", "-f", "-", stdin=POD_YAML).stdout.strip() == "pod/x created"
    assert kubectl.run("apply", "-f", "-", stdin=POD_YAML).stdout.strip() == "pod/x unchanged"
    changed = POD_YAML.replace("app: web", "app: web2")
    assert kubectl.run("apply", "-f", "-", stdin=changed).stdout.strip() == "pod/x configured"
    assert api.store.get(api.store_type("", "pods"), "default", "x")["metadata"]["labels"] == {"app": "web2"}
    patches = [r.content_type for r in api.server.requests if r.method == "PATCH"]
    assert patches == ["application/strategic-merge-patch+json"]


def test_kubectl_create_namespace_sends_protobuf(kubectl: Kubectl, api: ApiServerThread) -> None:
    """`kubectl create namespace` POSTs a protobuf body; the double decodes it."""
    kubectl.run("create", "namespace", "proto-ns")
    assert api.store.get(api.store_type("", "namespaces"), "", "proto-ns")["status"] == {"phase": "Active"}
    posts = [r.content_type for r in api.server.requests if r.method == "POST"]
    assert posts == ["application/vnd.kubernetes.protobuf"]


def test_legacy_discovery_documents(http: httpx.Client) -> None:
    """Without the aggregated Accept, /apis/cilium.io/v2 is an APIResourceList with kinds, scope and short names."""
    doc = http.get("/apis/cilium.io/v2").json()
    entries = {r["name"]: r for r in doc["resources"]}
    assert doc["kind"] == "APIResourceList"
    assert entries["ciliumnetworkpolicies"]["shortNames"] == ["cnp", "ciliumnp"]
    assert entries["ciliumclusterwidenetworkpolicies"]["namespaced"] is False
    assert entries["ciliumnetworkpolicies/status"]["verbs"] == ["get", "patch", "update"]


def test_kubectl_uses_aggregated_discovery(kubectl: Kubectl, api: ApiServerThread) -> None:
    """kubectl reads discovery from /api and /apis alone (the aggregated form), never per group/version."""
    kubectl.run("get", "cnp")
    discovery = [r.target.split("?")[0] for r in api.server.requests if r.target.startswith(("/api?", "/apis?"))
                 or r.target.split("?")[0] in ("/api/v1", "/apis/cilium.io/v2")]
    assert discovery == ["/api", "/apis"]


def test_custom_resource_update_needs_a_resource_version(http: httpx.Client) -> None:
    """PUT of a custom resource without metadata.resourceVersion is 422, as for a real CRD."""
    obj = create(http, CNPS, cnp("a"))
    del obj["metadata"]["resourceVersion"]
    r = http.put(f"{CNPS}/a", json=obj)
    assert r.status_code == 422
    assert "must be specified for an update" in r.json()["message"]


def test_watch_from_a_future_version_is_504(api: ApiServerThread, http: httpx.Client) -> None:
    """A watch from a resourceVersion the server has not reached is refused as too large (clients relist)."""
    r = http.get(CNPS, params={"watch": "1", "resourceVersion": str(api.store.resource_version + 100)})
    assert r.status_code == 504
    assert r.json()["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"


def test_invalid_name_is_422(http: httpx.Client) -> None:
    """metadata.name must be a lowercase RFC 1123 subdomain."""
    r = http.post(CNPS, json=cnp("Not_Valid"))
    assert r.status_code == 422
    assert "RFC 1123" in r.json()["message"]


def test_default_namespace_cannot_be_deleted(http: httpx.Client) -> None:
    """The default namespace is protected (403), as on a real cluster."""
    assert http.delete("/api/v1/namespaces/default").status_code == 403


def test_namespaces_carry_their_name_label(http: httpx.Client) -> None:
    """Every namespace gets kubernetes.io/metadata.name (namespace selectors rely on it)."""
    created = create(http, "/api/v1/namespaces", {"metadata": {"name": "team-x", "labels": {"env": "prod"}}})
    assert created["metadata"]["labels"] == {"env": "prod", "kubernetes.io/metadata.name": "team-x"}


def test_kubectl_create_configmap_and_serviceaccount(kubectl: Kubectl, api: ApiServerThread) -> None:
    """Typed creates with protobuf bodies carrying empty strings for unset fields (gogo-protobuf) work."""
    kubectl.run("create", "configmap", "cm1", "--from-literal=a=b")
    kubectl.run("create", "serviceaccount", "sa1")
    assert api.store.get(api.store_type("", "configmaps"), "default", "cm1")["data"] == {"a": "b"}
    assert api.store.get(api.store_type("", "serviceaccounts"), "default", "sa1")["metadata"]["namespace"] == "default"


def test_pod_binding_sets_the_node_once(http: httpx.Client) -> None:
    """POST pods/x/binding (a scheduler's call) sets spec.nodeName; binding again is 409."""
    unbound = pod("x")
    del unbound["spec"]["nodeName"]
    create(http, PODS, unbound)
    binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "x"},
               "target": {"apiVersion": "v1", "kind": "Node", "name": "node-a"}}
    assert http.post(f"{PODS}/x/binding", json=binding).status_code == 201
    assert http.get(f"{PODS}/x").json()["spec"]["nodeName"] == "node-a"
    assert http.post(f"{PODS}/x/binding", json=binding).status_code == 409


def test_default_node_binds_new_pods(tmp_path: Path) -> None:
    """With default_node, a pod created without spec.nodeName is bound to it on creation (the sandbox's node)."""
    with ApiServerThread(state_dir=tmp_path / "api", default_node="sandbox") as api, client_for(api) as http:
        unbound = pod("x")
        del unbound["spec"]["nodeName"]
        assert create(http, PODS, unbound)["spec"]["nodeName"] == "sandbox"
        assert create(http, PODS, pod("y", node="elsewhere"))["spec"]["nodeName"] == "elsewhere"


def test_annotations_over_256_kib_are_422(http: httpx.Client) -> None:
    """Total annotation size is limited to 256 KiB, as on a real server."""
    body = cnp("a")
    body["metadata"]["annotations"] = {"big": "x" * 262_145}
    assert http.post(CNPS, json=body).status_code == 422


def test_runs_on_the_callers_uvloop(tmp_path: Path) -> None:
    """ApiServer runs on the caller's event loop (uvloop, as the agent's), serving a list and a watch there."""
    import ssl

    import uvloop
    from membrane.sandbox.apiserver import ApiServer

    async def scenario() -> tuple[int, str]:
        server = ApiServer(state_dir=tmp_path / "api")
        await server.start()
        ctx = ssl.create_default_context(cafile=str(server.tls.ca_cert))
        try:
            async with httpx.AsyncClient(base_url=server.url, verify=ctx,
                                         headers={"Authorization": f"Bearer {server.token}"}) as client:
                listed = await client.get("/api/v1/namespaces")
                rv = listed.json()["metadata"]["resourceVersion"]
                async with client.stream("GET", "/api/v1/namespaces",
                                         params={"watch": "1", "resourceVersion": rv}) as r:
                    await client.post("/api/v1/namespaces", json={"metadata": {"name": "late"}})
                    line = await r.aiter_lines().__anext__()
        finally:
            await server.stop()
        return listed.status_code, json.loads(line)["object"]["metadata"]["name"]

    assert uvloop.run(scenario()) == (200, "late")


def test_body_over_3_mib_is_413(http: httpx.Client) -> None:
    """Request bodies are limited to 3 MiB (kube-apiserver's limit); the answer is a 413 Status."""
    body = cnp("a")
    body["spec"]["pad"] = "x" * (3 * 1024 * 1024 + 1)
    r = http.post(CNPS, json=body)
    assert r.status_code == 413
    assert http.get(CNPS).status_code == 200  # the connection serves on


def test_lightkube_pages_and_reads_cluster_wide_policies(api: ApiServerThread, http: httpx.Client) -> None:
    """lightkube pages a LIST with chunk_size (limit + continue) and lists CCNPs as a global generic resource."""
    from lightkube import AsyncClient, KubeConfig
    from lightkube.generic_resource import create_global_resource, create_namespaced_resource

    cnp_type = create_namespaced_resource("cilium.io", "v2", "CiliumNetworkPolicy", "ciliumnetworkpolicies")
    ccnp_type = create_global_resource("cilium.io", "v2", "CiliumClusterwideNetworkPolicy",
                                       "ciliumclusterwidenetworkpolicies")
    for i in range(5):
        create(http, CNPS, cnp(f"p{i}"))
    ccnp = cnp("cluster")
    ccnp["kind"] = "CiliumClusterwideNetworkPolicy"
    create(http, "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies", ccnp)

    async def scenario() -> tuple[list[str], list[str]]:
        client = AsyncClient(config=KubeConfig.from_file(api.kubeconfig))
        paged = [o.metadata.name async for o in client.list(cnp_type, namespace="*", chunk_size=2)]  # type: ignore[union-attr]
        cluster = [o.metadata.name async for o in client.list(ccnp_type)]  # type: ignore[union-attr]
        await client.close()
        return paged, cluster

    paged, cluster = asyncio.run(scenario())
    assert paged == [f"p{i}" for i in range(5)]
    assert cluster == ["cluster"]
    limits = [r.target for r in api.server.requests if "limit=2" in r.target]
    assert len(limits) == 3


def test_outage_then_start_on_the_same_port(api: ApiServerThread, http: httpx.Client) -> None:
    """stop() refuses connections until start(); the data survives and the URL is unchanged."""
    create(http, CNPS, cnp("a"))
    api.stop()
    with client_for(api) as down, pytest.raises(httpx.ConnectError):
        down.get(CNPS)
    api.start()
    with client_for(api) as up:
        assert [o["metadata"]["name"] for o in up.get(CNPS).json()["items"]] == ["a"]


def test_kubectl_strict_validation_names_unknown_fields(kubectl: Kubectl) -> None:
    """kubectl's default fieldValidation=Strict turns a misspelt field into an error naming it;
    --validate=false (fieldValidation=Ignore) lets it through, as against a real server."""
    typo = CNP_YAML.replace("METHOD", "GET").replace("spec:", "spc:")
    proc = kubectl.run("apply", "-f", "-", stdin=typo, check=False)
    assert 'strict decoding error: unknown field "spc"' in proc.stderr
    assert kubectl.run("apply", "--validate=false", "-f", "-", stdin=typo).returncode == 0
