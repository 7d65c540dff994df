"""Local mode's pure decisions (tulle/local/plan.py): no process, socket or file."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.config import from_env as proxy_config_from_env
from tulle.errors import UserError
from tulle import pki
from tulle.local import plan
from tulle.resources import model as m
from tulle.resources.parse import parse_object


def workload(name="web", ns="demo", ports=(("http", 8080),), env=(), labels=None, annotations=None, sa="web"):
    return m.Workload(
        meta=m.Meta(name=name, namespace=ns, labels=labels or {"app": name}, annotations=annotations or {}),
        command=("python", "app.py"), service_account=sa,
        ports=tuple(m.ContainerPort(p, n) for n, p in ports), env=tuple(env),
        probes=(m.HTTPProbe("/ready", "http"),), base_dir="/srv/demo")


def service(name, ns="demo", cluster_ip="10.96.1.2", selector=None, ports=((80, "http"),)):
    return m.Service(m.Meta(name=name, namespace=ns), tuple(m.ServicePort(p, t) for p, t in ports),
                     selector if selector is not None else {"app": name}, cluster_ip)


# --- isolation ---------------------------------------------------------------------------


def test_auto_isolation_is_netns_only_for_root_on_linux_with_ip_and_iptables():
    full = dict(is_root=True, is_linux=True, have_ip=True, have_iptables=True)
    assert plan.resolve_isolation("auto", **full) == "netns"
    for missing in full:
        assert plan.resolve_isolation("auto", **dict(full, **{missing: False})) == "none"


def test_netns_isolation_without_root_is_a_one_line_user_error_naming_root():
    with pytest.raises(UserError) as e:
        plan.resolve_isolation("netns", is_root=False, is_linux=True, have_ip=True, have_iptables=True)
    assert "root" in str(e.value) and "--isolation none" in str(e.value) and "\n" not in str(e.value)


def test_none_isolation_is_always_possible():
    assert plan.resolve_isolation("none", is_root=False, is_linux=False, have_ip=False, have_iptables=False) == "none"


# --- subnets and addresses ------------------------------------------------------------------


def test_workload_addresses_are_distinct_inside_the_subnet_and_never_the_bridge():
    subnet = plan.subnet_of("netns", 150)
    addrs = [plan.workload_address("netns", 150, i) for i in range(600)]
    assert len(set(addrs)) == 600
    assert plan.bridge_address(150) not in addrs
    for a in addrs:
        ip = ipaddress.ip_address(a)
        assert ip in subnet and a.split(".")[3] not in ("0", "255")


def test_loopback_addresses_without_namespaces():
    assert plan.workload_address("none", 130, 0) == "127.130.1.1"
    assert ipaddress.ip_address(plan.workload_address("none", 130, 300)).is_loopback


def test_a_subnet_overlapping_a_routed_network_is_not_free():
    taken = [ipaddress.ip_network("10.150.3.0/24"), ipaddress.ip_network("0.0.0.0/0")]
    assert not plan.subnet_free(plan.subnet_of("netns", 150), taken)
    assert plan.subnet_free(plan.subnet_of("netns", 151), taken)  # the default route is no conflict


def test_the_hosts_loopback_network_does_not_block_loopback_subnets_but_a_bound_address_does():
    lo = ipaddress.ip_network("127.0.0.0/8")
    assert plan.subnet_free(plan.subnet_of("none", 140), [lo])
    assert not plan.subnet_free(plan.subnet_of("none", 140), [lo, ipaddress.ip_network("127.140.1.1/32")])


def test_subnet_candidates_never_include_the_cluster_ip_range_and_differ_by_seed():
    a, b = plan.subnet_candidates(1), plan.subnet_candidates(2)
    assert sorted(a) == sorted(b) and 96 not in a and a != b
    assert all(not plan.subnet_of("netns", n).overlaps(ipaddress.ip_network("10.96.0.0/16")) for n in a)


def test_first_free_index_reuses_gaps():
    assert plan.first_free_index([]) == 0
    assert plan.first_free_index([0, 1, 3]) == 2


# --- names --------------------------------------------------------------------------------


def test_interface_names_fit_the_kernels_15_characters():
    for n in (100, 254):
        for i in (0, 9999):
            assert len(plan.veth_name(n, i)) <= 15 and len(plan.veth_peer_name(n, i)) <= 15
        assert len(plan.bridge_name(n)) <= 15


def test_long_namespace_names_are_shortened_stably_and_stay_distinct():
    a = plan.netns_name(200, "a-very-long-namespace-name", "a-very-long-workload-name-indeed-1")
    b = plan.netns_name(200, "a-very-long-namespace-name", "a-very-long-workload-name-indeed-2")
    assert len(a) <= 60 and a != b and a == plan.netns_name(200, "a-very-long-namespace-name",
                                                           "a-very-long-workload-name-indeed-1")
    assert plan.netns_name(200, "demo", "web") == "tl200-demo-web"


# --- environments ----------------------------------------------------------------------------


def test_a_meshed_app_without_namespaces_reaches_others_through_its_proxy_as_http_proxy():
    w = workload(ports=(("http", 8080), ("admin-port", 9000)))
    env = plan.app_env({"PATH": "/bin"}, w, plan.Placement("none", "127.140.1.1", True))
    assert env["HOST"] == "127.140.1.1" and env["PORT"] == "8080" and env["PORT_ADMIN_PORT"] == "9000"
    assert env["HTTP_PROXY"] == env["http_proxy"] == "http://127.140.1.1:4140"
    assert "127.140.1.1" in env["no_proxy"].split(",")
    assert env["TULLE_WORKLOAD"] == "web" and env["TULLE_NAMESPACE"] == "demo"


def test_an_app_in_a_namespace_binds_all_addresses_and_never_inherits_a_users_http_proxy():
    env = plan.app_env({"HTTP_PROXY": "http://corp:3128", "https_proxy": "x", "PATH": "/bin"}, workload(),
                       plan.Placement("netns", "10.150.1.1", True, "tl150-demo-web"))
    assert env["HOST"] == "0.0.0.0" and env["POD_IP"] == "10.150.1.1"
    assert not any(k.lower().endswith("_proxy") for k in env)


def test_the_workloads_own_env_wins():
    env = plan.app_env({}, workload(env=(("PORT", "1234"), ("FAILURE_RATE", "0.5"))),
                       plan.Placement("none", "127.140.1.1", False))
    assert env["PORT"] == "1234" and env["FAILURE_RATE"] == "0.5" and "HTTP_PROXY" not in env


ANCHORS = pki.new_trust_anchor().cert_pem.decode()


def values(default_inbound_policy="all-unauthenticated", networks=(), **kw):
    return plan.install_values(trust_anchors_pem=ANCHORS, nats_url="nats://10.150.0.1:4222",
                               default_inbound_policy=default_inbound_policy, networks=networks, **kw)


def injected_env(w, placement, namespace=None, **kw) -> dict[str, str]:
    return plan.proxy_env({"PATH": "/bin"}, w, placement, plan.inject(w, namespace, values(**kw)),
                          token_file="/state/identity/tokens/demo.web.token")


@pytest.mark.parametrize("isolation,address", [("netns", "10.150.1.1"), ("none", "127.140.1.1")])
def test_the_proxy_environment_is_what_proxy_config_reads(isolation, address):
    w = workload()
    anchors = ANCHORS
    injection = plan.inject(w, None, values("deny", plan.cluster_networks(isolation, 150)))
    env = plan.proxy_env({"PATH": "/bin", "TULLE_NATS_CREDS": "/root/other.nk"}, w, plan.Placement(isolation, address, True),
                         injection, token_file="/state/identity/tokens/demo.web.token")
    assert "TULLE_NATS_CREDS" not in env  # a proxy logs in with its workload's token, never a role's key
    cfg = proxy_config_from_env(env)
    assert cfg.trust_anchors_pem.strip() == anchors.strip().encode() and cfg.default_inbound_policy == "deny"
    assert cfg.cluster_networks == (("10.150.0.0/16",) if isolation == "netns" else ("127.0.0.0/8",))
    assert (cfg.namespace, cfg.workload, cfg.service_account) == ("demo", "web", "web")
    assert cfg.identity == "web.demo.serviceaccount.identity.tulle.cluster.local"
    assert cfg.nats_url == "nats://10.150.0.1:4222" and cfg.token_file.endswith("demo.web.token")
    if isolation == "netns":
        assert cfg.transparent and cfg.inbound_addr == ("0.0.0.0", 4143) and cfg.outbound_addr == ("127.0.0.1", 4140)
        assert cfg.app_host == "127.0.0.1"
    else:
        assert not cfg.transparent and cfg.app_default_port == 8080 and cfg.app_host == address
        assert cfg.inbound_addr == (address, 4143) and cfg.outbound_addr == (address, 4140)
        assert cfg.admin_addr == (address, 4191)


def test_only_the_renewal_pacing_of_the_invoking_environment_reaches_proxies():
    w = workload()
    injection = plan.inject(w, None, values("deny", plan.cluster_networks("none", 140)))
    env = plan.proxy_env({"PATH": "/bin", "TULLE_PROXY_IDENTITY_MIN_REFRESH": "1s",
                          "TULLE_PROXY_IDENTITY_MAX_REFRESH": "4s", "TULLE_PROXY_INBOUND_ADDR": "0.0.0.0:1"},
                         w, plan.Placement("none", "127.140.1.1", True), injection, token_file="/t")
    assert env["TULLE_PROXY_IDENTITY_MIN_REFRESH"] == "1s" and env["TULLE_PROXY_IDENTITY_MAX_REFRESH"] == "4s"
    assert env["TULLE_PROXY_INBOUND_ADDR"] == "127.140.1.1:4143"  # the runner's, never the caller's


@pytest.mark.parametrize("pod,ns,expected", [
    ({}, {}, "all-authenticated"),  # the install's (cluster) default
    ({}, {m.DEFAULT_POLICY_ANNOTATION: "deny"}, "deny"),  # the namespace's
    ({m.DEFAULT_POLICY_ANNOTATION: "cluster-unauthenticated"}, {m.DEFAULT_POLICY_ANNOTATION: "deny"},
     "cluster-unauthenticated"),  # the pod's wins
])
def test_the_default_inbound_policy_is_the_pods_else_its_namespaces_else_the_installs(pod, ns, expected):
    w = workload(annotations=pod)
    namespace = m.Namespace(m.Meta(name="demo", namespace="", annotations=ns))
    env = injected_env(w, plan.Placement("netns", "10.150.1.1", True), namespace,
                       default_inbound_policy="all-authenticated")
    assert env["TULLE_PROXY_DEFAULT_INBOUND_POLICY"] == expected


# --- through the injector's core: what the webhook would make of the pod --------------------------


def test_the_proxy_gets_the_env_the_webhook_gives_it_with_the_fields_resolved_from_the_pod():
    from services.injector import core

    w = workload(annotations={"config.tulle.dev/opaque-ports": "5432,6000-6010", "config.tulle.dev/proxy-log-level": "debug"})
    injection = plan.inject(w, None, values())
    container = next(c for c in injection.pod["spec"]["initContainers"] if c["name"] == plan.PROXY_CONTAINER)
    assert container == core.proxy_container(injection.plan.config, values(), native=True)
    env = injected_env(w, plan.Placement("netns", "10.150.1.1", True))
    webhook = {e["name"]: e.get("value") for e in container["env"]}
    # Everything the webhook sets but what is the run's own: the token file, the addresses.
    for name, value in webhook.items():
        if value is not None and name != "TULLE_PROXY_TOKEN_FILE" and not name.endswith("_ADDR"):
            assert env[name] == value, name
    assert (env["TULLE_PROXY_NAMESPACE"], env["TULLE_PROXY_WORKLOAD"], env["TULLE_PROXY_SERVICE_ACCOUNT"]) == \
        ("demo", "web", "web")  # the webhook's fieldRefs, resolved as the kubelet would
    cfg = proxy_config_from_env(env)
    assert cfg.opaque_ports == frozenset({5432, *range(6000, 6011)}) and env["TULLE_PROXY_LOG_LEVEL"] == "debug"
    assert cfg.shutdown_grace_s == 3  # local mode's: `tulle down` waits for it


def test_the_namespaces_config_annotations_reach_the_proxy_and_are_copied_onto_the_pod():
    namespace = m.Namespace(m.Meta(name="demo", namespace="", annotations={
        "config.tulle.dev/opaque-ports": "7000", "tulle.dev/inject": "enabled"}))
    w = workload()
    injection = plan.inject(w, namespace, values())
    assert injection.pod["metadata"]["annotations"]["config.tulle.dev/opaque-ports"] == "7000"
    env = injected_env(w, plan.Placement("none", "127.140.1.1", True), namespace)
    assert proxy_config_from_env(env).opaque_ports == frozenset({7000})


def test_a_workload_the_webhook_would_skip_is_not_injected_and_says_why():
    bad = plan.inject(workload(annotations={m.DEFAULT_POLICY_ANNOTATION: "allow-all"}), None, values())
    assert not bad.injected and "allow-all" in bad.plan.reason and m.DEFAULT_POLICY_ANNOTATION in bad.plan.reason
    assert bad.pod["spec"] == plan.declared_pod(workload())["spec"]  # nothing added
    with pytest.raises(ValueError, match="was not injected"):
        plan.pod_manifest(workload(), plan.Placement("netns", "10.150.1.1", True), ready=True, injection=bad)


# --- the Pod manifest ---------------------------------------------------------------------------


def meshed_manifest(w, placement, ready=True) -> dict:
    return plan.pod_manifest(w, placement, ready=ready, injection=plan.inject(w, None, values()))


def test_the_pod_manifest_parses_as_a_pod_with_address_readiness_account_and_ports():
    w = workload()
    pod = parse_object(meshed_manifest(w, plan.Placement("netns", "10.150.1.1", True, "ns")))
    assert isinstance(pod, m.Pod)
    assert (pod.meta.namespace, pod.meta.name, pod.ip, pod.ready) == ("demo", "web", "10.150.1.1", True)
    assert pod.service_account == "web" and pod.meshed and pod.meta.labels["app"] == "web"
    assert pod.port_number("http") == 8080 and pod.probes == (m.HTTPProbe("/ready", "http"),)
    assert m.PROXY_INBOUND_PORT_ANNOTATION not in pod.meta.annotations  # iptables does the redirect


def test_a_meshed_pod_is_the_pod_the_webhook_would_make_of_the_workload():
    import jsonpatch

    from services.injector import core

    w = workload()
    doc = meshed_manifest(w, plan.Placement("netns", "10.150.1.1", True, "ns"))
    declared = plan.declared_pod(w)
    declared["metadata"]["annotations"][core.INJECT] = "enabled"
    webhook = core.plan_pod(core.Target("Pod", "web", "demo", declared), {}, values(), core.WEBHOOK)
    expected = jsonpatch.apply_patch(declared, webhook.ops)
    assert {k: doc[k] for k in ("apiVersion", "kind", "metadata")} == {k: expected[k] for k in ("apiVersion", "kind", "metadata")}
    assert doc["spec"] == {**expected["spec"], "nodeName": "local"}
    assert [c["name"] for c in doc["spec"]["initContainers"]] == ["tulle-init", "tulle-proxy"]  # native sidecar
    assert doc["metadata"]["labels"]["tulle.dev/workload-ns"] == "demo"
    assert doc["metadata"]["annotations"]["tulle.dev/trust-root-sha256"] == values().trust_root_sha256


def test_a_pod_is_not_ready_until_told_and_unmeshed_pods_have_no_proxy_container():
    pod = parse_object(plan.pod_manifest(workload(), plan.Placement("none", "127.140.1.1", False), ready=False))
    assert not pod.ready and not pod.meshed


def test_without_namespaces_a_meshed_pod_says_where_its_inbound_proxy_listens():
    pod = parse_object(meshed_manifest(workload(), plan.Placement("none", "127.140.1.1", True)))
    assert pod.meta.annotations[m.PROXY_INBOUND_PORT_ANNOTATION] == "4143" and pod.meshed


# --- hosts files ---------------------------------------------------------------------------------


def test_hosts_map_every_service_name_to_its_cluster_ip_with_short_names_in_the_own_namespace():
    text = plan.hosts_file("web", "10.150.1.1", "demo", [
        service("authors", cluster_ip="10.96.3.4"), service("db", ns="other", cluster_ip="10.96.5.6"),
        service("headless", cluster_ip="None")])
    lines = {line.split("\t")[0]: line.split("\t")[1].split() for line in text.strip().splitlines()}
    assert lines["10.96.3.4"] == ["authors", "authors.demo", "authors.demo.svc", "authors.demo.svc.cluster.local"]
    assert lines["10.96.5.6"] == ["db.other", "db.other.svc", "db.other.svc.cluster.local"]
    assert lines["10.150.1.1"] == ["web"] and "localhost" in lines["127.0.0.1"]
    assert "headless" not in text


# --- iptables ---------------------------------------------------------------------------------------


def test_proxy_init_rules_redirect_inbound_except_admin_ports_and_outbound_except_the_proxy_and_loopback():
    rules = [r for r in plan.proxy_init_rules().splitlines() if r.startswith("-A")]
    redirect = [r for r in rules if r.startswith(f"-A {plan.REDIRECT_CHAIN}")]
    output = [r for r in rules if r.startswith(f"-A {plan.OUTPUT_CHAIN}")]
    assert "--dports 4190,4191 -j RETURN" in redirect[0]
    assert "-j REDIRECT --to-ports 4143" in redirect[-1]
    assert "--uid-owner 2102 -j RETURN" in output[0] and "--gid-owner 2102 -j RETURN" in output[1]
    assert "-o lo -j RETURN" in output[2]
    assert "-j REDIRECT --to-ports 4140" in output[-1]
    assert f"-A PREROUTING -j {plan.REDIRECT_CHAIN}" in "\n".join(rules)
    assert f"-A OUTPUT -j {plan.OUTPUT_CHAIN}" in "\n".join(rules)


def test_many_ignored_ports_are_split_into_rules_of_at_most_15():
    text = plan.proxy_init_rules(inbound_ports_to_ignore=range(5000, 5040))
    multiport = [r for r in text.splitlines() if "multiport" in r]
    assert len(multiport) == 3 and all(len(r.split("--dports ")[1].split()[0].split(",")) <= 15 for r in multiport)


# --- the status view ---------------------------------------------------------------------------------


def test_services_list_the_workloads_their_selector_picks_in_their_namespace():
    ws = [workload("web"), workload("web-2", labels={"app": "web"}), workload("authors"),
          workload("web", ns="other")]
    view = plan.services_view([service("web")], ws, {"demo.web": True})
    assert view[0]["endpoints"] == [{"workload": "web", "ready": True}, {"workload": "web-2", "ready": False}]
    assert view[0]["cluster_ip"] == "10.96.1.2" and view[0]["ports"][0]["target_port"] == "http"


def test_restarts_back_off_exponentially_up_to_a_cap():
    assert [plan.restart_delay(i) for i in range(1, 5)] == [0.5, 1.0, 2.0, 4.0]
    assert plan.restart_delay(50) == 30.0
