"""`tulle check`'s tulle-nats category over real nats-servers: the adapter both modes use
(tulle/check/gather_nats.py, logging in as the observer through the CLI's `connect_bus`)
and the shared checks over what it reads — a single server as `tulle up` runs it, and a
three-node JetStream cluster as `tulle up --nats-cluster 3` and the chart run it.

The streams are made by the services' own roles, as the services make them; each test
that changes one puts it back."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.bus_support import TESTER, MeshNats, MeshNatsCluster
from tests.conftest import eventually
from tulle import schemas
from tulle.check.core import Category, Result, evaluate
from tulle.check.gather_nats import read_bus
from tulle.check.local import NATS_ADVICE
from tulle.check.nats import nats_checks
from tulle.cli.common import BusTarget, connect_bus

CHECKS = [Category("tulle-nats", nats_checks(lambda facts: facts, NATS_ADVICE))]
# Which role makes which bucket when it starts (each may make the shared ones).
MAKERS = {"destination": (schemas.ENDPOINTS_BUCKET, schemas.PROFILES_BUCKET, schemas.LEASES_BUCKET),
          "policy": (schemas.POLICY_BUCKET,), "identity": (schemas.IDENTITY_BUCKET, schemas.PROXIES_BUCKET)}


def role_bus(server):
    """(role, replicas) -> a Bus of the test server for that role (TESTER: the harness's)."""
    return lambda role, replicas=1: server.bus(role, replicas=replicas)


async def make_stores(bus_of, replicas: int) -> None:
    """The buckets and the event stream, made by their writers with `replicas` copies."""
    for role, buckets in MAKERS.items():
        bus = bus_of(role, replicas)
        await bus.start()
        try:
            async def made() -> bool:
                # A cluster's JetStream answers once its nodes elected a leader: try again until then.
                try:
                    await bus.ensure_events_stream()
                    for bucket in buckets:
                        await bus.kv(bucket)
                    return True
                except Exception:
                    return False
            await eventually(made, 30, interval=0.2, what=f"{role} making its buckets")
        finally:
            await bus.close()


@contextlib.asynccontextmanager
async def started(bus):
    await bus.start()
    try:
        yield bus
    finally:
        await bus.close()


async def remake(bus_of, bucket: str, replicas: int) -> None:
    """The bucket's stream deleted and made again by its writer with `replicas` copies (the
    harness's user does what no Tulle role may: delete a stream)."""
    async with started(bus_of(TESTER)) as bus:
        await bus.js.delete_key_value(bucket)
    maker = next(role for role, buckets in MAKERS.items() if bucket in buckets)
    bus = bus_of(maker, replicas)
    await bus.start()
    try:
        await bus.kv(bucket)
    finally:
        await bus.close()


async def observe_async(server, *, servers: int, url: str = ""):
    """What `tulle check` reads of the bus (as gather_local does), and the report over it."""
    target = BusTarget(url or server.url, str(server.seed_file("observer")))
    facts = await read_bus(target, connect_bus, meshed=True, with_proxies=False, servers=servers)
    return facts, {r.description: r for r in evaluate(CHECKS, facts).results}


def observe(server, *, servers: int, url: str = ""):
    return asyncio.run(observe_async(server, servers=servers, url=url))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    server = MeshNats(tmp_path_factory.mktemp("single"), with_callout=False).start()
    asyncio.run(make_stores(role_bus(server), 1))
    yield server
    server.close()


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    cluster = MeshNatsCluster(tmp_path_factory.mktemp("trio"), with_callout=False).start()
    asyncio.run(make_stores(role_bus(cluster), 3))
    yield cluster
    cluster.close()


def test_a_single_server_with_its_streams_passes_every_check(single):
    facts, got = observe(single, servers=1)
    assert {d: r.result for d, r in got.items()} == {
        "can connect to NATS": Result.SUCCESS, "JetStream is enabled": Result.SUCCESS,
        "the KV buckets exist": Result.SUCCESS, "the event stream exists": Result.SUCCESS,
        "the NATS cluster is healthy": Result.SUCCESS, "the buckets' replicas match the NATS cluster": Result.SUCCESS}
    # The observer may read every stream's info: nothing was refused (a refusal is a timeout, said as an error).
    assert sorted(facts.streams) == sorted([f"KV_{b}" for bs in MAKERS.values() for b in bs] + [schemas.EVENTS_STREAM])
    assert all(not s.error and s.replicas == 1 and not s.clustered for s in facts.streams.values())


def test_a_cluster_of_three_with_three_copies_of_every_stream_is_healthy(trio):
    facts, got = observe(trio, servers=3)
    assert all(r.result is Result.SUCCESS for r in got.values()), [(d, r.error) for d, r in got.items()]
    assert facts.cluster_name == "tulle"
    endpoints = facts.streams[f"KV_{schemas.ENDPOINTS_BUCKET}"]
    assert endpoints.clustered and endpoints.leader and endpoints.replicas == 3
    assert sorted([endpoints.leader] + [p.name for p in endpoints.peers]) == ["tulle-0", "tulle-1", "tulle-2"]


def test_a_bucket_with_fewer_copies_than_the_servers_is_a_warning_with_a_hint(trio):
    asyncio.run(remake(role_bus(trio), schemas.POLICY_BUCKET, 1))
    try:
        _, got = observe(trio, servers=3)
    finally:
        asyncio.run(remake(role_bus(trio), schemas.POLICY_BUCKET, 3))
    r = got["the buckets' replicas match the NATS cluster"]
    assert r.result is Result.WARNING
    assert r.error == ("KV_tulle-policy keeps 1 copy, not 3\n"
                       "the installation runs 3 NATS servers, so each stream should keep 3")
    assert "makes KV_tulle-policy afresh with 3" in r.hint
    assert got["the NATS cluster is healthy"].result is Result.SUCCESS


def test_a_single_server_where_three_are_meant_is_an_error(single):
    _, got = observe(single, servers=3)
    r = got["the NATS cluster is healthy"]
    assert r.result is Result.ERROR and r.error.endswith("is not part of a cluster: the installation runs 3 NATS servers")
    assert "tulle logs --component nats" in r.hint
    assert got["the buckets' replicas match the NATS cluster"].result is Result.WARNING


def test_nats_unreachable_is_an_error_with_a_hint_and_nothing_after_it_is_judged(single, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    facts, got = observe(single, servers=1, url=f"nats://127.0.0.1:{port}")
    r = got["can connect to NATS"]
    assert r.result is Result.ERROR and r.error.startswith(f"cannot connect to nats://127.0.0.1:{port}: cannot reach NATS")
    assert r.hint == NATS_ADVICE.unreachable
    assert list(got) == ["can connect to NATS"]


def test_a_server_down_leaves_its_copies_behind_a_warning_naming_it(tmp_path):
    cluster = MeshNatsCluster(tmp_path / "nats", with_callout=False).start()

    async def warned():
        # The leaders notice a silent peer after some seconds without its heartbeats (and a
        # stream whose leader was tulle-2 first elects another: an error until then).
        facts, got = await observe_async(cluster, servers=3)
        r = got.get("the NATS cluster is healthy")
        if r is None or r.result is not Result.WARNING:
            return None
        lines = r.error.splitlines()  # one line for the one server down, naming every stream
        return r if len(lines) == 1 and lines[0].startswith("the copies on tulle-2 are not current: ") and all(
            name in lines[0] for name in facts.streams) else None
    try:
        asyncio.run(make_stores(role_bus(cluster), 3))
        cluster.nodes[2].kill()
        got = asyncio.run(eventually(warned, 90, interval=1.0, what="the check seeing tulle-2's copies fall behind"))
    finally:
        cluster.close()
    assert "a NATS server is down" in got.hint and "tulle logs --component nats" in got.hint
