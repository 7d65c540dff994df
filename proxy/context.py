"""What the inbound and outbound rooms share: configuration, identity, discovery, metrics,
upstream pools — one object, built by proxy/app.py."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from proxy.config import ProxyConfig
from proxy.discovery import Discovery
from proxy.metrics import ProxyMetrics


class IdentityLike(Protocol):
    """The interface of proxy.identity.IdentityClient the data plane uses.

    `server_context` / `client_context` are replaced (never mutated) on renewal: read
    the attribute each time a connection is accepted or dialled.
    """

    ready: bool
    identity: str
    server_context: ssl.SSLContext | None
    client_context: ssl.SSLContext | None
    expiry: float
    serial: str


@dataclass
class Shared:
    cfg: ProxyConfig
    identity: IdentityLike
    discovery: Discovery
    metrics: ProxyMetrics
    # Extra checks /ready waits for (e.g. "first policy received" in the policy issue).
    ready_checks: dict[str, Callable[[], bool]] = field(default_factory=dict)
    # Hook of the profiles issue: called with (key, Profile | None) on every profile change.
    on_profile: Callable[[str, Any], None] | None = None

    # The ports this proxy listens on (outbound, inbound, admin, filled in at start) and the
    # addresses it binds: neither room may forward a connection to them.
    own_ports: set[int] = field(default_factory=set)
    own_hosts: set[str] = field(default_factory=set)

    def client_context(self) -> ssl.SSLContext | None:
        return self.identity.client_context

    def listening(self, *addresses: tuple[str, int]) -> None:
        for host, port in addresses:
            if port:
                self.own_ports.add(port)
            self.own_hosts.add(host)

    def is_own_address(self, host: str, port: int) -> bool:
        """Would a connection to host:port reach one of this proxy's listeners (or, on a
        shared loopback, another proxy's)? Loopback, unspecified and the bound addresses."""
        if port not in self.own_ports:
            return False
        if host in self.own_hosts or host in ("localhost", "0.0.0.0", "::", "::1"):
            return True
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        return ip.is_loopback or ip.is_unspecified
