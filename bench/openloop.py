"""A small open-loop (fixed-rate) HTTP/1.1 load generator.

    python -m bench.openloop --port P --host-header H --rate 500 --duration 5

Requests are sent on a fixed schedule whether or not earlier ones were answered (each on
an idle keep-alive connection, a new one when all are busy), so queueing in the system
under test shows up as latency instead of being hidden as with a closed loop (wrk).
Latency is measured from the moment a request is written to the moment its response is
complete; `late_p99_ms` says how far behind schedule the sends themselves were.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httptools


class Conn(asyncio.Protocol):
    __slots__ = ("transport", "parser", "sent_at", "done", "pool", "busy")

    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.sent_at = 0.0
        self.busy = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.pool.errors += 1
            self.transport.close()

    def on_message_complete(self):
        pool = self.pool
        pool.latencies.append(time.perf_counter() - self.sent_at)
        status = self.parser.get_status_code()
        if status != 200:
            pool.non_200 += 1
        self.busy = False
        pool.outstanding -= 1
        if self.parser.should_keep_alive():
            pool.idle.append(self)
        else:
            self.transport.close()

    def connection_lost(self, exc):
        if self.busy:
            self.pool.errors += 1
            self.pool.outstanding -= 1
        try:
            self.pool.idle.remove(self)
        except ValueError:
            pass


class Pool:
    def __init__(self, host: str, port: int, request: bytes):
        self.host = host
        self.port = port
        self.request = request
        self.idle: list[Conn] = []
        self.latencies: list[float] = []
        self.errors = 0
        self.non_200 = 0
        self.outstanding = 0
        self.waiting: list[float] = []
        self.connecting = 0

    async def open(self) -> Conn | None:
        loop = asyncio.get_running_loop()
        self.connecting += 1
        try:
            _, conn = await loop.create_connection(lambda: Conn(self), self.host, self.port)
            return conn
        except OSError:
            self.errors += 1
            return None
        finally:
            self.connecting -= 1

    def send(self, conn: Conn) -> None:
        conn.busy = True
        conn.sent_at = time.perf_counter()
        conn.transport.write(self.request)

    async def send_on_new(self) -> None:
        conn = await self.open()
        if conn is None:
            self.outstanding -= 1
            return
        self.send(conn)


async def run(host: str, port: int, host_header: str, rate: float, duration: float, path: str = "/",
              warm_conns: int = 16) -> dict:
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode()
    pool = Pool(host, port, request)
    for conn in await asyncio.gather(*(pool.open() for _ in range(warm_conns))):
        if conn is not None:
            pool.idle.append(conn)
    n = int(rate * duration)
    interval = 1.0 / rate
    start = loop.time() + 0.05
    late: list[float] = []
    tasks = []
    i = 0
    while i < n:
        now = loop.time()
        due = start + i * interval
        if due > now:
            await asyncio.sleep(due - now)
            continue
        # Send everything that is due (timer granularity may wake us a little late).
        while i < n and start + i * interval <= loop.time():
            late.append(loop.time() - (start + i * interval))
            pool.outstanding += 1
            if pool.idle:
                pool.send(pool.idle.pop())
            else:
                tasks.append(asyncio.ensure_future(pool.send_on_new()))
            i += 1
    deadline = loop.time() + 10
    while pool.outstanding > 0 and loop.time() < deadline:
        await asyncio.sleep(0.01)
    for c in list(pool.idle):
        c.transport.close()
    lat = sorted(pool.latencies)

    def pct(p):
        if not lat:
            return None
        return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] * 1000

    late.sort()
    return {
        "rate": rate, "duration_s": duration, "sent": n, "completed": len(lat), "errors": pool.errors + pool.outstanding,
        "non_200": pool.non_200, "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": pct(100),
        "late_p99_ms": late[int(0.99 * (len(late) - 1))] * 1000 if late else 0.0,
        "achieved_rps": len(lat) / duration if duration else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.openloop")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host-header", required=True)
    p.add_argument("--path", default="/")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, default=5.0)
    args = p.parse_args()
    import uvloop

    result = uvloop.run(run(args.host, args.port, args.host_header, args.rate, args.duration, args.path))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
