"""The agent's transparent listeners: IPv4 and IPv6, TCP and UDP, bound before anything attaches.

Owns binding them (free ports, IP_TRANSPARENT, IPV6_V6ONLY for the v6 ones so the v4 ones own IPv4)
and their ports for the steering program. Workers inherit these sockets; nothing here accepts.
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


def open_listeners() -> Listeners:
    """Bind the four transparent listeners on free ports. Raises OSError (e.g. without CAP_NET_ADMIN)."""
    tcp4 = listening_socket("0.0.0.0", 0, transparent=True, reuse_port=False)
    try:
        udp4 = listening_socket("0.0.0.0", 0, udp=True, transparent=True, reuse_port=False)
    except BaseException:
        tcp4.close()
        raise
    return Listeners(
        tcp4=tcp4,
        tcp6=_v6_listener(tcp4.getsockname()[1], udp=False),
        udp4=udp4,
        udp6=_v6_listener(udp4.getsockname()[1], udp=True),
    )
