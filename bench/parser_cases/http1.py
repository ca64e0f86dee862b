"""HTTP/1.1 parser throughput: our httptools-based Http1Parser against h11 on the same bytes.

Usage: .venv/bin/python bench/parsers/http1.py   (prints one row per measurement)
`run()` returns rows {name, messages/s, MB/s, us/message} for bench/parsers_bench.py (process CPU time,
best of 5 runs). Requests are ones
curl and httpx really send (GET, and POST with a JSON body), repeated; h11 has to answer each request
before it reads the next, so its rows include sending a minimal response, as a proxy built on it would.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import h11
import httptools
from membrane.parsers.events import HttpRequest, Reason
from membrane.parsers.http1 import C2S, Http1Parser

CURL_GET = b"GET /v1/pets?limit=10 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
HTTPX_POST = (
    b"POST /v1/pets HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\nUser-Agent: python-httpx/0.28.1\r\nContent-Length: 27\r\n"
    b"Content-Type: application/json\r\n\r\n"
    b'{"name":"rex","kind":"dog"}'
)
MIX = [CURL_GET, HTTPX_POST]
N = 10000
READ = 65536


def _chunks(messages: list[bytes], pipelined: bool) -> list[bytes]:
    if not pipelined:
        return messages
    blob = b"".join(messages)
    return [blob[i : i + READ] for i in range(0, len(blob), READ)]


def _ours(chunks: list[bytes], forward: bool) -> int:
    conn = Http1Parser(C2S)
    done = 0
    for chunk in chunks:
        for event in conn.feed(chunk):
            if type(event) is HttpRequest:
                done += 1
                if forward:
                    conn.forward(event)
                else:
                    conn.refusal(event, Reason.POLICY_DENIED)
    return done


def _h11(chunks: list[bytes]) -> int:
    conn = h11.Connection(h11.SERVER)
    done = 0
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                break
            if type(event) is h11.EndOfMessage:
                done += 1
                conn.send(h11.Response(status_code=204, headers=[]))
                conn.send(h11.EndOfMessage())
                conn.start_next_cycle()
    return done


class _Bare:
    """llhttp with the minimum of callbacks: the floor any httptools-based parser sits on."""

    def __init__(self) -> None:
        self.done = 0

    def on_url(self, url: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        pass

    def on_message_complete(self) -> None:
        self.done += 1


def _bare(chunks: list[bytes]) -> int:
    proto = _Bare()
    parser = httptools.HttpRequestParser(proto)
    for chunk in chunks:
        parser.feed_data(chunk)
    return proto.done


def _measure(name: str, fn: Callable[[list[bytes]], int], chunks: list[bytes], messages: int) -> dict[str, object]:
    size = sum(len(c) for c in chunks)
    best = float("inf")
    for _ in range(5):  # CPU time, best of 5: the machine is shared, wall time is not ours alone
        start = time.process_time()
        got = fn(chunks)
        best = min(best, time.process_time() - start)
        assert got == messages, (name, got, messages)
    return {
        "name": name,
        "messages/s": messages / best,
        "MB/s": size / best / 1e6,
        "us/message": best / messages * 1e6,
    }


def _chunked_upload(size: int, piece: int) -> bytes:
    body = b"".join(b"%x\r\n%b\r\n" % (piece, b"x" * piece) for _ in range(size // piece)) + b"0\r\n\r\n"
    return b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + body


def run() -> list[dict[str, object]]:
    messages = [MIX[i % 2] for i in range(N)]
    rows = []
    for pipelined in (False, True):
        how = "pipelined 64 KiB reads" if pipelined else "one request per read"
        chunks = _chunks(messages, pipelined)
        rows.append(_measure(f"http1 (httptools) feed+refuse, {how}", lambda c: _ours(c, False), chunks, N))
        rows.append(_measure(f"http1 (httptools) feed+forward, {how}", lambda c: _ours(c, True), chunks, N))
        rows.append(_measure(f"h11 next_event+reply, {how}", _h11, chunks, N))
        rows.append(_measure(f"bare llhttp callbacks (floor), {how}", _bare, chunks, N))
    upload = _chunked_upload(8 << 20, 16384)
    upload_chunks = [upload[i : i + READ] for i in range(0, len(upload), READ)]
    rows.append(
        _measure("http1 (httptools) 8 MiB chunked upload, 16 KiB chunks", lambda c: _ours(c, True), upload_chunks, 1)
    )
    rows.append(_measure("h11 8 MiB chunked upload, 16 KiB chunks", _h11, upload_chunks, 1))
    return rows


if __name__ == "__main__":
    for row in run():
        print(
            f"{row['name']:58s} {row['messages/s']:>12,.0f} msg/s {row['MB/s']:>9.1f} MB/s {row['us/message']:>9.2f} us/msg"
        )
