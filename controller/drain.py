"""Host drain: empty a host for maintenance, one result row per instance.

The host's compute service is disabled first so that nothing new lands on
it; then every instance moves away, at most ``max_servers`` at a time:
running ones live when asked, the others cold. A paused or suspended
instance gets an error row saying why it was not moved, never a silent skip.
A cold migration's row is done when the migration is finished (the server
waits in VERIFY_RESIZE for confirm, or for auto-confirm).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from driver.model import PowerState

from . import records
from .conductor import Conductor, Spawn, spawn_thread, unmovable_reason
from .errors import BadRequest, Conflict, ControllerError, NotFound
from .records import DrainRecord, DrainRowRecord, DrainStatus, MigrationStatus, MigrationType, RowStatus
from .store import Store

log = logging.getLogger(__name__)

DRAIN_REASON = "draining for maintenance"
# Where a drain row's migration has gone as far as the drain takes it.
_SETTLED = frozenset({MigrationStatus.FINISHED, *records.FINAL})


class Drainer:
    """Plans and runs host drains through the conductor."""

    def __init__(self, store: Store, conductor: Conductor, spawn: Spawn = spawn_thread,
                 migration_timeout: float = 6 * 3600.0) -> None:
        self.store = store
        self.conductor = conductor
        self.spawn = spawn
        self.migration_timeout = migration_timeout

    def start(self, host: str, live: bool = False, max_servers: int = 1, dry_run: bool = False,
              target_host: str | None = None, force: bool = False) -> DrainRecord:
        """Disable ``host`` and start moving its instances away (or only plan, with ``dry_run``).

        :raises BadRequest: unknown host or target, max_servers < 1, force without a target,
            the target being the drained host.
        :raises Conflict: the host's agent does not answer.
        """
        if max_servers < 1:
            raise BadRequest(reason=f"max_servers must be at least 1, not {max_servers}")
        self.conductor.check_target(host, target_host, force)
        inv = self.conductor.inventory
        state = inv.host_state(inv.host_record(host))
        if not state.up:  # a host that cannot be asked would look empty: refuse instead
            raise Conflict(reason=f"cannot drain {host}: its agent does not answer ({state.error})")
        servers = inv.servers(host=host)
        if not dry_run:
            rec = self.store.get_host(host)
            if rec is not None and rec.enabled:
                self.store.set_service(host, False, DRAIN_REASON)
        drain = self.store.create_drain(host, live, max_servers, dry_run, target_host, force)
        for s in servers:
            why = unmovable_reason(s.power_state)
            live_move = live and s.power_state == PowerState.RUNNING
            if why is not None:
                self.store.add_drain_row(drain.id, s.id, s.name, s.state or s.status.lower(), None, False,
                                         RowStatus.ERROR, error=f"server is {why}, then migrate it; it was not moved")
            else:
                self.store.add_drain_row(drain.id, s.id, s.name, s.state or s.status.lower(),
                                         MigrationType.LIVE if live_move else MigrationType.COLD, False,
                                         RowStatus.PLANNED if dry_run else RowStatus.QUEUED)
        if dry_run or not servers:
            self.store.update_drain(drain.id, status=DrainStatus.DONE)
        else:
            self.spawn(lambda: self.run(drain.id))
        return self.get(drain.id)

    def get(self, drain_id: int) -> DrainRecord:
        d = self.store.get_drain(drain_id)
        if d is None:
            raise NotFound("drain", drain_id)
        return d

    def to_api(self, d: DrainRecord) -> dict[str, Any]:
        rows = []
        for r in d.rows:
            row = r.to_api()
            row["progress"] = None
            if r.migration_id is not None and r.status == RowStatus.MIGRATING:
                m = self.store.get_migration(r.migration_id)
                row["progress"] = m.progress if m else None
            rows.append(row)
        return {"id": d.id, "host": d.host, "live": d.live, "max_servers": d.max_servers, "dry_run": d.dry_run,
                "target_host": d.target_host, "force": d.force, "status": d.status,
                "created_at": records.isotime(d.created_at), "updated_at": records.isotime(d.updated_at),
                "totals": d.totals(), "rows": rows}

    # -- running -------------------------------------------------------------------

    def run(self, drain_id: int) -> None:
        d = self.get(drain_id)
        queued = [r for r in d.rows if r.status == RowStatus.QUEUED]
        with ThreadPoolExecutor(max_workers=d.max_servers, thread_name_prefix="coldferry-drain") as pool:
            list(pool.map(lambda r: self._move(d, r), queued))
        self.store.update_drain(drain_id, status=DrainStatus.DONE)
        log.info("drain %d of %s done", drain_id, d.host)

    def _move(self, d: DrainRecord, row: DrainRowRecord) -> None:
        self.store.update_drain_row(row.id, status=RowStatus.MIGRATING)
        try:
            m = self.conductor.migrate(row.server, d.target_host, d.force,
                                       live=row.migration_type == MigrationType.LIVE)
        except ControllerError as e:
            self.store.update_drain_row(row.id, status=RowStatus.ERROR, accepted=False, error=str(e))
            return
        self.store.update_drain_row(row.id, accepted=True, migration_id=m.id)
        m = self.conductor.wait(m.id, _SETTLED, timeout=self.migration_timeout)
        if m.status == MigrationStatus.ERROR:
            self.store.update_drain_row(row.id, status=RowStatus.ERROR, error=m.error)
        elif m.status in _SETTLED:
            self.store.update_drain_row(row.id, status=RowStatus.DONE)
        else:
            self.store.update_drain_row(row.id, status=RowStatus.ERROR,
                                        error=f"migration {m.id} still {m.status} after "
                                              f"{self.migration_timeout:.0f} s; see 'coldferry server "
                                              f"migration show {m.id}'")

