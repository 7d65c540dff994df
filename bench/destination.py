"""Endpoint propagation through the destination service, and the cost of a full resync.

    python -m bench.destination [--services 10000] [--processes 8] [--watches 125]
                                [--changes 60] [--spacing-ms 500]

1. Full resync (a destination starting with `--services` Services, each with one ready
   meshed Pod, 20,000 KV keys: name + cluster IP):
   - the real process, `python -m services.destination --manifests DIR`, from start to
     /ready (every key written), against an empty KV ("cold") and again against a KV
     that already holds it all ("warm": reads back, writes nothing);
   - the same phases in-process: compile (pure), the first write of every key, and a
     takeover by a new leader over a full KV.
2. Lone-change latency: `--processes` watcher processes each hold `--watches` KV watches
   (tulle.bus.Bus.watch, one NATS connection per process, as a proxy does) of the same
   endpoint set: 1,000 watches of one popular service by default. The driver runs the
   real pipeline in-process (DestinationState -> KVWriter -> KV, the leader elected
   through tulle.leader) with all `--services` services loaded, and changes one pod's
   address every `--spacing-ms`; each watcher notes time.time() when the decoded value
   arrives. Latency = arrival - the moment the event was handed to the state (same
   machine, same clock). The folder source adds its poll interval (0.1 s) on top in local mode.
   Then a baseline: the same watchers, the value put straight into KV by a bare client,
   which is what NATS and the Python watchers alone cost.

Figures only: nothing here passes or fails. Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from services.destination.compile import DestinationState, Settings  # noqa: E402
from tulle.kvwriter import KVWriter  # noqa: E402
from tulle import schemas  # noqa: E402
from tulle.bus import Bus, Change, Snapshot  # noqa: E402
from tulle.codec import decode, encode  # noqa: E402
from tulle.leader import LeaderElection  # noqa: E402
from tulle.metrics import Registry  # noqa: E402
from bench.busauth import bench_nats, bench_seed  # noqa: E402
from tulle.natsserver import free_port  # noqa: E402


def start_nats(store: Path):
    """A bus with the bench user, whose credential this process and its watcher processes
    use (Bus reads TULLE_NATS_CREDS); the destination process gets its own role's."""
    server = bench_nats(store).start()
    os.environ["TULLE_NATS_CREDS"] = bench_seed(server)
    return server
from tulle.resources.parse import parse_object  # noqa: E402
from tulle.sources.base import ResourceEvent  # noqa: E402

BUCKETS = (schemas.ENDPOINTS_BUCKET, schemas.PROFILES_BUCKET)
HOT = ("bench", "hot")  # the service every watcher watches


# --- the objects ----------------------------------------------------------------------------


def service_doc(i: int) -> dict:
    ns = f"ns{i % 10}"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc{i}", "namespace": ns},
            "spec": {"selector": {"app": f"svc{i}"}, "clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


def pod_doc(name: str, ns: str, app: str, ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
            "spec": {"serviceAccountName": app, "containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 8080}]},
                {"name": "tulle-proxy", "ports": [{"containerPort": 4143}]}]},
            "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}


def ip_of(n: int) -> str:
    return f"10.{100 + n // 65536}.{n // 256 % 256}.{n % 256}"


def docs(services: int) -> list[dict]:
    out = []
    for i in range(services):
        out.append(service_doc(i))
        out.append(pod_doc(f"svc{i}-0", f"ns{i % 10}", f"svc{i}", ip_of(i)))
    return out


def hot_docs(seq: int) -> list[dict]:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": HOT[1], "namespace": HOT[0]},
           "spec": {"selector": {"app": "hot"}, "clusterIP": "10.97.0.1",
                    "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
    return [svc, hot_pod(seq)]


def hot_pod(seq: int) -> dict:
    return pod_doc("hot-0", HOT[0], "hot", ip_of(1_000_000 + seq))


def seq_of(address: str) -> int:
    a, b, c, d = (int(x) for x in address.split("."))
    return (b - 100) * 65536 + c * 256 + d - 1_000_000


def progress(what: str) -> None:
    print(f"[bench.destination] {what}", file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


# --- 1. full resync ------------------------------------------------------------------------------


def write_manifests(directory: Path, services: int, per_file: int = 200) -> None:
    """JSON documents (valid YAML), a few hundred per file, as a folder of manifests."""
    all_docs = docs(services)
    for start in range(0, len(all_docs), per_file):
        chunk = all_docs[start:start + per_file]
        (directory / f"m{start // per_file:04d}.yaml").write_text("\n---\n".join(json.dumps(d) for d in chunk))


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def process_start_to_ready(url: str, manifests: Path, log: Path, creds: str = "") -> float:
    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "services.destination", "--nats", url, "--admin",
                             f"127.0.0.1:{port}", "--manifests", str(manifests), "--log-format", "json",
                             "--nats-creds", creds],
                            cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        while not _ready(port):
            if proc.poll() is not None:
                raise RuntimeError(f"destination exited; see {log}")
            if time.monotonic() - started > 600:
                raise RuntimeError(f"destination not ready after 600 s; see {log}")
            time.sleep(0.05)
        return time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait(10)


async def in_process_resync(url: str, services: int) -> dict:
    objects = [parse_object(d) for d in docs(services)]

    def loaded() -> DestinationState:
        st = DestinationState(Settings())
        for o in objects:
            st.apply(ResourceEvent("added", o))
        st.apply(ResourceEvent("synced"))
        return st

    t = time.perf_counter()
    state = loaded()
    state.take_changes()
    compile_s = time.perf_counter() - t
    keys = len(state.desired)

    async def write_all(st: DestinationState) -> tuple[float, int]:
        """From being elected to KV holding the whole state (compile included)."""
        bus = Bus(url, component="bench")
        await bus.start()
        writer = KVWriter(bus, BUCKETS, st.take_changes, is_leader=lambda: True, registry=Registry())
        task = asyncio.ensure_future(writer.run())
        t0 = time.perf_counter()
        writer.forget_written()
        await writer.caught_up.wait()
        elapsed = time.perf_counter() - t0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()
        return elapsed, int(sum(c.value for c in writer.m_writes._children.values()))

    cold_s, cold_writes = await write_all(loaded())
    warm_s, warm_writes = await write_all(loaded())
    return {"keys": keys, "compile_s": compile_s, "first_write_s": cold_s, "first_write_puts": cold_writes,
            "takeover_s": warm_s, "takeover_puts": warm_writes}


# --- 2. lone-change latency ------------------------------------------------------------------------


async def watcher(url: str, key: str, watches: int, changes: int, timeout: float) -> dict:
    """One watcher process: `watches` KV watches of `key`; arrival time of each change."""
    bus = Bus(url, component="bench-watcher")
    await bus.start()
    arrivals: list[list[tuple[int, float]]] = [[] for _ in range(watches)]
    snapshots = 0
    all_snapshots = asyncio.Event()
    done = asyncio.Event()
    finished = 0

    async def one(i: int) -> None:
        try:
            await _one(i)
        except Exception as e:
            print(f"watch {i} failed: {e!r}", file=sys.stderr, flush=True)
            raise

    async def _one(i: int) -> None:
        nonlocal snapshots, finished
        async for item in bus.watch(schemas.ENDPOINTS_BUCKET, key, schemas.EndpointSet):
            now = time.time()
            if isinstance(item, Snapshot):
                snapshots += 1
                if snapshots == watches:
                    all_snapshots.set()
                continue
            if isinstance(item, Change) and item.value is not None and item.value.endpoints:
                seq = seq_of(item.value.endpoints[0].address)
                arrivals[i].append((seq, now))
                if seq >= changes:
                    finished += 1
                    if finished == watches:
                        done.set()
                    return

    tasks = [asyncio.ensure_future(one(i)) for i in range(watches)]
    try:
        await asyncio.wait_for(all_snapshots.wait(), 60)
    except asyncio.TimeoutError:
        # Bus.watch retries quietly when NATS refuses a consumer (e.g. a stream's consumer cap).
        print(f"watcher {os.getpid()}: only {snapshots}/{watches} watches started", file=sys.stderr, flush=True)
        raise SystemExit(1)
    print("ready", flush=True)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await bus.close()
    return {"arrivals": arrivals}


async def latency(url: str, services: int, processes: int, watches: int, changes: int, spacing: float,
                  results: Path) -> dict:
    bus = Bus(url, component="bench-destination")
    await bus.start()
    state = DestinationState(Settings())
    for d in docs(services) + hot_docs(0):
        state.apply(ResourceEvent("added", parse_object(d)))
    state.apply(ResourceEvent("synced"))
    registry = Registry()
    election = LeaderElection(bus, f"bench-{os.getpid()}", registry=registry)
    key = schemas.endpoints_key(*HOT, 80)
    acked: dict[int, float] = {}

    def on_written(k, old, new) -> None:  # NATS acknowledged the put
        if k == (schemas.ENDPOINTS_BUCKET, key) and new is not None:
            es = decode(schemas.EndpointSet, new)
            acked[seq_of(es.endpoints[0].address)] = time.time()

    writer = KVWriter(bus, BUCKETS, state.take_changes, is_leader=election.is_leader, can_write=lambda: state.synced,
                      registry=registry, on_written=on_written)
    election.on_elected = writer.forget_written
    tasks = [asyncio.ensure_future(writer.run()), asyncio.ensure_future(election.run())]
    await writer.caught_up.wait()

    procs: list[subprocess.Popen] = []
    try:
        for i in range(processes):  # one after the other, as proxies come up over time
            p = subprocess.Popen([sys.executable, "-m", "bench.destination", "--watcher", url, key, str(watches),
                                  str(2 * changes), str(results / f"watcher-{i}.json")],
                                 cwd=REPO, stdout=subprocess.PIPE, text=True)
            procs.append(p)
            line = await asyncio.to_thread(p.stdout.readline)
            if line.strip() != "ready":
                raise RuntimeError(f"watcher did not start: {line!r}")
        progress(f"{processes * watches} watches ready; sending {changes} changes")
        sent: dict[int, float] = {}
        for seq in range(1, changes + 1):
            sent[seq] = time.time()
            if state.apply(ResourceEvent("modified", parse_object(hot_pod(seq)))):
                writer.notify()
            await asyncio.sleep(spacing)
        # Baseline: the same watchers, the value put straight into KV (no source, no compile, no writer).
        kv = await bus.kv(schemas.ENDPOINTS_BUCKET)
        template = state.desired[(schemas.ENDPOINTS_BUCKET, key)]
        for seq in range(changes + 1, 2 * changes + 1):
            payload = encode(dataclasses.replace(template, endpoints=[
                dataclasses.replace(template.endpoints[0], address=ip_of(1_000_000 + seq))]))
            sent[seq] = time.time()
            await kv.put(key, payload)
            await asyncio.sleep(spacing)
        for p in procs:
            await asyncio.to_thread(p.communicate)
        outputs = [json.loads((results / f"watcher-{i}.json").read_text()) for i in range(processes)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    batches = writer.m_batches.labels().value
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await election.release()
    await bus.close()

    lat_ms, raw_ms, missing = [], [], 0
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for out in outputs:
        for per_watch in out["arrivals"]:
            got = dict(per_watch)
            for seq in range(1, 2 * changes + 1):
                if seq not in got:
                    missing += 1
                    continue
                ms = (got[seq] - sent[seq]) * 1000
                if seq > changes:
                    raw_ms.append(ms)
                    continue
                lat_ms.append(ms)
                first[seq] = min(first.get(seq, ms), ms)
                last[seq] = max(last.get(seq, ms), ms)
    to_kv = [(acked[s] - sent[s]) * 1000 for s in sent if s in acked]

    def summary(values: list[float]) -> dict:
        return {"p50_ms": percentile(values, 50), "p90_ms": percentile(values, 90), "p99_ms": percentile(values, 99),
                "max_ms": max(values), "mean_ms": statistics.fmean(values)}

    return {"watchers": processes * watches, "processes": processes, "changes": changes,
            "deliveries": len(lat_ms), "missed": missing, "batches": batches,
            **summary(lat_ms),
            "source_to_kv_ack": summary(to_kv),
            "first_watcher": summary(list(first.values())),
            "baseline_raw_kv_put": summary(raw_ms),
            "last_watcher": summary(list(last.values()))}


# --- main ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--watches", type=int, default=125, help="KV watches per watcher process")
    ap.add_argument("--changes", type=int, default=60)
    ap.add_argument("--spacing-ms", type=float, default=500.0,
                    help="time between two changes: longer than a fan-out takes, so each change is alone")
    ap.add_argument("--skip-process", action="store_true", help="skip the real-process resync (YAML parsing)")
    ap.add_argument("--watcher", nargs=5, metavar=("URL", "KEY", "WATCHES", "CHANGES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    import uvloop

    from tulle.log import setup_logging

    setup_logging("bench", "warning")  # to stderr: a watcher's stdout carries its results
    if args.watcher:
        url, key, watches, changes, out = args.watcher
        # A file, not stdout: a pipe the event loop made non-blocking may take a large write only in part.
        Path(out).write_text(json.dumps(uvloop.run(watcher(url, key, int(watches), int(changes), 120.0))))
        return

    result: dict = {"services": args.services}
    with tempfile.TemporaryDirectory(prefix="tulle-bench-destination-") as tmp:
        tmp = Path(tmp)
        if not args.skip_process:
            manifests = tmp / "manifests"
            manifests.mkdir()
            write_manifests(manifests, args.services)
            nats = start_nats(tmp / "nats-process")
            creds = str(nats.seed_file("destination"))
            try:
                result["process_cold_start_to_ready_s"] = process_start_to_ready(nats.url, manifests, tmp / "d1.log", creds)
                progress(f"process, empty KV: {result['process_cold_start_to_ready_s']:.1f} s")
                result["process_warm_restart_to_ready_s"] = process_start_to_ready(nats.url, manifests, tmp / "d2.log", creds)
                progress(f"process, full KV: {result['process_warm_restart_to_ready_s']:.1f} s")
            finally:
                nats.stop()
        nats = start_nats(tmp / "nats")
        try:
            result["in_process"] = uvloop.run(in_process_resync(nats.url, args.services))
            progress(f"in-process resync: {result['in_process']}")
        finally:
            nats.stop()
        nats = start_nats(tmp / "nats-latency")
        try:
            result["lone_change"] = uvloop.run(latency(nats.url, args.services, args.processes, args.watches,
                                                       args.changes, args.spacing_ms / 1000, tmp))
        finally:
            nats.stop()

    lc, ip = result["lone_change"], result["in_process"]
    rows = [
        (f"lone change -> {lc['watchers']} KV watchers ({lc['processes']} processes), p50", f"{lc['p50_ms']:.1f} ms"),
        ("lone change, p90", f"{lc['p90_ms']:.1f} ms"),
        ("lone change, p99", f"{lc['p99_ms']:.1f} ms"),
        ("lone change, max", f"{lc['max_ms']:.1f} ms"),
        ("  of which source -> KV put acknowledged, p50 / p99",
         f"{lc['source_to_kv_ack']['p50_ms']:.1f} / {lc['source_to_kv_ack']['p99_ms']:.1f} ms"),
        ("  first of the watchers to have it, p50 / p99",
         f"{lc['first_watcher']['p50_ms']:.1f} / {lc['first_watcher']['p99_ms']:.1f} ms"),
        ("  last of the watchers to have it, p50 / p99",
         f"{lc['last_watcher']['p50_ms']:.1f} / {lc['last_watcher']['p99_ms']:.1f} ms"),
        ("baseline: the same value put straight into KV -> the same watchers, p50 / p99",
         f"{lc['baseline_raw_kv_put']['p50_ms']:.1f} / {lc['baseline_raw_kv_put']['p99_ms']:.1f} ms"),
        ("deliveries measured / missed", f"{lc['deliveries']} / {lc['missed']}"),
        (f"full resync, process start to ready, empty KV ({args.services} services)",
         f"{result['process_cold_start_to_ready_s']:.1f} s" if "process_cold_start_to_ready_s" in result else "-"),
        ("full resync, process restart to ready, KV already full",
         f"{result['process_warm_restart_to_ready_s']:.1f} s" if "process_warm_restart_to_ready_s" in result else "-"),
        (f"compile {ip['keys']} keys (in-process, pure)", f"{ip['compile_s'] * 1000:.0f} ms"),
        (f"first write of every key ({ip['first_write_puts']} puts)", f"{ip['first_write_s'] * 1000:.0f} ms"),
        (f"takeover over a full KV ({ip['takeover_puts']} puts)", f"{ip['takeover_s'] * 1000:.0f} ms"),
    ]
    print("| figure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
