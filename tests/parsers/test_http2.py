"""parsers/http2: per-stream events, refusals on one stream, flow control end to end, h2c upgrade (RFC 9113, RFC 7540 §3.2).

Peers are real h2 state machines (python-hyper `h2`): a client facing `Http2ServerSide` and a server
behind `Http2ClientSide`; end to end, the proxy's real session (`membrane.proxy.session_http2`, via the
gateway's session factory) sits between them, in memory (`SessionBridge`) or on loopback sockets
(`LoopbackBridge`, with grpcio and httpx).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import membrane.parsers.http2
import pytest
from hypothesis import given
from hypothesis import strategies as st
from membrane.parsers.errors import LimitExceeded, MalformedMessage, MessageTooLarge, ParseError, ProtocolViolation
from membrane.parsers.events import (
    Data,
    Direction,
    EndOfMessage,
    GrpcCall,
    HttpRequest,
    HttpResponse,
    Reason,
    StreamReset,
    Trailers,
)
from membrane.parsers.http1 import refusal_status
from membrane.parsers.http2 import (
    DEFAULT_INITIAL_WINDOW,
    ErrorCode,
    GoAway,
    Http2ClientSide,
    Http2ServerSide,
    RequestRejected,
    is_h2c_upgrade,
)
from membrane.policies import compile_policy, load_policies, parse_endpoints
from membrane.proxy.server import ConnectionInfo
from membrane.proxy.session import Action, DataReceived, Forward, Log, Reply, Session
from membrane.proxy.session_http2 import Http2Session
from membrane.proxy.wiring import FixedPeers, gateway_factory

from tests.helpers.feed import all_chunkings, feed_all
from tests.helpers.frames import (
    PREFACE,
    FrameBuilder,
    client_preface,
    frame_specs,
    grpc_headers,
    grpc_message,
    render,
    request_headers,
)


@pytest.fixture(autouse=True, params=["lean", "h2"])
def http2_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs on the lean frame layer and on h2, the reference (issue 11 item 4)."""
    monkeypatch.setattr(membrane.parsers.http2, "LEAN_BY_DEFAULT", request.param == "lean")
    return str(request.param)


CORPUS = Path(__file__).resolve().parents[2] / "fuzz" / "corpus" / "http2_frames"


def _peer(client_side: bool, **settings: int) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8"))
    if settings:
        conn.local_settings = h2.settings.Settings(client=client_side, initial_values={
            getattr(h2.settings.SettingCodes, k.upper()): v for k, v in settings.items()})
    conn.initiate_connection()
    return conn


def _events(events: list[h2.events.Event], kind: type) -> list[h2.events.Event]:
    return [e for e in events if isinstance(e, kind)]


def _request_bytes(path: str = "/v1/pets", *, end_stream: bool = True, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    b = FrameBuilder()
    return client_preface(b) + b.headers(1, request_headers(path, extra=extra), end_stream=end_stream)


# --- requests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", all_chunkings(_request_bytes(), trailing=FrameBuilder().ping()))
def test_request_survives_any_chunking(chunks: list[bytes]) -> None:
    """A prior-knowledge request split at any byte boundary yields one HttpRequest and its end (RFC 9113 §3.4, §8.3.1)."""
    side = Http2ServerSide()
    events = feed_all(side.feed, chunks)
    assert events == [
        HttpRequest(method="GET", target="/v1/pets", path="/v1/pets", host="svc.local", scheme="http",
                    http_version="2", stream_id=1, has_body=False),
        EndOfMessage(stream_id=1),
    ]


def test_request_body_and_trailers_are_streamed() -> None:
    """DATA becomes Data events as it arrives and a trailing HEADERS block becomes Trailers (RFC 9113 §8.1)."""
    b = FrameBuilder()
    wire = (client_preface(b)
            + b.headers(1, request_headers("/up?x=1", method="POST", extra=[("content-length", "6")]))
            + b.data(1, b"abc") + b.data(1, b"def", padding=5)
            + b.headers(1, [("x-checksum", "1")], end_stream=True))
    for chunks in all_chunkings(wire)[:3]:
        events = feed_all(Http2ServerSide().feed, chunks)
        assert events == [
            HttpRequest(method="POST", target="/up?x=1", path="/up", query="x=1", host="svc.local",
                        headers=(("content-length", "6"),), scheme="http", http_version="2", stream_id=1,
                        has_body=True, content_length=6),
            Data(data=b"abc", stream_id=1), Data(data=b"def", stream_id=1),
            Trailers(headers=(("x-checksum", "1"),), stream_id=1), EndOfMessage(stream_id=1),
        ]


def test_header_block_split_over_continuation_frames() -> None:
    """HEADERS + CONTINUATION frames form one header block (RFC 9113 §6.10)."""
    b = FrameBuilder()
    wire = client_preface(b) + b.headers_split(1, request_headers("/c", extra=[("x-long", "v" * 300)]), pieces=3,
                                                end_stream=True)
    events = Http2ServerSide().feed(wire)
    assert isinstance(events[0], HttpRequest)
    assert events[0].headers == (("x-long", "v" * 300),)


def test_path_is_normalised_before_it_is_reported() -> None:
    """:path is normalised like an HTTP/1.1 target (dot segments, repeated slashes) so proxy and server judge one path."""
    events = Http2ServerSide().feed(_request_bytes("/a/./b/../c//d?q=%2F"))
    assert isinstance(events[0], HttpRequest)
    assert (events[0].target, events[0].path, events[0].query) == ("/a/c/d?q=%2F", "/a/c/d", "q=%2F")


def _client_reads(server_bytes: bytes, client: h2.connection.H2Connection) -> dict[int, dict[str, object]]:
    """Decode what the server side sent, per stream: headers, body, trailers, ended, reset."""
    streams: dict[int, dict[str, object]] = {}
    for ev in client.receive_data(server_bytes):
        sid = getattr(ev, "stream_id", None)
        if not sid:
            continue
        s = streams.setdefault(sid, {"headers": None, "body": b"", "trailers": None, "ended": False, "reset": None})
        if isinstance(ev, h2.events.ResponseReceived):
            s["headers"] = dict(ev.headers or [])
        elif isinstance(ev, h2.events.DataReceived):
            s["body"] = bytes(s["body"]) + bytes(ev.data or b"")  # type: ignore[arg-type]
            client.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
        elif isinstance(ev, h2.events.TrailersReceived):
            s["trailers"] = dict(ev.headers or [])
        elif isinstance(ev, h2.events.StreamEnded):
            s["ended"] = True
        elif isinstance(ev, h2.events.StreamReset):
            s["reset"] = ev.error_code
    return streams


@pytest.mark.parametrize("path", ["/%2F..%2Fadmin", "/a\\b", "/x%zz", "relative"])
def test_bad_path_is_refused_with_400_on_its_stream_only(path: str) -> None:
    """A :path servers read differently gets 400 on its own stream; the next stream is reported (RFC 9113 §8.1.1)."""
    client = _peer(True)
    side = Http2ServerSide()
    client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", path)],
                        end_stream=True)
    client.send_headers(3, [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/ok")],
                        end_stream=True)
    events = side.feed(client.data_to_send())
    assert [type(e) for e in events] == [RequestRejected, HttpRequest, EndOfMessage]
    assert events[0] == RequestRejected(stream_id=1, reason=Reason.MALFORMED, detail=events[0].detail)  # type: ignore[union-attr]
    seen = _client_reads(side.data_to_send(), client)
    assert seen[1]["headers"][":status"] == "400"
    assert seen[1]["ended"]  # type: ignore[index]
    assert 3 not in seen  # untouched: waiting for the proxy's forwarded response


def test_connect_is_refused() -> None:
    """CONNECT would open a tunnel that escapes L7 rules, so it is refused with 400 (RFC 9113 §8.5)."""
    client = _peer(True)
    side = Http2ServerSide()
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "db:5432")])
    events = side.feed(client.data_to_send())
    assert [type(e) for e in events] == [RequestRejected]
    assert _client_reads(side.data_to_send(), client)[1]["headers"][":status"] == "400"  # type: ignore[index]


# --- gRPC --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/grpc", "application/grpc+proto", "application/grpc+json",
                                          "Application/GRPC; charset=utf-8"])
def test_grpc_call_is_recognised(content_type: str) -> None:
    """POST with content-type application/grpc[+proto|+json] is a GrpcCall split into service and method."""
    b = FrameBuilder()
    events = Http2ServerSide().feed(client_preface(b) + b.headers(1, grpc_headers(content_type=content_type)))
    assert events == [GrpcCall(service="demo.Greeter", method="SayHello", path="/demo.Greeter/SayHello",
                               authority="svc.local", headers=(("content-type", content_type), ("te", "trailers")),
                               stream_id=1, has_body=True, scheme="http")]


def test_grpc_web_and_get_are_plain_http() -> None:
    """application/grpc-web, or a GET, is not gRPC over HTTP/2: it is judged as a plain request."""
    b = FrameBuilder()
    wire = (client_preface(b) + b.headers(1, grpc_headers(content_type="application/grpc-web"))
            + b.headers(3, request_headers("/x", extra=[("content-type", "application/grpc")]), end_stream=True))
    events = Http2ServerSide().feed(wire)
    assert [type(e) for e in events] == [HttpRequest, HttpRequest, EndOfMessage]


def test_malformed_grpc_path_gets_grpc_internal() -> None:
    """A gRPC call whose :path is not /package.Service/Method is refused with grpc-status 13 (our MALFORMED mapping)."""
    client = _peer(True)
    side = Http2ServerSide()
    client.send_headers(1, grpc_headers("/demo.Greeter/Say/Hello"))
    events = side.feed(client.data_to_send())
    assert [type(e) for e in events] == [RequestRejected]
    assert events[0].grpc  # type: ignore[union-attr]
    seen = _client_reads(side.data_to_send(), client)[1]
    assert seen["headers"] == {":status": "200", "content-type": "application/grpc", "grpc-status": "13",
                               "grpc-message": "Malformed request"}
    assert seen["ended"]
    assert seen["body"] == b""


def test_multiplexed_streams_one_refused_others_continue() -> None:
    """Refusing one stream (403 / gRPC 7) leaves the connection and the other streams working (RFC 9113 §5.1)."""
    client = _peer(True)
    side = Http2ServerSide()
    client.send_headers(1, request_headers("/allowed", method="POST"))
    client.send_headers(3, request_headers("/denied", method="POST"))
    client.send_headers(5, grpc_headers("/demo.Admin/Drop"))
    for sid in (1, 3):
        client.send_data(sid, b"payload-%d" % sid)
    client.send_data(5, grpc_message(b"payload-5"))  # a gRPC body must be gRPC-framed
    events = side.feed(client.data_to_send())
    assert [(type(e), e.stream_id) for e in events] == [
        (HttpRequest, 1), (HttpRequest, 3), (GrpcCall, 5), (Data, 1), (Data, 3), (Data, 5)]
    side.refusal(3, Reason.POLICY_DENIED)
    side.refusal(5, Reason.POLICY_DENIED)
    side.acknowledge(1, len(b"payload-1"))
    # The client keeps streaming on every stream; refused streams' bytes are dropped.
    for sid in (1, 3, 5):
        client.send_data(sid, b"more", end_stream=True)
    later = side.feed(client.data_to_send())
    assert later == [Data(data=b"more", stream_id=1), EndOfMessage(stream_id=1)]
    side.send_response(HttpResponse(status=200, headers=(("content-type", "text/plain"),), stream_id=1,
                                    has_body=True, http_version="2"))
    side.send_data(1, b"ok", end_stream=True)
    seen = _client_reads(side.data_to_send(), client)
    assert seen[3]["headers"][":status"] == "403"
    assert seen[3]["body"] == b"Access denied\r\n"  # type: ignore[index]
    assert seen[3]["headers"]["content-length"] == "15"  # type: ignore[index]
    assert seen[5]["headers"] == {":status": "200", "content-type": "application/grpc", "grpc-status": "7",
                                  "grpc-message": "Access denied"}
    assert seen[5]["body"] == b""
    assert seen[5]["ended"]
    assert seen[1]["headers"][":status"] == "200"
    assert seen[1]["body"] == b"ok"
    assert seen[1]["ended"]  # type: ignore[index]
    assert all(s["reset"] is None for s in seen.values())


@pytest.mark.parametrize(("reason", "status", "grpc_status"), [
    (Reason.POLICY_DENIED, 403, "7"), (Reason.MALFORMED, 400, "13"), (Reason.TOO_LARGE, 431, "8"),
    (Reason.UPSTREAM_FAILED, 503, "14"), (Reason.UPSTREAM_TIMEOUT, 504, "4")])
def test_every_reason_has_an_http_and_a_grpc_refusal(reason: Reason, status: int, grpc_status: str) -> None:
    """Each Reason maps to one HTTP status and one grpc-status (STYLE.md §3.4)."""
    assert refusal_status(reason) == status
    client = _peer(True)
    side = Http2ServerSide()
    client.send_headers(1, request_headers("/x"), end_stream=True)
    client.send_headers(3, grpc_headers())
    side.feed(client.data_to_send())
    side.refusal(1, reason)
    side.refusal(3, reason)
    seen = _client_reads(side.data_to_send(), client)
    assert seen[1]["headers"][":status"] == str(status)
    assert seen[1]["ended"]  # type: ignore[index]
    assert seen[3]["headers"]["grpc-status"] == grpc_status  # type: ignore[index]


def test_refusal_after_grpc_response_started_ends_with_status_trailers() -> None:
    """Once response headers went out, a gRPC refusal is a trailers block carrying grpc-status (PROTOCOL-HTTP2.md)."""
    client = _peer(True)
    side = Http2ServerSide()
    client.send_headers(1, grpc_headers())
    side.feed(client.data_to_send())
    side.send_response(HttpResponse(status=200, headers=(("content-type", "application/grpc"),), stream_id=1,
                                    has_body=True, http_version="2"))
    side.send_data(1, grpc_message(b"partial"))
    side.refusal(1, Reason.TOO_LARGE, message="too big: 100%")
    seen = _client_reads(side.data_to_send(), client)[1]
    assert seen["trailers"] == {"grpc-status": "8", "grpc-message": "too big: 100%25"}
    assert seen["ended"]


def test_refusal_after_plain_response_started_resets() -> None:
    """A plain stream whose response already started cannot get a new status line: it is reset (RFC 9113 §8.1)."""
    client = _peer(True)
    side = Http2ServerSide()
    client.send_headers(1, request_headers("/x"), end_stream=True)
    side.feed(client.data_to_send())
    side.send_response(HttpResponse(status=200, stream_id=1, has_body=True, http_version="2"))
    side.refusal(1, Reason.UPSTREAM_FAILED)
    assert _client_reads(side.data_to_send(), client)[1]["reset"] == ErrorCode.INTERNAL_ERROR


def test_refused_stream_body_does_not_stall_the_connection() -> None:
    """DATA on a refused stream is acknowledged at once, so the connection window never closes (RFC 9113 §6.9)."""
    client = _peer(True)
    side = Http2ServerSide(initial_window_size=65_535, connection_window_size=65_535)
    client.send_headers(1, request_headers("/denied", method="POST"))
    side.feed(client.data_to_send())
    side.refusal(1, Reason.POLICY_DENIED)
    _client_reads(side.data_to_send(), client)
    sent = 0
    while sent < 300_000:  # far beyond every window: only works if the proxy keeps opening them
        n = min(client.local_flow_control_window(1), 16_384)
        assert n > 0, f"client blocked after {sent} bytes"
        client.send_data(1, b"x" * n)
        sent += n
        assert side.feed(client.data_to_send()) == []
        _client_reads(side.data_to_send(), client)


# --- the proxy's real HTTP/2 session (membrane.proxy.session_http2), driven through its sans-I/O API ---

_ENDPOINTS = """
endpoints:
  - {name: client, namespace: default, labels: {app: client}, ips: [10.244.7.10]}
  - {name: server, namespace: default, labels: {app: server}, ips: [10.244.7.20]}
"""
_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: h2, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules:
            http: [%s]
"""
ALLOW_ALL = "{}"
# The real-client tests: grpcio's Say and Stream and the /v1 API pass; Drop and /admin are denied.
ALLOW_ECHO_AND_V1 = '{path: "/membrane\\\\.test\\\\.Echo/(Say|Stream)"}, {path: "/v1/.*"}'


def _proxy_session(http_rules: str) -> Session:
    """The session the gateway makes for a client->server connection on port 80 under `http_rules`."""
    loaded = load_policies(_POLICY % http_rules, "h2.yaml")
    assert not loaded.errors, loaded.errors
    pmap = compile_policy(loaded.policies, parse_endpoints(_ENDPOINTS))
    factory = gateway_factory(pmap, FixedPeers(dst="default/server", upstream=("10.244.7.20", 80), src="default/client"))
    info = ConnectionInfo(client=("127.0.0.1", 40000), original_dst=("127.0.0.1", 80))
    return factory.session(info)


class SessionBridge:
    """Downstream h2 client <-> the proxy's real HTTP session (sans-I/O) <-> upstream h2 server, in memory."""

    def __init__(self, *, upstream_settings: dict[str, int] | None = None, http_rules: str = ALLOW_ALL) -> None:
        self.client = _peer(True)
        self.server = _peer(False, **(upstream_settings or {}))
        self.session = _proxy_session(http_rules)
        self.flows: list[Log] = []
        self.server_events: list[h2.events.Event] = []
        self.server_body: dict[int, bytes] = {}
        self.server_acks = True  # the upstream reads (and acknowledges) what it receives
        self.client_streams: dict[int, dict[str, object]] = {}
        self._to_server = self._to_client = b""
        self._apply(self.session.start())

    @property
    def h2(self) -> Http2Session:
        """The HTTP/2 session the sniffing session chose (after the client's preface)."""
        inner = getattr(self.session, "inner", self.session)
        assert isinstance(inner, Http2Session)
        return inner

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Forward) and action.direction is Direction.CLIENT_TO_SERVER:
                self._to_server += action.data
            elif isinstance(action, Forward | Reply):
                self._to_client += action.data
            elif isinstance(action, Log):
                self.flows.append(action)
            else:
                raise AssertionError(f"the session closed: {action}")

    def pump(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = False
            if data := self.client.data_to_send():
                moved = True
                self._apply(self.session.handle(DataReceived(Direction.CLIENT_TO_SERVER, data)))
            if data := self.server.data_to_send():
                moved = True
                self._apply(self.session.handle(DataReceived(Direction.SERVER_TO_CLIENT, data)))
            if self._to_server:
                moved = True
                data, self._to_server = self._to_server, b""
                self._server_reads(data)
            if self._to_client:
                moved = True
                data, self._to_client = self._to_client, b""
                self._client_reads(data)
            if not moved:
                return

    def _server_reads(self, data: bytes) -> None:
        for ev in self.server.receive_data(data):
            self.server_events.append(ev)
            if isinstance(ev, h2.events.DataReceived):
                sid = ev.stream_id or 0
                self.server_body[sid] = self.server_body.get(sid, b"") + bytes(ev.data or b"")
                if self.server_acks:
                    self.server.acknowledge_received_data(ev.flow_controlled_length or 0, sid)

    def _client_reads(self, data: bytes) -> None:
        for ev in self.client.receive_data(data):
            sid = getattr(ev, "stream_id", None)
            if not sid:
                continue
            s = self.client_streams.setdefault(sid, {"headers": None, "body": b"", "trailers": None,
                                                     "ended": False, "reset": None})
            if isinstance(ev, h2.events.ResponseReceived):
                s["headers"] = dict(ev.headers or [])
            elif isinstance(ev, h2.events.DataReceived):
                s["body"] = bytes(s["body"]) + bytes(ev.data or b"")  # type: ignore[arg-type]
                self.client.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
            elif isinstance(ev, h2.events.TrailersReceived):
                s["trailers"] = dict(ev.headers or [])
            elif isinstance(ev, h2.events.StreamEnded):
                s["ended"] = True
            elif isinstance(ev, h2.events.StreamReset):
                s["reset"] = ev.error_code

    def send_body(self, conn: h2.connection.H2Connection, sid: int, body: bytes, sent: int, end: bool) -> int:
        """Send as much of body[sent:] as the peer's windows allow; returns the new offset."""
        while sent < len(body):
            n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(body) - sent)
            if n <= 0:
                break
            conn.send_data(sid, body[sent : sent + n], end_stream=end and sent + n == len(body))
            sent += n
        return sent


def test_last_data_frame_carries_end_stream_through_the_proxy() -> None:
    """A body whose last DATA frame carries END_STREAM is relayed the same way, both directions: one frame,
    not the data and then an empty DATA frame to end the stream (RFC 9113 §6.1; a frame less per stream)."""
    bridge = SessionBridge()
    client_events: list[h2.events.Event] = []
    receive = bridge.client.receive_data

    def client_receives(data: bytes) -> list[h2.events.Event]:
        events = receive(data)
        client_events.extend(events)
        return events

    bridge.client.receive_data = client_receives  # type: ignore[method-assign]
    bridge.client.send_headers(1, request_headers("/v1/pets", method="POST"))
    bridge.client.send_data(1, b"ping", end_stream=True)
    bridge.pump()
    bridge.server.send_headers(1, [(":status", "200")])
    bridge.server.send_data(1, b"pong", end_stream=True)
    bridge.pump()
    upstream = [e for e in bridge.server_events if isinstance(e, h2.events.DataReceived)]
    downstream = [e for e in client_events if isinstance(e, h2.events.DataReceived)]
    for received, body in ((upstream, b"ping"), (downstream, b"pong")):
        assert [(e.data, e.stream_ended is not None) for e in received] == [(body, True)]  # type: ignore[attr-defined]
    assert bridge.client_streams[1]["ended"]


def test_large_bodies_flow_both_ways_end_to_end() -> None:
    """Bodies far larger than every window cross the proxy's session both ways, byte-exact (RFC 9113 §5.2)."""
    bridge = SessionBridge()
    upload = bytes(range(256)) * 4_000  # 1,024,000 bytes: past the proxy's 256 KiB stream and 1 MiB connection windows
    download = bytes(reversed(range(256))) * 1_500  # 384,000 bytes
    bridge.client.send_headers(1, request_headers("/upload", method="POST"))
    sent = 0
    for _ in range(1_000):
        sent = bridge.send_body(bridge.client, 1, upload, sent, end=True)
        bridge.pump()
        if sent == len(upload):
            break
    bridge.pump()
    assert bridge.server_body[1] == upload
    assert _events(bridge.server_events, h2.events.StreamEnded)
    bridge.server.send_headers(1, [(":status", "200")])
    sent = 0
    for _ in range(500):
        sent = bridge.send_body(bridge.server, 1, download, sent, end=False)
        if sent == len(download):
            bridge.server.send_headers(1, [("x-done", "1")], end_stream=True)
        bridge.pump()
        if sent == len(download):
            break
    bridge.pump()
    got = bridge.client_streams[1]
    assert got["body"] == download
    assert got["trailers"] == {"x-done": "1"}
    assert got["ended"]
    assert bridge.h2.server.open_stream_ids == ()
    assert bridge.h2.client.open_stream_ids == ()
    assert bridge.h2.is_idle


def test_slow_upstream_reader_applies_backpressure_to_the_client() -> None:
    """An upstream that stops reading stalls the client at the proxy's windows; nothing grows beyond them (RFC 9113 §5.2.2)."""
    bridge = SessionBridge()
    bridge.server_acks = False
    bridge.client.send_headers(1, request_headers("/upload", method="POST"))
    upload = b"u" * 2_000_000
    sent = 0
    for _ in range(100):
        sent = bridge.send_body(bridge.client, 1, upload, sent, end=True)
        bridge.pump()
    # The upstream's window (65,535, h2's default) + the proxy's own stream window is all that could move.
    assert sent <= 65_535 + DEFAULT_INITIAL_WINDOW
    assert bridge.h2.client.buffered_bytes() <= DEFAULT_INITIAL_WINDOW
    assert len(bridge.server_body[1]) <= 65_535
    bridge.server_acks = True
    bridge.server.acknowledge_received_data(len(bridge.server_body[1]), 1)
    for _ in range(400):
        sent = bridge.send_body(bridge.client, 1, upload, sent, end=True)
        bridge.pump()
        if sent == len(upload) and len(bridge.server_body[1]) == len(upload):
            break
    assert bridge.server_body[1] == upload


def test_upstream_max_concurrent_streams_queues_opens_in_order() -> None:
    """With upstream MAX_CONCURRENT_STREAMS=1 the next stream opens only after the first closes (RFC 9113 §5.1.2)."""
    bridge = SessionBridge(upstream_settings={"max_concurrent_streams": 1})
    bridge.client.send_headers(1, request_headers("/one"), end_stream=True)
    bridge.pump()  # the client's preface makes the session HTTP/2; SETTINGS are exchanged
    bridge.client.send_headers(3, request_headers("/two", method="POST"))
    bridge.client.send_data(3, b"queued-body", end_stream=True)
    bridge.pump()
    requests = _events(bridge.server_events, h2.events.RequestReceived)
    assert [dict(r.headers or [])[":path"] for r in requests] == ["/one"]
    assert bridge.h2.client.buffered_bytes(3) == len(b"queued-body")
    bridge.server.send_headers(1, [(":status", "204")], end_stream=True)
    bridge.pump()
    requests = _events(bridge.server_events, h2.events.RequestReceived)
    assert [dict(r.headers or [])[":path"] for r in requests] == ["/one", "/two"]
    assert bridge.server_body[3] == b"queued-body"
    assert bridge.client_streams[1]["headers"] == {":status": "204"}


def test_upstream_reset_reaches_the_client_and_releases_windows() -> None:
    """RST_STREAM from upstream resets the client's stream; buffered bytes count as delivered so the client is not starved."""
    bridge = SessionBridge()
    bridge.server_acks = False
    bridge.client.send_headers(1, request_headers("/a", method="POST"))
    bridge.send_body(bridge.client, 1, b"q" * 200_000, 0, end=False)
    bridge.pump()
    bridge.server.reset_stream(1, ErrorCode.INTERNAL_ERROR)
    bridge.pump()
    assert bridge.client_streams[1]["reset"] == ErrorCode.INTERNAL_ERROR
    assert bridge.h2.client.buffered_bytes() == 0
    bridge.client.send_headers(3, request_headers("/b"), end_stream=True)
    bridge.pump()
    assert [dict(r.headers or [])[":path"] for r in _events(bridge.server_events, h2.events.RequestReceived)] == ["/a", "/b"]
    assert bridge.client.outbound_flow_control_window >= 65_535 - 16_384  # connection window came back


def test_denied_stream_is_refused_while_others_flow() -> None:
    """A request the policy denies is answered 403 on its stream by the session; the allowed one reaches upstream."""
    bridge = SessionBridge(http_rules=ALLOW_ECHO_AND_V1)
    bridge.client.send_headers(1, request_headers("/admin"), end_stream=True)
    bridge.client.send_headers(3, request_headers("/v1/pets"), end_stream=True)
    bridge.pump()
    assert bridge.client_streams[1]["headers"][":status"] == "403"  # type: ignore[index]
    assert bridge.client_streams[1]["body"] == b"Access denied\r\n"
    paths = [dict(r.headers or [])[":path"] for r in _events(bridge.server_events, h2.events.RequestReceived)]
    assert paths == ["/v1/pets"]


def test_upstream_goaway_refuses_unprocessed_streams() -> None:
    """GOAWAY: streams above last_stream_id get StreamReset(REFUSED_STREAM) and no new stream opens (RFC 9113 §6.8)."""
    up = Http2ClientSide()
    server = _peer(False)
    server.receive_data(up.data_to_send())
    for sid in (1, 3):
        assert up.send_request(HttpRequest(method="GET", target="/", path="/", host="a", stream_id=sid,
                                           http_version="2"))
    server.receive_data(up.data_to_send())
    server.close_connection(last_stream_id=1)
    events = up.feed(server.data_to_send())
    assert GoAway(error_code=0, last_stream_id=1) in events
    assert StreamReset(stream_id=3, error_code=ErrorCode.REFUSED_STREAM) in events
    assert not up.allows_new_streams
    assert not up.send_request(HttpRequest(method="GET", target="/", path="/", stream_id=5, http_version="2"))


def test_client_side_reports_interim_final_response_and_trailers() -> None:
    """1xx, the final response, DATA and trailers each become an event on the upstream side (RFC 9113 §8.1)."""
    up = Http2ClientSide()
    server = _peer(False)
    server.receive_data(up.data_to_send())
    up.send_request(GrpcCall(service="a.B", method="C", path="/a.B/C", authority="x", stream_id=1,
                             headers=(("content-type", "application/grpc"),)))
    up.send_data(1, grpc_message(b"hi"), end_stream=True)
    server.receive_data(up.data_to_send())
    server.send_headers(1, [(":status", "100")])
    server.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
    server.send_data(1, grpc_message(b"yo"))
    server.send_headers(1, [("grpc-status", "0")], end_stream=True)
    events = up.feed(server.data_to_send())
    assert events == [
        HttpResponse(status=100, http_version="2", stream_id=1),
        HttpResponse(status=200, headers=(("content-type", "application/grpc"),), http_version="2", stream_id=1,
                     has_body=True),
        Data(data=grpc_message(b"yo"), stream_id=1),
        Trailers(headers=(("grpc-status", "0"),), stream_id=1),
        EndOfMessage(stream_id=1),
    ]


@pytest.mark.parametrize("status", ["11b", "20", "2000", "101", "+20"])
def test_malformed_response_status_resets_only_that_stream(status: str) -> None:
    """A :status that is not three digits (or 101) is a stream error: RST_STREAM + StreamReset, not a crash (RFC 9113 §8.3.2).

    Found by fuzz/http2_frames (corpus crash_status_not_three_digits.bin): h2 does not check it.
    """
    up = Http2ClientSide()
    for sid in (1, 3):
        up.send_request(HttpRequest(method="GET", target="/", path="/", host="a", stream_id=sid, http_version="2"))
    up.data_to_send()
    b = FrameBuilder()
    headers = [(":status", status)]
    events = up.feed(b.settings() + b.headers(1, headers) + b.headers(3, [(":status", "204")], end_stream=True))
    assert events == [StreamReset(stream_id=1, error_code=ErrorCode.PROTOCOL_ERROR),
                      HttpResponse(status=204, http_version="2", stream_id=3), EndOfMessage(stream_id=3)]
    assert b"\x00\x00\x04\x03\x00\x00\x00\x00\x01\x00\x00\x00\x01" in up.data_to_send()  # RST_STREAM(1, PROTOCOL_ERROR)


def test_stream_reset_here_takes_effect_for_the_rest_of_the_same_read() -> None:
    """Frames after a stream this side reset are handled as on a reset stream however the bytes were split.

    Found by fuzz/http2_frames (corpus crash_reset_stream_then_same_read_frames.bin): h2 processed
    the whole read before our reset, so a later HEADERS on that stream became bad trailers only when
    the read was whole. Frames are now fed to h2 one at a time.
    """
    b = FrameBuilder()
    wire = (b.settings() + b.headers(1, [(":status", "2!")]) + b.headers(1, [(":status", "200")])
            + b.data(1, b"resp") + b.headers(3, [(":status", "204")], end_stream=True))
    results = []
    for chunks in all_chunkings(wire):
        up = Http2ClientSide()
        for sid in (1, 3):
            up.send_request(HttpRequest(method="GET", target="/", path="/", host="a", stream_id=sid, http_version="2"))
        results.append(feed_all(up.feed, chunks))
    assert all(r == results[0] for r in results)
    assert results[0] == [StreamReset(stream_id=1, error_code=ErrorCode.PROTOCOL_ERROR),
                          HttpResponse(status=204, http_version="2", stream_id=3), EndOfMessage(stream_id=3)]


@pytest.mark.parametrize("late", ["headers", "data"])
def test_frame_on_half_closed_remote_stream_resets_only_that_stream(late: str) -> None:
    """HEADERS or DATA after the upstream ended a stream we still send on (half-closed (remote)) is a stream
    error STREAM_CLOSED (RFC 9113 §5.1): RST_STREAM on that stream, the connection and other streams go on.

    Found by fuzz/http2_frames (corpus diff_headers_on_half_closed_remote.bin): the lean layer made it a
    connection error, h2 (and nghttp2) a stream error.
    """
    up = Http2ClientSide()
    for sid in (1, 3):
        up.send_request(HttpRequest(method="POST", target="/", path="/", host="a", stream_id=sid, http_version="2",
                                    has_body=True))
    up.data_to_send()
    b = FrameBuilder()
    late_frame = b.headers(1, [(":status", "200")]) if late == "headers" else b.data(1, b"late")
    wire = (b.settings() + b.headers(1, [(":status", "204")], end_stream=True) + late_frame
            + b.headers(3, [(":status", "204")], end_stream=True))
    events = up.feed(wire)
    assert events == [HttpResponse(status=204, http_version="2", stream_id=1), EndOfMessage(stream_id=1),
                      StreamReset(stream_id=1, error_code=ErrorCode.STREAM_CLOSED),
                      HttpResponse(status=204, http_version="2", stream_id=3), EndOfMessage(stream_id=3)]
    sent = up.data_to_send()
    assert b"\x00\x00\x04\x03\x00\x00\x00\x00\x01\x00\x00\x00\x05" in sent  # RST_STREAM(1, STREAM_CLOSED)
    assert b"\x07\x00\x00\x00\x00\x00" not in sent  # no GOAWAY


@pytest.mark.parametrize("end_stream", [True, False])
def test_request_headers_from_upstream_are_a_protocol_error(end_stream: bool) -> None:
    """HEADERS from the upstream on a stream it would open (even, idle) is a connection error PROTOCOL_ERROR:
    a server opens streams only by PUSH_PROMISE (RFC 9113 §8.4, and push is disabled here), a client never
    receives a request. nghttp2 refuses it the same way ("request HEADERS: client received request").

    Found by fuzz/http2_frames (corpus diff_request_headers_to_client.bin): the lean layer refused it, h2
    opened the stream and the adapter ignored its RequestReceived; the adapter now refuses it too.
    """
    up = Http2ClientSide()
    up.send_request(HttpRequest(method="GET", target="/", path="/", host="a", stream_id=1, http_version="2"))
    up.data_to_send()
    b = FrameBuilder()
    with pytest.raises(ProtocolViolation) as info:
        up.feed(b.settings() + b.headers(4, request_headers("/pushed"), end_stream=end_stream))
    assert info.value.direction is Direction.SERVER_TO_CLIENT
    sent = up.data_to_send()
    assert sent[-17:-8] == b"\x00\x00\x08\x07\x00\x00\x00\x00\x00"  # GOAWAY (last stream id: 0 lean, 4 h2)
    assert sent[-4:] == b"\x00\x00\x00\x01"  # PROTOCOL_ERROR
    with pytest.raises(ProtocolViolation):
        up.feed(b"")


def test_push_promise_from_upstream_is_a_protocol_error() -> None:
    """The client side disables push (SETTINGS_ENABLE_PUSH=0); a PUSH_PROMISE is then a connection error (RFC 9113 §8.4)."""
    up = Http2ClientSide()
    up.send_request(HttpRequest(method="GET", target="/", path="/", host="a", stream_id=1, http_version="2"))
    b = FrameBuilder()
    wire = b.settings() + b.push_promise(1, 2, request_headers("/pushed"))
    with pytest.raises(ProtocolViolation) as info:
        up.feed(wire)
    assert info.value.direction is Direction.SERVER_TO_CLIENT


# --- connection-level behaviour and errors ----------------------------------------------------------


def test_ping_and_settings_are_answered_by_the_side_itself() -> None:
    """PING gets a PING ACK and SETTINGS a SETTINGS ACK without any event for the proxy (RFC 9113 §6.5, §6.7)."""
    client = _peer(True)
    side = Http2ServerSide()
    client.receive_data(side.data_to_send())
    client.ping(b"pingpong")
    assert side.feed(client.data_to_send()) == []
    acks = client.receive_data(side.data_to_send())
    assert any(isinstance(e, h2.events.PingAckReceived) and e.ping_data == b"pingpong" for e in acks)
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in acks)


def test_client_goaway_and_reset_become_events() -> None:
    """RST_STREAM from the client is a StreamReset and GOAWAY a GoAway, so the proxy can mirror them upstream."""
    b = FrameBuilder()
    wire = client_preface(b) + b.headers(1, request_headers("/a", method="POST")) + b.rst_stream(1, 8) + b.goaway(1)
    assert Http2ServerSide().feed(wire)[1:] == [StreamReset(stream_id=1, error_code=8),
                                                GoAway(error_code=0, last_stream_id=1)]


def test_goaway_reserved_bit_is_ignored() -> None:
    """GOAWAY's Last-Stream-ID is 31 bits; the reserved bit is ignored on receipt (RFC 9113 §6.8).

    Found by fuzz/http2_frames (corpus diff_goaway_reserved_bit.bin): hyperframe keeps the bit, the
    lean layer masks it; the h2 adapter now masks it too.
    """
    b = FrameBuilder()
    wire = client_preface(b) + b.goaway(0xFFFFFFFF, 2)
    assert Http2ServerSide().feed(wire) == [GoAway(error_code=2, last_stream_id=0x7FFFFFFF)]


@pytest.mark.parametrize(("wire", "error", "goaway"), [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", ProtocolViolation, False),  # not HTTP/2: nothing to say in HTTP/2
    (PREFACE + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00", ProtocolViolation, True),  # WINDOW_UPDATE 0
    (PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x01", ProtocolViolation, True),  # SETTINGS on a stream
    (PREFACE + b"\x00\x40\x01\x00\x00\x00\x00\x00\x01" + b"\x00" * 16_385, MessageTooLarge, True),  # DATA too big
])
def test_broken_connections_raise_parse_errors(wire: bytes, error: type[ParseError], goaway: bool) -> None:
    """Connection errors are typed ParseErrors, a GOAWAY is queued, and the side stays failed (RFC 9113 §5.4.1)."""
    side = Http2ServerSide()
    side.data_to_send()
    with pytest.raises(error) as info:
        feed_all(side.feed, [wire])
    assert info.value.direction is Direction.CLIENT_TO_SERVER
    assert (side.data_to_send()[3:4] == b"\x07") is goaway  # a GOAWAY frame
    with pytest.raises(ProtocolViolation):
        side.feed(b"")


def test_hpack_garbage_is_malformed() -> None:
    """An undecodable header block is a COMPRESSION_ERROR, reported as a ParseError (RFC 9113 §4.3)."""
    wire = client_preface() + b"\x00\x00\x01\x01\x05\x00\x00\x00\x01" + b"\xff"
    with pytest.raises(ParseError):
        Http2ServerSide().feed(wire)


def test_header_list_over_the_limit_is_too_large() -> None:
    """A header list beyond max_header_list_bytes is refused as MessageTooLarge (RFC 9113 §6.5.2, CVE-2016-6581)."""
    b = FrameBuilder()
    wire = client_preface(b) + b.headers_split(1, request_headers("/", extra=[("x-big", "v" * 9_000)]), pieces=2)
    with pytest.raises(MessageTooLarge):
        Http2ServerSide(max_header_list_bytes=8_192).feed(wire)


def test_uppercase_header_name_is_rejected() -> None:
    """Field names must be lower case in HTTP/2 (RFC 9113 §8.2.1)."""
    b = FrameBuilder()
    with pytest.raises(ProtocolViolation):
        Http2ServerSide().feed(client_preface(b) + b.headers(1, request_headers("/", extra=[("X-Up", "1")])))


@pytest.mark.parametrize(("headers", "body"), [
    (request_headers("/", extra=[("host", "other.example")]), None),  # :authority vs Host (§8.3.1)
    (request_headers("/", authority=None, extra=[("host", "a"), ("host", "b")]), None),  # two Hosts
    (request_headers("/", method="POST", extra=[("content-length", "3")]), b"12345"),  # length lies (§8.1.1)
    (request_headers("/", extra=[("connection", "keep-alive")]), None),  # connection-specific (§8.2.2)
    (request_headers("/", extra=[("transfer-encoding", "chunked")]), None),
    (request_headers("/", extra=[("te", "gzip")]), None),
    ([*request_headers("/"), (":path", "/other")], None),  # duplicate pseudo-header (§8.3)
    ([(":method", "GET"), (":scheme", "http"), (":authority", "a")], None),  # no :path
    ([("x-first", "1"), *request_headers("/")], None),  # pseudo-header after a regular one
    (request_headers("/", extra=[("x-bad", "a\r\nInjected: 1")]), None),  # CR/LF in a value (§8.2.1)
])
def test_requests_servers_could_read_differently_are_rejected(headers: list[tuple[str, str]],
                                                              body: bytes | None) -> None:
    """Malformed request heads that let the proxy and the server disagree are connection errors (RFC 9113 §8.1.1, §8.2, §8.3)."""
    b = FrameBuilder()
    wire = client_preface(b) + b.headers(1, headers, end_stream=body is None)
    if body is not None:
        wire += b.data(1, body, end_stream=True)
    with pytest.raises(ParseError):
        Http2ServerSide().feed(wire)


@given(st.lists(frame_specs(), max_size=12), st.booleans())
def test_any_frame_sequence_yields_events_or_parse_error(specs: list[tuple[object, ...]], server: bool) -> None:
    """Every frame type x stream state: feed() returns events or raises ParseError, nothing else (RFC 9113 §5.1)."""
    side: Http2ServerSide | Http2ClientSide = Http2ServerSide() if server else Http2ClientSide()
    if not server:
        side.send_request(HttpRequest(method="POST", target="/", path="/", host="a", stream_id=1, http_version="2",
                                      has_body=True))
    wire = (client_preface() if server else FrameBuilder().settings()) + render(specs)
    try:
        for event in side.feed(wire):
            # Drive the API as the proxy would, so refusals and acknowledgements run in every state.
            if isinstance(event, HttpRequest | GrpcCall) and isinstance(side, Http2ServerSide):
                side.refusal(event.stream_id or 0, Reason.POLICY_DENIED)
            elif isinstance(event, Data):
                side.acknowledge(event.stream_id or 0, len(event.data))
        side.data_to_send()
    except ParseError as e:
        assert isinstance(e.reason, Reason)


# --- h2c upgrade ------------------------------------------------------------------------------------


def _upgrade_request(settings: str, *, has_body: bool = False) -> HttpRequest:
    return HttpRequest(method="GET", target="/up", path="/up", host="svc", has_body=has_body, headers=(
        ("Host", "svc"), ("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
        ("HTTP2-Settings", settings), ("Accept", "*/*")))


def test_h2c_upgrade_turns_the_request_into_stream_1() -> None:
    """Upgrade: h2c answers 101, then the server preface, and the upgrading request is stream 1 (RFC 7540 §3.2)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    settings = client.initiate_upgrade_connection().decode()  # type: ignore[union-attr]
    request = _upgrade_request(settings.rstrip("="))  # token68 without padding, as curl sends it
    assert is_h2c_upgrade(request)
    side, events = Http2ServerSide.from_h2c_upgrade(request)
    assert events == [HttpRequest(method="GET", target="/up", path="/up", host="svc", headers=(("accept", "*/*"),),
                                  scheme="http", http_version="2", stream_id=1), EndOfMessage(stream_id=1)]
    out = side.data_to_send()
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    preface_after_101 = out.split(b"\r\n\r\n", 1)[1]
    client.receive_data(preface_after_101)
    assert side.feed(client.data_to_send()) == []
    side.send_response(HttpResponse(status=200, stream_id=1, has_body=True, http_version="2"))
    side.send_data(1, b"upgraded", end_stream=True)
    seen = _client_reads(side.data_to_send(), client)[1]
    assert seen["headers"] == {":status": "200"}
    assert seen["body"] == b"upgraded"
    assert seen["ended"]


def test_h2c_upgrade_with_bad_path_is_refused_on_stream_1() -> None:
    """The upgraded request is judged like any stream: a path servers read differently is refused (400)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    settings = client.initiate_upgrade_connection().decode()  # type: ignore[union-attr]
    request = _upgrade_request(settings)
    bad = HttpRequest(method=request.method, target="/a%2fb", path="/a%2fb", host="svc", headers=request.headers)
    side, events = Http2ServerSide.from_h2c_upgrade(bad)
    assert [type(e) for e in events] == [RequestRejected]
    client.receive_data(side.data_to_send().split(b"\r\n\r\n", 1)[1])
    assert _client_reads(side.data_to_send(), client) == {}  # the 400 went out with the preface
    assert side.open_stream_ids == ()


@pytest.mark.parametrize(("request_", "error"), [
    (_upgrade_request("AAMAAABkAAQAAP__", has_body=True), ProtocolViolation),
    (_upgrade_request("!!notbase64!!"), MalformedMessage),
    (_upgrade_request("AAMAAAB"), MalformedMessage),  # truncated setting
    (HttpRequest(method="GET", target="/", path="/", headers=(("Upgrade", "h2c"),)), MalformedMessage),
])
def test_h2c_upgrade_refusals(request_: HttpRequest, error: type[ParseError]) -> None:
    """An upgrade with a body is not taken (strip it, as Envoy does); a missing or bad HTTP2-Settings is malformed (RFC 7540 §3.2.1)."""
    with pytest.raises(error):
        Http2ServerSide.from_h2c_upgrade(request_)


# --- real clients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("capture", sorted(CORPUS.glob("client_*")), ids=lambda p: p.name)
def test_captured_real_client_connections_parse(capture: Path) -> None:
    """Bytes captured from httpx[http2] and grpcio over loopback parse into requests, whole and in 7-byte reads."""
    data = capture.read_bytes()[1:]  # first byte: fuzz target's mode selector
    whole = Http2ServerSide().feed(data)
    requests = [e for e in whole if isinstance(e, HttpRequest | GrpcCall)]
    assert requests, "a captured connection holds at least one request"
    if "grpc" in capture.name:
        assert all(isinstance(r, GrpcCall) and r.service == "membrane.test.Echo" for r in requests)
    side = Http2ServerSide()
    assert feed_all(side.feed, [data[i : i + 7] for i in range(0, len(data), 7)]) == whole


# --- real clients and servers over loopback, bridged by a minimal proxy loop ------------------------


class LoopbackBridge:
    """A minimal threaded proxy on 127.0.0.1 running the proxy's real session per connection.

    Blocking sockets carry out the session's actions (Forward upstream or to the client, Reply, Log);
    `http_rules` is the policy's HTTP rule list. Records both directions' bytes.
    """

    def __init__(self, upstream: tuple[str, int], http_rules: str = ALLOW_ECHO_AND_V1) -> None:
        self.upstream, self.http_rules = upstream, http_rules
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.records: list[tuple[bytearray, bytearray]] = []
        self.errors: list[BaseException] = []
        self.flows: list[Log] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def upstream_paths(self) -> list[str]:
        """The paths of the requests the session forwarded upstream (from its flow records)."""
        return [urlsplit(log.flow.l7["http"]["url"]).path for log in self.flows
                if log.flow.l7_type == "REQUEST" and log.flow.verdict == "FORWARDED"]

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        c2s, s2c = bytearray(), bytearray()
        self.records.append((c2s, s2c))
        server = socket.create_connection(self.upstream)
        session = _proxy_session(self.http_rules)
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, Direction.CLIENT_TO_SERVER)
        sel.register(server, selectors.EVENT_READ, Direction.SERVER_TO_CLIENT)

        def apply(actions: list[Action]) -> bool:
            for action in actions:
                if isinstance(action, Forward) and action.direction is Direction.CLIENT_TO_SERVER:
                    server.sendall(action.data)
                elif isinstance(action, Forward | Reply):
                    client.sendall(action.data)
                elif isinstance(action, Log):
                    self.flows.append(action)
                else:
                    return False
            return True

        try:
            running = apply(session.start())
            while running:
                for key, _ in sel.select(timeout=10):
                    data = key.fileobj.recv(65_536)  # type: ignore[union-attr]
                    if not data:
                        return
                    (c2s if key.data is Direction.CLIENT_TO_SERVER else s2c).extend(data)
                    running = apply(session.handle(DataReceived(key.data, data))) and running
        except BaseException as e:  # surfaced by the test through self.errors
            self.errors.append(e)
        finally:
            sel.close()
            client.close()
            server.close()


def _grpc_echo_server() -> tuple[grpc.Server, int]:
    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request[::-1]

    def stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for r in requests:
            yield r.upper()

    handler = grpc.method_handlers_generic_handler("membrane.test.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
        "Drop": grpc.unary_unary_rpc_method_handler(say),
    })
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_real_grpcio_client_and_server_through_the_bridge() -> None:
    """grpcio unary (200 kB, past every window) and streaming calls pass byte-exact; a denied call is PERMISSION_DENIED."""
    server, port = _grpc_echo_server()
    bridge = LoopbackBridge(("127.0.0.1", port))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{bridge.port}") as channel:
            big = bytes(range(256)) * 800
            assert channel.unary_unary("/membrane.test.Echo/Say")(big, timeout=10) == big[::-1]
            replies = list(channel.stream_stream("/membrane.test.Echo/Stream")(iter([b"a", b"bb" * 40_000]),
                                                                              timeout=10))
            assert replies == [b"A", b"BB" * 40_000]
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/membrane.test.Echo/Drop")(b"x", timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
            assert info.value.details() == "Access denied"  # type: ignore[attr-defined]
            # The connection lives on after the refusal.
            assert channel.unary_unary("/membrane.test.Echo/Say")(b"again", timeout=10) == b"niaga"
        assert "/membrane.test.Echo/Drop" not in bridge.upstream_paths
        assert "/membrane.test.Echo/Say" in bridge.upstream_paths
        assert not bridge.errors, bridge.errors
    finally:
        bridge.close()
        server.stop(0)


def test_real_httpx_client_through_the_bridge() -> None:
    """httpx (prior-knowledge h2c) gets 403 `Access denied` for a denied path; an allowed one reaches the upstream."""
    server, port = _grpc_echo_server()  # any HTTP/2 server: grpcio resets non-gRPC requests (INTERNAL_ERROR)
    bridge = LoopbackBridge(("127.0.0.1", port))
    try:
        with httpx.Client(http1=False, http2=True, base_url=f"http://127.0.0.1:{bridge.port}", timeout=10) as c:
            denied = c.get("/admin")
            assert (denied.status_code, denied.text, denied.http_version) == (403, "Access denied\r\n", "HTTP/2")
            with pytest.raises(httpx.RemoteProtocolError, match="StreamReset"):
                # Allowed: it reaches grpcio, which resets a non-gRPC POST; the session relays that reset as is.
                c.post("/membrane.test.Echo/Say", content=b"z" * 100_000, headers={"content-type": "text/plain"})
            assert c.get("/a/../admin").status_code == 403  # judged after normalisation
        assert bridge.upstream_paths == ["/membrane.test.Echo/Say"]
        assert not bridge.errors, bridge.errors
    finally:
        bridge.close()
        server.stop(0)


def capture_real_clients(directory: Path) -> None:
    """Record grpcio and httpx[http2] connections through LoopbackBridge as fuzz seeds (loopback only).

    Files: client_<case>.bin (mode byte 0 + client bytes) and server_<case>.bin (mode byte 1 +
    upstream bytes). Run with `python fuzz/http2_frames.py --capture fuzz/corpus/http2_frames`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    server, port = _grpc_echo_server()

    def unary(channel: grpc.Channel) -> None:
        assert channel.unary_unary("/membrane.test.Echo/Say")(b"x" * 9_000, timeout=10) == b"x" * 9_000

    def streaming(channel: grpc.Channel) -> None:
        call = channel.stream_stream("/membrane.test.Echo/Stream")
        assert list(call(iter([b"a", b"bb", b"ccc" * 1000]), timeout=10)) == [b"A", b"BB", b"CCC" * 1000]

    def denied(channel: grpc.Channel) -> None:
        with pytest.raises(grpc.RpcError):
            channel.unary_unary("/membrane.test.Echo/Drop")(b"x", timeout=10)

    def save(name: str, bridge: LoopbackBridge) -> None:
        time.sleep(0.3)  # let the bridge thread see the close
        bridge.close()
        assert not bridge.errors, bridge.errors
        c2s, s2c = bridge.records[0]
        (directory / f"client_{name}.bin").write_bytes(b"\x00" + bytes(c2s))
        (directory / f"server_{name}.bin").write_bytes(b"\x01" + bytes(s2c))

    try:
        for name, case in (("grpcio_unary", unary), ("grpcio_streaming", streaming), ("grpcio_denied", denied)):
            bridge = LoopbackBridge(("127.0.0.1", port))
            with grpc.insecure_channel(f"127.0.0.1:{bridge.port}") as channel:
                case(channel)
            save(name, bridge)
        bridge = LoopbackBridge(("127.0.0.1", port))
        with httpx.Client(http1=False, http2=True, base_url=f"http://127.0.0.1:{bridge.port}", timeout=10) as c:
            assert c.get("/admin").status_code == 403
            for send in (lambda: c.get("/v1/pets?limit=10", headers={"x-trace": "abc"}),
                         lambda: c.post("/v1/upload", content=b"u" * 9_000), lambda: c.delete("/v1/pets/7")):
                with contextlib.suppress(httpx.RemoteProtocolError):  # grpcio resets non-gRPC requests
                    send()
        save("httpx_requests", bridge)
    finally:
        server.stop(0)


def test_rapid_reset_closes_the_connection() -> None:
    """A client resetting most of its streams before an answer is cut off with ENHANCE_YOUR_CALM (CVE-2023-44487, Envoy's rule)."""
    client = _peer(True)
    side = Http2ServerSide()
    client.receive_data(side.data_to_send())
    with pytest.raises(LimitExceeded, match="rapid reset") as info:
        for i in range(600):
            client.send_headers(2 * i + 1, request_headers("/x"), end_stream=True)
            client.reset_stream(2 * i + 1)
            side.feed(client.data_to_send())
    assert info.value.limit == "rapid_reset"
    assert side.streams_opened == 500
    assert side.premature_resets == 500
    assert any(isinstance(e, h2.events.ConnectionTerminated) and e.error_code == ErrorCode.ENHANCE_YOUR_CALM
               for e in client.receive_data(side.data_to_send()))


def test_many_answered_streams_are_not_rapid_reset() -> None:
    """Streams answered before the client resets them do not count as premature resets."""
    client = _peer(True)
    side = Http2ServerSide()
    client.receive_data(side.data_to_send())
    for i in range(600):
        sid = 2 * i + 1
        client.send_headers(sid, request_headers("/x"), end_stream=True)
        side.feed(client.data_to_send())
        side.send_response(HttpResponse(status=204, stream_id=sid, http_version="2"))
        client.receive_data(side.data_to_send())
    assert side.streams_opened == 600
    assert side.premature_resets == 0


def _serve_h2_directly(listener: socket.socket, errors: list[BaseException]) -> None:
    """Answer one connection with Http2ServerSide alone: 403 for /admin, else 200 echoing the path.

    An HTTP/1.1 `Upgrade: h2c` request head is read by hand (the HTTP/1.1 parser is not under test).
    """
    conn, _ = listener.accept()
    try:
        conn.settimeout(10)
        first = conn.recv(65_536)
        if first.startswith(b"PRI * HTTP/2.0"):
            side, events = Http2ServerSide(), []
            events = side.feed(first)
        else:
            head, _, rest = first.partition(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ")
            headers = tuple((n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines))
            host = next(v for n, v in headers if n.lower() == "host")
            request = HttpRequest(method=method, target=target, path=target, host=host, headers=headers)
            side, events = Http2ServerSide.from_h2c_upgrade(request)
            events += side.feed(rest) if rest else []
        while True:
            for e in events:
                if isinstance(e, HttpRequest):
                    if e.path == "/admin":
                        side.refusal(e.stream_id or 0, Reason.POLICY_DENIED)
                    else:
                        body = f"answered {e.path} on stream {e.stream_id}\n".encode()
                        side.send_response(HttpResponse(status=200, stream_id=e.stream_id, has_body=True,
                                                        headers=(("content-length", str(len(body))),)))
                        side.send_data(e.stream_id or 0, body, end_stream=True)
            conn.sendall(side.data_to_send())
            try:
                data = conn.recv(65_536)
            except ConnectionResetError:  # curl closes with our SETTINGS ACK unread: that is its goodbye
                return
            if not data:
                return
            events = side.feed(data)
    except BaseException as e:  # surfaced by the test
        errors.append(e)
    finally:
        conn.close()


@pytest.mark.parametrize(("flag", "path", "status", "body"), [
    ("--http2", "/up", "200", "answered /up on stream 1\n"),
    ("--http2", "/admin", "403", "Access denied\r\n"),
    ("--http2-prior-knowledge", "/a/./b", "200", "answered /a/b on stream 1\n"),
    ("--http2-prior-knowledge", "/admin", "403", "Access denied\r\n"),
])
def test_real_curl_h2c_upgrade_and_prior_knowledge(flag: str, path: str, status: str, body: str) -> None:
    """curl's `Upgrade: h2c` request becomes stream 1 and is answered over HTTP/2, as is a prior-knowledge one (RFC 7540 §3.2)."""
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []
    server = threading.Thread(target=_serve_h2_directly, args=(listener, errors), daemon=True)
    server.start()
    try:
        result = subprocess.run(
            ["curl", "-sS", "--path-as-is", flag, "-w", "\n%{http_code} %{http_version}",
             f"http://127.0.0.1:{listener.getsockname()[1]}{path}"],
            capture_output=True, timeout=20, check=False)
        server.join(10)
    finally:
        listener.close()
    assert not errors, errors
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{body}\n{status} 2".encode()
