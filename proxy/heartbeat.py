"""The proxy's heartbeat in `tulle-proxies`: who it is, its version, identity, certificate
expiry and readiness, renewed every few seconds (entries expire after 15 s)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Callable

from tulle import __version__, pki, schemas
from tulle.bus import Bus
from tulle.log import get_logger

INTERVAL_S = 5.0

log = get_logger(part="heartbeat")


class ProxyHeartbeat:
    def __init__(self, bus: Bus, namespace: str, workload: str, identity: Callable[[], tuple[str, float]],
                 ready: Callable[[], bool], admin: str, interval: float = INTERVAL_S, trust_anchors_pem: bytes = b""):
        self.bus = bus
        self.namespace = namespace
        self.workload = workload
        self.identity = identity  # () -> (identity, certificate expiry)
        self.ready = ready
        self.admin = admin
        self.interval = interval
        # The anchors the proxy was started with, as `tulle check --proxy` compares them.
        self.trust_root_sha256 = pki.trust_root_sha256(trust_anchors_pem) if trust_anchors_pem else ""
        self.trust_anchors = pki.cert_fingerprints(trust_anchors_pem) if trust_anchors_pem else []
        self.key = schemas.proxy_key(namespace, workload)
        self.beats = 0

    def message(self) -> schemas.ProxyHeartbeat:
        ident, expiry = self.identity()
        return schemas.ProxyHeartbeat(
            namespace=self.namespace, workload=self.workload, version=__version__, identity=ident,
            ready=self.ready(), cert_expiry=expiry, admin=self.admin, pid=os.getpid(), time=time.time(),
            trust_root_sha256=self.trust_root_sha256, trust_anchors=self.trust_anchors)

    async def beat(self) -> bool:
        if not self.bus.connected:
            return False
        try:
            # Never created here: a proxy may write its own key, not make buckets.
            await self.bus.put(schemas.PROXIES_BUCKET, self.key, self.message(), create=False)
        except Exception as e:  # the bus may be going away; the next beat tries again
            log.debug("heartbeat not written", error=str(e) or type(e).__name__)
            return False
        self.beats += 1
        return True

    async def run(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self.interval)

    async def remove(self) -> None:
        """On shutdown: drop the entry at once rather than waiting for it to expire."""
        if not self.bus.connected:
            return
        try:
            await asyncio.wait_for(self.bus.delete(schemas.PROXIES_BUCKET, self.key, create=False), 1.0)
        except Exception:
            pass
