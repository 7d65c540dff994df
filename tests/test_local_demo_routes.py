"""The bundled demo in local mode (loopback addresses, no root): its ServiceProfile makes
web's proxy retry the flaky `authors` back end (FAILURE_RATE 0.25), so `tulle routes
authors -n demo -o wide` shows what web saw (EFFECTIVE_SUCCESS) above what went over the
wire (ACTUAL_SUCCESS). Everything is real: `tulle up`, the four services, the proxies,
the demo apps and their traffic, and the `tulle` console script reading the figures."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.conftest import wait_until
from tests.local_support import read_record, tulle
from tulle.metrics import parse_text


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    state = tmp_path_factory.mktemp("demo-routes") / "state"
    up = tulle("up", "--detach", "--isolation", "none", "--timeout", "120", state=state, timeout=180)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        yield state
    finally:
        tulle("down", state=state, timeout=60)


def authors_rows(state, output: str) -> str:
    proc = tulle("routes", "authors", "-n", "demo", "-o", output, state=state, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def lookups(state) -> dict:
    """The JSON row of the profile's `GET /authors/{id}` route."""
    rows = json.loads(authors_rows(state, "json"))["svc/authors.demo"]
    return next(r for r in rows if r["route"] == "GET /authors/{id}")


def attempts_seen_by_webs_proxy(state) -> float:
    admin = next(w["proxy"]["admin"] for w in read_record(state)["workloads"] if w["name"] == "web")
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as resp:
        samples = parse_text(resp.read().decode())
    return sum(v for (name, labels), v in samples.items()
               if name == "route_actual_response_total" and ("rt_route", "GET /authors/{id}") in labels)


def test_the_demo_profile_shows_effective_success_above_actual_success(demo):
    # The demo's traffic calls web 10 times a second, and web calls authors each time.
    wait_until(lambda: attempts_seen_by_webs_proxy(demo) >= 150, timeout=90, interval=0.5,
               what="150 attempts on the authors lookup route")
    row = lookups(demo)
    assert row["effective_success"] >= 0.97
    assert 0.6 <= row["actual_success"] <= 0.9  # the back end fails about a quarter of them
    assert row["actual_rps"] > row["effective_rps"]  # the retries

    wide = authors_rows(demo, "wide")
    header, *lines = wide.strip().splitlines()
    line = next(x for x in lines if x.startswith("GET /authors/{id} "))
    cells = line[len("GET /authors/{id}"):].split()
    columns = header.split()[1:]  # the route name has a space: drop the ROUTE column
    values = dict(zip(columns, cells))
    effective, actual = (float(values[c].rstrip("%")) for c in ("EFFECTIVE_SUCCESS", "ACTUAL_SUCCESS"))
    assert effective > actual


def inbound_requests(state, workload: str) -> float:
    """HTTP requests a workload's proxy took in (its inbound side)."""
    admin = next(w["proxy"]["admin"] for w in read_record(state)["workloads"] if w["name"] == workload)
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as resp:
        samples = parse_text(resp.read().decode())
    return sum(v for (name, labels), v in samples.items()
               if name == "request_total" and ("direction", "inbound") in labels)


def test_webs_grpc_calls_spread_over_both_books_replicas_and_show_per_rpc_in_tulle_routes(demo):
    """books runs two replicas; grpcio in web keeps one connection (a CONNECT tunnel through
    its proxy, here), yet the proxy balances call by call — and `tulle routes books` shows
    each rpc of the profile `tulle profile --proto` made."""
    wait_until(lambda: min(inbound_requests(demo, "books"), inbound_requests(demo, "books-2")) >= 20,
               timeout=120, interval=1, what="both books replicas to have served 20 of web's calls")
    proc = tulle("routes", "books", "-n", "demo", "-o", "json", state=demo, timeout=30)
    assert proc.returncode == 0, proc.stderr
    rows = {r["route"]: r for r in json.loads(proc.stdout)["svc/books.demo"]}
    get_book = rows["POST /demo.Books/GetBook"]
    assert get_book["effective_success"] == 1.0 and get_book["actual_success"] == 1.0
    assert get_book["effective_rps"] > 0 and get_book["actual_rps"] > 0
    assert "POST /demo.Books/ListBooks" in rows  # a profile route without traffic still has its row
