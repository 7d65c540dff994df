"""The policy service's pure compile (services/policy/compile.py): manifests in, each
workload's WorkloadPolicy out, plus the rejections it must report."""

from __future__ import annotations

import random

import yaml

from tulle.policy import InboundPolicy
from services.policy.compile import Settings, compile_policies
from services.policy.service import PolicyState
from tulle.sources.base import ResourceEvent
from tulle.codec import encode
from tulle.resources.parse import load_documents, parse_object
from tulle.schemas import identity_name

WEB = identity_name("web", "demo")


def objects(text: str) -> list:
    return [parse_object(d) for _, d in load_documents(text)]


def pod(name="books-0", ns="demo", labels=None, annotations=None, ports=(("http", 9090),), probes=(), meshed=True,
        sa="books", phase="Running") -> str:
    containers = [{"name": "app", "ports": [{"name": n, "containerPort": p} for n, p in ports]}]
    for kind, path, port in probes:
        containers[0][kind] = {"httpGet": {"path": path, "port": port}}
    if meshed:
        containers.append({"name": "tulle-proxy", "ports": [{"name": "tulle-admin", "containerPort": 4191}]})
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": ns, "labels": labels or {"app": name.rsplit("-", 1)[0]},
        "annotations": annotations or {}},
        "spec": {"serviceAccountName": sa, "containers": containers},
        "status": {"podIP": "10.42.0.9", "phase": phase}}) + "---\n"


def server(name, port, labels=None, ns="demo", proto=None, meta_labels=None) -> str:
    spec = {"podSelector": {"matchLabels": labels or {"app": "books"}}, "port": port}
    if proto:
        spec["proxyProtocol"] = proto
    return yaml.safe_dump({"apiVersion": "policy.tulle.dev/v1alpha1", "kind": "Server",
                           "metadata": {"name": name, "namespace": ns, "labels": meta_labels or {}},
                           "spec": spec}) + "---\n"


def saz(name, client, server_name=None, selector=None, ns="demo") -> str:
    target = {"name": server_name} if server_name else {"selector": {"matchLabels": selector}}
    return yaml.safe_dump({"apiVersion": "policy.tulle.dev/v1alpha1", "kind": "ServerAuthorization",
                           "metadata": {"name": name, "namespace": ns},
                           "spec": {"server": target, "client": client}}) + "---\n"


def namespace(name, default=None) -> str:
    ann = {"config.tulle.dev/default-inbound-policy": default} if default else {}
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "annotations": ann}}) + "---\n"


def compile_text(text, **settings):
    return compile_policies(objects(text), Settings(**settings))


def decider(wp) -> InboundPolicy:
    p = InboundPolicy("deny")
    p.update(wp)
    return p


# --- default policy precedence --------------------------------------------------------------------


def test_the_pods_default_policy_wins_over_the_namespaces_which_wins_over_the_clusters():
    ann = {"config.tulle.dev/default-inbound-policy": "deny"}
    text = (namespace("demo", "all-authenticated") + namespace("plain")
            + pod("books-0") + pod("web-0", annotations=ann) + pod("api-0", ns="plain"))
    c = compile_text(text, default_policy="cluster-unauthenticated")
    books, web, api = c.policies["demo.books-0"], c.policies["demo.web-0"], c.policies["plain.api-0"]
    assert (books.default_policy, web.default_policy, api.default_policy) == (
        "all-authenticated", "deny", "cluster-unauthenticated")
    assert books.sources["default_policy"] == "Namespace demo annotation config.tulle.dev/default-inbound-policy"
    assert web.sources["default_policy"] == "Pod demo/web-0 annotation config.tulle.dev/default-inbound-policy"
    assert api.sources["default_policy"] == "cluster default (--default-policy)"
    assert books.default.server == "default:all-authenticated" and books.ports[0].server == "default:all-authenticated"
    assert not decider(web).decide_connection(9090, "10.0.0.1", WEB, True).allowed
    assert decider(books).decide_connection(9090, "203.0.113.1", WEB, True).allowed
    assert not decider(books).decide_connection(9090, "10.0.0.1", None, False).allowed
    assert c.rejected == []


def test_an_unknown_default_policy_annotation_is_rejected_and_the_next_level_applies():
    text = namespace("demo", "allow-all") + pod("books-0", annotations={"config.tulle.dev/default-inbound-policy": "nope"})
    c = compile_text(text, default_policy="deny")
    assert c.policies["demo.books-0"].default_policy == "deny"
    lines = sorted(r.line() for r in c.rejected)
    assert lines[0].startswith("Namespace demo: annotation config.tulle.dev/default-inbound-policy: 'allow-all' is not one of")
    assert lines[1].startswith("Pod demo/books-0: annotation config.tulle.dev/default-inbound-policy: 'nope' is not one of")
    assert lines[1].endswith("using deny (cluster default (--default-policy))")


# --- Servers -------------------------------------------------------------------------------------


def test_a_server_by_port_name_covers_the_pods_port_of_that_name():
    text = pod(ports=(("http", 9090), ("admin", 9091))) + server("books-api", "http", proto="HTTP/1")
    wp = compile_text(text).policies["demo.books-0"]
    ports = {p.port: p for p in wp.ports}
    assert ports[9090].server == "books-api" and ports[9090].kind == "Server" and ports[9090].protocol == "HTTP/1"
    assert ports[9090].source == "Server demo/books-api"
    assert ports[9091].server == "default:all-unauthenticated"
    p = decider(wp)
    assert not p.decide_connection(9090, "10.0.0.1", WEB, True).allowed  # a Server with no authorization
    assert p.decide_connection(9091, "10.0.0.1", None, False).allowed


def test_a_server_whose_port_name_the_pod_does_not_have_covers_nothing_there():
    text = pod(ports=(("web", 8080),)) + server("books-api", "grpc")
    wp = compile_text(text).policies["demo.books-0"]
    assert [p.server for p in wp.ports] == ["default:all-unauthenticated"]


def test_a_server_by_number_covers_a_port_the_pod_does_not_declare():
    wp = compile_text(pod() + server("metrics", 9100)).policies["demo.books-0"]
    assert {p.port: p.server for p in wp.ports} == {9090: "default:all-unauthenticated", 9100: "metrics"}


def test_a_server_only_covers_the_pods_its_selector_matches_in_its_namespace():
    text = pod("books-0") + pod("web-0") + pod("books-0", ns="other") + server("books-api", 9090)
    c = compile_text(text)
    assert c.policies["demo.books-0"].ports[0].server == "books-api"
    assert c.policies["demo.web-0"].ports[0].server == "default:all-unauthenticated"
    assert c.policies["other.books-0"].ports[0].server == "default:all-unauthenticated"


def test_two_servers_on_the_same_pod_port_reject_the_later_by_name():
    text = pod() + server("b-second", "http") + server("a-first", 9090) + server("c-elsewhere", 9091)
    text += saz("to-second", {"unauthenticated": True}, server_name="b-second")
    c = compile_text(text)
    assert [r.line() for r in c.rejected] == [
        "Server demo/b-second: selects port 9090 of pod books-0, which Server a-first already selects "
        "(two Servers must not select the same pod and port)"]
    wp = c.policies["demo.books-0"]
    assert {p.port: p.server for p in wp.ports} == {9090: "a-first", 9091: "c-elsewhere"}
    assert wp.warnings == ["ServerAuthorization demo/to-second names Server b-second, which was rejected: "
                           "it authorizes nothing"]


# --- ServerAuthorizations --------------------------------------------------------------------------


def test_service_accounts_become_identities_in_the_trust_domain_and_default_to_the_authorizations_namespace():
    text = pod() + server("books-api", 9090) + saz("sa", {"meshTLS": {"serviceAccounts": [
        {"name": "web"}, {"name": "web", "namespace": "shop"}]}}, server_name="books-api")
    wp = compile_text(text, trust_domain="example.org").policies["demo.books-0"]
    (authz,) = wp.ports[0].authorizations
    assert authz.identities == [identity_name("web", "demo", "example.org"), identity_name("web", "shop", "example.org")]
    p = decider(wp)
    assert p.decide_connection(9090, "10.0.0.1", identity_name("web", "shop", "example.org"), True).allowed
    assert not p.decide_connection(9090, "10.0.0.1", identity_name("web", "demo"), True).allowed  # other trust domain
    assert not p.decide_connection(9090, "10.0.0.1", identity_name("books", "demo", "example.org"), True).allowed


def test_an_authorization_by_selector_applies_to_every_server_it_selects():
    text = (pod(ports=(("http", 9090), ("grpc", 9091))) + server("books-http", "http", meta_labels={"tier": "books"})
            + server("books-grpc", "grpc", meta_labels={"tier": "books"})
            + saz("lan", {"unauthenticated": True, "networks": [{"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}]},
                  selector={"tier": "books"}))
    wp = compile_text(text).policies["demo.books-0"]
    assert [[a.name for a in p.authorizations] for p in wp.ports] == [["lan"], ["lan"]]
    p = decider(wp)
    for port in (9090, 9091):
        assert p.decide_connection(port, "10.1.0.1", None, False).allowed
        assert not p.decide_connection(port, "10.9.0.1", None, False).allowed
        assert not p.decide_connection(port, "192.168.0.1", WEB, True).allowed


def test_an_authorization_naming_a_missing_server_is_a_warning_not_an_error():
    text = pod() + pod("web-0") + pod("x-0", ns="other") + saz("early", {"unauthenticated": True}, server_name="later")
    text += saz("none", {"unauthenticated": True}, selector={"tier": "nothing"})
    c = compile_text(text)
    assert c.rejected == []
    expected = ["ServerAuthorization demo/early names Server later, which does not exist: it authorizes nothing",
                "ServerAuthorization demo/none selects no Server: it authorizes nothing"]
    assert c.policies["demo.books-0"].warnings == expected and c.policies["demo.web-0"].warnings == expected
    assert c.policies["other.x-0"].warnings == []
    # ... and it starts to apply as soon as the Server arrives.
    c = compile_text(text + server("later", 9090))
    assert [a.name for a in c.policies["demo.books-0"].ports[0].authorizations] == ["early"]


# --- probes ----------------------------------------------------------------------------------------


def test_probe_paths_are_admitted_on_their_port_server_or_not():
    text = pod(ports=(("http", 9090), ("admin", 9091)), probes=[
        ("readinessProbe", "/ready", "http"), ("livenessProbe", "/live", 9091), ("startupProbe", "/started", "http")])
    text += server("books-api", "http")
    wp = compile_text(text, default_policy="deny", probe_networks=("10.0.0.0/8",)).policies["demo.books-0"]
    ports = {p.port: p for p in wp.ports}
    probe = [a for a in ports[9090].authorizations if a.kind == "probe"]
    assert [(a.paths, [n.cidr for n in a.networks]) for a in probe] == [(["/ready", "/started"], ["10.0.0.0/8"])]
    p = decider(wp)
    assert p.decide_request(9090, "10.0.0.7", None, False, "GET", "/ready").allowed
    assert p.decide_request(9091, "10.0.0.7", None, False, "GET", "/live").allowed
    assert not p.decide_request(9091, "10.0.0.7", None, False, "GET", "/ready").allowed  # not this port's probe
    assert not p.decide_request(9090, "203.0.113.1", None, False, "GET", "/ready").allowed  # not a probe network
    assert not p.decide_request(9090, "10.0.0.7", WEB, True, "GET", "/books").allowed


def test_a_probe_on_a_port_the_pod_does_not_have_is_a_warning():
    wp = compile_text(pod(probes=[("readinessProbe", "/ready", "nope")])).policies["demo.books-0"]
    assert wp.warnings == ["probe /ready on port 'nope': no such port on pod books-0"]


# --- which pods, and determinism --------------------------------------------------------------------


def test_only_running_meshed_pods_get_a_policy():
    text = pod("books-0") + pod("plain-0", meshed=False) + pod("done-0", phase="Succeeded")
    assert sorted(compile_text(text).policies) == ["demo.books-0"]


def test_the_compiled_policies_do_not_depend_on_the_order_of_the_objects():
    text = (namespace("demo", "cluster-authenticated") + pod("books-0") + pod("books-1") + pod("web-0")
            + server("books-api", "http") + server("zzz", "http")
            + saz("b", {"meshTLS": {"identities": ["*"]}}, server_name="books-api")
            + saz("a", {"meshTLS": {"serviceAccounts": [{"name": "web"}]}}, server_name="books-api"))
    objs = objects(text)
    first = compile_policies(objs)
    for seed in range(5):
        random.Random(seed).shuffle(objs)
        again = compile_policies(objs)
        assert {k: encode(v) for k, v in again.policies.items()} == {k: encode(v) for k, v in first.policies.items()}
        assert again.rejected == first.rejected
    assert [a.name for a in first.policies["demo.books-0"].ports[0].authorizations] == ["a", "b"]


def test_recompiling_unchanged_resources_changes_nothing_and_a_change_touches_exactly_its_workloads():
    state = PolicyState(Settings())
    for obj in objects(pod("books-0") + pod("books-1") + pod("web-0") + server("books-api", "http")):
        state.apply(ResourceEvent("added", obj))
    assert sorted(k for _, k in state.take_changes()) == ["demo.books-0", "demo.books-1", "demo.web-0"]
    assert state.take_changes() == {}
    (grant,) = objects(saz("web", {"meshTLS": {"serviceAccounts": [{"name": "web"}]}}, server_name="books-api"))
    state.apply(ResourceEvent("added", grant))
    assert sorted(k for _, k in state.take_changes()) == ["demo.books-0", "demo.books-1"]
    (web,) = [o for o in state.store.objects.values() if o.meta.name == "web-0"]
    state.apply(ResourceEvent("deleted", web))
    assert state.take_changes() == {("tulle-policy", "demo.web-0"): None}


def test_recompiling_only_touched_namespaces_always_agrees_with_compiling_everything():
    rng = random.Random(7)
    pool = objects(
        namespace("demo", "deny") + namespace("shop", "all-authenticated") + namespace("demo", "cluster-authenticated")
        + pod("books-0") + pod("books-1", labels={"app": "books"}) + pod("web-0") + pod("cart-0", ns="shop")
        + pod("books-0", annotations={"config.tulle.dev/default-inbound-policy": "all-authenticated"})
        + server("books-api", "http") + server("books-b", 9090) + server("cart", "http", labels={"app": "cart"}, ns="shop")
        + saz("web", {"meshTLS": {"serviceAccounts": [{"name": "web"}]}}, server_name="books-api")
        + saz("web", {"meshTLS": {"identities": ["*"]}}, server_name="books-b")
        + saz("lan", {"unauthenticated": True, "networks": [{"cidr": "10.0.0.0/8"}]}, server_name="cart", ns="shop"))
    state = PolicyState(Settings())
    for step in range(300):
        obj = rng.choice(pool)
        state.apply(ResourceEvent("deleted" if rng.random() < 0.3 else "added", obj))
        if rng.random() < 0.3:
            state.take_changes()
            full = compile_policies(state.store)
            assert {k: encode(v) for k, v in state.policies.items()} == {k: encode(v) for k, v in full.policies.items()}
            assert sorted(state.rejected, key=str) == sorted(full.rejected, key=str), step
