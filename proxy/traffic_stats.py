"""Golden metrics per traffic edge, answered on `tulle.proxy.v1.traffic` (the dashboard's
topology and workload figures; `tulle stat` / `tulle edges` read the same messages).

Pure core, thin adapter. The proxy already counts every request, response, latency and
TCP connection in its Prometheus families (proxy/metrics.py, labelled by direction, peer
service, TLS and the peer's identity) and every authorization denial
(proxy/policy_metrics.py, by client identity). `TrafficStats` samples those cumulative
counters once a second into a short ring; a window is the difference between the newest
sample and the one `window_s` before it. Nothing is added to the request path.

Edges (schemas.TrafficEdge), one per peer:
- inbound: per client identity ("" = a client without one: not mTLS); `denied` from the
  deny counters of that identity;
- outbound: per destination service and the identity the server proved.

The ring holds `retention_s` + 1 samples (61: windows up to a minute; a longer request is
answered with the span really covered, which `window_s` in the reply says).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from tulle import schemas
from tulle.log import get_logger
from tulle.metrics import LATENCY_BUCKETS_MS, Registry

log = get_logger(part="traffic")

DEFAULT_RETENTION_S = 60
_BOUNDS = [float(b) for b in LATENCY_BUCKETS_MS]
_N = len(_BOUNDS) + 1
_DENY_FAMILIES = ("inbound_http_authz_deny_total", "inbound_tcp_authz_deny_total")


@dataclass(slots=True)
class _Edge:
    """Cumulative figures of one edge at one instant."""

    requests: int = 0
    successes: int = 0
    failures: int = 0
    denied: int = 0
    latency: list = field(default_factory=lambda: [0] * _N)
    tcp_opened: int = 0
    tcp_open: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


# (direction, peer namespace, peer name, peer identity, secured)
EdgeKey = tuple[str, str, str, str, bool]


def peer_of_identity(identity: str) -> tuple[str, str]:
    """(namespace, service account) of `<sa>.<ns>.serviceaccount.identity.tulle.<td>`, else ("", "")."""
    parts = identity.split(".")
    if len(parts) >= 4 and parts[2] == "serviceaccount":
        return parts[1], parts[0]
    return "", ""


def _key(direction: str, dst_ns: str, dst_svc: str, tls: str, client_id: str, server_id: str) -> Optional[EdgeKey]:
    if direction == "inbound":
        ns, name = peer_of_identity(client_id)
        return ("inbound", ns, name, client_id, tls == "true" and bool(client_id))
    if direction == "outbound":
        return ("outbound", dst_ns, dst_svc, server_id, tls == "true" and bool(server_id))
    return None


def sample(registry: Registry) -> dict[EdgeKey, _Edge]:
    """The cumulative figures of every edge, read from the proxy's metric families now."""
    edges: dict[EdgeKey, _Edge] = {}

    def edge(values: tuple) -> Optional[_Edge]:
        key = _key(*values[:6])
        if key is None:
            return None
        e = edges.get(key)
        if e is None:
            e = edges[key] = _Edge()
        return e

    def each(name: str):
        metric = registry.family(name)
        return metric.children() if metric is not None else []

    for values, child in each("request_total"):
        if (e := edge(values)) is not None:
            e.requests += child.value
    for values, child in each("response_total"):
        if (e := edge(values)) is not None:
            if values[7] == "failure":
                e.failures += child.value
            else:
                e.successes += child.value
    for values, child in each("response_latency_ms"):
        if (e := edge(values)) is not None and len(child.counts) == _N:
            for i, n in enumerate(child.counts):
                e.latency[i] += n
    for name, attr in (("tcp_open_total", "tcp_opened"), ("tcp_read_bytes_total", "bytes_read"),
                       ("tcp_write_bytes_total", "bytes_written")):
        for values, child in each(name):
            if (e := edge(values)) is not None:
                setattr(e, attr, getattr(e, attr) + child.value)
    for values, child in each("tcp_open_connections"):
        if (e := edge(values)) is not None:
            e.tcp_open += child.get()
    for name in _DENY_FAMILIES:  # labels: srv_kind, srv_name, srv_port, client_id
        for values, child in each(name):
            client_id = values[-1]
            ns, sa = peer_of_identity(client_id)
            key = ("inbound", ns, sa, client_id, bool(client_id))
            e = edges.get(key)
            if e is None:
                e = edges[key] = _Edge()
            e.denied += child.value
    return edges


def _delta(new: _Edge, old: Optional[_Edge], key: EdgeKey) -> Optional[schemas.TrafficEdge]:
    o = old or _Edge()
    latency = [max(0, a - b) for a, b in zip(new.latency, o.latency)]
    out = schemas.TrafficEdge(
        direction=key[0], peer_namespace=key[1], peer_name=key[2], peer_identity=key[3], secured=key[4],
        requests=max(0, new.requests - o.requests), successes=max(0, new.successes - o.successes),
        failures=max(0, new.failures - o.failures), denied=max(0, new.denied - o.denied),
        latency_buckets_ms=_BOUNDS, latency_counts=latency,
        tcp_opened=max(0, new.tcp_opened - o.tcp_opened), tcp_open=max(0, int(new.tcp_open)),
        bytes_read=max(0, new.bytes_read - o.bytes_read), bytes_written=max(0, new.bytes_written - o.bytes_written))
    busy = (out.requests or out.successes or out.failures or out.denied or out.tcp_opened or out.tcp_open
            or out.bytes_read or out.bytes_written)
    return out if busy else None


class TrafficStats:
    """A ring of per-second samples; `window()` answers a TrafficRequest's window."""

    def __init__(self, registry: Registry, *, clock: Callable[[], float] = time.monotonic,
                 retention_s: int = DEFAULT_RETENTION_S):
        self.registry = registry
        self.clock = clock
        self.retention_s = retention_s
        self.samples: deque[tuple[float, dict[EdgeKey, _Edge]]] = deque(maxlen=retention_s + 1)
        self.started = clock()
        self.samples.append((self.started, {}))  # nothing had happened before the proxy started

    def tick(self) -> None:
        self.samples.append((self.clock(), sample(self.registry)))

    def window(self, seconds: float) -> tuple[float, list[schemas.TrafficEdge]]:
        """(the span really covered, the edges busy in it): from a fresh sample back to the
        newest sample at least `seconds` old (or the oldest kept)."""
        now = self.clock()
        current = sample(self.registry)
        start_t, start = self.samples[0]  # a proxy younger than the window: all it has
        for t, s in reversed(self.samples):
            if now - t >= seconds:
                start_t, start = t, s
                break
        edges = [e for key, new in sorted(current.items()) if (e := _delta(new, start.get(key), key)) is not None]
        return max(now - start_t, 1.0), edges


def traffic_reply(namespace: str, workload: str, identity: str, stats: TrafficStats,
                  request: schemas.TrafficRequest) -> Optional[schemas.TrafficReply]:
    """What a proxy answers on PROXY_TRAFFIC_SUBJECT; None when the request is for other proxies."""
    if request.workloads and schemas.proxy_key(namespace, workload) not in request.workloads:
        return None
    span, edges = stats.window(max(1.0, request.window_s))
    return schemas.TrafficReply(namespace=namespace, workload=workload, identity=identity, window_s=span, edges=edges)


async def serve_traffic(app) -> None:
    """The proxy's adapter (one task, started by proxy/app.py): sample every second and
    answer `tulle.proxy.v1.traffic` with this proxy's edges."""
    cfg = app.cfg
    stats = TrafficStats(app.registry)

    async def answer(request: schemas.TrafficRequest) -> Optional[schemas.TrafficReply]:
        return traffic_reply(cfg.namespace, cfg.workload, cfg.identity, stats, request)

    serving = False
    while True:
        if not serving and app.bus.connected:
            try:
                # Once is enough: nats-py subscribes again by itself after a reconnect.
                await app.bus.serve(schemas.PROXY_TRAFFIC_SUBJECT, schemas.TrafficRequest, answer)
                serving = True
            except Exception as e:  # disconnected again between the check and the subscribe
                log.debug("cannot serve traffic stats yet", error=str(e) or type(e).__name__)
        await asyncio.sleep(1.0)
        stats.tick()
