"""A bandwidth limit shared by all streams of one copy."""

from __future__ import annotations

import threading
import time
from typing import Callable


class RateLimit:
    """Reserve ``n`` bytes of a ``rate`` bytes/s budget, sleeping as needed.

    Each caller reserves the next free slot and sleeps until it starts, so
    the average over all threads stays at ``rate``. Clock and sleep are
    injectable for tests.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._next = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = self._clock()
            start = max(self._next, now)
            self._next = start + n / self.rate
        if start > now:
            self._sleep(start - now)
