"""The processes of a ``bench-fleet`` scenario: the hosts' agents, the controllers, the database.

A ``Fleet`` is one scenario's world: a fresh schema of the private PostgreSQL
cluster (tests/pgcluster.py), the in-memory hosts with their servers in one
agent process (fleet_hosts.py), migration records already present, and one or
more real ``coldferry controller`` processes on that database. Every process
is started here and stopped here by its pid.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from . import fleet_hosts

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
COLDFERRY = REPO / ".venv" / "bin" / "coldferry"
HOSTS_SCRIPT = Path(__file__).resolve().parent / "fleet_hosts.py"
#: Final statuses the seeded records are spread over (a final record blocks no new migration).
SEEDED_STATUSES = ("confirmed", "confirmed", "confirmed", "reverted", "error")


class FleetError(RuntimeError):
    """A process of the benchmark did not start or answer; the message says which and where its log is."""


@dataclass
class Proc:
    """A process started here: its Popen, what it is, and its log file."""

    what: str
    popen: subprocess.Popen[bytes]
    log: Path
    _log_file: TextIO | None = None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM by pid, SIGKILL after ``timeout``."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        if self._log_file is not None:
            self._log_file.close()

    def tail(self, chars: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise FleetError(f"{self.what} exited with {self.popen.returncode}; its log {self.log} ends: "
                             f"{self.tail()}")


@dataclass
class Controller:
    """A running ``coldferry controller``: its process and base URL."""

    name: str
    proc: Proc
    url: str


@dataclass
class Fleet:
    """One scenario: hosts, database, controllers (see the module docstring)."""

    workdir: Path
    hosts: int
    servers: int
    db_url: str
    token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    agent_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    hosts_proc: Proc | None = None
    hosts_port: int = 0
    controllers: list[Controller] = field(default_factory=list)

    @property
    def host_names(self) -> list[str]:
        return [fleet_hosts.host_name(i) for i in range(1, self.hosts + 1)]

    def start_hosts(self, migration_seconds: float, timeout: float = 300.0) -> None:
        """Start the agents' process and wait for its port."""
        log = self.workdir / "hosts.log"
        out = open(log, "w")
        popen = subprocess.Popen([str(PYTHON), str(HOSTS_SCRIPT), "--hosts", str(self.hosts), "--servers",
                                  str(self.servers), "--token", self.agent_token, "--migration-seconds",
                                  str(migration_seconds)], stdout=subprocess.PIPE, stderr=out,
                                 stdin=subprocess.DEVNULL, cwd=REPO)
        self.hosts_proc = Proc("the hosts' agent process", popen, log, out)
        assert popen.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([popen.stdout], [], [], 1.0)
            if ready:
                line = popen.stdout.readline().decode().strip()
                if line.startswith("port "):
                    self.hosts_port = int(line.split()[1])
                    return
            self.hosts_proc.check_alive()
        raise FleetError(f"the hosts' agent process did not report its port within {timeout:g} s; see {log}")

    def agent_url(self, host: str) -> str:
        return f"http://127.0.0.1:{self.hosts_port}/h/{host}"

    def write_config(self, name: str, port: int) -> Path:
        """A controller's TOML: plain HTTP on loopback, the shared database, every host."""
        lines = ["[controller]", f'token = "{self.token}"', 'listen = "127.0.0.1"', f"port = {port}",
                 f'database = "{self.db_url}"', "plain_http = true", ""]
        for host in self.host_names:
            lines += ["[[hosts]]", f'name = "{host}"', f'agent_url = "{self.agent_url(host)}"',
                      f'address = "{host}"', f'agent_token = "{self.agent_token}"', ""]
        path = self.workdir / f"{name}.toml"
        path.write_text("\n".join(lines))
        path.chmod(0o600)
        return path

    def start_controller(self, timeout: float = 120.0) -> Controller:
        """One more ``coldferry controller`` on the fleet's database; waits until its API answers."""
        name = f"controller-{chr(ord('a') + len(self.controllers))}"
        port = free_port()
        config = self.write_config(name, port)
        log = self.workdir / f"{name}.log"
        out = open(log, "w")
        popen = subprocess.Popen([str(COLDFERRY), "controller", "--config", str(config)], stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
        ctl = Controller(name, Proc(name, popen, log, out), f"http://127.0.0.1:{port}")
        self.controllers.append(ctl)
        deadline = time.monotonic() + timeout
        with self.client(ctl) as http:
            while time.monotonic() < deadline:
                ctl.proc.check_alive()
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/v1/drains").status_code == 200:
                        return ctl
                time.sleep(0.2)
        raise FleetError(f"{name} did not answer within {timeout:g} s; see {log}")

    def client(self, ctl: Controller, timeout: float = 600.0) -> httpx.Client:
        return httpx.Client(base_url=ctl.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=timeout)

    def cli_env(self, ctl: Controller) -> dict[str, str]:
        return {**os.environ, "COLDFERRY_URL": ctl.url, "COLDFERRY_TOKEN": self.token, "COLUMNS": "200"}

    def seed_migrations(self, count: int) -> None:
        """``count`` final migration records, as a fleet's history holds, through the store itself:
        a day of them, every host and status represented, one record per server at most."""
        from controller.store import Store

        names = [fleet_hosts.server_name(i) for i in range(1, self.servers + 1)]
        start = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(days=1)
        step = dt.timedelta(days=1) / max(1, count)
        times = iter([start + step * i for i in range(count)])
        with Store(self.db_url, clock=lambda: next(times)) as store:
            hosts = self.host_names
            for i in range(count):
                name = names[i % len(names)]
                src, dst = hosts[i % len(hosts)], hosts[(i * 7 + 1) % len(hosts)]
                if src == dst:
                    dst = hosts[(i + 1) % len(hosts)]
                store.create_migration(server=fleet_hosts.server_uuid(name), server_name=name, source_compute=src,
                                       dest_compute=dst, dest_address=dst, status=SEEDED_STATUSES[i % 5],
                                       task_state=None, old_power_state=1,
                                       flavor={"name": "bench.small", "vcpus": 1, "memory_mb": 512, "root_gb": 1,
                                               "ephemeral_gb": 0},
                                       bytes_sent=1 << 30, rate=250e6,
                                       error="copy failed: seeded record" if SEEDED_STATUSES[i % 5] == "error" else None)

    def stop(self) -> None:
        for ctl in reversed(self.controllers):
            ctl.proc.stop()
        self.controllers.clear()
        if self.hosts_proc is not None:
            self.hosts_proc.stop()
            self.hosts_proc = None

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) each process of the fleet has used so far."""
        procs = [("hosts", self.hosts_proc)] + [(c.name, c.proc) for c in self.controllers]
        return {name: _cpu(p.popen.pid) for name, p in procs if p is not None}


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A loopback TCP port free at this moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def fleet(cluster: Any, workdir: Path, hosts: int, servers: int, migration_seconds: float,
          records: int, controllers: int) -> Iterator[Fleet]:
    """A scenario on a fresh schema of ``cluster``: hosts up, ``records`` seeded, ``controllers`` started.
    Everything is stopped, and the schema dropped, on the way out."""
    workdir.mkdir(parents=True, exist_ok=True)
    with cluster.database() as db_url:
        f = Fleet(workdir, hosts, servers, db_url)
        try:
            f.start_hosts(migration_seconds)
            from controller.store import Store
            Store(db_url).close()   # the schema, made before two controllers race to make it
            if records:
                f.seed_migrations(records)
            for _ in range(controllers):
                f.start_controller()
            yield f
        finally:
            f.stop()


def note(text: str) -> None:
    print(f"bench-fleet: {text}", file=sys.stderr, flush=True)
