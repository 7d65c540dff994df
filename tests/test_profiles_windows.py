"""Rolling route windows, percentiles, the stats reply and the Prometheus families (pure)."""

import pytest

from proxy.route_stats import RouteMetrics, RouteStats, stats_reply
from tulle.route_windows import histogram_quantile, merge_windows
from tulle import schemas
from tulle.codec import decode, encode
from tulle.metrics import LATENCY_BUCKETS_MS, Registry, sample


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


SVC = "demo.authors"


def one(windows):
    assert len(windows) == 1, windows
    return windows[0]


def test_a_window_merges_exactly_the_buckets_of_the_last_n_seconds():
    clock = Clock(1000.5)
    stats = RouteStats(clock=clock)
    stats.record_effective(SVC, "r", True, 5)       # second 1000: 60 s ago at the end
    clock.t = 1001.2
    stats.record_effective(SVC, "r", False, 5)      # second 1001
    clock.t = 1059.9
    stats.record_effective(SVC, "r", True, 5)       # second 1059
    clock.t = 1060.1
    stats.record_effective(SVC, "r", True, 5)       # second 1060 (the current one)
    stats.record_actual(SVC, "r", True)
    w = one(stats.window(60))                        # seconds 1001..1060
    assert (w.effective_requests, w.effective_successes) == (3, 2)
    assert (w.actual_requests, w.actual_successes) == (1, 1)
    assert one(stats.window(1)).effective_requests == 1
    assert one(stats.window(61)).effective_requests == 4


def test_effective_and_actual_are_counted_apart_as_retries_and_timeouts_make_them_differ():
    stats = RouteStats(clock=Clock())
    # a request that failed once and succeeded on its retry
    stats.record_actual(SVC, "r", False)
    stats.record_actual(SVC, "r", True)
    stats.record_effective(SVC, "r", True, 12)
    # a request whose only attempt timed out: an effective failure, no actual response
    stats.record_effective(SVC, "r", False, 300)
    w = one(stats.window(60))
    assert (w.effective_requests, w.effective_successes, w.actual_requests, w.actual_successes) == (2, 1, 2, 1)


def test_routes_without_traffic_in_the_window_are_left_out_and_old_seconds_are_dropped():
    clock = Clock(0.0)
    stats = RouteStats(clock=clock, retention_s=600)
    stats.record_effective(SVC, "old", True, 1)
    clock.t = 700.0
    stats.record_effective(SVC, "new", True, 1)
    assert [w.route for w in stats.window(3600)] == ["new"]  # a window never reaches past the retention
    rec = stats.route(SVC, "old")
    rec.effective(True, 1)
    assert len(rec._buckets) == 1  # the second from t=0 was dropped when a new one began


def test_the_latency_histogram_uses_linkerds_buckets_with_inclusive_upper_bounds():
    stats = RouteStats(clock=Clock())
    for ms in (0.3, 1, 1.5, 50, 50.1, 60000):
        stats.record_effective(SVC, "r", True, ms)
    w = one(stats.window(60))
    assert w.latency_buckets_ms == [float(b) for b in LATENCY_BUCKETS_MS]
    assert len(w.latency_counts) == len(LATENCY_BUCKETS_MS) + 1
    counts = dict(zip(LATENCY_BUCKETS_MS + ("inf",), w.latency_counts))
    assert counts[1] == 2 and counts[2] == 1 and counts[50] == 1 and counts[100] == 1 and counts["inf"] == 1


def test_covered_span_is_what_rates_divide_by():
    clock = Clock(500.0)
    stats = RouteStats(clock=clock)
    clock.t = 505.0
    assert stats.covered_s(60) == pytest.approx(5.0)  # up for 5 s only
    clock.t = 800.25
    assert stats.covered_s(60) == pytest.approx(59.25)  # 59 whole seconds and the current quarter
    clock.t = 800.0
    assert stats.covered_s(1) == 1.0  # never less than a second


def test_stats_reply_answers_for_its_own_workload_and_the_asked_services_and_survives_the_codec():
    clock = Clock()
    stats = RouteStats(clock=clock)
    stats.record_effective(SVC, "GET /books", True, 3)
    stats.record_effective("demo.books", "[DEFAULT]", True, 3)
    everything = stats_reply("demo", "web", stats, schemas.StatsRequest(window_s=60))
    assert {w.route for w in everything.routes} == {"GET /books", "[DEFAULT]"}
    assert stats_reply("demo", "web", stats, schemas.StatsRequest(workloads=["demo.traffic"])) is None
    only = stats_reply("demo", "web", stats, schemas.StatsRequest(workloads=["demo.web"], services=[SVC]))
    assert [w.service for w in only.routes] == [SVC]
    assert decode(schemas.StatsReply, encode(only)) == only


def test_prometheus_families_follow_the_window_with_dst_and_rt_route_labels():
    registry = Registry()
    stats = RouteStats(clock=Clock(), metrics=RouteMetrics(registry))
    rec = stats.route(SVC, "GET /books")
    assert stats.route(SVC, "GET /books") is rec  # label children resolved once
    rec.request()
    rec.actual(False)
    rec.actual(True)
    rec.effective(True, 7)
    text = registry.render()
    labels = {"dst": SVC, "rt_route": "GET /books"}
    assert sample(text, "route_request_total", **labels) == 1
    assert sample(text, "route_actual_response_total", classification="failure", **labels) == 1
    assert sample(text, "route_actual_response_total", classification="success", **labels) == 1
    assert sample(text, "route_response_total", classification="success", **labels) == 1
    assert sample(text, "route_response_latency_ms_bucket", le="10", **labels) == 1
    stats.forget(SVC)
    assert "GET /books" not in registry.render()


# --- reading windows ---------------------------------------------------------------------


BOUNDS = [float(b) for b in LATENCY_BUCKETS_MS]


def hist(**by_bound):
    counts = [0] * (len(BOUNDS) + 1)
    for bound, n in by_bound.items():
        counts[len(BOUNDS) if bound == "inf" else BOUNDS.index(float(bound[1:]))] = n
    return counts


def test_percentiles_interpolate_within_the_bucket_as_prometheus_does():
    assert histogram_quantile(0.5, BOUNDS, hist(b20=100)) == pytest.approx(15.0)  # (10, 20]: halfway
    counts = hist(b1=50, b2=50)
    assert histogram_quantile(0.5, BOUNDS, counts) == pytest.approx(1.0)
    assert histogram_quantile(0.95, BOUNDS, counts) == pytest.approx(1.9)
    assert histogram_quantile(0.5, BOUNDS, hist(b1=10)) == pytest.approx(0.5)  # first bucket starts at 0
    assert histogram_quantile(0.99, BOUNDS, hist(b1=1, inf=99)) == 50000.0  # +Inf: the highest finite bound
    assert histogram_quantile(0.5, BOUNDS, hist()) is None


def test_windows_from_several_proxies_add_up():
    a = schemas.RouteWindow(SVC, "r", 10, 9, 12, 9, BOUNDS, hist(b5=10))
    b = schemas.RouteWindow(SVC, "r", 5, 5, 5, 5, BOUNDS, hist(b10=5))
    m = merge_windows([a, b])
    assert (m.effective_requests, m.effective_successes, m.actual_requests, m.actual_successes) == (15, 14, 17, 14)
    assert m.latency_counts == hist(b5=10, b10=5)
    # a proxy with coarser buckets is re-bucketed by its upper bounds
    coarse = schemas.RouteWindow(SVC, "r", 2, 2, 2, 2, [10.0, 100.0], [1, 0, 1])
    m = merge_windows([a, coarse])
    assert m.latency_counts == hist(b5=10, b10=1, inf=1)
