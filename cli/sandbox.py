"""`membrane sandbox up`: argument parsing for the local one-node cluster (membrane.sandbox.cluster)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("sandbox", help="a local one-node Kubernetes cluster: API server double, pods as netns, the agent (root)")
    ssub = p.add_subparsers(dest="sandbox_command", metavar="COMMAND")
    ssub.required = True
    up = ssub.add_parser(
        "up",
        help="run the sandbox in the foreground until SIGINT/SIGTERM, then remove everything it made",
        description="Starts the API server double, this node's kubelet (Pods become network namespaces "
                    "<namespace>-<name> through ptp + host-local + membrane-cni) and the agent in Kubernetes mode; "
                    "prints `sandbox ready kubeconfig=DIR/kubeconfig` when all of it is up.",
    )
    up.add_argument("--pods", type=Path, metavar="FILE", help="Pod manifests (multi-document YAML, as kubectl apply -f takes)")
    up.add_argument("--state-dir", type=Path, required=True, metavar="DIR", help="kubeconfig, certificates, agent socket and state")
    up.add_argument("--node-name", default=None, help="this node's name (default membrane-sandbox)")
    up.add_argument("--pod-cidr", default=None, help="the pods' subnet (default: a free 10.244.X.0/24)")
    up.add_argument("--flows", metavar="PATH", default=None, help="the agent writes flow JSON lines here (default DIR/flows.jsonl)")
    up.set_defaults(func=_up)


def _up(args: argparse.Namespace) -> int:
    from membrane.sandbox.cluster import DEFAULT_NODE, SandboxConfig, run_sandbox

    if args.pods is not None and not args.pods.is_file():
        print(f"membrane sandbox up: --pods {args.pods}: no such file", file=sys.stderr)
        return 2
    flows = args.flows or str(args.state_dir / "flows.jsonl")
    config = SandboxConfig(
        state_dir=args.state_dir.resolve(),
        pods_file=args.pods,
        node_name=args.node_name or DEFAULT_NODE,
        pod_cidr=args.pod_cidr,
        agent_args=("--flows", flows),
    )
    try:
        return asyncio.run(run_sandbox(config))
    except KeyboardInterrupt:
        return 130



