"""`python -m membrane.sandbox.apiserver --port P --state-dir D`: run the double by hand.

Writes D/kubeconfig, prints `apiserver ready kubeconfig=D/kubeconfig url=...` and serves until SIGINT or
SIGTERM. With --keep-state, objects are saved to D/state.json at exit and loaded at the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

from membrane.sandbox.apiserver.server import ApiServer


async def _main(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    server = ApiServer(state_dir=state_dir, host=args.host, port=args.port, token=args.token,
                       history_size=args.history_size, bookmark_interval_s=args.bookmark_interval)
    state_file = state_dir / "state.json"
    if args.keep_state and state_file.exists():
        server.store.load(json.loads(state_file.read_text()))
    await server.start()
    kubeconfig = server.write_kubeconfig(state_dir / "kubeconfig")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"apiserver ready kubeconfig={kubeconfig} url={server.url}", flush=True)
    await stop.wait()
    await server.stop()
    if args.keep_state:
        state_file.write_text(json.dumps(server.store.dump()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m membrane.sandbox.apiserver", description=__doc__)
    parser.add_argument("--port", type=int, default=6443, help="TCP port (0: any free port); default 6443")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; default 127.0.0.1")
    parser.add_argument("--state-dir", required=True, help="directory for certificates, kubeconfig and state")
    parser.add_argument("--token", default=None, help="bearer token to accept (default: a random one)")
    parser.add_argument("--history-size", type=int, default=10_000, help="watch events kept (older RVs get 410)")
    parser.add_argument("--bookmark-interval", type=float, default=5.0, help="seconds between watch bookmarks")
    parser.add_argument("--keep-state", action="store_true", help="save objects to STATE_DIR/state.json at exit")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
