"""Private bpf filesystems for tests: each run pins its maps on a bpffs of its own, never /sys/fs/bpf.

`pin_dir()` mounts a fresh bpffs under /tmp (named with the process id, so parallel runs never share
pins), yields the pin directory in it, and on exit uninstalls that directory's state (also when the
test failed), unmounts and removes the mount point. `CREATED` lists the mounts still alive, for
tests/helpers/kernel.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

CREATED: list[Path] = []  # bpffs mount points this process created and has not removed yet


@contextlib.contextmanager
def pin_dir() -> Iterator[Path]:
    """A pin directory on a private bpffs; everything of it is uninstalled and unmounted on exit."""
    from membrane.bpf.stale import uninstall

    mnt = Path(tempfile.mkdtemp(prefix=f"mbrpin-{os.getpid()}-", dir="/tmp"))
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mnt)], check=True, capture_output=True)
    CREATED.append(mnt)
    try:
        yield mnt / "membrane"
    finally:
        try:
            uninstall(mnt / "membrane")
        finally:
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
            with contextlib.suppress(OSError):
                mnt.rmdir()
            CREATED.remove(mnt)


def pins_left() -> list[str]:
    """Every file left on the bpffs mounts this process created (but the kernel's own `*.debug` iterators)."""
    return [str(p) for mnt in CREATED for p in sorted(mnt.rglob("*")) if p.parent != mnt or p.suffix != ".debug"]
