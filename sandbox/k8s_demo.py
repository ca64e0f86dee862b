"""The kubectl part of `membrane demo`: a sandbox cluster driven the way a Cilium user drives theirs.

Starts `membrane sandbox up` (the API server double, pods as network namespaces through CNI, the agent
in Kubernetes mode), then, with the real kubectl against its kubeconfig: curl from one pod to another
(200), `kubectl apply` a CiliumNetworkPolicy that allows only `GET /public` (the private path turns
403 within a second), `kubectl label` the client so it no longer matches (the connection is dropped
in the kernel), `kubectl delete cnp` (200 again), and `membrane observe` on the agent's flows.
Everything the sandbox made is removed at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from membrane.sandbox.live_demo import HTTP_SERVER

PODS = """\
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {containers: [{name: main, image: curl}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {containers: [{name: main, image: http}]}
"""

CNP = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-public-only, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts:
        - ports: [{port: "8080", protocol: TCP}]
          rules: {http: [{method: GET, path: /public}]}
"""


@dataclass
class Step:
    what: str
    run: Callable[[], str]
    expected: str


def _kubectl() -> str:
    found = Path(sys.executable).with_name("kubectl")
    return str(found) if found.exists() else (shutil.which("kubectl") or "kubectl")


def _wait_ready(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        if line.startswith("sandbox ready"):
            return line.strip()
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"the sandbox did not come up (exit status {proc.poll()})")


def _until(probe: Callable[[], str], want: str, timeout_s: float = 5.0) -> tuple[str, float]:
    """Probe until the answer is `want` (or time runs out). Returns (last answer, seconds it took)."""
    start = time.monotonic()
    while True:
        got = probe()
        if got == want or time.monotonic() - start > timeout_s:
            return got, time.monotonic() - start
        time.sleep(0.1)


def run_k8s_demo(out: Callable[[str], None] = print) -> int:
    """Run the kubectl demo. Returns 0 when every step turned as the policy predicts, else 1 (2 without root)."""
    if os.geteuid() != 0:
        out("membrane demo: the Kubernetes demo needs root (network namespaces and eBPF)")
        return 2
    with tempfile.TemporaryDirectory(prefix="membrane-sandbox-") as tmp:
        state = Path(tmp)
        (state / "pods.yaml").write_text(PODS)
        (state / "cnp.yaml").write_text(CNP)
        sandbox = subprocess.Popen(
            [sys.executable, "-m", "membrane.cli", "sandbox", "up", "--pods", str(state / "pods.yaml"), "--state-dir", str(state)],
            stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        server: subprocess.Popen[str] | None = None
        try:
            out(_wait_ready(sandbox, 120))
            env = {**os.environ, "KUBECONFIG": str(state / "kubeconfig"), "HOME": str(state / "home")}

            def kubectl(*args: str) -> str:
                proc = subprocess.run([_kubectl(), *args], capture_output=True, text=True, env=env, timeout=60)
                return (proc.stdout + proc.stderr).strip()

            web_ip = kubectl("get", "pod", "web", "-o", "jsonpath={.status.podIP}")
            server = subprocess.Popen(["ip", "netns", "exec", "default-web", sys.executable, "-c", HTTP_SERVER, "8080"],
                                      stdout=subprocess.PIPE, text=True, start_new_session=True)
            assert server.stdout is not None
            server.stdout.readline()

            def curl(path: str) -> str:
                proc = subprocess.run(["ip", "netns", "exec", "default-client", "curl", "-s", "-o", "/dev/null",
                                       "-w", "%{http_code}", "--max-time", "2", f"http://{web_ip}:8080{path}"],
                                      capture_output=True, text=True, timeout=10)
                return proc.stdout.strip() if proc.stdout.strip() not in ("", "000") else "timeout"

            out(f"$ kubectl get pods -o wide\n{kubectl('get', 'pods', '-o', 'wide')}")
            rows: list[tuple[str, str, str, float]] = []

            def step(what: str, path: str, want: str) -> None:
                got, took = _until(lambda: curl(path), want)
                rows.append((what, f"GET {path}", got, took))
                out(f"  {what:<44} GET {path:<9} -> {got:<7} (expected {want}; {took:.2f} s)")

            out("\nno policy selects web: everything is allowed")
            step("before any policy", "/private", "200")
            out(f"\n$ kubectl apply -f cnp.yaml\n{kubectl('apply', '-f', str(state / 'cnp.yaml'))}")
            step("CNP allows GET /public from app=client", "/private", "403")
            step("", "/public", "200")
            out(f"\n$ kubectl label pod client app=other --overwrite\n{kubectl('label', 'pod', 'client', 'app=other', '--overwrite')}")
            step("client no longer matches fromEndpoints", "/public", "timeout")
            out(f"\n$ kubectl label pod client app=client --overwrite\n{kubectl('label', 'pod', 'client', 'app=client', '--overwrite')}")
            step("client matches again", "/public", "200")
            out(f"\n$ kubectl delete cnp web-public-only\n{kubectl('delete', 'cnp', 'web-public-only')}")
            step("policy deleted: allowed again", "/private", "200")
            time.sleep(0.3)
            observed = subprocess.run([sys.executable, "-m", "membrane.cli", "observe", "--flows", str(state / "flows.jsonl"),
                                       "--last", "8"], capture_output=True, text=True, timeout=30)
            out(f"\n$ membrane observe --flows {state / 'flows.jsonl'} --last 8\n{observed.stdout.rstrip()}")
            wanted = ["200", "403", "200", "timeout", "200", "200"]
            ok = [r[2] for r in rows] == wanted
            out(f"\n{sum(r[2] == w for r, w in zip(rows, wanted, strict=True))}/{len(rows)} steps as the policy predicts")
            return 0 if ok else 1
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            out(f"membrane demo (Kubernetes part) failed: {e}")
            return 1
        finally:
            if server is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGTERM)
                server.wait(10)
            with contextlib.suppress(ProcessLookupError):
                sandbox.send_signal(signal.SIGTERM)
            try:
                sandbox.wait(60)
            except subprocess.TimeoutExpired:
                sandbox.kill()
                sandbox.wait()
