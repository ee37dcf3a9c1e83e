"""Prometheus metrics of a controller (``GET /metrics``, the API's bearer token).

Two kinds, on purpose:

- **What the database holds**, read at each scrape, so every controller on one database
  reports the same fleet and a restart loses nothing:
  ``coldferry_migrations{type, status}`` (records by type and status, final or not) and
  ``coldferry_drain_rows{status}`` (rows of every drain by state).
- **What this controller saw end**, since it started: ``coldferry_migrations_ended_total
  {type, status}``, ``coldferry_migration_phase_seconds{type, phase}`` (each phase of the
  timeline of a migration this controller drove to its final status) and
  ``coldferry_migration_downtime_seconds{type}``. With several controllers, sum over them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.metrics import PHASE_BUCKETS, observe_phases

from .records import FINAL, MigrationRecord

#: Seconds a guest was off (cold) or paused (live).
DOWNTIME_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


@dataclass(frozen=True)
class FleetCounts:
    """What the database holds now: migrations by (type, status), drain rows by status."""

    migrations: dict[tuple[str, str], int]
    drain_rows: dict[str, int]


class _Database(Collector):
    """Gauges read from the store at each scrape."""

    def __init__(self, counts: Callable[[], FleetCounts]) -> None:
        self._counts = counts

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # collected live: nothing to describe ahead of a scrape

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self._counts()
        migrations = GaugeMetricFamily("coldferry_migrations", "Migration records by type and status.",
                                       labels=["type", "status"])
        for (kind, status), n in sorted(counts.migrations.items()):
            migrations.add_metric([kind, status], n)
        rows = GaugeMetricFamily("coldferry_drain_rows", "Rows of every drain by state.", labels=["status"])
        for status, n in sorted(counts.drain_rows.items()):
            rows.add_metric([status], n)
        yield migrations
        yield rows


class ControllerMetrics:
    """The controller's metrics, in a registry of its own (``registry``).

    :param counts: reads what the database holds (``Store.tally``).
    """

    def __init__(self, counts: Callable[[], FleetCounts]) -> None:
        self.registry = CollectorRegistry()
        self.ended = Counter("coldferry_migrations_ended", "Migrations this controller saw reach a final status.",
                             ["type", "status"], registry=self.registry)
        self.phase_seconds = Histogram("coldferry_migration_phase_seconds",
                                       "Duration of each timeline phase of the migrations this controller saw end.",
                                       ["type", "phase"], buckets=PHASE_BUCKETS, registry=self.registry)
        self.downtime_seconds = Histogram("coldferry_migration_downtime_seconds",
                                          "How long the guest was off (cold) or paused (live).",
                                          ["type"], buckets=DOWNTIME_BUCKETS, registry=self.registry)
        self.registry.register(_Database(counts))

    def migration_ended(self, record: MigrationRecord) -> None:
        """Count a migration that just reached a final status (call once per record)."""
        if record.status not in FINAL:
            return
        kind = str(record.migration_type)
        self.ended.labels(type=kind, status=str(record.status)).inc()
        observe_phases(self.phase_seconds, record.timeline, type=kind)
        if record.downtime_s is not None:
            self.downtime_seconds.labels(type=kind).observe(record.downtime_s)


__all__ = ["ControllerMetrics", "DOWNTIME_BUCKETS", "FleetCounts"]
