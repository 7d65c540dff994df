"""Golden metrics per traffic edge, kept as rolling windows, so `tulle stat`, `tulle edges`
and the dashboard can ask a proxy "the last minute" without Prometheus.

The request path does no work for this. The proxy already counts everything in
`proxy/metrics.py` (`Labels`: requests, responses by classification, latency
histograms, TCP opens / closes and bytes, per direction, destination and peer identity).
Once a second — and just before answering — `read_edges` folds those *cumulative*
counters into edges and `TrafficWindows.sample` keeps what changed since the last
sample. The windows are pure (no I/O, the clock is injected).

An edge is `(direction, peer namespace, peer name, peer identity, secured)`:

- inbound: the client, by its verified identity (`<sa>.<ns>.serviceaccount.identity...`
  → namespace `<ns>`, name `<sa>`); every client without one is one edge with empty
  peer fields — never an address;
- outbound: the destination service (namespace, service) and the identity its server
  proved; traffic to no known service is one edge with empty names.

Memory is bounded: per-second buckets for the last `fine_s` (60 s), then one bucket per
`coarse_s` (10 s) up to `retention_s` (10 minutes), only for seconds with traffic, and at
most `max_edges` edges. An edge idle for the whole retention is dropped; edges past the
cap are counted under one `[other]` edge per direction, so totals stay right.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterable, Optional

from tulle import schemas
from tulle.metrics import LATENCY_BUCKETS_MS

if TYPE_CHECKING:
    from proxy.metrics import ProxyMetrics
    from proxy.policy_metrics import PolicyMetrics

DEFAULT_RETENTION_S = 600
FINE_S = 60  # per-second buckets this far back; coarser ones beyond
COARSE_S = 10
MAX_EDGES = 256
OVERFLOW_PEER = "[other]"  # the peer name of the edge that counts what the cap left out
_N_LATENCY = len(LATENCY_BUCKETS_MS) + 1  # the last count is +Inf
_BOUNDS_LIST = [float(b) for b in LATENCY_BUCKETS_MS]  # shared by every reply (never mutated)
_IDENTITY_MARK = ".serviceaccount.identity."

# (direction, peer_namespace, peer_name, peer_identity, secured)
EdgeKey = tuple[str, str, str, str, bool]


# --- edge keys -----------------------------------------------------------------------------


def identity_parts(identity: str) -> tuple[str, str]:
    """(namespace, service account) of a workload identity; ("", "") for anything else."""
    head, mark, _ = identity.partition(_IDENTITY_MARK)
    if not mark:
        return "", ""
    sa, dot, ns = head.rpartition(".")
    return (ns, sa) if dot and sa and ns else ("", "")


def inbound_key(client_id: str) -> EdgeKey:
    """The client as the inbound proxy knows it: its verified identity, or nobody."""
    if not client_id:
        return ("inbound", "", "", "", False)
    ns, sa = identity_parts(client_id)
    return ("inbound", ns, sa, client_id, True)


def outbound_key(dst_namespace: str, dst_service: str, tls: str, server_id: str) -> EdgeKey:
    secured = tls == "true" and bool(server_id)
    return ("outbound", dst_namespace, dst_service, server_id if secured else "", secured)


def overflow_key(direction: str) -> EdgeKey:
    return (direction, "", OVERFLOW_PEER, "", False)


# --- readings: one edge's cumulative totals at one instant ------------------------------------


class Reading:
    """Cumulative totals of an edge (they only grow), and `tcp_open` (a gauge: open now)."""

    __slots__ = ("requests", "successes", "failures", "denied", "latency", "tcp_opened", "tcp_open",
                 "bytes_read", "bytes_written")

    def __init__(self, requests: int = 0, successes: int = 0, failures: int = 0, denied: int = 0,
                 latency: Optional[list[int]] = None, tcp_opened: int = 0, tcp_open: int = 0,
                 bytes_read: int = 0, bytes_written: int = 0):
        self.requests = requests
        self.successes = successes
        self.failures = failures
        self.denied = denied
        self.latency = latency if latency is not None else [0] * _N_LATENCY
        self.tcp_opened = tcp_opened
        self.tcp_open = tcp_open
        self.bytes_read = bytes_read  # from the peer
        self.bytes_written = bytes_written  # to the peer

    def __repr__(self) -> str:
        return (f"Reading(requests={self.requests}, successes={self.successes}, failures={self.failures}, "
                f"denied={self.denied}, tcp_opened={self.tcp_opened}, tcp_open={self.tcp_open}, "
                f"bytes_read={self.bytes_read}, bytes_written={self.bytes_written})")


class _Bucket:
    """What changed in one second (or one coarse slot) of one edge."""

    __slots__ = ("second", "requests", "successes", "failures", "denied", "latency", "tcp_opened",
                 "bytes_read", "bytes_written")

    def __init__(self, second: int):
        self.second = second  # for a coarse bucket: the first second of its slot
        self.requests = self.successes = self.failures = self.denied = 0
        self.tcp_opened = self.bytes_read = self.bytes_written = 0
        # Sparse and flat, (index, count, index, count, …): a second's responses mostly fall
        # in one or two latency buckets, and thousands of these may be kept.
        self.latency: tuple[int, ...] = ()

    def add(self, other: "_Bucket") -> None:
        self.requests += other.requests
        self.successes += other.successes
        self.failures += other.failures
        self.denied += other.denied
        self.tcp_opened += other.tcp_opened
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        if other.latency:
            if not self.latency:
                self.latency = other.latency
            else:
                merged = dict(zip(self.latency[::2], self.latency[1::2]))
                for i, n in zip(other.latency[::2], other.latency[1::2]):
                    merged[i] = merged.get(i, 0) + n
                self.latency = tuple(x for pair in sorted(merged.items()) for x in pair)

    def add_to(self, totals: list[int], latency: list[int]) -> None:
        """Add this bucket into a window's running totals (see `_totals`)."""
        totals[0] += self.requests
        totals[1] += self.successes
        totals[2] += self.failures
        totals[3] += self.denied
        totals[4] += self.tcp_opened
        totals[5] += self.bytes_read
        totals[6] += self.bytes_written
        lat = self.latency
        for j in range(0, len(lat), 2):
            latency[lat[j]] += lat[j + 1]


class _Edge:
    __slots__ = ("key", "fine", "coarse", "tcp_open")

    def __init__(self, key: EdgeKey):
        self.key = key
        self.fine: deque[_Bucket] = deque()  # one per second with traffic, oldest first
        self.coarse: deque[_Bucket] = deque()  # one per COARSE_S slot, oldest first
        self.tcp_open = 0

    def bucket(self, second: int) -> _Bucket:
        fine = self.fine
        if fine and fine[-1].second == second:
            return fine[-1]
        b = _Bucket(second)
        fine.append(b)
        return b

    def compact(self, now_s: int, fine_s: int, coarse_s: int, retention_s: int) -> None:
        """Seconds older than `fine_s` move into coarse slots; slots wholly past the retention go."""
        fine, coarse = self.fine, self.coarse
        limit = now_s - fine_s
        while fine and fine[0].second <= limit:
            b = fine.popleft()
            slot = b.second - b.second % coarse_s
            if coarse and coarse[-1].second == slot:
                coarse[-1].add(b)
            else:
                b.second = slot
                coarse.append(b)
        oldest = now_s - retention_s
        while coarse and coarse[0].second + coarse_s - 1 <= oldest:
            coarse.popleft()

    @property
    def idle(self) -> bool:
        return not self.fine and not self.coarse and self.tcp_open == 0


def _delta(now: Reading, before: Optional[Reading], second: int) -> Optional[_Bucket]:
    """What changed from `before` to `now`, as a bucket; None when nothing did."""
    if before is None:
        before = _ZERO
    b = _Bucket(second)
    # max(0, …): a counter never shrinks, but a reading that did must not count negative.
    b.requests = max(0, now.requests - before.requests)
    b.successes = max(0, now.successes - before.successes)
    b.failures = max(0, now.failures - before.failures)
    b.denied = max(0, now.denied - before.denied)
    b.tcp_opened = max(0, now.tcp_opened - before.tcp_opened)
    b.bytes_read = max(0, now.bytes_read - before.bytes_read)
    b.bytes_written = max(0, now.bytes_written - before.bytes_written)
    if now.latency != before.latency:
        b.latency = tuple(x for i, (n, m) in enumerate(zip(now.latency, before.latency)) if n > m for x in (i, n - m))
    if not (b.requests or b.successes or b.failures or b.denied or b.tcp_opened or b.bytes_read
            or b.bytes_written or b.latency):
        return None
    return b


_ZERO = Reading()


class TrafficWindows:
    """A proxy's rolling windows per edge, fed with cumulative readings by `sample`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, retention_s: int = DEFAULT_RETENTION_S,
                 fine_s: int = FINE_S, coarse_s: int = COARSE_S, max_edges: int = MAX_EDGES):
        if fine_s % coarse_s or retention_s < fine_s:
            raise ValueError("fine_s must be a multiple of coarse_s and at most retention_s")
        self._clock = clock
        self.retention_s = retention_s
        self.fine_s = fine_s
        self.coarse_s = coarse_s
        self.max_edges = max_edges
        self.started = clock()
        self._last: dict[EdgeKey, Reading] = {}  # the previous reading of every key ever seen
        self._edges: dict[EdgeKey, _Edge] = {}
        self._overflow: dict[str, _Edge] = {}  # direction -> the [other] edge

    def __len__(self) -> int:
        return len(self._edges)

    def sample(self, readings: dict[EdgeKey, Reading]) -> None:
        """Take cumulative readings: what changed since the last ones goes into this second."""
        now_s = int(self._clock())
        for edge in self._edges.values():
            edge.tcp_open = 0
        for edge in self._overflow.values():
            edge.tcp_open = 0
        last = self._last
        for key, reading in readings.items():
            change = _delta(reading, last.get(key), now_s)
            last[key] = reading
            if change is None and reading.tcp_open == 0:
                continue
            edge = self._edge_for(key)
            edge.tcp_open += reading.tcp_open
            if change is not None:
                bucket = edge.bucket(now_s)
                bucket.add(change)
        self._prune(now_s)

    def _edge_for(self, key: EdgeKey) -> _Edge:
        edge = self._edges.get(key)
        if edge is not None:
            return edge
        if key[2] != OVERFLOW_PEER and len(self._edges) < self.max_edges:
            edge = self._edges[key] = _Edge(key)
            return edge
        direction = key[0]
        edge = self._overflow.get(direction)
        if edge is None:
            edge = self._overflow[direction] = _Edge(overflow_key(direction))
        return edge

    def _prune(self, now_s: int) -> None:
        for key, edge in list(self._edges.items()):
            edge.compact(now_s, self.fine_s, self.coarse_s, self.retention_s)
            if edge.idle:
                del self._edges[key]
        for direction, edge in list(self._overflow.items()):
            edge.compact(now_s, self.fine_s, self.coarse_s, self.retention_s)
            if edge.idle:
                del self._overflow[direction]

    def _bounds(self, seconds: float) -> tuple[int, int, bool]:
        """(now second, first second of the window, whether coarse slots are part of it)."""
        now_s = int(self._clock())
        n = max(1, min(int(math.ceil(seconds)), self.retention_s))
        first = now_s - n + 1
        return now_s, first, first <= now_s - self.fine_s

    def covered_s(self, seconds: float) -> float:
        """How many seconds `window(seconds)` really spans: its buckets, cut at start-up.

        The current second is partial (a 60 s window spans 59 s and a fraction); beyond the
        last minute the window starts at a 10-second slot boundary; a proxy up for 5 s spans
        5 s. Rates divide by this, never by less than 1 s.
        """
        now = self._clock()
        _, first, coarse = self._bounds(seconds)
        start = first - first % self.coarse_s if coarse else first
        return max(now - max(self.started, float(start)), 1.0)

    def window(self, seconds: float) -> list[schemas.TrafficEdge]:
        """Every edge with traffic in the last `seconds` (at most the retention) or open connections."""
        now_s, first, coarse = self._bounds(seconds)
        out = []
        for edge in [*self._edges.values(), *self._overflow.values()]:
            edge.compact(now_s, self.fine_s, self.coarse_s, self.retention_s)
            totals, latency = [0] * 7, [0] * _N_LATENCY
            for b in reversed(edge.fine):
                if b.second < first:
                    break
                b.add_to(totals, latency)
            if coarse:
                for b in reversed(edge.coarse):
                    if b.second + self.coarse_s <= first:
                        break
                    b.add_to(totals, latency)
            if not (any(totals) or edge.tcp_open):
                continue
            out.append(_edge_message(edge, totals, latency))
        return out


def _edge_message(edge: _Edge, totals: list[int], latency: list[int]) -> schemas.TrafficEdge:
    direction, peer_ns, peer_name, peer_identity, secured = edge.key
    requests, successes, failures, denied, tcp_opened, bytes_read, bytes_written = totals
    return schemas.TrafficEdge(
        direction=direction, peer_namespace=peer_ns, peer_name=peer_name, peer_identity=peer_identity,
        secured=secured, requests=requests, successes=successes, failures=failures, denied=denied,
        latency_buckets_ms=_BOUNDS_LIST, latency_counts=latency, tcp_opened=tcp_opened, tcp_open=edge.tcp_open,
        bytes_read=bytes_read, bytes_written=bytes_written)


def traffic_reply(namespace: str, workload: str, identity: str, windows: TrafficWindows,
                  request: schemas.TrafficRequest) -> Optional[schemas.TrafficReply]:
    """What a proxy answers on PROXY_TRAFFIC_SUBJECT; None when the request is for other proxies."""
    if request.workloads and schemas.proxy_key(namespace, workload) not in request.workloads:
        return None
    seconds = min(max(request.window_s, 1.0), float(windows.retention_s))
    return schemas.TrafficReply(namespace=namespace, workload=workload, identity=identity,
                                window_s=windows.covered_s(seconds), edges=windows.window(seconds))


# --- reading the proxy's own counters (no I/O; called once a second, never per request) --------


def read_edges(metrics: "ProxyMetrics", rooms: Iterable = (), authz: "Optional[PolicyMetrics]" = None
               ) -> dict[EdgeKey, Reading]:
    """The cumulative totals of every edge, from the proxy's counters.

    `rooms` (the inbound and outbound sides) add what counters hold only at close: the live
    bytes of open opaque connections, and the inbound HTTP connections open now. `authz`
    adds the inbound policy's denials, by client identity.
    """
    readings: dict[EdgeKey, Reading] = {}
    keys: dict[int, EdgeKey] = {}  # id(Labels) -> its edge

    def reading(key: EdgeKey) -> Reading:
        r = readings.get(key)
        if r is None:
            r = readings[key] = Reading()
        return r

    for labels in metrics.all_labels():
        direction, dst_ns, dst_svc, tls, client_id, server_id = labels.key
        key = inbound_key(client_id if tls == "true" else "") if direction == "inbound" else \
            outbound_key(dst_ns, dst_svc, tls, server_id)
        keys[id(labels)] = key
        r = reading(key)
        requests, successes, failures, latency, opened, open_now, read, written = labels.totals()
        r.requests += requests
        r.successes += successes
        r.failures += failures
        for i, n in enumerate(latency):
            r.latency[i] += n
        r.tcp_opened += opened
        r.tcp_open += open_now
        # Labels count bytes from the accepting side's point of view: read from the client,
        # written to it. Outbound, the peer is the server: the other way round.
        if direction == "inbound":
            r.bytes_read += read
            r.bytes_written += written
        else:
            r.bytes_read += written
            r.bytes_written += read
    for room in rooms:
        inbound = room.direction == "inbound"
        for s in room.splices:
            key = keys.get(id(s.labels)) if s.labels is not None else None
            if key is None:
                continue
            r = readings[key]
            if inbound:
                r.bytes_read += s.client.read
                r.bytes_written += s.server.read
            else:
                r.bytes_read += s.server.read
                r.bytes_written += s.client.read
        if inbound:
            for server in room.conns:
                labels = getattr(server.conn, "labels", None)
                key = keys.get(id(labels)) if labels is not None else None
                if key is not None:
                    readings[key].tcp_open += 1
    if authz is not None:
        for client_id, n in authz.denied_by_client().items():
            key = overflow_key("inbound") if client_id == "other" else inbound_key(client_id)
            reading(key).denied += n
    return readings
