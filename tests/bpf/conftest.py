"""Fixtures for kernel tests: root gate, a leak check after every test, pods and servers inside them."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import bpffs, kernel
from tests.helpers.netns import Pod, Topology, topology, wait_for_line

# A server for pods: TCP (dual-stack) and UDP on PORT; answers each connection/datagram with the
# peer's address, so a test can see the source address the server saw.
SERVER = """
import socket, sys, threading
port = int(sys.argv[1])
def tcp():
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port)); s.listen(64)
    ready.set()
    while True:
        c, peer = s.accept()
        data = c.recv(1024)
        c.sendall(b"from " + peer[0].removeprefix("::ffff:").encode() + b" got " + data)
        c.close()
def udp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(b"from " + peer[0].removeprefix("::ffff:").encode() + b" got " + data, peer)
ready = threading.Event()
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
ready.wait(); print("ready", flush=True)
threading.Event().wait()
"""

CLIENT = """
import socket, sys
host, port, proto, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].encode()
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    if proto == "tcp":
        s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(float(sys.argv[5]))
        s.connect((host, port)); s.sendall(payload)
        print(s.recv(1024).decode())
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(float(sys.argv[5]))
        s.sendto(payload, (host, port)); print(s.recvfrom(1024)[0].decode())
except (socket.timeout, TimeoutError):
    print("TIMEOUT")
except OSError as e:
    print("ERROR", e.errno)
"""


def start_server(topo: Topology, pod: Pod, port: int) -> None:
    """Start SERVER in `pod` on `port` and wait until it listens."""
    import sys

    proc = topo.track(pod.popen([sys.executable, "-u", "-c", SERVER, str(port)]))
    wait_for_line(proc, "ready")


def call(pod: Pod, host: object, port: int, *, proto: str = "tcp", payload: str = "hi", timeout_s: float = 5.0) -> str:
    """Connect from `pod` to host:port and return the answer, "TIMEOUT" or "ERROR <errno>"."""
    import sys

    out = pod.run([sys.executable, "-c", CLIENT, str(host), str(port), proto, payload, str(timeout_s)], timeout=30)
    return out.stdout.strip()


@pytest.fixture(autouse=True)
def _root_and_clean() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("needs root (BPF, netns)")
    if subprocess.run(["bpftool", "version"], capture_output=True).returncode != 0:
        pytest.skip("needs bpftool")
    kernel.assert_clean()
    yield
    kernel.assert_clean()


@pytest.fixture
def pods() -> Iterator[Topology]:
    """Two pods, `a` (client) and `b` (server), torn down after the test."""
    with topology("a", "b") as topo:
        yield topo


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    """A pin directory on a private bpffs; its state is uninstalled and the mount removed afterwards."""
    with bpffs.pin_dir() as path:
        yield path
