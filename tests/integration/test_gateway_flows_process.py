"""`membrane gateway --flows FILE` with MEMBRANE_FLOWS_PROCESS=1 writes its records through a formatter process (proxy/flowproc.py) that stops
with the worker: after SIGTERM once every record is written, after SIGKILL at once, never left behind."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.gateway_util import Gateway, gateway, http_backend, http_policy
from tests.proxy.test_flowproc import _wait_gone

pytestmark = pytest.mark.integration

RULES = """              - method: GET
                path: "/api(/.*)?"
"""


def _formatters(parent: int) -> list[int]:
    """The formatter processes whose parent is `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"membrane.proxy.flowproc" in cmdline:
            found.append(int(entry.name))
    return found


def _requests(gw: Gateway, n: int) -> None:
    for i in range(n):
        path = "/api/ok" if i % 2 == 0 else "/admin"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}{path}", timeout=10) as r:
                assert r.status == 200
        except urllib.error.HTTPError as e:
            assert e.code == 403


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_formatter_process_writes_every_record_and_stops_with_the_gateway(
    tmp_path: Path, stop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With MEMBRANE_FLOWS_PROCESS=1 a one-worker gateway has one formatter child; the flows file gets every
    request's records (allowed and denied, request and response); SIGTERM (drain) and SIGKILL both end the child."""
    monkeypatch.setenv("MEMBRANE_FLOWS_PROCESS", "1")
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend", src="default/backend",
    ) as gw:
        formatters = _formatters(gw.proc.pid)
        assert len(formatters) == 1, formatters
        _requests(gw, 10)
        flows = gw.wait_flows(20)
        assert len(flows) == 20  # 5 allowed (request + response), 5 denied (request + the 403 response)
        assert sorted(f["verdict"] for f in flows if f["l7"]["type"] == "REQUEST") == ["DROPPED"] * 5 + ["FORWARDED"] * 5
        if stop == "sigterm":
            assert gw.stop() == 0
        else:
            gw.proc.send_signal(signal.SIGKILL)
            gw.proc.wait()
        assert _wait_gone(formatters[0]), "the formatter process outlived the gateway"
        assert len(gw.flows()) == 20
