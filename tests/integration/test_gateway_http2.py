"""HTTP/2 (h2c prior knowledge) through `membrane gateway` with httpx and h2load, and curl's `Upgrade: h2c`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.integration.gateway_util import gateway, http_backend, http_policy
from tests.integration.h2_server import H2TestServer

pytestmark = pytest.mark.integration

RULES = """              - method: GET
                path: "/api(/.*)?"
              - method: POST
                path: "/api/upload"
              - method: GET
                path: "/big/.*"
"""


def test_httpx_http2_denied_stream_and_others_continue(tmp_path: Path) -> None:
    """A denied stream gets 403 on its own stream (RFC 9113 §8.1) while the connection and other streams go on; the server never sees it."""
    with H2TestServer() as server, gateway(
        tmp_path, http_policy(server.port, RULES), upstream_port=server.port, dst="default/frontend", src="default/backend"
    ) as gw, httpx.Client(http1=False, http2=True, base_url=f"http://127.0.0.1:{gw.port}", timeout=20) as client:
        r = client.get("/api/one")
        assert r.http_version == "HTTP/2"
        assert r.status_code == 200
        assert r.json()["path"] == "/api/one"
        denied = client.get("/admin")
        assert denied.status_code == 403
        assert denied.text == "Access denied\r\n"
        r = client.post("/api/upload", content=b"x" * (3 << 20))
        assert r.status_code == 200
        assert r.json()["body_len"] == 3 << 20
        big = client.get(f"/big/{8 << 20}")
        assert len(big.content) == 8 << 20
        assert big.content[:256] == bytes(range(256))
        assert [p for _, p in server.seen] == ["/api/one", "/api/upload", f"/big/{8 << 20}"]
        flows = gw.wait_flows(7)
        assert any(f["verdict"] == "DROPPED" and f["l7"]["http"]["url"].endswith("/admin") for f in flows)
        assert all(f["l7"]["http"]["protocol"] == "HTTP/2" for f in flows)


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
def test_h2load_many_streams(tmp_path: Path) -> None:
    """h2load's concurrent streams over several connections all complete through the proxy."""
    with H2TestServer() as server, gateway(
        tmp_path, http_policy(server.port, RULES), upstream_port=server.port, dst="default/frontend", src="default/backend"
    ) as gw:
        out = subprocess.run(
            ["h2load", "-n", "2000", "-c", "4", "-m", "20", f"http://127.0.0.1:{gw.port}/api/x"],
            capture_output=True, text=True, timeout=60,
        )
        assert "2000 succeeded" in out.stdout, out.stdout
        assert "status codes: 2000 2xx" in out.stdout, out.stdout


def test_curl_h2c_upgrade_is_stripped(tmp_path: Path) -> None:
    """`Upgrade: h2c` never turns the connection into an opaque relay: the upgrade is stripped and HTTP/1.1 goes on (as Envoy)."""
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend", src="default/backend"
    ) as gw:
        out = subprocess.run(
            ["curl", "-sS", "-v", "--http2", f"http://127.0.0.1:{gw.port}/api/up", f"http://127.0.0.1:{gw.port}/admin"],
            capture_output=True, text=True, timeout=30,
        )
        assert "< HTTP/1.1 200" in out.stderr, out.stderr
        assert "< HTTP/1.1 403" in out.stderr, out.stderr
        _, path, headers, _ = backend.seen[0]
        assert path == "/api/up"
        assert "upgrade" not in headers
        assert "http2-settings" not in headers
        assert backend.paths() == ["/api/up"]
