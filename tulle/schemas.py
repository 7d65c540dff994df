"""The messages on the bus: one dataclass per KV value or subject, shared by writer and reader.

Names of buckets, subjects and keys are fixed in DESIGN.md; they are defined here once.
Every message carries a schema version `v`; `tulle.codec.decode` refuses any other.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from tulle.codec import DecodeError, decode, encode  # noqa: F401  (re-exported for callers)

# --- buckets and subjects (DESIGN.md, "The bus") ---------------------------------------

ENDPOINTS_BUCKET = "tulle-endpoints"
PROFILES_BUCKET = "tulle-profiles"
POLICY_BUCKET = "tulle-policy"
IDENTITY_BUCKET = "tulle-identity"
PROXIES_BUCKET = "tulle-proxies"
LEASES_BUCKET = "tulle-leases"  # leader election of destination / policy replicas

TRUST_BUNDLE_KEY = "trust-bundle"
CERTIFY_SUBJECT = "tulle.identity.v1.certify"
CERTIFY_QUEUE = "identity"
EVENTS_STREAM = "TULLE_EVENTS"
EVENTS_PREFIX = "tulle.events"
# Scatter-gather of per-proxy statistics (`tulle routes`): every proxy answers.
PROXY_STATS_SUBJECT = "tulle.proxy.v1.stats"
# Golden metrics per traffic edge (`tulle stat`, `tulle edges`, the dashboard): TrafficRequest in,
# one TrafficReply per proxy out (scatter-gather, as PROXY_STATS_SUBJECT).
PROXY_TRAFFIC_SUBJECT = "tulle.proxy.v1.traffic"

PROXY_HEARTBEAT_TTL_S = 15.0  # tulle-proxies entries expire after this without a heartbeat


def endpoints_key(namespace: str, service: str, port: int) -> str:
    return f"{namespace}.{service}.{port}"


def ip_endpoints_key(ip: str, port: int) -> str:
    """Key of the endpoint set reachable at a cluster IP, for proxies that only see IP:port.

    The `_ip` prefix cannot collide with a namespace (DNS labels have no `_`); IPv6
    colons, not allowed in KV keys, become dashes.
    """
    addr = ipaddress.ip_address(ip)
    return f"_ip.{str(addr).replace('.', '-').replace(':', '-')}.{port}"


def profile_key(namespace: str, service: str) -> str:
    return f"{namespace}.{service}"


def policy_key(namespace: str, workload: str) -> str:
    return f"{namespace}.{workload}"


def proxy_key(namespace: str, workload: str) -> str:
    return f"{namespace}.{workload}"


def identity_name(serviceaccount: str, namespace: str, trust_domain: str = "cluster.local") -> str:
    """The identity of a workload (DESIGN.md, "Names")."""
    return f"{serviceaccount}.{namespace}.serviceaccount.identity.tulle.{trust_domain}"


# --- tulle-endpoints --------------------------------------------------------------------

ProtocolHint = Literal["", "h2", "opaque"]


@dataclass(slots=True)
class Endpoint:
    address: str
    port: int
    # Empty when the endpoint runs no proxy: callers then speak plain TCP, no mTLS.
    identity: str = ""
    protocol_hint: ProtocolHint = ""
    weight: int = 10000
    labels: dict[str, str] = field(default_factory=dict)
    # Non-zero when the endpoint's inbound proxy must be dialled directly at this port
    # (local mode without iptables); the real target port then travels in the
    # proxy-to-proxy transport header.
    proxy_port: int = 0


@dataclass(slots=True)
class EndpointSet:
    VERSION: ClassVar[int] = 1
    namespace: str
    service: str
    port: int
    endpoints: list[Endpoint]
    # False only when the service does not exist (a lookup by IP that matched nothing);
    # a known service with no ready endpoint is exists=True with an empty list.
    exists: bool = True
    cluster_ips: list[str] = field(default_factory=list)
    # The service port's declared protocol ("" = detect, "opaque", "http", "h2c").
    app_protocol: str = ""
    v: int = 1


# --- tulle-profiles ---------------------------------------------------------------------


@dataclass(slots=True)
class StatusRange:
    min: int = 100
    max: int = 599


@dataclass(slots=True)
class RequestMatch:
    """Exactly one field set; several set means all of them (as Linkerd documents)."""

    method: Optional[str] = None
    path_regex: Optional[str] = None
    all_: Optional[list[RequestMatch]] = None
    any_: Optional[list[RequestMatch]] = None
    not_: Optional[RequestMatch] = None


@dataclass(slots=True)
class ResponseMatch:
    status: Optional[StatusRange] = None
    all_: Optional[list[ResponseMatch]] = None
    any_: Optional[list[ResponseMatch]] = None
    not_: Optional[ResponseMatch] = None


@dataclass(slots=True)
class ResponseClass:
    condition: ResponseMatch
    is_failure: bool = False


@dataclass(slots=True)
class Route:
    name: str
    condition: RequestMatch
    response_classes: list[ResponseClass] = field(default_factory=list)
    is_retryable: bool = False
    timeout_ms: int = 0  # 0: no timeout


@dataclass(slots=True)
class RetryBudget:
    retry_ratio: float = 0.2
    min_retries_per_second: int = 10
    ttl_ms: int = 10000


@dataclass(slots=True)
class Profile:
    VERSION: ClassVar[int] = 1
    namespace: str
    service: str
    fqdn: str
    routes: list[Route] = field(default_factory=list)
    retry_budget: RetryBudget = field(default_factory=RetryBudget)
    opaque_ports: list[int] = field(default_factory=list)
    v: int = 1


# --- tulle-policy -----------------------------------------------------------------------

DefaultPolicy = Literal[
    "all-unauthenticated", "all-authenticated", "cluster-unauthenticated", "cluster-authenticated", "deny"
]
DEFAULT_POLICIES: tuple[str, ...] = (
    "all-unauthenticated", "all-authenticated", "cluster-unauthenticated", "cluster-authenticated", "deny",
)
ProxyProtocol = Literal["unknown", "HTTP/1", "HTTP/2", "gRPC", "opaque", "TLS"]
DEFAULT_CLUSTER_NETWORKS: tuple[str, ...] = (
    "10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16", "fd00::/8",
)


@dataclass(slots=True)
class Network:
    cidr: str
    except_: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Authorization:
    """One way in: who (identity / TLS / none) from where (networks)."""

    name: str
    # "ServerAuthorization", or "default" for a default policy's synthesised rule,
    # or "probe" for the workload's own health checks.
    kind: str = "ServerAuthorization"
    unauthenticated: bool = False  # any client, TLS or not
    unauthenticated_tls: bool = False  # any TLS client, identity or not
    identities: list[str] = field(default_factory=list)  # exact, "*", or "*.<suffix>"
    networks: list[Network] = field(default_factory=list)  # empty: everywhere
    # Only for kind "probe": the HTTP paths this rule admits (GET/HEAD only).
    paths: list[str] = field(default_factory=list)


@dataclass(slots=True)
class PortPolicy:
    port: int
    # The Server's name, or "default:<policy>" when no Server covers the port.
    server: str
    kind: Literal["Server", "default"] = "default"
    protocol: ProxyProtocol = "unknown"
    authorizations: list[Authorization] = field(default_factory=list)
    # What produced this port's policy, for `tulle policy`: "Server demo/books-api",
    # "Pod demo/web annotation config.tulle.dev/default-inbound-policy", "cluster default".
    source: str = ""


@dataclass(slots=True)
class WorkloadPolicy:
    VERSION: ClassVar[int] = 1
    namespace: str
    workload: str
    default_policy: DefaultPolicy
    # What applies to a port not listed in `ports`.
    default: PortPolicy
    ports: list[PortPolicy] = field(default_factory=list)
    cluster_networks: list[str] = field(default_factory=lambda: list(DEFAULT_CLUSTER_NETWORKS))
    # Where each setting came from, for `tulle policy`: e.g. {"default_policy": "Namespace demo"}.
    sources: dict[str, str] = field(default_factory=dict)
    # Things worth a person's attention that are not errors, e.g. a ServerAuthorization
    # in this namespace naming a Server that does not exist (yet).
    warnings: list[str] = field(default_factory=list)
    v: int = 1


# --- identity ---------------------------------------------------------------------------

CertifyErrorCode = Literal["unauthenticated", "invalid-csr", "name-mismatch", "rate-limited", "internal"]


@dataclass(slots=True)
class CertifyRequest:
    VERSION: ClassVar[int] = 1
    identity: str
    token: str
    csr: str  # PEM
    v: int = 1


@dataclass(slots=True)
class CertifyError:
    code: CertifyErrorCode
    message: str


@dataclass(slots=True)
class CertifyResponse:
    VERSION: ClassVar[int] = 1
    leaf: str = ""  # PEM
    chain: list[str] = field(default_factory=list)  # PEM, issuer first, up to (not incl.) the anchor
    expiry: float = 0.0  # unix seconds
    serial: str = ""
    error: Optional[CertifyError] = None
    v: int = 1


@dataclass(slots=True)
class TrustBundle:
    VERSION: ClassVar[int] = 1
    anchors_pem: str  # one or more PEM certificates; any of them is trusted
    trust_domain: str = "cluster.local"
    issuer_expiry: float = 0.0
    v: int = 1


# --- tulle-proxies ----------------------------------------------------------------------


@dataclass(slots=True)
class ProxyHeartbeat:
    VERSION: ClassVar[int] = 1
    namespace: str
    workload: str
    version: str
    identity: str
    ready: bool
    cert_expiry: float = 0.0
    admin: str = ""  # host:port of the admin server
    pid: int = 0
    time: float = 0.0
    # sha256 of the trust anchors (PEM) the proxy was started with: `tulle check --proxy`
    # compares it with the installation's.
    trust_root_sha256: str = ""
    # tulle.pki.cert_fingerprints of the trust anchors the proxy was started with, so
    # `tulle check --proxy` can say whether it trusts the installation's; empty from a
    # proxy that does not report them.
    trust_anchors: list[str] = field(default_factory=list)
    v: int = 1


# --- proxy statistics (scatter-gather for `tulle routes`) --------------------------------


@dataclass(slots=True)
class StatsRequest:
    VERSION: ClassVar[int] = 1
    window_s: float = 60.0
    # Only proxies of these workloads answer (namespace.workload); empty: all.
    workloads: list[str] = field(default_factory=list)
    # Only routes to these destination services (namespace.service); empty: all.
    services: list[str] = field(default_factory=list)
    v: int = 1


@dataclass(slots=True)
class RouteWindow:
    """One route's figures over the window, both as seen by the caller and on the wire."""

    service: str  # namespace.service of the destination
    route: str  # route name, or "[DEFAULT]"
    effective_requests: int = 0
    effective_successes: int = 0
    actual_requests: int = 0
    actual_successes: int = 0
    # Latency histogram of effective responses: the finite bucket upper bounds (ms), and
    # a count per bucket plus one last count for +Inf (so one more count than bounds).
    latency_buckets_ms: list[float] = field(default_factory=list)
    latency_counts: list[int] = field(default_factory=list)


@dataclass(slots=True)
class StatsReply:
    VERSION: ClassVar[int] = 1
    namespace: str
    workload: str
    window_s: float  # the span the figures really cover (shorter for a proxy that just started)
    routes: list[RouteWindow] = field(default_factory=list)
    v: int = 1


# --- proxy traffic (scatter-gather for `tulle stat`, `tulle edges` and the dashboard) ----------


@dataclass(slots=True)
class TrafficRequest:
    VERSION: ClassVar[int] = 1
    window_s: float = 60.0
    # Only proxies of these workloads answer (namespace.workload); empty: all.
    workloads: list[str] = field(default_factory=list)
    v: int = 1


@dataclass(slots=True)
class TrafficEdge:
    """What one proxy saw of the traffic between its workload and one peer, over the window.

    Inbound: the peer is the client — its verified identity (empty when it had none) and,
    when the identity names a service account, that account's namespace. Outbound: the peer
    is the destination service (namespace, service) and the identity the server proved.
    Labels are bounded: identities and service names, never a raw address or Host.
    """

    direction: Literal["inbound", "outbound"]
    peer_namespace: str = ""  # the client's (from its identity) or the destination service's
    peer_name: str = ""  # inbound: the client's service account; outbound: the service
    peer_identity: str = ""  # the verified identity on the other end ("" = none: not mTLS)
    secured: bool = False  # mTLS with a verified identity on the other end
    # HTTP (requests and responses of the window; success as `route_*`: 5xx and gRPC errors fail)
    requests: int = 0
    successes: int = 0
    failures: int = 0
    denied: int = 0  # inbound: refused by policy (HTTP 403 or a closed connection)
    # Latency histogram of responses (as RouteWindow): finite bounds (ms), counts per bucket + one for +Inf.
    latency_buckets_ms: list[float] = field(default_factory=list)
    latency_counts: list[int] = field(default_factory=list)
    # TCP
    tcp_opened: int = 0  # connections opened in the window
    tcp_open: int = 0  # open now
    bytes_read: int = 0  # from the peer, over the window
    bytes_written: int = 0  # to the peer, over the window


@dataclass(slots=True)
class TrafficReply:
    VERSION: ClassVar[int] = 1
    namespace: str
    workload: str
    identity: str
    window_s: float  # the span the figures really cover
    edges: list[TrafficEdge] = field(default_factory=list)
    v: int = 1


# --- tulle-leases -----------------------------------------------------------------------


@dataclass(slots=True)
class Lease:
    """Who holds a writer lease (`tulle-leases` `<component>`); the bucket's TTL ends it
    unless the holder renews it (tulle/leader.py)."""

    VERSION: ClassVar[int] = 1
    holder: str  # <host>-<pid>-<random>: unique per process start
    component: str
    acquired: float = 0.0  # unix seconds
    v: int = 1


# --- events -----------------------------------------------------------------------------


@dataclass(slots=True)
class CloudEvent:
    """CloudEvents 1.0, structured JSON mode (the NATS protocol binding).

    Published on `tulle.events.<source kind>.<type>`; `type` is `dev.tulle.<kind>.<type>`.
    """

    id: str
    source: str  # URI-reference: /tulle/<component>/<instance>
    type: str
    time: str  # RFC 3339
    data: dict
    specversion: str = "1.0"
    datacontenttype: str = "application/json"
    subject: Optional[str] = None


def decode_event(payload: bytes) -> CloudEvent:
    ev = decode(CloudEvent, payload)
    if ev.specversion != "1.0":
        raise DecodeError("version", f"specversion={ev.specversion!r}", "CloudEvent")
    return ev
