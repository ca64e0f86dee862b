"""A Kubernetes API server double for tests, `membrane sandbox up` and the benchmarks.

No kube-apiserver can be installed on these machines, so this package speaks the real protocol
(HTTPS, bearer tokens, discovery, LIST/WATCH with resourceVersions, create/update/patch/delete, the
/status subresource, Tables) to real clients: kubectl, lightkube, httpx. Self-contained: it imports
nothing of the product. `ApiServer` runs on the caller's event loop; `ApiServerThread` runs one on a
loop of its own for synchronous tests and tools.
"""

from membrane.sandbox.apiserver.server import ApiServer, RequestRecord
from membrane.sandbox.apiserver.store import ApiError, Event, Store
from membrane.sandbox.apiserver.thread import ApiServerThread
from membrane.sandbox.apiserver.tls import ensure_certificates, write_kubeconfig

__all__ = ["ApiError", "ApiServer", "ApiServerThread", "Event", "RequestRecord", "Store", "ensure_certificates",
           "write_kubeconfig"]
