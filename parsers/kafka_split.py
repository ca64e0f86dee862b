"""Kafka per-topic answers: forward the allowed topics of a request, answer the denied ones with 29.

Owns the rewriting of one request into its allowed topics and the merging of the broker's answer
with synthesised TOPIC_AUTHORIZATION_FAILED entries, for the kinds whose responses carry an error
per topic/partition: Produce, Fetch, ListOffsets, Metadata, OffsetCommit, OffsetFetch (every
version kafka-python's schemas give). Never decides which topics are denied, never touches sockets.
Invariant: the forwarded frame names no denied topic (re-parsed and checked before it is returned).

Rules / theory of operation
* `split_by_topic(request, denied)` -> `TopicSplit` or `NoSplit(reason)`. A `NoSplit` means the
  caller answers the whole request with `kafka.refusal` (or forwards it, when nothing is denied)
  and records `reason` in the flow: every topic denied, a kind without per-topic errors, topics
  named by an id that cannot be resolved, a version outside the schemas, an undecodable body.
* The per-topic list (`_LISTS`) is the request's top-level topic array (OffsetFetch v8+: each
  group's); Fetch's `forgotten_topics_data` loses its denied topics too (the broker never served them).
* `TopicSplit.merge(response)` takes the broker's answer to `forward` and returns the client's
  frame: the original correlation id, the topics in the order the client named them (allowed ones
  as the broker answered, denied ones with 29 on every partition), then any topic the broker added
  on its own (Fetch sessions answer for partitions of earlier requests). A topic the broker left
  out stays out (incremental Fetch omits unchanged partitions).
* `TopicSplit.failure(reason)` is the answer when the upstream failed: `reason`'s error (13
  NETWORK_EXCEPTION for UPSTREAM_FAILED) on the allowed topics, 29 on the denied ones; b"" when the
  client expects no answer (Produce acks=0).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from membrane.parsers._kafka_schema import api_schemas
from membrane.parsers.errors import MalformedMessage, ParseError
from membrane.parsers.events import Direction, KafkaRequest, KafkaResponse, Reason
from membrane.parsers.kafka import (
    ERR_NONE,
    ERR_TOPIC_AUTHORIZATION_FAILED,
    _build,
    kafka_error_code,
    message_classes,
    parse_request,
)

__all__ = ["SPLITTABLE_API_KEYS", "NoSplit", "TopicSplit", "split_by_topic"]

_ZERO_UUID = "0" * 32
_OFFSET_FETCH = 9
_FETCH = 1
_GROUPED_OFFSET_FETCH_VERSION = 8  # OffsetFetch v8+ (KIP-709) nests topics in groups

# api key -> (request topic array, response topic array); OffsetFetch v8+ is handled by `_paths`.
_LISTS: dict[int, tuple[str, str]] = {
    0: ("topic_data", "responses"),  # Produce
    1: ("topics", "responses"),  # Fetch
    2: ("topics", "topics"),  # ListOffsets
    3: ("topics", "topics"),  # Metadata
    8: ("topics", "topics"),  # OffsetCommit
    9: ("topics", "topics"),  # OffsetFetch v1-7
}
SPLITTABLE_API_KEYS = frozenset(_LISTS)
"""The kinds whose responses carry an error per topic, so a request naming allowed and denied
topics can be answered per topic instead of refused whole."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NoSplit:
    """The request cannot be answered per topic: refuse it whole, and say `reason` in its flow."""

    reason: str


def _topic_key(item: Any) -> tuple[str | None, str | None]:
    """(name, topic id hex) of a request or response topic element; None where absent or null."""
    name = getattr(item, "name", None)
    if name is None:
        name = getattr(item, "topic", None)
    tid = getattr(item, "topic_id", None)
    hexid = None
    if tid is not None:
        hexid = tid.hex if hasattr(tid, "hex") else str(tid)
        if hexid == _ZERO_UUID:
            hexid = None
    # kafka-python fills fields absent at a version with defaults ('' for names): Kafka topic names are never empty.
    return (name if isinstance(name, str) and name else None), hexid


def _same_topic(a: tuple[str | None, str | None], b: tuple[str | None, str | None]) -> bool:
    """Whether two (name, id) keys name the same topic: by id when both carry one, else by name."""
    if a[1] is not None and b[1] is not None:
        return a[1] == b[1]
    return a[0] is not None and a[0] == b[0]


@dataclass(frozen=True, slots=True)
class _Slot:
    """One topic element of the original request, in order: either forwarded or answered here."""

    key: tuple[str | None, str | None]
    denied: bool
    item: Any  # the request element (a kafka-python data object)


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicSplit:
    """A request split into its allowed part (`forward`) and the denied topics answered here.

    `forward` keeps the api key, version and correlation id of `original`; send its `raw` upstream
    and tell the response parser to `expect(forward)`. Pass the matching response to `merge`.
    """

    original: KafkaRequest
    forward: KafkaRequest
    denied: tuple[str, ...]  # denied topic names (ids resolved), in request order
    _groups: tuple[tuple[str | None, tuple[_Slot, ...]], ...] = field(repr=False)  # (group id or None, slots)

    def merge(self, response: KafkaResponse) -> bytes:
        """The client's answer: the broker's `response` to `forward` with 29 entries for the denied topics.

        Returns: the whole frame (size prefix included), correlation id of `original`.
        Raises: MalformedMessage (server-to-client) when `response` cannot be decoded at its version:
        the caller closes the connection, as for any unreadable response.
        """
        _, responses = message_classes()
        cls = responses[self.original.api_key]
        version = self.original.api_version
        try:
            decoded = cls.decode(response.raw, version=version, header=True, framed=True)
        except Exception as e:  # kafka-python raises assorted types on bad bytes
            raise MalformedMessage(f"response to a split {cls.__name__} v{version} is undecodable: {e}",
                                   direction=Direction.SERVER_TO_CLIENT) from e
        return self._merged(decoded, cls, version)

    def failure(self, reason: Reason) -> bytes:
        """The answer when the broker cannot answer `forward` (`reason` UPSTREAM_FAILED or UPSTREAM_TIMEOUT).

        Returns: the frame with `kafka_error_code(reason)` on every allowed topic and 29 on the denied
        ones, in request order; b"" when the client expects no answer (Produce acks=0).
        Raises: nothing.
        """
        if not self.original.expects_response:
            return b""
        _, responses = message_classes()
        cls = responses[self.original.api_key]
        version = self.original.api_version
        code = kafka_error_code(reason)
        allowed_groups = tuple((g, tuple(s for s in slots if not s.denied)) for g, slots in self._groups)
        values = self._synthesise(cls, version, allowed_groups, (code, code))
        return self._merged(cls(version=version, **values), cls, version)

    # --- internals --------------------------------------------------------------------------------

    def _paths(self) -> tuple[str, str]:
        return _LISTS[self.original.api_key]

    def _synthesise(self, cls: Any, version: int, groups: tuple[tuple[str | None, tuple[_Slot, ...]], ...],
                    errors: tuple[int, int]) -> dict[str, Any]:
        """Response values answering just the slots in `groups` with `errors` (per topic, elsewhere)."""
        req_dict: dict[str, Any]
        if _is_grouped(self.original):
            req_dict = {"groups": [{"group_id": g, "topics": [s.item.to_dict(json=False) for s in slots]}
                                   for g, slots in groups]}
        else:
            req_dict = {self._paths()[0]: [s.item.to_dict(json=False) for _g, slots in groups for s in slots]}
        return _build(cls._struct, version, req_dict, errors, in_topic=False)

    def _denied_entries(self, cls: Any, version: int) -> list[list[Any]]:
        """Per group, the synthesised response elements of the denied slots (in slot order)."""
        out = []
        for group, slots in self._groups:
            denied = tuple(s for s in slots if s.denied)
            values = self._synthesise(cls, version, ((group, denied),), (ERR_TOPIC_AUTHORIZATION_FAILED, ERR_NONE))
            if _is_grouped(self.original):
                out.append(list(values["groups"][0].topics) if values["groups"] else [])
            else:
                out.append(list(values[self._paths()[1]]))
        return out

    def _merged(self, decoded: Any, cls: Any, version: int) -> bytes:
        resp_list = self._paths()[1]
        denied_entries = self._denied_entries(cls, version)
        if _is_grouped(self.original):
            left = list(decoded.groups or [])
            groups = []
            for (group, slots), entries in zip(self._groups, denied_entries, strict=True):
                at = next((i for i, g in enumerate(left) if g.group_id == group), None)
                if at is None:  # the broker answered nothing for the group: answer its denied topics alone
                    target = self._synthesise(cls, version, ((group, ()),), (ERR_NONE, ERR_NONE))["groups"][0]
                else:
                    target = left.pop(at)
                target.topics = _ordered(slots, list(target.topics or []), entries)
                groups.append(target)
            decoded.groups = groups + left
        else:
            ((_g, slots),) = self._groups
            setattr(decoded, resp_list, _ordered(slots, list(getattr(decoded, resp_list) or []), denied_entries[0]))
        decoded.with_header(correlation_id=self.original.correlation_id)
        return bytes(decoded.encode(header=True, framed=True))


def _ordered(slots: tuple[_Slot, ...], upstream: list[Any], denied: list[Any]) -> list[Any]:
    """Response elements in the request's order: the broker's for allowed slots, ours for denied ones,
    then whatever the broker added that no slot asked for."""
    merged: list[Any] = []
    denied_iter = iter(denied)
    for slot in slots:
        if slot.denied:
            merged.append(next(denied_iter))
            continue
        for i, item in enumerate(upstream):
            if _same_topic(_topic_key(item), slot.key):
                merged.append(upstream.pop(i))
                break
    merged.extend(upstream)
    return merged


def _is_grouped(request: KafkaRequest) -> bool:
    return request.api_key == _OFFSET_FETCH and request.api_version >= _GROUPED_OFFSET_FETCH_VERSION


def split_by_topic(request: KafkaRequest, denied: Collection[str], *,
                   names_by_id: Mapping[str, str] | None = None) -> TopicSplit | NoSplit:
    """Split `request` into what may go upstream and what is answered here.

    `denied` holds the topic names the policy refuses for this request; `names_by_id` (topic id hex
    -> name, learned from Metadata responses) resolves topics named by id only.
    Returns: a TopicSplit when at least one named topic is allowed and one denied; NoSplit(reason)
    otherwise: the caller refuses the whole request with `kafka.refusal` and logs the reason.
    Raises: nothing.
    """
    ids = names_by_id or {}
    if request.api_key not in _LISTS:
        return NoSplit(reason=f"api key {request.api_key} has no per-topic errors")
    schema = api_schemas().get(request.api_key)
    requests, _responses = message_classes()
    cls = requests.get(request.api_key)
    if schema is None or cls is None or not schema.min_version <= request.api_version <= schema.max_version:
        return NoSplit(reason=f"version {request.api_version} is outside the known schemas")
    version = request.api_version
    try:
        decoded = cls.decode(request.raw, version=version, header=True, framed=True)
    except Exception:
        return NoSplit(reason="the request body cannot be decoded for rewriting")
    req_list = _LISTS[request.api_key][0]
    containers = list(decoded.groups or []) if _is_grouped(request) else [decoded]
    groups: list[tuple[str | None, tuple[_Slot, ...]]] = []
    denied_names: list[str] = []
    allowed_any = False
    for container in containers:
        items = getattr(container, "topics" if _is_grouped(request) else req_list)
        if items is None:  # null list = every topic (Metadata, OffsetFetch): nothing to split by
            return NoSplit(reason="the request asks for all topics")
        slots = []
        for item in items:
            name, hexid = _topic_key(item)
            resolved = _resolved(item, ids)
            if resolved is None:
                return NoSplit(reason="a topic is named by an id that is not resolved")
            is_denied = resolved in denied
            if is_denied:
                denied_names.append(resolved)
            else:
                allowed_any = True
            slots.append(_Slot(key=(name, hexid), denied=is_denied, item=item))
        group = getattr(container, "group_id", None) if _is_grouped(request) else None
        groups.append((group, tuple(slots)))
        setattr(container, "topics" if _is_grouped(request) else req_list,
                [s.item for s in slots if not s.denied])
    if not denied_names:
        return NoSplit(reason="no denied topic is named in the per-topic list")
    if not allowed_any:
        return NoSplit(reason="every topic named is denied")
    if request.api_key == _FETCH and getattr(decoded, "forgotten_topics_data", None):
        decoded.forgotten_topics_data = [t for t in decoded.forgotten_topics_data
                                         if _resolved(t, ids) is not None and _resolved(t, ids) not in denied]
    if _is_grouped(request):
        decoded.groups = containers
    decoded.with_header(correlation_id=request.correlation_id, client_id=request.client_id)
    try:
        frame = bytes(decoded.encode(header=True, framed=True))
        forward = parse_request(frame)
    except (ParseError, Exception):
        return NoSplit(reason="the rewritten request cannot be encoded")
    left = set(forward.topics) | {ids[i] for i in forward.topic_ids if i in ids}
    if left & set(denied) or (forward.topic_ids and not all(i in ids for i in forward.topic_ids)):
        # A denied topic is named somewhere other than the per-topic list: never let it through.
        return NoSplit(reason="a denied topic is named outside the per-topic list")
    return TopicSplit(original=request, forward=forward, denied=tuple(dict.fromkeys(denied_names)),
                      _groups=tuple(groups))


def _resolved(item: Any, ids: Mapping[str, str]) -> str | None:
    """The topic name an element stands for: its id's learned name, else its own name; None if neither."""
    name, hexid = _topic_key(item)
    if hexid is not None and hexid in ids:
        return ids[hexid]
    return name
