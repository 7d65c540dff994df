"""The bus credentials of an installation: one nkey seed per static bus role (the
control-plane services, the observer, and `callout` — identity's connection in the AUTH
account), and the account seed the identity service signs auth-callout answers with.

`generate_bus_credentials()` is the one place `tulle install` gets them from; the nkeys
are made by tulle/natsjwt.py, as local mode's are.
"""

from __future__ import annotations

from dataclasses import dataclass

from tulle import busauth, natsjwt

# The roles with a static credential (tulle/busauth.py); proxies authenticate through
# auth callout with their workload's token instead.
ROLES = (*busauth.STATIC_ROLES, busauth.CALLOUT_ROLE)
CALLOUT_ISSUER = "callout-issuer"  # its key in the tulle-nats-credentials Secret


def new_seed(kind: str) -> str:
    """A fresh nkey seed: `user` (SU...) or `account` (SA...)."""
    return natsjwt.new_seed(kind).decode()


def public_key(seed: str) -> str:
    return natsjwt.public_key(seed.encode())


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
