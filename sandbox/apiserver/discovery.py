"""Discovery documents: /version, /api, /apis, each group/version's APIResourceList, the aggregated
discovery form (apidiscovery.k8s.io/v2) kubectl asks for first, and the OpenAPI documents it fetches.

Pure functions of the resource catalog; never touches stored objects. The OpenAPI v3 documents say
only what kubectl checks before a write: that PATCH takes the `fieldValidation` query parameter, so
kubectl validates on the server (which accepts any fields here) instead of needing full schemas.
"""

from __future__ import annotations

from typing import Any

from membrane.sandbox.apiserver.resources import CATALOG, GROUPS, SUBRESOURCE_VERBS, ResourceType, by_group_version

Obj = dict[str, Any]

KUBE_VERSION = {"major": "1", "minor": "37", "emulationMajor": "1", "emulationMinor": "37",
                "minCompatibilityMajor": "1", "minCompatibilityMinor": "36", "gitVersion": "v1.37.0-membrane",
                "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25.0", "compiler": "gc",
                "platform": "linux/amd64"}

AGGREGATED_MEDIA_TYPE = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"


def _group_versions() -> list[tuple[str, str]]:
    return list(dict.fromkeys((r.group, r.version) for r in CATALOG if r.group))


def api_versions(server_address: str) -> Obj:
    """GET /api: the legacy group's versions."""
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]}


def _api_group(group: str) -> Obj:
    versions = [{"groupVersion": f"{g}/{v}", "version": v} for g, v in _group_versions() if g == group]
    return {"name": group, "versions": versions, "preferredVersion": versions[0]}


def api_group_list() -> Obj:
    """GET /apis: every named group with its versions."""
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_api_group(g) for g in GROUPS]}


def api_group(group: str) -> Obj | None:
    """GET /apis/<group>, or None if the group is not served."""
    if group not in GROUPS:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_api_group(group)}


def _resource_entries(rt: ResourceType) -> list[Obj]:
    main: Obj = {"name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced, "kind": rt.kind,
                 "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]}
    if rt.short_names:
        main["shortNames"] = list(rt.short_names)
    if rt.categories:
        main["categories"] = list(rt.categories)
    entries = [main]
    if rt.has_status:
        entries.append({"name": f"{rt.plural}/status", "singularName": "", "namespaced": rt.namespaced,
                        "kind": rt.kind, "verbs": list(SUBRESOURCE_VERBS)})
    if rt.kind == "Pod" and not rt.group:
        entries.append({"name": "pods/binding", "singularName": "", "namespaced": True, "kind": "Binding",
                        "verbs": ["create"]})
    return entries


def api_resource_list(group: str, version: str) -> Obj | None:
    """GET /api/v1 or /apis/<group>/<version>: the APIResourceList, or None if not served."""
    types = by_group_version(group, version)
    if not types:
        return None
    gv = f"{group}/{version}" if group else version
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
            "resources": [e for rt in types.values() for e in _resource_entries(rt)]}


def _aggregated_resource(rt: ResourceType) -> Obj:
    kind = {"group": rt.group, "version": rt.version, "kind": rt.kind}
    entry: Obj = {"resource": rt.plural, "responseKind": kind, "scope": "Namespaced" if rt.namespaced else "Cluster",
                  "singularResource": rt.singular,
                  "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]}
    if rt.short_names:
        entry["shortNames"] = list(rt.short_names)
    if rt.categories:
        entry["categories"] = list(rt.categories)
    subresources = []
    if rt.has_status:
        subresources.append({"subresource": "status", "responseKind": kind, "verbs": list(SUBRESOURCE_VERBS)})
    if rt.kind == "Pod" and not rt.group:
        subresources.append({"subresource": "binding", "responseKind": {"group": "", "version": "v1",
                                                                         "kind": "Binding"}, "verbs": ["create"]})
    if subresources:
        entry["subresources"] = subresources
    return entry


def aggregated(legacy: bool) -> Obj:
    """GET /api (legacy=True) or /apis with Accept naming APIGroupDiscoveryList: one document for all."""
    pairs = [("", "v1")] if legacy else _group_versions()
    items = []
    for group in dict.fromkeys(g for g, _ in pairs):
        versions = [{"version": v, "freshness": "Current",
                     "resources": [_aggregated_resource(rt) for rt in by_group_version(g, v).values()]}
                    for g, v in pairs if g == group]
        items.append({"metadata": {"name": group} if group else {}, "versions": versions})
    return {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items}


def _openapi_paths(group: str, version: str) -> str:
    return f"api/{version}" if not group else f"apis/{group}/{version}"


def openapi_v3_root() -> Obj:
    """GET /openapi/v3: where each group/version's document lives."""
    paths = {_openapi_paths(g, v): {"serverRelativeURL": f"/openapi/v3/{_openapi_paths(g, v)}?hash=membrane"}
             for g, v in [("", "v1"), *_group_versions()]}
    return {"paths": paths}


_FIELD_VALIDATION = {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True},
                     "description": "Ignore, Warn or Strict: how unknown or duplicate fields are handled."}


def openapi_v3_document(group: str, version: str) -> Obj | None:
    """GET /openapi/v3/<api/v1 | apis/g/v>: the paths of each resource, with the query parameters
    kubectl probes (fieldValidation on PATCH and POST) and gvk extensions. No schemas (kubectl then
    validates on the server)."""
    types = by_group_version(group, version)
    if not types:
        return None
    prefix = "/" + _openapi_paths(group, version)
    paths: Obj = {}
    for rt in types.values():
        gvk = {"group": rt.group, "version": rt.version, "kind": rt.kind}
        ops = {m: {"parameters": [_FIELD_VALIDATION], "x-kubernetes-group-version-kind": gvk,
                   "responses": {"200": {"description": "OK"}}} for m in ("post", "put", "patch")}
        collection = f"{prefix}/namespaces/{{namespace}}/{rt.plural}" if rt.namespaced else f"{prefix}/{rt.plural}"
        paths[collection] = {"post": ops["post"]}
        paths[collection + "/{name}"] = {"put": ops["put"], "patch": ops["patch"]}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.37.0"}, "paths": paths,
            "components": {"schemas": {}}}
