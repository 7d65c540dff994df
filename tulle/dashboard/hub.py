"""The dashboard's bus side: one reader per kind of data, shared by every open browser tab.

- KV watches (tulle-proxies, tulle-endpoints, tulle-policy, tulle-profiles, tulle-identity)
  keep `MeshState` current; the policy and identity views are re-made when they change.
- Pollers, one per kind, while at least one tab is open: traffic (scatter-gather
  `tulle.proxy.v1.traffic`), routes (`tulle.proxy.v1.stats`), and the facts of
  `tulle check` (the extensions page). No tab open: no polling.
- One ordered JetStream consumer of TULLE_EVENTS feeds a ring of recent events and every
  tab's bounded queue (fan-out from one consumer).

Each view is serialised once per change into a server-sent-events frame (`Topic`); a tab's
stream only copies the latest frame of each topic it has not sent yet, so a slow tab
skips intermediate states instead of queueing them, and the work per tab is a few
writes per change whatever the number of tabs.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

import orjson

from tulle import __version__, schemas
from tulle.dashboard import views
from tulle.dashboard.traffic import gather_traffic
from tulle.log import get_logger

log = get_logger(part="dashboard")

EVENT_RING = 300  # events a new tab starts with
TAB_EVENT_QUEUE = 500  # events a tab may have pending before the oldest are dropped
EVENT_REPLAY_S = 3600  # how far back the ring starts when the dashboard starts


def sse_frame(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@dataclass
class Topic:
    name: str
    version: int = 0
    frame: bytes = b""
    data: Any = None


@dataclass
class Settings:
    window_s: float = 10.0
    traffic_interval_s: float = 2.0
    routes_interval_s: float = 2.0
    check_interval_s: float = 10.0
    gather_timeout_s: float = 1.5
    max_streams: int = 16


class Tab:
    """One open event stream (a browser tab)."""

    def __init__(self):
        self.wake = asyncio.Event()
        self.sent: dict[str, int] = {}
        self.events: deque = deque(maxlen=TAB_EVENT_QUEUE)
        self.dropped = 0

    def push_event(self, item: dict) -> None:
        if len(self.events) == self.events.maxlen:
            self.dropped += 1
        self.events.append(item)
        self.wake.set()


# gather the `tulle check` facts: () -> (mode, components, report, error)
CheckGatherer = Callable[[], Awaitable[tuple[str, list, Any, str]]]


class Hub:
    TOPICS = ("status", "topology", "routes", "policy", "identity", "extensions")

    def __init__(self, bus, settings: Settings, *, check: Optional[CheckGatherer] = None, url: str = ""):
        self.bus = bus
        self.settings = settings
        self.check = check
        self.url = url
        self.state = views.MeshState()
        self.topics = {name: Topic(name) for name in self.TOPICS}
        self.tabs: set[Tab] = set()
        self.active = asyncio.Event()  # set while at least one tab is open
        self.events: deque = deque(maxlen=EVENT_RING)
        self.event_seq = 0
        self.undecodable_events = 0
        self._tasks: list[asyncio.Task] = []
        self._dirty: set[str] = set()
        self._dirty_wake = asyncio.Event()
        self.polls = {"traffic": 0, "routes": 0, "check": 0}  # how many times each poller ran

    # --- tabs ------------------------------------------------------------------------------

    def open_tab(self) -> Optional[Tab]:
        """A new tab's stream, or None when the cap is reached."""
        if len(self.tabs) >= self.settings.max_streams:
            return None
        tab = Tab()
        self.tabs.add(tab)
        self.active.set()
        return tab

    def close_tab(self, tab: Tab) -> None:
        self.tabs.discard(tab)
        if not self.tabs:
            self.active.clear()

    def publish(self, name: str, data: Any) -> None:
        topic = self.topics[name]
        topic.version += 1
        topic.data = data
        topic.frame = sse_frame(name, data)
        for tab in self.tabs:
            tab.wake.set()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        watches = [
            (schemas.PROXIES_BUCKET, "heartbeats", schemas.ProxyHeartbeat, ("identity", "policy")),
            (schemas.ENDPOINTS_BUCKET, "endpoints", schemas.EndpointSet, ()),
            (schemas.POLICY_BUCKET, "policies", schemas.WorkloadPolicy, ("policy",)),
            (schemas.PROFILES_BUCKET, "profiles", schemas.Profile, ()),
        ]
        for bucket, attr, cls, dirty in watches:
            self._tasks.append(asyncio.ensure_future(self._watch(bucket, attr, cls, dirty)))
        self._tasks += [asyncio.ensure_future(c) for c in (
            self._watch_trust_bundle(), self._render_dirty(), self._follow_events(),
            self._poll("traffic", self.settings.traffic_interval_s, self._traffic_once),
            self._poll("routes", self.settings.routes_interval_s, self._routes_once),
            self._status_loop())]
        if self.check is not None:
            self._tasks.append(asyncio.ensure_future(self._poll("check", self.settings.check_interval_s,
                                                                self._check_once)))
        self._mark("policy", "identity")

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- KV --------------------------------------------------------------------------------

    def _mark(self, *names: str) -> None:
        self._dirty.update(names)
        self._dirty_wake.set()

    async def _render_dirty(self) -> None:
        """Re-make the views whose data changed, at most every 0.25 s (heartbeats of many
        proxies arrive in bursts)."""
        while True:
            await self._dirty_wake.wait()
            self._dirty_wake.clear()
            dirty, self._dirty = self._dirty, set()
            now = time.time()
            if "policy" in dirty:
                self.publish("policy", views.policies(self.state))
            if "identity" in dirty:
                self.publish("identity", views.identity(self.state, now=now))
            await asyncio.sleep(0.25)

    async def _watch(self, bucket: str, attr: str, cls, dirty: tuple[str, ...]) -> None:
        from tulle.bus import Snapshot

        async for update in self.bus.watch(bucket, ">", cls):
            values: dict = getattr(self.state, attr)
            if isinstance(update, Snapshot):
                values.clear()
                values.update(update.values)
            elif update.value is None:
                values.pop(update.key, None)
            else:
                values[update.key] = update.value
            self._mark(*dirty)

    async def _watch_trust_bundle(self) -> None:
        from tulle.bus import Snapshot

        async for update in self.bus.watch(schemas.IDENTITY_BUCKET, schemas.TRUST_BUNDLE_KEY, schemas.TrustBundle):
            if isinstance(update, Snapshot):
                self.state.trust_bundle = update.values.get(schemas.TRUST_BUNDLE_KEY)
            else:
                self.state.trust_bundle = update.value
            self._mark("identity")

    # --- pollers ---------------------------------------------------------------------------

    async def _poll(self, name: str, interval: float, once: Callable[[], Awaitable[None]]) -> None:
        while True:
            await self.active.wait()
            await self.bus.wait_connected()
            started = time.monotonic()
            try:
                await once()
                self.polls[name] += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the bus went away mid-way; the next round tries again
                log.info("dashboard poll failed", poll=name, error=str(e) or type(e).__name__)
            await asyncio.sleep(max(0.2, interval - (time.monotonic() - started)))

    def _expected(self) -> set[str]:
        return {k for k, hb in self.state.heartbeats.items() if hb.ready}

    async def _traffic_once(self) -> None:
        s = self.settings
        replies = await gather_traffic(self.bus, s.window_s, self._expected(), s.gather_timeout_s)
        self.publish("topology", views.topology(self.state, replies, now=time.time(), window_s=s.window_s))

    async def _routes_once(self) -> None:
        s = self.settings
        expected = self._expected()

        def everyone(replies: list) -> bool:
            return bool(expected) and expected <= {schemas.proxy_key(r.namespace, r.workload) for r in replies}

        replies = await self.bus.gather(schemas.PROXY_STATS_SUBJECT, schemas.StatsRequest(window_s=s.window_s),
                                        schemas.StatsReply, s.gather_timeout_s, until=everyone)
        self.publish("routes", views.routes(self.state, replies, now=time.time(), window_s=s.window_s))

    async def _check_once(self) -> None:
        mode, components, report, error = await self.check()
        self.publish("extensions", views.extensions(mode, components, report, now=time.time(), error=error))

    async def _status_loop(self) -> None:
        last = None
        while True:
            status = {"url": self.url, "connected": self.bus.connected, "version": __version__,
                      "window_s": self.settings.window_s, "tabs": len(self.tabs),
                      "max_tabs": self.settings.max_streams}
            if status != last:
                self.publish("status", status)
                last = status
            await asyncio.sleep(1.0)

    # --- events ----------------------------------------------------------------------------

    async def _follow_events(self) -> None:
        """One ordered consumer of the event stream for every tab; started again when the
        stream is missing (the control plane makes it) or the subscription fails."""
        import datetime as dt

        import nats.errors
        import nats.js.errors
        from nats.js import api as jsapi

        start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=EVENT_REPLAY_S)
        while True:
            await self.bus.wait_connected()
            sub = None
            try:
                await self.bus.js.stream_info(schemas.EVENTS_STREAM)
                config = jsapi.ConsumerConfig(deliver_policy=jsapi.DeliverPolicy.BY_START_TIME, opt_start_time=start)
                sub = await self.bus.js.subscribe(f"{schemas.EVENTS_PREFIX}.>", stream=schemas.EVENTS_STREAM,
                                                  ordered_consumer=True, config=config)
                async for msg in sub.messages:
                    self._event(msg.subject, msg.data)
                    start = dt.datetime.now(dt.timezone.utc)  # a new consumer goes on from here
            except asyncio.CancelledError:
                raise
            except nats.js.errors.NotFoundError:
                await asyncio.sleep(1.0)
            except (nats.errors.Error, OSError, asyncio.TimeoutError) as e:
                log.info("event stream interrupted", error=str(e) or type(e).__name__)
                await asyncio.sleep(1.0)
            finally:
                if sub is not None:
                    try:
                        await sub.unsubscribe()
                    except Exception:
                        pass

    def _event(self, subject: str, raw: bytes) -> None:
        self.event_seq += 1
        item = views.event_item(subject, raw, self.event_seq)
        if item is None:
            self.undecodable_events += 1
            return
        self.events.append(item)
        if item["type"] == "proxy.denied":
            self.state.denials.append((views.event_time(item, time.time()), item["data"]))
        for tab in self.tabs:
            tab.push_event(item)
