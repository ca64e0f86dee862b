"""gRPC through `membrane gateway`: a grpcio client and server (h2c), unary and streaming, allowed and PERMISSION_DENIED."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.gateway_util import gateway

pytestmark = pytest.mark.integration


def grpc_policy(port: int) -> str:
    """The greeter accepts SayHello and Chat from the greeter client; every other method is denied."""
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: greeter-grpc
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: greeter
  ingress:
    - fromEndpoints:
        - matchLabels:
            app: greeter-client
      toPorts:
        - ports:
            - port: "{port}"
              protocol: TCP
          rules:
            http:
              - method: POST
                path: "/helloworld\\\\.Greeter/(SayHello|Chat|Download)"
"""


def _raw(b: bytes) -> bytes:
    return b


class _Greeter:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def _seen(self, name: str) -> None:
        with self.lock:
            self.calls.append(name)

    def say_hello(self, request: bytes, context: Any) -> bytes:
        self._seen("SayHello")
        return b"hello " + request

    def secret(self, request: bytes, context: Any) -> bytes:
        self._seen("Secret")
        return b"the secret"

    def chat(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        self._seen("Chat")
        for r in requests:
            yield r.upper()

    def download(self, request: bytes, context: Any) -> Iterator[bytes]:
        self._seen("Download")
        n = int(request)
        for i in range(n):
            yield bytes([i % 256]) * 65536


@contextmanager
def greeter_server() -> Iterator[tuple[int, _Greeter]]:
    greeter = _Greeter()
    handlers = {
        "SayHello": grpc.unary_unary_rpc_method_handler(greeter.say_hello, _raw, _raw),
        "Secret": grpc.unary_unary_rpc_method_handler(greeter.secret, _raw, _raw),
        "Chat": grpc.stream_stream_rpc_method_handler(greeter.chat, _raw, _raw),
        "Download": grpc.unary_stream_rpc_method_handler(greeter.download, _raw, _raw),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("helloworld.Greeter", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, greeter
    finally:
        server.stop(0)


def test_grpc_unary_allowed_denied_then_allowed_on_one_channel(tmp_path: Path) -> None:
    """A denied method ends with PERMISSION_DENIED (trailers-only grpc-status 7) and the next call on the same connection succeeds; the server never sees the denied call."""
    with greeter_server() as (port, greeter), gateway(
        tmp_path, grpc_policy(port), upstream_port=port, dst="default/greeter", src="default/greeter-client"
    ) as gw, grpc.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
        hello = channel.unary_unary("/helloworld.Greeter/SayHello", _raw, _raw)
        secret = channel.unary_unary("/helloworld.Greeter/Secret", _raw, _raw)
        assert hello(b"one", timeout=10) == b"hello one"
        with pytest.raises(grpc.RpcError) as excinfo:
            secret(b"x", timeout=10)
        assert excinfo.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert hello(b"two", timeout=10) == b"hello two"
        assert greeter.calls == ["SayHello", "SayHello"]
        flows = gw.wait_flows(5)
        denied = [f for f in flows if f["verdict"] == "DROPPED"]
        assert len(denied) == 1
        assert denied[0]["l7"]["http"]["url"].endswith("/helloworld.Greeter/Secret")
        assert denied[0]["Summary"].startswith("gRPC POST")


def test_grpc_streaming_both_ways(tmp_path: Path) -> None:
    """Bidirectional and server streaming calls pass untouched, with flow control over 16 MiB of responses."""
    with greeter_server() as (port, greeter), gateway(
        tmp_path, grpc_policy(port), upstream_port=port, dst="default/greeter", src="default/greeter-client"
    ) as gw, grpc.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
        chat = channel.stream_stream("/helloworld.Greeter/Chat", _raw, _raw)
        out = list(chat(iter([f"msg-{i}".encode() for i in range(200)]), timeout=20))
        assert out == [f"MSG-{i}".encode() for i in range(200)]
        download = channel.unary_stream("/helloworld.Greeter/Download", _raw, _raw)
        chunks = list(download(b"256", timeout=30))
        assert len(chunks) == 256
        assert all(c == bytes([i % 256]) * 65536 for i, c in enumerate(chunks))
        assert greeter.calls == ["Chat", "Download"]
