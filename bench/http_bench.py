"""HTTP load drivers for the bench: wrk (HTTP/1.1), h2load (HTTP/2, gRPC), a fixed-rate latency probe, idle memory.

Each driver runs one bounded measurement against 127.0.0.1 and returns a `Result`: the numbers and the exact
command that reproduces them. It never starts or stops servers (bench/peers does) and never asserts on timing.

Fixed-rate latency: Debian has no wrk2, so `fixed_rate()` is a small open-loop generator in Python (one thread,
`select()` for microsecond timer resolution, a pool of keep-alive connections). Requests are scheduled at
start + i/rate; latency is taken from the actual send time, or from the scheduled time when the request had to
wait for a free connection (so a stall is not hidden: no coordinated omission). Its own overhead (~10-30 us of
Python per request) is in both the direct and the proxied numbers; compare the two, not the absolute values.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import selectors
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import HOST, PEERS_DIR, require_tool, rss_kib

WRK_SCRIPT = PEERS_DIR / "wrk_report.lua"
GRPC_BODY = PEERS_DIR / "grpc_reply.bin"
BENCH_PATH = "/api"


@dataclass
class Result:
    """One measurement: its numbers (rate, latencies in microseconds, counts) and its reproducing command."""

    command: str
    values: dict[str, float] = field(default_factory=dict)
    note: str = ""


def display(argv: list[str]) -> str:
    """The command as a person would type it from the repository root."""
    shown = [Path(argv[0]).name if argv[0].startswith(("/usr/bin/", "/usr/sbin/")) else argv[0], *argv[1:]]
    return shlex.join(shown).replace(str(PEERS_DIR.parent.parent) + "/", "")


def _run(argv: list[str], timeout_s: float) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")
    return done.stdout


def wrk(port: int, *, connections: int, duration_s: float, threads: int = 1, path: str = BENCH_PATH) -> Result:
    """wrk keep-alive load on http://127.0.0.1:port/path; req/s and exact latency percentiles from wrk_report.lua."""
    exe = require_tool("wrk", "wrk")
    argv = [exe, f"-t{threads}", f"-c{connections}", f"-d{max(1, math.ceil(duration_s))}s", "--timeout", "5s", "-s", str(WRK_SCRIPT),
            f"http://{HOST}:{port}{path}"]
    out = _run(argv, duration_s + 30)
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no WRKJSON line: {out[-300:]}")
    data = json.loads(line[len("WRKJSON "):])
    values = {
        "req_s": data["requests"] / (data["duration_us"] / 1e6),
        "p50_us": data["lat_p50_us"],
        "p90_us": data["lat_p90_us"],
        "p99_us": data["lat_p99_us"],
        "mean_us": data["lat_mean_us"],
        "requests": data["requests"],
        "errors": data["errors"],
    }
    note = f"{data['errors']} errors ({data['status_errors']} non-2xx)" if data["errors"] else ""
    return Result(command=display(argv), values=values, note=note)


_H2_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def h2load(port: int, *, path: str = BENCH_PATH, clients: int = 10, streams: int = 10, duration_s: float,
           grpc: bool = False) -> Result:
    """h2load over h2c (prior knowledge); grpc=True sends POSTs with a gRPC frame body and gRPC headers."""
    exe = require_tool("h2load", "nghttp2-client")
    argv = [exe, "-c", str(clients), "-m", str(streams), "-D", f"{duration_s:g}", "-t", "1"]
    if grpc:
        argv += ["-d", str(GRPC_BODY), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    argv.append(f"http://{HOST}:{port}{path}")
    out = _run(argv, duration_s + 30)
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    r = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
                  r"(\d+) timeout", out)
    s = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    t = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    if not (m and r and s and t):
        raise RuntimeError(f"could not parse h2load output: {out[-400:]}")
    values = {
        "req_s": float(m.group(1)),
        "mean_us": float(t.group(5)) * _H2_UNITS[t.group(6)],
        "max_us": float(t.group(3)) * _H2_UNITS[t.group(4)],
        "requests": int(r.group(2)),
        "errors": int(r.group(4)) + int(r.group(5)) + int(r.group(6)),
        "non_2xx": int(s.group(2)) + int(s.group(3)) + int(s.group(4)),
    }
    if not int(s.group(1)):
        raise RuntimeError(f"no request succeeded ({r.group(2)} done, {r.group(4)} failed, {r.group(5)} errored, "
                           f"{s.group(3)} 4xx, {s.group(4)} 5xx)")
    note = ""
    if values["non_2xx"] or values["errors"]:
        note = f"{values['non_2xx']:.0f} non-2xx, {values['errors']:.0f} failed/errored"
    return Result(command=display(argv), values=values, note=note)


class _Conn:
    __slots__ = ("buf", "sock", "started_ns")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.started_ns = 0


def _response_length(buf: bytes) -> int | None:
    """Bytes of the first complete HTTP/1.1 response in buf (Content-Length framing), or None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", buf[:end])
    body = int(m.group(1)) if m else 0
    total = end + 4 + body
    return total if len(buf) >= total else None


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[idx]


def fixed_rate(port: int, *, rate: float, duration_s: float, connections: int = 16, path: str = BENCH_PATH) -> Result:
    """Open-loop GETs at `rate` per second for duration_s over keep-alive connections; latency percentiles in us."""
    command = (f".venv/bin/python bench/http_bench.py fixed-rate --port {port} --rate {rate:g} "
               f"--duration {duration_s:g} --connections {connections}")
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    sel = selectors.SelectSelector()  # select() takes microsecond timeouts; epoll rounds up to milliseconds
    idle: collections.deque[_Conn] = collections.deque()
    conns: list[_Conn] = []
    latencies: list[float] = []
    errors = 0
    try:
        for _ in range(connections):
            sock = socket.create_connection((HOST, port), timeout=5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            conn = _Conn(sock)
            conns.append(conn)
            idle.append(conn)
            sel.register(sock, selectors.EVENT_READ, conn)
        interval_ns = 1e9 / rate
        total = int(rate * duration_s)
        start_ns = time.perf_counter_ns() + 5_000_000
        hard_stop_ns = start_ns + int((duration_s + 10) * 1e9)
        waiting: collections.deque[int] = collections.deque()  # scheduled times of requests waiting for a connection
        busy: dict[_Conn, int] = {}
        sent = 0
        while (sent < total or waiting or busy) and time.perf_counter_ns() < hard_stop_ns:
            now = time.perf_counter_ns()
            while sent < total and start_ns + sent * interval_ns <= now:
                scheduled = int(start_ns + sent * interval_ns)
                sent += 1
                if idle and not waiting:
                    conn = idle.popleft()
                    conn.started_ns = now
                    conn.sock.send(request)
                    busy[conn] = now
                else:
                    waiting.append(scheduled)
            while waiting and idle:
                conn = idle.popleft()
                conn.started_ns = waiting.popleft()  # it waited: count from when it should have gone out
                conn.sock.send(request)
                busy[conn] = conn.started_ns
            timeout_s = max(0.0, (start_ns + sent * interval_ns - time.perf_counter_ns()) / 1e9) if sent < total else 0.05
            for key, _ in sel.select(timeout_s):
                conn = key.data
                try:
                    chunk = conn.sock.recv(65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    raise RuntimeError("server closed a keep-alive connection")
                conn.buf += chunk
                while (n := _response_length(conn.buf)) is not None:
                    t_done = time.perf_counter_ns()
                    if not conn.buf.startswith(b"HTTP/1.1 200"):
                        errors += 1
                    conn.buf = conn.buf[n:]
                    latencies.append((t_done - conn.started_ns) / 1e3)
                    busy.pop(conn, None)
                    idle.append(conn)
        lost = total - len(latencies)
    finally:
        for conn in conns:
            conn.sock.close()
        sel.close()
    latencies.sort()
    values = {
        "rate": rate,
        "requests": len(latencies),
        "lost": lost,
        "errors": errors,
        "p50_us": _percentile(latencies, 50),
        "p99_us": _percentile(latencies, 99),
        "p999_us": _percentile(latencies, 99.9),
        "max_us": latencies[-1] if latencies else float("nan"),
    }
    note = f"{errors} non-200, {lost} unanswered" if errors or lost else ""
    return Result(command=command, values=values, note=note)


def http_status(port: int, method: str, path: str, timeout_s: float = 5.0) -> int:
    """Status code of one HTTP/1.1 request to 127.0.0.1:port (used to check that a proxy enforces the rule)."""
    with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n\r\n".encode())
        buf = b""
        while b"\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
    m = re.match(rb"HTTP/1\.[01] (\d{3})", buf)
    if not m:
        raise RuntimeError(f"no HTTP status line from port {port}: {buf[:80]!r}")
    return int(m.group(1))


def acl_check(port: int) -> str:
    """'' when the proxy on port allows GET /api and answers 403 to POST /api and GET /private; else a note."""
    try:
        got = (http_status(port, "GET", BENCH_PATH), http_status(port, "POST", BENCH_PATH),
               http_status(port, "GET", "/private"))
    except (OSError, RuntimeError) as exc:
        return f"rule check failed: {exc}"
    return "" if got == (200, 403, 403) else f"RULE NOT ENFORCED: GET/POST /api, GET /private -> {got}"


def grpc_check(port: int) -> str:
    """'' when a real grpcio client gets /bench.Echo/Call answered and /bench.Echo/Other refused by the proxy.

    Refused means any status but OK and UNIMPLEMENTED: UNIMPLEMENTED is the grpcio server's own answer, so
    the call went through.
    """
    import grpc  # the dev extra; only this check needs it

    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        try:
            channel.unary_unary("/bench.Echo/Call")(b"", timeout=5)
        except grpc.RpcError as exc:
            return f"RULE NOT ENFORCED: allowed /bench.Echo/Call failed with {exc.code()}"  # type: ignore[attr-defined]
        try:
            channel.unary_unary("/bench.Echo/Other")(b"", timeout=5)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            return "" if code != grpc.StatusCode.UNIMPLEMENTED else "RULE NOT ENFORCED: /bench.Echo/Other reached the server"
        return "RULE NOT ENFORCED: /bench.Echo/Other answered OK"


def established_to(port: int) -> int:
    """Established TCP connections whose local port is `port` on 127.0.0.1 (the backend's side of each pair)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[1].split(":")[1], 16) == port:
            count += 1
    return count


def idle_memory(pid: int, port: int, *, count: int, settle_s: float = 1.0, upstream_port: int | None = None) -> Result:
    """RSS growth of pid's process tree per idle keep-alive connection pair (each made one request first).

    With upstream_port, also counts the established connections the backend holds while the clients idle,
    which shows whether the proxy really keeps one upstream connection per client (a "pair").
    """
    request = f"GET {BENCH_PATH} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()

    def open_one() -> socket.socket:
        sock = socket.create_connection((HOST, port), timeout=5)
        sock.sendall(request)
        buf = b""
        while _response_length(buf) is None:
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError("proxy closed the connection before answering")
            buf += chunk
        return sock

    for sock in [open_one() for _ in range(20)]:  # warm-up: one-time allocations are not per connection
        sock.close()
    time.sleep(settle_s)
    before = rss_kib(pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(open_one())
        time.sleep(settle_s)
        after = rss_kib(pid)
        upstream = established_to(upstream_port) if upstream_port else -1
    finally:
        for sock in socks:
            sock.close()
    values = {"connections": count, "rss_before_kib": before, "rss_after_kib": after,
              "kib_per_conn": (after - before) / count, "upstream_conns": upstream}
    command = f".venv/bin/python bench/http_bench.py idle-memory --pid PID --port {port} --count {count}"
    return Result(command=command, values=values)


def main(argv: list[str] | None = None) -> int:
    """Runs one driver against an already running server (the commands printed in the bench table)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    fr = sub.add_parser("fixed-rate", help="open-loop GETs at a fixed rate; latency percentiles")
    fr.add_argument("--port", type=int, required=True)
    fr.add_argument("--rate", type=float, default=1000)
    fr.add_argument("--duration", type=float, default=10)
    fr.add_argument("--connections", type=int, default=16)
    im = sub.add_parser("idle-memory", help="RSS growth per idle proxied connection")
    im.add_argument("--pid", type=int, required=True)
    im.add_argument("--port", type=int, required=True)
    im.add_argument("--count", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.cmd == "fixed-rate":
        res = fixed_rate(args.port, rate=args.rate, duration_s=args.duration, connections=args.connections)
    else:
        res = idle_memory(args.pid, args.port, count=args.count)
    print(json.dumps(res.values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
