"""Per-request L7 evaluation: HTTP (and gRPC as HTTP POST), DNS matchPattern vectors, Kafka roles and topics.

| rule                                                   | test                                  |
|--------------------------------------------------------|---------------------------------------|
| HTTP method/path/host are RE2 full matches             | test_http_rules                       |
| path is matched against the target including the query | test_http_rules (query rows)          |
| headers: "Name" present, "Name value" exact            | test_http_rules (header rows)         |
| headerMatches mismatch LOG/ADD/DELETE/REPLACE          | test_header_match_actions             |
| gRPC = HTTP POST of /package.Service/Method            | test_grpc_is_http_post                |
| DNS matchName / matchPattern (Cilium 1.19 vectors)     | test_dns_match_pattern_vectors        |
| Kafka role api-key sets, apiVersion, clientID          | test_kafka_rules                      |
| Kafka multi-topic request needs every topic covered    | test_kafka_topic_coverage_both_orders |
| a request of the wrong protocol is MALFORMED           | test_wrong_protocol_is_malformed      |
| evaluation never raises                                | test_evaluation_is_total              |
| memoised answers equal fresh ones; memo/cache bounded  | test_repeated_requests_..., test_per_request_header_actions_..., test_different_rule_sets_..., test_field_value_cache_... |
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from membrane.parsers.events import DnsQuery, GrpcCall, HttpRequest, KafkaRequest, Reason
from membrane.policies import FlowVerdict, L7RuleSet, ParserType, Verdict, VerdictKind, evaluate_request
from membrane.policies.crd import DnsRule, HeaderMatch, HttpRule, KafkaRule, MismatchAction, SecretRef
from membrane.policies.kafka_keys import API_KEYS, ROLE_API_KEYS

from tests.policies.util import dns, grpc, http, kafka


def _http_set(*rules: HttpRule) -> L7RuleSet:
    return L7RuleSet(ParserType.HTTP, [(r, f"p: rules.http[{i}]") for i, r in enumerate(rules)])


HTTP_CASES = [
    # (rule, request, allowed)
    (HttpRule(method="GET", path="/api"), http("GET", "/api"), True),
    (HttpRule(method="GET", path="/api"), http("GET", "/api/"), False),
    (HttpRule(method="GET", path="/api"), http("GET", "/apix"), False),
    (HttpRule(method="GET", path="/api"), http("get", "/api"), False),
    (HttpRule(method="GET", path="/api"), http("GET", "/api?x=1"), False),
    (HttpRule(method="GET", path="/api.*"), http("GET", "/api?x=1"), True),
    (HttpRule(path="/api\\?token=[0-9]+"), http("GET", "/api?token=42"), True),
    (HttpRule(path="/api\\?token=[0-9]+"), http("GET", "/api?token=4a"), False),
    (HttpRule(method="GET|HEAD"), http("HEAD", "/x"), True),
    (HttpRule(method="GET|HEAD"), http("PUT", "/x"), False),
    (HttpRule(path="/v[0-9]+/pets/[^/]+"), http("GET", "/v1/pets/rex"), True),
    (HttpRule(path="/v[0-9]+/pets/[^/]+"), http("GET", "/v1/pets/rex/toys"), False),
    (HttpRule(host="api\\.example\\.com"), http("GET", "/", host="api.example.com"), True),
    (HttpRule(host="api\\.example\\.com"), http("GET", "/", host="api.example.com.evil"), False),
    (HttpRule(host="api\\.example\\.com"), http("GET", "/", host=None), False),
    (HttpRule(host=".*\\.example\\.com(:[0-9]+)?"), http("GET", "/", host="a.example.com:8080"), True),
    (HttpRule(headers=("X-Test",)), http("GET", "/", headers=(("x-test", ""),)), True),
    (HttpRule(headers=("X-Test",)), http("GET", "/"), False),
    (HttpRule(headers=("X-Test: yes",)), http("GET", "/", headers=(("X-TEST", "yes"),)), True),
    (HttpRule(headers=("X-Test: yes",)), http("GET", "/", headers=(("X-Test", "no"),)), False),
    (HttpRule(header_matches=(HeaderMatch(name="X-Token", value="s3cret"),)), http("GET", "/", headers=(("x-token", "s3cret"),)), True),
    (HttpRule(header_matches=(HeaderMatch(name="X-Token", value="s3cret"),)), http("GET", "/", headers=(("x-token", "guess"),)), False),
    (HttpRule(header_matches=(HeaderMatch(name="X-Token", secret=SecretRef(namespace="d", name="s")),)), http("GET", "/", headers=(("x-token", "s3cret"),)), False),
    (HttpRule(), http("OPTIONS", "*"), True),
]


@pytest.mark.parametrize(("rule", "request_", "allowed"), HTTP_CASES)
def test_http_rules(rule: HttpRule, request_: HttpRequest, allowed: bool) -> None:
    """HTTP fields are RE2 full matches over the whole target; headers are case-insensitive by name (Cilium/Envoy)."""
    decision = _http_set(rule).evaluate(request_)
    assert decision.allowed is allowed
    assert (decision.reason is None) is allowed
    assert decision.rule == ("p: rules.http[0]" if allowed else None)


def test_http_any_rule_allows_and_first_match_is_reported() -> None:
    """A request passes if at least one of the port's rules matches; the first matching rule is reported."""
    rules = _http_set(HttpRule(method="POST"), HttpRule(path="/a"), HttpRule(path="/a", method="GET"))
    d = rules.evaluate(http("GET", "/a"))
    assert d.allowed
    assert d.rule == "p: rules.http[1]"
    assert not rules.evaluate(http("GET", "/b")).allowed


def test_hundred_rules_pick_the_right_one() -> None:
    """With many rules (RE2 sets) the matching rule is found exactly, including the last one."""
    rules = _http_set(*(HttpRule(method="GET", path=f"/svc{i}/items/[0-9]+") for i in range(100)))
    assert rules.evaluate(http("GET", "/svc99/items/7")).rule == "p: rules.http[99]"
    assert rules.evaluate(http("GET", "/svc0/items/7")).rule == "p: rules.http[0]"
    assert not rules.evaluate(http("GET", "/svc100/items/7")).allowed
    assert not rules.evaluate(http("POST", "/svc5/items/7")).allowed


@pytest.mark.parametrize(
    ("action", "headers", "expected"),
    [
        (MismatchAction.LOG, (("X-Token", "wrong"),), ("LOG", None)),
        (MismatchAction.ADD, (), ("ADD", "good")),
        (MismatchAction.DELETE, (("X-Token", "wrong"),), ("DELETE", None)),
        (MismatchAction.LOG, (), ("LOG", None)),
        (MismatchAction.REPLACE, (), ("REPLACE", "good")),
        (MismatchAction.REPLACE, (("X-Token", "wrong"),), ("REPLACE", "good")),
    ],
)
def test_header_match_actions(action: MismatchAction, headers: tuple[tuple[str, str], ...], expected: tuple[str, str | None]) -> None:
    """headerMatches with a mismatch action still allow the request and report the action (Cilium HeaderMatch)."""
    rules = _http_set(HttpRule(path="/", header_matches=(HeaderMatch(name="X-Token", value="good", mismatch=action),)))
    d = rules.evaluate(http("GET", "/", headers=headers))
    assert d.allowed
    assert [(a.action.value, a.value) for a in d.header_actions] == [expected]
    ok = rules.evaluate(http("GET", "/", headers=(("x-token", "good"),)))
    assert ok.allowed
    assert ok.header_actions == ()


def test_delete_of_an_absent_header_is_no_action() -> None:
    """mismatch DELETE on a request without the header does nothing: cilium/proxy HeaderMatch::allowed returns
    early ("nothing to remove"); the request is allowed with no header action."""
    rules = _http_set(HttpRule(path="/", header_matches=(HeaderMatch(name="X-Token", value="good", mismatch=MismatchAction.DELETE),)))
    d = rules.evaluate(http("GET", "/"))
    assert d.allowed
    assert d.header_actions == ()


def test_header_actions_from_every_matching_rule() -> None:
    """When rules carry mismatch actions, every matching rule contributes its actions (cilium-envoy)."""
    rules = _http_set(
        HttpRule(header_matches=(HeaderMatch(name="A", value="1", mismatch=MismatchAction.ADD),)),
        HttpRule(header_matches=(HeaderMatch(name="B", value="2", mismatch=MismatchAction.REPLACE),)),
    )
    d = rules.evaluate(http("GET", "/"))
    assert d.matched == ("p: rules.http[0]", "p: rules.http[1]")
    assert [(a.action, a.name) for a in d.header_actions] == [(MismatchAction.ADD, "A"), (MismatchAction.REPLACE, "B")]


def test_grpc_is_http_post() -> None:
    """A gRPC call is judged as HTTP POST on its path, with its headers and authority (Cilium's gRPC guide)."""
    rules = _http_set(HttpRule(method="POST", path="/helloworld\\.Greeter/SayHello"))
    assert rules.evaluate(grpc("/helloworld.Greeter/SayHello")).allowed
    assert not rules.evaluate(grpc("/helloworld.Greeter/SayBye")).allowed
    get_only = _http_set(HttpRule(method="GET"))
    assert not get_only.evaluate(grpc("/helloworld.Greeter/SayHello")).allowed
    with_header = _http_set(HttpRule(headers=("content-type application/grpc",)))
    assert with_header.evaluate(grpc("/a.B/C")).allowed


# (pattern or name, query name, matches) — Cilium 1.19 matchpattern semantics.
DNS_VECTORS = [
    ("*", "example.com", True),
    ("*", "a.b.c.example.com.", True),
    ("*", ".", True),
    ("**", "x.y.", True),
    ("*.cilium.io", "sub.cilium.io", True),
    ("*.cilium.io", "SUB.Cilium.IO.", True),
    ("*.cilium.io", "cilium.io", False),
    ("*.cilium.io", "a.b.cilium.io", False),
    ("*.cilium.io", "sub.cilium.io.evil.com", False),
    ("*.cilium.io", "subxcilium.io", False),
    ("**.cilium.io", "a.cilium.io", True),
    ("**.cilium.io", "a.b.c.cilium.io", True),
    ("**.cilium.io", "cilium.io", False),
    ("***.cilium.io", "a.b.cilium.io", True),
    ("sub*.cilium.io", "sub.cilium.io", True),
    ("sub*.cilium.io", "subdomain.cilium.io", True),
    ("sub*.cilium.io", "a.sub.cilium.io", False),
    ("*sub.cilium.io", "mysub.cilium.io", True),
    ("a*b.cilium.io", "a-x_b.cilium.io", True),
    ("a*b.cilium.io", "a.b.cilium.io", False),
    ("cilium.io", "cilium.io.", True),
    ("cilium.io.", "CILIUM.io", True),
    ("cilium.io", "www.cilium.io", False),
    ("api.*.example.com", "api.eu.example.com", True),
    ("api.*.example.com", "api.eu.west.example.com", False),
    ("api.**.example.com", "api.eu.west.example.com", False),  # ** only as a leading label
]


@pytest.mark.parametrize(("pattern", "name", "matches"), DNS_VECTORS)
def test_dns_match_pattern_vectors(pattern: str, name: str, matches: bool) -> None:
    """matchPattern wildcards per Cilium 1.19: `*`, `*.x`, `**.x`, mid-label `*`; case- and trailing-dot-insensitive."""
    rules = L7RuleSet(ParserType.DNS, [(DnsRule(match_pattern=pattern), "p: rules.dns[0]")])
    assert rules.evaluate(dns(name)).allowed is matches


@pytest.mark.parametrize(
    ("match_name", "name", "matches"),
    [("api.github.com", "api.github.com", True), ("api.github.com", "API.GitHub.com.", True), ("api.github.com", "x.api.github.com", False), ("api.github.com.", "api.github.com", True)],
)
def test_dns_match_name(match_name: str, name: str, matches: bool) -> None:
    """matchName is an exact, case-insensitive match on the fully qualified name."""
    rules = L7RuleSet(ParserType.DNS, [(DnsRule(match_name=match_name), "p: rules.dns[0]")])
    assert rules.evaluate(dns(name)).allowed is matches


K = API_KEYS


def _kafka_set(*rules: KafkaRule) -> L7RuleSet:
    return L7RuleSet(ParserType.KAFKA, [(r, f"p: rules.kafka[{i}]") for i, r in enumerate(rules)])


def _role(role: str, topic: str | None = None) -> KafkaRule:
    return KafkaRule(role=role, api_keys=ROLE_API_KEYS[role], topic=topic)


@pytest.mark.parametrize(
    ("rule", "request_", "allowed"),
    [
        (_role("produce", "orders"), kafka(K["produce"], "orders"), True),
        (_role("produce", "orders"), kafka(K["metadata"], "orders"), True),
        (_role("produce", "orders"), kafka(K["apiversions"]), True),
        (_role("produce", "orders"), kafka(K["fetch"], "orders"), False),
        (_role("produce", "orders"), kafka(K["produce"], "payments"), False),
        (_role("consume", "orders"), kafka(K["fetch"], "orders"), True),
        (_role("consume", "orders"), kafka(K["joingroup"]), True),
        (_role("consume", "orders"), kafka(K["heartbeat"]), True),
        (_role("consume", "orders"), kafka(K["offsetcommit"], "orders"), True),
        (_role("consume", "orders"), kafka(K["produce"], "orders"), False),
        (_role("consume", "orders"), kafka(K["createtopics"], "orders"), False),
        (_role("consume", "orders"), kafka(K["fetch"], topics_known=False), False),
        (_role("consume"), kafka(K["fetch"], topics_known=False), True),
        (_role("produce", "orders"), kafka(K["metadata"]), True),
        (KafkaRule(topic="orders"), kafka(K["createtopics"]), False),
        (KafkaRule(topic="orders"), kafka(K["createtopics"], "orders"), True),
        (KafkaRule(api_key="produce", api_keys=frozenset({0}), api_version=3), kafka(0, "t", version=3), True),
        (KafkaRule(api_key="produce", api_keys=frozenset({0}), api_version=3), kafka(0, "t", version=2), False),
        (KafkaRule(client_id="billing"), kafka(1, "t", client_id="billing"), True),
        (KafkaRule(client_id="billing"), kafka(1, "t", client_id="other"), False),
        (KafkaRule(client_id="billing"), kafka(1, "t"), False),
        (KafkaRule(), kafka(33, "anything"), True),
    ],
)
def test_kafka_rules(rule: KafkaRule, request_: KafkaRequest, allowed: bool) -> None:
    """Kafka roles expand to Cilium's api-key sets; apiVersion and clientID are exact; a topicless request ignores topic."""
    assert _kafka_set(rule).evaluate(request_).allowed is allowed


@pytest.mark.parametrize("reverse", [False, True], ids=["a,b", "b,a"])
def test_kafka_topic_coverage_both_orders(reverse: bool) -> None:
    """A multi-topic request passes only when every topic is covered by some rule, whatever the rule order."""
    rules = [_role("produce", "orders"), _role("produce", "invoices")]
    if reverse:
        rules.reverse()
    rs = _kafka_set(*rules)
    both = rs.evaluate(kafka(K["produce"], "orders", "invoices"))
    assert both.allowed
    assert len(both.matched) == 2
    assert not rs.evaluate(kafka(K["produce"], "orders", "payments")).allowed
    assert rs.evaluate(kafka(K["produce"], "invoices")).allowed


def test_wrong_protocol_is_malformed() -> None:
    """A request the port's parser cannot carry (HTTP on a Kafka port, ...) is denied as MALFORMED."""
    assert _kafka_set(KafkaRule()).evaluate(http()).reason is Reason.MALFORMED
    assert _http_set(HttpRule()).evaluate(dns("a.com")).reason is Reason.MALFORMED
    dns_set = L7RuleSet(ParserType.DNS, [(DnsRule(match_pattern="*"), "r")])
    assert dns_set.evaluate(kafka(0)).reason is Reason.MALFORMED


_text = st.text(max_size=40)
_headers = st.lists(st.tuples(_text, _text), max_size=4).map(tuple)
_requests = st.one_of(
    st.builds(lambda m, t, h, hs: HttpRequest(method=m, target=t, path=t, host=h, headers=hs), _text, _text, st.none() | _text, _headers),
    st.builds(lambda p, a, hs: GrpcCall(service="s", method="m", path=p, authority=a, headers=hs), _text, st.none() | _text, _headers),
    st.builds(lambda n: DnsQuery(id=0, name=n, normalized_name=n, qtype=1), _text),
    st.builds(
        lambda k, v, c, ts, known: KafkaRequest(api_key=k, api_version=v, correlation_id=0, client_id=c, topics=tuple(ts), topics_known=known),
        st.integers(-5, 100), st.integers(-5, 20), st.none() | _text, st.lists(_text, max_size=3), st.booleans(),
    ),
)
_SETS = [
    _http_set(HttpRule(method="GET", path="/a.*", host="h", headers=("X-A",), header_matches=(HeaderMatch(name="T", value="v", mismatch=MismatchAction.REPLACE),))),
    L7RuleSet(ParserType.DNS, [(DnsRule(match_pattern="**.a.com"), "r"), (DnsRule(match_name="b.com"), "s")]),
    _kafka_set(_role("consume", "t"), KafkaRule(client_id="c")),
]


@given(request=_requests)
def test_evaluation_is_total(request: HttpRequest | GrpcCall | DnsQuery | KafkaRequest) -> None:
    """Evaluation returns a Decision for any request (arbitrary text, surrogates, NULs), never raises."""
    for rule_set in _SETS:
        d = rule_set.evaluate(request)
        assert (d.reason is None) is d.allowed


# --- memoisation (the proxy asks the same question for every request of a connection) -------------------


def _redirect(*rules: HttpRule) -> Verdict:
    return Verdict(kind=VerdictKind.REDIRECT, enforced=True, parser=ParserType.HTTP, rules=_http_set(*rules), matched=("p",))


def test_repeated_requests_get_the_same_answers_as_the_first() -> None:
    """evaluate_request answers a repeated (verdicts, request) exactly as it did the first time: allowed, denied, malformed."""
    ingress = _redirect(HttpRule(method="GET", path="/api"))
    egress = Verdict(kind=VerdictKind.ALLOW, enforced=True, matched=("e",))
    for _ in range(3):
        ok = evaluate_request(egress, ingress, http("GET", "/api"), src_endpoint="d/a", dst_endpoint="d/b")
        assert ok.verdict is FlowVerdict.ALLOWED
        assert ok.decision is not None
        assert ok.decision.rule == "p: rules.http[0]"
        assert ok.ingress.endpoint == "d/b"
        assert ok.egress.endpoint == "d/a"
        assert ok.egress.verdict is FlowVerdict.ALLOWED
        no = evaluate_request(egress, ingress, http("POST", "/api"), src_endpoint="d/a", dst_endpoint="d/b")
        assert no.verdict is FlowVerdict.L7_DENIED
        assert no.decision is not None
        assert no.decision.reason is Reason.POLICY_DENIED
        bad = evaluate_request(egress, ingress, http("GET", "/api"), request_error=Reason.MALFORMED, dst_endpoint="d/b")
        assert bad.verdict is FlowVerdict.L7_DENIED
        assert bad.decision is not None
        assert bad.decision.reason is Reason.MALFORMED
        other_ends = evaluate_request(egress, ingress, http("GET", "/api"), src_endpoint="d/x", dst_endpoint="d/y")
        assert (other_ends.egress.endpoint, other_ends.ingress.endpoint) == ("d/x", "d/y")
        dropped = evaluate_request(Verdict(kind=VerdictKind.DROP, enforced=True), ingress, http("GET", "/api"))
        assert dropped.verdict is FlowVerdict.DROPPED


def test_per_request_header_actions_are_never_reused() -> None:
    """A headerMatches mismatch action is decided per request (RFC-free: Cilium headerMatches), even when the same rule matched before."""
    ingress = _redirect(HttpRule(header_matches=(HeaderMatch(name="X-Id", value="7", mismatch=MismatchAction.ADD),)))
    for _ in range(3):
        missing = evaluate_request(None, ingress, http("GET", "/"))
        assert [(a.action, a.name, a.value) for a in missing.header_actions] == [(MismatchAction.ADD, "X-Id", "7")]
        present = evaluate_request(None, ingress, http("GET", "/", headers=(("x-id", "7"),)))
        assert present.verdict is FlowVerdict.ALLOWED
        assert present.header_actions == ()


def test_different_rule_sets_never_share_an_answer() -> None:
    """Two connections with different rules get their own verdicts, however many rule sets come and go (the memo is bounded)."""
    from membrane.policies import flow as flow_module

    for i in range(flow_module._MEMO_MAX + 10):
        allow_get = i % 2 == 0
        ingress = _redirect(HttpRule(method="GET" if allow_get else "POST"))
        result = evaluate_request(None, ingress, http("GET", "/x"))
        assert (result.verdict is FlowVerdict.ALLOWED) is allow_get
    assert len(flow_module._memo) <= flow_module._MEMO_MAX


def test_field_value_cache_is_bounded_and_exact() -> None:
    """Remembered path matches never change an answer, also past the cache's size (RE2 full match on the path)."""
    from membrane.policies import l7 as l7_module

    rules = _http_set(HttpRule(path="/v[0-9]+/item"))
    for _ in range(2):
        for n in range(l7_module._CACHE_MAX + 50):
            assert rules.evaluate(http("GET", f"/v{n}/item")).allowed
            assert not rules.evaluate(http("GET", f"/v{n}/item/x")).allowed
