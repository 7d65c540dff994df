"""Reading route windows (the CLI side of `tulle routes`): several proxies' windows of one
route summed, and quantiles of their latency histograms. Pure.

The proxy records windows (proxy/route_stats.py) and answers them on the bus as
`schemas.RouteWindow`; whoever reads them — the CLI, a dashboard — merges them here, so
no reader needs the data plane's code.
"""

from __future__ import annotations

import bisect
import math
from typing import Optional

from tulle import schemas

def merge_windows(windows: list[schemas.RouteWindow]) -> schemas.RouteWindow:
    """Sum several proxies' windows of the same route (histograms bucket by bucket)."""
    first = windows[0]
    bounds = list(first.latency_buckets_ms)
    out = schemas.RouteWindow(service=first.service, route=first.route, latency_buckets_ms=bounds,
                              latency_counts=[0] * (len(bounds) + 1))
    for w in windows:
        out.effective_requests += w.effective_requests
        out.effective_successes += w.effective_successes
        out.actual_requests += w.actual_requests
        out.actual_successes += w.actual_successes
        if w.latency_buckets_ms == bounds and len(w.latency_counts) == len(out.latency_counts):
            for i, n in enumerate(w.latency_counts):
                out.latency_counts[i] += n
        else:
            # A proxy with other bounds (another version): re-bucket each count by its upper bound.
            for i, n in enumerate(w.latency_counts):
                upper = w.latency_buckets_ms[i] if i < len(w.latency_buckets_ms) else math.inf
                out.latency_counts[bisect.bisect_left(bounds, upper)] += n
    return out


def histogram_quantile(q: float, bounds: list[float], counts: list[int]) -> Optional[float]:
    """The q-quantile of a histogram, interpolated within its bucket as Prometheus does.

    `bounds` are the finite upper bounds, ascending; `counts` has one count per bound
    plus a last one for +Inf (not cumulative). None when the histogram is empty. A
    quantile that falls in the +Inf bucket is the highest finite bound; the first
    bucket's lower bound is 0.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    cumulative = 0
    for i, n in enumerate(counts):
        if n and cumulative + n >= rank:
            if i >= len(bounds):
                return bounds[-1] if bounds else None
            lower = bounds[i - 1] if i > 0 else 0.0
            upper = bounds[i]
            return lower + (upper - lower) * (rank - cumulative) / n
        cumulative += n
    return bounds[-1] if bounds else None
