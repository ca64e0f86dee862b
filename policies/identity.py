"""Numeric security identities (Cilium's numbering) and the IP/CIDR -> identity map (the ipcache).

Reserved identities are fixed: host=1, world=2, unmanaged=3, health=4, init=5, remote-node=6,
kube-apiserver=7, ingress=8, world-ipv4=9, world-ipv6=10. Endpoint label sets get identities in
256..(1<<24)-1 and CIDR prefixes in the local scope (1<<24 and up), both hashed from their canonical
text (SHA-256) into a slot, probing upward past taken slots (`IdentityAllocator`):
- a live key keeps its number for as long as it lives, whatever comes and goes beside it;
- new keys arriving together are numbered in sorted order, so a start or a relist gives the same
  numbers whatever order the API server listed the pods in; keys arriving one by one get the same
  numbers in any order unless two of them hash to one slot (1 in ~16M per pair), when the earlier
  one keeps the slot.
Numeric identities never leave the node: the ipcache and the BPF maps are node-local, and flows
carry the labels beside the number. Cilium allocates cluster-wide through CRDs or a kvstore instead.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from membrane.policies.crd import IPNetwork
from membrane.policies.labels import RESERVED, Label, LabelSet


class ReservedIdentity(enum.IntEnum):
    HOST = 1
    WORLD = 2
    UNMANAGED = 3
    HEALTH = 4
    INIT = 5
    REMOTE_NODE = 6
    KUBE_APISERVER = 7
    INGRESS = 8
    WORLD_IPV4 = 9
    WORLD_IPV6 = 10

    @property
    def label_name(self) -> str:
        return self.name.lower().replace("_", "-")


MIN_ENDPOINT_IDENTITY = 256
MAX_ENDPOINT_IDENTITY = (1 << 24) - 1  # a 24-bit space (as Cilium's with cluster IDs): hash slots rarely collide
LOCAL_IDENTITY_BASE = 1 << 24
LOCAL_IDENTITY_SPAN = 1 << 24


class IdentityKind(enum.Enum):
    RESERVED = "reserved"
    ENDPOINT = "endpoint"
    CIDR = "cidr"


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """A numeric identity and what it stands for.

    `prefix` is set for CIDR identities (and 0.0.0.0/0, ::/0 for world-ipv4/6); `names` are the
    DNS names a CIDR identity's address was learned for (toFQDNs); `endpoints` the `ns/name` keys
    of the pods sharing this label set.
    """

    id: int
    kind: IdentityKind
    labels: LabelSet
    prefix: IPNetwork | None = None
    names: frozenset[str] = frozenset()
    endpoints: tuple[str, ...] = ()

    @property
    def display(self) -> str:
        if self.kind is IdentityKind.RESERVED:
            return f"reserved:{ReservedIdentity(self.id).label_name}"
        if self.kind is IdentityKind.CIDR:
            return f"cidr:{self.prefix}"
        return ",".join(self.endpoints) or self.labels.canonical()


def reserved_identities() -> list[Identity]:
    out = []
    for r in ReservedIdentity:
        prefix: IPNetwork | None = None
        if r is ReservedIdentity.WORLD_IPV4:
            prefix = ipaddress.ip_network("0.0.0.0/0")
        elif r is ReservedIdentity.WORLD_IPV6:
            prefix = ipaddress.ip_network("::/0")
        labels = [Label(RESERVED, r.label_name)]
        if prefix is not None:
            labels.append(Label(RESERVED, "world"))  # dual stack: world-ipv4/6 are also `reserved:world`
        out.append(Identity(id=int(r), kind=IdentityKind.RESERVED, labels=LabelSet.of(labels), prefix=prefix))
    return out


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class IdentityAllocator:
    """Stable numbers in [base, base + span) for string keys: a live key is never renumbered.

    `assign(keys)` is the set of keys alive now: keys no longer in it release their numbers, new
    ones get `base + hash % span` or the next free slot above it, in sorted order.
    """

    def __init__(self, base: int, span: int) -> None:
        self.base = base
        self.span = span
        self._numbers: dict[str, int] = {}
        self._taken: set[int] = set()

    def assign(self, keys: Iterable[str]) -> dict[str, int]:
        """Numbers for exactly `keys`. Raises OverflowError when more keys than slots are alive."""
        alive = set(keys)
        if len(alive) > self.span:
            raise OverflowError(f"{len(alive)} identities do not fit in {self.span} numbers")
        for key in [k for k in self._numbers if k not in alive]:
            self._taken.discard(self._numbers.pop(key))
        for key in sorted(alive - self._numbers.keys()):
            n = _hash(key) % self.span
            while self.base + n in self._taken:
                n = (n + 1) % self.span
            self._numbers[key] = self.base + n
            self._taken.add(self.base + n)
        return {k: self._numbers[k] for k in alive}


@dataclass(slots=True)
class IdentityAllocators:
    """The two numbered scopes a node keeps across compilations: endpoint label sets and CIDR prefixes."""

    endpoints: IdentityAllocator
    cidrs: IdentityAllocator

    @classmethod
    def new(cls) -> IdentityAllocators:
        return cls(
            endpoints=IdentityAllocator(MIN_ENDPOINT_IDENTITY, MAX_ENDPOINT_IDENTITY - MIN_ENDPOINT_IDENTITY + 1),
            cidrs=IdentityAllocator(LOCAL_IDENTITY_BASE, LOCAL_IDENTITY_SPAN),
        )


@functools.lru_cache(maxsize=1 << 16)
def _canonical(label_set: LabelSet) -> str:
    """LabelSet.canonical(), remembered: a cluster's label sets outlive many recompiles."""
    return label_set.canonical()


def allocate_endpoint_identities(label_sets: Iterable[LabelSet], allocator: IdentityAllocator | None = None) -> dict[LabelSet, int]:
    """Numbers for label sets; a fresh allocator (the same input, the same numbers) unless one is kept."""
    alloc = allocator or IdentityAllocators.new().endpoints
    by_text = {_canonical(ls): ls for ls in label_sets}
    return {by_text[t]: n for t, n in alloc.assign(by_text).items()}


def allocate_cidr_identities(prefixes: Iterable[IPNetwork], allocator: IdentityAllocator | None = None) -> dict[IPNetwork, int]:
    alloc = allocator or IdentityAllocators.new().cidrs
    by_text = {str(p): p for p in prefixes}
    return {by_text[t]: n for t, n in alloc.assign(by_text).items()}


class IpCache:
    """Longest-prefix match from an address to an identity. Unknown IPv4 -> world-ipv4, IPv6 -> world-ipv6."""

    def __init__(self, entries: Iterable[tuple[IPNetwork, int]]) -> None:
        self._tables: dict[int, dict[int, dict[int, int]]] = {4: {}, 6: {}}
        self._entries: dict[IPNetwork, int] = {}
        for net, ident in entries:
            self._entries[net] = ident
            self._tables[net.version].setdefault(net.prefixlen, {})[int(net.network_address)] = ident
        self._lengths = {v: sorted(t, reverse=True) for v, t in self._tables.items()}

    def lookup(self, ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
        """The identity of `ip`. Raises ValueError if `ip` is not an address (callers validate first)."""
        addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        value = int(addr)
        bits = 32 if addr.version == 4 else 128
        table = self._tables[addr.version]
        for length in self._lengths[addr.version]:
            masked = value >> (bits - length) << (bits - length) if length else 0
            hit = table[length].get(masked)
            if hit is not None:
                return hit
        return int(ReservedIdentity.WORLD_IPV4 if addr.version == 4 else ReservedIdentity.WORLD_IPV6)

    def entries(self) -> dict[IPNetwork, int]:
        """Every prefix -> identity (endpoint /32s and /128s, CIDR-rule prefixes, learned FQDN IPs,
        0.0.0.0/0 -> world-ipv4 and ::/0 -> world-ipv6), for the kernel's ipcache map."""
        return dict(self._entries)
