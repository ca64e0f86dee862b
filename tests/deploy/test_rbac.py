"""RBAC grants only what is used: every (role, apiGroup, resource, verb) the chart renders is in the
allowlist below, and every allowlisted grant is rendered. A new grant needs a line here, with its use."""

from __future__ import annotations

from typing import Any

from tests.deploy.util import by_kind, render

AGENT = "mbr-membrane"
CLEANUP = f"{AGENT}-cleanup"

# (kind/name of the role, apiGroup, resource, verb): why.
ALLOWED: dict[tuple[str, str, str, str], str] = {}


def _allow(role: str, group: str, resources: list[str], verbs: list[str], why: str) -> None:
    for r in resources:
        for v in verbs:
            ALLOWED[(role, group, r, v)] = why


_allow(f"ClusterRole/{AGENT}", "", ["pods", "namespaces", "nodes"], ["get", "list", "watch"],
       "endpoints and the ipcache (pods), namespace selectors (namespaces), host/remote-node entities (nodes)")
_allow(f"ClusterRole/{AGENT}", "cilium.io", ["ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"],
       ["get", "list", "watch"], "the policies")
_allow(f"ClusterRole/{AGENT}", "cilium.io", ["ciliumnetworkpolicies/status", "ciliumclusterwidenetworkpolicies/status"],
       ["patch"], "the agent's own condition on an invalid policy (merge-patch of status)")
_allow(f"ClusterRole/{AGENT}", "networking.k8s.io", ["networkpolicies"], ["get", "list", "watch"], "Kubernetes NetworkPolicies")
_allow(f"ClusterRole/{AGENT}", "discovery.k8s.io", ["endpointslices"], ["get", "list", "watch"],
       "the default/kubernetes EndpointSlice (kube-apiserver entity)")
_allow(f"ClusterRole/{AGENT}", "", ["events"], ["create", "patch"], "Events on invalid policies (core/v1)")
_allow(f"ClusterRole/{AGENT}", "events.k8s.io", ["events"], ["create", "patch"], "the same Events through events.k8s.io/v1")
_allow(f"Role/{AGENT}", "coordination.k8s.io", ["leases"], ["get", "create", "update"],
       "the status-writer Lease, so one agent at a time writes conditions")
_allow(f"Role/{CLEANUP}", "apps", ["daemonsets"], ["get"], "the uninstall hook Job waits for the cleanup DaemonSet")


def _grants(docs: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    out = set()
    for doc in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
        role = f"{doc['kind']}/{doc['metadata']['name']}"
        for rule in doc["rules"]:
            assert "nonResourceURLs" not in rule, f"{role}: nonResourceURLs are never needed"
            for g in rule["apiGroups"]:
                for r in rule["resources"]:
                    for v in rule["verbs"]:
                        out.add((role, g, r, v))
    return out


def test_every_grant_is_allowlisted() -> None:
    """Nothing beyond the allowlist: no wildcard, no extra verb or resource."""
    extra = sorted(_grants(render()) - set(ALLOWED))
    assert extra == []


def test_every_allowlisted_grant_is_rendered() -> None:
    """The allowlist is not stale: each line is rendered by the chart."""
    missing = sorted(set(ALLOWED) - _grants(render()))
    assert missing == []


def test_no_wildcards_and_no_secrets() -> None:
    """No `*` anywhere and no access to secrets."""
    grants = _grants(render())
    assert [g for g in grants if "*" in g] == []
    assert [g for g in grants if g[2] == "secrets"] == []


def test_the_cleanup_role_reads_only_its_own_daemonset() -> None:
    """The hook's Role is limited by resourceNames to the cleanup DaemonSet."""
    (role,) = [r for r in by_kind(render(), "Role") if r["metadata"]["name"] == CLEANUP]
    assert [rule["resourceNames"] for rule in role["rules"]] == [[CLEANUP]]


def test_lease_role_is_namespaced_to_the_release() -> None:
    """Leases are granted by a Role in the release namespace, not cluster-wide."""
    docs = render(namespace="netpol")
    (role,) = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == AGENT]
    assert role["metadata"]["namespace"] == "netpol"
    cluster = {(g[1], g[2]) for g in _grants(docs) if g[0].startswith("ClusterRole/")}
    assert ("coordination.k8s.io", "leases") not in cluster


def test_bindings_name_the_service_account() -> None:
    """Each binding grants its role to the chart's service account in the release namespace, and only to it."""
    docs = render()
    for b in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding"):
        name = b["metadata"]["name"]
        assert b["roleRef"]["name"] == name
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": "membrane-system"}]


def test_rbac_create_false_renders_no_agent_roles() -> None:
    """rbac.create=false leaves the agent's RBAC to the operator (the cleanup hook keeps its own)."""
    roles = {d["metadata"]["name"] for d in by_kind(render({"rbac.create": "false"}), "Role") + by_kind(render({"rbac.create": "false"}), "ClusterRole")}
    assert roles == {CLEANUP}
