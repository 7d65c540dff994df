"""The downstream side of HTTP/2: one `H2Server` per accepted connection (h2c from an app or
from outside the mesh, h2 from a peer proxy inside mTLS), one `InStream` per request stream.

Each request section becomes an `Exchange` (proxy/exchange.py) that the room routes like
any other; the exchange answers through the stream (`send_head`, `send_data`, `send_end`,
`send_error` — gRPC-shaped as a trailers-only response when the call is gRPC).

Flow control is backpressure, never buffering: a DATA frame's bytes are given back to the
peer's window (`consume`) only once the exchange passed them on without being told to
wait; a stream whose upstream is slow stops at its own stream window while the others go
on within the connection window. Towards the peer, nothing is pulled from the session
while the socket is paused for writing, so nghttp2 holds (and bounds) what piles up, and
`send_data` answers False for a stream whose queue is full.

What the codec refuses (proxy/http2/session.py: floods, rapid reset, CONTINUATION abuse,
window overflow, stream-id reuse ...) is counted by reason; a connection error closes the
connection once the GOAWAY is written, and only this connection's streams end.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Optional

from proxy.exchange import NO_BODY, SIZED, STREAMED, Exchange
from proxy.grpc_status import code_for_http_status, trailers_only
from proxy.http1.headers import PROXY_ERROR
from proxy.http2 import events as ev
from proxy.http2.fields import ORIG_PROTO, outgoing, request_head, status_bytes, trailer_fields
from proxy.http2.session import CANCEL, INTERNAL_ERROR, NO_ERROR, H2Config, H2Error, H2Session
from proxy.http2.writes import BatchedWrites, StreamWindow
from tulle.log import get_logger

log = get_logger(part="http2")

# A connection closed for misbehaving while its client reads nothing: the GOAWAY is written
# anyway, and the socket aborted if it is still not drained after this long.
LINGER_S = 2.0


class InStream(StreamWindow):
    """One request stream: the downstream of its exchange (proxy.exchange.Downstream)."""

    __slots__ = ("x", "ended")

    feeding = False  # the H2 connection flushes for itself; an HTTP/1 upstream flushes its own writes

    def __init__(self, conn: "H2Server", stream_id: int):
        StreamWindow.__init__(self, conn, stream_id)
        self.x: Exchange | None = None
        self.ended = False  # our side of the stream is ended (or reset)

    def send_head(self, x: Exchange, status: int, headers: list, length: int, end: bool) -> None:
        conn = self.conn
        fields = headers if x.resp_h2 else outgoing(headers)
        conn.session.send_response(self.id, [(b":status", status_bytes(status)), *fields], end_stream=end)
        if end:
            self.ended = True
        conn.dirty()

    def send_interim(self, x: Exchange, status: int, headers: list) -> None:
        if status != 101:
            self.conn.session.send_informational(self.id, [(b":status", status_bytes(status)), *outgoing(headers)])
            self.conn.dirty()

    def send_data(self, x: Exchange, data: bytes) -> bool:
        conn = self.conn
        conn.dirty()
        return conn.session.send_data(self.id, data)

    def send_end(self, x: Exchange, trailers: Optional[list]) -> None:
        if self.ended:
            return
        self.ended = True
        conn = self.conn
        if trailers:
            conn.session.send_trailers(self.id, trailer_fields(trailers))
        else:
            conn.session.end_stream(self.id)
        conn.dirty()

    def send_error(self, x: Exchange, status: int, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        conn = self.conn
        if x.grpc:
            headers = trailers_only(code_for_http_status(status), reason, proxy_error=reason)
        else:
            headers = [(b":status", status_bytes(status)), (b"content-length", b"0"),
                       (PROXY_ERROR, reason.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" "))]
        conn.session.send_response(self.id, headers, end_stream=True)
        conn.dirty()

    def abort(self, x: Exchange, code: int = INTERNAL_ERROR) -> None:
        if not self.ended:
            self.ended = True
            self.conn.session.reset(self.id, code)
            self.conn.dirty()

    pause_body = StreamWindow.stop_reading  # the upstream takes the request body slowly
    resume_body = StreamWindow.read_again

    def flush(self) -> None:
        self.conn.flush()


class H2Server(BatchedWrites, asyncio.Protocol):
    """One accepted HTTP/2 connection. `room` routes each exchange (`dispatch`); `conn` is the
    room's facts about the connection; `strip` names request fields removed on this side;
    `trust_orig_proto`: the client is a verified peer proxy, whose orig-proto field says in
    which protocol the app behind it asked. `preface`: bytes already read from the socket."""

    def __init__(self, room, conn: object, config: H2Config, strip: frozenset[bytes], *,
                 trust_orig_proto: bool = False, preface: bytes = b"",
                 count_error: Callable[[str], None] | None = None):
        self.room = room
        self.conn = conn
        self.config = config
        self.strip = strip
        self.trust_orig_proto = trust_orig_proto
        self.preface = preface
        self.count_error = count_error or (lambda reason: None)
        self.loop = asyncio.get_event_loop()
        self.clock = self.loop.time
        self.session: H2Session | None = None
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, InStream] = {}
        self.touched: list[Exchange] = []  # exchanges whose upstream got request bytes this read
        self.write_paused = False
        self.flush_scheduled = False
        self.pending = False  # the session may hold bytes to write
        self.closed = False
        self.closing = False  # a GOAWAY is out: close once the session says it is done
        self.draining = False
        self.idle_ticks = 0

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.session = H2Session(client=False, config=self.config, clock=self.clock)
        self.room.conns.add(self)
        preface, self.preface = self.preface, b""
        if preface:
            self.data_received(preface)
        else:
            self.write()

    def data_received(self, data: bytes) -> None:
        self.idle_ticks = 0
        if self.closed:
            return
        try:
            events = self.session.feed(data)
        except H2Error:
            log.exception("http2 session failed")
            self._close()
            return
        self._handle(events)
        touched = self.touched
        if touched:
            for x in touched:
                up = x.up
                if up is not None:
                    up.flush()
            touched.clear()
        self.write()  # whatever the frames read called for (ACKs, WINDOW_UPDATEs, answers)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.room.conns.discard(self)
        streams, self.streams = self.streams, {}
        for s in streams.values():
            x = s.x
            if x is not None:
                x.gone()

    # --- session events ------------------------------------------------------------------

    def _handle(self, events: list) -> None:
        for e in events:
            cls = e.__class__
            if cls is ev.DataReceived:
                s = self.streams.get(e.stream_id)
                if s is None:
                    continue
                x = s.x
                n = len(e.data)
                if n:
                    s.owed += n
                    x.body_data(e.data)
                    if x.up is not None:
                        self.touched.append(x)
                if e.end_stream:
                    x.body_end(None)
                if s.owed and not s.paused:
                    self.session.consume(e.stream_id, s.owed)
                    s.owed = 0
            elif cls is ev.RequestReceived:
                self._request(e.stream_id, e.headers, e.end_stream)
            elif cls is ev.StreamClosed or cls is ev.StreamReset:
                s = self.streams.pop(e.stream_id, None)
                if s is not None:
                    s.ended = True
                    x = s.x
                    if x is not None and not x.done:
                        x.gone()
                if self.draining and not self.streams:
                    self._goaway()
            elif cls is ev.StreamWritable:
                s = self.streams.get(e.stream_id)
                if s is not None and s.x is not None:
                    s.x.down_writable()
            elif cls is ev.TrailersReceived:
                s = self.streams.get(e.stream_id)
                if s is not None:
                    s.x.body_end(trailer_fields(e.headers))
                    if s.x.up is not None:
                        self.touched.append(s.x)
            elif cls is ev.HeaderListTooLarge:
                self._too_large(e)
            elif cls is ev.PeerMisbehaved:
                self.count_error(e.reason)
                if e.stream_id == 0:
                    log.info("closing an HTTP/2 connection the client broke", reason=e.reason,
                             error_code=e.error_code, detail=self.session.last_error)
                    self.closing = True

    def _request(self, sid: int, headers: list, end: bool) -> None:
        head = request_head(headers, self.strip)
        s = InStream(self, sid)
        self.streams[sid] = s
        self.session.attach(sid, s)
        if end:
            framing = NO_BODY
        elif head.length >= 0:
            framing = SIZED
        else:
            framing = STREAMED
        x = s.x = Exchange(self.room, s, self.clock, head.method, head.path, head.authority, head.fields,
                           version=2, framing=framing, length=head.length, content_type=head.content_type,
                           orig_proto=head.orig_proto if self.trust_orig_proto else None)
        x.conn = self.conn
        if head.method == b"CONNECT":
            x.fail(405, "CONNECT is not proxied over HTTP/2", "bad_request")
            return
        self.room.dispatch(x)

    def _too_large(self, e: ev.HeaderListTooLarge) -> None:
        """A header section over the limit: 431 when nothing was answered yet (the codec then
        resets an unfinished request), else the stream is reset."""
        self.count_error(e.reason)
        s = self.streams.get(e.stream_id)
        if s is None:  # the request section itself: no exchange was made
            s = InStream(self, e.stream_id)
            self.streams[e.stream_id] = s
            self.room.http_error("header_too_large")
            resp, _ = self.room.default_labels.response(431)
            resp.value += 1
            s.ended = True
            self.session.send_response(e.stream_id, [(b":status", b"431"), (b"content-length", b"0"),
                                                     (PROXY_ERROR, b"request headers too large")], end_stream=True)
            return
        x = s.x
        if x is not None and not x.responded and not x.done:
            x.fail(431, "request trailers too large", "header_too_large")
        elif not s.ended:
            s.abort(x, CANCEL)

    # --- writing ------------------------------------------------------------------------

    def write(self) -> None:
        self.pending = False
        if self.closed:
            return
        if self.write_paused:
            if self.closing:
                self._linger()
            return
        session = self.session
        try:
            data = session.data_to_send()
        except H2Error:
            log.exception("http2 session failed")
            self._close()
            return
        if data:
            self.transport.write(data)
        events = session.pop_events()
        if events:
            self._handle(events)
            if session.want_write and not self.write_paused:
                self.write()
                return
        if (self.closing or self.draining) and session.closed:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def _linger(self) -> None:
        """Closing a connection whose client does not read (a flood): the last frames go into
        the socket's buffer whatever its level (nghttp2 bounded them), then the socket closes,
        and is aborted if the client still reads nothing."""
        try:
            data = self.session.data_to_send()
        except H2Error:
            data = b""
        if data:
            self.transport.write(data)
        transport = self.transport
        self._close()
        self.loop.call_later(LINGER_S, transport.abort)

    # --- timers and shutdown (driven by the room) --------------------------------------------

    def tick(self, interval: float) -> None:
        """Idle connections (no stream open) close after the idle timeout; each exchange's
        clock for its upstream runs (response head and body timeouts). gRPC calls are left
        to their own deadlines: a stream may rightly stay silent for as long as it likes."""
        if self.closed:
            return
        streams = self.streams
        if streams:
            self.idle_ticks = 0
            limits = self.room.limits
            for stream in list(streams.values()):
                x = stream.x
                if x is not None and x.up is not None and not x.grpc:
                    x.tick(interval, limits)
            return
        self.idle_ticks += 1
        if self.draining or self.idle_ticks * interval >= self.room.limits.idle_timeout_s:
            self._goaway()

    def drain(self) -> None:
        """Graceful shutdown: no new streams; those open finish; then the connection closes."""
        if self.draining or self.closed:
            return
        self.draining = True
        if not self.streams:
            self._goaway()
        else:
            self.session.shutdown_notice()
            self.write()

    def _goaway(self) -> None:
        if self.closed:
            return
        self.closing = True
        self.session.goaway(NO_ERROR)
        self.write()
        if not self.streams:
            self._close()


__all__ = ["H2Server", "InStream", "ORIG_PROTO"]
