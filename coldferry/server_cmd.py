"""``coldferry server``: servers and their migrations, through the controller's API.

Shaped like ``openstack server`` / ``nova migrate``: ``server migrate``
starts a cold migration that ends in VERIFY_RESIZE; ``server migration
confirm`` keeps the server on the new host, ``server migration revert``
takes it back.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Callable, Iterator

from rich.console import Console

from coldferry import client, output
from coldferry.client import ControllerClient, add_command, add_group, add_wait_options
from coldferry.output import Column, Row, fail, format_eta, percent
from transfer.units import format_size

# Migration statuses (docs/api.md) at which --wait stops: the copy is over, one way or the other.
FINISHED = "finished"
ERROR = "error"
NEEDS_RECOVERY = "needs-recovery"   # docs/safety.md: a host did not answer; the server is kept safe
WAIT_ENDS = frozenset({FINISHED, ERROR, NEEDS_RECOVERY, "confirmed", "reverted"})
DEFAULT_TIMEOUT = 3600

SERVER_COLUMNS = (Column("ID", "id"), Column("Name", "name"), Column("Status", "status"),
                  Column("Task State", "task_state"), Column("Power State", "state"), Column("Host", "host"),
                  Column("Migration", "migration_id"))
MIGRATION_COLUMNS = (Column("Id", "id"), Column("Server", "server"), Column("Name", "server_name"),
                     Column("Source", "source_compute"), Column("Dest", "dest_compute"),
                     Column("Status", "status"), Column("Type", "migration_type"),
                     Column("Progress", lambda m: percent(m.get("progress"))), Column("Error", "error"),
                     Column("Updated", "updated_at"))


def _bytes(n: Any) -> str:
    return f"{n} ({format_size(n)})" if isinstance(n, (int, float)) else ""


# How the Field/Value table of a migration renders the byte counts and the copy's progress.
MIGRATION_SHOWN: dict[str, Callable[[Any], Any]] = {
    "progress": output.describe_progress, "bytes_sent": _bytes, "bytes_skipped": _bytes,
    "bytes_before_power_off": _bytes, "bytes_after_power_off": _bytes,
    "rate": lambda r: f"{format_size(r or 0)}/s",
    "downtime_s": lambda d: "" if d is None else f"{d:.3f} s",
    "timeline": output.describe_timeline,
}

SERVER_HELP = """\
List, show and cold-migrate servers, and follow, confirm or revert their
migrations. Every command asks the coldferry controller.

examples:
  coldferry server list --host compute1
  coldferry server migrate --wait vm1
  coldferry server migration confirm vm1
"""

LIST_HELP = """\
List the servers the controller knows, on every host or on one.

example:
  coldferry server list --host compute1
"""

SHOW_HELP = """\
Show one server: host, status, task state, flavor and its current migration.

example:
  coldferry server show vm1
"""

MIGRATE_HELP = """\
Cold-migrate a server: power it off, copy its disks to another host and
start it there. The server ends in VERIFY_RESIZE; then confirm (keep it on
the new host) or revert (take it back) with 'coldferry server migration'.

Without --host the scheduler picks the host. With --host the host must pass
the scheduler's rules (see 'coldferry host check-destination') unless
--force is given. With --wait the command follows the migration with a
progress bar and exits 0 when it finished, 1 when it failed.

examples:
  coldferry server migrate vm1
  coldferry server migrate --host compute2 --wait vm1
  coldferry server migrate --host compute2 --force vm1
"""

MIGRATION_HELP = """\
List, show, confirm or revert migrations.

examples:
  coldferry server migration list --status finished
  coldferry server migration confirm 12
  coldferry server migration revert vm1
  coldferry server migration recover 12
"""

MIGRATION_LIST_HELP = """\
List migration records, newest first, optionally filtered.

example:
  coldferry server migration list --host compute1 --status error --changes-since 2026-11-23T00:00:00Z
"""

MIGRATION_SHOW_HELP = """\
Show one migration record: hosts, status, progress, bytes sent (in all, and
before and after the server's power-off when it was pre-copied), downtime,
digests, error; then its timeline: each phase (scheduled, source_job,
shutdown, copy of each file, dest_job, define, start, ...), the host it ran
on, when it began and how long it took, with the total and the share of it
spent copying. With -f json the record's "timeline" lists the phases with
their start and end times (epoch seconds).

example:
  coldferry server migration show 12
"""

CONFIRM_HELP = """\
Confirm a finished migration: the server stays on the new host and its old
copy on the source host is deleted. Name the migration by id, or the server
(whose migration is waiting in VERIFY_RESIZE).

examples:
  coldferry server migration confirm 12
  coldferry server migration confirm vm1
"""

REVERT_HELP = """\
Revert a finished migration: the server goes back to its source host, in
the power state it had before, and the copy on the new host is deleted.
Name the migration by id, or the server.

examples:
  coldferry server migration revert 12
  coldferry server migration revert vm1
"""

RECOVER_HELP = """\
Take a migration out of needs-recovery. A migration goes there when a host
did not answer long enough (or a rollback could not finish): the server's
disks are kept, the source stays stopped, and nothing is guessed. Once both
hosts answer, the controller does this by itself every recovery_interval
seconds; this command does it now. The migration goes on from the step it
stopped in, acting on what both hosts say: it finishes (VERIFY_RESIZE) or
rolls back to the source. Fails (409) naming the host that still does not
answer. See docs/safety.md.

example:
  coldferry server migration recover 12
"""

TARGET_HELP = "a migration id (all digits) or a server's name or UUID (use the UUID for an all-digit name)"


def register(sub: argparse._SubParsersAction) -> None:
    cmds = add_group(sub, "server", "list, show and migrate servers; confirm or revert migrations", SERVER_HELP)
    p = add_command(cmds, "list", run_list, "list servers", LIST_HELP)
    p.add_argument("--host", metavar="HOST", help="only the servers on this host")
    p = add_command(cmds, "show", run_show, "show one server", SHOW_HELP)
    p.add_argument("server", metavar="SERVER", help="server name or UUID")
    p = add_command(cmds, "migrate", run_migrate, "cold-migrate a server to another host", MIGRATE_HELP)
    p.add_argument("--host", metavar="HOST", help="destination host (default: the scheduler picks one)")
    p.add_argument("--force", action="store_true",
                   help="skip the scheduler's checks of --host (the host must still be known)")
    add_wait_options(p, "follow the migration until it finished or failed", DEFAULT_TIMEOUT)
    p.add_argument("server", metavar="SERVER", help="server name or UUID")
    _register_migration(cmds)


def _register_migration(cmds: argparse._SubParsersAction) -> None:
    sub = add_group(cmds, "migration", "list, show, confirm or revert migrations", MIGRATION_HELP)
    p = add_command(sub, "list", run_migration_list, "list migrations", MIGRATION_LIST_HELP)
    p.add_argument("--host", metavar="HOST", help="migrations from or to this host")
    p.add_argument("--status", metavar="STATUS", help="e.g. migrating, finished, confirmed, error")
    p.add_argument("--server", metavar="SERVER", help="migrations of this server (name or UUID)")
    p.add_argument("--type", dest="migration_type", choices=("migration", "live-migration"),
                   help="cold (migration) or live (live-migration)")
    p.add_argument("--changes-since", metavar="ISO", help="updated at or after this time, e.g. 2026-11-23T11:40:00Z")
    p = add_command(sub, "show", run_migration_show, "show one migration", MIGRATION_SHOW_HELP)
    p.add_argument("id", type=int, metavar="ID", help="migration id")
    p = add_command(sub, "confirm", run_confirm, "confirm a finished migration", CONFIRM_HELP)
    p.add_argument("target", metavar="ID_OR_SERVER", help=TARGET_HELP)
    p = add_command(sub, "revert", run_revert, "revert a finished migration", REVERT_HELP)
    p.add_argument("target", metavar="ID_OR_SERVER", help=TARGET_HELP)
    p = add_command(sub, "recover", run_recover, "recover a migration in needs-recovery", RECOVER_HELP)
    p.add_argument("id", type=int, metavar="ID", help="migration id")


def run_list(args: argparse.Namespace, c: ControllerClient) -> int:
    output.print_list(c.servers(host=args.host), SERVER_COLUMNS, args.format)
    return 0


def run_show(args: argparse.Namespace, c: ControllerClient) -> int:
    output.print_record(c.server(args.server), args.format)
    return 0


def run_migrate(args: argparse.Namespace, c: ControllerClient) -> int:
    record = c.migrate(args.server, host=args.host, force=args.force)
    if args.wait:
        return wait_for_migration(c, record, args.timeout, args.format)
    output.print_record(record, args.format, MIGRATION_SHOWN)
    output.note(f"migration {record['id']} started; follow it with: coldferry server migration show {record['id']}")
    return 0


def run_migration_list(args: argparse.Namespace, c: ControllerClient) -> int:
    records = c.migrations(host=args.host, status=args.status, server=args.server,
                           migration_type=args.migration_type, changes_since=args.changes_since)
    output.print_list(records, MIGRATION_COLUMNS, args.format)
    return 0


def run_migration_show(args: argparse.Namespace, c: ControllerClient) -> int:
    record = c.migration(args.id)
    output.print_record(record, args.format, MIGRATION_SHOWN)
    if args.format != "json":
        output.print_timeline(record.get("timeline"))
    return 0


def run_confirm(args: argparse.Namespace, c: ControllerClient) -> int:
    return _settle(args, c.confirm_migration, c.confirm_resize)


def run_revert(args: argparse.Namespace, c: ControllerClient) -> int:
    return _settle(args, c.revert_migration, c.revert_resize)


def run_recover(args: argparse.Namespace, c: ControllerClient) -> int:
    record = c.recover_migration(args.id)
    output.print_record(record, args.format, MIGRATION_SHOWN)
    output.note(f"migration {record['id']} is recovering from {record.get('status')}; follow it with: "
                f"coldferry server migration show {record['id']}")
    return 0


def _settle(args: argparse.Namespace, by_id: Callable[[int], Row], by_server: Callable[[str], Row]) -> int:
    """Confirm or revert: by migration id when the argument is all digits, else by the server's action."""
    target: str = args.target
    record = by_id(int(target)) if target.isdigit() else by_server(target)
    output.print_record(record, args.format, MIGRATION_SHOWN)
    return 0


# --wait -------------------------------------------------------------------------------------------

def wait_for_migration(c: ControllerClient, record: Row, timeout: float, fmt: str) -> int:
    """Poll the migration until it settles; print it; exit 0 unless it failed or is still going."""
    mid = record["id"]
    bar = Console(stderr=True) if sys.stderr.isatty() else None
    with migration_display(bar) as show:
        final = client.make_waiter().poll(lambda: c.migration(mid), lambda m: m["status"] in WAIT_ENDS, timeout,
                                          show)
    output.print_record(final, fmt, MIGRATION_SHOWN)
    if fmt != "json":
        output.print_timeline(final.get("timeline"))
    if final["status"] == ERROR:
        return fail(f"migration {mid} of server {final.get('server_name')} failed: {final.get('error')}")
    if final["status"] == NEEDS_RECOVERY:
        return fail(f"migration {mid} of server {final.get('server_name')} needs recovery: {final.get('error')}")
    if final["status"] not in WAIT_ENDS:
        return fail(f"migration {mid} is still {final['status']} after {timeout:g} s and goes on; "
                    f"follow it with: coldferry server migration show {mid}")
    if final["status"] == FINISHED:
        output.note(f"migration {mid} finished: the server is in VERIFY_RESIZE on {final.get('dest_compute')}; "
                    f"keep it there with 'coldferry server migration confirm {mid}' or take it back with "
                    f"'coldferry server migration revert {mid}'")
    return 0


def _describe(m: Row) -> str:
    task = f" ({m['task_state']})" if m.get("task_state") else ""
    return f"migration {m.get('id')} of {m.get('server_name')}: {m.get('status')}{task}"


@contextlib.contextmanager
def migration_display(bar: Console | None) -> Iterator[Callable[[Row], None]]:
    """Yield a callback fed each polled record: status changes as lines, the copy as a bar on ``bar``.

    Without a console (standard error is not a terminal) only the lines are
    printed, so logs of scripted runs stay readable.
    """
    if bar is None:
        yield output.on_change(_describe)
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                  TextColumn("{task.fields[rate]}"), TextColumn("eta {task.fields[eta]}"),
                  console=bar, transient=True) as progress:
        task = progress.add_task("waiting", total=None, rate="", eta="?")
        report = output.on_change(_describe, lambda text: progress.console.print(text, highlight=False))

        def update(m: Row) -> None:
            report(m)
            p = m.get("progress") or {}
            fields = {"completed": p["done"], "total": p["total"], "rate": f"{format_size(p.get('rate') or 0)}/s",
                      "eta": format_eta(p.get("eta"))} if p else {}
            progress.update(task, description=f"{m.get('server_name')} {m.get('status')}", **fields)

        yield update
