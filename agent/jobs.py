"""Background jobs: long driver calls run in threads, polled over the API.

A job records its state (running, done, error), the latest progress, the
result or the error, and when it started and ended. Only one job runs per
instance at a time: two operations interleaved on one instance (a power-on
while its disks are being copied) could break the source. A caller may
name a job (``job_id``): a start naming a job the runner has returns that
job instead of starting another, so a caller that lost the reply can ask
again safely. Finished jobs are kept, newest last, up to a bound, so a
controller that polls late still finds the outcome. A reader may hold its question while the job
runs (``until_ended``, the API's long poll), so that it learns of the end at once without
asking often. A job's work gets its own ``report`` callable, so
progress lands on that job whichever thread reports it. A job may carry a Timeline its work
records phases into: the job shows the phases recorded so far, while it runs and after it
failed too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid as uuidlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable

from driver.model import Timeline

log = logging.getLogger(__name__)

RUNNING, DONE, ERROR = "running", "done", "error"
KEEP = 200
#: The longest a reader may hold its question (seconds), and how often a held question looks.
MAX_JOB_WAIT = 30.0
WAIT_STEP = 0.02

#: Sets the progress of the job it was made for; any thread may call it, and once the job ended it does nothing.
Report = Callable[[dict[str, Any]], None]


class JobError(Exception):
    """Base of the job runner's errors."""


class JobConflict(JobError):
    """The instance already has a running job."""

    def __init__(self, instance_uuid: str, running: "Job") -> None:
        self.instance_uuid = instance_uuid
        self.running = running
        super().__init__(f"instance {instance_uuid} already has a running job {running.id} ({running.op}); "
                         "wait for it to end")


class JobIdTaken(JobError):
    """A start names a job that exists for another operation or instance."""

    def __init__(self, job_id: str, existing: "Job", op: str, instance_uuid: str) -> None:
        self.job_id = job_id
        self.existing = existing
        super().__init__(f"job {job_id} is {existing.op} on instance {existing.instance_uuid}, not {op} on "
                         f"instance {instance_uuid}; name a new job for a different operation")


class JobNotFound(JobError):
    """No job with that id (never started, dropped as old, or the agent restarted)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} not found (unknown, too old, or the agent restarted)")


@dataclass
class Job:
    """One background operation on one instance, as the API shows it; ``timeline`` holds the
    phases its work recorded."""

    id: str
    op: str
    instance_uuid: str
    started_at: str
    state: str = RUNNING
    progress: dict[str, Any] | None = None
    result: Any = None
    error: dict[str, str] | None = None
    ended_at: str | None = None
    timeline: Timeline = field(default_factory=Timeline, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The job as the API answers it."""
        return {"id": self.id, "op": self.op, "instance_uuid": self.instance_uuid, "state": self.state,
                "progress": self.progress, "result": self.result, "error": self.error,
                "started_at": self.started_at, "ended_at": self.ended_at,
                "phases": [p.to_dict() for p in self.timeline.phases]}


def iso_utc(t: float) -> str:
    """Epoch seconds as an ISO 8601 UTC string (``2026-11-23T11:40:00Z``)."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class JobRunner:
    """Runs callables in background threads and keeps their outcome; thread-safe.

    :param clock: epoch seconds, for started_at and ended_at.
    :param keep: how many jobs to remember; the oldest finished ones go first.
    """

    def __init__(self, clock: Callable[[], float] = time.time, keep: int = KEEP) -> None:
        self.clock = clock
        self.keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._ended: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, op: str, instance_uuid: str, work: Callable[[Report], Any], job_id: str | None = None,
              timeline: Timeline | None = None) -> Job:
        """Run ``work(report)`` in a new thread as job ``op`` on ``instance_uuid``.

        ``report`` sets this job's progress (see Report). The work's return
        value becomes the job's result; an exception ends the job in state
        error with the exception's class name and message.

        :param job_id: the caller's name for the job (a new uuid if None). If
            the runner has a job of that name, nothing starts: that job is
            returned, whatever its state.
        :param timeline: the recorder ``work`` records its phases into; the job shows them.
        :returns: a snapshot of the new job, or of the named one it already had.
        :raises JobIdTaken: ``job_id`` names a job of another operation or instance.
        :raises JobConflict: the instance has a running job (of another name).
        """
        with self._lock:
            known = self._named(job_id, op, instance_uuid)
            if known is not None:
                return known
            for other in self._jobs.values():
                if other.instance_uuid == instance_uuid and other.state == RUNNING:
                    raise JobConflict(instance_uuid, _snapshot(other))
            job = Job(job_id or uuidlib.uuid4().hex, op, instance_uuid, iso_utc(self.clock()),
                      timeline=timeline if timeline is not None else Timeline())
            self._jobs[job.id] = job
            self._ended[job.id] = threading.Event()
            self._prune()
            thread = threading.Thread(target=self._run, args=(job, work), name=f"job-{op}-{job.id[:8]}",
                                      daemon=True)
            thread.start()
            return _snapshot(job)

    def named(self, job_id: str | None, op: str, instance_uuid: str) -> Job | None:
        """A snapshot of the job ``job_id`` if the runner has it (None for no name or an unknown one).

        :raises JobIdTaken: that job is another operation or on another instance.
        """
        with self._lock:
            return self._named(job_id, op, instance_uuid)

    def _named(self, job_id: str | None, op: str, instance_uuid: str) -> Job | None:
        job = self._jobs.get(job_id) if job_id else None
        if job is None:
            return None
        if (job.op, job.instance_uuid) != (op, instance_uuid):
            raise JobIdTaken(job.id, _snapshot(job), op, instance_uuid)
        return _snapshot(job)

    def _run(self, job: Job, work: Callable[[Report], Any]) -> None:
        log.info("job %s: %s on instance %s started", job.id, job.op, job.instance_uuid)
        try:
            result, error = work(functools.partial(self._report, job)), None
        except BaseException as e:  # a job must never stay "running" after its thread ended
            log.exception("job %s: %s on instance %s failed", job.id, job.op, job.instance_uuid)
            result, error = None, {"kind": type(e).__name__, "message": str(e) or type(e).__name__}
        with self._lock:
            job.result, job.error = result, error
            job.state = ERROR if error else DONE
            job.ended_at = iso_utc(self.clock())
            event = self._ended.get(job.id)
        if error is None:
            log.info("job %s: %s on instance %s done", job.id, job.op, job.instance_uuid)
        if event:
            event.set()

    def _report(self, job: Job, progress: dict[str, Any]) -> None:
        with self._lock:
            if job.state == RUNNING:
                job.progress = dict(progress)

    def _prune(self) -> None:
        """Forget the oldest finished jobs beyond ``keep`` (running ones always stay)."""
        excess = len(self._jobs) - self.keep
        for job_id in [j.id for j in self._jobs.values() if j.state != RUNNING][:max(excess, 0)]:
            del self._jobs[job_id]
            self._ended.pop(job_id, None)

    def get(self, job_id: str) -> Job:
        """A snapshot of one job; raises JobNotFound."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise JobNotFound(job_id)
            return _snapshot(job)

    def list(self) -> list[Job]:
        """Snapshots of every remembered job, newest first."""
        with self._lock:
            return [_snapshot(j) for j in reversed(self._jobs.values())]

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job ends (or ``timeout`` seconds pass); return its snapshot.

        :raises JobNotFound: no such job.
        """
        with self._lock:
            event = self._ended.get(job_id)
        if event is None:
            raise JobNotFound(job_id)
        event.wait(timeout)
        return self.get(job_id)

    async def until_ended(self, job_id: str, timeout: float, step: float = WAIT_STEP) -> Job:
        """Wait, without holding a thread, until the job ends or ``timeout`` seconds (at most
        MAX_JOB_WAIT) pass; return its snapshot, running or not. Looks every ``step`` seconds.

        :raises JobNotFound: no such job (also when it was forgotten meanwhile).
        """
        with self._lock:
            event = self._ended.get(job_id)
        if event is None:
            raise JobNotFound(job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(timeout, MAX_JOB_WAIT)
        while not event.is_set():
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.sleep(min(step, left))
        return self.get(job_id)


def _snapshot(job: Job) -> Job:
    """A copy callers may read while the job's thread goes on updating the original."""
    return replace(job, progress=dict(job.progress) if job.progress else None, timeline=job.timeline.copy())
