"""Between proxies every HTTP request travels over one multiplexed HTTP/2 connection per peer
inside mTLS (Linkerd's transparent upgrade), and the app behind the server proxy gets it in
the protocol its caller used; `TULLE_PROXY_MESH_PROTOCOL=http1` keeps a pool of HTTP/1.1
connections instead.

Two real proxies on a real nats-server, mTLS between them; the apps are a real HTTP/1.1
server and a real HTTP/2 (h2c) server.
"""

from __future__ import annotations

import socket
import threading

import pytest

from proxy.config import from_env
from tests.h2_peers import H2App, H2Client
from tests.proxy_support import (
    KV, AppServer, Mesh, Proxy, endpoint_set, http_request, meshed_endpoint, proxy_config, read_response, unique_ns,
)
from tulle import schemas
from tulle.errors import UserError

PORT = 8080


class Pair:
    def __init__(self, lt, nats_url: str, app_port: int, mesh_protocol: str = "h2"):
        self.mesh = Mesh()
        self.ns = unique_ns()
        ident = self.mesh.identity("srv", self.ns)
        self.server = Proxy(lt, proxy_config(nats_url, self.ns, "srv", "srv", app_default_port=app_port), ident)
        self.client = Proxy(lt, proxy_config(nats_url, self.ns, "cli", "cli", mesh_protocol=mesh_protocol),
                            self.mesh.identity("cli", self.ns))
        self.kv = KV(lt, nats_url)
        self.kv.put(schemas.endpoints_key(self.ns, "srv", PORT), endpoint_set(self.ns, "srv", PORT, [
            meshed_endpoint(app_port, self.server.inbound, ident.identity)]))

    @property
    def host(self) -> str:
        return f"srv.{self.ns}:{PORT}"

    def peer_connections(self) -> float:
        """mTLS connections the server proxy accepted from its peer."""
        return self.server.metric("protocol_detect_total", direction="inbound", protocol="mtls")

    def inbound_protocols(self, lt) -> set[str]:
        """The wire protocols of the server proxy's open inbound HTTP connections."""
        return lt.run(lambda: {type(c).__name__ for c in self.server.app.inbound.conns})

    def close(self) -> None:
        self.kv.close()
        self.client.stop()
        self.server.stop()


@pytest.fixture(scope="module")
def app():
    a = AppServer("web")
    yield a
    a.close()


@pytest.fixture(scope="module")
def pair(lt, nats_server, app):
    p = Pair(lt, nats_server.url, app.port)
    yield p
    p.close()


def test_concurrent_http1_callers_share_one_http2_connection_to_the_peer(lt, pair, app):
    before = pair.peer_connections()
    results = []

    def call(i: int) -> None:
        results.append(http_request(pair.client.outbound, path=f"/n/{i}", host=pair.host)[0])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 20
    assert pair.inbound_protocols(lt) == {"H2Server"}
    assert pair.peer_connections() - before <= 1  # one connection (none when one was open already)


def test_the_app_gets_http1_as_its_caller_sent_it_without_the_proxys_protocol_field(pair, app):
    with socket.create_connection(("127.0.0.1", pair.client.outbound), timeout=10) as s:
        s.sendall(f"POST /form HTTP/1.1\r\nHost: {pair.host}\r\nX-Custom: Kept\r\nCookie: a=1\r\n"
                  f"Tulle-Orig-Proto: HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
                  f"5\r\nhello\r\n0\r\n\r\n".encode())
        status, headers, body = read_response(s)
    assert status == 200 and body == b"web"
    seen = app.seen[-1]
    assert (seen.method, seen.path, seen.version, seen.body) == ("POST", "/form", "HTTP/1.1", b"hello")
    assert seen.header("x-custom") == "Kept" and seen.header("cookie") == "a=1"
    assert seen.header("host") == pair.host
    assert seen.header("tulle-orig-proto") is None  # the app's own copy never mattered, nor reached it
    assert seen.header("tulle-client-id") == schemas.identity_name("cli", pair.ns)


def test_an_http10_caller_is_answered_in_http10_and_its_app_asked_in_http10(pair, app):
    with socket.create_connection(("127.0.0.1", pair.client.outbound), timeout=10) as s:
        s.sendall(f"GET /old HTTP/1.0\r\nHost: {pair.host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.0 200") and data.endswith(b"web")
    assert app.seen[-1].version == "HTTP/1.0"


def test_http2_from_an_app_reaches_an_http2_app_as_http2(lt, nats_server):
    h2app = H2App("h2web")
    p = Pair(lt, nats_server.url, h2app.port)
    client = H2Client(p.client.outbound)
    try:
        resp = client.request(b"/h2", authority=p.host.encode(), extra=[(b"te", b"trailers")])
        assert resp.status == 200 and resp.body == b"h2web"
        seen = h2app.seen[-1]
        assert dict(seen.headers)[b":path"] == b"/h2" and (b"te", b"trailers") in seen.headers
        assert b"tulle-orig-proto" not in seen.names()
    finally:
        client.close()
        p.close()
        h2app.close()


def test_the_http1_mesh_protocol_keeps_http1_between_proxies(lt, nats_server, app):
    p = Pair(lt, nats_server.url, app.port, mesh_protocol="http1")
    try:
        for i in range(3):
            assert http_request(p.client.outbound, path=f"/h1/{i}", host=p.host)[0] == 200
        assert app.seen[-1].header("tulle-client-id") == schemas.identity_name("cli", p.ns)
        assert p.inbound_protocols(lt) == {"Http1Server"}
    finally:
        p.close()


def test_the_mesh_protocol_setting_is_checked():
    env = {"TULLE_PROXY_NAMESPACE": "n", "TULLE_PROXY_WORKLOAD": "w", "TULLE_PROXY_MESH_PROTOCOL": "spdy"}
    with pytest.raises(UserError, match="TULLE_PROXY_MESH_PROTOCOL: 'spdy' is not one of h2, http1"):
        from_env(env)
