"""Running `membrane gateway` as a real subprocess on loopback for integration tests, and recording backends."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ENDPOINTS = ROOT / "examples" / "endpoints.yaml"
MEMBRANE = [sys.executable, "-m", "membrane.cli"]


@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    port: int
    flows_path: Path
    stderr_path: Path

    def flows(self) -> list[dict[str, Any]]:
        """The `flow` objects of the records written so far (each line is Hubble's `{"flow": ...}` envelope)."""
        if not self.flows_path.exists():
            return []
        return [json.loads(line)["flow"] for line in self.flows_path.read_text().splitlines() if line.strip()]

    def wait_flows(self, n: int, timeout: float = 5.0, settle: float = 0.3) -> list[dict[str, Any]]:
        """The records written once there are at least `n` and no more arrived for `settle` seconds
        (a writer thread writes them a few ms after the answers; a later record must not be missed)."""
        deadline = time.monotonic() + timeout
        seen, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            flows = self.flows()
            if len(flows) != seen:
                seen, since = len(flows), time.monotonic()
            elif len(flows) >= n and time.monotonic() - since >= settle:
                return flows
            time.sleep(0.02)
        return self.flows()

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def _limit_files(n: int) -> None:
    """In the child before exec: at most `n` open descriptors (RLIMIT_NOFILE), to drive descriptor exhaustion."""
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


@contextmanager
def gateway(
    tmp_path: Path,
    policy_yaml: str,
    *,
    upstream_port: int,
    dst: str,
    src: str | None = None,
    udp: bool = False,
    extra: list[str] | None = None,
    workers: int = 1,
    nofile: int | None = None,
) -> Iterator[Gateway]:
    """Start `membrane gateway` with a policy on 127.0.0.1:0 and wait for its `listening` line."""
    policy = tmp_path / f"policy-{time.monotonic_ns()}.yaml"
    policy.write_text(policy_yaml)
    flows = tmp_path / f"flows-{time.monotonic_ns()}.jsonl"
    stderr_path = tmp_path / f"gateway-{time.monotonic_ns()}.err"
    cmd = [
        *MEMBRANE, "gateway", "--policies", str(policy), "--endpoints", str(ENDPOINTS),
        "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream_port}", "--dst", dst,
        "--flows", str(flows), "--workers", str(workers),
    ]
    if src is not None:
        cmd += ["--src", src]
    if udp:
        cmd.append("--udp")
    cmd += extra or []
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                preexec_fn=None if nofile is None else functools.partial(_limit_files, nofile))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on [^ ]+:(\d+)", line)
    if not match:
        proc.kill()
        proc.wait()
        raise AssertionError(f"gateway did not start: {line!r} {stderr_path.read_text()}")
    gw = Gateway(proc=proc, port=int(match.group(1)), flows_path=flows, stderr_path=stderr_path)
    try:
        yield gw
    finally:
        if proc.poll() is None:
            gw.stop()
        proc.stdout.close()


def http_policy(port: int, rules: str, name: str = "frontend-api") -> str:
    """frontend accepts, from backend on `port`, the HTTP `rules` (YAML list items indented by 16)."""
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: {name}
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: frontend
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: backend
      toPorts:
        - ports:
            - port: "{port}"
              protocol: TCP
          rules:
            http:
{rules}
"""


class RecordingHTTPServer(ThreadingHTTPServer):
    """A real HTTP/1.1 server (keep-alive, chunked request bodies, large bodies) that records what it saw."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def paths(self) -> list[str]:
        with self.lock:
            return [p for _, p, _, _ in self.seen]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RecordingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._body()
        with self.server.lock:
            self.server.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        if self.path.startswith("/api/big"):
            size = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = bytes(range(256)) * 256
            sent = 0
            while sent < size:
                piece = chunk[: min(len(chunk), size - sent)]
                self.wfile.write(piece)
                sent += len(piece)
            return
        payload = json.dumps(
            {"method": self.command, "path": self.path, "body_len": len(body), "headers": {k.lower(): v for k, v in self.headers.items()}}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle


@contextmanager
def http_backend() -> Iterator[RecordingHTTPServer]:
    server = RecordingHTTPServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
