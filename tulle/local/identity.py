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


def write_token(directory: Path, secret: bytes, namespace: str, name: str, service_account: str,
                owner_uid: Optional[int] = None) -> Path:
    """Mint the workload's token into <directory>/tokens/<ns>.<name>.token, readable only by its proxy."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    os.chmod(tokens, 0o711)
    path = tokens / f"{namespace}.{name}.token"
    _write(path, pki.make_local_token(secret, namespace, service_account).encode(), 0o400)
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
