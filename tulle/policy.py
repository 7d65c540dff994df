"""Inbound authorization: is this connection or request allowed, and by which rule? (pure)

Shared by the proxy (which decides), the policy service (which compiles the default
policies into authorizations) and `tulle policy --explain`; so it lives in tulle/, and
nothing here knows about sockets.

The policy service compiles each workload's policy (`tulle.schemas.WorkloadPolicy`):
per port, the Server (or the default policy) that governs it and the list of
`Authorization`s that let clients in. This module turns one such value into lookup
structures once per update, so each decision is a dict lookup and a few integer
compares — it runs for every inbound connection and every inbound HTTP request.

How the proxy uses it (proxy/inbound.py):
- an opaque TCP connection (or one the proxy does not parse: TLS passed through):
  `decide_connection` once, when it is accepted; denied → close it at once;
- an HTTP connection: `decide_request` for *each* request (not the connection), so the
  workload's probe paths get through on a port that admits nobody else, and a policy
  change applies to the next request on a connection that is already open.
  Denied → 403 with `tulle-proxy-error` (gRPC: trailers-only, grpc-status 7).

Client facts the proxy passes:
- `tls`: the proxy terminated TLS on this connection (mesh traffic). A TLS client
  without a certificate is "unauthenticated TLS".
- `client_identity`: the verified identity of the client certificate, or None. It only
  counts when `tls` is true.
- `client_ip`: the peer address as a string (IPv4-mapped IPv6 is read as IPv4).

Names in decisions match Linkerd's metric labels: `server` is the Server's name or
`default:<policy>`; `authorization` is the ServerAuthorization's name, or
`default:<policy>` for a default policy's rule, or `default:probe` for health checks.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Optional

from tulle.schemas import DEFAULT_CLUSTER_NETWORKS, Authorization, Network, PortPolicy, WorkloadPolicy

PROBE_METHODS = frozenset({"GET", "HEAD"})
SERVER_AUTHORIZATION = "ServerAuthorization"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    server: str  # Server name or "default:<policy>"
    authorization: str  # the rule that allowed, or "" when denied
    reason: str  # short, for logs and `tulle policy --explain`


# --- the default policies as authorizations (shared with the policy service) -------------


def default_authorizations(policy: str, cluster_networks: Iterable[str]) -> list[Authorization]:
    """The rule a default policy stands for (Linkerd's defaults):

    all-unauthenticated      anyone, from anywhere
    all-authenticated        any mesh identity, from anywhere
    cluster-unauthenticated  anyone from the cluster networks
    cluster-authenticated    any mesh identity from the cluster networks
    deny                     no one
    """
    cluster = [Network(str(n)) for n in cluster_networks]
    if policy == "all-unauthenticated":
        return [Authorization(policy, kind="default", unauthenticated=True)]
    if policy == "all-authenticated":
        return [Authorization(policy, kind="default", identities=["*"])]
    if policy == "cluster-unauthenticated":
        return [Authorization(policy, kind="default", unauthenticated=True, networks=cluster)]
    if policy == "cluster-authenticated":
        return [Authorization(policy, kind="default", identities=["*"], networks=cluster)]
    if policy == "deny":
        return []
    raise ValueError(f"unknown default policy {policy!r}")


def default_port_policy(policy: str, cluster_networks: Iterable[str], port: int = 0, source: str = "") -> PortPolicy:
    return PortPolicy(port, f"default:{policy}", "default", "unknown",
                      default_authorizations(policy, cluster_networks), source)


def authorization_label(a: Authorization) -> str:
    """The name a decision, a metric and `tulle policy` use for one authorization."""
    return a.name if a.kind == SERVER_AUTHORIZATION else f"default:{a.name}"


# --- addresses as integers -----------------------------------------------------------------

IpKey = tuple[int, int]  # (version, address as int)
_ip_cache: dict[str, Optional[IpKey]] = {}
_IP_CACHE_MAX = 4096


def ip_key(ip: str) -> Optional[IpKey]:
    """(4 or 6, int) of an address string; None when it is not one. Cached: the same
    few client addresses come back on every connection."""
    key = _ip_cache.get(ip, False)
    if key is not False:
        return key
    try:
        addr = ipaddress.ip_address(ip.strip("[]"))
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        key = (addr.version, int(addr))
    except (ValueError, AttributeError):
        key = None
    if len(_ip_cache) >= _IP_CACHE_MAX:
        _ip_cache.clear()
    _ip_cache[ip] = key
    return key


class _Cidr:
    __slots__ = ("version", "net", "mask", "text")

    def __init__(self, cidr: str):
        n = ipaddress.ip_network(cidr, strict=False)
        self.version, self.net, self.mask, self.text = n.version, int(n.network_address), int(n.netmask), str(n)

    def __contains__(self, ipk: IpKey) -> bool:
        return ipk[0] == self.version and ipk[1] & self.mask == self.net


class _Network:
    """One `{cidr, except}`: inside cidr and outside every except."""

    __slots__ = ("cidr", "excepts")

    def __init__(self, network: Network):
        self.cidr = _Cidr(network.cidr)
        self.excepts = tuple(_Cidr(e) for e in network.except_)

    def __contains__(self, ipk: IpKey) -> bool:
        if ipk not in self.cidr:
            return False
        for e in self.excepts:
            if ipk in e:
                return False
        return True

    def describe(self) -> str:
        text = self.cidr.text
        if self.excepts:
            text += " except " + ", ".join(e.text for e in self.excepts)
        return text


class _Rule:
    """One compiled authorization."""

    __slots__ = ("label", "anyone", "any_tls", "any_identity", "exact", "suffixes", "networks", "broken",
                 "paths", "source", "allow")

    def __init__(self, a: Authorization):
        self.label = authorization_label(a)
        self.source = a
        self.anyone = a.unauthenticated
        self.any_tls = a.unauthenticated_tls
        self.any_identity = "*" in a.identities
        self.exact = frozenset(i for i in a.identities if not i.startswith("*"))
        # "*.demo.serviceaccount..." matches "<anything>.demo.serviceaccount...".
        self.suffixes = tuple(i[1:] for i in a.identities if i.startswith("*.") and len(i) > 2)
        self.broken = False
        try:
            self.networks: Optional[tuple[_Network, ...]] = tuple(_Network(n) for n in a.networks) or None
        except ValueError:
            # A value that does not parse admits no one: failing closed beats widening access.
            self.networks, self.broken = (), True
        self.paths = frozenset(a.paths)
        self.allow: Optional[Decision] = None  # set by the port that owns this rule

    def admits_identity(self, identity: str) -> bool:
        if self.any_identity or identity in self.exact:
            return True
        for s in self.suffixes:
            if identity.endswith(s):
                return True
        return False

    def admits_client(self, identity: Optional[str], tls: bool) -> bool:
        if self.anyone or (tls and self.any_tls):
            return True
        return tls and identity is not None and self.admits_identity(identity)

    def admits_ip(self, ipk: Optional[IpKey]) -> bool:
        if self.networks is None:
            return True
        if ipk is None:
            return False
        for n in self.networks:
            if ipk in n:
                return True
        return False

    # For people (explain, `tulle policy`), not the hot path.

    def who(self) -> str:
        if self.anyone:
            return "any client"
        if self.any_tls:
            return "any TLS client"
        if self.any_identity:
            return "any authenticated client"
        names = sorted(self.exact) + sorted(f"*{s}" for s in self.suffixes)
        return ", ".join(names) if names else "no one"

    def where(self, cluster: Optional[frozenset[str]] = None) -> str:
        if self.broken:
            return "nowhere (a network does not parse)"
        if self.networks is None:
            return "anywhere"
        texts = [n.describe() for n in self.networks]
        if cluster is not None and frozenset(texts) == cluster:
            return "the cluster networks"
        return ", ".join(texts)

    def why_not_client(self, identity: Optional[str], tls: bool) -> Optional[str]:
        """None when this rule admits the client's identity / TLS; else why not."""
        if self.admits_client(identity, tls):
            return None
        if self.any_tls:
            return "needs TLS"
        if not tls or identity is None:
            return f"needs an identity ({self.who()})"
        return f"identity {identity} is not {self.who()}"

    def why_not_ip(self, ipk: Optional[IpKey]) -> Optional[str]:
        return None if self.admits_ip(ipk) else f"client address is not in {self.where()}"


class _Port:
    __slots__ = ("port", "server", "protocol", "rules", "probe", "deny_detail", "source", "kind")

    def __init__(self, p: PortPolicy):
        self.port, self.server, self.protocol, self.source, self.kind = p.port, p.server, p.protocol, p.source, p.kind
        rules = [_Rule(a) for a in p.authorizations]
        self.rules = tuple(r for r in rules if r.source.kind != "probe")
        probes = [r for r in rules if r.source.kind == "probe"]
        self.probe: Optional[_Rule] = probes[0] if probes else None
        if len(probes) > 1:  # one per port is what the compiler writes; merge if not
            merged = probes[0].source
            self.probe = _Rule(Authorization(merged.name, kind="probe", unauthenticated=True,
                                             networks=merged.networks,
                                             paths=sorted({path for r in probes for path in r.paths})))
        for rule in rules + ([self.probe] if self.probe is not None else []):
            rule.allow = Decision(True, self.server, rule.label, _allowed_reason(rule.label, self.server))
        if self.rules:
            self.deny_detail = ""
        elif self.server.startswith("default:"):
            self.deny_detail = f"the default policy {self.server[8:]} admits no one"
        else:
            self.deny_detail = f"Server {self.server} has no authorization"

    def denied(self, port: int, client_ip: str, identity: Optional[str], tls: bool) -> Decision:
        if self.deny_detail:
            return Decision(False, self.server, "", f"port {port}: {self.deny_detail}")
        return Decision(False, self.server, "", f"port {port}: {self._not_admitted(identity, tls, client_ip)}")

    def _not_admitted(self, identity: Optional[str], tls: bool, client_ip: Optional[str]) -> str:
        where = f" from {client_ip}" if client_ip is not None else ""
        if self.kind == "default":
            return f"the default policy {self.server[8:]} does not admit {_who(identity, tls)}{where}"
        return f"no authorization on Server {self.server} admits {_who(identity, tls)}{where}"


class InboundPolicy:
    """The proxy's current inbound policy; `update` swaps it atomically (one reference)."""

    def __init__(self, default_policy: str, cluster_networks: Iterable[str] = DEFAULT_CLUSTER_NETWORKS):
        # Before the first WorkloadPolicy: the configured default on every port.
        self._set(WorkloadPolicy("", "", default_policy, default_port_policy(default_policy, cluster_networks,
                                                                                source="proxy configuration")))
        self._has_policy = False
        self.generation = 0  # bumped by every update; lets a caller notice a change cheaply

    def _set(self, policy: WorkloadPolicy) -> None:
        # Build everything first, then swap both references: a decision never sees half.
        ports = {p.port: _Port(p) for p in policy.ports}
        default = _Port(policy.default)
        self._ports, self._default, self.policy = ports, default, policy

    def update(self, policy: WorkloadPolicy) -> None:
        self._set(policy)
        self._has_policy = True
        self.generation += 1

    @property
    def has_policy(self) -> bool:
        return self._has_policy

    def protocol(self, port: int) -> str:
        """The Server's proxyProtocol for a port ("unknown" = detect)."""
        return self._ports.get(port, self._default).protocol

    def decide_connection(self, port: int, client_ip: str, client_identity: Optional[str], tls: bool) -> Decision:
        p = self._ports.get(port) or self._default
        ipk = None
        for rule in p.rules:
            if not rule.admits_client(client_identity, tls):
                continue
            if rule.networks is not None:
                if ipk is None:
                    ipk = ip_key(client_ip)
                if not rule.admits_ip(ipk):
                    continue
            return rule.allow
        return p.denied(port, client_ip, client_identity, tls)

    def decide_request(self, port: int, client_ip: str, client_identity: Optional[str], tls: bool,
                       method: str, path: str) -> Decision:
        p = self._ports.get(port) or self._default
        probe = p.probe
        if probe is not None and method in PROBE_METHODS:
            q = path.find("?")
            if (path[:q] if q >= 0 else path) in probe.paths and probe.admits_ip(ip_key(client_ip)):
                return probe.allow
        return self.decide_connection(port, client_ip, client_identity, tls)


# --- explain: why a client would be allowed or not (for `tulle policy --explain`) --------


@dataclass(slots=True)
class RuleVerdict:
    authorization: str
    kind: str  # ServerAuthorization, default, probe
    admits: bool
    why: str  # "admits" or why not
    # Set when the client's address is unknown and only the rule's networks stand
    # between it and an allow: "if the client connects from ...".
    condition: str = ""


@dataclass(slots=True)
class Explanation:
    port: int  # 0: any port without its own entry
    server: str
    protocol: str
    source: str
    allowed: bool
    authorization: str
    reason: str
    condition: str = ""  # non-empty: allowed only if the client's address is in these networks
    rules: list[RuleVerdict] = field(default_factory=list)


def explain(policy: WorkloadPolicy, port: int, *, client_ip: Optional[str] = None,
            client_identity: Optional[str] = None, tls: bool = False,
            method: Optional[str] = None, path: Optional[str] = None) -> Explanation:
    """Would this client be allowed on `port`, and why — the same rules as InboundPolicy.

    client_ip None: the address is unknown (e.g. `--from <identity>`); a rule limited to
    networks then allows conditionally. method/path None: a connection (no probe rules);
    given: an HTTP request.
    """
    entry = next((p for p in policy.ports if p.port == port), policy.default)
    p = _Port(entry)
    ipk = ip_key(client_ip) if client_ip is not None else None
    verdicts: list[RuleVerdict] = []
    cluster = frozenset(str(ipaddress.ip_network(n, strict=False)) for n in policy.cluster_networks
                        if _parses(n))
    rules = ([p.probe] if p.probe is not None else []) + list(p.rules)
    for rule in rules:
        kind = rule.source.kind
        if kind == "probe":
            q = (path or "").split("?", 1)[0]
            if method is None or path is None:
                verdicts.append(RuleVerdict(rule.label, kind, False, "applies to HTTP probe requests only"))
                continue
            if method not in PROBE_METHODS or q not in rule.paths:
                verdicts.append(RuleVerdict(rule.label, kind, False,
                                            f"admits only GET/HEAD {', '.join(sorted(rule.paths))}"))
                continue
            why = None
        else:
            why = rule.why_not_client(client_identity, tls)
        if why is None and client_ip is not None:
            why = rule.why_not_ip(ipk)
        condition = ""
        if why is None and client_ip is None and rule.networks is not None:
            condition = f"if the client connects from {rule.where(cluster)}"
        verdicts.append(RuleVerdict(rule.label, kind, why is None, "admits" if why is None else why, condition))
    unconditional = next((v for v in verdicts if v.admits and not v.condition), None)
    conditional = next((v for v in verdicts if v.admits and v.condition), None)
    chosen = unconditional or conditional
    if chosen is not None:
        reason = _allowed_reason(chosen.authorization, p.server)
        if chosen.condition:
            reason += f", {chosen.condition}"
        return Explanation(port, p.server, p.protocol, p.source, True, chosen.authorization, reason,
                           chosen.condition, verdicts)
    if p.deny_detail and not p.rules:
        reason = p.deny_detail + (" (probes aside)" if p.probe is not None else "")
    else:
        reason = p._not_admitted(client_identity, tls, client_ip)
    return Explanation(port, p.server, p.protocol, p.source, False, "", reason, "", verdicts)


def _allowed_reason(authorization: str, server: str) -> str:
    if authorization == server:  # a default policy's own rule on a port without a Server
        return f"allowed by the default policy {server[8:]}"
    return f"allowed by {authorization} on {server}"


def _who(identity: Optional[str], tls: bool) -> str:
    if tls and identity:
        return f"identity {identity}"
    return "an unauthenticated TLS client" if tls else "an unauthenticated client"


def _parses(cidr: str) -> bool:
    try:
        ipaddress.ip_network(cidr, strict=False)
        return True
    except ValueError:
        return False


def describe_authorization(a: Authorization, cluster_networks: Iterable[str] = ()) -> str:
    """"<name>: <who> from <where>", for `tulle policy`."""
    rule = _Rule(a)
    cluster = frozenset(str(ipaddress.ip_network(n, strict=False)) for n in cluster_networks if _parses(n))
    where = rule.where(cluster or None)
    if a.kind == "probe":
        return f"{rule.label}: GET/HEAD {', '.join(sorted(a.paths))} from {where}"
    return f"{rule.label}: {rule.who()} from {where}"
