"""Assertions that nothing of ours is left in the kernel: programs, maps, qdiscs, rules, routes, netns.

`leftovers()` lists what it finds; `assert_clean()` waits briefly (maps are freed after an RCU grace
period once the last fd closes) and fails with that list.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from bpf import routing

PREFIX = "mbr"


def _bpftool(*argv: str) -> list[dict[str, object]]:
    out = subprocess.run(["bpftool", "-j", *argv], capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def leftovers(netns_prefix: str = PREFIX) -> list[str]:
    """Everything of ours that exists now (empty = clean)."""
    found: list[str] = []
    found += [f"prog {p['id']} {p.get('name')}" for p in _bpftool("prog", "show") if str(p.get("name", "")).startswith("mbr_")]
    found += [f"map {m['id']} {m.get('name')}" for m in _bpftool("map", "show") if str(m.get("name", "")).startswith("mbr_")]
    for cg in _bpftool("cgroup", "show", "/sys/fs/cgroup/unified"):
        if str(cg.get("name", "")).startswith("mbr_"):
            found.append(f"cgroup prog {cg.get('id')} {cg.get('name')}")
    for dev in Path("/sys/class/net").iterdir():
        if dev.name.startswith(PREFIX):
            found.append(f"link {dev.name}")
        filters = subprocess.run(
            ["tc", "filter", "show", "dev", dev.name, "ingress"], capture_output=True, text=True
        ).stdout
        if "mbr_" in filters:
            found.append(f"tc filter on {dev.name}")
    found += routing.routing_present()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    found += [f"netns {line.split()[0]}" for line in netns if line.startswith(netns_prefix)]
    return found


def assert_clean(timeout_s: float = 3.0) -> None:
    """Fail unless nothing of ours is left (polls up to timeout_s for deferred frees)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = leftovers()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"left behind: {left}"
