"""Several controllers, one truth: each migration and drain is driven by the one controller that
holds its lease in the database (docs/safety.md, "Several controllers").

The store's claim, renewal and release run on both engines; the controller tests run two
controllers (each its own store, agent clients and lease owner) on one database of the
session's private PostgreSQL cluster, over in-memory hosts behind real agent apps. Leases are
taken and compared on a clock the test moves (every store shares it, as every controller
shares PostgreSQL's ``now()``), so a lease runs out without waiting.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from controller.errors import Conflict
from controller.records import DrainStatus, Lease, MigrationRecord, MigrationStatus, RowStatus, controller_id
from controller.service import Controller
from controller.store import LeaseLost, Store
from driver.model import PowerState
from tests.unit.controller_env import TOKEN, Env
from tests.unit.test_store import T0, Clock, url  # noqa: F401 - url: the fixture of both engines
from tests.unit.test_store_guards import at_once

VM = "00000000-0000-4000-8000-00000000000a"
RUNNING, SHUTDOWN = int(PowerState.RUNNING), int(PowerState.SHUTDOWN)
_S = MigrationStatus
A, B, C = Lease("ctl-a", 60), Lease("ctl-b", 60), Lease("ctl-c", 60)


@pytest.fixture
def clock() -> Clock:
    """The lease clock of every store of a test: it moves only when the test says so."""
    return Clock()


def open_migration(store: Store, server: str = VM, lease: Lease | None = None) -> MigrationRecord:
    return store.create_migration(lease=lease, server=server, server_name="web", source_compute="host1",
                                  dest_compute="host2", dest_address="198.18.0.12", status=_S.MIGRATING)


# -- the store: claim, renew, release ------------------------------------------------------------

def test_claim_renew_release(url: str, clock: Clock) -> None:
    with Store(url, lease_clock=clock) as s:
        m = open_migration(s)
        assert (m.lease_owner, m.lease_until) == (None, None)
        assert s.claim("migration", m.id, A)
        got = s.get_migration(m.id)
        assert (got.lease_owner, got.lease_until) == ("ctl-a", T0 + dt.timedelta(seconds=60))
        assert s.claim("migration", m.id, A)                 # the holder may claim again
        assert not s.claim("migration", m.id, B)             # a live lease keeps others out
        assert not s.renew("migration", m.id, B) and not s.release("migration", m.id, B)
        clock.advance(59)
        assert s.renew("migration", m.id, A)
        assert s.get_migration(m.id).lease_until == T0 + dt.timedelta(seconds=119)
        clock.advance(60)
        assert not s.claim("migration", m.id, B)             # renewed: still A's
        clock.advance(1)
        assert s.claim("migration", m.id, B)                 # ran out: B takes it over
        assert not s.renew("migration", m.id, A)             # and A learns it lost it
        assert s.release("migration", m.id, B)
        assert s.get_migration(m.id).lease_owner is None
        assert s.claim("migration", m.id, C)                 # released: anyone at once
        assert s.get_migration(m.id).updated_at == m.updated_at   # leases are not changes


def test_a_write_with_a_lease_is_fenced_by_it_and_renews_it(url: str, clock: Clock) -> None:
    with Store(url, lease_clock=clock) as s:
        m = open_migration(s, lease=A)
        assert s.get_migration(m.id).lease_owner == "ctl-a"
        clock.advance(30)
        assert s.update_migration(m.id, A, progress={"done": 1}).lease_until == T0 + dt.timedelta(seconds=90)
        with pytest.raises(LeaseLost, match=f"migration {m.id} is no longer driven by this controller "
                                            r"\(ctl-b\): ctl-a holds it now"):
            s.update_migration(m.id, B, status=_S.ERROR)
        assert s.get_migration(m.id).status == _S.MIGRATING       # nothing written
        s.release("migration", m.id, A)
        with pytest.raises(LeaseLost, match="released"):
            s.update_migration(m.id, A, status=_S.ERROR)
        with pytest.raises(TypeError, match="lease_owner"):
            s.update_migration(m.id, lease_owner="ctl-z")         # only claims set leases
        d = s.create_drain("host1", False, 1, False, None, False, lease=A)
        row = s.add_drain_row(d.id, VM, "web", "running", None, False, RowStatus.QUEUED)
        s.update_drain_row(row.id, A, status=RowStatus.MIGRATING)
        with pytest.raises(LeaseLost):
            s.update_drain_row(row.id, B, status=RowStatus.ERROR)
        with pytest.raises(LeaseLost):
            s.update_drain(d.id, B, status=DrainStatus.DONE)
        assert s.get_drain(d.id).rows[0].status == RowStatus.MIGRATING and s.get_drain(d.id).status == "running"


def test_a_claim_may_require_a_status(url: str, clock: Clock) -> None:
    with Store(url, lease_clock=clock) as s:
        m = open_migration(s)
        assert not s.claim("migration", m.id, A, status=_S.FINISHED)
        s.update_migration(m.id, status=_S.FINISHED)
        assert s.claim("migration", m.id, A, status=_S.FINISHED)


def test_only_unheld_records_are_offered(url: str, clock: Clock) -> None:
    with Store(url, lease_clock=clock) as s:
        held, free = open_migration(s, "vm-held", lease=A), open_migration(s, "vm-free")
        d_held = s.create_drain("host1", False, 1, False, None, False, lease=A)
        d_free = s.create_drain("host2", False, 1, False, None, False)
        assert [m.id for m in s.in_flight_migrations(free_for=B)] == [free.id]
        assert [m.id for m in s.in_flight_migrations(free_for=A)] == [held.id, free.id]
        assert [d.id for d in s.list_drains(DrainStatus.RUNNING, free_for=B)] == [d_free.id]
        clock.advance(61)
        assert [m.id for m in s.in_flight_migrations(free_for=B)] == [held.id, free.id]
        assert [d.id for d in s.list_drains(DrainStatus.RUNNING, free_for=B)] == [d_free.id, d_held.id]


@pytest.mark.parametrize("expired", [False, True], ids=["free", "expired"])
def test_claims_racing_from_several_stores_have_one_winner(url: str, clock: Clock, expired: bool) -> None:
    """Four stores (four engines, as four controllers have) claim the same records at the same
    moment, round after round: exactly one wins each, whether the record was free or its
    holder's lease ran out."""
    stores = [Store(url, lease_clock=clock) for _ in range(4)]
    leases = [Lease(f"ctl-{i}", 60) for i in range(4)]
    try:
        for rnd in range(12):
            m = open_migration(stores[0], f"vm-{rnd}", lease=Lease("dead", 60) if expired else None)
            if expired:
                clock.advance(61)
            won, failed = at_once(4, lambda i: stores[i].claim("migration", m.id, leases[i]) and i)
            assert failed == [] and len([w for w in won if w is not False]) == 1, won
            winner = next(w for w in won if w is not False)
            assert stores[1].get_migration(m.id).lease_owner == f"ctl-{winner}"
    finally:
        for s in stores:
            s.close()


def test_postgresql_leases_run_on_the_database_clock(pg_url: str) -> None:
    """Without a lease clock, PostgreSQL's now() decides: a controller whose own clock is a day
    off takes and checks leases exactly like the others."""
    skewed = lambda: dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)  # noqa: E731
    with Store(pg_url, clock=skewed) as s, Store(pg_url) as other:
        m = open_migration(s, lease=A)
        with s._read() as conn:
            db_now = conn.execute(sa.select(sa.func.now())).scalar_one()
        assert abs((m.lease_until - db_now).total_seconds() - 60) < 5
        assert not other.claim("migration", m.id, B)
        assert s.renew("migration", m.id, Lease(A.owner, 0.001))   # A's lease runs out at once
        time.sleep(0.01)
        assert other.claim("migration", m.id, B)


def test_controller_ids_differ_per_process_start() -> None:
    a, b = controller_id(), controller_id()
    assert a != b and a.rsplit("-", 2)[1] == b.rsplit("-", 2)[1]   # same host and pid, another random part


def test_a_controller_that_holds_its_sqlite_file_takes_over_at_once(tmp_path: Path, clock: Clock) -> None:
    """SQLite is for one controller (its file lock): any other holder of a lease died, so a
    restarted controller does not wait for the lease to run out."""
    url = f"sqlite:///{tmp_path}/controller.db"
    with Store(url, lease_clock=clock) as s:
        m = open_migration(s, lease=Lease("the-last-run", 60))
    with Store(url, lease_clock=clock, exclusive=True) as s:
        assert [x.id for x in s.in_flight_migrations(free_for=A)] == [m.id]
        assert s.claim("migration", m.id, A)


# -- two controllers on one PostgreSQL database ------------------------------------------------------

@pytest.fixture
def env(tmp_path: Path, pg_url: str, clock: Clock) -> Env:
    e = Env.make(tmp_path, n=3, database=pg_url, lease_clock=clock, auto_confirm_seconds=60)
    e.add("host1", VM, "web")
    return e


def settled(ctl: Controller, mid: int, until: frozenset[str], timeout: float = 10.0) -> MigrationRecord:
    deadline = time.monotonic() + timeout
    while (m := ctl.conductor.get(mid)).status not in until:
        assert time.monotonic() < deadline, f"migration {mid} stuck in {m.status}"
        time.sleep(0.005)
    return m


def idle(ctl: Controller, timeout: float = 10.0) -> None:
    """Wait until ``ctl`` drives nothing."""
    deadline = time.monotonic() + timeout
    while ctl.conductor._driving:
        assert time.monotonic() < deadline, ctl.conductor._driving
        time.sleep(0.005)


def hang_after_start(ctl: Controller) -> tuple[threading.Event, threading.Event]:
    """Make ``ctl`` hang (as a stopped process does) in its next look at a job on host1, until
    the first event returned is set; the second is set once it hangs there."""
    hang, hung = threading.Event(), threading.Event()
    agent = ctl.conductor.inventory.agent("host1")
    real_job = agent.job

    def job(job_id: str, wait: float = 0.0) -> Any:
        hung.set()
        hang.wait(20)
        return real_job(job_id, wait)
    agent.job = job  # type: ignore[method-assign]
    return hang, hung


def migrating(ctl: Controller) -> tuple[MigrationRecord, threading.Event]:
    """A migration of the test's server that ``ctl`` started and hangs in, mid-copy (its copy job
    named and started); the event lets it go on."""
    hang, hung = hang_after_start(ctl)
    m = ctl.conductor.migrate("web", "host2")
    assert hung.wait(10)
    return ctl.conductor.get(m.id), hang


def test_two_controllers_asked_to_migrate_one_server_at_once_answer_202_and_409(env: Env) -> None:
    a, b = env.ctl, env.another_controller()
    for rnd, vm in enumerate([VM, "00000000-0000-4000-8000-00000000000b", "00000000-0000-4000-8000-00000000000c"]):
        if rnd:
            env.add("host1", vm, f"web{rnd}")
        apis = [c.app for c in (a, b)]

        def ask(i: int, vm: str = vm) -> Any:
            from fastapi.testclient import TestClient
            api = TestClient(apis[i], headers={"Authorization": f"Bearer {TOKEN}"})
            return i, api.post(f"/v1/servers/{vm}/action", json={"migrate": {"host": "host2"}})

        answers, failed = at_once(2, ask)
        assert failed == []
        codes = sorted(r.status_code for _, r in answers)
        assert codes == [202, 409], [r.text for _, r in answers]
        loser = next(r for _, r in answers if r.status_code == 409)
        assert "already has migration" in loser.json()["detail"]
        winner = (a, b)[next(i for i, r in answers if r.status_code == 202)]
        m = settled(winner, winner.store.list_migrations(server=vm)[0].id, frozenset({_S.FINISHED, _S.ERROR}))
        assert m.status == _S.FINISHED, m.error
        idle(winner)
        assert winner.conductor.get(m.id).lease_owner is None   # waits for the operator: released
        assert len(a.store.list_migrations(server=vm)) == 1
        assert env.jobs("host1", "migrate-disk-and-power-off") == rnd + 1


def test_a_controller_that_dies_mid_copy_is_taken_over_and_coming_back_touches_nothing(
        env: Env, clock: Clock) -> None:
    a, b = env.ctl, env.another_controller()
    # A "dies" once the copy has started: its drive thread hangs in its next call to the source's
    # agent, and nothing renews its lease (no lease timer runs in this test).
    m, hang = migrating(a)
    assert (m.status, m.lease_owner) == (_S.MIGRATING, a.conductor.lease.owner) and m.source_job
    assert b.tend() == []                                  # A's lease is live: B leaves it alone
    clock.advance(59)
    assert b.tend() == []
    clock.advance(2)                                       # A's lease ran out
    assert b.tend() == [m.id]
    m = settled(b, m.id, frozenset({_S.FINISHED, _S.ERROR, _S.NEEDS_RECOVERY}))
    assert m.status == _S.FINISHED, m.error                # B found A's copy job by its name
    assert env.where(VM) == {"host1": SHUTDOWN, "host2": RUNNING}
    idle(b)
    done = a.conductor.get(m.id)
    assert done.lease_owner is None

    hang.set()                                             # A comes back
    idle(a)
    assert a.conductor.get(m.id) == done                   # and wrote nothing
    assert env.jobs("host1", "migrate-disk-and-power-off") == 1 and env.jobs("host2", "finish-migration") == 1
    assert a.tend() == [] and b.tend() == []               # finished: nobody drives it


def test_a_controller_learns_at_renewal_that_it_lost_a_migration(env: Env, clock: Clock) -> None:
    a, b = env.ctl, env.another_controller()
    m, hang = migrating(a)
    clock.advance(61)
    assert b.store.claim("migration", m.id, b.conductor.lease)   # B holds it (and does not drive it here)
    assert a.conductor.renew_leases() == [m.id]
    hang.set()
    idle(a)
    got = a.conductor.get(m.id)
    assert (got.status, got.lease_owner) == (_S.MIGRATING, b.conductor.lease.owner)


def test_a_clean_stop_releases_at_once(env: Env) -> None:
    a, b = env.ctl, env.another_controller()
    m, hang = migrating(a)
    a.stop()
    assert a.conductor.get(m.id).lease_owner is None
    assert b.tend() == [m.id]                              # no waiting for the lease to run out
    hang.set()
    assert settled(b, m.id, frozenset({_S.FINISHED, _S.ERROR})).status == _S.FINISHED
    idle(a)
    assert env.jobs("host1", "migrate-disk-and-power-off") == 1


def test_both_controllers_auto_confirm_the_same_records_and_each_is_confirmed_once(env: Env) -> None:
    a, b = env.ctl, env.another_controller()
    vms = [VM] + [f"00000000-0000-4000-8000-00000000001{i}" for i in range(4)]
    for i, vm in enumerate(vms[1:]):
        env.add("host1", vm, f"web-{i}")
    ids = [settled(a, a.conductor.migrate(vm, "host2").id, frozenset({_S.FINISHED, _S.ERROR})).id for vm in vms]
    assert {a.conductor.get(i).status for i in ids} == {_S.FINISHED}
    later = time.time() + 3600
    a.conductor.clock = b.conductor.clock = lambda: later
    for _ in range(3):                                     # the timers of both, over the same records
        done, failed = at_once(2, lambda i: (a, b)[i].conductor.auto_confirm())
        assert failed == []
    for i in ids:
        assert settled(a, i, frozenset({_S.CONFIRMED, _S.ERROR})).status == _S.CONFIRMED
    idle(a), idle(b)
    assert env.jobs("host1", "confirm-migration") == len(vms)


def test_confirm_by_two_controllers_at_once_one_wins(env: Env) -> None:
    a, b = env.ctl, env.another_controller()
    m = settled(a, a.conductor.migrate("web", "host2").id, frozenset({_S.FINISHED, _S.ERROR}))
    done, failed = at_once(2, lambda i: (a, b)[i].conductor.confirm(m.id))
    assert len(done) == 1 and len(failed) == 1 and isinstance(failed[0], Conflict), failed
    assert settled(a, m.id, frozenset({_S.CONFIRMED, _S.ERROR})).status == _S.CONFIRMED
    idle(a), idle(b)
    assert env.jobs("host1", "confirm-migration") == 1


def test_a_drain_whose_controller_died_is_continued_by_another(env: Env, clock: Clock) -> None:
    a, b = env.ctl, env.another_controller()
    env.add("host1", "00000000-0000-4000-8000-00000000000b", "db", PowerState.SHUTDOWN)
    a.drainer.spawn = lambda work: None                    # A plans the drain, then dies
    d = a.drainer.start("host1", target_host="host2")
    assert (d.status, d.lease_owner, len(d.rows)) == (DrainStatus.RUNNING, a.conductor.lease.owner, 2)
    b.tend()
    assert b.drainer.get(d.id).lease_owner == a.conductor.lease.owner   # live: left alone
    clock.advance(61)
    b.tend()
    deadline = time.monotonic() + 10
    while b.drainer.get(d.id).status != DrainStatus.DONE or b.drainer._running:
        assert time.monotonic() < deadline, b.drainer.get(d.id)
        time.sleep(0.005)
    d = b.drainer.get(d.id)
    assert [r.status for r in d.rows] == [RowStatus.DONE, RowStatus.DONE] and d.error is None
    assert d.lease_owner is None
    a.drainer.run(d.id)                                    # A coming back writes nothing
    assert a.drainer.get(d.id) == d
    assert env.jobs("host1", "migrate-disk-and-power-off") == 2


def test_reconcile_by_several_controllers_at_once_drives_each_migration_once(env: Env, clock: Clock) -> None:
    """Migrations whose controller died, and three controllers whose lease passes run at once,
    round after round: each migration is taken over by exactly one of them."""
    ctls = [env.ctl, env.another_controller(), env.another_controller()]
    for c in ctls:
        c.conductor.spawn = lambda work: None              # claim only: drive nothing
    for rnd in range(6):
        ids = [open_migration(env.ctl.store, f"vm-{rnd}-{i}", lease=Lease("dead", 60)).id for i in range(4)]
        clock.advance(61)
        taken, failed = at_once(3, lambda i: ctls[i].conductor.reconcile())
        assert failed == []
        assert sorted(x for t in taken for x in t) == sorted(ids), taken
        for c in ctls:
            c.conductor._driving.clear()
        for i in ids:
            env.ctl.store.update_migration(i, status=_S.ERROR)
