"""CPU of the proxy's hot paths per request, without any I/O.

    python -m bench.proxy_hotpath [--requests 50000] [--profile] [--only outbound,inbound,mesh-h2,grpc]

Drives the real rooms (outbound: routing by a mesh name to a balanced endpoint;
inbound: a request from a verified peer identity, judged by a real policy) and the real
wire adapters with in-memory transports: the request bytes in, the response bytes back.
`mesh-h2` is both proxies at once, as between two pods: an HTTP/1 request into the
client proxy's outbound, HTTP/2 (with orig-proto) to the server proxy's inbound, HTTP/1
to the app and back; `grpc` the same for an HTTP/2 (gRPC unary) caller and app. What is
left out is what TLS and the kernel cost. Prints microseconds of CPU per request, and
with --profile the functions that take the time (cProfile). Figures only.
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
    t0 = time.process_time()  # CPU, not wall time: other processes on the machine do not count
    if prof:
        prof.enable()
    for _ in range(n):
        one()
    if prof:
        prof.disable()
    dt = time.process_time() - t0
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return dt / n * 1e6, (down.writes) / (n + 1000), up.writes / (n + 1000)


class Wire:
    """An in-memory connection end: writes are kept for the pump to deliver."""

    def __init__(self):
        self.out: list[bytes] = []
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.out.append(data)

    def take(self) -> bytes:
        data = b"".join(self.out)
        self.out.clear()
        return data

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


class MeshPair:
    """A client proxy's outbound and a server proxy's inbound joined by one in-memory HTTP/2
    connection (what mTLS carries between them), the app behind the inbound answering from
    memory. `grpc`: the caller and the app speak HTTP/2 (h2c) instead of HTTP/1."""

    def __init__(self, grpc: bool):
        from proxy import transport as tph
        from proxy.http2.client import H2Client
        from proxy.http2.server import H2Server
        from proxy.http2.session import H2Session

        self.grpc = grpc
        out_room, _, out_pools, _ = outbound_room()
        self.out_room = out_room
        identity = schemas.identity_name("server", NS)
        # The endpoint is a peer proxy: requests go on HTTP/2 to it.
        w = out_room.discovery._watches[(schemas.ENDPOINTS_BUCKET, schemas.endpoints_key(NS, "origin", 8080))]
        w._apply(schemas.EndpointSet(namespace=NS, service="origin", port=8080, endpoints=[
            schemas.Endpoint(address="127.0.0.2", port=8080, identity=identity, proxy_port=4143)]))
        h2pool = out_pools.h2(Dest("127.0.0.2", 4143, identity, 8080, tph.HTTP2))
        self.peer_wire = Wire()
        self.h2client = H2Client(h2pool, out_pools.h2_config, "peer")
        self.h2client.connection_made(self.peer_wire)
        self.h2client.ready = True
        h2pool.conns.append(self.h2client)

        in_room, new_in_server, in_pools, app_dest = inbound_room()
        conn = InConn("127.0.0.1", 8080)
        conn.tls = True
        conn.client_id = schemas.identity_name("client", NS)
        conn.labels = in_room.metrics.labels("inbound", NS, tls="true", client_id=conn.client_id)
        in_room._prepare_http(conn)
        self.in_server = in_room.h2_server(conn)
        self.in_wire = Wire()
        self.in_server.connection_made(self.in_wire)

        self.app_wire = Wire()
        if grpc:
            self.app = H2Client(in_pools.h2(app_dest), in_pools.h2_config, "app")
            self.app.connection_made(self.app_wire)
            self.app.ready = True
            in_pools.h2(app_dest).conns.append(self.app)
            self.app_session = H2Session(client=False)
            self.caller = H2Session(client=True)
            self.down = out_room.h2_server(OutConn(("127.0.0.1", 40000), None))
        else:
            self.app = Http1Client(in_pools.get(app_dest))
            self.app.connection_made(self.app_wire)
            in_pools.get(app_dest).give(self.app)
            self.down = Http1Server(out_room, out_room.limits, out_room._strip, OutConn(("127.0.0.1", 40000), None))
        self.down_wire = Wire()
        self.down.connection_made(self.down_wire)
        self.responses = 0

    def caller_request(self) -> bytes:
        if not self.grpc:
            return REQUEST
        c = self.caller
        c.send_request([(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"origin.bench:8080"),
                        (b":path", b"/bench.Echo/Unary"), (b"content-type", b"application/grpc"),
                        (b"te", b"trailers")], end_stream=False)
        sid = c._next_own_stream - 2
        c.send_data(sid, b"\0\0\0\0\x05hello", end_stream=True)
        return c.data_to_send()

    def app_answer(self, data: bytes) -> bytes:
        if not self.grpc:
            return RESPONSE
        from proxy.http2.events import DataReceived, RequestReceived

        s = self.app_session
        for e in s.feed(data):
            if e.__class__ is DataReceived:
                s.consume(e.stream_id, len(e.data))
                if e.end_stream:
                    s.send_response(e.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
                    s.send_data(e.stream_id, b"\0\0\0\x04\0" + BODY)
                    s.send_trailers(e.stream_id, [(b"grpc-status", b"0")])
        return s.data_to_send()

    async def one(self) -> None:
        self.down.data_received(self.caller_request())
        for _ in range(50):
            await asyncio.sleep(0)  # the HTTP/2 sides flush from the loop
            moved = False
            data = self.peer_wire.take()
            if data:
                self.in_server.data_received(data)
                moved = True
            data = self.app_wire.take()
            if data:
                self.app.data_received(self.app_answer(data))
                moved = True
            data = self.in_wire.take()
            if data:
                self.h2client.data_received(data)
                moved = True
            data = self.down_wire.take()
            if data:
                if self.grpc:
                    self.caller.feed(data)
                    self.caller.data_to_send()
                self.responses += 1
                moved = True
            if not moved and self.responses:
                return


async def run_pair(grpc: bool, n: int, profile: bool) -> float:
    pair = MeshPair(grpc)
    for _ in range(500):
        await pair.one()
    prof = cProfile.Profile() if profile else None
    gc.collect()
    t0 = time.process_time()
    if prof:
        prof.enable()
    for _ in range(n):
        await pair.one()
    if prof:
        prof.disable()
    dt = time.process_time() - t0
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return dt / n * 1e6


async def main_async(args) -> None:
    only = set(args.only.split(",")) if args.only else {"outbound", "inbound", "mesh-h2", "grpc"}
    for name, make in (("outbound", outbound_room), ("inbound", inbound_room)):
        if name not in only:
            continue
        us, wd, wu = run(make, args.requests, args.profile)
        print(f"{name:9s} {us:6.1f} us per request (request + response); writes per request: "
              f"downstream {wd:.2f}, upstream {wu:.2f}")
    for name, grpc in (("mesh-h2", False), ("grpc", True)):
        if name not in only:
            continue
        us = await run_pair(grpc, args.requests // 5, args.profile)
        print(f"{name:9s} {us:6.1f} us of CPU per request through both proxies "
              f"({'gRPC unary, HTTP/2 end to end' if grpc else 'HTTP/1 caller and app, HTTP/2 between'})")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.proxy_hotpath", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=50000)
    p.add_argument("--profile", action="store_true", help="print the functions that take the time (cProfile)")
    p.add_argument("--only", help="comma-separated: outbound, inbound, mesh-h2, grpc")
    args = p.parse_args()
    import uvloop

    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
