"""Nothing passes unjudged: ICMP/ICMPv6, other IP protocols, fragments, IPv6 extension headers and
host-originated traffic meet policy in the kernel (real veths, real sockets, issue 13 item 3)."""

from __future__ import annotations

import socket
import subprocess

import pytest
from membrane.bpf.maps import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    DropReason,
    Endpoint,
    PolicyEntry,
    PolicyKey,
    Verdict,
    icmp_port,
)
from membrane.bpf.steer import Steering

from tests.bpf.conftest import call, start_server
from tests.helpers.netns import Pod, Topology

pytestmark = pytest.mark.bpf

ID_A, ID_B = 1001, 1002
EP_A, EP_B = 1, 2
PORT = 8080
HOST_ID = 1
PASS = PolicyEntry(verdict=Verdict.PASS)

# Ping from a pod with a ping socket (ICMP echo without raw privileges); prints "REPLY" or "TIMEOUT".
PING = """
import socket, subprocess, sys
subprocess.run(["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"], check=True)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
s.settimeout(float(sys.argv[2]))
s.sendto(b"\\x08\\x00\\x00\\x00\\x00\\x00\\x00\\x01payload", (sys.argv[1], 0))
try:
    data = s.recv(2048)
    print("REPLY" if data[0] == 0 else f"TYPE {data[0]}")
except (socket.timeout, TimeoutError):
    print("TIMEOUT")
"""

# The same over IPv6 (the ping socket group range covers ICMPv6 too).
PING6 = PING.replace("AF_INET,", "AF_INET6,").replace("IPPROTO_ICMP)", "IPPROTO_ICMPV6)").replace(
    '"\\x08\\x00', '"\\x80\\x00'
).replace("data[0] == 0", "data[0] == 129")

# Send one IP datagram of protocol argv[2] with a raw socket (GRE, SCTP, ...).
RAW_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, int(sys.argv[2]))
s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[1], 0))
"""

# Receive one datagram of protocol argv[1] on a raw socket; prints "GOT <proto>" or "TIMEOUT".
RAW_RECV = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, int(sys.argv[1]))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    data = s.recv(4096)
    print("GOT", data[9], flush=True)
except (socket.timeout, TimeoutError):
    print("TIMEOUT", flush=True)
"""

# A UDP datagram of argv[3] bytes, fragmented by the sender (DF off); prints the answer's length.
BIG_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: fragment, never DF
s.settimeout(float(sys.argv[4]))
s.sendto(b"x" * int(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
try:
    print("ANSWER", len(s.recvfrom(65535)[0]))
except (socket.timeout, TimeoutError):
    print("TIMEOUT")
"""

# UDP over IPv6 with a destination-options extension header on every packet.
V6_DSTOPTS = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))  # PadN
s.settimeout(float(sys.argv[3]))
s.sendto(b"opts", (sys.argv[1], int(sys.argv[2])))
try:
    print(s.recvfrom(2048)[0].decode())
except (socket.timeout, TimeoutError):
    print("TIMEOUT")
"""

# A connected UDP socket to a closed port: the ICMP port unreachable is reported as ECONNREFUSED.
UDP_REFUSED = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[3]))
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"anyone?")
try:
    s.recv(100)
    print("ANSWER")
except ConnectionRefusedError:
    print("REFUSED")
except (socket.timeout, TimeoutError):
    print("TIMEOUT")
"""


def py(pod: Pod, code: str, *args: object, timeout: float = 30) -> str:
    import sys

    return pod.run([sys.executable, "-c", code, *map(str, args)], timeout=timeout).stdout.strip()


def register(st: Steering, topo: Topology, *, a_egress: bool = False, b_ingress: bool = False, b_egress: bool = False) -> None:
    """Both pods as endpoints, their addresses in the ipcache, tc attached on both veths (both hooks)."""
    a, b = topo.pods["a"], topo.pods["b"]
    for pod, ident in ((a, ID_A), (b, ID_B)):
        st.maps.set_identity(f"{pod.ipv4}/32", ident, ifindex=pod.host_ifindex)
        st.maps.set_identity(f"{pod.ipv6}/128", ident, ifindex=pod.host_ifindex)
    st.maps.set_endpoint(a.host_ifindex, Endpoint(endpoint_id=EP_A, identity=ID_A, enforce_egress=a_egress))
    st.maps.set_endpoint(b.host_ifindex, Endpoint(endpoint_id=EP_B, identity=ID_B, enforce_ingress=b_ingress, enforce_egress=b_egress))
    st.attach(a.host_if)
    st.attach(b.host_if)


def test_ping_allowed_by_icmp_type_denied_otherwise(pods: Topology) -> None:
    """An echo request passes only with an entry for ICMP type 8; its reply passes through conntrack
    although b's egress allows nothing; without the entry it is dropped, counted and reported."""
    a, b = pods.pods["a"], pods.pods["b"]
    with Steering() as st:
        st.maps.set_policy(
            egress={PolicyKey(endpoint_id=EP_A, identity=ID_B, port=icmp_port(8), proto=IPPROTO_ICMP): PASS},
            ingress={},
        )
        register(st, pods, a_egress=True, b_egress=True)
        assert py(a, PING, b.ipv4, 3) == "REPLY"
        st.maps.set_policy(
            egress={PolicyKey(endpoint_id=EP_A, identity=ID_B, port=icmp_port(13), proto=IPPROTO_ICMP): PASS},
            ingress={},
        )
        st.maps.flush_conntrack()
        assert py(a, PING, b.ipv4, 1) == "TIMEOUT"
        assert st.maps.drop_counts()[DropReason.EGRESS_DENIED] >= 1
        events = st.read_drop_events(timeout_ms=300)
        assert [e.reason for e in events if e.proto == IPPROTO_ICMP][:1] == [DropReason.EGRESS_DENIED]


def test_ping6_allowed_by_type_with_neighbour_discovery_passing(pods: Topology) -> None:
    """Over IPv6, with only ICMPv6 echo request allowed on a's egress and nothing on b's, the ping is
    answered: neighbour discovery (which the pods need first) always passes, the reply by conntrack.
    Without the entry the echo request is dropped as ICMPv6."""
    a, b = pods.pods["a"], pods.pods["b"]
    assert "\\x80\\x00" in PING6
    assert "IPPROTO_ICMPV6" in PING6
    with Steering() as st:
        st.maps.set_policy(
            egress={PolicyKey(endpoint_id=EP_A, identity=ID_B, port=icmp_port(128), proto=IPPROTO_ICMPV6): PASS},
            ingress={},
        )
        register(st, pods, a_egress=True, b_egress=True)
        assert py(a, PING6, b.ipv6, 3) == "REPLY"
        assert st.maps.drop_counts()[DropReason.EGRESS_DENIED] == 0
        st.maps.set_policy(egress={}, ingress={})
        st.maps.flush_conntrack()
        assert py(a, PING6, b.ipv6, 1) == "TIMEOUT"
        events = st.read_drop_events(timeout_ms=300)
        assert [e.reason for e in events if e.proto == IPPROTO_ICMPV6][:1] == [DropReason.EGRESS_DENIED]


def test_l3_only_allow_covers_icmp_and_gre(pods: Topology) -> None:
    """The L3-only key (identity, ANY_PORT, ANY_PROTO) lets ICMP and GRE through; a TCP-only allow does
    not: GRE is then dropped and counted with port 0 for protocol 47."""
    a, b = pods.pods["a"], pods.pods["b"]
    gre = "00000800" + "45000014000000004011" + "0000" + "0a000001" + "0a000002"  # GRE carrying a stub IPv4 header
    with Steering() as st:
        st.maps.set_policy(ingress={}, egress={PolicyKey(endpoint_id=EP_A, identity=ID_B): PASS})
        register(st, pods, a_egress=True)
        assert py(a, PING, b.ipv4, 3) == "REPLY"
        recv = pods.track(b.python_popen(RAW_RECV.replace("sys.argv[1]", "47").replace("sys.argv[2]", "3")))
        assert recv.stdout is not None
        assert recv.stdout.readline().strip() == "ready"
        py(a, RAW_SEND, b.ipv4, 47, gre)
        assert recv.stdout.readline().strip() == "GOT 47"

        st.maps.set_policy(ingress={}, egress={PolicyKey(endpoint_id=EP_A, identity=ID_B, port=PORT, proto=IPPROTO_TCP): PASS})
        st.maps.flush_conntrack()
        st.read_drop_events()
        recv = pods.track(b.python_popen(RAW_RECV.replace("sys.argv[1]", "47").replace("sys.argv[2]", "1.5")))
        assert recv.stdout is not None
        assert recv.stdout.readline().strip() == "ready"
        py(a, RAW_SEND, b.ipv4, 47, gre)
        assert recv.stdout.readline().strip() == "TIMEOUT"
        assert py(a, PING, b.ipv4, 1) == "TIMEOUT"
        protos = {(e.proto, e.dport, e.reason) for e in st.read_drop_events(timeout_ms=300)}
        assert (47, 0, DropReason.EGRESS_DENIED) in protos
        assert (IPPROTO_ICMP, 0, DropReason.EGRESS_DENIED) in protos


def test_unenforced_endpoint_passes_other_protocols(pods: Topology) -> None:
    """No behaviour change without enforcement: ping and GRE between unenforced endpoints pass."""
    a, b = pods.pods["a"], pods.pods["b"]
    with Steering() as st:
        register(st, pods)
        assert py(a, PING, b.ipv4, 3) == "REPLY"
        assert sum(st.maps.drop_counts().values()) == 0


def test_fragmented_udp_follows_its_first_fragment(pods: Topology) -> None:
    """A 4000-byte UDP datagram leaves the pod in fragments: to an allowed port all of them arrive (and
    the fragmented answer comes back); to a denied port the first is dropped as denied and every
    later one as FRAG_NOT_FOUND, so nothing of it is delivered."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, PORT)
    start_server(pods, b, PORT + 1)
    with Steering() as st:
        st.maps.set_policy(ingress={}, egress={PolicyKey(endpoint_id=EP_A, identity=ID_B, port=PORT, proto=IPPROTO_UDP): PASS})
        register(st, pods, a_egress=True, b_egress=True)
        answer = py(a, BIG_UDP, b.ipv4, PORT, 4000, 3)
        assert answer == f"ANSWER {len(f'from {a.ipv4} got ') + 2048}"  # the server reads 2048 bytes of it
        assert st.maps.drop_counts()[DropReason.FRAG_NOT_FOUND] == 0
        assert py(a, BIG_UDP, b.ipv4, PORT + 1, 4000, 1) == "TIMEOUT"
        counts = st.maps.drop_counts()
        assert counts[DropReason.EGRESS_DENIED] == 1
        assert counts[DropReason.FRAG_NOT_FOUND] >= 2  # 4000 bytes over a 1500 MTU: 3 fragments


def test_ipv6_destination_options_are_judged(pods: Topology) -> None:
    """IPv6 UDP with a destination-options header is judged by its real port, not passed unjudged."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, PORT)
    start_server(pods, b, PORT + 1)
    with Steering() as st:
        st.maps.set_policy(ingress={}, egress={PolicyKey(endpoint_id=EP_A, identity=ID_B, port=PORT, proto=IPPROTO_UDP): PASS})
        register(st, pods, a_egress=True)
        assert py(a, V6_DSTOPTS, b.ipv6, PORT, 3) == f"from {a.ipv6} got opts"
        assert py(a, V6_DSTOPTS, b.ipv6, PORT + 1, 1) == "TIMEOUT"
        events = st.read_drop_events(timeout_ms=300)
        assert [(e.dport, e.proto, e.reason) for e in events][:1] == [(PORT + 1, IPPROTO_UDP, DropReason.EGRESS_DENIED)]


def test_icmp_error_for_tracked_flow_is_related(pods: Topology) -> None:
    """b answers a datagram to a closed port with port unreachable: b's egress allows nothing, yet the
    error passes as related to a's tracked flow (the client sees ECONNREFUSED)."""
    a, b = pods.pods["a"], pods.pods["b"]
    with Steering() as st:
        st.maps.set_policy(ingress={}, egress={PolicyKey(endpoint_id=EP_A, identity=ID_B, port=PORT, proto=IPPROTO_UDP): PASS})
        register(st, pods, a_egress=True, b_egress=True)
        assert py(a, UDP_REFUSED, b.ipv4, PORT, 3) == "REFUSED"
        assert st.maps.drop_counts()[DropReason.EGRESS_DENIED] == 0
        # an unrelated ICMP from b (an echo request) is judged by b's egress policy: dropped
        assert py(b, PING, a.ipv4, 1) == "TIMEOUT"
        assert st.maps.drop_counts()[DropReason.EGRESS_DENIED] >= 1


def _host_source(dst: object) -> str:
    out = subprocess.run(["ip", "route", "get", str(dst)], capture_output=True, text=True, check=True).stdout
    words = out.split()
    return words[words.index("src") + 1]


def _host_connect(dst: object, port: int, timeout_s: float) -> str:
    try:
        with socket.create_connection((str(dst), port), timeout=timeout_s) as s:
            s.sendall(b"hi")
            return s.recv(1024).decode()
    except TimeoutError:
        return "TIMEOUT"


def test_host_to_pod_judged_as_host_identity(pods: Topology) -> None:
    """A TCP connect from the node itself to a pod leaves through the pod veth's tc egress and meets the
    pod's ingress policy as identity 1 (host): allowed with a key for it, dropped and reported
    otherwise, and an L7 (REDIRECT) verdict there fails closed (PROXY_UNAVAILABLE)."""
    b = pods.pods["b"]
    start_server(pods, b, PORT)
    src = _host_source(b.ipv4)
    with Steering() as st:
        st.maps.set_identity(f"{src}/32", HOST_ID)
        st.maps.set_policy(ingress={PolicyKey(endpoint_id=EP_B, identity=HOST_ID, port=PORT, proto=IPPROTO_TCP): PASS}, egress={})
        register(st, pods, b_ingress=True)
        assert _host_connect(b.ipv4, PORT, 3) == f"from {src} got hi"
        st.maps.set_policy(ingress={PolicyKey(endpoint_id=EP_B, identity=ID_A, port=PORT, proto=IPPROTO_TCP): PASS}, egress={})
        st.maps.flush_conntrack()
        assert _host_connect(b.ipv4, PORT, 1) == "TIMEOUT"
        ev = st.read_drop_events(timeout_ms=300)[0]
        assert (str(ev.src), ev.src_identity, ev.reason) == (src, HOST_ID, DropReason.INGRESS_DENIED)
        # the pod a is still allowed (judged at its own veth, then passed by conntrack at b's egress)
        assert call(pods.pods["a"], b.ipv4, PORT) == f"from {pods.pods['a'].ipv4} got hi"
        st.maps.set_policy(
            ingress={PolicyKey(endpoint_id=EP_B, identity=HOST_ID, port=PORT, proto=IPPROTO_TCP): PolicyEntry(verdict=Verdict.REDIRECT)},
            egress={},
        )
        st.maps.flush_conntrack()
        assert _host_connect(b.ipv4, PORT, 1) == "TIMEOUT"
        assert st.maps.drop_counts()[DropReason.PROXY_UNAVAILABLE] >= 1


def test_proxy_upstream_for_a_remote_client_is_not_judged_again(pods: Topology) -> None:
    """A client on another node (a device with only the ingress hook) reaches b's L7 port through the
    proxy; the proxy's upstream, bound to the client's address with its own source port, leaves
    through b's host egress hook without a conntrack entry and is not taken for host traffic."""
    from membrane.bpf.steer import ProxyPorts

    from tests.bpf.tproxy import TransparentProxy

    b = pods.pods["b"]
    node = pods.add_pod("node")
    start_server(pods, b, PORT)
    with TransparentProxy(keep_source_port=False) as proxy, Steering(proxy_ports=ProxyPorts(tcp4=proxy.port)) as st:
        st.maps.set_identity(f"{node.ipv4}/32", 5000)
        st.maps.set_policy(
            ingress={PolicyKey(endpoint_id=EP_B, identity=5000, port=PORT, proto=IPPROTO_TCP): PolicyEntry(verdict=Verdict.REDIRECT)},
            egress={},
        )
        register(st, pods, b_ingress=True)
        st.attach(node.host_if, host_egress=False)
        assert call(node, b.ipv4, PORT) == f"from {node.ipv4} got hi"
        assert len(proxy.flows) == 1
        assert st.maps.drop_counts()[DropReason.PROXY_UNAVAILABLE] == 0
