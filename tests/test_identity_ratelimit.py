"""The certify rate limiter, pure: a token bucket per identity, with the clock passed in."""

import pytest

from services.identity.ratelimit import RateLimiter


def test_a_burst_then_the_steady_rate():
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.allow("a", 0.0) for _ in range(5)] == [True, True, True, False, False]
    assert limiter.retry_after("a", 0.0) == pytest.approx(0.5)
    assert limiter.allow("a", 0.5) and not limiter.allow("a", 0.5)  # one token came back
    assert [limiter.allow("a", 10.0) for _ in range(4)] == [True, True, True, False]  # capped at the burst


def test_identities_have_their_own_buckets_and_the_table_stays_bounded():
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=100)
    assert limiter.allow("a", 0.0) and not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)
    for i in range(1000):
        limiter.allow(f"k{i}", 1.0)
    assert len(limiter._buckets) == 100


def test_nonsense_settings_are_refused():
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1)
    with pytest.raises(ValueError):
        RateLimiter(rate=1, burst=0)
