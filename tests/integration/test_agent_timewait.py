"""Short connections through the agent reuse the pod's source ports without colliding with the
proxy's TIME_WAIT sockets in the host namespace (issue 13).

The client pod's ephemeral port range is narrowed to a few ports, so every port is reused within
seconds, well inside the 60 s a TIME_WAIT socket lives. Root only, under the kernel lock.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from membrane.sandbox.live_demo import HTTP_SERVER, AgentProcess

from tests.helpers.netns import Topology, topology
from tests.integration.test_agent import (  # noqa: F401  (fixtures)
    HTTP_POLICY,
    _pins,
    _root_and_clean,
    agent_box,
    endpoints_yaml,
    start_agent,
    start_server,
)

PORTS = 4  # the client pod's whole ephemeral port range
ROUNDS = 5  # connections per port

# argv: URL HOST N TIMEOUT MODE. One fresh connection per request; prints one line per request:
# "<i> <local port> <status> <body length>" or "<i> ERR <exception>"; exit 0 when every request worked.
CLIENT = """
import http.client, socket, sys
host, n, timeout, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
bad = 0
for i in range(n):
    try:
        c = http.client.HTTPConnection(host, 80, timeout=timeout)
        if mode == "http10":
            c._http_vsn, c._http_vsn_str = 10, "HTTP/1.0"
        c.request("GET", "/api", headers={"Connection": "close"} if mode == "close" else {})
        port = c.sock.getsockname()[1]
        r = c.getresponse()
        body = r.read()
        c.close()
        print(i, port, r.status, len(body), flush=True)
        if r.status != 200 or not body.startswith(b"hello"):
            bad += 1
    except Exception as e:
        print(i, "ERR", repr(e), flush=True)
        bad += 1
sys.exit(1 if bad else 0)
"""


# A server that closes every connection after one response, so the upstream closes first. argv: PORT MODE.
# MODE "delimited": HTTP/1.0 with no Content-Length, the EOF ends the body, so the proxy must pass it on as
# a FIN and its pod-facing socket keeps a TIME_WAIT with the pod's tuple in the host netns. MODE "framed":
# a keep-alive response with Content-Length, then the close (an upstream's keep-alive timeout): the EOF
# ends no message.
CLOSING_SERVER = """
import socket, sys, threading
framed = sys.argv[2] == "framed"
def serve(c, peer):
    with c:
        data = b""
        while b"\\r\\n\\r\\n" not in data:
            chunk = c.recv(4096)
            if not chunk:
                return
            data += chunk
        path = data.split(b" ", 2)[1].decode()
        body = f"hello {peer[0].removeprefix('::ffff:')} GET {path}\\n".encode()
        if framed:
            c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
        else:
            c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\n" + body)
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.listen(128)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""


def _narrow_ports(topo: Topology, name: str) -> None:
    lo = 40000
    topo.pods[name].run(["sysctl", "-q", "-w", f"net.ipv4.ip_local_port_range={lo} {lo + PORTS - 1}"])


def _run(topo: Topology, tmp_path: Path, agent_box: list[AgentProcess], mode: str,  # noqa: F811
         server: tuple[str, ...] = (HTTP_SERVER,), family: int = 4) -> None:
    fe, be = topo.pods["frontend"], topo.pods["backend"]
    start_server(topo, fe, server[0], "80", *server[1:])
    eps = tmp_path / "endpoints.yaml"
    eps.write_text(endpoints_yaml(topo, {}))
    agent = start_agent([HTTP_POLICY], eps, tmp_path)
    agent_box.append(agent)
    _narrow_ports(topo, "backend")
    if mode == "server-closes":
        # keep-alive requests; the client reads the response and closes only after the server's EOF came
        script = CLIENT.replace("c.close()", "time.sleep(0.05); c.close()").replace("import http.client", "import time, http.client")
        out = be.run([sys.executable, "-c", script, str(fe.ipv4), str(PORTS * ROUNDS), "2", "keep"], check=False, timeout=120)
        lines = out.stdout.splitlines()
        assert out.returncode == 0, out.stdout + out.stderr
        assert len(lines) == PORTS * ROUNDS
        assert len({line.split()[1] for line in lines}) <= PORTS
    elif mode == "curl":
        # curl's own exit status per request (28 = timed out); every response body in full
        script = f"for i in $(seq {PORTS * ROUNDS}); do curl -s -m 2 -H 'Connection: close' http://{fe.ipv4}/api; echo \" rc=$?\"; done"
        out = be.run(["sh", "-c", script], check=False, timeout=120)
        assert out.stdout == f"hello {be.ipv4} GET /api\n rc=0\n" * (PORTS * ROUNDS), out.stdout
    else:
        host = str(fe.ipv4 if family == 4 else fe.ipv6)
        out = be.run([sys.executable, "-c", CLIENT, host, str(PORTS * ROUNDS), "2", mode], check=False, timeout=120)
        lines = out.stdout.splitlines()
        assert out.returncode == 0, out.stdout + out.stderr
        assert len(lines) == PORTS * ROUNDS
        assert len({line.split()[1] for line in lines}) <= PORTS  # the ports really were reused
    assert agent.stop() == 0


def test_connection_close_requests_reuse_ports(tmp_path: Path, agent_box: list[AgentProcess]) -> None:  # noqa: F811
    """HTTP/1.1 with `Connection: close`, 5 connections per source port: every one is answered."""
    with topology("frontend", "backend") as topo:
        _run(topo, tmp_path, agent_box, "close")


def test_curl_connection_close_reuses_ports(tmp_path: Path, agent_box: list[AgentProcess]) -> None:  # noqa: F811
    """curl with `Connection: close`, 5 connections per source port: every one gets the whole body, exit 0."""
    with topology("frontend", "backend") as topo:
        _run(topo, tmp_path, agent_box, "curl")


def test_http10_requests_reuse_ports(tmp_path: Path, agent_box: list[AgentProcess]) -> None:  # noqa: F811
    """HTTP/1.0 requests (the connection ends after each response), 5 per source port: every one is answered."""
    with topology("frontend", "backend") as topo:
        _run(topo, tmp_path, agent_box, "http10")


@pytest.mark.parametrize("family", [4, 6])
def test_server_closing_first_reuses_ports(tmp_path: Path, agent_box: list[AgentProcess], family: int) -> None:  # noqa: F811
    """The server ends each response by closing (a close-delimited HTTP/1.0 body), so the proxy has to
    close its pod-facing socket first with a FIN (the EOF is the end of the body) and keeps a TIME_WAIT
    with the pod's tuple: 5 connections per source port still all get their whole body (the SYN that
    meets the TIME_WAIT goes through the kernel's TIME_WAIT handling and mbr_sk_lookup to the proxy)."""
    with topology("frontend", "backend") as topo:
        _run(topo, tmp_path, agent_box, "http10", server=(CLOSING_SERVER, "delimited"), family=family)


def test_upstream_closing_keep_alive_connections_reuses_ports(tmp_path: Path, agent_box: list[AgentProcess]) -> None:  # noqa: F811
    """The upstream closes each keep-alive connection after a framed response (its EOF ends nothing): the
    proxy leaves no TIME_WAIT on the pod's tuple, so 5 connections per source port are all answered."""
    with topology("frontend", "backend") as topo:
        _run(topo, tmp_path, agent_box, "server-closes", server=(CLOSING_SERVER, "framed"))
