"""Discovery: shared, lazy KV watches of endpoint sets and profiles — bounded, whatever
names the apps ask for.

A key is first *looked up* once (a KV get, no consumer). A key that holds a value becomes
a watch, shared by every connection that needs it and stopped once nobody used it for
`idle_s`. A key found absent is remembered as absent for `absent_ttl_s` without any watch,
so a name that resolves to nothing costs one lookup per interval, never a JetStream
consumer. At most `max_watches` watches are held (endpoints and profiles together); past
that, a key that exists is served from its lookup and remembered like an absent one.
A service's profile is watched only once its endpoint set says the service exists.

The last value a watch saw stays in force while NATS is gone (the bus reconnects forever
and starts the watch again with a fresh Snapshot, which is then applied as the whole
truth). A lookup made while NATS is gone waits for it (callers give up after their
fail-fast timeout).

Readers do not await: they look at `Watched.value` when `Watched.known`, or register a
callback with `Watched.when_known` (the HTTP hot path has no coroutine per request).
`generation` changes whenever a watch is dropped or a remembered key expires, so callers
that keep references know to look again.
"""

from __future__ import annotations

import asyncio
from itertools import chain
from typing import Any, Callable, Generic, TypeVar

import nats.js.errors

from proxy.balancer import Balancer
from tulle import schemas
from tulle.bus import Bus, Change, Snapshot
from tulle.log import get_logger
from tulle.metrics import REGISTRY, Registry

T = TypeVar("T")

# Keys remembered without a watch (absent, or over the watch cap) or being looked up, at
# most; the oldest go first.
MAX_REMEMBERED = 10000
# A lookup not answered in this long (NATS gone) is given up; the next use starts another.
LOOKUP_PATIENCE_S = 30.0


def endpoint_key(ep: schemas.Endpoint) -> tuple:
    return (ep.address, ep.port, ep.identity, ep.proxy_port)


class Watched(Generic[T]):
    """One key: its last known value (None = absent) and who waits for the first.

    Either a live watch (`watching`), or a lookup in progress, or a value remembered
    without a watch until `expires`.
    """

    __slots__ = ("bucket", "key", "value", "known", "used", "idle_sweeps", "task", "_waiters", "listeners",
                 "balancer", "revision", "watching", "expires", "queue")

    def __init__(self, bucket: str, key: str):
        self.bucket = bucket
        self.key = key
        self.value: T | None = None
        self.known = False  # True once a first value (or absence) is known
        self.used = True
        self.idle_sweeps = 0
        self.task: asyncio.Task | None = None
        self._waiters: list[Callable[[], None]] = []
        self.listeners: list[Callable[["Watched[T]"], None]] = []
        self.balancer: Balancer | None = None  # endpoint sets only
        self.revision = 0  # bumped on every applied value
        self.watching = False  # a KV watch keeps the value current
        self.expires = 0.0  # remembered without a watch until then (0: not remembered)
        self.queue = None  # requests waiting for an endpoint (the room's proxy/failfast.py Gate)

    def when_known(self, fn: Callable[[], None]) -> None:
        """Call `fn` once the first value is known (now, if it already is)."""
        if self.known:
            fn()
        else:
            self._waiters.append(fn)

    def forget_waiter(self, fn: Callable[[], None]) -> None:
        try:
            self._waiters.remove(fn)
        except ValueError:
            pass

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


class DiscoveryMetrics:
    def __init__(self, registry: Registry, discovery: "Discovery"):
        self.watches = registry.gauge("discovery_watches", "KV watches (JetStream consumers) this proxy holds",
                                      ("bucket",))
        for bucket in (schemas.ENDPOINTS_BUCKET, schemas.PROFILES_BUCKET):
            self.watches.labels(bucket).set_function(lambda b=bucket: discovery.watch_count(b))
        self.remembered = registry.gauge("discovery_remembered", "Keys remembered without a watch (absent, or over "
                                         "the watch cap)")
        self.remembered.set_function(lambda: len(discovery._unwatched))
        self.lookups = registry.counter(
            "discovery_lookups_total", "KV lookups of keys not watched yet, by result (watched, absent, "
            "unwatched: over the watch cap, failed)", ("bucket", "result"))
        self.avoided = registry.counter(
            "discovery_lookups_avoided_total", "Targets resolved without any KV lookup, by reason "
            "(outside_mesh_name, outside_mesh_address, remembered)", ("reason",))


class Discovery:
    def __init__(self, bus: Bus, *, idle_s: float = 60.0, clock: Callable[[], float] | None = None,
                 on_profile: Callable[[str, schemas.Profile | None], Any] | None = None, max_watches: int = 200,
                 absent_ttl_s: float = 5.0, registry: Registry | None = None):
        self.bus = bus
        self.idle_s = idle_s
        self.max_watches = max_watches
        self.absent_ttl_s = absent_ttl_s
        self._clock = clock or asyncio.get_event_loop().time
        self.on_profile = on_profile
        self._watches: dict[tuple[str, str], Watched] = {}  # live KV watches
        self._unwatched: dict[tuple[str, str], Watched] = {}  # lookups in progress, remembered values
        # Bumped whenever a watch is dropped or a remembered key expires, so callers holding
        # references can refresh.
        self.generation = 0
        self._sweeper: asyncio.Task | None = None
        self.metrics = DiscoveryMetrics(registry if registry is not None else REGISTRY, self)
        self.log = get_logger(part="discovery")

    # --- what the rooms ask -------------------------------------------------------------

    def endpoints(self, key: str) -> Watched[schemas.EndpointSet]:
        """The endpoint set at `key`: looked up once, then watched when it exists."""
        k = (schemas.ENDPOINTS_BUCKET, key)
        w = self._existing(k)
        if w is not None:
            return w
        w = self._new(k, schemas.EndpointSet)
        w.task = asyncio.ensure_future(self._look_up(w, schemas.EndpointSet))
        return w

    def profile(self, namespace: str, service: str, after: Watched | None = None) -> Watched[schemas.Profile]:
        """The service's profile. With `after` (the service's endpoint set), it is watched
        only once that says the service exists; otherwise it is known absent at once."""
        k = (schemas.PROFILES_BUCKET, schemas.profile_key(namespace, service))
        w = self._existing(k)
        if w is not None:
            return w
        if after is not None and after.known and not _exists(after.value):
            # Not a service (this port of it, at least): nothing to watch, and nothing to
            # remember on the service's behalf either — another port may exist.
            w = Watched(*k)
            w._apply(None)
            return w
        w = self._new(k, schemas.Profile)
        if after is None:
            self._watch_or_remember(w, schemas.Profile)
        else:
            def decide() -> None:
                if self._unwatched.get(k) is not w:
                    return  # forgotten meanwhile
                if _exists(after.value):
                    self._watch_or_remember(w, schemas.Profile)
                else:  # as above: known absent for its waiters, remembered for no one
                    del self._unwatched[k]
                    w._apply(None)
            after.when_known(decide)
        return w

    def skipped(self, reason: str) -> None:
        """A target resolved without any lookup (counted; `reason` is a fixed word)."""
        self.metrics.avoided.labels(reason).inc()

    # --- lookups, watches, memory ---------------------------------------------------------

    def _existing(self, k: tuple[str, str]) -> Watched | None:
        w = self._watches.get(k)
        if w is not None:
            w.used = True
            return w
        w = self._unwatched.get(k)
        if w is not None:
            if not w.expires or w.expires > self._clock():
                if w.known:
                    self.metrics.avoided.labels("remembered").inc()
                return w
            self._forget(k, w)
        return None

    def _new(self, k: tuple[str, str], cls: type) -> Watched:
        w = Watched(*k)
        if cls is schemas.EndpointSet:
            w.balancer = Balancer(endpoint_key, clock=self._clock)
        elif self.on_profile is not None:
            w.listeners.append(lambda watched: self.on_profile(watched.key, watched.value))
        w.expires = self._clock() + LOOKUP_PATIENCE_S
        self._unwatched[k] = w
        while len(self._unwatched) > MAX_REMEMBERED:  # a flood of names: the oldest go
            old_k = next(iter(self._unwatched))
            self._forget(old_k, self._unwatched[old_k])
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())
        return w

    async def _look_up(self, w: Watched, cls: type) -> None:
        """One KV get: a value starts a watch (room permitting), absence is remembered."""
        value = await self._get(w, cls)
        if self._unwatched.get((w.bucket, w.key)) is not w:
            return  # forgotten meanwhile
        if value is None:
            self.metrics.lookups.labels(w.bucket, "absent").inc()
            self._remember(w, None)
        elif not self._start_watch(w, cls, value):
            self.metrics.lookups.labels(w.bucket, "unwatched").inc()
            self._remember(w, value)
        else:
            self.metrics.lookups.labels(w.bucket, "watched").inc()

    def _watch_or_remember(self, w: Watched, cls: type) -> None:
        """Watch `w` (absent or not) if the cap allows; else look it up once and remember it."""
        if not self._start_watch(w, cls, None, apply=False):
            async def once() -> None:
                value = await self._get(w, cls)
                if self._unwatched.get((w.bucket, w.key)) is w:
                    self.metrics.lookups.labels(w.bucket, "unwatched").inc()
                    self._remember(w, value)
            w.task = asyncio.ensure_future(once())

    async def _get(self, w: Watched, cls: type) -> Any:
        while True:
            await self.bus.wait_connected()
            try:
                await self.bus.kv(w.bucket, create=False)  # a bucket nobody created holds nothing
                return await self.bus.get(w.bucket, w.key, cls)
            except nats.js.errors.BucketNotFoundError:
                return None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # disconnected meanwhile, a timeout: ask again
                self.metrics.lookups.labels(w.bucket, "failed").inc()
                self.log.debug("lookup failed; retrying", bucket=w.bucket, key=w.key, error=str(e) or type(e).__name__)
                await asyncio.sleep(0.5)

    def _start_watch(self, w: Watched, cls: type, value: Any, apply: bool = True) -> bool:
        k = (w.bucket, w.key)
        if len(self._watches) >= self.max_watches:
            return False
        self._unwatched.pop(k, None)
        self._watches[k] = w
        w.watching = True
        w.expires = 0.0
        if apply:
            w._apply(value)
        w.task = asyncio.ensure_future(self._run(w, cls))
        return True

    def _remember(self, w: Watched, value: Any) -> None:
        w.expires = self._clock() + self.absent_ttl_s
        w._apply(value)

    def _forget(self, k: tuple[str, str], w: Watched) -> None:
        del self._unwatched[k]
        self.generation += 1
        if w.task is not None and not w.task.done():
            w.task.cancel()

    async def _run(self, w: Watched, cls: type) -> None:
        probe = asyncio.ensure_future(self._absent_without_bucket(w)) if not w.known else None
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
            if probe is not None:
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
        interval = max(min(self.idle_s / 2, self.absent_ttl_s / 2, 10.0), 0.05)
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
            now = self._clock()
            for k, w in list(self._unwatched.items()):
                if w.expires and w.expires <= now:
                    self._forget(k, w)

    def _drop(self, k: tuple[str, str], w: Watched) -> None:
        del self._watches[k]
        w.watching = False
        self.generation += 1
        if w.task is not None:
            w.task.cancel()

    # --- state, for metrics, tests and shutdown -------------------------------------------

    def watch_count(self, bucket: str | None = None) -> int:
        return sum(1 for b, _ in self._watches if bucket is None or b == bucket)

    def endpoint_watches(self) -> list[Watched]:
        """The endpoint sets known now (each with its balancer), watched or remembered."""
        return [w for w in chain(self._watches.values(), self._unwatched.values()) if w.balancer is not None]

    @property
    def watched_keys(self) -> list[str]:
        return sorted(f"{b}/{k}" for b, k in self._watches)

    @property
    def remembered_keys(self) -> list[str]:
        return sorted(f"{b}/{k}" for (b, k), w in self._unwatched.items() if w.known)

    async def close(self) -> None:
        tasks = [w.task for w in chain(self._watches.values(), self._unwatched.values()) if w.task is not None]
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watches.clear()
        self._unwatched.clear()


def _exists(es: Any) -> bool:
    return es is not None and getattr(es, "exists", True)
