"""The node agent (`membrane run`): compiled policy -> BPF maps, the transparent proxy, live reload.

Owns the translation of a `PolicyMap` into kernel map writes (`plan_kernel`, pure), the order of
those writes (identities, then policy, then endpoints; removals last, so no update ever widens
what is allowed), the transparent proxy's listeners and per-connection policy lookup, the watch on
policy/endpoint files and learned DNS names, drop events -> flow records, and the status file.
Never touches bcc itself (bpf/ does; pyroute2 only to read the node's own addresses), never parses bytes, never decides a verdict.
Invariant: the node is never open: the policy maps are pinned (`--bpf-pin-dir`), a starting agent
adopts them and replaces the programs in place, and removes what is stale only after that; SIGTERM
leaves the kernel side enforcing (L7 ports fail closed) until the next agent or `membrane uninstall`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from membrane.bpf import maps as bm
from membrane.bpf.errors import AttachError
from membrane.bpf.pins import DEFAULT_PIN_DIR
from membrane.bpf.steer import ProxyPorts, Steering
from membrane.control.files import PathProblem, policy_files, read_endpoints, read_policies
from membrane.parsers.events import Reason
from membrane.policies import (
    Endpoints,
    EndpointsError,
    FlowResult,
    FqdnCache,
    L4Proto,
    ParserType,
    Policy,
    PolicyDirection,
    PolicyMap,
    VerdictKind,
    compile_policy,
)
from membrane.policies.compile import Peer as PolicyPeer
from membrane.proxy.flows import DROPPED, EGRESS, INGRESS, REQUEST, FlowContext, FlowSink, L3L4Flow, Peer
from membrane.proxy.metrics import Metrics
from membrane.proxy.server import (
    IPV6_RECVORIGDSTADDR,
    IPV6_TRANSPARENT,
    SOL_IPV6,
    ConnectionInfo,
    Proxy,
    ProxyConfig,
    listening_socket,
)
from membrane.proxy.session import (
    ConnectionPolicy,
    DatagramSession,
    DeniedSession,
    L7Request,
    Session,
    choose_session,
    wall_clock_ns,
)
from membrane.proxy.session_dns import DnsDatagramSession, DnsTcpSession
from membrane.proxy.session_http2 import HttpSession
from membrane.proxy.session_kafka import KafkaLearned, KafkaSession

log = logging.getLogger("membrane.agent")
T = TypeVar("T")

DEFAULT_STATUS_PATH = Path(os.environ.get("MEMBRANE_STATUS", "/run/membrane/status.json"))
POLL_S = 1.0  # how often the policy paths and the endpoints file are checked for edits
EVENTS_S = 0.1  # how often drop events are read from the kernel ring buffer
MAX_EXPANDED_PORTS = 4096  # per map entry: a wider range than this (not 1-65535) is not expanded
_PROTOS = {
    L4Proto.TCP: bm.IPPROTO_TCP,
    L4Proto.UDP: bm.IPPROTO_UDP,
    L4Proto.SCTP: bm.IPPROTO_SCTP,
    L4Proto.ICMP: bm.IPPROTO_ICMP,
    L4Proto.ICMPV6: bm.IPPROTO_ICMPV6,
}
HOST_IDENTITY = 1  # Cilium's reserved:host: the node's own addresses


# --- configuration ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """What `membrane run` was asked to do."""

    policies: tuple[str, ...]
    endpoints: str
    flows: tuple[str, ...] = ()  # JSON-lines sinks ('-' = stdout)
    sockmap: bool = False
    workers: int = 1
    status_path: Path = DEFAULT_STATUS_PATH
    drain_timeout_s: float = 2.0
    bpf_pin_dir: Path = DEFAULT_PIN_DIR  # where the kernel state lives between agents (on a bpffs)
    allow_localhost: bool = False  # Cilium's allow-localhost=always: the node reaches every pod (else: judged as `host`)


# --- pure translation: PolicyMap -> kernel content ---------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelPlan:
    """Everything the maps should hold for one compiled policy. Pure data; `apply` writes it."""

    identities: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, tuple[int, int]]  # prefix -> (identity, ifindex)
    ingress: dict[bm.PolicyKey, bm.PolicyEntry]
    egress: dict[bm.PolicyKey, bm.PolicyEntry]
    endpoints: dict[int, bm.Endpoint]  # host ifindex -> endpoint
    redirect_ports: frozenset[int]  # destination ports of L7-redirected flows (for sockmap)
    problems: tuple[str, ...] = ()  # entries that could not be expressed (their traffic is dropped)


def _port_keys(lo: int, hi: int) -> list[int] | None:
    """The PolicyKey ports for an inclusive range; [ANY_PORT] for every port; None = too wide to expand."""
    if lo <= 1 and hi >= 65535:
        return [bm.ANY_PORT]
    lo = max(lo, 1)
    if hi - lo + 1 > MAX_EXPANDED_PORTS:
        return None
    return list(range(lo, hi + 1))


def _keys_for(proto: L4Proto, lo: int, hi: int) -> list[int] | None:
    """PolicyKey ports of a run: TCP/UDP/SCTP ports, or ICMP types as `icmp_port(type)`."""
    if proto in (L4Proto.ICMP, L4Proto.ICMPV6):
        if lo <= 0 and hi >= 255:
            return [bm.ANY_PORT]
        return [bm.icmp_port(t) for t in range(lo, hi + 1)]
    return _port_keys(lo, hi)


def host_identities(host_ips: Iterable[str]) -> dict[ipaddress.IPv4Network | ipaddress.IPv6Network, tuple[int, int]]:
    """ipcache entries for the node's own addresses: identity 1 (`host`), not a local endpoint.

    Traffic from the node itself to a pod is then judged by the pod's ingress policy as `host`
    (`fromEntities: [host]`), and a pod's traffic to the node as `toEntities: [host]`. Link-local
    addresses and unparseable strings are skipped (they never reach the ipcache)."""
    out: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, tuple[int, int]] = {}
    for ip in host_ips:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            continue
        if addr.is_link_local or addr.is_multicast or addr.is_unspecified:
            continue
        out[ipaddress.ip_network(addr)] = (HOST_IDENTITY, 0)
    return out


def _direction_keys(
    ep_id: int, dp: Any, problems: list[str], what: str
) -> tuple[dict[bm.PolicyKey, bm.PolicyEntry], set[int]]:
    """The kernel keys of one enforced direction. The kernel's per-identity lookup is layered:
    (id, port, proto) -> (id, ANY_PORT, proto) -> (id, ANY_PORT, ANY_PROTO). The last is the L3-only
    verdict (PASS under an L3-only allow, covering ICMP and GRE too); every run that differs from
    the layer below it is written, DROP included, so a deny under an L3-only allow stays a deny.
    A run that cannot be expanded is never left to a wider PASS: its protocol's ANY_PORT key becomes
    DROP (fail closed) and the run is named in `problems`."""
    keys: dict[bm.PolicyKey, bm.PolicyEntry] = {}
    redirect_ports: set[int] = set()
    values = {
        VerdictKind.ALLOW: bm.PolicyEntry(verdict=bm.Verdict.PASS),
        VerdictKind.DROP: bm.PolicyEntry(verdict=bm.Verdict.DROP),
        VerdictKind.REDIRECT: bm.PolicyEntry(verdict=bm.Verdict.REDIRECT),
    }
    for ident, l3, runs in dp.layered_entries():
        if l3 is VerdictKind.ALLOW:
            keys[bm.PolicyKey(endpoint_id=ep_id, identity=ident)] = values[VerdictKind.ALLOW]
        by_proto: dict[L4Proto, list[Any]] = {}
        for run in runs:
            by_proto.setdefault(run.proto, []).append(run)
        for proto, proto_runs in by_proto.items():
            num = _PROTOS[proto]
            base = l3  # what the layer below says for this protocol
            whole = [r for r in proto_runs if _keys_for(proto, r.port, r.end_port) == [bm.ANY_PORT]]
            if whole and whole[0].verdict is not base:
                base = whole[0].verdict
                keys[bm.PolicyKey(endpoint_id=ep_id, identity=ident, proto=num)] = values[base]
            for run in proto_runs:
                if run.verdict is base:
                    continue
                ports = _keys_for(proto, run.port, run.end_port)
                if ports is None:
                    problems.append(
                        f"{what}: ports {run.port}-{run.end_port}/{proto.value} to identity {ident} span more than "
                        f"{MAX_EXPANDED_PORTS} ports; {proto.value} to that identity is dropped where not listed"
                    )
                    if base is not VerdictKind.DROP:
                        keys[bm.PolicyKey(endpoint_id=ep_id, identity=ident, proto=num)] = values[VerdictKind.DROP]
                    continue
                for port in ports:
                    keys[bm.PolicyKey(endpoint_id=ep_id, identity=ident, port=port, proto=num)] = values[run.verdict]
                    if run.verdict is VerdictKind.REDIRECT and port:
                        redirect_ports.add(port)
    # DROP keys are only needed above a PASS layer; a DROP with nothing wider is the enforced default
    return keys, redirect_ports


def plan_kernel(
    pmap: PolicyMap,
    attached: Mapping[str, int],
    endpoint_ids: Mapping[str, int],
    host_ips: Iterable[str] = (),
) -> KernelPlan:
    """Translate a compiled policy into map content.

    `attached`: endpoint key -> host-side ifindex of the endpoints enforced on this node;
    `endpoint_ids`: endpoint key -> nonzero endpoint id (stable for the agent's lifetime);
    `host_ips`: the node's own addresses, mapped to the `host` identity (`host_identities`).
    Returns the plan. Never raises; an entry that cannot be expressed (a range wider than
    MAX_EXPANDED_PORTS) is left out or made DROP, so the kernel drops that traffic (fail closed),
    and is named in `problems`. ICMP types are keyed as `bpf.maps.icmp_port(type)`.
    """
    identities: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, tuple[int, int]] = {}
    for net, ident in pmap.ipcache.entries().items():
        identities[net] = (ident, 0)
    identities.update(host_identities(host_ips))
    for key, idx in attached.items():
        ep = pmap.endpoints.get(key)
        ep_ident = pmap.identity_of(key)
        if ep is None or ep_ident is None:
            continue
        for ip in ep.ips:
            identities[ipaddress.ip_network(ip)] = (ep_ident, idx)
    policy: dict[PolicyDirection, dict[bm.PolicyKey, bm.PolicyEntry]] = {d: {} for d in PolicyDirection}
    endpoints: dict[int, bm.Endpoint] = {}
    redirect_ports: set[int] = set()
    problems: list[str] = []
    for key, idx in sorted(attached.items()):
        subject = pmap.identity_of(key)
        if subject is None:
            continue
        ep_id = endpoint_ids[key]
        enforced = {}
        for direction in PolicyDirection:
            dp = pmap.direction(key, direction)
            enforced[direction] = dp.enforced
            if not dp.enforced:
                continue  # the kernel passes an unenforced direction without looking at entries
            keys, ports = _direction_keys(ep_id, dp, problems, f"{key} {direction.value}")
            policy[direction].update(keys)
            redirect_ports |= ports
        endpoints[idx] = bm.Endpoint(
            endpoint_id=ep_id,
            identity=subject,
            enforce_ingress=enforced[PolicyDirection.INGRESS],
            enforce_egress=enforced[PolicyDirection.EGRESS],
        )
    return KernelPlan(
        identities=identities,
        ingress=policy[PolicyDirection.INGRESS],
        egress=policy[PolicyDirection.EGRESS],
        endpoints=endpoints,
        redirect_ports=frozenset(redirect_ports),
        problems=tuple(problems),
    )


# --- the transparent proxy's policy lookup ----------------------------------------------------------


class PolicyHolder:
    """The current compiled policy; replaced as a whole on every successful reload."""

    def __init__(self, pmap: PolicyMap) -> None:
        self.pmap = pmap
        self.generation = 0

    def replace(self, pmap: PolicyMap) -> None:
        self.pmap = pmap
        self.generation += 1


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveConnectionPolicy(ConnectionPolicy):
    """A connection's policy that follows reloads: each request is judged by the policy current then.

    The first lookup (made when the connection is accepted) picks the session; later requests on
    the same connection re-look the verdicts up once per policy generation.
    """

    resolve: Callable[[], ConnectionPolicy]

    def judge(self, request: L7Request | None, error: Reason | None = None) -> FlowResult:
        return self.resolve().judge(request, error)


@dataclass
class TransparentPolicy:
    """Per connection: source = the endpoint owning the client IP (else its ipcache identity),
    destination = the original destination's, port = the original destination port."""

    holder: PolicyHolder
    fqdn: FqdnCache
    own_ports: frozenset[int] = frozenset()  # the listeners' ports: never a valid original destination
    flows: FlowSink | None = None
    # What Metadata answers taught about each Kafka broker address (topic ids, the broker list that
    # refusals must carry), shared by that broker's connections.
    kafka: dict[tuple[str, int], KafkaLearned] = field(default_factory=dict)

    def _build(self, parser: ParserType, context: FlowContext, policy: ConnectionPolicy, dst: tuple[str, int]) -> Session | None:
        """The session for an L7 parser; None = no session for it here (the caller fails closed)."""
        match parser:
            case ParserType.HTTP:
                return HttpSession(context=context, policy=policy)
            case ParserType.DNS:
                return DnsTcpSession(context=context, policy=policy, fqdn=self.fqdn)
            case ParserType.KAFKA:
                return KafkaSession(context=context, policy=policy, learned=self.kafka.setdefault(dst, KafkaLearned()))
        return None

    def _lookup(self, pmap: PolicyMap, src: PolicyPeer, dst: PolicyPeer, port: int, proto: L4Proto) -> ConnectionPolicy:
        egress = pmap.lookup(src.endpoint, PolicyDirection.EGRESS, dst.identity, port, proto) if src.endpoint else None
        ingress = pmap.lookup(dst.endpoint, PolicyDirection.INGRESS, src.identity, port, proto) if dst.endpoint else None
        return ConnectionPolicy(egress=egress, ingress=ingress, src_endpoint=src.endpoint, dst_endpoint=dst.endpoint)

    def connection_policy(self, client_ip: str, dst_ip: str, port: int, proto: L4Proto) -> ConnectionPolicy:
        """The live policy of one connection (see LiveConnectionPolicy)."""
        holder = self.holder
        cache: list[tuple[int, ConnectionPolicy]] = []

        def resolve() -> ConnectionPolicy:
            gen = holder.generation
            if cache and cache[0][0] == gen:
                return cache[0][1]
            pmap = holder.pmap
            got = self._lookup(pmap, pmap.peer_from_ip(client_ip), pmap.peer_from_ip(dst_ip), port, proto)
            cache[:] = [(gen, got)]
            return got

        first = resolve()
        return LiveConnectionPolicy(
            egress=first.egress,
            ingress=first.ingress,
            src_endpoint=first.src_endpoint,
            dst_endpoint=first.dst_endpoint,
            resolve=resolve,
        )

    def context(self, info: ConnectionInfo) -> FlowContext:
        pmap = self.holder.pmap
        src = pmap.peer_from_ip(info.client[0])
        dst = pmap.peer_from_ip(info.original_dst[0])
        return FlowContext(
            source=flow_peer(pmap, src, info.client[0], info.client[1]),
            destination=flow_peer(pmap, dst, info.original_dst[0], info.original_dst[1]),
            traffic_direction=INGRESS if dst.endpoint is not None else EGRESS,
            transport=info.transport,
        )

    def session(self, info: ConnectionInfo) -> Session:
        """The server's SessionFactory: the session class follows the parser the policy names."""
        context = self.context(info)
        dst_ip, port = info.original_dst
        if port in self.own_ports and context.destination.pod_name == "":
            # a connection straight to our listener (not steered): proxying it would loop to ourselves
            return DeniedSession(context=context, reason="proxy_loop")
        policy = self.connection_policy(info.client[0], dst_ip, port, L4Proto.TCP)
        return choose_session(context, policy, lambda parser: self._build(parser, context, policy, (dst_ip, port)))

    def datagram(self, info: ConnectionInfo) -> DatagramSession | None:
        """The server's DatagramFactory: DNS over UDP judged per query; None = dropped at L3/L4."""
        context = self.context(info)
        policy = self.connection_policy(info.client[0], info.original_dst[0], info.original_dst[1], L4Proto.UDP)
        try:
            dropped = policy.is_dropped or policy.parser is not ParserType.DNS
        except ValueError:
            dropped = True
        if dropped:
            if self.flows is not None:
                self.flows.emit(
                    L3L4Flow(context=context, verdict=DROPPED, l7_type=REQUEST, l7={}, summary="UDP datagram dropped by policy",
                         time_ns=wall_clock_ns(), rule=policy.matched, reason="policy_denied")
                )
            return None
        return DnsDatagramSession(context=context, policy=policy, fqdn=self.fqdn)


def flow_peer(pmap: PolicyMap, peer: PolicyPeer, ip: str, port: int) -> Peer:
    """A flow record's view of one side: endpoint name and labels, or the identity's display name."""
    if peer.endpoint is not None and peer.endpoint in pmap.endpoints:
        ep = pmap.endpoints[peer.endpoint]
        labels = tuple(f"k8s:{k}={v}" for k, v in sorted(ep.labels.items()))
        return Peer(ip=ip, port=port, identity=peer.identity, namespace=ep.namespace, pod_name=ep.name, labels=labels)
    ident = pmap.identity(peer.identity)
    return Peer(ip=ip, port=port, identity=peer.identity, labels=(ident.display,) if ident is not None else ())


# --- drop events as flows ---------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class DropFlow(L3L4Flow):
    """A packet the kernel dropped at L3/L4: Hubble's `Type: L3_L4` record, `drop_reason_desc: POLICY_DENIED`
    (Hubble's name for a policy drop either way; the way is `traffic_direction`), the kernel's own
    reason (`ingress_denied`, `egress_denied`) in `membrane_reason`."""


# Hubble's drop_reason_desc for the kernel's reasons (flow.proto DropReason); others keep their own name.
_HUBBLE_DROP_REASON = {
    bm.DropReason.EGRESS_DENIED: "policy_denied",
    bm.DropReason.INGRESS_DENIED: "policy_denied",
    bm.DropReason.SPOOFED: "invalid_source_ip",
    bm.DropReason.FRAG_NOT_FOUND: "frag_not_found",  # Cilium's DROP_FRAG_NOT_FOUND (175)
    bm.DropReason.UNPARSEABLE: "invalid_packet_dropped",
}


def drop_flow(pmap: PolicyMap, event: bm.DropEvent) -> DropFlow:
    """The flow record of one kernel drop event."""
    src, dst = str(event.src), str(event.dst)
    sp, dp = pmap.peer_from_ip(src), pmap.peer_from_ip(dst)
    src_peer = flow_peer(pmap, PolicyPeer(event.src_identity, sp.endpoint, src), src, event.sport)
    dst_peer = flow_peer(pmap, PolicyPeer(event.dst_identity, dp.endpoint, dst), dst, event.dport)
    transport = {
        bm.IPPROTO_TCP: "TCP",
        bm.IPPROTO_UDP: "UDP",
        bm.IPPROTO_SCTP: "SCTP",
        bm.IPPROTO_ICMP: "ICMPv4",
        bm.IPPROTO_ICMPV6: "ICMPv6",
    }.get(event.proto, str(event.proto))
    direction = INGRESS if event.reason is bm.DropReason.INGRESS_DENIED else EGRESS
    kernel_reason = event.reason.name.lower()
    return DropFlow(
        context=FlowContext(source=src_peer, destination=dst_peer, traffic_direction=direction, transport=transport),
        verdict=DROPPED,
        l7_type=REQUEST,
        l7={},
        summary=f"{transport} {src}:{event.sport} -> {dst}:{event.dport} dropped ({kernel_reason})",
        time_ns=wall_clock_ns(),
        reason=_HUBBLE_DROP_REASON.get(event.reason, kernel_reason),
        membrane_reason=kernel_reason,
    )


# --- the FQDN cache that pushes learned names into the kernel before the answer is relayed ----------


class PushingFqdnCache(FqdnCache):
    """An FqdnCache that calls `on_learned` synchronously whenever a new (name, IP) pair appears.

    The DNS session records an answer before it relays it, so the kernel knows the IP before the
    client can use it (Cilium's DNS proxy holds the answer for the same reason).
    """

    def __init__(self, *, on_learned: Callable[[], None] | None = None, min_ttl_s: int = 0) -> None:
        super().__init__(min_ttl_s=min_ttl_s)
        self.on_learned = on_learned

    def add(self, name: str, ips: Iterable[str], *, ttl_s: float, now: float) -> None:
        before = self.generation
        super().add(name, ips, ttl_s=ttl_s, now=now)
        if self.generation != before and self.on_learned is not None:
            self.on_learned()


# --- listeners ------------------------------------------------------------------------------------


@dataclass
class Listeners:
    """The transparent wildcard listeners (IPv4 and IPv6, TCP and UDP), bound before anything attaches."""

    tcp4: socket.socket
    tcp6: socket.socket | None
    udp4: socket.socket
    udp6: socket.socket | None

    @property
    def ports(self) -> ProxyPorts:
        def port(s: socket.socket | None) -> int:
            return int(s.getsockname()[1]) if s is not None else 0

        return ProxyPorts(tcp4=port(self.tcp4), tcp6=port(self.tcp6), udp4=port(self.udp4), udp6=port(self.udp6))

    def close(self) -> None:
        for s in (self.tcp4, self.tcp6, self.udp4, self.udp6):
            if s is not None:
                s.close()


def _v6_listener(port: int, *, udp: bool) -> socket.socket | None:
    """A transparent `[::]` listener with IPV6_V6ONLY (the v4 one owns IPv4); None without IPv6."""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        if udp:
            s.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
        try:
            s.bind(("::", port))
        except OSError:
            s.bind(("::", 0))
        if not udp:
            s.listen(1024)
        s.setblocking(False)
    except OSError as e:
        s.close()
        log.warning("no IPv6 %s listener: %s", "UDP" if udp else "TCP", e)
        return None
    return s


def open_listeners() -> Listeners:
    """Bind the four transparent listeners on free ports. Raises OSError (e.g. without CAP_NET_ADMIN)."""
    tcp4 = listening_socket("0.0.0.0", 0, transparent=True, reuse_port=False)
    try:
        udp4 = listening_socket("0.0.0.0", 0, udp=True, transparent=True, reuse_port=False)
    except BaseException:
        tcp4.close()
        raise
    return Listeners(
        tcp4=tcp4,
        tcp6=_v6_listener(tcp4.getsockname()[1], udp=False),
        udp4=udp4,
        udp6=_v6_listener(udp4.getsockname()[1], udp=True),
    )


# --- the agent --------------------------------------------------------------------------------------


class InvalidPolicy(Exception):
    """The policy paths or the endpoints file hold errors; the message lists them, one per line."""


def load(config: AgentConfig) -> tuple[tuple[Policy, ...], Endpoints]:
    """Read every policy and the endpoints file. Raises InvalidPolicy (with every problem) or PathProblem."""
    loaded = read_policies(config.policies)
    try:
        endpoints = read_endpoints(config.endpoints)
    except EndpointsError as e:
        raise InvalidPolicy(str(e)) from None
    if loaded.errors:
        raise InvalidPolicy("\n".join(str(e) for e in loaded.errors))
    return tuple(loaded.policies), endpoints


def node_addresses() -> list[str]:
    """The host's own interface addresses (all devices of this network namespace), for the ipcache's
    `host` entries. Kubernetes Node objects will add the node's InternalIPs later. [] on failure."""
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            return sorted({str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS")})
    except OSError as e:
        log.warning("cannot read the node's addresses: %s", e)
        return []


def _ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _watched_files(config: AgentConfig) -> dict[str, tuple[float, int]]:
    """path -> (mtime, size) of every watched file (a directory's file list counts too)."""
    out: dict[str, tuple[float, int]] = {}
    paths = [config.endpoints]
    with contextlib.suppress(PathProblem):
        paths += [str(p) for _src, p in policy_files(config.policies)]
    for raw in config.policies:
        paths.append(raw)  # a directory's own mtime changes when files come and go
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out[p] = (-1.0, -1)
            continue
        out[p] = (st.st_mtime, st.st_size)
    return out


class Agent:
    """One node agent: owns the Steering, the proxy, the policy state and the status file."""

    def __init__(self, config: AgentConfig, *, out: IO[str] = sys.stdout) -> None:
        self.config = config
        self.out = out
        self.fqdn = PushingFqdnCache(on_learned=self._on_learned)
        self.holder: PolicyHolder | None = None
        self.endpoints = Endpoints()
        self.steering: Steering | None = None
        self.listeners: Listeners | None = None
        self.proxy: Proxy | None = None
        self.sink: FlowSink | None = None
        self.metrics = Metrics()
        self.endpoint_ids: dict[str, int] = {}
        self.attached: dict[str, int] = {}  # endpoint key -> ifindex
        self.waiting: dict[str, str] = {}  # endpoint key -> why it is not attached
        self.plan: KernelPlan | None = None
        self.errors: list[str] = []  # problems of the last reload attempt (the running policy is older)
        self.warnings: list[str] = []
        self.ready = False
        self.reloads = 0
        self.drops = 0
        self.started = time.time()
        self._mtimes: dict[str, tuple[float, int]] = {}
        self._streams: list[IO[str]] = []
        self._inputs: tuple[tuple[Policy, ...], Endpoints] = ((), Endpoints())  # the last good policies and endpoints
        self._compiled_learned: Mapping[str, frozenset[str]] = {}
        self.workers: list[WorkerHandle] = []
        # pyroute2's IPRoute runs an asyncio loop of its own, which cannot nest in ours: every call
        # into bpf/ happens on this one thread, synchronously (the proxy waits, as it must for toFQDNs).
        self._kx = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mbr-kernel")

    def _kernel(self, fn: Callable[..., T], *args: Any) -> T:
        return self._kx.submit(fn, *args).result()

    # --- policy -> kernel ---------------------------------------------------------------------
    def _learned(self) -> Mapping[str, frozenset[str]]:
        return self.fqdn.snapshot(now=time.monotonic())

    def _resolve_interfaces(self, endpoints: Endpoints) -> dict[str, int]:
        wanted: dict[str, int] = {}
        self.waiting = {}
        for ep in endpoints.endpoints:
            if ep.interface is None:
                continue
            idx = _ifindex(ep.interface)
            if idx is None:
                self.waiting[ep.key] = f"interface {ep.interface} not found"
                continue
            wanted[ep.key] = idx
            if ep.key not in self.endpoint_ids:
                self.endpoint_ids[ep.key] = max(self.endpoint_ids.values(), default=0) + 1
        return wanted

    def apply(self, pmap: PolicyMap, endpoints: Endpoints) -> None:
        """Write `pmap` into the kernel and attach/detach interfaces, in a never-widening order."""
        st = self.steering
        assert st is not None
        wanted = self._resolve_interfaces(endpoints)
        plan = plan_kernel(pmap, wanted, self.endpoint_ids, node_addresses())
        m = st.maps
        old = self.plan
        old_ids = old.identities if old is not None else {}
        old_eps = old.endpoints if old is not None else {}
        # 1. new and changed identities (an endpoint's addresses gain their ifindex before it is registered)
        for net, (ident, idx) in plan.identities.items():
            if old_ids.get(net) != (ident, idx):
                m.set_identity(net, ident, ifindex=idx)
        # 2. the whole policy, one atomic flip
        m.set_policy(ingress=plan.ingress, egress=plan.egress)
        # 3. endpoints, then attachments
        for idx, ep in plan.endpoints.items():
            if old_eps.get(idx) != ep:
                m.set_endpoint(idx, ep)
        for key, idx in wanted.items():
            if self.attached.get(key) != idx:
                if key in self.attached:
                    st.detach(self.attached.pop(key))
                try:
                    st.attach(idx)
                except AttachError as e:  # e.g. the veth went away since we looked: retried on the next poll
                    log.warning("endpoint %s: %s", key, e)
                    self.waiting[key] = str(e)
                    continue
                self.attached[key] = idx
        # 4. removals: detach, forget endpoints, then identities nobody uses any more
        for key in [k for k in self.attached if k not in wanted]:
            idx = self.attached.pop(key)
            st.detach(idx)
        for idx in old_eps:
            if idx not in plan.endpoints:
                m.delete_endpoint(idx)
        for net in old_ids:
            if net not in plan.identities:
                m.delete_identity(net)
        if st.sockmap is not None:
            st.sockmap.set_ports(plan.redirect_ports)
        self.plan = plan
        self.endpoints = endpoints
        self.warnings = [str(e) for e in pmap.errors] + list(plan.problems)
        for w in self.warnings:
            log.warning("%s", w)
        if self.holder is None:
            self.holder = PolicyHolder(pmap)
        else:
            self.holder.replace(pmap)

    def reload(self, *, reason: str) -> bool:
        """Re-read and recompile; on success apply it. An invalid edit is reported; the last good policy stays."""
        try:
            self._inputs = load(self.config)
        except (InvalidPolicy, PathProblem) as e:
            self.errors = str(e).splitlines()
            for line in self.errors:
                log.error("policy reload (%s) rejected, keeping the last good policy: %s", reason, line)
            self.write_status()
            return False
        self.errors = []
        self.recompile(reason=reason)
        return True

    def recompile(self, *, reason: str) -> None:
        """Compile the last good inputs with what DNS taught us now, and apply the result."""
        policies, endpoints = self._inputs
        learned = self._learned()
        pmap = compile_policy(policies, endpoints, learned, allow_localhost=self.config.allow_localhost)
        self._kernel(self.apply, pmap, endpoints)
        self._compiled_learned = learned
        self.reloads += 1
        log.info("policy applied (%s): %d endpoints attached", reason, len(self.attached))
        self._broadcast()
        self.write_status()

    # --- worker processes (--workers N) ---------------------------------------------------------
    def _broadcast(self) -> None:
        """Tell every worker to recompile (re-reading the files) with the learned names we hold now."""
        msg = {"type": "policy", "learned": {k: sorted(v) for k, v in self._compiled_learned.items()}}
        for w in self.workers:
            w.send(msg)

    async def _start_workers(self, n: int, ports: ProxyPorts) -> None:
        assert self.listeners is not None
        loop = asyncio.get_running_loop()
        for i in range(1, n):
            w = WorkerHandle.spawn(i, self.config, self.listeners, ports, self._compiled_learned)
            self.workers.append(w)
            loop.add_reader(w.ctl.fileno(), self._from_worker, w)
        deadline = time.monotonic() + 30
        while any(not w.ready for w in self.workers):
            if time.monotonic() > deadline or any(w.proc.poll() is not None for w in self.workers):
                raise OSError("a proxy worker did not start")
            await asyncio.sleep(0.02)

    def _from_worker(self, w: WorkerHandle) -> None:
        for msg in w.receive():
            if msg.get("type") == "ready":
                w.ready = True
            elif msg.get("type") == "learned":
                # Recompiles and broadcasts (through _on_learned) before the worker relays the answer.
                self.fqdn.add(str(msg["name"]), [str(ip) for ip in msg["ips"]], ttl_s=float(msg["ttl"]), now=time.monotonic())
                w.send({"type": "ack"})

    async def _stop_workers(self) -> None:
        loop = asyncio.get_running_loop()
        for w in self.workers:
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(w.ctl.fileno())
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                await loop.run_in_executor(None, w.proc.wait, self.config.drain_timeout_s + 5)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.ctl.close()
        self.workers.clear()

    def _on_learned(self) -> None:
        """A DNS answer named a new IP: recompile with it and push it (called before the answer is relayed)."""
        if self.steering is None or self.holder is None:
            return
        self.recompile(reason="dns")

    # --- status ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The status document `membrane status` and `membrane endpoint list` print."""
        pmap = self.holder.pmap if self.holder is not None else None
        rows = []
        for ep in self.endpoints.endpoints:
            ident = pmap.identity_of(ep.key) if pmap is not None else None
            enforced = {
                d.value: (pmap.direction(ep.key, d).enforced if pmap is not None else False) for d in PolicyDirection
            }
            if ep.key in self.attached:
                state = "ready"
            elif ep.interface is None:
                state = "not-local"
            else:
                state = "waiting-for-interface"
            rows.append(
                {
                    "id": self.endpoint_ids.get(ep.key, 0),
                    "name": ep.name,
                    "namespace": ep.namespace,
                    "identity": ident,
                    "labels": [f"k8s:{k}={v}" for k, v in sorted(ep.labels.items())],
                    "ipv4": [ip for ip in ep.ips if ":" not in ip],
                    "ipv6": [ip for ip in ep.ips if ":" in ip],
                    "interface": ep.interface,
                    "ifindex": self.attached.get(ep.key),
                    "ingress_enforcement": enforced["ingress"],
                    "egress_enforcement": enforced["egress"],
                    "status": state,
                }
            )
        ports = self.listeners.ports if self.listeners is not None else ProxyPorts()
        drops: dict[str, int] = {}
        sockmap_stats: dict[str, int] = {}
        if self.steering is not None and self.ready:
            counts = self._kernel(self.steering.maps.drop_counts)
            drops = {r.name.lower(): n for r, n in counts.items()}
            if self.steering.sockmap is not None:
                sockmap_stats = dict(self._kernel(self.steering.sockmap.stats))
        return {
            "pid": os.getpid(),
            "state": "ready" if self.ready else "starting",
            "started": self.started,
            "updated": time.time(),
            "policies": list(self.config.policies),
            "endpoints_file": self.config.endpoints,
            "proxy_ports": dataclasses.asdict(ports),
            "sockmap": self.config.sockmap,
            "sockmap_stats": sockmap_stats,
            "reloads": self.reloads,
            "errors": self.errors,
            "warnings": self.warnings,
            "learned_fqdns": {k: sorted(v) for k, v in self._learned().items()},
            "drops": drops,
            "flows": self.sink.written if self.sink is not None else 0,
            "endpoints": rows,
        }

    def write_status(self) -> None:
        path = self.config.status_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.status(), indent=2) + "\n")
            tmp.replace(path)
        except OSError as e:
            log.warning("cannot write %s: %s", path, e)

    # --- lifetime ---------------------------------------------------------------------------------
    async def run(self) -> int:
        """Run until SIGTERM/SIGINT. Returns the exit status (0 after a clean stop)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            self._inputs = load(self.config)
        except InvalidPolicy as e:
            for line in str(e).splitlines():
                print(f"membrane run: {line}", file=sys.stderr)
            return 1
        except PathProblem as e:
            print(f"membrane run: {e}", file=sys.stderr)
            return 2
        for path in self.config.flows:  # an unwritable --flows fails before the kernel is touched
            if path == "-":
                continue
            try:
                open(path, "a", encoding="utf-8").close()
            except OSError as e:
                print(f"membrane run: cannot open --flows {path}: {e.strerror}", file=sys.stderr)
                return 2
        self._mtimes = _watched_files(self.config)
        with contextlib.ExitStack() as stack:
            stack.callback(self._remove_status)
            self.listeners = open_listeners()
            stack.callback(self.listeners.close)
            ports = self.listeners.ports
            # --- restart wiring (issue 13 item 6): adopt the pinned state, replace in place, keep on stop
            steering = Steering(
                proxy_ports=ports, sockmap=self.config.sockmap, sockmap_ports=(), pin_dir=self.config.bpf_pin_dir
            )
            self.steering = self._kernel(steering.__enter__)
            stack.callback(self._kernel, lambda: steering.close(keep=True))  # SIGTERM: the kernel keeps enforcing
            stack.callback(setattr, self, "steering", None)
            self._adopt_endpoint_ids(steering)
            self._kernel(self.apply, compile_policy(*self._inputs, allow_localhost=self.config.allow_localhost), self._inputs[1])
            for item in self._kernel(steering.cleanup_stale):  # only now that our programs are in place
                log.warning("removed stale %s", item)
            # --- end of restart wiring
            self._streams = _open_streams(self.config.flows)
            stack.callback(_close_streams, self._streams)
            self.sink = FlowSink(self._streams)
            assert self.holder is not None
            tp = TransparentPolicy(
                holder=self.holder,
                fqdn=self.fqdn,
                own_ports=frozenset({ports.tcp4, ports.tcp6, ports.udp4, ports.udp6}),
                flows=self.sink,
            )
            self.proxy = Proxy(
                config=ProxyConfig(transparent=True, drain_timeout_s=self.config.drain_timeout_s),
                factory=tp.session,
                upstream=None,
                flows=self.sink,
                metrics=self.metrics,
                datagram_factory=tp.datagram,
            )
            tcp = [s for s in (self.listeners.tcp4, self.listeners.tcp6) if s is not None]
            udp = [s for s in (self.listeners.udp4, self.listeners.udp6) if s is not None]
            await self.proxy.start(tcp, udp)
            try:
                await self._start_workers(self.config.workers, ports)
            except BaseException:
                await self._stop_workers()
                await self.proxy.drain()
                raise
            self.ready = True
            self.write_status()
            print(
                f"membrane agent ready: {len(self.attached)} endpoint(s) attached, proxy tcp {ports.tcp4}/{ports.tcp6} "
                f"udp {ports.udp4}/{ports.udp6}, {1 + len(self.workers)} worker(s)"
                f"{', sockmap on' if self.config.sockmap else ''}",
                file=self.out,
                flush=True,
            )
            try:
                await self._loop(stop)
            finally:
                self.ready = False
                log.info("stopping: draining %d connections", len(self.proxy.connections))
                await asyncio.gather(self._stop_workers(), self.proxy.drain())
                self._read_drops()
        return 0

    async def _loop(self, stop: asyncio.Event) -> None:
        last_poll = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), EVENTS_S)
            if stop.is_set():
                break
            try:
                self._read_drops()
                now = time.monotonic()
                if now - last_poll >= POLL_S:
                    last_poll = now
                    self._poll_files()
            except Exception:  # one bad round must not take the node's enforcement down
                log.exception("agent loop error")

    def _adopt_endpoint_ids(self, steering: Steering) -> None:
        """Keep the endpoint ids of adopted endpoints: the adopted policy is keyed by them, and a
        renumbered endpoint would be judged by another endpoint's entries until it is rewritten."""
        adopted = self._kernel(steering.maps.endpoints)
        for ep in self._inputs[1].endpoints:
            idx = _ifindex(ep.interface) if ep.interface is not None else None
            if idx is not None and idx in adopted and adopted[idx].endpoint_id not in self.endpoint_ids.values():
                self.endpoint_ids[ep.key] = adopted[idx].endpoint_id

    def _poll_files(self) -> None:
        mtimes = _watched_files(self.config)
        changed = mtimes != self._mtimes
        self._mtimes = mtimes
        missing = any(
            ep.interface is not None and (ep.key not in self.attached or _ifindex(ep.interface) != self.attached[ep.key])
            for ep in self.endpoints.endpoints
        )
        if changed:
            self.reload(reason="file change")
        elif self._learned() != self._compiled_learned:
            self.recompile(reason="dns ttl expiry")
        elif missing and self.holder is not None:
            self._kernel(self.apply, self.holder.pmap, self.endpoints)  # an interface came or went
            self.write_status()
        else:
            self.write_status()

    def _read_drops(self) -> None:
        if self.steering is None or self.holder is None or self.sink is None:
            return
        for event in self._kernel(self.steering.read_drop_events):
            self.drops += 1
            self.sink.emit(drop_flow(self.holder.pmap, event))

    def _remove_status(self) -> None:
        with contextlib.suppress(OSError):
            self.config.status_path.unlink()


def _open_streams(paths: Sequence[str]) -> list[IO[str]]:
    streams: list[IO[str]] = []
    for path in paths:
        if path == "-":
            streams.append(sys.stdout)
        else:
            streams.append(open(path, "a", buffering=1, encoding="utf-8"))  # noqa: SIM115 - closed by _close_streams
    return streams


def _close_streams(streams: list[IO[str]]) -> None:
    for s in streams:
        if s is not sys.stdout:
            with contextlib.suppress(OSError):
                s.close()


def run_agent(config: AgentConfig) -> int:
    """`membrane run`: returns 0 after a clean stop, 1 on invalid input, 2 on usage or attach errors."""
    import uvloop
    from membrane.bpf.errors import BpfLoadError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if os.geteuid() != 0:
        print("membrane run: needs root (eBPF programs, tc, policy routing, IP_TRANSPARENT)", file=sys.stderr)
        return 2
    agent = Agent(config)
    try:
        return uvloop.run(agent.run())
    except (BpfLoadError, AttachError, OSError) as e:
        print(f"membrane run: {e}", file=sys.stderr)
        return 2
    finally:
        agent._kx.shutdown(wait=True)


# --- proxy worker processes -------------------------------------------------------------------------
#
# With --workers N the agent process runs worker 0 (and owns every kernel object); workers 1..N-1 are
# fresh interpreters that share the listening sockets (passed as fds) and only proxy. A control
# socket per worker carries JSON lines: agent -> worker {"type": "policy", "learned": {...}} (recompile
# from the files with these learned names) and {"type": "ack"}; worker -> agent {"type": "ready"} and
# {"type": "learned", name, ips, ttl}. A worker that learns a DNS name waits for the ack, so the kernel
# knows the IP before the answer is relayed, as in the single-process agent. A worker whose control
# socket closes (the agent died) drains and exits, so a crashed agent's L7 ports fail closed.


class WorkerHandle:
    """The agent's end of one worker process."""

    def __init__(self, index: int, proc: subprocess.Popen[bytes], ctl: socket.socket) -> None:
        self.index = index
        self.proc = proc
        self.ctl = ctl
        self.ready = False
        self._buf = b""

    @classmethod
    def spawn(
        cls, index: int, config: AgentConfig, listeners: Listeners, ports: ProxyPorts, learned: Mapping[str, Iterable[str]]
    ) -> WorkerHandle:
        ours, theirs = socket.socketpair()
        fds = {
            "tcp": [s.fileno() for s in (listeners.tcp4, listeners.tcp6) if s is not None],
            "udp": [s.fileno() for s in (listeners.udp4, listeners.udp6) if s is not None],
        }
        spec = {
            "index": index,
            "policies": list(config.policies),
            "endpoints": config.endpoints,
            "flows": list(config.flows),
            "drain_timeout_s": config.drain_timeout_s,
            "ctl": theirs.fileno(),
            "fds": fds,
            "own_ports": sorted({ports.tcp4, ports.tcp6, ports.udp4, ports.udp6}),
            "learned": {k: sorted(v) for k, v in learned.items()},
        }
        pass_fds = (theirs.fileno(), *fds["tcp"], *fds["udp"])
        proc = subprocess.Popen(
            [sys.executable, "-m", "membrane.control.agent", json.dumps(spec)],
            pass_fds=pass_fds,
        )
        theirs.close()
        ours.setblocking(False)
        return cls(index, proc, ours)

    def send(self, msg: Mapping[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        self.ctl.setblocking(True)
        try:
            self.ctl.sendall(data)
        except OSError as e:
            log.warning("worker %d: %s", self.index, e)
        finally:
            self.ctl.setblocking(False)

    def receive(self) -> list[dict[str, Any]]:
        try:
            chunk = self.ctl.recv(65536)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            chunk = b""
        if not chunk:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self.ctl.fileno())
            return []
        self._buf, messages = split_json_lines(self._buf, chunk)
        return messages


def split_json_lines(buffered: bytes, chunk: bytes) -> tuple[bytes, list[dict[str, Any]]]:
    """Split a control-socket stream into JSON messages: returns (the unfinished tail, the messages).

    A line that is not JSON is skipped (the peer is our own process; a bad line must not kill the link).
    """
    *lines, tail = (buffered + chunk).split(b"\n")
    messages = []
    for line in lines:
        with contextlib.suppress(ValueError):
            messages.append(json.loads(line))
    return tail, messages


class _Control:
    """A worker's end of its control socket: line-buffered JSON, with a blocking request/ack for learned names."""

    def __init__(self, sock: socket.socket, on_policy: Callable[[Mapping[str, Iterable[str]]], None]) -> None:
        self.sock = sock
        self.on_policy = on_policy
        self.closed = asyncio.Event()
        self._buf = b""

    def send(self, msg: Mapping[str, Any]) -> None:
        self.sock.setblocking(True)
        try:
            self.sock.sendall((json.dumps(msg) + "\n").encode())
        finally:
            self.sock.setblocking(False)

    def _handle(self, msg: Mapping[str, Any]) -> bool:
        """Process one message; True when it was an ack."""
        if msg.get("type") == "policy":
            self.on_policy(msg.get("learned") or {})
        return msg.get("type") == "ack"

    def _lines(self, chunk: bytes) -> list[dict[str, Any]]:
        self._buf, messages = split_json_lines(self._buf, chunk)
        return messages

    def readable(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.closed.set()  # the agent is gone: stop proxying (fail closed)
            return
        for msg in self._lines(chunk):
            self._handle(msg)

    def learned(self, name: str, ips: Sequence[str], ttl_s: float, timeout_s: float = 2.0) -> None:
        """Report a learned name and wait (blocking) until the agent has pushed it into the kernel."""
        self.send({"type": "learned", "name": name, "ips": list(ips), "ttl": ttl_s})
        self.sock.settimeout(timeout_s)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                if any([self._handle(m) for m in self._lines(chunk)]):
                    return
        except OSError as e:
            log.warning("no ack for learned name %s: %s", name, e)
        finally:
            self.sock.setblocking(False)


class _ReportingFqdnCache(FqdnCache):
    """A worker's FqdnCache: a new (name, IP) pair goes to the agent, which pushes it to the kernel first."""

    def __init__(self) -> None:
        super().__init__()
        self.control: _Control | None = None

    def add(self, name: str, ips: Iterable[str], *, ttl_s: float, now: float) -> None:
        ips = list(ips)
        before = self.generation
        super().add(name, ips, ttl_s=ttl_s, now=now)
        if self.generation != before and self.control is not None:
            self.control.learned(name, ips, ttl_s)


def worker_main(spec_json: str) -> int:
    """Entry point of a proxy worker process (started by the agent; not a user command)."""
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    spec = json.loads(spec_json)
    return uvloop.run(_worker(spec))


async def _worker(spec: dict[str, Any]) -> int:
    loop = asyncio.get_running_loop()
    config = AgentConfig(
        policies=tuple(spec["policies"]),
        endpoints=spec["endpoints"],
        flows=tuple(spec["flows"]),
        drain_timeout_s=float(spec["drain_timeout_s"]),
    )
    inputs = load(config)
    holder = PolicyHolder(compile_policy(*inputs, spec["learned"]))

    def on_policy(learned: Mapping[str, Iterable[str]]) -> None:
        nonlocal inputs
        try:
            inputs = load(config)
        except (InvalidPolicy, PathProblem) as e:
            log.warning("worker %d keeps its last good policy: %s", spec["index"], e)
        holder.replace(compile_policy(*inputs, learned))

    ctl_sock = socket.socket(fileno=int(spec["ctl"]))
    ctl_sock.setblocking(False)
    control = _Control(ctl_sock, on_policy)
    fqdn = _ReportingFqdnCache()
    fqdn.control = control
    streams = _open_streams(config.flows)
    sink = FlowSink(streams)
    tcp = [socket.socket(fileno=fd) for fd in spec["fds"]["tcp"]]
    udp = [socket.socket(fileno=fd) for fd in spec["fds"]["udp"]]
    tp = TransparentPolicy(holder=holder, fqdn=fqdn, own_ports=frozenset(spec["own_ports"]), flows=sink)
    proxy = Proxy(
        config=ProxyConfig(transparent=True, drain_timeout_s=config.drain_timeout_s),
        factory=tp.session,
        upstream=None,
        flows=sink,
        datagram_factory=tp.datagram,
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await proxy.start(tcp, udp)
    loop.add_reader(ctl_sock.fileno(), control.readable)
    control.send({"type": "ready"})
    closed = asyncio.ensure_future(control.closed.wait())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([closed, stopped], return_when=asyncio.FIRST_COMPLETED)
    for task in (closed, stopped):
        task.cancel()
    await proxy.drain()
    _close_streams(streams)
    return 0


if __name__ == "__main__":  # a worker process, started by WorkerHandle.start
    sys.exit(worker_main(sys.argv[1]))
