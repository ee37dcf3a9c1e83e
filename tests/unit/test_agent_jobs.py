"""JobRunner: background jobs with state, progress, result or error, one per instance."""

from __future__ import annotations

import threading

import pytest

from agent.jobs import JobConflict, JobNotFound, JobRunner, iso_utc

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
    job = runner.start("power-on", "u1", lambda: {"answer": 42})
    assert job.state == "running" and job.started_at == "2026-11-23T11:30:01Z"
    done = runner.wait(job.id, WAIT)
    assert (done.state, done.result, done.error) == ("done", {"answer": 42}, None)
    assert done.ended_at == "2026-11-23T11:30:02Z"
    assert done.to_dict().keys() == {"id", "op", "instance_uuid", "state", "progress", "result", "error",
                                     "started_at", "ended_at"}


def test_exception_ends_the_job_in_error(runner):
    def boom():
        raise ValueError("disk on fire")

    job = runner.wait(runner.start("destroy", "u1", boom).id, WAIT)
    assert job.state == "error" and job.result is None
    assert job.error == {"kind": "ValueError", "message": "disk on fire"}
    assert job.ended_at is not None


def test_empty_message_falls_back_to_the_class_name(runner):
    def boom():
        raise KeyboardInterrupt

    job = runner.wait(runner.start("destroy", "u1", boom).id, WAIT)
    assert job.error == {"kind": "KeyboardInterrupt", "message": "KeyboardInterrupt"}


def test_second_job_on_a_busy_instance_conflicts(runner):
    release = threading.Event()
    first = runner.start("migrate-disk-and-power-off", "u1", release.wait)
    with pytest.raises(JobConflict, match=f"already has a running job {first.id}"):
        runner.start("power-on", "u1", lambda: None)
    other = runner.start("power-on", "u2", lambda: None)  # another instance is free
    assert runner.wait(other.id, WAIT).state == "done"
    release.set()
    runner.wait(first.id, WAIT)
    assert runner.wait(runner.start("power-on", "u1", lambda: None).id, WAIT).state == "done"


def test_progress_lands_on_the_job_of_the_calling_thread(runner):
    go = threading.Event()
    reported = threading.Barrier(3)

    def work(n: int):
        def run():
            runner.report({"file": f"disk{n}", "done": n})
            reported.wait(WAIT)
            go.wait(WAIT)
        return run

    a = runner.start("migrate-disk-and-power-off", "u1", work(1), foreign_progress=True)
    b = runner.start("migrate-disk-and-power-off", "u2", work(2), foreign_progress=True)
    reported.wait(WAIT)
    assert runner.get(a.id).progress == {"file": "disk1", "done": 1}
    assert runner.get(b.id).progress == {"file": "disk2", "done": 2}
    # from a thread that is no job's, with two candidates: dropped, not misattributed
    assert runner.report({"file": "x"}) is False
    go.set()
    assert runner.wait(a.id, WAIT).progress == {"file": "disk1", "done": 1}


def test_helper_thread_progress_goes_to_the_only_copying_job(runner):
    go = threading.Event()

    def work():
        helper = threading.Thread(target=runner.report, args=({"file": "disk", "done": 7},))
        helper.start()
        helper.join()
        go.wait(WAIT)

    job = runner.start("migrate-disk-and-power-off", "u1", work, foreign_progress=True)
    runner.start("power-on", "u2", go.wait)  # not copying: never takes foreign progress
    go.set()
    assert runner.wait(job.id, WAIT).progress == {"file": "disk", "done": 7}


def test_bound_worker_progress_lands_on_its_job_with_several_copies(runner):
    # The stream copier reports from its own threads: the job binds its id first.
    go = threading.Event()
    both = threading.Barrier(3)

    def work(n: int):
        def run():
            job_id = runner.current_job_id()
            helper = threading.Thread(target=runner.report, args=({"file": f"disk{n}"}, job_id))
            helper.start()
            helper.join()
            both.wait(WAIT)
            go.wait(WAIT)
        return run

    a = runner.start("migrate-disk-and-power-off", "u1", work(1), foreign_progress=True)
    b = runner.start("migrate-disk-and-power-off", "u2", work(2), foreign_progress=True)
    both.wait(WAIT)
    go.set()
    assert runner.wait(a.id, WAIT).progress == {"file": "disk1"}
    assert runner.wait(b.id, WAIT).progress == {"file": "disk2"}


def test_report_outside_any_job_is_dropped(runner):
    assert runner.report({"file": "disk"}) is False


def test_snapshots_do_not_change_under_the_reader(runner):
    go = threading.Event()
    job = runner.start("power-on", "u1", go.wait)
    snapshot = runner.get(job.id)
    go.set()
    assert runner.wait(job.id, WAIT).state == "done"
    assert snapshot.state == "running"


def test_list_is_newest_first_and_bounded():
    runner = JobRunner(clock=Clock(), keep=3)
    ids = [runner.wait(runner.start("power-on", f"u{i}", lambda: i).id, WAIT).id for i in range(5)]
    assert [j.id for j in runner.list()] == ids[:1:-1]
    with pytest.raises(JobNotFound, match="not found"):
        runner.get(ids[0])


def test_running_jobs_are_never_pruned():
    runner = JobRunner(clock=Clock(), keep=1)
    go = threading.Event()
    slow = runner.start("migrate-disk-and-power-off", "u0", go.wait)
    fast = runner.wait(runner.start("power-on", "u1", lambda: None).id, WAIT)
    runner.start("power-on", "u2", lambda: None)
    assert slow.id in {j.id for j in runner.list()}
    assert fast.id not in {j.id for j in runner.list()}
    go.set()


def test_unknown_job(runner):
    with pytest.raises(JobNotFound):
        runner.get("nope")
    with pytest.raises(JobNotFound):
        runner.wait("nope", 0.1)
