"""The adapter of local mode: read the run record, probe every process now, read the
identity folder and the bus, into `LocalFacts`.

The bus connection is made by the `connect` function the caller passes (the CLI's
`connect_bus`): how the CLI authenticates to NATS is decided in one place.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Awaitable, Callable, Optional

from tulle import __version__, schemas
from tulle.check.identity import IdentityMaterial, fingerprints
from tulle.check.local import BusFacts, LocalFacts, ProcessFacts, ProxyFacts
from tulle.local.probe import http_get, split_addr
from tulle.local.state import StateDir, nats_nodes, process_alive, read_record
from tulle.local.status import collect

Connect = Callable[..., Awaitable["object"]]  # connect_bus(url, timeout=...) -> Bus; raises on failure

BUS_TIMEOUT_S = 3.0
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
                                           ready.get(c.get("name"), False), c.get("admin", ""), c.get("restarts", 0)))
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
        facts.bus = await read_bus(target, connect, nats_up=bool(facts.nats and facts.nats.ready),
                                   meshed=facts.meshed, with_proxies=with_proxies)
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


async def read_bus(url, connect: Connect, *, nats_up: bool, meshed: bool, with_proxies: bool) -> BusFacts:
    """`url`: the bus to read (a URL, or a tulle.cli.common.BusTarget carrying its credential)."""
    facts = BusFacts(url=str(url))
    if not nats_up:
        facts.connect_error = "NATS is not running"
        return facts
    try:
        bus = await connect(url, timeout=BUS_TIMEOUT_S)
    except Exception as e:  # UserError: not reachable in time; anything the client raises
        facts.connect_error = str(e) or type(e).__name__
        return facts
    try:
        await _read_jetstream(bus, facts, meshed=meshed, with_proxies=with_proxies)
    finally:
        await bus.close()
    return facts


async def _read_jetstream(bus, facts: BusFacts, *, meshed: bool, with_proxies: bool) -> None:
    import nats.errors
    import nats.js.errors

    wanted = [schemas.ENDPOINTS_BUCKET, schemas.PROFILES_BUCKET, schemas.POLICY_BUCKET, schemas.LEASES_BUCKET]
    if meshed:
        wanted += [schemas.IDENTITY_BUCKET, schemas.PROXIES_BUCKET]
    for bucket in wanted:
        try:
            await asyncio.wait_for(bus.kv(bucket, create=False), BUS_TIMEOUT_S)
        except nats.js.errors.BucketNotFoundError:
            facts.missing_buckets.append(bucket)
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as e:
            facts.jetstream_error = str(e) or type(e).__name__
            return
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            facts.jetstream_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            return
    try:
        await asyncio.wait_for(bus.js.stream_info(schemas.EVENTS_STREAM), BUS_TIMEOUT_S)
    except nats.js.errors.NotFoundError:
        facts.events_stream = False
    except (nats.errors.Error, asyncio.TimeoutError):
        pass  # said by the bucket checks, if anything
    if meshed and schemas.IDENTITY_BUCKET not in facts.missing_buckets:
        facts.trust_bundle = await bus.get(schemas.IDENTITY_BUCKET, schemas.TRUST_BUNDLE_KEY, schemas.TrustBundle)
    if meshed and with_proxies and schemas.PROXIES_BUCKET not in facts.missing_buckets:
        facts.heartbeats = await bus.items(schemas.PROXIES_BUCKET, schemas.ProxyHeartbeat)
