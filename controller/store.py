"""The controller's records in a SQL database: SQLite by default, PostgreSQL by URL.

SQLAlchemy Core with portable SQL only. The tables and their upgrade steps are
schema.py's; opening a database creates the schema or upgrades it step by step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import os
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.pool import StaticPool

from . import records, schema
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


_MIGRATION_FIELDS = frozenset(f.name for f in dataclasses.fields(MigrationRecord))
_DRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(DrainRecord)) - {"rows"}
_ROW_FIELDS = frozenset(f.name for f in dataclasses.fields(DrainRowRecord))
# Set by the store itself, never by a caller.
_OWN = frozenset({"id", "uuid", "drain_id", "created_at", "updated_at", "lease_owner", "lease_until"})
#: What a lease is taken on.
Leased = Literal["migration", "drain"]
_LEASED: dict[str, sa.Table] = {"migration": schema.migrations, "drain": schema.drains}


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
            self._engine = schema.engine(url)
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
            return int(conn.execute(sa.select(schema.version.c.version)).scalar_one())

    # hosts

    def sync_hosts(self, hosts: list[HostRecord]) -> list[HostRecord]:
        """Make the stored hosts the configured ones: add new hosts, update the agent URL and
        address of known ones (keeping their enabled status), drop hosts no longer listed."""
        with self._write() as conn:
            schema.hold_schema(conn)   # controllers starting at once on one database take turns
            known = set(conn.execute(sa.select(schema.hosts.c.name)).scalars())
            for h in hosts:
                if h.name in known:
                    conn.execute(schema.hosts.update().where(schema.hosts.c.name == h.name)
                                 .values(agent_url=h.agent_url, address=h.address))
                else:
                    conn.execute(schema.hosts.insert().values(**dataclasses.asdict(h)))
            conn.execute(schema.hosts.delete().where(schema.hosts.c.name.not_in([h.name for h in hosts])))
        return self.list_hosts()

    def list_hosts(self) -> list[HostRecord]:
        with self._read() as conn:
            return [HostRecord(**r._mapping) for r in conn.execute(schema.hosts.select().order_by(schema.hosts.c.name))]

    def get_host(self, name: str) -> HostRecord | None:
        with self._read() as conn:
            row = conn.execute(schema.hosts.select().where(schema.hosts.c.name == name)).first()
        return None if row is None else HostRecord(**row._mapping)

    def set_service(self, name: str, enabled: bool, reason: str | None) -> HostRecord:
        """Enable or disable a host's compute service; enabling clears the reason.
        Raises NotFound for a host not configured."""
        with self._write() as conn:
            done = conn.execute(schema.hosts.update().where(schema.hosts.c.name == name)
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
        values = {**dataclasses.asdict(record), "timeline": record.timeline, **self._held(lease)}
        del values["id"]
        try:
            with self._write() as conn:
                new_id = _insert(conn, schema.migrations, values)
                row = conn.execute(schema.migrations.select().where(schema.migrations.c.id == new_id)).one()
        except sa.exc.IntegrityError as e:
            # PostgreSQL names the index; SQLite names the column of a unique index.
            if not any(name in str(e.orig) for name in (schema.OPEN_MIGRATION_INDEX.name, "migrations.server")):
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
            row = conn.execute(schema.migrations.select().where(schema.migrations.c.id == id)).one()
        return MigrationRecord(**row._mapping)

    def get_migration(self, id: int) -> MigrationRecord | None:
        if not 1 <= id <= MAX_ID:
            return None
        found = self._migrations(schema.migrations.c.id == id)
        return found[0] if found else None

    def list_migrations(self, host: str | None = None, status: records.MigrationStatus | None = None,
                        server: str | None = None, migration_type: records.MigrationType | None = None,
                        changes_since: dt.datetime | None = None) -> list[MigrationRecord]:
        """Migrations newest first. ``host`` matches source or destination, ``server`` the
        server's uuid or name; ``changes_since`` keeps those updated at or after it."""
        m = schema.migrations.c
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
        free = [] if free_for is None else [self._free(schema.migrations, free_for)]
        return self._migrations(schema.migrations.c.status.in_(sorted(records.IN_FLIGHT)), *free)[::-1]

    def tally(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        """What the database holds now: migrations by (type, status), and drain rows by status."""
        m, r = schema.migrations, schema.drain_rows
        with self._read() as conn:
            migrations = {(kind, status): n for kind, status, n in conn.execute(
                sa.select(m.c.migration_type, m.c.status, sa.func.count()).group_by(m.c.migration_type, m.c.status))}
            rows = {status: n for status, n in conn.execute(
                sa.select(r.c.status, sa.func.count()).group_by(r.c.status))}
        return migrations, rows

    def migrations_in(self, status: records.MigrationStatus) -> list[MigrationRecord]:
        """Migrations in ``status``, oldest first."""
        return self._migrations(schema.migrations.c.status == status)[::-1]

    def open_migration_for(self, server_uuid: str) -> MigrationRecord | None:
        """The server's newest migration not yet final ('finished' counts as open)."""
        found = self._migrations(schema.migrations.c.server == server_uuid,
                                 schema.migrations.c.status.not_in(sorted(records.FINAL)))
        return found[0] if found else None

    def _migrations(self, *where: Any) -> list[MigrationRecord]:
        query = schema.migrations.select().where(*where).order_by(schema.migrations.c.created_at.desc(),
                                                            schema.migrations.c.id.desc())
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
            new_id = _insert(conn, schema.drains, {**values, **self._held(lease)})
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
            new_id = _insert(conn, schema.drain_rows, values)
        return DrainRowRecord(id=new_id, **values)

    def update_drain_row(self, row_id: int, lease: Lease | None = None, **fields: Any) -> DrainRowRecord:
        """Change fields of a drain row (and stamp its drain's updated_at); with ``lease``, only
        while it holds the drain, and renewing it. Raises TypeError for an unknown field,
        NotFound for an unknown row, LeaseLost when another controller holds the drain."""
        _check_fields("update_drain_row", fields, _ROW_FIELDS)
        with self._write() as conn:
            row = conn.execute(schema.drain_rows.select().where(schema.drain_rows.c.id == row_id)).first()
            if row is None:
                raise NotFound("drain row", row_id)
            if fields:
                conn.execute(schema.drain_rows.update().where(schema.drain_rows.c.id == row_id).values(**fields))
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
        found = self._drains(schema.drains.c.id == id)
        return found[0] if found else None

    def list_drains(self, status: records.DrainStatus | None = None,
                    free_for: Lease | None = None) -> list[DrainRecord]:
        """All drains (or those in ``status``) newest first, each with its rows; with
        ``free_for``, only those that lease could claim now (see ``claim``)."""
        where = [] if status is None else [schema.drains.c.status == status]
        return self._drains(*where, *([] if free_for is None else [self._free(schema.drains, free_for)]))

    def _drains(self, *where: Any) -> list[DrainRecord]:
        with self._read() as conn:
            drains = [DrainRecord(**r._mapping) for r in conn.execute(
                schema.drains.select().where(*where).order_by(schema.drains.c.created_at.desc(), schema.drains.c.id.desc()))]
            by_id = {d.id: d for d in drains}
            rows = conn.execute(schema.drain_rows.select().where(schema.drain_rows.c.drain_id.in_(list(by_id)))
                                .order_by(schema.drain_rows.c.id))
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
            now = sa.func.timezone("UTC", sa.func.now())   # naive UTC, as schema.UTCDateTime stores times
            return now, now + sa.func.make_interval(0, 0, 0, 0, 0, 0, float(seconds))
        t = (self._lease_clock or self._clock)()
        return sa.literal(t, schema.UTCDateTime()), sa.literal(t + dt.timedelta(seconds=seconds), schema.UTCDateTime())

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
            schema.hold_schema(conn)
            tables = set(sa.inspect(conn).get_table_names())
            if "schema_version" not in tables:
                if tables & set(schema.metadata.tables):
                    raise StoreError(url=self._shown_url, reason="has coldferry's tables but no schema_version: "
                                                                 "not a database this code made; use a new one")
                schema.metadata.create_all(conn)
                conn.execute(schema.version.insert().values(version=schema.SCHEMA_VERSION))
                return
            version = int(conn.execute(sa.select(schema.version.c.version)).scalar_one())
        if version > schema.SCHEMA_VERSION:
            raise StoreError(url=self._shown_url, reason=f"schema version {version} is newer than this "
                                                         f"coldferry knows ({schema.SCHEMA_VERSION}): upgrade coldferry")
        for target, what, step in schema.STEPS:
            if target <= version:
                continue
            try:
                # One transaction per step: a failed step leaves the database at the one before.
                # The version is read again under the schema lock: another controller may have
                # opened the database at the same time and done this step already.
                with self._write() as conn:
                    schema.hold_schema(conn)
                    if conn.execute(sa.select(schema.version.c.version)).scalar_one() < target:
                        step(conn)
                        conn.execute(schema.version.update().values(version=target))
            except Exception as e:
                raise StoreError(url=self._shown_url, reason=f"upgrading the schema to version {target} "
                                 f"({what}) failed: {e}; it stays at version {version}") from e
            version = target


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
