"""cleanup_stale() and uninstall(): remove kernel objects of ours that nobody needs, and only those.

Whose is a program? An `mbr_*` program belongs to the pin directory where one of its maps is pinned
(`bpf/pins.py`); a program with no pinned map is an orphan of an unpinned Steering. Stale = not
held open by a live process (a running Steering keeps its program fds; a SIGKILLed or kept one
leaves programs held only by their attachments) AND either of our pin directory or an orphan.
Programs of another pin directory (another agent, another test run) are never touched.
`cleanup_stale(pin_dir)` is for a Steering that has attached its own programs already (removing
them before would open the node); `uninstall(pin_dir)` removes all of that directory's state,
including a live agent's (the CLI refuses that unless --force). Runs in the host namespace.
"""

from __future__ import annotations

import errno
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from membrane.bpf import pins, routing
from membrane.bpf.sockmap import CGROUP_ROOT
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

PREFIX = "mbr_"
STEER_PROG = "mbr_tc_steer"


def _bpftool(*argv: str) -> list[dict[str, Any]]:
    return pins.bpftool(*argv)


def held_bpf_ids(*, exclude_pid: int | None = None) -> tuple[set[int], set[int]]:
    """(program ids, map ids) that some live process holds an fd to, read from /proc/*/fdinfo.

    `bpftool` processes are skipped: listing programs opens every one of them for a moment, and a
    concurrent `bpftool prog show` must not make a dead agent's program look alive.
    """
    progs: set[int] = set()
    maps: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or (exclude_pid is not None and int(proc.name) == exclude_pid):
            continue
        try:
            if (proc / "comm").read_text().strip() == "bpftool":
                continue
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = str(fd.readlink())
                if target not in ("anon_inode:bpf-prog", "anon_inode:bpf-map"):
                    continue
                info = (proc / "fdinfo" / fd.name).read_text()
            except OSError:
                continue
            for line in info.splitlines():
                key, _, value = line.partition(":")
                if key == "prog_id":
                    progs.add(int(value))
                elif key == "map_id":
                    maps.add(int(value))
    return progs, maps


def live_steering_prog_ids(*, exclude: set[int] | None = None) -> set[int]:
    """Ids of loaded `mbr_tc_steer` programs held open by a live process (a running Steering)."""
    held, _maps = held_bpf_ids()
    names = {int(p["id"]): str(p.get("name", "")) for p in _bpftool("prog", "show")}
    return {i for i in held if names.get(i) == STEER_PROG} - (exclude or set())


_PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}


@dataclass(frozen=True, slots=True, kw_only=True)
class _Owners:
    """Which loaded `mbr_*` programs belong to a pin directory, which are orphans, which are held."""

    names: dict[int, str]  # every loaded program id -> name
    mine: set[int]  # ours: a map of theirs is pinned in the pin directory
    orphans: set[int]  # no map of theirs is pinned anywhere
    held: set[int]  # some live process holds an fd

    def stale(self, prog_id: int) -> bool:
        return prog_id not in self.held and (prog_id in self.mine or prog_id in self.orphans)


def _owners(pin_dir: Path | None) -> _Owners:
    progs = pins.prog_maps()
    pinned = pins.map_pins()
    held, _maps = held_bpf_ids()
    root = str(pin_dir.absolute()) + "/" if pin_dir is not None else None
    mine: set[int] = set()
    orphans: set[int] = set()
    for pid, (name, map_ids) in progs.items():
        if not name.startswith(PREFIX):
            continue
        paths = [path for m in map_ids for path in pinned.get(m, [])]
        if not paths:
            orphans.add(pid)
        elif root is not None and any(path.startswith(root) for path in paths):
            mine.add(pid)
    return _Owners(names={i: n for i, (n, _m) in progs.items()}, mine=mine, orphans=orphans, held=held)


def _bpf_name(flt: Any) -> str:
    opts = flt.get_attr("TCA_OPTIONS")
    if not opts:
        return ""
    return str(opts.get_attr("TCA_BPF_NAME") or "")


def _tc_attachments(dev: str | None = None) -> list[tuple[int, str, int, str]]:
    """Every `mbr_*` tc attachment (of `dev` only, if given): (ifindex, direction, program id, device name)."""
    return [
        (
            int(t["ifindex"]),
            str(t.get("kind", "")).rpartition("/")[2],
            int(t.get("prog_id", t.get("id", 0))),
            str(t.get("devname", "")),
        )
        for net in _bpftool("net", "show", *(("dev", dev) if dev else ()))
        for t in net.get("tc", [])
        if str(t.get("name", "")).startswith(PREFIX)
    ]


def _clean_tc(ipr: IPRoute, remove: set[tuple[int, str, int]]) -> list[str]:
    """Delete the filters (ifindex, direction, program id) in `remove` that still run that program,
    and the clsact qdiscs that leaves empty. A filter replaced meanwhile (a new agent) is kept."""
    removed: list[str] = []
    remove_at = {(idx, d) for idx, d, _p in remove}
    for link in ipr.get_links():
        idx = link["index"]
        name = link.get_attr("IFLA_IFNAME")
        if not any(i == idx for i, _d in remove_at):
            continue
        if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(idx)):
            continue
        now = {(d, pid) for i, d, pid, _n in _tc_attachments(name) if i == idx}
        remaining = 0
        ours = 0
        for direction, parent in _PARENTS.items():
            for flt in ipr.get_filters(index=idx, parent=parent):
                if not flt.get_attr("TCA_OPTIONS"):
                    continue  # the per-priority header entry; the real filter follows
                prog = _bpf_name(flt)
                stale_here = {pid for i, d, pid in remove if i == idx and d == direction and (d, pid) in now}
                if not prog.startswith(PREFIX) or not stale_here:
                    remaining += 1
                    continue
                prio = flt["info"] >> 16
                try:
                    ipr.tc("del-filter", "bpf", idx, flt["handle"], parent=parent, prio=prio)
                    removed.append(f"tc {direction} filter {prog} on {name}")
                    ours += 1
                except NetlinkError as e:
                    if e.code not in (errno.ENOENT, errno.ENODEV):
                        raise
        if remaining == 0 and ours:  # an empty clsact does nothing: ours or a predecessor's
            try:
                ipr.tc("del", "clsact", idx)
                removed.append(f"clsact on {name}")
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise
    return removed


def _clean_cgroup(cgroup: str, owners: _Owners, *, everything_mine: bool) -> list[str]:
    removed = []
    for entry in _bpftool("cgroup", "show", cgroup):
        name = str(entry.get("name", ""))
        pid = int(entry["id"])
        if not name.startswith(PREFIX):
            continue
        if not (owners.stale(pid) or (everything_mine and pid in owners.mine)):
            continue
        res = subprocess.run(
            ["bpftool", "cgroup", "detach", cgroup, str(entry["attach_type"]), "id", str(pid)],
            capture_output=True,
            text=True,
        )
        if res.returncode == 0:
            removed.append(f"cgroup {entry['attach_type']} {name}")
        else:
            log.warning("cannot detach %s from %s: %s", name, cgroup, res.stderr.strip())
    return removed


def steering_in_use(*, exclude: set[int] | None = None) -> set[int]:
    """Ids of `mbr_tc_steer` programs that need the routing: held by a live process or attached at tc."""
    held, _maps = held_bpf_ids()
    names = {i: n for i, (n, _m) in pins.prog_maps().items()}
    attached = {pid for _i, _d, pid, _n in _tc_attachments()}
    return {i for i in held | attached if names.get(i) == STEER_PROG} - (exclude or set())


def programs_using_pins(pin_dir: Path, *, exclude: set[int] | None = None) -> set[int]:
    """Ids of loaded `mbr_*` programs that use a map pinned in `pin_dir`."""
    return _owners(pin_dir).mine - (exclude or set())


def cleanup_stale(cgroup: str = CGROUP_ROOT, *, pin_dir: Path | None = None) -> list[str]:
    """Remove the `mbr_*` objects that a dead or stopped Steering left and nobody needs. Returns what went.

    Removed: tc filters and cgroup programs that no live process holds and that are orphans or of
    `pin_dir` (with a pin directory, call this only after your own programs replaced the previous
    ones: what is left of that directory then is on interfaces nobody wants), and our routing when
    no steering program is held or attached any more. Never: programs of a live process, programs
    of another pin directory, pins (`uninstall()` removes those). Safe when nothing is left
    (returns []). Raises NetlinkError only on unexpected netlink failures (e.g. EPERM).
    """
    owners = _owners(pin_dir)
    remove = {(idx, d, pid) for idx, d, pid, _n in _tc_attachments() if owners.stale(pid)}
    removed: list[str] = []
    with IPRoute() as ipr:
        removed += _clean_tc(ipr, remove)
    removed += _clean_cgroup(cgroup, owners, everything_mine=False)
    if routing.routing_present() and not steering_in_use():
        n = routing.remove_routing()
        removed.append(f"{n} routing rules/routes in table {routing.TABLE}")
    for item in removed:
        log.info("removed stale %s", item)
    return removed


def uninstall(pin_dir: Path = pins.DEFAULT_PIN_DIR, cgroup: str = CGROUP_ROOT) -> list[str]:
    """Remove everything of `pin_dir`'s agent and every orphan: filters, empty clsact qdiscs, cgroup
    programs, pins, the directory, and our routing when no other steering needs it. Returns what went.

    Idempotent (a second call returns []). Also removes the state of a live agent using `pin_dir`
    (its kernel side stops enforcing): callers refuse that unless forced. Programs of other pin
    directories and of live unpinned Steerings are kept, and the routing with them.
    Raises NetlinkError only on unexpected netlink failures (e.g. EPERM without CAP_NET_ADMIN).
    """
    pin_dir = pin_dir.absolute()
    owners = _owners(pin_dir)
    remove = {(idx, d, pid) for idx, d, pid, _n in _tc_attachments() if pid in owners.mine or owners.stale(pid)}
    removed: list[str] = []
    with IPRoute() as ipr:
        removed += _clean_tc(ipr, remove)
    removed += _clean_cgroup(cgroup, owners, everything_mine=True)
    removed += [f"pin {p}" for p in pins.remove_pins(pin_dir)]
    if routing.routing_present() and not steering_in_use(exclude=owners.mine):
        n = routing.remove_routing()
        removed.append(f"{n} routing rules/routes in table {routing.TABLE}")
    for item in removed:
        log.info("uninstalled %s", item)
    return removed


def main() -> None:
    """`python -m membrane.bpf.stale`: remove leftovers and print one line per removed object."""
    for item in cleanup_stale():
        print(f"removed {item}")


if __name__ == "__main__":
    main()
