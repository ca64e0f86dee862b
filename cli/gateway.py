"""`membrane gateway`: the proxy in front of one service, without eBPF (also how the proxy is tested alone).

Owns the command line, worker processes (`--workers N`, each with its own SO_REUSEPORT listeners),
signal handling (SIGTERM/SIGINT: stop accepting, drain, exit 0) and the `listening` readiness line.
Exit status: 0 after a clean drain, 1 when a policy or the endpoints file is invalid, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
from membrane.control.sources.files import PathProblem, read_endpoints, read_policies
from membrane.policies import EndpointsError, L4Proto, PolicyDirection, PolicyMap, compile_policy
from membrane.proxy.flows import FlowSink, FlowStream, RotatingFile, default_node_name, open_flow_streams
from membrane.proxy.flowserver import FlowPublisher, FlowServer
from membrane.proxy.metrics import Metrics, SharedMetrics, serve_metrics
from membrane.proxy.server import Proxy, ProxyConfig, listening_socket
from membrane.proxy.wiring import FixedPeers, gateway_factory

log = logging.getLogger("membrane.gateway")


def _addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not ADDR:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _fmt(host: str, port: int) -> str:
    """ADDR:PORT as a user would type it back: IPv6 addresses in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _endpoint_key(value: str) -> str:
    ns, sep, name = value.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{value!r} is not NS/NAME")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser(
        "gateway",
        help="run the L7 proxy in front of one upstream (no eBPF)",
        description="Proxy every connection on --listen to --upstream, enforcing the policy of --dst.",
    )
    p.add_argument("--policies", action="extend", nargs="+", required=True, metavar="PATH",
                   help="policy files or directories (repeatable; several may follow one --policies)")
    p.add_argument("--endpoints", required=True, metavar="FILE", help="endpoints file (pods and namespaces)")
    p.add_argument("--listen", required=True, type=_addr, metavar="ADDR:PORT", help="where clients connect (port 0: any)")
    p.add_argument("--udp", action="store_true", help="also listen for DNS over UDP on the same ADDR:PORT")
    p.add_argument("--upstream", required=True, type=_addr, metavar="ADDR:PORT", help="the service behind the proxy")
    p.add_argument("--dst", required=True, type=_endpoint_key, metavar="NS/NAME", help="endpoint the upstream is")
    p.add_argument("--src", type=_endpoint_key, metavar="NS/NAME", help="treat every client as this endpoint")
    p.add_argument("--flows", action="append", default=[], metavar="PATH", help="append flow JSON lines here ('-' = stdout)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: one per core)")
    p.add_argument("--metrics", type=_addr, metavar="ADDR:PORT", help="serve Prometheus metrics here (all workers, summed)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="S", help="whole request head (slowloris)")
    p.add_argument("--idle-timeout", type=float, default=300.0, metavar="S", help="nothing moved either way")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="S", help="upstream connect (then 503/504)")
    p.add_argument("--dns-timeout", type=float, default=5.0, metavar="S", help="UDP DNS answer (then SERVFAIL)")
    p.add_argument("--upstream-timeout", type=float, default=15.0, metavar="S",
                   help="a forwarded HTTP request's response head / DNS-over-TCP answer (then 504/SERVFAIL); 0 = off")
    p.add_argument("--max-connections", type=int, default=10_000, help="per worker")
    p.add_argument("--max-connections-per-client", type=int, default=0, metavar="N",
                   help="per worker and client IP (default: a quarter of --max-connections)")
    p.add_argument("--max-buffer-bytes", type=int, default=1 << 20, help="per direction per connection")
    p.add_argument("--drain-timeout", type=float, default=10.0, metavar="S", help="on SIGTERM, for requests in flight")
    # Flows and observability (issue 12): node name, rotation, the `membrane observe` socket, the judged port.
    p.add_argument("--dport", type=int, metavar="PORT",
                   help="the policy port to judge connections as (default: the upstream's port)")
    p.add_argument("--node-name", default=None, metavar="NAME", help="node_name in flows (default: $NODE_NAME, else the hostname)")
    p.add_argument("--flows-max-size-mb", type=float, default=10.0, metavar="MB",
                   help="rotate a --flows file at this size (0 = never)")
    p.add_argument("--flows-max-backups", type=int, default=5, metavar="N", help="rotated flows files kept (name.1 ... name.N)")
    p.add_argument("--socket", metavar="PATH", help="serve flows to `membrane observe --server PATH` on this unix socket")
    p.set_defaults(func=run)


@dataclass
class _Plan:
    pmap: PolicyMap
    peers: FixedPeers
    upstream: tuple[str, int]
    config: ProxyConfig
    flows: list[str]
    metrics: tuple[str, int] | None
    metrics_dir: Path | None = None  # where workers publish their counters for worker 0's endpoint
    node_name: str = ""
    flows_max_bytes: int = 0
    flows_max_backups: int = 5
    socket: str | None = None  # worker 0 serves flows here; the other workers publish theirs to it


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.workers < 1:
        print("membrane gateway: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        loaded = read_policies(args.policies)
        endpoints = read_endpoints(args.endpoints)
    except PathProblem as e:
        print(f"membrane gateway: {e}", file=sys.stderr)
        return 2
    except EndpointsError as e:
        print(f"membrane gateway: {e}", file=sys.stderr)
        return 1
    if loaded.errors:
        for err in loaded.errors:
            print(f"membrane gateway: {err}", file=sys.stderr)
        return 1
    pmap = compile_policy(loaded.policies, endpoints)
    for err in pmap.errors:
        print(f"membrane gateway: warning: {err}", file=sys.stderr)
    if args.dport is not None and not 1 <= args.dport <= 65535:
        print("membrane gateway: --dport must be a port number (1-65535)", file=sys.stderr)
        return 2
    if args.flows_max_size_mb < 0 or args.flows_max_backups < 0:
        print("membrane gateway: --flows-max-size-mb and --flows-max-backups must be 0 or more", file=sys.stderr)
        return 2
    port_judged = args.dport if args.dport is not None else args.upstream[1]
    try:
        peers = FixedPeers(dst=args.dst, upstream=args.upstream, src=args.src, port=port_judged)
        peers.check(pmap)
    except ValueError as e:
        print(f"membrane gateway: {e}", file=sys.stderr)
        return 2
    warning = _port_warning(pmap, args.dst, port_judged, dport_given=args.dport is not None, udp=args.udp)
    if warning:
        print(f"membrane gateway: warning: {warning}", file=sys.stderr)
    config = ProxyConfig(
        header_timeout_s=args.header_timeout,
        idle_timeout_s=args.idle_timeout,
        connect_timeout_s=args.connect_timeout,
        dns_timeout_s=args.dns_timeout,
        upstream_timeout_s=args.upstream_timeout,
        max_connections=args.max_connections,
        max_connections_per_client=args.max_connections_per_client,
        max_buffer_bytes=args.max_buffer_bytes,
        drain_timeout_s=args.drain_timeout,
    )
    for path in args.flows:
        if path == "-":
            continue
        try:
            open(path, "a", encoding="utf-8").close()  # fail here, clearly, rather than in every worker
        except OSError as e:
            print(f"membrane gateway: cannot open --flows {path}: {e.strerror}", file=sys.stderr)
            return 2
    plan = _Plan(pmap=pmap, peers=peers, upstream=args.upstream, config=config, flows=args.flows, metrics=args.metrics,
                 node_name=args.node_name or default_node_name(), flows_max_bytes=int(args.flows_max_size_mb * (1 << 20)),
                 flows_max_backups=args.flows_max_backups, socket=args.socket)
    host, port = args.listen
    # One worker needs no SO_REUSEPORT; several share the port through it. For port 0, a port is picked
    # by a plain bind first: an ephemeral bind with SO_REUSEPORT could join another process's group.
    shared = args.workers > 1
    try:
        if port == 0 and shared:
            probe = listening_socket(host, 0, reuse_port=False)
            port = probe.getsockname()[1]
            probe.close()
        first_tcp = listening_socket(host, port, reuse_port=shared)
        port = first_tcp.getsockname()[1]
        tcp = [first_tcp] + [listening_socket(host, port) for _ in range(args.workers - 1)]
        udp = [listening_socket(host, port, udp=True, reuse_port=shared) for _ in range(args.workers)] if args.udp else []
    except OSError as e:
        print(f"membrane gateway: cannot listen on {host}:{port}: {e.strerror}", file=sys.stderr)
        return 2
    ready = (
        f"membrane gateway listening on {_fmt(host, port)}{' tcp+udp' if args.udp else ''} -> "
        f"{_fmt(*args.upstream)} as {args.dst} ({args.workers} worker{'s' if args.workers > 1 else ''})"
    )
    if args.workers == 1:
        return uvloop.run(_worker(plan, [tcp[0]], udp[:1], ready_line=ready, worker=0))
    return _supervise(plan, tcp, udp, ready)


def _supervise(plan: _Plan, tcp: list[socket.socket], udp: list[socket.socket], ready: str) -> int:
    """Fork one worker per listener set; forward SIGTERM/SIGINT; exit 0 when every worker drained cleanly."""
    if plan.metrics is not None:
        plan.metrics_dir = Path(tempfile.mkdtemp(prefix="mbr-metrics-"))
    try:
        return _fork_workers(plan, tcp, udp, ready)
    finally:
        if plan.metrics_dir is not None:
            shutil.rmtree(plan.metrics_dir, ignore_errors=True)


def _fork_workers(plan: _Plan, tcp: list[socket.socket], udp: list[socket.socket], ready: str) -> int:
    read_fd, write_fd = os.pipe()
    children: list[int] = []
    for i in range(len(tcp)):
        pid = os.fork()
        if pid == 0:  # child: keep only its own sockets
            os.close(read_fd)
            for _j, s in enumerate(tcp + udp):
                if s not in (tcp[i], *(udp[i : i + 1])):
                    s.close()
            status = 1
            try:
                status = uvloop.run(_worker(plan, [tcp[i]], udp[i : i + 1], ready_fd=write_fd, worker=i))
            finally:
                os._exit(status)
        children.append(pid)
    os.close(write_fd)
    for s in tcp + udp:
        s.close()
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    got = 0
    with os.fdopen(read_fd, "rb") as ready_pipe:
        while got < len(children):
            chunk = ready_pipe.read(1)
            if not chunk:
                break
            got += 1
    if got == len(children):
        print(ready, flush=True)
    worst = 0
    for pid in children:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and not (stopping and code == -signal.SIGTERM):
            worst = max(worst, 1)
    return worst


async def _publish(shared: SharedMetrics, interval_s: float = 1.0) -> None:
    while True:
        shared.publish()
        await asyncio.sleep(interval_s)


def _port_warning(pmap: PolicyMap, dst: str, port: int, *, dport_given: bool, udp: bool = False) -> str | None:
    """Why every connection will be refused (or pass unjudged) on `port`, or None when a policy rule selects it
    (for TCP, and for UDP too with --udp)."""
    policy = pmap.direction(dst, PolicyDirection.INGRESS)
    hint = "" if dport_given else f" (the gateway judges the upstream's port {port}; name the policy's port with --dport)"
    if not policy.enforced:
        return f"no policy selects {dst} for ingress: connections on port {port} pass without a verdict{hint}"
    missing = [
        proto.name for proto in ((L4Proto.TCP, L4Proto.UDP) if udp else (L4Proto.TCP,))
        if not any(not c.deny and c.lo <= port <= c.hi and proto in c.protos for c in policy.contributions)
    ]
    if not missing:
        return None
    return f"no policy rule selects port {port}/{'+'.join(missing)} of {dst}: every connection will be refused{hint}"



async def _worker(
    plan: _Plan,
    tcp: list[socket.socket],
    udp: list[socket.socket],
    *,
    worker: int,
    ready_line: str | None = None,
    ready_fd: int | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    streams: list[FlowStream] = open_flow_streams(plan.flows, max_bytes=plan.flows_max_bytes, max_backups=plan.flows_max_backups)
    if plan.socket is not None and worker != 0:  # worker 0 serves the socket; the others send it their flows
        streams.append(FlowPublisher(plan.socket, loop=loop))
    metrics = Metrics()
    sink = FlowSink(streams, node_name=plan.node_name)
    factory = gateway_factory(plan.pmap, plan.peers, sink, max_buffer_bytes=plan.config.max_buffer_bytes)
    proxy = Proxy(
        config=plan.config,
        factory=factory.session,
        upstream=plan.upstream,
        flows=sink,
        metrics=metrics,
        datagram_factory=factory.datagram,
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await proxy.start(tcp, udp)
    metrics_server = None
    shared = SharedMetrics(metrics, plan.metrics_dir, worker)
    publisher = loop.create_task(_publish(shared)) if plan.metrics_dir is not None else None
    if plan.metrics is not None and worker == 0:
        try:
            metrics_server = await serve_metrics(shared, *plan.metrics)
        except OSError as e:
            print(f"membrane gateway: cannot serve metrics on {plan.metrics[0]}:{plan.metrics[1]}: {e.strerror}",
                  file=sys.stderr)
            await proxy.drain()
            return 2
    flow_server = None
    if plan.socket is not None and worker == 0:
        flow_server = FlowServer(sink, plan.socket)
        try:
            await flow_server.start()
        except OSError as e:
            print(f"membrane gateway: cannot serve flows on {plan.socket}: {e.strerror or e}", file=sys.stderr)
            await proxy.drain()
            return 2
    if ready_line is not None:
        print(ready_line, flush=True)
    if ready_fd is not None:
        os.write(ready_fd, b"r")
        os.close(ready_fd)
    await stop.wait()
    log.info("worker %d draining %d connections", worker, len(proxy.connections))
    await proxy.drain()
    if publisher is not None:
        publisher.cancel()
        shared.publish()
    if metrics_server is not None:
        metrics_server.close()
    if flow_server is not None:
        await flow_server.close()
    for stream in streams:
        if isinstance(stream, (RotatingFile, FlowPublisher)):
            stream.close()
    return 0
