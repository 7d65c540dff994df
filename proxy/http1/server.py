"""The downstream side of HTTP/1.1: one flat protocol class per accepted connection.

httptools calls back into `Http1Server` as it parses; each request head becomes a
`Request` (this connection's wire state of it) and an `Exchange` (proxy/exchange.py: the
request core, where every decision about it is made), which the room (inbound or
outbound) routes with `room.dispatch(x)`. The exchange answers through the `Request`'s
methods (`send_head`, `send_data`, `send_end`, `send_error` ...), which write the
response in HTTP/1.1 framing. Bytes are gathered per read event and written once, so a
small request or response costs one syscall. Nothing here awaits: the keep-alive path
has no task or coroutine per request.

Requests are answered in order: later pipelined requests wait in a queue (reading pauses
when it grows); a client that sends more than `limits.max_pipeline` of them ahead in one go
gets those answered, the last with `connection: close`, and the rest dropped unread (it
must send them again, as RFC 9112 §9.3.2 has clients do). Their bodies are held by their
exchanges until their turn (reading pauses beyond 64 KiB). The bounds and their verdicts
are proxy/limits.py's; `tick` runs the clocks (the exchange's own for its upstream).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Optional, Protocol

import httptools

from proxy import limits as bounds
from proxy.exchange import NO_BODY, SIZED, STREAMED, Exchange
from proxy.http1.headers import (
    CHUNKED, LAST_CHUNK, LENGTH, HeadError, error_response, request_head, response_has_body, serialize,
    status_line,
)
from proxy.limits import Limits
from proxy.metrics import Labels
from proxy.tcp import splice
from tulle.log import get_logger

TUNNEL_HOLD_LIMIT = 64 * 1024  # bytes after an upgrade / CONNECT head held until the tunnel opens

# Why reading from the client is paused (any bit set: paused).
PAUSE_PIPELINE, PAUSE_BODY, PAUSE_TUNNEL, PAUSE_DEAD = 1, 4, 8, 16

_FRAMING = {0: NO_BODY, LENGTH: SIZED, CHUNKED: STREAMED}

log = get_logger(part="http1")


class Room(Protocol):
    """What a direction (inbound / outbound) provides to the HTTP/1 server."""

    direction: str
    default_labels: Labels
    conns: set
    # Absolute-form targets (`GET http://host/path`) are routed by their authority and sent
    # on in origin-form (the outbound side, where apps use the proxy as an HTTP proxy).
    absolute_form: bool

    def dispatch(self, x: Exchange) -> None: ...

    def http_error(self, error: str) -> None: ...

    def track(self, s) -> None: ...


class Request:
    """One request's HTTP/1 wire state on this connection: the downstream of its exchange
    (proxy.exchange.Downstream)."""

    __slots__ = ("server", "x", "version", "keep_alive", "complete", "resp_chunked", "close_after", "tail",
                 "bad_target")

    def __init__(self, server: "Http1Server", version: str, keep_alive: bool):
        self.server = server
        self.x: Exchange | None = None
        self.version = version
        self.keep_alive = keep_alive
        self.complete = False  # the whole request was read from the client
        self.resp_chunked = False
        self.close_after = False
        self.tail: list[bytes] | None = None  # bytes after an upgrade / CONNECT head
        self.bad_target: str | None = None  # why the request target cannot be routed

    @property
    def feeding(self) -> bool:
        return self.server.feeding

    def send_head(self, x: Exchange, status: int, headers: list, length: int, end: bool) -> None:
        self.server.send_head(self, status, headers, length)

    def send_interim(self, x: Exchange, status: int, headers: list) -> None:
        if self.version == "1.1":
            self.server.out.append(serialize(status_line(status), headers))

    def send_data(self, x: Exchange, data: bytes) -> bool:
        server = self.server
        if self.resp_chunked:
            server.out.append(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            server.out.append(data)
        return not server.write_paused

    def send_end(self, x: Exchange, trailers: Optional[list]) -> None:
        server = self.server
        if self.resp_chunked:
            server.out.append(LAST_CHUNK)  # HTTP/1 responses carry no trailers here
        server.finish(self)

    def send_error(self, x: Exchange, status: int, reason: str) -> None:
        self.server.send_error(self, status, reason)

    def abort(self, x: Exchange, code: int = 0) -> None:
        self.server.abort(self)

    def pause_body(self, x: Exchange) -> None:
        self.server.pause(PAUSE_BODY)

    def resume_body(self, x: Exchange) -> None:
        self.server.resume(PAUSE_BODY)

    def flush(self) -> None:
        server = self.server
        if server.out:
            server.flush()

    def upgrade(self, x: Exchange, headers: list, transport: asyncio.Transport, tail: bytes) -> None:
        """101 Switching Protocols: hand both connections over to opaque forwarding."""
        server = self.server
        server.out.append(serialize(status_line(101), headers,
                                    b"connection: upgrade\r\nupgrade: " + x.upgrade + b"\r\n"))
        server.become_tunnel(self, transport, tail)

    def tunnel_ready(self, x: Exchange, upstream: asyncio.Transport, pending: bytes, guard=None) -> None:
        """A CONNECT tunnel is open: say so and forward bytes opaquely (`guard` may judge the
        client's first bytes in it, see tcp.Splice)."""
        server = self.server
        if self is not server.active or server.closed:
            upstream.close()
            return
        x.tunnelled()
        server.out.append(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        server.become_tunnel(self, upstream, pending, guard)


class Http1Server(asyncio.Protocol):
    def __init__(self, room: Room, limits: Limits, strip: frozenset[bytes], conn: object):
        self.room = room
        self.limits = limits
        self.strip = strip  # request headers removed on this side (e.g. tulle-client-id inbound)
        self.conn = conn  # the room's per-connection facts (peer, TLS identity, target port ...)
        self.loop = asyncio.get_event_loop()
        self.clock = self.loop.time
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.cur: Request | None = None  # being read
        self.active: Request | None = None  # being answered
        self.last: Request | None = None  # last whose head was read (for upgrades)
        self.queue: deque[Request] | None = None
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
        self.write_paused = False
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
        req = self.active
        if req is not None:
            # The caller went away: whatever its attempt holds (the balancer's in-flight
            # count, a route deadline, the upstream) is released here, or never.
            req.x.gone()

    def data_received(self, data: bytes) -> None:
        self.idle_ticks = 0
        if self.refused or self.closed:
            return  # bytes a closing connection had read already: never processed
        last = self.last
        if last is not None and last.tail is not None:  # waiting for 101 / the tunnel
            last.tail.append(data)
            if sum(map(len, last.tail)) > TUNNEL_HOLD_LIMIT:
                self.pause(PAUSE_TUNNEL)
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
            elif isinstance(err, _Closed):
                pass
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
        req = self.active
        if req is not None:
            up = req.x.up
            if up is not None:
                up.flush()
        if self.out:
            self.flush()

    def pause_writing(self) -> None:
        # The client reads slower than the upstream sends: the exchange stops reading the
        # upstream at its next piece of body (send_data answers False).
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        req = self.active
        if req is not None:
            req.x.down_writable()

    # --- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.closed:
            # Answered with `connection: close` in the middle of this read: what follows is
            # never processed (RFC 9112 §9.6).
            raise _Closed()
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
        target = self.url
        if host is None and version == "1.1" and method != b"CONNECT" and not target.startswith(b"http://"):
            raise HeadError(400, "missing host header")
        if upgrade is not None and upgrade.strip().lower() == b"h2c":
            upgrade = None  # HTTP/2 upgrades are not proxied (as linkerd2-proxy: stripped)
        req = Request(self, version, p.should_keep_alive() and not close)
        authority, path, host_header = host, target, host is not None
        if method == b"CONNECT":
            authority = target
        elif target[:1] != b"/" and self.room.absolute_form:
            if target[:7].lower() == b"http://":
                rest = target[7:]
                slash = rest.find(b"/")
                authority = rest if slash < 0 else rest[:slash]
                path = b"/" if slash < 0 else rest[slash:]
                if host is not None:
                    fwd = [h for h in fwd if h[0].lower() != b"host"]
                    host_header = False
            elif target != b"*":
                req.bad_target = "absolute-form request target must be http://"
        x = req.x = Exchange(self.room, req, self.clock, method, path, authority, fwd, framing=_FRAMING[framing],
                             length=length if framing == LENGTH else -1, host_header=host_header, upgrade=upgrade)
        x.conn = self.conn
        if version == "1.0":
            x.orig_proto = b"HTTP/1.0"
        self.cur = req
        self.last = req
        if self.active is None:
            self.active = req
            self._dispatch(req)
        else:
            q = self.queue
            if q is None:
                q = self.queue = deque()
            q.append(req)
            if bounds.pipeline_full(len(q), self.limits):
                self.pause(PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        self.cur.x.body_data(body)

    def on_message_complete(self) -> None:
        req = self.cur
        self.cur = None
        req.complete = True
        x = req.x
        if x.framing != NO_BODY:
            x.body_end()

    def _dispatch(self, req: Request) -> None:
        if req.bad_target is not None:
            req.x.fail(400, req.bad_target, "bad_request")
            return
        self.room.dispatch(req.x)

    # --- the response, as the exchange sends it --------------------------------------

    def send_head(self, req: Request, status: int, headers: list, length: int) -> None:
        x = req.x
        has_body = response_has_body(status, x.method)
        keep = req.keep_alive and not self.draining and not req.close_after and x.upgrade is None
        extra = b""
        if has_body and length < 0:
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
        self.out.append(serialize(first, headers, extra))

    def send_error(self, req: Request, status: int, reason: str) -> None:
        """Answer with a response of the proxy's own (no upstream answered)."""
        if req is not self.active or self.closed:
            return
        # After CONNECT or an upgrade request the parser has stopped: the connection ends.
        # A request without a body is whole once its head is read (it is dispatched then).
        x = req.x
        keep = (req.keep_alive and not self.draining and (req.complete or x.framing == NO_BODY)
                and x.upgrade is None and x.method != b"CONNECT" and not req.close_after)
        self.out.append(error_response(status, reason, close=not keep))
        if not keep:
            req.close_after = True
        self.finish(req)
        if not self.feeding and self.out:
            self.flush()

    def abort(self, req: Request) -> None:
        """Part of the response went out already: all that can be done is end the connection."""
        if req is self.active:
            self.active = None
        if not self.closed:
            self.flush()
            self.closed = True
            self.transport.close()

    def refuse(self, status: int, reason: str, error: str) -> None:
        """A request the proxy cannot read further: answer (after earlier ones) and close."""
        self.refused = True
        self.pause(PAUSE_DEAD)
        self.room.http_error(error)
        resp, _ = self.room.default_labels.response(status)
        resp.value += 1
        data = error_response(status, reason, close=True)
        req = self.cur  # set while a body is being read: the malformed bytes are its body
        if req is not None and req is self.active:
            # The request in flight is itself broken: the upstream must not wait for the rest.
            x = req.x
            started = x.responded or x.done
            x.gone()
            self.active = None
            if not started:
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
        # An earlier request is still being answered: queue the refusal behind it — in the
        # place of the request being read, when that is the broken one (its body will never
        # arrive whole: it must not go upstream when its turn comes).
        q = self.queue
        if q is None:
            q = self.queue = deque()
        if req is not None and q and q[-1] is req:
            q.pop()
            req.x.gone()
        q.append(_Refusal(data))

    def become_tunnel(self, req: Request, upstream: asyncio.Transport, pending: bytes, guard=None) -> None:
        self.flush()
        self.active = None
        self.room.conns.discard(self)
        self.closed = True  # this object no longer handles the connection
        tail = b"".join(req.tail or ())
        req.tail = None
        self.room.track(splice(self.transport, upstream, req.x.labels, client_pending=tail, server_pending=pending,
                               guard=guard))

    # --- timers (driven by the room's sweeper) -------------------------------------------

    def tick(self, interval: float) -> None:
        """Called every `interval` seconds: the clocks of proxy/limits.py — request head
        (408), request body gone idle (408, or close once answered), keep-alive idle (close);
        and the exchange's own for its upstream (response head 504, response body idle)."""
        if self.closed:
            return
        req = self.active
        if req is not None and req.x.up is not None:
            req.x.tick(interval, self.limits)
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

    def finish(self, req: Request) -> None:
        """The response to the active request is complete: on to the next one."""
        self.active = None
        if self.paused & PAUSE_BODY:
            self.resume(PAUSE_BODY)
        if req.close_after or (self.draining and self.cur is None):
            self.flush()
            self.closed = True
            self.transport.close()
            return
        q = self.queue
        while q:
            nxt = q.popleft()
            if len(q) < self.limits.max_pipeline // 2 and self.paused & PAUSE_PIPELINE:
                self.resume(PAUSE_PIPELINE)
            if isinstance(nxt, _Refusal):
                self.out.append(nxt.data)
                self.flush()
                self.closed = True
                self.transport.close()
                return
            self.active = nxt
            self._dispatch(nxt)
            return

    def _pipeline_full(self) -> None:
        """More requests came ahead than the pipeline holds: those read are answered, the
        last with `connection: close`; the rest were never parsed and are not read."""
        self.refused = True
        self.pause(PAUSE_DEAD)
        self.room.http_error("pipeline_limit")
        self.queue[-1].close_after = True

    def _parser_upgraded(self, data: bytes, offset: int) -> None:
        req = self.last
        tail = data[offset:]
        if req is not None and (req.x.upgrade is not None or req.x.method == b"CONNECT"):
            if not req.x.done:
                req.tail = [tail] if tail else []
            # else refused (answered with close): its tunnel's bytes are nobody's requests
            return
        if self.closed:
            return
        # llhttp switched to an upgrade we do not honour (h2c): carry on with HTTP/1.
        self.parser = httptools.HttpRequestParser(self)
        if tail:
            self.data_received(tail)

    def pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()


class _Closed(Exception):
    """Raised from the parser's callback: the connection was closed by an answer mid-read."""


class _PipelineFull(Exception):
    """Raised from the parser's callback to stop it before the request past the cap."""


class _Refusal:
    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


_ERROR_LABEL = {400: "bad_request", 408: "header_timeout", 414: "uri_too_long", 431: "header_too_large",
                505: "version"}
