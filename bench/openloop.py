"""A small open-loop (fixed-rate) HTTP/1.1 load generator, for one target or several in turn.

    python -m bench.openloop --port P --host-header H --rate 500 --duration 5
    python -m bench.openloop --target direct:8080:H --target tulle:4140:H@123/124 \\
        --rate 500 --duration 5 --slice 0.25 [--raw FILE]

Requests are sent on a fixed schedule whether or not earlier ones were answered (each on
an idle keep-alive connection, a new one when all are busy), so queueing in the system
under test shows up as latency instead of being hidden as with a closed loop (wrk).
Latency is measured from the moment a request is written to the moment its response is
complete; `late_p99_ms` says how far behind schedule the sends themselves were (the
event loop's timers have 1 ms resolution).

With several targets the schedule is cut into slices (`--slice` seconds) that go to the
targets in turn (A B C D A B ...), each target getting `--duration` seconds of load in
all. Noise on a shared machine (another process's burst) then falls on every target
alike instead of on whichever one happened to run at the time. A target may name process
ids (in groups, e.g. one per proxy): the CPU time each group uses during that target's
own slices is reported (`cpu_s`, from /proc/<pid>/task/*/schedstat, nanosecond resolution).

Prints one JSON object: the single target's figures, or {name: figures} for --target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import httptools


class Conn(asyncio.Protocol):
    __slots__ = ("transport", "parser", "sent_at", "pool", "busy")

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
            self.busy = False
            self.pool.errors += 1
            self.pool.outstanding -= 1
        try:
            self.pool.idle.remove(self)
        except ValueError:
            pass


class Pool:
    """One target: its keep-alive connections and what was measured on them."""

    def __init__(self, name: str, host: str, port: int, request: bytes, cpu_groups: list[list[int]] = ()):
        self.name = name
        self.host = host
        self.port = port
        self.request = request
        self.cpu_groups = [list(g) for g in cpu_groups]  # e.g. one group per proxy: its processes
        self.idle: list[Conn] = []
        self.latencies: list[float] = []
        self.late: list[float] = []
        self.errors = 0
        self.non_200 = 0
        self.outstanding = 0
        self.sent = 0
        self.cpu_ns = [0] * len(self.cpu_groups)
        self.tasks: list[asyncio.Future] = []

    async def open(self) -> Conn | None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: Conn(self), self.host, self.port)
            return conn
        except OSError:
            self.errors += 1
            return None

    async def warm(self, n: int) -> None:
        for conn in await asyncio.gather(*(self.open() for _ in range(n))):
            if conn is not None:
                self.idle.append(conn)

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

    def fire(self, late: float) -> None:
        self.late.append(late)
        self.outstanding += 1
        self.sent += 1
        if self.idle:
            self.send(self.idle.pop())
        else:
            self.tasks.append(asyncio.ensure_future(self.send_on_new()))

    def cpu_now(self) -> list[int]:
        """CPU time (ns) used so far by each group's processes, all their threads."""
        out = []
        for group in self.cpu_groups:
            total = 0
            for pid in group:
                try:
                    for task in os.listdir(f"/proc/{pid}/task"):
                        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                            total += int(f.read().split()[0])
                except OSError:
                    pass
            out.append(total)
        return out

    def figures(self, duration: float) -> dict:
        lat = sorted(self.latencies)

        def pct(p):
            if not lat:
                return None
            return lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] * 1000

        late = sorted(self.late)
        return {
            "rate": self.sent / duration if duration else 0.0, "duration_s": duration, "sent": self.sent,
            "completed": len(lat), "errors": self.errors + self.outstanding, "non_200": self.non_200,
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "p999_ms": pct(99.9), "max_ms": pct(100),
            "late_p99_ms": late[int(0.99 * (len(late) - 1))] * 1000 if late else 0.0,
            "achieved_rps": len(lat) / duration if duration else 0.0,
            "cpu_s": [ns / 1e9 for ns in self.cpu_ns],
        }


async def run_targets(pools: list[Pool], rate: float, duration: float, slice_s: float | None = None,
                      warm_conns: int = 16) -> None:
    """Load each pool for `duration` seconds at `rate`, in slices taken in turn."""
    loop = asyncio.get_running_loop()
    clock = time.perf_counter  # the loop's own clock has 1 ms resolution
    for pool in pools:
        await pool.warm(warm_conns)
    per_target = int(rate * duration)
    if slice_s is None or len(pools) == 1:
        slice_n = per_target
    else:
        slice_n = max(1, int(rate * slice_s))
    interval = 1.0 / rate
    plan: list[tuple[Pool, int]] = []  # (pool, requests in this slice), in order
    left = {id(p): per_target for p in pools}
    while any(left.values()):
        for pool in pools:
            n = min(slice_n, left[id(pool)])
            if n:
                plan.append((pool, n))
                left[id(pool)] -= n
    start = clock() + 0.05
    i = 0  # requests scheduled so far, over all slices: one global fixed-rate clock
    for pool, n in plan:
        cpu0 = pool.cpu_now() if pool.cpu_groups else None
        end = i + n
        while i < end:
            now = clock()
            due = start + i * interval
            if due > now:
                await asyncio.sleep(due - now)
                continue
            # Send everything that is due (timer granularity may wake us a little late).
            while i < end and start + i * interval <= clock():
                pool.fire(clock() - (start + i * interval))
                i += 1
        if cpu0 is not None:
            # Read when the next slice is due: this slice's last response is back by then.
            due = start + i * interval
            now = clock()
            if due > now:
                await asyncio.sleep(due - now)
            pool.cpu_ns = [t + b - a for t, a, b in zip(pool.cpu_ns, cpu0, pool.cpu_now())]
    deadline = loop.time() + 10
    while any(p.outstanding > 0 for p in pools) and loop.time() < deadline:
        await asyncio.sleep(0.01)
    for pool in pools:
        for c in list(pool.idle):
            c.transport.close()


async def run(host: str, port: int, host_header: str, rate: float, duration: float, path: str = "/",
              warm_conns: int = 16) -> dict:
    """One target (kept for callers of the earlier single-target interface)."""
    pool = Pool("target", host, port, f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode())
    await run_targets([pool], rate, duration, None, warm_conns)
    return pool.figures(duration)


def parse_target(spec: str, host: str, path: str) -> Pool:
    """NAME:PORT:HOST_HEADER[@PID,PID/PID...] (the host header may carry a port of its own;
    `/` separates the process groups whose CPU is reported apart, e.g. two proxies)."""
    spec, _, pids = spec.partition("@")
    name, _, rest = spec.partition(":")
    port, _, header = rest.partition(":")
    if not name or not port.isdigit() or not header:
        raise SystemExit(f"--target {spec!r}: expected NAME:PORT:HOST_HEADER[@PID,PID...]")
    groups = [[int(p) for p in g.split(",") if p] for g in pids.split("/") if g]
    return Pool(name, host, int(port), f"GET {path} HTTP/1.1\r\nHost: {header}\r\n\r\n".encode(), groups)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.openloop")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    p.add_argument("--host-header")
    p.add_argument("--target", action="append", default=[],
                   help="NAME:PORT:HOST_HEADER[@PID,PID/PID...]; repeat for several targets taken in turn")
    p.add_argument("--targets-json", help="a JSON list of {name, port, host_header, cpu_groups} (instead of --target)")
    p.add_argument("--path", default="/")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, default=5.0, help="seconds of load for each target")
    p.add_argument("--slice", type=float, default=0.25, help="seconds per slice when there are several targets")
    p.add_argument("--raw", help="write every latency (ms) per target to this JSON file")
    args = p.parse_args()
    import uvloop

    if args.targets_json:
        pools = [Pool(t["name"], args.host, t["port"], f"GET {args.path} HTTP/1.1\r\nHost: {t['host_header']}\r\n\r\n"
                      .encode(), t.get("cpu_groups", ())) for t in json.loads(args.targets_json)]
    elif args.target:
        pools = [parse_target(t, args.host, args.path) for t in args.target]
    elif args.port and args.host_header:
        pools = None
    else:
        raise SystemExit("give --port and --host-header, or --target / --targets-json")
    if pools is None:
        result = uvloop.run(run(args.host, args.port, args.host_header, args.rate, args.duration, args.path))
        print(json.dumps(result))
        return
    uvloop.run(run_targets(pools, args.rate, args.duration, args.slice))
    if args.raw:
        with open(args.raw, "w") as f:
            json.dump({pool.name: [round(x * 1000, 4) for x in pool.latencies] for pool in pools}, f)
    print(json.dumps({pool.name: pool.figures(args.duration) for pool in pools}))


if __name__ == "__main__":
    main()
