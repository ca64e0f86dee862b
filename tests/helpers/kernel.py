"""Assertions that nothing of ours is left in the kernel: programs, maps, qdiscs, rules, routes, netns.

"Ours" = this process's doing: `mbr_*` programs and maps that no *other* live process holds (a demo or
agent running beside the tests keeps its own open) and that are not pinned outside the bpffs mounts
this process created (another run's or a real agent's kept state is theirs), pins on those mounts,
namespaces and links of the topologies this process created, and our routing unless another
Steering (live, or attached and kept) still uses it.
`leftovers()` lists what it finds; `assert_clean()` waits briefly (maps are freed after an RCU grace
period once the last fd closes) and fails with that list.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterable
from typing import Any

from membrane.bpf import pins, routing
from membrane.bpf.stale import STEER_PROG, held_bpf_ids

from tests.helpers import bpffs, netns


def _bpftool(*argv: str) -> list[dict[str, Any]]:
    out = subprocess.run(["bpftool", "-j", *argv], capture_output=True, text=True, check=True).stdout
    data = json.loads(out) if out.strip() else []
    return data if isinstance(data, list) else [data]


def leftovers(prefixes: Iterable[str] = ()) -> list[str]:
    """Everything of ours that exists now (empty = clean).

    Namespaces and links are checked for every topology this process created (tests/helpers/netns.py)
    plus `prefixes` (e.g. "mbr1a2b" of a topology built by other code).
    """
    others_progs, others_maps = held_bpf_ids(exclude_pid=os.getpid())
    # maps pinned only outside our own mounts, and the programs using them, belong to someone else
    mine = tuple(f"{m}/" for m in bpffs.CREATED)
    foreign_maps = {i for i, paths in pins.map_pins().items() if not any(p.startswith(mine) for p in paths)}
    prog_maps = pins.prog_maps()
    foreign_progs = {i for i, (_n, maps) in prog_maps.items() if maps & foreign_maps}
    others_progs |= foreign_progs
    others_maps |= foreign_maps | {m for i in foreign_progs for m in prog_maps[i][1]}  # their rings too
    found: list[str] = [f"pin {p}" for p in bpffs.pins_left()]
    progs = _bpftool("prog", "show")
    found += [
        f"prog {p['id']} {p.get('name')}"
        for p in progs
        if str(p.get("name", "")).startswith("mbr_") and int(p["id"]) not in others_progs
    ]
    found += [
        f"map {m['id']} {m.get('name')}"
        for m in _bpftool("map", "show")
        if str(m.get("name", "")).startswith("mbr_") and int(m["id"]) not in others_maps
    ]
    for cg in _bpftool("cgroup", "show", "/sys/fs/cgroup/unified"):
        if str(cg.get("name", "")).startswith("mbr_") and int(cg["id"]) not in others_progs:
            found.append(f"cgroup prog {cg.get('id')} {cg.get('name')}")
    for net in _bpftool("net", "show"):
        for t in net.get("tc", []):
            if str(t.get("name", "")).startswith("mbr_") and int(t.get("prog_id", t.get("id", 0))) not in others_progs:
                found.append(f"tc filter {t.get('name')} on {t.get('devname')}")
    names = {int(p["id"]): str(p.get("name", "")) for p in progs}
    if not any(names.get(i) == STEER_PROG for i in others_progs):
        found += routing.routing_present()
    links = set(os.listdir("/sys/class/net"))
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    for prefix in sorted({f"mbr{tag}" for tag in netns.CREATED_TAGS} | set(prefixes)):
        found += [f"link {name}" for name in sorted(links) if name.startswith(prefix)]
        found += [f"netns {line.split()[0]}" for line in spaces if line.startswith(prefix + "-")]
    return found


def assert_clean(timeout_s: float = 3.0, prefixes: Iterable[str] = ()) -> None:
    """Fail unless nothing of ours is left (polls up to timeout_s for deferred frees)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = leftovers(prefixes)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"left behind: {left}"
