"""The controller's database schema: its tables, its version and the steps that upgrade it, and
the engine that reaches it (SQLite with WAL and its own write transactions, or PostgreSQL).

The schema carries its version in ``schema_version``; ``Store`` (store.py) creates it or upgrades
it step by step (``STEPS``) when it opens a database.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from driver.model import Phase

from . import records


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
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


class JSONText(sa.TypeDecorator[Any]):
    """A JSON value kept as text: the same on SQLite and PostgreSQL."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else json.dumps(value)

    def process_result_value(self, value: str | None, dialect: Any) -> Any:
        return None if value is None else json.loads(value)


class PhasesJSON(sa.TypeDecorator[list[Phase]]):
    """A migration's timeline: a list of Phase kept as JSON text (each phase as the API shows it)."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: list[Phase] | None, dialect: Any) -> str | None:
        return None if value is None else json.dumps([p.to_dict() for p in value])

    def process_result_value(self, value: str | None, dialect: Any) -> list[Phase]:
        return [] if value is None else [Phase.from_dict(d) for d in json.loads(value)]


metadata = sa.MetaData()
version = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))
hosts = sa.Table(
    "hosts", metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("agent_url", sa.Text, nullable=False),
    sa.Column("address", sa.Text, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("disabled_reason", sa.Text))
# The migration list's host and server filters, over a fleet's whole history (schema step 8).
HISTORY_INDEXES = (("ix_migrations_source_compute", "source_compute"), ("ix_migrations_dest_compute", "dest_compute"),
                   ("ix_migrations_server_name", "server_name"))

migrations = sa.Table(
    "migrations", metadata,
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
    sa.Column("flavor", JSONText, nullable=False),
    sa.Column("progress", JSONText),
    sa.Column("bytes_sent", sa.BigInteger, nullable=False),
    sa.Column("bytes_skipped", sa.BigInteger, nullable=False),
    sa.Column("rate", sa.Float, nullable=False),
    sa.Column("digests", JSONText, nullable=False),
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
    # The timeline (records.MigrationRecord.timeline) and when the request was accepted, in epoch
    # seconds: the start of its first phase.
    sa.Column("timeline", PhasesJSON, nullable=False),
    sa.Column("requested_at", sa.Float),
    # The lease of the controller driving it (docs/safety.md, "Several controllers").
    sa.Column("lease_owner", sa.String(255)),
    sa.Column("lease_until", UTCDateTime),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index("ix_migrations_updated_at", "updated_at"),
    sa.Index("ix_migrations_server", "server"),
    sa.Index("ix_migrations_status", "status"),
    *(sa.Index(name, column) for name, column in HISTORY_INDEXES),
    sqlite_autoincrement=True)  # an id the API has shown is never handed out again
# One open migration per server, enforced by the database itself: two controllers (or two
# requests) that both pass the conductor's check cannot both record one. Open is every status but
# the FINAL ones ('finished' and 'needs-recovery' included); a status added later is open until
# named final, so the index errs on refusing.
_OPEN_WHERE = sa.text("status NOT IN (%s)" % ", ".join(f"'{s.value}'" for s in sorted(records.FINAL)))
OPEN_MIGRATION_INDEX = sa.Index("ux_migrations_open_server", migrations.c.server, unique=True,
                       sqlite_where=_OPEN_WHERE, postgresql_where=_OPEN_WHERE)
drains = sa.Table(
    "drains", metadata,
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
    sa.Column("lease_until", UTCDateTime),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sqlite_autoincrement=True)
drain_rows = sa.Table(
    "drain_rows", metadata,
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
SCHEMA_VERSION = 8


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
    doubled = conn.execute(sa.select(migrations.c.server, sa.func.count())
                           .where(_OPEN_WHERE).group_by(migrations.c.server)
                           .having(sa.func.count() > 1).order_by(migrations.c.server)).all()
    if doubled:
        raise RuntimeError("servers with more than one open migration: " + ", ".join(
            f"{server} ({n})" for server, n in doubled) + "; end all but one of each (set its status "
            "to error) and open the database again")
    OPEN_MIGRATION_INDEX.create(conn)


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


def _add_timeline_columns(conn: Connection) -> None:
    # Old rows: no phases recorded, and the request time is not known to the second.
    conn.exec_driver_sql("ALTER TABLE migrations ADD COLUMN timeline TEXT NOT NULL DEFAULT '[]'")
    conn.exec_driver_sql("ALTER TABLE migrations ADD COLUMN requested_at FLOAT")


def _add_history_indexes(conn: Connection) -> None:
    for name, column in HISTORY_INDEXES:
        conn.exec_driver_sql(f"CREATE INDEX {name} ON migrations ({column})")


STEPS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (2, "pre-copy and bytes before/after power-off on migrations", _add_precopy_columns),
    (3, "whether a migration's instance directory is on shared storage", _add_shared_column),
    (4, "failed reverts, needs-recovery and named jobs on migrations; errors on drains", _add_recovery_columns),
    (5, "at most one open migration per server (a partial unique index)", _add_open_migration_index),
    (6, "leases: the controller driving each migration and drain; full-length job names", _add_lease_columns),
    (7, "the timeline of each migration: its phases and when it was requested", _add_timeline_columns),
    (8, "indexes for the migration list's host and server filters", _add_history_indexes),
]



# The key of the PostgreSQL advisory lock on the schema: any number, as long as every coldferry uses it.
_SCHEMA_LOCK = 0x636F6C64  # "cold"


def hold_schema(conn: Connection) -> None:
    """Take the schema lock until ``conn``'s transaction ends, so that controllers opening one
    database at once create or upgrade it one at a time. SQLite's write transaction (BEGIN
    IMMEDIATE) is that lock already; PostgreSQL takes an advisory lock."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_SCHEMA_LOCK)))


def engine(url: str) -> Engine:
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
