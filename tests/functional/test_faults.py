"""Issue 16's fault matrix: the whole stack on two lab hosts, one fault per test.

Each test makes one fault from outside (tests/support/faults.py: signals by pid, a link
down in a host's namespace, a tmpfs over a host's instances path, iptables in a host's
namespace) at a moment it sees from outside (a partial copy on the destination, a job
in an agent's /v1/jobs), then lets the controller end the migration and checks, again
from outside:

- with virsh on both hosts: the server runs on at most one host, and is defined on
  exactly the host the record names (in the power state it had), never on both;
- its disk holds the data it held (the digest of the disk file before and after);
- the API record ends in a final status, or in needs-recovery (the facts are unknown:
  then no second copy runs and the data is intact somewhere; recovery is asked for);
- the other host keeps nothing: no domain, no instance directory.

The servers are firmware-only domains (tests/support/blank.py) with 64 MiB of data:
they start at once and never answer ACPI, so a running one is powered off by force
after the driver's short shutdown timeout. Every copy is limited to 16 MiB/s, which
makes a copy take ~4 s to put faults into. One stack serves the module; every test
removes its domains and undoes its faults, also when it fails. The module writes
test-artifacts/fault-matrix.md: one row per fault with its outcome.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.config import ControllerConfig
from tests.support import faults
from tests.support.stack import Domain, Stack
from transfer.digest import file_digest

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
MATRIX_FILE = ARTIFACTS / "fault-matrix.md"
STACK_LOGS = ARTIFACTS / "stack-logs" / "faults"
MiB = 1 << 20
BWLIMIT = 16 * MiB
DATA_MIB = 64
SHUTDOWN_TIMEOUT = 4           # seconds a guest gets to power off before it is forced
AUTO_CONFIRM = 6               # seconds before a finished migration confirms itself
AGENT_LOST = 10                # seconds a host may be out of reach during a step
SOURCE, DEST = "host1", "host2"

RECOVERY = "needs-recovery"
FINAL = frozenset({"confirmed", "reverted", "completed", "error"})
SETTLED = FINAL | {"finished", RECOVERY}


def _controller_settings() -> dict[str, Any]:
    """Short limits for this stack, each only if this controller has the setting."""
    known = {f.name for f in dataclasses.fields(ControllerConfig)}
    wanted = {"auto_confirm_seconds": AUTO_CONFIRM, "poll_interval": 0.5, "agent_timeout": 5.0,
              "agent_retry_seconds": 5.0, "agent_lost_seconds": float(AGENT_LOST), "recovery_interval": 2.0}
    return {k: v for k, v in wanted.items() if k in known}


CONTROLLER_SETTINGS = _controller_settings()


# -- the fault matrix ----------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    """One fault's outcome, as the matrix shows it."""

    fault: str
    result: str = "fail"
    status: str = "-"
    home: str = "-"
    seconds: float = 0.0
    note: str = ""


@pytest.fixture(scope="module")
def matrix() -> Iterator[list[Row]]:
    rows: list[Row] = []
    yield rows
    _write_matrix(rows, MATRIX_FILE)


def _write_matrix(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Fault matrix (tests/functional/test_faults.py)", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {len(rows)} faults, "
             f"{sum(r.result == 'pass' for r in rows)} passed, {sum(r.seconds for r in rows):.0f} s in all.",
             f"Controller settings of the run: {CONTROLLER_SETTINGS}.", "",
             "| fault | result | final status | server ended on | seconds | note |",
             "|---|---|---|---|---:|---|"]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    for r in rows:
        lines.append(f"| {cell(r.fault)} | {r.result} | {r.status} | {cell(r.home)} | {r.seconds:.1f} | {cell(r.note)} |")
    path.write_text("\n".join(lines) + "\n")


def _failure_note(report: Any) -> str:
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    text = crash.message if crash is not None else str(getattr(report, "longrepr", ""))
    return text.strip().splitlines()[0][:300] if text.strip() else "failed"


# -- the stack ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Plain HTTP: held_job_replies() recognises the agent's replies in its traffic, which TLS would hide.
    with Stack.running(lab, tmp_path_factory.mktemp("faults"), STACK_LOGS, plain_http=True,
                       driver_settings={"transfer_bwlimit": BWLIMIT, "shutdown_timeout": SHUTDOWN_TIMEOUT,
                                        "shutdown_retry_interval": 2},
                       controller_settings=CONTROLLER_SETTINGS) as the_stack:
        yield the_stack


@pytest.fixture
def outcome(request: pytest.FixtureRequest, stack: Stack, matrix: list[Row]) -> Iterator[Row]:
    """The test's row of the matrix (its fault is the first line of its docstring); afterwards
    its result is filled in, its migrations out of needs-recovery are recovered, its domains
    removed and any fault it left undone."""
    fixed = faults.heal(stack)
    if fixed:
        log.warning("before %s: %s", request.node.name, "; ".join(fixed))
    doc = (request.node.function.__doc__ or request.node.name).strip().splitlines()[0]
    row = Row(fault=doc.rstrip("."))
    started = time.monotonic()
    yield row
    row.seconds = time.monotonic() - started
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.passed:
        row.result = "pass"
    else:
        row.result = "fail"
        row.note = (row.note + "; " if row.note else "") + (_failure_note(report) if report else "setup failed")
    matrix.append(row)
    try:
        faults.heal(stack)
        for dom in stack.domains:
            for m in stack.migrations(dom.uuid):
                if m["status"] == RECOVERY:
                    stack.cli("server", "migration", "recover", str(m["id"]), timeout=120)
    finally:
        stack.remove_domains()


# -- steps and checks ----------------------------------------------------------------------

def migrate(stack: Stack, dom: Domain, host: str = DEST, force: bool = False) -> int:
    reply = stack.api("POST", f"/v1/servers/{dom.uuid}/action", {"migrate": {"host": host, "force": force}})
    assert reply.status_code == 202, reply.text
    return reply.json()["migration"]["id"]


def settle(stack: Stack, mid: int, timeout: float = 90.0, recovery_grace: float = 30.0) -> dict[str, Any]:
    """Poll the record until it is finished, final or in needs-recovery; a needs-recovery
    record gets ``recovery_grace`` seconds to clear by itself (its hosts answer by now)."""
    deadline = time.monotonic() + timeout
    recovery_until: float | None = None
    while True:
        record = stack.migration(mid)
        status = record["status"]
        if status in SETTLED and status != RECOVERY:
            return record
        if status == RECOVERY:
            recovery_until = recovery_until or time.monotonic() + recovery_grace
            if time.monotonic() >= recovery_until:
                return record
        if time.monotonic() >= deadline:
            raise AssertionError(f"migration {mid} still {status} after {timeout:g} s: {record}")
        time.sleep(0.3)


def conclude(stack: Stack, mid: int, **kw: Any) -> dict[str, Any]:
    """Settle the migration; a finished one is confirmed (or auto-confirmed meanwhile)."""
    record = settle(stack, mid, **kw)
    if record["status"] == "finished":
        reply = stack.api("POST", f"/v1/os-migrations/{mid}/confirm")
        assert reply.is_success or reply.status_code == 409, reply.text
        record = settle(stack, mid)
    return record


def revert(stack: Stack, mid: int) -> None:
    reply = stack.api("POST", f"/v1/os-migrations/{mid}/revert")
    assert reply.is_success, reply.text


def digest(stack: Stack, dom: Domain, host: str = SOURCE, suffix: str = "") -> str:
    return file_digest(str(stack.nodes[host].dir(dom.uuid, suffix) / "disk"))


def dirs(stack: Stack, dom: Domain, host: str) -> list[str]:
    return sorted(p.name for p in stack.nodes[host].instances_dir.glob(f"{dom.uuid}*"))


def check_end(stack: Stack, dom: Domain, record: dict[str, Any], before: str, was_running: bool,
              row: Row, *, shared: bool = False) -> str:
    """The checks from outside every test ends with (see the module docstring); the host the
    server ended on. On shared storage both hosts see one directory, so only the domain's
    definition tells the hosts apart."""
    status = record["status"]
    row.status = status
    assert status in FINAL | {RECOVERY}, f"migration {record['id']} ended {status}: {record}"
    states = {h: stack.state(dom, h) for h in (SOURCE, DEST)}
    assert list(states.values()).count("running") <= 1, f"two running copies: {states}"
    if status == RECOVERY:
        return _check_unknown(stack, dom, record, before, states, row)
    home = DEST if status in ("confirmed", "completed") else SOURCE
    other = SOURCE if home == DEST else DEST
    row.home = home
    want = "running" if was_running else "shut off"
    assert (states[home], states[other]) == (want, "undefined"), \
        f"{status}: expected {want} on {home} and nothing on {other}, virsh says {states}; {record.get('error')}"
    assert dirs(stack, dom, home) == [dom.uuid], f"{home} holds {dirs(stack, dom, home)}"
    if not shared:
        assert dirs(stack, dom, other) == [], f"{other} still holds {dirs(stack, dom, other)}"
    assert digest(stack, dom, home) == before, f"the disk on {home} changed"
    listed = [s["host"] for s in stack.api_ok("GET", "/v1/servers")["servers"] if s["id"] == dom.uuid]
    assert listed == [home], f"the API lists the server on {listed}"
    return home


def _check_unknown(stack: Stack, dom: Domain, record: dict[str, Any], before: str, states: dict[str, str],
                   row: Row) -> str:
    """needs-recovery: no second running copy (checked already), and a copy with the data
    it had is kept somewhere."""
    kept = [f"{h}:{d}" for h in (SOURCE, DEST) for d in dirs(stack, dom, h)
            if (stack.nodes[h].dir(d) / "disk").exists() and file_digest(str(stack.nodes[h].dir(d) / "disk")) == before]
    assert kept, f"needs-recovery and no copy with the server's data is left: {states}"
    running = [h for h, s in states.items() if s == "running"]
    row.home = f"unknown (runs on {running[0]})" if running else "unknown"
    row.note = f"kept: {', '.join(kept)}"
    return row.home


# -- the faults ----------------------------------------------------------------------------

def mid_copy(stack: Stack, dom: Domain) -> None:
    """Wait until the copy to the destination has begun."""
    faults.wait_partial_copy(stack.nodes[DEST].dir(dom.uuid))


def in_finish(stack: Stack, dom: Domain) -> None:
    """Wait until the destination's finish job has begun."""
    faults.wait_agent_job(stack, DEST, "finish-migration", dom.uuid, timeout=90)


def migrate_through(stack: Stack, row: Row, when: Callable[[Stack, Domain], None], fault: Callable[[], Any],
                    running: bool = True) -> None:
    """Migrate a server of 64 MiB from host1 to host2, make ``fault`` once ``when`` has seen
    its moment, let the migration end, and check the end from outside."""
    dom = stack.define_blank(SOURCE, data_mib=DATA_MIB, start=running)
    before = digest(stack, dom)
    mid = migrate(stack, dom)
    when(stack, dom)
    made = fault()
    if made:
        row.note = str(made)
    check_end(stack, dom, conclude(stack, mid), before, running, row)


def kill_and_restart_agent(stack: Stack, host: str) -> Callable[[], None]:
    def fault() -> None:
        faults.kill_agent(stack, host)
        time.sleep(1)
        faults.restart_agent(stack, host)
    return fault


def test_source_agent_killed_mid_copy(stack: Stack, outcome: Row):
    """SIGKILL of the source agent mid-copy."""
    migrate_through(stack, outcome, mid_copy, kill_and_restart_agent(stack, SOURCE))


def test_destination_agent_killed_mid_copy(stack: Stack, outcome: Row):
    """SIGKILL of the destination agent mid-copy."""
    migrate_through(stack, outcome, mid_copy, kill_and_restart_agent(stack, DEST))


def test_destination_agent_killed_during_finish(stack: Stack, outcome: Row):
    """SIGKILL of the destination agent during finish."""
    migrate_through(stack, outcome, in_finish, kill_and_restart_agent(stack, DEST))


def test_receiver_killed_mid_copy(stack: Stack, outcome: Row):
    """The receiver (coldferry receive) on the destination killed mid-copy."""
    migrate_through(stack, outcome, mid_copy, lambda: f"killed pids {faults.kill_receivers(stack.lab.host(DEST))}",
                    running=False)


def test_destination_link_cut_for_5_s_mid_copy(stack: Stack, outcome: Row):
    """The destination's link cut for 5 s mid-copy."""
    migrate_through(stack, outcome, mid_copy, lambda: faults.cut_link(stack.lab.host(DEST), 5))


def test_frozen_destination_libvirtd(stack: Stack, outcome: Row):
    """The destination's libvirtd frozen (SIGSTOP) for 15 s from mid-copy on."""
    def freeze() -> None:
        with faults.frozen(faults.libvirtd(stack.lab, DEST), f"libvirtd of {DEST}"):
            time.sleep(15)
    migrate_through(stack, outcome, mid_copy, freeze)


def test_destination_out_of_reach_past_the_limit_during_finish(stack: Stack, outcome: Row):
    """The destination out of reach longer than the controller's agent limit during finish."""
    if "agent_lost_seconds" not in CONTROLLER_SETTINGS:
        pytest.fail("the controller has no agent_lost_seconds setting to shorten; its limit is fixed")
    # The limit, then the retries and one request's timeout to notice it, then some slack.
    bound = sum(CONTROLLER_SETTINGS.get(k, 0) for k in ("agent_lost_seconds", "agent_retry_seconds")) \
        + 2 * CONTROLLER_SETTINGS.get("agent_timeout", 10) + 10
    dom = stack.define_blank(SOURCE, data_mib=DATA_MIB, start=True)
    before = digest(stack, dom)
    mid = migrate(stack, dom)
    in_finish(stack, dom)
    seen: list[str] = []
    with faults.link_down(stack.lab.host(DEST)):
        cut = time.monotonic()
        while seen[-1:] != [RECOVERY] and time.monotonic() < cut + bound:
            status = stack.migration(mid)["status"]
            if seen[-1:] != [status]:
                seen.append(status)
            # The destination may be running it: the source must not start a second copy.
            assert stack.state(dom, SOURCE) != "running", f"the source started again while {DEST} was out " \
                                                          f"of reach; statuses {seen}"
            time.sleep(0.5)
        out_for = time.monotonic() - cut
    outcome.note = f"out of reach {out_for:.0f} s: " + " > ".join(seen)
    assert seen[-1] == RECOVERY, f"{DEST} out of reach for {out_for:.0f} s (limit {AGENT_LOST} s), " \
                                 f"yet the record went {seen}"
    record = conclude(stack, mid)
    outcome.note += f" > {record['status']}"
    check_end(stack, dom, record, before, True, outcome)
    assert record["status"] != RECOVERY, "needs-recovery did not clear once both hosts answered"


def test_full_destination_with_force(stack: Stack, outcome: Row):
    """A full destination (16 MiB free for 64 MiB of data), migration forced."""
    dom = stack.define_blank(SOURCE, data_mib=DATA_MIB, start=True)
    before = digest(stack, dom)
    with stack.small_disk(DEST, 96) as view:
        filler = faults.fill(view, leave_mib=16)
        mid = migrate(stack, dom, force=True)
        record = conclude(stack, mid)
        outcome.note = (record.get("error") or "")[:160]
        check_end(stack, dom, record, before, True, outcome)
        assert record["status"] == "error", record
        assert sorted(p.name for p in view.iterdir()) == [filler.name]


def test_destination_fills_up_mid_copy(stack: Stack, outcome: Row):
    """The destination's disk filled up mid-copy (forced migration)."""
    dom = stack.define_blank(SOURCE, data_mib=DATA_MIB, start=True)
    before = digest(stack, dom)
    with stack.small_disk(DEST, 96) as view:
        mid = migrate(stack, dom, force=True)
        faults.wait_partial_copy(stack.nodes[DEST].dir(dom.uuid))
        filler = faults.fill(view, leave_mib=1)
        record = conclude(stack, mid)
        outcome.note = (record.get("error") or "")[:160]
        check_end(stack, dom, record, before, True, outcome)
        assert sorted(p.name for p in view.iterdir()) == [filler.name]


def test_guest_ignoring_acpi(stack: Stack, outcome: Row):
    """A running guest that ignores ACPI (no ACPI at all): forced off after the timeout."""
    dom = stack.define_blank(SOURCE, data_mib=DATA_MIB, start=True, acpi=False)
    before = digest(stack, dom)
    started = time.monotonic()
    mid = migrate(stack, dom)
    record = settle(stack, mid)
    took = time.monotonic() - started
    assert record["status"] == "finished", record
    assert took >= SHUTDOWN_TIMEOUT, f"finished in {took:.1f} s, before the shutdown timeout"
    outcome.note = f"finished after {took:.1f} s (shutdown timeout {SHUTDOWN_TIMEOUT} s)"
    record = conclude(stack, mid)
    check_end(stack, dom, record, before, True, outcome)


def test_leftover_resize_directory(stack: Stack, outcome: Row):
    """A leftover <uuid>_resize directory on the source from an earlier failed try."""
    dom = stack.define_blank(SOURCE, data_mib=DATA_MIB)
    before = digest(stack, dom)
    faults.leave_resize_dir(stack.nodes[SOURCE].dir(dom.uuid))
    mid = migrate(stack, dom)
    record = conclude(stack, mid)
    check_end(stack, dom, record, before, False, outcome)


def kill_controller_between_start_and_record(stack: Stack, row: Row, host: str, op: str) -> None:
    """Migrate a running server, SIGKILL the controller once ``op`` has started on ``host``
    but before the controller learnt the job's id (the agent's answer is held back), start
    the controller again, and check the end and that ``op`` ran once."""
    dom = stack.define_blank(SOURCE, data_mib=DATA_MIB, start=True)
    before = digest(stack, dom)
    with faults.held_job_replies(stack.lab.host(host)):
        mid = migrate(stack, dom)
        faults.wait_agent_job(stack, host, op, dom.uuid, timeout=90)
        stack.kill_controller()
    stack.start_controller()
    record = conclude(stack, mid)
    jobs = [j for j in faults.agent_jobs(stack, host) or [] if (j["instance_uuid"], j["op"]) == (dom.uuid, op)]
    row.note = f"{len(jobs)} {op} job(s) on {host}"
    check_end(stack, dom, record, before, True, row)
    assert len(jobs) == 1, f"the restarted controller started {op} again: {jobs}"


def test_controller_killed_between_job_start_and_record(stack: Stack, outcome: Row):
    """The controller killed between the source job's start and its record."""
    kill_controller_between_start_and_record(stack, outcome, SOURCE, "migrate-disk-and-power-off")


def test_controller_killed_during_finish(stack: Stack, outcome: Row):
    """The controller killed during finish (between the destination job's start and its record)."""
    kill_controller_between_start_and_record(stack, outcome, DEST, "finish-migration")


def test_revert_on_shared_storage(stack: Stack, outcome: Row):
    """Revert on shared instance storage."""
    shared_round_trip(stack, outcome, "reverted")


def test_migrate_and_confirm_on_shared_storage(stack: Stack, outcome: Row):
    """Migrate and confirm on shared instance storage (no fault: the confirm must keep the one copy)."""
    shared_round_trip(stack, outcome, "confirmed")


def shared_round_trip(stack: Stack, outcome: Row, end: str) -> None:
    """Migrate a running server over shared storage, then revert or confirm it (``end``): nothing is
    copied, the one copy keeps its data, and the source's shared-storage marker is gone at the end."""
    with stack.shared_storage([SOURCE, DEST]):
        dom = stack.define_blank(SOURCE, data_mib=DATA_MIB, start=True)
        try:
            before = digest(stack, dom)
            mid = migrate(stack, dom)
            record = settle(stack, mid)
            assert record["status"] == "finished", record
            assert record["bytes_sent"] < MiB, f"{record['bytes_sent']} bytes copied onto shared storage"
            assert (stack.state(dom, SOURCE), stack.state(dom, DEST)) == ("shut off", "running")
            if end == "reverted":
                revert(stack, mid)
                record = settle(stack, mid)
            else:
                record = conclude(stack, mid)
            check_end(stack, dom, record, before, True, outcome, shared=True)
            assert record["status"] == end, record
            assert not (stack.nodes[DEST].dir(dom.uuid) / ".coldferry-shared").exists()
        finally:
            stack.remove_domain(dom)


def test_failed_finish_on_shared_storage(stack: Stack, outcome: Row):
    """A failed finish on shared instance storage (the destination lacks the guest's bridge)."""
    bridge = "cffault0"
    src = stack.lab.host(SOURCE)
    src.run(["ip", "link", "add", bridge, "type", "bridge"], check=True, timeout=20)
    try:
        src.run(["ip", "link", "set", bridge, "up"], check=True, timeout=20)
        with stack.shared_storage([SOURCE, DEST]):
            dom = stack.define_blank(SOURCE, data_mib=DATA_MIB, start=True, bridge=bridge)
            try:
                before = digest(stack, dom)
                mid = migrate(stack, dom)
                record = settle(stack, mid)
                outcome.note = (record.get("error") or "")[:160]
                check_end(stack, dom, record, before, True, outcome, shared=True)
                assert record["status"] == "error", record
            finally:
                stack.remove_domain(dom)
    finally:
        src.run(["ip", "link", "del", bridge], timeout=20)


def test_failed_revert_then_auto_confirm_window(stack: Stack, outcome: Row):
    """A failed revert (the destination's libvirtd dead), then the auto-confirm window passes."""
    dom = stack.define_blank(SOURCE, data_mib=DATA_MIB, start=True)
    before = digest(stack, dom)
    mid = migrate(stack, dom)
    record = settle(stack, mid)
    assert record["status"] == "finished", record
    faults.kill_libvirtd(stack.lab, DEST)
    try:
        revert(stack, mid)
        record = settle(stack, mid, recovery_grace=0)
        after_revert = record["status"]
        assert after_revert in ("finished", RECOVERY), record
        assert record.get("error"), f"the failed revert left no error: {record}"
        seen = {after_revert}
        deadline = time.monotonic() + AUTO_CONFIRM * 2.5
        while time.monotonic() < deadline:
            seen.add(stack.migration(mid)["status"])
            time.sleep(0.5)
        outcome.note = f"after the failed revert: {after_revert}; during the window: {sorted(seen)}"
        assert not seen & {"confirming", "confirmed"}, f"auto-confirm took a migration whose revert failed: {seen}"
        # Neither copy was removed meanwhile.
        assert stack.state(dom, SOURCE) == "shut off" and dirs(stack, dom, SOURCE) == [f"{dom.uuid}_resize"]
    finally:
        faults.restart_libvirtd(stack.lab, DEST)
    # The recovery pass may already be reverting (the destination's copy shutting down): where the
    # server ends is checked below, once the migration settles.
    record = settle(stack, mid)
    if record["status"] == "finished":
        revert(stack, mid)
        record = settle(stack, mid)
    check_end(stack, dom, record, before, True, outcome)
    assert record["status"] == "reverted", record


def test_controller_restart_in_the_middle_of_a_drain(stack: Stack, outcome: Row):
    """A controller restart in the middle of a drain (two servers, one at a time)."""
    doms = [stack.define_blank(SOURCE, name=f"drain-fault-{i}", data_mib=DATA_MIB) for i in range(2)]
    befores = [digest(stack, d) for d in doms]
    try:
        drain = stack.api_ok("POST", f"/v1/os-hypervisors/{SOURCE}/drain", {"max_servers": 1})
        faults.wait_until("a drain copy on the destination",
                          lambda: any(faults.partial_copy(stack.nodes[DEST].dir(d.uuid)) for d in doms), timeout=60)
        stack.kill_controller()
        stack.start_controller()

        def ended() -> dict[str, Any] | None:
            shown = stack.api_ok("GET", f"/v1/drains/{drain['id']}")
            return shown if shown["status"] == "done" else None
        done = faults.wait_until("the drain to end", ended, timeout=60, interval=0.5)
        outcome.note = "rows: " + ", ".join(f"{r['name']} {r['status']}" for r in done["rows"])
        assert [r["status"] for r in done["rows"]] == ["done", "done"], done
        homes = []
        for dom, before in zip(doms, befores):
            [m] = stack.migrations(dom.uuid)
            record = conclude(stack, m["id"])
            homes.append(check_end(stack, dom, record, before, False, outcome))
        outcome.home = ", ".join(homes)
        assert homes == [DEST, DEST]
    finally:
        stack.cli("host", "enable", SOURCE, timeout=60)

