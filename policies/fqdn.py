"""What DNS answers taught us: name -> IPs with expiry, for toFQDNs (Cilium's DNS cache).

Time is injected (`now`, seconds on any monotonic clock); nothing here reads a clock. An answer
associates its addresses with the query name and every CNAME in its chain. `min_ttl_s` raises
short TTLs (Cilium's --tofqdns-min-ttl); 0 honours the answer's TTL.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from parsers.events import DnsResponse
from policies.dnsmatch import fqdn


class FqdnCache:
    def __init__(self, *, min_ttl_s: int = 0) -> None:
        self.min_ttl_s = min_ttl_s
        self._entries: dict[str, dict[str, float]] = {}  # fqdn -> ip -> expiry
        self.generation = 0  # bumps whenever the set of live (name, ip) pairs may have grown

    def add(self, name: str, ips: Iterable[str], *, ttl_s: float, now: float) -> None:
        """Remember that `name` resolved to `ips` at `now` for `ttl_s` seconds. Invalid IPs are skipped."""
        expiry = now + max(ttl_s, self.min_ttl_s)
        table = self._entries.setdefault(fqdn(name), {})
        for ip in ips:
            try:
                text = str(ipaddress.ip_address(ip.strip()))
            except ValueError:
                continue
            if table.get(text, float("-inf")) < expiry:
                if text not in table or table[text] <= now:
                    self.generation += 1
                table[text] = expiry

    def observe(self, response: DnsResponse, *, now: float) -> None:
        """Learn from a DNS answer (rcode 0 with addresses); others are ignored."""
        if response.rcode != 0 or not response.addresses:
            return
        ttl = response.min_ttl if response.min_ttl is not None else 0
        for name in (response.normalized_name, *response.cnames):
            self.add(name, response.addresses, ttl_s=ttl, now=now)

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
