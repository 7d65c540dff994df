"""What `tulle up / status / down` say when something is wrong: bad manifests, wrong
isolation for the user, nothing running, and a supervisor that died."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.conftest import wait_until
from tests.local_support import TULLE, read_record, recorded_pids, tiny_folder, tulle, workload_yaml
from tulle.local.state import StateDir, lock_held, process_alive


def test_a_manifest_with_a_bad_field_is_one_line_naming_file_document_and_field_and_exit_2(tmp_path):
    manifests = tiny_folder(tmp_path / "manifests")
    (manifests / "broken.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: tiny\n---\n"
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: broken\n  namespace: tiny\n"
        "spec:\n  ports:\n    - port: http\n")
    proc = tulle("up", str(manifests), "--detach", "--isolation", "none", state=tmp_path / "state")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "manifests/broken.yaml" in lines[0] and "document 2" in lines[0] and "spec.ports[0].port" in lines[0]
    assert not (tmp_path / "state" / "run.json").exists()  # nothing started


def test_a_folder_that_does_not_exist_is_one_line_and_exit_2(tmp_path):
    proc = tulle("up", str(tmp_path / "nowhere"), "--detach", state=tmp_path / "state")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "not a folder" in proc.stderr


def test_netns_isolation_as_an_unprivileged_user_is_one_line_and_exit_2(tmp_path):
    # The CLI as an unprivileged user would see itself: os.geteuid() != 0. Simulated in
    # the process rather than with setpriv so the test holds wherever the checkout lives
    # (a clone below /root cannot be read by nobody).
    manifests = tiny_folder(tmp_path / "manifests")
    code = ("import os, sys; os.geteuid = lambda: 65534; from tulle.cli import main; "
            "main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, "up", str(manifests), "--isolation", "netns", "--detach"],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, TULLE_STATE_DIR=str(tmp_path / "state")))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--isolation netns needs root" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "state" / "run.json").exists()


def test_status_and_down_when_nothing_runs(tmp_path):
    status = tulle("status", state=tmp_path / "state")
    assert status.returncode == 1 and "tulle is not running" in status.stderr
    down = tulle("down", state=tmp_path / "state")
    assert down.returncode == 0 and "tulle is not running" in down.stdout


def test_down_cleans_up_after_a_supervisor_that_was_killed(tmp_path):
    manifests, state = tiny_folder(tmp_path / "manifests"), tmp_path / "state"
    up = tulle("up", str(manifests), "--detach", "--isolation", "none", "--no-proxy", state=state)
    assert up.returncode == 0, up.stderr
    record = read_record(state)
    processes = recorded_pids(record)
    try:
        os.kill(record["supervisor"]["pid"], signal.SIGKILL)
        wait_until(lambda: not lock_held(StateDir.at(state)), timeout=10, what="the lock to go with its holder")
        status = tulle("status", state=state)
        assert status.returncode == 1 and "supervisor is not running" in status.stderr
    finally:
        down = tulle("down", state=state)
    assert down.returncode == 0 and "tulle stopped" in down.stdout
    assert [pid for pid, start in processes if process_alive(pid, start)] == []
    assert not (state / "run.json").exists() and list((state / "runtime").iterdir()) == []
    # ... and the state dir is good for the next run.
    again = tulle("up", str(manifests), "--detach", "--isolation", "none", "--no-proxy", state=state)
    try:
        assert again.returncode == 0, again.stderr
    finally:
        tulle("down", state=state)


def test_up_cleans_up_a_stale_run_by_itself(tmp_path):
    manifests, state = tiny_folder(tmp_path / "manifests"), tmp_path / "state"
    assert tulle("up", str(manifests), "-d", "--isolation", "none", "--no-proxy", state=state).returncode == 0
    old = read_record(state)
    try:
        os.kill(old["supervisor"]["pid"], signal.SIGKILL)
        wait_until(lambda: not lock_held(StateDir.at(state)), timeout=10, what="the lock to go with its holder")
        again = tulle("up", str(manifests), "-d", "--isolation", "none", "--no-proxy", state=state)
        assert again.returncode == 0, again.stderr
        assert "cleaning up after an earlier run" in again.stderr
        assert [pid for pid, start in recorded_pids(old) if process_alive(pid, start)] == []
        assert read_record(state)["supervisor"]["pid"] != old["supervisor"]["pid"]
    finally:
        tulle("down", state=state)


def test_foreground_up_runs_until_interrupted_then_stops_everything(tmp_path):
    manifests, state = tiny_folder(tmp_path / "manifests"), tmp_path / "state"
    proc = subprocess.Popen([TULLE, "up", str(manifests), "--isolation", "none", "--no-proxy"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TULLE_STATE_DIR=str(state)))
    try:
        shown = []
        for line in proc.stdout:  # without a terminal it prints the status once, when ready
            shown.append(line)
            if line.startswith("tulle is up"):
                break
        assert any("tiny/hello" in line for line in shown), "".join(shown) + proc.stderr.read()
        processes = recorded_pids(read_record(state))
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.strip().endswith("tulle stopped")
    assert [pid for pid, start in processes if process_alive(pid, start)] == []
    assert not (state / "run.json").exists() and not lock_held(StateDir.at(state))


def test_a_detached_up_reports_a_crashing_app_without_waiting_for_its_timeout(tmp_path):
    manifests, state = tiny_folder(tmp_path / "manifests"), tmp_path / "state"
    (manifests / "crash.py").write_text("import sys\nprint('cannot find my config', flush=True)\nsys.exit(3)\n")
    (manifests / "crash.yaml").write_text(workload_yaml("crash", command="python crash.py"))
    up = tulle("up", str(manifests), "--detach", "--isolation", "none", "--no-proxy", "--timeout", "120", state=state)
    try:
        assert up.returncode == 1
        line = up.stderr.strip().splitlines()[-1]
        assert "tiny/crash" in line and "exit code 3" in line and "cannot find my config" in line
        assert tulle("status", state=state).returncode == 0  # the rest runs on
    finally:
        tulle("down", state=state)
