"""The outbound room: the app's own outgoing connections (port 4140).

A connection arrives redirected by iptables (its original destination from
SO_ORIGINAL_DST) or addressed directly, as to an HTTP proxy (absolute-form requests,
CONNECT tunnels — inside which HTTP/2 is parsed too). HTTP/1 and HTTP/2 (prior-knowledge
h2c) are routed per request by their authority: a mesh service name (`svc`, `svc.ns`,
`svc.ns.svc[.<cluster-domain>]`) → its endpoint set; else, when redirected, the original
destination's `_ip` endpoint set; else forwarded as is (to the original destination, or by
DNS in proxy mode). Everything else is opaque TCP, balanced per connection. Endpoints with
an identity are reached over mTLS with the transport header — HTTP/2 requests, and HTTP/1
ones with TULLE_PROXY_MESH_PROTOCOL=h2, on one multiplexed HTTP/2 connection per peer;
others over plain TCP (HTTP/2 stays h2c).

Errors, as Linkerd's: known service without endpoints → the request waits in the service's
fail-fast queue (proxy/failfast.py) up to the fail-fast timeout for one, then 503; connect
failure → 502; discovery silent for a new target → 504 after the fail-fast timeout; opaque
TCP: the connection closes. Only names and addresses in the mesh's scope are looked up in
discovery (proxy/authority.py MeshScope); the rest are forwarded as they are.

Every HTTP request is an `Exchange` (proxy/exchange.py, the request core), whatever wire
it came in on. This room only acts on its decisions: it finds the request's target, its
service profile's route (`x.on_route`: the deadline, retries and figures the core keeps;
the room arms the deadline's timer), an endpoint from the balancer (`x.pick`) and a
connection to it (`x.attach`); a retry or resend the core decides comes back through
`send(x)` to the same target. Route figures are kept in `route_stats`
(proxy/route_stats.py).
"""

from __future__ import annotations

import asyncio
import socket

from proxy import detect
from proxy import transport as tph
from proxy.authority import MeshScope, is_ip, split_authority
from proxy.context import Shared
from proxy.discovery import Watched
from proxy.exchange import Exchange
from proxy.http1.headers import HeadError
from proxy.failfast import FAILING, WAIT, Gate
from proxy.http1.server import Http1Server
from proxy.limits import Limits
from proxy.http2.fields import ORIG_PROTO
from proxy.http2.server import H2Server
from proxy.http2.session import H2Config
from proxy.listener import EOF, TIMEOUT, Peeker, Side, adopt, original_dst
from proxy.metrics import Labels
from proxy.pools import Pools
from proxy.profiles import RETRY_ATTEMPT_HEADER, CompiledRoute, RetryBudget, RouteTable
from proxy.route_stats import RouteMetrics, RouteRecorder, RouteStats
from proxy.tcp import splice
from proxy.upstream import Buffering, DialError, Dest, dial
from tulle import schemas
from tulle.log import get_logger

MAX_TARGETS = 10000  # cached authorities; the cache is cleared when it grows past this

log = get_logger(part="outbound")


class OutConn:
    """Facts about one accepted outbound connection."""

    __slots__ = ("peer", "orig", "last_host", "last_target")

    def __init__(self, peer: tuple, orig: tuple[str, int] | None):
        self.peer = peer
        self.orig = orig  # original destination when redirected; None when used as a proxy
        self.last_host: bytes | None = None
        self.last_target: Target | None = None


class EndpointHandle:
    """What the room keeps per balanced endpoint: where to dial, its pools, its metric labels."""

    __slots__ = ("dest", "pool", "labels", "h2_dest", "h2", "meshed")

    def __init__(self, dest: Dest, pool, labels: Labels, h2_dest: Dest, meshed: bool):
        self.dest = dest
        self.pool = pool  # HTTP/1.1 connections
        self.labels = labels
        self.h2_dest = h2_dest
        self.h2 = None  # HTTP/2 connections (made on first use)
        self.meshed = meshed


class Target:
    """A logical destination: an authority (and original destination), resolved via discovery."""

    __slots__ = ("name", "port", "watches", "fallback", "fallback_pool", "fallback_h2", "fallback_labels",
                 "generation", "profile", "authority", "routes")

    def __init__(self, authority: bytes, name: tuple[str, str] | None, port: int, watches: list[Watched],
                 fallback: Dest | None, generation: int):
        self.authority = authority
        self.name = name  # (namespace, service) when the authority is a mesh name
        self.port = port
        self.watches = watches  # tried in order: by name, then by IP
        self.fallback = fallback  # where to go when no watch knows a service
        self.fallback_pool = None
        self.fallback_h2 = None
        self.fallback_labels: Labels | None = None
        self.generation = generation
        self.profile: Watched | None = None  # the service's profile watch (mesh names only)
        self.routes: ServiceRoutes | None = None  # what that profile compiles to, with its budget


class ServiceRoutes:
    """One destination service's compiled profile in this proxy: its route table, the retry
    budget all its routes share, and each route's recorder. Recompiled when the profile
    watch holds another value; the budget and the figures outlive recompiles."""

    __slots__ = ("key", "profile", "table", "budget", "recorders", "stats")

    def __init__(self, key: str, stats: RouteStats):
        self.key = key  # <namespace>.<service>
        self.stats = stats
        self.profile: schemas.Profile | None = None
        self.table: RouteTable | None = None
        self.budget: RetryBudget | None = None
        self.recorders: dict[CompiledRoute, RouteRecorder] = {}

    def refresh(self, profile: schemas.Profile) -> None:
        table = RouteTable.from_profile(profile)
        try:
            settings = table.budget_settings()
            if self.budget is None:
                self.budget = RetryBudget(*settings)
            else:
                self.budget.update(*settings)
        except ValueError:
            log.warning("invalid retry budget in profile; keeping the previous one", profile=self.key)
            if self.budget is None:
                self.budget = RetryBudget()
        self.table = table
        self.profile = profile
        self.recorders = {r: self.stats.route(self.key, r.name) for r in (*table.routes, table.default)}


class Outbound(Side):
    direction = "outbound"
    absolute_form = True

    def __init__(self, shared: Shared, pools: Pools):
        self.shared = shared
        self.cfg = cfg = shared.cfg
        self.metrics = shared.metrics
        self.discovery = shared.discovery
        self.pools = pools
        self.loop = asyncio.get_event_loop()
        self.limits = Limits.from_config(cfg)
        self.failfast_s = cfg.outbound_failfast_timeout_s
        self.scope = MeshScope(cfg.namespace, cfg.cluster_domain, cfg.profile_suffixes, cfg.profile_networks)
        self.h2_config = H2Config()
        Side.__init__(self, cfg.outbound_addr, self._on_socket, "outbound", max_connections=cfg.max_connections,
                      on_refused=lambda: self.metrics.tcp_error("outbound", "connection_limit"))
        self.default_labels = self.metrics.labels("outbound")
        self._targets: dict[tuple, Target] = {}
        self._errors = self.metrics.http_errors["outbound"]
        # The attempt header and the caller's-protocol field are the proxy's to set: an app's
        # own copy never reaches a server.
        self._strip = frozenset({RETRY_ATTEMPT_HEADER.encode(), ORIG_PROTO})
        self.mesh_h2 = cfg.mesh_protocol == "h2"
        self.route_stats = RouteStats(metrics=RouteMetrics(self.metrics.registry))
        self._services: dict[str, ServiceRoutes] = {}
        # Requests in flight per balanced service, read when /metrics is rendered: every
        # attempt that raised it must lower it again, however the request ended.
        self._pending_gauge = self.metrics.registry.gauge(
            "outbound_balancer_pending", "HTTP requests in flight to a service's balanced endpoints",
            ("dst_namespace", "dst_service"))

    # --- accepting ---------------------------------------------------------------------

    def _on_socket(self, sock: socket.socket, peer: tuple) -> None:
        orig = None
        if self.cfg.transparent:
            orig = original_dst(sock)
            if orig is not None and orig == sock.getsockname()[:2]:
                orig = None  # addressed to us directly: HTTP proxy use
        conn = OutConn(peer, orig)
        if orig is not None and orig[1] in self.cfg.opaque_ports:
            self._count_detect("opaque")
            asyncio.ensure_future(self._tcp(sock, conn))
            return
        Peeker(sock, _judge, lambda verdict, data: self._detected(sock, conn, verdict), self.cfg.detect_timeout_s)

    def _detected(self, sock: socket.socket, conn: OutConn, verdict) -> None:
        if verdict is EOF:
            sock.close()
            return
        if verdict is detect.Kind.HTTP1:
            self._count_detect("http/1")
            adopt(sock, lambda: Http1Server(self, self.limits, self._strip, conn))
            return
        if verdict is detect.Kind.H2:  # prior-knowledge h2c (gRPC, ...): parsed, routed per request
            self._count_detect("h2")
            adopt(sock, lambda: self.h2_server(conn))
            return
        self._count_detect("timeout" if verdict is TIMEOUT else "opaque" if verdict is detect.Kind.OPAQUE
                           else "tls")
        if verdict is TIMEOUT:
            log.info("protocol detection timed out; forwarding as opaque TCP", after_s=self.cfg.detect_timeout_s)
        if conn.orig is None:
            # Used as a proxy but not speaking HTTP: there is nowhere to send it.
            self.metrics.tcp_error("outbound", "not_http")
            sock.close()
            return
        asyncio.ensure_future(self._tcp(sock, conn))

    def h2_server(self, conn: OutConn, preface: bytes = b"") -> H2Server:
        return H2Server(self, conn, self.h2_config, self._strip, preface=preface,
                        count_error=lambda reason: self.metrics.http2_error("outbound", "src", reason))

    def _count_detect(self, protocol: str) -> None:
        self.metrics.detect_total.labels("outbound", protocol).inc()

    # --- resolving targets ---------------------------------------------------------------

    def target_for(self, authority: bytes | None, conn: OutConn) -> Target:
        """The Target for an HTTP authority on this connection; raises HeadError when unusable."""
        key = (authority, conn.orig)
        t = self._targets.get(key)
        if t is not None and t.generation == self.discovery.generation:
            return t
        if len(self._targets) > MAX_TARGETS:
            self._targets.clear()
        t = self._make_target(authority, conn.orig)
        self._targets[key] = t
        return t

    def _make_target(self, authority: bytes | None, orig: tuple[str, int] | None) -> Target:
        d = self.discovery
        name = None
        port = orig[1] if orig else 80
        host = None
        if authority:
            parsed = split_authority(authority, 80)
            if parsed is None:
                raise HeadError(400, "invalid authority")
            host, port = parsed
            name = self.scope.service(host)
            if name is None and not is_ip(host):
                d.skipped("outside_mesh_name")
        watches: list[Watched] = []
        if name is not None:
            watches.append(d.endpoints(schemas.endpoints_key(name[0], name[1], port)))
        fallback = None
        if orig is not None:
            if self.scope.address(orig[0]):
                watches.append(d.endpoints(schemas.ip_endpoints_key(*orig)))
            else:
                d.skipped("outside_mesh_address")
            fallback = Dest(orig[0], orig[1])
        elif host is not None:
            if is_ip(host):
                if self.scope.address(host):
                    watches.append(d.endpoints(schemas.ip_endpoints_key(host, port)))
                else:
                    d.skipped("outside_mesh_address")
            fallback = Dest(host, port)
            if self._is_self(host, port):
                raise HeadError(508, "request loops back to this proxy")
            if self.shared.is_own_address(host, port):
                # An app (or whoever reaches it) must not reach a proxy's admin or inbound
                # port *through* the proxy: that would be a relayed, not a local, request.
                self.metrics.tcp_error("outbound", "self_target")
                raise HeadError(403, "the target is one of the proxy's own ports")
        elif not watches:
            raise HeadError(400, "no authority to route by")
        t = Target(authority or b"", name, port, watches, fallback, d.generation)
        if name is not None:
            # Watched only when the service exists: a name that resolves to nothing costs no watch.
            t.profile = d.profile(*name, after=watches[0])
        return t

    def _is_self(self, host: str, port: int) -> bool:
        lhost, lport = self.listener.address if self.listener.sock else self.cfg.outbound_addr
        return port == lport and host in (lhost, "localhost", "127.0.0.1", "::1", "0.0.0.0")

    # --- HTTP -------------------------------------------------------------------------

    def http_error(self, error: str) -> None:
        self._errors.labels(error).inc()

    def dispatch(self, x: Exchange) -> None:
        """A new request: find its target by its authority, then route it."""
        conn: OutConn = x.conn
        authority = x.authority
        try:
            if authority is not None and authority == conn.last_host and \
                    conn.last_target.generation == self.discovery.generation:
                t = conn.last_target
            else:
                t = self.target_for(authority, conn)
                conn.last_host, conn.last_target = authority, t
        except HeadError as e:
            x.fail(e.status, e.reason, {400: "bad_request", 403: "forbidden"}.get(e.status, "loop"))
            return
        x.target = t
        if x.method == b"CONNECT":
            asyncio.ensure_future(self._connect_tunnel(x, t))
            return
        self.send(x)

    def send(self, x: Exchange) -> None:
        """Route one request (or one more attempt of it): its profile route, then an endpoint."""
        t: Target = x.target
        p = t.profile
        if p is not None and x.route is None:
            p.used = True
            if not p.known:
                self._wait(x, p)
                return
            if p.value is not None and x.upgrade is None:
                self._choose_route(x, t)
        for w in t.watches:
            w.used = True
            if not w.known:
                self._wait(x, w)
                return
            es = w.value
            if es is not None and es.exists:
                self._to_endpoint(x, w, es)
                return
        if t.fallback is None:
            x.count_request(self.default_labels)
            x.fail(503, "no endpoints", "no_endpoints")
            return
        if t.fallback_pool is None:
            t.fallback_pool = self.pools.get(t.fallback)
            t.fallback_labels = self.metrics.labels("outbound", tls="no_identity")
        x.count_request(t.fallback_labels)
        if x.version == 2:  # the app spoke HTTP/2 to a server outside the mesh: h2c on
            if t.fallback_h2 is None:
                t.fallback_h2 = self.pools.h2(t.fallback)
            self._send(x, t.fallback_h2)
            return
        self._send(x, t.fallback_pool)

    def _to_endpoint(self, x: Exchange, w: Watched, es: schemas.EndpointSet) -> None:
        st = x.pick(w.balancer)
        if st is None:
            self._no_endpoint(x, w, es)
            return
        h = st.handle
        if h is None:
            h = st.handle = self._handle(st.endpoint, es)
        x.count_request(h.labels)
        if x.version == 2 or (self.mesh_h2 and h.meshed and x.upgrade is None):
            # HTTP/2 goes on as HTTP/2; to a peer proxy, HTTP/1 too (upgrades excepted): one
            # multiplexed connection, the peer restores HTTP/1 for its app.
            pool = h.h2
            if pool is None:
                pool = h.h2 = self.pools.h2(h.h2_dest)
            self._send(x, pool)
            return
        self._send(x, h.pool)

    # --- fail-fast queueing (proxy/failfast.py decides) ----------------------------------------

    def _no_endpoint(self, x: Exchange, w: Watched, es: schemas.EndpointSet) -> None:
        """The service has no available endpoint: wait for one in its fail-fast queue."""
        def go() -> None:
            if not x.done:
                self.send(x)

        def give_up(why: str, error: str) -> None:
            if not x.done:
                x.count_request(self.metrics.labels("outbound", es.namespace, es.service))
                x.fail(503, f"no endpoints for {es.namespace}/{es.service}:{es.port}: {why}", error)

        verdict = self._gate(w).admit((go, give_up))
        if verdict != WAIT:
            give_up(*self._refusal(verdict))

    def _gate(self, w: Watched) -> Gate:
        gate = w.queue
        if gate is None:
            gate = w.queue = Gate(self.failfast_s, self.cfg.outbound_queue_capacity,
                                  lambda waiter: waiter[1](f"none became available in {self.failfast_s:g}s", "no_endpoints"))
            w.listeners.append(self._endpoints_changed)
        return gate

    def _refusal(self, verdict: str) -> tuple[str, str]:
        if verdict == FAILING:
            return f"in fail-fast (none for {self.failfast_s:g}s)", "failfast"
        return f"{self.cfg.outbound_queue_capacity} requests already wait for one", "queue_full"

    @staticmethod
    def _endpoints_changed(w: Watched) -> None:
        if w.queue is not None and len(w.balancer) > 0:
            for go, _ in w.queue.available():
                go()

    def _handle(self, ep: schemas.Endpoint, es: schemas.EndpointSet) -> EndpointHandle:
        gauge = self._pending_gauge.labels(es.namespace, es.service)
        if gauge.fn is None:
            gauge.set_function(lambda: self.balancer_pending(es.namespace, es.service))
        if ep.identity:
            port = ep.proxy_port or ep.port
            dest = Dest(ep.address, port, ep.identity, ep.port, tph.HTTP1)
            h2_dest = Dest(ep.address, port, ep.identity, ep.port, tph.HTTP2)
            labels = self.metrics.labels("outbound", es.namespace, es.service, "true", server_id=ep.identity)
        else:
            dest = h2_dest = Dest(ep.address, ep.port)
            labels = self.metrics.labels("outbound", es.namespace, es.service, "no_identity")
        return EndpointHandle(dest, self.pools.get(dest), labels, h2_dest, bool(ep.identity))

    def balancer_pending(self, namespace: str, service: str) -> int:
        """Requests in flight to the endpoints of (namespace, service), over all its ports."""
        total = 0
        for w in self.discovery.endpoint_watches():
            es = w.value
            if es is not None and es.namespace == namespace and es.service == service:
                total += sum(st.pending for st in w.balancer.states)
        return total

    def _choose_route(self, x: Exchange, t: Target) -> None:
        """The first route of the target's profile matching (method, path): from here on the
        core keeps the request's deadline, retries and figures; the room arms the timer."""
        sr = t.routes
        if sr is None:  # made only for services that have a profile (never for a stranger's name)
            key = schemas.profile_key(*t.name)
            sr = self._services.get(key)
            if sr is None:
                sr = self._services[key] = ServiceRoutes(key, self.route_stats)
            t.routes = sr
        profile = t.profile.value
        if sr.profile is not profile:
            sr.refresh(profile)
        route = sr.table.match(x.method.decode("latin-1"), x.path.decode("latin-1"))
        x.on_route(route, sr.recorders[route], sr.budget)
        if x.deadline is not None:
            x.timer = self.loop.call_at(x.deadline, x.timed_out)  # discovery waits count too

    @staticmethod
    def _send(x: Exchange, pool) -> None:
        client = pool.take()
        if client is not None:  # the common keep-alive case: no closures, no waiting
            x.attach(client)
            return
        pool.acquire(x.attach, lambda e: x.connect_failed(e.reason, e.error))

    def _wait(self, x: Exchange, w: Watched) -> None:
        """Discovery has not answered for this target yet: wait for it, up to the fail-fast timeout."""
        def ready() -> None:
            timer.cancel()
            if not x.done:
                self.send(x)

        def too_late() -> None:
            w.forget_waiter(ready)
            x.count_request(self.default_labels)
            x.fail(504, f"no answer from discovery for {w.key} in {self.failfast_s:g}s", "discovery_timeout")

        timer = self.loop.call_later(self.failfast_s, too_late)
        w.when_known(ready)

    # --- CONNECT tunnels ------------------------------------------------------------------

    async def _connect_tunnel(self, x: Exchange, t: Target) -> None:
        try:
            dest, labels = await self._resolve_tcp(t)
        except _NoRoute as e:
            x.count_request(e.labels or self.default_labels)
            x.fail(e.status, e.reason, e.error)
            return
        x.count_request(labels)
        try:
            transport, proto = await dial(dest, Buffering, self.shared.client_context, self.cfg.connect_timeout_s)
        except DialError as e:
            x.fail(502, e.reason, e.error)
            return
        x.down.tunnel_ready(x, transport, bytes(proto.data), self._h2_in_tunnel(x.conn))

    def _h2_in_tunnel(self, conn: OutConn):
        """grpcio (and other HTTP/2 clients) behind HTTP_PROXY open a CONNECT tunnel and speak
        h2c inside it: that is parsed like h2c addressed to the proxy, and its requests routed
        and balanced one by one, instead of riding one opaque connection to one endpoint."""
        def guard(s, data: bytes):
            if len(data) < len(detect.H2_PREFACE) and detect.H2_PREFACE.startswith(data):
                return None
            if data.startswith(detect.H2_PREFACE):
                self.loop.call_soon(self._take_tunnel_as_h2, s, data, conn)
                return False
            return True
        return guard

    def _take_tunnel_as_h2(self, s, data: bytes, conn: OutConn) -> None:
        transport, tail = s.release_client()
        if transport is None or transport.is_closing():
            return
        self._count_detect("h2")
        server = self.h2_server(conn)
        transport.set_protocol(server)
        server.connection_made(transport)
        server.data_received(data + tail)

    # --- opaque TCP -----------------------------------------------------------------------

    async def _resolve_tcp(self, t: Target) -> tuple[Dest, Labels]:
        """Pick where one opaque connection goes (per-connection balancing)."""
        for w in t.watches:
            w.used = True
            if not w.known:
                fut = self.loop.create_future()
                w.when_known(lambda: fut.done() or fut.set_result(None))
                try:
                    await asyncio.wait_for(fut, self.failfast_s)
                except asyncio.TimeoutError:
                    raise _NoRoute(504, f"no answer from discovery for {w.key}", "discovery_timeout") from None
            es = w.value
            if es is not None and es.exists:
                st = w.balancer.pick()
                if st is None:  # wait in the service's fail-fast queue, as a request would
                    ready = self.loop.create_future()
                    verdict = self._gate(w).admit((lambda: ready.done() or ready.set_result(None),
                                                   lambda why, error: ready.done() or ready.set_result((why, error))))
                    refused = self._refusal(verdict) if verdict != WAIT else await ready
                    st = w.balancer.pick() if refused is None else None
                    if st is None:
                        why, error = refused or ("none available", "no_endpoints")
                        raise _NoRoute(503, f"no endpoints for {es.namespace}/{es.service}:{es.port}: {why}", error,
                                       self.metrics.labels("outbound", es.namespace, es.service))
                ep = st.endpoint
                if ep.identity:
                    dest = Dest(ep.address, ep.proxy_port or ep.port, ep.identity, ep.port, tph.OPAQUE)
                    return dest, self.metrics.labels("outbound", es.namespace, es.service, "true", server_id=ep.identity)
                return Dest(ep.address, ep.port), self.metrics.labels("outbound", es.namespace, es.service, "no_identity")
        if t.fallback is None:
            raise _NoRoute(503, "no endpoints", "no_endpoints")
        return t.fallback, self.metrics.labels("outbound", tls="no_identity")

    async def _tcp(self, sock: socket.socket, conn: OutConn) -> None:
        self.tunnels += 1
        try:
            try:
                t = self.target_for(None, conn)
                dest, labels = await self._resolve_tcp(t)
                transport, proto = await dial(dest, Buffering, self.shared.client_context, self.cfg.connect_timeout_s)
            except (_NoRoute, DialError) as e:
                self.metrics.tcp_error("outbound", e.error)
                sock.close()
                return
            try:
                client, cproto = await self.loop.connect_accepted_socket(Buffering, sock)
            except OSError:
                transport.close()
                return
            s = splice(client, transport, labels, client_pending=bytes(cproto.data), server_pending=bytes(proto.data))
            self.track(s)
            if cproto.eof:
                s.client.eof_received()
            if proto.eof:
                s.server.eof_received()
        finally:
            self.tunnels -= 1

    # --- lifecycle ------------------------------------------------------------------------

    def track(self, s) -> None:
        self.splices.add(s)
        s.on_close = self.splices.discard



class _NoRoute(Exception):
    def __init__(self, status: int, reason: str, error: str, labels: Labels | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.error = error
        self.labels = labels


def _judge(data: bytes):
    kind = detect.classify(data)
    return None if kind == detect.Kind.NEED_MORE else kind
