"""cleanup_stale(): remove what a crashed agent left in the kernel, and only that.

Stale = an `mbr_*` program that no live process holds an fd to (a running Steering keeps its program
fds open; a SIGKILLed one leaves programs held only by their attachments). Deletes such tc filters
(and the clsact qdisc if that leaves it with no filter at all), such programs on the cgroup-v2 root,
our ip rules and the routes of our table when no live Steering remains (bpf/routing.py), and
`/sys/fs/bpf/mbr_*` pins. The kernel then frees the programs and maps. Runs in the host namespace.
"""

from __future__ import annotations

import errno
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from membrane.bpf import routing
from membrane.bpf.sockmap import CGROUP_ROOT
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

PREFIX = "mbr_"
STEER_PROG = "mbr_tc_steer"


def _bpftool(*argv: str) -> list[dict[str, Any]]:
    out = subprocess.run(["bpftool", "-j", *argv], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    data = json.loads(out.stdout)
    return data if isinstance(data, list) else [data]


def held_bpf_ids(*, exclude_pid: int | None = None) -> tuple[set[int], set[int]]:
    """(program ids, map ids) that some live process holds an fd to, read from /proc/*/fdinfo."""
    progs: set[int] = set()
    maps: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or (exclude_pid is not None and int(proc.name) == exclude_pid):
            continue
        try:
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


def _bpf_name(flt: Any) -> str:
    opts = flt.get_attr("TCA_OPTIONS")
    if not opts:
        return ""
    return str(opts.get_attr("TCA_BPF_NAME") or "")


def _clean_tc(ipr: IPRoute, live: set[int]) -> list[str]:
    removed: list[str] = []
    # which (ifindex, direction) carry a stale program of ours, per bpftool's view of attachments
    stale_at = {
        (int(t["ifindex"]), str(t.get("kind", "")).rpartition("/")[2])
        for net in _bpftool("net", "show")
        for t in net.get("tc", [])
        if str(t.get("name", "")).startswith(PREFIX) and int(t.get("prog_id", t.get("id", 0))) not in live
    }
    for link in ipr.get_links():
        idx = link["index"]
        name = link.get_attr("IFLA_IFNAME")
        if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(idx)):
            continue
        remaining = 0
        ours = 0
        for direction, parent in _PARENTS.items():
            for flt in ipr.get_filters(index=idx, parent=parent):
                if not flt.get_attr("TCA_OPTIONS"):
                    continue  # the per-priority header entry; the real filter follows
                prog = _bpf_name(flt)
                if not prog.startswith(PREFIX) or (idx, direction) not in stale_at:
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
        if remaining == 0 and ours:  # we add clsact only where none was; an empty one does nothing
            try:
                ipr.tc("del", "clsact", idx)
                removed.append(f"clsact on {name}")
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise
    return removed


def _clean_cgroup(cgroup: str, live: set[int]) -> list[str]:
    removed = []
    for entry in _bpftool("cgroup", "show", cgroup):
        name = str(entry.get("name", ""))
        if not name.startswith(PREFIX) or int(entry["id"]) in live:
            continue
        res = subprocess.run(
            ["bpftool", "cgroup", "detach", cgroup, str(entry["attach_type"]), "id", str(entry["id"])],
            capture_output=True,
            text=True,
        )
        if res.returncode == 0:
            removed.append(f"cgroup {entry['attach_type']} {name}")
        else:
            log.warning("cannot detach %s from %s: %s", name, cgroup, res.stderr.strip())
    return removed


def cleanup_stale(cgroup: str = CGROUP_ROOT) -> list[str]:
    """Remove every `mbr_*` kernel object a dead agent left behind. Returns what was removed.

    Objects of a live Steering (in this or another process) are kept. Safe to run when nothing is
    left (returns []). Raises NetlinkError only on unexpected netlink
    failures (e.g. EPERM without CAP_NET_ADMIN): the caller should stop, not attach over leftovers.
    """
    removed: list[str] = []
    live, _maps = held_bpf_ids()
    with IPRoute() as ipr:
        removed += _clean_tc(ipr, live)
    removed += _clean_cgroup(cgroup, live)
    if routing.routing_present() and not live_steering_prog_ids():
        n = routing.remove_routing()
        removed.append(f"{n} routing rules/routes in table {routing.TABLE}")
    pins = Path("/sys/fs/bpf")
    if pins.is_dir():
        for pin in pins.glob(f"{PREFIX}*"):
            pin.unlink()
            removed.append(f"pin {pin}")
    for item in removed:
        log.info("removed stale %s", item)
    return removed


def main() -> None:
    """`python -m bpf.stale`: remove leftovers and print one line per removed object."""
    for item in cleanup_stale():
        print(f"removed {item}")


if __name__ == "__main__":
    main()
