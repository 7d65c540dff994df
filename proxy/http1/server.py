"""The downstream side of HTTP/1.1: one flat protocol class per accepted connection.

httptools calls back into `Http1Server` as it parses; each request head becomes a
`Request` that the room (inbound or outbound) routes with `room.dispatch(server, req)`,
which ends in `forward(req, client)` (an upstream connection is ready) or
`fail(req, status, reason, error)`. The upstream `Http1Client` calls back with the
response head, body and end. Bytes are gathered per read event and written once, so a
small request or response costs one syscall. Nothing here awaits: the keep-alive path
has no task or coroutine per request.

Requests are answered in order: later pipelined requests wait in a queue (reading pauses
when it grows); a client that sends more than `limits.max_pipeline` of them ahead in one go
gets those answered, the last with `connection: close`, and the rest dropped unread (it
must send them again, as RFC 9112 §9.3.2 has clients do). The bounds and their verdicts
are proxy/limits.py's; `tick` runs the clocks. A request body is kept (up to REPLAY_LIMIT) until the response starts, so
a failed attempt can be sent again — the place where retries plug in.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Protocol

import httptools

from proxy.http1.headers import (
    CHUNKED, LAST_CHUNK, LENGTH, NO_BODY, UNTIL_CLOSE, HeadError, error_response, request_head, response_has_body,
    response_head, serialize, status_line,
)
from proxy import limits as bounds
from proxy.limits import Limits
from proxy.metrics import Labels
from proxy.tcp import splice
from tulle.log import get_logger

if TYPE_CHECKING:
    from proxy.http1.client import Http1Client

REPLAY_LIMIT = 64 * 1024  # request bodies up to this size may be sent again (Linkerd's cap)
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Why reading from the client is paused (any bit set: paused).
PAUSE_PIPELINE, PAUSE_UPSTREAM, PAUSE_BODY, PAUSE_TUNNEL, PAUSE_DEAD = 1, 2, 4, 8, 16

log = get_logger(part="http1")


class Room(Protocol):
    """What a direction (inbound / outbound) provides to the HTTP/1 server."""

    direction: str
    default_labels: Labels
    conns: set

    def dispatch(self, server: "Http1Server", req: "Request") -> None: ...

    def http_error(self, error: str) -> None: ...

    def answered(self, req: "Request", status: int, now: float, ok: bool = True) -> None: ...

    def abandoned(self, req: "Request") -> None: ...

    def track(self, s) -> None: ...


class Request:
    """One request on its way through the proxy (one logical request, maybe several attempts)."""

    __slots__ = (
        "method", "target", "version", "headers", "host", "framing", "length", "upgrade", "keep_alive",
        "head", "body", "body_size", "replayable", "complete", "done", "start", "labels", "attempts",
        "resp_status", "resp_chunked", "resp_counter", "close_after", "tail", "route", "ep", "target_info",
    )

    def __init__(self, method: bytes, target: bytes, version: str, headers: list, host: bytes | None,
                 framing: int, length: int, upgrade: bytes | None, keep_alive: bool, start: float):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.host = host
        self.framing = framing
        self.length = length
        self.upgrade = upgrade
        self.keep_alive = keep_alive
        self.start = start
        self.head = b""  # the head sent upstream, built by the room
        self.body: list[bytes] | None = []  # encoded body bytes not yet released (see module doc)
        self.body_size = 0
        self.replayable = True
        self.complete = False  # the whole request was read from the client
        self.done = False  # the response was finished (or failed)
        self.labels: Labels | None = None
        self.attempts = 0
        self.resp_status = 0
        self.resp_chunked = False
        self.resp_counter = None
        self.close_after = False
        self.tail: list[bytes] | None = None  # bytes after an upgrade / CONNECT head
        self.route = None  # the profile route chosen for (method, path); none yet
        self.ep = None  # the balancer's endpoint state while an attempt is in flight
        self.target_info = None  # the room's routing decision (for metrics and retries)


class Http1Server(asyncio.Protocol):
    def __init__(self, room: Room, limits: Limits, strip: frozenset[bytes], conn: object):
        self.room = room
        self.limits = limits
        self.strip = strip  # request headers removed on this side (e.g. tulle-client-id inbound)
        self.conn = conn  # the room's per-connection facts (peer, TLS identity, target port ...)
        self.loop = asyncio.get_event_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.cur: Request | None = None  # being read
        self.active: Request | None = None  # being answered
        self.last: Request | None = None  # last whose head was read (for upgrades)
        self.queue: deque[Request] | None = None
        self.upstream: Http1Client | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.nheaders = 0
        self.head_size = 0
        self.head_raw = 0
        self.in_head = False
        self.head_ticks = 0
        self.idle_ticks = 0
        self.feeding = False
        self.paused = 0
        self.closed = False
        self.draining = False
        self.refused = False

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.room.conns.add(self)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.room.conns.discard(self)
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.abandon()  # the exchange is incomplete: the upstream must see the abort
        req = self.active
        if req is not None:
            req.done = True
            # The caller went away: whatever its attempt holds (the balancer's in-flight
            # count, a route deadline) is released here, or never.
            self.room.abandoned(req)

    def data_received(self, data: bytes) -> None:
        self.idle_ticks = 0
        if self.refused:
            return
        last = self.last
        if last is not None and last.tail is not None:  # waiting for 101 / the tunnel
            last.tail.append(data)
            if sum(map(len, last.tail)) > REPLAY_LIMIT:
                self._pause(PAUSE_TUNNEL)
            return
        upgrade_at = -1
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            upgrade_at = e.args[0]
        except httptools.HttpParserCallbackError as e:
            err = e.__context__
            if isinstance(err, _PipelineFull):
                self._pipeline_full()
            elif isinstance(err, HeadError):
                self.refuse(err.status, err.reason, _ERROR_LABEL.get(err.status, "bad_request"))
            else:
                log.error("http1 request handling failed", error=repr(err))
                self.refuse(500, "proxy error", "internal")
        except httptools.HttpParserError as e:
            self.refuse(400, f"malformed request: {e}", "parse")
        finally:
            self.feeding = False
        if upgrade_at >= 0:
            # Not inside the except clause: raising there would make the upgrade the cause
            # of any callback error of the parser fed next (found by fuzz/).
            self._parser_upgraded(data, upgrade_at)
        if self.in_head:
            # Bytes of a head not yet complete, counted across reads: a client may not
            # grow one header (or the request line) without bound.
            self.head_raw += len(data)
            if self.head_raw > self.limits.max_head_bytes and not self.refused:
                self.refuse(431, "request headers too large", "header_too_large")
        up = self.upstream
        if up is not None and up.out:
            up.flush()
        if self.out:
            self.flush()

    def pause_writing(self) -> None:
        # The client reads slower than the upstream sends: stop reading the upstream.
        up = self.upstream
        if up is not None:
            up.pause_reading()

    def resume_writing(self) -> None:
        up = self.upstream
        if up is not None:
            up.resume_reading()

    # --- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        q = self.queue
        if q and bounds.pipeline_full(len(q), self.limits):
            raise _PipelineFull()  # stops the parser here: the rest of the read is never parsed
        self.in_head = True
        self.head_ticks = 0
        self.url = b""
        self.headers = []
        self.nheaders = 0
        self.head_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > self.limits.max_head_bytes:
            raise HeadError(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.nheaders += 1
        self.head_size += len(name) + len(value) + 4
        if self.nheaders > self.limits.max_headers:
            raise HeadError(431, "too many request headers")
        if self.head_size > self.limits.max_head_bytes:
            raise HeadError(431, "request headers too large")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_raw = 0
        p = self.parser
        version = p.get_http_version()
        if version != "1.1" and version != "1.0":
            raise HeadError(400, f"unsupported HTTP version {version}")
        fwd, host, framing, length, upgrade, close = request_head(self.headers, version, self.strip)
        method = p.get_method()
        if host is None and version == "1.1" and method != b"CONNECT" and not self.url.startswith(b"http://"):
            raise HeadError(400, "missing host header")
        if upgrade is not None and upgrade.strip().lower() == b"h2c":
            upgrade = None  # HTTP/2 upgrades are not proxied (as linkerd2-proxy: stripped)
        req = Request(method, self.url, version, fwd, host, framing, length, upgrade,
                      p.should_keep_alive() and not close, self.loop.time())
        self.cur = req
        self.last = req
        if self.active is None:
            self.active = req
            self.room.dispatch(self, req)
        else:
            q = self.queue
            if q is None:
                q = self.queue = deque()
            q.append(req)
            if bounds.pipeline_full(len(q), self.limits):
                self._pause(PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        req = self.cur
        if req.framing == CHUNKED:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        self._body(req, body)

    def on_message_complete(self) -> None:
        req = self.cur
        self.cur = None
        req.complete = True
        if req.framing == CHUNKED:
            self._body(req, LAST_CHUNK)

    def _body(self, req: Request, data: bytes) -> None:
        if req.done:
            return  # answered already (an early response): the rest is read and dropped
        req.body_size += len(data)
        up = self.upstream if req is self.active else None
        if up is not None:
            up.out.append(data)
            if req.replayable:
                if req.body_size <= REPLAY_LIMIT:
                    req.body.append(data)
                else:
                    req.replayable = False
                    req.body = None
        else:
            req.body.append(data)
            if req.body_size > REPLAY_LIMIT:
                req.replayable = False
                self._pause(PAUSE_BODY)  # no upstream yet: stop reading until there is one

    # --- driven by the room and the upstream --------------------------------------------

    def forward(self, req: Request, client: "Http1Client") -> None:
        """An upstream connection is ready for `req`: send it."""
        if req is not self.active or self.closed or req.done:
            client.release()
            self.room.abandoned(req)
            return
        self.upstream = client
        req.attempts += 1
        client.begin(self, req, self.feeding)
        if not req.replayable:
            req.body = None
        if self.paused & PAUSE_BODY:
            self._resume(PAUSE_BODY)

    def fail(self, req: Request, status: int, reason: str, error: str) -> None:
        """Answer `req` with a response of the proxy's own (no upstream answered it)."""
        if req.ep is not None:  # an attempt was under way: it failed
            self.room.answered(req, status, self.loop.time(), ok=False)
        if req is not self.active or self.closed or req.done:
            return
        self.room.http_error(error)
        labels = req.labels
        if labels is None:  # refused before routing: count it under the direction's labels
            labels = req.labels = self.room.default_labels
            labels.requests.value += 1
        resp, hist = labels.response(status)
        hist.observe((self.loop.time() - req.start) * 1000)
        resp.value += 1
        req.resp_status = status
        # After CONNECT or an upgrade request the parser has stopped: the connection ends.
        # A request without a body is whole once its head is read (it is dispatched then).
        keep = (req.keep_alive and not self.draining and (req.complete or req.framing == NO_BODY)
                and req.upgrade is None and req.method != b"CONNECT" and not req.close_after)
        self.out.append(error_response(status, reason, close=not keep))
        if not keep:
            req.close_after = True
        self._finish(req)
        if not self.feeding and self.out:
            self.flush()

    def refuse(self, status: int, reason: str, error: str) -> None:
        """A request the proxy cannot read further: answer (after earlier ones) and close."""
        self.refused = True
        self._pause(PAUSE_DEAD)
        self.room.http_error(error)
        resp, _ = self.room.default_labels.response(status)
        resp.value += 1
        data = error_response(status, reason, close=True)
        req = self.cur  # set while a body is being read: the malformed bytes are its body
        if req is not None and req is self.active:
            # The request in flight is itself broken: the upstream must not wait for the rest.
            up = self.upstream
            if up is not None:
                self.upstream = None
                up.abandon()
            req.done = True
            self.room.abandoned(req)
            self.active = None
            if req.resp_status == 0:
                self.out.append(data)
            self.flush()
            self.closed = True
            self.transport.close()
            return
        if self.active is None:
            self.out.append(data)
            self.flush()
            self.closed = True
            self.transport.close()
            return
        # An earlier request is still being answered: queue the refusal behind it.
        q = self.queue
        if q is None:
            q = self.queue = deque()
        q.append(_Refusal(data))

    def on_upstream_interim(self, status: int, headers: list) -> None:
        req = self.active
        if req is not None and req.version == "1.1":
            fwd = response_head(headers)[0]
            self.out.append(serialize(status_line(status), fwd))

    def on_upstream_head(self, client: "Http1Client", status: int, headers: list, up_keep_alive: bool) -> bool:
        """The response head arrived; returns True when the upstream body runs until close."""
        req = self.active
        fwd, framing, _length, _upgrade, _close = response_head(headers)
        has_body = response_has_body(status, req.method)
        keep = req.keep_alive and not self.draining and not req.close_after and req.upgrade is None
        extra = b""
        until_close = has_body and framing == UNTIL_CLOSE
        if has_body and framing != LENGTH:
            if req.version == "1.1":
                extra = b"transfer-encoding: chunked\r\n"
                req.resp_chunked = True
            else:
                keep = False  # HTTP/1.0 client: delimit the body by closing
        if keep:
            if req.version == "1.0":
                extra += b"connection: keep-alive\r\n"
        else:
            extra += b"connection: close\r\n"
            req.close_after = True
        first = status_line(status) if req.version == "1.1" else b"HTTP/1.0" + status_line(status)[8:]
        self.out.append(serialize(first, fwd, extra))
        req.resp_status = status
        now = self.loop.time()
        route = req.route
        # Where the response is classified: by the profile route's response classes when
        # one was chosen, else 5xx = failure.
        resp, hist = req.labels.response(status) if route is None else req.labels.response(
            status, route.is_failure(status))
        hist.observe((now - req.start) * 1000)
        req.resp_counter = resp
        if req.ep is not None:
            self.room.answered(req, status, now)
        if req.body is not None:
            req.body = None  # no retry once the response started
        return until_close

    def on_upstream_body(self, data: bytes) -> None:
        req = self.active
        if req.resp_chunked:
            self.out.append(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.out.append(data)

    def on_upstream_end(self, client: "Http1Client") -> None:
        req = self.active
        self.upstream = None
        if req is None:
            return
        if req.resp_chunked:
            self.out.append(LAST_CHUNK)
        req.resp_counter.value += 1
        self._finish(req)

    def on_upstream_lost(self, client: "Http1Client", started: bool, reason: str | None = None,
                         error: str = "upstream_closed") -> None:
        """The upstream connection failed mid-exchange (or sent what the proxy refuses: `error`)."""
        self.upstream = None
        req = self.active
        if req is None or self.closed:
            return
        if req.ep is not None:
            self.room.answered(req, 502, self.loop.time(), ok=False)
        if req.resp_status == 0:
            # Nothing reached the client yet. A connection that was reused may simply have
            # been closed by the server while idle: send the request again on another one
            # (only when the server said nothing at all: it may not have seen the request).
            if (not started and client.reused and req.replayable and req.attempts < 3 and req.method in IDEMPOTENT
                    and req.body is not None):
                self.room.dispatch(self, req)
                return
            self.fail(req, 502, reason or "upstream closed the connection before responding", error)
            return
        # Part of the response went out already: all we can do is end the connection.
        req.done = True
        self.active = None
        self.flush()
        self.transport.close()

    def on_upstream_upgrade(self, client: "Http1Client", headers: list, tail: bytes) -> None:
        """101 Switching Protocols: hand both connections over to opaque forwarding."""
        req = self.active
        self.upstream = None
        if req is None or req.upgrade is None or self.closed:
            client.closed = True
            client.transport.close()
            if req is not None:
                self.fail(req, 502, "upstream switched protocols unasked", "bad_upgrade")
            return
        fwd = response_head(headers)[0]
        self.out.append(serialize(status_line(101), fwd, b"connection: upgrade\r\nupgrade: " + req.upgrade + b"\r\n"))
        resp, hist = req.labels.response(101)
        hist.observe((self.loop.time() - req.start) * 1000)
        resp.value += 1
        if req.ep is not None:
            self.room.answered(req, 101, self.loop.time())
        self.become_tunnel(req, client.transport, tail)

    def tunnel_ready(self, req: Request, upstream: asyncio.Transport, pending: bytes) -> None:
        """A CONNECT tunnel is open: say so and forward bytes opaquely."""
        if req is not self.active or self.closed:
            upstream.close()
            return
        self.out.append(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        resp, hist = req.labels.response(200)
        hist.observe((self.loop.time() - req.start) * 1000)
        resp.value += 1
        self.become_tunnel(req, upstream, pending)

    def become_tunnel(self, req: Request, upstream: asyncio.Transport, pending: bytes) -> None:
        self.flush()
        req.done = True
        self.active = None
        self.room.conns.discard(self)
        self.closed = True  # this object no longer handles the connection
        tail = b"".join(req.tail or ())
        req.tail = None
        self.room.track(splice(self.transport, upstream, req.labels, client_pending=tail, server_pending=pending))

    # --- flow control hooks used by the upstream ------------------------------------------

    def pause_for_upstream(self) -> None:
        self._pause(PAUSE_UPSTREAM)

    def resume_for_upstream(self) -> None:
        self._resume(PAUSE_UPSTREAM)

    # --- timers (driven by the room's sweeper) -------------------------------------------

    def tick(self, interval: float) -> None:
        """Called every `interval` seconds: the clocks of proxy/limits.py — request head
        (408), request body gone idle (408, or close once answered), response head (504),
        response body gone idle (close), keep-alive idle (close)."""
        if self.closed:
            return
        req, up = self.active, self.upstream
        if up is not None and req is not None and up.req is req:
            self._tick_upstream(req, up, interval)
            if self.closed:
                return
        if self.refused:
            return
        if self.in_head:
            self.head_ticks += 1
            if self.head_ticks * interval >= self.limits.header_timeout_s:
                self.refuse(408, "request headers not received in time", "header_timeout")
            return
        if self.cur is not None:  # a request body is being read
            if self.paused:
                self.idle_ticks = 0  # the proxy stopped reading: not the client's delay
            else:
                self.idle_ticks += 1
                if bounds.expired(self.idle_ticks, interval, self.limits.body_idle_timeout_s):
                    self.refuse(408, "request body not received in time", "body_timeout")
            return
        if self.active is None:
            self.idle_ticks += 1
            if self.draining or self.idle_ticks * interval >= self.limits.idle_timeout_s:
                self.closed = True
                self.transport.close()

    def _tick_upstream(self, req: Request, up: "Http1Client", interval: float) -> None:
        """The upstream's clocks. Before the response head: time since the request was sent
        whole (or since the upstream last took request bytes, when it stopped taking them),
        not reset by head bytes — a head trickled a byte at a time still times out. After it:
        time since the last response bytes, while the caller reads what it gets."""
        limits = self.limits
        if req.resp_status == 0:
            if not req.complete and not self.paused & PAUSE_UPSTREAM:
                up.ticks = 0  # the client is still sending: its own clock runs
                return
            route = req.route
            timeout = bounds.response_head_timeout(route is not None and route.has_timeout, limits)
            up.ticks += 1
            if bounds.expired(up.ticks, interval, timeout):
                self.upstream = None
                up.abandon()  # dropped, never reused
                self.fail(req, 504, f"no response from the upstream in {timeout:g}s", "response_head_timeout")
            return
        if up.read_paused or not req.complete:
            up.ticks = 0  # the caller (or the rest of its request) holds the exchange up
            return
        up.ticks += 1
        if bounds.expired(up.ticks, interval, limits.response_idle_timeout_s):
            # Part of the response went out already: all that can be done is end both.
            self.room.http_error("response_idle_timeout")
            self.upstream = None
            up.abandon()
            req.done = True
            self.active = None
            self.flush()
            self.closed = True
            self.transport.close()

    def drain(self) -> None:
        """Graceful shutdown: finish what is in flight, then close; idle connections close now."""
        self.draining = True
        if self.active is None and self.cur is None and not self.in_head and not self.closed:
            self.closed = True
            self.transport.close()

    # --- internals -----------------------------------------------------------------------

    def flush(self) -> None:
        out = self.out
        if out:
            if not self.transport.is_closing():
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _finish(self, req: Request) -> None:
        req.done = True
        req.body = None
        self.active = None
        if self.paused & (PAUSE_BODY | PAUSE_UPSTREAM):
            self._resume(PAUSE_BODY | PAUSE_UPSTREAM)
        if req.close_after or (self.draining and self.cur is None):
            self.flush()
            self.closed = True
            self.transport.close()
            return
        q = self.queue
        while q:
            nxt = q.popleft()
            if len(q) < self.limits.max_pipeline // 2 and self.paused & PAUSE_PIPELINE:
                self._resume(PAUSE_PIPELINE)
            if isinstance(nxt, _Refusal):
                self.out.append(nxt.data)
                self.flush()
                self.closed = True
                self.transport.close()
                return
            self.active = nxt
            self.room.dispatch(self, nxt)
            return

    def _pipeline_full(self) -> None:
        """More requests came ahead than the pipeline holds: those read are answered, the
        last with `connection: close`; the rest were never parsed and are not read."""
        self.refused = True
        self._pause(PAUSE_DEAD)
        self.room.http_error("pipeline_limit")
        self.queue[-1].close_after = True

    def _parser_upgraded(self, data: bytes, offset: int) -> None:
        req = self.last
        tail = data[offset:]
        if req is not None and (req.upgrade is not None or req.method == b"CONNECT") and not req.done:
            req.tail = [tail] if tail else []
            return
        # llhttp switched to an upgrade we do not honour (h2c): carry on with HTTP/1.
        self.parser = httptools.HttpRequestParser(self)
        if tail:
            self.data_received(tail)

    def _pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()


class _PipelineFull(Exception):
    """Raised from the parser's callback to stop it before the request past the cap."""


class _Refusal:
    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


_ERROR_LABEL = {400: "bad_request", 408: "header_timeout", 414: "uri_too_long", 431: "header_too_large",
                505: "version"}
