"""The inbound room: connections to the app (port 4143).

Three kinds arrive. A TLS ClientHello naming this proxy's identity (SNI) is a peer proxy:
the proxy terminates mTLS, takes the client's identity from its verified certificate, and
with ALPN `tulle/1` reads the transport header (target port, protocol) instead of
detecting. A ClientHello naming anything else is the app's own TLS: passed through
opaque. Plain connections come from outside the mesh: HTTP/1 and HTTP/2 (h2c prior
knowledge) are detected, anything else forwarded opaque. The target port is the transport
header's, else the original destination's (iptables), else `app_default_port`.

HTTP requests — HTTP/1 or HTTP/2, from a peer or from outside — lose any `tulle-client-id`
they carry (in every folded spelling) and get it set from the verified identity. Each
request is an `Exchange` (proxy/exchange.py) sent to the app in its caller's protocol:
HTTP/2 as h2c, HTTP/1 as HTTP/1 — also when the peer proxy carried it over HTTP/2 and named
it in `tulle-orig-proto` (believed from verified peers only).

Authorization (tulle/policy.py's `InboundPolicy`, kept current by proxy/policy_watch.py):
- HTTP: `decide_request` for every request, so a policy change applies to the next
  request on a connection already open and probe paths pass on a port that admits no one
  else; denied → 403 with `tulle-proxy-error` (gRPC: PERMISSION_DENIED, trailers-only);
  the connection stays usable.
- opaque TCP and passed-through TLS: `decide_connection` once, when the target port is
  known; denied → closed at once, before the app is dialled. When the policy changes,
  open opaque connections are judged again and those now denied are closed (Linkerd:
  policy changes may abruptly end existing TCP connections).
- a port whose Server says `proxyProtocol: opaque` (or `TLS`) is not parsed, like a port
  in TULLE_PROXY_OPAQUE_PORTS.
Every decision is counted (proxy/policy_metrics.py); denials become rate-limited
`proxy.denied` CloudEvents.
"""

from __future__ import annotations

import asyncio
import socket

from proxy import detect
from proxy import transport as tph
from proxy.context import Shared
from proxy.exchange import Exchange
from proxy.http1.headers import CLIENT_ID
from proxy.http1.server import Http1Server
from proxy.http2.fields import ORIG_PROTO
from proxy.http2.server import H2Server
from proxy.http2.session import H2Config
from proxy.limits import Limits
from proxy.listener import EOF, TIMEOUT, Peeker, Side, adopt, original_dst
from proxy.metrics import Labels
from proxy.policy_metrics import DenialReporter, PolicyMetrics
from proxy.pools import Pools
from proxy.tcp import Splice, splice
from proxy.upstream import Buffering, DialError, Dest, dial
from tulle.log import get_logger
from tulle.pki import ALPN_PROXY, peer_identity
from tulle.policy import Decision, InboundPolicy

# On opaque ports HTTP is never detected, but a peer proxy's mTLS still has to be told
# from plain bytes; a peer sends its ClientHello at once, so a short wait is enough and
# keeps server-speaks-first clients from outside the mesh from stalling long.
OPAQUE_TLS_WAIT_S = 1.0
# Fields only a proxy sets: any copy from a client is removed, in every folded spelling.
STRIP = frozenset({CLIENT_ID, ORIG_PROTO})
# Server proxyProtocols whose bytes the proxy must not parse.
UNPARSED_PROTOCOLS = frozenset({"opaque", "TLS"})
# Server proxyProtocols that admit HTTP only (anything else on such a port is refused).
H2_PROTOCOLS = frozenset({"HTTP/2", "gRPC"})
HTTP_PROTOCOLS = frozenset({"HTTP/1"}) | H2_PROTOCOLS

log = get_logger(part="inbound")


def forbidden_reason(decision: Decision) -> str:
    """The tulle-proxy-error of a denial: which Server refused, not why (that is for logs)."""
    return f"unauthorized request on server {decision.server}"


class InConn:
    """Facts about one accepted inbound connection, fixed once its target port is known."""

    __slots__ = ("client_ip", "port", "client_id", "tls", "labels", "pool", "h2pool", "extra", "generation")

    def __init__(self, client_ip: str, port: int):
        self.client_ip = client_ip
        self.port = port
        self.client_id: str | None = None
        self.tls = False
        self.labels: Labels | None = None
        self.pool = None  # HTTP/1.1 connections to the app's port
        self.h2pool = None  # HTTP/2 (h2c) connections to it
        self.extra: list | None = None  # fields added to every request: the verified client identity
        self.generation = -1  # the policy generation an opaque connection was last allowed under


class Inbound(Side):
    direction = "inbound"
    absolute_form = False

    def __init__(self, shared: Shared, pools: Pools, policy: InboundPolicy | None = None,
                 denials: DenialReporter | None = None, policy_received: asyncio.Event | None = None):
        self.shared = shared
        self.cfg = cfg = shared.cfg
        self.metrics = shared.metrics
        self.pools = pools
        # Read on every decision, never cached: `update` swaps what it holds at once.
        self.policy = policy if policy is not None else InboundPolicy(cfg.default_inbound_policy, cfg.cluster_networks)
        self.authz = PolicyMetrics(self.metrics.registry)
        self.denials = denials
        # Set once the workload's own policy arrived; None: the policy given is final (tests).
        self.policy_received = policy_received
        self.opaque_conns: dict[Splice, InConn] = {}  # open opaque pairs, judged again on a policy change
        self.loop = asyncio.get_event_loop()
        self.limits = Limits.from_config(cfg)
        self.h2_config = H2Config()
        Side.__init__(self, cfg.inbound_addr, self._on_socket, "inbound", max_connections=cfg.max_connections,
                      on_refused=lambda: self.metrics.tcp_error("inbound", "connection_limit"))
        self.waiting_for_app = 0  # requests waiting for the app to accept connections (fail-fast)
        self.default_labels = self.metrics.labels("inbound", cfg.namespace)
        self._errors = self.metrics.http_errors["inbound"]

    # --- accepting ---------------------------------------------------------------------

    def _on_socket(self, sock: socket.socket, peer: tuple) -> None:
        waiting = self.policy_received
        if waiting is not None and not waiting.is_set():
            # Before the workload's first policy: hold the connection briefly, then judge it
            # by the configured default (a `deny` workload answers no one meanwhile).
            asyncio.ensure_future(self._after_policy(sock, peer, waiting))
            return
        self._accepted(sock, peer)

    async def _after_policy(self, sock: socket.socket, peer: tuple, waiting: asyncio.Event) -> None:
        try:
            await asyncio.wait_for(waiting.wait(), self.cfg.policy_wait_s)
        except asyncio.TimeoutError:
            self.metrics.tcp_error("inbound", "policy_not_received")
        try:
            self._accepted(sock, peer)
        except Exception:
            log.exception("inbound connection failed")
            sock.close()

    def _accepted(self, sock: socket.socket, peer: tuple) -> None:
        port = self.cfg.app_default_port
        if self.cfg.transparent:
            orig = original_dst(sock)
            if orig is not None and orig != sock.getsockname()[:2]:
                port = orig[1]
        conn = InConn(peer[0], port)
        if self._refuse_self_target(conn.port, conn.client_ip):
            sock.close()
            return
        opaque = port in self.cfg.opaque_ports or self.policy.protocol(port) in UNPARSED_PROTOCOLS
        judge = _judge_tls_only if opaque else _judge
        timeout = min(OPAQUE_TLS_WAIT_S, self.cfg.detect_timeout_s) if opaque else self.cfg.detect_timeout_s
        Peeker(sock, judge, lambda verdict, data: self._detected(sock, conn, verdict, opaque, data), timeout)

    def _refuse_self_target(self, port: int, client_ip: str) -> bool:
        """The proxy forwards only to its app: never to one of its own ports (outbound,
        inbound, admin, ...), which would relay a stranger's connection as this workload or
        into its admin server. Counted and logged."""
        if port not in self.shared.own_ports:
            return False
        self.metrics.tcp_error("inbound", "self_target")
        log.warning("refused a connection aimed at one of the proxy's own ports", port=port, client_ip=client_ip)
        return True

    def _detected(self, sock: socket.socket, conn: InConn, verdict, opaque: bool, data: bytes = b"") -> None:
        if verdict is EOF:
            sock.close()
            return
        declared = self.policy.protocol(conn.port)
        if verdict is TIMEOUT and not opaque and data and detect.classify(data) == detect.Kind.NEED_MORE:
            # A request line still arriving when detection gave up is HTTP all the same: its
            # headers must not reach the app unparsed (the HTTP server's own timeout applies).
            verdict = detect.Kind.HTTP1
        if isinstance(verdict, detect.ClientHello):
            if verdict.valid and verdict.sni == self.cfg.identity:
                ctx = self.shared.identity.server_context
                if ctx is None:  # not certified yet: refuse rather than accept unverified TLS
                    self._count("tls-not-ready")
                    self.metrics.tcp_error("inbound", "tls_not_ready")
                    sock.close()
                    return
                self._count("mtls")
                adopt(sock, lambda: _TlsPreamble(self, conn), ssl=ctx, handshake_timeout=self.cfg.tls_handshake_timeout_s,
                      on_error=self._handshake_failed)
                return
            if not opaque and declared in HTTP_PROTOCOLS:
                self._refuse("protocol_mismatch", conn)  # a Server said this port speaks HTTP
                sock.close()
                return
            self._count("tls")  # the app's own TLS
            conn.labels = self.metrics.labels("inbound", self.cfg.namespace, tls="opaque")
            self._opaque(sock, conn)
            return
        if not opaque:
            if verdict is detect.Kind.HTTP1 and declared not in H2_PROTOCOLS:
                self._count("http/1")
                conn.labels = self.metrics.labels("inbound", self.cfg.namespace)
                self._prepare_http(conn)
                adopt(sock, lambda: Http1Server(self, self.limits, STRIP, conn))
                return
            if verdict is detect.Kind.H2 and declared != "HTTP/1":
                # h2c from outside the mesh: parsed like HTTP/1, so the app gets no identity
                # the proxy did not verify.
                self._count("h2")
                conn.labels = self.metrics.labels("inbound", self.cfg.namespace)
                self._prepare_http(conn)
                adopt(sock, lambda: self.h2_server(conn))
                return
            if verdict in (detect.Kind.HTTP1, detect.Kind.H2) or declared in HTTP_PROTOCOLS:
                self._refuse("protocol_mismatch", conn)  # a Server said this port speaks another HTTP
                sock.close()
                return
        self._count("timeout" if verdict is TIMEOUT and not opaque else "opaque")
        conn.labels = self.metrics.labels("inbound", self.cfg.namespace)
        self._opaque(sock, conn, guarded=not opaque)

    def _count(self, protocol: str) -> None:
        self.metrics.detect_total.labels("inbound", protocol).inc()

    def _refuse(self, error: str, conn: InConn) -> None:
        self.metrics.tcp_error("inbound", error)
        log.info("refused an inbound connection", error=error, port=conn.port, client_ip=conn.client_ip,
                 client_id=conn.client_id or "")

    def _first_bytes_guard(self, conn: InConn):
        """For a connection passed opaque on a port that is not declared opaque: judge the
        client's first bytes before any reaches the app. HTTP — HTTP/1 sent too slowly to be
        detected, or either HTTP version a peer declared opaque — is taken back and served as
        HTTP, so the app gets a tulle-client-id it can trust."""
        declared = self.policy.protocol(conn.port)

        def guard(s: Splice, data: bytes):
            kind = detect.classify(data)
            if s.server.read and kind != detect.Kind.H2 and not detect.H2_PREFACE.startswith(data[:24]):
                # The app spoke first: a server-first protocol, not HTTP (HTTP/2 servers speak
                # first too — their SETTINGS — which is why the preface is still looked for).
                return declared not in HTTP_PROTOCOLS or self._refuse_later(s, "protocol_mismatch", conn)
            if kind == detect.Kind.NEED_MORE and len(data) < detect.MAX_REQUEST_LINE:
                # Held until the line ends: letting an unfinished request line through unparsed
                # is exactly how a slow client would smuggle headers past the proxy.
                return None
            if kind in (detect.Kind.HTTP1, detect.Kind.NEED_MORE) and declared not in H2_PROTOCOLS:
                self.loop.call_soon(self._take_back_as_http, s, data, conn, False)
                return False
            if kind == detect.Kind.H2 and declared != "HTTP/1":
                self.loop.call_soon(self._take_back_as_http, s, data, conn, True)
                return False
            if kind in (detect.Kind.HTTP1, detect.Kind.H2, detect.Kind.NEED_MORE) or declared in HTTP_PROTOCOLS:
                return self._refuse_later(s, "protocol_mismatch", conn)
            return True

        return guard

    def _refuse_later(self, s: Splice, error: str, conn: InConn) -> bool:
        self._refuse(error, conn)
        self.loop.call_soon(s.abort)
        return False

    def _take_back_as_http(self, s: Splice, data: bytes, conn: InConn, h2: bool) -> None:
        transport, tail = s.release_client()
        if transport is None or transport.is_closing():
            return
        data += tail
        self._count("h2" if h2 else "http/1")
        self._prepare_http(conn)
        server = self.h2_server(conn) if h2 else Http1Server(self, self.limits, STRIP, conn)
        transport.set_protocol(server)
        server.connection_made(transport)
        server.data_received(data)

    def h2_server(self, conn: InConn, preface: bytes = b"") -> H2Server:
        """HTTP/2 to the app's port: from a verified peer proxy its orig-proto field is believed
        (the app behind it asked in HTTP/1); from anyone else it is removed."""
        return H2Server(self, conn, self.h2_config, STRIP, trust_orig_proto=conn.client_id is not None,
                        preface=preface, count_error=lambda reason: self.metrics.http2_error("inbound", "src", reason))

    def _handshake_failed(self, exc: BaseException) -> None:
        # The loop reports its handshake timeout as an aborted connection ("SSL handshake is
        # taking longer than ...").
        timed_out = isinstance(exc, (TimeoutError, asyncio.TimeoutError)) or "longer than" in str(exc)
        self.metrics.tcp_error("inbound", "tls_handshake_timeout" if timed_out else "tls_handshake")
        log.debug("inbound TLS handshake failed", error=str(exc) or type(exc).__name__)

    def _allow_connection(self, conn: InConn) -> bool:
        """An opaque connection (HTTP is judged per request): allowed to reach the app?"""
        policy = self.policy
        generation = policy.generation
        d = policy.decide_connection(conn.port, conn.client_ip, conn.client_id, conn.tls)
        self.authz.count("tcp", conn.port, d, conn.client_id)
        if d.allowed:
            conn.generation = generation
            return True
        self._denied("tcp", conn, d)
        return False

    def _denied(self, protocol: str, conn: InConn, d: Decision) -> None:
        if protocol == "tcp":
            self.metrics.tcp_error("inbound", "forbidden")
        if self.denials is not None and self.denials.report(protocol, conn.port, d, conn.client_ip, conn.client_id):
            # Logged as often as events go out: a flood of denials cannot flood the log.
            log.info("denied", protocol=protocol, port=conn.port, server=d.server, client_ip=conn.client_ip,
                     client_id=conn.client_id or "", reason=d.reason)

    def policy_changed(self) -> None:
        """The policy was updated: close the open opaque connections it no longer allows.

        HTTP needs nothing here: every request is judged with the policy of its moment.
        """
        generation = self.policy.generation
        for s, conn in list(self.opaque_conns.items()):
            if conn.generation != generation and not self._still_allowed(conn):
                log.info("closing a connection the new policy denies", port=conn.port, client_ip=conn.client_ip,
                         client_id=conn.client_id or "")
                s.abort()

    def _still_allowed(self, conn: InConn) -> bool:
        """Judge an open opaque connection again; only a denial is counted (the allow was)."""
        policy = self.policy
        generation = policy.generation
        d = policy.decide_connection(conn.port, conn.client_ip, conn.client_id, conn.tls)
        if d.allowed:
            conn.generation = generation
            return True
        self.authz.count("tcp", conn.port, d, conn.client_id)
        self._denied("tcp", conn, d)
        return False

    def _prepare_http(self, conn: InConn) -> None:
        if conn.port == 0:
            conn.pool = conn.h2pool = None
        else:
            dest = Dest(self.cfg.app_host, conn.port)
            conn.pool = self.pools.get(dest)
            conn.h2pool = self.pools.h2(dest)
        if conn.client_id:
            conn.extra = [(CLIENT_ID, conn.client_id.encode())]

    def _opaque(self, sock: socket.socket, conn: InConn, guarded: bool = False) -> None:
        if conn.port == 0:
            self.metrics.tcp_error("inbound", "no_target_port")
            sock.close()
            return
        if not self._allow_connection(conn):
            sock.close()
            return
        asyncio.ensure_future(self._tcp_from_socket(sock, conn, guarded))

    async def _dial_app(self, conn: InConn):
        """(transport, Buffering protocol) to the app's port for an opaque connection, or
        None when the app cannot be reached (counted)."""
        try:
            return await dial(Dest(self.cfg.app_host, conn.port), Buffering, lambda: None, self.cfg.connect_timeout_s)
        except DialError as e:
            self.metrics.tcp_error("inbound", e.error)
            return None

    async def _tcp_from_socket(self, sock: socket.socket, conn: InConn, guarded: bool = False) -> None:
        self.tunnels += 1
        try:
            dialled = await self._dial_app(conn)
            if dialled is None:
                sock.close()
                return
            up, proto = dialled
            try:
                client, cproto = await self.loop.connect_accepted_socket(Buffering, sock)
            except OSError:
                up.close()
                return
            guard = self._first_bytes_guard(conn) if guarded else None
            s = splice(client, up, conn.labels, server_pending=bytes(proto.data), guard=guard)
            if not self.track(s, conn):
                return
            if cproto.data:
                s.client.data_received(bytes(cproto.data))  # after tracking: the guard may hand it on
            if not s.client.closed and cproto.eof:
                s.client.eof_received()
        finally:
            self.tunnels -= 1

    async def _tcp_from_transport(self, transport: asyncio.Transport, pending: bytes, conn: InConn,
                                  guarded: bool = False) -> None:
        """Opaque forwarding of an already terminated (mTLS) connection."""
        self.tunnels += 1
        try:
            dialled = await self._dial_app(conn)
            if dialled is None:
                transport.close()
                return
            up, proto = dialled
            if transport.is_closing():
                up.close()
                return
            guard = self._first_bytes_guard(conn) if guarded else None
            s = splice(transport, up, conn.labels, server_pending=bytes(proto.data), guard=guard)
            if self.track(s, conn) and pending:
                s.client.data_received(pending)
        finally:
            self.tunnels -= 1

    # --- HTTP -------------------------------------------------------------------------

    def http_error(self, error: str) -> None:
        self._errors.labels(error).inc()

    def dispatch(self, x: Exchange) -> None:
        """A request from outside: judged by the policy of its moment, then sent to the app."""
        conn: InConn = x.conn
        x.count_request(conn.labels)
        if x.method == b"CONNECT":
            x.fail(405, "CONNECT is not accepted inbound", "bad_request")
            return
        if x.version == 2:
            declared = self.policy.protocol(conn.port)
            # A peer's HTTP/2 connection carries both: each request is held to what a Server
            # declares for the port (HTTP/1 restored from orig-proto, or HTTP/2 and gRPC).
            if declared in HTTP_PROTOCOLS and (declared == "HTTP/1") != (x.orig_proto is not None):
                x.fail(400, f"port {conn.port} is declared {declared}", "protocol_mismatch")
                return
        d = self.policy.decide_request(conn.port, conn.client_ip, conn.client_id, conn.tls,
                                       x.method.decode("latin-1"), x.path.decode("latin-1"))
        self.authz.count("http", conn.port, d, conn.client_id)
        if not d.allowed:
            self._denied("http", conn, d)
            x.fail(403, forbidden_reason(d), "forbidden")
            return
        if conn.pool is None:
            x.fail(502, "no target port for this connection", "no_target_port")
            return
        x.extra = conn.extra
        self.send(x)

    def send(self, x: Exchange) -> None:
        """To the app (again, when a stale keep-alive connection swallowed the request), in the
        protocol its caller used: HTTP/2 as HTTP/2, HTTP/1 — also when a peer proxy carried it
        over HTTP/2 (orig-proto) — as HTTP/1."""
        conn = x.conn
        pool = conn.h2pool if x.version == 2 and x.orig_proto is None else conn.pool
        client = pool.take()
        if client is not None:  # the common keep-alive case: no closures, no waiting
            x.attach(client)
            return
        pool.acquire(x.attach, lambda e: self._app_unavailable(x, pool, e))

    def _app_unavailable(self, x: Exchange, pool, e: DialError, waited: list | None = None) -> None:
        """The app did not take a connection. Refused — it is starting or restarting: the
        request waits for it up to the inbound fail-fast timeout, trying again, then 503
        (Linkerd's inbound fail-fast). Any other failure: 502 at once."""
        cfg = self.cfg
        if waited is None:
            if e.error != "connect_refused" or cfg.inbound_failfast_timeout_s <= 0:
                x.connect_failed(e.reason, e.error)
                return
            if self.waiting_for_app >= cfg.inbound_queue_capacity:
                x.fail(503, f"{e.reason}; {cfg.inbound_queue_capacity} requests already wait for the app",
                       "queue_full")
                return
            self.waiting_for_app += 1
            waited = [0.025]  # the next pause between attempts
        left = x.started + cfg.inbound_failfast_timeout_s - self.loop.time()
        if x.done or left <= 0 or e.error != "connect_refused":
            self.waiting_for_app -= 1
            if left <= 0 and e.error == "connect_refused":
                x.fail(503, f"{e.reason} for {cfg.inbound_failfast_timeout_s:g}s (fail-fast)", "failfast")
            else:
                x.connect_failed(e.reason, e.error)  # does nothing when the caller is gone
            return
        waited[0] = min(waited[0] * 2, 0.25)

        def again() -> None:
            def ready(c) -> None:
                self.waiting_for_app -= 1
                x.attach(c)
            pool.acquire(ready, lambda e2: self._app_unavailable(x, pool, e2, waited))
        self.loop.call_later(min(waited[0], left), again)

    # --- lifecycle ------------------------------------------------------------------------

    def track(self, s: Splice, conn: InConn | None = None) -> bool:
        """An opaque pair is open; with `conn`, it is a connection policy judges (not an
        upgrade). False when it was closed at once."""
        self.splices.add(s)
        if conn is None:
            s.on_close = self.splices.discard
            return True
        self.opaque_conns[s] = conn
        s.on_close = self._opaque_closed
        if conn.generation != self.policy.generation and not self._still_allowed(conn):
            s.abort()  # the policy changed while the app was being dialled
            return False
        return True

    def _opaque_closed(self, s: Splice) -> None:
        self.splices.discard(s)
        self.opaque_conns.pop(s, None)



class _TlsPreamble(asyncio.Protocol):
    """A terminated mTLS connection before it is known what it carries.

    With ALPN tulle/1 the first 8 bytes are the transport header; otherwise the first
    bytes are classified like a plain connection's. Either must arrive within
    `preamble_timeout_s` of the handshake, or the connection is closed (counted).
    """

    def __init__(self, room: Inbound, conn: InConn):
        self.room = room
        self.conn = conn
        self.transport = None
        self.buf = b""
        self.tulle = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        room, conn = self.room, self.conn
        ssl_object = transport.get_extra_info("ssl_object")
        conn.tls = True
        conn.client_id = peer_identity(ssl_object)
        # The transport header names a target port: only a peer proxy that proved who it
        # is (a verified client certificate) may choose one.
        self.tulle = ssl_object is not None and ssl_object.selected_alpn_protocol() == ALPN_PROXY
        if self.tulle and conn.client_id is None:
            room._refuse("transport_header_unauthenticated", conn)
            transport.abort()
            return
        tls_label = "true" if conn.client_id else "no_identity"
        conn.labels = room.metrics.labels("inbound", room.cfg.namespace, tls=tls_label, client_id=conn.client_id or "")
        if room.cfg.preamble_timeout_s > 0:
            self.timer = room.loop.call_later(room.cfg.preamble_timeout_s, self._too_slow)

    def _too_slow(self) -> None:
        self.timer = None
        self.room._refuse("preamble_timeout", self.conn)
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        room, conn = self.room, self.conn
        if self.tulle:
            if len(self.buf) < tph.SIZE:
                return
            try:
                port, protocol = tph.decode(self.buf)
            except tph.TransportHeaderError as e:
                room.metrics.tcp_error("inbound", "transport_header")
                log.info("bad transport header from a peer", error=str(e), client_id=conn.client_id)
                self.transport.abort()
                return
            if room._refuse_self_target(port, conn.client_ip):
                self.transport.abort()
                return
            conn.port = port
            rest = self.buf[tph.SIZE:]
            http = protocol == tph.HTTP1
            h2 = protocol == tph.HTTP2
        else:
            kind = detect.classify(self.buf)
            if kind == detect.Kind.NEED_MORE and len(self.buf) < detect.MAX_REQUEST_LINE:
                return
            rest = self.buf
            http = kind == detect.Kind.HTTP1
            h2 = kind == detect.Kind.H2
        self.buf = b""
        if self.timer is not None:  # judged: what carries the connection on has its own bounds
            self.timer.cancel()
            self.timer = None
        declared = room.policy.protocol(conn.port)
        opaque = conn.port in room.cfg.opaque_ports or declared in UNPARSED_PROTOCOLS
        # HTTP/2 from a peer proxy may carry HTTP/1 requests (orig-proto): judged per request.
        peer_h2 = h2 and self.tulle
        if (http and declared in H2_PROTOCOLS) or (h2 and declared == "HTTP/1" and not peer_h2):
            room._refuse("protocol_mismatch", conn)
            self.transport.abort()
            return
        if http or h2:
            room._prepare_http(conn)
            server = room.h2_server(conn) if h2 else Http1Server(room, room.limits, STRIP, conn)
            self.transport.set_protocol(server)
            server.connection_made(self.transport)
            if rest:
                server.data_received(rest)
            return
        if conn.port == 0:
            room.metrics.tcp_error("inbound", "no_target_port")
            self.transport.close()
            return
        if not room._allow_connection(conn):
            self.transport.close()
            return
        self.transport.pause_reading()
        asyncio.ensure_future(room._tcp_from_transport(self.transport, rest, conn, guarded=not opaque))

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _judge(data: bytes):
    kind = detect.classify(data)
    if kind == detect.Kind.TLS:
        hello = detect.client_hello(data)
        return hello if hello.complete else None
    return None if kind == detect.Kind.NEED_MORE else kind


def _judge_tls_only(data: bytes):
    if data[:1] == b"\x16":
        return _judge(data)
    return detect.Kind.OPAQUE
