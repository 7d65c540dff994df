"""One writer among replicas: a lease on a key of the `tulle-leases` KV bucket.

- Taking the lease is a KV `create`, which fails while anyone holds it.
- The holder renews it with a compare-and-set `update(last=revision)` every `renew_every`
  seconds, well inside the bucket's TTL (5 s): an entry not renewed expires, and a standby
  that polls with `create` takes it over within `ttl + poll_every`.
- `is_leader()` is true only while the last renewal is fresh: it counts from the moment the
  renewal was *sent* (before the server stamped it) and stops `margin` seconds short of the
  TTL, so a holder that stalls stops writing before anyone else can start. Writers check
  it before every batch.
- A clean stop deletes the key (compare-and-set on our revision), so a standby takes over
  on its next poll instead of waiting for the TTL.

Used by the destination and policy services (DESIGN.md, "The bus").
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Awaitable, Callable, Optional

import nats.errors
import nats.js.errors

from tulle import schemas
from tulle.bus import BUCKETS, Bus, BusError
from tulle.codec import encode
from tulle.log import get_logger
from tulle.metrics import REGISTRY, Registry

Callback = Callable[[], Optional[Awaitable[None]]]


class LeaderElection:
    def __init__(self, bus: Bus, name: str, *, ttl: float | None = None, renew_every: float | None = None,
                 poll_every: float = 0.5, margin: float = 1.0, on_elected: Callback | None = None,
                 on_lost: Callback | None = None, registry: Registry = REGISTRY):
        self.bus = bus
        self.name = name  # the key in tulle-leases; also the lease's label in metrics
        self.ttl = ttl if ttl is not None else float(BUCKETS[schemas.LEASES_BUCKET]["ttl"])
        self.renew_every = renew_every if renew_every is not None else self.ttl / 5
        self.poll_every = poll_every
        self.margin = min(margin, self.ttl / 2)
        self.on_elected = on_elected
        self.on_lost = on_lost
        self.holder = f"{bus.instance}-{uuid.uuid4().hex[:6]}"
        self.log = get_logger(lease=name, holder=self.holder)
        self._leader = False
        self._revision = 0
        self._valid_until = 0.0
        # Whether the last attempt found the lease held by another replica (a standby
        # that has seen a live writer may call itself ready).
        self.held_elsewhere = False
        self.changed = asyncio.Event()  # set on every change of leadership
        self.m_leader = registry.gauge("tulle_leader", "1 while this process holds the writer lease", ("lease",))
        self.m_transitions = registry.counter("tulle_leader_transitions_total",
                                              "Times this process took or lost the writer lease", ("lease", "event"))
        self.m_leader.labels(name).set(0)

    def is_leader(self) -> bool:
        """True only while the lease is held and its last renewal is fresh."""
        return self._leader and time.monotonic() < self._valid_until

    async def run(self) -> None:
        """Compete for the lease and keep it while held; runs until cancelled."""
        while True:
            raise_if_cancelled()
            try:
                if not self._leader:
                    await self.bus.wait_connected()
                    await self._try_acquire()
                    if not self._leader:
                        await asyncio.sleep(self.poll_every * (0.8 + 0.4 * random.random()))
                else:
                    await asyncio.sleep(max(0.0, min(self.renew_every, self._valid_until - time.monotonic() - 0.05)))
                    await self._renew()
            except (BusError, nats.errors.Error, asyncio.TimeoutError, OSError) as e:
                # NATS gone or slow: keep the lease only while it is still fresh.
                self.log.debug("lease operation failed", error=str(e) or type(e).__name__)
                if self._leader and time.monotonic() >= self._valid_until:
                    await self._lose("renewal failed until the lease ran out")
                await asyncio.sleep(min(0.25, self.poll_every))

    def _value(self) -> bytes:
        return encode(schemas.Lease(holder=self.holder, component=self.bus.component, acquired=time.time()))

    async def _try_acquire(self) -> None:
        kv = await self.bus.kv(schemas.LEASES_BUCKET)
        sent = time.monotonic()
        try:
            revision = await kv.create(self.name, self._value())
        except nats.js.errors.KeyWrongLastSequenceError:
            self.held_elsewhere = True  # someone holds it
            return
        self.held_elsewhere = False
        self._revision = revision
        self._valid_until = sent + self.ttl - self.margin
        self._leader = True
        self.m_leader.labels(self.name).set(1)
        self.m_transitions.labels(self.name, "elected").inc()
        self.log.info("took the writer lease")
        self.changed.set()
        await self._call(self.on_elected)

    async def _renew(self) -> None:
        kv = await self.bus.kv(schemas.LEASES_BUCKET)
        sent = time.monotonic()
        was_valid = self.is_leader()
        try:
            self._revision = await kv.update(self.name, self._value(), last=self._revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            await self._lose("the lease was taken over")
            return
        self._valid_until = sent + self.ttl - self.margin
        if not was_valid:
            # Still ours (the compare-and-set proved it), but writers paused meanwhile:
            # tell them, as on a fresh election.
            await self._call(self.on_elected)

    async def _lose(self, why: str) -> None:
        if not self._leader:
            return
        self._leader = False
        self._revision = 0
        self.m_leader.labels(self.name).set(0)
        self.m_transitions.labels(self.name, "lost").inc()
        self.log.warning("lost the writer lease", reason=why)
        self.changed.set()
        await self._call(self.on_lost)

    async def release(self) -> None:
        """Give the lease up at once (clean shutdown), so a standby need not wait for the TTL."""
        if not self._leader:
            return
        revision = self._revision
        self._leader = False
        self.m_leader.labels(self.name).set(0)
        self.changed.set()
        try:
            kv = await self.bus.kv(schemas.LEASES_BUCKET)
            await asyncio.wait_for(kv.delete(self.name, last=revision), 2)
            self.log.info("released the writer lease")
        except Exception as e:  # the TTL ends it anyway
            self.log.debug("could not release the lease", error=str(e) or type(e).__name__)

    async def _call(self, fn: Callback | None) -> None:
        if fn is None:
            return
        try:
            result = fn()
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            self.log.exception("leadership callback failed")


# Where the kv writer and the election have always found it; it lives with the Bus now,
# whose watches need it too.
from tulle.bus import raise_if_cancelled  # noqa: E402,F401
