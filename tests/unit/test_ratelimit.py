"""The bandwidth limit, run against a fake clock so no test waits."""

from __future__ import annotations

import pytest

from transfer.ratelimit import RateLimit

MiB = 1 << 20


class FakeTime:
    """A clock that only moves when something sleeps (or the test advances it)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def t():
    return FakeTime()


def test_total_sleep_matches_bytes_over_rate(t):
    rate, n, count = 10 * MiB, MiB, 50
    limit = RateLimit(rate, clock=t.clock, sleep=t.sleep)
    for _ in range(count):
        limit.take(n)
    # The first take starts at once; each one after waits for its slot. The
    # last take's bytes are paid for by whoever comes next.
    assert sum(t.slept) == pytest.approx((count - 1) * n / rate, rel=1e-9)
    limit.take(1)
    assert t.now - 1000.0 == pytest.approx(count * n / rate, rel=1e-9)


def test_uneven_takes_are_charged_by_size(t):
    rate = 1000.0
    limit = RateLimit(rate, clock=t.clock, sleep=t.sleep)
    for n in (100, 500, 2500, 10):
        limit.take(n)
    assert t.slept == pytest.approx([0.1, 0.5, 2.5])


def test_time_spent_elsewhere_counts_towards_the_budget(t):
    limit = RateLimit(1000.0, clock=t.clock, sleep=t.sleep)
    limit.take(1000)   # reserves one second
    t.now += 0.75      # sending took most of it
    limit.take(1000)
    assert t.slept == pytest.approx([0.25])


def test_idle_time_is_not_saved_up_for_a_burst(t):
    limit = RateLimit(1000.0, clock=t.clock, sleep=t.sleep)
    t.now += 60        # idle for a minute
    limit.take(1000)
    limit.take(1000)
    limit.take(1000)
    # Had the idle minute been credited, 60 000 bytes could go without waiting.
    assert t.slept == pytest.approx([1.0, 1.0])


def test_fast_rate_never_sleeps_below_its_budget(t):
    limit = RateLimit(1e12, clock=t.clock, sleep=t.sleep)
    for _ in range(10):
        limit.take(1000)
        t.now += 0.001  # each send takes longer than its budget
    assert t.slept == []
