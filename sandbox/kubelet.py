"""The sandbox's kubelet: every Pod bound to this node becomes a network namespace, set up through CNI.

For each Pod of this node (and each Pod with no `spec.nodeName`, which it binds here, acting as the
scheduler too): create the named namespace `<namespace>-<name>` (what `ip netns exec` enters), run
the CNI chain ADD into it (ptp + host-local + membrane-cni by default, so the pod is under policy
before it is reported running), and write `status.podIP(s)`, `phase: Running` and `Ready` through
the `/status` subresource. A deleted Pod is torn down through CNI DEL and its namespace removed.
`close()` tears down every pod it made. Blocking work (CNI, `ip netns`) runs on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightkube import AsyncClient
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType
from membrane.control.sources.reflector import Kind, Reflector
from membrane.sandbox.cni_runtime import CniPluginError, CniRuntime, NetworkList

log = logging.getLogger("membrane.sandbox.kubelet")
MAX_NETNS_NAME = 255


def netns_name(namespace: str, name: str) -> str:
    """The network namespace a pod lives in: `<namespace>-<name>`, as `ip netns exec` names it."""
    return f"{namespace}-{name}"[:MAX_NETNS_NAME]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LocalPod:
    namespace: str
    name: str
    uid: str
    netns: str
    ips: tuple[str, ...] = ()
    error: str | None = None


@dataclass
class Kubelet:
    """Runs pods of `node_name` as namespaces. `pods` holds what it made, keyed ns/name."""

    client: AsyncClient
    node_name: str
    runtime: CniRuntime
    network: NetworkList
    pods: dict[str, LocalPod] = field(default_factory=dict)
    _reflector: Reflector | None = None
    _task: asyncio.Task[None] | None = None
    _work: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    _worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._reflector = Reflector(self.client, Kind("pods", Pod, namespaced=True), self._changed)
        self._task = asyncio.create_task(self._reflector.run(), name="kubelet-pods")
        self._worker = asyncio.create_task(self._work_loop(), name="kubelet-work")
        await self._reflector.synced.wait()

    def _changed(self, _kind: str) -> None:
        self._work.put_nowait("sync")

    async def _work_loop(self) -> None:
        while True:
            await self._work.get()
            while not self._work.empty():  # coalesce a burst into one pass
                self._work.get_nowait()
            try:
                await self.sync()
            except Exception:  # one bad pass must not stop the kubelet; the next change retries
                log.exception("kubelet sync failed")

    async def sync(self) -> None:
        """Make the namespaces match the Pods: bind unbound pods, start new ones, stop deleted ones."""
        assert self._reflector is not None
        wanted: dict[str, Mapping[str, Any]] = {}
        for key, pod in list(self._reflector.store.items()):
            spec, meta = pod.get("spec") or {}, pod.get("metadata") or {}
            if spec.get("hostNetwork"):
                continue
            node = spec.get("nodeName")
            if not node:
                await self._bind(meta)
                continue
            if node == self.node_name and not meta.get("deletionTimestamp"):
                wanted[key] = pod
        for key in [k for k in self.pods if k not in wanted or self.pods[k].uid != wanted[k]["metadata"].get("uid")]:
            await asyncio.to_thread(self._stop, self.pods.pop(key))
        for key, wanted_pod in wanted.items():
            if key not in self.pods:
                local = await asyncio.to_thread(self._start, wanted_pod)
                self.pods[key] = local
                await self._report(local)

    async def _bind(self, meta: Mapping[str, Any]) -> None:
        with contextlib.suppress(Exception):  # it may be gone already; the next change says so
            await self.client.patch(Pod, str(meta["name"]), {"spec": {"nodeName": self.node_name}},
                                    namespace=str(meta.get("namespace") or "default"), patch_type=PatchType.MERGE)

    def _start(self, pod: Mapping[str, Any]) -> LocalPod:
        meta = pod["metadata"]
        ns, name = str(meta.get("namespace") or "default"), str(meta["name"])
        local = LocalPod(namespace=ns, name=name, uid=str(meta.get("uid", "")), netns=netns_name(ns, name))
        subprocess.run(["ip", "netns", "add", local.netns], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "exec", local.netns, "ip", "link", "set", "lo", "up"], capture_output=True, check=False)
        try:
            result = self.runtime.add(self.network, local.uid or local.netns, f"/var/run/netns/{local.netns}", "eth0",
                                      {"K8S_POD_NAMESPACE": ns, "K8S_POD_NAME": name, "K8S_POD_UID": local.uid})
        except (CniPluginError, OSError, subprocess.SubprocessError) as e:
            local.error = str(e)
            log.error("pod %s/%s: CNI ADD failed: %s", ns, name, e)
            return local
        local.ips = tuple(str(ip["address"]).split("/")[0] for ip in result.get("ips") or [])
        log.info("pod %s/%s running in netns %s with %s", ns, name, local.netns, ", ".join(local.ips))
        return local

    def _stop(self, local: LocalPod) -> None:
        try:
            self.runtime.delete(self.network, local.uid or local.netns, f"/var/run/netns/{local.netns}", "eth0",
                                {"K8S_POD_NAMESPACE": local.namespace, "K8S_POD_NAME": local.name})
        except (CniPluginError, OSError, subprocess.SubprocessError) as e:
            log.warning("pod %s/%s: CNI DEL: %s", local.namespace, local.name, e)
        subprocess.run(["ip", "netns", "del", local.netns], capture_output=True, check=False)

    def _spec_of(self, local: LocalPod) -> Mapping[str, Any]:
        pod = self._reflector.store.get(f"{local.namespace}/{local.name}") if self._reflector is not None else None
        return (pod or {}).get("spec") or {}

    async def _report(self, local: LocalPod) -> None:
        now = _now()
        if local.error is not None:
            status: dict[str, Any] = {"phase": "Pending", "conditions": [
                {"type": "Ready", "status": "False", "reason": "NetworkNotReady", "message": local.error, "lastTransitionTime": now}]}
        else:
            containers = [c.get("name", "main") for c in (self._spec_of(local).get("containers") or [{"name": "main"}])]
            status = {
                "phase": "Running",
                "containerStatuses": [{"name": n, "ready": True, "restartCount": 0, "started": True,
                                       "state": {"running": {"startedAt": now}}} for n in containers],
                "podIP": local.ips[0] if local.ips else None,
                "podIPs": [{"ip": ip} for ip in local.ips],
                "startTime": now,
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
            }
        try:
            await self.client.patch(Pod.Status, local.name, {"status": status}, namespace=local.namespace,
                                    patch_type=PatchType.MERGE)
        except Exception as e:  # a pod deleted meanwhile: the next sync stops it
            log.warning("pod %s/%s: status not written: %s", local.namespace, local.name, e)

    async def close(self) -> None:
        for task in (self._task, self._worker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for key in list(self.pods):
            await asyncio.to_thread(self._stop, self.pods.pop(key))


def default_network(pod_cidr: str, *, ipam_dir: Path, agent_socket: Path, queue_dir: Path, name: str = "membrane-sandbox") -> NetworkList:
    """ptp + host-local (one /32 route per pod on the host, as many routed CNIs do) chained to membrane-cni."""
    return NetworkList.parse({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {"type": "ptp", "ipMasq": False, "mtu": 1500,
             "ipam": {"type": "host-local", "subnet": pod_cidr, "dataDir": str(ipam_dir), "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "membrane-cni", "agentSocket": str(agent_socket), "queueDir": str(queue_dir)},
        ],
    })


__all__ = ["Kubelet", "LocalPod", "default_network", "netns_name"]
