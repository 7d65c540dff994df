"""KubeSource against tests/fakekube.py, through the official `kubernetes` client.

The fake speaks the API server's list/watch wire protocol, so these tests exercise the
production path: urllib3 over a real socket, chunked watch streams, bookmarks, 410 Gone.
"""

from __future__ import annotations

import asyncio
import copy

import pytest

from tests.conftest import eventually
from tests.fakekube import FakeKube
from tulle.metrics import REGISTRY, sample
from tulle.resources import model as m
from tulle.sources.base import ResourceEvent, Store
from tulle.sources.kube import KUBE_KINDS, KindState, KubeSource

ALL_KINDS = ["Namespace", "Service", "Pod", "EndpointSlice", "ServiceProfile", "Server", "ServerAuthorization"]


# --- manifests -------------------------------------------------------------------------


def namespace(name):
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def service(name, ns="demo", port=80):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port, "targetPort": 8080}]}}


def pod(name, ns="demo", ip="10.1.0.5", ready=True, app="web"):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
            "spec": {"serviceAccountName": app, "containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def endpoint_slice(name, service_name, addresses, ns="demo"):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
            "ports": [{"name": "http", "port": 8080}]}


def service_profile(service_name, ns="demo"):
    return {"apiVersion": "tulle.dev/v1alpha1", "kind": "ServiceProfile",
            "metadata": {"name": f"{service_name}.{ns}.svc.cluster.local", "namespace": ns},
            "spec": {"routes": [{"name": "GET /", "condition": {"method": "GET", "pathRegex": "/"},
                                 "timeout": "300ms"}]}}


def server(name, ns="demo", port="http"):
    return {"apiVersion": "policy.tulle.dev/v1alpha1", "kind": "Server",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "port": port, "proxyProtocol": "HTTP/1"}}


def server_authorization(name, ns="demo", server_spec=None):
    return {"apiVersion": "policy.tulle.dev/v1alpha1", "kind": "ServerAuthorization",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"server": server_spec or {"name": "web-http"},
                     "client": {"meshTLS": {"serviceAccounts": [{"name": "client"}]}}}}


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def kube():
    server = FakeKube(bookmark_interval=0.2).start()
    yield server
    server.stop()


class Collector:
    """Consumes a source's events in a task; tests await conditions on what arrived."""

    def __init__(self, source: KubeSource):
        self.source = source
        self.events: list[ResourceEvent] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self):
        async for ev in self.source.events():
            self.events.append(ev)
            self._changed.set()

    async def wait_for(self, predicate, what: str, timeout: float = 10.0):
        async def until():
            while not predicate(self.events):
                if self.task.done():
                    self.task.result()  # re-raise the source's failure
                    raise AssertionError(f"source ended before {what}")
                self._changed.clear()
                waiter = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait({waiter, self.task}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        try:
            await asyncio.wait_for(until(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; events: {self.events}") from None

    async def synced(self, count: int = 1):
        await self.wait_for(lambda evs: sum(e.type == "synced" for e in evs) >= count, f"synced #{count}")

    def since(self, index: int) -> list[ResourceEvent]:
        return self.events[index:]

    async def close(self):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.source.aclose()


@pytest.fixture
async def collect(kube):
    made: list[Collector] = []

    def start(kinds=ALL_KINDS, **kwargs) -> Collector:
        c = Collector(KubeSource(kube.configuration(), kinds=kinds, **kwargs))
        made.append(c)
        return c

    yield start
    for c in made:
        await c.close()


async def watching(kube, n: int):
    """Until the source's watches are open on the server (a `synced` comes just before)."""
    await eventually(lambda: kube.watch_count() == n, what=f"{n} open watches")


def changes(events):
    """(type, kind, namespace, name) of the object events."""
    return [(e.type, *m.key_of(e.obj)) for e in events if e.obj is not None]


def relists(kind: str) -> float:
    return sample(REGISTRY.render(), "tulle_kube_relists_total", kind=kind)


def seed(kube):
    for obj in (namespace("demo"), service("web"), pod("web-1"), pod("web-2", ip="10.1.0.6"),
                endpoint_slice("web-abc", "web", ["10.1.0.5", "10.1.0.6"]), service_profile("web"),
                server("web-http"), server_authorization("web-authz")):
        kube.apply(obj)


# --- behaviour ----------------------------------------------------------------------------


async def test_initial_list_delivers_every_object_as_added_then_one_synced(kube, collect):
    seed(kube)
    c = collect()
    await c.synced()
    head = c.events[: c.events.index(ResourceEvent("synced"))]
    assert all(e.type == "added" for e in head)
    assert sorted(changes(head)) == sorted([
        ("added", "Namespace", "", "demo"), ("added", "Service", "demo", "web"),
        ("added", "Pod", "demo", "web-1"), ("added", "Pod", "demo", "web-2"),
        ("added", "EndpointSlice", "demo", "web-abc"),
        ("added", "ServiceProfile", "demo", "web.demo.svc.cluster.local"),
        ("added", "Server", "demo", "web-http"), ("added", "ServerAuthorization", "demo", "web-authz")])
    store = Store()
    for e in c.events:
        store.apply(e)
    svc = store.get("Service", "demo", "web")
    assert svc.cluster_ip.startswith("10.96.")  # assigned by the API server, as in a cluster
    assert store.get("Pod", "demo", "web-1").ready is True
    assert store.get("ServiceProfile", "demo", "web.demo.svc.cluster.local").routes[0].timeout_ms == 300
    assert store.get("ServerAuthorization", "demo", "web-authz").mesh_tls.service_accounts[0].name == "client"


async def test_endpoint_slice_update_arrives_as_modified(kube, collect):
    seed(kube)
    c = collect(["EndpointSlice"])
    await c.synced()
    mark = len(c.events)
    kube.apply(endpoint_slice("web-abc", "web", ["10.1.0.5"]))
    await c.wait_for(lambda evs: len(evs) > mark, "the slice change")
    [ev] = c.since(mark)
    assert ev.type == "modified"
    assert [e.addresses for e in ev.obj.endpoints] == [("10.1.0.5",)]


async def test_pod_becoming_unready_arrives_as_modified_with_ready_false(kube, collect):
    seed(kube)
    c = collect(["Pod"])
    await c.synced()
    mark = len(c.events)
    kube.apply(pod("web-1", ready=False))
    await c.wait_for(lambda evs: len(evs) > mark, "the pod change")
    [ev] = c.since(mark)
    assert (ev.type, ev.obj.meta.name, ev.obj.ready) == ("modified", "web-1", False)


async def test_service_deletion_arrives_as_deleted_with_its_last_state(kube, collect):
    seed(kube)
    c = collect(["Service"])
    await c.synced()
    mark = len(c.events)
    kube.delete("v1", "Service", "demo", "web")
    await c.wait_for(lambda evs: len(evs) > mark, "the deletion")
    [ev] = c.since(mark)
    assert ev.type == "deleted" and ev.obj.meta.name == "web" and ev.obj.ports[0].port == 80


async def test_changes_made_while_the_watch_is_down_arrive_once_it_resumes(kube, collect):
    seed(kube)
    c = collect(["Pod", "Service"], backoff_max=0.2)
    await c.synced()
    await watching(kube, 2)
    relists_before = relists("Pod")
    mark = len(c.events)
    with kube.watches_down():
        kube.apply(pod("web-1", ready=False))
        kube.apply(pod("web-3", ip="10.1.0.7"))
        kube.delete("v1", "Pod", "demo", "web-2")
        kube.apply(service("web", port=8080))
    await c.wait_for(lambda evs: len(evs) >= mark + 4, "the four changes")
    assert sorted(changes(c.since(mark))) == sorted([
        ("modified", "Pod", "demo", "web-1"), ("added", "Pod", "demo", "web-3"),
        ("deleted", "Pod", "demo", "web-2"), ("modified", "Service", "demo", "web")])
    # Resumed from the last resourceVersion: no relist, no second `synced`, no duplicate.
    kube.apply(pod("web-4", ip="10.1.0.8"))  # a later change proves the stream is live again
    await c.wait_for(lambda evs: ("added", "Pod", "demo", "web-4") in changes(evs), "a later change")
    assert len(c.since(mark)) == 5
    assert relists("Pod") == relists_before
    assert sample(REGISTRY.render(), "tulle_kube_watch_restarts_total", kind="Pod", reason="error") >= 1


async def test_410_gone_relists_and_emits_exactly_the_missing_changes_then_synced(kube, collect):
    seed(kube)
    c = collect(["Pod"], backoff_max=0.2)
    await c.synced()
    await watching(kube, 1)
    relists_before = relists("Pod")
    mark = len(c.events)
    with kube.watches_down():
        kube.apply(pod("web-1", ready=False))              # modified
        kube.delete("v1", "Pod", "demo", "web-2")          # deleted
        kube.apply(pod("web-3", ip="10.1.0.7"))            # added
        kube.apply(pod("web-4", ip="10.1.0.8"))            # added, then gone again: nothing
        kube.delete("v1", "Pod", "demo", "web-4")
        unread = pod("web-1", ready=False)
        unread["status"]["hostIP"] = "192.0.2.1"           # a field the model does not read: nothing
        kube.apply(unread)
        kube.compact()
    await c.synced(2)
    after = c.since(mark)
    assert after[-1] == ResourceEvent("synced")
    assert sorted(changes(after)) == sorted([
        ("modified", "Pod", "demo", "web-1"), ("deleted", "Pod", "demo", "web-2"), ("added", "Pod", "demo", "web-3")])
    assert relists("Pod") == relists_before + 1
    # The watch resumes from the relist: later changes still arrive, once.
    mark = len(c.events)
    kube.apply(pod("web-5", ip="10.1.0.9"))
    await c.wait_for(lambda evs: len(evs) > mark, "a change after the relist")
    assert changes(c.since(mark)) == [("added", "Pod", "demo", "web-5")]


async def test_invalid_server_authorization_yields_one_error_and_the_source_keeps_going(kube, collect):
    seed(kube)
    c = collect(["Server", "ServerAuthorization"])
    await c.synced()
    mark = len(c.events)
    bad = server_authorization("web-authz", server_spec={"name": "web-http",
                                                         "selector": {"matchLabels": {"app": "web"}}})
    kube.apply(bad)
    await c.wait_for(lambda evs: len(evs) > mark, "the error")
    [err] = c.since(mark)
    assert err.type == "error" and err.obj is None
    assert err.error.startswith("ServerAuthorization demo/web-authz: spec.server:")
    assert "\n" not in err.error
    # The source goes on: a valid change of another object arrives, the bad one is not re-reported.
    kube.apply(server("web-admin", port=9090))
    await c.wait_for(lambda evs: any(e.type == "added" for e in evs[mark:]), "the next object")
    assert [e.type for e in c.since(mark)] == ["error", "added"]
    # The last good version was kept: fixing the object is a modification of it.
    store = Store()
    for e in c.events:
        store.apply(e)
    assert store.get("ServerAuthorization", "demo", "web-authz").server_name == "web-http"
    fixed = server_authorization("web-authz", server_spec={"selector": {"matchLabels": {"app": "web"}}})
    kube.apply(fixed)
    await c.wait_for(lambda evs: evs[-1].type == "modified", "the fix")
    assert c.events[-1].obj.server_selector.match_labels == {"app": "web"}


async def test_an_invalid_object_in_the_initial_list_is_reported_before_synced(kube, collect):
    seed(kube)
    broken = server("web-broken")
    broken["spec"]["proxyProtocol"] = "HTTP/3"
    kube.apply(broken)
    c = collect(["Server"])
    await c.synced()
    assert [e.type for e in c.events] == ["error", "added", "synced"] or \
           [e.type for e in c.events] == ["added", "error", "synced"]
    [err] = [e for e in c.events if e.type == "error"]
    assert "Server demo/web-broken: spec.proxyProtocol:" in err.error
    assert sample(REGISTRY.render(), "tulle_kube_parse_errors_total", kind="Server") >= 1


async def test_a_namespaced_source_sees_only_its_namespace(kube, collect):
    seed(kube)
    kube.apply(namespace("other"))
    kube.apply(pod("elsewhere", ns="other"))
    kube.apply(server("other-http", ns="other"))
    c = collect(["Namespace", "Pod", "Server"], namespace="other")
    await c.synced()
    assert sorted(changes(c.events)) == [("added", "Namespace", "", "other"), ("added", "Pod", "other", "elsewhere"),
                                         ("added", "Server", "other", "other-http")]
    mark = len(c.events)
    kube.apply(pod("web-9", ns="demo"))
    kube.apply(pod("other-2", ns="other"))
    await c.wait_for(lambda evs: len(evs) > mark, "the change in its namespace")
    assert changes(c.since(mark)) == [("added", "Pod", "other", "other-2")]


async def test_a_watch_ended_by_its_timeout_is_resumed_without_loss(kube, collect):
    seed(kube)
    c = collect(["Pod"], watch_timeout=1)
    await c.synced()

    def pod_watches():
        return sum(1 for method, path in kube.request_log if path == "/api/v1/pods") - 1  # minus the list

    # Wait for the server to end the first watch and the source to open a second one.
    await eventually(lambda: pod_watches() >= 2, what="a second watch request")
    kube.apply(pod("web-7", ip="10.1.0.10"))
    await c.wait_for(lambda evs: ("added", "Pod", "demo", "web-7") in changes(evs), "the change")
    assert changes(c.events).count(("added", "Pod", "demo", "web-7")) == 1
    assert sum(e.type == "synced" for e in c.events) == 1


async def test_aclose_stops_the_worker_threads(kube):
    seed(kube)
    source = KubeSource(kube.configuration(), kinds=ALL_KINDS)  # watches of 5 minutes
    c = Collector(source)
    await c.synced()
    assert len(source.threads) == len(ALL_KINDS)
    await watching(kube, len(ALL_KINDS))
    await c.close()
    assert source.threads == []


async def test_watches_refused_at_start_are_retried_until_they_work(kube, collect):
    seed(kube)
    kube.refuse_watches()  # watches fail at first: the source backs off and retries
    c = collect(["Pod"], backoff_max=0.2)
    await c.synced()
    kube.refuse_watches(False)
    mark = len(c.events)
    kube.apply(pod("web-8", ip="10.1.0.11"))
    await c.wait_for(lambda evs: len(evs) > mark, "the change once watches work")
    assert changes(c.since(mark)) == [("added", "Pod", "demo", "web-8")]


def test_unknown_kind_is_refused_with_the_supported_list(kube):
    with pytest.raises(ValueError, match="cannot watch Workload.*supported: EndpointSlice"):
        KubeSource(kube.configuration(), kinds=["Workload"])


# --- the pure core -----------------------------------------------------------------------------


def test_kind_state_relist_converges_with_the_fewest_events():
    state = KindState(KUBE_KINDS["Pod"])
    assert [e.type for e in state.relist([pod("a"), pod("b")])] == ["added", "added"]
    unchanged, changed = pod("a"), pod("b", ready=False)
    unchanged["metadata"]["resourceVersion"] = "99"  # only the version moved: no event
    events = state.relist([unchanged, changed, pod("c")])
    assert changes(events) == [("modified", "Pod", "demo", "b"), ("added", "Pod", "demo", "c")]
    assert changes(state.relist([pod("c")])) == [("deleted", "Pod", "demo", "a"), ("deleted", "Pod", "demo", "b")]


def test_kind_state_keeps_the_last_good_version_and_reports_each_bad_version_once():
    state = KindState(KUBE_KINDS["Server"])
    state.apply("ADDED", server("s"))
    bad = server("s")
    bad["spec"]["port"] = 70000
    bad["metadata"]["resourceVersion"] = "5"
    [err] = state.apply("MODIFIED", copy.deepcopy(bad))
    assert err.type == "error" and "spec.port" in err.error
    assert state.relist([copy.deepcopy(bad)]) == []  # same bad version: not reported again
    assert state.known[("Server", "demo", "s")].port == "http"
    [deleted] = state.apply("DELETED", bad)
    assert deleted.type == "deleted" and deleted.obj.port == "http"  # its last good state
    assert state.apply("DELETED", bad) == []  # already gone: no duplicate


# --- the fake itself, as other services' tests use it (Secrets, TokenReview) ---------------------


def test_fakekube_serves_secrets_to_get_list_and_watch_through_the_client(kube):
    import base64

    from kubernetes import client, watch

    core = client.CoreV1Api(client.ApiClient(kube.configuration()))
    kube.apply({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": "issuer", "namespace": "tulle", "labels": {"app": "identity"}},
                "stringData": {"tls.crt": "CERT", "tls.key": "KEY"}})
    secret = core.read_namespaced_secret("issuer", "tulle")
    assert base64.b64decode(secret.data["tls.crt"]) == b"CERT" and secret.type == "kubernetes.io/tls"
    listed = core.list_namespaced_secret("tulle", field_selector="metadata.name=issuer")
    assert [s.metadata.name for s in listed.items] == ["issuer"]
    assert core.list_namespaced_secret("tulle", label_selector="app in (identity),app!=web").items
    assert core.list_namespaced_secret("tulle", label_selector="app=other").items == []
    with pytest.raises(client.ApiException) as info:
        core.read_namespaced_secret("missing", "tulle")
    assert info.value.status == 404
    # A watch from the list's resourceVersion sees the rotation, data and all.
    kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "issuer", "namespace": "tulle"},
                "data": {"tls.crt": base64.b64encode(b"NEW").decode()}})
    w = watch.Watch()
    events = list(w.stream(core.list_namespaced_secret, "tulle", resource_version=listed.metadata.resource_version,
                           field_selector="metadata.name=issuer", timeout_seconds=1))
    assert [(e["type"], base64.b64decode(e["object"].data["tls.crt"])) for e in events] == [("MODIFIED", b"NEW")]
    # Compacted history: the watch gets 410 Gone, exactly as from an API server.
    kube.compact()
    with pytest.raises(client.ApiException) as info:
        list(w.stream(core.list_namespaced_secret, "tulle", resource_version=listed.metadata.resource_version,
                      timeout_seconds=1))
    assert info.value.status == 410


def test_fakekube_answers_token_reviews_by_token_and_audience(kube):
    from kubernetes import client

    auth = client.AuthenticationV1Api(client.ApiClient(kube.configuration()))
    kube.add_token("t-web", "system:serviceaccount:demo:web")
    kube.add_token("t-aud", "system:serviceaccount:demo:api", audiences=["tulle-identity"], pod="api-7d9f")

    def review(token, audiences=None):
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=audiences))
        return auth.create_token_review(body).status

    web = review("t-web", ["anything"])
    assert web.authenticated and web.user.username == "system:serviceaccount:demo:web"
    assert "system:serviceaccounts:demo" in web.user.groups
    bound = review("t-aud", ["tulle-identity"])
    assert bound.authenticated and bound.user.extra["authentication.kubernetes.io/pod-name"] == ["api-7d9f"]
    assert not web.user.extra  # a token bound to no pod names none
    assert not review("t-aud", ["kube-apiserver"]).authenticated
    unknown = review("nope")
    assert not unknown.authenticated and "invalid bearer token" in unknown.error
