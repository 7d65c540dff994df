"""Every bound of a proxied HTTP/1 exchange, exceeded by a real client or a real upstream
on real sockets: each gets its specified refusal, counted, while a well-behaved keep-alive
connection opened before it goes on being served (proxy/limits.py decides, the HTTP/1
adapter acts)."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

from proxy import transport as tph
from tests.conftest import wait_until
from tests.proxy_support import (
    KV, AppServer, KeepAlive, Mesh, Proxy, RawServer, endpoint_set, exchange, proxy_config, read_response, unique_ns,
)
from tulle import schemas

TIMEOUT = 0.5  # the response-head, request-body and response-body timeouts of the proxy here


@pytest.fixture(scope="module")
def edge(lt, nats_server):
    """One outbound proxy, forwarding to upstreams outside the mesh, with short timeouts."""
    app = AppServer("origin")
    ns = unique_ns()
    proxy = Proxy(lt, proxy_config(nats_server.url, ns, "edge", max_headers=100, max_header_bytes=16384,
                                   response_head_timeout_s=TIMEOUT, request_body_idle_timeout_s=TIMEOUT,
                                   response_body_idle_timeout_s=TIMEOUT, max_interim_responses=10),
                  Mesh().identity("edge", ns))
    yield proxy, app, f"127.0.0.1:{app.port}"
    proxy.stop()
    app.close()


@pytest.fixture
def other(edge):
    """The well-behaved neighbour: checked before and after each misbehaviour."""
    proxy, _, host = edge
    client = KeepAlive(proxy.outbound, host)
    client.check()
    yield client
    client.check()
    client.close()


class Upstream:
    """A raw upstream: reads each request head, then runs `respond(conn)`; records how each
    of its connections ended ("eof" when the proxy closed it, "reset", or "open")."""

    def __init__(self, respond):
        self.respond = respond
        self.ends: list[str] = []
        self.ended = threading.Event()
        self.server = RawServer(self._handle)

    def _handle(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        try:
            self.respond(conn)
            conn.settimeout(30)
            while conn.recv(65536):
                pass
            self.ends.append("eof")
        except (ConnectionResetError, BrokenPipeError):
            self.ends.append("reset")
        except OSError:  # still open after 30 s
            self.ends.append("open")
        self.ended.set()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def close(self) -> None:
        self.server.close()


def get(proxy: Proxy, host: str, path: str = "/") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return s


def refused_with(proxy: Proxy, up: Upstream, status: int, error: str, reason: str) -> None:
    """A request to `up` is answered `status` by the proxy itself, counted as `error`, and the
    upstream's connection is dropped — a second request needs a connection of its own."""
    before = proxy.metric("outbound_http_errors_total", error=error)
    with get(proxy, up.host) as s:
        got, headers, _ = read_final(s)
    assert got == status and reason in headers["tulle-proxy-error"], headers
    assert proxy.metric("outbound_http_errors_total", error=error) == before + 1
    assert up.ended.wait(10), "the upstream connection was never closed"
    assert up.ends[0] in ("eof", "reset")
    with get(proxy, up.host) as s:
        read_final(s)
    assert up.server.accepted == 2  # never reused


def read_final(s: socket.socket) -> tuple[int, dict, bytes]:
    """Read past interim (1xx) responses to the final one."""
    while True:
        status, headers, body = read_response(s)
        if status >= 200:
            return status, headers, body


# --- response heads: the limits request heads have ------------------------------------------


def test_a_response_head_over_the_byte_limit_is_a_502_and_its_connection_is_dropped(edge, other):
    proxy = edge[0]
    up = Upstream(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 70_000 + b"\r\ncontent-length: 0\r\n\r\n"))
    try:
        refused_with(proxy, up, 502, "bad_response", "larger than 16384 bytes")
    finally:
        up.close()


def test_a_response_head_grown_a_little_at_a_time_is_refused_once_over_the_limit(edge, other):
    proxy = edge[0]

    def trickle(c):
        c.sendall(b"HTTP/1.1 200 OK\r\nx-big: ")
        for _ in range(80):  # 80 x 512 bytes: well over 16 KiB, one segment at a time
            c.sendall(b"a" * 512)
            time.sleep(0.002)
    up = Upstream(trickle)
    try:
        refused_with(proxy, up, 502, "bad_response", "larger than 16384 bytes")
    finally:
        up.close()


def _headers(n: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(n - 1)) + b"\r\nok"


def test_a_response_with_100_headers_passes_and_one_with_101_is_a_502(edge, other):
    proxy = edge[0]
    fine, too_many = Upstream(lambda c: c.sendall(_headers(100))), Upstream(lambda c: c.sendall(_headers(101)))
    try:
        with get(proxy, fine.host) as s:
            assert read_final(s)[::2] == (200, b"ok")
        refused_with(proxy, too_many, 502, "bad_response", "more than 100 headers")
    finally:
        fine.close()
        too_many.close()


@pytest.mark.parametrize("line", [b"HTTP/2.0 200 OK", b"HTTP/0.9 200 OK", b"HTTP/1.1 999 Odd", b"HTTP/1.1 000 Zero"])
def test_a_status_line_that_is_not_http_1x_is_a_502(edge, other, line):
    proxy = edge[0]
    up = Upstream(lambda c: c.sendall(line + b"\r\ncontent-length: 2\r\n\r\nok"))
    try:
        refused_with(proxy, up, 502, "bad_response", "upstream answered with")
    finally:
        up.close()


def test_a_thousand_interim_responses_are_cut_at_the_limit_with_a_502(edge, other):
    proxy = edge[0]
    up = Upstream(lambda c: c.sendall(b"HTTP/1.1 102 Processing\r\n\r\n" * 1000 +
                                      b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"))
    try:
        with get(proxy, up.host) as s:
            interim = 0
            while True:
                status, headers, _ = read_response(s)
                if status >= 200:
                    break
                interim += 1
        assert status == 502 and "more than 10 interim responses" in headers["tulle-proxy-error"]
        assert interim == 10
        assert up.ended.wait(10)
    finally:
        up.close()


def test_ten_interim_responses_pass_before_the_final_one(edge, other):
    proxy = edge[0]
    up = Upstream(lambda c: c.sendall(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n" * 10 +
                                      b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"))
    try:
        with get(proxy, up.host) as s:
            statuses = []
            while not statuses or statuses[-1] < 200:
                statuses.append(read_response(s)[0])
            assert statuses == [103] * 10 + [200]
    finally:
        up.close()


# --- time: the response head, the response body, the request body -----------------------------


def test_an_upstream_that_never_answers_is_a_504_after_the_response_head_timeout(edge, other):
    proxy = edge[0]
    up = Upstream(lambda c: None)  # reads the request, then says nothing
    try:
        refused_with(proxy, up, 504, "response_head_timeout", f"no response from the upstream in {TIMEOUT:g}s")
    finally:
        up.close()


def test_a_response_head_trickled_a_byte_at_a_time_still_times_out(edge, other):
    proxy = edge[0]
    stop = threading.Event()

    def trickle(c):
        c.sendall(b"HTTP/1.1 200 OK\r\nx-slow: ")
        while not stop.is_set():
            c.sendall(b"a")
            time.sleep(0.02)
    up = Upstream(trickle)
    try:
        with get(proxy, up.host) as s:
            status, headers, _ = read_final(s)
        assert status == 504 and headers["tulle-proxy-error"].startswith("no response from the upstream")
    finally:
        stop.set()
        up.close()


def test_a_response_body_gone_idle_closes_the_connection(edge, other):
    proxy = edge[0]
    up = Upstream(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 10))
    try:
        before = proxy.metric("outbound_http_errors_total", error="response_idle_timeout")
        with get(proxy, up.host) as s:
            s.settimeout(10)
            got = b""
            while chunk := s.recv(65536):  # the head and 10 bytes, then the proxy closes
                got += chunk
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\n" + b"x" * 10)
        assert proxy.metric("outbound_http_errors_total", error="response_idle_timeout") == before + 1
        assert up.ended.wait(10) and up.ends[0] in ("eof", "reset")
    finally:
        up.close()


def test_a_request_body_gone_idle_is_a_408_and_the_upstream_is_released(edge, other):
    proxy = edge[0]
    up = Upstream(lambda c: None)
    try:
        before = proxy.metric("outbound_http_errors_total", error="body_timeout")
        with socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10) as s:
            s.sendall(f"POST /upload HTTP/1.1\r\nHost: {up.host}\r\ncontent-length: 1000\r\n\r\n".encode() + b"y" * 10)
            out, closed = b"", False
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                out += chunk
        assert out.startswith(b"HTTP/1.1 408 ") and b"tulle-proxy-error: request body not received in time" in out
        assert closed
        assert proxy.metric("outbound_http_errors_total", error="body_timeout") == before + 1
        assert up.ended.wait(10)  # the upstream saw the request end, not wait for 990 more bytes
    finally:
        up.close()


def test_a_request_body_may_be_slow_as_long_as_it_moves(edge, other):
    """The body clock is an idle clock: a body that keeps coming is never cut."""
    proxy, app, host = edge
    with socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10) as s:
        s.sendall(f"POST /echo HTTP/1.1\r\nHost: {host}\r\ncontent-length: 30\r\n\r\n".encode())
        for _ in range(30):  # one byte at a time, 3 x the idle timeout in all
            s.sendall(b"z")
            time.sleep(TIMEOUT / 10)
        assert read_response(s)[::2] == (200, b"z" * 30)


# --- a profile route's timeout wins -------------------------------------------------------------


@pytest.mark.parametrize("route_timeout_ms, expect", [(1500, "route_timeout"), (0, "response_head_timeout")])
def test_a_route_timeout_from_a_profile_replaces_the_response_head_timeout(lt, nats_server, edge, route_timeout_ms,
                                                                           expect):
    proxy = edge[0]
    ns = proxy.cfg.namespace
    up = Upstream(lambda c: None)
    kv = KV(lt, nats_server.url)
    svc = f"slow{route_timeout_ms}"
    try:
        kv.put(schemas.endpoints_key(ns, svc, 80), endpoint_set(ns, svc, 80, [
            schemas.Endpoint(address="127.0.0.1", port=up.server.port)]))
        kv.put(schemas.profile_key(ns, svc), schemas.Profile(
            namespace=ns, service=svc, fqdn=f"{svc}.{ns}.svc.cluster.local", routes=[schemas.Route(
                name="all", condition=schemas.RequestMatch(path_regex="/.*"), timeout_ms=route_timeout_ms)]),
            bucket=schemas.PROFILES_BUCKET)
        before = proxy.metric("outbound_http_errors_total", error=expect)
        with get(proxy, svc) as s:
            status, headers, _ = read_final(s)
        assert status == 504
        assert proxy.metric("outbound_http_errors_total", error=expect) == before + 1
        if route_timeout_ms:  # longer than the response-head timeout, and still the one that counts
            assert headers["tulle-proxy-error"] == "route 'all' timed out after 1.5s"
    finally:
        kv.close()
        up.close()


# --- pipelining ----------------------------------------------------------------------------------


def test_one_write_of_4739_pipelined_requests_buffers_no_more_than_the_cap(edge, other):
    """1 answered + 16 waiting are read; the 17th answer closes the connection and the
    rest were never parsed (the client sends them again, as RFC 9112 has it)."""
    proxy, app, host = edge
    before = len(app.seen)
    burst = f"GET /big/1 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() * 4739
    with socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10) as s:
        s.sendall(burst)
        answers = []
        while True:
            try:
                answers.append(read_response(s))
            except ConnectionError:
                break
    assert len(answers) == 17 and all(a[0] == 200 for a in answers)
    assert answers[-1][1].get("connection") == "close"
    assert "connection" not in answers[0][1]
    assert len(app.seen) - before == 17
    assert proxy.metric("outbound_http_errors_total", error="pipeline_limit") >= 1


def test_seventeen_pipelined_requests_are_all_answered_and_the_connection_stays(edge, other):
    proxy, app, host = edge
    with socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10) as s:
        s.sendall(f"GET /big/1 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() * 17)
        assert [read_response(s)[0] for _ in range(17)] == [200] * 17
        s.sendall(f"GET /big/2 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert read_response(s)[::2] == (200, b"xx")


# --- connections per listener -----------------------------------------------------------------


def test_a_listener_at_its_connection_cap_accepts_and_closes_the_next_one(lt, nats_server):
    ns = unique_ns()
    app = AppServer("capped")
    host = f"127.0.0.1:{app.port}"
    proxy = Proxy(lt, proxy_config(nats_server.url, ns, "capped", max_connections=8), Mesh().identity("c", ns))
    held = []
    try:
        other = KeepAlive(proxy.outbound, host)
        other.check()
        # Seven that say nothing: still in protocol detection, and counted all the same.
        held = [socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10) for _ in range(7)]
        wait_until(lambda: lt.run(lambda: proxy.app.outbound.listener.accepted.count()) == 8,
                   what="eight connections accepted")
        for _ in range(3):
            extra, closed = exchange(proxy.outbound, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert extra == b"" and closed
        assert proxy.metric("outbound_tcp_errors_total", error="connection_limit") == 3
        other.check()
        for s in held:
            s.close()
        wait_until(lambda: lt.run(lambda: proxy.app.outbound.listener.accepted.count()) == 1,
                   what="the closed connections forgotten")
        with socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10) as s:
            s.sendall(f"GET /big/3 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert read_response(s)[::2] == (200, b"xxx")
        other.check()
        other.close()
    finally:
        for s in held:
            s.close()
        proxy.stop()
        app.close()


def test_the_admin_server_at_its_connection_cap_accepts_and_closes_the_next_one(lt, nats_server):
    ns = unique_ns()
    proxy = Proxy(lt, proxy_config(nats_server.url, ns, "admin-capped", admin_max_connections=4),
                  Mesh().identity("a", ns))
    held = []
    try:
        scraper = socket.create_connection(("127.0.0.1", proxy.admin), timeout=10)

        def live(s):
            s.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
            return read_response(s)[::2]
        assert live(scraper) == (200, b"live\n")
        held = [socket.create_connection(("127.0.0.1", proxy.admin), timeout=10) for _ in range(3)]
        wait_until(lambda: lt.run(lambda: proxy.app.admin.open_connections) == 4, what="four admin connections open")
        out, closed = exchange(proxy.admin, b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out == b"" and closed
        assert proxy.metric("tulle_admin_connections_refused_total") == 1
        assert live(scraper) == (200, b"live\n")  # the keep-alive scraper is unaffected
        held.pop().close()
        wait_until(lambda: lt.run(lambda: proxy.app.admin.open_connections) == 3, what="one admin connection closed")
        assert exchange(proxy.admin, b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0].startswith(
            b"HTTP/1.1 200 ")
        scraper.close()
    finally:
        for s in held:
            s.close()
        proxy.stop()


# --- between proxies, and opaque connections ------------------------------------------------


class Peer:
    """client → client proxy → mTLS → server proxy (short handshake, preamble and opaque idle
    timeouts) → app; the server proxy also passes an echo port opaque."""

    def __init__(self, lt, nats_url):
        self.mesh = Mesh()
        self.ns = unique_ns()
        self.app = AppServer("web")
        self.echo = RawServer(_echo)
        self.server_id = self.mesh.identity("web", self.ns)
        self.server = Proxy(lt, proxy_config(
            nats_url, self.ns, "web-1", "web", app_default_port=self.app.port, tls_handshake_timeout_s=TIMEOUT,
            preamble_timeout_s=TIMEOUT, opaque_idle_timeout_s=TIMEOUT, opaque_ports=frozenset({self.echo.port})),
            self.server_id)
        self.client_id = self.mesh.identity("client", self.ns)
        self.client = Proxy(lt, proxy_config(nats_url, self.ns, "client-1", "client"), self.client_id)
        self.kv = KV(lt, nats_url)
        self.kv.put(schemas.endpoints_key(self.ns, "web", self.app.port), endpoint_set(self.ns, "web", self.app.port, [
            schemas.Endpoint(address="127.0.0.1", port=self.app.port, identity=self.server_id.identity,
                             proxy_port=self.server.inbound)]))

    def close(self):
        self.kv.close()
        self.client.stop()
        self.server.stop()
        self.app.close()
        self.echo.close()


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


@pytest.fixture(scope="module")
def peer(lt, nats_server):
    p = Peer(lt, nats_server.url)
    yield p
    p.close()


@pytest.fixture
def meshed_other(peer):
    """A well-behaved caller whose requests cross both proxies over mTLS."""
    client = KeepAlive(peer.client.outbound, f"web.{peer.ns}:{peer.app.port}")
    client.check()
    yield client
    client.check()
    client.close()


def _client_hello(server_name: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


def _until_closed(s: socket.socket) -> bytes:
    s.settimeout(10)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def test_a_tls_handshake_that_stalls_after_its_client_hello_is_closed_at_the_timeout(peer, meshed_other):
    before = peer.server.metric("inbound_tcp_errors_total", error="tls_handshake_timeout")
    with socket.create_connection(("127.0.0.1", peer.server.inbound), timeout=10) as s:
        s.sendall(_client_hello(peer.server_id.identity))  # then nothing more
        answer = _until_closed(s)
    assert answer[:1] == b"\x16"  # the server's handshake came, then the close
    assert peer.server.metric("inbound_tcp_errors_total", error="tls_handshake_timeout") == before + 1


def test_a_peer_that_sends_no_transport_header_after_the_handshake_is_closed_at_the_timeout(peer, meshed_other):
    before = peer.server.metric("inbound_tcp_errors_total", error="preamble_timeout")
    ctx = peer.client_id.client_context  # a real peer's certificate and ALPN tulle/1
    with socket.create_connection(("127.0.0.1", peer.server.inbound), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=peer.server_id.identity) as s:
            assert s.selected_alpn_protocol() == "tulle/1"
            s.settimeout(10)
            try:
                assert s.recv(100) == b""  # nothing, then the proxy closes
            except (ssl.SSLError, ConnectionResetError):
                pass
    assert peer.server.metric("inbound_tcp_errors_total", error="preamble_timeout") == before + 1


def _opaque_to_echo(peer: Peer) -> ssl.SSLSocket:
    """What a peer proxy opens for an opaque stream: mTLS, then the transport header naming
    the echo port."""
    raw = socket.create_connection(("127.0.0.1", peer.server.inbound), timeout=10)
    s = peer.client_id.client_context.wrap_socket(raw, server_hostname=peer.server_id.identity)
    s.sendall(tph.encode(peer.echo.port, tph.OPAQUE))
    return s


def _echoes(s: ssl.SSLSocket, data: bytes) -> bool:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        got += s.recv(65536)
    return got == data


def test_an_idle_opaque_connection_is_closed_and_a_busy_one_is_not(peer):
    before = peer.server.metric("inbound_tcp_errors_total", error="idle_timeout")
    busy, idle = _opaque_to_echo(peer), _opaque_to_echo(peer)
    stop = threading.Event()
    failures = []

    def keep_busy():
        while not stop.is_set():
            try:
                if not _echoes(busy, b"ping"):
                    failures.append("wrong echo")
            except OSError as e:
                failures.append(repr(e))
                return
            time.sleep(TIMEOUT / 10)
    worker = threading.Thread(target=keep_busy)
    try:
        assert _echoes(idle, b"hello")
        worker.start()
        assert _until_closed(idle) == b""  # then nothing moves: closed by the proxy
        assert peer.server.metric("inbound_tcp_errors_total", error="idle_timeout") == before + 1
        stop.set()
        worker.join(10)
        assert failures == [] and _echoes(busy, b"still here")
    finally:
        stop.set()
        busy.close()
        idle.close()
