"""The proxy benchmark: a small HTTP/1.1 request and a gRPC unary call (1 KB responses) through
the Tulle pair and the same job done by others.

    python -m bench.proxy [--rounds 5] [--duration 5] [--slice 0.25] [--pin cpu0|split|none]
                          [--variant NAME=DIR] [--no-grpc] [--json FILE] [--py-spy DIR]
    make bench

HTTP/1.1 paths (wrk at saturation, bench/openloop.py at 200 and 500 req/s):
  direct    client → server
  tulle     client → tulle outbound → mTLS → tulle inbound → server (the default: HTTP/1.1 between them)
  tulle-h2  the same with one multiplexed HTTP/2 connection between the proxies (TULLE_PROXY_MESH_PROTOCOL=h2)
  nginx     client → nginx → mutual TLS (proxy_ssl_certificate + ssl_verify_client) → nginx → server
  haproxy   client → haproxy → mutual TLS (crt + verify required) → haproxy → server
gRPC unary paths (bench/grpcload.py: a grpcio client, 32 calls in flight on its one HTTP/2
connection, and 500 calls/s open loop):
  grpc-direct  client → grpcio server
  grpc-tulle   client → tulle outbound (h2c) → mTLS HTTP/2 → tulle inbound → grpcio server
  grpc-nginx   client → nginx (http2, grpc_pass grpcs://) → mutual TLS → nginx (grpc_pass) → grpcio server

The HTTP server is an nginx answering a fixed 1 KB body; the gRPC server a grpcio server
(bench/grpcorigin.py) answering a fixed 1 KB message. The Tulle proxies are real processes
on the real, authenticated bus (bench/mesh.py: no anonymous NATS client; the proxies log in
with their workload token through identity's auth callout), with certificates from a real
identity service (`python -m services.identity`, local tokens), their endpoint sets in real
NATS KV and a real authorization policy. Every proxy runs one worker / one thread. The
report starts with what it ran on: CPU model, cores, pinning, versions.

How it measures, against a shared machine's noise:
- Rounds are interleaved (round 1: every path, round 2: every path ...), 5 by default,
  and every figure is the median over rounds; what a path *adds* is taken per round
  against the direct path of the same round, then the median.
- Latency comes from an open-loop generator (bench/openloop.py) at fixed rates (200 and
  500 req/s). Within a round the paths take the load in turn in short slices (0.25 s:
  direct, tulle, nginx, haproxy, direct, ...), each path getting `--duration` seconds in
  all, so a burst of another process's work falls on every path alike.
- The latencies of all rounds are also pooled per path, for the p99.9 (a single round's
  p99.9 rests on 2 or 3 samples).
- The target "added p99 ≤ 2× nginx's" is a ratio of two small differences. When nginx's
  added p99 is within the noise (below the spread of the direct path's own p99 across
  rounds) the ratio is reported as not meaningful, and the well-defined figures to read
  instead are the added p99 in ms of both pairs side by side and the added p99.9 (pooled).
- Throughput from wrk at saturation, one path after another in each round.
- CPU-seconds per 1,000 requests: the CPU time (schedstat, ns) each proxy's processes used
  during their own path's 500 req/s slices; peak RSS is each proxy's VmHWM (nginx: master
  + worker) at the end.

Pinning (--pin, stated in the report):
  cpu0   (default) origin, every proxy, NATS and the identity service on CPU 0; the load
         generators on CPU 1. All proxies compete for one core with the server, so a
         proxy's CPU per request shows up in full as latency; the generators' own noise
         stays off that core.
  split  as two nodes of a mesh: the client side (load generators and each pair's front
         proxy) on CPU 1, the server side (back proxies, origin, NATS, identity) on CPU 0.
  none   no pinning.

`--variant NAME=DIR` adds a path `tulle-NAME`: the same pair run from DIR's `proxy`
package (e.g. `git archive <commit> proxy | tar -x -C DIR`), measured interleaved with
the working tree's, for before/after figures under the same noise.

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

from bench.mesh import BenchMesh  # noqa: E402
from tulle import pki, schemas  # noqa: E402
from tulle.natsserver import free_port  # noqa: E402

PATHS = ("direct", "tulle", "tulle-h2", "nginx", "haproxy")
GRPC_PATHS = ("grpc-direct", "grpc-tulle", "grpc-nginx")
GRPC_CONCURRENCY = 32
RATES = (200, 500)
BODY = b"x" * 1024
NS = "bench"
PIN_MODES = {
    # role -> CPUs; roles: server (origin, NATS, identity), front / back (proxies), load
    "cpu0": {"server": {0}, "front": {0}, "back": {0}, "load": {1}},
    "split": {"server": {0}, "front": {1}, "back": {0}, "load": {1}},
    "none": {},
}
PIN_TEXT = {
    "cpu0": "origin, proxies, NATS and identity on CPU 0; load generators on CPU 1",
    "split": "client side (load generators, front proxies) on CPU 1; server side (back proxies, origin, NATS, "
             "identity) on CPU 0",
    "none": "none",
}


# --- processes ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time of all the threads of a process, from schedstat (ns resolution)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        except OSError:
            pass
    return total / 1e9


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


def pin(pid: int, cpus: set[int] | None) -> None:
    """Pin every thread of a running process (e.g. nats-server, which starts its own)."""
    if not cpus:
        return
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except OSError:
            pass


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
        self.cpus = PIN_MODES[args.pin]
        self.mesh = BenchMesh(self.dir, self.cpus.get("server"))
        self.ports: dict[str, int] = {}
        self.hosts: dict[str, str] = {}
        self.proxies: dict[str, list[Proc]] = {}
        # Tulle pairs: (the code whose `proxy` package runs, extra environment).
        self.variants: dict[str, tuple[Path, dict]] = {
            "tulle": (REPO, {}),
            "tulle-h2": (REPO, {"TULLE_PROXY_MESH_PROTOCOL": "h2"}),
        }
        for v in args.variant or ():
            name, _, d = v.partition("=")
            self.variants[f"tulle-{name}"] = (Path(d).resolve(), {})
        wanted = args.paths.split(",") if args.paths else None
        self.paths = [p for p in ("direct", *self.variants, "nginx", "haproxy") if not wanted or p in wanted]
        self.grpc_paths = [] if args.no_grpc else [p for p in GRPC_PATHS if not wanted or p in wanted
                                                   or (p == "grpc-direct" and any(w.startswith("grpc") for w in wanted))]

    def load_prefix(self) -> list[str]:
        cpus = self.cpus.get("load")
        return ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []

    def spawn(self, name: str, cmd: list[str], role: str, env: dict | None = None, cwd: Path = REPO) -> Proc:
        log = open(self.dir / f"{name}.log", "ab")
        cpus = self.cpus.get(role)
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **(env or {})}, cwd=cwd,
                                 preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        log.close()
        proc = Proc(name, popen)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.mesh.stop()
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- setup ----------------------------------------------------------------------------

    def certificates(self) -> None:
        self.mesh.make_identity()  # anchor, issuer and token secret of the identity service
        issuer = self.mesh.issuer
        self.server_identity = schemas.identity_name("server", NS)
        self.client_identity = schemas.identity_name("client", NS)
        # Files for nginx and HAProxy, from the same CA (the identity service issues Tulle's).
        for role, ident in (("server", self.server_identity), ("client", self.client_identity)):
            cert, key = pki.issue_leaf(issuer, ident)
            (self.dir / f"{role}.crt").write_bytes(pki.cert_pem(cert) + issuer.cert_pem)
            (self.dir / f"{role}.key").write_bytes(pki.key_pem(key))
            (self.dir / f"{role}.pem").write_bytes(pki.cert_pem(cert) + issuer.cert_pem + pki.key_pem(key))
        (self.dir / "ca.crt").write_bytes(self.mesh.anchor_pem)

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
        self.origin = self.spawn("origin", ["nginx", "-p", str(conf.parent), "-c", str(conf)], "server")
        self.ports["direct"] = port
        self.hosts["direct"] = f"origin.{NS}:{port}"

    def start_nginx_pair(self) -> None:
        front, back = self.ports["nginx"], self.ports["nginx_back"] = free_port(), free_port()
        self.hosts["nginx"] = f"origin.{NS}:{self.ports['origin']}"
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
            self.spawn("nginx-front", ["nginx", "-p", str(front_conf.parent), "-c", str(front_conf)], "front"),
            self.spawn("nginx-back", ["nginx", "-p", str(back_conf.parent), "-c", str(back_conf)], "back"),
        ]

    def start_haproxy_pair(self) -> None:
        front, back = self.ports["haproxy"], self.ports["haproxy_back"] = free_port(), free_port()
        self.hosts["haproxy"] = f"origin.{NS}:{self.ports['origin']}"
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
            self.spawn("haproxy-front", ["haproxy", "-db", "-f", str(d / "haproxy-front.cfg")], "front"),
            self.spawn("haproxy-back", ["haproxy", "-db", "-f", str(d / "haproxy-back.cfg")], "back"),
        ]

    def start_control_plane(self) -> None:
        self.mesh.start()
        self.mesh.start_identity(lambda name, cmd: self.spawn(name, cmd, "server"))

    def start_tulle(self, path: str, code: Path, extra_env: dict) -> list[int]:
        """One Tulle pair (the working tree's, or a variant's `proxy` package); returns the
        admin ports. Each pair has its own service name, so its requests reach its own
        back proxy."""
        suffix = "" if path == "tulle" else "-" + path.removeprefix("tulle-")
        service = f"origin{suffix}"
        self.ports[f"{path}_in"] = free_port()
        self.ports[path] = free_port()
        self.hosts[path] = f"{service}.{NS}:{self.ports['origin']}"
        admins = []
        procs = []
        for role, side, inbound, outbound in (("client", "front", free_port(), self.ports[path]),
                                              ("server", "back", self.ports[f"{path}_in"], free_port())):
            admin = free_port()
            admins.append(admin)
            env = {
                **self.mesh.proxy_env(NS, f"{role}{suffix}-0", role), **extra_env,
                "TULLE_PROXY_INBOUND_ADDR": f"127.0.0.1:{inbound}", "TULLE_PROXY_OUTBOUND_ADDR": f"127.0.0.1:{outbound}",
                "TULLE_PROXY_ADMIN_ADDR": f"127.0.0.1:{admin}", "TULLE_PROXY_TRANSPARENT": "false",
                "TULLE_PROXY_APP_HOST": "127.0.0.1", "TULLE_LOG_LEVEL": "warning", "TULLE_LOG_FORMAT": "json",
                # A variant's own `proxy` package first (its directory is the working
                # directory, so `-m proxy` finds it); the rest of Tulle from this tree.
                "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(code), str(REPO)])),
            }
            procs.append(self.spawn(f"{path}-{role}", [sys.executable, "-m", "proxy"], side, env, cwd=code))
        self.proxies[path] = procs
        asyncio.run(self._publish(service, suffix, self.ports[f"{path}_in"]))
        return admins

    async def _publish(self, service: str, suffix: str, inbound: int) -> None:
        from tulle.policy import default_port_policy

        # As the destination and policy services would: each with its own credential.
        destination, policy = self.mesh.bus("destination"), self.mesh.bus("policy")
        await destination.start()
        await policy.start()
        origin = self.ports["origin"]
        grpc_origin = self.ports.get("grpc_origin")
        published = [(service, origin)] + ([(f"{service}-grpc", grpc_origin)] if grpc_origin and not suffix else [])
        for name, port in published:
            await destination.put(schemas.ENDPOINTS_BUCKET, schemas.endpoints_key(NS, name, port), schemas.EndpointSet(
                namespace=NS, service=name, port=port, endpoints=[schemas.Endpoint(
                    address="127.0.0.1", port=port, identity=self.server_identity, proxy_port=inbound)]))
        # Each proxy is ready once its inbound policy arrived (as the policy service writes
        # it): the server's app ports behind Servers that admit the client's identity only,
        # so every request through the pair pays for a real authorization decision.
        for role in ("client", "server"):
            ports = []
            if role == "server":
                ports = [schemas.PortPolicy(port, f"origin-{proto.lower()}", "Server", proto, [schemas.Authorization(
                    "origin-from-client", identities=[self.client_identity])])
                    for port, proto in ((origin, "unknown"), (grpc_origin, "gRPC")) if port]
            await policy.put(schemas.POLICY_BUCKET, schemas.policy_key(NS, f"{role}{suffix}-0"), schemas.WorkloadPolicy(
                namespace=NS, workload=f"{role}{suffix}-0", default_policy="all-unauthenticated",
                default=default_port_policy("all-unauthenticated", schemas.DEFAULT_CLUSTER_NETWORKS), ports=ports))
        await destination.close()
        await policy.close()

    def start_grpc(self) -> None:
        """The grpcio origin, and the nginx pair doing gRPC (grpc_pass, HTTP/2 over mutual TLS)."""
        origin = self.ports["grpc_origin"] = free_port()
        self.grpc_origin = self.spawn("grpc-origin", [sys.executable, "-m", "bench.grpcorigin", "--port", str(origin)],
                                      "server")
        self.ports["grpc-direct"] = origin
        self.hosts["grpc-direct"] = ""
        front, back = self.ports["grpc-nginx"], self.ports["grpc_nginx_back"] = free_port(), free_port()
        self.hosts["grpc-nginx"] = ""
        d = self.dir
        back_conf = self.nginx_conf("grpc-nginx-back", f"""
    upstream origin {{ server 127.0.0.1:{origin}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{back} ssl http2;
        ssl_protocols TLSv1.3;
        ssl_certificate {d}/server.crt;
        ssl_certificate_key {d}/server.key;
        ssl_client_certificate {d}/ca.crt;
        ssl_verify_client on;
        ssl_verify_depth 3;
        location / {{ grpc_pass grpc://origin; }}
    }}""")
        front_conf = self.nginx_conf("grpc-nginx-front", f"""
    upstream back {{ server 127.0.0.1:{back}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{front} http2;
        location / {{
            grpc_pass grpcs://back;
            grpc_ssl_protocols TLSv1.3;
            grpc_ssl_certificate {d}/client.crt;
            grpc_ssl_certificate_key {d}/client.key;
            grpc_ssl_trusted_certificate {d}/ca.crt;
            grpc_ssl_verify on;
            grpc_ssl_verify_depth 3;
            grpc_ssl_name {self.server_identity};
            grpc_ssl_server_name on;
            grpc_ssl_session_reuse on;
        }}
    }}""")
        self.proxies["grpc-nginx"] = [
            self.spawn("grpc-nginx-front", ["nginx", "-p", str(front_conf.parent), "-c", str(front_conf)], "front"),
            self.spawn("grpc-nginx-back", ["nginx", "-p", str(back_conf.parent), "-c", str(back_conf)], "back"),
        ]

    def setup(self) -> None:
        self.certificates()
        self.start_origin()
        self.start_nginx_pair()
        self.start_haproxy_pair()
        if self.grpc_paths:
            self.start_grpc()
        self.start_control_plane()
        admins = []
        for path, (code, extra_env) in self.variants.items():
            if path in self.paths or (path == "tulle" and "grpc-tulle" in self.grpc_paths):
                admins += self.start_tulle(path, code, extra_env)
        if "grpc-tulle" in self.grpc_paths:
            # gRPC rides the tulle pair (the same two processes; gRPC is HTTP/2 between them).
            self.ports["grpc-tulle"] = self.ports["tulle"]
            self.hosts["grpc-tulle"] = f"origin-grpc.{NS}:{self.ports['grpc_origin']}"
            self.proxies["grpc-tulle"] = self.proxies["tulle"]
        for admin in admins:
            wait(lambda: http_status(f"http://127.0.0.1:{admin}/ready") == 200, 60, f"tulle proxy :{admin} ready")
        for path in self.paths:
            port, host = self.ports[path], self.hosts[path]
            wait(lambda: http_status(f"http://127.0.0.1:{port}/", host) == 200, 20, f"{path} answering")
        for path in self.grpc_paths:
            wait(lambda: self.grpc_ok(path), 30, f"{path} answering")
        time.sleep(0.3)
        for procs in self.proxies.values():
            for p in procs:
                p.refresh()
        self.origin.refresh()

    def grpc_ok(self, path: str) -> bool:
        try:
            r = self.grpcload(path, concurrency=1, duration=0.2)
        except RuntimeError:
            return False
        return r["completed"] > 0 and r["errors"] == 0

    # --- measuring --------------------------------------------------------------------------

    def openloop(self, paths: list[str], rate: int, round_no: int) -> dict:
        """All paths at `rate`, in slices taken in turn; figures per path (and raw latencies)."""
        targets = [{"name": p, "port": self.ports[p], "host_header": self.hosts[p],
                    "cpu_groups": [proc.pids for proc in self.proxies.get(p, [])]} for p in paths]
        raw = self.dir / f"raw-{rate}-{round_no}.json"
        cmd = self.load_prefix() + [sys.executable, "-m", "bench.openloop", "--targets-json", json.dumps(targets),
                                    "--rate", str(rate), "--duration", str(self.args.duration),
                                    "--slice", str(self.args.slice), "--raw", str(raw)]
        spies = self.py_spy(paths, rate, round_no)
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                             timeout=self.args.duration * len(paths) + 60)
        for s in spies:
            s.wait()
        if out.returncode != 0:
            raise RuntimeError(f"openloop failed: {out.stderr[-2000:]}")
        result = json.loads(out.stdout)
        latencies = json.loads(raw.read_text())
        raw.unlink()
        for p, r in result.items():
            done = max(r["completed"], 1)
            r["cpu_s_per_1k"] = [round(c / done * 1000, 4) for c in r.pop("cpu_s")]
            r["latencies_ms"] = latencies[p]
        return result

    def py_spy(self, paths: list[str], rate: int, round_no: int) -> list[subprocess.Popen]:
        """With --py-spy: profile the Tulle proxies during the last round's 500 req/s run."""
        d = self.args.py_spy
        if not d or rate != 500 or round_no != self.args.rounds - 1:
            return []
        Path(d).mkdir(parents=True, exist_ok=True)
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        seconds = str(int(self.args.duration * len(paths)) + 1)
        out = []
        for path in paths:
            for proc in self.proxies.get(path, []) if path.startswith("tulle") else ():
                # --nonblocking: sampling must not pause the proxy (a paused proxy makes
                # its own latency and, through reconnects, a workload of TLS handshakes).
                out.append(subprocess.Popen([spy, "record", "--nonblocking", "--rate", "250", "--duration", seconds,
                                             "--format", "speedscope", "-o", str(Path(d) / f"{proc.name}.json"),
                                             "--pid", str(proc.popen.pid)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return out

    def wrk(self, path: str, duration: float | None = None) -> dict:
        port, host = self.ports[path], self.hosts[path]
        procs = self.proxies.get(path, [])
        before = [p.cpu() for p in procs]
        d = duration or self.args.duration
        out = subprocess.run(self.load_prefix() + ["wrk", "-t1", f"-c{self.args.connections}",
                                                   f"-d{max(1, round(d))}s", "-H", f"Host: {host}",
                                                   f"http://127.0.0.1:{port}/"],
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

    def grpcload(self, path: str, *, concurrency: int = 0, rate: float = 0.0, duration: float | None = None) -> dict:
        procs = self.proxies.get(path, [])
        before = [p.cpu() for p in procs]
        d = duration or self.args.duration
        cmd = self.load_prefix() + [sys.executable, "-m", "bench.grpcload", "--target",
                                    f"127.0.0.1:{self.ports[path]}", "--duration", str(d)]
        if self.hosts[path]:
            cmd += ["--authority", self.hosts[path]]
        cmd += ["--rate", str(rate)] if rate else ["--concurrency", str(concurrency)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=d + 60)
        if out.returncode != 0:
            raise RuntimeError(f"grpcload failed on {path}: {out.stderr[-1500:]}")
        r = json.loads(out.stdout)
        r["cpu_s_per_1k"] = [round((p.cpu() - b) / max(r["completed"], 1) * 1000, 4) for p, b in zip(procs, before)]
        return r

    def run(self) -> dict:
        self.setup()
        load = [os.getloadavg()[0]]
        for path in self.paths:  # warm up pools, TLS sessions, caches
            self.wrk(path, 2)
        for path in self.grpc_paths:
            self.grpcload(path, concurrency=GRPC_CONCURRENCY, duration=2)
        rounds = []
        for r in range(self.args.rounds):
            # Each round starts its slices with another path, so none always follows the same one.
            order = self.paths[r % len(self.paths):] + self.paths[:r % len(self.paths)]
            row: dict = {p: {} for p in self.paths}
            for rate in RATES:
                for p, res in self.openloop(order, rate, r).items():
                    row[p][f"open_{rate}"] = res
            for path in order:
                row[path]["wrk"] = self.wrk(path)
            grpc_order = self.grpc_paths[r % max(len(self.grpc_paths), 1):] + self.grpc_paths[:r % max(len(self.grpc_paths), 1)]
            for path in grpc_order:
                row[path] = {"closed": self.grpcload(path, concurrency=GRPC_CONCURRENCY),
                             "open_500": self.grpcload(path, rate=500)}
            for path in self.paths:
                print(f"round {r + 1} {path}: {summary_line(row[path])}", file=sys.stderr, flush=True)
            for path in self.grpc_paths:
                c, o = row[path]["closed"], row[path]["open_500"]
                print(f"round {r + 1} {path}: {c['rps']:.0f} calls/s ({GRPC_CONCURRENCY} in flight); 500/s p50 "
                      f"{o['p50_ms']:.3f} ms p99 {o['p99_ms']:.3f} ms", file=sys.stderr, flush=True)
            rounds.append(row)
        load.append(os.getloadavg()[0])
        rss = {path: [round(p.rss(), 1) for p in procs] for path, procs in self.proxies.items()}
        return {"rounds": rounds, "peak_rss_mb": rss, "paths": self.paths, "grpc_paths": self.grpc_paths,
                "loadavg_1m": load, "environment": environment(self.args.pin)}


def summary_line(r: dict) -> str:
    o5 = r["open_500"]
    return (f"wrk {r['wrk']['rps']:.0f} rps; 500/s p50 {o5['p50_ms']:.3f} ms p99 {o5['p99_ms']:.3f} ms "
            f"p99.9 {o5['p999_ms']:.3f} ms; cpu/1k {o5['cpu_s_per_1k']}")


def http_status(url: str, host: str | None = None) -> int:
    try:
        req = urllib.request.Request(url, headers={"Host": host} if host else {})
        with urllib.request.urlopen(req, timeout=1) as r:
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


def pct(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))]


def mad_sigma(values: list[float]) -> float:
    """A robust standard deviation: 1.4826 × the median absolute deviation."""
    m = statistics.median(values)
    return 1.4826 * statistics.median(abs(v - m) for v in values)


def report(raw: dict, args) -> dict:
    rounds = raw["rounds"]
    paths = raw["paths"]
    out: dict = {"environment": raw["environment"], "pinning": args.pin, "pinning_text": PIN_TEXT[args.pin],
                 "rounds": len(rounds),
                 "duration_s": args.duration, "slice_s": args.slice, "wrk_connections": args.connections,
                 "response_bytes": len(BODY), "loadavg_1m": raw["loadavg_1m"], "paths": {}}
    for path in paths:
        p = {"rps": med(r[path]["wrk"]["rps"] for r in rounds),
             "rps_per_round": [round(r[path]["wrk"]["rps"]) for r in rounds]}
        for rate in RATES:
            k = f"open_{rate}"
            for q in ("p50_ms", "p99_ms", "p999_ms", "max_ms"):
                p[f"{q[:-3]}_at_{rate}_ms"] = med(r[path][k][q] for r in rounds)
            p[f"errors_at_{rate}"] = sum(r[path][k]["errors"] + r[path][k]["non_200"] for r in rounds)
            pooled = sorted(x for r in rounds for x in r[path][k]["latencies_ms"])
            p[f"pooled_p99_at_{rate}_ms"] = pct(pooled, 99)
            p[f"pooled_p999_at_{rate}_ms"] = pct(pooled, 99.9)
        if path != "direct":
            p["cpu_s_per_1k_at_500"] = med(sum(r[path]["open_500"]["cpu_s_per_1k"]) for r in rounds)
            p["cpu_s_per_1k_each_at_500"] = [med(r[path]["open_500"]["cpu_s_per_1k"][i] for r in rounds)
                                             for i in range(2)]
            p["cpu_s_per_1k_at_saturation"] = med(sum(r[path]["wrk"]["cpu_s_per_1k"]) for r in rounds)
            p["peak_rss_mb"] = raw["peak_rss_mb"][path]
        out["paths"][path] = p
    # What a path adds is taken per round, against the direct path of the same round, then
    # the median over rounds; the pooled figures are over every round's latencies.
    for path in paths[1:]:
        p = out["paths"][path]
        for rate in RATES:
            k = f"open_{rate}"
            for q in ("p50", "p99", "p999", "max"):
                per_round = [r[path][k][f"{q}_ms"] - r["direct"][k][f"{q}_ms"] for r in rounds]
                p[f"added_{q}_at_{rate}_ms"] = med(per_round)
                if rate == 500:
                    p[f"added_{q}_at_500_per_round_ms"] = [round(v, 3) for v in per_round]
            for q in ("p99", "p999"):
                p[f"pooled_added_{q}_at_{rate}_ms"] = (p[f"pooled_{q}_at_{rate}_ms"]
                                                       - out["paths"]["direct"][f"pooled_{q}_at_{rate}_ms"])
    direct_p99 = [r["direct"]["open_500"]["p99_ms"] for r in rounds]
    noise = max(mad_sigma(direct_p99) if len(direct_p99) > 2 else 0.0, 0.05)
    out["direct_p99_at_500_per_round_ms"] = [round(v, 3) for v in direct_p99]
    out["noise_p99_at_500_ms"] = round(noise, 3)
    out["targets"] = {}
    if "nginx" in paths:
        n = out["paths"]["nginx"]
        for path in (p for p in paths if p.startswith("tulle")):
            out["targets"][path] = targets(out["paths"][path], n, noise)
    out["grpc"] = {}
    for path in raw.get("grpc_paths") or ():
        g = {"rps": med(r[path]["closed"]["rps"] for r in rounds),
             "rps_per_round": [round(r[path]["closed"]["rps"]) for r in rounds],
             "p50_at_500_ms": med(r[path]["open_500"]["p50_ms"] for r in rounds),
             "p99_at_500_ms": med(r[path]["open_500"]["p99_ms"] for r in rounds),
             "errors": sum(r[path]["closed"]["errors"] + r[path]["open_500"]["errors"] for r in rounds),
             "cpu_s_per_1k_at_saturation": med(sum(r[path]["closed"]["cpu_s_per_1k"]) for r in rounds)
             if path != "grpc-direct" else None}
        if path != "grpc-direct" and "grpc-direct" in raw["grpc_paths"]:
            g["added_p99_at_500_ms"] = med(r[path]["open_500"]["p99_ms"] - r["grpc-direct"]["open_500"]["p99_ms"]
                                           for r in rounds)
        out["grpc"][path] = g
    if "grpc-tulle" in out["grpc"] and "tulle" in out["paths"]:
        out["targets"]["grpc"] = {
            "grpc_unary_vs_http1_through_tulle": {
                "value": ratio(out["grpc"]["grpc-tulle"]["rps"], out["paths"]["tulle"]["rps"]), "target": ">= 0.5"},
            "grpc_unary_tulle_vs_nginx": {
                "value": ratio(out["grpc"]["grpc-tulle"]["rps"], out["grpc"].get("grpc-nginx", {}).get("rps")),
                "target": "(for reference)"},
            "grpc_unary_tulle_vs_direct": {
                "value": ratio(out["grpc"]["grpc-tulle"]["rps"], out["grpc"].get("grpc-direct", {}).get("rps")),
                "target": "(for reference: the grpcio client and server's own limit)"},
        }
    return out


def targets(t: dict, n: dict, noise: float) -> dict:
    """The issue's targets for one Tulle pair against the nginx pair."""
    t_added, n_added = t["added_p99_at_500_ms"], n["added_p99_at_500_ms"]
    meaningful = n_added > noise
    per_round = [a / b for a, b in zip(t["added_p99_at_500_per_round_ms"], n["added_p99_at_500_per_round_ms"])
                 if b > 0]
    note = "" if meaningful else (
        f"nginx adds {n_added:.3f} ms at p99, within the noise ({noise:.3f} ms: the spread of the direct path's "
        f"own p99 across rounds), so the ratio says nothing. Read instead: added p99 {t_added:.3f} ms (tulle) vs "
        f"{n_added:.3f} ms (nginx); added p99.9 over all rounds {t['pooled_added_p999_at_500_ms']:.3f} ms vs "
        f"{n['pooled_added_p999_at_500_ms']:.3f} ms")
    return {
        "added_p99_at_500_vs_nginx": {
            "value": ratio(t_added, n_added) if meaningful else None,
            "median_of_round_ratios": round(statistics.median(per_round), 3) if meaningful and per_round else None,
            "target": "<= 2.0", "note": note},
        "added_p99_at_500_ms": {"value": round(t_added, 3), "nginx": round(n_added, 3), "target": "(absolute)"},
        "pooled_added_p999_at_500_ms": {"value": round(t["pooled_added_p999_at_500_ms"], 3),
                                        "nginx": round(n["pooled_added_p999_at_500_ms"], 3), "target": "(absolute)"},
        "added_p50_at_500_vs_nginx": {"value": ratio(t["added_p50_at_500_ms"], n["added_p50_at_500_ms"]),
                                      "target": "(for reference)"},
        "throughput_vs_nginx": {"value": ratio(t["rps"], n["rps"]), "target": ">= 0.5"},
        "cpu_per_1k_vs_nginx": {"value": ratio(t["cpu_s_per_1k_at_500"], n["cpu_s_per_1k_at_500"]),
                                "target": "<= 3.0"},
        "peak_rss_mb_each_tulle_proxy": {"value": t["peak_rss_mb"], "target": "<= 40 each"},
    }


def environment(pin: str) -> dict:
    """What the figures were measured on, printed with them."""
    import platform

    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except OSError:
            return "-"
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "-"

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    import grpc
    import httptools
    import uvloop

    from proxy.http2 import _ffi

    versions = {"nghttp2": _ffi.VERSION, "grpcio": grpc.__version__, "uvloop": uvloop.__version__,
                "httptools": httptools.__version__,
                "nginx": first_line(["nginx", "-v"]).split("/")[-1], "haproxy": first_line(["haproxy", "-v"]).split()[2]
                if first_line(["haproxy", "-v"]) != "-" else "-", "wrk": first_line(["wrk", "-v"]).split()[1]
                if first_line(["wrk", "-v"]).startswith("wrk") else "-"}
    commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {"cpu_model": model, "cpus": os.cpu_count(), "cpus_allowed": len(os.sched_getaffinity(0)),
            "kernel": platform.release(), "python": platform.python_version(), "versions": versions,
            "commit": commit + (" (with local changes)" if dirty not in ("-", "") else ""), "pin": pin}


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def markdown(out: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    env = out["environment"]
    rows = [f"Ran on: {env['cpu_model']}, {env['cpus']} CPUs ({env['cpus_allowed']} allowed); pinning "
            f"{out['pinning']} ({out['pinning_text']}); kernel {env['kernel']}; Python {env['python']}; "
            f"{'; '.join(f'{k} {v}' for k, v in env['versions'].items())}; tulle at {env['commit']}.", ""]
    rows += ["| path | req/s (wrk) | p50 / p99 / p99.9 @200/s (ms) | p50 / p99 / p99.9 / max @500/s (ms) "
            "| added p50 / p99 / p99.9 @500/s (ms) | CPU-s per 1k req @500/s (each proxy) | peak RSS MB (each proxy) |",
            "|---|---|---|---|---|---|---|"]
    for path, p in out["paths"].items():
        added = "-" if path == "direct" else (f"{f(p['added_p50_at_500_ms'])} / {f(p['added_p99_at_500_ms'])} / "
                                              f"{f(p['pooled_added_p999_at_500_ms'])}")
        cpu = "-" if path == "direct" else (f"{p['cpu_s_per_1k_at_500']:.3f} "
                                            f"({', '.join(f'{c:.3f}' for c in p['cpu_s_per_1k_each_at_500'])})")
        rss = "-" if path == "direct" else ", ".join(f"{m:.1f}" for m in p["peak_rss_mb"])
        rows.append(f"| {path} | {p['rps']:.0f} | {f(p['p50_at_200_ms'])} / {f(p['p99_at_200_ms'])} / "
                    f"{f(p['pooled_p999_at_200_ms'])} | {f(p['p50_at_500_ms'])} / {f(p['p99_at_500_ms'])} / "
                    f"{f(p['pooled_p999_at_500_ms'])} / {f(p['max_at_500_ms'])} | {added} | {cpu} | {rss} |")
    rows += ["", f"Pinning: {out['pinning']} ({out['pinning_text']}). Medians of {out['rounds']} interleaved rounds; "
             f"in each, the open-loop load goes to the paths in turn in {out['slice_s']} s slices, {out['duration_s']} s "
             f"per path and rate; p99.9 over all rounds' latencies pooled; wrk -t1 -c{out['wrk_connections']}; "
             f"{out['response_bytes']} B responses; 1-minute load average {out['loadavg_1m'][0]:.2f} at start, "
             f"{out['loadavg_1m'][1]:.2f} at end.", ""]
    paths = [p for p in out["paths"] if p != "direct"]
    rows.append("| added p99 @500/s per round (ms) | " + " | ".join(paths) + " | direct p99 |")
    rows.append("|---|" + "---|" * (len(paths) + 1))
    for i, d in enumerate(out["direct_p99_at_500_per_round_ms"]):
        rows.append(f"| round {i + 1} | " + " | ".join(f"{out['paths'][p]['added_p99_at_500_per_round_ms'][i]:.3f}"
                                                        for p in paths) + f" | {d:.3f} |")
    rows.append(f"\nNoise of the direct path's p99 across rounds (1.4826 × MAD, at least 0.05 ms): "
                f"{out['noise_p99_at_500_ms']:.3f} ms.")
    rows += ["", "| req/s per round (wrk; gRPC: calls/s) | " + " | ".join(f"round {i + 1}" for i in range(out["rounds"]))
             + " | min–max / median |", "|---|" + "---|" * (out["rounds"] + 1)]
    for path, p in [*out["paths"].items(), *out["grpc"].items()]:
        per = p["rps_per_round"]
        rows.append(f"| {path} | " + " | ".join(str(v) for v in per) +
                    f" | {min(per)}–{max(per)} / {statistics.median(per):.0f} ({(max(per) - min(per)) / max(statistics.median(per), 1) * 100:.0f}%) |")
    if out["grpc"]:
        rows += ["", f"| gRPC path | calls/s ({GRPC_CONCURRENCY} in flight, one connection) | p50 / p99 @500/s (ms) "
                     "| added p99 @500/s (ms) | CPU-s per 1k calls at saturation (both proxies) | errors |",
                 "|---|---|---|---|---|---|"]
        for path, g in out["grpc"].items():
            rows.append(f"| {path} | {g['rps']:.0f} | {f(g['p50_at_500_ms'])} / {f(g['p99_at_500_ms'])} | "
                        f"{f(g.get('added_p99_at_500_ms'))} | {f(g['cpu_s_per_1k_at_saturation'])} | {g['errors']} |")
    for path, ts in out["targets"].items():
        rows += ["", f"| target ({path} pair vs nginx pair) | value | nginx | target |", "|---|---|---|---|"]
        for name, t in ts.items():
            value = t["value"]
            if name == "added_p99_at_500_vs_nginx" and t.get("median_of_round_ratios") is not None:
                value = f"{value} (median of per-round ratios {t['median_of_round_ratios']})"
            rows.append(f"| {name} | {value} | {t.get('nginx', '')} | {t['target']} |")
        for t in ts.values():
            if t.get("note"):
                rows += ["", f"Note: {t['note']}."]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=5.0, help="seconds of load per path, rate and round")
    p.add_argument("--slice", type=float, default=0.25, help="seconds per open-loop slice (paths in turn)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections")
    p.add_argument("--pin", choices=sorted(PIN_MODES), default="cpu0", help="where processes run (see above)")
    p.add_argument("--no-pin", action="store_true", help="the same as --pin none")
    p.add_argument("--paths", help="only these paths (comma-separated; direct is always needed)")
    p.add_argument("--variant", action="append", metavar="NAME=DIR",
                   help="also measure the Tulle pair of DIR's `proxy` package, as path tulle-NAME")
    p.add_argument("--py-spy", metavar="DIR", help="profile the Tulle proxies in the last 500 req/s run (py-spy)")
    p.add_argument("--no-grpc", action="store_true", help="HTTP/1.1 paths only")
    p.add_argument("--json", help="also write the JSON result (with every round's figures) to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    args = p.parse_args()
    if args.no_pin:
        args.pin = "none"
    if args.paths and "direct" not in args.paths.split(","):
        args.paths = "direct," + args.paths
    if args.paths and any(p.startswith("grpc") for p in args.paths.split(",")) and "grpc-direct" not in args.paths:
        args.paths += ",grpc-direct"
    missing = [t for t in ("nginx", "haproxy", "wrk") + (() if args.pin == "none" else ("taskset",))
               if not shutil.which(t)]
    if missing:
        sys.exit(f"bench.proxy: missing {', '.join(missing)} (make bench installs them as root)")
    if args.rounds < 1 or args.duration <= 0 or args.slice <= 0:
        sys.exit("bench.proxy: --rounds, --duration and --slice must be positive")
    if args.py_spy and not (shutil.which("py-spy") or Path(sys.executable).with_name("py-spy").exists()):
        # Said now, not after the rounds have run: the profile is taken in the last one.
        sys.exit("bench.proxy: --py-spy needs py-spy (pip install py-spy into the venv)")
    for v in args.variant or ():
        name, sep, d = v.partition("=")
        if not sep or not name or not (Path(d) / "proxy" / "__main__.py").is_file():
            sys.exit(f"bench.proxy: --variant {v!r}: expected NAME=DIR with DIR/proxy/__main__.py")
    bench = Bench(args)
    try:
        raw = bench.run()
    finally:
        bench.close()
    out = report(raw, args)
    print(markdown(out))
    if args.json:
        for r in raw["rounds"]:  # the raw latencies are pooled above; too many to keep
            for path in r.values():
                for k in ("open_200", "open_500"):
                    if k in path:
                        path[k].pop("latencies_ms", None)
        Path(args.json).write_text(json.dumps({"summary": out, "raw": raw}, indent=1))


if __name__ == "__main__":
    main()
