"""Policy problems shown where kubectl users look: a status condition and an Event per CNP/CCNP.

Owns, for CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy objects: the `membrane.io/Valid`
condition in `status.conditions` (written through the `/status` subresource), one Warning Event per
(object generation, message) for an invalid policy, the coordination.k8s.io Lease that makes exactly
one agent of the cluster the writer, and the summary that `membrane status` and the metrics show.
Never touches a condition of another type (Cilium's operator owns `Valid`), never writes what is
already there, and never writes without holding a live lease. Never imports proxy/ or bpf/.

Theory of operation: the agent hands every view of the cluster to `submit()` (the policy objects as
the reflectors hold them, and the policy errors); a background task renews the lease on a timer and,
while this agent holds it, compares each object's condition with the wanted one and patches only the
differences, with a resourceVersion precondition (409: read the object again, merge again, retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import httpx
from lightkube import ApiError, AsyncClient
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import Event
from lightkube.types import PatchType
from membrane.control.sources.kubernetes import CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy, KubernetesSource
from membrane.policies.errors import PolicyConflictError, PolicyError

log = logging.getLogger("membrane.k8s.status")
T = TypeVar("T")

# Our own condition type. Cilium's operator owns `Valid` (it validates CNPs itself); a second writer
# of the same type would flap it. The type is domain-prefixed, as the API conventions ask of types
# defined outside Kubernetes (metav1.Condition's type pattern allows `prefix/Name`). It says "valid"
# and not "enforced": parsing is the same on every node, so one agent may speak for the cluster,
# while enforcement is per node and one agent could not vouch for the others.
CONDITION_TYPE = "membrane.io/Valid"
REASON_VALID = "Valid"
REASON_INVALID = "InvalidPolicy"
REASON_CONFLICT = "ConflictingRules"  # rules that load alone but cannot be combined (two L7 parsers on a port)
EVENT_REASON = "PolicyInvalid"
COMPONENT = "membrane-agent"
LEASE_NAME = "membrane-policy-status"
DEFAULT_LEASE_NAMESPACE = "kube-system"
LEASE_DURATION_S = 15  # client-go's leader-election default; another agent takes over 15 s after the last renewal
# Bounds on what we write. A condition message may hold 32 KiB (metav1.Condition); a kubectl
# screen is far smaller, and the full list stays in `membrane status`. Events' notes are capped at
# 1 KiB by events.k8s.io validation; the core v1 Event is held to the same.
MAX_CONDITION_MESSAGE = 4096
MAX_EVENT_MESSAGE = 1024
MAX_CONFLICT_RETRIES = 5
CONFLICT = 409
NOT_FOUND = 404

PolicyKind = Literal["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"]
_PLURALS: dict[PolicyKind, str] = {
    "CiliumNetworkPolicy": "ciliumnetworkpolicies",
    "CiliumClusterwideNetworkPolicy": "ciliumclusterwidenetworkpolicies",
}


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def rfc3339(t: dt.datetime) -> str:
    """metav1.Time: whole seconds, UTC, `Z`."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- what is being reported on ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class PolicyRef:
    """One CNP (namespace set) or CCNP (namespace "")."""

    kind: PolicyKind
    namespace: str
    name: str

    @property
    def key(self) -> str:
        """`ns/name` for a CNP, `name` for a CCNP: the key the rest of the agent uses."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def plural(self) -> str:
        return _PLURALS[self.kind]


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyObject:
    """What the writer needs of one policy object as the API server last showed it."""

    ref: PolicyRef
    uid: str
    generation: int
    resource_version: str
    conditions: tuple[Mapping[str, Any], ...]  # status.conditions as stored, every type

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> PolicyObject:
        """Raises ValueError for an object that is neither a CNP nor a CCNP."""
        kind = obj.get("kind")
        if kind not in _PLURALS:
            raise ValueError(f"not a Cilium policy: kind {kind!r}")
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        conditions = status.get("conditions") if isinstance(status, Mapping) else None
        return cls(
            ref=PolicyRef(kind=kind, namespace=str(meta.get("namespace") or "") if kind == "CiliumNetworkPolicy" else "",
                          name=str(meta.get("name"))),
            uid=str(meta.get("uid") or ""),
            generation=int(meta.get("generation") or 0),
            resource_version=str(meta.get("resourceVersion") or ""),
            conditions=tuple(c for c in conditions or () if isinstance(c, Mapping)),
        )


def policy_objects(source: KubernetesSource) -> tuple[PolicyObject, ...]:
    """Every CNP and CCNP the Kubernetes source's reflectors hold now (read-only)."""
    out: list[PolicyObject] = []
    for plural, kind in (("ciliumnetworkpolicies", "CiliumNetworkPolicy"),
                         ("ciliumclusterwidenetworkpolicies", "CiliumClusterwideNetworkPolicy")):
        for obj in source.reflectors[plural].store.values():
            out.append(PolicyObject.from_dict({"kind": kind, **obj}))
    return tuple(sorted(out, key=lambda o: o.ref))


def error_ref(error: PolicyError) -> PolicyRef | None:
    """The object a policy error is about, from its source (`<plural>/<ns>/<name>` as the Kubernetes
    source names it) or else its `obj` (`ns/name` is a CNP, a bare name a CCNP). None if neither names one."""
    head, _, rest = error.source.partition("/")
    parts = rest.split("/") if rest else []
    if head == "ciliumnetworkpolicies" and len(parts) == 2:
        return PolicyRef(kind="CiliumNetworkPolicy", namespace=parts[0], name=parts[1])
    if head == "ciliumclusterwidenetworkpolicies" and len(parts) == 1:
        return PolicyRef(kind="CiliumClusterwideNetworkPolicy", namespace="", name=parts[0])
    obj = error.obj or ""
    if not obj or " " in obj or obj.count("/") > 1:  # "document 3": the name was never known
        return None
    ns, _, name = obj.rpartition("/")
    if ns:
        return PolicyRef(kind="CiliumNetworkPolicy", namespace=ns, name=name)
    return PolicyRef(kind="CiliumClusterwideNetworkPolicy", namespace="", name=name)


def problem_lines(error: PolicyError) -> tuple[str, ...]:
    """One line per problem of the object: `field.path: what is wrong` (the object is named elsewhere)."""
    return tuple(f"{p.path}: {p.message}" if p.path else p.message for p in error.problems)


def errors_by_policy(errors: Iterable[PolicyError]) -> dict[PolicyRef, tuple[tuple[str, ...], bool]]:
    """Policy errors grouped by object: (problem lines, whether any is a rule conflict). Errors naming no
    object are left out (they have nothing to carry a condition)."""
    out: dict[PolicyRef, tuple[tuple[str, ...], bool]] = {}
    for e in errors:
        ref = error_ref(e)
        if ref is None:
            continue
        lines, conflict = out.get(ref, ((), False))
        new = tuple(line for line in problem_lines(e) if line not in lines)
        out[ref] = (lines + new, conflict or isinstance(e, PolicyConflictError))
    return out


def bounded(lines: Sequence[str], limit: int) -> str:
    """The lines joined by newlines, cut to `limit` characters with a note of how many lines were left out."""
    text = "\n".join(lines)
    if len(text) <= limit:
        return text
    kept: list[str] = []
    used = 0
    for i, line in enumerate(lines):
        note = f"... and {len(lines) - i} more"
        if used + len(line) + 1 + len(note) > limit:
            break
        kept.append(line)
        used += len(line) + 1
    else:  # pragma: no cover - the whole text would have fit
        return text
    remaining = len(lines) - len(kept)
    if not kept:  # one line longer than the limit: cut it
        return lines[0][: limit - 3] + "..."
    return "\n".join(kept) + f"\n... and {remaining} more"


# --- the condition -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WantedCondition:
    """The `membrane.io/Valid` condition one object should carry."""

    status: Literal["True", "False"]
    reason: str
    message: str
    observed_generation: int

    def as_dict(self, last_transition_time: str) -> dict[str, Any]:
        return {"type": CONDITION_TYPE, "status": self.status, "reason": self.reason, "message": self.message,
                "lastTransitionTime": last_transition_time, "observedGeneration": self.observed_generation}


def wanted_condition(obj: PolicyObject, problems: tuple[tuple[str, ...], bool] | None) -> WantedCondition:
    if problems is None:
        return WantedCondition(status="True", reason=REASON_VALID, message="accepted by membrane",
                               observed_generation=obj.generation)
    lines, conflict = problems
    return WantedCondition(status="False", reason=REASON_CONFLICT if conflict else REASON_INVALID,
                           message=bounded(lines, MAX_CONDITION_MESSAGE), observed_generation=obj.generation)


def is_current(conditions: Sequence[Mapping[str, Any]], want: WantedCondition) -> bool:
    """Whether the stored conditions already say what we want. `observedGeneration` is compared only when
    stored: Cilium's own CRD schema has no such field, so a real API server prunes it, and comparing a
    field that never sticks would rewrite every object forever."""
    for c in conditions:
        if c.get("type") != CONDITION_TYPE:
            continue
        if (c.get("status"), c.get("reason"), c.get("message")) != (want.status, want.reason, want.message):
            return False
        return "observedGeneration" not in c or c.get("observedGeneration") == want.observed_generation
    return False


def merged_conditions(conditions: Sequence[Mapping[str, Any]], want: WantedCondition, now: str) -> list[dict[str, Any]]:
    """The conditions with ours replaced in place (or appended), every other type kept as it is.

    `lastTransitionTime` moves only when the status changes (the API conventions' meaning)."""
    out: list[dict[str, Any]] = []
    placed = False
    for c in conditions:
        if c.get("type") == CONDITION_TYPE and not placed:
            same = c.get("status") == want.status and c.get("lastTransitionTime")
            out.append(want.as_dict(str(c["lastTransitionTime"]) if same else now))
            placed = True
        elif c.get("type") != CONDITION_TYPE:
            out.append(dict(c))
    if not placed:
        out.append(want.as_dict(now))
    return out


def event_name(obj: PolicyObject, message: str) -> str:
    """A name fixed by (object, generation, message): a second agent (after a takeover) creating the same
    Event gets 409 AlreadyExists instead of a duplicate."""
    digest = hashlib.sha256(f"{obj.uid}\0{obj.ref.key}\0{obj.generation}\0{message}".encode()).hexdigest()[:16]
    return f"{obj.ref.name[:200]}.{digest}"


# --- what `membrane status` and the metrics show -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class InvalidPolicy:
    kind: PolicyKind
    key: str  # ns/name (CNP) or name (CCNP)
    errors: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyStatusSummary:
    """The policies the agent rejected now. `policy_import_errors` is a gauge: the number of rejected
    objects (an object with five problems counts once), 0 when every policy loaded."""

    invalid_policies: tuple[InvalidPolicy, ...]

    @property
    def policy_import_errors(self) -> int:
        return len(self.invalid_policies)

    def as_dict(self) -> dict[str, Any]:
        return {"policy_import_errors": self.policy_import_errors,
                "invalid_policies": [{"kind": p.kind, "key": p.key, "errors": list(p.errors)}
                                     for p in self.invalid_policies]}


def summarize(errors: Iterable[PolicyError]) -> PolicyStatusSummary:
    """The summary of a view's policy errors (errors naming no object are listed under their location)."""
    errors = list(errors)
    grouped = errors_by_policy(errors)
    out = [InvalidPolicy(kind=ref.kind, key=ref.key, errors=lines) for ref, (lines, _c) in sorted(grouped.items())]
    out += [InvalidPolicy(kind="CiliumNetworkPolicy", key=e.location or "<unknown>", errors=problem_lines(e))
            for e in errors if error_ref(e) is None]
    return PolicyStatusSummary(invalid_policies=tuple(out))


@dataclass(slots=True, kw_only=True)
class WriterStats:
    """Counters for `membrane status` and the metrics (mutable: the writer updates them)."""

    holder: bool = False
    lease_transitions: int = 0  # times this agent took the lease
    status_writes: int = 0
    status_conflicts: int = 0  # 409s answered by re-reading and retrying
    events_created: int = 0
    errors: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"holder": self.holder, "lease_transitions": self.lease_transitions,
                "status_writes": self.status_writes, "status_conflicts": self.status_conflicts,
                "events_created": self.events_created, "errors": self.errors, "last_error": self.last_error}


# --- the writer ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Desired:
    objects: tuple[PolicyObject, ...] = ()
    problems: dict[PolicyRef, tuple[tuple[str, ...], bool]] = field(default_factory=dict)


class PolicyStatusWriter:
    """Writes the condition and the Events while this agent holds the Lease; one per agent.

        writer = PolicyStatusWriter(client, node_name="node-a", lease_namespace="membrane")
        await writer.start()                                   # renews on a timer from now on
        writer.submit(policy_objects(source), view.policy_errors)   # after every view
        await writer.stop()                                    # releases the lease

    `step()` is one round (lease, then writes) for tests that drive time themselves.
    """

    def __init__(self, client: AsyncClient, *, node_name: str, lease_namespace: str = DEFAULT_LEASE_NAMESPACE,
                 lease_name: str = LEASE_NAME, lease_duration_s: int = LEASE_DURATION_S,
                 renew_interval_s: float | None = None, retry_interval_s: float = 2.0,
                 monotonic: Callable[[], float] = time.monotonic, wall: Callable[[], dt.datetime] = _utcnow) -> None:
        if not node_name:
            raise ValueError("the status writer needs this node's name (its lease holder identity)")
        self.client = client
        self.identity = node_name
        self.lease_namespace = lease_namespace
        self.lease_name = lease_name
        self.lease_duration_s = max(1, int(lease_duration_s))
        # Renew three times per lease duration, and give up writing after two thirds of it without a
        # successful renewal (client-go's renewDeadline), so a stalled holder stops before anyone takes over.
        self.renew_interval_s = renew_interval_s if renew_interval_s is not None else self.lease_duration_s / 3
        self.renew_deadline_s = self.lease_duration_s * 2 / 3
        self.retry_interval_s = retry_interval_s
        self._mono = monotonic
        self._wall = wall
        self.stats = WriterStats()
        self._desired = _Desired()
        self._lease: Lease | None = None  # the lease as we last wrote it while holding it
        self._renewed_at: float | None = None  # monotonic time of our last successful acquire/renew
        # The other holder's record and when we first saw it: expiry is judged by our own clock from
        # that sighting (as client-go does), never by comparing our clock with another node's renewTime.
        self._observed: tuple[str, str, int] | None = None
        self._observed_at = 0.0
        self._checked_at: float | None = None
        # After a write the reflector's copy lags behind: (resourceVersion we patched from, what came back).
        self._written: dict[PolicyRef, tuple[str, PolicyObject]] = {}
        self._emitted: set[tuple[PolicyRef, str, int, str]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- input and lifetime ---------------------------------------------------------------------------------
    def submit(self, objects: Iterable[PolicyObject], errors: Iterable[PolicyError]) -> None:
        """The policy objects and errors as the agent sees them now; the writer catches up on its own."""
        self._desired = _Desired(objects=tuple(objects), problems=errors_by_policy(errors))
        self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="k8s-policy-status")

    async def stop(self, *, release: bool = True) -> None:
        """Stops the timer and, unless `release=False` (a crash, in tests), gives the lease up at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if release:
            await self.release()

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before the round: a submit() arriving during it wakes the next one at once
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the one boundary: the agent keeps enforcing whatever the API server does
                self._note_error(e)
                log.exception("policy status round failed")
            pause = self.renew_interval_s if self.is_holder else self.retry_interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)

    def _note_error(self, e: BaseException) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{type(e).__name__}: {e}"

    @property
    def is_holder(self) -> bool:
        """Holding the lease with a renewal recent enough to write on."""
        return self._renewed_at is not None and self._mono() - self._renewed_at < self.renew_deadline_s

    async def step(self) -> int:
        """One round: acquire or renew the lease when due, then (if holding) write what differs.
        Returns the number of writes (status patches and Events). API errors are counted, not raised."""
        if not await self.ensure_lease():
            return 0
        return await self.reconcile()

    # --- the lease ------------------------------------------------------------------------------------------
    async def ensure_lease(self) -> bool:
        """Acquires, renews (when due) or observes the lease. Returns whether this agent may write now."""
        now = self._mono()
        if self._renewed_at is not None and now - self._renewed_at < self.renew_interval_s and self.is_holder:
            return True
        if not self.is_holder and self._checked_at is not None and now - self._checked_at < self.retry_interval_s:
            return False  # a non-holder looks at the lease every retry interval, not on every submit
        self._checked_at = now
        try:
            held = await self._acquire_or_renew(now)
        except ApiError as e:
            self._note_error(e)
            log.warning("policy status lease %s/%s: %s", self.lease_namespace, self.lease_name, e.status.message)
            held = False
        except (httpx.HTTPError, OSError, ValueError) as e:  # the API server is away; a holder keeps writing until its deadline
            self._note_error(e)
            held = False
        if not held and not self.is_holder:
            self._renewed_at = None
            self._lease = None
        self.stats.holder = self.is_holder
        return self.is_holder

    async def _acquire_or_renew(self, now: float) -> bool:
        if self._lease is not None:  # holding: renew the copy we wrote, with its resourceVersion
            try:
                self._lease = await self._write_lease(self._lease, renew=True)
                self._renewed_at = now
                return True
            except ApiError as e:
                if e.status.code != CONFLICT:
                    raise
                self._lease = None  # someone changed it: look again
                self._renewed_at = None
        try:
            lease = await self.client.get(Lease, self.lease_name, namespace=self.lease_namespace)
        except ApiError as e:
            if e.status.code != NOT_FOUND:
                raise
            return await self._create_lease(now)
        spec = lease.spec or LeaseSpec()
        holder = spec.holderIdentity or ""
        record = (holder, str(spec.renewTime), int(spec.leaseTransitions or 0))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = spec.leaseDurationSeconds or self.lease_duration_s
        if holder and holder != self.identity and now - self._observed_at < duration:
            return False  # held by another agent that renewed within its duration (as far as we can see)
        try:
            self._lease = await self._write_lease(lease, renew=holder == self.identity)
        except ApiError as e:
            if e.status.code == CONFLICT:
                return False  # another agent won the race; we see its record next round
            raise
        if holder != self.identity:
            self.stats.lease_transitions += 1
            log.info("policy status lease %s/%s taken (previous holder: %s)", self.lease_namespace,
                     self.lease_name, holder or "none")
        self._renewed_at = now
        return True

    async def _create_lease(self, now: float) -> bool:
        t = self._wall()
        lease = Lease(metadata=ObjectMeta(name=self.lease_name, namespace=self.lease_namespace),
                      spec=LeaseSpec(holderIdentity=self.identity, leaseDurationSeconds=self.lease_duration_s,
                                     acquireTime=t, renewTime=t, leaseTransitions=0))
        try:
            self._lease = await self.client.create(lease)
        except ApiError as e:
            if e.status.code == CONFLICT:
                return False  # created by another agent a moment ago
            raise
        self.stats.lease_transitions += 1
        self._renewed_at = now
        return True

    async def _write_lease(self, lease: Lease, *, renew: bool) -> Lease:
        t = self._wall()
        spec = lease.spec or LeaseSpec()
        spec.renewTime = t
        spec.leaseDurationSeconds = self.lease_duration_s
        if not renew:
            spec.holderIdentity = self.identity
            spec.acquireTime = t
            spec.leaseTransitions = int(spec.leaseTransitions or 0) + 1
        lease.spec = spec
        # PUT with the resourceVersion we read: the API server refuses it (409) if anyone wrote in between.
        written: Lease = await self.client.replace(lease)
        return written

    async def release(self) -> None:
        """Gives the lease up (holder emptied, duration 1 s) so another agent takes over at once."""
        lease, self._lease, self._renewed_at = self._lease, None, None
        self.stats.holder = False
        if lease is None or lease.spec is None:
            return
        lease.spec.holderIdentity = None
        lease.spec.leaseDurationSeconds = 1
        lease.spec.renewTime = self._wall()
        try:
            await self.client.replace(lease)
        except (ApiError, httpx.HTTPError, OSError, ValueError) as e:  # it expires by itself
            log.info("policy status lease not released (%s); it expires in %d s", e, self.lease_duration_s)

    # --- the writes -----------------------------------------------------------------------------------------
    async def reconcile(self) -> int:
        """Patches every condition that differs and creates the Events not yet created. Returns the writes."""
        desired = self._desired
        writes = 0
        live = {o.ref for o in desired.objects}
        self._written = {r: w for r, w in self._written.items() if r in live}
        wanted_events: set[tuple[PolicyRef, str, int, str]] = set()
        for submitted in desired.objects:
            if not self.is_holder:
                break  # the lease lapsed mid-way: leave the rest to whoever holds it now
            obj = self._latest(submitted)
            problems = desired.problems.get(obj.ref)
            want = wanted_condition(obj, problems)
            if not is_current(obj.conditions, want):
                patched = await self._guarded(obj.ref, self._patch_condition(obj, problems))
                if patched is not None:
                    obj, wrote = patched
                    writes += wrote
            if problems is not None:  # an Event goes out even when the condition could not be written
                message = bounded(problems[0], MAX_EVENT_MESSAGE)
                key = (obj.ref, obj.uid, obj.generation, message)
                wanted_events.add(key)
                if key not in self._emitted:
                    created = await self._guarded(obj.ref, self._emit_event(obj, message))
                    if created is not None:
                        writes += created
                        self._emitted.add(key)
        self._emitted &= wanted_events  # forget what no object wants any more (bounded memory)
        return writes

    async def _guarded(self, ref: PolicyRef, write: Awaitable[T]) -> T | None:
        """The write's result, or None when the API server refused it or was unreachable (counted and
        logged; the next round tries again)."""
        try:
            return await write
        except ApiError as e:
            self._note_error(e)
            log.warning("policy status of %s %s: %s", ref.kind, ref.key, e.status.message)
        except (httpx.HTTPError, OSError, ValueError) as e:
            self._note_error(e)
            log.warning("policy status of %s %s: %s", ref.kind, ref.key, e)
        return None

    def _latest(self, submitted: PolicyObject) -> PolicyObject:
        written = self._written.get(submitted.ref)
        if written is not None and written[0] == submitted.resource_version:
            return written[1]  # the reflector has not seen our write yet
        return submitted

    async def _patch_condition(self, obj: PolicyObject,
                               problems: tuple[tuple[str, ...], bool] | None) -> tuple[PolicyObject, bool]:
        """Merge-patches status.conditions with our condition, under obj's resourceVersion; on 409 reads
        the object again and retries. Returns the object as it is now and whether we wrote it (a fresh copy
        may already carry the condition). Raises ApiError after the retries."""
        for attempt in range(MAX_CONFLICT_RETRIES + 1):
            want = wanted_condition(obj, problems)
            if is_current(obj.conditions, want):
                return obj, False  # the fresh copy already says it (another writer, or our earlier try)
            # A JSON merge patch replaces a list whole, so the list we send is the stored one with ours
            # merged in; the resourceVersion precondition makes sure nothing was added meanwhile.
            body = {"metadata": {"resourceVersion": obj.resource_version},
                    "status": {"conditions": merged_conditions(obj.conditions, want, rfc3339(self._wall()))}}
            try:
                result = await self._patch_status(obj.ref, body)
            except ApiError as e:
                if e.status.code != CONFLICT or attempt == MAX_CONFLICT_RETRIES:
                    raise
                self.stats.status_conflicts += 1
                fresh = await self._get_policy(obj.ref)
                obj = PolicyObject.from_dict({"kind": obj.ref.kind, **fresh})
                continue
            self.stats.status_writes += 1
            written = PolicyObject.from_dict({"kind": obj.ref.kind, **result})
            self._written[obj.ref] = (obj.resource_version, written)
            return written, True
        raise AssertionError("unreachable")  # pragma: no cover

    async def _patch_status(self, ref: PolicyRef, body: dict[str, Any]) -> dict[str, Any]:
        if ref.kind == "CiliumNetworkPolicy":
            result: Any = await self.client.patch(CiliumNetworkPolicy.Status, ref.name, body, namespace=ref.namespace,
                                                  patch_type=PatchType.MERGE)
        else:
            result = await self.client.patch(CiliumClusterwideNetworkPolicy.Status, ref.name, body,
                                             patch_type=PatchType.MERGE)
        return _as_dict(result)

    async def _get_policy(self, ref: PolicyRef) -> dict[str, Any]:
        if ref.kind == "CiliumNetworkPolicy":
            result: Any = await self.client.get(CiliumNetworkPolicy, ref.name, namespace=ref.namespace)
        else:
            result = await self.client.get(CiliumClusterwideNetworkPolicy, ref.name)
        return _as_dict(result)

    async def _emit_event(self, obj: PolicyObject, message: str) -> bool:
        """Creates the Warning Event. Returns whether this call created it (False: it was already there).
        Raises ApiError for any other refusal."""
        t = self._wall()
        namespace = obj.ref.namespace or "default"  # cluster-scoped objects' events go to default, as client-go does
        event = Event(
            metadata=ObjectMeta(name=event_name(obj, message), namespace=namespace),
            involvedObject=ObjectReference(apiVersion="cilium.io/v2", kind=obj.ref.kind, name=obj.ref.name,
                                           namespace=obj.ref.namespace or None, uid=obj.uid or None,
                                           resourceVersion=obj.resource_version or None),
            type="Warning", reason=EVENT_REASON, message=message,
            source=EventSource(component=COMPONENT, host=self.identity),
            reportingComponent=COMPONENT, reportingInstance=self.identity,
            count=1, firstTimestamp=t.replace(microsecond=0), lastTimestamp=t.replace(microsecond=0),
        )
        try:
            await self.client.create(event)
        except ApiError as e:
            if e.status.code == CONFLICT:
                return False  # the same event (same name: same object, generation and message) exists
            raise
        self.stats.events_created += 1
        return True


def _as_dict(obj: Any) -> dict[str, Any]:
    out = obj if isinstance(obj, dict) else obj.to_dict()
    assert isinstance(out, dict)
    return out
