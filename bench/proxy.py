"""The proxy benchmark: one small HTTP/1.1 request (1 KB response) through four paths.

    python -m bench.proxy [--rounds 3] [--duration 5] [--connections 32] [--no-pin] [--json FILE]
    make bench

Paths, measured interleaved (A B C D A B C D ...) and reported as medians over rounds:
  direct   client → server
  tulle    client → tulle outbound → mTLS → tulle inbound → server   (two `python -m proxy`)
  nginx    client → nginx → mutual TLS (proxy_ssl_certificate + ssl_verify_client) → nginx → server
  haproxy  client → haproxy → mutual TLS (crt + verify required) → haproxy → server

The server is an nginx answering a fixed 1 KB body. The Tulle proxies are real processes
with certificates from a real identity service (`python -m services.identity`, local
tokens) and their endpoint set in real NATS KV. Every proxy runs one worker / one thread.
Latency comes from an open-loop generator (bench/openloop.py) at fixed rates (200 and
500 req/s); throughput from wrk at saturation. CPU-seconds per 1,000 requests come from
/proc during the 500 req/s runs; peak RSS is each process's VmHWM (nginx: master + worker).

Pinning (default): servers and proxies on CPU 0, load generators on CPU 1 (taskset).
Figures only: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tulle import pki, schemas  # noqa: E402
from tulle.natsserver import NatsServer, free_port  # noqa: E402

PATHS = ("direct", "tulle", "nginx", "haproxy")
RATES = (200, 500)
BODY = b"x" * 1024
NS = "bench"


# --- processes ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    # the processes whose CPU and memory count (a master and its workers)
    pids: list[int] = field(default_factory=list)

    def refresh(self) -> None:
        self.pids = [self.popen.pid] + children(self.popen.pid)

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                total += cpu_seconds(pid)
            except OSError:
                pass
        return total

    def rss(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                total += peak_rss_mb(pid)
            except OSError:
                pass
        return total

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class Bench:
    def __init__(self, args):
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="tulle-bench-"))
        self.procs: list[Proc] = []
        self.pin_servers = [] if args.no_pin else ["taskset", "-c", "0"]
        self.pin_load = [] if args.no_pin else ["taskset", "-c", "1"]
        self.nats: NatsServer | None = None
        self.ports: dict[str, int] = {}
        self.proxies: dict[str, list[Proc]] = {}

    def spawn(self, name: str, cmd: list[str], env: dict | None = None, pin: bool = True) -> Proc:
        log = open(self.dir / f"{name}.log", "ab")
        popen = subprocess.Popen((self.pin_servers if pin else []) + cmd, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, cwd=REPO)
        log.close()
        proc = Proc(name, popen)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        if self.nats is not None:
            self.nats.stop()
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- setup ----------------------------------------------------------------------------

    def certificates(self) -> None:
        anchor = pki.new_trust_anchor()
        issuer = pki.new_issuer(anchor)
        d = self.dir / "issuer"
        d.mkdir()
        (d / "ca.crt").write_bytes(anchor.cert_pem)
        (d / "issuer.crt").write_bytes(issuer.cert_pem)
        (d / "issuer.key").write_bytes(issuer.key_pem)
        os.chmod(d / "issuer.key", 0o600)
        self.issuer_dir = d
        self.anchor_pem = anchor.cert_pem
        self.server_identity = schemas.identity_name("server", NS)
        self.client_identity = schemas.identity_name("client", NS)
        # Files for nginx and HAProxy, from the same CA (the identity service issues Tulle's).
        for role, ident in (("server", self.server_identity), ("client", self.client_identity)):
            cert, key = pki.issue_leaf(issuer, ident)
            (self.dir / f"{role}.crt").write_bytes(pki.cert_pem(cert) + issuer.cert_pem)
            (self.dir / f"{role}.key").write_bytes(pki.key_pem(key))
            (self.dir / f"{role}.pem").write_bytes(pki.cert_pem(cert) + issuer.cert_pem + pki.key_pem(key))
        (self.dir / "ca.crt").write_bytes(anchor.cert_pem)
        secret = pki.new_token_secret()
        (self.dir / "token-secret").write_bytes(secret)
        for sa in ("server", "client"):
            (self.dir / f"{sa}.token").write_text(pki.make_local_token(secret, NS, sa))

    def nginx_conf(self, name: str, body: str) -> Path:
        prefix = self.dir / name
        (prefix / "logs").mkdir(parents=True)
        conf = prefix / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp_body;
    proxy_temp_path {prefix}/tmp_proxy;
    fastcgi_temp_path {prefix}/tmp_fcgi;
    uwsgi_temp_path {prefix}/tmp_uwsgi;
    scgi_temp_path {prefix}/tmp_scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    {body}
}}
""")
        return conf

    def start_origin(self) -> None:
        port = self.ports["origin"] = free_port()
        conf = self.nginx_conf("origin", f"""
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/plain; return 200 "{BODY.decode()}"; }}
    }}""")
        self.origin = self.spawn("origin", ["nginx", "-p", str(conf.parent), "-c", str(conf)])

    def start_nginx_pair(self) -> None:
        front, back = self.ports["nginx"], self.ports["nginx_back"] = free_port(), free_port()
        d = self.dir
        back_conf = self.nginx_conf("nginx-back", f"""
    upstream origin {{ server 127.0.0.1:{self.ports['origin']}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{back} ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate {d}/server.crt;
        ssl_certificate_key {d}/server.key;
        ssl_client_certificate {d}/ca.crt;
        ssl_verify_client on;
        ssl_verify_depth 3;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}""")
        front_conf = self.nginx_conf("nginx-front", f"""
    upstream back {{ server 127.0.0.1:{back}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{front};
        location / {{
            proxy_pass https://back;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_ssl_protocols TLSv1.3;
            proxy_ssl_certificate {d}/client.crt;
            proxy_ssl_certificate_key {d}/client.key;
            proxy_ssl_trusted_certificate {d}/ca.crt;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 3;
            proxy_ssl_name {self.server_identity};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}
    }}""")
        self.proxies["nginx"] = [
            self.spawn("nginx-front", ["nginx", "-p", str(front_conf.parent), "-c", str(front_conf)]),
            self.spawn("nginx-back", ["nginx", "-p", str(back_conf.parent), "-c", str(back_conf)]),
        ]

    def start_haproxy_pair(self) -> None:
        front, back = self.ports["haproxy"], self.ports["haproxy_back"] = free_port(), free_port()
        d = self.dir
        common = """
global
    nbthread 1
    maxconn 4096
    tune.ssl.default-dh-param 2048
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    http-reuse always
"""
        (d / "haproxy-back.cfg").write_text(common + f"""
frontend in
    bind 127.0.0.1:{back} ssl crt {d}/server.pem ca-file {d}/ca.crt verify required ssl-min-ver TLSv1.3
    default_backend origin
backend origin
    server s1 127.0.0.1:{self.ports['origin']}
""")
        (d / "haproxy-front.cfg").write_text(common + f"""
frontend in
    bind 127.0.0.1:{front}
    default_backend peer
backend peer
    server s1 127.0.0.1:{back} ssl crt {d}/client.pem ca-file {d}/ca.crt verify required verifyhost {self.server_identity} sni str({self.server_identity}) ssl-min-ver TLSv1.3
""")
        self.proxies["haproxy"] = [
            self.spawn("haproxy-front", ["haproxy", "-db", "-f", str(d / "haproxy-front.cfg")]),
            self.spawn("haproxy-back", ["haproxy", "-db", "-f", str(d / "haproxy-back.cfg")]),
        ]

    def start_tulle(self) -> None:
        self.nats = NatsServer(self.dir / "nats").start()
        ident_admin = free_port()
        self.spawn("identity", [sys.executable, "-m", "services.identity", "--nats", self.nats.url,
                                "--admin", f"127.0.0.1:{ident_admin}", "--issuer-dir", str(self.issuer_dir),
                                "--token-secret-file", str(self.dir / "token-secret"), "--log-format", "json"])
        self.ports["tulle_in"] = free_port()
        self.ports["tulle"] = free_port()
        admins = []
        procs = []
        for role, inbound, outbound in (("client", free_port(), self.ports["tulle"]),
                                        ("server", self.ports["tulle_in"], free_port())):
            admin = free_port()
            admins.append(admin)
            env = {
                "TULLE_NATS_URL": self.nats.url, "TULLE_PROXY_NAMESPACE": NS, "TULLE_PROXY_WORKLOAD": f"{role}-0",
                "TULLE_PROXY_SERVICE_ACCOUNT": role, "TULLE_PROXY_TOKEN_FILE": str(self.dir / f"{role}.token"),
                "TULLE_PROXY_INBOUND_ADDR": f"127.0.0.1:{inbound}", "TULLE_PROXY_OUTBOUND_ADDR": f"127.0.0.1:{outbound}",
                "TULLE_PROXY_ADMIN_ADDR": f"127.0.0.1:{admin}", "TULLE_PROXY_TRANSPARENT": "false",
                "TULLE_PROXY_APP_HOST": "127.0.0.1", "TULLE_LOG_LEVEL": "warning", "TULLE_LOG_FORMAT": "json",
                "PYTHONPATH": str(REPO),
            }
            procs.append(self.spawn(f"tulle-{role}", [sys.executable, "-m", "proxy"], env))
        self.proxies["tulle"] = procs
        asyncio.run(self._publish_endpoints())
        for admin in admins:
            wait(lambda: http_status(f"http://127.0.0.1:{admin}/ready") == 200, 60, f"tulle proxy :{admin} ready")

    async def _publish_endpoints(self) -> None:
        from tulle.bus import Bus

        bus = Bus(self.nats.url, component="bench")
        await bus.start()
        origin = self.ports["origin"]
        await bus.put(schemas.ENDPOINTS_BUCKET, schemas.endpoints_key(NS, "origin", origin), schemas.EndpointSet(
            namespace=NS, service="origin", port=origin, endpoints=[schemas.Endpoint(
                address="127.0.0.1", port=origin, identity=self.server_identity, proxy_port=self.ports["tulle_in"])]))
        # Each proxy is ready once its inbound policy arrived (as the policy service writes
        # it): the server's app port behind a Server that admits the client's identity only,
        # so every request through the pair pays for a real authorization decision.
        from proxy.policy import default_port_policy

        for role in ("client", "server"):
            ports = []
            if role == "server":
                ports = [schemas.PortPolicy(origin, "origin-http", "Server", "unknown", [schemas.Authorization(
                    "origin-from-client", identities=[self.client_identity])])]
            await bus.put(schemas.POLICY_BUCKET, schemas.policy_key(NS, f"{role}-0"), schemas.WorkloadPolicy(
                namespace=NS, workload=f"{role}-0", default_policy="all-unauthenticated",
                default=default_port_policy("all-unauthenticated", schemas.DEFAULT_CLUSTER_NETWORKS), ports=ports))
        await bus.close()

    def setup(self) -> None:
        self.certificates()
        self.start_origin()
        self.start_nginx_pair()
        self.start_haproxy_pair()
        self.start_tulle()
        for name in ("origin", "nginx", "haproxy"):
            port = self.ports[name]
            wait(lambda: http_status(f"http://127.0.0.1:{port}/") == 200, 20, f"{name} answering")
        time.sleep(0.3)
        for procs in self.proxies.values():
            for p in procs:
                p.refresh()
        self.origin.refresh()

    def target(self, path: str) -> tuple[int, str]:
        port = self.ports["origin"] if path == "direct" else self.ports[path]
        return port, f"origin.{NS}:{self.ports['origin']}"

    # --- measuring --------------------------------------------------------------------------

    def openloop(self, path: str, rate: int) -> dict:
        port, host = self.target(path)
        procs = self.proxies.get(path, [])
        before = [p.cpu() for p in procs]
        out = subprocess.run(self.pin_load + [sys.executable, "-m", "bench.openloop", "--port", str(port),
                                              "--host-header", host, "--rate", str(rate),
                                              "--duration", str(self.args.duration)],
                             capture_output=True, text=True, cwd=REPO, timeout=self.args.duration + 60)
        if out.returncode != 0:
            raise RuntimeError(f"openloop failed: {out.stderr[-2000:]}")
        result = json.loads(out.stdout)
        done = max(result["completed"], 1)
        result["cpu_s_per_1k"] = [round((p.cpu() - b) / done * 1000, 4) for p, b in zip(procs, before)]
        return result

    def wrk(self, path: str, duration: float | None = None) -> dict:
        port, host = self.target(path)
        procs = self.proxies.get(path, [])
        before = [p.cpu() for p in procs]
        d = duration or self.args.duration
        out = subprocess.run(self.pin_load + ["wrk", "-t1", f"-c{self.args.connections}", f"-d{max(1, round(d))}s",
                                              "-H", f"Host: {host}", f"http://127.0.0.1:{port}/"],
                             capture_output=True, text=True, timeout=d + 60)
        m = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
        if m is None:
            raise RuntimeError(f"wrk failed: {out.stdout[-1000:]} {out.stderr[-1000:]}")
        total = re.search(r"(\d+) requests in", out.stdout)
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
        sock_err = re.search(r"Socket errors: (.*)", out.stdout)
        n = int(total.group(1)) if total else 0
        return {
            "rps": float(m.group(1)) if m else 0.0, "requests": n,
            "non_2xx": int(errors.group(1)) if errors else 0, "socket_errors": sock_err.group(1) if sock_err else "",
            "cpu_s_per_1k": [round((p.cpu() - b) / max(n, 1) * 1000, 4) for p, b in zip(procs, before)],
        }

    def run(self) -> dict:
        self.setup()
        for path in PATHS:  # warm up pools, TLS sessions, caches
            self.wrk(path, 2)
        rounds = []
        for r in range(self.args.rounds):
            row = {}
            for path in PATHS:
                row[path] = {f"open_{rate}": self.openloop(path, rate) for rate in RATES}
                row[path]["wrk"] = self.wrk(path)
                print(f"round {r + 1} {path}: {summary_line(row[path])}", file=sys.stderr, flush=True)
            rounds.append(row)
        rss = {path: [round(p.rss(), 1) for p in procs] for path, procs in self.proxies.items()}
        return {"rounds": rounds, "peak_rss_mb": rss}


def summary_line(r: dict) -> str:
    o5 = r["open_500"]
    return (f"wrk {r['wrk']['rps']:.0f} rps; 500/s p50 {o5['p50_ms']:.3f} ms p99 {o5['p99_ms']:.3f} ms; "
            f"cpu/1k {o5['cpu_s_per_1k']}")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


# --- report ---------------------------------------------------------------------------------


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def report(raw: dict, args) -> dict:
    rounds = raw["rounds"]
    out: dict = {"pinned": not args.no_pin,
                 "pinning": "none" if args.no_pin else
                 "servers and proxies on CPU 0 (taskset -c 0), load generators on CPU 1 (taskset -c 1)",
                 "rounds": len(rounds), "duration_s": args.duration, "wrk_connections": args.connections,
                 "response_bytes": len(BODY), "paths": {}}
    for path in PATHS:
        p = {"rps": med(r[path]["wrk"]["rps"] for r in rounds)}
        for rate in RATES:
            k = f"open_{rate}"
            for q in ("p50_ms", "p99_ms", "max_ms"):
                p[f"{q[:-3]}_at_{rate}_ms"] = med(r[path][k][q] for r in rounds)
            p[f"errors_at_{rate}"] = sum(r[path][k]["errors"] + r[path][k]["non_200"] for r in rounds)
        if path != "direct":
            cpu = [sum(r[path]["open_500"]["cpu_s_per_1k"]) for r in rounds]
            p["cpu_s_per_1k_at_500"] = med(cpu)
            p["cpu_s_per_1k_each_at_500"] = [med(r[path]["open_500"]["cpu_s_per_1k"][i] for r in rounds) for i in range(2)]
            p["cpu_s_per_1k_at_saturation"] = med(sum(r[path]["wrk"]["cpu_s_per_1k"]) for r in rounds)
            p["peak_rss_mb"] = raw["peak_rss_mb"][path]
        out["paths"][path] = p
    # What a path adds is taken per round, against the direct run of the same round (the
    # machine's noise drifts between rounds), then the median over rounds.
    for path in PATHS[1:]:
        p = out["paths"][path]
        for rate in RATES:
            k = f"open_{rate}"
            for q in ("p50", "p99"):
                p[f"added_{q}_at_{rate}_ms"] = med(r[path][k][f"{q}_ms"] - r["direct"][k][f"{q}_ms"] for r in rounds)
    direct_p99 = [r["direct"]["open_500"]["p99_ms"] for r in rounds]
    out["direct_p99_at_500_spread_ms"] = [min(direct_p99), max(direct_p99)]
    t, n = out["paths"]["tulle"], out["paths"]["nginx"]
    p99_ratio = ratio(t["added_p99_at_500_ms"], n["added_p99_at_500_ms"]) if n["added_p99_at_500_ms"] > 0.05 else None
    out["targets"] = {
        "added_p99_at_500_vs_nginx": {
            "value": p99_ratio, "target": "<= 2.0",
            "note": "" if p99_ratio is not None else
            f"nginx adds {n['added_p99_at_500_ms']:.3f} ms at p99, within this run's noise (direct p99 "
            f"{min(direct_p99):.2f}-{max(direct_p99):.2f} ms): compare tulle's added p99 "
            f"({t['added_p99_at_500_ms']:.3f} ms) directly"},
        "added_p50_at_500_vs_nginx": {"value": ratio(t["added_p50_at_500_ms"], n["added_p50_at_500_ms"]),
                                      "target": "(for reference)"},
        "throughput_vs_nginx": {"value": ratio(t["rps"], n["rps"]), "target": ">= 0.35 (goal 0.5)"},
        "cpu_per_1k_vs_nginx": {"value": ratio(t["cpu_s_per_1k_at_500"], n["cpu_s_per_1k_at_500"]), "target": "<= 3.0"},
        "peak_rss_mb_each_tulle_proxy": {"value": t["peak_rss_mb"], "target": "< 60 each"},
    }
    return out


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def markdown(out: dict) -> str:
    rows = ["| path | req/s (wrk) | p50 / p99 / max @200/s (ms) | p50 / p99 / max @500/s (ms) | added p50 / p99 @500/s (ms) "
            "| CPU-s per 1k req @500/s (each proxy) | peak RSS MB (each proxy) |",
            "|---|---|---|---|---|---|---|"]
    for path in PATHS:
        p = out["paths"][path]
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        added = "-" if path == "direct" else f"{f(p['added_p50_at_500_ms'])} / {f(p['added_p99_at_500_ms'])}"
        cpu = "-" if path == "direct" else f"{p['cpu_s_per_1k_at_500']:.3f} ({', '.join(f'{c:.3f}' for c in p['cpu_s_per_1k_each_at_500'])})"
        rss = "-" if path == "direct" else ", ".join(f"{m:.1f}" for m in p["peak_rss_mb"])
        rows.append(f"| {path} | {p['rps']:.0f} | {f(p['p50_at_200_ms'])} / {f(p['p99_at_200_ms'])} / {f(p['max_at_200_ms'])} "
                    f"| {f(p['p50_at_500_ms'])} / {f(p['p99_at_500_ms'])} / {f(p['max_at_500_ms'])} | {added} | {cpu} | {rss} |")
    rows.append("")
    rows.append(f"Pinning: {out['pinning']}. Medians of {out['rounds']} interleaved rounds, {out['duration_s']} s each "
                f"measurement; wrk -t1 -c{out['wrk_connections']}; {out['response_bytes']} B responses.")
    rows.append("")
    rows.append("| target (Tulle pair vs nginx pair) | value | target |")
    rows.append("|---|---|---|")
    for name, t in out["targets"].items():
        rows.append(f"| {name} | {t['value']} | {t['target']} |")
    for t in out["targets"].values():
        if t.get("note"):
            rows.append("")
            rows.append(f"Note: {t['note']}.")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--connections", type=int, default=32, help="wrk connections")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--json", help="also write the JSON result to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    args = p.parse_args()
    missing = [t for t in ("nginx", "haproxy", "wrk") + (() if args.no_pin else ("taskset",)) if not shutil.which(t)]
    if missing:
        sys.exit(f"bench.proxy: missing {', '.join(missing)} (make bench installs them as root)")
    bench = Bench(args)
    try:
        raw = bench.run()
    finally:
        bench.close()
    out = report(raw, args)
    print(markdown(out))
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": out, "raw": raw}, indent=1))


if __name__ == "__main__":
    main()
