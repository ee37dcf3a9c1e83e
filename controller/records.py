"""The controller's records: hosts, migrations and drains as the store keeps them."""

from __future__ import annotations

import datetime as dt
import enum
import os
import secrets
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from driver.model import Phase, PowerState


class MigrationStatus(enum.StrEnum):
    """Nova's migration statuses, in the order a migration passes them."""

    PRE_MIGRATING = "pre-migrating"
    MIGRATING = "migrating"
    POST_MIGRATING = "post-migrating"
    FINISHED = "finished"
    CONFIRMING = "confirming"
    CONFIRMED = "confirmed"
    REVERTING = "reverting"
    REVERTED = "reverted"
    COMPLETED = "completed"   # a live migration that ended well (there is nothing to confirm)
    ERROR = "error"
    # Internal steps and states of docs/safety.md: undoing a failed step on facts, and waiting
    # for hosts that do not answer (the server is safe, but where it runs is not known yet).
    ROLLING_BACK = "rolling-back"
    NEEDS_RECOVERY = "needs-recovery"


class MigrationType(enum.StrEnum):
    COLD = "migration"
    LIVE = "live-migration"


class DrainStatus(enum.StrEnum):
    """A drain runs, then is done; ``error`` on the drain says when the host is not empty."""

    RUNNING = "running"
    DONE = "done"


class RowStatus(enum.StrEnum):
    """What became of one instance of a drain."""

    QUEUED = "queued"
    MIGRATING = "migrating"
    DONE = "done"
    ERROR = "error"
    PLANNED = "planned"       # a dry run: it would be moved


_S = MigrationStatus
FINAL = frozenset({_S.CONFIRMED, _S.REVERTED, _S.COMPLETED, _S.ERROR})
# Statuses in which a controller or agent restart leaves work to reconcile.
IN_FLIGHT = frozenset({_S.PRE_MIGRATING, _S.MIGRATING, _S.POST_MIGRATING, _S.CONFIRMING, _S.REVERTING,
                       _S.ROLLING_BACK})
# The steps a migration in needs-recovery may have stopped in (``stopped_in``), and so resumes.
RECOVERABLE = frozenset({_S.MIGRATING, _S.POST_MIGRATING, _S.CONFIRMING, _S.REVERTING, _S.ROLLING_BACK})

# The instance's task state alongside each status (Nova's names).
TASK_STATES: dict[MigrationStatus, str | None] = {
    _S.PRE_MIGRATING: "resize_prep", _S.MIGRATING: "resize_migrating", _S.POST_MIGRATING: "resize_finish",
    _S.FINISHED: None, _S.CONFIRMING: "resize_confirming", _S.REVERTING: "resize_reverting",
    _S.CONFIRMED: None, _S.REVERTED: None, _S.COMPLETED: None, _S.ERROR: None,
    _S.ROLLING_BACK: "resize_reverting", _S.NEEDS_RECOVERY: "resize_recovering"}
LIVE_TASK_STATE = "migrating"


@dataclass(frozen=True)
class Lease:
    """A controller's claim on the migrations and drains it drives (docs/safety.md, "Several
    controllers"): ``owner`` names the controller, unique per process start; a claim or renewal
    holds for ``seconds``, after which another controller may take the record over."""

    owner: str
    seconds: float = 60.0


def controller_id() -> str:
    """A lease owner unique to this process start: host name, pid and a random part."""
    return f"{socket.gethostname()[:200]}-{os.getpid()}-{secrets.token_hex(4)}"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def isotime(t: dt.datetime | None) -> str | None:
    return None if t is None else t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class HostRecord:
    """A compute host as configured, with its compute-service status."""

    name: str
    agent_url: str
    address: str
    enabled: bool = True
    disabled_reason: str | None = None


@dataclass
class MigrationRecord:
    """One migration of one server. ``id`` is the store's integer key."""

    id: int
    uuid: str
    server: str
    server_name: str
    source_compute: str
    dest_compute: str
    dest_address: str
    status: MigrationStatus = MigrationStatus.PRE_MIGRATING
    migration_type: MigrationType = MigrationType.COLD
    task_state: str | None = "resize_prep"
    forced: bool = False
    old_power_state: PowerState = PowerState.NOSTATE
    flavor: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] | None = None
    bytes_sent: int = 0
    bytes_skipped: int = 0
    rate: float = 0.0
    digests: list[str] = field(default_factory=list)
    downtime_s: float | None = None
    # Cold migrations: data copied while the server still ran (pre-copy) and after its power-off.
    precopy: bool = False
    bytes_before_power_off: int = 0
    bytes_after_power_off: int = 0
    error: str | None = None
    # Internal: the instance directory is on storage both hosts see (None until the copy reports it).
    shared: bool | None = None
    # Internal: what the conductor needs to pick a migration up again after a restart.
    disk_info: str | None = None
    source_job: str | None = None
    dest_job: str | None = None
    powered_off_at: float | None = None
    # A revert failed on this migration: auto-confirm leaves it to the operator.
    revert_failed: bool = False
    # needs-recovery: the step it stopped in (a RECOVERABLE status), which recovery resumes.
    stopped_in: str | None = None
    # How many jobs the conductor has named for this migration (job names end in it).
    job_seq: int = 0
    # Where the time went: the conductor's phases and the agents' (each with its host), in the
    # order they were recorded (driver.model.PhaseName lists them).
    timeline: list[Phase] = field(default_factory=list)
    # Internal: when the request was accepted (epoch seconds), the start of the scheduled phase.
    requested_at: float | None = None
    # Internal: the controller that drives it, until when (None: nobody does now).
    lease_owner: str | None = None
    lease_until: dt.datetime | None = None
    created_at: dt.datetime = field(default_factory=utcnow)
    updated_at: dt.datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        # The store hands back plain strings and ints: make them the enums again.
        self.status = MigrationStatus(self.status)
        self.migration_type = MigrationType(self.migration_type)
        self.old_power_state = PowerState(self.old_power_state)

    def to_api(self) -> dict[str, Any]:
        d = asdict(self)
        for internal in ("shared", "disk_info", "source_job", "dest_job", "powered_off_at", "flavor", "job_seq",
                         "lease_owner", "lease_until", "requested_at"):
            d.pop(internal)
        d["timeline"] = [p.to_dict() for p in self.timeline]
        d["created_at"] = isotime(self.created_at)
        d["updated_at"] = isotime(self.updated_at)
        return d


@dataclass
class DrainRowRecord:
    """One instance of a host drain and what became of it."""

    id: int
    drain_id: int
    server: str
    name: str
    state_before: str
    migration_type: MigrationType | None = None
    accepted: bool = False
    status: RowStatus = RowStatus.QUEUED
    error: str | None = None
    migration_id: int | None = None

    def __post_init__(self) -> None:
        self.status = RowStatus(self.status)
        self.migration_type = None if self.migration_type is None else MigrationType(self.migration_type)

    def to_api(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("id")
        d.pop("drain_id")
        return d


@dataclass
class DrainRecord:
    """A host drain: its options and one row per instance."""

    id: int
    host: str
    live: bool = False
    max_servers: int = 1
    dry_run: bool = False
    target_host: str | None = None
    force: bool = False
    status: DrainStatus = DrainStatus.RUNNING
    # Set when the drain ended with servers still on the host, or could not tell.
    error: str | None = None
    # The controller that runs it, until when (None: nobody does now).
    lease_owner: str | None = None
    lease_until: dt.datetime | None = None
    rows: list[DrainRowRecord] = field(default_factory=list)
    created_at: dt.datetime = field(default_factory=utcnow)
    updated_at: dt.datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        self.status = DrainStatus(self.status)

    def totals(self) -> dict[str, int]:
        t = {"total": len(self.rows), **{str(s): 0 for s in RowStatus}}
        for r in self.rows:
            t[r.status] += 1
        return t
