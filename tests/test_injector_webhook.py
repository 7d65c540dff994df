"""The admission webhook over real HTTPS: AdmissionReview v1 payloads built from the
`kubernetes` client's models, the answer's JSONPatch applied with jsonpatch and the pod
checked; malformed, wrong-version, oversized and odd requests refused with a status
and counted, never a crash; the certificate replaced without a restart; namespaces and
owners read from the (fake) Kubernetes API; `python -m services.injector` as a process,
reporting what it injected or skipped as CloudEvents on the authenticated bus.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import asyncio
import uuid
from pathlib import Path

import jsonpatch
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes import client as k8s

from services.injector import core
from services.injector.admission import AdmissionHandler
from services.injector.server import ServingCertificate, WebhookServer
from services.injector.sources import KubeLookups
from tests.bus_support import bus_for
from tests.conftest import wait_until
from tests.fakekube import FakeKube
from tests.injector_support import ANCHORS_PEM, GOLDEN, values
from tulle import __version__, schemas
from tulle.metrics import REGISTRY, sample

SERVICE_DNS = "tulle-proxy-injector.tulle.svc"
API = k8s.ApiClient()


# --- certificates ----------------------------------------------------------------------------------------


def make_ca():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "webhook test CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_serving(ca, cn: str) -> tuple[bytes, bytes]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVICE_DNS)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@pytest.fixture(scope="module")
def ca():
    return make_ca()


def client_context(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca[1].public_bytes(serialization.Encoding.PEM).decode())
    return ctx


# --- reviews from the kubernetes client's models ------------------------------------------------------------


def deployment_pod(name="web-5d4f7b9c8-x2x7q", namespace="shop", annotations=None, ports=(8080,), **spec):
    return k8s.V1Pod(
        api_version="v1", kind="Pod",
        metadata=k8s.V1ObjectMeta(
            generate_name="web-5d4f7b9c8-", name=name, namespace=namespace,
            labels={"app": "web", "pod-template-hash": "5d4f7b9c8"}, annotations=annotations,
            owner_references=[k8s.V1OwnerReference(api_version="apps/v1", kind="ReplicaSet", name="web-5d4f7b9c8",
                                                   uid=str(uuid.uuid4()), controller=True)]),
        spec=k8s.V1PodSpec(service_account_name="web", containers=[k8s.V1Container(
            name="web", image="ghcr.io/example/web:2.4.1",
            ports=[k8s.V1ContainerPort(container_port=p) for p in ports])], **spec))


def review(obj, *, resource="pods", kind="Pod", operation="CREATE", namespace="shop", api_version="admission.k8s.io/v1"):
    uid = str(uuid.uuid4())
    return uid, {
        "apiVersion": api_version, "kind": "AdmissionReview",
        "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": kind},
                    "resource": {"group": "", "version": "v1", "resource": resource},
                    "requestKind": {"group": "", "version": "v1", "kind": kind},
                    "namespace": namespace, "operation": operation,
                    "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                    "object": API.sanitize_for_serialization(obj), "oldObject": None, "dryRun": False,
                    "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}}}


# --- a webhook in this process -----------------------------------------------------------------------------


class Webhook:
    def __init__(self, lt, handler: AdmissionHandler, cert: ServingCertificate, max_body: int = 3 * 1024 * 1024):
        async def handle(body):
            return handler.handle(body)

        self.lt = lt
        self.server = WebhookServer("127.0.0.1", 0, cert, handle, max_body=max_body)
        lt.call(self.server.start())

    def connection(self, ca) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection("127.0.0.1", self.server.port, context=client_context(ca), timeout=10)
        conn.connect = _connect_with_sni(conn)
        return conn

    def post(self, ca, body: bytes, path="/", conn=None) -> tuple[int, bytes]:
        conn = conn or self.connection(ca)
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()

    def close(self) -> None:
        self.lt.call(self.server.close())


def _connect_with_sni(conn):
    # Dial 127.0.0.1 but check the certificate names the Service, as the API server does.
    def connect():
        sock = socket.create_connection((conn.host, conn.port), conn.timeout)
        conn.sock = conn._context.wrap_socket(sock, server_hostname=SERVICE_DNS)
    return connect


@pytest.fixture
def webhook(lt, ca):
    cert = ServingCertificate()
    assert cert.load(*make_serving(ca, "first"), "test")
    namespaces = {"shop": {}, "meshed": {core.INJECT: "enabled", "config.tulle.dev/proxy-cpu-limit": "500m"}}
    hook = Webhook(lt, AdmissionHandler(values(), namespace_annotations=lambda ns: namespaces.get(ns, {})), cert)
    hook.cert = cert
    yield hook
    hook.close()


def answer_of(status: int, body: bytes, uid: str) -> dict:
    assert status == 200, body
    out = json.loads(body)
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    assert out["response"]["uid"] == uid and out["response"]["allowed"] is True
    return out["response"]


def patched(pod_obj, response) -> dict:
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(API.sanitize_for_serialization(pod_obj), ops)


def metric(name: str, **labels) -> float:
    return sample(REGISTRY.render(), name, **labels) or 0.0


# --- tests ---------------------------------------------------------------------------------------------


def test_an_opted_in_pod_gets_the_proxy_through_a_jsonpatch_over_https(webhook, ca):
    pod = deployment_pod(annotations={core.INJECT: "enabled"})
    uid, rev = review(pod)
    before = metric("tulle_injector_admissions_total", resource="pods", result="injected")
    response = answer_of(*webhook.post(ca, json.dumps(rev).encode()), uid)
    out = patched(pod, response)
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["tulle-init", "tulle-proxy"]
    assert out["metadata"]["labels"]["tulle.dev/proxy-deployment"] == "web"  # from the ReplicaSet's name
    assert out["metadata"]["annotations"]["tulle.dev/created-by"].startswith("tulle/proxy-injector ")
    env = {e["name"]: e.get("value") for e in out["spec"]["initContainers"][1]["env"]}
    assert env["TULLE_PROXY_IDENTITY_TRUST_ANCHORS"] == ANCHORS_PEM
    import kubernetes_validate
    from tests.injector_support import K8S_SCHEMA_VERSION
    kubernetes_validate.validate(out, K8S_SCHEMA_VERSION, strict=True)
    # The answer is the golden patch (the uid aside).
    golden = GOLDEN / "out" / "webhook-pod.patch.json"
    ops = json.loads(base64.b64decode(response["patch"]))
    if os.environ.get("TULLE_UPDATE_GOLDEN") == "1":
        golden.write_text(json.dumps(ops, indent=2) + "\n")
    assert ops == json.loads(golden.read_text())
    assert metric("tulle_injector_admissions_total", resource="pods", result="injected") == before + 1


# A pod as each controller creates it from its template (the golden inputs' templates): the
# owner reference and the name are the controller's, the rest is the template's.
CONTROLLED_PODS = {
    # kind of the golden input: (owner kind, owner name, pod name, namespace)
    "statefulset": ("StatefulSet", "db", "db-0", "shop"),
    "daemonset": ("DaemonSet", "node-agent", "node-agent-7xk2p", "shop"),
    "job": ("Job", "migrate", "migrate-9qz4w", "shop"),
    "cronjob": ("Job", "report-29410560", "report-29410560-b8m2d", "shop"),  # the CronJob's Job
    "replicaset": ("ReplicaSet", "web-rs", "web-rs-4mz9k", "shop"),
    "namespace-config": ("ReplicaSet", "web-5d4f7b9c8", "web-5d4f7b9c8-x2x7q", "meshed"),
}


def _controlled_pod(kind: str) -> dict:
    import yaml

    owner_kind, owner, name, namespace = CONTROLLED_PODS[kind]
    if kind == "namespace-config":
        pod = API.sanitize_for_serialization(deployment_pod(namespace=namespace))
        pod["metadata"]["annotations"] = None
        return {k: v for k, v in pod.items() if v is not None}
    source = next(d for d in yaml.safe_load_all((GOLDEN / "in" / f"{kind}.yaml").read_text())
                  if d and d.get("kind", "").lower() == kind)
    template = source["spec"]["template"] if kind != "cronjob" else source["spec"]["jobTemplate"]["spec"]["template"]
    template = json.loads(json.dumps(template))
    meta = template.get("metadata") or {}
    meta.update(name=name, namespace=namespace, ownerReferences=[{
        "apiVersion": "batch/v1" if owner_kind == "Job" else "apps/v1", "kind": owner_kind, "name": owner,
        "uid": "6f1c1f8e-3c1a-4a57-9a37-0d6f1c2a7b11", "controller": True, "blockOwnerDeletion": True}])
    template["spec"].setdefault("serviceAccountName", "default")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]}


@pytest.mark.parametrize("kind", sorted(CONTROLLED_PODS))
def test_pods_of_every_controller_get_their_golden_patch(webhook, ca, kind):
    """The webhook's patch for a pod of each supported kind matches its reviewed golden file,
    and the patched pod is a valid Pod."""
    import kubernetes_validate
    from tests.injector_support import K8S_SCHEMA_VERSION

    pod = _controlled_pod(kind)
    if kind != "namespace-config":  # opted in by the pod; else by its namespace (with its config)
        pod["metadata"].setdefault("annotations", {})[core.INJECT] = "enabled"
    uid, rev = review(pod, namespace=pod["metadata"]["namespace"])
    response = answer_of(*webhook.post(ca, json.dumps(rev).encode()), uid)
    ops = json.loads(base64.b64decode(response["patch"]))
    out = jsonpatch.apply_patch(pod, ops)
    kubernetes_validate.validate(out, K8S_SCHEMA_VERSION, strict=True)
    golden = GOLDEN / "out" / f"webhook-{kind}.patch.json"
    if os.environ.get("TULLE_UPDATE_GOLDEN") == "1":
        golden.write_text(json.dumps(ops, indent=2) + "\n")
    assert ops == json.loads(golden.read_text())


def test_a_namespace_opted_in_injects_its_pods_with_its_config(webhook, ca):
    pod = deployment_pod(namespace="meshed")
    uid, rev = review(pod, namespace="meshed")
    out = patched(pod, answer_of(*webhook.post(ca, json.dumps(rev).encode()), uid))
    proxy = out["spec"]["initContainers"][1]
    assert proxy["resources"]["limits"]["cpu"] == "500m"
    assert out["metadata"]["annotations"]["config.tulle.dev/proxy-cpu-limit"] == "500m"


def test_a_pod_not_opted_in_is_allowed_unchanged(webhook, ca):
    uid, rev = review(deployment_pod())
    response = answer_of(*webhook.post(ca, json.dumps(rev).encode()), uid)
    assert "patch" not in response


def test_a_service_gets_only_its_opaque_ports(webhook, ca):
    svc = k8s.V1Service(api_version="v1", kind="Service", metadata=k8s.V1ObjectMeta(name="db", namespace="shop"),
                        spec=k8s.V1ServiceSpec(ports=[k8s.V1ServicePort(port=5432, name="pg")], selector={"app": "db"}))
    uid, rev = review(svc, resource="services", kind="Service")
    out = patched(svc, answer_of(*webhook.post(ca, json.dumps(rev).encode()), uid))
    assert out["metadata"]["annotations"] == {"config.tulle.dev/opaque-ports": "5432"}
    assert out["spec"] == API.sanitize_for_serialization(svc)["spec"]


def test_updates_and_other_resources_are_allowed_untouched(webhook, ca):
    pod = deployment_pod(annotations={core.INJECT: "enabled"})
    for kw in ({"operation": "UPDATE"}, {"resource": "configmaps", "kind": "ConfigMap"}):
        uid, rev = review(pod, **kw)
        assert "patch" not in answer_of(*webhook.post(ca, json.dumps(rev).encode()), uid)


def test_keep_alive_serves_many_reviews_on_one_connection(webhook, ca):
    conn = webhook.connection(ca)
    for _ in range(5):
        uid, rev = review(deployment_pod(annotations={core.INJECT: "enabled"}))
        assert "patch" in answer_of(*webhook.post(ca, json.dumps(rev).encode(), conn=conn), uid)
    conn.close()


@pytest.mark.parametrize("body,reason,fragment", [
    (b"{not json", "malformed", b"not JSON"),
    (b"[1, 2, 3]", "malformed", b"not an AdmissionReview"),
    (json.dumps(review(deployment_pod(), api_version="admission.k8s.io/v1beta1")[1]).encode(), "version",
     b"admission.k8s.io/v1beta1"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}).encode(),
     "malformed", b"no request with a uid"),
    (b"\xff\xfe\x00garbage", "malformed", b"not JSON"),
])
def test_a_malformed_or_wrong_version_review_gets_400_and_a_reason(webhook, ca, body, reason, fragment):
    before = metric("tulle_injector_bad_requests_total", reason=reason)
    status, out = webhook.post(ca, body)
    assert status == 400 and fragment in out
    assert metric("tulle_injector_bad_requests_total", reason=reason) == before + 1
    uid, rev = review(deployment_pod(annotations={core.INJECT: "enabled"}))  # and it keeps serving
    assert "patch" in answer_of(*webhook.post(ca, json.dumps(rev).encode()), uid)


def test_garbage_inside_a_well_formed_review_is_allowed_without_a_patch(webhook, ca):
    uid, rev = review(deployment_pod(annotations={core.INJECT: "enabled"}))
    rev["request"]["object"]["spec"]["containers"] = "not a list"
    rev["request"]["object"]["metadata"]["annotations"] = {core.INJECT: "enabled"}
    response = answer_of(*webhook.post(ca, json.dumps(rev).encode()), uid)
    assert "patch" not in response
    rev["request"]["object"]["spec"] = None
    assert "patch" not in answer_of(*webhook.post(ca, json.dumps(rev).encode()), uid)


def test_an_oversized_review_is_refused_before_it_is_read(lt, ca):
    cert = ServingCertificate()
    cert.load(*make_serving(ca, "small"), "test")
    hook = Webhook(lt, AdmissionHandler(values()), cert, max_body=4096)
    try:
        before = metric("tulle_injector_bad_requests_total", reason="too_large")
        conn = hook.connection(ca)
        conn.putrequest("POST", "/")
        conn.putheader("Content-Length", str(10 * 1024 * 1024))
        conn.endheaders()
        conn.send(b"x" * 1024)  # the rest never comes: the answer must not wait for it
        resp = conn.getresponse()
        assert resp.status == 413 and b"larger than 4096 bytes" in resp.read()
        assert metric("tulle_injector_bad_requests_total", reason="too_large") == before + 1
    finally:
        hook.close()


@pytest.mark.parametrize("method,path,headers,status", [
    ("GET", "/", {}, 405), ("POST", "/mutate", {"Content-Length": "2"}, 404),
    ("POST", "/", {"Transfer-Encoding": "chunked"}, 411), ("POST", "/", {"Content-Length": "-1"}, 400),
])
def test_other_requests_get_a_protocol_correct_refusal(webhook, ca, method, path, headers, status):
    conn = webhook.connection(ca)
    conn.putrequest(method, path, skip_accept_encoding=True)
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    assert conn.getresponse().status == status


def test_a_client_without_tls_gets_no_answer_and_the_server_keeps_serving(webhook, ca):
    with socket.create_connection(("127.0.0.1", webhook.server.port), timeout=5) as s:
        s.sendall(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        assert b"HTTP/1.1 200" not in s.recv(4096)
    uid, rev = review(deployment_pod())
    answer_of(*webhook.post(ca, json.dumps(rev).encode()), uid)


def served_cn(port: int, ca) -> str:
    ctx = client_context(ca)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname=SERVICE_DNS) as tls:
        return dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]


def test_a_new_certificate_is_served_without_a_restart_and_a_bad_one_is_refused(webhook, ca):
    assert served_cn(webhook.server.port, ca) == "first"
    assert webhook.cert.load(*make_serving(ca, "second"), "test")
    assert served_cn(webhook.server.port, ca) == "second"
    cert, _ = make_serving(ca, "third")
    _, other_key = make_serving(ca, "unrelated")
    assert not webhook.cert.load(cert, other_key, "test")  # a key that does not match
    assert served_cn(webhook.server.port, ca) == "second"


# --- the Kubernetes API ----------------------------------------------------------------------------------


def test_namespaces_and_owners_come_from_the_kubernetes_api(lt, ca):
    with FakeKube() as kube:
        kube.apply({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": "shop", "annotations": {core.INJECT: "enabled"}}})
        kube.apply({"apiVersion": "batch/v1", "kind": "Job", "metadata": {
            "name": "report-28911", "namespace": "shop", "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "CronJob", "name": "report", "uid": "u1", "controller": True}]}})
        lookups = KubeLookups(k8s.ApiClient(kube.configuration()))
        handler = AdmissionHandler(values(), namespace_annotations=lookups.namespace_annotations,
                                   owner_of=lookups.owner_of)
        pod = deployment_pod()
        pod.metadata.owner_references = [k8s.V1OwnerReference(api_version="batch/v1", kind="Job", name="report-28911",
                                                              uid="u2", controller=True)]
        uid, rev = review(pod)
        out = patched(pod, answer_of(*handler_answer(handler, rev), uid))
        assert out["metadata"]["labels"]["tulle.dev/proxy-cronjob"] == "report"
        assert out["metadata"]["annotations"][core.INJECT] == "enabled"  # copied from the namespace
        # A namespace the API cannot tell about: allowed, not injected, and said so.
        uid, rev = review(deployment_pod(namespace="gone"), namespace="gone")
        response = answer_of(*handler_answer(handler, rev), uid)
        assert "patch" not in response and "could not be read" in response["warnings"][0]


def handler_answer(handler, rev) -> tuple[int, bytes]:
    a = handler.handle(json.dumps(rev).encode())
    return a.status, a.body


# --- the process -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_service_process_serves_reviews_and_reloads_its_certificate_files(tmp_path, ca):
    cert, key = make_serving(ca, "first")
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.injector", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
         "--tls-cert", str(tmp_path / "tls.crt"), "--tls-key", str(tmp_path / "tls.key"),
         "--trust-anchors", str(GOLDEN / "trust-anchors.pem"), "--nats", f"nats://127.0.0.1:{free_port()}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def answered():
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(ca), timeout=5)
                conn.connect = _connect_with_sni(conn)
                uid, rev = review(deployment_pod(annotations={core.INJECT: "enabled"}))
                conn.request("POST", "/", body=json.dumps(rev).encode())
                resp = conn.getresponse()
                return resp.status == 200 and "patch" in json.loads(resp.read())["response"]
            except OSError:
                return False

        # Without a bus the webhook still injects: NATS only carries its events.
        wait_until(answered, timeout=30, what="the webhook answering")
        new_cert, new_key = make_serving(ca, "rotated")
        (tmp_path / "tls.key.new").write_bytes(new_key)
        (tmp_path / "tls.crt.new").write_bytes(new_cert)
        os.replace(tmp_path / "tls.key.new", tmp_path / "tls.key")
        os.replace(tmp_path / "tls.crt.new", tmp_path / "tls.crt")
        wait_until(lambda: served_cn(port, ca) == "rotated", timeout=30, what="the rotated certificate")
        assert answered()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_the_service_refuses_missing_flags_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "services.injector", "--tls-cert", str(tmp_path / "nope.crt"),
                          "--tls-key", str(tmp_path / "nope.key"), "--trust-anchors", str(GOLDEN / "trust-anchors.pem")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == f"tulle injector: {tmp_path / 'nope.crt'}: no such file (--tls-cert / --tls-key)"


def _post_review(port: int, ca, obj) -> dict:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(ca), timeout=10)
    conn.connect = _connect_with_sni(conn)
    uid, rev = review(obj)
    conn.request("POST", "/", body=json.dumps(rev).encode(), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return answer_of(resp.status, resp.read(), uid)


async def test_the_service_reports_each_pod_it_injects_or_skips_as_a_cloudevent_on_the_bus(nats_server, tmp_path, ca):
    """`python -m services.injector` with the injector role's credential (as the chart runs
    it), real AdmissionReviews over HTTPS, and the events read back as the observer role."""
    from tests.service_process import ServiceProcess

    cert, key = make_serving(ca, "events")
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    port = free_port()
    observer = bus_for(nats_server.url, "observer")
    await observer.start()
    events: asyncio.Queue = asyncio.Queue()

    async def on_event(msg):
        await events.put(schemas.decode_event(msg.data))

    await observer.subscribe_raw("tulle.events.injector.>", on_event)
    await observer.sync()
    injector = ServiceProcess("injector", nats_server.url, [
        "--listen", f"127.0.0.1:{port}", "--tls-cert", str(tmp_path / "tls.crt"), "--tls-key", str(tmp_path / "tls.key"),
        "--trust-anchors", str(GOLDEN / "trust-anchors.pem")], tmp_path / "injector.log").start()
    try:
        await injector.ready_soon(30)  # the certificate loaded, the listener up, the bus reached
        opted_in = deployment_pod(name="web-5d4f7b9c8-ev001", annotations={core.INJECT: "enabled"})
        assert "patch" in await asyncio.to_thread(_post_review, port, ca, opted_in)
        on_host = deployment_pod(name="web-5d4f7b9c8-ev002", annotations={core.INJECT: "enabled"}, host_network=True)
        assert "patch" not in await asyncio.to_thread(_post_review, port, ca, on_host)

        got = {}
        while len(got) < 2:
            ev = await asyncio.wait_for(events.get(), 20)
            if ev.type.endswith(".ready"):
                continue
            got[ev.type] = ev
        injected = got["dev.tulle.injector.injected"]
        assert injected.subject == "shop/web-5d4f7b9c8-ev001" and injected.source.startswith("/tulle/injector/")
        assert injected.data == {"namespace": "shop", "pod": "web-5d4f7b9c8-ev001", "owner_kind": "deployment",
                                 "owner_name": "web", "proxy_version": __version__, "replaced_version": ""}
        skipped = got["dev.tulle.injector.injection-skipped"]
        assert skipped.subject == "shop/web-5d4f7b9c8-ev002"
        assert skipped.data == {"namespace": "shop", "pod": "web-5d4f7b9c8-ev002", "owner_kind": "deployment",
                                "owner_name": "web", "reason": "hostNetwork is enabled"}
        # Kept in the event stream too, for readers that come later.
        js = observer.nc.jetstream()
        kept = await js.get_last_msg(schemas.EVENTS_STREAM, "tulle.events.injector.injection-skipped")
        assert schemas.decode_event(kept.data).id == skipped.id
    finally:
        await observer.close()
        assert injector.stop() == 0, injector.log.read_text()[-2000:]
