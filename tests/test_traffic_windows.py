"""The proxy's traffic windows (proxy/traffic_stats.py), pure: cumulative readings in, edges
over a window out — with an injected clock, so every boundary is exact."""

from __future__ import annotations

import pytest

from proxy.metrics import ProxyMetrics
from tulle.policy import Decision
from proxy.policy_metrics import PolicyMetrics
from proxy.traffic_stats import (
    OVERFLOW_PEER, Reading, TrafficWindows, identity_parts, inbound_key, outbound_key, read_edges, traffic_reply,
)
from tulle import schemas
from tulle.codec import decode, encode
from tulle.metrics import LATENCY_BUCKETS_MS, Registry

WEB_ID = schemas.identity_name("web", "demo")
BOOKS_ID = schemas.identity_name("books", "demo")
FROM_WEB = inbound_key(WEB_ID)
TO_BOOKS = outbound_key("demo", "books", "true", BOOKS_ID)


class Clock:
    def __init__(self, t: float = 1000.5):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Counting:
    """Cumulative totals of a few edges, as the proxy's counters would hold them."""

    def __init__(self):
        self.totals: dict = {}

    def add(self, key, requests: int = 0, ok: int = 0, failed: int = 0, latency_ms: float | None = None,
            opened: int = 0, open_now: int | None = None, read: int = 0, written: int = 0, denied: int = 0):
        r = self.totals.setdefault(key, Reading())
        r.requests += requests
        r.successes += ok
        r.failures += failed
        r.denied += denied
        if latency_ms is not None:
            import bisect
            r.latency[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += ok + failed
        r.tcp_opened += opened
        if open_now is not None:
            r.tcp_open = open_now
        r.bytes_read += read
        r.bytes_written += written

    def readings(self) -> dict:
        # Each sample gets its own copies, as read_edges builds new Readings every time.
        return {k: Reading(r.requests, r.successes, r.failures, r.denied, list(r.latency), r.tcp_opened, r.tcp_open,
                           r.bytes_read, r.bytes_written) for k, r in self.totals.items()}


def edge(windows: TrafficWindows, key, seconds: float = 60) -> schemas.TrafficEdge:
    found = [e for e in windows.window(seconds)
             if (e.direction, e.peer_namespace, e.peer_name, e.peer_identity, e.secured) == key]
    assert len(found) == 1, windows.window(seconds)
    return found[0]


def test_an_identity_names_the_client_by_its_namespace_and_service_account():
    assert identity_parts(WEB_ID) == ("demo", "web")
    assert identity_parts("not-an-identity") == ("", "")
    assert FROM_WEB == ("inbound", "demo", "web", WEB_ID, True)
    assert inbound_key("") == ("inbound", "", "", "", False)
    assert outbound_key("demo", "authors", "no_identity", "") == ("outbound", "demo", "authors", "", False)


def test_a_window_holds_exactly_what_changed_in_its_last_n_seconds():
    clock, c = Clock(1000.5), Counting()
    w = TrafficWindows(clock=clock)
    c.add(FROM_WEB, requests=3, ok=3, latency_ms=4)
    w.sample(c.readings())                    # second 1000
    clock.t = 1001.5
    c.add(FROM_WEB, requests=2, ok=1, failed=1, latency_ms=40)
    w.sample(c.readings())                    # second 1001
    clock.t = 1060.2
    c.add(FROM_WEB, requests=1, ok=1, latency_ms=400)
    w.sample(c.readings())                    # second 1060, the current one
    e = edge(w, FROM_WEB, 60)                 # seconds 1001..1060
    assert (e.requests, e.successes, e.failures) == (3, 2, 1)
    assert e.latency_buckets_ms == [float(b) for b in LATENCY_BUCKETS_MS]
    counts = dict(zip(LATENCY_BUCKETS_MS, e.latency_counts))
    assert (counts[5], counts[40], counts[400]) == (0, 2, 1)
    assert edge(w, FROM_WEB, 61).requests == 6
    assert edge(w, FROM_WEB, 1).requests == 1
    assert w.covered_s(60) == pytest.approx(59.2)  # the current second is partial


def test_nothing_that_changed_counts_twice_and_a_counter_that_shrank_counts_nothing():
    clock, c = Clock(), Counting()
    w = TrafficWindows(clock=clock)
    c.add(FROM_WEB, requests=5, ok=5)
    w.sample(c.readings())
    w.sample(c.readings())                    # the same totals again: nothing new
    clock.t += 1
    w.sample(c.readings())
    assert edge(w, FROM_WEB).requests == 5
    w.sample({FROM_WEB: Reading(requests=2)})  # fewer than before (never happens; must not go negative)
    assert edge(w, FROM_WEB).requests == 5


def test_beyond_the_last_minute_figures_are_kept_per_ten_seconds_up_to_ten_minutes():
    clock, c = Clock(2000.0), Counting()
    w = TrafficWindows(clock=clock)
    w.started = 0.0
    for second in range(2000, 2600):          # ten minutes, one request every second
        clock.t = second + 0.5
        c.add(TO_BOOKS, requests=1, ok=1, latency_ms=3)
        w.sample(c.readings())
    assert edge(w, TO_BOOKS, 60).requests == 60
    assert edge(w, TO_BOOKS, 600).requests == 600
    # 5 minutes: seconds 2300..2599; beyond the last minute the window starts at a 10 s slot
    assert edge(w, TO_BOOKS, 300).requests == 300
    assert edge(w, TO_BOOKS, 295).requests == 300   # 2305.. widened to the slot starting at 2300
    assert w.covered_s(295) == pytest.approx(2599.5 - 2300)
    e = w._edges[TO_BOOKS]
    assert len(e.fine) == 60 and len(e.coarse) <= 55  # bounded whatever the traffic


def test_figures_older_than_the_retention_are_gone_and_an_idle_edge_is_dropped():
    clock, c = Clock(100.0), Counting()
    w = TrafficWindows(clock=clock)
    c.add(FROM_WEB, requests=1, ok=1)
    w.sample(c.readings())
    clock.t = 100.0 + 605
    w.sample(c.readings())
    assert edge(w, FROM_WEB, 600).requests == 1  # its 10 s slot (100..109) still reaches into the window
    assert w.covered_s(600) == pytest.approx(605)
    clock.t = 100.0 + 610
    w.sample(c.readings())
    assert w.window(600) == []
    assert len(w) == 0


def test_open_connections_keep_an_edge_listed_without_new_traffic():
    clock, c = Clock(100.0), Counting()
    w = TrafficWindows(clock=clock)
    c.add(TO_BOOKS, opened=1, open_now=1, read=100, written=50)
    w.sample(c.readings())
    clock.t = 900.0
    w.sample(c.readings())
    e = edge(w, TO_BOOKS, 60)
    assert (e.tcp_open, e.tcp_opened, e.bytes_read) == (1, 0, 0)
    c.add(TO_BOOKS, open_now=0)
    clock.t = 901.0
    w.sample(c.readings())
    assert w.window(60) == []


def test_edges_past_the_cap_are_counted_under_one_other_edge_so_totals_stay_right():
    clock, c = Clock(), Counting()
    w = TrafficWindows(clock=clock, max_edges=3)
    for i in range(10):
        c.add(inbound_key(schemas.identity_name(f"client{i}", "demo")), requests=1, ok=1)
    w.sample(c.readings())
    edges = w.window(60)
    assert len(w) == 3
    other = [e for e in edges if e.peer_name == OVERFLOW_PEER]
    assert [(o.direction, o.requests) for o in other] == [("inbound", 7)]
    assert sum(e.requests for e in edges) == 10


def test_a_proxy_answers_for_its_own_workload_only_and_says_what_span_it_covers():
    clock, c = Clock(1000.0), Counting()
    w = TrafficWindows(clock=clock)
    c.add(FROM_WEB, requests=1, ok=1)
    w.sample(c.readings())
    clock.t = 1005.0
    assert traffic_reply("demo", "books", BOOKS_ID, w, schemas.TrafficRequest(workloads=["demo.web"])) is None
    reply = traffic_reply("demo", "books", BOOKS_ID, w, schemas.TrafficRequest(window_s=60))
    assert (reply.workload, reply.identity, reply.window_s) == ("books", BOOKS_ID, 5.0)  # up for 5 s
    assert decode(schemas.TrafficReply, encode(reply)) == reply


def test_the_proxys_own_counters_fold_into_edges_by_peer():
    """read_edges reads what the request path already counted (proxy/metrics.py Labels)."""
    m = ProxyMetrics(Registry())
    # inbound HTTP from web (mTLS), counted as the HTTP/1 server does
    lab = m.labels("inbound", "demo", tls="true", client_id=WEB_ID)
    for status in (200, 200, 503):
        lab.requests.value += 1
        resp, hist = lab.response(status)
        hist.observe(7)
        resp.value += 1
    resp, hist = lab.response(500, False)   # a profile saying this 500 is no failure
    lab.requests.value += 1
    hist.observe(7)
    resp.value += 1
    # outbound opaque TCP to books: opened, then closed with its bytes (client = the app)
    out = m.labels("outbound", "demo", "books", "true", server_id=BOOKS_ID)
    out.tcp_opened()
    out.tcp_closed(read=300, written=1200)
    # a plain client, and an unmeshed one over its own TLS: both nobody in particular
    m.labels("inbound", "demo").requests.value += 1
    m.labels("inbound", "demo", tls="opaque").tcp_opened()
    authz = PolicyMetrics(Registry())
    authz.count("http", 8080, Decision(False, "srv", "", "unauthorized"), WEB_ID)

    readings = read_edges(m, authz=authz)
    web = readings[FROM_WEB]
    assert (web.requests, web.successes, web.failures, web.denied) == (4, 3, 1, 1)
    assert web.latency[LATENCY_BUCKETS_MS.index(10)] == 4  # the 500s' histogram child counted once
    books = readings[TO_BOOKS]
    # outbound the peer is the server: read from it = what the app was written
    assert (books.tcp_opened, books.tcp_open, books.bytes_read, books.bytes_written) == (1, 0, 1200, 300)
    nobody = readings[inbound_key("")]
    assert (nobody.requests, nobody.tcp_opened, nobody.tcp_open) == (1, 1, 1)
