"""Clean shutdown the way an operator would do it by hand.

Ask the guest to shut down (ACPI), look four times a second whether it
stopped, ask again every ``retry_interval`` seconds, and report whether it
stopped within ``timeout`` seconds. The caller destroys it if not. A
migration's downtime is counted from the moment the guest is seen off, so
it misses at most one poll (0.25 s).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger(__name__)

#: Seconds between two looks at the guest; a power of two, so that the ticks add up exactly.
POLL = 0.25
TICKS = round(1 / POLL)  # looks per second


def clean_shutdown(is_off: Callable[[], bool], signal: Callable[[], None], timeout: int, retry_interval: int,
                   sleep: Callable[[float], None] = time.sleep) -> bool:
    """True if the guest powered off by itself within ``timeout`` seconds."""
    if is_off():
        return True
    signal()
    for tick in range(timeout * TICKS):
        if is_off():
            log.info("guest shut down cleanly after %.2f s", tick * POLL)
            return True
        if retry_interval and tick and tick % (retry_interval * TICKS) == 0:
            signal()
        sleep(POLL)
    return is_off()
