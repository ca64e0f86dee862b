"""HPACK (RFC 7541) for the lean HTTP/2 layer: integers, string literals, a table-driven Huffman decoder,
the static and dynamic tables, a decoder and an encoder. Pure functions over bytes; no I/O.

Raises only `HpackError` (undecodable input) and `HpackTooLarge` (a header list past the limit); the
HTTP/2 layer turns them into COMPRESSION_ERROR / ENHANCE_YOUR_CALM. The encoder never Huffman-codes
(RFC 7541 §5.2 lets it choose; raw literals cost no CPU here) and indexes repeated fields, so a
repeated request or response head shrinks to a few bytes of table references.
"""

from __future__ import annotations

__all__ = ["STATIC_TABLE", "Decoder", "Encoder", "HpackError", "HpackTooLarge", "huffman_decode", "huffman_encode"]


class HpackError(Exception):
    """The header block cannot be decoded (RFC 7541 §6, §5.2; a COMPRESSION_ERROR in HTTP/2)."""


class HpackTableSizeError(HpackError):
    """A dynamic table size update above the size we allowed (RFC 7541 §6.3)."""


class HpackTooLarge(HpackError):
    """The decoded header list exceeds the limit (SETTINGS_MAX_HEADER_LIST_SIZE, RFC 9113 §6.5.2)."""


# RFC 7541 Appendix B: (code, bit length) for symbols 0..255 and EOS (256).
_HUFFMAN_CODES: tuple[tuple[int, int], ...] = (
    (0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28), (0xfffffe4, 28), (0xfffffe5, 28),
    (0xfffffe6, 28), (0xfffffe7, 28), (0xfffffe8, 28), (0xffffea, 24), (0x3ffffffc, 30), (0xfffffe9, 28),
    (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28), (0xfffffec, 28), (0xfffffed, 28), (0xfffffee, 28),
    (0xfffffef, 28), (0xffffff0, 28), (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28),
    (0xffffff4, 28), (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28), (0xffffff8, 28), (0xffffff9, 28),
    (0xffffffa, 28), (0xffffffb, 28), (0x14, 6), (0x3f8, 10), (0x3f9, 10), (0xffa, 12), (0x1ff9, 13), (0x15, 6),
    (0xf8, 8), (0x7fa, 11), (0x3fa, 10), (0x3fb, 10), (0xf9, 8), (0x7fb, 11), (0xfa, 8), (0x16, 6), (0x17, 6),
    (0x18, 6), (0x0, 5), (0x1, 5), (0x2, 5), (0x19, 6), (0x1a, 6), (0x1b, 6), (0x1c, 6), (0x1d, 6), (0x1e, 6),
    (0x1f, 6), (0x5c, 7), (0xfb, 8), (0x7ffc, 15), (0x20, 6), (0xffb, 12), (0x3fc, 10), (0x1ffa, 13), (0x21, 6),
    (0x5d, 7), (0x5e, 7), (0x5f, 7), (0x60, 7), (0x61, 7), (0x62, 7), (0x63, 7), (0x64, 7), (0x65, 7), (0x66, 7),
    (0x67, 7), (0x68, 7), (0x69, 7), (0x6a, 7), (0x6b, 7), (0x6c, 7), (0x6d, 7), (0x6e, 7), (0x6f, 7), (0x70, 7),
    (0x71, 7), (0x72, 7), (0xfc, 8), (0x73, 7), (0xfd, 8), (0x1ffb, 13), (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14),
    (0x22, 6), (0x7ffd, 15), (0x3, 5), (0x23, 6), (0x4, 5), (0x24, 6), (0x5, 5), (0x25, 6), (0x26, 6), (0x27, 6),
    (0x6, 5), (0x74, 7), (0x75, 7), (0x28, 6), (0x29, 6), (0x2a, 6), (0x7, 5), (0x2b, 6), (0x76, 7), (0x2c, 6),
    (0x8, 5), (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7), (0x79, 7), (0x7a, 7), (0x7b, 7), (0x7ffe, 15), (0x7fc, 11),
    (0x3ffd, 14), (0x1ffd, 13), (0xffffffc, 28), (0xfffe6, 20), (0x3fffd2, 22), (0xfffe7, 20), (0xfffe8, 20),
    (0x3fffd3, 22), (0x3fffd4, 22), (0x3fffd5, 22), (0x7fffd9, 23), (0x3fffd6, 22), (0x7fffda, 23), (0x7fffdb, 23),
    (0x7fffdc, 23), (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23), (0xffffec, 24), (0xffffed, 24),
    (0x3fffd7, 22), (0x7fffe0, 23), (0xffffee, 24), (0x7fffe1, 23), (0x7fffe2, 23), (0x7fffe3, 23), (0x7fffe4, 23),
    (0x1fffdc, 21), (0x3fffd8, 22), (0x7fffe5, 23), (0x3fffd9, 22), (0x7fffe6, 23), (0x7fffe7, 23), (0xffffef, 24),
    (0x3fffda, 22), (0x1fffdd, 21), (0xfffe9, 20), (0x3fffdb, 22), (0x3fffdc, 22), (0x7fffe8, 23), (0x7fffe9, 23),
    (0x1fffde, 21), (0x7fffea, 23), (0x3fffdd, 22), (0x3fffde, 22), (0xfffff0, 24), (0x1fffdf, 21), (0x3fffdf, 22),
    (0x7fffeb, 23), (0x7fffec, 23), (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21), (0x7fffed, 23),
    (0x3fffe1, 22), (0x7fffee, 23), (0x7fffef, 23), (0xfffea, 20), (0x3fffe2, 22), (0x3fffe3, 22), (0x3fffe4, 22),
    (0x7ffff0, 23), (0x3fffe5, 22), (0x3fffe6, 22), (0x7ffff1, 23), (0x3ffffe0, 26), (0x3ffffe1, 26), (0xfffeb, 20),
    (0x7fff1, 19), (0x3fffe7, 22), (0x7ffff2, 23), (0x3fffe8, 22), (0x1ffffec, 25), (0x3ffffe2, 26), (0x3ffffe3, 26),
    (0x3ffffe4, 26), (0x7ffffde, 27), (0x7ffffdf, 27), (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25),
    (0x7fff2, 19), (0x1fffe3, 21), (0x3ffffe6, 26), (0x7ffffe0, 27), (0x7ffffe1, 27), (0x3ffffe7, 26),
    (0x7ffffe2, 27), (0xfffff2, 24), (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26), (0x3ffffe9, 26),
    (0xffffffd, 28), (0x7ffffe3, 27), (0x7ffffe4, 27), (0x7ffffe5, 27), (0xfffec, 20), (0xfffff3, 24), (0xfffed, 20),
    (0x1fffe6, 21), (0x3fffe9, 22), (0x1fffe7, 21), (0x1fffe8, 21), (0x7ffff3, 23), (0x3fffea, 22), (0x3fffeb, 22),
    (0x1ffffee, 25), (0x1ffffef, 25), (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23),
    (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26), (0x7ffffe7, 27), (0x7ffffe8, 27),
    (0x7ffffe9, 27), (0x7ffffea, 27), (0x7ffffeb, 27), (0xffffffe, 28), (0x7ffffec, 27), (0x7ffffed, 27),
    (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27), (0x3ffffee, 26), (0x3fffffff, 30),
)
# RFC 7541 Appendix A: the static table, index 1..61.
STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = (
    (b':authority', b''),
    (b':method', b'GET'),
    (b':method', b'POST'),
    (b':path', b'/'),
    (b':path', b'/index.html'),
    (b':scheme', b'http'),
    (b':scheme', b'https'),
    (b':status', b'200'),
    (b':status', b'204'),
    (b':status', b'206'),
    (b':status', b'304'),
    (b':status', b'400'),
    (b':status', b'404'),
    (b':status', b'500'),
    (b'accept-charset', b''),
    (b'accept-encoding', b'gzip, deflate'),
    (b'accept-language', b''),
    (b'accept-ranges', b''),
    (b'accept', b''),
    (b'access-control-allow-origin', b''),
    (b'age', b''),
    (b'allow', b''),
    (b'authorization', b''),
    (b'cache-control', b''),
    (b'content-disposition', b''),
    (b'content-encoding', b''),
    (b'content-language', b''),
    (b'content-length', b''),
    (b'content-location', b''),
    (b'content-range', b''),
    (b'content-type', b''),
    (b'cookie', b''),
    (b'date', b''),
    (b'etag', b''),
    (b'expect', b''),
    (b'expires', b''),
    (b'from', b''),
    (b'host', b''),
    (b'if-match', b''),
    (b'if-modified-since', b''),
    (b'if-none-match', b''),
    (b'if-range', b''),
    (b'if-unmodified-since', b''),
    (b'last-modified', b''),
    (b'link', b''),
    (b'location', b''),
    (b'max-forwards', b''),
    (b'proxy-authenticate', b''),
    (b'proxy-authorization', b''),
    (b'range', b''),
    (b'referer', b''),
    (b'refresh', b''),
    (b'retry-after', b''),
    (b'server', b''),
    (b'set-cookie', b''),
    (b'strict-transport-security', b''),
    (b'transfer-encoding', b''),
    (b'user-agent', b''),
    (b'vary', b''),
    (b'via', b''),
    (b'www-authenticate', b''),
)


_ENTRY_OVERHEAD = 32  # RFC 7541 §4.1
_MAX_INTEGER = 1 << 32  # no legitimate index, length or size is larger; bounds the varint loop
_NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization"})  # RFC 7541 §7.1.3
_MAX_INDEXED_ENTRY = 1024  # larger fields are sent as literals without indexing (they would flush the table)


def _build_huffman() -> tuple[list[int], list[bytes], list[bool]]:
    """Precompute a byte-at-a-time Huffman decoder (RFC 7541 Appendix B) as flat tables.

    A state is an internal node of the code tree (0 = root). For (state, byte) the tables give the
    state after the eight bits (-1 if they decode EOS or leave the tree) and the symbols completed on
    the way (codes are 5 to 30 bits long, so at most two per byte). A state may end the string iff its
    path from the root is all 1 bits and shorter than 8 (the padding rule, §5.2).
    """
    children: list[list[int]] = [[-1, -1]]  # node -> [child for bit 0, child for bit 1]; leaf = -(symbol + 2)
    for symbol, (code, length) in enumerate(_HUFFMAN_CODES):
        node = 0
        for shift in range(length - 1, -1, -1):
            bit = (code >> shift) & 1
            if shift == 0:
                children[node][bit] = -(symbol + 2)
            else:
                if children[node][bit] < 0:
                    children.append([-1, -1])
                    children[node][bit] = len(children) - 1
                node = children[node][bit]
    accept = [False] * len(children)
    node, depth = 0, 0
    while node >= 0 and depth < 8:
        accept[node] = True
        node, depth = children[node][1], depth + 1
    # Nibble steps first, then bytes as two nibbles: 256 x 16 x 4 bit steps instead of 256 x 256 x 8.
    nib_next = [-1] * (len(children) * 16)
    nib_emit = [-1] * (len(children) * 16)
    for state in range(len(children)):
        for nibble in range(16):
            node, emit = state, -1
            for shift in (3, 2, 1, 0):
                child = children[node][(nibble >> shift) & 1]
                if child == -1 or child == -(256 + 2):  # off the tree, or EOS inside a string (§5.2)
                    node = -1
                    break
                if child < 0:
                    emit = -child - 2
                    node = 0
                else:
                    node = child
            nib_next[state * 16 + nibble] = node
            nib_emit[state * 16 + nibble] = emit
    singles = [bytes([b]) for b in range(256)]
    byte_next = [-1] * (len(children) * 256)
    byte_emit = [b""] * (len(children) * 256)
    for state in range(len(children)):
        for byte in range(256):
            i = state * 16 + (byte >> 4)
            mid = nib_next[i]
            if mid < 0:
                continue
            j = mid * 16 + (byte & 15)
            end = nib_next[j]
            if end < 0:
                continue
            first, second = nib_emit[i], nib_emit[j]
            out = b""
            if first >= 0:
                out = singles[first]
            if second >= 0:
                out += singles[second]
            byte_next[state * 256 + byte] = end
            byte_emit[state * 256 + byte] = out
    return byte_next, byte_emit, accept


_HUFF_NEXT, _HUFF_EMIT, _HUFF_ACCEPT = _build_huffman()


def huffman_decode(data: bytes) -> bytes:
    """Decode a Huffman-coded string literal. Raises HpackError on EOS, bad padding or a bad code."""
    nxt = _HUFF_NEXT
    emit = _HUFF_EMIT
    out = bytearray()
    state = 0
    for byte in data:
        i = (state << 8) | byte
        out += emit[i]
        state = nxt[i]
        if state < 0:
            raise HpackError("invalid Huffman code (EOS or a code off the table)")
    if not _HUFF_ACCEPT[state]:
        raise HpackError("invalid Huffman padding")
    return bytes(out)


def huffman_encode(data: bytes) -> bytes:
    """Huffman-code a string (tests and peers; the encoder here sends raw literals)."""
    acc = 0
    bits = 0
    codes = _HUFFMAN_CODES
    for byte in data:
        code, length = codes[byte]
        acc = (acc << length) | code
        bits += length
    pad = -bits % 8
    acc = (acc << pad) | ((1 << pad) - 1)
    return acc.to_bytes((bits + pad) // 8, "big") if bits else b""


def _encode_int(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 §5.1: `first` holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_str(value: bytes) -> bytes:
    return _encode_int(len(value), 7, 0) + value


_STATIC_EXACT: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _i, (_n, _v) in enumerate(STATIC_TABLE, start=1):
    _STATIC_EXACT.setdefault((_n, _v), _i)
    _STATIC_NAME.setdefault(_n, _i)
_STATIC_LEN = len(STATIC_TABLE)


class Decoder:
    """One direction's HPACK decoding context (its dynamic table lives as long as the connection)."""

    def __init__(self, *, max_table_size: int = 4096, max_header_list_size: int = 65536) -> None:
        self.max_allowed_table_size = max_table_size  # what we advertised (SETTINGS_HEADER_TABLE_SIZE)
        self.max_header_list_size = max_header_list_size
        self._size_limit = max_table_size  # the current size set by the peer's size updates
        self._entries: list[tuple[bytes, bytes]] = []  # oldest first; dynamic index 1 is the last
        self._size = 0
        # The last block that left the table as it found it, and its header list: a peer repeating a head
        # (every request of a load generator, every response of a server) sends the same table references,
        # which decode to the same list while the table and the limit are unchanged (RFC 7541 §3.2).
        self._changes = 0  # table changes so far (entries added or evicted, size updates)
        self._last_block = b""
        self._last_changes = -1
        self._last_limit = -1
        self._last_headers: list[tuple[bytes, bytes]] = []

    def _add(self, name: bytes, value: bytes) -> None:
        self._changes += 1
        size = len(name) + len(value) + _ENTRY_OVERHEAD
        entries = self._entries
        if size > self._size_limit:  # §4.4: an entry larger than the table empties it
            entries.clear()
            self._size = 0
            return
        self._size += size
        entries.append((name, value))
        while self._size > self._size_limit:
            old_name, old_value = entries.pop(0)
            self._size -= len(old_name) + len(old_value) + _ENTRY_OVERHEAD

    def _resize(self, size: int) -> None:
        if size > self.max_allowed_table_size:
            raise HpackTableSizeError(f"dynamic table size update to {size} over the max allowable table size "
                                      f"{self.max_allowed_table_size}")
        self._changes += 1
        self._size_limit = size
        entries = self._entries
        while self._size > size:
            old_name, old_value = entries.pop(0)
            self._size -= len(old_name) + len(old_value) + _ENTRY_OVERHEAD

    def _field(self, index: int) -> tuple[bytes, bytes]:
        if index <= 0:
            raise HpackError("index 0 is not a header field (RFC 7541 §6.1)")
        if index <= _STATIC_LEN:
            return STATIC_TABLE[index - 1]
        dynamic = index - _STATIC_LEN
        if dynamic > len(self._entries):
            raise HpackError(f"index {index} is past the header tables")
        return self._entries[-dynamic]

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """Decode one complete header block. Raises HpackError / HpackTooLarge.

        The list returned is shared with later calls that decode the same block: do not change it."""
        changes = self._changes
        if changes == self._last_changes and block == self._last_block and self.max_header_list_size == self._last_limit:
            return self._last_headers
        headers = self._decode(block)
        if self._changes == changes:  # the table is as it was: the same block decodes the same way next time
            self._last_block, self._last_changes, self._last_headers = block, changes, headers
            self._last_limit = self.max_header_list_size
        return headers

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = []
        pos = 0
        end = len(block)
        total = 0
        limit = self.max_header_list_size
        may_resize = True
        while pos < end:
            first = block[pos]
            if first & 0x80:  # §6.1 indexed field
                index = first & 0x7F
                pos += 1
                if index == 0x7F:
                    index, pos = self._int_tail(block, pos, index)
                field = self._field(index)
                may_resize = False
            elif first & 0xE0 == 0x20:  # §6.3 dynamic table size update
                if not may_resize:
                    raise HpackError("dynamic table size update after a header field (RFC 7541 §4.2)")
                size = first & 0x1F
                pos += 1
                if size == 0x1F:
                    size, pos = self._int_tail(block, pos, size)
                self._resize(size)
                continue
            else:
                if first & 0x40:  # §6.2.1 with incremental indexing
                    prefix_mask, indexing = 0x3F, True
                else:  # §6.2.2 without indexing, §6.2.3 never indexed
                    prefix_mask, indexing = 0x0F, False
                index = first & prefix_mask
                pos += 1
                if index == prefix_mask:
                    index, pos = self._int_tail(block, pos, index)
                if index:
                    name = self._field(index)[0]
                else:
                    name, pos = self._string(block, pos)
                value, pos = self._string(block, pos)
                field = (name, value)
                if indexing:
                    self._add(name, value)
                may_resize = False
            total += len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
            if total > limit:
                raise HpackTooLarge(f"header list over {limit} bytes")
            headers.append(field)
        return headers

    @staticmethod
    def _int_tail(block: bytes, pos: int, value: int) -> tuple[int, int]:
        shift = 0
        end = len(block)
        while True:
            if pos >= end:
                raise HpackError("truncated integer")
            byte = block[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            if value > _MAX_INTEGER:
                raise HpackError("integer too large")
            if not byte & 0x80:
                return value, pos
            shift += 7

    def _string(self, block: bytes, pos: int) -> tuple[bytes, int]:
        if pos >= len(block):
            raise HpackError("truncated string literal")
        first = block[pos]
        length = first & 0x7F
        pos += 1
        if length == 0x7F:
            length, pos = self._int_tail(block, pos, length)
        end = pos + length
        if end > len(block):
            raise HpackError("string literal past the end of the header block")
        raw = block[pos:end]
        return (huffman_decode(raw) if first & 0x80 else raw), end


class Encoder:
    """One direction's HPACK encoding context."""

    def __init__(self) -> None:
        self.header_table_size = 4096  # the table size in use; set it to follow the peer's SETTINGS
        self._applied_size = 4096  # the size the peer's decoder knows
        self._entries: list[tuple[bytes, bytes, int]] = []  # (name, value, sequence), oldest first
        self._size = 0
        self._inserted = 0  # sequence of the newest entry
        self._exact: dict[tuple[bytes, bytes], int] = {}
        self._names: dict[bytes, int] = {}
        # The last header list that encoded to table references only, and its block: valid while nothing
        # was inserted since (a repeated request or response head is then one comparison, not a lookup
        # per field).
        self._last_headers: list[tuple[bytes, bytes]] = []
        self._last_block = b""
        self._last_inserted = -1

    def _evict_to(self, limit: int) -> None:
        entries = self._entries
        while self._size > limit and entries:
            name, value, seq = entries.pop(0)
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD
            if self._exact.get((name, value)) == seq:
                del self._exact[(name, value)]
            if self._names.get(name) == seq:
                del self._names[name]

    def _index_of(self, seq: int | None) -> int:
        if seq is None or not self._entries or seq < self._entries[0][2]:
            return 0
        return _STATIC_LEN + 1 + self._inserted - seq

    def encode(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        """Encode a header list (names must already be lower case)."""
        inserted = self._inserted
        resized = self.header_table_size != self._applied_size
        if not resized and inserted == self._last_inserted and headers == self._last_headers:
            return self._last_block
        out = bytearray()
        if resized:
            self._last_inserted = -1  # evictions do not move self._inserted: the last block may name evicted entries
            size = self.header_table_size
            self._evict_to(size)
            out += _encode_int(size, 5, 0x20)
            self._applied_size = size
        for name, value in headers:
            key = (name, value)
            index = _STATIC_EXACT.get(key, 0) or self._index_of(self._exact.get(key))
            if index:
                out += _encode_int(index, 7, 0x80)
                continue
            name_index = _STATIC_NAME.get(name, 0) or self._index_of(self._names.get(name))
            size = len(name) + len(value) + _ENTRY_OVERHEAD
            if name in _NEVER_INDEXED:
                out += _encode_int(name_index, 4, 0x10)
            elif size > _MAX_INDEXED_ENTRY or size > self._applied_size:
                out += _encode_int(name_index, 4, 0x00)
            else:
                out += _encode_int(name_index, 6, 0x40)
                self._evict_to(self._applied_size - size)
                self._inserted += 1
                self._entries.append((name, value, self._inserted))
                self._size += size
                self._exact[key] = self._inserted
                self._names[name] = self._inserted
            if not name_index:
                out += _encode_str(name)
            out += _encode_str(value)
        block = bytes(out)
        if not resized and self._inserted == inserted:  # references only: the table did not change
            self._last_headers, self._last_block, self._last_inserted = list(headers), block, inserted
        return block
