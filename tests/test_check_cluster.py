"""`tulle check` against a cluster: the real `tulle` command, the official client, and
the fake API server holding a Tulle installation built from the client's models
(tests/installation_objects.py). Each test breaks one thing the way it breaks in a
cluster and reads what the command says about it."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess

import pytest

from tests.fakekube import FakeKube
from tests.installation_objects import Installation
from tests.local_support import TULLE
from tulle import pki

OK, WARN, ERR = "\u221a", "\u203c", "\u00d7"


@pytest.fixture
def kube():
    server = FakeKube().start()
    yield server
    server.stop()


@pytest.fixture
def install(kube):
    return Installation().apply_to(kube)


def tulle_check(kube: FakeKube, tmp_path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    env = {k: v for k, v in os.environ.items() if k not in ("TULLE_STATE_DIR", "KUBECONFIG")}
    env["TULLE_STATE_DIR"] = str(tmp_path / "no-local-run")
    return subprocess.run([TULLE, "check", "--kubeconfig", kubeconfig, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def json_checks(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    doc = json.loads(proc.stdout)
    return {c["description"]: dict(c, category=cat["categoryName"]) for cat in doc["categories"] for c in cat["checks"]}


def test_a_healthy_installation_is_silent_but_for_the_summary_in_short_output(kube, install, tmp_path):
    kube.apply(install.meshed_pod("web-7d9f-abcde"))
    proc = tulle_check(kube, tmp_path, "-o", "short", "--proxy", "--wait", "0s")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"Status check results are {OK}\n", "")


def test_the_table_has_linkerds_categories_in_order_each_check_passing(kube, install, tmp_path):
    proc = tulle_check(kube, tmp_path, "--wait", "0s")
    assert proc.returncode == 0, proc.stdout
    headers = [line for i, line in enumerate(proc.stdout.splitlines()[:-1])
               if i + 1 < len(proc.stdout.splitlines()) and set(proc.stdout.splitlines()[i + 1]) == {"-"}]
    assert headers == ["kubernetes-api", "kubernetes-version", "tulle-existence", "tulle-config", "tulle-identity",
                       "tulle-webhooks-and-apisvc-tls", "tulle-version"]
    assert WARN not in proc.stdout and ERR not in proc.stdout
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
