"""A small Kafka-protocol broker on loopback, written for the test suite.

No real Kafka broker can be installed on this machine (no JVM, no network for images), so tests run
this one: a single node (id 0) speaking enough of the protocol for kafka-python, aiokafka and kcat
(librdkafka) to produce and consume through it: ApiVersions, Metadata, Produce, Fetch, ListOffsets,
FindCoordinator, JoinGroup/SyncGroup/Heartbeat/LeaveGroup, OffsetCommit/OffsetFetch,
OffsetForLeaderEpoch and InitProducerId, and for admin clients CreateTopics, DeleteTopics,
CreatePartitions, DeleteRecords and DescribeConfigs (no configs kept), and for transactional
producers AddPartitionsToTxn, AddOffsetsToTxn, EndTxn and TxnOffsetCommit (accepted, no markers
written: read_committed consumers see every record). The log is in memory, per topic-partition, holding the
record batches (magic v2) as produced with their base offsets rewritten. Topics are auto-created on
first Metadata/Produce; each gets a topic id (Fetch v13+, Metadata v10+ work by id). Groups are
naive (each JoinGroup starts a new generation led by the joiner): one consumer per group.

It advertises `advertised_host:advertised_port` (default: its own listen address) in Metadata and
FindCoordinator, so a proxy can sit in front. Every request frame received is kept in `requests`
(the bytes the clients sent, for the parser captures). With `deny_topics`, requests naming those
topics are answered with parsers.kafka.refusal() (what the proxy sends on a deny), so tests
can check that real clients read our refusals as authorization errors. Runs an asyncio loop in a
daemon thread:

    with KafkaTestBroker() as broker:            # 127.0.0.1, ephemeral port
        KafkaProducer(bootstrap_servers=broker.bootstrap)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from membrane.parsers import kafka as kafka_parser
from membrane.parsers.events import Reason
from membrane.parsers.kafka import message_classes, parse_request

# What this broker answers, (min, max) per api key. Capped below kafka-python's schema maxima only
# where this broker does not implement the newer semantics.
SUPPORTED: dict[int, tuple[int, int]] = {
    0: (3, 13),  # Produce
    1: (4, 17),  # Fetch
    2: (1, 10),  # ListOffsets
    3: (0, 13),  # Metadata
    8: (2, 9),  # OffsetCommit
    9: (1, 9),  # OffsetFetch
    10: (0, 6),  # FindCoordinator
    11: (0, 9),  # JoinGroup
    12: (0, 4),  # Heartbeat
    13: (0, 5),  # LeaveGroup
    14: (0, 5),  # SyncGroup
    18: (0, 4),  # ApiVersions
    19: (2, 7),  # CreateTopics
    20: (1, 6),  # DeleteTopics
    21: (0, 2),  # DeleteRecords
    22: (0, 5),  # InitProducerId
    23: (2, 4),  # OffsetForLeaderEpoch
    24: (0, 3),  # AddPartitionsToTxn (client versions; v4+ is broker-to-broker)
    25: (0, 4),  # AddOffsetsToTxn
    26: (0, 4),  # EndTxn
    28: (0, 4),  # TxnOffsetCommit
    32: (1, 4),  # DescribeConfigs
    37: (0, 3),  # CreatePartitions
}
_UNSUPPORTED_VERSION = 35
_UNKNOWN_TOPIC = 3
_MAX_WAIT_S = 0.5


@dataclass
class _Partition:
    batches: list[tuple[int, bytes]] = field(default_factory=list)  # (base offset, batch bytes)
    next_offset: int = 0


@dataclass
class _Topic:
    name: str
    topic_id: uuid.UUID
    partitions: list[_Partition]


def _obj(struct_field: Any, version: int, values: dict[str, Any]) -> dict[str, Any]:
    """Turn nested dicts into kafka-python data objects for `struct_field` at `version`."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        f = struct_field.fields[name]
        if f.is_struct_array():
            out[name] = [f.data_class(version=version, **_obj(f, version, v)) for v in value]
        elif f.is_struct() and isinstance(value, dict):
            out[name] = f.data_class(version=version, **_obj(f, version, value))
        else:
            out[name] = value
    return out


class KafkaTestBroker:
    """One in-memory broker node. `partitions` is the partition count of auto-created topics."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, advertised_host: str | None = None,
                 advertised_port: int | None = None, partitions: int = 1,
                 supported: dict[int, tuple[int, int]] | None = None, deny_topics: frozenset[str] = frozenset()) -> None:
        self.host = host
        self.port = port
        self.advertised_host = advertised_host
        self.advertised_port = advertised_port
        self.default_partitions = partitions
        self.supported = dict(SUPPORTED if supported is None else supported)
        # Requests naming any of these topics get parsers.kafka.refusal()'s answer instead of
        # being served: what the proxy does on a policy deny, checked here against real clients.
        self.deny_topics = deny_topics
        self.requests: list[bytes] = []  # every request frame received, size prefix included
        self.topics: dict[str, _Topic] = {}
        self._offsets: dict[tuple[str, str, int], int] = {}  # (group, topic, partition) -> committed offset
        self._groups: dict[str, dict[str, Any]] = {}
        self._producer_ids = itertools.count(1000)
        self._member_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._requests_cls, self._responses_cls = message_classes()

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> KafkaTestBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, self.host, self.port))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            self._server.close()
            self._loop.run_until_complete(self._server.wait_closed())
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()

        self._thread = threading.Thread(target=run, name="kafka-test-broker", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("test broker did not start")

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def _adv(self) -> tuple[str, int]:
        return (self.advertised_host or self.host, self.advertised_port or self.port)

    def create_topic(self, name: str, partitions: int | None = None) -> _Topic:
        with self._lock:
            if name not in self.topics:
                n = partitions or self.default_partitions
                self.topics[name] = _Topic(name, uuid.uuid4(), [_Partition() for _ in range(n)])
            return self.topics[name]

    def messages(self, topic: str, partition: int = 0) -> list[bytes | None]:
        """Record values stored in a partition, in offset order (decoded with kafka-python's record reader)."""
        from kafka.record import MemoryRecords

        out: list[bytes | None] = []
        for _, batch in self.topics[topic].partitions[partition].batches:
            records = MemoryRecords(batch)
            while records.has_next():
                b = records.next_batch()
                assert b is not None
                out.extend(r.value for r in b)
        return out

    # --- connection loop -------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(4)
                size = struct.unpack(">i", head)[0]
                if size < 0 or size > 100 * 1024 * 1024:
                    return
                frame = head + await reader.readexactly(size)
                with self._lock:
                    self.requests.append(frame)
                response = await self._handle(frame)
                if response is None:
                    continue
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:  # broker stopping: end quietly (asyncio logs a cancelled client task)
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _handle(self, frame: bytes) -> bytes | None:
        api_key, version, correlation_id = struct.unpack_from(">hhi", frame, 4)
        resp_cls = self._responses_cls[api_key]
        if api_key == 18 and version > self.supported[18][1]:
            # KIP-511: answer an ApiVersions we cannot read with v0 and UNSUPPORTED_VERSION + our range.
            return self._encode(resp_cls, 0, correlation_id, {"error_code": _UNSUPPORTED_VERSION,
                                                             "api_keys": self._api_keys()})
        if self.deny_topics:
            parsed = parse_request(frame)
            if set(parsed.topics) & self.deny_topics:
                host, port = self._adv
                refusal = kafka_parser.refusal(parsed, Reason.POLICY_DENIED, brokers=[(0, host, port, None)])
                if refusal is None:
                    raise ConnectionError("no refusal possible")
                return refusal or None
        lo_hi = self.supported.get(api_key)
        if lo_hi is None or not lo_hi[0] <= version <= lo_hi[1]:
            raise ConnectionError(f"unsupported api key {api_key} v{version}")
        req = self._requests_cls[api_key].decode(frame, version=version, header=True, framed=True)
        handler = getattr(self, f"_api_{api_key}")
        values = await handler(req, version)
        if values is None:
            return None
        return self._encode(resp_cls, version, correlation_id, values)

    def _encode(self, resp_cls: Any, version: int, correlation_id: int, values: dict[str, Any]) -> bytes:
        response = resp_cls(version=version, **_obj(resp_cls._struct, version, values))
        response.with_header(correlation_id=correlation_id)
        return bytes(response.encode(header=True, framed=True))

    def _api_keys(self) -> list[dict[str, int]]:
        return [{"api_key": k, "min_version": lo, "max_version": hi} for k, (lo, hi) in sorted(self.supported.items())]

    def _topic_by(self, name: str | None, topic_id: Any) -> _Topic | None:
        if name:
            return self.topics.get(name)
        for t in self.topics.values():
            if t.topic_id == topic_id:
                return t
        return None

    # --- APIs ------------------------------------------------------------------------------------

    async def _api_18(self, req: Any, version: int) -> dict[str, Any]:
        return {"error_code": 0, "api_keys": self._api_keys()}

    async def _api_3(self, req: Any, version: int) -> dict[str, Any]:
        if req.topics is None or (version == 0 and not req.topics):
            wanted = list(self.topics.values())
        else:
            wanted = []
            for t in req.topics:
                name = t.name
                topic = self._topic_by(name, getattr(t, "topic_id", None))
                if topic is None and name:
                    topic = self.create_topic(name)
                if topic is not None:
                    wanted.append(topic)
        host, port = self._adv
        return {
            "brokers": [{"node_id": 0, "host": host, "port": port}],
            "cluster_id": "membrane-test",
            "controller_id": 0,
            "topics": [{
                "error_code": 0, "name": t.name, "topic_id": t.topic_id, "is_internal": False,
                "partitions": [{"error_code": 0, "partition_index": i, "leader_id": 0, "leader_epoch": 0,
                                "replica_nodes": [0], "isr_nodes": [0], "offline_replicas": []}
                               for i in range(len(t.partitions))],
            } for t in wanted],
        }

    async def _api_0(self, req: Any, version: int) -> dict[str, Any] | None:
        responses = []
        for td in req.topic_data:
            name = getattr(td, "name", None)
            topic = self._topic_by(name, getattr(td, "topic_id", None))
            if topic is None and name:
                topic = self.create_topic(name)
            parts = []
            for pd in td.partition_data:
                if topic is None or not 0 <= pd.index < len(topic.partitions):
                    parts.append({"index": pd.index, "error_code": _UNKNOWN_TOPIC, "base_offset": -1})
                    continue
                base = self._append(topic.partitions[pd.index], bytes(pd.records or b""))
                parts.append({"index": pd.index, "error_code": 0, "base_offset": base, "log_start_offset": 0})
            entry: dict[str, Any] = {"partition_responses": parts}
            if version >= 13:
                entry["topic_id"] = topic.topic_id if topic else getattr(td, "topic_id", None)
            else:
                entry["name"] = name
            responses.append(entry)
        if req.acks == 0:
            return None
        return {"responses": responses}

    def _append(self, partition: _Partition, records: bytes) -> int:
        """Store magic-v2 batches, rewriting each base offset; returns the first offset assigned."""
        with self._lock:
            first = partition.next_offset
            pos = 0
            while pos + 61 <= len(records):
                batch_len = struct.unpack_from(">i", records, pos + 8)[0]
                end = pos + 12 + batch_len
                batch = bytearray(records[pos:end])
                last_delta = struct.unpack_from(">i", batch, 23)[0]
                struct.pack_into(">q", batch, 0, partition.next_offset)  # the CRC does not cover the base offset
                partition.batches.append((partition.next_offset, bytes(batch)))
                partition.next_offset += last_delta + 1
                pos = end
            return first

    async def _api_1(self, req: Any, version: int) -> dict[str, Any]:
        deadline = time.monotonic() + min(req.max_wait_ms / 1000, _MAX_WAIT_S)
        while True:
            responses, total = self._fetch(req, version)
            if total >= max(req.min_bytes, 1) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.01)
        return {"error_code": 0, "session_id": 0, "responses": responses}

    def _fetch(self, req: Any, version: int) -> tuple[list[dict[str, Any]], int]:
        responses = []
        total = 0
        for ft in req.topics:
            name = getattr(ft, "topic", None)
            topic = self._topic_by(name, getattr(ft, "topic_id", None))
            parts = []
            for fp in ft.partitions:
                if topic is None or not 0 <= fp.partition < len(topic.partitions):
                    parts.append({"partition_index": fp.partition, "error_code": _UNKNOWN_TOPIC, "high_watermark": -1,
                                  "records": None})
                    continue
                p = topic.partitions[fp.partition]
                chunks: list[bytes] = []
                size = 0
                with self._lock:
                    for base, batch in p.batches:
                        last = base + struct.unpack_from(">i", batch, 23)[0]
                        if last < fp.fetch_offset:
                            continue
                        if chunks and size + len(batch) > fp.partition_max_bytes:
                            break
                        chunks.append(batch)
                        size += len(batch)
                    hw = p.next_offset
                total += size
                parts.append({"partition_index": fp.partition, "error_code": 0, "high_watermark": hw,
                              "last_stable_offset": hw, "log_start_offset": 0, "aborted_transactions": [],
                              "preferred_read_replica": -1, "records": b"".join(chunks)})
            entry: dict[str, Any] = {"partitions": parts}
            if version >= 13:
                entry["topic_id"] = topic.topic_id if topic else getattr(ft, "topic_id", None)
            else:
                entry["topic"] = name
            responses.append(entry)
        return responses, total

    async def _api_2(self, req: Any, version: int) -> dict[str, Any]:
        topics = []
        for t in req.topics:
            topic = self.topics.get(t.name)
            parts = []
            for p in t.partitions:
                if topic is None or not 0 <= p.partition_index < len(topic.partitions):
                    parts.append({"partition_index": p.partition_index, "error_code": _UNKNOWN_TOPIC})
                    continue
                hw = topic.partitions[p.partition_index].next_offset
                offset = 0 if p.timestamp == -2 else hw
                parts.append({"partition_index": p.partition_index, "error_code": 0, "timestamp": -1,
                              "offset": offset, "leader_epoch": 0})
            topics.append({"name": t.name, "partitions": parts})
        return {"topics": topics}

    async def _api_10(self, req: Any, version: int) -> dict[str, Any]:
        host, port = self._adv
        if version >= 4:
            return {"coordinators": [{"key": k, "node_id": 0, "host": host, "port": port, "error_code": 0}
                                     for k in req.coordinator_keys]}
        return {"error_code": 0, "node_id": 0, "host": host, "port": port}

    async def _api_11(self, req: Any, version: int) -> dict[str, Any]:
        member_id = req.member_id or f"member-{next(self._member_ids)}"
        group = self._groups.setdefault(req.group_id, {"generation": 0, "assignments": {}})
        group["generation"] += 1
        group["assignments"] = {}
        protocol = req.protocols[0]
        group["protocol"] = protocol.name
        return {
            "error_code": 0, "generation_id": group["generation"], "protocol_type": req.protocol_type,
            "protocol_name": protocol.name, "leader": member_id, "member_id": member_id,
            "members": [{"member_id": member_id, "group_instance_id": getattr(req, "group_instance_id", None),
                         "metadata": bytes(protocol.metadata)}],
        }

    async def _api_14(self, req: Any, version: int) -> dict[str, Any]:
        group = self._groups.setdefault(req.group_id, {"generation": 0, "assignments": {}, "protocol": None})
        for a in req.assignments or []:
            group["assignments"][a.member_id] = bytes(a.assignment)
        return {"error_code": 0, "protocol_type": getattr(req, "protocol_type", None) or "consumer",
                "protocol_name": getattr(req, "protocol_name", None) or group.get("protocol"),
                "assignment": group["assignments"].get(req.member_id, b"")}

    async def _api_12(self, req: Any, version: int) -> dict[str, Any]:
        return {"error_code": 0}

    async def _api_13(self, req: Any, version: int) -> dict[str, Any]:
        if version >= 3:
            return {"error_code": 0, "members": [{"member_id": m.member_id, "group_instance_id": m.group_instance_id,
                                                  "error_code": 0} for m in req.members]}
        return {"error_code": 0}

    async def _api_8(self, req: Any, version: int) -> dict[str, Any]:
        topics = []
        for t in req.topics:
            parts = []
            for p in t.partitions:
                self._offsets[(req.group_id, t.name, p.partition_index)] = p.committed_offset
                parts.append({"partition_index": p.partition_index, "error_code": 0})
            topics.append({"name": t.name, "partitions": parts})
        return {"topics": topics}

    def _committed(self, group: str, topics: Any) -> list[dict[str, Any]]:
        if topics is None:
            names: dict[str, list[int]] = {}
            for (g, t, p) in self._offsets:
                if g == group:
                    names.setdefault(t, []).append(p)
            pairs = list(names.items())
        else:
            pairs = [(t.name, list(t.partition_indexes)) for t in topics]
        return [{"name": name, "partitions": [
            {"partition_index": p, "committed_offset": self._offsets.get((group, name, p), -1),
             "committed_leader_epoch": -1, "metadata": "", "error_code": 0} for p in parts]}
            for name, parts in pairs]

    async def _api_9(self, req: Any, version: int) -> dict[str, Any]:
        if version >= 8:
            return {"groups": [{"group_id": g.group_id, "topics": self._committed(g.group_id, g.topics), "error_code": 0}
                               for g in req.groups]}
        return {"topics": self._committed(req.group_id, req.topics), "error_code": 0}

    async def _api_22(self, req: Any, version: int) -> dict[str, Any]:
        return {"error_code": 0, "producer_id": next(self._producer_ids), "producer_epoch": 0}

    async def _api_23(self, req: Any, version: int) -> dict[str, Any]:
        topics = []
        for t in req.topics:
            topic = self.topics.get(t.topic)
            parts = []
            for p in t.partitions:
                end = topic.partitions[p.partition].next_offset if topic and p.partition < len(topic.partitions) else -1
                parts.append({"error_code": 0 if end >= 0 else _UNKNOWN_TOPIC, "partition": p.partition,
                              "leader_epoch": 0, "end_offset": end})
            topics.append({"topic": t.topic, "partitions": parts})
        return {"topics": topics}

    # --- admin APIs --------------------------------------------------------------------------------

    async def _api_19(self, req: Any, version: int) -> dict[str, Any]:
        results = []
        for t in req.topics:
            exists = t.name in self.topics
            topic = self.create_topic(t.name, t.num_partitions if t.num_partitions > 0 else None)
            results.append({"name": t.name, "topic_id": topic.topic_id, "error_code": 36 if exists else 0,
                            "num_partitions": len(topic.partitions), "replication_factor": 1, "configs": []})
        return {"topics": results}

    def _topic_name(self, topic_id: Any) -> str | None:
        topic = self._topic_by(None, topic_id)
        return topic.name if topic is not None else None

    async def _api_20(self, req: Any, version: int) -> dict[str, Any]:
        names = list(req.topic_names) if version < 6 else [t.name or self._topic_name(t.topic_id) for t in req.topics]
        results = []
        for name in names:
            topic = self.topics.pop(name, None) if name else None
            results.append({"name": name, "topic_id": topic.topic_id if topic else None,
                            "error_code": 0 if topic else _UNKNOWN_TOPIC})
        return {"responses": results}

    async def _api_21(self, req: Any, version: int) -> dict[str, Any]:
        topics = []
        for t in req.topics:
            topic = self.topics.get(t.name)
            parts = []
            for p in t.partitions:
                ok = topic is not None and 0 <= p.partition_index < len(topic.partitions)
                parts.append({"partition_index": p.partition_index, "low_watermark": p.offset if ok else -1,
                              "error_code": 0 if ok else _UNKNOWN_TOPIC})
            topics.append({"name": t.name, "partitions": parts})
        return {"topics": topics}

    async def _api_32(self, req: Any, version: int) -> dict[str, Any]:
        return {"results": [{"error_code": 0, "error_message": None, "resource_type": r.resource_type,
                             "resource_name": r.resource_name, "configs": []} for r in req.resources]}

    async def _api_37(self, req: Any, version: int) -> dict[str, Any]:
        results = []
        for t in req.topics:
            topic = self.topics.get(t.name)
            if topic is not None:
                with self._lock:
                    topic.partitions.extend(_Partition() for _ in range(max(0, t.count - len(topic.partitions))))
            results.append({"name": t.name, "error_code": 0 if topic else _UNKNOWN_TOPIC, "error_message": None})
        return {"results": results}

    # --- transactions (accepted; no markers) -------------------------------------------------------

    async def _api_24(self, req: Any, version: int) -> dict[str, Any]:
        return {"results_by_topic_v3_and_below": [
            {"name": t.name, "results_by_partition": [{"partition_index": p, "partition_error_code": 0}
                                                      for p in t.partitions]} for t in req.v3_and_below_topics]}

    async def _api_25(self, req: Any, version: int) -> dict[str, Any]:
        return {"error_code": 0}

    async def _api_26(self, req: Any, version: int) -> dict[str, Any]:
        return {"error_code": 0}

    async def _api_28(self, req: Any, version: int) -> dict[str, Any]:
        topics = []
        for t in req.topics:
            for p in t.partitions:
                self._offsets[(req.group_id, t.name, p.partition_index)] = p.committed_offset
            topics.append({"name": t.name, "partitions": [{"partition_index": p.partition_index, "error_code": 0}
                                                          for p in t.partitions]})
        return {"topics": topics}
