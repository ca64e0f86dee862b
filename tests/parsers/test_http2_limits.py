"""HTTP/2 limits on what a peer can make the proxy do: control-frame floods, empty frames, PRIORITY,
WINDOW_UPDATE, CONTINUATION blocks, HPACK tables, concurrent streams (issue 13 item 5).

Case table
| limit | driven by | expected |
|---|---|---|
| control frames | PING / SETTINGS / SETTINGS ACK / RST_STREAM flood | LimitExceeded("control_frames") + GOAWAY ENHANCE_YOUR_CALM |
| budget refill | 100 PING/s for 50 s; 10 PING per stream opened | no error |
| WINDOW_UPDATE | 1001 with no DATA sent; many with DATA sent | LimitExceeded("window_update_frames") / no error |
| empty frames | two empty DATA in a row without END_STREAM; alternating with non-empty | LimitExceeded("empty_frames") / no error |
| PRIORITY | 101 with no stream | LimitExceeded("priority_frames") |
| CONTINUATION | block pending; block over max_header_list_bytes | header_block_pending / LimitExceeded("header_block_bytes") |
| HPACK | size update over 4096; peer allowing 1 MiB | MalformedMessage (COMPRESSION_ERROR) / encoder stays at 4096 |
| streams | a third stream with max_concurrent_streams=2 | SETTINGS says 2; LimitExceeded("max_concurrent_streams") |
| gRPC framing | flag byte 0x07 in a gRPC request's DATA; flags 0 and 1 | RequestRejected + StreamReset + grpc-status 13 / Data relayed |
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import membrane.parsers.http2
import pytest
from membrane.parsers.errors import LimitExceeded, ProtocolViolation
from membrane.parsers.events import Data, GrpcCall, HttpRequest, HttpResponse, StreamReset
from membrane.parsers.http2 import (
    CONTROL_FRAME_BURST,
    CONTROL_FRAMES_PER_SECOND,
    CONTROL_FRAMES_PER_STREAM,
    MAX_CONSECUTIVE_EMPTY_FRAMES,
    MAX_HPACK_TABLE_BYTES,
    PRIORITY_FRAMES_PER_STREAM,
    WINDOW_UPDATE_BURST,
    Http2ServerSide,
    RequestRejected,
)

from tests.helpers.frames import FrameBuilder, client_preface, grpc_headers, raw_frame, request_headers


@pytest.fixture(autouse=True, params=["lean", "h2"])
def http2_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs on the lean frame layer and on h2, the reference (issue 11 item 4)."""
    monkeypatch.setattr(membrane.parsers.http2, "LEAN_BY_DEFAULT", request.param == "lean")
    return str(request.param)

ENHANCE_YOUR_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def _server() -> tuple[Http2ServerSide, FrameBuilder]:
    side = Http2ServerSide()
    builder = FrameBuilder()
    assert side.feed(client_preface(builder)) == []
    return side, builder


def _goaway_code(side: Http2ServerSide) -> int | None:
    """The error code of the GOAWAY the side queued, read by a real h2 client."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    for event in client.receive_data(side.data_to_send()):
        if isinstance(event, h2.events.ConnectionTerminated):
            return int(event.error_code or 0)
    return None


FLOODS = {
    "ping": lambda b, i: b.ping(i.to_bytes(8, "big")),
    "ping_ack": lambda b, i: b.ping(i.to_bytes(8, "big"), ack=True),
    "settings": lambda b, i: b.settings(max_concurrent_streams=100),
    "settings_ack": lambda b, i: b.settings(ack=True),
    "unknown_type": lambda b, i: raw_frame(0xAA, 0, 0, b"x"),
}


@pytest.mark.parametrize("kind", sorted(FLOODS))
def test_control_frame_flood_gets_goaway_enhance_your_calm(kind: str) -> None:
    """One more control frame than the burst allows, with no time passing, ends the connection with
    GOAWAY ENHANCE_YOUR_CALM and LimitExceeded("control_frames") (the PING/SETTINGS flood of issue 13)."""
    side, b = _server()
    assert side.control_frames == 1  # the preface's SETTINGS
    frames = b"".join(FLOODS[kind](b, i) for i in range(CONTROL_FRAME_BURST - 1))
    side.feed(frames, now_s=0.0)
    assert side.control_frames == CONTROL_FRAME_BURST
    side.data_to_send()
    with pytest.raises(LimitExceeded) as info:
        side.feed(FLOODS[kind](b, 0), now_s=0.0)
    assert info.value.limit == "control_frames"
    assert _goaway_code(side) == ENHANCE_YOUR_CALM


def test_flood_in_one_read_is_cut_at_the_limit() -> None:
    """A flood that arrives in a single read is judged frame by frame: the error comes at frame burst+1."""
    side, b = _server()
    with pytest.raises(LimitExceeded):
        side.feed(b"".join(b.ping(i.to_bytes(8, "big")) for i in range(CONTROL_FRAME_BURST + 50)), now_s=5.0)
    assert side.control_frames == CONTROL_FRAME_BURST + 1


def test_steady_pings_within_the_rate_are_fine() -> None:
    """PINGs at the sustained rate never run out of budget when the proxy passes the time."""
    side, b = _server()
    now = 0.0
    for i in range(5 * CONTROL_FRAME_BURST):
        now += 1.0 / CONTROL_FRAMES_PER_SECOND
        side.feed(b.ping(i.to_bytes(8, "big")), now_s=now)
    assert side.control_frames == 1 + 5 * CONTROL_FRAME_BURST


def test_without_time_the_budget_still_refills_per_stream() -> None:
    """Each stream the peer opens adds CONTROL_FRAMES_PER_STREAM to the budget (a reset per stream is normal)."""
    side, b = _server()
    streams = 3 * CONTROL_FRAME_BURST // CONTROL_FRAMES_PER_STREAM
    for n in range(streams):
        sid = 2 * n + 1
        events = side.feed(b.headers(sid, request_headers("/x"), end_stream=True))
        assert isinstance(events[0], HttpRequest)
        side.send_response(HttpResponse(status=204, stream_id=sid, http_version="2"))
        side.feed(b"".join(b.ping(i.to_bytes(8, "big")) for i in range(CONTROL_FRAMES_PER_STREAM - 1))
                  + b.rst_stream(sid))
    assert side.control_frames == 1 + streams * CONTROL_FRAMES_PER_STREAM
    assert side.rst_stream_frames == streams


def test_pings_answering_data_are_fine() -> None:
    """A client that PINGs after every DATA frame it reads (gRPC's BDP estimator) never runs out of budget."""
    side, b = _server()
    side.feed(b.headers(1, request_headers("/big"), end_stream=True), now_s=0.0)
    side.send_response(HttpResponse(status=200, stream_id=1, http_version="2", has_body=True))
    for i in range(3 * CONTROL_FRAME_BURST):
        side.send_data(1, b"x" * 10)
        side.data_to_send()
        side.feed(b.ping(i.to_bytes(8, "big")) + b.window_update(0, 10) + b.window_update(1, 10), now_s=0.0)
    assert side.control_frames == 1 + 3 * CONTROL_FRAME_BURST


def test_window_update_flood() -> None:
    """WINDOW_UPDATE beyond the base allowance while no DATA was sent is a flood."""
    side, b = _server()
    side.feed(b"".join(b.window_update(0, 1) for _ in range(WINDOW_UPDATE_BURST)))
    with pytest.raises(LimitExceeded) as info:
        side.feed(b.window_update(0, 1))
    assert info.value.limit == "window_update_frames"
    assert _goaway_code(side) == ENHANCE_YOUR_CALM


def test_window_updates_grow_with_data_sent() -> None:
    """A client acknowledging every DATA frame it reads (two WINDOW_UPDATEs each) is never a flood."""
    side, b = _server()
    side.feed(b.headers(1, request_headers("/big"), end_stream=True))
    side.send_response(HttpResponse(status=200, stream_id=1, http_version="2", has_body=True))
    for _ in range(3 * WINDOW_UPDATE_BURST):
        side.send_data(1, b"x" * 10)
        side.data_to_send()
        side.feed(b.window_update(0, 10) + b.window_update(1, 10))
    assert side.data_frames_sent == 3 * WINDOW_UPDATE_BURST
    assert side.window_update_frames == 6 * WINDOW_UPDATE_BURST


def test_empty_data_frames_in_a_row() -> None:
    """Two empty DATA frames in a row without END_STREAM end the connection (CVE-2019-9518)."""
    side, b = _server()
    side.feed(b.headers(1, request_headers("/up", method="POST")))
    for _ in range(MAX_CONSECUTIVE_EMPTY_FRAMES):
        side.feed(b.data(1, b""))
    with pytest.raises(LimitExceeded) as info:
        side.feed(b.data(1, b"", padding=8))  # padding does not make a frame less empty
    assert info.value.limit == "empty_frames"
    assert _goaway_code(side) == ENHANCE_YOUR_CALM


def test_empty_frames_between_data_are_fine() -> None:
    """An empty DATA frame now and then, between frames that carry bytes, is not a flood."""
    side, b = _server()
    side.feed(b.headers(1, request_headers("/up", method="POST")))
    got = []
    for _ in range(50):
        got += side.feed(b.data(1, b"") + b.data(1, b"ab"))
        side.acknowledge(1, 2)
    assert sum(len(e.data) for e in got if isinstance(e, Data)) == 100


def test_priority_flood() -> None:
    """PRIORITY frames beyond PRIORITY_FRAMES_PER_STREAM per stream opened are a flood."""
    side, b = _server()
    side.feed(b"".join(b.priority(2 * i + 1) for i in range(PRIORITY_FRAMES_PER_STREAM)))
    with pytest.raises(LimitExceeded) as info:
        side.feed(b.priority(3))
    assert info.value.limit == "priority_frames"


def test_header_block_pending_until_end_headers() -> None:
    """HEADERS without END_HEADERS leaves a block pending (the proxy times it); the last CONTINUATION completes it."""
    side, b = _server()
    frames = b.headers_split(1, request_headers("/x", extra=[("x-pad", "y" * 300)]), pieces=3, end_stream=True)
    first_len = int.from_bytes(frames[:3], "big") + 9
    assert side.feed(frames[:first_len]) == []
    assert side.header_block_pending
    events = side.feed(frames[first_len:])
    assert not side.header_block_pending
    assert isinstance(events[0], HttpRequest)


def test_header_block_over_the_limit_is_refused_from_the_frame_header() -> None:
    """A CONTINUATION that would take the block past max_header_list_bytes is refused from its 9-byte header."""
    side = Http2ServerSide(max_header_list_bytes=1024)
    b = FrameBuilder()
    side.feed(client_preface(b))
    block = b.block(request_headers("/x"))
    side.feed(raw_frame(1, 0x1, 1, block))  # HEADERS, END_STREAM, no END_HEADERS
    side.feed(raw_frame(9, 0, 1, b"\x40" * 500)[:9 + 500])
    assert side.header_block_pending
    with pytest.raises(LimitExceeded) as info:
        side.feed(raw_frame(9, 0, 1, b"\x40" * 600)[:9])
    assert info.value.limit == "header_block_bytes"
    assert _goaway_code(side) == ENHANCE_YOUR_CALM


def test_hpack_table_size_update_over_the_advertised_size() -> None:
    """A dynamic table size update above our SETTINGS_HEADER_TABLE_SIZE (4096) is refused (RFC 7541 §6.3)."""
    side, b = _server()
    update = bytes([0x3F, 0xE1, 0x3F])  # size update to 8192: 5-bit prefix 31, then 8161 as a varint
    block = update + b.block(request_headers("/x"))
    with pytest.raises(ProtocolViolation, match="max allowable table size"):
        side.feed(raw_frame(1, 0x5, 1, block))


def test_peer_cannot_make_our_encoder_table_grow() -> None:
    """A peer allowing a 1 MiB HPACK table does not make this side keep more than MAX_HPACK_TABLE_BYTES of history."""
    side = Http2ServerSide()
    b = FrameBuilder()
    side.feed(client_preface(b, header_table_size=1 << 20))
    assert side._conn.encoder.header_table_size == MAX_HPACK_TABLE_BYTES


def test_max_concurrent_streams_advertised_and_enforced() -> None:
    """SETTINGS_MAX_CONCURRENT_STREAMS is advertised, and a stream beyond it is LimitExceeded("max_concurrent_streams")."""
    side = Http2ServerSide(max_concurrent_streams=2)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.receive_data(side.data_to_send())
    assert client.remote_settings.max_concurrent_streams == 2
    b = FrameBuilder()
    side.feed(client_preface(b))
    side.feed(b.headers(1, request_headers("/a", method="POST")) + b.headers(3, request_headers("/b", method="POST")))
    with pytest.raises(LimitExceeded) as info:
        side.feed(b.headers(5, request_headers("/c", method="POST")))
    assert info.value.limit == "max_concurrent_streams"


def _grpc_call(side: Http2ServerSide, b: FrameBuilder) -> None:
    events = side.feed(b.headers(1, grpc_headers()))
    assert isinstance(events[0], GrpcCall)


@pytest.mark.parametrize("flag", [0x07, 0x02, 0xFF])
def test_grpc_flag_byte_other_than_0_or_1_is_refused(flag: int) -> None:
    """A gRPC message whose flag byte is not 0/1 is not gRPC: the stream is refused with INTERNAL (13)
    and reset upstream, and its bytes are never relayed (issue 13: 0x07 used to be forwarded)."""
    side, b = _server()
    _grpc_call(side, b)
    side.data_to_send()
    events = side.feed(b.data(1, bytes([flag]) + (3).to_bytes(4, "big") + b"abc", end_stream=True))
    assert not [e for e in events if isinstance(e, Data)]
    rejected = [e for e in events if isinstance(e, RequestRejected)]
    assert [(r.stream_id, r.grpc) for r in rejected] == [(1, True)]
    assert [e.stream_id for e in events if isinstance(e, StreamReset)] == [1]
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    client.send_headers(1, grpc_headers())
    answer = client.receive_data(side.data_to_send())
    statuses = [dict(e.headers).get("grpc-status") for e in answer if isinstance(e, h2.events.ResponseReceived)]
    assert statuses == ["13"]


@pytest.mark.parametrize("flag", [0, 1])
def test_grpc_flag_bytes_0_and_1_are_relayed(flag: int) -> None:
    """Uncompressed (0) and compressed (1) messages are relayed as they are, split anywhere."""
    side, b = _server()
    _grpc_call(side, b)
    message = bytes([flag]) + (3).to_bytes(4, "big") + b"abc"
    got = side.feed(b.data(1, message[:2])) + side.feed(b.data(1, message[2:], end_stream=True))
    assert b"".join(e.data for e in got if isinstance(e, Data)) == message
