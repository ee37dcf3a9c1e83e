"""Reading a posted HTML form (application/x-www-form-urlencoded) and its typed fields.

The dashboard's forms are small and hold no files, so the standard
library's parser does; a body past ``MAX_BODY`` is refused unread.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping

from fastapi import Request

from ..errors import BadRequest

MAX_BODY = 64 * 1024
FORM_TYPE = "application/x-www-form-urlencoded"


async def posted_form(request: Request) -> dict[str, str]:
    """The request's form fields, the last value of each name winning.

    :raises BadRequest: another content type, a body past MAX_BODY, or text that is not UTF-8.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in (FORM_TYPE, ""):
        raise BadRequest(reason=f"expected a form ({FORM_TYPE}), got {kind}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadRequest(reason=f"form larger than {MAX_BODY} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(reason="form is not UTF-8") from None
    return dict(urllib.parse.parse_qsl(text, keep_blank_values=True))


def checkbox(form: Mapping[str, str], name: str) -> bool:
    """A checkbox sends its field only when ticked."""
    return name in form


def text(form: Mapping[str, str], name: str) -> str | None:
    """A text field, stripped; None when empty or absent."""
    return form.get(name, "").strip() or None


def integer(form: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """A whole number field within [low, high]; ``default`` when empty.

    :raises BadRequest: not a number, or out of range.
    """
    raw = form.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(reason=f"{name} must be a whole number, not {raw!r}") from None
    if not low <= value <= high:
        raise BadRequest(reason=f"{name} must be from {low} to {high}, not {value}")
    return value
