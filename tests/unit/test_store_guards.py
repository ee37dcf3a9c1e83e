"""What the database guards between controllers: one open migration per server, enforced
by a partial unique index even when two stores race (on SQLite and a real PostgreSQL); the
schema created and upgraded once when several open it at once; one controller per SQLite file."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.config import ControllerConfig
from controller.errors import Conflict
from controller.records import MigrationRecord, MigrationStatus
from controller.service import build
from controller.schema import SCHEMA_VERSION
from controller.store import DatabaseInUse, OpenMigrationExists, Store
from tests.unit.controller_env import TOKEN, Env

VM = "00000000-0000-4000-8000-00000000000a"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/controller.db"
    return request.getfixturevalue("pg_url")


def at_once(n: int, work: Callable[[int], Any]) -> tuple[list[Any], list[BaseException]]:
    """Run work(0..n-1) in n threads released together; what they returned and raised."""
    start = threading.Barrier(n)
    done: list[Any] = []
    failed: list[BaseException] = []

    def run(i: int) -> None:
        start.wait()
        try:
            done.append(work(i))
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            failed.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return done, failed


def open_migration(store: Store, server: str) -> MigrationRecord:
    return store.create_migration(server=server, server_name="web", source_compute="a", dest_compute="b",
                                  dest_address="198.18.0.2")


def test_two_stores_racing_for_one_server_record_one_migration(url):
    """Two stores (two engines, as two controllers have) create an open migration of the same
    server at the same moment, round after round: exactly one wins each round."""
    stores = [Store(url), Store(url)]
    try:
        for rnd in range(8):
            done, failed = at_once(2, lambda i: open_migration(stores[i], f"server-{rnd}"))
            assert len(done) == 1 and len(failed) == 1, failed
            assert isinstance(failed[0], OpenMigrationExists), failed[0]
            assert f"server server-{rnd} already has an open migration (migration {done[0].id}, " \
                   f"pre-migrating)" in str(failed[0])
        assert {m.server for m in stores[1].list_migrations()} == {f"server-{r}" for r in range(8)}
        assert len(stores[0].list_migrations()) == 8
    finally:
        for s in stores:
            s.close()


def test_stores_opening_a_new_database_at_once_create_it_once(pg_url):
    """Controllers started together on an empty PostgreSQL database: an advisory lock makes
    them take turns, so one creates the schema and the others find it. (SQLite is for one
    controller; its write transaction is that lock.)"""
    opened, failed = at_once(4, lambda i: Store(pg_url))
    try:
        assert failed == []
        assert [s.schema_version() for s in opened] == [SCHEMA_VERSION] * 4
    finally:
        for s in opened:
            s.close()


def test_the_conductor_answers_409_when_the_database_refuses(tmp_path: Path, monkeypatch) -> None:
    """Another controller records a migration of the server between this one's check and its
    insert: the store's refusal becomes the same Conflict the check gives."""
    env = Env.make(tmp_path, n=2, spawn=lambda work: None)   # record only, drive nothing
    env.add("host1", VM, "web")
    placement = env.conductor.placement
    real_check = placement.check_movable
    other = Store(env.config.database)   # the other controller's store

    def check_then_lose_the_race(server: Any) -> None:
        real_check(server)
        monkeypatch.setattr(placement, "check_movable", real_check)
        open_migration(other, VM)

    monkeypatch.setattr(placement, "check_movable", check_then_lose_the_race)
    try:
        with pytest.raises(Conflict, match=r"server web \(.*\) already has migration 1 in status pre-migrating"):
            env.conductor.migrate("web", "host2")
        monkeypatch.setattr(placement, "check_movable", check_then_lose_the_race)
        other.update_migration(1, status=MigrationStatus.ERROR)
        r = env.api().post("/v1/servers/web/action", json={"migrate": {"host": "host2"}})
        assert r.status_code == 409 and "already has migration 2 in status pre-migrating" in r.json()["detail"]
        assert [m.id for m in other.list_migrations()] == [2, 1]   # nothing recorded for the loser
    finally:
        other.close()


# One controller per SQLite file

def test_a_second_exclusive_store_on_a_sqlite_file_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/controller.db"
    first = Store(url, exclusive=True)
    with pytest.raises(DatabaseInUse) as e:
        Store(url, exclusive=True)
    assert str(e.value) == (
        f"database {url}: another controller uses it (it holds {tmp_path}/controller.db.lock); a SQLite database "
        "is for one controller: stop the other one, or give every controller the same PostgreSQL URL")
    with Store(url) as reader:   # a store that is no controller's own (tests, tools) is not held off
        assert reader.schema_version() == SCHEMA_VERSION
    first.close()
    with Store(url, exclusive=True) as again:   # closing lets go
        assert again.schema_version() == SCHEMA_VERSION
    assert Store(f"sqlite:///{tmp_path}/other.db", exclusive=True)   # another file, another lock


def test_a_second_controller_on_one_sqlite_file_refuses_to_start(tmp_path: Path) -> None:
    config = ControllerConfig(token=TOKEN, database=f"sqlite:///{tmp_path}/controller.db")
    first = build(config)
    with pytest.raises(DatabaseInUse, match="a SQLite database is for one controller"):
        build(config)
    first.store.close()
    build(dataclasses.replace(config)).store.close()


def test_exclusive_means_nothing_on_postgresql_or_in_memory(pg_url: str) -> None:
    with Store(pg_url, exclusive=True) as a, Store(pg_url, exclusive=True) as b:
        assert a.schema_version() == b.schema_version() == SCHEMA_VERSION
    with Store("sqlite://", exclusive=True) as a, Store("sqlite://", exclusive=True) as b:
        assert a.schema_version() == b.schema_version()
