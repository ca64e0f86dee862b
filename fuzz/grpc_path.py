# Invariant: for any text, grpc.split_path returns (service, method) such that "/" + service + "/" +
# method == path, or raises MalformedMessage; is_grpc_content_type never raises; percent_encode_message
# yields only 0x20-0x7E and no bare '%', and percent_decode_message inverts it for any text.
"""Fuzz target for parsers/grpc.py path splitting, content types and grpc-message encoding."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from membrane.parsers.errors import MalformedMessage
    from membrane.parsers.grpc import is_grpc_content_type, percent_decode_message, percent_encode_message, split_path


def check(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        service, method = split_path(text)
    except MalformedMessage:
        pass
    else:
        assert f"/{service}/{method}" == text, (service, method, text)
        assert service
        assert method
        assert "/" not in service + method
    is_grpc_content_type(text)
    encoded = percent_encode_message(text)
    assert all(0x20 <= ord(c) <= 0x7E for c in encoded), encoded
    assert percent_decode_message(encoded) == text, (text, encoded)
    percent_decode_message(text)


def TestOneInput(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
