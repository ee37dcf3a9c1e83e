"""Clean shutdown the way an operator would do it by hand.

Ask the guest to shut down (ACPI), look 32 times a second whether it
stopped, ask again every ``retry_interval`` seconds, and report whether it
stopped within ``timeout`` seconds. The caller destroys it if not. A
migration's downtime runs from the moment the guest is seen off and
everything after the shutdown waits for that moment, so a look costs little
(one libvirt call, well under a millisecond) and a coarse poll would cost
every migration of a running guest up to a whole interval: at most 1/32 s
is lost here.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger(__name__)

#: Seconds between two looks at the guest; a power of two, so that the ticks add up exactly.
POLL = 1 / 32
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
