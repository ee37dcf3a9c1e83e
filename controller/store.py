"""The controller's records in a SQL database: SQLite by default, PostgreSQL by URL.

SQLAlchemy Core with portable SQL only. The schema carries its version in
``schema_version``; opening a database creates it or upgrades it step by step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import os
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from . import records
from .errors import ControllerError, NotFound
from .records import DrainRecord, DrainRowRecord, HostRecord, Lease, MigrationRecord


#: The largest id a migration or drain can have: INTEGER is 32 bits on PostgreSQL (64 on SQLite).
#: A lookup outside 1..MAX_ID finds nothing rather than asking the database what it cannot hold.
MAX_ID = 2 ** 31 - 1


class StoreError(ControllerError):
    msg = "database {url}: {reason}"


class OpenMigrationExists(StoreError):
    """The database refused a second open migration of one server (its partial unique index)."""

    msg = "database {url}: server {server} already has an open migration ({other}); it refuses a second"


class DatabaseInUse(StoreError):
    """Another controller holds the SQLite file (see ``Store(exclusive=True)``)."""

    msg = ("database {url}: another controller uses it (it holds {lock}); a SQLite database is for one "
           "controller: stop the other one, or give every controller the same PostgreSQL URL")


class LeaseLost(StoreError):
    """A controller wrote to a migration or drain whose lease another controller took (or it let go)."""

    msg = "database {url}: {kind} {id} is no longer driven by this controller ({owner}): {now}"


class _UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """Aware UTC datetimes, stored naive (in UTC) so both databases compare them alike."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # taken as UTC, as the API's changes-since is
            return value
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.timezone.utc)


class _JSONText(sa.TypeDecorator[Any]):
    """A JSON value kept as text: the same on SQLite and PostgreSQL."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else json.dumps(value)

    def process_result_value(self, value: str | None, dialect: Any) -> Any:
        return None if value is None else json.loads(value)


_meta = sa.MetaData()
_version = sa.Table("schema_version", _meta, sa.Column("version", sa.Integer, nullable=False))
_hosts = sa.Table(
    "hosts", _meta,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("agent_url", sa.Text, nullable=False),
    sa.Column("address", sa.Text, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("disabled_reason", sa.Text))
_migrations = sa.Table(
    "migrations", _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("uuid", sa.String(36), nullable=False, unique=True),
    sa.Column("server", sa.String(36), nullable=False),
    sa.Column("server_name", sa.Text, nullable=False),
    # Host names, not foreign keys: the history outlives a host's removal from the config.
    sa.Column("source_compute", sa.String(255), nullable=False),
    sa.Column("dest_compute", sa.String(255), nullable=False),
    sa.Column("dest_address", sa.Text, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("migration_type", sa.String(32), nullable=False),
    sa.Column("task_state", sa.String(32)),
    sa.Column("forced", sa.Boolean, nullable=False),
    sa.Column("old_power_state", sa.Integer, nullable=False),
    sa.Column("flavor", _JSONText, nullable=False),
    sa.Column("progress", _JSONText),
    sa.Column("bytes_sent", sa.BigInteger, nullable=False),
    sa.Column("bytes_skipped", sa.BigInteger, nullable=False),
    sa.Column("rate", sa.Float, nullable=False),
    sa.Column("digests", _JSONText, nullable=False),
    sa.Column("downtime_s", sa.Float),
    sa.Column("precopy", sa.Boolean, nullable=False),
    sa.Column("bytes_before_power_off", sa.BigInteger, nullable=False),
    sa.Column("bytes_after_power_off", sa.BigInteger, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("shared", sa.Boolean),
    sa.Column("disk_info", sa.Text),
    # Job names are {uuid}-{op}-{n}: 65 characters and more.
    sa.Column("source_job", sa.String(255)),
    sa.Column("dest_job", sa.String(255)),
    sa.Column("powered_off_at", sa.Float),
    sa.Column("revert_failed", sa.Boolean, nullable=False),
    sa.Column("stopped_in", sa.String(32)),
    sa.Column("job_seq", sa.Integer, nullable=False),
    # The lease of the controller driving it (docs/safety.md, "Several controllers").
    sa.Column("lease_owner", sa.String(255)),
    sa.Column("lease_until", _UTCDateTime),
    sa.Column("created_at", _UTCDateTime, nullable=False),
    sa.Column("updated_at", _UTCDateTime, nullable=False),
    sa.Index("ix_migrations_updated_at", "updated_at"),
    sa.Index("ix_migrations_server", "server"),
    sa.Index("ix_migrations_status", "status"),
    sqlite_autoincrement=True)  # an id the API has shown is never handed out again
# One open migration per server, enforced by the database itself: two controllers (or two
# requests) that both pass the conductor's check cannot both record one. Open is every status but
# the FINAL ones ('finished' and 'needs-recovery' included); a status added later is open until
# named final, so the index errs on refusing.
_OPEN_WHERE = sa.text("status NOT IN (%s)" % ", ".join(f"'{s.value}'" for s in sorted(records.FINAL)))
_open_index = sa.Index("ux_migrations_open_server", _migrations.c.server, unique=True,
                       sqlite_where=_OPEN_WHERE, postgresql_where=_OPEN_WHERE)
_drains = sa.Table(
    "drains", _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("live", sa.Boolean, nullable=False),
    sa.Column("max_servers", sa.Integer, nullable=False),
    sa.Column("dry_run", sa.Boolean, nullable=False),
    sa.Column("target_host", sa.String(255)),
    sa.Column("force", sa.Boolean, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("lease_owner", sa.String(255)),
    sa.Column("lease_until", _UTCDateTime),
    sa.Column("created_at", _UTCDateTime, nullable=False),
    sa.Column("updated_at", _UTCDateTime, nullable=False),
    sqlite_autoincrement=True)
_drain_rows = sa.Table(
    "drain_rows", _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("drain_id", sa.Integer, sa.ForeignKey("drains.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("server", sa.String(36), nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("state_before", sa.String(32), nullable=False),
    sa.Column("migration_type", sa.String(32)),
    sa.Column("accepted", sa.Boolean, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("migration_id", sa.Integer, sa.ForeignKey("migrations.id")))


# Upgrade steps, in order: (version reached, what it does, step). A new database is created
# from the tables above at SCHEMA_VERSION directly; these steps bring older ones there, each in
# its own transaction. A step spells out its own DDL (ALTER TABLE ... ADD ...): the tables above
# describe only the newest version. To change the schema, change the tables, append a step and
# raise SCHEMA_VERSION to its version.
SCHEMA_VERSION = 6


def _add_precopy_columns(conn: Connection) -> None:
    # Old rows: no pre-copy, everything was copied after the power-off (bytes_sent).
    for ddl in ("ALTER TABLE migrations ADD COLUMN precopy BOOLEAN NOT NULL DEFAULT FALSE",
                "ALTER TABLE migrations ADD COLUMN bytes_before_power_off BIGINT NOT NULL DEFAULT 0",
                "ALTER TABLE migrations ADD COLUMN bytes_after_power_off BIGINT NOT NULL DEFAULT 0"):
        conn.exec_driver_sql(ddl)
    conn.exec_driver_sql("UPDATE migrations SET bytes_after_power_off = bytes_sent WHERE migration_type = 'migration'")


def _add_shared_column(conn: Connection) -> None:
    # Old rows: not known (NULL); the copy reports it from now on.
    conn.exec_driver_sql("ALTER TABLE migrations ADD COLUMN shared BOOLEAN")


def _add_recovery_columns(conn: Connection) -> None:
    # Old rows: no failed revert, not in needs-recovery, no named jobs; old drains: no error.
    for ddl in ("ALTER TABLE migrations ADD COLUMN revert_failed BOOLEAN NOT NULL DEFAULT FALSE",
                "ALTER TABLE migrations ADD COLUMN stopped_in VARCHAR(32)",
                "ALTER TABLE migrations ADD COLUMN job_seq INTEGER NOT NULL DEFAULT 0",
                "ALTER TABLE drains ADD COLUMN error TEXT"):
        conn.exec_driver_sql(ddl)


def _add_open_migration_index(conn: Connection) -> None:
    # A database from before the index may hold two open migrations of one server: the index
    # cannot be built over them, and which one is real is the operator's call.
    doubled = conn.execute(sa.select(_migrations.c.server, sa.func.count())
                           .where(_OPEN_WHERE).group_by(_migrations.c.server)
                           .having(sa.func.count() > 1).order_by(_migrations.c.server)).all()
    if doubled:
        raise RuntimeError("servers with more than one open migration: " + ", ".join(
            f"{server} ({n})" for server, n in doubled) + "; end all but one of each (set its status "
            "to error) and open the database again")
    _open_index.create(conn)


def _add_lease_columns(conn: Connection) -> None:
    # Old rows: nobody holds them; the next controller to claim one drives it.
    for table in ("migrations", "drains"):
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN lease_owner VARCHAR(255)")
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN lease_until TIMESTAMP")
    if conn.dialect.name == "postgresql":
        # A job name ({uuid}-{op}-{n}) is longer than the 64 characters these had; SQLite never
        # enforced the length.
        for column in ("source_job", "dest_job"):
            conn.exec_driver_sql(f"ALTER TABLE migrations ALTER COLUMN {column} TYPE VARCHAR(255)")


STEPS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (2, "pre-copy and bytes before/after power-off on migrations", _add_precopy_columns),
    (3, "whether a migration's instance directory is on shared storage", _add_shared_column),
    (4, "failed reverts, needs-recovery and named jobs on migrations; errors on drains", _add_recovery_columns),
    (5, "at most one open migration per server (a partial unique index)", _add_open_migration_index),
    (6, "leases: the controller driving each migration and drain; full-length job names", _add_lease_columns),
]

_MIGRATION_FIELDS = frozenset(f.name for f in dataclasses.fields(MigrationRecord))
_DRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(DrainRecord)) - {"rows"}
_ROW_FIELDS = frozenset(f.name for f in dataclasses.fields(DrainRowRecord))
# Set by the store itself, never by a caller.
_OWN = frozenset({"id", "uuid", "drain_id", "created_at", "updated_at", "lease_owner", "lease_until"})
#: What a lease is taken on.
Leased = Literal["migration", "drain"]
_LEASED: dict[str, sa.Table] = {"migration": _migrations, "drain": _drains}


class Store:
    """Hosts, migrations and drains; safe to share between threads.

    ``url`` is an SQLAlchemy URL (``sqlite:////path/controller.db``,
    ``postgresql+psycopg://user@host/db``); ``clock`` gives the aware UTC
    time stamped on records; ``exclusive`` (a controller's own store) holds a
    SQLite file for the store's lifetime. ``lease_clock`` is the time leases
    are taken and compared at; None (the default) is the one clock every
    controller shares: the database's own (``now()``) on PostgreSQL, and
    ``clock`` on SQLite, which one controller alone uses (tests give every
    store one fake clock). Raises StoreError when the database
    cannot be opened or its schema is newer than this code knows, DatabaseInUse
    when an exclusive store holds the SQLite file already.
    """

    def __init__(self, url: str, clock: Callable[[], dt.datetime] = records.utcnow, *,
                 exclusive: bool = False, lease_clock: Callable[[], dt.datetime] | None = None) -> None:
        self._clock = clock
        self._lease_clock = lease_clock
        try:
            # Shown in errors and as ``url``: never the password.
            self._shown_url = self.url = sa.engine.make_url(url).render_as_string(hide_password=True)
        except sa.exc.ArgumentError:
            raise StoreError(url=url, reason="not an SQLAlchemy URL; write e.g. "
                                             "sqlite:////var/lib/coldferry/controller.db") from None
        # A controller's own store (exclusive) holds a SQLite file for its lifetime.
        self._file_lock = _lock_sqlite_file(sa.engine.make_url(url), self._shown_url) if exclusive else None
        try:
            self._engine = _engine(url)
        except (ImportError, sa.exc.NoSuchModuleError) as e:
            self._release_file()
            raise StoreError(url=self._shown_url, reason=f"no driver for it: {e}; install the "
                                                         f"database's Python driver (e.g. psycopg)") from None
        self._writer = self._engine.execution_options(coldferry_write=True)
        # One shared connection serves an in-memory SQLite database: take turns on it.
        self._lock: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if isinstance(self._engine.pool, StaticPool) else contextlib.nullcontext())
        try:
            self._open_schema()
        except sa.exc.SQLAlchemyError as e:
            self.close()
            raise StoreError(url=self._shown_url, reason=f"cannot open it ({getattr(e, 'orig', None) or e}): "
                                                         f"check that it exists, is reachable and writable") from e
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._engine.dispose()
        self._release_file()

    def _release_file(self) -> None:
        if self._file_lock is not None:
            os.close(self._file_lock)
            self._file_lock = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute(sa.select(_version.c.version)).scalar_one())

    # hosts

    def sync_hosts(self, hosts: list[HostRecord]) -> list[HostRecord]:
        """Make the stored hosts the configured ones: add new hosts, update the agent URL and
        address of known ones (keeping their enabled status), drop hosts no longer listed."""
        with self._write() as conn:
            known = set(conn.execute(sa.select(_hosts.c.name)).scalars())
            for h in hosts:
                if h.name in known:
                    conn.execute(_hosts.update().where(_hosts.c.name == h.name)
                                 .values(agent_url=h.agent_url, address=h.address))
                else:
                    conn.execute(_hosts.insert().values(**dataclasses.asdict(h)))
            conn.execute(_hosts.delete().where(_hosts.c.name.not_in([h.name for h in hosts])))
        return self.list_hosts()

    def list_hosts(self) -> list[HostRecord]:
        with self._read() as conn:
            return [HostRecord(**r._mapping) for r in conn.execute(_hosts.select().order_by(_hosts.c.name))]

    def get_host(self, name: str) -> HostRecord | None:
        with self._read() as conn:
            row = conn.execute(_hosts.select().where(_hosts.c.name == name)).first()
        return None if row is None else HostRecord(**row._mapping)

    def set_service(self, name: str, enabled: bool, reason: str | None) -> HostRecord:
        """Enable or disable a host's compute service; enabling clears the reason.
        Raises NotFound for a host not configured."""
        with self._write() as conn:
            done = conn.execute(_hosts.update().where(_hosts.c.name == name)
                                .values(enabled=enabled, disabled_reason=None if enabled else reason))
            if done.rowcount == 0:
                raise NotFound("host", name, " in the controller's configuration")
        host = self.get_host(name)
        assert host is not None
        return host

    # migrations

    def create_migration(self, lease: Lease | None = None, **fields: Any) -> MigrationRecord:
        """Add a migration, held by ``lease`` when given; ``fields`` are MigrationRecord's, those
        left out take its defaults. Raises TypeError for unknown, missing or store-owned fields
        (id, uuid, times, lease), and OpenMigrationExists for an open one of a server that has an
        open migration already."""
        own = sorted(set(fields) & _OWN)
        if own:
            raise TypeError(f"create_migration() sets {', '.join(own)} itself")
        now = self._clock()
        record = MigrationRecord(id=0, uuid=str(uuidlib.uuid4()), created_at=now, updated_at=now, **fields)
        values = {**dataclasses.asdict(record), **self._held(lease)}
        del values["id"]
        try:
            with self._write() as conn:
                new_id = _insert(conn, _migrations, values)
                row = conn.execute(_migrations.select().where(_migrations.c.id == new_id)).one()
        except sa.exc.IntegrityError as e:
            # PostgreSQL names the index; SQLite names the column of a unique index.
            if not any(name in str(e.orig) for name in (_open_index.name, "migrations.server")):
                raise
            other = self.open_migration_for(record.server)
            raise OpenMigrationExists(url=self._shown_url, server=record.server, other=(
                "one that has ended since" if other is None else f"migration {other.id}, {other.status}")) from None
        return MigrationRecord(**row._mapping)

    def update_migration(self, id: int, lease: Lease | None = None, **fields: Any) -> MigrationRecord:
        """Change fields of migration ``id`` and stamp updated_at; with ``lease``, only while it
        holds the migration, and renewing it. Raises TypeError for an unknown or store-owned
        field, NotFound for an unknown id, LeaseLost when another controller holds it."""
        _check_fields("update_migration", fields, _MIGRATION_FIELDS)
        with self._write() as conn:
            self._update_held(conn, "migration", id, lease, **fields, updated_at=self._clock())
            row = conn.execute(_migrations.select().where(_migrations.c.id == id)).one()
        return MigrationRecord(**row._mapping)

    def get_migration(self, id: int) -> MigrationRecord | None:
        if not 1 <= id <= MAX_ID:
            return None
        found = self._migrations(_migrations.c.id == id)
        return found[0] if found else None

    def list_migrations(self, host: str | None = None, status: records.MigrationStatus | None = None,
                        server: str | None = None, migration_type: records.MigrationType | None = None,
                        changes_since: dt.datetime | None = None) -> list[MigrationRecord]:
        """Migrations newest first. ``host`` matches source or destination, ``server`` the
        server's uuid or name; ``changes_since`` keeps those updated at or after it."""
        m = _migrations.c
        where = [
            None if host is None else sa.or_(m.source_compute == host, m.dest_compute == host),
            None if status is None else m.status == status,
            None if server is None else sa.or_(m.server == server, m.server_name == server),
            None if migration_type is None else m.migration_type == migration_type,
            None if changes_since is None else m.updated_at >= changes_since,
        ]
        return self._migrations(*[w for w in where if w is not None])

    def in_flight_migrations(self, free_for: Lease | None = None) -> list[MigrationRecord]:
        """Migrations under way (records.IN_FLIGHT), oldest first; with ``free_for``, only those
        that lease could claim now (see ``claim``)."""
        free = [] if free_for is None else [self._free(_migrations, free_for)]
        return self._migrations(_migrations.c.status.in_(sorted(records.IN_FLIGHT)), *free)[::-1]

    def migrations_in(self, status: records.MigrationStatus) -> list[MigrationRecord]:
        """Migrations in ``status``, oldest first."""
        return self._migrations(_migrations.c.status == status)[::-1]

    def open_migration_for(self, server_uuid: str) -> MigrationRecord | None:
        """The server's newest migration not yet final ('finished' counts as open)."""
        found = self._migrations(_migrations.c.server == server_uuid,
                                 _migrations.c.status.not_in(sorted(records.FINAL)))
        return found[0] if found else None

    def _migrations(self, *where: Any) -> list[MigrationRecord]:
        query = _migrations.select().where(*where).order_by(_migrations.c.created_at.desc(),
                                                            _migrations.c.id.desc())
        with self._read() as conn:
            return [MigrationRecord(**r._mapping) for r in conn.execute(query)]

    # drains

    def create_drain(self, host: str, live: bool, max_servers: int, dry_run: bool,
                     target_host: str | None, force: bool, lease: Lease | None = None) -> DrainRecord:
        """Add a running drain, held by ``lease`` when given (so no other controller runs it
        before its rows are in)."""
        now = self._clock()
        values: dict[str, Any] = dict(host=host, live=live, max_servers=max_servers, dry_run=dry_run,
                      target_host=target_host, force=force, status=records.DrainStatus.RUNNING, created_at=now,
                      updated_at=now)
        with self._write() as conn:
            new_id = _insert(conn, _drains, {**values, **self._held(lease)})
        drain = self.get_drain(new_id)
        assert drain is not None
        return drain

    def add_drain_row(self, drain_id: int, server: str, name: str, state_before: str,
                      migration_type: records.MigrationType | None, accepted: bool, status: records.RowStatus,
                      error: str | None = None, migration_id: int | None = None) -> DrainRowRecord:
        """Append a row to drain ``drain_id``. Raises NotFound for an unknown drain."""
        values: dict[str, Any] = dict(drain_id=drain_id, server=server, name=name, state_before=state_before,
                      migration_type=migration_type, accepted=accepted, status=status, error=error,
                      migration_id=migration_id)
        with self._write() as conn:
            self._touch_drain(conn, drain_id)
            new_id = _insert(conn, _drain_rows, values)
        return DrainRowRecord(id=new_id, **values)

    def update_drain_row(self, row_id: int, lease: Lease | None = None, **fields: Any) -> DrainRowRecord:
        """Change fields of a drain row (and stamp its drain's updated_at); with ``lease``, only
        while it holds the drain, and renewing it. Raises TypeError for an unknown field,
        NotFound for an unknown row, LeaseLost when another controller holds the drain."""
        _check_fields("update_drain_row", fields, _ROW_FIELDS)
        with self._write() as conn:
            row = conn.execute(_drain_rows.select().where(_drain_rows.c.id == row_id)).first()
            if row is None:
                raise NotFound("drain row", row_id)
            if fields:
                conn.execute(_drain_rows.update().where(_drain_rows.c.id == row_id).values(**fields))
            self._touch_drain(conn, row.drain_id, lease)
        return dataclasses.replace(DrainRowRecord(**row._mapping), **fields)

    def update_drain(self, drain_id: int, lease: Lease | None = None, **fields: Any) -> DrainRecord:
        """Change fields of a drain and stamp updated_at; ``lease`` as for update_drain_row.
        Raises TypeError for an unknown field, NotFound for an unknown drain, LeaseLost."""
        _check_fields("update_drain", fields, _DRAIN_FIELDS)
        with self._write() as conn:
            self._touch_drain(conn, drain_id, lease, **fields)
        drain = self.get_drain(drain_id)
        assert drain is not None
        return drain

    def get_drain(self, id: int) -> DrainRecord | None:
        if not 1 <= id <= MAX_ID:
            return None
        found = self._drains(_drains.c.id == id)
        return found[0] if found else None

    def list_drains(self, status: records.DrainStatus | None = None,
                    free_for: Lease | None = None) -> list[DrainRecord]:
        """All drains (or those in ``status``) newest first, each with its rows; with
        ``free_for``, only those that lease could claim now (see ``claim``)."""
        where = [] if status is None else [_drains.c.status == status]
        return self._drains(*where, *([] if free_for is None else [self._free(_drains, free_for)]))

    def _drains(self, *where: Any) -> list[DrainRecord]:
        with self._read() as conn:
            drains = [DrainRecord(**r._mapping) for r in conn.execute(
                _drains.select().where(*where).order_by(_drains.c.created_at.desc(), _drains.c.id.desc()))]
            by_id = {d.id: d for d in drains}
            rows = conn.execute(_drain_rows.select().where(_drain_rows.c.drain_id.in_(list(by_id)))
                                .order_by(_drain_rows.c.id))
            for r in rows:
                by_id[r.drain_id].rows.append(DrainRowRecord(**r._mapping))
        return drains

    def _touch_drain(self, conn: Connection, drain_id: int, lease: Lease | None = None, **fields: Any) -> None:
        self._update_held(conn, "drain", drain_id, lease, **fields, updated_at=self._clock())

    # leases: which controller drives a migration or runs a drain (docs/safety.md)

    def claim(self, kind: Leased, id: int, lease: Lease, status: str | None = None) -> bool:
        """Take the lease on a migration or drain for ``lease.seconds``, in one conditional UPDATE:
        only when nobody holds it, ``lease.owner`` does already, or the holder's lease ran out;
        with ``status``, only while the record is in that status. Of controllers claiming at
        once, one wins. Returns whether this one holds it now."""
        table = _LEASED[kind]
        where = [table.c.id == id, self._free(table, lease)]
        if status is not None:
            where.append(table.c.status == status)
        with self._write() as conn:
            return conn.execute(table.update().where(*where).values(**self._held(lease))).rowcount == 1

    def renew(self, kind: Leased, id: int, lease: Lease) -> bool:
        """Extend ``lease.owner``'s lease by ``lease.seconds`` from now; False when it no longer
        holds it (another controller took it over, or it was released)."""
        table = _LEASED[kind]
        with self._write() as conn:
            return conn.execute(table.update().where(table.c.id == id, table.c.lease_owner == lease.owner)
                                .values(**self._held(lease))).rowcount == 1

    def release(self, kind: Leased, id: int, lease: Lease) -> bool:
        """Let go of ``lease.owner``'s lease, so that any controller may take the record at once;
        False when it did not hold it."""
        table = _LEASED[kind]
        with self._write() as conn:
            return conn.execute(table.update().where(table.c.id == id, table.c.lease_owner == lease.owner)
                                .values(lease_owner=None, lease_until=None)).rowcount == 1

    def _lease_times(self, seconds: float) -> tuple[Any, Any]:
        """Now and ``seconds`` from now on the lease clock, as SQL (see the class docstring)."""
        if self._lease_clock is None and self._engine.dialect.name == "postgresql":
            now = sa.func.timezone("UTC", sa.func.now())   # naive UTC, as _UTCDateTime stores times
            return now, now + sa.func.make_interval(0, 0, 0, 0, 0, 0, float(seconds))
        t = (self._lease_clock or self._clock)()
        return sa.literal(t, _UTCDateTime()), sa.literal(t + dt.timedelta(seconds=seconds), _UTCDateTime())

    def _held(self, lease: Lease | None) -> dict[str, Any]:
        """The values that make ``lease`` the holder from now on (none without a lease)."""
        return {} if lease is None else {"lease_owner": lease.owner, "lease_until": self._lease_times(lease.seconds)[1]}

    def _free(self, table: sa.Table, lease: Lease) -> Any:
        """Whether ``lease`` may take a row of ``table`` now. A store holding its SQLite file
        (``exclusive``) may take every row: any other holder is a controller that died, so a
        restart takes its migrations over at once instead of after the lease time."""
        if self._file_lock is not None:
            return sa.true()
        now = self._lease_times(lease.seconds)[0]
        return sa.or_(table.c.lease_owner.is_(None), table.c.lease_owner == lease.owner, table.c.lease_until < now)

    def _update_held(self, conn: Connection, kind: Leased, id: int, lease: Lease | None, **values: Any) -> None:
        """UPDATE one migration or drain; with ``lease``, only while it holds the record (and
        renewing it). Raises NotFound, or LeaseLost naming who holds the record now."""
        table = _LEASED[kind]
        where = [table.c.id == id] + ([] if lease is None else [table.c.lease_owner == lease.owner])
        if conn.execute(table.update().where(*where).values(**values, **self._held(lease))).rowcount == 1:
            return
        holder = conn.execute(sa.select(table.c.lease_owner).where(table.c.id == id)).first()
        if holder is None:
            raise NotFound(kind, id)
        assert lease is not None
        raise LeaseLost(url=self._shown_url, kind=kind, id=id, owner=lease.owner,
                        now="released" if holder.lease_owner is None else f"{holder.lease_owner} holds it now")

    # plumbing

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._lock, self._engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        # On SQLite this begins IMMEDIATE: the write lock is taken (or waited for) up
        # front, so a transaction that reads first never fails on upgrading its lock.
        with self._lock, self._writer.begin() as conn:
            yield conn

    def _open_schema(self) -> None:
        with self._write() as conn:
            _hold_schema(conn)
            tables = set(sa.inspect(conn).get_table_names())
            if "schema_version" not in tables:
                if tables & set(_meta.tables):
                    raise StoreError(url=self._shown_url, reason="has coldferry's tables but no schema_version: "
                                                                 "not a database this code made; use a new one")
                _meta.create_all(conn)
                conn.execute(_version.insert().values(version=SCHEMA_VERSION))
                return
            version = int(conn.execute(sa.select(_version.c.version)).scalar_one())
        if version > SCHEMA_VERSION:
            raise StoreError(url=self._shown_url, reason=f"schema version {version} is newer than this "
                                                         f"coldferry knows ({SCHEMA_VERSION}): upgrade coldferry")
        for target, what, step in STEPS:
            if target <= version:
                continue
            try:
                # One transaction per step: a failed step leaves the database at the one before.
                # The version is read again under the schema lock: another controller may have
                # opened the database at the same time and done this step already.
                with self._write() as conn:
                    _hold_schema(conn)
                    if conn.execute(sa.select(_version.c.version)).scalar_one() < target:
                        step(conn)
                        conn.execute(_version.update().values(version=target))
            except Exception as e:
                raise StoreError(url=self._shown_url, reason=f"upgrading the schema to version {target} "
                                 f"({what}) failed: {e}; it stays at version {version}") from e
            version = target


# The key of the PostgreSQL advisory lock on the schema: any number, as long as every coldferry uses it.
_SCHEMA_LOCK = 0x636F6C64  # "cold"


def _hold_schema(conn: Connection) -> None:
    """Take the schema lock until ``conn``'s transaction ends, so that controllers opening one
    database at once create or upgrade it one at a time. SQLite's write transaction (BEGIN
    IMMEDIATE) is that lock already; PostgreSQL takes an advisory lock."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK)))


def _lock_sqlite_file(url: sa.engine.URL, shown: str) -> int | None:
    """Hold ``<file>.lock`` next to a SQLite database file (flock, without waiting) until the
    returned descriptor is closed; None for other databases. Raises DatabaseInUse when another
    store holds it: SQLite is for one controller (several share a PostgreSQL database), and a
    second one on the same file is refused rather than left to drive the same migrations."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    lock = f"{url.database}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StoreError(url=shown, reason=f"cannot open its lock file {lock}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DatabaseInUse(url=shown, lock=lock) from None
    return fd


def _insert(conn: Connection, table: sa.Table, values: dict[str, Any]) -> int:
    """Insert one row; its new integer id."""
    key = conn.execute(table.insert().values(**values)).inserted_primary_key
    assert key is not None
    return int(key[0])


def _check_fields(who: str, fields: dict[str, Any], allowed: frozenset[str]) -> None:
    bad = sorted(set(fields) - (allowed - _OWN))
    if bad:
        raise TypeError(f"{who}() got unknown or read-only field(s): {', '.join(bad)}")


def _engine(url: str) -> Engine:
    """An engine for ``url``; for SQLite with WAL, foreign keys, a busy timeout and
    transactions it begins itself (pysqlite's own begin would defer the write lock)."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
    memory = parsed.database in (None, "", ":memory:")
    engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                              **({"poolclass": StaticPool} if memory else {}))

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "foreign_keys=ON", "busy_timeout=30000"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("coldferry_write")
                             else "BEGIN")

    return engine
