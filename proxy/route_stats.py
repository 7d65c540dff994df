"""Per-route figures kept as rolling windows, so `tulle routes` can ask "the last minute".

Pure: no I/O; the clock is injected. One `RouteStats` per proxy, keyed by destination
service ("<namespace>.<service>") and route name (a profile's route, or "[DEFAULT]").
Both keys are bounded by what discovery and profiles name, never by request data.

Each route keeps one bucket per second of traffic, for up to `retention_s` (10
minutes); `window(60)` merges the buckets of the last 60 seconds. A bucket counts:

- *effective* outcomes: one per request as the caller saw it (after retries and
  timeouts), with a latency histogram over `tulle.metrics.LATENCY_BUCKETS_MS`;
- *actual* attempts: every attempt on the wire, retries included.

A request that timed out is an effective failure and, when no attempt ever got a
response, no actual attempt at all: so the effective rate can exceed the actual one
(as Linkerd documents for `linkerd viz routes`).

Alongside, `RouteMetrics` exports the same events as Prometheus families
(`route_request_total`, `route_response_total`, `route_actual_response_total`,
`route_response_latency_ms`, labels `dst` and `rt_route`); `RouteStats.route()` hands
out a `RouteRecorder` with the label children resolved once, for the hot path.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from typing import Callable, Optional

from tulle import schemas
from tulle.metrics import LATENCY_BUCKETS_MS, REGISTRY, Registry

DEFAULT_RETENTION_S = 600  # the longest window a reader may ask for
_BOUNDS = LATENCY_BUCKETS_MS
_N_LATENCY = len(_BOUNDS) + 1  # the last counter is +Inf
_BOUNDS_LIST = [float(x) for x in _BOUNDS]  # shared by every RouteWindow built here (never mutated)


class _Bucket:
    """One second of one route."""

    __slots__ = ("second", "eff_requests", "eff_successes", "act_requests", "act_successes", "latency")

    def __init__(self, second: int):
        self.second = second
        self.eff_requests = 0
        self.eff_successes = 0
        self.act_requests = 0
        self.act_successes = 0
        self.latency: Optional[list[int]] = None  # allocated on the first effective response


class RouteMetrics:
    """The Prometheus side of route figures (Linkerd's names; `dst` is "<namespace>.<service>")."""

    def __init__(self, registry: Registry = REGISTRY):
        self.requests = registry.counter(
            "route_request_total", "Requests that matched a route, counted when they start", ("dst", "rt_route"))
        self.responses = registry.counter(
            "route_response_total", "Responses as the caller saw them (after retries and timeouts)",
            ("dst", "rt_route", "classification"))
        self.actual_responses = registry.counter(
            "route_actual_response_total", "Every attempt on the wire, retries included",
            ("dst", "rt_route", "classification"))
        self.latency = registry.histogram(
            "route_response_latency_ms", "Latency of responses as the caller saw them, in milliseconds",
            ("dst", "rt_route"))


class RouteRecorder:
    """Records one (service, route)'s events: the rolling window and, when given, Prometheus.

    Obtain it once per route from `RouteStats.route()` and keep it (e.g. next to the
    compiled route); each call is then a few attribute updates.
    """

    __slots__ = ("service", "route", "_clock", "_retention", "_buckets", "_current",
                 "_m_requests", "_m_ok", "_m_fail", "_m_act_ok", "_m_act_fail", "_m_latency")

    def __init__(self, service: str, route: str, clock: Callable[[], float], retention_s: int,
                 metrics: Optional[RouteMetrics]):
        self.service = service
        self.route = route
        self._clock = clock
        self._retention = retention_s
        self._buckets: deque[_Bucket] = deque()
        self._current: Optional[_Bucket] = None
        if metrics is not None:
            self._m_requests = metrics.requests.labels(service, route)
            self._m_ok = metrics.responses.labels(service, route, "success")
            self._m_fail = metrics.responses.labels(service, route, "failure")
            self._m_act_ok = metrics.actual_responses.labels(service, route, "success")
            self._m_act_fail = metrics.actual_responses.labels(service, route, "failure")
            self._m_latency = metrics.latency.labels(service, route)
        else:
            self._m_requests = self._m_ok = self._m_fail = self._m_act_ok = self._m_act_fail = None
            self._m_latency = None

    def _bucket(self) -> _Bucket:
        second = int(self._clock())
        b = self._current
        if b is not None and b.second == second:
            return b
        b = self._current = _Bucket(second)
        buckets = self._buckets
        buckets.append(b)
        oldest = second - self._retention
        while buckets[0].second <= oldest:
            buckets.popleft()
        return b

    def request(self) -> None:
        """A request matched this route (Prometheus only: the window counts outcomes)."""
        if self._m_requests is not None:
            self._m_requests.value += 1

    def effective(self, success: bool, latency_ms: float) -> None:
        """The outcome the caller saw, once per request."""
        b = self._bucket()
        b.eff_requests += 1
        if success:
            b.eff_successes += 1
        lat = b.latency
        if lat is None:
            lat = b.latency = [0] * _N_LATENCY
        lat[bisect.bisect_left(_BOUNDS, latency_ms)] += 1
        if self._m_ok is not None:
            (self._m_ok if success else self._m_fail).value += 1
            self._m_latency.observe(latency_ms)

    def actual(self, success: bool) -> None:
        """One attempt on the wire (the first one or a retry) and how it was classified."""
        b = self._bucket()
        b.act_requests += 1
        if success:
            b.act_successes += 1
        if self._m_act_ok is not None:
            (self._m_act_ok if success else self._m_act_fail).value += 1

    def window(self, first_second: int) -> Optional[schemas.RouteWindow]:
        """The merged buckets from `first_second` on; None when nothing happened in them."""
        eff_req = eff_ok = act_req = act_ok = 0
        latency = [0] * _N_LATENCY
        for b in reversed(self._buckets):
            if b.second < first_second:
                break
            eff_req += b.eff_requests
            eff_ok += b.eff_successes
            act_req += b.act_requests
            act_ok += b.act_successes
            if b.latency is not None:
                for i, n in enumerate(b.latency):
                    latency[i] += n
        if not (eff_req or act_req):
            return None
        return schemas.RouteWindow(
            service=self.service, route=self.route, effective_requests=eff_req, effective_successes=eff_ok,
            actual_requests=act_req, actual_successes=act_ok,
            latency_buckets_ms=_BOUNDS_LIST, latency_counts=latency)


class RouteStats:
    """A proxy's rolling route windows, keyed by (service, route)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, retention_s: int = DEFAULT_RETENTION_S,
                 metrics: Optional[RouteMetrics] = None):
        self._clock = clock
        self.retention_s = retention_s
        self.metrics = metrics
        self.started = clock()
        self._routes: dict[str, dict[str, RouteRecorder]] = {}

    def route(self, service: str, route: str) -> RouteRecorder:
        by_route = self._routes.get(service)
        if by_route is None:
            by_route = self._routes[service] = {}
        rec = by_route.get(route)
        if rec is None:
            rec = by_route[route] = RouteRecorder(service, route, self._clock, self.retention_s, self.metrics)
        return rec

    def record_request(self, service: str, route: str) -> None:
        self.route(service, route).request()

    def record_effective(self, service: str, route: str, success: bool, latency_ms: float) -> None:
        self.route(service, route).effective(success, latency_ms)

    def record_actual(self, service: str, route: str, success: bool) -> None:
        self.route(service, route).actual(success)

    def covered_s(self, seconds: float) -> float:
        """How many seconds `window(seconds)` really spans: the buckets it merges, cut at start-up.

        The current second is partial, so a 60 s window spans 59 s and a fraction; a
        proxy up for 5 s spans 5 s. Rates are divided by this, never by less than 1 s.
        """
        now = self._clock()
        n = self._n_buckets(seconds)
        span = now - max(self.started, float(int(now) - n + 1))
        return max(span, 1.0)

    def _n_buckets(self, seconds: float) -> int:
        return max(1, min(int(math.ceil(seconds)), self.retention_s))

    def window(self, seconds: float, services: Optional[set[str]] = None) -> list[schemas.RouteWindow]:
        """Every route with traffic in the last `seconds` (at most the retention), merged.

        `services` limits the answer to routes towards those services.
        """
        first = int(self._clock()) - self._n_buckets(seconds) + 1
        out = []
        for service, by_route in self._routes.items():
            if services is not None and service not in services:
                continue
            for rec in by_route.values():
                w = rec.window(first)
                if w is not None:
                    out.append(w)
        return out

    def forget(self, service: str) -> None:
        """Drop a service's routes (e.g. once it is gone from discovery and its windows are empty)."""
        by_route = self._routes.pop(service, None)
        if by_route and self.metrics is not None:
            for route in by_route:
                self.metrics.requests.remove(service, route)
                self.metrics.latency.remove(service, route)
                for c in ("success", "failure"):
                    self.metrics.responses.remove(service, route, c)
                    self.metrics.actual_responses.remove(service, route, c)


def stats_reply(namespace: str, workload: str, stats: RouteStats,
                request: schemas.StatsRequest) -> Optional[schemas.StatsReply]:
    """What a proxy answers on PROXY_STATS_SUBJECT; None when the request is for other proxies.

    `window_s` in the reply is the span really covered (see `RouteStats.covered_s`),
    which is what a reader divides by for rates.
    """
    if request.workloads and f"{namespace}.{workload}" not in request.workloads:
        return None
    window = min(max(request.window_s, 1.0), float(stats.retention_s))
    services = set(request.services) if request.services else None
    return schemas.StatsReply(namespace=namespace, workload=workload, window_s=stats.covered_s(window),
                              routes=stats.window(window, services))
