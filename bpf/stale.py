"""cleanup_stale(): remove what a crashed agent left in the kernel, and only that.

Deletes tc filters whose BPF program is named `mbr_*` (and the clsact qdisc if that leaves it with
no filter at all), `mbr_*` programs attached to the cgroup-v2 root, our ip rules and the routes of
our table (bpf/routing.py), and `/sys/fs/bpf/mbr_*` pins. Programs and maps that only those
attachments kept alive are freed by the kernel once they are gone. Runs in the host namespace.
"""

from __future__ import annotations

import errno
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from bpf import routing
from bpf.sockmap import CGROUP_ROOT

log = logging.getLogger(__name__)

PREFIX = "mbr_"
_PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}


def _bpf_name(flt: Any) -> str:
    opts = flt.get_attr("TCA_OPTIONS")
    if not opts:
        return ""
    return str(opts.get_attr("TCA_BPF_NAME") or "")


def _clean_tc(ipr: IPRoute) -> list[str]:
    removed: list[str] = []
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
                if not prog.startswith(PREFIX):
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


def _clean_cgroup(cgroup: str) -> list[str]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    removed = []
    for entry in json.loads(out.stdout):
        name = str(entry.get("name", ""))
        if not name.startswith(PREFIX):
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
    """Remove every `mbr_*` kernel object a previous agent left behind. Returns what was removed.

    Safe to run when nothing is left (returns []). Raises NetlinkError only on unexpected netlink
    failures (e.g. EPERM without CAP_NET_ADMIN): the caller should stop, not attach over leftovers.
    """
    removed: list[str] = []
    with IPRoute() as ipr:
        removed += _clean_tc(ipr)
    removed += _clean_cgroup(cgroup)
    if routing.routing_present():
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
