"""Golden metrics and edges from the proxies, without Prometheus: what `tulle stat`,
`tulle edges` and the dashboard share (docs/ARCHITECTURE.md, "Traffic figures").

Two adapters read the bus — `gather_traffic` (one scatter-gather of `TrafficRequest` on
`tulle.proxy.v1.traffic`; every proxy answers its edges over the window) and
`gather_inventory` (which pods exist: proxies' heartbeats, and the pods behind services
from the endpoint sets) — and pure functions turn their answers into rows:

- `stat_rows(replies, by=...)`: one row per pod, workload, namespace or service, with
  Linkerd's figures (success rate, RPS, latency percentiles, open connections, bytes/s);
- `edges(replies)`: who calls whom, secured or not, with the identities each side proved.

How figures are read, as Linkerd's viz does from its metrics: a pod, workload or
namespace is judged by what its proxies *received* (their inbound edges); a service by
what its callers' proxies *sent* to it (their outbound edges). `to=` turns a workload's
row to what it sent to that resource; `from_=` keeps only what came from that resource.
Clients are told apart by their mTLS identity (one per service account), never by address.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional

from tulle import schemas
from tulle.errors import UserError
from tulle.metrics import LATENCY_BUCKETS_MS

Kind = Literal["pod", "workload", "service", "namespace"]
KINDS: tuple[str, ...] = ("pod", "workload", "service", "namespace")
# kubectl's names for each kind (every pod owner is a workload to Tulle).
KIND_ALIASES: dict[str, str] = {
    **{k: "pod" for k in ("po", "pod", "pods")},
    **{k: "workload" for k in ("workload", "workloads", "wl", "deploy", "deployment", "deployments", "sts",
                               "statefulset", "statefulsets", "ds", "daemonset", "daemonsets", "rs", "replicaset",
                               "replicasets", "job", "jobs", "cronjob", "cronjobs")},
    **{k: "service" for k in ("svc", "service", "services")},
    **{k: "namespace" for k in ("ns", "namespace", "namespaces")},
}
MAX_WINDOW_S = 600  # proxies keep ten minutes
DEFAULT_TIMEOUT_S = 2.0
OVERFLOW_PEER = "[other]"  # proxy/traffic_stats.py: the edge that counts what its cap left out
# Linkerd's reasons for an edge without mTLS.
NO_IDENTITY_FROM_DISCOVERY = "not_provided_by_service_discovery"
NO_TLS_FROM_REMOTE = "no_tls_from_remote"

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_POD_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
# A Deployment's pod: <deployment>-<pod-template-hash>-<5>, both suffixes in Kubernetes'
# safe alphabet (no vowels), so a hand-made name like `web` or `books-v2` never matches.
_SAFE = "[bcdfghjklmnpqrstvwxz2456789]"
_DEPLOYMENT_POD = re.compile(rf"^(?P<owner>.+)-{_SAFE}{{6,10}}-{_SAFE}{{5}}$")
_IDENTITY_MARK = ".serviceaccount.identity."


# --- resources --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """A resource named on the command line: `name` "" means every one of its kind;
    `namespace` None means every namespace (and is None for namespaces themselves)."""

    kind: str
    namespace: Optional[str]
    name: str = ""

    def __str__(self) -> str:
        short = {"pod": "po", "workload": "workload", "service": "svc", "namespace": "ns"}[self.kind]
        return f"{short}/{self.name}" if self.name else short


def parse_resource(text: str, namespace: Optional[str], *, flag: str = "", default_kind: Optional[str] = None
                   ) -> Resource:
    """`TYPE`, `TYPE/NAME` (kubectl's type names accepted) or, with `default_kind`, a bare
    NAME; a one-line UserError starting with `flag` (e.g. "stat: --from") on anything else."""
    where = f"{flag} {text!r}" if flag else repr(text)
    kind_text, slash, name = text.partition("/")
    kind = KIND_ALIASES.get(kind_text.lower())
    if kind is None:
        if slash or default_kind is None:
            raise UserError(f"{where}: unknown resource type {kind_text!r} (use po, workload/deploy, svc or ns)")
        kind, name = default_kind, text
    if slash and not name:
        raise UserError(f"{where}: a name is missing after the '/'")
    if name and not (_POD_NAME if kind in ("pod", "workload") else _NAME).match(name):
        raise UserError(f"{where}: {name!r} is not a valid {kind} name")
    if kind == "namespace":
        return Resource("namespace", None, name)
    return Resource(kind, namespace, name)


# --- what the bus knows of pods -----------------------------------------------------------------


@dataclass
class Pod:
    namespace: str
    name: str
    workload: str  # the owning workload (Deployment, StatefulSet, … or the pod itself)
    identity: str = ""
    meshed: bool = False


@dataclass
class Inventory:
    """Pods and services as the bus knows them: every proxy's heartbeat (meshed pods) and
    the pods behind services (from endpoint sets, meshed or not). Unmeshed pods behind no
    service are unknown to the mesh."""

    pods: dict[tuple[str, str], Pod] = field(default_factory=dict)
    services: dict[tuple[str, str], set[tuple[str, str]]] = field(default_factory=dict)  # -> its pods
    heartbeats: dict[str, schemas.ProxyHeartbeat] = field(default_factory=dict)

    def owner(self, namespace: str, pod: str) -> str:
        known = self.pods.get((namespace, pod))
        return known.workload if known is not None else owner_guess(pod)


def owner_guess(pod: str) -> str:
    """The workload of a pod named as a Deployment names its pods; else the pod itself
    (local mode's pods are their workload)."""
    m = _DEPLOYMENT_POD.match(pod)
    return m.group("owner") if m else pod


def inventory_from(heartbeats: dict[str, schemas.ProxyHeartbeat],
                   endpoint_sets: Iterable[schemas.EndpointSet]) -> Inventory:
    inv = Inventory(heartbeats=dict(heartbeats))
    for es in endpoint_sets:
        pods = inv.services.setdefault((es.namespace, es.service), set())
        for ep in es.endpoints:
            ns, name = ep.labels.get("namespace", ""), ep.labels.get("pod", "")
            if not (ns and name):
                continue  # an endpoint without its pod (no targetRef): nothing to count
            pods.add((ns, name))
            known = inv.pods.get((ns, name))
            if known is None:
                inv.pods[(ns, name)] = Pod(ns, name, ep.labels.get("workload") or owner_guess(name),
                                           ep.identity, bool(ep.identity))
            elif ep.identity:
                known.identity, known.meshed = ep.identity, True
    for hb in heartbeats.values():
        known = inv.pods.get((hb.namespace, hb.workload))
        if known is None:
            inv.pods[(hb.namespace, hb.workload)] = Pod(hb.namespace, hb.workload, owner_guess(hb.workload),
                                                        hb.identity, True)
        else:
            known.meshed = True
            known.identity = hb.identity or known.identity
    return inv


# --- the bus side ------------------------------------------------------------------------------------


async def _bucket_items(bus, bucket: str, cls, prefix: str = "") -> dict:
    try:
        await bus.kv(bucket, create=False)
    except Exception:  # the bucket does not exist: nothing was ever published there
        return {}
    out = {}
    for key in await bus.keys(bucket, prefix):
        if key.startswith("_ip."):  # the same sets again, keyed by cluster IP
            continue
        value = await bus.get(bucket, key, cls)
        if value is not None:
            out[key] = value
    return out


async def gather_inventory(bus, namespace: Optional[str] = None) -> Inventory:
    """Heartbeats and endpoint sets (of one namespace, or all) as an Inventory."""
    prefix = f"{namespace}." if namespace else ""
    heartbeats, endpoint_sets = await asyncio.gather(
        _bucket_items(bus, schemas.PROXIES_BUCKET, schemas.ProxyHeartbeat),
        _bucket_items(bus, schemas.ENDPOINTS_BUCKET, schemas.EndpointSet, prefix))
    return inventory_from(heartbeats, endpoint_sets.values())


def expected_proxies(heartbeats: dict[str, schemas.ProxyHeartbeat], workloads: Iterable[str] = ()) -> set[str]:
    """The `namespace.workload` keys of the ready proxies that should answer."""
    wanted = set(workloads)
    return {k for k, hb in heartbeats.items() if hb.ready and (not wanted or k in wanted)}


async def gather_traffic(bus, window_s: float = 60.0, workloads: Iterable[str] = (), *,
                         timeout_s: float = DEFAULT_TIMEOUT_S, expected: Optional[Iterable[str]] = None
                         ) -> list[schemas.TrafficReply]:
    """Every proxy's edges over the last `window_s` (1 s … 10 min); `workloads`
    (`namespace.workload` keys) narrows who answers. Returns once every expected proxy
    answered — the ready ones of `tulle-proxies`, unless `expected` names them — or at
    `timeout_s`."""
    workloads = list(workloads)
    if expected is None:
        heartbeats = await _bucket_items(bus, schemas.PROXIES_BUCKET, schemas.ProxyHeartbeat)
        expected = expected_proxies(heartbeats, workloads)
    expected = set(expected)

    def everyone_answered(replies: list[schemas.TrafficReply]) -> bool:
        return bool(expected) and expected <= {schemas.proxy_key(r.namespace, r.workload) for r in replies}

    request = schemas.TrafficRequest(window_s=min(max(float(window_s), 1.0), MAX_WINDOW_S), workloads=workloads)
    replies = await bus.gather(schemas.PROXY_TRAFFIC_SUBJECT, request, schemas.TrafficReply, timeout_s,
                               until=everyone_answered)
    # One answer per proxy (a proxy that reconnected mid-gather could answer twice).
    unique = {schemas.proxy_key(r.namespace, r.workload): r for r in replies}
    return [unique[k] for k in sorted(unique)]


def missing_proxies(inventory: Inventory, replies: list[schemas.TrafficReply],
                    workloads: Iterable[str] = ()) -> list[str]:
    """`namespace/workload` of each ready proxy (of `workloads`, when given) that did not answer."""
    answered = {schemas.proxy_key(r.namespace, r.workload) for r in replies}
    missing = expected_proxies(inventory.heartbeats, workloads) - answered
    return [f"{inventory.heartbeats[k].namespace}/{inventory.heartbeats[k].workload}" for k in sorted(missing)]


# --- pure: figures -----------------------------------------------------------------------------------


class _Sum:
    """Edges added up: counts, rates (each edge over its own proxy's window) and latency."""

    __slots__ = ("requests", "successes", "failures", "denied", "rps", "tcp_open", "read_bps", "write_bps",
                 "latency", "edges", "window_s")

    def __init__(self):
        self.requests = self.successes = self.failures = self.denied = self.tcp_open = 0
        self.rps = self.read_bps = self.write_bps = 0.0
        self.latency = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.edges = 0
        self.window_s = 0.0

    def add(self, e: schemas.TrafficEdge, window_s: float) -> None:
        span = max(window_s, 1.0)
        self.edges += 1
        self.window_s = max(self.window_s, window_s)
        self.requests += e.requests
        self.successes += e.successes
        self.failures += e.failures
        self.denied += e.denied
        self.rps += (e.successes + e.failures) / span
        self.tcp_open += e.tcp_open
        self.read_bps += e.bytes_read / span
        self.write_bps += e.bytes_written / span
        if list(e.latency_buckets_ms) == _BOUNDS and len(e.latency_counts) == len(self.latency):
            for i, n in enumerate(e.latency_counts):
                self.latency[i] += n
        else:  # a proxy with other bounds (another version): re-bucket by each count's upper bound
            for i, n in enumerate(e.latency_counts):
                upper = e.latency_buckets_ms[i] if i < len(e.latency_buckets_ms) else math.inf
                self.latency[bisect.bisect_left(_BOUNDS, upper)] += n

    @property
    def responses(self) -> int:
        return self.successes + self.failures


_BOUNDS = [float(b) for b in LATENCY_BUCKETS_MS]


def quantile_ms(q: float, counts: list[int]) -> Optional[float]:
    from tulle.route_windows import histogram_quantile  # pure; shared with `tulle routes`

    return histogram_quantile(q, _BOUNDS, counts)


@dataclass
class StatRow:
    kind: str
    namespace: str
    name: str
    meshed: Optional[int] = None  # pods with a proxy (None for services)
    total: Optional[int] = None  # pods known
    requests: int = 0  # requests started in the window
    successes: int = 0  # responses classified as successes
    failures: int = 0
    denied: int = 0  # refused by inbound policy
    rps: Optional[float] = None  # responses per second
    success: Optional[float] = None  # successes / responses
    p50: Optional[float] = None  # ms
    p95: Optional[float] = None
    p99: Optional[float] = None
    tcp_open: Optional[int] = None
    read_bps: Optional[float] = None
    write_bps: Optional[float] = None
    window_s: float = 0.0  # the longest span a contributing proxy covered

    @property
    def has_data(self) -> bool:
        """Any traffic in the window (HTTP, or opaque TCP only: then `rps` and `success` are None)."""
        return self.tcp_open is not None

    @property
    def meshed_text(self) -> str:
        return "-" if self.meshed is None else f"{self.meshed}/{self.total}"


def _finish(row: StatRow, s: _Sum) -> StatRow:
    row.requests, row.successes, row.failures, row.denied = s.requests, s.successes, s.failures, s.denied
    row.window_s = s.window_s
    if s.edges == 0:
        return row
    if s.responses:  # HTTP figures only for HTTP traffic: opaque TCP has connections and bytes alone
        row.rps = s.rps
        row.success = s.successes / s.responses
        row.p50, row.p95, row.p99 = (quantile_ms(q, s.latency) for q in (0.5, 0.95, 0.99))
    row.tcp_open, row.read_bps, row.write_bps = s.tcp_open, s.read_bps, s.write_bps
    return row


def _row_of(kind: str, namespace: str, pod: str, inventory: Inventory) -> tuple[str, str]:
    """(namespace, name) of the row a pod counts in."""
    if kind == "pod":
        return namespace, pod
    if kind == "workload":
        return namespace, inventory.owner(namespace, pod)
    return "", namespace  # a namespace row: its name is the namespace


def _identities(res: Resource, replies: list[schemas.TrafficReply], inventory: Inventory) -> set[str]:
    """The mTLS identities of a pod or workload's proxies (one per service account)."""
    out = set()
    for r in replies:
        if r.identity and _matches(res, r.namespace, r.workload, inventory):
            out.add(r.identity)
    for (ns, name), pod in inventory.pods.items():
        if pod.identity and _matches(res, ns, name, inventory):
            out.add(pod.identity)
    return out


def _matches(res: Resource, namespace: str, pod: str, inventory: Inventory) -> bool:
    """Is this pod (one of) the resource?"""
    if res.kind == "namespace":
        return not res.name or namespace == res.name
    if res.namespace is not None and namespace != res.namespace:
        return False
    if res.kind == "pod":
        return not res.name or pod == res.name
    if res.kind == "workload":
        return not res.name or inventory.owner(namespace, pod) == res.name
    if res.kind == "service":
        pods = inventory.services.get((namespace if res.namespace is None else res.namespace, res.name), set())
        return not res.name or (namespace, pod) in pods
    return False


def _identity_namespace(identity: str) -> str:
    head, mark, _ = identity.partition(_IDENTITY_MARK)
    return head.rpartition(".")[2] if mark else ""


def _peer_is(res: Resource, e: schemas.TrafficEdge, identities: set[str], services: set[tuple[str, str]]) -> bool:
    """Is an outbound edge's destination (or an inbound edge's client) the resource?"""
    if res.kind == "namespace":
        return not res.name or e.peer_namespace == res.name
    if res.kind == "service" and e.direction == "outbound":
        return ((res.namespace is None or e.peer_namespace == res.namespace)
                and (not res.name or e.peer_name == res.name))
    if e.secured and e.peer_identity in identities:
        return True
    # An unmeshed destination: the services it backs.
    return e.direction == "outbound" and not e.secured and (e.peer_namespace, e.peer_name) in services


def stat_rows(replies: list[schemas.TrafficReply], by: str = "workload", *, inventory: Optional[Inventory] = None,
              namespace: Optional[str] = None, name: str = "", from_: Optional[Resource] = None,
              to: Optional[Resource] = None, unmeshed: bool = False) -> list[StatRow]:
    """One row per resource of kind `by` (in `namespace`, or every one when None — namespaces
    themselves are not narrowed by it; only `name` when given), as `linkerd viz stat`. Pods,
    workloads and namespaces without a proxy are left out (they have no figures) unless
    `unmeshed`; services are listed when known."""
    by = KIND_ALIASES.get(by, by)
    if by not in KINDS:
        raise ValueError(f"stat_rows: by={by!r}")
    inv = inventory or Inventory()
    if by == "service":
        return _service_rows(replies, inv, namespace, name, from_)

    sums: dict[tuple[str, str], _Sum] = {}
    pods: dict[tuple[str, str], list[bool]] = {}  # row -> meshed flag of each pod

    def wanted(ns: str, row_name: str) -> bool:
        # Namespaces are no namespace's: `namespace` does not narrow them.
        return (by == "namespace" or namespace is None or ns == namespace) and (not name or row_name == name)

    for (ns, pod_name), pod in inv.pods.items():
        key = _row_of(by, ns, pod_name, inv)
        if wanted(*key):
            pods.setdefault(key, []).append(pod.meshed)
    for r in replies:
        key = _row_of(by, r.namespace, r.workload, inv)
        if not wanted(*key):
            continue
        if (r.namespace, r.workload) not in inv.pods:
            pods.setdefault(key, []).append(True)  # a proxy without a heartbeat yet is still a meshed pod
        s = sums.setdefault(key, _Sum())
        s.window_s = max(s.window_s, r.window_s)

    from_ids = _identities(from_, replies, inv) if from_ is not None and from_.kind != "namespace" else set()
    to_ids = _identities(to, replies, inv) if to is not None and to.kind not in ("namespace", "service") else set()
    to_services = ({svc for svc, members in inv.services.items()
                    if any(_matches(to, ns, p, inv) for ns, p in members)}
                   if to is not None and to.kind in ("pod", "workload") else set())
    for r in replies:
        key = _row_of(by, r.namespace, r.workload, inv)
        if key not in sums:
            continue
        for e in r.edges:
            if e.peer_name == OVERFLOW_PEER and (from_ is not None or to is not None):
                continue  # whose they are is unknown
            if to is not None:
                if e.direction == "outbound" and _peer_is(to, e, to_ids, to_services):
                    sums[key].add(e, r.window_s)
            elif e.direction == "inbound":
                if from_ is None or (e.secured and (
                        _identity_namespace(e.peer_identity) == from_.name if from_.kind == "namespace"
                        else e.peer_identity in from_ids)):
                    sums[key].add(e, r.window_s)

    rows = []
    for key in sorted(set(pods) | set(sums)):
        flags = pods.get(key, [])
        meshed = sum(flags)
        if meshed == 0 and not unmeshed:
            continue
        row = StatRow(by, key[0], key[1], meshed=meshed, total=len(flags))
        rows.append(_finish(row, sums.get(key) or _Sum()))
    return rows


def _service_rows(replies: list[schemas.TrafficReply], inv: Inventory, namespace: Optional[str], name: str,
                  from_: Optional[Resource]) -> list[StatRow]:
    """Services, as their callers' proxies saw them (outbound edges)."""
    def wanted(ns: str, svc: str) -> bool:
        return bool(svc) and svc != OVERFLOW_PEER and (namespace is None or ns == namespace) and (
            not name or svc == name)

    sums: dict[tuple[str, str], _Sum] = {key: _Sum() for key in inv.services if wanted(*key)}
    for r in replies:
        if from_ is not None and not _matches(from_, r.namespace, r.workload, inv):
            continue
        for e in r.edges:
            key = (e.peer_namespace, e.peer_name)
            if e.direction != "outbound" or not wanted(*key):
                continue
            sums.setdefault(key, _Sum()).add(e, r.window_s)
    return [_finish(StatRow("service", ns, svc), sums[(ns, svc)]) for ns, svc in sorted(sums)]


# --- pure: edges -------------------------------------------------------------------------------------


@dataclass
class EdgeRow:
    src_namespace: str
    src: str
    dst_namespace: str
    dst: str
    secured: bool
    client_id: str = ""
    server_id: str = ""
    no_tls_reason: str = ""
    requests: int = 0  # as the client's proxy saw them (the server's when the client's did not answer)
    successes: int = 0
    failures: int = 0
    rps: float = 0.0
    tcp_open: int = 0


@dataclass
class _Seen:
    secured: bool
    client_id: str
    server_id: str
    client_side: bool
    edge: schemas.TrafficEdge
    window_s: float


def edges(replies: list[schemas.TrafficReply], *, by: str = "workload", inventory: Optional[Inventory] = None,
          namespace: Optional[str] = None) -> list[EdgeRow]:
    """Who calls whom, among pods or workloads (`by`), with either end in `namespace` (every
    namespace when None), as `linkerd viz edges`. Both proxies of a call report it (the
    client's outbound edge, the server's inbound one): they make one row. A client without
    an identity cannot be named and is left out; a destination without a proxy is named by
    the workloads behind its service (or the service), and is not secured."""
    by = KIND_ALIASES.get(by, by)
    if by not in ("pod", "workload"):
        raise ValueError(f"edges: by={by!r}")
    inv = inventory or Inventory()

    def row(ns: str, pod: str) -> tuple[str, str]:
        return _row_of(by, ns, pod, inv)

    holders: dict[str, set[tuple[str, str]]] = {}  # identity -> rows whose proxies hold it
    for r in replies:
        if r.identity:
            holders.setdefault(r.identity, set()).add(row(r.namespace, r.workload))
    for (ns, name), pod in inv.pods.items():
        if pod.identity:
            holders.setdefault(pod.identity, set()).add(row(ns, name))
    # (src row, server identity) of every secured outbound edge: when several rows share a
    # client identity (one service account), the ones that called this server are the callers.
    calls: set[tuple[tuple[str, str], str]] = set()
    # (dst row, client identity) of every secured inbound edge: the same, the other way.
    received: set[tuple[tuple[str, str], str]] = set()
    for r in replies:
        for e in r.edges:
            if e.secured:
                (calls if e.direction == "outbound" else received).add((row(r.namespace, r.workload), e.peer_identity))

    seen: dict[tuple[tuple[str, str], tuple[str, str]], list[_Seen]] = {}
    for r in replies:
        me = row(r.namespace, r.workload)
        for e in r.edges:
            if not e.peer_name or e.peer_name == OVERFLOW_PEER:
                continue
            if e.direction == "outbound":
                behind = {row(ns, p) for ns, p in inv.services.get((e.peer_namespace, e.peer_name), set())}
                if e.secured:
                    ids = holders.get(e.peer_identity, set())
                    ids = {d for d in ids if (d, r.identity) in received} or ids
                    dsts = (ids & behind) or ids or behind
                    if len(dsts) > 1 and all((d, r.identity) in received for d in dsts):
                        # Replicas sharing one identity: the client's figures are the service's,
                        # not any one row's; each server's own report counts its row.
                        continue
                else:
                    dsts = behind
                for dst in dsts or {(e.peer_namespace, e.peer_name)}:
                    seen.setdefault((me, dst), []).append(_Seen(e.secured, r.identity, e.peer_identity, True, e,
                                                                r.window_s))
            elif e.secured:
                ids = holders.get(e.peer_identity, set())
                callers = {src for src in ids if (src, r.identity) in calls}
                for src in callers or ids or {(e.peer_namespace, e.peer_name)}:
                    seen.setdefault((src, me), []).append(_Seen(True, e.peer_identity, r.identity, False, e,
                                                                r.window_s))
    out = []
    for (src, dst), sightings in seen.items():
        if namespace is not None and namespace not in (src[0], dst[0]):
            continue
        # Not secured when anything reached a server without mTLS. A call the client's proxy
        # failed itself (no endpoints yet, a refused dial) carried nothing and does not count.
        secured = all(s.secured for s in sightings if s.secured or _reached_a_server(s.edge)) and any(
            s.secured for s in sightings)
        counted = [s for s in sightings if s.client_side] or sightings
        er = EdgeRow(src[0], src[1], dst[0], dst[1], secured,
                     client_id=next((s.client_id for s in sightings if s.client_id), ""),
                     server_id=next((s.server_id for s in sightings if s.server_id and s.secured), ""),
                     no_tls_reason="" if secured else NO_IDENTITY_FROM_DISCOVERY)
        for s in counted:
            er.requests += s.edge.requests
            er.successes += s.edge.successes
            er.failures += s.edge.failures
            er.rps += (s.edge.successes + s.edge.failures) / max(s.window_s, 1.0)
            er.tcp_open += s.edge.tcp_open
        out.append(er)
    out.sort(key=lambda e: (e.src_namespace, e.dst_namespace, e.src, e.dst))
    return out


def _reached_a_server(e: schemas.TrafficEdge) -> bool:
    return bool(e.successes or e.tcp_opened or e.tcp_open or e.bytes_read or e.bytes_written)


# --- output shapes shared by the CLI and the dashboard -------------------------------------------


def whole_ms(v: float) -> int:
    return int(v + 0.5)  # half up: 48.5ms shows as 49ms


def stat_json(row: StatRow) -> dict:
    """Linkerd's JSON entry of `viz stat` (null where there is no data), plus the raw counts."""
    def num(v: Optional[float], digits: int = 6) -> Optional[float]:
        return None if v is None else round(v, digits)

    return {
        "namespace": row.namespace, "kind": row.kind, "name": row.name,
        "meshed": None if row.meshed is None else row.meshed_text,
        "success": num(row.success), "rps": num(row.rps),
        "latency_ms_p50": None if row.p50 is None else whole_ms(row.p50),
        "latency_ms_p95": None if row.p95 is None else whole_ms(row.p95),
        "latency_ms_p99": None if row.p99 is None else whole_ms(row.p99),
        "tcp_open_connections": row.tcp_open,
        "tcp_read_bytes_rate": num(row.read_bps, 3), "tcp_write_bytes_rate": num(row.write_bps, 3),
        "requests": row.requests, "successes": row.successes, "failures": row.failures, "denied": row.denied,
        "window_s": round(row.window_s, 3),
    }


def short_identity(identity: str) -> str:
    """`sa.ns` of a workload identity, as Linkerd prints CLIENT_ID / SERVER_ID."""
    parts = identity.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 else identity


def edge_json(row: EdgeRow) -> dict:
    """Linkerd's JSON entry of `viz edges`, plus what the proxies counted."""
    return {
        "src": row.src, "src_namespace": row.src_namespace, "dst": row.dst, "dst_namespace": row.dst_namespace,
        "client_id": short_identity(row.client_id), "server_id": short_identity(row.server_id),
        "no_tls_reason": row.no_tls_reason, "secured": row.secured,
        "requests": row.requests, "successes": row.successes, "failures": row.failures,
        "rps": round(row.rps, 6), "tcp_open_connections": row.tcp_open,
    }
