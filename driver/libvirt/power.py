"""Clean shutdown the way an operator would do it by hand.

Ask the guest to shut down (ACPI), poll once a second, ask again every
``retry_interval`` seconds, and report whether it stopped within
``timeout`` seconds. The caller destroys it if not.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger(__name__)


def clean_shutdown(is_off: Callable[[], bool], signal: Callable[[], None], timeout: int, retry_interval: int,
                   sleep: Callable[[float], None] = time.sleep) -> bool:
    """True if the guest powered off by itself within ``timeout`` seconds."""
    if is_off():
        return True
    signal()
    countdown = retry_interval
    for second in range(timeout):
        if is_off():
            log.info("guest shut down cleanly after %d s", second)
            return True
        if retry_interval and countdown <= 0:
            signal()
            countdown = retry_interval
        countdown -= 1
        sleep(1)
    return is_off()
