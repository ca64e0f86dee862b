"""One flow or request judged on both sides: the source endpoint's egress and the destination's ingress.

`evaluate_flow` is what `membrane policy trace` prints and what the proxy (issue 4) calls, so the
two can never disagree. Verdict: DROPPED if either direction drops at L3/L4, else L7_DENIED if
either direction denies the request at L7, else ALLOWED. A side that is not a local endpoint
(an outside IP) has no policy of its own: it is reported as not enforced and ALLOWED.
`evaluate_request` memoises its (immutable) result for shared decisions, keyed by the identities of
its inputs, so a connection's repeated requests cost two rule-set lookups and one dict lookup.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from membrane.parsers.events import DnsQuery, GrpcCall, HttpRequest, KafkaRequest, Reason
from membrane.policies.compile import Peer, PolicyDirection, PolicyMap, Verdict, VerdictKind
from membrane.policies.crd import L4Proto, ParserType
from membrane.policies.kafka_keys import TOPIC_AUTHORIZATION_FAILED
from membrane.policies.l7 import Decision, HeaderAction, L7Request


class FlowVerdict(enum.Enum):
    ALLOWED = "ALLOWED"
    DROPPED = "DROPPED"
    L7_DENIED = "L7_DENIED"


@dataclass(frozen=True, slots=True, kw_only=True)
class DirectionResult:
    """One side's answer. `verdict` is None-free; `decision` is set when a request was judged at L7."""

    direction: PolicyDirection
    endpoint: str | None  # the local endpoint whose policy this is; None = not a local endpoint
    enforced: bool
    verdict: FlowVerdict
    l7: ParserType | None
    matched: tuple[str, ...]
    lookup: Verdict | None = None
    decision: Decision | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowResult:
    verdict: FlowVerdict
    egress: DirectionResult
    ingress: DirectionResult
    decision: Decision | None  # the L7 decision that denied, else the last one that allowed
    header_actions: tuple[HeaderAction, ...] = ()


def _side_decision(verdict: Verdict | None, request: L7Request | None, request_error: Reason | None) -> Decision | None:
    """The L7 decision of one side: None when that side does not judge the request at L7."""
    if verdict is None or verdict.kind is VerdictKind.DROP or verdict.kind is VerdictKind.ALLOW or verdict.rules is None:
        return None
    if request_error is not None:
        return Decision(allowed=False, reason=request_error)
    if request is not None:
        return verdict.rules.evaluate(request)
    return None  # no request given: the connection is allowed to the proxy


def _judge(
    direction: PolicyDirection,
    endpoint: str | None,
    verdict: Verdict | None,
    decision: Decision | None,
) -> DirectionResult:
    if verdict is None:
        return DirectionResult(direction=direction, endpoint=None, enforced=False, verdict=FlowVerdict.ALLOWED, l7=None, matched=())
    if verdict.kind is VerdictKind.DROP:
        return DirectionResult(
            direction=direction, endpoint=endpoint, enforced=verdict.enforced, verdict=FlowVerdict.DROPPED,
            l7=None, matched=verdict.matched, lookup=verdict,
        )
    if verdict.kind is VerdictKind.ALLOW or verdict.rules is None:
        return DirectionResult(
            direction=direction, endpoint=endpoint, enforced=verdict.enforced, verdict=FlowVerdict.ALLOWED,
            l7=None, matched=verdict.matched, lookup=verdict,
        )
    if decision is None:
        return DirectionResult(
            direction=direction, endpoint=endpoint, enforced=verdict.enforced, verdict=FlowVerdict.ALLOWED,
            l7=verdict.parser, matched=verdict.matched, lookup=verdict,
        )
    return DirectionResult(
        direction=direction,
        endpoint=endpoint,
        enforced=verdict.enforced,
        verdict=FlowVerdict.ALLOWED if decision.allowed else FlowVerdict.L7_DENIED,
        l7=verdict.parser,
        matched=decision.matched,
        lookup=verdict,
        decision=decision,
    )


# evaluate_request's results for shared decisions, keyed by the identities of the four inputs (each entry
# holds those objects, so no id can be reused while it is cached) and the two endpoint names. A connection
# asks the same question for every request it carries; the answer is an immutable FlowResult.
# The entries hold one compiled policy's verdicts and rule sets: `forget_memo()` when a new policy replaces it,
# or every policy of the last few thousand reloads stays alive (the soak's RSS creep: ~1 MB per 100 reloads).
_MEMO_MAX = 4096
_memo: dict[tuple[int, int, int, int, str | None, str | None], tuple[object, object, object, object, FlowResult]] = {}


def forget_memo() -> None:
    """Drop evaluate_request's memo: a new policy is in force and the old one's verdicts must not outlive it."""
    _memo.clear()


def evaluate_request(
    egress: Verdict | None,
    ingress: Verdict | None,
    request: L7Request | None = None,
    *,
    src_endpoint: str | None = None,
    dst_endpoint: str | None = None,
    request_error: Reason | None = None,
) -> FlowResult:
    """Judge one request against the two L3/L4 verdicts of its connection (None = side not local).

    The proxy looks the verdicts up once per connection (`PolicyMap.lookup`) and calls this per
    request. `request_error` (e.g. MALFORMED for a target normalize_target refused) denies the
    request on every side that inspects it at L7. Never raises.
    """
    de = _side_decision(egress, request, request_error)
    di = _side_decision(ingress, request, request_error)
    if (de is None or de.shared) and (di is None or di.shared):
        key = (id(egress), id(ingress), id(de), id(di), src_endpoint, dst_endpoint)
        hit = _memo.get(key)
        if hit is not None and hit[0] is egress and hit[1] is ingress and hit[2] is de and hit[3] is di:
            return hit[4]
        result = _combine(egress, ingress, de, di, src_endpoint, dst_endpoint)
        if len(_memo) >= _MEMO_MAX:
            _memo.clear()
        _memo[key] = (egress, ingress, de, di, result)
        return result
    return _combine(egress, ingress, de, di, src_endpoint, dst_endpoint)


def _combine(
    egress: Verdict | None,
    ingress: Verdict | None,
    de: Decision | None,
    di: Decision | None,
    src_endpoint: str | None,
    dst_endpoint: str | None,
) -> FlowResult:
    e = _judge(PolicyDirection.EGRESS, src_endpoint, egress, de)
    i = _judge(PolicyDirection.INGRESS, dst_endpoint, ingress, di)
    sides = (e, i)
    if any(s.verdict is FlowVerdict.DROPPED for s in sides):
        verdict = FlowVerdict.DROPPED
    elif any(s.verdict is FlowVerdict.L7_DENIED for s in sides):
        verdict = FlowVerdict.L7_DENIED
    else:
        verdict = FlowVerdict.ALLOWED
    decision = None
    for s in sides:
        if s.decision is not None and (decision is None or decision.allowed):
            decision = s.decision
    actions: tuple[HeaderAction, ...] = ()
    if verdict is FlowVerdict.ALLOWED:
        actions = tuple(a for s in sides if s.decision is not None for a in s.decision.header_actions)
    return FlowResult(verdict=verdict, egress=e, ingress=i, decision=decision, header_actions=actions)


def evaluate_flow(
    pmap: PolicyMap,
    *,
    src: Peer,
    dst: Peer,
    port: int,
    proto: L4Proto,
    request: L7Request | None = None,
    request_error: Reason | None = None,
) -> FlowResult:
    """Look up both sides' L3/L4 verdicts for src -> dst:port/proto and judge `request` (optional).

    Returns: FlowResult (never raises for any identities/ports).
    """
    egress = pmap.lookup(src.endpoint, PolicyDirection.EGRESS, dst.identity, port, proto) if src.endpoint else None
    ingress = pmap.lookup(dst.endpoint, PolicyDirection.INGRESS, src.identity, port, proto) if dst.endpoint else None
    return evaluate_request(
        egress, ingress, request, src_endpoint=src.endpoint, dst_endpoint=dst.endpoint, request_error=request_error
    )


def denial_response(result: FlowResult, request: L7Request | None) -> dict[str, object]:
    """The refusal the proxy would send for an L7_DENIED request, keyed as the trace JSON has it."""
    if result.verdict is not FlowVerdict.L7_DENIED:
        return {}
    reason = result.decision.reason if result.decision is not None else Reason.POLICY_DENIED
    match request:
        case GrpcCall():
            return {"grpc_status": 7 if reason is Reason.POLICY_DENIED else 13}
        case DnsQuery():
            return {"dns_rcode": "REFUSED" if reason is Reason.POLICY_DENIED else "FORMERR"}
        case KafkaRequest():
            return {"kafka_error_code": TOPIC_AUTHORIZATION_FAILED}
        case HttpRequest() | None:
            return {"http_status": 403 if reason is Reason.POLICY_DENIED else 400}
    return {}
