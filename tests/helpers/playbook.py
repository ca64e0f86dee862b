"""Playbook: drive a sans-I/O session with inputs and assert the exact actions it answers, in order (after mitmproxy's tutils.Playbook).

    assert (
        Playbook(session)
        >> DataReceived(C2S, b"GET /secret HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
        << Reply(FORBIDDEN)
        >> DataReceived(C2S, b"GET /api HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
        << Forward(C2S, b"GET /api HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
    )

`>> x` feeds an input (`START` runs `session.start()`), `<< y` expects the next action. `Log` actions
are skipped unless the playbook was made with `logs=True`; expect them with `LogMatch(...)`, which
compares only the fields it names. Evaluating the playbook (`bool()`) fails with a readable trace
when an action differs, is missing, or is left over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from membrane.proxy.session import Action, Input, Log, Session


class _Start:
    def __repr__(self) -> str:
        return "START"


START = _Start()


@dataclass
class LogMatch:
    """Matches a Log whose flow has these values: verdict, l7_type, rule, reason, or any key of flow.to_json() via `json`."""

    verdict: str | None = None
    l7_type: str | None = None
    rule: str | None = None
    reason: str | None = None
    json: dict[str, Any] = field(default_factory=dict)

    def matches(self, action: Action) -> bool:
        if not isinstance(action, Log):
            return False
        flow = action.flow
        for name in ("verdict", "l7_type", "rule", "reason"):
            want = getattr(self, name)
            if want is not None and getattr(flow, name) != want:
                return False
        record = flow.to_json()
        return all(_dig(record, path) == want for path, want in self.json.items())


def _dig(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


class Playbook:
    def __init__(self, session: Session | Any, *, logs: bool = False) -> None:
        self.session = session
        self.logs = logs
        self.steps: list[tuple[str, Any]] = []

    def __rshift__(self, event: Input | _Start) -> Playbook:
        self.steps.append(("in", event))
        return self

    def __lshift__(self, action: Action | LogMatch) -> Playbook:
        self.steps.append(("out", action))
        return self

    def _run(self, event: Input | _Start) -> list[Action]:
        if isinstance(event, _Start):
            return list(self.session.start())
        return list(self.session.handle(event))

    def __bool__(self) -> bool:
        pending: list[Action] = []
        trace: list[str] = []
        for kind, item in self.steps:
            if kind == "in":
                produced = self._run(item)
                trace.append(f">> {item!r}")
                pending.extend(a for a in produced if self.logs or not isinstance(a, Log))
                continue
            if not pending:
                raise AssertionError("\n".join([*trace, f"<< expected {item!r}, but the session produced nothing more"]))
            actual = pending.pop(0)
            ok = item.matches(actual) if isinstance(item, LogMatch) else actual == item
            if not ok:
                raise AssertionError("\n".join([*trace, f"<< expected {item!r}", f"   actual   {actual!r}"]))
            trace.append(f"<< {actual!r}")
        if pending:
            raise AssertionError("\n".join([*trace, "unexpected actions left over:", *(f"   {a!r}" for a in pending)]))
        return True
