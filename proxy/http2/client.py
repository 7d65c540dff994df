"""The upstream side of HTTP/2: one `H2Client` per upstream connection (to a peer proxy inside
mTLS, or h2c to an app or an endpoint outside the mesh), one `OutStream` per attempt.

Many exchanges share one connection (proxy/pools.py `H2Pool` hands out streams). `start(x)`
sends the request section — HTTP/2 as it came, or an HTTP/1 request made valid HTTP/2 with
`tulle-orig-proto` naming the caller's protocol, so the peer proxy restores it — then the
body; the response goes back to the exchange frame by frame. Backpressure as on the
server side: response bytes are consumed (the server's window given back) only once the
caller took them; request bytes stop when this stream's queue is full (`send_data` False,
`StreamWritable` later).

A stream the server refused unprocessed (REFUSED_STREAM, or beyond a GOAWAY's last stream)
is reported as such, so the core may send it again elsewhere whatever its method.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable, Optional

from proxy.http2 import events as ev
from proxy.http2.fields import ORIG_PROTO, outgoing, response_fields, trailer_fields
from proxy.http2.session import CANCEL, NO_ERROR, REFUSED_STREAM, H2Config, H2Error, H2Session
from proxy.http2.writes import BatchedWrites, StreamWindow
from tulle.log import get_logger

if TYPE_CHECKING:
    from proxy.exchange import Exchange

log = get_logger(part="http2-client")

_SKIP_FROM_H1 = frozenset({b"host"})  # carried by :authority


class OutStream(StreamWindow):
    """One attempt on a shared connection: the upstream of its exchange (proxy.exchange.Upstream)."""

    __slots__ = ("x", "headed", "ended")

    def __init__(self, conn: "H2Client"):
        StreamWindow.__init__(self, conn, 0)
        self.x: Exchange | None = None
        self.headed = False  # the response head arrived
        self.ended = False  # over (response ended, reset or abandoned)

    def start(self, x: "Exchange") -> None:
        conn = self.conn
        self.x = x
        session = conn.session
        chunks = x.body_to_send() if x.framing else ()
        whole = x.body_done
        headers = request_fields(x, conn.scheme)
        try:
            self.id = sid = session.send_request(headers, end_stream=whole and not chunks and not x.trailers)
        except H2Error as e:
            self.ended = True
            conn.dirty()
            x.attempt_lost(self, f"cannot open a stream to {conn.name}: {e}", unprocessed=True)
            return
        conn.streams[sid] = self
        for data in chunks:
            session.send_data(sid, data)
        if whole and (chunks or x.trailers):
            if x.trailers:
                session.send_trailers(sid, trailer_fields(x.trailers))
            else:
                session.end_stream(sid)
        conn.dirty()

    def send_data(self, data: bytes) -> bool:
        conn = self.conn
        conn.dirty()
        return conn.session.send_data(self.id, data)

    def send_end(self, trailers: Optional[list]) -> None:
        conn = self.conn
        if self.ended or not conn.session.stream_is_open(self.id):
            return
        if trailers:
            conn.session.send_trailers(self.id, trailer_fields(trailers))
        else:
            conn.session.end_stream(self.id)
        conn.dirty()

    def abandon(self) -> None:
        self.x = None
        if not self.ended:
            self.ended = True
            conn = self.conn
            if self.id and conn.session.stream_is_open(self.id):
                conn.session.reset(self.id, CANCEL)
                conn.dirty()

    def release(self) -> None:
        self.ended = True  # never started: nothing was opened

    pause = StreamWindow.stop_reading  # the caller reads the response slowly
    resume = StreamWindow.read_again

    def flush(self) -> None:
        self.conn.flush()


def request_fields(x: "Exchange", scheme: bytes) -> list:
    """The request section for HTTP/2: pseudo-headers, then the fields (an HTTP/1 request's
    made valid HTTP/2, with the caller's protocol in tulle-orig-proto), then the proxy's."""
    authority = x.authority
    headers = [(b":method", x.method), (b":scheme", scheme), (b":authority", authority or b"localhost"),
               (b":path", x.path)]
    if x.version == 2:
        headers += x.headers
    else:
        headers += outgoing(x.headers, _SKIP_FROM_H1)
        headers.append((ORIG_PROTO, x.orig_proto or b"HTTP/1.1"))
    extra = x.extra_headers()
    if extra:
        headers += extra
    return headers


class H2Client(BatchedWrites, asyncio.Protocol):
    """One upstream HTTP/2 connection; `pool` learns when it can take no more streams."""

    def __init__(self, pool, config: H2Config, name: str, count_error: Callable[[str], None] | None = None):
        self.pool = pool
        self.config = config
        self.name = name  # for messages: host:port
        self.scheme = b"http"
        self.count_error = count_error or (lambda reason: None)
        self.loop = asyncio.get_event_loop()
        self.session = H2Session(client=True, config=config, clock=self.loop.time)
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, OutStream] = {}
        self.touched: list = []  # exchanges whose caller got bytes this read
        self.write_paused = False
        self.flush_scheduled = False
        self.pending = False  # the session may hold bytes to write
        self.closed = False
        self.ready = False  # set by the pool once the transport header (if any) went first
        self.going_away = False  # GOAWAY received or sent: no new streams
        self.served = 0  # responses completed on this connection
        self.idle_since = self.loop.time()

    # --- for the pool -------------------------------------------------------------------

    @property
    def accepts(self) -> bool:
        return not self.closed and not self.going_away and self.session.accepts_requests

    @property
    def full(self) -> bool:
        return len(self.streams) >= self.session.remote_max_concurrent_streams

    def stream(self) -> OutStream:
        return OutStream(self)

    def close(self) -> None:
        """Close once idle (the pool's sweeper, shutdown): GOAWAY, then the socket."""
        if not self.closed:
            self.going_away = True
            try:
                self.session.goaway(NO_ERROR)
            except H2Error:
                pass
            self.write()
            self._close()

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport  # the preface waits until dial() wrote the transport header

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.session.feed(data)
        except H2Error:
            log.exception("http2 client session failed", upstream=self.name)
            self.transport.abort()
            return
        self._handle(events)
        self.write()  # whatever the frames read called for
        touched = self.touched
        if touched:
            for x in touched:
                x.down.flush()
            touched.clear()

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.pool.lost(self)
        streams, self.streams = self.streams, {}
        for s in streams.values():
            x = s.x
            if x is not None and not s.ended:
                s.ended = True
                x.attempt_lost(s, f"connection to {self.name} lost", started=s.headed, reused=self.served > 0)
                x.down.flush()

    # --- session events ------------------------------------------------------------------

    def _handle(self, events: list) -> None:
        for e in events:
            cls = e.__class__
            if cls is ev.DataReceived:
                s = self.streams.get(e.stream_id)
                if s is None or s.x is None:
                    continue
                x = s.x
                n = len(e.data)
                if n:
                    s.owed += n
                    x.response_data(s, e.data)
                if e.end_stream:
                    s.ended = True
                    x.response_end(s, None)
                if s.owed and not s.paused:
                    self.session.consume(e.stream_id, s.owed)
                    s.owed = 0
                self.touched.append(x)
            elif cls is ev.ResponseReceived:
                s = self.streams.get(e.stream_id)
                if s is None or s.x is None:
                    continue
                x = s.x
                status, fields, length = response_fields(e.headers)
                s.headed = True
                x.resp_h2 = True
                if e.end_stream:
                    s.ended = True
                if not x.response_head(s, status, fields, length, e.end_stream):
                    s.x = None  # sent again elsewhere: this response goes nowhere
                    if not e.end_stream:
                        s.ended = True
                        self.session.reset(e.stream_id, CANCEL)
                self.touched.append(x)
            elif cls is ev.TrailersReceived:
                s = self.streams.get(e.stream_id)
                if s is not None and s.x is not None:
                    s.ended = True
                    s.x.response_end(s, trailer_fields(e.headers))
                    self.touched.append(s.x)
            elif cls is ev.StreamClosed or cls is ev.StreamReset:
                s = self.streams.pop(e.stream_id, None)
                if s is None:
                    continue
                x = s.x
                if x is not None and not s.ended:
                    s.ended = True
                    code = e.error_code if cls is ev.StreamReset else NO_ERROR
                    unprocessed = code == REFUSED_STREAM and not s.headed
                    x.attempt_lost(s, f"{self.name} reset the stream (HTTP/2 error {code})", started=s.headed,
                                   unprocessed=unprocessed, code=code or CANCEL)
                    self.touched.append(x)
                if s.headed:
                    self.served += 1
                if not self.streams:
                    self.idle_since = self.loop.time()
            elif cls is ev.StreamWritable:
                s = self.streams.get(e.stream_id)
                if s is not None and s.x is not None:
                    s.x.up_writable()
            elif cls is ev.InformationalResponseReceived:
                s = self.streams.get(e.stream_id)
                if s is not None and s.x is not None:
                    status, fields, _ = response_fields(e.headers)
                    s.x.response_interim(s, status, fields)
            elif cls is ev.HeaderListTooLarge:
                self.count_error(e.reason)
                s = self.streams.get(e.stream_id)
                if s is not None and not s.ended:
                    s.ended = True
                    self.session.reset(e.stream_id, CANCEL)
                    if s.x is not None:
                        x = s.x
                        x.attempt_lost(s, f"{self.name} sent a header section over the limit",
                                       started=s.headed, error="response_headers_too_large")
                        self.touched.append(x)
            elif cls is ev.GoAwayReceived:
                self.going_away = True
                self.pool.lost(self)
            elif cls is ev.PeerMisbehaved:
                self.count_error(e.reason)
                if e.stream_id == 0:
                    log.info("closing an HTTP/2 connection the server broke", upstream=self.name,
                             reason=e.reason, error_code=e.error_code)
                    self.going_away = True
                    self.pool.lost(self)

    # --- writing ------------------------------------------------------------------------

    def write(self) -> None:
        self.pending = False
        if self.closed or self.write_paused or not self.ready:
            return
        session = self.session
        try:
            data = session.data_to_send()
        except H2Error:
            log.exception("http2 client session failed", upstream=self.name)
            self.transport.abort()
            return
        if data:
            self.transport.write(data)
        events = session.pop_events()
        if events:
            self._handle(events)
            touched = self.touched
            for x in touched:
                x.down.flush()
            touched.clear()
            if session.want_write and not self.write_paused:
                self.write()
                return
        if session.closed:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.lost(self)
            if self.transport is not None:
                self.transport.close()
