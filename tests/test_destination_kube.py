"""The destination service in Kubernetes mode: a real process, the real `kubernetes` client
against the fake API server (real list/watch wire protocol), and a real nats-server."""

from __future__ import annotations

import pytest
import yaml

from tests.bus_support import TESTER, bus_for
from tests.conftest import eventually
from tests.destination_objects import ID, pod_doc, profile_doc, service_doc, slice_doc, slice_endpoint
from tests.destination_proc import DestinationProcess, KVRecorder, addresses
from tulle import schemas
from tulle.bus import Bus

WEB = {"app": "web"}
WEB_ID = ID.format(sa="web", ns="demo")


@pytest.fixture
def kube(tmp_path):
    from tests.fakekube import FakeKube

    k = FakeKube(bookmark_interval=0.2).start()
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": k.url}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
    k.kubeconfig = str(config)
    yield k
    k.stop()


@pytest.fixture
async def bus(own_nats):
    b = bus_for(own_nats.url, TESTER, component="test")
    await b.start()
    yield b
    await b.close()


@pytest.fixture
async def destination(own_nats, kube, tmp_path):
    d = DestinationProcess(own_nats.url, ["--kubernetes"], tmp_path / "destination.log",
                           env={"KUBECONFIG": kube.kubeconfig, "KUBERNETES_SERVICE_HOST": ""})
    yield d
    d.stop()


def web_slice(*endpoints: dict) -> dict:
    return slice_doc("web-abc", "web", endpoints=list(endpoints))


def seed(kube) -> None:
    kube.apply(service_doc("web", selector=WEB))
    kube.apply(service_doc("api", selector={"app": "api"}))
    kube.apply(pod_doc("web-1", labels=WEB, ip="10.1.0.1", sa="web"))
    kube.apply(pod_doc("web-2", labels=WEB, ip="10.1.0.2", sa="web"))
    kube.apply(web_slice(slice_endpoint("10.1.0.1", "web-1", zone="z1")))
    kube.apply(profile_doc("web", routes=[{"name": "books", "condition": {"pathRegex": "/books"}}]))


ONE = [("10.1.0.1", WEB_ID)]
TWO = [("10.1.0.1", WEB_ID), ("10.1.0.2", WEB_ID)]


async def started(kube, destination, bus) -> KVRecorder:
    seed(kube)
    recorder = KVRecorder(bus, ">")
    destination.start()
    await destination.ready_soon()
    await recorder.until(lambda s: addresses(s) == ONE, "the first sync")
    return recorder


async def test_an_endpointslice_update_publishes_the_new_endpoint_with_its_pods_identity(kube, destination, bus):
    recorder = await started(kube, destination, bus)
    first = recorder.current["demo.web.80"].endpoints[0]
    assert first.labels == {"namespace": "demo", "pod": "web-1", "serviceaccount": "web", "workload": "web-1",
                            "zone": "z1"}
    kube.apply(web_slice(slice_endpoint("10.1.0.1", "web-1"), slice_endpoint("10.1.0.2", "web-2")))
    await recorder.until(lambda s: addresses(s) == TWO, "both endpoints")
    cluster_ip = kube.get("v1", "Service", "demo", "web")["spec"]["clusterIP"]
    assert addresses(recorder.current, schemas.ip_endpoints_key(cluster_ip, 80)) == TWO
    profile = await bus.get(schemas.PROFILES_BUCKET, "demo.web", schemas.Profile)
    assert [r.name for r in profile.routes] == ["books"]
    recorder.close()


async def test_a_pod_becoming_unready_is_unpublished(kube, destination, bus):
    recorder = await started(kube, destination, bus)
    kube.apply(pod_doc("web-1", labels=WEB, ip="10.1.0.1", sa="web", ready=False))
    await recorder.until(lambda s: addresses(s) == [], "the endpoint gone")
    assert recorder.current["demo.web.80"].exists  # published empty, not deleted: clients fail fast
    recorder.close()


async def test_a_service_deletion_deletes_its_keys(kube, destination, bus):
    recorder = await started(kube, destination, bus)
    cluster_ip = kube.get("v1", "Service", "demo", "web")["spec"]["clusterIP"]
    ip_key = schemas.ip_endpoints_key(cluster_ip, 80)
    assert ip_key in recorder.current
    kube.delete("v1", "Service", "demo", "web")
    await recorder.until(lambda s: "demo.web.80" not in s and ip_key not in s, "both keys deleted")
    assert "demo.api.80" in recorder.current
    recorder.close()


async def test_a_watch_broken_by_the_api_server_resumes_without_losing_a_change(kube, destination, bus):
    recorder = await started(kube, destination, bus)
    with kube.watches_down():  # every watch dropped; changes made now are only seen on resuming
        kube.apply(web_slice(slice_endpoint("10.1.0.1", "web-1"), slice_endpoint("10.1.0.2", "web-2")))
        kube.delete("v1", "Service", "demo", "api")
    await recorder.until(lambda s: addresses(s) == TWO and "demo.api.80" not in s, "the changes made while down")
    assert destination.metric("tulle_kube_watch_restarts_total") >= 1
    assert destination.metric("tulle_kube_relists_total") == 0
    recorder.close()


async def test_a_410_gone_relists_without_losing_a_change(kube, destination, bus):
    recorder = await started(kube, destination, bus)
    with kube.watches_down():
        kube.apply(web_slice(slice_endpoint("10.1.0.1", "web-1"), slice_endpoint("10.1.0.2", "web-2")))
        kube.apply(pod_doc("web-2", labels=WEB, ip="10.1.0.2", sa="other"))
        kube.delete("v1", "Service", "demo", "api")
        kube.delete("tulle.dev/v1alpha1", "ServiceProfile", "demo", "web.demo.svc.cluster.local")
        kube.compact()  # the history is gone: resuming the watch gets 410 Gone
    want = [("10.1.0.1", WEB_ID), ("10.1.0.2", ID.format(sa="other", ns="demo"))]
    await recorder.until(lambda s: addresses(s) == want and "demo.api.80" not in s, "the changes made before the 410")
    assert destination.metric("tulle_kube_relists_total") >= 1
    await eventually(lambda: _absent(bus, schemas.PROFILES_BUCKET, "demo.web"), what="the profile deleted")
    recorder.close()


async def _absent(bus, bucket, key):
    return await bus.get_raw(bucket, key) is None
