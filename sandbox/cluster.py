"""`membrane sandbox up`: a one-node Kubernetes cluster on this machine, for users and for tests.

It runs, in the foreground until SIGINT or SIGTERM: the API server double (HTTPS, kubectl works
against DIR/kubeconfig), this node's kubelet (every Pod for this node becomes a network namespace
`<namespace>-<name>` set up through ptp + host-local + membrane-cni, with its IP in
`status.podIP`), and the agent in Kubernetes mode. It prints `sandbox ready kubeconfig=DIR/kubeconfig`
once all of it is up and every pod from FILE runs, and on the way out removes everything it made
(pods through CNI DEL, the agent with `membrane uninstall`, the API server).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import yaml
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Namespace, Node, Pod
from membrane.sandbox.apiserver import ApiServer
from membrane.sandbox.cni_runtime import DEBIAN_CNI_PATH, CniRuntime
from membrane.sandbox.kubelet import Kubelet, default_network

log = logging.getLogger("membrane.sandbox")
DEFAULT_NODE = "membrane-sandbox"
T = TypeVar("T")


class SandboxError(Exception):
    """The sandbox could not come up; the message says which part and why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxConfig:
    state_dir: Path
    pods_file: Path | None = None
    node_name: str = DEFAULT_NODE
    pod_cidr: str | None = None  # None: a free 10.244.X.0/24
    agent_args: tuple[str, ...] = ()  # extra `membrane run` flags (e.g. --flows PATH)
    ready_timeout_s: float = 120.0


def read_pod_manifests(path: Path) -> list[dict[str, Any]]:
    """Pod manifests from a multi-document YAML file (as `kubectl apply -f` takes; `List` items too).

    Raises SandboxError naming the file and document for anything that is not a Pod.
    """
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except (OSError, yaml.YAMLError) as e:
        raise SandboxError(f"{path}: {e}") from None
    pods: list[dict[str, Any]] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        items = doc.get("items") if isinstance(doc, dict) and str(doc.get("kind", "")).endswith("List") else [doc]
        for j, item in enumerate(items or []):
            if not isinstance(item, dict) or item.get("kind") != "Pod" or not (item.get("metadata") or {}).get("name"):
                where = f"document {i + 1}" + (f" item {j + 1}" if items is not None and len(items) > 1 else "")
                raise SandboxError(f"{path}: {where}: expected a Pod with metadata.name")
            pods.append(item)
    return pods


def free_pod_cidr() -> str:
    """A 10.244.X.0/24 that no route on this machine uses yet (so parallel sandboxes do not collide)."""
    used = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True, check=False).stdout
    taken = set()
    for line in used.splitlines():
        with contextlib.suppress(ValueError):
            taken.add(ipaddress.ip_network(line.split()[0], strict=False))
    for _ in range(200):
        net = ipaddress.ip_network(f"10.244.{secrets.randbelow(200) + 20}.0/24")
        if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            return str(net)
    raise SandboxError("no free 10.244.X.0/24 for the sandbox's pods")


class Sandbox:
    """The running parts; `up()` starts them in order, `down()` stops whatever was started."""

    def __init__(self, config: SandboxConfig, *, out: IO[str] = sys.stdout) -> None:
        self.config = config
        self.out = out
        self.dir = config.state_dir
        self.api: ApiServer | None = None
        self.client: AsyncClient | None = None
        self.kubelet: Kubelet | None = None
        self.agent: subprocess.Popen[str] | None = None
        self.kubeconfig = self.dir / "kubeconfig"
        self.agent_socket = self.dir / "agent.sock"
        self.status_file = self.dir / "agent-status.json"
        self.pod_cidr = config.pod_cidr or free_pod_cidr()

    async def up(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        pods = read_pod_manifests(self.config.pods_file) if self.config.pods_file else []
        self.api = ApiServer(state_dir=self.dir / "apiserver")
        await self.api.start()
        self.api.write_kubeconfig(self.kubeconfig)
        self.client = AsyncClient(KubeConfig.from_file(str(self.kubeconfig)), field_manager="membrane-sandbox")
        await self._register_node()
        await self._create_pods(pods)
        await self._start_agent()
        runtime = CniRuntime([DEBIAN_CNI_PATH, Path(sys.executable).parent], self.dir / "cni-cache")
        network = default_network(self.pod_cidr, ipam_dir=self.dir / "ipam", agent_socket=self.agent_socket,
                                  queue_dir=self.dir / "cni-queue")
        self.kubelet = Kubelet(self.client, self.config.node_name, runtime, network)
        await self.kubelet.start()
        await self._wait_pods_running({f"{(p['metadata'].get('namespace') or 'default')}/{p['metadata']['name']}" for p in pods})

    async def _register_node(self) -> None:
        assert self.client is not None
        gateway = str(next(ipaddress.ip_network(self.pod_cidr).hosts()))
        node = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.config.node_name, "labels": {"kubernetes.io/hostname": self.config.node_name}},
            "status": {"addresses": [{"type": "InternalIP", "address": gateway},
                                     {"type": "Hostname", "address": self.config.node_name}]},
        }
        with contextlib.suppress(ApiError):  # kept from an earlier run of the same state dir
            await self.client.create(_model(Node, node))

    async def _create_pods(self, pods: Iterable[dict[str, Any]]) -> None:
        assert self.client is not None
        for pod in pods:
            meta = pod.setdefault("metadata", {})
            ns = meta.setdefault("namespace", "default")
            pod.setdefault("spec", {}).setdefault("nodeName", self.config.node_name)
            pod["spec"].setdefault("containers", [{"name": "main", "image": "sandbox"}])
            with contextlib.suppress(ApiError):
                await self.client.create(_model(Namespace, {"metadata": {"name": ns}}))
            try:
                await self.client.create(_model(Pod, pod))  # metadata.namespace names it
            except ApiError as e:
                raise SandboxError(f"pod {ns}/{meta.get('name')}: {e.status.message}") from None

    async def _start_agent(self) -> None:
        argv = [sys.executable, "-m", "membrane.cli", "run", "--kubernetes", "--kubeconfig", str(self.kubeconfig),
                "--node-name", self.config.node_name, "--socket", str(self.agent_socket),
                "--status-file", str(self.status_file), *self.config.agent_args]
        with open(self.dir / "agent.log", "a", encoding="utf-8") as log_file:  # the agent's log stays in DIR
            self.agent = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log_file, text=True, start_new_session=True)
        line = await asyncio.wait_for(asyncio.to_thread(_wait_for, self.agent, "agent ready"), self.config.ready_timeout_s)
        log.info("%s", line.strip())

    async def _wait_pods_running(self, keys: set[str]) -> None:
        assert self.kubelet is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.ready_timeout_s
        while True:
            made = self.kubelet.pods
            failed = {k: made[k].error for k in keys if k in made and made[k].error}
            if failed:
                raise SandboxError("pods could not start: " + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())))
            if all(k in made for k in keys):
                return
            if loop.time() > deadline:
                raise SandboxError(f"pods not running after {self.config.ready_timeout_s:g} s: {sorted(keys - set(made))}")
            await asyncio.sleep(0.05)

    async def down(self) -> None:
        if self.kubelet is not None:
            await self.kubelet.close()
            self.kubelet = None
        if self.agent is not None:
            with contextlib.suppress(ProcessLookupError):
                self.agent.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.agent.wait, 30)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                await asyncio.to_thread(self.agent.wait)
            self.agent = None
            subprocess.run([sys.executable, "-m", "membrane.cli", "uninstall", "--force"], capture_output=True, check=False)
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
            self.client = None
        if self.api is not None:
            await self.api.stop()
            self.api = None


def _model(cls: type[T], data: dict[str, Any]) -> T:
    """A lightkube model from a manifest (its from_dict is untyped)."""
    return cls.from_dict(data)  # type: ignore[attr-defined,no-any-return]


def _wait_for(proc: subprocess.Popen[str], expected: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if expected in line:
            return line
    raise SandboxError(f"the agent exited with status {proc.wait()} before printing {expected!r}")


async def run_sandbox(config: SandboxConfig, *, out: IO[str] = sys.stdout,
                      ready: Callable[[Sandbox], None] | None = None) -> int:
    """`membrane sandbox up`: start, print the ready line, serve until SIGINT/SIGTERM, tear down. Returns the exit status."""
    sandbox = Sandbox(config, out=out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await sandbox.up()
        except SandboxError as e:
            print(f"membrane sandbox: {e}", file=sys.stderr)
            return 1
        print(f"sandbox ready kubeconfig={sandbox.kubeconfig}", file=out, flush=True)
        if ready is not None:
            ready(sandbox)
        await stop.wait()
        return 0
    finally:
        await sandbox.down()

