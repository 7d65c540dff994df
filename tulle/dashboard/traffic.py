"""The dashboard's one door to traffic statistics (`tulle.proxy.v1.traffic`).

Gathering goes through the shared client (tulle/traffic.py, which `tulle stat` /
`tulle edges` use); this module adds what only the dashboard draws:

    gather_traffic(bus, window_s, expected, timeout_s) -> list[TrafficReply]
    merge_histograms(edges) -> (bounds, counts)
    quantiles(bounds, counts) -> (p50, p95, p99)
"""

from __future__ import annotations

import bisect
import math
from typing import Iterable, Optional

from tulle import schemas
from tulle import traffic as shared_traffic


async def gather_traffic(bus, window_s: float, expected: set[str], timeout_s: float) -> list[schemas.TrafficReply]:
    """Every expected proxy's (`ns.workload`) edges over `window_s`, through the client
    `tulle stat` / `tulle edges` use, so both see the same numbers."""
    return await shared_traffic.gather_traffic(bus, window_s, timeout_s=timeout_s, expected=expected)


def merge_histograms(edges: Iterable[schemas.TrafficEdge]) -> tuple[list[float], list[int]]:
    """Sum latency histograms bucket by bucket (re-bucketing any with other bounds)."""
    bounds: list[float] = []
    counts: list[int] = []
    for e in edges:
        if not e.latency_counts:
            continue
        if not bounds:
            bounds, counts = list(e.latency_buckets_ms), [0] * (len(e.latency_buckets_ms) + 1)
        if e.latency_buckets_ms == bounds and len(e.latency_counts) == len(counts):
            for i, n in enumerate(e.latency_counts):
                counts[i] += n
        else:
            for i, n in enumerate(e.latency_counts):
                upper = e.latency_buckets_ms[i] if i < len(e.latency_buckets_ms) else math.inf
                counts[min(bisect.bisect_left(bounds, upper), len(counts) - 1)] += n
    return bounds, counts


def quantiles(bounds: list[float], counts: list[int]) -> tuple[Optional[float], Optional[float], Optional[float]]:
    from tulle.route_windows import histogram_quantile

    if not counts:
        return None, None, None
    return tuple(histogram_quantile(q, bounds, counts) for q in (0.5, 0.95, 0.99))  # type: ignore[return-value]
