"""The conductor: a migration's state machine across the source and destination agents.

Cold migration, as the data-flow picture in ARCHITECTURE.md shows it::

    pre-migrating -> migrating        source: migrate-disk-and-power-off
                  -> post-migrating   dest:   finish-migration
                  -> finished         (VERIFY_RESIZE: waits for confirm or revert)
    confirming -> confirmed           source: confirm-migration
    reverting  -> reverted            dest: destroy; source: finish-revert-migration

Every step first looks for the job it started before (its id is on the
record), so a controller restarted in the middle picks a migration up where
it was; a job an agent lost (the agent restarted) is rolled back to the
source instead. Any failure ends in ``error`` with the source as it was.

The host a server moves to has one name per layer:

    controller API (Nova)   ``host`` in the request; ``dest_compute``/``dest_address`` in the record
    inside the controller   ``target_host`` (a name), ``target`` (its HostRecord), ``target.address``
    agent API               ``dest``: the target's data-plane address (MigrateRequest, LiveMigrateRequest)
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Literal, TypeVar

from pydantic import BaseModel

from agent import schemas as s
from agent.schemas import FinishResult, JobOut, LiveResult, MigrateResult
from driver.model import MOVABLE_STATES, PowerState

from . import scheduler
from .agents import AgentClient
from .config import ControllerConfig
from .errors import AgentError, BadRequest, Conflict, ControllerError, NotFound, NoValidHost
from .inventory import Inventory, Server
from .records import FINAL, LIVE_TASK_STATE, TASK_STATES, HostRecord, MigrationRecord, MigrationStatus, MigrationType
from .store import Store

log = logging.getLogger(__name__)

Spawn = Callable[[Callable[[], None]], None]
#: Which agent a step asks: the source's (``source_compute``, ``source_job``) or the destination's.
Side = Literal["source", "dest"]
R = TypeVar("R", bound=BaseModel)
_S, _COLD, _LIVE = MigrationStatus, MigrationType.COLD, MigrationType.LIVE
_UNMOVABLE_WHY = {PowerState.PAUSED: "paused: unpause it or shut it off",
                  PowerState.SUSPENDED: "suspended: resume it or shut it off"}


def unmovable_reason(state: PowerState) -> str | None:
    """Why a server in ``state`` cannot be migrated as it is (None: it can), e.g. ``paused: unpause
    it or shut it off``."""
    if state in MOVABLE_STATES:
        return None
    return _UNMOVABLE_WHY.get(state, f"in power state {state.label}")


def spawn_thread(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, daemon=True, name="coldferry-migration").start()


class StepFailed(Exception):
    """A job ended in error; ``message`` is the agent's."""


class Conductor:
    """Starts migrations, drives them through their statuses, and finishes them after restarts."""

    def __init__(self, store: Store, inventory: Inventory, config: ControllerConfig, *,
                 spawn: Spawn = spawn_thread, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, agent_lost_seconds: float = 120.0) -> None:
        self.store = store
        self.inventory = inventory
        self.config = config
        self.spawn = spawn
        self.clock = clock
        self.sleep = sleep
        #: How long an agent may be out of reach while its job runs before the step fails.
        self.agent_lost_seconds = agent_lost_seconds
        self._lock = threading.Lock()   # one migration start at a time: checks and record creation
        self._driving: set[int] = set()

    @property
    def ratios(self) -> scheduler.Ratios:
        c = self.config
        return scheduler.Ratios(c.cpu_allocation_ratio, c.ram_allocation_ratio, c.disk_allocation_ratio)

    # -- checks ------------------------------------------------------------------

    def _spec(self, server: Server) -> scheduler.RequestSpec:
        src = self.inventory.host_state(self.inventory.host_record(server.host))
        res = src.resources
        return scheduler.RequestSpec(server.id, server.name, server.flavor_obj, server.host,
                                     res.arch if res else "", res.hypervisor_type if res else "")

    def check_destination(self, server_ref: str, target_host: str) -> dict[str, Any]:
        """Whether ``target_host`` passes the scheduler's rules for the server, and which rule fails."""
        server = self.inventory.find(server_ref)
        results = self._rules(server, self._known_host(target_host))
        failed = scheduler.first_failure(results)
        return {"host": target_host, "server": server.id, "passes": failed is None,
                "failed": failed.name if failed else None,
                "rules": [{"name": r.name, "passed": r.passed, "reason": r.reason} for r in results]}

    def check_target(self, source_host: str, target_host: str | None, force: bool) -> HostRecord | None:
        """The checks on where a move goes, for one server and for a drain alike: both hosts are
        configured, the target is another host, and force comes with a target.

        :returns: the target's record; None when no target is given (the scheduler chooses).
        :raises BadRequest: an unknown host, the target being the source, force without a target.
        """
        self._known_host(source_host)
        if not target_host:
            if force:
                raise BadRequest(reason="force needs a target host: give one, or drop force to let the "
                                        "scheduler choose")
            return None
        target = self._known_host(target_host)
        if target.name == source_host:
            raise BadRequest(reason=f"the target host {target_host} is the source host; choose another host")
        return target

    def _known_host(self, name: str) -> HostRecord:
        rec = self.store.get_host(name)
        if rec is None:
            known = ", ".join(h.name for h in self.store.list_hosts()) or "none"
            raise BadRequest(reason=f"unknown host {name!r}; configured hosts: {known}")
        return rec

    def _rules(self, server: Server, target: HostRecord) -> list[scheduler.RuleResult]:
        return scheduler.check(self.inventory.host_state(target), self._spec(server), self.ratios)

    def _check_movable(self, server: Server) -> None:
        why = unmovable_reason(server.power_state)
        if why is not None:
            raise Conflict(reason=f"server {server.name} ({server.id}) cannot be migrated: it is {why} "
                                  "before migrating it")
        open_m = self.store.open_migration_for(server.id)
        if open_m is not None:
            what = ("confirm or revert it first" if open_m.status == _S.FINISHED
                    else "wait until it ends")
            raise Conflict(reason=f"server {server.name} ({server.id}) already has migration {open_m.id} in "
                                  f"status {open_m.status}; {what}")

    def _pick(self, server: Server, target_host: str | None, force: bool) -> HostRecord:
        target = self.check_target(server.host, target_host, force)
        if target is None:
            return self._known_host(scheduler.select(self.inventory.host_states(), self._spec(server), self.ratios))
        if not force:
            failed = scheduler.first_failure(self._rules(server, target))
            if failed:
                raise NoValidHost(server=server.id, reason=f"host {target.name} fails rule {failed.name}: "
                                                           f"{failed.reason} (force skips the check)")
        return target

    # -- starting ----------------------------------------------------------------

    def migrate(self, server_ref: str, target_host: str | None = None, force: bool = False,
                live: bool = False) -> MigrationRecord:
        """Check, record and start a cold (or live) migration to ``target_host`` (None: the
        scheduler chooses); returns the new record.

        :raises BadRequest: force without a target, unknown or current host, a failing rule.
        :raises Conflict: the server is paused, suspended or already migrating.
        :raises NotFound: no such server.
        """
        with self._lock:
            server = self.inventory.find(server_ref)
            self._check_movable(server)
            if live and server.power_state != PowerState.RUNNING:
                raise Conflict(reason=f"server {server.name} is not running; live migration needs a running "
                                      "server (use a cold migration)")
            target = self._pick(server, target_host, force)
            m = self.store.create_migration(
                server=server.id, server_name=server.name, source_compute=server.host, dest_compute=target.name,
                dest_address=target.address, status=_S.PRE_MIGRATING, migration_type=_LIVE if live else _COLD,
                task_state=LIVE_TASK_STATE if live else TASK_STATES[_S.PRE_MIGRATING],
                forced=bool(force), old_power_state=server.power_state, flavor=server.flavor)
        log.info("migration %d: %s %s from %s to %s%s", m.id, m.migration_type, server.id, server.host,
                 target.name, " (forced)" if force else "")
        self._start_driving(m.id)
        return m

    def confirm(self, migration_id: int) -> MigrationRecord:
        return self._finish_verb(migration_id, _S.CONFIRMING, "confirm")

    def revert(self, migration_id: int) -> MigrationRecord:
        return self._finish_verb(migration_id, _S.REVERTING, "revert")

    def _finish_verb(self, migration_id: int, status: MigrationStatus, verb: str) -> MigrationRecord:
        with self._lock:
            m = self.get(migration_id)
            if m.status != _S.FINISHED:
                raise Conflict(reason=f"migration {m.id} is {m.status}; only a finished migration "
                                      f"(server in VERIFY_RESIZE) can be {verb}ed")
            m = self._set(m, status, source_job=None, dest_job=None, error=None)
        self._start_driving(m.id)
        return m

    def get(self, migration_id: int) -> MigrationRecord:
        m = self.store.get_migration(migration_id)
        if m is None:
            raise NotFound("migration", migration_id)
        return m

    def open_migration(self, server_ref: str) -> MigrationRecord:
        server = self.inventory.find(server_ref)
        m = self.store.open_migration_for(server.id)
        if m is None:
            raise Conflict(reason=f"server {server.name} has no migration waiting for confirm or revert")
        return m

    # -- driving -----------------------------------------------------------------

    def _start_driving(self, migration_id: int) -> None:
        with self._lock:
            if migration_id in self._driving:
                return
            self._driving.add(migration_id)
        self.spawn(lambda: self.drive(migration_id))

    def drive(self, migration_id: int) -> None:
        """Run a migration's steps until it waits for the operator or ends."""
        try:
            while True:
                m = self.get(migration_id)
                step = self._steps().get((m.migration_type, m.status))
                if step is None:
                    return
                try:
                    step(m)
                except (StepFailed, ControllerError) as e:
                    self._fail(self.get(migration_id), str(e))
                except Exception as e:  # noqa: BLE001 - a bug must not leave a record in flight
                    log.exception("migration %d: unexpected error", migration_id)
                    self._fail(self.get(migration_id), f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._driving.discard(migration_id)

    def _steps(self) -> dict[tuple[MigrationType, MigrationStatus], Callable[[MigrationRecord], None]]:
        return {(_COLD, _S.PRE_MIGRATING): lambda m: self._set(m, _S.MIGRATING),
                (_COLD, _S.MIGRATING): self._copy,
                (_COLD, _S.POST_MIGRATING): self._finish_on_dest,
                (_COLD, _S.CONFIRMING): self._confirm,
                (_COLD, _S.REVERTING): self._revert,
                (_LIVE, _S.PRE_MIGRATING): lambda m: self._set(m, _S.MIGRATING),
                (_LIVE, _S.MIGRATING): self._live}

    def _set(self, m: MigrationRecord, status: MigrationStatus, **fields: Any) -> MigrationRecord:
        task = LIVE_TASK_STATE if m.migration_type == _LIVE and status not in FINAL else TASK_STATES[status]
        return self.store.update_migration(m.id, status=status, task_state=task, **fields)

    def _fail(self, m: MigrationRecord, message: str) -> None:
        log.error("migration %d failed: %s", m.id, message)
        self.store.update_migration(m.id, status=_S.ERROR, task_state=None, error=message, progress=None)

    def _run(self, m: MigrationRecord, side: Side, op: str, body: BaseModel) -> JobOut:
        """Start ``op`` on the ``side`` host (or pick up the job the record names) and wait for it to end.

        :returns: the job, done.
        :raises StepFailed: the job ended in error, or the agent no longer knows it.
        """
        host, job_id = (m.source_compute, m.source_job) if side == "source" else (m.dest_compute, m.dest_job)
        agent = self.inventory.agent(host)
        if job_id:
            job = agent.job(job_id)
            if job is None or job.op != op:
                raise LostJob(f"the agent of {host} no longer knows job {job_id} ({op}); it was restarted")
        else:
            job = agent.start(m.server, op, body)
            m = self.store.update_migration(m.id, **{f"{side}_job": job.id})

        def on_update(j: JobOut) -> None:
            if j.progress is not None:
                self.store.update_migration(m.id, progress=j.progress.model_dump())

        job = self._wait_job(agent, host, job.id, on_update)
        if job.state == "error":
            raise StepFailed(f"{op} on {host}: {job.error.message if job.error else 'failed'}")
        return job

    def _wait_job(self, agent: AgentClient, host: str, job_id: str,
                  on_update: Callable[[JobOut], None]) -> JobOut:
        """Wait for a job; an agent out of reach for a while is waited for, not given up on at once,
        because the job goes on without us."""
        deadline = self.clock() + self.agent_lost_seconds
        while True:
            try:
                return agent.wait(job_id, on_update=on_update)
            except AgentError as e:
                if e.agent_status == 404:
                    raise LostJob(f"the agent of {host} no longer knows job {job_id}; it was restarted") from None
                if self.clock() >= deadline:
                    raise StepFailed(f"lost the agent of {host} while job {job_id} ran: {e}") from None
                log.warning("agent of %s out of reach while job %s runs (%s); retrying", host, job_id, e)
                self.sleep(self.config.poll_interval)

    def _copy(self, m: MigrationRecord) -> None:
        # The shutdown timeout is the source host's own ([driver] in its configuration).
        body = s.MigrateRequest(dest=m.dest_address, flavor=m.flavor or None)  # none: the current flavor
        try:
            result = _result(self._run(m, "source", "migrate-disk-and-power-off", body), MigrateResult)
        except LostJob as e:
            self._roll_back(m, f"{e}; the copy was abandoned")
            return
        self._set(m, _S.POST_MIGRATING, disk_info=result.disk_info, dest_job=None, shared=result.shared,
                  powered_off_at=result.powered_off_at, precopy=result.precopy, bytes_sent=result.bytes_sent,
                  bytes_before_power_off=result.bytes_before_power_off,
                  bytes_after_power_off=result.bytes_after_power_off, bytes_skipped=result.bytes_skipped,
                  rate=result.rate, digests=result.digests, progress=None)

    def _finish_on_dest(self, m: MigrationRecord) -> None:
        was_running = m.old_power_state == PowerState.RUNNING
        body = s.FinishMigrationRequest(name=m.server_name, flavor=m.flavor, disk_info=m.disk_info or "[]",
                                        migration=_migration_ref(m), resize_instance=False, power_on=was_running)
        try:
            running_at = _result(self._run(m, "dest", "finish-migration", body), FinishResult).running_at
        except LostJob:
            inst = self.inventory.agent(m.dest_compute).instance(m.server)
            if inst is None or (was_running and inst.power_state != PowerState.RUNNING):
                self._roll_back(m, f"the agent of {m.dest_compute} restarted while finishing the migration")
                return
            running_at = None
        except StepFailed as e:
            self._roll_back(m, str(e))
            return
        downtime = None
        if was_running and running_at and m.powered_off_at:
            downtime = round(running_at - m.powered_off_at, 3)
        self._set(m, _S.FINISHED, downtime_s=downtime, progress=None)

    def _roll_back(self, m: MigrationRecord, why: str) -> None:
        """Remove the destination's copy, bring the source back as it was, and end in error."""
        notes = []
        steps: tuple[tuple[Side, str, BaseModel], ...] = (
            ("dest", "destroy", s.DestroyRequest(destroy_disks=True)),
            ("source", "finish-revert-migration", _revert_body(m)))
        for side, op, body in steps:
            try:
                self._run(self.store.update_migration(m.id, **{f"{side}_job": None}), side, op, body)
            except (StepFailed, ControllerError) as e:
                notes.append(str(e))
        restored = "the source was restored" if not notes else "rolling back also failed: " + "; ".join(notes)
        self._fail(self.get(m.id), f"{why}; {restored}")

    def _confirm(self, m: MigrationRecord) -> None:
        try:
            self._run(m, "source", "confirm-migration", s.ConfirmRequest(migration=_migration_ref(m)))
        except LostJob:
            self.store.update_migration(m.id, source_job=None)  # confirming twice is harmless: start again
            return
        self._set(m, _S.CONFIRMED)

    def _revert(self, m: MigrationRecord) -> None:
        try:
            self._run(m, "dest", "destroy", s.DestroyRequest(destroy_disks=True))
        except LostJob:
            self.store.update_migration(m.id, dest_job=None)
            return
        except StepFailed as e:
            # Nothing changed on the source: the server stays in VERIFY_RESIZE, so revert can be retried.
            self._set(m, _S.FINISHED, error=f"revert failed: {e}; the server still runs on "
                                            f"{m.dest_compute}: revert again, or confirm")
            return
        m = self.get(m.id)
        try:
            self._run(m, "source", "finish-revert-migration", _revert_body(m))
        except LostJob:
            self.store.update_migration(m.id, source_job=None)
            return
        self._set(m, _S.REVERTED)

    def _live(self, m: MigrationRecord) -> None:
        try:
            result = _result(self._run(m, "source", "live-migrate", s.LiveMigrateRequest(dest=m.dest_address)), LiveResult)
        except LostJob as e:
            where = self.inventory.agent(m.dest_compute).instance(m.server)
            if where is not None and where.power_state == PowerState.RUNNING:
                self._set(m, _S.COMPLETED)
            else:
                self._fail(m, f"{e}; the server stayed on {m.source_compute}")
            return
        self._set(m, _S.COMPLETED, downtime_s=result.downtime_s, shared=result.shared, progress=None)

    # -- after a restart, and over time ----------------------------------------------

    def reconcile(self) -> list[int]:
        """Pick up every migration a restart left in flight; returns their ids."""
        ids = []
        for m in self.store.in_flight_migrations():
            log.info("migration %d was %s when the controller stopped; picking it up", m.id, m.status)
            if m.status == _S.MIGRATING and m.migration_type == _COLD and not m.source_job:
                # Stopped between the status change and the job start: nothing ran on the agent.
                self._set(m, _S.PRE_MIGRATING)
            ids.append(m.id)
            self._start_driving(m.id)
        return ids

    def auto_confirm(self) -> list[int]:
        """Confirm finished migrations older than ``auto_confirm_seconds`` (0: never)."""
        window = self.config.auto_confirm_seconds
        if window <= 0:
            return []
        now = self.clock()
        done = []
        for m in self.store.list_migrations(status=_S.FINISHED):
            if now - m.updated_at.timestamp() >= window:
                try:
                    self.confirm(m.id)
                    done.append(m.id)
                except Conflict:
                    continue  # confirmed or reverted by someone else meanwhile
        return done

    def wait(self, migration_id: int, until: frozenset[str], timeout: float = 3600.0,
             interval: float = 0.5) -> MigrationRecord:
        """Poll the record until its status is in ``until`` (bounded by ``timeout``)."""
        deadline = self.clock() + timeout
        while True:
            m = self.get(migration_id)
            if m.status in until or self.clock() >= deadline:
                return m
            self.sleep(interval)


class LostJob(StepFailed):
    """The agent does not know the job the record names (it restarted)."""


def _result(job: JobOut, model: type[R]) -> R:
    """A done job's result, which the agent client parsed as its op's model (agent.schemas.RESULTS)."""
    if not isinstance(job.result, model):
        raise TypeError(f"job {job.id} ({job.op}) has no {model.__name__} result")
    return job.result


def _migration_ref(m: MigrationRecord) -> s.MigrationRef:
    return s.MigrationRef(id=str(m.id), source_host=m.source_compute, dest_host=m.dest_compute)


def _revert_body(m: MigrationRecord) -> s.RevertRequest:
    """finish-revert-migration's body: the source comes back as it was."""
    return s.RevertRequest(power_on=m.old_power_state == PowerState.RUNNING, migration=_migration_ref(m))

