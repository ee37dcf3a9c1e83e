"""Who is logged in and what they may do: users from the configuration, roles, the login session.

The signed session cookie holds only the user's name and the CSRF token;
the role is looked up in the configuration on every request, so removing a
user or demoting one to reader takes effect on their next click.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request

from ..config import UserConfig
from . import csrf
from .forms import posted_form
from .passwords import hash_password, verify_password

log = logging.getLogger(__name__)

ADMIN = "admin"
_USER_KEY = "user"


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
    """The configured dashboard users by name."""

    def __init__(self, users: Iterable[UserConfig]) -> None:
        self._by_name = {u.name: u for u in users}

    def __bool__(self) -> bool:
        return bool(self._by_name)

    def authenticate(self, name: str, password: str) -> UserConfig | None:
        """The user if ``password`` is theirs, else None."""
        user = self._by_name.get(name)
        ok = verify_password(password, user.password_hash if user else _decoy())
        return user if ok and user is not None else None

    def current(self, session: MutableMapping[str, Any]) -> UserConfig | None:
        """The session's user, if it names one still configured."""
        name = session.get(_USER_KEY)
        return self._by_name.get(name) if isinstance(name, str) else None


def log_in(session: MutableMapping[str, Any], user: UserConfig) -> None:
    """Start ``user``'s session: anything from before the login (a flash, the token) is dropped."""
    session.clear()
    session[_USER_KEY] = user.name
    csrf.rotate(session)


def log_out(session: MutableMapping[str, Any]) -> None:
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
