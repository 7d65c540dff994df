"""The bus credentials of an installation: one nkey seed per control-plane role, and the
account seed the identity service signs auth-callout answers with.

`generate_bus_credentials()` is the one place `tulle install` gets them from. For now it
makes PLACEHOLDERS in the shape of nkeys (base32, the right prefixes) that no NATS server
accepts; the lead points `new_seed` / `public_key` at the real nkey generator
(tulle/natsjwt.py) when the authenticated bus lands.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass

# The roles with a static credential (DESIGN.md, "The bus"); proxies authenticate
# through auth callout with their workload's token instead.
ROLES = ("destination", "policy", "identity", "injector", "observer")
CALLOUT_ISSUER = "callout-issuer"  # its key in the tulle-nats-credentials Secret

_PREFIX = {"user": ("SU", "U"), "account": ("SA", "A")}


def new_seed(kind: str) -> str:
    """PLACEHOLDER: a random string shaped like an nkey seed of `kind` (user or account)."""
    body = base64.b32encode(secrets.token_bytes(35)).decode().rstrip("=")
    return _PREFIX[kind][0] + body[:56]


def public_key(seed: str) -> str:
    """PLACEHOLDER: a stable string shaped like the public key of `seed`."""
    kind = "account" if seed.startswith("SA") else "user"
    body = base64.b32encode(hashlib.sha256(seed.encode()).digest() + b"\0" * 5).decode().rstrip("=")
    return _PREFIX[kind][1] + body[:55]


@dataclass(frozen=True)
class BusCredentials:
    seeds: dict[str, str]  # role -> user seed
    callout_issuer_seed: str

    @classmethod
    def from_seeds(cls, seeds: dict[str, str], callout_issuer_seed: str) -> "BusCredentials":
        missing = [r for r in ROLES if not seeds.get(r)]
        if missing or not callout_issuer_seed:
            raise ValueError(f"bus credentials missing for: {', '.join(missing + ([] if callout_issuer_seed else [CALLOUT_ISSUER]))}")
        return cls({r: seeds[r] for r in ROLES}, callout_issuer_seed)

    def values(self) -> dict:
        """The chart's `nats.auth` values."""
        auth: dict[str, str] = {}
        for role in ROLES:
            auth[f"{role}Seed"] = self.seeds[role]
            auth[f"{role}PublicKey"] = public_key(self.seeds[role])
        auth["calloutIssuerSeed"] = self.callout_issuer_seed
        auth["calloutIssuerPublicKey"] = public_key(self.callout_issuer_seed)
        return auth


def generate_bus_credentials() -> BusCredentials:
    return BusCredentials({role: new_seed("user") for role in ROLES}, new_seed("account"))
