"""The certificate authority's decisions, without I/O.

- `load_issuer` turns the three PEM blobs an operator provides (trust anchors, issuer
  certificate, issuer key) into an `Issuer`, or refuses them with an `IssuerError` that
  names the file (or Secret key) at fault: the issuer must be a CA, hold the matching
  P-256 key, be valid now, and chain to one of the anchors.
- `CertificateAuthority.certify` decides one certify request, given which service account
  the token proved: it answers a signed leaf or a typed error, and never signs anything
  but exactly the identity that service account owns.

Both are pure (the clock is a parameter), so they are tested in microseconds; reading
files, Secrets, tokens and NATS is the adapters' job (sources.py, tokens.py, server.py).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Optional, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tulle import pki
from tulle.schemas import CertifyError, CertifyRequest, CertifyResponse, TrustBundle, identity_name

DEFAULT_LIFETIME = dt.timedelta(hours=24)  # Linkerd identity.issuer.issuanceLifetime
DEFAULT_CLOCK_SKEW = dt.timedelta(seconds=20)  # Linkerd identity.issuer.clockSkewAllowance
ISSUER_EXPIRY_WARNING = dt.timedelta(days=60)


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class IssuerError(ValueError):
    """Issuer material that cannot be used; the message names the file or key at fault."""


@dataclass(frozen=True)
class IssuerFiles:
    """What each piece of issuer material is called where it came from, for messages."""

    anchors: str = "ca.crt"
    cert: str = "issuer.crt"
    key: str = "issuer.key"


@dataclass(frozen=True)
class Issuer:
    """A validated issuer: what signs leaves, and what proxies must trust."""

    ca: pki.CA
    chain_pem: tuple[str, ...]  # issuer first, then any intermediates; never the anchor
    anchors: tuple[x509.Certificate, ...]
    anchors_pem: str  # every anchor, re-encoded (so whitespace never looks like a change)
    not_after: dt.datetime  # the earliest expiry along issuer -> anchor: no leaf outlives it
    fingerprint: str = field(default="")  # sha256 of the issuer certificate, for logs and events

    @property
    def expiry(self) -> float:
        return self.ca.cert.not_valid_after_utc.timestamp()


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
        return True
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _valid_at(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def load_issuer(anchors_pem: bytes, cert_pem: bytes, key_pem: bytes, *, now: Optional[dt.datetime] = None,
                names: IssuerFiles = IssuerFiles()) -> Issuer:
    """Validate issuer material; IssuerError (naming the file at fault) when it is unusable."""
    now = now or now_utc()
    try:
        anchors = pki.load_certs(anchors_pem)
    except ValueError:
        raise IssuerError(f"{names.anchors}: no PEM certificate found") from None
    if not anchors:
        raise IssuerError(f"{names.anchors}: no PEM certificate found")
    for a in anchors:
        if not _is_ca(a):
            raise IssuerError(f"{names.anchors}: {_subject(a)} is not a CA certificate")
    try:
        certs = pki.load_certs(cert_pem)
    except ValueError:
        raise IssuerError(f"{names.cert}: no PEM certificate found") from None
    if not certs:
        raise IssuerError(f"{names.cert}: no PEM certificate found")
    issuer_cert = certs[0]
    if not _is_ca(issuer_cert):
        raise IssuerError(f"{names.cert}: {_subject(issuer_cert)} is not a CA certificate (BasicConstraints CA=false)")
    pub = issuer_cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, ec.SECP256R1):
        raise IssuerError(f"{names.cert}: the issuer's key must be ECDSA P-256")
    try:
        key = pki.load_key(key_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise IssuerError(f"{names.key}: not a usable private key: {e}") from None
    if key.public_key().public_numbers() != pub.public_numbers():
        raise IssuerError(f"{names.key}: the key does not match the certificate in {names.cert}")
    if not _valid_at(issuer_cert, now):
        raise IssuerError(f"{names.cert}: {_subject(issuer_cert)} is valid from "
                          f"{issuer_cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
                          f"{issuer_cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, not now")

    # The chain the file carries (issuer, then intermediates) must link up, then end at an anchor.
    anchor_ders = {_der(a) for a in anchors}
    chain = [issuer_cert] + [c for c in certs[1:] if _der(c) not in anchor_ders]  # a copy of the root is not a link
    for child, parent in zip(chain, chain[1:]):
        if not _issued_by(child, parent):
            raise IssuerError(f"{names.cert}: {_subject(child)} is not signed by {_subject(parent)}, the next certificate in the file")
        if not _valid_at(parent, now):
            raise IssuerError(f"{names.cert}: the intermediate {_subject(parent)} is not valid now")
    top = chain[-1]
    if _der(top) in anchor_ders:
        anchor = top  # the issuer is itself an anchor
    else:
        anchor = next((a for a in anchors if _issued_by(top, a)), None)
        if anchor is None:
            raise IssuerError(f"{names.cert}: {_subject(top)} does not chain to any trust anchor in {names.anchors}")
    if not _valid_at(anchor, now):
        raise IssuerError(f"{names.anchors}: the anchor {_subject(anchor)} that signs the issuer is not valid now")
    not_after = min([c.not_valid_after_utc for c in chain] + [anchor.not_valid_after_utc])
    return Issuer(
        ca=pki.CA(issuer_cert, key),
        chain_pem=tuple(pki.cert_pem(c).decode() for c in chain),
        anchors=tuple(anchors),
        anchors_pem="".join(pki.cert_pem(a).decode() for a in anchors),
        not_after=not_after,
        fingerprint=pki.fingerprint(pki.cert_pem(issuer_cert)),
    )


def issuer_warnings(issuer: Issuer, now: Optional[dt.datetime] = None) -> list[str]:
    """Things an operator must act on soon (logged at load)."""
    now = now or now_utc()
    left = issuer.not_after - now
    if left < ISSUER_EXPIRY_WARNING:
        return [f"the issuer certificate chain expires in {left.days} days "
                f"({issuer.not_after:%Y-%m-%dT%H:%M:%SZ}); rotate the issuer before then"]
    return []


def trust_bundle(issuer: Issuer, trust_domain: str) -> TrustBundle:
    return TrustBundle(anchors_pem=issuer.anchors_pem, trust_domain=trust_domain, issuer_expiry=issuer.expiry)


def _error(code: str, message: str) -> CertifyResponse:
    return CertifyResponse(error=CertifyError(code, message))  # type: ignore[arg-type]


class CertificateAuthority:
    """Decides certify requests with the current issuer; `issuer` is swapped on reload."""

    def __init__(self, issuer: Optional[Issuer], *, trust_domain: str = "cluster.local",
                 lifetime: dt.timedelta = DEFAULT_LIFETIME, clock_skew: dt.timedelta = DEFAULT_CLOCK_SKEW):
        self.issuer = issuer
        self.trust_domain = trust_domain
        self.lifetime = lifetime
        self.clock_skew = clock_skew

    def certify(self, req: CertifyRequest, proven: Optional[tuple[str, str]],
                now: Optional[dt.datetime] = None) -> CertifyResponse:
        """Sign `req` if the token proved (namespace, serviceaccount) and the CSR asks for
        exactly that account's identity; a typed error otherwise."""
        if proven is None:
            return _error("unauthenticated", "the token does not prove a service account")
        ns, sa = proven
        identity = identity_name(sa, ns, self.trust_domain)
        if req.identity != identity:
            return _error("name-mismatch", f"the token proves {identity}, the request asks for {req.identity!r}")
        try:
            csr = pki.check_csr(req.csr, identity)
        except pki.CSRError as e:
            return _error(e.code, str(e))
        issuer = self.issuer
        if issuer is None:
            return _error("internal", "no issuer is loaded yet")
        now = now or now_utc()
        # Never outlive the issuer's chain (sign_leaf clamps to the issuer only; the anchor may expire first).
        lifetime = min(self.lifetime, issuer.not_after - now)
        if lifetime <= dt.timedelta(0):
            return _error("internal", "the issuer has expired")
        leaf = pki.sign_leaf(issuer.ca, csr, identity, lifetime=lifetime, skew=self.clock_skew, now=now)
        return CertifyResponse(
            leaf=pki.cert_pem(leaf).decode(),
            chain=list(issuer.chain_pem),
            expiry=leaf.not_valid_after_utc.timestamp(),
            serial=pki.serial_hex(leaf),
        )


def parse_duration(value: str, what: str) -> dt.timedelta:
    """'24h', '20s', '1h30m', '8760h' as a timedelta; ValueError naming `what` otherwise."""
    from tulle.resources.parse import _Invalid, parse_duration_ms

    try:
        ms = parse_duration_ms(value, what)
    except _Invalid:
        raise ValueError(f"{what}: expected a duration such as '24h', '20s' or '90m', got {value!r}") from None
    return dt.timedelta(milliseconds=ms)


def chain_verifies(leaf: x509.Certificate, chain: Sequence[x509.Certificate],
                   anchors: Sequence[x509.Certificate]) -> bool:
    """Whether leaf -> chain... -> one of `anchors` links up by signature (no time check)."""
    path = [leaf, *chain]
    for child, parent in zip(path, path[1:]):
        if not _issued_by(child, parent):
            return False
    return any(_issued_by(path[-1], a) for a in anchors)
