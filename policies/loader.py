"""YAML text -> documents -> policies / endpoints, collecting every error with its location.

Never reads files: callers pass the text and a source name (usually the file name). A file may
hold several `---` documents; each is decoded on its own, so a syntax error in one document leaves
the others loadable. Duplicate mapping keys are errors (kubectl rejects them too). A document's
line is where its content starts (1-based).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from membrane.policies.crd import Policy, object_name, parse_policy
from membrane.policies.errors import PolicyError, PolicyValidationError, PolicyYamlError

MAX_NODES = 200_000  # a decoded document bigger than this (aliases included) is refused, not walked
_SEPARATOR = re.compile(r"^(---|\.\.\.)(\s|$)")


class _Loader(yaml.CSafeLoader):
    """Safe YAML 1.1 loading that refuses duplicate keys and notes whether aliases were used.

    Sequences and mappings are built directly (not through PyYAML's two-step generators), which
    halves load time; a self-referencing alias is an error instead of a cyclic structure.
    """

    aliased = False

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        if node in self.constructed_objects:
            self.aliased = True
        return super().construct_object(node, deep=deep)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Any:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    seen: set[tuple[str, str]] = set()
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            ident = (key_node.tag, key_node.value)
            if ident in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate mapping key {key_node.value!r}", key_node.start_mark
                )
            seen.add(ident)
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "found an unhashable mapping key", key_node.start_mark) from None
        if key in out:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate mapping key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> Any:
    return [loader.construct_object(child, deep=True) for child in node.value]


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


@dataclass(frozen=True, slots=True)
class Document:
    """One decoded YAML document. `data` is None for an empty document."""

    source: str
    index: int  # 1-based position in the text
    line: int  # 1-based line where the content starts
    data: Any


def _too_big(data: Any) -> bool:
    budget = MAX_NODES
    stack = [data]
    while stack:
        item = stack.pop()
        budget -= 1
        if budget < 0:
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def iter_documents(text: str | bytes, source: str) -> Iterator[Document | PolicyYamlError]:
    """Split `text` into documents and decode each. Yields a Document or the PolicyYamlError for it."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            yield PolicyYamlError(f"not UTF-8 text: {e.reason} at byte {e.start}", source=source, line=1)
            return
    lines = text.splitlines(keepends=True)
    chunks: list[tuple[int, list[str]]] = []  # (first line number, lines)
    current: list[str] = []
    start = 1
    for n, line in enumerate(lines, start=1):
        if _SEPARATOR.match(line):
            if current:
                chunks.append((start, current))
            # `--- {inline: doc}`: keep the content after the marker on this line
            rest = line[3:] if line.startswith("---") else ""
            current = [rest] if rest.strip() and not rest.strip().startswith("#") else []
            start = n if current else n + 1
        else:
            if not current:
                start = n
            current.append(line)
    if current:
        chunks.append((start, current))
    index = 0
    for first, chunk in chunks:
        body = "".join(chunk)
        content_line = first
        for offset, raw in enumerate(chunk):
            stripped = raw.strip()
            if stripped and not stripped.startswith("#") and not stripped.startswith("%"):
                content_line = first + offset
                break
        else:
            continue  # blank or comment-only: not a document
        index += 1
        if body.lstrip().startswith("{"):
            parsed = _try_json(body)
            if parsed is not None:
                yield Document(source=source, index=index, line=content_line, data=parsed[0])
                continue
        loader = _Loader(body)
        try:
            data = loader.get_single_data()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            err_line = first + mark.line if mark is not None else content_line
            kind = "YAML error" if isinstance(e, yaml.constructor.ConstructorError) else "YAML syntax error"
            yield PolicyYamlError(
                f"{kind}: {e.problem or e.context}", source=source, line=err_line, obj=f"document {index}"
            )
            continue
        except (yaml.YAMLError, RecursionError, ValueError, OverflowError) as e:
            yield PolicyYamlError(
                f"YAML error: {type(e).__name__}: {e}"[:300], source=source, line=content_line, obj=f"document {index}"
            )
            continue
        finally:
            loader.dispose()
        if loader.aliased and _too_big(data):
            yield PolicyYamlError(
                f"document has more than {MAX_NODES} nodes", source=source, line=content_line, obj=f"document {index}"
            )
            continue
        yield Document(source=source, index=index, line=content_line, data=data)


class _DuplicateKey(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _try_json(body: str) -> tuple[Any] | None:
    """Fast path for JSON documents (`kubectl get -o json`); None when the text is not plain JSON.

    Any failure (including a duplicate key) falls back to the YAML loader, which reports it.
    """
    try:
        return (json.loads(body, object_pairs_hook=_pairs),)
    except (ValueError, RecursionError):
        return None


@dataclass(frozen=True, slots=True)
class LoadResult:
    """Everything one or more texts yielded: the valid policies and one error per rejected object."""

    policies: tuple[Policy, ...] = ()
    errors: tuple[PolicyError, ...] = field(default=())

    def __add__(self, other: LoadResult) -> LoadResult:
        return LoadResult(self.policies + other.policies, self.errors + other.errors)


ENDPOINTS_KEYS = frozenset({"namespaces", "endpoints"})


def is_endpoints_document(data: Any) -> bool:
    """True for a document shaped like membrane's endpoints file (no `kind`, only namespaces/endpoints)."""
    return isinstance(data, dict) and bool(data) and set(data) <= ENDPOINTS_KEYS


def load_policies(
    text: str | bytes,
    source: str = "<input>",
    *,
    default_namespace: str = "default",
    skip_endpoints_documents: bool = False,
) -> LoadResult:
    """Parse every CNP/CCNP document in `text`.

    `skip_endpoints_documents` lets a directory hold the endpoints file next to the policies.

    Returns: the valid policies and the errors (each with source, line, object and field path);
        one invalid document never stops the others. Empty documents are skipped. `List` objects
        (`kind: List` or `...List`) contribute their `items`.
    Raises: nothing; every problem is in `errors`.
    """
    policies: list[Policy] = []
    errors: list[PolicyError] = []
    seen: dict[tuple[str | None, str], tuple[str, int]] = {}
    for doc in iter_documents(text, source):
        if isinstance(doc, PolicyError):
            errors.append(doc)
            continue
        if doc.data is None or (skip_endpoints_documents and is_endpoints_document(doc.data)):
            continue
        items: list[Any] = [doc.data]
        if isinstance(doc.data, dict) and isinstance(doc.data.get("kind"), str) and doc.data["kind"].endswith("List"):
            raw_items = doc.data.get("items")
            if not isinstance(raw_items, list):
                errors.append(PolicyValidationError("expected a list", source=source, line=doc.line, obj=f"document {doc.index}", path="items"))
                continue
            items = raw_items
        for i, item in enumerate(items):
            try:
                policy = parse_policy(item, source=source, line=doc.line, default_namespace=default_namespace)
            except PolicyError as e:
                if e.obj is None:
                    e.obj = f"document {doc.index}" + (f" item {i}" if len(items) > 1 or item is not doc.data else "")
                errors.append(e)
                continue
            key = (policy.namespace, policy.name)
            if key in seen:
                first = seen[key]
                errors.append(
                    PolicyValidationError(
                        f"duplicate {policy.kind} {policy.key} (first defined at {first[0]}:{first[1]})",
                        source=source,
                        line=doc.line,
                        obj=policy.key,
                        path="metadata.name",
                    )
                )
                continue
            seen[key] = (source, doc.line)
            policies.append(policy)
    return LoadResult(tuple(policies), tuple(errors))


def merge_results(results: list[LoadResult]) -> LoadResult:
    """Combine several texts' results; a policy name defined in two texts is an error on the second."""
    policies: list[Policy] = []
    errors: list[PolicyError] = []
    seen: dict[tuple[str | None, str], Policy] = {}
    for result in results:
        errors.extend(result.errors)
        for p in result.policies:
            key = (p.namespace, p.name)
            if key in seen:
                first = seen[key]
                errors.append(
                    PolicyValidationError(
                        f"duplicate {p.kind} {p.key} (first defined at {first.source}:{first.line})",
                        source=p.source,
                        line=p.line,
                        obj=p.key,
                        path="metadata.name",
                    )
                )
                continue
            seen[key] = p
            policies.append(p)
    return LoadResult(tuple(policies), tuple(errors))


__all__ = ["Document", "LoadResult", "iter_documents", "load_policies", "merge_results", "object_name"]
