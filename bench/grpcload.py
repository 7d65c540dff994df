"""gRPC unary load for bench/proxy.py: a grpcio (grpc.aio) client calling `/bench.Echo/Unary`
(a small request, a 1 KB reply) on one HTTP/2 connection, as a gRPC app would.

    python -m bench.grpcload --target HOST:PORT [--authority NAME] --duration 5 --concurrency 32
    python -m bench.grpcload --target HOST:PORT [--authority NAME] --duration 5 --rate 500

Closed loop (--concurrency N): N calls in flight at all times; the figure is calls per
second. Open loop (--rate R): calls start on a fixed schedule whatever came back, and each
latency runs from its scheduled start (no coordinated omission). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc

METHOD = "/bench.Echo/Unary"
REQUEST = b"x" * 64


def percentile(sorted_ms: list[float], p: float) -> float | None:
    if not sorted_ms:
        return None
    return sorted_ms[min(len(sorted_ms) - 1, int(round(p / 100 * (len(sorted_ms) - 1))))]


async def closed(call, concurrency: int, duration: float) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal errors
        while (now := time.perf_counter()) < deadline:
            try:
                await call(REQUEST, timeout=10)
                latencies.append((time.perf_counter() - now) * 1000)
            except grpc.RpcError:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - start


async def opened(call, rate: float, duration: float) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    n = int(rate * duration)
    start = time.perf_counter()

    async def one(at: float) -> None:
        nonlocal errors
        try:
            await call(REQUEST, timeout=10)
            latencies.append((time.perf_counter() - at) * 1000)
        except grpc.RpcError:
            errors += 1

    tasks = []
    for i in range(n):
        at = start + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(at)))
    await asyncio.gather(*tasks)
    return latencies, errors, time.perf_counter() - start


async def main_async(args) -> dict:
    options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
    if args.authority:
        options.append(("grpc.default_authority", args.authority))
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        call = channel.unary_unary(METHOD)
        await call(REQUEST, timeout=10)  # connected, and the path warm
        if args.rate:
            latencies, errors, elapsed = await opened(call, args.rate, args.duration)
        else:
            latencies, errors, elapsed = await closed(call, args.concurrency, args.duration)
    latencies.sort()
    out = {"completed": len(latencies), "errors": errors, "rps": len(latencies) / elapsed,
           "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
           "p999_ms": percentile(latencies, 99.9), "max_ms": latencies[-1] if latencies else None}
    if args.raw:
        out["latencies_ms"] = [round(x, 4) for x in latencies]
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.grpcload", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True)
    p.add_argument("--authority", default="")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--raw", action="store_true", help="include every latency")
    args = p.parse_args()
    print(json.dumps(asyncio.run(main_async(args))))


if __name__ == "__main__":
    main()
