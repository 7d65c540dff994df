"""The destination's KV writer against a real nats-server: only real changes are written,
bursts are coalesced without delaying a lone change, a takeover rewrites nothing."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.destination.compile import DestinationState
from services.destination.events import endpoints_changed_event
from tulle.kvwriter import KVWriter
from tests.bus_support import TESTER, bus_for
from tests.conftest import eventually
from tests.destination_objects import obj, pod_doc, service_doc
from tulle import schemas
from tulle.bus import Bus
from tulle.codec import encode
from tulle.metrics import Registry
from tulle.sources.base import ResourceEvent

EP = schemas.ENDPOINTS_BUCKET
BUCKETS = (schemas.ENDPOINTS_BUCKET, schemas.PROFILES_BUCKET)
WEB = {"app": "web"}


@pytest.fixture
async def bus(own_nats):
    b = bus_for(own_nats.url, TESTER, component="test")
    await b.start()
    yield b
    await b.close()


class Harness:
    """A state, a writer on its own metrics registry, and a flag standing for the lease."""

    def __init__(self, bus: Bus, min_interval: float = 0.025, clock=time.monotonic):
        self.state = DestinationState()
        self.leader = True
        self.registry = Registry()
        self.written: list[tuple] = []
        self.writer = KVWriter(bus, BUCKETS, self.state.take_changes, is_leader=lambda: self.leader,
                               can_write=lambda: self.state.synced, min_interval=min_interval,
                               registry=self.registry, on_written=lambda k, o, n: self.written.append((k, n)),
                               clock=clock)
        self.task = asyncio.ensure_future(self.writer.run())

    def apply(self, kind: str, doc: dict) -> None:
        if self.state.apply(ResourceEvent(kind, obj(doc))):
            self.writer.notify()

    def sync(self) -> None:
        self.state.apply(ResourceEvent("synced"))
        self.writer.notify()

    def writes(self) -> int:
        return sum(c.value for c in self.writer.m_writes._children.values())

    def batches(self) -> int:
        return self.writer.m_batches.labels().value

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def harnesses(bus):
    made: list[Harness] = []

    def make(**kw) -> Harness:
        h = Harness(bus, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.stop()


async def revisions(bus: Bus, key: str) -> int:
    kv = await bus.kv(EP)
    entry = await kv.get(key)
    return entry.revision


def pods(*ids: int) -> set[str]:
    return {f"10.1.0.{i}" for i in ids}


async def published(bus: Bus, key: str = "demo.web.80") -> set[str] | None:
    es = await bus.get(EP, key, schemas.EndpointSet)
    return None if es is None else {e.address for e in es.endpoints}


async def test_nothing_is_written_before_the_source_has_synced(harnesses, bus):
    h = harnesses()
    h.apply("added", service_doc("web", selector=WEB, cluster_ip="10.96.0.10"))
    h.apply("added", pod_doc("web-1", labels=WEB, ip="10.1.0.1"))
    await eventually(lambda: h.writer.desired, what="the writer compiling")  # it ran, and chose not to write
    assert await bus.keys(EP) == []
    h.sync()
    await eventually(lambda: _present(bus), what="the first write")
    assert await published(bus) == pods(1)


async def test_a_lone_change_after_a_quiet_period_is_written_without_waiting_for_the_batch_interval(harnesses, bus):
    # A batch interval far longer than the test's patience, and a clock the test moves:
    # only a write on the leading edge can pass.
    now = [0.0]
    h = harnesses(min_interval=30.0, clock=lambda: now[0])
    h.apply("added", service_doc("web", selector=WEB, cluster_ip="10.96.0.10"))
    h.sync()
    await eventually(lambda: _present(bus), what="the first write")
    now[0] += 31.0  # a quiet period longer than the interval
    h.apply("added", pod_doc("web-1", labels=WEB, ip="10.1.0.1"))
    await eventually(lambda: _equals(published(bus), pods(1)), timeout=10, what="the lone change")


async def _equals(coro, want):
    return await coro == want


async def test_a_burst_of_changes_is_coalesced_into_few_batches_and_ends_in_the_final_state(harnesses, bus):
    h = harnesses(min_interval=0.05)
    h.apply("added", service_doc("web", selector=WEB, cluster_ip="10.96.0.10"))
    h.sync()
    await eventually(lambda: _present(bus), what="the first write")
    before_writes, before_batches = h.writes(), h.batches()
    # A rollout: 40 pods arrive one by one, as Kubernetes watch events do, a few ms apart.
    started = time.monotonic()
    for i in range(1, 41):
        h.apply("added", pod_doc(f"web-{i}", labels=WEB, ip=f"10.1.0.{i}"))
        await asyncio.sleep(0.002)
    elapsed = time.monotonic() - started
    await eventually(lambda: _equals(published(bus), pods(*range(1, 41))), what="all 40 pods")
    batches = h.batches() - before_batches
    # At most one batch per interval (plus the leading one and the trailing one)...
    assert batches <= elapsed / 0.05 + 2
    # ...and a batch writes each of the service's two keys (name and cluster IP) at most
    # once: how the 40 changes fall into batches depends on the machine's pace.
    assert 2 <= h.writes() - before_writes <= 2 * batches
    assert batches < 40


async def test_an_unchanged_state_is_never_written_again(harnesses, bus):
    h = harnesses()
    for d in (service_doc("web", selector=WEB, cluster_ip="10.96.0.10"), pod_doc("web-1", labels=WEB, ip="10.1.0.1")):
        h.apply("added", d)
    h.sync()
    await eventually(lambda: _present(bus), what="the first write")
    revision = await revisions(bus, "demo.web.80")
    writes = h.writes()
    # Unready then ready again before the writer runs: nothing to write in the end.
    h.apply("modified", pod_doc("web-1", labels=WEB, ip="10.1.0.1", ready=False))
    h.apply("modified", pod_doc("web-1", labels=WEB, ip="10.1.0.1"))
    h.apply("added", service_doc("api", selector={"app": "api"}, cluster_ip="10.96.0.11"))  # a barrier with a real change
    await eventually(lambda: _present(bus, "demo.api.80"), what="the barrier")
    assert await revisions(bus, "demo.web.80") == revision
    assert h.writes() == writes + 2  # demo.api.80 and its cluster-IP key


async def test_a_new_leader_writes_only_real_differences_and_deletes_what_corresponds_to_nothing(harnesses, bus):
    docs = [service_doc("web", selector=WEB, cluster_ip="10.96.0.10"), pod_doc("web-1", labels=WEB, ip="10.1.0.1")]
    old = harnesses()
    for d in docs:
        old.apply("added", d)
    old.sync()
    await eventually(lambda: _present(bus), what="the old leader's write")
    await old.stop()
    revision = await revisions(bus, "demo.web.80")
    # Left over from a service deleted while no one was writing:
    await bus.put_raw(EP, "demo.gone.80", b'{"v":1,"namespace":"demo","service":"gone","port":80,"endpoints":[]}')

    new = harnesses()
    new.leader = False
    for d in docs:
        new.apply("added", d)
    new.sync()
    await eventually(lambda: new.state.desired, what="the standby compiling")
    new.leader = True
    new.writer.forget_written()  # what on_elected does
    await eventually(lambda: _absent(bus, "demo.gone.80"), what="the stale key deleted")
    await asyncio.wait_for(new.writer.caught_up.wait(), 5)
    assert await revisions(bus, "demo.web.80") == revision
    assert new.writes() == 1 and new.written == [((EP, "demo.gone.80"), None)]


async def _present(bus, key="demo.web.80"):
    return await bus.get_raw(EP, key) is not None


async def _absent(bus, key):
    return await bus.get_raw(EP, key) is None


async def test_a_writer_that_lost_the_lease_writes_nothing_more(harnesses, bus):
    h = harnesses()
    h.apply("added", service_doc("web", selector=WEB, cluster_ip="10.96.0.10"))
    h.sync()
    await eventually(lambda: _present(bus), what="the first write")
    writes = h.writes()
    h.leader = False
    h.apply("added", pod_doc("web-1", labels=WEB, ip="10.1.0.1"))
    # It keeps computing; the decision not to write follows in the same step.
    await eventually(lambda: h.writer.desired.get((EP, "demo.web.80"), b"").count(b"10.1.0.1"),
                     what="the standby compiling the change")
    assert h.writes() == writes and await published(bus) == set()


def test_an_endpoints_changed_event_names_added_and_removed_addresses():
    def es(*ips):
        return encode(schemas.EndpointSet("demo", "web", 80, [schemas.Endpoint(ip, 8080) for ip in ips]))

    data = endpoints_changed_event((EP, "demo.web.80"), es("10.1.0.1", "10.1.0.2"), es("10.1.0.2", "fd00::3"))
    assert data == {"namespace": "demo", "service": "web", "port": 80, "key": "demo.web.80",
                    "added": ["[fd00::3]:8080"], "removed": ["10.1.0.1:8080"], "endpoints": 2, "deleted": False}
    assert endpoints_changed_event((EP, "demo.web.80"), es("10.1.0.1"), None)["deleted"] is True
    assert endpoints_changed_event((EP, "_ip.10-96-0-1.80"), None, es("10.1.0.1")) is None
    assert endpoints_changed_event((schemas.PROFILES_BUCKET, "demo.web"), None, b"{}") is None


async def test_a_stray_key_in_the_bucket_is_cleaned_up_without_stopping_the_writer(harnesses, bus):
    """Whatever lies in the bucket — a key no service name makes — the leader deletes it and goes
    on, even when what it tells about each write fails on that key."""
    from services.destination.events import endpoints_changed_event

    await bus.put_raw(EP, "probe-without-a-port", b'{"v":1}')
    assert endpoints_changed_event((EP, "probe-without-a-port"), b"{}", None) is None
    h = harnesses()

    def fragile(key, old, new):
        if "." not in key[1]:
            raise ValueError("not enough values to unpack")
    h.writer.on_written = fragile
    h.apply("added", service_doc("web", selector=WEB, cluster_ip="10.96.0.10"))
    h.apply("added", pod_doc("web-1", labels=WEB, ip="10.1.0.1"))
    h.sync()
    await eventually(lambda: _present(bus), what="the leader's write")
    await eventually(lambda: _absent(bus, "probe-without-a-port"), what="the stray key deleted")
    assert not h.task.done()
