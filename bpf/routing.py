"""The policy routing that makes steered packets to non-local addresses deliverable locally.

Owns one `ip rule` per family (`fwmark MARK/MASK lookup TABLE`, priority RULE_PRIORITY) and one route
per family in TABLE (`local 0.0.0.0/0 dev lo`, `local ::/0 dev lo`). Add and remove are idempotent.
Never touches any other rule or table.
"""

from __future__ import annotations

import errno
import logging
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

TABLE = 0x4D42  # 19778, "MB": distinctive, so cleanup can tell our routes from anyone else's
RULE_PRIORITY = 77  # before main (32766), after local (0)
MARK = 0x0E00  # what tc_steer writes into skb->mark for steered packets
MARK_MASK = 0x0F00
FAMILIES = (socket.AF_INET, socket.AF_INET6)
_DEFAULT: dict[int, str] = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "default"}


def _ignore(e: NetlinkError, *codes: int) -> None:
    if e.code not in codes:
        raise e


def add_routing(mark: int = MARK, mask: int = MARK_MASK) -> None:
    """Install the fwmark rule and the local default route for IPv4 and IPv6; existing ones are kept.

    Raises NetlinkError for anything but "already exists" (e.g. EPERM without CAP_NET_ADMIN).
    """
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for family in FAMILIES:
            try:
                # scope host, as `ip route add local ...` sets it; IPv4 rejects a universe-scoped local route
                scope = 254 if family == socket.AF_INET else 0
                ipr.route("add", family=family, dst=_DEFAULT[family], type="local", oif=lo, table=TABLE, scope=scope)
            except NetlinkError as e:
                _ignore(e, errno.EEXIST)
            if not _rules(ipr, family):
                try:
                    ipr.rule("add", family=family, fwmark=mark, fwmask=mask, table=TABLE, priority=RULE_PRIORITY)
                except NetlinkError as e:
                    _ignore(e, errno.EEXIST)


def _rules(ipr: IPRoute, family: int) -> list[dict[str, object]]:
    out = []
    for rule in ipr.get_rules(family=family):
        if rule.get_attr("FRA_PRIORITY") == RULE_PRIORITY and rule.get_attr("FRA_TABLE") == TABLE:
            out.append(rule)
    return out


def _routes(ipr: IPRoute, family: int) -> list[dict[str, object]]:
    return list(ipr.get_routes(family=family, table=TABLE))


def remove_routing() -> int:
    """Remove our rules and every route in our table, for both families. Returns how many were removed.

    Idempotent: what is already gone is skipped.
    """
    removed = 0
    with IPRoute() as ipr:
        for family in FAMILIES:
            for _rule in _rules(ipr, family):
                try:
                    ipr.rule("del", family=family, table=TABLE, priority=RULE_PRIORITY)
                    removed += 1
                except NetlinkError as e:
                    _ignore(e, errno.ENOENT, errno.ESRCH)
            for route in _routes(ipr, family):
                try:
                    ipr.route("del", **_route_spec(route, family))
                    removed += 1
                except NetlinkError as e:
                    _ignore(e, errno.ENOENT, errno.ESRCH)
    return removed


def _route_spec(route: dict[str, object], family: int) -> dict[str, object]:
    r = route
    dst = r.get_attr("RTA_DST")  # type: ignore[attr-defined]
    spec: dict[str, object] = {
        "family": family,
        "dst": f"{dst}/{r['dst_len']}" if dst else _DEFAULT[family],
        "table": TABLE,
        "type": r["type"],
        "scope": r["scope"],
    }
    oif = r.get_attr("RTA_OIF")  # type: ignore[attr-defined]
    if oif:
        spec["oif"] = oif
    return spec


def routing_present() -> list[str]:
    """Describe every rule and route of ours that exists now (empty = clean)."""
    found: list[str] = []
    with IPRoute() as ipr:
        for family in FAMILIES:
            name = "ipv4" if family == socket.AF_INET else "ipv6"
            found += [f"{name} rule prio {RULE_PRIORITY} table {TABLE}" for _ in _rules(ipr, family)]
            found += [
                f"{name} route {r.get_attr('RTA_DST') or 'default'}/{r['dst_len']} table {TABLE}"  # type: ignore[attr-defined]
                for r in _routes(ipr, family)
            ]
    return found
