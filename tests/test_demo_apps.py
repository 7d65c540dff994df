"""The bundled demo's apps (examples/demo/apps), run as plain processes without the mesh:
what they do must be right before the mesh can show anything about them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from tests.conftest import REPO, wait_until
from tulle.natsserver import free_port, wait_for_port
from tulle.resources import model as m
from tulle.resources.parse import load_dir

DEMO = REPO / "examples" / "demo"


class App:
    def __init__(self, script: str, tmp: Path, **env: str):
        self.port = free_port()
        self.log = tmp / f"{script}.log"
        full = dict(os.environ, HOST="127.0.0.1", PORT=str(self.port), **env)
        for k in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
            full.pop(k, None)
        self.env = full
        self.proc = subprocess.Popen([sys.executable, f"apps/{script}.py"], cwd=DEMO, env=full,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)

    def wait(self, port=None):
        assert wait_for_port("127.0.0.1", port or self.port, 20), f"{self.log.read_text()}"
        return self

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]


@pytest.fixture
def apps(tmp_path):
    started: list[App] = []

    def start(script, **env):
        app = App(script, tmp_path, **env)
        started.append(app)
        return app

    yield start
    for app in started:
        app.stop()


def test_the_demo_folder_is_valid_manifests_with_five_workloads_and_three_services():
    objects = load_dir(DEMO)
    workloads = {o.meta.name: o for o in objects if isinstance(o, m.Workload)}
    services = {o.meta.name: o for o in objects if isinstance(o, m.Service)}
    assert set(workloads) == {"web", "books", "books-2", "authors", "traffic"}  # books: two replicas
    assert set(services) == {"web", "books", "authors"}
    assert {w.meta.namespace for w in workloads.values()} == {"demo"}
    assert {w.service_account for w in workloads.values()} == {"web", "books", "authors", "traffic"}
    assert all(w.probes for w in workloads.values())
    assert (services["web"].ports[0].port, services["web"].ports[0].target_port) == (80, "http")
    assert (services["books"].ports[0].port, services["books"].ports[0].target_port) == (9090, "grpc")


def test_authors_fails_about_the_configured_fraction_of_requests(apps):
    authors = apps("authors", FAILURE_RATE="0.5").wait()
    statuses = [authors.get("/authors/1")[0] for _ in range(200)]
    # Binomial(200, 0.5): outside 60..140 has a probability below 1e-8.
    assert set(statuses) == {200, 500} and 60 <= statuses.count(500) <= 140


def test_authors_without_failures_answers_every_request_and_logs_one_json_line_each(apps):
    authors = apps("authors", FAILURE_RATE="0").wait()
    assert [authors.get("/authors/2")[0] for _ in range(20)] == [200] * 20
    assert authors.get("/authors/2")[1]["name"] == "Italo Calvino"
    assert authors.get("/authors/99")[0] == 404
    wait_until(lambda: sum(1 for line in authors.log_lines() if line.get("path") == "/authors/2") == 21,
               what="one log line per request")


def test_debug_headers_echo_every_header_the_request_arrived_with(apps):
    authors = apps("authors", FAILURE_RATE="0").wait()
    status, body = authors.get("/debug/headers", {"tulle-client-id": "web.demo.serviceaccount.identity.tulle.cluster.local",
                                                  "X-Other": "1"})
    assert status == 200
    assert body["headers"]["tulle-client-id"] == ["web.demo.serviceaccount.identity.tulle.cluster.local"]
    assert body["headers"]["x-other"] == ["1"]


def test_books_answers_grpc_with_json_messages_and_its_health_port(apps, tmp_path):
    health = free_port()
    books = apps("books", PORT_GRPC=str(free_port()), PORT_HEALTH=str(health))
    grpc_port = int(books.env["PORT_GRPC"])
    books.wait(grpc_port).wait(health)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        get = channel.unary_unary("/demo.Books/GetBook", request_serializer=lambda o: json.dumps(o).encode(),
                                  response_deserializer=json.loads)
        assert get({"id": 3}, timeout=10)["title"] == "Kindred"
        with pytest.raises(grpc.RpcError) as e:
            get({"id": 42}, timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with urllib.request.urlopen(f"http://127.0.0.1:{health}/ready", timeout=10) as resp:
        assert resp.status == 200


def test_web_joins_a_book_from_books_over_grpc_with_its_author_over_http(apps):
    authors = apps("authors", FAILURE_RATE="0").wait()
    books = apps("books", PORT_GRPC=str(free_port()), PORT_HEALTH=str(free_port()))
    books.wait(int(books.env["PORT_GRPC"]))
    web = apps("web", BOOKS_ADDR=f"127.0.0.1:{books.env['PORT_GRPC']}",
               AUTHORS_URL=f"http://127.0.0.1:{authors.port}").wait()
    status, body = web.get("/books/1")
    assert status == 200 and body["book"]["title"] == "The Dispossessed"
    assert body["author"]["name"] == "Ursula K. Le Guin"
    assert web.get("/books/42")[0] == 404
    assert len(web.get("/books")[1]["books"]) == 5


def test_web_answers_502_when_authors_fails(apps):
    authors = apps("authors", FAILURE_RATE="1").wait()
    books = apps("books", PORT_GRPC=str(free_port()), PORT_HEALTH=str(free_port()))
    books.wait(int(books.env["PORT_GRPC"]))
    web = apps("web", BOOKS_ADDR=f"127.0.0.1:{books.env['PORT_GRPC']}",
               AUTHORS_URL=f"http://127.0.0.1:{authors.port}").wait()
    status, body = web.get("/books/2")
    assert status == 502 and "authors answered 500" in body["error"]


def test_traffic_sends_a_steady_load_and_counts_outcomes(apps):
    authors = apps("authors", FAILURE_RATE="0").wait()  # any HTTP server will do as a target
    traffic = apps("traffic", TARGET=f"http://127.0.0.1:{authors.port}/authors", RATE="50").wait()

    def counted():
        stats = traffic.get("/stats")[1]
        return stats if stats.get("requests", 0) >= 10 else None

    stats = wait_until(counted, timeout=30, what="traffic to count ten requests")
    # /authors/<book id>: ids 1-4 exist, 5 does not — both outcomes are counted.
    assert stats.get("status_200", 0) + stats.get("status_404", 0) == stats["requests"]


def test_the_books_profile_is_what_tulle_profile_makes_of_the_books_proto():
    """examples/demo/profile-books.yaml is generated, not hand-written: one route per rpc."""
    tulle = str(Path(sys.executable).with_name("tulle"))
    out = subprocess.run([tulle, "profile", "books", "-n", "demo", "--proto", "examples/demo/apps/books.proto"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (DEMO / "profile-books.yaml").read_text()
    profiles = [o for o in load_dir(DEMO) if isinstance(o, m.ServiceProfile) and o.meta.name.startswith("books.")]
    assert [r.name for r in profiles[0].routes] == ["POST /demo.Books/GetBook", "POST /demo.Books/ListBooks"]
