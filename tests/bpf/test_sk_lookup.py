"""The sk_lookup link that lets a pod reuse a tuple the proxy closed first (bpf/steer.py steer_time_wait):
attached to the host netns, pinned in the pin directory, replaced in place by the next Steering,
removed by close() or uninstall(). The traffic itself: tests/integration/test_agent_timewait.py.
Root only, under the kernel lock."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from membrane.bpf.maps import ConfigSlot
from membrane.bpf.stale import uninstall
from membrane.bpf.steer import SK_LOOKUP_LINK_PIN, ProxyPorts, Steering

from tests.helpers import kernel

IP_TRANSPARENT = 19


def sk_lookup_links() -> dict[int, int]:
    """Every sk_lookup link of the kernel whose program is ours: link id -> program id."""
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    links = json.loads(out or "[]")
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                                      check=True).stdout or "[]")
    names = {int(p["id"]): str(p.get("name", "")) for p in progs}
    return {int(link["id"]): int(link["prog_id"]) for link in links
            if link.get("attach_type") == "sk_lookup" and names.get(int(link["prog_id"])) == "mbr_sk_lookup"}


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    with s:
        yield s


def test_without_a_pin_directory_the_link_lives_as_long_as_the_steering(listener: socket.socket) -> None:
    before = sk_lookup_links()
    port = listener.getsockname()[1]
    with Steering(proxy_ports=ProxyPorts(tcp4=port), with_routing=False) as st:
        assert st.maps.config(ConfigSlot.TW_STEER) == 0  # off until the program is attached
        st.steer_time_wait([listener])
        assert st.maps.config(ConfigSlot.TW_STEER) == 1
        assert len(sk_lookup_links()) == len(before) + 1
    assert sk_lookup_links() == before
    kernel.assert_clean()


def test_the_pinned_link_is_replaced_in_place_and_uninstall_removes_it(listener: socket.socket, pin_dir: Path) -> None:
    port = listener.getsockname()[1]
    before = sk_lookup_links()
    first = Steering(proxy_ports=ProxyPorts(tcp4=port), with_routing=False, pin_dir=pin_dir).__enter__()
    try:
        first.steer_time_wait([listener])
        (link_id, first_prog), = set(sk_lookup_links().items()) - set(before.items())
        assert (pin_dir / SK_LOOKUP_LINK_PIN).exists()
        second = Steering(proxy_ports=ProxyPorts(tcp4=port), with_routing=False, pin_dir=pin_dir).__enter__()
        try:
            second.steer_time_wait([listener])
            now = sk_lookup_links()
            assert link_id in now and now[link_id] != first_prog  # the same link, the new program
            assert len(now) == len(before) + 1  # never two
            first.close(keep=False)  # the predecessor goes: the successor's link stays pinned
            assert (pin_dir / SK_LOOKUP_LINK_PIN).exists()
            assert sk_lookup_links()[link_id] == now[link_id]
        finally:
            second.close(keep=True)  # SIGTERM: the link stays with the rest of the kernel state
        assert link_id in sk_lookup_links()
    finally:
        first.close(keep=False)
    removed = uninstall(pin_dir)
    assert any(SK_LOOKUP_LINK_PIN in r for r in removed), removed
    assert link_id not in sk_lookup_links()
    kernel.assert_clean()


def test_close_without_keep_unpins_its_own_link(listener: socket.socket, pin_dir: Path) -> None:
    port = listener.getsockname()[1]
    with Steering(proxy_ports=ProxyPorts(tcp4=port), with_routing=False, pin_dir=pin_dir) as st:
        st.steer_time_wait([listener])
        assert (pin_dir / SK_LOOKUP_LINK_PIN).exists()
    assert not (pin_dir / SK_LOOKUP_LINK_PIN).exists()
    assert not any(prog for prog in sk_lookup_links().values())
    kernel.assert_clean()
