"""What the commands that read the bus share: where NATS is, and the credential to read it with.

Every such command takes `--nats URL` and `--nats-creds FILE`. Without them: the URL is
TULLE_NATS_URL, else the running `tulle up`'s, else nats://127.0.0.1:4222; the credential
is TULLE_NATS_CREDS, else — when the URL is the running `tulle up`'s — its observer
credential, which reads KV and events and writes nothing. NATS accepts no anonymous client,
so a command with no credential fails with one line saying how to give one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Optional

import click

from tulle.errors import UserError

NATS_HELP = "NATS URL (default: TULLE_NATS_URL, else the running `tulle up`, else nats://127.0.0.1:4222)"
CREDS_HELP = ("NATS credential: an nkey seed file (default: TULLE_NATS_CREDS, else the running `tulle up`'s "
              "observer credential)")


@dataclass(frozen=True)
class BusTarget:
    url: str
    creds_file: str = ""
    ca_file: str = ""

    def credentials(self):
        from tulle.bus import BusCredentials

        return BusCredentials.for_seed(self.creds_file, ca_file=self.ca_file)

    def __str__(self) -> str:
        return self.url


def resolve_target(url: Optional[str], creds: Optional[str], env: Optional[dict] = None) -> BusTarget:
    from tulle.bus import DEFAULT_URL
    from tulle.local.discover import local_bus

    env = os.environ if env is None else env
    local = local_bus()
    url = url or env.get("TULLE_NATS_URL") or (local.url if local else "") or DEFAULT_URL
    ca = env.get("TULLE_NATS_CA", "")
    creds = creds or env.get("TULLE_NATS_CREDS", "")
    if not creds and local is not None and local.url == url:
        creds, ca = local.observer_creds, ca or local.ca
    return BusTarget(url, creds, ca)


def nats_option(name: str = "url"):
    """`--nats URL` and `--nats-creds FILE`, handed to the command as a BusTarget named `name`."""
    def decorate(f):
        @click.option("--nats-creds", "_nats_creds", default=None, metavar="FILE", help=CREDS_HELP)
        @click.option("--nats", "_nats_url", default=None, metavar="URL", help=NATS_HELP)
        @functools.wraps(f)
        def wrapper(*args, _nats_url=None, _nats_creds=None, **kwargs):
            kwargs[name] = resolve_target(_nats_url, _nats_creds)
            return f(*args, **kwargs)
        return wrapper
    return decorate


CONNECT_TIMEOUT_S = 5.0


async def connect_bus(target: "BusTarget | str", *, what: str = "", timeout: float = CONNECT_TIMEOUT_S):
    """A started Bus for a CLI command — every command reaches the bus through here — or a
    UserError saying in one line why not (no credential, a refused one, NATS unreachable).
    The caller closes it (or uses `cli_bus`)."""
    from tulle.bus import Bus
    from tulle.log import setup_logging

    # The command's own output and its one-line errors are what a person reads: the bus
    # client's retries and refusals stay out of it (TULLE_LOG_LEVEL=info shows them).
    setup_logging("cli", level=os.environ.get("TULLE_LOG_LEVEL", "error"))
    if isinstance(target, str):
        target = resolve_target(target, None)
    what = f"{what}: " if what else ""
    if not target.creds_file:
        raise UserError(f"{what}no credential for NATS at {target.url}: pass --nats-creds FILE or set "
                        f"TULLE_NATS_CREDS (a running `tulle up` provides its observer credential by itself)")
    bus = Bus(target.url, component="cli", credentials=target.credentials())
    try:
        await asyncio.wait_for(bus.start(), timeout)
    except asyncio.TimeoutError:
        await bus.close()
        if bus.auth_error:
            raise UserError(f"{what}NATS at {target.url} refused the credential {target.creds_file}: "
                            f"{bus.auth_error}") from None
        raise UserError(f"{what}cannot reach NATS at {target.url} (is `tulle up` running? or pass --nats URL)") from None
    return bus


@contextlib.asynccontextmanager
async def cli_bus(target: "BusTarget | str", *, what: str = "", timeout: float = CONNECT_TIMEOUT_S):
    """`async with cli_bus(url, what="routes") as bus:` — connect_bus, closed on the way out."""
    bus = await connect_bus(target, what=what, timeout=timeout)
    try:
        yield bus
    finally:
        await bus.close()
