"""The real OpenStack clients against coldferry's /v2.1: ``openstack``, ``nova`` and Watcher.

The controller runs under uvicorn on 127.0.0.1 in a thread, over TLS with a
test CA (the clients get ``--os-cacert``), in front of in-memory hosts
(tests/unit/controller_env.py). The clients authenticate with ``admin_token``
and the controller's token: no Keystone. Each command runs once (their
start-up takes a second or two); every command and its output go to
test-artifacts/nova-clients.md.

Watcher is python-watcher itself (the ``nova-clients`` extra): its migrate
action's ``pre_condition`` and ``execute``, run in a child process with
Watcher's own configuration file, as its applier runs them.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.config import ServerTLS
from coldferry.tls_cmd import make_ca, make_cert
from controller import records
from controller.records import MigrationRecord, MigrationStatus
from driver.model import PowerState
from tests.unit.controller_env import TOKEN, Env
from tests.support.serve import serve

REPO = Path(__file__).resolve().parents[2]
ARTIFACT = REPO / "test-artifacts" / "nova-clients.md"
BIN = Path(sys.executable).parent
WEB = "00000000-0000-4000-8000-00000000b001"
DB = "00000000-0000-4000-8000-00000000b002"
BATCH = "00000000-0000-4000-8000-00000000b003"
N1 = "00000000-0000-4000-8000-00000000b004"
N2 = "00000000-0000-4000-8000-00000000b005"
SETTLED = frozenset({MigrationStatus.FINISHED, *records.FINAL})

pytestmark = pytest.mark.skipif(not (BIN / "openstack").exists() or not (BIN / "nova").exists(),
                                reason="the OpenStack clients are not installed: pip install -e '.[nova-clients]'")

# Watcher's applier, cut to the migrate action: the action as Watcher builds it from an
# action plan's input parameters, its pre-condition check, then execute().
WATCHER = textwrap.dedent("""\
    import sys
    import warnings
    # Deprecations in Watcher's dependencies; Watcher resets the filters, so silence the output.
    warnings.showwarning = lambda *args, **kwargs: None
    from oslo_config import cfg
    import watcher.conf  # noqa: F401 - registers Watcher's options
    from watcher.applier.actions import migration

    conf_file, server, source, dest = sys.argv[1:]
    cfg.CONF(["--config-file", conf_file], project="watcher")
    action = migration.Migrate(config=None)
    action.input_parameters = {"resource_id": server, "migration_type": "cold",
                               "source_node": source, "destination_node": dest}
    action.pre_condition()
    print("pre_condition: passed")
    print("execute:", action.execute())
""")


@dataclass
class Cloud:
    """The controller over in-memory hosts, served at ``url``, and the clients' settings."""

    env: Env
    url: str
    ca: Path
    home: Path
    log: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"{self.url}/v2.1"

    def _environ(self, **extra: str) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
        return {**keep, "HOME": str(self.home), **extra}

    def run(self, argv: list[str], shown: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a client; the command as ``shown`` and its output go to the artifact."""
        t0 = time.monotonic()
        done = subprocess.run(argv, env=env or self._environ(), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        took = time.monotonic() - t0
        out = (done.stdout + done.stderr).replace(TOKEN, "$OS_TOKEN").replace(self.url, "$URL")
        self.log.append(f"```console\n$ {shown}\n{out.rstrip()}\n# exit {done.returncode}, {took:.1f} s\n```\n")
        return done

    def clients_env(self, **extra: str) -> dict[str, str]:
        """The README's environment for ``openstack``: admin_token auth with the controller's
        token. The identity endpoint is never contacted: it is set so that the SDK takes the
        identity version as given (``server migration list`` asks for v3) instead of looking
        for one at the compute endpoint."""
        return self._environ(OS_AUTH_TYPE="admin_token", OS_TOKEN=TOKEN, OS_ENDPOINT=self.endpoint,
                             OS_CACERT=str(self.ca), OS_IDENTITY_API_VERSION="3",
                             OS_IDENTITY_ENDPOINT_OVERRIDE=self.endpoint, **extra)

    def openstack(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run([str(BIN / "openstack"), *args], shlex.join(["openstack", *args]), env=self.clients_env())

    def nova(self, *args: str) -> subprocess.CompletedProcess[str]:
        # novaclient wants a project and an auth URL, which it never contacts with admin_token.
        env = self.clients_env(OS_PROJECT_ID="coldferry", OS_AUTH_URL="http://127.0.0.1:9/unused")
        return self.run([str(BIN / "nova"), *args], shlex.join(["nova", *args]), env=env)

    def note(self, m: MigrationRecord) -> None:
        """What the controller's record says after a command, into the artifact."""
        where = ", ".join(f"{h} ({PowerState(p).label})" for h, p in self.env.where(m.server).items())
        self.log.append(f"coldferry: migration {m.id} of {m.server_name} {m.source_compute} -> {m.dest_compute} "
                        f"is {m.status}; the server is defined on {where}\n")

    def migrations(self, server: str) -> list[MigrationRecord]:
        return self.env.conductor.store.list_migrations(server=server)

    def settled(self, server: str) -> MigrationRecord:
        """The server's newest migration once it is finished or final."""
        return self.env.wait(self.migrations(server)[0].id, SETTLED)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    tmp = tmp_path_factory.mktemp("nova-clients")
    make_ca(tmp / "ca")
    make_cert(tmp / "ca", "localhost", tmp / "server", ips=["127.0.0.1"])
    env = Env.make(tmp, n=3)
    env.add("host1", WEB, "web")
    env.add("host1", DB, "db", PowerState.SHUTDOWN)
    env.add("host2", BATCH, "batch")
    env.add("host3", N1, "n1")
    env.add("host3", N2, "n2", PowerState.SHUTDOWN)
    (tmp / "home").mkdir()
    assert env.ctl is not None
    with serve(env.ctl.app, ServerTLS(str(tmp / "server.pem"), str(tmp / "server-key.pem"))) as url:
        c = Cloud(env, url, tmp / "ca" / "ca.pem", tmp / "home")
        try:
            yield c
        finally:
            ARTIFACT.parent.mkdir(exist_ok=True)
            ARTIFACT.write_text(
                "# The OpenStack clients against coldferry's /v2.1\n\n"
                "Written by tests/functional/test_nova_clients.py: a controller over in-memory hosts "
                "host1..host3, served over TLS on 127.0.0.1 ($URL). The clients run with the README's "
                "environment:\n\n```sh\nexport OS_AUTH_TYPE=admin_token OS_TOKEN=... OS_ENDPOINT=$URL/v2.1 "
                "OS_CACERT=ca.pem\nexport OS_IDENTITY_API_VERSION=3 OS_IDENTITY_ENDPOINT_OVERRIDE=$OS_ENDPOINT\n"
                "export OS_PROJECT_ID=coldferry OS_AUTH_URL=http://127.0.0.1:9/unused   # nova only\n```\n\n"
                + "\n".join(c.log))


def test_hypervisor_list(cloud: Cloud) -> None:
    run = cloud.openstack("hypervisor", "list")
    assert run.returncode == 0, run.stderr
    assert all(h in run.stdout for h in ("host1", "host2", "host3", "QEMU")), run.stdout


def test_a_disabled_service_is_skipped_until_enabled(cloud: Cloud) -> None:
    run = cloud.openstack("compute", "service", "set", "--disable", "--disable-reason", "disk swap",
                          "host2", "nova-compute")
    assert run.returncode == 0, run.stderr
    host2 = cloud.env.conductor.store.get_host("host2")
    assert (host2.enabled, host2.disabled_reason) == (False, "disk swap")
    refused = cloud.openstack("server", "migrate", "--host", "host2", "web")
    assert refused.returncode != 0 and "400" in refused.stderr and "service_enabled" in refused.stderr
    assert cloud.migrations(WEB) == []
    run = cloud.openstack("compute", "service", "set", "--enable", "host2", "nova-compute")
    assert run.returncode == 0, run.stderr
    assert cloud.env.conductor.store.get_host("host2").enabled


def test_migrate_with_host_wait_list_and_confirm(cloud: Cloud) -> None:
    run = cloud.openstack("server", "migrate", "--host", "host2", "--wait", "web")
    assert run.returncode == 0 and "Complete" in run.stdout, run.stdout + run.stderr
    m = cloud.migrations(WEB)[0]
    assert (m.status, m.source_compute, m.dest_compute) == (MigrationStatus.FINISHED, "host1", "host2")
    cloud.note(m)
    listed = cloud.openstack("server", "migration", "list", "--server", "web")
    assert listed.returncode == 0 and m.uuid in listed.stdout and "finished" in listed.stdout, listed.stderr
    run = cloud.openstack("server", "migration", "confirm", "web")
    assert run.returncode == 0, run.stderr
    confirmed = cloud.env.wait(m.id, frozenset(records.FINAL))
    cloud.note(confirmed)
    assert confirmed.status == MigrationStatus.CONFIRMED
    assert cloud.env.where(WEB) == {"host2": int(PowerState.RUNNING)}


def test_migrate_then_revert(cloud: Cloud) -> None:
    run = cloud.openstack("server", "migrate", "--host", "host2", "db")
    assert run.returncode == 0, run.stderr
    finished = cloud.settled(DB)
    cloud.note(finished)
    assert finished.status == MigrationStatus.FINISHED
    run = cloud.openstack("server", "migration", "revert", "db")
    assert run.returncode == 0, run.stderr
    m = cloud.env.wait(cloud.migrations(DB)[0].id, frozenset(records.FINAL))
    cloud.note(m)
    assert m.status == MigrationStatus.REVERTED and cloud.env.where(DB) == {"host1": int(PowerState.SHUTDOWN)}


def test_nova_host_servers_migrate(cloud: Cloud) -> None:
    run = cloud.nova("host-servers-migrate", "host3")
    assert run.returncode == 0, run.stderr
    assert N1 in run.stdout and N2 in run.stdout and "True" in run.stdout, run.stdout
    for server in (N1, N2):
        m = cloud.settled(server)
        cloud.note(m)
        assert (m.status, m.source_compute) == (MigrationStatus.FINISHED, "host3"), m


@pytest.mark.skipif(importlib.util.find_spec("watcher") is None, reason="python-watcher is not installed")
def test_watcher_migrate_action(cloud: Cloud, tmp_path: Path) -> None:
    auth = f"auth_type = admin_token\nendpoint = {cloud.endpoint}\ntoken = {TOKEN}\ncafile = {cloud.ca}\n"
    conf = tmp_path / "watcher.conf"
    conf.write_text(f"[nova]\n{auth}migration_interval = 0.5\n")   # the README's, polling faster
    run = cloud.run([sys.executable, "-c", WATCHER, str(conf), BATCH, "host2", "host1"],
                    f"python -c WATCHER watcher.conf {BATCH} host2 host1  # Watcher's Migrate action, cold",
                    env=cloud._environ())
    assert run.returncode == 0 and "execute: True" in run.stdout, run.stdout + run.stderr
    m = cloud.migrations(BATCH)[0]
    cloud.note(m)
    assert (m.status, m.dest_compute) == (MigrationStatus.CONFIRMED, "host1")
    assert cloud.env.where(BATCH) == {"host1": int(PowerState.RUNNING)}
