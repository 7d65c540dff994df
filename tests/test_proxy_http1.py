"""HTTP/1.1 through two real proxies with mTLS between them (client → outbound → inbound → app).

Named after linkerd2-proxy's transparency tests where they match. Real sockets, real TLS
with certificates from a real CA, endpoint sets in real NATS KV.
"""

import shutil
import socket
import subprocess
import threading
import time

import pytest

from tests.proxy_support import (
    KV, AppServer, Mesh, Proxy, RawServer, endpoint_set, http_request, meshed_endpoint, proxy_config,
    raw_exchange, read_response, unique_ns,
)
from tulle import schemas


@pytest.fixture(scope="module")
def mesh():
    return Mesh()


@pytest.fixture(scope="module")
def kv(lt, nats_server):
    k = KV(lt, nats_server.url)
    yield k
    k.close()


class Pair:
    """client app → client proxy (outbound) → mTLS → server proxy (inbound) → app."""

    def __init__(self, lt, mesh, kv, nats_url, app=None, *, server_cfg=None, client_cfg=None, server_identity=None):
        self.ns = unique_ns()
        self.kv = kv
        self.app = app or AppServer("web")
        self.server_id = mesh.identity("web", self.ns)
        self.client_id = mesh.identity("client", self.ns)
        self.server = Proxy(lt, proxy_config(nats_url, self.ns, "web-1", "web", app_default_port=self.app.port,
                                             **(server_cfg or {})), server_identity or self.server_id)
        self.client = Proxy(lt, proxy_config(nats_url, self.ns, "client-1", "client", **(client_cfg or {})),
                            self.client_id)
        self.publish()

    @property
    def host(self) -> str:
        return f"web.{self.ns}:{self.app.port}"

    def publish(self, endpoints=None):
        eps = endpoints if endpoints is not None else [
            meshed_endpoint(self.app.port, self.server.inbound, self.server_id.identity)]
        self.kv.put(schemas.endpoints_key(self.ns, "web", self.app.port), endpoint_set(self.ns, "web", self.app.port, eps))

    def get(self, path="/", **kw):
        return http_request(self.client.outbound, kw.pop("method", "GET"), path, host=self.host, **kw)

    def raw(self, data: bytes, **kw) -> bytes:
        return raw_exchange(self.client.outbound, data, **kw)

    def close(self):
        self.client.stop()
        self.server.stop()
        self.app.close()


@pytest.fixture(params=["http1", "h2"])
def pair(request, lt, mesh, kv, nats_server):
    """Both ways HTTP/1 travels between the proxies: on HTTP/1.1, and on HTTP/2 (orig-proto)."""
    p = Pair(lt, mesh, kv, nats_server.url, client_cfg={"mesh_protocol": request.param})
    yield p
    p.close()


def test_a_request_crosses_both_proxies_over_mtls(pair):
    status, headers, body = pair.get("/hello")
    assert (status, body) == (200, b"web")
    seen = pair.app.seen[-1]
    assert seen.path == "/hello" and seen.header("host") == pair.host
    assert pair.client.metric("request_total", direction="outbound", dst_service="web", tls="true",
                              server_id=pair.server_id.identity) == 1
    assert pair.server.metric("request_total", direction="inbound", tls="true", client_id=pair.client_id.identity) == 1


def test_spoofed_client_id_never_reaches_the_server_and_the_verified_one_does(pair):
    pair.get("/", headers={"tulle-client-id": "admin.kube-system.serviceaccount.identity.tulle.cluster.local"})
    assert pair.app.seen[-1].all("tulle-client-id") == [pair.client_id.identity]


def test_a_plain_client_from_outside_the_mesh_carries_no_identity(pair):
    status, _, _ = http_request(pair.server.inbound, host="web", headers={"tulle-client-id": "spoofed"})
    assert status == 200
    assert pair.app.seen[-1].all("tulle-client-id") == []


def test_http1_removes_connection_headers(lt, mesh, kv, nats_server):
    def app(conn):
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        seen.append(data)
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: x-server-quux\r\nx-server-quux: secret\r\nKeep-Alive: timeout=5\r\n"
                     b"content-length: 2\r\n\r\nok")
    seen = []
    raw = RawServer(app)
    p = Pair(lt, mesh, kv, nats_server.url, app=_Port(raw.port))
    try:
        status, headers, body = p.get("/", headers={"Connection": "x-foo-bar, keep-alive", "x-foo-bar": "1",
                                                    "Proxy-Connection": "keep-alive", "TE": "trailers"})
        assert (status, body) == (200, b"ok")
        assert "x-server-quux" not in headers and "keep-alive" not in headers
        head = seen[-1].lower()
        for gone in (b"x-foo-bar", b"proxy-connection", b"\r\nte:", b"connection: x-foo"):
            assert gone not in head
    finally:
        p.close()
        raw.close()


class _Port:
    """An upstream that is not an AppServer: only its port matters to Pair."""

    def __init__(self, port):
        self.port = port

    def close(self):
        pass


def test_http1_request_with_body_content_length(pair):
    body = bytes(range(256)) * 40
    status, _, got = pair.get("/echo", method="POST", body=body)
    assert (status, got) == (200, body)
    assert pair.app.seen[-1].header("content-length") == str(len(body))


def test_http1_request_with_body_chunked(pair):
    req = (f"POST /echo HTTP/1.1\r\nHost: {pair.host}\r\nTransfer-Encoding: chunked\r\n\r\n"
           "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", pair.client.outbound)) as s:
        s.sendall(req)
        status, _, body = read_response(s)
    assert (status, body) == (200, b"hello world")
    assert pair.app.seen[-1].header("transfer-encoding") == "chunked"


def test_http1_requests_without_body_doesnt_add_transfer_encoding(pair):
    pair.get("/")
    seen = pair.app.seen[-1]
    assert seen.header("transfer-encoding") is None and seen.header("content-length") is None


def test_http1_content_length_zero_is_preserved(pair):
    pair.get("/echo", method="POST", body=b"")
    assert pair.app.seen[-1].header("content-length") == "0"


def test_http1_head_responses(pair):
    with socket.create_connection(("127.0.0.1", pair.client.outbound), timeout=10) as s:
        s.sendall(f"HEAD /big/1000 HTTP/1.1\r\nHost: {pair.host}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 1000" in head.lower()
        assert head.endswith(b"\r\n\r\n")  # no body follows
        s.sendall(f"GET /big/10 HTTP/1.1\r\nHost: {pair.host}\r\n\r\n".encode())
        status, _, body = read_response(s)
    assert (status, body) == (200, b"x" * 10)


def test_http10_without_host(pair):
    out = raw_exchange(pair.server.inbound, b"GET / HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.0 200 OK\r\n") and out.endswith(b"web")
    seen = pair.app.seen[-1]
    assert seen.version == "HTTP/1.0" and seen.header("host") is None


def test_pipelined_requests_are_answered_in_order(pair):
    reqs = b"".join(f"GET {p} HTTP/1.1\r\nHost: {pair.host}\r\n\r\n".encode()
                    for p in ("/slow/0.3", "/big/3", "/status/404"))
    with socket.create_connection(("127.0.0.1", pair.client.outbound), timeout=10) as s:
        s.sendall(reqs)
        got = [read_response(s)[::2] for _ in range(3)]
    assert got == [(200, b"web"), (200, b"xxx"), (404, b"web")]


def test_upstream_connections_are_kept_alive_and_reused(pair):
    for _ in range(20):
        assert pair.get("/")[0] == 200
    assert len(pair.app.connections) == 1  # the inbound proxy's pool to the app
    assert pair.server.metric("protocol_detect_total", direction="inbound", protocol="mtls") == 1


def test_client_keep_alive_serves_many_requests_on_one_connection(pair):
    with socket.create_connection(("127.0.0.1", pair.client.outbound), timeout=10) as s:
        for i in range(10):
            s.sendall(f"POST /echo HTTP/1.1\r\nHost: {pair.host}\r\nContent-Length: 2\r\n\r\n{i:02d}".encode())
            assert read_response(s)[::2] == (200, f"{i:02d}".encode())


def test_large_bodies_stream_both_ways(pair):
    body = b"z" * (4 * 1024 * 1024 + 7)
    status, _, got = pair.get("/echo", method="POST", body=body, timeout=30)
    assert status == 200 and got == body
    status, _, got = pair.get(f"/big/{3 * 1024 * 1024}", timeout=30)
    assert status == 200 and len(got) == 3 * 1024 * 1024


def test_http11_absolute_uri_routes_by_its_authority(pair):
    with socket.create_connection(("127.0.0.1", pair.client.outbound), timeout=10) as s:
        s.sendall(f"GET http://{pair.host}/abs?q=1 HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n".encode())
        status, _, body = read_response(s)
    assert (status, body) == (200, b"web")
    seen = pair.app.seen[-1]
    assert seen.path == "/abs?q=1" and seen.header("host") == pair.host


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (make test installs it via apt-get as root)")
def test_curl_uses_the_outbound_port_as_its_http_proxy(pair):
    out = subprocess.run(["curl", "-sS", "-i", "-x", f"http://127.0.0.1:{pair.client.outbound}", f"http://{pair.host}/"],
                         capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"HTTP/1.1 200") and out.stdout.endswith(b"web")


@pytest.fixture
def failfast_pair(lt, mesh, kv, nats_server):
    """A pair whose client waits 0.5 s (not 3 s) for endpoints before answering 503."""
    p = Pair(lt, mesh, kv, nats_server.url, client_cfg={"outbound_failfast_timeout_s": 0.5})
    yield p
    p.close()


def test_no_endpoints_is_503_with_tulle_proxy_error(failfast_pair):
    pair = failfast_pair
    pair.publish([])
    status, headers, _ = pair.get("/")
    assert status == 503
    assert headers["tulle-proxy-error"].startswith(f"no endpoints for {pair.ns}/web")
    assert pair.client.metric("outbound_http_errors_total", error="no_endpoints") == 1


def test_connect_refused_is_502(pair):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    pair.publish([schemas.Endpoint(address="127.0.0.1", port=port)])
    status, headers, _ = pair.get("/")
    assert status == 502 and "connection refused" in headers["tulle-proxy-error"]


def test_a_server_presenting_another_identity_is_refused_with_502(lt, mesh, kv, nats_server):
    ns = unique_ns()
    impostor = mesh.identity("impostor", ns)
    p = Pair(lt, mesh, kv, nats_server.url, server_identity=impostor)
    try:
        status, headers, _ = p.get("/")
        assert status == 502
        assert p.server_id.identity in headers["tulle-proxy-error"]
        assert p.app.seen == []
    finally:
        p.close()


def test_a_host_outside_the_mesh_is_forwarded_plainly(pair):
    status, headers, body = http_request(pair.client.outbound, host=f"127.0.0.1:{pair.app.port}")
    assert (status, body) == (200, b"web")
    assert pair.app.seen[-1].all("tulle-client-id") == []


def test_a_request_looping_back_to_the_proxy_is_refused(pair):
    status, headers, _ = http_request(pair.client.outbound, host=f"127.0.0.1:{pair.client.outbound}")
    assert status == 508 and "loops back" in headers["tulle-proxy-error"]


def test_http11_upgrades(lt, mesh, kv, nats_server):
    def ws_app(conn):
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        assert b"upgrade: websocket" in data.lower()
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nserver-first|")
        rest = data.split(b"\r\n\r\n", 1)[1]
        while True:
            if rest:
                conn.sendall(rest.upper())
            rest = conn.recv(65536)
            if not rest:
                return

    raw = RawServer(ws_app)
    p = Pair(lt, mesh, kv, nats_server.url, app=_Port(raw.port))
    try:
        with socket.create_connection(("127.0.0.1", p.client.outbound), timeout=10) as s:
            s.sendall(f"GET /chat HTTP/1.1\r\nHost: {p.host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                      "early".encode())
            got = b""
            while not got.endswith(b"EARLY"):
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
            assert got.startswith(b"HTTP/1.1 101") and b"\r\n\r\nserver-first|EARLY" in got
            s.sendall(b"more bytes")
            assert s.recv(65536) == b"MORE BYTES"
    finally:
        p.close()
        raw.close()


def test_http11_connect(pair):
    with socket.create_connection(("127.0.0.1", pair.client.outbound), timeout=10) as s:
        s.sendall(f"CONNECT {pair.host} HTTP/1.1\r\nHost: {pair.host}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 200")
        # Inside the tunnel: plain HTTP to the app, carried opaque over mTLS.
        s.sendall(b"GET /tunnelled HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_response(s)
    assert (status, body) == (200, b"web")
    assert pair.app.seen[-1].path == "/tunnelled"
    # Carried opaque between the proxies, but HTTP all the same: the inbound proxy serves it
    # as HTTP, so the app gets the verified identity (and no copy from the client).
    assert pair.app.seen[-1].all("tulle-client-id") == [pair.client_id.identity]


def test_connect_to_a_service_without_endpoints_is_503(failfast_pair):
    pair = failfast_pair
    pair.publish([])
    out = pair.raw(f"CONNECT {pair.host} HTTP/1.1\r\nHost: {pair.host}\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 503")


def test_a_reused_upstream_connection_closed_by_the_server_is_retried_transparently(lt, mesh, kv, nats_server):
    """The app answers one request per connection and drops the connection when a second
    arrives (as a server whose keep-alive timer fired as the request was on its way)."""
    def app(conn):
        for n in range(2):
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            if n == 1:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return  # closed (reset) without an answer
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    raw = RawServer(app)
    p = Pair(lt, mesh, kv, nats_server.url, app=_Port(raw.port))
    try:
        for _ in range(5):
            status, headers, body = p.get("/")
            assert (status, body) == (200, b"ok"), headers
        assert raw.accepted >= 5  # every reuse failed and was retried on a fresh connection
        assert p.server.metric("inbound_http_errors_total") == 0
    finally:
        p.close()
        raw.close()


def test_concurrent_clients_each_get_their_own_answers(pair):
    results = {}

    def worker(i):
        results[i] = [pair.get("/echo", method="POST", body=f"{i}-{j}".encode())[2] for j in range(20)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == [f"{i}-{j}".encode() for j in range(20)] for i in range(8))


def test_a_slow_reader_gets_a_large_response_whole_and_the_upstream_is_reused(pair):
    size = 8 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", pair.client.outbound), timeout=20) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        s.sendall(f"GET /big/{size} HTTP/1.1\r\nHost: {pair.host}\r\n\r\n".encode())
        time.sleep(0.5)  # a slow reader: buffers fill up along the way and reading pauses upstream
        status, _, body = read_response(s, timeout=20)
    assert status == 200 and len(body) == size
    for _ in range(3):
        assert pair.get("/big/3")[2] == b"xxx"
    assert len(pair.app.connections) == 1  # the same upstream connection, resumed and reused


# --- the inbound decision point, with the policy issue's real InboundPolicy ---------------------


def test_a_denied_http_request_gets_403_with_tulle_proxy_error(lt, mesh, kv, nats_server):
    from tulle.policy import InboundPolicy
    app = AppServer("web")
    ns = unique_ns()
    p = Proxy(lt, proxy_config(nats_server.url, ns, "web-1", "web", app_default_port=app.port),
              mesh.identity("web", ns), policy=InboundPolicy("all-authenticated"))
    try:
        status, headers, _ = http_request(p.inbound, host="web")  # plain: no identity
        assert status == 403 and "tulle-proxy-error" in headers
        assert app.seen == []
    finally:
        p.stop()
        app.close()


def test_an_authenticated_client_passes_all_authenticated(lt, mesh, kv, nats_server):
    from tulle.policy import InboundPolicy
    pr = Pair(lt, mesh, kv, nats_server.url)
    try:
        pr.server.app.inbound.policy = InboundPolicy("all-authenticated")
        assert pr.get("/")[:3:2] == (200, b"web")
    finally:
        pr.close()


def test_a_denied_tcp_connection_is_closed_at_once(lt, mesh, nats_server):
    from tulle.policy import InboundPolicy
    raw = RawServer(lambda conn: conn.sendall(b"should never be seen"))
    ns = unique_ns()
    p = Proxy(lt, proxy_config(nats_server.url, ns, "db-1", "db", app_default_port=raw.port,
                               opaque_ports=frozenset({raw.port})), mesh.identity("db", ns), policy=InboundPolicy("deny"))
    try:
        with socket.create_connection(("127.0.0.1", p.inbound), timeout=10) as s:
            s.sendall(b"\x00hello")
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass  # closed with our bytes unread: the kernel resets
        assert raw.accepted == 0
        assert p.metric("inbound_tcp_errors_total", error="forbidden") == 1
    finally:
        p.stop()
        raw.close()
