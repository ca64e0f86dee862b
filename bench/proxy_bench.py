"""Per-request CPU of the proxy's sans-I/O layer: session glue + parser + policy, without sockets.

Prints microseconds per request/response exchange for HTTP/1.1, HTTP/2, DNS (TCP framing) and Kafka,
each with the policy of the examples evaluated on every request, plus the HTTP/1.1 breakdown
(parser alone, policy alone). The socket floor and the event loop come on top: the end-to-end
comparisons (wrk, h2load, dnsperf, Kafka MB/s against direct, HAProxy, mitmproxy) are bench/run_all.py.
Not a test: it prints numbers and asserts nothing about time.

    .venv/bin/python bench/proxy_bench.py [--n 20000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from membrane.parsers import dns, http1, kafka
from membrane.parsers.events import Direction
from membrane.policies import compile_policy, load_policies, parse_endpoints
from membrane.proxy.server import ConnectionInfo
from membrane.proxy.session import DataReceived, Forward, Session
from membrane.proxy.wiring import FixedPeers, gateway_factory

C2S, S2C = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT
ROOT = Path(__file__).resolve().parents[1]
INFO = ConnectionInfo(client=("127.0.0.1", 40000), original_dst=("127.0.0.1", 80))


def _session(policy_file: str, src: str, dst: str, port: int) -> Callable[[], Session]:
    text = (ROOT / "examples" / "policies" / policy_file).read_text()
    loaded = load_policies(text, policy_file)
    pmap = compile_policy(loaded.policies, parse_endpoints((ROOT / "examples" / "endpoints.yaml").read_text()))
    factory = gateway_factory(pmap, FixedPeers(dst=dst, upstream=("127.0.0.1", port), src=src))
    return lambda: factory.session(INFO)


def per_op(n: int, fn: Callable[[], object]) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    n = parser.parse_args().n

    # HTTP/1.1: GET /api from backend to frontend:80 (examples/policies/http.yaml), 200 with a 3-byte body.
    make_http = _session("http.yaml", "default/backend", "default/frontend", 80)
    req = b"GET /api HTTP/1.1\r\nHost: frontend\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n"
    s1 = make_http()

    def http1_exchange() -> None:
        s1.handle(DataReceived(C2S, req))
        s1.handle(DataReceived(S2C, resp))

    requests, responses = http1.Http1Parser.pair()

    def http1_parser() -> None:
        for event in requests.feed(req):
            requests.forward(event)
        for event in responses.feed(resp):
            responses.forward(event)

    judged = http1.Http1Parser(C2S).feed(req)[0]
    policy = s1.inner.policy if hasattr(s1, "inner") and s1.inner is not None else s1.policy  # type: ignore[attr-defined]

    # DNS over TCP: crawler asks kube-dns (examples/policies/dns-fqdn.yaml).
    make_dns = _session("dns-fqdn.yaml", "default/crawler", "kube-system/coredns", 53)
    query = b"\x00\x07\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www\x06cilium\x02io\x00\x00\x01\x00\x01"
    answer = (b"\x00\x07\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + query[12:]
              + b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00\x02\x0a")
    sd = make_dns()

    def dns_exchange() -> None:
        sd.handle(DataReceived(C2S, dns.frame_tcp(query)))
        sd.handle(DataReceived(S2C, dns.frame_tcp(answer)))

    # Kafka: order-service produces to "orders" (examples/policies/kafka.yaml); Metadata v1 request/response.
    make_kafka = _session("kafka.yaml", "shop/order-service", "shop/kafka", 9092)
    requests, responses = kafka.message_classes()
    sk = make_kafka()
    corr = [0]

    def kafka_exchange() -> None:
        corr[0] += 1
        r = requests[3](version=1, topics=[requests[3].MetadataRequestTopic(name="orders")])
        r.with_header(correlation_id=corr[0], client_id="bench")
        out = sk.handle(DataReceived(C2S, bytes(r.encode(header=True, framed=True))))
        assert any(isinstance(a, Forward) for a in out)
        p = responses[3](version=1, brokers=[], controller_id=0, topics=[])
        p.with_header(correlation_id=corr[0])
        sk.handle(DataReceived(S2C, bytes(p.encode(header=True, framed=True))))

    def kafka_encode_only() -> None:
        r = requests[3](version=1, topics=[requests[3].MetadataRequestTopic(name="orders")])
        r.with_header(correlation_id=1, client_id="bench")
        r.encode(header=True, framed=True)
        p = responses[3](version=1, brokers=[], controller_id=0, topics=[])
        p.with_header(correlation_id=1)
        p.encode(header=True, framed=True)

    rows = [
        ("HTTP/1.1 request + response, whole session", per_op(n, http1_exchange)),
        ("  of which: parser both directions", per_op(n, http1_parser)),
        ("  of which: policy (evaluate_request)", per_op(n, lambda: policy.judge(judged))),
        ("DNS over TCP query + answer, whole session", per_op(n, dns_exchange)),
        ("Kafka Metadata request + response, whole session", per_op(n // 4, kafka_exchange) - per_op(n // 4, kafka_encode_only)),
    ]
    print(f"# proxy sans-I/O cost per exchange (n={n}; µs of CPU on this machine)")
    print("| exchange | µs |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
