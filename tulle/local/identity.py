"""Identity material of a local run: what the identity service signs with, and what each
proxy proves itself with.

`<state>/identity/`: ca.crt (the trust anchor), issuer.crt / issuer.key (the identity
service's `--issuer-dir`), token-secret (the HMAC secret of local tokens, 0600, read by
`--token-secret-file`) and tokens/<ns>.<name>.token (one per workload, handed to its
proxy as TULLE_PROXY_TOKEN_FILE, readable by the proxy's user only).

The anchor and issuer are made once per state directory and kept: certificates issued
in an earlier run stay verifiable, as in a cluster whose trust root outlives pods.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Optional

from tulle import pki


def ensure_identity(directory: Path, trust_domain: str = "cluster.local") -> bytes:
    """Create the anchor, issuer and token secret when missing; return the token secret.

    The secret is stored as hex text and the file's bytes *are* the secret, so any
    reader (read_bytes, or read_text().strip()) gets the same key.
    """
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o711)  # the proxy's user must reach its token file below
    ca, crt, key = directory / "ca.crt", directory / "issuer.crt", directory / "issuer.key"
    if not (ca.is_file() and crt.is_file() and key.is_file()) or _expired(crt):
        anchor = pki.new_trust_anchor(trust_domain)
        issuer = pki.new_issuer(anchor, trust_domain)
        _write(key, issuer.key_pem, 0o600)
        _write(crt, issuer.cert_pem, 0o644)
        _write(ca, anchor.cert_pem, 0o644)
    secret_file = directory / "token-secret"
    if not secret_file.is_file() or not secret_file.read_bytes().strip():
        _write(secret_file, secrets.token_hex(32).encode(), 0o600)
    return secret_file.read_bytes()


def _expired(cert_file: Path) -> bool:
    import datetime as dt

    try:
        cert = pki.load_certs(cert_file.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return True
    return cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)


# Local tokens live a day, like a projected service-account token; the runner mints a new
# one when half of that is gone, as the kubelet refreshes projected tokens before they expire.
TOKEN_LIFETIME_S = 24 * 3600.0
TOKEN_REFRESH_S = TOKEN_LIFETIME_S / 2


def token_audience(trust_domain: str) -> str:
    return f"identity.tulle.{trust_domain}"


def write_token(directory: Path, secret: bytes, namespace: str, name: str, service_account: str,
                owner_uid: Optional[int] = None, *, trust_domain: str = "cluster.local",
                lifetime_s: float = TOKEN_LIFETIME_S) -> Path:
    """Mint the workload's token into <directory>/tokens/<ns>.<name>.token, readable only by its proxy."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    os.chmod(tokens, 0o711)
    path = tokens / f"{namespace}.{name}.token"
    token = pki.make_local_token(secret, namespace, service_account, name, token_audience(trust_domain),
                                 lifetime_s=lifetime_s)
    _write(path, token.encode(), 0o400)
    if owner_uid is not None and owner_uid != os.geteuid():
        os.chown(path, owner_uid, owner_uid)
    return path


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def ensure_bus_tls(directory: Path, host: str) -> "busauth.TLSFiles":
    """A CA and a server certificate for NATS at `host` (made once, kept): TLS on the bus in
    local mode (`tulle up --nats-tls`), and between the nodes of a cluster (routes, where
    each node is also the other's client: the certificate serves both). Its own CA,
    separate from the mesh's trust anchors."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from tulle import busauth

    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    ca_file, cert_file, key_file = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    if ca_file.is_file() and cert_file.is_file() and key_file.is_file() and not _expired(cert_file) \
            and _names_host(cert_file, host) and _serves_both_ends(cert_file):
        return busauth.TLSFiles(str(cert_file), str(key_file), str(ca_file))
    ca = pki.new_trust_anchor("nats.local")
    key = pki.new_key()
    now = dt.datetime.now(dt.timezone.utc)
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    if host != "127.0.0.1":
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tulle-nats")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca.key, hashes.SHA256()))
    _write(key_file, pki.key_pem(key), 0o600)
    _write(cert_file, pki.cert_pem(cert), 0o644)
    _write(ca_file, ca.cert_pem, 0o644)
    return busauth.TLSFiles(str(cert_file), str(key_file), str(ca_file))


def _serves_both_ends(cert_file: Path) -> bool:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        eku = pki.load_certs(cert_file.read_bytes())[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (OSError, ValueError, IndexError, x509.ExtensionNotFound):
        return False
    return ExtendedKeyUsageOID.CLIENT_AUTH in eku and ExtendedKeyUsageOID.SERVER_AUTH in eku


def _names_host(cert_file: Path, host: str) -> bool:
    import ipaddress

    from cryptography import x509

    try:
        cert = pki.load_certs(cert_file.read_bytes())[0]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return ipaddress.ip_address(host) in san.get_values_for_type(x509.IPAddress)
    except (OSError, ValueError, IndexError, x509.ExtensionNotFound):
        return False
