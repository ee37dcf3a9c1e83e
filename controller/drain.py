"""Host drain: empty a host for maintenance, one result row per instance.

The host's compute service is disabled first so that nothing new lands on
it; then every instance moves away, at most ``max_servers`` at a time:
running ones live when asked, the others cold. A paused or suspended
instance gets an error row saying why it was not moved, never a silent skip.
A cold migration's row is done when the migration is finished (the server
waits in VERIFY_RESIZE for confirm, or for auto-confirm); one in
needs-recovery is an error row. The drain is done when every row is; if
servers are still on the host then (or the host cannot be asked), the
drain's ``error`` says so, naming the host. A drain runs in the controller
holding its lease (docs/safety.md, "Several controllers"); a running drain no
controller holds (this one restarted, or the one running it died) is resumed
by the next controller's lease pass (``resume``), and every write to the drain
is fenced by the lease.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from driver.model import PowerState

from . import records
from .conductor import Conductor, Spawn, spawn_thread
from .placement import unmovable_reason
from .errors import BadRequest, Conflict, ControllerError, NotFound
from .records import DrainRecord, DrainRowRecord, DrainStatus, MigrationStatus, MigrationType, RowStatus
from .store import LeaseLost, Store

log = logging.getLogger(__name__)

DRAIN_REASON = "draining for maintenance"
# Where a drain row's migration has gone as far as the drain takes it.
_SETTLED = frozenset({MigrationStatus.FINISHED, MigrationStatus.NEEDS_RECOVERY, *records.FINAL})


class Drainer:
    """Plans and runs host drains through the conductor."""

    def __init__(self, store: Store, conductor: Conductor, spawn: Spawn = spawn_thread,
                 migration_timeout: float = 6 * 3600.0) -> None:
        self.store = store
        self.conductor = conductor
        self.spawn = spawn
        self.migration_timeout = migration_timeout
        self.lease = conductor.lease   # one controller, one owner
        self._lock = threading.Lock()
        self._running: set[int] = set()
        self._lost: set[int] = set()   # run here, but the lease went to another controller

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
        # Held from its creation: no other controller runs it before its rows are in, and marked
        # running here at once, so this controller's own lease pass does not resume it meanwhile.
        drain = self.store.create_drain(host, live, max_servers, dry_run, target_host, force, lease=self.lease)
        with self._lock:
            self._running.add(drain.id)
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
            self.store.release("drain", drain.id, self.lease)
            with self._lock:
                self._running.discard(drain.id)
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
                "target_host": d.target_host, "force": d.force, "status": d.status, "error": d.error,
                "created_at": records.isotime(d.created_at), "updated_at": records.isotime(d.updated_at),
                "totals": d.totals(), "rows": rows}

    # -- running -------------------------------------------------------------------

    def resume(self) -> list[int]:
        """Claim and run every running drain no controller holds a live lease on (this one
        restarted, or the one running it died); returns their ids. Run at start and by the
        service's lease timer."""
        ids = []
        for d in self.store.list_drains(status=DrainStatus.RUNNING, free_for=self.lease):
            with self._lock:
                if d.id in self._running or not self.store.claim("drain", d.id, self.lease,
                                                                 status=DrainStatus.RUNNING):
                    continue
                self._running.add(d.id)
                self._lost.discard(d.id)
            log.info("drain %d of %s is running and no controller runs it; running it here", d.id, d.host)
            ids.append(d.id)
            self.spawn(lambda drain_id=d.id: self.run(drain_id))
        return ids

    def renew_leases(self) -> list[int]:
        """Renew the lease of every drain run here; returns those another controller took over."""
        with self._lock:
            running = sorted(self._running - self._lost)
        lost = [i for i in running if not self.store.renew("drain", i, self.lease)]
        with self._lock:
            self._lost.update(lost)
        return lost

    def release_leases(self) -> None:
        """Let go of every drain run here (the controller stops): another controller resumes them."""
        with self._lock:
            running = sorted(self._running)
            self._lost.update(running)
        for i in running:
            self.store.release("drain", i, self.lease)

    def run(self, drain_id: int) -> None:
        """Move the queued rows, follow the rows already migrating (after a takeover), then check
        that the host is empty. Stops, touching nothing more, when another controller took the
        drain over."""
        try:
            d = self.get(drain_id)
            todo = [r for r in d.rows if r.status in (RowStatus.QUEUED, RowStatus.MIGRATING)]
            with ThreadPoolExecutor(max_workers=d.max_servers, thread_name_prefix="coldferry-drain") as pool:
                list(pool.map(lambda r: self._row(d, r), todo))
            error = self._left_on(d.host)
            self.store.update_drain(drain_id, self.lease, status=DrainStatus.DONE, error=error)
            self.store.release("drain", drain_id, self.lease)
            log.info("drain %d of %s done%s", drain_id, d.host, f": {error}" if error else "")
        except LeaseLost as e:
            log.warning("drain %d: %s; this controller stops running it", drain_id, e)
        finally:
            with self._lock:
                self._running.discard(drain_id)

    def _row(self, d: DrainRecord, row: DrainRowRecord) -> None:
        if row.migration_id is not None:
            return self._follow(row)
        if row.status == RowStatus.MIGRATING:
            # Taken over from a controller that stopped between starting the row and noting its
            # migration: the server's open migration, if there is one, is that migration.
            open_m = self.store.open_migration_for(row.server)
            if open_m is not None:
                self._update_row(row.id, migration_id=open_m.id)
                return self._follow(dataclasses.replace(row, migration_id=open_m.id))
        self._move(d, row)

    def _update_row(self, row_id: int, **fields: Any) -> None:
        """Write to a row of a drain run here: only while this controller holds the drain.

        :raises LeaseLost: another controller took the drain over.
        """
        self.store.update_drain_row(row_id, self.lease, **fields)

    def _left_on(self, host: str) -> str | None:
        """Why the host is not known to be empty, or None."""
        try:
            left = self.conductor.inventory.servers(host=host)
        except Conflict as e:
            return f"cannot tell whether host {host} is empty: {e}"
        if not left:
            return None
        return (f"host {host} still has {len(left)} server(s): " + ", ".join(f"{s.name} ({s.id})" for s in left)
                + "; see the rows' errors, then drain it again")

    def _move(self, d: DrainRecord, row: DrainRowRecord) -> None:
        self._update_row(row.id, status=RowStatus.MIGRATING)
        try:
            # The drained host is asked first (for this one server, not a listing of the fleet), so a
            # host that stopped answering mid-drain is named, not "server not found".
            if self.conductor.inventory.server_on(d.host, row.server) is None:
                open_m = self.store.open_migration_for(row.server)
                if open_m is None:
                    self._update_row(row.id, status=RowStatus.DONE, error=f"no longer on {d.host}")
                    return
                self._update_row(row.id, migration_id=open_m.id)
                return self._follow(dataclasses.replace(row, migration_id=open_m.id))
            m = self.conductor.migrate(row.server, d.target_host, d.force,
                                       live=row.migration_type == MigrationType.LIVE, on=d.host)
        except LeaseLost:
            raise
        except ControllerError as e:
            self._update_row(row.id, status=RowStatus.ERROR, accepted=False, error=str(e))
            return
        self._update_row(row.id, accepted=True, migration_id=m.id)
        self._follow(dataclasses.replace(row, migration_id=m.id))

    def _follow(self, row: DrainRowRecord) -> None:
        """Wait for the row's migration to settle and give the row its outcome."""
        assert row.migration_id is not None
        m = self.conductor.wait(row.migration_id, _SETTLED, timeout=self.migration_timeout,
                                give_up=lambda: row.drain_id in self._lost)
        if m.status in (MigrationStatus.ERROR, MigrationStatus.NEEDS_RECOVERY):
            self._update_row(row.id, status=RowStatus.ERROR, error=f"migration {m.id} {m.status}: {m.error}")
        elif m.status in _SETTLED:
            self._update_row(row.id, status=RowStatus.DONE)
        else:
            self._update_row(row.id, status=RowStatus.ERROR,
                                        error=f"migration {m.id} still {m.status} after "
                                              f"{self.migration_timeout:.0f} s; see 'coldferry server "
                                              f"migration show {m.id}'")
