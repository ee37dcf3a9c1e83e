"""The coldferry stack on a lab: an agent inside each lab host, a controller beside them.

``Stack.up(lab, workdir)`` writes every configuration into ``workdir``, starts
``coldferry agent`` inside each host (its own namespaces, its own libvirtd) and
``coldferry controller`` in the root namespace on a free loopback port, and
waits until each of them answers. Every one serves TLS with a certificate of a CA
made for the stack in ``workdir/tls`` (``ca_file``; coldferry tls), which the
controller (``agent_ca``), the CLI (``COLDFERRY_CA_FILE``) and ``api`` check.
``plain_http=True`` serves plain HTTP instead (``plain_http = true`` in every
configuration), for faults that read the answers on the wire (faults.py
``held_job_replies``). The root namespace reaches the hosts over the lab
bridge, so the controller talks to ``https://<host.ip>:8797``; each agent copies
disks to the other hosts over SSH as the driver does (``[driver]`` as
``DriverNode.configure`` writes it).

    with Stack.up(lab, workdir, driver_settings={"transfer_bwlimit": 16 << 20}) as stack:
        dom = stack.define_domain("host1", mode="write", start=True)
        stack.cli("server", "migrate", "--host", "host2", "--wait", dom.name)
        stack.api("GET", "/v1/servers").json()

``define_blank`` makes a server without an operating system (blank.py) that starts at
once; ``shared_storage`` gives hosts one instances directory, ``small_disk`` gives one
a tmpfs (hostmounts.py); tests/support/faults.py breaks things on purpose.

Several controllers: ``Stack.up(..., controllers=2, database=url)`` starts that many
``coldferry controller`` processes on one database (a PostgreSQL URL: SQLite is for one
controller), each on its own loopback port with its own configuration and log. Controller 0
is the one every call talks to by default; ``api``, ``cli``, ``migration`` and the like take
``controller=i``, and ``kill_controller(i)`` / ``start_controller(i)`` crash and restart one.

``down()`` ends every process the stack started, by pid (SIGTERM, then SIGKILL
after a bounded wait), and removes the domains it defined; it runs on
``__exit__`` and when ``up`` fails half-way. Logs: ``workdir/<host>-agent.log``,
``workdir/controller.log`` (controller 0; controller i > 0: ``workdir/controller<i>.log``,
configured by ``controller<i>.toml``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import time
import uuid as uuidlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import httpx
import libvirt

from coldferry.tls_cmd import make_ca, make_cert
from tests.support import blank, guest, hostmounts
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


def _make_certificates(tls: Path, hosts: Sequence[Any]) -> None:
    """A new CA in ``tls`` and a server certificate per host (``<name>.pem``, for its name and
    address) and for the controller (``controller.pem``, for 127.0.0.1)."""
    shutil.rmtree(tls, ignore_errors=True)  # a workdir used again gets a new CA
    make_ca(tls)
    for host in hosts:
        make_cert(tls, host.name, tls / host.name, ips=[host.ip])
    make_cert(tls, "controller", tls / "controller", dns=["localhost"], ips=["127.0.0.1"])


@dataclass
class Stack:
    """Agents on the lab hosts and one or more controllers, started by ``Stack.up``."""

    lab: Any
    workdir: Path
    hosts: list[Any]
    nodes: dict[str, DriverNode]
    agent_token: str
    token: str
    controller_ports: list[int]
    plain_http: bool = False
    agents: dict[str, Process] = field(default_factory=dict)
    controllers: dict[int, Process] = field(default_factory=dict)
    domains: list[Domain] = field(default_factory=list)
    _clients: dict[int, httpx.Client] = field(default_factory=dict)
    _image: guest.GuestImage | None = None
    _domain_type: str | None = None

    # -- bringing it up ----------------------------------------------------------------

    @classmethod
    def up(cls, lab: Any, workdir: Path, hosts: Sequence[str] | None = None,
           driver_settings: dict[str, Any] | None = None,
           controller_settings: dict[str, Any] | None = None, timeout: float = 60.0,
           plain_http: bool = False, controllers: int = 1, database: str | None = None) -> "Stack":
        """Start an agent in each of ``hosts`` (names; default: every lab host) and ``controllers``
        controllers.

        Agents listen on port 8797 of their host's address, so one stack runs on a lab at a time.

        driver_settings: override ``DriverNode.configure``'s defaults in every agent's
            ``[driver]`` (e.g. ``transfer_bwlimit`` for a slow copy, ``transfer_method``).
        controller_settings: override keys of ``[controller]``.
        timeout: seconds each daemon gets to answer.
        plain_http: serve plain HTTP, not TLS (for faults that read the answers on the wire).
        controllers: how many controller processes to start, each on its own port.
        database: the SQLAlchemy URL every controller keeps its records in; default a SQLite
            file in ``workdir``, which serves one controller only (ValueError for more).
        Raises StackError (after stopping what it started) when a daemon does not come up.
        """
        if controllers < 1:
            raise ValueError(f"controllers must be at least 1, not {controllers}")
        if controllers > 1 and database is None:
            raise ValueError(f"{controllers} controllers need one database they can share: give database= "
                             "a PostgreSQL URL (a SQLite file serves one controller)")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        chosen = [lab.host(n) for n in hosts] if hosts is not None else list(lab.hosts)
        agent_token = secrets.token_urlsafe(24)
        stack = cls(lab=lab, workdir=workdir, hosts=chosen, nodes={}, agent_token=agent_token,
                    token=secrets.token_urlsafe(24), controller_ports=[free_port() for _ in range(controllers)],
                    plain_http=plain_http)
        try:
            _make_certificates(stack.tls_dir, chosen)
            for host in chosen:
                stack.nodes[host.name] = stack._write_agent_config(
                    host, {**DEFAULT_DRIVER_SETTINGS, **(driver_settings or {})})
                stack.start_agent(host.name, wait=False)
            for host in chosen:
                stack.wait_agent(host.name, timeout)
            settings = {**DEFAULT_CONTROLLER_SETTINGS, **(controller_settings or {})}
            db = database or f"sqlite:///{workdir / 'controller.db'}"
            # One after the other: controllers starting at the same moment on a new database race
            # in writing its host table (Store.sync_hosts), and one of them fails to start.
            for index in range(controllers):
                stack._write_controller_config(index, db, settings)
                stack.start_controller(index, timeout=timeout)
        except BaseException:
            stack.down()
            raise
        return stack

    @classmethod
    @contextmanager
    def running(cls, lab: Any, workdir: Path, logs: Path, **kw: Any) -> Iterator["Stack"]:
        """``up`` for a ``with`` block (keywords as ``up``'s); at its end the logs are copied to
        ``logs`` and the stack is taken down, whatever happened."""
        stack = cls.up(lab, workdir, **kw)
        try:
            yield stack
        finally:
            try:
                stack.collect_logs(logs)
            finally:
                stack.down()

    def agent_url(self, host_name: str) -> str:
        return f"{self._scheme}://{self.lab.host(host_name).ip}:{AGENT_PORT}"

    @property
    def url(self) -> str:
        """Controller 0's base URL."""
        return self.controller_url(0)

    def controller_url(self, index: int = 0) -> str:
        """The base URL of controller ``index``."""
        return f"{self._scheme}://127.0.0.1:{self.controller_ports[index]}"

    @property
    def controller_port(self) -> int:
        """Controller 0's port."""
        return self.controller_ports[0]

    @property
    def controller_config(self) -> Path:
        """Controller 0's configuration file."""
        return self.controller_config_path(0)

    @property
    def controller(self) -> Process | None:
        """Controller 0's process (None before it first started)."""
        return self.controllers.get(0)

    def _controller_file(self, index: int, suffix: str) -> Path:
        """``controller<suffix>`` for controller 0, ``controller<index><suffix>`` for the others."""
        return self.workdir / f"controller{index or ''}{suffix}"

    def controller_config_path(self, index: int) -> Path:
        return self._controller_file(index, ".toml")

    def controller_log(self, index: int = 0) -> Path:
        """The log of controller ``index`` (appended to by each start)."""
        return self._controller_file(index, ".log")

    @property
    def _scheme(self) -> str:
        return "http" if self.plain_http else "https"

    def _tls_settings(self, name: str, **more: str) -> dict[str, Any]:
        """The TLS keys of the configuration of ``name`` (its certificate ``<name>.pem``), or
        ``plain_http = true``."""
        if self.plain_http:
            return {"plain_http": True}
        return {"tls_cert": str(self.tls_dir / f"{name}.pem"), "tls_key": str(self.tls_dir / f"{name}-key.pem"),
                **more}

    @property
    def tls_dir(self) -> Path:
        """The stack's CA and every certificate it signed (``_make_certificates``)."""
        return self.workdir / "tls"

    @property
    def ca_file(self) -> Path:
        """The CA certificate every server's certificate is checked against."""
        return self.tls_dir / "ca.pem"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the stack's CA only (for httpx's ``verify``)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _write_agent_config(self, host: Any, driver_settings: dict[str, Any]) -> DriverNode:
        path = self.workdir / f"{host.name}-agent.toml"
        node = DriverNode.configure(self.lab, host, path, **driver_settings)
        driver_table = path.read_text()
        agent = {"listen": "0.0.0.0", "port": AGENT_PORT, "token": self.agent_token, "address": host.ip,
                 "driver": "libvirt", **self._tls_settings(host.name)}
        _write_private(path, "[agent]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in agent.items())
                       + "\n" + driver_table)
        return node

    def _write_controller_config(self, index: int, database: str, settings: dict[str, Any]) -> None:
        table = {"listen": "127.0.0.1", "port": self.controller_ports[index], "token": self.token,
                 "database": database, **self._tls_settings("controller", agent_ca=str(self.ca_file)),
                 **settings}
        text = "[controller]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())
        for host in self.hosts:
            entry = {"name": host.name, "agent_url": self.agent_url(host.name), "address": host.ip,
                     "agent_token": self.agent_token}
            text += "\n[[hosts]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in entry.items())
        _write_private(self.controller_config_path(index), text)

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

    def start_controller(self, index: int = 0, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Start controller ``index`` (again, after ``kill_controller``) and, with ``wait``, wait
        until it answers."""
        running = self.controllers.get(index)
        if running is not None and running.alive():
            raise StackError(f"the {running.what} (pid {running.popen.pid}) is still running")
        log_path = self.controller_log(index)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen([COLDFERRY, "controller", "--config", str(self.controller_config_path(index))],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=_clean_env(), start_new_session=True, cwd=self.workdir)
        what = "controller" if len(self.controller_ports) == 1 else f"controller {index}"
        self.controllers[index] = Process(what, proc, log_path, ProcRef.of(proc.pid))
        if wait:
            self.wait_controller(index, timeout)

    def wait_controller(self, index: int = 0, timeout: float = 60.0) -> None:
        """GET /v1/os-hypervisors of controller ``index`` until it answers 200."""
        url = f"{self.controller_url(index)}/v1/os-hypervisors"
        self._wait_http(self.controllers[index], lambda c: c.get(url, headers=self._auth()), timeout)

    def _wait_http(self, proc: Process, request: Callable[[httpx.Client], httpx.Response],
                   timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        with httpx.Client(trust_env=False, timeout=5.0, verify=self.ssl_context()) as client:
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
            merge_output: bool = False, controller: int = 0) -> subprocess.CompletedProcess:
        """``coldferry ARGS`` against controller ``controller`` (COLDFERRY_URL/COLDFERRY_TOKEN/COLDFERRY_CA_FILE set).

        check: raise AssertionError (with the output) unless it exits 0.
        merge_output: standard error goes into ``stdout`` too, in the order it was written.
        """
        env = _clean_env(COLDFERRY_URL=self.controller_url(controller), COLDFERRY_TOKEN=self.token,
                         COLDFERRY_CA_FILE=str(self.ca_file))
        env.pop("COLDFERRY_CLIENT_CONFIG", None)
        run = subprocess.run([COLDFERRY, *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT if merge_output else subprocess.PIPE, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
        if check and run.returncode != 0:
            raise AssertionError(f"coldferry {' '.join(args)} failed ({run.returncode}):\n"
                                 f"{run.stdout}\n{run.stderr or ''}")
        return run

    def cli_json(self, *args: str, timeout: float = 300.0, controller: int = 0) -> Any:
        """``coldferry ARGS -f json``, which must succeed; its parsed output."""
        run = self.cli(*args, "-f", "json", timeout=timeout, check=True, controller=controller)
        try:
            return json.loads(run.stdout)
        except ValueError:
            raise AssertionError(f"coldferry {' '.join(args)} -f json printed no JSON:\n{run.stdout}\n"
                                 f"{run.stderr}") from None

    def api(self, method: str, path: str, json: Any = None, *, token: str | None = None,
            auth: bool = True, controller: int = 0, **kw: Any) -> httpx.Response:
        """One request to the API of controller ``controller``; ``auth=False`` sends no
        Authorization header."""
        client = self._clients.get(controller)
        if client is None:
            client = self._clients[controller] = httpx.Client(
                base_url=self.controller_url(controller), trust_env=False, timeout=60.0, verify=self.ssl_context())
        headers = dict(kw.pop("headers", {}) or {})
        if auth:
            headers.update(self._auth(token))
        return client.request(method, path, json=json, headers=headers, **kw)

    def api_ok(self, method: str, path: str, json: Any = None, *, controller: int = 0) -> Any:
        """``api`` that must answer 2xx; the parsed body."""
        reply = self.api(method, path, json, controller=controller)
        assert reply.is_success, f"{method} {path} -> {reply.status_code}: {reply.text}"
        return reply.json()

    def server(self, ref: str, *, controller: int = 0) -> dict[str, Any]:
        return self.api_ok("GET", f"/v1/servers/{ref}", controller=controller)

    def migration(self, migration_id: int, *, controller: int = 0) -> dict[str, Any]:
        return self.api_ok("GET", f"/v1/os-migrations/{migration_id}", controller=controller)

    def migrations(self, server: str | None = None, *, controller: int = 0) -> list[dict[str, Any]]:
        """Migration records, newest first (of one server when given)."""
        reply = self.api("GET", "/v1/os-migrations", params={"server": server} if server else None,
                         controller=controller)
        assert reply.is_success, f"GET /v1/os-migrations -> {reply.status_code}: {reply.text}"
        return reply.json()["migrations"]

    def wait_migration(self, migration_id: int, statuses: Iterable[str], timeout: float = 180.0,
                       poll: float = 0.3, *, controller: int = 0) -> dict[str, Any]:
        """Poll the record until its status is one of ``statuses``; the record.

        Raises AssertionError with the record when it reaches another final status or time runs out.
        """
        wanted = set(statuses)
        final = {"confirmed", "reverted", "completed", "error"}
        deadline = time.monotonic() + timeout
        while True:
            record = self.migration(migration_id, controller=controller)
            if record["status"] in wanted:
                return record
            if record["status"] in final - wanted:
                raise AssertionError(f"migration {migration_id} ended {record['status']}, not in "
                                     f"{sorted(wanted)}: {record}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"migration {migration_id} still {record['status']} after "
                                     f"{timeout:g} s: {record}")
            time.sleep(poll)

    def kill_controller(self, index: int = 0) -> None:
        """SIGKILL controller ``index`` by pid (a crash: nothing gets to clean up, no lease is let go)."""
        proc = self.controllers.get(index)
        assert proc is not None and proc.alive(), f"controller {index} is not running"
        client = self._clients.pop(index, None)
        if client is not None:   # its connections lead nowhere now
            client.close()
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
        dom, inst = self._new_domain(host_name, name, "cf", disk_format)
        disk = guest.make_disk(inst / "disk", disk_mib * MiB, disk_format)
        if data:
            if disk_format != "raw":
                raise ValueError("data runs are written into raw disks only")
            with open(disk, "r+b") as f:
                for off, length in data:
                    f.seek(off * MiB)
                    for _ in range(length):
                        f.write(os.urandom(MiB))
        xml = guest.domain_xml(dom.name, dom.disk_in_host, dom.console_in_host, self.image, uuid=dom.uuid,
                               domain_type=self.domain_type, disk_format=disk_format, mode=mode,
                               memory_mib=memory_mib, interval=interval, stride=stride)
        self._define(host_name, xml, start)
        return dom

    def define_blank(self, host_name: str, *, name: str | None = None, disk_mib: int = 128, data_mib: int = 64,
                     start: bool = False, acpi: bool = True, bridge: str | None = None) -> Domain:
        """Define a domain without an operating system (see blank.py) on ``host_name``, its raw
        disk holding ``data_mib`` MiB of random data; it starts in a moment and ignores ACPI."""
        dom, inst = self._new_domain(host_name, name, "cfb", "raw")
        blank.make_disk(inst / "disk", disk_mib, data_mib)
        xml = blank.domain_xml(dom.name, dom.uuid, dom.disk_in_host, domain_type=self.domain_type, acpi=acpi,
                               bridge=bridge)
        self._define(host_name, xml, start)
        return dom

    def _new_domain(self, host_name: str, name: str | None, prefix: str, disk_format: str) -> tuple[Domain, Path]:
        """A new domain's record (kept for removal at once) and its empty instance directory."""
        uuid = str(uuidlib.uuid4())
        dom = Domain(uuid, name or f"{prefix}-{uuid[:8]}", host_name, disk_format)
        self.domains.append(dom)   # removed by remove_domains/down even if what follows fails
        inst = self.nodes[host_name].dir(uuid)
        inst.mkdir(parents=True)
        return dom, inst

    def _define(self, host_name: str, xml: str, start: bool) -> None:
        conn = self.lab.host(host_name).connect()
        try:
            virdom = conn.defineXML(xml)
            if start:
                virdom.create()
        finally:
            conn.close()

    @contextmanager
    def shared_storage(self, host_names: Sequence[str]) -> Iterator[Path]:
        """Give ``host_names`` one instances directory (hostmounts.shared_instances), a
        directory of the lab's own; yields it as the root namespace sees it."""
        directory = self.lab.base_dir / "shared-instances"
        with hostmounts.shared_instances([self.lab.host(n) for n in host_names], directory):
            for n in host_names:
                self.nodes[n].root = directory
            try:
                yield directory
            finally:
                for n in host_names:
                    self.nodes[n].root = None

    @contextmanager
    def small_disk(self, host_name: str, size_mib: int) -> Iterator[Path]:
        """Put ``host_name``'s instances on a tmpfs of ``size_mib`` MiB (hostmounts.small_instances);
        yields it as the root namespace reaches it."""
        with hostmounts.small_instances(self.lab.host(host_name), size_mib) as view:
            self.nodes[host_name].root = view
            try:
                yield view
            finally:
                self.nodes[host_name].root = None

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
            dirs = [p.name for p in node.instances_dir.glob(f"{dom.uuid}*")]
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
            for path in node.instances_dir.glob(f"{dom.uuid}*"):
                shutil.rmtree(path, ignore_errors=True)

    def remove_domains(self) -> None:
        """Remove every domain this stack defined (see remove_domain)."""
        while self.domains:
            self.remove_domain(self.domains.pop())

    # -- taking it down ----------------------------------------------------------------

    def processes(self) -> list[Process]:
        return [*self.controllers.values(), *self.agents.values()]

    def down(self, remove_domains: bool = True) -> None:
        """Stop the controller and the agents by pid (SIGTERM, then SIGKILL after 10 s) and,
        unless told otherwise, remove the domains the stack defined. Idempotent."""
        while self._clients:
            self._clients.popitem()[1].close()
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
