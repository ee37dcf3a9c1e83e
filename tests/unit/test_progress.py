"""Progress reports: throttled callbacks, rate and ETA, on a fake clock."""

from __future__ import annotations

import pytest

from transfer.progress import Progress, ProgressMeter


class Clock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def calls():
    return []


def test_first_add_reports_then_calls_are_throttled(clock, calls):
    meter = ProgressMeter(1000, calls.append, interval=1.0, clock=clock)
    clock.now += 0.1
    meter.add(10)
    assert [p.done for p in calls] == [10]
    clock.now += 0.5
    meter.add(10)
    clock.now += 0.4999
    meter.add(10)
    assert len(calls) == 1  # less than a second since the last report
    clock.now += 0.0001
    meter.add(10)
    assert [p.done for p in calls] == [10, 40]
    clock.now += 0.2
    meter.add(10)
    assert len(calls) == 2
    clock.now += 5
    meter.add(10)
    assert [p.done for p in calls] == [10, 40, 60]


def test_rate_and_eta(clock):
    meter = ProgressMeter(1000, None, clock=clock)
    clock.now += 2.0
    meter.add(200)
    snap = meter.snapshot()
    assert snap == Progress(done=200, total=1000, rate=pytest.approx(100.0), eta=pytest.approx(8.0))
    assert snap.fraction == pytest.approx(0.2)


def test_eta_is_unknown_before_any_data(clock):
    meter = ProgressMeter(1000, None, clock=clock)
    clock.now += 3
    snap = meter.snapshot()
    assert snap.rate == 0
    assert snap.eta is None


def test_eta_is_zero_when_done_and_never_negative(clock):
    meter = ProgressMeter(100, None, clock=clock)
    clock.now += 1
    meter.add(150)  # more than announced (e.g. a resent block)
    snap = meter.snapshot()
    assert snap.eta == 0
    assert snap.fraction == 1.0


def test_no_elapsed_time_does_not_divide_by_zero(clock):
    meter = ProgressMeter(100, None, clock=clock)
    meter.add(10)
    snap = meter.snapshot()
    assert snap.rate > 0
    assert snap.eta is not None and snap.eta >= 0


def test_finish_always_calls_back(clock, calls):
    meter = ProgressMeter(100, calls.append, interval=10.0, clock=clock)
    meter.add(50)
    clock.now += 1
    meter.add(50)  # throttled
    assert len(calls) == 1
    final = meter.finish()
    assert len(calls) == 2
    assert calls[-1] is final
    assert final.done == 100 and final.fraction == 1.0


def test_finish_without_callback_returns_the_snapshot(clock):
    meter = ProgressMeter(0, None, clock=clock)
    clock.now += 1
    snap = meter.finish()
    assert snap == Progress(0, 0, 0.0, None)


@pytest.mark.parametrize("done, total, fraction", [
    (0, 0, 1.0),      # nothing to send is complete
    (5, 0, 1.0),
    (0, 10, 0.0),
    (5, 10, 0.5),
    (20, 10, 1.0),    # capped
])
def test_fraction(done, total, fraction):
    assert Progress(done, total, 0.0, None).fraction == fraction
