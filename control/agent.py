"""The node agent (`membrane run`): wiring and lifetime of the control plane and the data plane.

Wires a source (files) into the node state, the state through the pure plan into the reconciler
(the kernel), the compiled policy into the transparent proxy (one `SessionFactory` with the
ipcache resolver) and its worker processes, drop events into flows, and the status file. Every
kernel call runs on one kernel thread; the event loop never waits for one except at start and
stop, so a DNS answer that teaches toFQDNs names holds only its own connection while the kernel
learns them. Invariant: the node is never open: the policy maps are pinned (`--bpf-pin-dir`), a
starting agent adopts them and replaces the programs in place, and removes what is stale only after
that; SIGTERM leaves the kernel side enforcing (L7 ports fail closed) until the next agent or
`membrane uninstall`. A second agent started while one runs takes over its listening sockets
(control/handover.py): the running one drains and exits 0, and no connection is refused meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from membrane.bpf.errors import AttachError, BpfLoadError
from membrane.bpf.pins import DEFAULT_PIN_DIR
from membrane.bpf.steer import ProxyPorts, Steering
from membrane.control.api import AgentRunning, AgentSocket
from membrane.control.cni import CniCall, CniCode, CniError, Command, DelQueue
from membrane.control.drops import drop_flow
from membrane.control.handover import Granted, HandoverError
from membrane.control.listeners import Listeners, open_listeners
from membrane.control.reconciler import Applied, Reconciler, ifindex, interfaces_changed
from membrane.control.sources import Change, Source, SourceError, SourceProblem
from membrane.control.sources.files import FileSource
from membrane.control.state import Inputs, Learned, NodeState, compile_inputs
from membrane.control.status import DEFAULT_STATUS_PATH, endpoint_rows, remove_status, write_status
from membrane.control.workers import WorkerHandle
from membrane.policies import PolicyMap
from membrane.policies.dnsmatch import fqdn
from membrane.policies.fqdn import canonical_ip
from membrane.proxy.flows import FlowSink, FlowStream, close_flow_streams, default_node_name, open_flow_streams
from membrane.proxy.flowserver import FlowServer
from membrane.proxy.metrics import Metrics
from membrane.proxy.server import Proxy, ProxyConfig
from membrane.proxy.session import Learn
from membrane.proxy.wiring import IpcachePeers, SessionFactory

__all__ = ["DEFAULT_STATUS_PATH", "Agent", "AgentConfig", "run_agent"]

log = logging.getLogger("membrane.agent")
T = TypeVar("T")

POLL_S = 1.0  # how often the policy paths and the endpoints file are checked for edits
EVENTS_S = 0.1  # how often drop events are read from the kernel ring buffer
WORKER_START_S = 30.0
DEFAULT_SOCKET = Path("/var/run/membrane/agent.sock")
DEFAULT_CNI_QUEUE = Path("/var/run/membrane/cni-queue")
K8S_SYNC_S = 60.0  # how long a start waits for every Kubernetes list before giving up
HANDOVER_GRACE_S = 0.5  # after a hand-over: stop accepting, then wait this long before closing idle connections
CNI_ATTACH_S = 20.0  # how long a CNI ADD waits for its pod to be attached (the plugin waits 30 s)


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """What `membrane run` was asked to do."""

    policies: tuple[str, ...]
    endpoints: str | None
    flows: tuple[str, ...] = ()  # JSON-lines sinks ('-' = stdout)
    sockmap: bool = False
    workers: int = 1
    status_path: Path = DEFAULT_STATUS_PATH
    drain_timeout_s: float = 2.0
    bpf_pin_dir: Path = DEFAULT_PIN_DIR  # where the kernel state lives between agents (on a bpffs)
    allow_localhost: bool = False  # Cilium's allow-localhost=always: the node reaches every pod (else: judged as `host`)
    kubernetes: bool = False  # learn policies, pods, namespaces and nodes from the API server (not files)
    kubeconfig: Path | None = None  # None: the pod's service account (in-cluster)
    node_name: str = ""  # this node, as Kubernetes names it (its pods become endpoints)
    lease_namespace: str = "kube-system"  # where the policy-status Lease lives (one writer per cluster)
    socket_path: Path = DEFAULT_SOCKET  # the local socket: CNI plugin, `membrane observe`, a successor agent
    cni_queue: Path = DEFAULT_CNI_QUEUE  # DELs the CNI plugin queued while no agent listened
    flows_max_bytes: int = 10 << 20  # rotate a --flows file at this size (0 = never)
    flows_max_backups: int = 5  # rotated flows files kept (name.1 ... name.N)
    metrics: tuple[str, int] | None = None  # serve Prometheus /metrics here
    metrics_workload_labels: bool = True  # source/destination workload labels on the L7 families
    health: tuple[str, int] | None = None  # serve /healthz and /readyz here


class Agent:
    """One node agent: owns the state, the kernel thread, the proxy, its workers and the status file."""

    def __init__(self, config: AgentConfig, *, out: IO[str] = sys.stdout) -> None:
        self.config = config
        self.out = out
        self.source: Source = FileSource(config.policies, config.endpoints)
        self.k8s: Any = None  # the KubernetesSource in --kubernetes mode (imported only then: lightkube)
        self.k8s_changes: Any = None
        self.status_writer: Any = None
        self.api: AgentSocket | None = None
        self._successor = False  # another agent answers on the socket: we take over from it (hand-over)
        self._granted: Granted | None = None  # the sockets it handed over, until we confirm
        self._frozen = False  # we handed our sockets to a successor: it owns the kernel, we write nothing there
        self._handed_over = False  # the successor serves: we drain and exit, leaving status and socket to it
        self._stop_event = asyncio.Event()
        self._servers: list[asyncio.AbstractServer] = []
        self._wake = asyncio.Event()
        self._cni_pods: dict[str, str] = {}  # CNI attachment key (container/ifname) -> pod key
        self._resolver: Any = None  # control.interfaces.InterfaceResolver, made on the kernel thread
        self.flow_server: FlowServer | None = None
        self.state = NodeState()
        self.metrics = Metrics(workload_labels=config.metrics_workload_labels)
        self._worker_metrics: dict[int, dict[str, Any]] = {}  # worker index -> its latest snapshot
        self._change_seen: float | None = None  # monotonic time the oldest unenforced policy change was seen
        self.listeners: Listeners | None = None
        self.steering: Steering | None = None
        self.reconciler: Reconciler | None = None
        self.applied: Applied | None = None
        self.proxy: Proxy | None = None
        self.sink: FlowSink | None = None
        self.workers: list[WorkerHandle] = []
        self.ready = False
        self.reloads = 0
        self.drops = 0
        self.started = time.time()
        self._streams: list[FlowStream] = []
        self._lock = asyncio.Lock()  # one compile-and-apply at a time, committed in order
        self._queued: asyncio.Future[None] | None = None  # a DNS recompile not yet started: new names join it
        self._running: asyncio.Future[None] | None = None  # the recompile under way, done when it is in force
        self._tasks: set[asyncio.Task[None]] = set()
        self._captured: Learned = {}  # the learned names the recompile under way (or the last one) compiles
        # pyroute2's IPRoute runs an asyncio loop of its own, which cannot nest in ours: every call
        # into bpf/ happens on this one thread.
        self._kx = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mbr-kernel")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background, holding a reference until it ends (the loop keeps only weak ones)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _kernel(self, fn: Callable[..., T], *args: Any) -> T:
        """Run on the kernel thread and wait (start and stop only: the loop stops meanwhile)."""
        return self._kx.submit(fn, *args).result()

    async def _kernel_async(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._kx, fn, *args)

    # --- inputs -----------------------------------------------------------------------------------
    def _take(self, changes: Iterable[Change], *, reason: str) -> bool:
        """Feed a source's changes to the state. Returns True when the policy must be recompiled."""
        changed = False
        for change in changes:
            if isinstance(change, SourceProblem):
                if change.errors:
                    self.metrics.policy_import_errors_total.inc()
                for line in change.errors:
                    log.error("policy reload (%s) rejected, keeping the last good policy: %s", reason, line)
            changed = self.state.apply(change) or changed
        self.metrics.policy_import_errors.set(float(len(self.state.error_lines)))
        return changed

    # --- policy -> kernel -------------------------------------------------------------------------
    def _compile_and_apply(self, inputs: Inputs, endpoint_ids: dict[str, int]) -> tuple[PolicyMap, Applied]:
        """On the kernel thread: compile the captured inputs and reconcile the kernel with them."""
        assert self.reconciler is not None
        pmap = compile_inputs(inputs, self.state.identities, allow_localhost=self.config.allow_localhost)
        return pmap, self.reconciler.apply(pmap, inputs.endpoints, endpoint_ids)

    async def _recompile_locked(self, *, reason: str, count: bool = True) -> None:
        inputs = self.state.inputs()  # captured before the first await: every name learned so far
        self._captured = inputs.learned
        running = self._running = asyncio.get_running_loop().create_future()
        try:
            pmap, applied = await self._kernel_async(self._compile_and_apply, inputs, dict(self.state.endpoint_ids))
            self._commit(applied)
            self.state.put_in_force(pmap, inputs.learned)
        finally:
            self._running = None
            running.set_result(None)  # waiting answers go on; if the kernel write failed, the kernel drops them
        if count:
            self.reloads += 1
        self._policy_metrics(reason)
        log.info("policy applied (%s): %d endpoints attached", reason, len(applied.attached))
        self._broadcast()

    async def recompile(self, *, reason: str) -> None:
        """Compile the last good inputs with what DNS taught us now, and apply the result."""
        async with self._lock:
            await self._recompile_locked(reason=reason)
        await self.write_status()

    async def _reattach(self) -> None:
        """An endpoint's interface came or went: reconcile the policy in force again (no recompile)."""
        async with self._lock:
            pmap = self.state.pmap
            assert self.reconciler is not None and pmap is not None
            ids = dict(self.state.endpoint_ids)
            self._commit(await self._kernel_async(self.reconciler.apply, pmap, self.state.endpoints, ids))

    def _commit(self, applied: Applied) -> None:
        self.applied = applied
        for w in applied.warnings:
            log.warning("%s", w)
        self._endpoint_metrics()

    # --- learning toFQDNs names (the proxy's Learn hook) --------------------------------------------
    def learn(self, action: Learn) -> Awaitable[None] | None:
        """Record the names; when one is new, the kernel must learn it before the answer goes on.
        Returns None (nothing new) or what the answer's connection waits for. Never blocks."""
        now = time.monotonic()
        for name in action.names:
            self.state.fqdn.add(name, action.ips, ttl_s=action.ttl_s, now=now)
        if self._frozen:
            return None  # handed over: the successor owns the kernel (and relearns from the next answer)
        if self.reconciler is None or covers(self.state.compiled_learned, action):
            return None  # the kernel knows these already
        if self._running is not None and covers(self._captured, action):
            return asyncio.shield(self._running)
        if self._queued is None:
            loop = asyncio.get_running_loop()
            self._queued = loop.create_future()
            self._spawn(self._learned_recompile(self._queued))
        return asyncio.shield(self._queued)

    async def _learned_recompile(self, done: asyncio.Future[None]) -> None:
        try:
            async with self._lock:
                self._queued = None  # names learned from now on need the next recompile
                await self._recompile_locked(reason="dns")
        except Exception as e:  # the waiting answers fail closed (see proxy.server Connection._release)
            log.exception("pushing learned names to the kernel failed")
            done.set_exception(e)
            return
        done.set_result(None)
        await self.write_status()

    # --- worker processes (--workers N) -----------------------------------------------------------
    def _broadcast(self) -> None:
        """Tell every worker to recompile (re-reading the files) with the learned names in force now."""
        msg = {"type": "policy", "learned": {k: sorted(v) for k, v in self.state.compiled_learned.items()}}
        for w in self.workers:
            w.channel.send(msg)

    async def _start_workers(self, n: int) -> None:
        assert self.listeners is not None
        for i in range(1, n):
            self.workers.append(
                WorkerHandle.spawn(
                    i, policies=self.config.policies, endpoints=self.config.endpoints, flows=self.config.flows,
                    drain_timeout_s=self.config.drain_timeout_s, listeners=self.listeners,
                    learned=self.state.compiled_learned, on_message=self._from_worker,
                    metrics_workload_labels=self.config.metrics_workload_labels,
                )
            )
        deadline = time.monotonic() + WORKER_START_S
        while any(not w.ready for w in self.workers):
            if time.monotonic() > deadline or any(w.proc.poll() is not None for w in self.workers):
                raise OSError("a proxy worker did not start")
            await asyncio.sleep(0.02)

    def _from_worker(self, w: WorkerHandle, msg: dict[str, Any]) -> None:
        if msg.get("type") == "ready":
            w.ready = True
        elif msg.get("type") == "metrics" and isinstance(msg.get("snapshot"), dict):
            self._worker_metrics[w.index] = msg["snapshot"]
        elif msg.get("type") == "learned":
            names = tuple(str(n) for n in msg.get("names", ()))
            action = Learn(names=names, ips=tuple(str(ip) for ip in msg.get("ips", ())), ttl_s=float(msg.get("ttl", 0)))
            self._spawn(self._ack(w, msg.get("id"), self.learn(action)))

    async def _ack(self, w: WorkerHandle, n: Any, waiting: Awaitable[None] | None) -> None:
        """The policy broadcast (made when the recompile committed) goes out before this ack."""
        if waiting is not None:
            with contextlib.suppress(Exception):  # logged by _learned_recompile; the worker relays after its timeout
                await waiting
        w.channel.send({"type": "ack", "id": n})

    async def _stop_workers(self) -> None:
        loop = asyncio.get_running_loop()
        for w in self.workers:
            w.channel.stop()
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                await loop.run_in_executor(None, w.proc.wait, self.config.drain_timeout_s + 5)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.channel.close()
        self.workers.clear()

    # --- status -----------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        """The status document `membrane status` and `membrane endpoint list` print."""
        attached = self.applied.attached if self.applied is not None else {}
        ports = self.listeners.ports if self.listeners is not None else ProxyPorts()
        drops: dict[str, int] = {}
        sockmap_stats: dict[str, int] = {}
        if self.steering is not None and self.ready:
            counts = await self._kernel_async(self.steering.maps.drop_counts)
            drops = {r.name.lower(): n for r, n in counts.items()}
            if self.steering.sockmap is not None:
                sockmap_stats = dict(await self._kernel_async(self.steering.sockmap.stats))
        return {
            "pid": os.getpid(),
            "state": "ready" if self.ready else "starting",
            "started": self.started,
            "updated": time.time(),
            "policies": list(self.config.policies),
            "endpoints_file": self.config.endpoints,
            "proxy_ports": dataclasses.asdict(ports),
            "sockmap": self.config.sockmap,
            "sockmap_stats": sockmap_stats,
            "reloads": self.reloads,
            "errors": self.state.error_lines,
            "warnings": list(self.applied.warnings) if self.applied is not None else [],
            "learned_fqdns": {k: sorted(v) for k, v in self.state.learned().items()},
            "drops": drops,
            "flows": self.sink.written if self.sink is not None else 0,
            "endpoints": endpoint_rows(self.state.endpoints, self.state.pmap, attached, self.state.endpoint_ids),
            **self._k8s_status(),
        }

    def _k8s_status(self) -> dict[str, Any]:
        if self.k8s is None:
            return {"source": "files"}
        from membrane.control.k8s_status import summarize

        resources = {
            name: {"synced": r.synced.is_set(), "objects": len(r.store), "relists": r.relists, "restarts": r.restarts,
                   "last_error": r.last_error}
            for name, r in self.k8s.reflectors.items()
        }
        view_errors = self.k8s_changes.view().policy_errors
        out: dict[str, Any] = {
            "source": "kubernetes",
            "kubernetes": {"node": self.config.node_name, "synced": self.k8s.synced, "resources": resources},
            "policy_status": summarize(view_errors).as_dict(),
        }
        if self.status_writer is not None:
            out["policy_status"]["writer"] = self.status_writer.stats.as_dict()
        return out

    async def write_status(self) -> None:
        if self._handed_over:
            return  # the successor's file now
        write_status(self.config.status_path, await self.status())

    # --- lifetime ---------------------------------------------------------------------------------
    async def run(self) -> int:
        """Run until SIGTERM/SIGINT. Returns the exit status (0 after a clean stop)."""
        loop = asyncio.get_running_loop()
        stop = self._stop_event
        def on_signal() -> None:
            stop.set()
            self._wake.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        try:
            refused = await self._open_socket()
            if refused is None and self.config.kubernetes:
                refused = await self._open_kubernetes()
            if refused is None:
                refused = self._first_inputs()
            if refused is None and self._successor:
                refused = await self._request_handover()
            if refused is not None:
                return refused
            with contextlib.ExitStack() as stack:
                stack.callback(self._remove_status)
                await self._start(stack)
                if self._granted is not None:
                    refused = await self._confirm_handover()
                    if refused is not None:
                        await self._stop()
                        return refused
                await self._start_local_services()
                self.ready = True
                await self.write_status()  # before `agent ready`: whoever waits for that line reads the status next
                self._announce()
                try:
                    await self._serve(stop)
                finally:
                    self.ready = False
                    await self._stop()
            return 0
        finally:
            if self._granted is not None:
                self._granted.close()
                self._granted = None
            await self._stop_local_services()

    # --- planned hand-over (control/handover.py) ---------------------------------------------------------
    async def _request_handover(self) -> int | None:
        """Ask the running agent for its listening sockets; an exit status if it refuses or does not answer.
        Nothing is touched before it answers, so a failure here leaves the node as the running agent keeps it."""
        from membrane.control import handover

        try:
            granted = await asyncio.get_running_loop().run_in_executor(None, handover.request, self.config.socket_path)
        except HandoverError as e:
            print(f"membrane run: another agent runs on this node and the hand-over failed: {e}; it keeps enforcing. "
                  "Stop it (SIGTERM keeps the kernel side enforcing) and start again.", file=sys.stderr)
            return 1
        self._granted = granted
        log.info("hand-over: agent pid %d handed over %s", granted.pid, ", ".join(sorted(granted.sockets)))
        return None

    async def _confirm_handover(self) -> int | None:
        """We serve: tell the running agent, which stops accepting; then serve the agent socket it handed over."""
        granted = self._granted
        assert granted is not None and self.api is not None
        try:
            await asyncio.get_running_loop().run_in_executor(None, granted.confirm)
        except HandoverError as e:
            print(f"membrane run: hand-over failed: {e}; the running agent keeps serving, the kernel side stays "
                  "enforcing; this agent stops.", file=sys.stderr)
            return 1
        api_sock = granted.take("api")
        self._granted = None
        granted.close()
        if api_sock is None:  # an agent that passed no socket for the path: take the path over
            with contextlib.suppress(FileNotFoundError):
                self.config.socket_path.unlink()
            await self.api.start()
        else:
            await self.api.start(inherited=api_sock)
        log.info("hand-over: agent pid %d stopped accepting; this agent serves", granted.pid)
        return None

    async def _handover(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: dict[str, Any]) -> None:
        """A successor asks for our sockets: pass them, wait for its "ready", then stop accepting and drain.
        If it goes away first, keep serving and write our policy to the kernel again (it may have written its own)."""
        from membrane.control import handover

        pid = request.get("pid")
        busy = "the agent is still starting" if not self.ready else "a hand-over is under way" if self._frozen else None
        api_sock = self.api.listening_socket() if self.api is not None else None
        if busy is not None or self.listeners is None or api_sock is None:
            if api_sock is not None:
                api_sock.close()
            writer.write((json.dumps({"ok": False, "msg": busy or "the agent is stopping"}) + "\n").encode())
            await writer.drain()
            return
        self._frozen = True  # from here the successor owns the kernel
        try:
            handover.offer(writer.get_extra_info("socket").fileno(), [*self.listeners.named(), ("api", api_sock)])
        except OSError as e:
            log.warning("hand-over to pid %s: cannot pass the sockets: %s", pid, e)
            self._frozen = False
            return
        finally:
            api_sock.close()
        log.info("hand-over: listening sockets passed to pid %s; serving until it is ready", pid)
        try:
            line = await asyncio.wait_for(reader.readline(), handover.READY_S)
        except (TimeoutError, ValueError, ConnectionError):
            line = b""
        with contextlib.suppress(ValueError):
            if json.loads(line or b"null") == {"type": "ready"}:
                assert self.api is not None and self.proxy is not None
                self.api.stop_accepting()
                self.proxy.stop_accepting()
                for w in self.workers:
                    w.channel.send({"type": "stop_accepting"})
                for server in self._servers:  # --metrics and --health: the successor binds them next
                    server.close()
                self._handed_over = True
                writer.write(b'{"ok": true}\n')
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                log.info("hand-over: pid %s serves; this agent stops accepting, drains and exits", pid)
                self._stop_event.set()
                self._wake.set()
                return
        log.warning("hand-over to pid %s failed (it went away or sent %r); this agent keeps serving and writes its "
                    "policy to the kernel again", pid, line[:100])
        self._frozen = False
        await self.recompile(reason="hand-over failed")

    def _remove_status(self) -> None:
        """Remove the status file if it is ours (after a hand-over it is the successor's; a failed one's is its predecessor's)."""
        try:
            doc = json.loads(self.config.status_path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(doc, dict) and doc.get("pid") == os.getpid():
            remove_status(self.config.status_path)

    # --- Kubernetes, the local socket, metrics and health (--kubernetes, --socket, --metrics, --health) ------
    async def _open_kubernetes(self) -> int | None:
        """Start the reflectors and wait until every kind has been listed once; an exit status if refused."""
        from membrane.control.k8s_status import PolicyStatusWriter
        from membrane.control.sources.kubernetes import KubernetesChanges, KubernetesSource, client_from

        if not self.config.node_name:
            print("membrane run: --kubernetes needs the node's name (--node-name or NODE_NAME)", file=sys.stderr)
            return 2
        try:
            client = client_from(self.config.kubeconfig)
        except Exception as e:  # lightkube's ConfigError and file errors: the message names the file
            print(f"membrane run: Kubernetes client: {e}", file=sys.stderr)
            return 2
        self.k8s = KubernetesSource(client, self.config.node_name, self._k8s_changed)
        self.k8s_changes = KubernetesChanges(self.k8s)
        self.source = self.k8s_changes
        await self.k8s.start()
        try:
            await self.k8s.wait_synced(K8S_SYNC_S)
        except TimeoutError as e:
            print(f"membrane run: {e}", file=sys.stderr)
            return 1
        self.status_writer = PolicyStatusWriter(client, node_name=self.config.node_name,
                                                lease_namespace=self.config.lease_namespace)
        return None

    def _k8s_changed(self) -> None:
        if self.k8s_changes is not None:
            self.k8s_changes.mark_dirty()
        self._wake.set()

    async def _open_socket(self) -> int | None:
        """Listen on the agent socket before the kernel is touched: a second agent on the node stops here."""
        self.api = AgentSocket(self.config.socket_path, {"cni": self._cni, "status": self._status_request},
                               stream=self._observe_stream, takeover={"handover": self._handover})
        try:
            await self.api.start()
        except AgentRunning:  # a live agent: we take over from it once our inputs are read (_request_handover)
            self._successor = True
            return None
        except OSError as e:
            self.api = None
            print(f"membrane run: cannot listen on {self.config.socket_path}: {e.strerror or e}", file=sys.stderr)
            return 2
        return None

    async def _start_local_services(self) -> None:
        """Metrics and health endpoints, the policy-status writer; DELs the CNI plugin queued meanwhile."""
        from membrane.proxy.metrics import serve_http

        for call in DelQueue(self.config.cni_queue).drain():  # DELs that came while no agent listened
            self._forget_cni(call)
        async def bind(routes: Any, addr: tuple[str, int]) -> asyncio.AbstractServer:
            deadline = time.monotonic() + 2.0  # after a hand-over the predecessor closes its port a moment before
            while True:
                try:
                    return await serve_http(routes, *addr)
                except OSError:
                    if not self._successor or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.02)

        if self.config.metrics is not None:
            self._servers.append(await bind({"/metrics": self._metrics_route}, self.config.metrics))
        if self.config.health is not None:
            routes = {"/healthz": self._healthz, "/readyz": self._readyz}
            self._servers.append(await bind(routes, self.config.health))
        if self.status_writer is not None:
            await self.status_writer.start()
            self._submit_policy_status()

    async def _stop_local_services(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
        if self.status_writer is not None:
            with contextlib.suppress(Exception):
                await self.status_writer.stop()
        if self.api is not None:
            await self.api.close(unlink=not self._handed_over)  # after a hand-over the path is the successor's
            self.api = None
        if self.k8s is not None:
            await self.k8s.stop()
            with contextlib.suppress(Exception):
                await self.k8s.reflectors["pods"].client.close()
        if self._resolver is not None:
            resolver, self._resolver = self._resolver, None
            self._kx.submit(resolver.close)

    def _submit_policy_status(self) -> None:
        if self.status_writer is None or self.k8s is None:
            return
        from membrane.control.k8s_status import policy_objects

        self.status_writer.submit(policy_objects(self.k8s), self.k8s_changes.view().policy_errors)

    def _healthz(self) -> tuple[int, str, bytes]:
        return 200, "text/plain; charset=utf-8", b"ok\n"

    def _not_ready(self) -> list[str]:
        """Why the agent is not ready: every watch synced and every local endpoint attached, or the reasons."""
        reasons = [] if self.ready else ["starting"]
        if self.k8s is not None and not self.k8s.synced:
            reasons.append("Kubernetes not synced: " + ", ".join(n for n, r in self.k8s.reflectors.items() if not r.synced.is_set()))
        if self.applied is not None:
            reasons += [f"endpoint {key}: {why}" for key, why in sorted(self.applied.waiting.items())]
        return reasons

    def _readyz(self) -> tuple[int, str, bytes]:
        reasons = self._not_ready()
        if reasons:
            return 503, "text/plain; charset=utf-8", ("not ready:\n" + "\n".join(reasons) + "\n").encode()
        return 200, "text/plain; charset=utf-8", b"ready\n"

    async def _observe_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: dict[str, Any]) -> None:
        """`membrane observe` on the agent socket: this agent's flows (the ring, then new ones with -f)."""
        if self.flow_server is None:
            writer.write(b'{"error": "the agent is starting"}\n')
            return
        await self.flow_server.serve(reader, writer, request)

    async def _status_request(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "status": await self.status()}

    # --- CNI: a pod's programs are attached before ADD returns -------------------------------------------
    async def _cni(self, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            call = CniCall.from_wire(msg)
            if call.command is Command.DEL:
                self._forget_cni(call)
                return {"ok": True}
            return await self._cni_add_or_check(call)
        except CniError as e:
            return {"ok": False, "code": int(e.code), "msg": e.msg}

    def _forget_cni(self, call: CniCall) -> None:
        pod = self._cni_pods.pop(call.key, None) or call.pod
        if pod is not None and self.k8s_changes is not None and self.k8s_changes.bindings.pop(pod, None) is not None:
            self.k8s_changes.binding_ips.pop(pod, None)
            self.k8s_changes.mark_dirty()
            self._wake.set()

    async def _cni_add_or_check(self, call: CniCall) -> dict[str, Any]:
        if self.k8s_changes is None:
            raise CniError(CniCode.INVALID_CONFIG, "this agent reads endpoints from files; membrane-cni needs `membrane run --kubernetes`")
        if call.pod is None:
            raise CniError(CniCode.INVALID_ENVIRONMENT, "CNI_ARGS names no pod (K8S_POD_NAMESPACE, K8S_POD_NAME)")
        if call.host_interface is None:
            raise CniError(CniCode.INVALID_CONFIG, "prevResult names no host-side interface")
        if call.command is Command.ADD:
            self._cni_pods[call.key] = call.pod
            if (self.k8s_changes.bindings.get(call.pod), self.k8s_changes.binding_ips.get(call.pod)) != (call.host_interface, call.ips):
                self.k8s_changes.bindings[call.pod] = call.host_interface
                self.k8s_changes.binding_ips[call.pod] = call.ips
                self.k8s_changes.mark_dirty()
                self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (CNI_ATTACH_S if call.command is Command.ADD else 0.0)
        while True:
            applied = self.applied
            idx = ifindex(call.host_interface)
            if applied is not None and idx is not None and applied.attached.get(call.pod) == idx:
                return {"ok": True}
            if loop.time() >= deadline:
                why = applied.waiting.get(call.pod) if applied is not None else None
                known = self.k8s is not None and (
                    any(ep.key == call.pod for ep in self.state.endpoints.endpoints) or call.pod in self.k8s_changes.view().awaiting_ip
                )
                detail = why or ("not attached yet" if known else "no such pod on this node in the API server (yet)")
                raise CniError(CniCode.TRY_AGAIN_LATER, f"pod {call.pod} on {call.host_interface}: {detail}")
            await asyncio.sleep(0.01)

    def _resolve_ip(self, ip: str) -> str | None:
        """On the kernel thread: the host interface that leads to a local pod's IP (see control/interfaces.py)."""
        if self._resolver is None:
            from membrane.control.interfaces import InterfaceResolver

            self._resolver = InterfaceResolver()
        name: str | None = self._resolver.resolve(ip)
        return name

    def _adopt_endpoint_ids(self, steering: Steering) -> None:
        """Keep the endpoint ids of adopted endpoints: the adopted policy is keyed by them, and a
        renumbered endpoint would be judged by another endpoint's entries until it is rewritten."""
        adopted = self._kernel(steering.maps.endpoints)
        ids: dict[str, int] = {}
        for ep in self.state.endpoints.endpoints:  # first the ids the kernel already holds for these interfaces
            idx = ifindex(ep.interface) if ep.interface is not None else None
            if idx is not None and idx in adopted and adopted[idx].endpoint_id not in ids.values():
                ids[ep.key] = adopted[idx].endpoint_id
        for key in self.state.endpoint_ids:  # then fresh ids, above every adopted one
            if key not in ids:
                ids[key] = max(ids.values(), default=0) + 1
        self.state.endpoint_ids = ids

    def _first_inputs(self) -> int | None:
        """Read the source and check the flow sinks before the kernel is touched; an exit status if refused."""
        try:
            self._take(self.source.snapshot(), reason="start")
        except SourceError as e:
            for line in str(e).splitlines():
                print(f"membrane run: {line}", file=sys.stderr)
            return 2 if e.usage else 1
        for path in self.config.flows:  # an unwritable --flows fails before the kernel is touched
            if path == "-":
                continue
            try:
                open(path, "a", encoding="utf-8").close()
            except OSError as e:
                print(f"membrane run: cannot open --flows {path}: {e.strerror}", file=sys.stderr)
                return 2
        return None

    async def _start(self, stack: contextlib.ExitStack) -> None:
        """Listeners and the proxy first, then steering and the first policy in the kernel, then workers.

        The proxy serves before bcc compiles the program (seconds): a previous agent's programs, kept
        attached, steer to the ports it used, which the new listeners take again (read from its pinned
        config), so after a restart new L7 connections fail only until the listeners and the policy are up.
        """
        from membrane.bpf.maps import ConfigSlot
        from membrane.bpf.pins import pinned_config

        if self._granted is not None:  # hand-over: the running agent's own listening sockets
            self.listeners = Listeners.adopt(self._granted.sockets)
        else:
            previous = pinned_config(self.config.bpf_pin_dir)
            self.listeners = open_listeners(ProxyPorts(
                tcp4=previous.get(ConfigSlot.TCP4_PORT, 0), tcp6=previous.get(ConfigSlot.TCP6_PORT, 0),
                udp4=previous.get(ConfigSlot.UDP4_PORT, 0), udp6=previous.get(ConfigSlot.UDP6_PORT, 0),
            ))
        stack.callback(self.listeners.close)
        ports = self.listeners.ports
        inputs = self.state.inputs()
        self.state.put_in_force(await self._kernel_async(compile_inputs, inputs, self.state.identities), inputs.learned)
        self._streams = open_flow_streams(self.config.flows, max_bytes=self.config.flows_max_bytes,
                                          max_backups=self.config.flows_max_backups)
        stack.callback(close_flow_streams, self._streams)
        self.sink = FlowSink(self._streams, node_name=self.config.node_name or default_node_name())
        self.flow_server = FlowServer(self.sink, str(self.config.socket_path))  # served through the agent socket
        live = self.state.live
        assert live is not None
        factory = SessionFactory(
            policy=live,
            resolver=IpcachePeers(own_ports=frozenset({ports.tcp4, ports.tcp6, ports.udp4, ports.udp6})),
            flows=self.sink,
            follow_reloads=True,
        )
        self.proxy = Proxy(
            config=ProxyConfig(transparent=True, drain_timeout_s=self.config.drain_timeout_s),
            factory=factory.session,
            upstream=None,
            flows=self.sink,
            metrics=self.metrics,
            datagram_factory=factory.datagram,
            learn=self.learn,
        )
        tcp = [s for s in (self.listeners.tcp4, self.listeners.tcp6) if s is not None]
        udp = [s for s in (self.listeners.udp4, self.listeners.udp6) if s is not None]
        handover = self._granted is not None
        if not handover:  # after a crash nobody accepts: serve at once
            await self.proxy.start(tcp, udp)
        try:
            # Restart (issue 13 item 6): adopt the pinned state, replace the programs in place, and keep
            # enforcing on stop; what is stale goes only once our programs run.
            steering = Steering(proxy_ports=ports, sockmap=self.config.sockmap, sockmap_ports=(), pin_dir=self.config.bpf_pin_dir)
            self.steering = await self._kernel_async(steering.__enter__)
            stack.callback(self._kernel, lambda: steering.close(keep=True))  # SIGTERM: the kernel keeps enforcing
            stack.callback(setattr, self, "steering", None)
            try:  # a tuple the proxy closed first (TIME_WAIT) can be reused by its pod at once
                await self._kernel_async(steering.steer_time_wait, tcp)
            except (BpfLoadError, AttachError) as e:
                log.warning("sk_lookup not attached, so a pod reusing a port within 60 s of a connection the "
                            "proxy closed first times out: %s", e)
            self._adopt_endpoint_ids(steering)
            self.reconciler = Reconciler(self.steering, resolve=self._resolve_ip)
            async with self._lock:
                await self._recompile_locked(reason="start", count=False)
            for item in await self._kernel_async(steering.cleanup_stale):
                log.warning("removed stale %s", item)
            if handover:  # the running agent accepts meanwhile: we join once the kernel is ours
                await self.proxy.start(tcp, udp)
            await self._start_workers(self.config.workers)
        except BaseException:
            await self._stop_workers()
            await self.proxy.drain()
            raise

    def _metrics_route(self) -> tuple[int, str, bytes]:
        return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics_exposition().encode()

    def _announce(self) -> None:
        assert self.listeners is not None and self.applied is not None
        ports = self.listeners.ports
        print(
            f"membrane agent ready: {len(self.applied.attached)} endpoint(s) attached, proxy tcp {ports.tcp4}/{ports.tcp6} "
            f"udp {ports.udp4}/{ports.udp6}, {1 + len(self.workers)} worker(s)"
            f"{', sockmap on' if self.config.sockmap else ''}",
            file=self.out,
            flush=True,
        )

    async def _serve(self, stop: asyncio.Event) -> None:
        last_poll = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), EVENTS_S)
            woken = self._wake.is_set()  # a source changed (a watch event, a CNI call) or a signal came
            self._wake.clear()
            if stop.is_set():
                break
            try:
                await self._read_drops()
                now = time.monotonic()
                if self._frozen:
                    continue  # a successor is taking over the kernel: no writes from us
                if woken or now - last_poll >= POLL_S:
                    last_poll = now
                    await self._poll()
            except Exception:  # one bad round must not take the node's enforcement down
                log.exception("agent loop error")

    async def _poll(self) -> None:
        changes = self.source.poll()
        if changes:
            if self._change_seen is None:
                self._change_seen = time.monotonic()
            reason = "kubernetes change" if self.k8s is not None else "file change"
            self._submit_policy_status()
            if self._take(changes, reason=reason):
                await self.recompile(reason=reason)
                return
        elif self.state.learned() != self.state.compiled_learned:
            await self.recompile(reason="dns ttl expiry")
            return
        elif self.applied is not None and interfaces_changed(self.state.endpoints, self.applied.attached):
            await self._reattach()
        await self.write_status()

    async def _read_drops(self) -> None:
        pmap = self.state.pmap
        if self.steering is None or pmap is None or self.sink is None:
            return
        for event in await self._kernel_async(self.steering.read_drop_events):
            self.drops += 1
            flow = drop_flow(pmap, event)
            self.metrics.drops.inc((flow.reason or "unknown").upper(), flow.context.traffic_direction)  # hubble_drop_total spelling
            self.sink.emit(flow)

    # --- metrics (--metrics) ------------------------------------------------------------------------
    def _policy_metrics(self, reason: str) -> None:
        """After a reload: policies in force, invalid objects, the reload, and the change-to-enforcement delay."""
        m = self.metrics
        m.policies.set(float(sum(len(p) for p in self.state.policies.values())))
        m.policy_import_errors.set(float(len(self.state.error_lines)))
        m.policy_reloads.inc(reason)
        if self._change_seen is not None and reason in ("file change", "kubernetes change"):
            m.policy_delay.observe(time.monotonic() - self._change_seen)
            self._change_seen = None

    def _endpoint_metrics(self) -> None:
        """Endpoints by state: ready (attached), waiting-for-interface, not-local (known, not on this node)."""
        applied = self.applied
        attached = applied.attached if applied is not None else {}
        waiting = applied.waiting if applied is not None else {}
        known = len(self.state.endpoints.endpoints)
        self.metrics.endpoints.set(float(len(attached)), "ready")
        self.metrics.endpoints.set(float(len(waiting)), "waiting-for-interface")
        self.metrics.endpoints.set(float(max(known - len(attached) - len(waiting), 0)), "not-local")

    def metrics_exposition(self) -> str:
        """This process's metrics plus every worker's latest snapshot (sent over the control channel)."""
        if not self._worker_metrics:
            return self.metrics.exposition()
        return self.metrics.merged(list(self._worker_metrics.values())).exposition()

    async def _stop(self) -> None:
        assert self.proxy is not None
        if self._handed_over:  # connections accepted just before have their first request on the way: let it land
            await asyncio.sleep(min(HANDOVER_GRACE_S, self.config.drain_timeout_s))
        log.info("stopping: draining %d connections", len(self.proxy.connections))
        await asyncio.gather(self._stop_workers(), self.proxy.drain())
        await self._read_drops()


def covers(learned: Learned, action: Learn) -> bool:
    """True when `learned` holds every (name, IP) pair of `action`."""
    for name in action.names:
        have = learned.get(fqdn(name), frozenset())
        for ip in action.ips:
            text = canonical_ip(ip)
            if text is not None and text not in have:
                return False
    return True


def run_agent(config: AgentConfig) -> int:
    """`membrane run`: returns 0 after a clean stop, 1 on invalid input, 2 on usage or attach errors."""
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per API request would drown the agent's own
    if os.geteuid() != 0:
        print("membrane run: needs root (eBPF programs, tc, policy routing, IP_TRANSPARENT)", file=sys.stderr)
        return 2
    agent = Agent(config)
    try:
        return uvloop.run(agent.run())
    except (BpfLoadError, AttachError, OSError) as e:
        print(f"membrane run: {e}", file=sys.stderr)
        return 2
    finally:
        agent._kx.shutdown(wait=True)
