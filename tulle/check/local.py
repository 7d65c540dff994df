"""The checks of a local run (`tulle up`): the facts gather_local collects, and the
categories over them.

    tulle-local          the run is recorded, its supervisor runs
    tulle-control-plane  NATS and each service: running and ready
    tulle-nats           a connection, JetStream, the KV buckets, the event stream, the
                         streams' leaders and copies against the run's NATS servers
                         (tulle/check/nats.py, shared with a cluster)
    tulle-identity       the anchors and issuer in <state>/identity, published on the bus
    tulle-version        the running services' version against the CLI's
    tulle-control-plane-proxy
                         the services run without proxies, by design
    tulle-data-plane     (--proxy) every meshed workload's proxy: ready, heartbeat,
                         certificate (valid, renewed, under the installation's anchors),
                         trust anchors, version
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tulle import schemas
from tulle.check.core import Category, Check, Outcome, Result, error, ok, warning
from tulle.check.identity import IdentityMaterial, identity_checks
from tulle.check.nats import BusFacts, NatsAdvice, nats_checks
from tulle.check.proxies import DEFAULT_LIFETIME_S, certificate_verdict, certificates_outcome

SERVICES = ("destination", "identity", "policy", "injector")


@dataclass
class ProcessFacts:
    """NATS or a service, as the record names it and as probed now."""

    name: str
    pid: Optional[int] = None
    alive: bool = False
    ready: bool = False
    address: str = ""  # NATS URL, or the admin host:port
    restarts: int = 0
    version: str = ""  # from its /metrics (tulle_build_info); "" when unknown
    proxied: bool = False  # the record gives it a proxy of its own (never, by design)


@dataclass
class ProxyFacts:
    namespace: str
    workload: str
    expected_identity: str
    pid: Optional[int] = None
    alive: bool = False
    ready: bool = False  # its admin /ready answers 200 now
    admin: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.workload}"


@dataclass
class LocalFacts:
    state_dir: str
    running: bool = False  # a run is recorded
    supervisor_alive: bool = False
    meshed: bool = True
    nats: Optional[ProcessFacts] = None
    services: list[ProcessFacts] = field(default_factory=list)
    identity: Optional[IdentityMaterial] = None
    installation_anchors: set[str] = field(default_factory=set)  # sha256 of the anchors in <state>/identity
    bus: Optional[BusFacts] = None
    proxies: list[ProxyFacts] = field(default_factory=list)
    with_proxies: bool = False
    cli_version: str = ""
    now: float = 0.0
    cert_lifetime_s: float = DEFAULT_LIFETIME_S  # of the certificates the identity service issues

    @property
    def nats_down(self) -> bool:
        return self.nats is None or not self.nats.ready


# --- tulle-local --------------------------------------------------------------------------------


def run_recorded(f: LocalFacts) -> Outcome:
    if not f.running:
        return error(f"no local run is recorded in {f.state_dir}",
                     "start one with `tulle up`, or point at the one running with --state-dir (TULLE_STATE_DIR)")
    return ok()


def supervisor_running(f: LocalFacts) -> Outcome:
    if not f.supervisor_alive:
        return error("the supervisor of this run is gone: nothing restarts what stops",
                     "`tulle down` cleans up what it left, then `tulle up` starts afresh")
    return ok()


# --- tulle-control-plane ------------------------------------------------------------------------


def nats_running(f: LocalFacts) -> Outcome:
    n = f.nats
    if n is None:
        return error("the run record names no NATS server", "`tulle down`, then `tulle up`")
    if not n.alive:
        return error(f"nats-server (pid {n.pid or '?'}) is not running", _restart_hint(f, "nats"))
    if not n.ready:
        return error(f"nats-server (pid {n.pid}) does not accept connections at {n.address}",
                     "`tulle logs --component nats` shows why")
    return ok()


def _restart_hint(f: LocalFacts, name: str) -> str:
    why = f"`tulle logs --component {name}` shows why it stopped"
    if f.supervisor_alive:
        return f"the supervisor restarts it; {why}"
    return f"nothing restarts it (the supervisor is gone): {why}, then `tulle down` and `tulle up`"


def service_ready(name: str):
    def run(f: LocalFacts) -> Optional[Outcome]:
        svc = next((s for s in f.services if s.name == name), None)
        if svc is None:
            if name == "identity" and not f.meshed:
                return None  # `tulle up --no-proxy` runs no identity service
            return error(f"the run record names no {name} service", "`tulle down`, then `tulle up`")
        if not svc.alive:
            return error(f"{name} (pid {svc.pid or '?'}) is not running", _restart_hint(f, name))
        if not svc.ready:
            if f.nats_down:
                return error(f"{name} (pid {svc.pid}) is not ready: it waits for NATS, which is down",
                             "bring NATS back (see the NATS check above); the service follows by itself")
            return error(f"{name} (pid {svc.pid}) is not ready: its /ready at {svc.address} does not answer 200",
                         f"`tulle logs --component {name}` says what it waits for")
        return ok()
    return run


# --- tulle-nats ---------------------------------------------------------------------------------


def _bus(f: LocalFacts) -> Optional[BusFacts]:
    return f.bus if f.bus is not None and f.bus.connected else None


def _bus_facts(f: LocalFacts) -> Optional[BusFacts]:
    return f.bus


NATS_ADVICE = NatsAdvice(
    unreachable="see the NATS check above, or `tulle logs --component nats`",
    jetstream_off="local mode's nats-server runs with JetStream on; `tulle logs --component nats` says why it is off",
    fix_replicas="the services make each stream with --nats-replicas copies when it is missing and never change "
                 "it: `tulle down`, move <state>/nats away and `tulle up` again (with --nats-cluster as before) "
                 "makes {streams} afresh with {n}; the services publish their contents again")


# --- tulle-identity -----------------------------------------------------------------------------


def bundle_published(f: LocalFacts) -> Optional[Outcome]:
    bus = _bus(f)
    if bus is None or not bus.jetstream or f.identity is None or not f.installation_anchors:
        return None
    key = f"{schemas.IDENTITY_BUCKET}/{schemas.TRUST_BUNDLE_KEY}"
    if bus.trust_bundle is None:
        return error(f"nothing is published under {key}",
                     "the identity service publishes it once its issuer is loaded: `tulle logs --component identity`")
    from tulle.check.identity import fingerprints

    if fingerprints(bus.trust_bundle.anchors_pem) != f.installation_anchors:
        return error(f"the anchors under {key} are not those in {f.identity.anchors_where}",
                     "the identity service reloads the folder when its files change: `tulle logs --component identity`")
    return ok()


# --- tulle-version ------------------------------------------------------------------------------


def control_plane_version(f: LocalFacts) -> Optional[Outcome]:
    known = [s for s in f.services if s.version]
    if not known:
        return None
    other = [f"{s.name} runs {s.version}" for s in known if s.version != f.cli_version]
    if other:
        return warning(f"{', '.join(other)}; this CLI is {f.cli_version}",
                       "restart the mesh with this version: `tulle down`, then `tulle up`")
    return ok()


# --- tulle-control-plane-proxy ------------------------------------------------------------------


def control_plane_unmeshed(f: LocalFacts) -> Optional[Outcome]:
    """The services reach NATS directly with their own credentials: a proxy in front of
    identity would need a certificate from it, and one in front of NATS the bus it serves."""
    if not f.running:
        return None
    proxied = [s.name for s in f.services if s.proxied]
    if proxied:
        return warning(f"the run record gives {', '.join(proxied)} a proxy",
                       "the control plane runs without proxies: `tulle down`, then `tulle up`")
    return ok()


# --- tulle-data-plane ---------------------------------------------------------------------------


def _proxies(f: LocalFacts) -> Optional[list[ProxyFacts]]:
    if not f.with_proxies or not f.running:
        return None
    return f.proxies


def proxies_ready(f: LocalFacts) -> Optional[Outcome]:
    proxies = _proxies(f)
    if proxies is None:
        return None
    problems, first = [], None
    for p in proxies:
        if not p.alive:
            problems.append(f"{p.key}: its proxy (pid {p.pid or '?'}) is not running")
        elif not p.ready:
            problems.append(f"{p.key}: its proxy (pid {p.pid}) is not ready: /ready at {p.admin} does not answer 200")
        else:
            continue
        first = first or p
    if problems:
        return error("\n".join(problems), f"`tulle logs -n {first.namespace} {first.workload} --container tulle-proxy` "
                                          "says what it waits for (a certificate, NATS, its policy)")
    return ok()


def _heartbeat(f: LocalFacts, p: ProxyFacts) -> Optional[schemas.ProxyHeartbeat]:
    return f.bus.heartbeats.get(schemas.proxy_key(p.namespace, p.workload)) if f.bus else None


def proxies_heartbeat(f: LocalFacts) -> Optional[Outcome]:
    proxies, bus = _proxies(f), _bus(f)
    if proxies is None or bus is None or not bus.heartbeats_read:
        return None  # a bucket that could not be read is said by tulle-nats, not as each proxy's silence
    problems, first = [], None
    for p in proxies:
        if not p.alive:
            continue  # said above
        hb = _heartbeat(f, p)
        if hb is None:
            problems.append(f"{p.key}: no heartbeat in {schemas.PROXIES_BUCKET} "
                            f"(entries expire {schemas.PROXY_HEARTBEAT_TTL_S:g} s after the last)")
        elif not hb.ready:
            problems.append(f"{p.key}: its heartbeat says not ready")
        else:
            continue
        first = first or p
    if problems:
        return error("\n".join(problems), f"a proxy writes it every few seconds once connected to NATS: "
                                          f"`tulle logs -n {first.namespace} {first.workload} --container tulle-proxy`")
    return ok()


def proxies_certificates(f: LocalFacts) -> Optional[Outcome]:
    proxies, bus = _proxies(f), _bus(f)
    if proxies is None or bus is None:
        return None
    issuer = f.identity.issuer() if f.identity is not None else None
    issuer_not_after = issuer.not_valid_after_utc.timestamp() if issuer is not None else None
    verdicts = ((p, p.key, certificate_verdict(
        hb, now=f.now, expected_identity=p.expected_identity, installation_anchors=f.installation_anchors,
        lifetime_s=f.cert_lifetime_s, issuer_not_after=issuer_not_after))
        for p in proxies if (hb := _heartbeat(f, p)) is not None and p.alive)  # the others: said above
    return certificates_outcome(verdicts, lambda p: (
        f"a proxy renews its certificate at 70 % of its life from the identity service: "
        f"`tulle logs -n {p.namespace} {p.workload} --container tulle-proxy`, `tulle logs --component identity`"))


def proxies_trust_anchors(f: LocalFacts) -> Optional[Outcome]:
    proxies, bus = _proxies(f), _bus(f)
    if proxies is None or bus is None or not f.installation_anchors:
        return None
    reported = [(p, hb) for p in proxies if (hb := _heartbeat(f, p)) is not None and hb.trust_anchors]
    if not reported:
        return None  # these proxies do not say which anchors they trust
    disjoint = [p.key for p, hb in reported if not set(hb.trust_anchors) & f.installation_anchors]
    partial = [p.key for p, hb in reported if set(hb.trust_anchors) != f.installation_anchors and p.key not in disjoint]
    hint = "a proxy reads its anchors when it starts: restart it (or `tulle down` and `tulle up`) after changing them"
    if disjoint:
        return error(f"trust none of the installation's anchors: {', '.join(disjoint)}", hint)
    if partial:
        return warning(f"trust other anchors than the installation's: {', '.join(partial)}", hint)
    return ok()


def proxies_version(f: LocalFacts) -> Optional[Outcome]:
    proxies, bus = _proxies(f), _bus(f)
    if proxies is None or bus is None:
        return None
    old = [f"{p.key} runs {hb.version}" for p in proxies
           if (hb := _heartbeat(f, p)) is not None and hb.version and hb.version != f.cli_version]
    if old:
        return warning(f"{', '.join(old)}; this CLI is {f.cli_version}",
                       "restart those workloads' proxies with this version (`tulle down`, then `tulle up`)")
    return ok()


def _identity(f: LocalFacts) -> Optional[IdentityMaterial]:
    return f.identity if f.running and f.meshed else None


def categories(with_proxies: bool) -> list[Category[LocalFacts]]:
    cats = [
        Category("tulle-local", (
            Check("tulle up is running", run_recorded, fatal=True),
            Check("the supervisor is running", supervisor_running),
        )),
        Category("tulle-control-plane", (
            Check("NATS is running", nats_running, transient=True),
            *(Check(f"the {name} service is ready", service_ready(name), transient=True) for name in SERVICES),
        )),
        Category("tulle-nats", nats_checks(_bus_facts, NATS_ADVICE)),
        Category("tulle-identity", (
            *identity_checks(_identity),
            Check("the identity service publishes these trust anchors", bundle_published, transient=True),
        )),
        Category("tulle-version", (
            Check("control plane and cli versions match", control_plane_version),
        )),
        Category("tulle-control-plane-proxy", (
            Check("the control plane runs without proxies, by design", control_plane_unmeshed),
        )),
    ]
    if with_proxies:
        cats.append(Category("tulle-data-plane", (
            Check("data plane proxies are ready", proxies_ready, transient=True),
            Check("data plane proxies send heartbeats", proxies_heartbeat, transient=True),
            Check("data plane proxies have valid certificates", proxies_certificates, transient=True),
            Check("data plane proxies trust the installation's anchors", proxies_trust_anchors),
            Check("data plane and cli versions match", proxies_version),
        )))
    return cats
