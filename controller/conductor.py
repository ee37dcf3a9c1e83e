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
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from . import records, scheduler
from .agents import AgentClient
from .config import ControllerConfig
from .errors import AgentError, BadRequest, Conflict, ControllerError, NotFound, NoValidHost
from .inventory import Inventory, Server
from .records import MigrationRecord
from .store import Store

log = logging.getLogger(__name__)

Spawn = Callable[[Callable[[], None]], None]
_MOVABLE = {1, 4, 6, 0}  # running, shut off, crashed, no state
_UNMOVABLE_WHY = {3: "paused: unpause it or shut it off before migrating it",
                  7: "suspended: resume it or shut it off before migrating it"}


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

    def check_destination(self, server_ref: str, host: str) -> dict[str, Any]:
        """Whether ``host`` passes the scheduler's rules for the server, and which rule fails."""
        server = self.inventory.find(server_ref)
        rec = self._known_host(host)
        results = scheduler.check(self.inventory.host_state(rec), self._spec(server), self.ratios)
        failed = scheduler.first_failure(results)
        return {"host": host, "server": server.id, "passes": failed is None,
                "failed": failed.name if failed else None,
                "rules": [{"name": r.name, "passed": r.passed, "reason": r.reason} for r in results]}

    def _known_host(self, host: str) -> records.HostRecord:
        rec = self.store.get_host(host)
        if rec is None:
            known = ", ".join(h.name for h in self.store.list_hosts()) or "none"
            raise BadRequest(reason=f"unknown host {host!r}; configured hosts: {known}")
        return rec

    def _check_movable(self, server: Server) -> None:
        if server.power_state in _UNMOVABLE_WHY:
            raise Conflict(reason=f"server {server.name} ({server.id}) cannot be migrated: it is "
                                  + _UNMOVABLE_WHY[server.power_state])
        if server.power_state not in _MOVABLE:
            raise Conflict(reason=f"server {server.name} ({server.id}) is in power state {server.power_state} "
                                  "and cannot be migrated")
        open_m = self.store.open_migration_for(server.id)
        if open_m is not None:
            what = ("confirm or revert it first" if open_m.status == records.FINISHED
                    else "wait until it ends")
            raise Conflict(reason=f"server {server.name} ({server.id}) already has migration {open_m.id} in "
                                  f"status {open_m.status}; {what}")

    def _pick(self, server: Server, host: str | None, force: bool) -> records.HostRecord:
        if force and not host:
            raise BadRequest(reason="force needs a target host: give host, or drop force to let the "
                                    "scheduler choose")
        if host:
            rec = self._known_host(host)
            if host == server.host:
                raise BadRequest(reason=f"server {server.name} is already on host {host}; choose another host")
            if not force:
                results = scheduler.check(self.inventory.host_state(rec), self._spec(server), self.ratios)
                failed = scheduler.first_failure(results)
                if failed:
                    raise NoValidHost(server=server.id, reason=f"host {host} fails rule {failed.name}: "
                                                               f"{failed.reason} (force skips the check)")
            return rec
        chosen = scheduler.select(self.inventory.host_states(), self._spec(server), self.ratios)
        return self._known_host(chosen)

    # -- starting ----------------------------------------------------------------

    def migrate(self, server_ref: str, host: str | None = None, force: bool = False,
                live: bool = False) -> MigrationRecord:
        """Check, record and start a cold (or live) migration; returns the new record.

        :raises BadRequest: force without host, unknown or current host, a failing rule.
        :raises Conflict: the server is paused, suspended or already migrating.
        :raises NotFound: no such server.
        """
        with self._lock:
            server = self.inventory.find(server_ref)
            self._check_movable(server)
            if live and server.power_state != 1:
                raise Conflict(reason=f"server {server.name} is not running; live migration needs a running "
                                      "server (use a cold migration)")
            dest = self._pick(server, host, force)
            m = self.store.create_migration(
                server=server.id, server_name=server.name, source_compute=server.host, dest_compute=dest.name,
                dest_address=dest.address, status=records.PRE_MIGRATING,
                migration_type=records.LIVE if live else records.COLD,
                task_state=records.LIVE_TASK_STATE if live else records.TASK_STATES[records.PRE_MIGRATING],
                forced=bool(force), old_power_state=server.power_state, flavor=server.flavor)
        log.info("migration %d: %s %s from %s to %s%s", m.id, m.migration_type, server.id, server.host,
                 dest.name, " (forced)" if force else "")
        self._start_driving(m.id)
        return m

    def confirm(self, migration_id: int) -> MigrationRecord:
        return self._finish_verb(migration_id, records.CONFIRMING, "confirm")

    def revert(self, migration_id: int) -> MigrationRecord:
        return self._finish_verb(migration_id, records.REVERTING, "revert")

    def _finish_verb(self, migration_id: int, status: str, verb: str) -> MigrationRecord:
        with self._lock:
            m = self.get(migration_id)
            if m.status != records.FINISHED:
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

    def _steps(self) -> dict[tuple[str, str], Callable[[MigrationRecord], None]]:
        C, L = records.COLD, records.LIVE
        return {(C, records.PRE_MIGRATING): lambda m: self._set(m, records.MIGRATING),
                (C, records.MIGRATING): self._copy,
                (C, records.POST_MIGRATING): self._finish_on_dest,
                (C, records.CONFIRMING): self._confirm,
                (C, records.REVERTING): self._revert,
                (L, records.PRE_MIGRATING): lambda m: self._set(m, records.MIGRATING),
                (L, records.MIGRATING): self._live}

    def _set(self, m: MigrationRecord, status: str, **fields: Any) -> MigrationRecord:
        task = records.LIVE_TASK_STATE if m.migration_type == records.LIVE and status not in records.FINAL \
            else records.TASK_STATES[status]
        return self.store.update_migration(m.id, status=status, task_state=task, **fields)

    def _fail(self, m: MigrationRecord, message: str) -> None:
        log.error("migration %d failed: %s", m.id, message)
        self.store.update_migration(m.id, status=records.ERROR, task_state=None, error=message, progress=None)

    def _run(self, m: MigrationRecord, host: str, job_field: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        """Start ``op`` on ``host`` (or pick up the job the record names) and wait for it to end.

        :returns: the job's result.
        :raises StepFailed: the job ended in error, or the agent no longer knows it.
        """
        agent = self.inventory.agent(host)
        job_id = getattr(m, job_field)
        if job_id:
            job = agent.job(job_id)
            if job is None or job.get("op") != op:
                raise LostJob(f"the agent of {host} no longer knows job {job_id} ({op}); it was restarted")
        else:
            job = agent.start(m.server, op, body)
            m = self.store.update_migration(m.id, **{job_field: job["id"]})

        def on_update(j: dict[str, Any]) -> None:
            if j.get("progress"):
                self.store.update_migration(m.id, progress=j["progress"])

        job = self._wait_job(agent, host, job["id"], on_update)
        if job["state"] == "error":
            err = job.get("error") or {}
            raise StepFailed(f"{op} on {host}: {err.get('message', 'failed')}")
        return job.get("result") or {}

    def _wait_job(self, agent: AgentClient, host: str, job_id: str,
                  on_update: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Wait for a job; an agent out of reach for a while is waited for, not given up on at once,
        because the job goes on without us."""
        deadline = self.clock() + self.agent_lost_seconds
        while True:
            try:
                return agent.wait(job_id, on_update=on_update)
            except AgentError as e:
                if getattr(e, "agent_status", None) == 404:
                    raise LostJob(f"the agent of {host} no longer knows job {job_id}; it was restarted") from None
                if self.clock() >= deadline:
                    raise StepFailed(f"lost the agent of {host} while job {job_id} ran: {e}") from None
                log.warning("agent of %s out of reach while job %s runs (%s); retrying", host, job_id, e)
                self.sleep(self.config.poll_interval)

    def _copy(self, m: MigrationRecord) -> None:
        body = {"dest": m.dest_address, "flavor": m.flavor, "timeout": self.config.shutdown_timeout,
                "retry_interval": self.config.shutdown_retry_interval}
        try:
            result = self._run(m, m.source_compute, "source_job", "migrate-disk-and-power-off", body)
        except LostJob as e:
            self._roll_back(m, f"{e}; the copy was abandoned")
            return
        copies = result.get("copies", [])
        seconds = sum(c.get("seconds", 0.0) for c in copies)
        sent = sum(c.get("sent", 0) for c in copies)
        before = result.get("bytes_before_power_off", 0)
        self._set(m, records.POST_MIGRATING, disk_info=result.get("disk_info", "[]"), dest_job=None,
                  powered_off_at=result.get("powered_off_at"), bytes_sent=sent,
                  precopy=bool(result.get("precopy", False)), bytes_before_power_off=before,
                  bytes_after_power_off=result.get("bytes_after_power_off", sent - before),
                  bytes_skipped=sum(c.get("skipped", 0) for c in copies), rate=sent / seconds if seconds else 0.0,
                  digests=[c["digest"] for c in copies if c.get("digest")], progress=None)

    def _finish_on_dest(self, m: MigrationRecord) -> None:
        body = {"name": m.server_name, "flavor": m.flavor, "disk_info": m.disk_info or "[]",
                "migration": {"id": str(m.id), "source_host": m.source_compute, "dest_host": m.dest_compute},
                "resize_instance": False, "power_on": m.old_power_state == 1}
        try:
            result = self._run(m, m.dest_compute, "dest_job", "finish-migration", body)
        except LostJob:
            inst = self.inventory.agent(m.dest_compute).instance(m.server)
            if inst is None or (m.old_power_state == 1 and inst.get("power_state") != 1):
                self._roll_back(m, f"the agent of {m.dest_compute} restarted while finishing the migration")
                return
            result = {}
        except StepFailed as e:
            self._roll_back(m, str(e))
            return
        running_at = result.get("running_at")
        downtime = None
        if m.old_power_state == 1 and running_at and m.powered_off_at:
            downtime = round(running_at - m.powered_off_at, 3)
        self._set(m, records.FINISHED, downtime_s=downtime, progress=None)

    def _roll_back(self, m: MigrationRecord, why: str) -> None:
        """Remove the destination's copy, bring the source back as it was, and end in error."""
        notes = []
        for host, op, body, field in ((m.dest_compute, "destroy", {"destroy_disks": True}, "dest_job"),
                                      (m.source_compute, "finish-revert-migration",
                                       {"power_on": m.old_power_state == 1,
                                        "migration": {"id": str(m.id), "source_host": m.source_compute,
                                                      "dest_host": m.dest_compute}}, "source_job")):
            try:
                self._run(self.store.update_migration(m.id, **{field: None}), host, field, op, body)
            except (StepFailed, ControllerError) as e:
                notes.append(str(e))
        restored = "the source was restored" if not notes else "rolling back also failed: " + "; ".join(notes)
        self._fail(self.get(m.id), f"{why}; {restored}")

    def _confirm(self, m: MigrationRecord) -> None:
        body = {"migration": {"id": str(m.id), "source_host": m.source_compute, "dest_host": m.dest_compute}}
        try:
            self._run(m, m.source_compute, "source_job", "confirm-migration", body)
        except LostJob:
            self.store.update_migration(m.id, source_job=None)  # confirming twice is harmless: start again
            return
        self._set(m, records.CONFIRMED)

    def _revert(self, m: MigrationRecord) -> None:
        try:
            self._run(m, m.dest_compute, "dest_job", "destroy", {"destroy_disks": True})
        except LostJob:
            self.store.update_migration(m.id, dest_job=None)
            return
        except StepFailed as e:
            # Nothing changed on the source: the server stays in VERIFY_RESIZE, so revert can be retried.
            self._set(m, records.FINISHED, error=f"revert failed: {e}; the server still runs on "
                                                 f"{m.dest_compute}: revert again, or confirm")
            return
        m = self.get(m.id)
        body = {"power_on": m.old_power_state == 1,
                "migration": {"id": str(m.id), "source_host": m.source_compute, "dest_host": m.dest_compute}}
        try:
            self._run(m, m.source_compute, "source_job", "finish-revert-migration", body)
        except LostJob:
            self.store.update_migration(m.id, source_job=None)
            return
        self._set(m, records.REVERTED)

    def _live(self, m: MigrationRecord) -> None:
        try:
            result = self._run(m, m.source_compute, "source_job", "live-migrate", {"dest": m.dest_address})
        except LostJob as e:
            where = self.inventory.agent(m.dest_compute).instance(m.server)
            if where is not None and where.get("power_state") == 1:
                self._set(m, records.COMPLETED)
            else:
                self._fail(m, f"{e}; the server stayed on {m.source_compute}")
            return
        self._set(m, records.COMPLETED, downtime_s=result.get("downtime_s"), progress=None)

    # -- after a restart, and over time ----------------------------------------------

    def reconcile(self) -> list[int]:
        """Pick up every migration a restart left in flight; returns their ids."""
        ids = []
        for m in self.store.in_flight_migrations():
            log.info("migration %d was %s when the controller stopped; picking it up", m.id, m.status)
            if m.status == records.MIGRATING and m.migration_type == records.COLD and not m.source_job:
                # Stopped between the status change and the job start: nothing ran on the agent.
                self._set(m, records.PRE_MIGRATING)
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
        for m in self.store.list_migrations(status=records.FINISHED):
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

