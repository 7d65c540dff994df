"""`tulle routes`: scatter-gather over a real nats-server with in-test proxies answering on
PROXY_STATS_SUBJECT with `stats_reply(...)`; the real CLI runs as a subprocess.

The in-test proxies keep real RouteStats on a fixed clock, so rates are exact: each
window below covers 60 seconds.
"""

import asyncio
import json
import re
import sys
import time
from pathlib import Path

import pytest

from proxy.route_stats import RouteStats, stats_reply
from tulle import schemas
from tulle.bus import Bus
from tulle.cli.routes import Row, aggregate, parse_target, plain_table, table_rows
from tulle.errors import UserError
from tests.bus_support import TESTER, bus_for, cli_bus_args

TULLE = str(Path(sys.executable).with_name("tulle"))
QUERY_TIME = 2159.999  # the in-test proxies' clock when asked: 60 s after their traffic began


class Clock:
    t = 2000.0

    def __call__(self):
        return self.t


def proxy_stats(traffic) -> RouteStats:
    """RouteStats of a proxy that saw `traffic`: (service, route, effective, ok, actual, actual_ok, latency_ms)."""
    clock = Clock()
    stats = RouteStats(clock=clock)
    clock.t = 2100.0
    for service, route, eff, eff_ok, act, act_ok, latency in traffic:
        rec = stats.route(service, route)
        for i in range(eff):
            rec.effective(i < eff_ok, latency)
        for i in range(act):
            rec.actual(i < act_ok)
    clock.t = QUERY_TIME
    return stats


@pytest.fixture
async def mesh(own_nats):
    """demo/web and demo/traffic answer; demo/books is ready but never answers; demo/old is not ready."""
    bus = bus_for(own_nats.url, TESTER, component="test")
    await bus.start()
    proxies = {
        "web": proxy_stats([("demo.authors", "GET /authors/{id}", 120, 114, 150, 114, 10),
                            ("demo.books", "[DEFAULT]", 30, 30, 30, 30, 3)]),
        "traffic": proxy_stats([("demo.authors", "GET /authors/{id}", 60, 60, 60, 60, 50),
                                ("demo.web", "[DEFAULT]", 6, 3, 6, 3, 200)]),
    }
    now = time.time()
    for name in ("web", "traffic", "books", "old"):
        await bus.put(schemas.PROXIES_BUCKET, schemas.proxy_key("demo", name), schemas.ProxyHeartbeat(
            namespace="demo", workload=name, version="test", identity=f"{name}.demo", ready=name != "old",
            time=now - 3))
    await bus.put(schemas.PROFILES_BUCKET, schemas.profile_key("demo", "authors"), schemas.Profile(
        namespace="demo", service="authors", fqdn="authors.demo.svc.cluster.local", routes=[
            schemas.Route("GET /authors/{id}", schemas.RequestMatch(method="GET", path_regex="/authors/[^/]*")),
            schemas.Route("GET /authors", schemas.RequestMatch(method="GET", path_regex="/authors")),
        ]))
    asked: list[schemas.StatsRequest] = []
    for name, stats in proxies.items():
        async def answer(request, name=name, stats=stats):
            asked.append(request)
            return stats_reply("demo", name, stats, request)
        await bus.serve(schemas.PROXY_STATS_SUBJECT, schemas.StatsRequest, answer)
    yield own_nats.url, asked
    await bus.close()


async def tulle(url, *args):
    proc = await asyncio.create_subprocess_exec(TULLE, "routes", *args, *cli_bus_args(url),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


def table(out: str) -> list[list[str]]:
    """Rows of the plain table, split on runs of 2+ spaces (route names contain single spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in out.strip().splitlines()]


async def test_a_service_shows_the_routes_to_it_from_every_client_and_names_the_proxy_that_did_not_answer(mesh):
    url, asked = mesh
    code, out, err = await tulle(url, "authors", "-n", "demo", "--timeout", "1s")
    assert code == 0, err
    assert table(out) == [
        ["ROUTE", "SERVICE", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99"],
        # 174 of 180 succeeded over 60 s; latency from both proxies' histograms merged
        ["GET /authors/{id}", "authors", "96.67%", "3.0rps", "9ms", "49ms", "50ms"],
        ["GET /authors", "authors", "-", "-", "-", "-", "-"],  # in the profile, no traffic
        ["[DEFAULT]", "authors", "-", "-", "-", "-", "-"],
    ]
    assert re.fullmatch(r"‼ no answer from demo/books \(proxy heartbeat \d+s ago\)\n", err), err
    assert asked and all(r.services == ["demo.authors"] and r.window_s == 60 for r in asked)


async def test_wide_output_shows_effective_success_above_the_actual_one(mesh):
    url, _ = mesh
    code, out, err = await tulle(url, "svc/authors.demo", "-o", "wide", "--timeout", "1s")
    assert code == 0, err
    rows = table(out)
    assert rows[0] == ["ROUTE", "SERVICE", "EFFECTIVE_SUCCESS", "EFFECTIVE_RPS", "ACTUAL_SUCCESS", "ACTUAL_RPS",
                       "LATENCY_P50", "LATENCY_P95", "LATENCY_P99"]
    assert rows[1] == ["GET /authors/{id}", "authors", "96.67%", "3.0rps", "82.86%", "3.5rps", "9ms", "49ms", "50ms"]


async def test_a_workload_shows_the_routes_from_its_own_proxy_and_answers_without_waiting_for_the_deadline(mesh):
    url, asked = mesh
    started = time.monotonic()
    code, out, err = await tulle(url, "workload/web", "-n", "demo", "--timeout", "30s")
    assert code == 0, err
    assert time.monotonic() - started < 25  # every expected proxy answered: no wait for the 30 s deadline
    assert err == ""  # only demo/web was expected
    assert table(out)[1:] == [
        ["GET /authors/{id}", "authors", "95.00%", "2.0rps", "8ms", "10ms", "10ms"],  # 7.5ms shows as 8ms
        ["[DEFAULT]", "books", "100.00%", "0.5rps", "3ms", "3ms", "3ms"],
    ]
    assert asked[-1].workloads == ["demo.web"]


async def test_to_narrows_a_workload_to_one_destination_and_lists_its_profile_routes(mesh):
    url, _ = mesh
    code, out, err = await tulle(url, "web", "-n", "demo", "--to", "authors", "-o", "wide")  # `web` is no service
    assert code == 0, err
    assert [r[0] for r in table(out)[1:]] == ["GET /authors/{id}", "GET /authors", "[DEFAULT]"]


async def test_json_has_linkerds_keys_per_resource_and_null_for_no_data(mesh):
    url, _ = mesh
    code, out, err = await tulle(url, "--all", "-n", "demo", "-o", "json", "--timeout", "1s")
    assert code == 0, err
    data = json.loads(out)
    assert list(data) == ["all/demo"]
    rows = {(r["authority"], r["route"]): r for r in data["all/demo"]}
    assert set(rows) == {("authors.demo", "GET /authors/{id}"), ("books.demo", "[DEFAULT]"), ("web.demo", "[DEFAULT]")}
    authors = rows[("authors.demo", "GET /authors/{id}")]
    assert set(authors) == {"route", "authority", "success", "rps", "effective_success", "effective_rps",
                            "actual_success", "actual_rps", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99"}
    assert authors["success"] == authors["effective_success"] == pytest.approx(174 / 180, abs=1e-6)
    assert authors["actual_success"] == pytest.approx(174 / 210, abs=1e-6)
    assert authors["rps"] == pytest.approx(3.0, abs=1e-3) and authors["actual_rps"] == pytest.approx(3.5, abs=1e-3)
    assert authors["latency_ms_p50"] == 9 and authors["latency_ms_p99"] == 50
    assert rows[("web.demo", "[DEFAULT]")]["success"] == 0.5
    assert "no answer from demo/books" in err


async def test_unknown_targets_and_bad_flags_are_one_line_with_exit_2(mesh):
    url, _ = mesh
    for args, problem in [
        (["nobody", "-n", "demo"], "no service or workload named 'nobody' in namespace 'demo'"),
        (["workload/ghost", "-n", "demo"], "no proxy of workload 'ghost'"),
        (["authors", "--window", "1h"], "--window '1h': must be from 1s to 10m"),
        (["authors", "--window", "soon"], "expected a duration"),
        (["authors", "--all"], "give a service or workload, or --all (not both)"),
        (["svc/authors", "--to", "web"], "--to narrows a workload or --all"),
    ]:
        code, out, err = await tulle(url, *args)
        assert code == 2 and out == "" and err.count("\n") == 1 and problem in err, (args, err)


# --- pure parts --------------------------------------------------------------------------


def test_targets_accept_linkerd_style_kinds_and_qualified_names():
    assert parse_target("authors.demo", False, None) == parse_target("svc/authors", False, "demo")
    assert parse_target("authors.demo.svc.cluster.local", False, None).kind == "service"
    assert parse_target("deploy/web", False, "demo").kind == "workload"
    assert parse_target("web", False, None).namespace == "default"
    assert parse_target(None, True, None).namespace is None
    with pytest.raises(UserError, match="is in namespace 'demo', but -n says 'prod'"):
        parse_target("authors.demo", False, "prod")
    with pytest.raises(UserError, match="unknown kind 'job'"):
        parse_target("job/x", False, None)


def test_rates_add_each_proxys_count_over_its_own_span():
    young = schemas.StatsReply("demo", "a", 10.0, [schemas.RouteWindow("demo.x", "r", 10, 10, 10, 10)])
    old = schemas.StatsReply("demo", "b", 60.0, [schemas.RouteWindow("demo.x", "r", 60, 30, 60, 30)])
    row, = aggregate([young, old])
    assert row.effective_rps == pytest.approx(2.0)  # 1/s from the proxy up for 10 s, 1/s from the other
    assert row.success == pytest.approx(40 / 70)
    assert row.p50 is None  # no histograms were sent


def test_a_timed_out_request_makes_effective_rps_exceed_actual_rps():
    reply = schemas.StatsReply("demo", "a", 60.0, [schemas.RouteWindow("demo.x", "r", 60, 0, 0, 0)])
    row, = aggregate([reply])
    header, cells = table_rows([row], wide=True, namespace="demo")
    assert cells == [["r", "x", "0.00%", "1.0rps", "-", "0.0rps", "-", "-", "-"]]


def test_plain_table_aligns_routes_left_and_figures_right():
    text = plain_table(["ROUTE", "RPS"], [["a", "1.0rps"], ["longer", "10.0rps"]])
    assert text == "ROUTE        RPS\na         1.0rps\nlonger   10.0rps\n"


def test_rows_without_data_are_dashes_everywhere():
    header, cells = table_rows([Row("demo", "x", "GET /")], wide=False, namespace="other")
    assert cells == [["GET /", "x.demo", "-", "-", "-", "-", "-"]]
