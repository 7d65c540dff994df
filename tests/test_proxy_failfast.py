"""Fail-fast queueing with Linkerd's semantics: a request to a service without an available
endpoint waits for one up to the fail-fast timeout (3 s outbound, 1 s inbound), then 503
with tulle-proxy-error; then the service fails fast (503 at once) until an endpoint is
back; at most `capacity` requests wait. The queue is pure (proxy/failfast.py); the rest
runs real proxies, real NATS KV and real sockets."""

from __future__ import annotations

import socket
import threading

import pytest

from proxy.failfast import FAILING, FULL, WAIT, FailFastQueue
from tests.conftest import wait_until
from tests.proxy_support import (
    KV, AppServer, Mesh, Proxy, endpoint_set, http_request, proxy_config, read_response, unique_ns,
)
from tulle import schemas

# --- the queue, pure ------------------------------------------------------------------------------


def test_waiters_wait_until_the_oldest_has_waited_the_timeout_then_all_fail_and_new_ones_fail_at_once():
    q = FailFastQueue(timeout_s=3.0, capacity=10)
    assert q.admit("a", now=0.0) == WAIT and q.admit("b", now=2.0) == WAIT
    assert q.deadline() == 3.0
    assert q.expire(now=2.9) == [] and len(q) == 2
    assert q.expire(now=3.0) == ["a", "b"]  # b waited 1 s only: the service is in fail-fast now
    assert q.failing and q.admit("c", now=3.1) == FAILING


def test_an_endpoint_releases_every_waiter_in_order_and_ends_fail_fast():
    q = FailFastQueue(timeout_s=3.0, capacity=10)
    q.admit("a", 0.0)
    q.admit("b", 0.1)
    assert q.available() == ["a", "b"] and len(q) == 0 and q.deadline() is None
    q.expire(10.0)
    q.admit("c", 10.0)
    q.expire(13.0)
    assert q.failing
    assert q.available() == [] and not q.failing
    assert q.admit("d", 14.0) == WAIT


def test_the_queue_holds_capacity_waiters_and_refuses_one_more():
    q = FailFastQueue(timeout_s=3.0, capacity=2)
    assert [q.admit(w, 0.0) for w in "abc"] == [WAIT, WAIT, FULL]
    q.remove("a")
    assert q.admit("d", 0.5) == WAIT and q.available() == ["b", "d"]


def test_a_zero_timeout_fails_at_once():
    assert FailFastQueue(timeout_s=0.0, capacity=10).admit("a", 0.0) == FAILING


# --- outbound -----------------------------------------------------------------------------------


class Service:
    """A client proxy and a service `web` in KV that exists but has no endpoint yet."""

    def __init__(self, lt, nats_url, **cfg):
        self.lt = lt
        self.ns = unique_ns()
        self.app = AppServer("web")
        self.kv = KV(lt, nats_url)
        self.publish([])
        self.proxy = Proxy(lt, proxy_config(nats_url, self.ns, "client", **cfg), Mesh().identity("client", self.ns))

    def publish(self, endpoints):
        self.kv.put(schemas.endpoints_key(self.ns, "web", 80), endpoint_set(self.ns, "web", 80, endpoints))

    def up(self):
        self.publish([schemas.Endpoint(address="127.0.0.1", port=self.app.port)])

    def get(self, **kw):
        return http_request(self.proxy.outbound, host=f"web.{self.ns}", **kw)

    def waiting(self) -> int:
        def count():
            for w in self.proxy.app.shared.discovery.endpoint_watches():
                if w.key == schemas.endpoints_key(self.ns, "web", 80):
                    return len(w.queue) if w.queue is not None else 0
            return 0
        return self.lt.run(count)

    def close(self):
        self.proxy.stop()
        self.kv.close()
        self.app.close()


def in_threads(n: int, fn) -> tuple[list, list[threading.Thread]]:
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(fn())) for _ in range(n)]
    for t in threads:
        t.start()
    return results, threads


def test_traffic_started_before_the_endpoints_exist_fails_nothing_when_they_appear_in_time(lt, nats_server):
    s = Service(lt, nats_server.url)  # the default fail-fast timeout: 3 s
    try:
        results, threads = in_threads(20, lambda: s.get(timeout=30)[::2])
        wait_until(lambda: s.waiting() == 20, what="twenty requests waiting for an endpoint")
        s.up()
        for t in threads:
            t.join(30)
        assert results == [(200, b"web")] * 20
        assert s.proxy.metric("outbound_http_errors_total", error="no_endpoints") == 0
    finally:
        s.close()


def test_a_connect_tunnel_waits_for_an_endpoint_too(lt, nats_server):
    s = Service(lt, nats_server.url)
    try:
        def tunnel():
            with socket.create_connection(("127.0.0.1", s.proxy.outbound), timeout=30) as c:
                c.sendall(f"CONNECT web.{s.ns}:80 HTTP/1.1\r\nHost: web.{s.ns}:80\r\n\r\n".encode())
                status = read_response(c, timeout=30, method="HEAD")[0]  # a 2xx to CONNECT has no body
                c.sendall(f"GET / HTTP/1.1\r\nHost: web.{s.ns}\r\n\r\n".encode())
                return status, read_response(c, timeout=30)[::2]
        results, threads = in_threads(1, tunnel)
        wait_until(lambda: s.waiting() == 1, what="the tunnel waiting for an endpoint")
        s.up()
        threads[0].join(30)
        assert results == [(200, (200, b"web"))]
    finally:
        s.close()


def test_no_endpoint_within_the_timeout_is_a_503_then_the_service_fails_fast_until_one_is_back(lt, nats_server):
    s = Service(lt, nats_server.url, outbound_failfast_timeout_s=0.5)
    try:
        status, headers, _ = s.get()
        assert status == 503
        assert headers["tulle-proxy-error"] == f"no endpoints for {s.ns}/web:80: none became available in 0.5s"
        status, headers, _ = s.get()  # in fail-fast: refused without waiting
        assert status == 503 and headers["tulle-proxy-error"].endswith("in fail-fast (none for 0.5s)")
        assert s.proxy.metric("outbound_http_errors_total", error="no_endpoints") == 1
        assert s.proxy.metric("outbound_http_errors_total", error="failfast") == 1
        s.up()
        wait_until(lambda: s.get()[0] == 200, what="the service served again")
        s.publish([])  # gone again: requests wait again before failing
        results, threads = in_threads(1, lambda: s.get()[0])
        wait_until(lambda: s.waiting() == 1, what="a request waiting again")
        threads[0].join(10)
        assert results == [503]
    finally:
        s.close()


def test_past_the_queue_capacity_a_request_is_refused_at_once(lt, nats_server):
    s = Service(lt, nats_server.url, outbound_queue_capacity=2, outbound_failfast_timeout_s=30)
    try:
        results, threads = in_threads(2, lambda: s.get(timeout=60)[::2])
        wait_until(lambda: s.waiting() == 2, what="two requests waiting")
        status, headers, _ = s.get()
        assert status == 503 and headers["tulle-proxy-error"].endswith("2 requests already wait for one")
        assert all(t.is_alive() for t in threads)  # answered while the two still wait
        assert s.proxy.metric("outbound_http_errors_total", error="queue_full") == 1
        s.up()
        for t in threads:
            t.join(30)
        assert results == [(200, b"web")] * 2
    finally:
        s.close()


# --- inbound: the app not listening yet ------------------------------------------------------------


class LateApp:
    """A port that refuses connections until `listen()`: an app still starting."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def listen(self):
        self.sock.listen(8)

        def serve():
            conn, _ = self.sock.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlate")
        threading.Thread(target=serve, daemon=True).start()

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("starts", [True, False])
def test_inbound_waits_up_to_its_failfast_timeout_for_the_app_to_accept(lt, nats_server, starts):
    ns = unique_ns()
    app = LateApp()
    server = Proxy(lt, proxy_config(nats_server.url, ns, "web-1", "web", app_default_port=app.port),
                   Mesh().identity("web", ns))
    try:
        results, threads = in_threads(1, lambda: http_request(server.inbound, host="web", timeout=30))
        wait_until(lambda: lt.run(lambda: server.app.inbound.waiting_for_app) == 1, what="the request waiting")
        if starts:
            app.listen()
        threads[0].join(30)
        status, headers, body = results[0]
        if starts:
            assert (status, body) == (200, b"late")
        else:
            assert status == 503 and headers["tulle-proxy-error"].endswith("for 1s (fail-fast)")
            assert server.metric("inbound_http_errors_total", error="failfast") == 1
        assert lt.run(lambda: server.app.inbound.waiting_for_app) == 0
    finally:
        server.stop()
        app.close()
