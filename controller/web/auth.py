"""Who is logged in and what they may do: users from the configuration, roles, the login session.

The signed session cookie holds only a session id (sessions.py) and the
CSRF token; the controller keeps whose session it is, so logging out ends
it for every copy of the cookie. The role is looked up in the configuration
on every request, so it is never taken from the cookie.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request

from ..config import UserConfig
from . import csrf
from .forms import posted_form
from .passwords import hash_password, verify_password
from .sessions import SessionTable

log = logging.getLogger(__name__)

ADMIN = "admin"
_SESSION_KEY = "sid"


class LoginRequired(Exception):
    """No valid session: a page redirects to the login, an action or JSON answers 401."""


class Forbidden(Exception):
    """A logged-in user may not do this (a reader acting, or a form without its CSRF token): 403."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Action:
    """A permitted state-changing request: who sends it and its form."""

    user: UserConfig
    form: dict[str, str]


@functools.cache
def _decoy() -> str:
    # Checked for an unknown name, so a login takes as long whether the name exists or not.
    return hash_password(secrets.token_urlsafe(16))


class Users:
    """The configured dashboard users by name, and who of them is logged in.

    :param max_age: idle seconds after which a session ends.
    :param clock: monotonic seconds, for the sessions' ages.
    """

    def __init__(self, users: Iterable[UserConfig], max_age: float = 12 * 3600,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._by_name = {u.name: u for u in users}
        self._sessions = SessionTable(max_age, clock)

    def __bool__(self) -> bool:
        return bool(self._by_name)

    def authenticate(self, name: str, password: str) -> UserConfig | None:
        """The user if ``password`` is theirs, else None."""
        user = self._by_name.get(name)
        ok = verify_password(password, user.password_hash if user else _decoy())
        return user if ok and user is not None else None

    def current(self, session: MutableMapping[str, Any]) -> UserConfig | None:
        """The session's user: the cookie names an open session of a user still configured."""
        name = self._sessions.user(session.get(_SESSION_KEY))
        return None if name is None else self._by_name.get(name)

    def log_in(self, session: MutableMapping[str, Any], user: UserConfig) -> None:
        """Start ``user``'s session: anything from before the login (a flash, the token) is dropped."""
        self._sessions.close(session.get(_SESSION_KEY))
        session.clear()
        session[_SESSION_KEY] = self._sessions.open(user.name)
        csrf.rotate(session)

    def log_out(self, session: MutableMapping[str, Any]) -> None:
        """End the session for good: the same cookie, sent again, is no longer logged in."""
        self._sessions.close(session.get(_SESSION_KEY))
        session.clear()


def viewer(users: Users) -> Callable[[Request], UserConfig]:
    """A dependency: the logged-in user, any role."""
    def check(request: Request) -> UserConfig:
        user = users.current(request.session)
        if user is None:
            raise LoginRequired()
        return user
    return check


def action(users: Users, admin_only: bool = True) -> Callable[..., Awaitable[Action]]:
    """A dependency for a POST: a logged-in user (an admin unless ``admin_only`` is False)
    whose form carries the session's CSRF token."""
    async def check(request: Request, form: dict[str, str] = Depends(posted_form)) -> Action:
        user = users.current(request.session)
        if user is None:
            raise LoginRequired()
        if admin_only and user.role != ADMIN:
            log.warning("dashboard: reader %s tried %s %s", user.name, request.method, request.url.path)
            raise Forbidden(f"{user.name} is a reader: only an admin may change anything")
        if not csrf.valid(request.session, form):
            log.warning("dashboard: %s %s by %s without a valid CSRF token", request.method, request.url.path,
                        user.name)
            raise Forbidden("the form's security token is missing or out of date: reload the page and "
                            "try again")
        return Action(user, form)
    return check
