"""Kafka produce throughput for the bench: kafka-python producing to the test suite's Kafka-protocol broker.

No Kafka broker can be installed here, so the broker is tests/helpers/kafka_broker.py (written for the test suite),
run as its own process. A client learns broker addresses from Metadata, so for a proxied run the broker listens on
its fixed port (the one the policy names) but advertises the proxy's port: the client then sends every request
through the proxy. The broker is therefore restarted for each run with the right advertised port. The producer
runs in its own process too, so neither shares a GIL with the harness.

    .venv/bin/python bench/kafka_bench.py broker --port 19092 --advertise-port PORT
    .venv/bin/python bench/kafka_bench.py produce --port PORT --duration 10
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_bench import Result
from peers import HOST, PORTS, REPO_DIR, Stack, Unavailable, wait_tcp

MESSAGE_BYTES = 1024
TOPIC = "bench"
BROKER_MODULE = "membrane.sandbox.kafka_broker"
PYTHON = str(REPO_DIR / ".venv" / "bin" / "python") if (REPO_DIR / ".venv" / "bin" / "python").exists() else sys.executable


def _broker_module() -> ModuleType:
    if str(REPO_DIR) not in sys.path:
        sys.path.insert(0, str(REPO_DIR))
    try:
        return importlib.import_module(BROKER_MODULE)
    except ImportError as exc:
        raise Unavailable(f"test Kafka broker {BROKER_MODULE} not available yet ({exc})") from exc


def require_broker() -> None:
    """Raises Unavailable while tests/helpers/kafka_broker.py does not exist (or does not import)."""
    if not (REPO_DIR / "tests" / "helpers" / "kafka_broker.py").exists():
        raise Unavailable(f"test Kafka broker {BROKER_MODULE} not written yet")
    _broker_module()


def serve_broker(port: int, advertise_port: int) -> None:
    """Runs the test broker on 127.0.0.1:port advertising advertise_port, until SIGTERM/SIGINT."""
    module = _broker_module()
    broker_cls: Any = next((obj for name, obj in vars(module).items()
                            if inspect.isclass(obj) and name.endswith("Broker") and obj.__module__ == module.__name__),
                           None)
    if broker_cls is None:
        raise Unavailable(f"{BROKER_MODULE} has no *Broker class")
    params = inspect.signature(broker_cls).parameters
    kwargs: dict[str, Any] = {}
    for name, value in (("host", HOST), ("port", port), ("advertised_port", advertise_port),
                        ("advertise_port", advertise_port), ("advertised_host", HOST), ("advertise_host", HOST)):
        if name in params:
            kwargs[name] = value
    if advertise_port != port and not ({"advertised_port", "advertise_port"} & kwargs.keys()):
        raise Unavailable(f"{broker_cls.__name__} cannot advertise another port (needed to proxy every request)")
    broker = broker_cls(**kwargs)
    stop = threading.Event()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if hasattr(broker, "__enter__"):
        with broker:
            print(f"broker ready on {HOST}:{port}", flush=True)
            stop.wait()
    else:
        broker.start()
        try:
            stop.wait()
        finally:
            broker.stop()


def produce_for(port: int, duration_s: float) -> dict[str, float]:
    """kafka-python producer: MESSAGE_BYTES messages to TOPIC for duration_s, acks=1; returns rates and errors."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=f"{HOST}:{port}", acks=1, linger_ms=5, batch_size=65536,
                             max_request_size=1 << 20,
                             request_timeout_ms=10000)
    payload = b"x" * MESSAGE_BYTES
    errors = 0

    def failed(exc: BaseException) -> None:
        nonlocal errors
        errors += 1

    try:
        producer.send(TOPIC, payload).get(timeout=10)  # metadata and first batch, outside the timed part
        sent = 0
        t0 = time.perf_counter()
        deadline = t0 + duration_s
        while time.perf_counter() < deadline:
            for _ in range(100):
                producer.send(TOPIC, payload).add_errback(failed)
            sent += 100
        producer.flush(timeout=30)
        elapsed = time.perf_counter() - t0
    finally:
        producer.close(timeout=5)
    acked = sent - errors
    return {"messages": acked, "errors": errors, "seconds": elapsed,
            "msgs_s": acked / elapsed, "mb_s": acked * MESSAGE_BYTES / elapsed / 1e6}


def produce(port: int, *, duration_s: float) -> Result:
    """One measured run: a fresh broker advertising `port`, a producer process sending through `port`."""
    require_broker()
    broker_argv = [PYTHON, str(Path(__file__).resolve()), "broker", "--port", str(PORTS["kafka"]),
                   "--advertise-port", str(port)]
    producer_argv = [PYTHON, str(Path(__file__).resolve()), "produce", "--port", str(port), "--duration",
                     f"{duration_s:g}"]
    with Stack() as stack:
        broker = stack.spawn("kafka-broker", broker_argv)
        wait_tcp(broker, PORTS["kafka"])
        done = subprocess.run(producer_argv, capture_output=True, text=True, timeout=duration_s + 90, cwd=REPO_DIR)
        if done.returncode != 0:
            raise RuntimeError(f"producer exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}; "
                               f"broker: {broker.log_tail(5)}")
    values = json.loads(done.stdout.strip().splitlines()[-1])
    shown = " & ".join(" ".join(a.replace(str(REPO_DIR) + "/", "") for a in argv) for argv in
                       (broker_argv, producer_argv))
    note = f"{values['errors']:.0f} failed sends" if values["errors"] else ""
    return Result(command=shown, values=values, note=note)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Kafka produce bench pieces (broker, producer)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("broker", help="run the test broker until SIGTERM")
    b.add_argument("--port", type=int, default=PORTS["kafka"])
    b.add_argument("--advertise-port", type=int)
    p = sub.add_parser("produce", help="produce for a while, print one JSON line")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--duration", type=float, default=10)
    args = parser.parse_args(argv)
    if args.cmd == "broker":
        serve_broker(args.port, args.advertise_port or args.port)
    else:
        print(json.dumps(produce_for(args.port, args.duration)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
