"""The sockmap accelerator: sock_ops on the cgroup-v2 root fills a sockhash, sk_msg redirects between peers.

Owns `sockops_sockmap.bpf.c`, its maps and its two attachments (cgroup sock_ops with
BPF_F_ALLOW_MULTI, so other programs on the root cgroup stay; sk_msg on the sockhash).
Off by default; the data path is correct without it. Nothing outlives `close()`.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import logging
import os
import socket
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from membrane.bpf.errors import AttachError, BpfLoadError
from membrane.bpf.loader import load_bpf

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("sockops_sockmap.bpf.c")
CGROUP_ROOT = "/sys/fs/cgroup/unified"
SO_NETNS_COOKIE = 71
BPF_F_ALLOW_MULTI = 2


def netns_cookie() -> int:
    """The cookie of this process's network namespace (the host's, for the agent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


class Sockmap:
    """Loads and attaches the accelerator; `ports` selects sockets (local or remote port in the set).

    Give it the destination ports of L7-redirected flows: the proxy's accepted sockets keep the
    original destination port (bpf_sk_assign), so the listener's own port never appears.
    """

    def __init__(self, *, proxy_ports: Iterable[int] = (), cgroup: str = CGROUP_ROOT) -> None:
        self._ports = set(proxy_ports)
        self._cgroup = cgroup
        self._stack: ExitStack | None = None
        self._bpf: Any = None

    def __enter__(self) -> Sockmap:
        from bcc import BPF, BPFAttachType

        with ExitStack() as stack:
            self._bpf = load_bpf(_SRC, [])
            stack.callback(self._bpf.cleanup)
            try:
                sockops = self._bpf.load_func("mbr_sockops", BPF.SOCK_OPS)
                skmsg = self._bpf.load_func("mbr_skmsg", BPF.SK_MSG)
            except Exception as e:
                raise BpfLoadError(f"{_SRC.name}: {e}") from e
            self._bpf.get_table(b"mbr_sm_cfg")[ctypes.c_int(0)] = ctypes.c_uint64(netns_cookie())
            self.set_ports(self._ports)
            import bcc

            map_fd = bcc.lib.bpf_table_fd(self._bpf.module, b"mbr_sockhash")
            try:
                BPF.attach_func(skmsg, map_fd, BPFAttachType.SK_MSG_VERDICT)
            except Exception as e:
                raise AttachError("sk_msg", "mbr_sockhash", errno_mod.EINVAL, str(e)) from e
            stack.callback(_quietly, "sk_msg", BPF.detach_func, skmsg, map_fd, BPFAttachType.SK_MSG_VERDICT)
            cg_fd = os.open(self._cgroup, os.O_RDONLY)
            stack.callback(os.close, cg_fd)
            try:
                BPF.attach_func(sockops, cg_fd, BPFAttachType.CGROUP_SOCK_OPS, BPF_F_ALLOW_MULTI)
            except Exception as e:
                raise AttachError("cgroup", self._cgroup, errno_mod.EINVAL, str(e)) from e
            stack.callback(_quietly, "sock_ops", BPF.detach_func, sockops, cg_fd, BPFAttachType.CGROUP_SOCK_OPS)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Detach sock_ops from the cgroup and sk_msg from the map, unload. Idempotent."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def set_ports(self, ports: Iterable[int]) -> None:
        """Replace the port set (new sockets only; sockets already in the map stay)."""
        table = self._bpf.get_table(b"mbr_sm_ports")
        wanted = set(ports)
        for port in wanted:
            table[ctypes.c_uint32(port)] = ctypes.c_uint32(1)
        for key in [k.value for k in table if k.value not in wanted]:
            del table[ctypes.c_uint32(key)]
        self._ports = wanted

    def stats(self) -> dict[str, int]:
        """Counters: sockets added to the map, messages redirected, messages without a peer."""
        table = self._bpf.get_table(b"mbr_sm_stats")
        values = [int(table[ctypes.c_int(i)].value) for i in range(3)]
        return {"sockets_added": values[0], "redirected": values[1], "no_peer": values[2]}


def _quietly(what: str, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as e:  # bcc raises bare Exception; detaching must never raise
        log.warning("detach %s failed: %s", what, e)
