"""`tulle logs` against a cluster: the real command and client, the fake API server's
pods/log (with follow) and pods built from the client's models."""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import subprocess
import threading

import pytest

from tests.conftest import wait_until
from tests.fakekube import FakeKube
from tests.installation_objects import Installation
from tests.local_support import TULLE

ISSUED = json.dumps({"identity": "web.demo.serviceaccount.identity.tulle.cluster.local", "event": "certificate issued",
                     "component": "identity", "level": "info", "timestamp": "2026-01-02T03:04:05.678901Z"})


@pytest.fixture
def kube():
    server = FakeKube().start()
    inst = Installation().apply_to(server)
    server.apply(inst.pod("tulle-identity-6c4b9d7f8-zz9yy", "identity", ["identity"]))  # a second replica
    server.apply(inst.meshed_pod("web-7d9f8-x2x9k", app="web"))
    server.apply(inst.meshed_pod("books-5f6d7-k8k8k", app="books", native_sidecar=True))
    server.append_log("tulle", "tulle-identity-6c4b9d7f8-q7w2e", "identity", '{"event": "starting", "level": "info"}',
                      ISSUED)
    server.append_log("tulle", "tulle-identity-6c4b9d7f8-zz9yy", "identity", '{"event": "ready", "level": "info"}')
    server.append_log("tulle", "tulle-destination-5d8f7c9b4-x2x9k", "policy", '{"event": "policy published"}')
    server.append_log("demo", "web-7d9f8-x2x9k", "tulle-proxy", '{"event": "proxy listening"}')
    server.append_log("demo", "web-7d9f8-x2x9k", "web", "GET / 200")
    server.append_log("demo", "books-5f6d7-k8k8k", "tulle-proxy", '{"event": "books proxy ready"}')
    yield server
    server.stop()


def run_logs(kube, tmp_path, *args: str) -> subprocess.CompletedProcess:
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    return subprocess.run([TULLE, "logs", "--kubeconfig", kubeconfig, *args], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, TULLE_STATE_DIR=str(tmp_path / "none")))


def test_a_component_shows_each_replica_with_its_prefix_and_json_lines_unchanged_when_piped(kube, tmp_path):
    proc = run_logs(kube, tmp_path, "--component", "identity")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        '[pod/tulle-identity-6c4b9d7f8-q7w2e/identity] {"event": "starting", "level": "info"}',
        f"[pod/tulle-identity-6c4b9d7f8-q7w2e/identity] {ISSUED}",
        '[pod/tulle-identity-6c4b9d7f8-zz9yy/identity] {"event": "ready", "level": "info"}',
    ]


def test_one_container_alone_is_passed_through_without_a_prefix(kube, tmp_path):
    proc = run_logs(kube, tmp_path, "tulle-identity-6c4b9d7f8-q7w2e", "-n", "tulle", "--tail", "1")
    assert (proc.returncode, proc.stdout) == (0, ISSUED + "\n")
    assert json.loads(proc.stdout)["event"] == "certificate issued"  # `| jq` works


def test_policy_is_a_container_of_the_destination_pods(kube, tmp_path):
    proc = run_logs(kube, tmp_path, "--component", "policy")
    assert proc.stdout == '{"event": "policy published"}\n'


def test_proxy_is_the_tulle_proxy_container_of_every_meshed_pod_native_sidecars_too(kube, tmp_path):
    proc = run_logs(kube, tmp_path, "--component", "proxy", "-n", "demo")
    assert sorted(proc.stdout.splitlines()) == [
        '[pod/books-5f6d7-k8k8k/tulle-proxy] {"event": "books proxy ready"}',
        '[pod/web-7d9f8-x2x9k/tulle-proxy] {"event": "proxy listening"}',
    ]


def test_a_workload_name_shows_its_pods_every_container(kube, tmp_path):
    proc = run_logs(kube, tmp_path, "web", "-n", "demo")
    assert proc.stdout.splitlines() == ['[pod/web-7d9f8-x2x9k/tulle-proxy] {"event": "proxy listening"}',
                                        "[pod/web-7d9f8-x2x9k/web] GET / 200"]
    only = run_logs(kube, tmp_path, "web", "-n", "demo", "--container", "web")
    assert only.stdout == "GET / 200\n"


def test_since_leaves_out_older_lines(kube, tmp_path):
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2)
    kube.append_log("demo", "web-7d9f8-x2x9k", "web", "from long ago", at=old)
    kube.append_log("demo", "web-7d9f8-x2x9k", "web", "just now")
    proc = run_logs(kube, tmp_path, "web", "-n", "demo", "-c", "web", "--since", "1h")
    assert "just now" in proc.stdout and "from long ago" not in proc.stdout


def test_follow_prints_each_new_line_as_the_api_sends_it_and_ends_with_the_streams(kube, tmp_path):
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    follower = subprocess.Popen([TULLE, "logs", "-f", "--component", "identity", "--tail", "0", "--kubeconfig", kubeconfig],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, TULLE_STATE_DIR=str(tmp_path / "none")))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True).start()
    try:
        wait_until(lambda: kube.log_follow_count() == 2, timeout=30, what="both replicas' logs to be followed")
        grown = json.dumps({"event": "issuer reloaded", "level": "info", "component": "identity"})
        kube.append_log("tulle", "tulle-identity-6c4b9d7f8-zz9yy", "identity", grown)
        assert lines.get(timeout=30) == f"[pod/tulle-identity-6c4b9d7f8-zz9yy/identity] {grown}\n"
        kube.end_logs()  # the containers stop: every stream ends, and so does the command
        assert follower.wait(timeout=30) == 0
    finally:
        follower.kill()


def test_no_such_pod_is_one_line_and_exit_2(kube, tmp_path):
    proc = run_logs(kube, tmp_path, "nope", "-n", "demo")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "tulle: logs: no pod named nope (or of a workload nope) in namespace demo\n"
    proc = run_logs(kube, tmp_path, "web", "-n", "demo", "-c", "nginx")
    assert proc.stderr == "tulle: logs: web has no container nginx (it has tulle-proxy, web)\n"
