"""Faults under steady traffic, with real processes: one meshed local run (network
namespaces, the real NATS, services and proxies) shared by the module, a load client of our
own inside the mesh counting every request it sends, and one fault per test — each test
asserting how many requests failed and that the mesh recovered by itself; the last one
that `tulle down` leaves nothing behind.

Topology (`faults/`): Service `hello` → Workload `hello` (later rolled to `hello-2`), and
Workload `load`, whose app calls http://hello.faults.svc.cluster.local/ in three loops (two
on keep-alive connections, one with a new connection per request) through its proxy, then
hello's proxy (mTLS), and writes its counts to a file.

Certificates live 40 s and proxies renew every 4 s (TULLE_IDENTITY_LIFETIME,
TULLE_PROXY_IDENTITY_MAX_REFRESH) so that an identity outage of 12 s outlasts every
proxy's renewal point but not its certificate.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import requires_netns, wait_until
from tests.local_support import TINY_APP, proxy_logs, read_record, recorded_pids, service_yaml, tulle, workload_yaml
from tulle.local.state import process_alive
from tulle.metrics import parse_text

pytestmark = [requires_netns, pytest.mark.root]

NS = "faults"
LIFETIME_S = 40
MAX_REFRESH_S = 4
# Requests the load client must complete successfully after a fault's recovery before its
# window closes: the mesh serves again, not only its processes are back.
AFTER = 60

# The load client: three loops against one service, every request counted (any exception or
# status other than 200 is a failure, with its reason kept for the assertion message).
LOAD_APP = textwrap.dedent('''\
    import http.client, json, os, threading, time

    TARGET, STATS = os.environ["TARGET"], os.environ["STATS_FILE"]
    lock = threading.Lock()
    stats = {"sent": 0, "ok": 0, "failed": 0, "failures": []}

    def record(ok, why=""):
        with lock:
            stats["sent"] += 1
            if ok:
                stats["ok"] += 1
            else:
                stats["failed"] += 1
                stats["failures"] = (stats["failures"] + [[time.time(), why]])[-40:]

    def loop(keep_alive):
        conn = None
        while True:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(TARGET, 80, timeout=10)
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    record(True)
                else:
                    record(False, "%d %s" % (resp.status, resp.getheader("tulle-proxy-error")))
                if not keep_alive or resp.will_close:
                    conn.close()
                    conn = None
            except Exception as e:
                record(False, "%s: %s" % (type(e).__name__, e))
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(0.02)

    for keep_alive in (True, True, False):
        threading.Thread(target=loop, args=(keep_alive,), daemon=True).start()
    while True:
        time.sleep(0.1)
        with lock:
            data = json.dumps(stats)
        with open(STATS + ".tmp", "w") as f:
            f.write(data)
        os.replace(STATS + ".tmp", STATS)
''')

FIGURES: dict[str, dict] = {}  # fault -> {sent, failed}: printed at the end (-s) for the note


def load_yaml(stats_file: Path) -> str:
    return workload_yaml("load", NS, port=None, command="python load.py") + "".join(
        f"  {line}\n" for line in ["env:", "  - name: TARGET", f"    value: hello.{NS}.svc.cluster.local",
                                   "  - name: STATS_FILE", f"    value: {stats_file}"])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    folder, state, stats_file = base / "manifests", base / "state", base / "load-stats.json"
    folder.mkdir()
    (folder / "tiny.py").write_text(TINY_APP)
    (folder / "load.py").write_text(LOAD_APP)
    (folder / "service.yaml").write_text(service_yaml("hello", NS))
    (folder / "hello.yaml").write_text(workload_yaml("hello", NS))
    (folder / "load.yaml").write_text(load_yaml(stats_file))
    env = {"TULLE_IDENTITY_LIFETIME": f"{LIFETIME_S}s", "TULLE_PROXY_IDENTITY_MIN_REFRESH": "1s",
           "TULLE_PROXY_IDENTITY_MAX_REFRESH": f"{MAX_REFRESH_S}s"}
    up = tulle("up", str(folder), "--detach", "--isolation", "netns", "--timeout", "150", state=state, env=env,
               timeout=200)
    run = {"folder": folder, "state": state, "stats": stats_file}
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        wait_until(lambda: stats_file.exists() and load_stats(run)["ok"] >= AFTER, timeout=60,
                   what="the load client's first successful requests")
        yield run
    finally:
        tulle("down", state=state)
        if FIGURES:
            print("\nfault figures (requests sent / failed):")
            for fault, f in FIGURES.items():
                print(f"  {fault}: {f['sent']} / {f['failed']}")


def load_stats(run) -> dict:
    return json.loads(run["stats"].read_text())


class Window:
    """The load client's counts from the start of a fault until AFTER more successes once
    the mesh has recovered."""

    def __init__(self, run, fault: str):
        self.run, self.fault = run, fault
        self.start = load_stats(run)
        self.record = read_record(run["state"])

    def close(self) -> dict:
        assert_nothing_left(self.record, read_record(self.run["state"]))
        target = load_stats(self.run)["ok"] + AFTER
        wait_until(lambda: load_stats(self.run)["ok"] >= target, timeout=90,
                   what=f"{AFTER} successful requests after {self.fault}")
        end = load_stats(self.run)
        got = {"sent": end["sent"] - self.start["sent"], "failed": end["failed"] - self.start["failed"],
               "failures": end["failures"][-min(max(end["failed"] - self.start["failed"], 0), 40):]
               if end["failed"] > self.start["failed"] else []}
        FIGURES[self.fault] = got
        return got


def assert_nothing_left(before: dict, after: dict) -> None:
    """Every process the run had before a fault and no longer has is gone (a killed NATS or
    service, a restarted app, a stopped workload's proxy and app), and so is the network
    namespace of every workload that left."""
    current = set(recorded_pids(after))
    stale = [(pid, start) for pid, start in recorded_pids(before) if (pid, start) not in current]
    assert [pid for pid, start in stale if process_alive(pid, start)] == []
    gone = {w["netns"] for w in before["workloads"]} - {w["netns"] for w in after["workloads"]}
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not gone & set(namespaces), gone & set(namespaces)


def explain(run, got: dict) -> str:
    return (f"{got['failed']} of {got['sent']} requests failed; last failures: {got['failures'][-5:]}\n"
            + proxy_logs(run["state"], 8))


def components(run) -> dict:
    record = read_record(run["state"])
    return {"nats": record["nats"], **{c["name"]: c for c in record["components"]}}


def workloads(run) -> dict:
    return {w["name"]: w for w in read_record(run["state"])["workloads"]}


def all_ready(run) -> bool:
    record = read_record(run["state"])
    return bool(record.get("ready")) and all(c["ready"] for c in record["components"])


def proxy_metric(admin: str, name: str, **labels: str) -> float:
    """The sum of a proxy's samples of `name` that carry these labels (others free)."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as resp:
        samples = parse_text(resp.read().decode())
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def inbound_requests(admin: str) -> float:
    return proxy_metric(admin, "request_total", direction="inbound")


def heartbeats(run) -> dict[str, float]:
    """Each proxy's last heartbeat time in `tulle-proxies`, read as the CLI reads the bus
    ({} while the bus cannot be read)."""
    from tulle import schemas
    from tulle.bus import Bus, BusCredentials

    nats = read_record(run["state"])["nats"]

    async def read() -> dict[str, float]:
        bus = Bus(nats["url"], component="fault-test", credentials=BusCredentials.for_seed(nats["observer_creds"]))
        await bus.start()
        try:
            beats = await bus.items(schemas.PROXIES_BUCKET, schemas.ProxyHeartbeat)
        finally:
            await bus.close()
        return {hb.workload: hb.time for hb in beats.values()}

    try:
        return asyncio.run(asyncio.wait_for(read(), 10))
    except Exception:  # NATS restarting or just resumed: the caller waits and asks again
        return {}


def signal_pid(pid: int, sig: int) -> None:
    os.kill(pid, sig)


# --- the faults, in order (each leaves the mesh healthy for the next) -----------------------


def test_killing_nats_fails_no_request_and_proxies_log_back_in(mesh):
    w = Window(mesh, "kill and restart NATS")
    old = components(mesh)["nats"]
    signal_pid(old["pid"], signal.SIGKILL)
    wait_until(lambda: components(mesh)["nats"]["pid"] != old["pid"] and components(mesh)["nats"].get("restarts", 0)
               > old.get("restarts", 0), timeout=30, what="the supervisor to restart NATS")
    restarted = time.time()
    # Every proxy reached the new server: through auth callout, with its workload token.
    wait_until(lambda: all(t > restarted for t in heartbeats(mesh).values()) and len(heartbeats(mesh)) == 2,
               timeout=60, interval=0.5, what="every proxy's heartbeat on the restarted NATS")
    got = w.close()
    assert got["failed"] == 0, explain(mesh, got)


def test_killing_every_control_plane_service_at_once_fails_no_request(mesh):
    w = Window(mesh, "kill every control-plane service at once")
    before = components(mesh)
    names = ("identity", "destination", "policy", "injector")
    for name in names:
        signal_pid(before[name]["pid"], signal.SIGKILL)
    down = load_stats(mesh)["sent"]
    wait_until(lambda: all(components(mesh)[n]["restarts"] > before[n]["restarts"] for n in names) and all_ready(mesh),
               timeout=90, interval=0.2, what="every service restarted and ready")
    assert load_stats(mesh)["sent"] > down, "no request was sent while the services were down"
    got = w.close()
    assert got["failed"] == 0, explain(mesh, got)


def test_killing_nats_and_every_service_together_fails_no_request(mesh):
    # No bus and no auth callout: proxies serve on what they know, then log in again once
    # identity answers the callout for the new NATS.
    w = Window(mesh, "kill NATS and every control-plane service together")
    before = components(mesh)
    for c in before.values():
        signal_pid(c["pid"], signal.SIGKILL)
    wait_until(lambda: all(components(mesh)[n].get("restarts", 0) > c.get("restarts", 0) for n, c in before.items())
               and all_ready(mesh), timeout=90, interval=0.2, what="NATS and every service restarted and ready")
    restarted = time.time()
    wait_until(lambda: len(hb := heartbeats(mesh)) == 2 and all(t > restarted for t in hb.values()), timeout=60,
               interval=0.5, what="every proxy back on the bus")
    got = w.close()
    assert got["failed"] == 0, explain(mesh, got)


def test_freezing_nats_longer_than_a_heartbeat_ttl_fails_no_request(mesh):
    from tulle.schemas import PROXY_HEARTBEAT_TTL_S

    w = Window(mesh, "freeze NATS (SIGSTOP) past the heartbeat TTL")
    nats = components(mesh)["nats"]
    signal_pid(nats["pid"], signal.SIGSTOP)
    frozen_at = load_stats(mesh)
    try:
        # The fault is a duration: NATS stays frozen past the heartbeats' TTL (and past the
        # clients' ping timeout, so every connection is dropped and made again).
        time.sleep(PROXY_HEARTBEAT_TTL_S + 1)
    finally:
        signal_pid(nats["pid"], signal.SIGCONT)
    resumed = time.time()
    assert load_stats(mesh)["ok"] > frozen_at["ok"], "no request succeeded while NATS was frozen"
    wait_until(lambda: len(hb := heartbeats(mesh)) == 2 and all(t > resumed for t in hb.values()), timeout=60,
               interval=0.5, what="every proxy's heartbeat after NATS came back")
    got = w.close()
    assert got["failed"] == 0, explain(mesh, got)


def test_identity_down_past_every_renewal_point_fails_no_request_and_proxies_renew_after(mesh):
    w = Window(mesh, f"identity frozen 12 s (certificates of {LIFETIME_S} s, renewed every {MAX_REFRESH_S} s)")
    admins = {name: wl["proxy"]["admin"] for name, wl in workloads(mesh).items()}
    identity = components(mesh)["identity"]
    signal_pid(identity["pid"], signal.SIGSTOP)
    try:
        # The fault's duration: three renewal intervals. Counted from one interval in (an
        # answer identity sent just before it stopped may still be on its way meanwhile).
        time.sleep(MAX_REFRESH_S)
        refreshed_at_stop = {n: proxy_metric(a, "identity_cert_refresh_total") for n, a in admins.items()}
        time.sleep(2 * MAX_REFRESH_S)
        refreshed_during = {n: proxy_metric(a, "identity_cert_refresh_total") for n, a in admins.items()}
        expiry = {n: proxy_metric(a, "identity_cert_expiration_timestamp_seconds") for n, a in admins.items()}
    finally:
        signal_pid(identity["pid"], signal.SIGCONT)
    # No proxy got a certificate while identity was down, and each still held a valid one.
    assert refreshed_during == refreshed_at_stop
    assert all(e > time.time() for e in expiry.values()), expiry
    wait_until(lambda: all(proxy_metric(a, "identity_cert_refresh_total") > refreshed_during[n]
                           for n, a in admins.items()), timeout=60, interval=0.3,
               what="every proxy to renew its certificate once identity answers again")
    got = w.close()
    assert got["failed"] == 0, explain(mesh, got)


def test_rolling_the_service_to_a_new_workload_fails_no_request(mesh):
    w = Window(mesh, "roll hello to hello-2 (new endpoint up, old one drained)")
    folder = mesh["folder"]
    (folder / "hello-2.yaml").write_text(workload_yaml("hello-2", NS, labels={"app": "hello"}, sa="hello"))

    def endpoints() -> list[str]:
        return [e["workload"] for s in json.loads(tulle("status", "-o", "json", state=mesh["state"]).stdout)["services"]
                for e in s["endpoints"] if e["ready"]]

    wait_until(lambda: sorted(endpoints()) == ["hello", "hello-2"], timeout=60, interval=0.3,
               what="hello-2 ready behind the service")
    old = workloads(mesh)["hello"]
    # The old endpoint still takes traffic when it goes: the drain is what is tested.
    served = inbound_requests(old["proxy"]["admin"])
    wait_until(lambda: inbound_requests(old["proxy"]["admin"]) >= served + 20, timeout=30,
               what="the old endpoint to keep serving next to the new one")
    (folder / "hello.yaml").unlink()
    wait_until(lambda: "hello" not in workloads(mesh) and not process_alive(old["proxy"]["pid"], old["proxy"]["start"])
               and not process_alive(old["app"]["pid"], old["app"]["start"]), timeout=60, interval=0.2,
               what="the old workload stopped")
    assert endpoints() == ["hello-2"]
    got = w.close()
    assert got["failed"] == 0, explain(mesh, got)


def test_restarting_the_apps_process_fails_only_requests_that_reached_it_while_it_was_down(mesh):
    w = Window(mesh, "kill the app behind hello (restarted by the supervisor)")
    name = "hello-2"  # the service was rolled to it
    hello = workloads(mesh)[name]
    signal_pid(hello["app"]["pid"], signal.SIGKILL)
    wait_until(lambda: (h := workloads(mesh)[name])["app"]["restarts"] > hello["app"]["restarts"] and h["ready"],
               timeout=60, interval=0.2, what=f"{name}'s app restarted and ready")
    served = load_stats(mesh)["ok"] + 10
    wait_until(lambda: load_stats(mesh)["ok"] >= served, timeout=30, what="hello to answer again")
    back = load_stats(mesh)
    got = w.close()
    # The requests that reached hello while its app was gone fail at once, with the proxy's
    # reason; none hangs, none fails once the app answers its probe again.
    assert all(why.startswith(("502 ", "503 ")) for _, why in got["failures"]), explain(mesh, got)
    assert load_stats(mesh)["failed"] == back["failed"], explain(mesh, got)


def test_down_after_the_faults_leaves_no_process_or_namespace(mesh):
    record = read_record(mesh["state"])
    processes = recorded_pids(record)
    down = tulle("down", state=mesh["state"])
    assert down.returncode == 0, down.stderr
    assert [pid for pid, start in processes if process_alive(pid, start)] == []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert not any(w["netns"] in namespaces for w in record["workloads"])
    assert f" {record['net']['bridge']}:" not in links
    assert not Path(f"/run/tulle/run-{record['net']['n']}").exists()
