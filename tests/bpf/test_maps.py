"""Map logic without attaching: key/value packing, wildcard lookup order, LPM ipcache, generations, conntrack.

The tc program is loaded but not attached and run on hand-built packets with BPF_PROG_TEST_RUN
(the skb comes from loopback, ifindex 1, which the tests register as the source endpoint).

| case | peer identity | port/proto  | first matching key            | outcome   |
|------|---------------|-------------|-------------------------------|-----------|
| 1    | 200           | 80/tcp      | (200, 80, tcp) PASS           | pass      |
| 2    | 200           | 81/tcp      | (200, any, tcp) DROP          | drop      |
| 3    | 200           | 53/udp      | (200, any, any) PASS          | pass      |
| 4    | 200           | 443/tcp     | (200, any, tcp) DROP          | drop      |
| 5    | 300 (/16)     | 443/tcp     | (any, 443, tcp) PASS          | pass      |
| 6    | 300 (/16)     | 53/udp      | (any, any, udp) DROP          | drop      |
| 7    | 300 (/16)     | 22/tcp      | (any, any, any) REDIRECT      | redirect  |
| 8    | world         | 443/tcp     | (any, 443, tcp) PASS          | pass      |
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_
from membrane.bpf.maps import (
    ANY_IDENTITY,
    IPPROTO_TCP,
    IPPROTO_UDP,
    WORLD_IDENTITY,
    DropReason,
    Endpoint,
    PolicyDirection,
    PolicyEntry,
    PolicyKey,
    Verdict,
)
from membrane.bpf.steer import Steering

from tests.bpf.prog_run import ACK, RST, TC_ACT_OK, TC_ACT_SHOT, packet, run

pytestmark = pytest.mark.bpf

EP = 5
SRC = "10.1.0.1"
_ports = itertools.count(20000)


@pytest.fixture(scope="module", autouse=True)
def _root_and_clean() -> Iterator[None]:
    """One program serves the whole module: check for leftovers around the module, not each test."""
    import os

    from tests.helpers import kernel

    if os.geteuid() != 0:
        pytest.skip("needs root (BPF)")
    kernel.assert_clean()
    yield
    kernel.assert_clean()


@pytest.fixture(scope="module")
def loaded() -> Iterator[Steering]:
    with Steering(with_routing=False) as st:
        yield st


@pytest.fixture
def st(loaded: Steering) -> Iterator[Steering]:
    """A loaded, unattached program with empty policy, ipcache, endpoints and conntrack."""
    m = loaded.maps
    m.set_policy(ingress={}, egress={})
    m.set_policy(ingress={}, egress={})
    for net in m.identities():
        m.delete_identity(net)
    for idx in m.endpoints():
        m.delete_endpoint(idx)
    m.flush_conntrack()
    loaded.read_drop_events()
    yield loaded


def outcome(
    st: Steering, dst: str, dport: int, proto: int, src: str = SRC, sport: int | None = None, flags: int = 0x02
) -> str:
    """Run one packet; "pass", or "drop:<reason>"."""
    rc = run(st.prog_fd, packet(src, dst, sport or next(_ports), dport, proto, flags=flags))
    if rc == TC_ACT_OK:
        return "pass"
    assert rc == TC_ACT_SHOT
    events = st.read_drop_events()
    assert len(events) == 1
    return f"drop:{events[0].reason.name}"


def source_endpoint(st: Steering, *, egress: bool = True, ingress: bool = False, identity: int = 100) -> None:
    """Register loopback (ifindex 1, where test runs come from) as endpoint EP owning SRC."""
    st.maps.set_identity(f"{SRC}/32", identity, ifindex=1)
    st.maps.set_identity("fd00:10:244:1::1/128", identity, ifindex=1)
    st.maps.set_endpoint(1, Endpoint(endpoint_id=EP, identity=identity, enforce_egress=egress, enforce_ingress=ingress))


def k(identity: int, port: int = 0, proto: int = 0, ep: int = EP) -> PolicyKey:
    return PolicyKey(endpoint_id=ep, identity=identity, port=port, proto=proto)


PASS, DROP, REDIRECT = (PolicyEntry(verdict=v) for v in (Verdict.PASS, Verdict.DROP, Verdict.REDIRECT))
TABLE = {
    k(200, 80, IPPROTO_TCP): PASS,
    k(200, 0, IPPROTO_TCP): DROP,
    k(200): PASS,
    k(ANY_IDENTITY, 443, IPPROTO_TCP): PASS,
    k(ANY_IDENTITY, 0, IPPROTO_UDP): DROP,
    k(ANY_IDENTITY): REDIRECT,
}
CASES = [
    ("10.2.0.2", 80, IPPROTO_TCP, "pass"),
    ("10.2.0.2", 81, IPPROTO_TCP, "drop:EGRESS_DENIED"),
    ("10.2.0.2", 53, IPPROTO_UDP, "pass"),
    ("10.2.0.2", 443, IPPROTO_TCP, "drop:EGRESS_DENIED"),
    ("10.2.9.9", 443, IPPROTO_TCP, "pass"),
    ("10.2.9.9", 53, IPPROTO_UDP, "drop:EGRESS_DENIED"),
    ("10.2.9.9", 22, IPPROTO_TCP, "drop:PROXY_UNAVAILABLE"),  # REDIRECT, but no proxy listens
    ("10.3.0.1", 443, IPPROTO_TCP, "pass"),
]


@pytest.mark.parametrize(("dst", "port", "proto", "expected"), CASES)
def test_wildcard_lookup_order(st: Steering, dst: str, port: int, proto: int, expected: str) -> None:
    """The most specific entry wins: identity before any-identity, port before any-port, proto before any-proto."""
    st.maps.set_identity("10.2.0.0/16", 300)
    st.maps.set_identity("10.2.0.2/32", 200)
    st.maps.set_policy(egress=TABLE, ingress={})
    source_endpoint(st)
    assert outcome(st, dst, port, proto) == expected


def test_ipcache_longest_prefix_and_world(st: Steering) -> None:
    """The ipcache is an LPM trie: /32 beats /16, and an unknown address is reserved:world in drop events."""
    st.maps.set_identity("10.2.0.0/16", 300)
    st.maps.set_identity("10.2.0.2/32", 200)
    st.maps.set_identity("fd00:10:244::/48", 400)
    source_endpoint(st)
    for dst, identity in (("10.2.0.2", 200), ("10.2.7.7", 300), ("10.9.0.1", WORLD_IDENTITY)):
        run(st.prog_fd, packet(SRC, dst, next(_ports), 80))
        assert st.read_drop_events()[0].dst_identity == identity
    run(st.prog_fd, packet("fd00:10:244:1::1", "fd00:10:244:2::2", next(_ports), 80))
    ev = st.read_drop_events()[0]
    assert (ev.dst, ev.dst_identity, ev.src_identity) == (ipaddress.ip_address("fd00:10:244:2::2"), 400, 100)
    assert st.maps.identities()[ipaddress.ip_network("10.2.0.0/16")] == (300, 0)


def test_ingress_policy_of_local_destination(st: Steering) -> None:
    """From a non-endpoint device, the destination endpoint's ingress policy judges by the source's ipcache identity."""
    st.maps.set_identity("10.1.0.0/24", 700)
    st.maps.set_identity("10.2.0.2/32", 200, ifindex=999)
    st.maps.set_endpoint(999, Endpoint(endpoint_id=9, identity=200, enforce_ingress=True))
    st.maps.set_policy(ingress={k(700, 80, IPPROTO_TCP, ep=9): PASS}, egress={})
    assert outcome(st, "10.2.0.2", 80, IPPROTO_TCP) == "pass"
    assert outcome(st, "10.2.0.2", 81, IPPROTO_TCP) == "drop:INGRESS_DENIED"
    assert outcome(st, "10.2.0.2", 80, IPPROTO_TCP, src="10.1.1.1") == "drop:INGRESS_DENIED"  # world
    assert outcome(st, "10.2.0.3", 81, IPPROTO_TCP) == "pass"  # not a local endpoint: not ours to judge


def test_unenforced_endpoint_allows_all(st: Steering) -> None:
    """No enforcement flag means no policy selects the endpoint: everything passes, even with DROP entries."""
    source_endpoint(st, egress=False)
    st.maps.set_policy(egress={k(ANY_IDENTITY): DROP}, ingress={})
    assert outcome(st, "10.2.0.2", 80, IPPROTO_TCP) == "pass"


def test_conntrack_passes_replies_and_established(st: Steering) -> None:
    """A flow allowed once is tracked: its later packets and its replies pass although policy denies them now."""
    source_endpoint(st)
    st.maps.set_identity("10.2.0.2/32", 200, ifindex=1)  # the peer's replies also come from ifindex 1 here
    st.maps.set_policy(egress={k(ANY_IDENTITY, 80, IPPROTO_TCP): PASS}, ingress={})
    assert outcome(st, "10.2.0.2", 80, IPPROTO_TCP, sport=40000) == "pass"
    st.maps.set_policy(egress={}, ingress={})
    assert outcome(st, "10.2.0.2", 80, IPPROTO_TCP, sport=40000) == "pass"  # established
    assert outcome(st, "10.2.0.2", 80, IPPROTO_TCP, sport=40001) == "drop:EGRESS_DENIED"  # new flow
    # the reply, coming from the peer (same device in a test run) to the original source port
    assert outcome(st, SRC, 40000, IPPROTO_TCP, src="10.2.0.2", sport=80) == "pass"
    assert outcome(st, SRC, 40002, IPPROTO_TCP, src="10.2.0.2", sport=80) == "drop:EGRESS_DENIED"
    (flow,) = st.maps.conntrack()
    assert (str(flow.src), str(flow.dst), flow.sport, flow.dport, flow.verdict) == (SRC, "10.2.0.2", 40000, 80, Verdict.PASS)
    assert (flow.src_identity, flow.dst_identity) == (100, 200)
    st.maps.flush_conntrack()
    assert outcome(st, "10.2.0.2", 80, IPPROTO_TCP, sport=40000) == "drop:EGRESS_DENIED"


def test_conntrack_lifetimes() -> None:
    """An idle entry past its lifetime is judged again: UDP after MBR_CT_UDP_LIFETIME_S, TCP after FIN/RST after MBR_CT_CLOSE_LIFETIME_S."""
    with Steering(with_routing=False, defines={"MBR_CT_UDP_LIFETIME_S": 0, "MBR_CT_CLOSE_LIFETIME_S": 0}) as st:
        source_endpoint(st)
        allow = {k(ANY_IDENTITY, 80, IPPROTO_TCP): PASS, k(ANY_IDENTITY, 53, IPPROTO_UDP): PASS}
        st.maps.set_policy(egress=allow, ingress={})
        assert outcome(st, "10.2.0.2", 80, IPPROTO_TCP, sport=41000) == "pass"
        assert outcome(st, "10.2.0.2", 53, IPPROTO_UDP, sport=41000) == "pass"
        st.maps.set_policy(egress={}, ingress={})
        # TCP: established survives the policy change (6 h lifetime) until a RST; then it is judged again
        assert outcome(st, "10.2.0.2", 80, IPPROTO_TCP, sport=41000, flags=ACK) == "pass"
        assert outcome(st, "10.2.0.2", 80, IPPROTO_TCP, sport=41000, flags=RST) == "pass"
        assert [f.closing for f in st.maps.conntrack() if f.proto == IPPROTO_TCP] == [True]
        assert outcome(st, "10.2.0.2", 80, IPPROTO_TCP, sport=41000, flags=ACK) == "drop:EGRESS_DENIED"
        # UDP with a zero lifetime: the next datagram is a new flow
        assert outcome(st, "10.2.0.2", 53, IPPROTO_UDP, sport=41000) == "drop:EGRESS_DENIED"
        assert st.maps.conntrack() == []


def test_generation_swap_writes_only_differences(st: Steering) -> None:
    """A whole-policy swap writes into the inactive generation only what differs there, then flips once."""
    m = st.maps
    gen = m.generation
    p1 = {k(200, 80, IPPROTO_TCP): PASS, k(300): DROP}
    p2 = {k(200, 80, IPPROTO_TCP): PASS, k(400, 53, IPPROTO_UDP): PASS}
    assert m.set_policy(egress=p1, ingress={}) == 2
    assert m.generation == 1 - gen
    assert m.set_policy(egress=p2, ingress={}) == 2  # the other buffer was empty
    assert m.set_policy(egress=p1, ingress={}) == 0  # that buffer already holds p1: only the flip
    assert m.policy(PolicyDirection.EGRESS) == p1
    raw = m.raw_policy(PolicyDirection.EGRESS)
    assert {key for (g, key) in raw if g == m.generation} == set(p1)
    assert {key for (g, key) in raw if g != m.generation} == set(p2)


def test_inactive_generation_has_no_effect(st: Steering) -> None:
    """Entries of the inactive generation are never consulted: a PASS there does not open anything."""
    m = st.maps
    source_endpoint(st)
    m.set_policy(egress={k(ANY_IDENTITY): PASS}, ingress={})
    m.set_policy(egress={}, ingress={})  # the PASS now sits in the inactive generation
    assert any(key == k(ANY_IDENTITY) for (_g, key) in m.raw_policy(PolicyDirection.EGRESS))
    assert outcome(st, "10.2.0.2", 80, IPPROTO_TCP) == "drop:EGRESS_DENIED"


def test_spoofed_source_is_dropped(st: Steering) -> None:
    """From an endpoint's device, a source the ipcache does not map to that device is dropped as SPOOFED."""
    source_endpoint(st, egress=False)
    assert outcome(st, "10.2.0.2", 80, IPPROTO_TCP) == "pass"
    assert outcome(st, "10.2.0.2", 80, IPPROTO_TCP, src="10.1.0.9") == "drop:SPOOFED"
    st.maps.set_identity("10.1.0.9/32", 100, ifindex=77)  # known, but another endpoint's address
    assert outcome(st, "10.2.0.2", 80, IPPROTO_TCP, src="10.1.0.9") == "drop:SPOOFED"
    assert st.maps.drop_counts()[DropReason.SPOOFED] == 2


def test_endpoint_and_config_round_trip(st: Steering) -> None:
    """Endpoint flags and config slots read back exactly as written."""
    ep = Endpoint(endpoint_id=7, identity=1234, enforce_ingress=True)
    st.maps.set_endpoint(42, ep)
    assert st.maps.endpoints() == {42: ep}
    st.maps.set_proxy_ports(tcp4=15001, udp6=15053)
    from membrane.bpf.maps import ConfigSlot

    assert [st.maps.config(s) for s in (ConfigSlot.TCP4_PORT, ConfigSlot.TCP6_PORT, ConfigSlot.UDP6_PORT)] == [15001, 0, 15053]
    with pytest.raises(ValueError):
        st.maps.set_config(ConfigSlot.GEN, 1)
    with pytest.raises(ValueError):
        st.maps.set_endpoint(1, Endpoint(endpoint_id=0, identity=1))


def test_policy_key_validation() -> None:
    """A port needs a protocol with ports, ICMP ports are icmp_port(type), ports fit 16 bits."""
    for bad in (
        {"port": 80},
        {"port": 70000, "proto": IPPROTO_TCP},
        {"proto": 256},
        {"port": 80, "proto": 47},  # GRE has no ports
        {"port": 8, "proto": 1},  # an ICMP type must be icmp_port(8)
    ):
        with pytest.raises(ValueError):
            PolicyKey(endpoint_id=1, **bad)


keys = st_.builds(
    PolicyKey,
    endpoint_id=st_.integers(1, 3),
    identity=st_.sampled_from([0, 200, 300]),
    port=st_.sampled_from([0]),
    proto=st_.sampled_from([0, IPPROTO_TCP, IPPROTO_UDP]),
) | st_.builds(
    PolicyKey,
    endpoint_id=st_.integers(1, 3),
    identity=st_.sampled_from([0, 200]),
    port=st_.integers(1, 3),
    proto=st_.sampled_from([IPPROTO_TCP, IPPROTO_UDP]),
)
policies = st_.dictionaries(keys, st_.sampled_from([PASS, DROP, REDIRECT, PolicyEntry(verdict=Verdict.REDIRECT, proxy_port=15001)]), max_size=12)


@settings(max_examples=25, deadline=None)
@given(st_.lists(st_.tuples(policies, policies), min_size=1, max_size=4))
def test_kernel_holds_exactly_the_last_policy(loaded: Steering, sequence: list[tuple[dict[PolicyKey, PolicyEntry], dict[PolicyKey, PolicyEntry]]]) -> None:
    """After any sequence of swaps the active generation in the kernel equals the last policy, per direction."""
    m = loaded.maps
    for ingress, egress in sequence:
        m.set_policy(ingress=ingress, egress=egress, sleep=lambda _s: None)
    for direction, wanted in ((PolicyDirection.INGRESS, ingress), (PolicyDirection.EGRESS, egress)):
        active = {key: e for (g, key), e in m.raw_policy(direction).items() if g == m.generation}
        assert active == wanted
        assert m.drop_counts()[DropReason.EGRESS_DENIED] >= 0
