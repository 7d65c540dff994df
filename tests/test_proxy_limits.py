"""What the proxy refuses, and that a refusal never touches another connection.

Each malformed request gets a protocol-correct answer (400, 414, 431, 408) with
`tulle-proxy-error`, its own connection is closed, and a keep-alive connection opened
before it keeps working. Real sockets against a real proxy and a real upstream.
"""

import socket
import threading
import time

import pytest

from tests.proxy_support import (
    KV, AppServer, KeepAlive, Mesh, Proxy, RawServer, exchange, proxy_config, read_response, unique_ns,
)


@pytest.fixture(scope="module")
def edge(lt, nats_server):
    """One outbound proxy in front of an app outside the mesh (plain forwarding)."""
    app = AppServer("origin")
    ns = unique_ns()
    proxy = Proxy(lt, proxy_config(nats_server.url, ns, "edge", max_headers=100, max_header_bytes=16384),
                  Mesh().identity("edge", ns))
    kv = KV(lt, nats_server.url)
    yield proxy, app, f"127.0.0.1:{app.port}"
    proxy.stop()
    app.close()
    kv.close()


SMUGGLING = {
    "content-length with transfer-encoding": b"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding with content-length": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "conflicting content-lengths": b"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "repeated content-length": b"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "signed content-length": b"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: +3\r\n\r\nabc",
    "non-numeric content-length": b"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 3a\r\n\r\nabc",
    "list content-length": b"POST / HTTP/1.1\r\nHost: {h}\r\nContent-Length: 3, 3\r\n\r\nabc",
    "gzip then chunked": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "chunked then identity": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "identity": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: identity\r\n\r\nabc",
    "chunked with a tab": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n",
    "repeated transfer-encoding": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding on http/1.0": b"POST / HTTP/1.0\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: {h}\r\nX-A: b\r\n c\r\n\r\n",
    "NUL in a value": b"GET / HTTP/1.1\r\nHost: {h}\r\nX-A: b\x00c\r\n\r\n",
    "CR in a value": b"GET / HTTP/1.1\r\nHost: {h}\r\nX-A: b\rc\r\n\r\n",
    "bare LF in a value": b"GET / HTTP/1.1\r\nHost: {h}\r\nX-A: b\nX-B: c\r\n\r\n",
    "space before the colon": b"GET / HTTP/1.1\r\nHost: {h}\r\nX-A : b\r\n\r\n",
    "two hosts": b"GET / HTTP/1.1\r\nHost: {h}\r\nHost: evil.example\r\n\r\n",
    "chunk size overflow": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nx\r\n0\r\n\r\n",
    "chunk without its CRLF": b"POST / HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n",
    "missing host": b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n",
}


@pytest.mark.parametrize("case", list(SMUGGLING))
def test_request_smuggling_is_refused_with_400_and_only_its_connection_closes(edge, case):
    proxy, app, host = edge
    other = KeepAlive(proxy.outbound, host)
    try:
        other.check()
        before = len(app.seen)
        out, closed = exchange(proxy.outbound, SMUGGLING[case].replace(b"{h}", host.encode()))
        assert out.startswith(b"HTTP/1.1 400 "), out
        assert b"tulle-proxy-error: " in out and closed
        other.check()
        # Nothing that could be read two ways reached the app as a complete request.
        assert all(s.path != "/" or s.method == "GET" for s in app.seen[before:])
    finally:
        other.close()


def _with_headers(host: str, n: int) -> bytes:
    extra = "".join(f"X-H{i}: {i}\r\n" for i in range(n - 1))
    return f"GET /big/2 HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def test_100_headers_are_accepted(edge):
    proxy, app, host = edge
    counted = []

    def count_headers(conn):
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        counted.append(data.split(b"\r\n\r\n")[0].count(b"\r\n"))
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    raw = RawServer(count_headers)
    try:
        with socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10) as s:
            s.sendall(_with_headers(f"127.0.0.1:{raw.port}", 100))
            assert read_response(s)[::2] == (200, b"ok")
        assert counted == [100]
    finally:
        raw.close()


def test_101_headers_are_refused_with_431(edge):
    proxy, app, host = edge
    other = KeepAlive(proxy.outbound, host)
    try:
        out, closed = exchange(proxy.outbound, _with_headers(host, 101))
        assert out.startswith(b"HTTP/1.1 431 ") and closed
        other.check()
    finally:
        other.close()


def test_header_bytes_are_counted_across_many_reads(edge):
    """One header value grown in small writes, never finished: refused once over the limit."""
    proxy, app, host = edge
    other = KeepAlive(proxy.outbound, host)
    try:
        with socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nX-Big: ".encode())
            for _ in range(64):  # 64 x 512 bytes: twice the 16 KiB limit, one segment at a time
                try:
                    s.sendall(b"a" * 512)
                except (BrokenPipeError, ConnectionResetError):
                    break
                time.sleep(0.002)
            got = b""
            while b"\r\n\r\n" not in got:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += chunk
        assert got.startswith(b"HTTP/1.1 431 "), got
        other.check()
    finally:
        other.close()


def test_many_small_headers_over_the_byte_limit_are_refused_with_431(edge):
    proxy, app, host = edge
    lines = "".join(f"X-H{i}: {'v' * 300}\r\n" for i in range(60))  # 60 headers, ~18 KiB
    out, closed = exchange(proxy.outbound, f"GET / HTTP/1.1\r\nHost: {host}\r\n{lines}\r\n".encode())
    assert out.startswith(b"HTTP/1.1 431 ") and closed


def test_a_request_line_over_the_limit_is_refused(edge):
    proxy, app, host = edge
    out, closed = exchange(proxy.outbound, f"GET /{'a' * 20000} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert out.split(b" ")[1] in (b"414", b"431") and closed


def test_a_slow_header_client_gets_408(lt, nats_server):
    ns = unique_ns()
    app = AppServer("patient")
    host = f"127.0.0.1:{app.port}"
    proxy = Proxy(lt, proxy_config(nats_server.url, ns, "strict", header_read_timeout_s=0.5), Mesh().identity("s", ns))
    other = KeepAlive(proxy.outbound, host)
    try:
        with socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode())
            started = time.monotonic()
            out = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
            waited = time.monotonic() - started
        assert out.startswith(b"HTTP/1.1 408 ") and b"tulle-proxy-error" in out
        assert waited < 8  # the proxy's header read timeout (0.5 s here), not the client's patience
        other.check()
        assert proxy.metric("outbound_http_errors_total", error="header_timeout") == 1
    finally:
        other.close()
        proxy.stop()
        app.close()


def test_an_abrupt_disconnect_mid_body_reaches_the_upstream_and_nothing_else(lt, nats_server, edge):
    proxy, _, host = edge
    got = {}
    done = threading.Event()
    receiving = threading.Event()

    def app(conn):
        data = b""
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    got["end"] = "eof"
                    break
                data += chunk
                if len(data) > 50_000:
                    receiving.set()
        except ConnectionResetError:
            got["end"] = "reset"
        got["bytes"] = len(data)
        done.set()

    raw = RawServer(app)
    other = KeepAlive(proxy.outbound, host)
    try:
        s = socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10)
        s.sendall(f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{raw.port}\r\nContent-Length: 1000000\r\n\r\n".encode())
        s.sendall(b"b" * 100_000)
        assert receiving.wait(10), "the body never started to reach the upstream"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # reset, 900 KB short
        assert done.wait(10), "the upstream never saw the request end"
        assert got["end"] in ("eof", "reset") and got["bytes"] < 1_000_000
        other.check()
    finally:
        other.close()
        raw.close()


def test_an_idle_keep_alive_connection_is_closed(lt, nats_server):
    ns = unique_ns()
    app = AppServer("idle")
    proxy = Proxy(lt, proxy_config(nats_server.url, ns, "idle", idle_timeout_s=0.3), Mesh().identity("idle", ns))
    try:
        with socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\n\r\n".encode())
            assert read_response(s)[0] == 200
            s.settimeout(5)
            assert s.recv(10) == b""  # closed by the proxy after 0.3 s idle
    finally:
        proxy.stop()
        app.close()
