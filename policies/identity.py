"""Numeric security identities (Cilium's numbering) and the IP/CIDR -> identity map (the ipcache).

Reserved identities are fixed: host=1, world=2, unmanaged=3, health=4, init=5, remote-node=6,
kube-apiserver=7, ingress=8, world-ipv4=9, world-ipv6=10. Endpoint label sets get identities in
256..65535 and CIDR prefixes in the local scope (1<<24 and up), both hashed from their canonical
text (SHA-256) with linear probing in sorted order, so the same input always yields the same
numbers and adding an unrelated label set rarely moves existing ones.
"""

from __future__ import annotations

import enum
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
MAX_ENDPOINT_IDENTITY = 65535
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


def allocate(keys: Iterable[str], base: int, span: int) -> dict[str, int]:
    """Stable numbers for `keys`: base + hash % span, probing upward on collision, in sorted order."""
    taken: set[int] = set()
    out: dict[str, int] = {}
    for key in sorted(set(keys)):
        n = _hash(key) % span
        while base + n in taken:
            n = (n + 1) % span
        taken.add(base + n)
        out[key] = base + n
    return out


def allocate_endpoint_identities(label_sets: Iterable[LabelSet]) -> dict[LabelSet, int]:
    by_text = {ls.canonical(): ls for ls in label_sets}
    numbers = allocate(by_text, MIN_ENDPOINT_IDENTITY, MAX_ENDPOINT_IDENTITY - MIN_ENDPOINT_IDENTITY + 1)
    return {by_text[t]: n for t, n in numbers.items()}


def allocate_cidr_identities(prefixes: Iterable[IPNetwork]) -> dict[IPNetwork, int]:
    by_text = {str(p): p for p in prefixes}
    numbers = allocate(by_text, LOCAL_IDENTITY_BASE, LOCAL_IDENTITY_SPAN)
    return {by_text[t]: n for t, n in numbers.items()}


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
