"""Restart under load (issue 13 item 6): what a SIGKILL of the agent costs, and whether anything slips through.

In network namespaces (frontend serving HTTP on :80 under examples/policies/http.yaml; backend allowed
GET /api, denied /v2/items at L7; debug denied at L3/L4), three probes run throughout:
- backend: a new HTTP connection every 20 ms to the allowed path (`/api`), and to the L7-denied path;
- debug: UDP datagrams to frontend at ~500/s (the policy denies them).
The agent is SIGKILLed, a new one is started at once (as a DaemonSet restarts it), and the run goes on
until the new agent has served allowed requests for a second. Reported per round (medians over rounds):
- blackout: from the SIGKILL to the first allowed request answered 200 again (new L7 connections fail
  meanwhile: no proxy), and how much of it was the new agent's start-up;
- denied passes: L7-denied requests answered 200, and debug datagrams received (the goal: 0 and 0).

With --mode handover, the first agent is not killed: a second `membrane run` takes over from it
(control/handover.py) while the backend pod runs LOAD_CLIENT (new connections and one keep-alive
connection to the allowed path, new connections to the denied path, each as fast as it goes) and the
debug pod keeps sending datagrams. Reported: requests that failed (goal 0), keep-alive requests
retried on a new connection after the old agent closed the idle connection, denied requests not
answered 403 (goal 0), datagrams received (goal 0), the time from starting the second agent to its
`agent ready`, and the first agent's exit status and time to exit after that.

    .venv/bin/python bench/restart_bench.py [--rounds 3] [--mode kill|handover] [--workers N]     (root)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.helpers: the topology and the probes the restart tests use

from membrane.sandbox.live_demo import HTTP_SERVER, private_bpffs, start_agent  # noqa: E402

from tests.helpers.netns import topology  # noqa: E402
from tests.helpers.probes import HTTP_PROBER, LOAD_CLIENT, RECEIVER, SENDER  # noqa: E402

POLICY = ROOT / "examples" / "policies" / "http.yaml"


def _endpoints(topo: object) -> str:
    lines = ["endpoints:"]
    for name, pod in topo.pods.items():  # type: ignore[attr-defined]
        lines += [f"  - name: {name}", f"    labels: {{app: {name}}}", f"    ips: [{pod.ipv4}, {pod.ipv6}]",
                  f"    interface: {pod.host_if}"]
    return "\n".join(lines) + "\n"


def _wait(proc: object, word: str) -> None:
    line = proc.stdout.readline()  # type: ignore[attr-defined]
    if word not in line:
        raise RuntimeError(f"expected {word!r}, got {line!r}")


def one_round(workdir: Path) -> dict[str, float]:
    with topology("frontend", "backend", "debug") as topo, private_bpffs(workdir) as pins:
        fe, be, dbg = topo.pods["frontend"], topo.pods["backend"], topo.pods["debug"]
        server = topo.track(fe.popen([sys.executable, "-u", "-c", HTTP_SERVER, "80"]))
        _wait(server, "ready")
        eps = workdir / "endpoints.yaml"
        eps.write_text(_endpoints(topo))
        first = start_agent([POLICY], eps, workdir, pin_dir=pins)
        stop = workdir / "stop"
        stop.unlink(missing_ok=True)
        allowed_log, denied_log, udp_log = workdir / "allowed.log", workdir / "denied.log", workdir / "udp.log"
        receiver = topo.track(fe.popen([sys.executable, "-u", "-c", textwrap.dedent(RECEIVER), str(udp_log), "9999"]))
        _wait(receiver, "ready")
        probes = [
            topo.track(be.popen([sys.executable, "-u", "-c", textwrap.dedent(HTTP_PROBER), f"http://{fe.ipv4}/api",
                                 str(allowed_log), str(stop)])),
            topo.track(be.popen([sys.executable, "-u", "-c", textwrap.dedent(HTTP_PROBER), f"http://{fe.ipv4}/v2/items",
                                 str(denied_log), str(stop)])),
            topo.track(dbg.popen([sys.executable, "-u", "-c", textwrap.dedent(SENDER), str(fe.ipv4), str(stop), "9999"])),
        ]
        second = None
        try:
            time.sleep(1.0)
            killed = time.monotonic()
            first.proc.kill()
            first.proc.wait(10)
            started = time.monotonic()
            second = start_agent([POLICY], eps, workdir, pin_dir=pins)
            ready = time.monotonic()
            time.sleep(1.5)
        finally:
            stop.touch()
            for p in probes:
                p.communicate(timeout=10)
            if second is not None:
                second.stop()
                second.uninstall()
        allowed = [(line.split()[0], float(line.split()[1])) for line in allowed_log.read_text().splitlines()]
        after = [t for code, t in allowed if code == "200" and t > killed]
        failed = [t for code, t in allowed if code != "200" and t > killed]
        denied = [line.split()[0] for line in denied_log.read_text().splitlines()]
        back = min(after) if after else float("nan")
        return {
            "blackout_s": back - killed,
            "agent_start_s": ready - started,
            "allowed_failed": float(len(failed)),
            "allowed_total": float(len(allowed)),
            "denied_answered_200": float(denied.count("200")),
            "denied_total": float(len(denied)),
            "udp_denied_received": float(len(udp_log.read_text().splitlines())),
        }


def handover_round(workdir: Path, workers: int) -> dict[str, float]:
    with topology("frontend", "backend", "debug") as topo, private_bpffs(workdir) as pins:
        fe, be, dbg = topo.pods["frontend"], topo.pods["backend"], topo.pods["debug"]
        server = topo.track(fe.popen([sys.executable, "-u", "-c", HTTP_SERVER, "80"]))
        _wait(server, "ready")
        eps = workdir / "endpoints.yaml"
        eps.write_text(_endpoints(topo))
        extra = ["--socket", str(workdir / "agent.sock")]
        first = start_agent([POLICY], eps, workdir, pin_dir=pins, workers=workers, extra_args=extra)
        stop = workdir / "stop"
        load_log, udp_log = workdir / "load.log", workdir / "udp.log"
        receiver = topo.track(fe.popen([sys.executable, "-u", "-c", textwrap.dedent(RECEIVER), str(udp_log), "9999"]))
        _wait(receiver, "ready")
        probes = [
            topo.track(be.popen([sys.executable, "-u", "-c", textwrap.dedent(LOAD_CLIENT), str(fe.ipv4), "/api", "/v2/items",
                                 str(load_log), str(stop)])),
            topo.track(dbg.popen([sys.executable, "-u", "-c", textwrap.dedent(SENDER), str(fe.ipv4), str(stop), "9999"])),
        ]
        second = None
        try:
            time.sleep(1.0)
            started = time.monotonic()
            second = start_agent([POLICY], eps, workdir, pin_dir=pins, workers=workers, extra_args=extra)
            ready = time.monotonic()
            first_rc = first.proc.wait(30)
            exited = time.monotonic()
            time.sleep(1.0)
        finally:
            stop.touch()
            for p in probes:
                p.communicate(timeout=20)
            if second is not None:
                second.stop()
                second.uninstall()
            if first.proc.poll() is None:
                first.stop()
        lines = [line.split() for line in load_log.read_text().splitlines()]
        during = [(kind, code) for kind, code, t in lines if float(t) >= started]
        for kind, code, t in lines:
            if code not in ("200", "403", "retry"):
                print(f"  failed: {kind} {code} at {float(t) - started:+.3f} s from the second agent's start "
                      f"(ready at {ready - started:+.3f} s, old exited at {exited - started:+.3f} s)", flush=True)
        allowed = [code for kind, code in during if kind in ("new", "keep") and code != "retry"]
        denied = [code for kind, code in during if kind == "denied"]
        return {
            "handover_to_ready_s": ready - started,
            "old_exit_after_ready_s": exited - ready,
            "old_exit_status": float(first_rc),
            "allowed_failed": float(sum(1 for c in allowed if c != "200")),
            "allowed_total": float(len(allowed)),
            "keepalive_retried": float(sum(1 for kind, code in during if code == "retry")),
            "denied_not_403": float(sum(1 for c in denied if c != "403")),
            "denied_total": float(len(denied)),
            "udp_denied_received": float(len(udp_log.read_text().splitlines())),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=("kill", "handover"), default="kill")
    parser.add_argument("--workers", type=int, default=1, help="with --mode handover: proxy workers per agent")
    args = parser.parse_args()
    results = []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="membrane-restart-") as tmp:
            r = one_round(Path(tmp)) if args.mode == "kill" else handover_round(Path(tmp), args.workers)
        results.append(r)
        print(f"round {i + 1}: " + ", ".join(f"{k}={v:.3f}" if k.endswith("_s") else f"{k}={v:.0f}" for k, v in r.items()), flush=True)
    print("\n| measurement | median | all rounds |\n|---|---|---|")
    for key in results[0]:
        values = [r[key] for r in results]
        fmt = "{:.2f} s" if key.endswith("_s") else "{:.0f}"
        print(f"| {key} | {fmt.format(statistics.median(values))} | {', '.join(fmt.format(v) for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
