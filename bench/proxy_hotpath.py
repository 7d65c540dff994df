"""CPU of the proxy's HTTP/1 hot path per request, without any I/O.

    python -m bench.proxy_hotpath [--requests 50000] [--profile]

Drives the real rooms (outbound: routing by a mesh name to a balanced endpoint;
inbound: a request from a verified peer identity, judged by a real policy) and the real
Http1Server / Http1Client objects with in-memory transports: the request bytes in, the
response bytes back. What is left out is what the event loop, TLS and the kernel cost.
Prints microseconds per request for each room, and with --profile the functions that
take the time (cProfile). Figures only.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from proxy.config import ProxyConfig  # noqa: E402
from proxy.context import Shared  # noqa: E402
from proxy.discovery import Discovery, Watched  # noqa: E402
from proxy.balancer import Balancer  # noqa: E402
from proxy.http1.client import Http1Client  # noqa: E402
from proxy.pools import Pools  # noqa: E402
from proxy.http1.server import Http1Server  # noqa: E402
from proxy.inbound import STRIP, InConn, Inbound  # noqa: E402
from proxy.metrics import ProxyMetrics  # noqa: E402
from proxy.outbound import OutConn, Outbound  # noqa: E402
from proxy.upstream import Dest  # noqa: E402
from proxy.discovery import endpoint_key  # noqa: E402
from tulle import schemas  # noqa: E402
from tulle.metrics import Registry  # noqa: E402

NS = "bench"
BODY = b"x" * 1024
REQUEST = (b"GET / HTTP/1.1\r\nHost: origin.bench:8080\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 22 Nov 2026 22:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 1024\r\nConnection: keep-alive\r\n\r\n" + BODY)


class MemoryTransport:
    """Enough of asyncio.Transport for the HTTP/1 objects: writes are counted and dropped."""

    def __init__(self):
        self.writes = 0
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise AssertionError("the hot path closed a connection")

    abort = close

    def get_extra_info(self, name, default=None):
        return default


class NoBus:
    """Discovery never reaches the bus here: every watch it needs is filled in beforehand."""


def _shared(registry: Registry) -> Shared:
    cfg = ProxyConfig(namespace=NS, workload="client-0", service_account="client", nats_url="nats://unused",
                      transparent=False, app_host="127.0.0.1")
    discovery = Discovery(NoBus(), idle_s=3600)
    return Shared(cfg, None, discovery, ProxyMetrics(registry))


def _known(discovery: Discovery, bucket: str, key: str, value, balanced: bool) -> None:
    w = Watched(bucket, key)
    if balanced:
        w.balancer = Balancer(endpoint_key, clock=discovery._clock)
    w._apply(value)
    discovery._watches[(bucket, key)] = w


def outbound_room() -> tuple[Outbound, callable]:
    shared = _shared(Registry())
    es = schemas.EndpointSet(namespace=NS, service="origin", port=8080, endpoints=[
        schemas.Endpoint(address="127.0.0.1", port=8080, identity="", proxy_port=0)])
    _known(shared.discovery, schemas.ENDPOINTS_BUCKET, schemas.endpoints_key(NS, "origin", 8080), es, True)
    _known(shared.discovery, schemas.PROFILES_BUCKET, schemas.profile_key(NS, "origin"), None, False)
    pools = Pools(client_context=lambda: None, connect_timeout=1.0)
    room = Outbound(shared, pools)
    return room, lambda: Http1Server(room, room.limits, room._strip, OutConn(("127.0.0.1", 40000), None)), pools, \
        Dest("127.0.0.1", 8080)


def inbound_room() -> tuple[Inbound, callable]:
    shared = _shared(Registry())
    pools = Pools(client_context=lambda: None, connect_timeout=1.0)
    room = Inbound(shared, pools)
    client_id = schemas.identity_name("client", NS)
    from tulle.policy import default_port_policy

    room.policy.update(schemas.WorkloadPolicy(namespace=NS, workload="server-0", default_policy="all-unauthenticated",
                                              default=default_port_policy("all-unauthenticated",
                                                                          schemas.DEFAULT_CLUSTER_NETWORKS),
                                              ports=[schemas.PortPolicy(8080, "origin-http", "Server", "unknown", [
                                                  schemas.Authorization("from-client", identities=[client_id])])]))

    def server() -> Http1Server:
        conn = InConn("127.0.0.1", 8080)
        conn.tls = True
        conn.client_id = client_id
        conn.labels = room.metrics.labels("inbound", NS, tls="true", client_id=client_id)
        room._prepare_http(conn)
        return Http1Server(room, room.limits, STRIP, conn)
    return room, server, pools, Dest("127.0.0.1", 8080)


def run(make, n: int, profile: bool) -> tuple[float, int, int]:
    room, new_server, pools, dest = make()
    down = MemoryTransport()
    server = new_server()
    server.connection_made(down)
    pool = pools.get(dest)
    up = MemoryTransport()
    client = Http1Client(pool)
    client.connection_made(up)
    pool.give(client)

    def one() -> None:
        server.data_received(REQUEST)
        c = server.active.x.up
        c.data_received(RESPONSE)

    for _ in range(1000):  # warm caches (targets, labels, status lines)
        one()
    prof = cProfile.Profile() if profile else None
    gc.collect()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    for _ in range(n):
        one()
    if prof:
        prof.disable()
    dt = time.perf_counter() - t0
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return dt / n * 1e6, (down.writes) / (n + 1000), up.writes / (n + 1000)


async def main_async(args) -> None:
    for name, make in (("outbound", outbound_room), ("inbound", inbound_room)):
        us, wd, wu = run(make, args.requests, args.profile)
        print(f"{name:9s} {us:6.1f} us per request (request + response); writes per request: "
              f"downstream {wd:.2f}, upstream {wu:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.proxy_hotpath", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=50000)
    p.add_argument("--profile", action="store_true", help="print the functions that take the time (cProfile)")
    args = p.parse_args()
    import uvloop

    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
