"""``coldferry server`` and ``coldferry host`` driven through ``cli.main`` against a fake controller.

The fake answers over httpx.MockTransport and its clock passes only when the
--wait loops sleep, so waits take no time (see ``test_cli_client``).
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from rich.console import Console
from rich.text import Text

from coldferry import cli
from coldferry.client import TOKEN_ENV
from coldferry.host_cmd import drain_display
from coldferry.server_cmd import migration_display

from .test_cli_client import FakeController, install

UUID = "6f1c3f9e-8a44-4d43-9a6e-0b1f3f7c2a10"
FLAVOR = {"name": "small", "vcpus": 1, "memory_mb": 1024, "root_gb": 10, "ephemeral_gb": 0}
SERVER = {"id": UUID, "name": "vm1", "host": "h1", "status": "ACTIVE", "power_state": 1, "state": "running",
          "task_state": None, "flavor": FLAVOR, "migration_id": None}
GiB = 1 << 30


def migration(status: str, **changes: Any) -> dict[str, Any]:
    m = {"id": 12, "uuid": "m-12", "server": UUID, "server_name": "vm1", "source_compute": "h1",
         "dest_compute": "h2", "dest_address": "10.0.0.2", "status": status, "migration_type": "migration",
         "task_state": None, "forced": False, "old_power_state": 1, "progress": None, "bytes_sent": 0,
         "bytes_skipped": 0, "rate": 0.0, "digests": [], "downtime_s": None, "error": None,
         "created_at": "2026-11-23T11:40:00Z", "updated_at": "2026-11-23T11:41:00Z"}
    m.update(changes)
    return m


def copying(done: int) -> dict[str, Any]:
    return migration("migrating", task_state="resize_migrating",
                     progress={"file": "disk", "done": done, "total": 10 * GiB, "rate": 100.0 * (1 << 20),
                               "eta": 90.0, "fraction": done / (10 * GiB)})


def drain(status: str, rows: list[dict[str, Any]], dry_run: bool = False) -> dict[str, Any]:
    totals = {"total": len(rows), "queued": 0, "migrating": 0, "done": 0, "error": 0}
    for r in rows:
        totals[r["status"]] = totals.get(r["status"], 0) + 1
    return {"id": 3, "host": "h1", "live": False, "max_servers": 1, "dry_run": dry_run, "target_host": None,
            "force": False, "status": status, "created_at": "2026-11-23T11:40:00Z",
            "updated_at": "2026-11-23T11:40:00Z", "totals": totals, "rows": rows}


def row(name: str, status: str, error: str | None = None) -> dict[str, Any]:
    return {"server": f"uuid-{name}", "name": name, "state_before": "running", "migration_type": "migration",
            "accepted": status != "planned", "status": status, "error": error,
            "migration_id": None if status == "planned" else 40, "progress": None}


@pytest.fixture
def fake(monkeypatch, tmp_path) -> FakeController:
    f = install(monkeypatch, tmp_path)
    monkeypatch.setenv(TOKEN_ENV, "t0ken")
    return f


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# Output ------------------------------------------------------------------------------------------

def test_server_list_is_a_table_of_the_chosen_columns(fake, capsys):
    fake.on("GET", "/v1/servers", {"servers": [SERVER, dict(SERVER, id="u2", name="vm2", status="SHUTOFF")]})
    rc, out, _ = run(capsys, "server", "list", "--host", "h1")
    lines = out.splitlines()
    assert rc == 0 and fake.query() == {"host": "h1"}
    header = next(line for line in lines if "Name" in line)
    assert all(h in header for h in ("ID", "Status", "Task State", "Power State", "Host", "Migration"))
    assert any(UUID in line and "vm1" in line and "ACTIVE" in line for line in lines)
    assert any("vm2" in line and "SHUTOFF" in line for line in lines)
    assert "small" not in out  # the flavor is not a column


def test_json_output_is_the_api_objects(fake, capsys):
    fake.on("GET", "/v1/servers", {"servers": [SERVER]})
    rc, out, _ = run(capsys, "server", "list", "-f", "json")
    assert rc == 0 and json.loads(out) == [SERVER]


def test_show_is_a_field_value_table(fake, capsys):
    fake.on("GET", "/v1/servers/vm1", SERVER)
    rc, out, _ = run(capsys, "server", "show", "vm1")
    assert rc == 0
    assert "Field" in out and "Value" in out
    assert any("flavor" in line and "name=small" in line and "memory_mb=1024" in line for line in out.splitlines())
    assert any("host" in line and "h1" in line for line in out.splitlines())


def test_text_from_the_controller_is_not_rich_markup(fake, capsys):
    fake.on("GET", "/v1/os-migrations/12", migration("error", error="[Errno 111] refused [bold]x[/bold]"))
    rc, out, _ = run(capsys, "server", "migration", "show", "12")
    assert rc == 0 and "[Errno 111] refused [bold]x[/bold]" in out


def test_migration_show_renders_progress_and_sizes(fake, capsys):
    fake.on("GET", "/v1/os-migrations/12", dict(copying(5 * GiB), bytes_sent=GiB))
    rc, out, _ = run(capsys, "server", "migration", "show", "12")
    assert rc == 0
    assert "disk 5.0 GiB of 10.0 GiB (50%) at 100.0 MiB/s, eta 1:30" in out
    assert f"{GiB} (1.0 GiB)" in out


# server migrate -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, body", [
    (["--host", "h2", "--force"], {"migrate": {"host": "h2", "force": True}}),
    (["--host", "h2"], {"migrate": {"host": "h2", "force": False}}),
    ([], {"migrate": {"host": None, "force": False}}),
])
def test_migrate_sends_the_exact_action(fake, capsys, argv, body):
    fake.on("POST", f"/v1/servers/{UUID}/action", (202, {"migration": migration("pre-migrating")}))
    rc, out, err = run(capsys, "server", "migrate", *argv, UUID)
    assert rc == 0 and fake.body() == body
    assert "pre-migrating" in out and "coldferry server migration show 12" in err
    assert fake.sent() == [("POST", f"/v1/servers/{UUID}/action")]  # no --wait: no polling


def test_migrate_wait_follows_the_record_until_finished(fake, capsys):
    fake.on("POST", "/v1/servers/vm1/action", (202, {"migration": migration("pre-migrating")}))
    fake.on("GET", "/v1/os-migrations/12", migration("pre-migrating", task_state="resize_prep"),
            copying(GiB), copying(5 * GiB), migration("post-migrating", task_state="resize_finish"),
            migration("finished", bytes_sent=10 * GiB))
    rc, out, err = run(capsys, "server", "migrate", "--wait", "vm1")
    assert rc == 0
    assert fake.sent().count(("GET", "/v1/os-migrations/12")) == 5
    assert fake.clock.sleeps == [1.0] * 4
    # Each status change once, in order, on standard error.
    changes = [line for line in err.splitlines() if line.startswith("migration 12 of vm1:")]
    assert changes == ["migration 12 of vm1: pre-migrating (resize_prep)",
                       "migration 12 of vm1: migrating (resize_migrating)",
                       "migration 12 of vm1: post-migrating (resize_finish)", "migration 12 of vm1: finished"]
    assert "coldferry server migration confirm 12" in err
    assert "finished" in out and "10.0 GiB" in out  # the final record


def test_migrate_wait_exits_1_with_the_records_error(fake, capsys):
    fake.on("POST", "/v1/servers/vm1/action", (202, {"migration": migration("pre-migrating")}))
    fake.on("GET", "/v1/os-migrations/12", copying(GiB),
            migration("error", error="copy of disk failed: no space left on device"))
    rc, out, err = run(capsys, "server", "migrate", "--wait", "-f", "json", "vm1")
    assert rc == 1
    assert json.loads(out)["status"] == "error"
    assert ("coldferry: error: migration 12 of server vm1 failed: copy of disk failed: no space left on device"
            in err)


def test_migrate_wait_gives_up_at_the_timeout_and_says_how_to_follow(fake, capsys):
    fake.on("POST", "/v1/servers/vm1/action", (202, {"migration": migration("pre-migrating")}))
    fake.on("GET", "/v1/os-migrations/12", copying(GiB))
    rc, _, err = run(capsys, "server", "migrate", "--wait", "--timeout", "10", "vm1")
    assert rc == 1 and fake.clock.now == 1010
    assert "still migrating after 10 s" in err and "coldferry server migration show 12" in err


def test_the_migration_bar_shows_bytes_rate_and_eta():
    screen = io.StringIO()
    with migration_display(Console(file=screen, force_terminal=True, width=150)) as show:
        show(copying(5 * GiB))
    text = Text.from_ansi(screen.getvalue()).plain
    assert "migration 12 of vm1: migrating (resize_migrating)" in text
    assert "5.0/10.0 GiB" in text and "100.0 MiB/s" in text and "eta 1:30" in text


@pytest.mark.parametrize("status, detail", [
    (400, "host h1 is the server's current host"),
    (404, "server vm9 not found"),
    (409, "server vm1 is paused; unpause it first"),
])
def test_refusals_print_the_controllers_detail(fake, capsys, status, detail):
    fake.on("POST", "/v1/servers/vm1/action", (status, {"detail": detail}))
    rc, out, err = run(capsys, "server", "migrate", "--host", "h1", "vm1")
    assert (rc, out, err) == (1, "", f"coldferry: error: {detail}\n")


def test_a_wrong_token_says_where_tokens_come_from(fake, capsys):
    fake.on("GET", "/v1/servers", (401, {"detail": "invalid token"}))
    rc, _, err = run(capsys, "server", "list")
    assert rc == 1 and "invalid token" in err and "COLDFERRY_TOKEN" in err


# server migration ----------------------------------------------------------------------------------

def test_migration_list_sends_every_filter(fake, capsys):
    fake.on("GET", "/v1/os-migrations", {"migrations": [copying(5 * GiB), migration("confirmed", id=11)]})
    rc, out, _ = run(capsys, "server", "migration", "list", "--host", "h1", "--status", "migrating",
                     "--server", "vm1", "--type", "migration", "--changes-since", "2026-11-23T00:00:00Z")
    assert rc == 0
    assert fake.query() == {"host": "h1", "status": "migrating", "server": "vm1", "migration_type": "migration",
                            "changes-since": "2026-11-23T00:00:00Z"}
    assert any("12" in line and "migrating" in line and "50%" in line for line in out.splitlines())
    assert any("11" in line and "confirmed" in line for line in out.splitlines())


@pytest.mark.parametrize("verb, action", [("confirm", "confirmResize"), ("revert", "revertResize")])
def test_confirm_or_revert_by_migration_id(fake, capsys, verb, action):
    fake.on("POST", f"/v1/os-migrations/12/{verb}", (202, migration(f"{verb}ing")))
    rc, out, _ = run(capsys, "server", "migration", verb, "12")
    assert rc == 0 and fake.sent() == [("POST", f"/v1/os-migrations/12/{verb}")]
    assert f"{verb}ing" in out


@pytest.mark.parametrize("verb, action", [("confirm", "confirmResize"), ("revert", "revertResize")])
def test_confirm_or_revert_by_server_uses_the_server_action(fake, capsys, verb, action):
    fake.on("POST", "/v1/servers/vm1/action", (202, {"migration": migration(f"{verb}ing")}))
    rc, out, _ = run(capsys, "server", "migration", verb, "vm1")
    assert rc == 0 and fake.body() == {action: None}
    assert f"{verb}ing" in out


def test_confirming_an_unfinished_migration_shows_the_conflict(fake, capsys):
    fake.on("POST", "/v1/os-migrations/12/confirm", (409, {"detail": "migration 12 is migrating, not finished"}))
    rc, _, err = run(capsys, "server", "migration", "confirm", "12")
    assert rc == 1 and err == "coldferry: error: migration 12 is migrating, not finished\n"


def test_recover_posts_and_shows_the_record(fake, capsys):
    fake.on("POST", "/v1/os-migrations/12/recover", (202, migration("rolling-back", task_state="resize_reverting")))
    rc, out, err = run(capsys, "server", "migration", "recover", "12")
    assert rc == 0 and fake.sent() == [("POST", "/v1/os-migrations/12/recover")]
    assert "rolling-back" in out and "coldferry server migration show 12" in err


def test_recover_while_a_host_is_silent_says_which(fake, capsys):
    detail = "cannot recover migration 12 yet: the facts cannot be established: destination h2 does not answer (x)"
    fake.on("POST", "/v1/os-migrations/12/recover", (409, {"detail": detail}))
    rc, _, err = run(capsys, "server", "migration", "recover", "12")
    assert rc == 1 and "destination h2 does not answer" in err


def test_wait_stops_at_needs_recovery_and_fails(fake, capsys):
    fake.on("POST", "/v1/servers/vm1/action", (202, {"migration": migration("pre-migrating")}))
    fake.on("GET", "/v1/os-migrations/12", migration("needs-recovery", error="h2 did not answer"))
    rc, _, err = run(capsys, "server", "migrate", "--wait", "vm1")
    assert rc == 1 and "needs recovery: h2 did not answer" in err


# host --------------------------------------------------------------------------------------------

def test_host_list_shows_used_of_total(fake, capsys):
    up = {"name": "h1", "state": "up", "status": "disabled", "disabled_reason": "disk", "address": "10.0.0.1",
          "instances": 2, "vcpus": 8, "vcpus_used": 3, "memory_mb": 16384, "memory_mb_used": 4096,
          "disk_gb": 100, "disk_gb_used": 20, "error": None}
    down = {"name": "h2", "state": "down", "status": "enabled", "disabled_reason": None, "address": "10.0.0.2",
            "instances": 0, "vcpus": None, "vcpus_used": 0, "memory_mb": None, "memory_mb_used": 0,
            "disk_gb": None, "disk_gb_used": 0, "error": "agent unreachable"}
    fake.on("GET", "/v1/os-hypervisors", {"hypervisors": [up, down]})
    rc, out, _ = run(capsys, "host", "list")
    assert rc == 0
    assert any("h1" in line and "3/8" in line and "4096/16384 MB" in line and "20/100 GB" in line
               and "disk" in line for line in out.splitlines())
    assert any("h2" in line and "down" in line and "agent unreachable" in line for line in out.splitlines())


def test_host_disable_and_enable(fake, capsys):
    fake.on("PUT", "/v1/os-services/h1", {"name": "h1", "status": "disabled", "disabled_reason": "disk swap"})
    rc, out, _ = run(capsys, "host", "disable", "--reason", "disk swap", "h1")
    assert rc == 0 and fake.body() == {"status": "disabled", "disabled_reason": "disk swap"}
    assert "disk swap" in out
    assert run(capsys, "host", "enable", "h1")[0] == 0
    assert fake.body() == {"status": "enabled"}


RULES_PASS = [{"name": "service_enabled", "passed": True, "reason": None},
              {"name": "ram", "passed": True, "reason": None}]


def test_check_destination_passing_exits_0(fake, capsys):
    fake.on("GET", "/v1/os-hosts/h2/check-destination",
            {"host": "h2", "server": "vm1", "passes": True, "failed": None, "rules": RULES_PASS})
    rc, out, err = run(capsys, "host", "check-destination", "vm1", "h2")
    assert rc == 0 and fake.query() == {"server": "vm1"}
    assert any("service_enabled" in line and "passed" in line for line in out.splitlines())
    assert "host h2 passes every rule for server vm1" in err


def test_check_destination_failing_exits_1_with_the_rule_and_reason(fake, capsys):
    rules = [RULES_PASS[0], {"name": "ram", "passed": False, "reason": "needs 1024 MB, 512 MB free"}]
    answer = {"host": "h2", "server": "vm1", "passes": False, "failed": "ram", "rules": rules}
    fake.on("GET", "/v1/os-hosts/h2/check-destination", answer)
    rc, out, err = run(capsys, "host", "check-destination", "vm1", "h2")
    assert rc == 1
    assert any("ram" in line and "failed" in line and "512 MB free" in line for line in out.splitlines())
    assert "coldferry: error: host h2 does not pass for server vm1: rule ram failed: needs 1024 MB, 512 MB free" in err
    rc, out, _ = run(capsys, "host", "check-destination", "-f", "json", "vm1", "h2")
    assert rc == 1 and json.loads(out) == answer


# drains ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["host", "drain"], ["host-servers-migrate"]])
def test_drain_dry_run_prints_the_plan(fake, capsys, command):
    plan = drain("done", [row("vm1", "planned"), row("vm2", "planned")], dry_run=True)
    fake.on("POST", "/v1/os-hypervisors/h1/drain", plan)
    rc, out, _ = run(capsys, *command, "--dry-run", "--live", "--max-servers", "2", "--target-host", "h3",
                     "--force", "--wait", "h1")
    assert rc == 0
    assert fake.body() == {"live": True, "max_servers": 2, "dry_run": True, "target_host": "h3", "force": True}
    assert fake.sent() == [("POST", "/v1/os-hypervisors/h1/drain")]  # a plan is not waited for
    assert "dry run of a drain of h1: nothing moved" in out
    assert all(h in out for h in ("Server", "State Before", "Migration Type", "Accepted", "Status", "Error"))
    assert sum("vm" in line and "planned" in line for line in out.splitlines()) == 2
    assert "2 total, 2 planned" in out


def test_drain_wait_polls_until_done_and_fails_on_an_error_row(fake, capsys):
    fake.on("POST", "/v1/os-hypervisors/h1/drain", (202, drain("running", [row("vm1", "queued"),
                                                                             row("vm2", "queued")])))
    fake.on("GET", "/v1/drains/3", drain("running", [row("vm1", "migrating"), row("vm2", "queued")]),
            drain("done", [row("vm1", "done"), row("vm2", "error", "no valid host for server vm2")]))
    rc, out, err = run(capsys, "host", "drain", "--wait", "h1")
    assert rc == 1
    assert fake.sent().count(("GET", "/v1/drains/3")) == 2
    assert "drain 3 of h1: running, 2 total, 1 queued, 1 migrating" in err  # progress lines off a terminal
    assert any("vm2" in line and "no valid host for server vm2" in line for line in out.splitlines())
    assert "coldferry: error: 1 of 2 servers could not be moved off h1" in err


def test_drain_that_ended_with_its_own_error_fails_naming_it(fake, capsys):
    ended = {**drain("done", [row("vm1", "done")]), "error": "servers still on h1 at the end: vm9"}
    fake.on("GET", "/v1/drains/3", ended)
    rc, _, err = run(capsys, "host", "drain-status", "3")
    assert rc == 1 and "coldferry: error: drain 3 of h1: servers still on h1 at the end: vm9" in err


def test_drain_without_wait_prints_what_was_accepted(fake, capsys):
    fake.on("POST", "/v1/os-hypervisors/h1/drain", (202, drain("running", [row("vm1", "queued")])))
    rc, out, _ = run(capsys, "host", "drain", "-f", "json", "h1")
    assert rc == 0 and json.loads(out)["rows"][0]["status"] == "queued"
    assert fake.sent() == [("POST", "/v1/os-hypervisors/h1/drain")]


def test_drain_status_wait_times_out_saying_how_to_follow(fake, capsys):
    fake.on("GET", "/v1/drains/3", drain("running", [row("vm1", "migrating")]))
    rc, _, err = run(capsys, "host", "drain-status", "--wait", "--timeout", "5", "3")
    assert rc == 1 and fake.clock.now == 1005
    assert "drain 3 is still running after 5 s" in err and "coldferry host drain-status --wait 3" in err


def test_the_live_drain_view_has_a_progress_column():
    screen = io.StringIO()
    moving = dict(row("vm1", "migrating"), progress={"fraction": 0.25})
    with drain_display(Console(file=screen, force_terminal=True, width=200)) as show:
        show(drain("running", [moving]))
    assert "Progress" in screen.getvalue() and "25%" in screen.getvalue()


# usage -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["server"], ["server", "migration", "show", "x"],
                                  ["host", "drain", "--max-servers", "0", "h1"],
                                  ["server", "migrate", "--wait", "--timeout", "-1", "vm1"],
                                  ["server", "list", "-f", "yaml"]])
def test_usage_errors_exit_2_without_calling_the_controller(fake, capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and fake.requests == []
    assert "error:" in capsys.readouterr().err


# copy --------------------------------------------------------------------------------------------

@pytest.fixture
def copy_args(tmp_path) -> list[str]:
    src, known_hosts = tmp_path / "disk.raw", tmp_path / "known_hosts"
    src.write_bytes(b"x" * 4096)
    known_hosts.write_text("")
    return ["--no-progress", "--known-hosts", str(known_hosts), str(src), "root@h2:/srv/disk.raw"]


@pytest.mark.parametrize("flags, message", [
    (["--streams", "0"], "invalid --streams: 0 (use 1 to 16)"),
    (["--streams", "17"], "invalid --streams: 17 (use 1 to 16)"),
    (["--method", "rsync", "--streams", "0"], "invalid --streams: 0 (use 1 to 16)"),
    (["--method", "rsync", "--bwlimit", "1000"], "invalid --bwlimit: 1000 (rsync limits in KiB/s"),
    (["--bwlimit", "fast"], "invalid --bwlimit: 'fast'"),
    (["--method", "rsync", "--streams", "4", "--fsync"],
     "invalid option for --method rsync: '--fsync --streams' (these apply to the stream method only)"),
])
def test_copy_refuses_bad_options_naming_the_flag(capsys, monkeypatch, copy_args, flags, message):
    import transfer
    monkeypatch.setattr(transfer, "stream_copy", pytest.fail)
    monkeypatch.setattr(transfer, "rsync_copy", pytest.fail)
    rc, _, err = run(capsys, "copy", *flags, *copy_args)
    assert rc == 1 and f"coldferry copy: error: {message}" in err


@pytest.mark.parametrize("flags, method, expected", [
    ([], "stream", dict(method="stream", streams=2, bwlimit=0)),
    (["--streams", "4", "--channel", "tls", "--compress", "auto", "--bwlimit", "1M", "--fsync"], "stream",
     dict(streams=4, channel="tls", compress="auto", bwlimit=1 << 20, fsync=True)),
    (["--method", "rsync", "--bwlimit", "2K"], "rsync", dict(method="rsync", bwlimit=2048)),
])
def test_copy_hands_the_copier_one_options_value(capsys, monkeypatch, copy_args, flags, method, expected):
    import transfer
    from transfer.options import CopyOptions
    calls = []

    def fake(kind):
        def copier(src, dest, options, **kw):
            calls.append((kind, options, kw))
            return transfer.CopyResult(kind, 4096, 4096, 4096, 0, 0, 1.0, "cf1:x")
        return copier

    monkeypatch.setattr(transfer, "stream_copy", fake("stream"))
    monkeypatch.setattr(transfer, "rsync_copy", fake("rsync"))
    rc, out, _ = run(capsys, "copy", *flags, *copy_args)
    assert rc == 0 and out.startswith(f"{method}: ")
    [(kind, options, kw)] = calls
    assert kind == method and options == CopyOptions(**expected)
    assert kw["overwrite"] is False
