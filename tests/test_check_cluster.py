"""`tulle check` against a cluster: the real `tulle` command, the official client, and
the fake API server holding a Tulle installation built from the client's models
(tests/installation_objects.py). Each test breaks one thing the way it breaks in a
cluster and reads what the command says about it.

Behind the fake API server's `tulle-nats-*` pods runs a real three-node JetStream cluster
with the chart's TLS certificate and the bus's Secrets (the CLI reaches it through
pods/portforward as the observer, as every command does); its streams are made with three
copies by the services' roles, as in a cluster of three NATS servers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import json
import os
import subprocess
import threading
import time

import pytest

from tests.bus_support import TESTER, MeshNatsCluster
from tests.conftest import wait_until
from tests.fakekube import FakeKube
from tests.installation_objects import Installation, as_api, meta
from tests.local_support import TULLE
from tests.test_check_nats import make_stores, remake, started
from tulle import __version__, busauth, installation, natsjwt, pki, schemas
from tulle.bus import Bus
from tulle.install.material import generate_nats_tls

OK, WARN, ERR = "\u221a", "\u203c", "\u00d7"
NS = installation.CONTROL_PLANE_NAMESPACE


@pytest.fixture(scope="module")
def nats(tmp_path_factory):
    """Three TLS nats-servers with the certificate `tulle install` makes (it names the
    Services, not 127.0.0.1: every client here expects the Service's name, as the CLI does
    through a port-forward)."""
    base = tmp_path_factory.mktemp("cluster-nats")
    tls = generate_nats_tls(NS, "cluster.local")
    for name, pem in (("ca.crt", tls.ca_pem), ("tls.crt", tls.crt_pem), ("tls.key", tls.key_pem)):
        (base / name).write_text(pem)
    cluster = MeshNatsCluster(base / "nats", with_callout=False, tls=busauth.TLSFiles(
        str(base / "tls.crt"), str(base / "tls.key"), str(base / "ca.crt"))).start()
    cluster.tls_material = tls
    try:
        asyncio.run(make_stores(bus_of(cluster), 3))
        yield cluster
    finally:
        cluster.close()


def bus_of(cluster):
    """(role, replicas) -> a Bus dialing the nodes directly, by the certificate's name."""
    def make(role: str, replicas: int = 1) -> Bus:
        creds = dataclasses.replace(cluster.credentials(role), ca_file=cluster.tls.ca_file,
                                    tls_hostname=installation.nats_tls_name(NS))
        return Bus(cluster.url, component=role, credentials=creds, replicas=replicas)
    return make


@pytest.fixture
def kube():
    server = FakeKube().start()
    yield server
    server.stop()


def secret(name: str, data: dict[str, str]) -> dict:
    from kubernetes import client

    return as_api(client.V1Secret(metadata=meta(name, NS), type="Opaque",
                                  data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()}), "v1", "Secret")


def connect_nats(kube: FakeKube, nats) -> None:
    """What `tulle install` adds for the bus: its credentials and TLS Secrets; each NATS pod's
    client port is one node of the cluster."""
    seeds = {role: natsjwt.read_seed(nats.seed_file(role)).decode() for role in busauth.STATIC_ROLES}
    kube.apply(secret(installation.NATS_CREDENTIALS_SECRET, seeds))
    kube.apply(secret(installation.NATS_TLS_SECRET, {"ca.crt": nats.tls_material.ca_pem,
                                                     "tls.crt": nats.tls_material.crt_pem,
                                                     "tls.key": nats.tls_material.key_pem}))
    for i, node in enumerate(nats.nodes):
        kube.forward_pod_port(NS, f"tulle-nats-{i}", installation.NATS_CLIENT_PORT, node.address)


@pytest.fixture
def install(kube, nats):
    made = Installation().apply_to(kube)
    connect_nats(kube, nats)
    return made


def heartbeat(install: Installation, pod: str, namespace: str = "demo", **fields) -> schemas.ProxyHeartbeat:
    hb = dict(namespace=namespace, workload=pod, version=__version__, ready=True,
              identity=schemas.identity_name("default", namespace), cert_expiry=time.time() + 20 * 3600,
              time=time.time(), trust_anchors=pki.cert_fingerprints(install.anchor.cert_pem))
    hb.update(fields)
    return schemas.ProxyHeartbeat(**hb)


@contextlib.contextmanager
def proxies_beating(nats, *heartbeats: schemas.ProxyHeartbeat):
    """These proxies' heartbeats in tulle-proxies, written again every 2 s until the block ends,
    as proxies write theirs (every 5 s; an entry expires 15 s after it was written, and one
    `tulle check` on a busy machine may take longer than that). Written by the harness's
    user: the proxies are not what is under test."""
    stop, written = threading.Event(), threading.Event()

    async def beat() -> None:
        async with started(bus_of(nats)(TESTER)) as bus:
            while True:
                for hb in heartbeats:
                    await bus.put(schemas.PROXIES_BUCKET, schemas.proxy_key(hb.namespace, hb.workload), hb,
                                  create=False)
                written.set()
                if await asyncio.to_thread(stop.wait, 2.0):
                    return

    thread = threading.Thread(target=lambda: asyncio.run(beat()), name="heartbeats", daemon=True)
    thread.start()
    try:
        assert written.wait(30), "the heartbeats were not written"
        yield
    finally:
        stop.set()
        thread.join(10)


def tulle_check(kube: FakeKube, tmp_path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    env = {k: v for k, v in os.environ.items() if k not in ("TULLE_STATE_DIR", "KUBECONFIG")}
    env["TULLE_STATE_DIR"] = str(tmp_path / "no-local-run")
    return subprocess.run([TULLE, "check", "--kubeconfig", kubeconfig, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def json_checks(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    doc = json.loads(proc.stdout)
    return {c["description"]: dict(c, category=cat["categoryName"]) for cat in doc["categories"] for c in cat["checks"]}


def test_a_healthy_installation_is_silent_but_for_the_summary_in_short_output(kube, install, nats, tmp_path):
    kube.apply(install.meshed_pod("web-7d9f-abcde"))
    with proxies_beating(nats, heartbeat(install, "web-7d9f-abcde")):
        proc = tulle_check(kube, tmp_path, "-o", "short", "--proxy", "--wait", "0s")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"Status check results are {OK}\n", ""), proc.stdout


def test_the_table_has_linkerds_categories_in_order_each_check_passing(kube, install, tmp_path):
    proc = tulle_check(kube, tmp_path, "--wait", "0s")
    assert proc.returncode == 0, proc.stdout
    headers = [line for i, line in enumerate(proc.stdout.splitlines()[:-1])
               if i + 1 < len(proc.stdout.splitlines()) and set(proc.stdout.splitlines()[i + 1]) == {"-"}]
    assert headers == ["kubernetes-api", "kubernetes-version", "tulle-existence", "tulle-config", "tulle-nats",
                       "tulle-identity", "tulle-webhooks-and-apisvc-tls", "tulle-version", "tulle-control-plane-proxy"]
    assert WARN not in proc.stdout and ERR not in proc.stdout
    for line in ("can connect to NATS", "JetStream is enabled", "the NATS cluster is healthy",
                 "the buckets' replicas match the NATS cluster", "the control plane runs without proxies, by design"):
        assert f"{OK} {line}\n" in proc.stdout
    # The control plane carries no proxy: the checks of its proxies do not apply.
    assert "control plane proxies are healthy" not in proc.stdout
    assert proc.stdout.endswith(f"\nStatus check results are {OK}\n")


def test_json_output_is_linkerds_document(kube, install, tmp_path):
    proc = tulle_check(kube, tmp_path, "-o", "json", "--proxy", "--wait", "0s")
    doc = json.loads(proc.stdout)
    assert doc["success"] is True and doc["categories"][0]["categoryName"] == "kubernetes-api"
    assert doc["categories"][-1]["categoryName"] == "tulle-data-plane"
    assert {"description": "can query the Kubernetes API", "result": "success"} in doc["categories"][0]["checks"]


def test_an_api_that_does_not_answer_is_an_error_and_nothing_after_it_runs(kube, tmp_path):
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    kube.stop()
    env = dict(os.environ, TULLE_STATE_DIR=str(tmp_path / "none"))
    proc = subprocess.run([TULLE, "check", "--kubeconfig", kubeconfig, "-o", "short", "--wait", "0s"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    assert f"{ERR} can query the Kubernetes API" in proc.stdout and "Connection refused" in proc.stdout
    assert "hint: " in proc.stdout and "tulle-existence" not in proc.stdout


def test_an_unknown_context_is_an_error_of_the_client_with_a_hint(kube, install, tmp_path):
    proc = tulle_check(kube, tmp_path, "--context", "nowhere", "-o", "json", "--wait", "0s")
    checks = json_checks(proc)
    assert proc.returncode == 1 and list(checks) == ["can initialize the client"]
    assert "nowhere" in checks["can initialize the client"]["error"] and "--context" in checks["can initialize the client"]["hint"]


def test_a_deployment_not_ready_names_it_and_wait_retries_until_it_is(kube, install, tmp_path):
    kube.apply(install.deployment("tulle-identity", ["identity"], ready=0))
    proc = tulle_check(kube, tmp_path, "-o", "short", "--wait", "0s")
    assert proc.returncode == 1
    assert f"{ERR} control plane Deployments are ready\n    Deployment tulle-identity: 0/1 replicas ready" in proc.stdout

    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    waiting = subprocess.Popen([TULLE, "check", "--kubeconfig", kubeconfig, "-o", "short", "--wait", "2m"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, TULLE_STATE_DIR=str(tmp_path / "none")))
    try:
        said = waiting.stderr.readline()  # the command says what it waits for before it sleeps
        assert said.startswith("waiting for: control plane Deployments are ready")
        kube.apply(install.deployment("tulle-identity", ["identity"], ready=1))
        out, _ = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert (waiting.returncode, out) == (0, f"Status check results are {OK}\n")


def test_a_crashing_control_plane_pod_is_named_with_its_reason(kube, install, tmp_path):
    kube.apply(install.pod("tulle-identity-6c4b9d7f8-q7w2e", "identity", ["identity"], ready=False,
                           waiting="CrashLoopBackOff"))
    checks = json_checks(tulle_check(kube, tmp_path, "-o", "json", "--wait", "0s"))
    pods = checks["control plane pods are running"]
    assert pods["result"] == "error"
    assert pods["error"] == "tulle-identity-6c4b9d7f8-q7w2e: container identity waiting: CrashLoopBackOff"
    assert "tulle logs" in pods["hint"]


def test_a_missing_namespace_is_fatal_with_the_install_hint(kube, tmp_path):
    proc = tulle_check(kube, tmp_path, "-o", "short", "--wait", "0s")
    assert proc.returncode == 1
    assert f"{ERR} control plane namespace exists\n    the namespace tulle does not exist" in proc.stdout
    assert "tulle install" in proc.stdout and "tulle-config" not in proc.stdout


def test_an_issuer_expiring_within_60_days_is_a_warning_and_does_not_fail(kube, install, tmp_path):
    short_lived = pki.new_issuer(install.anchor, lifetime=dt.timedelta(days=30))
    kube.apply(install.issuer_secret(short_lived))
    proc = tulle_check(kube, tmp_path, "-o", "short", "--wait", "0s")
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"tulle-identity\n--------------\n{WARN} issuer cert is valid for at least 60 days\n"
                                  f"    issuer certificate expires on {short_lived.cert.not_valid_after_utc:%Y-%m-%d}")
    assert "Secret tulle/tulle-identity-issuer" in proc.stdout  # the hint says where to put the new one
    assert proc.stdout.endswith(f"Status check results are {OK}\n")


def test_an_issuer_of_another_anchor_and_a_missing_key_are_errors(kube, install, tmp_path):
    kube.apply(install.issuer_secret(pki.new_issuer(pki.new_trust_anchor())))
    checks = json_checks(tulle_check(kube, tmp_path, "-o", "json", "--wait", "0s"))
    assert checks["issuer cert is issued by the trust anchor"]["result"] == "error"
    kube.apply(install.issuer_secret(drop=("tls.key",)))
    checks = json_checks(tulle_check(kube, tmp_path, "-o", "json", "--wait", "0s"))
    assert checks["the issuer Secret exists"]["error"] == "Secret tulle/tulle-identity-issuer lacks tls.key"


def test_trust_roots_without_their_key_are_an_error(kube, install, tmp_path):
    roots = install.trust_roots()
    roots["data"] = {"other.crt": roots["data"]["ca-bundle.crt"]}
    kube.apply(roots)
    checks = json_checks(tulle_check(kube, tmp_path, "-o", "json", "--wait", "0s"))
    assert checks["the trust roots ConfigMap exists"]["error"] == \
        "ConfigMap tulle/tulle-identity-trust-roots has no key ca-bundle.crt"


def test_a_webhook_ca_bundle_that_does_not_verify_the_injector_cert_is_an_error(kube, install, tmp_path):
    kube.apply(install.webhook(ca_bundle=pki.new_trust_anchor("other").cert_pem))
    checks = json_checks(tulle_check(kube, tmp_path, "-o", "json", "--wait", "0s"))
    hook = checks["proxy-injector webhook configuration trusts the cert"]
    assert hook["result"] == "error" and "does not verify the certificate" in hook["error"]
    assert checks["proxy-injector webhook has valid cert"]["result"] == "success"


def test_an_injector_cert_for_another_name_or_expiring_soon_is_said(kube, install, tmp_path):
    cert, _ = install.webhook_cert("someone-else.tulle.svc")
    kube.apply(install.injector_secret(cert))
    checks = json_checks(tulle_check(kube, tmp_path, "-o", "json", "--wait", "0s"))
    assert "does not name tulle-proxy-injector.tulle.svc" in checks["proxy-injector webhook has valid cert"]["error"]
    soon, _ = install.webhook_cert("tulle-proxy-injector.tulle.svc", lifetime=dt.timedelta(days=10))
    kube.apply(install.injector_secret(soon))
    checks = json_checks(tulle_check(kube, tmp_path, "-o", "json", "--wait", "0s"))
    assert checks["proxy-injector cert is valid for at least 60 days"]["result"] == "warning"


def test_a_control_plane_of_another_version_is_a_warning_naming_its_containers(kube, install, tmp_path):
    kube.apply(install.deployment("tulle-identity", ["identity"], version="0.0.9"))
    checks = json_checks(tulle_check(kube, tmp_path, "-o", "json", "--wait", "0s"))
    version = checks["control plane and cli versions match"]
    assert version["result"] == "warning" and version["error"].startswith("tulle-identity/identity runs 0.0.9")


def test_proxy_checks_name_the_pod_not_ready_the_foreign_anchors_and_the_old_version(kube, install, tmp_path):
    kube.apply(install.meshed_pod("web-1", waiting="CrashLoopBackOff", ready=False))
    kube.apply(install.meshed_pod("books-1", anchors_pem=pki.new_trust_anchor().cert_pem, native_sidecar=True))
    kube.apply(install.meshed_pod("authors-1", proxy_version="0.0.9"))
    kube.apply(install.pod("unmeshed-1", "none", ["app"]) | {"metadata": {"name": "unmeshed-1", "namespace": "demo"}})
    checks = json_checks(tulle_check(kube, tmp_path, "-o", "json", "--proxy", "--wait", "0s"))
    assert checks["data plane proxies are ready"]["error"] == "demo/web-1: tulle-proxy waiting: CrashLoopBackOff"
    assert "tulle logs -n demo web-1 --container tulle-proxy" in checks["data plane proxies are ready"]["hint"]
    assert checks["data plane proxies trust the installation's anchors"] == {
        "description": "data plane proxies trust the installation's anchors", "category": "tulle-data-plane",
        "result": "error", "error": "trust none of the installation's anchors: demo/books-1",
        "hint": checks["data plane proxies trust the installation's anchors"]["hint"]}
    assert checks["data plane and cli versions match"]["error"].startswith("demo/authors-1 runs 0.0.9")


def test_pre_on_an_empty_cluster_passes_every_check(kube, tmp_path):
    proc = tulle_check(kube, tmp_path, "--pre", "--wait", "0s")
    assert proc.returncode == 0, proc.stdout
    for line in ("can create non-namespaced resources", "can create Deployments", "can read Secrets",
                 "control plane namespace does not already exist", "Tulle CRDs are absent or compatible"):
        assert f"{OK} {line}\n" in proc.stdout


def test_pre_says_which_permission_is_missing_and_which_crd_is_incompatible(kube, install, tmp_path):
    fresh = FakeKube().start()
    try:
        fresh.deny_access("create", "customresourcedefinitions", group="apiextensions.k8s.io")
        fresh.deny_access("create", "secrets", namespace="tulle")
        fresh.apply(install.crd("servers.policy.tulle.dev", versions=("v1beta3",)))
        fresh.apply(install.crd("serviceprofiles.tulle.dev"))  # the same version: compatible
        checks = json_checks(tulle_check(fresh, tmp_path, "--pre", "-o", "json", "--wait", "0s"))
    finally:
        fresh.stop()
    assert "cannot create customresourcedefinitions.apiextensions.k8s.io" in \
        checks["can create non-namespaced resources"]["error"]
    assert checks["can create Secrets"]["error"].startswith("cannot create secrets in tulle")
    assert checks["can create ConfigMaps"]["result"] == "success"
    crds = checks["Tulle CRDs are absent or compatible"]
    assert crds["error"] == "servers.policy.tulle.dev exists but does not serve v1alpha1 (it serves v1beta3)"
    # ... and on the installed cluster, the namespace is there already.
    checks = json_checks(tulle_check(kube, tmp_path, "--pre", "-o", "json", "--wait", "0s"))
    assert checks["control plane namespace does not already exist"]["result"] == "error"


def test_an_old_kubernetes_is_an_error(kube, install, tmp_path):
    kube.server_version = dict(kube.server_version, minor="21", gitVersion="v1.21.14")
    checks = json_checks(tulle_check(kube, tmp_path, "-o", "json", "--wait", "0s"))
    assert checks["is running the minimum Kubernetes API version"]["error"] == \
        "Kubernetes v1.21.14 is older than 1.22"


def test_a_bad_wait_duration_is_one_line_and_exit_2(kube, tmp_path):
    proc = tulle_check(kube, tmp_path, "--wait", "soon")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "tulle: --wait: expected a duration such as '30s', '5m' or '0s', got 'soon'\n"


# --- tulle-nats, tulle-control-plane-proxy, and the proxies' certificates -----------------------------


def test_nats_unreachable_is_an_error_with_a_hint(kube, nats, tmp_path):
    Installation().apply_to(kube)
    connect_nats(kube, nats)
    kube.forward_pod_port(NS, "tulle-nats-0", installation.NATS_CLIENT_PORT, ("127.0.0.1", 1))  # nothing listens
    proc = tulle_check(kube, tmp_path, "-o", "json", "--wait", "0s")
    checks = json_checks(proc)
    assert proc.returncode == 1
    connect = checks["can connect to NATS"]
    assert connect["result"] == "error" and connect["category"] == "tulle-nats"
    assert connect["error"].startswith(f"cannot connect to the NATS of namespace {NS} (")
    assert f"cannot reach NATS through a port-forward to pod {NS}/tulle-nats-0 port 4222" in connect["error"]
    assert "kubectl auth can-i create pods/portforward -n tulle" in connect["hint"]
    # Nothing more is said of a bus the check could not read.
    assert "JetStream is enabled" not in checks and "the NATS cluster is healthy" not in checks


def test_a_bucket_with_fewer_replicas_than_the_nats_servers_is_a_warning_with_a_hint(kube, install, nats, tmp_path):
    asyncio.run(remake(bus_of(nats), schemas.PROFILES_BUCKET, 1))
    try:
        proc = tulle_check(kube, tmp_path, "-o", "short", "--wait", "0s")
    finally:
        asyncio.run(remake(bus_of(nats), schemas.PROFILES_BUCKET, 3))
    assert proc.returncode == 0, proc.stdout  # a warning does not fail the check
    assert proc.stdout.startswith(
        "tulle-nats\n----------\n"
        f"{WARN} the buckets' replicas match the NATS cluster\n"
        "    KV_tulle-profiles keeps 1 copy, not 3\n"
        "    the installation runs 3 NATS servers, so each stream should keep 3\n"
        "    hint: a stream keeps the copies it was made with")
    assert "`nats stream edit STREAM --replicas 3` for KV_tulle-profiles" in proc.stdout


def test_a_control_plane_pod_with_a_proxy_is_said_with_its_health_and_version(kube, install, tmp_path):
    kube.apply(install.meshed_pod("tulle-identity-6c4b9d7f8-q7w2e", namespace=NS, ready=False, waiting="CrashLoopBackOff",
                                  proxy_version="0.0.9"))
    checks = json_checks(tulle_check(kube, tmp_path, "-o", "json", "--wait", "0s"))
    unmeshed = checks["the control plane runs without proxies, by design"]
    assert unmeshed["category"] == "tulle-control-plane-proxy" and unmeshed["result"] == "warning"
    assert unmeshed["error"] == "tulle-identity-6c4b9d7f8-q7w2e: carries a tulle-proxy container"
    assert "tulle.dev/inject: disabled" in unmeshed["hint"]
    healthy = checks["control plane proxies are healthy"]
    assert healthy["error"] == "tulle-identity-6c4b9d7f8-q7w2e: tulle-proxy waiting: CrashLoopBackOff"
    assert checks["control plane proxies and cli versions match"]["error"].startswith(
        "tulle-identity-6c4b9d7f8-q7w2e runs 0.0.9")


def with_identity(pod: dict, service_account: str, trust_domain: str = "cluster.local") -> dict:
    """The pod as the injector leaves it: its service account, the proxy told its trust domain."""
    pod["spec"]["serviceAccountName"] = service_account
    pod["spec"]["containers"][0]["env"].append({"name": "TULLE_PROXY_TRUST_DOMAIN", "value": trust_domain})
    return pod


def test_each_proxys_certificate_is_judged_from_its_heartbeat(kube, install, nats, tmp_path):
    for name in ("expired-1", "stranger-1", "foreign-1", "silent-1", "fine-1"):
        kube.apply(with_identity(install.meshed_pod(name), "web"))
    web = schemas.identity_name("web", "demo")
    with proxies_beating(
            nats, heartbeat(install, "expired-1", identity=web, cert_expiry=time.time() - 60),
            heartbeat(install, "stranger-1", identity=schemas.identity_name("books", "demo")),
            heartbeat(install, "foreign-1", identity=web,
                      trust_anchors=pki.cert_fingerprints(pki.new_trust_anchor().cert_pem)),
            heartbeat(install, "fine-1", identity=web)):
        proc = tulle_check(kube, tmp_path, "-o", "json", "--proxy", "--wait", "0s")
    checks = json_checks(proc)
    assert proc.returncode == 1
    certs = checks["data plane proxies have valid certificates"]
    lines = certs["error"].splitlines()
    assert lines[0].startswith("demo/expired-1: its certificate expired at ")
    assert lines[1:] == [
        "demo/foreign-1: its certificate does not chain to the installation's trust anchors (it was verified "
        "against the proxy's own, none of them the installation's)",
        f"demo/stranger-1: its certificate is for {schemas.identity_name('books', 'demo')}, not {web}"]
    assert "tulle logs -n demo expired-1 --container tulle-proxy" in certs["hint"]
    silent = checks["data plane proxies send heartbeats"]
    assert silent["result"] == "error" and silent["error"].startswith("demo/silent-1: no heartbeat in tulle-proxies")


def test_a_certificate_in_its_renewal_window_is_a_warning(kube, install, nats, tmp_path):
    kube.apply(install.meshed_pod("web-1"))
    # 24 h certificates are renewed with 7.2 h left.
    with proxies_beating(nats, heartbeat(install, "web-1", cert_expiry=time.time() + 2 * 3600)):
        proc = tulle_check(kube, tmp_path, "-o", "short", "--proxy", "--wait", "0s")
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["tulle-data-plane", "----------------", f"{WARN} data plane proxies have valid certificates"]
    assert lines[3].startswith("    demo/web-1: its certificate expires at ")
    assert lines[3].endswith("(in 2 hours) and was not renewed at 70 % of its life")


def dashboard_extensions(kube: FakeKube, tmp_path) -> dict:
    """The first report of `tulle check` the real `tulle dashboard --kubeconfig` pushes to a
    tab (its extensions page), read from its event stream as the browser reads it."""
    import re
    import urllib.request

    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    env = {k: v for k, v in os.environ.items() if k not in ("TULLE_STATE_DIR", "KUBECONFIG", "TULLE_NATS_URL")}
    env.update(TULLE_STATE_DIR=str(tmp_path / "no-local-run"), PYTHONUNBUFFERED="1")
    out = tmp_path / "dashboard.out"
    with open(out, "w") as f:
        proc = subprocess.Popen([TULLE, "dashboard", "--kubeconfig", kubeconfig, "--port", "0"], stdout=f,
                                stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: proc.poll() is not None or "Tulle dashboard: http" in out.read_text(), 60, 0.05,
                   "the dashboard listening")
        assert proc.poll() is None, out.read_text()
        url = re.search(r"http://\S+/", out.read_text()).group()
        with urllib.request.urlopen(url + "api/stream", timeout=120) as stream:
            event = ""
            for line in stream:
                if line.startswith(b"event: "):
                    event = line[7:].strip().decode()
                elif line.startswith(b"data: ") and event == "extensions":
                    data = json.loads(line[6:])
                    if data["check"] is not None:
                        return data
        raise AssertionError(f"the stream ended without a report: {out.read_text()}")
    finally:
        proc.terminate()
        proc.wait(15)


def test_the_dashboard_of_a_cluster_shows_what_tulle_check_says_the_bus_and_proxies_included(
        kube, install, nats, tmp_path):
    """The extensions page shows `tulle check --proxy`'s categories: the dashboard reads the
    API, and the cluster's NATS through a port-forward as the observer (its tulle-nats lines
    and each proxy's heartbeat). One proxy trusts other anchors: both say so, line for line."""
    for name in ("foreign-1", "fine-1"):
        kube.apply(with_identity(install.meshed_pod(name), "web"))
    web = schemas.identity_name("web", "demo")
    with proxies_beating(
            nats, heartbeat(install, "fine-1", identity=web),
            heartbeat(install, "foreign-1", identity=web,
                      trust_anchors=pki.cert_fingerprints(pki.new_trust_anchor().cert_pem))):
        page = dashboard_extensions(kube, tmp_path)
        cli = json.loads(tulle_check(kube, tmp_path, "-o", "json", "--proxy", "--wait", "0s").stdout)

    def said(doc: dict) -> list[tuple[str, str, str]]:
        return [(cat["categoryName"], c["description"], c["result"]) for cat in doc["categories"] for c in cat["checks"]]

    assert page["mode"] == "cluster" and page["error"] == ""
    assert said(page["check"]) == said(cli)
    shown = {(cat, description): result for cat, description, result in said(page["check"])}
    for line in ("can connect to NATS", "JetStream is enabled", "the NATS cluster is healthy",
                 "the buckets' replicas match the NATS cluster"):
        assert shown[("tulle-nats", line)] == "success"
    assert shown[("tulle-data-plane", "data plane proxies have valid certificates")] == "error"
    components = {c["name"]: c for c in page["components"]}
    assert components["tulle-nats"]["healthy"] and components["tulle-identity"]["healthy"]
