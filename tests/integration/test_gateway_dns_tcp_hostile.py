"""DNS over TCP under hostile input through `membrane gateway` (issue 13 item 5), dnspython messages on raw sockets.

Case table
| what | expected |
|---|---|
| two valid queries then a frame whose length is under a header, in one write | both answered, then EOF |
| four times MAX_TCP_QUERIES_OUTSTANDING pipelined in one write (a resolver, dnsperf) | every query answered NOERROR by the server, never more than the bound outstanding upstream at once |
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import dns.message
import dns.rcode
import pytest
from membrane.parsers.dns import MAX_TCP_QUERIES_OUTSTANDING

from tests.helpers.dns_server import DnsServer
from tests.integration.gateway_util import gateway
from tests.integration.test_gateway_dns import ZONE, dns_policy

pytestmark = pytest.mark.integration


def _framed(message: dns.message.Message) -> bytes:
    wire = message.to_wire()
    return struct.pack(">H", len(wire)) + wire


def _answers(data: bytes) -> list[dns.message.Message]:
    out = []
    while len(data) >= 2:
        n = struct.unpack(">H", data[:2])[0]
        if len(data) < 2 + n:
            break
        out.append(dns.message.from_wire(data[2 : 2 + n]))
        data = data[2 + n :]
    return out


def _read_to_eof(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_answers_before_a_broken_frame_are_sent(tmp_path: Path) -> None:
    """Two valid queries and a broken frame in one write: both answers arrive before the proxy closes."""
    with DnsServer(ZONE) as server, gateway(
        tmp_path, dns_policy(server.port), upstream_port=server.port, dst="kube-system/coredns", src="default/crawler"
    ) as gw:
        q1 = dns.message.make_query("www.cilium.io", "A")
        q2 = dns.message.make_query("api.github.com", "A")
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(_framed(q1) + _framed(q2) + b"\x00\x05hello")
            answers = _answers(_read_to_eof(sock))
        assert sorted((a.id, a.rcode()) for a in answers) == sorted([(q1.id, dns.rcode.NOERROR), (q2.id, dns.rcode.NOERROR)])


def test_pipelined_queries_beyond_the_bound_are_all_answered(tmp_path: Path) -> None:
    """4 x MAX_TCP_QUERIES_OUTSTANDING queries pipelined at once: none is refused; the proxy holds the ones past
    the bound (reading paused) and forwards them as answers come back, so every query reaches the server and
    is answered NOERROR, and the server never sees more than the bound waiting on the proxy's connection."""
    with DnsServer(ZONE) as server, gateway(
        tmp_path, dns_policy(server.port), upstream_port=server.port, dst="kube-system/coredns", src="default/crawler"
    ) as gw:
        queries = [dns.message.make_query("www.cilium.io", "A") for _ in range(4 * MAX_TCP_QUERIES_OUTSTANDING)]
        for i, q in enumerate(queries):
            q.id = i + 1
        with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as sock:
            sock.sendall(b"".join(_framed(q) for q in queries))
            data = b""
            while len(_answers(data)) < len(queries):
                chunk = sock.recv(65536)
                assert chunk
                data += chunk
        rcodes = {a.id: a.rcode() for a in _answers(data)}
        assert sorted(rcodes) == [q.id for q in queries]
        assert set(rcodes.values()) == {dns.rcode.NOERROR}
        assert len(server.queries) == len(queries)
        assert 0 < server.max_tcp_unanswered <= MAX_TCP_QUERIES_OUTSTANDING
