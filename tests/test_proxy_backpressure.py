"""End-to-end backpressure: a proxy between a fast side and a side that will not keep up
holds a bounded amount, whatever the size of the message — its memory stays flat.

The proxy runs as its own process so that its resident memory (/proc/<pid>/status) is its
own; the bound asserted (30 MB of growth for a 100 MB message) cannot be met by accident:
a proxy that buffered would grow by the message's size.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.conftest import wait_until
from tests.proxy_support import ProxyProcess, RawServer, read_response, rss_kb

BIG = 100 * 1024 * 1024
CHUNK = 64 * 1024
GROWTH_BOUND_KB = 30 * 1024


class Pusher:
    """Writes BIG bytes into a socket as fast as the other side takes them, counting."""

    def __init__(self):
        self.sent = 0
        self.error: BaseException | None = None

    def push(self, sock: socket.socket, head: bytes) -> None:
        sock.sendall(head)
        block = b"x" * CHUNK
        try:
            while self.sent < BIG:
                sock.sendall(block)
                self.sent += CHUNK
        except OSError as e:
            self.error = e


@pytest.fixture(scope="module")
def proxy(nats_server, tmp_path_factory):
    p = ProxyProcess(nats_server.url, tmp_path_factory.mktemp("backpressure"))
    yield p
    p.stop()


def _warm_up(proxy: ProxyProcess, host: str) -> None:
    """One small exchange first, so that what it costs once is not counted as growth."""
    with socket.create_connection(("127.0.0.1", proxy.outbound), timeout=10) as s:
        s.sendall(f"GET /small HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert read_response(s)[::2] == (200, b"small")


def _serve(conn: socket.socket, on_big) -> None:
    while True:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        if data.startswith(b"GET /small "):
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nsmall")
            continue
        on_big(conn)
        return


def test_a_client_reading_a_100mb_response_at_1kb_per_second_leaves_the_proxy_flat(proxy):
    pusher = Pusher()
    up = RawServer(lambda c: _serve(c, lambda conn: pusher.push(
        conn, b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BIG)))
    host = f"127.0.0.1:{up.port}"
    try:
        _warm_up(proxy, host)
        base = rss_kb(proxy.pid)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        client.connect(("127.0.0.1", proxy.outbound))
        client.settimeout(30)
        client.sendall(f"GET /huge HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        wait_until(lambda: pusher.sent > 0, what="the upstream sending its body")
        peak = base
        got = 0
        for _ in range(3):  # the slow reader: 1 KB a second
            got += len(client.recv(1024))
            peak = max(peak, rss_kb(proxy.pid))
            time.sleep(1)
        growth = peak - base
        print(f"slow reader: proxy RSS {base} kB -> peak {peak} kB (+{growth} kB); upstream had sent "
              f"{pusher.sent // 1024} kB of {BIG // 1024} kB while the client read {got} bytes")
        assert growth < GROWTH_BOUND_KB
        assert pusher.sent < BIG // 2  # held back by the proxy, not read into it
        # Then read fast: all of it arrives, nothing lost.
        while got < BIG:
            chunk = client.recv(1 << 20)
            assert chunk, f"closed after {got} bytes"
            got += len(chunk)
        client.close()
        assert pusher.error is None
    finally:
        up.close()


def test_an_app_that_stops_reading_a_large_request_body_leaves_the_proxy_flat(proxy):
    stop = threading.Event()
    seen_head = threading.Event()

    def never_read(conn: socket.socket) -> None:
        seen_head.set()
        stop.wait(60)  # holds the connection open without reading a byte of the body

    up = RawServer(lambda c: _serve(c, never_read))
    host = f"127.0.0.1:{up.port}"
    pusher = Pusher()
    client = None
    try:
        _warm_up(proxy, host)
        base = rss_kb(proxy.pid)
        client = socket.create_connection(("127.0.0.1", proxy.outbound), timeout=60)
        writer = threading.Thread(target=pusher.push, args=(
            client, f"POST /upload HTTP/1.1\r\nHost: {host}\r\ncontent-length: {BIG}\r\n\r\n".encode()), daemon=True)
        writer.start()
        assert seen_head.wait(10), "the request never reached the app"
        peak = base
        for _ in range(3):
            time.sleep(1)
            peak = max(peak, rss_kb(proxy.pid))
        growth = peak - base
        print(f"app not reading: proxy RSS {base} kB -> peak {peak} kB (+{growth} kB); the client could send "
              f"{pusher.sent // 1024} kB of {BIG // 1024} kB")
        assert growth < GROWTH_BOUND_KB
        assert pusher.sent < BIG // 2 and writer.is_alive()  # the client is held back, not buffered
    finally:
        stop.set()
        if client is not None:
            client.close()
        up.close()
