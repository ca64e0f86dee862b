"""Pure parts of the API server double: selectors, patch formats, the protobuf envelope, ages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from membrane.sandbox.apiserver.patch import PatchError, json_patch, merge_patch, strategic_merge_patch
from membrane.sandbox.apiserver.protobuf import MAGIC, ProtobufError, decode
from membrane.sandbox.apiserver.selectors import (
    SelectorError,
    field_value,
    labels_match,
    parse_field_selector,
    parse_label_selector,
)
from membrane.sandbox.apiserver.tables import human_duration


def _obj(labels: dict[str, str]) -> dict[str, object]:
    return {"metadata": {"labels": labels}}


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    ("a=1", {"a": "1"}, True),
    ("a=1", {}, False),
    ("a!=1", {}, True),              # != matches objects without the key (apimachinery)
    ("a notin (1,2)", {}, True),
    ("a in (1, 2)", {"a": "2"}, True),
    ("a,!b", {"a": "x"}, True),
    ("a,!b", {"a": "x", "b": "y"}, False),
    ("example.com/tier==db", {"example.com/tier": "db"}, True),
    ("a=", {"a": ""}, True),
])
def test_label_selector_semantics(selector: str, labels: dict[str, str], expected: bool) -> None:
    """Label requirements follow apimachinery's labels.Parse semantics."""
    assert labels_match(parse_label_selector(selector), _obj(labels)) is expected


@pytest.mark.parametrize("bad", ["a in ()", "a in (x", "=x", "!a in (x)", "a b"])
def test_label_selector_errors(bad: str) -> None:
    """Malformed requirements raise SelectorError."""
    with pytest.raises(SelectorError):
        parse_label_selector(bad)


def test_field_selector_rejects_unknown_fields() -> None:
    """Only the resource's selectable fields are accepted."""
    with pytest.raises(SelectorError, match=r"field label not supported: spec\.x"):
        parse_field_selector("spec.x=1", ("metadata.name",))


def test_field_value_spells_booleans_like_go() -> None:
    """spec.hostNetwork=true compares against Go's spelling of a boolean."""
    assert field_value({"spec": {"hostNetwork": True}}, "spec.hostNetwork") == "true"


def test_merge_patch_null_deletes() -> None:
    """RFC 7386: null removes a key, objects merge, lists replace."""
    out = merge_patch({"a": {"b": 1, "c": 2}, "l": [1, 2]}, {"a": {"b": None}, "l": [3]})
    assert out == {"a": {"c": 2}, "l": [3]}


def test_json_patch_operations() -> None:
    """RFC 6902 add, remove, replace, move, copy and test."""
    doc = {"a": {"b": 1}, "l": [1, 2]}
    ops = [{"op": "add", "path": "/l/-", "value": 3}, {"op": "replace", "path": "/a/b", "value": 5},
           {"op": "copy", "from": "/a/b", "path": "/c"}, {"op": "move", "from": "/l/0", "path": "/d"},
           {"op": "remove", "path": "/a"}, {"op": "test", "path": "/c", "value": 5}]
    assert json_patch(doc, ops) == {"l": [2, 3], "c": 5, "d": 1}


def test_json_patch_missing_path_is_an_error() -> None:
    """Removing a path that does not exist is a PatchError."""
    with pytest.raises(PatchError):
        json_patch({}, [{"op": "remove", "path": "/x"}])


def test_strategic_merge_merges_containers_by_name() -> None:
    """A container patch merges into the container of the same name and keeps the others."""
    live = {"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "2"}]}}
    patch = {"spec": {"$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
                      "containers": [{"name": "b", "image": "3"}]}}
    assert strategic_merge_patch(live, patch)["spec"]["containers"] == [{"name": "a", "image": "1"},
                                                                         {"name": "b", "image": "3"}]


def test_strategic_merge_delete_directive() -> None:
    """`$patch: delete` in a keyed list removes that element."""
    live = {"containers": [{"name": "a"}, {"name": "b"}]}
    out = strategic_merge_patch(live, {"containers": [{"name": "a", "$patch": "delete"}]})
    assert out == {"containers": [{"name": "b"}]}


def _field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2, len(payload)]) + payload


def test_protobuf_namespace_envelope() -> None:
    """A k8s protobuf envelope around a Namespace decodes to its JSON form with name and labels."""
    label = _field(11, _field(1, b"team") + _field(2, b"a"))
    meta = _field(1, b"ns1") + label
    raw = _field(1, meta)
    type_meta = _field(1, b"v1") + _field(2, b"Namespace")
    body = MAGIC + _field(1, type_meta) + _field(2, raw)
    assert decode(body) == {"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": "ns1", "labels": {"team": "a"}}}


def test_protobuf_other_kinds_are_refused() -> None:
    """Kinds without a schema here are refused with a message asking for JSON."""
    type_meta = _field(1, b"v1") + _field(2, b"Pod")
    with pytest.raises(ProtobufError, match="send application/json"):
        decode(MAGIC + _field(1, type_meta) + _field(2, b""))


@pytest.mark.parametrize(("seconds", "text"), [(5, "5s"), (150, "2m30s"), (900, "15m"), (4 * 3600 + 60, "4h1m"),
                                               (30 * 3600, "30h"), (5 * 86400, "5d")])
def test_human_duration(seconds: int, text: str) -> None:
    """Ages print as kubectl prints them."""
    assert human_duration(seconds) == text


def test_store_dump_and_load_keep_objects_and_expire_old_versions() -> None:
    """A dump loaded into a new store keeps objects and the RV counter; watching from before it is 410."""
    from membrane.sandbox.apiserver.store import ApiError, Store

    first = Store()
    first.seed_defaults(server_ip="127.0.0.1", server_port=6443)
    rv = first.resource_version
    second = Store()
    second.load(first.dump())
    ns_type = next(rt for rt in first.dump_types() if rt.plural == "namespaces")
    assert [o["metadata"]["name"] for o in second.objects(ns_type)] == [o["metadata"]["name"]
                                                                        for o in first.objects(ns_type)]
    assert second.resource_version == rv
    with pytest.raises(ApiError) as err:
        second.events_after(rv - 1)
    assert err.value.code == 410


_NAMES = ("a", "b", "c", "d")


@given(st.lists(st.tuples(st.sampled_from(["create", "label", "delete"]), st.sampled_from(_NAMES)), max_size=30))
def test_lists_at_a_past_version_equal_the_state_then(ops: list[tuple[str, str]]) -> None:
    """Property: an exact LIST at any retained resourceVersion returns the objects as they were at that version
    (the snapshot paging relies on), whatever creates, updates and deletes came after."""
    from membrane.sandbox.apiserver.store import ApiError, Store

    store = Store(history_size=1000)
    cms = next(rt for rt in store.dump_types() if rt.plural == "configmaps")
    store.seed_defaults(server_ip="127.0.0.1", server_port=6443)
    seen: dict[int, list[tuple[str, str]]] = {}

    def state() -> list[tuple[str, str]]:
        return [(o["metadata"]["name"], o["metadata"]["resourceVersion"]) for o in store.objects(cms)]

    seen[store.resource_version] = state()
    for i, (op, name) in enumerate(ops):
        try:
            if op == "create":
                store.create(cms, "default", {"metadata": {"name": name}})
            elif op == "label":
                store.patch(cms, "default", name, "application/merge-patch+json",
                            {"metadata": {"labels": {"i": str(i)}}})
            else:
                store.delete(cms, "default", name)
        except ApiError:
            continue
        seen[store.resource_version] = state()
    for rv, expected in seen.items():
        page = store.list_objects(cms, resource_version=str(rv), exact=True)
        assert [(o["metadata"]["name"], o["metadata"]["resourceVersion"]) for o in page.items] == expected
    # ... and a LIST at any of them followed by the events after it (a watch from there) rebuilds the present.
    final = seen[store.resource_version]
    for rv in seen:
        objs = {o["metadata"]["name"]: o["metadata"]["resourceVersion"]
                for o in store.list_objects(cms, resource_version=str(rv), exact=True).items}
        for ev in store.events_after(rv):
            if ev.rtype is not cms:
                continue
            if ev.type == "DELETED":
                del objs[ev.obj["metadata"]["name"]]
            else:
                objs[ev.obj["metadata"]["name"]] = ev.obj["metadata"]["resourceVersion"]
        assert sorted(objs.items()) == final
