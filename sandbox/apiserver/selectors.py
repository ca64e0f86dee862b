"""Label and field selectors as the Kubernetes API accepts them in `labelSelector` and `fieldSelector`.

Label syntax (apimachinery's labels.Parse): comma-separated requirements `k=v`, `k==v`, `k!=v`,
`k in (a,b)`, `k notin (a,b)`, `k` (exists) and `!k` (does not exist); every requirement must hold.
Field syntax (fields.ParseSelector): `path=v`, `path==v`, `path!=v`, comma-separated. Parsing raises
SelectorError with the offending text; matching is total (a missing field or label never raises).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


class SelectorError(ValueError):
    """A selector that does not parse, or names a field the resource cannot be selected by (HTTP 400)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Requirement:
    key: str
    op: str                      # one of "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()  # one value for = and !=, the set for in/notin, () otherwise

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        match self.op:
            case "=" | "in":
                return present and labels[self.key] in self.values
            case "!=" | "notin":
                # apimachinery: `k!=v` and `k notin (..)` also match objects without the label.
                return not present or labels[self.key] not in self.values
            case "exists":
                return present
            case _:
                return not present


# A label key: optional DNS-subdomain prefix and a name of at most 63 characters (validation is lenient).
_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_VALUE = r"[-A-Za-z0-9_.]*"
_SET_RE = re.compile(rf"\s*(!?)\s*({_KEY})\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")
_EQ_RE = re.compile(rf"\s*({_KEY})\s*(==|=|!=)\s*({_VALUE})\s*$")


def _split_top_level(text: str) -> list[str]:
    """Splits on commas outside parentheses: `a in (x,y),b` -> [`a in (x,y)`, `b`]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_label_selector(text: str) -> tuple[Requirement, ...]:
    """Parses a labelSelector query value.

    Returns the requirements (empty for an empty selector, which matches everything).
    Raises SelectorError naming the requirement that does not parse.
    """
    if not text.strip():
        return ()
    reqs: list[Requirement] = []
    for part in _split_top_level(text):
        if m := _EQ_RE.match(part):
            key, op, value = m.groups()
            reqs.append(Requirement(key=key, op="!=" if op == "!=" else "=", values=(value,)))
            continue
        m = _SET_RE.match(part)
        if m is None:
            raise SelectorError(f"unable to parse requirement: {part.strip()!r} in labelSelector {text!r}")
        neg, key, op, values = m.groups()
        if op is not None:
            if neg:
                raise SelectorError(f"unable to parse requirement: {part.strip()!r}: '!' only negates a bare key")
            vals = tuple(v.strip() for v in values.split(",") if v.strip())
            if not vals:
                raise SelectorError(f"unable to parse requirement: {part.strip()!r}: empty value set")
            reqs.append(Requirement(key=key, op=op, values=vals))
        else:
            reqs.append(Requirement(key=key, op="!" if neg else "exists"))
    return tuple(reqs)


def labels_match(reqs: tuple[Requirement, ...], obj: dict[str, Any]) -> bool:
    """True if the object's metadata.labels satisfy every requirement."""
    if not reqs:
        return True
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(r.matches(labels) for r in reqs)


@dataclass(frozen=True, slots=True, kw_only=True)
class FieldRequirement:
    path: str
    equal: bool   # True for = and ==, False for !=
    value: str


def parse_field_selector(text: str, allowed: tuple[str, ...]) -> tuple[FieldRequirement, ...]:
    """Parses a fieldSelector query value against the fields this resource can be selected by.

    Returns the requirements. Raises SelectorError for bad syntax or an unsupported field, with the
    real server's wording ("field label not supported: x").
    """
    if not text.strip():
        return ()
    reqs: list[FieldRequirement] = []
    for part in text.split(","):
        m = re.match(r"\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if m is None:
            raise SelectorError(f"invalid selector: {part.strip()!r} in fieldSelector {text!r}")
        path, op, value = m.groups()
        if path not in allowed:
            raise SelectorError(f"field label not supported: {path}")
        reqs.append(FieldRequirement(path=path, equal=op != "!=", value=value))
    return tuple(reqs)


def field_value(obj: dict[str, Any], path: str) -> str:
    """The string a field selector compares with: "" for absent fields, Go's spelling of booleans."""
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def fields_match(reqs: tuple[FieldRequirement, ...], obj: dict[str, Any]) -> bool:
    """True if every field requirement holds for the object."""
    return all((field_value(obj, r.path) == r.value) == r.equal for r in reqs)
