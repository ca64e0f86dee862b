"""CRD model and validation: every error Cilium (or kubectl) would raise is a located PolicyError.

| case                               | where (path)                                    | message contains                         |
|------------------------------------|-------------------------------------------------|------------------------------------------|
| unknown field (typo toPort)        | spec.ingress[0].toPort                          | unknown field "toPort" (did you mean ...) |
| wrong type                         | spec.ingress                                    | expected a list                          |
| bad regex (look-around, backref)   | ...rules.http[0].path                           | invalid regex                            |
| L7 without protocol TCP            | spec.ingress[0].toPorts[0]                      | L7 rules require protocol TCP            |
| L7 on port 0                       | ...toPorts[0].ports[0]                          | port is 0                                |
| two L7 kinds in one port rule      | ...toPorts[0].rules                             | multiple L7 protocol rule types          |
| DNS rules on ingress               | ...rules.dns                                    | not allowed on ingress                   |
| Kafka role with apiKey             | ...rules.kafka[0]                               | both role                                |
| ...and the rest of the table below  |                                                 |                                          |
"""

from __future__ import annotations

import re
import textwrap

import pytest
from membrane.policies import (
    Entity,
    L4Proto,
    ParserType,
    PolicyValidationError,
    PolicyYamlError,
    load_policies,
    parse_policy,
)
from membrane.policies.labels import Operator, Requirement

from tests.policies.util import ccnp, cnp, policies


def _errors(text: str) -> list[str]:
    result = load_policies(textwrap.dedent(text), "web.yaml")
    return [str(e) for e in result.errors]


def _port_rule(rule: str, ingress: bool = True, port: str = '"80"', proto: str = "TCP") -> str:
    section = "ingress" if ingress else "egress"
    return f"""
        endpointSelector: {{}}
        {section}:
          - toPorts:
              - ports: [{{port: {port}, protocol: {proto}}}]
                rules: {rule}
        """


ERROR_CASES = [
    # (id, spec, expected path, expected message fragment)
    ("unknown-field", "endpointSelector: {}\ningress: [{toPort: []}]", "spec.ingress[0].toPort", 'unknown field "toPort" (did you mean "toPorts"?)'),
    ("unknown-top-field", "endpointSelector: {}\ningress: [{}]\ningres: []", "spec.ingres", 'unknown field "ingres"'),
    ("wrong-type-list", "endpointSelector: {}\ningress: {fromEndpoints: []}", "spec.ingress", "expected a list, got a mapping"),
    ("wrong-type-string", "endpointSelector: {matchLabels: {app: [x]}}\ningress: [{}]", "spec.endpointSelector.matchLabels.app", "expected a string"),
    ("lookahead", _port_rule('{http: [{path: "/a(?=b)"}]}'), "spec.ingress[0].toPorts[0].rules.http[0].path", "invalid regex"),
    ("lookbehind", _port_rule('{http: [{method: "(?<!P)GET"}]}'), "spec.ingress[0].toPorts[0].rules.http[0].method", "invalid regex"),
    ("backreference", _port_rule(r'{http: [{host: "(a)\\1"}]}'), "spec.ingress[0].toPorts[0].rules.http[0].host", "invalid regex"),
    ("unbalanced", _port_rule('{http: [{path: "/a("}]}'), "spec.ingress[0].toPorts[0].rules.http[0].path", "invalid regex"),
    ("l7-udp", _port_rule("{http: [{}]}", proto="UDP"), "spec.ingress[0].toPorts[0]", "L7 rules require protocol TCP"),
    ("l7-any", _port_rule("{http: [{}]}", proto="ANY"), "spec.ingress[0].toPorts[0]", "L7 rules require protocol TCP"),
    ("kafka-udp", _port_rule("{kafka: [{topic: t}]}", proto="UDP"), "spec.ingress[0].toPorts[0]", "L7 rules require protocol TCP"),
    ("l7-port-0", _port_rule("{http: [{}]}", port='"0"'), "spec.ingress[0].toPorts[0].ports[0]", "L7 rules cannot be used when a port is 0"),
    ("two-l7-kinds", _port_rule("{http: [{}], kafka: [{}]}"), "spec.ingress[0].toPorts[0].rules", "multiple L7 protocol rule types"),
    ("dns-on-ingress", _port_rule('{dns: [{matchName: "a.com"}]}', proto="UDP"), "spec.ingress[0].toPorts[0].rules.dns", "DNS rules are not allowed on ingress"),
    ("role-and-apikey", _port_rule("{kafka: [{role: produce, apiKey: produce}]}"), "spec.ingress[0].toPorts[0].rules.kafka[0]", "cannot set both role"),
    ("bad-role", _port_rule("{kafka: [{role: admin}]}"), "spec.ingress[0].toPorts[0].rules.kafka[0].role", "invalid Kafka role"),
    ("bad-apikey", _port_rule("{kafka: [{apiKey: frobnicate}]}"), "spec.ingress[0].toPorts[0].rules.kafka[0].apiKey", "unknown Kafka API key"),
    ("bad-topic", _port_rule('{kafka: [{topic: "a b"}]}'), "spec.ingress[0].toPorts[0].rules.kafka[0].topic", "invalid Kafka topic"),
    ("bad-apiversion", _port_rule('{kafka: [{apiVersion: "x"}]}'), "spec.ingress[0].toPorts[0].rules.kafka[0].apiVersion", "invalid Kafka API version"),
    ("bad-mismatch", _port_rule("{http: [{headerMatches: [{name: X, mismatch: DROP}]}]}"), "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].mismatch", "invalid header action"),
    ("header-name-missing", _port_rule("{http: [{headerMatches: [{value: v}]}]}"), "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].name", "header name missing"),
    ("dns-pattern-chars", _port_rule('{dns: [{matchPattern: "a[b].com"}]}', ingress=False, proto="UDP"), "spec.egress[0].toPorts[0].rules.dns[0].matchPattern", "invalid characters"),
    ("dns-name-and-pattern", _port_rule('{dns: [{matchName: a.com, matchPattern: "*.a.com"}]}', ingress=False, proto="UDP"), "spec.egress[0].toPorts[0].rules.dns[0]", "only one of matchName or matchPattern"),
    ("dns-port-range", """
        endpointSelector: {}
        egress:
          - toPorts: [{ports: [{port: "53", endPort: 60, protocol: UDP}], rules: {dns: [{matchPattern: "*"}]}}]
        """, "spec.egress[0].toPorts[0].ports[0]", "DNS rules do not support port ranges"),
    ("bad-protocol", "endpointSelector: {}\ningress: [{toPorts: [{ports: [{port: '80', protocol: ICMPX}]}]}]", "spec.ingress[0].toPorts[0].ports[0].protocol", "unsupported protocol"),
    ("bad-port", "endpointSelector: {}\ningress: [{toPorts: [{ports: [{port: '70000'}]}]}]", "spec.ingress[0].toPorts[0].ports[0].port", "out of range"),
    ("named-port", "endpointSelector: {}\ningress: [{toPorts: [{ports: [{port: http}]}]}]", "spec.ingress[0].toPorts[0].ports[0].port", "named port"),
    ("bad-entity", "endpointSelector: {}\ningress: [{fromEntities: [wrld]}]", "spec.ingress[0].fromEntities[0]", "unknown entity"),
    ("bad-cidr", "endpointSelector: {}\negress: [{toCIDR: [10.0.0.0/33]}]", "spec.egress[0].toCIDR[0]", "invalid CIDR"),
    ("except-outside", "endpointSelector: {}\negress: [{toCIDRSet: [{cidr: 10.0.0.0/8, except: [192.168.0.0/16]}]}]", "spec.egress[0].toCIDRSet[0].except[0]", "does not contain"),
    ("bad-operator", "endpointSelector: {matchExpressions: [{key: app, operator: Has}]}\ningress: [{}]", "spec.endpointSelector.matchExpressions[0].operator", "unknown operator"),
    ("in-without-values", "endpointSelector: {matchExpressions: [{key: app, operator: In}]}\ningress: [{}]", "spec.endpointSelector.matchExpressions[0].values", "must be non-empty"),
    ("exists-with-values", "endpointSelector: {matchExpressions: [{key: app, operator: Exists, values: [a]}]}\ningress: [{}]", "spec.endpointSelector.matchExpressions[0].values", "must be empty"),
    ("no-selector", "ingress: [{}]", "spec", "needs endpointSelector or nodeSelector"),
    ("no-sections", "endpointSelector: {}\ningress: []", "spec", "rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny"),
        ("cnp-node-selector", "nodeSelector: {}\ningress: [{}]", "spec.nodeSelector", "cannot have nodeSelector"),
    ("fqdn-on-deny", "endpointSelector: {}\negressDeny: [{toFQDNs: [{matchName: a.com}]}]", "spec.egressDeny[0].toFQDNs", 'unknown field "toFQDNs"'),
    ("l7-on-deny", "endpointSelector: {}\ningressDeny: [{toPorts: [{ports: [{port: '80', protocol: TCP}], rules: {http: [{}]}}]}]", "spec.ingressDeny[0].toPorts[0].rules", 'unknown field "rules"'),
    ("icmp-name-of-other-family", "endpointSelector: {}\ningress: [{icmps: [{fields: [{type: PacketTooBig}]}]}]", "spec.ingress[0].icmps[0].fields[0].type", "not found in IPv4"),
    ("icmp-type-range", "endpointSelector: {}\negressDeny: [{icmps: [{fields: [{type: 256, family: IPv6}]}]}]", "spec.egressDeny[0].icmps[0].fields[0].type", "out of range"),
    ("icmp-family", "endpointSelector: {}\negress: [{icmps: [{fields: [{type: 8, family: IPv5}]}]}]", "spec.egress[0].icmps[0].fields[0].family", "invalid family"),
    ("combining-peers", "endpointSelector: {}\ningress: [{fromEndpoints: [{}], fromEntities: [world]}]", "spec.ingress[0]", "combining fromEndpoints and fromEntities is not supported yet"),
    ("combining-cidr-kinds", "endpointSelector: {}\negress: [{toCIDR: [10.0.0.0/8], toCIDRSet: [{cidr: 11.0.0.0/8}]}]", "spec.egress[0]", "combining toCIDR and toCIDRSet is not supported yet"),
    ("port-missing", "endpointSelector: {}\ningress: [{toPorts: [{ports: [{protocol: TCP}]}]}]", "spec.ingress[0].toPorts[0].ports[0].port", "port must be specified"),
    ("dns-without-port", "endpointSelector: {}\negress: [{toPorts: [{rules: {dns: [{matchPattern: '*'}]}}]}]", "spec.egress[0].toPorts[0]", "port 53 must be specified for DNS rules"),
    ("cidrset-bare-ip", "endpointSelector: {}\negress: [{toCIDRSet: [{cidr: 10.0.0.1}]}]", "spec.egress[0].toCIDRSet[0].cidr", "unable to parse CIDRRule"),
    ("unsupported", "endpointSelector: {}\negress: [{toServices: []}]", "spec.egress[0].toServices", "not supported by membrane"),
    ("default-deny-type", "endpointSelector: {}\ningress: [{}]\nenableDefaultDeny: {ingress: 'no'}", "spec.enableDefaultDeny.ingress", "expected true or false"),
]


@pytest.mark.parametrize(("spec", "path", "message"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_invalid_field_is_a_located_error(spec: str, path: str, message: str) -> None:
    """Each invalid field is one error naming file, its field's line, object and field path (issue 2 "Errors")."""
    errors = _errors(cnp("web", spec))
    assert len(errors) == 1, errors
    assert re.match(rf"^web\.yaml:\d+: default/web: {re.escape(path)}: ", errors[0]), errors[0]
    assert message in errors[0]


def test_issue_example_line_is_exact() -> None:
    """The validate line of the issue's example, at the line of the offending `toPorts` item (issue 12 item 4)."""
    text = """\
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: web, namespace: default}
        specs:
          - endpointSelector: {}
            ingress:
              - toPorts:
                  - ports: [{port: "80", protocol: UDP}]
                    rules: {http: [{method: GET}]}
        """
    result = load_policies(textwrap.dedent(text), "policies/web.yaml")
    assert [str(e) for e in result.errors] == [
        "policies/web.yaml:9: default/web: specs[0].ingress[0].toPorts[0]: L7 rules require protocol TCP"
    ]


def test_invalid_object_does_not_stop_the_others() -> None:
    """One invalid rule rejects its whole object; the other objects in the file still load (Cilium)."""
    good = cnp("good", "endpointSelector: {}\ningress: [{fromEntities: [world]}]")
    bad = cnp("bad", "endpointSelector: {}\ningress: [{fromEntities: [world]}, {toPort: []}]")
    result = load_policies(good + "---\n" + bad + "---\n" + good.replace("good", "good2"), "f.yaml")
    assert [p.key for p in result.policies] == ["default/good", "default/good2"]
    assert len(result.errors) == 1
    assert "default/bad" in str(result.errors[0])


def test_yaml_syntax_error_names_the_line_and_document() -> None:
    """A malformed YAML document is an error with its line; the documents around it still load."""
    good = cnp("good", "endpointSelector: {}\ningress: [{}]")
    text = good + "---\nkind: [unclosed\n---\n" + good.replace("good", "later")
    result = load_policies(text, "f.yaml")
    assert [p.name for p in result.policies] == ["good", "later"]
    (err,) = result.errors
    assert isinstance(err, PolicyYamlError)
    assert str(err).startswith("f.yaml:")
    assert "document 2" in str(err)
    assert "YAML syntax error" in str(err)
    assert err.line is not None
    assert err.line >= good.count("\n") + 2


def test_duplicate_key_is_an_error() -> None:
    """A mapping key given twice is an error (kubectl refuses it), not last-one-wins."""
    errors = _errors("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspec: {endpointSelector: {}}\nspec: {}\n")
    assert len(errors) == 1
    assert "duplicate mapping key 'spec'" in errors[0]


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ("kind: Deployment\napiVersion: apps/v1\nmetadata: {name: x}", "unsupported kind 'Deployment'"),
        ("apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {endpointSelector: {}, ingress: [{}]}", "unsupported apiVersion"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {}\nspec: {endpointSelector: {}, ingress: [{}]}", "metadata.name: metadata.name is required"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}", "a policy needs spec or specs"),
        ("[1, 2]", "expected a mapping, got a list"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: Bad_Name}\nspec: {endpointSelector: {}, ingress: [{}]}", "invalid object name"),
    ],
)
def test_object_level_errors(doc: str, fragment: str) -> None:
    """Wrong kinds, versions and missing names are located errors, never tracebacks."""
    errors = _errors(doc)
    assert len(errors) == 1, errors
    assert fragment in errors[0], errors


def test_duplicate_object_names_are_errors() -> None:
    """Two objects with the same kind scope and name: the second is rejected."""
    doc = cnp("same", "endpointSelector: {}\negress: [{}]")
    result = load_policies(doc + "---\n" + doc, "f.yaml")
    assert len(result.policies) == 1
    assert "duplicate" in str(result.errors[0])


def test_cnp_model_and_scoping() -> None:
    """CNP: subject and peers scoped to the policy namespace; unless the peer names a namespace (Cilium getEndpointSelector)."""
    (p,) = policies(
        cnp(
            "web",
            """
            endpointSelector: {matchLabels: {app: web, "k8s:io.kubernetes.pod.namespace": elsewhere}}
            ingress:
              - fromEndpoints:
                  - {matchLabels: {app: a}}
                  - {matchLabels: {app: b, "k8s:io.kubernetes.pod.namespace": other}}
                  - {matchLabels: {"k8s:io.cilium.k8s.namespace.labels.team": data}}
                  - {matchLabels: {"reserved:host": ""}}
                  - {}
            """,
            namespace="prod",
        )
    )
    assert p.key == "prod/web"
    assert not p.cluster_wide
    rule = p.rules[0]
    ns_prod = Requirement("k8s", "io.kubernetes.pod.namespace", Operator.IN, frozenset({"prod"}))
    assert rule.endpoint_selector is not None
    assert ns_prod in rule.endpoint_selector.requirements
    assert not any("elsewhere" in r.values for r in rule.endpoint_selector.requirements)
    sels = rule.ingress[0].endpoints
    assert sels is not None
    assert ns_prod in sels[0].requirements
    assert ns_prod not in sels[1].requirements
    assert ns_prod not in sels[2].requirements
    assert sels[3].requirements == (Requirement("reserved", "host", Operator.IN, frozenset({""})),)
    assert sels[4].requirements == (ns_prod,)


def test_ccnp_scoping() -> None:
    """CCNP: the subject is cluster-wide; a peer selector without namespace selects pods of every namespace."""
    (p,) = policies(ccnp("cw", "endpointSelector: {}\ningress: [{fromEndpoints: [{}]}]"))
    assert p.key == "cw"
    assert p.cluster_wide
    assert p.rules[0].endpoint_selector is not None
    assert p.rules[0].endpoint_selector.requirements == ()
    sels = p.rules[0].ingress[0].endpoints
    assert sels is not None
    assert sels[0].requirements == (Requirement("k8s", "io.kubernetes.pod.namespace", Operator.EXISTS),)


def test_ports_and_rules_model() -> None:
    """Ports parse as Cilium does: strings or numbers, default protocol ANY, endPort ranges, L7 kinds."""
    (p,) = policies(
        cnp(
            "m",
            """
            endpointSelector: {}
            egress:
              - toPorts:
                  - ports: [{port: "8000", endPort: 8080, protocol: tcp}, {port: 53}]
                  - ports: [{port: "80", protocol: TCP}]
                    rules: {http: []}
                  - ports: [{port: "9092", protocol: TCP}]
                    rules: {kafka: [{role: consume, topic: t}]}
              - toEntities: [world, cluster]
            """,
        )
    )
    e0 = p.rules[0].egress[0]
    assert e0.to_ports[0].ports[0].range == (8000, 8080)
    assert e0.to_ports[0].ports[0].protocol is L4Proto.TCP
    assert e0.to_ports[0].ports[1].protocol is L4Proto.ANY
    assert e0.to_ports[0].ports[1].range == (53, 53)
    assert e0.to_ports[1].rules is not None
    assert e0.to_ports[1].rules.parser is None
    kafka = e0.to_ports[2].rules
    assert kafka is not None
    assert kafka.parser is ParserType.KAFKA
    assert kafka.kafka is not None
    assert kafka.kafka[0].api_keys == frozenset({1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18})
    assert p.rules[0].egress[1].entities == (Entity.WORLD, Entity.CLUSTER)


def test_icmps_model() -> None:
    """`icmps` parse as Cilium's ICMPField: family IPv4 by default, a number, a decimal string or a name of
    that family's table (EchoRequest is 8 in IPv4 and 128 in IPv6); toPorts ICMP is not a protocol."""
    (p,) = policies(
        cnp(
            "i",
            """
            endpointSelector: {}
            ingress:
              - icmps: [{fields: [{type: EchoRequest}, {type: "11"}, {type: EchoRequest, family: IPv6}, {type: 2, family: IPv6}]}]
            egressDeny:
              - icmps: [{fields: [{type: 0}]}]
            """,
        )
    )
    ing = p.rules[0].ingress[0]
    assert ing.icmps == ((L4Proto.ICMP, 8), (L4Proto.ICMP, 11), (L4Proto.ICMPV6, 128), (L4Proto.ICMPV6, 2))
    assert ing.has_icmps
    assert not ing.selects_nothing  # an icmps entry without peers applies to every peer
    assert p.rules[0].egress_deny[0].icmps == ((L4Proto.ICMP, 0),)
    bad = load_policies(textwrap.dedent(cnp("x", "endpointSelector: {}\ningress: [{toPorts: [{ports: [{port: '8', protocol: ICMP}]}]}]")), "t.yaml")
    assert [e for e in bad.errors if "unsupported protocol" in str(e)]


def test_explicit_empty_peer_list_selects_nothing() -> None:
    """`fromEndpoints: []` selects nothing, `[{}]` everything in scope, absent + toPorts = every peer."""
    (p,) = policies(
        cnp(
            "e",
            """
            endpointSelector: {}
            ingress:
              - {fromEndpoints: [], toPorts: [{ports: [{port: "80"}]}]}
              - {fromEndpoints: [{}]}
              - {toPorts: [{ports: [{port: "80"}]}]}
              - {}
            """,
        )
    )
    ing = p.rules[0].ingress
    assert ing[0].selects_nothing
    assert not ing[1].selects_nothing
    assert not ing[1].is_wildcard_peer
    assert ing[2].is_wildcard_peer
    assert not ing[2].selects_nothing
    assert ing[3].selects_nothing  # `ingress: [{}]` only turns on default deny


def test_parse_policy_rejects_non_mapping_without_traceback() -> None:
    """parse_policy on arbitrary data raises only PolicyValidationError."""
    for data in (None, 3, "x", [], {"kind": None}, {1: 2}):
        with pytest.raises(PolicyValidationError):
            parse_policy(data)


def test_list_kind_contributes_items() -> None:
    """A `kind: List` document (kubectl get -o yaml) contributes each item."""
    text = (
        "apiVersion: v1\nkind: List\nitems:\n"
        "  - {apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {name: a}, spec: {endpointSelector: {}, ingress: [{}]}}\n"
        "  - {apiVersion: cilium.io/v2, kind: CiliumClusterwideNetworkPolicy, metadata: {name: b}, spec: {endpointSelector: {}, egress: [{}]}}\n"
    )
    result = load_policies(text, "list.yaml")
    assert not result.errors, [str(e) for e in result.errors]
    assert [p.key for p in result.policies] == ["default/a", "b"]


def test_endpoints_documents_are_skipped_only_on_request() -> None:
    """A directory may hold the endpoints file next to policies: its document is skipped when asked, an error otherwise."""
    text = "endpoints: [{name: a}]\n---\n" + cnp("p", "endpointSelector: {}\ningress: [{}]")
    skipped = load_policies(text, "dir.yaml", skip_endpoints_documents=True)
    assert [p.key for p in skipped.policies] == ["default/p"]
    assert not skipped.errors
    strict = load_policies(text, "dir.yaml")
    assert any('unknown field "endpoints"' in str(e) for e in strict.errors), [str(e) for e in strict.errors]


def test_every_problem_of_an_object_at_its_own_line() -> None:
    """All problems of one object are reported at once, each at the line of its own field (issue 12 item 4)."""
    text = textwrap.dedent(
        """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        description: "top-level description, as in Cilium's examples"
        metadata:
          name: many
        spec:
          endpointSelector:
            matchLabels: {app: web}
          ingress:
          - fromEntities: [wrld]
            toPorts:
            - ports:
              - port: "80"
                protocol: UDP
              rules:
                http:
                - method: GET
          - toPort: []
          egress:
          - toCIDRSet:
            - cidr: 10.0.0.0/8
              except: [192.168.0.0/16]
        """
    )
    result = load_policies(text, "many.yaml")
    assert not result.policies
    assert [str(e) for e in result.errors] == [
        "many.yaml:10: default/many: spec.ingress[0].fromEntities[0]: unknown entity 'wrld' (all, world, world-ipv4, "
        "world-ipv6, cluster, host, remote-node, kube-apiserver, init, health, unmanaged, ingress, none)",
        "many.yaml:12: default/many: spec.ingress[0].toPorts[0]: L7 rules require protocol TCP",
        'many.yaml:18: default/many: spec.ingress[1].toPort: unknown field "toPort" (did you mean "toPorts"?)',
        "many.yaml:22: default/many: spec.egress[0].toCIDRSet[0].except[0]: allow CIDR prefix 10.0.0.0/8 does not "
        "contain exclude CIDR prefix 192.168.0.0/16",
    ]


def test_json_document_errors_have_field_lines() -> None:
    """A JSON document (the fast path) reports its problems at their lines too."""
    text = '{"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",\n "metadata": {"name": "j"},\n "spec": {"endpointSelector": {},\n  "ingress": [{"toPort": 1}]}}\n'
    (err,) = load_policies(text, "j.json").errors
    assert str(err) == 'j.json:4: default/j: spec.ingress[0].toPort: unknown field "toPort" (did you mean "toPorts"?)'


def test_top_level_description_is_accepted() -> None:
    """A top-level `description` (used in Cilium's example policies) is free text, not an error."""
    doc = 'description: "L3 policy"\n' + cnp("d", "endpointSelector: {}\ningress: [{}]")
    assert [p.key for p in policies(doc)] == ["default/d"]


def test_empty_l7_rules_are_plain_l4_on_any_protocol() -> None:
    """`rules: {http: []}` with no protocol is valid L4 on TCP, UDP and SCTP (Cilium L7Rules.IsEmpty is Len() == 0)."""
    (p,) = policies(cnp("l4", 'endpointSelector: {}\ningress: [{toPorts: [{ports: [{port: "80"}], rules: {http: []}}]}]'))
    port_rule = p.rules[0].ingress[0].to_ports[0]
    assert port_rule.ports[0].protocol is L4Proto.ANY
    assert port_rule.rules is not None
    assert port_rule.rules.parser is None
    (q,) = policies(cnp("l4u", 'endpointSelector: {}\ningress: [{toPorts: [{ports: [{port: "80", protocol: UDP}], rules: {http: [], kafka: []}}]}]'))
    assert q.rules[0].ingress[0].to_ports[0].rules is not None


def test_rule_without_sections_is_invalid() -> None:
    """A rule with none of ingress/ingressDeny/egress/egressDeny is invalid since Cilium 1.17 (Rule.Validate)."""
    for body in ("endpointSelector: {}", "endpointSelector: {}\ningress: []\negress: []"):
        errors = _errors(cnp("none", body))
        assert errors == ["web.yaml:6: default/none: spec: rule must have at least one of Ingress, IngressDeny, Egress, EgressDeny"]


def test_ccnp_node_selector_is_rejected_with_what_to_use() -> None:
    """A CCNP host policy (nodeSelector) is refused, saying Membrane enforces pods only and what to use instead."""
    errors = _errors(ccnp("host", "nodeSelector: {matchLabels: {role: worker}}\ningress: [{fromEntities: [cluster]}]"))
    assert len(errors) == 1, errors
    assert errors[0].startswith("web.yaml:6: host: spec.nodeSelector: nodeSelector (a host policy) is not supported")
    assert "select pods with endpointSelector" in errors[0]
