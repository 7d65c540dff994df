"""The secrets an installation needs and `tulle install` makes when none are given: the
identity trust anchors and issuer, the NATS servers' TLS, the injector webhook's TLS.

All keys are ECDSA P-256 (as the identity service and Linkerd require). Checks of
material a user gives raise UserError with one line naming the value that is wrong.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tulle import pki
from tulle.errors import UserError

LIFETIME = dt.timedelta(days=365)  # as `linkerd install` generates them
# `tulle upgrade` warns when kept material expires sooner than this.
RENEW_WARNING = dt.timedelta(days=60)


@dataclass(frozen=True)
class TrustMaterial:
    """The identity service's trust: anchors every proxy trusts, and the issuer under them."""

    anchors_pem: str
    issuer_crt_pem: str
    issuer_key_pem: str


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate and key, and the CA its clients check it with."""

    ca_pem: str
    crt_pem: str
    key_pem: str

    def not_after(self) -> dt.datetime:
        return pki.load_certs(self.crt_pem)[0].not_valid_after_utc


# --- generation ---------------------------------------------------------------------------


def generate_trust(trust_domain: str) -> tuple[TrustMaterial, pki.CA]:
    """New anchors and issuer; the anchor (with its key) is returned to be saved by the user."""
    anchor = pki.new_trust_anchor(trust_domain, LIFETIME)
    issuer = pki.new_issuer(anchor, trust_domain, LIFETIME)
    return TrustMaterial(anchor.cert_pem.decode(), issuer.cert_pem.decode(), issuer.key_pem.decode()), anchor


def _ca(common_name: str, now: dt.datetime) -> pki.CA:
    key = pki.new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return pki.CA(cert, key)


def _server_tls(ca_name: str, dns_names: list[str], *, client_auth: bool) -> ServerTLS:
    now = dt.datetime.now(dt.timezone.utc)
    ca = _ca(ca_name, now)
    key = pki.new_key()
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return ServerTLS(ca.cert_pem.decode(), pki.cert_pem(cert).decode(), pki.key_pem(key).decode())


def nats_dns_names(namespace: str, cluster_domain: str) -> list[str]:
    """Every name a client or a route reaches a NATS server by."""
    svc, headless = "tulle-nats", "tulle-nats-headless"
    names = [f"{svc}.{namespace}.svc.{cluster_domain}", f"{svc}.{namespace}.svc", f"{svc}.{namespace}", svc]
    names += [f"*.{headless}.{namespace}.svc.{cluster_domain}", f"*.{headless}.{namespace}.svc",
              f"{headless}.{namespace}.svc.{cluster_domain}", f"{headless}.{namespace}.svc"]
    return names


def generate_nats_tls(namespace: str, cluster_domain: str) -> ServerTLS:
    # clientAuth too: the servers present this certificate to each other on their routes.
    return _server_tls(f"nats.tulle.{namespace}", nats_dns_names(namespace, cluster_domain), client_auth=True)


def generate_webhook_tls(namespace: str, cluster_domain: str) -> ServerTLS:
    host = f"tulle-proxy-injector.{namespace}.svc"
    return _server_tls(f"webhook.tulle.{namespace}", [host, f"{host}.{cluster_domain}"], client_auth=False)


# --- checks ------------------------------------------------------------------------------------


def _certs(pem: str, what: str) -> list[x509.Certificate]:
    try:
        certs = pki.load_certs(pem)
    except ValueError:
        certs = []
    if not certs:
        raise UserError(f"{what}: not a PEM certificate")
    return certs


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def check_trust(m: TrustMaterial, *, now: Optional[dt.datetime] = None,
                names: Optional[dict[str, str]] = None) -> None:
    """The anchors are CAs, the issuer is a CA signed by one of them with a matching
    ECDSA P-256 key, and none has expired. `names` says where each piece came from."""
    names = {"anchors": "identityTrustAnchorsPEM", "crt": "identity.issuer.tls.crtPEM",
             "key": "identity.issuer.tls.keyPEM", **(names or {})}
    now = now or dt.datetime.now(dt.timezone.utc)
    anchors = _certs(m.anchors_pem, names["anchors"])
    for a in anchors:
        if not _is_ca(a):
            raise UserError(f"{names['anchors']}: {a.subject.rfc4514_string()} is not a CA certificate")
        if a.not_valid_after_utc < now:
            raise UserError(f"{names['anchors']}: {a.subject.rfc4514_string()} expired on {a.not_valid_after_utc:%Y-%m-%d}")
    issuer = _certs(m.issuer_crt_pem, names["crt"])[0]
    if not _is_ca(issuer):
        raise UserError(f"{names['crt']}: the issuer must be a CA certificate (basicConstraints CA:TRUE)")
    if issuer.not_valid_after_utc < now:
        raise UserError(f"{names['crt']}: the issuer expired on {issuer.not_valid_after_utc:%Y-%m-%d}")
    try:
        key = pki.load_key(m.issuer_key_pem.encode())
    except (ValueError, TypeError) as e:
        reason = str(e) if "ECDSA" in str(e) else "not a PEM private key"
        raise UserError(f"{names['key']}: {reason}") from None
    if key.public_key().public_numbers() != issuer.public_key().public_numbers():
        raise UserError(f"{names['key']}: does not belong to the certificate in {names['crt']}")
    if not any(_signed_by(issuer, a) for a in anchors):
        raise UserError(f"{names['crt']}: not signed by any of the trust anchors in {names['anchors']}")


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def check_server_tls(t: ServerTLS, what: str) -> None:
    crt = _certs(t.crt_pem, f"{what}.crtPEM")[0]
    ca = _certs(t.ca_pem, f"{what}.caPEM" if what == "nats.tls" else f"{what}.caBundle")
    try:
        key = pki.load_key(t.key_pem.encode())
    except (ValueError, TypeError):
        key = None
    if key is None or key.public_key().public_numbers() != crt.public_key().public_numbers():
        raise UserError(f"{what}.keyPEM: not the ECDSA P-256 key of {what}.crtPEM")
    if not any(_signed_by(crt, c) for c in ca):
        raise UserError(f"{what}.crtPEM: not signed by its CA")


# --- saving ------------------------------------------------------------------------------------


def default_trust_dir(namespace: str) -> Path:
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "tulle" / "trust"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return base / f"{namespace}-{stamp}"


def write_trust_dir(directory: Path, material: TrustMaterial, anchor: pki.CA) -> Path:
    """Save generated trust material for later rotations: the anchor's key signs new
    issuers. The folder is 0700 and each file 0600; an existing non-empty folder is refused."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"--trust-dir {directory}: exists and is not an empty folder")
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        files = {"trust-anchors.crt": material.anchors_pem, "trust-anchor.key": anchor.key_pem.decode(),
                 "issuer.crt": material.issuer_crt_pem, "issuer.key": material.issuer_key_pem}
        for name, text in files.items():
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
    except OSError as e:
        raise UserError(f"--trust-dir {directory}: cannot write: {e.strerror}") from None
    return directory


def read_pem_file(path: str, flag: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path}: not a PEM text file") from None
