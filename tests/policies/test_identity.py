"""Node-local numeric identities: stable while alive, independent of the order pods arrive in.

| case                                            | expected                                  |
|-------------------------------------------------|-------------------------------------------|
| same keys, one batch, any order                 | same numbers                              |
| same keys, one at a time, any order             | same numbers (no two share a hash slot)   |
| other keys come and go                          | a live key keeps its number               |
| two keys hash to one slot (tiny span)           | the earlier keeps it; neither renumbered  |
| more keys than numbers                          | OverflowError                             |
"""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st
from membrane.policies import compile_policy
from membrane.policies.endpoints import parse_endpoints
from membrane.policies.identity import IdentityAllocator, IdentityAllocators, _hash

KEYS = st.lists(st.text(alphabet="abcdefgh=;:", min_size=1, max_size=12), min_size=1, max_size=40, unique=True)


def _fresh() -> IdentityAllocator:
    return IdentityAllocators.new().endpoints


@given(KEYS, st.randoms())
def test_one_batch_in_any_order_gives_the_same_numbers(keys: list[str], rnd: object) -> None:
    """A start or relist lists pods in whatever order the API server chooses; the numbers do not depend on it."""
    shuffled = list(keys)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert _fresh().assign(keys) == _fresh().assign(shuffled)


@given(KEYS, st.randoms())
def test_keys_fed_one_by_one_in_any_order_get_the_same_numbers(keys: list[str], rnd: object) -> None:
    """Pods arriving one by one in two different orders end with equal numbers (absent a hash-slot tie)."""
    a = _fresh()
    span = a.span
    assume(len({_hash(k) % span for k in keys}) == len(keys))
    shuffled = list(keys)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    b = _fresh()
    for i in range(1, len(keys) + 1):
        a.assign(keys[:i])
        b.assign(shuffled[:i])
    assert a.assign(keys) == b.assign(keys)


@given(KEYS, KEYS)
def test_a_live_key_is_never_renumbered(keys: list[str], others: list[str]) -> None:
    """Whatever other label sets appear and disappear, a live one keeps its number."""
    alloc = IdentityAllocator(256, 64)  # a tiny space, so collisions and probing happen
    assume(len(set(keys) | set(others)) <= 64)
    first = alloc.assign(keys)
    alloc.assign([*keys, *others])
    alloc.assign(keys[:1])
    assert alloc.assign(keys[:1]) == {keys[0]: first[keys[0]]}


def test_colliding_keys_both_keep_their_numbers() -> None:
    """In a one-slot-apart span two keys collide; the one that came first keeps the slot, the other
    probes past it, and neither moves when the other leaves or comes back."""
    alloc = IdentityAllocator(1000, 2)
    a = alloc.assign(["x"])["x"]
    both = alloc.assign(["x", "y"])
    assert both["x"] == a
    assert both["y"] != a
    assert alloc.assign(["y"])["y"] == both["y"]
    assert alloc.assign(["x", "y"]) == both


def test_more_keys_than_numbers_is_an_error() -> None:
    """The allocator never hands one number to two keys."""
    alloc = IdentityAllocator(1000, 2)
    try:
        alloc.assign(["a", "b", "c"])
    except OverflowError as e:
        assert "3 identities" in str(e)
    else:
        raise AssertionError("expected OverflowError")


ENDPOINTS = """
endpoints:
  - {name: a, labels: {app: a}, ips: [10.244.0.1]}
  - {name: b, labels: {app: b}, ips: [10.244.0.2]}
  - {name: c, labels: {app: c}, ips: [10.244.0.3]}
"""


def test_compilation_keeps_numbers_with_the_nodes_allocators() -> None:
    """With the node's allocators, a pod's identity survives recompiles as other pods come and go."""
    ids = IdentityAllocators.new()
    full = parse_endpoints(ENDPOINTS)
    before = compile_policy((), full, identities=ids).identity_of("default/a")
    without_b = parse_endpoints(ENDPOINTS.replace("  - {name: b, labels: {app: b}, ips: [10.244.0.2]}\n", ""))
    assert compile_policy((), without_b, identities=ids).identity_of("default/a") == before
    assert compile_policy((), full, identities=ids).identity_of("default/a") == before
