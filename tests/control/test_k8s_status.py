"""The policy status writer against the API server double: conditions, Events, the Lease, no write storms.

| situation                                          | what the cluster shows                                   |
|----------------------------------------------------|----------------------------------------------------------|
| an invalid CNP, a valid CNP                        | membrane.io/Valid False + one Warning Event; True        |
| the invalid CNP fixed (generation 2)               | True, observedGeneration 2, lastTransitionTime moved     |
| nothing changed, rounds repeated                   | no request at all (renewal aside, when due)              |
| two agents                                         | only the lease holder writes                             |
| the holder stops renewing / releases               | the other takes over after the duration / at once        |
| Cilium's `Valid` condition already there           | kept, in place, through every write                      |
| the object changed between read and write (409)    | re-read, merged, written                                 |
| an invalid CCNP                                    | condition + Event (in `default`, as client-go puts them) |
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from membrane.control.k8s_status import (
    CONDITION_TYPE,
    MAX_CONDITION_MESSAGE,
    PolicyObject,
    PolicyRef,
    PolicyStatusWriter,
    WantedCondition,
    bounded,
    error_ref,
    errors_by_policy,
    is_current,
    merged_conditions,
    policy_objects,
    summarize,
    wanted_condition,
)
from membrane.control.sources.kubernetes import KubernetesSource, client_from
from membrane.policies.errors import PolicyConflictError, PolicyValidationError
from membrane.sandbox.apiserver import ApiServerThread
from membrane.sandbox.apiserver.server import RequestRecord

from tests.sandbox.conftest import Kubectl

NODE_A, NODE_B = "node-a", "node-b"
T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
WRITES = ("PATCH", "POST", "PUT", "DELETE")


class Clock:
    """Injected time: a monotonic clock and a wall clock that move together, only when told."""

    def __init__(self) -> None:
        self.t = 1000.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> dt.datetime:
        return T0 + dt.timedelta(seconds=self.t - 1000.0)

    def advance(self, seconds: float) -> None:
        self.t += seconds


def _cnp(name: str, *, ns: str = "default", valid: bool = True, status: dict[str, Any] | None = None) -> dict[str, Any]:
    port = "80" if valid else "eighty"
    obj: dict[str, Any] = {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": name, "namespace": ns},
        "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                              "toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}]}}
    if status is not None:
        obj["status"] = status
    return obj


def _ccnp(name: str, *, valid: bool = True) -> dict[str, Any]:
    obj = _cnp(name, valid=valid)
    obj["kind"] = "CiliumClusterwideNetworkPolicy"
    del obj["metadata"]["namespace"]
    return obj


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServerThread]:
    with ApiServerThread(state_dir=tmp_path / "api", bookmark_interval_s=0.2, history_size=500) as server:
        yield server


def put(api: ApiServerThread, *objs: dict[str, Any]) -> None:
    for obj in objs:
        api.call(lambda s, o=obj: s.store.put(o))  # type: ignore[misc]


def stored(api: ApiServerThread, plural: str, ns: str, name: str, group: str = "cilium.io") -> dict[str, Any]:
    rt = api.store_type(group, plural)
    obj: dict[str, Any] = api.call(lambda s: s.store.get(rt, ns, name))
    return obj


def cnp(api: ApiServerThread, name: str, ns: str = "default") -> dict[str, Any]:
    return stored(api, "ciliumnetworkpolicies", ns, name)


def ours(obj: dict[str, Any]) -> dict[str, Any]:
    (cond,) = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == CONDITION_TYPE]
    assert isinstance(cond, dict)
    return cond


def events_for(api: ApiServerThread, name: str) -> list[dict[str, Any]]:
    rt = api.store_type("", "events")
    items: list[dict[str, Any]] = api.call(lambda s: s.store.objects(rt))
    return [e for e in items if e["involvedObject"]["name"] == name]


def requests(api: ApiServerThread) -> list[RequestRecord]:
    return api.call(lambda s: list(s.requests))


def writes_since(api: ApiServerThread, mark: int) -> list[RequestRecord]:
    return [r for r in requests(api)[mark:] if r.method in WRITES]


class Agent:
    """One agent's Kubernetes source and status writer, sharing one client, on injected time."""

    def __init__(self, api: ApiServerThread, node: str, clock: Clock, lease_namespace: str = "kube-system") -> None:
        self.client = client_from(api.kubeconfig)
        self.source = KubernetesSource(self.client, node, lambda: None)
        self.writer = PolicyStatusWriter(self.client, node_name=node, lease_namespace=lease_namespace,
                                         monotonic=clock.mono, wall=clock.wall)

    async def __aenter__(self) -> Agent:
        await self.source.start()
        await self.source.wait_synced(15)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.source.stop()
        await self.client.close()

    def submit(self) -> None:
        self.writer.submit(policy_objects(self.source), self.source.view().policy_errors)

    async def round(self) -> int:
        self.submit()
        return await self.writer.step()

    async def until(self, predicate: Callable[[tuple[PolicyObject, ...]], bool], timeout_s: float = 15.0) -> None:
        """Waits until the source's mirror satisfies predicate (the watch delivered what was written)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate(policy_objects(self.source)):
            if loop.time() > deadline:
                raise AssertionError(f"mirror not converged: {policy_objects(self.source)}")
            await asyncio.sleep(0.02)

    async def caught_up(self, api: ApiServerThread) -> None:
        """Waits until the mirror holds the server's current version of every policy object."""
        def now_stored() -> dict[str, str]:
            out = {}
            for plural in ("ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"):
                rt = api.store_type("cilium.io", plural)
                for o in api.call(lambda s, rt=rt: s.store.objects(rt)):  # type: ignore[misc]
                    out[str(o["metadata"]["name"])] = str(o["metadata"]["resourceVersion"])
            return out
        want = now_stored()
        await self.until(lambda objs: {o.ref.name: o.resource_version for o in objs} == want)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())  # type: ignore[arg-type]


# --- against the double --------------------------------------------------------------------------------------


def test_invalid_cnp_gets_false_condition_and_one_event(api: ApiServerThread) -> None:
    """An invalid CNP gets membrane.io/Valid=False (reason, message, generation, time) and exactly one
    Warning Event from membrane-agent; a valid one gets True; repeated rounds add no second Event."""
    put(api, _cnp("bad", valid=False), _cnp("good"))
    clock = Clock()

    async def body() -> None:
        async with Agent(api, NODE_A, clock) as agent:
            assert await agent.round() == 3  # two conditions, one Event
            await agent.caught_up(api)
            for _ in range(3):
                clock.advance(1)
                assert await agent.round() == 0

    run(body)
    bad = ours(cnp(api, "bad"))
    assert bad["status"] == "False"
    assert bad["reason"] == "InvalidPolicy"
    assert "spec.ingress[0].toPorts[0].ports[0].port" in bad["message"]
    assert bad["observedGeneration"] == 1
    assert bad["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    good = ours(cnp(api, "good"))
    assert (good["status"], good["reason"]) == ("True", "Valid")
    (event,) = events_for(api, "bad")
    assert event["type"] == "Warning"
    assert event["reason"] == "PolicyInvalid"
    assert event["source"]["component"] == "membrane-agent"
    assert event["involvedObject"]["kind"] == "CiliumNetworkPolicy"
    assert event["involvedObject"]["uid"] == cnp(api, "bad")["metadata"]["uid"]
    assert event["count"] == 1
    assert "port" in event["message"]
    assert events_for(api, "good") == []


def test_fixed_policy_flips_to_true(api: ApiServerThread) -> None:
    """Fixing the spec (generation 2) turns the condition True, with the new generation and a new
    transition time; breaking it again with the same message is a new generation, so a new Event."""
    put(api, _cnp("p", valid=False))
    clock = Clock()

    async def body() -> None:
        async with Agent(api, NODE_A, clock) as agent:
            await agent.round()
            put(api, _cnp("p", valid=True))
            await agent.until(lambda objs: objs[0].generation == 2)
            clock.advance(60)
            assert await agent.round() == 1
            put(api, _cnp("p", valid=False))
            await agent.until(lambda objs: objs[0].generation == 3)
            clock.advance(60)
            assert await agent.round() == 2  # the condition and a second Event (generation 3)

    run(body)
    cond = ours(cnp(api, "p"))
    assert cond["status"] == "False"
    assert cond["observedGeneration"] == 3
    assert cond["lastTransitionTime"] == "2026-01-01T12:02:00Z"
    assert len(events_for(api, "p")) == 2


def test_fixed_policy_condition_is_true(api: ApiServerThread) -> None:
    """After the fix alone the condition is True/Valid at generation 2, transitioned when it was fixed."""
    put(api, _cnp("p", valid=False))
    clock = Clock()

    async def body() -> None:
        async with Agent(api, NODE_A, clock) as agent:
            await agent.round()
            put(api, _cnp("p", valid=True))
            await agent.until(lambda objs: objs[0].generation == 2)
            clock.advance(30)
            await agent.round()

    run(body)
    cond = ours(cnp(api, "p"))
    assert (cond["status"], cond["reason"]) == ("True", "Valid")
    assert cond["observedGeneration"] == 2
    assert cond["lastTransitionTime"] == "2026-01-01T12:00:30Z"


def test_no_request_when_nothing_changed(api: ApiServerThread) -> None:
    """Once written, rounds within the renew interval send nothing; a due renewal is one PUT of the Lease;
    a round before the watch delivered our own write (stale mirror) writes nothing either."""
    put(api, _cnp("bad", valid=False), _cnp("good"))
    clock = Clock()

    async def body() -> None:
        async with Agent(api, NODE_A, clock) as agent:
            await agent.round()
            mark = len(requests(api))
            await agent.round()  # the mirror may still hold the pre-write versions: nothing is rewritten
            assert writes_since(api, mark) == []
            await agent.caught_up(api)
            mark = len(requests(api))
            for _ in range(4):
                clock.advance(1)
                await agent.round()
            assert requests(api)[mark:] == []
            clock.advance(agent.writer.renew_interval_s)
            await agent.round()
            renewals = writes_since(api, mark)
            assert [(r.method, r.target.split("?")[0]) for r in renewals] == [
                ("PUT", "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/membrane-policy-status")]

    run(body)


def test_only_the_lease_holder_writes(api: ApiServerThread) -> None:
    """Two agents: the first to take the Lease writes; the other sends no write while it is held."""
    put(api, _cnp("bad", valid=False))
    clock_a, clock_b = Clock(), Clock()

    async def body() -> None:
        async with Agent(api, NODE_A, clock_a) as a, Agent(api, NODE_B, clock_b) as b:
            assert await a.round() == 2
            put(api, _cnp("bad2", valid=False))
            await b.until(lambda objs: len(objs) == 2)
            for _ in range(5):
                mark = len(requests(api))
                clock_b.advance(3)
                assert await b.round() == 0
                assert writes_since(api, mark) == []
                assert not b.writer.is_holder
            assert events_for(api, "bad2") == []
            await a.until(lambda objs: len(objs) == 2)
            assert await a.round() == 2

    run(body)
    lease = stored(api, "leases", "kube-system", "membrane-policy-status", group="coordination.k8s.io")
    assert lease["spec"]["holderIdentity"] == NODE_A
    assert lease["spec"]["leaseDurationSeconds"] == 15
    assert ours(cnp(api, "bad2"))["status"] == "False"


def test_takeover_after_the_holder_stops_renewing(api: ApiServerThread) -> None:
    """The holder stops renewing (crashed, no release): the other agent takes over once the lease duration
    has passed on its own clock since it last saw the record change, and then writes; the old holder,
    past its renew deadline, writes nothing."""
    put(api, _cnp("bad", valid=False))
    clock_a, clock_b = Clock(), Clock()

    async def body() -> None:
        async with Agent(api, NODE_A, clock_a) as a, Agent(api, NODE_B, clock_b) as b:
            await a.round()
            await b.round()
            assert not b.writer.is_holder
            put(api, _cnp("later", valid=False))
            await b.until(lambda objs: len(objs) == 2)
            clock_b.advance(14)
            assert await b.round() == 0  # 14 s < 15 s: still A's
            clock_b.advance(2)
            assert await b.round() == 2  # condition + Event of "later"
            assert b.writer.is_holder
            clock_a.advance(11)  # past A's renew deadline (10 s): A must not write, and learns it lost
            await a.until(lambda objs: len(objs) == 2)
            mark = len(requests(api))
            assert await a.round() == 0
            assert not a.writer.is_holder
            assert [r.method for r in writes_since(api, mark)] == ["PUT"]  # the refused renewal (409)
            assert requests(api)[-1].method == "GET"  # then it read the lease, saw B, and stopped

    run(body)
    lease = stored(api, "leases", "kube-system", "membrane-policy-status", group="coordination.k8s.io")
    assert lease["spec"]["holderIdentity"] == NODE_B
    assert lease["spec"]["leaseTransitions"] == 1
    assert ours(cnp(api, "later"))["status"] == "False"


def test_release_on_stop_hands_over_at_once(api: ApiServerThread) -> None:
    """A holder that stops releases the lease; the next agent takes it on its next round, no wait."""
    clock_a, clock_b = Clock(), Clock()

    async def body() -> None:
        async with Agent(api, NODE_A, clock_a) as a, Agent(api, NODE_B, clock_b) as b:
            await a.round()
            await b.round()
            assert not b.writer.is_holder
            await a.writer.stop()
            clock_b.advance(2)  # one retry interval, far less than the 15 s lease
            await b.round()
            assert b.writer.is_holder

    run(body)
    lease = stored(api, "leases", "kube-system", "membrane-policy-status", group="coordination.k8s.io")
    assert lease["spec"]["holderIdentity"] == NODE_B


def test_lease_namespace_is_a_parameter(api: ApiServerThread) -> None:
    """The chart's own namespace holds the lease when configured so."""
    put(api, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "membrane"}})
    clock = Clock()

    async def body() -> None:
        async with Agent(api, NODE_A, clock, lease_namespace="membrane") as a:
            await a.round()
            assert a.writer.is_holder

    run(body)
    lease = stored(api, "leases", "membrane", "membrane-policy-status", group="coordination.k8s.io")
    assert lease["spec"]["holderIdentity"] == NODE_A


def test_other_conditions_are_preserved(api: ApiServerThread) -> None:
    """Cilium's `Valid` condition (and any other type) stays, unchanged and in place, through our writes."""
    theirs = {"type": "Valid", "status": "True", "lastTransitionTime": "2025-05-05T05:05:05Z",
              "reason": "ValidPolicy", "message": "Policy validation succeeded"}
    put(api, _cnp("p", valid=False, status={"conditions": [theirs]}))
    clock = Clock()

    async def body() -> None:
        async with Agent(api, NODE_A, clock) as agent:
            await agent.round()
            put(api, _cnp("p", valid=True, status={"conditions": cnp(api, "p")["status"]["conditions"]}))
            await agent.until(lambda objs: objs[0].generation == 2)
            clock.advance(5)
            assert await agent.round() == 1

    run(body)
    conditions = cnp(api, "p")["status"]["conditions"]
    assert conditions[0] == theirs
    assert [c["type"] for c in conditions] == ["Valid", CONDITION_TYPE]
    assert conditions[1]["status"] == "True"


def test_conflict_is_reread_and_retried(api: ApiServerThread) -> None:
    """The object changed after the mirror saw it (the operator wrote its condition): our patch with the
    stale resourceVersion gets 409; the writer reads it again, keeps the new condition, and writes."""
    put(api, _cnp("p", valid=False))
    clock = Clock()
    theirs = {"type": "Valid", "status": "False", "reason": "ValidationError", "message": "from the operator",
              "lastTransitionTime": "2026-01-01T11:00:00Z"}

    async def body() -> None:
        async with Agent(api, NODE_A, clock) as agent:
            agent.submit()  # the writer now holds the object at its first resourceVersion
            rt = api.store_type("cilium.io", "ciliumnetworkpolicies")
            api.call(lambda s: s.store.patch(rt, "default", "p", "application/merge-patch+json",
                                             {"status": {"conditions": [theirs]}}, subresource="status"))
            mark = len(requests(api))
            assert await agent.writer.step() == 2  # condition + Event
            status_calls = [r.status for r in requests(api)[mark:] if r.target.split("?")[0].endswith("/p/status")]
            assert status_calls == [409, 200]
            assert agent.writer.stats.status_conflicts == 1

    run(body)
    conditions = cnp(api, "p")["status"]["conditions"]
    assert conditions[0] == theirs
    assert ours(cnp(api, "p"))["status"] == "False"


def test_invalid_ccnp_gets_condition_and_event(api: ApiServerThread) -> None:
    """A cluster-wide policy is reported the same way; its Event lives in `default`."""
    put(api, _ccnp("wide", valid=False))
    clock = Clock()

    async def body() -> None:
        async with Agent(api, NODE_A, clock) as agent:
            assert await agent.round() == 2

    run(body)
    cond = ours(stored(api, "ciliumclusterwidenetworkpolicies", "", "wide"))
    assert cond["status"] == "False"
    (event,) = events_for(api, "wide")
    assert event["metadata"]["namespace"] == "default"
    assert event["involvedObject"]["kind"] == "CiliumClusterwideNetworkPolicy"


def test_a_new_holder_does_not_repeat_the_event(api: ApiServerThread) -> None:
    """The Event's name is fixed by (object, generation, message): after a takeover the new holder's
    create is refused as AlreadyExists, so kubectl still shows one Event."""
    put(api, _cnp("bad", valid=False))
    clock_a, clock_b = Clock(), Clock()

    async def body() -> None:
        async with Agent(api, NODE_A, clock_a) as a, Agent(api, NODE_B, clock_b) as b:
            await a.round()
            await a.writer.stop()
            await b.caught_up(api)
            await b.round()
            assert b.writer.is_holder

    run(body)
    assert len(events_for(api, "bad")) == 1


def test_kubectl_shows_the_condition_and_the_event(api: ApiServerThread, tmp_path: Path) -> None:
    """Real kubectl: the condition by jsonpath, the Event by field selector, and both in `describe`."""
    put(api, _cnp("bad", valid=False))
    clock = Clock()

    async def body() -> None:
        async with Agent(api, NODE_A, clock) as agent:
            await agent.round()

    run(body)
    home = tmp_path / "home"
    home.mkdir()
    kubectl = Kubectl(kubeconfig=api.kubeconfig, home=home)
    status = kubectl.run("get", "cnp", "bad", "-o",
                         'jsonpath={.status.conditions[?(@.type=="membrane.io/Valid")].status}').stdout
    assert status == "False"
    events = kubectl.json("get", "events", "--field-selector", "involvedObject.name=bad")
    items = events["items"]
    assert isinstance(items, list)
    assert [e["reason"] for e in items] == ["PolicyInvalid"]
    described = kubectl.run("describe", "cnp", "bad").stdout
    assert "PolicyInvalid" in described
    assert "membrane-agent" in described


def test_the_background_task_writes_after_submit_and_releases_on_stop(api: ApiServerThread) -> None:
    """Started, the writer takes the lease and writes on its own after submit(); stop() releases the lease."""
    put(api, _cnp("bad", valid=False))

    async def body() -> None:
        async with Agent(api, NODE_A, Clock()) as agent:
            agent.writer = PolicyStatusWriter(agent.client, node_name=NODE_A)  # real clocks for the timer
            await agent.writer.start()
            try:
                agent.submit()
                await agent.until(lambda objs: any(c.get("type") == CONDITION_TYPE for c in objs[0].conditions))
            finally:
                await agent.writer.stop()

    run(body)
    assert ours(cnp(api, "bad"))["status"] == "False"
    lease = stored(api, "leases", "kube-system", "membrane-policy-status", group="coordination.k8s.io")
    assert lease["spec"].get("holderIdentity") is None
    assert lease["spec"]["leaseDurationSeconds"] == 1


def test_api_errors_are_counted_and_the_next_round_recovers(api: ApiServerThread) -> None:
    """A failed status write (500) is counted with its message and does not stop the others; the next
    round writes what is still missing."""
    put(api, _cnp("a", valid=False), _cnp("b", valid=False))
    clock = Clock()

    async def body() -> None:
        async with Agent(api, NODE_A, clock) as agent:
            agent.submit()
            assert await agent.writer.ensure_lease()
            api.inject_errors(1, code=500, path_prefix="/apis/cilium.io/v2/namespaces/default/ciliumnetworkpolicies/a")
            assert await agent.writer.reconcile() == 3  # b's condition and both Events; a's condition failed
            assert agent.writer.stats.errors == 1
            assert "injected fault" in str(agent.writer.stats.last_error)
            clock.advance(1)
            assert await agent.writer.step() == 1  # a's condition

    run(body)
    assert ours(cnp(api, "a"))["status"] == "False"


def test_a_holder_that_cannot_renew_stops_writing(api: ApiServerThread) -> None:
    """With the API server away past the renew deadline (10 s of a 15 s lease), the holder stops writing
    before anyone could take over; back in touch, it renews its own lease and writes again."""
    put(api, _cnp("a", valid=False))
    clock = Clock()

    async def body() -> None:
        async with Agent(api, NODE_A, clock) as agent:
            await agent.round()
            await asyncio.to_thread(api.stop)
            clock.advance(6)
            await agent.writer.step()  # the renewal fails; still within the deadline
            assert agent.writer.is_holder
            clock.advance(5)
            assert await agent.writer.step() == 0
            assert not agent.writer.is_holder
            assert agent.writer.stats.holder is False
            await asyncio.to_thread(api.start)
            clock.advance(2)
            await agent.writer.step()
            assert agent.writer.is_holder

    run(body)
    lease = stored(api, "leases", "kube-system", "membrane-policy-status", group="coordination.k8s.io")
    assert lease["spec"]["holderIdentity"] == NODE_A


# --- pure parts ----------------------------------------------------------------------------------------------


def _err(source: str, obj: str, *paths: str, cls: type[PolicyValidationError] = PolicyValidationError) -> Any:
    first = cls(f"bad {paths[0]}", source=source, obj=obj, path=paths[0])
    first.problems = (first, *(cls(f"bad {p}", source=source, obj=obj, path=p) for p in paths[1:]))
    return first


def test_errors_name_their_objects() -> None:
    """The Kubernetes source's `<plural>/<ns>/<name>` source names the object; a bare obj is a fallback."""
    assert error_ref(_err("ciliumnetworkpolicies/shop/p", "shop/p", "spec")) == PolicyRef(
        kind="CiliumNetworkPolicy", namespace="shop", name="p")
    assert error_ref(_err("ciliumclusterwidenetworkpolicies/w", "w", "spec")) == PolicyRef(
        kind="CiliumClusterwideNetworkPolicy", namespace="", name="w")
    assert error_ref(_err("policies.yaml", "shop/p", "spec")) == PolicyRef(
        kind="CiliumNetworkPolicy", namespace="shop", name="p")
    assert error_ref(_err("policies.yaml", "document 3", "spec")) is None


def test_summary_counts_objects_and_lists_their_errors() -> None:
    """policy_import_errors counts rejected objects; each lists its problems as `path: message` lines."""
    summary = summarize([_err("ciliumnetworkpolicies/a/p", "a/p", "spec.x", "spec.y"),
                         _err("ciliumclusterwidenetworkpolicies/w", "w", "spec.z")])
    assert summary.as_dict() == {
        "policy_import_errors": 2,
        "invalid_policies": [
            {"kind": "CiliumClusterwideNetworkPolicy", "key": "w", "errors": ["spec.z: bad spec.z"]},
            {"kind": "CiliumNetworkPolicy", "key": "a/p", "errors": ["spec.x: bad spec.x", "spec.y: bad spec.y"]},
        ]}
    assert summarize([]).as_dict() == {"policy_import_errors": 0, "invalid_policies": []}


def test_a_conflict_has_its_own_reason() -> None:
    """Rules that cannot be combined are reported as ConflictingRules, not as a malformed policy."""
    errors = errors_by_policy([_err("ciliumnetworkpolicies/a/p", "a/p", "spec", cls=PolicyConflictError)])
    obj = PolicyObject(ref=PolicyRef(kind="CiliumNetworkPolicy", namespace="a", name="p"), uid="u", generation=4,
                       resource_version="9", conditions=())
    want = wanted_condition(obj, errors[obj.ref])
    assert (want.status, want.reason, want.observed_generation) == ("False", "ConflictingRules", 4)


def test_messages_are_bounded() -> None:
    """A long problem list is cut at the limit with a count of what was left out; one huge line is cut."""
    lines = [f"spec.ingress[{i}].toPorts: {'x' * 100}" for i in range(200)]
    text = bounded(lines, MAX_CONDITION_MESSAGE)
    assert len(text) <= MAX_CONDITION_MESSAGE
    assert text.endswith("more")
    assert text.startswith(lines[0])
    assert len(bounded(["y" * 5000], 1024)) == 1024
    assert bounded(["short"], 1024) == "short"


def test_pruned_observed_generation_is_not_a_difference() -> None:
    """Cilium's CRD has no observedGeneration in conditions (a real server prunes it): a stored condition
    without it matches, so the writer does not rewrite it forever; a stored, different one does not."""
    want = WantedCondition(status="False", reason="InvalidPolicy", message="m", observed_generation=3)
    pruned = {"type": CONDITION_TYPE, "status": "False", "reason": "InvalidPolicy", "message": "m",
              "lastTransitionTime": "2026-01-01T00:00:00Z"}
    assert is_current([pruned], want)
    assert not is_current([{**pruned, "observedGeneration": 2}], want)
    assert not is_current([{**pruned, "message": "other"}], want)
    assert not is_current([], want)


def test_transition_time_moves_only_with_the_status() -> None:
    """A new message with the same status keeps lastTransitionTime; a new status sets it to now."""
    old = [{"type": CONDITION_TYPE, "status": "False", "reason": "InvalidPolicy", "message": "a",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    same = merged_conditions(old, WantedCondition(status="False", reason="InvalidPolicy", message="b",
                                                  observed_generation=2), "2026-02-02T00:00:00Z")
    flipped = merged_conditions(old, WantedCondition(status="True", reason="Valid", message="ok",
                                                     observed_generation=3), "2026-02-02T00:00:00Z")
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert same[0]["message"] == "b"
    assert flipped[0]["lastTransitionTime"] == "2026-02-02T00:00:00Z"
