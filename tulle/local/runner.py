"""The supervisor's core: start NATS, the services and every Workload; keep them running;
follow the manifests folder; stop it all in order.

Start order (ARCHITECTURE.md): NATS → identity, destination, policy, injector (each
until its admin /ready answers) → per Workload: its network namespace (netns), a Pod
manifest (not Ready), its proxy (until /ready), the app (until its readiness probe
passes), then the Pod turns Ready. A crashed app or proxy is restarted with back-off.

Every pid, namespace and rule goes into the run record before anything else relies on
it, so `tulle down` (tulle/local/teardown.py) can undo even a run that crashed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tulle.bus import MAX_REPLICAS
from tulle.local import identity as local_identity
from tulle.local import netns as nets
from tulle.local import plan, procs
from tulle.local.probe import http_ready, split_addr, tcp_ready
from tulle.local.state import RECORD_VERSION, StateDir, process_start, write_record
from tulle.log import get_logger
from tulle.natsserver import NatsCluster, NatsServer, free_port, nats_server_binary
from tulle.resources import model as m
from tulle.sources.base import ResourceEvent
from tulle.sources.folder import FolderSource

SERVICES = ("identity", "destination", "policy", "injector")
# How long a workload leaving the folder waits for its endpoints to be withdrawn before its
# proxy drains (the rest of a rollout's zero-failure contract is the proxy's graceful shutdown).
WITHDRAW_TIMEOUT_S = 10.0
WATCHED_KINDS = {"Workload", "Service", "Namespace"}


@dataclass(frozen=True)
class RunOptions:
    manifests: Path
    state: StateDir
    isolation: str  # resolved: netns | none
    meshed: bool = True  # False: --no-proxy (apps without proxies, for debugging)
    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"
    service_ready_timeout: float = 60.0
    poll_interval: float = 0.5  # how often the manifests folder is read
    # The cluster-wide default inbound policy (a namespace or pod annotation overrides it).
    default_inbound_policy: str = "all-unauthenticated"
    nats_tls: bool = False  # TLS on the bus (always on in a cluster; optional on one machine)
    # NATS servers: 1, or a JetStream cluster of that many on this machine (`--nats-cluster 3`:
    # buckets and events replicated, any one server may die), as the Helm chart runs it.
    nats_cluster: int = 1


@dataclass
class Component:
    """NATS or a control-plane service: a process the supervisor restarts when it dies."""

    name: str
    child: procs.Child
    cmd: list[str]
    env: dict[str, str]
    admin: str = ""  # host:port of its admin server ("" for NATS)
    url: str = ""  # NATS: where it accepts clients (ready when it does)
    health: str = ""  # a cluster's NATS node: host:port of its monitoring server (ready when /healthz is 200)
    ready: bool = False
    restarts: int = 0
    failures: int = 0
    started: float = 0.0
    restart_at: Optional[float] = None


class StartError(Exception):
    """Local mode could not start; the message is one line naming what and its log."""


def _base_env() -> dict[str, str]:
    """Children run with this Python first on PATH, so `python` in a Workload's command
    is the one tulle runs on (with grpcio and friends installed)."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.pop("TULLE_NATS_URL", None)
    return env


def _app_user() -> tuple[Optional[int], Optional[int]]:
    """The invoking user (under sudo: the one who ran sudo); None = keep ours."""
    if os.geteuid() == 0 and os.environ.get("SUDO_UID", "").isdigit():
        return int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID", os.environ["SUDO_UID"]))
    return None, None


def proxy_user_can_run() -> bool:
    """In netns mode the proxy runs as uid 2102, as in a pod, when that user can run this
    Python and import the proxy. A checkout below a private folder (a home, /root) is the
    usual reason it cannot; the proxy then keeps uid 0 with gid 2102, which the outbound
    rules exclude just the same."""
    import shutil
    import subprocess

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise StartError("netns isolation runs each proxy as uid 2102 and needs `setpriv` (util-linux); "
                         "install it or use --isolation none")
    uid = str(plan.PROXY_UID)
    proc = subprocess.run([setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
                           sys.executable, "-c", "import proxy.app"], capture_output=True, text=True,
                          env=_base_env(), cwd="/")
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["exit code " + str(proc.returncode)])[-1]
        get_logger(component="local").warning(
            "uid 2102 cannot run the proxy from this checkout; proxies keep uid 0 with gid 2102",
            python=sys.executable, why=why, fix="make the checkout and its .venv readable by other users")
        return False
    return True


class Runner:
    def __init__(self, opts: RunOptions):
        self.opts = opts
        self.state = opts.state
        self.log = get_logger(component="local")
        self.n: Optional[int] = None
        self._subnet_fd: Optional[int] = None
        self.nats_nodes: list[Component] = []  # one NATS server, or each node of the cluster
        self.nats_url = ""  # every node's URL, comma-separated
        self.components: dict[str, Component] = {}  # the services, by name
        self.workloads: dict[str, WorkloadUnit] = {}
        self.services: dict[tuple[str, str], m.Service] = {}
        self.namespaces: dict[str, m.Namespace] = {}
        self._pending: dict[str, m.Workload] = {}  # Workloads read before the folder was synced
        self.nats_server: Optional[NatsServer | NatsCluster] = None
        self.host_rules: list[list[str]] = []
        self.token_secret = b""
        self.proxy_uid: Optional[int] = plan.PROXY_UID  # None: proxies keep uid 0 (with gid 2102)
        self.phase = "starting"
        self.synced = False
        self.error = ""
        self.stopping = asyncio.Event()
        self._watch_task: Optional[asyncio.Task] = None
        self._observer = None  # a bus connection (observer role) to see endpoints withdrawn
        self._base_env = _base_env()
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._own_start = process_start(os.getpid())

    # --- the record -----------------------------------------------------------------------

    @property
    def isolation(self) -> str:
        return self.opts.isolation

    def record(self) -> dict:
        units = sorted(self.workloads.values(), key=lambda u: u.key)
        ready = {u.key: u.ready for u in units}
        services_ready = bool(self.components) and all(c.ready for c in self.components.values())
        return {
            "version": RECORD_VERSION,
            "supervisor": {"pid": os.getpid(), "start": self._own_start},
            "state_dir": str(self.state.root),
            "manifests": str(self.opts.manifests),
            "isolation": self.isolation,
            "meshed": self.opts.meshed,
            "started_at": self.started_at,
            "phase": self.phase,
            "error": self.error,
            "ready": self.phase == "running" and self.synced and services_ready and all(ready.values()),
            "net": self._net_record(),
            "nats": self._nats_record(),
            "components": [{"name": c.name, "pid": c.child.pid, "start": c.child.start, "admin": c.admin,
                            "log": str(c.child.log), "ready": c.ready, "restarts": c.restarts}
                           for c in self.components.values()],
            "workloads": [u.record() for u in units],
            "services": plan.services_view(self.services.values(), [u.w for u in units], ready),
        }

    def _nats_record(self) -> Optional[dict]:
        """One server as its pid, log ...; a cluster as its `nodes` (tulle.local.state.nats_nodes reads both)."""
        if not self.nats_nodes:
            return None
        out = {"url": self.nats_url,
               # What `tulle` commands read the bus with (tulle/local/discover.py).
               "observer_creds": str(self.nats_server.seed_file("observer")),
               "ca": self.nats_server.tls.ca_file if self.nats_server.tls else ""}
        nodes = [{"name": c.name, "pid": c.child.pid, "start": c.child.start, "url": c.url,
                  "log": str(c.child.log), "restarts": c.restarts, "health": c.health} for c in self.nats_nodes]
        if isinstance(self.nats_server, NatsCluster):
            out["nodes"] = nodes
        else:
            out.update({k: nodes[0][k] for k in ("pid", "start", "log", "restarts")})
        return out

    def _net_record(self) -> dict:
        if self.n is None:
            return {}
        out = {"n": self.n, "subnet": str(plan.subnet_of(self.isolation, self.n))}
        if self.isolation == "netns":
            out.update(bridge=plan.bridge_name(self.n), bridge_ip=plan.bridge_address(self.n),
                       host_rules=self.host_rules)
        return out

    def save(self) -> None:
        write_record(self.state, self.record())

    # --- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Everything up to the services being ready; workloads follow from the folder watch."""
        self.state.make()
        for stale in self.state.runtime.glob("*"):
            stale.unlink(missing_ok=True)  # Pods of an earlier run would be taken as live
        self.save()
        self.n, self._subnet_fd = await asyncio.to_thread(nets.claim_subnet, self.isolation, os.getpid())
        self.save()
        if self.isolation == "netns" and self.opts.meshed:
            self.proxy_uid = plan.PROXY_UID if await asyncio.to_thread(proxy_user_can_run) else None
        if self.isolation == "netns":
            self.host_rules = [plan.bridge_forward_rule(plan.bridge_name(self.n))]
            self.save()
            await asyncio.to_thread(nets.create_bridge, self.n)
        if self.opts.meshed:
            self.token_secret = await asyncio.to_thread(local_identity.ensure_identity, self.state.identity,
                                                        self.opts.trust_domain)
        await self._start_nats()
        await self._start_services()

    async def _start_nats(self) -> None:
        # With namespaces, NATS listens on the bridge: the host and every namespace reach it there.
        host = plan.bridge_address(self.n) if self.isolation == "netns" else "127.0.0.1"
        tls = None
        if self.opts.nats_tls:
            tls = await asyncio.to_thread(local_identity.ensure_bus_tls, self.state.nats_dir / "tls", host)
        keys = self.state.nats_dir / "keys"
        if self.opts.nats_cluster > 1:
            cluster = await asyncio.to_thread(NatsCluster, self.state.nats_dir / "cluster", size=self.opts.nats_cluster,
                                              host=host, keys_dir=keys, tls=tls, log_dir=self.state.logs)
            self.nats_server, servers = cluster, cluster.nodes
        else:
            server = NatsServer(self.state.nats_dir, host=host, port=free_port(host), log_file=self.state.log("nats"),
                                keys_dir=keys, tls=tls)
            self.nats_server, servers = server, [server]
        self.nats_url = self.nats_server.url
        for server in servers:
            server.store_dir.mkdir(parents=True, exist_ok=True)
            conf = server.store_dir / "nats-server.conf"
            conf.write_text(server.config_text())
            cmd = [nats_server_binary(), "-c", str(conf)]
            name = "nats" if len(servers) == 1 else f"nats-{servers.index(server)}"
            self.nats_nodes.append(Component(
                name, procs.spawn(name, cmd, env=self._base_env, log=server.log_file), cmd, self._base_env,
                url=server.url,
                health=f"127.0.0.1:{server.monitor_port}" if server.monitor_port else "", started=time.monotonic()))
            self.save()
        deadline = time.monotonic() + 15 + 15 * (len(servers) > 1)
        while not all(c.ready for c in self.nats_nodes):
            for c in self.nats_nodes:
                if c.child.exited() is not None:
                    raise StartError(f"nats-server ({c.name}) {c.child.describe_exit()}; see {c.child.log}: "
                                     f"{procs.log_tail(c.child.log, 1)}")
                # A cluster's node is ready once its JetStream has its leaders: services then
                # find the buckets they make and write answered from their first connection.
                c.ready = await self._nats_node_ready(c, 0.5)
            if time.monotonic() > deadline:
                waiting = ", ".join(f"{c.name} ({c.url})" for c in self.nats_nodes if not c.ready)
                raise StartError(f"nats-server not ready in {deadline - self.nats_nodes[0].started:.0f} s: {waiting}; "
                                 f"see {self.state.logs}")
            await asyncio.sleep(0.05)
        self.save()
        self.log.info("nats ready", url=self.nats_url)

    @staticmethod
    async def _nats_node_ready(c: Component, timeout: float) -> bool:
        if c.health:
            host, _, port = c.health.rpartition(":")
            return await http_ready(host, int(port), "/healthz", timeout)
        host, port = split_addr(c.url.split("://", 1)[-1])
        return await tcp_ready(host, port, timeout)

    def _service_args(self, name: str) -> list[str]:
        manifests = ["--manifests", str(self.opts.manifests), "--manifests", str(self.state.runtime)]
        bus = ["--nats-creds", str(self.nats_server.seed_file(name))]
        if self.nats_server.tls:
            bus += ["--nats-ca", self.nats_server.tls.ca_file]
        if self.opts.nats_cluster > 1:
            bus += ["--nats-replicas", str(min(self.opts.nats_cluster, MAX_REPLICAS))]
        return bus + self._own_args(name, manifests)

    def _own_args(self, name: str, manifests: list[str]) -> list[str]:
        if name == "identity":
            ident = self.state.identity
            args = ["--issuer-dir", str(ident), "--trust-domain", self.opts.trust_domain,
                    "--callout-issuer-seed", str(self.nats_server.callout_issuer_seed_file),
                    "--callout-creds", str(self.nats_server.seed_file("callout"))]
            if self.opts.meshed:
                args += ["--token-secret-file", str(ident / "token-secret")]
            return args
        if name == "destination":
            return manifests + ["--cluster-domain", self.opts.cluster_domain, "--trust-domain", self.opts.trust_domain]
        if name == "policy":
            return manifests + ["--cluster-networks", ",".join(plan.cluster_networks(self.isolation, self.n)),
                                "--trust-domain", self.opts.trust_domain,
                                "--default-policy", self.opts.default_inbound_policy]
        return []

    async def _start_services(self) -> None:
        services = SERVICES if self.opts.meshed else tuple(s for s in SERVICES if s != "identity")
        env = dict(self._base_env, TULLE_LOG_FORMAT="json")
        for name in services:
            admin = f"127.0.0.1:{free_port()}"  # never the fixed 999x ports: several meshes may run
            cmd = [sys.executable, "-m", f"services.{name}", "--nats", self.nats_url, "--admin", admin,
                   *self._service_args(name)]
            self.components[name] = Component(name, procs.spawn(name, cmd, env=env, log=self.state.log(name)), cmd,
                                              env, admin, started=time.monotonic())
            self.save()
        deadline = time.monotonic() + self.opts.service_ready_timeout
        while not all(c.ready for c in self.components.values()):
            for c in self.components.values():
                if c.child.exited() is not None:
                    raise StartError(f"the {c.name} service stopped before it was ready ({c.child.describe_exit()}); "
                                     f"see {c.child.log}: {procs.log_tail(c.child.log, 1)}")
                if not c.ready:
                    host, _, port = c.admin.rpartition(":")
                    if await http_ready(host, int(port), "/ready", 0.5):
                        c.ready = True
                        self.log.info("service ready", service=c.name, admin=c.admin)
                        self.save()
            if time.monotonic() > deadline:
                waiting = [c.name for c in self.components.values() if not c.ready]
                raise StartError(f"services not ready after {self.opts.service_ready_timeout:.0f} s: "
                                 f"{', '.join(waiting)}; see {self.state.logs}")
            await asyncio.sleep(0.05)

    # --- running ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Start, then follow the folder until `stopping` is set; always shut down."""
        try:
            await self.start()
            self.phase = "running"
            self.save()
            self._watch_task = asyncio.ensure_future(self._watch())
            monitor = asyncio.ensure_future(self._monitor_services())
            stop = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait([stop, self._watch_task], return_when=asyncio.FIRST_COMPLETED)
            for t in (monitor, stop):
                t.cancel()
            if self._watch_task.done() and not self._watch_task.cancelled() and self._watch_task.exception():
                raise self._watch_task.exception()
        except StartError as e:
            self.error = str(e)
            self.log.error("start failed", error=self.error)
            raise
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            self.log.exception("supervisor failed")
            raise
        finally:
            await self.shutdown()

    async def _watch(self) -> None:
        source = FolderSource([self.opts.manifests], kinds=WATCHED_KINDS, interval=self.opts.poll_interval)
        async for ev in source.events():
            await self._apply(ev)

    async def _apply(self, ev: ResourceEvent) -> None:
        if ev.type == "error":
            self.log.error("manifest not applied", error=ev.error)
            return
        if ev.type == "synced":
            self.synced = True
            # Workloads start once the whole folder is read: a proxy's default inbound
            # policy may come from its Namespace's annotation, in a file read later.
            for w in self._pending.values():
                self._add_workload(w)
            self._pending.clear()
            self.save()
            return
        obj = ev.obj
        if isinstance(obj, m.Namespace):
            if ev.type == "deleted":
                self.namespaces.pop(obj.meta.name, None)
            else:
                self.namespaces[obj.meta.name] = obj
        elif isinstance(obj, m.Service):
            key = (obj.meta.namespace, obj.meta.name)
            if ev.type == "deleted":
                self.services.pop(key, None)
            else:
                self.services[key] = obj
            await self._rewrite_hosts()
            self.save()
        elif isinstance(obj, m.Workload):
            key = plan.workload_key(obj.meta.namespace, obj.meta.name)
            if ev.type in ("modified", "deleted") and key in self.workloads:
                self.log.info("stopping workload", workload=key, reason=ev.type)
                await self.workloads.pop(key).stop(drain=True)
                self.save()
            if not self.synced:
                if ev.type == "deleted":
                    self._pending.pop(key, None)
                else:
                    self._pending[key] = obj
            elif ev.type in ("added", "modified"):
                self._add_workload(obj)

    def mesh_values(self) -> "plan.Values":
        """The install values workloads are injected with. The anchors are read each time:
        rotating them is "change ca.crt, restart the proxies"."""
        return plan.install_values(
            trust_anchors_pem=(self.state.identity / "ca.crt").read_text(), nats_url=self.nats_url,
            trust_domain=self.opts.trust_domain, cluster_domain=self.opts.cluster_domain,
            default_inbound_policy=self.opts.default_inbound_policy,
            networks=plan.cluster_networks(self.isolation, self.n))

    def injection(self, w: m.Workload) -> "plan.Injection":
        return plan.inject(w, self.namespaces.get(w.meta.namespace), self.mesh_values())

    def _add_workload(self, w: m.Workload) -> None:
        key = plan.workload_key(w.meta.namespace, w.meta.name)
        index = plan.first_free_index(u.index for u in self.workloads.values())
        meshed = self.opts.meshed and w.injected
        if meshed:
            injection = self.injection(w)
            if not injection.injected:  # as the webhook would: the pod runs without a proxy
                self.log.warning("workload not meshed: the injector skips it", workload=key,
                                 reason=injection.plan.reason)
                meshed = False
        address = plan.workload_address(self.isolation, self.n, index)
        netns = plan.netns_name(self.n, w.meta.namespace, w.meta.name) if self.isolation == "netns" else ""
        unit = WorkloadUnit(self, w, index, plan.Placement(self.isolation, address, meshed, netns))
        self.workloads[key] = unit
        self.log.info("starting workload", workload=key, address=address, meshed=meshed)
        self.save()
        unit.begin()

    async def wait_unlisted(self, address: str, timeout: float = WITHDRAW_TIMEOUT_S) -> bool:
        """Wait until no endpoint set on the bus lists `address` (destination has taken a
        not-ready pod out of its services); False after `timeout` (e.g. destination down)."""
        from tulle import schemas
        from tulle.bus import Bus, BusCredentials

        deadline = time.monotonic() + timeout
        try:
            if self._observer is None:
                tls = self.nats_server.tls
                self._observer = Bus(self.nats_url, component="local", credentials=BusCredentials.for_seed(
                    str(self.nats_server.seed_file("observer")), ca_file=tls.ca_file if tls else ""))
                await asyncio.wait_for(self._observer.start(), timeout)
            while time.monotonic() < deadline:
                sets = await asyncio.wait_for(
                    self._observer.items(schemas.ENDPOINTS_BUCKET, schemas.EndpointSet), timeout)
                if not any(ep.address == address for es in sets.values() for ep in es.endpoints):
                    return True
                await asyncio.sleep(0.05)
        except Exception as e:  # the bus is down: stop the workload anyway, after the timeout
            self.log.warning("cannot see the endpoints on the bus", error=str(e) or type(e).__name__)
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        return False

    async def _rewrite_hosts(self) -> None:
        if self.isolation != "netns":
            return
        for unit in list(self.workloads.values()):
            if unit.network_ready:
                await asyncio.to_thread(nets.write_hosts, unit.placement.netns, unit.hosts_text())

    async def _monitor_services(self) -> None:
        """Keep NATS and the services running (restarted with back-off, as the kubelet
        would) and their readiness in the record current."""
        while True:
            await asyncio.sleep(1)
            changed = False
            for c in [*self.nats_nodes, *self.components.values()]:
                now = time.monotonic()
                if c.restart_at is None and c.child.exited() is not None:
                    if now - c.started > 30:
                        c.failures = 0
                    c.failures += 1
                    c.restart_at = now + plan.restart_delay(c.failures)
                    c.ready, changed = False, True
                    self.log.error("component stopped; restarting", component=c.name, how=c.child.describe_exit(),
                                   delay_s=plan.restart_delay(c.failures), log=str(c.child.log))
                if c.restart_at is not None and now >= c.restart_at:
                    c.restart_at, c.started = None, now
                    c.restarts += 1
                    c.child = procs.spawn(c.name, c.cmd, env=c.env, log=c.child.log)
                    changed = True
                if c.child.exited() is None:
                    if c.admin:
                        host, _, port = c.admin.rpartition(":")
                        ok = await http_ready(host, int(port), "/ready", 1.0)
                    else:
                        ok = await self._nats_node_ready(c, 1.0)
                    if ok != c.ready:
                        c.ready, changed = ok, True
            if changed:
                self.save()

    # --- stop ---------------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Workloads (apps, then proxies, then namespaces), services, NATS, the bridge; then
        the record goes and the subnet is released. Never raises."""
        self.phase = "stopping"
        try:
            self.save()
        except OSError:
            pass
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        await asyncio.gather(*(u.stop() for u in self.workloads.values()), return_exceptions=True)
        self.workloads.clear()
        if self._observer is not None:
            await asyncio.gather(self._observer.close(), return_exceptions=True)
        await asyncio.gather(*(procs.terminate_async(c.child) for c in self.components.values()),
                             return_exceptions=True)
        await asyncio.gather(*(procs.terminate_async(c.child) for c in self.nats_nodes), return_exceptions=True)
        problems = []
        if self.isolation == "netns" and self.n is not None:
            problems = await asyncio.to_thread(nets.teardown, self.n, [], self.host_rules)
        for p in problems:
            self.log.warning("cleanup incomplete", problem=p)
        for stale in self.state.runtime.glob("*"):
            stale.unlink(missing_ok=True)
        from tulle.local.state import remove_record

        remove_record(self.state)
        if self._subnet_fd is not None:
            os.close(self._subnet_fd)
            self._subnet_fd = None
        self.log.info("stopped")


class WorkloadUnit:
    """One Workload: its namespace, proxy, app and Pod manifest, supervised by one task."""

    def __init__(self, runner: Runner, w: m.Workload, index: int, placement: plan.Placement):
        self.runner, self.w, self.index, self.placement = runner, w, index, placement
        self.key = plan.workload_key(w.meta.namespace, w.meta.name)
        self.app: Optional[procs.Child] = None
        self.proxy: Optional[procs.Child] = None
        self.app_ready = self.proxy_ready = False
        self.restarts = self.proxy_restarts = 0
        self.last_exit = ""
        self.network_ready = False
        self.token_file: Optional[Path] = None
        self._token_dir: Optional[Path] = None
        self._token_owner: Optional[int] = None
        self._token_minted = 0.0
        self.task: Optional[asyncio.Task] = None
        self.log = runner.log.bind(workload=self.key)
        self.pod_file = runner.state.runtime / plan.pod_file_name(w.meta.namespace, w.meta.name)

    @property
    def ready(self) -> bool:
        return self.app_ready and (self.proxy_ready or not self.placement.meshed)

    @property
    def proxy_admin(self) -> str:
        return f"{self.placement.address}:{plan.ADMIN_PORT}"

    def record(self) -> dict:
        p = self.placement
        return {
            "name": self.w.meta.name,
            "namespace": self.w.meta.namespace,
            "key": self.key,
            "index": self.index,
            "address": p.address,
            "netns": p.netns,
            "veth": plan.veth_name(self.runner.n, self.index) if p.netns else "",
            "meshed": p.meshed,
            "service_account": self.w.service_account,
            "identity": plan.workload_identity(self.w, self.runner.opts.trust_domain) if p.meshed else "",
            "labels": dict(self.w.meta.labels),
            "ports": [{"name": port.name, "port": port.container_port} for port in self.w.ports],
            "ready": self.ready,
            "app": {"pid": self.app.pid if self.app else None, "start": self.app.start if self.app else None,
                    "ready": self.app_ready, "restarts": self.restarts, "last_exit": self.last_exit,
                    "log": str(self.runner.state.log(plan.log_name("workload", *self.key.split(".", 1))))},
            "proxy": ({"pid": self.proxy.pid if self.proxy else None, "start": self.proxy.start if self.proxy else None,
                       "admin": self.proxy_admin, "ready": self.proxy_ready, "restarts": self.proxy_restarts,
                       "log": str(self.runner.state.log(plan.log_name("proxy", *self.key.split(".", 1))))}
                      if p.meshed else None),
            "pod_file": str(self.pod_file),
            "token_file": str(self.token_file) if self.token_file else "",
        }

    def hosts_text(self) -> str:
        return plan.hosts_file(self.w.meta.name, self.placement.address, self.w.meta.namespace,
                               self.runner.services.values(), self.runner.opts.cluster_domain)

    def begin(self) -> None:
        self.task = asyncio.ensure_future(self._supervise())

    # --- start and supervise ------------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            await self._prepare()
            self._write_pod()
            if self.placement.meshed:
                await self._start_proxy_until_ready()
            self._start_app()
            self.runner.save()
            app_failures = proxy_failures = 0
            app_restart_at: Optional[float] = None
            proxy_restart_at: Optional[float] = None
            app_started = time.monotonic()
            while True:
                await asyncio.sleep(0.25 if not self.ready else 1.0)
                now = time.monotonic()
                changed = False
                if self.placement.meshed and now - self._token_minted > local_identity.TOKEN_REFRESH_S:
                    self._mint_token()  # the proxy reads it again at its next certify and bus login
                if self.placement.meshed:
                    if proxy_restart_at is None and self.proxy.exited() is not None:
                        proxy_failures += 1
                        proxy_restart_at = now + plan.restart_delay(proxy_failures)
                        self.proxy_ready, changed = False, True
                        self.log.warning("proxy exited; restarting", how=self.proxy.describe_exit(),
                                         delay_s=plan.restart_delay(proxy_failures), log=str(self.proxy.log))
                    if proxy_restart_at is not None and now >= proxy_restart_at:
                        proxy_restart_at = None
                        self.proxy_restarts += 1
                        self._spawn_proxy()
                        changed = True
                if app_restart_at is None and self.app.exited() is not None:
                    if now - app_started > 30:
                        app_failures = 0  # it ran a good while: start the back-off afresh
                    app_failures += 1
                    app_restart_at = now + plan.restart_delay(app_failures)
                    self.last_exit = self.app.describe_exit()
                    self.app_ready, changed = False, True
                    self.log.warning("app exited; restarting", how=self.last_exit,
                                     delay_s=plan.restart_delay(app_failures), log=str(self.app.log))
                if app_restart_at is not None and now >= app_restart_at:
                    app_restart_at = None
                    self.restarts += 1
                    app_started = now
                    self._start_app()
                    changed = True
                was_ready = self.ready
                if self.placement.meshed and self.proxy.exited() is None:
                    ok = await self._probe_proxy()
                    changed |= ok != self.proxy_ready
                    self.proxy_ready = ok
                if self.app.exited() is None:
                    ok = await self._probe_app()
                    changed |= ok != self.app_ready
                    self.app_ready = ok
                if self.ready != was_ready:
                    self._write_pod()
                    self.log.info("ready" if self.ready else "not ready")
                if changed:
                    self.runner.save()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.last_exit = f"could not start: {e}"
            self.log.error("workload could not start", error=str(e))
            self.runner.save()

    async def _prepare(self) -> None:
        p, runner = self.placement, self.runner
        if p.meshed:
            if p.isolation == "netns":  # the proxy runs as 2102: its token lives where 2102 can reach it
                where, owner = nets.proxy_runtime_dir(runner.n), plan.PROXY_UID
            else:
                where, owner = runner.state.identity, None
            self._token_dir, self._token_owner = where, owner
            self._mint_token()
        if p.isolation == "netns":
            await asyncio.to_thread(nets.create_pod_netns, runner.n, self.index, p.netns, p.address, self.hosts_text())
            self.network_ready = True
            # Services that changed while the namespace was being made: from now on
            # _rewrite_hosts keeps this one current.
            await asyncio.to_thread(nets.write_hosts, p.netns, self.hosts_text())
            if p.meshed:
                await asyncio.to_thread(nets.apply_proxy_init, p.netns, plan.proxy_init_rules())

    def _mint_token(self) -> None:
        runner = self.runner
        self.token_file = local_identity.write_token(self._token_dir, runner.token_secret, self.w.meta.namespace,
                                                     self.w.meta.name, self.w.service_account, self._token_owner,
                                                     trust_domain=runner.opts.trust_domain)
        self._token_minted = time.monotonic()

    def _write_pod(self, ready: Optional[bool] = None) -> None:
        injection = self.runner.injection(self.w) if self.placement.meshed else None
        manifest = plan.pod_manifest(self.w, self.placement, ready=self.ready if ready is None else ready,
                                     injection=injection)
        tmp = self.pod_file.with_name(f".{self.pod_file.name}.tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.pod_file)

    def _spawn_proxy(self) -> None:
        p, runner = self.placement, self.runner
        tls = runner.nats_server.tls if runner.nats_server else None
        # Injected afresh at every start: the anchors and the namespace may have changed.
        env = plan.proxy_env(runner._base_env, self.w, p, runner.injection(self.w), token_file=str(self.token_file),
                             nats_ca=tls.ca_file if tls else "")
        netns = p.isolation == "netns"
        self.proxy = procs.spawn(f"proxy {self.key}", [sys.executable, "-m", "proxy"], env=env, cwd="/",
                                 log=runner.state.log(plan.log_name("proxy", self.w.meta.namespace, self.w.meta.name)),
                                 netns=p.netns, uid=runner.proxy_uid if netns else None,
                                 gid=plan.PROXY_UID if netns else None)

    async def _start_proxy_until_ready(self) -> None:
        """Local mode starts an app only once its proxy is ready (as Linkerd's startup ordering)."""
        failures = 0
        self._spawn_proxy()
        self.runner.save()
        while True:
            if self.proxy.exited() is not None:
                failures += 1
                delay = plan.restart_delay(failures)
                self.log.warning("proxy exited before it was ready; restarting", how=self.proxy.describe_exit(),
                                 delay_s=delay, log=str(self.proxy.log))
                await asyncio.sleep(delay)
                self.proxy_restarts += 1
                self._spawn_proxy()
                self.runner.save()
            elif await self._probe_proxy():
                self.proxy_ready = True
                self.log.info("proxy ready", admin=self.proxy_admin)
                return
            await asyncio.sleep(0.05)

    def _start_app(self) -> None:
        p, runner = self.placement, self.runner
        uid, gid = _app_user() if p.isolation == "netns" else (None, None)
        env = plan.app_env(runner._base_env, self.w, p)
        self.app = procs.spawn(self.key, list(self.w.command), env=env, cwd=self.w.base_dir or None,
                               log=runner.state.log(plan.log_name("workload", self.w.meta.namespace, self.w.meta.name)),
                               netns=p.netns, uid=uid, gid=gid)

    async def _probe_proxy(self) -> bool:
        return await http_ready(self.placement.address, plan.ADMIN_PORT, "/ready", 1.0)

    async def _probe_app(self) -> bool:
        """The Workload's first httpGet probe, else a TCP connect to its first port, else 'running'."""
        host = self.placement.address
        for probe in self.w.probes:
            port = plan.resolve_port(self.w, probe.port)
            if port is not None:
                return await http_ready(host, port, probe.path, 1.0)
        if self.w.ports:
            return await tcp_ready(host, self.w.ports[0].container_port, 1.0)
        return True

    # --- stop ---------------------------------------------------------------------------------------

    async def stop(self, *, drain: bool = False) -> None:
        """Stop everything of this workload. With `drain` (it left the folder while the run
        goes on), as Kubernetes ends a pod behind a Service: first out of its services (the
        Pod turns not ready and destination withdraws its endpoints), then the proxy's
        graceful shutdown (requests in flight finish), then the app."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if drain and self.app is not None:
            self._write_pod(ready=False)
            if not await self.runner.wait_unlisted(self.placement.address):
                self.log.warning("endpoints not withdrawn in time; stopping anyway")
            if self.proxy is not None:
                await procs.terminate_async(self.proxy)
        if self.app is not None:
            await procs.terminate_async(self.app)
        if self.proxy is not None:
            await procs.terminate_async(self.proxy)
        self.pod_file.unlink(missing_ok=True)
        if self.placement.netns:
            await asyncio.to_thread(nets.delete_netns, self.placement.netns,
                                    plan.veth_name(self.runner.n, self.index))
        if self.token_file is not None:
            self.token_file.unlink(missing_ok=True)
        self.log.info("stopped")
