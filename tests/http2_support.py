"""Helpers for the HTTP/2 codec tests: two sessions wired back to back in memory, a raw
attacker-side client built on the pure-Python h2 library (its HPACK encoder keeps header
blocks valid while frames are crafted by hand with hyperframe), and a frame parser to check
what the codec put on the wire."""
from __future__ import annotations

import h2.config
import h2.connection
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
)

from proxy.http2 import H2Config, H2Session

GET = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"svc.test")]
OK = [(b":status", b"200")]


def request(method: bytes = b"GET", path: bytes = b"/", extra=()) -> list[tuple[bytes, bytes]]:
    return [(b":method", method), (b":path", path), (b":scheme", b"http"),
            (b":authority", b"svc.test"), *extra]


class Pair:
    """A client and a server H2Session exchanging bytes in memory. `pump()` moves bytes both
    ways until neither side has anything to send, and collects each side's events."""

    def __init__(self, client_config: H2Config | None = None, server_config: H2Config | None = None,
                 clock=None):
        kw = {} if clock is None else {"clock": clock}
        self.client = H2Session(client=True, **({"config": client_config} if client_config else {}), **kw)
        self.server = H2Session(client=False, **({"config": server_config} if server_config else {}), **kw)
        self.client_events: list = []
        self.server_events: list = []
        self.bytes_to_server = 0
        self.pump()

    def pump(self, rounds: int = 1000) -> tuple[list, list]:
        """Exchange until quiet; return the events (client's, server's) seen in this call."""
        ce, se = [], []
        for _ in range(rounds):
            a = self.client.data_to_send()
            ce += self.client.pop_events()
            if a:
                self.bytes_to_server += len(a)
                se += self.server.feed(a)
            b = self.server.data_to_send()
            se += self.server.pop_events()
            if b:
                ce += self.client.feed(b)
            if not a and not b:
                break
        else:
            raise AssertionError("sessions kept talking after 1000 rounds")
        self.client_events += ce
        self.server_events += se
        return ce, se


def of(events, cls, stream_id=None):
    return [e for e in events if isinstance(e, cls) and (stream_id is None or e.stream_id == stream_id)]


def frames(data: bytes) -> list:
    """The HTTP/2 frames in `data` (no connection preface)."""
    out = []
    view = memoryview(data)
    while len(view) >= 9:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9:9 + length])
        out.append(frame)
        view = view[9 + length:]
    assert not len(view), f"{len(view)} trailing bytes"
    return out


def goaway_of(data: bytes) -> GoAwayFrame | None:
    found = [f for f in frames(data) if isinstance(f, GoAwayFrame)]
    return found[-1] if found else None


def resets_of(data: bytes) -> dict[int, int]:
    """{stream id: error code} of the RST_STREAM frames in `data`."""
    return {f.stream_id: f.error_code for f in frames(data) if isinstance(f, RstStreamFrame)}


# --- raw frames, for what a well-behaved library would never send ----------------------------


def headers_frame(block: bytes, stream_id: int, end_stream: bool = True, end_headers: bool = True) -> bytes:
    f = HeadersFrame(stream_id)
    f.data = block
    if end_headers:
        f.flags.add("END_HEADERS")
    if end_stream:
        f.flags.add("END_STREAM")
    return f.serialize()


def data_frame(stream_id: int, data: bytes, end_stream: bool = False) -> bytes:
    f = DataFrame(stream_id)
    f.data = data
    if end_stream:
        f.flags.add("END_STREAM")
    return f.serialize()


def continuation_frame(stream_id: int, block: bytes, end_headers: bool = False) -> bytes:
    f = ContinuationFrame(stream_id)
    f.data = block
    if end_headers:
        f.flags.add("END_HEADERS")
    return f.serialize()


class RawClient:
    """An HTTP/2 client for attacks: the h2 library does the handshake and HPACK, frames are
    also written by hand. Its output goes to an H2Session server with `send()`."""

    def __init__(self, server: H2Session, ack_settings: bool = True):
        self.server = server
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.events: list = []
        self.send_pending()
        if ack_settings:
            self.conn.receive_data(server.data_to_send())
            self.send_pending()
            server.data_to_send()

    def send_pending(self) -> list:
        return self.send(self.conn.data_to_send())

    def send(self, data: bytes) -> list:
        events = self.server.feed(data)
        self.events += events
        return events

    def headers_frame(self, stream_id: int, headers=GET, end_stream: bool = True,
                      end_headers: bool = True) -> bytes:
        return headers_frame(self.conn.encoder.encode(headers), stream_id, end_stream, end_headers)

    data_frame = staticmethod(data_frame)
    continuation_frame = staticmethod(continuation_frame)


def well_behaved_get(server_config: H2Config | None = None) -> bytes:
    """A GET answered with a 1 KiB body on a fresh client/server pair: what every attack test
    checks still works beside the attacked connection."""
    pair = Pair(server_config=server_config)
    sid = pair.client.send_request(GET)
    pair.pump()
    pair.server.send_response(sid, OK)
    pair.server.send_data(sid, b"k" * 1024, end_stream=True)
    ce, _ = pair.pump()
    from proxy.http2 import DataReceived, StreamClosed
    assert of(ce, StreamClosed, sid)
    return b"".join(e.data for e in of(ce, DataReceived, sid))


class Bystander:
    """A well-behaved connection with a request in flight while an attack runs on another
    connection of the same process; `finish()` completes it and checks nothing leaked into it."""

    def __init__(self):
        from proxy.http2 import RequestReceived

        self.pair = Pair()
        self.sid = self.pair.client.send_request(request(b"POST", b"/bystander"), end_stream=False)
        self.pair.client.send_data(self.sid, b"a" * 1000)
        _, se = self.pair.pump()
        assert of(se, RequestReceived, self.sid)

    def finish(self) -> None:
        from proxy.http2 import DataReceived, PeerMisbehaved, StreamClosed

        pair, sid = self.pair, self.sid
        pair.client.send_data(sid, b"b" * 1000, end_stream=True)
        pair.pump()
        assert b"".join(e.data for e in of(pair.server_events, DataReceived, sid)) == b"a" * 1000 + b"b" * 1000
        pair.server.send_response(sid, OK)
        pair.server.send_data(sid, b"r" * 4096, end_stream=True)
        ce, _ = pair.pump()
        assert b"".join(e.data for e in of(ce, DataReceived, sid)) == b"r" * 4096
        assert of(ce, StreamClosed, sid)
        assert not [e for e in pair.client_events + pair.server_events if isinstance(e, PeerMisbehaved)]
