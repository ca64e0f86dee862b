"""Compile policies + endpoints (+ learned DNS names) into a `PolicyMap`: per endpoint and direction,
`(peer identity, port, protocol) -> DROP | ALLOW | REDIRECT(parser, L7 rule set)`.

Rules (Cilium 1.19 pkg/policy):
1. A rule selects endpoints by its (namespace-scoped) endpointSelector. A direction is enforced
   (default deny) for an endpoint once a selecting rule has entries for it (allow or deny) and does
   not set `enableDefaultDeny.<direction>: false`. L7 rules of a rule with default deny off, on a
   direction no rule enforces, are visibility only: an allow-all L7 rule for every peer is added
   on their ports (Cilium's `ensureWildcard`), so requests are recorded and allowed.
2. Allows are a union. A deny entry covering (peer, port, protocol) wins over every allow.
3. Without a matching allow: DROP when enforced, ALLOW when not.
4. Matching allows with L7 rules put the port under the proxy (REDIRECT); the rule set is the union
   of those allows' L7 rules. An L3-only or L4-only allow for the same peer on that port adds an
   allow-all entry (wildcarding), so it voids the L7 constraints for that peer.
5. Two L7 parsers on overlapping ports of one endpoint/direction are a conflict: a
   `PolicyConflictError` in `PolicyMap.errors`, and a peer that both apply to is dropped (fail closed).
Identities: see policies.identity. Pure: no I/O; recompile when policies, endpoints or learned
names change (compiling is fast; see bench/policy_bench.py).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from membrane.policies import dnsmatch
from membrane.policies.crd import (
    CONCRETE_PROTOS,
    CidrRule,
    DnsRule,
    Entity,
    FqdnSelector,
    HttpRule,
    IPNetwork,
    KafkaRule,
    L4Proto,
    ParserType,
    PeerRule,
    Policy,
    Rule,
    compile_regex,
)
from membrane.policies.endpoints import Endpoint, Endpoints
from membrane.policies.errors import PolicyConflictError, PolicyError
from membrane.policies.identity import (
    Identity,
    IdentityAllocators,
    IdentityKind,
    IpCache,
    ReservedIdentity,
    allocate_cidr_identities,
    allocate_endpoint_identities,
    reserved_identities,
)
from membrane.policies.l7 import L7RuleSet
from membrane.policies.labels import Label, LabelIndex, LabelSet, iter_bits


class PolicyDirection(enum.Enum):
    INGRESS = "ingress"
    EGRESS = "egress"


class VerdictKind(enum.Enum):
    DROP = "drop"
    ALLOW = "allow"
    REDIRECT = "redirect"


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """The L3/L4 answer for one (endpoint, direction, peer identity, port, protocol).

    `rules` is set iff REDIRECT. `matched` names the rules that decided: the deny entries for a
    DROP by deny, the allow entries for ALLOW/REDIRECT, () for default deny or no enforcement.
    """

    kind: VerdictKind
    enforced: bool
    parser: ParserType | None = None
    rules: L7RuleSet | None = None
    matched: tuple[str, ...] = ()
    conflict: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class MapEntry:
    """One resolved entry for the BPF policy map: this identity, protocol and inclusive port range.

    Identities and ports not listed get the direction's default (`DirectionPolicy.default`).
    """

    identity: int
    proto: L4Proto
    port: int
    end_port: int
    verdict: VerdictKind
    parser: ParserType | None = None


L7Rule = HttpRule | DnsRule | KafkaRule


@dataclass(frozen=True, slots=True, eq=False)
class Contribution:
    """One (peer set, protocols, port range) piece of an allow or deny entry."""

    peers: int  # bitmap over PolicyMap.identities
    all_peers: bool  # selects every identity, also ones unknown at compile time
    protos: frozenset[L4Proto]
    lo: int
    hi: int
    deny: bool
    parser: ParserType | None
    l7: tuple[tuple[L7Rule, str], ...]
    ref: str
    uid: int
    l3: bool = False  # an entry without toPorts/icmps: covers every IP protocol, ICMP and GRE included


_ALL_PROTOS = frozenset(CONCRETE_PROTOS)
# What the kernel judges per port (ICMP: per type, 0-255); every other protocol only by L3-only entries.
KERNEL_PROTOS = (L4Proto.TCP, L4Proto.UDP, L4Proto.SCTP, L4Proto.ICMP, L4Proto.ICMPV6)
_L3_PROTOS = frozenset(KERNEL_PROTOS)
_PORT_SPACE = {L4Proto.ICMP: 256, L4Proto.ICMPV6: 256}  # ICMP "ports" are types; others 65536
# Marks the reference of an allow-all L7 entry added for visibility (see _Compiler._visibility).
VISIBILITY_MARK = "(visibility: enableDefaultDeny"
_MAX_CACHE = 100_000
ALLOW_LOCALHOST_REF = "(allow-localhost: the node may always reach its pods)"


class DirectionPolicy:
    """The compiled policy of one endpoint identity in one direction."""

    def __init__(self, pmap: PolicyMap, direction: PolicyDirection, enforced: bool, contributions: Sequence[Contribution]) -> None:
        self._pmap = pmap
        self.direction = direction
        self.enforced = enforced
        self.contributions = tuple(contributions)
        self._cache: dict[tuple[int, int, L4Proto], Verdict] = {}

    @property
    def default(self) -> VerdictKind:
        return VerdictKind.DROP if self.enforced else VerdictKind.ALLOW

    def lookup(self, peer_identity: int, port: int, proto: L4Proto) -> Verdict:
        """Never raises; an identity unknown to the map is matched only by wildcard peers."""
        key = (peer_identity, port, proto)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        verdict = self._resolve(peer_identity, port, proto)
        if len(self._cache) >= _MAX_CACHE:
            self._cache.clear()
        self._cache[key] = verdict
        return verdict

    def _resolve(self, peer_identity: int, port: int, proto: L4Proto) -> Verdict:
        idx = self._pmap.identity_index.get(peer_identity)
        bit = 0 if idx is None else 1 << idx
        denies: list[str] = []
        l7: list[Contribution] = []
        plain: list[Contribution] = []
        for c in self.contributions:
            if not (c.all_peers or c.peers & bit) or proto not in c.protos or not c.lo <= port <= c.hi:
                continue
            if c.deny:
                denies.append(c.ref)
            elif c.parser is not None:
                l7.append(c)
            else:
                plain.append(c)
        if denies:
            return Verdict(kind=VerdictKind.DROP, enforced=self.enforced, matched=tuple(dict.fromkeys(denies)))
        if not l7 and not plain:
            return Verdict(kind=self.default, enforced=self.enforced)
        if not l7:
            return Verdict(kind=VerdictKind.ALLOW, enforced=self.enforced, matched=tuple(dict.fromkeys(c.ref for c in plain)))
        parsers = {c.parser for c in l7}
        refs = tuple(dict.fromkeys(itertools.chain((c.ref for c in l7), (c.ref for c in plain))))
        if len(parsers) > 1:
            return Verdict(kind=VerdictKind.DROP, enforced=self.enforced, matched=refs, conflict=True)
        parser = l7[0].parser
        assert parser is not None
        rules = self._pmap.rule_set(parser, l7, plain)
        return Verdict(kind=VerdictKind.REDIRECT, enforced=self.enforced, parser=parser, rules=rules, matched=refs)

    def entries(self) -> list[MapEntry]:
        """Resolved, non-overlapping entries that differ from `default`, for the BPF policy map.

        Identities matched by exactly the same contributions get the same entries, so the peers are
        first split into such groups (bitmap refinement, one pass per contribution) and each group
        is resolved once: with thousands of identities and a few dozen contributions there are only
        a handful of groups, where resolving every identity would cost a lookup per port boundary each.
        """
        selected = 0
        for c in self.contributions:
            selected |= self._pmap.all_bits if c.all_peers else c.peers
        groups: list[tuple[int, list[Contribution]]] = [(selected, [])] if selected else []
        for c in self.contributions:
            cbits = self._pmap.all_bits if c.all_peers else c.peers
            split: list[tuple[int, list[Contribution]]] = []
            for bits, members in groups:
                inside = bits & cbits
                if inside:
                    split.append((inside, [*members, c]))
                if bits & ~cbits:
                    split.append((bits & ~cbits, members))
            groups = split
        by_index: list[tuple[int, list[MapEntry]]] = []
        for bits, mine in groups:
            indices = list(iter_bits(bits))
            first = self._pmap.identities[indices[0]].id
            runs = self._runs(first, mine)
            for idx in indices:
                ident = self._pmap.identities[idx].id
                by_index.append((idx, [MapEntry(identity=ident, proto=p, port=lo, end_port=hi, verdict=v, parser=parser)
                                       for p, lo, hi, v, parser in runs]))
        by_index.sort(key=lambda item: item[0])  # ascending identity index, as callers and tests expect
        return [entry for _, entries in by_index for entry in entries]

    def _runs(self, ident: int, mine: Sequence[Contribution]) -> list[tuple[L4Proto, int, int, VerdictKind, ParserType | None]]:
        """(proto, first port, last port, verdict, parser) runs differing from `default` for one peer identity
        that exactly the contributions `mine` match."""
        out: list[tuple[L4Proto, int, int, VerdictKind, ParserType | None]] = []
        for proto in CONCRETE_PROTOS:
            points = {0, 65536}
            for c in mine:
                if proto in c.protos:
                    points.update((c.lo, c.hi + 1))
            bounds = sorted(points)
            run: tuple[int, VerdictKind, ParserType | None] | None = None
            for lo in bounds[:-1]:
                v = self.lookup(ident, lo, proto)
                if run is not None and (run[1], run[2]) == (v.kind, v.parser):
                    continue
                if run is not None:
                    self._emit(out, proto, run, lo - 1)
                run = (lo, v.kind, v.parser)
            if run is not None:
                self._emit(out, proto, run, 65535)
        return out

    def l3_verdict(self, peer_identity: int) -> VerdictKind:
        """What an L3-only key says for this peer: every protocol without ports (GRE, ESP, ...) and
        every port of the others that no more specific entry covers. DROP by an L3-only deny, ALLOW
        by an L3-only allow, else the default."""
        idx = self._pmap.identity_index.get(peer_identity)
        bit = 0 if idx is None else 1 << idx
        kinds = {c.deny for c in self.contributions if c.l3 and (c.all_peers or c.peers & bit)}
        if True in kinds:
            return VerdictKind.DROP
        if False in kinds:
            return VerdictKind.ALLOW
        return self.default

    def layered_entries(self) -> list[tuple[int, VerdictKind, list[MapEntry]]]:
        """For the kernel's layered lookup: per selected identity, its `l3_verdict` and EVERY run of
        (protocol, port range) in KERNEL_PROTOS with its verdict (ICMP ports are types 0-255), so the
        caller can write what differs from the L3 verdict (a deny under an L3-only allow included).
        Identities matched by exactly the same contributions are computed once (as in `entries`)."""
        selected = 0
        for c in self.contributions:
            selected |= self._pmap.all_bits if c.all_peers else c.peers
        groups: list[tuple[int, list[Contribution]]] = [(selected, [])] if selected else []
        for c in self.contributions:
            cbits = self._pmap.all_bits if c.all_peers else c.peers
            split: list[tuple[int, list[Contribution]]] = []
            for bits, members in groups:
                if bits & cbits:
                    split.append((bits & cbits, [*members, c]))
                if bits & ~cbits:
                    split.append((bits & ~cbits, members))
            groups = split
        out: list[tuple[int, tuple[int, VerdictKind, list[MapEntry]]]] = []
        for bits, mine in groups:
            indices = list(iter_bits(bits))
            first = self._pmap.identities[indices[0]].id
            runs = self._all_runs(first, mine)
            l3 = self.l3_verdict(first)
            for idx in indices:
                ident = self._pmap.identities[idx].id
                entries = [MapEntry(identity=ident, proto=p, port=lo, end_port=hi, verdict=v, parser=parser) for p, lo, hi, v, parser in runs]
                out.append((idx, (ident, l3, entries)))
        out.sort(key=lambda item: item[0])
        return [item for _, item in out]

    def _all_runs(self, ident: int, mine: Sequence[Contribution]) -> list[tuple[L4Proto, int, int, VerdictKind, ParserType | None]]:
        """Every (proto, first port, last port, verdict, parser) run of KERNEL_PROTOS for one peer identity."""
        out: list[tuple[L4Proto, int, int, VerdictKind, ParserType | None]] = []
        for proto in KERNEL_PROTOS:
            top = _PORT_SPACE.get(proto, 65536)
            points = {0, top}
            for c in mine:
                if proto in c.protos:
                    points.update((min(c.lo, top), min(c.hi + 1, top)))
            bounds = sorted(points)
            run: tuple[int, VerdictKind, ParserType | None] | None = None
            for lo in bounds[:-1]:
                v = self.lookup(ident, lo, proto)
                if run is not None and (run[1], run[2]) == (v.kind, v.parser):
                    continue
                if run is not None:
                    out.append((proto, run[0], lo - 1, run[1], run[2]))
                run = (lo, v.kind, v.parser)
            if run is not None:
                out.append((proto, run[0], top - 1, run[1], run[2]))
        return out

    def _emit(self, out: list[tuple[L4Proto, int, int, VerdictKind, ParserType | None]], proto: L4Proto,
              run: tuple[int, VerdictKind, ParserType | None], end: int) -> None:
        if run[1] is self.default:
            return
        out.append((proto, run[0], end, run[1], run[2]))


@dataclass(frozen=True, slots=True)
class Peer:
    """One side of a flow: its identity and, when it is a local endpoint, its `ns/name`."""

    identity: int
    endpoint: str | None = None
    ip: str | None = None


class PolicyMap:
    """The compiled form the proxy (issue 4) and the BPF data path (issue 5) read.

    - `direction(endpoint_key, direction)` -> DirectionPolicy (lookup, entries, enforced)
    - `lookup(endpoint_key, direction, peer_identity, port, proto)` -> Verdict
    - `identities`, `identity_of(endpoint_key)`, `ipcache` (IP/CIDR -> identity), `errors`
    """

    def __init__(self) -> None:
        self.identities: list[Identity] = []
        self.identity_index: dict[int, int] = {}
        self.all_bits = 0
        self.ipcache = IpCache(())
        self.endpoints: dict[str, Endpoint] = {}
        self.endpoint_identity: dict[str, int] = {}
        self.endpoint_by_ip: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
        self.errors: list[PolicyError] = []
        self._policies: dict[tuple[int, PolicyDirection], DirectionPolicy] = {}
        self._rule_sets: dict[tuple[ParserType, tuple[int, ...], tuple[str, ...]], L7RuleSet] = {}
        self._empty: dict[PolicyDirection, DirectionPolicy] = {}

    # -- queries ---------------------------------------------------------------------------------

    def identity(self, identity: int) -> Identity | None:
        idx = self.identity_index.get(identity)
        return None if idx is None else self.identities[idx]

    def identity_of(self, endpoint_key: str) -> int | None:
        return self.endpoint_identity.get(endpoint_key)

    def direction(self, endpoint_key: str, direction: PolicyDirection) -> DirectionPolicy:
        """The endpoint's compiled policy; an unknown endpoint gets an unenforced, empty policy."""
        ident = self.endpoint_identity.get(endpoint_key)
        if ident is None:
            return self._empty[direction]
        return self._policies.get((ident, direction)) or self._empty[direction]

    def lookup(self, endpoint_key: str, direction: PolicyDirection, peer_identity: int, port: int, proto: L4Proto) -> Verdict:
        return self.direction(endpoint_key, direction).lookup(peer_identity, port, proto)

    def peer_from_endpoint(self, endpoint_key: str) -> Peer:
        """Raises KeyError for an unknown endpoint."""
        ep = self.endpoints[endpoint_key]
        return Peer(self.endpoint_identity[endpoint_key], endpoint_key, ep.ips[0] if ep.ips else None)

    def peer_from_ip(self, ip: str) -> Peer:
        """The identity the ipcache gives `ip`, and the endpoint owning it (if any). Raises ValueError."""
        addr = ipaddress.ip_address(ip)
        key = self.endpoint_by_ip.get(addr)
        if key is not None:
            return Peer(self.endpoint_identity[key], key, str(addr))
        return Peer(self.ipcache.lookup(addr), None, str(addr))

    def rule_set(self, parser: ParserType, l7: Sequence[Contribution], plain: Sequence[Contribution]) -> L7RuleSet:
        key = (parser, tuple(c.uid for c in l7), tuple(dict.fromkeys(c.ref for c in plain)))
        hit = self._rule_sets.get(key)
        if hit is None:
            entries: list[tuple[L7Rule | None, str]] = [(None, ref) for ref in key[2]]
            for c in l7:
                entries.extend(c.l7)
            hit = self._rule_sets[key] = L7RuleSet(parser, entries)
        return hit


# --- compilation ------------------------------------------------------------------------------------


@dataclass
class _Compiler:
    policies: Sequence[Policy]
    endpoints: Endpoints
    learned: Mapping[str, Iterable[str]]
    identities: IdentityAllocators
    allow_localhost: bool = False
    pmap: PolicyMap = field(default_factory=PolicyMap)
    uids: itertools.count[int] = field(default_factory=itertools.count)

    def run(self) -> PolicyMap:
        pmap = self.pmap
        self._identities()
        index = LabelIndex([i.labels for i in pmap.identities])
        self._label_index = index
        self._entity_bits = self._entities()
        self._cidr_cache: dict[CidrRule, int] = {}
        self._fqdn_cache: dict[FqdnSelector, int] = {}
        pmap._empty = {d: DirectionPolicy(pmap, d, False, ()) for d in PolicyDirection}
        # Subjects: endpoint identities only.
        ep_idents = [i for i in pmap.identities if i.kind is IdentityKind.ENDPOINT]
        subject_index = LabelIndex([i.labels for i in ep_idents])
        per_subject: dict[int, list[tuple[Policy, Rule]]] = {}
        for policy in self.policies:
            for rule in policy.rules:
                if rule.endpoint_selector is None:
                    continue  # nodeSelector: host policy, selects no pod
                for pos in iter_bits(subject_index.select(rule.endpoint_selector)):
                    per_subject.setdefault(pos, []).append((policy, rule))
        contrib_cache: dict[int, list[Contribution]] = {}
        for pos, rules in per_subject.items():
            ident = ep_idents[pos]
            for direction in PolicyDirection:
                enforced = False
                contributions: list[Contribution] = []
                visibility: list[Contribution] = []
                for policy, rule in rules:
                    allow, deny = (rule.ingress, rule.ingress_deny) if direction is PolicyDirection.INGRESS else (rule.egress, rule.egress_deny)
                    dd = rule.default_deny_ingress if direction is PolicyDirection.INGRESS else rule.default_deny_egress
                    if (allow or deny) and dd:
                        enforced = True
                    for entry in (*deny, *allow):
                        got = contrib_cache.get(id(entry))
                        if got is None:
                            got = contrib_cache[id(entry)] = self._contributions(policy, entry)
                        contributions.extend(got)
                        if not dd:
                            visibility.extend(self._visibility(got, direction))
                if not enforced:
                    contributions.extend(visibility)
                if enforced and direction is PolicyDirection.INGRESS and self.allow_localhost:
                    contributions.append(self._localhost())
                dp = DirectionPolicy(pmap, direction, enforced, contributions)
                pmap._policies[(ident.id, direction)] = dp
                self._check_conflicts(ident, dp)
        return pmap

    def _localhost(self) -> Contribution:
        """Cilium's allow-localhost=always (its default in Kubernetes mode): an L3-only allow from the
        host identity in every enforced ingress policy. A deny for `host` still wins."""
        bit = 1 << self.pmap.identity_index[int(ReservedIdentity.HOST)]
        return Contribution(bit, False, _L3_PROTOS, 0, 65535, False, None, (), ALLOW_LOCALHOST_REF, next(self.uids), l3=True)

    # identities and ipcache
    def _identities(self) -> None:
        pmap = self.pmap
        idents = reserved_identities()
        label_sets = {e.label_set for e in self.endpoints.endpoints}
        ep_numbers = allocate_endpoint_identities(label_sets, self.identities.endpoints)
        members: dict[LabelSet, list[str]] = {}
        for e in self.endpoints.endpoints:
            members.setdefault(e.label_set, []).append(e.key)
        for ls, n in sorted(ep_numbers.items(), key=lambda kv: kv[1]):
            idents.append(Identity(id=n, kind=IdentityKind.ENDPOINT, labels=ls, endpoints=tuple(members[ls])))
        endpoint_ips = {_address(ip)[0]: e.key for e in self.endpoints.endpoints for ip in e.ips}
        prefixes: set[IPNetwork] = set()
        for policy in self.policies:
            for rule in policy.rules:
                for entry in (*rule.ingress, *rule.ingress_deny, *rule.egress, *rule.egress_deny):
                    for c in entry.cidrs or ():
                        prefixes.add(c.cidr)
                        prefixes.update(c.except_)
        names: dict[IPNetwork, set[str]] = {}
        for name, ips in self.learned.items():
            for ip in ips:
                try:
                    addr = ipaddress.ip_address(ip)
                except ValueError:
                    continue
                if addr in endpoint_ips:
                    continue  # toFQDNs never selects cluster endpoints
                net = ipaddress.ip_network(addr)
                prefixes.add(net)
                names.setdefault(net, set()).add(dnsmatch.fqdn(name))
        prefixes = {p for p in prefixes if p.prefixlen > 0}
        world = {4: ReservedIdentity.WORLD_IPV4, 6: ReservedIdentity.WORLD_IPV6}
        for net, n in sorted(allocate_cidr_identities(prefixes, self.identities.cidrs).items(), key=lambda kv: kv[1]):
            labels = LabelSet.of([Label("cidr", str(net)), Label("reserved", world[net.version].label_name), Label("reserved", "world")])
            idents.append(Identity(id=n, kind=IdentityKind.CIDR, labels=labels, prefix=net, names=frozenset(names.get(net, ()))))
        pmap.identities = idents
        pmap.identity_index = {ident.id: i for i, ident in enumerate(idents)}
        pmap.all_bits = (1 << len(idents)) - 1
        ipc: list[tuple[IPNetwork, int]] = [
            (ipaddress.ip_network("0.0.0.0/0"), int(ReservedIdentity.WORLD_IPV4)),
            (ipaddress.ip_network("::/0"), int(ReservedIdentity.WORLD_IPV6)),
        ]
        ipc.extend((i.prefix, i.id) for i in idents if i.kind is IdentityKind.CIDR and i.prefix is not None)
        for ident_id, ip in self.endpoints.reserved_ips:  # node and API server addresses (before pods: a pod's IP wins)
            try:
                ipc.append((_address(ip)[1], ident_id))
            except ValueError:
                continue
        for e in self.endpoints.endpoints:
            n = ep_numbers[e.label_set]
            key = e.key  # a property that formats a string: once per endpoint, not once per use
            pmap.endpoints[key] = e
            pmap.endpoint_identity[key] = n
            for ip in e.ips:
                addr, net = _address(ip)
                ipc.append((net, n))
                pmap.endpoint_by_ip[addr] = key
        pmap.ipcache = IpCache(ipc)

    def _entities(self) -> dict[Entity, int]:
        bits: dict[Entity, int] = {e: 0 for e in Entity}
        by_reserved = {r: 1 << self.pmap.identity_index[int(r)] for r in ReservedIdentity}
        for i, ident in enumerate(self.pmap.identities):
            b = 1 << i
            if ident.kind is IdentityKind.ENDPOINT:
                bits[Entity.CLUSTER] |= b
            elif ident.kind is IdentityKind.CIDR and ident.prefix is not None:
                bits[Entity.WORLD] |= b
                bits[Entity.WORLD_IPV4 if ident.prefix.version == 4 else Entity.WORLD_IPV6] |= b
        R = ReservedIdentity
        bits[Entity.WORLD] |= by_reserved[R.WORLD] | by_reserved[R.WORLD_IPV4] | by_reserved[R.WORLD_IPV6]
        bits[Entity.WORLD_IPV4] |= by_reserved[R.WORLD_IPV4]
        bits[Entity.WORLD_IPV6] |= by_reserved[R.WORLD_IPV6]
        for r in (R.HOST, R.REMOTE_NODE, R.KUBE_APISERVER, R.INIT, R.HEALTH, R.UNMANAGED, R.INGRESS):
            bits[Entity.CLUSTER] |= by_reserved[r]
        bits[Entity.HOST] = by_reserved[R.HOST]
        bits[Entity.REMOTE_NODE] = by_reserved[R.REMOTE_NODE]
        bits[Entity.KUBE_APISERVER] = by_reserved[R.KUBE_APISERVER]
        bits[Entity.INIT] = by_reserved[R.INIT]
        bits[Entity.HEALTH] = by_reserved[R.HEALTH]
        bits[Entity.UNMANAGED] = by_reserved[R.UNMANAGED]
        bits[Entity.INGRESS] = by_reserved[R.INGRESS]
        bits[Entity.ALL] = self.pmap.all_bits
        bits[Entity.NONE] = 0
        return bits

    def _cidr_bits(self, rule: CidrRule) -> int:
        hit = self._cidr_cache.get(rule)
        if hit is not None:
            return hit
        bits = 0
        for i, ident in enumerate(self.pmap.identities):
            p = ident.prefix
            if p is None or p.version != rule.cidr.version or not p.subnet_of(rule.cidr):  # type: ignore[arg-type]
                continue
            if any(p.subnet_of(x) for x in rule.except_):  # type: ignore[arg-type]
                continue
            bits |= 1 << i
        self._cidr_cache[rule] = bits
        return bits

    def _fqdn_bits(self, sel: FqdnSelector) -> int:
        hit = self._fqdn_cache.get(sel)
        if hit is not None:
            return hit
        if sel.match_name is not None:
            want = dnsmatch.fqdn(sel.match_name)

            def ok(name: str) -> bool:
                return name == want

        else:
            regex = compile_regex(dnsmatch.pattern_to_regex(sel.match_pattern or "*"))

            def ok(name: str) -> bool:
                return regex.search(name) is not None

        bits = 0
        for i, ident in enumerate(self.pmap.identities):
            if ident.names and any(ok(n) for n in ident.names):
                bits |= 1 << i
        self._fqdn_cache[sel] = bits
        return bits

    def _peer_bits(self, entry: PeerRule) -> tuple[int, bool]:
        if entry.selects_nothing:
            return 0, False
        if entry.is_wildcard_peer:
            return self.pmap.all_bits, True
        bits = 0
        all_peers = False
        for sel in entry.endpoints or ():
            bits |= self._label_index.select(sel)
        for ent in entry.entities or ():
            bits |= self._entity_bits[ent]
            all_peers = all_peers or ent is Entity.ALL
        for c in entry.cidrs or ():
            bits |= self._cidr_bits(c)
        for f in entry.fqdns or ():
            bits |= self._fqdn_bits(f)
        return bits, all_peers

    def _contributions(self, policy: Policy, entry: PeerRule) -> list[Contribution]:
        # Entries that select no peer right now (e.g. toFQDNs before any DNS answer) are kept: they
        # match nothing, but `trace` lists them among the rules it considered.
        peers, all_peers = self._peer_bits(entry)
        prefix = f"{policy.key}: "
        out: list[Contribution] = []
        if not entry.to_ports:
            if entry.has_icmps:
                # ICMP only: Cilium keys each type as the port of proto ICMP/ICMPv6 (api.ICMPField.PortProtocol)
                for proto, icmp_type in entry.icmps:
                    out.append(Contribution(peers, all_peers, frozenset({proto}), icmp_type, icmp_type, entry.deny, None, (), prefix + entry.path, next(self.uids)))
                return out
            out.append(Contribution(peers, all_peers, _L3_PROTOS, 0, 65535, entry.deny, None, (), prefix + entry.path, next(self.uids), l3=True))
            return out
        for pr in entry.to_ports:
            parser = pr.rules.parser if pr.rules is not None else None
            l7: tuple[tuple[L7Rule, str], ...] = ()
            if pr.rules is not None and parser is not None:
                kind = parser.value
                rules: tuple[L7Rule, ...] = {
                    ParserType.HTTP: pr.rules.http,
                    ParserType.DNS: pr.rules.dns,
                    ParserType.KAFKA: pr.rules.kafka,
                }[parser] or ()
                l7 = tuple((r, f"{prefix}{pr.path}.rules.{kind}[{i}]") for i, r in enumerate(rules))
            for pp in pr.ports:
                protos = _ALL_PROTOS if pp.protocol is L4Proto.ANY else frozenset({pp.protocol})
                if parser is ParserType.DNS:
                    protos = protos & {L4Proto.TCP, L4Proto.UDP}
                lo, hi = pp.range
                out.append(Contribution(peers, all_peers, protos, lo, hi, entry.deny, parser, l7, prefix + pr.path, next(self.uids)))
        return out

    def _visibility(self, contributions: Sequence[Contribution], direction: PolicyDirection) -> list[Contribution]:
        """The allow-all L7 entries Cilium adds for L7 rules of a rule with default deny turned off.

        cilium/cilium pkg/policy/l4.go `ensureWildcard` (PR #38841, since 1.17.4): when a rule sets
        `enableDefaultDeny.<direction>: false` and no rule selecting the endpoint turns default deny
        on for that direction, its L7 ports get a wildcard L3 selector with an allow-all L7 rule, so
        the L7 rules only add visibility: every request on the port reaches the proxy, is recorded,
        and is allowed whether or not a rule matches. The caller adds these only when the direction
        is not enforced. (The 1.19 docs still describe the old refusal; the code decides.)
        """
        out: list[Contribution] = []
        allow_all: dict[ParserType, L7Rule] = {
            ParserType.HTTP: HttpRule(),
            ParserType.DNS: DnsRule(match_pattern="*"),
            ParserType.KAFKA: KafkaRule(),
        }
        for c in contributions:
            if c.deny or c.parser is None:
                continue
            ref = f"{c.ref} {VISIBILITY_MARK}.{direction.value} is false)"
            l7 = ((allow_all[c.parser], ref),)
            out.append(Contribution(self.pmap.all_bits, True, c.protos, c.lo, c.hi, False, c.parser, l7, ref, next(self.uids)))
        return out

    def _check_conflicts(self, ident: Identity, dp: DirectionPolicy) -> None:
        l7 = [c for c in dp.contributions if c.parser is not None and not c.deny]
        if len({c.parser for c in l7}) < 2:
            return
        for a, b in itertools.combinations(l7, 2):
            if a.parser is not b.parser and a.protos & b.protos and a.lo <= b.hi and b.lo <= a.hi and (a.all_peers or b.all_peers or a.peers & b.peers):
                assert a.parser is not None and b.parser is not None
                self.pmap.errors.append(
                    PolicyConflictError(
                        f"cannot merge conflicting L7 parsers ({a.parser.value} from {a.ref}, {b.parser.value} from {b.ref})",
                        obj=", ".join(ident.endpoints),
                        path=dp.direction.value,
                    )
                )
                return


@functools.lru_cache(maxsize=1 << 17)
def _address(ip: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, IPNetwork]:
    """An endpoint IP parsed once and for all recompiles (a cluster's pods keep their IPs between them):
    the address and its host prefix. Raises ValueError (endpoint IPs are validated before)."""
    addr = ipaddress.ip_address(ip)
    return addr, ipaddress.ip_network(addr)


def compile_policy(
    policies: Iterable[Policy],
    endpoints: Endpoints,
    learned: Mapping[str, Iterable[str]] | None = None,
    identities: IdentityAllocators | None = None,
    *,
    allow_localhost: bool = False,
) -> PolicyMap:
    """Compile validated policies for `endpoints`.

    `allow_localhost`: Cilium's `--allow-localhost=always` (the default of its Kubernetes mode, for
    kubelet probes): the `host` identity is allowed into every endpoint at L3 (a deny still wins).
    False (Cilium's `policy`): host traffic needs a rule like `fromEntities: [host]`.

    `learned` maps DNS names to the IPs DNS answers gave for them (FqdnCache.snapshot()); toFQDNs
    selectors select those addresses' identities. `identities` are the node's allocators, kept
    across compilations so that a live label set or prefix keeps its number; None numbers afresh.
    Returns: the PolicyMap. Conflicts between rules are in `PolicyMap.errors` (the affected peers
        are dropped); compilation itself does not raise for valid policies.
    """
    return _Compiler(list(policies), endpoints, learned or {}, identities or IdentityAllocators.new(), allow_localhost).run()
