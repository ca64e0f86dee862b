"""Typed keys and values of the steering maps, and the incremental, never-widening way to fill them.

Owns the byte layout shared with `tc_steer.bpf.c` (`struct pol_key`, `struct ep_val`, ...) and the
update order. Never decides policy: it writes what the agent compiled.
Invariant: no sequence of writes made here lets a packet through that neither the old nor the new
map content lets through. Single-entry maps (ipcache, endpoints, config) change by one atomic
update per key; the two policy maps are double-buffered by a generation byte in the key: a whole
policy is written into the inactive generation (only the entries that differ from what that
generation held), then one write to `mbr_config[CFG_GEN]` flips every CPU to it. A buffer is only
rewritten once `GRACE_S` has passed since it stopped being active, so no program run that read
the old generation number can still be reading it (a tc run lasts microseconds).
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ANY_IDENTITY = 0  # in a PolicyKey: matches every peer identity
ANY_PORT = 0  # in a PolicyKey: matches every destination port
ANY_PROTO = 0  # in a PolicyKey: matches every IP protocol (an L3-only allow or deny)
WORLD_IDENTITY = 2  # identity of an address missing from the ipcache (Cilium's reserved:world)
GRACE_S = 0.05  # a generation is rewritten only this long after it was last active

IPPROTO_TCP = socket.IPPROTO_TCP
IPPROTO_UDP = socket.IPPROTO_UDP
IPPROTO_SCTP = 132
IPPROTO_ICMP = socket.IPPROTO_ICMP
IPPROTO_ICMPV6 = socket.IPPROTO_ICMPV6
PORT_PROTOS = (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP)  # the kernel reads their destination port
ICMP_PROTOS = (IPPROTO_ICMP, IPPROTO_ICMPV6)
ICMP_PORT_BASE = 0x100  # an ICMP type's PolicyKey port is ICMP_PORT_BASE | type (0 stays "any type")


def icmp_port(icmp_type: int) -> int:
    """The PolicyKey port of an ICMP(v6) type. Cilium keys the type in the port field; the kernel
    adds 0x100 so that type 0 (echo reply) does not collide with ANY_PORT."""
    if not 0 <= icmp_type <= 255:
        raise ValueError(f"ICMP type out of range: {icmp_type}")
    return ICMP_PORT_BASE | icmp_type


class Verdict(enum.IntEnum):
    """What a policy entry says about a new flow (`VERDICT_*` in the C program)."""

    PASS = 1
    DROP = 2
    REDIRECT = 3


class DropReason(enum.IntEnum):
    """Why the kernel dropped a packet; index into `mbr_drops` (`REASON_*` in the C program)."""

    EGRESS_DENIED = 1
    INGRESS_DENIED = 2
    PROXY_UNAVAILABLE = 3
    SPOOFED = 4  # a source address the ipcache does not map to the veth the packet came from
    FRAG_NOT_FOUND = 5  # a non-first fragment whose first fragment was not seen or was dropped
    UNPARSEABLE = 6  # an IP packet whose headers cannot be parsed (truncated, too many IPv6 extension headers)


class PolicyDirection(enum.Enum):
    """Which policy of an endpoint an entry belongs to; names the map it lives in."""

    INGRESS = "mbr_pol_ing"
    EGRESS = "mbr_pol_egr"


class ConfigSlot(enum.IntEnum):
    """Indexes into the `mbr_config` array (`CFG_*` in the C program)."""

    MARK = 0
    GEN = 1
    TCP4_PORT = 2
    TCP6_PORT = 3
    UDP4_PORT = 4
    UDP6_PORT = 5
    TW_STEER = 6  # 1 = mbr_sk_lookup is attached: SYNs meeting a proxy TIME_WAIT socket are steered through it


ENFORCE_INGRESS = 1
ENFORCE_EGRESS = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyKey:
    """One policy map key. For EGRESS `identity` is the destination's, for INGRESS the source's.

    Lookup order in the kernel, first match wins: (identity, port, proto), (identity, ANY_PORT, proto),
    (identity, ANY_PORT, ANY_PROTO), then the same three with ANY_IDENTITY. A port with ANY_PROTO is
    never looked up. Port ranges are expanded by the caller. No match on an enforced direction = DROP.
    Ports: TCP/UDP/SCTP destination ports; ICMP/ICMPv6 `icmp_port(type)`; every other protocol
    (GRE, ESP, ...) is looked up with ANY_PORT only. (identity, ANY_PORT, ANY_PROTO) is the L3-only
    entry: it covers every protocol without a more specific key, ICMP and GRE included.
    """

    endpoint_id: int  # the local endpoint whose policy this is (Endpoint.endpoint_id)
    identity: int = ANY_IDENTITY  # the peer's security identity; 0 = any
    port: int = ANY_PORT  # destination port (host order) or icmp_port(type); 0 = any
    proto: int = ANY_PROTO  # IP protocol number; 0 = any (only together with port 0)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port out of range: {self.port}")
        if not 0 <= self.proto <= 255:
            raise ValueError(f"proto must be an IP protocol number: {self.proto}")
        if self.proto == ANY_PROTO and self.port != ANY_PORT:
            raise ValueError("a port needs a protocol")
        if self.port != ANY_PORT and self.proto not in PORT_PROTOS + ICMP_PROTOS:
            raise ValueError(f"protocol {self.proto} has no ports: only ANY_PORT is looked up")
        if self.proto in ICMP_PROTOS and self.port not in (ANY_PORT, *range(ICMP_PORT_BASE, ICMP_PORT_BASE + 256)):
            raise ValueError(f"an ICMP key's port is icmp_port(type): {self.port}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyEntry:
    """The value for a PolicyKey. `proxy_port` 0 = the default listener for the flow's family/proto."""

    verdict: Verdict
    proxy_port: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """A local endpoint, keyed by its host-side ifindex. No enforcement flag = allow that direction."""

    endpoint_id: int  # nonzero; policy keys refer to it
    identity: int  # its security identity (also the ipcache value of its addresses)
    enforce_ingress: bool = False  # False: no policy selects it for ingress -> allow all
    enforce_egress: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DropEvent:
    """One dropped packet as reported by the kernel through `mbr_events`."""

    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    sport: int
    dport: int
    proto: int
    reason: DropReason
    src_identity: int
    dst_identity: int
    ifindex: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowEntry:
    """One conntrack entry: the originator's 5-tuple and the verdict its first packet got."""

    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    sport: int
    dport: int
    proto: int
    verdict: Verdict
    proxy_port: int
    src_identity: int
    dst_identity: int
    closing: bool = False  # a FIN or RST was seen; the entry dies after the close lifetime


class _DropEventC(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_ubyte * 16),
        ("daddr", ctypes.c_ubyte * 16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("src_id", ctypes.c_uint32),
        ("dst_id", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
    ]


def _addr(family: int, raw: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    data = bytes(raw)
    return ipaddress.IPv4Address(data[:4]) if family == 4 else ipaddress.IPv6Address(data[:16])


def parse_drop_event(data: bytes) -> DropEvent:
    """Decode one `struct drop_event` record. Raises ValueError on a short record."""
    if len(data) < ctypes.sizeof(_DropEventC):
        raise ValueError(f"short drop event: {len(data)} bytes")
    c = _DropEventC.from_buffer_copy(data[: ctypes.sizeof(_DropEventC)])
    return DropEvent(
        src=_addr(c.family, c.saddr),
        dst=_addr(c.family, c.daddr),
        sport=c.sport,
        dport=c.dport,
        proto=c.proto,
        reason=DropReason(c.reason),
        src_identity=c.src_id,
        dst_identity=c.dst_id,
        ifindex=c.ifindex,
    )


def _bytes16(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Any:
    return (ctypes.c_ubyte * 16)(*addr.packed.ljust(16, b"\0"))


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class BpfMaps:
    """The Python side of every steering map of one loaded `tc_steer` program (a bcc `BPF` object).

    All methods write through to the kernel immediately; none of them attaches anything.
    """

    def __init__(self, bpf: Any) -> None:
        """Mirror what the maps hold now: empty for new maps, the previous agent's content for adopted ones.

        The active generation is read from `mbr_config`, and both generations of both policy maps are
        read back, so the first set_policy() writes only what differs and never touches the generation
        the running programs read. The first flip waits GRACE_S, as the previous owner may just have flipped.
        """
        self._bpf = bpf
        self._gen = self.config(ConfigSlot.GEN) & 1  # the active policy generation
        self._flipped_at = 0.0  # monotonic time of the last flip
        # What each generation holds, per direction: mirrors of the kernel content.
        self._held: dict[tuple[int, PolicyDirection], dict[PolicyKey, PolicyEntry]] = {
            (g, d): {} for g in (0, 1) for d in PolicyDirection
        }
        for direction in PolicyDirection:
            for (gen, key), entry in self.raw_policy(direction).items():
                self._held[(gen & 1, direction)][key] = entry
        # Entries found at start that this owner has not written since: prune_adopted() removes them.
        self._adopted_identities: set[Network] = set(self.identities())
        self._adopted_endpoints: set[int] = set(self.endpoints())
        # True when the maps held a previous owner's entries when this object was created.
        self.adopted = bool(self._adopted_identities or self._adopted_endpoints or any(self._held.values()))
        if self.adopted:
            self._flipped_at = time.monotonic()  # that owner may have flipped just now

    def prune_adopted(self) -> list[str]:
        """Delete the adopted endpoints and identities this owner has not written since; returns what went.

        Call once the new owner has written its whole plan and attached its interfaces (and removed the
        stale filters): endpoints go first, so no attached program ever sees an endpoint without its
        addresses. Policy entries need no pruning: set_policy() replaces a whole generation.
        """
        removed = []
        for ifindex in sorted(self._adopted_endpoints):
            self.delete_endpoint(ifindex)
            removed.append(f"endpoint ifindex {ifindex}")
        for net in sorted(self._adopted_identities, key=str):
            self.delete_identity(net)
            removed.append(f"identity {net}")
        return removed

    def _table(self, name: str) -> Any:
        return self._bpf.get_table(name.encode())

    # --- config -----------------------------------------------------------------------------
    def set_config(self, slot: ConfigSlot, value: int) -> None:
        """Write one config slot (mark, default proxy ports). GEN is owned by set_policy()."""
        if slot is ConfigSlot.GEN:
            raise ValueError("the generation is flipped by set_policy()")
        self._table("mbr_config")[ctypes.c_int(slot)] = ctypes.c_uint32(value)

    def config(self, slot: ConfigSlot) -> int:
        """Read one config slot."""
        return int(self._table("mbr_config")[ctypes.c_int(slot)].value)

    def set_proxy_ports(self, *, tcp4: int = 0, tcp6: int = 0, udp4: int = 0, udp6: int = 0) -> None:
        """Default transparent listener ports used by REDIRECT entries whose proxy_port is 0."""
        for slot, port in (
            (ConfigSlot.TCP4_PORT, tcp4),
            (ConfigSlot.TCP6_PORT, tcp6),
            (ConfigSlot.UDP4_PORT, udp4),
            (ConfigSlot.UDP6_PORT, udp6),
        ):
            self.set_config(slot, port)

    # --- ipcache ----------------------------------------------------------------------------
    def _ipc(self, net: Network) -> tuple[Any, Any]:
        table = self._table("mbr_ipc4" if net.version == 4 else "mbr_ipc6")
        key = table.Key()
        key.prefixlen = net.prefixlen
        if net.version == 4:
            key.addr = int.from_bytes(net.network_address.packed, sys.byteorder)  # network order in memory
        else:
            key.addr = (ctypes.c_ubyte * 16)(*net.network_address.packed)
        return table, key

    def set_identity(self, cidr: str | Network, identity: int, *, ifindex: int = 0) -> None:
        """Map an IP or CIDR to a security identity. `ifindex` = host veth of a local endpoint, else 0.

        The longest prefix wins; an address in no prefix is WORLD_IDENTITY. One atomic update.
        """
        net = ipaddress.ip_network(cidr, strict=False) if isinstance(cidr, str) else cidr
        self._adopted_identities.discard(net)
        table, key = self._ipc(net)
        leaf = table.Leaf()
        leaf.identity = identity
        leaf.ifindex = ifindex
        table[key] = leaf

    def delete_identity(self, cidr: str | Network) -> None:
        """Forget a prefix; a no-op if it is absent."""
        net = ipaddress.ip_network(cidr, strict=False) if isinstance(cidr, str) else cidr
        self._adopted_identities.discard(net)
        table, key = self._ipc(net)
        try:
            del table[key]
        except KeyError:
            pass

    def identities(self) -> dict[Network, tuple[int, int]]:
        """Every ipcache prefix -> (identity, ifindex)."""
        out: dict[Network, tuple[int, int]] = {}
        for name, version in (("mbr_ipc4", 4), ("mbr_ipc6", 6)):
            for k, v in self._table(name).items():
                raw = int(k.addr).to_bytes(4, sys.byteorder) if version == 4 else bytes(k.addr)
                addr = ipaddress.ip_address(raw)
                out[ipaddress.ip_network(f"{addr}/{k.prefixlen}")] = (int(v.identity), int(v.ifindex))
        return out

    # --- endpoints --------------------------------------------------------------------------
    def set_endpoint(self, ifindex: int, endpoint: Endpoint) -> None:
        """Register (or change) the endpoint behind a host-side ifindex. One atomic update.

        Order for a new endpoint: write its policy and its addresses' ipcache entries (with this
        ifindex) first, then this, so that enforcement starts with everything in place. Once an
        ifindex is an endpoint, every TCP/UDP packet from it whose source address is not mapped to
        that ifindex in the ipcache is dropped as SPOOFED.
        """
        if endpoint.endpoint_id == 0:
            raise ValueError("endpoint_id 0 is reserved")
        self._adopted_endpoints.discard(ifindex)
        table = self._table("mbr_endpoints")
        leaf = table.Leaf()
        leaf.ep_id = endpoint.endpoint_id
        leaf.identity = endpoint.identity
        leaf.flags = (ENFORCE_INGRESS if endpoint.enforce_ingress else 0) | (
            ENFORCE_EGRESS if endpoint.enforce_egress else 0
        )
        table[ctypes.c_uint32(ifindex)] = leaf

    def delete_endpoint(self, ifindex: int) -> None:
        """Forget an endpoint; a no-op if absent."""
        self._adopted_endpoints.discard(ifindex)
        try:
            del self._table("mbr_endpoints")[ctypes.c_uint32(ifindex)]
        except KeyError:
            pass

    def endpoints(self) -> dict[int, Endpoint]:
        """Every registered ifindex -> Endpoint."""
        return {
            int(k.value): Endpoint(
                endpoint_id=int(v.ep_id),
                identity=int(v.identity),
                enforce_ingress=bool(v.flags & ENFORCE_INGRESS),
                enforce_egress=bool(v.flags & ENFORCE_EGRESS),
            )
            for k, v in self._table("mbr_endpoints").items()
        }

    # --- policy -----------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        """The policy generation (0/1) the kernel reads now."""
        return self._gen

    def policy(self, direction: PolicyDirection) -> dict[PolicyKey, PolicyEntry]:
        """The active policy of one direction, as the kernel holds it."""
        return dict(self._held[(self._gen, direction)])

    def set_policy(
        self,
        *,
        ingress: Mapping[PolicyKey, PolicyEntry],
        egress: Mapping[PolicyKey, PolicyEntry],
        sleep: Callable[[float], None] = time.sleep,
    ) -> int:
        """Replace the whole policy of every endpoint, atomically. Returns how many map writes it took.

        Writes only the entries that differ from what the inactive generation holds, then flips.
        Blocks for at most GRACE_S when called again right after a flip.
        """
        target = 1 - self._gen
        wait = self._flipped_at + GRACE_S - time.monotonic()
        if wait > 0:
            sleep(wait)
        writes = 0
        for direction, wanted in ((PolicyDirection.INGRESS, ingress), (PolicyDirection.EGRESS, egress)):
            table = self._table(direction.value)
            held = self._held[(target, direction)]
            for key, entry in wanted.items():
                if held.get(key) != entry:
                    table[self._pol_key(table, key, target)] = self._pol_val(table, entry)
                    writes += 1
            for key in [k for k in held if k not in wanted]:
                try:
                    del table[self._pol_key(table, key, target)]
                except KeyError:
                    pass
                writes += 1
            self._held[(target, direction)] = dict(wanted)
        self._table("mbr_config")[ctypes.c_int(ConfigSlot.GEN)] = ctypes.c_uint32(target)
        self._gen = target
        self._flipped_at = time.monotonic()
        return writes

    @staticmethod
    def _pol_key(table: Any, key: PolicyKey, gen: int) -> Any:
        k = table.Key()
        k.ep_id = key.endpoint_id
        k.identity = key.identity
        k.dport = key.port
        k.proto = key.proto
        k.gen = gen
        return k

    @staticmethod
    def _pol_val(table: Any, entry: PolicyEntry) -> Any:
        v = table.Leaf()
        v.verdict = int(entry.verdict)
        v.proxy_port = entry.proxy_port
        return v

    def raw_policy(self, direction: PolicyDirection) -> dict[tuple[int, PolicyKey], PolicyEntry]:
        """Everything in one policy map, both generations, read back from the kernel: (gen, key) -> entry."""
        out: dict[tuple[int, PolicyKey], PolicyEntry] = {}
        for k, v in self._table(direction.value).items():
            key = PolicyKey(endpoint_id=int(k.ep_id), identity=int(k.identity), port=int(k.dport), proto=int(k.proto))
            out[(int(k.gen), key)] = PolicyEntry(verdict=Verdict(int(v.verdict)), proxy_port=int(v.proxy_port))
        return out

    # --- conntrack and counters -------------------------------------------------------------
    def conntrack(self) -> list[FlowEntry]:
        """Every conntrack entry (an LRU map: the oldest entries are evicted when it is full)."""
        out = []
        for k, v in self._table("mbr_ct").items():
            out.append(
                FlowEntry(
                    src=_addr(k.family, k.saddr),
                    dst=_addr(k.family, k.daddr),
                    sport=socket.ntohs(k.sport),
                    dport=socket.ntohs(k.dport),
                    proto=int(k.proto),
                    verdict=Verdict(int(v.verdict)),
                    proxy_port=int(v.proxy_port),
                    src_identity=int(v.src_id),
                    dst_identity=int(v.dst_id),
                    closing=bool(v.closing),
                )
            )
        return out

    def flush_conntrack(self) -> None:
        """Forget every tracked flow: the next packet of each is judged by the current policy.

        Careful: a reply whose flow was forgotten is judged as a new flow from the replying side.
        """
        self._table("mbr_ct").clear()

    def drop_counts(self) -> dict[DropReason, int]:
        """Packets dropped so far, per reason, summed over CPUs."""
        table = self._table("mbr_drops")
        return {reason: int(sum(table[ctypes.c_int(reason)])) for reason in DropReason}
