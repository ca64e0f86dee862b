"""DNS reader throughput: the hand-written reader (parsers/dns.py) against a full dnslib parse, and refusal builds.

Usage: .venv/bin/python bench/parsers/dns.py   (or through bench/parsers_bench.py)
Each row: messages/s, MB/s and microseconds per message on this machine, best of 5 runs, and
`x_ref`, the speed-up over the dnslib row it is paired with (measured in the same run).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dnslib import AAAA, CNAME, EDNS0, QTYPE, RR, A, DNSRecord
from membrane.parsers.dns import DnsTcpParser, frame_tcp, read_query, read_response, refusal
from membrane.parsers.events import Direction, Reason


def _messages() -> tuple[bytes, bytes]:
    q = DNSRecord.question("api.payments.svc.cluster.local", "A")
    q.add_ar(EDNS0(udp_len=1232))
    query = bytes(q.pack())
    r = q.reply()
    r.add_answer(RR("api.payments.svc.cluster.local", QTYPE.CNAME, rdata=CNAME("lb.payments.example.net"), ttl=30))
    for i in range(4):
        r.add_answer(RR("lb.payments.example.net", QTYPE.A, rdata=A(f"10.96.0.{i + 1}"), ttl=30))
    r.add_answer(RR("lb.payments.example.net", QTYPE.AAAA, rdata=AAAA("fd00::1"), ttl=30))
    return query, bytes(r.pack())


def _rate(fn: Callable[[], object], size: int, n: int = 20000, repeat: int = 5) -> dict[str, float]:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - start)
    per_s = n / best
    return {"msg_per_s": per_s, "MB_per_s": per_s * size / 1e6, "us_per_msg": best / n * 1e6}


def _dnslib_refusal(query: bytes) -> bytes:
    q = DNSRecord.parse(query)
    reply = q.reply()
    reply.header.rcode = 5
    return bytes(reply.pack())


def run() -> list[dict[str, object]]:
    query, response = _messages()
    stream = frame_tcp(query) * 100
    parsed = read_query(query)
    pairs: list[tuple[str, Callable[[], object], str, Callable[[], object], int, int]] = [
        ("query: hand reader", lambda: read_query(query), "query: dnslib DNSRecord.parse", lambda: DNSRecord.parse(query), len(query), 20000),
        ("response (CNAME + 5 addresses): hand reader", lambda: read_response(response),
         "response: dnslib DNSRecord.parse", lambda: DNSRecord.parse(response), len(response), 10000),
        ("REFUSED from query bytes: refusal()", lambda: refusal(parsed, Reason.POLICY_DENIED),
         "REFUSED: dnslib parse + reply + pack", lambda: _dnslib_refusal(query), len(query), 20000),
    ]
    rows: list[dict[str, object]] = []
    for name, fn, ref_name, ref_fn, size, n in pairs:
        ours = _rate(fn, size, n)
        ref = _rate(ref_fn, size, max(1000, n // 4))
        rows.append({"name": name, **ours, "x_ref": ours["msg_per_s"] / ref["msg_per_s"]})
        rows.append({"name": ref_name, **ref, "x_ref": 1.0})
    tcp = _rate(lambda: DnsTcpParser(Direction.CLIENT_TO_SERVER).feed(stream), len(stream), 200)
    rows.append({"name": "TCP stream, 100 queries per feed: DnsTcpParser", "msg_per_s": tcp["msg_per_s"] * 100,
                 "MB_per_s": tcp["MB_per_s"], "us_per_msg": tcp["us_per_msg"] / 100})
    return rows


def main() -> int:
    for row in run():
        cells = " ".join(f"{k}={v:,.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "name")
        print(f"{row['name']:46s} {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
