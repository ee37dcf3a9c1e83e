"""Two ``coldferry controller`` processes on one PostgreSQL database, in front of real agents
on two lab hosts (docs/safety.md, "Several controllers").

Controller A (index 0) and controller B (index 1) share a fresh schema of the session's
private PostgreSQL cluster (tests/pgcluster.py), the agents and the API token; each has its
own port, configuration and log. Their leases last LEASE seconds, so a controller that dies
is replaced within seconds, and both run auto-confirm. Faults are made from outside (SIGKILL
of a controller by pid) and the end is checked from outside, as test_faults.py does: virsh
on both hosts, the disk's digest, the agents' job lists, the controllers' logs and the API
record.

The servers are firmware-only domains (tests/support/blank.py) with little data; every copy
is limited to BWLIMIT, so that a copy of DATA_MIB lasts long enough to kill a controller in.
After each test every controller runs again and its domains are gone.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.pgcluster import PgCluster
from tests.support import faults
from tests.support.stack import Domain, Stack
from transfer.digest import file_digest

REPO = Path(__file__).resolve().parents[2]
STACK_LOGS = REPO / "test-artifacts" / "stack-logs" / "controllers"
MiB = 1 << 20
A, B = 0, 1
SOURCE, DEST = "host1", "host2"
LEASE = 6.0            # seconds a controller's claim holds without renewal
AUTO_CONFIRM = 3       # seconds before a finished migration confirms itself
BWLIMIT = 16 * MiB     # every copy's rate
DATA_MIB = 48          # the killed copies' data: ~3 s at BWLIMIT
# A dead controller's migrations are claimed at most 1.25 lease times after its last renewal
# (service.py); the rest of the copy, the finish on the destination and polling fit in MARGIN.
MARGIN = 30.0
FINAL = frozenset({"confirmed", "reverted", "error"})


@pytest.fixture(scope="module")
def stack(lab, pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with pg_cluster.database() as url:
        with Stack.running(lab, tmp_path_factory.mktemp("controllers"), STACK_LOGS, controllers=2, database=url,
                           driver_settings={"transfer_bwlimit": BWLIMIT, "shutdown_timeout": 2,
                                            "shutdown_retry_interval": 1},
                           controller_settings={"lease_seconds": LEASE, "auto_confirm_seconds": AUTO_CONFIRM,
                                                "poll_interval": 0.3}) as the_stack:
            yield the_stack


@pytest.fixture(autouse=True)
def clean(stack: Stack) -> Iterator[None]:
    yield
    try:
        for index in (A, B):
            proc = stack.controllers.get(index)
            if proc is None or not proc.alive():
                stack.start_controller(index)
        stack.cli("host", "enable", SOURCE, timeout=60)
    finally:
        stack.remove_domains()


# -- checks from outside --------------------------------------------------------------------

def digest(stack: Stack, dom: Domain, host: str = SOURCE) -> str:
    return file_digest(str(stack.nodes[host].dir(dom.uuid) / "disk"))


def settle(stack: Stack, mid: int, timeout: float, controller: int = B) -> dict[str, Any]:
    """Poll the record (through ``controller``) until it is final; the record."""
    deadline = time.monotonic() + timeout
    while True:
        record = stack.migration(mid, controller=controller)
        if record["status"] in FINAL:
            return record
        assert time.monotonic() < deadline, f"migration {mid} still {record['status']} after {timeout:g} s: {record}"
        time.sleep(0.3)


def check_end(stack: Stack, dom: Domain, record: dict[str, Any], before: str, was_running: bool) -> str:
    """The server is on exactly the host its final record names, in the power state it had, with
    the data it had, and the other host keeps nothing of it; that host."""
    assert record["status"] in FINAL, record
    home = DEST if record["status"] == "confirmed" else SOURCE
    other = SOURCE if home == DEST else DEST
    want = "running" if was_running else "shut off"
    states = {h: stack.state(dom, h) for h in (SOURCE, DEST)}
    assert (states[home], states[other]) == (want, "undefined"), \
        f"{record['status']}: expected {want} on {home} and nothing on {other}, virsh says {states}"
    assert stack.where(dom) == {home: {"state": want, "dirs": [dom.uuid]}}, stack.where(dom)
    assert digest(stack, dom, home) == before, f"the disk on {home} changed"
    for controller in (i for i, proc in stack.controllers.items() if proc.alive()):
        listed = [s["host"] for s in stack.api_ok("GET", "/v1/servers", controller=controller)["servers"]
                  if s["id"] == dom.uuid]
        assert listed == [home], f"controller {controller} lists the server on {listed}"
    return home


def jobs_of(stack: Stack, host: str, dom: Domain, op: str) -> list[dict[str, Any]]:
    listed = faults.agent_jobs(stack, host)
    assert listed is not None, f"the agent of {host} does not answer"
    return [j for j in listed if (j["instance_uuid"], j["op"]) == (dom.uuid, op)]


def log_text(stack: Stack, index: int) -> str:
    return stack.controller_log(index).read_text(errors="replace")


def lease_owner_of(stack: Stack, index: int) -> str:
    """The fragment every lease owner of controller ``index``'s current process carries: its pid
    (records.controller_id: host name, pid, a random part)."""
    proc = stack.controllers[index]
    return f"-{proc.popen.pid}-"


def took_over(migration_id: int, status: str = "[a-z-]+") -> str:
    """The line a controller logs when it takes over a migration no live controller holds
    (Conductor.reconcile); its group ``owner`` names the holder whose lease ran out, when the
    line names one."""
    return (rf"migration {migration_id} is {status} and no controller drives it "
            rf"\((?:the lease of (?P<owner>\S+) ran out|released)\); driving it here")


def check_owner(found: re.Match[str], owner: str) -> None:
    """A takeover line that names the previous holder names ``owner`` (controller A's process)."""
    assert found["owner"] is None or owner in found["owner"], found[0]


def wait_log(stack: Stack, index: int, pattern: str, timeout: float) -> re.Match[str]:
    return faults.wait_until(f"{pattern!r} in {stack.controller_log(index)}",
                             lambda: re.search(pattern, log_text(stack, index)), timeout, interval=0.2)


def migrate(stack: Stack, dom: Domain, controller: int) -> httpx.Response:
    return stack.api("POST", f"/v1/servers/{dom.uuid}/action", {"migrate": {"host": DEST, "force": False}},
                     controller=controller)


# -- the cases -------------------------------------------------------------------------------

def test_both_controllers_asked_at_once_migrate_the_server_once(stack: Stack):
    dom = stack.define_blank(SOURCE, data_mib=4, start=True)
    before = digest(stack, dom)
    barrier = threading.Barrier(2)
    replies: dict[int, httpx.Response] = {}

    def ask(index: int) -> None:
        barrier.wait(10)
        replies[index] = migrate(stack, dom, index)

    threads = [threading.Thread(target=ask, args=(i,)) for i in (A, B)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.status_code for r in replies.values()) == [202, 409], \
        {i: (r.status_code, r.text) for i, r in replies.items()}
    [winner] = [i for i, r in replies.items() if r.status_code == 202]
    loser = replies[1 - winner]
    assert "migration" in loser.json()["detail"], loser.text
    mid = replies[winner].json()["migration"]["id"]

    for controller in (A, B):
        assert [m["id"] for m in stack.migrations(dom.uuid, controller=controller)] == [mid]
    record = settle(stack, mid, timeout=90, controller=1 - winner)
    assert record["status"] == "confirmed", record
    check_end(stack, dom, record, before, was_running=True)
    assert len(jobs_of(stack, SOURCE, dom, "migrate-disk-and-power-off")) == 1
    assert len(jobs_of(stack, DEST, dom, "finish-migration")) == 1


def test_a_killed_mid_copy_b_takes_the_migration_over(stack: Stack):
    dom = stack.define_blank(SOURCE, data_mib=DATA_MIB, start=True)
    before = digest(stack, dom)
    reply = migrate(stack, dom, A)
    assert reply.status_code == 202, reply.text
    mid = reply.json()["migration"]["id"]
    a_owner = lease_owner_of(stack, A)
    faults.wait_partial_copy(stack.nodes[DEST].dir(dom.uuid))
    stack.kill_controller(A)
    killed = time.monotonic()

    taken = wait_log(stack, B, took_over(mid, "migrating"), timeout=1.25 * LEASE + MARGIN)
    taken_after = time.monotonic() - killed
    check_owner(taken, a_owner)
    assert re.search(rf"migration {mid}: \S+ {dom.uuid} from {SOURCE} to {DEST}", log_text(stack, A)), \
        "A's log does not show A starting the migration"
    record = settle(stack, mid, timeout=1.25 * LEASE + MARGIN - taken_after)
    settled_after = time.monotonic() - killed
    assert taken_after <= 1.25 * LEASE + 10, f"B took over {taken_after:.1f} s after the kill: {taken[0]}"
    assert settled_after <= 1.25 * LEASE + MARGIN, settled_after
    check_end(stack, dom, record, before, was_running=True)
    # B found A's copy job by its name and waited for it: one copy, never a second one.
    assert len(jobs_of(stack, SOURCE, dom, "migrate-disk-and-power-off")) == 1
    if record["status"] == "confirmed":
        assert record["bytes_sent"] >= DATA_MIB * MiB, record
        assert len(jobs_of(stack, SOURCE, dom, "confirm-migration")) == 1


def test_auto_confirm_on_both_confirms_each_migration_once(stack: Stack):
    doms = [stack.define_blank(SOURCE, name=f"twice-{i}", data_mib=2) for i in range(4)]
    befores = [digest(stack, d) for d in doms]
    # Half started through each controller: each auto-confirm pass sees records of both.
    mids = []
    for i, dom in enumerate(doms):
        reply = migrate(stack, dom, i % 2)
        assert reply.status_code == 202, reply.text
        mids.append(reply.json()["migration"]["id"])
    records = [settle(stack, mid, timeout=90) for mid in mids]
    assert [r["status"] for r in records] == ["confirmed"] * 4, records
    for dom, record, before in zip(doms, records, befores):
        check_end(stack, dom, record, before, was_running=False)
        assert len(jobs_of(stack, SOURCE, dom, "confirm-migration")) == 1, jobs_of(stack, SOURCE, dom,
                                                                                 "confirm-migration")
    # Each controller logs the migrations its auto-confirm pass confirmed: no id twice.
    confirmed: list[int] = []
    for index in (A, B):
        for listed in re.findall(r"auto-confirm: migrations \[([\d, ]+)\]", log_text(stack, index)):
            confirmed += [int(x) for x in listed.split(",")]
    assert sorted(x for x in confirmed if x in mids) == sorted(mids), confirmed


def test_a_drain_started_on_a_is_finished_by_b_after_a_dies(stack: Stack):
    doms = [stack.define_blank(SOURCE, name=f"drain-ha-{i}", data_mib=DATA_MIB // 2) for i in range(3)]
    befores = [digest(stack, d) for d in doms]
    drain = stack.api_ok("POST", f"/v1/os-hypervisors/{SOURCE}/drain", {"max_servers": 1}, controller=A)
    assert drain["status"] == "running" and len(drain["rows"]) == 3, drain
    copying = faults.wait_until(
        "a drain copy on the destination",
        lambda: next((d for d in doms if faults.partial_copy(stack.nodes[DEST].dir(d.uuid))), None), timeout=60)
    a_owner = lease_owner_of(stack, A)
    stack.kill_controller(A)
    wait_log(stack, B, rf"drain {drain['id']} of {SOURCE} is running and no controller runs it; running it here",
             timeout=1.25 * LEASE + MARGIN)

    def ended() -> dict[str, Any] | None:
        shown = stack.api_ok("GET", f"/v1/drains/{drain['id']}", controller=B)
        return shown if shown["status"] == "done" else None
    done = faults.wait_until("the drain to end", ended, timeout=90, interval=0.5)
    assert [r["status"] for r in done["rows"]] == ["done"] * 3, done
    assert done["error"] is None, done
    # The migration A was copying when it died went on under B.
    [cut] = stack.migrations(copying.uuid, controller=B)
    taken = re.search(took_over(cut["id"]), log_text(stack, B))
    assert taken, f"B's log does not show B taking migration {cut['id']} over from A"
    check_owner(taken, a_owner)
    for dom, before in zip(doms, befores):
        [m] = stack.migrations(dom.uuid, controller=B)
        record = settle(stack, m["id"], timeout=60)
        assert record["status"] == "confirmed", record
        check_end(stack, dom, record, before, was_running=False)
        assert len(jobs_of(stack, SOURCE, dom, "migrate-disk-and-power-off")) == 1
