"""The trust anchors and the issuer: the checks both modes share (Linkerd's
`linkerd-identity` category, one for one).

The adapter reads the material (files of a local run, the trust-roots ConfigMap and the
issuer Secret of a cluster) into `IdentityMaterial`, saying where each piece came from
and how a person fixes it there; the checks only look at it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Callable, Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from tulle.check.core import Check, Outcome, error, ok, warning

# Linkerd warns this long before an anchor or issuer expires.
EXPIRY_WARNING = dt.timedelta(days=60)


@dataclass
class IdentityMaterial:
    anchors_where: str  # "ConfigMap tulle/tulle-identity-trust-roots key ca-bundle.crt", a file path
    issuer_where: str
    anchors_pem: Optional[bytes] = None  # None: could not be read (anchors_problem says why)
    issuer_cert_pem: Optional[bytes] = None
    issuer_key_pem: Optional[bytes] = None
    anchors_problem: str = ""
    issuer_problem: str = ""
    # How a person replaces each piece where it lives (one sentence each).
    fix_anchors: str = "make new trust anchors and an issuer with `tulle identity init`"
    fix_issuer: str = "make a new issuer under the anchor with `tulle identity init --anchor-cert ... --anchor-key ...`"
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    # --- parsed once, on first use -------------------------------------------------------------

    def anchors(self) -> list[x509.Certificate]:
        if self.anchors_pem is None:
            return []
        try:
            return x509.load_pem_x509_certificates(self.anchors_pem)
        except ValueError:
            return []

    def issuer(self) -> Optional[x509.Certificate]:
        if self.issuer_cert_pem is None:
            return None
        try:
            certs = x509.load_pem_x509_certificates(self.issuer_cert_pem)
        except ValueError:
            return None
        return certs[0] if certs else None

    @property
    def usable(self) -> bool:
        """Both parse: the checks past "certificate config is valid" apply."""
        return bool(self.anchors()) and self.issuer() is not None


def _date(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _left(delta: dt.timedelta) -> str:
    days = delta.days
    if days >= 2:
        return f"{days} days"
    hours = int(delta.total_seconds() // 3600)
    return f"{hours} hours" if hours >= 1 else f"{int(delta.total_seconds() // 60)} minutes"


def _name(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string() or "(no subject)"


def _p256(cert: x509.Certificate) -> bool:
    key = cert.public_key()
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)


def _key_matches(key_pem: bytes, cert: x509.Certificate) -> Optional[str]:
    """None when the key is the certificate's; else why not."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        return f"the issuer key does not parse: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        return "the issuer key does not belong to the issuer certificate"
    return None


# --- the checks ---------------------------------------------------------------------------------


def config_valid(m: IdentityMaterial) -> Outcome:
    problems = []
    if m.anchors_pem is None:
        problems.append(f"{m.anchors_where}: {m.anchors_problem or 'missing'}")
    elif not m.anchors():
        problems.append(f"{m.anchors_where}: no PEM certificate in it")
    if m.issuer_cert_pem is None:
        problems.append(f"{m.issuer_where}: {m.issuer_problem or 'missing'}")
    elif m.issuer() is None:
        problems.append(f"{m.issuer_where}: the issuer certificate does not parse")
    elif m.issuer_key_pem is None:
        problems.append(f"{m.issuer_where}: the issuer key is missing")
    else:
        why = _key_matches(m.issuer_key_pem, m.issuer())
        if why:
            problems.append(f"{m.issuer_where}: {why}")
    if problems:
        return error("\n".join(problems), m.fix_anchors if m.anchors_pem is None or not m.anchors() else m.fix_issuer)
    return ok()


def anchors_algorithm(m: IdentityMaterial) -> Optional[Outcome]:
    if not m.usable:
        return None
    bad = [_name(c) for c in m.anchors() if not _p256(c)]
    if bad:
        return error(f"trust anchor {', '.join(bad)} does not use an ECDSA P-256 key", m.fix_anchors)
    return ok()


def anchors_valid_now(m: IdentityMaterial) -> Optional[Outcome]:
    if not m.usable:
        return None
    for c in m.anchors():
        if c.not_valid_before_utc > m.now:
            return error(f"trust anchor {_name(c)} is not valid before {_date(c.not_valid_before_utc)}", m.fix_anchors)
        if c.not_valid_after_utc <= m.now:
            return error(f"trust anchor {_name(c)} expired on {_date(c.not_valid_after_utc)}", m.fix_anchors)
    return ok()


def anchors_not_expiring(m: IdentityMaterial) -> Optional[Outcome]:
    if not m.usable:
        return None
    soon = [c for c in m.anchors() if m.now < c.not_valid_after_utc <= m.now + EXPIRY_WARNING]
    if soon:
        c = min(soon, key=lambda c: c.not_valid_after_utc)
        return warning(f"trust anchor {_name(c)} expires on {_date(c.not_valid_after_utc)} "
                       f"(in {_left(c.not_valid_after_utc - m.now)})", m.fix_anchors)
    return ok()


def issuer_algorithm(m: IdentityMaterial) -> Optional[Outcome]:
    if not m.usable:
        return None
    if not _p256(m.issuer()):
        return error(f"issuer {_name(m.issuer())} does not use an ECDSA P-256 key", m.fix_issuer)
    return ok()


def issuer_valid_now(m: IdentityMaterial) -> Optional[Outcome]:
    if not m.usable:
        return None
    c = m.issuer()
    if c.not_valid_before_utc > m.now:
        return error(f"issuer certificate is not valid before {_date(c.not_valid_before_utc)}", m.fix_issuer)
    if c.not_valid_after_utc <= m.now:
        return error(f"issuer certificate expired on {_date(c.not_valid_after_utc)}", m.fix_issuer)
    return ok()


def issuer_not_expiring(m: IdentityMaterial) -> Optional[Outcome]:
    if not m.usable:
        return None
    c = m.issuer()
    if m.now < c.not_valid_after_utc <= m.now + EXPIRY_WARNING:
        return warning(f"issuer certificate expires on {_date(c.not_valid_after_utc)} "
                       f"(in {_left(c.not_valid_after_utc - m.now)})", m.fix_issuer)
    return ok()


def issuer_chains_to_anchor(m: IdentityMaterial) -> Optional[Outcome]:
    if not m.usable:
        return None
    issuer = m.issuer()
    for anchor in m.anchors():
        try:
            issuer.verify_directly_issued_by(anchor)
            return ok()
        except (ValueError, TypeError, InvalidSignature):  # another key, another name, or another key type
            continue
    return error(f"the issuer ({_name(issuer)}, issued by {issuer.issuer.rfc4514_string()}) is not signed by any "
                 f"trust anchor in {m.anchors_where}", m.fix_issuer)


def identity_checks(material: Callable[[object], Optional[IdentityMaterial]]) -> tuple[Check, ...]:
    """The identity category's checks over whatever facts object `material` reads the
    material from (None: no identity in this installation, nothing is shown)."""

    def over(fn: Callable[[IdentityMaterial], Optional[Outcome]]) -> Callable[[object], Optional[Outcome]]:
        def run(facts):
            m = material(facts)
            return None if m is None else fn(m)
        return run

    return (
        Check("certificate config is valid", over(config_valid)),
        Check("trust anchors are using supported crypto algorithm", over(anchors_algorithm)),
        Check("trust anchors are within their validity period", over(anchors_valid_now)),
        Check("trust anchors are valid for at least 60 days", over(anchors_not_expiring)),
        Check("issuer cert is using supported crypto algorithm", over(issuer_algorithm)),
        Check("issuer cert is within its validity period", over(issuer_valid_now)),
        Check("issuer cert is valid for at least 60 days", over(issuer_not_expiring)),
        Check("issuer cert is issued by the trust anchor", over(issuer_chains_to_anchor)),
    )


def fingerprints(pem: bytes | str) -> set[str]:
    """The anchors of a bundle as ProxyHeartbeat.trust_anchors names them (tulle.pki)."""
    from tulle.pki import cert_fingerprints

    return set(cert_fingerprints(pem))
