"""The controller put together: store, agents, inventory, conductor, drainer, API, metrics, dashboard and timers."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping

from fastapi import FastAPI

from agent.metrics import serve_metrics

from .agents import AgentClient
from .api import create_app
from .conductor import Conductor, Spawn, spawn_thread
from .config import ControllerConfig
from .drain import Drainer
from .inventory import Inventory
from .metrics import ControllerMetrics, FleetCounts
from .nova import mount_nova
from .store import Store
from .web import mount_dashboard

log = logging.getLogger(__name__)


@dataclass
class Controller:
    """A running controller's parts; ``start()`` reconciles, resumes drains and starts the timers."""

    config: ControllerConfig
    store: Store
    conductor: Conductor
    drainer: Drainer
    app: FastAPI
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> list[int]:
        """Take over the in-flight migrations and running drains no controller holds a lease on,
        and start the timers: the lease pass (``tend``, every quarter of the lease time),
        auto-confirm (when configured) and the recovery pass over needs-recovery migrations
        (every ``recovery_interval`` seconds). Returns the ids of the migrations taken over."""
        picked = self.conductor.reconcile()
        if picked:
            log.info("reconciling migrations %s that no controller drives", picked)
        resumed = self.drainer.resume()
        if resumed:
            log.info("resuming drains %s that no controller runs", resumed)
        # A quarter: three renewals may fail before the lease runs out, and a dead controller's
        # migrations are taken over at most 1.25 lease times after its last renewal.
        self._every(self.conductor.lease.seconds / 4, "lease", self.tend)
        if self.config.auto_confirm_seconds > 0:
            self._every(max(1.0, min(30.0, self.config.auto_confirm_seconds / 4)), "auto-confirm",
                        self.conductor.auto_confirm)
        self._every(self.config.recovery_interval, "recover", self.conductor.recover_all)
        return picked

    def tend(self) -> list[int]:
        """One lease pass: renew the leases of what this controller drives, then take over the
        migrations and drains whose holder stopped renewing (it died). Returns the migrations
        taken over."""
        self.conductor.renew_leases()
        self.drainer.renew_leases()
        drains = self.drainer.resume()
        if drains:
            log.info("lease: took over drains %s", drains)
        return self.conductor.reconcile()

    def stop(self) -> None:
        """Stop the timers and let go of every lease, so that another controller takes over at once."""
        self._stop.set()
        self.conductor.release_leases()
        self.drainer.release_leases()

    def _every(self, interval: float, what: str, work: Callable[[], list[int]]) -> None:
        """Run ``work`` every ``interval`` seconds in a thread until stop(); log the ids it acted on."""
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    done = work()
                except Exception:  # noqa: BLE001 - the timer must outlive one bad pass
                    log.exception("%s pass failed", what)
                    continue
                if done:
                    log.info("%s: migrations %s", what, done)

        threading.Thread(target=loop, daemon=True, name=f"coldferry-{what}").start()


def build(config: ControllerConfig, *, agents: Mapping[str, AgentClient] | None = None,
          store: Store | None = None, spawn: Spawn = spawn_thread, lease_seconds: float | None = None) -> Controller:
    """Wire a controller from its configuration.

    :param agents: agent clients by host name; default one AgentClient per configured host.
    :param store: default a Store on ``config.database``, exclusive: a second controller on the
        same SQLite file is refused (DatabaseInUse); several controllers share a PostgreSQL database.
    :param spawn: how background work starts (a thread by default; tests may run it inline).
    :param lease_seconds: how long this controller's claim on a migration or drain holds
        without renewal (docs/safety.md, "Several controllers"); default ``config.lease_seconds``.
    """
    store = store or Store(config.database, exclusive=True)
    store.sync_hosts([h.record() for h in config.hosts])
    if agents is None:
        agents = {h.name: AgentClient(h.name, h.agent_url, h.agent_token, timeout=config.agent_timeout,
                                      poll_interval=config.poll_interval, retry_seconds=config.agent_retry_seconds,
                                      ca_file=config.agent_ca, client_cert=config.agent_client_pair)
                  for h in config.hosts}
    inventory = Inventory(store, agents)
    lease_seconds = config.lease_seconds if lease_seconds is None else lease_seconds
    metrics = ControllerMetrics(lambda: FleetCounts(*store.tally()))
    conductor = Conductor(store, inventory, config, spawn=spawn, lease_seconds=lease_seconds,
                          ended=metrics.migration_ended)
    drainer = Drainer(store, conductor, spawn=spawn)
    app = create_app(conductor, drainer, store, config.token)
    serve_metrics(app, metrics.registry, config.token)
    mount_nova(app, conductor, config.token)
    mount_dashboard(app, conductor, drainer, store, config)
    return Controller(config, store, conductor, drainer, app)


__all__ = ["Controller", "build"]
