"""CSRF protection: a random token kept in the signed session and echoed by every form.

Another site can make a logged-in browser POST to the dashboard, but it
cannot read the page, so it cannot know the token the form carries. The
session cookie is also SameSite=Strict; the token is what the server checks.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping, MutableMapping
from typing import Any

FIELD = "csrf_token"   # the form field every state-changing form carries
_KEY = "csrf"          # where the session keeps it


def token(session: MutableMapping[str, Any]) -> str:
    """The session's token, made on first use (a login form needs one before anyone logs in)."""
    current = session.get(_KEY)
    if not isinstance(current, str) or not current:
        current = session[_KEY] = secrets.token_urlsafe(32)
    return current


def rotate(session: MutableMapping[str, Any]) -> str:
    """A new token: at login, so that a token seen before it is worth nothing after."""
    session[_KEY] = secrets.token_urlsafe(32)
    return str(session[_KEY])


def valid(session: Mapping[str, Any], form: Mapping[str, str]) -> bool:
    """Whether ``form`` carries the session's token; False when either is missing."""
    expected = session.get(_KEY)
    sent = form.get(FIELD)
    if not isinstance(expected, str) or not expected or not sent:
        return False
    return hmac.compare_digest(expected.encode(), sent.encode())
