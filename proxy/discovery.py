"""Discovery: shared, lazy KV watches of endpoint sets and profiles.

A key is watched from its first use; every connection that needs it shares the one
watch; a watch nobody used for `idle_s` is stopped. The last value a watch saw stays
in force while NATS is gone (the bus reconnects forever and starts the watch again with
a fresh Snapshot, which is then applied as the whole truth).

Readers do not await: they look at `Watched.value` when `Watched.known`, or register a
callback with `Watched.when_known` (the HTTP hot path has no coroutine per request).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Generic, TypeVar

import nats.js.errors

from proxy.balancer import Balancer
from tulle import schemas
from tulle.bus import Bus, Change, Snapshot
from tulle.log import get_logger

T = TypeVar("T")


def endpoint_key(ep: schemas.Endpoint) -> tuple:
    return (ep.address, ep.port, ep.identity, ep.proxy_port)


class Watched(Generic[T]):
    """One watched key: its last known value (None = absent) and who waits for the first."""

    __slots__ = ("bucket", "key", "value", "known", "used", "idle_sweeps", "task", "_waiters", "listeners",
                 "balancer", "revision")

    def __init__(self, bucket: str, key: str):
        self.bucket = bucket
        self.key = key
        self.value: T | None = None
        self.known = False  # True once a first snapshot arrived
        self.used = True
        self.idle_sweeps = 0
        self.task: asyncio.Task | None = None
        self._waiters: list[Callable[[], None]] = []
        self.listeners: list[Callable[["Watched[T]"], None]] = []
        self.balancer: Balancer | None = None  # endpoint sets only
        self.revision = 0  # bumped on every applied value

    def when_known(self, fn: Callable[[], None]) -> None:
        """Call `fn` once the first value is known (now, if it already is)."""
        if self.known:
            fn()
        else:
            self._waiters.append(fn)

    def _apply(self, value: T | None) -> None:
        self.value = value
        self.revision += 1
        if self.balancer is not None:
            eps = value.endpoints if value is not None else ()
            self.balancer.update(eps)
        for fn in list(self.listeners):
            fn(self)
        if not self.known:
            self.known = True
            waiters, self._waiters = self._waiters, []
            for fn in waiters:
                fn()


class Discovery:
    def __init__(self, bus: Bus, *, idle_s: float = 60.0, clock: Callable[[], float] | None = None,
                 on_profile: Callable[[str, schemas.Profile | None], Any] | None = None):
        self.bus = bus
        self.idle_s = idle_s
        self._clock = clock or asyncio.get_event_loop().time
        self.on_profile = on_profile
        self._watches: dict[tuple[str, str], Watched] = {}
        # Bumped whenever a watch is dropped, so callers holding references can refresh.
        self.generation = 0
        self._sweeper: asyncio.Task | None = None
        self.log = get_logger(part="discovery")

    def endpoints(self, key: str) -> Watched[schemas.EndpointSet]:
        return self._get(schemas.ENDPOINTS_BUCKET, key, schemas.EndpointSet)

    def profile(self, namespace: str, service: str) -> Watched[schemas.Profile]:
        return self._get(schemas.PROFILES_BUCKET, schemas.profile_key(namespace, service), schemas.Profile)

    def _get(self, bucket: str, key: str, cls: type) -> Watched:
        w = self._watches.get((bucket, key))
        if w is not None:
            w.used = True
            return w
        w = Watched(bucket, key)
        if cls is schemas.EndpointSet:
            w.balancer = Balancer(endpoint_key, clock=self._clock)
        elif self.on_profile is not None:
            w.listeners.append(lambda watched: self.on_profile(watched.key, watched.value))
        self._watches[(bucket, key)] = w
        w.task = asyncio.ensure_future(self._run(w, cls))
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())
        return w

    async def _run(self, w: Watched, cls: type) -> None:
        probe = asyncio.ensure_future(self._absent_without_bucket(w))
        try:
            async for item in self.bus.watch(w.bucket, w.key, cls):
                if isinstance(item, Snapshot):
                    w._apply(item.values.get(w.key))
                elif isinstance(item, Change) and item.key == w.key:
                    w._apply(item.value)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not take the proxy down; the value stays as it was
            self.log.exception("watch failed", bucket=w.bucket, key=w.key)
        finally:
            probe.cancel()

    async def _absent_without_bucket(self, w: Watched) -> None:
        """A bucket nobody created yet holds no key: say so instead of waiting for it.

        (Bus.watch waits for a missing bucket; the watch goes on and picks the key up
        once the bucket appears.)
        """
        try:
            await self.bus.wait_connected()
            await self.bus.kv(w.bucket, create=False)
        except nats.js.errors.BucketNotFoundError:
            if not w.known:
                w._apply(None)
        except Exception:
            pass

    async def _sweep(self) -> None:
        interval = max(min(self.idle_s / 2, 10.0), 0.05)
        needed = max(int(self.idle_s / interval), 1)
        while True:
            await asyncio.sleep(interval)
            for k, w in list(self._watches.items()):
                if w.used:
                    w.used = False
                    w.idle_sweeps = 0
                    continue
                w.idle_sweeps += 1
                if w.idle_sweeps >= needed and not w._waiters:
                    self._drop(k, w)

    def _drop(self, k: tuple[str, str], w: Watched) -> None:
        del self._watches[k]
        self.generation += 1
        if w.task is not None:
            w.task.cancel()

    def endpoint_watches(self) -> list[Watched]:
        """The endpoint-set watches held now (each with its balancer)."""
        return [w for w in self._watches.values() if w.balancer is not None]

    @property
    def watched_keys(self) -> list[str]:
        return sorted(f"{b}/{k}" for b, k in self._watches)

    async def close(self) -> None:
        tasks = [w.task for w in self._watches.values() if w.task is not None]
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watches.clear()
