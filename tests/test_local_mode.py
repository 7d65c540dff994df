"""`tulle up --detach` / `status` / `down` on loopback addresses (isolation none), meshed,
with a small manifests folder: one run shared by the tests of this module, in file order,
the last one stopping it."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request

import pytest

from tests.conftest import wait_until
from tests.local_support import proxy_logs, read_record, recorded_pids, status_json, tiny_folder, tulle, workload_yaml
from tulle.local.discover import local_nats_url
from tulle.local.state import StateDir, lock_held, process_alive
from tulle.resources import model as m
from tulle.resources.parse import load_file


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("local-mode")
    manifests, state = tiny_folder(base / "manifests"), base / "state"
    started = tulle("up", str(manifests), "--detach", "--isolation", "none", "--timeout", "90", state=state)
    try:
        yield {"manifests": manifests, "state": state, "up": started}
    finally:
        tulle("down", state=state)


def test_up_detached_returns_once_everything_is_ready(run):
    up = run["up"]
    assert up.returncode == 0, up.stderr + up.stdout
    assert "tulle is up" in up.stdout and "2 workloads" in up.stdout


def test_status_json_shows_components_workloads_and_services(run):
    view = status_json(run["state"])
    assert {"components", "workloads", "services"} <= set(view)
    comps = {c["name"]: c for c in view["components"]}
    assert set(comps) == {"nats", "identity", "destination", "policy", "injector"}
    assert all(c["ready"] and c["pid"] and c["address"] for c in comps.values())
    assert comps["nats"]["address"].startswith("nats://127.0.0.1:")
    # Never the fixed admin ports: several meshes run side by side.
    assert not any(c["address"].endswith((":9990", ":9991", ":9992", ":9993")) for c in comps.values())
    wls = {w["name"]: w for w in view["workloads"]}
    assert set(wls) == {"hello", "worker"}
    for w in wls.values():
        assert w["ready"] and w["pid"] and w["restarts"] == 0 and w["namespace"] == "tiny"
        assert w["address"].startswith("127.") and w["address"] != "127.0.0.1"
        assert w["meshed"] and w["proxy"]["ready"] and w["proxy"]["admin"] == f"{w['address']}:4191"
    (svc,) = view["services"]
    assert (svc["name"], svc["namespace"]) == ("hello", "tiny") and svc["cluster_ip"].startswith("10.96.")
    assert svc["ports"] == [{"name": "http", "port": 80, "target_port": "http", "protocol": "TCP"}]
    assert svc["endpoints"] == [{"workload": "hello", "ready": True}]


def test_each_app_starts_only_after_its_proxy_is_ready(run):
    for w in read_record(run["state"])["workloads"]:
        first = [line for line in open(w["app"]["log"]) if line.startswith("proxy /ready")][0]
        assert first.strip() == "proxy /ready when the app started: 200", w["name"]


def test_the_apps_listen_on_their_own_loopback_address(run):
    hello = next(w for w in status_json(run["state"])["workloads"] if w["name"] == "hello")
    with urllib.request.urlopen(f"http://{hello['address']}:8080/", timeout=10) as resp:
        assert resp.read() == b"hello\n"


def test_a_meshed_app_reaches_a_service_by_name_through_its_proxy_as_http_proxy(run):
    # What the worker's HTTP client does with the HTTP_PROXY it was given.
    worker = next(w for w in read_record(run["state"])["workloads"] if w["name"] == "worker")
    proxy = urllib.request.ProxyHandler({"http": f"http://{worker['address']}:4140"})
    try:
        with urllib.request.build_opener(proxy).open("http://hello.tiny.svc.cluster.local/", timeout=10) as resp:
            assert resp.read() == b"hello\n"
    except urllib.error.HTTPError as e:  # the proxy's own error says which hop failed
        pytest.fail(f"{e.code} tulle-proxy-error={e.headers.get('tulle-proxy-error')!r} {e.read()[:300]!r}\n"
                    + proxy_logs(run["state"]))


def test_status_table_shows_every_part_by_name(run):
    proc = tulle("status", state=run["state"], timeout=30)
    assert proc.returncode == 0, proc.stderr
    for word in ("nats", "destination", "policy", "injector", "tiny/hello", "tiny/worker", "ready"):
        assert word in proc.stdout


def test_each_running_workload_has_a_ready_pod_manifest_for_the_services(run):
    pods = {}
    for f in (run["state"] / "runtime").glob("*.json"):
        (pod,) = load_file(f)
        pods[pod.meta.name] = pod
    assert set(pods) == {"hello", "worker"}
    hello = pods["hello"]
    assert isinstance(hello, m.Pod) and hello.ready and hello.meta.namespace == "tiny"
    assert hello.service_account == "hello" and hello.meta.labels["app"] == "hello"
    # The pod the injector's core made: its labels and annotations too, as in a cluster.
    assert hello.meta.labels["tulle.dev/workload-ns"] == "tiny"
    assert hello.meta.annotations["tulle.dev/created-by"].startswith("tulle/proxy-injector ")
    assert hello.port_number("http") == 8080 and hello.probes[0].path == "/ready"
    assert hello.meshed and hello.meta.annotations[m.PROXY_INBOUND_PORT_ANNOTATION] == "4143"
    assert hello.ip == next(w["address"] for w in read_record(run["state"])["workloads"] if w["name"] == "hello")


def test_a_second_up_while_one_runs_says_so_and_exits_1(run):
    again = tulle("up", str(run["manifests"]), "--detach", "--isolation", "none", state=run["state"])
    assert again.returncode == 1
    pid = read_record(run["state"])["supervisor"]["pid"]
    assert again.stderr.strip() == (f"tulle is already running (pid {pid}, state dir {run['state'].resolve()}); "
                                    "run `tulle down` first")


def test_other_commands_find_the_local_nats_on_their_own(run):
    url = local_nats_url(str(run["state"]))
    assert url == status_json(run["state"])["nats_url"]
    proc = tulle("events", "--since", "10m", "--count", "1", "--type", "*.ready", "-o", "json", "--timeout", "30",
                 state=run["state"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["type"].endswith(".ready")


def test_a_crashed_app_is_restarted_and_its_restarts_are_counted(run):
    before = next(w for w in status_json(run["state"])["workloads"] if w["name"] == "worker")
    os.kill(before["pid"], signal.SIGKILL)

    def restarted():
        w = next(w for w in status_json(run["state"])["workloads"] if w["name"] == "worker")
        return w if w["restarts"] == 1 and w["ready"] and w["pid"] not in (None, before["pid"]) else None

    after = wait_until(restarted, timeout=30, what="the worker to be restarted")
    assert after["address"] == before["address"]
    record = next(w for w in read_record(run["state"])["workloads"] if w["name"] == "worker")
    assert "killed by SIGKILL" in record["app"]["last_exit"]


def test_a_crashed_service_is_restarted_on_the_same_admin_address(run):
    before = next(c for c in status_json(run["state"])["components"] if c["name"] == "destination")
    os.kill(before["pid"], signal.SIGKILL)

    def restarted():
        c = next(c for c in status_json(run["state"])["components"] if c["name"] == "destination")
        return c if c["restarts"] == 1 and c["ready"] and c["pid"] != before["pid"] else None

    after = wait_until(restarted, timeout=30, what="destination to be restarted")
    assert after["address"] == before["address"]


def test_a_new_workload_file_starts_it_and_removing_the_file_stops_it(run):
    extra = run["manifests"] / "hello-2.yaml"
    extra.write_text(workload_yaml("hello-2", labels={"app": "hello"}))
    try:
        def two_endpoints():
            view = status_json(run["state"])
            eps = view["services"][0]["endpoints"]
            return view if eps == [{"workload": "hello", "ready": True}, {"workload": "hello-2", "ready": True}] else None

        view = wait_until(two_endpoints, timeout=60, what="hello-2 to run behind the hello service")
        new = next(w for w in view["workloads"] if w["name"] == "hello-2")
        assert (run["state"] / "runtime" / "pod-tiny-hello-2.json").is_file()
    finally:
        extra.unlink()
    wait_until(lambda: [w["name"] for w in status_json(run["state"])["workloads"]] == ["hello", "worker"],
               timeout=60, what="hello-2 to stop")
    assert not (run["state"] / "runtime" / "pod-tiny-hello-2.json").exists()
    assert not process_alive(new["pid"])


def test_down_stops_every_recorded_process_and_releases_the_lock(run):
    record = read_record(run["state"])
    processes = recorded_pids(record)
    assert len(processes) == 10  # supervisor, nats, four services, two apps and their proxies
    down = tulle("down", state=run["state"])
    assert down.returncode == 0 and "tulle stopped" in down.stdout
    assert [pid for pid, start in processes if process_alive(pid, start)] == []
    assert not lock_held(StateDir.at(run["state"]))
    assert not (run["state"] / "run.json").exists()
    assert list((run["state"] / "runtime").iterdir()) == []
    gone = tulle("status", state=run["state"])
    assert gone.returncode == 1 and "tulle is not running" in gone.stderr
