# Invariant: for any byte stream, DnsTcpParser.feed() - the parser DnsTcpSession runs - returns events
# (an UnreadableMessage for a framed message it cannot read) or raises a ParseError for a broken frame,
# never anything else; fed whole, byte by byte, or in chunks of a size taken from the input, it yields the
# same events in the same order and fails with the same error class at the same stream offset; it
# never buffers more than max_message_bytes + 2 bytes; every event's raw bytes are exactly the framed
# message, and frame_tcp() of those bytes rebuilds the consumed stream prefix.
"""Fuzz target: DNS over TCP (2-byte length framing, several messages per connection), parsers/dns.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports():
        from membrane.parsers import dns
        from membrane.parsers.errors import ParseError
        from membrane.parsers.events import Direction
else:
    from membrane.parsers import dns
    from membrane.parsers.errors import ParseError
    from membrane.parsers.events import Direction


def _run(direction: Direction, limit: int, chunks: list[bytes]) -> tuple[list[object], list[bytes], object]:
    parser = dns.DnsTcpParser(direction, max_message_bytes=limit)
    events: list[object] = []
    error: object = None
    try:
        for chunk in chunks:
            events.extend(parser.feed(chunk))
            assert parser.buffered_bytes <= limit + 2
        parser.end_of_stream()
    except ParseError as e:
        error = (type(e), e.offset)
    return events, [e.raw for e in events], error  # type: ignore[attr-defined]


def check(data: bytes) -> None:
    if len(data) < 2:
        return
    config, stream = data[:2], data[2:]
    direction = Direction.CLIENT_TO_SERVER if config[0] & 1 else Direction.SERVER_TO_CLIENT
    limit = 65535 if config[0] >= 0xF0 else 12 + (config[0] >> 1) * 4  # small limits reach MessageTooLarge
    size = config[1] % 17 + 1
    whole = _run(direction, limit, [stream])
    bytewise = _run(direction, limit, [stream[i : i + 1] for i in range(len(stream))])
    sized = _run(direction, limit, [stream[i : i + size] for i in range(0, len(stream), size)])
    for other in (bytewise, sized):
        if whole[2] is None:
            assert other == whole, (whole, other)
        else:
            # A failing feed() drops the events of its own call, so compare errors and the event prefix.
            assert other[2] == whole[2], (whole[2], other[2])
            assert other[0][: len(whole[0])] == whole[0]
    rebuilt = b"".join(dns.frame_tcp(raw) for raw in bytewise[1])
    assert stream.startswith(rebuilt)


def TestOneInput(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
