"""The balancer's in-flight count of an endpoint comes back to zero however a request ends.

Power of two choices weighs each endpoint by its latency estimate times (requests in
flight + 1). A request that ends without its endpoint hearing of it would leave that
count raised for good, and the endpoint would lose every later comparison — starved
although healthy. `outbound_balancer_pending{dst_namespace,dst_service}` shows the count;
each test ends a request one way and watches it go back to 0 (and never below).

A real outbound proxy on a real nats-server; the endpoints are raw TCP servers scripted
per test (hold the request, answer 500, switch protocols unasked, close mid-response ...).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.conftest import wait_until
from tests.proxy_support import (
    KV, LoopThread, Mesh, Proxy, RawServer, endpoint_set, proxy_config, read_response, unique_ns,
)
from tulle import schemas
from tulle.metrics import parse_text

PORT = 8080  # the service port callers address


class Client:
    """One outbound proxy (the caller's) and the KV its endpoint sets come from."""

    def __init__(self, lt: LoopThread, nats_url: str):
        self.ns = unique_ns()
        self.mesh = Mesh()
        self.proxy = Proxy(lt, proxy_config(nats_url, self.ns, "caller", connect_timeout_s=0.5),
                           self.mesh.identity("caller", self.ns))
        self.kv = KV(lt, nats_url)
        self.servers: list[RawServer] = []
        self.n = 0

    def service(self, *servers: RawServer, identity: str = "", ports: list[int] | None = None) -> str:
        """A new mesh service whose endpoints are these servers (or bare ports); its name."""
        self.n += 1
        svc = f"svc{self.n}"
        self.servers.extend(servers)
        eps = [schemas.Endpoint(address="127.0.0.1", port=s.port, identity=identity) for s in servers]
        eps += [schemas.Endpoint(address="127.0.0.1", port=p) for p in ports or ()]
        self.kv.put(schemas.endpoints_key(self.ns, svc, PORT), endpoint_set(self.ns, svc, PORT, eps))
        return svc

    def profile(self, svc: str, *routes: schemas.Route) -> None:
        self.kv.put(schemas.profile_key(self.ns, svc), schemas.Profile(
            namespace=self.ns, service=svc, fqdn=f"{svc}.{self.ns}.svc.cluster.local", routes=list(routes),
            retry_budget=schemas.RetryBudget(retry_ratio=1.0, min_retries_per_second=100)),
            bucket=schemas.PROFILES_BUCKET)

    def host(self, svc: str) -> str:
        return f"{svc}.{self.ns}:{PORT}"

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.proxy.outbound), timeout=10)

    def send(self, svc: str, path: str = "/", extra: str = "", body: bytes = b"", method: str = "GET") -> socket.socket:
        s = self.connect()
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: {self.host(svc)}\r\n{extra}\r\n".encode() + body)
        return s

    def pending(self, svc: str) -> float:
        """The gauge's value; the series must exist (a missing one is not a zero)."""
        key = ("outbound_balancer_pending", frozenset({"dst_namespace": self.ns, "dst_service": svc}.items()))
        values = parse_text(self.proxy.metrics())
        assert key in values, f"no outbound_balancer_pending series for {svc}"
        return values[key]

    def wait_pending(self, svc: str, n: int) -> None:
        wait_until(lambda: self.pending(svc) == n, what=f"{svc} pending == {n}")

    def close(self) -> None:
        self.kv.close()
        self.proxy.stop()
        for s in self.servers:
            s.close()


@pytest.fixture(scope="module")
def client(lt, nats_server):
    c = Client(lt, nats_server.url)
    yield c
    c.close()


# --- scripted endpoints ------------------------------------------------------------------------


def read_head(conn: socket.socket) -> bytes:
    """Read one request head (and whatever followed it in the same reads)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a whole head")
        buf += chunk
    return buf


def ok(body: bytes = b"ok") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)


class Holder:
    """Reads a request and holds it unanswered until the proxy closes the connection."""

    def __init__(self):
        self.got = threading.Event()
        self.aborted = threading.Event()
        self.server = RawServer(self._serve)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        read_head(conn)
        self.got.set()
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
        self.aborted.set()


def serve_each(fn) -> RawServer:
    """A server that answers every request on a connection with fn(head) (None: close)."""
    def handler(conn: socket.socket) -> None:
        conn.settimeout(10)
        while True:
            try:
                head = read_head(conn)
            except (ConnectionError, OSError):
                return
            answer = fn(head)
            if answer is None:
                return
            conn.sendall(answer)
    return RawServer(handler)


# --- the caller goes away ----------------------------------------------------------------------


def test_a_caller_that_hangs_up_while_its_request_is_in_flight_frees_the_endpoint(client):
    holder = Holder()
    svc = client.service(holder.server)
    s = client.send(svc)
    assert holder.got.wait(10)
    client.wait_pending(svc, 1)
    s.close()
    assert holder.aborted.wait(10)  # the proxy gave up the upstream exchange too
    client.wait_pending(svc, 0)


def test_a_caller_that_hangs_up_while_the_endpoint_is_being_dialled_frees_it_once(client):
    # An mTLS endpoint that accepts and never answers the handshake: the dial hangs until
    # the connect timeout, long after the caller left. The count drops when the caller
    # leaves and does not drop again when the dial fails later.
    dialled = threading.Event()
    dial_ended = threading.Event()

    def silent(conn: socket.socket) -> None:
        dialled.set()
        conn.settimeout(30)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
        dial_ended.set()
    server = RawServer(silent)
    svc = client.service(server, identity=schemas.identity_name("ghost", client.ns))
    s = client.send(svc)
    assert dialled.wait(10)
    client.wait_pending(svc, 1)
    s.close()
    client.wait_pending(svc, 0)
    assert dial_ended.wait(10)  # the handshake timed out and the proxy closed the dial
    time.sleep(0.1)  # the failed dial's callbacks run right after the close; nothing to await
    assert client.pending(svc) == 0


def test_a_request_refused_mid_body_after_it_was_forwarded_frees_the_endpoint(client):
    holder = Holder()
    svc = client.service(holder.server)
    s = client.send(svc, "/upload", "Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n", method="POST")
    assert holder.got.wait(10)
    client.wait_pending(svc, 1)
    s.sendall(b"zz\r\nnot a chunk\r\n")  # a malformed chunk: the proxy must refuse the rest
    status, _, _ = read_response(s)
    assert status == 400
    s.close()
    assert holder.aborted.wait(10)
    client.wait_pending(svc, 0)


# --- the endpoint fails or misbehaves ------------------------------------------------------------


def test_an_endpoint_that_switches_protocols_unasked_is_answered_502_and_released(client):
    server = serve_each(lambda head: b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
    svc = client.service(server)
    s = client.send(svc)
    assert read_response(s)[0] == 502
    s.close()
    client.wait_pending(svc, 0)


def test_an_endpoint_that_refuses_connections_is_answered_502_and_released(client):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there
    svc = client.service(ports=[port])
    s = client.send(svc)
    assert read_response(s)[0] == 502
    s.close()
    client.wait_pending(svc, 0)


def test_an_endpoint_that_closes_before_answering_is_answered_502_and_released(client):
    server = serve_each(lambda head: None)
    svc = client.service(server)
    s = client.send(svc)
    assert read_response(s)[0] == 502
    s.close()
    client.wait_pending(svc, 0)


def test_an_endpoint_that_sends_a_malformed_response_is_answered_502_and_released(client):
    server = serve_each(lambda head: b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nbad header\r\n\r\nok")
    svc = client.service(server)
    s = client.send(svc)
    assert read_response(s)[0] == 502
    s.close()
    client.wait_pending(svc, 0)


def test_an_endpoint_that_closes_mid_body_is_released_when_its_head_arrived(client):
    def partial(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npart")
    server = RawServer(partial)
    svc = client.service(server)
    s = client.send(svc)
    s.settimeout(10)
    got = b""
    while chunk := s.recv(65536):  # the proxy ends the caller's connection: the body cannot be whole
        got += chunk
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"part")
    s.close()
    client.wait_pending(svc, 0)


def test_a_stale_keep_alive_connection_is_resent_on_another_and_released_once(client):
    # The first connection answers one request, then drops the second without a word (a
    # server closing an idle connection as it is reused): the proxy sends it again.
    conns = []

    def handler(conn: socket.socket) -> None:
        conns.append(conn)
        conn.settimeout(10)
        read_head(conn)
        conn.sendall(ok(b"first"))
        if len(conns) == 1:
            read_head(conn)
            return  # closed unanswered
        while True:
            read_head(conn)
            conn.sendall(ok(b"again"))
    server = RawServer(handler)
    svc = client.service(server)
    s = client.connect()
    for want in (b"first", b"first"):
        s.sendall(f"GET / HTTP/1.1\r\nHost: {client.host(svc)}\r\n\r\n".encode())
        status, _, body = read_response(s)
        assert (status, body) == (200, want)
    s.close()
    assert len(conns) == 2
    client.wait_pending(svc, 0)


def test_a_protocol_upgrade_the_endpoint_accepts_releases_it_when_the_tunnel_opens(client):
    def handler(conn: socket.socket) -> None:
        conn.settimeout(10)
        read_head(conn)
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\n")
        while data := conn.recv(65536):
            conn.sendall(data)
    server = RawServer(handler)
    svc = client.service(server)
    s = client.send(svc, "/ws", "Connection: upgrade\r\nUpgrade: echo\r\n")
    status, _, _ = read_response(s)
    assert status == 101
    s.sendall(b"ping")
    assert s.recv(4) == b"ping"
    client.wait_pending(svc, 0)  # while the tunnel is still open
    s.close()


# --- profiles: timeouts and retries ------------------------------------------------------------


def route(name: str, *, retryable: bool = False, timeout_ms: int = 0) -> schemas.Route:
    return schemas.Route(name=name, condition=schemas.RequestMatch(method="GET", path_regex="/.*"),
                         is_retryable=retryable, timeout_ms=timeout_ms)


def test_a_route_timeout_releases_the_endpoint_of_the_attempt_it_cancels(client):
    holder = Holder()
    svc = client.service(holder.server)
    client.profile(svc, route("slow", timeout_ms=300))
    s = client.send(svc, "/slow")
    assert read_response(s)[0] == 504
    assert holder.aborted.wait(10)
    s.close()
    client.wait_pending(svc, 0)


def test_retried_attempts_each_release_their_endpoint(client):
    def answer(head: bytes) -> bytes:
        if b"tulle-retry-attempt" in head.lower():
            return ok(b"retried")
        return b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"
    a, b = serve_each(answer), serve_each(answer)
    svc = client.service(a, b)
    client.profile(svc, route("flaky", retryable=True))
    for _ in range(5):
        s = client.send(svc, "/x")
        status, _, body = read_response(s)
        s.close()
        assert (status, body) == (200, b"retried")
    client.wait_pending(svc, 0)


def test_a_caller_that_hangs_up_during_a_retry_frees_the_endpoint_and_the_deadline(client):
    holder = Holder()

    def first_fails(conn: socket.socket) -> None:
        conn.settimeout(10)
        while True:
            read_head(conn)
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
    failing = RawServer(first_fails)
    svc = client.service(failing, holder.server)
    client.profile(svc, route("held", retryable=True, timeout_ms=5000))
    s = client.send(svc, "/held")
    assert holder.got.wait(10)  # the first or the retried attempt reached the holder
    client.wait_pending(svc, 1)
    s.close()
    assert holder.aborted.wait(10)
    client.wait_pending(svc, 0)
