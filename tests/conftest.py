from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.pgcluster import pg_cluster, pg_url  # noqa: F401 - fixtures: a private PostgreSQL
from tests.support.sshd import Sshd


def coldferry_command() -> list[str]:
    """The receiver command as the remote host runs it: this interpreter's coldferry."""
    exe = Path(sys.executable).with_name("coldferry")
    if exe.exists():
        return [str(exe), "receive"]
    return [sys.executable, "-m", "coldferry.cli", "receive"]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    """A real OpenSSH sshd on a random loopback port, with its own keys."""
    if not shutil.which("sshd") and not Path("/usr/sbin/sshd").exists():
        pytest.fail("sshd is not installed: run scripts/test, which installs openssh-server")
    server = Sshd.start(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()
