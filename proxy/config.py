"""The proxy's configuration, from environment variables (as the injector and the local
runner set them) — a pure function, so it is tested without starting anything.

Every variable is TULLE_PROXY_<NAME>; `from_env` documents each with its default.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Mapping

from tulle.durations import seconds as _seconds
from tulle.errors import UserError
from tulle.schemas import DEFAULT_CLUSTER_NETWORKS, DEFAULT_POLICIES, identity_name

# Linkerd's default opaque ports (server-speaks-first or TLS-first protocols).
DEFAULT_OPAQUE_PORTS = (25, 587, 3306, 4444, 5432, 6379, 9300, 11211)
PROXY_UID = 2102
MESH_PROTOCOLS = ("h2", "http1")


@dataclass(frozen=True)
class ProxyConfig:
    namespace: str
    workload: str  # the pod's name
    service_account: str = "default"
    trust_domain: str = "cluster.local"
    # Suffix of fully qualified service names (`svc.ns.svc.<cluster_domain>`).
    cluster_domain: str = "cluster.local"
    nats_url: str = "nats://127.0.0.1:4222"
    # CA of NATS's TLS certificate (TULLE_NATS_CA); TLS to the bus when set.
    nats_ca_file: str = ""
    token_file: str = ""
    # The installation's trust anchors (PEM): the only roots this proxy trusts, for its
    # own certificate and its peers'. Never taken from the bus.
    trust_anchors_pem: bytes = b""
    inbound_addr: tuple[str, int] = ("0.0.0.0", 4143)
    outbound_addr: tuple[str, int] = ("127.0.0.1", 4140)
    admin_addr: tuple[str, int] = ("0.0.0.0", 4191)
    # Where inbound traffic is forwarded: the app's own address (its ports are the
    # original destination ports, or the transport header's port).
    app_host: str = "127.0.0.1"
    # Target port for plain inbound connections that were not redirected by iptables
    # (local mode without network namespaces); 0 = refuse them.
    app_default_port: int = 0
    # True when iptables redirects traffic to the proxy (SO_ORIGINAL_DST is meaningful).
    transparent: bool = True
    opaque_ports: frozenset[int] = frozenset(DEFAULT_OPAQUE_PORTS)
    default_inbound_policy: str = "all-unauthenticated"
    # An inbound connection arriving before the workload's first policy waits this long
    # for it, then is judged by the default policy above.
    policy_wait_s: float = 1.0
    cluster_networks: tuple[str, ...] = DEFAULT_CLUSTER_NETWORKS
    detect_timeout_s: float = 10.0
    connect_timeout_s: float = 1.0
    header_read_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    # Upstream HTTP/1 connections idle longer than this are closed (Linkerd: 3 s).
    pool_idle_timeout_s: float = 3.0
    # The same for mTLS connections to peer proxies, which cost a TLS handshake to
    # replace (Linkerd keeps its HTTP/2 connection to a peer for as long as it is used).
    mesh_pool_idle_timeout_s: float = 60.0
    # A discovery watch nobody used for this long is stopped.
    discovery_idle_timeout_s: float = 60.0
    # How HTTP/1 requests travel to a peer proxy: "http1" (a pool of HTTP/1.1 connections
    # per peer) or "h2" — every request on one multiplexed HTTP/2 connection per peer, the
    # caller's protocol restored on the other side (Linkerd's transparent upgrade). HTTP/2
    # and gRPC always travel as HTTP/2. The default is what bench/proxy.py measured: HTTP/1
    # between the proxies carries HTTP/1 traffic with ~25 % less CPU per request here (the
    # HTTP/2 codec's per-frame callbacks cost more than the TLS records they save).
    mesh_protocol: str = "http1"
    max_header_bytes: int = 65536
    max_headers: int = 100
    # --- bounds (proxy/limits.py decides; docs/ARCHITECTURE.md "Bounds") ---
    # Requests read ahead of the one being answered on a connection (HTTP/1 pipelining).
    max_pipelined_requests: int = 16
    # 1xx responses passed on for one request before its final response.
    max_interim_responses: int = 10
    # A request body the client stops sending for this long: 408 (or close once answered).
    request_body_idle_timeout_s: float = 60.0
    # From the request (sent whole) to the response head; a profile route's timeout replaces it.
    response_head_timeout_s: float = 60.0
    # A response body the upstream stops sending for this long: the connection closes.
    response_body_idle_timeout_s: float = 60.0
    # Between proxies: the TLS handshake, then the transport header (or first bytes) after it.
    tls_handshake_timeout_s: float = 10.0
    preamble_timeout_s: float = 10.0
    # Opaque connections (TCP, tunnels, upgrades) with no byte either way for this long close.
    opaque_idle_timeout_s: float = 3600.0
    # Connections open at once on each of the inbound and outbound listeners; beyond it a new
    # one is accepted and closed at once (counted).
    max_connections: int = 10000
    admin_max_connections: int = 64
    # --- discovery ---
    # KV watches (JetStream consumers) this proxy holds at most, endpoints and profiles together.
    discovery_max_watches: int = 200
    # How long a key found absent (or read once because the watch cap was reached) is remembered.
    discovery_absent_ttl_s: float = 5.0
    # Names looked up in discovery: those whose fully qualified form ends with one of these
    # suffixes ("." = every name; default: svc.<cluster-domain>.); other names go by DNS.
    destination_suffixes: tuple[str, ...] = ()
    # Addresses (original destinations, IP authorities) looked up in discovery; others are
    # forwarded as they are (default: the private ranges of DEFAULT_CLUSTER_NETWORKS).
    destination_networks: tuple[str, ...] = ()
    # --- fail-fast (Linkerd's semantics) ---
    # A request to a service without an available endpoint waits this long for one, then 503.
    outbound_failfast_timeout_s: float = 3.0
    inbound_failfast_timeout_s: float = 1.0
    # Requests that may wait at once (per service outbound, per proxy inbound); beyond: 503 at once.
    outbound_queue_capacity: int = 10000
    inbound_queue_capacity: int = 10000
    shutdown_grace_s: float = 120.0
    shutdown_endpoint: bool = False
    log_level: str = "info"

    @property
    def identity(self) -> str:
        return identity_name(self.service_account, self.namespace, self.trust_domain)

    @property
    def profile_suffixes(self) -> tuple[str, ...]:
        return self.destination_suffixes or (f"svc.{self.cluster_domain}.",)

    @property
    def profile_networks(self) -> tuple[str, ...]:
        # Not the policy's cluster networks, which local mode narrows to its pod bridge:
        # service IPs live elsewhere. Linkerd's default is the private ranges too.
        return self.destination_networks or DEFAULT_CLUSTER_NETWORKS


def _addr(value: str, name: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"{name}: expected host:port, got {value!r}")
    return (host.strip("[]") or "0.0.0.0", int(port))


def _ports(value: str, name: str) -> frozenset[int]:
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in value.split(","))):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise UserError(f"{name}: {part!r} is not a port or a port range") from None
        if not (1 <= a <= b <= 65535):
            raise UserError(f"{name}: {part!r} is not a valid port range")
        if b - a > 1024:
            raise UserError(f"{name}: {part!r}: ranges wider than 1024 ports are not supported")
        out.update(range(a, b + 1))
    return frozenset(out)


def _int(value: str, name: str, minimum: int = 1) -> int:
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"{name}: expected a whole number, got {value!r}") from None
    if n < minimum:
        raise UserError(f"{name}: must be at least {minimum}, got {n}")
    return n


def _networks(value: str, name: str) -> tuple[str, ...]:
    networks = tuple(n.strip() for n in value.split(",") if n.strip())
    for n in networks:
        try:
            ipaddress.ip_network(n, strict=False)
        except ValueError:
            raise UserError(f"{name}: {n!r} is not a CIDR") from None
    return networks


def _suffixes(value: str, name: str) -> tuple[str, ...]:
    """DNS suffixes, each ending with a dot ("." alone: every name)."""
    out = []
    for part in (p.strip().lower() for p in value.split(",")):
        if not part:
            continue
        if part != "." and not all(label and len(label) <= 63 for label in part.rstrip(".").split(".")):
            raise UserError(f"{name}: {part!r} is not a DNS suffix")
        out.append(part if part.endswith(".") else part + ".")
    return tuple(out)


def _trust_anchors(env: Mapping[str, str]) -> bytes:
    """TULLE_PROXY_IDENTITY_TRUST_ANCHORS (PEM text, as the injector sets it) or
    TULLE_PROXY_IDENTITY_TRUST_ANCHORS_FILE. Required: a proxy without anchors could trust nothing."""
    from tulle import pki

    pem = env.get("TULLE_PROXY_IDENTITY_TRUST_ANCHORS", "").strip()
    name = "TULLE_PROXY_IDENTITY_TRUST_ANCHORS"
    path = env.get("TULLE_PROXY_IDENTITY_TRUST_ANCHORS_FILE", "")
    if not pem and path:
        name = f"TULLE_PROXY_IDENTITY_TRUST_ANCHORS_FILE {path}"
        try:
            pem = open(path).read().strip()
        except OSError as e:
            raise UserError(f"{name}: cannot read: {e.strerror or e}") from None
    if not pem:
        raise UserError("TULLE_PROXY_IDENTITY_TRUST_ANCHORS (or ..._FILE) must hold the installation's trust anchors (PEM)")
    try:
        if not pki.load_certs(pem):
            raise ValueError("no certificate")
    except ValueError as e:
        raise UserError(f"{name}: not PEM certificates: {e}") from None
    return pem.encode() + b"\n"


def from_env(env: Mapping[str, str] | None = None) -> ProxyConfig:
    env = os.environ if env is None else env

    def get(name: str, default: str = "") -> str:
        return env.get(f"TULLE_PROXY_{name}", default)

    ns, workload = get("NAMESPACE"), get("WORKLOAD")
    if not ns or not workload:
        raise UserError("TULLE_PROXY_NAMESPACE and TULLE_PROXY_WORKLOAD must be set")
    policy = get("DEFAULT_INBOUND_POLICY", "all-unauthenticated")
    if policy not in DEFAULT_POLICIES:
        raise UserError(f"TULLE_PROXY_DEFAULT_INBOUND_POLICY: {policy!r} is not one of {', '.join(DEFAULT_POLICIES)}")
    networks = _networks(get("CLUSTER_NETWORKS", ",".join(DEFAULT_CLUSTER_NETWORKS)), "TULLE_PROXY_CLUSTER_NETWORKS")
    opaque = get("OPAQUE_PORTS", None)
    mesh_protocol = get("MESH_PROTOCOL", "http1").lower()
    if mesh_protocol not in MESH_PROTOCOLS:
        raise UserError(f"TULLE_PROXY_MESH_PROTOCOL: {mesh_protocol!r} is not one of {', '.join(MESH_PROTOCOLS)}")
    return ProxyConfig(
        namespace=ns,
        workload=workload,
        service_account=get("SERVICE_ACCOUNT", "default"),
        trust_domain=get("TRUST_DOMAIN", "cluster.local"),
        cluster_domain=get("CLUSTER_DOMAIN", "cluster.local").strip("."),
        nats_url=env.get("TULLE_NATS_URL", "nats://127.0.0.1:4222"),
        nats_ca_file=env.get("TULLE_NATS_CA", ""),
        token_file=get("TOKEN_FILE"),
        inbound_addr=_addr(get("INBOUND_ADDR", "0.0.0.0:4143"), "TULLE_PROXY_INBOUND_ADDR"),
        outbound_addr=_addr(get("OUTBOUND_ADDR", "127.0.0.1:4140"), "TULLE_PROXY_OUTBOUND_ADDR"),
        admin_addr=_addr(get("ADMIN_ADDR", "0.0.0.0:4191"), "TULLE_PROXY_ADMIN_ADDR"),
        app_host=get("APP_HOST", "127.0.0.1"),
        app_default_port=int(get("APP_DEFAULT_PORT", "0") or 0),
        transparent=get("TRANSPARENT", "true").lower() in ("1", "true", "yes"),
        opaque_ports=_ports(opaque, "TULLE_PROXY_OPAQUE_PORTS") if opaque is not None else frozenset(DEFAULT_OPAQUE_PORTS),
        default_inbound_policy=policy,
        policy_wait_s=_seconds(get("POLICY_WAIT", "1s"), "TULLE_PROXY_POLICY_WAIT"),
        cluster_networks=networks,
        detect_timeout_s=_seconds(get("DETECT_TIMEOUT", "10"), "TULLE_PROXY_DETECT_TIMEOUT"),
        connect_timeout_s=_seconds(get("CONNECT_TIMEOUT", "1"), "TULLE_PROXY_CONNECT_TIMEOUT"),
        header_read_timeout_s=_seconds(get("HEADER_READ_TIMEOUT", "10"), "TULLE_PROXY_HEADER_READ_TIMEOUT"),
        idle_timeout_s=_seconds(get("IDLE_TIMEOUT", "300"), "TULLE_PROXY_IDLE_TIMEOUT"),
        pool_idle_timeout_s=_seconds(get("POOL_IDLE_TIMEOUT", "3"), "TULLE_PROXY_POOL_IDLE_TIMEOUT"),
        mesh_pool_idle_timeout_s=_seconds(get("MESH_POOL_IDLE_TIMEOUT", "60"), "TULLE_PROXY_MESH_POOL_IDLE_TIMEOUT"),
        discovery_idle_timeout_s=_seconds(get("DISCOVERY_IDLE_TIMEOUT", "60"), "TULLE_PROXY_DISCOVERY_IDLE_TIMEOUT"),
        mesh_protocol=mesh_protocol,
        max_header_bytes=_int(get("MAX_HEADER_BYTES", "65536"), "TULLE_PROXY_MAX_HEADER_BYTES", 1024),
        max_headers=_int(get("MAX_HEADERS", "100"), "TULLE_PROXY_MAX_HEADERS"),
        max_pipelined_requests=_int(get("MAX_PIPELINED_REQUESTS", "16"), "TULLE_PROXY_MAX_PIPELINED_REQUESTS"),
        max_interim_responses=_int(get("MAX_INTERIM_RESPONSES", "10"), "TULLE_PROXY_MAX_INTERIM_RESPONSES", 0),
        request_body_idle_timeout_s=_seconds(get("REQUEST_BODY_IDLE_TIMEOUT", "60"),
                                             "TULLE_PROXY_REQUEST_BODY_IDLE_TIMEOUT"),
        response_head_timeout_s=_seconds(get("RESPONSE_HEAD_TIMEOUT", "60"), "TULLE_PROXY_RESPONSE_HEAD_TIMEOUT"),
        response_body_idle_timeout_s=_seconds(get("RESPONSE_BODY_IDLE_TIMEOUT", "60"),
                                              "TULLE_PROXY_RESPONSE_BODY_IDLE_TIMEOUT"),
        tls_handshake_timeout_s=_seconds(get("TLS_HANDSHAKE_TIMEOUT", "10"), "TULLE_PROXY_TLS_HANDSHAKE_TIMEOUT"),
        preamble_timeout_s=_seconds(get("PREAMBLE_TIMEOUT", "10"), "TULLE_PROXY_PREAMBLE_TIMEOUT"),
        opaque_idle_timeout_s=_seconds(get("OPAQUE_IDLE_TIMEOUT", "3600"), "TULLE_PROXY_OPAQUE_IDLE_TIMEOUT"),
        max_connections=_int(get("MAX_CONNECTIONS", "10000"), "TULLE_PROXY_MAX_CONNECTIONS"),
        admin_max_connections=_int(get("ADMIN_MAX_CONNECTIONS", "64"), "TULLE_PROXY_ADMIN_MAX_CONNECTIONS"),
        discovery_max_watches=_int(get("DISCOVERY_MAX_WATCHES", "200"), "TULLE_PROXY_DISCOVERY_MAX_WATCHES", 0),
        discovery_absent_ttl_s=_seconds(get("DISCOVERY_ABSENT_TTL", "5"), "TULLE_PROXY_DISCOVERY_ABSENT_TTL"),
        destination_suffixes=_suffixes(get("DESTINATION_PROFILE_SUFFIXES", ""),
                                       "TULLE_PROXY_DESTINATION_PROFILE_SUFFIXES"),
        destination_networks=_networks(get("DESTINATION_PROFILE_NETWORKS", ""),
                                       "TULLE_PROXY_DESTINATION_PROFILE_NETWORKS"),
        outbound_failfast_timeout_s=_seconds(get("OUTBOUND_FAILFAST_TIMEOUT", "3"),
                                             "TULLE_PROXY_OUTBOUND_FAILFAST_TIMEOUT"),
        inbound_failfast_timeout_s=_seconds(get("INBOUND_FAILFAST_TIMEOUT", "1"), "TULLE_PROXY_INBOUND_FAILFAST_TIMEOUT"),
        outbound_queue_capacity=_int(get("OUTBOUND_QUEUE_CAPACITY", "10000"), "TULLE_PROXY_OUTBOUND_QUEUE_CAPACITY", 0),
        inbound_queue_capacity=_int(get("INBOUND_QUEUE_CAPACITY", "10000"), "TULLE_PROXY_INBOUND_QUEUE_CAPACITY", 0),
        shutdown_grace_s=_seconds(get("SHUTDOWN_GRACE_PERIOD", "120"), "TULLE_PROXY_SHUTDOWN_GRACE_PERIOD"),
        shutdown_endpoint=get("SHUTDOWN_ENDPOINT", "false").lower() in ("1", "true", "yes"),
        log_level=get("LOG_LEVEL", env.get("TULLE_LOG_LEVEL", "info")),
        trust_anchors_pem=_trust_anchors(env),  # last: a plain config error is named first
    )
