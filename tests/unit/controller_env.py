"""A controller over in-memory hosts: MemoryDrivers behind real agent apps, a real SQLite store
(or any database URL: several controllers share a PostgreSQL one, see ``another_controller``)."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
from fastapi.testclient import TestClient

from agent import JobRunner, create_app
from controller import records
from controller.agents import AgentClient
from controller.config import ControllerConfig, HostConfig
from controller.records import MigrationRecord, MigrationStatus
from controller.service import Controller, build
from controller.store import Store
from driver.memory import MemoryCloud, MemoryDriver
from driver.model import Flavor, PowerState

AGENT_TOKEN = "agent-token"
TOKEN = "admin-token"
SMALL = Flavor("small", 1, 512, 1)


@dataclass
class Env:
    """Hosts host1..hostN, their agents, and a controller on ``db``."""

    tmp: Path
    drivers: dict[str, MemoryDriver]
    config: ControllerConfig
    agents: dict[str, AgentClient] = field(default_factory=dict)
    ctl: Controller | None = None
    #: Hosts whose agents cannot be reached now (cut()/mend()): every request fails to connect.
    down: set[str] = field(default_factory=set)
    #: Each host's agent app and job runner (the agent's own record of the jobs it ran).
    apps: dict[str, TestClient] = field(default_factory=dict)
    runners: dict[str, JobRunner] = field(default_factory=dict)
    #: The lease clock every controller's store shares (None: the store's default).
    lease_clock: Callable[[], dt.datetime] | None = None
    lease_seconds: float = 60.0

    @classmethod
    def make(cls, tmp: Path, n: int = 2, spawn: Callable[[Callable[[], None]], None] | None = None,
             database: str | None = None, lease_clock: Callable[[], dt.datetime] | None = None,
             shared_storage: list[tuple[str, ...]] | None = None, **settings: Any) -> "Env":
        """``shared_storage``: groups of hosts that see one instances directory (MemoryCloud's)."""
        cloud = MemoryCloud(shared_storage=shared_storage or [])
        drivers = {f"host{i}": MemoryDriver(f"host{i}", cloud, f"198.18.0.{10 + i}") for i in range(1, n + 1)}
        hosts = tuple(HostConfig(name, "http://testserver", d.address, AGENT_TOKEN) for name, d in drivers.items())
        config = ControllerConfig(token=TOKEN, database=database or f"sqlite:///{tmp / 'controller.db'}",
                                  hosts=hosts, poll_interval=0.01, **settings)
        env = cls(tmp, drivers, config, lease_clock=lease_clock)
        for name in drivers:
            env.restart_agent(name)
        env.start_controller(spawn)
        return env

    def restart_agent(self, name: str) -> None:
        """A fresh agent process for ``name``: same driver state, no memory of earlier jobs."""
        self.runners[name] = JobRunner()
        app = create_app(self.drivers[name], AGENT_TOKEN, self.drivers[name].address, self.runners[name])
        self.apps[name] = TestClient(app)
        self.agents[name] = self.agent_client(name)

    def agent_client(self, name: str) -> AgentClient:
        """A new client of ``name``'s agent, as another controller has its own."""
        return AgentClient(name, "http://testserver", AGENT_TOKEN, http=_Link(self, name, self.apps[name]),  # type: ignore[arg-type]
                           poll_interval=0.01, retry_seconds=0)

    def jobs(self, host: str, op: str) -> int:
        """How many jobs of ``op`` the agent of ``host`` ran (named jobs asked for again count once)."""
        return sum(1 for j in self.runners[host].list() if j.op == op)

    def cut(self, *names: str) -> None:
        """Make the agents of ``names`` unreachable (their hosts and jobs go on)."""
        self.down.update(names)

    def mend(self, *names: str) -> None:
        self.down.difference_update(names)

    def start_controller(self, spawn: Callable[[Callable[[], None]], None] | None = None) -> Controller:
        """A (new) controller on the same database, as after a restart."""
        self.ctl = self.another_controller(spawn, agents=self.agents)
        return self.ctl

    def another_controller(self, spawn: Callable[[Callable[[], None]], None] | None = None,
                           agents: dict[str, AgentClient] | None = None) -> Controller:
        """A controller of its own (its store, agent clients and lease owner) on the same database
        and hosts: the env's own one stays ``ctl``."""
        kw = {"spawn": spawn} if spawn else {}
        agents = agents if agents is not None else {name: self.agent_client(name) for name in self.drivers}
        return build(self.config, agents=agents, store=Store(self.config.database, lease_clock=self.lease_clock),
                     lease_seconds=self.lease_seconds, **kw)

    @property
    def conductor(self) -> Any:
        assert self.ctl is not None
        return self.ctl.conductor

    def api(self) -> TestClient:
        assert self.ctl is not None
        return TestClient(self.ctl.app, headers={"Authorization": f"Bearer {TOKEN}"})

    def add(self, host: str, uuid: str, name: str, state: PowerState = PowerState.RUNNING,
            flavor: Flavor = SMALL) -> None:
        self.drivers[host].add_instance(uuid, name, flavor, state)

    def where(self, uuid: str) -> dict[str, int]:
        """Host name -> power state of every host that defines ``uuid``."""
        out = {}
        for name, d in self.drivers.items():
            try:
                out[name] = int(d.get_instance(uuid).power_state)
            except Exception:  # noqa: BLE001 - not defined there
                continue
        return out

    def wait(self, migration_id: int, until: frozenset[str] = frozenset({MigrationStatus.FINISHED, *records.FINAL}),
             timeout: float = 10.0) -> MigrationRecord:
        deadline = time.monotonic() + timeout
        while True:
            m = self.conductor.get(migration_id)
            if m.status in until:
                return m
            assert time.monotonic() < deadline, f"migration {migration_id} stuck in {m.status}"
            time.sleep(0.01)


@dataclass
class _Link:
    """The network between the controller and one agent: refuses connections while the host is cut."""

    env: Env
    name: str
    http: TestClient

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        if self.name in self.env.down:
            raise httpx.ConnectError(f"connection to {self.name} refused (cut by the test)")
        return self.http.request(method, path, **kw)
