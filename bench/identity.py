"""Certificates issued per second through NATS, and the certify round trip's latency.

    python -m bench.identity [--requests 6000] [--concurrency 64] [--generators 1] [--replicas 1,2]

Runs its own nats-server, then 1 and then 2 identity replicas as real processes
(`python -m services.identity`, local-mode tokens), and a load generator keeping
`--concurrency` certify requests in flight. CSRs and tokens are made beforehand, so the
generator's key generation is not measured; requests and replies are the real schema
messages. Prints a markdown table and one JSON line. Figures only: nothing here passes
or fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tulle import pki, schemas  # noqa: E402
from tulle.codec import encode  # noqa: E402
from bench.mesh import AUDIENCE, BenchMesh  # noqa: E402
from tulle.natsserver import free_port  # noqa: E402

WORKLOADS = 256  # distinct (token, CSR) pairs, used round-robin


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_payloads(secret: bytes, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        ns, sa = "bench", f"sa-{i}"
        identity = schemas.identity_name(sa, ns)
        csr = pki.new_csr(identity, pki.new_key()).decode()
        token = pki.make_local_token(secret, ns, sa, f"{sa}-0", AUDIENCE)
        out.append(encode(schemas.CertifyRequest(identity, token, csr)))
    return out


class Replica:
    def __init__(self, mesh: BenchMesh, log: Path):
        self.admin = free_port()
        self.log = log
        # Its role's credential (it answers logins too), and no issuance rate limit: this measures
        # what the service can sign (the limit is per identity, and the bench asks for the same
        # few identities over and over).
        self.cmd = mesh.identity_cmd(self.admin) + ["--certify-burst", "1e9", "--certify-rate", "1e9"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Replica":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(REPO)})
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"identity replica exited: see {self.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"identity replica not ready after {timeout}s: see {self.log}")

    def issued(self) -> float:
        from tulle.metrics import sample

        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=2) as r:
            return sample(r.read().decode(), "tulle_identity_certify_total", result="ok")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def generate(nats_url: str, payloads: list[bytes], requests: int, concurrency: int, token_file: str) -> dict:
    """Keep `concurrency` certify requests in flight until `requests` are answered. The
    generator logs in as a proxy does (its workload token, through identity's auth callout):
    only proxies may ask for certificates; each request carries its own workload's token."""
    import nats

    from tulle.bus import BusCredentials

    options = BusCredentials.for_workload(token_file, "bench", "load-0").connect_options(nats_url)
    nc = await nats.connect(nats_url, max_reconnect_attempts=0, connect_timeout=6, **options)
    latencies: list[float] = []
    errors = 0
    next_index = 0

    async def worker():
        nonlocal next_index, errors
        while next_index < requests:
            i = next_index
            next_index += 1
            t = time.perf_counter()
            try:
                reply = await nc.request(schemas.CERTIFY_SUBJECT, payloads[i % len(payloads)], timeout=10)
                ok = orjson.loads(reply.data).get("error") is None
            except Exception:
                ok = False
            latencies.append(time.perf_counter() - t)
            errors += not ok

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await nc.close()
    return {"requests": requests, "elapsed_s": elapsed, "errors": errors, "latencies": latencies}


def run_generators(nats_url: str, payload_file: Path, requests: int, concurrency: int, generators: int,
                   token_file: str) -> dict:
    """The load from `generators` processes at once (each with its share), merged."""
    if generators == 1:
        import uvloop

        payloads = orjson.loads(payload_file.read_bytes())
        return uvloop.run(generate(nats_url, [p.encode() for p in payloads], requests, concurrency, token_file))
    share = requests // generators
    procs = [subprocess.Popen([sys.executable, "-m", "bench.identity", "--worker", nats_url, str(payload_file),
                               str(share), str(max(1, concurrency // generators)), token_file], cwd=REPO,
                              stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(REPO)}) for _ in range(generators)]
    results = [json.loads(p.communicate()[0]) for p in procs]
    return {"requests": sum(r["requests"] for r in results), "elapsed_s": max(r["elapsed_s"] for r in results),
            "errors": sum(r["errors"] for r in results), "latencies": [x for r in results for x in r["latencies"]]}


def summarize(result: dict, cpu: list[float], shares: list[float]) -> dict:
    lat = sorted(result["latencies"])
    ok = result["requests"] - result["errors"]
    return {
        "certs_per_s": round(ok / result["elapsed_s"], 1),
        "p50_ms": round(percentile(lat, 50) * 1000, 2),
        "p99_ms": round(percentile(lat, 99) * 1000, 2),
        "mean_ms": round(statistics.fmean(lat) * 1000, 2),
        "requests": result["requests"],
        "errors": result["errors"],
        "issued_per_replica": [int(s) for s in shares],
        "replica_cpu_ms_per_cert": round(sum(cpu) * 1000 / max(1, ok), 3),
    }


def percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=6000, help="certify requests per measured run")
    ap.add_argument("--concurrency", type=int, default=64, help="requests kept in flight")
    ap.add_argument("--generators", type=int, default=1, help="load generator processes")
    ap.add_argument("--replicas", default="1,2", help="replica counts to measure, e.g. 1,2")
    ap.add_argument("--repeat", type=int, default=3, help="measured runs per replica count (the median is shown)")
    ap.add_argument("--worker", nargs=5, metavar=("URL", "PAYLOADS", "N", "CONCURRENCY", "TOKEN"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import uvloop

        url, payload_file, n, conc, token_file = args.worker
        payloads = [p.encode() for p in orjson.loads(Path(payload_file).read_bytes())]
        print(json.dumps(uvloop.run(generate(url, payloads, int(n), int(conc), token_file))))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="tulle-bench-identity-") as tmp:
        tmp = Path(tmp)
        mesh = BenchMesh(tmp).start()
        mesh.make_identity()
        secret = mesh.token_secret
        token_file = str(mesh.token_file("bench", "load-0", "load"))
        payload_file = tmp / "payloads.json"
        payload_file.write_bytes(orjson.dumps([p.decode() for p in make_payloads(secret, WORKLOADS)]))
        try:
            for n in [int(x) for x in args.replicas.split(",")]:
                replicas = [Replica(mesh, tmp / f"identity-{n}-{i}.log").start() for i in range(n)]
                try:
                    for r in replicas:
                        r.wait_ready()
                    run_generators(mesh.url, payload_file, 500, args.concurrency, 1, token_file)  # warm-up
                    runs = []
                    for _ in range(args.repeat):
                        before = [r.issued() for r in replicas]
                        cpu_before = [cpu_seconds(r.proc.pid) for r in replicas]
                        result = run_generators(mesh.url, payload_file, args.requests, args.concurrency, args.generators,
                                                token_file)
                        cpu = [cpu_seconds(r.proc.pid) - c for r, c in zip(replicas, cpu_before)]
                        shares = [r.issued() - b for r, b in zip(replicas, before)]
                        runs.append(summarize(result, cpu, shares))
                    # One request at a time: the round trip without queueing.
                    alone = summarize(run_generators(mesh.url, payload_file, args.requests // 4, 1, 1, token_file), [0.0],
                                      [0.0])
                finally:
                    for r in replicas:
                        r.stop()
                # The median run by throughput; the range shows how noisy the box was.
                runs.sort(key=lambda x: x["certs_per_s"])
                row = dict(runs[len(runs) // 2])
                row.update(replicas=n, concurrency=args.concurrency, generators=args.generators,
                           certs_per_s_range=[runs[0]["certs_per_s"], runs[-1]["certs_per_s"]],
                           one_at_a_time={"p50_ms": alone["p50_ms"], "p99_ms": alone["p99_ms"],
                                          "certs_per_s": alone["certs_per_s"]})
                rows.append(row)
        finally:
            mesh.stop()

    print(f"identity certify through NATS ({os.cpu_count()} CPUs, {args.concurrency} in flight, "
          f"{args.generators} generator process(es), {args.requests} requests per run, median of {args.repeat} runs)\n")
    print("| replicas | certs/s | (range) | p50 ms | p99 ms | p50 / p99 ms one at a time | errors | issued per replica "
          "| replica CPU ms/cert |")
    print("|---:|---:|---|---:|---:|---|---:|---|---:|")
    for r in rows:
        lo, hi = r["certs_per_s_range"]
        one = r["one_at_a_time"]
        print(f"| {r['replicas']} | {r['certs_per_s']:.0f} | {lo:.0f}–{hi:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{one['p50_ms']:.2f} / {one['p99_ms']:.2f} | {r['errors']} | "
              f"{', '.join(str(s) for s in r['issued_per_replica'])} | {r['replica_cpu_ms_per_cert']:.3f} |")
    print()
    print(json.dumps({"bench": "identity", "results": rows}))


if __name__ == "__main__":
    main()
