"""Gateway wiring: compiled policy + fixed source/destination endpoints -> one session per connection.

Owns the per-connection policy lookup of gateway mode (`membrane gateway`): every connection is
treated as coming from `--src` (or the endpoint owning the client's IP, else what the ipcache says,
usually `world`) and going to `--dst` on the upstream's port. The parser the policy puts on that
port picks the session class. Fails closed: a lookup that drops, conflicts or names a parser with
no session here gives a `DeniedSession`. Never does I/O itself (the caller reads the files).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from membrane.policies import FqdnCache, L4Proto, ParserType, PolicyDirection, PolicyMap
from membrane.policies.compile import Peer as PolicyPeer
from membrane.proxy.flows import DROPPED, EGRESS, INGRESS, REQUEST, FlowContext, FlowSink, L3L4Flow, Peer
from membrane.proxy.server import ConnectionInfo
from membrane.proxy.session import ConnectionPolicy, DatagramSession, Session, choose_session, wall_clock_ns
from membrane.proxy.session_dns import DnsDatagramSession, DnsTcpSession
from membrane.proxy.session_http2 import HttpSession
from membrane.proxy.session_kafka import KafkaLearned, KafkaSession

# Builders take (flow context, connection policy, the FQDN cache that DNS answers feed). proxy/agent.py uses them too.
SessionBuilder = Callable[[FlowContext, ConnectionPolicy, FqdnCache], Session]

# What Metadata responses taught about each Kafka destination (ip, port), shared by its connections.
_KAFKA_LEARNED: dict[tuple[str, int], KafkaLearned] = {}
_KAFKA_LEARNED_MAX = 4096


def kafka_learned(destination: Peer) -> KafkaLearned:
    key = (destination.ip, destination.port)
    learned = _KAFKA_LEARNED.get(key)
    if learned is None:
        if len(_KAFKA_LEARNED) >= _KAFKA_LEARNED_MAX:
            _KAFKA_LEARNED.clear()
        learned = _KAFKA_LEARNED[key] = KafkaLearned()
    return learned


def _http(context: FlowContext, policy: ConnectionPolicy, fqdn: FqdnCache) -> Session:
    return HttpSession(context=context, policy=policy)


def _dns(context: FlowContext, policy: ConnectionPolicy, fqdn: FqdnCache) -> Session:
    return DnsTcpSession(context=context, policy=policy, fqdn=fqdn)


def _kafka(context: FlowContext, policy: ConnectionPolicy, fqdn: FqdnCache) -> Session:
    return KafkaSession(context=context, policy=policy, learned=kafka_learned(context.destination))


# The session class for each L7 parser. A parser missing here fails closed (DeniedSession).
SESSIONS: dict[ParserType, SessionBuilder] = {ParserType.HTTP: _http, ParserType.DNS: _dns, ParserType.KAFKA: _kafka}


@dataclass
class GatewayPolicy:
    """Looks up each connection's policy in `pmap` for src -> dst:port/proto."""

    pmap: PolicyMap
    dst: str  # "ns/name" of the destination endpoint
    port: int  # the upstream's port: the port the policy is looked up for
    src: str | None = None  # "ns/name"; None = the endpoint owning the client's IP, else the ipcache identity
    fqdn: FqdnCache = field(default_factory=FqdnCache)  # names and IPs learned from relayed DNS answers

    def __post_init__(self) -> None:
        if self.dst not in self.pmap.endpoints:
            raise ValueError(f"--dst {self.dst}: no such endpoint in the endpoints file")
        if self.src is not None and self.src not in self.pmap.endpoints:
            raise ValueError(f"--src {self.src}: no such endpoint in the endpoints file")
        self._dst_peer = self.pmap.peer_from_endpoint(self.dst)
        self._fixed_src = self.pmap.peer_from_endpoint(self.src) if self.src is not None else None

    def peers(self, client_ip: str) -> tuple[PolicyPeer, PolicyPeer]:
        src = self._fixed_src if self._fixed_src is not None else self.pmap.peer_from_ip(client_ip)
        return src, self._dst_peer

    def connection_policy(self, src: PolicyPeer, dst: PolicyPeer, proto: L4Proto) -> ConnectionPolicy:
        egress = (
            self.pmap.lookup(src.endpoint, PolicyDirection.EGRESS, dst.identity, self.port, proto) if src.endpoint else None
        )
        ingress = (
            self.pmap.lookup(dst.endpoint, PolicyDirection.INGRESS, src.identity, self.port, proto) if dst.endpoint else None
        )
        return ConnectionPolicy(egress=egress, ingress=ingress, src_endpoint=src.endpoint, dst_endpoint=dst.endpoint)

    def flow_peer(self, peer: PolicyPeer, ip: str, port: int) -> Peer:
        if peer.endpoint is not None:
            ep = self.pmap.endpoints[peer.endpoint]
            labels = tuple(f"k8s:{k}={v}" for k, v in sorted(ep.labels.items()))
            return Peer(ip=ip, port=port, identity=peer.identity, namespace=ep.namespace, pod_name=ep.name, labels=labels)
        ident = self.pmap.identity(peer.identity)
        labels = (ident.display,) if ident is not None else ()
        return Peer(ip=ip, port=port, identity=peer.identity, labels=labels)

    def context(self, info: ConnectionInfo, src: PolicyPeer, dst: PolicyPeer, upstream_ip: str) -> FlowContext:
        return FlowContext(
            source=self.flow_peer(src, info.client[0], info.client[1]),
            destination=self.flow_peer(dst, upstream_ip, self.port),
            traffic_direction=INGRESS if dst.endpoint is not None else EGRESS,
            transport=info.transport,
        )


def session_factory(gw: GatewayPolicy, upstream_ip: str) -> Callable[[ConnectionInfo], Session]:
    """The server's SessionFactory for gateway mode."""

    def factory(info: ConnectionInfo) -> Session:
        src, dst = gw.peers(info.client[0])
        context = gw.context(info, src, dst, upstream_ip)
        policy = gw.connection_policy(src, dst, L4Proto.TCP)

        def build(parser: ParserType) -> Session | None:
            builder = SESSIONS.get(parser)
            return builder(context, policy, gw.fqdn) if builder is not None else None

        return choose_session(context, policy, build)

    return factory


def datagram_factory(
    gw: GatewayPolicy, upstream_ip: str, flows: FlowSink | None = None
) -> Callable[[ConnectionInfo], DatagramSession | None]:
    """The server's DatagramFactory for `--udp`: DNS over UDP, judged per query; None = dropped at L3/L4."""

    def factory(info: ConnectionInfo) -> DatagramSession | None:
        src, dst = gw.peers(info.client[0])
        context = gw.context(info, src, dst, upstream_ip)
        policy = gw.connection_policy(src, dst, L4Proto.UDP)
        try:
            parser = policy.parser
        except ValueError:
            parser = None
            policy = ConnectionPolicy(egress=None, ingress=None)
            dropped = True
        else:
            dropped = policy.is_dropped or parser not in (ParserType.DNS, None)
        if dropped:
            if flows is not None:
                flows.emit(
                    L3L4Flow(context=context, verdict=DROPPED, l7_type=REQUEST, l7={}, summary="UDP datagram dropped by policy",
                         time_ns=wall_clock_ns(), rule=policy.matched, reason="policy_denied")
                )
            return None
        # A UDP port without L7 rules is still read as DNS here: --udp exists only for DNS.
        return DnsDatagramSession(context=context, policy=policy, fqdn=gw.fqdn)

    return factory
