"""gRPC through the mesh, as a user of grpcio sees it: every kind of call, per-request
balancing, retries within the budget, route timeouts, a denial, and the proxy's own errors
as gRPC statuses.

A real grpcio client reaches a real client proxy's outbound port (h2c; the channel's
authority names the mesh service, as a grpcio client behind iptables would); that proxy
talks HTTP/2 inside mTLS to the server proxy, whose inbound hands each call to a real
grpcio server. Endpoint sets, profiles and policies are written into real NATS KV as the
control plane would. (The same through `tulle up` with network namespaces:
tests/test_local_grpc.py.)
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from concurrent import futures
from typing import Callable

import grpc
import pytest

from tests.conftest import wait_until
from tests.proxy_support import (
    KV, LoopThread, Mesh, Proxy, endpoint_set, meshed_endpoint, proxy_config, unique_ns, workload_policy,
)
from tests.bus_support import cli_bus_args
from tests.local_support import TULLE
from tulle import schemas
from tulle.metrics import sample
from tulle.policy import InboundPolicy

PORT = 9090
SERVICE = "demo.Books"


class Books:
    """A grpcio server with one method of each kind (raw bytes, no protobuf needed). `fail`
    decides per unary call whether to abort with UNAVAILABLE (for retries)."""

    def __init__(self, name: str, fail: Callable[[int], bool] = lambda n: False, delay: float = 0.0):
        self.name = name
        self.calls = 0
        self.client_ids: list[str | None] = []
        self.fail = fail
        self.delay = delay
        self.lock = threading.Lock()
        handlers = {
            "GetBook": grpc.unary_unary_rpc_method_handler(self.get_book),
            "ListBooks": grpc.unary_stream_rpc_method_handler(self.list_books),
            "AddBooks": grpc.stream_unary_rpc_method_handler(self.add_books),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                                  options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _seen(self, context) -> int:
        with self.lock:
            self.calls += 1
            self.client_ids.append(dict(context.invocation_metadata()).get("tulle-client-id"))
            return self.calls

    def get_book(self, request: bytes, context) -> bytes:
        n = self._seen(context)
        if self.delay:
            time.sleep(self.delay)
        if request == b"missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such book")
        if self.fail(n):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is busy")
        context.set_trailing_metadata((("x-served-by", self.name),))
        return self.name.encode() + b":" + request

    def list_books(self, request: bytes, context):
        self._seen(context)
        for i in range(int(request)):
            yield b"book %d" % i

    def add_books(self, requests, context) -> bytes:
        self._seen(context)
        total = sum(len(r) for r in requests)
        return str(total).encode()

    def chat(self, requests, context):
        self._seen(context)
        for r in requests:
            yield b"re: " + r

    def close(self) -> None:
        self.server.stop(0)


class GrpcMesh:
    """web (client proxy) → books (one server proxy per replica) → grpcio back ends."""

    def __init__(self, lt: LoopThread, nats_url: str):
        self.lt = lt
        self.mesh = Mesh()
        self.ns = unique_ns()
        self.books_id = self.mesh.identity("books", self.ns)
        self.client = Proxy(lt, proxy_config(nats_url, self.ns, "web", "web"), self.mesh.identity("web", self.ns))
        self.kv = KV(lt, nats_url)
        self.nats_url = nats_url
        self.servers: list[Proxy] = []
        self.backends: list[Books] = []
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.client.outbound}", options=[
            ("grpc.default_authority", f"books.{self.ns}:{PORT}"), ("grpc.enable_http_proxy", 0),
            ("grpc.enable_retries", 0)])

    def replicas(self, *backends: Books, policy: InboundPolicy | None = None) -> None:
        """Each back end behind its own server proxy (a pod each), all in books' endpoint set."""
        endpoints = []
        for i, b in enumerate(backends):
            server = Proxy(self.lt, proxy_config(self.nats_url, self.ns, f"books-{len(self.servers)}", "books",
                                                 app_default_port=b.port), self.books_id, policy=policy)
            self.servers.append(server)
            self.backends.append(b)
            endpoints.append(meshed_endpoint(b.port, server.inbound, self.books_id.identity))
        self.kv.put(schemas.endpoints_key(self.ns, "books", PORT), endpoint_set(self.ns, "books", PORT, endpoints))

    def profile(self, *routes: schemas.Route, budget: schemas.RetryBudget | None = None) -> None:
        self.kv.put(schemas.profile_key(self.ns, "books"), schemas.Profile(
            namespace=self.ns, service="books", fqdn=f"books.{self.ns}.svc.cluster.local", routes=list(routes),
            retry_budget=budget or schemas.RetryBudget()), bucket=schemas.PROFILES_BUCKET)

    def unary(self, method: str = "GetBook"):
        return self.channel.unary_unary(f"/{SERVICE}/{method}")

    def close(self) -> None:
        self.channel.close()
        self.kv.close()
        self.client.stop()
        for s in self.servers:
            s.stop()
        for b in self.backends:
            b.close()


def rpc_route(method: str, retryable: bool = False, timeout_ms: int = 0) -> schemas.Route:
    """The route `tulle profile --proto` writes for an rpc."""
    return schemas.Route(name=f"POST /{SERVICE}/{method}",
                         condition=schemas.RequestMatch(method="POST", path_regex=f"/{SERVICE}/{method}"),
                         is_retryable=retryable, timeout_ms=timeout_ms)


@pytest.fixture
def gm(lt, nats_server):
    m = GrpcMesh(lt, nats_server.url)
    yield m
    m.close()


# --- every kind of call ---------------------------------------------------------------------------


def test_unary_server_client_and_bidirectional_streaming_calls_cross_the_mesh(gm):
    gm.replicas(Books("books-a"))
    reply, call = gm.unary().with_call(b"dune", timeout=10, metadata=(("x-user", "ann"),))
    assert reply == b"books-a:dune" and ("x-served-by", "books-a") in call.trailing_metadata()
    listed = list(gm.channel.unary_stream(f"/{SERVICE}/ListBooks")(b"200", timeout=10))
    assert listed == [b"book %d" % i for i in range(200)]
    added = gm.channel.stream_unary(f"/{SERVICE}/AddBooks")(iter([b"x" * 1000] * 300), timeout=10)
    assert added == b"300000"
    chat = gm.channel.stream_stream(f"/{SERVICE}/Chat")
    assert list(chat(iter([b"hi", b"there", b"bye"]), timeout=10)) == [b"re: hi", b"re: there", b"re: bye"]
    # The server saw the client's verified identity on every call, never anything else.
    assert set(gm.backends[0].client_ids) == {schemas.identity_name("web", gm.ns)}


def test_megabyte_messages_flow_both_ways_under_flow_control(gm):
    gm.replicas(Books("books-a"))
    chat = gm.channel.stream_stream(f"/{SERVICE}/Chat")
    big = [bytes([i]) * (1 << 20) for i in range(4)]
    assert list(chat(iter(big), timeout=30)) == [b"re: " + b for b in big]


def test_the_servers_status_and_message_reach_the_client(gm):
    gm.replicas(Books("books-a"))
    with pytest.raises(grpc.RpcError) as e:
        gm.unary()(b"missing", timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and e.value.details() == "no such book"


def test_a_client_deadline_cancels_the_call_through_both_proxies(gm):
    gm.replicas(Books("books-a", delay=2.0))
    with pytest.raises(grpc.RpcError) as e:
        gm.unary()(b"slow", timeout=0.3)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert gm.unary()(b"again", timeout=10) == b"books-a:again"  # the channel goes on


# --- balancing, retries, timeouts ------------------------------------------------------------------


def test_calls_on_one_channel_are_balanced_per_request_across_replicas(gm):
    """grpcio keeps one HTTP/2 connection: only per-request balancing spreads its calls. Four
    callers at a time, each call taking 20 ms: P2C weighs latency × calls in flight."""
    a, b = Books("books-a", delay=0.02), Books("books-b", delay=0.02)
    gm.replicas(a, b)
    call = gm.unary()
    with futures.ThreadPoolExecutor(4) as pool:
        served = list(pool.map(lambda i: call(b"%d" % i, timeout=10).split(b":")[0], range(200)))
    assert served.count(b"books-a") >= 40 and served.count(b"books-b") >= 40
    assert a.calls + b.calls == 200


def test_failed_calls_of_a_retryable_route_are_retried_within_the_budget(gm):
    flaky = Books("books-a", fail=lambda n: n % 4 == 0)  # every fourth call answers UNAVAILABLE
    gm.replicas(flaky)
    gm.profile(rpc_route("GetBook", retryable=True),
               budget=schemas.RetryBudget(retry_ratio=0.2, min_retries_per_second=10, ttl_ms=10_000))
    wait_until(lambda: gm.client.metric("route_request_total", rt_route=f"POST /{SERVICE}/GetBook") >= 0 and
               _routed(gm), what="the profile to apply")
    call = gm.unary()
    failures = 0
    for i in range(100):
        try:
            call(b"%d" % i, timeout=10)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE
            failures += 1
    assert failures == 0  # each failure was retried (25 retries: within 10/s + 20%)
    route = f"POST /{SERVICE}/GetBook"
    assert gm.client.metric("route_actual_response_total", rt_route=route, classification="failure") >= 25
    assert gm.client.metric("route_response_total", rt_route=route, classification="success") >= 100
    rows = {r["route"]: r for r in routes_json(gm.nats_url, gm.ns, "books")}
    assert rows[route]["effective_success"] == 1.0 and rows[route]["actual_success"] < 0.85


def routes_json(nats_url: str, ns: str, service: str) -> list[dict]:
    """`tulle routes <service> -n NS -o json` (the real console script)."""
    out = subprocess.run([TULLE, "routes", service, "-n", ns, "-o", "json", *cli_bus_args(nats_url)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return next(iter(json.loads(out.stdout).values()))


def _routed(gm: GrpcMesh) -> bool:
    gm.unary()(b"probe", timeout=10)
    return gm.client.metric("route_request_total", rt_route=f"POST /{SERVICE}/GetBook") >= 1


def test_a_route_timeout_is_deadline_exceeded_with_the_proxys_reason(gm):
    gm.replicas(Books("books-a", delay=2.0))
    gm.profile(rpc_route("GetBook", timeout_ms=200))
    call = gm.unary()
    deadline = time.monotonic() + 20
    while True:  # until the proxy has the profile
        try:
            call(b"slow", timeout=10)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            err = e
            break
        assert time.monotonic() < deadline, "the route timeout never applied"
    assert "timed out after 0.2s" in err.details()
    assert dict(err.trailing_metadata()).get("tulle-proxy-error", "").startswith("route 'POST /demo.Books/GetBook'")


# --- the proxy's own answers as gRPC statuses ----------------------------------------------------------


def test_a_policy_denial_is_permission_denied(gm):
    policy = InboundPolicy("deny")
    policy.update(workload_policy(gm.ns, "books-0", default="deny"))
    gm.replicas(Books("books-a"), policy=policy)
    with pytest.raises(grpc.RpcError) as e:
        gm.unary()(b"dune", timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "unauthorized request on server default:deny" in e.value.details()
    assert gm.backends[0].calls == 0
    assert gm.servers[0].metric("inbound_http_errors_total", error="forbidden") == 1


def test_no_endpoints_and_a_failed_connect_are_unavailable(gm):
    gm.kv.put(schemas.endpoints_key(gm.ns, "books", PORT), endpoint_set(gm.ns, "books", PORT, []))
    with pytest.raises(grpc.RpcError) as e:
        gm.unary()(b"dune", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "no endpoints" in e.value.details()
    closed = schemas.Endpoint(address="127.0.0.1", port=1, identity=gm.books_id.identity, proxy_port=1)
    gm.kv.put(schemas.endpoints_key(gm.ns, "books", PORT), endpoint_set(gm.ns, "books", PORT, [closed]))
    wait_until(lambda: _code(gm) != "no endpoints", what="the new endpoint set")
    with pytest.raises(grpc.RpcError) as e:
        gm.unary()(b"dune", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "connection refused" in e.value.details()


def _code(gm: GrpcMesh) -> str:
    try:
        gm.unary()(b"x", timeout=10)
        return "ok"
    except grpc.RpcError as e:
        return "no endpoints" if "no endpoints" in (e.details() or "") else e.details() or ""


def test_grpc_to_a_server_outside_the_mesh_goes_on_as_h2c(gm):
    books = Books("plain")
    gm.backends.append(books)
    gm.kv.put(schemas.endpoints_key(gm.ns, "books", PORT), endpoint_set(gm.ns, "books", PORT, [
        schemas.Endpoint(address="127.0.0.1", port=books.port)]))
    assert gm.unary()(b"dune", timeout=10) == b"plain:dune"
    assert books.client_ids == [None]
    assert sample(gm.client.metrics(), "request_total", direction="outbound", tls="no_identity") >= 1


def test_grpc_through_the_proxy_as_an_http_proxy_is_still_balanced_per_request(gm):
    """Without iptables (local mode's `none` addressing) grpcio reaches the mesh through
    HTTP_PROXY: a CONNECT tunnel, inside which it speaks h2c. The proxy parses that too, so
    the calls are still routed one by one, not pinned to one replica for the connection."""
    a, b = Books("books-a", delay=0.02), Books("books-b", delay=0.02)
    gm.replicas(a, b)
    channel = grpc.insecure_channel(f"books.{gm.ns}:{PORT}", options=[
        ("grpc.http_proxy", f"http://127.0.0.1:{gm.client.outbound}"), ("grpc.enable_retries", 0)])
    try:
        call = channel.unary_unary(f"/{SERVICE}/GetBook")
        with futures.ThreadPoolExecutor(4) as pool:
            served = list(pool.map(lambda i: call(b"%d" % i, timeout=10).split(b":")[0], range(100)))
    finally:
        channel.close()
    assert served.count(b"books-a") >= 20 and served.count(b"books-b") >= 20
    assert gm.client.metric("protocol_detect_total", direction="outbound", protocol="h2") >= 1


def test_a_stream_whose_reader_stalls_holds_back_only_itself(gm):
    """Flow control is backpressure: a caller that stops reading one long response holds that
    stream at its window (the proxy stops reading its upstream) while other calls on the same
    connection go on; once it reads again, every byte arrives."""
    import h2.events

    from tests.h2_peers import H2Client

    gm.replicas(Books("books-a"))
    c = H2Client(gm.client.outbound)
    conn = c.conn
    conn.increment_flow_control_window(50_000_000)  # only the stalled stream's own window holds it
    c.flush()

    def call(method: str, message: bytes) -> int:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", f"books.{gm.ns}:{PORT}".encode()),
                                (b":path", f"/{SERVICE}/{method}".encode()), (b"content-type", b"application/grpc"),
                                (b"te", b"trailers")])
        conn.send_data(sid, b"\0" + len(message).to_bytes(4, "big") + message, end_stream=True)
        c.flush()
        return sid

    stalled = call("ListBooks", b"20000")  # ~200 KB of messages: more than a stream window
    received = {stalled: b""}
    while len(received[stalled]) < 65_535:  # everything its window allows, never acknowledged
        for e in c._events():
            if isinstance(e, h2.events.DataReceived) and e.stream_id == stalled:
                received[stalled] += e.data
    assert len(received[stalled]) == 65_535
    for i in range(3):  # meanwhile, other calls on the same connection are answered
        other = call("GetBook", b"%d" % i)
        resp = c.response(other)
        assert resp.status == 200 and resp.body.endswith(b"books-a:%d" % i) and resp.trailers[0] == (b"grpc-status", b"0")
    conn.acknowledge_received_data(len(received[stalled]), stalled)  # read again
    c.flush()
    ended = False
    while not ended:
        for e in c._events():
            if isinstance(e, h2.events.DataReceived) and e.stream_id == stalled:
                received[stalled] += e.data
                conn.acknowledge_received_data(e.flow_controlled_length, stalled)
            elif isinstance(e, h2.events.StreamEnded) and e.stream_id == stalled:
                ended = True
        c.flush()
    data, messages = received[stalled], []
    while data:
        n = int.from_bytes(data[1:5], "big")
        messages.append(data[5:5 + n])
        data = data[5 + n:]
    assert messages == [b"book %d" % i for i in range(20000)]
    c.close()
