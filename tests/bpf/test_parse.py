"""What the tc program makes of hand-built packets (BPF_PROG_TEST_RUN, not attached): IPv6 extension
header chains, IPv4/IPv6 fragments, ICMP errors quoting tracked flows, neighbour discovery, SCTP, GRE.

The skb comes from loopback (ifindex 1), registered as the source endpoint EP owning SRC/SRC6 with
egress enforced. Peer 10.2.0.2 / fd00:2::2 has identity 200.

| case                                  | packet                                          | outcome                |
|---------------------------------------|-------------------------------------------------|------------------------|
| v6 hop-by-hop + dst options + UDP     | allowed port / other port                        | pass / EGRESS_DENIED   |
| v6 routing + AH + UDP                 | allowed port                                     | pass                   |
| v6 7 extension headers                | enforced / unenforced endpoint                   | UNPARSEABLE / pass     |
| v4/v6 later fragment, no first        | allowed port's datagram                          | FRAG_NOT_FOUND         |
| v4/v6 first then later fragment       | same ID / other ID                               | pass / FRAG_NOT_FOUND  |
| ICMP frag needed, ICMPv6 too big      | quoting a tracked flow / an untracked one        | pass / EGRESS_DENIED   |
| ICMPv6 neighbour solicitation         | link-local source (not in the ipcache)           | pass                   |
| SCTP                                  | allowed port / other port                        | pass / EGRESS_DENIED   |
| GRE                                   | L3-only allow / TCP-only allow                   | pass / EGRESS_DENIED   |
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
import struct
from collections.abc import Iterator

import pytest
from membrane.bpf.maps import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    DropReason,
    Endpoint,
    PolicyEntry,
    PolicyKey,
    Verdict,
)
from membrane.bpf.steer import Steering

from tests.bpf.prog_run import SYN, TC_ACT_OK, TC_ACT_SHOT, packet, run

pytestmark = pytest.mark.bpf

EP = 5
SRC, SRC6 = "10.1.0.1", "fd00:1::1"
DST, DST6 = "10.2.0.2", "fd00:2::2"
PEER = 200
ALLOWED = 5000
PASS = PolicyEntry(verdict=Verdict.PASS)
HOPOPTS, ROUTING, FRAGMENT, DSTOPTS, AH = 0, 43, 44, 60, 51
GRE = 47
_ports = itertools.count(30000)
_ids = itertools.count(0x1234)


@pytest.fixture(scope="module", autouse=True)
def _root_and_clean() -> Iterator[None]:
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
    """Source endpoint on loopback with egress enforced; UDP/SCTP ALLOWED to the peer; empty conntrack."""
    m = loaded.maps
    m.flush_conntrack()
    m.set_identity(f"{SRC}/32", 100, ifindex=1)
    m.set_identity(f"{SRC6}/128", 100, ifindex=1)
    m.set_identity(f"{DST}/32", PEER)
    m.set_identity(f"{DST6}/128", PEER)
    m.set_policy(
        ingress={},
        egress={
            PolicyKey(endpoint_id=EP, identity=PEER, port=ALLOWED, proto=IPPROTO_UDP): PASS,
            PolicyKey(endpoint_id=EP, identity=PEER, port=ALLOWED, proto=IPPROTO_SCTP): PASS,
            PolicyKey(endpoint_id=EP, identity=PEER, port=ALLOWED, proto=IPPROTO_TCP): PASS,
        },
    )
    m.set_endpoint(1, Endpoint(endpoint_id=EP, identity=100, enforce_egress=True))
    loaded.read_drop_events()
    yield loaded


ETH = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"


def v4(src: str, dst: str, proto: int, payload: bytes, *, ident: int = 0, offset8: int = 0, more: bool = False) -> bytes:
    frag = (0x2000 if more else 0) | offset8
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag, 64, proto, 0,
                      ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return ETH + b"\x08\x00" + hdr + payload


def v6(src: str, dst: str, chain: list[tuple[int, bytes]], proto: int, payload: bytes) -> bytes:
    """IPv6 with extension headers `chain` [(type, body without the next-header byte)] then `proto`."""
    types = [t for t, _b in chain] + [proto]
    ext = b"".join(bytes([types[i + 1]]) + body for i, (_t, body) in enumerate(chain))
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(payload), types[0], 64,
                      ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return ETH + b"\x86\xdd" + hdr + ext + payload


def opts() -> bytes:
    """Body of an 8-byte hop-by-hop/destination-options/routing header: length 0 + PadN."""
    return b"\x00\x01\x04\x00\x00\x00\x00"


def ah() -> bytes:
    """Body of a 12-byte AH header (payload length 1 = (1 + 2) * 4 bytes)."""
    return b"\x01" + b"\x00" * 10


def frag6(ident: int, offset8: int, more: bool) -> bytes:
    return b"\x00" + struct.pack("!HI", (offset8 << 3) | int(more), ident)


def udp(dport: int, sport: int | None = None, size: int = 8) -> bytes:
    return struct.pack("!HHHH", sport or next(_ports), dport, size, 0) + b"u" * (size - 8)


def verdict(st: Steering, frame: bytes) -> str:
    rc = run(st.prog_fd, frame)
    if rc == TC_ACT_OK:
        return "pass"
    assert rc == TC_ACT_SHOT
    events = st.read_drop_events()
    assert len(events) == 1
    return f"drop:{events[0].reason.name}"


def test_v6_extension_headers_are_walked_to_the_port(st: Steering) -> None:
    """Hop-by-hop + destination options, and routing + AH, before UDP: the real port is judged."""
    assert verdict(st, v6(SRC6, DST6, [(HOPOPTS, opts()), (DSTOPTS, opts())], IPPROTO_UDP, udp(ALLOWED))) == "pass"
    assert verdict(st, v6(SRC6, DST6, [(HOPOPTS, opts()), (DSTOPTS, opts())], IPPROTO_UDP, udp(ALLOWED + 1))) == "drop:EGRESS_DENIED"
    assert verdict(st, v6(SRC6, DST6, [(ROUTING, opts()), (AH, ah())], IPPROTO_UDP, udp(ALLOWED))) == "pass"
    assert verdict(st, v6(SRC6, DST6, [(ROUTING, opts()), (AH, ah())], IPPROTO_UDP, udp(ALLOWED + 1))) == "drop:EGRESS_DENIED"


def test_overlong_v6_chain_is_dropped_under_enforcement_only(st: Steering) -> None:
    """Seven extension headers (more than the program walks) are dropped as UNPARSEABLE, never passed,
    when the endpoint enforces; an endpoint without enforcement is not affected."""
    chain = [(DSTOPTS, opts())] * 7
    assert verdict(st, v6(SRC6, DST6, chain, IPPROTO_UDP, udp(ALLOWED))) == "drop:UNPARSEABLE"
    assert st.maps.drop_counts()[DropReason.UNPARSEABLE] >= 1
    st.maps.set_endpoint(1, Endpoint(endpoint_id=EP, identity=100))
    assert verdict(st, v6(SRC6, DST6, chain, IPPROTO_UDP, udp(ALLOWED))) == "pass"


@pytest.mark.parametrize("family", [4, 6])
def test_later_fragments_follow_the_first(st: Steering, family: int) -> None:
    """A later fragment gets its first fragment's ports and flow; one whose first fragment was never seen,
    or was dropped, is dropped as FRAG_NOT_FOUND."""

    def first(ident: int, dport: int) -> bytes:
        if family == 4:
            return v4(SRC, DST, IPPROTO_UDP, udp(dport, size=24), ident=ident, more=True)
        return v6(SRC6, DST6, [(FRAGMENT, frag6(ident, 0, True))], IPPROTO_UDP, udp(dport, size=24))

    def later(ident: int) -> bytes:
        if family == 4:
            return v4(SRC, DST, IPPROTO_UDP, b"x" * 16, ident=ident, offset8=3)
        return v6(SRC6, DST6, [(FRAGMENT, frag6(ident, 3, False))], IPPROTO_UDP, b"x" * 16)

    ok, denied, unseen = next(_ids), next(_ids), next(_ids)
    assert verdict(st, first(ok, ALLOWED)) == "pass"
    assert verdict(st, later(ok)) == "pass"
    assert verdict(st, first(denied, ALLOWED + 1)) == "drop:EGRESS_DENIED"
    assert verdict(st, later(denied)) == "drop:FRAG_NOT_FOUND"
    assert verdict(st, later(unseen)) == "drop:FRAG_NOT_FOUND"


def test_v6_fragment_followed_by_more_extension_headers(st: Steering) -> None:
    """The first fragment's chain continues after the fragment header (destination options, then UDP);
    its later fragments name destination options as the next header: they still find the datagram."""
    ident = next(_ids)
    first = v6(SRC6, DST6, [(FRAGMENT, frag6(ident, 0, True)), (DSTOPTS, opts())], IPPROTO_UDP, udp(ALLOWED, size=24))
    later = ETH + b"\x86\xdd" + struct.pack("!IHBB16s16s", 6 << 28, 8 + 16, FRAGMENT, 64,
        ipaddress.ip_address(SRC6).packed, ipaddress.ip_address(DST6).packed) + bytes([DSTOPTS]) + frag6(ident, 4, False) + b"x" * 16
    assert verdict(st, first) == "pass"
    assert verdict(st, later) == "pass"
    assert verdict(st, later.replace(struct.pack("!I", ident), struct.pack("!I", ident + 1000))) == "drop:FRAG_NOT_FOUND"


def _quote_v4(src: str, dst: str, sport: int, dport: int) -> bytes:
    """The IP header + 8 bytes of a TCP packet, as an ICMP error quotes it."""
    return v4(src, dst, IPPROTO_TCP, struct.pack("!HHI", sport, dport, 1))[14:]


def test_pmtu_errors_for_tracked_flows_are_related(st: Steering) -> None:
    """ICMP "fragmentation needed" and ICMPv6 "packet too big" quoting a packet of a tracked flow pass
    (no ICMP allow exists); quoting an untracked flow they are judged as ICMP and dropped."""
    sport = next(_ports)
    assert run(st.prog_fd, packet(SRC, DST, sport, ALLOWED, IPPROTO_TCP, flags=SYN)) == TC_ACT_OK
    # SRC could not forward the peer's reply (DST:ALLOWED -> SRC:sport): it tells the peer
    quoted = _quote_v4(DST, SRC, ALLOWED, sport)
    frag_needed = struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + quoted
    assert verdict(st, v4(SRC, DST, IPPROTO_ICMP, frag_needed)) == "pass"
    stranger = struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + _quote_v4(DST, SRC, ALLOWED, sport + 1)
    assert verdict(st, v4(SRC, DST, IPPROTO_ICMP, stranger)) == "drop:EGRESS_DENIED"

    sport6 = next(_ports)
    assert run(st.prog_fd, packet(SRC6, DST6, sport6, ALLOWED, IPPROTO_TCP, flags=SYN)) == TC_ACT_OK
    inner6 = v6(DST6, SRC6, [], IPPROTO_TCP, struct.pack("!HHI", ALLOWED, sport6, 1))[14:]
    too_big = struct.pack("!BBHI", 2, 0, 0, 1280) + inner6
    assert verdict(st, v6(SRC6, DST6, [], IPPROTO_ICMPV6, too_big)) == "pass"
    inner6x = v6(DST6, SRC6, [], IPPROTO_TCP, struct.pack("!HHI", ALLOWED, sport6 + 1, 1))[14:]
    assert verdict(st, v6(SRC6, DST6, [], IPPROTO_ICMPV6, struct.pack("!BBHI", 2, 0, 0, 1280) + inner6x)) == "drop:EGRESS_DENIED"


def test_neighbour_discovery_always_passes(st: Steering) -> None:
    """ICMPv6 neighbour solicitation from a link-local address (in no ipcache entry) passes an enforcing
    endpoint, as in Cilium; an echo request from the same address is judged (spoofed source)."""
    ns = struct.pack("!BBHI16s", 135, 0, 0, 0, ipaddress.ip_address("fe80::1").packed)
    assert verdict(st, v6("fe80::2", "ff02::1:ff00:1", [], IPPROTO_ICMPV6, ns)) == "pass"
    echo = struct.pack("!BBHHH", 128, 0, 0, 7, 1)
    assert verdict(st, v6("fe80::2", DST6, [], IPPROTO_ICMPV6, echo)) == "drop:SPOOFED"


def test_sctp_is_judged_by_port(st: Steering) -> None:
    """SCTP carries ports where UDP does: an allowed port passes, another is dropped."""
    assert verdict(st, v4(SRC, DST, IPPROTO_SCTP, struct.pack("!HHII", next(_ports), ALLOWED, 0, 0))) == "pass"
    assert verdict(st, v4(SRC, DST, IPPROTO_SCTP, struct.pack("!HHII", next(_ports), ALLOWED + 1, 0, 0))) == "drop:EGRESS_DENIED"


def test_gre_needs_an_l3_only_allow(st: Steering) -> None:
    """A protocol without ports is judged with port 0 for itself: only the L3-only key covers it."""
    gre = struct.pack("!HH", 0, 0x0800) + b"\x00" * 20
    assert verdict(st, v4(SRC, DST, GRE, gre)) == "drop:EGRESS_DENIED"
    st.maps.set_policy(ingress={}, egress={PolicyKey(endpoint_id=EP, identity=PEER): PASS})
    assert verdict(st, v4(SRC, DST, GRE, gre)) == "pass"
    assert socket.IPPROTO_GRE == GRE
