"""One wiring for gateway and transparent modes: a peer resolver finds a connection's peers, one
session factory turns peers + policy into a session.

Owns the per-connection policy lookup (egress of the source endpoint, ingress of the destination),
the flow record's view of each peer, the choice of session by the parser the policy names, and the
Kafka cluster memory that sessions to one broker address share. The two modes differ only in the
resolver: `FixedPeers` (gateway: `--dst`, `--src` or the client's IP, the upstream's port) and
`IpcachePeers` (transparent: the client address and the original destination through the ipcache).
Never does I/O and never knows where the policy came from; fails closed on every doubt.

Rules: TCP with no L7 rules on the port is relayed as is; with L7 rules it gets the parser's session;
dropped, conflicting or session-less ports are closed (`DeniedSession`). UDP follows Cilium: an L4
allow with no L7 rules is plain UDP (relayed untouched, not read as DNS), DNS rules give the DNS
session, anything else is dropped with an L3_L4 flow.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from membrane.parsers.events import Reason
from membrane.policies import FlowResult, L4Proto, ParserType, PolicyDirection, PolicyMap
from membrane.policies.compile import Peer as PolicyPeer
from membrane.policies.flow import forget_memo
from membrane.proxy.flows import DROPPED, EGRESS, INGRESS, REQUEST, FlowContext, FlowSink, L3L4Flow, Peer
from membrane.proxy.server import Address, ConnectionInfo
from membrane.proxy.session import (
    ConnectionPolicy,
    DatagramSession,
    DeniedSession,
    L7Request,
    PassThroughDatagramSession,
    Session,
    choose_session,
    wall_clock_ns,
)
from membrane.proxy.session_dns import DnsDatagramSession, DnsTcpSession
from membrane.proxy.session_http2 import HttpSession, ResetLedger
from membrane.proxy.session_kafka import KAFKA_FRAME_HEADROOM_BYTES, KafkaLearned, KafkaSession

MAX_KAFKA_CLUSTERS = 4096  # broker addresses whose Metadata lessons are kept (least recently used goes)


class LivePolicy:
    """The current compiled policy; replaced as a whole on every successful reload (never mutated)."""

    def __init__(self, pmap: PolicyMap) -> None:
        self.pmap = pmap
        self.generation = 0

    def replace(self, pmap: PolicyMap) -> None:
        self.pmap = pmap
        self.generation += 1
        forget_memo()  # its entries would keep the old policy's verdicts alive


@dataclass(frozen=True, slots=True, kw_only=True)
class Peers:
    """Who one connection is between, as the policy sees them and as the flow record shows them."""

    src: PolicyPeer
    dst: PolicyPeer
    src_addr: Address
    dst_addr: Address  # the address the flow shows (the upstream in gateway mode, the original destination otherwise)
    port: int  # the port the policy is looked up for
    refusal: str | None = None  # set: the connection is refused before any lookup (e.g. "proxy_loop")


class PeerResolver(Protocol):
    """How a connection's peers are found; the only part in which gateway and transparent modes differ."""

    def peers(self, pmap: PolicyMap, info: ConnectionInfo) -> Peers: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class FixedPeers:
    """Gateway mode: the destination is `--dst` at the upstream's address; the source is `--src`, else
    the endpoint owning the client's IP, else what the ipcache says (usually `world`)."""

    dst: str  # "ns/name"
    upstream: Address
    src: str | None = None  # "ns/name"
    port: int | None = None  # the policy port judged (`--dport`); None = the upstream's port

    def check(self, pmap: PolicyMap) -> None:
        """Raises ValueError naming the flag whose endpoint is not in the endpoints file."""
        if self.dst not in pmap.endpoints:
            raise ValueError(f"--dst {self.dst}: no such endpoint in the endpoints file")
        if self.src is not None and self.src not in pmap.endpoints:
            raise ValueError(f"--src {self.src}: no such endpoint in the endpoints file")

    def peers(self, pmap: PolicyMap, info: ConnectionInfo) -> Peers:
        src = pmap.peer_from_endpoint(self.src) if self.src is not None else pmap.peer_from_ip(info.client[0])
        return Peers(
            src=src, dst=pmap.peer_from_endpoint(self.dst), src_addr=info.client, dst_addr=self.upstream,
            port=self.port if self.port is not None else self.upstream[1],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class IpcachePeers:
    """Transparent mode: source = the endpoint owning the client IP (else its ipcache identity),
    destination = the original destination's, port = the original destination port."""

    own_ports: frozenset[int] = frozenset()  # the listeners' ports: never a valid original destination

    def peers(self, pmap: PolicyMap, info: ConnectionInfo) -> Peers:
        src = pmap.peer_from_ip(info.client[0])
        dst = pmap.peer_from_ip(info.original_dst[0])
        # A connection straight to our listener (not steered): proxying it would loop to ourselves.
        loop = info.original_dst[1] in self.own_ports and dst.endpoint is None
        return Peers(
            src=src, dst=dst, src_addr=info.client, dst_addr=info.original_dst, port=info.original_dst[1],
            refusal="proxy_loop" if loop else None,
        )


def flow_peer(pmap: PolicyMap, peer: PolicyPeer, addr: Address) -> Peer:
    """A flow record's view of one side: endpoint name and labels, or the identity's display name."""
    ip, port = addr
    ep = pmap.endpoints.get(peer.endpoint) if peer.endpoint is not None else None
    if ep is not None:
        labels = tuple(f"k8s:{k}={v}" for k, v in sorted(ep.labels.items()))
        return Peer(ip=ip, port=port, identity=peer.identity, namespace=ep.namespace, pod_name=ep.name, labels=labels)
    ident = pmap.identity(peer.identity)
    return Peer(ip=ip, port=port, identity=peer.identity, labels=(ident.display,) if ident is not None else ())


def connection_policy(pmap: PolicyMap, peers: Peers, proto: L4Proto) -> ConnectionPolicy:
    """The two L3/L4 verdicts of one connection: the source's egress and the destination's ingress."""
    src, dst, port = peers.src, peers.dst, peers.port
    egress = pmap.lookup(src.endpoint, PolicyDirection.EGRESS, dst.identity, port, proto) if src.endpoint else None
    ingress = pmap.lookup(dst.endpoint, PolicyDirection.INGRESS, src.identity, port, proto) if dst.endpoint else None
    return ConnectionPolicy(egress=egress, ingress=ingress, src_endpoint=src.endpoint, dst_endpoint=dst.endpoint)


# Not slots=True: an interpreted slotted dataclass cannot subclass the mypyc-compiled ConnectionPolicy (its
# slots would shadow the compiled fields, which compiled code then finds unset; native/modules.txt).
@dataclass(frozen=True, kw_only=True)
class LiveConnectionPolicy(ConnectionPolicy):
    """A connection's policy that follows reloads: each request is judged by the policy current then.

    The first lookup (made when the connection is accepted) picks the session; later requests on
    the same connection re-look the verdicts up once per policy generation.
    """

    resolve: Callable[[], ConnectionPolicy]

    def judge(self, request: L7Request | None, error: Reason | None = None) -> FlowResult:
        return self.resolve().judge(request, error)


class KafkaMemory:
    """What Metadata answers taught about each Kafka broker address (topic ids, the broker list that
    refusals must carry), shared by that address's connections; at most MAX_KAFKA_CLUSTERS addresses."""

    def __init__(self, max_clusters: int = MAX_KAFKA_CLUSTERS) -> None:
        self.max_clusters = max_clusters
        self._by_addr: OrderedDict[Address, KafkaLearned] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_addr)

    def learned(self, addr: Address) -> KafkaLearned:
        got = self._by_addr.get(addr)
        if got is None:
            got = self._by_addr[addr] = KafkaLearned()
            while len(self._by_addr) > self.max_clusters:
                self._by_addr.popitem(last=False)
        else:
            self._by_addr.move_to_end(addr)
        return got


@dataclass
class SessionFactory:
    """The server's SessionFactory and DatagramFactory, for either mode (the resolver decides which)."""

    policy: LivePolicy
    resolver: PeerResolver
    flows: FlowSink | None = None  # where a dropped UDP peer's L3_L4 flow goes (TCP drops are the session's)
    follow_reloads: bool = False  # True: each request is judged by the policy current then (the agent)
    kafka: KafkaMemory = field(default_factory=KafkaMemory)
    resets: ResetLedger = field(default_factory=ResetLedger)  # HTTP/2 rapid reset summed per client address
    # The per-connection buffer bound (--max-buffer-bytes); a Kafka request frame is judged whole, so it
    # may be buffered up to this plus the headroom of a max.request.size batch, never Kafka's 100 MiB.
    max_buffer_bytes: int = 1 << 20

    def context(self, pmap: PolicyMap, peers: Peers, transport: str) -> FlowContext:
        return FlowContext(
            source=flow_peer(pmap, peers.src, peers.src_addr),
            destination=flow_peer(pmap, peers.dst, (peers.dst_addr[0], peers.port)),  # the judged port (gateway --dport)
            traffic_direction=INGRESS if peers.dst.endpoint is not None else EGRESS,
            transport=transport,
        )

    def _policy(self, info: ConnectionInfo, proto: L4Proto) -> tuple[Peers, ConnectionPolicy]:
        holder = self.policy
        pmap = holder.pmap
        peers = self.resolver.peers(pmap, info)
        first = connection_policy(pmap, peers, proto)
        if not self.follow_reloads:
            return peers, first
        cache = [(holder.generation, first)]

        def resolve() -> ConnectionPolicy:
            gen = holder.generation
            if cache[0][0] != gen:
                pmap = holder.pmap
                cache[0] = (gen, connection_policy(pmap, self.resolver.peers(pmap, info), proto))
            return cache[0][1]

        live = LiveConnectionPolicy(
            egress=first.egress, ingress=first.ingress, src_endpoint=first.src_endpoint, dst_endpoint=first.dst_endpoint,
            resolve=resolve,
        )
        return peers, live

    def session(self, info: ConnectionInfo) -> Session:
        """The session of one TCP connection: the session class follows the parser the policy names."""
        pmap = self.policy.pmap
        peers, policy = self._policy(info, L4Proto.TCP)
        context = self.context(pmap, peers, info.transport)
        if peers.refusal is not None:
            return DeniedSession(context=context, reason=peers.refusal)

        def build(parser: ParserType) -> Session | None:
            match parser:
                case ParserType.HTTP:
                    return HttpSession(context=context, policy=policy, resets=self.resets)
                case ParserType.DNS:
                    return DnsTcpSession(context=context, policy=policy)
                case ParserType.KAFKA:
                    return KafkaSession(context=context, policy=policy, learned=self.kafka.learned(peers.dst_addr),
                                        max_frame_bytes=self.max_buffer_bytes + KAFKA_FRAME_HEADROOM_BYTES)
            return None

        return choose_session(context, policy, build)

    def datagram(self, info: ConnectionInfo) -> DatagramSession | None:
        """The session of one UDP peer pair; None = dropped at L3/L4 (an L3_L4 flow says so)."""
        pmap = self.policy.pmap
        peers, policy = self._policy(info, L4Proto.UDP)
        context = self.context(pmap, peers, info.transport)
        try:
            parser = policy.parser
        except ValueError:  # conflicting parsers: fail closed
            parser, dropped = None, True
        else:
            dropped = peers.refusal is not None or policy.is_dropped or parser not in (ParserType.DNS, None)
        if not dropped and parser is None:
            return PassThroughDatagramSession()
        if not dropped:
            return DnsDatagramSession(context=context, policy=policy)
        if self.flows is not None:
            self.flows.emit(
                L3L4Flow(
                    context=context, verdict=DROPPED, l7_type=REQUEST, l7={}, summary="UDP datagram dropped by policy",
                    time_ns=wall_clock_ns(), rule=policy.matched, reason=peers.refusal or "policy_denied",
                )
            )
        return None


def gateway_factory(pmap: PolicyMap, peers: FixedPeers, flows: FlowSink | None = None, *,
                    max_buffer_bytes: int = 1 << 20) -> SessionFactory:
    """The factory of `membrane gateway`. Raises ValueError when --dst or --src names no endpoint."""
    peers.check(pmap)
    return SessionFactory(policy=LivePolicy(pmap), resolver=peers, flows=flows, max_buffer_bytes=max_buffer_bytes)
