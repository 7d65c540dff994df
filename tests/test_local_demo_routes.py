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
