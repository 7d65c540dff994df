"""The bus as a cluster: a real three-node JetStream cluster of nats-servers on loopback
(the Helm chart's StatefulSet of 3), with the mesh's authorization on every node and
mutual TLS between them.

The failover test runs real processes only — the identity service (certificates and
the proxies' bus logins through auth callout), two `python -m proxy` carrying steady
meshed traffic, nats-server ×3 — kills each node in turn with SIGKILL, and asserts what a
user would notice: no request fails, no acknowledged KV write is lost, every watcher ends
at the last value, and every proxy is back on the bus (logged in again, through identity,
on another node).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import nats.errors
import pytest

from tests.bus_support import TESTER, MeshNatsCluster, bus_for
from tests.conftest import REPO, wait_until
from tests.identity_support import IdentityProcess, make_issuer_dir, token_file, token_secret
from tests.proxy_support import AppServer, LoopThread, put_policy, unique_ns, workload_policy
from tulle import busauth, schemas
from tulle.bus import Bus, Change, Snapshot, server_urls
from tulle.metrics import sample
from tulle.natsserver import NatsServer, free_port

CLUSTER_SIZE = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three nodes; identity (started by the test) answers the proxies' logins itself."""
    c = MeshNatsCluster(tmp_path_factory.mktemp("nats-cluster"), size=CLUSTER_SIZE, with_callout=False).start()
    yield c
    c.close()


def monitor(node: NatsServer, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}{path}", timeout=5) as r:
        return json.loads(r.read())


def connection_names(node: NatsServer) -> set[str]:
    """The client connections a node holds, by the name each client gave (`proxy/<ns>.<pod>`)."""
    return {c.get("name", "") for c in monitor(node, "/connz?limit=1000").get("connections") or []}


# --- configuration and clients ---------------------------------------------------------------------


def test_a_bus_url_may_list_every_node_of_a_cluster():
    assert server_urls("nats://a:4222") == ["nats://a:4222"]
    assert server_urls("tls://a:4222, tls://b:4222,tls://c:4222") == ["tls://a:4222", "tls://b:4222", "tls://c:4222"]
    with pytest.raises(ValueError):
        server_urls(" , ")


def test_replicas_are_a_flag_and_a_variable_from_1_to_5(capsys):
    from tulle.bus import replicas_from_env
    from tulle.errors import UserError
    from tulle.service import parse_args

    assert parse_args("policy", ["--nats-replicas", "3"]).nats_replicas == 3
    assert parse_args("policy", []).nats_replicas == int(os.environ.get("TULLE_NATS_REPLICAS") or 1)
    with pytest.raises(SystemExit) as e:
        parse_args("policy", ["--nats-replicas", "7"])
    assert e.value.code == 2 and "--nats-replicas: expected a number from 1 to 5, got '7'" in capsys.readouterr().err
    assert replicas_from_env({"TULLE_NATS_REPLICAS": "3"}) == 3 and replicas_from_env({}) == 1
    with pytest.raises(UserError, match="TULLE_NATS_REPLICAS: expected a number from 1 to 5, got 'three'"):
        replicas_from_env({"TULLE_NATS_REPLICAS": "three"})


def test_cluster_routes_require_the_nodes_certificate(tmp_path):
    keys = busauth.ensure_keys(tmp_path / "keys")
    spec = busauth.ClusterSpec("tulle", "127.0.0.1:6222", ("nats-route://127.0.0.1:6222",),
                               busauth.TLSFiles("/tls/tls.crt", "/tls/tls.key", "/tls/ca.crt"))
    conf = busauth.server_config(keys, busauth.ServerOptions(listen="127.0.0.1:4222", store_dir="/data",
                                                             server_name="n0", cluster=spec))
    cluster_block = conf[conf.index("cluster {"):conf.index("accounts {")]
    assert 'ca_file: "/tls/ca.crt"' in cluster_block and "verify: true" in cluster_block
    with pytest.raises(ValueError, match="CA"):
        busauth.server_config(keys, busauth.ServerOptions(
            listen="127.0.0.1:4222", store_dir="/data", server_name="n0",
            cluster=busauth.ClusterSpec("tulle", "127.0.0.1:6222", (), busauth.TLSFiles("/c", "/k"))))


def test_a_server_without_the_route_certificate_cannot_join_the_cluster(cluster, tmp_path):
    """An attacker who reaches the nodes' route ports starts their own nats-server and
    points its routes at them, trusting the cluster's CA (a public certificate) but with a
    key of their own: each node refuses the route, so the rogue never sees a message."""
    from tulle.local.identity import ensure_bus_tls

    own = ensure_bus_tls(tmp_path / "own-tls", "127.0.0.1")
    cluster_routes = cluster.nodes[0].cluster
    rogue_tls = busauth.TLSFiles(own.cert_file, own.key_file, cluster_routes.route_tls.ca_file)
    rogue = NatsServer(tmp_path / "rogue", keys_dir=tmp_path / "rogue-keys", server_name="rogue",
                       monitor_port=free_port(), cluster=busauth.ClusterSpec(
                           cluster.name, f"127.0.0.1:{free_port()}", cluster_routes.routes, rogue_tls)).start()
    logs = [n.log_file for n in cluster.nodes]
    refusals = sum(p.read_text().count("signed by unknown authority") for p in logs)
    try:
        wait_until(lambda: sum(p.read_text().count("signed by unknown authority") for p in logs) > refusals,
                   20, 0.1, "a node refusing the rogue's route")
        assert monitor(rogue, "/routez")["num_routes"] == 0
        for node in cluster.nodes:
            assert "rogue" not in {r.get("remote_name") for r in monitor(node, "/routez").get("routes") or []}
    finally:
        rogue.stop()


def test_a_write_no_stream_answers_is_sent_again_until_one_does(cluster):
    """In a cluster a KV write can find no stream for a moment — a bucket created a moment
    ago whose leader or whereabouts have not reached every node, a leader being elected —
    and nats answers "no responders" (the first write after an install failed so under
    load). No server took it, so the bus sends it again: here the bucket's stream is gone
    under a writer, the writer's put is refused and retried, and once the bucket is back the
    put is acknowledged and readable."""
    bucket = f"rewrite-{unique_ns()}"

    async def scenario() -> bytes | None:
        bus = bus_for(cluster.url, TESTER, replicas=CLUSTER_SIZE)
        other = bus_for(cluster.url, TESTER, replicas=CLUSTER_SIZE)
        await bus.start()
        await other.start()
        try:
            await bus.put_raw(bucket, "k", b"first")
            await other.js.delete_key_value(bucket)
            # Until the deletion reaches the writer's node, a write there is taken by no one
            # and times out instead: wait for that node to answer "no responders".
            while True:
                try:
                    await bus.nc.request(f"$KV.{bucket}.probe", b"", timeout=1)
                except nats.errors.NoRespondersError:
                    break
                except nats.errors.TimeoutError:
                    continue
            retries = bus.m_write_retries.labels(bucket)
            before = retries.value
            put = asyncio.ensure_future(bus.put_raw(bucket, "k", b"second"))
            while retries.value == before:  # the write was refused by no one: retried
                assert not put.done(), put.exception()
                await asyncio.sleep(0.01)
            await other.put_raw(bucket, "other", b"x")  # creates the bucket again
            await put
            return await other.get_raw(bucket, "k")
        finally:
            await bus.close()
            await other.close()

    assert asyncio.run(scenario()) == b"second"


# --- the failover ------------------------------------------------------------------------------


@dataclass
class Traffic:
    """Steady meshed HTTP requests through the client proxy's outbound port (HTTP proxy
    mode, as an app with HTTP_PROXY), a new connection each, counted."""

    outbound_port: int
    authority: str
    sent: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            error = ""
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.outbound_port, timeout=15)
                try:
                    conn.request("GET", f"http://{self.authority}/n{self.sent}")
                    resp = conn.getresponse()
                    body = resp.read()
                    if resp.status != 200 or body != b"web":
                        error = f"HTTP {resp.status} {resp.getheader('tulle-proxy-error') or ''} {body[:80]!r}"
                finally:
                    conn.close()
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
            self.sent += 1
            if error:
                self.failed += 1
                self.failures.append(error)
            self.stop.wait(0.02)  # a steady rate, not a flood: two cores are shared


class Writer:
    """Writes generation after generation to tulle-endpoints as the destination role would:
    each generation a key of its own (so a lost write shows as a missing key) and the
    `latest` key (what watchers must end at). A write counts once NATS acknowledged it;
    one that fails (no leader yet, the connection moving) is tried again."""

    def __init__(self, bus: Bus, ns: str):
        self.bus, self.ns = bus, ns
        self.acked = 0  # generations whose two writes were acknowledged
        self.retries = 0
        self.revisions: list[int] = []  # every acknowledged revision, in order
        self.stopping = asyncio.Event()

    def key(self, generation: int) -> str:
        return f"{self.ns}.gen{generation}.80"

    @property
    def latest_key(self) -> str:
        return f"{self.ns}.latest.80"

    def value(self, service: str, generation: int) -> schemas.EndpointSet:
        return schemas.EndpointSet(namespace=self.ns, service=service, port=80, endpoints=[schemas.Endpoint(
            address="127.0.0.1", port=80, labels={"generation": str(generation)})])

    async def _put(self, key: str, value: schemas.EndpointSet) -> None:
        while True:
            try:
                self.revisions.append(await self.bus.put(schemas.ENDPOINTS_BUCKET, key, value))
                return
            except Exception:
                self.retries += 1
                await asyncio.sleep(0.1)

    async def run(self) -> None:
        generation = 0
        while not self.stopping.is_set():
            generation += 1
            await self._put(self.key(generation), self.value(f"gen{generation}", generation))
            await self._put(self.latest_key, self.value("latest", generation))
            self.acked = generation
            try:
                await asyncio.wait_for(self.stopping.wait(), 0.05)
            except asyncio.TimeoutError:
                pass


class Watcher:
    """A KV watch of the writer's keys, as a proxy or the CLI holds one."""

    def __init__(self, bus: Bus, ns: str):
        self.bus, self.ns = bus, ns
        self.values: dict[str, int] = {}
        self.snapshots = 0

    async def run(self) -> None:
        async for item in self.bus.watch(schemas.ENDPOINTS_BUCKET, f"{self.ns}.>", schemas.EndpointSet):
            if isinstance(item, Snapshot):
                self.snapshots += 1
                self.values = {k: int(v.endpoints[0].labels["generation"]) for k, v in item.values.items()}
            elif isinstance(item, Change) and item.value is not None:
                self.values[item.key] = int(item.value.endpoints[0].labels["generation"])


def start_proxy(url: str, ns: str, sa: str, token: str, anchors_pem: bytes, log, **ports) -> subprocess.Popen:
    env = {
        **os.environ, "PYTHONPATH": str(REPO), "TULLE_NATS_URL": url,
        "TULLE_PROXY_IDENTITY_TRUST_ANCHORS": anchors_pem.decode(), "TULLE_PROXY_NAMESPACE": ns,
        "TULLE_PROXY_WORKLOAD": f"{sa}-0", "TULLE_PROXY_SERVICE_ACCOUNT": sa, "TULLE_PROXY_TOKEN_FILE": token,
        "TULLE_PROXY_INBOUND_ADDR": f"127.0.0.1:{ports['inbound']}",
        "TULLE_PROXY_OUTBOUND_ADDR": f"127.0.0.1:{ports['outbound']}",
        "TULLE_PROXY_ADMIN_ADDR": f"127.0.0.1:{ports['admin']}", "TULLE_PROXY_TRANSPARENT": "false",
        "TULLE_LOG_FORMAT": "json",
    }
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "proxy"], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def admin_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


def test_losing_any_one_node_fails_no_request_and_loses_no_kv_write(cluster, tmp_path):
    ns = unique_ns()
    issuer = make_issuer_dir(tmp_path / "issuer")
    secret = token_secret(tmp_path / "secret", cluster.token_secret)
    # The real identity service: certificates, and the proxies' NATS logins (auth callout).
    identity = IdentityProcess(cluster.url, issuer.path, tmp_path / "secret", tmp_path / "identity.log",
                               "--nats-replicas", str(CLUSTER_SIZE),
                               "--callout-issuer-seed", str(cluster.callout_issuer_seed_file),
                               "--callout-creds", str(cluster.seed_file("callout"))).start()
    app = AppServer("web")
    lt = LoopThread()
    procs: list[subprocess.Popen] = []
    traffic = None
    writer = None
    tasks = []
    buses: list[Bus] = []
    try:
        identity.wait_ready(60)

        async def started(bus: Bus) -> Bus:
            buses.append(bus)
            await bus.start()
            return bus

        # Policy and destination create their buckets with the cluster's replica count.
        policy_bus = lt.call(started(bus_for(cluster.url, "policy", replicas=CLUSTER_SIZE)))
        for sa in ("web", "client"):
            lt.call(put_policy(policy_bus, workload_policy(ns, f"{sa}-0")))
        writer_bus = lt.call(started(bus_for(cluster.url, "destination", replicas=CLUSTER_SIZE)))

        ports = {sa: {"inbound": free_port(), "outbound": free_port(), "admin": free_port()} for sa in ("web", "client")}
        for sa in ("web", "client"):
            procs.append(start_proxy(cluster.url, ns, sa, token_file(tmp_path / f"{sa}.token", secret, ns, sa, f"{sa}-0"),
                                     issuer.anchor.cert_pem, tmp_path / f"{sa}-proxy.log", **ports[sa]))
        for sa in ("web", "client"):
            wait_until(lambda: admin_get(ports[sa]["admin"], "/ready")[0] == 200, 60, 0.1,
                       f"the {sa} proxy ready ({tmp_path / f'{sa}-proxy.log'})")
        lt.call(writer_bus.put(schemas.ENDPOINTS_BUCKET, schemas.endpoints_key(ns, "web", app.port), schemas.EndpointSet(
            namespace=ns, service="web", port=app.port, endpoints=[schemas.Endpoint(
                address="127.0.0.1", port=app.port, identity=schemas.identity_name("web", ns),
                proxy_port=ports["web"]["inbound"])])))

        # Every store the mesh made is replicated on every node.
        tester = lt.call(started(bus_for(cluster.url, TESTER)))

        made = {s.config.name: s.config.num_replicas for s in lt.call(tester.js.streams_info())}
        for stream in (f"KV_{schemas.ENDPOINTS_BUCKET}", f"KV_{schemas.POLICY_BUCKET}", f"KV_{schemas.IDENTITY_BUCKET}",
                       f"KV_{schemas.PROXIES_BUCKET}", f"KV_{schemas.LEASES_BUCKET}", schemas.EVENTS_STREAM):
            assert made.get(stream) == CLUSTER_SIZE, (stream, made)

        kv_ns = f"{ns}-kv"  # the writer's keys, apart from the mesh's own endpoints
        writer = Writer(writer_bus, kv_ns)
        watchers = [Watcher(lt.call(started(bus_for(cluster.url, "observer"))), kv_ns) for _ in range(CLUSTER_SIZE)]
        tasks = [asyncio.run_coroutine_threadsafe(w.run(), lt.loop) for w in [writer, *watchers]]
        traffic = Traffic(ports["client"]["outbound"], f"web.{ns}:{app.port}")
        traffic_thread = threading.Thread(target=traffic.run, name="traffic", daemon=True)
        traffic_thread.start()
        wait_until(lambda: traffic.sent >= 20 and writer.acked >= 10, 30, 0.05, "traffic and writes flowing")
        assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        logins_before = identity.metric("tulle_identity_bus_logins_total", result="ok")

        proxies = {f"proxy/{ns}.{sa}-0" for sa in ("web", "client")}
        for node in cluster.nodes:
            sent, acked = traffic.sent, writer.acked
            node.kill()
            survivors = [n for n in cluster.nodes if n is not node]
            # Requests keep succeeding and writes keep being acknowledged with the node gone...
            wait_until(lambda: traffic.sent >= sent + 50 and writer.acked >= acked + 20, 90, 0.1,
                       f"traffic and writes going on without {node.server_name}")
            # ...and both proxies are back on the bus, logged in on the surviving nodes.
            wait_until(lambda: proxies <= set().union(*(connection_names(n) for n in survivors)), 60, 0.2,
                       f"both proxies connected to a node other than {node.server_name}")
            node.start()
            assert cluster.wait_healthy(90), f"{node.server_name} did not catch up after its restart"

        lt.loop.call_soon_threadsafe(writer.stopping.set)
        tasks[0].result(60)  # the writer finished its last generation
        traffic.stop.set()
        traffic_thread.join(30)

        last = writer.acked
        expected = {writer.key(g): g for g in range(1, last + 1)} | {writer.latest_key: last}
        # Every watcher ends at the last value, with every generation written.
        for i, w in enumerate(watchers):
            wait_until(lambda: {k: w.values.get(k) for k in expected} == expected, 60, 0.2,
                       f"watcher {i} at generation {last} (has {w.values.get(writer.latest_key)})")
        present = lt.call(writer_bus.items(schemas.ENDPOINTS_BUCKET, schemas.EndpointSet, f"{kv_ns}."))
        lost = [k for k, g in expected.items() if k not in present or
                int(present[k].endpoints[0].labels["generation"]) != g]
        non_monotonic = sum(1 for a, b in zip(writer.revisions, writer.revisions[1:]) if b <= a)
        logins_after = identity.metric("tulle_identity_bus_logins_total", result="ok")
        print(f"\nfailover x{CLUSTER_SIZE}: requests sent {traffic.sent}, failed {traffic.failed}; "
              f"KV writes acknowledged {2 * last}, lost {len(lost)} (retried {writer.retries}); "
              f"proxy logins through identity during the failovers {logins_after - logins_before:.0f}")
        assert traffic.failed == 0, traffic.failures[:5]
        assert not lost and non_monotonic == 0
        # Each proxy was on some node when it died: each logged in again through identity.
        assert logins_after - logins_before >= 2
        for sa in ("web", "client"):
            metrics = admin_get(ports[sa]["admin"], "/metrics")[1]
            assert sample(metrics, "tulle_bus_reconnects_total") >= 1, sa
            assert sample(metrics, "tulle_bus_connected") == 1, sa
    finally:
        if traffic is not None:
            traffic.stop.set()
        if writer is not None:
            lt.loop.call_soon_threadsafe(writer.stopping.set)
        for t in tasks:
            t.cancel()
        for bus in buses:
            try:
                lt.call(bus.close(), 10)
            except Exception:
                pass
        lt.stop()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        identity.stop()
        app.close()
        for node in cluster.nodes:
            if not node.running:
                node.start()
