"""The inbound proxy as a trust boundary, tried the way an attacker would: raw sockets, a
TLS client with no certificate, a peer with a valid certificate asking for the wrong
port, headers spelled the way app servers fold them, requests sent too slowly to be
detected, and connections arriving before the workload's policy.

What must hold: the proxy forwards only to its app (never to one of its own ports, so it
cannot relay a stranger as this workload or into its admin server), only a verified peer
chooses a target port, every HTTP request the app receives carries the verified
`tulle-client-id` or none, and a workload whose default is `deny` answers no one before
its policy says otherwise.
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from proxy import transport as tph
from tulle.policy import InboundPolicy, default_port_policy
from tests.conftest import wait_until
from tests.h2_peers import SPOOFED_ID, H2App, H2Client, client_id_fields
from tests.proxy_support import (
    AppServer, Mesh, Proxy, RawServer, http_request, proxy_config, raw_exchange, read_response, unique_ns,
    workload_policy,
)
from tulle import pki, schemas
from tulle.natsserver import free_port

SPOOFED = "admin.kube-system.serviceaccount.identity.tulle.cluster.local"


@pytest.fixture
def mesh():
    return Mesh()


@pytest.fixture
def app():
    a = AppServer("web")
    yield a
    a.close()


def server_proxy(lt, mesh, nats_url, app_port, ns=None, **kw) -> Proxy:
    ns = ns or unique_ns()
    return Proxy(lt, proxy_config(nats_url, ns, "web-1", "web", app_default_port=app_port, **kw),
                 mesh.identity("web", ns))


def peer_tls(mesh: Mesh, server: Proxy, *, certificate: bool) -> ssl.SSLSocket:
    """A TLS connection to the server proxy's inbound as a peer proxy opens it (SNI = the
    server's identity, ALPN tulle/1), with or without a client certificate."""
    if certificate:
        ctx = mesh.identity("client", server.cfg.namespace).client_context
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=mesh.anchor.cert_pem.decode())
        ctx.set_alpn_protocols([pki.ALPN_PROXY])
    raw = socket.create_connection(("127.0.0.1", server.inbound), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=server.cfg.identity)


def refused(port: int, data: bytes) -> bool:
    """Sent `data` to a port: closed without an answer (a reset counts: the data was unread)."""
    try:
        return raw_exchange(port, data) == b""
    except ConnectionResetError:
        return True


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


# --- the transport header and the proxy's own ports -------------------------------------------------


def test_a_tls_client_without_a_certificate_cannot_choose_a_target_port(lt, mesh, nats_server, app):
    p = server_proxy(lt, mesh, nats_server.url, app.port)
    try:
        for target in (p.outbound, app.port):
            with peer_tls(mesh, p, certificate=False) as s:
                s.sendall(tph.encode(target, tph.HTTP1) + b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
                assert closed_by_peer(s)
        assert p.metric("inbound_tcp_errors_total", error="transport_header_unauthenticated") == 2
        assert app.seen == []  # nothing reached the app, nothing was relayed
    finally:
        p.stop()


@pytest.mark.parametrize("which", ["outbound", "inbound", "admin"])
def test_a_verified_peer_cannot_aim_the_transport_header_at_the_proxys_own_ports(lt, mesh, nats_server, app, which):
    p = server_proxy(lt, mesh, nats_server.url, app.port, shutdown_endpoint=True)
    try:
        port = getattr(p, which)
        with peer_tls(mesh, p, certificate=True) as s:
            s.sendall(tph.encode(port, tph.HTTP1) + b"POST /shutdown HTTP/1.1\r\nHost: localhost\r\n"
                      b"Content-Length: 0\r\n\r\n")
            assert closed_by_peer(s)
        assert p.metric("inbound_tcp_errors_total", error="self_target") == 1
        assert not p.app.stopping.is_set()  # the admin server was never reached
        assert http_request(p.admin, path="/live", host="x")[0] == 200
    finally:
        p.stop()


def test_a_plain_connection_meant_for_one_of_the_proxys_own_ports_is_refused(lt, mesh, nats_server):
    """What iptables hands the inbound when someone connects to the pod's 4140: the
    original destination is the proxy's own outbound port."""
    outbound = free_port()
    p = server_proxy(lt, mesh, nats_server.url, outbound, outbound_addr=("127.0.0.1", outbound))
    try:
        assert refused(p.inbound, b"GET http://books.demo:9090/ HTTP/1.1\r\nHost: books.demo:9090\r\n\r\n")
        assert p.metric("inbound_tcp_errors_total", error="self_target") == 1
        assert p.metric("outbound_tcp_errors_total", error="self_target") == 0  # never got that far
    finally:
        p.stop()


def test_the_outbound_will_not_relay_to_a_proxys_admin_port(lt, mesh, nats_server):
    """An app (or a request forged through it) cannot reach /shutdown through its proxy."""
    p = Proxy(lt, proxy_config(nats_server.url, unique_ns(), "web-1", "web", shutdown_endpoint=True),
              mesh.identity("web", "x"))
    try:
        for host in ("127.0.0.1", "localhost", "[::1]"):
            status, headers, _ = http_request(p.outbound, "POST", f"http://{host}:{p.admin}/shutdown",
                                              host=f"{host}:{p.admin}", body=b"")
            assert status == 403 and "own ports" in headers.get("tulle-proxy-error", ""), host
        assert not p.app.stopping.is_set()
        assert p.metric("outbound_tcp_errors_total", error="self_target") == 3
    finally:
        p.stop()


# --- tulle-client-id ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tulle-client-id", "Tulle-Client-Id", "tulle_client_id", "TULLE_CLIENT_ID",
                                  "tulle.client.id", "tulle-client_id"])
def test_every_spelling_an_app_server_folds_into_tulle_client_id_is_removed(lt, mesh, nats_server, app, name):
    p = server_proxy(lt, mesh, nats_server.url, app.port)
    try:
        status, _, _ = http_request(p.inbound, host="web", headers={name: SPOOFED})
        assert status == 200
        seen = app.seen[-1]
        assert not any(k.lower().replace("_", "-").replace(".", "-") == "tulle-client-id" for k, _ in seen.headers)
    finally:
        p.stop()


# --- what follows an answer that closes the connection --------------------------------------------


def test_bytes_after_a_refused_connect_never_reach_the_app_as_requests(lt, mesh, nats_server, app):
    """The inbound refuses CONNECT (405, close): a request written behind it in the same packet is
    the tunnel's would-be bytes, never processed (RFC 9112 §9.6; found by fuzz/)."""
    p = server_proxy(lt, mesh, nats_server.url, app.port)
    try:
        got = raw_exchange(p.inbound, b"CONNECT web:80 HTTP/1.1\r\nHost: web:80\r\n\r\n"
                                      b"GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 405") and got.count(b"HTTP/1.1 ") == 1
        assert app.seen == []
    finally:
        p.stop()


def test_a_pipelined_request_whose_body_turns_out_malformed_is_never_sent_to_the_app(lt, mesh, nats_server, app):
    """It waits behind a slow request; its chunked body is refused (400) meanwhile: when its turn
    comes it is answered by that refusal, not sent upstream with half a body (found by fuzz/)."""
    p = server_proxy(lt, mesh, nats_server.url, app.port)
    try:
        got = raw_exchange(p.inbound, b"GET /slow/0.3 HTTP/1.1\r\nHost: web\r\n\r\n"
                                      b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      b"zz\r\nnot a chunk\r\n")
        assert got.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 400" in got and got.count(b"HTTP/1.1 ") == 2
        assert [s.path for s in app.seen] == ["/slow/0.3"]
    finally:
        p.stop()


def test_a_request_behind_empty_lines_is_parsed_as_http(lt, mesh, nats_server, app):
    """Many servers skip empty lines before a request (RFC 9112 2.2): so must detection."""
    p = server_proxy(lt, mesh, nats_server.url, app.port)
    try:
        got = raw_exchange(p.inbound, b"\r\n\r\nGET /after-blank-lines HTTP/1.1\r\nHost: web\r\n"
                                      b"tulle-client-id: " + SPOOFED.encode() + b"\r\nConnection: close\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200")
        assert app.seen[-1].path == "/after-blank-lines" and app.seen[-1].all("tulle-client-id") == []
        assert p.metric("protocol_detect_total", direction="inbound", protocol="http/1") == 1
    finally:
        p.stop()


def test_a_request_line_slower_than_detection_is_still_parsed_as_http(lt, mesh, nats_server, app):
    p = server_proxy(lt, mesh, nats_server.url, app.port, detect_timeout_s=0.3)
    try:
        with socket.create_connection(("127.0.0.1", p.inbound), timeout=10) as s:
            s.sendall(b"GET /slow HT")
            # Detection gives up on the unfinished line and judges it HTTP all the same.
            wait_until(lambda: p.metric("protocol_detect_total", direction="inbound", protocol="http/1") == 1,
                       what="the proxy to judge the slow connection")
            s.sendall(b"TP/1.1\r\nHost: web\r\ntulle-client-id: " + SPOOFED.encode() + b"\r\n\r\n")
            status, _, body = read_response(s)
        assert (status, body) == (200, b"web")
        assert app.seen[-1].path == "/slow" and app.seen[-1].all("tulle-client-id") == []
    finally:
        p.stop()


def test_http_sent_after_a_silent_start_is_taken_back_as_http(lt, mesh, nats_server, app):
    """Silent past the detection timeout (as a server-speaks-first client would be), then HTTP:
    the proxy has already dialled the app, yet the request is served as HTTP, not passed raw."""
    p = server_proxy(lt, mesh, nats_server.url, app.port, detect_timeout_s=0.2)
    try:
        with socket.create_connection(("127.0.0.1", p.inbound), timeout=10) as s:
            wait_until(lambda: p.metric("protocol_detect_total", direction="inbound", protocol="timeout") == 1,
                       what="detection to time out")
            s.sendall(b"GET /late HTTP/1.1\r\nHost: web\r\ntulle-client-id: " + SPOOFED.encode() + b"\r\n\r\n")
            status, _, _ = read_response(s)
        assert status == 200 and app.seen[-1].path == "/late" and app.seen[-1].all("tulle-client-id") == []
    finally:
        p.stop()


def test_a_server_first_protocol_on_an_undeclared_port_still_works(lt, mesh, nats_server):
    def greeter(conn):
        conn.sendall(b"220 smtp-ish ready\r\n")
        while data := conn.recv(65536):
            conn.sendall(b"250 " + data)

    raw = RawServer(greeter)
    p = server_proxy(lt, mesh, nats_server.url, raw.port, detect_timeout_s=0.2)
    try:
        with socket.create_connection(("127.0.0.1", p.inbound), timeout=10) as s:
            assert s.recv(100) == b"220 smtp-ish ready\r\n"
            s.sendall(b"GET it\r\n")  # looks a little like a request line, but the app spoke first
            assert s.recv(100) == b"250 GET it\r\n"
    finally:
        p.stop()
        raw.close()


# --- declared protocols ---------------------------------------------------------------------------


def declared(ns: str, port: int, protocol: str) -> InboundPolicy:
    policy = InboundPolicy("all-unauthenticated")
    wp = workload_policy(ns, "web-1")
    open_port = default_port_policy("all-unauthenticated", schemas.DEFAULT_CLUSTER_NETWORKS, port)
    wp.ports = [schemas.PortPolicy(port, f"{ns}/web", "Server", protocol, open_port.authorizations, "Server")]
    policy.update(wp)
    return policy


def test_a_port_declared_http_refuses_anything_else(lt, mesh, nats_server):
    raw = RawServer(lambda conn: conn.sendall(b"should never be reached"))
    ns = unique_ns()
    p = Proxy(lt, proxy_config(nats_server.url, ns, "web-1", "web", app_default_port=raw.port, detect_timeout_s=0.3),
              mesh.identity("web", ns), policy=declared(ns, raw.port, "HTTP/1"))
    try:
        assert refused(p.inbound, b"\x00\x01binary protocol\r\n")
        assert p.metric("inbound_tcp_errors_total", error="protocol_mismatch") == 1
        assert raw.accepted == 0
    finally:
        p.stop()
        raw.close()


# --- before the first policy ----------------------------------------------------------------------


def test_a_deny_workload_answers_no_one_before_its_policy_allows_it(lt, mesh, nats_server, app, kv):
    ns = unique_ns()
    p = server_proxy(lt, mesh, nats_server.url, app.port, ns=ns, default_inbound_policy="deny", policy_wait_s=0.3)
    try:
        status, headers, _ = http_request(p.inbound, host="web")
        assert status == 403 and app.seen == []  # held, then judged by the configured default
        assert p.metric("inbound_tcp_errors_total", error="policy_not_received") == 1
        kv.put_policy(workload_policy(ns, "web-1", default="all-unauthenticated"))
        wait_until(lambda: http_request(p.inbound, host="web")[0] == 200, what="the policy to let requests in")
        held = p.metric("inbound_tcp_errors_total", error="policy_not_received")
        assert http_request(p.inbound, host="web")[0] == 200  # no more holding once it is known
        assert p.metric("inbound_tcp_errors_total", error="policy_not_received") == held
    finally:
        p.stop()


def test_a_connection_that_arrives_just_before_the_policy_is_judged_by_the_policy(lt, mesh, nats_server, app, kv):
    ns = unique_ns()
    p = server_proxy(lt, mesh, nats_server.url, app.port, ns=ns, default_inbound_policy="deny", policy_wait_s=30)
    try:
        with socket.create_connection(("127.0.0.1", p.inbound), timeout=10) as s:
            s.sendall(b"GET /held HTTP/1.1\r\nHost: web\r\n\r\n")
            kv.put_policy(workload_policy(ns, "web-1", default="all-unauthenticated"))
            status, _, _ = read_response(s)
        assert status == 200 and app.seen[-1].path == "/held"
        assert p.metric("inbound_tcp_errors_total", error="policy_not_received") == 0
    finally:
        p.stop()


@pytest.fixture
def kv(lt, nats_server):
    from tests.proxy_support import KV

    k = KV(lt, nats_server.url)
    yield k
    k.close()


def test_http2_a_peer_declares_opaque_is_served_as_http2_with_the_peers_verified_identity(lt, mesh, nats_server):
    """A peer may declare its stream opaque; on a port a Server declares gRPC its HTTP/2 is
    still parsed (the app, an HTTP/2 server, even speaks first), so the app gets the peer's
    verified identity and never the one the request claims."""
    app = H2App()
    ns = unique_ns()
    p = Proxy(lt, proxy_config(nats_server.url, ns, "web-1", "web", app_default_port=app.port),
              mesh.identity("web", ns), policy=declared(ns, app.port, "gRPC"))
    client = H2Client(p.inbound, tls=mesh.identity("client", ns).client_context, server_hostname=p.cfg.identity,
                      first=tph.encode(app.port, tph.OPAQUE))
    try:
        resp = client.request(b"/demo.Books/GetBook", method=b"POST", body=b"\0\0\0\0\0",
                              extra=[(b"content-type", b"application/grpc"), (b"te", b"trailers"), *SPOOFED_ID])
        assert resp.status == 200 and resp.trailers == [(b"grpc-status", b"0")]
        (seen,) = app.seen
        assert client_id_fields(seen) == [schemas.identity_name("client", ns).encode()]
        assert p.metric("inbound_tcp_errors_total", error="protocol_mismatch") == 0
        assert p.metric("protocol_detect_total", direction="inbound", protocol="h2") == 1
    finally:
        client.close()
        p.stop()
        app.close()


def test_a_peers_http2_connection_is_held_per_request_to_the_protocol_a_server_declares(lt, mesh, nats_server, app):
    """Between proxies one HTTP/2 connection carries HTTP/1 requests (orig-proto) and HTTP/2
    ones alike: a port a Server declares HTTP/1 takes the first and refuses the second."""
    ns = unique_ns()
    p = Proxy(lt, proxy_config(nats_server.url, ns, "web-1", "web", app_default_port=app.port),
              mesh.identity("web", ns), policy=declared(ns, app.port, "HTTP/1"))
    client = H2Client(p.inbound, tls=mesh.identity("client", ns).client_context, server_hostname=p.cfg.identity,
                      first=tph.encode(app.port, tph.HTTP2))
    try:
        ok = client.request(b"/restored", extra=[(b"tulle-orig-proto", b"HTTP/1.1")])
        assert ok.status == 200 and app.seen[-1].path == "/restored" and app.seen[-1].version == "HTTP/1.1"
        refused = client.request(b"/h2-on-an-http1-port")
        assert refused.status == 400 and refused.header(b"tulle-proxy-error") == b"port %d is declared HTTP/1" % app.port
        assert app.seen[-1].path == "/restored"
        assert p.metric("inbound_http_errors_total", error="protocol_mismatch") == 1
    finally:
        client.close()
        p.stop()
