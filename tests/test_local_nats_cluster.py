"""`tulle up --nats-cluster 3`: local mode on a three-node JetStream cluster, as the Helm
chart runs NATS. Kill a node: meshed requests keep working, the supervisor restarts it,
`tulle status` shows it, the CLI reads the bus; `tulle down` stops all three."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import urllib.error
import urllib.request

import pytest

from tests.conftest import wait_until
from tests.local_support import proxy_logs, read_record, recorded_pids, status_json, tiny_folder, tulle
from tulle import schemas
from tulle.bus import Bus, BusCredentials
from tulle.local.state import nats_nodes, process_alive


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("local-cluster")
    manifests, state = tiny_folder(base / "manifests"), base / "state"
    started = tulle("up", str(manifests), "--detach", "--isolation", "none", "--nats-cluster", "3",
                    "--timeout", "120", state=state)
    try:
        yield {"state": state, "up": started}
    finally:
        tulle("down", state=state)


def get_hello(worker_address: str) -> bytes:
    """What the worker's HTTP client does with its HTTP_PROXY: a meshed request to hello."""
    proxy = urllib.request.ProxyHandler({"http": f"http://{worker_address}:4140"})
    with urllib.request.build_opener(proxy).open("http://hello.tiny.svc.cluster.local/", timeout=15) as resp:
        return resp.read()


async def stream_replicas(record: dict) -> dict[str, int]:
    nats = record["nats"]
    bus = Bus(nats["url"], component="test", credentials=BusCredentials.for_seed(nats["observer_creds"]))
    await bus.start()
    try:
        out = {}
        for bucket in (schemas.ENDPOINTS_BUCKET, schemas.POLICY_BUCKET, schemas.IDENTITY_BUCKET,
                       schemas.PROXIES_BUCKET, schemas.LEASES_BUCKET):
            out[bucket] = (await bus.js.stream_info(f"KV_{bucket}")).config.num_replicas
        out[schemas.EVENTS_STREAM] = (await bus.js.stream_info(schemas.EVENTS_STREAM)).config.num_replicas
        return out
    finally:
        await bus.close()


def test_up_runs_three_nats_servers_and_replicates_every_bucket_on_them(run):
    up = run["up"]
    assert up.returncode == 0, up.stderr + up.stdout
    assert "(a cluster of 3)" in up.stdout
    record = read_record(run["state"])
    nodes = nats_nodes(record)
    assert [n["name"] for n in nodes] == ["nats-0", "nats-1", "nats-2"]
    assert record["nats"]["url"] == ",".join(n["url"] for n in nodes)
    comps = {c["name"]: c for c in status_json(run["state"])["components"]}
    assert all(comps[f"nats-{i}"]["ready"] for i in range(3))
    assert set(asyncio.run(stream_replicas(record)).values()) == {3}


def test_killing_a_node_fails_no_meshed_request_and_the_supervisor_restarts_it(run):
    state = run["state"]
    worker = next(w for w in read_record(state)["workloads"] if w["name"] == "worker")
    sent, failures, stop = [0], [], threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                if get_hello(worker["address"]) != b"hello\n":
                    failures.append("wrong body")
            except (OSError, urllib.error.HTTPError) as e:
                failures.append(f"{e}")
            sent[0] += 1
            stop.wait(0.02)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        wait_until(lambda: sent[0] >= 10, 30, 0.05, "meshed requests flowing")
        victim = nats_nodes(read_record(state))[1]
        os.kill(victim["pid"], signal.SIGKILL)
        before = sent[0]

        def restarted():
            nodes = {n["name"]: n for n in status_json(state)["components"] if n["name"].startswith("nats-")}
            again = nodes["nats-1"]["pid"] != victim["pid"] and nodes["nats-1"]["restarts"] == 1
            # Every node healthy: the streams nats-1 led have new leaders and it caught up.
            return again and all(n["ready"] for n in nodes.values())
        wait_until(restarted, 90, 0.2, "nats-1 restarted and the cluster whole again")
        wait_until(lambda: sent[0] >= before + 50, 60, 0.05, "requests after the restart")
    finally:
        stop.set()
        thread.join(30)
    assert not failures, failures[:5] + [proxy_logs(state)]
    # The CLI reads the cluster the run recorded, with no flag.
    endpoints = tulle("endpoints", "hello.tiny:80", state=state, timeout=60)
    assert endpoints.returncode == 0, endpoints.stderr + "\n".join(
        f"--- {n['name']}\n" + "\n".join(open(n["log"]).read().splitlines()[-15:])
        for n in nats_nodes(read_record(state)))
    assert "hello.tiny" in endpoints.stdout


def test_down_stops_every_node(run):
    pids = recorded_pids(read_record(run["state"]))
    down = tulle("down", state=run["state"])
    assert down.returncode == 0, down.stderr
    assert not [pid for pid, start in pids if process_alive(pid, start)]
