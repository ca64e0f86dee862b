"""Steering: loads `tc_steer.bpf.c`, attaches it at tc ingress of pod veths, owns its maps and routing.

Owns every program, map, qdisc, filter and ip rule it creates. Without a pin directory nothing
outlives `close()`. With one (the agent), the policy maps are pinned there and adopted by the next
Steering, filters are *replaced* in place (never removed first), and `close(keep=True)` leaves the
whole kernel side enforcing: from the first start to `uninstall()`, no packet passes unjudged.
Each attachment is registered on an ExitStack the moment it succeeds, so a failure half-way
undoes what came before. Detaching tolerates targets that are already gone (a deleted veth).
Never decides policy: the agent fills the maps through `Steering.maps` (bpf/maps.py).
"""

from __future__ import annotations

import errno as errno_mod
import functools
import logging
import os
import socket
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from membrane.bpf import pins, routing
from membrane.bpf.errors import AttachError, BpfLoadError
from membrane.bpf.loader import load_bpf
from membrane.bpf.maps import BpfMaps, ConfigSlot, DropEvent, parse_drop_event
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("tc_steer.bpf.c")
PROG_NAME = "mbr_tc_steer"
HOST_PROG_NAME = "mbr_tc_host"  # the same object's program for tc egress of pod veths
SK_LOOKUP_PROG_NAME = "mbr_sk_lookup"  # the same object's program for the host netns's listener lookups
SK_LOOKUP_LINK_PIN = "mbr_sk_lookup_link"  # its link, pinned in the pin directory (removed by uninstall)
FILTER_PRIO = 77  # our tc filter's preference: cleanup deletes exactly this one
FILTER_HANDLE = ":1"
INGRESS_PARENT = "ffff:fff2"
EGRESS_PARENT = "ffff:fff3"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyPorts:
    """Default transparent listener ports (used by REDIRECT entries with proxy_port 0); 0 = none."""

    tcp4: int = 0
    tcp6: int = 0
    udp4: int = 0
    udp6: int = 0


class Steering:
    """Owns every program, map and attachment this proxy creates.

    Usage::

        with Steering(proxy_ports=ProxyPorts(tcp4=15001)) as st:      # private maps, nothing outlives it
            st.maps.set_identity("10.244.1.2/32", 1001, ifindex=idx)
            st.attach("mbrh1")
            ...

        st = Steering(proxy_ports=..., pin_dir=pins.DEFAULT_PIN_DIR).__enter__()   # the agent
        ...write the whole plan, attach (replaces the previous agent's filters)...
        st.cleanup_stale()           # only now: the previous agent's leftovers
        st.close(keep=True)          # SIGTERM: enforcement stays; `uninstall()` removes it

    With `pin_dir`, the maps in `pins.PINNED_MAPS` are adopted from (or pinned to) that directory: a
    previous agent's policy keeps being enforced by its programs, still attached, until this one's
    program replaces them. When any pinned map's definition changed, the whole set is replaced by
    new, empty maps (`replaced_maps` names the ones that differed); the agent fills them from its
    plan before attach() puts the program using them in place.
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
        pin_dir: Path | str | None = None,
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
        self._host_fd = -1
        self._maps: BpfMaps | None = None
        self._attached: dict[int, ExitStack] = {}
        self._events: list[DropEvent] = []
        self._sockmap_obj: Any = None
        self._pin_dir = Path(pin_dir).absolute() if pin_dir is not None else None
        self._keep = False
        self.replaced_maps: dict[str, tuple[pins.MapDef, pins.MapDef]] = {}  # pinned maps whose definition changed

    def _cflags(self) -> list[str]:
        flags = [f"-D{k}={v}" for k, v in sorted(self._defines.items())]
        if self._pin_dir is not None:
            flags.append(f'-DMBR_PIN_DIR="{self._pin_dir}"')
        return flags

    @property
    def pin_dir(self) -> Path | None:
        """Where the policy maps are pinned; None = private maps."""
        return self._pin_dir

    def _load(self) -> Any:
        """Compile and load, adopting pinned maps that match; replace the pins of maps that do not."""
        if self._pin_dir is None:
            return load_bpf(_SRC, self._cflags())
        pins.ensure_pin_dir(self._pin_dir)
        bpf = load_bpf(_SRC, self._cflags())
        bad = pins.mismatched_maps(bpf)
        if not bad:
            return bpf
        # Nothing of this program is attached yet: drop it, unpin EVERY map and load again with a new
        # set. Replacing only the maps that differ would share the others (mbr_config's generation
        # above all) between the old program and maps it never saw: the old one could then read a
        # stale generation of its own policy. With a whole new set, the old programs keep enforcing
        # from their own maps (their attachments hold them) until attach() replaces them, and the new
        # set is filled from the plan before that. Conntrack and counters start over in this case.
        bpf.cleanup()
        for name, (declared, actual) in bad.items():
            log.warning(
                "pinned map %s changed definition (%s -> %s): every pinned map is replaced", name, actual, declared
            )
        pins.unlink_pins(self._pin_dir, pins.PINNED_MAPS)
        self.replaced_maps = bad
        bpf = load_bpf(_SRC, self._cflags())
        still = pins.mismatched_maps(bpf)
        if still:
            bpf.cleanup()
            raise BpfLoadError(f"pinned maps in {self._pin_dir} do not match after replacing them: {sorted(still)}")
        return bpf

    def __enter__(self) -> Steering:
        self._keep = False
        with ExitStack() as stack:
            self._bpf = self._load()
            stack.callback(self._bpf.cleanup)
            if self._pin_dir is not None:
                stack.callback(self._release_pins)
            self._fd = -1
            self._host_fd = -1
            try:
                self._fd = self._bpf.load_func(PROG_NAME, self._bpf.SCHED_CLS).fd
                self._host_fd = self._bpf.load_func(HOST_PROG_NAME, self._bpf.SCHED_CLS).fd
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
        """The kernel id of our loaded program; -1 before it is loaded (a load that failed half-way)."""
        if self._fd < 0:
            return -1
        try:
            return int(pins.fd_info(self._fd).get("prog_id", -1))
        except OSError:
            return -1

    def _host_prog_id(self) -> int:
        """The kernel id of our host egress program; -1 before it is loaded."""
        if self._host_fd < 0:
            return -1
        try:
            return int(pins.fd_info(self._host_fd).get("prog_id", -1))
        except OSError:
            return -1

    def _release_routing(self) -> None:
        """Remove the host-wide routing unless another Steering (live, or attached and kept) still needs it."""
        from membrane.bpf.stale import steering_in_use

        if self._keep:
            return
        others = steering_in_use(exclude={self._prog_id()})
        if others:
            log.info("routing kept: %d other steering program(s) in use", len(others))
            return
        routing.remove_routing()

    def _release_pins(self) -> None:
        """Unpin our maps unless another program (a successor that adopted them) still uses them."""
        from membrane.bpf.stale import programs_using_pins

        if self._keep or self._pin_dir is None:
            return
        users = programs_using_pins(self._pin_dir, exclude={self._prog_id(), self._host_prog_id()})
        if users:
            log.info("pins in %s kept: used by program(s) %s", self._pin_dir, sorted(users))
            return
        for item in pins.remove_pins(self._pin_dir):
            log.info("unpinned %s", item)

    def close(self, *, keep: bool = False) -> None:
        """Stop owning the kernel side. Idempotent.

        keep=False: detach every interface still carrying our program, remove routing and (with a pin
        directory) the pins, unless another Steering uses them; the kernel then frees programs and maps.
        keep=True (the agent on SIGTERM): leave programs attached, maps pinned, routing in place, so
        L3/L4 stays enforced and L7-redirected flows are dropped (no listener: PROXY_UNAVAILABLE)
        until a new agent replaces them or `uninstall()` removes them. Only the sockmap accelerator,
        which serves this process's sockets alone, is removed either way.
        """
        self._keep = keep
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        self._maps = None
        if keep:
            self._attached.clear()

    def steer_time_wait(self, listeners: Iterable[socket.socket]) -> None:
        """Let new connections reuse a tuple whose previous connection the proxy closed first.

        The proxy's pod-facing socket that closed first sits in TIME_WAIT for 60 s with the pod's own
        tuple; the pod, which closed second, reuses the port at once, and its SYN, assigned to the
        listener, collides with that TIME_WAIT entry and is dropped. With this on, mbr_tc_steer assigns
        such a SYN to the TIME_WAIT socket, the kernel's TIME_WAIT handling accepts it (RFC 6191) and
        asks for a listener, and mbr_sk_lookup, attached to this netns with a bpf_link (pinned in the
        pin directory, replaced in place by the next agent), answers with the proxy's listener from
        `listeners` (TCP, bound to the default proxy ports). Raises BpfLoadError or AttachError (a kernel
        without sk_lookup): the caller decides whether to run without it.
        """
        if self._stack is None:
            raise RuntimeError("Steering is not open")
        import bcc
        from membrane.bpf import netns_link

        try:
            fn = self._bpf.load_func(SK_LOOKUP_PROG_NAME, netns_link.PROG_TYPE_SK_LOOKUP,
                                     attach_type=netns_link.ATTACH_SK_LOOKUP)
        except Exception as e:  # bcc raises bare Exception with the verifier's log
            raise BpfLoadError(f"{SK_LOOKUP_PROG_NAME}: {e}") from e
        map_fd = int(bcc.lib.bpf_table_fd(self._bpf.module, b"mbr_listen"))
        for sock in listeners:
            family = 4 if sock.family == socket.AF_INET else 6
            netns_link.map_update_socket(map_fd, (family << 16) | int(sock.getsockname()[1]), sock.fileno())
        pin = self._pin_dir / SK_LOOKUP_LINK_PIN if self._pin_dir is not None else None
        link_fd = netns_link.attach_sk_lookup(fn.fd, pin)
        prog_id = int(pins.fd_info(fn.fd).get("prog_id", -1))
        self._stack.callback(self._release_sk_lookup, link_fd, pin, prog_id)
        self.maps.set_config(ConfigSlot.TW_STEER, 1)

    def _release_sk_lookup(self, link_fd: int, pin: Path | None, prog_id: int) -> None:
        """keep: the pinned link stays (a successor replaces its program). Otherwise unpin it unless a
        successor's program runs in it now; closing the fd then detaches a link nothing else holds."""
        try:
            if not self._keep and pin is not None:
                current = int(pins.fd_info(link_fd).get("prog_id", -1))
                if current == prog_id:
                    pin.unlink(missing_ok=True)
                else:
                    log.info("sk_lookup link %s kept: it runs program %d now", pin, current)
        finally:
            os.close(link_fd)

    def cleanup_stale(self) -> list[str]:
        """Remove what is truly stale, now that this Steering's programs are attached. Returns what went.

        Stale: filters and cgroup programs of ours that no live process holds and whose maps are in
        our pin directory or in none (a previous agent's, on interfaces this one did not take over),
        the routing only when no steering remains, then the adopted endpoints and identities this
        Steering did not write again (`BpfMaps.prune_adopted`). Call after the whole plan is written
        and every wanted interface is attached, never before: before, it would open the node.
        """
        from membrane.bpf.stale import cleanup_stale

        removed = cleanup_stale(pin_dir=self._pin_dir)
        removed += self.maps.prune_adopted()
        for item in removed:
            log.info("removed stale %s", item)
        return removed

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

    def attach(self, interface: str | int, *, host_egress: bool = True) -> int:
        """Put our program at tc ingress of `interface` (name or ifindex), and with `host_egress` (a pod's
        host-side veth) the host program at its tc egress. Returns the ifindex.

        tc ingress judges what the pod sends; tc egress judges what enters the pod without having
        been judged at another local pod's veth: traffic from the host itself (as the `host`
        identity, from the ipcache) and from other nodes. Pass host_egress=False for a node device.
        Each filter at our fixed priority/handle is *replaced* in one netlink request, so a filter
        already there (a previous agent's, or another Steering's) is swapped for ours atomically:
        there is never an instant without a program on the interface, and never EEXIST. The egress
        filter goes in first, so the ingress one never runs without it. A clsact qdisc already
        present is kept. Attaching twice is a no-op. Raises AttachError on failure (the interface
        then carries what it carried before).
        """
        if self._stack is None:
            raise RuntimeError("Steering is not open")
        with IPRoute() as ipr:
            idx = _ifindex(ipr, interface)
            if idx in self._attached:
                return idx
            with ExitStack() as stack:
                added = False
                if not _has_clsact(ipr, idx):
                    try:
                        ipr.tc("add", "clsact", idx)
                        added = True
                    except NetlinkError as e:
                        if e.code != errno_mod.EEXIST:  # someone added one just now: use it
                            raise AttachError("tc", str(interface), e.code, "clsact") from e
                    stack.callback(_quietly, f"clsact on {idx}", lambda: _del_clsact_if_empty(idx))
                hooks = [(EGRESS_PARENT, self._host_fd, HOST_PROG_NAME)] if host_egress else []
                hooks.append((INGRESS_PARENT, self._fd, PROG_NAME))
                replaced: list[tuple[str, int]] = []
                for parent, fd, name in hooks:
                    try:
                        ipr.tc(
                            "replace-filter",
                            "bpf",
                            idx,
                            FILTER_HANDLE,
                            fd=fd,
                            name=name,
                            parent=parent,
                            classid=1,
                            direct_action=True,
                            prio=FILTER_PRIO,
                        )
                    except NetlinkError as e:
                        raise AttachError("tc", str(interface), e.code, "filter") from e
                    replaced.append((parent, self._prog_id() if parent == INGRESS_PARENT else self._host_prog_id()))
                if not added:  # (when we added it, that callback is registered already)
                    stack.callback(_quietly, f"clsact on {idx}", lambda: _del_clsact_if_empty(idx))
                for parent, prog_id in replaced:
                    stack.callback(_quietly, f"filter on {idx}", functools.partial(_del_filter_if, idx, prog_id, parent))
                self._attached[idx] = stack.pop_all()
        return idx

    def detach(self, interface: str | int) -> None:
        """Remove our filter if it is still ours (a successor may have replaced it), and the clsact
        qdisc if no filter is left on it. Absent targets are logged, not raised."""
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
        if self._keep:
            return
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


def ingress_prog_ids(idx: int, direction: str = "ingress") -> list[int]:
    """Ids of the bpf programs in tc `direction` ("ingress"/"egress") filters of interface `idx` (bpftool's view)."""
    return [
        int(t.get("prog_id", t.get("id", 0)))
        for net in pins.bpftool("net", "show")
        for t in net.get("tc", [])
        if int(t.get("ifindex", -1)) == idx and str(t.get("kind", "")).endswith(direction)
    ]


def _del_filter_if(idx: int, prog_id: int, parent: str = INGRESS_PARENT) -> None:
    """Delete our priority's filter at `parent` on `idx` only if it still runs `prog_id`."""
    direction = "ingress" if parent == INGRESS_PARENT else "egress"
    if prog_id not in ingress_prog_ids(idx, direction):
        log.info("%s filter on %s now runs another program: left in place", direction, idx)
        return
    with IPRoute() as ipr:
        ipr.tc("del-filter", "bpf", idx, FILTER_HANDLE, parent=parent, prio=FILTER_PRIO)


def _del_clsact_if_empty(idx: int) -> None:
    with IPRoute() as ipr:
        if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(idx)):
            return
        for parent in (0xFFFFFFF2, 0xFFFFFFF3):
            if any(f.get_attr("TCA_OPTIONS") for f in ipr.get_filters(index=idx, parent=parent)):
                return
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
