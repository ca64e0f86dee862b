"""Wait until every pod of a DaemonSet is ready (the post-delete hook Job of the membrane chart).

helm waits for hook Jobs, not for hook DaemonSets; this Job is how `helm uninstall` waits until the
cleanup DaemonSet has finished on every node (its pods turn ready only after their init container,
which does the cleanup, has succeeded). It reads the DaemonSet through the API server with the pod's
service account (in-cluster by default; --server, --token-file and --ca-file for tests), standard
library only. Exit 0 when done, 1 on timeout, naming the nodes' count that did not finish.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def is_done(ds: dict[str, Any]) -> tuple[bool, str]:
    """Whether the DaemonSet's current generation is ready on every node it is scheduled to.

    Returns: (done, a one-line summary for the log).
    """
    status = ds.get("status") or {}
    generation = (ds.get("metadata") or {}).get("generation", 0)
    desired = int(status.get("desiredNumberScheduled", 0))
    ready = int(status.get("numberReady", 0))
    observed = int(status.get("observedGeneration", 0))
    summary = f"{ready}/{desired} nodes done (generation {observed}/{generation})"
    return observed >= generation and ready >= desired, summary


def fetch(server: str, namespace: str, name: str, token: str | None, context: ssl.SSLContext | None) -> dict[str, Any]:
    url = f"{server.rstrip('/')}/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}"
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10, context=context) as resp:
        body: dict[str, Any] = json.load(resp)
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wait_daemonset")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--timeout-seconds", type=float, default=300.0)
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    parser.add_argument("--server", default=None, help="default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT")
    parser.add_argument("--token-file", type=Path, default=SA_DIR / "token")
    parser.add_argument("--ca-file", type=Path, default=SA_DIR / "ca.crt")
    args = parser.parse_args(argv)
    server = args.server or "https://{}:{}".format(os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
    context = ssl.create_default_context(cafile=str(args.ca_file)) if server.startswith("https:") else None
    deadline = time.monotonic() + args.timeout_seconds
    summary = "no answer yet"
    while True:
        # Re-read each time: the token file rotates.
        token = args.token_file.read_text().strip() if args.token_file.is_file() else None
        try:
            done, summary = is_done(fetch(server, args.namespace, args.name, token, context))
            print(f"wait_daemonset: {args.namespace}/{args.name}: {summary}", flush=True)
            if done:
                return 0
        except (urllib.error.URLError, OSError, ValueError) as e:  # the API server may be restarting
            summary = f"error: {e}"
            print(f"wait_daemonset: {args.namespace}/{args.name}: {summary}", file=sys.stderr, flush=True)
        if time.monotonic() >= deadline:
            print(f"wait_daemonset: timed out after {args.timeout_seconds:g}s: {summary}", file=sys.stderr)
            return 1
        time.sleep(args.poll_seconds)


if __name__ == "__main__":
    sys.exit(main())
