"""Errors in Nova's shape: ``{"badRequest": {"message": ..., "code": 400}}``, so that the
OpenStack clients print coldferry's message.

The routes raise the controller's own errors (controller/errors.py); each answers
with its status under Nova's name for that status.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from agent.app import validation_reason

from ..errors import ControllerError

# Nova's fault names by status (nova/api/openstack/wsgi.py); any other status is a computeFault.
_FAULTS = {400: "badRequest", 401: "unauthorized", 403: "forbidden", 404: "itemNotFound", 405: "badMethod",
           406: "notAcceptable", 409: "conflictingRequest", 413: "overLimit", 415: "badMediaType",
           429: "overLimit", 501: "notImplemented", 503: "serviceUnavailable"}


class NovaError(ControllerError):
    """A refusal in Nova's own words, its status given with the raise: ``NovaError(status=406,
    reason="Version 2.99 is not supported by the API. ...")``."""

    msg = "{reason}"


def fault(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """One error answer in Nova's shape."""
    return JSONResponse({_FAULTS.get(status, "computeFault"): {"message": message, "code": status}},
                        status_code=status, headers=headers)


def unauthorized() -> JSONResponse:
    """The answer to a request without the controller's token."""
    return fault(401, "The request you have made requires authentication: send the controller's token as "
                      "X-Auth-Token (or Authorization: Bearer)", {"WWW-Authenticate": 'Keystone uri="none"'})


def add_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` in Nova's shape: the controller's errors, malformed
    requests (400, never 422), unknown paths (404) and methods (405)."""

    @app.exception_handler(ControllerError)
    async def _controller(request: Request, exc: ControllerError) -> JSONResponse:
        return fault(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        return fault(400, "Invalid input for field/attribute: " + validation_reason(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = "The resource could not be found." if exc.status_code == 404 else str(exc.detail)
        return fault(exc.status_code, message, dict(exc.headers) if exc.headers else None)
