"""Login throttling: after a few failed logins for a name or from an address, refuse for a while.

Each key (a user name, a client address) counts its failed logins. From
``limit`` failures on, every further failure refuses that key for a delay
that doubles each time, up to ``max_delay``; a key with no failure for
``window`` seconds (and not refused) starts again from nothing. A refused
attempt is not checked at all, so guessing costs no password hashing either.

In memory: one controller process, forgotten on restart.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass
class _Record:
    failures: int
    last: float          # the clock at the last failure
    until: float = 0.0   # refused until this clock reading


class LoginThrottle:
    """Counts failed logins per key and says how long a key must wait.

    :param limit: failures (within ``window`` of each other) before the first refusal.
    :param window: seconds without a failure after which a key is forgotten.
    :param delay: seconds of the first refusal; each further failure doubles it.
    :param max_delay: the longest refusal, in seconds.
    :param max_keys: keys kept at most; past it the longest quiet ones are dropped.
    :param clock: monotonic seconds.
    """

    def __init__(self, limit: int = 5, window: float = 900.0, delay: float = 30.0, max_delay: float = 3600.0,
                 max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.delay = delay
        self.max_delay = max_delay
        self.max_keys = max_keys
        self.clock = clock
        self._records: dict[Hashable, _Record] = {}

    def wait(self, *keys: Hashable) -> int:
        """Whole seconds until an attempt for all ``keys`` is allowed; 0 when it is now."""
        now = self.clock()
        left = max((r.until - now for k in keys if (r := self._records.get(k)) is not None), default=0.0)
        return max(0, math.ceil(left))

    def failed(self, *keys: Hashable) -> None:
        """Count a failed login for each of ``keys``."""
        now = self.clock()
        for key in keys:
            r = self._records.get(key)
            if r is None or self._forgotten(r, now):
                r = self._records[key] = _Record(0, now)
            r.failures += 1
            r.last = now
            if r.failures >= self.limit:
                r.until = now + min(self.max_delay, self.delay * 2 ** (r.failures - self.limit))
        if len(self._records) > self.max_keys:
            self._prune(now)

    def succeeded(self, key: Hashable) -> None:
        """Forget ``key``'s failures (the user name that just logged in)."""
        self._records.pop(key, None)

    def _forgotten(self, r: _Record, now: float) -> bool:
        return now - r.last > self.window and now >= r.until

    def _prune(self, now: float) -> None:
        self._records = {k: r for k, r in self._records.items() if not self._forgotten(r, now)}
        if len(self._records) > self.max_keys:
            # Still full (many addresses at once): keep the most recently active half.
            keep = sorted(self._records.items(), key=lambda kv: kv[1].last)[-(self.max_keys // 2):]
            self._records = dict(keep)
