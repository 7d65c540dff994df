"""Issuance rate limits: a token bucket per identity (pure; the clock is passed in).

A proxy asks for a certificate at start and then about every 17 hours; a requester
asking hundreds of times a second is broken or hostile, and signing is the identity
service's most expensive work. Each identity may burst up to `burst` certificates, then
`rate` per second; beyond that certify answers `rate-limited` and the proxy retries later.
Keyed by the identity the token *proved*, so nobody can spend another workload's budget.
"""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    def __init__(self, rate: float, burst: float, max_keys: int = 100_000):
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        # key -> (tokens, time of the last update); least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float) -> bool:
        """Take one token for `key` if it has one."""
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self.max_keys:
            # A forgotten key starts again with a full bucket: only keys idle longest go.
            self._buckets.popitem(last=False)
        return allowed

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until `key` has a token again."""
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
