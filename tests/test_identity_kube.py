"""The identity service's Kubernetes paths against tests/fakekube.py (the real `kubernetes`
client over HTTP): TokenReview with the identity audience and its fallback, and the
issuer read from a Secret and reloaded when the Secret changes."""

from __future__ import annotations

import asyncio
import base64

import pytest
from kubernetes import client as kclient

from services.identity.sources import SecretIssuerSource
from services.identity.tokens import KubeTokenVerifier, token_audience
from tests.bus_support import TESTER, bus_for
from tests.conftest import eventually
from tests.fakekube import TOKEN_REVIEW_PATH, FakeKube
from tests.identity_support import IdentityProcess, certify, identity_in_process, leaf_of, make_issuer_dir
from tulle import pki, schemas
from tulle.bus import Bus
from tulle.natsserver import free_port
from tulle.schemas import decode_event, identity_name

WEB = identity_name("web", "demo")
TOKEN_AUDIENCE = token_audience("cluster.local")
SECRET_NS, SECRET_NAME = "tulle", "tulle-identity-issuer"


@pytest.fixture
def kube():
    k = FakeKube().start()
    yield k
    k.stop()


@pytest.fixture
async def client(own_nats):
    bus = bus_for(own_nats.url, TESTER, component="test")
    await bus.start()
    yield bus
    await bus.close()


def api_client(kube: FakeKube):
    return kclient.ApiClient(kube.configuration())


def issuer_secret(anchor: pki.CA, issuer: pki.CA, *, cert_pem: bytes | None = None) -> dict:
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": SECRET_NAME, "namespace": SECRET_NS},
            "data": {"ca.crt": b64(anchor.cert_pem), "tls.crt": b64(cert_pem or issuer.cert_pem),
                     "tls.key": b64(issuer.key_pem)}}


async def test_a_token_is_checked_with_a_token_review_for_the_identity_audience(own_nats, client, kube, tmp_path):
    issuer_dir = make_issuer_dir(tmp_path / "issuer")
    kube.add_token("tok-web", "system:serviceaccount:demo:web", audiences=[TOKEN_AUDIENCE])
    kube.add_token("tok-api", "system:serviceaccount:demo:api", audiences=[TOKEN_AUDIENCE])
    kube.add_token("tok-user", "jane@example.com", audiences=[TOKEN_AUDIENCE])
    async with identity_in_process(own_nats.url, issuer_dir.path, verifier=KubeTokenVerifier(api_client(kube), TOKEN_AUDIENCE),
                                   concurrency=8) as server:
        resp = await certify(client, WEB, "tok-web")
        assert resp.error is None and pki.cert_identity(leaf_of(resp)) == WEB
        assert (await certify(client, WEB, "tok-api")).error.code == "name-mismatch"
        assert (await certify(client, WEB, "tok-unknown")).error.code == "unauthenticated"
        assert (await certify(client, WEB, "tok-user")).error.code == "unauthenticated"
        assert (await certify(client, WEB, "")).error.code == "unauthenticated"
        assert server.m_certify["ok"].value == 1
        # Several reviews in flight at once (the concurrency the service uses in Kubernetes).
        resps = await asyncio.gather(*(certify(client, WEB, "tok-web") for _ in range(16)))
        assert all(r.error is None for r in resps)
    assert ("POST", TOKEN_REVIEW_PATH) in kube.request_log


async def test_a_token_for_another_audience_is_refused_with_no_fallback(own_nats, client, kube, tmp_path):
    """The API server's own tokens (or any other audience's) prove nothing to identity: a
    token stolen from another service cannot be turned into a workload certificate."""
    issuer_dir = make_issuer_dir(tmp_path / "issuer")
    kube.add_token("tok-default", "system:serviceaccount:demo:web", audiences=["https://kubernetes.default.svc"])
    async with identity_in_process(own_nats.url, issuer_dir.path,
                                   verifier=KubeTokenVerifier(api_client(kube), TOKEN_AUDIENCE)):
        before = kube.request_log.count(("POST", TOKEN_REVIEW_PATH))
        assert (await certify(client, WEB, "tok-default")).error.code == "unauthenticated"
        assert kube.request_log.count(("POST", TOKEN_REVIEW_PATH)) == before + 1  # one review, with our audience


async def test_token_reviews_are_cached_briefly(own_nats, client, kube, tmp_path):
    issuer_dir = make_issuer_dir(tmp_path / "issuer")
    kube.add_token("tok-web", "system:serviceaccount:demo:web", audiences=[TOKEN_AUDIENCE])
    verifier = KubeTokenVerifier(api_client(kube), TOKEN_AUDIENCE)
    async with identity_in_process(own_nats.url, issuer_dir.path, verifier=verifier):
        for _ in range(5):
            assert (await certify(client, WEB, "tok-web")).error is None
            assert (await certify(client, WEB, "tok-forged")).error.code == "unauthenticated"
    assert kube.request_log.count(("POST", TOKEN_REVIEW_PATH)) == 2  # one per token, then the cache
    assert verifier.cache.hits == 8


async def test_an_unreachable_api_server_is_an_internal_error_not_unauthenticated(own_nats, client, tmp_path):
    issuer_dir = make_issuer_dir(tmp_path / "issuer")
    nowhere = kclient.Configuration()
    nowhere.host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    verifier = KubeTokenVerifier(kclient.ApiClient(nowhere), TOKEN_AUDIENCE, timeout_s=2)
    async with identity_in_process(own_nats.url, issuer_dir.path, verifier=verifier) as server:
        resp = await certify(client, WEB, "tok-web", timeout=20)
        assert resp.error.code == "internal" and "TokenReview" in resp.error.message
        assert server.m_certify["unauthenticated"].value == 0


async def test_the_issuer_comes_from_a_secret_and_follows_its_changes(own_nats, client, kube):
    anchor = pki.new_trust_anchor()
    first, second = pki.new_issuer(anchor), pki.new_issuer(anchor)
    kube.add_token("tok-web", "system:serviceaccount:demo:web")
    events: list[schemas.CloudEvent] = []

    async def on_event(msg):
        events.append(decode_event(msg.data))

    await client.subscribe_raw("tulle.events.identity.>", on_event)
    api = api_client(kube)
    kube.apply(issuer_secret(anchor, first))
    async with identity_in_process(own_nats.url, verifier=KubeTokenVerifier(api, TOKEN_AUDIENCE),
                                   source=SecretIssuerSource(api, SECRET_NS, SECRET_NAME)) as server:
        assert (await certify(client, WEB, "tok-web")).chain == [first.cert_pem.decode()]
        bundle = await client.get(schemas.IDENTITY_BUCKET, schemas.TRUST_BUNDLE_KEY, schemas.TrustBundle)
        assert bundle.anchors_pem == anchor.cert_pem.decode()

        kube.apply(issuer_secret(anchor, second))  # issuer rotation, e.g. by cert-manager

        async def from_second():
            resp = await certify(client, WEB, "tok-web")
            return resp.chain == [second.cert_pem.decode()]

        await eventually(from_second, what="leaves from the rotated issuer")
        leaf_of(await certify(client, WEB, "tok-web")).verify_directly_issued_by(second.cert)

        # A broken Secret is refused and the current issuer keeps signing.
        kube.apply(issuer_secret(anchor, second, cert_pem=b"not a certificate"))
        await eventually(lambda: any(e.type.endswith("issuer-invalid") for e in events), what="issuer-invalid")
        assert "tls.crt" in next(e for e in events if e.type.endswith("issuer-invalid")).data["error"]
        kube.delete("v1", "Secret", SECRET_NS, SECRET_NAME)
        await eventually(lambda: server.m_issuer_reloads.labels("invalid").value >= 2, what="deletion refused")
        assert (await certify(client, WEB, "tok-web")).chain == [second.cert_pem.decode()]


async def test_the_service_process_runs_against_the_kubernetes_api(own_nats, client, kube, tmp_path):
    anchor = pki.new_trust_anchor()
    issuer = pki.new_issuer(anchor)
    kube.apply(issuer_secret(anchor, issuer))
    kube.add_token("tok-web", "system:serviceaccount:demo:web", audiences=[TOKEN_AUDIENCE])
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
        f"clusters: [{{name: fake, cluster: {{server: '{kube.url}'}}}}]\n"
        "users: [{name: fake, user: {token: test}}]\n"
        "contexts: [{name: fake, context: {cluster: fake, user: fake}}]\n")
    proc = IdentityProcess(own_nats.url, None, None, tmp_path / "identity.log", "--kubernetes",
                           "--issuer-secret", f"{SECRET_NS}/{SECRET_NAME}",
                           env={"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": ""}).start()
    try:
        await asyncio.to_thread(proc.wait_ready)
        resp = await certify(client, WEB, "tok-web")
        assert resp.error is None and resp.chain == [issuer.cert_pem.decode()]
        assert (await certify(client, WEB, "tok-nobody")).error.code == "unauthenticated"
    finally:
        proc.stop()


@pytest.fixture
def bare_nats(tmp_path):
    """A bus whose proxy logins are answered by the identity process under test only."""
    from tests.bus_support import MeshNats

    server = MeshNats(tmp_path / "bare-nats", with_callout=False).start()
    yield server
    server.close()


async def test_proxies_log_onto_the_bus_with_a_pod_bound_token_checked_by_token_review(bare_nats, kube, tmp_path):
    import nats

    from tulle.bus import BusCredentials

    anchor = pki.new_trust_anchor()
    kube.apply(issuer_secret(anchor, pki.new_issuer(anchor)))
    kube.add_token("tok-web-1", "system:serviceaccount:demo:web", audiences=[TOKEN_AUDIENCE], pod="web-1")
    kube.add_token("tok-unbound", "system:serviceaccount:demo:web", audiences=[TOKEN_AUDIENCE])
    kube.add_token("tok-apiserver", "system:serviceaccount:demo:web", audiences=["https://kubernetes.default.svc"],
                   pod="web-1")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
        f"clusters: [{{name: fake, cluster: {{server: '{kube.url}'}}}}]\n"
        "users: [{name: fake, user: {token: test}}]\n"
        "contexts: [{name: fake, context: {cluster: fake, user: fake}}]\n")
    proc = IdentityProcess(bare_nats.url, None, None, tmp_path / "identity.log", "--kubernetes",
                           "--issuer-secret", f"{SECRET_NS}/{SECRET_NAME}",
                           "--callout-issuer-seed", str(bare_nats.callout_issuer_seed_file),
                           "--callout-creds", str(bare_nats.seed_file("callout")),
                           env={"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": ""}).start()
    try:
        await asyncio.to_thread(proc.wait_ready)
        token_file = tmp_path / "token"
        token_file.write_text("tok-web-1")
        proxy = Bus(bare_nats.url, component="proxy",
                    credentials=BusCredentials.for_workload(str(token_file), "demo", "web-1"))
        await asyncio.wait_for(proxy.start(), 20)
        await proxy.put_raw(schemas.PROXIES_BUCKET, "demo.web-1", b"{}", create=False)  # its own heartbeat key
        await proxy.close()
        for bad in ("tok-unbound", "tok-apiserver", "tok-nobody"):
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await nats.connect(bare_nats.url, token=bad, allow_reconnect=False, max_reconnect_attempts=0,
                                   connect_timeout=8)
        assert proc.metric("tulle_identity_bus_logins_total", result="ok") == 1
        assert proc.metric("tulle_identity_bus_logins_total", result="unbound") == 1
        assert proc.metric("tulle_identity_bus_logins_total", result="unauthenticated") == 2
    finally:
        proc.stop()
