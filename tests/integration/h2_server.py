"""A small h2c (prior knowledge) HTTP/2 server for tests, written directly on the `h2` library in a thread.

Answers every request with 200 and a JSON body naming the method, path and request body length;
`/big/N` answers N bytes (flow-controlled). Records every request's (method, path) in `seen`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions


class _H2Protocol(asyncio.Protocol):
    def __init__(self, server: H2TestServer) -> None:
        self.server = server
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.requests: dict[int, dict[str, Any]] = {}
        self.outbox: dict[int, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except Exception:
            self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                headers = dict(event.headers)
                self.requests[event.stream_id] = {"method": headers[":method"], "path": headers[":path"], "body": 0,
                                                  "headers": headers}
                with self.server.lock:
                    self.server.seen.append((headers[":method"], headers[":path"]))
            elif isinstance(event, h2.events.DataReceived):
                self.requests[event.stream_id]["body"] += len(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                try:
                    self._respond(event.stream_id)
                except h2.exceptions.ProtocolError:  # reset later in the same read (rapid reset): nothing to answer
                    self.outbox.pop(event.stream_id, None)
            elif isinstance(event, h2.events.WindowUpdated):
                for stream_id in list(self.outbox):
                    self._flush(stream_id)
        self.transport.write(self.conn.data_to_send())

    def _respond(self, stream_id: int) -> None:
        req = self.requests.pop(stream_id)
        if req["path"].startswith("/big/"):
            body = bytes(range(256)) * (int(req["path"].rsplit("/", 1)[1]) // 256)
        else:
            body = json.dumps({"method": req["method"], "path": req["path"], "body_len": req["body"]}).encode()
        self.conn.send_headers(stream_id, [(":status", "200"), ("content-length", str(len(body)))])
        self.outbox[stream_id] = body
        self._flush(stream_id)

    def _flush(self, stream_id: int) -> None:
        body = self.outbox[stream_id]
        while body:
            window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.outbox[stream_id] = body
                return
            self.conn.send_data(stream_id, body[:window])
            body = body[window:]
        self.conn.end_stream(stream_id)
        del self.outbox[stream_id]


class H2TestServer:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(self._loop.create_server(lambda: _H2Protocol(self), "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    def __enter__(self) -> H2TestServer:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
