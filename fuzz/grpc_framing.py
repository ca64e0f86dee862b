# Invariant: for any bytes, GrpcParser yields the same messages whether fed whole, byte by byte
# or in chunk sizes taken from the input; it raises only ParseError (MessageTooLarge past the limit);
# it never holds more than the 5-byte prefix; the messages it reports fit in the bytes it was given.
"""Fuzz target for parsers/grpc.py Length-Prefixed-Message framing."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from membrane.parsers.errors import MessageTooLarge, ParseError
    from membrane.parsers.grpc import GrpcParser

LIMIT = 4096


def _run(chunks: list[bytes]) -> tuple[list[object], str | None]:
    reader = GrpcParser(max_message_bytes=LIMIT)
    out: list[object] = []
    try:
        for chunk in chunks:
            out.extend(reader.feed(chunk))
            assert len(reader._prefix) < 5
        reader.end()
    except MessageTooLarge:
        return out, "too_large"
    except ParseError:
        return out, "error"
    return out, None


def check(data: bytes) -> None:
    if not data:
        return
    size = 1 + data[0] % 17
    body = data[1:]
    whole, whole_error = _run([body])
    ones, ones_error = _run([body[i : i + 1] for i in range(len(body))])
    sized, sized_error = _run([body[i : i + size] for i in range(0, len(body), size)])
    assert whole_error == ones_error == sized_error, (whole_error, ones_error, sized_error)
    # A failing feed() discards its own partial result, so compare only error-free runs in full.
    if whole_error is None:
        assert whole == ones == sized
        assert sum(5 + m.length for m in whole) == len(body)  # type: ignore[attr-defined]
    assert all(m.length <= LIMIT for m in ones)  # type: ignore[attr-defined]


def TestOneInput(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
