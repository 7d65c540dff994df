"""The upstream side of HTTP/1.1: one `Http1Client` per upstream connection, pooled per `Dest`.

A client serves one exchange at a time for an `Http1Server` (never pipelined upstream)
and calls the server back with the response head, body pieces and end. It goes back to
its pool only when the request was sent whole and the response read whole with
keep-alive; otherwise it is closed. Idle connections expire after `idle_timeout`
(Linkerd's HTTP/1 pool keeps them 3 s).

Response heads get the bounds request heads have (proxy/limits.py): bytes counted across
reads, header count, an HTTP/1.x status line, at most `max_interim` 1xx responses. A
response past them is a 502 for the caller and its connection is dropped, never reused.
`ticks` is the exchange's clock, run by the server's `tick` (response head and body timeouts).

Requests on a service-profile route (`req.route` set, outbound only) are shown to the
room before anything reaches the caller: `room.attempt_answered` when a response head
arrives, `room.attempt_lost` when the connection fails first. When the room sends the
request again elsewhere, this response is read to its end and dropped (`_Dropped`),
so the connection can serve again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Callable

import httptools

from proxy import limits as bounds
from proxy.limits import Limits
from proxy.upstream import DialError, Dest, dial
from tulle.log import get_logger

if TYPE_CHECKING:
    from proxy.http1.server import Http1Server, Request

# A dropped (retried) response is read to its end so its connection can be reused, but
# no further than this many body bytes and no longer than this: then it is closed.
DROP_MAX_BODY = 64 * 1024
DROP_TIMEOUT_S = 10.0

log = get_logger(part="http1-client")


class _SkipBody(Exception):
    """A HEAD response ends at its head, whatever Content-Length says."""


class Http1Client(asyncio.Protocol):
    __slots__ = ("pool", "transport", "parser", "server", "req", "out", "headers", "reused", "closed",
                 "idle_since", "started", "status", "keep_alive", "until_close", "read_paused", "interim",
                 "limits", "ticks", "in_head", "head_bytes", "head_raw", "interims")

    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.limits: Limits = pool.pools.limits
        self.ticks = 0  # the exchange's clock (Http1Server.tick)
        self.in_head = False
        self.head_bytes = 0  # of the response head being read, by the parser's account
        self.head_raw = 0  # bytes read while a head was still incomplete, across reads
        self.interims = 0  # 1xx responses to this exchange
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.server: Http1Server | None = None
        self.req: Request | None = None
        self.out: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.reused = False
        self.closed = False
        self.idle_since = 0.0
        self.started = False  # response bytes seen for the current exchange
        self.status = 0
        self.keep_alive = True
        self.until_close = False
        self.read_paused = False  # paused because the client reads the response slowly
        self.interim = False  # a 1xx response of this exchange was passed on to the caller

    # --- driven by the server ----------------------------------------------------------

    def begin(self, server: "Http1Server", req: "Request", defer: bool) -> None:
        """Start sending `req`; with `defer`, the caller flushes (to coalesce writes)."""
        self.server = server
        self.req = req
        self.started = False
        self.status = 0
        self.until_close = False
        self.interim = False
        self.interims = 0
        self.ticks = 0
        out = self.out
        out.append(req.head)
        if req.body:
            out.extend(req.body)
        if not defer:
            self.flush()

    def flush(self) -> None:
        out = self.out
        if out:
            if not self.closed:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def pause_reading(self) -> None:
        if not self.closed and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def abandon(self) -> None:
        """The downstream went away mid-exchange: reset the upstream so it sees the abort."""
        self.server = None
        self.req = None
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def release(self) -> None:
        """Hand an unused connection back (e.g. its request was answered otherwise meanwhile)."""
        self.server = None
        self.req = None
        self.pool.give(self)

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        srv = self.server
        if srv is None:  # bytes on an idle connection: the server is confused, drop it
            self.closed = True
            self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgraded(srv, data[e.args[0]:])
            return
        except httptools.HttpParserCallbackError as e:
            err = e.__context__
            if isinstance(err, _SkipBody):
                self.parser = httptools.HttpResponseParser(self)
            elif self.server is None:
                self._close()  # bytes after the response ended: this connection is not usable
            else:
                if not isinstance(err, _Broken):
                    log.error("upstream response handling failed", error=repr(err))
                self._broken(self.server, err.reason if isinstance(err, _Broken)
                             else "upstream response could not be handled")
        except httptools.HttpParserError:
            if self.server is None:
                self._close()
            else:
                self._broken(self.server, "upstream sent a malformed response")
        else:
            if self.in_head and self.server is not None:
                # A head not complete yet, counted across reads: an upstream may not grow
                # one header (or the status line) without bound.
                self.head_raw += len(data)
                if self.head_raw > self.limits.max_head_bytes:
                    self._broken(self.server, bounds.response_head_error(0, self.head_raw, self.limits))
        if srv.out:
            srv.flush()

    def eof_received(self):
        return False

    def pause_writing(self) -> None:
        if self.server is not None:
            self.server.pause_for_upstream()

    def resume_writing(self) -> None:
        if self.server is not None:
            self.ticks = 0  # the upstream takes the request again: progress
            self.server.resume_for_upstream()

    def connection_lost(self, exc) -> None:
        self.closed = True
        srv = self.server
        if srv is None:
            self.pool.discard(self)
            return
        self.server = None
        if self.until_close and self.started:
            srv.on_upstream_end(self)  # a response delimited by the connection's close
            if srv.out:
                srv.flush()
        else:
            self._lost(srv, self.req, None)

    # --- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.server is None:
            raise _Broken("a second response to one request")
        self.headers = []
        self.started = True
        self.in_head = True
        self.head_bytes = 0
        self.head_raw = 0

    def on_status(self, reason: bytes) -> None:
        self.head_bytes += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        size = self.head_bytes = self.head_bytes + len(name) + len(value) + 4
        limits = self.limits
        if len(headers) >= limits.max_headers or size > limits.max_head_bytes:  # (the hot path: inline)
            raise _Broken(bounds.response_head_error(len(headers) + 1, size, limits))
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        status = self.parser.get_status_code()
        error = bounds.response_line_error(self.parser.get_http_version(), status)
        if error is not None:
            raise _Broken(error)
        self.status = status
        if status < 200:
            if status != 101 and any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.headers):
                # RFC 9110 8.6: never on a 1xx. Forwarded, it would make the caller read the
                # next response as this one's body (found by fuzz/).
                raise _Broken("upstream sent an interim response with content")
            if status != 101:
                self.interims += 1
                if bounds.too_many_interim(self.interims, self.limits):
                    raise _Broken(f"upstream sent more than {self.limits.max_interim} interim responses")
                self.interim = True
                self.server.on_upstream_interim(status, self.headers)
            return
        self.keep_alive = self.parser.should_keep_alive()
        req = self.req
        srv = self.server
        if req.route is not None and srv.room.attempt_answered(srv, self, req, status, self.headers):
            self._drop()  # the room sent the request again: this response goes nowhere
            if req.method == b"HEAD":
                self._end()
                raise _SkipBody()
            return
        self.until_close = srv.on_upstream_head(self, status, self.headers, self.keep_alive)
        if req.method == b"HEAD":
            self.until_close = False
            self._end()
            raise _SkipBody()

    def on_body(self, body: bytes) -> None:
        if self.status < 200:
            # A 1xx response has no content (RFC 9110 15.2); llhttp frames one that declares a
            # length, whose bytes would reach the caller with no head (found by fuzz/).
            raise _Broken("upstream sent an interim response with content")
        self.ticks = 0
        self.server.on_upstream_body(body)

    def on_message_complete(self) -> None:
        if self.status < 200:
            return
        self._end()

    # --- internals ---------------------------------------------------------------------

    def _end(self) -> None:
        srv, req = self.server, self.req
        self.server = None
        self.req = None
        if self.keep_alive and req.complete and not self.until_close and not self.closed:
            self.reused = True
            if self.read_paused:
                self.resume_reading()
            self.pool.give(self)  # first, so the server's next request may reuse it at once
        else:
            self.closed = True
            self.transport.close()
        srv.on_upstream_end(self)

    def _upgraded(self, srv: "Http1Server", tail: bytes) -> None:
        self.server = None
        self.req = None
        if self.status == 101:
            srv.on_upstream_upgrade(self, self.headers, tail)
        else:  # CONNECT answered 2xx by an origin: not something we speak upstream
            self.closed = True
            self.transport.close()
            srv.on_upstream_lost(self, True)

    def _close(self) -> None:
        self.closed = True
        self.transport.abort()

    def _broken(self, srv: "Http1Server", reason: str) -> None:
        req = self.req
        self.server = None
        self.req = None
        self.closed = True
        self.transport.abort()
        self._lost(srv, req, reason, "bad_response")

    def _lost(self, srv: "Http1Server", req: "Request | None", reason: str | None,
              error: str = "upstream_closed") -> None:
        """The exchange ended without a (whole) response: a profile route's room may send
        the request again; otherwise the server answers the caller."""
        if req is not None and req.route is not None and srv.room.attempt_lost(srv, self, req, reason):
            return
        srv.on_upstream_lost(self, self.started, reason, error)

    def _drop(self) -> None:
        """Read the rest of this response into nothing, then serve the pool again."""
        dropped = _Dropped(self)
        self.server = dropped
        self.req = dropped
        if self.read_paused:
            self.resume_reading()


class _Broken(Exception):
    """The upstream response exceeds what the proxy accepts (`reason`: for tulle-proxy-error)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Dropped:
    """Stands in for both the server and the request while a response that was retried
    elsewhere is read to its end (then the connection goes back to its pool)."""

    __slots__ = ("client", "size", "timer")

    out = ()  # nothing to flush towards any caller
    complete = True  # the request was sent whole (a retry needs that), so keep-alive may go on
    route = None
    method = b""

    def __init__(self, client: Http1Client):
        self.client = client
        self.size = 0
        self.timer = asyncio.get_event_loop().call_later(DROP_TIMEOUT_S, self._too_slow)

    def _too_slow(self) -> None:
        c = self.client
        if c.server is self and not c.closed:
            c._close()

    def on_upstream_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > DROP_MAX_BODY and not self.client.closed:
            self.client._close()

    def on_upstream_end(self, client: Http1Client) -> None:
        self.timer.cancel()

    def on_upstream_lost(self, client: Http1Client, started: bool, reason: str | None = None,
                         error: str = "") -> None:
        self.timer.cancel()

    def on_upstream_interim(self, status: int, headers: list) -> None:
        pass

    def on_upstream_upgrade(self, client: Http1Client, headers: list, tail: bytes) -> None:
        self.timer.cancel()
        client._close()

    def pause_for_upstream(self) -> None:
        pass

    def resume_for_upstream(self) -> None:
        pass

    def flush(self) -> None:
        pass


class Pool:
    """Keep-alive connections to one Dest; newest reused first, oldest expire first.

    A request that finds no idle connection waits in line; new connections are opened
    while more requests wait than connects are under way, at most MAX_CONNECTING at a
    time. Whatever frees up first — a new connection or one released by an answered
    request — goes to the head of the line. So a burst after a quiet spell costs a few
    TLS handshakes instead of one per request, and a slow request never holds up others
    longer than one connect.
    """

    __slots__ = ("dest", "idle", "pools", "busy", "swept", "waiters")

    MAX_CONNECTING = 4

    def __init__(self, dest: Dest, pools: "Pools"):
        self.dest = dest
        self.idle: list[Http1Client] = []
        self.pools = pools
        self.busy = 0  # connects in progress
        self.swept = False  # dropped by the sweeper while empty; re-registers on next use
        self.waiters: deque[tuple[Callable[[Http1Client], None], Callable[[DialError], None]]] = deque()

    def take(self) -> Http1Client | None:
        idle = self.idle
        while idle:
            c = idle.pop()
            if not c.closed:
                return c
        return None

    def acquire(self, on_ready: Callable[[Http1Client], None], on_error: Callable[[DialError], None]) -> None:
        """Get a connection for one request: at once when one is idle, else when one frees up."""
        c = self.take()
        if c is not None:
            on_ready(c)
            return
        self.waiters.append((on_ready, on_error))
        if self.busy < len(self.waiters) and self.busy < self.MAX_CONNECTING:
            self.busy += 1
            asyncio.ensure_future(self._connect())

    def give(self, c: Http1Client) -> None:
        if c.closed:
            return
        if self.waiters:
            on_ready, _ = self.waiters.popleft()
            on_ready(c)  # a request that is gone hands it back (release) to the next one
            return
        if len(self.idle) >= self.pools.max_idle or self.pools.closing:
            c.closed = True
            c.transport.close()
            return
        c.idle_since = self.pools.now()
        self.idle.append(c)
        if self.swept:
            self.pools.adopt(self)

    def discard(self, c: Http1Client) -> None:
        try:
            self.idle.remove(c)
        except ValueError:
            pass

    async def _connect(self) -> None:
        try:
            _, client = await dial(self.dest, lambda: Http1Client(self), self.pools.client_context,
                                   self.pools.connect_timeout)
        except DialError as e:
            self.busy -= 1
            self._failed(e)
            return
        except Exception as e:  # never leave a request hanging
            self.busy -= 1
            self._failed(DialError(f"connect failed: {type(e).__name__}", "connect"))
            log.exception("connect failed unexpectedly", dest=repr(self.dest))
            return
        self.busy -= 1
        self.give(client)
        # More waiting than connecting (e.g. the line grew meanwhile): keep opening.
        while self.busy < len(self.waiters) and self.busy < self.MAX_CONNECTING:
            self.busy += 1
            asyncio.ensure_future(self._connect())

    def _failed(self, e: DialError) -> None:
        """A connect failed: the request at the head of the line gets the error; if others
        still wait and nothing else is connecting, the next one tries again."""
        if self.waiters:
            _, on_error = self.waiters.popleft()
            on_error(e)
        if self.waiters and self.busy == 0:
            self.busy += 1
            asyncio.ensure_future(self._connect())


class Pools:
    """Every upstream pool of one proxy direction, and the sweeper that expires idle connections."""

    def __init__(self, *, client_context: Callable[[], object], connect_timeout: float, idle_timeout: float = 3.0,
                 mesh_idle_timeout: float | None = None, max_idle: int = 256, limits: Limits | None = None):
        self.limits = limits if limits is not None else Limits()  # what responses may be
        self.client_context = client_context
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        # mTLS connections to peer proxies (Dest with an identity) may stay idle longer.
        self.mesh_idle_timeout = idle_timeout if mesh_idle_timeout is None else mesh_idle_timeout
        self.max_idle = max_idle
        self.closing = False
        self._pools: dict[tuple, Pool] = {}
        self._sweeper: asyncio.Task | None = None
        self.now = asyncio.get_event_loop().time

    def get(self, dest: Dest) -> Pool:
        pool = self._pools.get(dest.key)
        if pool is None:
            pool = self._pools[dest.key] = Pool(dest, self)
            if self._sweeper is None:
                self._sweeper = asyncio.ensure_future(self._sweep())
        return pool

    def adopt(self, pool: Pool) -> None:
        """A swept pool got an idle connection again: track it so it expires."""
        pool.swept = False
        current = self._pools.setdefault(pool.dest.key, pool)
        if current is not pool:  # a newer pool took the key: move the connections there
            current.idle.extend(pool.idle)
            pool.idle.clear()
            pool.swept = True

    def idle_count(self) -> int:
        return sum(len(p.idle) for p in self._pools.values())

    async def _sweep(self) -> None:
        interval = min(max(min(self.idle_timeout, self.mesh_idle_timeout) / 3, 0.05), 1.0)
        while True:
            await asyncio.sleep(interval)
            now = self.now()
            plain_limit, mesh_limit = now - self.idle_timeout, now - self.mesh_idle_timeout
            for key, pool in list(self._pools.items()):
                limit = mesh_limit if pool.dest.identity else plain_limit
                idle = pool.idle
                while idle and idle[0].idle_since < limit:
                    c = idle.pop(0)
                    c.closed = True
                    c.transport.close()
                if not idle and not pool.busy and not pool.waiters:
                    pool.swept = True
                    del self._pools[key]

    def close(self) -> None:
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for pool in self._pools.values():
            for c in pool.idle:
                c.closed = True
                c.transport.close()
            pool.idle.clear()
