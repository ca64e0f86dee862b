"""The agent's status file: the document `membrane status` and `membrane endpoint list` print.

Owns the shape of the endpoint rows and the atomic write (a temporary file renamed over the old
one, so a reader never sees half a document). The agent assembles the rest of the document.
Never blocks on the kernel: the caller passes what it read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from membrane.policies import Endpoints, PolicyDirection, PolicyMap

log = logging.getLogger("membrane.agent")

DEFAULT_STATUS_PATH = Path(os.environ.get("MEMBRANE_STATUS", "/run/membrane/status.json"))


def endpoint_rows(
    endpoints: Endpoints, pmap: PolicyMap | None, attached: Mapping[str, int], endpoint_ids: Mapping[str, int]
) -> list[dict[str, Any]]:
    """One row per endpoint: identity, labels, addresses, interface, enforcement and state."""
    rows = []
    for ep in endpoints.endpoints:
        ident = pmap.identity_of(ep.key) if pmap is not None else None
        enforced = {d.value: (pmap.direction(ep.key, d).enforced if pmap is not None else False) for d in PolicyDirection}
        if ep.key in attached:
            state = "ready"
        elif ep.interface is None:
            state = "not-local"
        else:
            state = "waiting-for-interface"
        rows.append(
            {
                "id": endpoint_ids.get(ep.key, 0),
                "name": ep.name,
                "namespace": ep.namespace,
                "identity": ident,
                "labels": [f"k8s:{k}={v}" for k, v in sorted(ep.labels.items())],
                "ipv4": [ip for ip in ep.ips if ":" not in ip],
                "ipv6": [ip for ip in ep.ips if ":" in ip],
                "interface": ep.interface,
                "ifindex": attached.get(ep.key),
                "ingress_enforcement": enforced["ingress"],
                "egress_enforcement": enforced["egress"],
                "status": state,
            }
        )
    return rows


def write_status(path: Path, doc: Mapping[str, Any]) -> None:
    """Replace the status file atomically. Logs (never raises) when it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(path)
    except OSError as e:
        log.warning("cannot write %s: %s", path, e)


def remove_status(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
