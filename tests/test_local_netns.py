"""Local mode with network namespaces (root): each workload in its own namespace on a
bridge, proxy-init's iptables rules, hosts files for service names, the proxy as uid 2102
— and `tulle down` leaving no namespace, veth, bridge or rule behind."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import requires_netns, wait_until
from tests.local_support import read_record, recorded_pids, service_yaml, status_json, tiny_folder, tulle
from tulle.local import plan, runner
from tulle.local.state import StateDir, lock_held, process_alive
from tulle.resources import model as m
from tulle.resources.parse import load_file

pytestmark = [requires_netns, pytest.mark.root]


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30).stdout


def _id_of(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} line for pid {pid}")


def uid_of(pid: int) -> int:
    return _id_of(pid, "Uid")


def gid_of(pid: int) -> int:
    return _id_of(pid, "Gid")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("local-netns")
    manifests, state = tiny_folder(base / "manifests"), base / "state"
    up = tulle("up", str(manifests), "--detach", "--isolation", "netns", "--timeout", "120", state=state)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        yield {"manifests": manifests, "state": state, "record": read_record(state)}
    finally:
        tulle("down", state=state)


def test_each_workload_gets_a_namespace_on_the_runs_bridge_with_its_own_address(run):
    record = run["record"]
    net = record["net"]
    assert net["subnet"].startswith("10.") and net["bridge"] == plan.bridge_name(net["n"])
    assert f"{net['bridge_ip']}/16" in sh("ip", "-4", "-o", "addr", "show", "dev", net["bridge"])
    namespaces = sh("ip", "netns", "list")
    for w in record["workloads"]:
        assert w["netns"] in namespaces
        assert f"{w['address']}/16" in sh("ip", "netns", "exec", w["netns"], "ip", "-4", "-o", "addr", "show", "eth0")
        assert f"default via {net['bridge_ip']}" in sh("ip", "netns", "exec", w["netns"], "ip", "route")
    # NATS listens on the bridge, where both the host and every namespace reach it.
    assert record["nats"]["url"].startswith(f"nats://{net['bridge_ip']}:")


def test_each_meshed_namespace_has_proxy_init_rules(run):
    for w in run["record"]["workloads"]:
        rules = sh("ip", "netns", "exec", w["netns"], "iptables", "-t", "nat", "-S").splitlines()
        assert f"-A PREROUTING -m comment --comment \"proxy-init/install-proxy-init-prerouting\" -j {plan.REDIRECT_CHAIN}" in rules
        assert f"-A OUTPUT -m comment --comment \"proxy-init/install-proxy-init-output\" -j {plan.OUTPUT_CHAIN}" in rules
        redirect = [r for r in rules if r.startswith(f"-A {plan.REDIRECT_CHAIN}")]
        output = [r for r in rules if r.startswith(f"-A {plan.OUTPUT_CHAIN}")]
        assert "--dports 4190,4191" in redirect[0] and redirect[0].endswith("-j RETURN")
        assert redirect[-1].endswith("-j REDIRECT --to-ports 4143")
        assert "--uid-owner 2102" in output[0] and output[0].endswith("-j RETURN")
        assert "--gid-owner 2102" in output[1] and output[1].endswith("-j RETURN")
        assert "-o lo" in output[2] and output[2].endswith("-j RETURN")
        assert output[-1].endswith("-j REDIRECT --to-ports 4140")


def test_service_names_resolve_to_the_cluster_ip_inside_every_namespace(run):
    view = status_json(run["state"])
    cluster_ip = view["services"][0]["cluster_ip"]
    worker = next(w for w in run["record"]["workloads"] if w["name"] == "worker")
    for name in ("hello", "hello.tiny", "hello.tiny.svc", "hello.tiny.svc.cluster.local"):
        assert sh("ip", "netns", "exec", worker["netns"], "getent", "hosts", name).split()[0] == cluster_ip


def test_a_service_added_while_running_resolves_in_every_namespace(run):
    (run["manifests"] / "extra.yaml").write_text(service_yaml("extra", selector={"app": "hello"}))
    cluster_ip = wait_until(lambda: next((s["cluster_ip"] for s in status_json(run["state"])["services"]
                                          if s["name"] == "extra"), None), timeout=20, what="the extra service")
    for w in run["record"]["workloads"]:
        wait_until(lambda: sh("ip", "netns", "exec", w["netns"], "getent", "hosts", "extra.tiny.svc.cluster.local",
                              check=False).split()[:1] == [cluster_ip], timeout=20, what=f"extra in {w['netns']}")
    # ... and it is served: hello answers behind it.
    worker = next(w for w in run["record"]["workloads"] if w["name"] == "worker")
    assert sh("ip", "netns", "exec", worker["netns"], "curl", "-sS", "-m", "10", "http://extra.tiny/") == "hello\n"


def test_the_proxy_runs_as_uid_2102_and_the_app_as_the_invoking_user(run):
    # uid 2102 as in a pod when that user can read the checkout; otherwise (a clone below
    # /root) the proxy keeps uid 0 and is told apart by its gid, which the rules exclude too.
    readable = runner.proxy_user_can_run()
    for w in status_json(run["state"])["workloads"]:
        assert uid_of(w["proxy"]["pid"]) == (plan.PROXY_UID if readable else 0)
        assert gid_of(w["proxy"]["pid"]) == plan.PROXY_UID
        assert uid_of(w["pid"]) == 0


def test_a_call_by_service_name_goes_through_both_proxies(run):
    worker = next(w for w in run["record"]["workloads"] if w["name"] == "worker")
    out = sh("ip", "netns", "exec", worker["netns"], "curl", "-sS", "-m", "10", "http://hello.tiny.svc.cluster.local/")
    assert out == "hello\n"
    hello = next(w for w in run["record"]["workloads"] if w["name"] == "hello")
    admin = hello["proxy"]["admin"]
    metrics = wait_until(lambda: (t := sh("curl", "-sS", "-m", "5", f"http://{admin}/metrics")) and
                         "worker.tiny.serviceaccount" in t and t, timeout=20, what="hello's proxy to count the call")
    assert 'direction="inbound"' in metrics


def test_the_pod_manifest_carries_the_proxy_container_and_no_inbound_port_annotation(run):
    (pod,) = load_file(run["state"] / "runtime" / "pod-tiny-hello.json")
    assert isinstance(pod, m.Pod) and pod.meshed and pod.ready and pod.ip.startswith("10.")
    assert m.PROXY_INBOUND_PORT_ANNOTATION not in pod.meta.annotations


def test_down_leaves_no_process_namespace_veth_bridge_hosts_folder_or_rule(run):
    record = read_record(run["state"])
    net = record["net"]
    processes = recorded_pids(record)
    down = tulle("down", state=run["state"])
    assert down.returncode == 0, down.stderr
    assert [pid for pid, start in processes if process_alive(pid, start)] == []
    namespaces = sh("ip", "netns", "list")
    links = sh("ip", "-o", "link", "show")
    for w in record["workloads"]:
        assert w["netns"] not in namespaces
        assert f" {w['veth']}@" not in links and f" {w['veth']}:" not in links
        assert not (Path("/etc/netns") / w["netns"]).exists()
    assert f" {net['bridge']}:" not in links
    assert f"tulle/{net['bridge']}" not in sh("iptables", "-S", "FORWARD")
    assert not Path(f"/run/tulle/run-{net['n']}").exists()  # the proxies' tokens


def test_down_after_a_killed_supervisor_removes_the_namespaces_it_left(tmp_path):
    manifests, state = tiny_folder(tmp_path / "manifests"), tmp_path / "state"
    up = tulle("up", str(manifests), "--detach", "--isolation", "netns", "--no-proxy", state=state)
    try:
        assert up.returncode == 0, up.stderr
        record = read_record(state)
        os.kill(record["supervisor"]["pid"], signal.SIGKILL)
        wait_until(lambda: not lock_held(StateDir.at(state)), timeout=10, what="the lock to go with its holder")
        assert all(w["netns"] in sh("ip", "netns", "list") for w in record["workloads"])  # a crash leaves them
    finally:
        down = tulle("down", state=state)
    assert down.returncode == 0, down.stderr
    assert [pid for pid, start in recorded_pids(record) if process_alive(pid, start)] == []
    namespaces, links = sh("ip", "netns", "list"), sh("ip", "-o", "link", "show")
    assert not any(w["netns"] in namespaces for w in record["workloads"])
    assert f" {record['net']['bridge']}:" not in links
