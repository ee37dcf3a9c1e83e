"""JobRunner: background jobs with state, progress, result or error, one per instance."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from agent import jobs
from agent.jobs import JobConflict, JobIdTaken, JobNotFound, JobRunner, iso_utc
from driver.model import PhaseName, Timeline

WAIT = 5.0


class Clock:
    """Epoch seconds that advance one second per reading."""

    def __init__(self, start: float = 1_795_433_400.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def runner() -> JobRunner:
    return JobRunner(clock=Clock())


def test_iso_utc():
    assert iso_utc(0) == "1970-01-01T00:00:00Z"
    assert iso_utc(1_795_433_400.9) == "2026-11-23T11:30:00Z"


def test_job_runs_to_done_with_result_and_times(runner):
    job = runner.start("power-on", "u1", lambda report: {"answer": 42})
    assert job.state == "running" and job.started_at == "2026-11-23T11:30:01Z"
    done = runner.wait(job.id, WAIT)
    assert (done.state, done.result, done.error) == ("done", {"answer": 42}, None)
    assert done.ended_at == "2026-11-23T11:30:02Z"
    assert done.to_dict().keys() == {"id", "op", "instance_uuid", "state", "progress", "result", "error",
                                     "started_at", "ended_at", "phases"}
    assert done.to_dict()["phases"] == []   # its work recorded none


def test_a_job_shows_its_phases_while_it_runs_and_after_it_failed(runner):
    timeline = Timeline(now=Clock(100.0))
    gate, recorded = threading.Event(), threading.Event()

    def work(report):
        with timeline.phase(PhaseName.SHUTDOWN):
            pass
        recorded.set()
        gate.wait(WAIT)
        with timeline.phase(PhaseName.COPY, detail="disk"):
            raise OSError("disk on fire")

    job = runner.start("migrate-disk-and-power-off", "u1", work, timeline=timeline)
    assert recorded.wait(WAIT)
    running = runner.get(job.id)
    assert running.state == "running"
    assert running.to_dict()["phases"] == [{"phase": "shutdown", "host": "", "start": 101.0, "end": 102.0,
                                            "seconds": 1.0, "detail": ""}]
    gate.set()
    failed = runner.wait(job.id, WAIT)
    assert failed.state == "error"
    assert [(p.name, p.detail, p.seconds) for p in failed.timeline.phases] == [("shutdown", "", 1.0),
                                                                             ("copy", "disk", 1.0)]
    assert len(running.timeline.phases) == 1   # a snapshot keeps the phases it was taken with


def test_exception_ends_the_job_in_error(runner):
    def boom(report):
        raise ValueError("disk on fire")

    job = runner.wait(runner.start("destroy", "u1", boom).id, WAIT)
    assert job.state == "error" and job.result is None
    assert job.error == {"kind": "ValueError", "message": "disk on fire"}
    assert job.ended_at is not None


def test_empty_message_falls_back_to_the_class_name(runner):
    def boom(report):
        raise KeyboardInterrupt

    job = runner.wait(runner.start("destroy", "u1", boom).id, WAIT)
    assert job.error == {"kind": "KeyboardInterrupt", "message": "KeyboardInterrupt"}


def test_second_job_on_a_busy_instance_conflicts(runner):
    release = threading.Event()
    first = runner.start("migrate-disk-and-power-off", "u1", lambda report: release.wait())
    with pytest.raises(JobConflict, match=f"already has a running job {first.id}"):
        runner.start("power-on", "u1", lambda report: None)
    other = runner.start("power-on", "u2", lambda report: None)  # another instance is free
    assert runner.wait(other.id, WAIT).state == "done"
    release.set()
    runner.wait(first.id, WAIT)
    assert runner.wait(runner.start("power-on", "u1", lambda report: None).id, WAIT).state == "done"


def test_each_job_reports_through_its_own_report_from_any_thread(runner):
    # Two copies at once, each reporting from a helper thread as the stream copier does:
    # the report a job's work was given lands on that job and no other.
    go = threading.Event()
    reported = threading.Barrier(3)

    def work(n: int):
        def run(report):
            helper = threading.Thread(target=report, args=({"file": f"disk{n}", "done": n},))
            helper.start()
            helper.join()
            reported.wait(WAIT)
            go.wait(WAIT)
        return run

    a = runner.start("migrate-disk-and-power-off", "u1", work(1))
    b = runner.start("migrate-disk-and-power-off", "u2", work(2))
    reported.wait(WAIT)
    assert runner.get(a.id).progress == {"file": "disk1", "done": 1}
    assert runner.get(b.id).progress == {"file": "disk2", "done": 2}
    go.set()
    assert runner.wait(a.id, WAIT).progress == {"file": "disk1", "done": 1}
    assert runner.wait(b.id, WAIT).progress == {"file": "disk2", "done": 2}


def test_report_after_the_job_ended_does_nothing(runner):
    kept = []
    job = runner.wait(runner.start("migrate-disk-and-power-off", "u1",
                                   lambda report: (report({"done": 1}), kept.append(report))).id, WAIT)
    kept[0]({"done": 2})
    assert runner.get(job.id).progress == {"done": 1} and job.state == "done"


def test_reported_progress_is_a_copy(runner):
    progress = {"done": 1}
    job = runner.wait(runner.start("power-on", "u1", lambda report: report(progress)).id, WAIT)
    progress["done"] = 99
    assert runner.get(job.id).progress == {"done": 1}


def test_snapshots_do_not_change_under_the_reader(runner):
    go = threading.Event()
    job = runner.start("power-on", "u1", lambda report: go.wait())
    snapshot = runner.get(job.id)
    go.set()
    assert runner.wait(job.id, WAIT).state == "done"
    assert snapshot.state == "running"


def test_list_is_newest_first_and_bounded():
    runner = JobRunner(clock=Clock(), keep=3)
    ids = [runner.wait(runner.start("power-on", f"u{i}", lambda report: i).id, WAIT).id for i in range(5)]
    assert [j.id for j in runner.list()] == ids[:1:-1]
    with pytest.raises(JobNotFound, match="not found"):
        runner.get(ids[0])


def test_running_jobs_are_never_pruned():
    runner = JobRunner(clock=Clock(), keep=1)
    go = threading.Event()
    slow = runner.start("migrate-disk-and-power-off", "u0", lambda report: go.wait())
    fast = runner.wait(runner.start("power-on", "u1", lambda report: None).id, WAIT)
    runner.start("power-on", "u2", lambda report: None)
    assert slow.id in {j.id for j in runner.list()}
    assert fast.id not in {j.id for j in runner.list()}
    go.set()


def test_a_named_start_twice_runs_the_work_once_and_returns_that_job(runner):
    release, calls = threading.Event(), []

    def work(report):
        calls.append(1)
        release.wait(WAIT)
        return "moved"

    first = runner.start("migrate-disk-and-power-off", "u1", work, job_id="m1")
    again = runner.start("migrate-disk-and-power-off", "u1", work, job_id="m1")
    assert first.id == again.id == "m1" and again.state == "running"
    release.set()
    assert runner.wait("m1", WAIT).result == "moved"
    late = runner.start("migrate-disk-and-power-off", "u1", work, job_id="m1")
    assert (late.id, late.state, late.result) == ("m1", "done", "moved")
    assert calls == [1] and [j.id for j in runner.list()] == ["m1"]


def test_a_named_start_finds_a_job_that_ended_in_error(runner):
    def boom(report):
        raise ValueError("disk on fire")

    runner.wait(runner.start("destroy", "u1", boom, job_id="d1").id, WAIT)
    again = runner.start("destroy", "u1", lambda report: None, job_id="d1")
    assert again.state == "error" and again.error == {"kind": "ValueError", "message": "disk on fire"}


@pytest.mark.parametrize("op, instance", [("power-off", "u1"), ("power-on", "u2")])
def test_a_name_reused_for_another_op_or_instance_conflicts(runner, op, instance):
    runner.wait(runner.start("power-on", "u1", lambda report: None, job_id="j1").id, WAIT)
    with pytest.raises(JobIdTaken, match=f"job j1 is power-on on instance u1, not {op} on instance {instance}"):
        runner.start(op, instance, lambda report: None, job_id="j1")
    assert runner.named("j1", "power-on", "u1").state == "done"
    assert runner.named("j2", "power-on", "u1") is None and runner.named(None, "power-on", "u1") is None


def test_a_new_name_on_a_busy_instance_conflicts(runner):
    release = threading.Event()
    runner.start("migrate-disk-and-power-off", "u1", lambda report: release.wait(WAIT), job_id="m1")
    with pytest.raises(JobConflict, match="already has a running job m1"):
        runner.start("power-on", "u1", lambda report: None, job_id="p1")
    release.set()
    runner.wait("m1", WAIT)
    with pytest.raises(JobNotFound):
        runner.get("p1")


def test_a_running_named_job_survives_pruning():
    runner = JobRunner(clock=Clock(), keep=1)
    go = threading.Event()
    runner.start("migrate-disk-and-power-off", "u0", lambda report: go.wait(WAIT), job_id="slow")
    for i in range(3):
        runner.wait(runner.start("power-on", f"u{i + 1}", lambda report: None).id, WAIT)
    assert runner.start("migrate-disk-and-power-off", "u0", lambda report: None, job_id="slow").state == "running"
    go.set()
    assert runner.wait("slow", WAIT).state == "done"


def test_unknown_job(runner):
    with pytest.raises(JobNotFound):
        runner.get("nope")
    with pytest.raises(JobNotFound):
        runner.wait("nope", 0.1)


# -- the long poll ---------------------------------------------------------------------


def test_until_ended_answers_at_once_for_a_job_that_ended(runner):
    job = runner.start("power-on", "u1", lambda report: "ok")
    runner.wait(job.id, WAIT)
    assert asyncio.run(runner.until_ended(job.id, 30.0)).state == "done"


def test_until_ended_answers_when_the_job_ends_not_at_its_timeout(runner):
    go = threading.Event()
    job = runner.start("power-on", "u1", lambda report: go.wait(WAIT) and "ok")
    threading.Timer(0.1, go.set).start()
    started = time.monotonic()
    ended = asyncio.run(runner.until_ended(job.id, 25.0))
    assert (ended.state, ended.result) == ("done", "ok")
    assert time.monotonic() - started < 20.0   # not held to the end of its wait


def test_until_ended_gives_back_the_running_job_after_its_timeout(runner):
    go = threading.Event()
    try:
        job = runner.start("power-on", "u1", lambda report: go.wait(WAIT))
        assert asyncio.run(runner.until_ended(job.id, 0.05)).state == "running"
    finally:
        go.set()


def test_until_ended_holds_no_longer_than_the_bound(runner, monkeypatch):
    monkeypatch.setattr(jobs, "MAX_JOB_WAIT", 0.05)
    go = threading.Event()
    try:
        job = runner.start("power-on", "u1", lambda report: go.wait(WAIT))
        assert asyncio.run(runner.until_ended(job.id, 3600.0)).state == "running"
    finally:
        go.set()


def test_until_ended_of_an_unknown_job(runner):
    with pytest.raises(JobNotFound):
        asyncio.run(runner.until_ended("nope", 1.0))
