"""Fail-fast queueing in front of a service's endpoints, with Linkerd's semantics — pure.

A request for a service that has no available endpoint does not fail at once: it waits in
the service's queue for one to appear (start-up, a rollout, a scale from zero). When the
oldest waiting request has waited `timeout_s`, the service enters *fail-fast*: every
waiting request fails (503), and so does every new one at once, until an endpoint is
available again. At most `capacity` requests wait; one more fails at once.

`FailFastQueue` holds the waiters and decides; `Gate` is its thin adapter onto an event
loop's timer (one timer per queue, at the oldest waiter's deadline).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

WAIT, FULL, FAILING = "wait", "full", "failfast"


class FailFastQueue(Generic[T]):
    __slots__ = ("timeout_s", "capacity", "waiting", "failing")

    def __init__(self, timeout_s: float, capacity: int):
        self.timeout_s = timeout_s
        self.capacity = capacity
        self.waiting: deque[tuple[float, T]] = deque()  # (arrival, waiter), oldest first
        self.failing = False  # in fail-fast: new requests fail at once

    def admit(self, waiter: T, now: float) -> str:
        """No endpoint is available for `waiter`: WAIT (queued), FULL or FAILING (fail it now)."""
        if self.failing or self.timeout_s <= 0:  # a timeout of 0: no waiting at all
            return FAILING
        if len(self.waiting) >= self.capacity:
            return FULL
        self.waiting.append((now, waiter))
        return WAIT

    def deadline(self) -> float | None:
        """When the oldest waiter's patience ends (None: nobody waits)."""
        return self.waiting[0][0] + self.timeout_s if self.waiting else None

    def expire(self, now: float) -> list[T]:
        """The timer fired: past the oldest waiter's deadline the service fails fast, and
        every waiter is returned to be failed; before it, nothing happens."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return []
        self.failing = True
        out = [w for _, w in self.waiting]
        self.waiting.clear()
        return out

    def available(self) -> list[T]:
        """An endpoint is available: fail-fast ends and every waiter goes on, in order."""
        self.failing = False
        out = [w for _, w in self.waiting]
        self.waiting.clear()
        return out

    def remove(self, waiter: T) -> None:
        """A waiter that went away (its caller hung up)."""
        for i, (_, w) in enumerate(self.waiting):
            if w is waiter or w == waiter:
                del self.waiting[i]
                return

    def __len__(self) -> int:
        return len(self.waiting)


class Gate(Generic[T]):
    """A FailFastQueue on an event loop: `on_expired(waiter)` is called for each waiter the
    queue gives up on; the caller releases waiters itself with `available()`."""

    __slots__ = ("queue", "loop", "on_expired", "timer")

    def __init__(self, timeout_s: float, capacity: int, on_expired: Callable[[T], None],
                 loop: asyncio.AbstractEventLoop | None = None):
        self.queue: FailFastQueue[T] = FailFastQueue(timeout_s, capacity)
        self.loop = loop or asyncio.get_event_loop()
        self.on_expired = on_expired
        self.timer: asyncio.TimerHandle | None = None

    @property
    def failing(self) -> bool:
        return self.queue.failing

    def admit(self, waiter: T) -> str:
        verdict = self.queue.admit(waiter, self.loop.time())
        if verdict == WAIT and self.timer is None:
            self._arm()
        return verdict

    def available(self) -> list[T]:
        self._disarm()
        return self.queue.available()

    def remove(self, waiter: T) -> None:
        self.queue.remove(waiter)
        if not self.queue.waiting:
            self._disarm()

    def _arm(self) -> None:
        deadline = self.queue.deadline()
        if deadline is not None:
            self.timer = self.loop.call_at(deadline, self._fire)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fire(self) -> None:
        self.timer = None
        for waiter in self.queue.expire(self.loop.time()):
            self.on_expired(waiter)
        if self.queue.waiting:  # woken early (clock granularity): wait on
            self._arm()

    def __len__(self) -> int:
        return len(self.queue)
