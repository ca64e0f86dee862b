"""parsers/hpack.py, the lean HPACK (issue 11 item 4), checked against RFC 7541's examples and the hpack library.

Case table
| input | expected |
|---|---|
| RFC 7541 C.3.1 / C.4.1 request blocks | the same header list, with and without Huffman coding |
| any header lists through hpack.Encoder (Huffman on/off, table resizes) | our Decoder gives them back |
| our Encoder's blocks | hpack.Decoder gives the lists back, repeated fields shrink to indexes |
| bad Huffman (EOS, long padding, non-1 padding), index 0, index past the tables, truncation | HpackError |
| size update above the allowed size, or after a field | HpackError |
| a header list over max_header_list_size | HpackTooLarge |
"""

from __future__ import annotations

import hpack as reference
import pytest
from hypothesis import given
from hypothesis import strategies as st
from membrane.parsers.hpack import Decoder, Encoder, HpackError, HpackTooLarge, huffman_decode, huffman_encode

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")]
_names = st.sampled_from([b":path", b"content-type", b"x-a", b"authorization", b"cookie", b"user-agent"])
_fields = st.lists(st.tuples(_names, st.binary(max_size=40)), min_size=1, max_size=6)


@pytest.mark.parametrize("block", [
    bytes.fromhex("828684410f7777772e6578616d706c652e636f6d"),  # C.3.1
    bytes.fromhex("828684418cf1e3c2e5f23a6ba0ab90f4ff"),  # C.4.1 (Huffman)
])
def test_rfc_7541_request_examples(block: bytes) -> None:
    """The first request of RFC 7541 Appendix C.3 and C.4 decodes, and indexes :authority (§6.2.1)."""
    decoder = Decoder()
    assert decoder.decode(block) == REQUEST
    assert decoder.decode(b"\xbe") == [(b":authority", b"www.example.com")]  # dynamic index 62


@given(st.binary(max_size=300))
def test_huffman_matches_the_reference(data: bytes) -> None:
    """The table-driven decoder inverts the reference encoder, and our encoder matches it bit for bit (RFC 7541 §5.2)."""
    coded = reference.huffman.HuffmanEncoder(reference.huffman_constants.REQUEST_CODES,
                                             reference.huffman_constants.REQUEST_CODES_LENGTH).encode(data)
    assert huffman_encode(data) == coded
    assert huffman_decode(coded) == data


@given(st.lists(_fields, min_size=1, max_size=8), st.booleans(), st.sampled_from([0, 64, 4096]))
def test_decoder_follows_the_reference_encoder(blocks: list[list[tuple[bytes, bytes]]], huffman: bool,
                                               table_size: int) -> None:
    """Blocks from hpack.Encoder (literals, indexes, table size updates) decode to the same lists (RFC 7541 §6)."""
    encoder, decoder = reference.Encoder(), Decoder()
    for i, fields in enumerate(blocks):
        if i == 1:
            encoder.header_table_size = table_size
        assert decoder.decode(encoder.encode(fields, huffman=huffman)) == fields


@given(st.lists(_fields, min_size=1, max_size=8), st.sampled_from([0, 100, 4096]))
def test_encoder_output_decodes_with_the_reference(blocks: list[list[tuple[bytes, bytes]]], table_size: int) -> None:
    """Our Encoder's blocks (with a table size change) decode with hpack.Decoder (RFC 7541 §4.2, §6.3)."""
    encoder, decoder = Encoder(), reference.Decoder()
    for i, fields in enumerate(blocks):
        if i == 1:
            encoder.header_table_size = table_size
        assert [(bytes(n), bytes(v)) for n, v in decoder.decode(encoder.encode(fields), raw=True)] == fields


def test_repeated_fields_become_indexes() -> None:
    """A repeated response head costs one byte per field once indexed (RFC 7541 §6.1)."""
    encoder = Encoder()
    head = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"x-id", b"abc")]
    first = encoder.encode(head)
    assert len(encoder.encode(head)) == 3 < len(first)


def test_authorization_is_never_indexed() -> None:
    """Credentials go out as never-indexed literals (RFC 7541 §7.1.3)."""
    block = Encoder().encode([(b"authorization", b"Bearer x")])
    assert block[0] & 0xF0 == 0x10


@pytest.mark.parametrize("block", [
    b"\x80",  # index 0
    b"\xff\x00",  # index 127 + 0: past the tables
    b"\x41\x85\xff\xff\xff\xff\xff",  # Huffman value that decodes EOS
    b"\x41\x81\x00",  # Huffman padding of zeros
    b"\x41\x05ab",  # literal shorter than its length
    b"\x41",  # value missing
    b"\xff\xff\xff\xff\xff\xff\xff\x7f",  # integer too large
    b"\x3f\xe1\x3f",  # size update to 8192 > 4096
    b"\x82\x20",  # size update after a field
])
def test_undecodable_blocks_raise(block: bytes) -> None:
    """Every way a block can be undecodable is an HpackError, never another exception (RFC 7541 §4.2, §5, §6)."""
    with pytest.raises(HpackError):
        Decoder().decode(block)


def test_header_list_over_the_limit() -> None:
    """The decoded list is bounded by max_header_list_size, counted as RFC 7541 §4.1 sizes (RFC 9113 §6.5.2)."""
    decoder = Decoder(max_header_list_size=100)
    with pytest.raises(HpackTooLarge):
        decoder.decode(Encoder().encode([(b"x-big", b"v" * 80)]))


@given(st.lists(_fields, min_size=1, max_size=3), st.lists(st.tuples(st.integers(0, 2), st.sampled_from([None, 0, 64, 4096])),
                                                           min_size=1, max_size=12))
def test_repeated_heads_round_trip(pool: list[list[tuple[bytes, bytes]]], picks: list[tuple[int, int | None]]) -> None:
    """Heads repeated in any order, with table size changes between them, survive our Encoder and Decoder (and
    decode the same with hpack.Decoder): their reuse of the last block (Encoder) and of the last list (Decoder)
    holds only while the table is unchanged (RFC 7541 §2.3, §4.2)."""
    encoder, decoder, ours = Encoder(), reference.Decoder(), Decoder()
    for index, table_size in picks:
        if table_size is not None:
            encoder.header_table_size = table_size
        fields = pool[index % len(pool)]
        block = encoder.encode(list(fields))
        assert [(bytes(n), bytes(v)) for n, v in decoder.decode(block, raw=True)] == fields
        assert ours.decode(block) == fields


def test_a_repeated_block_follows_the_dynamic_table() -> None:
    """The same bytes decode to what the table holds now: a block of table references is reused only while
    nothing was added or evicted since, and re-checked against a lowered header-list limit (RFC 7541 §2.3.3)."""
    decoder = Decoder()
    decoder.decode(b"\x40\x01x\x011")  # literal with indexing: x: 1 becomes index 62
    assert decoder.decode(b"\xbe") == [(b"x", b"1")]
    assert decoder.decode(b"\xbe") == [(b"x", b"1")]
    decoder.decode(b"\x40\x01y\x012")  # y: 2 is now index 62, x: 1 index 63
    assert decoder.decode(b"\xbe") == [(b"y", b"2")]
    decoder.max_header_list_size = 10
    with pytest.raises(HpackTooLarge):
        decoder.decode(b"\xbe")
