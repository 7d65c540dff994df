"""Publishing compiled state to KV: the KV writer, and one elected writer among replicas.

DESIGN.md: "sources -> compile (pure) -> KV writer". Destination and policy both run
that pipeline; `ElectedPublisher` is the part they share.

The KV writer publishes the desired state, only what changed, bursts coalesced.

It keeps two maps of encoded values: `desired` (what the compiled state says) and
`written` (what KV holds, read back from KV when this replica becomes the writer and
kept up to date by its own writes). A key is written only when the two differ, so a
no-op edit, a resync, or a takeover by another replica causes no write at all.

Pacing: the first change after a quiet period is written at once; while changes keep
coming, at most one batch goes out per `min_interval` (25 ms by default), and each
batch carries the latest value of every key that changed meanwhile. A lone change is
never delayed; a rollout of a hundred pods becomes a handful of batches.

Only the leader writes (`is_leader`, checked before every chunk of a batch); standbys
keep compiling, so on takeover they write the full current state at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Optional

import nats.errors
import nats.js.errors

from tulle.bus import Bus, BusError
from tulle.codec import encode
from tulle.sources.base import ResourceEvent, Source
from tulle.leader import LeaderElection, raise_if_cancelled
from tulle.log import get_logger
from tulle.metrics import REGISTRY, Registry

Key = tuple[str, str]  # (bucket, key)
TakeChanges = Callable[[], dict[Key, Optional[object]]]
# Called after each successful write with (key, old bytes or None, new bytes or None).
OnWritten = Callable[[Key, Optional[bytes], Optional[bytes]], None]


class KVWriter:
    def __init__(self, bus: Bus, buckets: tuple[str, ...], take_changes: TakeChanges, *,
                 is_leader: Callable[[], bool], can_write: Callable[[], bool] = lambda: True,
                 on_written: OnWritten | None = None, min_interval: float = 0.025, concurrency: int = 256,
                 registry: Registry = REGISTRY, metric_prefix: str = "tulle_destination",
                 clock: Callable[[], float] = time.monotonic):
        self.bus = bus
        self.buckets = buckets
        self.take_changes = take_changes
        self.is_leader = is_leader
        self.can_write = can_write  # e.g. "the source has synced": never prune from a partial view
        self.on_written = on_written
        self.min_interval = min_interval
        self.concurrency = concurrency
        self.clock = clock
        self.desired: dict[Key, bytes] = {}
        self.written: dict[Key, bytes] | None = None  # None: unknown, read KV before writing
        self.pending: set[Key] = set()
        self.caught_up = asyncio.Event()  # set while KV holds the desired state (as leader)
        self._wake = asyncio.Event()
        self.log = get_logger()
        self.m_writes = registry.counter(f"{metric_prefix}_writes_total", "KV writes (put or delete)", ("bucket", "op"))
        self.m_batches = registry.counter(f"{metric_prefix}_batches_total",
                                          "Write batches; changes arriving close together share one")
        self.m_errors = registry.counter(f"{metric_prefix}_write_errors_total", "KV writes that failed (retried)")
        self.m_keys = registry.gauge(f"{metric_prefix}_keys", "Keys in the desired state", ("bucket",))
        for b in buckets:
            self.m_keys.labels(b).set_function(lambda b=b: sum(1 for k in self.desired if k[0] == b))

    # --- signals from the outside ------------------------------------------------------------

    def notify(self) -> None:
        """Something may have changed: compile and write soon."""
        self._wake.set()

    def forget_written(self) -> None:
        """What KV holds is unknown again (new leadership, reconnect): read it before writing."""
        self.written = None
        self.caught_up.clear()
        self._wake.set()

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        last_batch = float("-inf")
        while True:
            await self._wake.wait()
            raise_if_cancelled()
            wait = last_batch + self.min_interval - self.clock()
            if wait > 0:
                await asyncio.sleep(wait)  # in a burst: let more changes join this batch
            self._wake.clear()
            self.absorb()
            if not (self.can_write() and self.is_leader()):
                continue
            try:
                if self.written is None:
                    await self._read_back()
                if await self.flush():
                    last_batch = self.clock()
            except (BusError, nats.errors.Error, asyncio.TimeoutError, OSError) as e:
                self.log.warning("writing to KV failed; retrying", error=str(e) or type(e).__name__)
                await asyncio.sleep(0.5)
                self._wake.set()

    def absorb(self) -> None:
        """Take the compiled changes into `desired` (standbys do this too)."""
        for key, msg in self.take_changes().items():
            if msg is None:
                self.desired.pop(key, None)
            else:
                self.desired[key] = encode(msg)
            self.pending.add(key)

    async def _read_back(self) -> None:
        """Read every key of our buckets, so that only real differences get written and
        keys that correspond to nothing any more get deleted."""
        written: dict[Key, bytes] = {}
        for bucket in self.buckets:
            kv = await self.bus.kv(bucket)
            watcher = await kv.watch(">", ignore_deletes=True)
            try:
                while True:
                    entry = await watcher.updates(timeout=10)
                    if entry is None:
                        break
                    if entry.operation is None and entry.value is not None:
                        written[(bucket, entry.key)] = entry.value
            finally:
                await watcher.stop()
        self.written = written
        self.pending = set(self.desired) | set(written)
        self.log.info("read back the published state", keys=len(written), desired=len(self.desired))

    async def flush(self) -> int:
        """Write every pending difference; the number of writes done."""
        assert self.written is not None
        ops: list[tuple[Key, Optional[bytes]]] = []
        for key in sorted(self.pending):
            want = self.desired.get(key)
            if want == self.written.get(key):
                self.pending.discard(key)
            else:
                ops.append((key, want))
        if not ops:
            self.caught_up.set()
            return 0
        self.m_batches.inc()
        done = 0
        for i in range(0, len(ops), self.concurrency):
            if not self.is_leader():
                return done  # lost the lease: not one more write
            chunk = ops[i:i + self.concurrency]
            results = await asyncio.gather(*(self._write(key, value) for key, value in chunk), return_exceptions=True)
            failed = None
            for (key, value), result in zip(chunk, results):
                if isinstance(result, BaseException):
                    self.m_errors.inc()
                    failed = result
                    continue
                old = self.written.get(key) if self.written is not None else None
                if self.written is not None:
                    if value is None:
                        self.written.pop(key, None)
                    else:
                        self.written[key] = value
                self.pending.discard(key)
                self.m_writes.labels(key[0], "delete" if value is None else "put").inc()
                done += 1
                if self.on_written is not None:
                    try:
                        self.on_written(key, old, value)
                    except Exception:  # a listener's bug must never stop the writer
                        self.log.exception("write listener failed", bucket=key[0], key=key[1])
            if failed is not None:
                raise failed if isinstance(failed, Exception) else BusError(repr(failed))
        if not self.pending:
            self.caught_up.set()
        return done

    async def _write(self, key: Key, value: Optional[bytes]) -> None:
        bucket, name = key
        kv = await self.bus.kv(bucket)
        if value is None:
            await kv.delete(name)
        else:
            await kv.put(name, value)


class ElectedPublisher:
    """A source's events -> the caller's compiled state -> KV, written by one replica.

    `apply(event)` feeds the caller's state and says whether it changed; the writer then
    asks `take_changes()` for what to write. Only a replica that has seen the whole
    source (`synced`) competes for the lease, because the winner must write at once.
    A restarted NATS may have lost what was written, so the writer reads KV back on
    every reconnect and every change of leadership.
    """

    def __init__(self, bus: Bus, *, lease: str, buckets: tuple[str, ...], take_changes: TakeChanges,
                 can_write: Callable[[], bool], **writer_options):
        self.election = LeaderElection(bus, lease)
        self.writer = KVWriter(bus, buckets, take_changes, is_leader=self.election.is_leader,
                               can_write=can_write, **writer_options)
        self.election.on_elected = self.writer.forget_written
        self.election.on_lost = self.writer.forget_written
        bus.on_connection_change(lambda up: up and self.writer.forget_written())
        self.synced = asyncio.Event()

    def ready(self) -> bool:
        """The writer: once KV holds the state. A standby: once it has the state compiled
        and has seen that another replica holds the lease."""
        if not self.synced.is_set():
            return False
        return self.writer.caught_up.is_set() if self.election.is_leader() else self.election.held_elsewhere

    def is_standby(self) -> bool:
        return self.election.held_elsewhere and not self.election.is_leader()

    async def run(self, source: Source, apply: Callable[[ResourceEvent], bool],
                  on_synced: Callable[[], None] = lambda: None) -> None:
        async def consume() -> None:
            async for ev in source.events():
                if apply(ev):
                    self.writer.notify()
                if ev.type == "synced" and not self.synced.is_set():
                    self.synced.set()
                    on_synced()

        async def compete() -> None:
            await self.synced.wait()
            await self.election.run()

        tasks = [asyncio.ensure_future(t) for t in (consume(), self.writer.run(), compete())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.election.release()
            if hasattr(source, "aclose"):
                await source.aclose()  # the Kubernetes source's watch threads
