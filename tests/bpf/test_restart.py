"""Restarts never fail open: pinned maps are adopted, filters replaced in place, keep=True keeps enforcing, uninstall removes all.

Probes send UDP continuously (about 500 datagrams a second per flow) from pods to a receiver that logs
every datagram with its arrival time, so "no denied packet at any moment of the restart" is checked
packet by packet, not by sampling.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from membrane.bpf import routing
from membrane.bpf.maps import IPPROTO_TCP, DropReason, Endpoint, PolicyDirection, PolicyEntry, PolicyKey, Verdict
from membrane.bpf.stale import uninstall
from membrane.bpf.steer import FILTER_PRIO, ProxyPorts, Steering
from pyroute2 import IPRoute

from tests.bpf.conftest import call, start_server
from tests.bpf.restart_agent import ALLOWED, DENIED, PodRef, spec, write_plan
from tests.bpf.tproxy import TransparentProxy
from tests.helpers import bpffs, kernel
from tests.helpers.netns import REPO, Pod, Topology, topology, wait_for_line
from tests.helpers.probes import RECEIVER, SENDER

pytestmark = pytest.mark.bpf

@dataclass(frozen=True, slots=True, kw_only=True)
class Arrival:
    """One datagram the receiver got."""

    port: int
    src: str
    at: float  # time.monotonic() of arrival (system-wide clock)


@dataclass
class Probe:
    """Senders a -> b:{ALLOWED,DENIED} and c -> b:ALLOWED, and b's receiver log."""

    log: Path
    stop: Path
    senders: list[subprocess.Popen[str]]

    def finish(self) -> tuple[list[Arrival], dict[str, dict[int, int]]]:
        """Stop the senders; returns every arrival and what each sender sent per port."""
        self.stop.touch()
        sent: dict[str, dict[int, int]] = {}
        for name, proc in zip(("a", "c"), self.senders, strict=True):
            out, _err = proc.communicate(timeout=10)
            sent[name] = dict(int_pair(kv) for kv in out.strip().splitlines()[-1].split())
        time.sleep(0.2)  # the last datagrams reach the log
        arrivals = []
        for line in self.log.read_text().splitlines():
            port, src, _seq, at = line.split()
            arrivals.append(Arrival(port=int(port), src=src, at=float(at)))
        return arrivals, sent


def int_pair(kv: str) -> tuple[int, int]:
    k, v = kv.split("=")
    return int(k), int(v)


@contextmanager
def probe(topo: Topology, tmp: Path) -> Iterator[Probe]:
    a, b, c = topo.pods["a"], topo.pods["b"], topo.pods["c"]
    log, stop = tmp / "arrivals.log", tmp / "stop"
    receiver = topo.track(b.popen([sys.executable, "-u", "-c", textwrap.dedent(RECEIVER), str(log), str(ALLOWED), str(DENIED)]))
    wait_for_line(receiver, "ready")
    senders = []
    for pod, ports in ((a, (ALLOWED, DENIED)), (c, (ALLOWED,))):
        proc = topo.track(pod.popen([sys.executable, "-u", "-c", textwrap.dedent(SENDER), str(b.ipv4), str(stop), *map(str, ports)]))
        wait_for_line(proc, "sending")
        senders.append(proc)
    try:
        yield Probe(log=log, stop=stop, senders=senders)
    finally:
        stop.touch()


def refs(topo: Topology) -> dict[str, PodRef]:
    return {n: PodRef(ipv4=str(p.ipv4), host_if=p.host_if, host_ifindex=p.host_ifindex) for n, p in topo.pods.items()}


@pytest.fixture
def abc() -> Iterator[Topology]:
    """Pods a (client), b (server), c (a client b's policy does not admit)."""
    with topology("a", "b", "c") as topo:
        yield topo


def steer_filters(pod: Pod) -> int:
    out = subprocess.run(["tc", "filter", "show", "dev", pod.host_if, "ingress"], capture_output=True, text=True).stdout
    return out.count("name mbr_tc_steer")


def assert_never_denied(arrivals: list[Arrival], topo: Topology, context: str = "") -> None:
    c = str(topo.pods["c"].ipv4)
    leaked = [x for x in arrivals if x.port == DENIED or x.src == c]
    assert leaked == [], f"{len(leaked)} denied datagrams got through, first {leaked[:2]} last {leaked[-1:]} ({context})"


@pytest.mark.parametrize("defines", [{}, {"MBR_POLICY_SIZE": 8192}], ids=["same-maps", "policy-maps-changed"])
def test_sigkill_and_restart_never_lets_a_denied_packet_through(
    abc: Topology, pin_dir: Path, tmp_path: Path, defines: dict[str, int]
) -> None:
    """Agent 1 is SIGKILLed, agent 2 adopts the pins and replaces its filters: not one denied datagram passes, allowed ones keep flowing."""
    agent1 = abc.track(
        subprocess.Popen(
            [sys.executable, "-m", "tests.bpf.restart_agent", spec(pin_dir, refs(abc))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    )
    wait_for_line(agent1, "attached", timeout=60)
    with probe(abc, tmp_path) as pr:
        time.sleep(0.5)
        agent1.send_signal(signal.SIGKILL)
        agent1.wait(10)
        killed = time.monotonic()
        time.sleep(0.5)  # nobody runs: the old programs enforce from the pinned maps
        st = Steering(pin_dir=pin_dir, defines=defines).__enter__()
        try:
            loaded = time.monotonic()
            assert st.maps.adopted is not bool(defines)  # a changed definition replaces the whole set
            write_plan(st, refs(abc))
            stale = st.cleanup_stale()
            ready = time.monotonic()
            time.sleep(1.0)
            arrivals, sent = pr.finish()
            when = f"killed {killed} loaded {loaded} ready {ready} arrivals {arrivals[0].at}..{arrivals[-1].at}"
            assert_never_denied(arrivals, abc, when)
            assert sent["a"][DENIED] > 500, sent  # the denied flow was really tried throughout
            assert sent["c"][ALLOWED] > 500, sent
            allowed = [x.at for x in arrivals if x.port == ALLOWED and x.src == str(abc.pods["a"].ipv4)]
            assert any(killed < t < loaded for t in allowed), "allowed traffic stopped while no agent ran"
            assert sum(t > ready for t in allowed) > 100, "allowed traffic did not resume after the restart"
            expected = {"mbr_pol_egr", "mbr_pol_ing"} if defines else set()
            assert set(st.replaced_maps) == expected
            assert [steer_filters(p) for p in abc.pods.values()] == [1, 1, 1]  # replaced, not doubled
            assert not any("filter" in x for x in stale), stale  # every filter was taken over in place
        finally:
            st.close()
    assert [x for x in kernel.leftovers() if x.startswith("pin")] == [], "close(keep=False) leaves no pin"


def test_replacing_the_program_never_leaves_an_interface_without_a_filter(abc: Topology, pin_dir: Path, tmp_path: Path) -> None:
    """Three successive Steerings take over in place: a poller never sees a veth without our filter, and no denied datagram passes."""
    gaps: list[tuple[str, float]] = []
    polls = 0
    done = threading.Event()
    idxs = {p.host_ifindex: p.host_if for p in abc.pods.values()}

    def poll() -> None:
        nonlocal polls
        with IPRoute() as ipr:
            while not done.is_set():
                for idx, name in idxs.items():
                    found = [f for f in ipr.get_filters(index=idx, parent=0xFFFFFFF2) if f.get_attr("TCA_OPTIONS")]
                    if not any((f["info"] >> 16) == FILTER_PRIO for f in found):
                        gaps.append((name, time.monotonic()))
                polls += 1

    first = Steering(pin_dir=pin_dir).__enter__()
    owners = [first]
    try:
        write_plan(first, refs(abc))
        poller = threading.Thread(target=poll, daemon=True)
        with probe(abc, tmp_path) as pr:
            poller.start()
            for _ in range(2):
                nxt = Steering(pin_dir=pin_dir).__enter__()
                owners.append(nxt)
                write_plan(nxt, refs(abc))
                nxt.cleanup_stale()
                owners[-2].close(keep=True)  # the old agent goes away (SIGTERM): nothing of it is removed
            time.sleep(0.3)
            done.set()
            poller.join(5)
            arrivals, _sent = pr.finish()
        assert polls > 100, polls
        assert gaps == []
        assert_never_denied(arrivals, abc)
        assert [steer_filters(p) for p in abc.pods.values()] == [1, 1, 1]
    finally:
        done.set()
        for st in owners:
            st.close()


def _drops(pin_dir: Path) -> dict[DropReason, int]:
    """Read the pinned drop counters through a Steering that adopts the pins and then keeps them."""
    st = Steering(pin_dir=pin_dir, with_routing=False).__enter__()
    try:
        return st.maps.drop_counts()
    finally:
        st.close(keep=True)


def test_keep_enforces_without_an_agent_and_uninstall_removes_everything(abc: Topology, pin_dir: Path) -> None:
    """close(keep=True) leaves L3/L4 enforced and the L7 port dropped (not passed) with no proxy; uninstall() then leaves nothing."""
    a, b, c = abc.pods["a"], abc.pods["b"], abc.pods["c"]
    for port in (ALLOWED, DENIED, 80):
        start_server(abc, b, port)
    with TransparentProxy() as proxy:
        st = Steering(proxy_ports=ProxyPorts(tcp4=proxy.port), pin_dir=pin_dir).__enter__()
        try:
            write_plan(st, refs(abc), redirect_port=80)
            assert call(a, b.ipv4, 80) == f"from {a.ipv4} got hi"
            assert len(proxy.flows) == 1  # through the proxy
        finally:
            st.close(keep=True)
    # no agent and no proxy any more: the kernel alone enforces
    assert call(a, b.ipv4, ALLOWED) == f"from {a.ipv4} got hi"
    assert call(a, b.ipv4, DENIED, timeout_s=1) == "TIMEOUT"
    assert call(c, b.ipv4, ALLOWED, timeout_s=1) == "TIMEOUT"
    before = _drops(pin_dir)[DropReason.PROXY_UNAVAILABLE]
    assert call(a, b.ipv4, 80, timeout_s=1) == "TIMEOUT"  # dropped: neither b's server nor a RST answers
    assert _drops(pin_dir)[DropReason.PROXY_UNAVAILABLE] > before
    assert routing.routing_present()
    assert sorted(p.name for p in pin_dir.iterdir()) == sorted(
        ["mbr_config", "mbr_ct", "mbr_drops", "mbr_endpoints", "mbr_ipc4", "mbr_ipc6", "mbr_pol_egr", "mbr_pol_ing"]
    )

    removed = uninstall(pin_dir)
    assert sum("filter mbr_tc_steer" in r for r in removed) == 3, removed
    assert sum("egress filter mbr_tc_host" in r for r in removed) == 3, removed
    assert sum(r.startswith("clsact") for r in removed) == 3, removed
    assert sum(r.startswith("pin") for r in removed) == 9, removed  # eight maps and the directory
    assert any("routing" in r for r in removed), removed
    deadline = time.monotonic() + 3
    ours = [x for x in kernel.leftovers() if not x.startswith(("netns", "link"))]
    while ours and time.monotonic() < deadline:
        time.sleep(0.1)
        ours = [x for x in kernel.leftovers() if not x.startswith(("netns", "link"))]
    assert ours == []
    for pod in abc.pods.values():
        qdiscs = subprocess.run(["tc", "qdisc", "show", "dev", pod.host_if], capture_output=True, text=True).stdout
        assert "clsact" not in qdiscs
    assert uninstall(pin_dir) == []  # idempotent
    assert call(c, b.ipv4, ALLOWED) == f"from {c.ipv4} got hi"  # nothing enforces any more


def test_a_second_steering_replaces_instead_of_failing_and_close_spares_it(abc: Topology) -> None:
    """Attaching where another Steering's filter sits replaces it (no EEXIST); the first one's close() leaves the successor's filter."""
    a, b = abc.pods["a"], abc.pods["b"]
    start_server(abc, b, DENIED)
    first = Steering().__enter__()
    try:
        write_plan(first, refs(abc))
        with Steering() as second:
            write_plan(second, refs(abc))
            first.close()
            assert [steer_filters(p) for p in abc.pods.values()] == [1, 1, 1]
            assert call(a, b.ipv4, DENIED, timeout_s=1) == "TIMEOUT"  # the successor still enforces
            assert routing.routing_present()
    finally:
        first.close()


def test_cleanup_stale_removes_what_the_new_plan_dropped(abc: Topology, pin_dir: Path) -> None:
    """After a restart whose plan no longer has pod c, cleanup_stale() removes c's old filter, clsact, endpoint and identity, and nothing else."""
    a, b, c = abc.pods["a"], abc.pods["b"], abc.pods["c"]
    start_server(abc, b, DENIED)
    old = Steering(pin_dir=pin_dir).__enter__()
    try:
        write_plan(old, refs(abc))
    finally:
        old.close(keep=True)
    with Steering(pin_dir=pin_dir) as new:
        write_plan(new, refs(abc), with_c=False)
        removed = new.cleanup_stale()
        assert sorted(removed) == sorted(
            [
                f"tc ingress filter mbr_tc_steer on {c.host_if}",
                f"tc egress filter mbr_tc_host on {c.host_if}",
                f"clsact on {c.host_if}",
                f"endpoint ifindex {c.host_ifindex}",
                f"identity {c.ipv4}/32",
            ]
        )
        assert c.host_ifindex not in new.maps.endpoints()
        assert [steer_filters(p) for p in (a, b, c)] == [1, 1, 0]
        assert call(a, b.ipv4, DENIED, timeout_s=1) == "TIMEOUT"  # a is still enforced
        assert new.cleanup_stale() == []


def test_cleanup_stale_and_uninstall_never_touch_another_pin_directory(abc: Topology, pin_dir: Path) -> None:
    """A kept agent of another pin directory (not held by any process) survives our cleanup_stale() and uninstall()."""
    a, b = abc.pods["a"], abc.pods["b"]
    start_server(abc, b, DENIED)
    with bpffs.pin_dir() as other_dir:
        other = Steering(pin_dir=other_dir).__enter__()
        try:
            other.maps.set_identity(f"{a.ipv4}/32", 1001, ifindex=a.host_ifindex)
            other.maps.set_endpoint(a.host_ifindex, Endpoint(endpoint_id=1, identity=1001, enforce_egress=True))
            other.attach(a.host_if)  # a: deny-all egress
        finally:
            other.close(keep=True)
        with Steering(pin_dir=pin_dir) as mine:
            mine.attach(b.host_if)
            assert mine.cleanup_stale() == []
        assert uninstall(pin_dir) == []  # close() took ours away already; the other's is not ours
        assert steer_filters(a) == 1
        assert call(a, b.ipv4, DENIED, timeout_s=1) == "TIMEOUT"  # the other agent's kept state enforces
        assert routing.routing_present()  # it still needs the routing
        removed = uninstall(other_dir)
        assert f"tc ingress filter mbr_tc_steer on {a.host_if}" in removed
    assert call(a, b.ipv4, DENIED) == f"from {a.ipv4} got hi"


def test_adopted_maps_are_mirrored_so_the_first_swap_writes_only_the_difference(pin_dir: Path) -> None:
    """An adopting Steering reads the active generation and both generations back: its first set_policy() writes only what differs from the inactive one, never the active one."""
    k1 = PolicyKey(endpoint_id=1, identity=7, port=80, proto=IPPROTO_TCP)
    k2 = PolicyKey(endpoint_id=1, identity=8)
    p1 = {k1: PolicyEntry(verdict=Verdict.PASS)}
    p2 = {k1: PolicyEntry(verdict=Verdict.PASS), k2: PolicyEntry(verdict=Verdict.DROP)}
    old = Steering(pin_dir=pin_dir, with_routing=False).__enter__()
    try:
        old.maps.set_policy(ingress=p1, egress={})  # generation 1
        old.maps.set_policy(ingress=p2, egress={})  # generation 0, active
        old.maps.set_identity("10.9.0.0/16", 4242)
    finally:
        old.close(keep=True)
    new = Steering(pin_dir=pin_dir, with_routing=False).__enter__()
    try:
        m = new.maps
        assert m.adopted
        assert m.generation == 0
        assert m.policy(PolicyDirection.INGRESS) == p2
        assert m.identities()[ipaddress.ip_network("10.9.0.0/16")] == (4242, 0)
        assert m.set_policy(ingress=p2, egress={}) == 1  # generation 1 held p1: only k2 is new there
        assert m.generation == 1
        raw = m.raw_policy(PolicyDirection.INGRESS)
        assert {k for (g, k) in raw if g == 0} == {k1, k2}  # the previously active generation untouched
        assert new.cleanup_stale() == ["identity 10.9.0.0/16"]  # adopted, not written again
    finally:
        new.close()
    assert not pin_dir.exists()  # close(keep=False) with no other user unpins everything


def test_pin_dir_must_be_on_a_bpf_filesystem(tmp_path: Path) -> None:
    """A pin directory outside any bpffs (and not under /sys/fs/bpf) is refused with AttachError, before anything loads."""
    from membrane.bpf.errors import AttachError

    with pytest.raises(AttachError) as info, Steering(pin_dir=tmp_path / "pins"):
        pass
    assert info.value.kind == "bpffs"
    assert str(tmp_path / "pins") in str(info.value)
