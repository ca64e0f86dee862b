"""`membrane policy validate|trace`: the CLI contract of issue 2 (flags, exit codes, JSON shape).

Exit status: 0 when the command ran (whatever the trace verdict), 1 when a policy or the endpoints
file is invalid, 2 on usage errors (bad flags, unknown endpoint, missing path, `--http-path`
without `--http-method`). With `trace --exit-code`, a DROPPED flow exits 3 and an L7_DENIED one 4,
so a CI job can gate on the verdict. A PATH of `-` reads policies from standard input. The trace
builds its request exactly as the proxy will see it: `--http-path` goes through normalize_target,
and a target the proxy would refuse is traced as an L7 denial with HTTP 400 (reason MALFORMED) on
every side that inspects HTTP; a port not under L7 control never sees the target, so it stays ALLOWED.
Peers are endpoints of the endpoints file (`--src NS/NAME`), IPs (`--src-ip`), or label sets
(`--src-labels k8s:app=x,k8s:io.kubernetes.pod.namespace=NS`, as `cilium policy trace -s` takes).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from membrane.control.sources.files import PathProblem, read_endpoints, read_policies
from membrane.parsers.errors import MalformedMessage
from membrane.parsers.events import DnsQuery, GrpcCall, HttpRequest, KafkaRequest, Reason
from membrane.parsers.http_target import normalize_target, split_target
from membrane.parsers.names import kafka_api_key_name
from membrane.policies import (
    DirectionResult,
    Endpoint,
    Endpoints,
    EndpointsError,
    FlowResult,
    FlowVerdict,
    L4Proto,
    LoadResult,
    Namespace,
    Peer,
    PolicyMap,
    ReservedIdentity,
    VerdictKind,
    compile_policy,
    denial_response,
    evaluate_flow,
    load_policies,
    merge_results,
)
from membrane.policies.compile import VISIBILITY_MARK
from membrane.policies.crd import Policy
from membrane.policies.dnsmatch import fqdn
from membrane.policies.endpoints import endpoint_labels
from membrane.policies.kafka_keys import parse_api_key
from membrane.policies.l7 import L7Request
from membrane.policies.labels import CLUSTER_KEY, NAMESPACE_KEY, NAMESPACE_LABELS_PREFIX, SERVICE_ACCOUNT_KEY

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_DROPPED = 3  # `trace --exit-code` only
EXIT_L7_DENIED = 4  # `trace --exit-code` only
STDIN = "-"

DNS_TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28, "SRV": 33, "ANY": 255}


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


def register(subparsers: Any) -> None:
    policy = subparsers.add_parser("policy", help="validate and trace CiliumNetworkPolicies")
    sub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    sub.required = True

    validate = sub.add_parser("validate", help="check policy files; one line per object or per problem")
    validate.add_argument("paths", nargs="+", metavar="PATH", help="a YAML file, a directory of them, or - for stdin")
    validate.add_argument("-o", "--output", choices=["text", "json"], default="text")
    validate.set_defaults(func=cmd_validate)

    trace = sub.add_parser("trace", help="explain the verdict for one flow or request")
    add_trace_arguments(trace)
    trace.set_defaults(func=cmd_trace)


def add_trace_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policies", action="extend", nargs="+", required=True, metavar="PATH",
                   help="policy files or directories (several after one flag, or the flag repeated)")
    p.add_argument("--endpoints", metavar="FILE", help="endpoints file (pods and namespaces)")
    labels_help = ("the peer's labels, e.g. k8s:app=x,k8s:io.kubernetes.pod.namespace=NS (repeatable or "
                   "comma-separated; namespace absent = default; reserved:world etc. for a reserved identity)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", metavar="NS/NAME")
    src.add_argument("--src-ip", metavar="IP")
    src.add_argument("--src-labels", "-s", action="append", metavar="LABELS", help=labels_help)
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--dst", metavar="NS/NAME")
    dst.add_argument("--dst-ip", metavar="IP")
    dst.add_argument("--dst-labels", "-d", action="append", metavar="LABELS", help=labels_help)
    p.add_argument("--exit-code", action="store_true",
                   help=f"exit {EXIT_DROPPED} when the flow is DROPPED and {EXIT_L7_DENIED} when it is L7_DENIED")
    p.add_argument("--dport", required=True, metavar="PORT/PROTO", help="e.g. 80/TCP, 53/UDP, 8/ICMP (an ICMP type)")
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


def read_policy_paths(paths: Sequence[str]) -> LoadResult:
    """Load every PATH in order; `-` is standard input (source name `<stdin>`). Raises PathProblem."""
    results = []
    for path in paths:
        if path == STDIN:
            results.append(load_policies(sys.stdin.buffer.read(), "<stdin>", skip_endpoints_documents=True))
        else:
            results.append(read_policies([path]))
    return merge_results(results)


def _entries(p: Policy) -> int:
    return sum(len(r.ingress) + len(r.ingress_deny) + len(r.egress) + len(r.egress_deny) for r in p.rules)


def validate_json(result: LoadResult) -> dict[str, Any]:
    """The `validate -o json` object: `valid`, one record per valid object, one per problem."""
    return {
        "valid": not result.errors,
        "policies": [
            {"source": p.source, "line": p.line, "object": p.key, "kind": p.kind, "rules": len(p.rules), "entries": _entries(p)}
            for p in result.policies
        ],
        "errors": [
            {"source": e.source, "line": e.line, "object": e.obj, "path": e.path, "message": e.message}
            for e in result.errors
        ],
    }


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        result = read_policy_paths(args.paths)
    except PathProblem as e:
        print(f"membrane policy validate: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.output == "json":
        print(json.dumps(validate_json(result)))
        return EXIT_INVALID if result.errors else EXIT_OK
    if result.errors:
        for err in result.errors:
            print(str(err))
        return EXIT_INVALID
    for p in result.policies:
        rules = f"{len(p.rules)} rule{'s' if len(p.rules) != 1 else ''}"
        print(f"{p.source}:{p.line}: {p.key}: ok ({p.kind}, {rules}, {_entries(p)} ingress/egress entries)")
    return EXIT_OK


# --- trace --------------------------------------------------------------------------------------


def parse_port(text: str) -> tuple[int, L4Proto]:
    """`80/TCP`, `53/UDP`, `9/SCTP`, or an ICMP type: `8/ICMP`, `128/ICMPv6` (as `icmps` key them)."""
    port_text, _, proto_text = text.partition("/")
    try:
        port = int(port_text, 10)
    except ValueError:
        raise UsageError(f"--dport {text!r}: expected PORT/PROTO, e.g. 80/TCP") from None
    proto_name = (proto_text or "TCP").upper()
    icmp = {"ICMP": L4Proto.ICMP, "ICMPV4": L4Proto.ICMP, "ICMPV6": L4Proto.ICMPV6}.get(proto_name)
    if icmp is not None:
        if not 0 <= port <= 255:
            raise UsageError(f"--dport {text!r}: an ICMP type must be 0-255")
        return port, icmp
    if not 0 < port <= 65535:
        raise UsageError(f"--dport {text!r}: port must be 1-65535")
    if proto_name not in ("TCP", "UDP", "SCTP"):
        raise UsageError(f"--dport {text!r}: protocol must be TCP, UDP, SCTP, ICMP or ICMPv6")
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
    if kinds == ["http"] and not args.http_method:
        given = "--http-path" if args.http_path else "--http-host" if args.http_host else "--http-header"
        raise UsageError(f"{given} needs --http-method (an HTTP request has a method; say which, e.g. GET)")
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
        method = args.http_method
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
        name = kafka_api_key_name(key)
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


_RESERVED = {r.label_name: r for r in ReservedIdentity}


@dataclass(frozen=True, slots=True)
class LabelPeer:
    """A peer given by labels: a reserved identity, or a pod (its namespace, labels, service account)."""

    reserved: ReservedIdentity | None = None
    namespace: str = "default"
    labels: tuple[tuple[str, str], ...] = ()
    namespace_labels: tuple[tuple[str, str], ...] = ()
    service_account: str = "default"


def parse_label_peer(items: Sequence[str], flag: str) -> LabelPeer:
    """`k8s:app=x,k8s:io.kubernetes.pod.namespace=NS` (repeatable) -> LabelPeer. Raises UsageError.

    Sources: `k8s:` or none for pod labels; `reserved:NAME` alone for a reserved identity
    (`reserved:world`, `reserved:host`, ...). The namespace, service account and namespace labels
    come from their Cilium label keys; an absent namespace is `default`.
    """
    texts = [t.strip() for item in items for t in item.split(",") if t.strip()]
    if not texts:
        raise UsageError(f"{flag}: give at least one label")
    pod: dict[str, str] = {}
    ns_labels: dict[str, str] = {}
    namespace, sa = "default", "default"
    for text in texts:
        source, sep, rest = text.partition(":")
        if not sep:
            source, rest = "k8s", text
        key, _, value = rest.partition("=")
        if source == "reserved":
            if len(texts) > 1 or key not in _RESERVED:
                raise UsageError(f"{flag} {text!r}: reserved:NAME stands alone ({', '.join(_RESERVED)})")
            return LabelPeer(reserved=_RESERVED[key])
        if source not in ("k8s", "any") or not key:
            raise UsageError(f"{flag} {text!r}: expected [k8s:]key=value or reserved:NAME")
        if key == NAMESPACE_KEY:
            namespace = value
        elif key == SERVICE_ACCOUNT_KEY:
            sa = value
        elif key.startswith(NAMESPACE_LABELS_PREFIX + "."):
            ns_labels[key[len(NAMESPACE_LABELS_PREFIX) + 1 :]] = value
        elif key != CLUSTER_KEY:
            pod[key] = value
    if not namespace:
        raise UsageError(f"{flag}: {NAMESPACE_KEY} needs a value")
    return LabelPeer(namespace=namespace, labels=tuple(pod.items()), namespace_labels=tuple(ns_labels.items()), service_account=sa)


_LABEL_ENDPOINT = {"--src": "[src-labels]", "--dst": "[dst-labels]"}


def with_label_peers(endpoints: Endpoints, peers: Mapping[str, LabelPeer]) -> Endpoints:
    """`endpoints` plus one address-less endpoint per label-given pod peer (named `[src-labels]`...).

    The namespace's labels are the endpoints file's for that namespace, plus any given as labels.
    """
    namespaces = {n.name: n for n in endpoints.namespaces}
    added: list[Endpoint] = []
    for flag, lp in peers.items():
        if lp.reserved is not None:
            continue
        known = namespaces.get(lp.namespace)
        ns_labels = {**(dict(known.labels) if known is not None else {}), **dict(lp.namespace_labels)}
        namespaces[lp.namespace] = Namespace(name=lp.namespace, labels=ns_labels)
        labels = dict(lp.labels)
        added.append(
            Endpoint(
                name=_LABEL_ENDPOINT[flag],
                namespace=lp.namespace,
                labels=labels,
                service_account=lp.service_account,
                label_set=endpoint_labels(labels, lp.namespace, ns_labels, lp.service_account),
            )
        )
    return Endpoints(namespaces=tuple(namespaces.values()), endpoints=(*endpoints.endpoints, *added))


def _peer(pmap: PolicyMap, args: argparse.Namespace, flag: str, label_peers: Mapping[str, LabelPeer]) -> Peer:
    side = flag[2:]
    lp = label_peers.get(flag)
    if lp is None:
        return resolve_peer(pmap, getattr(args, side), getattr(args, f"{side}_ip"), flag)
    if lp.reserved is not None:
        return Peer(int(lp.reserved))
    return pmap.peer_from_endpoint(f"{lp.namespace}/{_LABEL_ENDPOINT[flag]}")


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
    loaded = read_policy_paths(args.policies)
    if loaded.errors:
        raise InvalidInput([str(e) for e in loaded.errors])
    try:
        endpoints = read_endpoints(args.endpoints)
    except EndpointsError as e:
        raise InvalidInput([str(e)]) from None
    port, proto = parse_port(args.dport)
    learned = parse_learned(args.learned_dns)
    treq = build_request(args)
    label_peers = {
        flag: parse_label_peer(items, f"{flag}-labels")
        for flag, items in (("--src", getattr(args, "src_labels", None)), ("--dst", getattr(args, "dst_labels", None)))
        if items
    }
    pmap = compile_policy(loaded.policies, with_label_peers(endpoints, label_peers), learned)
    src = _peer(pmap, args, "--src", label_peers)
    dst = _peer(pmap, args, "--dst", label_peers)
    result = evaluate_flow(pmap, src=src, dst=dst, port=port, proto=proto, request=treq.request, request_error=treq.error)
    return Trace(pmap, src, dst, port, proto, treq, result)


class InvalidInput(Exception):
    """A policy or the endpoints file is invalid (exit status 1)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def side_reason(d: DirectionResult) -> str:
    """Why one side decided as it did, in the words `trace` prints ("default deny", "no http rule matches")."""
    lk = d.lookup
    if d.endpoint is None or lk is None:
        return "not a local endpoint (no policy of its own)"
    if lk.conflict:
        return "conflicting L7 parsers on this port (fail closed)"
    if lk.kind is VerdictKind.DROP:
        return "denied by a deny rule" if lk.matched else "default deny"
    if lk.kind is VerdictKind.ALLOW:
        return "allowed at L3/L4" if lk.matched else "not enforced"
    kind = d.l7.value if d.l7 is not None else "L7"
    if d.decision is None:
        return f"port under {kind} rules (no request given)"
    if d.decision.allowed and all(VISIBILITY_MARK in ref for ref in d.decision.matched):
        return f"no {kind} rule matches; allowed: visibility only (enableDefaultDeny is false)"
    if d.decision.allowed:
        return f"{kind} rule matches"
    if d.decision.reason is Reason.MALFORMED:
        return f"request malformed for the {kind} parser"
    return f"no {kind} rule matches"


def flow_reason(result: FlowResult) -> str:
    """The deciding side's reason for DROPPED / L7_DENIED; both sides' for ALLOWED."""
    for d in (result.egress, result.ingress):
        if d.verdict is result.verdict and result.verdict is not FlowVerdict.ALLOWED:
            return f"{d.direction.value}: {side_reason(d)}"
    return "; ".join(f"{d.direction.value}: {side_reason(d)}" for d in (result.egress, result.ingress))


def considered(trace: Trace, d: DirectionResult) -> list[str]:
    """Every rule of the side's endpoint policy for that direction (what the verdict was chosen from)."""
    if d.endpoint is None:
        return []
    return list(dict.fromkeys(c.ref for c in trace.pmap.direction(d.endpoint, d.direction).contributions))


def _direction_json(trace: Trace, d: DirectionResult) -> dict[str, Any]:
    return {
        "verdict": d.verdict.value,
        "enforced": d.enforced,
        "l7": d.l7.value if d.l7 is not None else None,
        "matched": list(d.matched),
        "reason": side_reason(d),
        "endpoint": d.endpoint,
        "considered": considered(trace, d),
    }


def identity_json(trace: Trace, peer: Peer) -> dict[str, Any]:
    ident = trace.pmap.identity(peer.identity)
    labels = sorted(str(label) for label in ident.labels.labels) if ident is not None else []
    return {"id": peer.identity, "endpoint": peer.endpoint, "ip": peer.ip, "labels": labels}


def trace_json(trace: Trace) -> dict[str, Any]:
    """The `-o json` object of the CLI contract (header values are always redacted).

    Issue 2's keys stay as they were; `reason`, `identities` and, per side, `reason`, `endpoint`
    and `considered` were added for CI and for people reading why.
    """
    r = trace.result
    return {
        "verdict": r.verdict.value,
        "egress": _direction_json(trace, r.egress),
        "ingress": _direction_json(trace, r.ingress),
        "response": denial_response(r, trace.request.request),
        "header_actions": [
            {"action": a.action.value, "name": a.name, "value": None if a.value is None and not a.from_secret else "<redacted>"}
            for a in r.header_actions
        ],
        "reason": flow_reason(r),
        "identities": {"src": identity_json(trace, trace.src), "dst": identity_json(trace, trace.dst)},
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
        refs = considered(trace, d)
        if refs:
            more = f" (+{len(refs) - 6} more)" if len(refs) > 6 else ""
            lines.append("        considered: " + "; ".join(refs[:6]) + more)
    for a in r.header_actions:
        lines.append(f"header action: {a.action.value} {a.name}" + (" = <redacted>" if a.value is not None or a.from_secret else ""))
    response = trace_json(trace)["response"]
    if response:
        lines.append("response: " + ", ".join(f"{k}={v}" for k, v in response.items()))
    lines.append(f"reason: {flow_reason(r)}")
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
    if args.exit_code:
        return {FlowVerdict.DROPPED: EXIT_DROPPED, FlowVerdict.L7_DENIED: EXIT_L7_DENIED}.get(trace.result.verdict, EXIT_OK)
    return EXIT_OK
