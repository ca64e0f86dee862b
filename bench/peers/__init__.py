"""Bench peers: start, probe and stop every process a bench row needs, from the templates in this folder.

Owns nginx (HTTP/1.1 and h2c backends), the grpcio server, HAProxy, mitmproxy (in bench/.venv-mitm), Knot, dnsdist
and `membrane gateway`, each a subprocess in its own session, all listening on 127.0.0.1 only. Every process
is registered on a `Stack` as it starts, so leaving the `with` block (normally or by an exception) stops them all
(SIGTERM, then SIGKILL after a grace period) and removes the run's work directory.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import string
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

PEERS_DIR = Path(__file__).resolve().parent
BENCH_DIR = PEERS_DIR.parent
REPO_DIR = BENCH_DIR.parent
POLICY_FILE = PEERS_DIR / "policy.yaml"
ENDPOINTS_FILE = PEERS_DIR / "endpoints.yaml"
MITM_VENV = BENCH_DIR / ".venv-mitm"

# Upstream ports are fixed: policy.yaml names them, and `membrane gateway` judges a connection as going to --dst
# on the upstream's port. Proxies listen on free ports picked at run time.
PORTS = {"http": 18080, "h2": 18081, "grpc": 18082, "dns": 18053, "kafka": 19092}
DEFAULT_PORTS = dict(PORTS)
HOST = "127.0.0.1"
_policy_file = POLICY_FILE


def policy_file() -> Path:
    """The policy `membrane gateway` gets: bench/peers/policy.yaml, or its port-shifted copy (shift_ports)."""
    return _policy_file


def shift_ports(offset: int, workdir: Path) -> None:
    """Moves every fixed upstream port by offset, so that a second run can share the machine, and writes a copy
    of policy.yaml naming the moved ports into workdir. offset 0 restores the defaults."""
    global _policy_file
    text = POLICY_FILE.read_text()
    for name, port in DEFAULT_PORTS.items():
        PORTS[name] = port + offset
        text = text.replace(f'"{port}"', f'"{port + offset}"')
    _policy_file = POLICY_FILE
    if offset:
        _policy_file = workdir / "policy.yaml"
        _policy_file.write_text(text)


def pick_port_offset() -> int:
    """0 if the default fixed ports are free (TCP and UDP), else the first multiple of 100 (up to 2000) that is."""
    for offset in range(0, 2001, 100):
        if all(port_is_free(p + offset) and _udp_port_is_free(p + offset) for p in DEFAULT_PORTS.values()):
            return offset
    raise RuntimeError("no free set of fixed bench ports on 127.0.0.1")


class Unavailable(Exception):
    """A row cannot run here (a tool or the proxy is missing); the message says what is missing."""


@dataclass
class Proc:
    """One started peer process (a session leader, so the whole group can be signalled)."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the process group this process leads; SIGKILL it if still there after grace_s."""
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=grace_s)
        # Workers a supervisor forked stay in its group; make sure none outlives it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)


@dataclass
class Stack:
    """A run's peers and work directory; `with Stack() as s:` guarantees every process is stopped."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mbr-bench-")))
    procs: list[Proc] = field(default_factory=list)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: could not stop {proc.name} (pid {proc.pid}): {exc}", file=sys.stderr)
        self.procs.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def spawn(self, name: str, argv: list[str], *, stdout_to_log: bool = True, env: dict[str, str] | None = None) -> Proc:
        """Starts argv in a new session; stderr (and stdout unless told otherwise) go to <workdir>/<name>.log."""
        log = self.workdir / f"{name}.log"
        with log.open("ab") as log_file:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file if stdout_to_log else subprocess.DEVNULL,
                stderr=log_file,
                start_new_session=True,
                cwd=self.workdir,
                env=env,
            )
        proc = Proc(name=name, argv=argv, popen=popen, log=log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def render(self, template: str, out_name: str, **values: object) -> Path:
        """Renders bench/peers/<template> (string.Template) into the work directory; returns its path."""
        text = string.Template((PEERS_DIR / template).read_text()).substitute(
            workdir=self.workdir, peers=PEERS_DIR, **{k: str(v) for k, v in values.items()}
        )
        out = self.workdir / out_name
        out.write_text(text)
        return out


def require_tool(name: str, package: str) -> str:
    """Returns the path of an executable, or raises Unavailable naming the Debian package to install."""
    path = shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/usr/bin") if os.access(p := f"{d}/{name}", os.X_OK)), None
    )
    if path is None:
        raise Unavailable(f"{name} not installed (apt-get install {package}; `make bench` does it)")
    return path


def free_port() -> int:
    """A port on 127.0.0.1 that is free for both TCP and UDP right now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port: int = s.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind((HOST, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port")


def _udp_port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def wait_tcp(proc: Proc, port: int, timeout_s: float = 15.0) -> None:
    """Waits until something accepts on 127.0.0.1:port; raises RuntimeError if proc dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.is_alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {proc.log_tail()}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on {HOST}:{port} within {timeout_s}s: {proc.log_tail()}")


def dns_query(name: str, qtype: int = 1, qid: int = 0x4242) -> bytes:
    """A minimal DNS query (RFC 1035 §4.1): header with RD, one question of class IN."""
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


def udp_dns_rcode(port: int, name: str, timeout_s: float = 0.5) -> int | None:
    """Sends one UDP query for name to 127.0.0.1:port; returns the answer's RCODE, or None on timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout_s)
        s.sendto(dns_query(name), (HOST, port))
        try:
            data = s.recv(4096)
        except OSError:
            return None
    return data[3] & 0x0F if len(data) >= 4 else None


def wait_udp_dns(proc: Proc, port: int, timeout_s: float = 15.0) -> None:
    """Waits until a DNS server on 127.0.0.1:port answers over UDP."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.is_alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}: {proc.log_tail()}")
        if udp_dns_rcode(port, "api.bench.test", 0.2) is not None:
            return
    raise RuntimeError(f"{proc.name} did not answer DNS on {HOST}:{port} within {timeout_s}s: {proc.log_tail()}")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (a supervisor and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def rss_kib(pid: int) -> int:
    """VmRSS of pid plus all its descendants, in KiB."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by pid and its descendants (clock-tick resolution, 10 ms)."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    return total / _TICKS_PER_S


# --- the peers -------------------------------------------------------------------------------------------------


def check_fixed_ports(names: tuple[str, ...]) -> None:
    busy = [f"{n}={PORTS[n]}" for n in names if not port_is_free(PORTS[n])]
    if busy:
        raise RuntimeError(f"fixed bench ports already in use on {HOST}: {', '.join(busy)} (a leftover run?)")


def start_nginx(stack: Stack) -> Proc:
    """nginx, one worker: HTTP/1.1 on PORTS['http'], h2c on PORTS['h2']."""
    nginx = require_tool("nginx", "nginx-light")
    check_fixed_ports(("http", "h2"))
    conf = stack.render("nginx.conf.tmpl", "nginx.conf", http_port=PORTS["http"], h2_port=PORTS["h2"])
    proc = stack.spawn("nginx", [nginx, "-c", str(conf), "-p", str(stack.workdir), "-e", str(stack.workdir / "nginx-error.log")])
    for name in ("http", "h2"):
        wait_tcp(proc, PORTS[name])
    return proc


def start_haproxy(stack: Stack, listen_port: int, upstream_port: int, reuse: str = "safe") -> Proc:
    """HAProxy, one thread, the bench rule; reuse="never" keeps one server connection per client connection."""
    haproxy = require_tool("haproxy", "haproxy")
    conf = stack.render("haproxy.cfg.tmpl", f"haproxy-{listen_port}.cfg", listen_port=listen_port,
                        upstream_port=upstream_port, reuse=reuse)
    proc = stack.spawn("haproxy", [haproxy, "-db", "-f", str(conf)])
    wait_tcp(proc, listen_port)
    return proc


def mitm_venv() -> Path:
    """bench/.venv-mitm/bin/mitmdump, creating the venv (python3 -m venv + pip install mitmproxy) on first use."""
    mitmdump = MITM_VENV / "bin" / "mitmdump"
    if mitmdump.exists():
        return mitmdump
    python = shutil.which("python3") or sys.executable
    print(f"creating {MITM_VENV} for mitmproxy (once; its pins never touch .venv) ...", file=sys.stderr, flush=True)
    try:
        subprocess.run([python, "-m", "venv", str(MITM_VENV)], check=True, timeout=300)
        subprocess.run([str(MITM_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "mitmproxy"],
                       check=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(MITM_VENV, ignore_errors=True)
        raise Unavailable(f"could not install mitmproxy into {MITM_VENV}: {exc}") from exc
    return mitmdump


def start_mitm(stack: Stack, listen_port: int, upstream_port: int) -> Proc:
    mitmdump = mitm_venv()
    argv = [str(mitmdump), "--mode", f"reverse:http://{HOST}:{upstream_port}", "--listen-host", HOST,
            "--listen-port", str(listen_port), "-s", str(PEERS_DIR / "mitm_acl.py"), "-q",
            "--set", f"confdir={stack.workdir / 'mitm-conf'}", "--set", "termlog_verbosity=error",
            "--set", "flow_detail=0"]
    proc = stack.spawn("mitmdump", argv)
    wait_tcp(proc, listen_port, timeout_s=60)
    return proc


def membrane_bin() -> str:
    """The membrane executable: $MEMBRANE if set (to bench another build), else .venv/bin/membrane."""
    if os.environ.get("MEMBRANE"):
        return os.environ["MEMBRANE"]
    venv_bin = REPO_DIR / ".venv" / "bin" / "membrane"
    return str(venv_bin) if venv_bin.exists() else (shutil.which("membrane") or str(venv_bin))


_GATEWAY_HELP: str | None = None


def membrane_gateway_help() -> str:
    """The text of `membrane gateway --help`; raises Unavailable while the gateway command does not exist."""
    global _GATEWAY_HELP
    if _GATEWAY_HELP is None:
        try:
            done = subprocess.run([membrane_bin(), "gateway", "--help"], capture_output=True, text=True, timeout=30,
                                  cwd=REPO_DIR)
        except (OSError, subprocess.SubprocessError) as exc:
            raise Unavailable(f"membrane CLI not runnable ({exc}); run `make setup`") from exc
        if done.returncode != 0:
            first = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            raise Unavailable(f"`membrane gateway` not available yet (exit {done.returncode}: {first[0][:120]})")
        _GATEWAY_HELP = done.stdout
    return _GATEWAY_HELP


def start_membrane(stack: Stack, *, listen_port: int, upstream_port: int, dst: str, src: str = "bench/client",
                   workers: int | None = 1, udp: bool = False, profile_to: Path | None = None,
                   flows_to: Path | None = None, pure: bool = False) -> Proc:
    """`membrane gateway` on 127.0.0.1:listen_port in front of 127.0.0.1:upstream_port, with bench/peers/policy.yaml.

    profile_to: run it (one worker, in-process) under cProfile with a CPU-time clock (peers/cpu_profile.py), which
    writes its stats there when it exits.
    flows_to: `--flows FILE`, flow records written as JSON lines to a real file, the way a Hubble user runs; without
    it flow records are built and kept in the in-memory ring only.
    pure: with MEMBRANE_PURE=1, the pure Python modules instead of the mypyc-compiled ones (native/modules.txt).
    """
    help_text = membrane_gateway_help()
    exe = [membrane_bin()]
    if profile_to is not None:
        python = REPO_DIR / ".venv" / "bin" / "python"
        exe = [str(python if python.exists() else sys.executable), str(PEERS_DIR / "cpu_profile.py"), str(profile_to)]
    argv = [*exe, "gateway", "--policies", str(policy_file()), "--endpoints", str(ENDPOINTS_FILE),
            "--listen", f"{HOST}:{listen_port}", "--upstream", f"{HOST}:{upstream_port}", "--dst", dst, "--src", src]
    if udp:
        argv.append("--udp")
    if flows_to is not None:
        argv += ["--flows", str(flows_to)]
    if workers is not None:
        if "--workers" not in help_text:
            raise Unavailable("`membrane gateway` has no --workers option yet")
        argv += ["--workers", str(workers)]
    env = {**os.environ, "MEMBRANE_PURE": "1"} if pure else None
    proc = stack.spawn(f"membrane-{listen_port}", argv, stdout_to_log=False, env=env)
    if udp:
        wait_udp_dns(proc, listen_port, timeout_s=30)
    else:
        wait_tcp(proc, listen_port, timeout_s=30)
    return proc


def start_knot(stack: Stack) -> Proc:
    """Knot DNS serving bench.test and other.test on PORTS['dns'] (UDP and TCP), one UDP and one TCP worker."""
    knotd = require_tool("knotd", "knot")
    check_fixed_ports(("dns",))
    (stack.workdir / "knot").mkdir(exist_ok=True)
    conf = stack.render("knot.conf.tmpl", "knot.conf", port=PORTS["dns"])
    proc = stack.spawn("knotd", [knotd, "-c", str(conf)])
    wait_udp_dns(proc, PORTS["dns"])
    return proc


def start_grpc(stack: Stack) -> Proc:
    """The grpcio server (bench/peers/grpc_server.py) answering /bench.Echo/Call on PORTS['grpc']."""
    try:
        import grpc  # noqa: F401  (only to say clearly when it is missing)
    except ImportError as exc:
        raise Unavailable("grpcio is not installed in .venv (it is in the dev extra: make setup)") from exc
    check_fixed_ports(("grpc",))
    python = REPO_DIR / ".venv" / "bin" / "python"
    proc = stack.spawn("grpc-server", [str(python if python.exists() else sys.executable),
                                       str(PEERS_DIR / "grpc_server.py"), str(PORTS["grpc"])])
    wait_tcp(proc, PORTS["grpc"])
    return proc


def start_dnsdist(stack: Stack, listen_port: int, upstream_port: int) -> Proc:
    dnsdist = require_tool("dnsdist", "dnsdist")
    conf = stack.render("dnsdist.conf.tmpl", f"dnsdist-{listen_port}.conf", listen_port=listen_port,
                        upstream_port=upstream_port)
    proc = stack.spawn("dnsdist", [dnsdist, "-C", str(conf), "--supervised", "--disable-syslog"])
    wait_udp_dns(proc, listen_port)
    return proc
