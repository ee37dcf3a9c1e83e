"""Server-side rendering: the Jinja environment, what every page gets, and flash messages."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse

from ..config import UserConfig
from . import csrf
from .auth import ADMIN
from .formatting import FILTERS

TEMPLATES = Path(__file__).parent / "templates"
_FLASH = "flash"


def environment() -> jinja2.Environment:
    # Autoescape everything: host names, reasons and error messages come from agents and users.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(FILTERS)
    return env


def base(request: Request) -> str:
    """Where the dashboard is mounted (``/ui``): every link and redirect starts with it."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def flash(session: MutableMapping[str, Any], kind: str, text: str) -> None:
    """A message for the next page shown: ``kind`` is ok or error."""
    session[_FLASH] = [kind, text]


def redirect(request: Request, path: str) -> RedirectResponse:
    """303 to a dashboard path: the browser follows a POST's answer with a GET."""
    return RedirectResponse(base(request) + path, status_code=303)


class Renderer:
    """Renders a template with the context every page needs."""

    def __init__(self) -> None:
        self.env = environment()

    def page(self, request: Request, template: str, user: UserConfig | None, /, status: int = 200,
             **context: Any) -> HTMLResponse:
        """``template`` rendered for ``user`` (None: nobody logged in) with ``context``."""
        session = request.session
        shown = session.pop(_FLASH, None)
        html = self.env.get_template(template).render(
            base=base(request), user=user, is_admin=user is not None and user.role == ADMIN,
            csrf_field=csrf.FIELD, csrf_token=csrf.token(session), flash=shown, **context)
        return HTMLResponse(html, status_code=status)
