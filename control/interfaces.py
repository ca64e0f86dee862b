"""Which host interface carries a local pod's traffic, found from its IP without a hand-written file.

- Point-to-point CNIs (ptp, Calico-style routing): the host has a route to the pod's IP through the
  pod's own veth; that veth is the answer.
- Bridge CNIs: the route goes to the bridge; the pod's MAC (from the bridge's neighbour table) is
  learned on one bridge port in the forwarding database; that port is the pod's veth.
- Otherwise (no route yet, or no neighbour entry): None, and the endpoint waits for its interface.
The chained CNI plugin names the interface directly; this resolver is for pods that existed before
the agent, or clusters that do not chain `membrane-cni`. Reads netlink only; changes nothing.
Calls block (pyroute2 runs a loop of its own): call from the agent's kernel thread, not its event loop.
"""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

NUD_FAILED = 0x20
NUD_INCOMPLETE = 0x01


class InterfaceResolver:
    """Resolves pod IPs to host-side interface names through one netlink socket."""

    def __init__(self) -> None:
        self._ipr: Any = IPRoute()

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> InterfaceResolver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _link(self, index: int) -> Any | None:
        try:
            (link,) = self._ipr.link("get", index=index)
        except (NetlinkError, ValueError):
            return None
        return link

    def _kind(self, link: Any) -> str | None:
        info = link.get_attr("IFLA_LINKINFO")
        return info.get_attr("IFLA_INFO_KIND") if info is not None else None

    def resolve(self, ip: str) -> str | None:
        """The name of the host interface that leads to `ip`, or None when it cannot be told yet."""
        addr = ipaddress.ip_address(ip)
        try:
            routes = self._ipr.route("get", dst=str(addr))
        except NetlinkError:
            return None
        oif = routes[0].get_attr("RTA_OIF") if routes else None
        if oif is None:
            return None
        link = self._link(oif)
        if link is None:
            return None
        kind = self._kind(link)
        if kind == "veth":
            return str(link.get_attr("IFLA_IFNAME"))
        if kind == "bridge":
            return self._bridge_port(oif, addr)
        return None

    def _bridge_port(self, bridge: int, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        mac = None
        family = 2 if addr.version == 4 else 10
        with contextlib.suppress(NetlinkError):
            for n in self._ipr.get_neighbours(family=family, ifindex=bridge):
                if n.get_attr("NDA_DST") == str(addr) and not n["state"] & (NUD_FAILED | NUD_INCOMPLETE):
                    mac = n.get_attr("NDA_LLADDR")
                    break
        if mac is None:
            return None
        with contextlib.suppress(NetlinkError):
            for entry in self._ipr.fdb("dump", master=bridge):
                if entry.get_attr("NDA_LLADDR") == mac:
                    port = self._link(entry["ifindex"])
                    if port is not None and self._kind(port) == "veth":
                        return str(port.get_attr("IFLA_IFNAME"))
        return None
