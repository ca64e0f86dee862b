"""Run a loaded tc program on a hand-built packet with BPF_PROG_TEST_RUN: map logic without attaching.

The kernel runs the program on an skb from the loopback device (ifindex 1) of this namespace.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct

TC_ACT_OK = 0
TC_ACT_SHOT = 2


class _TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04


def packet(src: str, dst: str, sport: int, dport: int, proto: int = socket.IPPROTO_TCP, *, flags: int = SYN) -> bytes:
    """An Ethernet frame carrying one IPv4/IPv6 TCP (with `flags`) or UDP packet; checksums are not needed."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if proto == socket.IPPROTO_TCP:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8, 0)
    if s.version == 4:
        l3 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, s.packed, d.packed)
        ethertype = 0x0800
    else:
        l3 = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, s.packed, d.packed)
        ethertype = 0x86DD
    eth = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ethertype)
    return eth + l3 + l4


def run(prog_fd: int, data: bytes) -> int:
    """Run the program once on `data`; returns its tc verdict (TC_ACT_OK / TC_ACT_SHOT). Raises OSError."""
    from bcc import lib

    buf = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(len(data) + 256)
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.cast(buf, ctypes.c_void_p),
        data_out=ctypes.cast(out, ctypes.c_void_p),
        data_size_in=len(data),
        data_size_out=len(out),
        repeat=1,
    )
    fn = lib.bpf_prog_test_run_opts
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]
    fn.restype = ctypes.c_int
    rc = fn(prog_fd, ctypes.byref(opts))
    if rc != 0:
        raise OSError(-rc, f"BPF_PROG_TEST_RUN failed: {rc}")
    return int(opts.retval)
