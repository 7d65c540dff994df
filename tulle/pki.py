"""Certificates and keys: the trust anchor, the issuer, workload leaves, CSRs, and TLS
contexts built from in-memory material.

All keys are ECDSA P-256 (DESIGN.md / Linkerd). Identities look like
`<sa>.<ns>.serviceaccount.identity.tulle.<trust-domain>`; a leaf carries it as its one
DNS SAN and also as the SPIFFE URI `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

Python's ssl module loads certificates and keys only from files. So that a private key
never touches a disk, `ssl_context_from_pem` hands them over through memfd files: RAM
only, anonymous, gone when closed.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
import ssl
from dataclasses import dataclass
from typing import Optional

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import orjson

IDENTITY_RE = re.compile(
    r"^(?P<sa>[a-z0-9]([-a-z0-9.]*[a-z0-9])?)\.(?P<ns>[a-z0-9]([-a-z0-9]*[a-z0-9])?)"
    r"\.serviceaccount\.identity\.tulle\.(?P<td>[a-z0-9]([-a-z0-9.]*[a-z0-9])?)$")
ALPN_PROXY = "tulle/1"  # ALPN offered between proxies


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the key must be ECDSA P-256")
    return key


def load_certs(pem: bytes | str) -> list[x509.Certificate]:
    if isinstance(pem, str):
        pem = pem.encode()
    return x509.load_pem_x509_certificates(pem)


def spiffe_id(identity: str) -> Optional[str]:
    m = IDENTITY_RE.match(identity)
    if m is None:
        return None
    return f"spiffe://{m['td']}/ns/{m['ns']}/sa/{m['sa']}"


def parse_identity(identity: str) -> Optional[tuple[str, str, str]]:
    """(serviceaccount, namespace, trust domain) of an identity name, or None."""
    m = IDENTITY_RE.match(identity)
    return (m["sa"], m["ns"], m["td"]) if m else None


# --- CAs ---------------------------------------------------------------------------------


@dataclass
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)


def _ca_cert(subject_cn: str, key, issuer: Optional[CA], lifetime: dt.timedelta, path_len: Optional[int],
             not_before: Optional[dt.datetime] = None) -> x509.Certificate:
    now = not_before or _now()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=20))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    return builder.sign(issuer.key if issuer else key, hashes.SHA256())


def new_trust_anchor(trust_domain: str = "cluster.local", lifetime: dt.timedelta = dt.timedelta(days=365)) -> CA:
    key = new_key()
    return CA(_ca_cert(f"root.tulle.{trust_domain}", key, None, lifetime, 1), key)


def new_issuer(anchor: CA, trust_domain: str = "cluster.local",
               lifetime: dt.timedelta = dt.timedelta(days=365)) -> CA:
    key = new_key()
    return CA(_ca_cert(f"identity.tulle.{trust_domain}", key, anchor, lifetime, 0), key)


# --- CSRs and leaves ---------------------------------------------------------------------


def new_csr(identity: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PEM CSR for `identity`: CN and the one DNS SAN are the identity."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


_CSR_PARSE_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion, x509.UnsupportedGeneralNameType)


class CSRError(ValueError):
    """Why a CSR cannot be signed; `code` is the certify error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def check_csr(csr_pem: bytes | str, identity: str) -> x509.CertificateSigningRequest:
    """The CSR if it asks for exactly `identity` and nothing else; CSRError otherwise."""
    if isinstance(csr_pem, str):
        csr_pem = csr_pem.encode()
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except _CSR_PARSE_ERRORS as e:
        raise CSRError("invalid-csr", f"not a PEM certificate request: {e}") from None
    # Parsing is lazy: a request that loads can still hold an unknown version, key type
    # or malformed extensions. Whatever the sender got wrong is their error, never ours.
    try:
        signature_ok = csr.is_signature_valid
        pub = csr.public_key()
        extensions = csr.extensions
    except _CSR_PARSE_ERRORS as e:
        raise CSRError("invalid-csr", f"the request does not parse: {e}") from None
    if not signature_ok:
        raise CSRError("invalid-csr", "the request's signature does not verify")
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, ec.SECP256R1):
        raise CSRError("invalid-csr", "the key must be ECDSA P-256")
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CSRError("name-mismatch", "the request has no subject alternative name") from None
    dns = san.get_values_for_type(x509.DNSName)
    others = [n for n in san if not isinstance(n, x509.DNSName)]
    if dns != [identity] or others:
        raise CSRError("name-mismatch", f"the request must name exactly {identity!r}, it names {[str(n.value) for n in san]}")
    cns = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns not in ([], [identity]):
        raise CSRError("name-mismatch", f"the common name must be empty or {identity!r}, got {cns}")
    try:
        bc = extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise CSRError("invalid-csr", "the request asks for a CA certificate")
    except x509.ExtensionNotFound:
        pass
    return csr


def sign_leaf(issuer: CA, csr: x509.CertificateSigningRequest, identity: str, *,
              lifetime: dt.timedelta = dt.timedelta(hours=24), skew: dt.timedelta = dt.timedelta(seconds=20),
              now: Optional[dt.datetime] = None) -> x509.Certificate:
    """Sign a workload leaf. Backdated by `skew`; never outlives the issuer."""
    now = now or _now()
    not_after = min(now + lifetime, issuer.cert.not_valid_after_utc)
    names: list[x509.GeneralName] = [x509.DNSName(identity)]
    uri = spiffe_id(identity)
    if uri:
        names.append(x509.UniformResourceIdentifier(uri))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(issuer.cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - skew)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )


def issue_leaf(issuer: CA, identity: str, *, lifetime: dt.timedelta = dt.timedelta(hours=24),
               now: Optional[dt.datetime] = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Key + leaf in one step (tests, benchmarks)."""
    key = new_key()
    csr = x509.load_pem_x509_csr(new_csr(identity, key))
    return sign_leaf(issuer, csr, identity, lifetime=lifetime, now=now), key


def cert_identity(cert: x509.Certificate) -> Optional[str]:
    """The identity (first DNS SAN) a leaf certifies."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    dns = san.get_values_for_type(x509.DNSName)
    return dns[0] if dns else None


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


# --- TLS contexts from memory ----------------------------------------------------------------


def _memfd(data: bytes, name: str) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def ssl_context_from_pem(*, server: bool, cert_chain_pem: bytes, key_pem_bytes: bytes, anchors_pem: bytes,
                         require_client_cert: bool = False) -> ssl.SSLContext:
    """A TLS 1.2+ context that presents `cert_chain_pem` (leaf first) and trusts only
    `anchors_pem`. Clients verify the server's name (the expected identity, passed as
    server_hostname); servers verify client certificates when one is sent.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED if (not server or require_client_cert) else ssl.CERT_OPTIONAL
    if not server:
        ctx.check_hostname = True
    ctx.set_alpn_protocols([ALPN_PROXY])
    ctx.load_verify_locations(cadata=anchors_pem.decode())
    cert_fd = _memfd(cert_chain_pem, "tulle-cert")
    key_fd = _memfd(key_pem_bytes, "tulle-key")
    try:
        ctx.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}")
    finally:
        os.close(cert_fd)
        os.close(key_fd)
    return ctx


class ChainError(ValueError):
    """A certificate that does not chain to the trust anchors (or not for the right name)."""


def verify_leaf(leaf: x509.Certificate, chain: list[x509.Certificate], anchors_pem: bytes, identity: str, *,
                now: Optional[dt.datetime] = None) -> None:
    """Raise ChainError unless `leaf` certifies `identity`, is valid now and chains through
    `chain` to one of `anchors_pem` (RFC 5280 path validation, by cryptography's verifier)."""
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    try:
        anchors = load_certs(anchors_pem)
    except ValueError as e:
        raise ChainError(f"the trust anchors do not parse: {e}") from None
    if not anchors:
        raise ChainError("no trust anchors")
    try:
        verifier = (PolicyBuilder().store(Store(anchors)).time(now or _now())
                    .build_server_verifier(x509.DNSName(identity)))
        verifier.verify(leaf, chain)
    except (VerificationError, ValueError) as e:
        raise ChainError(str(e)) from None


def peer_identity(ssl_object) -> Optional[str]:
    """The verified identity of the TLS peer (its first DNS SAN), or None without a certificate."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            return value
    return None


def trust_root_sha256(anchors_pem: bytes | str) -> str:
    """The fingerprint of a trust-anchor bundle as annotations and heartbeats carry it:
    sha256 of the PEM text without surrounding whitespace, plus one newline."""
    if isinstance(anchors_pem, str):
        anchors_pem = anchors_pem.encode()
    return hashlib.sha256(anchors_pem.strip() + b"\n").hexdigest()
def cert_fingerprints(pem: bytes | str) -> list[str]:
    """sha256 (hex) of each certificate's DER in a PEM bundle: the same certificate gives the
    same value whatever its PEM's line breaks. How a proxy reports the anchors it trusts
    (ProxyHeartbeat.trust_anchors) and how `tulle check` compares them."""
    if isinstance(pem, str):
        pem = pem.encode()
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []
    return [hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).hexdigest() for c in certs]


def fingerprint(pem: bytes | str) -> str:
    if isinstance(pem, str):
        pem = pem.encode()
    return hashlib.sha256(pem).hexdigest()


# --- local-mode tokens ------------------------------------------------------------------------
# In Kubernetes a projected service-account token proves who a proxy is (TokenReview).
# In local mode the runner mints an HMAC token per workload with a secret only it and the
# identity service read. Like a projected token it names its workload (pod), is meant for
# one audience (`identity.tulle.<trust-domain>`) and expires.

LOCAL_TOKEN_LIFETIME_S = 24 * 3600


@dataclass(frozen=True)
class LocalTokenClaims:
    namespace: str
    serviceaccount: str
    workload: str
    audience: str
    expires: float


def new_token_secret() -> bytes:
    return secrets.token_bytes(32)


def make_local_token(secret: bytes, namespace: str, serviceaccount: str, workload: str, audience: str, *,
                     lifetime_s: float = LOCAL_TOKEN_LIFETIME_S, now: Optional[float] = None) -> str:
    import time

    issued = int(now if now is not None else time.time())
    body = base64.urlsafe_b64encode(orjson.dumps({
        "ns": namespace, "sa": serviceaccount, "pod": workload, "aud": audience,
        "iat": issued, "exp": issued + int(lifetime_s), "n": secrets.token_hex(8)})).rstrip(b"=")
    mac = base64.urlsafe_b64encode(hmac.new(secret, body, hashlib.sha256).digest()).rstrip(b"=")
    return f"tulle-local.{body.decode()}.{mac.decode()}"


def verify_local_token(secret: bytes, token: str, *, audience: str,
                       now: Optional[float] = None) -> Optional[LocalTokenClaims]:
    """What the token proves, or None: a bad MAC, another audience, or expired."""
    import time

    try:
        prefix, body, mac = token.split(".")
    except ValueError:
        return None
    if prefix != "tulle-local":
        return None
    want = base64.urlsafe_b64encode(hmac.new(secret, body.encode(), hashlib.sha256).digest()).rstrip(b"=")
    if not hmac.compare_digest(want, mac.encode()):
        return None
    try:
        c = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        claims = LocalTokenClaims(str(c["ns"]), str(c["sa"]), str(c["pod"]), str(c["aud"]), float(c["exp"]))
    except (ValueError, KeyError, TypeError):
        return None
    if claims.audience != audience:
        return None
    if claims.expires <= (now if now is not None else time.time()):
        return None
    return claims
