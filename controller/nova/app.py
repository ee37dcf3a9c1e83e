"""The compute API at /v2.1: an app of its own, mounted beside /v1 on the controller's app.

It translates, and keeps no state of its own: every route calls the same
conductor, store and inventory as /v1. The token is the controller's, sent as
``X-Auth-Token`` (what the OpenStack clients send with ``admin_token`` auth)
or ``Authorization: Bearer``; it is checked, and the microversion read, before
anything else about a request. The version document needs no token, as Nova's.
"""

from __future__ import annotations

import hmac
from typing import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from ..conductor import Conductor
from ..errors import ControllerError
from . import hypervisors, migrations, servers, services
from .errors import add_handlers, fault, unauthorized
from .versions import PREFIX, echo_headers, requested, version_doc


def create_nova_app(conductor: Conductor, token: str) -> FastAPI:
    """The /v2.1 app over ``conductor`` (its inventory and store), accepting ``token``."""
    app = FastAPI(title="coldferry compute API (Nova's /v2.1 subset)", version="2.1", openapi_url=None,
                  docs_url=None, redoc_url=None)
    add_handlers(app)
    expected = token.encode()

    @app.middleware("http")
    async def _auth_and_version(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path.rstrip("/") == request.scope.get("root_path", "").rstrip("/"):
            return await call_next(request)   # the version document
        if not _token_ok(request, expected):
            return unauthorized()
        try:
            request.state.version = version = requested(request)
        except ControllerError as e:
            return fault(e.status, str(e))
        answer = await call_next(request)
        answer.headers.update(echo_headers(version))
        return answer

    app.add_api_route("/", version_doc)

    app.include_router(servers.router(conductor))
    app.include_router(migrations.router(conductor.store))
    app.include_router(services.router(conductor.inventory, conductor.store))
    app.include_router(hypervisors.router(conductor.inventory, conductor.store))
    return app


def mount_nova(app: FastAPI, conductor: Conductor, token: str) -> FastAPI:
    """Mount the compute API on the controller's ``app`` at PREFIX (``PREFIX`` itself, without
    the slash, answers the version document too); returns the mounted app."""
    nova = create_nova_app(conductor, token)
    app.add_api_route(PREFIX, version_doc, include_in_schema=False)
    app.mount(PREFIX, nova, name="nova")
    return nova


def _token_ok(request: Request, expected: bytes) -> bool:
    """``X-Auth-Token: <token>`` or ``Authorization: Bearer <token>``, compared in constant time."""
    given = request.headers.get("x-auth-token")
    if given is None:
        scheme, _, rest = request.headers.get("authorization", "").partition(" ")
        given = rest.strip() if scheme.lower() == "bearer" else ""
    return hmac.compare_digest(given.encode(), expected)
