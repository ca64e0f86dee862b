"""Server-side printing: the meta.k8s.io/v1 Table that `kubectl get` asks for, per resource type.

Columns follow kube-apiserver's printers for the types kubectl users look at (pods: NAME READY STATUS
RESTARTS AGE, and IP/NODE for -o wide; namespaces and nodes: STATUS); every other type gets NAME and AGE,
as a CRD without additionalPrinterColumns does. Pure functions; `now` is injected.
"""

from __future__ import annotations

import calendar
import time
from typing import Any

from membrane.sandbox.apiserver.resources import ResourceType

Obj = dict[str, Any]


def _column(name: str, type_: str = "string", *, priority: int = 0, fmt: str = "") -> Obj:
    return {"name": name, "type": type_, "format": fmt, "description": name, "priority": priority}


def human_duration(seconds: float) -> str:
    """kubectl's age format (apimachinery duration.HumanDuration): 45s, 5m, 3h, 2d, 400d."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 3 * 3600:
        return f"{s // 60}m"
    if s < 8 * 3600:
        return f"{s // 3600}h{(s % 3600) // 60}m" if (s % 3600) // 60 else f"{s // 3600}h"
    if s < 48 * 3600:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _age(obj: Obj, now: float) -> str:
    ts = obj.get("metadata", {}).get("creationTimestamp")
    if not ts:
        return "<unknown>"
    return human_duration(now - calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")))


def _pod_cells(pod: Obj) -> list[Any]:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(int(c.get("restartCount", 0)) for c in statuses)
    phase = status.get("phase", "Pending")
    if pod["metadata"].get("deletionTimestamp"):
        phase = "Terminating"
    return [f"{ready}/{len(spec.get('containers') or [])}", phase, restarts]


def _node_status(node: Obj) -> str:
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    return "Ready" if ready is not None and ready.get("status") == "True" else "NotReady"


def columns(rt: ResourceType) -> list[Obj]:
    name = _column("Name", fmt="name")
    age = _column("Age", "date")
    if not rt.group and rt.kind == "Pod":
        return [name, _column("Ready"), _column("Status"), _column("Restarts", "integer"), age,
                _column("IP", priority=1), _column("Node", priority=1)]
    if not rt.group and rt.kind == "Namespace":
        return [name, _column("Status"), age]
    if not rt.group and rt.kind == "Node":
        return [name, _column("Status"), age]
    return [name, age]


def row(rt: ResourceType, obj: Obj, now: float) -> Obj:
    """One Table row: its cells and the object's metadata (kubectl reads namespace and labels from it)."""
    meta = obj.get("metadata") or {}
    cells: list[Any] = [meta.get("name", "")]
    if not rt.group and rt.kind == "Pod":
        status = obj.get("status") or {}
        cells += [*_pod_cells(obj), _age(obj, now), status.get("podIP") or "<none>",
                  (obj.get("spec") or {}).get("nodeName") or "<none>"]
    elif not rt.group and rt.kind == "Namespace":
        cells += [(obj.get("status") or {}).get("phase", "Active"), _age(obj, now)]
    elif not rt.group and rt.kind == "Node":
        cells += [_node_status(obj), _age(obj, now)]
    else:
        cells.append(_age(obj, now))
    partial = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta}
    return {"cells": cells, "object": partial}


def table(rt: ResourceType, objs: list[Obj], now: float, *, resource_version: str = "", continue_token: str = "",
          remaining: int | None = None, include_columns: bool = True) -> Obj:
    """A meta.k8s.io/v1 Table of these objects (what a LIST or GET answers to `as=Table`)."""
    meta: Obj = {}
    if resource_version:
        meta["resourceVersion"] = resource_version
    if continue_token:
        meta["continue"] = continue_token
    if remaining is not None:
        meta["remainingItemCount"] = remaining
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
            "columnDefinitions": columns(rt) if include_columns else [],
            "rows": [row(rt, o, now) for o in objs]}
