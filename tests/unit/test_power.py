"""Clean shutdown: signal, poll 32 times a second, signal again every retry_interval, give up at timeout."""

from __future__ import annotations

import pytest

from driver.libvirt import power


class Guest:
    """A guest that powers off ``takes`` seconds after the first signal (None: never)."""

    def __init__(self, takes: float | None, off: bool = False) -> None:
        self.takes = takes
        self.now = 0.0
        self.off_at: float | None = 0.0 if off else None
        self.signals: list[float] = []
        self.sleeps: list[float] = []

    def is_off(self) -> bool:
        return self.off_at is not None and self.now >= self.off_at

    def signal(self) -> None:
        self.signals.append(self.now)
        if self.takes is not None and self.off_at is None:
            self.off_at = self.now + self.takes

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def shutdown(self, timeout: int, retry_interval: int) -> bool:
        return power.clean_shutdown(self.is_off, self.signal, timeout, retry_interval, self.sleep)


def test_already_off_is_not_signalled():
    g = Guest(takes=0, off=True)
    assert g.shutdown(60, 10) is True
    assert g.signals == [] and g.sleeps == []


def test_guest_that_stops_at_once():
    g = Guest(takes=0)
    assert g.shutdown(60, 10) is True
    assert g.signals == [0.0] and g.sleeps == []


def test_guest_that_stops_after_a_while_polls_32_times_a_second():
    g = Guest(takes=4)
    assert g.shutdown(60, 0) is True
    assert g.signals == [0.0]
    assert g.sleeps == [1 / 32] * 128


@pytest.mark.parametrize("takes, seen", [(2.1, 2.125), (1.7, 1.71875), (0.01, 0.03125), (3.0, 3.0)])
def test_a_guest_is_seen_off_within_a_32nd_of_a_second(takes, seen):
    g = Guest(takes=takes)
    assert g.shutdown(60, 0) is True
    assert g.now == seen and g.now - takes < power.POLL


@pytest.mark.parametrize("retry_interval, signals", [
    (0, [0]), (1, [0, 1, 2, 3, 4, 5, 6]), (3, [0, 3, 6]), (7, [0]), (10, [0])])
def test_signals_again_every_retry_interval(retry_interval, signals):
    g = Guest(takes=None)
    assert g.shutdown(7, retry_interval) is False
    assert g.signals == signals
    assert g.now == 7


def test_guest_stopping_on_the_last_second_counts():
    g = Guest(takes=5)
    assert g.shutdown(5, 0) is True
    assert g.now == 5


def test_guest_stopping_after_the_timeout_does_not():
    g = Guest(takes=6)
    assert g.shutdown(5, 0) is False


def test_timeout_0_signals_once_and_answers_at_once():
    g = Guest(takes=None)
    assert g.shutdown(0, 10) is False
    assert g.signals == [0] and g.sleeps == []
