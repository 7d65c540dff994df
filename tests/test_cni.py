"""Tulle's CNI plugin driven the way a container runtime drives it: the DaemonSet's
installer places it and edits a conflist whose first plugins are Debian's real `bridge`
and `host-local`; ADD sets up a pod's network and then writes the proxy's rules in
its namespace (traffic really redirected), CHECK notices missing rules, DEL cleans
up, VERSION answers, errors are CNI error JSON. And the network validator, the init
container that proves redirection works before the app starts."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cni_support import REFERENCE_PLUGINS, Runtime, call
from tests.conftest import requires_netns
from tests.fakekube import FakeKube
from tests.netns_support import Netns, connect, listener, sh, veth
from tulle.cni import decide, plugin
from tulle.proxyinit import rules

BIN = Path(sys.executable).parent
needs_plugins = pytest.mark.skipif(not (REFERENCE_PLUGINS / "bridge").exists(),
                                   reason="needs the CNI reference plugins (Debian: containernetworking-plugins; "
                                          "make sysdeps installs them)")

MESHED_POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {
    "name": "web-1", "namespace": "shop", "annotations": {"config.tulle.dev/skip-outbound-ports": "5432"}},
    "spec": {"initContainers": [{"name": "tulle-network-validator", "image": "x"},
                                {"name": "tulle-proxy", "image": "x", "restartPolicy": "Always"}],
             "containers": [{"name": "web", "image": "x"}]}}
PLAIN_POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain-1", "namespace": "shop"},
             "spec": {"containers": [{"name": "plain", "image": "x"}]}}


# --- pure --------------------------------------------------------------------------------------------------


def test_the_decision_follows_the_pod_read_from_the_api():
    args = {"K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "web-1"}
    d = decide.decide({}, args, MESHED_POD)
    assert d.mesh and d.config.outbound_ports_to_ignore == (rules.PortRange(5432, 5432),)
    assert d.config.inbound_ports_to_ignore == (rules.PortRange(4190, 4190), rules.PortRange(4191, 4191))
    assert not decide.decide({}, {**args, "K8S_POD_NAME": "plain-1"}, PLAIN_POD).mesh
    assert decide.decide({}, {"K8S_POD_NAMESPACE": "kube-system", "K8S_POD_NAME": "x"}, MESHED_POD).reason == \
        "namespace kube-system is excluded"
    assert not decide.decide({}, {}, None).mesh


def test_without_an_api_the_plugin_configuration_names_the_meshed_namespaces():
    args = {"K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "web-1"}
    assert decide.decide({"mesh_namespaces": ["shop"]}, args, None).mesh
    assert decide.decide({"mesh_namespaces": ["*"], "proxy": {"uid": 2200}}, args, None).config.proxy_uid == 2200
    assert not decide.decide({"mesh_namespaces": ["other"]}, args, None).mesh
    with pytest.raises(decide.ConfigError, match='annotation "config.tulle.dev/inbound-port"'):
        decide.proxy_init_config({}, {"config.tulle.dev/inbound-port": "http"})


def run_plugin(env: dict, stdin: str) -> tuple[int, dict]:
    out = io.StringIO()
    code = plugin.main(io.StringIO(stdin), out, env)
    return code, json.loads(out.getvalue()) if out.getvalue() else None


def test_version_and_protocol_errors_are_cni_json():
    code, out = run_plugin({"CNI_COMMAND": "VERSION"}, '{"cniVersion": "1.0.0"}')
    assert code == 0 and out == {"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}
    code, out = run_plugin({"CNI_COMMAND": "ADD"}, "{not json")
    assert code == 1 and out["code"] == 6 and out["msg"] == "the network configuration on stdin is not JSON"
    code, out = run_plugin({"CNI_COMMAND": "ADD"}, '{"cniVersion": "0.2.0"}')
    assert code == 1 and out["code"] == 1
    code, out = run_plugin({"CNI_COMMAND": "ADD"}, '{"cniVersion": "1.0.0"}')
    assert code == 1 and out == {"cniVersion": "1.0.0", "code": 4, "msg": "CNI_CONTAINERID is not set", "details": ""}
    code, out = run_plugin({"CNI_COMMAND": "FROB"}, '{"cniVersion": "1.0.0"}')
    assert code == 1 and out["code"] == 4


def test_a_pod_that_is_not_meshed_passes_the_previous_result_through_unchanged():
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": [{"address": "10.1.2.3/24"}]}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/proc/1/ns/net", "CNI_IFNAME": "eth0",
           "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=plain-1"}
    code, out = run_plugin(env, json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "tulle-cni", "prevResult": prev}))
    assert code == 0 and out == prev


# --- the installer -------------------------------------------------------------------------------------------


def base_conflist(ipam_dir: Path, bridge: str, subnet: str) -> dict:
    gateway = subnet.rsplit(".", 1)[0] + ".1"
    return {"cniVersion": "1.0.0", "name": "tulle-test", "plugins": [
        {"type": "bridge", "bridge": bridge, "isGateway": False, "ipMasq": False,
         "ipam": {"type": "host-local", "dataDir": str(ipam_dir),
                  "ranges": [[{"subnet": subnet, "gateway": gateway, "rangeStart": subnet.rsplit(".", 1)[0] + ".10"}]]}},
        {"type": "portmap", "capabilities": {"portMappings": True}}]}


def installer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tulle-cni-install"), *args], capture_output=True, text=True, timeout=60)


def test_the_installer_places_the_plugin_and_its_entry_once_and_removes_both(tmp_path):
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    conf_dir.mkdir()
    single = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "bridge", "bridge": "cni0"}
    (conf_dir / "10-bridge.conf").write_text(json.dumps(single))
    flags = ["--cni-bin-dir", str(bin_dir), "--cni-conf-dir", str(conf_dir), "--api-server", "http://127.0.0.1:1",
             "--plugin-config", '{"exclude_namespaces": ["kube-system", "tulle"]}']
    first = installer(*flags)
    assert first.returncode == 0, first.stderr
    conflist = conf_dir / "10-bridge.conflist"
    assert not (conf_dir / "10-bridge.conf").exists()  # a lone .conf became a .conflist
    data = json.loads(conflist.read_text())
    assert [p["type"] for p in data["plugins"]] == ["bridge", "tulle-cni"]
    assert data["plugins"][1]["kubernetes"]["kubeconfig"] == str(conf_dir / "tulle-cni-kubeconfig")
    assert (bin_dir / "tulle-cni").stat().st_mode & 0o111
    before = conflist.read_text()
    assert installer(*flags).returncode == 0
    assert conflist.read_text() == before  # idempotent: still one entry
    # The placed plugin runs on its own (the node's python3, standard library only).
    version = subprocess.run([str(bin_dir / "tulle-cni")], input='{"cniVersion": "1.0.0"}', env={
        "CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin:" + str(Path(sys.executable).parent)},
        capture_output=True, text=True, timeout=30)
    assert json.loads(version.stdout)["supportedVersions"][-1] == "1.0.0"
    assert installer(*flags[:4], "--uninstall").returncode == 0
    assert [p["type"] for p in json.loads(conflist.read_text())["plugins"]] == ["bridge"]
    assert not (bin_dir / "tulle-cni").exists() and not (conf_dir / "tulle-cni-kubeconfig").exists()


# --- a pod network made by the real bridge plugin -----------------------------------------------------------


def free_subnet() -> str:
    routes = sh("ip", "-4", "route", "show", "table", "all").stdout
    for _ in range(50):
        n = random.randint(1, 250)
        if f"10.253.{n}." not in routes:
            return f"10.253.{n}.0/24"
    raise AssertionError("no free 10.253.x.0/24")


@pytest.fixture
def cni(tmp_path):
    """A node: the reference plugins, a conflist, Tulle installed into it, an API with pods."""
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    conf_dir.mkdir()
    subnet = free_subnet()
    bridge = f"tlcni{random.randint(1000, 9999)}"
    gateway = subnet.rsplit(".", 1)[0] + ".1"
    # The bridge with its address exists first, so the bridge plugin needs no gateway mode
    # (which would turn on the host's IP forwarding).
    sh("ip", "link", "add", bridge, "type", "bridge")
    sh("ip", "addr", "add", f"{gateway}/24", "dev", bridge)
    sh("ip", "link", "set", bridge, "up")
    (conf_dir / "10-test.conflist").write_text(json.dumps(base_conflist(tmp_path / "ipam", bridge, subnet)))
    kube = FakeKube().start()
    kube.apply(MESHED_POD)
    kube.apply(PLAIN_POD)
    out = installer("--cni-bin-dir", str(bin_dir), "--cni-conf-dir", str(conf_dir), "--api-server", kube.url)
    assert out.returncode == 0, out.stderr
    try:
        yield {"runtime": Runtime([bin_dir, REFERENCE_PLUGINS], conf_dir / "10-test.conflist"), "gateway": gateway,
               "bin": bin_dir, "conf": conf_dir, "kube": kube}
    finally:
        kube.stop()
        sh("ip", "link", "del", bridge, check=False)


def pod_ip(result: dict) -> str:
    return result["ips"][0]["address"].split("/")[0]


MESHED_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1"
PLAIN_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=plain-1"


@requires_netns
@needs_plugins
@pytest.mark.root
def test_chained_after_bridge_a_meshed_pods_traffic_goes_through_its_proxy(cni):
    rt = cni["runtime"]
    with Netns("tlcni") as pod:
        result = rt.add(pod.path, MESHED_ARGS)
        assert result["ips"] and result["interfaces"]  # bridge's result, passed through the chain
        nat = pod.nat()
        assert '-A PREROUTING -m comment --comment "proxy-init/install-proxy-init-prerouting" -j TULLE_PROXY_INIT_REDIRECT' in nat
        assert "--dports 5432" in nat  # the pod's own skip-outbound-ports annotation
        with listener(pod, 4140) as proxy:  # the app's outbound connection
            assert connect(pod, cni["gateway"], 9000).stdout.strip() == "hello from 4140"
            assert proxy.original_dst() == (cni["gateway"], 9000)
        with listener(pod, 4143) as proxy:  # a connection to the pod, from the node
            host = subprocess.run([sys.executable, "-c", "import socket,sys; s=socket.create_connection("
                                   f"('{pod_ip(result)}', 8080), timeout=5); print(s.recv(64).decode())"],
                                  capture_output=True, text=True, timeout=30)
            assert host.stdout.strip() == "hello from 4143", host.stderr
            assert proxy.original_dst() == (pod_ip(result), 8080)
        # The network validator, run inside the pod as its init container would, passes.
        validator = pod.exec(str(BIN / "tulle"), "network-validator", "--connect-addr",
                             f"{cni['gateway'].rsplit('.', 1)[0]}.250:20001", "--timeout", "10s", check=False)
        assert validator.returncode == 0, validator.stderr
        # CHECK passes; with the rules gone it fails with a CNI error.
        assert all(c.code == 0 for c in rt.check(pod.path, MESHED_ARGS, result))
        subprocess.run([str(BIN / "tulle"), "proxy-init", "--netns", pod.path, "--cleanup"], check=True,
                       capture_output=True)
        failed = rt.check(pod.path, MESHED_ARGS, result)[-1]
        assert failed.code == 1 and failed.out["code"] == plugin.RULES_MISSING
        assert failed.out["msg"] == "the proxy's iptables rules are missing from the pod's namespace"
        # Tulle's ADD again (a runtime retry), twice: the rules are back, once.
        conf = json.loads(rt.conflist.read_text())
        for _ in range(2):
            again = call(rt.bin_dirs, conf["plugins"][-1], name=conf["name"], version="1.0.0", command="ADD",
                         netns=pod.path, args=MESHED_ARGS, prev=result)
            assert again.code == 0 and again.out == result
        assert rules.installed(pod.nat()) and pod.nat().count("-j TULLE_PROXY_INIT_OUTPUT") == 1
        # DEL: nothing of Tulle's is left, the veth is gone; DEL twice is still fine.
        rt.delete(pod.path, MESHED_ARGS, result)
        assert "TULLE_PROXY_INIT" not in pod.nat()
        assert "eth0" not in pod.exec("ip", "-o", "link").stdout
        rt.delete(pod.path, MESHED_ARGS, result)


@requires_netns
@needs_plugins
@pytest.mark.root
def test_a_pod_without_a_proxy_gets_its_network_and_no_rules(cni):
    rt = cni["runtime"]
    with Netns("tlcni") as pod:
        result = rt.add(pod.path, PLAIN_ARGS)
        assert "TULLE_PROXY_INIT" not in pod.nat()
        assert all(c.code == 0 for c in rt.check(pod.path, PLAIN_ARGS, result))
        rt.delete(pod.path, PLAIN_ARGS, result)


@requires_netns
@needs_plugins
@pytest.mark.root
def test_an_api_that_does_not_answer_fails_the_add_with_a_cni_error(cni):
    cni["kube"].stop()
    with Netns("tlcni") as pod:
        conf = json.loads(cni["runtime"].conflist.read_text())
        entry = conf["plugins"][-1]
        c = call([cni["bin"], REFERENCE_PLUGINS], entry, name=conf["name"], version="1.0.0", command="ADD",
                 netns=pod.path, args=MESHED_ARGS, prev={"cniVersion": "1.0.0"})
        assert c.code == 1 and c.out["code"] == plugin.API_FAILED
        assert c.out["msg"] == "could not read the pod from the Kubernetes API" and c.out["details"]


# --- the network validator ----------------------------------------------------------------------------------


@requires_netns
@pytest.mark.root
def test_the_validator_fails_clearly_without_the_rules_and_passes_with_them():
    with Netns() as pod, Netns() as peer:
        veth(peer, "10.251.8.1", pod, "10.251.8.2")
        target = "10.251.8.250:20001"  # inside the pair's own subnet: nothing answers, nothing leaves
        without = pod.exec(str(BIN / "tulle"), "network-validator", "--connect-addr", target, "--timeout", "2s",
                           check=False)
        assert without.returncode == 1
        assert without.stderr.strip() == (
            f"tulle network-validator: connections to {target} were not redirected to 0.0.0.0:4140 within 2s: "
            "the pod's iptables rules are missing (is the tulle-cni plugin installed and chained on this node?)")
        subprocess.run([str(BIN / "tulle"), "proxy-init", "--netns", pod.name], check=True, capture_output=True)
        with_rules = pod.exec(str(BIN / "tulle"), "network-validator", "--connect-addr", target, "--timeout", "10s",
                              check=False)
        assert with_rules.returncode == 0, with_rules.stderr
        assert "are redirected to 0.0.0.0:4140" in with_rules.stderr
