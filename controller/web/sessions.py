"""The dashboard's logged-in sessions, kept in the controller.

The signed cookie names a session by a random id and nothing else about
the login; the table says whose it is. Logging out deletes the entry, so a
copy of the cookie (stolen, or replayed from before the logout) is worth
nothing afterwards, even though its signature is still good. A session
also ends after ``max_age`` seconds without a request, and when the
controller restarts (in memory: one controller process).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Entry:
    user: str
    seen: float


class SessionTable:
    """Session id -> user name, for sessions used within the last ``max_age`` seconds.

    :param max_age: idle seconds after which a session ends.
    :param clock: monotonic seconds.
    """

    def __init__(self, max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self.clock = clock
        self._entries: dict[str, _Entry] = {}

    def open(self, user: str) -> str:
        """A new session of ``user``; its id, for the cookie."""
        now = self.clock()
        self._entries = {k: e for k, e in self._entries.items() if now - e.seen <= self.max_age}
        sid = secrets.token_urlsafe(32)
        self._entries[sid] = _Entry(user, now)
        return sid

    def user(self, sid: object) -> str | None:
        """Whose session ``sid`` is (and it counts as used now); None when it is not open."""
        entry = self._entries.get(sid) if isinstance(sid, str) else None
        now = self.clock()
        if entry is None or now - entry.seen > self.max_age:
            return None
        entry.seen = now
        return entry.user

    def close(self, sid: object) -> None:
        if isinstance(sid, str):
            self._entries.pop(sid, None)
