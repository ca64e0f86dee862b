"""The metrics/health HTTP endpoint: GET of a known path answers its route; other paths 404, other methods 405."""

from __future__ import annotations

import asyncio

import httpx
from membrane.proxy.metrics import Metrics, metrics_route, serve_http


def _get_all(routes: dict[str, object], requests: list[tuple[str, str]]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        server = await serve_http(routes, "127.0.0.1", 0)  # type: ignore[arg-type]
        port = server.sockets[0].getsockname()[1]
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                return [await client.request(method, path) for method, path in requests]
        finally:
            server.close()
            await server.wait_closed()
    return asyncio.run(main())


def test_metrics_only_on_its_path() -> None:
    """`/metrics` answers the exposition in Prometheus text format 0.0.4; `/` and others are 404 (not the metrics)."""
    m = Metrics()
    m.internal_errors.inc()
    ok, root, other = _get_all({"/metrics": metrics_route(m)}, [("GET", "/metrics?x=1"), ("GET", "/"), ("GET", "/metricsx")])
    assert ok.status_code == 200
    assert ok.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "membrane_proxy_internal_errors_total 1" in ok.text
    assert root.status_code == 404
    assert other.status_code == 404


def test_other_methods_and_failing_routes() -> None:
    """POST is 405; a route that raises answers 503 with the error, and the server keeps serving."""
    def broken() -> tuple[int, str, bytes]:
        raise RuntimeError("not ready: pods watch not synced")
    post, bad, again = _get_all({"/readyz": broken}, [("POST", "/readyz"), ("GET", "/readyz"), ("GET", "/readyz")])
    assert post.status_code == 405
    assert bad.status_code == 503
    assert "pods watch not synced" in bad.text
    assert again.status_code == 503
