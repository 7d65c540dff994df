"""The gRPC origin of bench/proxy.py: a grpcio server answering `/bench.Echo/Unary` with a
fixed 1 KB message, whatever the request. (grpcio's threaded server: on these machines it
answers about 1.6 times as many calls per second as its asyncio one.)

    python -m bench.grpcorigin --port PORT [--threads 8]
"""

from __future__ import annotations

import argparse
from concurrent import futures

import grpc

REPLY = b"x" * 1024


def unary(request: bytes, context) -> bytes:
    return REPLY


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.grpcorigin", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=8)
    args = p.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(args.threads),
                         options=[("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", 1000)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)}),))
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
