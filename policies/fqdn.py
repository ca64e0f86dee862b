"""What DNS answers taught us: name -> IPs with expiry, for toFQDNs (Cilium's DNS cache).

Time is injected (`now`, seconds on any monotonic clock); nothing here reads a clock. An answer
associates its addresses with the query name and every CNAME in its chain. `min_ttl_s` raises
short TTLs (Cilium's --tofqdns-min-ttl); 0 honours the answer's TTL.

Hot path (one call per relayed DNS answer): an address already stored under the name is canonical
text by construction, so it is not parsed again; other address texts go through a bounded memo of
`str(ipaddress.ip_address(text.strip()))` (None when invalid). Names already stored are `fqdn()`
output, which `fqdn()` leaves unchanged, so they are looked up as given.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from membrane.parsers.events import DnsResponse
from membrane.policies.dnsmatch import fqdn

_NEG_INF = float("-inf")
_CANONICAL_MEMO_MAX = 16384
_canonical_memo: dict[str, str | None] = {}  # address text as given -> canonical text, None if invalid


def canonical_ip(text: str) -> str | None:
    """`str(ipaddress.ip_address(text.strip()))`, or None when that raises ValueError (memoised)."""
    try:
        return _canonical_memo[text]
    except KeyError:
        pass
    try:
        canonical: str | None = str(ipaddress.ip_address(text.strip()))
    except ValueError:
        canonical = None
    if len(_canonical_memo) >= _CANONICAL_MEMO_MAX:
        _canonical_memo.clear()
    _canonical_memo[text] = canonical
    return canonical


class FqdnCache:
    def __init__(self, *, min_ttl_s: int = 0) -> None:
        self.min_ttl_s = min_ttl_s
        self._entries: dict[str, dict[str, float]] = {}  # fqdn -> ip -> expiry
        self.generation = 0  # bumps whenever the set of live (name, ip) pairs may have grown

    def add(self, name: str, ips: Iterable[str], *, ttl_s: float, now: float) -> None:
        """Remember that `name` resolved to `ips` at `now` for `ttl_s` seconds. Invalid IPs are skipped."""
        self._add(name, ips, now + max(ttl_s, self.min_ttl_s), now)

    def _add(self, name: str, ips: Iterable[str], expiry: float, now: float) -> None:
        entries = self._entries
        table = entries.get(name)  # a key is fqdn() output, and fqdn() of it is itself
        if table is None:
            table = entries.setdefault(fqdn(name), {})
        get = table.get
        for ip in ips:
            old = get(ip)  # a key is canonical text already
            if old is None:
                text = canonical_ip(ip)
                if text is None:
                    continue
                old = get(text, _NEG_INF)
            else:
                text = ip
            if old < expiry:
                if old <= now:
                    self.generation += 1
                table[text] = expiry

    def observe(self, response: DnsResponse, *, now: float) -> None:
        """Learn from a DNS answer (rcode 0 with addresses); others are ignored."""
        addresses = response.addresses
        if response.rcode != 0 or not addresses:
            return
        ttl = response.min_ttl if response.min_ttl is not None else 0
        # Through add(), not _add(): subclasses (the agent's caches) hook add() to push new pairs to the
        # kernel before the answer is relayed.
        self.add(response.normalized_name, addresses, ttl_s=ttl, now=now)
        for name in response.cnames:
            self.add(name, addresses, ttl_s=ttl, now=now)

    def lookup(self, name: str, *, now: float) -> frozenset[str]:
        table = self._entries.get(fqdn(name), {})
        return frozenset(ip for ip, exp in table.items() if exp > now)

    def expire(self, *, now: float) -> None:
        for name in list(self._entries):
            table = self._entries[name]
            for ip in [ip for ip, exp in table.items() if exp <= now]:
                del table[ip]
            if not table:
                del self._entries[name]

    def snapshot(self, *, now: float) -> Mapping[str, frozenset[str]]:
        """Live name -> IPs, the input `compile_policy` takes for toFQDNs."""
        out = {name: self.lookup(name, now=now) for name in self._entries}
        return {k: v for k, v in out.items() if v}
