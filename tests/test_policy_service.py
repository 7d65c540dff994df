"""The policy service as a real process against a real nats-server: what proxies watching
`tulle-policy` see, and what a person watching the events sees."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
import yaml

from tulle.policy import InboundPolicy
from tests.bus_support import TESTER, bus_for
from tests.conftest import REPO, eventually
from tests.policy_support import (PolicyProcess, pod_doc, saz_doc, server_doc, service_accounts,
                                  write_manifest)
from tulle import schemas
from tulle.bus import Bus
from tulle.schemas import identity_name

BUCKET = schemas.POLICY_BUCKET
WEB = identity_name("web", "demo")
TRAFFIC = identity_name("traffic", "demo")


@pytest.fixture
async def bus(own_nats):
    b = bus_for(own_nats.url, TESTER, component="test")
    await b.start()
    yield b
    await b.close()


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "manifests"
    write_manifest(d / "pods.yaml",
                   pod_doc("web", ports=(("http", 8080),), probes=(("readinessProbe", "/ready", "http"),)),
                   pod_doc("books", ports=(("grpc", 9090),), ip="10.42.0.11"),
                   pod_doc("legacy", meshed=False, ip="10.42.0.12"))
    write_manifest(d / "policy.yaml", server_doc("books", "grpc", protocol="gRPC"),
                   saz_doc("books-from-web", "books", service_accounts("web")))
    return d


@pytest.fixture
def start(own_nats, tmp_path):
    procs: list[PolicyProcess] = []

    def run(*args: str, env: dict | None = None) -> PolicyProcess:
        p = PolicyProcess(own_nats.url, list(args), tmp_path / f"policy-{len(procs)}.log", env).start()
        procs.append(p)
        return p

    yield run
    for p in procs:
        p.stop()


async def policy(bus: Bus, key: str) -> schemas.WorkloadPolicy | None:
    try:
        return await bus.get(BUCKET, key, schemas.WorkloadPolicy)
    except Exception:  # the bucket does not exist yet
        return None


async def revision(bus: Bus, key: str) -> int:
    return (await (await bus.kv(BUCKET)).get(key)).revision


def decider(wp: schemas.WorkloadPolicy) -> InboundPolicy:
    p = InboundPolicy("deny")
    p.update(wp)
    return p


async def events(bus: Bus, type_: str) -> asyncio.Queue:
    queue: asyncio.Queue = asyncio.Queue()

    async def on_msg(msg):
        queue.put_nowait(schemas.decode_event(msg.data))

    await bus.subscribe_raw(f"tulle.events.policy.{type_}", on_msg)
    await bus.sync()
    return queue


async def test_a_started_service_publishes_each_meshed_workloads_policy(bus, folder, start):
    svc = start("--manifests", str(folder), "--default-policy", "cluster-authenticated")
    await svc.wait_ready()
    assert sorted(await bus.keys(BUCKET)) == ["demo.books", "demo.web"]  # the unmeshed pod has none
    books = await policy(bus, "demo.books")
    assert books.default_policy == "cluster-authenticated"
    (port,) = books.ports
    assert (port.port, port.server, port.protocol, port.source) == (9090, "books", "gRPC", "Server demo/books")
    assert [(a.name, a.identities) for a in port.authorizations] == [("books-from-web", [WEB])]
    web = await policy(bus, "demo.web")
    assert [(p.port, p.server) for p in web.ports] == [(8080, "default:cluster-authenticated")]
    assert decider(web).decide_request(8080, "203.0.113.9", None, False, "GET", "/ready").allowed
    assert svc.metric("tulle_policy_workloads") == 2


async def test_editing_a_server_authorization_changes_the_policy_and_only_that_workloads_key(bus, folder, start):
    svc = start("--manifests", str(folder))
    await svc.wait_ready()
    web_revision = await revision(bus, "demo.web")
    assert decider(await policy(bus, "demo.books")).decide_connection(9090, "10.42.0.10", WEB, True).allowed

    edited = time.monotonic()
    write_manifest(folder / "policy.yaml", server_doc("books", "grpc", protocol="gRPC"),
                   saz_doc("books-from-web", "books", service_accounts("traffic")))

    async def traffic_allowed():
        wp = await policy(bus, "demo.books")
        return decider(wp).decide_connection(9090, "10.42.0.13", TRAFFIC, True).allowed

    await eventually(traffic_allowed, what="the edited ServerAuthorization in KV")
    print(f"edit -> KV: {time.monotonic() - edited:.3f}s")
    assert not decider(await policy(bus, "demo.books")).decide_connection(9090, "10.42.0.10", WEB, True).allowed
    assert await revision(bus, "demo.web") == web_revision  # nothing changed there: not rewritten


async def test_a_restarted_service_rewrites_nothing_that_is_already_right(bus, folder, start):
    first = start("--manifests", str(folder))
    await first.wait_ready()
    before = {k: await revision(bus, k) for k in await bus.keys(BUCKET)}
    first.stop()
    second = start("--manifests", str(folder))
    await second.wait_ready()
    assert {k: await revision(bus, k) for k in await bus.keys(BUCKET)} == before
    assert second.metric("tulle_policy_writes_total", op="put") == 0


async def test_a_workload_that_goes_away_loses_its_key(bus, folder, start):
    svc = start("--manifests", str(folder))
    await svc.wait_ready()
    write_manifest(folder / "pods.yaml", pod_doc("books", ports=(("grpc", 9090),)))
    async def only_books():
        return await bus.keys(BUCKET) == ["demo.books"]

    await eventually(only_books, what="demo.web deleted from tulle-policy")


async def test_an_invalid_server_authorization_is_reported_and_the_rest_keeps_being_served(bus, folder, start):
    svc = start("--manifests", str(folder))
    await svc.wait_ready()
    invalid = await events(bus, "invalid-resource")
    bad = saz_doc("broken", "books", {"meshTLS": {"identities": ["web.*.cluster.local"]}})
    write_manifest(folder / "broken.yaml", bad)
    ev = await asyncio.wait_for(invalid.get(), 10)
    assert ev.type == "dev.tulle.policy.invalid-resource" and ev.source.startswith("/tulle/policy/")
    assert ev.data["error"] == (f"{folder}/broken.yaml: document 1 (ServerAuthorization demo/broken): "
                                "spec.client.meshTLS.identities[0]: 'web.*.cluster.local': "
                                "a wildcard is '*' or a '*.' prefix only")
    lines = [json.loads(line) for line in svc.log.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("event") == "invalid resource" and line.get("error") == ev.data["error"]
               and line.get("component") == "policy" for line in lines)
    # Still serving: a valid change elsewhere is published.
    write_manifest(folder / "policy.yaml", server_doc("books", "grpc", protocol="gRPC"),
                   saz_doc("books-from-web", "books", service_accounts("web", "traffic")))

    async def both():
        return sorted((await policy(bus, "demo.books")).ports[0].authorizations[0].identities) == sorted([TRAFFIC, WEB])

    await eventually(both, what="the valid edit published")
    assert svc.alive()


async def test_a_second_server_on_the_same_pod_port_is_rejected_with_an_event(bus, folder, start):
    svc = start("--manifests", str(folder))
    await svc.wait_ready()
    invalid = await events(bus, "invalid-resource")
    write_manifest(folder / "dup.yaml", server_doc("books-copy", 9090, app="books"))
    ev = await asyncio.wait_for(invalid.get(), 10)
    assert ev.data["kind"] == "Server" and ev.data["name"] == "books-copy" and ev.data["reason"] == "rejected"
    assert "which Server books already selects" in ev.data["error"]
    assert svc.metric("tulle_policy_rejected_objects") == 1
    assert (await policy(bus, "demo.books")).ports[0].server == "books"


async def test_two_replicas_write_from_one_and_the_other_takes_over(bus, folder, start):
    a = start("--manifests", str(folder))
    await a.wait_ready()
    b = start("--manifests", str(folder))
    await b.wait_ready()
    leader, standby = (a, b) if a.is_leader() else (b, a)
    assert not standby.is_leader()
    leader.stop()
    await eventually(standby.is_leader, what="the standby taking the lease")
    write_manifest(folder / "policy.yaml", server_doc("books", "grpc", protocol="gRPC"),
                   saz_doc("books-from-web", "books", service_accounts("traffic")))

    async def traffic_only():
        return (await policy(bus, "demo.books")).ports[0].authorizations[0].identities == [TRAFFIC]

    await eventually(traffic_only, what="the new writer publishing the edit")


def test_bad_flags_are_one_line_and_exit_2(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "services.policy", "--nats", "nats://127.0.0.1:1",
                               "--admin", "127.0.0.1:0", *args], cwd=REPO, capture_output=True, text=True, timeout=30)

    r = run("--manifests", str(tmp_path), "--cluster-networks", "10.0.0.0/8,nope")
    assert r.returncode == 2 and "--cluster-networks: 'nope' is not a CIDR such as 10.0.0.0/8" in r.stderr
    r = run("--manifests", str(tmp_path), "--default-policy", "allow")
    assert r.returncode == 2 and "invalid choice: 'allow'" in r.stderr
    r = run()
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        "tulle policy: give either --manifests DIR (one or more) or --kubernetes"
    assert "Traceback" not in r.stderr


# --- Kubernetes mode ------------------------------------------------------------------------------------


@pytest.fixture
def kube(tmp_path):
    from tests.fakekube import FakeKube

    k = FakeKube(bookmark_interval=0.2).start()
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": k.url}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
    k.kubeconfig = str(config)
    yield k
    k.stop()


async def test_in_kubernetes_mode_an_invalid_object_is_reported_without_crashing(bus, kube, start):
    kube.apply({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "demo", "annotations": {"config.tulle.dev/default-inbound-policy": "deny"}}})
    kube.apply(pod_doc("books", ports=(("grpc", 9090),)))
    kube.apply(server_doc("books", "grpc"))
    invalid = await events(bus, "invalid-resource")
    svc = start("--kubernetes", env={"KUBECONFIG": kube.kubeconfig})
    await svc.wait_ready()
    books = await policy(bus, "demo.books")
    assert books.default_policy == "deny" and books.ports[0].server == "books" and books.ports[0].authorizations == []

    kube.apply(saz_doc("both", "books", {"unauthenticated": True, "meshTLS": {"unauthenticatedTLS": True}}))
    ev = await asyncio.wait_for(invalid.get(), 10)
    assert ev.data["error"] == ("ServerAuthorization demo/both: spec.client: set exactly one of meshTLS or "
                                "unauthenticated: true")
    kube.apply(saz_doc("web", "books", service_accounts("web")))

    async def web_allowed():
        return decider(await policy(bus, "demo.books")).decide_connection(9090, "10.1.1.1", WEB, True).allowed

    await eventually(web_allowed, what="the valid ServerAuthorization published")
    assert svc.alive()


def test_kubernetes_mode_without_any_cluster_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "services.policy", "--nats", "nats://127.0.0.1:1", "--admin",
                        "127.0.0.1:0", "--kubernetes"], cwd=REPO, capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")})
    assert r.returncode == 2, r.stderr
    assert "no Kubernetes API to talk to" in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr


async def test_flipping_an_authorization_turns_a_client_from_allowed_to_denied_and_back_and_never_denies_others(
        bus, folder, start):
    from proxy.policy_watch import PolicyWatcher

    svc = start("--manifests", str(folder))
    await svc.wait_ready()
    proxy_bus = bus_for(bus.url, "proxy:demo/books")
    await proxy_bus.start()
    policy = InboundPolicy("deny")
    watcher = PolicyWatcher(proxy_bus, "demo", "books", policy)
    watch = asyncio.ensure_future(watcher.run())
    web_denied: list[str] = []
    stop = asyncio.Event()

    async def traffic_from_web():  # a steady stream of requests that must all stay allowed
        while not stop.is_set():
            d = policy.decide_request(9090, "10.42.0.10", WEB, True, "POST", "/books.Books/List")
            if policy.has_policy and not d.allowed:
                web_denied.append(d.reason)
            await asyncio.sleep(0.002)

    flow = asyncio.ensure_future(traffic_from_web())
    try:
        await asyncio.wait_for(watcher.first.wait(), 10)

        def traffic_allowed() -> bool:
            return policy.decide_request(9090, "10.42.0.13", TRAFFIC, True, "POST", "/books.Books/List").allowed

        assert not traffic_allowed()
        for accounts, want in [(("web", "traffic"), True), (("web",), False), (("web", "traffic"), True)]:
            edited = time.monotonic()
            write_manifest(folder / "policy.yaml", server_doc("books", "grpc", protocol="gRPC"),
                           saz_doc("books-from-web", "books", service_accounts(*accounts)))
            await eventually(lambda: traffic_allowed() is want, what=f"traffic allowed={want}")
            print(f"folder edit -> decision in the proxy's core: {time.monotonic() - edited:.3f}s")
        assert web_denied == []
    finally:
        stop.set()
        watch.cancel()
        await asyncio.gather(flow, watch, return_exceptions=True)
        await proxy_bus.close()
