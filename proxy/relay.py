"""The per-read work of the proxy's connections that is not I/O, compiled with mypyc (native/modules.txt).

`proxy/server.py` owns the sockets and stays interpreted (its classes subclass asyncio's); what it does
for every read of every connection, between the session's actions and the socket writes, lives here:
recording each `Log` (metrics and the flow sink) and joining the bytes of consecutive `Forward`/`Reply`
actions into one write per peer. Never touches a transport, never awaits.
"""

from __future__ import annotations

import logging
from typing import Any

from membrane.parsers.events import Direction
from membrane.proxy.flows import REQUEST, RESPONSE, Flow, FlowSink
from membrane.proxy.metrics import Metrics
from membrane.proxy.session import Action, Forward, Log, Reply

log = logging.getLogger("membrane.proxy")

C2S = Direction.CLIENT_TO_SERVER

_CODES: dict[int, str] = {}


def code_text(code: Any) -> str:
    """A status code as a label value, interned (no formatting per request)."""
    if not isinstance(code, int):
        return str(code)
    text = _CODES.get(code)
    if text is None:
        text = _CODES[code] = str(code) if len(_CODES) < 1000 else "other"
    return text


def route(actions: list[Action], start: int, metrics: Metrics, flows: FlowSink) -> tuple[bytes | None, bytes | None, int]:
    """Carry out `actions[start:]` up to the first one that is not bytes or a record.

    Every `Log` is recorded (`record`); the bytes of `Forward` and `Reply` actions are joined per peer: a
    socket call costs more than the copy. Returns (bytes for the upstream, bytes for the client, the index
    of the action it stopped at: a `Close` or `Learn` for the caller, or len(actions) when all are done).
    """
    up: bytes | None = None
    down: bytes | None = None
    ups: list[bytes] | None = None
    downs: list[bytes] | None = None
    n = len(actions)
    i = start
    while i < n:
        action = actions[i]
        if isinstance(action, Log):
            record(metrics, flows, action.flow)
        elif isinstance(action, Forward) and action.direction is C2S:
            if up is None:
                up = action.data
            elif ups is None:
                ups = [up, action.data]
            else:
                ups.append(action.data)
        elif isinstance(action, (Forward, Reply)):
            if down is None:
                down = action.data
            elif downs is None:
                downs = [down, action.data]
            else:
                downs.append(action.data)
        else:
            break
        i += 1
    if ups is not None:
        up = b"".join(ups)
    if downs is not None:
        down = b"".join(downs)
    return up, down, i


def record(metrics: Metrics, flows: FlowSink, flow: Flow) -> None:
    """One flow record of a session: its metrics, a log line for a crossed limit, then the flow sink."""
    l7 = flow.l7
    protocol = ""
    if l7:
        protocol = next(iter(l7))
    l7_type = flow.l7_type
    if l7_type == REQUEST:
        if not protocol:
            protocol = flow.context.transport.lower()
        metrics.requests.inc(protocol, flow.verdict)
        reason = flow.reason
        if reason == "malformed" or reason == "too_large":
            metrics.parse_errors.inc(protocol, reason)
    elif l7_type == RESPONSE and flow.latency_ns:
        metrics.request_duration.observe(flow.latency_ns / 1e9, protocol or "tcp")
    limit = flow.limit
    if limit is not None:
        if not protocol:
            protocol = flow.context.transport.lower()
        metrics.limits_exceeded.inc(protocol, limit)
        source = flow.context.source
        log.warning("%s limit %s crossed by %s:%d: %s", protocol, limit, source.ip, source.port, flow.summary)
    if l7:
        count_l7(metrics, flow)
    flows.emit(flow)


def count_l7(metrics: Metrics, flow: Flow) -> None:
    """The workload-labelled L7 families: plain dict increments; the label tuple is made once per connection."""
    context = flow.context
    cached = context.metric_labels
    workloads = cached[0] if cached else None
    if workloads is None:
        workloads = metrics.workloads(context.source, context.destination)
        cached.append(workloads)
    protocol, body = next(iter(flow.l7.items()))
    if flow.l7_type == REQUEST:
        method = body.get("method", "") if protocol == "http" else ""
        metrics.l7_requests.inc(protocol, flow.verdict, method, *workloads)
        if protocol == "dns":
            for qtype in body.get("qtypes") or ("",):
                metrics.dns_queries.inc(flow.verdict, qtype)
    elif flow.l7_type == RESPONSE:
        if protocol == "http":
            code = code_text(body.get("code", 0))
        elif protocol == "dns":
            rcode = body.get("rcode")
            code = metrics.dns_rcode(rcode) if isinstance(rcode, int) else ""
            for qtype in body.get("qtypes") or ("",):
                metrics.dns_responses.inc(code, qtype)
        else:
            code = code_text(body.get("error_code", 0)) if protocol == "kafka" else ""
        metrics.l7_responses.inc(protocol, code, *workloads)
