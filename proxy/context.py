"""What the inbound and outbound rooms share: configuration, identity, discovery, metrics,
upstream pools — one object, built by proxy/app.py."""

from __future__ import annotations

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

    def client_context(self) -> ssl.SSLContext | None:
        return self.identity.client_context
