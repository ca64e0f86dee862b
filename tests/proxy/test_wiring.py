"""proxy/wiring.py: gateway and transparent modes run ONE session factory; they differ only in the peer resolver.

Every case runs in both modes (gateway: `--src client --dst server`, upstream = server's IP and port;
transparent: client address and original destination looked up in the ipcache) and must give the
same session, the same flow context and the same behaviour.

| port (client's egress to server) | transport | expected |
|---|---|---|
| 80, http GET /ok                     | TCP | HttpSession: /ok forwarded, /no answered 403 |
| 53, dns *.ok.test                    | TCP | DnsTcpSession: bad.test REFUSED; an answer emits Learn before its Forward |
| 9092, kafka topic orders             | TCP | KafkaSession; two connections to one broker share one KafkaLearned |
| 7000, no L7 rules                    | TCP | PassThroughSession: bytes relayed untouched |
| 8080, not allowed                    | TCP | DeniedSession: DROPPED L3_L4 flow, closed at once |
| 53, dns *.ok.test                    | UDP | DnsDatagramSession: bad.test REFUSED |
| 7001, no L7 rules                    | UDP | plain UDP (Cilium: L4 allow, no DNS proxy): relayed untouched, not read as DNS |
| 9999, not allowed                    | UDP | None + a DROPPED L3_L4 flow |
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import pytest
from membrane.parsers import dns
from membrane.parsers.events import Direction, DnsQuery, Reason
from membrane.parsers.http1 import error_response
from membrane.policies import compile_policy, load_policies, parse_endpoints
from membrane.proxy.flows import FlowSink
from membrane.proxy.server import ConnectionInfo
from membrane.proxy.session import (
    Action,
    Close,
    DataReceived,
    DeniedSession,
    Forward,
    Learn,
    Log,
    PassThroughDatagramSession,
    PassThroughSession,
    Reply,
    Session,
)
from membrane.proxy.session_dns import DnsDatagramSession, DnsTcpSession
from membrane.proxy.session_http2 import HttpSession
from membrane.proxy.session_kafka import KafkaSession
from membrane.proxy.wiring import (
    FixedPeers,
    IpcachePeers,
    KafkaMemory,
    LivePolicy,
    SessionFactory,
    gateway_factory,
)

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT
CLIENT_IP, SERVER_IP = "10.244.7.5", "10.244.7.6"

ENDPOINTS = f"""
endpoints:
  - {{name: client, namespace: default, labels: {{app: client}}, ips: [{CLIENT_IP}]}}
  - {{name: server, namespace: default, labels: {{app: server}}, ips: [{SERVER_IP}]}}
"""


def _policy(http_path: str = "/ok", dns_pattern: str = "*.ok.test") -> str:
    return f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: client-out, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
    - toEndpoints: [{{matchLabels: {{app: server}}}}]
      toPorts:
        - ports: [{{port: "80", protocol: TCP}}]
          rules: {{http: [{{method: GET, path: "{http_path}"}}]}}
        - ports: [{{port: "53", protocol: TCP}}, {{port: "53", protocol: UDP}}]
          rules: {{dns: [{{matchPattern: "{dns_pattern}"}}]}}
        - ports: [{{port: "9092", protocol: TCP}}]
          rules: {{kafka: [{{topic: orders}}]}}
        - ports: [{{port: "7000", protocol: TCP}}, {{port: "7001", protocol: UDP}}]
"""


def _pmap(http_path: str = "/ok", dns_pattern: str = "*.ok.test"):  # type: ignore[no-untyped-def]
    loaded = load_policies(_policy(http_path, dns_pattern), "wiring.yaml")
    assert not loaded.errors, loaded.errors
    return compile_policy(loaded.policies, parse_endpoints(ENDPOINTS))


def _gateway(port: int, flows: FlowSink) -> SessionFactory:
    return gateway_factory(_pmap(), FixedPeers(dst="default/server", upstream=(SERVER_IP, port), src="default/client"), flows)


def _transparent(port: int, flows: FlowSink) -> SessionFactory:
    return SessionFactory(policy=LivePolicy(_pmap()), resolver=IpcachePeers(own_ports=frozenset({15001})), flows=flows,
                          follow_reloads=True)


MODES: dict[str, Callable[[int, FlowSink], SessionFactory]] = {"gateway": _gateway, "transparent": _transparent}


def _info(port: int, transport: str = "TCP") -> ConnectionInfo:
    # Gateway mode sees the listener as the original destination; transparent mode the server itself.
    return ConnectionInfo(client=(CLIENT_IP, 40000), original_dst=(SERVER_IP, port), transport=transport)


def _no_logs(actions: list[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, Log)]


def _query(name: str, qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return qid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + labels + b"\x00\x00\x01\x00\x01"


def _refused(query: bytes) -> bytes:
    """The REFUSED reply the parser's own refusal builder makes for `query` (a policy denial)."""
    (event,) = dns.DnsParser(C2S).feed(query)
    assert isinstance(event, DnsQuery)
    reply = dns.refusal(event, Reason.POLICY_DENIED)
    assert reply is not None
    return reply


def _answer(query: bytes, ip: bytes) -> bytes:
    head = query[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00"
    return head + query[12:] + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + ip


def _sink() -> tuple[FlowSink, io.StringIO]:
    out = io.StringIO()
    return FlowSink([out]), out


@pytest.fixture(params=sorted(MODES))
def mode(request: pytest.FixtureRequest) -> Callable[[int, FlowSink], SessionFactory]:
    return MODES[request.param]


def test_http_port_gets_the_http_session_and_judges_each_request(mode: Callable[[int, FlowSink], SessionFactory]) -> None:
    """HTTP rules on the port: GET /ok is forwarded, GET /no answered 403 (same session class in both modes)."""
    session = mode(80, _sink()[0]).session(_info(80))
    assert isinstance(session, HttpSession)
    ok = b"GET /ok HTTP/1.1\r\nHost: s\r\n\r\n"
    assert _no_logs(session.handle(DataReceived(C2S, ok))) == [Forward(C2S, ok)]
    assert _no_logs(session.handle(DataReceived(S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))) == [
        Forward(S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    ]
    assert _no_logs(session.handle(DataReceived(C2S, b"GET /no HTTP/1.1\r\nHost: s\r\n\r\n"))) == [
        Reply(error_response(403, keep_alive=True))
    ]


def test_flow_context_is_the_same_in_both_modes() -> None:
    """Both resolvers name the same source and destination endpoints, direction and ports in the flow context."""
    contexts = [MODES[m](80, _sink()[0]).session(_info(80)).context for m in sorted(MODES)]
    assert contexts[0] == contexts[1]
    assert contexts[0].source.pod_name == "client"
    assert contexts[0].destination.pod_name == "server"
    assert contexts[0].destination.port == 80
    assert contexts[0].traffic_direction == "INGRESS"


def test_dns_over_tcp_refuses_and_learns_before_forwarding(mode: Callable[[int, FlowSink], SessionFactory]) -> None:
    """DNS rules on TCP 53: a name outside the pattern is REFUSED; an allowed answer emits Learn, then its Forward."""
    session = mode(53, _sink()[0]).session(_info(53))
    assert isinstance(session, DnsTcpSession)
    bad, good = _query("bad.test", 1), _query("www.ok.test", 2)
    assert _no_logs(session.handle(DataReceived(C2S, dns.frame_tcp(bad)))) == [Reply(dns.frame_tcp(_refused(bad)))]
    assert _no_logs(session.handle(DataReceived(C2S, dns.frame_tcp(good)))) == [Forward(C2S, dns.frame_tcp(good))]
    answer = _answer(good, bytes([192, 0, 2, 7]))
    assert _no_logs(session.handle(DataReceived(S2C, dns.frame_tcp(answer)))) == [
        Learn(names=("www.ok.test.",), ips=("192.0.2.7",), ttl_s=60.0),
        Forward(S2C, dns.frame_tcp(answer)),
    ]


def test_kafka_port_shares_one_cluster_memory_per_broker(mode: Callable[[int, FlowSink], SessionFactory]) -> None:
    """Kafka rules: a KafkaSession; two connections to one broker address share what Metadata taught."""
    factory = mode(9092, _sink()[0])
    first, second = factory.session(_info(9092)), factory.session(_info(9092))
    assert isinstance(first, KafkaSession)
    assert isinstance(second, KafkaSession)
    assert first.learned is second.learned
    assert len(factory.kafka) == 1


def test_kafka_memory_is_bounded() -> None:
    """The per-broker memory keeps at most max_clusters addresses, dropping the least recently used."""
    memory = KafkaMemory(max_clusters=2)
    a = memory.learned(("10.0.0.1", 9092))
    memory.learned(("10.0.0.2", 9092))
    assert memory.learned(("10.0.0.1", 9092)) is a  # now the most recently used
    memory.learned(("10.0.0.3", 9092))
    assert len(memory) == 2
    assert memory.learned(("10.0.0.1", 9092)) is a
    assert memory.learned(("10.0.0.2", 9092)) is not None  # forgotten, then made anew
    assert len(memory) == 2


def test_l4_only_tcp_port_is_relayed_untouched(mode: Callable[[int, FlowSink], SessionFactory]) -> None:
    """No L7 rules on TCP 7000: bytes pass through unjudged."""
    session = mode(7000, _sink()[0]).session(_info(7000))
    assert type(session) is PassThroughSession
    assert session.handle(DataReceived(C2S, b"\x00anything")) == [Forward(C2S, b"\x00anything")]


def test_unallowed_tcp_port_is_closed_with_an_l3_l4_drop(mode: Callable[[int, FlowSink], SessionFactory]) -> None:
    """TCP 8080 is not allowed: the connection is closed at once with a DROPPED L3_L4 flow (fail closed)."""
    session = mode(8080, _sink()[0]).session(_info(8080))
    assert isinstance(session, DeniedSession)
    actions = session.start()
    assert actions[-1] == Close()
    flows = [a.flow.to_json() for a in actions if isinstance(a, Log)]
    assert [f["verdict"] for f in flows] == ["DROPPED"]
    assert flows[0]["Type"] == "L3_L4"


def test_dns_over_udp_is_judged_per_query(mode: Callable[[int, FlowSink], SessionFactory]) -> None:
    """DNS rules on UDP 53: a DnsDatagramSession; a name outside the pattern is REFUSED."""
    session = mode(53, _sink()[0]).datagram(_info(53, "UDP"))
    assert isinstance(session, DnsDatagramSession)
    bad = _query("bad.test", 3)
    assert _no_logs(session.on_query(bad)) == [Reply(_refused(bad))]


def test_l4_only_udp_port_is_plain_udp_not_dns(mode: Callable[[int, FlowSink], SessionFactory]) -> None:
    """No L7 rules on UDP 7001: Cilium's plain L4 allow, so datagrams are relayed untouched both ways, never read as DNS."""
    session = mode(7001, _sink()[0]).datagram(_info(7001, "UDP"))
    assert isinstance(session, PassThroughDatagramSession)
    assert session.on_query(b"not dns at all") == [Forward(C2S, b"not dns at all")]
    assert session.on_answer(b"\x01\x02") == [Forward(S2C, b"\x01\x02")]
    assert not session.has_outstanding


def test_unallowed_udp_port_is_dropped_with_a_flow(mode: Callable[[int, FlowSink], SessionFactory]) -> None:
    """UDP 9999 is not allowed: no session, and one DROPPED L3_L4 flow says so."""
    sink, out = _sink()
    assert mode(9999, sink).datagram(_info(9999, "UDP")) is None
    sink.close()
    records = [json.loads(line)["flow"] for line in out.getvalue().splitlines()]
    assert [r["verdict"] for r in records] == ["DROPPED"]
    assert records[0]["Type"] == "L3_L4"


def test_transparent_connection_to_our_own_listener_is_refused() -> None:
    """Transparent mode: a connection straight to a listener port (not steered) would loop through the proxy: refused."""
    sink, _ = _sink()
    session = _transparent(0, sink).session(ConnectionInfo(client=(CLIENT_IP, 40000), original_dst=("10.9.9.9", 15001)))
    assert isinstance(session, DeniedSession)
    assert session.reason == "proxy_loop"


def test_transparent_mode_judges_each_request_by_the_policy_in_force() -> None:
    """Transparent mode follows reloads: after the policy is replaced, the open connection's next request is judged by it."""
    live = LivePolicy(_pmap("/ok"))
    factory = SessionFactory(policy=live, resolver=IpcachePeers(), follow_reloads=True)
    session: Session = factory.session(_info(80))
    ok = b"GET /ok HTTP/1.1\r\nHost: s\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert _no_logs(session.handle(DataReceived(C2S, ok))) == [Forward(C2S, ok)]
    session.handle(DataReceived(S2C, response))
    live.replace(_pmap("/other"))
    assert _no_logs(session.handle(DataReceived(C2S, ok))) == [Reply(error_response(403, keep_alive=True))]


def test_repeated_dns_queries_and_answers_are_judged_and_relayed_alike(mode: Callable[[int, FlowSink], SessionFactory]) -> None:
    """The same query again (another ID, another peer) and the same answer again: read once, but every one is
    forwarded as received, answered, learned from and recorded exactly as the first (only ID, time and latency differ)."""
    first, second = mode(53, _sink()[0]).datagram(_info(53, "UDP")), mode(53, _sink()[0]).datagram(
        ConnectionInfo(client=(CLIENT_IP, 40001), original_dst=(SERVER_IP, 53), transport="UDP"))
    assert isinstance(first, DnsDatagramSession) and isinstance(second, DnsDatagramSession)
    seen = []
    for session, qid in ((first, 7), (first, 8), (second, 9)):
        query = _query("www.ok.test", qid)
        asked = session.on_query(query)
        assert _no_logs(asked) == [Forward(C2S, query)]
        answer = _answer(query, b"\x0a\x00\x00\x09")
        answered = session.on_answer(answer)
        assert _no_logs(answered) == [Learn(names=("www.ok.test.",), ips=("10.0.0.9",), ttl_s=60.0), Forward(S2C, answer)]
        records = []
        for action in asked + answered:
            if isinstance(action, Log):
                record = action.flow.to_json()
                assert json.loads(action.flow.to_line())["flow"] == record  # the line made from the shared l7 JSON
                del record["time"], record["uuid"]
                record["l7"].pop("latency_ns", None)
                records.append(record)
        seen.append(records)
    assert seen[0] == seen[1]
    assert [r["l7"]["dns"] for r in seen[2]] == [r["l7"]["dns"] for r in seen[0]]
    bad = _query("bad.test", 10)
    assert _no_logs(first.on_query(bad)) == [Reply(_refused(bad))]
    assert _no_logs(first.on_query(bad[:1] + b"\x0b" + bad[2:])) == [Reply(_refused(bad[:1] + b"\x0b" + bad[2:]))]


def test_dns_over_udp_judges_each_query_by_the_policy_in_force() -> None:
    """A DNS peer follows reloads: the same query bytes (read once) are judged again by the policy that replaced the first."""
    live = LivePolicy(_pmap())
    factory = SessionFactory(policy=live, resolver=IpcachePeers(), follow_reloads=True)
    session = factory.datagram(_info(53, "UDP"))
    assert isinstance(session, DnsDatagramSession)
    allowed, again = _query("www.ok.test", 1), _query("www.ok.test", 2)
    assert _no_logs(session.on_query(allowed)) == [Forward(C2S, allowed)]
    live.replace(_pmap(dns_pattern="*.other.test"))
    assert _no_logs(session.on_query(again)) == [Reply(_refused(again))]
    live.replace(_pmap())
    assert _no_logs(session.on_query(_query("www.ok.test", 3))) == [Forward(C2S, _query("www.ok.test", 3))]


def test_gateway_refuses_an_unknown_dst() -> None:
    """`--dst` naming no endpoint is a usage error naming the flag."""
    with pytest.raises(ValueError, match="--dst default/nobody"):
        gateway_factory(_pmap(), FixedPeers(dst="default/nobody", upstream=(SERVER_IP, 80)))


def test_reloads_do_not_keep_old_policies_alive() -> None:
    """Each reload's verdicts die with their policy: a connection judged across 60 reloads leaves as many
    live objects as one across 10 (evaluate_request's memo held every old policy's verdicts, rule sets
    and results until it filled: ~20 objects a reload here, ~1 MB per 100 reloads in the soak)."""
    import gc

    live = LivePolicy(_pmap())
    peers = FixedPeers(dst="default/server", upstream=(SERVER_IP, 80), src="default/client")
    factory = SessionFactory(policy=live, resolver=peers, follow_reloads=True)
    session = factory.session(_info(80))
    request = b"GET /ok HTTP/1.1\r\nHost: s\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    def reload_and_judge(n: int) -> int:
        for _ in range(n):
            live.replace(_pmap())  # a new compiled policy each time, as every file change makes one
            assert [type(a) for a in session.handle(DataReceived(C2S, request))] == [Forward, Log]
            session.handle(DataReceived(S2C, response))
        gc.collect()
        return len(gc.get_objects())

    after_10 = reload_and_judge(10)
    after_60 = reload_and_judge(50)
    assert after_60 - after_10 < 100, (after_10, after_60)  # ~20 objects per reload kept before
