"""Options shared by the commands that talk to NATS."""

from __future__ import annotations

import click

NATS_HELP = "NATS URL (default: TULLE_NATS_URL, else the running `tulle up`, else nats://127.0.0.1:4222)"


def _resolve(ctx, param, value):
    from tulle.local.discover import nats_url_for_cli

    return nats_url_for_cli(value)


def nats_option(name: str = "url"):
    """`--nats URL`, resolved to what the command should connect to when not given."""
    return click.option("--nats", name, default=None, metavar="URL", callback=_resolve, help=NATS_HELP)
