"""``openstack server migrate --host … --wait`` moves a real guest between two lab hosts.

The stack is the real one (tests/support/stack.py): an agent inside each lab host, the
controller beside them over TLS; the ``openstack`` command talks to its /v2.1 with the
README's environment (admin_token, the controller's token, the stack's CA). The command
and its output go to test-artifacts/nova-lab.md.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import guest
from tests.support.stack import Stack

REPO = Path(__file__).resolve().parents[2]
STACK_LOGS = REPO / "test-artifacts" / "stack-logs"
ARTIFACT = REPO / "test-artifacts" / "nova-lab.md"
OPENSTACK = Path(sys.executable).parent / "openstack"

pytestmark = pytest.mark.skipif(not OPENSTACK.exists(), reason="python-openstackclient is not installed: "
                                                                "pip install -e '.[nova-clients]'")


def openstack(stack: Stack, log: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    """``openstack ARGS`` against the stack's /v2.1; the command and its output go to ``log``."""
    endpoint = f"{stack.url}/v2.1"
    env = {"PATH": os.environ["PATH"], "HOME": str(stack.workdir), "OS_AUTH_TYPE": "admin_token",
           "OS_TOKEN": stack.token, "OS_ENDPOINT": endpoint, "OS_CACERT": str(stack.ca_file),
           "OS_IDENTITY_API_VERSION": "3", "OS_IDENTITY_ENDPOINT_OVERRIDE": endpoint}
    t0 = time.monotonic()
    run = subprocess.run([str(OPENSTACK), *args], env=env, capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)
    out = (run.stdout + run.stderr).replace(stack.token, "$OS_TOKEN").rstrip()
    log.append(f"```console\n$ {shlex.join(['openstack', *args])}\n{out}\n"
               f"# exit {run.returncode}, {time.monotonic() - t0:.1f} s\n```\n")
    return run


def test_openstack_server_migrate_moves_a_real_guest(lab, tmp_path_factory: pytest.TempPathFactory) -> None:
    log: list[str] = []
    try:
        with Stack.running(lab, tmp_path_factory.mktemp("nova-lab"), STACK_LOGS) as stack:
            dom = stack.define_domain("host1", mode="write", start=True)
            guest.wait_for(stack.console(dom, "host1"), r"CFGUEST ready", timeout=180)

            run = openstack(stack, log, "server", "migrate", "--host", "host2", "--wait", dom.name)
            assert run.returncode == 0 and "Complete" in run.stdout, run.stdout + run.stderr
            server = stack.server(dom.uuid)
            assert (server["host"], server["status"]) == ("host2", "VERIFY_RESIZE")
            assert stack.state(dom, "host1") == "shut off"   # the source keeps its copy until confirmed

            run = openstack(stack, log, "server", "migration", "list", "--server", dom.name)
            assert run.returncode == 0 and "finished" in run.stdout, run.stdout + run.stderr
            run = openstack(stack, log, "server", "migration", "confirm", dom.name)
            assert run.returncode == 0, run.stdout + run.stderr
            stack.wait_migration(server["migration_id"], {"confirmed"}, timeout=120)
            assert stack.where(dom) == {"host2": {"state": "running", "dirs": [dom.uuid]}}
            guest.wait_for(stack.console(dom, "host2"), r"CFGUEST verify ok 1", timeout=120)
    finally:
        ARTIFACT.parent.mkdir(exist_ok=True)
        ARTIFACT.write_text("# `openstack` against coldferry's /v2.1 on two lab hosts\n\n"
                            "Written by tests/functional/test_nova_lab.py: a real guest, the real stack "
                            "over TLS.\n\n" + "\n".join(log))
