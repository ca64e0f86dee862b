"""`membrane policy validate|trace`: the CLI contract of issue 2 (flags, exit codes, JSON shape).

Exit status: 0 when the command ran (whatever the trace verdict), 1 when a policy or the endpoints
file is invalid, 2 on usage errors (bad flags, unknown endpoint, missing path). The trace builds
its request exactly as the proxy will see it: `--http-path` goes through normalize_target, and a
target the proxy would refuse is traced as an L7 denial with HTTP 400 (reason MALFORMED) on every
side that inspects HTTP; a port not under L7 control never sees the target, so it stays ALLOWED.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from membrane.control.sources.files import PathProblem, read_endpoints, read_policies
from membrane.parsers.errors import MalformedMessage
from membrane.parsers.events import DnsQuery, GrpcCall, HttpRequest, KafkaRequest, Reason
from membrane.parsers.http_target import normalize_target, split_target
from membrane.policies import (
    DirectionResult,
    EndpointsError,
    FlowResult,
    L4Proto,
    Peer,
    PolicyMap,
    compile_policy,
    denial_response,
    evaluate_flow,
)
from membrane.policies.dnsmatch import fqdn
from membrane.policies.kafka_keys import API_KEY_NAMES, parse_api_key
from membrane.policies.l7 import L7Request

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2

DNS_TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28, "SRV": 33, "ANY": 255}


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


def register(subparsers: Any) -> None:
    policy = subparsers.add_parser("policy", help="validate and trace CiliumNetworkPolicies")
    sub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    sub.required = True

    validate = sub.add_parser("validate", help="check policy files; one line per object or per problem")
    validate.add_argument("paths", nargs="+", metavar="PATH", help="a YAML file or a directory of them")
    validate.set_defaults(func=cmd_validate)

    trace = sub.add_parser("trace", help="explain the verdict for one flow or request")
    add_trace_arguments(trace)
    trace.set_defaults(func=cmd_trace)


def add_trace_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policies", action="extend", nargs="+", required=True, metavar="PATH",
                   help="policy files or directories (several after one flag, or the flag repeated)")
    p.add_argument("--endpoints", metavar="FILE", help="endpoints file (pods and namespaces)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", metavar="NS/NAME")
    src.add_argument("--src-ip", metavar="IP")
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--dst", metavar="NS/NAME")
    dst.add_argument("--dst-ip", metavar="IP")
    p.add_argument("--dport", required=True, metavar="PORT/PROTO", help="e.g. 80/TCP, 53/UDP")
    p.add_argument("--http-method", metavar="M")
    p.add_argument("--http-path", metavar="P")
    p.add_argument("--http-host", metavar="H")
    p.add_argument("--http-header", action="append", default=[], metavar="'Name: value'")
    p.add_argument("--grpc", metavar="/package.Service/Method")
    p.add_argument("--dns-name", metavar="NAME")
    p.add_argument("--dns-type", metavar="TYPE", default="A")
    p.add_argument("--kafka-api-key", metavar="NAME|NUMBER")
    p.add_argument("--kafka-api-version", type=int, default=0, metavar="N")
    p.add_argument("--kafka-client-id", metavar="ID")
    p.add_argument("--kafka-topic", action="append", default=[], metavar="T")
    p.add_argument("--learned-dns", action="append", default=[], metavar="NAME=IP[,IP...]")
    p.add_argument("-o", "--output", choices=["json", "text"], default="text")


# --- validate -----------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        result = read_policies(args.paths)
    except PathProblem as e:
        print(f"membrane policy validate: {e}", file=sys.stderr)
        return EXIT_USAGE
    if result.errors:
        for err in result.errors:
            print(str(err))
        return EXIT_INVALID
    for p in result.policies:
        sections = sum(len(r.ingress) + len(r.ingress_deny) + len(r.egress) + len(r.egress_deny) for r in p.rules)
        rules = f"{len(p.rules)} rule{'s' if len(p.rules) != 1 else ''}"
        print(f"{p.source}:{p.line}: {p.key}: ok ({p.kind}, {rules}, {sections} ingress/egress entries)")
    return EXIT_OK


# --- trace --------------------------------------------------------------------------------------


def parse_port(text: str) -> tuple[int, L4Proto]:
    port_text, _, proto_text = text.partition("/")
    try:
        port = int(port_text, 10)
    except ValueError:
        raise UsageError(f"--dport {text!r}: expected PORT/PROTO, e.g. 80/TCP") from None
    if not 0 < port <= 65535:
        raise UsageError(f"--dport {text!r}: port must be 1-65535")
    proto_name = (proto_text or "TCP").upper()
    if proto_name not in ("TCP", "UDP", "SCTP"):
        raise UsageError(f"--dport {text!r}: protocol must be TCP, UDP or SCTP")
    return port, L4Proto(proto_name)


def parse_learned(items: Sequence[str]) -> dict[str, set[str]]:
    learned: dict[str, set[str]] = {}
    for item in items:
        name, sep, ips = item.partition("=")
        if not sep or not name.strip() or not ips.strip():
            raise UsageError(f"--learned-dns {item!r}: expected NAME=IP[,IP...]")
        for ip in ips.split(","):
            try:
                learned.setdefault(fqdn(name), set()).add(str(ipaddress.ip_address(ip.strip())))
            except ValueError:
                raise UsageError(f"--learned-dns {item!r}: {ip!r} is not an IP address") from None
    return learned


def _headers(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for h in items:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--http-header {h!r}: expected 'Name: value'")
        out.append((name.strip(), value.strip()))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """The L7 request to judge (None = connection only) or the error the proxy would refuse it with."""

    request: L7Request | None
    error: Reason | None = None
    summary: str = ""


def build_request(args: argparse.Namespace) -> TraceRequest:
    """Raises UsageError for contradictory or malformed request flags."""
    kinds = [
        k
        for k, present in (
            ("http", args.http_method or args.http_path or args.http_host or args.http_header),
            ("grpc", args.grpc),
            ("dns", args.dns_name),
            ("kafka", args.kafka_api_key is not None or args.kafka_topic or args.kafka_client_id),
        )
        if present
    ]
    if len(kinds) > 1 and not (set(kinds) == {"http", "grpc"} and not (args.http_method or args.http_path)):
        raise UsageError(f"choose one request kind, got {', '.join(kinds)}")
    headers = _headers(args.http_header)
    if args.grpc:
        path = args.grpc
        parts = path.split("/")
        if len(parts) != 3 or parts[0] != "" or not parts[1] or not parts[2]:
            raise UsageError(f"--grpc {path!r}: expected /package.Service/Method")
        if not any(n.lower() == "content-type" for n, _ in headers):
            headers = (("content-type", "application/grpc"), *headers)
        call = GrpcCall(service=parts[1], method=parts[2], path=path, authority=args.http_host, headers=headers)
        return TraceRequest(call, summary=f"gRPC {path}")
    if "http" in kinds:
        method = args.http_method or "GET"
        raw = args.http_path or "/"
        summary = f"HTTP {method} {raw}"
        try:
            target = normalize_target(raw)
        except MalformedMessage:
            return TraceRequest(None, Reason.MALFORMED, summary + " (malformed target)")
        path, query = split_target(target)
        req = HttpRequest(method=method, target=target, path=path, query=query, host=args.http_host, headers=headers)
        return TraceRequest(req, summary=summary)
    if args.dns_name:
        qtype_text = str(args.dns_type).upper()
        qtype = DNS_TYPES.get(qtype_text)
        if qtype is None:
            if not qtype_text.isdigit():
                raise UsageError(f"--dns-type {args.dns_type!r}: unknown type")
            qtype = int(qtype_text)
        q = DnsQuery(id=0, name=args.dns_name, normalized_name=fqdn(args.dns_name), qtype=qtype)
        return TraceRequest(q, summary=f"DNS {qtype_text} {args.dns_name}")
    if "kafka" in kinds:
        if args.kafka_api_key is None:
            raise UsageError("--kafka-api-key is required for a Kafka request")
        key = parse_api_key(args.kafka_api_key)
        if key is None:
            raise UsageError(f"--kafka-api-key {args.kafka_api_key!r}: unknown API key")
        req_k = KafkaRequest(
            api_key=key,
            api_version=args.kafka_api_version,
            correlation_id=0,
            client_id=args.kafka_client_id,
            topics=tuple(args.kafka_topic),
        )
        name = API_KEY_NAMES.get(key, str(key))
        return TraceRequest(req_k, summary=f"Kafka {name} v{args.kafka_api_version} {','.join(args.kafka_topic)}".rstrip())
    return TraceRequest(None)


def resolve_peer(pmap: PolicyMap, key: str | None, ip: str | None, flag: str) -> Peer:
    if key is not None:
        full = key if "/" in key else f"default/{key}"
        if full not in pmap.endpoints:
            raise UsageError(f"{flag} {key!r}: no such endpoint in the endpoints file")
        return pmap.peer_from_endpoint(full)
    assert ip is not None
    try:
        return pmap.peer_from_ip(ip)
    except ValueError:
        raise UsageError(f"{flag}-ip {ip!r}: not an IP address") from None


@dataclass(frozen=True, slots=True)
class Trace:
    pmap: PolicyMap
    src: Peer
    dst: Peer
    port: int
    proto: L4Proto
    request: TraceRequest
    result: FlowResult


def run_trace(args: argparse.Namespace) -> Trace:
    """Load, compile and trace. Raises UsageError, PathProblem, InvalidInput."""
    loaded = read_policies(args.policies)
    if loaded.errors:
        raise InvalidInput([str(e) for e in loaded.errors])
    try:
        endpoints = read_endpoints(args.endpoints)
    except EndpointsError as e:
        raise InvalidInput([str(e)]) from None
    port, proto = parse_port(args.dport)
    learned = parse_learned(args.learned_dns)
    treq = build_request(args)
    pmap = compile_policy(loaded.policies, endpoints, learned)
    src = resolve_peer(pmap, args.src, args.src_ip, "--src")
    dst = resolve_peer(pmap, args.dst, args.dst_ip, "--dst")
    result = evaluate_flow(pmap, src=src, dst=dst, port=port, proto=proto, request=treq.request, request_error=treq.error)
    return Trace(pmap, src, dst, port, proto, treq, result)


class InvalidInput(Exception):
    """A policy or the endpoints file is invalid (exit status 1)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def _direction_json(d: DirectionResult) -> dict[str, Any]:
    return {
        "verdict": d.verdict.value,
        "enforced": d.enforced,
        "l7": d.l7.value if d.l7 is not None else None,
        "matched": list(d.matched),
    }


def trace_json(trace: Trace) -> dict[str, Any]:
    """The `-o json` object of the CLI contract (header values are always redacted)."""
    r = trace.result
    return {
        "verdict": r.verdict.value,
        "egress": _direction_json(r.egress),
        "ingress": _direction_json(r.ingress),
        "response": denial_response(r, trace.request.request),
        "header_actions": [
            {"action": a.action.value, "name": a.name, "value": None if a.value is None and not a.from_secret else "<redacted>"}
            for a in r.header_actions
        ],
    }


def describe_peer(trace: Trace, peer: Peer) -> str:
    ident = trace.pmap.identity(peer.identity)
    name = peer.endpoint or (ident.display if ident is not None else "?")
    ip = f" {peer.ip}" if peer.ip else ""
    return f"{name}{ip} (identity {peer.identity})"


def _direction_text(d: DirectionResult) -> str:
    who = d.endpoint or "-"
    head = f"{d.direction.value:7s} {who}: "
    if d.endpoint is None:
        return head + "not a local endpoint, no policy -> ALLOWED"
    if not d.enforced and d.lookup is not None and not d.lookup.matched:
        return head + "policy not enforced for this direction -> ALLOWED"
    lk = d.lookup
    parts = []
    if lk is not None:
        if lk.conflict:
            parts.append("conflicting L7 parsers on this port (fail closed): " + "; ".join(lk.matched))
        elif lk.kind.value == "drop":
            parts.append("denied by " + "; ".join(lk.matched) if lk.matched else "no rule allows this peer and port (default deny)")
        else:
            parts.append("allowed at L3/L4 by " + "; ".join(lk.matched))
    if d.l7 is not None:
        if d.decision is None:
            parts.append(f"port under {d.l7.value} L7 rules (no request given)")
        elif d.decision.allowed:
            parts.append(f"L7 {d.l7.value} allowed by " + "; ".join(d.decision.matched))
        elif d.decision.reason is Reason.MALFORMED:
            parts.append(f"L7 {d.l7.value}: request malformed for this parser")
        else:
            parts.append(f"L7 {d.l7.value}: no rule matches the request")
    return head + ", ".join(parts) + f" -> {d.verdict.value}"


def trace_text(trace: Trace) -> str:
    r = trace.result
    lines = [
        f"{describe_peer(trace, trace.src)} -> {describe_peer(trace, trace.dst)} {trace.port}/{trace.proto.value}"
        + (f"  {trace.request.summary}" if trace.request.summary else ""),
    ]
    for d in (r.egress, r.ingress):
        lines.append(_direction_text(d))
        if d.endpoint is not None:
            considered = list(dict.fromkeys(c.ref for c in trace.pmap.direction(d.endpoint, d.direction).contributions))
            if considered:
                more = f" (+{len(considered) - 6} more)" if len(considered) > 6 else ""
                lines.append("        considered: " + "; ".join(considered[:6]) + more)
    for a in r.header_actions:
        lines.append(f"header action: {a.action.value} {a.name}" + (" = <redacted>" if a.value is not None or a.from_secret else ""))
    response = trace_json(trace)["response"]
    if response:
        lines.append("response: " + ", ".join(f"{k}={v}" for k, v in response.items()))
    lines.append(f"verdict: {r.verdict.value}")
    return "\n".join(lines)


def cmd_trace(args: argparse.Namespace) -> int:
    try:
        trace = run_trace(args)
    except UsageError as e:
        print(f"membrane policy trace: {e}", file=sys.stderr)
        return EXIT_USAGE
    except PathProblem as e:
        print(f"membrane policy trace: {e}", file=sys.stderr)
        return EXIT_USAGE
    except InvalidInput as e:
        for line in e.lines:
            print(line, file=sys.stderr)
        return EXIT_INVALID
    for err in trace.pmap.errors:
        print(f"warning: {err}", file=sys.stderr)
    if args.output == "json":
        print(json.dumps(trace_json(trace)))
    else:
        print(trace_text(trace))
    return EXIT_OK
