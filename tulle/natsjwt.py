"""NATS nkeys and the JWTs of auth callout, on the `nkeys` library (ed25519 over libsodium).

A NATS JWT is `base64url(header).base64url(claims).base64url(signature)`, the header
`{"typ":"JWT","alg":"ed25519-nkey"}`, signed with an nkey; `iss` is the signer's public
key and `jti` a hash of the registered claims (nats-io/jwt v2). Auth callout uses three:
the server's authorization request (to identity), and identity's answer — an
authorization response carrying a user JWT — both signed with the callout issuer's
account key, which nats-server was configured to trust.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import nkeys
import orjson
from nacl.signing import SigningKey

from tulle.busauth import Permissions

_PREFIXES = {"user": nkeys.PREFIX_BYTE_USER, "account": nkeys.PREFIX_BYTE_ACCOUNT}
_HEADER = b'{"typ":"JWT","alg":"ed25519-nkey"}'
JWT_VERSION = 2
MAX_TOKEN_BYTES = 1024 * 1024  # nats-io/jwt's own cap


class JWTError(ValueError):
    """A JWT that does not decode or is not of the expected kind."""


# --- nkeys -----------------------------------------------------------------------------------


def new_seed(kind: str) -> bytes:
    """A fresh nkey seed (`SU...` for a user, `SA...` for an account)."""
    return nkeys.encode_seed(bytes(SigningKey.generate()), _PREFIXES[kind])


def public_key(seed: bytes) -> str:
    return nkeys.from_seed(seed.strip()).public_key.decode()


def read_seed(path: str | Path) -> bytes:
    """The seed in a seed file: its first line that starts with `S` (a bare seed file, or
    the seed section of a NATS creds file)."""
    for line in Path(path).read_bytes().splitlines():
        line = line.strip()
        if line.startswith(b"S") and len(line) >= 56:
            return line
    raise ValueError(f"{path}: no nkey seed in this file")


def ensure_seed(path: Path, kind: str) -> str:
    """Create a seed file (0600) unless it exists; return its public key."""
    if not path.is_file():
        seed = new_seed(kind)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, seed + b"\n")
        finally:
            os.close(fd)
    return public_key(read_seed(path))


# --- JWTs ------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(seed: bytes, claims: dict[str, Any], *, now: Optional[float] = None) -> str:
    """Sign `claims` (with `sub`, and `nats.type`) with the nkey `seed`."""
    kp = nkeys.from_seed(seed)
    body = dict(claims)
    body["iss"] = kp.public_key.decode()
    body["iat"] = int(now if now is not None else time.time())
    registered = {k: body[k] for k in ("aud", "exp", "iat", "iss", "name", "nbf", "sub") if body.get(k)}
    body["jti"] = base64.b32encode(hashlib.new("sha512_256", orjson.dumps(registered)).digest()).decode().rstrip("=")
    signing_input = f"{_b64(_HEADER)}.{_b64(orjson.dumps(body))}"
    return f"{signing_input}.{_b64(kp.sign(signing_input.encode()))}"


def decode_unverified(token: str | bytes, kind: str) -> dict[str, Any]:
    """The claims of a JWT of the given `nats.type`, checked for shape and expiry.

    The signature is not checked: the only JWTs read here are nats-server's callout
    requests, on a subject only the server can publish to (every user is denied it).
    """
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise JWTError("not ASCII") from None
    if len(token) > MAX_TOKEN_BYTES:
        raise JWTError("too large")
    parts = token.split(".")
    if len(parts) != 3:
        raise JWTError("expected three parts")
    try:
        header = orjson.loads(_unb64(parts[0]))
        claims = orjson.loads(_unb64(parts[1]))
    except (ValueError, orjson.JSONDecodeError):
        raise JWTError("not base64url JSON") from None
    if not isinstance(header, dict) or str(header.get("alg", "")).lower() != "ed25519-nkey":
        raise JWTError("not an ed25519-nkey JWT")
    if not isinstance(claims, dict) or not isinstance(claims.get("nats"), dict):
        raise JWTError("no nats claims")
    if claims["nats"].get("type") != kind:
        raise JWTError(f"not a {kind} JWT")
    exp = claims.get("exp")
    if isinstance(exp, (int, float)) and exp and exp < time.time():
        raise JWTError("expired")
    return claims


# --- auth callout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalloutRequest:
    """What nats-server tells identity about a connecting client."""

    user_nkey: str  # the key the answer must be for (prevents replay)
    server_id: str  # the answer's audience
    token: str
    user: str
    client_name: str
    client_host: str


def parse_callout_request(data: bytes) -> CalloutRequest:
    claims = decode_unverified(data, "authorization_request")
    n = claims["nats"]
    try:
        opts = n.get("connect_opts") or {}
        info = n.get("client_info") or {}
        return CalloutRequest(user_nkey=str(n["user_nkey"]), server_id=str(n["server_id"]["id"]),
                              token=str(opts.get("auth_token") or ""), user=str(opts.get("user") or ""),
                              client_name=str(info.get("name") or opts.get("name") or ""),
                              client_host=str(info.get("host") or ""))
    except (KeyError, TypeError, AttributeError):
        raise JWTError("authorization request without user_nkey or server_id") from None


def user_jwt(issuer_seed: bytes, request: CalloutRequest, *, account: str, name: str,
             permissions: Permissions, expires: Optional[int] = None, max_subscriptions: int = -1) -> str:
    """A user JWT placing the connecting client in `account` with `permissions`."""
    nats_claims: dict[str, Any] = {
        "pub": {"allow": list(permissions.publish)},
        "sub": {"allow": list(permissions.subscribe)},
        "subs": max_subscriptions, "data": -1, "payload": -1,
        "type": "user", "version": JWT_VERSION,
    }
    if permissions.allow_responses:
        nats_claims["resp"] = {"max": 1, "ttl": 10_000_000_000}  # 10 s, in nanoseconds
    claims: dict[str, Any] = {"sub": request.user_nkey, "aud": account, "name": name, "nats": nats_claims}
    if expires:
        claims["exp"] = int(expires)
    return encode(issuer_seed, claims)


def callout_response(issuer_seed: bytes, request: CalloutRequest, *, user: Optional[str] = None,
                     error: Optional[str] = None) -> bytes:
    """identity's answer: a user JWT (allowed) or an error (refused)."""
    if (user is None) == (error is None):
        raise ValueError("exactly one of user and error")
    nats_claims: dict[str, Any] = {"type": "authorization_response", "version": JWT_VERSION}
    if user is not None:
        nats_claims["jwt"] = user
    else:
        nats_claims["error"] = error
    return encode(issuer_seed, {"sub": request.user_nkey, "aud": request.server_id, "nats": nats_claims}).encode()
