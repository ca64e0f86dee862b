"""`membrane sandbox up` driven with the real kubectl, as a user would (issue 10 item 7).

| step (kubectl)                              | effect on traffic client -> web:8080            |
|---------------------------------------------|-------------------------------------------------|
| no policy                                   | 200                                              |
| apply CNP: GET /public from app=client      | /private 403 (proxy), /public 200               |
| label client app=other                      | dropped in the kernel (no answer)                |
| label client app=client                     | /public reaches the server again                 |
| delete cnp                                  | /private 200                                     |
| create a pod / delete it                    | a namespace appears with an IP / is torn down    |
| SIGTERM                                     | nothing of the sandbox is left                   |
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from membrane.sandbox.live_demo import HTTP_SERVER

pytestmark = [pytest.mark.integration, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

PODS = """\
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
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
class Sandbox:
    state: Path
    proc: subprocess.Popen[str]

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.state / "home"),
               "KUBECONFIG": str(self.state / "kubeconfig")}
        proc = subprocess.run([str(Path(sys.executable).with_name("kubectl")), *args], input=stdin, capture_output=True,
                              text=True, env=env, timeout=60)
        if check:
            assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
        return proc.stdout.strip()

    def curl(self, ip: str, path: str) -> str:
        proc = subprocess.run(["ip", "netns", "exec", "default-client", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                               "--max-time", "1", f"http://{ip}:8080{path}"], capture_output=True, text=True, timeout=10)
        code = proc.stdout.strip()
        return code if code and code != "000" else "no answer"


def until(probe: Callable[[], str], want: str, timeout_s: float = 5.0) -> str:
    """The probe's answer once it is `want`, or its last answer after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    state = tmp_path_factory.mktemp("sandbox")
    (state / "pods.yaml").write_text(PODS)
    proc = subprocess.Popen([sys.executable, "-m", "membrane.cli", "sandbox", "up", "--pods", str(state / "pods.yaml"),
                             "--state-dir", str(state)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    server = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == f"sandbox ready kubeconfig={state / 'kubeconfig'}", line
        server = subprocess.Popen(["ip", "netns", "exec", "default-web", sys.executable, "-c", HTTP_SERVER, "8080"],
                                  stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        yield Sandbox(state=state, proc=proc)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(10)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_pods_from_the_file_run_with_their_ips(sandbox: Sandbox) -> None:
    """Every Pod of FILE is Running with status.podIP, and `ip netns exec <namespace>-<name>` enters it."""
    pods = json.loads(sandbox.kubectl("get", "pods", "-o", "json"))["items"]
    assert sorted(p["metadata"]["name"] for p in pods) == ["client", "web"]
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        ip = pod["status"]["podIP"]
        inside = subprocess.run(["ip", "netns", "exec", f"default-{pod['metadata']['name']}", "ip", "-4", "-o", "addr"],
                                capture_output=True, text=True, check=True).stdout
        assert f" {ip}/" in inside


def test_kubectl_drives_the_policy(sandbox: Sandbox) -> None:
    """apply -> 403 within a second, label -> dropped, label back -> allowed, delete -> 200 (issue 10 item 7)."""
    web = sandbox.kubectl("get", "pod", "web", "-o", "jsonpath={.status.podIP}")
    assert until(lambda: sandbox.curl(web, "/private"), "200") == "200"
    sandbox.kubectl("apply", "-f", "-", stdin=CNP)
    start = time.monotonic()
    assert until(lambda: sandbox.curl(web, "/private"), "403", timeout_s=1.0) == "403"
    assert time.monotonic() - start < 1.5
    assert sandbox.curl(web, "/public") == "200"  # allowed: it reached the server
    sandbox.kubectl("label", "pod", "client", "app=other", "--overwrite")
    assert until(lambda: sandbox.curl(web, "/public"), "no answer") == "no answer"
    sandbox.kubectl("label", "pod", "client", "app=client", "--overwrite")
    assert until(lambda: sandbox.curl(web, "/public"), "200") == "200"
    sandbox.kubectl("delete", "cnp", "web-public-only")
    assert until(lambda: sandbox.curl(web, "/private"), "200") == "200"


def test_an_invalid_cnp_gets_a_condition_and_the_agent_keeps_enforcing(sandbox: Sandbox) -> None:
    """An invalid CNP is shown where kubectl users look (status condition of Membrane's own type)."""
    bad = CNP.replace("web-public-only", "broken").replace('port: "8080"', 'port: "eighty"')
    sandbox.kubectl("apply", "-f", "-", stdin=bad)
    try:
        def condition() -> str:
            doc = json.loads(sandbox.kubectl("get", "cnp", "broken", "-o", "json"))
            conds = {c["type"]: c for c in (doc.get("status") or {}).get("conditions") or []}
            return conds.get("membrane.io/Valid", {}).get("status", "absent")
        assert until(condition, "False", timeout_s=10) == "False"
    finally:
        sandbox.kubectl("delete", "cnp", "broken")


def test_pods_created_and_deleted_with_kubectl(sandbox: Sandbox) -> None:
    """A Pod created later becomes a namespace with an IP; deleting it tears the namespace down (CNI DEL)."""
    sandbox.kubectl("apply", "-f", "-", stdin="apiVersion: v1\nkind: Pod\nmetadata: {name: late, labels: {app: late}}\n"
                                             "spec: {containers: [{name: main, image: x}]}\n")
    assert until(lambda: sandbox.kubectl("get", "pod", "late", "-o", "jsonpath={.status.phase}"), "Running") == "Running"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert "default-late" in netns
    sandbox.kubectl("delete", "pod", "late")
    gone = until(lambda: "present" if "default-late" in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                                           text=True).stdout else "gone", "gone")
    assert gone == "gone"


def test_agent_status_shows_kubernetes(sandbox: Sandbox) -> None:
    """`membrane status -o json` of the sandbox's agent: the Kubernetes source, synced, with both local pods attached."""
    out = subprocess.run([sys.executable, "-m", "membrane.cli", "status", "-o", "json", "--status-file",
                          str(sandbox.state / "agent-status.json")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["source"] == "kubernetes"
    assert doc["kubernetes"]["synced"] is True
    ready = {e["namespace"] + "/" + e["name"]: e["status"] for e in doc["endpoints"] if e["status"] == "ready"}
    assert {"default/client", "default/web"} <= set(ready)
