"""HTTP/2 limits as the session applies them (issue 13 item 5), sans-I/O.

Case table
| input | expected |
|---|---|
| a PING flood on one connection | GOAWAY ENHANCE_YOUR_CALM forwarded to the client, an ERROR flow naming the limit, close |
| HEADERS without END_HEADERS | reading_head True (the header timeout runs) until the CONTINUATION ends the block |
| rapid reset spread over connections from one address | the connection that crosses the summed rule is cut with ENHANCE_YOUR_CALM |
| a further connection from that address, preface and a burst in one read | cut before anything is parsed: GOAWAY, the limit's flow, nothing forwarded upstream |
| ResetLedger | the rule on sums; counts halve each window; other addresses untouched |
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import membrane.parsers.http2
import pytest
from membrane.parsers.events import Direction
from membrane.parsers.http2 import CONTROL_FRAME_BURST
from membrane.proxy.session import Close, DataReceived, Forward, Log
from membrane.proxy.session_http2 import RESET_WINDOW_S, Http2Session, ResetLedger

from tests.helpers.frames import FrameBuilder, client_preface, request_headers
from tests.proxy.test_session import HTTP_POLICY, INFO, _gateway, session_factory


@pytest.fixture(autouse=True, params=["lean", "h2"])
def http2_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs on the lean frame layer and on h2, the reference (issue 11 item 4)."""
    monkeypatch.setattr(membrane.parsers.http2, "LEAN_BY_DEFAULT", request.param == "lean")
    return str(request.param)


C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT


def _h2_session(resets: ResetLedger | None = None, clock: Any = None) -> Http2Session:
    base = session_factory(_gateway(HTTP_POLICY, src="default/backend", dst="default/frontend", port=80),
                           "10.244.1.10")(INFO)
    kwargs: dict[str, Any] = {"resets": resets}
    if clock is not None:
        kwargs["clock"] = clock
    session = Http2Session(context=base.context, policy=base.policy, **kwargs)
    session.start()
    return session


def _goaway_codes(actions: list[Any]) -> list[int]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    data = b"".join(a.data for a in actions if isinstance(a, Forward) and a.direction is S2C)
    return [int(e.error_code) for e in client.receive_data(data) if isinstance(e, h2.events.ConnectionTerminated)]


def test_ping_flood_is_cut_with_enhance_your_calm_and_counted() -> None:
    """A PING flood gets GOAWAY ENHANCE_YOUR_CALM, an ERROR flow whose `limit` the server counts and logs, and a close."""
    session = _h2_session(clock=lambda: 0)
    b = FrameBuilder()
    flood = client_preface(b) + b"".join(b.ping(i.to_bytes(8, "big")) for i in range(CONTROL_FRAME_BURST + 10))
    actions = session.handle(DataReceived(C2S, flood))
    assert _goaway_codes(actions) == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
    (flow,) = [a.flow for a in actions if isinstance(a, Log)]
    assert flow.verdict == "ERROR"
    assert flow.limit == "control_frames"
    assert actions[-1] == Close()


def test_pending_header_block_is_a_head_being_read() -> None:
    """While a header block waits for END_HEADERS, reading_head is True so the server's header timeout applies."""
    session = _h2_session()
    b = FrameBuilder()
    frames = b.headers_split(1, request_headers("/api", extra=[("x-pad", "z" * 200)]), pieces=2, end_stream=True)
    first = int.from_bytes(frames[:3], "big") + 9
    session.handle(DataReceived(C2S, client_preface(b)))
    assert not session.reading_head
    session.handle(DataReceived(C2S, frames[:first]))
    assert session.reading_head
    session.handle(DataReceived(C2S, frames[first:]))
    assert not session.reading_head


def _reset_burst(session: Http2Session, b: FrameBuilder, first_sid: int, n: int) -> list[Any]:
    data = b"".join(b.headers(sid, request_headers("/api"), end_stream=True) + b.rst_stream(sid)
                    for sid in range(first_sid, first_sid + 2 * n, 2))
    return session.handle(DataReceived(C2S, data))


def test_rapid_reset_across_connections_is_cut() -> None:
    """Four connections from one address, each resetting 150 streams (under the per-connection rule of 500):
    the one that takes the sum past 500 gets GOAWAY ENHANCE_YOUR_CALM."""
    ledger = ResetLedger()
    cut = []
    for _ in range(4):
        session = _h2_session(resets=ledger, clock=lambda: 10**9)
        b = FrameBuilder()
        session.handle(DataReceived(C2S, client_preface(b)))
        actions = _reset_burst(session, b, 1, 150)
        cut.append(session.closed)
        if session.closed:
            assert _goaway_codes(actions) == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
            assert [a.flow.limit for a in actions if isinstance(a, Log) and a.flow.limit] == \
                ["rapid_reset_across_connections"]
    assert cut == [False, False, False, True]
    assert ledger.over(session.context.source.ip, 10**9)
    session = _h2_session(resets=ledger, clock=lambda: 10**9)
    b = FrameBuilder()
    burst = b"".join(b.headers(sid, request_headers("/api"), end_stream=True) + b.rst_stream(sid) for sid in range(1, 301, 2))
    actions = session.handle(DataReceived(C2S, client_preface(b) + burst))
    assert session.closed
    assert _goaway_codes(actions) == [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM]
    assert [a for a in actions if isinstance(a, Forward) and a.direction is C2S] == []  # no stream went upstream
    assert [a.flow.limit for a in actions if isinstance(a, Log)] == ["rapid_reset_across_connections"]


def test_reset_ledger_rule_decay_and_isolation() -> None:
    """The rule holds on sums per address; counts halve every window; another address is not affected."""
    ledger = ResetLedger(min_streams=100)
    assert not ledger.over("10.0.0.1", 0)
    assert not ledger.note("10.0.0.1", 60, 60, 0)
    assert ledger.note("10.0.0.1", 40, 40, 1)
    assert not ledger.note("10.0.0.2", 10, 10, 2)
    later = int(3 * RESET_WINDOW_S * 1e9)
    assert not ledger.note("10.0.0.1", 0, 1, later)  # 100 opened / 100 reset halved three times: 12 and 12 (+1)
    assert not ledger.note("10.0.0.1", 100, 0, later)  # 112 opened, 13 reset: well under half
    assert not ledger.over("10.0.0.3", later)  # an address never seen is not over, and asking adds no entry
    assert "10.0.0.3" not in ledger._by_ip
