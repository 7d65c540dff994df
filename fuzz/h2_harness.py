"""Drive an H2Session (proxy/http2/session.py) as the HTTP/2 wire adapter does: feed bytes,
answer what arrives, give flow-control credit back, pull bytes to send — and check the
event contract of proxy/http2/events.py along the way."""

from __future__ import annotations

from proxy.http2 import H2Session
from proxy.http2 import events as ev
from proxy.http2.session import H2Error

TERMINAL = (ev.StreamClosed, ev.StreamReset)
GET = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"svc.test")]
POST = [(b":method", b"POST"), (b":path", b"/up"), (b":scheme", b"http"), (b":authority", b"svc.test")]
OK = [(b":status", b"200"), (b"content-type", b"text/plain")]


class Driver:
    def __init__(self, session: H2Session, server: bool):
        self.s = session
        self.server = server
        self.ended: set[int] = set()
        self.known: set[int] = set()

    def check(self, events: list) -> None:
        for e in events:
            assert type(e).__module__ == ev.__name__, e
            if isinstance(e, ev.PeerMisbehaved):
                assert e.reason in ev.REASONS, e.reason
                continue
            if isinstance(e, ev.HeaderListTooLarge):
                assert e.reason in ev.REASONS
            sid = getattr(e, "stream_id", None)
            if sid is None or sid == 0:
                continue
            assert sid not in self.ended, ("event after the stream's end", e)
            if isinstance(e, TERMINAL):
                self.ended.add(sid)
            else:
                self.known.add(sid)

    def react(self, events: list) -> None:
        """What an adapter does: answer requests, consume data, answer 431s."""
        s = self.s
        for e in events:
            if isinstance(e, ev.DataReceived):
                if e.data and s.stream_is_open(e.stream_id):
                    s.consume(e.stream_id, len(e.data))
            elif self.server and isinstance(e, (ev.RequestReceived, ev.HeaderListTooLarge)):
                if e.stream_id in self.ended or not s.stream_is_open(e.stream_id):
                    continue
                status = [(b":status", b"431")] if isinstance(e, ev.HeaderListTooLarge) else OK
                try:
                    s.send_response(e.stream_id, status, end_stream=False)
                    s.send_data(e.stream_id, b"x" * 100, end_stream=True)
                except H2Error:
                    pass  # the stream went away meanwhile (reset by the peer in the same read)

    def feed(self, data: bytes) -> None:
        s = self.s
        events = s.feed(data)
        self.check(events)
        self.react(events)
        for _ in range(8):
            out = s.data_to_send()
            more = s.pop_events()
            self.check(more)
            self.react(more)
            if not out and not more:
                break
