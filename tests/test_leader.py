"""The writer lease (tulle/leader.py) against a real nats-server: one writer at a time,
handed over when the holder leaves or dies."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.bus_support import TESTER, bus_for
from tests.conftest import eventually
from tulle import schemas
from tulle.bus import Bus
from tulle.codec import decode
from tulle.leader import LeaderElection


@pytest.fixture
async def make(nats_url):
    made: list[tuple[Bus, LeaderElection, asyncio.Task]] = []

    async def start(name: str, url: str | None = None, **kw) -> LeaderElection:
        bus = bus_for(url or nats_url, TESTER, component="test")
        await bus.start()
        election = LeaderElection(bus, name, **kw)
        election.task = asyncio.ensure_future(election.run())
        made.append((bus, election, election.task))
        return election

    yield start
    for bus, election, task in made:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await election.release()
        await bus.close()


def lease_name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


async def test_only_one_replica_holds_the_lease_and_the_key_names_it(make):
    name = lease_name()
    a, b = await make(name), await make(name)
    await eventually(lambda: a.is_leader() or b.is_leader(), what="a leader")
    await eventually(lambda: a.held_elsewhere or b.held_elsewhere, what="the standby seeing the holder")
    assert a.is_leader() != b.is_leader()
    leader = a if a.is_leader() else b
    raw = await leader.bus.get_raw(schemas.LEASES_BUCKET, name)
    assert decode(schemas.Lease, raw).holder == leader.holder


async def test_a_released_lease_is_free_at_once_and_the_standby_takes_it(make):
    name = lease_name()
    a = await make(name)
    await eventually(a.is_leader, what="a leads")
    b = await make(name)
    await eventually(lambda: b.held_elsewhere, what="b sees a")
    await a.release()
    assert not a.is_leader()
    assert await a.bus.get_raw(schemas.LEASES_BUCKET, name) is None
    await eventually(b.is_leader, what="b takes over")


async def test_the_lease_of_a_holder_that_died_expires_and_is_taken_over(make, nats_url):
    name = lease_name()
    lost = []
    a = await make(name)
    await eventually(a.is_leader, what="a leads")
    b = await make(name, on_elected=lambda: lost.append("b elected"))
    await eventually(lambda: b.held_elsewhere, what="b sees a")
    # a dies: no more renewals, no release.
    a.release = _noop  # the fixture must not release it either
    a.task.cancel()
    await asyncio.gather(a.task, return_exceptions=True)
    await a.bus.close()
    await eventually(b.is_leader, timeout=15, what="b takes over after the TTL")
    assert lost == ["b elected"]


async def _noop():
    return None


async def test_a_holder_that_cannot_renew_stops_leading_and_says_so(own_nats, make):
    lost = asyncio.Event()
    a = await make(lease_name(), url=own_nats.url, on_lost=lost.set)
    await eventually(a.is_leader, what="a leads")
    own_nats.stop()
    await asyncio.wait_for(lost.wait(), 15)
    assert not a.is_leader()
    own_nats.start()
    await eventually(a.is_leader, timeout=20, what="a leads again once NATS is back and the old lease expired")


async def test_a_holder_whose_lease_was_taken_notices_at_its_next_renewal(make, nats_url):
    name = lease_name()
    lost = asyncio.Event()
    a = await make(name, on_lost=lost.set)
    await eventually(a.is_leader, what="a leads")
    # Someone deletes the key and another process creates it (as after an expiry).
    kv = await a.bus.kv(schemas.LEASES_BUCKET)
    await kv.delete(name)
    await kv.create(name, b'{"v":1,"holder":"intruder","component":"test"}')
    await asyncio.wait_for(lost.wait(), 10)
    assert not a.is_leader()
