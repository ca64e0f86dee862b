"""Label selectors with Cilium label sources, and the bitmap index that evaluates them in bulk.

| rule                                                         | test                                   |
|--------------------------------------------------------------|----------------------------------------|
| `app` (source any) matches any source; `k8s:app` only k8s    | test_label_sources                     |
| In / NotIn (absent key matches) / Exists / DoesNotExist      | test_operators                         |
| LabelIndex.select == per-set Selector.matches (property)     | test_index_agrees_with_matches         |
| requirements AND, in any order (property)                    | test_requirement_order_is_irrelevant   |
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from membrane.policies.labels import Label, LabelIndex, LabelSet, Operator, Requirement, Selector, split_key

APP_WEB = LabelSet.of([Label("k8s", "app", "web"), Label("k8s", "io.kubernetes.pod.namespace", "default")])
HOST = LabelSet.of([Label("reserved", "host")])


@pytest.mark.parametrize(
    ("key", "value", "labels", "matches"),
    [
        ("app", "web", APP_WEB, True),
        ("k8s:app", "web", APP_WEB, True),
        ("any:app", "web", APP_WEB, True),
        ("reserved:app", "web", APP_WEB, False),
        ("app", "db", APP_WEB, False),
        ("reserved:host", "", HOST, True),
        ("k8s:host", "", HOST, False),
        ("host", "", HOST, True),
    ],
)
def test_label_sources(key: str, value: str, labels: LabelSet, matches: bool) -> None:
    """A selector key without a source matches labels from any source; `k8s:`/`reserved:` restrict it (Cilium labels)."""
    source, k = split_key(key)
    assert Selector((Requirement(source, k, Operator.IN, frozenset({value})),)).matches(labels) is matches


@pytest.mark.parametrize(
    ("op", "values", "matches_web", "matches_host"),
    [
        (Operator.IN, {"web", "db"}, True, False),
        (Operator.NOT_IN, {"web"}, False, True),
        (Operator.NOT_IN, {"db"}, True, True),
        (Operator.EXISTS, set(), True, False),
        (Operator.DOES_NOT_EXIST, set(), False, True),
    ],
)
def test_operators(op: Operator, values: set[str], matches_web: bool, matches_host: bool) -> None:
    """matchExpressions operators follow Kubernetes: NotIn and DoesNotExist match a label set without the key."""
    sel = Selector((Requirement("any", "app", op, frozenset(values)),))
    assert sel.matches(APP_WEB) is matches_web
    assert sel.matches(HOST) is matches_host


def test_empty_selector_matches_everything() -> None:
    """A selector without requirements matches every label set (then scoping narrows it)."""
    assert Selector().matches(APP_WEB)
    assert Selector().matches(HOST)
    assert Selector().matches(LabelSet.of(()))


_sources = st.sampled_from(["k8s", "reserved", "cidr"])
_keys = st.sampled_from(["app", "env", "tier", "io.kubernetes.pod.namespace"])
_values = st.sampled_from(["a", "b", "c", ""])
_label_sets = st.lists(st.builds(Label, _sources, _keys, _values), max_size=5).map(LabelSet.of)
_requirements = st.builds(
    lambda source, key, op, values: Requirement(
        source, key, op, frozenset(values) if op in (Operator.IN, Operator.NOT_IN) else frozenset()
    ),
    st.sampled_from(["any", "k8s", "reserved"]),
    _keys,
    st.sampled_from(list(Operator)),
    st.sets(_values, min_size=1, max_size=3),
)
_selectors = st.lists(_requirements, max_size=4).map(lambda rs: Selector(tuple(rs)))


@given(sets=st.lists(_label_sets, max_size=12), selector=_selectors)
def test_index_agrees_with_matches(sets: list[LabelSet], selector: Selector) -> None:
    """The bitmap index selects exactly the label sets the selector matches one by one."""
    index = LabelIndex(sets)
    bits = index.select(selector)
    assert [bool(bits >> i & 1) for i in range(len(sets))] == [selector.matches(s) for s in sets]


@given(labels=_label_sets, reqs=st.lists(_requirements, max_size=4), data=st.data())
def test_requirement_order_is_irrelevant(labels: LabelSet, reqs: list[Requirement], data: st.DataObject) -> None:
    """Requirements are ANDed: any permutation selects the same label sets."""
    shuffled = data.draw(st.permutations(reqs))
    assert Selector(tuple(reqs)).matches(labels) == Selector(tuple(shuffled)).matches(labels)
