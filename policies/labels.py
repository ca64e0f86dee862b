"""Labels, label sets and label selectors with Cilium's label sources, plus a bitmap index to evaluate
selectors over many label sets at once.

A label is `(source, key, value)`; sources are `k8s`, `reserved`, `cidr`, `fqdn`, ... A selector key
written without a source (`app`) is source `any` and matches a label of that key from any source;
`k8s:app` matches only `k8s` labels. Requirements are ANDed; a selector without requirements matches
every label set. Pure and immutable; no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

ANY_SOURCE = "any"
K8S = "k8s"
RESERVED = "reserved"

NAMESPACE_KEY = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels"
SERVICE_ACCOUNT_KEY = "io.cilium.k8s.policy.serviceaccount"
CLUSTER_KEY = "io.cilium.k8s.policy.cluster"


@dataclass(frozen=True, slots=True, order=True)
class Label:
    """One label. `value` is '' for reserved labels (`reserved:host`)."""

    source: str
    key: str
    value: str = ""

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value}" if self.value else f"{self.source}:{self.key}"


def split_key(text: str) -> tuple[str, str]:
    """`"k8s:app"` -> ("k8s", "app"); `"app"` -> ("any", "app"). Kubernetes keys never contain ':'."""
    source, sep, key = text.partition(":")
    if not sep:
        return ANY_SOURCE, text
    return source, key


@dataclass(frozen=True, slots=True)
class LabelSet:
    """An identity's labels. Compared and hashed by content; `by_key` is a lookup cache."""

    labels: frozenset[Label]
    by_key: Mapping[str, tuple[tuple[str, str], ...]] = field(compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, labels: Iterable[Label]) -> LabelSet:
        frozen = frozenset(labels)
        index: dict[str, list[tuple[str, str]]] = {}
        for label in sorted(frozen):
            index.setdefault(label.key, []).append((label.source, label.value))
        return cls(frozen, {k: tuple(v) for k, v in index.items()})

    def values(self, source: str, key: str) -> list[str]:
        """Values of `key` from `source` (any source when `source` is 'any')."""
        return [v for s, v in self.by_key.get(key, ()) if source == ANY_SOURCE or s == source]

    def canonical(self) -> str:
        """A stable text form (sorted labels), the input to identity allocation."""
        return ";".join(str(label) for label in sorted(self.labels))


class Operator(enum.Enum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True, slots=True)
class Requirement:
    """`source:key op values`. In/NotIn have at least one value; Exists/DoesNotExist have none."""

    source: str
    key: str
    op: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: LabelSet) -> bool:
        present = labels.values(self.source, self.key)
        match self.op:
            case Operator.IN:
                return any(v in self.values for v in present)
            case Operator.NOT_IN:
                # Kubernetes semantics: NotIn also matches when the key is absent.
                return not any(v in self.values for v in present)
            case Operator.EXISTS:
                return bool(present)
            case Operator.DOES_NOT_EXIST:
                return not present


@dataclass(frozen=True, slots=True)
class Selector:
    """A label selector (ANDed requirements). `()` selects every label set in scope."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: LabelSet) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def has_key(self, key: str, sources: tuple[str, ...] = (K8S, ANY_SOURCE)) -> bool:
        return any(r.key == key and r.source in sources for r in self.requirements)

    def has_key_prefix(self, prefix: str, source: str) -> bool:
        return any(r.source == source and r.key.startswith(prefix) for r in self.requirements)

    def has_source(self, source: str) -> bool:
        return any(r.source == source for r in self.requirements)

    def with_requirement(self, requirement: Requirement) -> Selector:
        return Selector((*self.requirements, requirement))

    def __str__(self) -> str:
        if not self.requirements:
            return "{}"
        parts = []
        for r in self.requirements:
            key = f"{r.source}:{r.key}"
            match r.op:
                case Operator.IN if len(r.values) == 1:
                    parts.append(f"{key}={next(iter(r.values))}")
                case Operator.IN | Operator.NOT_IN:
                    parts.append(f"{key} {r.op.value} ({','.join(sorted(r.values))})")
                case Operator.EXISTS:
                    parts.append(key)
                case Operator.DOES_NOT_EXIST:
                    parts.append(f"!{key}")
        return "{" + ", ".join(parts) + "}"


class LabelIndex:
    """Evaluates selectors over a fixed, ordered list of label sets; results are int bitmaps (bit i = set i).

    Bitmaps make "which identities does this selector pick" one pass of set algebra instead of a
    match per label set, which is what keeps compile time low with thousands of endpoints.
    """

    def __init__(self, label_sets: list[LabelSet]) -> None:
        self.size = len(label_sets)
        self.all = (1 << self.size) - 1
        self._exact: dict[tuple[str, str, str], int] = {}
        self._exists: dict[tuple[str, str], int] = {}
        self._cache: dict[Selector, int] = {}
        for i, ls in enumerate(label_sets):
            bit = 1 << i
            for label in ls.labels:
                for source in (label.source, ANY_SOURCE):
                    k = (source, label.key, label.value)
                    self._exact[k] = self._exact.get(k, 0) | bit
                    e = (source, label.key)
                    self._exists[e] = self._exists.get(e, 0) | bit

    def _requirement(self, r: Requirement) -> int:
        match r.op:
            case Operator.IN:
                bits = 0
                for v in r.values:
                    bits |= self._exact.get((r.source, r.key, v), 0)
                return bits
            case Operator.NOT_IN:
                bits = 0
                for v in r.values:
                    bits |= self._exact.get((r.source, r.key, v), 0)
                return self.all & ~bits
            case Operator.EXISTS:
                return self._exists.get((r.source, r.key), 0)
            case Operator.DOES_NOT_EXIST:
                return self.all & ~self._exists.get((r.source, r.key), 0)

    def select(self, selector: Selector) -> int:
        """Bitmap of the label sets `selector` matches."""
        cached = self._cache.get(selector)
        if cached is not None:
            return cached
        bits = self.all
        for r in selector.requirements:
            bits &= self._requirement(r)
            if not bits:
                break
        self._cache[selector] = bits
        return bits


def iter_bits(bits: int) -> Iterable[int]:
    """Indices of the set bits of `bits`, ascending."""
    while bits:
        low = bits & -bits
        yield low.bit_length() - 1
        bits ^= low
