"""DNS over UDP and TCP through `membrane gateway --udp` with dig and dnspython against a local DNS server."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from tests.helpers.dns_server import DnsServer
from tests.integration.gateway_util import gateway

pytestmark = pytest.mark.integration

ZONE = """
www.cilium.io. 120 IN A 192.0.2.10
www.cilium.io. 120 IN A 192.0.2.11
api.github.com. 30 IN A 192.0.2.20
evil.example. 60 IN A 192.0.2.66
"""


def dns_policy(port: int) -> str:
    """The crawler may resolve only *.cilium.io and api.github.com through kube-dns on `port`."""
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: crawler-dns
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: crawler
  egress:
    - toEndpoints:
        - matchLabels:
            "k8s:io.kubernetes.pod.namespace": kube-system
            "k8s:k8s-app": kube-dns
      toPorts:
        - ports:
            - port: "{port}"
              protocol: ANY
          rules:
            dns:
              - matchPattern: "*.cilium.io"
              - matchName: "api.github.com"
"""


def kube_dns_ingress(port: int) -> str:
    """kube-dns accepts DNS from the whole cluster on `port` (examples/policies/dns-fqdn.yaml's second object)."""
    return f"""apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: kube-dns-ingress
spec:
  endpointSelector:
    matchLabels:
      "k8s:io.kubernetes.pod.namespace": kube-system
      k8s-app: kube-dns
  ingress:
    - fromEntities: [cluster]
      toPorts:
        - ports:
            - port: "{port}"
              protocol: ANY
"""


def _dig(port: int, name: str, *extra: str) -> str:
    out = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), name, "A", "+tries=1", "+time=3", *extra],
        capture_output=True, text=True, timeout=20,
    )
    return out.stdout


def test_dig_udp_and_tcp_allowed_and_refused(tmp_path: Path) -> None:
    """An allowed name is answered by the server; a denied one gets REFUSED from the proxy and never reaches the server."""
    with DnsServer(ZONE) as server, gateway(
        tmp_path, dns_policy(server.port), upstream_port=server.port, dst="kube-system/coredns", src="default/crawler", udp=True
    ) as gw:
        for extra in ((), ("+tcp",)):
            out = _dig(gw.port, "www.cilium.io", *extra)
            assert "status: NOERROR" in out, out
            assert "192.0.2.10" in out, out
            out = _dig(gw.port, "evil.example", *extra)
            assert "status: REFUSED" in out, out
        names = [(q.transport, q.name.lower()) for q in server.queries]
        assert names == [("udp", "www.cilium.io."), ("tcp", "www.cilium.io.")]
        flows = gw.wait_flows(8)
        answers = [f for f in flows if f["l7"]["type"] == "RESPONSE" and f["l7"]["dns"]["query"] == "www.cilium.io."]
        assert answers
        assert sorted(answers[0]["l7"]["dns"]["ips"]) == ["192.0.2.10", "192.0.2.11"]
        assert answers[0]["l7"]["dns"]["ttl"] == 120
        assert answers[0]["l7"]["dns"]["rrtypes"] == ["A", "A"]
        # each refused query has the response record of the REFUSED answer the client got
        refusals = [f for f in flows if f["l7"]["type"] == "RESPONSE" and f["l7"]["dns"]["query"] == "evil.example."]
        assert [(f["verdict"], f["l7"]["dns"]["rcode"]) for f in refusals] == [("FORWARDED", 5)] * 2
        refused = [f for f in flows if f["verdict"] == "DROPPED"]
        assert {f["l7"]["dns"]["query"] for f in refused} == {"evil.example."}
        assert {f["l4"].get("UDP") is not None for f in refused} == {True, False}


def test_refused_query_names_no_rule_of_the_allowing_side(tmp_path: Path) -> None:
    """A query the crawler's egress denies names no rule: kube-dns's ingress rule allowed it and did not decide
    the denial (`policy trace` says "egress: no dns rule matches"); an allowed query names the egress dns rule."""
    with DnsServer(ZONE) as server, gateway(
        tmp_path, dns_policy(server.port) + "---\n" + kube_dns_ingress(server.port), upstream_port=server.port,
        dst="kube-system/coredns", src="default/crawler", udp=True,
    ) as gw:
        assert "status: REFUSED" in _dig(gw.port, "evil.example")
        assert "status: NOERROR" in _dig(gw.port, "www.cilium.io")
        flows = gw.wait_flows(3)
        requests = {f["l7"]["dns"]["query"]: f for f in flows if f["l7"]["type"] == "REQUEST"}
        assert requests["evil.example."]["verdict"] == "DROPPED"
        assert "ingress_denied_by" not in requests["evil.example."]  # kube-dns's allowing rule did not decide it
        assert [p["name"] for p in requests["www.cilium.io."]["egress_allowed_by"]] == ["crawler-dns"]


def test_tcp_denied_then_allowed_on_the_same_connection(tmp_path: Path) -> None:
    """Over one TCP connection (RFC 7766 §6.2.1) a REFUSED query is followed by an answered one."""
    with DnsServer(ZONE) as server, gateway(
        tmp_path, dns_policy(server.port), upstream_port=server.port, dst="kube-system/coredns", src="default/crawler"
    ) as gw:
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        try:
            denied = dns.query.tcp(dns.message.make_query("evil.example", "A"), "127.0.0.1", port=gw.port, sock=sock, timeout=5)
            assert denied.rcode() == dns.rcode.REFUSED
            allowed = dns.query.tcp(dns.message.make_query("API.GitHub.com", "A"), "127.0.0.1", port=gw.port, sock=sock, timeout=5)
            assert allowed.rcode() == dns.rcode.NOERROR
            assert [rr.to_text() for rrset in allowed.answer for rr in rrset] == ["192.0.2.20"]
        finally:
            sock.close()
        # The forwarded query keeps the client's case; the denied one never reached the server.
        assert [q.name for q in server.queries] == ["API.GitHub.com."]


def test_dnspython_udp_many_queries(tmp_path: Path) -> None:
    """Every UDP datagram is judged on its own; answers go back to the asking socket."""
    with DnsServer(ZONE) as server, gateway(
        tmp_path, dns_policy(server.port), upstream_port=server.port, dst="kube-system/coredns", src="default/crawler", udp=True
    ) as gw:
        for i in range(20):
            name = "www.cilium.io" if i % 2 else "evil.example"
            reply = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=gw.port, timeout=5)
            assert reply.rcode() == (dns.rcode.NOERROR if i % 2 else dns.rcode.REFUSED)
        assert len(server.queries) == 10


def test_upstream_down_gives_servfail(tmp_path: Path) -> None:
    """An upstream that cannot be reached answers SERVFAIL, over TCP (connect refused) and UDP (no answer in time)."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with gateway(
        tmp_path, dns_policy(port), upstream_port=port, dst="kube-system/coredns", src="default/crawler", udp=True,
        extra=["--dns-timeout", "0.5"],
    ) as gw:
        tcp = dns.query.tcp(dns.message.make_query("www.cilium.io", "A"), "127.0.0.1", port=gw.port, timeout=5)
        assert tcp.rcode() == dns.rcode.SERVFAIL
        udp = dns.query.udp(dns.message.make_query("www.cilium.io", "A"), "127.0.0.1", port=gw.port, timeout=5)
        assert udp.rcode() == dns.rcode.SERVFAIL
        # Each failed query is an ERROR flow (Hubble's verdict ERROR) with the rcode the client got.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len([f for f in gw.flows() if f["verdict"] == "ERROR"]) < 2:
            time.sleep(0.05)
        errors = [f for f in gw.flows() if f["verdict"] == "ERROR"]
        assert sorted(f["l4"] and next(iter(f["l4"])) for f in errors) == ["TCP", "UDP"], gw.flows()
        assert all(f["l7"]["dns"]["rcode"] == dns.rcode.SERVFAIL and f["l7"]["dns"]["query"] == "www.cilium.io." for f in errors)
