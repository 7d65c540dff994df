"""`tulle network-validator`: the init container of a pod in CNI mode. Exits 0 once the
pod's outgoing connections are proven redirected to the proxy, else 1 with the reason,
so the pod fails clearly before its app starts without the mesh."""

from __future__ import annotations

import click

from tulle.errors import UserError


@click.command("network-validator")
@click.option("--connect-addr", default="192.0.2.1:20001", show_default=True,
              help="an address nothing answers on (TEST-NET-1: never routed)")
@click.option("--listen-addr", default="0.0.0.0:4140", show_default=True,
              help="where redirected connections must arrive: the proxy's outbound port")
@click.option("--timeout", default="10s", show_default=True, help="how long to wait, e.g. 10s")
def network_validator(connect_addr: str, listen_addr: str, timeout: str):
    """Check that the pod's traffic is redirected to its proxy (CNI mode)."""
    from tulle.cli.proxy import _duration
    from tulle.proxyinit.validator import validate

    seconds = _duration(timeout, "--timeout")
    try:
        result = validate(connect_addr, listen_addr, seconds)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not result.ok:
        click.echo(f"tulle network-validator: {result.message}", err=True)
        raise SystemExit(1)
    click.echo(f"tulle network-validator: {result.message}", err=True)
