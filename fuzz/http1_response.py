# Invariant: for any bytes answering up to three forwarded requests (methods chosen by the first byte),
# Http1Parser(SERVER_TO_CLIENT).feed() and feed_eof() return events or raise ParseError, never another
# exception; whole-input, byte-at-a-time and split-in-two feeding give the same events (body Data merged) and
# the same outcome; held bytes never exceed max_header_bytes; a response to HEAD, a 1xx, 204 or 304 never
# yields Data; and what forward() writes for the accepted events parses back to the same events.
"""Fuzz target: HTTP/1.1 responses (parsers/http1.py, server-to-client direction, framed by request method)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports():
        from membrane.parsers.errors import ParseError
        from membrane.parsers.events import ConnectionUpgraded, Data, EndOfMessage, HttpRequest, HttpResponse
        from membrane.parsers.http1 import Http1Event, Http1Parser
else:
    from membrane.parsers.errors import ParseError
    from membrane.parsers.events import ConnectionUpgraded, Data, EndOfMessage, HttpRequest, HttpResponse
    from membrane.parsers.http1 import Http1Event, Http1Parser

MAX_HEADER_BYTES = 2048
# Request kinds the first byte picks (two bits per request, three requests; a switch proposal ends the list).
KINDS = (
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
)


def requests_for(selector: int) -> list[bytes]:
    chosen = []
    for i in range(3):
        kind = (selector >> (2 * i)) & 3
        chosen.append(KINDS[kind])
        if kind >= 2:
            break
    return chosen


def _merge(events: list[Http1Event]) -> list[Http1Event]:
    out: list[Http1Event] = []
    for event in events:
        if isinstance(event, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(data=out[-1].data + event.data)
        else:
            out.append(event)
    return out


def connection(selector: int, small: bool = True) -> tuple[Http1Parser, list[str]]:
    """The SERVER_TO_CLIENT parser after its client parser forwarded the requests `selector` picks."""
    client, server = Http1Parser.pair(max_header_bytes=MAX_HEADER_BYTES, max_line_bytes=1024) if small else Http1Parser.pair()
    methods = []
    for event in client.feed(b"".join(requests_for(selector))):
        if isinstance(event, HttpRequest):
            client.forward(event)
            methods.append(event.method)
    return server, methods


def _run(
    selector: int, chunks: list[bytes], eof: bool, small: bool = True
) -> tuple[list[Http1Event], bool, Http1Parser]:
    conn, _ = connection(selector, small)
    events: list[Http1Event] = []

    try:
        for chunk in chunks:
            events.extend(conn.feed(chunk))
            assert len(conn._buf) <= MAX_HEADER_BYTES
        if eof:
            events.extend(conn.feed_eof())
    except ParseError:
        return _merge(events), True, conn
    return _merge(events), False, conn


def _same_outcome(whole: list[Http1Event], failed: bool, events: list[Http1Event], chunk_failed: bool) -> None:
    """Equal events and outcome; a ParseError drops the events of the call that raised, so when the input
    fails, the whole-input events are a prefix of the chunked ones (which failed too)."""
    assert chunk_failed == failed, (failed, whole, events)
    if not failed:
        assert events == whole, (events, whole)
    else:
        prefix = events[: len(whole)]
        if whole and isinstance(whole[-1], Data) and isinstance(prefix[-1], Data):
            assert prefix[-1].data.startswith(whole[-1].data)
            prefix, whole = prefix[:-1], whole[:-1]
        assert prefix == whole, (events, whole)


def check(data: bytes) -> None:
    if not data:
        return
    selector, body, eof = data[0], data[1:], bool(data[0] & 0x80)
    whole, failed, conn = _run(selector, [body], eof)
    for chunks in ([body[i : i + 1] for i in range(len(body))], [body[: len(body) // 2], body[len(body) // 2 :]]):
        events, chunk_failed, _ = _run(selector, chunks, eof)
        _same_outcome(whole, failed, events, chunk_failed)
    _, methods = connection(selector)
    bodiless = False
    tunnel = False
    final = 0
    for event in whole:
        if isinstance(event, HttpResponse):
            method = methods[final] if final < len(methods) else "?"
            bodiless = method == "HEAD" or event.status < 200 or event.status in (204, 304)
            if event.status >= 200:
                final += 1
        elif isinstance(event, ConnectionUpgraded):
            tunnel = True
        elif isinstance(event, Data) and not tunnel:
            assert not bodiless, "body on a bodiless response"
        elif isinstance(event, EndOfMessage):
            bodiless = False
    wire = b"".join(conn.forward(e) for e in whole)
    again, again_failed, _ = _run(selector, [wire], eof, small=False)
    if not failed:
        assert not again_failed, (again, whole)
        assert again == whole, (again, whole)


def TestOneInput(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
