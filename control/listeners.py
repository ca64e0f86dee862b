"""The agent's transparent listeners: IPv4 and IPv6, TCP and UDP, bound before anything attaches.

Owns binding them (free ports, IP_TRANSPARENT, IPV6_V6ONLY for the v6 ones so the v4 ones own IPv4)
and their ports for the steering program. Workers inherit these sockets; nothing here accepts.

One socket per family and protocol, shared by every worker (no SO_REUSEPORT group): one accept queue
per port, so handing these four sockets to a successor agent (control/handover.py) hands over every
connection not yet accepted, whichever worker would have taken it. With a SO_REUSEPORT group each
member has its own queue, which the kernel resets when that member closes, and a successor binding
members of its own would join the group and split the traffic; so the listeners stay unshared.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from membrane.bpf.steer import ProxyPorts
from membrane.proxy.server import IPV6_RECVORIGDSTADDR, IPV6_TRANSPARENT, SOL_IPV6, listening_socket

log = logging.getLogger("membrane.agent")


@dataclass
class Listeners:
    """The transparent wildcard listeners (IPv4 and IPv6, TCP and UDP), bound before anything attaches."""

    tcp4: socket.socket
    tcp6: socket.socket | None
    udp4: socket.socket
    udp6: socket.socket | None

    @property
    def ports(self) -> ProxyPorts:
        def port(s: socket.socket | None) -> int:
            return int(s.getsockname()[1]) if s is not None else 0

        return ProxyPorts(tcp4=port(self.tcp4), tcp6=port(self.tcp6), udp4=port(self.udp4), udp6=port(self.udp6))

    def close(self) -> None:
        for s in (self.tcp4, self.tcp6, self.udp4, self.udp6):
            if s is not None:
                s.close()

    def named(self) -> list[tuple[str, socket.socket]]:
        """The sockets by name, as a hand-over passes them."""
        pairs = (("tcp4", self.tcp4), ("tcp6", self.tcp6), ("udp4", self.udp4), ("udp6", self.udp6))
        return [(name, s) for name, s in pairs if s is not None]

    @classmethod
    def adopt(cls, sockets: dict[str, socket.socket]) -> Listeners:
        """The listeners a running agent handed over (by name). Raises OSError when the IPv4 ones are missing."""
        tcp4, udp4 = sockets.pop("tcp4", None), sockets.pop("udp4", None)
        tcp6, udp6 = sockets.pop("tcp6", None), sockets.pop("udp6", None)
        if tcp4 is None or udp4 is None:
            for s in (tcp4, udp4, tcp6, udp6):
                if s is not None:
                    s.close()
            raise OSError("the running agent handed over no IPv4 listeners")
        for s in (tcp4, tcp6, udp4, udp6):
            if s is not None:
                s.setblocking(False)
        return cls(tcp4=tcp4, tcp6=tcp6, udp4=udp4, udp6=udp6)


def _v6_listener(port: int, *, udp: bool) -> socket.socket | None:
    """A transparent `[::]` listener with IPV6_V6ONLY (the v4 one owns IPv4); None without IPv6."""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        if udp:
            s.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
        try:
            s.bind(("::", port))
        except OSError:
            s.bind(("::", 0))
        if not udp:
            s.listen(1024)
        s.setblocking(False)
    except OSError as e:
        s.close()
        log.warning("no IPv6 %s listener: %s", "UDP" if udp else "TCP", e)
        return None
    return s


def _bind(port: int, *, udp: bool) -> socket.socket:
    """A transparent IPv4 listener on `port` if it is free, else on a free port."""
    if port:
        try:
            return listening_socket("0.0.0.0", port, udp=udp, transparent=True, reuse_port=False)
        except OSError as e:
            log.info("proxy port %d/%s is taken (%s); using another", port, "udp" if udp else "tcp", e.strerror)
    return listening_socket("0.0.0.0", 0, udp=udp, transparent=True, reuse_port=False)


def open_listeners(preferred: ProxyPorts | None = None) -> Listeners:
    """Bind the four transparent listeners, on the `preferred` ports when they are free (the ports a previous
    agent's programs, still attached, steer to), else on free ports. Raises OSError (e.g. without
    CAP_NET_ADMIN)."""
    preferred = preferred or ProxyPorts()
    tcp4 = _bind(preferred.tcp4, udp=False)
    try:
        udp4 = _bind(preferred.udp4, udp=True)
    except BaseException:
        tcp4.close()
        raise
    return Listeners(
        tcp4=tcp4,
        tcp6=_v6_listener(preferred.tcp6 or tcp4.getsockname()[1], udp=False),
        udp4=udp4,
        udp6=_v6_listener(preferred.udp6 or udp4.getsockname()[1], udp=True),
    )
