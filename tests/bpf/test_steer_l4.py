"""tc steering on real veths: L3/L4 pass and drop, drop events and counters, conntrack, IPv6."""

from __future__ import annotations

import ipaddress

import pytest
from membrane.bpf.maps import (
    ANY_IDENTITY,
    IPPROTO_TCP,
    IPPROTO_UDP,
    DropReason,
    Endpoint,
    PolicyEntry,
    PolicyKey,
    Verdict,
)
from membrane.bpf.steer import Steering

from tests.bpf.conftest import call, start_server
from tests.helpers.netns import Topology

pytestmark = pytest.mark.bpf

ID_A, ID_B = 1001, 1002
EP_A, EP_B = 1, 2
PORT = 8080


def register(st: Steering, topo: Topology, *, a_egress: bool = False, b_ingress: bool = False, b_egress: bool = False) -> None:
    """Both pods as endpoints, their addresses in the ipcache, and tc attached on both veths."""
    a, b = topo.pods["a"], topo.pods["b"]
    for pod, ident in ((a, ID_A), (b, ID_B)):
        st.maps.set_identity(f"{pod.ipv4}/32", ident, ifindex=pod.host_ifindex)
        st.maps.set_identity(f"{pod.ipv6}/128", ident, ifindex=pod.host_ifindex)
    st.maps.set_endpoint(a.host_ifindex, Endpoint(endpoint_id=EP_A, identity=ID_A, enforce_egress=a_egress))
    st.maps.set_endpoint(b.host_ifindex, Endpoint(endpoint_id=EP_B, identity=ID_B, enforce_ingress=b_ingress, enforce_egress=b_egress))
    st.attach(a.host_if)
    st.attach(b.host_if)


def test_no_policy_allows_all(pods: Topology) -> None:
    """An endpoint no policy selects (no enforcement flag) allows every flow, as in Cilium's default-allow."""
    start_server(pods, pods.pods["b"], PORT)
    with Steering() as st:
        register(st, pods)
        assert call(pods.pods["a"], pods.pods["b"].ipv4, PORT) == f"from {pods.pods['a'].ipv4} got hi"
        assert st.maps.drop_counts()[DropReason.EGRESS_DENIED] == 0


def test_egress_pass_and_default_deny(pods: Topology) -> None:
    """With egress enforced, an allowed (identity, port, TCP) passes and any other port is dropped with an event."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, PORT)
    start_server(pods, b, PORT + 1)
    with Steering() as st:
        st.maps.set_policy(
            egress={PolicyKey(endpoint_id=EP_A, identity=ID_B, port=PORT, proto=IPPROTO_TCP): PolicyEntry(verdict=Verdict.PASS)},
            ingress={},
        )
        register(st, pods, a_egress=True)
        assert call(a, b.ipv4, PORT) == f"from {a.ipv4} got hi"
        assert call(a, b.ipv4, PORT + 1, timeout_s=1) == "TIMEOUT"
        events = st.read_drop_events(timeout_ms=500)
        assert events, "no drop event"
        ev = events[0]
        assert (ev.src, ev.dst, ev.dport, ev.proto) == (a.ipv4, b.ipv4, PORT + 1, IPPROTO_TCP)
        assert (ev.src_identity, ev.dst_identity, ev.reason) == (ID_A, ID_B, DropReason.EGRESS_DENIED)
        assert ev.ifindex == a.host_ifindex
        assert ev.sport > 1024
        # the SYN and its retransmissions are each counted
        assert st.maps.drop_counts()[DropReason.EGRESS_DENIED] >= 1


def test_ingress_explicit_drop(pods: Topology) -> None:
    """An explicit DROP entry in the destination's ingress policy drops the flow at the source veth."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, PORT)
    with Steering() as st:
        st.maps.set_policy(
            ingress={PolicyKey(endpoint_id=EP_B, identity=ID_A, port=PORT, proto=IPPROTO_TCP): PolicyEntry(verdict=Verdict.DROP),
                     PolicyKey(endpoint_id=EP_B): PolicyEntry(verdict=Verdict.PASS)},
            egress={},
        )
        register(st, pods, b_ingress=True)
        assert call(a, b.ipv4, PORT, timeout_s=1) == "TIMEOUT"
        ev = st.read_drop_events(timeout_ms=500)[0]
        assert (ev.reason, ev.src_identity, ev.dst_identity, ev.dport) == (DropReason.INGRESS_DENIED, ID_A, ID_B, PORT)
        # UDP to the same port is allowed by the (any identity, any port, any proto) entry
        assert call(a, b.ipv4, PORT, proto="udp") == f"from {a.ipv4} got hi"


def test_conntrack_lets_replies_through(pods: Topology) -> None:
    """Policy is stateful: B's egress is deny-all, yet replies to A's allowed connection reach A."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, PORT)
    start_server(pods, a, PORT)
    with Steering() as st:
        st.maps.set_policy(
            ingress={PolicyKey(endpoint_id=EP_B, identity=ID_A, port=PORT, proto=IPPROTO_TCP): PolicyEntry(verdict=Verdict.PASS)},
            egress={},
        )
        register(st, pods, b_ingress=True, b_egress=True)
        assert call(a, b.ipv4, PORT) == f"from {a.ipv4} got hi"
        assert call(a, b.ipv4, PORT, proto="udp", timeout_s=1) == "TIMEOUT"  # UDP not allowed in
        # B may not open connections itself (egress enforced, empty policy)
        assert call(b, a.ipv4, PORT, timeout_s=1) == "TIMEOUT"
        flows = [f for f in st.maps.conntrack() if f.dport == PORT]
        assert {(f.src, f.dst, f.proto, f.verdict) for f in flows} == {(a.ipv4, b.ipv4, IPPROTO_TCP, Verdict.PASS)}
        assert {e.reason for e in st.read_drop_events(timeout_ms=200)} == {DropReason.INGRESS_DENIED, DropReason.EGRESS_DENIED}


def test_ipv6_pass_and_drop(pods: Topology) -> None:
    """IPv6 flows are judged like IPv4: wildcard-identity TCP entry passes, UDP is denied and reported."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, PORT)
    with Steering() as st:
        st.maps.set_policy(
            egress={PolicyKey(endpoint_id=EP_A, identity=ANY_IDENTITY, port=PORT, proto=IPPROTO_TCP): PolicyEntry(verdict=Verdict.PASS)},
            ingress={},
        )
        register(st, pods, a_egress=True)
        assert call(a, b.ipv6, PORT) == f"from {a.ipv6} got hi"
        assert call(a, b.ipv6, PORT, proto="udp", timeout_s=1) == "TIMEOUT"
        ev = st.read_drop_events(timeout_ms=500)[0]
        assert isinstance(ev.src, ipaddress.IPv6Address)
        assert (ev.src, ev.dst, ev.dport, ev.proto) == (a.ipv6, b.ipv6, PORT, IPPROTO_UDP)


def test_spoofed_source_dropped(pods: Topology) -> None:
    """A pod sending from an address that is not its own (per the ipcache) is dropped as SPOOFED."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, PORT)
    fake = f"10.244.{pods.subnet}.200"
    a.run(["ip", "addr", "add", f"{fake}/32", "dev", "eth0"])
    with Steering() as st:
        register(st, pods)  # no enforcement at all: only the spoof check applies
        assert call(a, b.ipv4, PORT) == f"from {a.ipv4} got hi"
        out = a.python(
            f"""
            import socket
            s = socket.socket(); s.settimeout(1); s.bind(("{fake}", 0))
            try:
                s.connect(("{b.ipv4}", {PORT})); print("CONNECTED")
            except OSError:
                print("TIMEOUT")
            """
        )
        assert out.stdout.strip() == "TIMEOUT"
        ev = st.read_drop_events(timeout_ms=500)[0]
        assert (str(ev.src), ev.reason, ev.src_identity) == (fake, DropReason.SPOOFED, ID_A)


def test_from_non_endpoint_device_judged_by_ingress(pods: Topology) -> None:
    """Traffic entering on a device that is not an endpoint (like the node device) meets the destination's ingress policy."""
    a, b = pods.pods["a"], pods.pods["b"]
    node = pods.add_pod("node")  # stands in for another node: attached, but not an endpoint
    start_server(pods, b, PORT)
    with Steering() as st:
        st.maps.set_identity(f"{node.ipv4}/32", 5000)  # a remote pod's identity, learned from the cluster
        st.maps.set_policy(
            ingress={PolicyKey(endpoint_id=EP_B, identity=5000, port=PORT, proto=IPPROTO_TCP): PolicyEntry(verdict=Verdict.PASS)},
            egress={},
        )
        register(st, pods, b_ingress=True)
        st.attach(node.host_if, host_egress=False)
        assert call(node, b.ipv4, PORT) == f"from {node.ipv4} got hi"
        assert call(node, b.ipv4, PORT, proto="udp", timeout_s=1) == "TIMEOUT"
        assert call(a, b.ipv4, PORT, timeout_s=1) == "TIMEOUT"  # identity 1001 is not allowed in
        reasons = [(e.src_identity, e.reason) for e in st.read_drop_events(timeout_ms=300)]
        assert (5000, DropReason.INGRESS_DENIED) in reasons
        assert (ID_A, DropReason.INGRESS_DENIED) in reasons
