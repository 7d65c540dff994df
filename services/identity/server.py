"""The identity service's NATS side: answers certify requests in the `identity` queue
group (replicas share the load), keeps the trust bundle in KV, and swaps the issuer when
its source changes.

- Certify requests are served only while an issuer is loaded, so a replica without one
  never takes a share of the requests.
- The trust bundle is written only when it differs from what KV holds, and again after
  every reconnect (a restarted NATS may have lost it): replicas with the same material
  write nothing new.
- A replacement issuer that does not validate is refused: logged, announced as
  `identity.issuer-invalid`, and the current issuer keeps signing.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import AsyncIterator, Optional, Protocol

import nats.errors

from services.identity.ca import (
    CertificateAuthority, Issuer, IssuerError, issuer_warnings, load_issuer, trust_bundle,
)
from services.identity.callout import CalloutResponder
from services.identity.ratelimit import RateLimiter
from services.identity.sources import IssuerPEM
from services.identity.tokens import TokenReviewUnavailable, TokenVerifier
from tulle import schemas
from tulle.bus import Bus, BusError
from tulle.log import get_logger
from tulle.metrics import REGISTRY, Registry

# A workload asks for a certificate at start and about every 17 hours after: 20 at once
# (a deployment's replicas starting together) and one a second beyond that is plenty.
DEFAULT_CERTIFY_BURST = 20.0
DEFAULT_CERTIFY_RATE = 1.0
RESULTS = ("ok", "unauthenticated", "invalid-csr", "name-mismatch", "rate-limited", "internal")


class IssuerSource(Protocol):
    def updates(self) -> AsyncIterator[IssuerPEM]: ...


class IdentityServer:
    def __init__(self, bus: Bus, ca: CertificateAuthority, verifier: TokenVerifier, source: IssuerSource, *,
                 concurrency: int = 1, registry: Registry = REGISTRY, limiter: Optional[RateLimiter] = None,
                 callout: Optional[CalloutResponder] = None):
        self.bus = bus
        self.ca = ca
        self.verifier = verifier
        self.source = source
        self.concurrency = concurrency
        self.limiter = limiter if limiter is not None else RateLimiter(DEFAULT_CERTIFY_RATE, DEFAULT_CERTIFY_BURST)
        self.callout = callout
        self.log = get_logger()
        self.bundle_published = False
        self._bundle_dirty = asyncio.Event()
        self._issuer_loaded = asyncio.Event()
        certify_total = registry.counter("tulle_identity_certify_total", "Certify requests answered, by result", ("result",))
        self.m_certify = {r: certify_total.labels(r) for r in RESULTS}
        self.m_issuer_expiry = registry.gauge("tulle_identity_issuer_expiry_timestamp_seconds",
                                              "When the loaded issuer certificate expires (unix seconds)")
        self.m_issuer_reloads = registry.counter("tulle_identity_issuer_reloads_total",
                                                 "Issuer replacements, by result", ("result",))

    @property
    def issuer_loaded(self) -> bool:
        return self.ca.issuer is not None

    @property
    def ready(self) -> bool:
        return self.bus.connected and self.issuer_loaded and self.bundle_published

    # --- issuer -------------------------------------------------------------------------

    async def apply(self, pem: IssuerPEM) -> bool:
        """Take new issuer material if it validates; keep the current issuer otherwise."""
        try:
            if pem.error:
                raise IssuerError(pem.error)
            issuer = load_issuer(pem.anchors, pem.cert, pem.key, names=pem.names)
        except IssuerError as e:
            self.m_issuer_reloads.labels("invalid").inc()
            keeping = self.ca.issuer is not None
            self.log.error("issuer refused" + ("; keeping the current issuer" if keeping else ""), error=str(e))
            await self.bus.publish_event("issuer-invalid", {"error": str(e), "keeping_current": keeping})
            return False
        old = self.ca.issuer
        if old is not None and old.fingerprint == issuer.fingerprint and old.anchors_pem == issuer.anchors_pem:
            return False  # touched, not changed
        self.ca.issuer = issuer
        self.m_issuer_expiry.set(issuer.expiry)
        info = self._describe(issuer)
        if old is None:
            self.log.info("issuer loaded", **info)
        else:
            self.m_issuer_reloads.labels("ok").inc()
            self.log.info("issuer reloaded", previous=old.fingerprint[:16], **info)
            await self.bus.publish_event("issuer-reloaded", info)
        for warning in issuer_warnings(issuer):
            self.log.warning(warning, **info)
        self._issuer_loaded.set()
        self._bundle_dirty.set()
        return True

    @staticmethod
    def _describe(issuer: Issuer) -> dict:
        return {"issuer": issuer.ca.cert.subject.rfc4514_string(), "fingerprint": issuer.fingerprint[:16],
                "expiry": issuer.not_after.isoformat(), "anchors": len(issuer.anchors)}

    async def _follow_source(self) -> None:
        async for pem in self.source.updates():
            await self.apply(pem)

    async def _warn_expiry_forever(self, interval_s: float = 6 * 3600) -> None:
        """Repeat the issuer-expiry warning while it applies, not only when it was loaded."""
        while True:
            await asyncio.sleep(interval_s)
            issuer = self.ca.issuer
            if issuer is not None:
                for warning in issuer_warnings(issuer):
                    self.log.warning(warning, **self._describe(issuer))

    # --- trust bundle -------------------------------------------------------------------

    async def _publish_bundle_forever(self) -> None:
        delay = 0.1
        while True:
            await self._bundle_dirty.wait()
            self._bundle_dirty.clear()
            issuer = self.ca.issuer
            if issuer is None:
                continue
            bundle = trust_bundle(issuer, self.ca.trust_domain)
            try:
                await self.bus.wait_connected()
                current = await self.bus.get(schemas.IDENTITY_BUCKET, schemas.TRUST_BUNDLE_KEY, schemas.TrustBundle)
                if current != bundle:
                    await self.bus.put(schemas.IDENTITY_BUCKET, schemas.TRUST_BUNDLE_KEY, bundle)
                    self.log.info("trust bundle published", anchors=len(issuer.anchors))
                self.bundle_published = True
                delay = 0.1
            except Exception as e:  # NATS gone or bucket trouble: try again
                self.log.warning("could not publish the trust bundle", error=str(e) or type(e).__name__)
                self._bundle_dirty.set()
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)

    def _on_connection(self, up: bool) -> None:
        if up:
            self._bundle_dirty.set()  # a restarted NATS may have lost the bucket

    # --- certify ------------------------------------------------------------------------

    async def certify(self, req: schemas.CertifyRequest) -> schemas.CertifyResponse:
        try:
            proven = await self.verifier.verify(req.token)
            if proven is not None and not self.limiter.allow(f"{proven.namespace}/{proven.serviceaccount}",
                                                             time.monotonic()):
                wait = self.limiter.retry_after(f"{proven.namespace}/{proven.serviceaccount}", time.monotonic())
                resp = schemas.CertifyResponse(error=schemas.CertifyError(
                    "rate-limited", f"too many certificates for {proven.namespace}/{proven.serviceaccount}; "
                                    f"retry in {wait:.1f}s"))
            else:
                resp = self.ca.certify(req, proven.account if proven is not None else None)
        except TokenReviewUnavailable as e:
            resp = schemas.CertifyResponse(error=schemas.CertifyError("internal", str(e)))
        except Exception:
            self.log.exception("certify failed", identity=req.identity[:256])
            resp = schemas.CertifyResponse(error=schemas.CertifyError("internal", "the identity service failed"))
        if resp.error is None:
            self.m_certify["ok"].inc()
            self.log.debug("certificate issued", identity=req.identity, serial=resp.serial, expiry=resp.expiry)
            await self.bus.publish_event("certificate-issued",
                                         {"identity": req.identity, "serial": resp.serial, "expiry": resp.expiry},
                                         subject=req.identity)
        else:
            self.m_certify[resp.error.code].inc()
            self.log.info("certify refused", identity=req.identity[:256], code=resp.error.code, reason=resp.error.message)
        return resp

    # --- run ----------------------------------------------------------------------------

    async def _retry_subscribe(self, subscribe, what: str) -> None:
        while True:
            try:
                await self.bus.wait_connected()
                await subscribe()
                return
            except (BusError, nats.errors.Error, OSError) as e:  # the connection dropped meanwhile
                self.log.debug(f"could not subscribe to {what} yet", error=str(e) or type(e).__name__)
                await asyncio.sleep(0.1)

    async def run(self) -> None:
        """Until cancelled: follow the issuer, publish the bundle, answer certify requests."""
        self.bus.on_connection_change(self._on_connection)
        tasks = [asyncio.ensure_future(self._follow_source()), asyncio.ensure_future(self._publish_bundle_forever()),
                 asyncio.ensure_future(self._warn_expiry_forever())]
        try:
            if self.callout is not None:  # bus logins need no issuer: answer them from the start
                await self._retry_subscribe(self.callout.start, "bus logins")
            await self._issuer_loaded.wait()
            while True:
                try:
                    await self.bus.wait_connected()
                    await self.bus.serve(schemas.CERTIFY_SUBJECT, schemas.CertifyRequest, self.certify,
                                         queue=schemas.CERTIFY_QUEUE, concurrency=self.concurrency)
                    break
                except (BusError, nats.errors.Error, OSError) as e:  # the connection dropped meanwhile
                    self.log.debug("could not subscribe yet", error=str(e) or type(e).__name__)
                    await asyncio.sleep(0.1)
            self.log.info("answering certify requests", subject=schemas.CERTIFY_SUBJECT, queue=schemas.CERTIFY_QUEUE)
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.callout is not None:
                await self.callout.close()
