"""The real HTTP/1 protocol objects (proxy/http1/server.py, client.py) driven with bytes,
without sockets: a transport that records what is written, and a room that answers each
request the way the fuzz target asks. These stand in for the event loop's transports and
for the inbound/outbound rooms only; the parsing, limits and framing are the real code's.
"""

from __future__ import annotations

import asyncio

import httptools

from proxy.http1.server import Http1Server, Limits, Request
from proxy.metrics import ProxyMetrics
from tulle.metrics import Registry

_LOOP = asyncio.new_event_loop()
asyncio.set_event_loop(_LOOP)
METRICS = ProxyMetrics(Registry())
LIMITS = Limits(max_headers=100, max_head_bytes=65536, header_timeout_s=10.0, idle_timeout_s=300.0)
STRIP = frozenset({b"tulle-client-id"})


class Transport:
    """What an asyncio transport offers the protocol classes; records writes and state."""

    def __init__(self):
        self.written: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name, default=None):
        return default

    def output(self) -> bytes:
        return b"".join(self.written)


class Room:
    """Collects the requests the server dispatches; `answer` decides what happens to each."""

    direction = "inbound"

    def __init__(self, answer=None):
        self.default_labels = METRICS.labels("inbound")
        self.conns: set = set()
        self.requests: list[Request] = []
        self.answer = answer
        self.errors: list[str] = []

    def dispatch(self, server: Http1Server, req: Request) -> None:
        self.requests.append(req)
        req.labels = self.default_labels
        self.default_labels.requests.value += 1
        if self.answer is not None:
            self.answer(server, req)

    def http_error(self, error: str) -> None:
        self.errors.append(error)

    def answered(self, req, status, now, ok=True) -> None:
        req.ep = None

    def abandoned(self, req) -> None:
        req.ep = None

    def track(self, s) -> None:
        pass

    def attempt_answered(self, *args) -> bool:
        return False

    def attempt_lost(self, *args) -> bool:
        return False


class UpstreamPool:
    """What an Http1Client asks of its pool: the limits, and somewhere to go when done."""

    class pools:
        limits = LIMITS

    def give(self, c):
        pass

    def discard(self, c):
        pass


def new_server(answer=None) -> tuple[Http1Server, Room, Transport]:
    room = Room(answer)
    server = Http1Server(room, LIMITS, STRIP, conn=None)
    transport = Transport()
    server.connection_made(transport)
    return server, room, transport


def feed_split(proto, data: bytes, cuts: list[int]) -> None:
    """data_received with `data` cut at the given offsets (as the network may split it)."""
    pos = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(data))):
        proto.data_received(data[pos:cut])
        pos = cut
    if pos < len(data):
        proto.data_received(data[pos:])


class ResponseReader:
    """A strict reading of what the proxy wrote to its client: a sequence of HTTP/1.1
    responses as httptools sees them (status, headers, body, whether complete)."""

    def __init__(self, head_request: bool = False):
        self.responses: list[dict] = []
        self.parser = httptools.HttpResponseParser(self)
        self._cur: dict | None = None

    def on_message_begin(self):
        self._cur = {"headers": [], "body": b"", "complete": False}
        self.responses.append(self._cur)

    def on_header(self, name, value):
        self._cur["headers"].append((name, value))

    def on_headers_complete(self):
        self._cur["status"] = self.parser.get_status_code()

    def on_body(self, body):
        self._cur["body"] += body

    def on_message_complete(self):
        self._cur["complete"] = True

    def feed(self, data: bytes) -> None:
        self.parser.feed_data(data)


def split_points(data: bytes) -> tuple[bytes, list[int]]:
    """The first byte of the input chooses up to 3 cut points in the rest (so that
    coverage reaches the code paths of heads and bodies split across reads)."""
    if not data:
        return b"", []
    n = data[0] % 4
    rest = data[1:]
    if n == 0 or len(rest) < 2:
        return rest, []
    cuts = [(rest[i] * 31 + i * 7) % len(rest) for i in range(min(n, len(rest)))]
    return rest, cuts
