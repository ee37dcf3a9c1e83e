"""The controller's errors; each carries the HTTP status the API answers with."""

from __future__ import annotations

from typing import Any

from transfer.errors import TemplateError


class ControllerError(TemplateError):
    status = 500
    msg = "controller error: {reason}"


class BadRequest(ControllerError):
    status = 400
    msg = "{reason}"


class NotFound(ControllerError):
    status = 404
    msg = "{what} {name} not found{hint}"

    def __init__(self, what: str, name: Any, hint: str = "") -> None:
        super().__init__(what=what, name=name, hint=hint)


class Conflict(ControllerError):
    status = 409
    msg = "{reason}"


class NoValidHost(ControllerError):
    status = 400
    msg = "no valid host for server {server}: {reason}"


class AgentError(ControllerError):
    """An agent could not be reached or answered with an error.

    ``status`` is what the controller's API answers: 502 (the agent is at fault)
    unless a raise passes the agent's own 4xx through. ``agent_status`` is the
    code the agent answered with, None when it did not answer.
    """

    status: int = 502
    agent_status: int | None = None
    host: str
    reason: str
    msg = "agent of host {host}: {reason}"


class AgentUnreachable(AgentError):
    """The agent did not answer at all (a transport error or a timeout, after the retries):
    what it would have said is unknown, unlike an answer with an error code."""
