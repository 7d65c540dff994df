"""The outbound room: the app's own outgoing connections (port 4140).

A connection arrives redirected by iptables (its original destination from
SO_ORIGINAL_DST) or addressed directly, as to an HTTP proxy (absolute-form requests,
CONNECT tunnels). HTTP/1 is routed per request by its authority: a mesh service name
(`svc`, `svc.ns`, `svc.ns.svc[.<cluster-domain>]`) → its endpoint set; else, when
redirected, the original destination's `_ip` endpoint set; else forwarded as is (to the
original destination, or by DNS in proxy mode). Everything else is opaque TCP, balanced
per connection. Endpoints with an identity are reached over mTLS with the transport
header; others over plain TCP.

Errors, as Linkerd's: known service without endpoints → the request waits in the service's
fail-fast queue (proxy/failfast.py) up to the fail-fast timeout for one, then 503; connect
failure → 502; discovery silent for a new target → 504 after the fail-fast timeout; opaque
TCP: the connection closes. Only names and addresses in the mesh's scope are looked up in
discovery (proxy/authority.py MeshScope); the rest are forwarded as they are.

Service profiles (proxy/profiles.py decides, this room acts): a request to a mesh service
that has a profile becomes an `Exchange` on its first matching route (`req.route`). The
route's timeout covers the whole request, retries included (504 when it expires before
a response head reached the caller; the attempt in flight is aborted). A failed attempt
(by the route's response classes, or a connection that failed) of a retryable route is
sent again — to another endpoint when there is one, with `tulle-retry-attempt: <n>` —
when the whole request body was read and kept (≤ 64 KiB), nothing of the response reached
the caller yet, and the service's retry budget allows. Every attempt counts as *actual*,
the answer the caller got as *effective*, in `route_stats` (proxy/route_stats.py).
"""

from __future__ import annotations

import asyncio
import socket

from proxy import detect
from proxy import transport as tph
from proxy.authority import MeshScope, is_ip, split_authority
from proxy.context import Shared
from proxy.discovery import Watched
from proxy.failfast import FAILING, WAIT, Gate
from proxy.limits import Limits
from proxy.http1.headers import CHUNKED, HeadError, serialize
from proxy.http1.server import IDEMPOTENT, Http1Server, Request
from proxy.listener import EOF, TIMEOUT, Peeker, Side, adopt, original_dst
from proxy.metrics import Labels
from proxy.profiles import (
    RETRY_ATTEMPT_HEADER, CompiledRoute, RetryBudget, RouteMetrics, RouteRecorder, RouteStats, RouteTable,
    grpc_status_of, retry_allowed,
)
from proxy.tcp import splice
from proxy.upstream import Buffering, DialError, Dest, dial
from proxy.http1.client import Pools
from tulle import schemas
from tulle.log import get_logger

MAX_TARGETS = 10000  # cached authorities; the cache is cleared when it grows past this

log = get_logger(part="outbound")

_RETRY_HEADER = RETRY_ATTEMPT_HEADER.encode() + b": %d\r\n\r\n"


class OutConn:
    """Facts about one accepted outbound connection."""

    __slots__ = ("peer", "orig", "last_host", "last_target")

    def __init__(self, peer: tuple, orig: tuple[str, int] | None):
        self.peer = peer
        self.orig = orig  # original destination when redirected; None when used as a proxy
        self.last_host: bytes | None = None
        self.last_target: Target | None = None


class EndpointHandle:
    """What the room keeps per balanced endpoint: where to dial, its pool, its metric labels."""

    __slots__ = ("dest", "pool", "labels")

    def __init__(self, dest: Dest, pool, labels: Labels):
        self.dest = dest
        self.pool = pool
        self.labels = labels


class Target:
    """A logical destination: an authority (and original destination), resolved via discovery."""

    __slots__ = ("name", "port", "watches", "fallback", "fallback_pool", "fallback_labels", "generation",
                 "profile", "authority", "routes")

    def __init__(self, authority: bytes, name: tuple[str, str] | None, port: int, watches: list[Watched],
                 fallback: Dest | None, generation: int):
        self.authority = authority
        self.name = name  # (namespace, service) when the authority is a mesh name
        self.port = port
        self.watches = watches  # tried in order: by name, then by IP
        self.fallback = fallback  # where to go when no watch knows a service
        self.fallback_pool = None
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


class Exchange:
    """A request on a profile route, over all its attempts (kept in `Request.route`).

    Http1Server asks it only `is_failure(status)` to classify the response it forwards;
    the rest is this room's: the deadline, the retries, the figures.
    """

    __slots__ = ("route", "recorder", "budget", "timer", "retries", "base_head", "avoid", "sent_at", "finished",
                 "balancer")

    def __init__(self, route: CompiledRoute, recorder: RouteRecorder, budget: RetryBudget):
        self.route = route
        self.recorder = recorder
        self.budget = budget
        self.timer: asyncio.TimerHandle | None = None
        self.retries = 0
        self.base_head = b""  # the head as first sent (a retry adds its attempt header to it)
        self.avoid = None  # the balancer state of the endpoint whose attempt failed last
        self.sent_at = 0.0  # when the current retry was sent
        self.finished = False  # the caller's answer was decided (and counted)
        self.balancer = None  # the balancer the current attempt's endpoint came from

    def is_failure(self, status: int, grpc_status: int | None = None) -> bool:
        return self.route.is_failure(status, grpc_status)

    @property
    def has_timeout(self) -> bool:
        """The route bounds the request's time itself (the response-head timeout steps aside)."""
        return self.route.timeout_s is not None


class Outbound(Side):
    direction = "outbound"

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
        Side.__init__(self, cfg.outbound_addr, self._on_socket, "outbound", max_connections=cfg.max_connections,
                      on_refused=lambda: self.metrics.tcp_error("outbound", "connection_limit"))
        self.default_labels = self.metrics.labels("outbound")
        self._targets: dict[tuple, Target] = {}
        self._errors = self.metrics.http_errors["outbound"]
        # The attempt header is the proxy's to set: an app's own copy never reaches a server.
        self._strip = frozenset({RETRY_ATTEMPT_HEADER.encode()})
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
        self._count_detect("timeout" if verdict is TIMEOUT else "opaque" if verdict is detect.Kind.OPAQUE
                           else "tls" if verdict is detect.Kind.TLS else "h2")
        if verdict is TIMEOUT:
            log.info("protocol detection timed out; forwarding as opaque TCP", after_s=self.cfg.detect_timeout_s)
        if conn.orig is None:
            # Used as a proxy but not speaking HTTP: there is nowhere to send it.
            self.metrics.tcp_error("outbound", "not_http")
            sock.close()
            return
        asyncio.ensure_future(self._tcp(sock, conn))

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

    def dispatch(self, server: Http1Server, req: Request) -> None:
        """Route one request (or one more attempt of it)."""
        conn: OutConn = server.conn
        if req.head:
            t = req.target_info  # a further attempt: same target, maybe another endpoint
        else:
            target = req.target
            authority = req.host
            path = target
            host_override = None
            if req.method == b"CONNECT":
                authority = target
            elif target[:1] != b"/":
                if target[:7].lower() == b"http://":
                    rest = target[7:]
                    slash = rest.find(b"/")
                    authority = rest if slash < 0 else rest[:slash]
                    path = b"/" if slash < 0 else rest[slash:]
                    host_override = authority
                elif target != b"*":
                    req.labels = self.default_labels
                    self.default_labels.requests.value += 1
                    server.fail(req, 400, "absolute-form request target must be http://", "bad_request")
                    return
            try:
                if authority is not None and authority == conn.last_host and \
                        conn.last_target.generation == self.discovery.generation:
                    t = conn.last_target
                else:
                    t = self.target_for(authority, conn)
                    conn.last_host, conn.last_target = authority, t
            except HeadError as e:
                req.labels = self.default_labels
                self.default_labels.requests.value += 1
                server.fail(req, e.status, e.reason,
                            {400: "bad_request", 403: "forbidden"}.get(e.status, "loop"))
                return
            req.target_info = t
            if req.method == b"CONNECT":
                asyncio.ensure_future(self._connect_tunnel(server, req, t))
                return
            first = b"%b %b HTTP/%b\r\n" % (req.method, path, b"1.1" if req.version == "1.1" else b"1.0")
            headers = req.headers
            extra = b""
            if host_override is not None:
                headers = [h for h in headers if h[0].lower() != b"host"]
                extra = b"host: " + host_override + b"\r\n"
            if req.framing == CHUNKED:
                extra += b"transfer-encoding: chunked\r\n"
            if req.upgrade is not None:
                extra += b"connection: upgrade\r\nupgrade: " + req.upgrade + b"\r\n"
            req.head = serialize(first, headers, extra)
        self._route(server, req, t)

    def _route(self, server: Http1Server, req: Request, t: Target) -> None:
        p = t.profile
        if p is not None and req.route is None:
            p.used = True
            if not p.known:
                self._wait(server, req, t, p)
                return
            if p.value is not None and req.upgrade is None:
                req.route = self.choose_route(server, req, t)
        for w in t.watches:
            w.used = True
            if not w.known:
                self._wait(server, req, t, w)
                return
            es = w.value
            if es is not None and es.exists:
                self._to_endpoint(server, req, t, w, es)
                return
        if t.fallback is None:
            self._count_request(req, self.default_labels)
            self._fail(server, req, 503, "no endpoints", "no_endpoints")
            return
        if t.fallback_pool is None:
            t.fallback_pool = self.pools.get(t.fallback)
            t.fallback_labels = self.metrics.labels("outbound", tls="no_identity")
        self._count_request(req, t.fallback_labels)
        self._send(server, req, t.fallback_pool)

    def _to_endpoint(self, server: Http1Server, req: Request, t: Target, w: Watched,
                     es: schemas.EndpointSet) -> None:
        ex = req.route
        if ex is None:
            st = w.balancer.pick()
        else:
            ex.balancer = w.balancer
            st = w.balancer.pick() if ex.avoid is None else w.balancer.pick_other(ex.avoid)
        if st is None:
            self._no_endpoint(server, req, t, w, es)
            return
        h = st.handle
        if h is None:
            h = st.handle = self._handle(st.endpoint, es, tph.HTTP1)
        self._count_request(req, h.labels)
        st.pending += 1
        req.ep = st
        self._send(server, req, h.pool)

    # --- fail-fast queueing (proxy/failfast.py decides) ----------------------------------------

    def _no_endpoint(self, server: Http1Server, req: Request, t: Target, w: Watched, es: schemas.EndpointSet) -> None:
        """The service has no available endpoint: wait for one in its fail-fast queue."""
        def go() -> None:
            if req is server.active and not req.done and not server.closed:
                self._route(server, req, t)

        def give_up(why: str, error: str) -> None:
            if req is server.active and not req.done and not server.closed:
                self._count_request(req, self.metrics.labels("outbound", es.namespace, es.service))
                self._fail(server, req, 503, f"no endpoints for {es.namespace}/{es.service}:{es.port}: {why}", error)

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

    def _handle(self, ep: schemas.Endpoint, es: schemas.EndpointSet, protocol: int) -> EndpointHandle:
        gauge = self._pending_gauge.labels(es.namespace, es.service)
        if gauge.fn is None:
            gauge.set_function(lambda: self.balancer_pending(es.namespace, es.service))
        if ep.identity:
            dest = Dest(ep.address, ep.proxy_port or ep.port, ep.identity, ep.port, protocol)
            labels = self.metrics.labels("outbound", es.namespace, es.service, "true", server_id=ep.identity)
        else:
            dest = Dest(ep.address, ep.port)
            labels = self.metrics.labels("outbound", es.namespace, es.service, "no_identity")
        return EndpointHandle(dest, self.pools.get(dest), labels)

    def balancer_pending(self, namespace: str, service: str) -> int:
        """Requests in flight to the endpoints of (namespace, service), over all its ports."""
        total = 0
        for w in self.discovery.endpoint_watches():
            es = w.value
            if es is not None and es.namespace == namespace and es.service == service:
                total += sum(st.pending for st in w.balancer.states)
        return total

    @staticmethod
    def _count_request(req: Request, labels: Labels) -> None:
        if req.labels is None:
            labels.requests.value += 1
        req.labels = labels

    # --- service profiles: routes, timeouts, retries ---------------------------------------

    def choose_route(self, server: Http1Server, req: Request, t: Target) -> Exchange:
        """The first route of the target's profile matching (method, path), as an Exchange
        that carries the request's deadline, retries and figures from here on."""
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
        route = sr.table.match(req.method.decode("latin-1"), req.target.decode("latin-1"))
        recorder = sr.recorders[route]
        recorder.request()
        sr.budget.deposit()  # every original request earns retries for the whole service
        ex = Exchange(route, recorder, sr.budget)
        timeout = route.timeout_s
        if timeout is not None:
            left = timeout - (self.loop.time() - req.start)  # discovery waits count too
            ex.timer = self.loop.call_later(left if left > 0 else 0, self._timed_out, server, req)
        return ex

    def attempt_answered(self, server: Http1Server, client, req: Request, status: int, headers: list) -> bool:
        """A response head arrived for an attempt of a profile-routed request, before anything
        of it reached the caller. True: the request was sent again and this response is to be
        dropped; False: it is the caller's answer (counted here as the effective outcome)."""
        ex: Exchange = req.route
        now = self.loop.time()
        failed = ex.route.is_failure(status, grpc_status_of(headers) if headers else None)
        ex.recorder.actual(not failed)
        if failed and not ex.finished and req is server.active and not req.done and not server.closed:
            if self._may_retry(ex, req, started=client.interim):
                st = req.ep
                if st is not None:
                    self.answered(req, status, now)
                server.upstream = None  # the client keeps reading this response into nothing
                self._retry(server, req, ex, st)
                return True
        self._finish(ex, req, not failed, now)
        return False

    def attempt_lost(self, server: Http1Server, client, req: Request, reason: str | None) -> bool:
        """The connection of an attempt failed before its response head reached the caller.
        True: sent again; False: the server answers the caller (502, or its own resend of an
        idempotent request whose reused connection the server had closed meanwhile)."""
        ex: Exchange = req.route
        if ex.finished or req.resp_status or req is not server.active or req.done or server.closed:
            return False
        if (client.reused and not client.started and req.replayable and req.attempts < 3
                and req.method in IDEMPOTENT and req.body is not None):
            return False  # a stale keep-alive connection, not a failed attempt (Http1Server resends)
        ex.recorder.actual(False)
        if self._may_retry(ex, req, started=client.interim):
            st = req.ep
            if st is not None:
                self.answered(req, 502, self.loop.time(), ok=False)
            server.upstream = None
            self._retry(server, req, ex, st)
            return True
        self._finish(ex, req, False, self.loop.time())
        return False

    @staticmethod
    def _may_retry(ex: Exchange, req: Request, started: bool) -> bool:
        # The body must have been read whole and kept (an answer before its end makes the
        # request non-retryable), and an upgrade is never sent twice.
        replayable = req.complete and req.replayable and req.body is not None and req.upgrade is None
        return retry_allowed(ex.route, True, replayable, started, ex.budget)

    def _retry(self, server: Http1Server, req: Request, ex: Exchange, failed_on) -> None:
        """Send the request again, preferring another endpoint, with its attempt number."""
        ex.retries += 1
        ex.avoid = failed_on
        if not ex.base_head:
            ex.base_head = req.head
        req.head = ex.base_head[:-2] + _RETRY_HEADER % ex.retries
        ex.sent_at = self.loop.time()
        self._route(server, req, req.target_info)

    def _timed_out(self, server: Http1Server, req: Request) -> None:
        ex: Exchange = req.route
        ex.timer = None
        if ex.finished or req.done or req is not server.active or server.closed:
            return
        up = server.upstream
        if up is not None and up.req is req:
            server.upstream = None
            up.abandon()  # the attempt in flight is cancelled: its server sees the connection go
        now = self.loop.time()
        if req.ep is not None:
            self.answered(req, 504, now, ok=False)
        self._finish(ex, req, False, now)
        server.fail(req, 504, f"route {ex.route.name!r} timed out after {ex.route.timeout_s:g}s", "route_timeout")

    def _finish(self, ex: Exchange, req: Request, success: bool, now: float) -> None:
        """The caller's answer is decided: count it once, stop the deadline."""
        if ex.finished:
            return
        ex.finished = True
        if ex.timer is not None:
            ex.timer.cancel()
            ex.timer = None
        ex.recorder.effective(success, (now - req.start) * 1000)

    def _fail(self, server: Http1Server, req: Request, status: int, reason: str, error: str) -> None:
        """server.fail, counting the failure as the caller's answer on a profile route."""
        ex = req.route
        if ex is not None and not ex.finished and req is server.active and not req.done and not server.closed:
            self._finish(ex, req, False, self.loop.time())
        server.fail(req, status, reason, error)

    # --- sending --------------------------------------------------------------------------

    def _send(self, server: Http1Server, req: Request, pool) -> None:
        client = pool.take()
        if client is not None:  # the common keep-alive case: no closures, no waiting
            server.forward(req, client)
            return
        pool.acquire(lambda c: server.forward(req, c), lambda e: self._connect_failed(server, req, e))

    def _connect_failed(self, server: Http1Server, req: Request, e: DialError) -> None:
        ex = req.route
        if ex is not None and not ex.finished and req is server.active and not req.done and not server.closed:
            ex.recorder.actual(False)  # a connection error is a failed attempt
            # Sent again only to another endpoint: dialling the same one at once again
            # would just spend the budget.
            if req.ep is not None and len(ex.balancer) > 1 and self._may_retry(ex, req, started=False):
                st = req.ep
                self.answered(req, 502, self.loop.time(), ok=False)
                self._retry(server, req, ex, st)
                return
        if req.ep is not None:
            self.answered(req, 502, self.loop.time(), ok=False)
        self._fail(server, req, 502, e.reason, e.error)

    def answered(self, req: Request, status: int, now: float, ok: bool = True) -> None:
        """The attempt on `req.ep` got its response head (or failed): feed the balancer."""
        st = req.ep
        req.ep = None
        st.pending -= 1
        ex = req.route
        rtt = now - (ex.sent_at if ex is not None and ex.retries else req.start)
        if not ok or status >= 500:
            rtt = max(rtt, st.ewma * 2)
        st.observe(rtt, now)

    def abandoned(self, req: Request) -> None:
        """The request ended without an answer that says anything of its endpoint (the
        caller went away, or sent what the proxy refuses mid-way): the attempt no longer
        counts as in flight, and its route deadline is off. Nothing is learnt of latency."""
        st = req.ep
        if st is not None:
            req.ep = None
            st.pending -= 1
        ex = req.route
        if ex is not None and ex.timer is not None:
            ex.timer.cancel()
            ex.timer = None

    def _wait(self, server: Http1Server, req: Request, t: Target, w: Watched) -> None:
        """Discovery has not answered for this target yet: wait for it, up to the fail-fast timeout."""
        def ready() -> None:
            timer.cancel()
            if req is server.active and not req.done:
                self._route(server, req, t)

        def too_late() -> None:
            w.forget_waiter(ready)
            self._count_request(req, self.default_labels)
            self._fail(server, req, 504, f"no answer from discovery for {w.key} in {self.failfast_s:g}s",
                       "discovery_timeout")

        timer = self.loop.call_later(self.failfast_s, too_late)
        w.when_known(ready)

    # --- CONNECT tunnels ------------------------------------------------------------------

    async def _connect_tunnel(self, server: Http1Server, req: Request, t: Target) -> None:
        try:
            dest, labels = await self._resolve_tcp(t)
        except _NoRoute as e:
            self._count_request(req, e.labels or self.default_labels)
            server.fail(req, e.status, e.reason, e.error)
            return
        self._count_request(req, labels)
        try:
            transport, proto = await dial(dest, Buffering, self.shared.client_context, self.cfg.connect_timeout_s)
        except DialError as e:
            server.fail(req, 502, e.reason, e.error)
            return
        server.tunnel_ready(req, transport, bytes(proto.data))

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
