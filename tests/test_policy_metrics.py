"""What the proxy will record about authorization decisions: Linkerd's counters with
bounded labels, and rate-limited `proxy.denied` CloudEvents (these over real NATS)."""

from __future__ import annotations

import asyncio

from tulle.policy import Decision, InboundPolicy
from proxy.policy_metrics import DenialLimiter, DenialReporter, PolicyMetrics, client_key
from tulle import schemas
from tulle.bus import Bus
from tulle.metrics import Registry, sample
from tulle.schemas import identity_name
from tests.bus_support import TESTER, bus_for

WEB = identity_name("web", "demo")


def test_each_decision_is_counted_under_linkerds_names_and_labels():
    reg = Registry()
    metrics = PolicyMetrics(reg)
    policy = InboundPolicy("cluster-authenticated", ["10.0.0.0/8"])
    allow = policy.decide_connection(9090, "10.1.1.1", WEB, True)
    deny = policy.decide_request(9090, "10.1.1.1", None, False, "GET", "/")
    metrics.count("tcp", 9090, allow, WEB)
    metrics.count("tcp", 9090, allow, WEB)
    metrics.count("http", 9090, deny, None)
    metrics.count("http", 9090, Decision(True, "books-grpc", "backends-from-web", ""), WEB)
    metrics.count("http", 8086, Decision(True, "default:deny", "default:probe", ""), None)
    text = reg.render()
    assert sample(text, "inbound_tcp_authz_allow_total", srv_kind="default", srv_name="cluster-authenticated",
                  srv_port="9090", authz_kind="default", authz_name="cluster-authenticated", client_id=WEB) == 2
    assert sample(text, "inbound_http_authz_deny_total", srv_kind="default", srv_name="cluster-authenticated",
                  srv_port="9090", client_id="") == 1
    assert sample(text, "inbound_http_authz_allow_total", srv_kind="server", srv_name="books-grpc",
                  authz_kind="serverauthorization", authz_name="backends-from-web", client_id=WEB) == 1
    assert sample(text, "inbound_http_authz_allow_total", srv_name="deny", authz_kind="default",
                  authz_name="probe", srv_port="8086") == 1
    assert sample(text, "inbound_tcp_authz_deny_total") == 0


def test_client_identity_and_port_labels_are_capped():
    reg = Registry()
    metrics = PolicyMetrics(reg, max_values=3)
    d = Decision(True, "s", "a", "")
    for i in range(10):
        metrics.count("tcp", 1000 + i, d, f"c{i}.example")
    text = reg.render()
    assert sample(text, "inbound_tcp_authz_allow_total", client_id="other") == 7
    assert sample(text, "inbound_tcp_authz_allow_total", srv_port="other") == 7
    assert sample(text, "inbound_tcp_authz_allow_total", client_id="c0.example", srv_port="1000") == 1
    series = [line for line in text.splitlines() if line.startswith("inbound_tcp_authz_allow_total{")]
    assert len(series) == 4


def test_denials_are_grouped_by_identity_or_network():
    assert client_key("10.1.2.3", WEB) == WEB
    assert client_key("10.1.2.3", None) == client_key("10.1.2.200", None) == "10.1.2.0/24"
    assert client_key("::ffff:10.1.2.3", None) == "10.1.2.0/24"
    assert client_key("fd00:1:2:3:4::9", None) == "fd00:1:2:3::/64"
    assert client_key("garbage", None) == "unknown"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_at_most_one_denial_event_per_server_and_client_per_interval():
    clock = Clock()
    limiter = DenialLimiter(interval_s=10, clock=clock)
    assert limiter.admit("books", "a") == 0
    assert limiter.admit("books", "a") is None
    assert limiter.admit("books", "a") is None
    assert limiter.admit("books", "b") == 0  # another client
    assert limiter.admit("authors", "a") == 0  # another server
    clock.now += 9.9
    assert limiter.admit("books", "a") is None
    clock.now += 0.2
    assert limiter.admit("books", "a") == 3  # the three held back since the last one


def test_a_flood_of_distinct_clients_is_capped_per_interval_and_memory_stays_bounded():
    clock = Clock()
    limiter = DenialLimiter(interval_s=10, max_per_interval=5, max_keys=50, clock=clock)
    published = sum(limiter.admit("books", f"c{i}") is not None for i in range(1000))
    assert published == 5
    for round_ in range(20):
        clock.now += 10
        published = sum(limiter.admit("books", f"r{round_}-{i}") is not None for i in range(100))
        assert published == 5
        assert len(limiter._last) <= 50 and len(limiter._held) <= 50


async def test_denials_become_rate_limited_cloudevents(nats_url):
    bus = bus_for(nats_url, "proxy:demo/books")
    await bus.start()
    listener = bus_for(nats_url, TESTER, component="test")
    await listener.start()
    got: asyncio.Queue = asyncio.Queue()

    async def on_msg(msg):
        got.put_nowait((msg.subject, schemas.decode_event(msg.data)))

    try:
        await listener.subscribe_raw("tulle.events.proxy.denied", on_msg)
        await listener.sync()
        reg = Registry()
        reporter = DenialReporter(bus, namespace="demo", workload="books-x1", registry=reg)
        denied = Decision(False, "books-grpc", "", "port 9090: no authorization on Server books-grpc admits ...")
        assert reporter.report("http", 9090, denied, "10.77.0.5", None)
        assert not reporter.report("http", 9090, denied, "10.77.0.9", None)  # same /24, same server
        subject, ev = await asyncio.wait_for(got.get(), 5)
        assert subject == "tulle.events.proxy.denied" and ev.type == "dev.tulle.proxy.denied"
        assert ev.subject == "demo/books-x1"
        assert ev.data == {"namespace": "demo", "workload": "books-x1", "protocol": "http", "port": 9090,
                           "server": "books-grpc", "client_identity": "", "client_ip": "10.77.0.5",
                           "reason": denied.reason, "suppressed_before": 0}
        assert sample(reg.render(), "tulle_policy_denial_events_suppressed_total") == 1
        assert sample(reg.render(), "tulle_policy_denial_events_total") == 1
        # Another client is its own stream of events.
        assert reporter.report("tcp", 9090, denied, "10.77.0.5", WEB)
        _, ev = await asyncio.wait_for(got.get(), 5)
        assert ev.data["client_identity"] == WEB and ev.data["protocol"] == "tcp"
    finally:
        await bus.close()
        await listener.close()


# --- the proxy's watch of its own key --------------------------------------------------------------


async def test_the_proxy_applies_its_own_policy_as_soon_as_it_is_written_and_keeps_the_last_one(nats_url):
    import time
    import uuid

    from tulle.policy import default_port_policy
    from proxy.policy_watch import PolicyWatcher
    from tests.conftest import eventually

    ns = f"w{uuid.uuid4().hex[:8]}"
    bus = bus_for(nats_url, "proxy:demo/books")
    await bus.start()
    writer = bus_for(nats_url, "policy", component="policy")
    await writer.start()
    policy = InboundPolicy("deny")
    watcher = PolicyWatcher(bus, ns, "books", policy)
    task = asyncio.ensure_future(watcher.run())
    try:
        await writer.put(schemas.POLICY_BUCKET, f"{ns}.other", schemas.WorkloadPolicy(
            ns, "other", "all-unauthenticated", default_port_policy("all-unauthenticated", [])))
        assert not policy.has_policy and not policy.decide_connection(80, "10.0.0.1", None, False).allowed

        def wp(default: str) -> schemas.WorkloadPolicy:
            return schemas.WorkloadPolicy(ns, "books", default, default_port_policy(default, ["10.0.0.0/8"]))

        await writer.put(schemas.POLICY_BUCKET, f"{ns}.books", wp("cluster-unauthenticated"))
        await asyncio.wait_for(watcher.first.wait(), 5)
        assert policy.has_policy and policy.decide_connection(80, "10.0.0.1", None, False).allowed
        written = time.monotonic()
        await writer.put(schemas.POLICY_BUCKET, f"{ns}.books", wp("cluster-authenticated"))
        await eventually(lambda: not policy.decide_connection(80, "10.0.0.1", None, False).allowed,
                         what="the changed policy applied")
        print(f"KV put -> applied in the proxy: {1000 * (time.monotonic() - written):.1f} ms")
        generation, seen = policy.generation, watcher.seen
        await writer.delete(schemas.POLICY_BUCKET, f"{ns}.books")
        await eventually(lambda: watcher.seen > seen, what="the deletion received")
        assert policy.generation == generation and policy.policy.default_policy == "cluster-authenticated"
        seen = watcher.seen
        await writer.put(schemas.POLICY_BUCKET, f"{ns}.books", wp("cluster-authenticated"))
        await eventually(lambda: watcher.seen > seen, what="the same value again")
        assert policy.generation == generation  # an identical value is no update
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()
        await writer.close()
