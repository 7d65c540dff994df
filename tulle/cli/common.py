"""What the commands that talk to NATS share: the `--nats` option, and the one function
that opens the CLI's bus connection.

Every command reaches the bus through `connect_bus`, so how the CLI authenticates to
NATS (the observer role's credential, the CA of a TLS bus) is decided here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, AsyncIterator

import click

from tulle.errors import UserError

if TYPE_CHECKING:
    from tulle.bus import Bus

NATS_HELP = "NATS URL (default: TULLE_NATS_URL, else the running `tulle up`, else nats://127.0.0.1:4222)"

CONNECT_TIMEOUT_S = 5.0


def _resolve(ctx, param, value):
    from tulle.local.discover import nats_url_for_cli

    return nats_url_for_cli(value)


def nats_option(name: str = "url"):
    """`--nats URL`, resolved to what the command should connect to when not given."""
    return click.option("--nats", name, default=None, metavar="URL", callback=_resolve, help=NATS_HELP)


async def connect_bus(url: str, *, what: str = "", timeout: float = CONNECT_TIMEOUT_S) -> "Bus":
    """A connected bus client for a CLI command (the observer role: reads KV and events).

    Raises UserError naming `what` (the command) and the URL when NATS cannot be reached
    within `timeout` seconds. The caller closes the bus (or uses `cli_bus`).
    """
    from tulle.bus import Bus

    bus = Bus(url, component="cli")
    try:
        await asyncio.wait_for(bus.start(), timeout)
    except asyncio.TimeoutError:
        await bus.close()
        prefix = f"{what}: " if what else ""
        raise UserError(f"{prefix}cannot reach NATS at {url}") from None
    return bus


@contextlib.asynccontextmanager
async def cli_bus(url: str, *, what: str = "", timeout: float = CONNECT_TIMEOUT_S) -> AsyncIterator["Bus"]:
    """`async with cli_bus(url, what="routes") as bus:` — connect_bus, closed on the way out."""
    bus = await connect_bus(url, what=what, timeout=timeout)
    try:
        yield bus
    finally:
        await bus.close()
