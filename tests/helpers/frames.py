"""HTTP/2 frame builders for tests and fuzz seeds (RFC 9113 §6), plus Hypothesis strategies for frame sequences.

`FrameBuilder` keeps one HPACK encoder, as a real peer does, so header blocks must be rendered in
the order they are sent. `frame_specs()` draws abstract frames; `render()` turns them into bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import strategies as st

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

HeaderList = Sequence[tuple[str, str]]


def request_headers(
    path: str = "/",
    *,
    method: str = "GET",
    authority: str | None = "svc.local",
    scheme: str = "http",
    extra: HeaderList = (),
) -> list[tuple[str, str]]:
    """A request header list in the order clients send it (pseudo-headers first)."""
    headers = [(":method", method), (":scheme", scheme)]
    if authority is not None:
        headers.append((":authority", authority))
    headers.append((":path", path))
    headers.extend(extra)
    return headers


def grpc_headers(path: str = "/demo.Greeter/SayHello", *, content_type: str = "application/grpc") -> list[tuple[str, str]]:
    return request_headers(path, method="POST", extra=[("content-type", content_type), ("te", "trailers")])


def grpc_message(payload: bytes, *, compressed: bool = False) -> bytes:
    """One gRPC Length-Prefixed-Message (PROTOCOL-HTTP2.md)."""
    return bytes([1 if compressed else 0]) + len(payload).to_bytes(4, "big") + payload


def raw_frame(frame_type: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """Any frame, valid or not: 9-byte header (RFC 9113 §4.1) + payload."""
    return len(payload).to_bytes(3, "big") + bytes([frame_type & 0xFF, flags & 0xFF]) + (
        stream_id & 0xFFFFFFFF).to_bytes(4, "big") + payload


class FrameBuilder:
    """Serialises frames for one connection direction (one HPACK encoder)."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()

    def block(self, headers: HeaderList) -> bytes:
        return self.encoder.encode(list(headers))

    @staticmethod
    def _ser(frame: Frame, stream_id: int | None = None) -> bytes:
        """Serialise; `stream_id` overrides the header's id (hyperframe refuses invalid ids itself)."""
        wire = frame.serialize()
        if stream_id is None:
            return wire
        return wire[:5] + (stream_id & 0xFFFFFFFF).to_bytes(4, "big") + wire[9:]

    @staticmethod
    def _sid(stream_id: int, connection_level: bool = False) -> int:
        """A placeholder id hyperframe accepts; the real one is patched in by _ser."""
        return 0 if connection_level else (stream_id or 1)

    def settings(self, *, ack: bool = False, **values: int) -> bytes:
        frame = SettingsFrame(0)
        if ack:
            frame.flags.add("ACK")
        codes = {"header_table_size": 1, "enable_push": 2, "max_concurrent_streams": 3,
                 "initial_window_size": 4, "max_frame_size": 5, "max_header_list_size": 6}
        for name, value in values.items():
            frame.settings[codes[name]] = value
        return self._ser(frame)

    def headers(self, stream_id: int, headers: HeaderList, *, end_stream: bool = False, end_headers: bool = True,
                padding: int = 0, priority: bool = False) -> bytes:
        frame = HeadersFrame(self._sid(stream_id))
        frame.data = self.block(headers)
        if end_stream:
            frame.flags.add("END_STREAM")
        if end_headers:
            frame.flags.add("END_HEADERS")
        if padding:
            frame.flags.add("PADDED")
            frame.pad_length = padding
        if priority:
            frame.flags.add("PRIORITY")
            frame.depends_on, frame.stream_weight, frame.exclusive = 0, 15, False
        return self._ser(frame, stream_id)

    def headers_split(self, stream_id: int, headers: HeaderList, *, pieces: int, end_stream: bool = False) -> bytes:
        """A header block split into HEADERS + CONTINUATION frames (RFC 9113 §6.10)."""
        block = self.block(headers)
        size = max(1, -(-len(block) // pieces))
        parts = [block[i : i + size] for i in range(0, len(block), size)] or [b""]
        out = bytearray()
        for i, part in enumerate(parts):
            sid = self._sid(stream_id)
            frame: HeadersFrame | ContinuationFrame = HeadersFrame(sid) if i == 0 else ContinuationFrame(sid)
            frame.data = part
            if i == 0 and end_stream:
                frame.flags.add("END_STREAM")
            if i == len(parts) - 1:
                frame.flags.add("END_HEADERS")
            out += self._ser(frame, stream_id)
        return bytes(out)

    def data(self, stream_id: int, data: bytes, *, end_stream: bool = False, padding: int = 0) -> bytes:
        frame = DataFrame(self._sid(stream_id))
        frame.data = data
        if end_stream:
            frame.flags.add("END_STREAM")
        if padding:
            frame.flags.add("PADDED")
            frame.pad_length = padding
        return self._ser(frame, stream_id)

    def rst_stream(self, stream_id: int, error_code: int = 8) -> bytes:
        frame = RstStreamFrame(self._sid(stream_id))
        frame.error_code = error_code
        return self._ser(frame, stream_id)

    def window_update(self, stream_id: int, increment: int) -> bytes:
        frame = WindowUpdateFrame(0)
        frame.window_increment = increment
        return self._ser(frame, stream_id)

    def ping(self, opaque: bytes = b"12345678", *, ack: bool = False) -> bytes:
        frame = PingFrame(0)
        frame.opaque_data = opaque
        if ack:
            frame.flags.add("ACK")
        return self._ser(frame)

    def goaway(self, last_stream_id: int, error_code: int = 0, data: bytes = b"") -> bytes:
        frame = GoAwayFrame(0)
        frame.last_stream_id, frame.error_code, frame.additional_data = last_stream_id, error_code, data
        return self._ser(frame)

    def priority(self, stream_id: int, depends_on: int = 0, weight: int = 15) -> bytes:
        frame = PriorityFrame(self._sid(stream_id))
        frame.depends_on, frame.stream_weight, frame.exclusive = depends_on, weight, False
        return self._ser(frame, stream_id)

    def push_promise(self, stream_id: int, promised: int, headers: HeaderList) -> bytes:
        frame = PushPromiseFrame(self._sid(stream_id))
        frame.promised_stream_id = promised
        frame.data = self.block(headers)
        frame.flags.add("END_HEADERS")
        return self._ser(frame, stream_id)


def client_preface(builder: FrameBuilder | None = None, **settings: int) -> bytes:
    """The client connection preface: magic + SETTINGS (RFC 9113 §3.4)."""
    return PREFACE + (builder or FrameBuilder()).settings(**settings)


# --- Hypothesis: abstract frames, rendered in order with one encoder --------------------------------

_STREAMS = st.sampled_from([0, 1, 3, 5, 7, 2, 2**31 - 1])
_PATHS = st.sampled_from(["/", "/a/b", "/a/../b", "//x", "/%2e%2e/x", "/%2F", "/p?q=1", "*", "bad", "",
                          "/pkg.Svc/Do", "/pkg.Svc/"])
_HEADER_SETS = st.one_of(
    st.builds(lambda p, m: request_headers(p, method=m), _PATHS, st.sampled_from(["GET", "POST", "CONNECT", "get"])),
    st.builds(lambda p: grpc_headers(p), _PATHS),
    st.lists(st.tuples(st.sampled_from([":path", ":method", ":status", "te", "connection", "x", "Upper", ""]),
                       st.text(max_size=8)), max_size=5),
)
FrameSpec = tuple[object, ...]


_OPEN_STREAMS = st.sampled_from([1, 3, 5])
_VALID_HEADERS = st.one_of(
    st.builds(lambda p, m: request_headers(p, method=m), st.sampled_from(["/", "/a/b", "/a/../b", "/p?q=1"]),
              st.sampled_from(["GET", "POST"])),
    st.just(grpc_headers()),
    st.just([("x-trailer", "1")]),  # trailers when the stream already has a head
)


def valid_frame_specs() -> st.SearchStrategy[FrameSpec]:
    """Frames a client sends on the streams it opened ("open" takes the next odd id; "on" frames name
    an opened stream by index), so sequences reach every stream state, legal moves or not."""
    opened = st.integers(0, 3)
    return st.one_of(
        st.tuples(st.just("open"), _VALID_HEADERS.filter(lambda h: h[0][0] == ":method"), st.booleans()),
        st.tuples(st.just("on_data"), opened, st.binary(max_size=64), st.booleans(), st.integers(0, 4)),
        st.tuples(st.just("on_trailers"), opened),
        st.tuples(st.just("on_rst"), opened, st.sampled_from([0, 8])),
        st.tuples(st.just("window"), st.just(0), st.integers(1, 65_535)),
        st.tuples(st.just("on_window"), opened, st.integers(1, 65_535)),
        st.tuples(st.just("ping"), st.booleans()),
        st.tuples(st.just("settings"), st.booleans(), st.sampled_from([0, 1, 65_535])),
        st.tuples(st.just("priority"), _OPEN_STREAMS, st.just(0)),
    )


def any_frame_specs() -> st.SearchStrategy[FrameSpec]:
    """Any frame: every type, valid and invalid stream ids, flags and sizes."""
    return st.one_of(
        st.tuples(st.just("headers"), _STREAMS, _HEADER_SETS, st.booleans(), st.booleans()),
        st.tuples(st.just("continuation"), _STREAMS, _HEADER_SETS, st.integers(2, 3)),
        st.tuples(st.just("data"), _STREAMS, st.binary(max_size=64) | st.just(b"z" * 70_000),
                  st.booleans(), st.integers(0, 8)),
        st.tuples(st.just("rst"), _STREAMS, st.integers(0, 15)),
        st.tuples(st.just("window"), _STREAMS, st.sampled_from([0, 1, 65_535, 2**31 - 1])),
        st.tuples(st.just("ping"), st.booleans()),
        st.tuples(st.just("goaway"), _STREAMS, st.integers(0, 15)),
        st.tuples(st.just("settings"), st.booleans(), st.sampled_from([0, 1, 65_535, 2**31, 16_384, 2**24])),
        st.tuples(st.just("priority"), _STREAMS, _STREAMS),
        st.tuples(st.just("push"), _STREAMS, _STREAMS),
        st.tuples(st.just("raw"), st.integers(0, 12), st.integers(0, 255), _STREAMS, st.binary(max_size=16)),
    )


def frame_specs() -> st.SearchStrategy[FrameSpec]:
    """Mostly well-formed frames (so streams reach every state), sometimes anything at all."""
    return st.one_of(valid_frame_specs(), valid_frame_specs(), valid_frame_specs(), any_frame_specs())


def render(specs: Sequence[FrameSpec], builder: FrameBuilder | None = None) -> bytes:
    """Serialise abstract frames in order (one HPACK encoder, like a real peer)."""
    b = builder or FrameBuilder()
    out = bytearray()
    opened: list[int] = []
    for spec in specs:
        kind, *args = spec
        if kind == "open":
            headers, end_stream = args
            opened.append(2 * len(opened) + 1)
            out += b.headers(opened[-1], headers, end_stream=bool(end_stream))  # type: ignore[arg-type]
            continue
        if kind.startswith("on_"):  # type: ignore[union-attr]
            if not opened:  # a frame on "an opened stream" opens one first
                opened.append(1)
                out += b.headers(1, request_headers("/", method="POST"))
            sid = opened[int(args[0]) % len(opened)]  # type: ignore[call-overload]
            if kind == "on_window":
                out += b.window_update(sid, args[1])  # type: ignore[arg-type]
            elif kind == "on_data":
                _, data, end_stream, padding = args
                out += b.data(sid, data, end_stream=end_stream, padding=padding)  # type: ignore[arg-type]
            elif kind == "on_trailers":
                out += b.headers(sid, [("x-trailer", "1")], end_stream=True)
            else:
                out += b.rst_stream(sid, args[1])  # type: ignore[arg-type]
            continue
        if kind == "headers":
            sid, headers, end_stream, end_headers = args
            out += b.headers(sid, headers, end_stream=end_stream, end_headers=end_headers)  # type: ignore[arg-type]
        elif kind == "continuation":
            sid, headers, pieces = args
            out += b.headers_split(sid, headers, pieces=pieces)  # type: ignore[arg-type]
        elif kind == "data":
            sid, data, end_stream, padding = args
            out += b.data(sid, data, end_stream=end_stream, padding=padding)  # type: ignore[arg-type]
        elif kind == "rst":
            out += b.rst_stream(*args)  # type: ignore[arg-type]
        elif kind == "window":
            out += b.window_update(*args)  # type: ignore[arg-type]
        elif kind == "ping":
            out += b.ping(ack=bool(args[0]))
        elif kind == "goaway":
            out += b.goaway(*args)  # type: ignore[arg-type]
        elif kind == "settings":
            ack, value = args
            out += b.settings(ack=True) if ack else b.settings(initial_window_size=value)  # type: ignore[arg-type]
        elif kind == "priority":
            out += b.priority(*args)  # type: ignore[arg-type]
        elif kind == "push":
            sid, promised = args
            out += b.push_promise(sid, promised, request_headers("/pushed"))  # type: ignore[arg-type]
        elif kind == "raw":
            out += raw_frame(*args)  # type: ignore[arg-type]
    return bytes(out)
