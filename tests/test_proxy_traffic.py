"""The traffic figures real proxies answer on `tulle.proxy.v1.traffic` (what `tulle stat`,
`tulle edges` and the dashboard read).

Two real ProxyApps on a real nats-server, mTLS between them: `web` (the client proxy)
calls the service `books`, whose proxy fronts an app that answers HTTP/1.1 and echoes
anything else. The figures are gathered as the CLI does, with the observer's credential.
"""

from __future__ import annotations

import socket

import pytest

from tulle.policy import InboundPolicy
from tests.bus_support import bus_for
from tests.conftest import wait_until
from tests.proxy_support import (
    KV, LoopThread, Mesh, Proxy, RawServer, endpoint_set, http_request, meshed_endpoint, proxy_config, unique_ns,
)
from tulle import schemas

PAYLOAD = b"\x00opaque-ping" * 10


class HttpOrEcho:
    """HTTP/1.1 keep-alive when spoken to in HTTP (GET /fail answers 503), else an echo."""

    def __init__(self):
        self.raw = RawServer(self._serve)
        self.port = self.raw.port

    def _serve(self, conn: socket.socket) -> None:
        buf = conn.recv(65536)
        if not buf[:1].isalpha():
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
            status = b"503 Unavailable" if head.split(b" ")[1] == b"/fail" else b"200 OK"
            conn.sendall(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\n\r\nok")

    def close(self) -> None:
        self.raw.close()


@pytest.fixture
def lt():
    loop = LoopThread()
    yield loop
    loop.stop()


class WebToBooks:
    def __init__(self, lt: LoopThread, nats_url: str):
        self.lt, self.ns, self.mesh = lt, unique_ns(), Mesh()
        self.app = HttpOrEcho()
        self.books_id = self.mesh.identity("books", self.ns)
        self.web_id = self.mesh.identity("web", self.ns)
        # Only authenticated clients may reach books: a plain client is denied.
        self.books = Proxy(lt, proxy_config(nats_url, self.ns, "books", "books", app_default_port=self.app.port),
                           self.books_id, policy=InboundPolicy("all-authenticated"))
        self.web = Proxy(lt, proxy_config(nats_url, self.ns, "web", "web"), self.web_id)
        self.kv = KV(lt, nats_url)
        self.kv.put(schemas.endpoints_key(self.ns, "books", self.app.port), endpoint_set(
            self.ns, "books", self.app.port, [meshed_endpoint(self.app.port, self.books.inbound, self.books_id.identity)]))
        self.observer = bus_for(nats_url, "observer", component="cli")
        lt.call(self.observer.start())

    @property
    def authority(self) -> str:
        return f"books.{self.ns}:{self.app.port}"

    def gather(self, **request) -> dict[str, schemas.TrafficReply]:
        replies = self.lt.call(self.observer.gather(
            schemas.PROXY_TRAFFIC_SUBJECT, schemas.TrafficRequest(**request), schemas.TrafficReply, 1.5))
        return {r.workload: r for r in replies if r.namespace == self.ns}

    def tunnel(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.web.outbound), timeout=10)
        s.sendall(f"CONNECT {self.authority} HTTP/1.1\r\nHost: {self.authority}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
        return s

    def close(self) -> None:
        self.lt.call(self.observer.close())
        self.kv.close()
        self.web.stop()
        self.books.stop()
        self.app.close()


@pytest.fixture
def mesh(lt, nats_server):
    m = WebToBooks(lt, nats_server.url)
    yield m
    m.close()


def only(edges: list[schemas.TrafficEdge], **fields) -> schemas.TrafficEdge:
    found = [e for e in edges if all(getattr(e, k) == v for k, v in fields.items())]
    assert len(found) == 1, edges
    return found[0]


def test_both_proxies_of_a_call_report_it_secured_with_the_identities_each_side_proved(mesh):
    statuses = [http_request(mesh.web.outbound, path=p, host=mesh.authority)[0] for p in ["/"] * 5 + ["/fail"] * 2]
    assert statuses == [200] * 5 + [503] * 2
    tunnel = mesh.tunnel()  # opaque over mTLS, left open
    try:
        tunnel.sendall(PAYLOAD)
        echoed = b""
        while len(echoed) < len(PAYLOAD):
            echoed += tunnel.recv(65536)
        replies = mesh.gather(window_s=60)
        assert set(replies) == {"web", "books"}

        web = replies["web"]
        assert web.identity == mesh.web_id.identity
        out = only(web.edges, direction="outbound")
        assert (out.peer_namespace, out.peer_name, out.peer_identity, out.secured) == (
            mesh.ns, "books", mesh.books_id.identity, True)
        # 7 requests and the CONNECT (answered 200); the 503s fail
        assert (out.requests, out.successes, out.failures) == (8, 6, 2)
        assert sum(out.latency_counts) == 8
        # the open tunnel: counted now, with the bytes it carried so far
        assert (out.tcp_opened, out.tcp_open) == (1, 1)
        assert out.bytes_written >= len(PAYLOAD) and out.bytes_read >= len(PAYLOAD)

        books = replies["books"]
        inbound = only(books.edges, direction="inbound", secured=True)
        assert (inbound.peer_namespace, inbound.peer_name, inbound.peer_identity) == (
            mesh.ns, "web", mesh.web_id.identity)
        assert (inbound.requests, inbound.successes, inbound.failures, inbound.denied) == (7, 5, 2, 0)
        assert inbound.tcp_open >= 2  # web's pooled HTTP connection and the tunnel
        assert inbound.bytes_read >= len(PAYLOAD)
    finally:
        tunnel.close()
    # Once closed, the tunnel's bytes stay in the window; it is no longer open.
    def closed() -> bool:
        edge = only(mesh.gather(window_s=60)["web"].edges, direction="outbound")
        return edge.tcp_open == 0 and edge.bytes_written >= len(PAYLOAD)
    wait_until(closed, timeout=10, what="the closed tunnel counted in the window")


def test_a_client_without_identity_is_one_unsecured_peer_and_its_denials_count(mesh):
    status = http_request(mesh.books.inbound, path="/", host="books")[0]  # straight in, no mTLS
    assert status == 403
    books = mesh.gather(window_s=60)["books"]
    nobody = only(books.edges, direction="inbound", secured=False)
    assert (nobody.peer_namespace, nobody.peer_name, nobody.peer_identity) == ("", "", "")
    assert (nobody.requests, nobody.denied) == (1, 1)


def test_only_the_proxies_asked_for_answer(mesh):
    http_request(mesh.web.outbound, path="/", host=mesh.authority)
    assert set(mesh.gather(workloads=[f"{mesh.ns}.web"])) == {"web"}
    assert mesh.gather(workloads=[f"{mesh.ns}.nobody"]) == {}
