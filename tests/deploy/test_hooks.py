"""The uninstall hook's scripts: node_cleanup waits for the agent's socket to go quiet and then runs the
cleanup commands; wait_daemonset polls the API for the cleanup DaemonSet (a loopback HTTP stand-in here)."""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.util import load_script

cleanup = load_script("deploy/hooks/node_cleanup.py")
waiter = load_script("deploy/hooks/wait_daemonset.py")


def test_agent_detection(tmp_path: Path) -> None:
    """A listening socket is an agent; a missing path or a stale socket file (nobody listening) is none."""
    path = tmp_path / "agent.sock"
    assert cleanup.agent_is_running(path) is False
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen()
    assert cleanup.agent_is_running(path) is True
    srv.close()  # the file stays, as after a crash
    assert path.exists()
    assert cleanup.agent_is_running(path) is False


def test_cleanup_waits_for_the_agent_then_runs_commands_in_order(tmp_path: Path) -> None:
    """Commands run only after the agent stops serving; each runs, in order."""
    path = tmp_path / "agent.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen()
    log = tmp_path / "log"
    stopped = threading.Event()

    def stop_agent() -> None:
        srv.close()
        stopped.set()

    timer = threading.Timer(0.5, stop_agent)
    timer.start()
    try:
        # The first command records whether an agent still served when it ran.
        probe = tmp_path / "probe.py"
        probe.write_text(
            "import socket, sys\n"
            f"s = socket.socket(socket.AF_UNIX)\nserving = s.connect_ex({str(path)!r}) == 0\n"
            f"open({str(log)!r}, 'a').write('serving\\n' if serving else 'first\\n')\n"
        )
        rc = cleanup.main(["--socket", str(path), "--wait-seconds", "20",
                           f"{sys.executable} {probe}", f"sh -c 'echo second >> {log}'"])
    finally:
        timer.cancel()
        srv.close()
    assert stopped.is_set()
    assert rc == 0
    assert log.read_text() == "first\nsecond\n"


def test_cleanup_stops_at_the_first_failing_command(tmp_path: Path) -> None:
    """A failing `membrane uninstall` is reported with its exit code; later commands do not run."""
    log = tmp_path / "log"
    rc = cleanup.main(["--socket", str(tmp_path / "none.sock"), "--wait-seconds", "1", "sh -c 'exit 7'", f"sh -c 'echo ran >> {log}'"])
    assert rc == 7
    assert not log.exists()


def test_cleanup_goes_on_after_the_wait_expires(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An agent that never stops does not block the uninstall forever: after the wait, cleanup runs and says so."""
    path = tmp_path / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen()
        assert cleanup.main(["--socket", str(path), "--wait-seconds", "0.2", "true"]) == 0
    assert "cleaning up anyway" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("status", "generation", "done"),
    [
        ({"desiredNumberScheduled": 3, "numberReady": 3, "observedGeneration": 1}, 1, True),
        ({"desiredNumberScheduled": 3, "numberReady": 2, "observedGeneration": 1}, 1, False),
        ({"desiredNumberScheduled": 3, "numberReady": 3, "observedGeneration": 1}, 2, False),
        ({}, 1, False),
        ({"desiredNumberScheduled": 0, "numberReady": 0, "observedGeneration": 1}, 1, True),
    ],
)
def test_daemonset_done(status: dict[str, int], generation: int, done: bool) -> None:
    """Done means the controller saw this generation and every scheduled node is ready (no nodes: done)."""
    assert waiter.is_done({"metadata": {"generation": generation}, "status": status})[0] is done


class _Api:
    """A loopback stand-in for GET /apis/apps/v1/namespaces/NS/daemonsets/NAME returning a scripted sequence."""

    def __init__(self, answers: list[tuple[int, dict[str, Any]]]) -> None:
        self.answers = answers
        self.seen: list[tuple[str, str | None]] = []


@pytest.fixture
def api() -> Iterator[tuple[_Api, str]]:
    state = _Api([])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.seen.append((self.path, self.headers.get("Authorization")))
            code, body = state.answers.pop(0) if len(state.answers) > 1 else state.answers[0]
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _ds(ready: int) -> dict[str, Any]:
    return {"metadata": {"generation": 1}, "status": {"desiredNumberScheduled": 2, "numberReady": ready, "observedGeneration": 1}}


def test_waiter_polls_until_every_node_is_done(api: tuple[_Api, str], tmp_path: Path) -> None:
    """404 (not created yet), then 1/2, then 2/2: exit 0, with the service account's bearer token on every call."""
    state, url = api
    state.answers = [(404, {"kind": "Status"}), (200, _ds(1)), (200, _ds(2))]
    token = tmp_path / "token"
    token.write_text("tok-1\n")
    rc = waiter.main(["--namespace", "ns", "--name", "mbr-cleanup", "--server", url, "--token-file", str(token),
                      "--poll-seconds", "0.05", "--timeout-seconds", "20"])
    assert rc == 0
    assert [p for p, _ in state.seen] == ["/apis/apps/v1/namespaces/ns/daemonsets/mbr-cleanup"] * 3
    assert {a for _, a in state.seen} == {"Bearer tok-1"}


def test_waiter_times_out_with_the_last_status(api: tuple[_Api, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A node that never finishes: exit 1 after the timeout, naming how many nodes are done."""
    state, url = api
    state.answers = [(200, _ds(1))]
    rc = waiter.main(["--namespace", "ns", "--name", "d", "--server", url, "--token-file", str(tmp_path / "none"),
                      "--poll-seconds", "0.05", "--timeout-seconds", "0.3"])
    assert rc == 1
    assert "timed out after 0.3s: 1/2 nodes done" in capsys.readouterr().err
