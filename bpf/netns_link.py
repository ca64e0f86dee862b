"""bpf_link attachments to a network namespace (BPF_PROG_TYPE_SK_LOOKUP), pinned so they outlive the agent.

bcc 0.26 loads the program but cannot attach it: links are made with libbcc's bundled libbpf
(`bpf_link_create`, `bpf_link_update`, `bpf_obj_pin`, `bpf_obj_get`). A link lives while an fd or a
pin holds it; replacing its program (`bpf_link_update`) is atomic, so a restarted agent swaps its
program in without a moment where the namespace runs without one.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import functools
import os
from pathlib import Path
from typing import Any

from membrane.bpf.errors import AttachError

PROG_TYPE_SK_LOOKUP = 30  # enum bpf_prog_type
ATTACH_SK_LOOKUP = 36  # enum bpf_attach_type: BPF_SK_LOOKUP


@functools.cache
def _lib() -> Any:
    """libbcc with the prototypes this module calls (set once)."""
    import bcc

    lib = bcc.lib
    lib.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.bpf_link_create.restype = ctypes.c_int
    lib.bpf_link_update.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.bpf_link_update.restype = ctypes.c_int
    lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    lib.bpf_obj_pin.restype = ctypes.c_int
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_obj_get.restype = ctypes.c_int
    lib.bpf_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulonglong]
    lib.bpf_update_elem.restype = ctypes.c_int
    return lib


def _err(rc: int) -> int:
    """libbpf returns -errno (and sets errno); either way, the errno."""
    return -rc if rc < 0 and rc != -1 else (ctypes.get_errno() or errno_mod.EINVAL)


def attach_sk_lookup(prog_fd: int, pin: Path | None) -> int:
    """Attach `prog_fd` to this process's netns as its sk_lookup program; returns the link's fd.

    With `pin`: a link already pinned there (a previous agent's) gets this program in place, atomically;
    otherwise a new link is made and pinned there. Without: the link lives as long as the returned fd.
    Raises AttachError.
    """
    lib = _lib()
    if pin is not None and pin.exists():
        fd = lib.bpf_obj_get(str(pin).encode())
        if fd >= 0:
            rc = lib.bpf_link_update(fd, prog_fd, None)
            if rc == 0:
                return int(fd)
            os.close(fd)
        # an unusable pin (not a link, a dead namespace's): replace it
        pin.unlink(missing_ok=True)
    netns = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        fd = lib.bpf_link_create(prog_fd, netns, ATTACH_SK_LOOKUP, None)
    finally:
        os.close(netns)
    if fd < 0:
        raise AttachError("sk_lookup", "netns", _err(fd), "bpf_link_create")
    if pin is not None:
        rc = lib.bpf_obj_pin(fd, str(pin).encode())
        if rc != 0:
            os.close(fd)
            raise AttachError("sk_lookup", str(pin), _err(rc), "bpf_obj_pin")
    return int(fd)


def map_update_socket(map_fd: int, key: int, sock_fd: int) -> None:
    """Put a socket into a SOCKMAP/SOCKHASH with a u32 key (bcc 0.26 has no table class for them)."""
    lib = _lib()
    k = ctypes.c_uint32(key)
    v = ctypes.c_int(sock_fd)
    rc = lib.bpf_update_elem(map_fd, ctypes.byref(k), ctypes.byref(v), 0)
    if rc != 0:
        raise AttachError("sockhash", f"key {key:#x}", _err(rc), "bpf_map_update_elem")
