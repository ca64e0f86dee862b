# Invariant: the lean frame layer (parsers.http2_wire) and h2, the reference, agree: the same bytes give
# the same events, or both raise ParseError. For each of them: for any bytes, Http2ServerSide (mode byte even: bytes after a client preface) and
# Http2ClientSide (mode byte odd: the upstream's bytes, after requests on streams 1-7) return events
# or raise ParseError, never anything else; feeding whole and in small pieces (byte by byte up to
# 256 bytes, then ~64 pieces) gives the same events (or both raise); driving the proxy API on the
# events (refuse, acknowledge, send_*) raises nothing but ParseError; outbound buffers stay bounded.
"""Differential fuzz target for parsers/http2.py (lean layer vs h2). `python fuzz/http2_frames.py [libFuzzer args]` fuzzes with atheris;
`python fuzz/http2_frames.py --capture DIR` re-captures the real-client seeds (httpx[http2] and grpcio
over loopback through tests' LoopbackBridge) into DIR."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from membrane.parsers.errors import ParseError
    from membrane.parsers.events import Data, EndOfMessage, GrpcCall, HttpRequest, HttpResponse, Reason, Trailers
    from membrane.parsers.http2 import Http2ClientSide, Http2ServerSide

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_REASONS = list(Reason)
_MAX_BUFFER = 16 * 1024 * 1024  # no outbound buffer may exceed what any window could have allowed


def _side(mode: int, lean: bool) -> Http2ServerSide | Http2ClientSide:
    if mode % 2 == 0:
        return Http2ServerSide(lean=lean)
    side = Http2ClientSide(lean=lean)
    for sid in (1, 3, 5, 7):
        side.send_request(HttpRequest(method="POST", target="/x", path="/x", host="a", stream_id=sid,
                                      http_version="2", has_body=sid != 7))
        side.send_data(sid, b"q" * 100 * sid)
    return side


def _observe(mode: int, chunks: list[bytes], lean: bool) -> tuple[list[object], bool]:
    side = _side(mode, lean)
    events: list[object] = []
    try:
        for chunk in chunks:
            events.extend(side.feed(chunk))
    except ParseError:
        return events, True
    return events, False


def _drive(mode: int, chunks: list[bytes], lean: bool) -> None:
    side = _side(mode, lean)
    count = 0
    try:
        for chunk in chunks:
            for event in side.feed(chunk):
                count += 1
                sid = getattr(event, "stream_id", None) or 0
                if isinstance(side, Http2ServerSide) and isinstance(event, HttpRequest | GrpcCall):
                    if count % 3 == 0:
                        side.refusal(sid, _REASONS[count % len(_REASONS)])
                    else:
                        side.send_response(HttpResponse(status=200, stream_id=sid, has_body=True, http_version="2"))
                        side.send_data(sid, b"r" * 40_000)
                elif isinstance(event, Data):
                    side.acknowledge(sid, len(event.data))
                    if count % 5 == 0:
                        side.reset_stream(sid)
                elif isinstance(event, Trailers | EndOfMessage) and isinstance(side, Http2ServerSide):
                    side.send_trailers(sid, (("grpc-status", "0"),))
                elif isinstance(event, HttpResponse) and count % 4 == 0 and isinstance(side, Http2ClientSide):
                    side.end_stream(sid)
            side.pop_delivered()
            side.data_to_send()
            assert side.buffered_bytes() <= _MAX_BUFFER
    except ParseError:
        side.data_to_send()


def check(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    wire = PREFACE + body if mode % 2 == 0 and not body.startswith(PREFACE[:4]) else body
    # Byte by byte where affordable; long inputs (real-client seeds) in ~64 pieces, since h2 re-parses
    # a partial frame on every call and the fuzzer's speed is what finds bugs.
    step = 1 if len(wire) <= 256 else max(7, len(wire) // 64)
    chunk = max((16, 97, 1000, 16_384)[(mode >> 1) % 4], len(wire) // 64)
    outcomes = []
    for lean in (True, False):
        whole, whole_failed = _observe(mode, [wire], lean)
        pieces, pieces_failed = _observe(mode, [wire[i : i + step] for i in range(0, len(wire), step)], lean)
        assert whole_failed == pieces_failed, (lean, whole_failed, pieces_failed)
        if not whole_failed:
            assert whole == pieces, (lean, whole, pieces)
        _drive(mode, [wire[i : i + chunk] for i in range(0, len(wire), chunk)], lean)
        outcomes.append((whole, whole_failed))
    assert outcomes[0] == outcomes[1], ("lean vs h2", outcomes[0], outcomes[1])


def _capture(directory: str) -> None:
    """Capture real clients' bytes through the tests' LoopbackBridge (loopback only) as seeds."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.parsers.test_http2 import capture_real_clients

    capture_real_clients(Path(directory))


def TestOneInput(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--capture":
        _capture(sys.argv[2])
    else:
        atheris.Setup(sys.argv, TestOneInput)
        atheris.Fuzz()
