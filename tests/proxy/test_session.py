"""Sans-I/O sessions (proxy/session*.py) driven by a Playbook, with the real parsers and the real policy engine.

Case table (HTTP/1.1 unless named):
| input | expected |
|---|---|
| denied request, then allowed one | 403 keep-alive reply, then the allowed request forwarded; nothing of the denied one upstream |
| pipelined allowed, denied, allowed | both allowed forwarded at once; the 403 only after the first response |
| encoded slash in the target | 400 + close, nothing forwarded |
| upstream connect failed / timed out | 503 / 504 for the request in flight, then close |
| header timeout mid-head / idle between requests | 408 + close / plain close |
| headerMatches REPLACE | forwarded head carries the replaced value |
| Kafka: pipelined allowed, denied | refusal only after the allowed request's response (correlation order) |
| DNS TCP: denied, allowed, upstream failed | REFUSED; forwarded as is; SERVFAIL for the outstanding query |
| DNS UDP: no answer in time | SERVFAIL |
| port without L7 rules where the destination enforces ingress | closed at once (fail closed), an L3_L4 record |
| DNS query denied by egress, allowed by the other side's ingress rule | DROPPED flow naming no rule |
| malformed target | ERROR flow with the method and the raw target |
| HTTP/1.0 exchange (client asked keep-alive) | client connection closed after the response |
| upstream failed before / after the request (HTTP/1.1, HTTP/2, Kafka) | ERROR flow with the status sent |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from membrane.parsers import dns, kafka
from membrane.parsers.events import Direction, Reason
from membrane.parsers.http1 import error_response
from membrane.policies import PolicyMap, compile_policy, load_policies, parse_endpoints
from membrane.proxy.server import ConnectionInfo
from membrane.proxy.session import (
    Close,
    DatagramSession,
    DataReceived,
    Forward,
    Learn,
    Log,
    PeerClosed,
    Reply,
    Session,
    TimedOut,
    TimeoutKind,
    UpstreamFailed,
)
from membrane.proxy.session_dns import DnsDatagramSession
from membrane.proxy.wiring import FixedPeers, SessionFactory, gateway_factory

from tests.helpers.playbook import START, LogMatch, Playbook

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT
ENDPOINTS = """
endpoints:
  - {name: frontend, namespace: default, labels: {app: frontend}, ips: [10.244.1.10]}
  - {name: backend, namespace: default, labels: {app: backend}, ips: [10.244.1.20]}
  - {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}, ips: [10.244.0.10]}
  - {name: crawler, namespace: default, labels: {app: crawler}, ips: [10.244.4.10]}
  - {name: kafka, namespace: shop, labels: {app: kafka}, ips: [10.244.3.10]}
  - {name: order-service, namespace: shop, labels: {app: order-service}, ips: [10.244.3.20]}
"""

HTTP_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: frontend-api, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: frontend}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: backend}}]
      toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules:
            http:
              - method: GET
                path: "/api(/.*)?"
              - method: GET
                path: "/env"
                headerMatches:
                  - {name: X-Env, value: prod, mismatch: REPLACE}
"""

DNS_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: crawler-dns, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: crawler}}
  egress:
    - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, "k8s:k8s-app": kube-dns}}]
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
          rules:
            dns: [{matchPattern: "*.cilium.io"}]
"""

KAFKA_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka-orders, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: order-service}}]
      toPorts:
        - ports: [{port: "9092", protocol: TCP}]
          rules:
            kafka: [{role: produce, topic: orders}]
"""

INFO = ConnectionInfo(client=("127.0.0.1", 40000), original_dst=("127.0.0.1", 8080))
FORBIDDEN = error_response(403, keep_alive=True)


@dataclass(frozen=True)
class _Gateway:
    pmap: PolicyMap
    dst: str
    port: int
    src: str


def _gateway(policy: str, *, src: str, dst: str, port: int) -> _Gateway:
    loaded = load_policies(policy, "test.yaml")
    assert not loaded.errors, loaded.errors
    return _Gateway(compile_policy(loaded.policies, parse_endpoints(ENDPOINTS)), dst, port, src)


def _factory(gw: _Gateway, upstream_ip: str) -> SessionFactory:
    return gateway_factory(gw.pmap, FixedPeers(dst=gw.dst, upstream=(upstream_ip, gw.port), src=gw.src))


def session_factory(gw: _Gateway, upstream_ip: str) -> Callable[[ConnectionInfo], Session]:
    return _factory(gw, upstream_ip).session


def datagram_factory(gw: _Gateway, upstream_ip: str) -> Callable[[ConnectionInfo], DatagramSession | None]:
    return _factory(gw, upstream_ip).datagram


def http_session():  # type: ignore[no-untyped-def]
    gw = _gateway(HTTP_POLICY, src="default/backend", dst="default/frontend", port=80)
    return session_factory(gw, "10.244.1.10")(INFO)


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: a\r\n{extra}\r\n".encode()


def response(body: bytes) -> tuple[bytes, bytes]:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body), body


def test_denied_request_answered_and_connection_lives_on() -> None:
    """A denied request gets 403 from the proxy and never goes upstream; the next allowed one is forwarded (issue 4)."""
    session = http_session()
    head, body = response(b"ok")
    assert (
        Playbook(session, logs=True)
        >> START
        >> DataReceived(C2S, get("/secret"))
        << LogMatch(verdict="DROPPED", l7_type="REQUEST", reason="policy_denied", json={"l7.http.url": "http://a/secret"})
        << Reply(FORBIDDEN)
        << LogMatch(verdict="FORWARDED", l7_type="RESPONSE", reason=None, json={"l7.http.code": 403, "l7.http.url": "http://a/secret"})
        >> DataReceived(C2S, get("/api/x"))
        << Forward(C2S, get("/api/x"))
        << LogMatch(verdict="FORWARDED", rule="default/frontend-api: ingress[0].toPorts[0].rules.http[0]")
        >> DataReceived(S2C, head + body)
        << Forward(S2C, head)
        << LogMatch(verdict="FORWARDED", l7_type="RESPONSE", json={"l7.http.code": 200})
        << Forward(S2C, body)
    )
    assert session.is_idle


def test_pipelined_refusal_waits_behind_earlier_response() -> None:
    """Answers keep request order: a refusal waits until the responses of requests forwarded before it (RFC 9112 §9.3.2)."""
    session = http_session()
    h1, b1 = response(b"one")
    h3, b3 = response(b"three")
    assert (
        Playbook(session)
        >> DataReceived(C2S, get("/api/1") + get("/nope") + get("/api/3"))
        << Forward(C2S, get("/api/1"))
        << Forward(C2S, get("/api/3"))
        >> DataReceived(S2C, h1 + b1)
        << Forward(S2C, h1)
        << Forward(S2C, b1)
        << Reply(FORBIDDEN)
        >> DataReceived(S2C, h3 + b3)
        << Forward(S2C, h3)
        << Forward(S2C, b3)
    )


def test_ambiguous_target_is_refused_400_and_closed() -> None:
    """An encoded slash is read differently by servers: 400, close, nothing forwarded (issue 4, RFC 3986 §6.2.2)."""
    assert (
        Playbook(http_session())
        >> DataReceived(C2S, get("/api/..%2Fsecret"))
        << Reply(error_response(400, keep_alive=False))
        << Close()
    )


def test_malformed_target_flow_carries_method_and_raw_target() -> None:
    """The ERROR flow of a refused target (400, RFC 3986 §6.2.2) names the method and the target as sent."""
    assert (
        Playbook(http_session(), logs=True)
        >> DataReceived(C2S, get("/api/..%2Fsecret"))
        << LogMatch(verdict="ERROR", l7_type="REQUEST", reason="malformed",
                    json={"l7.http.method": "GET", "l7.http.url": "http://a/api/..%2Fsecret", "l7.http.code": 400})
        << Reply(error_response(400, keep_alive=False))
        << LogMatch(verdict="FORWARDED", l7_type="RESPONSE", json={"l7.http.code": 400, "l7.http.url": "http://a/api/..%2Fsecret"})
        << Close()
    )
    unreadable = [a.flow.to_json() for a in http_session().handle(DataReceived(C2S, b"GET\r\n\r\n")) if isinstance(a, Log)]
    # protojson leaves empty strings out: an unreadable request line gives no method and no url
    assert [(f["verdict"], f["l7"]["http"].get("method", ""), f["l7"]["http"].get("url", "")) for f in unreadable] == [("ERROR", "", ""), ("FORWARDED", "", "")]
    assert unreadable[1]["l7"]["http"]["code"] == 400  # the response record of the 400 the client got


def test_http10_response_without_keep_alive_closes_the_client_connection() -> None:
    """RFC 9112 §9.3: an HTTP/1.0 exchange does not persist here, so the proxy closes the client
    connection once the response is fully forwarded (even if the client asked for keep-alive)."""
    request = b"GET /api/x HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"
    head, body = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", b"ok"
    assert (
        Playbook(http_session())
        >> DataReceived(C2S, request)
        << Forward(C2S, request)
        >> DataReceived(S2C, head)
        << Forward(S2C, head)
        >> DataReceived(S2C, body)
        << Forward(S2C, body)
        << Close()
    )
    # A keep-alive HTTP/1.1 exchange stays open.
    h11, b11 = response(b"ok")
    session = http_session()
    actions = session.handle(DataReceived(C2S, get("/api/x"))) + session.handle(DataReceived(S2C, h11 + b11))
    assert not any(isinstance(a, Close) for a in actions)
    assert not session.closed


def test_upstream_failure_answers_503_and_504() -> None:
    """A request forwarded to an upstream that cannot be reached is answered 503 (refused) or 504 (timed out)."""
    for reason, status in ((Reason.UPSTREAM_FAILED, 503), (Reason.UPSTREAM_TIMEOUT, 504)):
        assert (
            Playbook(http_session())
            >> DataReceived(C2S, get("/api/x"))
            << Forward(C2S, get("/api/x"))
            >> UpstreamFailed(reason)
            << Reply(error_response(status, keep_alive=False))
            << Close()
        )


def test_upstream_failure_before_any_request() -> None:
    """When the upstream fails before the client sent anything, the first request gets 503 and the connection closes."""
    assert (
        Playbook(http_session())
        >> UpstreamFailed(Reason.UPSTREAM_FAILED)
        >> DataReceived(C2S, get("/api/x"))
        << Reply(error_response(503, keep_alive=False))
        << Close()
    )


def test_header_timeout_and_idle_timeout() -> None:
    """A head still incomplete at the header timeout gets 408 and close (slowloris); an idle keep-alive connection just closes."""
    session = http_session()
    assert session.reading_head
    assert (
        Playbook(session)
        >> DataReceived(C2S, b"GET /api HTTP/1.1\r\nHo")
        >> TimedOut(TimeoutKind.HEADER)
        << Reply(error_response(408, keep_alive=False))
        << Close()
    )
    idle = http_session()
    head, _body = response(b"")
    assert (
        Playbook(idle)
        >> DataReceived(C2S, get("/api"))
        << Forward(C2S, get("/api"))
        >> DataReceived(S2C, head)
        << Forward(S2C, head)
        >> TimedOut(TimeoutKind.IDLE)
        << Close()
    )
    assert not idle.reading_head


def test_upstream_closing_between_responses_ends_the_connection_without_relaying_its_eof() -> None:
    """An upstream that closes a keep-alive connection after a framed response ends nothing the client
    reads: the session closes the whole connection and says the EOF meant nothing (the server then
    resets the pod-facing leg once the client acknowledged everything, leaving no TIME_WAIT) instead
    of relaying the FIN. A body read until close is ended by the EOF: that one still goes out as a FIN."""
    head, body = response(b"ok")
    framed = http_session()
    assert (
        Playbook(framed)
        >> DataReceived(C2S, get("/api"))
        << Forward(C2S, get("/api"))
        >> DataReceived(S2C, head + body)
        << Forward(S2C, head)
        << Forward(S2C, body)
        >> PeerClosed(S2C)
        << Close()
    )
    assert (framed.delegate or framed).upstream_eof_delimits is False  # the HTTP/1 session the server talks to
    until_close = http_session()
    open_ended = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
    assert (
        Playbook(until_close)
        >> DataReceived(C2S, get("/api"))
        << Forward(C2S, get("/api"))
        >> DataReceived(S2C, open_ended + b"partial")
        << Forward(S2C, open_ended)
        << Forward(S2C, b"partial")
        >> PeerClosed(S2C)
        << Close()
    )
    assert (until_close.delegate or until_close).upstream_eof_delimits is True


def test_header_match_replace_applied_to_forwarded_head() -> None:
    """`headerMatches` mismatch REPLACE rewrites the header in the forwarded request (Cilium header actions)."""
    assert (
        Playbook(http_session())
        >> DataReceived(C2S, get("/env", "X-Env: dev\r\n"))
        << Forward(C2S, get("/env", "X-Env: prod\r\n"))
    )


def test_half_close_is_relayed() -> None:
    """A client FIN is passed on to the upstream; when both sides closed, the connection ends."""
    head, _ = response(b"")
    assert (
        Playbook(http_session())
        >> DataReceived(C2S, get("/api"))
        << Forward(C2S, get("/api"))
        >> DataReceived(S2C, head)
        << Forward(S2C, head)
        >> PeerClosed(C2S)
        << Close(C2S)
        >> PeerClosed(S2C)
        << Close()
    )


def _metadata(correlation_id: int, topic: str) -> bytes:
    requests, _ = kafka.message_classes()
    req = requests[3](version=1, topics=[requests[3].MetadataRequestTopic(name=topic)])
    req.with_header(correlation_id=correlation_id, client_id="t")
    return bytes(req.encode(header=True, framed=True))


def _metadata_response(correlation_id: int) -> bytes:
    _, responses = kafka.message_classes()
    resp = responses[3](version=1, brokers=[], controller_id=0, topics=[])
    resp.with_header(correlation_id=correlation_id)
    return bytes(resp.encode(header=True, framed=True))


def test_kafka_refusal_waits_for_correlation_order() -> None:
    """A Kafka refusal is sent only after the responses of earlier forwarded requests (clients expect request order)."""
    gw = _gateway(KAFKA_POLICY, src="shop/order-service", dst="shop/kafka", port=9092)
    session = session_factory(gw, "10.244.3.10")(INFO)
    allowed, denied = _metadata(1, "orders"), _metadata(2, "secret")
    refusal_bytes = kafka.refusal(kafka.parse_request(denied), Reason.POLICY_DENIED)
    assert refusal_bytes
    assert (
        Playbook(session, logs=True)
        >> DataReceived(C2S, allowed + denied)
        << Forward(C2S, allowed)
        << LogMatch(verdict="FORWARDED", json={"l7.kafka.correlation_id": 1})
        << LogMatch(verdict="DROPPED", json={"l7.kafka.correlation_id": 2, "l7.kafka.error_code": 29})
        >> DataReceived(S2C, _metadata_response(1))
        << Forward(S2C, _metadata_response(1))
        << LogMatch(verdict="FORWARDED", l7_type="RESPONSE")
        << Reply(refusal_bytes)
        << LogMatch(verdict="FORWARDED", l7_type="RESPONSE", json={"l7.kafka.correlation_id": 2, "l7.kafka.error_code": 29})
    )


def test_kafka_upstream_failure_is_an_error_flow() -> None:
    """A forwarded Kafka request whose broker cannot be reached is answered NETWORK_EXCEPTION (13) and
    logged with Hubble's verdict ERROR."""
    gw = _gateway(KAFKA_POLICY, src="shop/order-service", dst="shop/kafka", port=9092)
    session = session_factory(gw, "10.244.3.10")(INFO)
    network_exception = kafka.refusal(kafka.parse_request(_metadata(1, "orders")), Reason.UPSTREAM_FAILED)
    assert network_exception
    assert (
        Playbook(session, logs=True)
        >> DataReceived(C2S, _metadata(1, "orders"))
        << Forward(C2S, _metadata(1, "orders"))
        << LogMatch(verdict="FORWARDED", l7_type="REQUEST")
        >> UpstreamFailed(Reason.UPSTREAM_FAILED)
        << Reply(network_exception)
        << LogMatch(verdict="ERROR", l7_type="RESPONSE", reason="upstream_failed",
                    json={"l7.kafka.correlation_id": 1, "l7.kafka.error_code": 13, "l7.kafka.topic": "orders"})
        << Close()
    )


def _query(name: str, qid: int = 7) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split("."))
    return qid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + labels + b"\x00\x00\x01\x00\x01"


def _answer(query: bytes, ip: bytes) -> bytes:
    head = query[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00"
    return head + query[12:] + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + ip


def test_dns_tcp_refused_forwarded_and_servfail() -> None:
    """DNS over TCP: a denied query is answered REFUSED, an allowed one forwarded byte for byte, and an upstream failure gives SERVFAIL."""
    gw = _gateway(DNS_POLICY, src="default/crawler", dst="kube-system/coredns", port=53)
    session = session_factory(gw, "10.244.0.10")(INFO)
    denied, allowed, later = _query("evil.example", 1), _query("www.cilium.io", 2), _query("docs.cilium.io", 3)
    answer = _answer(allowed, b"\xc0\x00\x02\x0a")
    assert (
        Playbook(session)
        >> DataReceived(C2S, dns.frame_tcp(denied) + dns.frame_tcp(allowed))
        << Reply(dns.frame_tcp(dns.refusal(dns.read_query(denied), Reason.POLICY_DENIED)))
        << Forward(C2S, dns.frame_tcp(allowed))
        >> DataReceived(S2C, dns.frame_tcp(answer))
        << Learn(names=("www.cilium.io.",), ips=("192.0.2.10",), ttl_s=60.0)
        << Forward(S2C, dns.frame_tcp(answer))
        >> DataReceived(C2S, dns.frame_tcp(later))
        << Forward(C2S, dns.frame_tcp(later))
        >> UpstreamFailed(Reason.UPSTREAM_FAILED)
        << Reply(dns.frame_tcp(dns.refusal(dns.read_query(later), Reason.UPSTREAM_FAILED)))
    )
    # The answer's Learn (name, IP, TTL for toFQDNs) comes before its Forward: the I/O layer holds it until learned.


def test_dns_udp_unanswered_query_gets_servfail() -> None:
    """DNS over UDP: a forwarded query without an answer in time is answered SERVFAIL."""
    gw = _gateway(DNS_POLICY, src="default/crawler", dst="kube-system/coredns", port=53)
    clock = [1_000_000_000]
    factory = datagram_factory(gw, "10.244.0.10")
    session = factory(ConnectionInfo(client=("127.0.0.1", 5353), original_dst=("127.0.0.1", 53), transport="UDP"))
    assert isinstance(session, DnsDatagramSession)
    session.clock = session.judge.clock = lambda: clock[0]
    query = _query("www.cilium.io", 9)
    assert [a for a in session.on_query(query) if not hasattr(a, "flow")] == [Forward(C2S, query)]
    assert [a for a in session.expire(5_000_000_000) if not hasattr(a, "flow")] == []
    clock[0] += 6_000_000_000
    assert [a for a in session.expire(5_000_000_000) if not hasattr(a, "flow")] == [Reply(dns.refusal(dns.read_query(query), Reason.UPSTREAM_TIMEOUT))]
    assert not session.has_outstanding


def test_port_without_rules_fails_closed() -> None:
    """A port that the destination's policy does not allow is closed at once, with a DROPPED flow (fail closed, STYLE.md §3.3)."""
    gw = _gateway(HTTP_POLICY, src="default/backend", dst="default/frontend", port=8080)
    session = session_factory(gw, "10.244.1.10")(INFO)
    assert Playbook(session, logs=True) >> START << LogMatch(verdict="DROPPED", reason="policy_denied") << Close()


def test_l3_l4_denial_is_an_l3_l4_record() -> None:
    """A connection denied at L3/L4 is Hubble's policy drop: `Type: L3_L4`, `drop_reason_desc: POLICY_DENIED`, no `l7`."""
    gw = _gateway(HTTP_POLICY, src="default/backend", dst="default/frontend", port=8080)
    logs = [a.flow.to_json() for a in session_factory(gw, "10.244.1.10")(INFO).start() if isinstance(a, Log)]
    assert len(logs) == 1
    record = logs[0]
    assert record["Type"] == "L3_L4"
    assert "l7" not in record
    assert record["is_reply"] is False
    assert record["verdict"] == "DROPPED"
    assert record["drop_reason_desc"] == "POLICY_DENIED"


WS_UPGRADE = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def test_websocket_upgrade_allowed_becomes_a_relay() -> None:
    """An allowed Upgrade request is forwarded; after the 101 the bytes are relayed opaquely both ways (RFC 9110 §7.8)."""
    assert (
        Playbook(http_session())
        >> DataReceived(C2S, get("/api/ws", WS_UPGRADE))
        << Forward(C2S, get("/api/ws", WS_UPGRADE))
        >> DataReceived(S2C, SWITCHED + b"\x81\x02hi")
        << Forward(S2C, SWITCHED)
        << Forward(S2C, b"\x81\x02hi")
        >> DataReceived(C2S, b"\x81\x82abcd\x00\x00")
        << Forward(C2S, b"\x81\x82abcd\x00\x00")
    )


def test_websocket_upgrade_denied_stays_http() -> None:
    """A denied Upgrade request gets 403 and is never forwarded; what the client sends next is judged as HTTP again."""
    assert (
        Playbook(http_session())
        >> DataReceived(C2S, get("/ws", WS_UPGRADE) + get("/api/after"))
        << Reply(FORBIDDEN)
        << Forward(C2S, get("/api/after"))
    )


def test_pipelining_without_reading_is_bounded() -> None:
    """Answers owed on one connection are bounded (MAX_PIPELINED): past it the connection closes instead of queueing."""
    from membrane.proxy.session_http1 import MAX_PIPELINED

    session = http_session()
    actions = session.handle(DataReceived(C2S, get("/api/slow") + get("/nope") * (MAX_PIPELINED + 5)))
    assert Close() in actions
    assert sum(1 for a in actions if isinstance(a, Forward)) == 1  # only the allowed request went upstream
    assert session.closed


def test_http2_denied_stream_refused_others_forwarded() -> None:
    """HTTP/2: per-stream verdicts; the denied stream gets 403 on its own stream and is never opened upstream (RFC 9113 §5.1)."""
    import h2.config
    import h2.connection
    import h2.events

    session = http_session()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    for stream_id, path in ((1, "/api/ok"), (3, "/admin")):
        client.send_headers(
            stream_id, [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "a")], end_stream=True
        )
    actions = session.handle(DataReceived(C2S, client.data_to_send()))
    upstream_bytes = b"".join(a.data for a in actions if isinstance(a, Forward) and a.direction is C2S)
    downstream_bytes = b"".join(a.data for a in actions if isinstance(a, Forward) and a.direction is S2C)
    # What the upstream received: only stream 1's request.
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    server.initiate_connection()
    seen = [e for e in server.receive_data(upstream_bytes) if isinstance(e, h2.events.RequestReceived)]
    assert [(e.stream_id, dict(e.headers)[":path"]) for e in seen] == [(1, "/api/ok")]
    # What the client received: a 403 on stream 3, with Cilium's body.
    events = client.receive_data(downstream_bytes)
    responses = {e.stream_id: dict(e.headers)[":status"] for e in events if isinstance(e, h2.events.ResponseReceived)}
    body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived) and e.stream_id == 3)
    assert responses == {3: "403"}
    assert body == b"Access denied\r\n"
    # The upstream answers stream 1: the client gets it.
    server.send_headers(1, [(":status", "200"), ("content-length", "2")])
    server.send_data(1, b"ok", end_stream=True)
    actions = session.handle(DataReceived(S2C, server.data_to_send()))
    events = client.receive_data(b"".join(a.data for a in actions if isinstance(a, Forward) and a.direction is S2C))
    assert [dict(e.headers)[":status"] for e in events if isinstance(e, h2.events.ResponseReceived)] == ["200"]
    assert b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived)) == b"ok"


def test_upstream_failure_is_an_error_flow_with_the_status_sent() -> None:
    """A request whose upstream cannot be reached is logged with Hubble's verdict ERROR and the status the client got,
    whether the failure came before the request (HTTP/1.1) or after it was forwarded (HTTP/1.1, HTTP/2)."""
    import h2.config
    import h2.connection

    def error_flows(actions: list[object]) -> list[tuple[str, str, int, str]]:
        # the reason is the Flow's own (Hubble's drop_reason_desc has no name for an upstream failure)
        return [(f["l7"]["type"], f["l7"]["http"]["url"], f["l7"]["http"]["code"], str(flow.reason).upper())
                for flow, f in ((a.flow, a.flow.to_json()) for a in actions if isinstance(a, Log)) if f["verdict"] == "ERROR"]

    before = http_session()
    actions = before.handle(UpstreamFailed(Reason.UPSTREAM_FAILED)) + before.handle(DataReceived(C2S, get("/api/x")))
    assert error_flows(actions) == [("REQUEST", "http://a/api/x", 503, "UPSTREAM_FAILED")]
    # nothing went upstream; the only FORWARDED record is the 503 response the client got
    assert [(a.flow.l7_type, a.flow.l7["http"]["code"]) for a in actions if isinstance(a, Log) and a.flow.verdict == "FORWARDED"] == [
        ("RESPONSE", 503)]
    after = http_session()
    actions = after.handle(DataReceived(C2S, get("/api/x"))) + after.handle(UpstreamFailed(Reason.UPSTREAM_TIMEOUT))
    assert error_flows(actions) == [("RESPONSE", "http://a/api/x", 504, "UPSTREAM_TIMEOUT")]
    h2_session = http_session()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":path", "/api/ok"), (":scheme", "http"), (":authority", "a")], end_stream=True)
    actions = h2_session.handle(DataReceived(C2S, client.data_to_send()))
    actions += h2_session.handle(UpstreamFailed(Reason.UPSTREAM_FAILED))
    assert error_flows(actions) == [("RESPONSE", "http://a/api/ok", 503, "UPSTREAM_FAILED")]


def test_actions_do_not_depend_on_read_boundaries() -> None:
    """However the client's bytes are split into reads, the bytes sent upstream and the replies are the same (RFC 9112 §2.2)."""
    from tests.helpers.feed import all_chunkings

    stream = get("/api/1") + get("/nope") + b"POST /api/1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello" + get("/api/3")

    def run(chunks: list[bytes]) -> tuple[bytes, bytes]:
        session = http_session()
        actions = [a for chunk in chunks for a in session.handle(DataReceived(C2S, chunk))]
        upstream = b"".join(a.data for a in actions if isinstance(a, Forward) and a.direction is C2S)
        replies = b"".join(a.data for a in actions if isinstance(a, Reply))
        return upstream, replies

    expected = run([stream])
    assert expected[0] == get("/api/1") + get("/api/3")
    assert expected[1] == b""  # the POST is denied (GET-only rule)
    for chunks in all_chunkings(stream):
        assert run(chunks) == expected


KUBE_DNS_INGRESS = """
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: kube-dns-ingress}
spec:
  endpointSelector: {matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}}
  ingress:
    - fromEntities: [cluster]
      toPorts:
        - ports: [{port: "53", protocol: ANY}]
"""


def test_denied_flow_names_the_denying_sides_rule_only() -> None:
    """A denial names the rule of the side that denied, or none; never the other side's allowing rule (as `policy trace`)."""
    gw = _gateway(DNS_POLICY + "---" + KUBE_DNS_INGRESS, src="default/crawler", dst="kube-system/coredns", port=53)
    session = session_factory(gw, "10.244.0.10")(INFO)
    denied = [a.flow for a in session.handle(DataReceived(C2S, dns.frame_tcp(_query("evil.com", 1)))) if isinstance(a, Log)]
    assert [(f.verdict, f.l7_type, f.rule) for f in denied] == [("DROPPED", "REQUEST", None), ("FORWARDED", "RESPONSE", None)]
    assert denied[1].to_json()["l7"]["dns"]["rcode"] == 5  # the REFUSED answer the client got
    assert "policy_rule" not in denied[0].to_json()
    allowed = [a.flow for a in session.handle(DataReceived(C2S, dns.frame_tcp(_query("www.cilium.io", 2)))) if isinstance(a, Log)]
    assert [(f.verdict, f.rule) for f in allowed] == [("FORWARDED", "default/crawler-dns: egress[0].toPorts[0].rules.dns[0]")]


def test_dns_answer_flow_has_cnames_and_record_types() -> None:
    """The response record of an answer carries Hubble's `cnames` (the chain's targets) and `rrtypes` (every answer record's type)."""
    from dnslib import CNAME, QTYPE, RR, A, DNSRecord

    gw = _gateway(DNS_POLICY, src="default/crawler", dst="kube-system/coredns", port=53)
    session = session_factory(gw, "10.244.0.10")(INFO)
    query = _query("www.cilium.io", 4)
    reply = DNSRecord.parse(query).reply()
    reply.add_answer(RR("www.cilium.io", QTYPE.CNAME, rdata=CNAME("edge.cilium.io"), ttl=300))
    reply.add_answer(RR("edge.cilium.io", QTYPE.A, rdata=A("192.0.2.7"), ttl=30))
    answer = bytes(reply.pack())
    session.handle(DataReceived(C2S, dns.frame_tcp(query)))
    flows = [a.flow.to_json() for a in session.handle(DataReceived(S2C, dns.frame_tcp(answer))) if isinstance(a, Log)]
    assert [f["l7"]["type"] for f in flows] == ["RESPONSE"]
    got = flows[0]["l7"]["dns"]
    assert (got["cnames"], got["rrtypes"], got["ips"], got["ttl"]) == (["edge.cilium.io."], ["CNAME", "A"], ["192.0.2.7"], 30)
