"""The gRPC backend of the bench: a real grpcio server answering the unary method /bench.Echo/Call.

    python bench/peers/grpc_server.py PORT [--threads N]

Loopback only. The method is registered with a generic handler (bytes in, bytes out, no protobuf
codegen): each call gets an empty message back with grpc-status 0, as nginx's gRPC-shaped reply did,
so the bench measures the framing and the proxy, not serialisation. Any other method is UNIMPLEMENTED.
grpcio's server runs its handlers on a thread pool; the C core does the HTTP/2 work.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures

import grpc

SERVICE, METHOD = "bench.Echo", "Call"


def _call(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b""


def serve(port: int, threads: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads),
                         options=[("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", 1000)])
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        METHOD: grpc.unary_unary_rpc_method_handler(_call),  # no (de)serializers: raw bytes
    })
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"127.0.0.1:{port}") != port:
        sys.exit(f"grpc_server: could not bind 127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"grpc_server: serving /{SERVICE}/{METHOD} on 127.0.0.1:{port}", flush=True)
    stop.wait()
    server.stop(grace=1).wait()


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("--threads", type=int, default=8)
    a = p.parse_args()
    serve(a.port, a.threads)


if __name__ == "__main__":
    main()
