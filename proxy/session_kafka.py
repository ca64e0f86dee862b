"""Kafka session: every request judged; denied ones answered with the parser's synthesised refusal.

Owns the wiring of `parsers.kafka` to the policy and the answer order: a Kafka client expects its
responses in request order, so a refusal waits behind the responses of earlier forwarded requests.
Never parses bytes itself. Invariant: the upstream never sees a denied topic, and the client
sees exactly one answer per request that expects one, in correlation order.

* Per topic: a Produce/Fetch/ListOffsets/Metadata/OffsetCommit/OffsetFetch naming allowed and
  denied topics goes upstream with the allowed topics only (`parsers.kafka_split`), and the broker's
  answer reaches the client merged with TOPIC_AUTHORIZATION_FAILED for the denied ones. A request
  that cannot be split is refused whole; its flow's summary says why.
* The upstream fails (cannot connect, or closes with answers owed): every request still owed an
  answer gets NETWORK_EXCEPTION (13, retriable) in order, then the connection closes.
* A malformed or oversized frame from the client: the requests before it are judged and answered
  (the parser hands them over in the error), nothing more is read, and the connection closes once
  the answers owed are sent.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from membrane.parsers import kafka, kafka_split
from membrane.parsers.errors import MessageTooLarge, ParseError
from membrane.parsers.events import Direction, KafkaRequest, KafkaResponse, Reason
from membrane.parsers.names import kafka_api_key_name
from membrane.proxy.flows import DROPPED, ERROR, FORWARDED, REQUEST, RESPONSE, Flow, FlowContext, l7_kafka
from membrane.proxy.session import (
    C2S,
    S2C,
    Action,
    ConnectionPolicy,
    Forward,
    Log,
    Reply,
    Session,
    flow_log,
    verdict_of,
    wall_clock_ns,
)

_METADATA = 3
MAX_TOPIC_IDS = 65536  # topic id -> name pairs remembered per upstream cluster
MAX_IN_FLIGHT = 1024  # answers owed on one connection; beyond it the connection closes
# A Kafka request frame is judged whole, so it is buffered whole: at most the proxy's per-connection
# buffer bound (--max-buffer-bytes) plus room for the request header around a producer's
# max.request.size batch (clients default both to 1 MiB). A bigger size prefix closes the connection.
KAFKA_FRAME_HEADROOM_BYTES = 64 * 1024


@dataclass(slots=True)
class KafkaLearned:
    """What Metadata responses taught about one upstream cluster, shared by its connections: the topic
    names of topic ids (so requests naming topics by id only can be judged by topic) and the brokers
    (which Metadata refusals must list, or kafka-python and aiokafka ignore them and time out)."""

    names_by_id: dict[str, str] = field(default_factory=dict)
    brokers: tuple[kafka.Broker, ...] = ()

    def remember_topic_ids(self, ids: Mapping[str, str]) -> None:
        """Add what one Metadata answer named; beyond MAX_TOPIC_IDS the oldest half is forgotten (a
        hostile broker must not grow the proxy without bound; a forgotten id is judged as unknown)."""
        names = self.names_by_id
        names.update(ids)
        if len(names) > MAX_TOPIC_IDS:
            for key in list(names)[: len(names) - MAX_TOPIC_IDS // 2]:
                del names[key]


@dataclass(slots=True)
class _Due:
    """One answer the client waits for: a forwarded request's response, or a refusal waiting its turn."""

    request: KafkaRequest
    started_ns: int
    refusal: bytes | None = None
    split: kafka_split.TopicSplit | None = None  # forwarded in part: merge the broker's answer with 29s
    error_code: int = 0  # the refusal's error code, for its response record


class KafkaSession(Session):
    """Kafka between one client and its broker, judged per request."""

    protocol = "kafka"

    def __init__(
        self,
        *,
        context: FlowContext,
        policy: ConnectionPolicy,
        clock: Callable[[], int] = wall_clock_ns,
        max_frame_bytes: int = kafka.DEFAULT_MAX_FRAME_BYTES,
        max_response_frame_bytes: int = kafka.DEFAULT_MAX_FRAME_BYTES,
        learned: KafkaLearned | None = None,
    ) -> None:
        super().__init__(context=context, clock=clock)
        self.policy = policy
        self.requests = kafka.KafkaRequestParser(max_frame_bytes=max_frame_bytes)
        # Responses are not judged, but a Fetch answer legitimately reaches fetch.max.bytes (50 MiB by
        # default): they keep Kafka's own 100 MiB bound unless told otherwise.
        self.responses = kafka.KafkaResponseParser(max_frame_bytes=max_response_frame_bytes)
        self._due: deque[_Due] = deque()
        self._forwarded_due = 0  # entries of _due that wait for the broker
        self._client_failed = False  # the client's stream broke: answer what is owed, then close
        self.learned = learned if learned is not None else KafkaLearned()

    @property
    def is_idle(self) -> bool:
        return not self._due and self.requests.buffered_bytes == 0

    client_speaks_first = True  # awaiting_response stays False: JoinGroup and Fetch wait on purpose

    def on_data(self, direction: Direction, data: bytes) -> list[Action]:
        actions: list[Action] = []
        if direction is C2S:
            if self._client_failed:
                return actions  # nothing after a broken frame is read
            try:
                requests = self.requests.feed(data)
            except ParseError as e:
                for request in e.events_before:  # valid requests before the bad frame still get answers
                    assert isinstance(request, KafkaRequest)
                    self._request(request, actions)
                    if self.closed:
                        return actions
                actions.append(self._error_flow(e))
                self._client_failed = True
                self._close_when_answered(actions)
                return actions
            for request in requests:
                self._request(request, actions)
                if self.closed:
                    break
            return actions
        try:
            responses = self.responses.feed(data)
        except ParseError as e:
            for response in e.events_before:
                assert isinstance(response, KafkaResponse)
                if not self._response(response, actions):
                    return actions
            actions.append(self._error_flow(e))
            actions.extend(self._fail_owed(Reason.UPSTREAM_FAILED))
            return actions
        for response in responses:
            if not self._response(response, actions):
                return actions
        self._close_when_answered(actions)
        return actions

    def _response(self, response: KafkaResponse, actions: list[Action]) -> bool:
        """Relay one broker answer (merged with the denied topics' 29s when its request was split).
        False when the connection closed (a split's answer could not be decoded)."""
        due = self._due.popleft()
        self._forwarded_due -= 1
        raw = response.raw
        if due.split is not None:
            try:
                raw = due.split.merge(response)
            except ParseError as e:
                actions.append(self._error_flow(e))
                actions.extend(self.close())
                return False
        actions.append(Forward(S2C, raw))
        if response.api_key == _METADATA:
            self.learned.remember_topic_ids(kafka.metadata_topic_ids(response))
            self.learned.brokers = kafka.metadata_brokers(response) or self.learned.brokers
        now = self.clock()
        actions.append(self._flow(due.split.forward if due.split else due.request, RESPONSE, FORWARDED, now,
                                  latency_ns=now - due.started_ns))
        self._flush(actions)
        return True

    def on_upstream_failed(self, reason: Reason) -> list[Action]:
        return self._fail_owed(reason)

    def on_peer_closed(self, direction: Direction) -> list[Action]:
        if direction is S2C and self._forwarded_due:  # the broker went away owing answers
            return self._fail_owed(Reason.UPSTREAM_FAILED)
        return super().on_peer_closed(direction)

    def _fail_owed(self, reason: Reason) -> list[Action]:
        """The broker will not answer: every request owed an answer gets `reason`'s error (13
        NETWORK_EXCEPTION for UPSTREAM_FAILED, which clients retry), in order; then close."""
        now = self.clock()
        actions: list[Action] = []
        code = kafka.kafka_error_code(reason)
        for due in self._due:
            if due.refusal is not None:
                actions.append(Reply(due.refusal))
                actions.append(self._refusal_flow(due, now))
                continue
            answer = due.split.failure(reason) if due.split is not None \
                else kafka.refusal(due.request, reason, brokers=self.learned.brokers)
            if answer:
                actions.append(Reply(answer))
            actions.append(self._flow(due.request, RESPONSE, ERROR, now, reason=reason,
                                      latency_ns=now - due.started_ns, error_code=code))
            if answer is None:  # no answer can be encoded: later answers would be out of order
                break
        self._due.clear()
        self._forwarded_due = 0
        actions.extend(self.close())
        return actions

    def _close_when_answered(self, actions: list[Action]) -> None:
        if self._client_failed and not self._due and not self.closed:
            actions.extend(self.close())

    def _denied_topics(self, request: KafkaRequest) -> set[str]:
        """The topics of `request` the policy refuses, each judged alone (as Cilium judges each topic)."""
        denied = set()
        for topic in request.topics:
            alone = replace(request, topics=(topic,), topic_ids=(), topics_known=True)
            if not verdict_of(self.policy.judge(alone))[0]:
                denied.add(topic)
        return denied

    def _request(self, request: KafkaRequest, actions: list[Action]) -> None:
        now = self.clock()
        if len(self._due) >= MAX_IN_FLIGHT:
            actions.extend(self.close())  # bound what is held for the answer order (clients send 5 by default)
            return
        if request.topic_ids and self.learned.names_by_id:
            request = kafka.resolve_topic_ids(request, self.learned.names_by_id)
        allowed, verdict, reason, rule = verdict_of(self.policy.judge(request))
        if allowed:
            actions.append(Forward(C2S, request.raw))
            self.responses.expect(request)
            if request.expects_response:
                self._due.append(_Due(request=request, started_ns=now))
                self._forwarded_due += 1
            actions.append(self._flow(request, REQUEST, FORWARDED, now, rule=rule))
            return
        assert reason is not None
        why = ""
        if reason is Reason.POLICY_DENIED and len(request.topics) > 1 and request.api_key in kafka_split.SPLITTABLE_API_KEYS:
            denied = self._denied_topics(request)
            result = kafka_split.split_by_topic(request, denied, names_by_id=self.learned.names_by_id)
            if isinstance(result, kafka_split.TopicSplit):
                self._split(result, actions, now, rule)
                return
            why = result.reason
        elif reason is Reason.POLICY_DENIED and request.topics and request.api_key not in kafka_split.SPLITTABLE_API_KEYS:
            why = f"{kafka_api_key_name(request.api_key)} has no per-topic errors"
        refusal = kafka.refusal(request, reason, brokers=self.learned.brokers)
        actions.append(
            self._flow(request, REQUEST, verdict, now, rule=rule, reason=reason, error_code=kafka.kafka_error_code(reason),
                       why=why)
        )
        if refusal is None:  # no refusal can be encoded for this kind: the only safe answer is to close
            actions.extend(self.close())
            return
        if not refusal:  # Produce acks=0: the client reads no answer
            return
        self._due.append(_Due(request=request, started_ns=now, refusal=refusal, error_code=kafka.kafka_error_code(reason)))
        self._flush(actions)

    def _split(self, split: kafka_split.TopicSplit, actions: list[Action], now: int, rule: str | None) -> None:
        """Forward the allowed topics; the denied ones are answered when the broker's answer is merged."""
        forward = split.forward
        actions.append(Forward(C2S, forward.raw))
        self.responses.expect(forward)
        if forward.expects_response:
            self._due.append(_Due(request=split.original, started_ns=now, split=split))
            self._forwarded_due += 1
        actions.append(self._flow(forward, REQUEST, FORWARDED, now, why="allowed topics of a split request"))
        denied = replace(split.original, topics=split.denied, topic_ids=())
        actions.append(self._flow(denied, REQUEST, DROPPED, now, rule=rule, reason=Reason.POLICY_DENIED,
                                  error_code=kafka.ERR_TOPIC_AUTHORIZATION_FAILED,
                                  why="denied topics of a split request, answered per topic"))

    def _flush(self, actions: list[Action]) -> None:
        while self._due and self._due[0].refusal is not None:
            due = self._due.popleft()
            assert due.refusal is not None
            actions.append(Reply(due.refusal))
            actions.append(self._refusal_flow(due, self.clock()))

    def _refusal_flow(self, due: _Due, now: int) -> Log:
        """The response record of a refused request (Hubble shows the refusal the client got after the DROPPED request)."""
        # no latency: the proxy answered, the upstream latency histogram must not count it
        return self._flow(due.request, RESPONSE, FORWARDED, now, error_code=due.error_code)

    def _flow(
        self,
        request: KafkaRequest,
        l7_type: str,
        verdict: str,
        time_ns: int,
        *,
        rule: str | None = None,
        reason: Reason | None = None,
        latency_ns: int = 0,
        error_code: int = 0,
        why: str = "",
    ) -> Log:
        api = kafka_api_key_name(request.api_key)
        topics = request.topics or request.topic_ids
        l7 = l7_kafka(
            api_key=api,
            api_version=request.api_version,
            correlation_id=request.correlation_id,
            topics=topics,
            error_code=error_code,
        )
        summary = f"Kafka {l7_type.lower()} {api} v{request.api_version} corr={request.correlation_id}"
        if topics:
            summary += f" topics={','.join(topics)}"
        if why:
            summary += f" ({why})"
        return flow_log(
            self.context, verdict=verdict, l7_type=l7_type, l7=l7, summary=summary,
            time_ns=time_ns, latency_ns=latency_ns, rule=rule, reason=reason,
        )

    def _error_flow(self, e: ParseError) -> Log:
        reason = Reason.TOO_LARGE if isinstance(e, MessageTooLarge) else e.reason
        return Log(
            Flow(
                context=self.context,
                verdict=ERROR,
                l7_type=REQUEST,
                l7={"kafka": {"error_code": kafka.kafka_error_code(reason)}},
                summary=f"Kafka stream unreadable: {e}",
                time_ns=self.clock(),
                reason=reason.value,
                limit="kafka_frame_bytes" if isinstance(e, MessageTooLarge) else None,
            )
        )
