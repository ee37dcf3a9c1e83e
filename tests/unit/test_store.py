"""Store: the controller's records in a real SQLite file and a real PostgreSQL database.

Every test that takes the ``url`` fixture runs twice: on a SQLite file of its own, and on
an empty database of the session's private PostgreSQL cluster (a schema of its own, see
tests/pgcluster.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
import threading
import uuid as uuidlib

import pytest
import sqlalchemy as sa

from controller import records
from controller.records import DrainStatus, MigrationStatus, MigrationType, RowStatus
from controller.errors import NotFound
from controller.records import HostRecord
from controller import schema as schema_module
from controller import store as store_module
from controller.schema import SCHEMA_VERSION
from controller.store import Store, StoreError
from driver.model import Phase, PhaseName, PowerState

BASE_STEPS = list(schema_module.STEPS)
V = SCHEMA_VERSION
T0 = dt.datetime(2026, 11, 23, 11, 40, tzinfo=dt.timezone.utc)


class Clock:
    """A clock the test moves: each call returns the current time."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: int) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/controller.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(url, clock):
    s = Store(url, clock=clock)
    yield s
    s.close()


def migration(store: Store, server: str = "uuid-1", name: str = "web1", source: str = "a", dest: str = "b",
              **fields):
    return store.create_migration(server=server, server_name=name, source_compute=source, dest_compute=dest,
                                  dest_address=f"198.18.0.{ord(dest[0]) % 250}", **fields)


# schema

def test_new_database_gets_the_current_schema(tmp_path):
    path = tmp_path / "controller.db"
    with Store(f"sqlite:///{path}") as s:
        assert s.schema_version() == SCHEMA_VERSION
    db = sqlite3.connect(path)
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    assert {"schema_version", "hosts", "migrations", "drains", "drain_rows", "ix_migrations_updated_at",
            "ix_migrations_server", "ix_migrations_status", "ix_drain_rows_drain_id",
            "ux_migrations_open_server"} <= names
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_foreign_keys_are_enforced(store):
    """A row of a drain that does not exist is refused by the database itself."""
    with pytest.raises(sa.exc.IntegrityError):
        with store._write() as conn:
            conn.execute(sa.text("INSERT INTO drain_rows (drain_id, server, name, state_before, accepted, status) "
                                 "VALUES (42, 's', 'n', 'running', false, 'queued')"))


def test_reopening_keeps_the_records(url, clock):
    with Store(url, clock=clock) as s:
        m = migration(s)
    with Store(url, clock=clock) as s:
        assert s.get_migration(m.id) == m
        assert s.schema_version() == SCHEMA_VERSION


def with_steps(monkeypatch, *steps) -> None:
    """Make the code one or more schema versions newer than the database."""
    monkeypatch.setattr(schema_module, "STEPS", [*BASE_STEPS, *steps])
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", steps[-1][0])


def columns(url: str, table: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return {c["name"] for c in sa.inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def test_upgrade_runs_the_missing_steps_in_order_and_keeps_records(url, clock, monkeypatch):
    with Store(url, clock=clock) as s:
        s.sync_hosts([HostRecord("a", "http://a:8797", "198.18.0.1")])
        m = migration(s, digests=["xxh3:ab"])
    ran: list[int] = []

    def add_note(conn) -> None:
        ran.append(V + 1)
        conn.execute(sa.text("ALTER TABLE hosts ADD COLUMN note TEXT"))

    def fill_note(conn) -> None:
        ran.append(V + 2)
        conn.execute(sa.text("UPDATE hosts SET note = 'from the second step'"))

    with_steps(monkeypatch, (V + 1, "host notes", add_note))
    with Store(url, clock=clock) as s:
        assert s.schema_version() == V + 1 and ran == [V + 1]
    with_steps(monkeypatch, (V + 1, "host notes", add_note), (V + 2, "fill notes", fill_note))
    with Store(url, clock=clock) as s:
        assert s.schema_version() == V + 2 and ran == [V + 1, V + 2]  # only the step it lacked
        assert s.get_migration(m.id) == m
        assert s.list_hosts() == [HostRecord("a", "http://a:8797", "198.18.0.1")]
        with s._read() as conn:
            assert conn.execute(sa.text("SELECT note FROM hosts")).scalar_one() == "from the second step"
    Store(url, clock=clock).close()
    assert ran == [V + 1, V + 2]  # nothing left to do


def test_a_failed_step_leaves_the_version_before_it(url, monkeypatch):
    Store(url).close()

    def breaks(conn) -> None:
        conn.execute(sa.text("ALTER TABLE hosts ADD COLUMN half_done TEXT"))
        raise RuntimeError("disk on fire")

    with_steps(monkeypatch, (V + 1, "fine", lambda conn: None), (V + 2, "breaks", breaks))
    with pytest.raises(StoreError) as e:
        Store(url)
    assert f"upgrading the schema to version {V + 2} (breaks) failed: disk on fire; it stays at version {V + 1}" in str(e.value)
    assert "half_done" not in columns(url, "hosts")  # the step's own change was rolled back
    with_steps(monkeypatch, (V + 1, "fine", lambda conn: None))
    with Store(url) as s:
        assert s.schema_version() == V + 1


# What each upgrade step adds, (table, column) or ("index", name): dropping those above a
# version, newest first, makes a database of that version.
ADDED = {2: [("migrations", "precopy"), ("migrations", "bytes_before_power_off"),
             ("migrations", "bytes_after_power_off")],
         3: [("migrations", "shared")],
         4: [("migrations", "revert_failed"), ("migrations", "stopped_in"), ("migrations", "job_seq"),
             ("drains", "error")],
         5: [("index", "ux_migrations_open_server")],
         6: [("migrations", "lease_owner"), ("migrations", "lease_until"), ("drains", "lease_owner"),
             ("drains", "lease_until")],
         7: [("migrations", "timeline"), ("migrations", "requested_at")],
         8: [("index", "ix_migrations_source_compute"), ("index", "ix_migrations_dest_compute"),
             ("index", "ix_migrations_server_name")]}


def downgrade(s: Store, version: int) -> None:
    with s._write() as conn:
        for step, added in sorted(ADDED.items(), reverse=True):
            if step > version:
                for table, name in added:
                    conn.execute(sa.text(f"DROP INDEX {name}" if table == "index"
                                         else f"ALTER TABLE {table} DROP COLUMN {name}"))
        conn.execute(sa.text(f"UPDATE schema_version SET version = {version}"))


def test_upgrade_from_version_1_adds_the_precopy_figures(url, clock):
    """A version-1 database (before pre-copy) gets the columns; old cold migrations copied
    everything after the power-off, live ones nothing."""
    with Store(url, clock=clock) as s:
        cold = migration(s, bytes_sent=5000)
        live = migration(s, server="uuid-2", migration_type=MigrationType.LIVE)
        downgrade(s, 1)
    assert "precopy" not in columns(url, "migrations")
    with Store(url, clock=clock) as s:
        assert s.schema_version() == SCHEMA_VERSION == 8
        got = s.get_migration(cold.id)
        assert (got.precopy, got.bytes_before_power_off, got.bytes_after_power_off, got.bytes_sent) == (
            False, 0, 5000, 5000)
        assert s.get_migration(live.id).bytes_after_power_off == 0
        moved = s.update_migration(cold.id, precopy=True, bytes_before_power_off=2**33, bytes_after_power_off=7)
        assert (moved.precopy, moved.bytes_before_power_off, moved.bytes_after_power_off) == (True, 2**33, 7)
        assert moved.to_api()["bytes_before_power_off"] == 2**33


def test_upgrade_from_version_2_adds_the_shared_flag(url, clock):
    """A version-2 database gets ``shared``: unknown (None) for the migrations it has."""
    with Store(url, clock=clock) as s:
        old = migration(s)
        downgrade(s, 2)
    with Store(url, clock=clock) as s:
        assert s.schema_version() == SCHEMA_VERSION
        assert s.get_migration(old.id).shared is None
        assert s.update_migration(old.id, shared=True).shared is True
        assert "shared" not in s.get_migration(old.id).to_api()   # internal, as disk_info is


def test_upgrade_from_version_3_adds_the_recovery_columns(url, clock):
    """A version-3 database gets revert_failed (False), stopped_in (None), job_seq (0) on
    migrations and error (None) on drains; the new status is stored and found."""
    with Store(url, clock=clock) as s:
        old = migration(s)
        drain = s.create_drain("compute1", False, 1, False, None, False)
        downgrade(s, 3)
    assert "revert_failed" not in columns(url, "migrations") and "error" not in columns(url, "drains")
    with Store(url, clock=clock) as s:
        assert s.schema_version() == SCHEMA_VERSION
        got = s.get_migration(old.id)
        assert (got.revert_failed, got.stopped_in, got.job_seq) == (False, None, 0)
        assert s.get_drain(drain.id).error is None
        got = s.update_migration(old.id, status=MigrationStatus.NEEDS_RECOVERY, stopped_in="post-migrating",
                                 revert_failed=True, job_seq=3)
        assert [m.id for m in s.migrations_in(MigrationStatus.NEEDS_RECOVERY)] == [old.id]
        assert s.open_migration_for(got.server).id == old.id   # needs-recovery blocks new migrations
        api = got.to_api()
        assert api["status"] == "needs-recovery" and api["stopped_in"] == "post-migrating"
        assert api["revert_failed"] is True and "job_seq" not in api
        assert s.update_drain(drain.id, error="host compute1 is not empty").error == "host compute1 is not empty"


def open_migrations_of(url: str, server: str, n: int) -> None:
    """Add ``n`` open migrations of ``server`` behind the store's back, as a database from
    before version 5 could hold them."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for _ in range(n):
            row = dataclasses.asdict(records.MigrationRecord(
                id=0, uuid=str(uuidlib.uuid4()), server=server, server_name="web", source_compute="a",
                dest_compute="b", dest_address="198.18.0.2", status=MigrationStatus.MIGRATING))
            # the lease came with version 6, the timeline with version 7
            for newer in ("id", "lease_owner", "lease_until", "timeline", "requested_at"):
                del row[newer]
            conn.execute(schema_module.migrations.insert().values(row))
    engine.dispose()


def test_upgrade_from_version_4_adds_the_open_migration_index(url, clock):
    """A version-4 database gets the partial unique index, unless a server has two open
    migrations already: then it stays at version 4, and the message names the servers."""
    with Store(url, clock=clock) as s:
        migration(s, server="ok")
        downgrade(s, 4)
    open_migrations_of(url, "u-twice", 2)
    with pytest.raises(StoreError) as e:
        Store(url, clock=clock)
    assert ("upgrading the schema to version 5 (at most one open migration per server (a partial unique "
            "index)) failed: servers with more than one open migration: u-twice (2); end all but one of "
            "each (set its status to error) and open the database again; it stays at version 4") in str(e.value)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT version FROM schema_version")).scalar_one() == 4
        conn.execute(sa.text("UPDATE migrations SET status = 'error' WHERE id = "
                             "(SELECT MIN(id) FROM migrations WHERE server = 'u-twice')"))
    engine.dispose()
    with Store(url, clock=clock) as s:
        assert s.schema_version() == SCHEMA_VERSION
        with pytest.raises(store_module.OpenMigrationExists):
            migration(s, server="u-twice")


def test_upgrade_from_version_5_adds_the_lease_columns(url, clock):
    """A version-5 database gets the lease columns: nobody holds its migrations and drains, so
    the first controller to claim one drives it; job names get their full length."""
    with Store(url, clock=clock) as s:
        old = migration(s, status=MigrationStatus.MIGRATING)
        drain = s.create_drain("compute1", False, 1, False, None, False)
        downgrade(s, 5)
        if url.startswith("postgresql"):
            with s._write() as conn:
                for column in ("source_job", "dest_job"):
                    conn.execute(sa.text(f"ALTER TABLE migrations ALTER COLUMN {column} TYPE VARCHAR(64)"))
    assert "lease_owner" not in columns(url, "migrations") and "lease_until" not in columns(url, "drains")
    with Store(url, clock=clock) as s:
        assert s.schema_version() == SCHEMA_VERSION
        got = s.get_migration(old.id)
        assert (got.lease_owner, got.lease_until) == (None, None) and "lease_owner" not in got.to_api()
        assert s.get_drain(drain.id).lease_owner is None
        lease = records.Lease("ctl-a", 60)
        assert [m.id for m in s.in_flight_migrations(free_for=lease)] == [old.id]
        assert s.claim("migration", old.id, lease) and s.claim("drain", drain.id, lease)
        assert s.get_migration(old.id).lease_owner == s.get_drain(drain.id).lease_owner == "ctl-a"
        assert not s.claim("migration", old.id, records.Lease("ctl-b", 60))
        name = f"{old.uuid}-migrate-disk-and-power-off-1"   # 65 characters: too long before, on PostgreSQL
        assert s.update_migration(old.id, source_job=name, dest_job=name).source_job == name


def test_upgrade_from_version_6_adds_the_timeline(url, clock):
    """A version-6 database gets an empty timeline and no request time on its migrations; a
    timeline written afterwards comes back as the phases it was, and the API shows it."""
    with Store(url, clock=clock) as s:
        old = migration(s, status=MigrationStatus.FINISHED)
        downgrade(s, 6)
    assert "timeline" not in columns(url, "migrations")
    with Store(url, clock=clock) as s:
        assert s.schema_version() == SCHEMA_VERSION
        got = s.get_migration(old.id)
        assert (got.timeline, got.requested_at) == ([], None)
        phases = [Phase(PhaseName.SHUTDOWN, 1_800_000_000.25, 1_800_000_003.5, "a"),
                  Phase(PhaseName.COPY, 1_800_000_003.5, 1_800_000_004.0, "a", "disk")]
        assert s.update_migration(old.id, timeline=phases, requested_at=1_799_999_999.125).timeline == phases
        got = s.get_migration(old.id)
        assert (got.timeline, got.requested_at) == (phases, 1_799_999_999.125)
        api = got.to_api()
        assert "requested_at" not in api
        assert api["timeline"][1] == {"phase": "copy", "host": "a", "start": 1_800_000_003.5, "end": 1_800_000_004.0,
                                      "seconds": 0.5, "detail": "disk"}


def test_upgrade_from_version_7_adds_the_history_indexes(url, clock):
    """The migration list's host and server filters get their indexes; the list answers as before."""
    with Store(url, clock=clock) as s:
        old = migration(s, status=MigrationStatus.CONFIRMED)
        downgrade(s, 7)
    assert "ix_migrations_dest_compute" not in indexes(url, "migrations")
    with Store(url, clock=clock) as s:
        assert s.schema_version() == SCHEMA_VERSION
        assert [m.id for m in s.list_migrations(host=old.dest_compute)] == [old.id]
        assert [m.id for m in s.list_migrations(server=old.server_name)] == [old.id]
    assert {"ix_migrations_source_compute", "ix_migrations_dest_compute",
            "ix_migrations_server_name"} <= indexes(url, "migrations")


def indexes(url: str, table: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return {i["name"] for i in sa.inspect(engine).get_indexes(table)}
    finally:
        engine.dispose()


def test_newer_schema_is_refused(url, monkeypatch):
    monkeypatch.setattr(schema_module, "SCHEMA_VERSION", 99)
    Store(url).close()  # made by a newer coldferry
    monkeypatch.undo()
    with pytest.raises(StoreError) as e:
        Store(url)
    assert f"schema version 99 is newer than this coldferry knows ({SCHEMA_VERSION}): upgrade coldferry" \
        in str(e.value)


def test_foreign_tables_without_a_version_are_refused(tmp_path):
    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE migrations (x INTEGER)").connection.commit()
    with pytest.raises(StoreError, match="no schema_version: not a database this code made"):
        Store(f"sqlite:///{path}")


def test_bad_urls_and_unopenable_files(tmp_path):
    with pytest.raises(StoreError, match="not an SQLAlchemy URL"):
        Store("controller.db")
    with pytest.raises(StoreError, match="cannot open it .* check that it exists"):
        Store(f"sqlite:///{tmp_path}/missing-dir/controller.db")


def test_password_is_not_shown():
    with pytest.raises(StoreError) as e:
        Store("postgresql+nosuchdriver://u:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(e.value) and "***" in str(e.value)


# hosts

def test_sync_hosts_adds_updates_keeps_status_and_drops(store):
    store.sync_hosts([HostRecord("a", "http://a:8797", "198.18.0.1"), HostRecord("b", "http://b:8797", "198.18.0.2")])
    store.set_service("a", False, "maintenance")
    hosts = store.sync_hosts([HostRecord("a", "http://a2:8797", "198.18.1.1"),
                              HostRecord("c", "http://c:8797", "198.18.0.3")])
    assert hosts == store.list_hosts() == [
        HostRecord("a", "http://a2:8797", "198.18.1.1", enabled=False, disabled_reason="maintenance"),
        HostRecord("c", "http://c:8797", "198.18.0.3")]
    assert store.get_host("b") is None
    assert store.sync_hosts([]) == []  # a configuration without hosts drops them all


def test_set_service(store):
    store.sync_hosts([HostRecord("a", "http://a:8797", "198.18.0.1")])
    assert store.set_service("a", False, "drain") == HostRecord("a", "http://a:8797", "198.18.0.1", False, "drain")
    assert store.set_service("a", True, "ignored") == HostRecord("a", "http://a:8797", "198.18.0.1", True, None)
    assert store.get_host("a").enabled is True
    with pytest.raises(NotFound, match="host nope not found"):
        store.set_service("nope", False, None)


# migrations

def test_create_migration_defaults_and_round_trip(store, clock):
    m = migration(store, flavor={"name": "m1.small", "vcpus": 1}, old_power_state=1)
    assert m.id >= 1 and len(m.uuid) == 36
    assert (m.status, m.migration_type, m.task_state, m.forced, m.digests) == (
        MigrationStatus.PRE_MIGRATING, MigrationType.COLD, "resize_prep", False, [])
    assert m.created_at == m.updated_at == T0
    got = store.get_migration(m.id)
    assert got == m and got.created_at.tzinfo == dt.timezone.utc
    # The enums come back as enums, and the database holds their plain values.
    assert (type(got.status), type(got.migration_type), got.old_power_state) == (
        MigrationStatus, MigrationType, PowerState.RUNNING)
    with store._read() as conn:
        assert tuple(conn.execute(sa.text("SELECT status, migration_type, old_power_state FROM migrations"))
                     .one()) == ("pre-migrating", "migration", 1)
    other = migration(store, server="uuid-2")
    assert other.id == m.id + 1 and other.uuid != m.uuid
    assert store.get_migration(other.id + 100) is None


def test_create_migration_rejects_bad_fields(store):
    with pytest.raises(TypeError, match="sets id, uuid itself"):
        migration(store, id=3, uuid="x")
    with pytest.raises(TypeError):
        migration(store, colour="red")
    with pytest.raises(TypeError):
        store.create_migration(server="s")  # the rest is required


def test_update_migration(store, clock):
    m = migration(store)
    clock.advance(30)
    progress = {"file": "disk", "done": 5, "total": 10, "rate": 1.5, "eta": None, "fraction": 0.5}
    u = store.update_migration(m.id, status=MigrationStatus.MIGRATING, progress=progress, digests=["a", "b"],
                               bytes_sent=2**40, downtime_s=0.25)
    assert (u.status, u.progress, u.digests, u.bytes_sent, u.downtime_s) == (
        MigrationStatus.MIGRATING, progress, ["a", "b"], 2**40, 0.25)
    assert (u.created_at, u.updated_at) == (T0, T0 + dt.timedelta(seconds=30))
    assert store.get_migration(m.id) == u
    assert store.update_migration(m.id, progress=None).progress is None
    with pytest.raises(TypeError, match="unknown or read-only field"):
        store.update_migration(m.id, colour="red")
    with pytest.raises(TypeError, match="created_at"):
        store.update_migration(m.id, created_at=T0)
    with pytest.raises(NotFound, match="migration 999 not found"):
        store.update_migration(999, status=MigrationStatus.ERROR)


def test_list_migrations_filters_newest_first(store, clock):
    m1 = migration(store, server="u1", name="web1", source="a", dest="b", status=MigrationStatus.CONFIRMED)
    clock.advance(60)
    m2 = migration(store, server="u2", name="db1", source="b", dest="c", migration_type=MigrationType.LIVE)
    clock.advance(60)
    m3 = migration(store, server="u1", name="web1", source="b", dest="c")
    ids = lambda ms: [m.id for m in ms]  # noqa: E731
    assert ids(store.list_migrations()) == [m3.id, m2.id, m1.id]
    assert ids(store.list_migrations(host="a")) == [m1.id]
    assert ids(store.list_migrations(host="c")) == [m3.id, m2.id]
    assert ids(store.list_migrations(server="u1")) == ids(store.list_migrations(server="web1")) == [m3.id, m1.id]
    assert ids(store.list_migrations(migration_type=MigrationType.LIVE)) == [m2.id]
    store.update_migration(m1.id, status=MigrationStatus.ERROR)  # updated now: T0 + 120
    assert ids(store.list_migrations(status=MigrationStatus.ERROR)) == [m1.id]
    assert ids(store.list_migrations(changes_since=T0 + dt.timedelta(seconds=60))) == [m3.id, m2.id, m1.id]
    assert ids(store.list_migrations(changes_since=T0 + dt.timedelta(seconds=61))) == [m3.id, m1.id]
    # Another zone, same instant; and a naive time is taken as UTC.
    cet = dt.timezone(dt.timedelta(hours=1))
    assert ids(store.list_migrations(changes_since=(T0 + dt.timedelta(seconds=61)).astimezone(cet))) == [m3.id, m1.id]
    assert ids(store.list_migrations(changes_since=dt.datetime(2026, 11, 23, 11, 41, 1))) == [m3.id, m1.id]
    assert store.list_migrations(host="c", server="web1", status=MigrationStatus.PRE_MIGRATING) == [m3]


def test_in_flight_and_open_migrations(store, clock):
    done = migration(store, server="u1")
    store.update_migration(done.id, status=MigrationStatus.CONFIRMED)
    assert store.open_migration_for("u1") is None
    clock.advance(1)
    finished = migration(store, server="u1", status=MigrationStatus.FINISHED)
    assert store.open_migration_for("u1") == finished  # finished still waits for confirm or revert
    running = [migration(store, server=f"r{i}", status=s) for i, s in enumerate(sorted(records.IN_FLIGHT))]
    migration(store, server="e", status=MigrationStatus.ERROR)
    assert [m.id for m in store.in_flight_migrations()] == [m.id for m in running]
    assert store.open_migration_for("r0") == running[0]
    assert store.open_migration_for("unknown") is None


def test_one_open_migration_per_server(store):
    """The database refuses a second open migration of a server: every status but the final
    ones is open ('finished' and 'needs-recovery' too); final ones pile up freely."""
    for i, status in enumerate(sorted(MigrationStatus)):
        first = migration(store, server=f"s{i}", status=status)
        if status in records.FINAL:
            migration(store, server=f"s{i}", status=status)
            migration(store, server=f"s{i}")  # and an open one beside them
            continue
        with pytest.raises(store_module.OpenMigrationExists) as e:
            migration(store, server=f"s{i}")
        assert str(e.value) == (f"database {store.url}: server s{i} already has an open migration (migration "
                                f"{first.id}, {status}); it refuses a second")
        assert isinstance(e.value, StoreError)   # the conductor answers it with a Conflict
        store.update_migration(first.id, status=MigrationStatus.ERROR)
        migration(store, server=f"s{i}")  # once the first has ended
    # Moving a final migration back to an open status beside an open one is refused as well.
    ended = migration(store, server="x", status=MigrationStatus.ERROR)
    migration(store, server="x")
    with pytest.raises(sa.exc.IntegrityError):
        store.update_migration(ended.id, status=MigrationStatus.NEEDS_RECOVERY)


def test_concurrent_writers_from_threads(store):
    store.sync_hosts([HostRecord("a", "http://a:8797", "198.18.0.1")])
    shared = migration(store, server="shared")
    errors: list[BaseException] = []
    created: list[int] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                m = migration(store, server=f"t{n}-{i}")
                created.append(store.update_migration(m.id, status=MigrationStatus.MIGRATING, bytes_sent=i).id)
                store.update_migration(shared.id, bytes_sent=n * 100 + i)
                store.set_service("a", i % 2 == 0, f"thread {n}")
                store.list_migrations(host="a")
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(created)) == 60
    assert len(store.list_migrations(status=MigrationStatus.MIGRATING)) == 60
    assert store.get_migration(shared.id).bytes_sent % 100 == 9  # some thread's last write won whole


def test_in_memory_database_is_shared_between_threads():
    with Store("sqlite://") as s:
        made: list[int] = []
        t = threading.Thread(target=lambda: made.append(migration(s).id))
        t.start()
        t.join()
        assert [m.id for m in s.list_migrations()] == made


# drains

def test_drains_with_rows(store, clock):
    d = store.create_drain("a", live=True, max_servers=2, dry_run=False, target_host=None, force=False)
    assert (d.host, d.live, d.max_servers, d.status, d.rows, d.created_at) == (
        "a", True, 2, DrainStatus.RUNNING, [], T0)
    r1 = store.add_drain_row(d.id, "u1", "web1", "running", MigrationType.LIVE, True, RowStatus.QUEUED)
    r2 = store.add_drain_row(d.id, "u2", "db1", "paused", None, False, RowStatus.ERROR, error="paused servers stay")
    m = migration(store, server="u1")
    clock.advance(10)
    updated = store.update_drain_row(r1.id, status=RowStatus.MIGRATING, migration_id=m.id)
    assert (updated.status, updated.migration_id, updated.name) == (RowStatus.MIGRATING, m.id, "web1")
    got = store.get_drain(d.id)
    assert [r.server for r in got.rows] == ["u1", "u2"]
    assert got.rows[0] == updated and got.rows[1] == r2
    assert got.updated_at == T0 + dt.timedelta(seconds=10)  # a row change touches its drain
    assert got.totals() == {"total": 2, "queued": 0, "migrating": 1, "done": 0, "error": 1, "planned": 0}
    done = store.update_drain(d.id, status=DrainStatus.DONE)
    assert done.status is DrainStatus.DONE and len(done.rows) == 2
    assert type(done.rows[0].status) is RowStatus and done.rows[0].migration_type is MigrationType.LIVE
    clock.advance(10)
    d2 = store.create_drain("b", live=False, max_servers=1, dry_run=True, target_host="c", force=True)
    store.add_drain_row(d2.id, "u3", "x", "shutdown", MigrationType.COLD, True, RowStatus.PLANNED)
    listed = store.list_drains()
    assert [(x.id, len(x.rows)) for x in listed] == [(d2.id, 1), (d.id, 2)]
    assert (listed[0].dry_run, listed[0].target_host, listed[0].force) == (True, "c", True)
    assert store.get_drain(d2.id + 1) is None


def test_drain_errors(store):
    with pytest.raises(NotFound, match="drain 5 not found"):
        store.add_drain_row(5, "u", "n", "running", None, False, RowStatus.QUEUED)
    with pytest.raises(NotFound, match="drain row 9 not found"):
        store.update_drain_row(9, status=RowStatus.DONE)
    with pytest.raises(NotFound, match="drain 5 not found"):
        store.update_drain(5, status=DrainStatus.DONE)
    d = store.create_drain("a", live=False, max_servers=1, dry_run=False, target_host=None, force=False)
    row = store.add_drain_row(d.id, "u", "n", "running", None, False, RowStatus.QUEUED)
    with pytest.raises(TypeError, match="drain_id"):
        store.update_drain_row(row.id, drain_id=7)
    with pytest.raises(TypeError, match="rows"):
        store.update_drain(d.id, rows=[])


def test_postgresql_is_really_postgresql(pg_url):
    """The second engine every ``url`` test runs on is a real PostgreSQL server."""
    assert sa.engine.make_url(pg_url).get_backend_name() == "postgresql"
    with Store(pg_url) as s:
        assert s.schema_version() == SCHEMA_VERSION
        with s._read() as conn:
            assert conn.execute(sa.text("SELECT version()")).scalar_one().startswith("PostgreSQL ")
