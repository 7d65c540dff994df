"""The real HTTP/1 protocol objects (proxy/http1/server.py, client.py) and the request core
between them (proxy/exchange.py) driven with bytes, without sockets: a transport that
records what is written, and a room that answers each exchange the way the fuzz target
asks. These stand in for the event loop's transports and for the inbound/outbound rooms
only; the parsing, limits, framing and every decision about a request are the real code's.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Optional

import httptools

from proxy.exchange import Exchange
from proxy.http1.server import Http1Server
from proxy.limits import Limits
from proxy.metrics import ProxyMetrics
from tulle.metrics import Registry

# The server takes its clock from the current loop, and a response read into nothing
# (proxy/http1/client.py _Dropped) sets a timer on it; nothing here ever runs the loop.
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
    """The least a direction does (proxy.http1.server.Room, proxy.exchange.Room): it counts
    each request under its labels, as the real rooms do before answering, then `route`
    decides what happens to it (fail it, attach an upstream, or nothing yet). It keeps what
    it was given for the target to check."""

    direction = "inbound"

    def __init__(self, route: Optional[Callable[[Exchange], None]] = None, absolute_form: bool = False):
        self.default_labels = METRICS.labels(self.direction)
        # The outbound side routes absolute-form targets (`GET http://host/path`) by their
        # authority; the inbound side passes the target on as it is. Both are the server's.
        self.absolute_form = absolute_form
        self.conns: set = set()
        self.exchanges: list[Exchange] = []
        # Dispatched by a server that had closed the connection already; dispatched once it
        # had stopped reading (refused) with the request's body unfinished: it never ends.
        self.after_close: list[Exchange] = []
        self.unending: list[Exchange] = []
        self.route = route
        self.errors: list[str] = []

    def dispatch(self, x: Exchange) -> None:
        self.exchanges.append(x)
        server = x.down.server
        if server.closed:
            self.after_close.append(x)
        elif server.refused and not x.body_done:
            self.unending.append(x)
        x.count_request(self.default_labels)
        self.send(x)

    def send(self, x: Exchange) -> None:
        # Also how the exchange sends a request again (a resend or a retry): the target's
        # `route` sees it once more.
        if self.route is not None:
            self.route(x)

    def http_error(self, error: str) -> None:
        self.errors.append(error)

    def track(self, s) -> None:
        pass  # a tunnel (upgrade, CONNECT): the opaque side is not fuzzed here


class UpstreamPool:
    """What an Http1Client asks of its pool (proxy/pools.py Pool): its directions' limits,
    and somewhere to go when done (nowhere: each input gets a new client)."""

    class pools:
        limits = LIMITS

    def give(self, c):
        pass

    def discard(self, c):
        pass


def new_server(route=None, absolute_form: bool = False) -> tuple[Http1Server, Room, Transport]:
    room = Room(route, absolute_form)
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

    def __init__(self):
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
