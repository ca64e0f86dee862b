"""HTTP/1.1 through `membrane gateway` on loopback with real clients (curl, httpx, raw sockets) and a real server."""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from tests.integration.gateway_util import gateway, http_backend, http_policy

pytestmark = pytest.mark.integration

RULES = """              - method: GET
                path: "/api(/.*)?"
              - method: POST
                path: "/api/upload"
              - method: HEAD
                path: "/api"
"""


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True, text=True, timeout=30)


def test_curl_denied_then_allowed_on_the_same_connection(tmp_path: Path) -> None:
    """A denied request gets 403 `Access denied`, the connection lives on, and the next allowed request succeeds; the upstream never sees the denied one."""
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend", src="default/backend"
    ) as gw:
        base = f"http://127.0.0.1:{gw.port}"
        out = _curl("-v", "-o", "/dev/stdout", f"{base}/secret", f"{base}/api/x")
        assert "HTTP/1.1 403 Forbidden" in out.stderr
        assert "Access denied" in out.stdout
        assert "Re-using existing connection" in out.stderr or "Reusing existing connection" in out.stderr
        assert '"path": "/api/x"' in out.stdout
        assert backend.paths() == ["/api/x"]
        flows = gw.wait_flows(3)
        verdicts = [(f["verdict"], f["l7"]["type"], f["l7"]["http"]["url"].rsplit("/", 1)[-1]) for f in flows]
        assert ("DROPPED", "REQUEST", "secret") in verdicts
        assert ("FORWARDED", "REQUEST", "x") in verdicts
        assert any(f["l7"]["type"] == "RESPONSE" and f["l7"]["http"].get("code") == 200 for f in flows)
        denied = next(f for f in flows if f["verdict"] == "DROPPED")
        assert denied["source"]["pod_name"] == "backend"
        assert denied["destination"]["pod_name"] == "frontend"
        assert denied["traffic_direction"] == "INGRESS"
        allowed = next(f for f in flows if f["verdict"] == "FORWARDED" and f["l7"]["type"] == "REQUEST")
        assert [(p["namespace"], p["name"], p["kind"]) for p in allowed["ingress_allowed_by"]] == [
            ("default", "frontend-api", "CiliumNetworkPolicy")]
        assert gw.stop() == 0


def test_httpx_keep_alive_many_requests(tmp_path: Path) -> None:
    """Every request of one keep-alive connection is judged on its own (RFC 9112 §9.3)."""
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend", src="default/backend"
    ) as gw, httpx.Client(base_url=f"http://127.0.0.1:{gw.port}") as client:
        statuses = []
        for i in range(50):
            path = f"/api/{i}" if i % 3 else f"/admin/{i}"
            r = client.get(path)
            statuses.append(r.status_code)
            if i % 3 == 0:
                assert r.text == "Access denied\r\n"
        assert statuses == [403 if i % 3 == 0 else 200 for i in range(50)]
        assert all(p.startswith("/api/") for p in backend.paths())
        assert len(backend.paths()) == 50 - 17


def test_pipelined_requests_answered_in_order(tmp_path: Path) -> None:
    """Pipelined requests get their answers in request order; a refusal waits behind earlier responses (RFC 9112 §9.3.2)."""
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend", src="default/backend"
    ) as gw:
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        reqs = b"".join(
            f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in ("/api/1", "/nope", "/api/2", "/nope2", "/api/3")
        )
        sock.sendall(reqs)
        data = b""
        deadline = time.monotonic() + 10
        while (data.count(b"HTTP/1.1 ") < 5 or data.count(b'"path"') < 3) and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        sock.close()
        statuses = re.findall(rb"HTTP/1\.1 (\d{3})", data)
        assert statuses == [b"200", b"403", b"200", b"403", b"200"]
        order = re.findall(rb'"path": "(/api/\d)"', data)
        assert order == [b"/api/1", b"/api/2", b"/api/3"]
        assert backend.paths() == ["/api/1", "/api/2", "/api/3"]


def test_chunked_upload_and_large_download(tmp_path: Path) -> None:
    """A chunked upload streams through re-framed (RFC 9112 §7.1) and a 32 MiB download arrives intact."""
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend", src="default/backend"
    ) as gw:
        base = f"http://127.0.0.1:{gw.port}"

        def body() -> object:
            for i in range(64):
                yield bytes([i % 256]) * 16384

        with httpx.Client(base_url=base, timeout=20) as client:
            r = client.post("/api/upload", content=body())  # type: ignore[arg-type]
            assert r.status_code == 200
            assert r.json()["body_len"] == 64 * 16384
            assert r.json()["headers"].get("transfer-encoding") == "chunked"
            denied = client.post("/api/other", content=body())  # type: ignore[arg-type]
            assert denied.status_code == 403
        size = 32 << 20
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "30", f"{base}/api/big/{size}"], capture_output=True, timeout=40
        )
        expected = hashlib.sha256((bytes(range(256)) * 256 * (size // 65536 + 1))[:size]).hexdigest()
        assert len(out.stdout) == size
        assert hashlib.sha256(out.stdout).hexdigest() == expected
        assert [p for p in backend.paths() if p != f"/api/big/{size}"] == ["/api/upload"]


def test_target_is_normalised_and_ambiguous_targets_refused(tmp_path: Path) -> None:
    """The normalised target is judged and forwarded; an encoded slash is refused with 400 and never forwarded."""
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend", src="default/backend"
    ) as gw:
        base = f"http://127.0.0.1:{gw.port}"
        out = _curl("--path-as-is", "-w", "%{http_code}", "-o", "/dev/null", f"{base}/secret/../api//a/./b")
        assert out.stdout == "200"
        assert backend.paths() == ["/api/a/b"]
        out = _curl("--path-as-is", "-w", "%{http_code}", "-o", "/dev/null", f"{base}/api/..%2Fsecret")
        assert out.stdout == "400"
        out = _curl("--path-as-is", "-w", "%{http_code}", "-o", "/dev/null", f"{base}/api/../secret")
        assert out.stdout == "403"
        assert backend.paths() == ["/api/a/b"]


def test_header_match_actions_applied_to_forwarded_request(tmp_path: Path) -> None:
    """`headerMatches` with mismatch REPLACE/ADD/DELETE rewrites the forwarded request (Cilium L7 header actions)."""
    rules = """              - method: GET
                path: "/api(/.*)?"
                headerMatches:
                  - name: X-Env
                    value: prod
                    mismatch: REPLACE
                  - name: X-Debug
                    value: "off"
                    mismatch: DELETE
"""
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, rules), upstream_port=backend.port, dst="default/frontend", src="default/backend"
    ) as gw:
        r = httpx.get(f"http://127.0.0.1:{gw.port}/api/h", headers={"X-Env": "dev", "X-Debug": "on"})
        assert r.status_code == 200
        _, _, headers, _ = backend.seen[-1]
        assert headers.get("x-env") == "prod"
        assert "x-debug" not in headers


def test_http10_keep_alive_request_is_closed_after_its_response(tmp_path: Path) -> None:
    """RFC 9112 §9.3: the proxy does not keep an HTTP/1.0 connection alive, so once the response is forwarded the
    client connection is closed, even when the upstream keeps its own open (no next request answered 400)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    heads: list[bytes] = []
    upstream_open = threading.Event()

    def serve() -> None:  # answers one request with a Content-Length response and keeps the connection open
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                data += chunk
            heads.append(data)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            upstream_open.wait(15)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        with gateway(tmp_path, http_policy(port, RULES), upstream_port=port, dst="default/frontend", src="default/backend") as gw:
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            try:
                sock.sendall(b"GET /api/one HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
                received = b""
                while chunk := sock.recv(65536):  # ends only when the proxy closes the connection (else: timeout)
                    received += chunk
            finally:
                sock.close()
            assert received.startswith(b"HTTP/1.1 200 OK\r\n"), received
            assert received.endswith(b"\r\n\r\nok"), received
            assert len(heads) == 1
            assert heads[0].startswith(b"GET /api/one HTTP/1.0\r\n")
            assert not [f for f in gw.flows() if f["verdict"] != "FORWARDED"]
    finally:
        upstream_open.set()
        server.join(5)
        listener.close()


def test_upstream_down_gives_503(tmp_path: Path) -> None:
    """An upstream that refuses connections is answered 503 (upstream connect failure)."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with gateway(tmp_path, http_policy(port, RULES), upstream_port=port, dst="default/frontend", src="default/backend") as gw:
        out = _curl("-w", "%{http_code}", "-o", "/dev/null", f"http://127.0.0.1:{gw.port}/api")
        assert out.stdout == "503"
        # The failed exchange is an ERROR flow (Hubble's verdict ERROR) carrying the status the client got.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not [f for f in gw.flows() if f["verdict"] == "ERROR"]:
            time.sleep(0.05)
        errors = [f for f in gw.flows() if f["verdict"] == "ERROR"]
        assert [f["l7"]["http"]["code"] for f in errors] == [503], gw.flows()
        assert "drop_reason_desc" not in errors[0]  # flow.proto has no drop reason for an upstream failure
        assert errors[0]["l7"]["http"]["url"].endswith("/api")
        assert errors[0]["l7"]["http"]["method"] == "GET"


def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    """SIGTERM stops accepting, lets the request in flight finish, and exits 0."""
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend", src="default/backend",
        workers=2,
    ) as gw:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/api/ok", timeout=10) as r:
            assert r.status == 200
        assert gw.stop() == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", gw.port), timeout=2).close()


def test_metrics_endpoint_counts_verdicts(tmp_path: Path) -> None:
    """`--metrics` serves Prometheus text with membrane_proxy_requests_total by protocol and verdict."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    mport = probe.getsockname()[1]
    probe.close()
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend", src="default/backend",
        extra=["--metrics", f"127.0.0.1:{mport}"],
    ) as gw, httpx.Client(base_url=f"http://127.0.0.1:{gw.port}") as client:
        assert client.get("/api/a").status_code == 200
        assert client.get("/nope").status_code == 403
        text = httpx.get(f"http://127.0.0.1:{mport}/metrics").text
        assert 'membrane_proxy_requests_total{protocol="http",verdict="FORWARDED"} 1' in text
        assert 'membrane_proxy_requests_total{protocol="http",verdict="DROPPED"} 1' in text
        assert 'membrane_proxy_request_duration_seconds_count{protocol="http"} 1' in text
        assert "membrane_proxy_internal_errors_total 0" in text


def test_cli_exit_statuses(tmp_path: Path) -> None:
    """`membrane gateway` exits 1 for an invalid policy and 2 for usage errors (unknown --dst, missing file)."""
    from tests.integration.gateway_util import ENDPOINTS, MEMBRANE, ROOT

    bad = tmp_path / "bad.yaml"
    bad.write_text(http_policy(80, RULES).replace("toPorts", "toPort"))
    good = tmp_path / "good.yaml"
    good.write_text(http_policy(80, RULES))
    base = ["gateway", "--endpoints", str(ENDPOINTS), "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:80"]
    cases = [
        (["--policies", str(bad), "--dst", "default/frontend"], 1),
        (["--policies", str(good), "--dst", "default/nobody"], 2),
        (["--policies", str(tmp_path / "missing.yaml"), "--dst", "default/frontend"], 2),
        (["--policies", str(good), "--dst", "frontend"], 2),
    ]
    for args, status in cases:
        out = subprocess.run([*MEMBRANE, *base, *args], capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert out.returncode == status, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_flows_to_stdout(tmp_path: Path) -> None:
    """`--flows -` writes each flow record as one JSON line on stdout, after the `listening` line."""
    import json
    import os
    import signal

    from tests.integration.gateway_util import ENDPOINTS, MEMBRANE, ROOT

    with http_backend() as backend:
        policy = tmp_path / "p.yaml"
        policy.write_text(http_policy(backend.port, RULES))
        proc = subprocess.Popen(
            [*MEMBRANE, "gateway", "--policies", str(policy), "--endpoints", str(ENDPOINTS), "--listen", "127.0.0.1:0",
             "--upstream", f"127.0.0.1:{backend.port}", "--dst", "default/frontend", "--src", "default/backend",
             "--workers", "1", "--flows", "-"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert proc.stdout is not None
            port = int(re.search(r":(\d+) ->", proc.stdout.readline()).group(1))  # type: ignore[union-attr]
            assert httpx.get(f"http://127.0.0.1:{port}/nope").status_code == 403
            record = json.loads(proc.stdout.readline())["flow"]  # Hubble's {"flow": ...} envelope
            assert record["verdict"] == "DROPPED"
            assert record["l7"]["http"]["url"].endswith("/nope")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            if proc.stdout is not None:
                proc.stdout.close()


def test_metrics_sum_all_workers(tmp_path: Path) -> None:
    """With --workers 2 the metrics endpoint shows the requests of every worker, summed."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    mport = probe.getsockname()[1]
    probe.close()
    with http_backend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend", src="default/backend",
        extra=["--metrics", f"127.0.0.1:{mport}"], workers=2,
    ) as gw:
        for i in range(20):  # new connections each time: SO_REUSEPORT spreads them over both workers
            assert httpx.get(f"http://127.0.0.1:{gw.port}/api/{i}").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{gw.port}/%2f").status_code == 400
        deadline = time.monotonic() + 5
        text = ""
        while time.monotonic() < deadline:
            text = httpx.get(f"http://127.0.0.1:{mport}/metrics").text
            if 'membrane_proxy_requests_total{protocol="http",verdict="FORWARDED"} 20' in text:
                break
            time.sleep(0.2)
        assert 'membrane_proxy_requests_total{protocol="http",verdict="FORWARDED"} 20' in text, text
        assert 'membrane_proxy_parse_errors_total{protocol="http",reason="malformed"} 1' in text
