"""`tulle edges`: who calls whom, and whether mTLS secures it, from the proxies.

    tulle edges [TYPE] [-n NS | -A] [-t 1m] [-o table|wide|json] [-w]

`linkerd viz edges` without Prometheus: the proxies' traffic windows (tulle/traffic.py
`edges`) name each caller by the identity its proxy proved and each destination by the
identity its server proved. Columns are Linkerd's: SRC DST SRC_NS DST_NS SECURED (√, or
why not), with `-o wide` CLIENT_ID and SERVER_ID (`sa.namespace`). Edges with either end in
the namespace are listed; callers without an identity cannot be named and are not.
"""

from __future__ import annotations

import asyncio
import json
from typing import Optional

import click

from tulle.cli.common import nats_option
from tulle.cli.names import complete_edges_type, complete_namespace
from tulle.cli.screen import Frame, show_frames
from tulle.cli.stat import MAX_WINDOW_S, check_namespace
from tulle.durations import bounded_seconds, short as fmt_duration
from tulle.errors import UserError

SECURED = "√"


def parse_type(text: Optional[str]) -> str:
    from tulle.traffic import KIND_ALIASES

    kind_text, slash, name = (text or "workload").partition("/")
    kind = KIND_ALIASES.get(kind_text.lower())
    if kind not in ("pod", "workload"):
        raise UserError(f"edges: {text!r}: edges are listed between pods (po) or workloads (deploy, sts, ds …)")
    if name:
        raise UserError(f"edges: edges cannot be listed for one resource; remove {name!r} from {text!r}")
    return kind


def edge_cells(rows: list, wide: bool) -> tuple[list[str], list[list[str]]]:
    from tulle.traffic import short_identity

    header = ["SRC", "DST", "SRC_NS", "DST_NS"] + (["CLIENT_ID", "SERVER_ID"] if wide else []) + ["SECURED"]
    out = []
    for e in rows:
        cells = [e.src, e.dst, e.src_namespace, e.dst_namespace]
        if wide:
            cells += [short_identity(e.client_id), short_identity(e.server_id)]
        cells.append(SECURED if e.secured else e.no_tls_reason)
        out.append(cells)
    return header, out


async def fetch(bus, by: str, namespace: Optional[str], window_s: float, timeout_s: float) -> tuple[list, list[str]]:
    from tulle.traffic import edges, expected_proxies, gather_inventory, gather_traffic, missing_proxies

    inventory = await gather_inventory(bus, namespace)
    notes: list[str] = []
    if not inventory.heartbeats:
        return [], ["‼ no proxies are running (tulle-proxies is empty)"]
    # Either end in the namespace: its own proxies saw every such edge (in or out).
    workloads = [] if namespace is None else sorted(
        k for k, hb in inventory.heartbeats.items() if hb.namespace == namespace)
    if namespace is not None and not workloads:
        return [], []
    replies = await gather_traffic(bus, window_s, workloads, timeout_s=timeout_s,
                                   expected=expected_proxies(inventory.heartbeats, workloads))
    notes += [f"‼ no answer from {who}" for who in missing_proxies(inventory, replies, workloads)]
    return edges(replies, by=by, inventory=inventory, namespace=namespace), notes


def frame(rows: list, notes: list[str], by: str, namespace: Optional[str], window_s: float, output: str) -> Frame:
    from tulle.traffic import edge_json

    title = f"tulle edges {by}" + (f" -n {namespace}" if namespace else " -A") + f"   window {fmt_duration(window_s)}"
    if output == "json":
        return Frame([], [], json_text=json.dumps([edge_json(e) for e in rows], indent=2), notes=notes, title=title)
    header, cells = edge_cells(rows, output == "wide")
    return Frame(header, cells, left=len(header), empty="No edges found.", notes=notes, title=title)


async def run(target, by: str, namespace: Optional[str], window_s: float, output: str, timeout_s: float,
              watch: bool, interval_s: float) -> None:
    async def next_frame(bus) -> Frame:
        rows, notes = await fetch(bus, by, namespace, window_s, timeout_s)
        return frame(rows, notes, by, namespace, window_s, output)

    await show_frames(target, "edges", next_frame, watch, interval_s)


@click.command()
@click.argument("type_", required=False, metavar="[TYPE]", shell_complete=complete_edges_type)
@click.option("-n", "--namespace", default="default", show_default=True,
              help="Edges that start or end in this namespace.", shell_complete=complete_namespace)
@click.option("-A", "--all-namespaces", is_flag=True, help="Every namespace (ignores -n).")
@click.option("-t", "--time-window", "window", default="1m", show_default=True,
              help="Calls seen in this long: 1s … 10m.")
@click.option("-o", "--output", type=click.Choice(["table", "wide", "json"]), default="table", show_default=True,
              help="wide: also CLIENT_ID and SERVER_ID.")
@click.option("-w", "--watch", is_flag=True, help="Keep refreshing the table in place (Ctrl-C stops).")
@click.option("--interval", default="2s", show_default=True, help="How often -w refreshes.")
@click.option("--timeout", default="2s", show_default=True, help="How long to wait for the proxies' answers.")
@nats_option()
def edges(type_, namespace, all_namespaces, window, output, watch, interval, timeout, url):
    """Who calls whom among workloads (or pods), and whether mTLS secures each call.

    TYPE is workload (deploy, sts, ds …; the default) or po. SECURED is √ when the caller's
    and the server's proxies proved their identities to each other, else the reason.

    \b
    Examples:
      tulle edges -n demo
      tulle edges po -n demo -o wide
      tulle edges -A -o json
    """
    from tulle.log import setup_logging

    setup_logging("cli", "warning")
    by = parse_type(type_)
    ns = None if all_namespaces else check_namespace(namespace)
    window_s = bounded_seconds(window, "-t", 1, MAX_WINDOW_S, "edges")
    timeout_s = bounded_seconds(timeout, "--timeout", 0.001, 60, "edges")
    interval_s = bounded_seconds(interval, "--interval", 0.5, 3600, "edges")
    try:
        asyncio.run(run(url, by, ns, window_s, output, timeout_s, watch, interval_s))
    except KeyboardInterrupt:
        if not watch:
            raise
