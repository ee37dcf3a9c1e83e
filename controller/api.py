"""The controller's HTTP API (docs/api.md): servers, migrations, hypervisors, services, drains.

Request bodies are strict and closed, as the agent's are. The token is
checked before anything about the request is said; the OpenAPI document
declares every error status a route answers (the helpers are the agent's).
"""

from __future__ import annotations

import datetime as dt
import hmac
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.app import bearer_ok, document_400_not_422, errors, validation_reason

from .conductor import Conductor
from .drain import Drainer
from .errors import BadRequest, ControllerError
from .records import MigrationStatus, MigrationType
from .store import Store


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MigrateArgs(_Body):
    host: str | None = None
    force: bool = False


class LiveArgs(_Body):
    host: str | None = None
    force: bool = False
    block_migration: bool | Literal["auto"] = "auto"


class ServerAction(BaseModel):
    """Exactly one action, Nova's way: ``{"migrate": {...}}``, ``{"confirmResize": null}``, ..."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    migrate: MigrateArgs | None = None
    confirmResize: None = None
    revertResize: None = None
    migrate_live: LiveArgs | None = Field(None, alias="os-migrateLive")

    @model_validator(mode="before")
    @classmethod
    def _one_action(cls, data: Any) -> Any:
        actions = ("migrate", "os-migrateLive", "confirmResize", "revertResize")
        if not isinstance(data, dict) or len(data) != 1 or next(iter(data)) not in actions:
            got = ", ".join(map(repr, data)) if isinstance(data, dict) and data else "nothing"
            raise ValueError(f"the body must name exactly one action, one of {', '.join(actions)}; got {got}")
        return data


class ServiceUpdate(_Body):
    status: Literal["enabled", "disabled"]
    disabled_reason: str | None = Field(None, max_length=255)


class DrainArgs(_Body):
    live: bool = False
    max_servers: int = Field(1, ge=1, le=64)
    dry_run: bool = False
    target_host: str | None = None
    force: bool = False


def _bearer(token: str) -> Any:
    scheme = HTTPBearer(auto_error=False)

    def check(creds: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise _Unauthorized()
    return check


class _Unauthorized(Exception):
    pass


def create_app(conductor: Conductor, drainer: Drainer, store: Store, token: str) -> FastAPI:
    """The controller's FastAPI app; every route needs ``Authorization: Bearer <token>``."""
    app = FastAPI(title="coldferry controller", version="1",
                  description="Cold and live migration of servers between KVM hosts, host drain.")
    inv = conductor.inventory
    document_400_not_422(app)

    @app.exception_handler(RequestValidationError)
    async def _bad(request: Request, exc: RequestValidationError) -> JSONResponse:
        if not bearer_ok(request, token.encode()):
            return await _unauth(request, _Unauthorized())
        return JSONResponse({"detail": "malformed request: " + validation_reason(exc.errors())}, status_code=400)

    @app.exception_handler(ControllerError)
    async def _ctl(request: Request, exc: ControllerError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(_Unauthorized)
    async def _unauth(request: Request, exc: _Unauthorized) -> JSONResponse:
        return JSONResponse({"detail": "missing or wrong token: send 'Authorization: Bearer <token>' with "
                                       "the controller's token"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    api = APIRouter(prefix="/v1", dependencies=[Depends(_bearer(token))], responses=errors(401))

    @api.get("/servers", responses=errors(404, 409))
    def list_servers(host: str | None = None) -> dict[str, Any]:
        return {"servers": [s.to_api() for s in inv.servers(host=host)]}

    @api.get("/servers/{server}", responses=errors(404, 409))
    def show_server(server: str) -> dict[str, Any]:
        return inv.find(server).to_api()

    @api.post("/servers/{server}/action", status_code=status.HTTP_202_ACCEPTED, responses=errors(404, 409, 502))
    def server_action(server: str, body: ServerAction) -> dict[str, Any]:
        sent = body.model_fields_set
        if "migrate" in sent:
            args = body.migrate or MigrateArgs()
            m = conductor.migrate(server, args.host, args.force)
        elif "migrate_live" in sent:
            largs = body.migrate_live or LiveArgs()
            m = conductor.migrate(server, largs.host, largs.force, live=True)
        elif "confirmResize" in sent:
            m = conductor.confirm(conductor.open_migration(server).id)
        else:
            m = conductor.revert(conductor.open_migration(server).id)
        return {"migration": m.to_api()}

    @api.get("/os-hosts/{host}/check-destination", responses=errors(404, 409, 502))
    def check_destination(host: str, server: str) -> dict[str, Any]:
        return conductor.check_destination(server, host)

    @api.get("/os-migrations")
    def list_migrations(host: str | None = None, status: str | None = None, server: str | None = None,
                        migration_type: MigrationType | None = None,
                        changes_since: str | None = Query(None, alias="changes-since")) -> dict[str, Any]:
        since = _parse_time(changes_since) if changes_since else None
        if status is not None and status not in set(MigrationStatus):
            raise BadRequest(reason=f"unknown status {status!r}; one of {', '.join(MigrationStatus)}")
        found = store.list_migrations(host=host, status=None if status is None else MigrationStatus(status),
                                      server=server, migration_type=migration_type, changes_since=since)
        return {"migrations": [m.to_api() for m in found]}

    finish = errors(404, 409, 502)

    @api.get("/os-migrations/{migration_id}", responses=errors(404))
    def show_migration(migration_id: int) -> dict[str, Any]:
        return conductor.get(migration_id).to_api()

    @api.post("/os-migrations/{migration_id}/confirm", status_code=status.HTTP_202_ACCEPTED, responses=finish)
    def confirm(migration_id: int) -> dict[str, Any]:
        return conductor.confirm(migration_id).to_api()

    @api.post("/os-migrations/{migration_id}/revert", status_code=status.HTTP_202_ACCEPTED, responses=finish)
    def revert(migration_id: int) -> dict[str, Any]:
        return conductor.revert(migration_id).to_api()

    @api.post("/os-migrations/{migration_id}/recover", status_code=status.HTTP_202_ACCEPTED, responses=finish)
    def recover(migration_id: int) -> dict[str, Any]:
        return conductor.recover(migration_id).to_api()

    @api.get("/os-hypervisors")
    def hypervisors() -> dict[str, Any]:
        return {"hypervisors": inv.hypervisors()}

    @api.get("/os-hypervisors/{host}", responses=errors(404))
    def hypervisor(host: str) -> dict[str, Any]:
        return inv.hypervisor(inv.host_record(host))

    @api.put("/os-services/{host}", responses=errors(404))
    def set_service(host: str, body: ServiceUpdate) -> dict[str, Any]:
        inv.host_record(host)
        enabled = body.status == "enabled"
        reason = None if enabled else (body.disabled_reason or "").strip() or None
        return inv.hypervisor(store.set_service(host, enabled, reason))

    @api.post("/os-hypervisors/{host}/drain", status_code=status.HTTP_202_ACCEPTED,
              responses={200: {"description": "a dry run: the rows planned, nothing moved"},
                         **errors(404, 409)})
    def drain(host: str, body: DrainArgs) -> JSONResponse:
        d = drainer.start(host, body.live, body.max_servers, body.dry_run, body.target_host, body.force)
        return JSONResponse(drainer.to_api(d), status_code=200 if d.dry_run else 202)

    @api.get("/drains")
    def drains() -> dict[str, Any]:
        return {"drains": [drainer.to_api(d) for d in store.list_drains()]}

    @api.get("/drains/{drain_id}", responses=errors(404))
    def show_drain(drain_id: int) -> dict[str, Any]:
        return drainer.to_api(drainer.get(drain_id))

    app.include_router(api)
    return app


def _parse_time(text: str) -> dt.datetime:
    """changes-since as an aware UTC time; a time without a zone is taken as UTC.

    :raises BadRequest: not ISO 8601, or a time that is not within years 1 to 9999 in UTC.
    """
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(reason=f"changes-since: {text!r} is not an ISO 8601 time "
                                "(e.g. 2026-11-23T11:40:00Z)") from None
    try:
        return t.astimezone(dt.timezone.utc) if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
    except OverflowError:
        raise BadRequest(reason=f"changes-since: {text!r} is out of range (years 1 to 9999 in UTC)") from None
