"""The bus, as the observer sees it: the facts gather_nats reads over NATS, and the
`tulle-nats` checks both modes share (a local run and a cluster).

    can connect to NATS                        the observer credential logs in
    JetStream is enabled                       the account's JetStream answers ($JS.API.INFO)
    the KV buckets exist                       each tulle-* bucket's stream
    the event stream exists                    TULLE_EVENTS
    the NATS cluster is healthy                every stream has a leader and its replicas are
                                               current; a cluster of N servers when N are meant
    the buckets' replicas match the NATS cluster
                                               each stream keeps min(servers, 5) copies

The observer may read each tulle stream's info (`$JS.API.STREAM.INFO.<stream>`) and the
account's JetStream info, not the system account ($SYS: servers, routes, the meta
group): so the health of the cluster is judged through the streams Tulle keeps, which is
what a reader of the mesh depends on. Each mode says in `NatsAdvice` how a person fixes
what is wrong there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from tulle import schemas
from tulle.bus import MAX_REPLICAS
from tulle.check.core import Check, Outcome, error, ok, warning

# Who creates each bucket when it is missing (the hint names whose logs say why it is not there).
BUCKET_OWNERS = {
    schemas.ENDPOINTS_BUCKET: "destination", schemas.PROFILES_BUCKET: "destination",
    schemas.POLICY_BUCKET: "policy", schemas.IDENTITY_BUCKET: "identity", schemas.LEASES_BUCKET: "destination",
    schemas.PROXIES_BUCKET: "proxy",
}


@dataclass
class Replica:
    """A server holding a copy of a stream, as the stream's leader sees it."""

    name: str
    current: bool = True
    offline: bool = False
    lag: int = 0


@dataclass
class StreamFacts:
    name: str  # "KV_tulle-endpoints", "TULLE_EVENTS"
    replicas: int = 0  # the copies its configuration asks for
    clustered: bool = False  # it lives in a JetStream cluster (its info names one)
    leader: str = ""  # "" in a cluster: no leader now
    peers: list[Replica] = field(default_factory=list)  # the copies other than the leader's
    error: str = ""  # its info could not be read


@dataclass
class BusFacts:
    url: str
    connect_error: str = ""  # "" when connected
    jetstream_error: str = ""
    missing_buckets: list[str] = field(default_factory=list)
    events_stream: bool = True
    trust_bundle: Optional[schemas.TrustBundle] = None
    heartbeats: dict[str, schemas.ProxyHeartbeat] = field(default_factory=dict)  # <ns>.<workload>
    heartbeats_read: bool = False  # tulle-proxies was read (an empty dict then means no proxy beats)
    # The NATS servers the installation runs (the StatefulSet's replicas, the run's nodes); 0: unknown.
    servers: int = 0
    server_name: str = ""  # the server this connection reached
    cluster_name: str = ""  # the JetStream cluster it belongs to ("" for a single server)
    streams: dict[str, StreamFacts] = field(default_factory=dict)  # by stream name, in the order read

    @property
    def connected(self) -> bool:
        return not self.connect_error

    @property
    def jetstream(self) -> bool:
        return self.connected and not self.jetstream_error

    @property
    def wanted_replicas(self) -> int:
        """The copies each stream should keep: one per server, up to JetStream's limit."""
        return min(self.servers, MAX_REPLICAS)


@dataclass(frozen=True)
class NatsAdvice:
    """How a person looks into and fixes the bus where it runs (one sentence each)."""

    unreachable: str  # the hint when the observer cannot connect
    jetstream_off: str
    nats_logs: str = "`tulle logs --component nats` says why"
    # Sentence on how a stream gets the copies it should have; {streams} and {n} are filled in.
    fix_replicas: str = ""


# --- the checks ---------------------------------------------------------------------------------


def nats_connect(bus: BusFacts, advice: NatsAdvice) -> Outcome:
    if not bus.connected:
        return error(f"cannot connect to {bus.url}: {bus.connect_error}", advice.unreachable)
    return ok()


def jetstream_enabled(bus: BusFacts, advice: NatsAdvice) -> Optional[Outcome]:
    if not bus.connected:
        return None
    if bus.jetstream_error:
        return error(f"JetStream does not answer: {bus.jetstream_error}", advice.jetstream_off)
    return ok()


def buckets_exist(bus: BusFacts, advice: NatsAdvice) -> Optional[Outcome]:
    if not bus.jetstream:
        return None
    if bus.missing_buckets:
        owners = sorted({BUCKET_OWNERS.get(b, "?") for b in bus.missing_buckets})
        return error(f"missing: {', '.join(bus.missing_buckets)}",
                     f"each is created by its writer when it starts ({', '.join(owners)}): "
                     f"`tulle logs --component {owners[0]}`")
    return ok()


def events_stream_exists(bus: BusFacts, advice: NatsAdvice) -> Optional[Outcome]:
    if not bus.jetstream:
        return None
    if not bus.events_stream:
        return error(f"the stream {schemas.EVENTS_STREAM} does not exist: events are not kept",
                     "every service creates it when it starts; `tulle logs --component destination`")
    return ok()


def cluster_healthy(bus: BusFacts, advice: NatsAdvice) -> Optional[Outcome]:
    """Every stream Tulle keeps has a leader (else nothing can write it: fewer than a quorum
    of its servers answer), and every copy is current (else one server is down or behind)."""
    if not bus.jetstream or not bus.streams:
        return None
    errors = []
    if bus.servers > 1 and not bus.cluster_name:
        errors.append(f"{bus.server_name or 'the server'} is not part of a cluster: "
                      f"the installation runs {bus.servers} NATS servers")
    offline: dict[str, list[str]] = {}  # server -> the streams whose copy on it is offline
    behind: dict[str, list[str]] = {}
    for s in bus.streams.values():
        if s.error:
            errors.append(f"{s.name}: {s.error}")
        elif s.clustered and not s.leader:
            errors.append(f"{s.name} has no leader: fewer than a quorum of its {s.replicas} servers answer")
        else:
            for p in s.peers:
                if p.offline:
                    offline.setdefault(p.name, []).append(s.name)
                elif not p.current:
                    behind.setdefault(p.name, []).append(s.name + (f" ({p.lag} operations behind)" if p.lag else ""))
    # One line per server: a server down shows in every stream it holds a copy of.
    warnings = [f"{name} is offline: its copies of {', '.join(streams)}" for name, streams in sorted(offline.items())]
    warnings += [f"the copies on {name} are not current: {', '.join(streams)}" for name, streams in sorted(behind.items())]
    hint = (f"a NATS server is down or cannot reach the others: {advice.nats_logs}; the copies catch up "
            "once it is back")
    if errors:
        return error("\n".join(errors + warnings), hint)
    if warnings:
        return warning("\n".join(warnings), hint)
    return ok()


def replicas_match(bus: BusFacts, advice: NatsAdvice) -> Optional[Outcome]:
    """A stream keeps the copies it was made with: made while NATS had fewer servers (or by a
    service told fewer), losing one server loses it until that server is back."""
    if not bus.jetstream or not bus.servers:
        return None
    readable = [s for s in bus.streams.values() if not s.error and s.replicas]
    if not readable:
        return None
    want = bus.wanted_replicas
    fewer = [s for s in readable if s.replicas < want]
    more = [s for s in readable if s.replicas > bus.servers]
    lines = [f"{s.name} keeps {s.replicas} {'copy' if s.replicas == 1 else 'copies'}, not {want}" for s in fewer]
    lines += [f"{s.name} asks for {s.replicas} copies on {bus.servers} NATS "
              f"{'server' if bus.servers == 1 else 'servers'}: it cannot keep them" for s in more]
    if not lines:
        return ok()
    why = (f"the installation runs {bus.servers} NATS {'server' if bus.servers == 1 else 'servers'}, "
           f"so each stream should keep {want}")
    fix = advice.fix_replicas.format(streams=", ".join(s.name for s in fewer + more), n=want)
    return warning("\n".join(lines + [why]), fix)


def nats_checks(bus_of: Callable[[object], Optional[BusFacts]], advice: NatsAdvice) -> tuple[Check, ...]:
    """The tulle-nats category's checks over whatever facts object `bus_of` reads the bus
    facts from (None: the bus was not read, nothing is shown)."""

    def over(fn: Callable[[BusFacts, NatsAdvice], Optional[Outcome]]) -> Callable[[object], Optional[Outcome]]:
        def run(facts):
            bus = bus_of(facts)
            return None if bus is None else fn(bus, advice)
        return run

    return (
        Check("can connect to NATS", over(nats_connect), transient=True),
        Check("JetStream is enabled", over(jetstream_enabled)),
        Check("the KV buckets exist", over(buckets_exist), transient=True),
        Check("the event stream exists", over(events_stream_exists), transient=True),
        Check("the NATS cluster is healthy", over(cluster_healthy), transient=True),
        Check("the buckets' replicas match the NATS cluster", over(replicas_match)),
    )
