"""Upstream connection pools: where an attempt gets its connection, per `Dest`.

HTTP/1 (`Pool`): keep-alive connections, one exchange at a time each; idle ones expire
(Linkerd's HTTP/1 pool keeps them 3 s; connections to peer proxies, which cost a TLS
handshake to replace, longer). HTTP/2 (`H2Pool`): one multiplexed connection per `Dest`,
each exchange a stream on it; another connection is opened only when every one is at the
server's concurrent-stream limit (up to MAX_CONNECTIONS), beyond which nghttp2 queues
streams until one closes. `Pools` holds every pool of one proxy direction and the sweeper
that expires idle connections of both kinds.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable

from proxy.http1.client import Http1Client
from proxy.http2.client import H2Client, OutStream
from proxy.http2.session import DEFAULT_CONFIG, H2Config
from proxy.limits import Limits
from proxy.upstream import DialError, Dest, dial
from tulle.log import get_logger

log = get_logger(part="pools")


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


class H2Pool:
    """HTTP/2 connections to one Dest, shared: `take()` / `acquire()` hand out a stream."""

    __slots__ = ("dest", "pools", "conns", "connecting", "waiters", "swept")

    MAX_CONNECTIONS = 4

    def __init__(self, dest: Dest, pools: "Pools"):
        self.dest = dest
        self.pools = pools
        self.conns: list[H2Client] = []
        self.connecting = 0
        self.waiters: deque[tuple[Callable[[OutStream], None], Callable[[DialError], None]]] = deque()
        self.swept = False

    @property
    def busy(self) -> int:
        return self.connecting

    def take(self) -> OutStream | None:
        """A stream on a connection that has room; on a full one when no more connections may
        be opened (nghttp2 queues it); None when there is no connection yet."""
        queued_on = None
        for c in self.conns:
            if c.accepts:
                if not c.full:
                    return c.stream()
                queued_on = queued_on or c
        if queued_on is not None:
            if not self.connecting and len(self.conns) < self.MAX_CONNECTIONS:
                self._dial()  # for the next ones
            return queued_on.stream()
        return None

    def acquire(self, on_ready: Callable[[OutStream], None], on_error: Callable[[DialError], None]) -> None:
        s = self.take()
        if s is not None:
            on_ready(s)
            return
        self.waiters.append((on_ready, on_error))
        if not self.connecting:
            self._dial()

    def _dial(self) -> None:
        self.connecting += 1
        asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        pools = self.pools
        dest = self.dest
        name = f"{dest.host}:{dest.port}"
        try:
            try:
                _, conn = await dial(dest, lambda: H2Client(self, pools.h2_config, name, pools.count_h2_error),
                                     pools.client_context, pools.connect_timeout)
            except DialError as e:
                error = e
            except Exception as e:  # never leave a request hanging
                log.exception("connect failed unexpectedly", dest=repr(dest))
                error = DialError(f"connect failed: {type(e).__name__}", "connect")
            else:
                error = None
        finally:
            self.connecting -= 1
        waiters, self.waiters = self.waiters, deque()
        if error is not None:
            for _, on_error in waiters:
                on_error(error)  # one connection would have served them all: all fail alike
            return
        conn.ready = True  # dial() wrote the transport header: the preface may follow
        self.conns.append(conn)
        if self.swept:
            pools.adopt(self)
        for on_ready, _ in waiters:
            on_ready(conn.stream())
        conn.write()  # the preface and SETTINGS, and the first requests

    def lost(self, conn: H2Client) -> None:
        """A connection takes no new streams (GOAWAY, closed): forget it."""
        try:
            self.conns.remove(conn)
        except ValueError:
            pass

    def expire(self, limit: float) -> None:
        for c in list(self.conns):
            if not c.streams and c.idle_since < limit:
                c.close()

    def close(self) -> None:
        for c in list(self.conns):
            c.close()


class Pools:
    """Every upstream pool of one proxy direction, and the sweeper that expires idle connections."""

    def __init__(self, *, client_context: Callable[[], object], connect_timeout: float, idle_timeout: float = 3.0,
                 mesh_idle_timeout: float | None = None, max_idle: int = 256, h2_config: H2Config = DEFAULT_CONFIG,
                 count_h2_error: Callable[[str], None] | None = None, limits: Limits | None = None):
        self.limits = limits if limits is not None else Limits()  # what HTTP/1 responses may be
        self.client_context = client_context
        self.h2_config = h2_config
        # What an HTTP/2 server upstream did that the codec refused, by reason (a metric).
        self.count_h2_error = count_h2_error or (lambda reason: None)
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        # mTLS connections to peer proxies (Dest with an identity) may stay idle longer.
        self.mesh_idle_timeout = idle_timeout if mesh_idle_timeout is None else mesh_idle_timeout
        self.max_idle = max_idle
        self.closing = False
        self._pools: dict[tuple, Pool] = {}
        self._h2: dict[tuple, H2Pool] = {}
        self._sweeper: asyncio.Task | None = None
        self.now = asyncio.get_event_loop().time

    def get(self, dest: Dest) -> Pool:
        pool = self._pools.get(dest.key)
        if pool is None:
            pool = self._pools[dest.key] = Pool(dest, self)
            if self._sweeper is None:
                self._sweeper = asyncio.ensure_future(self._sweep())
        return pool

    def h2(self, dest: Dest) -> H2Pool:
        """The HTTP/2 pool of `dest` (h2c to a plain endpoint, or HTTP/2 inside mTLS to a peer)."""
        pool = self._h2.get(dest.key)
        if pool is None:
            pool = self._h2[dest.key] = H2Pool(dest, self)
            if self._sweeper is None:
                self._sweeper = asyncio.ensure_future(self._sweep())
        return pool

    def adopt(self, pool) -> None:
        """A swept pool got a connection again: track it so it expires."""
        pool.swept = False
        if isinstance(pool, H2Pool):
            current = self._h2.setdefault(pool.dest.key, pool)
            if current is not pool:
                current.conns.extend(pool.conns)
                pool.conns.clear()
                pool.swept = True
            return
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
            for key, h2 in list(self._h2.items()):
                h2.expire(mesh_limit if h2.dest.identity else plain_limit)
                if not h2.conns and not h2.connecting and not h2.waiters:
                    h2.swept = True
                    del self._h2[key]

    def close(self) -> None:
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for pool in self._pools.values():
            for c in pool.idle:
                c.closed = True
                c.transport.close()
            pool.idle.clear()
        for h2 in self._h2.values():
            h2.close()
