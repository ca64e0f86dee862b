"""crds.install=auto against a cluster: `helm template --dry-run=server` runs the chart's `lookup` against
a loopback stand-in for the API server. A CRD is rendered when absent, or when this release owns it (an
upgrade must keep it, or helm would delete it with every policy); Cilium's own CRDs are left alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.deploy.fake_discovery import FakeDiscovery
from tests.deploy.util import CHART, helm

CNP = "ciliumnetworkpolicies.cilium.io"
CCNP = "ciliumclusterwidenetworkpolicies.cilium.io"
CILIUMS: dict[str, Any] = {"labels": {"io.cilium.k8s.crd.schema.version": "1.31.2"}}


def _owned_by(release: str, namespace: str = "membrane-system") -> dict[str, Any]:
    return {"labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {"meta.helm.sh/release-name": release, "meta.helm.sh/release-namespace": namespace}}


def _server_render(tmp_path: Path, crds: dict[str, dict[str, Any]], *sets: str) -> tuple[list[str], list[str], str]:
    """(CRD names rendered, paths the fake server was asked, helm's stderr when it failed)."""
    with FakeDiscovery(crds) as api:
        proc = helm("template", "mbr", str(CHART), "--namespace", "membrane-system", "--dry-run=server",
                    "--disable-openapi-validation", "--kubeconfig", str(api.kubeconfig(tmp_path)), *sets, check=False)
        requests = list(api.requests)
    if proc.returncode != 0:
        return [], requests, proc.stderr
    names = [d["metadata"]["name"] for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "CustomResourceDefinition"]
    return sorted(names), requests, ""


def test_absent_crds_are_installed(tmp_path: Path) -> None:
    """An empty cluster gets both CRDs, and the chart did look them up."""
    names, requests, err = _server_render(tmp_path, {})
    assert err == ""
    assert names == sorted([CNP, CCNP])
    assert f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CNP}" in requests


def test_ciliums_crds_are_left_alone(tmp_path: Path) -> None:
    """A cluster that runs Cilium keeps Cilium's CRDs: the chart renders none and installs cleanly."""
    names, _, err = _server_render(tmp_path, {CNP: CILIUMS, CCNP: CILIUMS})
    assert err == ""
    assert names == []


def test_crds_this_release_installed_stay_rendered(tmp_path: Path) -> None:
    """On upgrade the CRDs this release installed are rendered again (else helm would delete them);
    one owned by another release is not."""
    names, _, err = _server_render(tmp_path, {CNP: _owned_by("mbr"), CCNP: _owned_by("other")})
    assert err == ""
    assert names == [CNP]


def test_always_conflicts_with_ciliums_crds(tmp_path: Path) -> None:
    """crds.install=always over Cilium's CRDs fails (helm refuses to adopt objects it does not own), as values.yaml says."""
    _, _, err = _server_render(tmp_path, {CNP: CILIUMS, CCNP: CILIUMS}, "--set", "crds.install=always")
    assert "cannot be imported into the current release" in err


def test_never_looks_nothing_up(tmp_path: Path) -> None:
    """crds.install=never renders no CRD and asks the cluster about none."""
    names, requests, err = _server_render(tmp_path, {}, "--set", "crds.install=never")
    assert err == ""
    assert names == []
    assert [r for r in requests if "customresourcedefinitions/" in r] == []
