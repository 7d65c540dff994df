"""The destination's pure core: which endpoints and profiles get published, without any I/O."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings as hsettings, strategies as st

from services.destination.compile import (DestinationState, Settings, classify_app_protocol, compile_snapshot,
                                          parse_port_list, workload_of)
from tests.destination_objects import (ID, obj, pod_doc, profile_doc, service_doc, slice_doc, slice_endpoint)
from tulle import schemas
from tulle.sources.base import ResourceEvent

EP = schemas.ENDPOINTS_BUCKET
PR = schemas.PROFILES_BUCKET
WEB = {"app": "web"}


def snapshot(*docs, **settings):
    return compile_snapshot([obj(d) for d in docs], Settings(**settings))


def endpoints(result, key="demo.web.80"):
    return result[(EP, key)].endpoints


def addrs(result, key="demo.web.80"):
    return [(e.address, e.port) for e in endpoints(result, key)]


# --- local mode: endpoints from the selector over ready pods ------------------------------------


def test_a_service_publishes_each_ready_selected_pod_with_its_identity():
    result = snapshot(
        service_doc("web", selector=WEB, cluster_ip="10.96.0.10"),
        pod_doc("web-1", labels=WEB, ip="10.1.0.1", sa="web"),
        pod_doc("web-2", labels=WEB, ip="10.1.0.2", sa="web"),
        pod_doc("other", labels={"app": "other"}, ip="10.1.0.3"),
    )
    es = result[(EP, "demo.web.80")]
    assert (es.namespace, es.service, es.port, es.exists) == ("demo", "web", 80, True)
    assert es.cluster_ips == ["10.96.0.10"]
    assert [(e.address, e.port, e.identity, e.weight) for e in es.endpoints] == [
        ("10.1.0.1", 8080, ID.format(sa="web", ns="demo"), 10000),
        ("10.1.0.2", 8080, ID.format(sa="web", ns="demo"), 10000),
    ]
    assert es.endpoints[0].labels == {"namespace": "demo", "pod": "web-1", "serviceaccount": "web", "workload": "web-1"}


def test_the_trust_domain_is_part_of_every_identity():
    result = snapshot(service_doc("web", selector=WEB), pod_doc("web-1", labels=WEB, sa="web"), trust_domain="example.org")
    assert endpoints(result)[0].identity == "web.demo.serviceaccount.identity.tulle.example.org"


def test_unready_pods_and_pods_without_an_address_are_not_published():
    result = snapshot(
        service_doc("web", selector=WEB),
        pod_doc("ready", labels=WEB, ip="10.1.0.1"),
        pod_doc("unready", labels=WEB, ip="10.1.0.2", ready=False),
        pod_doc("no-ip", labels=WEB, ip=""),
        pod_doc("failed", labels=WEB, ip="10.1.0.4", phase="Failed"),
    )
    assert addrs(result) == [("10.1.0.1", 8080)]


def test_a_service_without_ready_endpoints_is_published_empty_not_left_out():
    result = snapshot(service_doc("web", selector=WEB), pod_doc("unready", labels=WEB, ready=False))
    es = result[(EP, "demo.web.80")]
    assert es.exists is True and es.endpoints == []


def test_a_named_target_port_is_resolved_on_each_pod():
    result = snapshot(
        service_doc("web", selector=WEB, ports=[{"port": 80, "targetPort": "http"}]),
        pod_doc("old", labels=WEB, ip="10.1.0.1", ports=[{"name": "http", "containerPort": 8080}]),
        pod_doc("new", labels=WEB, ip="10.1.0.2", ports=[{"name": "http", "containerPort": 9090}]),
        pod_doc("undeclared", labels=WEB, ip="10.1.0.3", ports=[{"name": "admin", "containerPort": 9000}]),
    )
    assert addrs(result) == [("10.1.0.1", 8080), ("10.1.0.2", 9090)]


def test_each_service_port_gets_its_own_key():
    result = snapshot(
        service_doc("web", selector=WEB, ports=[{"name": "http", "port": 80, "targetPort": 8080},
                                                {"name": "grpc", "port": 9000, "targetPort": "grpc"}]),
        pod_doc("web-1", labels=WEB, ports=[{"name": "http", "containerPort": 8080},
                                            {"name": "grpc", "containerPort": 9001}]),
    )
    assert addrs(result, "demo.web.80") == [("10.1.0.1", 8080)]
    assert addrs(result, "demo.web.9000") == [("10.1.0.1", 9001)]


def test_selector_needs_every_label_and_an_empty_selector_takes_every_pod_of_the_namespace():
    result = snapshot(
        service_doc("strict", selector={"app": "web", "tier": "front"}),
        service_doc("all", selector={}),
        pod_doc("a", labels={"app": "web", "tier": "front"}, ip="10.1.0.1"),
        pod_doc("b", labels={"app": "web"}, ip="10.1.0.2"),
        pod_doc("elsewhere", ns="other", labels={"app": "web", "tier": "front"}, ip="10.1.0.3"),
    )
    assert addrs(result, "demo.strict.80") == [("10.1.0.1", 8080)]
    assert addrs(result, "demo.all.80") == [("10.1.0.1", 8080), ("10.1.0.2", 8080)]


def test_a_service_without_selector_has_no_endpoints_in_local_mode():
    result = snapshot(service_doc("external"), pod_doc("web-1", labels=WEB))
    assert endpoints(result, "demo.external.80") == []


def test_an_endpoint_without_a_proxy_has_no_identity_so_callers_skip_mtls():
    result = snapshot(
        service_doc("web", selector=WEB),
        pod_doc("plain", labels=WEB, ip="10.1.0.1", meshed=False),
        pod_doc("opted-out", labels=WEB, ip="10.1.0.2", annotations={"tulle.dev/inject": "disabled"}),
        pod_doc("meshed", labels=WEB, ip="10.1.0.3"),
        h2_upgrade=True,
    )
    got = {e.address: (e.identity, e.protocol_hint) for e in endpoints(result)}
    assert got == {"10.1.0.1": ("", ""), "10.1.0.2": ("", ""),
                   "10.1.0.3": (ID.format(sa="default", ns="demo"), "h2")}


def test_h2_is_hinted_only_when_enabled():
    docs = (service_doc("web", selector=WEB), pod_doc("web-1", labels=WEB))
    assert endpoints(snapshot(*docs))[0].protocol_hint == ""
    assert endpoints(snapshot(*docs, h2_upgrade=True))[0].protocol_hint == "h2"


def test_local_mode_proxy_port_comes_from_the_pod_annotation():
    result = snapshot(
        service_doc("web", selector=WEB),
        pod_doc("web-1", labels=WEB, annotations={"tulle.dev/proxy-inbound-port": "4143"}),
        pod_doc("plain", labels=WEB, ip="10.1.0.2", meshed=False, annotations={"tulle.dev/proxy-inbound-port": "4143"}),
    )
    assert [(e.address, e.proxy_port) for e in endpoints(result)] == [("10.1.0.1", 4143), ("10.1.0.2", 0)]


def test_app_protocol_follows_linkerd_rules_under_tulle_names():
    assert [classify_app_protocol(v) for v in ("", "http", "kubernetes.io/h2c", "tulle.dev/opaque", "tulle.dev/tcp",
                                               "mysql", "https")] == ["", "http", "h2c", "opaque", "opaque", "opaque",
                                                                      "opaque"]


def test_opaque_ports_are_hinted_from_app_protocol_pod_annotation_and_profile():
    result = snapshot(
        service_doc("db", selector={"app": "db"}, ports=[
            {"name": "mysql", "port": 3306, "appProtocol": "tulle.dev/tcp"},
            {"name": "web", "port": 80, "targetPort": 8080, "appProtocol": "http"},
            {"name": "redis", "port": 6379},
            {"name": "nats", "port": 4222}]),
        pod_doc("db-1", labels={"app": "db"}, annotations={"config.tulle.dev/opaque-ports": "6379,7000-7001"},
                ports=[{"containerPort": 3306}, {"containerPort": 8080}, {"containerPort": 6379}, {"containerPort": 4222}]),
        profile_doc("db", opaque_ports=[4222]),
    )
    hint = {port: (result[(EP, f"demo.db.{port}")].app_protocol, endpoints(result, f"demo.db.{port}")[0].protocol_hint)
            for port in (3306, 80, 6379, 4222)}
    assert hint == {3306: ("opaque", "opaque"), 80: ("http", ""), 6379: ("", "opaque"), 4222: ("opaque", "opaque")}


def test_opaque_ports_annotation_takes_numbers_ranges_and_names():
    pod = obj(pod_doc("p", ports=[{"name": "db", "containerPort": 5432}]))
    assert parse_port_list("25, 8000-8002,db,nonsense,70000", pod) == {25, 8000, 8001, 8002, 5432}


def test_each_cluster_ip_also_keys_the_set_and_headless_services_have_no_ip_key():
    result = snapshot(
        service_doc("web", selector=WEB, cluster_ip="10.96.0.10"),
        service_doc("headless", selector=WEB, cluster_ip="None"),
        service_doc("v6", selector=WEB, cluster_ip="fd00::a"),
        pod_doc("web-1", labels=WEB),
    )
    assert result[(EP, "_ip.10-96-0-10.80")] == result[(EP, "demo.web.80")]
    assert result[(EP, "_ip.fd00--a.80")].service == "v6"
    assert (EP, "demo.headless.80") in result
    assert result[(EP, "demo.headless.80")].cluster_ips == []
    assert sorted(k for b, k in result if k.startswith("_ip.")) == ["_ip.10-96-0-10.80", "_ip.fd00--a.80"]


def test_external_name_services_and_udp_ports_are_not_published():
    result = snapshot(
        service_doc("ext", type_="ExternalName"),
        service_doc("dns", selector=WEB, ports=[{"name": "dns", "port": 53, "protocol": "UDP"},
                                                {"name": "dns-tcp", "port": 53 + 1000, "targetPort": 53}]),
        pod_doc("web-1", labels=WEB, ports=[{"containerPort": 53}]),
    )
    assert sorted(k for b, k in result if b == EP and not k.startswith("_ip.")) == ["demo.dns.1053"]


def test_two_services_claiming_one_cluster_ip_resolve_the_same_way_in_any_order():
    a = service_doc("a", selector={"app": "a"}, cluster_ip="10.96.0.9")
    b = service_doc("b", selector={"app": "b"}, cluster_ip="10.96.0.9")
    assert snapshot(a, b)[(EP, "_ip.10-96-0-9.80")].service == "a"
    assert snapshot(b, a)[(EP, "_ip.10-96-0-9.80")].service == "a"


def test_workload_label_names_the_owner_when_the_labels_tell_it():
    def wl(name, labels):
        return workload_of(obj(pod_doc(name, labels=labels)))

    assert wl("web-5d4f8b7c9-x2x7q", {"pod-template-hash": "5d4f8b7c9"}) == "web"
    assert wl("db-0", {"statefulset.kubernetes.io/pod-name": "db-0"}) == "db"
    assert wl("migrate-abcde", {"job-name": "migrate"}) == "migrate"
    assert wl("agent-k8x2p", {"pod-template-generation": "1"}) == "agent"
    assert wl("web", {}) == "web"


# --- Kubernetes mode: endpoints from EndpointSlices ----------------------------------------------


def kube(*docs):
    return snapshot(*docs, endpoints_from="slices")


def test_slices_give_ready_endpoints_with_identity_from_the_target_pod():
    result = kube(
        service_doc("web", selector=WEB, cluster_ip="10.96.0.10"),
        pod_doc("web-1", labels=WEB, ip="10.1.0.1", sa="web"),
        slice_doc("web-abc", "web", endpoints=[
            slice_endpoint("10.1.0.1", "web-1", zone="z1"),
            slice_endpoint("10.1.0.2", "web-2", ready=False),
            slice_endpoint("10.1.0.9"),  # no targetRef: not a pod we know
        ]),
    )
    got = [(e.address, e.port, e.identity, e.labels.get("zone")) for e in endpoints(result)]
    assert got == [("10.1.0.1", 8080, ID.format(sa="web", ns="demo"), "z1"), ("10.1.0.9", 8080, "", None)]


def test_a_pod_that_is_not_ready_is_left_out_even_before_its_slice_says_so():
    result = kube(
        service_doc("web", selector=WEB),
        pod_doc("web-1", labels=WEB, ip="10.1.0.1", ready=False),
        slice_doc("web-abc", "web", endpoints=[slice_endpoint("10.1.0.1", "web-1")]),
    )
    assert endpoints(result) == []


def test_slice_ports_match_service_ports_by_name_and_duplicates_across_slices_count_once():
    result = kube(
        service_doc("web", ports=[{"name": "http", "port": 80, "targetPort": "http"},
                                  {"name": "admin", "port": 9000, "targetPort": 9000}]),
        slice_doc("web-a", "web", endpoints=[slice_endpoint("10.1.0.1")],
                  ports=[{"name": "http", "port": 8080}, {"name": "admin", "port": 9000}]),
        slice_doc("web-b", "web", endpoints=[slice_endpoint("10.1.0.1"), slice_endpoint("10.1.0.2")],
                  ports=[{"name": "http", "port": 8080}]),
    )
    assert addrs(result, "demo.web.80") == [("10.1.0.1", 8080), ("10.1.0.2", 8080)]
    assert addrs(result, "demo.web.9000") == [("10.1.0.1", 9000)]


def test_in_kubernetes_mode_pods_alone_do_not_make_endpoints():
    result = kube(service_doc("web", selector=WEB), pod_doc("web-1", labels=WEB))
    assert endpoints(result) == []


# --- profiles -----------------------------------------------------------------------------------


def test_a_profile_compiles_routes_classes_retries_and_timeouts():
    result = snapshot(service_doc("web", selector=WEB), profile_doc("web", routes=[
        {"name": "GET /books/{id}", "condition": {"method": "GET", "pathRegex": "/books/[^/]+"},
         "responseClasses": [{"condition": {"status": {"min": 500, "max": 599}}, "isFailure": True},
                             {"condition": {"not": {"status": {"min": 200, "max": 399}}}}],
         "isRetryable": True, "timeout": "300ms"},
        {"name": "any-post", "condition": {"any": [{"method": "POST"}, {"not": {"pathRegex": "/x"}}]}},
    ], retry_budget={"retryRatio": 0.5, "minRetriesPerSecond": 3, "ttl": "1m"}))
    p = result[(PR, "demo.web")]
    assert (p.namespace, p.service, p.fqdn) == ("demo", "web", "web.demo.svc.cluster.local")
    first, second = p.routes
    assert first.name == "GET /books/{id}" and first.is_retryable and first.timeout_ms == 300
    assert first.condition == schemas.RequestMatch(method="GET", path_regex="/books/[^/]+")
    assert first.response_classes == [
        schemas.ResponseClass(schemas.ResponseMatch(status=schemas.StatusRange(500, 599)), True),
        schemas.ResponseClass(schemas.ResponseMatch(not_=schemas.ResponseMatch(status=schemas.StatusRange(200, 399))),
                              False)]
    assert second.condition == schemas.RequestMatch(any_=[
        schemas.RequestMatch(method="POST"), schemas.RequestMatch(not_=schemas.RequestMatch(path_regex="/x"))])
    assert (second.is_retryable, second.timeout_ms) == (False, 0)
    assert p.retry_budget == schemas.RetryBudget(0.5, 3, 60000)


def test_a_profile_without_retry_budget_gets_linkerds_defaults():
    p = snapshot(profile_doc("web", opaque_ports=[4222, 3306]))[(PR, "demo.web")]
    assert p.retry_budget == schemas.RetryBudget(0.2, 10, 10000)
    assert p.opaque_ports == [3306, 4222]


def test_only_services_with_a_profile_for_this_cluster_domain_get_one():
    result = snapshot(service_doc("web", selector=WEB), service_doc("api", selector=WEB),
                      profile_doc("web"), profile_doc("api", domain="other.example"))
    assert sorted(k for b, k in result if b == PR) == ["demo.web"]


# --- the incremental state agrees with a full compile ----------------------------------------------

UNIVERSE = [
    service_doc("web", selector=WEB, cluster_ip="10.96.0.10"),
    service_doc("web", selector={"app": "other"}, cluster_ip="10.96.0.11"),
    service_doc("api", selector={"tier": "back"}, cluster_ip="10.96.0.10",
                ports=[{"name": "http", "port": 80, "targetPort": "http"}, {"name": "grpc", "port": 90}]),
    service_doc("all", selector={}),
    pod_doc("p1", labels=WEB, ip="10.1.0.1"),
    pod_doc("p1", labels={"app": "other", "tier": "back"}, ip="10.1.0.1"),
    pod_doc("p1", labels=WEB, ip="10.1.0.1", ready=False),
    pod_doc("p2", labels={"app": "web", "tier": "back"}, ip="10.1.0.2", sa="api",
            ports=[{"name": "http", "containerPort": 7000}, {"containerPort": 90}]),
    pod_doc("p3", labels={"app": "other"}, ip="10.1.0.3", meshed=False),
    slice_doc("web-a", "web", endpoints=[slice_endpoint("10.1.0.1", "p1"), slice_endpoint("10.1.0.2", "p2")]),
    slice_doc("web-a", "web", endpoints=[slice_endpoint("10.1.0.3", "p3", ready=False)]),
    slice_doc("web-a", "api", endpoints=[slice_endpoint("10.1.0.2", "p2")]),
    slice_doc("api-a", "api", endpoints=[slice_endpoint("10.1.0.1", "p1")],
              ports=[{"name": "http", "port": 7000}, {"name": "grpc", "port": 90}]),
    profile_doc("web", opaque_ports=[80]),
    profile_doc("web"),
    profile_doc("api", routes=[{"name": "r", "condition": {"method": "GET"}}]),
]
OBJECTS = [obj(d) for d in UNIVERSE]


def _key(o):
    return (o.kind, o.meta.namespace, o.meta.name)


@hsettings(max_examples=1000, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(["put", "delete"]), st.integers(0, len(OBJECTS) - 1),
                                st.booleans()), max_size=25),
       mode=st.sampled_from(["selector", "slices"]))
def test_any_sequence_of_changes_publishes_what_a_full_compile_of_the_end_state_would(steps, mode):
    settings = Settings(endpoints_from=mode)
    state = DestinationState(settings)
    current = {}
    state.apply(ResourceEvent("synced"))
    published: dict = {}
    for op, i, take in steps:
        o = OBJECTS[i]
        if op == "put":
            state.apply(ResourceEvent("modified" if _key(o) in current else "added", o))
            current[_key(o)] = o
        elif _key(o) in current:
            state.apply(ResourceEvent("deleted", current.pop(_key(o))))
        if take:  # a writer batch: apply the changes to what is "in KV"
            for k, v in state.take_changes().items():
                if v is None:
                    published.pop(k, None)
                else:
                    published[k] = v
    for k, v in state.take_changes().items():
        if v is None:
            published.pop(k, None)
        else:
            published[k] = v
    expected = compile_snapshot(current.values(), settings)
    assert published == expected == state.desired


def test_a_change_that_changes_nothing_yields_no_change():
    state = DestinationState()
    for d in (service_doc("web", selector=WEB), pod_doc("web-1", labels=WEB)):
        state.apply(ResourceEvent("added", obj(d)))
    state.apply(ResourceEvent("synced"))
    assert state.take_changes()
    relabelled = obj(pod_doc("web-1", labels={**WEB, "extra": "x"}))
    same = dataclasses.replace(relabelled, meta=dataclasses.replace(relabelled.meta, labels=WEB))
    state.apply(ResourceEvent("modified", same))
    assert state.take_changes() == {}
    # A new label the selector ignores changes nothing published either.
    state.apply(ResourceEvent("modified", relabelled))
    assert state.take_changes() == {}


def _events(state, *events):
    for ev in events:
        state.apply(ev)
    return state.take_changes()


def test_in_kubernetes_mode_a_pod_seen_after_its_slice_gives_the_endpoint_its_identity_and_readiness():
    state = DestinationState(Settings(endpoints_from="slices"))
    _events(state, ResourceEvent("added", obj(service_doc("web", selector=WEB))),
            ResourceEvent("added", obj(slice_doc("web-a", "web", endpoints=[slice_endpoint("10.1.0.1", "web-1")]))),
            ResourceEvent("synced"))
    assert state.desired[(EP, "demo.web.80")].endpoints[0].identity == ""
    changes = _events(state, ResourceEvent("added", obj(pod_doc("web-1", labels=WEB, sa="web"))))
    assert changes[(EP, "demo.web.80")].endpoints[0].identity == ID.format(sa="web", ns="demo")
    changes = _events(state, ResourceEvent("modified", obj(pod_doc("web-1", labels=WEB, sa="web", ready=False))))
    assert changes[(EP, "demo.web.80")].endpoints == []


def test_deleting_a_service_deletes_its_name_and_ip_keys():
    state = DestinationState()
    web = obj(service_doc("web", selector=WEB, cluster_ip="10.96.0.10"))
    _events(state, ResourceEvent("added", web), ResourceEvent("added", obj(pod_doc("web-1", labels=WEB))),
            ResourceEvent("synced"))
    changes = _events(state, ResourceEvent("deleted", web))
    assert changes == {(EP, "demo.web.80"): None, (EP, "_ip.10-96-0-10.80"): None}
    assert state.desired == {}


def test_a_cluster_ip_claimed_twice_is_reported_until_one_claim_goes():
    state = DestinationState()
    a = obj(service_doc("a", selector={"app": "a"}, cluster_ip="10.96.0.9"))
    b = obj(service_doc("b", selector={"app": "b"}, cluster_ip="10.96.0.9"))
    _events(state, ResourceEvent("added", a), ResourceEvent("added", b), ResourceEvent("synced"))
    assert state.ip_conflicts() == {"_ip.10-96-0-9.80": [("demo", "a"), ("demo", "b")]}
    changes = _events(state, ResourceEvent("deleted", a))
    assert changes[(EP, "_ip.10-96-0-9.80")].service == "b"
    assert state.ip_conflicts() == {}
