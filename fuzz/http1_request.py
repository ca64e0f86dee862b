# Invariant: for any bytes, Http1Parser(CLIENT_TO_SERVER).feed() returns events or raises ParseError,
# never another exception; whole-input, byte-at-a-time and split-in-two feeding give the same events (body
# Data merged) and the same raised/not-raised outcome; unparsed bytes held never exceed max_header_bytes
# (+ max_held_bytes while a switch is pending); every emitted target is a fixed point of normalize_target; and
# what forward() writes for the accepted events parses back to the same requests and bodies.
"""Fuzz target: HTTP/1.1 requests (parsers/http1.py, client-to-server direction)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports():
        from membrane.parsers.errors import ParseError
        from membrane.parsers.events import Data, HttpRequest
        from membrane.parsers.http1 import C2S, Http1Event, Http1Parser
        from membrane.parsers.http_target import normalize_target
else:
    from membrane.parsers.errors import ParseError
    from membrane.parsers.events import Data, HttpRequest
    from membrane.parsers.http1 import C2S, Http1Event, Http1Parser
    from membrane.parsers.http_target import normalize_target

MAX_HEADER_BYTES = 2048  # small, so that the fuzzer reaches the limit paths
MAX_HELD_BYTES = 512


def _merge(events: list[Http1Event]) -> list[Http1Event]:
    out: list[Http1Event] = []
    for event in events:
        if isinstance(event, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(data=out[-1].data + event.data)
        else:
            out.append(event)
    return out


def _run(chunks: list[bytes], small: bool = True) -> tuple[list[Http1Event], bool, Http1Parser]:
    if small:
        conn = Http1Parser(C2S, max_header_bytes=MAX_HEADER_BYTES, max_held_bytes=MAX_HELD_BYTES, max_line_bytes=1024)
    else:  # serialisation may add a space per field: re-parse with the defaults
        conn = Http1Parser(C2S)
    events: list[Http1Event] = []
    failed = False

    for chunk in chunks:
        try:
            events.extend(conn.feed(chunk))
        except ParseError:
            failed = True
            break
        assert len(conn._buf) <= MAX_HEADER_BYTES, len(conn._buf)
        assert len(conn._held) <= MAX_HELD_BYTES, len(conn._held)
    return _merge(events), failed, conn


def _same_outcome(whole: list[Http1Event], failed: bool, events: list[Http1Event], chunk_failed: bool) -> None:
    """Equal events and outcome; a ParseError drops the events of the call that raised, so when the input
    fails, the whole-input events are a prefix of the chunked ones (which failed too)."""
    assert chunk_failed == failed, (failed, whole, events)
    if not failed:
        assert events == whole, (events, whole)
    else:
        prefix = events[: len(whole)]
        if whole and isinstance(whole[-1], Data) and isinstance(prefix[-1], Data):
            assert prefix[-1].data.startswith(whole[-1].data)
            prefix, whole = prefix[:-1], whole[:-1]
        assert prefix == whole, (events, whole)


def check(data: bytes) -> None:
    whole, failed, conn = _run([data])
    for chunks in ([data[i : i + 1] for i in range(len(data))], [data[: len(data) // 2], data[len(data) // 2 :]]):
        events, chunk_failed, _ = _run(chunks)
        _same_outcome(whole, failed, events, chunk_failed)
    wire = b""
    for event in whole:
        if isinstance(event, HttpRequest) and event.method != "CONNECT":
            assert normalize_target(event.target) == event.target, event.target
        wire += conn.forward(event)
    if wire:
        again, again_failed, _ = _run([wire], small=False)
        assert not again_failed
        assert again == whole, (again, whole)


def TestOneInput(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
