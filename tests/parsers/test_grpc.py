"""parsers/grpc: content types, :path splitting, grpc-message encoding, status mapping and message framing (grpc PROTOCOL-HTTP2.md).

| input                          | expected                                   |
|--------------------------------|--------------------------------------------|
| application/grpc[+proto|+json] | gRPC                                       |
| application/grpc-web, json     | not gRPC                                   |
| /pkg.Svc/Method                | ("pkg.Svc", "Method")                      |
| /pkg.Svc, /a/b/c, ?query, %2E  | MalformedMessage                           |
| 5-byte prefix + payload        | GrpcMessage(compressed, length), any split |
| flag 2, over limit, cut short  | MalformedMessage / MessageTooLarge         |
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from membrane.parsers.errors import MalformedMessage, MessageTooLarge, ParseError
from membrane.parsers.events import Direction, Reason
from membrane.parsers.grpc import (
    GrpcMessage,
    GrpcParser,
    GrpcStatus,
    grpc_status,
    is_grpc_content_type,
    percent_decode_message,
    percent_encode_message,
    split_path,
    status_trailers,
)

from tests.helpers.feed import all_chunkings, feed_all
from tests.helpers.frames import grpc_message


@pytest.mark.parametrize(("value", "expected"), [
    ("application/grpc", True), ("application/grpc+proto", True), ("application/grpc+json", True),
    ("APPLICATION/GRPC+PROTO", True), ("application/grpc; charset=utf-8", True), ("application/grpc+thrift", True),
    ("application/grpc-web", False), ("application/grpc-web+proto", False), ("application/json", False),
    ("application/grpc+", False), ("application/grpcx", False), ("", False), (None, False),
])
def test_content_types(value: str | None, expected: bool) -> None:
    """Content-Type "application/grpc" [("+proto" / "+json" / {custom})] marks a gRPC call (PROTOCOL-HTTP2.md, Requests)."""
    assert is_grpc_content_type(value) is expected


@pytest.mark.parametrize(("path", "expected"), [
    ("/demo.Greeter/SayHello", ("demo.Greeter", "SayHello")),
    ("/grpc.health.v1.Health/Check", ("grpc.health.v1.Health", "Check")),
    ("/Greeter/Say_Hello2", ("Greeter", "Say_Hello2")),
])
def test_path_splits_into_service_and_method(path: str, expected: tuple[str, str]) -> None:
    """:path is "/" Service-Name "/" {method name} (PROTOCOL-HTTP2.md, Path)."""
    assert split_path(path) == expected


@pytest.mark.parametrize("path", [
    "", "/", "//", "/pkg.Svc", "/pkg.Svc/", "//Method", "/pkg.Svc/a/b", "pkg.Svc/Method", "/pkg.Svc/Method?x=1",
    "/pkg..Svc/M", "/.pkg/M", "/pkg.Svc/M%2E", "/pkg.Svc/M ", "/pkg.Svc/Mé", "/1pkg.Svc/M", "/pkg.Svc/Method/",
])
def test_malformed_paths_are_refused(path: str) -> None:
    """Anything but /package.Service/Method made of identifiers is malformed, reported with its direction."""
    with pytest.raises(MalformedMessage) as info:
        split_path(path, direction=Direction.CLIENT_TO_SERVER)
    assert info.value.reason is Reason.MALFORMED
    assert info.value.direction is Direction.CLIENT_TO_SERVER


@pytest.mark.parametrize(("text", "encoded"), [
    ("Access denied", "Access denied"),
    ("100% sure", "100%25 sure"),
    ("café", "caf%C3%A9"),
    ("line\nbreak", "line%0Abreak"),
    ("~!\"#$&'()*+,-./:;<=>?@[\\]^_`{|}", "~!\"#$&'()*+,-./:;<=>?@[\\]^_`{|}"),
])
def test_grpc_message_percent_encoding(text: str, encoded: str) -> None:
    """grpc-message keeps 0x20-0x7E except '%' and percent-encodes every other UTF-8 byte (PROTOCOL-HTTP2.md, Responses)."""
    assert percent_encode_message(text) == encoded
    assert percent_decode_message(encoded) == text


@given(st.text())
def test_grpc_message_encoding_round_trips(text: str) -> None:
    """For any text, decode(encode(text)) == text and the encoding is printable ASCII (PROTOCOL-HTTP2.md)."""
    encoded = percent_encode_message(text)
    assert all(0x20 <= ord(c) <= 0x7E for c in encoded)
    assert percent_decode_message(encoded) == text


def test_malformed_percent_escapes_are_kept() -> None:
    """A receiver keeps invalid escapes verbatim instead of failing (PROTOCOL-HTTP2.md: "decode ... leniently")."""
    assert percent_decode_message("50%zz off %4") == "50%zz off %4"


@pytest.mark.parametrize(("reason", "status"), [
    (Reason.POLICY_DENIED, GrpcStatus.PERMISSION_DENIED), (Reason.MALFORMED, GrpcStatus.INTERNAL),
    (Reason.TOO_LARGE, GrpcStatus.RESOURCE_EXHAUSTED), (Reason.UPSTREAM_FAILED, GrpcStatus.UNAVAILABLE),
    (Reason.UPSTREAM_TIMEOUT, GrpcStatus.DEADLINE_EXCEEDED),
])
def test_every_reason_maps_to_a_grpc_status(reason: Reason, status: GrpcStatus) -> None:
    """Each Reason has one grpc-status (module docstring; doc/statuscodes.md numbers)."""
    assert grpc_status(reason) is status
    assert {r for r in Reason} == {Reason.POLICY_DENIED, Reason.MALFORMED, Reason.TOO_LARGE,
                                   Reason.UPSTREAM_FAILED, Reason.UPSTREAM_TIMEOUT}


def test_status_trailers() -> None:
    """A denied call is a trailers-only response: :status 200, application/grpc, grpc-status 7 (PROTOCOL-HTTP2.md, Trailers-Only)."""
    assert status_trailers(Reason.POLICY_DENIED) == (
        (":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "7"),
        ("grpc-message", "Access denied"))
    assert status_trailers(Reason.TOO_LARGE, "größe 100%")[3] == ("grpc-message", "gr%C3%B6%C3%9Fe 100%25")


_STREAM = grpc_message(b"hello") + grpc_message(b"") + grpc_message(b"\x1f\x8b" + b"z" * 300, compressed=True)
_EXPECTED = [GrpcMessage(compressed=False, length=5), GrpcMessage(compressed=False, length=0),
             GrpcMessage(compressed=True, length=302)]


@pytest.mark.parametrize("chunks", all_chunkings(_STREAM))
def test_framing_survives_any_chunking(chunks: list[bytes]) -> None:
    """Length-Prefixed-Messages split at any byte boundary are read the same (PROTOCOL-HTTP2.md, Length-Prefixed-Message)."""
    reader = GrpcParser()
    assert feed_all(reader.feed, chunks) == _EXPECTED
    reader.end()
    assert (reader.messages, reader.payload_bytes) == (3, 307)


@given(st.lists(st.tuples(st.binary(max_size=300), st.booleans()), max_size=8), st.lists(st.integers(1, 50)))
def test_framing_property_arbitrary_splits(messages: list[tuple[bytes, bool]], cuts: list[int]) -> None:
    """Any messages, cut into any chunk sizes, come back as their (compressed, length) in order."""
    stream = b"".join(grpc_message(p, compressed=c) for p, c in messages)
    chunks, pos = [], 0
    for cut in cuts:
        chunks.append(stream[pos : pos + cut])
        pos += cut
    chunks.append(stream[pos:])
    reader = GrpcParser()
    assert feed_all(reader.feed, chunks) == [GrpcMessage(compressed=c, length=len(p)) for p, c in messages]
    reader.end()


def test_message_over_the_limit_is_too_large() -> None:
    """A declared length beyond max_message_bytes raises MessageTooLarge before any payload is read (grpc's 4 MiB default)."""
    reader = GrpcParser(max_message_bytes=100)
    assert reader.feed(grpc_message(b"x" * 100)) == [GrpcMessage(compressed=False, length=100)]
    with pytest.raises(MessageTooLarge) as info:
        reader.feed(b"\x00\x00\x00\x00\x65")
    assert info.value.reason is Reason.TOO_LARGE
    assert info.value.offset == 105
    with pytest.raises(ParseError):  # the reader stays failed
        reader.feed(b"")


def test_bad_compressed_flag_is_malformed() -> None:
    """The Compressed-Flag is 0 or 1; anything else means the stream is not gRPC-framed."""
    with pytest.raises(MalformedMessage):
        GrpcParser().feed(b"\x02\x00\x00\x00\x00")


@pytest.mark.parametrize("tail", [b"\x00\x00", grpc_message(b"abc")[:-1]])
def test_stream_ending_inside_a_message_is_malformed(tail: bytes) -> None:
    """END_STREAM in the middle of a prefix or payload is a truncated message (PROTOCOL-HTTP2.md)."""
    reader = GrpcParser()
    reader.feed(grpc_message(b"ok") + tail)
    with pytest.raises(MalformedMessage):
        reader.end()
