"""The flows formatter process (proxy/flowproc.py): the lines a worker would have written, off its GIL, bounded,
and a child that never outlives its worker nor leaks a descriptor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from membrane.proxy.flows import (
    DROPPED,
    REQUEST,
    Flow,
    FlowContext,
    FlowSink,
    L3L4Flow,
    Peer,
    RotatingFile,
    Workload,
    l7_dns,
    l7_http,
    reused_l7,
)
from membrane.proxy.metrics import Metrics

from tests.proxy.hubble_schema import schema_validator
from tests.proxy.test_flows import CTX, _flow, _variants

ROOT = Path(__file__).resolve().parents[2]


def _process_sink(path: Path, **kwargs: Any) -> tuple[FlowSink, list[Callable[[], None]]]:
    """A sink writing `path` through a formatter process, its loop passes run by hand (the test is the loop)."""
    sink = FlowSink([RotatingFile(str(path))], node_name="node-1", **kwargs)
    scheduled: list[Callable[[], None]] = []
    sink.start_writer(scheduled.append, process=True)
    assert sink._process is not None, "the formatter process did not start"
    return sink, scheduled


def _end_pass(scheduled: list[Callable[[], None]]) -> None:
    while scheduled:
        scheduled.pop()()


def _gone(pid: int) -> bool:
    """True once `pid` no longer runs (exited, or a zombie nobody reaps)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _wait_gone(pid: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@dataclass(kw_only=True)  # not slots=True: Flow may be compiled (native/modules.txt)
class _Reshaped(Flow):
    """A subclass with a shape of its own (as control/drops.py's DropFlow): formatted in the worker."""

    def to_json(self) -> dict[str, Any]:
        out = Flow.to_json(self)
        out["Summary"] = "reshaped"
        return out


def _all_shapes() -> list[Flow]:
    wide = FlowContext(
        source=Peer(ip="10.0.0.1", port=1, identity=5, namespace="a", pod_name="p", labels=("k8s:x=y", "k8s:a=b"),
                    endpoint_id=12, workloads=(Workload(name="web", kind="Deployment"),), cluster_name="c1"),
        destination=Peer(ip="10.0.0.2", port=2), source_names=("x.example.",), destination_names=("y.example.",),
    )
    answer = reused_l7(l7_dns(query="a.example.", qtypes=["A"], rcode=0, ips=["10.0.0.9"], ttl=30, rrtypes=["A"]))
    return [
        *_variants(),
        Flow(context=wide, verdict="FORWARDED", l7_type="RESPONSE", l7=answer, summary="DNS Answer", time_ns=8),
        Flow(context=wide, verdict="FORWARDED", l7_type="RESPONSE", l7=answer, summary="DNS Answer", time_ns=10),
        Flow(context=wide, verdict="FORWARDED", l7_type="RESPONSE", latency_ns=5, time_ns=7, summary="named",
             l7=l7_http(method="GET", url="/", protocol="HTTP/1.1", code=200), rule="a/p: ingress[0]",
             matched=("a/q: ingress[1]",), policy_revision=3),
        L3L4Flow(context=wide, verdict=DROPPED, l7_type=REQUEST, l7={}, summary="dropped", time_ns=9,
                 rule="a/p: ingressDeny[0]", policy_match_type=2, membrane_reason="ingress_denied"),
        _Reshaped(context=CTX, verdict=DROPPED, l7_type=REQUEST, l7={}, summary="x", time_ns=11),
    ]


def test_lines_are_byte_for_byte_the_workers(tmp_path: Path) -> None:
    """Every record shape (HTTP both ways, DNS, Kafka, no L7, endpoints with every field, names, policy lists, an
    L3/L4 drop, a reshaping subclass) is written by the formatter process exactly as to_line() makes it here,
    in order, and valid against Hubble's schema; the uuid in the file is the one `membrane observe` shows."""
    path = tmp_path / "flows.jsonl"
    sink, scheduled = _process_sink(path)
    flows = _all_shapes() * 3
    for n, flow in enumerate(flows):
        sink.emit(flow)
        if n % 4 == 3:
            _end_pass(scheduled)
    sink.flush()  # returns when the process has written and flushed everything
    expected = "".join(flow.to_line("node-1") for flow in flows)
    assert path.read_text() == expected
    validator = schema_validator()
    for line in expected.splitlines():
        validator.validate(json.loads(line))
    ring_ids = [record.to_json()["uuid"] for record in sink.records()]
    assert ring_ids == [json.loads(line)["flow"]["uuid"] for line in expected.splitlines()]
    sink.close()
    assert path.read_text() == expected


def test_records_go_to_the_process_as_tuples_and_the_worker_formats_none(tmp_path: Path) -> None:
    """The worker sends plain records, not JSON: its HTTP JSON cache stays empty however many records pass."""
    from membrane.proxy import flows as flows_module

    flows_module._HTTP_JSON.clear()
    sink, scheduled = _process_sink(tmp_path / "flows.jsonl")
    for n in range(50):
        sink.emit(_flow(n))
    _end_pass(scheduled)
    assert flows_module._HTTP_JSON == {}
    sink.close()
    assert len((tmp_path / "flows.jsonl").read_text().splitlines()) == 50


def test_a_stalled_process_drops_and_counts_and_never_blocks(tmp_path: Path) -> None:
    """With the formatter stopped (SIGSTOP), the pipe fills, then at most max_queue records wait in the worker:
    a pass beyond that is dropped and counted (membrane_flows_dropped_total); the ring still gets every record;
    once it runs again, every record not dropped is written, in order."""
    path = tmp_path / "flows.jsonl"
    metrics = Metrics()
    sink, scheduled = _process_sink(path, max_queue=200)
    sink.on_dropped = metrics.flows_dropped.inc
    process = sink._process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        big = "x" * 2000  # ~2 kB a record: the 1 MiB pipe fills after a few hundred
        n = 0
        while sink.dropped == 0:
            ctx = FlowContext(source=Peer(ip="10.0.0.1", port=n + 1), destination=CTX.destination)  # a connection a pass
            for _ in range(10):
                sink.emit(Flow(context=ctx, verdict="FORWARDED", l7_type=REQUEST, l7={}, summary=f"{n} {big}", time_ns=n))
                n += 1
            _end_pass(scheduled)  # never blocks: the test would hang here otherwise
            assert n < 100_000, "nothing was ever dropped"
        assert sink.dropped == 10 and metrics.flows_dropped.get() == 10
        assert "membrane_flows_dropped_total 10" in metrics.exposition()
        assert len(sink.records()) == n
    finally:
        os.kill(process.pid, signal.SIGCONT)
    sink.flush()
    for k in range(n, n + 5):  # what the dropped pass defined (its connection's context) is sent again
        sink.emit(Flow(context=ctx, verdict="FORWARDED", l7_type=REQUEST, l7={}, summary=f"{k} after", time_ns=k))
    _end_pass(scheduled)
    sink.close()
    numbers = [int(json.loads(line)["flow"]["Summary"].split()[0]) for line in path.read_text().splitlines()]
    assert numbers == [k for k in range(n + 5) if not n - 10 <= k < n]
    assert sink.write_errors == 0


def test_close_flushes_reaps_the_child_and_leaks_no_descriptor(tmp_path: Path) -> None:
    """close() writes what was emitted (even records still in the worker's pass), the child exits and is reaped,
    and the worker holds no descriptor more than before."""
    fds_before = set(os.listdir("/proc/self/fd"))
    path = tmp_path / "flows.jsonl"
    stream = RotatingFile(str(path))
    sink = FlowSink([stream], node_name="n")
    scheduled: list[Callable[[], None]] = []
    sink.start_writer(scheduled.append, process=True)
    process = sink._process
    assert process is not None
    for n in range(100):
        sink.emit(_flow(n))
    sink.close()  # the pass was never run by the "loop": close sends it
    assert process._child.returncode == 0
    assert _gone(process.pid)
    stream.close()
    assert set(os.listdir("/proc/self/fd")) == fds_before
    assert [json.loads(line)["flow"]["l7"]["http"]["url"] for line in path.read_text().splitlines()] == [
        f"http://a/{n}" for n in range(100)]


def test_a_dead_formatter_falls_back_to_writing_in_the_worker(tmp_path: Path) -> None:
    """If the child dies (killed), the sink notices at the next pass, counts the records it lost and writes the
    following ones itself: flows are never lost for good, and traffic never stops."""
    path = tmp_path / "flows.jsonl"
    sink, scheduled = _process_sink(path)
    sink.emit(_flow(0))
    sink.flush()
    process = sink._process
    assert process is not None
    os.kill(process.pid, signal.SIGKILL)
    assert _wait_gone(process.pid)
    for n in range(1, 4):
        sink.emit(_flow(n))
        _end_pass(scheduled)
    assert sink._process is None
    sink.emit(_flow(9))
    _end_pass(scheduled)
    sink.close()
    urls = [json.loads(line)["flow"]["l7"]["http"]["url"] for line in path.read_text().splitlines()]
    assert urls[0] == "http://a/0" and urls[-1] == "http://a/9"
    assert sink.write_errors >= 1


_WORKER = textwrap.dedent("""
    import os, sys, time
    from membrane.proxy.flows import FlowSink, RotatingFile
    from tests.proxy.test_flows import _flow
    sink = FlowSink([RotatingFile(sys.argv[1])], node_name="n")
    scheduled = []
    sink.start_writer(scheduled.append, process=True)
    holder = None
    if sys.argv[2] == "fork":  # a forked process keeps the pipe's write end open: end of file never comes
        holder = os.fork()
        if holder == 0:
            time.sleep(600)
            os._exit(0)
    for n in range(20):
        sink.emit(_flow(n))
    scheduled.pop()()
    print(sink._process.pid, holder or 0, flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("holder", ["none", "fork"])
def test_the_formatter_dies_with_its_worker(tmp_path: Path, holder: str) -> None:
    """SIGKILL of the worker ends its formatter process, which writes what it had been sent first: by end of file
    on the pipe, or (when a forked process still holds the pipe open) by the parent-death signal."""
    path = tmp_path / "flows.jsonl"
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, str(path), holder], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    fork_pid = 0
    try:
        assert worker.stdout is not None
        child_pid, fork_pid = (int(v) for v in worker.stdout.readline().split())
        assert not _gone(child_pid)
        worker.kill()
        worker.wait()
        assert _wait_gone(child_pid), "the formatter process outlived its worker"
        urls = [json.loads(line)["flow"]["l7"]["http"]["url"] for line in path.read_text().splitlines()]
        assert urls == [f"http://a/{n}" for n in range(20)]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if fork_pid:
            os.kill(fork_pid, signal.SIGKILL)
