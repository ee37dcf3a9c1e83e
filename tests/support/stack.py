"""The coldferry stack on a lab: an agent inside each lab host, a controller beside them.

``Stack.up(lab, workdir)`` writes every configuration into ``workdir``, starts
``coldferry agent`` inside each host (its own namespaces, its own libvirtd) and
``coldferry controller`` in the root namespace on a free loopback port, and
waits until each of them answers. The root namespace reaches the hosts over the
lab bridge, so the controller talks to ``http://<host.ip>:8797``; each agent copies
disks to the other hosts over SSH as the driver does (``[driver]`` as
``DriverNode.configure`` writes it).

    with Stack.up(lab, workdir, driver_settings={"transfer_bwlimit": 16 << 20}) as stack:
        dom = stack.define_domain("host1", mode="write", start=True)
        stack.cli("server", "migrate", "--host", "host2", "--wait", dom.name)
        stack.api("GET", "/v1/servers").json()

``down()`` ends every process the stack started, by pid (SIGTERM, then SIGKILL
after a bounded wait), and removes the domains it defined; it runs on
``__exit__`` and when ``up`` fails half-way. Logs: ``workdir/<host>-agent.log``,
``workdir/controller.log``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import httpx
import libvirt

from tests.support import guest
from tests.support.drivernode import COLDFERRY, INSTANCES, DriverNode
from tests.support.procs import ProcRef, terminate
from tests.support.sshd import free_port

log = logging.getLogger(__name__)

MiB = 1 << 20
AGENT_PORT = 8797
DEFAULT_CONTROLLER_SETTINGS: dict[str, Any] = {"auto_confirm_seconds": 0, "poll_interval": 0.5}
# Short guest shutdowns (the test guest powers off within a second of the ACPI button): each
# agent's [driver] setting, as the controller sends no timeout.
DEFAULT_DRIVER_SETTINGS: dict[str, Any] = {"shutdown_timeout": 30, "shutdown_retry_interval": 5}
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


class StackError(Exception):
    """A part of the stack did not start or answer in time; the message names its log."""


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without proxy settings (lab and loopback traffic only)."""
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env.update(extra)
    return env


def _toml_value(value: Any) -> str:
    # JSON strings, numbers, booleans and lists of those are valid TOML values.
    return json.dumps(value)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only (it holds tokens)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(text)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


@dataclass
class Domain:
    """A domain the stack defined: its uuid, name and the host it was defined on."""

    uuid: str
    name: str
    host: str
    disk_format: str = "raw"

    @property
    def disk_in_host(self) -> str:
        return f"{INSTANCES}/{self.uuid}/disk"

    @property
    def console_in_host(self) -> str:
        return f"{INSTANCES}/{self.uuid}/console.log"


@dataclass
class Process:
    """A process the stack started: what it is, its Popen and its log file."""

    what: str
    popen: subprocess.Popen
    log_path: Path
    ref: ProcRef | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Stack:
    """Agents on the lab hosts and a controller, started by ``Stack.up``."""

    lab: Any
    workdir: Path
    hosts: list[Any]
    nodes: dict[str, DriverNode]
    agent_token: str
    token: str
    controller_config: Path
    controller_port: int
    agents: dict[str, Process] = field(default_factory=dict)
    controller: Process | None = None
    domains: list[Domain] = field(default_factory=list)
    _client: httpx.Client | None = None
    _image: guest.GuestImage | None = None
    _domain_type: str | None = None

    # -- bringing it up ----------------------------------------------------------------

    @classmethod
    def up(cls, lab: Any, workdir: Path, hosts: Sequence[str] | None = None,
           driver_settings: dict[str, Any] | None = None,
           controller_settings: dict[str, Any] | None = None, timeout: float = 60.0) -> "Stack":
        """Start an agent in each of ``hosts`` (names; default: every lab host) and a controller.

        Agents listen on port 8797 of their host's address, so one stack runs on a lab at a time.

        driver_settings: override ``DriverNode.configure``'s defaults in every agent's
            ``[driver]`` (e.g. ``transfer_bwlimit`` for a slow copy, ``transfer_method``).
        controller_settings: override keys of ``[controller]``.
        timeout: seconds each daemon gets to answer.
        Raises StackError (after stopping what it started) when a daemon does not come up.
        """
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        chosen = [lab.host(n) for n in hosts] if hosts is not None else list(lab.hosts)
        agent_token = secrets.token_urlsafe(24)
        stack = cls(lab=lab, workdir=workdir, hosts=chosen, nodes={}, agent_token=agent_token,
                    token=secrets.token_urlsafe(24), controller_config=workdir / "controller.toml",
                    controller_port=free_port())
        try:
            for host in chosen:
                stack.nodes[host.name] = stack._write_agent_config(
                    host, {**DEFAULT_DRIVER_SETTINGS, **(driver_settings or {})})
                stack.start_agent(host.name, wait=False)
            for host in chosen:
                stack.wait_agent(host.name, timeout)
            stack._write_controller_config({**DEFAULT_CONTROLLER_SETTINGS, **(controller_settings or {})})
            stack.start_controller(timeout)
        except BaseException:
            stack.down()
            raise
        return stack

    def agent_url(self, host_name: str) -> str:
        return f"http://{self.lab.host(host_name).ip}:{AGENT_PORT}"

    @property
    def url(self) -> str:
        """The controller's base URL."""
        return f"http://127.0.0.1:{self.controller_port}"

    def _write_agent_config(self, host: Any, driver_settings: dict[str, Any]) -> DriverNode:
        path = self.workdir / f"{host.name}-agent.toml"
        node = DriverNode.configure(self.lab, host, path, **driver_settings)
        driver_table = path.read_text()
        agent = {"listen": "0.0.0.0", "port": AGENT_PORT, "token": self.agent_token, "address": host.ip,
                 "driver": "libvirt"}
        _write_private(path, "[agent]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in agent.items())
                       + "\n" + driver_table)
        return node

    def _write_controller_config(self, settings: dict[str, Any]) -> None:
        db = self.workdir / "controller.db"
        table = {"listen": "127.0.0.1", "port": self.controller_port, "token": self.token,
                 "database": f"sqlite:///{db}", **settings}
        text = "[controller]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())
        for host in self.hosts:
            entry = {"name": host.name, "agent_url": self.agent_url(host.name), "address": host.ip,
                     "agent_token": self.agent_token}
            text += "\n[[hosts]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in entry.items())
        _write_private(self.controller_config, text)

    def start_agent(self, host_name: str, wait: bool = True, timeout: float = 60.0) -> None:
        """Start the agent of ``host_name`` inside that host (its log is appended to)."""
        host = self.lab.host(host_name)
        log_path = self.workdir / f"{host_name}-agent.log"
        with open(log_path, "ab") as out:
            proc = host.popen([COLDFERRY, "agent", "--config", str(self.nodes[host_name].config)],
                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              env=_clean_env(), start_new_session=True)
        # nsenter execs the agent (no --fork), so this pid is the agent's.
        self.agents[host_name] = Process(f"agent of {host_name}", proc, log_path, ProcRef.of(proc.pid))
        if wait:
            self.wait_agent(host_name, timeout)

    def wait_agent(self, host_name: str, timeout: float = 60.0) -> dict[str, Any]:
        """GET /v1/host of the agent (with the token) until it answers 200; its answer."""
        proc = self.agents[host_name]
        url = f"{self.agent_url(host_name)}/v1/host"
        headers = {"Authorization": f"Bearer {self.agent_token}"}
        return self._wait_http(proc, lambda c: c.get(url, headers=headers), timeout)

    def start_controller(self, timeout: float = 60.0) -> None:
        """Start the controller (again, after ``kill_controller``) and wait until it answers."""
        if self.controller is not None and self.controller.alive():
            raise StackError(f"the controller (pid {self.controller.popen.pid}) is still running")
        log_path = self.workdir / "controller.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen([COLDFERRY, "controller", "--config", str(self.controller_config)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=_clean_env(), start_new_session=True, cwd=self.workdir)
        self.controller = Process("controller", proc, log_path, ProcRef.of(proc.pid))
        url = f"{self.url}/v1/os-hypervisors"
        self._wait_http(self.controller, lambda c: c.get(url, headers=self._auth()), timeout)

    def _wait_http(self, proc: Process, request: Callable[[httpx.Client], httpx.Response],
                   timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            while True:
                if not proc.alive():
                    raise StackError(f"the {proc.what} exited ({proc.popen.returncode}) before it answered; "
                                     f"{proc.log_path} ends:\n{_tail(proc.log_path)}")
                try:
                    reply = request(client)
                    if reply.status_code == 200:
                        return reply.json()
                    last = f"HTTP {reply.status_code}: {reply.text[:300]}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    raise StackError(f"the {proc.what} did not answer within {timeout:g} s ({last}); "
                                     f"{proc.log_path} ends:\n{_tail(proc.log_path)}")
                time.sleep(0.2)

    # -- using it ----------------------------------------------------------------------

    def _auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def cli(self, *args: str, timeout: float = 300.0, check: bool = False,
            merge_output: bool = False) -> subprocess.CompletedProcess:
        """``coldferry ARGS`` against this controller (COLDFERRY_URL/COLDFERRY_TOKEN set).

        check: raise AssertionError (with the output) unless it exits 0.
        merge_output: standard error goes into ``stdout`` too, in the order it was written.
        """
        env = _clean_env(COLDFERRY_URL=self.url, COLDFERRY_TOKEN=self.token)
        env.pop("COLDFERRY_CLIENT_CONFIG", None)
        run = subprocess.run([COLDFERRY, *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT if merge_output else subprocess.PIPE, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
        if check and run.returncode != 0:
            raise AssertionError(f"coldferry {' '.join(args)} failed ({run.returncode}):\n"
                                 f"{run.stdout}\n{run.stderr or ''}")
        return run

    def cli_json(self, *args: str, timeout: float = 300.0) -> Any:
        """``coldferry ARGS -f json``, which must succeed; its parsed output."""
        run = self.cli(*args, "-f", "json", timeout=timeout, check=True)
        try:
            return json.loads(run.stdout)
        except ValueError:
            raise AssertionError(f"coldferry {' '.join(args)} -f json printed no JSON:\n{run.stdout}\n"
                                 f"{run.stderr}") from None

    def api(self, method: str, path: str, json: Any = None, *, token: str | None = None,
            auth: bool = True, **kw: Any) -> httpx.Response:
        """One request to the controller API; ``auth=False`` sends no Authorization header."""
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, trust_env=False, timeout=60.0)
        headers = dict(kw.pop("headers", {}) or {})
        if auth:
            headers.update(self._auth(token))
        return self._client.request(method, path, json=json, headers=headers, **kw)

    def api_ok(self, method: str, path: str, json: Any = None) -> Any:
        """``api`` that must answer 2xx; the parsed body."""
        reply = self.api(method, path, json)
        assert reply.is_success, f"{method} {path} -> {reply.status_code}: {reply.text}"
        return reply.json()

    def server(self, ref: str) -> dict[str, Any]:
        return self.api_ok("GET", f"/v1/servers/{ref}")

    def migration(self, migration_id: int) -> dict[str, Any]:
        return self.api_ok("GET", f"/v1/os-migrations/{migration_id}")

    def migrations(self, server: str | None = None) -> list[dict[str, Any]]:
        """Migration records, newest first (of one server when given)."""
        reply = self.api("GET", "/v1/os-migrations", params={"server": server} if server else None)
        assert reply.is_success, f"GET /v1/os-migrations -> {reply.status_code}: {reply.text}"
        return reply.json()["migrations"]

    def wait_migration(self, migration_id: int, statuses: Iterable[str], timeout: float = 180.0,
                       poll: float = 0.3) -> dict[str, Any]:
        """Poll the record until its status is one of ``statuses``; the record.

        Raises AssertionError with the record when it reaches another final status or time runs out.
        """
        wanted = set(statuses)
        final = {"confirmed", "reverted", "completed", "error"}
        deadline = time.monotonic() + timeout
        while True:
            record = self.migration(migration_id)
            if record["status"] in wanted:
                return record
            if record["status"] in final - wanted:
                raise AssertionError(f"migration {migration_id} ended {record['status']}, not in "
                                     f"{sorted(wanted)}: {record}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"migration {migration_id} still {record['status']} after "
                                     f"{timeout:g} s: {record}")
            time.sleep(poll)

    def kill_controller(self) -> None:
        """SIGKILL the controller by pid (a crash: nothing gets to clean up)."""
        proc = self.controller
        assert proc is not None and proc.alive(), "the controller is not running"
        os.kill(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(30)

    # -- domains -----------------------------------------------------------------------

    @property
    def image(self) -> guest.GuestImage:
        if self._image is None:
            self._image = guest.ensure_built()
        return self._image

    @property
    def domain_type(self) -> str:
        if self._domain_type is None:
            self._domain_type = guest.detect_domain_type(self.image)
        return self._domain_type

    def define_domain(self, host_name: str, *, name: str | None = None, disk_mib: int = 64,
                      disk_format: str = "raw", data: Sequence[tuple[int, int]] = (), mode: str = "check",
                      start: bool = False, memory_mib: int = 128, interval: float | None = None,
                      stride: int | None = None) -> Domain:
        """Define a domain of the test guest on ``host_name`` in ``<instances>/<uuid>/``.

        disk_mib: virtual size of its disk (sparse); disk_format: raw or qcow2.
        data: (offset MiB, length MiB) runs of random data written into a raw disk, beyond
            the guest's record log, to give a copy work to do.
        mode: the guest's mode (check: verify only; write: append a record, see guest.py).
        interval: seconds between records in mode writeloop; stride: bytes between record slots.
        start: start it (it boots the test guest; wait for ``CFGUEST ready`` on its console).
        """
        node = self.nodes[host_name]
        uuid = str(uuidlib.uuid4())
        name = name or f"cf-{uuid[:8]}"
        inst = node.dir(uuid)
        inst.mkdir(parents=True)
        dom = Domain(uuid, name, host_name, disk_format)
        self.domains.append(dom)   # removed by remove_domains/down even if what follows fails
        disk = guest.make_disk(inst / "disk", disk_mib * MiB, disk_format)
        if data:
            if disk_format != "raw":
                raise ValueError("data runs are written into raw disks only")
            with open(disk, "r+b") as f:
                for off, length in data:
                    f.seek(off * MiB)
                    for _ in range(length):
                        f.write(os.urandom(MiB))
        xml = guest.domain_xml(name, dom.disk_in_host, dom.console_in_host, self.image, uuid=uuid,
                               domain_type=self.domain_type, disk_format=disk_format, mode=mode,
                               memory_mib=memory_mib, interval=interval, stride=stride)
        conn = self.lab.host(host_name).connect()
        try:
            virdom = conn.defineXML(xml)
            if start:
                virdom.create()
        finally:
            conn.close()
        return dom

    def console(self, dom: Domain, host_name: str, suffix: str = "") -> Path:
        """The domain's serial log on ``host_name`` as seen from the root namespace."""
        return self.nodes[host_name].dir(dom.uuid, suffix) / "console.log"

    def virsh(self, host_name: str, *args: str) -> subprocess.CompletedProcess:
        return self.lab.host(host_name).run(["virsh", "-q", *args], capture_output=True, text=True,
                                           timeout=60)

    def state(self, dom: Domain, host_name: str) -> str:
        """virsh's word for the domain on ``host_name``: running, paused, shut off, undefined."""
        return self.nodes[host_name].state(dom.uuid)

    def where(self, dom: Domain) -> dict[str, dict[str, Any]]:
        """On which hosts the domain is defined or has files: {host: {state, dirs}}."""
        found: dict[str, dict[str, Any]] = {}
        for host_name, node in self.nodes.items():
            state = node.state(dom.uuid)
            dirs = [p.name for p in node.host.instances_dir.glob(f"{dom.uuid}*")]
            if state != "undefined" or dirs:
                found[host_name] = {"state": state, "dirs": sorted(dirs)}
        return found

    def remove_domain(self, dom: Domain) -> None:
        """Destroy and undefine the domain on every host and delete its directories."""
        for host_name, node in self.nodes.items():
            try:
                conn = node.host.connect()
            except libvirt.libvirtError as exc:
                log.warning("cannot reach libvirtd of %s to remove %s: %s", host_name, dom.uuid, exc)
                continue
            try:
                # Listing, not lookupByUUIDString: libvirt prints every failed lookup to stderr.
                virdom = next((d for d in conn.listAllDomains() if d.UUIDString() == dom.uuid), None)
                if virdom is not None:
                    if virdom.isActive():
                        virdom.destroy()
                    virdom.undefine()
            except libvirt.libvirtError as exc:
                log.warning("removing %s from %s: %s", dom.uuid, host_name, exc)
            finally:
                conn.close()
            for path in node.host.instances_dir.glob(f"{dom.uuid}*"):
                shutil.rmtree(path, ignore_errors=True)

    def remove_domains(self) -> None:
        """Remove every domain this stack defined (see remove_domain)."""
        while self.domains:
            self.remove_domain(self.domains.pop())

    # -- taking it down ----------------------------------------------------------------

    def processes(self) -> list[Process]:
        return [p for p in [self.controller, *self.agents.values()] if p is not None]

    def down(self, remove_domains: bool = True) -> None:
        """Stop the controller and the agents by pid (SIGTERM, then SIGKILL after 10 s) and,
        unless told otherwise, remove the domains the stack defined. Idempotent."""
        if self._client is not None:
            self._client.close()
            self._client = None
        procs = self.processes()
        refs = [p.ref for p in procs if p.ref is not None and p.alive()]
        left = terminate(refs, term_timeout=10.0, kill_timeout=5.0)
        for p in procs:
            try:
                p.popen.wait(1)
            except subprocess.TimeoutExpired:
                pass
        if remove_domains:
            self.remove_domains()
        if left:
            raise StackError(f"pids {[r.pid for r in left]} survived SIGKILL")

    def collect_logs(self, dest: Path) -> None:
        """Copy the agents' and the controller's logs to ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        for path in self.workdir.glob("*.log"):
            shutil.copyfile(path, dest / path.name)

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
