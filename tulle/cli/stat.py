"""`tulle stat`: golden metrics per workload, pod, service or namespace, from the proxies.

    tulle stat [RESOURCE [NAME]] [-n NS | -A] [--from RES | --to RES] [-t 1m] [-o table|wide|json] [-w]

`linkerd viz stat` without Prometheus: every proxy keeps rolling windows of its traffic
(proxy/traffic_stats.py) and answers `tulle.proxy.v1.traffic`; tulle/traffic.py gathers
the answers and makes the rows. Columns and formats are Linkerd's: NAME MESHED SUCCESS
RPS LATENCY_P50 LATENCY_P95 LATENCY_P99 TCP_CONN (+ READ_BYTES/SEC WRITE_BYTES/SEC with
`-o wide`, NAMESPACE first with `-A`); `-` where there is no data.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Optional

import click

from tulle.cli.common import nats_option
from tulle.cli.names import complete_namespace, complete_stat_resource, complete_stat_name
from tulle.cli.screen import Frame, show_frames
from tulle.durations import bounded_seconds, short as fmt_duration
from tulle.errors import UserError

MAX_WINDOW_S = 600


# --- pure: flags, and rows into cells ----------------------------------------------------------


def check_namespace(namespace: str) -> str:
    from tulle.traffic import _NAME

    if not _NAME.match(namespace):
        raise UserError(f"stat: -n {namespace!r}: not a valid namespace name")
    return namespace


@dataclass(frozen=True)
class Query:
    by: str  # pod | workload | service | namespace
    namespace: Optional[str]  # None: -A
    name: str = ""
    from_: object = None  # tulle.traffic.Resource
    to: object = None
    window_s: float = 60.0
    unmeshed: bool = False


def parse_query(resource: Optional[str], name: Optional[str], namespace: str, all_namespaces: bool,
                from_: Optional[str], to: Optional[str], from_namespace: Optional[str], to_namespace: Optional[str],
                window_s: float, unmeshed: bool) -> Query:
    from tulle.traffic import Resource, parse_resource

    ns = None if all_namespaces else check_namespace(namespace)
    target: Resource = parse_resource(resource or "workload", ns, flag="stat:", default_kind="workload")
    if name is not None:
        if target.name:
            raise UserError(f"stat: {resource!r} already names a {target.kind}; drop {name!r}")
        target = parse_resource(f"{resource}/{name}", ns, flag="stat:")
    if from_ and to:
        raise UserError("stat: --from and --to cannot be used together")
    src = dst = None
    if from_:
        src = parse_resource(from_, check_namespace(from_namespace or namespace), flag="stat: --from",
                             default_kind="workload")
    if to:
        dst = parse_resource(to, check_namespace(to_namespace or namespace), flag="stat: --to", default_kind="workload")
        if target.kind == "service":
            raise UserError("stat: --to narrows what a pod, workload or namespace sent; a service target "
                            "already is the destination (use --from)")
    if src is not None and src.kind == "service" and target.kind != "service":
        raise UserError("stat: --from takes the clients: a pod, workload or namespace (a service sends nothing)")
    return Query(target.kind, ns, target.name, src, dst, window_s, unmeshed)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def stat_cells(rows: list, wide: bool, all_namespaces: bool) -> tuple[list[str], list[list[str]], int]:
    """(header, cells, leading left-aligned columns) as `linkerd viz stat` prints them."""
    from tulle.traffic import whole_ms

    header = (["NAMESPACE"] if all_namespaces else []) + ["NAME", "MESHED", "SUCCESS", "RPS", "LATENCY_P50",
                                                          "LATENCY_P95", "LATENCY_P99", "TCP_CONN"]
    if wide:
        header += ["READ_BYTES/SEC", "WRITE_BYTES/SEC"]
    out = []
    for r in rows:
        cells = ([r.namespace] if all_namespaces else []) + [r.name, r.meshed_text]
        if not r.has_data:
            cells += ["-"] * (len(header) - len(cells))
        else:
            cells += [_pct(r.success), "-" if r.rps is None else f"{r.rps:.1f}rps"]
            cells += ["-" if v is None else f"{whole_ms(v)}ms" for v in (r.p50, r.p95, r.p99)]
            cells.append(str(r.tcp_open))
            if wide:
                cells += [f"{r.read_bps:.1f}B/s", f"{r.write_bps:.1f}B/s"]
        out.append(cells)
    return header, out, 2 if all_namespaces else 1


# --- the bus side ------------------------------------------------------------------------------------


async def fetch(bus, q: Query, timeout_s: float) -> tuple[list, list[str]]:
    """(rows, notes): one gather of the proxies that can answer for the query."""
    from tulle.traffic import expected_proxies, gather_inventory, gather_traffic, missing_proxies, stat_rows

    by_own_proxies = q.by in ("pod", "workload") and q.namespace is not None
    inventory = await gather_inventory(bus, None if (q.namespace is None or q.by == "namespace") else q.namespace)
    workloads: list[str] = []
    if by_own_proxies:
        # Pods and workloads are judged by their own proxies (inbound, or outbound with --to).
        workloads = sorted(k for k, hb in inventory.heartbeats.items() if hb.namespace == q.namespace)
    notes = []
    if not inventory.heartbeats:
        notes.append("‼ no proxies are running (tulle-proxies is empty)")
        replies = []
    elif by_own_proxies and not workloads:
        replies = []
    else:
        replies = await gather_traffic(bus, q.window_s, workloads, timeout_s=timeout_s,
                                       expected=expected_proxies(inventory.heartbeats, workloads))
        notes += [f"‼ no answer from {who}" for who in missing_proxies(inventory, replies, workloads)]
    rows = stat_rows(replies, q.by, inventory=inventory, namespace=q.namespace, name=q.name, from_=q.from_,
                     to=q.to, unmeshed=q.unmeshed)
    return rows, notes


def frame(rows: list, notes: list[str], q: Query, output: str) -> Frame:
    from tulle.traffic import stat_json

    title = f"tulle stat {q.by}" + (f" -n {q.namespace}" if q.namespace else " -A") + f"   window {fmt_duration(q.window_s)}"
    if output == "json":
        return Frame([], [], json_text=json.dumps([stat_json(r) for r in rows], indent=2), notes=notes, title=title)
    # Namespaces belong to no namespace: no NAMESPACE column for them.
    header, cells, left = stat_cells(rows, output == "wide", q.namespace is None and q.by != "namespace")
    return Frame(header, cells, left, empty="No traffic found.", notes=notes, title=title)


async def run(target, q: Query, output: str, timeout_s: float, watch: bool, interval_s: float) -> None:
    async def next_frame(bus) -> Frame:
        rows, notes = await fetch(bus, q, timeout_s)
        return frame(rows, notes, q, output)

    await show_frames(target, "stat", next_frame, watch, interval_s)


# --- the command -----------------------------------------------------------------------------


@click.command()
@click.argument("resource", required=False, metavar="[RESOURCE]", shell_complete=complete_stat_resource)
@click.argument("name", required=False, metavar="[NAME]", shell_complete=complete_stat_name)
@click.option("-n", "--namespace", default="default", show_default=True, help="Namespace of the resources.",
              shell_complete=complete_namespace)
@click.option("-A", "--all-namespaces", is_flag=True, help="Every namespace (ignores -n).")
@click.option("--from", "from_", default=None, metavar="RESOURCE",
              help="Only traffic from this pod, workload or namespace (e.g. deploy/web, ns/demo).",
              shell_complete=complete_stat_resource)
@click.option("--from-namespace", default=None, metavar="NS", help="Namespace of --from (default: -n).",
              shell_complete=complete_namespace)
@click.option("--to", default=None, metavar="RESOURCE",
              help="Only traffic to this pod, workload, service or namespace (e.g. svc/authors).",
              shell_complete=complete_stat_resource)
@click.option("--to-namespace", default=None, metavar="NS", help="Namespace of --to (default: -n).",
              shell_complete=complete_namespace)
@click.option("-t", "--time-window", "window", default="1m", show_default=True, help="How far back: 1s … 10m.")
@click.option("-o", "--output", type=click.Choice(["table", "wide", "json"]), default="table", show_default=True,
              help="wide: also READ_BYTES/SEC and WRITE_BYTES/SEC.")
@click.option("-w", "--watch", is_flag=True, help="Keep refreshing the table in place (Ctrl-C stops).")
@click.option("--interval", default="2s", show_default=True, help="How often -w refreshes.")
@click.option("--unmeshed", is_flag=True, help="Also list pods and workloads without a proxy.")
@click.option("--timeout", default="2s", show_default=True, help="How long to wait for the proxies' answers.")
@nats_option()
def stat(resource, name, namespace, all_namespaces, from_, from_namespace, to, to_namespace, window, output, watch,
         interval, unmeshed, timeout, url):
    """Success rate, request rate, latency and connections per resource, from every proxy.

    RESOURCE is a type — workload (deploy, sts, ds …; the default), po, svc or ns — and
    an optional name (`deploy/web` or `deploy web`). Pods, workloads and namespaces are
    judged by what their proxies received; services by what their callers' proxies sent.
    Proxies that should answer but do not within --timeout are named on stderr.

    \b
    Examples:
      tulle stat -n demo                          every workload of demo
      tulle stat deploy/web -n demo --to svc/authors
      tulle stat svc -n demo --from deploy/traffic -o wide
      tulle stat ns -t 10m -o json
      tulle stat -n demo -w                       a live table
    """
    from tulle.log import setup_logging

    setup_logging("cli", "warning")  # stdout carries the answer only
    window_s = bounded_seconds(window, "-t", 1, MAX_WINDOW_S, "stat")
    q = parse_query(resource, name, namespace, all_namespaces, from_, to, from_namespace, to_namespace, window_s,
                    unmeshed)
    timeout_s = bounded_seconds(timeout, "--timeout", 0.001, 60, "stat")
    interval_s = bounded_seconds(interval, "--interval", 0.5, 3600, "stat")
    try:
        asyncio.run(run(url, q, output, timeout_s, watch, interval_s))
    except KeyboardInterrupt:
        if not watch:
            raise
