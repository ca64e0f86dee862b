"""The Helm chart: helm lint and helm template with default and non-default values, every rendered
manifest validated offline against Kubernetes 1.35's schemas (strict: unknown fields fail), and the
agent contract the DaemonSet must carry (args, downward API, mounts, probes, scrape annotations)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.util import CHART, KUBE_VERSION, by_kind, helm, one, render, set_args

# Non-default values: every toggle flipped at least once across these sets.
VALUE_SETS: dict[str, dict[str, str]] = {
    "default": {},
    "chaining+service+flows": {
        "cni.chaining.enabled": "true",
        "cni.confFile": "10-ptp.conflist",
        "metrics.service.enabled": "true",
        "flows.enabled": "true",
        "image.tag": "dev",
        "agent.extraArgs[0]": "--log-level=debug",
    },
    "minimal": {
        "crds.install": "never",
        "crds.keep": "false",
        "metrics.enabled": "false",
        "uninstall.cleanupHook": "false",
        "labels.recommended": "false",
        "serviceAccount.create": "false",
        "serviceAccount.name": "existing",
        "rbac.create": "false",
    },
    "labels": {"labels.common.team": "net", "labels.pod.tier": "node", "podAnnotations.a": "b", "crds.install": "always"},
}

AGENT = "mbr-membrane"


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint_passes(name: str) -> None:
    """`helm lint --strict` passes with each value set (strict: warnings such as unused values fail)."""
    helm("lint", "--strict", str(CHART), *set_args(VALUE_SETS[name]))


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_rendered_manifest_validates_against_kubernetes(name: str) -> None:
    """Every object helm template renders validates strictly against Kubernetes 1.35's schemas."""
    docs = render(VALUE_SETS[name])
    assert docs, "helm template rendered nothing"
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {e.message}")
    assert errors == []


def test_validation_rejects_a_broken_manifest() -> None:
    """The validator is strict for real: an unknown DaemonSet field and a wrong type are both reported."""
    ds = one(render(), "DaemonSet", AGENT)
    ds["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(kubernetes_validate.ValidationError) as e:
        kubernetes_validate.validate(ds, KUBE_VERSION, strict=True)
    assert "hostNetwrk" in e.value.message


def test_default_render_has_each_object_once() -> None:
    """Defaults render the agent's objects, both CRDs (helm template has no cluster) and the cleanup hook."""
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in render())
    assert kinds == sorted([
        ("ServiceAccount", AGENT), ("ClusterRole", AGENT), ("ClusterRoleBinding", AGENT), ("Role", AGENT),
        ("RoleBinding", AGENT), ("DaemonSet", AGENT),
        ("CustomResourceDefinition", "ciliumnetworkpolicies.cilium.io"),
        ("CustomResourceDefinition", "ciliumclusterwidenetworkpolicies.cilium.io"),
        ("ServiceAccount", f"{AGENT}-cleanup"), ("Role", f"{AGENT}-cleanup"), ("RoleBinding", f"{AGENT}-cleanup"),
        ("DaemonSet", f"{AGENT}-cleanup"), ("Job", f"{AGENT}-cleanup-wait"),
    ])


def _agent(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = one(docs, "DaemonSet", AGENT)["spec"]["template"]["spec"]
    return pod


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name]
    return c


def test_agent_command_line_follows_the_contract() -> None:
    """The agent runs `membrane run --kubernetes --node-name $(NODE_NAME) --metrics ... --health ...`."""
    agent = _container(_agent(render()), "agent")
    assert agent["args"] == ["run", "--kubernetes", "--node-name", "$(NODE_NAME)",
                             "--metrics", "0.0.0.0:9962", "--health", "0.0.0.0:9879"]


def test_node_name_comes_from_the_downward_api() -> None:
    """NODE_NAME is the pod's spec.nodeName (the agent enforces for the pods of its own node)."""
    env = {e["name"]: e for e in _container(_agent(render()), "agent")["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_flows_and_extra_args_reach_the_command_line() -> None:
    """flows.enabled adds --flows PATH; extraArgs are appended last; metrics.enabled=false drops --metrics."""
    args = _container(_agent(render(VALUE_SETS["chaining+service+flows"])), "agent")["args"]
    assert args[-3:] == ["--flows", "/var/run/membrane/flows.jsonl", "--log-level=debug"]
    minimal = _container(_agent(render(VALUE_SETS["minimal"])), "agent")["args"]
    assert "--metrics" not in minimal


def test_flows_outside_the_state_dir_is_refused() -> None:
    """A flows.path the host never sees fails the render with a message naming the value."""
    proc = helm("template", "mbr", str(CHART), *set_args({"flows.enabled": "true", "flows.path": "/tmp/f.jsonl"}), check=False)
    assert proc.returncode != 0
    assert "flows.path" in proc.stderr


def test_crds_install_rejects_an_unknown_mode() -> None:
    """crds.install accepts auto, always, never; anything else fails naming the value."""
    proc = helm("template", "mbr", str(CHART), "--set", "crds.install=sometimes", check=False)
    assert proc.returncode != 0
    assert 'crds.install: "sometimes"' in proc.stderr


def test_agent_runs_privileged_in_the_host_namespaces() -> None:
    """hostNetwork, hostPID and privileged: the agent attaches tc programs and serves the host's CNI."""
    pod = _agent(render())
    assert pod["hostNetwork"] is True
    assert pod["hostPID"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert _container(pod, "agent")["securityContext"] == {"privileged": True}


def test_bpffs_cgroup_and_state_mounts() -> None:
    """/sys/fs/bpf propagates both ways (pinned maps survive the container); cgroup and /var/run/membrane are host paths."""
    pod = _agent(render())
    mounts = {m["name"]: m for m in _container(pod, "agent")["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["bpffs"] == {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional"}
    assert volumes["bpffs"]["hostPath"] == {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}
    assert mounts["cgroup"]["mountPath"] == "/sys/fs/cgroup"
    assert volumes["cgroup"]["hostPath"]["path"] == "/sys/fs/cgroup"
    assert mounts["state"]["mountPath"] == "/var/run/membrane"
    assert volumes["state"]["hostPath"]["path"] == "/var/run/membrane"


def test_probes_use_healthz_and_readyz() -> None:
    """Liveness and startup ask /healthz; readiness asks /readyz (every watch synced, every endpoint attached)."""
    agent = _container(_agent(render()), "agent")
    ports = {p["name"]: p for p in agent["ports"]}
    assert ports["health"]["containerPort"] == 9879
    assert ports["metrics"]["containerPort"] == 9962
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert agent["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


def test_prometheus_scrape_annotations() -> None:
    """The agent pods carry prometheus.io scrape annotations pointing at the metrics port."""
    ann = one(render({"metrics.port": "19962"}), "DaemonSet", AGENT)["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": "19962", "prometheus.io/path": "/metrics"}


def test_scheduling_and_rollout() -> None:
    """Every node (all taints tolerated), system-node-critical, one node at a time on update."""
    docs = render()
    ds = one(docs, "DaemonSet", AGENT)
    pod = ds["spec"]["template"]["spec"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["priorityClassName"] == "system-node-critical"
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


def test_agent_has_no_prestop_uninstall() -> None:
    """A rolling update must not remove kernel state: no lifecycle hook on the agent."""
    assert "lifecycle" not in _container(_agent(render()), "agent")


@pytest.mark.parametrize(("enabled", "action"), [("false", "remove"), ("true", "install")])
def test_cni_init_container_follows_the_chaining_toggle(enabled: str, action: str) -> None:
    """The init container installs membrane-cni when chaining is on, and removes it when off."""
    pod = _agent(render({"cni.chaining.enabled": enabled}))
    init = _container(pod, "cni")
    assert init["args"][0] == action
    mounts = {m["mountPath"] for m in init["volumeMounts"]}
    assert mounts == {"/host/cni/bin", "/host/cni/net.d"}
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert volumes["cni-bin"] == "/opt/cni/bin"
    assert volumes["cni-conf"] == "/etc/cni/net.d"


def test_metrics_service_is_headless_and_optional() -> None:
    """The metrics Service is off by default; when on it is headless and selects the agent pods."""
    assert by_kind(render(), "Service") == []
    (svc,) = by_kind(render({"metrics.service.enabled": "true"}), "Service")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"app.kubernetes.io/name": "membrane", "app.kubernetes.io/instance": "mbr"}


def test_labels_toggle() -> None:
    """labels.recommended=false keeps only the selector labels; labels.common and labels.pod are added."""
    plain = one(render({"labels.recommended": "false"}), "DaemonSet", AGENT)
    assert plain["metadata"]["labels"] == {"app.kubernetes.io/name": "membrane", "app.kubernetes.io/instance": "mbr"}
    extra = one(render(VALUE_SETS["labels"]), "DaemonSet", AGENT)
    assert extra["metadata"]["labels"]["team"] == "net"
    assert extra["spec"]["template"]["metadata"]["labels"]["tier"] == "node"
    assert "tier" not in extra["metadata"]["labels"]


@pytest.mark.parametrize(("mode", "count"), [("auto", 2), ("always", 2), ("never", 0)])
def test_crd_install_modes_without_a_cluster(mode: str, count: int) -> None:
    """helm template has no cluster: auto renders the CRDs as always does; never renders none."""
    assert len(by_kind(render({"crds.install": mode}), "CustomResourceDefinition")) == count


def test_crds_are_kept_on_uninstall() -> None:
    """Deleting a CRD deletes every policy in it: the CRDs carry helm.sh/resource-policy: keep."""
    for crd in by_kind(render(), "CustomResourceDefinition"):
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_cleanup_hook_runs_uninstall_after_delete() -> None:
    """The uninstall path: post-delete hooks, a DaemonSet that runs `membrane uninstall --force` after the
    agent is gone, and a Job that helm waits for."""
    docs = render()
    hooks = [d for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})]
    assert {d["metadata"]["annotations"]["helm.sh/hook"] for d in hooks} == {"post-delete"}
    ds = one(docs, "DaemonSet", f"{AGENT}-cleanup")
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    assert "/usr/local/bin/membrane-entrypoint uninstall --force" in init["args"]
    assert init["args"][:2] == ["--socket", "/var/run/membrane/agent.sock"]
    job = one(docs, "Job", f"{AGENT}-cleanup-wait")
    weights = {d["kind"]: int(d["metadata"]["annotations"]["helm.sh/hook-weight"]) for d in hooks}
    assert weights["ServiceAccount"] < weights["DaemonSet"] < weights["Job"]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][3] == f"{AGENT}-cleanup"
    assert by_kind(render({"uninstall.cleanupHook": "false"}), "Job") == []
