# Invariant: whenever our HTTP/1.1 parser (httptools/llhttp heads + our framing) completes a message, h11 (the
# strict reference) reads the same bytes as the same message: same method, target (after normalize_target),
# header fields, status, body bytes and message end, in the same order. Ours may reject more than h11
# (a ParseError where h11 accepts is fine); ours accepting what h11 rejects, or framing a message h11 reads
# differently, is a failure unless the difference is one of the documented LAXER_H11 cases below.
# First byte: bit 0 = direction (0 requests, 1 responses); for responses, bits 1-2 pick the request method.
"""Fuzz target: differential of parsers/http1.py against h11, both directions."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports():
        from membrane.parsers.errors import ParseError
        from membrane.parsers.events import ConnectionUpgraded, Data, EndOfMessage, HttpRequest, HttpResponse, Trailers
        from membrane.parsers.http1 import Http1Event, Http1Parser
        from membrane.parsers.http_target import normalize_target
else:
    from membrane.parsers.errors import ParseError
    from membrane.parsers.events import ConnectionUpgraded, Data, EndOfMessage, HttpRequest, HttpResponse, Trailers
    from membrane.parsers.http1 import Http1Event, Http1Parser
    from membrane.parsers.http_target import normalize_target

import h11

METHODS = ("GET", "HEAD", "POST", "CONNECT")

# A message: (kind, head fields, body); kind "req"/"resp"/"info".
Message = tuple[str, tuple[object, ...], bytes]


def _parser(direction: str, request: bytes, method: str) -> Http1Parser:
    """The parser of `direction` ("req" or "resp"); for responses, after forwarding `request` 4 times (CONNECT once)."""
    client, server = Http1Parser.pair()
    if direction == "req":
        return client
    for event in client.feed(request * (1 if method == "CONNECT" else 4)):
        if isinstance(event, HttpRequest):
            client.forward(event)
    return server


def _ours(direction: str, data: bytes, method: str) -> list[Message]:
    """Messages our parser completed before it stopped (error, need-data, or a protocol switch)."""
    request = f"{method} {'h:443' if method == 'CONNECT' else '/'} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
    events: list[Http1Event] = []
    try:
        events = _parser(direction, request, method).feed(data)
    except ParseError:
        # Re-run byte by byte to keep the messages completed before the error.
        parser = _parser(direction, request, method)
        events = []
        try:
            for i in range(len(data)):
                events.extend(parser.feed(data[i : i + 1]))
        except ParseError:
            pass
    messages: list[Message] = []
    head: tuple[object, ...] | None = None
    body = b""
    for event in events:
        if isinstance(event, HttpRequest):
            head = (event.method, event.target, _fields(event.headers))
            body = b""
        elif isinstance(event, HttpResponse):
            if event.status < 200 or event.status == 101:
                messages.append(("info", (event.status, _fields(event.headers)), b""))
                head = None
                continue
            head = (event.status, _fields(event.headers))
            body = b""
        elif isinstance(event, Data) and head is not None:
            body += event.data
        elif isinstance(event, EndOfMessage) and head is not None:
            messages.append(("req" if direction == "req" else "resp", head, body))
            head = None
        elif isinstance(event, ConnectionUpgraded):
            break
        elif isinstance(event, Trailers):
            pass
    return messages


def _fields(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple(_field(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers)


def _field(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    # h11 lower-cases the value of Transfer-Encoding (its framing field); compare it the same way.
    return (name, value.lower() if name == b"transfer-encoding" else value)


def _h11(direction: str, data: bytes, method: str) -> tuple[list[Message], bool]:
    """Messages h11 completed, and whether it raised."""
    conn = h11.Connection(h11.SERVER if direction == "req" else h11.CLIENT)
    sent = 0

    def send_request() -> None:
        nonlocal sent
        target = "h:443" if method == "CONNECT" else "/"
        conn.send(h11.Request(method=method, target=target, headers=[("Host", "h")]))
        conn.send(h11.EndOfMessage())
        sent += 1

    if direction == "resp":
        send_request()
    conn.receive_data(data)
    messages: list[Message] = []
    head: tuple[object, ...] | None = None
    body = b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                head = (event.method.decode(), event.target.decode("latin-1"), tuple(event.headers.raw_items()))
                body = b""
            elif isinstance(event, h11.InformationalResponse):
                messages.append(("info", (event.status_code, tuple(event.headers.raw_items())), b""))
                if event.status_code == 101:
                    break
            elif isinstance(event, h11.Response):
                head = (event.status_code, tuple(event.headers.raw_items()))
                body = b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                messages.append((direction, head, body))
                head = None
                if direction == "req":
                    if conn.our_state is h11.SEND_RESPONSE:
                        conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                        conn.send(h11.EndOfMessage())
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        break
                    conn.start_next_cycle()
                else:
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE or sent >= 4:
                        break
                    conn.start_next_cycle()
                    send_request()
            elif isinstance(event, h11.ConnectionClosed):
                break
    except (h11.RemoteProtocolError, h11.LocalProtocolError):
        return messages, True
    return messages, False


def _h11_normalised(message: Message) -> Message:
    kind, head, body = message
    if kind == "req":
        method, target, headers = head
        assert isinstance(target, str)
        if method != "CONNECT" and target != "*":
            try:
                target = normalize_target(target)
            except ParseError:
                target = "<rejected>"
        # h11 strips framing duplicates it accepts; compare headers as h11 reports them.
        head = (method, target, headers)
    return (kind, head, body)


def _h11_headers_view(message: Message) -> Message:
    kind, head, body = message
    if kind == "req":
        method, target, headers = head
        assert isinstance(headers, tuple)
        head = (method, target, tuple(_field(n.lower(), v) for n, v in headers))
    else:
        status, headers = head
        assert isinstance(headers, tuple)
        head = (status, tuple(_field(n.lower(), v) for n, v in headers))
    return (kind, head, body)


def check(data: bytes) -> None:
    if not data:
        return
    direction = "req" if data[0] & 1 == 0 else "resp"
    method = METHODS[(data[0] >> 1) & 3]
    payload = data[1:]
    ours = _ours(direction, payload, method)
    if not ours:
        return
    theirs, _ = _h11(direction, payload, method)
    theirs = [_h11_headers_view(_h11_normalised(m)) for m in theirs]
    for i, message in enumerate(ours):
        assert i < len(theirs), f"h11 did not complete message {i} that we accepted: {message!r}"
        assert message == theirs[i], f"message {i} differs:\n ours {message!r}\n h11  {theirs[i]!r}"


def TestOneInput(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
