"""Kafka request parsing throughput: our schema-compiled topic reader against kafka-python's full decode.

Usage: .venv/bin/python bench/parsers/kafka.py   (or through bench/parsers_bench.py)
Rows: Produce (v9, one 16 KiB batch; and v9, 10 partitions of 200 bytes), Fetch (v12, 8 partitions),
Metadata (v12, 3 topics), a 100-request stream through KafkaRequestParser, and a refusal build.
Each: messages/s, MB/s, microseconds per message, best of 5 runs; `x_ref` is the speed-up over
kafka-python's `Request.decode` of the same bytes (measured in the same run).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, this file's folder is sys.path[0] and its name would shadow the kafka package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parents[1]))

from membrane.parsers.events import Reason  # noqa: E402
from membrane.parsers.kafka import KafkaRequestParser, message_classes, parse_request, refusal  # noqa: E402


def _frame(msg: Any) -> bytes:
    msg.with_header(correlation_id=1, client_id="bench-client")
    return bytes(msg.encode(header=True, framed=True))


def _requests() -> list[tuple[str, bytes, int]]:
    req, _ = message_classes()
    P, F, M = req[0], req[1], req[3]
    T, PD = P.TopicProduceData, P.TopicProduceData.PartitionProduceData
    big = _frame(P(version=9, transactional_id=None, acks=-1, timeout_ms=30000, topic_data=[
        T(version=9, name="orders", partition_data=[PD(version=9, index=0, records=b"r" * 16384)])]))
    many = _frame(P(version=9, transactional_id=None, acks=-1, timeout_ms=30000, topic_data=[
        T(version=9, name="orders", partition_data=[PD(version=9, index=i, records=b"r" * 200) for i in range(10)])]))
    FT, FP = F.FetchTopic, F.FetchTopic.FetchPartition
    fetch = _frame(F(version=12, replica_id=-1, max_wait_ms=500, min_bytes=1, max_bytes=52428800, isolation_level=0,
                     session_id=0, session_epoch=-1, topics=[FT(version=12, topic="orders", partitions=[
                         FP(version=12, partition=i, current_leader_epoch=-1, fetch_offset=1000, last_fetched_epoch=-1,
                            log_start_offset=-1, partition_max_bytes=1048576) for i in range(8)])],
                     forgotten_topics_data=[], rack_id=""))
    meta = _frame(M(version=12, topics=[M.MetadataRequestTopic(version=12, topic_id=None, name=n)
                                        for n in ("orders", "payments", "audit.log")],
                    allow_auto_topic_creation=True, include_topic_authorized_operations=False))
    return [("Produce v9, 1 x 16 KiB batch", big, 0), ("Produce v9, 10 partitions x 200 B", many, 0),
            ("Fetch v12, 8 partitions", fetch, 1), ("Metadata v12, 3 topics", meta, 3)]


def _rate(fn: Callable[[], object], size: int, n: int, repeat: int = 5) -> dict[str, float]:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - start)
    per_s = n / best
    return {"msg_per_s": per_s, "MB_per_s": per_s * size / 1e6, "us_per_msg": best / n * 1e6}


def run() -> list[dict[str, object]]:
    classes, _ = message_classes()
    rows: list[dict[str, object]] = []
    for name, frame, api_key in _requests():
        cls = classes[api_key]
        version = parse_request(frame).api_version
        ours = _rate(lambda f=frame: parse_request(f), len(frame), 20000)  # type: ignore[misc]
        ref = _rate(lambda f=frame, c=cls, v=version: c.decode(f, version=v, header=True, framed=True),  # type: ignore[misc]
                    len(frame), 5000)
        rows.append({"name": f"{name}: parse_request", **ours, "x_ref": ours["msg_per_s"] / ref["msg_per_s"]})
        rows.append({"name": f"{name}: kafka-python decode", **ref, "x_ref": 1.0})
    stream = b"".join(f for _, f, _ in _requests()) * 25
    feed = _rate(lambda: KafkaRequestParser().feed(stream), len(stream), 100)
    rows.append({"name": "stream of 100 mixed requests: KafkaRequestParser.feed", "msg_per_s": feed["msg_per_s"] * 100,
                 "MB_per_s": feed["MB_per_s"], "us_per_msg": feed["us_per_msg"] / 100})
    produce = parse_request(_requests()[1][1])
    refused = _rate(lambda: refusal(produce, Reason.POLICY_DENIED), produce.size, 2000)
    rows.append({"name": "refusal of Produce v9, 10 partitions: refusal", **refused})
    return rows


def main() -> int:
    for row in run():
        cells = " ".join(f"{k}={v:,.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "name")
        print(f"{row['name']:56s} {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
