"""Prometheus metrics of agent and controller: scraped from ``GET /metrics`` of real apps (in-memory
hosts behind real agent apps, a controller on SQLite) and read with prometheus-client's own parser."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from controller.records import MigrationStatus
from driver.model import PowerState
from tests.unit.controller_env import AGENT_TOKEN, TOKEN, Env

VM = "00000000-0000-4000-8000-0000000000d1"
OFF = "00000000-0000-4000-8000-0000000000d2"


def scrape(client: TestClient, token: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``, by (sample name, sorted labels)."""
    r = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def histogram_count(samples: dict, name: str, **labels: str) -> float:
    """The observation count of one labelled series of histogram ``name``."""
    return value(samples, f"{name}_count", **labels)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env.make(tmp_path, n=2)
    e.add("host1", VM, "web")
    e.add("host1", OFF, "db", PowerState.SHUTDOWN)
    return e


def test_both_metrics_endpoints_want_the_token(env: Env) -> None:
    for client, token in ((env.apps["host1"], AGENT_TOKEN), (TestClient(env.ctl.app), TOKEN)):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
            r = client.get("/metrics", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "coldferry" not in r.text
        scrape(client, token)


def test_a_confirmed_migration_and_a_failed_one_are_counted_on_both_sides(env: Env) -> None:
    ctl = TestClient(env.ctl.app)
    before = scrape(ctl, TOKEN)
    assert value(before, "coldferry_migrations", type="migration", status="confirmed") == 0

    m = env.wait(env.conductor.migrate("web", "host2").id)
    env.conductor.confirm(m.id)
    env.wait(m.id, until=frozenset({MigrationStatus.CONFIRMED}))
    env.drivers["host1"].fail("copy", OSError("connection reset"))
    failed = env.wait(env.conductor.migrate("db", "host2").id)
    assert failed.status == MigrationStatus.ERROR

    source = scrape(env.apps["host1"], AGENT_TOKEN)
    op = "migrate-disk-and-power-off"
    assert value(source, "coldferry_agent_jobs_total", op=op, state="done") == 1
    assert value(source, "coldferry_agent_jobs_total", op=op, state="error") == 1
    assert value(source, "coldferry_agent_jobs_total", op="confirm-migration", state="done") == 1
    record = env.conductor.get(m.id)
    assert record.bytes_sent and value(source, "coldferry_agent_copy_bytes_total", kind="sent") == record.bytes_sent
    assert value(source, "coldferry_agent_copy_bytes_total", kind="skipped") == (record.bytes_skipped or 0)
    assert value(source, "coldferry_agent_copies_in_flight") == 0
    # The failed job's phases up to the failure are observed too: two shutdowns (one per job).
    assert histogram_count(source, "coldferry_agent_phase_seconds", op=op, phase="shutdown") == 2
    assert histogram_count(source, "coldferry_agent_phase_seconds", op=op, phase="copy") == 2
    dest = scrape(env.apps["host2"], AGENT_TOKEN)
    assert histogram_count(dest, "coldferry_agent_phase_seconds", op="finish-migration", phase="define") == 1

    after = scrape(ctl, TOKEN)
    assert value(after, "coldferry_migrations", type="migration", status="confirmed") == 1
    assert value(after, "coldferry_migrations", type="migration", status="error") == 1
    assert value(after, "coldferry_migrations_ended_total", type="migration", status="confirmed") == 1
    assert value(after, "coldferry_migrations_ended_total", type="migration", status="error") == 1
    assert histogram_count(after, "coldferry_migration_downtime_seconds", type="migration") == 1
    assert value(after, "coldferry_migration_downtime_seconds_sum", type="migration") == pytest.approx(
        record.downtime_s)
    # Each timeline phase of both records, once: the confirmed one's and the failed one's.
    phases = [p.name for r in (record, env.conductor.get(failed.id)) for p in r.timeline]
    assert phases.count("source_job") == 2 and phases.count("dest_job") == 1
    for name in set(phases):
        assert histogram_count(after, "coldferry_migration_phase_seconds", type="migration",
                               phase=name) == phases.count(name), name


def test_copies_in_flight_while_a_copy_runs(env: Env) -> None:
    gate, inside = threading.Event(), threading.Event()

    def held(seconds: float) -> None:
        inside.set()
        assert gate.wait(10), "the test never let the copy go on"

    env.drivers["host1"].step_delay = 0.001
    env.drivers["host1"].sleep = held
    m = env.conductor.migrate("web", "host2")
    try:
        assert inside.wait(10)
        assert value(scrape(env.apps["host1"], AGENT_TOKEN), "coldferry_agent_copies_in_flight") == 1
    finally:
        gate.set()
    env.wait(m.id)
    assert value(scrape(env.apps["host1"], AGENT_TOKEN), "coldferry_agent_copies_in_flight") == 0


def test_drain_rows_by_state(env: Env) -> None:
    ctl = TestClient(env.ctl.app)
    api = env.api()
    r = api.post("/v1/os-hypervisors/host1/drain", json={"max_servers": 2})
    assert r.status_code == 202
    deadline = time.monotonic() + 10
    while api.get(f"/v1/drains/{r.json()['id']}").json()["status"] != "done":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    samples = scrape(ctl, TOKEN)
    assert value(samples, "coldferry_drain_rows", status="done") == 2
    assert value(samples, "coldferry_drain_rows", status="error") == 0
    assert value(samples, "coldferry_migrations", type="migration", status="finished") + value(
        samples, "coldferry_migrations", type="migration", status="confirmed") == 2


def test_the_database_view_is_the_same_from_every_controller(env: Env) -> None:
    m = env.wait(env.conductor.migrate("web", "host2").id)
    env.conductor.confirm(m.id)
    env.wait(m.id, until=frozenset({MigrationStatus.CONFIRMED}))
    other = env.another_controller()
    mine, theirs = scrape(TestClient(env.ctl.app), TOKEN), scrape(TestClient(other.app), TOKEN)
    for samples in (mine, theirs):
        assert value(samples, "coldferry_migrations", type="migration", status="confirmed") == 1
    # What each controller saw end is its own: the other one drove nothing.
    assert value(mine, "coldferry_migrations_ended_total", type="migration", status="confirmed") == 1
    assert value(theirs, "coldferry_migrations_ended_total", type="migration", status="confirmed") == 0
