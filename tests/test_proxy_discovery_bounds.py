"""Discovery a client cannot blow up: whatever Host values an app sends, a proxy holds a
bounded number of KV watches (JetStream consumers, counted on the real NATS server), a
name that resolves to nothing is remembered without a watch, names and addresses outside
the mesh are never looked up, and DNS failures are clean 502s.

The tests that send names to DNS run the proxy as its own process in a mount namespace
whose /etc/resolv.conf points at a DNS server of the test's (tests.proxy_support.DnsServer),
so DNS is real, fast and observable.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading

import pytest

from proxy.authority import MeshScope
from tests.conftest import wait_until
from tests.proxy_support import (
    KV, AppServer, DnsServer, LoopThread, Mesh, Proxy, ProxyProcess, endpoint_set, http_request, proxy_config,
    read_response, unique_ns,
)
from tulle import schemas

requires_mount_ns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare (util-linux) to give the proxy a resolv.conf of the test's; "
           "make test runs as root and installs util-linux")


# --- the scope, pure ----------------------------------------------------------------------------


@pytest.mark.parametrize("host, suffixes, expected", [
    ("web", ("svc.cluster.local.",), ("mine", "web")),
    ("web.other", ("svc.cluster.local.",), ("other", "web")),
    ("web.other.svc.cluster.local", ("svc.cluster.local.",), ("other", "web")),
    ("web.other.svc.cluster.local", ("mine.svc.cluster.local.",), None),  # another namespace: out of scope
    ("web", ("mine.svc.cluster.local.",), ("mine", "web")),
    ("web.other.svc.example.org", (".",), None),  # not a mesh name whatever the suffixes
    ("api.example.com", ("svc.cluster.local.",), None),
    ("example.com", ("svc.cluster.local.",), ("com", "example")),  # could be svc.ns: looked up, then remembered
    ("10.1.2.3", (".",), None),
])
def test_which_names_are_looked_up(host, suffixes, expected):
    assert MeshScope("mine", "cluster.local", suffixes, ("10.0.0.0/8",)).service(host) == expected


@pytest.mark.parametrize("addr, expected", [
    ("10.96.0.10", True), ("192.168.1.1", False), ("127.0.0.1", False), ("fd00::1", True), ("2001:db8::1", False),
    ("not-an-ip", False),
])
def test_which_addresses_are_looked_up(addr, expected):
    assert MeshScope("mine", "cluster.local", (".",), ("10.0.0.0/8", "fd00::/8")).address(addr) is expected


# --- helpers ----------------------------------------------------------------------------------


def consumers(lt: LoopThread, kv: KV) -> int:
    """JetStream consumers on the endpoints and profiles buckets, as the NATS server counts them."""
    async def count():
        total = 0
        for bucket in (schemas.ENDPOINTS_BUCKET, schemas.PROFILES_BUCKET):
            total += (await kv.bus.js.stream_info(f"KV_{bucket}")).state.consumer_count
        return total
    return lt.call(count())


def through(port: int, hosts: list[str], threads: int = 8) -> list[int]:
    """One request per Host value, over keep-alive connections from a few threads: the statuses."""
    statuses: list[int] = []
    lock = threading.Lock()

    def run(part: list[str]) -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            for host in part:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                status, headers, _ = read_response(s, timeout=30)
                if headers.get("connection") == "close":
                    s.close()
                    s = socket.create_connection(("127.0.0.1", port), timeout=30)
                with lock:
                    statuses.append(status)
        finally:
            s.close()
    workers = [threading.Thread(target=run, args=(hosts[i::threads],)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    return statuses


def publish_web(kv: KV, ns: str, app: AppServer, svc: str = "web") -> None:
    kv.put(schemas.endpoints_key(ns, svc, 80), endpoint_set(ns, svc, 80, [
        schemas.Endpoint(address="127.0.0.1", port=app.port)]))


# --- a thousand Host values ---------------------------------------------------------------------


@requires_mount_ns
def test_a_thousand_host_values_add_no_consumer_and_each_absent_name_is_looked_up_once(own_nats, tmp_path):
    lt = LoopThread()
    kv = KV(lt, own_nats.url)
    dns = DnsServer(rcode=3)  # NXDOMAIN for everything, at once
    app = AppServer("web")
    proxy = ProxyProcess(own_nats.url, tmp_path, resolv_conf=dns.resolv_conf(tmp_path / "resolv.conf"),
                         TULLE_PROXY_DISCOVERY_ABSENT_TTL="10m")
    try:
        ns = proxy.ns
        lt.call(kv.bus.kv(schemas.PROFILES_BUCKET))  # as destination makes it at start
        publish_web(kv, ns, app)
        assert http_request(proxy.outbound, host=f"web.{ns}:80")[0] == 200
        held = consumers(lt, kv)
        assert proxy.metric("discovery_watches", bucket=schemas.ENDPOINTS_BUCKET) == 1
        assert proxy.metric("discovery_watches", bucket=schemas.PROFILES_BUCKET) == 1

        mesh_like = ([f"s{i}" for i in range(200)] + [f"s{i}.{ns}" for i in range(200, 400)]
                     + [f"s{i}.n{i}.svc.cluster.local" for i in range(400, 600)]
                     + [f"web.{ns}:{8000 + i}" for i in range(600, 800)])
        outside = [f"h{i}.example.com" for i in range(800, 1000)]
        statuses = through(proxy.outbound, mesh_like + outside)
        assert len(statuses) == 1000 and set(statuses) == {502}  # no such service, and DNS says no such name

        assert consumers(lt, kv) == held
        assert proxy.metric("discovery_watches", bucket=schemas.ENDPOINTS_BUCKET) == 1
        assert proxy.metric("discovery_watches", bucket=schemas.PROFILES_BUCKET) == 1
        assert proxy.metric("discovery_lookups_total", bucket=schemas.ENDPOINTS_BUCKET, result="absent") == 800
        assert proxy.metric("discovery_lookups_total", bucket=schemas.PROFILES_BUCKET, result="absent") == 0
        assert proxy.metric("discovery_lookups_avoided_total", reason="outside_mesh_name") == 200
        assert proxy.metric("outbound_http_errors_total", error="dns") == 1000

        # The same names again: remembered, not looked up again, and still no consumer.
        assert set(through(proxy.outbound, mesh_like + outside)) == {502}
        assert proxy.metric("discovery_lookups_total", bucket=schemas.ENDPOINTS_BUCKET, result="absent") == 800
        assert proxy.metric("discovery_remembered") == 800  # absent, remembered, no watch
        assert consumers(lt, kv) == held
        assert http_request(proxy.outbound, host=f"web.{ns}:80")[0] == 200
        print(f"1,000 Host values (twice): {held} consumers held before and after; 800 lookups, 0 watches added")
    finally:
        log = proxy.stop()
        kv.close()
        lt.stop()
        dns.close()
        app.close()
    assert "Traceback" not in log


def test_the_watch_cap_holds_and_services_past_it_are_served_from_lookups(lt, nats_server):
    ns = unique_ns()
    apps = [AppServer(f"s{i}") for i in range(6)]
    kv = KV(lt, nats_server.url)
    proxy = Proxy(lt, proxy_config(nats_server.url, ns, "capped", discovery_max_watches=4,
                                   discovery_absent_ttl_s=0.5), Mesh().identity("c", ns))
    replacement = AppServer("s5-new")
    try:
        for i, app in enumerate(apps):
            publish_web(kv, ns, app, f"s{i}")
        for _ in range(2):
            for i in range(6):
                assert http_request(proxy.outbound, host=f"s{i}.{ns}")[::2] == (200, f"s{i}".encode())
        watches = proxy.metric("discovery_watches", bucket=schemas.ENDPOINTS_BUCKET) + \
            proxy.metric("discovery_watches", bucket=schemas.PROFILES_BUCKET)
        assert watches == 4
        assert proxy.metric("discovery_lookups_total", bucket=schemas.ENDPOINTS_BUCKET, result="unwatched") >= 1
        # A service served from a lookup still follows its changes, one lookup interval late.
        publish_web(kv, ns, replacement, "s5")
        wait_until(lambda: http_request(proxy.outbound, host=f"s5.{ns}")[2] == b"s5-new",
                   what="the unwatched service's new endpoint in use")
    finally:
        proxy.stop()
        kv.close()
        for app in [*apps, replacement]:
            app.close()


def test_addresses_outside_the_mesh_networks_are_forwarded_without_a_lookup(lt, nats_server):
    ns = unique_ns()
    app = AppServer("direct")
    proxy = Proxy(lt, proxy_config(nats_server.url, ns, "direct"), Mesh().identity("d", ns))
    try:
        for _ in range(3):
            assert http_request(proxy.outbound, host=f"127.0.0.1:{app.port}")[::2] == (200, b"direct")
        assert proxy.metric("discovery_lookups_avoided_total", reason="outside_mesh_address") == 1  # one target
        assert proxy.metric("discovery_lookups_total", bucket=schemas.ENDPOINTS_BUCKET, result="absent") == 0
    finally:
        proxy.stop()
        app.close()


@requires_mount_ns
def test_profile_suffixes_keep_other_namespaces_out_of_discovery(own_nats, tmp_path):
    lt = LoopThread()
    kv = KV(lt, own_nats.url)
    dns = DnsServer(rcode=3)
    app = AppServer("mine")
    proxy = None
    try:
        ns = unique_ns()
        proxy = ProxyProcess(own_nats.url, tmp_path, resolv_conf=dns.resolv_conf(tmp_path / "resolv.conf"),
                             TULLE_PROXY_NAMESPACE=ns,
                             TULLE_PROXY_DESTINATION_PROFILE_SUFFIXES=f"{ns}.svc.cluster.local.",
                             TULLE_PROXY_TOKEN_FILE=own_nats.token_file(ns, "w-1", "w"))
        publish_web(kv, ns, app)
        publish_web(kv, "elsewhere", app)
        assert http_request(proxy.outbound, host="web")[0] == 200
        queries = dns.queries
        status, headers, _ = http_request(proxy.outbound, host="web.elsewhere.svc.cluster.local")
        assert status == 502 and headers["tulle-proxy-error"].startswith("cannot resolve web.elsewhere")
        assert dns.queries > queries  # it went to DNS, as any name outside the mesh
        assert proxy.metric("discovery_lookups_avoided_total", reason="outside_mesh_name") == 1
    finally:
        if proxy is not None:
            proxy.stop()
        kv.close()
        lt.stop()
        dns.close()
        app.close()


# --- DNS failures ---------------------------------------------------------------------------------


@requires_mount_ns
@pytest.mark.parametrize("delay", [0.0, 1.5])  # 1.5 s: longer than the 1 s connect timeout
def test_a_dns_failure_is_a_clean_502_and_leaves_no_traceback(nats_server, tmp_path, delay):
    dns = DnsServer(rcode=2, delay=delay)  # SERVFAIL
    app = AppServer("ok")
    proxy = ProxyProcess(nats_server.url, tmp_path, resolv_conf=dns.resolv_conf(tmp_path / "resolv.conf"))
    try:
        status, headers, _ = http_request(proxy.outbound, host="api.example.com")
        assert status == 502 and headers["tulle-proxy-error"].startswith("cannot resolve api.example.com")
        assert proxy.metric("outbound_http_errors_total", error="dns") == 1
        wait_until(lambda: dns.answered >= 1, what="the DNS answer sent (late, when delayed)")
        # The late answer reaches the proxy's resolver; the proxy goes on serving meanwhile.
        assert http_request(proxy.outbound, host=f"127.0.0.1:{app.port}")[::2] == (200, b"ok")
    finally:
        log = proxy.stop()
        dns.close()
        app.close()
    assert "never retrieved" not in log and "gaierror" not in log and "Traceback" not in log
