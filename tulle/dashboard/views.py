"""What each view of the dashboard shows, computed from what the bus holds. Pure: no I/O,
the clock is passed in; every function returns plain JSON-able data for the browser.

Topology. Nodes are workloads: a proxy's heartbeat names its pod, and the endpoint
labels the destination service writes (`pod` -> `workload`) name the pod's owner, so a
Deployment's pods make one node. Edges come from both ends of a call:
- the client's outbound view (its proxy's TrafficEdge towards a service): requests,
  success, latency, TCP, and whether the server proved its identity (mTLS); the service
  resolves to the workload behind it (or stays a service node when several or none are);
- the server's inbound view (per client identity): denials, and the whole edge when the
  client's own proxy did not report it (a client outside the mesh, or another cluster's);
- `proxy.denied` events of the window: a denial the counters have not shown yet.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from tulle import schemas
from tulle.dashboard.traffic import merge_histograms, quantiles

UNMESHED = "ext:unmeshed"
_HASHED_POD = re.compile(r"^(?P<owner>.+)-[a-z0-9]{6,10}-[a-z0-9]{5}$")


@dataclass
class MeshState:
    """The KV buckets as last seen, and the recent denials from the event stream."""

    heartbeats: dict[str, schemas.ProxyHeartbeat] = field(default_factory=dict)
    endpoints: dict[str, schemas.EndpointSet] = field(default_factory=dict)
    policies: dict[str, schemas.WorkloadPolicy] = field(default_factory=dict)
    profiles: dict[str, schemas.Profile] = field(default_factory=dict)
    trust_bundle: Optional[schemas.TrustBundle] = None
    # (unix time, data of a proxy.denied event), newest last; bounded by the caller
    denials: deque = field(default_factory=lambda: deque(maxlen=1000))


# --- nodes ---------------------------------------------------------------------------------


def pod_owners(endpoints: dict[str, schemas.EndpointSet]) -> dict[tuple[str, str], str]:
    """(namespace, pod) -> owning workload, from the labels of the endpoints."""
    out: dict[tuple[str, str], str] = {}
    for es in endpoints.values():
        for ep in es.endpoints:
            pod, workload = ep.labels.get("pod"), ep.labels.get("workload")
            if pod and workload:
                out[(ep.labels.get("namespace", es.namespace), pod)] = workload
    return out


def owner(namespace: str, pod: str, owners: dict[tuple[str, str], str]) -> str:
    """The workload a pod belongs to: the endpoints' word for it, else a Deployment's
    `<name>-<template hash>-<5 chars>` shape, else the pod itself (local mode)."""
    if (namespace, pod) in owners:
        return owners[(namespace, pod)]
    m = _HASHED_POD.match(pod)
    return m.group("owner") if m else pod


def service_workloads(state: MeshState, owners: dict[tuple[str, str], str]) -> dict[tuple[str, str], set[str]]:
    """(namespace, service) -> the node ids of the workloads behind it."""
    out: dict[tuple[str, str], set[str]] = {}
    for es in state.endpoints.values():
        if not es.service or es.namespace.startswith("_"):
            continue
        ids = out.setdefault((es.namespace, es.service), set())
        for ep in es.endpoints:
            pod = ep.labels.get("pod")
            ns = ep.labels.get("namespace", es.namespace)
            if pod:
                ids.add(f"{ns}/{ep.labels.get('workload') or owner(ns, pod, owners)}")
    return out


def _identity_label(identity: str) -> str:
    parts = identity.split(".")
    return f"{parts[0]}.{parts[1]}" if len(parts) >= 4 and parts[2] == "serviceaccount" else identity


# --- edges ---------------------------------------------------------------------------------


@dataclass
class _Acc:
    requests: int = 0
    successes: int = 0
    failures: int = 0
    denied: int = 0
    denied_events: int = 0
    tcp_open: int = 0
    tcp_opened: int = 0
    bytes: int = 0
    rate_requests: float = 0.0  # requests / window, summed over reporting proxies
    rate_bytes: float = 0.0
    secured: set = field(default_factory=set)  # {True, False}: mixed when both
    identities: set = field(default_factory=set)
    edges: list = field(default_factory=list)  # TrafficEdges, for the latency histogram
    reported_by: set = field(default_factory=set)  # "client" | "server" | "event"

    def add(self, e: schemas.TrafficEdge, window_s: float, side: str) -> None:
        span = max(window_s, 1.0)
        self.requests += e.requests
        self.successes += e.successes
        self.failures += e.failures
        self.denied += e.denied
        self.tcp_open += e.tcp_open
        self.tcp_opened += e.tcp_opened
        self.bytes += e.bytes_read + e.bytes_written
        self.rate_requests += e.requests / span
        self.rate_bytes += (e.bytes_read + e.bytes_written) / span
        if e.requests or e.tcp_open or e.tcp_opened or e.successes or e.failures:
            self.secured.add(e.secured)
        if e.peer_identity:
            self.identities.add(e.peer_identity)
        if e.latency_counts:
            self.edges.append(e)
        self.reported_by.add(side)

    def figures(self) -> dict[str, Any]:
        answered = self.successes + self.failures
        p50, p95, p99 = quantiles(*merge_histograms(self.edges))
        return {
            "requests": self.requests, "rps": round(self.rate_requests, 3),
            "success": round(self.successes / answered, 4) if answered else None,
            "p50_ms": _ms(p50), "p95_ms": _ms(p95), "p99_ms": _ms(p99),
            "tcp_open": self.tcp_open, "tcp_opened": self.tcp_opened, "bytes_per_s": round(self.rate_bytes, 1),
            "denied": self.denied, "denied_events": self.denied_events,
        }


def _ms(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(v, 1)


def topology(state: MeshState, replies: list[schemas.TrafficReply], *, now: float, window_s: float) -> dict[str, Any]:
    """Nodes (workloads, with their inbound golden metrics) and edges (calls)."""
    owners = pod_owners(state.endpoints)
    behind = service_workloads(state, owners)
    nodes: dict[str, dict[str, Any]] = {}

    def workload_node(ns: str, name: str, pod: str = "", meshed: bool = True) -> str:
        node_id = f"{ns}/{name}"
        n = nodes.get(node_id)
        if n is None:
            n = nodes[node_id] = {"id": node_id, "kind": "workload", "namespace": ns, "name": name, "pods": [],
                                  "meshed": meshed, "ready": False, "identities": []}
        if pod and pod not in n["pods"]:
            n["pods"].append(pod)
        return node_id

    by_identity: dict[str, set[str]] = {}
    for hb in state.heartbeats.values():
        node_id = workload_node(hb.namespace, owner(hb.namespace, hb.workload, owners), hb.workload)
        nodes[node_id]["ready"] = nodes[node_id]["ready"] or hb.ready
        if hb.identity:
            by_identity.setdefault(hb.identity, set()).add(node_id)
            if hb.identity not in nodes[node_id]["identities"]:
                nodes[node_id]["identities"].append(hb.identity)

    def service_node(ns: str, svc: str) -> str:
        ids = behind.get((ns, svc), set())
        if len(ids) == 1:
            node_id = next(iter(ids))
            if node_id not in nodes:  # a workload without a proxy
                ns_, _, name = node_id.partition("/")
                workload_node(ns_, name, meshed=False)
            return node_id
        node_id = f"svc:{ns}/{svc}"
        nodes.setdefault(node_id, {"id": node_id, "kind": "service", "namespace": ns, "name": svc, "pods": [],
                                   "meshed": False, "ready": True, "identities": []})
        return node_id

    def client_node(identity: str) -> str:
        ids = by_identity.get(identity, set())
        if len(ids) == 1:
            return next(iter(ids))
        if not identity:
            nodes.setdefault(UNMESHED, {"id": UNMESHED, "kind": "external", "namespace": "", "name": "outside the mesh",
                                        "pods": [], "meshed": False, "ready": True, "identities": []})
            return UNMESHED
        node_id = f"id:{identity}"
        nodes.setdefault(node_id, {"id": node_id, "kind": "identity", "namespace": identity.split(".")[1]
                                   if identity.count(".") > 2 else "", "name": _identity_label(identity),
                                   "pods": [], "meshed": True, "ready": True, "identities": [identity]})
        return node_id

    edges: dict[tuple[str, str], _Acc] = {}
    inbound: dict[str, _Acc] = {}  # node -> what its proxies received
    outbound: dict[str, _Acc] = {}
    answered: set[str] = set()
    received = {(workload_node(r.namespace, owner(r.namespace, r.workload, owners), r.workload), e.peer_identity)
                for r in replies for e in r.edges if e.direction == "inbound" and e.secured}
    for r in replies:
        answered.add(schemas.proxy_key(r.namespace, r.workload))
        me = workload_node(r.namespace, owner(r.namespace, r.workload, owners), r.workload)
        for e in r.edges:
            if e.direction == "outbound":
                outbound.setdefault(me, _Acc()).add(e, r.window_s, "client")
                replicas = behind.get((e.peer_namespace, e.peer_name), set())
                if e.secured and len(replicas) > 1 and all((w, r.identity) in received for w in replicas):
                    # Several meshed workloads behind one service: the client cannot tell them
                    # apart, and each one's proxy reports what it received (the edges below).
                    continue
                edges.setdefault((me, service_node(e.peer_namespace, e.peer_name)), _Acc()).add(e, r.window_s, "client")
    client_seen = set(edges)
    for r in replies:
        me = workload_node(r.namespace, owner(r.namespace, r.workload, owners), r.workload)
        for e in r.edges:
            if e.direction != "inbound":
                continue
            inbound.setdefault(me, _Acc()).add(e, r.window_s, "server")
            key = (client_node(e.peer_identity), me)
            acc = edges.setdefault(key, _Acc())
            if key in client_seen:
                acc.denied += e.denied  # the client already counted the traffic
                acc.reported_by.add("server")
            else:
                acc.add(e, r.window_s, "server")
    for t, data in list(state.denials):
        if now - t > window_s:
            continue
        ns, pod = str(data.get("namespace", "")), str(data.get("workload", ""))
        if not ns or not pod:
            continue
        server = workload_node(ns, owner(ns, pod, owners), pod)
        acc = edges.setdefault((client_node(str(data.get("client_identity") or "")), server), _Acc())
        acc.denied_events += 1 + int(data.get("suppressed_before") or 0)
        acc.reported_by.add("event")

    out_edges = []
    for (src, dst), acc in sorted(edges.items()):
        figures = acc.figures()
        secured = (True if acc.secured == {True} else False if acc.secured == {False} else
                   "mixed" if acc.secured else None)
        out_edges.append({
            "id": f"{src}->{dst}", "source": src, "target": dst, "mtls": secured,
            "protocol": "http" if acc.requests or acc.successes or acc.failures else "tcp",
            "denied_total": acc.denied + acc.denied_events, "identities": sorted(acc.identities),
            "reported_by": sorted(acc.reported_by), **figures,
        })
    for node_id, n in nodes.items():
        n["pods"].sort()
        n["inbound"] = inbound[node_id].figures() if node_id in inbound else None
        n["outbound"] = outbound[node_id].figures() if node_id in outbound else None
    missing = sorted(k for k, hb in state.heartbeats.items() if hb.ready and k not in answered)
    return {"window_s": window_s, "time": now, "nodes": sorted(nodes.values(), key=lambda n: n["id"]),
            "edges": out_edges, "missing": missing}


# --- routes --------------------------------------------------------------------------------


def routes(state: MeshState, replies: list[schemas.StatsReply], *, now: float, window_s: float) -> dict[str, Any]:
    """Per-route golden metrics of every destination, as `tulle routes --all -o wide`, with
    whether the profile retries the route (effective and actual success then differ)."""
    from tulle.cli.routes import aggregate

    known: dict[tuple[str, str], list[str]] = {}
    retryable: dict[tuple[str, str, str], bool] = {}
    timeouts: dict[tuple[str, str, str], int] = {}
    for p in state.profiles.values():
        known[(p.namespace, p.service)] = [r.name for r in p.routes]
        for r in p.routes:
            retryable[(p.namespace, p.service, r.name)] = r.is_retryable
            timeouts[(p.namespace, p.service, r.name)] = r.timeout_ms
    rows = []
    for row in aggregate(replies, known_routes=known):
        key = (row.namespace, row.service, row.route)
        rows.append({
            "namespace": row.namespace, "service": row.service, "route": row.route,
            "retries": retryable.get(key, False), "timeout_ms": timeouts.get(key, 0) or None,
            "has_data": row.has_data,
            "effective_success": _ratio(row.success), "effective_rps": round(row.effective_rps, 3) if row.has_data else None,
            "actual_success": _ratio(row.actual_success), "actual_rps": round(row.actual_rps, 3) if row.has_data else None,
            "p50_ms": _ms(row.p50), "p95_ms": _ms(row.p95), "p99_ms": _ms(row.p99),
        })
    return {"window_s": window_s, "time": now, "routes": rows,
            "proxies": sorted(schemas.proxy_key(r.namespace, r.workload) for r in replies)}


def _ratio(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(v, 4)


# --- authorization -------------------------------------------------------------------------


def policies(state: MeshState) -> dict[str, Any]:
    """Each workload's inbound policy, port by port (as `tulle policy`)."""
    from tulle.policy import describe_authorization

    out = []
    for key, wp in sorted(state.policies.items()):
        def port_row(p: schemas.PortPolicy, listed: bool) -> dict[str, Any]:
            return {"port": p.port if listed else None, "server": p.server, "kind": p.kind, "protocol": p.protocol,
                    "source": p.source,
                    "authorizations": [{"name": a.name, "kind": a.kind,
                                        "text": describe_authorization(a, wp.cluster_networks)}
                                       for a in p.authorizations]}
        out.append({"key": key, "namespace": wp.namespace, "workload": wp.workload,
                    "default_policy": wp.default_policy, "default_policy_from": wp.sources.get("default_policy", ""),
                    "ports": [port_row(p, True) for p in wp.ports] + [port_row(wp.default, False)],
                    "warnings": list(wp.warnings)})
    return {"workloads": out}


def explain(state: MeshState, workload_key: str, client: str, port: Optional[int]) -> dict[str, Any]:
    """`tulle policy <workload> --explain --from <client>`: the same parsing, the proxy's
    own decision code. UserError (one line) for a bad client or an unknown workload."""
    from tulle.policy import explain as decide
    from tulle.cli.policy import parse_client
    from tulle.codec import to_jsonable
    from tulle.errors import UserError

    wp = state.policies.get(workload_key)
    if wp is None:
        raise UserError(f"no policy published for {workload_key.replace('.', '/', 1)}")
    identity, ip, tls = parse_client(client.strip(), None)
    ports = [port] if port is not None else [p.port for p in wp.ports] + [0]
    results = [to_jsonable(decide(wp, p, client_ip=ip, client_identity=identity, tls=tls)) for p in ports]
    return {"workload": workload_key, "client": client, "identity": identity or "", "ip": ip or "", "tls": tls,
            "allowed": all(r["allowed"] for r in results), "ports": results}


# --- identity ------------------------------------------------------------------------------


def _cert_facts(pem: str) -> list[dict[str, Any]]:
    from cryptography import x509

    from tulle import pki

    out = []
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        return out
    for cert, fp in zip(certs, pki.cert_fingerprints(pem.encode())):
        out.append({"subject": cert.subject.rfc4514_string(), "not_after": cert.not_valid_after_utc.timestamp(),
                    "fingerprint": fp})
    return out


def identity(state: MeshState, *, now: float) -> dict[str, Any]:
    """Each proxy's certificate expiry (its heartbeat), the issuer's expiry and the anchors
    (the trust bundle), and whether each proxy trusts the installation's anchors."""
    bundle = state.trust_bundle
    anchors = _cert_facts(bundle.anchors_pem) if bundle else []
    installed = {a["fingerprint"] for a in anchors}
    proxies = []
    for key, hb in sorted(state.heartbeats.items()):
        proxies.append({
            "key": key, "namespace": hb.namespace, "workload": hb.workload, "identity": hb.identity,
            "ready": hb.ready, "version": hb.version, "cert_expiry": hb.cert_expiry or None,
            "expires_in_s": round(hb.cert_expiry - now) if hb.cert_expiry else None,
            "heartbeat_age_s": round(max(0.0, now - hb.time), 1) if hb.time else None,
            "trusts_installation": (bool(set(hb.trust_anchors) & installed) if hb.trust_anchors and installed
                                    else None),
        })
    return {"time": now, "trust_domain": bundle.trust_domain if bundle else None,
            "issuer_expiry": (bundle.issuer_expiry or None) if bundle else None,
            "issuer_expires_in_s": round(bundle.issuer_expiry - now) if bundle and bundle.issuer_expiry else None,
            "anchors": anchors, "proxies": proxies}


# --- events --------------------------------------------------------------------------------


def event_item(subject: str, raw: bytes, seq: int) -> Optional[dict[str, Any]]:
    """One CloudEvent for the browser; None when it is not one (counted by the caller)."""
    import orjson

    from tulle.cli.events import event_kind_type

    try:
        ev = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(ev, dict):
        return None
    data = ev.get("data") if isinstance(ev.get("data"), dict) else {}
    return {"seq": seq, "id": str(ev.get("id", "")), "type": event_kind_type(subject), "time": str(ev.get("time", "")),
            "source": str(ev.get("source", "")), "subject": ev.get("subject"), "data": data}


def event_time(item: dict[str, Any], default: float) -> float:
    try:
        return dt.datetime.fromisoformat(item["time"].replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError, AttributeError):
        return default


# --- extensions ----------------------------------------------------------------------------


def extensions(mode: str, components: list[dict[str, Any]], report: Any, *, now: float,
               error: str = "") -> dict[str, Any]:
    """Installed components, versions and health, and `tulle check`'s report."""
    from tulle.check.core import to_json

    return {"time": now, "mode": mode, "components": components, "error": error,
            "check": to_json(report) if report is not None else None}


def local_components(facts: Any) -> list[dict[str, Any]]:
    """From tulle.check.local.LocalFacts: NATS and each service as probed."""
    from tulle import __version__

    out = []
    for p in ([facts.nats] if facts.nats else []) + list(facts.services):
        out.append({"name": p.name, "kind": "bus" if p.name == "nats" else "control plane",
                    "version": p.version or (__version__ if p.name != "nats" else ""),
                    "healthy": bool(p.alive and p.ready), "detail": f"pid {p.pid}" if p.pid else "",
                    "restarts": p.restarts, "address": p.address})
    proxies = list(facts.proxies)
    if proxies:
        ready = sum(1 for p in proxies if p.ready)
        out.append({"name": "proxies", "kind": "data plane", "version": "", "healthy": ready == len(proxies),
                    "detail": f"{ready}/{len(proxies)} ready", "restarts": 0, "address": ""})
    return out


def cluster_components(facts: Any) -> list[dict[str, Any]]:
    """From tulle.check.cluster.ClusterFacts: each Deployment and the NATS StatefulSet."""
    from tulle.check.cluster import image_version

    out = []
    reads = [(name, "control plane", read) for name, read in facts.deployments.items()]
    if facts.nats is not None:
        reads.append(("tulle-nats", "bus", facts.nats))
    for name, kind, read in reads:
        obj = read.value if read is not None else None
        if obj is None:
            out.append({"name": name, "kind": kind, "version": "", "healthy": False,
                        "detail": read.error if read is not None and read.error else "not found", "restarts": 0,
                        "address": ""})
            continue
        want = obj.spec.replicas or 0
        ready = (obj.status.ready_replicas or 0) if obj.status else 0
        images = [c.image for c in obj.spec.template.spec.containers]
        out.append({"name": name, "kind": kind, "version": ", ".join(sorted({image_version(i) for i in images})),
                    "healthy": want > 0 and ready >= want, "detail": f"{ready}/{want} ready", "restarts": 0,
                    "address": ""})
    return out
