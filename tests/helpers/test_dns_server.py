"""The test DNS server (tests/helpers/dns_server.py) answers real clients over UDP and TCP on loopback."""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Iterator

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.helpers.dns_server import DnsServer

ZONE = """
www.example.test. 60 IN CNAME edge.example.test.
edge.example.test. 30 IN A 192.0.2.10
edge.example.test. 30 IN A 192.0.2.11
edge.example.test. 30 IN AAAA 2001:db8::10
"""


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as s:
        yield s


def _addresses(m: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in m.answer if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for rd in rrset)


def test_udp_and_tcp_answer_with_cname_chain(server: DnsServer) -> None:
    """A query over UDP and over TCP gets the CNAME and the target's addresses (RFC 1034 §4.3.2)."""
    host, port = server.address
    q = dns.message.make_query("WWW.Example.Test.", "A")
    for answer in (dns.query.udp(q, host, port=port, timeout=2), dns.query.tcp(q, host, port=port, timeout=2)):
        assert answer.rcode() == dns.rcode.NOERROR
        assert answer.flags & dns.flags.AA
        assert _addresses(answer) == ["192.0.2.10", "192.0.2.11"]
        assert answer.answer[0].rdtype == dns.rdatatype.CNAME
    assert [(x.transport, x.name) for x in server.queries] == [("udp", "WWW.Example.Test."), ("tcp", "WWW.Example.Test.")]


def test_nxdomain_and_behaviour_overrides(server: DnsServer) -> None:
    """Unknown names are NXDOMAIN; set_behaviour forces an rcode or drops the query (for timeout tests)."""
    host, port = server.address
    assert dns.query.udp(dns.message.make_query("nope.example.test.", "A"), host, port=port, timeout=2).rcode() == dns.rcode.NXDOMAIN
    server.set_behaviour("edge.example.test", rcode=dns.rcode.SERVFAIL)
    assert dns.query.tcp(dns.message.make_query("edge.example.test.", "A"), host, port=port, timeout=2).rcode() == dns.rcode.SERVFAIL
    server.set_behaviour("edge.example.test", drop=True)
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(dns.message.make_query("edge.example.test.", "A"), host, port=port, timeout=0.3)


def test_several_queries_on_one_tcp_connection(server: DnsServer) -> None:
    """Pipelined queries on one TCP connection are all answered, in order (RFC 7766 §6.2.1)."""
    host, port = server.address
    queries = [dns.message.make_query(name, "A") for name in ("www.example.test.", "edge.example.test.", "x.example.test.")]
    wire = b"".join(struct.pack(">H", len(w)) + w for w in (q.to_wire() for q in queries))
    with socket.create_connection((host, port), timeout=2) as conn:
        for i in range(0, len(wire), 7):  # split across many segments
            conn.sendall(wire[i : i + 7])
        answers: list[dns.message.Message] = []
        buffer = b""
        while len(answers) < 3:
            buffer += conn.recv(4096)
            while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack(">H", buffer[:2])[0]:
                length = struct.unpack(">H", buffer[:2])[0]
                answers.append(dns.message.from_wire(buffer[2 : 2 + length]))
                buffer = buffer[2 + length :]
    assert [a.id for a in answers] == [q.id for q in queries]
    assert [a.rcode() for a in answers] == [dns.rcode.NOERROR, dns.rcode.NOERROR, dns.rcode.NXDOMAIN]


def test_large_udp_answer_is_truncated_then_complete_over_tcp() -> None:
    """An answer over 512 bytes comes back with TC over UDP and whole over TCP (RFC 1035 §4.2.1, RFC 7766 §5)."""
    zone = "\n".join(f"big.example.test. 60 IN A 10.0.{i // 250}.{i % 250}" for i in range(60))
    with DnsServer(zone) as server:
        host, port = server.address
        q = dns.message.make_query("big.example.test.", "A")
        udp = dns.query.udp(q, host, port=port, timeout=2, ignore_trailing=True)
        assert udp.flags & dns.flags.TC
        tcp = dns.query.tcp(q, host, port=port, timeout=2)
        assert not tcp.flags & dns.flags.TC
        assert len(_addresses(tcp)) == 60


def test_dig_over_udp_and_tcp(server: DnsServer) -> None:
    """dig (a real resolver client) reads the answers over both transports."""
    host, port = server.address
    for extra in ([], ["+tcp"]):
        out = subprocess.run(["dig", f"@{host}", "-p", str(port), "+short", "+time=2", "+tries=1", *extra, "www.example.test", "AAAA"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.split()
        assert out == ["edge.example.test.", "2001:db8::10"]


def test_ipv6_loopback_and_loopback_only() -> None:
    """The server also binds ::1, and refuses any non-loopback address."""
    with DnsServer(ZONE, host="::1") as server:
        host, port = server.address
        answer = dns.query.udp(dns.message.make_query("edge.example.test.", "AAAA"), host, port=port, timeout=2)
        assert _addresses(answer) == ["2001:db8::10"]
    with pytest.raises(ValueError):
        DnsServer(ZONE, host="10.1.2.3")


def test_stop_closes_the_port() -> None:
    """After stop() nothing listens on the port any more."""
    server = DnsServer(ZONE).start()
    host, port = server.address
    server.stop()
    with pytest.raises(OSError), socket.create_connection((host, port), timeout=1):
        pass
