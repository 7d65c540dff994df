"""Discovery as traffic sees it: endpoint changes in KV move traffic, NATS outages do not
stop it, new targets fail fast when discovery is silent, idle watches go away."""

import time

import pytest

from tests.conftest import wait_until
from tests.proxy_support import (
    KV, AppServer, LoopThread, Mesh, Proxy, endpoint_set, http_request, meshed_endpoint, proxy_config, unique_ns,
)
from tulle import schemas


@pytest.fixture
def lt():
    loop = LoopThread()
    yield loop
    loop.stop()


class Setup:
    """Two meshed app replicas (each behind its own inbound proxy) and one client proxy."""

    def __init__(self, lt, nats_url, **client_cfg):
        self.mesh = Mesh()
        self.ns = unique_ns()
        self.apps = [AppServer("a"), AppServer("b")]
        self.port = 8080
        self.sid = self.mesh.identity("web", self.ns)
        self.servers = [Proxy(lt, proxy_config(nats_url, self.ns, f"web-{a.name}", "web", app_default_port=a.port),
                              self.sid) for a in self.apps]
        self.client = Proxy(lt, proxy_config(nats_url, self.ns, "client", "client", **client_cfg),
                            self.mesh.identity("client", self.ns))
        self.kv = KV(lt, nats_url)

    def endpoint(self, i):
        return meshed_endpoint(self.apps[i].port, self.servers[i].inbound, self.sid.identity)

    def publish(self, *replicas):
        self.kv.put(schemas.endpoints_key(self.ns, "web", self.port),
                    endpoint_set(self.ns, "web", self.port, [self.endpoint(i) for i in replicas]))

    def get(self):
        return http_request(self.client.outbound, host=f"web.{self.ns}:{self.port}")

    def who(self, n=10):
        return {self.get()[2] for _ in range(n)}

    def close(self):
        self.kv.close()
        self.client.stop()
        for s in self.servers:
            s.stop()
        for a in self.apps:
            a.close()


def test_scaling_shifts_traffic_within_a_second(lt, nats_server):
    s = Setup(lt, nats_server.url)
    try:
        s.publish(0)
        assert s.who() == {b"a"}
        started = time.monotonic()
        s.publish(1)  # replica a replaced by replica b
        wait_until(lambda: s.who() == {b"b"}, timeout=10, what="traffic on the new replica only")
        print(f"replacement took effect within {time.monotonic() - started:.3f}s")
        started = time.monotonic()
        s.publish()  # scaled to zero
        wait_until(lambda: s.get()[0] == 503, timeout=10, what="503 once no replica is left")
        s.publish(0)
        wait_until(lambda: s.who() == {b"a"}, timeout=10, what="traffic back on replica a")
        print(f"scale to zero and back took effect within {time.monotonic() - started:.3f}s")
    finally:
        s.close()


def test_concurrent_load_spreads_over_the_replicas(lt, nats_server):
    """Peak-EWMA balancing prefers the less loaded replica: concurrent slow requests use both."""
    import threading
    s = Setup(lt, nats_server.url)
    try:
        s.publish(0, 1)
        answers = []

        def slow():
            status, headers, body = http_request(s.client.outbound, path="/slow/0.3", host=f"web.{s.ns}:{s.port}")
            answers.append(body if status == 200 else (status, headers.get("tulle-proxy-error")))

        threads = [threading.Thread(target=slow) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(answers) == {b"a", b"b"}
    finally:
        s.close()


def test_killing_nats_leaves_traffic_flowing_on_the_last_endpoints(lt, own_nats):
    s = Setup(lt, own_nats.url)
    try:
        s.publish(1)
        assert s.who() == {b"b"}
        own_nats.kill()
        wait_until(lambda: s.client.metric("tulle_bus_connected") == 0, what="the client proxy noticing NATS is gone")
        for _ in range(30):
            assert s.get()[:3:2] == (200, b"b")
    finally:
        s.close()


def test_after_nats_comes_back_the_fresh_snapshot_is_the_truth(lt, own_nats):
    s = Setup(lt, own_nats.url)
    try:
        s.publish(0)
        assert s.who() == {b"a"}
        own_nats.kill()
        wait_until(lambda: s.client.metric("tulle_bus_connected") == 0, what="NATS gone")
        own_nats.start()
        wait_until(lambda: s.client.metric("tulle_bus_connected") == 1, timeout=20, what="NATS back")
        s.kv.put(schemas.endpoints_key(s.ns, "web", s.port), endpoint_set(s.ns, "web", s.port, [s.endpoint(1)]))
        wait_until(lambda: s.who() == {b"b"}, timeout=20, what="the change made after the outage")
    finally:
        s.close()


def test_a_new_target_fails_fast_with_504_when_discovery_is_silent(lt, own_nats):
    s = Setup(lt, own_nats.url)
    try:
        own_nats.kill()
        wait_until(lambda: s.client.metric("tulle_bus_connected") == 0, what="NATS gone")
        status, headers, _ = http_request(s.client.outbound, host=f"never-seen.{s.ns}:80", timeout=20)
        assert status == 504 and "no answer from discovery" in headers["tulle-proxy-error"]
    finally:
        s.close()


def test_one_watch_is_shared_and_dropped_when_idle(lt, nats_server):
    s = Setup(lt, nats_server.url, discovery_idle_timeout_s=0.3)
    try:
        s.publish(0)
        for _ in range(5):
            assert s.get()[0] == 200
        key = f"{schemas.ENDPOINTS_BUCKET}/{schemas.endpoints_key(s.ns, 'web', s.port)}"
        watched = lambda: lt.run(lambda: s.client.app.shared.discovery.watched_keys)  # noqa: E731
        assert watched().count(key) == 1
        wait_until(lambda: key not in watched(), what="the idle watch dropped")
        assert s.get()[2] == b"a"  # subscribes again on next use
    finally:
        s.close()
