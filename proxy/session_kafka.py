"""Kafka session: every request judged; denied ones answered with the parser's synthesised refusal.

Owns the wiring of `parsers.kafka` to the policy and the answer order: a Kafka client expects its
responses in request order, so a refusal waits behind the responses of earlier forwarded requests.
Never parses bytes itself. Invariant: the upstream never sees a denied request, and the client
sees exactly one answer per request that expects one, in correlation order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from membrane.parsers import kafka
from membrane.parsers.errors import MessageTooLarge, ParseError
from membrane.parsers.events import Direction, KafkaRequest, Reason
from membrane.parsers.names import kafka_api_key_name
from membrane.proxy.flows import ERROR, FORWARDED, REQUEST, RESPONSE, Flow, FlowContext, l7_kafka
from membrane.proxy.session import (
    C2S,
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
        learned: KafkaLearned | None = None,
    ) -> None:
        super().__init__(context=context, clock=clock)
        self.policy = policy
        self.requests = kafka.KafkaRequestParser(max_frame_bytes=max_frame_bytes)
        self.responses = kafka.KafkaResponseParser(max_frame_bytes=max_frame_bytes)
        self._due: deque[_Due] = deque()
        self._forwarded_due = 0  # entries of _due that wait for the broker
        self.learned = learned if learned is not None else KafkaLearned()

    @property
    def is_idle(self) -> bool:
        return not self._due and self.requests.buffered_bytes == 0

    def on_data(self, direction: Direction, data: bytes) -> list[Action]:
        actions: list[Action] = []
        if direction is C2S:
            try:
                for request in self.requests.feed(data):
                    self._request(request, actions)
                    if self.closed:
                        break
            except ParseError as e:
                actions.append(self._error_flow(e))
                actions.extend(self.close())
            return actions
        try:
            responses = self.responses.feed(data)
        except ParseError as e:
            actions.append(self._error_flow(e))
            actions.extend(self.close())
            return actions
        for response in responses:
            actions.append(Forward(direction, response.raw))
            if response.api_key == _METADATA:
                self.learned.remember_topic_ids(kafka.metadata_topic_ids(response))
                self.learned.brokers = kafka.metadata_brokers(response) or self.learned.brokers
            due = self._due.popleft()
            self._forwarded_due -= 1
            now = self.clock()
            actions.append(self._flow(due.request, RESPONSE, FORWARDED, now, latency_ns=now - due.started_ns))
            self._flush(actions)
        return actions

    def on_upstream_failed(self, reason: Reason) -> list[Action]:
        # Kafka clients retry on a lost connection; answering each request with a synthesised
        # NETWORK_EXCEPTION would also be valid, but closing is what a broker outage looks like.
        # Each forwarded request still owed an answer gets an ERROR flow: the client sees the
        # connection drop, which its library reports as that error code (NETWORK_EXCEPTION/REQUEST_TIMED_OUT).
        now = self.clock()
        actions: list[Action] = [
            self._flow(due.request, RESPONSE, ERROR, now, reason=reason, latency_ns=now - due.started_ns,
                       error_code=kafka.kafka_error_code(reason))
            for due in self._due
            if due.refusal is None
        ]
        self._due.clear()
        actions.extend(self.close())
        return actions

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
        refusal = kafka.refusal(request, reason, brokers=self.learned.brokers)
        actions.append(
            self._flow(request, REQUEST, verdict, now, rule=rule, reason=reason, error_code=kafka.kafka_error_code(reason))
        )
        if refusal is None:  # no refusal can be encoded for this kind: the only safe answer is to close
            actions.extend(self.close())
            return
        if not refusal:  # Produce acks=0: the client reads no answer
            return
        self._due.append(_Due(request=request, started_ns=now, refusal=refusal))
        self._flush(actions)

    def _flush(self, actions: list[Action]) -> None:
        while self._due and self._due[0].refusal is not None:
            due = self._due.popleft()
            assert due.refusal is not None
            actions.append(Reply(due.refusal))

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
            )
        )
