"""Black-box acceptance of `membrane gateway` and the agent CLI, as a user drives them with real clients on loopback.

Covers what the per-protocol gateway tests leave out: the `--src` default (the client IP's endpoint,
else `world`), WebSocket upgrades, HEAD and 304 on a keep-alive connection, `headers:` rules,
repeatable `--policies` (file and directory), and the regressions found by acceptance testing
(Hubble-like DNS answer summaries, HTTP/2 request headers in flows, IPv6 `--listen`).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from tests.helpers.dns_server import DnsServer
from tests.integration.gateway_util import ENDPOINTS, MEMBRANE, ROOT, gateway, http_backend, http_policy
from tests.integration.h2_server import H2TestServer

pytestmark = pytest.mark.integration

RULES = """              - method: GET
                path: "/api(/.*)?"
              - method: HEAD
                path: "/api(/.*)?"
              - method: GET
                path: "/ws"
                headers: ["Upgrade: websocket"]
              - method: GET
                path: "/tok"
                headers: ["X-Token: abc"]
"""


class RawBackend:
    """A hand-written HTTP/1.1 server: 101 for a WebSocket upgrade (then echoes), 304 on `/api/304`, else 200."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.seen: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                line = head.split(b"\r\n")[0]
                self.seen.append(line)
                if b" /ws " in line and b"upgrade: websocket" in head.lower():
                    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                 b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n" + buf)
                    while data := conn.recv(65536):
                        conn.sendall(b"echo:" + data)
                    return
                if b" /api/304 " in line:
                    conn.sendall(b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 123\r\n\r\n')
                elif line.startswith(b"HEAD "):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(line), line))

    def __enter__(self) -> RawBackend:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def _exchange(sock: socket.socket, data: bytes, until: bytes, timeout_s: float = 5.0) -> bytes:
    """Send `data`, then read until `until` has been seen (or EOF/timeout)."""
    sock.sendall(data)
    sock.settimeout(timeout_s)
    out = b""
    while until not in out:
        chunk = sock.recv(65536)
        if not chunk:
            break
        out += chunk
    return out


UPGRADE = (b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def test_websocket_upgrade_allowed_only_when_the_upgrade_request_is(tmp_path: Path) -> None:
    """RFC 6455 §4.1 upgrade: relayed when the upgrade request is allowed; a denied one gets 403 and the connection stays HTTP (issue 4)."""
    with RawBackend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend", src="default/backend"
    ) as gw:
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            assert _exchange(s, UPGRADE % b"/ws2", b"Access denied\r\n").startswith(b"HTTP/1.1 403 ")
            assert _exchange(s, b"GET /api/after HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /api/after").startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", gw.port)) as s:
            assert _exchange(s, UPGRADE % b"/ws", b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
            assert _exchange(s, b"\x81\x05hello", b"hello") == b"echo:\x81\x05hello"
        with socket.create_connection(("127.0.0.1", gw.port)) as s:  # the headers rule needs the Upgrade header
            assert _exchange(s, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", b"Access denied\r\n").startswith(b"HTTP/1.1 403 ")
        assert b"GET /ws2 HTTP/1.1" not in backend.seen


def test_head_and_304_keep_the_connection_in_sync(tmp_path: Path) -> None:
    """Responses to HEAD and 304 have no body whatever Content-Length says (RFC 9112 §6.3); the next response on the connection is intact."""
    with RawBackend() as backend, gateway(
        tmp_path, http_policy(backend.port, RULES), upstream_port=backend.port, dst="default/frontend", src="default/backend"
    ) as gw, socket.create_connection(("127.0.0.1", gw.port)) as s:
        assert _exchange(s, b"HEAD /api/h HTTP/1.1\r\nHost: x\r\n\r\n", b"\r\n\r\n").startswith(b"HTTP/1.1 200 ")
        assert _exchange(s, b"GET /api/304 HTTP/1.1\r\nHost: x\r\n\r\n", b"\r\n\r\n").startswith(b"HTTP/1.1 304 ")
        nxt = _exchange(s, b"GET /api/next HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /api/next HTTP/1.1")
        assert nxt == b"HTTP/1.1 200 OK\r\nContent-Length: 22\r\n\r\nGET /api/next HTTP/1.1"


def test_header_rule_with_policies_given_as_file_and_directory(tmp_path: Path) -> None:
    """`headers: ["X-Token: abc"]` needs that exact header (Cilium HTTP rule); `--policies PATH...` is repeatable and takes directories."""
    with http_backend() as server:
        pdir = tmp_path / "pdir"
        pdir.mkdir()
        (pdir / "frontend.yaml").write_text(http_policy(server.port, RULES))
        # README's `--policies PATH...`: several paths after one flag, and the flag repeated.
        extra = ["--policies", str(ROOT / "examples" / "policies" / "deny.yaml"), str(pdir)]
        empty = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: none, namespace: default}\n" \
                "spec: {endpointSelector: {matchLabels: {app: nobody}}, ingress: [{fromEndpoints: [{matchLabels: {app: nobody}}]}]}\n"
        with gateway(tmp_path, empty, upstream_port=server.port, dst="default/frontend", src="default/backend",
                     extra=extra) as gw, httpx.Client(base_url=f"http://127.0.0.1:{gw.port}") as client:
            assert client.get("/tok").status_code == 403
            assert client.get("/tok", headers={"X-Token": "abcd"}).status_code == 403
            assert client.get("/tok", headers={"X-Token": "abc"}).status_code == 200
            assert client.get("/api/x").status_code == 200
        assert server.paths() == ["/tok", "/api/x"]


def test_src_defaults_to_the_client_ips_endpoint_else_world(tmp_path: Path) -> None:
    """Without --src a connection is from the endpoint owning the client's IP, else `world`, which this policy does not allow (issue 4)."""
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(ENDPOINTS.read_text().replace("ips: [10.244.1.20]", "ips: [10.244.1.20, 127.0.0.2]"))
    with http_backend() as server, gateway(
        tmp_path, http_policy(server.port, RULES), upstream_port=server.port, dst="default/frontend",
        extra=["--endpoints", str(endpoints)],
    ) as gw:
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as backend_pod:
            assert backend_pod.get(f"http://127.0.0.1:{gw.port}/api").status_code == 200
        with pytest.raises(httpx.TransportError), httpx.Client() as world:
            world.get(f"http://127.0.0.1:{gw.port}/api")
        flows = gw.wait_flows(3)
        assert server.paths() == ["/api"]
        sources = {(f["verdict"], f["source"].get("pod_name", ""), tuple(f["source"]["labels"])) for f in flows}
        assert ("FORWARDED", "backend", ("k8s:app=backend", "k8s:env=prod")) in sources
        assert ("DROPPED", "", ("reserved:world-ipv4",)) in sources


def _dig(port: int, name: str, *, tcp: bool) -> str:
    argv = ["dig", "@127.0.0.1", "-p", str(port), name, "A", "+time=2", "+tries=1"]
    return subprocess.run([*argv, "+tcp"] if tcp else argv, capture_output=True, text=True, timeout=20).stdout


DNS_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: crawler-dns
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: crawler
  egress:
    - toEndpoints:
        - matchLabels:
            "k8s:io.kubernetes.pod.namespace": kube-system
      toPorts:
        - ports:
            - port: "{port}"
              protocol: ANY
          rules:
            dns:
              - matchPattern: "*.cilium.io"
"""


def test_dns_answer_flow_summaries_name_the_rcode(tmp_path: Path) -> None:
    """An error answer's flow summary names its RCODE (RFC 1035 §4.1.1) and no summary prints a missing TTL as 'None'."""
    with DnsServer("www.cilium.io. 60 IN A 192.0.2.10") as server:
        port = server.address[1]
        with gateway(tmp_path, DNS_POLICY.replace("{port}", str(port)), upstream_port=port, dst="kube-system/coredns",
                     src="default/crawler", udp=True) as gw:
            for tcp in (False, True):
                assert "status: NOERROR" in _dig(gw.port, "www.cilium.io", tcp=tcp)
                assert "status: NXDOMAIN" in _dig(gw.port, "nope.cilium.io", tcp=tcp)
                assert "status: REFUSED" in _dig(gw.port, "evil.example", tcp=tcp)
            flows = gw.wait_flows(10)
    summaries = [f["Summary"] for f in flows]
    assert summaries.count("DNS Answer 192.0.2.10 TTL: 60 (Query www.cilium.io. A)") == 2, summaries
    assert summaries.count("DNS Answer RCode: NXDOMAIN (Query nope.cilium.io. A)") == 2, summaries
    assert not any("None" in s for s in summaries), summaries
    nx = [f for f in flows if f["l7"]["type"] == "RESPONSE" and f["l7"]["dns"]["query"] == "nope.cilium.io."]
    assert len(nx) == 2
    assert all(f["l7"]["dns"]["rcode"] == 3 for f in nx)


def test_http2_request_flows_carry_the_request_headers(tmp_path: Path) -> None:
    """HTTP/2 request flows list the request headers as HTTP/1.1 ones do (Hubble `l7.http.headers`), credentials redacted."""
    with H2TestServer() as server, gateway(
        tmp_path, http_policy(server.port, RULES), upstream_port=server.port, dst="default/frontend", src="default/backend"
    ) as gw, httpx.Client(http1=False, http2=True, base_url=f"http://127.0.0.1:{gw.port}") as client:
        assert client.get("/tok", headers={"X-Token": "abc", "Cookie": "s=1"}).status_code == 200
        assert client.get("/admin", headers={"X-Probe": "1"}).status_code == 403
        flows = gw.wait_flows(3)
    requests = {f["verdict"]: f["l7"]["http"]["headers"] for f in flows if f["l7"]["type"] == "REQUEST"}
    assert {"key": "x-token", "value": "abc"} in requests["FORWARDED"]
    assert {"key": "cookie", "value": "[REDACTED]"} in requests["FORWARDED"]
    assert {"key": "x-probe", "value": "1"} in requests["DROPPED"]


def test_ipv6_listen_address_is_printed_as_typed(tmp_path: Path) -> None:
    """`--listen [::1]:0` serves IPv6 clients, the readiness line prints `[::1]:PORT` (RFC 3986 §3.2.2), SIGINT exits 0."""
    with http_backend() as server:
        policy = tmp_path / "policy.yaml"
        policy.write_text(http_policy(server.port, RULES))
        cmd = [*MEMBRANE, "gateway", "--policies", str(policy), "--endpoints", str(ENDPOINTS), "--listen", "[::1]:0",
               "--upstream", f"127.0.0.1:{server.port}", "--dst", "default/frontend", "--src", "default/backend",
               "--workers", "1"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = re.search(r"listening on \[::1\]:(\d+) -> 127\.0\.0\.1:(\d+) ", line)
            assert match, line
            assert int(match.group(2)) == server.port, line
            with httpx.Client() as client:
                assert client.get(f"http://[::1]:{match.group(1)}/api").status_code == 200
            proc.send_signal(signal.SIGINT)
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    assert server.paths() == ["/api"]


def test_agent_cli_loads_and_reports_no_agent(tmp_path: Path) -> None:
    """`membrane status` / `endpoint list` import the agent and exit 1 with a clear message when no agent runs (README exit codes)."""
    status = tmp_path / "no-agent-status.json"
    for cmd in (["status"], ["endpoint", "list"], ["status", "-o", "json"]):
        out = subprocess.run([*MEMBRANE, *cmd, "--status-file", str(status)], capture_output=True, text=True, cwd=ROOT,
                             timeout=60)
        assert out.returncode == 1, out.stderr
        assert "no agent is running" in out.stderr
    usage = subprocess.run([*MEMBRANE, "run", "--endpoints", "x.yaml"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert usage.returncode == 2
    assert "--policies" in usage.stderr


def test_unwritable_flows_path_is_a_clear_usage_error(tmp_path: Path) -> None:
    """`--flows` in a missing directory exits 2 with one line naming the path (README exit codes), with one worker or several."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(http_policy(8080, RULES))
    for workers in ("1", "2"):
        out = subprocess.run(
            [*MEMBRANE, "gateway", "--policies", str(policy), "--endpoints", str(ENDPOINTS), "--listen", "127.0.0.1:0",
             "--upstream", "127.0.0.1:8080", "--dst", "default/frontend", "--workers", workers,
             "--flows", str(tmp_path / "missing" / "flows.jsonl")],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip() == f"membrane gateway: cannot open --flows {tmp_path / 'missing' / 'flows.jsonl'}: No such file or directory"
