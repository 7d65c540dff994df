"""`tulle status`: what the run record says, checked live.

The record gives pids and addresses; each component's admin `/ready` and each proxy's
`/ready` are probed now (short timeouts, all at once), and a process that is gone shows
as not ready whatever the record says. The same view feeds the live display of a
foreground `tulle up`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from tulle.local.probe import http_ready, split_addr, tcp_ready
from tulle.local.state import StateDir, nats_nodes, process_alive, read_record


async def collect(state: StateDir, record: Optional[dict] = None, *,
                  probe_timeout: float = 0.5) -> Optional[dict[str, Any]]:
    """The run's view, every probe made now (at once, each given `probe_timeout` seconds)."""
    record = record if record is not None else read_record(state)
    if not record:
        return None
    sup = record.get("supervisor") or {}
    nats = record.get("nats") or {}

    async def nats_ready(node: dict) -> bool:
        if not process_alive(node.get("pid"), node.get("start")):
            return False
        if node.get("health"):  # a cluster's node: serving once its JetStream is current
            host, port = split_addr(node["health"])
            return await http_ready(host, port, "/healthz", probe_timeout)
        host, port = split_addr(node["url"].split("://", 1)[-1])
        return await tcp_ready(host, port, probe_timeout)

    async def admin_ready(pid, start, admin: str) -> bool:
        if not admin or not process_alive(pid, start):
            return False
        host, port = split_addr(admin)
        return await http_ready(host, port, "/ready", probe_timeout)

    comps = record.get("components") or []
    workloads = record.get("workloads") or []
    nodes = nats_nodes(record)
    probes = [nats_ready(n) for n in nodes]
    probes += [admin_ready(c.get("pid"), c.get("start"), c.get("admin", "")) for c in comps]
    probes += [admin_ready((w.get("proxy") or {}).get("pid"), (w.get("proxy") or {}).get("start"),
                           (w.get("proxy") or {}).get("admin", "")) if w.get("proxy") else _false()
               for w in workloads]
    results = await asyncio.gather(*probes)
    nats_ok, results = results[:len(nodes)], results[len(nodes):]
    comp_ok, proxy_ok = results[:len(comps)], results[len(comps):]

    components = []
    for n, ok in zip(nodes, nats_ok):
        components.append({"name": n["name"], "pid": n.get("pid"), "address": n.get("url"), "ready": ok,
                           "restarts": n.get("restarts", 0)})
    for c, ok in zip(comps, comp_ok):
        components.append({"name": c.get("name"), "pid": c.get("pid"), "address": c.get("admin"), "ready": ok,
                           "restarts": c.get("restarts", 0)})
    wl_view, ready_by_key = [], {}
    for w, pok in zip(workloads, proxy_ok):
        app = w.get("app") or {}
        alive = process_alive(app.get("pid"), app.get("start"))
        proxy = w.get("proxy")
        ready = bool(w.get("ready")) and alive and (pok if proxy else True)
        ready_by_key[w.get("key")] = ready
        wl_view.append({
            "name": w.get("name"),
            "namespace": w.get("namespace"),
            "pid": app.get("pid") if alive else None,
            "address": w.get("address"),
            "netns": w.get("netns") or None,
            "ready": ready,
            "restarts": app.get("restarts", 0),
            "last_exit": app.get("last_exit") or None,
            "meshed": bool(w.get("meshed")),
            "identity": w.get("identity") or None,
            "proxy": ({"pid": proxy.get("pid"), "admin": proxy.get("admin"), "ready": pok,
                       "restarts": proxy.get("restarts", 0)} if proxy else None),
        })
    services = []
    for s in record.get("services") or []:
        services.append(dict(s, endpoints=[dict(e, ready=ready_by_key.get(f"{s['namespace']}.{e['workload']}", False))
                                           for e in s.get("endpoints", [])]))
    return {
        "state_dir": record.get("state_dir"),
        "manifests": record.get("manifests"),
        "isolation": record.get("isolation"),
        "meshed": record.get("meshed"),
        "phase": record.get("phase"),
        "supervisor": {"pid": sup.get("pid"), "running": process_alive(sup.get("pid"), sup.get("start"))},
        "nats_url": nats.get("url"),
        # What a tool reads the bus with (read-only): tulle's own commands use it by themselves.
        "nats_observer_creds": nats.get("observer_creds"),
        "nats_ca": nats.get("ca") or None,
        "subnet": (record.get("net") or {}).get("subnet"),
        "components": components,
        "workloads": wl_view,
        "services": services,
    }


async def _false() -> bool:
    return False


def _yes(ok: bool) -> Text:
    return Text("ready", style="green") if ok else Text("not ready", style="red")


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, show_edge=False, expand=False,
                 pad_edge=False, padding=(0, 2, 0, 0))


def render(view: dict[str, Any]) -> Group:
    """The status as rich tables: components, workloads, services."""
    head = Text.assemble(
        ("tulle local mode", "bold"), f"  isolation {view['isolation']}",
        "" if view.get("meshed") else " (no proxies)", f"  subnet {view.get('subnet') or '-'}\n",
        f"state {view['state_dir']}  manifests {view.get('manifests')}",
        ("" if view["supervisor"]["running"] else
         ("\nthe supervisor is not running: `tulle down` cleans up", "bold red")))
    comps = _table("Components")
    for col in ("NAME", "PID", "ADDRESS", "STATUS", "RESTARTS"):
        comps.add_column(col)
    for c in view["components"]:
        comps.add_row(c["name"], str(c["pid"] or "-"), c["address"] or "-", _yes(c["ready"]), str(c.get("restarts", 0)))
    wls = _table("Workloads")
    for col in ("WORKLOAD", "PID", "ADDRESS", "STATUS", "RESTARTS", "PROXY"):
        wls.add_column(col)
    for w in view["workloads"]:
        proxy = w["proxy"]
        if proxy is None:
            proxy_cell = Text("not meshed", style="yellow")
        else:
            proxy_cell = Text.assemble(_yes(proxy["ready"]), f" pid {proxy['pid'] or '-'}")
        wls.add_row(f"{w['namespace']}/{w['name']}", str(w["pid"] or "-"), w["address"], _yes(w["ready"]),
                    str(w["restarts"]), proxy_cell)
    svcs = _table("Services")
    for col in ("SERVICE", "CLUSTER-IP", "PORTS", "ENDPOINTS"):
        svcs.add_column(col)
    for s in view["services"]:
        ports = ", ".join(f"{p['port']}→{p['target_port']}" for p in s["ports"])
        eps = ", ".join(f"{e['workload']}" + ("" if e["ready"] else " (not ready)") for e in s["endpoints"]) or "none"
        svcs.add_row(f"{s['namespace']}/{s['name']}", s["cluster_ip"] or "-", ports, eps)
    return Group(head, comps, wls, svcs)
