"""The whole stack end to end on two lab hosts: an agent inside each host, the controller
beside them, and the operator's ``coldferry`` command (or plain HTTP) in front.

Every migration here is the real thing: the controller drives the agents, the source
agent shuts the guest down and copies its disk over SSH to the other host, the
destination agent defines and starts it. One stack serves the module; every test
removes the domains it made (the ``clean`` fixture), so tests do not see each other's
servers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import guest
from tests.support.stack import Domain, Stack
from transfer.digest import file_digest

REPO = Path(__file__).resolve().parents[2]
STACK_LOGS = REPO / "test-artifacts" / "stack-logs"
MiB = 1 << 20
# Every copy is limited to this rate, so that the copy of test_controller_killed_mid_copy
# (128 MiB of data) takes ~8 s; the other disks hold next to no data.
BWLIMIT = 16 * MiB


@pytest.fixture(scope="module")
def stack(lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    the_stack = Stack.up(lab, tmp_path_factory.mktemp("stack"), driver_settings={"transfer_bwlimit": BWLIMIT})
    try:
        yield the_stack
    finally:
        try:
            the_stack.collect_logs(STACK_LOGS)
        finally:
            the_stack.down()


@pytest.fixture(autouse=True)
def clean(stack: Stack) -> Iterator[None]:
    yield
    stack.remove_domains()


def wait_ready(stack: Stack, dom: Domain, host: str = "host1") -> None:
    """Wait until the test guest has booted and checked its disk (it then powers off cleanly)."""
    guest.wait_for(stack.console(dom, host), r"CFGUEST ready", timeout=180)


def output(run) -> str:
    return run.stdout + run.stderr


def confirm(stack: Stack, migration_id: int) -> dict:
    run = stack.cli("server", "migration", "confirm", str(migration_id))
    assert run.returncode == 0, output(run)
    return stack.wait_migration(migration_id, {"confirmed"}, timeout=60)


def test_guest_migrates_to_the_named_host_and_is_confirmed(stack: Stack):
    dom = stack.define_domain("host1", mode="write", start=True)
    wait_ready(stack, dom)
    before = stack.server(dom.name)
    assert (before["host"], before["status"]) == ("host1", "ACTIVE")

    run = stack.cli("server", "migrate", "--host", "host2", "--wait", dom.name)
    assert run.returncode == 0, output(run)
    assert "finished" in run.stdout
    server = stack.server(dom.uuid)
    assert (server["host"], server["status"], server["task_state"]) == ("host2", "VERIFY_RESIZE", None)
    mid = server["migration_id"]
    assert mid is not None
    # Until confirmed the source keeps its copy (shut off, under *_resize).
    assert stack.state(dom, "host1") == "shut off"
    kept = stack.nodes["host1"].dir(dom.uuid, "_resize") / "disk"
    assert "poweroff" in guest.console_lines(kept.parent / "console.log")  # clean ACPI shutdown

    listed = stack.cli_json("server", "migration", "list", "--server", dom.name)
    [record] = [m for m in listed if m["id"] == mid]
    assert (record["status"], record["source_compute"], record["dest_compute"], record["migration_type"]) == \
        ("finished", "host1", "host2", "migration")
    assert record["dest_address"] == stack.lab.host("host2").ip
    assert not record["forced"] and record["old_power_state"] == 1
    assert 0 < record["bytes_sent"] < 4 * MiB            # a few records, not the 64 MiB disk
    assert record["bytes_skipped"] >= 60 * MiB           # holes were never sent
    assert file_digest(str(kept)) in record["digests"]   # the digest both ends agreed on is the source's
    assert record["downtime_s"] is not None and 0 < record["downtime_s"] < 120
    check_timeline(stack, mid, record["downtime_s"])

    confirmed = confirm(stack, mid)
    assert confirmed["task_state"] is None
    assert stack.where(dom) == {"host2": {"state": "running", "dirs": [dom.uuid]}}
    guest.wait_for(stack.console(dom, "host2"), r"CFGUEST verify ok 1", timeout=120)
    guest.wait_for(stack.console(dom, "host2"), r"CFGUEST wrote 1", timeout=60)
    records = guest.records_on_disk(stack.nodes["host2"].dir(dom.uuid) / "disk")
    assert [r.ok for r in records] == [True, True]
    assert records[0].boot_id != records[1].boot_id      # one written on host1, one on host2
    after = stack.server(dom.name)
    assert (after["host"], after["status"], after["migration_id"]) == ("host2", "ACTIVE", None)
    check_metrics(stack, confirmed)


def scrape(stack: Stack, url: str, token: str) -> dict[tuple[str, tuple], float]:
    """``GET url/metrics`` over the stack's TLS with ``token``, read with prometheus-client's parser."""
    with httpx.Client(verify=stack.ssl_context(), trust_env=False, timeout=10) as client:
        assert client.get(f"{url}/metrics").status_code == 401
        r = client.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return {(x.name, tuple(sorted(x.labels.items()))): x.value
            for family in text_string_to_metric_families(r.text) for x in family.samples}


def check_metrics(stack: Stack, record: dict) -> None:
    """The real processes' /metrics count the migration: the source agent's copy bytes match the
    record's, the destination agent's define, the controller's confirmed record and downtime."""
    source = scrape(stack, stack.agent_url("host1"), stack.agent_token)
    op = (("op", "migrate-disk-and-power-off"),)
    assert source[("coldferry_agent_jobs_total", op + (("state", "done"),))] >= 1
    assert source[("coldferry_agent_copy_bytes_total", (("kind", "sent"),))] >= record["bytes_sent"] > 0
    assert source[("coldferry_agent_phase_seconds_count", op + (("phase", "shutdown"),))] >= 1
    assert source[("coldferry_agent_copies_in_flight", ())] == 0
    dest = scrape(stack, stack.agent_url("host2"), stack.agent_token)
    assert dest[("coldferry_agent_phase_seconds_count", (("op", "finish-migration"), ("phase", "define")))] >= 1
    ctl = scrape(stack, stack.url, stack.token)
    kind = (("status", "confirmed"), ("type", "migration"))
    assert ctl[("coldferry_migrations", kind)] >= 1
    assert ctl[("coldferry_migrations_ended_total", kind)] >= 1
    assert ctl[("coldferry_migration_downtime_seconds_count", (("type", "migration"),))] >= 1


def check_timeline(stack: Stack, mid: int, downtime_s: float) -> None:
    """The real migration's timeline: host1 shut the guest down and copied its disk, host2 defined
    and started it, in that order, inside the jobs the controller waited for; the CLI shows it."""
    shown = stack.cli_json("server", "migration", "show", str(mid))["timeline"]
    phases = {(p["phase"], p["detail"]): p for p in shown}
    assert list(phases)[:2] == [("scheduled", ""), ("source_job", "migrate-disk-and-power-off")]
    for p in shown:
        assert p["start"] <= p["end"] and abs(p["seconds"] - (p["end"] - p["start"])) < 1e-5, p
        assert (p["host"] == "") == (p["phase"] == "scheduled"), p   # the controller's own phase has no host
    hosts = {name: phases[name]["host"] for name in phases}
    assert hosts[("shutdown", "")] == hosts[("copy", "disk")] == hosts[("copy", "domain.xml")] == "host1"
    assert hosts[("define", "")] == hosts[("start", "")] == "host2"
    order = [phases[k] for k in (("scheduled", ""), ("shutdown", ""), ("copy", "disk"), ("define", ""),
                                 ("start", ""))]
    assert all(a["end"] <= b["start"] for a, b in zip(order, order[1:])), order
    source, dest = phases[("source_job", "migrate-disk-and-power-off")], phases[("dest_job", "finish-migration")]
    for name in (("shutdown", ""), ("copy", "disk")):
        assert source["start"] <= phases[name]["start"] <= phases[name]["end"] <= source["end"]
    for name in (("define", ""), ("start", "")):
        assert dest["start"] <= phases[name]["start"] <= phases[name]["end"] <= dest["end"]
    # The guest shuts down cleanly (well inside the lab's shutdown timeout) and boots; the disk holds
    # a few records, at most 16 MiB/s (BWLIMIT).
    assert 0 < phases[("shutdown", "")]["seconds"] < 120 and 0 < phases[("copy", "disk")]["seconds"] < 60
    # The record's downtime runs from the power-off to the guest running: the shutdown's end to the start's.
    assert abs((phases[("start", "")]["end"] - phases[("shutdown", "")]["end"]) - downtime_s) < 0.5
    run = stack.cli("server", "migration", "show", str(mid))
    assert run.returncode == 0, output(run)
    assert "Timeline from" in run.stdout and "copying" in run.stdout


def test_scheduler_picks_the_other_host(stack: Stack):
    dom = stack.define_domain("host2", disk_format="qcow2")   # shut off
    run = stack.cli("server", "migrate", "--wait", dom.name)
    assert run.returncode == 0, output(run)
    server = stack.server(dom.uuid)
    assert (server["host"], server["status"]) == ("host1", "VERIFY_RESIZE")
    record = stack.migration(server["migration_id"])
    assert (record["source_compute"], record["dest_compute"], record["forced"]) == ("host2", "host1", False)
    confirm(stack, record["id"])
    # It was shut off and stays shut off; it exists on host1 only.
    assert stack.where(dom) == {"host1": {"state": "shut off", "dirs": [dom.uuid]}}
    assert stack.server(dom.uuid)["status"] == "SHUTOFF"


def test_disabled_host_is_refused_unless_forced(stack: Stack):
    dom = stack.define_domain("host1")
    stack.cli("host", "disable", "--reason", "disk replacement", "host2", check=True)
    try:
        host2 = stack.cli_json("host", "show", "host2")
        assert (host2["status"], host2["disabled_reason"]) == ("disabled", "disk replacement")

        refused = stack.cli("server", "migrate", "--host", "host2", dom.name)
        assert refused.returncode == 1, output(refused)
        assert "service_enabled" in output(refused)
        assert stack.migrations(dom.uuid) == []          # nothing was started
        assert stack.where(dom) == {"host1": {"state": "shut off", "dirs": [dom.uuid]}}

        check = stack.cli("host", "check-destination", dom.name, "host2")
        assert check.returncode == 1, output(check)
        assert "service_enabled" in check.stdout
        checked = json.loads(stack.cli("host", "check-destination", dom.name, "host2", "-f", "json").stdout)
        assert (checked["passes"], checked["failed"]) == (False, "service_enabled")
        rule = next(r for r in checked["rules"] if r["name"] == "service_enabled")
        assert rule["passed"] is False and rule["reason"]

        forced = stack.cli("server", "migrate", "--host", "host2", "--force", "--wait", dom.name)
        assert forced.returncode == 0, output(forced)
        server = stack.server(dom.uuid)
        assert (server["host"], server["status"]) == ("host2", "VERIFY_RESIZE")
        assert stack.migration(server["migration_id"])["forced"] is True
        confirm(stack, server["migration_id"])
        assert stack.where(dom) == {"host2": {"state": "shut off", "dirs": [dom.uuid]}}
    finally:
        stack.cli("host", "enable", "host2", check=True)
    assert stack.cli_json("host", "show", "host2")["status"] == "enabled"


def test_revert_brings_the_server_back_running_on_the_source(stack: Stack):
    dom = stack.define_domain("host1", start=True)   # check mode: the guest never writes its disk
    wait_ready(stack, dom)
    run = stack.cli("server", "migrate", "--host", "host2", "--wait", dom.name)
    assert run.returncode == 0, output(run)
    assert stack.state(dom, "host2") == "running"
    mid = stack.server(dom.uuid)["migration_id"]
    before = file_digest(str(stack.nodes["host1"].dir(dom.uuid, "_resize") / "disk"))

    run = stack.cli("server", "migration", "revert", dom.name)
    assert run.returncode == 0, output(run)
    record = stack.wait_migration(mid, {"reverted"}, timeout=120)
    assert record["task_state"] is None
    assert stack.where(dom) == {"host1": {"state": "running", "dirs": [dom.uuid]}}   # nothing on host2
    assert file_digest(str(stack.nodes["host1"].dir(dom.uuid) / "disk")) == before
    server = stack.server(dom.uuid)
    assert (server["host"], server["status"], server["migration_id"]) == ("host1", "ACTIVE", None)


def test_drain_moves_running_and_shut_off_servers_and_names_the_paused_one(stack: Stack):
    running = stack.define_domain("host1", name="drain-running", start=True)
    shut_off = stack.define_domain("host1", name="drain-shutoff")
    paused = stack.define_domain("host1", name="drain-paused", start=True)
    assert stack.virsh("host1", "suspend", paused.uuid).returncode == 0
    wait_ready(stack, running)
    assert stack.state(paused, "host1") == "paused"
    try:
        run = stack.cli("host", "drain", "--max-servers", "2", "--wait", "host1", timeout=300)
        assert run.returncode == 1, output(run)   # one server could not move
        for name in ("drain-running", "drain-shutoff", "drain-paused"):
            assert name in run.stdout
        assert "paused" in run.stdout

        drain = next(d for d in stack.api_ok("GET", "/v1/drains")["drains"] if d["host"] == "host1")
        assert drain["status"] == "done"
        rows = {r["name"]: r for r in drain["rows"]}
        assert (rows["drain-running"]["status"], rows["drain-running"]["state_before"]) == ("done", "running")
        assert rows["drain-running"]["migration_type"] == "migration"
        assert (rows["drain-shutoff"]["status"], rows["drain-shutoff"]["state_before"]) == ("done", "shutdown")
        assert rows["drain-paused"]["status"] == "error" and "paused" in rows["drain-paused"]["error"]
        assert drain["totals"]["done"] == 2 and drain["totals"]["error"] == 1

        host1 = stack.cli_json("host", "show", "host1")
        assert host1["status"] == "disabled" and host1["disabled_reason"]
        assert stack.state(running, "host2") == "running"
        assert stack.state(shut_off, "host2") == "shut off"
        assert stack.where(paused) == {"host1": {"state": "paused", "dirs": [paused.uuid]}}
        for dom in (running, shut_off):
            assert stack.server(dom.uuid)["status"] == "VERIFY_RESIZE"
    finally:
        stack.cli("host", "enable", "host1", check=True)


def test_controller_killed_mid_copy_and_restarted_never_loses_the_server(stack: Stack):
    # 128 MiB of data at 16 MiB/s: a copy of ~8 s to kill the controller in.
    dom = stack.define_domain("host1", disk_mib=256, data=[(64, 128)])
    before = file_digest(str(stack.nodes["host1"].dir(dom.uuid) / "disk"))
    reply = stack.api("POST", f"/v1/servers/{dom.uuid}/action", {"migrate": {"host": "host2", "force": False}})
    assert reply.status_code == 202, reply.text
    mid = reply.json()["migration"]["id"]

    deadline = time.monotonic() + 60
    seen = []
    while True:
        record = stack.migration(mid)
        progress = record["progress"]
        seen.append((round(time.monotonic(), 1), record["status"], progress and progress["done"]))
        if record["status"] == "migrating" and progress and 0 < progress["done"] < progress["total"]:
            break
        assert record["status"] in ("pre-migrating", "migrating"), seen
        assert time.monotonic() < deadline, f"no copy progress within 60 s: {seen}"
        time.sleep(0.1)
    stack.kill_controller()
    stack.start_controller()

    record = stack.wait_migration(mid, {"finished", "error"}, timeout=180)
    if record["status"] == "finished":
        confirm(stack, mid)
        home = "host2"
    else:   # rolled back: the source has the server again, as it was
        home = "host1"
    assert stack.where(dom) == {home: {"state": "shut off", "dirs": [dom.uuid]}}
    assert file_digest(str(stack.nodes[home].dir(dom.uuid) / "disk")) == before
    listed = [s for s in stack.api_ok("GET", "/v1/servers")["servers"] if s["id"] == dom.uuid]
    assert [s["host"] for s in listed] == [home]
    # The copy itself ran in the agent, untouched by the restart.
    assert record["status"] == "error" or record["bytes_sent"] >= 128 * MiB


def test_bad_migrate_requests_get_clear_http_errors(stack: Stack):
    dom = stack.define_domain("host1")
    paused = stack.define_domain("host1", start=True)
    assert stack.virsh("host1", "suspend", paused.uuid).returncode == 0

    def migrate(server: str, body: dict, **kw):
        return stack.api("POST", f"/v1/servers/{server}/action", {"migrate": body}, **kw)

    assert stack.api("GET", "/v1/servers", auth=False).status_code == 401
    assert migrate(dom.uuid, {"host": "host2", "force": False}, token="not-the-token").status_code == 401

    cases = [
        (dom.uuid, {"host": None, "force": True}, 400, "force"),
        (dom.uuid, {"host": "host9", "force": False}, 400, "host9"),
        (dom.uuid, {"host": "host1", "force": False}, 400, "host1"),
        ("no-such-server", {"host": "host2", "force": False}, 404, "no-such-server"),
        (paused.uuid, {"host": "host2", "force": False}, 409, "paused"),
    ]
    for server, body, status, needle in cases:
        reply = migrate(server, body)
        assert reply.status_code == status, (body, reply.status_code, reply.text)
        assert needle in reply.json()["detail"], (body, reply.text)

    assert stack.migrations(dom.uuid) == [] and stack.migrations(paused.uuid) == []
    assert stack.where(dom) == {"host1": {"state": "shut off", "dirs": [dom.uuid]}}
    assert stack.where(paused) == {"host1": {"state": "paused", "dirs": [paused.uuid]}}
