"""Authorization enforced by real proxies: real mTLS between proxies, policies in real NATS
KV (compiled by the policy service's compiler, or written by a real `python -m
services.policy` watching a manifest folder), real sockets from distinct source addresses.

The server side is one proxy in front of one app port (an app that answers HTTP/1.1 when
spoken to in HTTP and echoes anything else, so one port serves both transports); its policy
is switched between sub-cases by writing its `tulle-policy` key, as the policy service does.

The clients, and how they are told apart (tests/test_policy_matrix.py's CLIENTS):
- meshed: a client proxy certified as `web.demo` (the authorized identity) and one as
  `traffic.demo` (a meshed identity that is not authorized), plus `web.other` where a
  rule names a namespace; their mTLS connections come from 127.0.0.1;
- unmeshed: plain sockets bound to a source address of their own on the loopback:
  127.0.0.7 inside the cluster networks, 127.203.0.9 outside them. Linux routes all of
  127/8 to `lo`, so distinct loopback sources give distinct client addresses without
  network namespaces, and the cluster networks are set to 127.0.0.0/24 for the proxy
  (TULLE_PROXY_CLUSTER_NETWORKS) and the policy (--cluster-networks) alike.
HTTP/1.1 from meshed clients goes through their proxy's outbound port as an HTTP proxy;
opaque TCP from meshed clients through a CONNECT tunnel (carried opaque over mTLS).
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import orjson
import pytest
import yaml

from proxy.grpc_status import PERMISSION_DENIED, is_grpc, percent_encode, permission_denied, trailers_only
from services.policy.compile import Settings, compile_policies
from tests.conftest import wait_until
from tests.policy_support import PolicyProcess, pod_doc, saz_doc, server_doc, write_manifest
from tests.proxy_support import (
    KV, LoopThread, Mesh, NotYetIdentity, Proxy, RawServer, endpoint_set, http_request, meshed_endpoint, proxy_config,
    workload_policy,
)
from tests.test_policy_matrix import CASES, CLIENT_ORDER, CLIENTS, MatrixCase, web_only_manifests
from tulle import schemas
from tulle.metrics import sample
from tulle.resources.parse import parse_object

NS = "demo"  # the matrix's identities are web.demo / traffic.demo
CLUSTER = ("127.0.0.0/24",)
MESHED_IP = "127.0.0.1"  # where client proxies' connections come from
SOURCES = {"meshed": MESHED_IP, "meshed-unauthorized": MESHED_IP, "unmeshed-cluster": "127.0.0.7",
           "unmeshed-outside": "127.203.0.9"}
WEB, TRAFFIC = CLIENTS["meshed"].identity, CLIENTS["meshed-unauthorized"].identity
WEB_OTHER = schemas.identity_name("web", "other")
PAYLOAD = b"\x00opaque-ping"


# --- the app behind the server proxy -------------------------------------------------------------


class DualApp:
    """HTTP/1.1 (keep-alive, GET only) when the first bytes are a request line, else an echo.
    Records what reached it: ("http", request line, tulle-client-id) or ("tcp", first bytes)."""

    def __init__(self):
        self.seen: list[tuple] = []
        self.raw = RawServer(self._serve)
        self.port = self.raw.port

    def _serve(self, conn: socket.socket) -> None:
        buf = conn.recv(65536)
        if not buf[:1].isalpha():
            self.seen.append(("tcp", buf))
            while buf:
                conn.sendall(buf)
                buf = conn.recv(65536)
            return
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            client_id = next((v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
                              if k.lower() == "tulle-client-id"), None)
            self.seen.append(("http", lines[0], client_id))
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nmatrix")

    def close(self) -> None:
        self.raw.close()


# --- the clients ---------------------------------------------------------------------------------


def plain_http(source_ip: str, port: int, path: str = "/books") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source_ip, 0))
    try:
        conn.request("GET", path, headers={"Host": "matrix"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def exchange(s: socket.socket, data: bytes = PAYLOAD) -> bytes:
    """Send, and read the echo; b"" when the connection was closed (or reset) instead."""
    try:
        s.sendall(data)
        out = b""
        while len(out) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out
    except (ConnectionResetError, BrokenPipeError):
        return b""


def plain_tcp(source_ip: str, port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source_ip, 0)) as s:
        return exchange(s)


def open_tunnel(outbound: int, authority: str) -> socket.socket:
    """A CONNECT tunnel through a client proxy (opaque over mTLS to the server's proxy)."""
    s = socket.create_connection(("127.0.0.1", outbound), timeout=10)
    s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            raise AssertionError(f"CONNECT: closed after {head!r}")
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return s


def get_metrics(admin: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        return r.read().decode()


def ready_status(admin: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# --- the setting: one server proxy, three client proxies -----------------------------------------


class Mesh3:
    def __init__(self, lt: LoopThread, nats_url: str):
        self.lt = lt
        self.mesh = Mesh()
        self.kv = KV(lt, nats_url)
        tag = uuid.uuid4().hex[:6]
        self.pod, self.service = f"matrix-{tag}", f"matrix-{tag}"
        self.app = DualApp()
        self.server_identity = self.mesh.identity("matrix", NS)
        self.server = Proxy(lt, proxy_config(nats_url, NS, self.pod, "matrix", app_default_port=self.app.port,
                                             cluster_networks=CLUSTER), self.server_identity)
        self.clients = {
            "meshed": Proxy(lt, proxy_config(nats_url, NS, f"web-{tag}", "web"), self.mesh.identity("web", NS)),
            "meshed-unauthorized": Proxy(lt, proxy_config(nats_url, NS, f"traffic-{tag}", "traffic"),
                                         self.mesh.identity("traffic", NS)),
            "meshed-other-ns": Proxy(lt, proxy_config(nats_url, "other", f"web-{tag}", "web"),
                                     self.mesh.identity("web", "other")),
        }
        port = self.app.port
        self.kv.put(schemas.endpoints_key(NS, self.service, port), endpoint_set(NS, self.service, port, [
            meshed_endpoint(port, self.server.inbound, self.server_identity.identity)]))

    @property
    def authority(self) -> str:
        return f"{self.service}.{NS}:{self.app.port}"

    def pod_doc(self) -> dict:
        return pod_doc(self.pod, NS, labels={"app": "matrix"}, sa="matrix", ports=(("http", self.app.port),),
                       ip=MESHED_IP)

    def apply(self, policy: schemas.WorkloadPolicy) -> None:
        """Write the server's policy key and wait until its proxy holds exactly that policy."""
        self.kv.put_policy(policy)
        self.wait_for(lambda p: p == policy, "the new policy")

    def wait_for(self, test, what: str) -> schemas.WorkloadPolicy:
        return wait_until(lambda: (p := self.lt.run(lambda: self.server.app.policy.policy)) is not None and test(p)
                          and p, timeout=20, what=f"the server proxy to hold {what}")

    def compiled(self, row: str) -> schemas.WorkloadPolicy:
        """A matrix row's policy as the policy service compiles it for this pod."""
        objects = [parse_object(self.pod_doc())]
        default = row
        if row == "server-web-only":
            objects += [parse_object(o) for o in web_only_manifests(NS, {"app": "matrix"}, self.app.port)]
            default = "all-unauthenticated"
        compiled = compile_policies(objects, Settings(default_policy=default, cluster_networks=CLUSTER))
        return compiled.policies[schemas.policy_key(NS, self.pod)]

    # One attempt of each kind of client; True when it reached the app.

    def http(self, client: str) -> tuple[int, dict, bytes]:
        if client.startswith("meshed"):
            return http_request(self.clients[client].outbound, "GET", "/books", host=self.authority)
        return plain_http(SOURCES[client], self.server.inbound)

    def tcp(self, client: str) -> bytes:
        if client.startswith("meshed"):
            with open_tunnel(self.clients[client].outbound, self.authority) as s:
                return exchange(s)
        return plain_tcp(SOURCES[client], self.server.inbound)

    def reaches(self, client: str, transport: str) -> bool:
        seen = len(self.app.seen)
        if transport == "http/1.1":
            status, headers, body = self.http(client)
            allowed = (status, body) == (200, b"matrix")
            assert allowed or (status == 403 and headers.get("tulle-proxy-error", "").startswith(
                "unauthorized request on server")), (status, headers, body)
        else:
            allowed = self.tcp(client) == PAYLOAD
        assert len(self.app.seen) == seen + (1 if allowed else 0), "a denied client must never reach the app"
        return allowed

    def close(self) -> None:
        for p in [self.server, *self.clients.values()]:
            p.stop()
        self.app.close()
        self.kv.close()


@pytest.fixture(scope="module")
def m3(lt, nats_server):
    setting = Mesh3(lt, nats_server.url)
    yield setting
    setting.close()


# --- readiness ---------------------------------------------------------------------------------------


def test_the_proxy_is_not_ready_until_its_first_policy_arrives_and_applies_its_configured_default_until_then(
        lt, nats_server):
    app = DualApp()
    pod = f"early-{uuid.uuid4().hex[:6]}"
    p = Proxy(lt, proxy_config(nats_server.url, NS, pod, "early", app_default_port=app.port,
                               default_inbound_policy="deny", cluster_networks=CLUSTER), Mesh().identity("early", NS))
    kv = KV(lt, nats_server.url)
    try:
        wait_until(lambda: lt.run(lambda: p.app.reached_bus), what="the proxy to reach the bus")
        assert ready_status(p.admin) == 503  # certified, on the bus, but no policy yet
        assert plain_http("127.0.0.7", p.inbound)[0] == 403  # TULLE_PROXY_DEFAULT_INBOUND_POLICY=deny
        assert app.seen == []
        kv.put_policy(workload_policy(NS, pod, "all-unauthenticated", cluster_networks=CLUSTER))
        wait_until(lambda: ready_status(p.admin) == 200, what="ready once the policy arrived")
        assert plain_http("127.0.0.7", p.inbound)[:3:2] == (200, b"matrix")
    finally:
        p.stop()
        kv.close()
        app.close()


def test_a_proxy_without_a_certificate_stays_unready_even_with_its_policy(lt, nats_server):
    pod = f"nocert-{uuid.uuid4().hex[:6]}"
    kv = KV(lt, nats_server.url)
    kv.put_policy(workload_policy(NS, pod))
    p = Proxy(lt, proxy_config(nats_server.url, NS, pod, "nocert"), NotYetIdentity(schemas.identity_name("nocert", NS)))
    try:
        wait_until(lambda: lt.run(lambda: p.app.policy_watcher.first.is_set()), what="the policy to arrive")
        assert ready_status(p.admin) == 503
    finally:
        p.stop()
        kv.close()


# --- the matrix: every default policy x four clients x two transports ---------------------------------


def _expected_labels(m3: Mesh3, case: MatrixCase) -> dict:
    if case.policy == "server-web-only":
        labels = {"srv_kind": "server", "srv_name": "matrix"}
        authz = {"authz_kind": "serverauthorization", "authz_name": "matrix-web-only"}
    else:
        labels = {"srv_kind": "default", "srv_name": case.policy}
        authz = {"authz_kind": "default", "authz_name": case.policy}
    labels.update(srv_port=str(m3.app.port), client_id=CLIENTS[case.client].identity or "")
    return {**labels, **authz} if case.allowed else labels


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_authorization_matrix_end_to_end(m3, case: MatrixCase):
    if m3.lt.run(lambda: m3.server.app.policy.policy) != (policy := m3.compiled(case.policy)):
        m3.apply(policy)
    family = "inbound_{}_authz_{}_total".format("http" if case.transport == "http/1.1" else "tcp",
                                               "allow" if case.allowed else "deny")
    labels = _expected_labels(m3, case)
    before = sample(get_metrics(m3.server.admin), family, **labels)
    assert m3.reaches(case.client, case.transport) is case.allowed
    # Counted in /metrics under the server, the authorization (allows) and the client's identity.
    assert sample(get_metrics(m3.server.admin), family, **labels) == before + 1


def test_the_matrix_reaches_the_server_with_the_identities_and_addresses_it_describes(m3):
    m3.apply(m3.compiled("all-unauthenticated"))
    for client in CLIENT_ORDER:
        assert m3.reaches(client, "http/1.1")
    seen = [(line, client_id) for kind, line, client_id in m3.app.seen[-4:]]
    assert seen == [("GET /books HTTP/1.1", WEB), ("GET /books HTTP/1.1", TRAFFIC),
                    ("GET /books HTTP/1.1", None), ("GET /books HTTP/1.1", None)]
    text = get_metrics(m3.server.admin)
    for client in CLIENT_ORDER:
        assert sample(text, "request_total", direction="inbound", client_id=CLIENTS[client].identity or "") > 0


# --- policy changes on open connections ---------------------------------------------------------------


def test_an_open_opaque_connection_the_new_policy_denies_is_closed_and_the_allowed_one_keeps_flowing(m3):
    m3.apply(m3.compiled("all-authenticated"))
    web = open_tunnel(m3.clients["meshed"].outbound, m3.authority)
    traffic = open_tunnel(m3.clients["meshed-unauthorized"].outbound, m3.authority)
    try:
        assert exchange(web) == PAYLOAD and exchange(traffic) == PAYLOAD
        before = sample(get_metrics(m3.server.admin), "inbound_tcp_authz_deny_total", srv_name="matrix",
                        client_id=TRAFFIC)
        m3.apply(m3.compiled("server-web-only"))
        traffic.settimeout(10)
        try:
            assert traffic.recv(100) == b""  # closed by the server's proxy, without waiting for traffic
        except ConnectionResetError:
            pass
        assert exchange(web, b"\x00still-here") == b"\x00still-here"
        assert sample(get_metrics(m3.server.admin), "inbound_tcp_authz_deny_total", srv_name="matrix",
                      client_id=TRAFFIC) == before + 1
    finally:
        web.close()
        traffic.close()


def test_a_policy_change_applies_to_the_next_request_on_an_open_http_connection(m3):
    m3.apply(m3.compiled("cluster-unauthenticated"))
    with socket.create_connection(("127.0.0.1", m3.server.inbound), timeout=10,
                                  source_address=(SOURCES["unmeshed-cluster"], 0)) as s:
        from tests.proxy_support import read_response

        def get() -> int:
            s.sendall(b"GET /books HTTP/1.1\r\nHost: matrix\r\n\r\n")
            return read_response(s)[0]

        assert get() == 200
        m3.apply(m3.compiled("cluster-authenticated"))
        assert get() == 403  # the same connection: denied from the next request on
        m3.apply(m3.compiled("cluster-unauthenticated"))
        assert get() == 200


# --- denials as CloudEvents -----------------------------------------------------------------------------


def test_denials_become_rate_limited_policy_denied_cloudevents(m3):
    m3.apply(m3.compiled("deny"))
    events: list[dict] = []

    async def collect(msg) -> None:
        events.append(orjson.loads(msg.data))

    async def subscribe():
        return await m3.kv.bus.nc.subscribe("tulle.events.proxy.denied", cb=collect)

    sub = m3.lt.call(subscribe())
    try:
        m3.lt.call(m3.kv.bus.sync())
        source = "127.0.42.9"  # a /24 no other test is denied from: the limiter has not seen it
        assert plain_http(source, m3.server.inbound)[0] == 403
        assert plain_tcp(source, m3.server.inbound) == b""
        mine = lambda: [e for e in events if e["data"]["client_ip"] == source]  # noqa: E731
        wait_until(lambda: mine(), what="a proxy.denied event")
        event = mine()[0]
        assert event["type"] == "dev.tulle.proxy.denied" and event["subject"] == f"{NS}/{m3.pod}"
        assert event["data"]["server"] == "default:deny" and event["data"]["workload"] == m3.pod
        assert event["data"]["protocol"] == "http" and event["data"]["port"] == m3.app.port
        # The second denial of the same client within the interval is held back (and counted).
        assert sample(get_metrics(m3.server.admin), "tulle_policy_denial_events_suppressed_total") >= 1
        m3.lt.call(m3.kv.bus.sync())
        assert len(mine()) == 1
    finally:
        m3.lt.call(sub.unsubscribe())


# --- a Server whose proxyProtocol is opaque ----------------------------------------------------------


def test_a_server_with_proxy_protocol_opaque_is_not_parsed_so_a_denied_http_client_is_closed_not_answered(m3):
    objects = [parse_object(m3.pod_doc()), parse_object(server_doc("matrix", m3.app.port, NS, app="matrix",
                                                                    protocol="opaque"))]
    m3.apply(compile_policies(objects, Settings(cluster_networks=CLUSTER)).policies[schemas.policy_key(NS, m3.pod)])
    before = sample(get_metrics(m3.server.admin), "inbound_tcp_authz_deny_total", srv_name="matrix", client_id="")
    seen = len(m3.app.seen)
    with socket.create_connection(("127.0.0.1", m3.server.inbound), timeout=10,
                                  source_address=(SOURCES["unmeshed-cluster"], 0)) as s:
        assert exchange(s, b"GET /books HTTP/1.1\r\nHost: matrix\r\n\r\n") == b""  # closed: no 403
    assert len(m3.app.seen) == seen
    assert sample(get_metrics(m3.server.admin), "inbound_tcp_authz_deny_total", srv_name="matrix",
                  client_id="") == before + 1


# --- ServerAuthorizations through the real policy service ------------------------------------------------

SAZ_CLIENTS = ("meshed", "meshed-unauthorized", "meshed-other-ns", "unmeshed-cluster", "unmeshed-outside")


@pytest.fixture(scope="module")
def policy_service(m3, nats_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy-manifests")
    write_manifest(folder / "pod.yaml", m3.pod_doc())
    write_manifest(folder / "server.yaml", server_doc("matrix", "http", NS, app="matrix"))
    service = PolicyProcess(nats_server.url, ["--manifests", str(folder), "--cluster-networks", ",".join(CLUSTER)],
                            folder.parent / f"{folder.name}-policy.log").start()
    wait_until(service.ready, timeout=30, what="the policy service to be ready")
    yield folder
    service.stop()


def _admitted(m3: Mesh3, transport: str) -> set[str]:
    return {c for c in SAZ_CLIENTS if m3.reaches(c, transport)}


def _saz_applied(m3: Mesh3, name: str, identities=None):
    def check(p: schemas.WorkloadPolicy) -> bool:
        auths = [a for port in p.ports if port.server == "matrix" for a in port.authorizations if a.name == name]
        return bool(auths) and (identities is None or sorted(auths[0].identities) == sorted(identities))
    return m3.wait_for(check, f"ServerAuthorization {name}")


SAZ_CASES = {
    "by-identity": ({"meshTLS": {"identities": [WEB]}}, {"meshed"}),
    "by-wildcard": ({"meshTLS": {"identities": [f"*.{NS}.serviceaccount.identity.tulle.cluster.local"]}},
                    {"meshed", "meshed-unauthorized"}),
    "by-service-account": ({"meshTLS": {"serviceAccounts": [{"name": "traffic"}, {"name": "web", "namespace": "other"}]}},
                           {"meshed-unauthorized", "meshed-other-ns"}),
    "by-network-with-except": ({"unauthenticated": True,
                                "networks": [{"cidr": "127.0.0.0/8", "except": ["127.0.0.7/32"]}]},
                               {"meshed", "meshed-unauthorized", "meshed-other-ns", "unmeshed-outside"}),
}


@pytest.mark.parametrize("name", SAZ_CASES)
def test_a_server_authorization_admits_exactly_the_intended_clients(m3, policy_service, name):
    client, intended = SAZ_CASES[name]
    write_manifest(policy_service / "saz.yaml", saz_doc(f"matrix-{name}", "matrix", client, NS))
    _saz_applied(m3, f"matrix-{name}")
    assert _admitted(m3, "http/1.1") == intended
    assert _admitted(m3, "opaque-tcp") == intended


def test_editing_a_server_authorization_while_traffic_flows_flips_one_client_and_never_fails_the_other(
        m3, policy_service):
    both = [WEB, TRAFFIC]
    path = policy_service / "saz.yaml"

    def write(*sas: str) -> float:
        write_manifest(path, saz_doc("matrix-clients", "matrix", {"meshTLS": {"serviceAccounts": [
            {"name": sa} for sa in sas]}}, NS))
        return time.monotonic()

    write("web", "traffic")
    _saz_applied(m3, "matrix-clients", both)
    stop = threading.Event()
    results: dict[str, list[tuple[float, object]]] = {"meshed": [], "meshed-unauthorized": []}

    def loop(client: str) -> None:
        while not stop.is_set():
            try:
                outcome: object = m3.http(client)[0]
            except OSError as e:  # a failure of the mesh, not a refusal: recorded, and fails the test
                outcome = type(e).__name__
            results[client].append((time.monotonic(), outcome))

    threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in results]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results["meshed-unauthorized"]) >= 20, what="traffic to flow")
        mtls_before = sample(get_metrics(m3.server.admin), "protocol_detect_total", direction="inbound",
                             protocol="mtls")
        changed = write("web")
        denied = wait_until(lambda: next((t for t, s in results["meshed-unauthorized"] if s == 403), None),
                            timeout=20, what="traffic to be denied")
        policy = _saz_applied(m3, "matrix-clients", [WEB])
        n = len(results["meshed-unauthorized"])
        wait_until(lambda: len(results["meshed-unauthorized"]) >= n + 20, what="more traffic while denied")
        changed_back = write("web", "traffic")
        allowed_again = wait_until(lambda: next((t for t, s in results["meshed-unauthorized"]
                                                 if t > changed_back and s == 200), None),
                                   timeout=20, what="traffic to be allowed again")
        n = len(results["meshed-unauthorized"])
        wait_until(lambda: len(results["meshed-unauthorized"]) >= n + 20, what="more traffic once allowed again")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert policy is not None
    print(f"\nmanifest edit -> first denial {1000 * (denied - changed):.0f} ms; "
          f"edit back -> first allow {1000 * (allowed_again - changed_back):.0f} ms; "
          f"{len(results['meshed'])} requests from web, {len(results['meshed-unauthorized'])} from traffic")
    # The client that stays allowed never saw anything but 200, however the policy moved.
    web_outcomes = {s for _, s in results["meshed"]}
    assert web_outcomes == {200} and len(results["meshed"]) >= 60
    # The flipped client: allowed, then denied, then allowed again — never a flap, never an error.
    sequence = "".join({200: "A", 403: "D"}.get(s, "x") for _, s in results["meshed-unauthorized"])
    assert re.fullmatch(r"A+D+A+", sequence), sequence
    # Both clients kept their one mesh connection: the changes reached requests on open connections.
    assert sample(get_metrics(m3.server.admin), "protocol_detect_total", direction="inbound",
                  protocol="mtls") == mtls_before


# --- gRPC: the trailers-only refusal, read by a real grpcio client -------------------------------------


def test_grpc_content_types_are_recognised():
    assert is_grpc(b"application/grpc") and is_grpc(b"application/grpc+proto") and is_grpc(b"Application/GRPC; x=y")
    assert not is_grpc(b"application/grpc-web") and not is_grpc(b"application/json") and not is_grpc(None)


def test_grpc_message_is_percent_encoded_as_the_grpc_spec_says():
    assert percent_encode("denied: 100% é\n") == b"denied: 100%25 %C3%A9%0A"
    headers = trailers_only(PERMISSION_DENIED, "no")
    assert headers[:4] == [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"7"),
                           (b"grpc-message", b"no")]


def test_a_denied_grpc_call_gets_permission_denied_as_a_trailers_only_response():
    """An HTTP/2 server answering with `permission_denied(...)` as one HEADERS frame with
    END_STREAM: grpcio reads PERMISSION_DENIED and the message (as the HTTP/2 room will send it)."""
    message = "unauthorized request on server books-grpc (100% sure, é)"
    seen_content_types: list[bytes] = []

    def h2_server(conn: socket.socket) -> None:
        h = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        h.initiate_connection()
        conn.sendall(h.data_to_send())
        while data := conn.recv(65536):
            for ev in h.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    content_type = dict(ev.headers).get(b"content-type")
                    seen_content_types.append(content_type)
                    if is_grpc(content_type):
                        h.send_headers(ev.stream_id, permission_denied(message), end_stream=True)
            conn.sendall(h.data_to_send())

    server = RawServer(h2_server)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.enable_http_proxy", 0)])
    try:
        call = channel.unary_unary("/books.Books/GetBook")
        with pytest.raises(grpc.RpcError) as e:
            call(b"{}", timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.value.details() == message
        assert seen_content_types == [b"application/grpc"]
    finally:
        channel.close()
        server.close()


def test_the_demo_policy_manifest_compiles_to_web_only_on_both_back_ends():
    """examples/demo/policy.yaml, compiled for the demo's pods: only web's identity gets in."""
    demo = Path(__file__).resolve().parent.parent / "examples" / "demo"
    objects = [parse_object(d) for d in yaml.safe_load_all((demo / "policy.yaml").read_text())]
    objects += [parse_object(pod_doc("books", NS, labels={"app": "books"}, ports=(("grpc", 9090), ("health", 8086)))),
                parse_object(pod_doc("authors", NS, labels={"app": "authors"}, ports=(("http", 8080),)))]
    policies = compile_policies(objects).policies
    for pod, port, server in (("books", 9090, "books-grpc"), ("authors", 8080, "authors-http")):
        p = next(pp for pp in policies[schemas.policy_key(NS, pod)].ports if pp.port == port)
        assert p.server == server and [(a.name, a.identities) for a in p.authorizations] == \
            [("backends-from-web", [WEB])]
