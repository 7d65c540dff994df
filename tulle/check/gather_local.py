"""The adapter of local mode: read the run record, probe every process now, read the
identity folder and the bus, into `LocalFacts`.

The bus is read by tulle/check/gather_nats.py (shared with a cluster), connecting with
the `connect` function the caller passes (the CLI's `connect_bus`): how the CLI
authenticates to NATS is decided in one place.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Optional

from tulle import __version__
from tulle.check.gather_nats import Connect, read_bus
from tulle.check.identity import IdentityMaterial, fingerprints
from tulle.check.local import LocalFacts, ProcessFacts, ProxyFacts
from tulle.local.probe import http_get, split_addr
from tulle.local.state import StateDir, nats_nodes, process_alive, read_record
from tulle.local.status import collect

PROBE_TIMEOUT_S = 2.0


async def gather(state: StateDir, *, with_proxies: bool, connect: Connect, now: Optional[float] = None) -> LocalFacts:
    facts = LocalFacts(state_dir=str(state.root), with_proxies=with_proxies, cli_version=__version__,
                       now=now if now is not None else time.time())
    record = read_record(state)
    if not record:
        return facts
    # A busy machine may take a while to answer a probe: a missed answer here would be reported as broken.
    view = await collect(state, record, probe_timeout=PROBE_TIMEOUT_S)
    facts.running = True
    facts.meshed = bool(record.get("meshed", True))
    sup = record.get("supervisor") or {}
    facts.supervisor_alive = process_alive(sup.get("pid"), sup.get("start"))

    ready = {c["name"]: c["ready"] for c in view["components"]}
    nats = record.get("nats") or None
    nodes = [ProcessFacts(n["name"], n.get("pid"), process_alive(n.get("pid"), n.get("start")),
                          ready.get(n["name"], False), n.get("url", ""), n.get("restarts", 0)) for n in nats_nodes(record)]
    if nodes:
        # A cluster is judged by its first node that is down or not serving (any is worth a ×).
        facts.nats = next((n for n in nodes if not n.alive), None) or next((n for n in nodes if not n.ready), nodes[0])
    for c in record.get("components") or []:
        facts.services.append(ProcessFacts(c.get("name", "?"), c.get("pid"), process_alive(c.get("pid"), c.get("start")),
                                           ready.get(c.get("name"), False), c.get("admin", ""), c.get("restarts", 0),
                                           proxied=bool(c.get("proxy"))))
    versions = await asyncio.gather(*(_version(s) for s in facts.services))
    for s, v in zip(facts.services, versions):
        s.version = v

    proxy_ready = {(w["namespace"], w["name"]): bool(w["proxy"] and w["proxy"]["ready"]) for w in view["workloads"]}
    for w in record.get("workloads") or []:
        proxy = w.get("proxy")
        if not w.get("meshed") or not proxy:
            continue
        facts.proxies.append(ProxyFacts(
            w.get("namespace", ""), w.get("name", ""), w.get("identity", ""), proxy.get("pid"),
            process_alive(proxy.get("pid"), proxy.get("start")), proxy_ready.get((w.get("namespace"), w.get("name")),
                                                                                 False), proxy.get("admin", "")))
    facts.proxies.sort(key=lambda p: (p.namespace, p.workload))

    if facts.meshed:
        facts.identity = read_identity_folder(state.identity)
        if facts.identity.anchors_pem:
            facts.installation_anchors = fingerprints(facts.identity.anchors_pem)
    if nats and nats.get("url"):
        from tulle.cli.common import BusTarget

        # The run's own observer credential: the bus refuses anonymous clients.
        target = BusTarget(nats["url"], nats.get("observer_creds", ""), nats.get("ca", ""))
        # Any node running is enough to try (the client fails over; a cluster's nodes may say
        # not ready on /healthz while a peer is down, yet serve clients).
        facts.bus = await read_bus(target, connect, nats_up=any(n.alive for n in nodes),
                                   meshed=facts.meshed, with_proxies=with_proxies, servers=len(nodes))
    return facts


async def _version(svc: ProcessFacts) -> str:
    """The version a running service reports in `tulle_build_info` on its /metrics."""
    if not svc.alive or not svc.address:
        return ""
    from tulle.metrics import parse_text

    host, port = split_addr(svc.address)
    got = await http_get(host, port, "/metrics", PROBE_TIMEOUT_S)
    if got is None or got[0] != 200:
        return ""
    try:
        samples = parse_text(got[1].decode("utf-8", "replace"))
    except ValueError:
        return ""
    for (name, labels), value in samples.items():
        if name == "tulle_build_info" and value:
            return dict(labels).get("version", "")
    return ""


def read_identity_folder(folder: Path) -> IdentityMaterial:
    """What the identity service of a local run signs with: ca.crt, issuer.crt, issuer.key."""
    fix_issuer = (f"sign a new issuer with the anchor's key: `tulle identity init --anchor-cert {folder}/ca.crt "
                  f"--anchor-key ANCHOR.key --out {folder} --force` (the identity service reloads it); without "
                  f"the anchor's key, `tulle down`, move {folder} away and `tulle up` makes new material")
    fix_anchors = (f"`tulle down`, move {folder} away and `tulle up`: it makes a new anchor and issuer "
                   "(or put your own there with `tulle identity init --out`)")
    m = IdentityMaterial(anchors_where=str(folder / "ca.crt"), issuer_where=str(folder / "issuer.crt"),
                         fix_anchors=fix_anchors, fix_issuer=fix_issuer)
    m.anchors_pem, m.anchors_problem = _read(folder / "ca.crt")
    m.issuer_cert_pem, m.issuer_problem = _read(folder / "issuer.crt")
    m.issuer_key_pem, key_problem = _read(folder / "issuer.key")
    if m.issuer_key_pem is None and m.issuer_cert_pem is not None:
        m.issuer_problem = f"issuer.key: {key_problem}"
    return m


def _read(path: Path) -> tuple[Optional[bytes], str]:
    try:
        return path.read_bytes(), ""
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"cannot read: {e.strerror or e}"
