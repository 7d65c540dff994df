"""`tulle routes`: per-route success, rate and latency, gathered from the proxies over NATS.

    tulle routes <service|workload> | --all [-n NS] [--to SERVICE] [--window 1m] [-o table|wide|json]

Every proxy keeps rolling windows of its outbound routes (proxy/route_stats.py) and
answers a `StatsRequest` on `tulle.proxy.v1.stats`. This command scatters one request,
gathers the replies until the deadline (or until every proxy expected from the
`tulle-proxies` heartbeats has answered), and names the proxies that did not answer.

- a service target (`authors`, `authors.demo`, `svc/authors`): the routes *to* that
  service, summed over every client proxy; the profile's routes are listed even
  without traffic;
- a workload target (`workload/web`, `deploy/web`, or a bare name that is no service):
  the routes *from* that workload's proxy (`--to` narrows them to one service);
- `--all`: every route every proxy saw (`-n` narrows to destinations in a namespace).

Columns and formats are `linkerd viz routes`'s. Unlike Linkerd, `-o wide` (effective
vs. actual figures) needs no `--to`: client proxies measure both for every route, so
nothing is missing without it. JSON is Linkerd's shape ({resource: [rows]}) with every
key present (`success`/`rps` and the `effective_*`/`actual_*` ones), null for no data.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import click

from tulle.cli.names import complete_namespace, complete_route_target, service_completer
from tulle.cli.common import connect_bus, nats_option

from tulle import schemas
from tulle.durations import bounded_seconds, short as _fmt_duration
from tulle.errors import UserError

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_POD_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
SERVICE_KINDS = ("svc", "service", "services")
WORKLOAD_KINDS = ("workload", "workloads", "wl", "deploy", "deployment", "deployments", "pod", "pods", "po",
                  "sts", "statefulset", "ds", "daemonset")
MAX_WINDOW_S = 600  # proxies keep 10 minutes of per-second buckets
DEFAULT_ROUTE = "[DEFAULT]"


# --- pure: targets ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    kind: str  # "service" | "workload" | "maybe" (a bare name, resolved against the bus) | "all"
    namespace: Optional[str]  # None only for --all without -n
    name: str = ""

    @property
    def resource(self) -> str:
        """The key of the JSON output, as Linkerd names resources."""
        if self.kind == "all":
            return f"all/{self.namespace}" if self.namespace else "all"
        return f"{'svc' if self.kind == 'service' else 'workload'}/{self.name}.{self.namespace}"


def parse_target(target: Optional[str], all_: bool, namespace: Optional[str]) -> Target:
    if all_ == (target is not None):
        raise UserError("routes: give a service or workload, or --all (not both)")
    if namespace is not None and not _NAME.match(namespace):
        raise UserError(f"routes: -n {namespace!r}: not a valid namespace name")
    if all_:
        return Target("all", namespace)
    kind, slash, name = target.partition("/")
    if not slash:
        kind, name = "maybe", target
    elif kind.lower() in SERVICE_KINDS:
        kind = "service"
    elif kind.lower() in WORKLOAD_KINDS:
        kind = "workload"
    else:
        raise UserError(f"routes: {target!r}: unknown kind {kind!r} (use svc/NAME or workload/NAME)")
    if kind != "workload" and "." in name:
        parts = name.split(".")
        if len(parts) >= 3 and parts[2] == "svc":  # <service>.<namespace>.svc.<cluster-domain>
            parts = parts[:2]
        if len(parts) != 2:
            raise UserError(f"routes: {target!r}: expected <service>[.<namespace>]")
        name, ns = parts
        if namespace is not None and namespace != ns:
            raise UserError(f"routes: {target!r} is in namespace {ns!r}, but -n says {namespace!r}")
        namespace, kind = ns, "service"
    pattern = _POD_NAME if kind == "workload" else _NAME
    if not pattern.match(name):
        raise UserError(f"routes: {target!r}: not a valid {'workload' if kind == 'workload' else 'service'} name")
    return Target(kind, namespace or "default", name)


def parse_to(to: Optional[str], target: Target) -> Optional[tuple[str, str]]:
    """(namespace, service) of --to, defaulting to the target's namespace."""
    if to is None:
        return None
    if target.kind == "service":
        raise UserError("routes: --to narrows a workload or --all; a service target already is the destination")
    kind, slash, name = to.partition("/")
    if slash and kind.lower() not in SERVICE_KINDS:
        raise UserError(f"routes: --to {to!r}: the destination is a service (svc/NAME)")
    if not slash:
        name = to
    parts = name.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        parts = parts[:2]
    if len(parts) == 1:
        parts.append(target.namespace or "default")
    if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
        raise UserError(f"routes: --to {to!r}: expected <service>[.<namespace>]")
    return parts[1], parts[0]


# --- pure: aggregation and formatting --------------------------------------------------------


@dataclass
class Row:
    namespace: str
    service: str
    route: str
    effective_requests: int = 0
    effective_successes: int = 0
    effective_rps: float = 0.0
    actual_requests: int = 0
    actual_successes: int = 0
    actual_rps: float = 0.0
    windows: list = field(default_factory=list)
    p50: Optional[float] = None
    p95: Optional[float] = None
    p99: Optional[float] = None

    @property
    def has_data(self) -> bool:
        return bool(self.effective_requests or self.actual_requests)

    @property
    def success(self) -> Optional[float]:
        return self.effective_successes / self.effective_requests if self.effective_requests else None

    @property
    def actual_success(self) -> Optional[float]:
        return self.actual_successes / self.actual_requests if self.actual_requests else None


def aggregate(replies: list[schemas.StatsReply], *, namespace: Optional[str] = None,
              known_routes: Optional[dict[tuple[str, str], list[str]]] = None) -> list[Row]:
    """Sum the replies' windows per (service, route); rates are each proxy's count over the span
    it covers, added up. `known_routes` ((ns, svc) -> profile route names) adds rows without
    traffic and orders routes as the profile does. `namespace` keeps only destinations there."""
    from tulle.route_windows import histogram_quantile, merge_windows

    rows: dict[tuple[str, str, str], Row] = {}
    for (ns, svc), names in (known_routes or {}).items():
        for name in [*names, DEFAULT_ROUTE]:
            rows[(ns, svc, name)] = Row(ns, svc, name)
    for reply in replies:
        span = max(reply.window_s, 1.0)
        for w in reply.routes:
            ns, _, svc = w.service.partition(".")
            if namespace is not None and ns != namespace:
                continue
            row = rows.get((ns, svc, w.route))
            if row is None:
                row = rows[(ns, svc, w.route)] = Row(ns, svc, w.route)
            row.effective_requests += w.effective_requests
            row.effective_successes += w.effective_successes
            row.actual_requests += w.actual_requests
            row.actual_successes += w.actual_successes
            row.effective_rps += w.effective_requests / span
            row.actual_rps += w.actual_requests / span
            row.windows.append(w)
    for row in rows.values():
        if row.windows:
            merged = merge_windows(row.windows)
            row.p50, row.p95, row.p99 = (histogram_quantile(q, merged.latency_buckets_ms, merged.latency_counts)
                                         for q in (0.5, 0.95, 0.99))

    def order(row: Row):
        names = (known_routes or {}).get((row.namespace, row.service), [])
        position = names.index(row.route) if row.route in names else len(names)
        return (row.namespace, row.service, row.route == DEFAULT_ROUTE, position, row.route)

    return sorted(rows.values(), key=order)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def _rps(v: float) -> str:
    return f"{v:.1f}rps"


def _whole_ms(v: float) -> int:
    return int(v + 0.5)  # half up, not to even: 48.5ms shows as 49ms


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{_whole_ms(v)}ms"


def service_label(row: Row, namespace: Optional[str]) -> str:
    return row.service if row.namespace == namespace else f"{row.service}.{row.namespace}"


def table_rows(rows: list[Row], wide: bool, namespace: Optional[str]) -> tuple[list[str], list[list[str]]]:
    header = ["ROUTE", "SERVICE"]
    header += ["EFFECTIVE_SUCCESS", "EFFECTIVE_RPS", "ACTUAL_SUCCESS", "ACTUAL_RPS"] if wide else ["SUCCESS", "RPS"]
    header += ["LATENCY_P50", "LATENCY_P95", "LATENCY_P99"]
    out = []
    for r in rows:
        cells = [r.route, service_label(r, namespace)]
        if not r.has_data:
            cells += ["-"] * (len(header) - 2)
        else:
            cells += [_pct(r.success), _rps(r.effective_rps)]
            if wide:
                cells += [_pct(r.actual_success), _rps(r.actual_rps)]
            cells += [_ms(r.p50), _ms(r.p95), _ms(r.p99)]
        out.append(cells)
    return header, out


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    """Aligned text: the route left-aligned, the figures right-aligned (as Linkerd prints them)."""
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
        out.append("   ".join(cells).rstrip())
    return "\n".join(out) + "\n"


def json_rows(rows: list[Row]) -> list[dict]:
    def num(v: Optional[float], digits: int = 6) -> Optional[float]:
        return None if v is None else round(v, digits)

    out = []
    for r in rows:
        data = r.has_data
        out.append({
            "route": r.route,
            "authority": f"{r.service}.{r.namespace}",
            "success": num(r.success),
            "rps": num(r.effective_rps) if data else None,
            "effective_success": num(r.success),
            "effective_rps": num(r.effective_rps) if data else None,
            "actual_success": num(r.actual_success),
            "actual_rps": num(r.actual_rps) if data else None,
            "latency_ms_p50": None if r.p50 is None else _whole_ms(r.p50),
            "latency_ms_p95": None if r.p95 is None else _whole_ms(r.p95),
            "latency_ms_p99": None if r.p99 is None else _whole_ms(r.p99),
        })
    return out


def missing_proxies(expected: dict[str, schemas.ProxyHeartbeat], replies: list[schemas.StatsReply],
                    now: float) -> list[str]:
    """One line per expected proxy that did not answer, with its heartbeat's age."""
    answered = {schemas.proxy_key(r.namespace, r.workload) for r in replies}
    lines = []
    for key in sorted(set(expected) - answered):
        hb = expected[key]
        age = f"proxy heartbeat {max(0, int(now - hb.time))}s ago" if hb.time else "proxy heartbeat without a time"
        lines.append(f"‼ no answer from {hb.namespace}/{hb.workload} ({age})")
    return lines


# --- the bus side ----------------------------------------------------------------------------


@dataclass
class Gathered:
    target: Target
    replies: list[schemas.StatsReply]
    expected: dict[str, schemas.ProxyHeartbeat]
    known_routes: dict[tuple[str, str], list[str]]
    namespace_filter: Optional[str]
    proxies_total: int


async def _items(bus, bucket: str, cls, prefix: str = "") -> dict:
    try:
        await bus.kv(bucket, create=False)
    except Exception:  # the bucket does not exist: nothing was ever published there
        return {}
    return await bus.items(bucket, cls, prefix)


async def gather_routes(url: str, target: Target, to: Optional[tuple[str, str]], window_s: float,
                        timeout_s: float) -> Gathered:
    bus = await connect_bus(url, what="routes")
    try:
        heartbeats: dict[str, schemas.ProxyHeartbeat] = await _items(bus, schemas.PROXIES_BUCKET,
                                                                     schemas.ProxyHeartbeat)
        profiles: dict[str, schemas.Profile] = {}

        async def profile_of(ns: str, svc: str) -> Optional[schemas.Profile]:
            key = schemas.profile_key(ns, svc)
            if key not in profiles:
                try:
                    await bus.kv(schemas.PROFILES_BUCKET, create=False)
                    profiles[key] = await bus.get(schemas.PROFILES_BUCKET, key, schemas.Profile)
                except Exception:
                    profiles[key] = None
            return profiles[key]

        if target.kind == "maybe":
            target = await _resolve(bus, target, heartbeats, profile_of)
        request = schemas.StatsRequest(window_s=window_s)
        expected = {k: hb for k, hb in heartbeats.items() if hb.ready}
        known: dict[tuple[str, str], list[str]] = {}
        if target.kind == "service":
            request.services = [schemas.profile_key(target.namespace, target.name)]
            destination = (target.namespace, target.name)
        else:
            destination = to
            if to is not None:
                request.services = [schemas.profile_key(*to)]
        if target.kind == "workload":
            chosen = _workload_keys(target, heartbeats)
            if not chosen:
                raise UserError(f"routes: no proxy of workload {target.name!r} in namespace {target.namespace!r} "
                                "is running (none in tulle-proxies)")
            request.workloads = chosen
            expected = {k: hb for k, hb in expected.items() if k in chosen}
        if destination is not None:
            profile = await profile_of(*destination)
            known[destination] = [r.name for r in profile.routes] if profile is not None else []

        def everyone_answered(replies: list[schemas.StatsReply]) -> bool:
            answered = {schemas.proxy_key(r.namespace, r.workload) for r in replies}
            return bool(expected) and set(expected) <= answered

        replies = await bus.gather(schemas.PROXY_STATS_SUBJECT, request, schemas.StatsReply, timeout_s,
                                   until=everyone_answered)
        namespace_filter = target.namespace if target.kind == "all" else None
        return Gathered(target, replies, expected, known, namespace_filter, len(heartbeats))
    finally:
        await bus.close()


def _workload_keys(target: Target, heartbeats: dict[str, schemas.ProxyHeartbeat]) -> list[str]:
    """The workload's own proxy, else the proxies of its pods (`web` → `web-7d9f…`)."""
    exact = schemas.proxy_key(target.namespace, target.name)
    if exact in heartbeats:
        return [exact]
    prefix = schemas.proxy_key(target.namespace, target.name + "-")
    return sorted(k for k in heartbeats if k.startswith(prefix))


async def _resolve(bus, target: Target, heartbeats, profile_of) -> Target:
    """A bare name: a service when destination knows one by that name, else a workload."""
    ns, name = target.namespace, target.name
    if await profile_of(ns, name) is not None:
        return Target("service", ns, name)
    prefix = f"{ns}.{name}."
    endpoints = await _keys(bus, schemas.ENDPOINTS_BUCKET, prefix)
    if any(k[len(prefix):].isdigit() for k in endpoints):
        return Target("service", ns, name)
    workload = Target("workload", ns, name)
    if _workload_keys(workload, heartbeats):
        return workload
    raise UserError(f"routes: no service or workload named {name!r} in namespace {ns!r}")


async def _keys(bus, bucket: str, prefix: str) -> list[str]:
    try:
        await bus.kv(bucket, create=False)
    except Exception:
        return []
    return await bus.keys(bucket, prefix)


# --- the command -----------------------------------------------------------------------------


@click.command()
@click.argument("target", required=False, metavar="SERVICE|WORKLOAD", shell_complete=complete_route_target)
@click.option("--all", "all_", is_flag=True, help="Every route every proxy saw.")
@click.option("-n", "--namespace", default=None, help="Namespace of the target (default: default).",
              shell_complete=complete_namespace)
@click.option("--to", default=None, metavar="SERVICE", help="Only routes to this service ([svc/]NAME[.NAMESPACE]).",
              shell_complete=service_completer("default"))
@click.option("-t", "--window", default="1m", show_default=True, help="How far back: 1s … 10m.")
@click.option("-o", "--output", type=click.Choice(["table", "wide", "json"]), default="table", show_default=True,
              help="wide: effective (as callers saw it) and actual (every attempt on the wire) figures.")
@click.option("--timeout", default="2s", show_default=True, help="How long to wait for the proxies' answers.")
@nats_option()
def routes(target, all_, namespace, to, window, output, timeout, url):
    """Per-route success rate, request rate and latency, from every proxy.

    Proxies that should answer (ready in tulle-proxies) but do not before --timeout are
    named on stderr. `-o wide` works without --to: client proxies measure both the
    effective figures (what callers saw) and the actual ones (every attempt).

    \b
    Examples:
      tulle routes authors -n demo             routes to the authors service, from all its clients
      tulle routes workload/web -n demo --to authors -o wide
      tulle routes --all -n demo --window 5m -o json
    """
    from tulle.log import setup_logging

    setup_logging("cli", "warning")  # stdout carries the answer only
    parsed = parse_target(target, all_, namespace)
    dest = parse_to(to, parsed)
    window_s = bounded_seconds(window, "--window", 1, MAX_WINDOW_S, "routes")
    timeout_s = bounded_seconds(timeout, "--timeout", 0.001, 60, "routes")
    got = asyncio.run(gather_routes(url, parsed, dest, window_s, timeout_s))

    for line in missing_proxies(got.expected, got.replies, time.time()):
        click.echo(line, err=True)
    if got.proxies_total == 0 and not got.replies:
        click.echo("tulle: no proxies are running (tulle-proxies is empty)", err=True)
    rows = aggregate(got.replies, namespace=got.namespace_filter, known_routes=got.known_routes)
    shown_namespace = got.target.namespace
    if output == "json":
        click.echo(json.dumps({got.target.resource: json_rows(rows)}, indent=2))
        return
    if not rows:
        click.echo(f"No traffic found in the last {_fmt_duration(window_s)}.", err=True)
        return
    header, cells = table_rows(rows, output == "wide", shown_namespace)
    if sys.stdout.isatty():
        _rich_table(header, cells)
    else:
        click.echo(plain_table(header, cells), nl=False)


def _rich_table(header: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*(Text(c) for c in r))  # route names are data, never rich markup
    Console().print(table)
