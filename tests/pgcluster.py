"""A private PostgreSQL cluster for the tests: Debian's binaries, a directory of its own.

``initdb`` and ``pg_ctl`` from /usr/lib/postgresql/<version>/bin make and start a
cluster in a fresh temporary directory. It listens on a Unix socket in that directory
only (no TCP port), trusts whoever can reach the socket (the directory is its owner's
alone; root passes anyway) and runs with fsync off: it lives for one test session.
As root it runs as the system user ``coldferry-pg`` (made when missing), since
PostgreSQL refuses to run as root. It is stopped by its postmaster's pid, never by
name, and never touches the machine's own clusters.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

PG_ROOT = Path("/usr/lib/postgresql")
USER = "coldferry-pg"
SUPERUSER = "coldferry"
DATABASE = "postgres"


def pg_bin() -> Path:
    """The bin directory of the newest PostgreSQL installed. Raises RuntimeError when none is."""
    versions = sorted((p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists()),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not versions:
        raise RuntimeError(f"no PostgreSQL server under {PG_ROOT}: run scripts/install, "
                           "which installs Debian's postgresql package")
    return versions[-1]


def run_as() -> str | None:
    """The user the cluster runs as: ``coldferry-pg`` (made when missing) as root, else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(USER)
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                               "--shell", "/usr/sbin/nologin", USER], capture_output=True, text=True)
        if made.returncode not in (0, 9):  # 9: made meanwhile by a concurrent run
            raise RuntimeError(f"useradd {USER} failed: {made.stderr.strip()}")
    return USER


@dataclass
class PgCluster:
    """A running cluster in ``workdir`` (data/, the socket, postgres.log); ``stop()`` ends it."""

    workdir: Path
    user: str | None

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    @property
    def log(self) -> Path:
        return self.workdir / "postgres.log"

    @classmethod
    def start(cls, timeout: float = 30.0) -> "PgCluster":
        """initdb and start a cluster; raises RuntimeError (with the tail of its log) when either fails."""
        bindir = pg_bin()
        user = run_as()
        # Not under pytest's basetemp: that is root's alone (0700), and the cluster runs as another user.
        workdir = Path(tempfile.mkdtemp(prefix="coldferry-pg-"))
        if user is not None:
            shutil.chown(workdir, user)
        cluster = cls(workdir, user)
        try:
            cluster._run([str(bindir / "initdb"), "-D", str(cluster.data), "-U", SUPERUSER, "--auth=trust",
                          "--encoding=UTF8", "--locale=C", "--no-sync"], timeout)
            options = " ".join(f"-c {o}" for o in (
                "listen_addresses=''", f"unix_socket_directories='{workdir}'", "fsync=off",
                "synchronous_commit=off", "full_page_writes=off", "max_connections=60"))
            cluster._run([str(bindir / "pg_ctl"), "start", "-w", "-t", str(int(timeout)), "-D", str(cluster.data),
                          "-l", str(cluster.log), "-o", options], timeout + 5)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _run(self, argv: list[str], timeout: float) -> None:
        done = subprocess.run(argv, user=self.user, cwd=self.workdir, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
                               f"{' | log: ' + log if log else ''}")

    def url(self, schema: str | None = None) -> str:
        """The SQLAlchemy URL of the cluster's database over its socket; with ``schema``, one
        whose connections find (and create) tables in that schema alone."""
        url = sa.engine.URL.create("postgresql+psycopg", username=SUPERUSER, database=DATABASE,
                                   query={"host": str(self.workdir)})
        if schema is not None:
            url = url.update_query_dict({"options": f"-c search_path={schema}"})
        return url.render_as_string(hide_password=False)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 15.0) -> None:
        """Fast shutdown by the postmaster's pid (SIGINT; SIGKILL past ``timeout``), then remove the directory."""
        pid = self.postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
            # The postmaster removes its pid file last thing; its parent (pg_ctl, gone) cannot reap it.
            deadline = time.monotonic() + timeout
            while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            if (self.data / "postmaster.pid").exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.workdir, ignore_errors=True)

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """An empty database of its own for one test: its URL, whose connections see a schema
        made for the test alone (ten times quicker than CREATE DATABASE). Dropped afterwards."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=str(self.workdir), user=SUPERUSER, dbname=DATABASE, autocommit=True) as admin:
            admin.execute(f'CREATE SCHEMA "{name}"')
            try:
                yield self.url(name)
            finally:
                # A connection a test left inside a transaction would hold the drop up for good.
                admin.execute("SET lock_timeout = '10s'")
                admin.execute(f'DROP SCHEMA "{name}" CASCADE')


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """The session's PostgreSQL cluster, started on first use. A cluster that cannot start
    fails the tests that need it, with the reason: PostgreSQL is part of the default run."""
    failure = None
    try:
        cluster = PgCluster.start()
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        failure = f"cannot start a private PostgreSQL cluster: {e}"
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """The SQLAlchemy URL of a fresh database of the session's cluster, for this test alone."""
    with pg_cluster.database() as url:
        yield url
