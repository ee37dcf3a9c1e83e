"""The conductor: a migration's state machine across the source and destination agents.

Cold migration, as the data-flow picture in ARCHITECTURE.md shows it::

    pre-migrating -> migrating        source: migrate-disk-and-power-off
                  -> post-migrating   dest:   finish-migration
                  -> finished         (VERIFY_RESIZE: waits for confirm or revert)
    confirming -> confirmed           source: confirm-migration
    reverting  -> reverted            dest: destroy; source: finish-revert-migration

Every job is named (``job_name``) and the name written on the record before
the agent is asked to start it, so a controller restarted in the middle finds
its job again by name; a name the agent does not know (never started, or the
agent restarted) takes the safe path. A failure after the power-off rolls
back on facts (``rolling-back``: the destination's destroy succeeded or it
does not run the server, then the source comes back) and ends in ``error``;
a host that stays out of reach, or a rollback that cannot finish, ends in
``needs-recovery``, left when both hosts answer again (``recover``).
docs/safety.md gives the invariant and each step's failure.

Several controllers may share one database: a controller drives a migration
only while it holds the migration's lease (``Store.claim``), and every write
it makes while driving is fenced by that lease (LeaseLost: another
controller took it over, so this one stops without touching anything).

The host a server moves to has one name per layer:

    controller API (Nova)   ``host`` in the request; ``dest_compute``/``dest_address`` in the record
    inside the controller   ``target_host`` (a name), ``target`` (its HostRecord), ``target.address``
    agent API               ``dest``: the target's data-plane address (MigrateRequest, LiveMigrateRequest)
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Literal, TypeVar

from pydantic import BaseModel

from agent import schemas as s
from agent.schemas import FinishResult, JobOut, LiveResult, MigrateResult
from driver.model import Phase, PhaseName, PowerState

from . import facts
from .agents import AgentClient
from .config import ControllerConfig
from .errors import AgentError, Conflict, ControllerError, NotFound
from .inventory import Inventory
from .placement import Placement
from .facts import Unsettled
from .records import (FINAL, LIVE_TASK_STATE, RECOVERABLE, TASK_STATES, HostRecord, Lease, MigrationRecord,
                      MigrationStatus, MigrationType, controller_id)
from .store import LeaseLost, OpenMigrationExists, Store

log = logging.getLogger(__name__)

Spawn = Callable[[Callable[[], None]], None]
#: Which agent a step asks: the source's (``source_compute``, ``source_job``) or the destination's.
Side = Literal["source", "dest"]
R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")
_S, _COLD, _LIVE = MigrationStatus, MigrationType.COLD, MigrationType.LIVE
# Where a needs-recovery message turns from what went wrong to what the hosts say.
_KNOWN = ". Known now: "
#: The jobs a migration's timeline records, by operation: the phase the conductor records for the
#: job itself; the agent's phases inside it follow it, with the host they ran on.
JOB_PHASES = {"migrate-disk-and-power-off": PhaseName.SOURCE_JOB, "live-migrate": PhaseName.SOURCE_JOB,
              "finish-migration": PhaseName.DEST_JOB}


def spawn_thread(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, daemon=True, name="coldferry-migration").start()


class StepFailed(Exception):
    """A job ended in error; ``message`` is the agent's."""


class Conductor:
    """Starts migrations, drives them through their statuses, and takes over those no controller
    holds a live lease on (after a restart, or from a controller that died).

    ``owner`` names this controller in leases (default: unique per process start);
    ``lease_seconds`` is how long a claim or renewal holds: a controller that stops renewing
    loses its migrations to another after that long.
    """

    def __init__(self, store: Store, inventory: Inventory, config: ControllerConfig, *,
                 spawn: Spawn = spawn_thread, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, agent_lost_seconds: float | None = None,
                 owner: str | None = None, lease_seconds: float = 60.0,
                 ended: Callable[[MigrationRecord], None] | None = None) -> None:
        self.store = store
        #: Called with each migration this controller brings to a final status (the metrics).
        self.ended = ended or (lambda m: None)
        self.lease = Lease(owner or controller_id(), lease_seconds)
        self.inventory = inventory
        self.config = config
        self.spawn = spawn
        self.clock = clock
        self.sleep = sleep
        #: How long a host may stay out of reach in a step before the migration needs recovery.
        self.agent_lost_seconds = config.agent_lost_seconds if agent_lost_seconds is None else agent_lost_seconds
        self.placement = Placement(store, inventory, config)
        self._lock = threading.Lock()   # one migration start at a time: checks and record creation
        # Notified whenever this controller changes a migration's status: ``wait`` wakes at once
        # for a migration driven here (a drain's next row starts as soon as a slot frees).
        self._status_changed = threading.Condition()
        self._driving: set[int] = set()
        self._lost: set[int] = set()     # driven here, but the lease went to another controller

    # -- checks (placement.py) ---------------------------------------------------

    def check_destination(self, server_ref: str, target_host: str) -> dict[str, Any]:
        return self.placement.check_destination(server_ref, target_host)

    def check_target(self, source_host: str, target_host: str | None, force: bool) -> HostRecord | None:
        return self.placement.check_target(source_host, target_host, force)

    # -- starting ----------------------------------------------------------------

    def migrate(self, server_ref: str, target_host: str | None = None, force: bool = False,
                live: bool = False, on: str | None = None) -> MigrationRecord:
        """Check, record and start a cold (or live) migration to ``target_host`` (None: the
        scheduler chooses); returns the new record.

        :raises BadRequest: force without a target, unknown or current host, a failing rule.
        :raises Conflict: the server is paused, suspended or already migrating.
        :raises NotFound: no such server.
        :param on: the host the caller knows the server is on (a drain's), asked first.
        """
        # The agents are asked before the lock, so that one controller starts migrations side by side
        # (a drain's); the database refuses a second open migration of one server whatever the timing.
        server = self.inventory.find(server_ref, on=on)
        self.placement.check_movable(server)
        if live and server.power_state != PowerState.RUNNING:
            raise Conflict(reason=f"server {server.name} is not running; live migration needs a running "
                                  "server (use a cold migration)")
        candidates = self.placement.ask(server, target_host, force)
        with self._lock:
            # Under the lock: the choice counts the migrations recorded so far, this one's included next.
            target = candidates.pick()
            try:
                m = self.store.create_migration(
                    lease=self.lease, server=server.id, server_name=server.name, source_compute=server.host, dest_compute=target.name,
                    dest_address=target.address, status=_S.PRE_MIGRATING, migration_type=_LIVE if live else _COLD,
                    task_state=LIVE_TASK_STATE if live else TASK_STATES[_S.PRE_MIGRATING],
                    forced=bool(force), old_power_state=server.power_state, flavor=server.flavor,
                    requested_at=self.clock())
            except OpenMigrationExists as e:
                # Another controller recorded one since the check: answer as the check would have.
                self.placement.check_movable(server)
                raise Conflict(reason=str(e)) from e
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
            m = self._claim_in(migration_id, _S.FINISHED, f"only a finished migration (server in VERIFY_RESIZE) "
                                                          f"can be {verb}ed")
            m = self._set(m, status, source_job=None, dest_job=None, error=None)
        self._start_driving(m.id)
        return m

    def _claim_in(self, migration_id: int, status: MigrationStatus, only: str) -> MigrationRecord:
        """Claim a migration while it is in ``status`` (one atomic UPDATE: of several controllers
        asked at once, one wins); the caller then moves it on. Call with ``_lock`` held.

        :raises Conflict: it is in another status (``only`` says which it must be in), or another
            controller holds it.
        """
        m = self.get(migration_id)
        if m.status == status and self.store.claim("migration", m.id, self.lease, status=status):
            return self.get(migration_id)
        m = self.get(migration_id)
        if m.status != status:
            raise Conflict(reason=f"migration {m.id} is {m.status}; {only}")
        raise Conflict(reason=f"migration {m.id} is being handled by another controller ({m.lease_owner}); "
                              "try again later")

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

    def _start_driving(self, migration_id: int) -> bool:
        if not self._take(migration_id):
            return False
        self.spawn(lambda: self.drive(migration_id))
        return True

    def _take(self, migration_id: int) -> bool:
        """Claim a migration to drive it here; False when this controller drives it already or
        another holds a live lease on it."""
        with self._lock:
            if migration_id in self._driving or not self.store.claim("migration", migration_id, self.lease):
                return False
            self._driving.add(migration_id)
            self._lost.discard(migration_id)
            return True

    def drive(self, migration_id: int) -> None:
        """Run a migration's steps until it waits for the operator or ends (then let go of its
        lease), or until another controller has taken it over (then touch nothing more)."""
        try:
            while (m := self._next(migration_id)) is not None:
                self._step(m)
        except LeaseLost as e:
            log.warning("migration %d: %s; this controller stops driving it", migration_id, e)
        finally:
            with self._lock:
                self._driving.discard(migration_id)

    def _next(self, migration_id: int) -> MigrationRecord | None:
        """The migration, when it has a step to run here; else (it waits for the operator, or
        ended) its lease is released and None returned. Under ``_lock``, so that a verb that moves
        it on at this moment either is seen here or finds it no longer driven and drives it."""
        with self._lock:
            m = self.get(migration_id)
            if migration_id in self._lost:
                raise LeaseLost(url=self.store.url, kind="migration", id=migration_id, owner=self.lease.owner,
                                now=f"{m.lease_owner or 'nobody'} holds it now")
            if (m.migration_type, m.status) in self._steps():
                return m
            self.store.release("migration", migration_id, self.lease)
            self._driving.discard(migration_id)
            return None

    def _step(self, m: MigrationRecord) -> None:
        """Run ``m``'s step; a failure of it rolls back, needs recovery or fails the migration."""
        try:
            self._steps()[(m.migration_type, m.status)](m)
        except LeaseLost:
            raise
        except Unsettled as e:
            self._needs_recovery(self.get(m.id), str(e))
        except (StepFailed, ControllerError) as e:
            self._step_failed(self.get(m.id), str(e))
        except Exception as e:  # noqa: BLE001 - a bug must not leave a record in flight
            log.exception("migration %d: unexpected error", m.id)
            self._step_failed(self.get(m.id), f"{type(e).__name__}: {e}")

    def _update(self, migration_id: int, **fields: Any) -> MigrationRecord:
        """Write to a migration this controller drives: only while it holds the lease (renewing it).

        :raises LeaseLost: another controller took it over.
        """
        record = self.store.update_migration(migration_id, lease=self.lease, **fields)
        if fields.get("status") in FINAL:
            self.ended(record)
        if "status" in fields:
            with self._status_changed:
                self._status_changed.notify_all()
        return record

    def _check_held(self, migration_id: int) -> None:
        """Raise LeaseLost when the renewal pass found another controller holding the migration."""
        if migration_id in self._lost:
            raise LeaseLost(url=self.store.url, kind="migration", id=migration_id, owner=self.lease.owner,
                            now="another controller took it over")

    def renew_leases(self) -> list[int]:
        """Renew the lease of every migration driven here; returns those another controller took
        over meanwhile (their drives stop at their next look at the record or the agent)."""
        with self._lock:
            driving = sorted(self._driving - self._lost)
        lost = [i for i in driving if not self.store.renew("migration", i, self.lease)]
        with self._lock:
            self._lost.update(lost)
        for i in lost:
            log.warning("migration %d: another controller took its lease over; this one stops driving it", i)
        return lost

    def release_leases(self) -> None:
        """Let go of every migration driven here (the controller stops): their drives stop at their
        next write, and another controller takes them over at once."""
        with self._lock:
            driving = sorted(self._driving)
            self._lost.update(driving)
        for i in driving:
            self.store.release("migration", i, self.lease)

    def _steps(self) -> dict[tuple[MigrationType, MigrationStatus], Callable[[MigrationRecord], None]]:
        return {(_COLD, _S.PRE_MIGRATING): lambda m: self._set(m, _S.MIGRATING),
                (_COLD, _S.MIGRATING): self._copy,
                (_COLD, _S.POST_MIGRATING): self._finish_on_dest,
                (_COLD, _S.ROLLING_BACK): self._roll_back,
                (_COLD, _S.CONFIRMING): self._confirm,
                (_COLD, _S.REVERTING): self._revert,
                (_LIVE, _S.PRE_MIGRATING): lambda m: self._set(m, _S.MIGRATING),
                (_LIVE, _S.MIGRATING): self._live}

    def _set(self, m: MigrationRecord, status: MigrationStatus, **fields: Any) -> MigrationRecord:
        task = LIVE_TASK_STATE if m.migration_type == _LIVE and status not in FINAL else TASK_STATES[status]
        return self._update(m.id, status=status, task_state=task, **fields)

    def _fail(self, m: MigrationRecord, message: str) -> None:
        log.error("migration %d failed: %s", m.id, message)
        self._update(m.id, status=_S.ERROR, task_state=None, error=message, progress=None)

    def _step_failed(self, m: MigrationRecord, why: str) -> None:
        """After the power-off a failure rolls back on facts; while undoing, it needs recovery."""
        if m.migration_type == _COLD and m.status in (_S.MIGRATING, _S.POST_MIGRATING):
            self._begin_rollback(m, why)
        elif m.migration_type == _COLD and m.status in (_S.ROLLING_BACK, _S.REVERTING):
            self._needs_recovery(m, why)
        else:
            self._fail(m, why)

    def _begin_rollback(self, m: MigrationRecord, why: str) -> None:
        log.warning("migration %d: %s; rolling back", m.id, why)
        self._set(m, _S.ROLLING_BACK, error=why, source_job=None, dest_job=None, progress=None)

    def _needs_recovery(self, m: MigrationRecord, why: str) -> None:
        """Stop where the facts run out: the server stays where it is, the step is remembered."""
        stopped_in = m.status if m.status in RECOVERABLE else (m.stopped_in or _S.ROLLING_BACK)
        if m.status == _S.ROLLING_BACK and m.error:
            why = f"{m.error}; rolling back: {why}"
        known = "; ".join(self._facts(m))
        message = (f"{why}{_KNOWN}{known}. The server's disks are kept; the controller retries every "
                   f"{self.config.recovery_interval:g} s until both hosts answer, or run: "
                   f"coldferry server migration recover {m.id}")
        log.error("migration %d needs recovery (stopped in %s): %s", m.id, stopped_in, message)
        self._set(m, _S.NEEDS_RECOVERY, stopped_in=str(stopped_in), error=message, progress=None)

    def _facts(self, m: MigrationRecord) -> list[str]:
        return [facts.describe(role, host, facts.where(self.inventory.agent(host), m.server))
                for role, host in (("source", m.source_compute), ("destination", m.dest_compute))]

    def _ask(self, host: str, fn: Callable[[AgentClient], T], reach: facts.Reach | None = None) -> T:
        patience = facts.Patience(self.agent_lost_seconds, self.config.poll_interval, self.clock, self.sleep)
        return patience.ask(self.inventory.agent(host), fn, reach)

    def _run(self, m: MigrationRecord, side: Side, op: str, body: BaseModel) -> JobOut:
        """Start ``op`` on the ``side`` host under a new name written on the record first, or find
        the job the record names; wait for it to end.

        :returns: the job, done.
        :raises LostJob: the agent does not know the named job (never started, or the agent restarted).
        :raises StepFailed: the job ended in error, or the agent refused to start it.
        :raises HostLost: the agent stayed out of reach past agent_lost_seconds.
        """
        host, name = (m.source_compute, m.source_job) if side == "source" else (m.dest_compute, m.dest_job)
        if name:
            job = self._ask(host, lambda a: a.job(name))
            if job is None or job.op != op:
                raise LostJob(f"the agent of {host} does not know job {name} ({op}): it never started, "
                              "or the agent restarted")
            started = _epoch(job.started_at)   # started by an earlier drive: the agent's time, to the second
        else:
            name = job_name(m, op)
            started = self.clock()
            m = self._update(m.id, job_seq=m.job_seq + 1, **{f"{side}_job": name}, **self._scheduled(m, op, started))
            named = body.model_copy(update={"job_id": name})
            try:
                job = self._ask(host, lambda a: a.start(m.server, op, named))
            except AgentError as e:
                raise StepFailed(f"{host} refused {op}: {e}") from None
            if job.id != name:  # an agent that does not take the caller's job names
                self._update(m.id, **{f"{side}_job": job.id})

        def on_update(j: JobOut) -> None:
            self._check_held(m.id)
            if j.progress is not None:
                self._update(m.id, progress=j.progress.model_dump())

        job = self._wait_job(host, job.id, on_update)
        self._record_phases(m.id, host, op, started, job)
        if job.state == "error":
            raise StepFailed(f"{op} on {host}: {job.error.message if job.error else 'failed'}")
        return job

    def _scheduled(self, m: MigrationRecord, op: str, now: float) -> dict[str, Any]:
        """The record's timeline with the scheduled phase ending ``now``, when ``op`` is the job
        that starts the migration and the phase is not there yet; else no change ({})."""
        if JOB_PHASES.get(op) != PhaseName.SOURCE_JOB or m.requested_at is None or any(
                p.name == PhaseName.SCHEDULED for p in m.timeline):
            return {}
        return {"timeline": [*m.timeline, Phase(PhaseName.SCHEDULED, m.requested_at, now)]}

    def _record_phases(self, migration_id: int, host: str, op: str, started: float, job: JobOut) -> None:
        """Add a migration job (JOB_PHASES) to the timeline: the job as this controller saw it,
        from ``started`` until now, then the phases its agent recorded, on ``host``. A job whose
        phases the timeline has already (a restarted controller waited for it again) is not
        added twice."""
        name = JOB_PHASES.get(op)
        if name is None:
            return
        timeline = self.get(migration_id).timeline
        agent = [replace(p, host=p.host or host) for p in (out.to_phase() for out in job.phases)]
        new = [p for p in agent if p not in timeline]
        if agent and not new:
            return
        self._update(migration_id, timeline=[*timeline, Phase(name, started, self.clock(), host, op), *new])

    def _wait_job(self, host: str, job_id: str, on_update: Callable[[JobOut], None]) -> JobOut:
        """Wait for a job; an agent out of reach is asked again until it has been silent for
        agent_lost_seconds, because the job goes on without us."""
        reach = facts.Reach(self.clock)

        def seen(j: JobOut) -> None:
            reach.answered()
            on_update(j)

        try:
            return self._ask(host, lambda a: a.wait(job_id, on_update=seen), reach)
        except AgentError as e:
            if e.agent_status == 404:
                raise LostJob(f"the agent of {host} no longer knows job {job_id}; it was restarted") from None
            raise

    def _copy(self, m: MigrationRecord) -> None:
        # The shutdown timeout is the source host's own ([driver] in its configuration).
        body = s.MigrateRequest(dest=m.dest_address, flavor=m.flavor or None)  # none: the current flavor
        try:
            result = _result(self._run(m, "source", "migrate-disk-and-power-off", body), MigrateResult)
        except (StepFailed, facts.HostLost) as e:  # the source may be off: undo on facts
            self._begin_rollback(m, f"{e}; the copy was abandoned" if isinstance(e, LostJob) else str(e))
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
            inst = self._ask(m.dest_compute, lambda a: a.instance(m.server))
            if inst is None or (was_running and inst.power_state != PowerState.RUNNING):
                self._begin_rollback(m, f"the agent of {m.dest_compute} lost the finish-migration job "
                                        "(it restarted) before the server ran there")
                return
            running_at = None
        except StepFailed as e:
            self._begin_rollback(m, str(e))
            return
        downtime = None
        if was_running and running_at and m.powered_off_at:
            downtime = round(running_at - m.powered_off_at, 3)
        self._set(m, _S.FINISHED, downtime_s=downtime, progress=None)

    def _roll_back(self, m: MigrationRecord) -> None:
        """Undo a failed step on facts: the destination stops running the server (or is known not
        to), then the source comes back as it was; the migration ends in error."""
        why = m.error or "a step failed"
        note = self._clear_dest(m, f"{why}; rolling back", rollback=True)
        self._restore_source(self.get(m.id), f"{why}; rolling back")
        self._fail(self.get(m.id), f"{why}; the source was restored: the server is on {m.source_compute} "
                                   f"as before{note}")

    def _clear_dest(self, m: MigrationRecord, doing: str, rollback: bool = False) -> str:
        """Destroy the server on the destination, with its disks only when they are not the source's too.

        ``shared`` False: the disks go. True: they stay. Not known: in a ``rollback`` (the copy's result
        was never read) the disks are asked to go, because a directory on shared storage carries the
        source's marker from before the power-off and the destination's driver never deletes a marked
        directory; for a finished migration recorded before the flag existed (no marker was written
        then) they stay, and the note says so. Returns that note, or "".

        :raises Unsettled: the destroy failed and the destination still runs the server.
        :raises HostLost: the destination does not answer.
        """
        destroy_disks = m.shared is False or (m.shared is None and rollback)
        try:
            self._run(m, "dest", "destroy", s.DestroyRequest(destroy_disks=destroy_disks))
            return "" if destroy_disks or m.shared else (
                f"; whether {m.dest_compute} shares the instance storage is not known, so its files of the "
                f"server were kept: if that storage is not shared, remove them there by hand")
        except StepFailed as e:
            inst = self._ask(m.dest_compute, lambda a: a.instance(m.server))
            if inst is None:
                return ""
            if inst.power_state in facts.STOPPED:
                return f"; {m.dest_compute} still defines the stopped server ({e}): remove it there by hand"
            raise Unsettled(f"{doing}: {e}; the server still runs on {m.dest_compute}, so "
                            f"{m.source_compute} was left stopped") from None

    def _restore_source(self, m: MigrationRecord, doing: str) -> None:
        """Bring the source back as it was (finish-revert-migration) unless it already is.

        :raises Unsettled: the source could not be brought back.
        """
        inst = self._ask(m.source_compute, lambda a: a.instance(m.server))
        if inst is not None and inst.power_state == m.old_power_state == PowerState.RUNNING:
            return  # its driver restarted it already, or an earlier attempt did
        try:
            self._run(m, "source", "finish-revert-migration", _revert_body(m))
        except StepFailed as e:
            raise Unsettled(f"{doing}: {e}; the server runs nowhere, its disks are kept on "
                            f"{m.source_compute}") from None

    def _confirm(self, m: MigrationRecord) -> None:
        # Only the source's kept copy goes (on shared storage the source driver keeps none and
        # only undefines the server there); nothing the destination uses is touched.
        try:
            self._run(m, "source", "confirm-migration", s.ConfirmRequest(migration=_migration_ref(m)))
        except LostJob:
            self._update(m.id, source_job=None)  # confirming twice is harmless: start again
            return
        self._set(m, _S.CONFIRMED)

    def _revert(self, m: MigrationRecord) -> None:
        try:
            note = self._clear_dest(m, "revert")
        except LostJob:
            self._update(m.id, dest_job=None)
            return
        except facts.HostLost:
            raise
        except Unsettled as e:
            # Nothing changed on the source: the server stays in VERIFY_RESIZE, so revert can be retried.
            self._set(m, _S.FINISHED, revert_failed=True,
                      error=f"revert failed: {e}; the server still runs on {m.dest_compute}: revert again, "
                            "or confirm (auto-confirm leaves it to you)")
            return
        try:
            self._restore_source(self.get(m.id), "revert")
        except LostJob:
            self._update(m.id, source_job=None)
            return
        self._set(self.get(m.id), _S.REVERTED, error=note.lstrip("; ") or None)

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
        """Take over every in-flight migration no controller holds a live lease on (this one
        restarted, or the one driving it died) and drive it; returns their ids. Run at start and
        by the service's lease timer; a migration another controller holds is left alone."""
        ids = []
        for m in self.store.in_flight_migrations(free_for=self.lease):
            previous = m.lease_owner
            if not self._take(m.id):
                continue
            m = self.get(m.id)
            log.info("migration %d is %s and no controller drives it (%s); driving it here", m.id, m.status,
                     f"the lease of {previous} ran out" if previous and previous != self.lease.owner else "released")
            try:
                if m.status == _S.MIGRATING and m.migration_type == _COLD and not m.source_job:
                    # Stopped between the status change and naming the job: nothing ran on the agent.
                    self._set(m, _S.PRE_MIGRATING)
            except BaseException:
                with self._lock:
                    self._driving.discard(m.id)
                raise
            ids.append(m.id)
            self.spawn(lambda i=m.id: self.drive(i))
        return ids

    def recover(self, migration_id: int) -> MigrationRecord:
        """Take a migration out of needs-recovery once both hosts answer: it goes on from the step it
        stopped in, which acts on what the hosts say (finishes, or rolls back on facts).

        :raises Conflict: it is not in needs-recovery, or a host still does not answer (named).
        """
        m = self.get(migration_id)
        if m.status != _S.NEEDS_RECOVERY:
            raise Conflict(reason=f"migration {m.id} is {m.status}; only a migration in "
                                  f"{_S.NEEDS_RECOVERY} can be recovered")
        silent = [f"{role} {host} does not answer ({fact.reason})"
                  for role, host in (("source", m.source_compute), ("destination", m.dest_compute))
                  if isinstance(fact := facts.where(self.inventory.agent(host), m.server), AgentError)]
        if silent:
            raise Conflict(reason=f"cannot recover migration {m.id} yet: the facts cannot be established: "
                                  + "; ".join(silent) + "; start its agent or fix the network, then try again")
        step = MigrationStatus(m.stopped_in or _S.ROLLING_BACK)
        jobs = {}
        if step in (_S.CONFIRMING, _S.REVERTING, _S.ROLLING_BACK):
            jobs = self._failed_jobs(m)  # steps re-run from scratch get new job names
        why = (m.error or "").split(_KNOWN)[0].split("; rolling back: ")[0] if step == _S.ROLLING_BACK else None
        with self._lock:
            m = self._claim_in(migration_id, _S.NEEDS_RECOVERY, f"only a migration in {_S.NEEDS_RECOVERY} can be "
                                                                "recovered")
            log.info("migration %d: both hosts answer; recovering from %s", m.id, step)
            m = self._set(m, step, stopped_in=None, error=why, **jobs)
        self._start_driving(m.id)
        return m

    def _failed_jobs(self, m: MigrationRecord) -> dict[str, None]:
        """The record's job fields naming jobs that ended in error or that the agent does not know."""
        out = {}
        for field, host, name in (("source_job", m.source_compute, m.source_job),
                                  ("dest_job", m.dest_compute, m.dest_job)):
            if name:
                job = self.inventory.agent(host).job(name)
                if job is None or job.state == "error":
                    out[field] = None
        return out

    def recover_all(self) -> list[int]:
        """One pass over the migrations in needs-recovery: those whose hosts both answer go on."""
        done = []
        for m in self.store.migrations_in(_S.NEEDS_RECOVERY):
            try:
                self.recover(m.id)
                done.append(m.id)
            except ControllerError as e:
                log.info("migration %d still needs recovery: %s", m.id, e)
        return done

    def auto_confirm(self) -> list[int]:
        """Confirm finished migrations older than ``auto_confirm_seconds`` (0: never), except those
        whose revert failed: the operator asked for the server back, so only the operator confirms."""
        window = self.config.auto_confirm_seconds
        if window <= 0:
            return []
        now = self.clock()
        done = []
        for m in self.store.list_migrations(status=_S.FINISHED):
            if m.revert_failed:
                continue
            if now - m.updated_at.timestamp() >= window:
                try:
                    self.confirm(m.id)
                    done.append(m.id)
                except Conflict:
                    continue  # confirmed or reverted by someone else meanwhile
        return done

    def wait(self, migration_id: int, until: frozenset[str], timeout: float = 3600.0,
             interval: float = 0.5, give_up: Callable[[], bool] = lambda: False) -> MigrationRecord:
        """Read the record until its status is in ``until`` (bounded by ``timeout``, and by
        ``give_up`` returning True): again whenever this controller changes a status, and every
        ``interval`` seconds for one another controller drives."""
        deadline = self.clock() + timeout
        while True:
            m = self.get(migration_id)
            if m.status in until or self.clock() >= deadline or give_up():
                return m
            with self._status_changed:
                self._status_changed.wait(interval)


class LostJob(StepFailed):
    """The agent does not know the job the record names (it restarted)."""


def _result(job: JobOut, model: type[R]) -> R:
    """A done job's result, which the agent client parsed as its op's model (agent.schemas.RESULTS)."""
    if not isinstance(job.result, model):
        raise TypeError(f"job {job.id} ({job.op}) has no {model.__name__} result")
    return job.result


def _epoch(iso: str) -> float:
    """An agent's job time (``2026-11-23T11:40:00Z``) in epoch seconds."""
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def job_name(m: MigrationRecord, op: str) -> str:
    """The name of the next job of ``m``: ``{migration uuid}-{op}-{n}``, n counting every job the
    conductor named for it, so that a step run again gets a new name."""
    return f"{m.uuid}-{op}-{m.job_seq + 1}"


def _migration_ref(m: MigrationRecord) -> s.MigrationRef:
    return s.MigrationRef(id=str(m.id), source_host=m.source_compute, dest_host=m.dest_compute)


def _revert_body(m: MigrationRecord) -> s.RevertRequest:
    """finish-revert-migration's body: the source comes back as it was."""
    return s.RevertRequest(power_on=m.old_power_state == PowerState.RUNNING, migration=_migration_ref(m))

