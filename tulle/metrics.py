"""A small Prometheus registry for one asyncio process.

Why not prometheus_client: its children take a lock on every increment and its
label handling allocates; the proxy increments several counters per request on a
single thread, so a plain attribute add is enough. Output is the Prometheus text
format (0.0.4), which every scraper reads.

Label values must be bounded (DESIGN.md, "Metrics"): callers pass resolved names,
never raw request data.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Iterable

# Linkerd's response latency buckets, in milliseconds.
LATENCY_BUCKETS_MS = (1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
                      1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _fmt_value(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()):
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}

    def labels(self, *values: str):
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self._children[values] = self._new_child()
        return child

    def items(self) -> list[tuple[tuple[str, ...], object]]:
        """(label values, child) of every child, for readers other than the exposition."""
        return list(self._children.items())

    def remove(self, *values: str) -> None:
        self._children.pop(values, None)

    def children(self) -> list[tuple[tuple[str, ...], object]]:
        """(label values, child) of every child now: for readers that sample the registry."""
        return list(self._children.items())

    def _new_child(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"


class CounterChild:
    __slots__ = ("value",)

    def __init__(self):
        self.value = 0

    def inc(self, n: float = 1) -> None:
        self.value += n


class Counter(_Metric):
    kind = "counter"

    def _new_child(self):
        return CounterChild()

    def inc(self, n: float = 1) -> None:
        """For a counter without labels."""
        self.labels().inc(n)

    def render(self):
        yield from super().render()
        for values, child in list(self._children.items()):
            yield f"{self.name}{_fmt_labels(self.labelnames, values)} {_fmt_value(child.value)}"


class GaugeChild:
    __slots__ = ("value", "fn")

    def __init__(self):
        self.value = 0
        self.fn: Callable[[], float] | None = None

    def set(self, v: float) -> None:
        self.value = v

    def inc(self, n: float = 1) -> None:
        self.value += n

    def dec(self, n: float = 1) -> None:
        self.value -= n

    def set_function(self, fn: Callable[[], float]) -> None:
        self.fn = fn

    def get(self) -> float:
        return self.fn() if self.fn is not None else self.value


class Gauge(_Metric):
    kind = "gauge"

    def _new_child(self):
        return GaugeChild()

    def set(self, v: float) -> None:
        self.labels().set(v)

    def set_function(self, fn: Callable[[], float]) -> None:
        self.labels().set_function(fn)

    def render(self):
        yield from super().render()
        for values, child in list(self._children.items()):
            yield f"{self.name}{_fmt_labels(self.labelnames, values)} {_fmt_value(child.get())}"


class HistogramChild:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS_MS):
        super().__init__(name, help, labelnames)
        self.bounds = tuple(sorted(buckets))

    def _new_child(self):
        return HistogramChild(self.bounds)

    def observe(self, v: float) -> None:
        self.labels().observe(v)

    def render(self):
        yield from super().render()
        for values, child in list(self._children.items()):
            cumulative = 0
            for bound, n in zip(self.bounds + (math.inf,), child.counts):
                cumulative += n
                le = 'le="+Inf"' if math.isinf(bound) else f'le="{_fmt_value(bound)}"'
                yield f"{self.name}_bucket{_fmt_labels(self.labelnames, values, le)} {cumulative}"
            yield f"{self.name}_sum{_fmt_labels(self.labelnames, values)} {_fmt_value(child.sum)}"
            yield f"{self.name}_count{_fmt_labels(self.labelnames, values)} {child.count}"


class Registry:
    def __init__(self):
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric):
        existing = self._metrics.get(metric.name)
        if existing is not None:
            if type(existing) is not type(metric) or existing.labelnames != metric.labelnames:
                raise ValueError(f"metric {metric.name} registered twice with different shapes")
            return existing
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        return self._add(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Gauge:
        return self._add(Gauge(name, help, labelnames))

    def histogram(self, name: str, help: str, labelnames: Iterable[str] = (),
                  buckets: Iterable[float] = LATENCY_BUCKETS_MS) -> Histogram:
        return self._add(Histogram(name, help, labelnames, buckets))

    def family(self, name: str) -> "_Metric | None":
        """A registered metric by name (None when absent): for readers that sample the registry."""
        return self._metrics.get(name)

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


REGISTRY = Registry()


def parse_text(text: str) -> dict[tuple[str, frozenset], float]:
    """Parse Prometheus text into {(name, frozenset(labels.items())): value}. For tests and the CLI."""
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if "{" in head:
            name, _, rest = head.partition("{")
            labels = {}
            for part in _split_labels(rest.rstrip("}")):
                k, _, v = part.partition("=")
                labels[k] = v.strip('"').replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        else:
            name, labels = head, {}
        out[(name, frozenset(labels.items()))] = float(value.replace("+Inf", "inf"))
    return out


def _split_labels(s: str) -> list[str]:
    parts, cur, quoted, esc = [], [], False, False
    for ch in s:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            cur.append(ch)
            esc = True
        elif ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == "," and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return parts


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none). For tests and the CLI."""
    want = set(labels.items())
    return sum(v for (n, ls), v in parse_text(text).items() if n == name and want <= ls)
