"""Membrane's L7 proxy against its baselines, in one run: what `make bench` runs.

Rows: HTTP/1.1 keep-alive throughput and latency (wrk), added latency at one connection (wrk -c1) and at a fixed
1,000 req/s, memory per idle proxied connection, HTTP/2 against nginx h2c and gRPC against a grpcio server
(h2load), DNS in front of Knot at 1,000 q/s and at saturation from one socket and from four (dnsperf), Kafka
produce MB/s. Membrane runs with 1 worker and with one per core, and with flows off and on (`--flows FILE`).
--profile adds, per protocol, the proxy's CPU time per request split by where it goes (cProfile). Each proxied run sits between two runs of the direct baseline and its ratio is
taken against their mean, so drift on a shared machine hits both sides. Everything listens on 127.0.0.1, every
process is stopped on the way out (also on Ctrl-C), and nothing is a pass/fail assertion: it prints numbers.

    .venv/bin/python bench/run_all.py [--quick] [--only 'http1/*'] [--duration 10] [--rounds 1]

Prints a table per section with the command behind each row, then the goals of issues 4 and 11, met or missed
by how much; writes bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fnmatch
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dns_bench
import http_bench
import kafka_bench
import peers
from http_bench import Result
from peers import PORTS, Proc, Stack, Unavailable

RESULTS_DIR = peers.BENCH_DIR / "results"
CORES = os.cpu_count() or 1


# --- configuration -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    quick: bool
    duration_s: float  # wrk/h2load/dnsperf throughput runs
    latency_s: float  # wrk -c1 and the fixed-rate runs
    connections: int
    rate: int  # fixed-rate HTTP requests per second
    dns_qps: int
    idle_conns: int
    rounds: int
    workers: int  # "one per core" row
    warmup_s: float
    only: tuple[str, ...]
    profile: bool = False
    pure: bool = False  # also run one-worker gateways on the pure Python modules (MEMBRANE_PURE=1)

    def wants(self, row_id: str) -> bool:
        return not self.only or any(fnmatch.fnmatch(row_id, pat) or row_id.startswith(pat) for pat in self.only)


# --- rows --------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a target measured in a section, or why it could not be."""

    id: str
    section: str
    target: str
    status: str = "ok"  # ok | not available | error
    values: dict[str, float] = field(default_factory=dict)
    derived: dict[str, float] = field(default_factory=dict)  # ratios and added latencies
    runs: list[dict[str, float]] = field(default_factory=list)
    command: str = ""
    proxy_command: str = ""
    reproduce: str = ""
    note: str = ""


@dataclass(frozen=True)
class Column:
    header: str
    key: str  # in values or derived
    fmt: str  # "rate", "us", "ratio", "int", "kib", "mbs", "added"


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    columns: tuple[Column, ...]


def _fmt(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    match fmt:
        case "rate":
            return f"{value:,.0f}"
        case "us":
            return f"{value:,.0f} us" if value < 10_000 else f"{value / 1000:,.1f} ms"
        case "added":
            return f"{value:+,.0f} us" if abs(value) < 10_000 else f"{value / 1000:+,.1f} ms"
        case "ratio":
            return f"{value:.3f}x" if value < 0.1 else f"{value:.2f}x"
        case "int":
            return f"{value:,.0f}"
        case "kib":
            return f"{value:,.1f} KiB"
        case "mbs":
            return f"{value:,.1f} MB/s"
        case _:
            return str(value)


def one_line(text: str, limit: int = 240) -> str:
    """A note as one table cell: whitespace collapsed, long tracebacks cut to their end."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else "..." + flat[-limit:]


def print_section(section: Section, rows: list[Row]) -> None:
    headers = ["target", *(c.header for c in section.columns), "note"]
    table: list[list[str]] = []
    for row in rows:
        if row.status != "ok":
            table.append([row.target, *("-" for _ in section.columns), f"{row.status.upper()}: {one_line(row.note)}"])
            continue
        cells = [_fmt(row.values.get(c.key, row.derived.get(c.key)), c.fmt) for c in section.columns]
        table.append([row.target, *cells, one_line(row.note)])
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(headers)]
    print(f"\n## {section.title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in table:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print("commands:")
    for row in rows:
        if row.status == "ok":
            print(f"  [{row.id}] load:  {row.command}")
            if row.proxy_command:
                print(f"  [{row.id}] proxy: {row.proxy_command}")
        print(f"  [{row.id}] again: {row.reproduce}")
    sys.stdout.flush()


# --- targets: lazily started proxies -----------------------------------------------------------------------------


@dataclass
class Target:
    """Something a load generator can be pointed at: a port, and the process behind it (None = direct)."""

    name: str
    start: Callable[[Stack], tuple[int, Proc | None]]
    port: int = 0
    proc: Proc | None = None
    failure: tuple[str, str] | None = None  # (status, reason) once starting failed
    started: bool = False

    def ensure(self, stack: Stack) -> int:
        if self.failure:
            raise _TargetFailed(*self.failure)
        if not self.started:
            try:
                self.port, self.proc = self.start(stack)
            except Unavailable as exc:
                self.failure = ("not available", str(exc))
                raise _TargetFailed(*self.failure) from exc
            except Exception as exc:
                self.failure = ("error", f"could not start: {exc}")
                raise _TargetFailed(*self.failure) from exc
            self.started = True
        return self.port

    @property
    def proxy_command(self) -> str:
        return self.proc.command if self.proc else ""


class _TargetFailed(Exception):
    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _fixed(port: int) -> Callable[[Stack], tuple[int, Proc | None]]:
    return lambda stack: (port, None)


def _membrane(upstream: str, dst: str, *, workers: int, src: str = "bench/client",
              udp: bool = False, flows: bool = False, pure: bool = False) -> Callable[[Stack], tuple[int, Proc | None]]:
    """flows=True: `--flows FILE` to a real file in the run's work directory (rotated by the gateway at 10 MB)."""
    def start(stack: Stack) -> tuple[int, Proc | None]:
        port = peers.free_port()
        flows_to = stack.workdir / f"flows-{port}.jsonl" if flows else None
        proc = peers.start_membrane(stack, listen_port=port, upstream_port=PORTS[upstream], dst=dst, src=src,
                                    workers=workers, udp=udp, flows_to=flows_to, pure=pure)
        return port, proc
    return start


FLOWS_SUFFIX = "-flows"
PURE_PREFIX = "pure-"


def membrane_targets(upstream: str, dst: str, cfg: Config, *, src: str = "bench/client", udp: bool = False,
                     flows_many: bool = False) -> list[Target]:
    """Membrane with 1 worker, flows off and on, then `cfg.workers` workers (flows off; also on if flows_many);
    with cfg.pure, then 1 worker on the pure Python modules, flows off and on (`membrane-pure-1w...`)."""
    def make(workers: int, flows: bool, pure: bool = False) -> Target:
        return Target(f"membrane-{PURE_PREFIX if pure else ''}{workers}w{FLOWS_SUFFIX if flows else ''}",
                      _membrane(upstream, dst, workers=workers, src=src, udp=udp, flows=flows, pure=pure))
    many = [make(cfg.workers, False), *([make(cfg.workers, True)] if flows_many else [])]
    pure = [make(1, False, pure=True), make(1, True, pure=True)] if cfg.pure else []
    return [make(1, False), make(1, True), *(many if cfg.workers != 1 else []), *pure]


def _peer(starter: Callable[[Stack, int, int], Proc], upstream: str) -> Callable[[Stack], tuple[int, Proc | None]]:
    def start(stack: Stack) -> tuple[int, Proc | None]:
        port = peers.free_port()
        return port, starter(stack, port, PORTS[upstream])
    return start


# --- the interleaved runner --------------------------------------------------------------------------------------


def _median_values(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in runs[0] if all(k in r for r in runs)] if runs else []
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def interleaved(cfg: Config, stack: Stack, section: str, direct: Target, targets: list[Target],
                measure: Callable[[int], Result], *, compare: Callable[[Result, list[Result]], dict[str, float]],
                warmup: Callable[[int], object] | None = None, check: Callable[[int], str] | None = None,
                ) -> list[Row]:
    """direct, t1, direct, t2, direct, ... (per round); compare() derives ratios from a run and its neighbours."""
    ids = {t.name: f"{section}/{t.name}" for t in [direct, *targets]}
    wanted = [t for t in targets if cfg.wants(ids[t.name])]
    rows = {t.name: Row(id=ids[t.name], section=section, target=t.name,
                        reproduce=f".venv/bin/python bench/run_all.py --only {ids[t.name]}") for t in [direct, *wanted]}
    if not wanted and not cfg.wants(ids[direct.name]):
        return []
    try:
        direct_port = direct.ensure(stack)
    except _TargetFailed as exc:
        for row in rows.values():
            row.status, row.note = exc.status, f"direct baseline unavailable: {exc.reason}"
        return list(rows.values())
    if warmup:
        with contextlib.suppress(Exception):  # a failing direct run is reported by the measured run below
            warmup(direct_port)
    notes: dict[str, set[str]] = {name: set() for name in rows}
    direct_runs: list[Result] = []
    per_target: dict[str, list[Result]] = {t.name: [] for t in wanted}
    derived_runs: dict[str, list[dict[str, float]]] = {t.name: [] for t in wanted}

    def run(target: Target, port: int) -> Result | None:
        try:
            proxy = target.proc if target is not direct else None  # the direct row's process is the server
            cpu_before = peers.cpu_seconds(proxy.pid) if proxy else 0.0
            res = measure(port)
            done = res.values.get("requests", res.values.get("completed", res.values.get("messages", 0)))
            if proxy and done:
                res.values["cpu_us_per_req"] = (peers.cpu_seconds(proxy.pid) - cpu_before) / done * 1e6
        except Exception as exc:
            rows[target.name].status, rows[target.name].note = "error", f"{type(exc).__name__}: {exc}"
            res = None
        if target.proc is not None and not target.proc.is_alive():
            reason = f"{target.name} exited ({target.proc.popen.returncode}) during the run: {target.proc.log_tail(5)}"
            target.failure = ("error", reason)
            rows[target.name].status, rows[target.name].note = "error", reason
            return None
        if res is None:
            return None
        if res.note:
            notes[target.name].add(res.note)
        rows[target.name].command = res.command
        return res

    first = run(direct, direct_port)
    if first is None:
        for row in rows.values():
            row.status = row.status if row.id == ids[direct.name] else "error"
            row.note = row.note or "direct baseline failed"
        return list(rows.values())
    direct_runs.append(first)
    for _ in range(cfg.rounds):
        for target in wanted:
            row = rows[target.name]
            if row.status != "ok":
                continue
            try:
                port = target.ensure(stack)
            except _TargetFailed as exc:
                row.status, row.note = exc.status, exc.reason
                continue
            row.proxy_command = _display_proxy(target.proxy_command, stack)
            try:
                if check and (problem := check(port)):
                    notes[target.name].add(problem)
                if warmup:
                    warmup(port)
            except Exception as exc:
                row.status, row.note = "error", f"warm-up failed: {type(exc).__name__}: {exc}"
                continue
            before = direct_runs[-1]
            res = run(target, port)
            after = run(direct, direct_port)
            if after is not None:
                direct_runs.append(after)
            if res is None:
                continue
            per_target[target.name].append(res)
            derived_runs[target.name].append(compare(res, [before, after] if after else [before]))
    rows[direct.name].values = _median_values([r.values for r in direct_runs])
    rows[direct.name].runs = [r.values for r in direct_runs]
    for target in wanted:
        row = rows[target.name]
        if per_target[target.name]:
            row.values = _median_values([r.values for r in per_target[target.name]])
            row.runs = [r.values for r in per_target[target.name]]
            row.derived = _median_values(derived_runs[target.name])
    for name, row in rows.items():
        if notes[name] and row.status == "ok":
            row.note = "; ".join(sorted(notes[name]))
    return list(rows.values())


def _display_proxy(command: str, stack: Stack) -> str:
    return command.replace(str(stack.workdir), "bench/results/run").replace(str(peers.REPO_DIR) + "/", "")


def ratio_of(key: str) -> Callable[[Result, list[Result]], dict[str, float]]:
    def compare(res: Result, neighbours: list[Result]) -> dict[str, float]:
        base = statistics.mean(n.values[key] for n in neighbours)
        return {"x_direct": res.values[key] / base if base else float("nan")}
    return compare


def added(*keys: str) -> Callable[[Result, list[Result]], dict[str, float]]:
    def compare(res: Result, neighbours: list[Result]) -> dict[str, float]:
        return {f"added_{k}": res.values[k] - statistics.mean(n.values[k] for n in neighbours) for k in keys}
    return compare


def add_flows_cost(rows: list[Row], key: str = "x_direct") -> None:
    """On each `...-flows` row: its ratio to direct over the same target's without flows (1.0 = flows are free)."""
    by_target = {r.target: r for r in rows if r.status == "ok"}
    for row in by_target.values():
        if not row.target.endswith(FLOWS_SUFFIX):
            continue
        off = by_target.get(row.target[: -len(FLOWS_SUFFIX)])
        if off and off.derived.get(key) and key in row.derived:
            row.derived["x_flows_off"] = row.derived[key] / off.derived[key]


def add_scaling(rows: list[Row], key: str = "x_direct") -> None:
    """On each `membrane-Nw` row (N > 1): its ratio to direct over the one-worker row's (how workers scale)."""
    by_target = {r.target: r for r in rows if r.status == "ok"}
    one = by_target.get("membrane-1w")
    for row in by_target.values():
        if (one is None or row is one or row.target.endswith(FLOWS_SUFFIX) or not row.target.startswith("membrane-")
                or row.target.startswith("membrane-" + PURE_PREFIX)):
            continue
        if one.derived.get(key) and key in row.derived:
            row.derived["x_1w"] = row.derived[key] / one.derived[key]


def add_vs_haproxy(rows: list[Row]) -> None:
    """Membrane / HAProxy, as the ratio of their ratios to direct (each against its own neighbouring baseline)."""
    haproxy = next((r for r in rows if r.target == "haproxy" and r.status == "ok"), None)
    if not haproxy or not haproxy.derived.get("x_direct"):
        return
    for row in rows:
        if row.target.startswith("membrane") and row.status == "ok" and "x_direct" in row.derived:
            row.derived["x_haproxy"] = row.derived["x_direct"] / haproxy.derived["x_direct"]


# --- sections ----------------------------------------------------------------------------------------------------

CPU_COL = Column("proxy CPU/req", "cpu_us_per_req", "us")
THROUGHPUT_COLS = (Column("req/s", "req_s", "rate"), Column("p50", "p50_us", "us"), Column("p99", "p99_us", "us"),
                   Column("vs direct", "x_direct", "ratio"), Column("Membrane/HAProxy", "x_haproxy", "ratio"),
                   Column("flows on/off", "x_flows_off", "ratio"), Column("vs 1 worker", "x_1w", "ratio"), CPU_COL)


def http_targets(cfg: Config) -> tuple[Target, list[Target]]:
    direct = Target("direct", _fixed(PORTS["http"]))
    return direct, [
        *membrane_targets("http", "bench/backend", cfg, flows_many=True),
        Target("haproxy", _peer(peers.start_haproxy, "http")),
        Target("mitmproxy", _peer(peers.start_mitm, "http")),
    ]


def run_http1(cfg: Config, stack: Stack, out: list[tuple[Section, list[Row]]]) -> None:
    direct, targets = http_targets(cfg)
    warm = (lambda port: http_bench.wrk(port, connections=cfg.connections, duration_s=cfg.warmup_s)) \
        if cfg.warmup_s else None
    dur = cfg.duration_s

    sec = Section("http1", f"HTTP/1.1 keep-alive throughput: wrk -t1 -c{cfg.connections} -d{dur:g}s, GET /api "
                  "(nginx returns 200 'ok'; every proxy allows only GET /api, as examples/http.yaml)",
                  THROUGHPUT_COLS)
    rows = interleaved(cfg, stack, sec.id, direct, targets,
                       lambda port: http_bench.wrk(port, connections=cfg.connections, duration_s=dur),
                       compare=ratio_of("req_s"), warmup=warm, check=http_bench.acl_check)
    add_vs_haproxy(rows)
    add_flows_cost(rows)
    add_scaling(rows)
    _emit(out, sec, rows)

    sec = Section("http1-c1", f"HTTP/1.1 latency at one connection: wrk -t1 -c1 -d{cfg.latency_s:g}s",
                  (Column("req/s", "req_s", "rate"), Column("p50", "p50_us", "us"), Column("p99", "p99_us", "us"),
                   Column("added p50", "added_p50_us", "added"), Column("added p99", "added_p99_us", "added")))
    rows = interleaved(cfg, stack, sec.id, direct, targets,
                       lambda port: http_bench.wrk(port, connections=1, duration_s=cfg.latency_s),
                       compare=added("p50_us", "p99_us"))
    _emit(out, sec, rows)

    sec = Section("http1-rate", f"HTTP/1.1 latency at a fixed {cfg.rate:,} req/s for {cfg.latency_s:g}s "
                  "(open-loop Python generator over 16 keep-alive connections; see bench/http_bench.py)",
                  (Column("p50", "p50_us", "us"), Column("p99", "p99_us", "us"), Column("p99.9", "p999_us", "us"),
                   Column("added p99", "added_p99_us", "added"), Column("unanswered", "lost", "int")))
    no_mitm = [t for t in targets if t.name != "mitmproxy"]  # it cannot sustain the rate (~0.01x of direct)
    rows = interleaved(cfg, stack, sec.id, direct, no_mitm,
                       lambda port: http_bench.fixed_rate(port, rate=cfg.rate, duration_s=cfg.latency_s),
                       compare=added("p50_us", "p99_us"))
    _emit(out, sec, rows)

    sec = Section("http1-memory", f"Memory per idle proxied connection pair: {cfg.idle_conns:,} keep-alive "
                  "connections, one request each, then idle; VmRSS of a freshly started proxy's process tree "
                  "before/after",
                  (Column("connections", "connections", "int"), Column("RSS before", "rss_before_kib", "kib"),
                   Column("RSS after", "rss_after_kib", "kib"), Column("per connection", "kib_per_conn", "kib"),
                   Column("backend conns", "upstream_conns", "int")))
    rows = []
    # Fresh processes: memory a proxy freed after the load runs above would otherwise absorb new connections.
    _, fresh = http_targets(cfg)
    fresh = [t for t in fresh if not t.name.endswith(FLOWS_SUFFIX)]  # a flows file changes no per-connection state
    fresh.insert(3, Target("haproxy-private", _peer(lambda st, port, up: peers.start_haproxy(st, port, up, "never"),
                                                    "http")))
    for target in fresh:
        row_id = f"{sec.id}/{target.name}"
        if not cfg.wants(row_id):
            continue
        row = Row(id=row_id, section=sec.id, target=target.name,
                  reproduce=f".venv/bin/python bench/run_all.py --only {row_id}")
        try:
            port = target.ensure(stack)
            assert target.proc is not None
            count = min(cfg.idle_conns, 200) if target.name == "mitmproxy" else cfg.idle_conns
            res = http_bench.idle_memory(target.proc.pid, port, count=count, upstream_port=PORTS["http"])
            row.values, row.command = res.values, res.command.replace("PID", str(target.proc.pid))
            row.proxy_command = _display_proxy(target.proxy_command, stack)
            if 0 <= res.values["upstream_conns"] < 0.9 * count:
                row.note = (f"the backend held only {res.values['upstream_conns']:.0f} connection(s): this proxy "
                            "shares upstream connections, so this is per client connection, not per pair")
            elif target.name == "haproxy-private":
                row.note = "HAProxy with http-reuse never: one server connection per client, as Membrane"
        except _TargetFailed as exc:
            row.status, row.note = exc.status, exc.reason
        except Exception as exc:
            row.status, row.note = "error", f"{type(exc).__name__}: {exc}"
        finally:
            if target.proc is not None:
                stack.stop(target.proc)
        rows.append(row)
    _emit(out, sec, rows)


def run_h2(cfg: Config, stack: Stack, out: list[tuple[Section, list[Row]]]) -> None:
    cols = (Column("req/s", "req_s", "rate"), Column("mean", "mean_us", "us"), Column("max", "max_us", "us"),
            Column("vs direct", "x_direct", "ratio"), Column("flows on/off", "x_flows_off", "ratio"), CPU_COL)
    for sid, upstream, path, grpc, label in (
        ("http2", "h2", http_bench.BENCH_PATH, False, "HTTP/2 (h2c): GET /api, nginx h2c"),
        ("grpc", "grpc", "/bench.Echo/Call", True,
         "gRPC unary call: POST /bench.Echo/Call to a grpcio server (bench/peers/grpc_server.py)"),
    ):
        direct = Target("direct", (lambda s: (PORTS["grpc"], peers.start_grpc(s))) if grpc else _fixed(PORTS[upstream]))
        targets = membrane_targets(upstream, "bench/backend", cfg)
        sec = Section(sid, f"{label}: h2load -c10 -m10 -D{cfg.duration_s:g} (10 connections x 10 streams = 100 "
                      "concurrent requests)", cols)

        def measure(port: int, path: str = path, grpc: bool = grpc) -> Result:
            return http_bench.h2load(port, path=path, grpc=grpc, duration_s=cfg.duration_s)

        def warm(port: int, path: str = path, grpc: bool = grpc) -> Result:
            return http_bench.h2load(port, path=path, grpc=grpc, duration_s=cfg.warmup_s)

        rows = interleaved(cfg, stack, sec.id, direct, targets, measure, compare=ratio_of("req_s"),
                           warmup=warm if cfg.warmup_s else None, check=http_bench.grpc_check if grpc else None)
        add_flows_cost(rows)
        _emit(out, sec, rows)


def run_dns(cfg: Config, stack: Stack, out: list[tuple[Section, list[Row]]]) -> None:
    direct = Target("direct", lambda s: (PORTS["dns"], peers.start_knot(s)))
    targets = [
        *membrane_targets("dns", "bench/dns", cfg, src="bench/dns-client", udp=True),
        Target("dnsdist", _peer(peers.start_dnsdist, "dns")),
    ]
    sec = Section("dns-rate", f"DNS over UDP at a fixed {cfg.dns_qps:,} q/s for {cfg.latency_s:g}s: dnsperf -Q "
                  f"(Knot authoritative for bench.test; proxies allow *.bench.test)",
                  (Column("q/s", "qps", "rate"), Column("lost", "lost", "int"), Column("p50", "p50_us", "us"),
                   Column("p99", "p99_us", "us"), Column("added p99", "added_p99_us", "added")))
    rows = interleaved(cfg, stack, sec.id, direct, targets,
                       lambda port: dns_bench.fixed_qps(port, qps=cfg.dns_qps, duration_s=cfg.latency_s),
                       compare=added("p50_us", "p99_us"), check=dns_bench.rule_check)
    _emit(out, sec, rows)
    max_cols = (Column("q/s", "qps", "rate"), Column("lost", "lost", "int"), Column("mean", "mean_us", "us"),
                Column("vs direct", "x_direct", "ratio"), Column("flows on/off", "x_flows_off", "ratio"), CPU_COL)
    # A resolver or node-local cache sends everything from one socket: dnsperf -c1 is one UDP socket, and -q100
    # keeps 100 queries outstanding on it (dnsperf matches answers by ID).
    for sid, clients in (("dns-max1", 1), ("dns-max", 4)):
        sec = Section(sid, f"DNS over UDP at saturation, {clients} client socket{'s' if clients > 1 else ''} with "
                      f"100 queries outstanding {'in all' if clients == 1 else 'each'}: dnsperf -c{clients} -q100 "
                      f"-l{cfg.duration_s:g}", max_cols)
        rows = interleaved(cfg, stack, sec.id, direct, targets,
                           lambda port, c=clients: dns_bench.saturation(port, duration_s=cfg.duration_s, clients=c),
                           compare=ratio_of("qps"))
        add_flows_cost(rows)
        _emit(out, sec, rows)
    sec = Section("dns-tcp", f"DNS over TCP at saturation: dnsperf -m tcp -c4 -q100 -l{cfg.latency_s:g}",
                  (Column("q/s", "qps", "rate"), Column("lost", "lost", "int"), Column("mean", "mean_us", "us"),
                   Column("vs direct", "x_direct", "ratio"), CPU_COL))
    rows = interleaved(cfg, stack, sec.id, direct, targets,
                       lambda port: dns_bench.saturation(port, duration_s=cfg.latency_s, mode="tcp"),
                       compare=ratio_of("qps"))
    _emit(out, sec, rows)


def run_kafka(cfg: Config, stack: Stack, out: list[tuple[Section, list[Row]]]) -> None:
    def direct_start(stack: Stack) -> tuple[int, Proc | None]:
        kafka_bench.require_broker()
        return PORTS["kafka"], None

    direct = Target("direct", direct_start)
    targets = [Target("membrane-1w", _membrane("kafka", "bench/kafka", workers=1)),
               Target(f"membrane-{cfg.workers}w", _membrane("kafka", "bench/kafka", workers=cfg.workers))]
    sec = Section("kafka", f"Kafka produce: kafka-python, {kafka_bench.MESSAGE_BYTES} B messages to topic 'bench', "
                  f"acks=1, {cfg.duration_s:g}s (the test suite's Kafka-protocol broker, restarted per run)",
                  (Column("MB/s", "mb_s", "mbs"), Column("msgs/s", "msgs_s", "rate"),
                   Column("vs direct", "x_direct", "ratio"), Column("proxy CPU/msg", "cpu_us_per_req", "us")))
    rows = interleaved(cfg, stack, sec.id, direct, targets,
                       lambda port: kafka_bench.produce(port, duration_s=cfg.duration_s), compare=ratio_of("mb_s"))
    _emit(out, sec, rows)


# Where a function's own CPU time goes, for the "Where the time goes" table: (bucket, test) in order, first match wins.
# Product modules are matched by folder, whatever the install layout (source tree or build/ link tree).
_PRODUCT = re.compile(r"/(parsers|policies|proxy|control|cli|bpf)/(\w+)\.py$")
# membrane.proxy.server functions whose own time is a transport write (one call into uvloop and little else).
_WRITERS = frozenset({"_flush", "_to_upstream", "_to_client", "_write", "_send", "flush"})
BUCKETS = ("read", "parse", "policy", "session logic", "flow record", "metrics", "write", "event loop", "other")


def time_bucket(filename: str, func: str) -> str:
    """The bucket of one cProfile entry (its own time only, so the buckets add up to the whole)."""
    if m := _PRODUCT.search(filename):
        folder, module = m.groups()
        if folder == "parsers":
            return "parse"
        if folder == "policies":
            return "policy"
        if folder == "proxy":
            if module in ("flows", "flowfilter", "flowserver"):
                return "flow record"
            if module == "metrics":
                return "metrics"
            if func in ("data_received", "datagram_received", "buffer_updated", "get_buffer", "eof_received"):
                return "read"
            if module == "server" and func in _WRITERS:
                return "write"  # uvloop's transport.write is Cython, invisible to cProfile: its time is here
            return "session logic"
        return "other"
    if filename == "~":  # C functions: cProfile names them "{method 'x' of 'T' objects}" / "{built-in method x}"
        if re.search(r"'(write|writelines|sendto|send|sendmsg|sendall)' of '(uvloop|_socket|socket|_asyncio)", func):
            return "write"
        if re.search(r"'(recv|recvfrom|recv_into|recvmsg)'", func):
            return "read"
        if "of '_io." in func or "_json" in func or "json" in func:
            return "flow record"  # the flows file and JSON encoding: nothing else on the hot path uses them
        if re.search(r"uvloop|select|epoll|run_forever|run_until_complete|poll", func):
            return "event loop"  # uvloop's own C loop, with the recv() calls it makes before data_received
        if re.search(r"httptools|llhttp|_hpack|h2", func):
            return "parse"
        return "other"
    if re.search(r"/(h2|hpack|hyperframe|priority|h11|httptools|dnslib)/", filename):
        return "parse"
    if "/json/" in filename:
        return "flow record"
    if re.search(r"/asyncio/|uvloop|selectors\.py", filename):
        return "event loop"
    return "other"


_Key = tuple[str, int, str]


def _load_stats(prof: Path) -> dict[_Key, tuple[int, int, float, float, dict[_Key, tuple[int, int, float, float]]]]:
    import pstats

    return pstats.Stats(str(prof)).stats  # type: ignore[attr-defined, no-any-return]


def _is_helper(filename: str) -> bool:
    """C builtins and stdlib helpers (dict.get, len, logging.debug, enum hashing): their time is their caller's."""
    return filename == "~" or ("/lib/python3." in filename and "site-packages" not in filename)


def profile_costs(prof: Path, idle: Path | None) -> tuple[dict[str, float], list[tuple[float, int, str]]]:
    """Own CPU seconds per bucket, and the top functions, of a loaded profile minus an idle one (startup).

    Each function's own time is taken per caller (cProfile keeps it so): a C builtin or stdlib helper whose own
    bucket would be "other" is charged to its caller's bucket (dict.get in the HTTP parser is parsing). The idle
    profile (the same gateway started and stopped with no load) is subtracted caller by caller, so imports and
    policy compilation at start do not count as per-request work.
    """
    loaded = _load_stats(prof)
    base = _load_stats(idle) if idle and idle.exists() else {}
    totals = dict.fromkeys(BUCKETS, 0.0)
    per_func: dict[_Key, float] = {}
    for key, (_cc, _nc, tt, _ct, callers) in loaded.items():
        filename, _line, func = key
        own = time_bucket(filename, func)
        idle_callers = base.get(key, (0, 0, 0.0, 0.0, {}))[4]
        pairs = [(caller, t[2] - idle_callers.get(caller, (0, 0, 0.0, 0.0))[2]) for caller, t in callers.items()] \
            if callers else [(None, tt - base.get(key, (0, 0, 0.0, 0.0, {}))[2])]
        for caller, spent in pairs:
            if spent <= 0:
                continue
            bucket = own
            if own == "other" and caller is not None and _is_helper(filename):
                bucket = time_bucket(caller[0], caller[2])
            totals[bucket] += spent
            per_func[key] = per_func.get(key, 0.0) + spent
    calls = {key: v[1] - base.get(key, (0, 0, 0.0, 0.0, {}))[1] for key, v in loaded.items()}
    top = sorted(((t, calls[k], f"{_short(k[0])}:{k[1]}({k[2]})" if k[0] != "~" else k[2]) for k, t in per_func.items()),
                 reverse=True)[:25]
    return totals, top


def _short(filename: str) -> str:
    for marker in ("/membrane/", "/site-packages/", "/lib/python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1] if marker != "/membrane/" else "membrane/" + filename.split(marker, 1)[1]
    return filename


def _ensure_backend(stack: Stack, upstream: str) -> None:
    """Starts the backend of a profile load unless a section of this run already did (its fixed port is busy)."""
    starters: dict[str, Callable[[Stack], Proc]] = {"http": peers.start_nginx, "h2": peers.start_nginx,
                                                    "grpc": peers.start_grpc, "dns": peers.start_knot}
    if peers.port_is_free(PORTS[upstream]) and (upstream != "dns" or peers._udp_port_is_free(PORTS[upstream])):
        starters[upstream](stack)


def run_profile(cfg: Config, stack: Stack, out: list[tuple[Section, list[Row]]]) -> None:
    """Membrane, one worker, flows to a file, per protocol: CPU time per request, and cProfile's split of it.

    For each protocol the same load runs twice against a fresh one-worker gateway: first unprofiled, for the
    CPU time the proxy process used per request (/proc/PID/stat), then under cProfile (CPU-time clock), whose
    per-function own times, grouped into buckets, split that figure. cProfile slows Python calls more than C
    calls, so the split leans towards the Python buckets; the unprofiled total is the honest number.
    """
    grpc_path = "/bench.Echo/Call"
    loads: list[tuple[str, str, str, str, bool, bool, Callable[[int], Result]]] = [
        ("http1", "http", "bench/backend", "bench/client", False, True,
         lambda port: http_bench.wrk(port, connections=cfg.connections, duration_s=cfg.duration_s)),
        ("http1-noflows", "http", "bench/backend", "bench/client", False, False,
         lambda port: http_bench.wrk(port, connections=cfg.connections, duration_s=cfg.duration_s)),
        ("http2", "h2", "bench/backend", "bench/client", False, True,
         lambda port: http_bench.h2load(port, duration_s=cfg.duration_s)),
        ("grpc", "grpc", "bench/backend", "bench/client", False, True,
         lambda port: http_bench.h2load(port, path=grpc_path, grpc=True, duration_s=cfg.duration_s)),
        ("dns", "dns", "bench/dns", "bench/dns-client", True, True,
         lambda port: dns_bench.saturation(port, duration_s=cfg.duration_s, clients=1)),
    ]
    table: list[tuple[str, float, float, dict[str, float]]] = []
    for name, upstream, dst, src, udp, flows, load in loads:
        if not cfg.wants(f"profile/{name}"):
            continue
        prof = RESULTS_DIR / f"membrane-{name}.prof"
        prof.parent.mkdir(parents=True, exist_ok=True)
        prof.unlink(missing_ok=True)
        print(f"\n## Profile: membrane gateway --workers 1{' --flows FILE' if flows else ''} under cProfile (CPU "
              f"time), {name} load for {cfg.duration_s:g}s")
        try:
            _ensure_backend(stack, upstream)
            idle = prof.with_suffix(".idle.prof")
            idle.unlink(missing_ok=True)
            runs: list[tuple[Result, float]] = []
            for mode in ("plain", "profiled", "idle"):
                port = peers.free_port()
                proc = peers.start_membrane(stack, listen_port=port, upstream_port=PORTS[upstream], dst=dst, src=src,
                                            workers=1, udp=udp,
                                            profile_to={"plain": None, "profiled": prof, "idle": idle}[mode],
                                            flows_to=stack.workdir / f"flows-profile-{port}.jsonl" if flows else None)
                if mode == "idle":  # the same start and stop with no load: subtracted from the profile
                    time.sleep(1.0)
                    stack.stop(proc)
                    break
                if cfg.warmup_s and mode == "plain":
                    with contextlib.suppress(Exception):
                        load(port)
                cpu_before = peers.cpu_seconds(proc.pid)
                res = load(port)
                cpu = peers.cpu_seconds(proc.pid) - cpu_before
                stack.stop(proc)
                runs.append((res, cpu))
        except (Unavailable, RuntimeError) as exc:
            print(f"not available: {exc}")
            continue
        (plain, plain_cpu), (res, _) = runs
        done = plain.values.get("requests", plain.values.get("completed", 0))
        cpu_us = plain_cpu / done * 1e6 if done else float("nan")
        print(f"unprofiled: {plain.command}  ->  {_rate(plain)}, proxy CPU {cpu_us:,.1f} us per request")
        print(f"profiled:   {res.command}  ->  {_rate(res)} (the CPU-time clock slows the proxy several times)"
              f"{'; ' + res.note if res.note else ''}")
        print(f"proxy: {_display_proxy(proc.command, stack)}")
        if not prof.exists():
            print(f"no profile written ({proc.log_tail(5)})")
            continue
        buckets, top = profile_costs(prof, idle)
        print("own CPU time under load, startup (an idle run's profile) subtracted; helpers charged to callers:")
        print(f"{'seconds':>8} {'calls':>8}  function")
        for spent, ncalls, label in top:
            print(f"{spent:8.3f} {ncalls:8d}  {label}")
        print(f"full profile: {prof} (python -m pstats {prof.relative_to(peers.REPO_DIR)}); idle run: {idle.name}")
        table.append((name, cpu_us, _rate_value(plain), buckets))
    if table:
        print_time_table(table)


def _rate_value(res: Result) -> float:
    return res.values.get("req_s", res.values.get("qps", float("nan")))


def _rate(res: Result) -> str:
    return f"{_rate_value(res):,.0f}/s"


def print_time_table(table: list[tuple[str, float, float, dict[str, float]]]) -> None:
    """Where each request's microseconds go: the unprofiled CPU time per request split by the profile's buckets."""
    print("\n## Where the time goes: proxy CPU per request (unprofiled), split by cProfile own time per bucket")
    print("| load | req/s | CPU/req | " + " | ".join(BUCKETS) + " |")
    print("|---|---|---|" + "---|" * len(BUCKETS))
    for name, cpu_us, rate, buckets in table:
        total = sum(buckets.values()) or 1.0
        cells = [f"{cpu_us * buckets[b] / total:,.1f} us ({100 * buckets[b] / total:.0f}%)" for b in BUCKETS]
        print(f"| {name} | {rate:,.0f} | {cpu_us:,.1f} us | " + " | ".join(cells) + " |")
    print("read = protocol callbacks and recv calls Python sees (uvloop's own reads are in 'event loop'); parse = "
          "membrane.parsers, h2/hpack, httptools; policy = membrane.policies; session logic = the rest of "
          "membrane.proxy; flow record = membrane.proxy.flows* plus JSON and the flows file; write = transport "
          "write/sendto; event loop = uvloop/asyncio; other = the rest. C builtins and stdlib helpers count in "
          "their caller's bucket; startup is subtracted (an idle run's profile).")
    sys.stdout.flush()


def _emit(out: list[tuple[Section, list[Row]]], section: Section, rows: list[Row]) -> None:
    if rows:
        out.append((section, rows))
        print_section(section, rows)


# --- goals (issue 4) ----------------------------------------------------------------------------------------------

# (section, value key, comparison, threshold, how the goal reads, display format)
GOALS: tuple[tuple[str, str, str, float, str, str], ...] = (
    ("http1", "x_direct", ">=", 0.35, "HTTP/1.1 keep-alive req/s >= 0.35x direct", "ratio"),
    ("http1", "x_haproxy", ">=", 0.8, "HTTP/1.1 keep-alive req/s >= 0.8x HAProxy", "ratio"),
    ("http1-c1", "added_p50_us", "<", 100, "added p50 at one connection < 100 us", "added"),
    ("http1-rate", "p99_us", "<", 1000, "p99 at 1,000 req/s < 1 ms", "us"),
    ("dns-rate", "lost", "<=", 0, "DNS at 1,000 q/s: zero lost queries", "int"),
    ("dns-rate", "added_p99_us", "<", 2000, "DNS at 1,000 q/s: added p99 < 2 ms", "added"),
    ("dns-max", "qps", ">=", 20000, "DNS at saturation >= 20k q/s", "rate"),
    ("kafka", "x_direct", ">=", 0.9, "Kafka produce >= 0.9x direct", "ratio"),
    ("http1-memory", "kib_per_conn", "<", 32, "idle proxied connection pair < 32 KiB", "kib"),
)

# The table of issue 11 (performance): each row's goal. Flows on/off is every "-flows" row against the same
# target without flows (add_flows_cost), so "within 10%" reads as >= 0.9.
GOALS_11: tuple[tuple[str, str, str, float, str, str], ...] = (
    ("http1", "x_direct", ">=", 0.35, "HTTP/1.1 keep-alive, 50 connections, vs direct nginx >= 0.35x", "ratio"),
    ("http1", "x_haproxy", ">=", 0.8, "the same vs HAProxy with the same ACL >= 0.8x", "ratio"),
    ("http1-c1", "added_p50_us", "<=", 100, "added p50 at one connection <= 100 us", "added"),
    ("dns-max1", "qps", ">=", 20000, "DNS/UDP saturation in front of Knot, ONE socket, 100 outstanding >= 20k q/s",
     "rate"),
    ("dns-max", "qps", ">=", 20000, "the same with 4 sockets (shown beside it) >= 20k q/s", "rate"),
    ("http2", "x_direct", ">=", 0.25, "HTTP/2 GET, h2load -c10 -m10, vs nginx h2c >= 0.25x", "ratio"),
    ("grpc", "x_direct", ">=", 0.25, "gRPC unary vs direct grpcio >= 0.25x", "ratio"),
    ("http1", "x_flows_off", ">=", 0.9, "with --flows on: within 10% of flows off (HTTP/1.1)", "ratio"),
    ("dns-max1", "x_flows_off", ">=", 0.9, "with --flows on: within 10% of flows off (DNS, one socket)", "ratio"),
    ("http2", "x_flows_off", ">=", 0.9, "with --flows on: within 10% of flows off (HTTP/2)", "ratio"),
    ("grpc", "x_flows_off", ">=", 0.9, "with --flows on: within 10% of flows off (gRPC)", "ratio"),
    ("http1", "x_1w", ">=", 0.0, "HTTP/1.1 throughput, N workers over 1 worker (issue item 6, no goal)", "ratio"),
)


def goal_rows(out: list[tuple[Section, list[Row]]],
              goals: tuple[tuple[str, str, str, float, str, str], ...] = GOALS) -> list[dict[str, Any]]:
    """Each Membrane row measured against goals (issue 4's by default): met or missed, and by how much."""
    results: list[dict[str, Any]] = []
    by_section = {section.id: rows for section, rows in out}
    for section_id, key, op, threshold, text, fmt in goals:
        for row in by_section.get(section_id, []):
            if not row.target.startswith("membrane"):
                continue
            if key not in row.values and key not in row.derived and row.status == "ok":
                continue  # e.g. x_flows_off on a row without flows
            if goals is GOALS and row.target.endswith(FLOWS_SUFFIX):
                continue  # issue 4's goals were set for the proxy without a flows file
            value = row.values.get(key, row.derived.get(key)) if row.status == "ok" else None
            if value is None or (isinstance(value, float) and math.isnan(value)):
                verdict = f"not measured ({row.status}{': ' + one_line(row.note, 80) if row.note else ''})"
            else:
                met = {">=": value >= threshold, "<": value < threshold, "<=": value <= threshold}[op]
                if not threshold:
                    verdict = "(measured)"
                elif met:
                    verdict = "met"
                elif op == ">=":
                    verdict = f"missed: {value / threshold:.2f}x of the goal" if threshold else "missed"
                else:
                    verdict = f"missed by {_fmt(value - threshold, fmt).lstrip('+')}"
            results.append({"goal": text, "target": row.target, "measured": None if value is None else value,
                            "shown": _fmt(value, fmt), "verdict": verdict})
    return results


def print_goals(goals: list[dict[str, Any]], title: str = "Goals of issue 4 (Membrane rows of this run)") -> None:
    if not goals:
        return
    print(f"\n## {title}")
    widths = [max(len(h), *(len(str(g[k])) for g in goals)) for h, k in
              (("goal", "goal"), ("target", "target"), ("measured", "shown"), ("verdict", "verdict"))]
    headers = ("goal", "target", "measured", "verdict")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for g in goals:
        cells = (g["goal"], g["target"], g["shown"], g["verdict"])
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |")


# --- main --------------------------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[Config, Stack, list[tuple[Section, list[Row]]]], None]] = {
    "http1": run_http1, "h2": run_h2, "dns": run_dns, "kafka": run_kafka, "profile": run_profile,
}
SECTION_PREFIXES = {"http1": ("http1",), "h2": ("http2", "grpc"), "dns": ("dns",), "kafka": ("kafka",),
                    "profile": ("profile",)}


def section_wanted(prefixes: tuple[str, ...], only: tuple[str, ...]) -> bool:
    """Whether any --only pattern can select a row of a section whose row ids start with one of prefixes."""
    if not only:
        return True
    heads = [pat.split("/")[0] for pat in only]
    return any(fnmatch.fnmatch(pre, head) or pre.startswith(head) or head.startswith(pre)
               for head in heads for pre in prefixes)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so `finally` blocks stop every peer."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def parse_args(argv: list[str] | None) -> tuple[Config, Path, int | None]:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="self-check: about 1 s per row")
    p.add_argument("--duration", type=float, help="seconds per throughput run (default 10; --quick 1)")
    p.add_argument("--latency-duration", type=float, help="seconds per latency run (default 5; --quick 1)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--rate", type=int, default=1000, help="fixed HTTP request rate (default 1000/s)")
    p.add_argument("--dns-qps", type=int, default=1000, help="fixed DNS query rate (default 1000/s)")
    p.add_argument("--idle-conns", type=int, help="idle connections for the memory rows (default 1000; --quick 200)")
    p.add_argument("--rounds", type=int, default=1, help="repeat each interleaved sequence; medians are reported")
    p.add_argument("--workers", type=int, default=CORES, help=f"the 'one per core' Membrane row (default {CORES})")
    p.add_argument("--only", action="append", default=[],
                   help="row id glob or prefix, e.g. 'http1/*', 'dns', 'http1-c1/haproxy' (repeatable)")
    p.add_argument("--pure", action="store_true",
                   help="add one-worker rows on the pure Python modules (membrane-pure-1w, MEMBRANE_PURE=1)")
    p.add_argument("--profile", action="store_true",
                   help="also run Membrane (one worker) under cProfile with HTTP/1.1 and DNS load; print the top")
    p.add_argument("--port-offset", type=int,
                   help="move the fixed upstream ports (18080-18082, 18053, 19092) by N; default: 0, or the first "
                        "free multiple of 100 when another run holds them")
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "latest.json", help="where to write the results")
    a = p.parse_args(argv)
    return Config(
        quick=a.quick,
        duration_s=a.duration or (1.0 if a.quick else 10.0),
        latency_s=a.latency_duration or (1.0 if a.quick else 5.0),
        connections=a.connections, rate=a.rate, dns_qps=a.dns_qps,
        idle_conns=a.idle_conns or (200 if a.quick else 1000),
        rounds=max(1, a.rounds), workers=a.workers,
        warmup_s=0.0 if a.quick else 1.0,
        only=tuple(a.only), profile=a.profile, pure=a.pure,
    ), a.json, a.port_offset


def main(argv: list[str] | None = None) -> int:
    cfg, json_path, port_offset = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    started = dt.datetime.now(dt.UTC)
    print(f"# Membrane bench, {started:%Y-%m-%d %H:%M} UTC, {CORES} cores shared by load generators, servers and "
          f"proxies; {platform.platform()}")
    try:
        membrane = "available"
        peers.membrane_gateway_help()
    except Unavailable as exc:
        membrane = f"not available: {exc}"
    print(f"# membrane gateway: {membrane}")
    out: list[tuple[Section, list[Row]]] = []
    status = 0
    with _terminate_as_interrupt(), Stack() as stack:
        try:
            offset = port_offset if port_offset is not None else peers.pick_port_offset()
            peers.shift_ports(offset, stack.workdir)
            if offset:
                print(f"# the fixed upstream ports are busy (another run?): using them +{offset}: "
                      f"{', '.join(f'{k}={v}' for k, v in PORTS.items())}; policy copy in bench/results/run/")
            nginx: Proc | None = None
            for name, runner in SECTIONS.items():
                if not section_wanted(SECTION_PREFIXES[name], cfg.only):
                    continue
                if name == "profile" and not cfg.profile:
                    continue
                if name in ("http1", "h2") and nginx is None:
                    try:
                        nginx = peers.start_nginx(stack)
                    except (Unavailable, RuntimeError) as exc:
                        print(f"\n## {name}: backend unavailable: {exc}")
                        status = 1
                        continue
                try:
                    runner(cfg, stack, out)
                except KeyboardInterrupt:
                    raise
                except Exception:
                    status = 1
                    print(f"\n## {name}: harness error\n{traceback.format_exc()}")
        except KeyboardInterrupt:
            print("\ninterrupted: stopping peers", file=sys.stderr)
            status = 130
        finally:
            _keep_configs(stack)
    goals = goal_rows(out)
    print_goals(goals)
    goals_11 = goal_rows(out, GOALS_11)
    print_goals(goals_11, "The table of issue 11 (Membrane rows of this run; flows on = --flows FILE)")
    _write_json(json_path, cfg, started, out, goals + goals_11)
    print(f"\nresults: {json_path}")
    return status


def _keep_configs(stack: Stack) -> None:
    """Copies the rendered peer configs to bench/results/run/ so that the printed proxy commands can be re-run."""
    dest = RESULTS_DIR / "run"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    for path in stack.workdir.iterdir():
        if path.is_file() and path.suffix in (".conf", ".cfg", ".yaml"):
            shutil.copy2(path, dest / path.name)
            text = (dest / path.name).read_text().replace(str(stack.workdir), str(dest))
            (dest / path.name).write_text(text)


def _write_json(path: Path, cfg: Config, started: dt.datetime, out: list[tuple[Section, list[Row]]],
                goals: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": {"cores": CORES, "platform": platform.platform()},
        "config": {k: v for k, v in asdict(cfg).items()},
        "sections": [{"id": s.id, "title": s.title, "rows": [asdict(r) for r in rows]} for s, rows in out],
        "goals": goals,
    }
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


if __name__ == "__main__":
    t0 = time.monotonic()
    code = main()
    print(f"# done in {time.monotonic() - t0:.0f} s")
    sys.exit(code)
