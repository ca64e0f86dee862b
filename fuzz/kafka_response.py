# Invariant: for any byte stream and any list of outstanding requests, KafkaResponseParser.feed()
# returns KafkaResponse events or raises a ParseError, never anything else; whole, byte-by-byte and
# sized feeding agree (events, those before an error in its `events_before`, and error class/offset); the responses' correlation ids are a prefix
# of the outstanding requests' in order; it never buffers more than max_frame_bytes + 4 bytes.
"""Fuzz target: Kafka response framing and correlation, parsers/kafka.py."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports():
        from membrane.parsers import kafka
        from membrane.parsers.errors import ParseError
        from membrane.parsers.events import KafkaRequest
else:
    from membrane.parsers import kafka
    from membrane.parsers.errors import ParseError
    from membrane.parsers.events import KafkaRequest


def _run(limit: int, outstanding: list[KafkaRequest], chunks: list[bytes]) -> tuple[list[object], object]:
    parser = kafka.KafkaResponseParser(max_frame_bytes=limit)
    for request in outstanding:
        parser.expect(request)
    events: list[object] = []
    error: object = None
    try:
        for chunk in chunks:
            events.extend(parser.feed(chunk))
            assert parser.pending == len(outstanding) - len(events)
    except ParseError as e:
        events.extend(e.events_before)  # the messages before the bad bytes are never lost
        error = (type(e), e.offset)
    return events, error


def check(data: bytes) -> None:
    if len(data) < 3:
        return
    limit = kafka.DEFAULT_MAX_FRAME_BYTES if data[0] >= 0x80 else 8 + data[0] * 8
    size = data[1] % 17 + 1
    count = data[2] % 8
    ids = data[3 : 3 + 4 * count]
    count = len(ids) // 4
    stream = data[3 + 4 * count :]
    outstanding = [KafkaRequest(api_key=i % 4, api_version=i, correlation_id=struct.unpack_from(">i", ids, 4 * i)[0],
                                client_id=None) for i in range(count)]
    whole = _run(limit, outstanding, [stream])
    bytewise = _run(limit, outstanding, [stream[i : i + 1] for i in range(len(stream))])
    sized = _run(limit, outstanding, [stream[i : i + size] for i in range(0, len(stream), size)])
    for other in (bytewise, sized):
        assert other == whole, (whole, other)  # events before an error included: no chunking loses any
    got = [e.correlation_id for e in bytewise[0]]  # type: ignore[attr-defined]
    assert got == [r.correlation_id for r in outstanding][: len(got)]


def TestOneInput(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
