# Invariant: for any byte stream, KafkaRequestParser.feed() returns KafkaRequest events or raises a
# ParseError, never anything else; fed whole, byte by byte, or in chunks of a size taken from the input,
# it yields the same events and fails with the same error class at the same stream offset; it never
# buffers more than max_frame_bytes + 4 bytes; the events' raw frames, joined, are a prefix of the
# stream; refusal() of every event returns bytes (a well-framed response), b"" or None, never raises;
# the generated body reader and the closure reference (parsers/_kafka_schema.py) agree on the first frame.
"""Fuzz target: Kafka request framing, headers and topic reading, parsers/kafka.py."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports():
        from membrane.parsers import _kafka_schema as schema
        from membrane.parsers import kafka
        from membrane.parsers.errors import ParseError
        from membrane.parsers.events import Reason
else:
    from membrane.parsers import _kafka_schema as schema
    from membrane.parsers import kafka
    from membrane.parsers.errors import ParseError
    from membrane.parsers.events import Reason


def _walk(make: object, frame: bytes) -> tuple[object, ...]:
    api_key, version = struct.unpack_from(">hh", frame, 4)
    reader = make(api_key, version)  # type: ignore[operator]
    if reader is None:
        return ("no reader",)
    pos = 14 + max(0, struct.unpack_from(">h", frame, 12)[0])
    found = schema.Found()
    try:
        if schema.api_schemas()[api_key].is_flexible(version):
            pos = schema.skip_tagged(frame, pos)
        end = reader(frame, pos, found)
    except (schema.SchemaError, IndexError, struct.error, ValueError):
        return ("error",)
    return end, found.topics, found.topic_ids, found.acks


def _differential(stream: bytes) -> None:
    if len(stream) < 14:
        return
    size = struct.unpack_from(">i", stream)[0]
    if size < 10 or size > len(stream) - 4:
        return
    frame = stream[: 4 + size]
    if struct.unpack_from(">h", frame, 4)[0] < 0:
        return
    assert _walk(schema.request_reader, frame) == _walk(schema.reference_reader, frame)


def _run(limit: int, chunks: list[bytes]) -> tuple[list[object], object]:
    parser = kafka.KafkaRequestParser(max_frame_bytes=limit)
    events: list[object] = []
    error: object = None
    try:
        for chunk in chunks:
            events.extend(parser.feed(chunk))
            assert parser.buffered_bytes <= limit + 4
    except ParseError as e:
        error = (type(e), e.offset)
    return events, error


def check(data: bytes) -> None:
    if len(data) < 2:
        return
    config, stream = data[:2], data[2:]
    limit = kafka.DEFAULT_MAX_FRAME_BYTES if config[0] >= 0x80 else 8 + config[0] * 8
    size = config[1] % 17 + 1
    whole = _run(limit, [stream])
    bytewise = _run(limit, [stream[i : i + 1] for i in range(len(stream))])
    sized = _run(limit, [stream[i : i + size] for i in range(0, len(stream), size)])
    for other in (bytewise, sized):
        if whole[1] is None:
            assert other == whole, (whole, other)
        else:
            # A failing feed() drops the events of its own call, so compare errors and the event prefix.
            assert other[1] == whole[1], (whole[1], other[1])
            assert other[0][: len(whole[0])] == whole[0]
    _differential(stream)
    events = bytewise[0]
    assert stream.startswith(b"".join(e.raw for e in events))  # type: ignore[attr-defined]
    for event in events[:4]:
        refusal = kafka.refusal(event, Reason.POLICY_DENIED)  # type: ignore[arg-type]
        if refusal:
            assert struct.unpack_from(">i", refusal)[0] == len(refusal) - 4
            assert struct.unpack_from(">i", refusal, 4)[0] == event.correlation_id  # type: ignore[attr-defined]


def TestOneInput(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
