"""A pod topology on the real kernel: network namespaces as pods, each with a veth to the host.

Each pod gets a /32 from 10.244.<run>.0/24 and a /128 from fd00:10:244:<run>::/64, host routes on
its host-side veth, proxy_arp and per-device forwarding there, and link-local default gateways
(169.254.1.1, fe80::1) inside. Every name carries `mbr` + a per-run tag; `topology()` removes all
of it on exit, also when the body fails. Traffic stays between these namespaces and the host.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

GATEWAY4 = "169.254.1.1"
CREATED_TAGS: set[str] = set()  # every run tag this process used; tests/helpers/kernel.py checks them
GATEWAY6 = "fe80::1"
REPO = Path(__file__).resolve().parents[2]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command in the host namespace; raise on failure unless check=False."""
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


@dataclass
class Pod:
    """One namespace with a veth: `eth0` inside, `host_if` (index `host_ifindex`) in the host."""

    name: str
    ns: str
    host_if: str
    host_ifindex: int
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command inside this pod and wait for it."""
        return run_in(self.ns, argv, check=check, timeout=timeout)

    def popen(self, argv: Sequence[str], **kw: object) -> subprocess.Popen[str]:
        """Start a command inside this pod (caller terminates it)."""
        return popen_in(self.ns, argv, **kw)

    def python(self, code: str, *, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Python snippet inside this pod; returns its output."""
        return self.run([sys.executable, "-c", textwrap.dedent(code)], timeout=timeout, check=check)

    def python_popen(self, code: str) -> subprocess.Popen[str]:
        """Start a Python snippet inside this pod (a server); stdout is a pipe."""
        return self.popen([sys.executable, "-u", "-c", textwrap.dedent(code)])


def run_in(ns: str, argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run argv inside the named namespace (`ip netns exec`)."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], check=check, capture_output=True, text=True, timeout=timeout
    )


def popen_in(ns: str, argv: Sequence[str], **kw: object) -> subprocess.Popen[str]:
    """Start argv inside the named namespace with stdout/stderr piped."""
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        ["ip", "netns", "exec", ns, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        **kw,
    )


def _free_subnet() -> int:
    """A random 10.244.<n>.0/24 with no host route yet (another run, or the demo, may be using one)."""
    routes = sh("ip", "route", "show").stdout
    used = {int(part.split(".")[2]) for part in routes.split() if part.startswith("10.244.") and part.count(".") == 3}
    free = [n for n in range(1, 251) if n not in used]
    return free[secrets.randbelow(len(free))]


@dataclass
class Topology:
    """The pods of one run; `add_pod` creates one, `close` removes everything this run created."""

    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: int = field(default_factory=lambda: _free_subnet())
    pods: dict[str, Pod] = field(default_factory=dict)
    _procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"mbr{self.tag}"

    def add_pod(self, name: str) -> Pod:
        """Create a pod namespace named `<prefix>-<name>` with the next free address."""
        idx = len(self.pods) + 1
        CREATED_TAGS.add(self.tag)
        ns = f"{self.prefix}-{name}"
        host_if = f"{self.prefix}h{idx}"
        v4 = ipaddress.IPv4Address(f"10.244.{self.subnet}.{idx}")
        v6 = ipaddress.IPv6Address(f"fd00:10:244:{self.subnet:x}::{idx:x}")
        sh("ip", "netns", "add", ns)
        # Registered before the veth exists, so a failure below still tears the namespace down.
        self.pods[name] = Pod(name=name, ns=ns, host_if=host_if, host_ifindex=0, ipv4=v4, ipv6=v6)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        for key, value in (("ipv4/conf", "proxy_arp"), ("ipv4/conf", "forwarding"), ("ipv6/conf", "force_forwarding")):
            Path(f"/proc/sys/net/{key}/{host_if}/{value}").write_text("1")
        # Answer the pod's ARP for its gateway at once, as Calico sets it: the default proxy_delay (80
        # jiffies) holds each proxied ARP reply a random 0-0.8 s, so a pod's first packet (its first
        # connection after start, or after the neighbour entry expired) waited up to 0.8 s.
        Path(f"/proc/sys/net/ipv4/neigh/{host_if}/proxy_delay").write_text("0")
        sh("ip", "-6", "addr", "add", f"{GATEWAY6}/64", "dev", host_if, "nodad")
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "route", "add", f"{v4}/32", "dev", host_if)
        sh("ip", "-6", "route", "add", f"{v6}/128", "dev", host_if)
        for argv in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "addr", "add", f"{v4}/32", "dev", "eth0"],
            ["ip", "-6", "addr", "add", f"{v6}/128", "dev", "eth0", "nodad"],
            ["ip", "route", "add", GATEWAY4, "dev", "eth0", "scope", "link"],
            ["ip", "route", "add", "default", "via", GATEWAY4, "dev", "eth0"],
            ["ip", "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0"],
        ):
            run_in(ns, argv)
        ifindex = int(Path(f"/sys/class/net/{host_if}/ifindex").read_text())
        self.pods[name].host_ifindex = ifindex
        return self.pods[name]

    def track(self, proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
        """Kill proc on close()."""
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        """Kill tracked processes, delete every veth and namespace of this run. Idempotent."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.communicate(timeout=5)
        self._procs.clear()
        for pod in self.pods.values():
            sh("ip", "link", "del", pod.host_if, check=False)
            sh("ip", "netns", "del", pod.ns, check=False)
        self.pods.clear()


@contextlib.contextmanager
def topology(*names: str) -> Iterator[Topology]:
    """Create pods `names` (more via add_pod) and remove all of them on exit, also on failure."""
    topo = Topology()
    try:
        for name in names:
            topo.add_pod(name)
        yield topo
    finally:
        topo.close()


def wait_for_line(proc: subprocess.Popen[str], expected: str, timeout: float = 10) -> str:
    """Read proc's stdout until a line containing `expected`; raise if it exits or times out first."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(timeout=0.1):
            line = proc.stdout.readline()
            if expected in line:
                return line
            if not line and proc.poll() is not None:
                break
    err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
    raise TimeoutError(f"never saw {expected!r} (exit {proc.poll()}): {err}")
