"""Object storage of the API server double: etcd's role plus the apiserver's registry rules, sans-I/O.

Owns every object, keyed by (resource type, namespace, name), one global resourceVersion counter (as
etcd's revision), and a bounded history of change events that watches and paginated lists are served
from. A resourceVersion older than the history (compacted, or evicted by the bound) answers 410 Expired,
as the real server does. Never does I/O: the HTTP layer calls in and subscribes to events.
Invariants: stored dicts are never mutated after they are stored (readers may hold them); every commit
gets a resourceVersion strictly greater than the one before; listeners see events in commit order.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from membrane.sandbox.apiserver.patch import PatchError, json_patch, merge_patch, strategic_merge_patch
from membrane.sandbox.apiserver.resources import CATALOG, ResourceType, find, unknown_fields
from membrane.sandbox.apiserver.selectors import FieldRequirement, Requirement, fields_match, labels_match

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace or "", name)

# Groups whose types are custom resources in a real cluster: the real server refuses strategic merge
# patches for them (415), which is why kubectl sends them JSON merge patches.
CRD_GROUPS = frozenset({"cilium.io"})
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


class ApiError(Exception):
    """A request the API refuses; becomes a metav1.Status with this code and reason."""

    def __init__(self, code: int, reason: str, message: str, details: Obj | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> Obj:
        body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                     "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(rt: ResourceType, name: str) -> Obj:
    return {"name": name, "group": rt.group, "kind": rt.plural}


def not_found(rt: ResourceType, name: str) -> ApiError:
    gr = f"{rt.plural}.{rt.group}" if rt.group else rt.plural
    return ApiError(404, "NotFound", f'{gr} "{name}" not found', _details(rt, name))


def conflict(rt: ResourceType, name: str) -> ApiError:
    gr = f"{rt.plural}.{rt.group}" if rt.group else rt.plural
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {gr} "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again", _details(rt, name))


def expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def invalid(rt: ResourceType, name: str, message: str) -> ApiError:
    gr = f"{rt.kind}.{rt.group}" if rt.group else rt.kind
    return ApiError(422, "Invalid", f'{gr} "{name}" is invalid: {message}', _details(rt, name))


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One committed change. `obj` is the new state (for DELETED: the last state, at the deletion's RV)."""

    rv: int
    type: str           # ADDED | MODIFIED | DELETED
    rtype: ResourceType
    obj: Obj
    prev: Obj | None    # the state before (None for ADDED)
    _line: list[bytes] = field(default_factory=list, repr=False, compare=False)

    def json_line(self) -> bytes:
        """The watch line for this event, encoded once and shared by every watcher that sends it unchanged."""
        if not self._line:
            self._line.append(json.dumps({"type": self.type, "object": self.obj}, separators=(",", ":")).encode()
                              + b"\n")
        return self._line[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class ListResult:
    items: list[Obj]
    resource_version: int
    continue_token: str | None
    remaining: int | None


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _content(obj: Obj) -> Obj:
    """What `generation` counts changes of: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


class Store:
    """Every object of the server, its resourceVersion counter and its bounded event history."""

    def __init__(self, *, history_size: int = 10_000, start_rv: int = 1, now: Callable[[], float] = time.time) -> None:
        self._objects: dict[ResourceType, dict[Key, Obj]] = {rt: {} for rt in CATALOG}
        self._history: deque[Event] = deque()
        self._history_size = history_size
        self._rv = start_rv
        # Every event with rv <= _compacted_rv is gone: watching or paging from before it answers 410.
        self._compacted_rv = start_rv
        self._listeners: list[Callable[[Event], None]] = []
        self._now = now
        # When set, a Pod created without spec.nodeName is bound to this node on creation, as if a
        # scheduler had run (the sandbox's single node); None leaves pods unbound until a binding.
        self.default_node: str | None = None

    # ---- observation -------------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The current (latest committed) resourceVersion."""
        return self._rv

    @property
    def compacted_rv(self) -> int:
        return self._compacted_rv

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Calls `listener` with each event committed from now on. Returns the function that unsubscribes."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)
        return unsubscribe

    def events_after(self, rv: int) -> list[Event]:
        """The retained events with a resourceVersion greater than rv, in order.

        Raises ApiError 410 Expired if events after rv were compacted away (the client must relist).
        """
        if rv < self._compacted_rv:
            raise expired(f"too old resource version: {rv} ({self._compacted_rv + 1})")
        out: list[Event] = []
        for ev in reversed(self._history):
            if ev.rv <= rv:
                break
            out.append(ev)
        out.reverse()
        return out

    def compact(self, rv: int | None = None) -> None:
        """Forgets history up to rv (default: all of it), as etcd compaction does: older RVs answer 410."""
        upto = self._rv if rv is None else min(rv, self._rv)
        while self._history and self._history[0].rv <= upto:
            self._history.popleft()
        self._compacted_rv = max(self._compacted_rv, upto)

    # ---- reads ------------------------------------------------------------------------------------------

    def get(self, rt: ResourceType, namespace: str, name: str) -> Obj:
        """Returns the stored object. Raises ApiError 404 if absent."""
        obj = self._objects[rt].get((namespace if rt.namespaced else "", name))
        if obj is None:
            raise not_found(rt, name)
        return obj

    def objects(self, rt: ResourceType, namespace: str | None = None) -> list[Obj]:
        """Every object of a type (in one namespace if given), in key order."""
        items = self._objects[rt]
        keys = sorted(k for k in items if namespace is None or k[0] == namespace)
        return [items[k] for k in keys]

    def _snapshot(self, rt: ResourceType, rv: int) -> dict[Key, Obj]:
        """The objects of a type as they were at rv, rebuilt by undoing later events from the history."""
        current = self._objects[rt]
        if rv >= self._rv:
            return current
        later = self.events_after(rv)  # raises 410 if the history no longer reaches back to rv
        state = dict(current)
        for ev in reversed(later):
            if ev.rtype is not rt:
                continue
            key = _key(rt, ev.obj)
            if ev.prev is None:
                state.pop(key, None)
            else:
                state[key] = ev.prev
        return state

    def list_objects(self, rt: ResourceType, *, namespace: str | None = None, labels: tuple[Requirement, ...] = (),
             fields: tuple[FieldRequirement, ...] = (), limit: int = 0, continue_token: str = "",
             resource_version: str = "", exact: bool = False) -> ListResult:
        """A LIST: selectors, limit and continue, served consistently at one resourceVersion.

        Returns the page. Raises ApiError 410 for a continue token or exact resourceVersion older
        than the history, 400 for a malformed token, 504 for a resourceVersion from the future.
        """
        start_after: Key | None = None
        at_rv = self._rv
        if continue_token:
            at_rv, start_after = _decode_continue(continue_token)
            if at_rv < self._compacted_rv:
                raise expired("The provided continue parameter is too old to display a consistent list result. "
                              "You can start a new list without the continue parameter, or use the continue token "
                              "in this response to retrieve the remainder of the results.")
        elif resource_version not in ("", "0"):
            try:
                wanted = int(resource_version)
            except ValueError:
                raise bad_request(f"invalid resource version: {resource_version!r}") from None
            if wanted > self._rv:
                raise ApiError(504, "Timeout", f"Too large resource version: {wanted}, current: {self._rv}",
                               {"causes": [{"reason": "ResourceVersionTooLarge",
                                            "message": "Too large resource version"}], "retryAfterSeconds": 1})
            if exact:
                at_rv = wanted
        state = self._snapshot(rt, at_rv)
        keys = sorted(k for k in state if (namespace is None or k[0] == namespace)
                      and (start_after is None or k > start_after))
        items: list[Obj] = []
        token: str | None = None
        remaining: int | None = None
        for i, key in enumerate(keys):
            obj = state[key]
            if not (labels_match(labels, obj) and fields_match(fields, obj)):
                continue
            if limit and len(items) == limit:
                token = _encode_continue(at_rv, _key(rt, items[-1]))
                if not labels and not fields:
                    remaining = len(keys) - i
                break
            items.append(obj)
        return ListResult(items=items, resource_version=at_rv, continue_token=token, remaining=remaining)

    # ---- writes -----------------------------------------------------------------------------------------

    def _commit(self, rt: ResourceType, type_: str, obj: Obj, prev: Obj | None, *, dry_run: bool = False) -> Obj:
        if dry_run:
            return obj
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        key = _key(rt, obj)
        if type_ == "DELETED":
            del self._objects[rt][key]
        else:
            self._objects[rt][key] = obj
        ev = Event(rv=self._rv, type=type_, rtype=rt, obj=obj, prev=prev)
        self._history.append(ev)
        while len(self._history) > self._history_size:
            self._compacted_rv = self._history.popleft().rv
        for listener in list(self._listeners):
            listener(ev)
        return obj

    def _check_namespace(self, rt: ResourceType, namespace: str) -> None:
        if not rt.namespaced:
            return
        ns_type = _type("", "namespaces")
        if ("", namespace) not in self._objects[ns_type]:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})

    def _prepare(self, rt: ResourceType, namespace: str, body: Any, *, name: str | None = None,
                 strict: bool = False) -> Obj:
        if not isinstance(body, dict):
            raise bad_request("the body of the request must be a JSON object")
        if strict and (unknown := unknown_fields(rt, body)):
            # fieldValidation=Strict (what kubectl sends by default): unknown fields are an error, not dropped.
            raise bad_request("strict decoding error: " + ", ".join(f'unknown field "{f}"' for f in unknown))
        obj = copy.deepcopy(body)
        if obj.get("kind", rt.kind) != rt.kind or obj.get("apiVersion", rt.api_version) != rt.api_version:
            raise bad_request(f"the API version in the data ({obj.get('apiVersion')}) and kind ({obj.get('kind')}) "
                              f"do not match the resource {rt.api_version}, Kind={rt.kind} of the request")
        obj["kind"], obj["apiVersion"] = rt.kind, rt.api_version
        meta = obj.get("metadata")
        if meta is None:
            meta = obj["metadata"] = {}
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if rt.namespaced:
            if meta.get("namespace", namespace) != namespace:
                raise bad_request("the namespace of the provided object does not match the namespace sent on the "
                                  "request")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if name is not None and meta.get("name", name) != name:
            raise bad_request("the name of the object does not match the name on the URL")
        if name is not None:
            meta["name"] = name
        if name is None and meta.get("name") not in (None, "") and not _is_dns_subdomain(meta["name"]):
            raise invalid(rt, str(meta["name"]), f"metadata.name: Invalid value: {meta['name']!r}: a lowercase RFC "
                          "1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
                          "start and end with an alphanumeric character")
        if not isinstance(meta.get("generateName", ""), str):
            raise invalid(rt, "", "metadata.generateName: Invalid value: must be a string")
        if rt.kind == "Namespace" and not rt.group and isinstance(meta.get("name"), str):
            # The real server keeps this label on every namespace (namespace selectors rely on it).
            meta["labels"] = {**(meta.get("labels") or {}), "kubernetes.io/metadata.name": meta["name"]}
        annotations = meta.get("annotations")
        if isinstance(annotations, dict) and sum(len(str(k)) + len(str(v)) for k, v in annotations.items()) > 262_144:
            # The real limit (apimachinery TotalAnnotationSizeLimitB); why big CRDs need `apply --server-side`.
            raise invalid(rt, str(meta.get("name", "")), "metadata.annotations: Too long: must have at most 262144 "
                          "bytes")
        for k in ("labels", "annotations"):
            if meta.get(k) is not None and (not isinstance(meta[k], dict)
                                            or not all(isinstance(v, str) for v in meta[k].values())):
                raise invalid(rt, str(meta.get("name", "")), f"metadata.{k}: Invalid value: values must be strings")
        meta.pop("managedFields", None)
        return obj

    def create(self, rt: ResourceType, namespace: str, body: Any, *, dry_run: bool = False,
               keep_status: bool = False, strict: bool = False) -> Obj:
        """A CREATE. Returns the stored object (uid, creationTimestamp, generation and RV set by the server).

        Raises ApiError 409 AlreadyExists, 404 if the namespace is missing, 400/422 for a malformed body.
        `keep_status` stores the body's status as given (seeding from tests; the API resets it like kube does).
        `strict` (fieldValidation=Strict) refuses unknown top-level and metadata fields with 400.
        """
        obj = self._prepare(rt, namespace, body, strict=strict)
        meta = obj["metadata"]
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789")
                                                               for _ in range(5))
            else:
                raise invalid(rt, "", "metadata.name: Required value: name or generateName is required")
        self._check_namespace(rt, namespace)
        key = _key(rt, obj)
        if key in self._objects[rt]:
            gr = f"{rt.plural}.{rt.group}" if rt.group else rt.plural
            raise ApiError(409, "AlreadyExists", f'{gr} "{meta["name"]}" already exists', _details(rt, meta["name"]))
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _rfc3339(self._now())
        meta["generation"] = 1
        for k in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(k, None)
        if not keep_status:
            _reset_status(rt, obj)
        if self.default_node and rt.kind == "Pod" and not rt.group and isinstance(obj.get("spec"), dict) \
                and not obj["spec"].get("nodeName"):
            obj["spec"]["nodeName"] = self.default_node  # the scheduler's job, done at once (see __init__)
        return self._commit(rt, "ADDED", obj, None, dry_run=dry_run)

    def update(self, rt: ResourceType, namespace: str, name: str, body: Any, *, subresource: str = "",
               dry_run: bool = False, strict: bool = False) -> Obj:
        """An UPDATE (PUT) of the object or of its status subresource.

        Returns the stored object. Raises ApiError 404 if absent, 409 Conflict if the body's
        metadata.resourceVersion is set and not the current one, 400/422 for a malformed body.
        """
        old = self.get(rt, namespace, name)
        obj = self._prepare(rt, namespace, body, name=name, strict=strict)
        wanted = obj["metadata"].get("resourceVersion")
        if wanted in (None, "") and rt.group in CRD_GROUPS:
            # Custom resources do not allow unconditional updates (AllowUnconditionalUpdate is false).
            raise invalid(rt, name, "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update")
        if wanted not in (None, "") and wanted != old["metadata"]["resourceVersion"]:
            raise conflict(rt, name)
        return self._replace(rt, old, obj, subresource=subresource, dry_run=dry_run)

    def _replace(self, rt: ResourceType, old: Obj, obj: Obj, *, subresource: str, dry_run: bool) -> Obj:
        if subresource == "status":
            # A status write changes status alone (metadata and spec are taken from the stored object).
            new = copy.deepcopy(old)
            if "status" in obj:
                new["status"] = obj["status"]
            else:
                new.pop("status", None)
        else:
            new = obj
            if rt.has_status:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
        meta, old_meta = new["metadata"], old["metadata"]
        for k in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "namespace", "name"):
            if k in old_meta:
                meta[k] = old_meta[k]
            else:
                meta.pop(k, None)
        meta["generation"] = old_meta.get("generation", 1) + (1 if _content(new) != _content(old) else 0)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if new == old:
            return old  # a no-op write commits nothing, like the real server (no new RV, no event)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._commit(rt, "DELETED", new, old, dry_run=dry_run)
        return self._commit(rt, "MODIFIED", new, old, dry_run=dry_run)

    def patch(self, rt: ResourceType, namespace: str, name: str, patch_type: str, body: Any, *,
              subresource: str = "", dry_run: bool = False, field_manager: str = "", strict: bool = False) -> Obj:
        """A PATCH. `patch_type` is the media type without parameters.

        Returns the stored object. Raises ApiError 404, 409 (a patch carrying a stale resourceVersion),
        415 for an unsupported patch type, 422 for a patch that does not apply.
        """
        if patch_type == "application/apply-patch+yaml":
            return self._apply(rt, namespace, name, body, subresource=subresource, dry_run=dry_run,
                               field_manager=field_manager)
        old = self.get(rt, namespace, name)
        base = copy.deepcopy(old)
        try:
            match patch_type:
                case "application/merge-patch+json":
                    new = merge_patch(base, body)
                case "application/json-patch+json":
                    new = json_patch(base, body)
                case "application/strategic-merge-patch+json" if rt.group not in CRD_GROUPS:
                    new = strategic_merge_patch(base, body)
                case _:
                    raise ApiError(415, "UnsupportedMediaType",
                                   f"the body of the request was in an unknown format - accepted media types "
                                   f"include: application/json-patch+json, application/merge-patch+json, "
                                   f"application/apply-patch+yaml{'' if rt.group in CRD_GROUPS else ', application/strategic-merge-patch+json'}")
        except PatchError as e:
            raise invalid(rt, name, str(e)) from None
        if not isinstance(new, dict):
            raise invalid(rt, name, "the patched object is not a JSON object")
        wanted = (new.get("metadata") or {}).get("resourceVersion")
        if wanted not in (None, "") and wanted != old["metadata"]["resourceVersion"]:
            raise conflict(rt, name)
        obj = self._prepare(rt, namespace, new, name=name, strict=strict)
        return self._replace(rt, old, obj, subresource=subresource, dry_run=dry_run)

    def _apply(self, rt: ResourceType, namespace: str, name: str, body: Any, *, subresource: str, dry_run: bool,
               field_manager: str) -> Obj:
        # Server-side apply without managed fields: the applied configuration is merged over the live
        # object (strategic list keys), creating it if absent. Fields a manager stops applying are kept.
        if not field_manager:
            raise bad_request("PATCH, fieldManager: Required value: is required for apply patch")
        if not isinstance(body, dict):
            raise bad_request("apply patch: the body must be an object")
        try:
            old = self.get(rt, namespace, name)
        except ApiError:
            if subresource:
                raise
            return self.create(rt, namespace, {**body, "metadata": {**(body.get("metadata") or {}), "name": name}},
                               dry_run=dry_run)
        obj = self._prepare(rt, namespace, strategic_merge_patch(copy.deepcopy(old), body), name=name)
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted not in (None, "") and wanted != old["metadata"]["resourceVersion"]:
            raise conflict(rt, name)
        return self._replace(rt, old, obj, subresource=subresource, dry_run=dry_run)

    def bind(self, namespace: str, name: str, body: Any, *, dry_run: bool = False) -> Obj:
        """POST pods/<name>/binding (what a scheduler does): sets spec.nodeName once.

        Returns the bound pod. Raises ApiError 404 if the pod is absent, 409 if it is already bound,
        400 if the Binding names no node.
        """
        pods = _type("", "pods")
        old = self.get(pods, namespace, name)
        target = body.get("target") if isinstance(body, dict) else None
        node = target.get("name") if isinstance(target, dict) else None
        if not isinstance(node, str) or not node:
            raise bad_request("Binding: target.name (the node) is required")
        bound = (old.get("spec") or {}).get("nodeName")
        if bound:
            raise ApiError(409, "Conflict", f"Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is "
                           f"already assigned to node \"{bound}\"", _details(pods, name))
        new = copy.deepcopy(old)
        new.setdefault("spec", {})["nodeName"] = node
        return self._commit(pods, "MODIFIED", new, old, dry_run=dry_run)

    def delete(self, rt: ResourceType, namespace: str, name: str, *, options: Obj | None = None,
               dry_run: bool = False) -> Obj:
        """A DELETE. Returns the object as deleted (or as marked, when finalizers hold it).

        Raises ApiError 404 if absent, 409 if DeleteOptions preconditions (uid, resourceVersion) fail.
        A namespace takes every object in it along (the namespace controller's job, done at once here).
        """
        old = self.get(rt, namespace, name)
        if options is not None and not isinstance(options, dict):
            raise bad_request("DeleteOptions must be a JSON object")
        if rt.kind == "Namespace" and not rt.group and name in ("default", "kube-system", "kube-public"):
            raise ApiError(403, "Forbidden", f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                           _details(rt, name))
        pre = (options or {}).get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
            raise ApiError(409, "Conflict", f"Precondition failed: UID in precondition: {pre['uid']}, UID in object "
                           f"meta: {old['metadata']['uid']}", _details(rt, name))
        if pre.get("resourceVersion") and pre["resourceVersion"] != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f"Precondition failed: ResourceVersion in precondition: "
                           f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                           f"{old['metadata']['resourceVersion']}", _details(rt, name))
        obj = copy.deepcopy(old)
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return old
            obj["metadata"]["deletionTimestamp"] = _rfc3339(self._now())
            obj["metadata"]["deletionGracePeriodSeconds"] = 0
            return self._commit(rt, "MODIFIED", obj, old, dry_run=dry_run)
        if rt.plural == "namespaces" and not rt.group and not dry_run:
            for other in CATALOG:
                if other.namespaced:
                    for child in self.objects(other, name):
                        self._commit(other, "DELETED", copy.deepcopy(child), child)
        return self._commit(rt, "DELETED", obj, old, dry_run=dry_run)

    def delete_collection(self, rt: ResourceType, namespace: str | None, labels: tuple[Requirement, ...],
                          fields: tuple[FieldRequirement, ...], *, dry_run: bool = False) -> list[Obj]:
        """A DELETE on a collection: deletes each matching object. Returns them as deleted."""
        page = self.list_objects(rt, namespace=namespace, labels=labels, fields=fields)
        return [self.delete(rt, o["metadata"].get("namespace", ""), o["metadata"]["name"], dry_run=dry_run)
                for o in page.items]

    # ---- seeding and persistence --------------------------------------------------------------------------

    def put(self, body: Obj) -> Obj:
        """Creates or replaces an object from a full manifest, status included (seeding by tests and tools).

        Returns the stored object. Raises ApiError 404 for an unserved apiVersion/kind or missing namespace.
        """
        rt = _type_of(body)
        meta = body.get("metadata") or {}
        namespace = meta.get("namespace", "default") if rt.namespaced else ""
        try:
            old = self.get(rt, namespace, meta.get("name", ""))
        except ApiError:
            return self.create(rt, namespace, body, keep_status=True)
        obj = self._prepare(rt, namespace, body, name=old["metadata"]["name"])
        new = self._replace(rt, old, obj, subresource="", dry_run=False)
        if body.get("status") != new.get("status"):
            new = self._replace(rt, new, self._prepare(rt, namespace, body, name=old["metadata"]["name"]),
                                subresource="status", dry_run=False)
        return new

    def seed_defaults(self, *, server_ip: str, server_port: int) -> None:
        """Creates what every cluster has: the default namespaces and the default/kubernetes Service and
        EndpointSlice (the address the `kube-apiserver` entity stands for)."""
        for ns in DEFAULT_NAMESPACES:
            if ("", ns) not in self._objects[_type("", "namespaces")]:
                self.create(_type("", "namespaces"), "",
                            {"metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}})
        svc = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "kubernetes", "namespace": "default",
                            "labels": {"component": "apiserver", "provider": "kubernetes"}},
               "spec": {"type": "ClusterIP", "ports": [{"name": "https", "port": 443, "protocol": "TCP",
                                                        "targetPort": server_port}]}}
        eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "kubernetes", "namespace": "default",
                            "labels": {"kubernetes.io/service-name": "kubernetes",
                                       "endpointslice.kubernetes.io/managed-by": "endpointslicemirroring-controller.k8s.io"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": [server_ip], "conditions": {"ready": True}}],
               "ports": [{"name": "https", "port": server_port, "protocol": "TCP"}]}
        for body in (svc, eps):
            self.put(body)

    @staticmethod
    def dump_types() -> tuple[ResourceType, ...]:
        """Every type a store holds (the catalog)."""
        return CATALOG

    def dump(self) -> Obj:
        """The whole state as JSON-able data (objects and the RV counter; the history is not kept)."""
        return {"resourceVersion": self._rv,
                "objects": [o for rt in CATALOG for o in self.objects(rt)]}

    def load(self, data: Obj) -> None:
        """Replaces the state with a dump. History starts empty, so RVs from before answer 410."""
        for rt in CATALOG:
            self._objects[rt] = {}
        for obj in data.get("objects", []):
            rt = _type_of(obj)
            self._objects[rt][_key(rt, obj)] = obj
        self._rv = max(self._rv, int(data.get("resourceVersion", 0)))
        self._history.clear()
        self._compacted_rv = self._rv


_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _is_dns_subdomain(name: object) -> bool:
    return isinstance(name, str) and len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name) is not None


def _type(group: str, plural: str) -> ResourceType:
    rt = next((r for r in CATALOG if r.group == group and r.plural == plural), None)
    assert rt is not None, (group, plural)
    return rt


def _type_of(body: Obj) -> ResourceType:
    api_version, kind = str(body.get("apiVersion", "")), str(body.get("kind", ""))
    group, _, version = api_version.rpartition("/")
    for rt in CATALOG:
        if rt.group == group and rt.version == version and rt.kind == kind:
            return rt
    raise ApiError(404, "NotFound", f"the server could not find the requested resource ({api_version}, Kind={kind})")


def _key(rt: ResourceType, obj: Obj) -> Key:
    meta = obj["metadata"]
    return (meta.get("namespace", "") if rt.namespaced else "", meta["name"])


def _reset_status(rt: ResourceType, obj: Obj) -> None:
    # What each registry's PrepareForCreate does with a client-sent status.
    if not rt.has_status:
        return
    if rt.kind == "Pod" and not rt.group:
        obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
    elif rt.kind == "Namespace" and not rt.group:
        obj["status"] = {"phase": "Active"}
    elif rt.kind == "Node" and not rt.group:
        obj.setdefault("status", {})
    else:
        obj.pop("status", None)


def _encode_continue(rv: int, key: Key) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": "/".join(key) + "\x00"}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, Key]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        ns, _, name = str(data["start"]).rstrip("\x00").partition("/")
        return int(data["rv"]), (ns, name)
    except (ValueError, KeyError, TypeError):
        raise bad_request(f"continue key is not valid: {token!r}") from None


def resource_type(group: str, version: str, plural: str) -> ResourceType:
    """Returns the served type. Raises ApiError 404 (the real server's wording) if there is none."""
    rt = find(group, version, plural)
    if rt is None:
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    return rt
