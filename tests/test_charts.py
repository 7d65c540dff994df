"""The Helm charts in deploy/charts, rendered and linted by the real Helm engine (Helm v4
through helm-python-sdk), and every rendered object checked against the Kubernetes
schemas of a pinned version — with the default values, the HA values, CNI mode and custom
images — plus what the control plane promises: the webhook's settings, least-privilege
RBAC, security contexts, probes, each component's own bus credential, a NATS
configuration the real nats-server accepts."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from tests.conftest import eventually
from tests.chart_support import (NAMESPACE, containers, control_plane_values, find, invalid_objects,
                                 render_control_plane)
from tulle.install.render import ChartError, chart_dir, chart_values, lint, merge_values, render
from tulle.natsserver import nats_server_binary

CUSTOM_IMAGES = {"controllerImage": "registry.example.com/mesh/tulle", "controllerImageVersion": "1.2.3",
                 "imagePullPolicy": "Always",
                 "proxy": {"image": {"name": "registry.example.com/mesh/tulle-proxy", "version": "1.2.4"}},
                 "nats": {"image": {"name": "registry.example.com/mesh/nats", "version": "2.15.1"}}}
VALUE_SETS = {
    "default": ({}, False),
    "ha": ({}, True),
    "cni": ({"cniEnabled": True}, False),
    "custom-images": (CUSTOM_IMAGES, False),
    "one-nats-server": ({"nats": {"replicas": 1}}, False),
}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request):
    extra, ha = VALUE_SETS[request.param]
    return request.param, render_control_plane(extra, ha=ha)


def test_control_plane_lints_clean_with_each_values_set():
    for name, (extra, ha) in VALUE_SETS.items():
        assert lint("tulle-control-plane", control_plane_values(extra, ha=ha)) == [], name


def test_crds_and_cni_charts_lint_clean():
    assert lint("tulle-crds") == []
    assert lint("tulle-cni") == []
    assert lint("tulle-cni", {"image": {"name": "registry.example.com/mesh/tulle", "version": "1.2.3"}}) == []


def test_every_rendered_object_is_valid_for_kubernetes(rendered):
    name, objects = rendered
    assert invalid_objects(objects) == [], name
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "StatefulSet", "MutatingWebhookConfiguration", "ClusterRole", "Secret"} <= kinds


def test_cni_and_crd_charts_render_valid_objects():
    assert invalid_objects(render("tulle-cni", {}, namespace="tulle-cni")) == []
    assert invalid_objects(render("tulle-crds", {}, namespace=NAMESPACE)) == []


# --- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("values, named", [
    ({"webhookFailurePolicy": "Sometimes"}, "at '/webhookFailurePolicy': value must be one of 'Ignore', 'Fail'"),
    ({"controlerReplicas": 3}, "additional properties 'controlerReplicas' not allowed"),
    ({"controllerReplicas": 0}, "at '/controllerReplicas': minimum: got 0, want 1"),
    ({"proxy": {"defaultInboundPolicy": "allow-all"}}, "at '/proxy/defaultInboundPolicy'"),
    ({"nats": {"replicas": "three"}}, "at '/nats/replicas': got string, want integer"),
    ({"identity": {"issuer": {"issuanceLifetime": "one day"}}}, "at '/identity/issuer/issuanceLifetime'"),
    ({"proxyInit": {"iptablesMode": "ebpf"}}, "at '/proxyInit/iptablesMode'"),
    ({"controllerUID": 0}, "at '/controllerUID'"),
    # Not an nkey public key: the NATS authorization derives each inbox prefix from it.
    ({"nats": {"auth": {"observerPublicKey": "UABC"}}}, "at '/nats/auth/observerPublicKey'"),
])
def test_a_bad_value_gets_helms_schema_error_naming_it(values, named):
    with pytest.raises(ChartError) as e:
        render_control_plane(values)
    message = str(e.value)
    assert message.startswith("tulle-control-plane values: ") and named in message
    assert "\n" not in message


def test_missing_secrets_are_named_with_what_makes_them():
    with pytest.raises(ChartError) as e:
        render("tulle-control-plane", {}, namespace=NAMESPACE)
    assert "is required" in str(e.value) and "tulle install generates" in str(e.value)
    values = control_plane_values()
    values["nats"]["auth"]["observerSeed"] = ""
    with pytest.raises(ChartError, match=r"^nats.auth.observerSeed is required: the observer role's nkey seed"):
        render("tulle-control-plane", values, namespace=NAMESPACE)


@pytest.mark.parametrize("key, what", [
    ("destinationPublicKey", "the public key of the destination role's nkey seed"),
    ("calloutPublicKey", "the public key of the callout role's nkey seed"),
    ("calloutIssuerPublicKey", "the public key of the auth-callout issuer's account seed"),
])
def test_a_missing_bus_public_key_is_named_not_a_template_function_error(key, what):
    # The authorization derives each user's inbox prefix from its key with `substr`, which
    # would otherwise fail first with "slice bounds out of range".
    values = control_plane_values()
    values["nats"]["auth"][key] = ""
    with pytest.raises(ChartError) as e:
        render("tulle-control-plane", values, namespace=NAMESPACE)
    assert str(e.value).startswith(f"nats.auth.{key} is required: {what} (tulle install generates it)"), str(e.value)


def _leaves(values: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in values.items():
        path = f"{prefix}{k}"
        out += _leaves(v, path + ".") if isinstance(v, dict) and v else [path]
    return out


def _documented(readme: Path) -> set[str]:
    """The keys in the README's values table (its last section, "## Values")."""
    table = readme.read_text().split("\n## Values\n", 1)[1]
    return set(re.findall(r"^\| `([^`]+)` \|", table, re.M))


@pytest.mark.parametrize("chart", ["tulle-crds", "tulle-control-plane", "tulle-cni"])
def test_every_value_is_in_the_readme_table_and_the_schema(chart):
    values = chart_values(chart)
    documented = _documented(chart_dir(chart) / "README.md")
    schema = yaml.safe_load((chart_dir(chart) / "values.schema.json").read_text())
    for leaf in _leaves(values):
        parts = leaf.split(".")
        assert any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1)), f"{leaf} not in README"
        node = schema
        for part in parts:
            assert part in node.get("properties", {}), f"{leaf} not in values.schema.json"
            node = node["properties"][part]
            if node.get("type") == "object" and "properties" not in node:
                break  # a free-form map (selectors, strategy)
    for key in documented:
        node = values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"README documents {key}, which values.yaml lacks"
            node = node[part]


# --- the control plane ------------------------------------------------------------------------


def test_three_deployments_as_linkerd_with_destination_and_policy_in_one_pod():
    objects = render_control_plane()
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    assert sorted(deployments) == ["tulle-destination", "tulle-identity", "tulle-proxy-injector"]
    pod = deployments["tulle-destination"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["destination", "policy"]
    commands = {f"{d}/{c['name']}": c["command"] for d, o in deployments.items()
                for c in o["spec"]["template"]["spec"]["containers"]}
    assert commands == {
        "tulle-destination/destination": ["python", "-m", "services.destination"],
        "tulle-destination/policy": ["python", "-m", "services.policy"],
        "tulle-identity/identity": ["python", "-m", "services.identity"],
        "tulle-proxy-injector/proxy-injector": ["python", "-m", "services.injector"],
    }
    for d in deployments.values():
        assert d["spec"]["replicas"] == 1
        assert "affinity" not in d["spec"]["template"]["spec"]
    assert not [o for o in objects if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] != "tulle-nats"]
    assert find(objects, "MutatingWebhookConfiguration", "tulle-proxy-injector-webhook-config")[
        "webhooks"][0]["failurePolicy"] == "Ignore"


def test_ha_values_give_replicas_budgets_spread_and_a_failing_webhook():
    objects = render_control_plane(ha=True)
    for name in ("tulle-destination", "tulle-identity", "tulle-proxy-injector"):
        d = find(objects, "Deployment", name)
        assert d["spec"]["replicas"] == 3
        assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 1
        anti = d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        required, = anti["requiredDuringSchedulingIgnoredDuringExecution"]
        assert required["topologyKey"] == "kubernetes.io/hostname"
        assert required["labelSelector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]
        pdb = find(objects, "PodDisruptionBudget", name)
        assert pdb["spec"] == {"maxUnavailable": 1, "selector": d["spec"]["selector"]}
    assert find(objects, "MutatingWebhookConfiguration", "tulle-proxy-injector-webhook-config")[
        "webhooks"][0]["failurePolicy"] == "Fail"
    nats = find(objects, "StatefulSet", "tulle-nats")
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"


def test_the_webhook_is_configured_as_the_design_says():
    objects = render_control_plane()
    mwc = find(objects, "MutatingWebhookConfiguration", "tulle-proxy-injector-webhook-config")
    hook, = mwc["webhooks"]
    assert hook["name"] == "tulle-proxy-injector.tulle.dev"
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods", "services"], "scope": "Namespaced"}]
    assert (hook["sideEffects"], hook["admissionReviewVersions"], hook["timeoutSeconds"]) == ("None", ["v1"], 10)
    assert hook["clientConfig"]["service"] == {"name": "tulle-proxy-injector", "namespace": NAMESPACE,
                                               "path": "/", "port": 443}
    assert {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system"]} in \
        hook["namespaceSelector"]["matchExpressions"]
    assert {"key": "config.tulle.dev/admission-webhooks", "operator": "NotIn", "values": ["disabled"]} in \
        hook["namespaceSelector"]["matchExpressions"]
    assert {"key": "tulle.dev/control-plane-component", "operator": "DoesNotExist"} in \
        hook["objectSelector"]["matchExpressions"]
    svc = find(objects, "Service", "tulle-proxy-injector")
    assert svc["spec"]["ports"] == [{"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"}]
    injector = containers(objects)["tulle-proxy-injector/proxy-injector"]
    assert {"name": "webhook", "containerPort": 8443, "protocol": "TCP"} in injector["ports"]
    # The caBundle is the CA that signed the webhook's certificate, which names the Service.
    ca = x509.load_pem_x509_certificate(base64.b64decode(hook["clientConfig"]["caBundle"]))
    secret = find(objects, "Secret", "tulle-proxy-injector-k8s-tls")
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert f"tulle-proxy-injector.{NAMESPACE}.svc" in names
    # Every control-plane pod carries the label that keeps the webhook away from it.
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            assert "tulle.dev/control-plane-component" in obj["spec"]["template"]["metadata"]["labels"]


def test_helm_alone_generates_the_webhook_certificate_when_none_is_given():
    values = control_plane_values()
    for key in ("crtPEM", "keyPEM", "caBundle"):
        values["proxyInjector"][key] = ""
    objects = render("tulle-control-plane", values, namespace=NAMESPACE)
    hook, = find(objects, "MutatingWebhookConfiguration", "tulle-proxy-injector-webhook-config")["webhooks"]
    secret = find(objects, "Secret", "tulle-proxy-injector-k8s-tls")
    ca = x509.load_pem_x509_certificate(base64.b64decode(hook["clientConfig"]["caBundle"]))
    assert base64.b64decode(secret["data"]["ca.crt"]) == base64.b64decode(hook["clientConfig"]["caBundle"])
    x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"])).verify_directly_issued_by(ca)


def _rules(objects, kind, name):
    return [(tuple(r["apiGroups"]), tuple(sorted(r["resources"])), tuple(sorted(r["verbs"])),
             tuple(r.get("resourceNames", ()))) for r in find(objects, kind, name)["rules"]]


def test_each_component_may_do_only_what_it_needs():
    objects = render_control_plane()
    assert sorted(_rules(objects, "ClusterRole", f"tulle-{NAMESPACE}-destination")) == sorted([
        (("",), ("pods", "services"), ("list", "watch"), ()),
        (("discovery.k8s.io",), ("endpointslices",), ("list", "watch"), ()),
        (("tulle.dev",), ("serviceprofiles",), ("list", "watch"), ()),
        (("",), ("namespaces",), ("list", "watch"), ()),
        (("policy.tulle.dev",), ("serverauthorizations", "servers"), ("list", "watch"), ()),
    ])
    assert _rules(objects, "ClusterRole", f"tulle-{NAMESPACE}-identity") == [
        (("authentication.k8s.io",), ("tokenreviews",), ("create",), ())]
    assert _rules(objects, "Role", "tulle-identity") == [
        (("",), ("secrets",), ("get", "list", "watch"), ("tulle-identity-issuer",))]
    # The injector reads a pod's namespace, and its owner one level up (ReplicaSet, Job) for the
    # owner labels (services/injector/sources.py owner_of).
    assert _rules(objects, "ClusterRole", f"tulle-{NAMESPACE}-proxy-injector") == [
        (("",), ("namespaces",), ("get",), ()), (("apps",), ("replicasets",), ("get",), ()),
        (("batch",), ("jobs",), ("get",), ())]
    # Nothing else is bound to anyone, and NATS gets no API token at all.
    roles = {(o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] in ("ClusterRole", "Role")}
    assert roles == {("ClusterRole", f"tulle-{NAMESPACE}-destination"), ("ClusterRole", f"tulle-{NAMESPACE}-identity"),
                     ("ClusterRole", f"tulle-{NAMESPACE}-proxy-injector"), ("Role", "tulle-identity")}
    for obj in objects:
        if obj["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            subject, = obj["subjects"]
            assert obj["roleRef"]["name"].endswith(subject["name"].removeprefix("tulle-"))
    nats = find(objects, "StatefulSet", "tulle-nats")["spec"]["template"]["spec"]
    assert nats["automountServiceAccountToken"] is False


def test_every_container_is_locked_down_and_probed_on_its_admin_port(rendered):
    _, objects = rendered
    for name, c in containers(objects).items():
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, name
        assert sc["runAsUser"] != 0 and "resources" in c, name
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            pod = obj["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    admin = {"tulle-destination/destination": 9990, "tulle-identity/identity": 9991,
             "tulle-destination/policy": 9992, "tulle-proxy-injector/proxy-injector": 9993}
    for name, port in admin.items():
        c = containers(objects)[name]
        assert {"name": "admin-http", "containerPort": port, "protocol": "TCP"} in c["ports"]
        assert c["livenessProbe"]["httpGet"] == {"path": "/live", "port": "admin-http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "admin-http"}
        assert f"--admin=0.0.0.0:{port}" in c["args"]


def _mounted_secret_keys(objects, workload: str, container: str) -> dict[str, list[str]]:
    obj = next(o for o in objects if o["metadata"]["name"] == workload and o["kind"] in ("Deployment", "StatefulSet"))
    pod = obj["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    c = next(c for c in pod["containers"] if c["name"] == container)
    out = {}
    for m in c["volumeMounts"]:
        secret = volumes[m["name"]].get("secret")
        if secret:
            out[m["mountPath"]] = [f"{secret['secretName']}:{i['key']}" for i in secret.get("items", [])] or \
                [f"{secret['secretName']}:*"]
    return out


def test_each_component_mounts_only_its_own_bus_credential():
    objects = render_control_plane()
    creds = find(objects, "Secret", "tulle-nats-credentials")
    assert sorted(creds["data"]) == ["callout", "callout-issuer", "destination", "identity", "injector", "observer",
                                     "policy"]
    expected = {
        ("tulle-destination", "destination"): ["tulle-nats-credentials:destination"],
        ("tulle-destination", "policy"): ["tulle-nats-credentials:policy"],
        # identity alone answers proxies' logins: its second connection (callout, in the
        # AUTH account) and the account key it signs the answers with.
        ("tulle-identity", "identity"): ["tulle-nats-credentials:identity", "tulle-nats-credentials:callout-issuer",
                                         "tulle-nats-credentials:callout"],
        ("tulle-proxy-injector", "proxy-injector"): ["tulle-nats-credentials:injector"],
    }
    for (workload, container), keys in expected.items():
        mounts = _mounted_secret_keys(objects, workload, container)
        assert mounts["/var/run/tulle/nats"] == keys
        assert mounts["/var/run/tulle/nats-ca"] == ["tulle-nats-tls:ca.crt"]  # the CA only, never the key
        assert not any("tulle-identity-issuer" in k for ks in mounts.values() for k in ks)
        args = containers(objects)[f"{workload}/{container}"]["args"]
        assert "--nats-creds=/var/run/tulle/nats/creds" in args
        assert "--nats-ca=/var/run/tulle/nats-ca/ca.crt" in args
        assert f"--nats=tls://tulle-nats.{NAMESPACE}.svc.cluster.local:4222" in args
    identity = containers(objects)["tulle-identity/identity"]["args"]
    assert "--callout-issuer-seed=/var/run/tulle/nats/callout-issuer" in identity
    assert "--callout-creds=/var/run/tulle/nats/callout" in identity
    assert f"--issuer-secret={NAMESPACE}/tulle-identity-issuer" in containers(objects)["tulle-identity/identity"]["args"]


def _parser_arguments(component: str):
    if component == "destination":
        from services.destination.__main__ import add_arguments
    elif component == "policy":
        from services.policy.service import add_arguments
    elif component == "identity":
        from services.identity.__main__ import add_arguments
    else:
        from services.injector.__main__ import add_arguments
    return add_arguments


def test_every_service_accepts_the_flags_the_chart_gives_it():
    from tulle.service import parse_args

    objects = render_control_plane(CUSTOM_IMAGES, ha=True)
    parsed = {}
    for name, c in containers(objects).items():
        if not name.startswith(("tulle-destination/", "tulle-identity/", "tulle-proxy-injector/")):
            continue
        component = c["command"][2].split(".")[1]
        try:
            parsed[component] = parse_args(component, c["args"], _parser_arguments(component))
        except SystemExit:
            pytest.fail(f"python -m services.{component} refuses {c['args']}")
    assert sorted(parsed) == ["destination", "identity", "injector", "policy"]
    for args in parsed.values():
        assert args.admin.startswith("0.0.0.0:") and args.kubernetes
        # Buckets and the event stream get a copy on each NATS server: losing one loses nothing.
        assert args.nats_replicas == 3
        assert (args.nats_creds, args.nats_ca) == ("/var/run/tulle/nats/creds", "/var/run/tulle/nats-ca/ca.crt")
    identity = parsed["identity"]
    assert identity.lifetime.total_seconds() == 24 * 3600 and identity.clock_skew.total_seconds() == 20
    assert identity.callout_creds == "/var/run/tulle/nats/callout"
    assert identity.callout_issuer_seed == "/var/run/tulle/nats/callout-issuer"
    assert identity.issuer_secret == f"{NAMESPACE}/tulle-identity-issuer"
    injector = parsed["injector"]
    assert injector.listen == "0.0.0.0:8443" and injector.values == "/var/run/tulle/config/values"
    assert (injector.tls_cert, injector.tls_key) == ("/var/run/tulle/webhook/tls.crt", "/var/run/tulle/webhook/tls.key")


def test_the_injectors_flags_name_files_its_pod_mounts():
    objects = render_control_plane()
    pod = find(objects, "Deployment", "tulle-proxy-injector")["spec"]["template"]["spec"]
    injector, = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in injector["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/var/run/tulle/webhook"]]["secret"]["secretName"] == "tulle-proxy-injector-k8s-tls"
    assert volumes[mounts["/var/run/tulle/config"]]["configMap"]["name"] == "tulle-config"
    tls = find(objects, "Secret", "tulle-proxy-injector-k8s-tls")["data"]
    assert {"tls.crt", "tls.key"} <= set(tls)
    assert "values" in find(objects, "ConfigMap", "tulle-config")["data"]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_injector_loads_the_values_document_the_chart_renders(tmp_path, name):
    """What the chart puts in the tulle-config ConfigMap is read by the injector's own
    loader (`--values`), strictly: an unknown key there would stop the webhook."""
    from services.injector.__main__ import add_arguments, load_values
    from tulle.service import parse_args

    extra, ha = VALUE_SETS[name]
    values = control_plane_values(extra, ha=ha)
    objects = render("tulle-control-plane", values, namespace=NAMESPACE)
    (tmp_path / "values").write_text(find(objects, "ConfigMap", "tulle-config")["data"]["values"])
    args = parse_args("injector", ["--values", str(tmp_path / "values")], add_arguments)
    loaded = load_values(args)
    assert loaded.control_plane_namespace == NAMESPACE and loaded.trust_domain == "cluster.local"
    assert loaded.trust_anchors_pem == values["identityTrustAnchorsPEM"]
    assert loaded.nats_url == f"tls://tulle-nats.{NAMESPACE}.svc.cluster.local:4222"
    assert loaded.nats_ca_pem == values["nats"]["tls"]["caPEM"]
    assert loaded.cni_enabled is (name == "cni")
    image = CUSTOM_IMAGES["proxy"]["image"] if name == "custom-images" else {
        "name": chart_values("tulle-control-plane")["controllerImage"], "version": yaml.safe_load((chart_dir("tulle-control-plane") / "Chart.yaml").read_text())["appVersion"]}
    assert (loaded.proxy_image, loaded.proxy_version) == (image["name"], image["version"])
    assert loaded.default_inbound_policy == "all-unauthenticated" and loaded.native_sidecar and loaded.await_proxy
    # And a pod injected with them is valid, and its proxy accepts the environment it gets.
    pod = _injected_pod(loaded)
    assert invalid_objects([pod]) == []
    containers_ = {c["name"]: c for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]}
    if name == "cni":
        assert "tulle-init" not in containers_ and "tulle-network-validator" in containers_
    else:
        assert containers_["tulle-init"]["resources"] == {"requests": {"cpu": "10m", "memory": "10Mi"},
                                                          "limits": {"cpu": "100m", "memory": "20Mi"}}
    for c in containers_.values():
        if c["name"].startswith("tulle-"):
            _accepted_by_the_cli(c["command"] + c.get("args", []))
    proxy_env = _resolved_env(pod, containers_["tulle-proxy"])
    assert "TULLE_PROXY_SHUTDOWN_GRACE_PERIOD" not in proxy_env  # the chart's "": the proxy's own default
    from proxy.config import from_env

    cfg = from_env(proxy_env)
    assert cfg.trust_anchors_pem.strip() == values["identityTrustAnchorsPEM"].strip().encode()
    assert (cfg.namespace, cfg.workload, cfg.shutdown_grace_s) == ("shop", "web-0", 120)


def test_without_native_sidecars_the_proxys_await_hook_is_a_command_the_cli_accepts():
    from services.injector.values import from_tree

    objects = render_control_plane({"proxy": {"nativeSidecar": False}})
    loaded = from_tree(yaml.safe_load(find(objects, "ConfigMap", "tulle-config")["data"]["values"]), "tulle-config")
    proxy = _injected_pod(loaded)["spec"]["containers"][0]
    assert proxy["name"] == "tulle-proxy"
    _accepted_by_the_cli(proxy["lifecycle"]["postStart"]["exec"]["command"])


def _accepted_by_the_cli(argv: list[str]) -> None:
    """`argv` (a container's command and args, or a hook) names a `tulle` subcommand whose
    options parse: what the image's `tulle` would accept (nothing is run)."""
    import click

    from tulle.cli import cli

    assert argv[0] == "tulle", argv
    words = [a for a in argv[1:] if not a.startswith("-")]
    cmd, ctx, i = cli, None, 1
    while isinstance(cmd, click.Group):
        ctx = click.Context(cmd, info_name=argv[i - 1], parent=ctx)
        cmd = cmd.get_command(ctx, argv[i])
        assert cmd is not None, f"tulle has no command {' '.join(argv[:i + 1])}"
        i += 1
    assert words[:i - 1] == argv[1:i]
    try:
        cmd.make_context(argv[i - 1], list(argv[i:]), parent=ctx)
    except click.UsageError as e:
        pytest.fail(f"{' '.join(argv)}: {e.format_message()}")


def _injected_pod(values) -> dict:
    import jsonpatch

    from services.injector import core

    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "web-0", "namespace": "shop", "annotations": {core.INJECT: "enabled"}},
           "spec": {"serviceAccountName": "web", "containers": [{"name": "web", "image": "nginx:1.27",
                                                                 "ports": [{"containerPort": 8080}]}]}}
    plan = core.plan_pod(core.Target("Pod", "web-0", "shop", pod), {}, values)
    assert plan.inject, plan.reason
    return jsonpatch.apply_patch(pod, plan.ops)


def _resolved_env(pod: dict, container: dict) -> dict[str, str]:
    """The container's environment as the kubelet resolves it (the downward API's fieldRefs)."""
    fields = {"metadata.namespace": pod["metadata"]["namespace"], "metadata.name": pod["metadata"]["name"],
              "spec.serviceAccountName": pod["spec"]["serviceAccountName"]}
    return {e["name"]: e["value"] if "value" in e else fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            for e in container["env"]}


@pytest.mark.parametrize("servers, copies", [(1, 1), (3, 3), (7, 5)])
def test_services_replicate_the_buckets_on_as_many_nats_servers_as_the_chart_runs(servers, copies):
    """--nats-replicas follows nats.replicas: a copy of each bucket and of the event stream on
    every server, so losing one loses nothing (JetStream keeps at most 5 copies)."""
    objects = render_control_plane({"nats": {"replicas": servers}})
    for name, c in containers(objects).items():
        if name.startswith(("tulle-destination/", "tulle-identity/", "tulle-proxy-injector/")):
            assert f"--nats-replicas={copies}" in c["args"], name


def test_custom_images_reach_every_container_and_the_injectors_config():
    objects = render_control_plane(CUSTOM_IMAGES)
    for name, c in containers(objects).items():
        expected = ("registry.example.com/mesh/nats:2.15.1" if name.startswith("tulle-nats/")
                    else "registry.example.com/mesh/tulle:1.2.3")
        assert (c["image"], c["imagePullPolicy"]) == (expected, "Always"), name
    config = yaml.safe_load(find(objects, "ConfigMap", "tulle-config")["data"]["values"])
    assert config["proxy"]["image"] == {"name": "registry.example.com/mesh/tulle-proxy", "version": "1.2.4",
                                        "pullPolicy": "Always"}
    default = yaml.safe_load(find(render_control_plane(), "ConfigMap", "tulle-config")["data"]["values"])
    assert default["proxy"]["image"]["name"] == chart_values("tulle-control-plane")["controllerImage"]
    assert default["identityTrustAnchorsPEM"].startswith("-----BEGIN CERTIFICATE-----")
    assert default["natsURL"] == f"tls://tulle-nats.{NAMESPACE}.svc.cluster.local:4222"
    assert default["cniEnabled"] is False and default["proxy"]["defaultInboundPolicy"] == "all-unauthenticated"


# --- NATS -----------------------------------------------------------------------------------------


def _nats_conf_runnable(objects, tmp_path: Path) -> Path:
    """The rendered nats.conf with the pod's mount paths moved under tmp_path."""
    conf = find(objects, "ConfigMap", "tulle-nats-config")["data"]["nats.conf"]
    tls = find(objects, "Secret", "tulle-nats-tls")["data"]
    for key, value in tls.items():
        (tmp_path / key).write_bytes(base64.b64decode(value))
    conf = (conf.replace("/etc/nats/tls/", f"{tmp_path}/").replace("/data/jetstream", f"{tmp_path}/js")
            .replace("/var/run/nats/", f"{tmp_path}/"))
    path = tmp_path / "nats.conf"
    path.write_text(conf)
    return path


@pytest.mark.parametrize("replicas", [3, 1])
def test_the_real_nats_server_accepts_the_rendered_configuration(tmp_path, replicas):
    objects = render_control_plane({"nats": {"replicas": replicas}})
    conf = find(objects, "ConfigMap", "tulle-nats-config")["data"]["nats.conf"]
    assert "limits { default_max_consumers: -1 }" in conf and "max_payload: 1MB" in conf
    assert "no_auth_user" not in conf and "auth_callout {" in conf
    routes = re.findall(r'"(nats-route://[^"]+)"', conf)
    assert routes == [f"nats-route://tulle-nats-{i}.tulle-nats-headless.{NAMESPACE}.svc.cluster.local:6222"
                      for i in range(replicas)] if replicas > 1 else routes == []
    path = _nats_conf_runnable(objects, tmp_path)
    proc = subprocess.run([nats_server_binary(), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30,
                          env={"POD_NAME": "tulle-nats-0"})
    assert proc.returncode == 0, proc.stderr
    assert "is valid" in proc.stdout + proc.stderr


def test_the_charts_nats_authorization_is_what_the_generator_writes():
    """templates/_nats-auth.tpl is tulle/busauth.py's output: regenerate it, never edit it."""
    from tulle import busauth

    committed = (chart_dir("tulle-control-plane") / "templates" / "_nats-auth.tpl").read_text()
    assert committed == busauth.helm_template(), \
        "run: python -m tulle.busauth --helm-template > deploy/charts/tulle-control-plane/templates/_nats-auth.tpl"
    proc = subprocess.run([sys.executable, "-m", "tulle.busauth", "--helm-template"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout == committed, proc.stderr


def _bus_public_keys(values: dict):
    """The public keys of the seeds `tulle install` generated, derived from the seeds
    themselves (not from the chart's *PublicKey values, which must agree with them)."""
    from tulle import busauth, natsjwt

    auth = values["nats"]["auth"]
    users = {role: natsjwt.public_key(auth[f"{role}Seed"].encode()) for role in busauth.HELM_VALUE_KEYS}
    return busauth.BusPublicKeys(users=users, callout_issuer=natsjwt.public_key(auth["calloutIssuerSeed"].encode()))


@pytest.mark.parametrize("replicas", [3, 1])
def test_the_rendered_nats_authorization_is_exactly_the_generators_for_the_installs_keys(replicas):
    from tulle import busauth

    values = control_plane_values({"nats": {"replicas": replicas}})
    conf = find(render("tulle-control-plane", values, namespace=NAMESPACE), "ConfigMap",
                "tulle-nats-config")["data"]["nats.conf"]
    auth = conf[conf.index("accounts {"):]
    assert auth == busauth.authorization_config(_bus_public_keys(values))
    assert conf.count("accounts {") == 1


def test_nats_is_a_jetstream_statefulset_on_persistent_volumes_with_routes_and_tls():
    objects = render_control_plane({"nats": {"replicas": 5, "storage": {"size": "20Gi", "storageClassName": "fast"}}})
    sts = find(objects, "StatefulSet", "tulle-nats")
    assert sts["spec"]["replicas"] == 5 and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["serviceName"] == "tulle-nats-headless"
    claim, = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi" and claim["spec"]["storageClassName"] == "fast"
    nats = sts["spec"]["template"]["spec"]["containers"][0]
    assert nats["command"] == ["nats-server", "--config", "/etc/nats/nats.conf"]
    assert {"name": "data", "mountPath": "/data"} in nats["volumeMounts"]
    assert nats["livenessProbe"]["httpGet"]["port"] == "monitor"
    assert find(objects, "Service", "tulle-nats-headless")["spec"]["publishNotReadyAddresses"] is True
    conf = find(objects, "ConfigMap", "tulle-nats-config")["data"]["nats.conf"]
    assert len(re.findall(r"nats-route://", conf)) == 5 and "verify: true" in conf
    # The servers' certificate names the client Service and every replica's stable name.
    cert = x509.load_pem_x509_certificate(base64.b64decode(find(objects, "Secret", "tulle-nats-tls")["data"]["tls.crt"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert f"tulle-nats.{NAMESPACE}.svc.cluster.local" in names
    assert f"*.tulle-nats-headless.{NAMESPACE}.svc.cluster.local" in names
    assert find(objects, "PodDisruptionBudget", "tulle-nats")["spec"]["maxUnavailable"] == 1


def test_trust_material_lands_where_identity_and_tools_read_it():
    values = control_plane_values()
    objects = render("tulle-control-plane", values, namespace=NAMESPACE)
    roots = find(objects, "ConfigMap", "tulle-identity-trust-roots")
    assert roots["data"]["ca-bundle.crt"] == values["identityTrustAnchorsPEM"]
    issuer = find(objects, "Secret", "tulle-identity-issuer")
    assert issuer["type"] == "kubernetes.io/tls"
    assert {k: base64.b64decode(v).decode() for k, v in issuer["data"].items()} == {
        "ca.crt": values["identityTrustAnchorsPEM"], "tls.crt": values["identity"]["issuer"]["tls"]["crtPEM"],
        "tls.key": values["identity"]["issuer"]["tls"]["keyPEM"]}
    # An issuer managed outside the chart (cert-manager): the chart makes no Secret.
    external = render("tulle-control-plane", merge_values(values, {"identity": {"issuer": {"scheme": "kubernetes.io/tls"}}}),
                      namespace=NAMESPACE)
    assert not [o for o in external if o["metadata"]["name"] == "tulle-identity-issuer"]


def test_the_namespace_is_rendered_only_when_asked_and_then_skips_every_webhook():
    assert not [o for o in render_control_plane() if o["kind"] == "Namespace"]
    ns = find(render_control_plane({"installNamespace": True}), "Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["config.tulle.dev/admission-webhooks"] == "disabled"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert ns["metadata"]["annotations"]["tulle.dev/inject"] == "disabled"


def _read_info(sock) -> dict:
    import json

    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    assert line.startswith(b"INFO "), line
    return json.loads(line[5:])


def test_nats_from_the_chart_wants_tls_from_clients_and_a_certificate_from_routes(tmp_path):
    """As an attacker on the pod network would try it: a plain client, and a route without
    the NATS certificate (which would otherwise join the cluster around the bus's auth)."""
    import socket
    import ssl

    from tulle.natsserver import free_port, wait_for_port

    objects = render_control_plane()
    path = _nats_conf_runnable(objects, tmp_path)
    client, route, monitor, absent = free_port(), free_port(), free_port(), free_port()
    conf = (path.read_text().replace("0.0.0.0:4222", f"127.0.0.1:{client}").replace("0.0.0.0:6222", f"127.0.0.1:{route}")
            .replace("0.0.0.0:8222", f"127.0.0.1:{monitor}"))
    # The other replicas: one route to a port where nothing listens (a replica that is down).
    conf = re.sub(r"routes: \[[^\]]*\]", f'routes: ["nats-route://127.0.0.1:{absent}"]', conf)
    path.write_text(conf)
    proc = subprocess.Popen([nats_server_binary(), "-c", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={"POD_NAME": "tulle-nats-0"})
    try:
        assert wait_for_port("127.0.0.1", client, 20) and wait_for_port("127.0.0.1", route, 20)
        host = f"tulle-nats.{NAMESPACE}.svc.cluster.local"
        # A client that does not start TLS is refused.
        with socket.create_connection(("127.0.0.1", client), timeout=10) as s:
            assert _read_info(s)["tls_required"] is True
            s.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
            answer = s.recv(4096)
            assert b"PONG" not in answer and (answer == b"" or answer.startswith(b"-ERR")), answer
        # A client that checks the server against the CA it was given gets through TLS.
        ca = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        with socket.create_connection(("127.0.0.1", client), timeout=10) as s:
            _read_info(s)
            with ca.wrap_socket(s, server_hostname=host) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        # Routes start with TLS. One without the NATS certificate is refused in the handshake;
        # with it, the server talks (its INFO, inside TLS, asks the peer to verify too).
        name = f"tulle-nats-1.tulle-nats-headless.{NAMESPACE}.svc.cluster.local"
        with socket.create_connection(("127.0.0.1", route), timeout=10) as s:
            with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
                with ca.wrap_socket(s, server_hostname=name) as tls:
                    tls.recv(4096)  # TLS 1.3: the server's refusal arrives after the client's Finished
        member = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        member.load_cert_chain(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))
        with socket.create_connection(("127.0.0.1", route), timeout=10) as s:
            with member.wrap_socket(s, server_hostname=name) as tls:
                info = _read_info(tls)
                assert info["tls_required"] is True and info["tls_verify"] is True
    finally:
        proc.terminate()
        proc.wait(10)


# --- the chart's bus, run for real ------------------------------------------------------------------


NATS_SERVICE_HOST = f"tulle-nats.{NAMESPACE}.svc.cluster.local"


def _dialing_the_service(creds):
    """Credentials that dial the test's loopback port but check the server's certificate
    names the NATS Service, as a pod dialing tls://tulle-nats.<ns>.svc... would."""
    import dataclasses

    from tulle.bus import BusCredentials

    @dataclasses.dataclass(frozen=True)
    class ToService(BusCredentials):
        def connect_options(self, url: str) -> dict:
            return {**super().connect_options(url), "tls_hostname": NATS_SERVICE_HOST}

    return ToService(**{f.name: getattr(creds, f.name) for f in dataclasses.fields(creds)})


@pytest.fixture
async def chart_bus(tmp_path):
    """A nats-server from the chart's rendered nats.conf (one replica; only file paths and
    listen ports changed), the role seeds from the rendered Secret, and identity's real
    auth-callout responder logged in with the rendered callout credential."""
    from services.identity.callout import CalloutResponder
    from services.identity.tokens import LocalTokenVerifier
    from tulle import natsjwt, pki
    from tulle.bus import Bus, BusCredentials
    from tulle.metrics import Registry
    from tulle.natsserver import free_port, wait_for_port

    objects = render_control_plane({"nats": {"replicas": 1}})
    path = _nats_conf_runnable(objects, tmp_path)
    client, monitor = free_port(), free_port()
    path.write_text(path.read_text().replace("0.0.0.0:4222", f"127.0.0.1:{client}")
                    .replace("0.0.0.0:8222", f"127.0.0.1:{monitor}"))
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for key, value in find(objects, "Secret", "tulle-nats-credentials")["data"].items():
        (seeds / key).write_bytes(base64.b64decode(value))
    ca = str(tmp_path / "ca.crt")
    url = f"tls://127.0.0.1:{client}"
    proc = subprocess.Popen([nats_server_binary(), "-c", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={"POD_NAME": "tulle-nats-0"})
    secret = pki.new_token_secret()
    responder = None
    try:
        assert wait_for_port("127.0.0.1", client, 20), "the chart's nats-server did not listen"

        def role(name: str, **kw) -> Bus:
            creds = _dialing_the_service(BusCredentials.for_seed(str(seeds / name), ca_file=ca))
            return Bus(url, component=name, credentials=creds, registry=Registry(), **kw)

        responder = CalloutResponder(role("callout", instance="callout"),
                                     LocalTokenVerifier(secret, "identity.tulle.cluster.local"),
                                     natsjwt.read_seed(seeds / "callout-issuer"), registry=Registry())
        await asyncio.wait_for(responder.start(), 20)
        await responder.bus.sync()
        yield {"url": url, "ca": ca, "role": role, "token_secret": secret, "tmp": tmp_path}
    finally:
        if responder is not None:
            await responder.close()
        proc.terminate()
        proc.wait(10)


async def test_the_charts_nats_lets_the_observer_read_refuses_its_writes_and_refuses_anonymous_clients(chart_bus):
    import nats

    from tulle import pki, schemas
    from tulle.bus import BusCredentials, settle

    destination, observer = chart_bus["role"]("destination"), chart_bus["role"]("observer")
    key = "shop.web.8080"
    await asyncio.wait_for(destination.start(), 20)
    await asyncio.wait_for(observer.start(), 20)
    try:
        # destination writes its bucket; the observer reads it (a KV read is a request whose
        # answer comes to the observer's own inbox: the chart's `substr` prefix is right).
        await destination.put_raw(schemas.ENDPOINTS_BUCKET, key, b"written by destination")
        assert await observer.get_raw(schemas.ENDPOINTS_BUCKET, key) == b"written by destination"
        # Its write is refused by the server and has no effect.
        await observer.nc.publish(f"$KV.{schemas.ENDPOINTS_BUCKET}.{key}", b"written by the observer")
        await settle(observer.nc)
        await eventually(lambda: any("permissions violation for publish" in e.lower() and schemas.ENDPOINTS_BUCKET in e
                                     for e in observer.permission_errors), timeout=10,
                         what="the server refusing the observer's write")
        assert await destination.get_raw(schemas.ENDPOINTS_BUCKET, key) == b"written by destination"

        # A client with no credential, over TLS with the right CA, is refused.
        anonymous = _dialing_the_service(BusCredentials(ca_file=chart_bus["ca"]))
        with pytest.raises(Exception) as refused:
            nc = await nats.connect(chart_bus["url"], **anonymous.connect_options(chart_bus["url"]),
                                    allow_reconnect=False, connect_timeout=10)
            await nc.close()
        assert "authorization violation" in str(refused.value).lower(), repr(refused.value)

        # A workload's token gets through identity's callout, with that workload's rights only.
        token = chart_bus["tmp"] / "web.token"
        token.write_text(pki.make_local_token(chart_bus["token_secret"], "shop", "web", "web-0",
                                              "identity.tulle.cluster.local"))
        from tulle.bus import Bus
        from tulle.metrics import Registry

        proxy = Bus(chart_bus["url"], component="proxy", registry=Registry(), credentials=_dialing_the_service(
            BusCredentials.for_workload(str(token), "shop", "web-0", ca_file=chart_bus["ca"])))
        await asyncio.wait_for(proxy.start(), 20)
        try:
            assert await proxy.get_raw(schemas.ENDPOINTS_BUCKET, key) == b"written by destination"
        finally:
            await proxy.close()
    finally:
        await observer.close()
        await destination.close()


# --- the CNI chart's DaemonSet runs the real installer ------------------------------------------------


def test_the_cni_daemonset_runs_the_installer_and_its_entry_is_what_the_plugin_reads(tmp_path):
    """The rendered container's command and args, run for real against folders standing
    for the node's (its hostPath mounts) and a service account mount, as the kubelet would."""
    import signal

    from tests.conftest import wait_until
    from tulle.cni import decide

    objects = render("tulle-cni", {}, namespace="tulle-cni")
    installer = containers(objects)["tulle-cni/install-cni"]
    plugin_json = find(objects, "ConfigMap", "tulle-cni-config")["data"]["plugin.json"]
    node = tmp_path / "node"
    (node / "etc/cni/net.d").mkdir(parents=True)
    (node / "etc/cni/net.d/10-bridge.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [{"type": "bridge", "bridge": "cni0"}]}))
    (tmp_path / "plugin.json").write_text(plugin_json)
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("token-1\n")
    (sa / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n")
    mounts = {m["mountPath"]: m["name"] for m in installer["volumeMounts"]}
    assert mounts["/etc/tulle-cni"] == "plugin-config" and mounts["/host/etc/cni/net.d"] == "cni-net-dir"
    args = [a.replace("=/host/", f"={node}/").replace("=/etc/tulle-cni/", f"={tmp_path}/") for a in installer["args"]]
    binary = Path(sys.executable).parent / installer["command"][0]
    assert binary.is_file(), f"{installer['command'][0]} is not an entry point of the package"
    proc = subprocess.Popen([str(binary), *installer["command"][1:], *args, "--service-account-dir", str(sa),
                             "--interval", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={"PATH": os.environ["PATH"], "KUBERNETES_SERVICE_HOST": "10.96.0.1",
                                 "KUBERNETES_SERVICE_PORT": "443"})
    conflist = node / "etc/cni/net.d/10-bridge.conflist"
    kubeconfig = node / "etc/cni/net.d/tulle-cni-kubeconfig"

    def entry():
        plugins = json.loads(conflist.read_text())["plugins"] if conflist.exists() else []
        return next((p for p in plugins if p.get("type") == "tulle-cni"), None)

    try:
        tulle = wait_until(entry, timeout=30, what="the installer's entry in the conflist")
        assert (node / "opt/cni/bin/tulle-cni").stat().st_mode & 0o111
        # The plugin, run by the node's runtime, finds its kubeconfig at the node's path.
        assert tulle["kubernetes"]["kubeconfig"] == "/etc/cni/net.d/tulle-cni-kubeconfig"
        user = json.loads(kubeconfig.read_text())["users"][0]["user"]
        assert user == {"token": "token-1"}  # inline: the pod's token file does not exist on the node
        cfg = decide.proxy_init_config(tulle, {})
        assert (cfg.inbound_port, cfg.outbound_port, cfg.proxy_uid) == (4143, 4140, 2102)
        assert {p for r in cfg.inbound_ports_to_ignore for p in range(r.first, r.last + 1)} == {4190, 4191, 4567, 4568}
        assert {p for r in cfg.outbound_ports_to_ignore for p in range(r.first, r.last + 1)} == {4567, 4568}
        assert tulle["proxy"]["iptables_mode"] == "nft"
        # A rotated projected token reaches the kubeconfig; SIGTERM takes everything away.
        (sa / "token").write_text("token-2\n")
        wait_until(lambda: '"token-2"' in kubeconfig.read_text(), timeout=30, what="the rotated token")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert entry() is None and not kubeconfig.exists() and not (node / "opt/cni/bin/tulle-cni").exists()
