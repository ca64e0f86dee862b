"""The DNS-learned name -> IP cache behind toFQDNs: TTLs with injected time, CNAME chains, min TTL."""

from __future__ import annotations

from collections.abc import Iterable

from membrane.parsers.events import DnsResponse
from membrane.policies import FqdnCache, L4Proto, PolicyDirection, VerdictKind, compile_policy, parse_endpoints
from membrane.policies.fqdn import canonical_ip

from tests.policies.util import ENDPOINTS, cnp, policies


def _answer(name: str, *ips: str, ttl: int = 30, cnames: tuple[str, ...] = (), rcode: int = 0) -> DnsResponse:
    return DnsResponse(id=1, name=name, normalized_name=name.lower().rstrip(".") + ".", qtype=1, rcode=rcode, addresses=ips, cnames=cnames, min_ttl=ttl)


def test_entries_expire_after_ttl() -> None:
    """An address is selectable until its TTL passes (time is injected, never read)."""
    cache = FqdnCache()
    cache.observe(_answer("API.example.com", "192.0.2.1", ttl=30), now=100.0)
    assert cache.lookup("api.example.com.", now=129.9) == {"192.0.2.1"}
    assert cache.lookup("api.example.com", now=130.0) == frozenset()
    cache.expire(now=130.0)
    assert cache.snapshot(now=130.0) == {}


def test_min_ttl_and_cnames() -> None:
    """min_ttl_s raises short TTLs; addresses belong to the query name and every CNAME in the chain."""
    cache = FqdnCache(min_ttl_s=3600)
    cache.observe(_answer("www.example.com", "192.0.2.2", ttl=5, cnames=("edge.cdn.net.",)), now=0.0)
    assert cache.snapshot(now=3599.0) == {"www.example.com.": {"192.0.2.2"}, "edge.cdn.net.": {"192.0.2.2"}}


def test_addresses_are_stored_in_canonical_text() -> None:
    """Addresses are kept as ipaddress's canonical text (RFC 5952 for IPv6), whatever form they came in; invalid ones are skipped."""
    cache = FqdnCache()
    for _ in range(2):  # the second round is served from the memo and the stored keys
        cache.add("a.example.", [" 2001:DB8:0:0:0:0:0:1 ", "192.0.2.1", "not-an-ip", "2001:db8::1"], ttl_s=30, now=0.0)
        cache.add("A.Example", ["0192.0.2.1"], ttl_s=30, now=0.0)
    assert cache.snapshot(now=1.0) == {"a.example.": {"2001:db8::1", "192.0.2.1"}}
    assert canonical_ip(" ::FFFF:192.0.2.1") == "::ffff:c000:201"
    assert canonical_ip("256.0.0.1") is None
    assert canonical_ip("256.0.0.1") is None


def test_generation_bumps_only_when_live_pairs_grow() -> None:
    """Re-learning an address with an expiry that does not extend it changes nothing; a new or revived pair bumps `generation`."""
    cache = FqdnCache()
    cache.observe(_answer("a.example", "192.0.2.1", ttl=30, cnames=("b.example.",)), now=0.0)
    assert cache.generation == 2
    cache.observe(_answer("a.example", "192.0.2.1", ttl=10, cnames=("b.example.",)), now=1.0)
    assert cache.generation == 2
    assert cache.lookup("a.example", now=29.9) == {"192.0.2.1"}
    cache.observe(_answer("a.example", "192.0.2.1", ttl=60, cnames=("b.example.",)), now=1.0)
    assert cache.generation == 2
    assert cache.lookup("b.example", now=60.9) == {"192.0.2.1"}
    cache.observe(_answer("a.example", "192.0.2.1", "192.0.2.2", ttl=5), now=61.0)
    assert cache.generation == 4  # a.example: 192.0.2.1 revived after expiry, 192.0.2.2 new
    assert cache.snapshot(now=62.0) == {"a.example.": {"192.0.2.1", "192.0.2.2"}}


def test_failed_answers_teach_nothing() -> None:
    """NXDOMAIN/SERVFAIL answers and answers without addresses are ignored."""
    cache = FqdnCache()
    cache.observe(_answer("a.com", "192.0.2.3", rcode=3), now=0.0)
    cache.observe(_answer("b.com"), now=0.0)
    assert cache.snapshot(now=0.0) == {}


def test_snapshot_feeds_compile() -> None:
    """A cache snapshot makes toFQDNs select the learned address after recompiling."""
    cache = FqdnCache()
    pol = policies(cnp("f", "endpointSelector: {matchLabels: {app: frontend}}\negress: [{toFQDNs: [{matchPattern: '*.example.com'}]}]"))
    eps = parse_endpoints(ENDPOINTS)
    before = compile_policy(pol, eps, cache.snapshot(now=0.0))
    cache.observe(_answer("api.example.com", "192.0.2.9"), now=0.0)
    after = compile_policy(pol, eps, cache.snapshot(now=1.0))
    for pmap, expected in ((before, VerdictKind.DROP), (after, VerdictKind.ALLOW)):
        ident = pmap.ipcache.lookup("192.0.2.9")
        assert pmap.lookup("default/frontend", PolicyDirection.EGRESS, ident, 443, L4Proto.TCP).kind is expected


def test_observe_goes_through_add_so_subclasses_see_every_learned_pair() -> None:
    """observe() learns through add(): the agent's caches override add() to push new IPs to the kernel first."""
    from membrane.parsers.events import DnsResponse
    from membrane.policies import FqdnCache

    seen: list[tuple[str, tuple[str, ...]]] = []

    class Hooked(FqdnCache):
        def add(self, name: str, ips: Iterable[str], *, ttl_s: float, now: float) -> None:
            seen.append((name, tuple(ips)))
            super().add(name, ips, ttl_s=ttl_s, now=now)

    cache = Hooked()
    cache.observe(
        DnsResponse(id=1, name="www.x.io.", normalized_name="www.x.io.", qtype=1, rcode=0,
                    addresses=("10.0.0.1",), cnames=("edge.x.io.",), min_ttl=30),
        now=0.0,
    )
    assert seen == [("www.x.io.", ("10.0.0.1",)), ("edge.x.io.", ("10.0.0.1",))]
    assert cache.snapshot(now=1.0) == {"www.x.io.": frozenset({"10.0.0.1"}), "edge.x.io.": frozenset({"10.0.0.1"})}
