"""A tiny HTTP/2 relay over real sockets, built only from the codec: each accepted h2c
connection is parsed by an H2Session server, and every stream is re-emitted on an H2Session
client connection to the upstream; responses, trailers and resets come back the same way.

It exists to prove, with real gRPC peers on both sides, that the codec's API carries what the
proxy's HTTP/2 adapter needs: headers, streaming bodies both ways, trailers (grpc-status),
resets, and flow control with backpressure (a byte is consumed on one side only once the other
side's queue accepted it, so the relay never holds more than the windows it granted).
It is not the adapter: no routing, no policy, no pooling.
"""
from __future__ import annotations

import asyncio

from proxy.http2 import (
    DEFAULT_CONFIG,
    DataReceived,
    H2Config,
    H2Session,
    RequestReceived,
    ResponseReceived,
    StreamClosed,
    StreamReset,
    StreamWritable,
    TrailersReceived,
)
from proxy.http2.session import CANCEL


class _Side:
    """One connection: its session, its socket writer, and the peer side it forwards to."""

    def __init__(self, session: H2Session, writer: asyncio.StreamWriter):
        self.session = session
        self.writer = writer
        self.other: _Side | None = None
        self.to_other: dict[int, int] = {}      # this side's stream id -> the other side's
        self.owed: dict[int, int] = {}          # our stream -> bytes received, not yet consumed
        self.max_buffered = 0                   # most bytes queued on any stream at once
        self.held_back = 0                      # times a peer was held back by not consuming


class _Connection:
    def __init__(self, down: _Side, up: _Side):
        self.down, self.up = down, up
        down.other, up.other = up, down

    def handle(self, side: _Side, events: list) -> None:
        other = side.other
        for e in events:
            cls = e.__class__
            if cls is RequestReceived:
                up_sid = other.session.send_request(e.headers, e.end_stream)
                side.to_other[e.stream_id] = up_sid
                other.to_other[up_sid] = e.stream_id
            elif cls is ResponseReceived:
                other.session.send_response(side.to_other[e.stream_id], e.headers, e.end_stream)
            elif cls is DataReceived:
                target = side.to_other.get(e.stream_id)
                if target is None:
                    continue
                more = other.session.send_data(target, e.data, e.end_stream)
                other.max_buffered = max(other.max_buffered, other.session.send_buffered(target))
                if more:
                    side.session.consume(e.stream_id, len(e.data))
                else:  # hold the peer back until the other side drains (StreamWritable)
                    side.owed[e.stream_id] = side.owed.get(e.stream_id, 0) + len(e.data)
                    side.held_back += 1
            elif cls is TrailersReceived:
                target = side.to_other.get(e.stream_id)
                if target is not None:
                    other.session.send_trailers(target, e.headers)
            elif cls is StreamWritable:
                source = side.to_other.get(e.stream_id)
                owed = other.owed.pop(source, 0) if source is not None else 0
                if owed:
                    other.session.consume(source, owed)
            elif cls is StreamReset:
                target = side.to_other.pop(e.stream_id, None)
                if target is not None:
                    other.to_other.pop(target, None)
                    other.session.reset(target, e.error_code or CANCEL)
            elif cls is StreamClosed:
                target = side.to_other.pop(e.stream_id, None)
                if target is not None and not other.session.stream_is_open(target):
                    other.to_other.pop(target, None)

    def flush(self) -> None:
        """Write what both sessions have to send, handling what sending caused, until quiet."""
        while True:
            moved = False
            for side in (self.down, self.up):
                data = side.session.data_to_send()
                if data:
                    side.writer.write(data)
                    moved = True
                events = side.session.pop_events()
                if events:
                    self.handle(side, events)
                    moved = True
            if not moved:
                return


class H2Relay:
    def __init__(self, upstream: tuple[str, int], config: H2Config = DEFAULT_CONFIG):
        self.upstream = upstream
        self.config = config
        self.server: asyncio.AbstractServer | None = None
        self.connections: list[_Connection] = []
        self.port = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in self.connections:
                conn.down.writer.close()
                conn.up.writer.close()

    async def _accept(self, down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        conn = _Connection(_Side(H2Session(client=False, config=self.config), down_writer),
                           _Side(H2Session(client=True, config=self.config), up_writer))
        self.connections.append(conn)
        conn.flush()  # both SETTINGS
        await asyncio.gather(self._pump(conn, conn.down, down_reader),
                             self._pump(conn, conn.up, up_reader), return_exceptions=True)
        down_writer.close()
        up_writer.close()

    async def _pump(self, conn: _Connection, side: _Side, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                side.other.session.terminate()
                conn.flush()
                return
            conn.handle(side, side.session.feed(data))
            conn.flush()
            await side.writer.drain()
            if side.session.closed:
                return
