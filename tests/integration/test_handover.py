# ruff: noqa: F811  (the fixtures imported from test_agent are parameters by name)
"""Planned hand-over (issue 13 item 6): a second `membrane run` takes over from the running agent.

Real agents on pods in network namespaces, under continuous load from the backend pod (new
connections and a keep-alive connection to the allowed path, new connections to the L7-denied
path): the second agent adopts the first one's listening sockets and kernel state; not one request
may fail, the denied path must stay 403 throughout, the first agent exits 0, and nothing is left
after `membrane uninstall`. Root only.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from membrane.sandbox.live_demo import AgentProcess

from tests.helpers.netns import Pod, Topology, wait_for_line
from tests.helpers.probes import LOAD_CLIENT
from tests.integration.test_agent import (  # noqa: F401  (fixtures: used by name)
    HTTP_POLICY,
    _pins,
    _root_and_clean,
    agent_box,
    curl,
    http_pods,
    kernel_state_left,
    start_agent,
)

pytestmark = [pytest.mark.integration, pytest.mark.bpf]


def _agent(eps: Path, workdir: Path, sock: Path, workers: int = 1) -> AgentProcess:
    return start_agent([HTTP_POLICY], eps, workdir, workers=workers, extra_args=["--socket", str(sock)])


class Load:
    """LOAD_CLIENT in a pod; `results()` after `stop()`: {kind: [codes]}."""

    def __init__(self, topo: Topology, pod: Pod, host: str, workdir: Path) -> None:
        self.log, self.stop_file = workdir / "load.log", workdir / "load.stop"
        self.proc = topo.track(pod.popen([sys.executable, "-u", "-c", textwrap.dedent(LOAD_CLIENT), host, "/api", "/v2/items",
                                          str(self.log), str(self.stop_file)]))
        wait_for_line(self.proc, "probing")

    def stop(self) -> dict[str, list[str]]:
        self.stop_file.touch()
        self.proc.communicate(timeout=20)
        out: dict[str, list[str]] = {}
        self.lines = self.log.read_text().splitlines()
        for line in self.lines:
            kind, code, _t = line.split()
            out.setdefault(kind, []).append(code)
        return out


@pytest.fixture
def load_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "load"
    d.mkdir()
    yield d


def _membrane(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "membrane.cli", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
def test_handover_under_load_fails_no_request_and_keeps_denying(
    http_pods: tuple[Topology, Path], tmp_path: Path, load_dir: Path, agent_box: list[AgentProcess], workers: int
) -> None:
    """A second agent takes over under load: zero failed requests (new and keep-alive), the denied path 403 throughout, the first exits 0, the second serves the status and the socket, nothing leaks."""
    topo, eps = http_pods
    fe, be = topo.pods["frontend"], topo.pods["backend"]
    sock = tmp_path / "agent.sock"
    first = _agent(eps, tmp_path, sock, workers)
    agent_box.append(first)
    load = Load(topo, be, str(fe.ipv4), load_dir)
    try:
        time.sleep(1.0)
        marks = {"start": time.monotonic()}
        second = _agent(eps, tmp_path, sock, workers)
        marks["ready"] = time.monotonic()
        agent_box.append(second)
        assert first.proc.wait(30) == 0  # drained and exited by itself
        marks["old_exit"] = time.monotonic()
        time.sleep(1.0)  # load on the second one alone
    finally:
        results = load.stop()
    failed = [line for line in load.lines if line.split()[1] not in ("200", "403", "retry")]
    print(f"hand-over ({workers} worker(s)): requests {({k: len(v) for k, v in results.items()})}, failed {len(failed)}, "
          f"ready after {marks['ready'] - marks['start']:.2f} s, old exit after {marks['old_exit'] - marks['start']:.2f} s")
    if failed:
        print("FAILED", failed, marks, "\n--- first\n", first.stderr_path.read_text()[-3000:],
              "\n--- second\n", second.stderr_path.read_text()[-3000:])
    for kind in ("new", "keep", "denied"):
        assert len(results.get(kind, [])) > 20, results.keys()  # the load really ran throughout
    assert {c for c in results["new"]} == {"200"}, [c for c in results["new"] if c != "200"]
    assert {c for c in results["keep"] if c != "retry"} == {"200"}
    assert {c for c in results["denied"]} == {"403"}  # judged at every moment, never passed, never refused
    status = second.status()
    assert status["pid"] == second.proc.pid and status["state"] == "ready"
    shown = _membrane("status", "--status-file", str(second.status_path))
    assert shown.returncode == 0 and f"pid {second.proc.pid}" in shown.stdout
    assert sock.exists()  # the first one left the path to the second
    assert _ask(sock, {"type": "status"})["status"]["pid"] == second.proc.pid
    filters = subprocess.run(["tc", "filter", "show", "dev", fe.host_if, "ingress"], capture_output=True, text=True).stdout
    assert filters.count("name mbr_tc_steer") == 1  # replaced in place, not doubled
    assert curl(be, f"http://{fe.ipv4}/api")[0] == "200"
    assert second.stop() == 0
    done = second.uninstall()
    assert done.returncode == 0, done.stderr
    assert kernel_state_left() == []


def test_sigterm_to_the_old_agent_after_handover_is_harmless(
    http_pods: tuple[Topology, Path], tmp_path: Path, agent_box: list[AgentProcess]
) -> None:
    """SIGTERM to the old agent right after the hand-over: it still exits 0 and the new one keeps serving and enforcing."""
    topo, eps = http_pods
    fe, be, dbg = topo.pods["frontend"], topo.pods["backend"], topo.pods["debug"]
    sock = tmp_path / "agent.sock"
    first = _agent(eps, tmp_path, sock)
    agent_box.append(first)
    # A keep-alive connection held open through the old agent makes it drain for its whole timeout.
    held = be.popen([sys.executable, "-c", "import socket,sys,time; s=socket.create_connection((sys.argv[1],80)); "
                     "print('open',flush=True); time.sleep(30)", str(fe.ipv4)])
    topo.track(held)
    wait_for_line(held, "open")
    second = _agent(eps, tmp_path, sock)
    agent_box.append(second)
    if first.proc.poll() is None:
        first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(30) == 0
    assert curl(be, f"http://{fe.ipv4}/api")[0] == "200"
    assert curl(be, f"http://{fe.ipv4}/v2/items")[0] == "403"
    assert curl(dbg, f"http://{fe.ipv4}/api", timeout_s=1.5)[0] == "000"  # L3/L4 deny kept
    assert second.status()["pid"] == second.proc.pid
    assert second.stop() == 0


def test_handover_refused_while_the_successor_cannot_get_an_answer(
    http_pods: tuple[Topology, Path], tmp_path: Path, agent_box: list[AgentProcess]
) -> None:
    """The running agent stopped (SIGSTOP): the second one fails with a clear error after the answer timeout, touching nothing; the first one goes on enforcing when resumed."""
    topo, eps = http_pods
    fe, be = topo.pods["frontend"], topo.pods["backend"]
    sock = tmp_path / "agent.sock"
    first = _agent(eps, tmp_path, sock)
    agent_box.append(first)
    first.proc.send_signal(signal.SIGSTOP)
    try:
        cmd = [sys.executable, "-m", "membrane.cli", "run", "--policies", str(HTTP_POLICY), "--endpoints", str(eps),
               "--status-file", str(tmp_path / "second.json"), "--socket", str(sock), "--bpf-pin-dir", str(first.pin_dir)]
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        first.proc.send_signal(signal.SIGCONT)
    assert second.returncode == 1
    assert "did not answer the hand-over request" in second.stderr and "keeps enforcing" in second.stderr
    assert curl(be, f"http://{fe.ipv4}/api")[0] == "200"
    assert curl(be, f"http://{fe.ipv4}/v2/items")[0] == "403"
    assert first.status()["pid"] == first.proc.pid
    assert first.stop() == 0


def test_successor_dying_midway_leaves_the_running_agent_serving(
    http_pods: tuple[Topology, Path], tmp_path: Path, agent_box: list[AgentProcess]
) -> None:
    """A successor killed after it took the sockets and the kernel, before `ready`: the first agent keeps serving and enforcing, and a later hand-over works."""
    topo, eps = http_pods
    fe, be, dbg = topo.pods["frontend"], topo.pods["backend"], topo.pods["debug"]
    sock = tmp_path / "agent.sock"
    first = _agent(eps, tmp_path, sock)
    agent_box.append(first)
    cmd = [sys.executable, "-m", "membrane.cli", "run", "--policies", str(HTTP_POLICY), "--endpoints", str(eps),
           "--status-file", str(tmp_path / "second.json"), "--socket", str(sock), "--bpf-pin-dir", str(first.pin_dir)]
    err = tmp_path / "doomed.err"
    with open(err, "w") as f:
        doomed = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
    deadline = time.monotonic() + 60
    while "policy applied (start)" not in err.read_text() and time.monotonic() < deadline:  # the kernel is its
        time.sleep(0.05)
    assert doomed.poll() is None, err.read_text()
    doomed.kill()
    doomed.wait(10)
    deadline = time.monotonic() + 10
    while "keeps serving" not in first.stderr_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "keeps serving" in first.stderr_path.read_text()
    assert first.proc.poll() is None
    assert curl(be, f"http://{fe.ipv4}/api")[0] == "200"
    assert curl(be, f"http://{fe.ipv4}/v2/items")[0] == "403"
    assert curl(dbg, f"http://{fe.ipv4}/api", timeout_s=1.5)[0] == "000"
    second = _agent(eps, tmp_path, sock)
    agent_box.append(second)
    assert first.proc.wait(30) == 0
    assert curl(be, f"http://{fe.ipv4}/api")[0] == "200"
    assert second.stop() == 0


def _ask(sock: Path, request: dict[str, Any]) -> dict[str, Any]:
    import socket as _socket

    with _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall((json.dumps(request) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer
