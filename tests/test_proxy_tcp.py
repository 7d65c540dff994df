"""Opaque TCP: what the inbound proxy forwards byte for byte, and its counters.

(Opaque TCP through both proxies chosen by the original destination's `_ip` key needs
iptables: see tests/test_proxy_netns.py. A CONNECT tunnel through both proxies is in
tests/test_proxy_http1.py.)
"""

import os
import socket
import ssl
import tempfile
import threading

import pytest
from cryptography import x509

from tests.conftest import wait_until
from tests.h2_peers import SPOOFED_ID, H2App, H2Client, client_id_fields
from tests.proxy_support import Mesh, Proxy, RawServer, proxy_config, unique_ns
from tulle import pki


@pytest.fixture(scope="module")
def mesh():
    return Mesh()


def inbound_proxy(lt, mesh, nats_url, app_port, **kw):
    ns = unique_ns()
    return Proxy(lt, proxy_config(nats_url, ns, "srv", "srv", app_default_port=app_port, **kw), mesh.identity("srv", ns))


def echo(conn):
    while data := conn.recv(65536):
        conn.sendall(data)


def test_the_apps_own_tls_passes_through_the_inbound_proxy_untouched(lt, mesh, nats_server):
    app_ca = pki.new_trust_anchor("app.example")
    leaf, key = pki.issue_leaf(pki.new_issuer(app_ca, "app.example"), "shop.example.com")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as d:
        cert, keyf = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
        open(cert, "wb").write(pki.cert_pem(leaf) + pki.new_issuer(app_ca).cert_pem)
        open(keyf, "wb").write(pki.key_pem(key))
        server_ctx.load_cert_chain(cert, keyf)

    def tls_app(conn):
        with server_ctx.wrap_socket(conn, server_side=True) as s:
            s.sendall(b"tls-app:" + s.recv(100))

    raw = RawServer(tls_app)
    p = inbound_proxy(lt, mesh, nats_server.url, raw.port)
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the app's own CA: the point is the bytes pass through
        with socket.create_connection(("127.0.0.1", p.inbound), timeout=10) as plain:
            with ctx.wrap_socket(plain, server_hostname="shop.example.com") as s:
                s.sendall(b"hello")
                assert s.recv(100) == b"tls-app:hello"
                cert = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
                assert pki.cert_identity(cert) == "shop.example.com"  # the app's certificate, not the proxy's
        assert p.metric("protocol_detect_total", direction="inbound", protocol="tls") == 1
    finally:
        p.stop()
        raw.close()


def test_http2_prior_knowledge_from_outside_the_mesh_is_parsed_so_a_spoofed_client_id_never_reaches_the_app(
        lt, mesh, nats_server):
    """Passed opaque, an h2c request would reach the app with whatever tulle-client-id it
    carries: the inbound proxy parses it, strips every folded spelling and sets none."""
    app = H2App()
    p = inbound_proxy(lt, mesh, nats_server.url, app.port)
    client = H2Client(p.inbound)
    try:
        resp = client.request(b"/books/1", extra=SPOOFED_ID)
        assert resp.status == 200 and resp.body == b"h2app"
        (seen,) = app.seen
        assert client_id_fields(seen) == []
        assert dict(seen.headers)[b":path"] == b"/books/1"
        assert p.metric("protocol_detect_total", direction="inbound", protocol="h2") == 1
    finally:
        client.close()
        p.stop()
        app.close()


def test_http2_prior_knowledge_passes_on_a_port_declared_opaque(lt, mesh, nats_server):
    raw = RawServer(echo)
    p = inbound_proxy(lt, mesh, nats_server.url, raw.port, opaque_ports=frozenset({raw.port}))
    try:
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        with socket.create_connection(("127.0.0.1", p.inbound), timeout=10) as s:
            s.sendall(preface)
            got = b""
            while len(got) < len(preface):
                got += s.recv(65536)
        assert got == preface
    finally:
        p.stop()
        raw.close()


def test_a_server_speaks_first_protocol_works_on_a_configured_opaque_port(lt, mesh, nats_server):
    def greeter(conn):
        conn.sendall(b"+OK ready\r\n")
        echo(conn)

    raw = RawServer(greeter)
    p = inbound_proxy(lt, mesh, nats_server.url, raw.port, opaque_ports=frozenset({raw.port}))
    try:
        with socket.create_connection(("127.0.0.1", p.inbound), timeout=10) as s:
            assert s.recv(100) == b"+OK ready\r\n"  # the client says nothing first
            s.sendall(b"PING\r\n")
            assert s.recv(100) == b"PING\r\n"
    finally:
        p.stop()
        raw.close()


def test_tcp_connections_close_if_client_closes(lt, mesh, nats_server):
    closed = threading.Event()

    def app(conn):
        echo(conn)
        closed.set()

    raw = RawServer(app)
    p = inbound_proxy(lt, mesh, nats_server.url, raw.port)
    try:
        s = socket.create_connection(("127.0.0.1", p.inbound), timeout=10)
        s.sendall(b"\x00binary hello")
        assert s.recv(100) == b"\x00binary hello"
        s.close()
        assert closed.wait(10)
        wait_until(lambda: p.metric("tcp_close_total", direction="inbound") == 1, what="tcp close counted")
        assert p.metric("tcp_open_total", direction="inbound") == 1
        assert p.metric("tcp_read_bytes_total", direction="inbound") == 13
        assert p.metric("tcp_write_bytes_total", direction="inbound") == 13
        assert p.metric("tcp_open_connections", direction="inbound") == 0
    finally:
        p.stop()
        raw.close()


def test_half_close_is_passed_on_over_plain_tcp(lt, mesh, nats_server):
    def app(conn):
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.sendall(b"got %d bytes" % len(data))  # answers only after the client's EOF

    raw = RawServer(app)
    p = inbound_proxy(lt, mesh, nats_server.url, raw.port)
    try:
        with socket.create_connection(("127.0.0.1", p.inbound), timeout=10) as s:
            s.sendall(b"\x01" * 5000)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(100):
                out += chunk
        assert out == b"got 5000 bytes"
    finally:
        p.stop()
        raw.close()


def test_mtls_before_the_identity_is_certified_is_refused(lt, nats_server):
    from tests.proxy_support import NotYetIdentity, tls_client_context
    mesh = Mesh()
    raw = RawServer(echo)
    ns = unique_ns()
    ident = mesh.identity("srv", ns)
    p = Proxy(lt, proxy_config(nats_server.url, ns, "srv", "srv", app_default_port=raw.port), NotYetIdentity(ident.identity))
    try:
        ctx = tls_client_context(mesh)
        with socket.create_connection(("127.0.0.1", p.inbound), timeout=10) as plain:
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                with ctx.wrap_socket(plain, server_hostname=ident.identity) as s:
                    s.sendall(b"x")
                    if not s.recv(10):
                        raise ConnectionError("closed")
        assert raw.accepted == 0
    finally:
        p.stop()
        raw.close()
