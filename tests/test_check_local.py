"""`tulle check` against a running `tulle up` (isolation none, meshed): silent but for its
summary while healthy, and naming the broken part with a hint after each fault a person
meets — a service killed, NATS down, an issuer about to expire, a proxy not ready.

One run shared by the tests of this module, in file order. A fault that the supervisor
would repair within a second (it restarts what dies) is injected while the supervisor
is stopped (SIGSTOP), so the check sees it for certain; SIGCONT lets it repair.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess

import pytest

from tests.local_support import TULLE, read_record, tiny_folder, tulle

OK, WARN, ERR = "\u221a", "\u203c", "\u00d7"
NO_CLUSTER = {"KUBECONFIG": "/nonexistent/kubeconfig"}  # local mode, whatever ~/.kube holds


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("check-local")
    manifests, state = tiny_folder(base / "manifests"), base / "state"
    # Identity material made beforehand, keeping the anchor's key, as an operator who
    # will rotate the issuer would: `tulle up` uses what it finds in <state>/identity.
    init = tulle("identity", "init", "--out", str(state / "identity"), "--anchor-key-out", str(base / "anchor.key"),
                 state=state)
    assert init.returncode == 0, init.stderr
    up = tulle("up", str(manifests), "--detach", "--isolation", "none", "--timeout", "90", state=state)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        yield {"state": state, "base": base}
    finally:
        tulle("down", state=state)


def check(run, *args: str) -> subprocess.CompletedProcess:
    return tulle("check", *args, state=run["state"], env=NO_CLUSTER, timeout=150)


@contextlib.contextmanager
def supervisor_stopped(run):
    """Nothing restarts what dies until the block ends."""
    pid = read_record(run["state"])["supervisor"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def healthy_again(run) -> None:
    """The mesh heals by itself; `--wait` returns once it has."""
    proc = check(run, "-o", "short", "--proxy", "--wait", "90s")
    assert (proc.returncode, proc.stdout) == (0, f"Status check results are {OK}\n"), proc.stdout + proc.stderr


def test_a_healthy_run_is_silent_but_for_the_summary(run):
    proc = check(run, "-o", "short", "--proxy", "--wait", "60s")
    assert (proc.returncode, proc.stdout) == (0, f"Status check results are {OK}\n"), proc.stdout + proc.stderr


def test_the_table_shows_every_local_category_and_json_says_success(run):
    proc = check(run, "--proxy", "--wait", "30s")
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    headers = [line for line, under in zip(lines, lines[1:]) if under and set(under) == {"-"}]
    assert headers == ["tulle-local", "tulle-control-plane", "tulle-nats", "tulle-identity", "tulle-version",
                       "tulle-control-plane-proxy", "tulle-data-plane"]
    for line in ("the identity service is ready", "the KV buckets exist", "issuer cert is issued by the trust anchor",
                 "the identity service publishes these trust anchors", "data plane proxies have valid certificates",
                 "the NATS cluster is healthy", "the buckets' replicas match the NATS cluster",
                 "the control plane runs without proxies, by design"):
        assert f"{OK} {line}" in lines
    doc = json.loads(check(run, "-o", "json", "--wait", "30s").stdout)
    assert doc["success"] is True and [c["categoryName"] for c in doc["categories"]][0] == "tulle-local"


def test_a_killed_service_is_named_with_a_hint_and_wait_returns_once_it_is_back(run):
    identity = next(c for c in read_record(run["state"])["components"] if c["name"] == "identity")
    with supervisor_stopped(run):
        os.kill(identity["pid"], signal.SIGKILL)
        proc = check(run, "-o", "short", "--wait", "0s")
        assert proc.returncode == 1
        assert proc.stdout == (
            "tulle-control-plane\n-------------------\n"
            f"{ERR} the identity service is ready\n"
            f"    identity (pid {identity['pid']}) is not running\n"
            "    hint: the supervisor restarts it; `tulle logs --component identity` shows why it stopped\n\n"
            f"Status check results are {ERR}\n")
        waiting = subprocess.Popen([TULLE, "check", "-o", "short", "--wait", "2m"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, TULLE_STATE_DIR=str(run["state"]), **NO_CLUSTER))
        try:
            said = waiting.stderr.readline()
        except BaseException:
            waiting.kill()
            raise
    try:  # the supervisor runs again: it restarts identity, and the waiting check sees it
        out, _ = waiting.communicate(timeout=120)
    finally:
        waiting.kill()
    assert said.startswith("waiting for: the identity service is ready (checking every 2 s for up to 2m)")
    assert (waiting.returncode, out) == (0, f"Status check results are {OK}\n")


def test_nats_down_is_named_with_a_hint(run):
    nats = read_record(run["state"])["nats"]
    with supervisor_stopped(run):
        os.kill(nats["pid"], signal.SIGKILL)
        proc = check(run, "-o", "short", "--wait", "0s")
    assert proc.returncode == 1
    assert proc.stdout.startswith(
        "tulle-control-plane\n-------------------\n"
        f"{ERR} NATS is running\n"
        f"    nats-server (pid {nats['pid']}) is not running\n"
        "    hint: the supervisor restarts it; `tulle logs --component nats` shows why it stopped\n")
    # The services wait for it, and say so rather than look broken on their own.
    assert "destination (pid" in proc.stdout and "it waits for NATS, which is down" in proc.stdout
    assert (f"tulle-nats\n----------\n{ERR} can connect to NATS\n"
            f"    cannot connect to {nats['url']}: NATS is not running\n") in proc.stdout
    healthy_again(run)


def test_an_issuer_expiring_within_60_days_is_a_warning_with_how_to_renew_it(run):
    ident, key = run["state"] / "identity", run["base"] / "anchor.key"

    def issuer(lifetime: str) -> None:
        made = tulle("identity", "init", "--anchor-cert", str(ident / "ca.crt"), "--anchor-key", str(key),
                     "--lifetime", lifetime, "--out", str(ident), "--force", state=run["state"])
        assert made.returncode == 0, made.stderr

    issuer("720h")  # 30 days, under the same anchor: proxies keep trusting it
    try:
        proc = check(run, "-o", "short", "--wait", "0s")
        assert proc.returncode == 0, proc.stdout
        lines = proc.stdout.splitlines()
        assert lines[:3] == ["tulle-identity", "--------------", f"{WARN} issuer cert is valid for at least 60 days"]
        assert lines[3].startswith("    issuer certificate expires on ") and lines[3].endswith("(in 29 days)")
        assert lines[4].startswith(f"    hint: sign a new issuer with the anchor's key: `tulle identity init "
                                   f"--anchor-cert {ident.resolve()}/ca.crt")
        assert lines[-1] == f"Status check results are {OK}"
    finally:
        issuer("8760h")
    healthy_again(run)


def test_a_proxy_not_ready_is_named_with_a_hint(run):
    hello = next(w for w in read_record(run["state"])["workloads"] if w["name"] == "hello")
    os.kill(hello["proxy"]["pid"], signal.SIGSTOP)  # alive, but its /ready no longer answers
    try:
        proc = check(run, "-o", "short", "--proxy", "--wait", "0s")
    finally:
        os.kill(hello["proxy"]["pid"], signal.SIGCONT)
    assert proc.returncode == 1
    assert proc.stdout.startswith(
        "tulle-data-plane\n----------------\n"
        f"{ERR} data plane proxies are ready\n"
        f"    tiny/hello: its proxy (pid {hello['proxy']['pid']}) is not ready: /ready at {hello['proxy']['admin']} "
        "does not answer 200\n"
        "    hint: `tulle logs -n tiny hello --container tulle-proxy` says what it waits for")
    healthy_again(run)


def test_with_nothing_running_the_first_check_says_so_and_how_to_start(tmp_path):
    proc = tulle("check", "-o", "short", "--wait", "0s", state=tmp_path / "state", env=NO_CLUSTER)
    assert proc.returncode == 1
    assert proc.stdout == (
        f"tulle-local\n-----------\n{ERR} tulle up is running\n"
        f"    no local run is recorded in {(tmp_path / 'state').resolve()}\n"
        "    hint: start one with `tulle up`, or point at the one running with --state-dir (TULLE_STATE_DIR)\n\n"
        f"Status check results are {ERR}\n")


def test_pre_is_for_a_cluster(tmp_path):
    proc = tulle("check", "--pre", "--wait", "0s", state=tmp_path / "state", env={"KUBECONFIG": str(tmp_path / "none")})
    # --pre always looks at a cluster: with no kubeconfig, the client cannot be set up.
    assert proc.returncode == 1 and f"{ERR} can initialize the client" in proc.stdout


def test_a_run_on_a_three_node_nats_cluster_checks_three_copies_of_every_stream(tmp_path):
    """`tulle up --nats-cluster 3`: the check counts the run's three NATS servers and finds
    every bucket and the event stream kept on all three, each with a leader; with one node
    down it still reads the bus through the others."""
    state = tmp_path / "state"
    up = tulle("up", str(tiny_folder(tmp_path / "manifests")), "--detach", "--isolation", "none", "--nats-cluster", "3",
               "--timeout", "120", state=state)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        healthy = tulle("check", "-o", "json", "--wait", "60s", state=state, env=NO_CLUSTER, timeout=150)
        node = read_record(state)["nats"]["nodes"][2]
        with supervisor_stopped({"state": state}):
            os.kill(node["pid"], signal.SIGKILL)
            degraded = tulle("check", "-o", "json", "--wait", "0s", state=state, env=NO_CLUSTER, timeout=150)
    finally:
        tulle("down", state=state)
    doc = json.loads(healthy.stdout)
    assert doc["success"] is True, healthy.stdout
    nats = next(c["checks"] for c in doc["categories"] if c["categoryName"] == "tulle-nats")
    # Shown (the run's servers are known) and passing: three servers, three copies, a leader each.
    assert [(c["description"], c["result"]) for c in nats][-2:] == [
        ("the NATS cluster is healthy", "success"), ("the buckets' replicas match the NATS cluster", "success")]
    checks = {c["description"]: c for cat in json.loads(degraded.stdout)["categories"] for c in cat["checks"]}
    assert checks["NATS is running"]["error"] == f"nats-server (pid {node['pid']}) is not running"
    assert checks["can connect to NATS"]["result"] == "success", checks["can connect to NATS"]
