"""Prometheus metrics of an agent, and the ``/metrics`` route agent and controller share.

Each app has a registry of its own (``prometheus_client.CollectorRegistry``), not the
library's global one: a test process runs many agents and controllers side by side.
``/metrics`` asks for the same bearer token as the API; a Prometheus job gives it with
``authorization: {credentials_file: ...}``.

An agent counts what its jobs did:

- ``coldferry_agent_jobs_total{op, state}``: jobs ended, ``state`` done or error;
- ``coldferry_agent_copies_in_flight``: jobs copying disks now (migrate-disk-and-power-off
  and live-migrate);
- ``coldferry_agent_copy_bytes_total{kind}``: data bytes ``sent`` and zero or unchanged
  bytes ``skipped`` by the copies of the jobs that ended;
- ``coldferry_agent_phase_seconds{op, phase}``: how long each phase of a migration job took
  on this host (driver.model.PhaseName).
"""

from __future__ import annotations

import hmac
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from driver.model import LiveOutcome, MigrateOutcome, Phase, Timeline

#: Jobs that copy disks.
COPY_OPS = frozenset({"migrate-disk-and-power-off", "live-migrate"})

#: Seconds; from a define (tens of ms) to a copy of a big disk (an hour).
PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def serve_metrics(app: FastAPI, registry: CollectorRegistry, token: str) -> None:
    """Add ``GET /metrics`` to ``app``: the text exposition of ``registry`` to a caller with
    ``Authorization: Bearer <token>``, 401 to anyone else."""
    expected = token.encode()

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def observe_phases(histogram: Histogram, phases: Iterable[Phase], **labels: str) -> None:
    """Observe every phase's duration in ``histogram``, labelled with its name and ``labels``."""
    for phase in phases:
        histogram.labels(phase=str(phase.name), **labels).observe(phase.seconds)


class AgentMetrics:
    """The agent's metrics, in a registry of its own (``registry``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("coldferry_agent_jobs", "Jobs ended, by operation and final state (done, error).",
                            ["op", "state"], registry=self.registry)
        self.in_flight = Gauge("coldferry_agent_copies_in_flight",
                               "Jobs copying disks now (migrate-disk-and-power-off, live-migrate).",
                               registry=self.registry)
        self.copy_bytes = Counter("coldferry_agent_copy_bytes",
                                  "Bytes of the copies of ended jobs: data sent, and zero or unchanged bytes skipped.",
                                  ["kind"], registry=self.registry)
        self.phase_seconds = Histogram("coldferry_agent_phase_seconds",
                                       "Duration of each phase of the migration jobs run on this host.",
                                       ["op", "phase"], buckets=PHASE_BUCKETS, registry=self.registry)
        for kind in ("sent", "skipped"):
            self.copy_bytes.labels(kind=kind)
        self._lock = threading.Lock()

    @contextmanager
    def job(self, op: str, timeline: Timeline) -> Iterator[None]:
        """Around one job's work: counts it in flight while it copies, then ended (done or error)
        and the phases its ``timeline`` recorded, failed or not."""
        copying = op in COPY_OPS
        if copying:
            self.in_flight.inc()
        try:
            yield
        except BaseException:
            self.jobs.labels(op=op, state="error").inc()
            raise
        else:
            self.jobs.labels(op=op, state="done").inc()
        finally:
            if copying:
                self.in_flight.dec()
            observe_phases(self.phase_seconds, timeline.phases, op=op)

    def outcome(self, outcome: object) -> None:
        """Count the bytes of the copies a driver call made."""
        if isinstance(outcome, (MigrateOutcome, LiveOutcome)):
            self.copy_bytes.labels(kind="sent").inc(sum(c.sent for c in outcome.copies))
            self.copy_bytes.labels(kind="skipped").inc(sum(c.skipped for c in outcome.copies))


__all__ = ["AgentMetrics", "COPY_OPS", "PHASE_BUCKETS", "observe_phases", "serve_metrics"]
