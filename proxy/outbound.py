"""The outbound room: the app's own outgoing connections (port 4140).

A connection arrives redirected by iptables (its original destination from
SO_ORIGINAL_DST) or addressed directly, as to an HTTP proxy (absolute-form requests,
CONNECT tunnels). HTTP/1 is routed per request by its authority: a mesh service name
(`svc`, `svc.ns`, `svc.ns.svc[.<cluster-domain>]`) → its endpoint set; else, when
redirected, the original destination's `_ip` endpoint set; else forwarded as is (to the
original destination, or by DNS in proxy mode). Everything else is opaque TCP, balanced
per connection. Endpoints with an identity are reached over mTLS with the transport
header; others over plain TCP.

Errors, as Linkerd's: known service without endpoints → 503; connect failure → 502;
discovery silent for a new target → 504 after FAILFAST_S; opaque TCP: the connection closes.
"""

from __future__ import annotations

import asyncio
import socket

from proxy import detect
from proxy import transport as tph
from proxy.authority import is_ip, mesh_service, split_authority
from proxy.context import Shared
from proxy.discovery import Watched
from proxy.http1.headers import CHUNKED, HeadError, serialize
from proxy.http1.server import Http1Server, Limits, Request
from proxy.listener import EOF, TIMEOUT, Listener, Peeker, adopt, original_dst
from proxy.metrics import Labels
from proxy.tcp import splice
from proxy.upstream import Buffering, DialError, Dest, dial
from proxy.http1.client import Pools
from tulle import schemas
from tulle.log import get_logger

FAILFAST_S = 3.0
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
    """What the room keeps per balanced endpoint: where to dial, its pool, its metric labels."""

    __slots__ = ("dest", "pool", "labels")

    def __init__(self, dest: Dest, pool, labels: Labels):
        self.dest = dest
        self.pool = pool
        self.labels = labels


class Target:
    """A logical destination: an authority (and original destination), resolved via discovery."""

    __slots__ = ("name", "port", "watches", "fallback", "fallback_pool", "fallback_labels", "generation",
                 "profile", "authority")

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
        self.profile: Watched | None = None


class Outbound:
    direction = "outbound"

    def __init__(self, shared: Shared, pools: Pools):
        self.shared = shared
        self.cfg = cfg = shared.cfg
        self.metrics = shared.metrics
        self.discovery = shared.discovery
        self.pools = pools
        self.loop = asyncio.get_event_loop()
        self.limits = Limits(cfg.max_headers, cfg.max_header_bytes, cfg.header_read_timeout_s, cfg.idle_timeout_s)
        self.listener = Listener(cfg.outbound_addr, self._on_socket, name="outbound")
        self.conns: set = set()  # HTTP/1 server connections (for timers and draining)
        self.splices: set = set()  # opaque pairs (tunnels, upgrades, TCP)
        self.tunnels = 0  # opaque connections being set up
        self.default_labels = self.metrics.labels("outbound")
        self._targets: dict[tuple, Target] = {}
        self._errors = self.metrics.http_errors["outbound"]
        self._no_strip = frozenset()

    # --- accepting ---------------------------------------------------------------------

    def start(self) -> None:
        self.listener.start()

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
            adopt(sock, lambda: Http1Server(self, self.limits, self._no_strip, conn))
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
            name = mesh_service(host, self.cfg.namespace, self.cfg.cluster_domain)
        watches: list[Watched] = []
        if name is not None:
            watches.append(d.endpoints(schemas.endpoints_key(name[0], name[1], port)))
        fallback = None
        if orig is not None:
            watches.append(d.endpoints(schemas.ip_endpoints_key(*orig)))
            fallback = Dest(orig[0], orig[1])
        elif host is not None:
            if is_ip(host):
                watches.append(d.endpoints(schemas.ip_endpoints_key(host, port)))
            fallback = Dest(host, port)
            if self._is_self(host, port):
                raise HeadError(508, "request loops back to this proxy")
        elif not watches:
            raise HeadError(400, "no authority to route by")
        t = Target(authority or b"", name, port, watches, fallback, d.generation)
        if name is not None:
            t.profile = d.profile(*name)
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
                server.fail(req, e.status, e.reason, "bad_request" if e.status == 400 else "loop")
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
            server.fail(req, 503, "no endpoints", "no_endpoints")
            return
        if t.fallback_pool is None:
            t.fallback_pool = self.pools.get(t.fallback)
            t.fallback_labels = self.metrics.labels("outbound", tls="no_identity")
        self._count_request(req, t.fallback_labels)
        self._send(server, req, t.fallback_pool)

    def _to_endpoint(self, server: Http1Server, req: Request, t: Target, w: Watched,
                     es: schemas.EndpointSet) -> None:
        st = w.balancer.pick()
        if st is None:
            labels = self.metrics.labels("outbound", es.namespace, es.service)
            self._count_request(req, labels)
            server.fail(req, 503, f"no endpoints for {es.namespace}/{es.service}:{es.port}", "no_endpoints")
            return
        h = st.handle
        if h is None:
            h = st.handle = self._handle(st.endpoint, es, tph.HTTP1)
        self._count_request(req, h.labels)
        if req.route is None:
            req.route = self.choose_route(t, req)
        st.pending += 1
        req.ep = st
        self._send(server, req, h.pool)

    def _handle(self, ep: schemas.Endpoint, es: schemas.EndpointSet, protocol: int) -> EndpointHandle:
        if ep.identity:
            dest = Dest(ep.address, ep.proxy_port or ep.port, ep.identity, ep.port, protocol)
            labels = self.metrics.labels("outbound", es.namespace, es.service, "true", server_id=ep.identity)
        else:
            dest = Dest(ep.address, ep.port)
            labels = self.metrics.labels("outbound", es.namespace, es.service, "no_identity")
        return EndpointHandle(dest, self.pools.get(dest), labels)

    @staticmethod
    def _count_request(req: Request, labels: Labels) -> None:
        if req.labels is None:
            labels.requests.value += 1
        req.labels = labels

    def choose_route(self, t: Target, req: Request):
        """Where the profiles issue plugs in: the route of `t.profile`'s value for
        (req.method, req.target), which then decides timeout, retries and response
        classes. No routes yet: None (default classification, no retry, no timeout)."""
        return None

    def _send(self, server: Http1Server, req: Request, pool) -> None:
        client = pool.take()
        if client is not None:  # the common keep-alive case: no closures, no waiting
            server.forward(req, client)
            return
        pool.acquire(lambda c: server.forward(req, c), lambda e: self._connect_failed(server, req, e))

    def _connect_failed(self, server: Http1Server, req: Request, e: DialError) -> None:
        if req.ep is not None:
            self.answered(req, 502, self.loop.time(), ok=False)
        server.fail(req, 502, e.reason, e.error)

    def answered(self, req: Request, status: int, now: float, ok: bool = True) -> None:
        """The attempt on `req.ep` got its response head (or failed): feed the balancer."""
        st = req.ep
        req.ep = None
        st.pending -= 1
        rtt = now - req.start
        if not ok or status >= 500:
            rtt = max(rtt, st.ewma * 2)
        st.observe(rtt, now)

    def _wait(self, server: Http1Server, req: Request, t: Target, w: Watched) -> None:
        """Discovery has not answered for this target yet: wait for it, up to FAILFAST_S."""
        def ready() -> None:
            timer.cancel()
            if req is server.active and not req.done:
                self._route(server, req, t)

        def too_late() -> None:
            try:
                w._waiters.remove(ready)
            except ValueError:
                pass
            self._count_request(req, self.default_labels)
            server.fail(req, 504, f"no answer from discovery for {w.key} in {FAILFAST_S:g}s", "discovery_timeout")

        timer = self.loop.call_later(FAILFAST_S, too_late)
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
                    await asyncio.wait_for(fut, FAILFAST_S)
                except asyncio.TimeoutError:
                    raise _NoRoute(504, f"no answer from discovery for {w.key}", "discovery_timeout") from None
            es = w.value
            if es is not None and es.exists:
                st = w.balancer.pick()
                if st is None:
                    raise _NoRoute(503, f"no endpoints for {es.namespace}/{es.service}:{es.port}", "no_endpoints",
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

    @property
    def busy(self) -> int:
        """Connections still open or being set up (graceful shutdown waits for them)."""
        return len(self.conns) + len(self.splices) + self.tunnels

    def stop_accepting(self) -> None:
        self.listener.close()

    def drain(self) -> None:
        for s in list(self.conns):
            s.drain()


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
