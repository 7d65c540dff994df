"""The destination service in local mode, as real processes against a real nats-server:
what a proxy watching KV, and a person running `tulle endpoints`, see."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bus_support import TESTER, bus_for, cli_bus_args
from tests.conftest import REPO, eventually
from tests.destination_objects import ID, pod_doc, profile_doc, service_doc
from tests.destination_proc import DestinationProcess, KVRecorder, addresses, write_manifest
from tulle import schemas
from tulle.bus import Bus
from tulle.sources.folder import local_cluster_ip

WEB = {"app": "web"}
WEB_ID = ID.format(sa="web", ns="demo")
EP = schemas.ENDPOINTS_BUCKET


@pytest.fixture
def folders(tmp_path):
    user, runtime = tmp_path / "manifests", tmp_path / "state" / "runtime"
    user.mkdir()
    runtime.mkdir(parents=True)
    return user, runtime


@pytest.fixture
def start_destination(own_nats, folders, tmp_path):
    made: list[DestinationProcess] = []

    def start(*extra: str) -> DestinationProcess:
        user, runtime = folders
        d = DestinationProcess(own_nats.url, ["--manifests", str(user), "--manifests", str(runtime), *extra],
                               tmp_path / f"destination-{len(made)}.log").start()
        made.append(d)
        return d

    yield start
    for d in made:
        d.stop()


@pytest.fixture
async def bus(own_nats):
    b = bus_for(own_nats.url, TESTER, component="test")
    await b.start()
    yield b
    await b.close()


def web_pod(i: int, **kw) -> dict:
    return pod_doc(f"web-{i}", labels=WEB, ip=f"127.0.1.{i}", sa="web",
                   annotations={"tulle.dev/proxy-inbound-port": "4143"}, **kw)


def cli_endpoints(nats_url: str, *args: str) -> subprocess.CompletedProcess:
    tulle = str(Path(sys.executable).with_name("tulle"))  # the installed command, as a person runs it
    return subprocess.run([tulle, "endpoints", *args, *cli_bus_args(nats_url)],
                          cwd=REPO, capture_output=True, text=True, timeout=30)


async def test_scaling_a_local_service_from_one_to_three_and_back_reaches_watchers_and_the_cli(
        start_destination, folders, bus, own_nats):
    user, runtime = folders
    write_manifest(user / "web.yaml", service_doc("web", selector=WEB, ports=[{"name": "http", "port": 80,
                                                                                "targetPort": "http"}]))
    write_manifest(runtime / "web-1.yaml", web_pod(1))
    recorder = KVRecorder(bus, "demo.web.>")
    await start_destination().ready_soon()
    one = [("127.0.1.1", WEB_ID)]
    await recorder.until(lambda s: addresses(s) == one, "one endpoint")

    lags = []
    for pods, want in (([2, 3], [1, 2, 3]), ([], [1])):
        t0 = time.monotonic()
        for i in pods:
            write_manifest(runtime / f"web-{i}.yaml", web_pod(i))
        if not pods:
            (runtime / "web-2.yaml").unlink()
            (runtime / "web-3.yaml").unlink()
        expected = [(f"127.0.1.{i}", WEB_ID) for i in want]
        await recorder.until(lambda s: addresses(s) == expected, f"endpoints {want}")
        lags.append(time.monotonic() - t0)
        # The CLI reads the same thing from the bus.
        got = cli_endpoints(own_nats.url, "web.demo:80", "-o", "json")
        assert got.returncode == 0, got.stderr
        rows = json.loads(got.stdout)
        assert [(r["ip"], r["port"], r["identity"], r["proxy_port"], r["weight"]) for r in rows] == [
            (f"127.0.1.{i}", 8080, WEB_ID, 4143, 10000) for i in want]
    print(f"manifest change -> KV watcher: {[round(x * 1000) for x in lags]} ms")
    recorder.close()


async def test_a_service_lookup_works_by_cluster_ip_and_the_table_names_identities(
        start_destination, folders, bus, own_nats):
    user, runtime = folders
    write_manifest(user / "web.yaml", service_doc("web", selector=WEB))
    write_manifest(runtime / "web-1.yaml", web_pod(1))
    ip = local_cluster_ip("demo", "web")
    recorder = KVRecorder(bus, f"{schemas.ip_endpoints_key(ip, 80)}")
    await start_destination().ready_soon()
    await recorder.until(lambda s: s and next(iter(s.values())).service == "web", "the cluster-IP key")
    by_ip = cli_endpoints(own_nats.url, f"{ip}:80")
    assert by_ip.returncode == 0, by_ip.stderr
    lines = by_ip.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "IP", "PORT", "POD", "SERVICE", "IDENTITY", "PROTOCOL", "WEIGHT"]
    assert lines[1].split() == ["demo", "127.0.1.1", "8080", "web-1", "web.demo", WEB_ID, "-", "10000"]
    unknown = cli_endpoints(own_nats.url, "nope.demo")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.strip() == "tulle: no endpoints published for nope.demo (unknown service or port)"
    recorder.close()


async def test_a_service_without_ready_endpoints_is_published_empty_and_a_deleted_one_disappears(
        start_destination, folders, bus, own_nats):
    user, runtime = folders
    write_manifest(user / "web.yaml", service_doc("web", selector=WEB))
    write_manifest(runtime / "web-1.yaml", web_pod(1, ready=False))
    ip_key = schemas.ip_endpoints_key(local_cluster_ip("demo", "web"), 80)
    recorder = KVRecorder(bus, ">")
    await start_destination().ready_soon()
    await recorder.until(lambda s: addresses(s) == [] and ip_key in s, "an empty endpoint set")
    empty = cli_endpoints(own_nats.url, "web.demo")
    assert empty.returncode == 0 and "web.demo has no ready endpoints" in empty.stderr
    (user / "web.yaml").unlink()
    await recorder.until(lambda s: "demo.web.80" not in s and ip_key not in s, "both keys deleted")
    recorder.close()


async def test_a_manifest_edit_that_changes_nothing_published_writes_nothing(start_destination, folders, bus):
    user, runtime = folders
    write_manifest(user / "web.yaml", service_doc("web", selector=WEB), service_doc("api", selector={"app": "api"}))
    write_manifest(runtime / "web-1.yaml", web_pod(1))
    recorder = KVRecorder(bus, ">")
    d = start_destination()
    await d.ready_soon()
    await recorder.until(lambda s: addresses(s) == [("127.0.1.1", WEB_ID)] and "demo.api.80" in s, "first sync")
    writes = d.metric("tulle_destination_writes_total")
    web_revisions = len(recorder.history("demo.web.80"))

    # A label no selector reads, and a rewrite of the same content: nothing to publish.
    write_manifest(runtime / "web-1.yaml", {**web_pod(1), "metadata": {**web_pod(1)["metadata"],
                                                                       "labels": {**WEB, "version": "v2"}}})
    write_manifest(user / "web.yaml", service_doc("web", selector=WEB), service_doc("api", selector={"app": "api"}))
    # A real change after them, as a barrier: once it is in KV, the edits above were handled.
    write_manifest(runtime / "api-1.yaml", pod_doc("api-1", labels={"app": "api"}, ip="127.0.2.1"))
    await recorder.until(lambda s: addresses(s, "demo.api.80") == [("127.0.2.1", ID.format(sa="default", ns="demo"))],
                         "the barrier change")
    assert len(recorder.history("demo.web.80")) == web_revisions
    # The writer counts a write when NATS acknowledges it, which can be after a watcher saw it.
    await eventually(lambda: d.metric("tulle_destination_writes_total") >= writes + 2, what="the writes counted")
    assert d.metric("tulle_destination_writes_total") == writes + 2  # demo.api.80 and its cluster-IP key
    recorder.close()


async def test_each_change_of_an_endpoint_set_is_announced_as_a_cloudevent(start_destination, folders, bus):
    user, runtime = folders
    write_manifest(user / "web.yaml", service_doc("web", selector=WEB))
    write_manifest(runtime / "web-1.yaml", web_pod(1))
    events: asyncio.Queue = asyncio.Queue()

    async def on_event(msg):
        await events.put(schemas.decode_event(msg.data))

    await bus.subscribe_raw("tulle.events.destination.endpoints-changed", on_event)
    await bus.sync()
    await start_destination().ready_soon()
    first = await asyncio.wait_for(events.get(), 10)
    assert first.type == "dev.tulle.destination.endpoints-changed"
    assert first.data["added"] == ["127.0.1.1:8080"] and first.data["removed"] == []
    write_manifest(runtime / "web-2.yaml", web_pod(2))
    (runtime / "web-1.yaml").unlink()
    seen = {"added": set(), "removed": set()}
    while seen != {"added": {"127.0.1.2:8080"}, "removed": {"127.0.1.1:8080"}}:
        ev = await asyncio.wait_for(events.get(), 10)
        assert (ev.data["namespace"], ev.data["service"], ev.data["port"]) == ("demo", "web", 80)
        seen["added"] |= set(ev.data["added"])
        seen["removed"] |= set(ev.data["removed"])


async def test_profiles_are_published_for_services_that_have_one_and_deleted_with_it(start_destination, folders, bus):
    user, _ = folders
    write_manifest(user / "web.yaml", service_doc("web", selector=WEB),
                   profile_doc("web", routes=[{"name": "books", "condition": {"pathRegex": "/books"},
                                               "timeout": "250ms"}]))
    d = start_destination()
    await d.ready_soon()
    profile = await eventually(lambda: bus.get(schemas.PROFILES_BUCKET, "demo.web", schemas.Profile), what="profile")
    assert [(r.name, r.timeout_ms) for r in profile.routes] == [("books", 250)]
    assert profile.retry_budget == schemas.RetryBudget(0.2, 10, 10000)
    write_manifest(user / "web.yaml", service_doc("web", selector=WEB))
    await eventually(lambda: _absent(bus, schemas.PROFILES_BUCKET, "demo.web"), what="profile deleted")


async def _absent(bus, bucket, key):
    return await bus.get_raw(bucket, key) is None


async def test_killing_the_writer_hands_over_to_the_standby_without_duplicate_or_lost_updates(
        start_destination, folders, bus):
    user, runtime = folders
    write_manifest(user / "web.yaml", service_doc("web", selector=WEB), service_doc("api", selector={"app": "api"}))
    write_manifest(runtime / "web-1.yaml", web_pod(1))
    write_manifest(runtime / "api-1.yaml", pod_doc("api-1", labels={"app": "api"}, ip="127.0.2.1"))
    recorder = KVRecorder(bus, ">")
    first = start_destination()
    await first.ready_soon()
    second = start_destination()
    await second.ready_soon()  # ready as a standby: it has the state and has seen the writer
    await recorder.until(lambda s: addresses(s) == [("127.0.1.1", WEB_ID)], "first sync")
    leaders = [d for d in (first, second) if d.is_leader()]
    assert len(leaders) == 1
    leader, standby = leaders[0], (second if leaders[0] is first else first)

    leader.kill()
    killed = time.monotonic()
    # A change while nobody writes must not be lost.
    write_manifest(runtime / "web-2.yaml", web_pod(2))
    await recorder.until(lambda s: addresses(s) == [("127.0.1.1", WEB_ID), ("127.0.1.2", WEB_ID)],
                         "the change made while there was no writer", timeout=20)
    print(f"takeover after SIGKILL: {time.monotonic() - killed:.2f} s")
    assert standby.is_leader()
    # And one after the takeover.
    (runtime / "web-1.yaml").unlink()
    await recorder.until(lambda s: addresses(s) == [("127.0.1.2", WEB_ID)], "a change after the takeover")

    web = [sorted(e.address for e in v.endpoints) for v in recorder.history("demo.web.80")]
    assert web == [["127.0.1.1"], ["127.0.1.1", "127.0.1.2"], ["127.0.1.2"]]  # each state once, none lost
    assert len(recorder.history("demo.api.80")) == 1  # untouched by the takeover
    await eventually(lambda: standby.metric("tulle_destination_writes_total") >= 4, what="the writes counted")
    assert standby.metric("tulle_destination_writes_total") == 4  # web and its IP key, twice
    recorder.close()


def test_bad_flags_get_one_line_and_exit_2(own_nats):
    got = subprocess.run([sys.executable, "-m", "services.destination", "--nats", own_nats.url, "--admin",
                          "127.0.0.1:0"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert got.returncode == 2
    assert got.stderr.strip().splitlines()[-1] == (
        "tulle destination: give either --manifests DIR (one or more) or --kubernetes")
