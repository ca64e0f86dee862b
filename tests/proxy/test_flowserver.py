"""proxy/flowserver.py on a real unix socket: snapshot + follow, server-side filters, a slow follower loses records
(reported as Hubble's lost_events, never unbounded memory), bad requests refused, publishers' records ingested."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from membrane.proxy.flows import DROPPED, FORWARDED, REQUEST, Flow, FlowContext, FlowSink, Peer, l7_http
from membrane.proxy.flowserver import FlowPublisher, FlowServer

CTX = FlowContext(source=Peer(ip="10.244.1.20", port=40000, identity=1726, namespace="default", pod_name="backend"),
                  destination=Peer(ip="10.244.1.10", port=80, identity=9776, namespace="default", pod_name="frontend"))


def _flow(n: int, verdict: str = FORWARDED) -> Flow:
    return Flow(context=CTX, verdict=verdict, l7_type=REQUEST, summary=f"GET /{n}", time_ns=1_764_130_000_000_000_000 + n,
                l7=l7_http(method="GET", url=f"http://a/{n}", protocol="HTTP/1.1"))


async def _request(path: str, request: dict[str, object]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write((json.dumps(request) + "\n").encode())
    await writer.drain()
    return reader, writer


def test_snapshot_filters_and_follow(tmp_path: Path) -> None:
    """The ring's matching records (the last N), then, with follow, each new matching record as it is emitted."""

    async def main() -> None:
        sink = FlowSink(node_name="n1")
        for n in range(5):
            sink.emit(_flow(n, DROPPED if n % 2 else FORWARDED))
        server = FlowServer(sink, str(tmp_path / "s.sock"))
        await server.start()
        try:
            reader, writer = await _request(server.path, {"whitelist": [{"verdict": ["DROPPED"]}], "last": 1})
            lines = (await reader.read()).decode().splitlines()
            assert [json.loads(line)["flow"]["Summary"] for line in lines] == ["GET /3"]
            assert json.loads(lines[0])["node_name"] == "n1"
            writer.close()
            reader, writer = await _request(server.path, {"follow": True, "last": 0, "blacklist": [{"verdict": ["DROPPED"]}]})
            await asyncio.sleep(0.05)
            sink.emit(_flow(10, DROPPED))
            sink.emit(_flow(11))
            line = await asyncio.wait_for(reader.readline(), 5)
            assert json.loads(line)["flow"]["Summary"] == "GET /11"
            writer.close()
            await asyncio.sleep(0.05)
            assert not sink._listeners  # the follower that left is unsubscribed
        finally:
            await server.close()
        assert not (tmp_path / "s.sock").exists()

    asyncio.run(main())


def test_slow_follower_loses_records_and_is_told(tmp_path: Path) -> None:
    """A follower's queue is bounded: records beyond it are dropped and reported as Hubble's lost_events."""

    async def main() -> None:
        sink = FlowSink()
        server = FlowServer(sink, str(tmp_path / "s.sock"), max_queue=3)
        await server.start()
        try:
            reader, writer = await _request(server.path, {"follow": True, "last": 0})
            await asyncio.sleep(0.05)
            for n in range(10):  # all in one loop pass: the follower cannot drain in between
                sink.emit(_flow(n))
            lines = [json.loads(await asyncio.wait_for(reader.readline(), 5)) for _ in range(4)]
            assert [line["flow"]["Summary"] for line in lines[:3]] == ["GET /0", "GET /1", "GET /2"]
            assert lines[3] == {"lost_events": {"source": "HUBBLE_RING_BUFFER", "num_events_lost": "7"}}
            writer.close()
        finally:
            await server.close()

    asyncio.run(main())


def test_bad_requests_are_refused_with_a_reason(tmp_path: Path) -> None:
    """A request that is not a JSON object, or names an unknown filter field, gets {"error": ...} and is closed."""

    async def main() -> None:
        server = FlowServer(FlowSink(), str(tmp_path / "s.sock"))
        await server.start()
        try:
            for raw, expect in ((b"hello\n", "one JSON object"), (b'{"whitelist": [{"colour": ["red"]}]}\n', "colour")):
                reader, writer = await asyncio.open_unix_connection(server.path)
                writer.write(raw)
                answer = json.loads(await asyncio.wait_for(reader.read(), 5))
                assert expect in answer["error"]
                writer.close()
        finally:
            await server.close()

    asyncio.run(main())


def test_publisher_records_reach_followers_and_a_live_socket_is_not_stolen(tmp_path: Path) -> None:
    """Another process's FlowPublisher stream feeds the server's ring; a second server on the same live path fails."""

    async def main() -> None:
        sink = FlowSink(node_name="hub")
        server = FlowServer(sink, str(tmp_path / "s.sock"))
        await server.start()
        try:
            publisher = FlowPublisher(server.path, loop=asyncio.get_running_loop())
            other = FlowSink([publisher], node_name="worker-1")
            other.emit(_flow(1))
            for _ in range(100):
                if sink.records():
                    break
                await asyncio.sleep(0.01)
            assert [r.to_json()["Summary"] for r in sink.records()] == ["GET /1"]
            reader, writer = await _request(server.path, {})
            line = json.loads(await reader.readline())
            assert line["node_name"] == "worker-1"  # as the publisher wrote it
            writer.close()
            publisher.close()
            second = FlowServer(FlowSink(), server.path)
            try:
                await second.start()
            except OSError as e:
                assert "in use" in str(e)
            else:
                raise AssertionError("a second server took a live socket")
        finally:
            await server.close()
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(tmp_path / "s.sock"))  # a socket file nobody listens on: a crashed server's leftover
        stale.close()
        again = FlowServer(FlowSink(), str(tmp_path / "s.sock"))
        await again.start()
        await again.close()

    asyncio.run(main())
