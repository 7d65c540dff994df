"""`tulle policy <workload>`: the inbound policy the policy service published for a
workload, port by port, and which resource produced it; with `--explain --from`, whether
one client would be allowed and why.

    tulle policy books -n demo
    tulle policy books --port 9090 -o json
    tulle policy books --explain --from web.demo.serviceaccount.identity.tulle.cluster.local
    tulle policy books --explain --from 10.42.0.7 --port 9090 --path /ready

The workload is the pod's name (in local mode, the Workload's). Without `-n`, every
namespace is searched; a Deployment-style prefix (`books` for `books-5d8f-x2`) works
when it names one pod.

`--from` takes an identity (a meshed client: TLS with that certificate), an IP address
(an unmeshed client), or `identity@ip`. With an identity alone the address is unknown,
so a rule limited to networks allows "if the client connects from ..." those networks.
Exit status of `--explain`: 0 when allowed on every port examined, 1 when denied on any,
2 for bad input. The decision is computed by the proxy's own code (tulle/policy.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
from typing import Optional

import click

from tulle.cli.names import complete_namespace, complete_server, workload_completer
from tulle.cli.common import connect_bus, nats_option

from tulle.policy import describe_authorization, explain
from tulle import schemas
from tulle.codec import to_jsonable
from tulle.errors import UserError
from tulle.log import setup_logging


async def _read(url: str, workload: str, namespace: Optional[str]) -> tuple[str, Optional[schemas.WorkloadPolicy]]:
    bus = await connect_bus(url, what="policy")
    try:
        try:
            await bus.kv(schemas.POLICY_BUCKET, create=False)
        except Exception:
            return _shown(workload, namespace), None  # no bucket: nothing was ever published
        key = resolve_key(await bus.keys(schemas.POLICY_BUCKET), workload, namespace)
        if key is None:
            return _shown(workload, namespace), None
        return key, await bus.get(schemas.POLICY_BUCKET, key, schemas.WorkloadPolicy)
    finally:
        await bus.close()


def _shown(workload: str, namespace: Optional[str]) -> str:
    return f"{namespace}.{workload}" if namespace else workload


def resolve_key(keys: list[str], workload: str, namespace: Optional[str]) -> Optional[str]:
    """The policy key for a workload name: exact pod name first, then a unique pod-name prefix."""
    def split(k: str) -> tuple[str, str]:
        ns, _, pod = k.partition(".")
        return ns, pod

    candidates = [k for k in keys if namespace in (None, split(k)[0])]
    exact = [k for k in candidates if split(k)[1] == workload]
    if not exact:
        exact = [k for k in candidates if split(k)[1].startswith(f"{workload}-")]
    if len(exact) > 1:
        names = ", ".join(f"{split(k)[0]}/{split(k)[1]}" for k in exact)
        hint = "give -n NAMESPACE" if len({split(k)[0] for k in exact}) > 1 else "name one pod"
        raise UserError(f"policy: {workload!r} matches several workloads ({names}): {hint}")
    return exact[0] if exact else None


# --- output -------------------------------------------------------------------------------------


def _port_rows(wp: schemas.WorkloadPolicy, port: Optional[int], server: Optional[str] = None) -> list[schemas.PortPolicy]:
    if server is not None:
        return [p for p in wp.ports if p.server == server and (port is None or p.port == port)]
    if port is None:
        return list(wp.ports) + [wp.default]
    listed = [p for p in wp.ports if p.port == port]
    return listed or [_as_port(wp.default, port)]


def _as_port(default: schemas.PortPolicy, port: int) -> schemas.PortPolicy:
    return schemas.PortPolicy(port, default.server, default.kind, default.protocol, default.authorizations,
                              default.source)


def table(wp: schemas.WorkloadPolicy, port: Optional[int], server: Optional[str] = None) -> str:
    header = ["PORT", "SERVER", "PROTOCOL", "AUTHORIZATIONS", "SOURCE"]
    rows: list[list[str]] = [header]
    for p in _port_rows(wp, port, server):
        auths = [describe_authorization(a, wp.cluster_networks) for a in p.authorizations] or ["(none: denied)"]
        rows.append([str(p.port) if p.port else "other", p.server, p.protocol, auths[0], p.source or "-"])
        rows.extend(["", "", "", a, ""] for a in auths[1:])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"{wp.namespace}/{wp.workload}: default policy {wp.default_policy} "
             f"(from {wp.sources.get('default_policy', 'unknown')})"]
    lines += ["   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"warning: {w}" for w in wp.warnings]
    return "\n".join(lines)


def parse_client(text: str, tls: Optional[bool]) -> tuple[Optional[str], Optional[str], bool]:
    """`--from` into (identity, ip, tls)."""
    identity, _, ip = text.rpartition("@") if "@" in text else (text, "", "")
    if not ip:
        try:
            ip = str(ipaddress.ip_address(identity.strip("[]")))
            identity = ""
        except ValueError:
            ip = ""
    else:
        try:
            ip = str(ipaddress.ip_address(ip.strip("[]")))
        except ValueError:
            raise UserError(f"policy: --from {text!r}: {ip!r} is not an IP address") from None
    if identity and (any(c.isspace() for c in identity) or "/" in identity or "." not in identity):
        raise UserError(f"policy: --from {text!r}: expected an identity such as "
                        f"web.demo.serviceaccount.identity.tulle.cluster.local, an IP address, or identity@ip")
    if identity and tls is False:
        raise UserError("policy: --no-tls: a client with an identity always connects over mesh TLS")
    return identity or None, ip or None, bool(identity) if tls is None else tls


def _explain_text(e, client: str) -> str:
    where = f"port {e.port}" if e.port else "other ports"
    head = f"{where} ({e.server}): " + (e.reason if e.allowed else f"denied: {e.reason}")
    lines = [head]
    for r in e.rules:
        mark = "+" if r.admits else "-"
        lines.append(f"  {mark} {r.authorization}: {r.why}{(' ' + r.condition) if r.condition else ''}")
    return "\n".join(lines)


@click.command()
@click.argument("workload", shell_complete=workload_completer())
@click.option("-n", "--namespace", default=None, help="the workload's namespace (default: search all)",
              shell_complete=complete_namespace)
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="only this port")
@click.option("--server", default=None, metavar="SERVER", shell_complete=complete_server,
              help="only the ports this Server (policy.tulle.dev) selects")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--explain", "explain_", is_flag=True, help="say whether the client given by --from would be allowed, and why")
@click.option("--from", "client", metavar="IDENTITY|IP|IDENTITY@IP", default=None, help="the client to explain")
@click.option("--tls/--no-tls", default=None,
              help="whether the client's connection is TLS-terminated by the proxy (default: yes with an identity)")
@click.option("--method", default=None, help="explain an HTTP request with this method (probe rules apply)")
@click.option("--path", default=None, help="explain an HTTP request for this path (probe rules apply)")
@nats_option()
def policy(workload, namespace, port, server, output, explain_, client, tls, method, path, url):
    """Show a workload's inbound policy per port, or --explain whether a client would be allowed.

    With --explain the exit status is 0 when the client is allowed on every port
    examined, 1 when it is denied on any.
    """
    setup_logging("cli", "warning")  # stdout carries the answer only
    if explain_ and not client:
        raise UserError("policy: --explain needs --from IDENTITY, --from IP or --from IDENTITY@IP")
    if client and not explain_:
        raise UserError("policy: --from is only used with --explain")
    if (method or path) and not explain_:
        raise UserError("policy: --method and --path are only used with --explain")
    if explain_:
        identity, ip, tls = parse_client(client, tls)
    key, wp = asyncio.run(_read(url, workload, namespace))
    if wp is None:
        click.echo(f"tulle: no policy published for {key.replace('.', '/', 1)}: the workload does not exist, is not "
                   f"meshed, or the policy service has not seen it yet", err=True)
        sys.exit(1)
    if server is not None and not _port_rows(wp, port, server):
        served = sorted({p.server for p in wp.ports if p.kind == "Server"})
        click.echo(f"tulle: no port of {wp.namespace}/{wp.workload}{f' {port}' if port else ''} is selected by "
                   f"Server {server}" + (f" (its Servers: {', '.join(served)})" if served else " (no Server selects it)"),
                   err=True)
        sys.exit(1)
    if not explain_:
        if output == "json":
            data = to_jsonable(wp)
            if port is not None or server is not None:
                data["ports"] = [to_jsonable(p) for p in _port_rows(wp, port, server)]
            click.echo(json.dumps(data, indent=2))
        else:
            click.echo(table(wp, port, server))
        return
    if server is not None:
        ports = [p.port for p in _port_rows(wp, port, server)]
    else:
        ports = [port] if port is not None else [p.port for p in wp.ports] + [0]
    if method is None and path is not None:
        method = "GET"
    if path is None and method is not None:
        path = "/"
    results = [explain(wp, p, client_ip=ip, client_identity=identity, tls=tls,
                       method=method.upper() if method else None, path=path) for p in ports]
    if output == "json":
        click.echo(json.dumps([to_jsonable(r) for r in results], indent=2))
    else:
        who = client + (" over TLS" if tls else " in plain text")
        click.echo(f"{wp.namespace}/{wp.workload}, client {who}:")
        click.echo("\n".join(_explain_text(r, client) for r in results))
    sys.exit(0 if all(r.allowed for r in results) else 1)
