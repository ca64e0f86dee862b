"""A reflector: one Kubernetes resource kind mirrored into a local store by LIST, then WATCH.

Rules, as client-go's reflector keeps them:
- LIST (in chunks), replace the store with exactly what was listed (objects deleted during a gap
  disappear: the "sweep"), then WATCH from the list's resourceVersion.
- A watch that ends or breaks is resumed from the last resourceVersion seen (events and bookmarks
  both advance it), after a jittered, growing pause; a 410 Gone (history expired) relists.
- `synced` is set after the first successful LIST; `on_change` is called after every change to
  the store (the caller coalesces).
The store holds raw object dicts keyed by "namespace/name" (or "name" for cluster-scoped kinds).
The client is lightkube's AsyncClient; it cannot ask for bookmarks (`allowWatchBookmarks`), so
bookmarks are used when a server sends them anyway and otherwise the last event's version is.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from lightkube import ALL_NS, ApiError, AsyncClient
from lightkube.types import OnErrorAction, OnErrorResult

log = logging.getLogger("membrane.k8s")

GONE = 410
BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 30.0
WATCH_TIMEOUT_S = 300  # the server closes each watch after this; it is resumed from the last version
CHUNK = 500  # LIST page size (limit + continue)


def object_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


def backoff_s(attempt: int, *, rng: Callable[[], float] = random.random) -> float:
    """The pause before retry `attempt` (1-based): doubling from 0.2 s to 30 s, with ±50% jitter so that
    every agent of a cluster does not reconnect to a restarted API server in the same instant."""
    base = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** max(0, attempt - 1))
    return float(base * (0.5 + rng()))


@dataclass(frozen=True, slots=True)
class Kind:
    """What to mirror: a lightkube resource class, whether it is namespaced, and optional selectors."""

    name: str  # for logs and metrics: "pods", "ciliumnetworkpolicies", ...
    resource: Any  # a lightkube resource class (typed or generic)
    namespaced: bool
    namespace: str | None = None  # a single namespace; None = all (for namespaced kinds)
    fields: dict[str, Any] | None = None  # fieldSelector
    labels: dict[str, Any] | None = None  # labelSelector
    # What the store keeps of each object (it must keep metadata.name and .namespace); None = all of it.
    # Applied to listed and watched objects alike, so a change to a dropped field is no change at all.
    keep: Callable[[dict[str, Any]], dict[str, Any]] | None = None


class Reflector:
    """Mirrors one Kind. `run()` loops until cancelled; `store` is the mirror."""

    def __init__(self, client: AsyncClient, kind: Kind, on_change: Callable[[str], None]) -> None:
        self.client = client
        self.kind = kind
        self.on_change = on_change
        self.store: dict[str, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self.resource_version: str | None = None
        self.relists = 0
        self.restarts = 0
        self.last_error: str | None = None

    def _ns(self) -> str | None:
        if not self.kind.namespaced:
            return None
        return self.kind.namespace or ALL_NS

    async def _list(self) -> None:
        listing = self.client.list(
            self.kind.resource, namespace=self._ns(), chunk_size=CHUNK, labels=self.kind.labels, fields=self.kind.fields
        )
        fresh: dict[str, dict[str, Any]] = {}
        async for obj in listing:
            d = self._keep(_as_dict(obj))
            fresh[object_key(d)] = d
        self.resource_version = str(listing.resourceVersion)  # set once the first page arrived, even if empty
        changed = fresh != self.store
        self.store = fresh  # the sweep: whatever was deleted while we were not watching is gone now
        self.relists += 1
        self.synced.set()
        if changed or self.relists == 1:
            self.on_change(self.kind.name)

    def _keep(self, d: dict[str, Any]) -> dict[str, Any]:
        return d if self.kind.keep is None else self.kind.keep(d)

    def _on_watch_error(self, e: Exception, count: int) -> OnErrorResult:
        if isinstance(e, ApiError) and e.status.code == GONE:
            return OnErrorResult(OnErrorAction.RAISE)  # history expired: relist
        if count > 5:
            return OnErrorResult(OnErrorAction.RAISE)  # resuming keeps failing: start over with a LIST
        self.restarts += 1
        self.last_error = f"{type(e).__name__}: {e}"
        log.info("%s watch interrupted (%s); resuming from %s", self.kind.name, self.last_error, self.resource_version)
        return OnErrorResult(OnErrorAction.RETRY, sleep=backoff_s(count))

    def _apply(self, event: str, obj: Any) -> None:
        d = _as_dict(obj)
        rv = (d.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.resource_version = str(rv)
        if event == "BOOKMARK":
            return
        d = self._keep(d)
        key = object_key(d)
        if event == "DELETED":
            if self.store.pop(key, None) is None:
                return
        elif event in ("ADDED", "MODIFIED"):
            if self.store.get(key) == d:
                return
            self.store[key] = d
        else:
            return
        self.on_change(self.kind.name)

    async def run(self) -> None:
        """LIST + WATCH forever (until cancelled), relisting on 410 and after repeated failures."""
        attempt = 0
        while True:
            try:
                await self._list()
                attempt = 0
                async for event, obj in self.client.watch(
                    self.kind.resource,
                    namespace=self._ns(),
                    labels=self.kind.labels,
                    fields=self.kind.fields,
                    resource_version=self.resource_version,
                    server_timeout=WATCH_TIMEOUT_S,
                    on_error=self._on_watch_error,
                ):
                    self._apply(event, obj)
            except asyncio.CancelledError:
                raise
            except ApiError as e:
                self.last_error = f"{e.status.code} {e.status.reason}: {e.status.message}"
                if e.status.code == GONE:
                    log.info("%s: resourceVersion %s expired; relisting", self.kind.name, self.resource_version)
                    continue  # relist at once: 410 is routine after a long gap
                attempt += 1
                log.warning("%s: %s; retrying", self.kind.name, self.last_error)
            except (httpx.HTTPError, OSError, ValueError) as e:
                attempt += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("%s: %s; relisting after a pause", self.kind.name, self.last_error)
            await asyncio.sleep(backoff_s(max(1, attempt)))


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    out = obj.to_dict()
    assert isinstance(out, dict)
    return out
