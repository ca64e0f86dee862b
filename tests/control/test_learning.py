"""Learning toFQDNs names off the event loop: the agent's Learn hook, the worker's, and their one control channel.

| case | expected |
|---|---|
| a new name | the hook returns an awaitable, done only once a recompile holding the name is in force |
| names learned while a recompile is queued | they join it: one recompile for all |
| a name the policy in force holds | None: nothing to wait for |
| a slow kernel write | the event loop keeps running meanwhile |
| control socket: lines split anywhere, a bad line | every good message arrives once, in order; the bad one is skipped |
| worker: ack / no ack | the held answer is released on the ack, or after the timeout |
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvloop
from membrane.control.agent import Agent, AgentConfig, covers
from membrane.control.plan import KernelPlan
from membrane.control.reconciler import Applied
from membrane.control.state import NodeState
from membrane.control.workers import ControlChannel, WorkerLearner, split_json_lines
from membrane.policies import Endpoints, PolicyMap
from membrane.proxy.session import Learn

EMPTY_LIST = "apiVersion: v1\nkind: List\nitems: []\n"


class FakeReconciler:
    """Stands in for the kernel: records what it was asked to apply, slowly, on the calling (kernel) thread."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.applied: list[PolicyMap] = []
        self.threads: set[str] = set()

    def apply(self, pmap: PolicyMap, endpoints: Endpoints, endpoint_ids: dict[str, int]) -> Applied:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        self.applied.append(pmap)
        plan = KernelPlan(identities={}, ingress={}, egress={}, endpoints={}, redirect_ports=frozenset())
        return Applied(plan=plan, attached={}, waiting={}, warnings=())


def _agent(tmp_path: Path, reconciler: FakeReconciler) -> Agent:
    pol = tmp_path / "none.yaml"
    pol.write_text(EMPTY_LIST)
    eps = tmp_path / "endpoints.yaml"
    eps.write_text("endpoints: []\n")
    agent = Agent(AgentConfig(policies=(str(pol),), endpoints=str(eps), status_path=tmp_path / "status.json"))
    for change in agent.source.snapshot():
        agent.state.apply(change)
    agent.reconciler = reconciler  # type: ignore[assignment]
    return agent


def _learn(name: str, ip: str) -> Learn:
    return Learn(names=(name,), ips=(ip,), ttl_s=60.0)


def test_new_names_wait_for_one_recompile_off_the_loop(tmp_path: Path) -> None:
    """Two new names learned together are pushed by one recompile on the kernel thread; both answers wait for it,
    the loop keeps running during the slow kernel write, and a name already in force needs no wait."""
    reconciler = FakeReconciler(delay_s=0.3)
    agent = _agent(tmp_path, reconciler)

    async def main() -> None:
        first = agent.learn(_learn("a.test.", "192.0.2.1"))
        second = agent.learn(_learn("b.test.", "192.0.2.2"))
        assert first is not None
        assert second is not None
        ticks = 0
        while not (first.done() and second.done()):  # type: ignore[attr-defined]
            ticks += 1
            await asyncio.sleep(0.01)
        assert ticks >= 10  # the loop ran while the kernel thread slept 0.3 s
        assert len(reconciler.applied) == 1
        assert agent.state.compiled_learned == {"a.test.": frozenset({"192.0.2.1"}), "b.test.": frozenset({"192.0.2.2"})}
        assert agent.state.live is not None
        assert agent.state.live.pmap is reconciler.applied[0]
        assert agent.learn(_learn("a.test.", "192.0.2.1")) is None
        assert reconciler.threads == {"mbr-kernel_0"}

    try:
        uvloop.run(main())
    finally:
        agent._kx.shutdown(wait=True)


def test_name_learned_during_a_recompile_waits_for_the_next(tmp_path: Path) -> None:
    """A name that arrives after a recompile captured its inputs is not covered by it: it waits for the next one."""
    reconciler = FakeReconciler(delay_s=0.2)
    agent = _agent(tmp_path, reconciler)

    async def main() -> None:
        first = agent.learn(_learn("a.test.", "192.0.2.1"))
        while agent._running is None:
            await asyncio.sleep(0.005)
        late = agent.learn(_learn("c.test.", "192.0.2.3"))
        again = agent.learn(_learn("a.test.", "192.0.2.1"))  # captured by the running one: waits for it only
        assert first is not None
        assert late is not None
        assert again is not None
        await again
        assert len(reconciler.applied) == 1
        await late
        assert len(reconciler.applied) == 2
        assert "c.test." in agent.state.compiled_learned

    try:
        uvloop.run(main())
    finally:
        agent._kx.shutdown(wait=True)


def test_covers_compares_canonical_names_and_addresses() -> None:
    """`covers` reads names and IPs the way the FQDN cache stores them (lower case + dot, canonical IP text)."""
    learned = {"a.test.": frozenset({"2001:db8::1", "192.0.2.1"})}
    assert covers(learned, Learn(names=("A.Test",), ips=("2001:DB8:0::1",), ttl_s=1))
    assert not covers(learned, Learn(names=("a.test.",), ips=("192.0.2.9",), ttl_s=1))
    assert not covers(learned, Learn(names=("b.test.",), ips=("192.0.2.1",), ttl_s=1))


def test_control_channel_delivers_split_lines_in_order_and_skips_bad_ones() -> None:
    """Both ends use one ControlChannel: messages split at any byte arrive whole and in order; a non-JSON line is skipped."""
    got: list[dict[str, Any]] = []

    async def main() -> None:
        a, b = socket.socketpair()
        receiver = ControlChannel(b, got.append)
        receiver.start()
        data = b'{"type": "ready"}\nnot json\n{"type": "ack", "id": 7}\n'
        for i in range(len(data)):
            a.send(data[i : i + 1])
            await asyncio.sleep(0)
        sender = ControlChannel(a, lambda m: None)
        sender.send({"type": "policy", "learned": {}})
        sender.close()
        await asyncio.wait_for(receiver.closed.wait(), 5)
        receiver.close()

    uvloop.run(main())
    assert got == [{"type": "ready"}, {"type": "ack", "id": 7}, {"type": "policy", "learned": {}}]


def test_split_json_lines_keeps_the_unfinished_tail() -> None:
    """The part after the last newline is returned as the tail, not parsed."""
    assert split_json_lines(b'{"a"', b': 1}\n{"b": ') == (b'{"b": ', [{"a": 1}])


def test_worker_learner_waits_for_the_ack_or_the_timeout() -> None:
    """A worker's new name is sent with an id and its answer waits for that id's ack; without an ack it goes on after
    the timeout; a name the worker already reported needs no wait."""
    sent: list[dict[str, Any]] = []

    class Channel:
        def send(self, msg: dict[str, Any]) -> None:
            sent.append(msg)

    async def main() -> None:
        learner = WorkerLearner(Channel(), NodeState(), timeout_s=0.2)  # type: ignore[arg-type]
        waiting = learner(_learn("a.test.", "192.0.2.1"))
        assert waiting is not None
        task = asyncio.ensure_future(waiting)
        await asyncio.sleep(0)
        assert not task.done()
        learner.acked(sent[0]["id"])
        await asyncio.wait_for(task, 1)
        assert learner(_learn("a.test.", "192.0.2.1")) is None
        slow = learner(_learn("b.test.", "192.0.2.2"))
        assert slow is not None
        await asyncio.wait_for(slow, 2)  # released by the timeout, not by an ack
        assert [m["names"] for m in sent] == [["a.test."], ["b.test."]]

    uvloop.run(main())
