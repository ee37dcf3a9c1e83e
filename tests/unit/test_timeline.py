"""The migration timeline: the recorder, then phases recorded by in-memory hosts behind real agent
apps, merged by the controller, and shown by its API, the CLI and the dashboard."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from agent import schemas as s
from coldferry import cli, client
from coldferry.client import ControllerClient
from controller.records import MigrationRecord, MigrationStatus
from driver.model import COPY_PHASES, Phase, PhaseName, PowerState, Timeline, copy_seconds, total_seconds
from tests.unit.controller_env import TOKEN, Env
from tests.unit.test_web_app import USERS, login

VM = "00000000-0000-4000-8000-0000000000c1"
OFF = "00000000-0000-4000-8000-0000000000c2"
STEP = 0.005   # each of a memory copy's 4 steps sleeps this long: a copy takes at least 4 * STEP


class Clock:
    """Epoch seconds that advance by ``step`` per reading."""

    def __init__(self, start: float = 1_800_000_000.0, step: float = 0.5) -> None:
        self.now, self.step = start, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


# -- the recorder ------------------------------------------------------------------------


def test_a_phase_records_its_block_and_one_that_raised_too() -> None:
    t = Timeline(now=Clock())
    with t.phase(PhaseName.SHUTDOWN):
        pass
    with pytest.raises(OSError), t.phase(PhaseName.COPY, detail="disk"):
        raise OSError("connection reset")
    t.add(PhaseName.DEFINE, 10.0, 12.5, host="h2")
    assert t.phases == [Phase("shutdown", 1_800_000_000.5, 1_800_000_001.0),
                        Phase("copy", 1_800_000_001.5, 1_800_000_002.0, "", "disk"),
                        Phase("define", 10.0, 12.5, "h2")]
    assert [p.seconds for p in t.phases] == [0.5, 0.5, 2.5]
    assert Phase("start", 5.0, 4.0).seconds == 0.0   # two hosts' clocks may disagree; never negative


def test_phases_and_copies_are_snapshots() -> None:
    t = Timeline(now=Clock())
    with t.phase(PhaseName.CONNECT):
        pass
    seen, copied = t.phases, t.copy()
    t.add(PhaseName.START, 1.0, 2.0)
    seen.append(Phase("bogus", 0.0, 0.0))
    assert [p.name for p in t.phases] == ["connect", "start"]
    assert [p.name for p in copied.phases] == ["connect"]


def test_threads_record_into_one_timeline() -> None:
    t = Timeline()

    def copy(name: str) -> None:
        for _ in range(200):
            with t.phase(PhaseName.COPY, detail=name):
                pass

    threads = [threading.Thread(target=copy, args=(f"disk{i}",)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted({p.detail for p in t.phases}) == ["disk0", "disk1", "disk2", "disk3"]
    assert len(t.phases) == 800


def test_dict_form_round_trip_and_totals() -> None:
    ps = [Phase(PhaseName.PRECOPY, 100.0, 104.0, "h1", "disk"), Phase(PhaseName.SHUTDOWN, 104.0, 105.0, "h1"),
          Phase(PhaseName.COPY, 105.0, 105.5, "h1", "disk.precopy"), Phase(PhaseName.START, 106.0, 108.0, "h2")]
    assert ps[2].to_dict() == {"phase": "copy", "host": "h1", "start": 105.0, "end": 105.5, "seconds": 0.5,
                               "detail": "disk.precopy"}
    assert [Phase.from_dict(p.to_dict()) for p in ps] == ps
    assert s.PhaseOut.of(ps[0]).to_phase() == ps[0]
    assert (total_seconds(ps), copy_seconds(ps)) == (8.0, 4.5)
    assert (total_seconds([]), copy_seconds([])) == (0.0, 0.0)
    assert COPY_PHASES == {"precopy", "copy"}


# -- recorded by the hosts, merged by the controller --------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env.make(tmp_path, n=2, users=USERS, session_secret="unit-test-session-secret")
    for d in e.drivers.values():
        d.step_delay = STEP
    e.add("host1", VM, "web")
    e.add("host1", OFF, "db", PowerState.SHUTDOWN)
    return e


def names(timeline: list[dict]) -> list[tuple[str, str, str]]:
    return [(p["phase"], p["host"], p["detail"]) for p in timeline]


def within(outer: dict, inner: list[dict]) -> bool:
    return all(outer["start"] <= p["start"] <= p["end"] <= outer["end"] for p in inner)


def test_a_cold_migration_of_a_running_server_records_every_phase_in_order(env: Env) -> None:
    mid = env.wait(env.conductor.migrate("web", "host2").id).id
    record = env.api().get(f"/v1/os-migrations/{mid}").json()
    assert record["status"] == "finished"
    t = record["timeline"]
    assert names(t) == [("scheduled", "", ""), ("source_job", "host1", "migrate-disk-and-power-off"),
                        ("connect", "host1", ""), ("shutdown", "host1", ""), ("copy", "host1", "disk"),
                        ("dest_job", "host2", "finish-migration"), ("define", "host2", ""),
                        ("start", "host2", "")]
    for p in t:
        assert p["start"] <= p["end"] and p["seconds"] == pytest.approx(p["end"] - p["start"], abs=1e-6)
    scheduled, source, *on_source, dest, define, start = t
    assert scheduled["end"] == source["start"]
    assert within(source, on_source) and within(dest, [define, start])
    assert source["end"] <= dest["start"]
    assert [p["start"] for p in on_source] == sorted(p["start"] for p in on_source)
    assert t[4]["seconds"] >= 4 * STEP   # the copy's steps happened inside its phase
    # The record's downtime is from the shutdown's end (the power-off) to the start's end on host2.
    assert record["downtime_s"] == pytest.approx(t[-1]["end"] - t[3]["end"], abs=0.01)


def test_a_failed_copy_still_shows_where_it_got_to(env: Env) -> None:
    env.drivers["host1"].fail("copy", OSError("connection reset"))
    m = env.wait(env.conductor.migrate("web", "host2").id)
    assert m.status == MigrationStatus.ERROR and "connection reset" in (m.error or "")
    assert [(p.name, p.host, p.detail) for p in m.timeline] == [
        ("scheduled", "", ""), ("source_job", "host1", "migrate-disk-and-power-off"), ("connect", "host1", ""),
        ("shutdown", "host1", ""), ("copy", "host1", "disk")]


def test_the_agents_job_shows_its_phases_while_it_runs_and_after_it_failed(env: Env) -> None:
    gate = threading.Event()
    seen: list[list[str]] = []   # the phases of the running job the test saw once it had shut down
    env.drivers["host1"].sleep = lambda seconds: gate.wait(5)   # the copy's first step waits for the test
    env.drivers["host1"].fail("copy", OSError("connection reset"))
    agent = env.agents["host1"]
    job = agent.start(VM, "migrate-disk-and-power-off", s.MigrateRequest(dest="198.18.0.12"))

    def watch(j: s.JobOut) -> None:
        phases = [p.phase for p in j.phases]
        if j.state == "running" and "shutdown" in phases and not gate.is_set():
            seen.append(phases)
            gate.set()   # the copy is under way (and waits): let it go on, to its failure
    done = agent.wait(job.id, on_update=watch, timeout=10)
    assert seen == [["connect", "shutdown"]]   # while it ran: the copy had not ended yet
    assert (done.state, done.result) == ("error", None)
    assert [(p.phase, p.detail) for p in done.phases] == [("connect", ""), ("shutdown", ""), ("copy", "disk")]
    assert all(p.host == "" for p in done.phases)   # the agent's own host: the controller names it


def test_a_live_migration_records_its_copies_while_running_and_the_switch(env: Env) -> None:
    m = env.wait(env.conductor.migrate("web", "host2", live=True).id)
    assert m.status == MigrationStatus.COMPLETED
    assert [(p.name, p.host, p.detail) for p in m.timeline] == [
        ("scheduled", "", ""), ("source_job", "host1", "live-migrate"), ("precopy", "host1", "disk"),
        ("live_migrate", "host1", "")]


def copying_when_the_controller_died(env: Env, uuid: str, name: str) -> tuple[MigrationRecord, s.JobOut]:
    """What a killed controller leaves: the record says migrating and names the source's copy
    job, which its agent runs on (and here has ended)."""
    store = env.ctl.store
    inst = env.drivers["host1"].get_instance(uuid)
    m = store.create_migration(server=uuid, server_name=name, source_compute="host1", dest_compute="host2",
                               dest_address="198.18.0.12", status=MigrationStatus.MIGRATING,
                               task_state="resize_migrating", old_power_state=int(inst.power_state),
                               flavor=inst.to_dict()["flavor"])
    job = env.agents["host1"].start(uuid, "migrate-disk-and-power-off", s.MigrateRequest(dest="198.18.0.12"))
    return store.update_migration(m.id, source_job=job.id), env.agents["host1"].wait(job.id)


def test_a_restarted_controller_adds_a_finished_jobs_phases_once(env: Env) -> None:
    """A controller that recorded the copy job's phases died before it moved the record on: the
    next one waits for the same job again and does not add its phases a second time."""
    m, job = copying_when_the_controller_died(env, VM, "web")
    agent = [Phase(p.phase, p.start, p.end, "host1", p.detail) for p in job.phases]
    first = Phase(PhaseName.SOURCE_JOB, agent[0].start - 0.01, agent[-1].end + 0.01, "host1",
                  "migrate-disk-and-power-off")
    env.ctl.store.update_migration(m.id, timeline=[first, *agent])
    env.start_controller()
    assert env.ctl.start() == [m.id]
    m = env.wait(m.id)
    assert m.status == MigrationStatus.FINISHED, m.error
    assert [p.name for p in m.timeline] == ["source_job", "connect", "shutdown", "copy", "dest_job", "define",
                                            "start"]
    assert m.timeline[:4] == [first, *agent]


def test_a_job_picked_up_after_a_restart_starts_when_the_agent_says(env: Env) -> None:
    m, job = copying_when_the_controller_died(env, OFF, "db")
    env.start_controller()
    assert env.ctl.start() == [m.id]
    m = env.wait(m.id)
    source, first = m.timeline[:2]
    assert (source.name, source.host, first.name) == ("source_job", "host1", "connect")
    # The agent's started_at, to the second: no later than the job's first phase.
    assert source.start == int(source.start) and source.start <= first.start
    assert "scheduled" not in [p.name for p in m.timeline]   # no request time on this record


# -- shown by the CLI and the dashboard ---------------------------------------------------


@pytest.fixture
def cli_on(env: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    """Every ``coldferry`` command talks to the env's controller."""
    monkeypatch.setattr(client, "open_client",
                        lambda url, token, ca_file=None: ControllerClient("http://testserver", TOKEN, http=env.api()))
    monkeypatch.setenv(client.TOKEN_ENV, TOKEN)
    return env


def test_migration_show_prints_the_timeline_with_durations_total_and_copy_share(cli_on: Env, capsys) -> None:
    m = cli_on.wait(cli_on.conductor.migrate("web", "host2").id)
    assert cli.main(["server", "migration", "show", str(m.id)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any("timeline" in line and "8 phases over" in line and "copying" in line for line in lines)
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]]
            for line in lines[lines.index(next(x for x in lines if "Timeline from" in x)):]
            if line.startswith("│")}
    assert list(rows) == ["scheduled", "source_job", "connect", "shutdown", "copy", "dest_job", "define",
                          "start"]
    assert rows["copy"][:3] == ["copy", "host1", "disk"] and rows["scheduled"][1] == "(controller)"
    assert rows["scheduled"][3] == "+0.000"
    copy = next(p for p in m.timeline if p.name == "copy")
    assert float(rows["copy"][4]) == pytest.approx(copy.seconds, abs=0.0005)
    total = total_seconds(m.timeline)
    share = round(100 * copy.seconds / total)
    assert f"total {total:.3f} s; copying {copy.seconds:.3f} s ({share}%)" in out


def test_migration_show_json_has_the_timeline(cli_on: Env, capsys) -> None:
    m = cli_on.wait(cli_on.conductor.migrate("db", "host2").id)
    assert cli.main(["server", "migration", "show", "-f", "json", str(m.id)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["timeline"] == [p.to_dict() for p in m.timeline]
    # A shut-off server stays off: nothing is started on the destination.
    assert [p["phase"] for p in shown["timeline"]] == ["scheduled", "source_job", "connect", "shutdown", "copy",
                                                      "dest_job", "define"]


def test_the_migrations_page_opens_a_rows_timeline_on_demand(env: Env) -> None:
    c, _ = login(env, "rex", "rex-pw")
    m = env.wait(env.conductor.migrate("web", "host2").id)
    page = c.get("/ui/migrations").text
    row = page[page.index(f'data-migration="{m.id}"'):]
    details = row[row.index("<details>"):row.index("</details>")]
    total = total_seconds(m.timeline)
    assert f"<summary>8 phases, {total:.3f} s</summary>" in details
    assert [x.split('"')[0] for x in details.split('data-phase="')[1:]] == [p.name for p in m.timeline]
    assert "<td>copy</td><td>host1</td><td>disk</td>" in details
    assert "<td>scheduled</td><td>controller</td>" in details
    copying = copy_seconds(m.timeline)
    assert f"copying {copying:.3f} s ({100 * copying / total:.0f}% of the total)" in details
