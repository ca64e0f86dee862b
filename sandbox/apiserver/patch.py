"""The patch formats of PATCH requests: JSON merge patch, JSON patch, strategic merge patch, apply.

- merge (RFC 7386): objects merge recursively, null deletes, anything else replaces.
- json (RFC 6902): add, remove, replace, move, copy, test, with JSON pointers (RFC 6901).
- strategic (the subset kubectl's client-side apply, label and annotate send for built-in types):
  merge semantics, plus lists merged by their merge key (containers by name, ...), `$patch` directives,
  and `$setElementOrder/`, `$retainKeys`, `$deleteFromPrimitiveList/` keys.
Pure functions on JSON values; the input objects are never mutated. Errors are PatchError (HTTP 422/400).
"""

from __future__ import annotations

import copy
from typing import Any


class PatchError(ValueError):
    """A patch that does not apply (a failed `test`, a path that does not exist, a malformed document)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """Applies an RFC 7386 merge patch. Returns the new value."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"json patch: path {path!r} does not start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _container(doc: Any, parts: list[str], path: str) -> Any:
    cur = doc
    for p in parts[:-1]:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and p.isdigit() and int(p) < len(cur):
            cur = cur[int(p)]
        else:
            raise PatchError(f"json patch: path {path!r} does not exist")
    return cur


def _get(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        return doc
    parent = _container(doc, parts, path)
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        return parent[last]
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent[int(last)]
    raise PatchError(f"json patch: path {path!r} does not exist")


def _remove(doc: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        raise PatchError("json patch: cannot remove the whole document")
    parent = _container(doc, parts, path)
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent.pop(int(last))
    raise PatchError(f"json patch: path {path!r} does not exist")


def _add(doc: Any, path: str, value: Any, *, replace: bool) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    parent = _container(doc, parts, path)
    last = parts[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise PatchError(f"json patch: path {path!r} does not exist")
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-" and not replace:
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent) - (1 if replace else 0):
            if replace:
                parent[int(last)] = value
            else:
                parent.insert(int(last), value)
        else:
            raise PatchError(f"json patch: index {last!r} out of range at {path!r}")
    else:
        raise PatchError(f"json patch: path {path!r} does not exist")
    return doc


def json_patch(target: Any, ops: Any) -> Any:
    """Applies an RFC 6902 JSON patch (a list of operations). Returns the new document."""
    if not isinstance(ops, list):
        raise PatchError("json patch: the body must be a JSON array of operations")
    doc = copy.deepcopy(target)
    for i, op in enumerate(ops):
        if not isinstance(op, dict) or not isinstance(op.get("path"), str):
            raise PatchError(f"json patch: operation {i} has no 'path'")
        kind, path = op.get("op"), op["path"]
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"json patch: operation {i} ({kind}) has no 'value'")
        match kind:
            case "add":
                doc = _add(doc, path, copy.deepcopy(op["value"]), replace=False)
            case "replace":
                doc = _add(doc, path, copy.deepcopy(op["value"]), replace=True)
            case "remove":
                _remove(doc, path)
            case "move":
                doc = _add(doc, path, _remove(doc, str(op.get("from", ""))), replace=False)
            case "copy":
                doc = _add(doc, path, copy.deepcopy(_get(doc, str(op.get("from", "")))), replace=False)
            case "test":
                if _get(doc, path) != op["value"]:
                    raise PatchError(f"json patch: test failed at {path!r}")
            case _:
                raise PatchError(f"json patch: operation {i} has unknown op {kind!r}")
    return doc


# Lists that strategic merge patch merges element-wise, by field name -> merge key (the Go struct tags
# `patchStrategy:"merge" patchMergeKey:"..."` of the core types kubectl sends patches for).
_MERGE_KEYS: dict[str, str] = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "volumes": "name",
    "env": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath", "ports": "containerPort",
    "conditions": "type", "ownerReferences": "uid", "imagePullSecrets": "name", "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey", "resourceClaims": "name", "tolerations": "key",
}
# Lists of scalars that merge as sets (`patchStrategy:"merge"` on a []string).
_MERGE_SCALAR_LISTS = frozenset({"finalizers"})


def _merge_list(field: str, target: list[Any], patch: list[Any]) -> list[Any]:
    key = _MERGE_KEYS.get(field)
    if field in _MERGE_SCALAR_LISTS:
        return list(target) + [v for v in patch if v not in target]
    if key is None or not all(isinstance(e, dict) for e in patch):
        return copy.deepcopy(patch)
    if any(isinstance(e, dict) and e.get("$patch") == "replace" for e in patch):
        return [copy.deepcopy(e) for e in patch if not (isinstance(e, dict) and "$patch" in e)]
    result = [copy.deepcopy(e) for e in target]
    for elem in patch:
        ident = elem.get(key)
        idx = next((i for i, e in enumerate(result) if isinstance(e, dict) and e.get(key) == ident), None)
        if elem.get("$patch") == "delete":
            if idx is not None:
                result.pop(idx)
        elif idx is None:
            result.append(strategic_merge_patch({}, elem))
        else:
            result[idx] = strategic_merge_patch(result[idx], elem)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Applies a strategic merge patch (the subset described in the module docstring). Returns the new value."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = dict(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            if isinstance(result.get(name), list) and isinstance(value, list):
                result[name] = [v for v in result[name] if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _merge_list(key, result[key], value)
        elif isinstance(value, list):
            result[key] = [strategic_merge_patch({}, e) if isinstance(e, dict) else e for e in value
                           if not (isinstance(e, dict) and e.get("$patch") == "delete")]
        else:
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result
