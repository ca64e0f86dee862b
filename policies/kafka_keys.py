"""Kafka API keys by Cilium's names, and the api-key sets that Cilium's `role` shorthand expands to.

Cilium 1.19 (pkg/policy/api/kafka.go): `produce` = Produce, Metadata, ApiVersions;
`consume` = Fetch, ListOffsets, Metadata, OffsetCommit, OffsetFetch, FindCoordinator, JoinGroup,
Heartbeat, LeaveGroup, SyncGroup, ApiVersions.
"""

from __future__ import annotations

from membrane.parsers.names import CILIUM_MAX_KAFKA_API_KEY, KAFKA_API_KEY_NAMES

# Cilium's `apiKey` names (KafkaAPIKeyMap: keys 0-33), taken from the one Kafka name table parsers use too.
API_KEYS: dict[str, int] = {name: key for key, name in KAFKA_API_KEY_NAMES.items() if key <= CILIUM_MAX_KAFKA_API_KEY}

ROLE_PRODUCE = "produce"
ROLE_CONSUME = "consume"
ROLE_API_KEYS: dict[str, frozenset[int]] = {
    ROLE_PRODUCE: frozenset({0, 3, 18}),
    ROLE_CONSUME: frozenset({1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18}),
}

# Requests whose body names topics (Cilium's isTopicAPIKey), and the ones Cilium parses: for those an
# empty topic list (e.g. Metadata for all topics) is not constrained by a topic rule.
TOPIC_API_KEYS = frozenset({0, 1, 2, 3, 4, 5, 6, 8, 9, 19, 20, 21, 23, 24, 27, 28, 34, 35, 37})
PARSED_TOPIC_API_KEYS = frozenset({0, 1, 2, 3, 8, 9})

TOPIC_AUTHORIZATION_FAILED = 29  # Kafka error code the proxy answers a denied request with


# Kafka's own request names where Cilium's policy names differ (for `trace --kafka-api-key` only;
# policies must use Cilium's names, as Cilium's apiKey validation does).
_KAFKA_PROTOCOL_NAMES: dict[str, int] = {"listoffsets": 2, "groupcoordinator": 10}


def parse_api_key(text: str) -> int | None:
    """A Cilium api-key name or Kafka's request name (case-, `_`- and `-`-insensitive), or a decimal
    number 0-32767 -> the numeric key; None if unknown."""
    t = text.strip()
    name = t.lower().replace("_", "").replace("-", "")
    key = API_KEYS.get(name, _KAFKA_PROTOCOL_NAMES.get(name))
    if key is not None:
        return key
    if t.isdigit() and int(t) <= 32767:
        return int(t)
    return None
