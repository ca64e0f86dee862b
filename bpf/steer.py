"""Steering: loads `tc_steer.bpf.c`, attaches it at tc ingress of pod veths, owns its maps and routing.

Owns every program, map, qdisc, filter and ip rule it creates; nothing outlives `close()`.
Each attachment is registered on an ExitStack the moment it succeeds, so a failure half-way
undoes what came before. Detaching tolerates targets that are already gone (a deleted veth).
Never decides policy: the agent fills the maps through `Steering.maps` (bpf/maps.py).
"""

from __future__ import annotations

import errno as errno_mod
import logging
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from membrane.bpf import routing
from membrane.bpf.errors import AttachError, BpfLoadError
from membrane.bpf.loader import load_bpf
from membrane.bpf.maps import BpfMaps, ConfigSlot, DropEvent, parse_drop_event
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("tc_steer.bpf.c")
PROG_NAME = "mbr_tc_steer"
FILTER_PRIO = 77  # our tc filter's preference: cleanup deletes exactly this one
FILTER_HANDLE = ":1"
INGRESS_PARENT = "ffff:fff2"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyPorts:
    """Default transparent listener ports (used by REDIRECT entries with proxy_port 0); 0 = none."""

    tcp4: int = 0
    tcp6: int = 0
    udp4: int = 0
    udp6: int = 0


class Steering:
    """Owns every program, map and attachment this proxy creates; nothing outlives __exit__.

    Usage::

        with Steering(proxy_ports=ProxyPorts(tcp4=15001)) as st:
            st.maps.set_identity("10.244.1.2/32", 1001, ifindex=idx)
            st.attach("mbrh1")
            ...
    """

    def __init__(
        self,
        *,
        proxy_ports: ProxyPorts = ProxyPorts(),
        mark: int = routing.MARK,
        with_routing: bool = True,
        sockmap: bool = False,
        sockmap_ports: Iterable[int] = (),
        defines: dict[str, int] | None = None,
    ) -> None:
        self._proxy_ports = proxy_ports
        self._mark = mark
        self._with_routing = with_routing
        self._sockmap = sockmap
        self._sockmap_ports = tuple(sockmap_ports)
        self._defines = dict(defines or {})
        self._stack: ExitStack | None = None
        self._bpf: Any = None
        self._fd = -1
        self._maps: BpfMaps | None = None
        self._attached: dict[int, ExitStack] = {}
        self._events: list[DropEvent] = []
        self._sockmap_obj: Any = None

    def _cflags(self) -> list[str]:
        return [f"-D{k}={v}" for k, v in sorted(self._defines.items())]

    # --- lifetime ---------------------------------------------------------------------------
    def __enter__(self) -> Steering:
        with ExitStack() as stack:
            self._bpf = load_bpf(_SRC, self._cflags())
            stack.callback(self._bpf.cleanup)
            try:
                self._fd = self._bpf.load_func(PROG_NAME, self._bpf.SCHED_CLS).fd
            except Exception as e:
                raise BpfLoadError(f"{PROG_NAME}: {e}") from e
            self._maps = BpfMaps(self._bpf)
            self._maps.set_config(ConfigSlot.MARK, self._mark)
            p = self._proxy_ports
            self._maps.set_proxy_ports(tcp4=p.tcp4, tcp6=p.tcp6, udp4=p.udp4, udp6=p.udp6)
            self._bpf[b"mbr_events"].open_ring_buffer(self._on_event)
            if self._with_routing:
                try:
                    routing.add_routing(self._mark, routing.MARK_MASK)
                except NetlinkError as e:
                    raise AttachError("routing", f"table {routing.TABLE}", e.code) from e
                stack.callback(self._release_routing)
            if self._sockmap:
                from membrane.bpf.sockmap import Sockmap

                self._sockmap_obj = stack.enter_context(Sockmap(proxy_ports=self._sockmap_ports))
            stack.callback(self._detach_all)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prog_id(self) -> int:
        for line in Path(f"/proc/self/fdinfo/{self._fd}").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "prog_id":
                return int(value)
        return -1

    def _release_routing(self) -> None:
        """Remove the host-wide routing unless another live Steering (another agent, a test) still needs it."""
        from membrane.bpf.stale import live_steering_prog_ids

        others = live_steering_prog_ids(exclude={self._prog_id()})
        if others:
            log.info("routing kept: %d other live steering program(s)", len(others))
            return
        routing.remove_routing()

    def close(self) -> None:
        """Detach every interface, remove routing, unload programs and maps. Idempotent."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        self._maps = None

    @property
    def maps(self) -> BpfMaps:
        """The map API (bpf/maps.py). Raises RuntimeError outside the `with` block."""
        if self._maps is None:
            raise RuntimeError("Steering is not open")
        return self._maps

    @property
    def sockmap(self) -> Any:
        """The Sockmap accelerator, or None when it is off."""
        return self._sockmap_obj

    @property
    def prog_fd(self) -> int:
        """The loaded tc program's fd (e.g. for BPF_PROG_TEST_RUN)."""
        return self._fd

    # --- attachments ------------------------------------------------------------------------
    @property
    def interfaces(self) -> list[int]:
        """ifindexes we are attached to."""
        return sorted(self._attached)

    def attach(self, interface: str | int) -> int:
        """Attach at tc ingress of `interface` (name or ifindex); adds clsact if absent. Returns the ifindex.

        Attaching twice is a no-op. Raises AttachError (the interface is unchanged) on failure.
        """
        if self._stack is None:
            raise RuntimeError("Steering is not open")
        with IPRoute() as ipr:
            idx = _ifindex(ipr, interface)
            if idx in self._attached:
                return idx
            with ExitStack() as stack:
                if not _has_clsact(ipr, idx):
                    try:
                        ipr.tc("add", "clsact", idx)
                    except NetlinkError as e:
                        raise AttachError("tc", str(interface), e.code, "clsact") from e
                    stack.callback(_quietly, f"clsact on {idx}", lambda: _del_clsact(idx))
                try:
                    ipr.tc(
                        "add-filter",
                        "bpf",
                        idx,
                        FILTER_HANDLE,
                        fd=self._fd,
                        name=PROG_NAME,
                        parent=INGRESS_PARENT,
                        classid=1,
                        direct_action=True,
                        prio=FILTER_PRIO,
                    )
                except NetlinkError as e:
                    raise AttachError("tc", str(interface), e.code, "filter") from e
                stack.callback(_quietly, f"filter on {idx}", lambda: _del_filter(idx))
                self._attached[idx] = stack.pop_all()
        return idx

    def detach(self, interface: str | int) -> None:
        """Remove our filter (and the clsact qdisc if we added it). Absent targets are logged, not raised."""
        if isinstance(interface, int):
            idx = interface
        else:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=interface)
            if not found:
                # the veth is gone, and its qdisc with it: forget whatever ifindex it had
                log.info("detach: %s is gone", interface)
                return
            idx = found[0]
        stack = self._attached.pop(idx, None)
        if stack is not None:
            stack.close()

    def _detach_all(self) -> None:
        for idx in list(self._attached):
            self.detach(idx)

    # --- drop events ------------------------------------------------------------------------
    def _on_event(self, _ctx: Any, data: Any, size: int) -> None:
        import ctypes

        raw = ctypes.string_at(data, size)
        self._events.append(parse_drop_event(raw))

    def read_drop_events(self, timeout_ms: int = 0) -> list[DropEvent]:
        """Drop events reported since the last call; waits up to timeout_ms for the first one."""
        if self._bpf is None or self._stack is None:
            return []
        if timeout_ms > 0:
            self._bpf.ring_buffer_poll(timeout_ms)
        self._bpf.ring_buffer_consume()
        out, self._events = self._events, []
        return out


def _ifindex(ipr: IPRoute, interface: str | int) -> int:
    if isinstance(interface, int):
        return interface
    found = ipr.link_lookup(ifname=interface)
    if not found:
        raise AttachError("tc", interface, errno_mod.ENODEV, "no such interface")
    return int(found[0])


def _has_clsact(ipr: IPRoute, idx: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(idx))


def _del_filter(idx: int) -> None:
    with IPRoute() as ipr:
        ipr.tc("del-filter", "bpf", idx, FILTER_HANDLE, parent=INGRESS_PARENT, prio=FILTER_PRIO)


def _del_clsact(idx: int) -> None:
    with IPRoute() as ipr:
        ipr.tc("del", "clsact", idx)


def _quietly(what: str, fn: Callable[[], None]) -> None:
    """Run a detach step; a target that is already gone is logged, never raised."""
    try:
        fn()
    except NetlinkError as e:
        if e.code in (errno_mod.ENODEV, errno_mod.ENOENT, errno_mod.EINVAL, errno_mod.ENXIO):
            log.info("detach %s: already gone (errno %s)", what, e.code)
        else:
            log.warning("detach %s failed: %s", what, e)
    except OSError as e:
        log.warning("detach %s failed: %s", what, e)

