"""The CRDs the chart authors: structural openAPIV3Schemas (what the API server demands of a CRD), every
example policy valid against them, and broken policies rejected with the field's path, as the API
server would reject them (schema violations, and unknown fields under kubectl's strict field validation)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml
from membrane.policies.crd import PolicyValidationError, parse_policy

from tests.deploy.util import EXAMPLES, ROOT, by_kind, render

CRD_NAMES = {
    "CiliumNetworkPolicy": "ciliumnetworkpolicies.cilium.io",
    "CiliumClusterwideNetworkPolicy": "ciliumclusterwidenetworkpolicies.cilium.io",
}
_JUNCTORS = ("allOf", "anyOf", "oneOf", "not")


def _schemas() -> dict[str, dict[str, Any]]:
    crds = {c["metadata"]["name"]: c for c in by_kind(render(), "CustomResourceDefinition")}
    out = {}
    for kind, name in CRD_NAMES.items():
        (version,) = crds[name]["spec"]["versions"]
        out[kind] = version["schema"]["openAPIV3Schema"]
    return out


SCHEMAS = _schemas()


def _fmt(path: Any) -> str:
    """A JSON path as the policy loader prints it: spec.ingress[0].toPorts[0]."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _unknown_fields(schema: dict[str, Any], value: Any, path: tuple[Any, ...] = ()) -> Iterator[str]:
    """Fields the API server would prune (and kubectl's strict field validation reject)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            if props is not None and k in props:
                yield from _unknown_fields(props[k], v, (*path, k))
            elif isinstance(extra, dict):
                yield from _unknown_fields(extra, v, (*path, k))
            elif props is not None:  # metadata (type object, no properties) is never judged here
                yield f"{_fmt((*path, k))}: unknown field"
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            yield from _unknown_fields(schema["items"], v, (*path, i))


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Every reason the API server would refuse doc, each as `field.path: message`."""
    schema = SCHEMAS[doc["kind"]]
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{_fmt(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    return sorted(errors + list(_unknown_fields(schema, doc)))


def _structural_problems(node: dict[str, Any], path: str, in_junctor: bool = False) -> Iterator[str]:
    """The rules of a structural schema (Kubernetes CRD docs, "Specifying a structural schema")."""
    exempt = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    if in_junctor:
        for banned in ("type", "description", "default", "additionalProperties", "nullable"):
            if banned in node:
                yield f"{path}: {banned} inside {_JUNCTORS}"
    elif "type" not in node and not exempt:
        yield f"{path}: no type"
    if "properties" in node and "additionalProperties" in node:
        yield f"{path}: properties and additionalProperties together"
    for j in _JUNCTORS:
        branches = node.get(j)
        for i, b in enumerate(branches if isinstance(branches, list) else [branches] if branches else []):
            for prop in b.get("properties", {}):
                if prop not in node.get("properties", {}):
                    yield f"{path}.{j}[{i}]: names {prop}, which is not declared beside it"
            for req in b.get("required", []):
                if req not in node.get("properties", {}):
                    yield f"{path}.{j}[{i}]: requires {req}, which is not declared beside it"
            yield from _structural_problems(b, f"{path}.{j}[{i}]", in_junctor=True)
    for k, v in node.get("properties", {}).items():
        yield from _structural_problems(v, f"{path}.{k}", in_junctor)
    if isinstance(node.get("items"), dict):
        yield from _structural_problems(node["items"], f"{path}[]", in_junctor)
    if isinstance(node.get("additionalProperties"), dict):
        yield from _structural_problems(node["additionalProperties"], f"{path}{{}}", in_junctor)


@pytest.mark.parametrize("kind", list(CRD_NAMES))
def test_schema_is_structural(kind: str) -> None:
    """Each CRD's schema is structural: the API server refuses a CRD whose schema is not."""
    assert list(_structural_problems(SCHEMAS[kind], kind)) == []


def test_structural_check_catches_a_missing_type() -> None:
    """The structural check itself fails on a property without a type (it can fail)."""
    broken = copy.deepcopy(SCHEMAS["CiliumNetworkPolicy"])
    del broken["properties"]["spec"]["properties"]["description"]["type"]
    assert list(_structural_problems(broken, "cnp")) == ["cnp.spec.description: no type"]


def test_both_crds_declare_a_status_subresource_and_scope() -> None:
    """CNP is namespaced and CCNP cluster-wide; both have a status subresource (conditions keyed by type)."""
    crds = {c["spec"]["names"]["kind"]: c for c in by_kind(render(), "CustomResourceDefinition")}
    assert crds["CiliumNetworkPolicy"]["spec"]["scope"] == "Namespaced"
    assert crds["CiliumClusterwideNetworkPolicy"]["spec"]["scope"] == "Cluster"
    for crd in crds.values():
        (version,) = crd["spec"]["versions"]
        assert version["subresources"] == {"status": {}}
        conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def _examples() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['metadata']['name']}", doc))
    return out


EXAMPLE_DOCS = _examples()


def test_examples_cover_both_kinds() -> None:
    """The example set exercises both CRDs (so the next test checks both schemas)."""
    assert {d["kind"] for _, d in EXAMPLE_DOCS} == set(CRD_NAMES)


@pytest.mark.parametrize("doc", [d for _, d in EXAMPLE_DOCS], ids=[n for n, _ in EXAMPLE_DOCS])
def test_every_example_policy_is_valid_against_the_crd(doc: dict[str, Any]) -> None:
    """Every policy in examples/policies is accepted by its CRD's schema, and nothing in it is pruned."""
    assert schema_errors(doc) == []


def _http() -> dict[str, Any]:
    (doc,) = [d for n, d in EXAMPLE_DOCS if n == "http.yaml:frontend-api"]
    return copy.deepcopy(doc)


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node: Any = doc
    keys: list[Any] = [int(k) if k.isdigit() else k for k in path.replace("[", ".").replace("]", "").split(".")]
    for k in keys[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return doc


_DELETE = object()

BROKEN = [
    ("spec.ingress[0].toPorts[0].ports[0].protocol", "TCPX", "spec.ingress[0].toPorts[0].ports[0].protocol: 'TCPX' is not one of"),
    ("spec.ingress[0].toPorts[0].ports[0].port", 80, "spec.ingress[0].toPorts[0].ports[0].port: 80 is not of type 'string'"),
    ("spec.ingress[0].toPorts[0].ports[0].port", "99999", "spec.ingress[0].toPorts[0].ports[0].port: '99999' does not match"),
    ("spec.ingress[0].fromEntities", ["clusters"], "spec.ingress[0].fromEntities[0]: 'clusters' is not one of"),
    ("spec.ingress[0].fromEndpoint", [{}], "spec.ingress[0].fromEndpoint: unknown field"),
    ("spec.ingress[0].toPorts[0].rules.kafka", [{"role": "write"}], "spec.ingress[0].toPorts[0].rules.kafka[0].role: 'write' is not one of"),
    ("spec.ingress[0].toPorts[0].rules.http[0].headerMatches", [{"value": "x"}], "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0]: 'name' is a required property"),
    ("spec.endpointSelector", _DELETE, "spec: {"),
    ("spec.ingress", _DELETE, "spec: {"),
    ("spec.endpointSelector.matchLabels.app", "no spaces", "spec.endpointSelector.matchLabels.app: 'no spaces' does not match"),
    ("spec.enableDefaultDeny", {"ingress": "yes"}, "spec.enableDefaultDeny.ingress: 'yes' is not of type 'boolean'"),
    ("spec.ingress[0].toPorts[0].ports[0].endPort", 70000, "spec.ingress[0].toPorts[0].ports[0].endPort: 70000 is greater than the maximum"),
]


@pytest.mark.parametrize(("path", "value", "expected"), BROKEN, ids=[f"{p}={v!r}" for p, v, _ in BROKEN])
def test_a_broken_policy_is_rejected_naming_the_field(path: str, value: Any, expected: str) -> None:
    """A policy with one broken field fails validation with a message that starts with that field's path."""
    errors = schema_errors(_set(_http(), path, value))
    assert any(e.startswith(expected) for e in errors), errors


def test_egress_only_fields_are_unknown_in_ingress() -> None:
    """toFQDNs exists only in egress (allow) rules; in an ingress rule it is an unknown field."""
    doc = _set(_http(), "spec.ingress[0].toFQDNs", [{"matchName": "a.example"}])
    assert schema_errors(doc) == ["spec.ingress[0].toFQDNs: unknown field"]


def test_fields_membrane_does_not_enforce_reach_the_agent() -> None:
    """toServices and l7proto are declared (not pruned) so that the agent sees them and refuses the policy itself."""
    doc = _http()
    doc["spec"]["egress"] = [{"toServices": [{"k8sService": {"serviceName": "s", "namespace": "n"}}], "toPorts": [{"ports": [{"port": "80"}], "rules": {"l7proto": "myproto", "l7": [{"k": "v"}]}}]}]
    assert schema_errors(doc) == []


def test_ccnp_with_node_selector_is_valid() -> None:
    """A CCNP may select nodes instead of endpoints (exactly one of the two)."""
    doc = {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy", "metadata": {"name": "n"},
           "spec": {"nodeSelector": {"matchLabels": {"role": "worker"}}, "ingress": [{"fromEntities": ["cluster"]}]}}
    assert schema_errors(doc) == []
    doc["spec"]["endpointSelector"] = {}
    assert schema_errors(doc) != []


def test_specs_list_is_validated_item_by_item() -> None:
    """Each item of `specs` is a rule, validated as `spec` is."""
    doc = _http()
    doc["specs"] = [doc.pop("spec"), {"endpointSelector": {}, "egress": [{"toCIDR": ["10.0.0.0/8"], "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}]}]}]}]
    assert schema_errors(doc) == []
    doc["specs"][1]["egress"][0]["toPorts"][0]["ports"][0]["protocol"] = "udp"
    assert [e.split(":")[0] for e in schema_errors(doc)] == ["specs[1].egress[0].toPorts[0].ports[0].protocol"]


def test_status_conditions_accept_a_membrane_condition() -> None:
    """The agent's own condition type (not Cilium's Valid) fits status.conditions."""
    doc = _http()
    doc["status"] = {"conditions": [{"type": "MembraneValid", "status": "False", "reason": "Invalid", "message": "m",
                                     "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    assert schema_errors(doc) == []
    doc["status"]["conditions"][0]["status"] = "maybe"
    assert schema_errors(doc) != []


def _corpus() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted((ROOT / "tests" / "policies" / "acceptance").glob("*/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") in CRD_NAMES:
                out.append((f"{path.parent.name}/{path.name}:{doc['metadata']['name']}", doc))
    return out


CORPUS = _corpus()


def test_the_policy_corpus_is_large_enough_to_matter() -> None:
    """The cross-check below runs over the policy acceptance corpus (dozens of policies, both kinds)."""
    assert len(CORPUS) >= 40
    assert {d["kind"] for _, d in CORPUS} == set(CRD_NAMES)


def test_the_crds_accept_every_policy_membrane_accepts() -> None:
    """kubectl apply never refuses a policy Membrane would enforce: each policy of the acceptance corpus
    that the policy loader accepts is valid against the CRD, with nothing pruned. (The reverse does not
    hold, by design: regexes, L7-on-port-0 and the like are the agent's checks, as in Cilium.)"""
    refused = []
    for name, doc in CORPUS:
        try:
            parse_policy(doc)
        except PolicyValidationError:
            continue
        refused += [f"{name}: {e}" for e in schema_errors(doc)]
    assert refused == []
