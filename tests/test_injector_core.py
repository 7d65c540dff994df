"""The injection core, pure: inject or skip and why, pod > namespace > values, the
proxy's environment contract, the patch (RFC 6902, applied with jsonpatch), startup
ordering, and a proxy of another version replaced where it stood."""

from __future__ import annotations

import copy
import hashlib

import jsonpatch
import pytest

from services.injector import core
from services.injector.values import Values, from_tree
from tests.injector_support import ANCHORS_PEM, pod, values
from tulle.errors import UserError


def plan(obj, ns=None, v=None, origin=core.WEBHOOK, owner=("", "")):
    meta = obj["metadata"]
    target = core.Target("Pod", meta.get("name", ""), meta.get("namespace", ""), obj, "", *owner)
    return core.plan_pod(target, ns or {}, v or values(), origin)


def injected(obj, **kw):
    p = plan(obj, **kw)
    assert p.inject, p.reason
    return jsonpatch.apply_patch(obj, p.ops)


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def container(obj, name):
    spec = obj["spec"]
    found = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"{len(found)} containers named {name}"
    return found[0]


# --- inject or skip -----------------------------------------------------------------------------------

ENABLED = {core.INJECT: "enabled"}


@pytest.mark.parametrize("ns_value,pod_value,inject", [
    ("enabled", "", True), ("enabled", "enabled", True), ("enabled", "disabled", False),
    ("ingress", "", True), ("disabled", "enabled", True), ("", "enabled", True), ("", "ingress", True),
    ("disabled", "disabled", False), ("", "disabled", False), ("disabled", "", False), ("", "", False),
])
def test_the_webhook_follows_linkerds_truth_table_for_the_inject_annotation(ns_value, pod_value, inject):
    ns = {core.INJECT: ns_value} if ns_value else {}
    obj = pod(annotations={core.INJECT: pod_value} if pod_value else None)
    assert plan(obj, ns=ns).inject is inject


def test_the_cli_injects_unless_the_pod_says_disabled():
    assert plan(pod(), origin=core.CLI).inject
    p = plan(pod(annotations={core.INJECT: "disabled"}), origin=core.CLI)
    assert not p.inject and p.reason == 'pod has the annotation "tulle.dev/inject: disabled"'


@pytest.mark.parametrize("obj,ns,reason", [
    (pod(annotations=ENABLED, hostNetwork=True), {}, "hostNetwork is enabled"),
    (pod(namespace="kube-system", annotations=ENABLED), {}, 'pods in namespace "kube-system" are never injected'),
    (pod(namespace="tulle", annotations=ENABLED), {}, 'pods in the control plane\'s namespace "tulle" are not injected'),
    (pod(), {}, 'neither the namespace nor the pod have the annotation "tulle.dev/inject: enabled"'),
    (pod(annotations={core.INJECT: "yes"}), {}, 'invalid value "yes" for annotation "tulle.dev/inject" at workload'),
    (pod(), {core.INJECT: "true"}, 'invalid value "true" for annotation "tulle.dev/inject" at namespace'),
    (pod(annotations={**ENABLED, "config.tulle.dev/proxy-cpu-request": "lots"}), {},
     'invalid value "lots" for annotation "config.tulle.dev/proxy-cpu-request": not a Kubernetes quantity'),
    (pod(annotations=ENABLED), {"config.tulle.dev/default-inbound-policy": "open"},
     'invalid value "open" for annotation "config.tulle.dev/default-inbound-policy (from the namespace)"'),
    (pod(annotations={**ENABLED, "config.tulle.dev/skip-outbound-ports": "443,smtp"}), {},
     'invalid value "443,smtp" for annotation "config.tulle.dev/skip-outbound-ports"'),
    (pod(annotations={**ENABLED, "config.tulle.dev/proxy-uid": "root"}), {},
     'invalid value "root" for annotation "config.tulle.dev/proxy-uid": expected a whole number'),
])
def test_skips_say_why_naming_the_annotation_and_its_value(obj, ns, reason):
    p = plan(obj, ns=ns)
    assert not p.inject and p.ops == []
    assert p.reason.startswith(reason)


def test_without_trust_anchors_nothing_is_injected():
    p = plan(pod(annotations=ENABLED), v=values(trust_anchors_pem=""))
    assert not p.inject and "trust anchors" in p.reason


def test_udp_ports_are_a_warning_not_a_skip():
    obj = pod(annotations=ENABLED, containers=[{"name": "dns", "image": "coredns", "ports": [
        {"containerPort": 53, "protocol": "UDP"}]}])
    p = plan(obj)
    assert p.inject and p.warnings == ["UDP port(s) configured on pod spec: UDP traffic is not proxied"]


# --- the proxy's settings ----------------------------------------------------------------------------


def test_the_proxys_environment_follows_the_contract_exactly():
    out = injected(pod(annotations=ENABLED), v=values(nats_url="nats://nats.tulle:4222"))
    env = env_of(container(out, "tulle-proxy"))
    assert list(env) == [
        "TULLE_NATS_URL", "TULLE_PROXY_NAMESPACE", "TULLE_PROXY_WORKLOAD", "TULLE_PROXY_SERVICE_ACCOUNT",
        "TULLE_PROXY_TRUST_DOMAIN", "TULLE_PROXY_CLUSTER_DOMAIN", "TULLE_PROXY_TOKEN_FILE",
        "TULLE_PROXY_IDENTITY_TRUST_ANCHORS", "TULLE_PROXY_DEFAULT_INBOUND_POLICY", "TULLE_PROXY_OPAQUE_PORTS",
        "TULLE_PROXY_CLUSTER_NETWORKS", "TULLE_PROXY_INBOUND_ADDR", "TULLE_PROXY_OUTBOUND_ADDR",
        "TULLE_PROXY_ADMIN_ADDR", "TULLE_PROXY_LOG_LEVEL", "TULLE_LOG_FORMAT", "TULLE_PROXY_SHUTDOWN_GRACE_PERIOD",
        "TULLE_PROXY_SHUTDOWN_ENDPOINT"]
    assert env["TULLE_NATS_URL"] == "nats://nats.tulle:4222"
    assert env["TULLE_PROXY_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["TULLE_PROXY_WORKLOAD"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["TULLE_PROXY_SERVICE_ACCOUNT"] == {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}
    assert env["TULLE_PROXY_TOKEN_FILE"] == "/var/run/secrets/tokens/tulle-identity-token"
    assert env["TULLE_PROXY_IDENTITY_TRUST_ANCHORS"] == ANCHORS_PEM
    assert env["TULLE_PROXY_INBOUND_ADDR"] == "0.0.0.0:4143"
    assert env["TULLE_PROXY_OUTBOUND_ADDR"] == "127.0.0.1:4140"
    assert env["TULLE_PROXY_ADMIN_ADDR"] == "0.0.0.0:4191"
    assert env["TULLE_LOG_FORMAT"] == "json" and env["TULLE_PROXY_SHUTDOWN_ENDPOINT"] == "false"


def test_with_a_nats_ca_the_proxy_reads_it_from_a_file_made_from_the_pods_annotation():
    ca = "-----BEGIN CERTIFICATE-----\nMIIBnats\n-----END CERTIFICATE-----\n"
    out = injected(pod(annotations=ENABLED), v=values(nats_ca_pem=ca))
    proxy = container(out, "tulle-proxy")
    assert env_of(proxy)["TULLE_NATS_CA"] == "/var/run/tulle/nats/ca.crt"
    assert out["metadata"]["annotations"]["tulle.dev/nats-ca"] == ca
    volume = next(v for v in out["spec"]["volumes"] if v["name"] == "tulle-nats-ca")
    assert volume["downwardAPI"]["items"] == [
        {"path": "ca.crt", "fieldRef": {"fieldPath": "metadata.annotations['tulle.dev/nats-ca']"}}]
    assert {"mountPath": "/var/run/tulle/nats", "name": "tulle-nats-ca", "readOnly": True} in proxy["volumeMounts"]


@pytest.mark.parametrize("pod_ann,ns_ann,value,expected", [
    ({}, {}, "all-unauthenticated", "all-unauthenticated"),
    ({}, {}, "deny", "deny"),
    ({}, {"config.tulle.dev/default-inbound-policy": "cluster-authenticated"}, "deny", "cluster-authenticated"),
    ({"config.tulle.dev/default-inbound-policy": "all-authenticated"},
     {"config.tulle.dev/default-inbound-policy": "cluster-authenticated"}, "deny", "all-authenticated"),
])
def test_config_comes_from_the_pod_then_its_namespace_then_the_install_values(pod_ann, ns_ann, value, expected):
    out = injected(pod(annotations={**ENABLED, **pod_ann}), ns={core.INJECT: "enabled", **ns_ann},
                   v=values(default_inbound_policy=value))
    assert env_of(container(out, "tulle-proxy"))["TULLE_PROXY_DEFAULT_INBOUND_POLICY"] == expected


def test_the_namespaces_config_annotations_are_copied_onto_the_pod_when_it_lacks_them():
    ns = {core.INJECT: "enabled", "config.tulle.dev/proxy-cpu-limit": "1", "config.tulle.dev/proxy-log-level": "debug",
          "unrelated.example.com/x": "y"}
    out = injected(pod(annotations={"config.tulle.dev/proxy-log-level": "warn"}), ns=ns)
    ann = out["metadata"]["annotations"]
    assert ann["config.tulle.dev/proxy-cpu-limit"] == "1" and ann[core.INJECT] == "enabled"
    assert ann["config.tulle.dev/proxy-log-level"] == "warn"  # the pod's own wins
    assert "unrelated.example.com/x" not in ann
    proxy = container(out, "tulle-proxy")
    assert proxy["resources"]["limits"]["cpu"] == "1" and env_of(proxy)["TULLE_PROXY_LOG_LEVEL"] == "warn"


def test_resources_and_ports_come_from_annotations():
    out = injected(pod(annotations={**ENABLED, "config.tulle.dev/proxy-cpu-request": "250m",
                                    "config.tulle.dev/proxy-memory-limit": "1Gi", "config.tulle.dev/admin-port": "9191",
                                    "config.tulle.dev/skip-inbound-ports": "9000-9010"}))
    proxy = container(out, "tulle-proxy")
    assert proxy["resources"] == {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/live", "port": 9191}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 9191}
    assert env_of(proxy)["TULLE_PROXY_ADMIN_ADDR"] == "0.0.0.0:9191"
    args = container(out, "tulle-init")["args"]
    assert args[args.index("--inbound-ports-to-ignore") + 1] == "4190,9191,9000-9010"


def test_the_proxy_runs_locked_down_as_2102():
    proxy = container(injected(pod(annotations=ENABLED)), "tulle-proxy")
    assert proxy["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "privileged": False,
        "readOnlyRootFilesystem": True, "runAsNonRoot": True, "runAsUser": 2102,
        "seccompProfile": {"type": "RuntimeDefault"}}
    assert proxy["ports"] == [{"containerPort": 4143, "name": "tulle-proxy"},
                              {"containerPort": 4191, "name": "tulle-admin"}]


def test_proxy_init_gets_only_the_network_capabilities_it_needs():
    init = container(injected(pod(annotations=ENABLED)), "tulle-init")
    assert init["command"] == ["tulle", "proxy-init"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert init["securityContext"]["runAsUser"] == 65534 and init["securityContext"]["runAsNonRoot"] is True
    assert init["volumeMounts"] == [{"mountPath": "/run", "name": "tulle-proxy-init-xtables-lock"}]
    assert init["args"][:4] == ["--firewall-bin-path", "iptables-nft", "--firewall-save-bin-path", "iptables-nft-save"]


def test_in_cni_mode_the_network_validator_replaces_proxy_init():
    out = injected(pod(annotations=ENABLED), v=values(cni_enabled=True))
    names = [c["name"] for c in out["spec"]["initContainers"]]
    assert names == ["tulle-network-validator", "tulle-proxy"]
    assert "tulle-proxy-init-xtables-lock" not in [v["name"] for v in out["spec"]["volumes"]]
    validator = out["spec"]["initContainers"][0]
    assert validator["command"] == ["tulle", "network-validator"]
    assert "NET_ADMIN" not in str(validator["securityContext"])


# --- metadata ------------------------------------------------------------------------------------------


def test_annotations_and_labels_say_who_injected_which_version_for_which_trust_root():
    out = injected(pod(annotations=ENABLED), owner=("deployment", "web"))
    ann, labels = out["metadata"]["annotations"], out["metadata"]["labels"]
    assert ann["tulle.dev/created-by"].startswith("tulle/proxy-injector ")
    assert ann["tulle.dev/proxy-version"] == "v0.1.0"
    assert ann["tulle.dev/trust-root-sha256"] == hashlib.sha256(ANCHORS_PEM.encode()).hexdigest()
    assert labels == {"app": "web", "tulle.dev/control-plane-ns": "tulle", "tulle.dev/proxy-deployment": "web",
                      "tulle.dev/workload-ns": "shop"}


def test_annotation_keys_are_escaped_in_the_patch_paths():
    ops = plan(pod(annotations=ENABLED)).ops
    paths = [op["path"] for op in ops]
    assert "/metadata/annotations/tulle.dev~1proxy-version" in paths
    assert "/metadata/labels/tulle.dev~1control-plane-ns" in paths
    assert all(op["op"] == "add" for op in ops)


def test_the_default_opaque_ports_the_pod_exposes_become_its_opaque_ports_annotation():
    obj = pod(annotations=ENABLED, containers=[
        {"name": "db", "image": "postgres", "ports": [{"containerPort": 5432}, {"containerPort": 8008}]},
        {"name": "cache", "image": "redis", "ports": [{"containerPort": 6379}]}])
    assert injected(obj)["metadata"]["annotations"]["config.tulle.dev/opaque-ports"] == "5432,6379"
    assert "config.tulle.dev/opaque-ports" not in injected(pod(annotations=ENABLED))["metadata"]["annotations"]
    own = pod(annotations={**ENABLED, "config.tulle.dev/opaque-ports": "8008"}, containers=obj["spec"]["containers"])
    out = injected(own)
    assert out["metadata"]["annotations"]["config.tulle.dev/opaque-ports"] == "8008"
    assert env_of(container(out, "tulle-proxy"))["TULLE_PROXY_OPAQUE_PORTS"] == "8008"


def test_a_pod_without_annotations_or_labels_gets_the_maps_created_first():
    obj = pod(annotations=None, labels={})
    del obj["metadata"]["labels"]
    ops = plan(obj, ns={core.INJECT: "enabled"}).ops
    assert ops[0] == {"op": "add", "path": "/metadata/annotations", "value": {}}
    labels_at = [op["path"] for op in ops].index("/metadata/labels")
    assert ops[labels_at]["value"] == {}


def test_the_projected_token_has_the_identity_audience_of_the_trust_domain():
    out = injected(pod(annotations=ENABLED), v=values(trust_domain="example.org"))
    token = next(v for v in out["spec"]["volumes"] if v["name"] == "tulle-identity-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"] == {
        "path": "tulle-identity-token", "expirationSeconds": 86400, "audience": "identity.tulle.example.org"}
    identity = next(v for v in out["spec"]["volumes"] if v["name"] == "tulle-identity-end-entity")
    assert identity["emptyDir"] == {"medium": "Memory"}


# --- startup ordering ------------------------------------------------------------------------------------


def test_native_sidecar_by_default_right_after_proxy_init_and_before_the_apps_init_containers():
    obj = pod(annotations=ENABLED, initContainers=[{"name": "migrate", "image": "app:1", "command": ["migrate"]}])
    out = injected(obj)
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["tulle-init", "tulle-proxy", "migrate"]
    assert [c["name"] for c in out["spec"]["containers"]] == ["app"]
    proxy = out["spec"]["initContainers"][1]
    assert proxy["restartPolicy"] == "Always"
    assert proxy["startupProbe"] == {"httpGet": {"path": "/ready", "port": 4191}, "initialDelaySeconds": 0,
                                     "periodSeconds": 1, "failureThreshold": 120}
    assert "lifecycle" not in proxy


@pytest.mark.parametrize("how", ["value", "annotation", "namespace"])
def test_without_native_sidecars_the_proxy_is_the_first_container_and_the_app_waits_for_it(how):
    obj = pod(annotations={**ENABLED, **({"config.tulle.dev/proxy-enable-native-sidecar": "false"}
                                         if how == "annotation" else {})},
              initContainers=[{"name": "migrate", "image": "app:1"}])
    ns = {"config.tulle.dev/proxy-enable-native-sidecar": "false"} if how == "namespace" else {}
    out = injected(obj, ns=ns, v=values(native_sidecar=how != "value"))
    assert [c["name"] for c in out["spec"]["containers"]] == ["tulle-proxy", "app"]
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["migrate", "tulle-init"]
    proxy = out["spec"]["containers"][0]
    assert "restartPolicy" not in proxy and "startupProbe" not in proxy
    assert proxy["lifecycle"]["postStart"]["exec"]["command"][:5] == ["tulle", "proxy", "await", "--timeout", "2m"]


def test_the_annotation_can_turn_native_sidecars_on_against_the_value():
    out = injected(pod(annotations={**ENABLED, "config.tulle.dev/proxy-enable-native-sidecar": "true"}),
                   v=values(native_sidecar=False))
    assert out["spec"]["initContainers"][1]["name"] == "tulle-proxy"


def test_with_await_disabled_and_no_native_sidecar_the_proxy_comes_last_without_a_hook():
    out = injected(pod(annotations={**ENABLED, "config.tulle.dev/proxy-await": "disabled"}),
                   v=values(native_sidecar=False))
    assert [c["name"] for c in out["spec"]["containers"]] == ["app", "tulle-proxy"]
    assert "lifecycle" not in out["spec"]["containers"][1]


# --- already injected ----------------------------------------------------------------------------------


def test_a_proxy_of_another_version_is_replaced_where_it_stood_never_duplicated():
    obj = pod(annotations=ENABLED, initContainers=[{"name": "migrate", "image": "app:1"}])
    old = injected(obj, v=values(proxy_version="v0.0.9"))
    new = injected(old, v=values(proxy_version="v0.1.0"))
    assert [c["name"] for c in new["spec"]["initContainers"]] == ["tulle-init", "tulle-proxy", "migrate"]
    assert container(new, "tulle-proxy")["image"].endswith(":v0.1.0")
    assert [v["name"] for v in new["spec"]["volumes"]].count("tulle-identity-token") == 1
    assert new["metadata"]["annotations"]["tulle.dev/proxy-version"] == "v0.1.0"
    assert new["metadata"]["annotations"][core.INJECT] == "enabled"
    assert new == injected(obj, v=values(proxy_version="v0.1.0"))


def test_a_proxy_of_the_same_version_is_left_alone_by_the_webhook():
    once = injected(pod(annotations=ENABLED))
    p = plan(once)
    assert not p.inject and p.reason == "pod has a proxy of version v0.1.0 injected already"


def test_uninject_ops_take_back_exactly_what_injection_added():
    for v in (values(), values(native_sidecar=False), values(cni_enabled=True, nats_ca_pem=ANCHORS_PEM)):
        obj = pod(annotations=ENABLED, initContainers=[{"name": "migrate", "image": "app:1"}], volumes=[
            {"name": "data", "emptyDir": {}}])
        out = injected(obj, v=v)
        back = jsonpatch.apply_patch(out, core.uninject_ops(out, "", v.opaque_ports, keep_inject=True))
        assert back == obj


def test_services_get_only_the_opaque_ports_annotation_they_lack():
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"},
           "spec": {"ports": [{"port": 5432, "targetPort": 5432}, {"port": 80, "targetPort": 3306}]}}
    out = jsonpatch.apply_patch(svc, core.service_ops(svc, values()))
    assert out["metadata"] == {"name": "db", "annotations": {"config.tulle.dev/opaque-ports": "3306,5432"}}
    assert core.service_ops(out, values()) == []
    web = copy.deepcopy(svc)
    web["spec"]["ports"] = [{"port": 80}]
    assert core.service_ops(web, values()) == []


# --- values --------------------------------------------------------------------------------------------


def test_values_files_use_linkerds_names_and_refuse_unknown_keys():
    v = from_tree({"proxy": {"nativeSidecar": False, "image": {"version": "v9"}, "uid": "2200"},
                   "proxyInit": {"iptablesMode": "legacy"}, "cniEnabled": "true"}, "values.yaml")
    assert (v.native_sidecar, v.proxy_version, v.proxy_uid, v.iptables_mode, v.cni_enabled) == (
        False, "v9", 2200, "legacy", True)
    with pytest.raises(UserError, match=r"values.yaml: unknown value 'proxy.nativesidecar'"):
        from_tree({"proxy": {"nativesidecar": False}}, "values.yaml")
    with pytest.raises(UserError, match=r"values.yaml: proxy.await: expected true or false, got 'maybe'"):
        from_tree({"proxy": {"await": "maybe"}}, "values.yaml")
    with pytest.raises(UserError, match="proxyInit.iptablesMode must be nft or legacy"):
        Values().with_overrides({"proxyInit.iptablesMode": "ebpf"}, "--set")
