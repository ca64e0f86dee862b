"""The pinned kernel state: where the policy maps live between agents, and how a new agent adopts them.

Owns the pin directory (`/sys/fs/bpf/membrane/` by default; tests pass a directory on a bpffs of
their own), the check that a pinned map still matches the program's declaration, and the listing
of pins and of the programs that use them. Never decides policy and never attaches anything.
Invariant: a pin is only unlinked when its map's definition no longer matches (`stale_pins`) or by
`remove_pins` (uninstall); the programs still attached keep their maps alive either way, so
unlinking a pin never changes what the kernel enforces.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
import json
import logging
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from membrane.bpf.errors import AttachError

log = logging.getLogger(__name__)

BPFFS_ROOT = Path("/sys/fs/bpf")
DEFAULT_PIN_DIR = BPFFS_ROOT / "membrane"
BPF_FS_MAGIC = 0xCAFE4A11
# The maps of tc_steer.bpf.c that carry policy state across agents (mbr_events is per program).
PINNED_MAPS = (
    "mbr_ipc4",
    "mbr_ipc6",
    "mbr_endpoints",
    "mbr_pol_egr",
    "mbr_pol_ing",
    "mbr_ct",
    "mbr_drops",
    "mbr_config",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class MapDef:
    """What makes two maps interchangeable for a program: kind, key and value size, capacity, flags."""

    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]


def is_bpffs(path: Path) -> bool:
    """True when `path` (which must exist) lies on a bpf filesystem."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = _Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return bool((int(buf.f_type) & 0xFFFFFFFF) == BPF_FS_MAGIC)


def ensure_pin_dir(pin_dir: Path) -> Path:
    """Make `pin_dir` exist on a bpffs and return it (absolute).

    Mounts a bpffs at /sys/fs/bpf when the directory lies under it and none is mounted there (as
    Cilium does); any other location must already be on a bpffs. Raises AttachError("bpffs", ...)
    otherwise: pins elsewhere are impossible, and the caller must not start without its state.
    """
    pin_dir = pin_dir.absolute()
    probe = pin_dir
    while not probe.exists():
        probe = probe.parent
    if not is_bpffs(probe):
        if BPFFS_ROOT in (pin_dir, *pin_dir.parents) and BPFFS_ROOT.is_dir() and not is_bpffs(BPFFS_ROOT):
            res = subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS_ROOT)], capture_output=True, text=True)
            if res.returncode != 0:
                raise AttachError("bpffs", str(BPFFS_ROOT), errno_mod.EPERM, res.stderr.strip())
            log.info("mounted a bpf filesystem at %s", BPFFS_ROOT)
        else:
            raise AttachError("bpffs", str(pin_dir), errno_mod.EINVAL, "not on a bpf filesystem")
    try:
        pin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise AttachError("bpffs", str(pin_dir), e.errno or errno_mod.EIO, e.strerror or "") from e
    return pin_dir


def fd_info(fd: int) -> dict[str, str]:
    """The fields of /proc/self/fdinfo/<fd> (map_type, key_size, map_id, prog_id, ...)."""
    out: dict[str, str] = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def map_def_of_fd(fd: int) -> MapDef:
    """The definition of the map behind `fd`, as the kernel holds it."""
    info = fd_info(fd)
    return MapDef(
        map_type=int(info["map_type"]),
        key_size=int(info["key_size"]),
        value_size=int(info["value_size"]),
        max_entries=int(info["max_entries"]),
        flags=int(info["map_flags"], 16),
    )


def declared_map_def(bpf: Any, name: str) -> MapDef:
    """The definition a bcc-compiled program declared for table `name` (before any pin replaced it)."""
    import bcc

    tid = bcc.lib.bpf_table_id(bpf.module, name.encode())
    table = bpf.get_table(name.encode())
    return MapDef(
        map_type=int(bcc.lib.bpf_table_type_id(bpf.module, tid)),
        key_size=ctypes.sizeof(table.Key),
        value_size=ctypes.sizeof(getattr(table, "sLeaf", table.Leaf)),  # per-CPU tables: one CPU's value
        max_entries=int(bcc.lib.bpf_table_max_entries_id(bpf.module, tid)),
        flags=int(bcc.lib.bpf_table_flags_id(bpf.module, tid)),
    )


def mismatched_maps(bpf: Any, names: Iterable[str] = PINNED_MAPS) -> dict[str, tuple[MapDef, MapDef]]:
    """Tables whose map (perhaps adopted from a pin) differs from the declaration: name -> (declared, actual)."""
    import bcc

    out: dict[str, tuple[MapDef, MapDef]] = {}
    for name in names:
        fd = bcc.lib.bpf_table_fd(bpf.module, name.encode())
        declared = declared_map_def(bpf, name)
        actual = map_def_of_fd(fd)
        if declared != actual:
            out[name] = (declared, actual)
    return out


def map_id_of_fd(fd: int) -> int:
    """The kernel id of the map behind `fd`."""
    return int(fd_info(fd)["map_id"])


def _libbpf() -> Any:
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_obj_get.restype = ctypes.c_int
    return lib


def pinned_map_ids(pin_dir: Path) -> dict[str, int]:
    """Every pin of ours in `pin_dir` -> the id of the map it holds (empty when the directory is absent)."""
    out: dict[str, int] = {}
    if not pin_dir.is_dir():
        return out
    lib = _libbpf()
    for pin in sorted(pin_dir.glob("mbr_*")):
        fd = lib.bpf_obj_get(os.fsencode(pin))
        if fd < 0:
            log.warning("cannot open pin %s: %s", pin, os.strerror(ctypes.get_errno()))
            continue
        try:
            info = fd_info(fd)
            if "map_id" in info:
                out[pin.name] = int(info["map_id"])
        finally:
            os.close(fd)
    return out


def unlink_pins(pin_dir: Path, names: Iterable[str]) -> list[str]:
    """Unlink the named pins (absent ones are skipped). Returns the paths removed."""
    removed = []
    for name in names:
        pin = pin_dir / name
        try:
            pin.unlink()
        except FileNotFoundError:
            continue
        removed.append(str(pin))
    return removed


def remove_pins(pin_dir: Path) -> list[str]:
    """Unlink every `mbr_*` pin in `pin_dir` and the directory if that leaves it empty. Idempotent."""
    if not pin_dir.is_dir():
        return []
    removed = unlink_pins(pin_dir, [p.name for p in pin_dir.glob("mbr_*")])
    try:
        pin_dir.rmdir()
        removed.append(f"{pin_dir}/")
    except OSError as e:  # something not ours lives there too: leave the directory
        log.info("pin directory %s kept: %s", pin_dir, e.strerror)
    return removed


def bpftool(*argv: str) -> list[dict[str, Any]]:
    """`bpftool -j ARGV` as a list of objects; [] when it prints nothing.

    A failure (objects vanishing under a concurrent listing) is retried twice, then logged and [].
    """
    for _attempt in range(3):
        out = subprocess.run(["bpftool", "-j", *argv], capture_output=True, text=True)
        if out.returncode == 0:
            if not out.stdout.strip():
                return []
            data = json.loads(out.stdout)
            return data if isinstance(data, list) else [data]
    log.warning("bpftool %s failed: %s", " ".join(argv), out.stderr.strip())
    return []


def map_pins() -> dict[int, list[str]]:
    """Every pinned map on every mounted bpffs: map id -> its pin paths."""
    return {
        int(m["id"]): [str(p) for p in m.get("pinned", [])] for m in bpftool("-f", "map", "show") if m.get("pinned")
    }


def prog_maps() -> dict[int, tuple[str, set[int]]]:
    """Every loaded program: id -> (name, ids of the maps it uses)."""
    return {
        int(p["id"]): (str(p.get("name", "")), {int(m) for m in p.get("map_ids", [])}) for p in bpftool("prog", "show")
    }
