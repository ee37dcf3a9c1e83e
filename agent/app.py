"""The agent's HTTP API: one driver served to the controller (docs/api.md, section Agent).

Reads answer at once; every operation that changes an instance runs as a
background job (202 with the job) that the controller polls. All of
``/v1`` requires the agent's bearer token.

Errors: 400 for a malformed request, 401 without the token (checked before
the body is looked at), 404 for an unknown instance or job, 409 for an
instance in the wrong state, a busy instance or a job name already used for
another operation, 503 with the driver's message when the hypervisor side
failed (the agent itself is fine), and 500 only for a bug (an exception the
driver contract does not allow), with a generic message and the traceback
in the agent's log. The OpenAPI document declares these per route.

The token check, the validation message and the OpenAPI error answers are
shared with the controller's API, which imports them from here.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import asdict
from typing import Any, Awaitable, Callable

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from driver.base import ComputeDriver
from driver.errors import DriverError, InstanceNotFound, InvalidInstanceState
from driver.model import Flavor, Instance, Migration, ProgressHook, Timeline
from transfer.progress import Progress

from . import schemas as s
from .jobs import MAX_JOB_WAIT, JobConflict, JobIdTaken, JobNotFound, JobRunner, Report
from .metrics import AgentMetrics, serve_metrics

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="the agent's token from its configuration")


class _Unauthorized(Exception):
    """No token or a wrong one."""


class ErrorOut(BaseModel):
    """The body of every error answer."""

    detail: str


_MEANINGS = {
    400: "malformed request: the detail names the field and why",
    401: "missing or wrong bearer token",
    404: "no such object",
    409: "the current state forbids the request",
    502: "an agent failed or did not answer",
    503: "the host's hypervisor side failed; the detail has the driver's message",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route (or router) that answers ``codes`` besides its success."""
    return {code: {"model": ErrorOut, "description": _MEANINGS[code]} for code in codes}


def document_400_not_422(app: FastAPI) -> None:
    """Make ``app``'s OpenAPI document say 400 where FastAPI writes 422.

    FastAPI documents a 422 for every route with parameters or a body; these
    apps answer a malformed request with 400 and ``{"detail": str}`` instead
    (their RequestValidationError handler).
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()
            for item in doc["paths"].values():
                for operation in item.values():
                    answers = operation.get("responses", {})
                    if answers.pop("422", None) is not None:
                        answers["400"] = {"description": _MEANINGS[400], "content": {
                            "application/json": {"schema": ErrorOut.model_json_schema()}}}
            for unused in ("HTTPValidationError", "ValidationError"):
                doc.get("components", {}).get("schemas", {}).pop(unused, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def bearer_ok(request: Request, expected: bytes) -> bool:
    """Whether ``request`` carries ``Authorization: Bearer <expected>``.

    For the validation error handlers: FastAPI parses the body before any
    dependency runs, so a caller without the token would otherwise learn how
    its body is malformed.
    """
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and _token_ok(given.strip(), expected)


def create_app(driver: ComputeDriver, token: str, address: str, jobs: JobRunner | None = None, *,
               shutdown_timeout: int = 60, shutdown_retry_interval: int = 10,
               metrics: AgentMetrics | None = None) -> FastAPI:
    """The agent's FastAPI app serving ``driver``.

    :param token: the bearer token every request must present.
    :param address: this host's data-plane address, reported by GET /v1/host.
    :param jobs: the job runner; a new one if omitted.
    :param shutdown_timeout: clean-shutdown seconds when a request names none.
    :param shutdown_retry_interval: seconds between shutdown requests when a request names none.
    :param metrics: what ``GET /metrics`` shows (agent/metrics.py); new ones if omitted.
    :raises ValueError: the token is empty.
    """
    if not token:
        raise ValueError("the agent needs a non-empty token")
    runner = jobs if jobs is not None else JobRunner()
    expected = token.encode()

    def check_token(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if credentials is None or not _token_ok(credentials.credentials, expected):
            raise _Unauthorized()

    app = FastAPI(title="coldferry agent", version="1",
                  description="One host's hypervisor driver: inventory, power and migration jobs.")
    _add_error_handlers(app, expected)
    document_400_not_422(app)
    api = APIRouter(prefix="/v1", dependencies=[Depends(check_token)], responses=errors(401))
    _add_read_routes(api, driver, address, runner)
    metrics = metrics if metrics is not None else AgentMetrics()
    _add_job_routes(api, driver, runner, (shutdown_timeout, shutdown_retry_interval), metrics)
    app.include_router(api)
    serve_metrics(app, metrics.registry, token)
    return app


def _token_ok(given: str, expected: bytes) -> bool:
    """Constant-time comparison, so the answer's timing tells nothing about the token."""
    return hmac.compare_digest(given.encode(), expected)


def _progress(report: Report) -> ProgressHook:
    """The driver's progress hook for one job: each (file, Progress) becomes that job's progress."""
    def hook(file: str, p: Progress) -> None:
        report(s.ProgressOut.of(file, p).model_dump())
    return hook


def _add_error_handlers(app: FastAPI, expected: bytes) -> None:
    def error(status: int, detail: str, **headers: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        return error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        if not bearer_ok(request, expected):
            return await unauthorized(request, _Unauthorized())
        return error(400, validation_reason(exc.errors()))

    @app.exception_handler(DriverError)
    async def driver_error(request: Request, exc: DriverError) -> JSONResponse:
        status = 404 if isinstance(exc, InstanceNotFound) else 409 if isinstance(exc, InvalidInstanceState) else 503
        if status == 503:
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return error(status, str(exc))

    async def conflict(request: Request, exc: Exception) -> JSONResponse:
        return error(409, str(exc))

    app.add_exception_handler(JobConflict, conflict)
    app.add_exception_handler(JobIdTaken, conflict)

    @app.exception_handler(JobNotFound)
    async def no_job(request: Request, exc: JobNotFound) -> JSONResponse:
        return error(404, str(exc))

    @app.middleware("http")
    async def bug(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # Every expected failure has its handler above; what still escapes is a bug. Caught
        # here rather than by an Exception handler, which Starlette re-raises to the server.
        try:
            return await call_next(request)
        except Exception:
            log.exception("%s %s failed with an unexpected error", request.method, request.url.path)
            return error(500, "internal error in the agent (a bug); the agent's log has the traceback")


def validation_reason(errors: Any) -> str:
    """One readable line from pydantic's errors, each naming its field (``body.flavor.vcpus: ...``)."""
    reasons = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ())]
        if e.get("type") == "json_invalid":
            why = (e.get("ctx") or {}).get("error", "")
            reasons.append(f"the body is not valid JSON ({why} at character {loc[-1]})" if why
                           else "the body is not valid JSON")
        elif e.get("type") == "model_attributes_type" and loc == ["body"]:
            reasons.append("the body must be a JSON object (Content-Type: application/json)")
        else:
            reasons.append(f"{'.'.join(loc) or 'request'}: {e.get('msg', 'invalid')}")
    return "; ".join(reasons) or "malformed request"


def _add_read_routes(api: APIRouter, driver: ComputeDriver, address: str, runner: JobRunner) -> None:
    @api.get("/host", response_model=s.HostOut, responses=errors(503),
             summary="this host's resources and data-plane address")
    def host() -> dict[str, Any]:
        return {**asdict(driver.host_resources()), "address": address}

    @api.get("/instances", response_model=s.InstancesOut, responses=errors(503),
             summary="every instance defined here")
    def instances() -> dict[str, Any]:
        return {"instances": [s.InstanceOut.of(i) for i in driver.list_instances()]}

    @api.get("/instances/{uuid}", response_model=s.InstanceOut, responses=errors(404, 503),
             summary="one instance (404 if unknown)")
    def instance(uuid: str) -> s.InstanceOut:
        return s.InstanceOut.of(driver.get_instance(uuid))

    @api.get("/jobs", response_model=s.JobsOut, summary="every remembered job, newest first")
    def jobs() -> dict[str, Any]:
        return {"jobs": [j.to_dict() for j in runner.list()]}

    @api.get("/jobs/{job_id}", response_model=s.JobOut, responses=errors(404),
             summary="one job (404 if unknown); with wait, answered when it ends or wait seconds passed")
    async def job(job_id: str, wait: float = Query(
            0.0, ge=0.0, le=MAX_JOB_WAIT,
            description="seconds to hold the answer while the job runs (a long poll); 0 answers at once",
    )) -> dict[str, Any]:
        if wait:
            return (await runner.until_ended(job_id, wait)).to_dict()
        return runner.get(job_id).to_dict()


def _bare(uuid: str, host: str = "") -> Instance:
    """An instance known only by uuid: it may not be defined on this host (yet, or any more)."""
    return Instance(uuid, "", Flavor("", 0, 0, 0), host)


def _migration(uuid: str, ref: s.MigrationRef | None) -> Migration:
    return ref.to_migration(uuid) if ref else Migration(id="manual", instance_uuid=uuid, source_host="", dest_host="")


def _add_job_routes(api: APIRouter, driver: ComputeDriver, runner: JobRunner,
                    shutdown_defaults: tuple[int, int], metrics: AgentMetrics) -> None:
    def start(op: str, uuid: str, job_id: str | None,
              work: Callable[[ProgressHook, Timeline], s.Outcome | None]) -> dict[str, Any]:
        """Run ``work(progress, timeline)`` as job ``op`` (named ``job_id``); the driver's outcome
        with the phases recorded on the timeline, serialized, is the job's result, and the job
        shows those phases as they are recorded. A job_id the runner has returns that job instead."""
        timeline = Timeline()

        def run(report: Report) -> dict[str, Any] | None:
            with metrics.job(op, timeline):
                outcome = work(_progress(report), timeline)
                metrics.outcome(outcome)
            return s.dump_result(outcome, timeline.phases)
        return runner.start(op, uuid, run, job_id, timeline).to_dict()

    def start_on(op: str, uuid: str, job_id: str | None,
                 work: Callable[[Instance, ProgressHook, Timeline], s.Outcome | None]) -> dict[str, Any]:
        """As start, on the instance defined here (404 if unknown), looked up only for a new job:
        asking again for a job that moved the instance away still finds the job."""
        known = runner.named(job_id, op, uuid)
        if known is not None:
            return known.to_dict()
        inst = driver.get_instance(uuid)
        return start(op, uuid, job_id, lambda progress, timeline: work(inst, progress, timeline))

    def shutdown(body: s.PowerOffRequest) -> tuple[int, int]:
        timeout, retry = shutdown_defaults
        return (timeout if body.timeout is None else body.timeout,
                retry if body.retry_interval is None else body.retry_interval)

    # A job on the instance defined here (looked up first: 404, 503) or on one that may not be.
    job_on = {"status_code": 202, "response_model": s.JobOut, "responses": errors(404, 409, 503)}
    job = {"status_code": 202, "response_model": s.JobOut, "responses": errors(409)}
    again = "; naming a job_id the agent has answers 202 with that job, whatever its state"

    @api.post("/instances/{uuid}/power-on", **job_on, summary="start a stopped instance" + again)
    def power_on(uuid: str, body: s.PowerOnRequest | None = None) -> dict[str, Any]:
        body = body or s.PowerOnRequest()
        return start_on("power-on", uuid, body.job_id, lambda inst, progress, timeline: driver.power_on(inst))

    @api.post("/instances/{uuid}/power-off", **job_on, summary="clean shutdown, forced after the timeout" + again)
    def power_off(uuid: str, body: s.PowerOffRequest | None = None) -> dict[str, Any]:
        body = body or s.PowerOffRequest()
        timeout, retry = shutdown(body)
        return start_on("power-off", uuid, body.job_id,
                        lambda inst, progress, timeline: driver.power_off(inst, timeout, retry))

    @api.post("/instances/{uuid}/migrate-disk-and-power-off", **job_on,
              summary="source side: power off and copy the disks to dest" + again)
    def migrate(uuid: str, body: s.MigrateRequest) -> dict[str, Any]:
        timeout, retry = shutdown(body)

        def work(inst: Instance, progress: ProgressHook, timeline: Timeline) -> s.Outcome:
            flavor = body.flavor.to_flavor() if body.flavor else inst.flavor
            return driver.migrate_disk_and_power_off(inst, body.dest, flavor, s.vifs(body.network_info), None,
                                                     timeout, retry, progress=progress, timeline=timeline)
        return start_on("migrate-disk-and-power-off", uuid, body.job_id, work)

    @api.post("/instances/{uuid}/finish-migration", **job, summary="destination side: define and start" + again)
    def finish(uuid: str, body: s.FinishMigrationRequest) -> dict[str, Any]:
        migration = body.migration.to_migration(uuid)
        inst = Instance(uuid, body.name, body.flavor.to_flavor(), migration.dest_host)
        disk_info = body.disks()
        return start("finish-migration", uuid, body.job_id, lambda progress, timeline: driver.finish_migration(
            migration, inst, disk_info, s.vifs(body.network_info), {}, body.resize_instance, None, body.power_on,
            timeline=timeline))

    @api.post("/instances/{uuid}/confirm-migration", **job, summary="source side: drop the kept copy" + again)
    def confirm(uuid: str, body: s.ConfirmRequest | None = None) -> dict[str, Any]:
        body = body or s.ConfirmRequest()
        migration = _migration(uuid, body.migration)
        source = _bare(uuid, migration.source_host)
        return start("confirm-migration", uuid, body.job_id,
                     lambda progress, timeline: driver.confirm_migration(migration, source, []))

    @api.post("/instances/{uuid}/finish-revert-migration", **job,
              summary="source side: restart from the kept copy" + again)
    def revert(uuid: str, body: s.RevertRequest | None = None) -> dict[str, Any]:
        body = body or s.RevertRequest()
        migration = _migration(uuid, body.migration)
        return start("finish-revert-migration", uuid, body.job_id,
                     lambda progress, timeline: driver.finish_revert_migration(
                         _bare(uuid, migration.source_host), [], migration, None, body.power_on))

    @api.post("/instances/{uuid}/destroy", **job, summary="stop and undefine here, removing disks if asked" + again)
    def destroy(uuid: str, body: s.DestroyRequest | None = None) -> dict[str, Any]:
        body = body or s.DestroyRequest()
        destroy_disks = body.destroy_disks
        return start("destroy", uuid, body.job_id,
                     lambda progress, timeline: driver.destroy(_bare(uuid), [], destroy_disks))

    @api.post("/instances/{uuid}/live-migrate", **job_on,
              summary="move a running instance, keeping it running" + again)
    def live_migrate(uuid: str, body: s.LiveMigrateRequest) -> dict[str, Any]:
        return start_on("live-migrate", uuid, body.job_id,
                        lambda inst, progress, timeline: driver.live_migration(inst, body.dest, progress=progress,
                                                                               timeline=timeline))
