"""YAML text -> documents -> policies / endpoints, collecting every error with its location.

Never reads files: callers pass the text and a source name (usually the file name). A file may
hold several `---` documents; each is decoded on its own, so a syntax error in one document leaves
the others loadable. Duplicate mapping keys are errors (kubectl rejects them too). A document's
line is where its content starts (1-based); the loader also keeps, per document, the line of every
mapping key and list item, so an error is reported at the line of its own field (`field_line`).
Kinds: CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and Kubernetes NetworkPolicy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from membrane.policies.crd import KIND_NP, Policy, object_name, parse_policy
from membrane.policies.errors import PolicyError, PolicyValidationError, PolicyYamlError

MAX_NODES = 200_000  # a decoded document bigger than this (aliases included) is refused, not walked
_SEPARATOR = re.compile(r"^(---|\.\.\.)(\s|$)")


# id(container) -> (container, its lines): {key: line} for a mapping, [line, ...] for a list. The
# container itself is held so that its id cannot be reused while the map lives.
LineMap = dict[int, tuple[Any, Any]]


class _Loader(yaml.CSafeLoader):
    """Safe YAML 1.1 loading that refuses duplicate keys and notes whether aliases were used.

    Sequences and mappings are built directly (not through PyYAML's two-step generators), which
    halves load time; a self-referencing alias is an error instead of a cyclic structure. Lines
    (0-based, relative to the text loaded) of every key and item go to `lines`.
    """

    aliased = False

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.lines: LineMap = {}

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        if node in self.constructed_objects:
            self.aliased = True
        return super().construct_object(node, deep=deep)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Any:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    key_lines: dict[Any, int] = {}
    loader.lines[id(out)] = (out, key_lines)
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
        key_lines[key] = key_node.start_mark.line
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> Any:
    out = [loader.construct_object(child, deep=True) for child in node.value]
    loader.lines[id(out)] = (out, [child.start_mark.line for child in node.value])
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


@dataclass(frozen=True, slots=True)
class Document:
    """One decoded YAML document. `data` is None for an empty document."""

    source: str
    index: int  # 1-based position in the text
    line: int  # 1-based line where the content starts
    data: Any
    body: str = field(default="", repr=False)  # the document's text
    first: int = 1  # the 1-based line of the body's first line
    lines: LineMap | None = field(default=None, repr=False)  # None: not built yet (JSON fast path)

    def field_line(self, path: str) -> int:
        """The line of the field at `path` (`spec.ingress[0].toPorts`), or of its nearest present parent.

        Paths name mapping keys joined by '.' and list items as `[i]`; a key may itself contain dots
        (label keys), so the longest key that fits is taken. Returns the document's line for "".
        """
        data, lines = (self.data, self.lines) if self.lines is not None else _decode_with_lines(self.body)
        node, rest, best = data, path, self.line
        while rest:
            entry = lines.get(id(node))
            if isinstance(node, dict):
                fits = [k for k in node if isinstance(k, str) and (rest == k or rest.startswith((k + ".", k + "[")))]
                if not fits:
                    break
                key = max(fits, key=len)
                if entry is not None and entry[0] is node and key in entry[1]:
                    best = self.first + entry[1][key]
                node, rest = node[key], rest[len(key) :]
            elif isinstance(node, list):
                m = _INDEX.match(rest)
                if m is None or int(m.group(1)) >= len(node):
                    break
                i = int(m.group(1))
                if entry is not None and entry[0] is node:
                    best = self.first + entry[1][i]
                node, rest = node[i], rest[m.end() :]
            else:
                break
            rest = rest[1:] if rest.startswith(".") else rest
        return best


_INDEX = re.compile(r"\[(\d+)\]")


def _decode_with_lines(body: str) -> tuple[Any, LineMap]:
    """A document that took the JSON fast path, decoded again by the YAML loader for its lines.

    Done only when one of its fields is reported; JSON is YAML here (the fast path only takes text
    that json.loads accepts without duplicate keys).
    """
    loader = _Loader(body)
    try:
        return loader.get_single_data(), loader.lines
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError):
        return None, {}
    finally:
        loader.dispose()


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
                yield Document(source=source, index=index, line=content_line, data=parsed[0], body=body, first=first)
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
        yield Document(source=source, index=index, line=content_line, data=data, body=body, first=first, lines=loader.lines)


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


def join_path(prefix: str, path: str) -> str:
    """`items[2]` + `spec.x` -> `items[2].spec.x` (either part may be empty)."""
    if not prefix:
        return path
    return f"{prefix}.{path}" if path else prefix


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
    """Parse every CNP, CCNP and Kubernetes NetworkPolicy document in `text`.

    `skip_endpoints_documents` lets a directory hold the endpoints file next to the policies.

    Returns: the valid policies and the errors: every problem of every invalid object, each with
        source, the line of its own field, object and field path; one invalid document never stops
        the others. Empty documents are skipped. `List` objects
        (`kind: List` or `...List`) contribute their `items`.
    Raises: nothing; every problem is in `errors`.
    """
    policies: list[Policy] = []
    errors: list[PolicyError] = []
    seen: dict[tuple[bool, str | None, str], tuple[str, int]] = {}
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
            item_path = "" if item is doc.data else f"items[{i}]"
            try:
                policy = parse_policy(item, source=source, line=doc.line, default_namespace=default_namespace)
            except PolicyError as e:
                for problem in e.problems:
                    if problem.obj is None:
                        problem.obj = f"document {doc.index}" + (f" item {i}" if len(items) > 1 or item is not doc.data else "")
                    problem.line = doc.field_line(join_path(item_path, problem.path))
                # In the order of the text, as an editor shows them (sorted is stable for one line).
                errors.extend(sorted(e.problems, key=lambda problem: problem.line or 0))
                continue
            key = (policy.kind == KIND_NP, policy.namespace, policy.name)
            if key in seen:
                first = seen[key]
                errors.append(
                    PolicyValidationError(
                        f"duplicate {policy.kind} {policy.key} (first defined at {first[0]}:{first[1]})",
                        source=source,
                        line=doc.field_line(join_path(item_path, "metadata.name")),
                        obj=policy.key,
                        path="metadata.name",
                    )
                )
                continue
            seen[key] = (source, policy.line)
            policies.append(policy)
    return LoadResult(tuple(policies), tuple(errors))


def merge_results(results: list[LoadResult]) -> LoadResult:
    """Combine several texts' results; a policy name defined in two texts is an error on the second."""
    policies: list[Policy] = []
    errors: list[PolicyError] = []
    seen: dict[tuple[bool, str | None, str], Policy] = {}
    for result in results:
        errors.extend(result.errors)
        for p in result.policies:
            key = (p.kind == KIND_NP, p.namespace, p.name)
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
