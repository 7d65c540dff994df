"""Service profiles through real proxies: per-route timeouts, retries under a budget, route
figures, and `tulle routes` reading them.

Two real ProxyApps (a client proxy and the back end's proxy, mTLS between them) on a real
nats-server; endpoint sets and profiles are written into KV as the destination service
would; the back ends are real HTTP servers whose failures come from a seeded random
generator (so a run is reproducible) or from the attempt header the client proxy adds.
"""

from __future__ import annotations

import http.server
import json
import random
import select
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.bus_support import cli_bus_args, server_for
from tests.conftest import REPO, wait_until
from tests.proxy_support import (
    KV, LoopThread, Mesh, Proxy, RawServer, endpoint_set, http_request, meshed_endpoint, proxy_config, unique_ns,
)
from proxy.balancer import Balancer
from proxy.profiles import RetryBudget, RouteTable, grpc_status_of, retry_allowed
from tulle import schemas
from tulle.metrics import sample

TULLE = str(Path(sys.executable).with_name("tulle"))
PORT = 8080  # the service port callers address
RETRY_HEADER = "tulle-retry-attempt"


@pytest.fixture
def lt():
    loop = LoopThread()
    yield loop
    loop.stop()


# --- the pure pieces the room uses ---------------------------------------------------------


def test_a_retry_pick_avoids_the_endpoint_that_failed_while_another_exists():
    b = Balancer(clock=lambda: 0.0, rng=random.Random(3))
    b.update(["a", "b", "c"])
    failed = b.states[0]
    assert all(b.pick_other(failed) is not failed for _ in range(200))
    b.update(["a"])
    assert b.pick_other(b.states[0]) is b.states[0]  # the only one left: it is still tried
    assert b.pick_other(None) is b.states[0]


def test_grpc_status_in_the_head_classifies_a_response():
    assert grpc_status_of([(b"Content-Type", b"application/grpc"), (b"Grpc-Status", b"14")]) == 14
    assert grpc_status_of([(b"content-type", b"text/plain")]) is None
    assert grpc_status_of([(b"grpc-status", b"x")]) is None


def test_a_body_not_kept_whole_is_never_retried_and_spends_no_budget():
    r = route("r", "GET", "/", retryable=True)
    profile = schemas.Profile(namespace="n", service="s", fqdn="f", routes=[r])
    compiled = RouteTable.from_profile(profile).match("GET", "/")
    budget = RetryBudget(retry_ratio=0.0, min_retries_per_second=1, ttl_s=1.0, clock=lambda: 0.0)
    assert not retry_allowed(compiled, True, False, False, budget)
    assert budget.available() == 1
    assert retry_allowed(compiled, True, True, False, budget)


# --- a back end that records every attempt ----------------------------------------------------


class Attempt:
    __slots__ = ("method", "path", "retry", "body", "backend")

    def __init__(self, method: str, path: str, retry: str | None, body: bytes, backend: str):
        self.method, self.path, self.retry, self.body, self.backend = method, path, retry, body, backend


class Backend:
    """A threaded HTTP/1.1 keep-alive server. `status(path, retry_header)` decides each answer.

    `/slow...` waits up to 2 s before answering, but notices at once when its connection
    is closed under it (then `released` is set).
    """

    def __init__(self, name: str, status: Callable[[str, str | None], int], delay: float = 0.0):
        self.name = name
        self.attempts: list[Attempt] = []
        self.lock = threading.Lock()
        self.released = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *a):
                pass

            def _handle(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                retry = self.headers.get(RETRY_HEADER)
                with outer.lock:
                    outer.attempts.append(Attempt(self.command, self.path, retry, body, outer.name))
                if self.path.startswith("/slow"):
                    readable, _, _ = select.select([self.connection], [], [], 2.0)
                    if readable:
                        try:
                            gone = self.connection.recv(1, socket.MSG_PEEK) == b""
                        except OSError:
                            gone = True
                        if gone:
                            outer.released.set()
                            self.close_connection = True
                            return
                if delay:
                    time.sleep(delay)
                code = outer.status(self.path, retry)
                payload = json.dumps({"backend": outer.name, "received": len(body)}).encode()
                self.send_response(code)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _handle

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 512

        self.status = status
        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def seen(self, prefix: str = "/") -> list[Attempt]:
        with self.lock:
            return [a for a in self.attempts if a.path.startswith(prefix)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def flaky(rate: float, seed: int = 7) -> Callable[[str, str | None], int]:
    """Fail `rate` of the answers under /authors/ at random (a seeded generator: the same
    run every time); anything else answers 200."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def status(path: str, retry: str | None) -> int:
        if not path.startswith("/authors/"):
            return 200
        with lock:
            return 500 if rng.random() < rate else 200
    return status


def first_attempt_fails(path: str, retry: str | None) -> int:
    return 200 if retry else 500


def always(code: int) -> Callable[[str, str | None], int]:
    return lambda path, retry: code


def route(name: str, method: str, path_regex: str, *, retryable: bool = False, timeout_ms: int = 0) -> schemas.Route:
    return schemas.Route(name=name, condition=schemas.RequestMatch(method=method, path_regex=path_regex),
                         is_retryable=retryable, timeout_ms=timeout_ms)


# --- the mesh: one client proxy, one server proxy in front of the back ends ------------------


class Mesh2:
    """web (client proxy) → authors (server proxy) → back end(s), over mTLS."""

    def __init__(self, lt: LoopThread, nats_url: str):
        self.lt = lt
        self.nats_url = nats_url
        self.mesh = Mesh()
        self.ns = unique_ns()
        self.authors_id = self.mesh.identity("authors", self.ns)
        self.server = Proxy(lt, proxy_config(nats_url, self.ns, "authors", "authors"), self.authors_id)
        self.client = Proxy(lt, proxy_config(nats_url, self.ns, "web", "web"), self.mesh.identity("web", self.ns))
        self.kv = KV(lt, nats_url)
        self.backends: list[Backend] = []

    def serve(self, *backends: Backend, extra: list[schemas.Endpoint] = ()) -> None:
        self.backends.extend(backends)
        endpoints = [meshed_endpoint(b.port, self.server.inbound, self.authors_id.identity) for b in backends]
        self.kv.put(schemas.endpoints_key(self.ns, "authors", PORT),
                    endpoint_set(self.ns, "authors", PORT, [*endpoints, *extra]))

    def profile(self, *routes: schemas.Route, budget: schemas.RetryBudget | None = None) -> None:
        self.kv.put(schemas.profile_key(self.ns, "authors"), schemas.Profile(
            namespace=self.ns, service="authors", fqdn=f"authors.{self.ns}.svc.cluster.local", routes=list(routes),
            retry_budget=budget or schemas.RetryBudget()), bucket=schemas.PROFILES_BUCKET)

    @property
    def host(self) -> str:
        return f"authors.{self.ns}:{PORT}"

    def request(self, method: str = "GET", path: str = "/", body: bytes | None = None, headers: dict | None = None,
                timeout: float = 10.0):
        return http_request(self.client.outbound, method, path, host=self.host, body=body, headers=headers,
                            timeout=timeout)

    def close(self) -> None:
        self.kv.close()
        self.client.stop()
        self.server.stop()
        for b in self.backends:
            b.close()


@pytest.fixture
def mesh(lt, nats_server):
    m = Mesh2(lt, nats_server.url)
    yield m
    m.close()


def paced(n: int, rate: float, fn: Callable[[int], None]) -> None:
    """Call fn(i) n times on a fixed schedule of `rate` per second (the load's pace, not a wait)."""
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        fn(i)


def routes_wide(nats_url: str, ns: str) -> dict[str, dict[str, str]]:
    """`tulle routes authors -n NS -o wide` (the real console script), as {route: {column: cell}}."""
    out = subprocess.run([TULLE, "routes", "authors", "-n", ns, "-o", "wide", *cli_bus_args(nats_url)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    header = lines[0].split()
    rows = {}
    for line in lines[1:]:
        cells = line.split()
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def pct(cell: str) -> float:
    assert cell.endswith("%"), cell
    return float(cell[:-1])


# --- the "done when" ---------------------------------------------------------------


def test_retries_lift_the_effective_success_of_a_quarter_failing_back_end_above_99_percent(mesh, nats_server):
    backend = Backend("authors", flaky(0.25))
    mesh.serve(backend)
    mesh.profile(route("flaky", "GET", "/authors/[^/]*", retryable=True, timeout_ms=2000))
    statuses = []
    paced(100, 20, lambda i: statuses.append(mesh.request(path=f"/authors/{i % 4 + 1}")[0]))

    effective = statuses.count(200) / len(statuses)
    attempts = backend.seen("/authors/")  # every attempt on the wire
    retried = [a for a in attempts if a.retry is not None]
    print(f"effective {effective:.1%}, {len(attempts)} attempts for {len(statuses)} requests")
    assert effective >= 0.99
    assert len(attempts) == len(statuses) + len(retried)
    # What the client proxy counted matches the wire, and sits near the back end's 75 %.
    m = mesh.client.metrics()
    act_ok = sample(m, "route_actual_response_total", rt_route="flaky", classification="success")
    act_fail = sample(m, "route_actual_response_total", rt_route="flaky", classification="failure")
    eff_ok = sample(m, "route_response_total", rt_route="flaky", classification="success")
    assert act_ok + act_fail == len(attempts)
    assert eff_ok == statuses.count(200)
    assert 0.65 <= act_ok / (act_ok + act_fail) <= 0.85

    rows = routes_wide(nats_server.url, mesh.ns)
    flaky_row = rows["flaky"]
    assert pct(flaky_row["EFFECTIVE_SUCCESS"]) >= 99.0
    assert 65.0 <= pct(flaky_row["ACTUAL_SUCCESS"]) <= 85.0
    assert pct(flaky_row["EFFECTIVE_SUCCESS"]) > pct(flaky_row["ACTUAL_SUCCESS"])
    assert float(flaky_row["ACTUAL_RPS"][:-3]) > float(flaky_row["EFFECTIVE_RPS"][:-3])


def test_retries_at_500_per_second_against_a_half_failing_back_end_stay_within_the_budget(mesh):
    backend = Backend("authors", flaky(0.5))
    mesh.serve(backend)
    mesh.profile(route("flaky", "GET", "/authors/[^/]*", retryable=True))  # default budget: 20 % + 10/s, ttl 10 s
    assert mesh.request(path="/warm")[0] == 200  # discovery and connections in place
    duration = 6.0
    out = subprocess.run([sys.executable, "-m", "bench.openloop", "--port", str(mesh.client.outbound),
                          "--host-header", mesh.host, "--path", "/authors/1", "--rate", "500",
                          "--duration", str(duration)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    load = json.loads(out.stdout)
    attempts = backend.seen("/authors/")
    originals = sum(1 for a in attempts if a.retry is None)
    retries = len(attempts) - originals
    print(f"open loop: {load}; {originals} requests reached the back end, {retries} retries")
    assert originals >= 0.95 * load["sent"]
    # The budget: 20 % of the requests, plus 10/s over its 10 s window (a run shorter than
    # the window may use the whole reserve at once); a small tolerance on top.
    allowed = 0.2 * originals + 10 * max(duration, 10.0)
    assert retries <= allowed + 0.02 * originals
    # Retries did happen (half the answers failed, so the budget was used up), just not a storm.
    assert retries >= 0.5 * allowed


def test_a_non_retryable_route_is_never_retried(mesh):
    backend = Backend("authors", always(500))
    mesh.serve(backend)
    mesh.profile(route("write", "POST", "/authors", retryable=False),
                 route("read", "GET", "/authors/[^/]*", retryable=True))
    statuses = [mesh.request("POST", "/authors", body=b'{"name": "x"}')[0] for _ in range(10)]
    assert statuses == [500] * 10
    seen = backend.seen("/authors")
    assert len(seen) == 10 and all(a.retry is None for a in seen)


def test_a_post_with_a_10_kib_body_on_a_retryable_route_is_retried_with_the_identical_body(mesh):
    backend = Backend("authors", first_attempt_fails)
    mesh.serve(backend)
    mesh.profile(route("create", "POST", "/authors", retryable=True))
    body = random.Random(1).randbytes(10 * 1024)
    status, _, answer = mesh.request("POST", "/authors", body=body)
    assert status == 200 and json.loads(answer)["received"] == len(body)
    seen = backend.seen("/authors")
    assert [a.retry for a in seen] == [None, "1"]
    assert all(a.body == body for a in seen)


def test_a_post_with_a_100_kib_body_is_not_retried_and_arrives_intact(mesh):
    backend = Backend("authors", first_attempt_fails)
    mesh.serve(backend)
    mesh.profile(route("create", "POST", "/authors", retryable=True))
    body = random.Random(2).randbytes(100 * 1024)
    status, _, _ = mesh.request("POST", "/authors", body=body)
    assert status == 500  # the first attempt's answer: too large to replay, so never sent again
    seen = backend.seen("/authors")
    assert len(seen) == 1 and seen[0].retry is None and seen[0].body == body


def test_a_route_timeout_answers_504_in_time_and_releases_the_back_ends_connection(mesh):
    backend = Backend("authors", always(200))
    mesh.serve(backend)
    mesh.profile(route("slow", "GET", "/slow", retryable=True, timeout_ms=300))
    started = time.monotonic()
    status, headers, _ = mesh.request(path="/slow")
    took = time.monotonic() - started
    assert status == 504 and "tulle-proxy-error" in headers
    assert took < 0.3 + 1.0, f"504 after {took:.2f}s"
    assert backend.released.wait(5), "the back end never saw its connection closed"
    assert len(backend.seen("/slow")) == 1  # a route timeout is not itself retried
    m = mesh.client.metrics()
    assert sample(m, "route_response_total", rt_route="slow", classification="failure") == 1
    assert sample(m, "route_actual_response_total", rt_route="slow", classification="failure") == 0


# --- how retries go --------------------------------------------------------------------------


def two_overlapping_requests(mesh: Mesh2, seen: Callable[[], int]) -> list[int]:
    """Request A, and once a back end holds it, request B: the balancer sends B to the other
    endpoint (A's is busy), so both endpoints get a first attempt whatever A's pick was."""
    results: dict[str, int] = {}
    a = threading.Thread(target=lambda: results.__setitem__("a", mesh.request(path="/authors/1")[0]))
    a.start()
    wait_until(lambda: seen() >= 1, timeout=10, what="request A at a back end")
    results["b"] = mesh.request(path="/authors/2")[0]
    a.join(10)
    return [results.get("a"), results["b"]]


def test_a_retry_goes_to_another_endpoint_and_carries_its_attempt_number(mesh):
    broken = Backend("broken", always(500), delay=0.3)
    healthy = Backend("healthy", always(200), delay=0.3)
    mesh.serve(broken, healthy)
    mesh.profile(route("read", "GET", "/authors/[^/]*", retryable=True))
    assert two_overlapping_requests(mesh, lambda: len(broken.seen()) + len(healthy.seen())) == [200, 200]
    assert [a.retry for a in broken.seen()] == [None]  # one first attempt, never a retry back onto it
    assert sorted(a.retry or "" for a in healthy.seen()) == ["", "1"]  # the other first attempt, and the retry


def test_a_refused_connection_on_a_retryable_route_is_retried_on_another_endpoint(mesh):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    healthy = Backend("healthy", always(200), delay=0.3)
    try:
        mesh.serve(healthy, extra=[schemas.Endpoint(address="127.0.0.1", port=dead.getsockname()[1])])
        mesh.profile(route("read", "GET", "/authors/[^/]*", retryable=True))
        assert two_overlapping_requests(mesh, lambda: len(healthy.seen())) == [200, 200]
    finally:
        dead.close()
    m = mesh.client.metrics()
    assert sample(m, "route_actual_response_total", rt_route="read", classification="failure") >= 1
    assert sample(m, "route_response_total", rt_route="read", classification="success") == 2
    assert any(a.retry == "1" for a in healthy.seen())


def test_a_connection_reset_before_the_answer_is_retried_on_a_retryable_route(mesh):
    """A back end reached without a proxy (no identity) resets every first attempt."""
    seen: list[str | None] = []

    def reset_first_attempts(conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                return
            head += chunk
        retry = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                      if line.lower().startswith(RETRY_HEADER.encode() + b":")), None)
        seen.append(retry)
        if retry is None:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")

    raw = RawServer(reset_first_attempts)
    try:
        mesh.kv.put(schemas.endpoints_key(mesh.ns, "authors", PORT), endpoint_set(
            mesh.ns, "authors", PORT, [schemas.Endpoint(address="127.0.0.1", port=raw.port)]))
        mesh.profile(route("read", "GET", "/authors/[^/]*", retryable=True),
                     route("write", "POST", "/authors", retryable=False))
        assert [mesh.request(path=f"/authors/{i}")[0] for i in range(5)] == [200] * 5
        assert seen == [None, "1"] * 5
        seen.clear()
        assert mesh.request("POST", "/authors", body=b"{}")[0] == 502  # not retryable: the caller sees it
        assert seen == [None]
    finally:
        raw.close()


def test_an_apps_own_retry_attempt_header_never_reaches_the_server(mesh):
    backend = Backend("authors", always(200))
    mesh.serve(backend)
    mesh.profile(route("read", "GET", "/authors/[^/]*", retryable=True))
    assert mesh.request(path="/authors/1", headers={RETRY_HEADER: "7"})[0] == 200
    assert [a.retry for a in backend.seen()] == [None]


def test_requests_matching_no_route_count_under_default_and_are_not_retried(mesh):
    backend = Backend("authors", always(503))
    mesh.serve(backend)
    mesh.profile(route("read", "GET", "/authors/[^/]*", retryable=True))
    assert [mesh.request(path="/other")[0] for _ in range(3)] == [503] * 3
    assert len(backend.seen("/other")) == 3
    m = mesh.client.metrics()
    assert sample(m, "route_response_total", rt_route="[DEFAULT]", classification="failure") == 3


def test_a_changed_profile_applies_to_the_next_requests(mesh):
    backend = Backend("authors", first_attempt_fails)
    mesh.serve(backend)
    mesh.profile(route("read", "GET", "/authors/[^/]*", retryable=False))
    assert mesh.request(path="/authors/1")[0] == 500
    mesh.profile(route("read", "GET", "/authors/[^/]*", retryable=True))
    wait_until(lambda: mesh.request(path="/authors/1")[0] == 200, timeout=10, what="the retryable profile in force")


def test_a_proxy_answers_route_stats_for_its_own_workload_only(mesh):
    backend = Backend("authors", always(200))
    mesh.serve(backend)
    mesh.profile(route("read", "GET", "/authors/[^/]*"))
    assert [mesh.request(path="/authors/1")[0] for _ in range(3)] == [200] * 3

    def gather(**request) -> list[schemas.StatsReply]:
        return mesh.lt.call(mesh.kv.bus.gather(schemas.PROXY_STATS_SUBJECT, schemas.StatsRequest(**request),
                                               schemas.StatsReply, 1.0))

    replies = gather(workloads=[f"{mesh.ns}.web"], services=[f"{mesh.ns}.authors"])
    assert [(r.workload, [(w.route, w.effective_requests, w.actual_requests) for w in r.routes])
            for r in replies] == [("web", [("read", 3, 3)])]
    assert gather(workloads=[f"{mesh.ns}.nobody"]) == []
