"""The dashboard as an app of its own, mounted on the controller's app at ``/ui``.

It shares the controller's conductor, drainer and store, so a page shows
what the /v1 API shows and an action does what the API call does; the
/v1 API itself is not touched (its bearer token, its JSON errors).
"""

from __future__ import annotations

import logging
import secrets
import urllib.parse
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.sessions import SessionMiddleware

from ..conductor import Conductor
from ..config import ControllerConfig
from ..drain import Drainer
from ..errors import ControllerError
from ..store import Store
from . import actions, pages
from .auth import Forbidden, LoginRequired, Users
from .context import Dashboard
from .headers import SecurityHeaders
from .render import Renderer, base, redirect

log = logging.getLogger(__name__)

PREFIX = "/ui"
COOKIE = "coldferry_session"
STATIC = Path(__file__).parent / "static"


def _is_api(request: Request) -> bool:
    return request.url.path.startswith(base(request) + "/api/")


def _here(request: Request) -> str:
    """The request's path and query inside the dashboard, to come back to after the login."""
    path = request.url.path
    root = base(request)
    inner = path[len(root):] if path.startswith(root) else path
    return inner + ("?" + request.url.query if request.url.query else "")


def create_dashboard(d: Dashboard, secret: str, max_age: int, cookie_path: str = PREFIX,
                     secure_cookie: bool = False) -> FastAPI:
    """The dashboard app: pages, actions, static files, the signed session and its errors.

    :param secure_cookie: mark the session cookie ``Secure`` on every answer; without it,
        on answers to https requests only.
    """
    web = FastAPI(title="coldferry dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    def error_page(request: Request, status: int, title: str, message: str) -> Response:
        if _is_api(request):
            return JSONResponse({"detail": message}, status_code=status)
        return d.renderer.page(request, "error.html", d.users.current(request.session), status=status,
                               title=title, message=message)

    @web.exception_handler(LoginRequired)
    async def _login(request: Request, exc: LoginRequired) -> Response:
        if request.method == "GET" and not _is_api(request):
            return redirect(request, "/login?" + urllib.parse.urlencode({"next": _here(request)}))
        return error_page(request, 401, "Log in first", "your session has ended or you have not logged in")

    @web.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return error_page(request, 403, "Not allowed", exc.reason)

    @web.exception_handler(ControllerError)
    async def _refused(request: Request, exc: ControllerError) -> Response:
        return error_page(request, exc.status, "Refused" if exc.status < 500 else "Error", str(exc))

    @web.exception_handler(RequestValidationError)
    async def _malformed(request: Request, exc: RequestValidationError) -> Response:
        return error_page(request, 400, "Bad request", "the address or form is malformed")

    web.include_router(pages.router(d))
    web.include_router(actions.router(d))
    web.mount("/static", StaticFiles(directory=STATIC), name="static")
    # Outermost last: the headers wrap everything, the session is there for every route.
    web.add_middleware(SessionMiddleware, secret_key=secret, session_cookie=COOKIE, max_age=max_age,
                       path=cookie_path, same_site="strict")
    web.add_middleware(SecurityHeaders, secure_cookies=secure_cookie)
    return web


def mount_dashboard(app: FastAPI, conductor: Conductor, drainer: Drainer, store: Store,
                    config: ControllerConfig) -> FastAPI:
    """Mount the dashboard on the controller's ``app`` at PREFIX, with ``/`` leading to it.

    :param config: its ``users``, ``session_secret`` (a random one per start when None) and
        ``session_max_age`` are used. Sessions are kept in this process: a restart ends them.
    :returns: the dashboard app.
    """
    if not config.users:
        log.warning("dashboard at %s/ has no users: add [[users]] to the controller configuration "
                    "(python -m controller.web.password_hash makes a password_hash)", PREFIX)
    secret = config.session_secret or secrets.token_urlsafe(32)
    d = Dashboard(conductor, drainer, store, Users(config.users, max_age=config.session_max_age), Renderer())
    # Served over TLS by the controller itself: every cookie is Secure, whatever a proxy reports.
    web = create_dashboard(d, secret, config.session_max_age, secure_cookie=config.tls is not None)

    async def to_dashboard() -> RedirectResponse:
        return RedirectResponse(PREFIX + "/", status_code=307)

    app.add_api_route("/", to_dashboard, include_in_schema=False)
    app.mount(PREFIX, web, name="dashboard")
    return web
