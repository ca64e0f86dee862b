"""`membrane run`, `status`, `endpoint list`, `cleanup-stale`, `uninstall`: the agent's CLI.

Owns argument parsing and the rendering of the agent's status file (written by control/agent.py);
never touches the kernel itself except through `bpf.stale` for `cleanup-stale` and `uninstall`.
Exit status: 0 on success, 1 on invalid input or when no agent is running, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from membrane.bpf.pins import DEFAULT_PIN_DIR
from membrane.control.agent import DEFAULT_CNI_QUEUE, DEFAULT_SOCKET, DEFAULT_STATUS_PATH, AgentConfig, run_agent


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run the node agent: eBPF steering + transparent L7 proxy",
        description="Enforce the policies for the endpoints on this node until SIGTERM/SIGINT. Started while an "
                    "agent runs (same --socket), it takes over from it: the running agent hands over its listening "
                    "sockets, drains and exits 0, and no connection is refused (see docs/guide.md).",
    )
    p.add_argument("--policies", action="extend", nargs="+", default=[], metavar="PATH",
                   help="policy files or directories (repeatable; several may follow one --policies)")
    p.add_argument("--endpoints", metavar="FILE", help="endpoints file; `interface:` names each host-side veth")
    p.add_argument("--kubernetes", action="store_true",
                   help="learn policies (CNP, CCNP), pods, namespaces and nodes from the Kubernetes API server instead of files")
    p.add_argument("--kubeconfig", type=Path, metavar="PATH", help="with --kubernetes: this kubeconfig (default: in-cluster service account)")
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""), metavar="NAME",
                   help="this node's name in Kubernetes (default $NODE_NAME); its pods become endpoints")
    p.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "kube-system"), metavar="NS",
                   help="namespace of the Lease that elects the one agent writing policy status (default $POD_NAMESPACE, else kube-system)")
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET, metavar="PATH",
                   help=f"the agent's local socket for membrane-cni, membrane observe and a successor's hand-over (default {DEFAULT_SOCKET})")
    p.add_argument("--cni-queue", type=Path, default=DEFAULT_CNI_QUEUE, metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--metrics", type=_addr, metavar="ADDR:PORT", help="serve Prometheus metrics at http://ADDR:PORT/metrics")
    p.add_argument("--metrics-workload-labels", type=_bool, default=True, metavar="true|false",
                   help="label L7 metrics with source/destination namespace and workload (default true; at most "
                        "500 workload pairs, later ones count as 'other')")
    p.add_argument("--health", type=_addr, metavar="ADDR:PORT", help="serve /healthz and /readyz (every watch synced, every local endpoint attached)")
    p.add_argument("--flows", action="append", default=[], metavar="PATH", help="append flow JSON lines here ('-' = stdout)")
    p.add_argument("--flows-max-size-mb", type=float, default=10.0, metavar="MB",
                   help="rotate a --flows file at this size (0 = never; default 10)")
    p.add_argument("--flows-max-backups", type=int, default=5, metavar="N", help="rotated flows files kept (name.1 ... name.N)")
    p.add_argument("--sockmap", action="store_true", help="accelerate proxy<->pod legs with sockmap")
    p.add_argument("--workers", type=int, default=None,
                   help="proxy processes sharing the listeners (default: one per core; 1 with --kubernetes)")
    p.add_argument("--status-file", type=Path, default=DEFAULT_STATUS_PATH, help=argparse.SUPPRESS)
    p.add_argument("--bpf-pin-dir", type=Path, default=DEFAULT_PIN_DIR, metavar="DIR",
                   help=f"where the kernel state is pinned between agents, on a bpffs (default {DEFAULT_PIN_DIR})")
    p.add_argument("--allow-localhost", choices=("policy", "always"), default="policy",
                   help="policy (default): traffic from this node to a pod is judged by the pod's ingress policy as "
                        "the `host` entity; always: the node may always reach its pods (Cilium's default in Kubernetes mode)")
    p.set_defaults(func=_run)

    s = sub.add_parser("status", help="show the running agent's state")
    s.add_argument("--status-file", type=Path, default=DEFAULT_STATUS_PATH, help=argparse.SUPPRESS)
    s.add_argument("-o", "--output", choices=("text", "json"), default="text")
    s.set_defaults(func=_status)

    e = sub.add_parser("endpoint", help="endpoint commands")
    esub = e.add_subparsers(dest="endpoint_command", metavar="COMMAND")
    esub.required = True
    el = esub.add_parser("list", help="list endpoints like `cilium endpoint list`")
    el.add_argument("--status-file", type=Path, default=DEFAULT_STATUS_PATH, help=argparse.SUPPRESS)
    el.add_argument("-o", "--output", choices=("text", "json"), default="text")
    el.set_defaults(func=_endpoint_list)

    c = sub.add_parser("cleanup-stale", help="remove unpinned mbr_* objects a crashed process left (an agent's pinned state stays: see uninstall)")
    c.set_defaults(func=_cleanup_stale)

    u = sub.add_parser(
        "uninstall",
        help="remove every program, filter, map, pin, rule and route of the agent (enforcement stops)",
        description="Remove the agent's kernel state. Refuses while an agent runs, unless --force.",
    )
    u.add_argument("--force", action="store_true", help="also while an agent runs (its kernel side stops enforcing)")
    u.add_argument("--status-file", type=Path, default=DEFAULT_STATUS_PATH, help=argparse.SUPPRESS)
    u.add_argument("--bpf-pin-dir", type=Path, default=DEFAULT_PIN_DIR, metavar="DIR",
                   help=f"the pin directory `membrane run` used (default {DEFAULT_PIN_DIR})")
    u.set_defaults(func=_uninstall)


def _addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not ADDR:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not true or false")


def _run(args: argparse.Namespace) -> int:
    if args.workers is None:  # one per core, as the gateway; --kubernetes runs one for now
        args.workers = 1 if args.kubernetes else (os.cpu_count() or 1)
    if args.workers < 1:
        print("membrane run: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.kubernetes:
        if args.policies or args.endpoints:
            print("membrane run: --kubernetes reads policies and pods from the API server; drop --policies/--endpoints", file=sys.stderr)
            return 2
        if args.workers != 1:
            print("membrane run: --kubernetes runs one proxy worker for now (--workers 1)", file=sys.stderr)
            return 2
    elif not args.policies or not args.endpoints:
        print("membrane run: give --policies PATH... and --endpoints FILE, or --kubernetes", file=sys.stderr)
        return 2
    config = AgentConfig(
        policies=tuple(args.policies),
        endpoints=args.endpoints,
        kubernetes=args.kubernetes,
        kubeconfig=args.kubeconfig,
        node_name=args.node_name,
        lease_namespace=args.lease_namespace,
        socket_path=args.socket,
        cni_queue=args.cni_queue,
        metrics=args.metrics,
        metrics_workload_labels=args.metrics_workload_labels,
        health=args.health,
        flows_max_bytes=int(max(0.0, args.flows_max_size_mb) * (1 << 20)),
        flows_max_backups=max(0, args.flows_max_backups),
        flows=tuple(args.flows),
        sockmap=args.sockmap,
        workers=args.workers,
        status_path=args.status_file,
        bpf_pin_dir=args.bpf_pin_dir,
        allow_localhost=args.allow_localhost == "always",
    )
    return run_agent(config)


def read_status(path: Path) -> dict[str, Any] | None:
    """The running agent's status document, or None when no agent (alive) wrote one."""
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = doc.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return doc


def _no_agent(path: Path) -> int:
    print(f"membrane: no agent is running (no live status at {path})", file=sys.stderr)
    return 1


def _status(args: argparse.Namespace) -> int:
    doc = read_status(args.status_file)
    if doc is None:
        return _no_agent(args.status_file)
    if args.output == "json":
        print(json.dumps(doc, indent=2))
        return 0
    eps = doc.get("endpoints", [])
    ready = sum(1 for e in eps if e.get("status") == "ready")
    ports = doc.get("proxy_ports", {})
    print(f"Agent:        {'agent ready' if doc.get('state') == 'ready' else doc.get('state')} (pid {doc.get('pid')})")
    print(f"Policies:     {', '.join(doc.get('policies', []))} (reloads: {doc.get('reloads', 0)})")
    print(f"Endpoints:    {ready}/{len(eps)} ready ({doc.get('endpoints_file')})")
    print(f"Proxy:        tcp {ports.get('tcp4')}/{ports.get('tcp6')}  udp {ports.get('udp4')}/{ports.get('udp6')}"
          f"  sockmap {'on' if doc.get('sockmap') else 'off'}")
    drops = doc.get("drops", {})
    print(f"Drops:        {', '.join(f'{k}={v}' for k, v in drops.items()) or 'none'}")
    print(f"Flows:        {doc.get('flows', 0)}")
    learned = doc.get("learned_fqdns", {})
    if learned:
        pairs = [f"{name}={','.join(ips)}" for name, ips in learned.items()]
        print(f"FQDNs:        {' '.join(pairs)}")
    for err in doc.get("errors", []):
        print(f"Error:        {err} (last good policy kept)")
    for warn in doc.get("warnings", []):
        print(f"Warning:      {warn}")
    return 0


COLUMNS = (
    "ENDPOINT",
    "POLICY (ingress) ENFORCEMENT",
    "POLICY (egress) ENFORCEMENT",
    "IDENTITY",
    "LABELS (source:key[=value])",
    "IPv6",
    "IPv4",
    "STATUS",
    "INTERFACE",
)


def endpoint_rows(doc: dict[str, Any]) -> list[list[str]]:
    """One row per endpoint (the first label line of each), in COLUMNS order."""
    rows = []
    for e in doc.get("endpoints", []):
        labels = e.get("labels") or [""]
        rows.append(
            [
                f"{e.get('id') or '-'} {e.get('namespace')}/{e.get('name')}",
                "Enabled" if e.get("ingress_enforcement") else "Disabled",
                "Enabled" if e.get("egress_enforcement") else "Disabled",
                str(e.get("identity") or "-"),
                labels[0],
                ",".join(e.get("ipv6", [])),
                ",".join(e.get("ipv4", [])),
                str(e.get("status")),
                str(e.get("interface") or "-"),
            ]
        )
        for extra in labels[1:]:
            rows.append(["", "", "", "", extra, "", "", "", ""])
    return rows


def _endpoint_list(args: argparse.Namespace) -> int:
    doc = read_status(args.status_file)
    if doc is None:
        return _no_agent(args.status_file)
    if args.output == "json":
        print(json.dumps(doc.get("endpoints", []), indent=2))
        return 0
    rows = [list(COLUMNS), *endpoint_rows(doc)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        print("   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _cleanup_stale(args: argparse.Namespace) -> int:
    from membrane.bpf.stale import cleanup_stale

    removed = cleanup_stale()
    for item in removed:
        print(f"removed {item}")
    if not removed:
        print("nothing to remove")
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    doc = read_status(args.status_file)
    if doc is not None and not args.force:
        print(
            f"membrane uninstall: an agent is running (pid {doc.get('pid')}); stop it first or use --force",
            file=sys.stderr,
        )
        return 1
    from membrane.bpf.stale import uninstall

    removed = uninstall(args.bpf_pin_dir)
    for item in removed:
        print(f"removed {item}")
    if not removed:
        print("nothing to remove")
    return 0
