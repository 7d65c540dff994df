"""How both HTTP/2 connection sides write: everything a read event caused goes out in one
write, by the flush that ends the event; what is queued outside a read event (a timer, the
other side of the proxy) goes out on the loop's next turn; nothing is pulled from the session
while the socket is paused. The side supplies `loop` and `write()` (the session's bytes to
the socket, which returns at once while `write_paused`)."""

from __future__ import annotations


class BatchedWrites:
    __slots__ = ()

    pending: bool  # the session may hold bytes to write
    flush_scheduled: bool
    write_paused: bool

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.write()

    def dirty(self) -> None:
        """Something waits in the session: written by the flush that ends the current read
        event (the usual case: one write for everything it caused), or else on the loop's
        next turn."""
        self.pending = True
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self.flush_scheduled = False
        if self.pending:
            self.flush()

    def flush(self) -> None:
        """Write what the session holds, if anything was queued since the last write (the
        other side's adapters call this once per read event, for every stream they touched)."""
        if self.pending:
            self.write()


class StreamWindow:
    """A stream's receive window as backpressure: DATA is given back to the peer's window
    (`consume`) only once the other side of the proxy took it; while reading is stopped the
    bytes received are owed, and given back when it resumes."""

    __slots__ = ("conn", "id", "owed", "paused")

    def __init__(self, conn, stream_id: int):
        self.conn = conn
        self.id = stream_id
        self.owed = 0  # received bytes not yet given back to the peer's window
        self.paused = False

    def stop_reading(self, *_) -> None:
        self.paused = True

    def read_again(self, *_) -> None:
        self.paused = False
        owed = self.owed
        if owed:
            self.owed = 0
            conn = self.conn
            conn.session.consume(self.id, owed)
            conn.dirty()
