"""Progress reporting: one small record and a meter that computes rate and ETA."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Progress:
    """A snapshot of a running copy.

    ``done`` and ``total`` count data bytes to send (holes and zero runs are
    not counted: they are never sent). ``rate`` is bytes per second over the
    whole run so far; ``eta`` is seconds left, or None while unknown.
    """

    done: int
    total: int
    rate: float
    eta: float | None

    @property
    def fraction(self) -> float:
        return 1.0 if self.total == 0 else min(1.0, self.done / self.total)


ProgressCallback = Callable[[Progress], None]


class ProgressMeter:
    """Thread-safe byte counter that calls back at most every ``interval`` seconds."""

    def __init__(self, total: int, callback: ProgressCallback | None,
                 interval: float = 0.25, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.done = 0
        self._callback = callback
        self._interval = interval
        self._clock = clock
        self._start = clock()
        self._last = float("-inf")
        self._lock = threading.Lock()

    def snapshot(self) -> Progress:
        elapsed = max(self._clock() - self._start, 1e-9)
        rate = self.done / elapsed
        left = max(self.total - self.done, 0)
        eta = left / rate if rate > 0 else None
        return Progress(self.done, self.total, rate, eta)

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = self._clock()
            due = now - self._last >= self._interval
            if due:
                self._last = now
        if due and self._callback:
            self._callback(self.snapshot())

    def finish(self) -> Progress:
        snap = self.snapshot()
        if self._callback:
            self._callback(snap)
        return snap
