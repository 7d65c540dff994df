"""What the proxy records about each authorization decision: counters and denial events.

- `PolicyMetrics` counts every decision under Linkerd's names
  (`inbound_{http,tcp}_authz_{allow,deny}_total`) with the server, the authorization
  (allows only) and the client identity as labels. Every label stays bounded: server and
  authorization names come from the policy, ports and identities are capped (after
  `max_values` distinct ones, further ones count as "other").
- `DenialReporter` turns denials into `proxy.denied` CloudEvents for external tools,
  at most one per (server, client) per interval — the client being its identity, or its
  /24 (IPv4) or /64 (IPv6) network when it has none — and at most `max_per_interval`
  overall, counting what it held back.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Callable, Literal, Optional

from tulle.policy import Decision
from tulle.metrics import REGISTRY, Registry

OTHER = "other"
Protocol = Literal["http", "tcp"]


class BoundedLabel:
    """A label's values as given, until `limit` distinct ones were seen; then "other"."""

    __slots__ = ("limit", "seen")

    def __init__(self, limit: int):
        self.limit, self.seen = limit, set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) < self.limit:
            self.seen.add(value)
            return value
        return OTHER


def server_labels(server: str) -> tuple[str, str]:
    """(srv_kind, srv_name): ("default", "deny") for "default:deny", else ("server", name)."""
    kind, sep, name = server.partition(":")
    return ("default", name) if sep else ("server", server)


def authorization_labels(authorization: str) -> tuple[str, str]:
    """(authz_kind, authz_name): ("default", "probe") for "default:probe", else
    ("serverauthorization", name)."""
    kind, sep, name = authorization.partition(":")
    return ("default", name) if sep else ("serverauthorization", authorization)


class PolicyMetrics:
    ALLOW_LABELS = ("srv_kind", "srv_name", "srv_port", "authz_kind", "authz_name", "client_id")
    DENY_LABELS = ("srv_kind", "srv_name", "srv_port", "client_id")
    _CACHE_MAX = 20000

    def __init__(self, registry: Registry = REGISTRY, *, max_values: int = 1000):
        self.families = {
            ("http", True): registry.counter("inbound_http_authz_allow_total",
                                             "HTTP requests allowed by inbound policy", self.ALLOW_LABELS),
            ("http", False): registry.counter("inbound_http_authz_deny_total",
                                              "HTTP requests denied by inbound policy", self.DENY_LABELS),
            ("tcp", True): registry.counter("inbound_tcp_authz_allow_total",
                                            "TCP connections allowed by inbound policy", self.ALLOW_LABELS),
            ("tcp", False): registry.counter("inbound_tcp_authz_deny_total",
                                             "TCP connections denied by inbound policy", self.DENY_LABELS),
        }
        self.client_ids = BoundedLabel(max_values)
        self.ports = BoundedLabel(max_values)
        # (protocol, decision, port, identity) -> counter child: one dict lookup per decision.
        self._children: dict[tuple, object] = {}

    def count(self, protocol: Protocol, port: int, decision: Decision, client_identity: Optional[str]) -> None:
        key = (protocol, decision, port, client_identity)
        child = self._children.get(key)
        if child is None:
            child = self._child(protocol, port, decision, client_identity)
            if len(self._children) >= self._CACHE_MAX:
                self._children.clear()
            self._children[key] = child
        child.inc()

    def denied_by_client(self) -> dict[str, int]:
        """Denials so far (HTTP requests and TCP connections) per client identity label ("" =
        none, "other" past the cap), for the traffic windows (proxy/traffic_stats.py)."""
        out: dict[str, int] = {}
        for protocol in ("http", "tcp"):
            for values, child in self.families[(protocol, False)].items():
                client_id = values[-1]
                out[client_id] = out.get(client_id, 0) + child.value
        return out

    def _child(self, protocol: Protocol, port: int, decision: Decision, client_identity: Optional[str]):
        srv_kind, srv_name = server_labels(decision.server)
        client_id = self.client_ids(client_identity or "")
        srv_port = self.ports(str(port))
        family = self.families[(protocol, decision.allowed)]
        if decision.allowed:
            authz_kind, authz_name = authorization_labels(decision.authorization)
            return family.labels(srv_kind, srv_name, srv_port, authz_kind, authz_name, client_id)
        return family.labels(srv_kind, srv_name, srv_port, client_id)


def client_key(client_ip: str, client_identity: Optional[str]) -> str:
    """Who a denial is about, for rate limiting: the identity, else the /24 or /64."""
    if client_identity:
        return client_identity
    try:
        addr = ipaddress.ip_address(client_ip)
    except ValueError:
        return "unknown"
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


class DenialLimiter:
    """Which denials become events (pure, with an injectable clock)."""

    def __init__(self, interval_s: float = 10.0, max_per_interval: int = 100, max_keys: int = 10000,
                 clock: Callable[[], float] = time.monotonic):
        self.interval, self.max_per_interval, self.max_keys, self.clock = interval_s, max_per_interval, max_keys, clock
        self._last: dict[tuple[str, str], float] = {}
        # Denials held back since the last event of a key; only keys in _last, so bounded.
        self._held: dict[tuple[str, str], int] = {}
        self._window_start = -float("inf")
        self._window_count = 0

    def admit(self, server: str, client: str) -> Optional[int]:
        """None: hold this one back. Else publish, reporting how many were held back before it."""
        now = self.clock()
        key = (server, client)
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if now - self._window_start >= self.interval:
            self._window_start, self._window_count = now, 0
        if self._window_count >= self.max_per_interval:
            # Over the global cap: held back, counted by the caller's metric only (keeping
            # a count per key here would let a flood of clients grow memory without bound).
            return None
        self._window_count += 1
        if len(self._last) >= self.max_keys:
            self._prune(now)
        self._last[key] = now
        return self._held.pop(key, 0)

    def _prune(self, now: float) -> None:
        self._last = {k: t for k, t in self._last.items() if now - t < self.interval}
        self._held = {k: n for k, n in self._held.items() if k in self._last}
        if len(self._last) >= self.max_keys:  # a flood of distinct recent clients: forget them all
            self._last.clear()
            self._held.clear()


class DenialReporter:
    """Publishes rate-limited `proxy.denied` CloudEvents through the proxy's Bus."""

    def __init__(self, bus, *, namespace: str, workload: str, limiter: Optional[DenialLimiter] = None,
                 registry: Registry = REGISTRY):
        self.bus, self.namespace, self.workload = bus, namespace, workload
        self.limiter = limiter or DenialLimiter()
        self.m_suppressed = registry.counter("tulle_policy_denial_events_suppressed_total",
                                             "Denials not published as events (rate limited)")
        self.m_published = registry.counter("tulle_policy_denial_events_total", "Denials published as events")
        self._tasks: set[asyncio.Task] = set()

    def report(self, protocol: Protocol, port: int, decision: Decision, client_ip: str,
               client_identity: Optional[str]) -> bool:
        """Call for each denial (from the event loop); True when an event goes out."""
        held = self.limiter.admit(decision.server, client_key(client_ip, client_identity))
        if held is None:
            self.m_suppressed.inc()
            return False
        self.m_published.inc()
        data = {
            "namespace": self.namespace, "workload": self.workload, "protocol": protocol, "port": port,
            "server": decision.server, "client_identity": client_identity or "", "client_ip": client_ip,
            "reason": decision.reason, "suppressed_before": held,
        }
        task = asyncio.ensure_future(self.bus.publish_event("denied", data, kind="proxy",
                                                            subject=f"{self.namespace}/{self.workload}"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True
