"""Where servers are, asked without listing the whole fleet, and bursts of migrations (a drain's)
started side by side: in-memory hosts behind real agent apps, a controller on SQLite."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from controller.errors import Conflict
from controller.records import DrainRecord, MigrationStatus
from driver.model import PowerState
from tests.unit.controller_env import Env

A = "00000000-0000-4000-8000-0000000000e1"
B = "00000000-0000-4000-8000-0000000000e2"
C = "00000000-0000-4000-8000-0000000000e3"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env.make(tmp_path, n=3)
    e.add("host1", A, "alpha")
    e.add("host1", B, "beta", PowerState.SHUTDOWN)
    e.add("host2", C, "gamma")
    return e


class Held:
    """Holds every copy of host1 at its first step until ``go()``."""

    def __init__(self, env: Env) -> None:
        self.gate, self.inside = threading.Event(), threading.Event()
        env.drivers["host1"].step_delay = 0.001
        env.drivers["host1"].sleep = self._sleep

    def _sleep(self, seconds: float) -> None:
        self.inside.set()
        assert self.gate.wait(10), "the test never let the copy go on"

    def go(self) -> None:
        self.gate.set()


@pytest.fixture
def held(env: Env) -> Iterator[Held]:
    h = Held(env)
    yield h
    h.go()


def by_host(env: Env, host: str) -> list[tuple[str, str, str | None]]:
    return [(s.id, s.host, s.status) for s in env.conductor.inventory.servers(host=host)]


def from_fleet(env: Env, host: str) -> list[tuple[str, str, str | None]]:
    return [(s.id, s.host, s.status) for s in env.conductor.inventory.servers() if s.host == host]


def test_one_host_asked_alone_agrees_with_the_fleet_listing_through_a_migration(env: Env, held: Held) -> None:
    def agree() -> None:
        for host in env.drivers:
            assert by_host(env, host) == from_fleet(env, host), host

    agree()
    m = env.conductor.migrate("alpha", "host2")
    assert held.inside.wait(10)
    agree()                                   # mid-copy: still host1's
    assert A in {s[0] for s in by_host(env, "host1")}
    held.go()
    env.wait(m.id)
    assert env.where(A) == {"host1": int(PowerState.SHUTDOWN), "host2": int(PowerState.RUNNING)}
    agree()                                   # finished: defined on both, host2's now
    assert [s[0] for s in by_host(env, "host2")] == sorted([A, C], key=lambda u: {A: "alpha", C: "gamma"}[u])
    assert A not in {s[0] for s in by_host(env, "host1")}
    env.conductor.revert(m.id)
    env.wait(m.id, until=frozenset({MigrationStatus.REVERTED}))
    agree()
    assert A in {s[0] for s in by_host(env, "host1")}


def test_a_host_asked_alone_that_does_not_answer_is_a_conflict_and_find_does_without_it(env: Env) -> None:
    env.cut("host2")
    with pytest.raises(Conflict, match="cannot list the servers of host host2"):
        env.conductor.inventory.servers(host="host2")
    found = env.conductor.inventory.find(A)        # by uuid: each host asked for that one server
    assert (found.id, found.host, found.name) == (A, "host1", "alpha")
    assert env.conductor.inventory.find("beta").host == "host1"   # by name: the listing
    env.mend("host2")
    assert env.conductor.inventory.find(C).host == "host2"


def burst(env: Env, held: Held) -> tuple[str, str]:
    """Where the scheduler sends alpha, then beta while alpha's copy is held; both then finish."""
    first = env.conductor.migrate("alpha")
    assert held.inside.wait(10)
    second = env.conductor.migrate("beta")
    held.go()
    for m in (first, second):
        assert env.wait(m.id).status == MigrationStatus.FINISHED
    return first.dest_compute, second.dest_compute


def test_a_burst_of_migrations_spreads_over_the_hosts(env: Env, held: Held) -> None:
    # host2 and host3 start alike but for gamma on host2: the first goes to host3 (more free RAM);
    # counting it as headed there, the second goes to host2 instead of piling onto host3.
    assert burst(env, held) == ("host3", "host2")


def test_without_the_count_of_headed_migrations_the_burst_would_pile_up(env: Env, held: Held,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: with the migrations under way not counted, both go to host3."""
    monkeypatch.setattr(env.conductor.placement, "claimed", lambda states: states)
    assert burst(env, held) == ("host3", "host3")


def test_a_drain_is_run_once_even_when_a_lease_pass_comes_while_its_rows_are_written(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    drainer, store = env.ctl.drainer, env.ctl.store
    real_add = store.add_drain_row
    passes: list[list[int]] = []

    def add_row(*args, **kw):
        row = real_add(*args, **kw)
        passes.append(drainer.resume())     # the lease pass (Controller.tend) resumes drains: right now
        return row
    monkeypatch.setattr(store, "add_drain_row", add_row)
    d = drainer.start("host1", max_servers=2, target_host="host3")
    assert passes == [[], []]                  # the lease passes did not take the drain up again
    d = wait_drain(env, d.id)
    assert [(r.name, str(r.status), r.error) for r in d.rows] == [("alpha", "done", None), ("beta", "done", None)]
    assert env.jobs("host1", "migrate-disk-and-power-off") == 2   # one per server: run once


def wait_drain(env: Env, drain_id: int, timeout: float = 10.0) -> DrainRecord:
    deadline = time.monotonic() + timeout
    while True:
        d = env.ctl.drainer.get(drain_id)
        if str(d.status) == "done":
            return d
        assert time.monotonic() < deadline, d
        time.sleep(0.01)
