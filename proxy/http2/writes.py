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
