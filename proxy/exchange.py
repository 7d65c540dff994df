"""The request core: one HTTP request as its caller made it, over all its attempts. Sans-I/O.

Every HTTP version meets here. A wire adapter on the caller's side (the *downstream*: an
HTTP/1 connection's current request, an HTTP/2 stream) creates an `Exchange` from the
request head and feeds it the request body; the room (proxy/outbound.py, proxy/inbound.py)
decides where it goes and attaches an *upstream* (an HTTP/1 connection, an HTTP/2 stream)
for each attempt; the upstream feeds the response back. In between, this class decides:

- the retry and timeout state machine of a service-profile route: a failed attempt (by
  the route's response classes, or a connection that failed) of a retryable route is sent
  again — preferring another endpoint, with `tulle-retry-attempt: <n>` — when the request
  body was read whole and kept (`profiles.ReplayBuffer`, ≤ 64 KiB), nothing of the
  response reached the caller yet, and the service's retry budget allows
  (`profiles.may_retry`); the route timeout covers the whole request, retries included
  (504, or DEADLINE_EXCEEDED for gRPC), and cancels the attempt in flight;
- the resend of a request whose reused keep-alive connection turned out closed (the
  server never saw it), or that an HTTP/2 peer refused unprocessed (REFUSED_STREAM):
  not an attempt, not a retry, no budget spent;
- balancer feedback through the balancer's own API (`Balancer.start` / `finish` /
  `cancel`): a response head is a latency sample, a failure a slow one, a caller that
  went away nothing;
- response classification: HTTP status, or gRPC status from the head (trailers-only) or
  the trailers; route figures (`route_stats.RouteRecorder`: every attempt *actual*, the
  caller's answer *effective*) and the request / response metrics.

Nothing here touches a socket, a loop or a clock of its own: time comes from `clock`, a
deadline is a number the room turns into a timer (`timer` is whatever it gives back, with
a `cancel()`), and the other sides are objects with the methods named in `Downstream` and
`Upstream` below. So the whole state machine is tested in microseconds
(tests/test_exchange.py) and HTTP/1 and HTTP/2 cannot differ in a decision.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

from proxy.grpc_status import is_grpc
from proxy.limits import expired, response_head_timeout
from proxy.profiles import MAX_REPLAY_BODY, RETRY_ATTEMPT_HEADER, ReplayBuffer, grpc_status_of, may_retry

# How a request body is delimited, whatever the wire: none, a known length, or a stream
# whose end the sender marks (HTTP/1 chunked, HTTP/2 END_STREAM without content-length).
NO_BODY, SIZED, STREAMED = 0, 1, 2

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
MAX_RESENDS = 2  # stale connections a request may meet before the proxy gives up (502)
RETRY_HEADER = RETRY_ATTEMPT_HEADER.encode()
CONTENT_TYPE = b"content-type"

CANCEL = 8  # the HTTP/2 error code a caller's stream is reset with when the proxy cuts it

# Verdicts of `response_head`.
FORWARD, DROPPED = True, False


class Downstream(Protocol):
    """The caller's side of one exchange (implemented by proxy/http1/server.py `Request`
    and proxy/http2/server.py `InStream`). Headers are (name, value) bytes pairs without
    hop-by-hop fields; `length` is the body's content-length, or -1 when not known."""

    def send_head(self, x: "Exchange", status: int, headers: list, length: int, end: bool) -> None: ...

    def send_interim(self, x: "Exchange", status: int, headers: list) -> None: ...

    def send_data(self, x: "Exchange", data: bytes) -> bool:
        """False: the caller reads slowly; `x.down_writable()` follows once it drained."""

    def send_end(self, x: "Exchange", trailers: Optional[list]) -> None: ...

    def send_error(self, x: "Exchange", status: int, reason: str) -> None:
        """The proxy's own answer (tulle-proxy-error; gRPC-shaped for a gRPC call)."""

    def abort(self, x: "Exchange", code: int = 2) -> None:
        """The response failed after it started: end the caller's stream abnormally (HTTP/2:
        RST_STREAM with `code`, the upstream's own when it reset its stream)."""

    def pause_body(self, x: "Exchange") -> None: ...

    def resume_body(self, x: "Exchange") -> None: ...

    def flush(self) -> None: ...


class Upstream(Protocol):
    """One attempt's side (proxy/http1/client.py `Http1Client`, proxy/http2/client.py
    `OutStream`). `start` sends the head and `x.body_to_send()`; then `send_data` /
    `send_end` carry the rest of the body as it arrives."""

    def start(self, x: "Exchange") -> None: ...

    def send_data(self, data: bytes) -> bool:
        """False: the server reads slowly; `x.up_writable()` follows once it drained."""

    def send_end(self, trailers: Optional[list]) -> None: ...

    def abandon(self) -> None:
        """Cancel the attempt: the server must see the abort."""

    def release(self) -> None:
        """Hand back an upstream that was never started (its request ended meanwhile)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def flush(self) -> None: ...


class Room(Protocol):
    """What a direction provides: where a request goes, and its error counters."""

    default_labels: Any

    def send(self, x: "Exchange") -> None:
        """Route `x` (again, for a retry or a resend) and attach an upstream, or fail it."""

    def http_error(self, error: str) -> None: ...


class Exchange:
    __slots__ = (
        # the request, as the downstream adapter read it
        "room", "down", "method", "path", "authority", "headers", "extra", "host_header", "version", "framing",
        "length", "upgrade", "grpc", "orig_proto", "started",
        # routing (the room's)
        "conn", "target", "labels", "timer", "deadline",
        # the profile route
        "route", "recorder", "budget",
        # the body: kept for replay, and held until the first attempt starts
        "body", "held", "held_size", "body_done", "trailers", "body_paused",
        # attempts
        "up", "attempts", "retries", "resends", "avoid", "ep", "last_ep", "balancer", "ep_started", "h1_head",
        # the response
        "status", "responded", "classified", "resp_counter", "head_latency", "done", "resp_h2",
        "clock",
        # the upstream's clock (proxy/limits.py): ticks since its last progress
        "ticks", "up_paused",
    )

    def __init__(self, room: Room, down: Downstream, clock: Callable[[], float], method: bytes, path: bytes,
                 authority: Optional[bytes], headers: list, *, version: int = 1, framing: int = NO_BODY,
                 length: int = -1, host_header: bool = False, upgrade: Optional[bytes] = None,
                 content_type: Optional[bytes] = None, orig_proto: Optional[bytes] = None):
        self.room = room
        self.down = down
        self.clock = clock
        self.method = method
        self.path = path  # the request target to forward (origin-form; authority-form for CONNECT)
        self.authority = authority  # Host / :authority (None: HTTP/1.0 without Host)
        self.headers = headers
        self.extra: Optional[list] = None  # fields the room adds (e.g. tulle-client-id inbound)
        self.host_header = host_header  # `headers` carries a Host field equal to `authority`
        self.version = version  # of the downstream: 1 (HTTP/1.x) or 2
        self.framing = framing
        self.length = length
        self.upgrade = upgrade
        self.grpc = content_type is not None and is_grpc(content_type)
        self.orig_proto = orig_proto  # b"HTTP/1.1" / b"HTTP/1.0": the caller's protocol, when it differs
        self.started = clock()
        self.conn = None
        self.target = None
        self.labels = None
        self.timer = None
        self.deadline: Optional[float] = None
        self.route = None
        self.recorder = None
        self.budget = None
        if framing == NO_BODY:
            self.body: Optional[ReplayBuffer] = None
            self.held: Optional[list] = None
            self.body_done = True
        else:
            self.body = ReplayBuffer(length if framing == SIZED else None)
            self.held = []
            self.body_done = False
        self.held_size = 0
        self.trailers: Optional[list] = None
        self.body_paused = False
        self.up: Optional[Upstream] = None
        self.attempts = 0
        self.retries = 0
        self.resends = 0
        self.avoid = None
        self.ep = None  # the balancer's state of the endpoint the attempt in flight went to
        self.last_ep = None  # ... and of the last attempt's, in flight or not (a retry avoids it)
        self.balancer = None
        self.ep_started = 0.0
        self.h1_head: Optional[bytes] = None  # the HTTP/1 head as first sent (built by Http1Client)
        self.status = 0
        self.responded = False  # the response head went to the caller
        self.classified: Optional[bool] = None  # failure? once known (gRPC: from the trailers)
        self.resp_counter = None
        self.head_latency = 0.0
        self.done = False  # answered (or given up): nothing more goes to the caller
        self.resp_h2 = False  # the response fields came from HTTP/2 (lowercase, valid as they are)
        self.ticks = 0
        self.up_paused = False  # reading the upstream stopped until the caller drains

    # --- the room: route, endpoint, attempt ------------------------------------------------

    def on_route(self, route, recorder, budget) -> None:
        """The request matched `route` of its service's profile: its deadline and figures
        run from here (a discovery wait before it counts towards the timeout)."""
        self.route = route
        self.recorder = recorder
        self.budget = budget
        recorder.request()
        budget.deposit()  # every original request earns retries for the whole service
        if route.timeout_s is not None:
            self.deadline = self.started + route.timeout_s

    def pick(self, balancer):
        """An endpoint from `balancer` for the next attempt (another than the one that just
        failed, when there is one), counted in flight from now; None when it has none."""
        st = balancer.pick() if self.avoid is None else balancer.pick_other(self.avoid)
        if st is not None:
            self.balancer = balancer
            self.ep = self.last_ep = st
            self.ep_started = balancer.start(st)
        return st

    def attach(self, up: Upstream) -> bool:
        """An upstream is ready for this attempt: start it. False (and the upstream handed
        back) when the request ended meanwhile."""
        if self.done:
            up.release()
            self._forget_endpoint()
            return False
        self.up = up
        self.attempts += 1
        self.ticks = 0
        self.up_paused = False
        up.start(self)
        if self.body_paused and self.held is None:
            self.body_paused = False
            self.down.resume_body(self)
        return True

    def body_to_send(self) -> list:
        """What an attempt sends first: the body held until now (first attempt), or all of it
        again (a retry or a resend: only ever when it was kept)."""
        held = self.held
        if held is not None:
            self.held = None
            self.held_size = 0
            return held
        body = self.body
        return body.chunks if body is not None and body.replayable else []

    def extra_headers(self) -> list:
        """Fields the proxy adds to this attempt's request: the room's, and the retry number."""
        extra = self.extra or []
        if self.retries:
            extra = [*extra, (RETRY_HEADER, str(self.retries).encode())]
        return extra

    # --- the downstream: the request body and the caller ------------------------------------

    def body_data(self, data: bytes) -> None:
        if self.done:
            return  # answered already (an early response): the rest is read and dropped
        body = self.body
        up = self.up
        if up is not None:
            if body.replayable:
                body.add(data)
            if not up.send_data(data) and not self.body_paused:
                self.body_paused = True
                self.down.pause_body(self)
            return
        held = self.held
        if held is None:
            # Between attempts (a resend or retry on its way): the next one starts from what is
            # kept; a body outgrowing the cap meanwhile is held whole instead, never lost.
            if body.replayable and body.size + len(data) <= body.limit:
                body.add(data)
                return
            held = self.held = body.chunks if body.replayable else []
            self.held_size = body.size if body.replayable else 0
            body.replayable = False
            body.chunks = []
        elif body.replayable:
            body.add(data)
        held.append(data)
        self.held_size += len(data)
        if self.held_size > MAX_REPLAY_BODY:
            self.body_paused = True  # no upstream yet: stop reading until there is one
            self.down.pause_body(self)

    def body_end(self, trailers: Optional[list] = None) -> None:
        self.body_done = True
        body = self.body
        if body is not None:
            body.finish()
        if self.done:
            return
        up = self.up
        if up is not None:
            up.send_end(trailers)
        else:
            self.trailers = trailers

    def up_writable(self) -> None:
        """The upstream drained what it could not take: read the request body again."""
        self.ticks = 0  # the upstream takes the request again: progress
        if self.body_paused and self.held is None:
            self.body_paused = False
            self.down.resume_body(self)

    def down_writable(self) -> None:
        """The caller drained the response: read the upstream's response again."""
        up = self.up
        self.up_paused = False
        if up is not None:
            up.resume()

    def gone(self) -> None:
        """The caller went away (connection closed, stream reset): whatever the attempt held
        — the balancer's in-flight count, the route deadline, the upstream — is released."""
        if self.done and self.up is None and self.ep is None:
            return
        self.done = True
        up = self.up
        if up is not None:
            self.up = None
            up.abandon()
        self._forget_endpoint()
        self._stop_timer()

    # --- the upstream: the response -------------------------------------------------------

    def response_interim(self, up: Upstream, status: int, headers: list) -> None:
        if up is self.up and not self.done:
            self.down.send_interim(self, status, headers)

    def response_head(self, up: Upstream, status: int, headers: list, length: int = -1, end: bool = False) -> bool:
        """The attempt's response head. FORWARD: it goes to the caller; DROPPED: the request
        was sent again (or is over) and this response is to be read into nothing."""
        if up is not self.up or self.done:
            return DROPPED
        now = self.clock()
        route = self.route
        grpc_status = grpc_status_of(headers) if (self.grpc or route is not None) and headers else None
        # gRPC reports failure in its trailers: unless the head already carries grpc-status
        # (trailers-only), the outcome is decided when they arrive.
        deferred = self.grpc and grpc_status is None and not end and status == 200
        if route is not None:
            failed = route.is_failure(status, grpc_status)
        elif grpc_status is not None:
            failed = grpc_status != 0
        else:
            failed = status >= 500
        self._feedback(now, not failed)
        if route is not None and not deferred:
            self.recorder.actual(not failed)
            if failed and self._may_retry():
                self.up = None
                self._retry()
                return DROPPED
        self.responded = True
        self.status = status
        body = self.body
        if body is not None and body.replayable:
            body.replayable = False  # never sent again once a response started: let it go
            body.chunks = []
        latency_ms = (now - self.started) * 1000
        self.head_latency = latency_ms
        labels = self.labels
        if deferred:
            hist = labels.response(status)[1]
        else:
            self.classified = failed
            self.resp_counter, hist = labels.response(status, failed) if route is not None else labels.response(
                status, failed if grpc_status is not None else None)
            if route is not None:
                self._effective(not failed, latency_ms)
        hist.observe(latency_ms)
        self._stop_timer()
        self.down.send_head(self, status, headers, length, end)
        if end:
            self._ended(None)
        return FORWARD

    def upgraded(self, up: Upstream) -> bool:
        """101 Switching Protocols (HTTP/1): True when the caller asked for it, and then the
        exchange is over — both connections become one opaque tunnel."""
        if up is not self.up or self.done or self.upgrade is None:
            return False
        self.up = None
        self.done = True
        self._feedback(self.clock(), True)
        self._stop_timer()
        resp, hist = self.labels.response(101)
        hist.observe((self.clock() - self.started) * 1000)
        resp.value += 1
        return True

    def tunnelled(self) -> None:
        """CONNECT (HTTP/1): the tunnel is open, answered 200; the exchange is over."""
        self.done = True
        self._stop_timer()
        resp, hist = self.labels.response(200)
        hist.observe((self.clock() - self.started) * 1000)
        resp.value += 1

    def response_data(self, up: Upstream, data: bytes) -> None:
        if up is self.up and not self.done:
            self.ticks = 0
            if not self.down.send_data(self, data):
                self.up_paused = True
                up.pause()  # until the caller drained it (down_writable)

    def response_end(self, up: Upstream, trailers: Optional[list] = None) -> None:
        if up is not self.up:
            return
        self.up = None
        if self.done:
            return
        self._ended(trailers)

    def _ended(self, trailers: Optional[list]) -> None:
        self.up = None
        counter = self.resp_counter
        if counter is None:  # a gRPC response classified by its trailers
            grpc_status = grpc_status_of(trailers) if trailers else None
            failed = grpc_status != 0 if grpc_status is not None else self.status >= 500
            route = self.route
            if route is not None:
                failed = route.is_failure(self.status, grpc_status)
                self.recorder.actual(not failed)
                self._effective(not failed, self.head_latency)
            self.classified = failed
            counter = self.labels.response(self.status, failed)[0]
        counter.value += 1
        self.done = True
        self.down.send_end(self, trailers)

    def attempt_lost(self, up: Upstream, reason: Optional[str], *, started: bool = False, reused: bool = False,
                     unprocessed: bool = False, interim: bool = False, error: str = "upstream_closed",
                     code: int = 2) -> None:
        """The attempt ended without a (whole) response. `started`: response bytes arrived;
        `reused`: on a keep-alive connection used before; `unprocessed`: the server says it
        never processed the request (HTTP/2 REFUSED_STREAM); `interim`: a 1xx reached the
        caller already."""
        if up is not self.up:
            return
        self.up = None
        if self.done:
            return
        if self.responded:
            # Part of the response went out already: all that can be done is end it abnormally.
            self.done = True
            self.down.abort(self, code)
            return
        if ((reused and not started) or unprocessed) and self._may_resend(unprocessed):
            # A keep-alive connection the server had closed, or a request it refused unread:
            # the server never saw it; send it again on another connection.
            self._forget_endpoint()
            self.resends += 1
            self.room.send(self)
            return
        self._feedback(self.clock(), False)
        if self.route is not None:
            self.recorder.actual(False)
            if self._may_retry(interim):
                self._retry()
                return
        self.fail(502, reason or "upstream closed the connection before responding", error)

    def connect_failed(self, reason: str, error: str) -> None:
        """No connection for this attempt. On a retryable route it is sent again, but only to
        another endpoint: dialling the same one at once again would just spend the budget."""
        if self.done:
            self._forget_endpoint()
            return
        self._feedback(self.clock(), False)
        if self.route is not None:
            self.recorder.actual(False)
            balancer = self.balancer
            if balancer is not None and len(balancer) > 1 and self._may_retry():
                self._retry()
                return
        self.fail(502, reason, error)

    # --- the upstream's clock ---------------------------------------------------------------

    def tick(self, interval: float, limits) -> None:
        """One sweep of the downstream's sweeper while an attempt is in flight (proxy/limits.py).

        Before the response head: time since the request was sent whole (or since the
        upstream last took request bytes, when it stopped taking them), not reset by head
        bytes — a head trickled a byte at a time still times out: 504. A profile route with a
        timeout of its own is bounded by that instead. After the head: time since the last
        response bytes, while the caller takes what it gets; past it the response is cut
        (both sides end: the caller cannot be told otherwise once the head went out).
        """
        up = self.up
        if up is None or self.done:
            return
        if not self.responded:
            if not self.body_done and not self.body_paused:
                self.ticks = 0  # the caller is still sending: the downstream's own clock runs
                return
            timeout = response_head_timeout(self.deadline is not None, limits)
            self.ticks += 1
            if expired(self.ticks, interval, timeout):
                self.fail(504, f"no response from the upstream in {timeout:g}s", "response_head_timeout")
            return
        if self.up_paused or not self.body_done:
            self.ticks = 0  # the caller (or the rest of its request) holds the exchange up
            return
        self.ticks += 1
        if expired(self.ticks, interval, limits.response_idle_timeout_s):
            self.room.http_error("response_idle_timeout")
            self.up = None
            self.done = True
            up.abandon()  # dropped, never reused
            self.down.abort(self, CANCEL)

    # --- endings of the proxy's own --------------------------------------------------------

    def timed_out(self) -> None:
        """The route's deadline passed before a response head reached the caller."""
        self.timer = None
        if self.done or self.responded:
            return
        up = self.up
        if up is not None:
            self.up = None
            up.abandon()  # the attempt in flight is cancelled: its server sees it go
        route = self.route
        self.fail(504, f"route {route.name!r} timed out after {route.timeout_s:g}s", "route_timeout")

    def fail(self, status: int, reason: str, error: str) -> None:
        """Answer with the proxy's own response (no upstream answered): counted as the
        direction's error, as the route's effective failure, and in the response metrics."""
        if self.ep is not None:  # an attempt was under way: it failed
            self._feedback(self.clock(), False)
        if self.done:
            return
        self.done = True
        up = self.up
        if up is not None:
            self.up = None
            up.abandon()
        self._stop_timer()
        room = self.room
        room.http_error(error)
        labels = self.labels
        if labels is None:  # refused before routing: count it under the direction's labels
            labels = self.labels = room.default_labels
            labels.requests.value += 1
        now = self.clock()
        latency_ms = (now - self.started) * 1000
        failed = status >= 500 or self.grpc
        resp, hist = labels.response(status)
        hist.observe(latency_ms)
        resp.value += 1
        self.status = status
        self.classified = failed
        if self.route is not None:
            self._effective(False, latency_ms)
        self.down.send_error(self, status, reason)

    def count_request(self, labels) -> None:
        """The request is counted once, where it first went; its response under the labels
        of the endpoint of its last attempt."""
        if self.labels is None:
            labels.requests.value += 1
        self.labels = labels

    # --- decisions --------------------------------------------------------------------------

    def _may_retry(self, interim: bool = False) -> bool:
        # An upgrade is never sent twice; a 1xx passed on is a response already started.
        if self.upgrade is not None:
            return False
        return may_retry(self.route, True, self.body, interim, self.budget)

    def _may_resend(self, unprocessed: bool) -> bool:
        # A server that closed an idle connection may have done so as the request arrived:
        # only an idempotent request is safe to send again then. One it refused unprocessed
        # is safe whatever its method.
        body = self.body
        return (self.resends < MAX_RESENDS and (body is None or body.replayable)
                and (unprocessed or self.method in IDEMPOTENT))

    def _retry(self) -> None:
        """Send the request again, preferring another endpoint, with its attempt number."""
        self.retries += 1
        self.avoid = self.last_ep
        self._forget_endpoint()
        self.room.send(self)

    # --- bookkeeping ------------------------------------------------------------------------

    def _feedback(self, now: float, ok: bool) -> None:
        """The attempt on `ep` answered (or failed): a latency sample for its balancer."""
        st = self.ep
        if st is not None:
            self.ep = None
            self.balancer.finish(st, self.ep_started, ok)

    def _forget_endpoint(self) -> None:
        """The attempt ends without telling anything of its endpoint's latency."""
        st = self.ep
        if st is not None:
            self.ep = None
            self.balancer.cancel(st)

    def _effective(self, success: bool, latency_ms: float) -> None:
        recorder = self.recorder
        if recorder is not None:
            self.recorder = None  # once per request
            recorder.effective(success, latency_ms)

    def _stop_timer(self) -> None:
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
