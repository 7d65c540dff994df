"""What the dashboard's views compute from the bus's data (tulle/dashboard/views.py), the
proxy's traffic windows (proxy/traffic_stats.py), the Host check's parsing and the vendored
libraries' checksums — pure, no I/O."""

from __future__ import annotations

import pytest

from tulle import schemas
from tulle.dashboard import views
from tulle.dashboard.server import allowed_hosts, host_name
from tulle.errors import UserError
from tulle.metrics import LATENCY_BUCKETS_MS

NOW = 1_800_000_000.0
BOUNDS = [float(b) for b in LATENCY_BUCKETS_MS]


def ident(sa: str, ns: str = "demo") -> str:
    return schemas.identity_name(sa, ns)


def heartbeat(pod: str, sa: str, ns: str = "demo", **kw) -> schemas.ProxyHeartbeat:
    return schemas.ProxyHeartbeat(namespace=ns, workload=pod, version="0.1.0", identity=ident(sa, ns), ready=True,
                                  time=NOW - 1, **kw)


def endpoints(svc: str, pods: list[tuple[str, str]], ns: str = "demo", port: int = 8080) -> schemas.EndpointSet:
    """pods: (pod, owner workload)"""
    return schemas.EndpointSet(namespace=ns, service=svc, port=port, endpoints=[
        schemas.Endpoint(address=f"10.0.0.{i}", port=port, identity=ident(svc, ns),
                         labels={"namespace": ns, "pod": pod, "workload": owner, "serviceaccount": svc})
        for i, (pod, owner) in enumerate(pods)])


def hist(*latencies_ms: float) -> list[int]:
    import bisect

    counts = [0] * (len(BOUNDS) + 1)
    for v in latencies_ms:
        counts[bisect.bisect_left(BOUNDS, v)] += 1
    return counts


def out_edge(svc: str, requests: int, successes: int, *, secured: bool = True, **kw) -> schemas.TrafficEdge:
    return schemas.TrafficEdge(direction="outbound", peer_namespace="demo", peer_name=svc,
                               peer_identity=ident(svc) if secured else "", secured=secured, requests=requests,
                               successes=successes, failures=requests - successes, latency_buckets_ms=BOUNDS,
                               latency_counts=hist(*[5.0] * requests), **kw)


def in_edge(client_sa: str, requests: int, successes: int, denied: int = 0) -> schemas.TrafficEdge:
    client = ident(client_sa) if client_sa else ""
    return schemas.TrafficEdge(direction="inbound", peer_namespace="demo" if client_sa else "", peer_name=client_sa,
                               peer_identity=client, secured=bool(client_sa), requests=requests, successes=successes,
                               failures=requests - successes, denied=denied, latency_buckets_ms=BOUNDS,
                               latency_counts=hist(*[2.0] * requests))


def reply(pod: str, sa: str, *edges: schemas.TrafficEdge, window: float = 10.0) -> schemas.TrafficReply:
    return schemas.TrafficReply(namespace="demo", workload=pod, identity=ident(sa), window_s=window, edges=list(edges))


@pytest.fixture
def mesh() -> views.MeshState:
    """web (one pod) calls authors (a Deployment of two pods) and books (local mode: pod = workload)."""
    s = views.MeshState()
    for hb in (heartbeat("web", "web"), heartbeat("authors-5d8f9c7b4-x2x7q", "authors"),
               heartbeat("authors-5d8f9c7b4-k9zzm", "authors"), heartbeat("books", "books")):
        s.heartbeats[schemas.proxy_key(hb.namespace, hb.workload)] = hb
    s.endpoints["demo.authors.8080"] = endpoints("authors", [("authors-5d8f9c7b4-x2x7q", "authors"),
                                                             ("authors-5d8f9c7b4-k9zzm", "authors")])
    s.endpoints["demo.books.9090"] = endpoints("books", [("books", "books")], port=9090)
    return s


def edge(topology: dict, src: str, dst: str) -> dict:
    found = [e for e in topology["edges"] if e["source"] == src and e["target"] == dst]
    assert found, f"no edge {src} -> {dst} in {[e['id'] for e in topology['edges']]}"
    return found[0]


# --- topology ----------------------------------------------------------------------------------


def test_a_deployments_pods_make_one_node_and_calls_to_its_service_one_edge(mesh):
    t = views.topology(mesh, [reply("web", "web", out_edge("authors", 100, 75))], now=NOW, window_s=10)
    authors = next(n for n in t["nodes"] if n["id"] == "demo/authors")
    assert authors["pods"] == ["authors-5d8f9c7b4-k9zzm", "authors-5d8f9c7b4-x2x7q"]
    e = edge(t, "demo/web", "demo/authors")
    assert (e["mtls"], e["protocol"], e["requests"], e["success"], e["rps"]) == (True, "http", 100, 0.75, 10.0)
    assert e["p50_ms"] is not None and 4 < e["p50_ms"] <= 5


def test_an_edge_without_a_verified_server_identity_is_not_mtls(mesh):
    t = views.topology(mesh, [reply("web", "web", out_edge("books", 10, 10, secured=False))], now=NOW, window_s=10)
    assert edge(t, "demo/web", "demo/books")["mtls"] is False


def test_an_opaque_edge_shows_its_connections_and_no_success_rate(mesh):
    opaque = schemas.TrafficEdge(direction="outbound", peer_namespace="demo", peer_name="books",
                                 peer_identity=ident("books"), secured=True, tcp_open=1)
    e = edge(views.topology(mesh, [reply("web", "web", opaque)], now=NOW, window_s=10), "demo/web", "demo/books")
    assert (e["protocol"], e["tcp_open"], e["success"], e["mtls"]) == ("tcp", 1, None, True)


def test_the_servers_denials_mark_the_clients_edge_without_counting_its_requests_twice(mesh):
    replies = [reply("web", "web", out_edge("authors", 40, 40)),
               reply("authors-5d8f9c7b4-x2x7q", "authors", in_edge("web", 20, 20, denied=20)),
               reply("authors-5d8f9c7b4-k9zzm", "authors", in_edge("web", 20, 20, denied=20))]
    t = views.topology(mesh, replies, now=NOW, window_s=10)
    e = edge(t, "demo/web", "demo/authors")
    assert (e["requests"], e["denied"], e["denied_total"]) == (40, 40, 40)
    assert e["reported_by"] == ["client", "server"]
    authors = next(n for n in t["nodes"] if n["id"] == "demo/authors")
    assert authors["inbound"]["requests"] == 40 and authors["inbound"]["rps"] == 4.0


def test_clients_outside_the_mesh_are_one_node_seen_only_by_the_server(mesh):
    t = views.topology(mesh, [reply("books", "books", in_edge("", 9, 9))], now=NOW, window_s=10)
    e = edge(t, views.UNMESHED, "demo/books")
    assert (e["mtls"], e["requests"], e["reported_by"]) == (False, 9, ["server"])


def test_a_denial_event_of_the_window_makes_a_denied_edge_and_an_older_one_does_not(mesh):
    mesh.denials.append((NOW - 3, {"namespace": "demo", "workload": "books", "client_identity": ident("web"),
                                   "suppressed_before": 4}))
    mesh.denials.append((NOW - 60, {"namespace": "demo", "workload": "web", "client_identity": ident("books")}))
    t = views.topology(mesh, [], now=NOW, window_s=10)
    assert edge(t, "demo/web", "demo/books")["denied_events"] == 5
    assert not [e for e in t["edges"] if e["target"] == "demo/web"]


def test_a_service_behind_two_workloads_stays_a_service_node(mesh):
    mesh.endpoints["demo.mixed.80"] = endpoints("mixed", [("books", "books"), ("web", "web")], port=80)
    t = views.topology(mesh, [reply("web", "web", out_edge("mixed", 1, 1))], now=NOW, window_s=10)
    assert edge(t, "demo/web", "svc:demo/mixed")["requests"] == 1


def test_replicas_behind_one_service_are_each_their_own_edge_counted_once(mesh):
    """books-2 joins books behind the service (one service account): web's proxy only knows
    it called the service; each replica's report gives its own edge, and nothing is counted
    twice or on a service node."""
    mesh.heartbeats["demo.books-2"] = heartbeat("books-2", "books")
    mesh.endpoints["demo.books.9090"] = endpoints("books", [("books", "books"), ("books-2", "books-2")], port=9090)
    t = views.topology(mesh, [reply("web", "web", out_edge("books", 10, 10)),
                              reply("books", "books", in_edge("web", 6, 6)),
                              reply("books-2", "books", in_edge("web", 4, 4))], now=NOW, window_s=10)
    assert (edge(t, "demo/web", "demo/books")["requests"], edge(t, "demo/web", "demo/books-2")["requests"]) == (6, 4)
    assert not [e for e in t["edges"] if e["target"].startswith("svc:")]


def test_a_ready_proxy_that_did_not_answer_is_named(mesh):
    t = views.topology(mesh, [reply("web", "web")], now=NOW, window_s=10)
    assert t["missing"] == ["demo.authors-5d8f9c7b4-k9zzm", "demo.authors-5d8f9c7b4-x2x7q", "demo.books"]


# --- routes, authorization, identity, events --------------------------------------------------


def test_routes_mark_the_routes_a_profile_retries_and_keep_effective_and_actual_apart():
    s = views.MeshState()
    s.profiles["demo.authors"] = schemas.Profile(namespace="demo", service="authors", fqdn="authors.demo.svc.cluster.local",
                                                 routes=[schemas.Route(name="GET /authors/{id}",
                                                                       condition=schemas.RequestMatch(method="GET"),
                                                                       is_retryable=True, timeout_ms=2000)])
    window = schemas.RouteWindow(service="demo.authors", route="GET /authors/{id}", effective_requests=100,
                                 effective_successes=98, actual_requests=130, actual_successes=98,
                                 latency_buckets_ms=BOUNDS, latency_counts=hist(*[3.0] * 100))
    got = views.routes(s, [schemas.StatsReply(namespace="demo", workload="web", window_s=10, routes=[window])],
                       now=NOW, window_s=10)
    row = next(r for r in got["routes"] if r["route"] == "GET /authors/{id}")
    assert (row["retries"], row["timeout_ms"], row["effective_success"], row["actual_success"]) == (True, 2000, 0.98, 0.7538)
    assert (row["effective_rps"], row["actual_rps"]) == (10.0, 13.0)
    assert [r["route"] for r in got["routes"]] == ["GET /authors/{id}", "[DEFAULT]"]


def _policy() -> schemas.WorkloadPolicy:
    server = schemas.PortPolicy(port=8080, server="authors-http", kind="Server", protocol="HTTP/1",
                                authorizations=[schemas.Authorization(name="backends-from-web", identities=[ident("web")])],
                                source="Server demo/authors-http")
    default = schemas.PortPolicy(port=0, server="default:all-unauthenticated",
                                 authorizations=[schemas.Authorization(name="all-unauthenticated", kind="default",
                                                                       unauthenticated=True)])
    return schemas.WorkloadPolicy(namespace="demo", workload="authors", default_policy="all-unauthenticated",
                                  default=default, ports=[server])


def test_policies_list_each_port_and_the_default_with_their_authorizations():
    s = views.MeshState(policies={"demo.authors": _policy()})
    got = views.policies(s)["workloads"][0]
    assert [p["port"] for p in got["ports"]] == [8080, None]
    assert got["ports"][0]["authorizations"][0]["text"].startswith("backends-from-web: " + ident("web"))


def test_explain_is_the_proxys_decision_for_an_identity_or_an_address():
    s = views.MeshState(policies={"demo.authors": _policy()})
    assert views.explain(s, "demo.authors", ident("web"), 8080)["allowed"] is True
    denied = views.explain(s, "demo.authors", ident("traffic"), 8080)
    assert denied["allowed"] is False and "no authorization on Server authors-http" in denied["ports"][0]["reason"]
    assert views.explain(s, "demo.authors", "10.1.2.3", None)["ports"][1]["allowed"] is True  # other ports: default
    with pytest.raises(UserError, match="expected an identity"):
        views.explain(s, "demo.authors", "not an identity", None)
    with pytest.raises(UserError, match="no policy published for demo/books"):
        views.explain(s, "demo.books", ident("web"), None)


def test_identity_says_when_each_certificate_and_the_issuer_expire_and_whether_proxies_trust_the_anchors():
    from tulle import pki

    anchor_pem = pki.cert_pem(pki.new_trust_anchor("cluster.local").cert).decode()
    fp = pki.cert_fingerprints(anchor_pem)
    s = views.MeshState(trust_bundle=schemas.TrustBundle(anchors_pem=anchor_pem, issuer_expiry=NOW + 86400))
    s.heartbeats["demo.web"] = heartbeat("web", "web", cert_expiry=NOW + 3600, trust_anchors=fp)
    s.heartbeats["demo.old"] = heartbeat("old", "old", cert_expiry=NOW + 60, trust_anchors=["0" * 64])
    got = views.identity(s, now=NOW)
    assert got["issuer_expires_in_s"] == 86400 and got["anchors"][0]["fingerprint"] == fp[0]
    by_key = {p["key"]: p for p in got["proxies"]}
    assert (by_key["demo.web"]["expires_in_s"], by_key["demo.web"]["trusts_installation"]) == (3600, True)
    assert by_key["demo.old"]["trusts_installation"] is False


def test_an_event_that_is_not_json_is_dropped_and_a_good_one_keeps_its_fields():
    assert views.event_item("tulle.events.proxy.ready", b"{not json", 1) is None
    item = views.event_item("tulle.events.proxy.denied",
                            b'{"id":"1","type":"dev.tulle.proxy.denied","time":"2026-01-02T03:04:05.678Z",'
                            b'"source":"/tulle/proxy/demo.web","data":{"port":8080}}', 7)
    assert (item["type"], item["seq"], item["data"]) == ("proxy.denied", 7, {"port": 8080})
    assert views.event_time(item, 0) == pytest.approx(1767323045.678)


# --- the web side's pure parts -----------------------------------------------------------------


@pytest.mark.parametrize("header, name", [
    ("localhost:50750", "localhost"), ("LOCALHOST", "localhost"), ("127.0.0.1:8080", "127.0.0.1"),
    ("[::1]:50750", "::1"), ("localhost.:80", "localhost"), ("evil.example", "evil.example"),
    ("", None), ("localhost:80x", None), ("[::1", None), ("[::1]x", None),
])
def test_the_host_header_is_read_as_browsers_send_it(header, name):
    assert host_name(header) == name


def test_the_bound_address_and_allowed_names_are_served_but_an_unspecified_address_is_not_a_name():
    assert allowed_hosts("0.0.0.0") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts("10.1.2.3", ["Dash.Example.com."]) == {"localhost", "127.0.0.1", "::1", "10.1.2.3",
                                                                "dash.example.com"}


def test_the_vendored_libraries_are_the_pinned_ones(tmp_path, monkeypatch):
    import shutil

    from tulle.dashboard import vendor

    assert vendor.check(vendor.load_lock()) == []
    copy = tmp_path / "vendor"
    shutil.copytree(vendor.VENDOR_DIR, copy)
    (copy / "uPlot.iife.min.js").write_bytes((copy / "uPlot.iife.min.js").read_bytes() + b"\n// changed")
    monkeypatch.setattr(vendor, "VENDOR_DIR", copy)
    assert vendor.check(vendor.load_lock()) == ["uPlot.iife.min.js: does not match the sha256 in vendor.lock.json"]
