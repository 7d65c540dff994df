"""The proxy's identity: a private key that never leaves memory, a certificate from the
identity service, renewed before it expires, and the TLS contexts built from both.

- The P-256 key is made at start and kept for the proxy's life (as linkerd2-proxy does);
  it is handed to OpenSSL through memfd (`tulle.pki.ssl_context_from_pem`), never written
  to disk and never sent: only the CSR goes out.
- Certify: request/reply on `tulle.identity.v1.certify` with the token read from the
  token file on every attempt (projected tokens rotate). Before the first certificate,
  failures are retried with exponential backoff up to the minimum refresh; after it, the
  next try is at 70% of the time left, clamped to [min_refresh, max_refresh], so retries
  speed up as expiry nears and the current certificate keeps serving meanwhile.
- The trust anchors are the ones the proxy was started with (TULLE_PROXY_IDENTITY_TRUST_ANCHORS,
  set by the injector or local mode from the installation's anchors), never a bus value:
  whoever can write to the bus must not be able to make the mesh trust a rogue CA. Every
  certificate identity hands back must chain to them, or it is refused.
- Every new certificate builds *new* SSLContext objects: connections already
  open keep the context they were made with; new ones use the new ones. A listener made
  with `listener_context()` picks the current server context at each handshake.

The proxy is ready once it has a certificate.
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

from cryptography import x509

from tulle import pki, schemas
from tulle.bus import Bus, BusError
from tulle.errors import UserError
from tulle.log import get_logger
from tulle.metrics import REGISTRY, Registry

REFRESH_FRACTION = 0.7  # of the time left (Linkerd)
DEFAULT_MIN_REFRESH_S = 10.0
DEFAULT_MAX_REFRESH_S = 24 * 3600.0
FIRST_RETRY_S = 0.1


def refresh_delay(expiry: float, now: float, *, min_refresh_s: float = DEFAULT_MIN_REFRESH_S,
                  max_refresh_s: float = DEFAULT_MAX_REFRESH_S) -> float:
    """Seconds until the next certify: 70% of the time left, clamped to [min, max]."""
    return min(max(REFRESH_FRACTION * (expiry - now), min_refresh_s), max_refresh_s)


def retry_delay(attempt: int, *, cap_s: float) -> float:
    """Backoff before a first certificate: 0.1 s doubling up to `cap_s`, with jitter."""
    base = min(FIRST_RETRY_S * (2 ** min(attempt, 30)), cap_s)
    return base * (0.5 + random.random() / 2)


def min_refresh_from_env(env: Mapping[str, str] | None = None) -> float:
    """TULLE_PROXY_IDENTITY_MIN_REFRESH (seconds or a duration such as '10s'; default 10s)."""
    return _refresh_from_env("TULLE_PROXY_IDENTITY_MIN_REFRESH", DEFAULT_MIN_REFRESH_S, env)


def max_refresh_from_env(env: Mapping[str, str] | None = None) -> float:
    """TULLE_PROXY_IDENTITY_MAX_REFRESH (as Linkerd's LINKERD2_PROXY_IDENTITY_MAX_REFRESH;
    default 24h): the longest a certificate goes without a renewal attempt."""
    return _refresh_from_env("TULLE_PROXY_IDENTITY_MAX_REFRESH", DEFAULT_MAX_REFRESH_S, env)


def _refresh_from_env(name: str, default: float, env: Mapping[str, str] | None) -> float:
    env = os.environ if env is None else env
    value = env.get(name, "")
    if not value:
        return default
    from proxy.config import _seconds

    seconds = _seconds(value, name)
    if seconds <= 0:
        raise UserError(f"{name}: must be positive, got {value!r}")
    return seconds


def peer_identity(ssl_object) -> Optional[str]:
    """The peer's verified identity (from its certificate's DNS SAN), or None when it sent
    no certificate. Only verified certificates reach here: the contexts refuse others."""
    return pki.peer_identity(ssl_object)


class CertifyFailed(Exception):
    """One certify attempt that got no usable certificate; the message says why."""


class IdentityClient:
    def __init__(self, bus: Bus, *, identity: str, token_file: str, trust_anchors_pem: bytes,
                 min_refresh_s: float | None = None,
                 max_refresh_s: float | None = None, request_timeout_s: float = 5.0,
                 registry: Registry = REGISTRY):
        """min_refresh_s / max_refresh_s: None reads TULLE_PROXY_IDENTITY_MIN_REFRESH (default
        10 s) / TULLE_PROXY_IDENTITY_MAX_REFRESH (default 24 h)."""
        self.bus = bus
        self.identity = identity
        self.token_file = token_file
        self.min_refresh_s = min_refresh_from_env() if min_refresh_s is None else min_refresh_s
        self.max_refresh_s = max_refresh_from_env() if max_refresh_s is None else max_refresh_s
        self.request_timeout_s = request_timeout_s
        self.log = get_logger(identity=identity)
        self._key = pki.new_key()
        self._key_pem = pki.key_pem(self._key)
        self._public_numbers = self._key.public_key().public_numbers()
        self._csr = pki.new_csr(identity, self._key).decode()
        self._chain_pem: bytes = b""  # leaf, then its chain
        self.server_context: ssl.SSLContext | None = None
        self.client_context: ssl.SSLContext | None = None
        self.expiry: float = 0.0
        self.serial: str = ""
        if not pki.load_certs(trust_anchors_pem):
            raise UserError("the proxy's trust anchors hold no certificate")
        self.trust_anchors_pem: bytes = trust_anchors_pem
        self.attempts = 0  # certify requests made so far
        self._ready = asyncio.Event()
        self._callbacks: list[Callable[[], None]] = []
        self.m_expiry = registry.gauge("identity_cert_expiration_timestamp_seconds",
                                       "When the proxy's current certificate expires (unix seconds)")
        self.m_refresh = registry.counter("identity_cert_refresh_total", "Certificates obtained by the proxy")
        self.m_rejected = registry.counter("identity_cert_rejected_total",
                                           "Certificates from the identity service refused: not chaining to the trust anchors")

    # --- state --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.server_context is not None and self.client_context is not None

    async def wait_ready(self) -> None:
        await self._ready.wait()

    def on_change(self, fn: Callable[[], None]) -> None:
        """Call `fn` after the TLS contexts were replaced (new certificate or new anchors)."""
        self._callbacks.append(fn)

    # --- loops --------------------------------------------------------------------------

    async def run(self) -> None:
        """Certify, then renew forever. Returns only when cancelled."""
        await self._certify_forever()

    async def _certify_forever(self) -> None:
        failures = 0
        while True:
            try:
                resp, leaf = await self._certify_once()
                self._install(resp, leaf)
            except CertifyFailed as e:
                failures += 1
                now = time.time()
                if self.expiry > now:
                    delay = refresh_delay(self.expiry, now, min_refresh_s=self.min_refresh_s, max_refresh_s=self.max_refresh_s)
                else:
                    delay = retry_delay(failures - 1, cap_s=self.min_refresh_s)
                self.log.warning("certify failed; will retry", error=str(e), retry_in=round(delay, 2),
                                 keeping_current=bool(self.serial) and self.expiry > now)
            except Exception as e:  # never let a bug end renewal: log and retry
                failures += 1
                delay = retry_delay(failures - 1, cap_s=self.min_refresh_s)
                self.log.exception("certify failed unexpectedly", retry_in=round(delay, 2), error=repr(e))
            else:
                failures = 0
                delay = refresh_delay(self.expiry, time.time(), min_refresh_s=self.min_refresh_s,
                                      max_refresh_s=self.max_refresh_s)
                self.log.info("certificate obtained", serial=resp.serial, expiry=round(self.expiry, 3),
                              refresh_in=round(delay, 2))
            await asyncio.sleep(delay)

    async def _certify_once(self) -> tuple[schemas.CertifyResponse, x509.Certificate]:
        self.attempts += 1
        try:
            token = Path(self.token_file).read_text().strip() if self.token_file else ""
        except OSError as e:
            raise CertifyFailed(f"cannot read the token file {self.token_file}: {e.strerror or e}") from None
        req = schemas.CertifyRequest(identity=self.identity, token=token, csr=self._csr)
        try:
            resp = await self.bus.request(schemas.CERTIFY_SUBJECT, req, schemas.CertifyResponse,
                                          timeout=self.request_timeout_s)
        except BusError as e:
            raise CertifyFailed(str(e)) from None
        if resp.error is not None:
            raise CertifyFailed(f"{resp.error.code}: {resp.error.message}")
        try:
            leaf = pki.load_certs(resp.leaf)[0]
            chain = [c for pem in resp.chain for c in pki.load_certs(pem)]
        except (ValueError, IndexError):
            raise CertifyFailed("the reply's certificate does not parse") from None
        if pki.cert_identity(leaf) != self.identity:
            raise CertifyFailed(f"the reply certifies {pki.cert_identity(leaf)!r}, not {self.identity!r}")
        if leaf.public_key().public_numbers() != self._public_numbers:
            raise CertifyFailed("the reply's certificate is not for this proxy's key")
        try:
            pki.verify_leaf(leaf, chain, self.trust_anchors_pem, self.identity)
        except pki.ChainError as e:
            self.m_rejected.inc()
            raise CertifyFailed(f"the reply's certificate does not chain to this proxy's trust anchors: {e}") from None
        return resp, leaf

    def _install(self, resp: schemas.CertifyResponse, leaf: x509.Certificate) -> None:
        chain = b"".join(p.encode() if p.endswith("\n") else p.encode() + b"\n" for p in [resp.leaf, *resp.chain])
        contexts = self._contexts(chain, self.trust_anchors_pem)
        if contexts is None:
            raise CertifyFailed("the certificate does not load into a TLS context")
        self._chain_pem = chain
        self.expiry = leaf.not_valid_after_utc.timestamp()
        self.serial = pki.serial_hex(leaf)
        self.m_expiry.set(self.expiry)
        self.m_refresh.inc()
        self._use(*contexts)

    def _contexts(self, chain_pem: bytes, anchors_pem: bytes) -> Optional[tuple[ssl.SSLContext, ssl.SSLContext]]:
        """New server and client contexts, or None (logged) when OpenSSL refuses the material."""
        try:
            return (pki.ssl_context_from_pem(server=True, cert_chain_pem=chain_pem, key_pem_bytes=self._key_pem,
                                             anchors_pem=anchors_pem),
                    pki.ssl_context_from_pem(server=False, cert_chain_pem=chain_pem, key_pem_bytes=self._key_pem,
                                             anchors_pem=anchors_pem))
        except (ssl.SSLError, ValueError, OSError) as e:
            self.log.error("could not build TLS contexts; keeping the current ones", error=str(e))
            return None

    def _use(self, server: ssl.SSLContext, client: ssl.SSLContext) -> None:
        """Swap in new contexts (new objects: open connections keep theirs) and tell listeners."""
        self.server_context, self.client_context = server, client
        self._ready.set()
        for fn in list(self._callbacks):
            try:
                fn()
            except Exception:
                self.log.exception("identity change listener failed")

    # --- listeners ----------------------------------------------------------------------

    def listener_context(self) -> ssl.SSLContext:
        """A server context for a long-lived listener that always presents the *current*
        certificate: at each handshake it switches to `server_context` (SNI callback, which
        OpenSSL runs before choosing the certificate). Handshakes before the first
        certificate are refused."""
        base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        base.minimum_version = ssl.TLSVersion.TLSv1_2
        base.verify_mode = ssl.CERT_OPTIONAL  # OpenSSL keeps the first context's verify mode
        base.set_alpn_protocols([pki.ALPN_PROXY])

        def pick(ssl_object, server_name, _ctx):
            current = self.server_context
            if current is None:
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
            ssl_object.context = current
            return None

        base.sni_callback = pick
        return base
