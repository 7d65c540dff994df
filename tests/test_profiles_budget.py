"""The retry budget (tower's TpsBudget semantics) on a simulated clock: no sleeping."""

import pytest

from proxy.profiles import RetryBudget


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def run(budget: RetryBudget, clock: Clock, rps: int, seconds: int, retries_per_request: int | None):
    """Originals at `rps`, every attempt failing; each failed attempt retried while the budget allows
    (at most `retries_per_request` retries per original; None: no limit). Returns per-second
    (deposits, withdrawals)."""
    per_second = []
    step = 1.0 / rps
    start = clock.t
    for s in range(seconds):
        deposits = withdrawals = 0
        for i in range(rps):
            clock.t = start + s + i * step
            budget.deposit()
            deposits += 1
            retries = 0
            while (retries_per_request is None or retries < retries_per_request) and budget.try_withdraw():
                retries += 1
                withdrawals += 1
        per_second.append((deposits, withdrawals))
    return per_second


def test_linkerd_defaults_are_ratio_0_2_ten_per_second_over_ten_seconds():
    assert RetryBudget().settings == (0.2, 10, 10.0)


def test_under_500_rps_of_failing_requests_retries_stay_within_20_percent_plus_10_per_second():
    clock = Clock()
    budget = RetryBudget(clock=clock)
    seconds = run(budget, clock, rps=500, seconds=10, retries_per_request=None)
    deposits = sum(d for d, _ in seconds)
    withdrawals = sum(w for _, w in seconds)
    assert deposits == 5000
    assert withdrawals <= 0.2 * deposits + 10 * 10
    assert withdrawals >= 0.95 * (0.2 * deposits + 10 * 10)  # and the budget is really used, not refused


def test_the_bound_holds_for_every_ttl_window_of_a_long_retry_storm():
    clock = Clock(0.0)
    budget = RetryBudget(clock=clock)
    seconds = run(budget, clock, rps=500, seconds=60, retries_per_request=None)
    for start in range(0, 51):
        window = seconds[start:start + 10]
        deposits = sum(d for d, _ in window)
        withdrawals = sum(w for _, w in window)
        assert withdrawals <= 0.2 * deposits + 10 * 10, f"window starting at {start}s"
    # in the steady state the ratio dominates: one retry per five originals, plus the reserve
    late = seconds[30:40]
    assert sum(w for _, w in late) >= 0.95 * (0.2 * 5000 + 100)


def test_low_traffic_still_gets_the_minimum_retries_per_second():
    clock = Clock()
    budget = RetryBudget(clock=clock)
    seconds = run(budget, clock, rps=5, seconds=30, retries_per_request=1)
    # 20% of 5 rps would allow 1 retry/s; the minimum of 10/s lets every request retry once
    assert all(w == 5 for _, w in seconds)


def test_an_idle_budget_allows_a_burst_of_min_times_ttl_then_refills_after_the_ttl():
    clock = Clock()
    budget = RetryBudget(retry_ratio=0.2, min_retries_per_second=10, ttl_s=10.0, clock=clock)
    granted = 0
    while budget.try_withdraw():
        granted += 1
    assert granted == 100
    clock.t += 5.0
    assert not budget.try_withdraw()  # the burst is still within the ttl
    clock.t += 5.0
    assert budget.try_withdraw()  # ten seconds on, it has slid out


def test_deposits_earn_exact_fractions_of_a_retry():
    clock = Clock()
    budget = RetryBudget(retry_ratio=0.2, min_retries_per_second=0, ttl_s=10.0, clock=clock)
    for _ in range(4):
        budget.deposit()
    assert not budget.try_withdraw()  # 4 × 0.2 = 0.8 of a retry
    budget.deposit()
    assert budget.try_withdraw() and not budget.try_withdraw()


def test_a_zero_budget_never_retries():
    clock = Clock()
    budget = RetryBudget(retry_ratio=0.0, min_retries_per_second=0, ttl_s=1.0, clock=clock)
    for _ in range(100):
        budget.deposit()
    assert not budget.try_withdraw()


def test_updating_with_the_same_settings_keeps_the_balance_and_new_settings_start_afresh():
    clock = Clock()
    budget = RetryBudget(retry_ratio=1.0, min_retries_per_second=0, ttl_s=10.0, clock=clock)
    for _ in range(3):
        budget.deposit()
    budget.update(1.0, 0, 10.0)
    assert budget.available() == 3
    budget.update(0.5, 0, 10.0)
    assert budget.available() == 0 and budget.settings == (0.5, 0, 10.0)


def test_a_clock_jump_longer_than_the_ttl_forgets_everything():
    clock = Clock()
    budget = RetryBudget(retry_ratio=0.0, min_retries_per_second=1, ttl_s=2.0, clock=clock)
    assert budget.try_withdraw() and budget.try_withdraw() and not budget.try_withdraw()
    clock.t += 3600
    assert budget.available() == 2


@pytest.mark.parametrize("ratio, minimum, ttl", [(-0.1, 10, 10.0), (0.2, -1, 10.0), (0.2, 10, 0.0)])
def test_nonsense_settings_are_refused(ratio, minimum, ttl):
    with pytest.raises(ValueError):
        RetryBudget(ratio, minimum, ttl)
