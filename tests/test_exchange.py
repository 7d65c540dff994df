"""The request core (proxy/exchange.py) without sockets: the retry and timeout state machine,
resends of requests the server never saw, balancer feedback, response classification (HTTP
and gRPC) and backpressure — the decisions HTTP/1 and HTTP/2 share.

The other sides are recorders of what the core asks of them; the balancer, retry budget,
routes (compiled from a profile as the proxy receives it) and metrics are the real ones,
on a clock the test moves.
"""

from __future__ import annotations

import random

import pytest

from proxy.balancer import Balancer
from proxy.exchange import NO_BODY, SIZED, STREAMED, Exchange
from proxy.metrics import ProxyMetrics
from proxy.profiles import RetryBudget, RouteTable
from proxy.route_stats import RouteMetrics, RouteStats
from tulle import schemas
from tulle.metrics import Registry, sample


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Down:
    """The caller's side: records what it is sent."""

    feeding = False

    def __init__(self, writable: bool = True):
        self.calls: list[tuple] = []
        self.writable = writable
        self.paused = False

    def send_head(self, x, status, headers, length, end):
        self.calls.append(("head", status))

    def send_interim(self, x, status, headers):
        self.calls.append(("interim", status))

    def send_data(self, x, data):
        self.calls.append(("data", data))
        return self.writable

    def send_end(self, x, trailers):
        self.calls.append(("end", trailers))

    def send_error(self, x, status, reason):
        self.calls.append(("error", status, reason))

    def abort(self, x, code=2):
        self.calls.append(("abort",))

    def pause_body(self, x):
        self.paused = True

    def resume_body(self, x):
        self.paused = False

    def flush(self):
        pass

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]


class Up:
    """One attempt's side: records the request as it would go on the wire."""

    def __init__(self, endpoint: str, writable: bool = True):
        self.endpoint = endpoint
        self.writable = writable
        self.sent: list[bytes] = []
        self.ended = False
        self.abandoned = False
        self.released = False
        self.retry = 0
        self.paused = False

    def start(self, x):
        self.retry = x.retries
        self.sent = list(x.body_to_send())
        self.ended = x.body_done

    def send_data(self, data):
        self.sent.append(data)
        return self.writable

    def send_end(self, trailers):
        self.ended = True

    def abandon(self):
        self.abandoned = True

    def release(self):
        self.released = True

    def pause(self):
        self.paused = True

    def resume(self):
        self.paused = False

    def flush(self):
        pass


class Room:
    """Routes every (re)send to an endpoint of one balancer and gives it a fresh upstream,
    as the outbound room does (without discovery or pools)."""

    def __init__(self, endpoints=("a", "b"), seed: int = 1):
        self.clock = Clock()
        self.registry = Registry()
        self.metrics = ProxyMetrics(self.registry)
        self.default_labels = self.metrics.labels("outbound")
        self.balancer = Balancer(clock=self.clock, rng=random.Random(seed))
        self.balancer.update(list(endpoints))
        self.stats = RouteStats(clock=self.clock, metrics=RouteMetrics(self.registry))
        self.budget = RetryBudget(retry_ratio=0.0, min_retries_per_second=1, ttl_s=10.0, clock=self.clock)
        self.ups: list[Up] = []
        self.errors: list[str] = []
        self.connectable = True

    def send(self, x):
        st = x.pick(self.balancer)
        x.count_request(self.metrics.labels("outbound", "ns", "svc"))
        if not self.connectable:
            x.connect_failed(f"connection refused by {st.endpoint}", "connect_refused")
            return
        up = Up(st.endpoint)
        self.ups.append(up)
        x.attach(up)

    def http_error(self, error):
        self.errors.append(error)

    def exchange(self, method=b"GET", path=b"/books/1", framing=NO_BODY, length=-1, route=True, down=None,
                 content_type=None):
        x = Exchange(self, down or Down(), self.clock, method, path, b"books:8080", [], framing=framing,
                     length=length, content_type=content_type)
        if route:
            r = TABLE.match(method.decode(), path.decode())
            x.on_route(r, self.stats.route("ns.svc", r.name), self.budget)
        return x

    def window(self, name="GET /books/{id}"):
        (w,) = [w for w in self.stats.window(60) if w.route == name]
        return w


def _profile() -> schemas.Profile:
    return schemas.Profile(namespace="ns", service="svc", fqdn="svc.ns.svc.cluster.local", routes=[
        schemas.Route(name="GET /books/{id}", condition=schemas.RequestMatch(method="GET", path_regex="/books/[^/]*"),
                      is_retryable=True, timeout_ms=300),
        schemas.Route(name="POST /books", condition=schemas.RequestMatch(method="POST", path_regex="/books"),
                      is_retryable=True),
        schemas.Route(name="POST /orders", condition=schemas.RequestMatch(method="POST", path_regex="/orders")),
        schemas.Route(name="gRPC GetBook", condition=schemas.RequestMatch(method="POST",
                                                                          path_regex="/demo.Books/GetBook"),
                      is_retryable=True),
    ])


TABLE = RouteTable.from_profile(_profile())


# --- retries ------------------------------------------------------------------------------------


def test_a_failed_attempt_is_sent_again_to_another_endpoint_with_its_attempt_number():
    room = Room()
    x = room.exchange()
    room.send(x)
    first = room.ups[0]
    assert x.response_head(first, 503, []) is False  # dropped: the caller never sees it
    assert len(room.ups) == 2
    second = room.ups[1]
    assert second.endpoint != first.endpoint and second.retry == 1
    assert x.response_head(second, 200, []) is True
    x.response_end(second)
    assert x.down.kinds() == ["head", "end"]
    w = room.window()
    assert (w.actual_requests, w.actual_successes, w.effective_requests, w.effective_successes) == (2, 1, 1, 1)


def test_once_the_response_head_reached_the_caller_a_failure_ends_the_stream_and_is_not_retried():
    room = Room()
    x = room.exchange()
    room.send(x)
    up = room.ups[0]
    x.response_head(up, 200, [])
    x.response_data(up, b"part")
    x.attempt_lost(up, "reset", started=True)
    assert len(room.ups) == 1 and x.down.kinds() == ["head", "data", "abort"]


def test_a_non_retryable_route_answers_the_failure_as_it_came():
    room = Room()
    x = room.exchange(b"POST", b"/orders")
    room.send(x)
    assert x.response_head(room.ups[0], 500, []) is True
    assert len(room.ups) == 1


def test_retries_stop_when_the_budget_is_spent_and_the_failure_is_answered():
    room = Room(endpoints=("a",))
    room.budget = RetryBudget(retry_ratio=0.0, min_retries_per_second=0, ttl_s=10.0, clock=room.clock)
    x = room.exchange()
    room.send(x)
    assert x.response_head(room.ups[0], 503, []) is True
    assert len(room.ups) == 1 and x.down.kinds() == ["head"]


def test_a_body_kept_whole_is_replayed_on_the_retry():
    room = Room()
    x = room.exchange(b"POST", b"/books", framing=SIZED, length=10_000)
    x.body_data(b"a" * 4000)
    room.send(x)
    x.body_data(b"b" * 6000)
    x.body_end()
    x.response_head(room.ups[0], 502, [])
    assert b"".join(room.ups[1].sent) == b"a" * 4000 + b"b" * 6000 and room.ups[1].ended


def test_a_body_over_64_kib_arrives_whole_and_is_never_retried():
    room = Room()
    x = room.exchange(b"POST", b"/books", framing=STREAMED)
    room.send(x)
    for _ in range(10):
        x.body_data(b"c" * 10_000)
    x.body_end()
    assert b"".join(room.ups[0].sent) == b"c" * 100_000
    assert x.response_head(room.ups[0], 503, []) is True and len(room.ups) == 1


def test_a_body_still_streaming_when_the_response_arrives_is_not_retried():
    room = Room()
    x = room.exchange(b"POST", b"/books", framing=STREAMED)
    room.send(x)
    x.body_data(b"part of it")
    assert x.response_head(room.ups[0], 503, []) is True and len(room.ups) == 1


def test_a_connection_failure_is_retried_only_on_another_endpoint_and_within_the_budget():
    room = Room(endpoints=("a",))
    room.connectable = False
    x = room.exchange()
    room.send(x)
    assert x.down.calls == [("error", 502, "connection refused by a")] and room.errors == ["connect_refused"]
    room = Room(endpoints=("a", "b"))
    room.connectable = False
    tried = []
    send = room.send
    room.send = lambda x: (tried.append(x.avoid.endpoint if x.avoid else None), send(x))
    x = room.exchange()
    room.send(x)  # refused by one, then the other, ... until the budget (1/s over 10 s) is spent
    assert x.retries == 10 and x.down.calls[0][:2] == ("error", 502)
    picked = [st.endpoint for st in room.balancer.states]
    assert all(a != b for a, b in zip(tried[1:], tried[2:])) and set(tried[1:]) <= set(picked)


# --- resends: requests the server never saw ---------------------------------------------------------


def test_a_stale_keep_alive_connection_resends_an_idempotent_request_without_counting_an_attempt():
    room = Room()
    room.budget = RetryBudget(retry_ratio=0.0, min_retries_per_second=0, ttl_s=10.0, clock=room.clock)
    x = room.exchange()
    room.send(x)
    x.attempt_lost(room.ups[0], None, reused=True)
    assert len(room.ups) == 2 and room.ups[1].retry == 0  # a resend, not a retry: no budget needed
    x.response_head(room.ups[1], 200, [])
    x.response_end(room.ups[1])
    assert room.window().actual_requests == 1


def test_a_stale_connection_does_not_resend_a_post_but_a_refused_stream_does():
    room = Room()
    x = room.exchange(b"POST", b"/orders", framing=SIZED, length=2)
    x.body_data(b"hi")
    x.body_end()
    room.send(x)
    x.attempt_lost(room.ups[0], None, reused=True)
    assert len(room.ups) == 1 and x.down.calls[0][:2] == ("error", 502)
    room = Room()
    x = room.exchange(b"POST", b"/orders", framing=SIZED, length=2)
    x.body_data(b"hi")
    x.body_end()
    room.send(x)
    x.attempt_lost(room.ups[0], None, unprocessed=True)  # HTTP/2 REFUSED_STREAM: never processed
    assert len(room.ups) == 2 and room.ups[1].sent == [b"hi"]


def test_resends_give_up_after_two():
    room = Room()
    x = room.exchange(route=False)
    room.send(x)
    for i in range(3):
        x.attempt_lost(room.ups[i], None, reused=True)
    assert len(room.ups) == 3 and x.down.calls[0][:2] == ("error", 502)


# --- the route deadline -------------------------------------------------------------------------------


def test_the_route_deadline_cancels_the_attempt_in_flight_and_answers_504():
    room = Room()
    x = room.exchange()
    assert x.deadline == room.clock.t + 0.3
    room.send(x)
    room.clock.t += 0.3
    x.timed_out()
    assert room.ups[0].abandoned
    assert x.down.calls == [("error", 504, "route 'GET /books/{id}' timed out after 0.3s")]
    assert room.errors == ["route_timeout"]
    w = room.window()
    assert (w.effective_requests, w.effective_successes, w.actual_requests) == (1, 0, 0)
    assert room.balancer.states[0].pending + room.balancer.states[1].pending == 0


def test_a_deadline_after_the_response_head_changes_nothing():
    room = Room()
    x = room.exchange()
    room.send(x)
    x.response_head(room.ups[0], 200, [])
    x.timed_out()
    assert x.down.kinds() == ["head"] and not room.ups[0].abandoned


# --- balancer feedback -----------------------------------------------------------------------------


def test_each_attempt_gives_its_endpoint_one_latency_sample_and_a_failure_is_a_slow_one():
    room = Room(endpoints=("a",))
    a = room.balancer.states[0]
    x = room.exchange(route=False)
    room.send(x)
    assert a.pending == 1
    room.clock.t += 0.010
    x.response_head(room.ups[0], 200, [])
    assert a.pending == 0 and a.ewma < 0.030  # 10 ms pulls the 30 ms default down
    before = a.ewma
    x = room.exchange(route=False)
    room.send(x)
    room.clock.t += 0.001
    x.response_head(room.ups[1], 503, [])
    assert a.ewma >= 2 * before  # fast, but failed: counted as slow so traffic moves away


def test_a_caller_that_goes_away_frees_the_endpoint_without_teaching_it_anything():
    room = Room(endpoints=("a",))
    a = room.balancer.states[0]
    x = room.exchange()
    room.send(x)
    room.clock.t += 5
    x.gone()
    assert a.pending == 0 and a.ewma == 0.030 and room.ups[0].abandoned
    x.gone()  # twice is harmless
    assert a.pending == 0


# --- classification -------------------------------------------------------------------------------


def test_a_grpc_trailers_only_failure_is_classified_at_the_head_and_retried():
    room = Room()
    x = room.exchange(b"POST", b"/demo.Books/GetBook", framing=SIZED, length=5, content_type=b"application/grpc")
    x.body_data(b"\0\0\0\0\0")
    x.body_end()
    room.send(x)
    assert x.response_head(room.ups[0], 200, [(b"grpc-status", b"14")], end=True) is False
    x.response_head(room.ups[1], 200, [(b"content-type", b"application/grpc")])
    x.response_data(room.ups[1], b"\0\0\0\0\0")
    x.response_end(room.ups[1], [(b"grpc-status", b"0")])
    w = room.window("gRPC GetBook")
    assert (w.actual_requests, w.actual_successes, w.effective_successes) == (2, 1, 1)


def test_a_grpc_status_in_the_trailers_decides_the_outcome_at_the_end():
    room = Room()
    x = room.exchange(b"POST", b"/demo.Books/GetBook", content_type=b"application/grpc+proto")
    room.send(x)
    x.response_head(room.ups[0], 200, [(b"content-type", b"application/grpc")])
    assert room.stats.window(60) == []  # nothing decided yet
    x.response_end(room.ups[0], [(b"grpc-status", b"5"), (b"grpc-message", b"no book 9")])
    w = room.window("gRPC GetBook")
    assert (w.actual_requests, w.actual_successes, w.effective_requests, w.effective_successes) == (1, 0, 1, 0)
    assert sample(room.registry.render(), "response_total", status_code="200", classification="failure") == 1


@pytest.mark.parametrize("status,failure", [(200, "success"), (404, "success"), (500, "failure")])
def test_without_a_route_http_status_classifies(status, failure):
    room = Room()
    x = room.exchange(route=False)
    room.send(x)
    x.response_head(room.ups[0], status, [])
    x.response_end(room.ups[0])
    assert sample(room.registry.render(), "response_total", status_code=str(status), classification=failure) == 1


# --- bodies and backpressure ------------------------------------------------------------------------


def test_a_body_arriving_before_any_upstream_pauses_the_caller_beyond_64_kib_and_is_sent_whole():
    room = Room()
    x = room.exchange(b"POST", b"/orders", framing=STREAMED)
    x.body_data(b"d" * 40_000)
    assert not x.down.paused
    x.body_data(b"d" * 40_000)
    assert x.down.paused
    room.send(x)
    assert not x.down.paused and b"".join(room.ups[0].sent) == b"d" * 80_000


def test_a_slow_upstream_pauses_the_callers_body_until_it_drained():
    room = Room()
    x = room.exchange(b"POST", b"/orders", framing=STREAMED)
    room.send(x)
    room.ups[0].writable = False
    x.body_data(b"e" * 100)
    assert x.down.paused
    x.up_writable()
    assert not x.down.paused


def test_a_slow_caller_pauses_the_upstream_until_it_drained():
    room = Room()
    x = room.exchange(route=False, down=Down(writable=False))
    room.send(x)
    up = room.ups[0]
    x.response_head(up, 200, [])
    x.response_data(up, b"f" * 100)
    assert up.paused
    x.down_writable()
    assert not up.paused


def test_an_upstream_ready_after_the_caller_left_goes_back_unused():
    room = Room()
    x = room.exchange()
    x.gone()
    up = Up("a")
    assert x.attach(up) is False and up.released
