"""The NATS auth-callout request (tulle/natsjwt.py `parse_callout_request`): the JWT
nats-server sends identity for each connecting workload proxy, whose fields (token, name,
host) come from the client.

The first byte picks the form: a raw token as received, or claims JSON the harness wraps
as a JWT (so mutations reach the claims instead of their base64). Invariants: it answers a
CalloutRequest of strings or raises JWTError, nothing else.
"""

from __future__ import annotations

import base64

from tulle import natsjwt

INSTRUMENT = ("tulle.natsjwt",)

_HEADER = base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"ed25519-nkey"}').rstrip(b"=")


def _wrap(claims: bytes) -> bytes:
    return _HEADER + b"." + base64.urlsafe_b64encode(claims).rstrip(b"=") + b".c2ln"


def test_one_input(data: bytes) -> None:
    if not data:
        return
    token = data[1:] if data[0] & 1 else _wrap(data[1:])
    try:
        req = natsjwt.parse_callout_request(token)
    except natsjwt.JWTError:
        return
    for field in ("user_nkey", "server_id", "token", "user", "client_name", "client_host"):
        assert isinstance(getattr(req, field), str), field


def _claims(opts: dict, info: dict) -> dict:
    return {"aud": "nats-authorization-request", "sub": "UABC",
            "nats": {"server_id": {"name": "n", "host": "127.0.0.1", "id": "NSERVER", "version": "2.10.0"},
                     "user_nkey": "UXYZ", "client_info": info, "connect_opts": opts,
                     "type": "authorization_request", "version": 2}}


def seeds() -> list[bytes]:
    import orjson

    seed = natsjwt.new_seed("account")
    claims = [
        _claims({"auth_token": "eyJ.token.x", "name": "proxy demo/web", "lang": "python3", "version": "2.16.0"},
                {"host": "10.1.0.5", "id": 7, "user": "", "name": "proxy demo/web"}),
        _claims({"user": "someone", "pass": "x"}, {}),
        {"nats": {"type": "authorization_request"}},
    ]
    out = []
    for c in claims:
        out.append(b"\x00" + orjson.dumps(c))
        out.append(b"\x01" + natsjwt.encode(seed, c).encode())
    return out
