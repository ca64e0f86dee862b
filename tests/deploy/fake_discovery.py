"""A loopback stand-in for the few API server answers `helm template --dry-run=server` needs: version,
discovery of the kinds the chart renders, and GET of CustomResourceDefinitions by name (the chart's
`lookup`). Everything else is 404, as for an object that does not exist. Plain HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# group/version -> (resource, kind, namespaced) for every kind the chart renders.
RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [("serviceaccounts", "ServiceAccount", True), ("services", "Service", True)],
    "apiextensions.k8s.io/v1": [("customresourcedefinitions", "CustomResourceDefinition", False)],
    "rbac.authorization.k8s.io/v1": [("clusterroles", "ClusterRole", False), ("clusterrolebindings", "ClusterRoleBinding", False),
                                     ("roles", "Role", True), ("rolebindings", "RoleBinding", True)],
    "apps/v1": [("daemonsets", "DaemonSet", True)],
    "batch/v1": [("jobs", "Job", True)],
}
_CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"


class FakeDiscovery:
    """Serves discovery plus the CRDs in `crds` (name -> metadata). Use as a context manager."""

    def __init__(self, crds: dict[str, dict[str, Any]]) -> None:
        self.crds = crds
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                outer.requests.append(path)
                code, body = outer.answer(path)
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        gv = path.removeprefix("/apis/").removeprefix("/api/")
        if path == "/version":
            return 200, {"major": "1", "minor": "35", "gitVersion": "v1.35.0"}
        if path == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            groups = [{"name": g.split("/")[0], "versions": [{"groupVersion": g, "version": "v1"}],
                       "preferredVersion": {"groupVersion": g, "version": "v1"}} for g in RESOURCES if "/" in g]
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        if gv in RESOURCES and path in (f"/api/{gv}", f"/apis/{gv}"):
            res = [{"name": n, "singularName": n[:-1], "namespaced": ns, "kind": k, "verbs": ["get", "list"]} for n, k, ns in RESOURCES[gv]]
            return 200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": res}
        if path.startswith(_CRD_PATH) and path[len(_CRD_PATH):] in self.crds:
            name = path[len(_CRD_PATH):]
            return 200, {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                         "metadata": {"name": name, **self.crds[name]}}
        return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        port = self._server.server_address[1]
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "users": [{"name": "fake", "user": {"token": "t"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "membrane-system"}}],
        }))
        return path

    def __enter__(self) -> FakeDiscovery:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
