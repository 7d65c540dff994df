"""Opaque forwarding: two transports joined byte for byte, with flow control and counters.

`splice(a, b, ...)` takes over two connected transports (their current protocols are
replaced) and copies bytes both ways until both sides are done. A half-close (EOF) is
passed on where the other side can signal it (plain TCP); over TLS it closes that side.
Byte counts land in the metrics when the pair closes, as Linkerd does. `idle_ticks` counts
the proxy's sweeps since a byte last moved either way (the opaque idle timeout).
"""

from __future__ import annotations

import asyncio
from typing import Callable, Optional

from proxy.metrics import Labels


class _End(asyncio.Protocol):
    """One side of a spliced pair. Data read here is written to the other side."""

    __slots__ = ("transport", "peer", "read", "eof", "closed", "pair")

    def __init__(self, pair: "Splice"):
        self.pair = pair
        self.transport: asyncio.Transport | None = None
        self.peer: _End | None = None
        self.read = 0
        self.eof = False
        self.closed = False

    def connection_made(self, transport):  # only for ends created by connecting
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.read += len(data)
        pair = self.pair
        pair.idle_ticks = 0
        if self is pair.client and (pair.guard is not None or pair.diverted):
            if pair.diverted:  # the guard took the connection over: keep what follows for it
                pair._held += data
                return
            data = pair._guarded(data)
            if not data:
                return
        elif pair.diverted:
            return  # the client's connection is being taken over: the server's bytes are not for it
        elif self is pair.server and pair.guard is not None and (pair._server_held or _h2_settings(data)):
            # An HTTP/2 server's first frame, before the guard judged the client: held, so
            # that a connection taken over as HTTP/2 never saw the app's own SETTINGS.
            pair._server_held += data
            return
        peer = self.peer
        if not peer.closed:
            peer.transport.write(data)

    def eof_received(self):
        self.eof = True
        peer = self.peer
        if peer.eof or peer.closed:
            self.pair.close()
            return False
        if peer.transport.can_write_eof():
            try:
                peer.transport.write_eof()
            except (OSError, RuntimeError):
                self.pair.close()
                return False
            # Keep our side open for writing what the peer still sends, if we can.
            return self.transport.can_write_eof()
        peer.transport.close()  # TLS cannot half-close: finish the other side gracefully
        return False

    def pause_writing(self) -> None:
        if not self.peer.closed:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.closed:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and not peer.closed:
            if exc is not None:
                peer.transport.abort()  # a reset on one side resets the other
            else:
                peer.transport.close()  # flushes what is buffered first
        self.pair._end_closed()


class Splice:
    """A pair of joined transports; `client` is the side that connected to the proxy."""

    __slots__ = ("client", "server", "labels", "on_close", "_open", "guard", "_held", "diverted", "_server_held",
                 "idle_ticks")

    def __init__(self, labels: Labels | None, on_close: Callable[["Splice"], None] | None = None,
                 guard: Callable[["Splice", bytes], Optional[bool]] | None = None):
        self.client = _End(self)
        self.server = _End(self)
        self.client.peer = self.server
        self.server.peer = self.client
        self.labels = labels
        self.on_close = on_close
        self._open = 2
        # Judges the client's first bytes before any reaches the server: None = need more,
        # True = pass them (and everything after) on, False = the guard took the connection
        # over (refused it, or handed it elsewhere with `release_client`).
        self.guard = guard
        self._held = b""
        self.diverted = False  # the guard said False: client bytes are held for whoever takes over
        self._server_held = b""
        self.idle_ticks = 0

    def _guarded(self, data: bytes) -> bytes:
        held = self._held + data
        verdict = self.guard(self, held)
        if verdict is None:
            self._held = held
            return b""
        self.guard = None
        self._held = b""
        server_held, self._server_held = self._server_held, b""
        if verdict:
            if server_held and not self.client.closed:
                self.client.transport.write(server_held)
            return held
        self.diverted = True
        return b""

    def release_client(self) -> tuple[asyncio.Transport, bytes]:
        """Stop splicing and give the client's transport back, with the bytes it sent since
        the guard's verdict (the server side is aborted before anything reached it)."""
        transport = self.client.transport
        self.client.closed = True  # so the server side's closing leaves it alone
        self.guard = None
        tail, self._held = self._held, b""
        self.diverted = False
        self._end_closed()
        if not self.server.closed and self.server.transport is not None:
            self.server.transport.abort()
        return transport, tail

    def attach(self, client_transport: asyncio.Transport, server_transport: asyncio.Transport,
               client_pending: bytes = b"", server_pending: bytes = b"") -> None:
        """Join two transports; `*_pending` are bytes already read from that side, to pass on."""
        self.client.transport = client_transport
        self.server.transport = server_transport
        client_transport.set_protocol(self.client)
        server_transport.set_protocol(self.server)
        if self.labels is not None:
            self.labels.tcp_opened()
        if client_pending:
            self.client.data_received(client_pending)
        if server_pending:
            self.server.data_received(server_pending)
        # Whoever was paused while the pair was being set up may read again.
        for t in (client_transport, server_transport):
            try:
                t.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def close(self) -> None:
        for end in (self.client, self.server):
            if not end.closed and end.transport is not None:
                end.transport.close()

    def abort(self) -> None:
        for end in (self.client, self.server):
            if not end.closed and end.transport is not None:
                end.transport.abort()

    def _end_closed(self) -> None:
        self._open -= 1
        if self._open == 0:
            if self.labels is not None:
                # From the client's point of view: read from it, written to it.
                self.labels.tcp_closed(self.client.read, self.server.read)
            if self.on_close is not None:
                self.on_close(self)


def _h2_settings(data: bytes) -> bool:
    """Does `data` start like an HTTP/2 server's first frame (SETTINGS on stream 0)?"""
    return len(data) >= 9 and data[3] == 0x04 and data[4] == 0 and data[5:9] == b"\0\0\0\0"


def splice(client: asyncio.Transport, server: asyncio.Transport, labels: Labels | None = None, *,
           client_pending: bytes = b"", server_pending: bytes = b"",
           on_close: Callable[[Splice], None] | None = None,
           guard: Callable[[Splice, bytes], Optional[bool]] | None = None) -> Splice:
    s = Splice(labels, on_close, guard)
    s.attach(client, server, client_pending, server_pending)
    return s
