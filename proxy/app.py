"""Wires the proxy together: bus, identity, discovery, the two rooms, admin, heartbeat.

Start-up: listeners and the admin server come up at once (so /live answers and the app's
connections queue rather than fail); /ready turns 200 once the identity holds a
certificate and trust bundle and the bus has been reached once and the first inbound
policy has arrived (`tulle-policy` `<namespace>.<workload>`; until then the configured
default inbound policy applies), plus any extra ready check.

Shutdown (SIGTERM or POST /shutdown): stop accepting, close idle keep-alive connections,
let in-flight requests and open tunnels finish up to `shutdown_grace_s`, then close the
rest and exit 0.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import time
from typing import Any, Callable

from proxy.admin import make_admin
from proxy.config import ProxyConfig, from_env
from proxy.context import Shared
from proxy.discovery import Discovery
from proxy.heartbeat import ProxyHeartbeat
from proxy.inbound import Inbound
from proxy.limits import Limits, expired, sweep_interval
from proxy.metrics import ProxyMetrics
from proxy.outbound import Outbound
from proxy.traffic_stats import TrafficWindows, read_edges, traffic_reply
from proxy.policy_metrics import DenialReporter
from proxy.policy_watch import PolicyWatcher
from proxy.pools import Pools
from proxy.route_stats import stats_reply
from tulle import __version__, pki, schemas
from tulle.bus import Bus, BusCredentials
from tulle.errors import UserError
from tulle.log import get_logger, setup_logging
from tulle.metrics import REGISTRY, Registry
from tulle.policy import InboundPolicy

log = get_logger()

TRAFFIC_SAMPLE_S = 1.0  # how often the traffic windows read the proxy's counters


def production_identity(bus: Bus, cfg: ProxyConfig, registry: Registry):
    """The one place the real identity client is made (tests pass their own object)."""
    from proxy.identity import IdentityClient

    return IdentityClient(bus, identity=cfg.identity, token_file=cfg.token_file,
                          trust_anchors_pem=cfg.trust_anchors_pem, registry=registry)


class ProxyApp:
    def __init__(self, cfg: ProxyConfig, *, identity: Any = None, registry: Registry = REGISTRY, policy: Any = None,
                 on_profile: Callable[[str, Any], None] | None = None):
        self.cfg = cfg
        self.registry = registry
        self._identity = identity
        # A policy given here is fixed (tests); without one the proxy watches its own key.
        self._policy = policy
        self.policy: InboundPolicy | None = None
        self.policy_watcher: PolicyWatcher | None = None
        self._on_profile = on_profile
        self.bus: Bus | None = None
        self.identity: Any = None
        self.shared: Shared | None = None
        self.outbound: Outbound | None = None
        self.inbound: Inbound | None = None
        self.admin = None
        self.heartbeat: ProxyHeartbeat | None = None
        self.reached_bus = False
        self.stopping = asyncio.Event()
        self.stopped = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._ready_announced = False
        self.ready_checks: dict[str, Callable[[], bool]] = {}
        self.traffic = TrafficWindows()  # golden metrics per edge, for `tulle stat` / `tulle edges`

    # --- readiness ---------------------------------------------------------------------

    def is_ready(self) -> bool:
        ident = self.identity
        return (ident is not None and bool(ident.ready) and self.reached_bus
                and all(fn() for fn in self.ready_checks.values()))

    def _on_bus(self, up: bool) -> None:
        if up:
            self.reached_bus = True

    # --- start / stop ------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        # The bus knows this proxy by its workload's token (auth callout to identity), which
        # grants this workload's permissions only.
        self.bus = Bus(cfg.nats_url, component="proxy", instance=f"{cfg.namespace}.{cfg.workload}",
                       registry=self.registry,
                       credentials=BusCredentials.for_workload(cfg.token_file, cfg.namespace, cfg.workload,
                                                               ca_file=cfg.nats_ca_file))
        self.bus.on_connection_change(self._on_bus)
        self.identity = self._identity if self._identity is not None else production_identity(self.bus, cfg, self.registry)
        metrics = ProxyMetrics(self.registry)
        discovery = Discovery(self.bus, idle_s=cfg.discovery_idle_timeout_s, on_profile=self._on_profile,
                              max_watches=cfg.discovery_max_watches, absent_ttl_s=cfg.discovery_absent_ttl_s,
                              registry=self.registry)
        self.shared = Shared(cfg, self.identity, discovery, metrics, self.ready_checks, self._on_profile)
        limits = Limits.from_config(cfg)
        out_pools = Pools(client_context=self.shared.client_context, connect_timeout=cfg.connect_timeout_s,
                          idle_timeout=cfg.pool_idle_timeout_s, mesh_idle_timeout=cfg.mesh_pool_idle_timeout_s,
                          count_h2_error=lambda reason: metrics.http2_error("outbound", "dst", reason), limits=limits)
        in_pools = Pools(client_context=lambda: None, connect_timeout=cfg.connect_timeout_s,
                         idle_timeout=cfg.pool_idle_timeout_s,
                         count_h2_error=lambda reason: metrics.http2_error("inbound", "dst", reason), limits=limits)
        self.pools = (out_pools, in_pools)
        self.outbound = Outbound(self.shared, out_pools)
        self.policy = self._policy if self._policy is not None else InboundPolicy(cfg.default_inbound_policy,
                                                                                   cfg.cluster_networks)
        denials = DenialReporter(self.bus, namespace=cfg.namespace, workload=cfg.workload, registry=self.registry)
        if self._policy is None:
            self.policy_watcher = PolicyWatcher(self.bus, cfg.namespace, cfg.workload, self.policy,
                                                on_update=lambda _: self.inbound.policy_changed())
            self.ready_checks["policy"] = self.policy_watcher.first.is_set
        self.inbound = Inbound(self.shared, in_pools, self.policy, denials,
                               policy_received=self.policy_watcher.first if self.policy_watcher else None)
        host, port = cfg.admin_addr
        self.admin = make_admin(host, port, ready=self.is_ready, registry=self.registry,
                                shutdown_enabled=cfg.shutdown_endpoint, on_shutdown=self.stopping.set,
                                max_connections=cfg.admin_max_connections)
        # Listeners first: a port in use is a start-up error the operator must see.
        self.outbound.start()
        self.inbound.start()
        await self.admin.start()
        self.shared.listening(self.outbound.listener.address, self.inbound.listener.address,
                              (cfg.admin_addr[0], self.admin.port), cfg.outbound_addr, cfg.inbound_addr, cfg.admin_addr)
        self.heartbeat = ProxyHeartbeat(
            self.bus, cfg.namespace, cfg.workload, lambda: (cfg.identity, float(getattr(self.identity, "expiry", 0) or 0)),
            self.is_ready, self.admin.address,
            trust_anchors_pem=cfg.trust_anchors_pem)
        await self.bus.start(wait=False)
        run = getattr(self.identity, "run", None)
        if self._identity is None and run is not None:
            self._tasks.append(asyncio.ensure_future(run()))
        self._tasks.append(asyncio.ensure_future(self.heartbeat.run()))
        if self.policy_watcher is not None:
            self._tasks.append(asyncio.ensure_future(self.policy_watcher.run()))
        self._tasks.append(asyncio.ensure_future(self._tick()))
        self._tasks.append(asyncio.ensure_future(self._serve_route_stats()))
        self._tasks.append(asyncio.ensure_future(self._sample_traffic()))
        self._tasks.append(asyncio.ensure_future(self._serve_traffic()))
        self._tasks.append(asyncio.ensure_future(self._announce_ready()))
        log.info("proxy listening", outbound=_fmt(self.outbound.listener.address),
                 inbound=_fmt(self.inbound.listener.address), admin=self.admin.address, identity=cfg.identity,
                 version=__version__)

    @property
    def outbound_port(self) -> int:
        return self.outbound.listener.port

    @property
    def inbound_port(self) -> int:
        return self.inbound.listener.port

    @property
    def admin_port(self) -> int:
        return self.admin.port

    async def _tick(self) -> None:
        """The time bounds of every connection (proxy/limits.py), without a timer per request:
        HTTP heads, bodies and keep-alive; opaque connections gone idle."""
        cfg = self.cfg
        interval = sweep_interval(*Limits.from_config(cfg).timeouts(), cfg.opaque_idle_timeout_s)
        while True:
            await asyncio.sleep(interval)
            for room in (self.outbound, self.inbound):
                for server in list(room.conns):
                    server.tick(interval)
                for pair in list(room.splices):
                    pair.idle_ticks += 1
                    if expired(pair.idle_ticks, interval, cfg.opaque_idle_timeout_s):
                        self.shared.metrics.tcp_error(room.direction, "idle_timeout")
                        pair.close()

    async def _serve_route_stats(self) -> None:
        """Answer `tulle routes` (PROXY_STATS_SUBJECT) with this proxy's outbound route windows;
        no answer when the request names other workloads."""
        cfg = self.cfg

        async def answer(request: schemas.StatsRequest) -> schemas.StatsReply | None:
            return stats_reply(cfg.namespace, cfg.workload, self.outbound.route_stats, request)

        await self._serve_once_connected(schemas.PROXY_STATS_SUBJECT, schemas.StatsRequest, answer, "route stats")

    async def _serve_once_connected(self, subject: str, cls: type, answer, what: str) -> None:
        """Subscribe `answer` to `subject` as soon as the bus is up. Once is enough: nats-py
        subscribes again by itself after a reconnect."""
        while True:
            await self.bus.wait_connected()
            try:
                await self.bus.serve(subject, cls, answer)
                return
            except Exception as e:  # disconnected again between the wait and the subscribe
                log.debug(f"cannot serve {what} yet", error=str(e) or type(e).__name__)
                await asyncio.sleep(0.5)

    def sample_traffic(self) -> None:
        """Fold the proxy's cumulative counters into the traffic windows (the request path
        itself does nothing for them)."""
        self.traffic.sample(read_edges(self.shared.metrics, (self.inbound, self.outbound), self.inbound.authz))

    async def _sample_traffic(self) -> None:
        while True:
            await asyncio.sleep(TRAFFIC_SAMPLE_S)
            try:
                self.sample_traffic()
            except Exception:  # a bug here must not stop the proxy, nor the next samples
                log.exception("sampling traffic figures failed")

    async def _serve_traffic(self) -> None:
        """Answer `tulle stat` / `tulle edges` / the dashboard (PROXY_TRAFFIC_SUBJECT) with this
        proxy's edges over the window asked for; no answer when the request names others."""
        cfg = self.cfg

        async def answer(request: schemas.TrafficRequest) -> schemas.TrafficReply | None:
            if request.workloads and schemas.proxy_key(cfg.namespace, cfg.workload) not in request.workloads:
                return None
            self.sample_traffic()  # up to this moment, not to the last whole second
            return traffic_reply(cfg.namespace, cfg.workload, cfg.identity, self.traffic, request)

        await self._serve_once_connected(schemas.PROXY_TRAFFIC_SUBJECT, schemas.TrafficRequest, answer,
                                         "traffic figures")

    async def _announce_ready(self) -> None:
        while not self.is_ready():
            await asyncio.sleep(0.05)
        # Everything made so far (modules, contexts, config) lives as long as the process:
        # move it out of the collector's sight, so a full collection later scans only what
        # traffic created — tens of milliseconds of pause become well under one.
        gc.collect()
        gc.freeze()
        log.info("ready", identity=self.cfg.identity)
        await self.heartbeat.beat()
        await self.bus.publish_event("ready", {
            "namespace": self.cfg.namespace, "workload": self.cfg.workload, "identity": self.cfg.identity,
            "version": __version__, "admin": self.admin.address, "pid": os.getpid(),
        })

    async def shutdown(self) -> None:
        """Graceful: stop accepting, finish in-flight work up to the grace period, close."""
        if self.stopped.is_set():
            return
        grace = self.cfg.shutdown_grace_s
        log.info("shutting down", grace_s=grace)
        rooms = [r for r in (self.outbound, self.inbound) if r is not None]
        for room in rooms:
            room.stop_accepting()
            room.drain()
        deadline = time.monotonic() + grace
        while any(r.busy for r in rooms) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            for room in rooms:
                room.drain()
        left = {f"{r.direction}_{kind}": n for r in rooms
                for kind, n in (("http", len(r.conns)), ("opaque", len(r.splices)), ("connecting", r.tunnels)) if n}
        if left:
            log.warning("grace period over; closing the connections left", **left)
        for room in rooms:
            for server in list(room.conns):
                if server.transport is not None:
                    server.transport.abort()
            for s in list(room.splices):
                s.abort()
        for pools in getattr(self, "pools", ()):
            pools.close()
        if self.heartbeat is not None:
            await self.heartbeat.remove()
        await _cancel_all(self._tasks)
        if self.shared is not None:
            await self.shared.discovery.close()
        if self.admin is not None:
            await self.admin.close()
        if self.bus is not None:
            try:
                await self.bus.close()
            except Exception as e:  # nats-py may fail to flush to a server that is gone
                log.debug("bus close failed", error=str(e) or type(e).__name__)
        self.stopped.set()
        log.info("stopped")

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT or /shutdown; returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            await self.start()
        except OSError as e:
            log.error("cannot listen", error=str(e))
            await self.shutdown()
            return 1
        await self.stopping.wait()
        await self.shutdown()
        return 0


async def _cancel_all(tasks: list[asyncio.Task]) -> None:
    """Cancel and wait, cancelling again what still runs: in Python 3.11 asyncio.wait_for
    (inside nats-py's requests) returns a result that races a cancellation and drops the
    cancellation, which would leave a start-up task (a KV watch) running forever."""
    while pending := [t for t in tasks if not t.done()]:
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=0.5)
    await asyncio.gather(*tasks, return_exceptions=True)


def _fmt(addr: tuple) -> str:
    return f"{addr[0]}:{addr[1]}"


def main(env=None) -> None:
    """`python -m proxy`: configuration from the environment (proxy/config.py)."""
    try:
        import proxy.http2  # noqa: F401  loads libnghttp2: a missing library is this one line
        cfg = from_env(env)
    except UserError as e:
        print(f"tulle proxy: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    setup_logging("proxy", cfg.log_level)
    import uvloop

    sys.exit(uvloop.run(ProxyApp(cfg).run()))
