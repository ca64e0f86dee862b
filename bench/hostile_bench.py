"""Hostile and failing peers against `membrane gateway` (issue 13 item 5): the limits hit, with numbers.

Each scenario starts its own `membrane gateway --workers 1 --metrics 127.0.0.1:PORT` on loopback (as the README
runs it) in front of a real upstream, runs a legitimate client alone for a baseline, then runs the attack from
127.0.0.2 while the legitimate client (127.0.0.1) keeps sending allowed requests. Reported per scenario:
- what was sent and what the attacker got (status / GOAWAY code / rcode, time until the limit fired);
- the counters that moved in a real `/metrics` scrape (after minus before);
- the gateway's warning/error log lines written meanwhile;
- the gateway's RSS and open descriptors before the attack, at its peak (sampled every 20 ms) and 1 s after;
- the legitimate client's answered/failed count and p50/p99 latency during the attack, next to the baseline.

| scenario | attack | upstream | legitimate client |
|---|---|---|---|
| h2-ping-flood | PINGs as fast as one connection takes them | h2 server | httpx HTTP/2 GETs |
| h2-settings-flood | SETTINGS frames likewise | h2 server | httpx HTTP/2 GETs |
| h2-rapid-reset | 40 connections at once, 450 streams each opened and reset | h2 server | httpx HTTP/2 GETs |
| slowloris | 500 connections trickling a head, one byte per 0.2 s each (--header-timeout 2) | HTTP/1.1 server | new connection per GET |
| per-client-connections | 5,000 connections from 127.0.0.2 (default limits: 10,000; a quarter per client) | HTTP/1.1 server | new connection per GET |
| dns-udp-fresh-ports | 2,000 UDP queries, each from a new source port, 100 in flight | DNS server | UDP queries |
| upstream-never-answers | 200 requests at once that the upstream reads and never answers (--upstream-timeout 1) | HTTP/1.1 server | new connection per GET |
| upstream-closes | 200 requests at once that the upstream reads and closes without answering | HTTP/1.1 server | new connection per GET |
| kafka-oversized-frame | 4 connections at once, each a 100 MiB size prefix then data as fast as taken | Kafka test broker | Metadata on a new connection |
| dns-tcp-pipelining | 4 connections, each pipelining the bound + 64 queries in one write | DNS server | DNS over TCP |

    .venv/bin/python bench/hostile_bench.py [--json FILE] [--only NAME ...] [--quick]

Loopback only (no namespaces, no kernel programs): needs no lock. About 2 minutes; `--quick` shrinks every
attack (for the self-check in tests/bench/).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import re
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.*: the servers, frame builders and policies the hostile-peer tests use

import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402
import httpx  # noqa: E402
from membrane.parsers.dns import MAX_TCP_QUERIES_OUTSTANDING  # noqa: E402
from membrane.sandbox.kafka_broker import KafkaTestBroker  # noqa: E402

from tests.helpers.dns_server import DnsServer  # noqa: E402
from tests.helpers.frames import FrameBuilder, client_preface, raw_frame, request_headers  # noqa: E402
from tests.integration.gateway_util import Gateway, gateway, http_backend, http_policy  # noqa: E402
from tests.integration.h2_server import H2TestServer  # noqa: E402
from tests.integration.test_gateway_dns import ZONE, dns_policy  # noqa: E402
from tests.integration.test_gateway_kafka import _metadata, kafka_policy  # noqa: E402

ATTACKER = "127.0.0.2"
RULES = """              - method: GET
                path: "/api(/.*)?"
"""
ENHANCE_YOUR_CALM = 0xB
GOAWAY_NAMES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 7: "REFUSED_STREAM", 0xB: "ENHANCE_YOUR_CALM"}
COUNTER_FAMILIES = (
    "membrane_proxy_limits_exceeded_total", "membrane_proxy_timeouts_total", "membrane_proxy_connections_rejected_total",
    "membrane_proxy_parse_errors_total", "membrane_proxy_upstream_failures_total", "membrane_proxy_resource_exhausted_total",
    "membrane_proxy_internal_errors_total",
)


@dataclass
class Scale:
    baseline_s: float = 2.0
    min_attack_s: float = 2.0
    slowloris_conns: int = 500
    hog_conns: int = 5000
    dns_queries: int = 2000
    rapid_conns: int = 40
    rapid_streams: int = 450
    hanging: int = 200
    kafka_conns: int = 4
    kafka_mib: int = 100
    quick: bool = False

    @classmethod
    def make_quick(cls) -> Scale:
        return cls(baseline_s=0.5, min_attack_s=0.5, slowloris_conns=50, hog_conns=300, dns_queries=200, rapid_conns=6,
                   rapid_streams=450, hanging=20, kafka_conns=2, kafka_mib=8, quick=True)


# --- measuring the gateway ---------------------------------------------------------------------------------------


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler:
    """RSS and open descriptors of the gateway process, sampled every 20 ms in a thread; keeps the peaks."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = _rss_mib(pid)
        self.peak_fds = _fds(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> tuple[float, int]:
        return _rss_mib(self.pid), _fds(self.pid)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                rss, fds = self.now()
            except (FileNotFoundError, ProcessLookupError):
                return
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_fds = max(self.peak_fds, fds)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def scrape(port: int) -> dict[str, float]:
    """Every membrane_proxy_* counter sample of a real /metrics scrape (`name{labels}` -> value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(COUNTER_FAMILIES):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items()) if v - before.get(k, 0.0) > 0}


def new_log_lines(gw: Gateway, offset: int) -> list[str]:
    text = gw.stderr_path.read_text()[offset:]
    return [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]


def summarize_logs(lines: list[str]) -> list[str]:
    """Distinct messages (timestamps cut, addresses and numbers kept from the first of each kind) with counts."""
    kinds: dict[str, tuple[str, int]] = {}
    for line in lines:
        message = line.split(" ", 3)[3] if line.count(" ") >= 3 else line
        key = re.sub(r"\d+", "N", message)
        first, n = kinds.get(key, (message, 0))
        kinds[key] = (first, n + 1)
    return [f"{first} (x{n})" if n > 1 else first for first, n in kinds.values()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the legitimate client ---------------------------------------------------------------------------------------


class Legit:
    """Calls the `kind` request (True when answered as expected) in a loop, 5 ms apart, in a child process of its
    own (so the attacker's threads in this process do not slow it), and records latencies."""

    def __init__(self, kind: str, port: int) -> None:
        self.kind, self.port = kind, port
        ctx = multiprocessing.get_context("fork")
        self._stop = ctx.Event()
        self._ready = ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=self._run, args=(send,), daemon=True)

    def _run(self, send: Any) -> None:
        with ExitStack() as stack:
            request = legit_request(self.kind, self.port, stack)
            try:
                request()  # not counted: the client's own set-up (connection pool, imports)
            except Exception:
                pass
            self._ready.set()
            latencies: list[float] = []
            failed = 0
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    ok = request()
                except Exception:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    failed += 1
                self._stop.wait(0.005)
        send.send((latencies, failed))

    def start(self) -> Legit:
        """Start the child; returns once it has sent its first (uncounted) request."""
        self._proc.start()
        self._ready.wait(10)
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        latencies, failed = self._recv.recv() if self._recv.poll(60) else ([], -1)
        self._proc.join(10)
        lat = sorted(latencies)
        pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: float("nan"))
        return {"ok": len(lat), "failed": failed, "p50_ms": pick(0.50), "p99_ms": pick(0.99)}

    def run_for(self, seconds: float) -> dict[str, float]:
        self.start()
        time.sleep(seconds)
        return self.stop()


def http1_get(port: int, path: str = "/api/ok") -> Callable[[], bool]:
    def request() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            return r.status == 200
        finally:
            conn.close()

    return request


def http2_get(port: int) -> tuple[Callable[[], bool], Callable[[], None]]:
    client = httpx.Client(http1=False, http2=True, base_url=f"http://127.0.0.1:{port}", timeout=5)

    def request() -> bool:
        return client.get("/api/ok").status_code == 200

    return request, client.close


def dns_udp(port: int) -> Callable[[], bool]:
    def request() -> bool:
        answer = dns.query.udp(dns.message.make_query("www.cilium.io", "A"), "127.0.0.1", port=port, timeout=5)
        return answer.rcode() == dns.rcode.NOERROR and bool(answer.answer)

    return request


def dns_tcp(port: int) -> Callable[[], bool]:
    def request() -> bool:
        answer = dns.query.tcp(dns.message.make_query("www.cilium.io", "A"), "127.0.0.1", port=port, timeout=5)
        return answer.rcode() == dns.rcode.NOERROR and bool(answer.answer)

    return request


def kafka_metadata(port: int) -> Callable[[], bool]:
    counter = iter(range(1, 1 << 30))

    def request() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            cid = next(counter)
            sock.sendall(_metadata(cid, "orders"))
            data = b""
            while len(data) < 4 or len(data) < 4 + struct.unpack(">i", data[:4])[0]:
                chunk = sock.recv(65536)
                if not chunk:
                    return False
                data += chunk
            return struct.unpack(">i", data[4:8])[0] == cid

    return request


# --- raw socket helpers ------------------------------------------------------------------------------------------


def attacker_socket(port: int, timeout: float | None = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(ATTACKER, 0))


def h2_frames(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        if pos + 9 + length > len(data):
            return
        yield data[pos + 3], data[pos + 9 : pos + 9 + length]
        pos += 9 + length


def goaway_codes(data: bytes) -> list[str]:
    return [GOAWAY_NAMES.get(c, str(c)) for c in (int.from_bytes(p[4:8], "big") for t, p in h2_frames(data) if t == 7)]


def read_to_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f} s" if seconds < 1 else f"{seconds:.2f} s"


# --- scenarios: each returns what the attacker sent and got ------------------------------------------------------


def h2_flood(port: int, frame: bytes, name: str, limit_s: float = 10.0) -> dict[str, Any]:
    """Send `frame` over and over on one connection as fast as it is taken, reading what comes back, until EOF."""
    sock = attacker_socket(port)
    sock.sendall(client_preface(FrameBuilder()))
    sock.setblocking(False)
    batch = frame * 256
    pending = b""
    sent = 0
    received = b""
    goaway_at = eof_at = None
    start = time.monotonic()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    while time.monotonic() - start < limit_s and eof_at is None:
        for _key, events in sel.select(0.05):
            if events & selectors.EVENT_READ:
                try:
                    chunk = sock.recv(65536)
                except (ConnectionResetError, BlockingIOError) as e:
                    chunk = b"" if isinstance(e, ConnectionResetError) else None  # type: ignore[assignment]
                if chunk == b"":
                    eof_at = time.monotonic() - start
                    break
                if chunk:
                    received += chunk
                    if goaway_at is None and goaway_codes(received):
                        goaway_at = time.monotonic() - start
            if events & selectors.EVENT_WRITE and goaway_at is None:
                pending = pending or batch
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    eof_at = time.monotonic() - start
                    break
                except BlockingIOError:
                    n = 0
                sent += n
                pending = pending[n:]
            elif goaway_at is not None:
                sel.modify(sock, selectors.EVENT_READ)
    sel.close()
    sock.close()
    codes = goaway_codes(received)
    return {
        "sent": f"{sent // len(frame):,} {name} frames ({sent / 1e6:.1f} MB) on one connection",
        "got": f"GOAWAY {', '.join(codes) or 'none'}; " + ("EOF" if eof_at is not None else "no EOF within 10 s"),
        "fired_after": goaway_at,
        "frames_sent": sent // len(frame), "goaway": codes, "eof": eof_at is not None,
    }


def attack_ping_flood(port: int, scale: Scale, ctx: dict[str, Any]) -> dict[str, Any]:
    return h2_flood(port, FrameBuilder().ping(b"12345678"), "PING")


def attack_settings_flood(port: int, scale: Scale, ctx: dict[str, Any]) -> dict[str, Any]:
    return h2_flood(port, raw_frame(4, 0, 0, struct.pack(">HI", 3, 100)), "SETTINGS")


def rapid_reset_bursts(scale: Scale) -> dict[str, Any]:
    """Each connection's preface and HEADERS+RST_STREAM pairs, encoded before the attack (the attack is the sending)."""
    def build() -> bytes:
        b = FrameBuilder()
        return client_preface(b) + b"".join(b.headers(sid, request_headers("/api/x"), end_stream=True)
                                            + b.rst_stream(sid) for sid in range(1, 2 * scale.rapid_streams, 2))

    return {"bursts": [build() for _ in range(scale.rapid_conns)]}


def attack_rapid_reset(port: int, scale: Scale, ctx: dict[str, Any]) -> dict[str, Any]:
    results: list[tuple[bool, float]] = []
    lock = threading.Lock()
    bursts = ctx["bursts"]
    start = time.monotonic()

    def one(burst: bytes) -> None:
        try:
            with attacker_socket(port) as sock:
                sock.sendall(burst)
                sock.shutdown(socket.SHUT_WR)
                cut = "ENHANCE_YOUR_CALM" in goaway_codes(read_to_eof(sock))
        except OSError:
            cut = True
        with lock:
            results.append((cut, time.monotonic() - start))

    threads = [threading.Thread(target=one, args=(burst,)) for burst in bursts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    total = scale.rapid_conns * scale.rapid_streams
    cuts = [t for cut, t in results if cut]
    return {
        "sent": f"{scale.rapid_conns} connections at once x {scale.rapid_streams} streams opened and reset = {total:,}",
        "got": f"{len(cuts)} of {scale.rapid_conns} connections cut with GOAWAY ENHANCE_YOUR_CALM",
        "fired_after": min(cuts) if cuts else None,
        "connections_cut": len(cuts), "upstream_could_see": total,
    }


def attack_slowloris(port: int, scale: Scale, ctx: dict[str, Any]) -> dict[str, Any]:
    head = b"GET /api/slow HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"a" * 100_000
    socks = []
    start = time.monotonic()
    for _ in range(scale.slowloris_conns):
        s = attacker_socket(port)
        s.setblocking(False)
        socks.append(s)
    pos = {s: 0 for s in socks}
    answered: dict[socket.socket, tuple[bytes, float]] = {}
    deadline = start + ctx["header_timeout"] * 2 + 10
    while len(answered) < len(socks) and time.monotonic() < deadline:
        for s in socks:
            if s in answered:
                continue
            try:
                data = s.recv(200)
                answered[s] = (data, time.monotonic() - start)
                continue
            except BlockingIOError:
                pass
            except OSError:
                answered[s] = (b"", time.monotonic() - start)
                continue
            try:
                s.send(head[pos[s] : pos[s] + 1])
                pos[s] += 1
            except BlockingIOError:
                pass
            except OSError:
                answered[s] = (b"", time.monotonic() - start)
        time.sleep(0.2)
    statuses: dict[str, int] = {}
    for data, _t in answered.values():
        key = data.split(b"\r\n", 1)[0].decode(errors="replace")[9:12] or "EOF"
        statuses[key] = statuses.get(key, 0) + 1
    times = sorted(t for _d, t in answered.values())
    for s in socks:
        s.close()
    return {
        "sent": f"{len(socks)} connections, one head byte each per 0.2 s (--header-timeout {ctx['header_timeout']:g})",
        "got": ", ".join(f"{n} x {k}" for k, n in sorted(statuses.items())) + f"; {len(socks) - len(answered)} unanswered",
        "fired_after": times[0] if times else None,
        "last_after": times[-1] if times else None,
        "statuses": statuses, "connections": len(socks),
    }


def attack_hog_connections(port: int, scale: Scale, ctx: dict[str, Any]) -> dict[str, Any]:
    socks = []
    start = time.monotonic()
    connect_failed = 0
    for _ in range(scale.hog_conns):
        try:
            socks.append(attacker_socket(port, timeout=5))
        except OSError:
            connect_failed += 1
    opened_s = time.monotonic() - start
    time.sleep(1.0)
    refused = 0
    held = []
    for s in socks:
        s.setblocking(False)
        try:
            closed = s.recv(1) == b""
        except BlockingIOError:
            closed = False
        except OSError:
            closed = True
        if closed:
            refused += 1
        else:
            held.append(s)
    served = 0
    for s in held[:20]:  # the connections within the share really work
        s.setblocking(True)
        s.settimeout(5)
        s.sendall(b"GET /api/held HTTP/1.1\r\nHost: a\r\n\r\n")
        served += s.recv(100).startswith(b"HTTP/1.1 200 ")
    for s in socks:
        s.close()
    return {
        "sent": f"{scale.hog_conns:,} connections from {ATTACKER} (held open), opened in {opened_s:.1f} s",
        "got": f"{refused:,} closed at accept, {len(held):,} held ({served} of {min(20, len(held))} probed answered 200), "
               f"{connect_failed} connects failed",
        "fired_after": None,
        "refused": refused, "held": len(held), "connections": len(socks),
    }


def attack_dns_fresh_ports(port: int, scale: Scale, ctx: dict[str, Any]) -> dict[str, Any]:
    """`scale.dns_queries` queries, each from its own new UDP socket (a new source port), 100 in flight at a time."""
    rcodes: dict[str, int] = {}
    unanswered = 0
    id_mismatch = 0
    start = time.monotonic()
    done = 0
    while done < scale.dns_queries:
        batch = []
        for _ in range(min(100, scale.dns_queries - done)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((ATTACKER, 0))
            q = dns.message.make_query("www.cilium.io", "A")
            s.sendto(q.to_wire(), ("127.0.0.1", port))
            batch.append((s, q))
        for s, q in batch:
            s.settimeout(5)
            try:
                answer = dns.message.from_wire(s.recv(4096))
                rcodes[dns.rcode.to_text(answer.rcode())] = rcodes.get(dns.rcode.to_text(answer.rcode()), 0) + 1
                id_mismatch += answer.id != q.id
            except TimeoutError:
                unanswered += 1
            s.close()
        done += len(batch)
    elapsed = time.monotonic() - start
    return {
        "sent": f"{scale.dns_queries:,} UDP queries from {scale.dns_queries:,} source ports of {ATTACKER}, 100 in flight "
                f"({elapsed:.1f} s)",
        "got": ", ".join(f"{n:,} {k}" for k, n in sorted(rcodes.items())) + f"; {unanswered} unanswered, "
               f"{id_mismatch} with a wrong ID",
        "fired_after": None,
        "rcodes": rcodes, "unanswered": unanswered,
    }


def many_requests(port: int, path: str, n: int) -> tuple[dict[str, int], list[float]]:
    """`n` connections from the attacker address each send `path` at once; the status (or EOF) and time of each."""
    socks = [attacker_socket(port) for _ in range(n)]
    start = time.monotonic()
    for s in socks:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        s.setblocking(False)
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    statuses: dict[str, int] = {}
    times: list[float] = []
    while sel.get_map() and time.monotonic() - start < 30:
        for key, _ev in sel.select(1.0):
            s = key.fileobj
            try:
                data = s.recv(200)  # type: ignore[union-attr]
            except OSError:
                data = b""
            status = data[9:12].decode() if data.startswith(b"HTTP/1.1 ") else "EOF"
            statuses[status] = statuses.get(status, 0) + 1
            times.append(time.monotonic() - start)
            sel.unregister(s)
    unanswered = len(sel.get_map())
    if unanswered:
        statuses["none"] = unanswered
    sel.close()
    for s in socks:
        s.close()
    return statuses, sorted(times)


def attack_never_answers(port: int, scale: Scale, ctx: dict[str, Any]) -> dict[str, Any]:
    statuses, times = many_requests(port, "/api/hang", scale.hanging)
    return {
        "sent": f"{scale.hanging} requests at once (one connection each) the upstream reads and never answers "
                f"(--upstream-timeout {ctx['upstream_timeout']:g})",
        "got": ", ".join(f"{n} x {k}" for k, n in sorted(statuses.items())),
        "fired_after": times[0] if times else None, "last_after": times[-1] if times else None,
        "statuses": statuses,
    }


def attack_upstream_closes(port: int, scale: Scale, ctx: dict[str, Any]) -> dict[str, Any]:
    statuses, times = many_requests(port, "/api/close", scale.hanging)
    return {
        "sent": f"{scale.hanging} requests at once (one connection each) the upstream reads and closes without answering",
        "got": ", ".join(f"{n} x {k}" for k, n in sorted(statuses.items())),
        "fired_after": times[0] if times else None, "last_after": times[-1] if times else None,
        "statuses": statuses,
    }


def attack_kafka_oversized(port: int, scale: Scale, ctx: dict[str, Any]) -> dict[str, Any]:
    results: list[tuple[int, float | None]] = []
    lock = threading.Lock()
    start = time.monotonic()

    def one() -> None:
        sent = 0
        closed_at = None
        chunk = b"\x00" * 65536
        try:
            with attacker_socket(port) as sock:
                sock.sendall(struct.pack(">i", scale.kafka_mib << 20))
                sock.settimeout(5)
                while sent < scale.kafka_mib << 20:
                    sent += sock.send(chunk)
                closed_at = None
        except OSError:
            closed_at = time.monotonic() - start
        with lock:
            results.append((sent, closed_at))

    threads = [threading.Thread(target=one) for _ in range(scale.kafka_conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    closed = [t for _s, t in results if t is not None]
    taken = [s for s, _t in results]
    return {
        "sent": f"{scale.kafka_conns} connections at once, each a {scale.kafka_mib} MiB size prefix then zeros as fast "
                f"as taken (--max-buffer-bytes 1 MiB, the default)",
        "got": f"{len(closed)} of {scale.kafka_conns} closed (reset) after {max(taken) / 2**20:.1f} MiB at most was "
               f"taken (kernel buffers included)",
        "fired_after": max(closed) if closed else None,
        "closed": len(closed), "max_bytes_taken": max(taken),
    }


def attack_dns_tcp_pipelining(port: int, scale: Scale, ctx: dict[str, Any]) -> dict[str, Any]:
    n = MAX_TCP_QUERIES_OUTSTANDING + 64
    rcodes: dict[str, int] = {}
    missing = 0
    start = time.monotonic()
    for _ in range(4):
        queries = [dns.message.make_query("api.github.com", "A") for _ in range(n)]
        for i, q in enumerate(queries):
            q.id = i + 1
        wire = b"".join(struct.pack(">H", len(w)) + w for w in (q.to_wire() for q in queries))
        with attacker_socket(port) as sock:
            sock.sendall(wire)
            data = b""
            got = 0
            while got < n:
                try:
                    chunk = sock.recv(65536)
                except (TimeoutError, ConnectionResetError):
                    break
                if not chunk:
                    break
                data += chunk
                pos = got = 0
                while pos + 2 <= len(data) and pos + 2 + struct.unpack(">H", data[pos : pos + 2])[0] <= len(data):
                    pos += 2 + struct.unpack(">H", data[pos : pos + 2])[0]
                    got += 1
            pos = 0
            while pos + 2 <= len(data):
                size = struct.unpack(">H", data[pos : pos + 2])[0]
                if pos + 2 + size > len(data):
                    break
                answer = dns.message.from_wire(data[pos + 2 : pos + 2 + size])
                rcodes[dns.rcode.to_text(answer.rcode())] = rcodes.get(dns.rcode.to_text(answer.rcode()), 0) + 1
                pos += 2 + size
            missing += n - got
    elapsed = time.monotonic() - start
    return {
        "sent": f"4 connections, each {n} queries pipelined in one write (bound: {MAX_TCP_QUERIES_OUTSTANDING} in flight upstream; "
                f"the rest wait with the client's reading paused)",
        "got": ", ".join(f"{v} {k}" for k, v in sorted(rcodes.items())) + f"; {missing} unanswered ({elapsed:.2f} s in all)",
        "fired_after": None,
        "rcodes": rcodes, "unanswered": missing, "upstream_could_see": 4 * n,
    }


# --- upstreams ---------------------------------------------------------------------------------------------------


class _FailingHandler(BaseHTTPRequestHandler):
    """/api/hang: read and never answer (until the proxy closes); /api/close: close without answering; else 200."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/api/hang"):
            try:
                self.rfile.read()
            except OSError:
                pass
            self.close_connection = True
            return
        if self.path.startswith("/api/close"):
            self.close_connection = True
            return
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _BigBacklogServer(ThreadingHTTPServer):
    request_queue_size = 1024  # socketserver's 5 would leave most of 200 connections at once un-accepted


@contextmanager
def failing_http_server() -> Iterator[Any]:
    server = _BigBacklogServer(("127.0.0.1", 0), _FailingHandler)
    server.daemon_threads = True
    server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
    server.port = server.server_address[1]  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def quiet_http_backend() -> Iterator[Any]:
    """gateway_util's recording HTTP/1.1 server, without tracebacks for connections the proxy resets."""
    with http_backend() as server:
        server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        yield server


@contextmanager
def h2_upstream() -> Iterator[Any]:
    with H2TestServer() as server:
        yield server


@contextmanager
def dns_upstream() -> Iterator[Any]:
    with DnsServer(ZONE) as server:
        yield server


@contextmanager
def kafka_upstream() -> Iterator[Any]:
    with KafkaTestBroker() as broker:
        broker.create_topic("orders")
        yield broker


# --- the runner --------------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    title: str
    upstream: Callable[[], Any]
    policy: Callable[[int], str]
    dst: str
    src: str
    legit: str  # http1 | http2 | dns-udp | dns-tcp | kafka
    attack: Callable[[int, Scale, dict[str, Any]], dict[str, Any]]
    extra: list[str] = field(default_factory=list)
    udp: bool = False
    ctx: dict[str, Any] = field(default_factory=dict)
    quick_extra: list[str] = field(default_factory=list)  # flags added with --quick (a smaller limit to cross)
    upstream_saw: Callable[[Any], int] | None = None  # attacker requests the upstream received so far
    prepare: Callable[[Scale], dict[str, Any]] | None = None  # attack material made before the clock starts


def _http(port: int) -> str:
    return http_policy(port, RULES)


SCENARIOS = [
    Scenario("h2-ping-flood", "HTTP/2 PING flood on one connection", h2_upstream, _http, "default/frontend",
             "default/backend", "http2", attack_ping_flood),
    Scenario("h2-settings-flood", "HTTP/2 SETTINGS flood on one connection", h2_upstream, _http, "default/frontend",
             "default/backend", "http2", attack_settings_flood),
    Scenario("h2-rapid-reset", "HTTP/2 rapid reset spread over many connections", h2_upstream, _http,
             "default/frontend", "default/backend", "http2", attack_rapid_reset, prepare=rapid_reset_bursts,
             upstream_saw=lambda server: sum(path == "/api/x" for _m, path in list(server.seen))),
    Scenario("slowloris", "Slowloris: connections trickling a request head", quiet_http_backend, _http, "default/frontend",
             "default/backend", "http1", attack_slowloris, ["--header-timeout", "2"], ctx={"header_timeout": 2.0}),
    Scenario("per-client-connections", "One client IP opening thousands of connections", quiet_http_backend, _http,
             "default/frontend", "default/backend", "http1", attack_hog_connections,
             quick_extra=["--max-connections", "400"]),
    Scenario("dns-udp-fresh-ports", "A stub resolver using a fresh UDP source port per query", dns_upstream, dns_policy,
             "kube-system/coredns", "default/crawler", "dns-udp", attack_dns_fresh_ports, udp=True),
    Scenario("upstream-never-answers", "An upstream that never answers", failing_http_server, _http,
             "default/frontend", "default/backend", "http1", attack_never_answers, ["--upstream-timeout", "1"],
             ctx={"upstream_timeout": 1.0}),
    Scenario("upstream-closes", "An upstream that closes before answering", failing_http_server, _http,
             "default/frontend", "default/backend", "http1", attack_upstream_closes),
    Scenario("kafka-oversized-frame", "Kafka: request frames larger than --max-buffer-bytes", kafka_upstream,
             kafka_policy, "shop/kafka", "shop/order-service", "kafka", attack_kafka_oversized),
    Scenario("dns-tcp-pipelining", "DNS over TCP pipelining past the bound", dns_upstream, dns_policy,
             "kube-system/coredns", "default/crawler", "dns-tcp", attack_dns_tcp_pipelining,
             upstream_saw=lambda server: sum(q.name.lower() == "api.github.com." for q in server.queries)),
]


def legit_request(kind: str, port: int, stack: ExitStack) -> Callable[[], bool]:
    if kind == "http1":
        return http1_get(port)
    if kind == "http2":
        request, close = http2_get(port)
        stack.callback(close)
        return request
    if kind == "dns-udp":
        return dns_udp(port)
    if kind == "dns-tcp":
        return dns_tcp(port)
    return kafka_metadata(port)


def attack_in_child(sc: Scenario, port: int, scale: Scale, prepared: dict[str, Any]) -> dict[str, Any]:
    """Run the attack in a forked process of its own: its sockets and threads then share no interpreter lock with
    the upstream servers (threads of this process), which would slow them and blame the gateway."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def run() -> None:
        try:
            send.send(sc.attack(port, scale, {**sc.ctx, **prepared}))
        except BaseException as e:
            send.send({"error": repr(e)})
            raise

    proc = ctx.Process(target=run, daemon=True)
    proc.start()
    result: dict[str, Any] = recv.recv() if recv.poll(180) else {"error": "attack did not finish in 180 s"}
    proc.join(10)
    if "error" in result:
        raise RuntimeError(f"{sc.name}: {result['error']}")
    return result


def run_scenario(sc: Scenario, scale: Scale, workdir: Path) -> dict[str, Any]:
    metrics_port = free_port()
    with ExitStack() as stack:
        upstream = stack.enter_context(sc.upstream())
        gw = stack.enter_context(gateway(
            workdir, sc.policy(upstream.port), upstream_port=upstream.port, dst=sc.dst, src=sc.src, udp=sc.udp,
            extra=["--metrics", f"127.0.0.1:{metrics_port}", "--flows-max-size-mb", "1024", *sc.extra, *(sc.quick_extra if scale.quick else [])],
            workers=1,
        ))
        pid = gw.proc.pid
        Legit(sc.legit, gw.port).run_for(0.3)  # warm-up: first connections, imports, caches
        baseline = Legit(sc.legit, gw.port).run_for(scale.baseline_s)
        time.sleep(0.3)
        prepared = sc.prepare(scale) if sc.prepare else {}
        metrics_before = scrape(metrics_port)
        log_offset = len(gw.stderr_path.read_text())
        flows_before = len(gw.flows())
        cpu_before = _cpu_s(pid)
        with Sampler(pid) as sampler:
            rss_before, fds_before = sampler.now()
            legit = Legit(sc.legit, gw.port).start()
            started = time.monotonic()
            saw_before = sc.upstream_saw(upstream) if sc.upstream_saw else 0
            result = attack_in_child(sc, gw.port, scale, prepared)
            attack_s = time.monotonic() - started
            time.sleep(max(0.0, scale.min_attack_s - attack_s))
            window_s = time.monotonic() - started
            during = legit.stop()
            time.sleep(1.0)
            rss_after, fds_after = sampler.now()
        cpu = _cpu_s(pid) - cpu_before
        if sc.upstream_saw:
            result["upstream_saw"] = sc.upstream_saw(upstream) - saw_before
            result["got"] += f"; {result['upstream_saw']:,} of {result['upstream_could_see']:,} reached the upstream"
        metrics_after = scrape(metrics_port)
        flows = gw.flows()[flows_before:]
        logs = new_log_lines(gw, log_offset)
        alive = gw.proc.poll() is None
    if result.get("connections"):
        result["fds_per_connection"] = (sampler.peak_fds - fds_before) / result["connections"]
    return {
        "name": sc.name, "title": sc.title, **result,
        "attack_s": attack_s, "window_s": window_s,
        "counters": counter_deltas(metrics_before, metrics_after),
        "log_lines": len(logs), "logs": summarize_logs(logs),
        "error_flows": sum(f.get("verdict") == "ERROR" for f in flows),
        "error_flow_summaries": summarize_logs(["- - - " + str(f.get("Summary", "")) for f in flows
                                                if f.get("verdict") == "ERROR"])[:3],
        "gateway_cpu_s": cpu,
        "rss_mib": [rss_before, sampler.peak_rss, rss_after],
        "fds": [fds_before, sampler.peak_fds, fds_after],
        "legit_baseline": baseline, "legit_during": during,
        "gateway_alive": alive,
    }


def _legit_cell(s: dict[str, float]) -> str:
    return f"{s['ok']:.0f} answered, {s['failed']:.0f} failed; p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms"


def scenario_table(r: dict[str, Any]) -> str:
    rss, fds = r["rss_mib"], r["fds"]
    counters = "<br>".join(f"`{k}` +{v:,.0f}" for k, v in r["counters"].items()) or "none moved"
    logs = "<br>".join(f"`{line[:160]}`" for line in r["logs"][:4]) or "none"
    rows = [
        ("sent", r["sent"]),
        ("attacker got", r["got"]),
        ("limit fired after", fmt_s(r["fired_after"]) + (f" (last: {fmt_s(r['last_after'])})" if r.get("last_after") else "")),
        ("counters (/metrics delta)", counters),
        (f"log ({r['log_lines']} warning/error lines)", logs),
        (f"flows ({r['error_flows']} ERROR)", "<br>".join(f"`{x[:160]}`" for x in r["error_flow_summaries"]) or "none"),
        ("gateway CPU during the attack and 1 s after", f"{r['gateway_cpu_s']:.2f} s"),
        ("gateway RSS before / peak / 1 s after", f"{rss[0]:.1f} / {rss[1]:.1f} / {rss[2]:.1f} MiB"),
        ("gateway descriptors before / peak / 1 s after", f"{fds[0]} / {fds[1]} / {fds[2]}"
         + (f" ({r['fds_per_connection']:.2f} per attacker connection at the peak)" if "fds_per_connection" in r else "")),
        ("legitimate client, baseline", _legit_cell(r["legit_baseline"])),
        (f"legitimate client, during the attack ({r['window_s']:.1f} s)", _legit_cell(r["legit_during"])),
    ]
    if len(r.get("legit_rounds", [])) > 1:
        rows.append(("legitimate p99 ms, baseline -> attack, every round (median round shown above)",
                     ", ".join(f"{x['baseline']['p99_ms']:.1f} -> {x['during']['p99_ms']:.1f}" for x in r["legit_rounds"])))
    if not r["gateway_alive"]:
        rows.append(("gateway", "**exited**"))
    return f"#### {r['title']} (`{r['name']}`)\n\n| | |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def summary_table(results: list[dict[str, Any]]) -> str:
    lines = ["| scenario | attacker got | fired after | counters | log lines | ERROR flows | descriptors before / peak / after | "
             "RSS MiB before / peak / after | legitimate answered (failed), p99: baseline -> attack |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b, d = r["legit_baseline"], r["legit_during"]
        counters = ", ".join(f"{k.removeprefix('membrane_proxy_')} +{v:,.0f}" for k, v in r["counters"].items()) or "none"
        lines.append(
            f"| {r['name']} | {r['got']} | {fmt_s(r['fired_after'])} | {counters} | {r['log_lines']} | {r['error_flows']} | "
            f"{' / '.join(str(x) for x in r['fds'])} | {' / '.join(f'{x:.0f}' for x in r['rss_mib'])} | "
            f"{b['ok']:.0f} ({b['failed']:.0f}), {b['p99_ms']:.1f} ms -> {d['ok']:.0f} ({d['failed']:.0f}), {d['p99_ms']:.1f} ms |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these scenarios")
    parser.add_argument("--quick", action="store_true", help="smaller attacks, shorter windows (self-check)")
    parser.add_argument("--rounds", type=int, default=1, help="run each scenario N times; show the median round")
    args = parser.parse_args()
    scale = Scale.make_quick() if args.quick else Scale()
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    unknown = set(args.only) - {s.name for s in SCENARIOS}
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; known: {[s.name for s in SCENARIOS]}")
    import resource
    import tempfile

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 5,000 attacker sockets (the gateway inherits it)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    print(f"hostile_bench: commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} cores, RLIMIT_NOFILE {hard}, `membrane gateway --workers 1`, attacker {ATTACKER}, "
          f"legitimate client 127.0.0.1, load average {os.getloadavg()[0]:.1f} at start, {args.rounds} round(s)",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="membrane-hostile-") as tmp:
        for sc in chosen:
            rounds = [run_scenario(sc, scale, Path(tmp)) for _ in range(args.rounds)]
            # the round whose legitimate p99 under attack is the median is shown; every round's legitimate numbers too
            rounds.sort(key=lambda x: x["legit_during"]["p99_ms"])
            r = rounds[len(rounds) // 2]
            r["legit_rounds"] = [{"baseline": x["legit_baseline"], "during": x["legit_during"]} for x in rounds]
            results.append(r)
            print("\n" + scenario_table(r), flush=True)
    print("\n" + summary_table(results), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"commit": commit, "quick": args.quick, "scenarios": results}, indent=1,
                                        default=str))
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return 0


if __name__ == "__main__":
    sys.exit(main())
