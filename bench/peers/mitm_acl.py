"""mitmproxy addon for the bench: the same rule as bench/peers/policy.yaml (allow only GET /api).

Any other request is answered 403 `Access denied` by mitmproxy and never reaches the upstream.
Loaded by `mitmdump --mode reverse:http://127.0.0.1:PORT -s bench/peers/mitm_acl.py`.
"""

from mitmproxy import http


class MethodPathAcl:
    """Allows GET /api (the whole target, as Cilium matches it); refuses the rest with 403."""

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.request.method == "GET" and flow.request.path == "/api":
            return
        flow.response = http.Response.make(403, b"Access denied\r\n", {"Content-Type": "text/plain"})


addons = [MethodPathAcl()]
