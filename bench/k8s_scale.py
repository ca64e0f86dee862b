"""The Kubernetes source at cluster scale, against the API server double: what `make bench-k8s` runs.

A seeded cluster (default: 5,000 pods on 100 nodes, 50 of them on this node, 100 labelled namespaces,
500 CiliumNetworkPolicies of realistic kinds) is served by the in-repo API server double in a process
of its own; the measured process is a fresh interpreter that does what the agent's control plane does
with it: the real `KubernetesSource` (lightkube, LIST + WATCH of every kind), `compile_policy` with
the node's `IdentityAllocators`, and the pure kernel plan (`plan_kernel`, today in control/agent.py;
no kernel writes: those are measured separately). It measures

- ready: from the process's start (imports included; the wait for the double to seed its objects
  excluded) and from `source.start()` to synced + first
  compile + plan; peak RSS (VmHWM) and RSS after it; tracemalloc current/peak in a separate run
  (tracemalloc slows Python down 2-3x, so it never shares a run with a timing);
- changes: for every CNP edit, pod add and pod delete (on this node and on others), the time from
  the watch event's arrival (the reflector's `on_change`) to the recompiled policy and plan, split
  into the source's coalescing pause, `view()`, `compile_policy` and `plan_kernel`; also the time
  from the server's write to the event's arrival (CLOCK_MONOTONIC is shared by both processes);
- memory per pod: the same cluster at several pod counts (default 0, 5,000, 20,000), RSS and
  tracemalloc after ready, least-squares slope in bytes per pod.

    .venv/bin/python bench/k8s_scale.py                      # everything, 3 rounds, medians (~10 min)
    .venv/bin/python bench/k8s_scale.py --quick              # 1 round, 20 changes per kind, sizes 0/5000
    .venv/bin/python bench/k8s_scale.py --only ready --only changes --rounds 5
    .venv/bin/python bench/k8s_scale.py --profile            # cProfile of sync + first compile, top 25

Nothing here asserts: it prints Markdown tables and writes bench/results/k8s_scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
THIS_NODE = "node-000"
APPS = ("frontend", "api", "auth", "catalog", "cart", "checkout", "search", "worker", "cache", "db")
TEAMS = ("retail", "payments", "platform", "data", "identity", "growth", "infra", "mobile", "search", "ops")
ENVS = ("prod", "staging", "dev")


# --- the cluster -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    """How big the seeded cluster is."""

    pods: int = 5000
    nodes: int = 100
    local_pods: int = 50  # pods on THIS_NODE (the rest spread over the other nodes)
    namespaces: int = 100
    cnps: int = 500
    seed: int = 1
    lean_pods: bool = False  # pods with only the fields the agent reads (default: the fields a real pod has)


def namespace_name(i: int) -> str:
    return f"ns-{i:03d}"


def node_name(i: int) -> str:
    return f"node-{i:03d}"


def namespace(i: int) -> dict[str, Any]:
    name = namespace_name(i)
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, "team": TEAMS[i % len(TEAMS)],
                                                  "env": ENVS[i % len(ENVS)]}}}


def node(i: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node_name(i), "labels": {"kubernetes.io/hostname": node_name(i)}},
            "status": {"addresses": [{"type": "InternalIP", "address": f"172.16.{i // 250}.{i % 250 + 1}"},
                                     {"type": "Hostname", "address": node_name(i)}]}}


def pod_node(shape: Shape, i: int) -> int:
    """Node index of pod i: the first `local_pods` pods go to this node, the others round-robin elsewhere."""
    if i < shape.local_pods or shape.nodes == 1:
        return 0
    return 1 + (i - shape.local_pods) % (shape.nodes - 1)


def pod(shape: Shape, i: int, *, name: str | None = None, node_index: int | None = None) -> dict[str, Any]:
    """Pod i: a replica of one of the namespace's deployments (so pods share label sets, as in a cluster)."""
    ns = i % shape.namespaces
    app = APPS[(i // shape.namespaces) % len(APPS)]
    n = pod_node(shape, i) if node_index is None else node_index
    name = name or f"{app}-{i:06d}"
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace_name(ns),
                         "labels": {"app": app, "version": "v2" if ns % 4 == 0 else "v1",
                                    "pod-template-hash": f"{ns:03d}{APPS.index(app):02d}abc",
                                    "tier": "backend" if app in ("api", "db", "cache", "worker") else "frontend"}},
            "spec": {"nodeName": node_name(n), "serviceAccountName": app,
                     "containers": [{"name": app, "image": f"registry.example/{app}:1.0"}]},
            "status": {"phase": "Running", "podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}]}}
    if not shape.lean_pods:
        _dress(obj, i, n)
    return obj


def _dress(obj: dict[str, Any], i: int, n: int) -> None:
    """What else a Deployment's pod carries on a real API server (owner, managedFields, probes, env,
    volumes, tolerations, conditions, container statuses): about 4 KB of JSON that the agent never reads."""
    meta, spec, status = obj["metadata"], obj["spec"], obj["status"]
    app = meta["labels"]["app"]
    rs = f"{app}-{meta['labels']['pod-template-hash']}"
    when = "2026-12-01T08:00:00Z"
    uid = f"{i:08x}-0000-4000-8000-{n:012x}"
    meta.update(generateName=f"{rs}-", uid=uid, creationTimestamp=when,
                annotations={"prometheus.io/scrape": "true", "prometheus.io/port": "9090",
                             "kubectl.kubernetes.io/restartedAt": when},
                ownerReferences=[{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs, "uid": uid[::-1],
                                  "controller": True, "blockOwnerDeletion": True}],
                managedFields=[
                    {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": when,
                     "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {
                         f"f:{k}": {} for k in meta["labels"]}, "f:ownerReferences": {}}, "f:spec": {
                         "f:containers": {f'k:{{"name":"{app}"}}': {"f:env": {}, "f:image": {}, "f:ports": {},
                                                                    "f:resources": {}, "f:livenessProbe": {}}},
                         "f:dnsPolicy": {}, "f:restartPolicy": {}, "f:volumes": {}}}},
                    {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": when,
                     "fieldsType": "FieldsV1", "subresource": "status", "fieldsV1": {"f:status": {
                         "f:conditions": {f'k:{{"type":"{t}"}}': {".": {}, "f:lastTransitionTime": {}, "f:status": {}}
                                          for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")},
                         "f:containerStatuses": {}, "f:hostIP": {}, "f:podIP": {}, "f:podIPs": {}, "f:startTime": {}}}}])
    container = spec["containers"][0]
    container.update(
        ports=[{"name": "http", "containerPort": 8080, "protocol": "TCP"}, {"name": "metrics", "containerPort": 9090,
                                                                              "protocol": "TCP"}],
        env=[{"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
             {"name": "LOG_LEVEL", "value": "info"}, {"name": "UPSTREAM", "value": f"http://api.{meta['namespace']}:8080"}],
        resources={"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        livenessProbe={"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 10},
        readinessProbe={"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 5},
        volumeMounts=[{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                       "readOnly": True}],
        imagePullPolicy="IfNotPresent", terminationMessagePath="/dev/termination-log",
        terminationMessagePolicy="File")
    spec.update(
        volumes=[{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1",
                                                                          "fieldPath": "metadata.namespace"}}]}}]}}],
        tolerations=[{"key": f"node.kubernetes.io/{t}", "operator": "Exists", "effect": "NoExecute",
                      "tolerationSeconds": 300} for t in ("not-ready", "unreachable")],
        dnsPolicy="ClusterFirst", restartPolicy="Always", schedulerName="default-scheduler",
        securityContext={"runAsNonRoot": True}, terminationGracePeriodSeconds=30, priority=0,
        enableServiceLinks=True, preemptionPolicy="PreemptLowerPriority")
    status.update(
        hostIP=f"172.16.{n // 250}.{n % 250 + 1}", qosClass="Burstable", startTime=when,
        conditions=[{"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": when}
                    for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
        containerStatuses=[{"name": app, "ready": True, "started": True, "restartCount": 0,
                            "image": container["image"], "imageID": f"registry.example/{app}@sha256:{'ab' * 32}",
                            "containerID": f"containerd://{i:064x}", "state": {"running": {"startedAt": when}},
                            "lastState": {}}])


def pod_ip(i: int) -> str:
    """10.64.0.0/10 holds 4M addresses: enough for any size benched here, one per pod index."""
    value = (10 << 24) + (64 << 16) + i + 2
    return ".".join(str(value >> s & 255) for s in (24, 16, 8, 0))


def _peer_app(rng: random.Random) -> dict[str, str]:
    return {"app": rng.choice(APPS)}


def cnp(shape: Shape, i: int, *, revision: int = 0) -> dict[str, Any]:
    """CNP i in namespace i % namespaces. Kinds by index (per 20): 8 L4 app-to-app, 4 L7 HTTP, 3 namespace
    selectors (namespace labels and other namespaces), 2 egress to kube-dns with DNS rules, 1 toFQDNs,
    2 deny (a CIDR or an env). `revision` changes a port, a path, a pattern or a CIDR in every kind, as an edit with kubectl would."""
    rng = random.Random(shape.seed * 1_000_003 + i)
    ns = namespace_name(i % shape.namespaces)
    subject = {"matchLabels": {"app": APPS[(i // shape.namespaces) % len(APPS)]}}
    port = str(8000 + i % 100 + 100 * (revision % 500))  # distinct for every revision
    kind = i % 20
    spec: dict[str, Any] = {"endpointSelector": subject}
    if kind < 8:
        spec["ingress"] = [{"fromEndpoints": [{"matchLabels": _peer_app(rng)}],
                            "toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}]
    elif kind < 12:
        spec["ingress"] = [{"fromEndpoints": [{"matchLabels": _peer_app(rng)}],
                            "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}],
                                         "rules": {"http": [{"method": "GET", "path": f"/api/v{revision}/.*"},
                                                            {"method": "POST", "path": "/api/orders",
                                                             "headers": ["X-Team: " + TEAMS[i % len(TEAMS)]]}]}}]}]
    elif kind < 15:
        team = TEAMS[rng.randrange(len(TEAMS))]
        spec["ingress"] = [{"fromEndpoints": [
            {"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.team": team}},
            {"matchLabels": {"k8s:io.kubernetes.pod.namespace": namespace_name(rng.randrange(shape.namespaces)),
                             "app": rng.choice(APPS)}},
            {"matchExpressions": [{"key": "k8s:io.cilium.k8s.namespace.labels.env", "operator": "In",
                                   "values": ["prod", "staging"]}]}],
            "toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}]
    elif kind < 17:
        spec["egress"] = [{"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system",
                                                            "k8s:k8s-app": "kube-dns"}}],
                           "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                                        "rules": {"dns": [{"matchPattern": "*.svc.cluster.local"},
                                                          {"matchPattern": f"*.r{revision}.example.com"}]}}]},
                          {"toEndpoints": [{}]}]
    elif kind < 18:
        spec["egress"] = [{"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system",
                                                            "k8s:k8s-app": "kube-dns"}}],
                           "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                                        "rules": {"dns": [{"matchPattern": "*"}]}}]},
                          {"toFQDNs": [{"matchName": f"api{i}.partner.example"}, {"matchPattern": "*.cdn.example.net"}],
                           "toPorts": [{"ports": [{"port": str(443 + revision), "protocol": "TCP"}]}]}]
    else:
        spec["ingress"] = [{"fromEntities": ["cluster"]}]
        if kind == 18:
            spec["ingressDeny"] = [{"fromCIDR": [f"10.{64 + rng.randrange(4)}.{(rng.randrange(256) + revision) % 256}.0/24"]}]
        else:
            spec["ingressDeny"] = [{"fromEndpoints": [{"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.env": "dev"}}],
                                    "toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}]
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": f"cnp-{i:04d}", "namespace": ns}, "spec": spec}


def cluster(shape: Shape) -> Iterator[dict[str, Any]]:
    """Every object of the seeded cluster, namespaces first (pods and CNPs need them)."""
    for i in range(shape.namespaces):
        yield namespace(i)
    yield {"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": "kube-system", "labels": {"kubernetes.io/metadata.name": "kube-system"}}}
    for i in range(shape.nodes):
        yield node(i)
    for i in range(shape.pods):
        yield pod(shape, i)
    for i in range(shape.cnps):
        yield cnp(shape, i)


# --- the server process ------------------------------------------------------------------------------------------


def serve(shape: Shape, state_dir: Path) -> int:
    """Child process: the API server double, seeded; then one JSON command per stdin line, one JSON answer
    per stdout line: {"op": "put", "obj": {...}} / {"op": "delete", "group", "plural", "ns", "name"}
    -> {"t": monotonic time of the write}."""
    from membrane.sandbox.apiserver import ApiServerThread

    with ApiServerThread(state_dir=state_dir, history_size=50_000, bookmark_interval_s=5.0) as api:
        t0 = time.monotonic()
        objs = list(cluster(shape))

        def seed(s: Any) -> None:
            for obj in objs:
                s.store.put(obj)

        api.call(seed)
        print(json.dumps({"kubeconfig": str(api.kubeconfig), "seed_s": time.monotonic() - t0, "objects": len(objs)}),
              flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "put":
                api.call(lambda s, o=cmd["obj"]: s.store.put(o))  # type: ignore[misc]
            elif cmd["op"] == "delete":
                rt = api.store_type(cmd["group"], cmd["plural"])
                api.call(lambda s, rt=rt, c=cmd: s.store.delete(rt, c["ns"], c["name"]))  # type: ignore[misc]
            else:
                break
            print(json.dumps({"t": time.monotonic()}), flush=True)
    return 0


# --- the measured process ----------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


async def measure(args: argparse.Namespace, started: float) -> dict[str, Any]:
    """One run in this (fresh) process. Returns the figures as a dict (printed as JSON by the caller)."""
    import tracemalloc

    if args.tracemalloc:
        tracemalloc.start()
    import_t0 = time.monotonic()
    from membrane.control.agent import plan_kernel
    from membrane.control.sources.kubernetes import KubernetesSource, client_from
    from membrane.policies import compile_policy
    from membrane.policies.identity import IdentityAllocators

    imported = time.monotonic()
    shape = Shape(pods=args.pods, nodes=args.nodes, local_pods=min(args.local_pods, args.pods),
                  namespaces=args.namespaces, cnps=args.cnps, lean_pods=args.lean_pods)
    out: dict[str, Any] = {"pods": shape.pods, "cnps": shape.cnps, "imports_s": imported - import_t0}
    with tempfile.TemporaryDirectory(prefix="mbr-k8s-scale-") as tmp:
        t_spawn = time.monotonic()
        server = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "_serve", "--state-dir", tmp, *_shape_args(shape),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 20)
        assert server.stdin is not None and server.stdout is not None
        try:
            hello = json.loads(await server.stdout.readline())
            server_wait_s = time.monotonic() - t_spawn  # the double seeding its objects: not the agent's time
            out["seed_s"] = hello["seed_s"]
            out["objects"] = hello["objects"]
            allocators = IdentityAllocators.new()
            endpoint_ids: dict[str, int] = {}
            arrivals: list[tuple[str, float]] = []
            compiled = asyncio.Event()
            timings: dict[str, float] = {}
            fired_at = [0.0]

            def compile_now() -> Any:
                t_view = time.monotonic()
                cpu0 = time.thread_time()
                view = source.view()
                t_compile = time.monotonic()
                pmap = compile_policy(view.policies, view.endpoints, {}, allocators)
                t_plan = time.monotonic()
                for key in sorted(view.local):
                    endpoint_ids.setdefault(key, len(endpoint_ids) + 1)
                attached = {key: 1000 + endpoint_ids[key] for key in view.local}  # fake ifindexes: no kernel here
                plan = plan_kernel(pmap, attached, endpoint_ids)
                t_done = time.monotonic()
                timings.update(view_s=t_compile - t_view, compile_s=t_plan - t_compile, plan_s=t_done - t_plan,
                               done=t_done, cpu_s=time.thread_time() - cpu0)
                return view, pmap, plan

            def on_change() -> None:
                fired_at[0] = time.monotonic()
                if not source.synced:
                    return
                compile_now()
                compiled.set()

            client = client_from(Path(hello["kubeconfig"]))
            source = KubernetesSource(client, THIS_NODE, on_change)
            for r in source.reflectors.values():
                inner = r.on_change

                def wrapped(kind: str, inner: Any = inner) -> None:
                    arrivals.append((kind, time.monotonic()))
                    inner(kind)

                r.on_change = wrapped
            profiler = None
            if args.profile:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            t_start = time.monotonic()
            await source.start()
            await source.wait_synced(120)
            t_synced = time.monotonic()
            view, pmap, plan = compile_now()
            t_ready = time.monotonic()
            if profiler is not None:
                profiler.disable()
                import pstats

                prof_path = RESULTS_DIR / "k8s-ready.prof"
                RESULTS_DIR.mkdir(exist_ok=True)
                profiler.dump_stats(prof_path)
                pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
            gc.collect()
            out.update(
                ready_from_process_s=t_ready - started - server_wait_s, server_wait_s=server_wait_s, ready_from_start_s=t_ready - t_start,
                sync_s=t_synced - t_start, first_view_s=timings["view_s"], first_compile_s=timings["compile_s"],
                first_plan_s=timings["plan_s"], first_cpu_s=timings["cpu_s"], endpoints=len(view.endpoints.endpoints), local=len(view.local),
                policies=len(view.policies), policy_errors=[str(e) for e in view.policy_errors],
                identities=len(pmap.identities), ipcache_entries=len(plan.identities),
                bpf_policy_entries=len(plan.ingress) + len(plan.egress), vm_hwm_kib=_status_kib("VmHWM"),
                vm_rss_kib=_status_kib("VmRSS"))
            if args.tracemalloc:
                cur, peak = tracemalloc.get_traced_memory()
                out.update(traced_current_b=cur, traced_peak_b=peak)
            del view, pmap, plan

            if args.changes > 0:
                await asyncio.sleep(0.5)  # let the sync's own trailing on_change settle
                changes = _change_script(shape, args.changes)
                per_kind: dict[str, list[dict[str, float]]] = {}
                for label, cmd in changes:
                    arrivals.clear()
                    compiled.clear()
                    server.stdin.write((json.dumps(cmd) + "\n").encode())
                    await server.stdin.drain()
                    written = json.loads(await server.stdout.readline())["t"]
                    try:
                        await asyncio.wait_for(compiled.wait(), 30)
                    except TimeoutError:
                        raise TimeoutError(f"no recompile after {label}: arrivals {arrivals}, "
                                           f"{ {n: (r.last_error, r.resource_version) for n, r in source.reflectors.items()} }") from None
                    first = min(t for _, t in arrivals)
                    per_kind.setdefault(label, []).append({
                        "event_to_ready_s": timings["done"] - first, "write_to_event_s": first - written,
                        "coalesce_s": fired_at[0] - first, "view_s": timings["view_s"],
                        "compile_s": timings["compile_s"], "plan_s": timings["plan_s"], "cpu_s": timings["cpu_s"]})
                out["changes"] = per_kind
            out["vm_hwm_end_kib"] = _status_kib("VmHWM")
            await source.stop()
            await client.close()
        finally:
            if server.returncode is None:
                with contextlib.suppress(Exception):
                    server.stdin.write(b'{"op": "quit"}\n')
                    await server.stdin.drain()
                try:
                    await asyncio.wait_for(server.wait(), 20)
                except TimeoutError:
                    server.kill()
                    await server.wait()
    return out


def _shape_args(shape: Shape) -> list[str]:
    return ["--pods", str(shape.pods), "--nodes", str(shape.nodes), "--local-pods", str(shape.local_pods),
            "--namespaces", str(shape.namespaces), "--cnps", str(shape.cnps)] + (["--lean-pods"] if shape.lean_pods else [])


def _change_script(shape: Shape, n: int) -> list[tuple[str, dict[str, Any]]]:
    """n CNP edits, then n/2 adds + n/2 deletes of pods on this node, then the same on other nodes,
    interleaved add/delete so the cluster keeps its size."""
    out: list[tuple[str, dict[str, Any]]] = []
    for k in range(n):
        i = (k * 37) % shape.cnps
        out.append(("cnp-edit", {"op": "put", "obj": cnp(shape, i, revision=1 + k)}))
    for label, node_index in (("pod-local", 0), ("pod-remote", 1 + shape.nodes // 2)):
        for k in range(max(1, n // 2)):
            i = shape.pods + 100_000 + k + (0 if node_index == 0 else 50_000)  # a fresh IP, a known label set
            obj = pod(shape, i, name=f"bench-{label}-{k}", node_index=node_index)
            out.append((f"{label}-add", {"op": "put", "obj": obj}))
            out.append((f"{label}-delete", {"op": "delete", "group": "", "plural": "pods",
                                            "ns": obj["metadata"]["namespace"], "name": obj["metadata"]["name"]}))
    return out


# --- the driver --------------------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace, *, pods: int, changes: int, trace: bool, profile: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "_measure", "--started", repr(time.monotonic()), "--changes", str(changes),
           "--pods", str(pods), "--nodes", str(args.nodes), "--local-pods", str(args.local_pods),
           "--namespaces", str(args.namespaces), "--cnps", str(args.cnps)]
    if args.lean_pods:
        cmd.append("--lean-pods")
    if trace:
        cmd.append("--tracemalloc")
    if profile:
        cmd.append("--profile")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    if profile:
        sys.stderr.write(proc.stderr)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in rows)


def _ms(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s >= 0.0995 else f"{s * 1000:.1f} ms"


def _fit(points: list[tuple[float, float]]) -> float:
    """Least-squares slope."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", nargs="?", default="drive", choices=("drive", "_serve", "_measure"), help=argparse.SUPPRESS)
    p.add_argument("--pods", type=int, default=5000)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--local-pods", type=int, default=50)
    p.add_argument("--namespaces", type=int, default=100)
    p.add_argument("--cnps", type=int, default=500)
    p.add_argument("--lean-pods", action="store_true", help="seed pods with only the fields the agent reads")
    p.add_argument("--changes", type=int, default=100, help="CNP edits per round; pod adds+deletes per locality too")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sizes", default="0,5000,20000", help="pod counts for the memory-per-pod fit")
    p.add_argument("--only", action="append", choices=("ready", "changes", "memory"), default=[])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--profile", action="store_true", help="cProfile sync + first compile once (top 25 by own time)")
    p.add_argument("--json", default=str(RESULTS_DIR / "k8s_scale.json"))
    p.add_argument("--state-dir", help=argparse.SUPPRESS)
    p.add_argument("--started", type=float, help=argparse.SUPPRESS)
    p.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "_serve":
        shape = Shape(pods=args.pods, nodes=args.nodes, local_pods=args.local_pods, namespaces=args.namespaces,
                      cnps=args.cnps, lean_pods=args.lean_pods)
        return serve(shape, Path(args.state_dir))
    if args.role == "_measure":
        result = asyncio.run(measure(args, args.started))
        print(json.dumps(result), flush=True)
        return 0
    return drive(args)


def drive(args: argparse.Namespace) -> int:
    if args.quick:
        args.rounds, args.changes, args.sizes = 1, 20, "0,5000"
    wants = set(args.only) or {"ready", "changes", "memory"}
    report: dict[str, Any] = {"args": vars(args), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "loadavg": os.getloadavg()}
    shape_txt = f"{'lean ' if args.lean_pods else ''}{args.pods} pods on {args.nodes} nodes ({args.local_pods} here), {args.namespaces} namespaces, {args.cnps} CNPs"
    if args.profile:
        run_child(args, pods=args.pods, changes=0, trace=False, profile=True)
    if wants & {"ready", "changes"}:
        runs = []
        for r in range(args.rounds):
            res = run_child(args, pods=args.pods, changes=args.changes if "changes" in wants else 0, trace=False)
            runs.append(res)
            print(f"round {r + 1}: ready {res['ready_from_process_s']:.2f} s from process start, "
                  f"HWM {res['vm_hwm_kib'] / 1024:.0f} MiB", file=sys.stderr)
        traced = run_child(args, pods=args.pods, changes=0, trace=True)
        report["runs"] = runs
        report["traced"] = traced
        first = runs[0]
        print(f"\n## Ready ({shape_txt}; median of {len(runs)} runs)\n")
        print("| measurement | result | goal |\n|---|---|---|")
        print(f"| ready: process start -> synced + first compile + plan | {_median(runs, 'ready_from_process_s'):.2f} s | <= 10 s |")
        print(f"| ... of which imports | {_median(runs, 'imports_s'):.2f} s | |")
        print(f"| ready: `source.start()` -> ready | {_median(runs, 'ready_from_start_s'):.2f} s | |")
        print(f"| ... LIST of every kind (synced) | {_median(runs, 'sync_s'):.2f} s | |")
        print(f"| ... first `view()` | {_ms(_median(runs, 'first_view_s'))} | |")
        print(f"| ... first `compile_policy` | {_ms(_median(runs, 'first_compile_s'))} | |")
        print(f"| ... first `plan_kernel` | {_ms(_median(runs, 'first_plan_s'))} | |")
        print(f"| ... CPU time of the first view + compile + plan | {_ms(_median(runs, 'first_cpu_s'))} | |")
        print(f"| peak RSS (VmHWM) at ready | {_median(runs, 'vm_hwm_kib') / 1024:.0f} MiB | <= 300 MB |")
        if "changes" in wants:
            print(f"| peak RSS (VmHWM) after the changes | {_median(runs, 'vm_hwm_end_kib') / 1024:.0f} MiB | <= 300 MB |")
        print(f"| RSS at ready | {_median(runs, 'vm_rss_kib') / 1024:.0f} MiB | |")
        print(f"| tracemalloc at ready: current / peak (separate run) | {traced['traced_current_b'] / 2**20:.0f} / "
              f"{traced['traced_peak_b'] / 2**20:.0f} MiB | |")
        print(f"\nendpoints {first['endpoints']} (local {first['local']}), policies {first['policies']} "
              f"(errors {len(first['policy_errors'])}), identities {first['identities']}, ipcache entries "
              f"{first['ipcache_entries']}, BPF policy entries {first['bpf_policy_entries']}")
        for e in first["policy_errors"][:5]:
            print(f"policy error: {e}")
        if "changes" in wants:
            print(f"\n## Changes: watch event -> recompiled + planned ({args.changes} CNP edits, {args.changes // 2} "
                  f"adds + deletes per locality, per round; all rounds pooled)\n")
            print("| change | n | p50 | p99 | max | coalesce p50 | view p50 | compile p50 | plan p50 | "
                  "CPU of view+compile+plan p50 / p99 | server write -> event p50 |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for label in runs[0]["changes"]:
                rows = [row for r in runs for row in r["changes"][label]]
                lat = [row["event_to_ready_s"] for row in rows]
                cpu = [row["cpu_s"] for row in rows]

                def med(k: str, rows: list[dict[str, float]] = rows) -> str:
                    return _ms(statistics.median(row[k] for row in rows))

                print(f"| {label} | {len(rows)} | {_ms(_pct(lat, 50))} | {_ms(_pct(lat, 99))} | {_ms(max(lat))} | "
                      f"{med('coalesce_s')} | {med('view_s')} | {med('compile_s')} | {med('plan_s')} | "
                      f"{_ms(_pct(cpu, 50))} / {_ms(_pct(cpu, 99))} | {med('write_to_event_s')} |")
            print("\nGoal: p99 <= 100 ms after the watch event (kernel writes not included; see above).")
    if "memory" in wants:
        sizes = [int(s) for s in args.sizes.split(",")]
        mem: dict[int, dict[str, list[float]]] = {}
        for n in sizes:
            for _ in range(max(1, args.rounds)):
                res = run_child(args, pods=n, changes=0, trace=False)
                tr = run_child(args, pods=n, changes=0, trace=True)
                m = mem.setdefault(n, {"rss": [], "hwm": [], "traced": [], "ready": []})
                m["rss"].append(res["vm_rss_kib"] * 1024)
                m["hwm"].append(res["vm_hwm_kib"] * 1024)
                m["ready"].append(res["ready_from_process_s"])
                m["traced"].append(tr["traced_current_b"])
                print(f"{n} pods: RSS {res['vm_rss_kib'] / 1024:.0f} MiB, traced {tr['traced_current_b'] / 2**20:.0f} MiB",
                      file=sys.stderr)
        report["memory"] = {str(k): v for k, v in mem.items()}
        print(f"\n## Memory per pod ({args.namespaces} namespaces, {args.cnps} CNPs, {args.nodes} nodes; medians of "
              f"{max(1, args.rounds)} runs per size)\n")
        print("| pods | ready (from process start) | RSS at ready | peak RSS (VmHWM) | tracemalloc current |")
        print("|---|---|---|---|---|")
        for n in sizes:
            m = mem[n]
            print(f"| {n} | {statistics.median(m['ready']):.2f} s | {statistics.median(m['rss']) / 2**20:.0f} MiB | "
                  f"{statistics.median(m['hwm']) / 2**20:.0f} MiB | {statistics.median(m['traced']) / 2**20:.1f} MiB |")
        for key, name in (("rss", "RSS"), ("hwm", "peak RSS"), ("traced", "tracemalloc")):
            slope = _fit([(n, statistics.median(mem[n][key])) for n in sizes])
            report.setdefault("per_pod_b", {})[key] = slope
            print(f"\n{name}: {slope:.0f} bytes per pod (least-squares slope over {', '.join(map(str, sizes))} pods)", end="")
        print()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
