"""The endpoints file (local stand-in for Pods and Namespaces): labels Cilium derives, and located errors."""

from __future__ import annotations

import pytest
from membrane.policies import EndpointsError, parse_endpoints
from membrane.policies.labels import Label


def test_endpoint_labels() -> None:
    """A pod's identity labels: its labels, namespace, namespace labels, service account, cluster (all k8s:)."""
    eps = parse_endpoints(
        "namespaces: [{name: web, labels: {team: a}}]\n"
        "endpoints: [{name: fe, namespace: web, labels: {app: fe}, ips: [10.244.1.1, 'fd00::1'], serviceAccount: sa, interface: mbr0}]\n"
    )
    (ep,) = eps.endpoints
    assert ep.key == "web/fe"
    assert ep.ips == ("10.244.1.1", "fd00::1")
    assert ep.interface == "mbr0"
    assert ep.label_set.labels == {
        Label("k8s", "app", "fe"),
        Label("k8s", "io.kubernetes.pod.namespace", "web"),
        Label("k8s", "io.cilium.k8s.namespace.labels.team", "a"),
        Label("k8s", "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name", "web"),
        Label("k8s", "io.cilium.k8s.policy.serviceaccount", "sa"),
        Label("k8s", "io.cilium.k8s.policy.cluster", "default"),
    }
    assert eps.by_ip("fd00:0::1") is ep
    assert eps.by_key("web/fe") is ep


def test_defaults() -> None:
    """Namespace defaults to `default`, service account to `default`; namespaces exist implicitly."""
    eps = parse_endpoints("endpoints: [{name: a}]")
    assert eps.endpoints[0].key == "default/a"
    assert eps.endpoints[0].service_account == "default"
    assert [n.name for n in eps.namespaces] == ["default"]
    assert parse_endpoints("").endpoints == ()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("endpoints: [{name: a, ips: [10.0.0.300]}]", "endpoints: endpoints[0].ips[0]: invalid IP address"),
        ("endpoints: [{name: a, ips: [10.0.0.1]}, {name: b, ips: [10.0.0.1]}]", "endpoints[1].ips[0]: IP 10.0.0.1 already belongs to default/a"),
        ("endpoints: [{name: a}, {name: a}]", "endpoints[1].name: duplicate endpoint default/a"),
        ("endpoints: [{name: a, label: {}}]", 'endpoints[0].label: unknown field "label" (did you mean "labels"?)'),
        ("endpoints: [{name: a, labels: {x: 1}}]", "endpoints[0].labels.x: expected a string"),
        ("endpoints: {name: a}", "endpoints: expected a list"),
        ("endpoints: [", "YAML syntax error"),
        ("endpoints: [{name: a, interface: this-name-is-too-long}]", "endpoints[0].interface"),
    ],
)
def test_errors_are_located(text: str, fragment: str) -> None:
    """Invalid endpoints files raise EndpointsError naming file, line and field path."""
    with pytest.raises(EndpointsError) as info:
        parse_endpoints(text, "eps.yaml")
    assert str(info.value).startswith(("eps.yaml:1: endpoints", "eps.yaml:2: endpoints"))
    assert fragment in str(info.value)
