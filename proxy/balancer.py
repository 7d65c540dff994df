"""Load balancing — pure: power of two choices over a peak-EWMA latency estimate.

As in Linkerd: each endpoint keeps an exponentially weighted moving average of its
response latency that jumps up at once on a slow response (the "peak") and decays
towards faster ones with a time constant (10 s). Its cost is that estimate times its
outstanding requests + 1; of two endpoints picked at random the cheaper one wins. As
tower's PeakEwma, the estimate also decays towards zero while an endpoint gets no
response, so one that was slow (or never tried) is tried again after a while instead of
being starved for good.
HTTP balances per request, opaque TCP per connection (the caller decides when to call).

The clock is passed in, so tests drive it by hand.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Generic, Hashable, Iterable, TypeVar

DEFAULT_RTT_S = 0.030
DECAY_S = 10.0

T = TypeVar("T")


class EndpointState(Generic[T]):
    """One endpoint's load figures; `endpoint` is the caller's object (e.g. schemas.Endpoint)."""

    __slots__ = ("endpoint", "ewma", "pending", "stamp", "handle")

    def __init__(self, endpoint: T, now: float, default_rtt: float = DEFAULT_RTT_S):
        self.endpoint = endpoint
        self.ewma = default_rtt
        self.pending = 0
        self.stamp = now
        self.handle = None  # free for the adapter: e.g. the endpoint's connection pool

    def cost(self, now: float | None = None, decay: float = DECAY_S) -> float:
        """Estimate (decayed towards zero since the last sample, at `now`) × (in flight + 1)."""
        ewma = self.ewma
        if now is not None and now > self.stamp:
            ewma *= math.exp((self.stamp - now) / decay)
        return ewma * (self.pending + 1)

    def observe(self, rtt: float, now: float, decay: float = DECAY_S) -> None:
        """Record one latency sample (seconds)."""
        if rtt > self.ewma:
            self.ewma = rtt  # peak: react to a slow endpoint at once
        else:
            elapsed = max(now - self.stamp, 0.0)
            w = math.exp(-elapsed / decay)
            self.ewma = self.ewma * w + rtt * (1.0 - w)
        self.stamp = now


class Balancer(Generic[T]):
    def __init__(self, key: Callable[[T], Hashable] = lambda e: e, *, clock: Callable[[], float],
                 default_rtt: float = DEFAULT_RTT_S, decay: float = DECAY_S, rng: random.Random | None = None):
        self._key = key
        self._clock = clock
        self.default_rtt = default_rtt
        self.decay = decay
        self._rand = (rng or random.Random()).random
        self.states: list[EndpointState[T]] = []
        self._by_key: dict[Hashable, EndpointState[T]] = {}

    def __len__(self) -> int:
        return len(self.states)

    def update(self, endpoints: Iterable[T]) -> list[EndpointState[T]]:
        """Replace the endpoint set; endpoints that stay keep their figures. Returns the removed states."""
        now = self._clock()
        new: dict[Hashable, EndpointState[T]] = {}
        for ep in endpoints:
            k = self._key(ep)
            st = self._by_key.get(k)
            if st is None:
                st = EndpointState(ep, now, self.default_rtt)
            else:
                st.endpoint = ep  # same address, possibly new metadata
            new[k] = st
        removed = [st for k, st in self._by_key.items() if k not in new]
        self._by_key = new
        self.states = list(new.values())
        return removed

    def pick(self) -> EndpointState[T] | None:
        states = self.states
        n = len(states)
        if n == 0:
            return None
        if n == 1:
            return states[0]
        i = int(self._rand() * n)
        j = int(self._rand() * (n - 1))
        if j >= i:
            j += 1
        return self._cheaper(states[i], states[j])

    def _cheaper(self, a: EndpointState[T], b: EndpointState[T]) -> EndpointState[T]:
        now = self._clock()
        decay = self.decay
        return a if a.cost(now, decay) <= b.cost(now, decay) else b

    def pick_other(self, avoid: EndpointState[T] | None) -> EndpointState[T] | None:
        """`pick`, but not `avoid` while another endpoint exists (a retry prefers another
        endpoint than the one that just failed)."""
        states = self.states
        if avoid is None or len(states) < 2:
            return self.pick()
        others = [st for st in states if st is not avoid]
        n = len(others)
        if n == len(states):  # `avoid` is gone from the set meanwhile
            return self.pick()
        if n == 1:
            return others[0]
        i = int(self._rand() * n)
        j = int(self._rand() * (n - 1))
        if j >= i:
            j += 1
        return self._cheaper(others[i], others[j])

    def start(self, st: EndpointState[T]) -> float:
        """A request (or connection) to `st` begins; returns its start time."""
        st.pending += 1
        return self._clock()

    def cancel(self, st: EndpointState[T]) -> None:
        """It ended without saying anything of the endpoint's latency (the caller went away,
        or the connection was a stale one): no longer in flight, nothing learnt."""
        st.pending -= 1

    def finish(self, st: EndpointState[T], started: float, ok: bool = True) -> None:
        """It answered (or failed); failures count as a slow sample so traffic moves away."""
        st.pending -= 1
        now = self._clock()
        rtt = now - started
        if not ok:
            rtt = max(rtt, st.ewma * 2, self.default_rtt)
        st.observe(rtt, now, self.decay)
