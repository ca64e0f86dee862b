"""The chained CNI plugin `membrane-cni` (CNI spec 1.0) and the agent side of its calls.

| case                                   | expected                                            |
|----------------------------------------|-----------------------------------------------------|
| VERSION                                | supported versions, exit 0                          |
| ADD with an agent that attaches        | prevResult printed unchanged, agent saw veth + IPs  |
| ADD, no agent                          | error code 11 (try again later), exit 1             |
| ADD, agent refuses                     | the agent's message, code 100                       |
| DEL, no agent                          | exit 0, queued once however often repeated          |
| malformed stdin / version / env        | codes 6 / 1 / 4, naming what is wrong               |
| ADD without prevResult                 | code 7: a chained plugin needs its predecessor      |
| real ptp / bridge + host-local chains  | the agent is told the pod's host-side veth          |
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from membrane.control.api import AgentRunning, AgentSocket
from membrane.control.cni import (
    CniCall,
    CniCode,
    CniError,
    Command,
    DelQueue,
    host_interface,
    parse_cni_args,
    pod_of,
    result_ips,
)
from membrane.sandbox.cni_runtime import DEBIAN_CNI_PATH, CniPluginError, CniRuntime, NetworkList

PLUGIN = Path(sys.executable).with_name("membrane-cni")
PTP_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "vethabc", "mac": "aa:bb:cc:dd:ee:01"}, {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/x"}],
    "ips": [{"interface": 1, "address": "10.244.7.2/24", "gateway": "10.244.7.1"}],
    "dns": {},
}


# --- pure parts -------------------------------------------------------------------------------------


def test_cni_args_split_into_pairs() -> None:
    """CNI_ARGS is "K=V;K=V" (SPEC.md §Parameters); the Kubernetes keys name the pod."""
    args = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1")
    assert args["IgnoreUnknown"] == "1"
    assert pod_of(args) == "shop/cart-1"
    assert pod_of({}) is None


def test_cni_args_without_equals_is_an_environment_error() -> None:
    """A pair without '=' cannot be understood: error code 4 naming the pair."""
    with pytest.raises(CniError) as e:
        parse_cni_args("IgnoreUnknown=1;garbage")
    assert e.value.code is CniCode.INVALID_ENVIRONMENT
    assert "garbage" in e.value.msg


def test_host_interface_of_a_ptp_result_is_its_host_veth() -> None:
    """ptp lists the host veth (no sandbox) and the pod's eth0 (sandbox): the veth is the one."""
    assert host_interface(PTP_RESULT, is_bridge=lambda n: False) == "vethabc"


def test_host_interface_of_a_bridge_result_skips_the_bridge() -> None:
    """bridge lists the bridge, the host veth and eth0: the bridge is not the pod's interface."""
    result = {"interfaces": [{"name": "cni0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/x"}]}
    assert host_interface(result, is_bridge=lambda n: n == "cni0") == "veth1"


@pytest.mark.parametrize("interfaces", [[], [{"name": "eth0", "sandbox": "/x"}], [{"name": "a"}, {"name": "b"}]])
def test_host_interface_must_be_unambiguous(interfaces: list[dict[str, str]]) -> None:
    """No or several candidate interfaces: the agent cannot know which to enforce on (code 7)."""
    with pytest.raises(CniError) as e:
        host_interface({"interfaces": interfaces}, is_bridge=lambda n: False)
    assert e.value.code is CniCode.INVALID_CONFIG


def test_result_ips_drop_the_prefix_and_reject_garbage() -> None:
    """Addresses come from prevResult.ips[].address; a malformed one names its index."""
    assert result_ips(PTP_RESULT) == ("10.244.7.2",)
    with pytest.raises(CniError, match=r"ips\[0\]"):
        result_ips({"ips": [{"address": "not-an-ip"}]})


def test_wire_form_round_trips_and_names_bad_fields() -> None:
    """What the plugin sends is what the agent reads; a bad field is a decode error naming it."""
    call = CniCall(command=Command.ADD, container_id="c1", netns="/n", ifname="eth0", pod="a/b",
                   host_interface="veth1", ips=("10.0.0.1",))
    assert CniCall.from_wire(call.to_wire()) == call
    with pytest.raises(CniError, match="ips"):
        CniCall.from_wire({**call.to_wire(), "ips": "10.0.0.1"})
    with pytest.raises(CniError, match="command"):
        CniCall.from_wire({**call.to_wire(), "command": "NUKE"})


def test_del_queue_is_idempotent_and_drains_once(tmp_path: Path) -> None:
    """The same DEL queued twice is one entry; draining hands it out once and removes it."""
    q = DelQueue(tmp_path / "q")
    call = CniCall(command=Command.DEL, container_id="c1", netns="", ifname="eth0", pod=None, host_interface=None, ips=())
    q.put(call)
    q.put(call)
    assert len(list((tmp_path / "q").glob("*.json"))) == 1
    assert list(q.drain()) == [call]
    assert list(q.drain()) == []


# --- the plugin as a runtime runs it ------------------------------------------------------------------


class FakeAgent:
    """An AgentSocket on a thread whose "cni" handler records calls and answers `answer`."""

    def __init__(self, path: Path, answer: dict[str, Any]) -> None:
        self.path = path
        self.answer = answer
        self.calls: list[CniCall] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._socket = AgentSocket(path, {"cni": self._cni})

    async def _cni(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(CniCall.from_wire(msg))
        return self.answer

    def __enter__(self) -> FakeAgent:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._socket.start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._socket.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "agent.sock"


def _config(sock: Path, tmp_path: Path, prev: dict[str, Any] | None = PTP_RESULT, version: str = "1.0.0") -> dict[str, Any]:
    conf: dict[str, Any] = {"cniVersion": version, "name": "k8s", "type": "membrane-cni", "agentSocket": str(sock),
                            "queueDir": str(tmp_path / "queue"), "timeoutSeconds": 5}
    if prev is not None:
        conf["prevResult"] = prev
    return conf


def _plugin(command: str, stdin: str, **env: str) -> tuple[int, dict[str, Any] | None]:
    base = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0",
            "CNI_PATH": "/usr/lib/cni", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"}
    environ = {k: v for k, v in {**os.environ, **base, **env}.items() if v != "<unset>"}
    proc = subprocess.run([str(PLUGIN)], input=stdin, capture_output=True, text=True, env=environ, timeout=30)
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else None)


def test_version_lists_the_supported_spec_versions() -> None:
    """VERSION answers without config (SPEC.md §VERSION)."""
    rc, out = _plugin("VERSION", "")
    assert rc == 0
    assert out is not None
    assert "1.0.0" in out["supportedVersions"]


def test_add_passes_prev_result_through_once_the_agent_answers(sock: Path, tmp_path: Path) -> None:
    """ADD prints prevResult unchanged and has told the agent the pod, its veth and its IPs."""
    with FakeAgent(sock, {"ok": True}) as agent:
        rc, out = _plugin("ADD", json.dumps(_config(sock, tmp_path)))
    assert rc == 0, out
    assert out == PTP_RESULT
    (call,) = agent.calls
    assert call.command is Command.ADD
    assert call.pod == "default/web"
    assert call.host_interface == "vethabc"
    assert call.ips == ("10.244.7.2",)


def test_add_answers_in_the_callers_cni_version(sock: Path, tmp_path: Path) -> None:
    """A 0.4.0 caller gets its result back labelled 0.4.0."""
    with FakeAgent(sock, {"ok": True}):
        rc, out = _plugin("ADD", json.dumps(_config(sock, tmp_path, version="0.4.0")))
    assert rc == 0
    assert out is not None
    assert out["cniVersion"] == "0.4.0"


def test_add_without_an_agent_asks_to_try_again(sock: Path, tmp_path: Path) -> None:
    """No agent: the pod must not start unjudged, so ADD fails with code 11."""
    rc, out = _plugin("ADD", json.dumps(_config(sock, tmp_path)))
    assert rc == 1
    assert out is not None
    assert out["code"] == CniCode.TRY_AGAIN_LATER
    assert str(sock) in out["msg"]


def test_add_refused_by_the_agent_carries_its_message(sock: Path, tmp_path: Path) -> None:
    """The agent's refusal reaches the runtime verbatim."""
    with FakeAgent(sock, {"ok": False, "code": 100, "msg": "interface vethabc not found"}):
        rc, out = _plugin("ADD", json.dumps(_config(sock, tmp_path)))
    assert rc == 1
    assert out is not None
    assert out["code"] == 100
    assert out["msg"] == "interface vethabc not found"


def test_del_without_an_agent_is_queued_and_succeeds(sock: Path, tmp_path: Path) -> None:
    """DEL must succeed (SPEC.md §DEL); with no agent it is queued for the next one, once."""
    for _ in range(2):
        rc, out = _plugin("DEL", json.dumps(_config(sock, tmp_path, prev=None)), CNI_NETNS="<unset>")
        assert rc == 0, out
    (queued,) = DelQueue(tmp_path / "queue").drain()
    assert queued.command is Command.DEL
    assert queued.container_id == "c1"


def test_del_with_an_agent_is_not_queued(sock: Path, tmp_path: Path) -> None:
    """An agent that answers takes the DEL itself."""
    with FakeAgent(sock, {"ok": True}) as agent:
        rc, _ = _plugin("DEL", json.dumps(_config(sock, tmp_path)))
    assert rc == 0
    assert [c.command for c in agent.calls] == [Command.DEL]
    assert list(DelQueue(tmp_path / "queue").drain()) == []


@pytest.mark.parametrize(("stdin", "env", "code", "words"), [
    ("{not json", {}, CniCode.DECODE_FAILURE, "not JSON"),
    (json.dumps({"cniVersion": "9.9.9", "name": "n", "type": "membrane-cni"}), {}, CniCode.INCOMPATIBLE_VERSION, "9.9.9"),
    (json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "membrane-cni", "prevResult": PTP_RESULT}),
     {"CNI_CONTAINERID": ""}, CniCode.INVALID_ENVIRONMENT, "CNI_CONTAINERID"),
    (json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "membrane-cni"}), {}, CniCode.INVALID_CONFIG, "prevResult"),
])
def test_bad_input_gets_the_spec_error_naming_it(stdin: str, env: dict[str, str], code: CniCode, words: str) -> None:
    """Each malformed call gets the spec's error object with a message naming what is wrong."""
    rc, out = _plugin("ADD", stdin, **env)
    assert rc == 1
    assert out is not None
    assert out["code"] == code
    assert words in out["msg"]


def test_only_one_agent_listens(sock: Path) -> None:
    """A second AgentSocket on a live path refuses; a dead agent's socket file is taken over."""
    with FakeAgent(sock, {"ok": True}):
        second = AgentSocket(sock, {})
        with pytest.raises(AgentRunning):
            asyncio.run(second.start())
    assert not sock.exists()  # closed cleanly
    sock.touch()  # a socket file nobody listens on (a killed agent's)
    with FakeAgent(sock, {"ok": True}):
        assert sock.exists()


# --- real plugins into real network namespaces (root) -------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


@pytest.fixture
def netns_name() -> Iterator[str]:
    name = f"mbrcni{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _chain(first: dict[str, Any], tmp_path: Path, sock: Path) -> NetworkList:
    return NetworkList.parse({
        "cniVersion": "1.0.0",
        "name": f"mbrtest{secrets.token_hex(2)}",
        "plugins": [first, {"type": "membrane-cni", "agentSocket": str(sock), "queueDir": str(tmp_path / "queue")}],
    })


def _ipam(tmp_path: Path, subnet: str) -> dict[str, Any]:
    return {"type": "host-local", "subnet": subnet, "dataDir": str(tmp_path / "ipam")}


@pytest.mark.integration
@needs_root
@pytest.mark.parametrize("kind", ["ptp", "bridge"])
def test_real_chain_tells_the_agent_the_pods_host_veth(kind: str, netns_name: str, tmp_path: Path, sock: Path) -> None:
    """Debian's ptp/bridge + host-local, then membrane-cni, run as a runtime does: the agent learns the
    host-side veth that carries the pod's traffic; DEL in reverse removes it; a second DEL succeeds."""
    bridge = f"mbrbr{secrets.token_hex(2)}"
    first: dict[str, Any] = {"type": kind, "ipMasq": False, "ipam": _ipam(tmp_path, "10.244.201.0/24")}
    if kind == "bridge":
        first.update(bridge=bridge, isGateway=True)
    net = _chain(first, tmp_path, sock)
    runtime = CniRuntime([DEBIAN_CNI_PATH, PLUGIN.parent], tmp_path / "cache")
    netns = f"/var/run/netns/{netns_name}"
    args = {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web"}
    try:
        with FakeAgent(sock, {"ok": True}) as agent:
            result = runtime.add(net, "c1", netns, "eth0", args)
            (call,) = agent.calls
            assert call.pod == "default/web"
            assert call.host_interface is not None
            assert call.host_interface != bridge
            assert Path("/sys/class/net", call.host_interface).exists()
            pod_ip = call.ips[0]
            assert pod_ip.startswith("10.244.201.")
            assert result["ips"][0]["address"].startswith(pod_ip + "/")
            if kind == "bridge":
                assert Path("/sys/class/net", call.host_interface, "master").resolve().name == bridge
            else:
                route = subprocess.run(["ip", "route", "get", pod_ip], capture_output=True, text=True, check=True).stdout
                assert f"dev {call.host_interface}" in route
            runtime.delete(net, "c1", netns, "eth0", args)
            assert not Path("/sys/class/net", call.host_interface).exists()
            assert [c.command for c in agent.calls] == [Command.ADD, Command.DEL]
        runtime.delete(net, "c1", netns, "eth0", args)  # idempotent, agent gone: queued, still success
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)


@pytest.mark.integration
@needs_root
def test_real_chain_add_fails_and_rolls_back_without_an_agent(netns_name: str, tmp_path: Path, sock: Path) -> None:
    """With no agent, ADD fails (code 11) and the runtime's rollback DEL removes the veth ptp made."""
    net = _chain({"type": "ptp", "ipMasq": False, "ipam": _ipam(tmp_path, "10.244.202.0/24")}, tmp_path, sock)
    runtime = CniRuntime([DEBIAN_CNI_PATH, PLUGIN.parent], tmp_path / "cache")
    before = set(os.listdir("/sys/class/net"))
    with pytest.raises(CniPluginError) as e:
        runtime.add(net, "c2", f"/var/run/netns/{netns_name}")
    assert e.value.plugin == "membrane-cni"
    assert e.value.error["code"] == CniCode.TRY_AGAIN_LATER
    assert set(os.listdir("/sys/class/net")) == before


@pytest.mark.integration
@needs_root
@pytest.mark.parametrize("kind", ["ptp", "bridge"])
def test_resolver_finds_the_pod_veth_from_its_ip(kind: str, netns_name: str, tmp_path: Path, sock: Path) -> None:
    """Without the plugin's word, the resolver finds the same veth: the route (ptp) or the bridge's
    neighbour + forwarding tables (bridge, once the pod has spoken); an unknown IP gives None."""
    from membrane.control.interfaces import InterfaceResolver

    bridge = f"mbrbr{secrets.token_hex(2)}"
    first: dict[str, Any] = {"type": kind, "ipMasq": False, "ipam": _ipam(tmp_path, "10.244.203.0/24")}
    if kind == "bridge":
        first.update(bridge=bridge, isGateway=True)
    net = _chain(first, tmp_path, sock)
    runtime = CniRuntime([DEBIAN_CNI_PATH, PLUGIN.parent], tmp_path / "cache")
    netns = f"/var/run/netns/{netns_name}"
    try:
        with FakeAgent(sock, {"ok": True}) as agent:
            result = runtime.add(net, "c3", netns)
        told = agent.calls[0].host_interface
        pod_ip = result["ips"][0]["address"].split("/")[0]
        gateway = result["ips"][0]["gateway"]
        # the pod speaks once (to its gateway, the host), so a bridge learns its MAC and address
        speak = f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{gateway}', 9))"
        subprocess.run(["ip", "netns", "exec", netns_name, sys.executable, "-c", speak], capture_output=True, check=True)
        with InterfaceResolver() as resolver:
            assert resolver.resolve(pod_ip) == told
            assert resolver.resolve("10.244.203.250") is None
        runtime.delete(net, "c3", netns)
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
