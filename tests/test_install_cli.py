"""`tulle install`, `upgrade` and `uninstall`, run as a user runs them: the real command,
its stdout piped to what `kubectl apply -f -` would read (checked against the Kubernetes
schemas), its stderr read for what it says; `upgrade` reads the installed trust from
tests/fakekube.py through the kubernetes client and a kubeconfig."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.chart_support import find, invalid_objects
from tests.fakekube import FakeKube
from tulle.install import material

TULLE = str(Path(sys.executable).with_name("tulle"))


def tulle(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "share"), "KUBECONFIG": str(home / "none")}
    return subprocess.run([TULLE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def objects_of(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def secret_data(obj: dict) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout[-500:], proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    h.mkdir()
    return h


def test_install_prints_valid_manifests_and_saves_the_trust_it_generated(home):
    proc = tulle("install", home=home)
    objects = objects_of(proc)
    assert invalid_objects(objects) == []
    assert objects[0]["kind"] == "Namespace" and objects[0]["metadata"]["name"] == "tulle"
    assert objects[-1]["kind"] == "MutatingWebhookConfiguration"  # created once the injector exists
    # stderr says what was generated and where the trust went; stdout is only manifests.
    said = proc.stderr.strip().splitlines()
    assert said[0].startswith("tulle: generated trust anchors and an identity issuer (valid 365 days); saved to ")
    where = Path(said[0].split("saved to ", 1)[1].split(" (", 1)[0])
    assert where.parent == home / "share" / "tulle" / "trust" and where.name.startswith("tulle-")
    assert "tulle: generated the bus credentials (one per control-plane role)" in said
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    assert sorted(p.name for p in where.iterdir()) == ["issuer.crt", "issuer.key", "trust-anchor.key",
                                                        "trust-anchors.crt"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in where.iterdir())
    # What was saved is what was installed, and the issuer chains to the anchors.
    anchors = (where / "trust-anchors.crt").read_text()
    assert find(objects, "ConfigMap", "tulle-identity-trust-roots")["data"]["ca-bundle.crt"] == anchors
    issuer = secret_data(find(objects, "Secret", "tulle-identity-issuer"))
    assert issuer["tls.crt"] == (where / "issuer.crt").read_text() and issuer["ca.crt"] == anchors
    material.check_trust(material.TrustMaterial(anchors, issuer["tls.crt"], issuer["tls.key"]))
    config = yaml.safe_load(find(objects, "ConfigMap", "tulle-config")["data"]["values"])
    assert config["identityTrustAnchorsPEM"] == anchors


def test_install_crds_prints_only_the_crds_and_generates_nothing(home):
    proc = tulle("install", "--crds", home=home)
    objects = objects_of(proc)
    assert {o["kind"] for o in objects} == {"CustomResourceDefinition"} and len(objects) == 3
    assert invalid_objects(objects) == []
    assert proc.stderr == "" and not (home / "share").exists()


def test_values_come_from_ha_then_files_then_set(home, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text("controllerReplicas: 4\nnats:\n  replicas: 5\nproxy:\n  defaultInboundPolicy: deny\n")
    proc = tulle("install", "--ha", "-f", str(values), "--set", "controllerReplicas=2", "--trust-dir",
                 str(tmp_path / "trust"), home=home)
    objects = objects_of(proc)
    assert invalid_objects(objects) == []
    assert find(objects, "Deployment", "tulle-identity")["spec"]["replicas"] == 2  # --set beats -f beats --ha
    assert find(objects, "StatefulSet", "tulle-nats")["spec"]["replicas"] == 5
    assert find(objects, "PodDisruptionBudget", "tulle-identity")["spec"]["maxUnavailable"] == 1  # from --ha
    assert find(objects, "MutatingWebhookConfiguration", "tulle-proxy-injector-webhook-config")[
        "webhooks"][0]["failurePolicy"] == "Fail"
    policy = next(c for c in find(objects, "Deployment", "tulle-destination")["spec"]["template"]["spec"]["containers"]
                  if c["name"] == "policy")
    assert "--default-policy=deny" in policy["args"]
    assert (tmp_path / "trust" / "issuer.crt").is_file()


def test_install_cni_adds_the_plugins_daemonset_and_tells_the_injector(home, tmp_path):
    objects = objects_of(tulle("install", "--cni", "--set", "proxy.uid=2500", "--trust-dir", str(tmp_path / "t"),
                               home=home))
    assert invalid_objects(objects) == []
    ds = find(objects, "DaemonSet", "tulle-cni")
    assert ds["metadata"]["namespace"] == "tulle-cni"
    assert find(objects, "Namespace", "tulle-cni")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == \
        "privileged"
    assert ds["spec"]["template"]["spec"]["containers"][0]["command"] == ["tulle-cni-install"]
    plugin = yaml.safe_load(find(objects, "ConfigMap", "tulle-cni-config")["data"]["plugin.json"])
    assert {k: plugin["proxy"][k] for k in ("inbound_port", "outbound_port", "admin_port", "uid")} == \
        {"inbound_port": 4143, "outbound_port": 4140, "admin_port": 4191, "uid": 2500}
    config = yaml.safe_load(find(objects, "ConfigMap", "tulle-config")["data"]["values"])
    assert config["cniEnabled"] is True
    # The CNI comes first: it must be on the nodes before meshed pods start.
    kinds = [(o["kind"], o["metadata"].get("namespace")) for o in objects]
    assert kinds.index(("DaemonSet", "tulle-cni")) < kinds.index(("Deployment", "tulle"))


def test_given_trust_files_are_used_and_checked(home, tmp_path):
    trust, _ = material.generate_trust("cluster.local")
    other, _ = material.generate_trust("cluster.local")
    (tmp_path / "ca.crt").write_text(trust.anchors_pem)
    (tmp_path / "issuer.crt").write_text(trust.issuer_crt_pem)
    (tmp_path / "issuer.key").write_text(trust.issuer_key_pem)
    (tmp_path / "other.key").write_text(other.issuer_key_pem)
    flags = ["--identity-trust-anchors-file", str(tmp_path / "ca.crt"),
             "--identity-issuer-certificate-file", str(tmp_path / "issuer.crt")]
    proc = tulle("install", *flags, "--identity-issuer-key-file", str(tmp_path / "issuer.key"), home=home)
    objects = objects_of(proc)
    assert find(objects, "ConfigMap", "tulle-identity-trust-roots")["data"]["ca-bundle.crt"] == trust.anchors_pem
    assert "trust anchors" not in proc.stderr and not (home / "share").exists()  # nothing generated, nothing saved
    bad = tulle("install", *flags, "--identity-issuer-key-file", str(tmp_path / "other.key"), home=home)
    assert one_line_error(bad) == ("tulle: identity.issuer.tls.keyPEM: does not belong to the certificate in "
                                   "identity.issuer.tls.crtPEM")
    only_anchors = tulle("install", "--identity-trust-anchors-file", str(tmp_path / "ca.crt"), home=home)
    assert "identity.issuer.tls.crtPEM: required with identityTrustAnchorsPEM" in one_line_error(only_anchors)
    missing = tulle("install", "--identity-trust-anchors-file", str(tmp_path / "nope.crt"), home=home)
    assert one_line_error(missing) == f"tulle: --identity-trust-anchors-file {tmp_path / 'nope.crt'}: cannot read: " \
                                      "No such file or directory"


@pytest.mark.parametrize("args, says", [
    (["--set", "webhookFailurePolicy=Never"],
     "tulle: tulle-control-plane values: at '/webhookFailurePolicy': value must be one of 'Ignore', 'Fail'"),
    (["--set", "nats.replicas=0"], "tulle: tulle-control-plane values: at '/nats/replicas': minimum: got 0, want 1"),
    (["--set", "proxy.opaquePorts=mysql"], "tulle: tulle-control-plane values: at '/proxy/opaquePorts'"),
    (["--set", "controlerReplicas=3"],
     "tulle: tulle-control-plane values: at '': additional properties 'controlerReplicas' not allowed"),
    (["-f", "/nonexistent/values.yaml"], "tulle: --values /nonexistent/values.yaml: cannot read: No such file"),
    (["--set", "nats.tls.caPEM=x"], "tulle: nats.tls: give caPEM, crtPEM and keyPEM together"),
])
def test_a_mistake_is_one_line_and_exit_2(home, args, says):
    assert one_line_error(tulle("install", *args, home=home)).startswith(says)
    assert not (home / "share").exists()  # nothing saved for an install that printed nothing


def test_a_values_file_that_is_not_yaml_is_named_with_its_line(home, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nats:\n  replicas: [3\n")
    line = one_line_error(tulle("install", "-f", str(bad), home=home))
    assert line.startswith(f"tulle: --values {bad}: line ") and "invalid YAML" in line


# --- upgrade --------------------------------------------------------------------------------------


@pytest.fixture
def kube():
    k = FakeKube().start()
    yield k
    k.stop()


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "admin", "user": {"token": "t"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "admin"}}],
    }))
    return path


def apply(kube: FakeKube, objects: list[dict]) -> None:
    """What `kubectl apply` would store, for the kinds upgrade reads back."""
    for obj in objects:
        if obj["kind"] in ("ConfigMap", "Secret"):
            kube.apply(obj)


def test_upgrade_keeps_the_installed_trust_bus_tls_and_credentials(home, tmp_path, kube):
    installed = objects_of(tulle("install", "--trust-dir", str(tmp_path / "trust"), home=home))
    apply(kube, installed)
    proc = tulle("upgrade", "--kubeconfig", str(kubeconfig(tmp_path / "kubeconfig", kube.url)), "--ha", home=home)
    upgraded = objects_of(proc)
    assert invalid_objects(upgraded) == []
    for kind, name in [("ConfigMap", "tulle-identity-trust-roots"), ("Secret", "tulle-identity-issuer"),
                       ("Secret", "tulle-nats-tls"), ("Secret", "tulle-nats-credentials")]:
        assert find(upgraded, kind, name)["data"] == find(installed, kind, name)["data"], name
    # The webhook's certificate is made anew, with the caBundle that trusts it.
    old_hook = find(installed, "Secret", "tulle-proxy-injector-k8s-tls")["data"]["tls.crt"]
    new_hook = find(upgraded, "Secret", "tulle-proxy-injector-k8s-tls")["data"]["tls.crt"]
    assert old_hook != new_hook
    assert find(upgraded, "Deployment", "tulle-identity")["spec"]["replicas"] == 3
    assert proc.stderr == ""  # nothing generated: everything trusted was kept
    assert not (home / "share").exists()
    reads = [path for method, path in kube.request_log if method == "GET"]
    assert "/api/v1/namespaces/tulle/configmaps/tulle-identity-trust-roots" in reads
    assert "/api/v1/namespaces/tulle/secrets/tulle-identity-issuer" in reads


def remembered(objects: list[dict]) -> dict:
    return yaml.safe_load(find(objects, "ConfigMap", "tulle-install-values")["data"]["values.yaml"])


def test_upgrade_keeps_the_values_of_the_install_and_puts_what_is_given_now_on_top(home, tmp_path, kube):
    """As Helm's --reuse-values: an installation made with --ha, a values file and --set, then
    upgraded with one new --set, keeps all of them; --reset-values starts from the chart's."""
    values = tmp_path / "values.yaml"
    values.write_text("proxy:\n  defaultInboundPolicy: deny\n")
    installed = objects_of(tulle("install", "--ha", "-f", str(values), "--set", "nats.replicas=5",
                                 "--trust-dir", str(tmp_path / "trust"), home=home))
    apply(kube, installed)
    kc = str(kubeconfig(tmp_path / "kubeconfig", kube.url))
    upgraded = objects_of(tulle("upgrade", "--kubeconfig", kc, "--set", "dashboard.enabled=true", home=home))
    assert invalid_objects(upgraded) == []
    assert find(upgraded, "Deployment", "tulle-identity")["spec"]["replicas"] == 3  # --ha
    assert find(upgraded, "PodDisruptionBudget", "tulle-identity")["spec"]["maxUnavailable"] == 1  # --ha
    assert find(upgraded, "StatefulSet", "tulle-nats")["spec"]["replicas"] == 5  # --set
    policy = next(c for c in find(upgraded, "Deployment", "tulle-destination")["spec"]["template"]["spec"][
        "containers"] if c["name"] == "policy")
    assert "--default-policy=deny" in policy["args"]  # -f
    assert find(upgraded, "Deployment", "tulle-dashboard")  # what this upgrade asked for
    # The next upgrade starts from this one's values: the dashboard is kept too.
    apply(kube, upgraded)
    again = objects_of(tulle("upgrade", "--kubeconfig", kc, "--set", "nats.replicas=3", home=home))
    assert find(again, "Deployment", "tulle-dashboard") and find(again, "StatefulSet", "tulle-nats")[
        "spec"]["replicas"] == 3
    reset = objects_of(tulle("upgrade", "--kubeconfig", kc, "--reset-values", home=home))
    assert find(reset, "Deployment", "tulle-identity")["spec"]["replicas"] == 1
    assert not [o for o in reset if o["kind"] == "Deployment" and o["metadata"]["name"] == "tulle-dashboard"]
    assert remembered(reset) == {"installNamespace": True}


def test_the_remembered_values_hold_no_key_material(home, tmp_path, kube):
    """Trust given as files, a webhook certificate and the bus's TLS given as values: none of
    it is written into the ConfigMap (anyone who may read ConfigMaps could read it); the
    upgrade reads trust and bus back from their own objects."""
    trust, _ = material.generate_trust("cluster.local")
    for name, text in [("ca.crt", trust.anchors_pem), ("i.crt", trust.issuer_crt_pem), ("i.key", trust.issuer_key_pem)]:
        (tmp_path / name).write_text(text)
    installed = objects_of(tulle("install", "--identity-trust-anchors-file", str(tmp_path / "ca.crt"),
                                 "--identity-issuer-certificate-file", str(tmp_path / "i.crt"),
                                 "--identity-issuer-key-file", str(tmp_path / "i.key"),
                                 "--set-file", f"proxyInjector.keyPEM={tmp_path / 'i.key'}",
                                 "--set", "controllerReplicas=2", home=home))
    text = find(installed, "ConfigMap", "tulle-install-values")["data"]["values.yaml"]
    assert "BEGIN" not in text and "PEM" not in text
    assert remembered(installed) == {"controllerReplicas": 2, "identity": {"issuer": {"tls": {}}},
                                     "installNamespace": True, "proxyInjector": {}}
    apply(kube, installed)
    upgraded = objects_of(tulle("upgrade", "--kubeconfig", str(kubeconfig(tmp_path / "kc", kube.url)), home=home))
    assert find(upgraded, "Deployment", "tulle-identity")["spec"]["replicas"] == 2
    assert find(upgraded, "Secret", "tulle-identity-issuer")["data"] == find(installed, "Secret",
                                                                             "tulle-identity-issuer")["data"]


def test_an_installation_that_kept_its_own_namespace_keeps_it_at_upgrade(home, tmp_path, kube):
    installed = objects_of(tulle("install", "--set", "installNamespace=false", "--trust-dir", str(tmp_path / "t"),
                                 home=home))
    assert not [o for o in installed if o["kind"] == "Namespace"]
    apply(kube, installed)
    upgraded = objects_of(tulle("upgrade", "--kubeconfig", str(kubeconfig(tmp_path / "kc", kube.url)), home=home))
    assert not [o for o in upgraded if o["kind"] == "Namespace"]


def test_an_installation_with_the_cni_plugin_keeps_it_at_upgrade(home, tmp_path, kube):
    installed = objects_of(tulle("install", "--cni", "--trust-dir", str(tmp_path / "t"), home=home))
    apply(kube, installed)
    upgraded = objects_of(tulle("upgrade", "--kubeconfig", str(kubeconfig(tmp_path / "kc", kube.url)), home=home))
    assert find(upgraded, "DaemonSet", "tulle-cni")["metadata"]["namespace"] == "tulle-cni"
    assert yaml.safe_load(find(upgraded, "ConfigMap", "tulle-config")["data"]["values"])["cniEnabled"] is True


def test_remembered_values_that_do_not_parse_are_one_line_naming_them(home, tmp_path, kube):
    installed = objects_of(tulle("install", "--trust-dir", str(tmp_path / "t"), home=home))
    cm = find(installed, "ConfigMap", "tulle-install-values")
    cm["data"]["values.yaml"] = "- a list\n- not values\n"
    apply(kube, installed)
    kc = str(kubeconfig(tmp_path / "kc", kube.url))
    assert one_line_error(tulle("upgrade", "--kubeconfig", kc, home=home)) == (
        "tulle: ConfigMap tulle/tulle-install-values: values.yaml is not a mapping of values (fix or delete it, "
        "or upgrade with --reset-values)")
    assert invalid_objects(objects_of(tulle("upgrade", "--kubeconfig", kc, "--reset-values", home=home))) == []


def test_upgrade_of_another_namespace_reads_that_namespace(home, tmp_path, kube):
    installed = objects_of(tulle("install", "-n", "mesh", "--trust-dir", str(tmp_path / "t"), home=home))
    apply(kube, installed)
    upgraded = objects_of(tulle("upgrade", "-n", "mesh", "--kubeconfig",
                                str(kubeconfig(tmp_path / "kc", kube.url)), home=home))
    assert find(upgraded, "Secret", "tulle-identity-issuer")["data"] == \
        find(installed, "Secret", "tulle-identity-issuer")["data"]
    assert find(upgraded, "Secret", "tulle-identity-issuer")["metadata"]["namespace"] == "mesh"


def test_upgrade_without_an_installation_says_so_in_one_line(home, tmp_path, kube):
    line = one_line_error(tulle("upgrade", "--kubeconfig", str(kubeconfig(tmp_path / "kc", kube.url)), home=home))
    assert line == ("tulle: ConfigMap tulle/tulle-identity-trust-roots not found: is Tulle installed in namespace "
                    "tulle? (or give --identity-trust-anchors-file and the issuer's files)")


def test_upgrade_with_trust_as_flags_needs_none_in_the_cluster(home, tmp_path, kube):
    trust, _ = material.generate_trust("cluster.local")
    for name, text in [("ca.crt", trust.anchors_pem), ("i.crt", trust.issuer_crt_pem), ("i.key", trust.issuer_key_pem)]:
        (tmp_path / name).write_text(text)
    proc = tulle("upgrade", "--kubeconfig", str(kubeconfig(tmp_path / "kc", kube.url)),
                 "--identity-trust-anchors-file", str(tmp_path / "ca.crt"),
                 "--identity-issuer-certificate-file", str(tmp_path / "i.crt"),
                 "--identity-issuer-key-file", str(tmp_path / "i.key"), home=home)
    objects = objects_of(proc)
    assert find(objects, "ConfigMap", "tulle-identity-trust-roots")["data"]["ca-bundle.crt"] == trust.anchors_pem
    assert "tulle: generated the bus credentials (one per control-plane role) (none found in namespace tulle)" \
        in proc.stderr.splitlines()


def test_upgrade_with_an_unreachable_api_is_one_line(home, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = one_line_error(tulle("upgrade", "--kubeconfig", str(kubeconfig(tmp_path / "kc", f"http://127.0.0.1:{port}")),
                                home=home, timeout=120))
    assert line.startswith("tulle: cannot reach the Kubernetes API to read ConfigMap tulle/tulle-identity-trust-roots")


def test_upgrade_with_a_missing_kubeconfig_is_one_line(home, tmp_path):
    line = one_line_error(tulle("upgrade", "--kubeconfig", str(tmp_path / "nope"), home=home))
    assert line.startswith("tulle: no Kubernetes API to read the installed control plane from")


# --- uninstall -------------------------------------------------------------------------------------


def test_uninstall_lists_everything_install_made_webhook_first_namespace_and_crds_last(home, tmp_path):
    installed = objects_of(tulle("install", "--cni", "--trust-dir", str(tmp_path / "t"), home=home))
    installed += objects_of(tulle("install", "--crds", home=home))
    heads = objects_of(tulle("uninstall", "--cni", home=home))
    key = lambda o: (o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
    assert sorted(map(key, heads)) == sorted(map(key, installed))
    assert all(set(h) == {"apiVersion", "kind", "metadata"} for h in heads)  # all kubectl delete needs
    assert heads[0]["kind"] == "MutatingWebhookConfiguration"
    assert {h["kind"] for h in heads[-5:]} == {"Namespace", "CustomResourceDefinition"}
    assert not (home / "share").exists()


def test_uninstall_without_cni_leaves_the_plugin(home):
    heads = objects_of(tulle("uninstall", "-n", "mesh", home=home))
    assert not [h for h in heads if h["metadata"].get("namespace") == "tulle-cni" or h["kind"] == "DaemonSet"]
    assert ("Namespace", "mesh") in [(h["kind"], h["metadata"]["name"]) for h in heads]
