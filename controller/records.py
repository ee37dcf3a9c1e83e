"""The controller's records: hosts, migrations and drains as the store keeps them."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

# Nova's migration statuses.
PRE_MIGRATING = "pre-migrating"
MIGRATING = "migrating"
POST_MIGRATING = "post-migrating"
FINISHED = "finished"
CONFIRMING = "confirming"
CONFIRMED = "confirmed"
REVERTING = "reverting"
REVERTED = "reverted"
ERROR = "error"
COMPLETED = "completed"   # a live migration that ended well (there is nothing to confirm)
STATUSES = (PRE_MIGRATING, MIGRATING, POST_MIGRATING, FINISHED, CONFIRMING, CONFIRMED, REVERTING,
            REVERTED, COMPLETED, ERROR)
FINAL = frozenset({CONFIRMED, REVERTED, COMPLETED, ERROR})
# Statuses in which a controller or agent restart leaves work to reconcile.
IN_FLIGHT = frozenset({PRE_MIGRATING, MIGRATING, POST_MIGRATING, CONFIRMING, REVERTING})

COLD = "migration"
LIVE = "live-migration"

# The instance's task state alongside each status (Nova's names).
TASK_STATES = {PRE_MIGRATING: "resize_prep", MIGRATING: "resize_migrating", POST_MIGRATING: "resize_finish",
               FINISHED: None, CONFIRMING: "resize_confirming", REVERTING: "resize_reverting",
               CONFIRMED: None, REVERTED: None, COMPLETED: None, ERROR: None}
LIVE_TASK_STATE = "migrating"


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
    status: str = PRE_MIGRATING
    migration_type: str = COLD
    task_state: str | None = "resize_prep"
    forced: bool = False
    old_power_state: int = 0
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
    # Internal: what the conductor needs to pick a migration up again after a restart.
    disk_info: str | None = None
    source_job: str | None = None
    dest_job: str | None = None
    powered_off_at: float | None = None
    created_at: dt.datetime = field(default_factory=utcnow)
    updated_at: dt.datetime = field(default_factory=utcnow)

    def to_api(self) -> dict[str, Any]:
        d = asdict(self)
        for internal in ("disk_info", "source_job", "dest_job", "powered_off_at", "flavor"):
            d.pop(internal)
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
    migration_type: str | None = None
    accepted: bool = False
    status: str = "queued"   # planned | queued | migrating | done | error
    error: str | None = None
    migration_id: int | None = None

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
    status: str = "running"   # running | done
    rows: list[DrainRowRecord] = field(default_factory=list)
    created_at: dt.datetime = field(default_factory=utcnow)
    updated_at: dt.datetime = field(default_factory=utcnow)

    def totals(self) -> dict[str, int]:
        t = {"total": len(self.rows), "queued": 0, "migrating": 0, "done": 0, "error": 0, "planned": 0}
        for r in self.rows:
            t[r.status] = t.get(r.status, 0) + 1
        return t
