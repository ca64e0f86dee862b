"""An ApiServer on an event loop of its own, in a daemon thread: for synchronous tests and tools.

Every method hops onto the server's loop and waits for the result, so the store and the fault hooks
are only ever touched from that loop (the Store is not thread-safe and needs no locks this way).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from membrane.sandbox.apiserver.resources import CATALOG, ResourceType
from membrane.sandbox.apiserver.server import ApiServer
from membrane.sandbox.apiserver.store import Store

T = TypeVar("T")


class ApiServerThread:
    """Runs an ApiServer until close(); a context manager.

        with ApiServerThread(state_dir=tmp) as api:
            api.kubeconfig            # written at start
            api.call(lambda s: s.store.put(pod))
            api.restart(keep_data=False)
    """

    def __init__(self, *, state_dir: Path, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="apiserver-double", daemon=True)
        self._thread.start()
        self.server: ApiServer = self._run_sync(lambda: ApiServer(state_dir=state_dir, **kwargs))
        self._await(self.server.start())
        self.kubeconfig: Path = self.server.write_kubeconfig()

    def _await(self, coro: Any, timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def _run_sync(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()
        result: T = self._await(run())
        return result

    def call(self, fn: Callable[[ApiServer], T]) -> T:
        """Runs fn(server) on the server's loop and returns its result (exceptions propagate)."""
        return self._run_sync(lambda: fn(self.server))

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def token(self) -> str:
        return self.server.token

    @property
    def ca_cert(self) -> Path:
        return self.server.tls.ca_cert

    @property
    def store(self) -> Store:
        """The store, for reading in tests (write through call() so writes happen on the loop)."""
        return self.server.store

    @staticmethod
    def store_type(group: str, plural: str) -> ResourceType:
        """The served type of (group, plural), for Store calls in tests."""
        for rt in CATALOG:
            if rt.group == group and rt.plural == plural:
                return rt
        raise KeyError((group, plural))

    def cut_watches(self) -> int:
        return self.call(lambda s: s.cut_watches())

    def compact(self) -> None:
        self.call(lambda s: s.compact())

    def rotate_token(self, new: str | None = None) -> str:
        """Rotates the token and rewrites the kubeconfig with the new one. Returns the new token."""
        token = self.call(lambda s: s.rotate_token(new))
        self.call(lambda s: s.write_kubeconfig(self.kubeconfig))
        return token

    def watching_resources(self) -> list[str]:
        """See ApiServer.watching_resources."""
        return self.call(lambda s: s.watching_resources())

    def inject_errors(self, count: int, *, code: int = 500, path_prefix: str = "") -> None:
        self.call(lambda s: s.inject_errors(count, code=code, path_prefix=path_prefix))

    def restart(self, *, keep_data: bool = True) -> None:
        """Stops and starts on the same port at once (see ApiServer.restart)."""
        self._await(self.server.restart(keep_data=keep_data))

    def stop(self) -> None:
        """Takes the server down (connections reset, port closed) until start(): an outage of any length."""
        self._await(self.server.stop())

    def start(self, *, keep_data: bool = True) -> None:
        """Brings a stopped server back on the same port, with or without its data."""
        if not keep_data:
            self.call(lambda s: s.reset_data())
        self._await(self.server.start())

    def close(self) -> None:
        if not self._loop.is_closed():
            self._await(self.server.stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> ApiServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
