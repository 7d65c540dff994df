"""The upstream side of HTTP/1.1: one `Http1Client` per upstream connection (pooled per
`Dest` by proxy/pools.py), the wire adapter of one attempt of an `Exchange` at a time.

`start(x)` sends the request head and whatever body the exchange has so far; `send_data`
/ `send_end` the rest. The response goes back to the exchange as it is parsed (head,
body pieces, end) — the exchange decides whether it reaches the caller. A client serves
one exchange at a time (never pipelined upstream) and goes back to its pool only when the
request was sent whole and the response read whole with keep-alive; otherwise it is
closed. A response the exchange drops (its request was sent again elsewhere) is read to
its end into nothing (`_Dropped`), so the connection can serve again.

Response heads get the bounds request heads have (proxy/limits.py): bytes counted across
reads, header count, an HTTP/1.x status line, at most `max_interim` 1xx responses. A
response past them is a 502 for the caller and its connection is dropped, never reused.
The response head and body timeouts are the exchange's clock (`Exchange.tick`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Optional

import httptools

from proxy import limits as bounds
from proxy.exchange import DROPPED, STREAMED
from proxy.http1.headers import (
    LAST_CHUNK, LENGTH, UNTIL_CLOSE, response_has_body, response_head, serialize,
)
from proxy.limits import Limits
from tulle.log import get_logger

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.pools import Pool

# A dropped (retried) response is read to its end so its connection can be reused, but
# no further than this many body bytes and no longer than this: then it is closed.
DROP_MAX_BODY = 64 * 1024
DROP_TIMEOUT_S = 10.0
# Fields of an HTTP/2 request that mean nothing (or something else) in HTTP/1.
_H2_ONLY = frozenset({b"te", b"host"})

log = get_logger(part="http1-client")


class _SkipBody(Exception):
    """A HEAD response ends at its head, whatever Content-Length says."""


class Http1Client(asyncio.Protocol):
    __slots__ = ("pool", "transport", "parser", "x", "out", "headers", "reused", "closed", "idle_since",
                 "started", "status", "keep_alive", "until_close", "read_paused", "interim", "write_paused",
                 "chunked", "sent_whole", "limits", "in_head", "head_bytes", "head_raw", "interims")

    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.limits: Limits = pool.pools.limits
        self.in_head = False
        self.head_bytes = 0  # of the response head being read, by the parser's account
        self.head_raw = 0  # bytes read while a head was still incomplete, across reads
        self.interims = 0  # 1xx responses to this exchange
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.x: Exchange | _Dropped | None = None
        self.out: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.reused = False
        self.closed = False
        self.idle_since = 0.0
        self.started = False  # response bytes seen for the current exchange
        self.status = 0
        self.keep_alive = True
        self.until_close = False
        self.read_paused = False  # paused because the caller reads the response slowly
        self.write_paused = False  # the server reads the request slowly
        self.interim = False  # a 1xx response of this exchange was passed on to the caller
        self.chunked = False  # the request body goes out chunked
        self.sent_whole = False  # the whole request went out (keep-alive needs it)

    # --- driven by the exchange (proxy.exchange.Upstream) -------------------------------

    def start(self, x: "Exchange") -> None:
        """Send the head and the body so far; the caller's adapter flushes when it is in
        the middle of a read (to coalesce writes)."""
        self.x = x
        self.started = False
        self.status = 0
        self.until_close = False
        self.interim = False
        self.interims = 0
        head = x.h1_head
        if head is None:
            head = x.h1_head = request_head(x)
        if x.retries:
            head = head[:-2] + b"tulle-retry-attempt: %d\r\n\r\n" % x.retries
        out = self.out
        out.append(head)
        framing = x.framing
        self.chunked = chunked = framing == STREAMED
        chunks = x.body_to_send() if framing else ()
        if chunked:
            for data in chunks:
                out.append(b"%x\r\n%b\r\n" % (len(data), data))
        elif chunks:
            out.extend(chunks)
        self.sent_whole = x.body_done
        if x.body_done and chunked:
            out.append(LAST_CHUNK)
        if not x.down.feeding:
            self.flush()

    def send_data(self, data: bytes) -> bool:
        if self.chunked:
            self.out.append(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.out.append(data)
        return not self.write_paused

    def send_end(self, trailers: Optional[list]) -> None:
        self.sent_whole = True
        if self.chunked:
            self.out.append(LAST_CHUNK)  # HTTP/1 request trailers are not forwarded

    def flush(self) -> None:
        out = self.out
        if out:
            if not self.closed:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def pause(self) -> None:
        if not self.closed and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def abandon(self) -> None:
        """The attempt is cancelled: reset the connection so the server sees the abort."""
        self.x = None
        self.out.clear()
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def release(self) -> None:
        """Hand an unused connection back (its request was answered otherwise meanwhile)."""
        self.x = None
        self.pool.give(self)

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        x = self.x
        if x is None:  # bytes on an idle connection: the server is confused, drop it
            self.closed = True
            self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgraded(data[e.args[0]:])
            return
        except httptools.HttpParserCallbackError as e:
            err = e.__context__
            if isinstance(err, _SkipBody):
                self.parser = httptools.HttpResponseParser(self)
            elif self.x is None:
                self._close()  # bytes after the response ended: this connection is not usable
            else:
                if not isinstance(err, _Broken):
                    log.error("upstream response handling failed", error=repr(err))
                self._broken(err.reason if isinstance(err, _Broken) else "upstream response could not be handled")
        except httptools.HttpParserError:
            if self.x is None:
                self._close()
            else:
                self._broken("upstream sent a malformed response")
        else:
            if self.in_head and self.x is not None:
                # A head not complete yet, counted across reads: an upstream may not grow
                # one header (or the status line) without bound.
                self.head_raw += len(data)
                if self.head_raw > self.limits.max_head_bytes:
                    self._broken(bounds.response_head_error(0, self.head_raw, self.limits))
        x.down.flush()

    def eof_received(self):
        return False

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        x = self.x
        if x is not None:
            x.up_writable()

    def connection_lost(self, exc) -> None:
        self.closed = True
        x = self.x
        if x is None:
            self.pool.discard(self)
            return
        self.x = None
        if self.until_close and self.started:
            x.response_end(self)  # a response delimited by the connection's close
            x.down.flush()
        else:
            self._lost(x, None)

    # --- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.x is None:
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
        x = self.x
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
                x.response_interim(self, status, response_head(self.headers)[0])
            return
        self.keep_alive = self.parser.should_keep_alive()
        fwd, framing, length, _upgrade, _close = response_head(self.headers)
        head_only = x.method == b"HEAD"
        until_close = framing == UNTIL_CLOSE and response_has_body(status, x.method)
        if x.response_head(self, status, fwd, length if framing == LENGTH else -1) is DROPPED:
            self._drop(x)  # the exchange sent the request again: this response goes nowhere
        else:
            self.until_close = until_close
        if head_only:
            self.until_close = False
            self._end()
            raise _SkipBody()

    def on_body(self, body: bytes) -> None:
        if self.status < 200:
            # A 1xx response has no content (RFC 9110 15.2); llhttp frames one that declares a
            # length, whose bytes would reach the caller with no head (found by fuzz/).
            raise _Broken("upstream sent an interim response with content")
        self.x.response_data(self, body)

    def on_message_complete(self) -> None:
        if self.status < 200:
            return
        self._end()

    # --- internals ---------------------------------------------------------------------

    def _end(self) -> None:
        x = self.x
        self.x = None
        if self.keep_alive and self.sent_whole and not self.until_close and not self.closed:
            self.reused = True
            if self.read_paused:
                self.resume()
            self.pool.give(self)  # first, so the caller's next request may reuse it at once
        else:
            self.closed = True
            self.transport.close()
        x.response_end(self)

    def _upgraded(self, tail: bytes) -> None:
        x = self.x
        self.x = None
        if self.status == 101 and x.upgraded(self):
            x.down.upgrade(x, response_head(self.headers)[0], self.transport, tail)
            return
        # Switched protocols unasked, or CONNECT answered 2xx by an origin: not something we
        # speak upstream.
        self.closed = True
        self.transport.close()
        if self.status == 101:
            x.attempt_lost(self, "upstream switched protocols unasked", started=True, error="bad_upgrade")
        else:
            x.attempt_lost(self, None, started=True)
        x.down.flush()

    def _close(self) -> None:
        self.closed = True
        self.transport.abort()

    def _broken(self, reason: str) -> None:
        x = self.x
        self.x = None
        self.closed = True
        self.transport.abort()
        self._lost(x, reason, "bad_response")

    def _lost(self, x, reason: str | None, error: str = "upstream_closed") -> None:
        """The exchange ended without a (whole) response: the exchange decides (resend a
        request a stale keep-alive connection swallowed, retry, or answer 502)."""
        if x is not None:
            x.attempt_lost(self, reason, started=self.started, reused=self.reused, interim=self.interim, error=error)

    def _drop(self, x: "Exchange") -> None:
        """Read the rest of this response into nothing, then serve the pool again."""
        self.x = _Dropped(self, x.method)
        if self.read_paused:
            self.resume()


def request_head(x: "Exchange") -> bytes:
    """The HTTP/1.1 head of an exchange's request, whatever protocol it arrived in."""
    version = b"HTTP/1.0" if x.orig_proto == b"HTTP/1.0" else b"HTTP/1.1"
    first = b"%b %b %b\r\n" % (x.method, x.path, version)
    headers = x.headers
    extra = b""
    if x.version == 2:
        # From HTTP/2: `te: trailers` is hop-by-hop here, and split cookies are one field again.
        cookies = [v for n, v in headers if n == b"cookie"]
        headers = [h for h in headers if h[0] not in _H2_ONLY and h[0] != b"cookie"]
        if cookies:
            headers.append((b"cookie", b"; ".join(cookies)))
    if not x.host_header and x.authority is not None:
        extra = b"host: " + x.authority + b"\r\n"
    for name, value in x.extra or ():  # the retry number is added per attempt (start)
        extra += name + b": " + value + b"\r\n"
    if x.framing == STREAMED:
        extra += b"transfer-encoding: chunked\r\n"
    if x.upgrade is not None:
        extra += b"connection: upgrade\r\nupgrade: " + x.upgrade + b"\r\n"
    return serialize(first, headers, extra)


class _Broken(Exception):
    """The upstream response exceeds what the proxy accepts (`reason`: for tulle-proxy-error)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _NoCaller:
    """The caller of a dropped response: there is nothing to flush towards it."""

    @staticmethod
    def flush() -> None:
        pass


class _Dropped:
    """Stands in for the exchange while a response that was retried elsewhere is read to its
    end (then the connection goes back to its pool)."""

    __slots__ = ("client", "size", "timer", "method")

    down = _NoCaller
    route = None

    def __init__(self, client: Http1Client, method: bytes):
        self.client = client
        self.method = method
        self.size = 0
        self.timer = asyncio.get_event_loop().call_later(DROP_TIMEOUT_S, self._too_slow)

    def _too_slow(self) -> None:
        c = self.client
        if c.x is self and not c.closed:
            c._close()

    def response_data(self, up, data: bytes) -> None:
        self.size += len(data)
        if self.size > DROP_MAX_BODY and not self.client.closed:
            self.client._close()

    def response_end(self, up, trailers=None) -> None:
        self.timer.cancel()

    def attempt_lost(self, up, reason, **_) -> None:
        self.timer.cancel()

    def response_interim(self, up, status: int, headers: list) -> None:
        pass

    def upgraded(self, up) -> bool:
        self.timer.cancel()
        return False

    def up_writable(self) -> None:
        pass
