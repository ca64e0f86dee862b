"""Redirect to a transparent proxy: bpf_sk_assign of new flows, the handshake gotcha, replies, UDP, IPv6."""

from __future__ import annotations

import socket

import pytest
from membrane.bpf.maps import IPPROTO_TCP, IPPROTO_UDP, DropReason, PolicyEntry, PolicyKey, Verdict
from membrane.bpf.steer import ProxyPorts, Steering

from tests.bpf.conftest import call, start_server
from tests.bpf.test_steer_l4 import EP_A, EP_B, ID_A, ID_B, PORT, register
from tests.bpf.tproxy import TransparentProxy
from tests.helpers.netns import Topology

pytestmark = pytest.mark.bpf


def _redirect(port: int, proto: int, proxy_port: int = 0) -> dict[PolicyKey, PolicyEntry]:
    return {PolicyKey(endpoint_id=EP_A, identity=ID_B, port=port, proto=proto): PolicyEntry(verdict=Verdict.REDIRECT, proxy_port=proxy_port)}


@pytest.mark.parametrize("keep_source_port", [False, True], ids=["ephemeral-upstream-port", "same-upstream-port"])
def test_tcp_redirect_preserves_source(pods: Topology, keep_source_port: bool) -> None:
    """A REDIRECT flow reaches the proxy with its original destination, and the server sees pod A's own IP."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, PORT)
    with TransparentProxy(keep_source_port=keep_source_port) as proxy, Steering(proxy_ports=ProxyPorts(tcp4=proxy.port)) as st:
        st.maps.set_policy(egress=_redirect(PORT, IPPROTO_TCP), ingress={})
        register(st, pods, a_egress=True, b_egress=True)  # B's egress deny-all: replies rely on steering
        for _ in range(3):  # several connections: the handshake ACK must never be re-assigned (RST)
            assert call(a, b.ipv4, PORT) == f"from {a.ipv4} got hi"
        assert len(proxy.flows) == 3
        assert all(orig == (str(b.ipv4), PORT) and client[0] == str(a.ipv4) for client, orig in proxy.flows)
        assert st.read_drop_events() == []
        flows = [f for f in st.maps.conntrack() if f.dport == PORT]
        assert flows
        assert all(f.verdict is Verdict.REDIRECT for f in flows)


def test_tcp_redirect_explicit_proxy_port(pods: Topology) -> None:
    """An entry's own proxy_port wins over the configured default listener."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, PORT)
    with TransparentProxy() as default, TransparentProxy() as special, Steering(proxy_ports=ProxyPorts(tcp4=default.port)) as st:
        st.maps.set_policy(egress=_redirect(PORT, IPPROTO_TCP, proxy_port=special.port), ingress={})
        register(st, pods, a_egress=True)
        assert call(a, b.ipv4, PORT) == f"from {a.ipv4} got hi"
        assert (len(special.flows), len(default.flows)) == (1, 0)


def test_redirect_without_proxy_fails_closed(pods: Topology) -> None:
    """A REDIRECT flow with no proxy listening is dropped and counted as PROXY_UNAVAILABLE, never passed."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, PORT)
    with Steering(proxy_ports=ProxyPorts(tcp4=1)) as st:
        st.maps.set_policy(egress=_redirect(PORT, IPPROTO_TCP), ingress={})
        register(st, pods, a_egress=True)
        assert call(a, b.ipv4, PORT, timeout_s=1) == "TIMEOUT"
        assert st.maps.drop_counts()[DropReason.PROXY_UNAVAILABLE] >= 1


def test_ingress_redirect(pods: Topology) -> None:
    """A REDIRECT in the destination's ingress policy steers too (judged at the source veth)."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, PORT)
    with TransparentProxy() as proxy, Steering(proxy_ports=ProxyPorts(tcp4=proxy.port)) as st:
        st.maps.set_policy(
            ingress={PolicyKey(endpoint_id=EP_B, identity=ID_A, port=PORT, proto=IPPROTO_TCP): PolicyEntry(verdict=Verdict.REDIRECT)},
            egress={},
        )
        register(st, pods, b_ingress=True)
        assert call(a, b.ipv4, PORT) == f"from {a.ipv4} got hi"
        assert len(proxy.flows) == 1


def test_udp_redirect(pods: Topology) -> None:
    """UDP: the proxy reads the original destination (IP_RECVORIGDSTADDR) and the pod gets the answer from it."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, PORT)
    with TransparentProxy(udp=True) as proxy, Steering(proxy_ports=ProxyPorts(udp4=proxy.port)) as st:
        st.maps.set_policy(egress=_redirect(PORT, IPPROTO_UDP), ingress={})
        register(st, pods, a_egress=True, b_egress=True)
        for i in range(2):
            assert call(a, b.ipv4, PORT, proto="udp", payload=f"q{i}") == f"proxied from {a.ipv4} got q{i}"
        assert [orig for _client, orig in proxy.flows] == [(str(b.ipv4), PORT)] * 2
        assert st.read_drop_events() == []


def test_ipv6_tcp_and_udp_redirect(pods: Topology) -> None:
    """IPv6 redirect: IPV6_TRANSPARENT listener, server sees pod A's IPv6 address; UDP v6 too."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, PORT)
    with (
        TransparentProxy(family=socket.AF_INET6) as tcp6,
        TransparentProxy(family=socket.AF_INET6, udp=True) as udp6,
        Steering(proxy_ports=ProxyPorts(tcp6=tcp6.port, udp6=udp6.port)) as st,
    ):
        st.maps.set_policy(egress={**_redirect(PORT, IPPROTO_TCP), **_redirect(PORT, IPPROTO_UDP)}, ingress={})
        register(st, pods, a_egress=True, b_egress=True)
        assert call(a, b.ipv6, PORT) == f"from {a.ipv6} got hi"
        assert tcp6.flows[0][1] == (str(b.ipv6), PORT)
        assert call(a, b.ipv6, PORT, proto="udp") == f"proxied from {a.ipv6} got hi"
        assert udp6.flows[0][1][:2] == (str(b.ipv6), PORT)


@pytest.mark.parametrize("sockmap", [False, True], ids=["sockmap-off", "sockmap-on"])
@pytest.mark.parametrize("keep_source_port", [False, True], ids=["ephemeral-upstream-port", "same-upstream-port"])
def test_sockmap_same_result(pods: Topology, sockmap: bool, keep_source_port: bool) -> None:
    """The sockmap accelerator changes no result: same answers on and off, and when on it carries bytes."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, PORT)
    with (
        TransparentProxy(keep_source_port=keep_source_port) as proxy,
        Steering(proxy_ports=ProxyPorts(tcp4=proxy.port), sockmap=sockmap, sockmap_ports=[PORT]) as st,
    ):
        st.maps.set_policy(egress=_redirect(PORT, IPPROTO_TCP), ingress={})
        register(st, pods, a_egress=True)
        for i in range(3):
            assert call(a, b.ipv4, PORT, payload=f"m{i}") == f"from {a.ipv4} got m{i}"
        assert len(proxy.flows) == 3
        if sockmap:
            stats = st.sockmap.stats()
            assert stats["sockets_added"] >= 12, stats  # 4 sockets per proxied connection
            assert stats["redirected"] >= 3, stats
        else:
            assert st.sockmap is None


def test_sockmap_ipv6(pods: Topology) -> None:
    """The accelerator pairs IPv6 sockets too (keys hold 16-byte addresses) and gives the same answers."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, PORT)
    with (
        TransparentProxy(family=socket.AF_INET6) as proxy,
        Steering(proxy_ports=ProxyPorts(tcp6=proxy.port), sockmap=True, sockmap_ports=[PORT]) as st,
    ):
        st.maps.set_policy(egress=_redirect(PORT, IPPROTO_TCP), ingress={})
        register(st, pods, a_egress=True)
        for i in range(3):
            assert call(a, b.ipv6, PORT, payload=f"m{i}") == f"from {a.ipv6} got m{i}"
        stats = st.sockmap.stats()
        assert stats["sockets_added"] >= 12, stats
        assert stats["redirected"] >= 3, stats
