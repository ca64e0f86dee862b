"""Lifetime of kernel objects: close() detaches everything, and cleanup_stale() removes a SIGKILLed agent's leftovers."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
from membrane.bpf import routing
from membrane.bpf.errors import AttachError
from membrane.bpf.maps import Endpoint
from membrane.bpf.stale import cleanup_stale
from membrane.bpf.steer import Steering

from tests.bpf.conftest import call, start_server
from tests.helpers import kernel
from tests.helpers.netns import REPO, Topology, wait_for_line

pytestmark = pytest.mark.bpf


def test_close_is_idempotent_and_detaches(pods: Topology) -> None:
    """close() removes filters, qdiscs it added and routing; a second close() and a vanished veth do not raise."""
    a, b = pods.pods["a"], pods.pods["b"]
    st = Steering()
    st.__enter__()
    try:
        st.attach(a.host_if)
        st.attach(b.host_if)
        assert st.attach(a.host_if) == a.host_ifindex  # attaching twice is a no-op
        assert any("tc filter" in x for x in kernel.leftovers())
        subprocess.run(["ip", "link", "del", b.host_if], check=True)  # a pod went away under us
        st.detach(a.host_if)
        assert "clsact" not in subprocess.run(["tc", "qdisc", "show", "dev", a.host_if], capture_output=True, text=True).stdout
    finally:
        st.close()
        st.close()


def test_attach_to_missing_interface_raises(pods: Topology) -> None:
    """Attaching to an interface that does not exist raises AttachError with ENODEV."""
    with Steering() as st, pytest.raises(AttachError) as info:
        st.attach("mbrnosuchif0")
    assert info.value.kind == "tc"
    assert info.value.errno == 19


AGENT = """
import sys, time
sys.path.insert(0, {repo!r})
from membrane.bpf.steer import Steering
st = Steering(sockmap=True, sockmap_ports=[8080]).__enter__()
for name in sys.argv[1:]:
    st.attach(name)
print("attached", flush=True)
time.sleep(600)
"""


def test_cleanup_stale_after_sigkill(pods: Topology) -> None:
    """After SIGKILL the programs stay attached; cleanup_stale() removes exactly the dead agent's, and traffic flows again."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, 8080)
    agent = pods.track(
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(AGENT.format(repo=str(REPO))), a.host_if, b.host_if],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
    wait_for_line(agent, "attached", timeout=30)
    agent.send_signal(signal.SIGKILL)
    agent.wait(timeout=10)
    left = kernel.leftovers()
    assert any(x.startswith("prog") and "mbr_tc_steer" in x for x in left), left
    assert any(x.startswith("cgroup prog") for x in left), left
    assert routing.routing_present(), "the dead agent's routing should still be there"
    assert sum("tc filter" in x for x in left) == 4, left  # ingress and host egress on both veths
    assert call(a, b.ipv4, 8080) == f"from {a.ipv4} got hi"  # no policy in the orphaned maps: allow
    removed = cleanup_stale()
    assert sum("filter mbr_tc_steer" in r for r in removed) == 2, removed
    assert sum("filter mbr_tc_host" in r for r in removed) == 2, removed
    assert sum(r.startswith("clsact") for r in removed) == 2, removed
    assert any(r.startswith("cgroup") for r in removed), removed
    ours = [x for x in kernel.leftovers() if not x.startswith(("netns", "link"))]
    import time

    deadline = time.monotonic() + 3
    while ours and time.monotonic() < deadline:
        time.sleep(0.1)
        ours = [x for x in kernel.leftovers() if not x.startswith(("netns", "link"))]
    assert ours == []
    assert cleanup_stale() == []
    assert call(a, b.ipv4, 8080) == f"from {a.ipv4} got hi"


def test_cleanup_stale_keeps_a_live_steering(pods: Topology) -> None:
    """cleanup_stale() never touches a live Steering: its filters, program and routing stay and keep working."""
    a, b = pods.pods["a"], pods.pods["b"]
    start_server(pods, b, 8080)
    with Steering() as st:
        st.maps.set_identity(f"{a.ipv4}/32", 1001, ifindex=a.host_ifindex)
        st.maps.set_endpoint(a.host_ifindex, Endpoint(endpoint_id=1, identity=1001, enforce_egress=True))
        st.attach(a.host_if)
        before = [x for x in kernel.leftovers() if "tc filter" in x]
        assert cleanup_stale() == []
        assert [x for x in kernel.leftovers() if "tc filter" in x] == before
        assert routing.routing_present()
        assert call(a, b.ipv4, 8080, timeout_s=1) == "TIMEOUT"  # still enforcing: deny-all egress


def test_load_failure_raises_bpf_load_error() -> None:
    """A program the kernel refuses (here: a zero-sized conntrack map) raises BpfLoadError and leaves nothing."""
    from membrane.bpf.errors import BpfLoadError

    with pytest.raises(BpfLoadError), Steering(defines={"MBR_CT_SIZE": 0}):
        pass
    kernel.assert_clean()  # bcc leaks the maps created before the failing one; load_bpf closes them
