"""load_bpf(): compile and load one of our C files with bcc, leaving nothing behind when that fails."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from membrane.bpf.errors import BpfLoadError


def _own_bpf_fds() -> set[int]:
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:bpf"):
                fds.add(int(fd))
        except OSError:
            continue
    return fds


def load_bpf(src: Path, cflags: list[str]) -> Any:
    """Compile and load `src` with bcc. Raises BpfLoadError (with bcc's message) on failure.

    bcc leaks the fds of the maps it created before a failing one; they are closed here, so a
    failed load leaves nothing in the kernel.
    """
    from bcc import BPF  # imported lazily: tests of pure logic must not need bcc

    before = _own_bpf_fds()
    try:
        return BPF(src_file=str(src), cflags=cflags)
    except Exception as e:  # bcc raises bare Exception on compile and map errors
        for fd in _own_bpf_fds() - before:
            os.close(fd)
        raise BpfLoadError(f"{src.name}: {e}") from e
