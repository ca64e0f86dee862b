"""`membrane demo`: for now the policy demo of issue 2. Validates the example policies in `examples/`
and traces a set of flows through them, printing a verdict table.

The table printer (`format_verdict_table`) takes plain rows so the live demo (later issues) can
reuse it for flows it actually sends. Every trace goes through `membrane.cli.policy.run_trace`, the
same code as `membrane policy trace`. Exit status 0 when every scenario gets its expected verdict.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from membrane.cli.policy import (
    InvalidInput,
    UsageError,
    add_trace_arguments,
    run_trace,
    trace_json,
)
from membrane.control.sources.files import PathProblem, read_policies

EXAMPLES = Path(str(resources.files("membrane.examples")))  # shipped as package data


@dataclass(frozen=True, slots=True)
class VerdictRow:
    """One line of the verdict table."""

    source: str
    destination: str
    port: str
    request: str
    verdict: str
    decided_by: str
    expected: str | None = None

    @property
    def as_expected(self) -> bool:
        return self.expected is None or self.expected == self.verdict


@dataclass(frozen=True, slots=True)
class Scenario:
    title: str
    argv: tuple[str, ...]
    expected: str


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("HTTP: the allowed request", ("--src", "default/backend", "--dst", "default/frontend", "--dport", "80/TCP", "--http-method", "GET", "--http-path", "/api"), "ALLOWED"),
    Scenario("HTTP: another method", ("--src", "default/backend", "--dst", "default/frontend", "--dport", "80/TCP", "--http-method", "POST", "--http-path", "/api"), "L7_DENIED"),
    Scenario("HTTP: dot segments are normalised", ("--src", "default/backend", "--dst", "default/frontend", "--dport", "80/TCP", "--http-method", "GET", "--http-path", "/api/../admin"), "L7_DENIED"),
    Scenario("HTTP: another pod", ("--src", "default/debug", "--dst", "default/frontend", "--dport", "80/TCP", "--http-method", "GET", "--http-path", "/api"), "DROPPED"),
    Scenario("HTTP: another port", ("--src", "default/backend", "--dst", "default/frontend", "--dport", "8080/TCP"), "DROPPED"),
    Scenario("gRPC: allowed method", ("--src", "default/greeter-client", "--dst", "default/greeter", "--dport", "50051/TCP", "--grpc", "/helloworld.Greeter/SayHello"), "ALLOWED"),
    Scenario("gRPC: other method", ("--src", "default/greeter-client", "--dst", "default/greeter", "--dport", "50051/TCP", "--grpc", "/helloworld.Greeter/SayGoodbye"), "L7_DENIED"),
    Scenario("DNS: allowed pattern", ("--src", "default/crawler", "--dst", "kube-system/coredns", "--dport", "53/UDP", "--dns-name", "docs.cilium.io"), "ALLOWED"),
    Scenario("DNS: other name", ("--src", "default/crawler", "--dst", "kube-system/coredns", "--dport", "53/UDP", "--dns-name", "example.com"), "L7_DENIED"),
    Scenario("toFQDNs: learned IP", ("--src", "default/crawler", "--dst-ip", "104.198.14.52", "--dport", "443/TCP", "--learned-dns", "docs.cilium.io=104.198.14.52"), "ALLOWED"),
    Scenario("toFQDNs: unknown IP", ("--src", "default/crawler", "--dst-ip", "93.184.216.34", "--dport", "443/TCP", "--learned-dns", "docs.cilium.io=104.198.14.52"), "DROPPED"),
    Scenario("Kafka: produce orders", ("--src", "shop/order-service", "--dst", "shop/kafka", "--dport", "9092/TCP", "--kafka-api-key", "produce", "--kafka-topic", "orders"), "ALLOWED"),
    Scenario("Kafka: produce payments", ("--src", "shop/order-service", "--dst", "shop/kafka", "--dport", "9092/TCP", "--kafka-api-key", "produce", "--kafka-topic", "payments"), "L7_DENIED"),
    Scenario("Kafka: consumer fetches", ("--src", "shop/billing", "--dst", "shop/kafka", "--dport", "9092/TCP", "--kafka-api-key", "fetch", "--kafka-topic", "orders"), "ALLOWED"),
    Scenario("Kafka: consumer produces", ("--src", "shop/billing", "--dst", "shop/kafka", "--dport", "9092/TCP", "--kafka-api-key", "produce", "--kafka-topic", "orders"), "L7_DENIED"),
)


def format_verdict_table(rows: Sequence[VerdictRow], *, color: bool = False) -> str:
    """A fixed-width table: #, from, to, port, request, verdict, decided by (and a check mark when expected)."""
    headers = ("#", "from", "to", "port", "request", "verdict", "decided by")
    cells = [
        (str(i), r.source, r.destination, r.port, r.request or "-", r.verdict + ("" if r.as_expected else f" (expected {r.expected})"), r.decided_by)
        for i, r in enumerate(rows, 1)
    ]
    widths = [max(len(h), *(len(c[k]) for c in cells)) if cells else len(h) for k, h in enumerate(headers)]
    widths[-1] = len(headers[-1])  # the last column is not padded

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    colors = {"ALLOWED": "\033[32m", "DROPPED": "\033[31m", "L7_DENIED": "\033[33m"}
    out = [line(headers), line(["-" * w for w in widths[:-1]] + ["-" * 10])]
    for c in cells:
        text = line(c)
        verdict = c[5].split(" ")[0]
        if color and verdict in colors:
            text = text.replace(c[5], colors[verdict] + c[5] + "\033[0m", 1)
        out.append(text)
    return "\n".join(out)


def _decided_by(result: dict[str, Any]) -> str:
    for side in ("ingress", "egress"):
        d = result[side]
        if d["verdict"] != "ALLOWED":
            if d["matched"]:
                return f"{side}: " + "; ".join(d["matched"])
            return f"{side}: " + ("default deny" if d["verdict"] == "DROPPED" else f"no {d['l7']} rule matches")
    matched = [f"{side}: {m}" for side in ("egress", "ingress") for m in result[side]["matched"]]
    return "; ".join(matched) or "no policy enforced"


def run_scenarios(policies: Path, endpoints: Path, scenarios: Sequence[Scenario] = SCENARIOS) -> list[VerdictRow]:
    """Trace every scenario. Raises InvalidInput / PathProblem / UsageError like the trace command."""
    parser = argparse.ArgumentParser(add_help=False)
    add_trace_arguments(parser)
    rows = []
    for s in scenarios:
        args = parser.parse_args(["--policies", str(policies), "--endpoints", str(endpoints), *s.argv])
        trace = run_trace(args)
        result = trace_json(trace)
        ident = trace.pmap.identity(trace.dst.identity)
        dst = trace.dst.endpoint or f"{trace.dst.ip} ({ident.display if ident is not None else trace.dst.identity})"
        response = ", ".join(f"{k}={v}" for k, v in result["response"].items())
        verdict = result["verdict"]
        rows.append(
            VerdictRow(
                source=trace.src.endpoint or str(trace.src.ip),
                destination=dst,
                port=f"{trace.port}/{trace.proto.value}",
                request=trace.request.summary,
                verdict=verdict,
                decided_by=_decided_by(result) + (f" [{response}]" if response else ""),
                expected=s.expected,
            )
        )
    return rows


def _shown(path: Path) -> Path:
    """`path` relative to the working directory when it is below it (shorter lines, clickable)."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def cmd_demo(args: argparse.Namespace) -> int:
    """`membrane demo`: the live demo (pods, agent, real traffic) as root; `--policy-only` traces the examples."""
    if not args.policy_only:
        if os.geteuid() == 0:
            from membrane.sandbox.k8s_demo import run_k8s_demo
            from membrane.sandbox.live_demo import run_live_demo

            live = run_live_demo()
            if args.no_kubernetes:
                return live
            print("\n--- the same with Kubernetes: membrane sandbox up, driven with kubectl ---\n", flush=True)
            k8s = run_k8s_demo()
            return live or k8s
        print("membrane demo: the live demo needs root (network namespaces and eBPF); "
              "showing the policy-only demo instead\n", file=sys.stderr)
    return cmd_policy_demo(args)


def cmd_policy_demo(args: argparse.Namespace) -> int:
    """Validate and trace the example policies and print the verdict table (no kernel, no root)."""
    examples = _shown(Path(args.examples))
    policies = examples / "policies"
    endpoints = examples / "endpoints.yaml"
    try:
        loaded = read_policies([str(policies)])
    except PathProblem as e:
        print(f"membrane demo: {e}", file=sys.stderr)
        return 2
    print(f"Validating {policies}:")
    for err in loaded.errors:
        print(f"  {err}")
    for p in loaded.policies:
        print(f"  {p.source}:{p.line}: {p.key}: ok ({p.kind})")
    if loaded.errors:
        return 1
    print(f"\nTracing {len(SCENARIOS)} flows against {endpoints}:\n")
    try:
        rows = run_scenarios(policies, endpoints)
    except (InvalidInput, PathProblem, UsageError) as e:
        print(f"membrane demo: {e}", file=sys.stderr)
        return 1
    print(format_verdict_table(rows, color=sys.stdout.isatty()))
    bad = [r for r in rows if not r.as_expected]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} flows got their expected verdict.")
    return 0 if not bad else 1


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo", help="live demo: pods in network namespaces, the agent, real traffic, a verdict table (root)"
    )
    demo.add_argument("--policy-only", action="store_true",
                      help="only validate and trace the example policies (no kernel, no root)")
    demo.add_argument("--no-kubernetes", action="store_true",
                      help="skip the second part (a sandbox cluster driven with kubectl)")
    demo.add_argument("--examples", default=str(EXAMPLES), metavar="DIR",
                      help="folder with policies/ and endpoints.yaml (policy-only demo)")
    demo.set_defaults(func=cmd_demo)
