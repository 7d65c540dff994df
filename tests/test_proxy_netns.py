"""Transparent proxying with real iptables: a client in its own network namespace talks to
a service IP; an iptables REDIRECT sends the connection to the outbound proxy, which reads
the original destination with SO_ORIGINAL_DST and routes by the `_ip` endpoint set.

The namespace, veth pair and the one NAT rule have unique names and are removed at the
end whatever happens. The proxies run on the host side, outside the namespace.
"""

import ipaddress
import subprocess
import sys
import uuid

import pytest

from tests.conftest import requires_netns
from tests.proxy_support import (
    KV, AppServer, Mesh, Proxy, RawServer, endpoint_set, meshed_endpoint, proxy_config, unique_ns,
)
from tulle import schemas

pytestmark = [requires_netns, pytest.mark.root]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)


def free_subnet() -> ipaddress.IPv4Network:
    used = sh("ip", "-4", "route", "show", "table", "all").stdout
    for third in range(200, 250):
        net = ipaddress.IPv4Network(f"10.213.{third}.0/24")
        if str(net.network_address)[:-1] not in used:
            return net
    raise RuntimeError("no free 10.213.x.0/24 for the test namespace")


class Netns:
    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.name = f"tlpx{tag}"
        self.host_if, self.ns_if = f"tlpx{tag}h", f"tlpx{tag}n"
        net = free_subnet()
        hosts = list(net.hosts())
        # The link is the lower /25; the service IP lies beyond it, so the client routes it
        # through its default gateway (the host), where the REDIRECT rule catches it.
        self.host_ip, self.client_ip, self.service_ip = str(hosts[0]), str(hosts[1]), str(hosts[199])
        self.rules: list[list[str]] = []
        sh("ip", "netns", "add", self.name)
        try:
            sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            sh("ip", "link", "set", self.ns_if, "netns", self.name)
            sh("ip", "addr", "add", f"{self.host_ip}/25", "dev", self.host_if)
            sh("ip", "link", "set", self.host_if, "up")
            self.exec("ip", "addr", "add", f"{self.client_ip}/25", "dev", self.ns_if)
            self.exec("ip", "link", "set", self.ns_if, "up")
            self.exec("ip", "link", "set", "lo", "up")
            self.exec("ip", "route", "add", "default", "via", self.host_ip)
        except Exception:
            self.close()
            raise

    def exec(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True,
                              timeout=timeout, check=check)

    def redirect(self, port: int, to_port: int) -> None:
        """As proxy-init does for outbound traffic: the service's IP:port goes to the proxy."""
        rule = ["PREROUTING", "-i", self.host_if, "-p", "tcp", "-d", self.service_ip, "--dport", str(port),
                "-j", "REDIRECT", "--to-ports", str(to_port), "-m", "comment", "--comment", f"tulle-test-{self.name}"]
        sh("iptables", "-t", "nat", "-A", *rule)
        self.rules.append(rule)

    def close(self) -> None:
        for rule in self.rules:
            sh("iptables", "-t", "nat", "-D", *rule, check=False)
        sh("ip", "link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.name, check=False)


@pytest.fixture
def topo(lt, nats_server):
    netns = Netns()
    mesh = Mesh()
    ns = unique_ns()
    sid, cid = mesh.identity("web", ns), mesh.identity("client", ns)
    server = Proxy(lt, proxy_config(nats_server.url, ns, "web-1", "web"), sid)
    client = Proxy(lt, proxy_config(nats_server.url, ns, "client-1", "client", transparent=True,
                                     outbound_addr=(netns.host_ip, 0)), cid)
    kv = KV(lt, nats_server.url)
    yield netns, server, client, kv, sid, ns
    kv.close()
    client.stop()
    server.stop()
    netns.close()


def test_redirected_http_is_routed_by_its_original_destination(topo):
    netns, server, client, kv, sid, ns = topo
    app = AppServer("web")
    try:
        netns.redirect(80, client.outbound)
        kv.put(schemas.ip_endpoints_key(netns.service_ip, 80), endpoint_set(
            ns, "web", 80, [meshed_endpoint(app.port, server.inbound, sid.identity)], cluster_ips=[netns.service_ip]))
        out = netns.exec("curl", "-sS", "-i", "--max-time", "10", f"http://{netns.service_ip}/via-iptables")
        assert out.stdout.startswith("HTTP/1.1 200") and out.stdout.endswith("web"), out.stderr
        seen = app.seen[-1]
        assert seen.path == "/via-iptables" and seen.header("tulle-client-id") == schemas.identity_name("client", ns)
        assert client.metric("request_total", direction="outbound", dst_service="web", tls="true") == 1
    finally:
        app.close()


def test_redirected_server_speaks_first_tcp_crosses_both_proxies_on_an_opaque_port(topo):
    netns, server, client, kv, sid, ns = topo

    def greeter(conn):
        conn.sendall(b"+OK redis-ish ready\r\n")
        while data := conn.recv(65536):
            conn.sendall(b"echo:" + data)

    app = RawServer(greeter)
    try:
        netns.redirect(6379, client.outbound)  # 6379 is one of the default opaque ports
        kv.put(schemas.ip_endpoints_key(netns.service_ip, 6379), endpoint_set(
            ns, "cache", 6379, [meshed_endpoint(app.port, server.inbound, sid.identity)], cluster_ips=[netns.service_ip]))
        script = (
            "import socket,sys\n"
            f"s=socket.create_connection(('{netns.service_ip}',6379),timeout=5)\n"
            "g=s.recv(100)\n"  # nothing sent first: the server speaks
            "s.sendall(b'PING')\n"
            "sys.stdout.write(repr(g+s.recv(100)))\n"
        )
        out = netns.exec(sys.executable, "-c", script, check=False, timeout=20)
        assert out.returncode == 0, out.stderr
        assert out.stdout == repr(b"+OK redis-ish ready\r\necho:PING")
        assert client.metric("tcp_open_total", direction="outbound", dst_service="cache", tls="true") == 1
        assert server.metric("protocol_detect_total", direction="inbound", protocol="mtls") == 1
    finally:
        app.close()
