"""tulle/traffic.py, pure: proxies' traffic replies (built here as the proxies of the demo
would answer) into `tulle stat` rows and `tulle edges`, without any I/O."""

from __future__ import annotations

import bisect

import pytest

from tulle import schemas
from tulle.errors import UserError
from tulle.metrics import LATENCY_BUCKETS_MS
from tulle.traffic import (
    NO_IDENTITY_FROM_DISCOVERY, Inventory, Resource, edge_json, edges, inventory_from, missing_proxies, owner_guess,
    parse_resource, stat_json, stat_rows,
)

NS = "demo"
ID = {w: schemas.identity_name(w, NS) for w in ("traffic", "web", "books", "authors")}
BOUNDS = [float(b) for b in LATENCY_BUCKETS_MS]


def latency(*samples_ms: float) -> list[int]:
    counts = [0] * (len(BOUNDS) + 1)
    for ms in samples_ms:
        counts[bisect.bisect_left(BOUNDS, ms)] += 1
    return counts


def inbound(client: str = "", requests: int = 0, ok: int = 0, failed: int = 0, ms: float = 5, **kw) -> schemas.TrafficEdge:
    ident = ID.get(client, client)
    return schemas.TrafficEdge(direction="inbound", peer_namespace=NS if client else "", peer_name=client,
                               peer_identity=ident, secured=bool(client), requests=requests, successes=ok,
                               failures=failed, latency_buckets_ms=BOUNDS,
                               latency_counts=latency(*[ms] * (ok + failed)), **kw)


def outbound(service: str, requests: int = 0, ok: int = 0, failed: int = 0, ms: float = 5, server: str | None = None,
             ns: str = NS, **kw) -> schemas.TrafficEdge:
    server_id = ID.get(service, "") if server is None else server
    return schemas.TrafficEdge(direction="outbound", peer_namespace=ns, peer_name=service, peer_identity=server_id,
                               secured=bool(server_id), requests=requests, successes=ok, failures=failed,
                               latency_buckets_ms=BOUNDS, latency_counts=latency(*[ms] * (ok + failed)), **kw)


def reply(workload: str, *edges_: schemas.TrafficEdge, window_s: float = 60.0, sa: str | None = None,
          ns: str = NS) -> schemas.TrafficReply:
    return schemas.TrafficReply(namespace=ns, workload=workload, identity=schemas.identity_name(sa or workload, ns),
                                window_s=window_s, edges=list(edges_))


def heartbeat(workload: str, sa: str | None = None, ready: bool = True, ns: str = NS) -> schemas.ProxyHeartbeat:
    return schemas.ProxyHeartbeat(namespace=ns, workload=workload, version="t", identity=schemas.identity_name(
        sa or workload, ns), ready=ready)


def endpoints(service: str, *pods: tuple[str, str, str]) -> schemas.EndpointSet:
    """pods: (pod name, owning workload, identity or "")."""
    return schemas.EndpointSet(namespace=NS, service=service, port=80, endpoints=[
        schemas.Endpoint(address=f"10.0.0.{i}", port=80, identity=ident,
                         labels={"namespace": NS, "pod": pod, "workload": owner, "serviceaccount": owner})
        for i, (pod, owner, ident) in enumerate(pods)])


def demo_inventory() -> Inventory:
    return inventory_from(
        {schemas.proxy_key(NS, w): heartbeat(w) for w in ("traffic", "web", "books", "authors")},
        [endpoints("web", ("web", "web", ID["web"])), endpoints("books", ("books", "books", ID["books"])),
         endpoints("authors", ("authors", "authors", ID["authors"]))])


def demo_replies() -> list[schemas.TrafficReply]:
    """A minute of the demo: traffic calls web 600 times; web calls authors (a quarter fail,
    the proxy retries) and books (gRPC: opaque TCP over mTLS); probes reach everyone."""
    return [
        reply("traffic", outbound("web", 600, 597, 3, ms=30), inbound("", 12, 12, ms=1)),
        reply("web", inbound("traffic", 600, 597, 3, ms=25), inbound("", 12, 12, ms=1),
              outbound("authors", 600, 600, 0, ms=8),
              outbound("books", tcp_opened=1, tcp_open=1, bytes_read=6000, bytes_written=3000)),
        reply("authors", inbound("web", 640, 480, 160, ms=4), inbound("", 12, 12, ms=1)),
        reply("books", inbound("web", tcp_opened=1, tcp_open=1, bytes_read=3000, bytes_written=6000)),
    ]


def by_name(rows) -> dict:
    return {r.name: r for r in rows}


# --- stat ------------------------------------------------------------------------------------------


def test_each_workload_is_judged_by_what_its_proxy_received():
    rows = by_name(stat_rows(demo_replies(), "workload", inventory=demo_inventory(), namespace=NS))
    assert list(rows) == ["authors", "books", "traffic", "web"]
    web = rows["web"]
    assert web.meshed_text == "1/1"
    assert (web.requests, web.successes, web.failures) == (612, 609, 3)  # traffic's calls and the probes
    assert web.rps == pytest.approx(612 / 60)
    assert web.success == pytest.approx(609 / 612)
    assert web.p50 is not None and 20 <= web.p50 <= 30 and web.p99 <= 30
    assert rows["authors"].success == pytest.approx(492 / 652)  # what went over the wire, retries included
    books = rows["books"]
    assert (books.rps, books.success, books.p50, books.tcp_open) == (None, None, None, 1)  # gRPC passes opaque
    assert books.has_data
    assert books.read_bps == pytest.approx(50.0) and books.write_bps == pytest.approx(100.0)


def test_from_keeps_only_what_came_from_that_workloads_identity():
    rows = by_name(stat_rows(demo_replies(), "workload", inventory=demo_inventory(), namespace=NS,
                             from_=Resource("workload", NS, "traffic")))
    assert rows["web"].requests == 600
    assert rows["authors"].requests == 0 and not rows["authors"].has_data


def test_to_turns_a_workloads_row_to_what_it_sent():
    rows = by_name(stat_rows(demo_replies(), "workload", inventory=demo_inventory(), namespace=NS, name="web",
                             to=Resource("service", NS, "authors")))
    assert list(rows) == ["web"]
    assert (rows["web"].requests, rows["web"].success) == (600, 1.0)  # after the proxy's retries
    to_workload = by_name(stat_rows(demo_replies(), "workload", inventory=demo_inventory(), namespace=NS,
                                    name="web", to=Resource("workload", NS, "books")))
    assert to_workload["web"].tcp_open == 1
    to_ns = by_name(stat_rows(demo_replies(), "workload", inventory=demo_inventory(), namespace=NS, name="web",
                              to=Resource("namespace", None, NS)))
    assert to_ns["web"].requests == 600


def test_a_service_is_judged_by_what_its_callers_sent_it():
    rows = by_name(stat_rows(demo_replies(), "service", inventory=demo_inventory(), namespace=NS))
    assert list(rows) == ["authors", "books", "web"]
    assert rows["web"].meshed_text == "-"
    assert (rows["web"].requests, rows["web"].failures) == (600, 3)  # traffic's view; no probes
    assert rows["authors"].success == 1.0
    only_from_traffic = by_name(stat_rows(demo_replies(), "service", inventory=demo_inventory(), namespace=NS,
                                          from_=Resource("workload", NS, "traffic")))
    assert only_from_traffic["web"].requests == 600 and not only_from_traffic["authors"].has_data


def test_a_namespace_adds_up_what_all_its_proxies_received():
    rows = stat_rows(demo_replies(), "namespace", inventory=demo_inventory())
    assert [(r.name, r.meshed_text) for r in rows] == [(NS, "4/4")]
    assert rows[0].requests == 12 + 612 + 652 + 0
    assert rows[0].tcp_open == 1


def test_rates_divide_each_proxys_counts_by_the_span_it_covered():
    replies = [reply("web", inbound("traffic", 50, 50), window_s=5.0),  # up for 5 s only
               reply("web-2", inbound("traffic", 60, 60), window_s=60.0, sa="web")]
    rows = stat_rows(replies, "service", namespace=NS)
    assert rows == []  # no service known, no outbound edge: nothing to list
    rows = stat_rows(replies, "namespace")
    assert rows[0].rps == pytest.approx(50 / 5 + 60 / 60)


def test_pods_of_a_deployment_are_one_workload_and_unmeshed_ones_count_in_meshed():
    inv = inventory_from(
        {schemas.proxy_key(NS, p): heartbeat(p, sa="web") for p in ("web-7d9f8c6b5-x2x4z", "web-7d9f8c6b5-q8q9w")},
        [endpoints("web", ("web-7d9f8c6b5-x2x4z", "web", ID["web"]), ("web-7d9f8c6b5-q8q9w", "web", ID["web"]),
                   ("web-legacy-0", "web", "")),
         endpoints("db", ("db-0", "db", ""))])
    replies = [reply("web-7d9f8c6b5-x2x4z", inbound("traffic", 10, 10), sa="web"),
               reply("web-7d9f8c6b5-q8q9w", inbound("traffic", 20, 20), sa="web")]
    rows = by_name(stat_rows(replies, "workload", inventory=inv, namespace=NS))
    assert list(rows) == ["web"]  # db has no proxy: no figures, left out as Linkerd does
    assert (rows["web"].meshed_text, rows["web"].requests) == ("2/3", 30)
    with_unmeshed = by_name(stat_rows(replies, "workload", inventory=inv, namespace=NS, unmeshed=True))
    assert with_unmeshed["db"].meshed_text == "0/1" and not with_unmeshed["db"].has_data
    pods = by_name(stat_rows(replies, "pod", inventory=inv, namespace=NS))
    assert pods["web-7d9f8c6b5-q8q9w"].requests == 20
    assert owner_guess("web-7d9f8c6b5-x2x4z") == "web" and owner_guess("books-v2") == "books-v2"


def test_a_row_without_traffic_has_no_figures():
    rows = by_name(stat_rows([reply("web")], "workload", inventory=demo_inventory(), namespace=NS))
    assert rows["web"].has_data is False
    assert stat_json(rows["web"]) == {
        "namespace": NS, "kind": "workload", "name": "web", "meshed": "1/1", "success": None, "rps": None,
        "latency_ms_p50": None, "latency_ms_p95": None, "latency_ms_p99": None, "tcp_open_connections": None,
        "tcp_read_bytes_rate": None, "tcp_write_bytes_rate": None, "requests": 0, "successes": 0, "failures": 0,
        "denied": 0, "window_s": 60.0}


def test_latency_percentiles_are_read_from_the_merged_histograms():
    replies = [reply("web", inbound("traffic", 90, 90, ms=4), inbound("", 10, 10, ms=400))]
    row = stat_rows(replies, "workload", namespace=NS)[0]
    assert 3 <= row.p50 <= 4 and 300 <= row.p95 <= 400 and 300 <= row.p99 <= 400
    assert stat_json(row)["latency_ms_p50"] == int(row.p50 + 0.5)


def test_the_proxies_that_should_have_answered_are_named():
    inv = demo_inventory()
    inv.heartbeats["demo.sleepy"] = heartbeat("sleepy")
    inv.heartbeats["demo.starting"] = heartbeat("starting", ready=False)
    assert missing_proxies(inv, demo_replies()) == ["demo/sleepy"]


# --- edges -----------------------------------------------------------------------------------------


def test_edges_show_who_calls_whom_once_per_pair_with_both_identities():
    rows = edges(demo_replies(), inventory=demo_inventory(), namespace=NS)
    assert [(e.src, e.dst, e.secured) for e in rows] == [
        ("traffic", "web", True), ("web", "authors", True), ("web", "books", True)]
    web_authors = rows[1]
    assert (web_authors.client_id, web_authors.server_id) == (ID["web"], ID["authors"])
    assert web_authors.requests == 600  # as the client saw it, not the 640 attempts the server got
    assert edge_json(rows[0]) == {
        "src": "traffic", "src_namespace": NS, "dst": "web", "dst_namespace": NS, "client_id": "traffic.demo",
        "server_id": "web.demo", "no_tls_reason": "", "secured": True, "requests": 600, "successes": 597,
        "failures": 3, "rps": 10.0, "tcp_open_connections": 0}


def test_replicas_sharing_one_identity_are_each_counted_by_their_own_report():
    """web calls books (two workloads, one service account): its proxy saw 100 calls to the
    service; books saw 60 and books-2 saw 40. Each row is what that replica received, not the
    whole 100 twice."""
    inv = inventory_from(
        {schemas.proxy_key(NS, w): heartbeat(w, sa) for w, sa in (("web", "web"), ("books", "books"),
                                                                 ("books-2", "books"))},
        [endpoints("books", ("books", "books", ID["books"]), ("books-2", "books-2", ID["books"]))])
    replies = [reply("web", outbound("books", 100, 100)),
               reply("books", inbound("web", 60, 60)),
               reply("books-2", inbound("web", 40, 40), sa="books")]
    rows = {(e.src, e.dst): e for e in edges(replies, inventory=inv, namespace=NS)}
    assert sorted(rows) == [("web", "books"), ("web", "books-2")]
    assert (rows[("web", "books")].requests, rows[("web", "books-2")].requests) == (60, 40)
    assert all(e.secured and e.client_id == ID["web"] and e.server_id == ID["books"] for e in rows.values())


def test_an_edge_seen_only_by_the_server_names_the_client_by_its_identity():
    # traffic's proxy did not answer: web's inbound edge alone tells who called
    rows = edges([r for r in demo_replies() if r.workload != "traffic"], inventory=demo_inventory(), namespace=NS)
    assert ("traffic", "web", True) in [(e.src, e.dst, e.secured) for e in rows]
    unknown = edges([reply("web", inbound("stranger", 1, 1))], namespace=NS)
    assert [(e.src, e.dst, e.client_id) for e in unknown] == [("stranger", "web", "stranger")]


def test_a_destination_without_a_proxy_is_an_unsecured_edge_and_unnamed_clients_are_left_out():
    inv = demo_inventory()
    inv.services[(NS, "legacy")] = {(NS, "legacy-0")}
    inv.pods[(NS, "legacy-0")] = inv.pods[(NS, "web")].__class__(NS, "legacy-0", "legacy")
    rows = edges([reply("web", outbound("legacy", 5, 5, server=""), inbound("", 3, 3))], inventory=inv, namespace=NS)
    assert [(e.src, e.dst, e.secured, e.no_tls_reason) for e in rows] == [
        ("web", "legacy", False, NO_IDENTITY_FROM_DISCOVERY)]


def test_calls_the_clients_proxy_failed_itself_do_not_make_an_edge_unsecured_but_plaintext_that_went_out_does():
    # Before web's endpoints were known, traffic's proxy answered 503 itself (no server
    # identity: nothing went on the wire); then every call went over mTLS.
    early = outbound("web", 4, 0, 4, server="")
    replies = [reply("traffic", early, outbound("web", 100, 100)), reply("web", inbound("traffic", 100, 100))]
    [edge] = edges(replies, inventory=demo_inventory(), namespace=NS)
    assert (edge.src, edge.dst, edge.secured, edge.no_tls_reason) == ("traffic", "web", True, "")
    plaintext = outbound("web", 2, 2, server="")  # answered by someone, without mTLS
    [edge] = edges([reply("traffic", plaintext, outbound("web", 100, 100))], inventory=demo_inventory(), namespace=NS)
    assert (edge.secured, edge.no_tls_reason) == (False, NO_IDENTITY_FROM_DISCOVERY)


def test_workloads_sharing_a_service_account_are_told_apart_by_whom_they_called():
    inv = inventory_from({schemas.proxy_key(NS, w): heartbeat(w, sa="default") for w in ("a", "b", "books")}, [])
    replies = [reply("a", outbound("books", 1, 1, server=schemas.identity_name("default", NS)), sa="default"),
               reply("b", sa="default"),
               reply("books", inbound(schemas.identity_name("default", NS), 1, 1), sa="default")]
    rows = edges(replies, inventory=inv, namespace=NS)
    assert {(e.src, e.dst) for e in rows} == {("a", "books")}


def test_edges_of_other_namespaces_are_left_out_unless_asked_for_all():
    replies = [reply("web", outbound("db", 1, 1, ns="data", server=schemas.identity_name("db", "data"))),
               reply("job", outbound("db", 1, 1, ns="data", server=schemas.identity_name("db", "data")), ns="batch")]
    assert [(e.src_namespace, e.src) for e in edges(replies, namespace=NS)] == [(NS, "web")]
    assert len(edges(replies, namespace="data")) == 2 and len(edges(replies)) == 2


# --- resources -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("deploy", Resource("workload", NS)), ("deploy/web", Resource("workload", NS, "web")),
    ("po/web-7d9f8c6b5-x2x4z", Resource("pod", NS, "web-7d9f8c6b5-x2x4z")), ("svc/authors", Resource("service", NS, "authors")),
    ("ns", Resource("namespace", None)), ("ns/demo", Resource("namespace", None, "demo")),
    ("workload", Resource("workload", NS)),
])
def test_resources_take_kubectls_names(text, expected):
    assert parse_resource(text, NS) == expected


def test_a_bare_name_needs_a_default_kind_and_bad_names_are_one_line_errors():
    assert parse_resource("web", NS, default_kind="workload") == Resource("workload", NS, "web")
    for text in ("web", "widget/web", "svc/Web_1", "deploy/"):
        with pytest.raises(UserError) as e:
            parse_resource(text, NS, flag="--from")
        assert "--from" in str(e.value) and "\n" not in str(e.value)
