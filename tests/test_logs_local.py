"""`tulle logs` on a running `tulle up` (isolation none, meshed): the runner's log files,
read, followed while the mesh writes them, and shown readably on a real terminal."""

from __future__ import annotations

import json
import os
import pty
import queue
import signal
import subprocess
import threading

import pytest

from tests.local_support import TULLE, read_record, tiny_folder, tulle

NO_CLUSTER = {"KUBECONFIG": "/nonexistent/kubeconfig"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("logs-local")
    manifests, state = tiny_folder(base / "manifests"), base / "state"
    up = tulle("up", str(manifests), "--detach", "--isolation", "none", "--timeout", "90", state=state)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        yield {"state": state}
    finally:
        tulle("down", state=state)


def logs(run, *args: str) -> subprocess.CompletedProcess:
    return tulle("logs", *args, state=run["state"], env=NO_CLUSTER, timeout=60)


def test_a_component_shows_its_json_lines_unchanged_when_piped(run):
    proc = logs(run, "--component", "identity")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("--- ") and " starting identity: " in lines[0]  # the runner's start marker
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert {"issuer loaded", "ready"} <= {e["event"] for e in events}
    assert all(e["component"] == "identity" for e in events)


def test_a_workload_shows_its_app_and_its_proxy_each_with_its_prefix(run):
    proc = logs(run, "hello", "-n", "tiny")
    assert proc.returncode == 0, proc.stderr
    prefixes = {line.split(" ", 1)[0] for line in proc.stdout.splitlines()}
    assert prefixes == {"[tiny/hello/hello]", "[tiny/hello/tulle-proxy]"}
    assert "[tiny/hello/hello] proxy /ready when the app started: 200" in proc.stdout.splitlines()
    proxy_only = logs(run, "hello", "-n", "tiny", "--container", "tulle-proxy", "--tail", "2")
    assert len(proxy_only.stdout.splitlines()) == 2 and not proxy_only.stdout.startswith("[")


def test_proxy_shows_every_meshed_workloads_proxy(run):
    proc = logs(run, "--component", "proxy", "--tail", "1")
    assert sorted(line.split(" ", 1)[0] for line in proc.stdout.splitlines()) == \
        ["[tiny/hello/tulle-proxy]", "[tiny/worker/tulle-proxy]"]


def test_follow_shows_the_lines_the_identity_service_writes_after_a_restart(run):
    identity = next(c for c in read_record(run["state"])["components"] if c["name"] == "identity")
    follower = subprocess.Popen([TULLE, "logs", "-f", "--component", "identity", "--tail", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, TULLE_STATE_DIR=str(run["state"]), **NO_CLUSTER))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True).start()
    try:
        assert lines.get(timeout=30)  # the last line written so far: the follower is reading the file
        os.kill(identity["pid"], signal.SIGKILL)  # the supervisor starts it again; it logs as it starts
        seen = []
        while not any('"event": "issuer loaded"' in line for line in seen):
            seen.append(lines.get(timeout=60))
        assert any(line.startswith("--- ") and " starting identity: " in line for line in seen)
    finally:
        follower.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
        try:
            assert follower.wait(timeout=30) == 0
        finally:
            follower.kill()


def test_on_a_terminal_json_lines_are_readable_and_coloured(run):
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([TULLE, "logs", "--component", "identity"], stdout=terminal, stderr=subprocess.PIPE,
                            env=dict(os.environ, TULLE_STATE_DIR=str(run["state"]), **NO_CLUSTER))
    os.close(terminal)
    out = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the command closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(controller)
    assert proc.wait(timeout=30) == 0
    text = out.decode()
    assert '"event"' not in text and "\x1b[" in text  # no raw JSON; colour
    plain = [line for line in text.replace("\r", "").splitlines() if "issuer loaded" in line]
    assert plain and "info" in plain[0] and "anchors=1" in plain[0]


def test_asking_for_nothing_or_for_what_is_not_there_is_one_line_and_exit_2(run):
    proc = logs(run)
    assert proc.returncode == 2 and proc.stderr.startswith("tulle: logs: name a workload, or pick --component")
    proc = logs(run, "nope", "-n", "tiny")
    assert proc.returncode == 2
    assert proc.stderr == "tulle: logs: no workload named nope in namespace tiny in this local run " \
                          "(`tulle status` lists them)\n"


def test_without_a_run_it_says_so(tmp_path):
    proc = tulle("logs", "--component", "identity", state=tmp_path / "state", env=NO_CLUSTER)
    assert proc.returncode == 1 and proc.stderr.startswith("tulle: logs: tulle is not running")
