"""Per-request L7 evaluation: compiled rule sets for HTTP (and gRPC), DNS and Kafka, and `Decision`.

An `L7RuleSet` is built once per (endpoint, direction, peer, port) rule combination and then asked
about each request. Evaluation is total: it never raises; a request of the wrong protocol for the
set's parser is MALFORMED, no matching rule is POLICY_DENIED. HTTP matching uses RE2 sets (one
pass per field over all rules) so a port with 100 rules costs a few set matches, not 100 regexes.
Rules (Cilium 1.19 / cilium-envoy): a request is allowed iff at least one rule matches; method,
path (whole normalised target, query included) and host are RE2 full matches; `headers` entries
are "Name" (present) or "Name value" (exact; split at the first space, trailing ':' dropped);
`headerMatches` without `mismatch` must match, with one they only trigger an action (DELETE of an
absent header is none: cilium/proxy HeaderMatch::allowed). When any rule of the set has mismatch
actions, every matching rule contributes its actions.
Per request it costs dict lookups in the common case: each field set remembers (bounded) the rule
bitmap of the values it has seen, and an allowing decision without header actions is made once per
rule and shared (`Decision.shared`), so callers may memoise what they derive from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import re2
from membrane.parsers.events import DnsQuery, GrpcCall, HttpRequest, KafkaRequest, Reason
from membrane.policies import dnsmatch
from membrane.policies.crd import DnsRule, HttpRule, KafkaRule, MismatchAction, ParserType, re2_options
from membrane.policies.kafka_keys import PARSED_TOPIC_API_KEYS, TOPIC_API_KEYS

L7Request = HttpRequest | GrpcCall | DnsQuery | KafkaRequest
_OPTIONS = re2_options()


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderAction:
    """What the proxy does to a request header after a `headerMatches` mismatch.

    `value` is None for DELETE and LOG, and when it would come from a Kubernetes secret that
    membrane cannot read (`from_secret`). Never print values: they are often credentials.
    """

    action: MismatchAction
    name: str
    value: str | None = None
    from_secret: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The verdict on one request. `reason` is None iff allowed; `rule` is the deciding rule reference."""

    allowed: bool
    reason: Reason | None = None
    rule: str | None = None
    header_actions: tuple[HeaderAction, ...] = ()
    matched: tuple[str, ...] = ()  # every rule that matched (more than one only with header actions)
    # True for the decisions a rule set makes once and returns for every request they fit (so callers
    # may memoise what they derive from one); False for one made for a single request.
    shared: bool = field(default=False, compare=False, repr=False)


DENIED = Decision(allowed=False, reason=Reason.POLICY_DENIED, shared=True)
WRONG_PROTOCOL = Decision(allowed=False, reason=Reason.MALFORMED, shared=True)
_CACHE_MAX = 1024  # distinct field values remembered per field set; the cache is emptied when full


def _iter_bits(bits: int) -> list[int]:
    out = []
    while bits:
        low = bits & -bits
        out.append(low.bit_length() - 1)
        bits ^= low
    return out


class _FieldSet:
    """RE2 full-match set over one field of all rules: field value -> bitmap of rules it satisfies.

    The bitmap of each value seen is remembered (bounded): a port sees the same few methods, hosts
    and paths over and over, and a dict lookup costs far less than a set match.
    """

    __slots__ = ("_any", "_cache", "_masks", "_set")

    def __init__(self, patterns: Sequence[str | None]) -> None:
        self._any = 0
        index: dict[str, int] = {}
        masks: list[int] = []
        for i, p in enumerate(patterns):
            if p is None:
                self._any |= 1 << i
                continue
            j = index.get(p)
            if j is None:
                j = index[p] = len(masks)
                masks.append(0)
            masks[j] |= 1 << i
        self._masks = masks
        self._cache: dict[str, int] = {}
        self._set: Any = None
        if masks:
            s = re2.Set.FullMatchSet(_OPTIONS)
            for p in index:
                s.Add(p)
            s.Compile()
            self._set = s

    def match(self, value: str | None) -> int:
        if self._set is None or value is None:
            return self._any
        cache = self._cache
        bits = cache.get(value)
        if bits is not None:
            return bits
        bits = self._any
        hits = self._set.Match(value)  # None when nothing matches
        if hits:
            for i in hits:
                bits |= self._masks[i]
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[value] = bits
        return bits


def _header_value(headers: Sequence[tuple[str, str]], lname: str) -> str | None:
    """Values of a header (case-insensitive name), joined with ',' as Envoy does; None when absent."""
    found: list[str] | None = None
    for name, value in headers:
        if name.lower() == lname:
            if found is None:
                found = [value]
            else:
                found.append(value)
    return None if found is None else ",".join(found)


@dataclass(frozen=True, slots=True)
class _HttpChecks:
    ref: str
    required: tuple[tuple[str, str | None], ...]  # (lower name, exact value or None = presence)
    matches: tuple[tuple[str, str, str | None, bool, MismatchAction | None], ...]  # (lname, name, expected, secret, action)


class HttpRuleSet:
    __slots__ = ("_all", "_allow", "_checks", "_has_actions", "_host", "_method", "_path")

    def __init__(self, rules: Sequence[tuple[HttpRule, str]]) -> None:
        self._method = _FieldSet([r.method for r, _ in rules])
        self._path = _FieldSet([r.path for r, _ in rules])
        self._host = _FieldSet([r.host for r, _ in rules])
        self._all = (1 << len(rules)) - 1
        checks = []
        has_actions = False
        for rule, ref in rules:
            required: list[tuple[str, str | None]] = []
            for h in rule.headers:
                name, sep, value = h.partition(" ")
                required.append((name.rstrip(":").lower(), value if sep else None))
            matches = []
            for hm in rule.header_matches:
                unresolvable_secret = hm.secret is not None and hm.value is None
                expected = None if unresolvable_secret else (hm.value if hm.value is not None else None)
                matches.append((hm.name.lower(), hm.name, expected, hm.secret is not None, hm.mismatch))
                if hm.mismatch is not None:
                    has_actions = True
            checks.append(_HttpChecks(ref, tuple(required), tuple(matches)))
        self._checks = tuple(checks)
        self._has_actions = has_actions
        # Without header actions an allowing decision depends only on the rule: made once per rule.
        self._allow = tuple(Decision(allowed=True, rule=c.ref, matched=(c.ref,), shared=True) for c in checks)

    def evaluate(self, method: str, target: str, host: str | None, headers: Sequence[tuple[str, str]]) -> Decision:
        cand = self._all & self._method.match(method)
        if cand:
            cand &= self._path.match(target)
        if cand:
            cand &= self._host.match(host)
        if not cand:
            return DENIED
        matched: list[str] = []
        actions: list[HeaderAction] = []
        for i in _iter_bits(cand):
            check = self._checks[i]
            if not check.required and not check.matches:  # no header conditions: the rule matches as is
                if not self._has_actions:
                    return self._allow[i]
                matched.append(check.ref)
                continue
            ok, rule_actions = self._check_headers(check, headers)
            if not ok:
                continue
            if not self._has_actions:
                return self._allow[i]
            matched.append(check.ref)
            actions.extend(rule_actions)
        if not matched:
            return DENIED
        return Decision(allowed=True, rule=matched[0], header_actions=tuple(actions), matched=tuple(matched))

    @staticmethod
    def _check_headers(check: _HttpChecks, headers: Sequence[tuple[str, str]]) -> tuple[bool, list[HeaderAction]]:
        for lname, value in check.required:
            present = _header_value(headers, lname)
            if present is None or (value is not None and present != value):
                return False, []
        actions: list[HeaderAction] = []
        for lname, name, expected, secret, action in check.matches:
            present = _header_value(headers, lname)
            if expected is None and not secret:
                ok = present is not None
            else:
                ok = expected is not None and present == expected
            if ok:
                continue
            if action is None:
                return False, []
            if action is MismatchAction.DELETE and present is None:
                # cilium/proxy HeaderMatch::allowed: DELETE of an absent header returns early ("nothing to
                # remove"): no action. ADD and REPLACE on an absent header do act; LOG logs.
                continue
            value = expected if action in (MismatchAction.ADD, MismatchAction.REPLACE) else None
            actions.append(HeaderAction(action=action, name=name, value=value, from_secret=secret))
        return True, actions


class DnsRuleSet:
    __slots__ = ("_decisions", "_names", "_patterns", "_refs")

    def __init__(self, rules: Sequence[tuple[DnsRule, str]]) -> None:
        self._names: dict[str, str] = {}
        self._decisions: dict[str, Decision] = {}  # one allowing decision per rule reference
        patterns: list[str] = []
        refs: list[str] = []
        for rule, ref in rules:
            if rule.match_name is not None:
                self._names.setdefault(dnsmatch.fqdn(rule.match_name), ref)
            elif rule.match_pattern is not None:
                patterns.append(dnsmatch.pattern_to_regex(rule.match_pattern))
                refs.append(ref)
        self._refs = refs
        self._patterns: Any = None
        if patterns:
            s = re2.Set.SearchSet(_OPTIONS)  # the regexes carry their own ^...$ anchors
            for p in patterns:
                s.Add(p)
            s.Compile()
            self._patterns = s

    def match(self, name: str) -> str | None:
        """The reference of the first rule matching `name` (any case, with or without trailing dot)."""
        fq = dnsmatch.fqdn(name)
        ref = self._names.get(fq)
        if ref is not None:
            return ref
        if self._patterns is not None:
            hits = self._patterns.Match(fq)
            if hits:
                return str(self._refs[min(hits)])
        return None

    def evaluate(self, name: str) -> Decision:
        ref = self.match(name)
        if ref is None:
            return DENIED
        decision = self._decisions.get(ref)
        if decision is None:
            decision = self._decisions[ref] = Decision(allowed=True, rule=ref, matched=(ref,), shared=True)
        return decision


class KafkaRuleSet:
    __slots__ = ("_rules",)

    def __init__(self, rules: Sequence[tuple[KafkaRule, str]]) -> None:
        self._rules = tuple(rules)

    @staticmethod
    def _rule_matches(rule: KafkaRule, req: KafkaRequest) -> bool:
        if rule.api_keys and req.api_key not in rule.api_keys:
            return False
        if rule.api_version is not None and rule.api_version != req.api_version:
            return False
        if rule.client_id is not None and rule.client_id != req.client_id:
            return False
        if rule.topic is None:
            return True
        if not req.topics_known:
            return False  # topics named by id only: a topic rule cannot be decided, fail closed
        if not req.topics:
            # Cilium: a request without topics is not constrained by a topic rule, unless its kind
            # carries topics that were not parsed (then the topic cannot be checked: no match).
            return req.api_key not in TOPIC_API_KEYS or req.api_key in PARSED_TOPIC_API_KEYS
        return rule.topic in req.topics

    def evaluate(self, req: KafkaRequest) -> Decision:
        """Allowed iff one rule without topic matches, or the matching topic rules cover every topic."""
        uncovered = set(req.topics)
        refs: list[str] = []
        for rule, ref in self._rules:
            if not self._rule_matches(rule, req):
                continue
            if rule.topic is None or not req.topics:
                return Decision(allowed=True, rule=ref, matched=(ref,))
            if rule.topic in uncovered:
                uncovered.discard(rule.topic)
                refs.append(ref)
                if not uncovered:
                    return Decision(allowed=True, rule=refs[0], matched=tuple(refs))
        return DENIED


class L7RuleSet:
    """The L7 rules that apply to one (endpoint, direction, peer, port, protocol).

    `entries` pairs each rule with its reference; a rule of None stands for "allow everything" (an
    L3/L4-only allow for the same peer voids the port's L7 constraints: Cilium's wildcarding).
    """

    __slots__ = ("_dns", "_http", "_kafka", "parser", "refs")

    def __init__(self, parser: ParserType, entries: Sequence[tuple[HttpRule | DnsRule | KafkaRule | None, str]]) -> None:
        self.parser = parser
        self.refs = tuple(ref for _, ref in entries)
        self._http: HttpRuleSet | None = None
        self._dns: DnsRuleSet | None = None
        self._kafka: KafkaRuleSet | None = None
        match parser:
            case ParserType.HTTP:
                self._http = HttpRuleSet([(r if isinstance(r, HttpRule) else HttpRule(), ref) for r, ref in entries])
            case ParserType.DNS:
                self._dns = DnsRuleSet(
                    [(r if isinstance(r, DnsRule) else DnsRule(match_pattern="*"), ref) for r, ref in entries]
                )
            case ParserType.KAFKA:
                self._kafka = KafkaRuleSet([(r if isinstance(r, KafkaRule) else KafkaRule(), ref) for r, ref in entries])

    def evaluate(self, request: L7Request) -> Decision:
        """Decide one request. Returns a Decision; never raises.

        HttpRequest: `target` must already be normalised (parsers.http_target.normalize_target).
        GrpcCall: judged as HTTP POST of its path with its headers (Cilium treats gRPC as HTTP).
        """
        try:
            if self._http is not None:
                if isinstance(request, HttpRequest):
                    return self._http.evaluate(request.method, request.target, request.host, request.headers)
                if isinstance(request, GrpcCall):
                    return self._http.evaluate("POST", request.path, request.authority, request.headers)
                return WRONG_PROTOCOL
            if self._dns is not None:
                return self._dns.evaluate(request.name) if isinstance(request, DnsQuery) else WRONG_PROTOCOL
            if self._kafka is not None:
                return self._kafka.evaluate(request) if isinstance(request, KafkaRequest) else WRONG_PROTOCOL
        except Exception:  # evaluation is total: an unexpected input fails closed
            return DENIED
        return DENIED
