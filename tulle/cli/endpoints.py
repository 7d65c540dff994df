"""`tulle endpoints <service>[.<namespace>][:<port>] [-o table|json]`: what the
destination service published for a service, read from the bus (like
`linkerd diagnostics endpoints`).

Also takes a cluster IP (`10.96.3.4:80`) or a FQDN (`web.demo.svc.cluster.local:80`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import sys

import click
import nats.errors
import nats.js.errors

from tulle.cli.common import connect_bus, nats_option
from tulle.cli.names import complete_service_address

from tulle import schemas
from tulle.errors import UserError
from tulle.log import setup_logging

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def parse_target(target: str) -> tuple[str, str, int | None, str | None]:
    """(namespace, service, port or None, cluster IP or None) from the argument."""
    host, port = target, None
    if target.startswith("["):  # [fd00::1]:80
        host, _, rest = target[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif target.count(":") == 1:
        host, _, port_text = target.partition(":")
    else:
        port_text = ""
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise UserError(f"endpoints: {target!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        ip = None
    if ip is not None:
        if port is None:
            raise UserError(f"endpoints: {target!r}: give the port with a cluster IP (IP:PORT)")
        return "", "", port, ip
    parts = host.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        parts = parts[:2]  # <service>.<namespace>.svc.<cluster-domain>
    if len(parts) == 1:
        parts.append("default")
    if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
        raise UserError(f"endpoints: {target!r}: expected <service>[.<namespace>][:<port>]")
    return parts[1], parts[0], port, None


async def _read(url: str, target: str) -> list[schemas.EndpointSet] | None:
    namespace, service, port, ip = parse_target(target)
    bus = await connect_bus(url, what="endpoints")
    try:
        try:
            await bus.kv(schemas.ENDPOINTS_BUCKET, create=False)
        except nats.js.errors.BucketNotFoundError:
            return None  # no bucket: nothing was ever published
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            raise UserError(f"endpoints: cannot read {schemas.ENDPOINTS_BUCKET}: {e or type(e).__name__}") from None
        if ip is not None:
            keys = [schemas.ip_endpoints_key(ip, port)]
        elif port is not None:
            keys = [schemas.endpoints_key(namespace, service, port)]
        else:
            prefix = f"{namespace}.{service}."
            keys = [k for k in await bus.keys(schemas.ENDPOINTS_BUCKET, prefix) if k[len(prefix):].isdigit()]
        sets = [s for s in [await bus.get(schemas.ENDPOINTS_BUCKET, k, schemas.EndpointSet) for k in keys] if s]
        return sorted(sets, key=lambda s: s.port) or None
    finally:
        await bus.close()


def _rows(sets: list[schemas.EndpointSet]) -> list[dict]:
    rows = []
    for s in sets:
        for e in s.endpoints:
            rows.append({
                "namespace": s.namespace, "service": s.service, "service_port": s.port,
                "ip": e.address, "port": e.port, "pod": e.labels.get("pod", ""),
                "identity": e.identity, "protocol_hint": e.protocol_hint, "weight": e.weight,
                "proxy_port": e.proxy_port, "labels": dict(e.labels),
            })
    return rows


def _table(rows: list[dict]) -> str:
    header = ["NAMESPACE", "IP", "PORT", "POD", "SERVICE", "IDENTITY", "PROTOCOL", "WEIGHT"]
    lines = [header] + [[r["namespace"], r["ip"], str(r["port"]), r["pod"] or "-", f"{r['service']}.{r['namespace']}",
                         r["identity"] or "-", r["protocol_hint"] or "-", str(r["weight"])] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


@click.command()
@click.argument("target", metavar="SERVICE[.NAMESPACE][:PORT]", shell_complete=complete_service_address)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@nats_option()
def endpoints(target: str, output: str, url: str) -> None:
    """Show the endpoints published for a service: address, port, identity, protocol hint, weight."""
    setup_logging("cli", "warning")  # stdout carries the answer only
    sets = asyncio.run(_read(url, target))
    if sets is None:
        click.echo(f"tulle: no endpoints published for {target} (unknown service or port)", err=True)
        sys.exit(1)
    rows = _rows(sets)
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        ports = ", ".join(str(s.port) for s in sets)
        click.echo(f"{sets[0].service}.{sets[0].namespace} has no ready endpoints (port {ports})", err=True)
        return
    click.echo(_table(rows))
