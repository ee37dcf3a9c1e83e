"""``coldferry host``: compute hosts, their service status and drains, through the controller's API.

Shaped like ``openstack hypervisor`` / ``openstack compute service set`` and
nova's ``host-servers-migrate``, which is registered as an alias of
``host drain``.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.table import Table

from coldferry import client, output
from coldferry.client import ControllerClient, add_command, add_group, add_wait_options
from coldferry.output import Column, Row, fail, percent

DRAIN_TIMEOUT = 4 * 3600


def _used(what: str, unit: str = "") -> Callable[[Row], str]:
    """A "used/total" column for a hypervisor resource; empty while the host is down."""
    def get(h: Row) -> str:
        total = h.get(what)
        return f"{h.get(what + '_used') or 0}/{total}{unit}" if total else ""
    return get


HOST_COLUMNS = (Column("Name", "name"), Column("State", "state"), Column("Status", "status"),
                Column("Disabled Reason", "disabled_reason"), Column("Instances", "instances"),
                Column("vCPUs", _used("vcpus")), Column("RAM", _used("memory_mb", " MB")),
                Column("Disk", _used("disk_gb", " GB")), Column("Address", "address"), Column("Error", "error"))
RULE_COLUMNS = (Column("Rule", "name"), Column("Result", lambda r: "passed" if r.get("passed") else "failed"),
                Column("Reason", "reason"))
DRAIN_COLUMNS = (Column("Server", "server"), Column("Name", "name"), Column("State Before", "state_before"),
                 Column("Migration Type", "migration_type"), Column("Accepted", "accepted"),
                 Column("Status", "status"), Column("Migration", "migration_id"), Column("Error", "error"))
# The live view while waiting adds how far each copy is.
LIVE_COLUMNS = DRAIN_COLUMNS[:-1] + (Column("Progress", lambda r: percent(r.get("progress"))), DRAIN_COLUMNS[-1])

HOST_HELP = """\
List and show compute hosts, enable or disable them for new servers, check
whether a server may move to one, and drain a host of its servers.

examples:
  coldferry host list
  coldferry host disable --reason "disk replacement" compute1
  coldferry host drain --wait compute1
"""

LIST_HELP = """\
List compute hosts: agent state (up/down), service status (enabled/disabled),
instances and resources used of total.

example:
  coldferry host list
"""

SHOW_HELP = """\
Show one compute host: agent, address, resources, architecture, hypervisor.

example:
  coldferry host show compute1
"""

DISABLE_HELP = """\
Disable a host's compute service: the scheduler stops choosing it as a
destination. Its servers keep running.

example:
  coldferry host disable --reason "disk replacement" compute1
"""

ENABLE_HELP = """\
Enable a host's compute service again: the scheduler may choose it.

example:
  coldferry host enable compute1
"""

CHECK_HELP = """\
Check whether SERVER could migrate to HOST: runs every scheduler rule and
shows which passed and why one failed. Exits 0 when the host passes, 1 when
it does not.

example:
  coldferry host check-destination vm1 compute2
"""

DRAIN_HELP = """\
Move every server off a host: cold migration by default (each ends in
VERIFY_RESIZE, to confirm or revert), live migration of running servers
with --live. The controller picks a destination for each server unless
--target-host is given. --dry-run shows what would happen and moves nothing.

The result is a table: each server, its state before, how it moves, whether
the controller accepted it, and its status. With --wait the command follows
the drain until every server is done and exits 1 if any failed.

examples:
  coldferry host drain --dry-run compute1
  coldferry host drain --max-servers 2 --wait compute1
  coldferry host-servers-migrate --live --target-host compute3 compute1
"""

DRAIN_STATUS_HELP = """\
Show a drain started earlier, and with --wait follow it until it is done.

example:
  coldferry host drain-status --wait 3
"""


def register(sub: argparse._SubParsersAction) -> None:
    cmds = add_group(sub, "host", "list compute hosts, enable or disable them, drain them", HOST_HELP)
    add_command(cmds, "list", run_list, "list compute hosts", LIST_HELP)
    _host_arg(add_command(cmds, "show", run_show, "show one compute host", SHOW_HELP))
    p = add_command(cmds, "disable", run_disable, "stop scheduling servers to a host", DISABLE_HELP)
    p.add_argument("--reason", metavar="R", help="why, shown in 'host list'")
    _host_arg(p)
    _host_arg(add_command(cmds, "enable", run_enable, "schedule servers to a host again", ENABLE_HELP))
    p = add_command(cmds, "check-destination", run_check, "check whether a server may move to a host",
                    CHECK_HELP)
    p.add_argument("server", metavar="SERVER", help="server name or UUID")
    p.add_argument("host", metavar="HOST", help="candidate destination host")
    _drain_options(add_command(cmds, "drain", run_drain, "move every server off a host", DRAIN_HELP))
    p = add_command(cmds, "drain-status", run_drain_status, "show or follow a drain", DRAIN_STATUS_HELP)
    add_wait_options(p, "follow the drain until every server is done", DRAIN_TIMEOUT)
    p.add_argument("id", type=int, metavar="DRAIN_ID", help="the drain's id, as 'host drain' printed it")
    _drain_options(add_command(sub, "host-servers-migrate", run_drain,
                               "move every server off a host (same as 'host drain')", DRAIN_HELP))


def _host_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("host", metavar="HOST", help="compute host name")


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _drain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--live", action="store_true", help="live-migrate running servers (others move cold)")
    p.add_argument("--max-servers", type=_at_least_one, default=1, metavar="N",
                   help="servers moving at the same time (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="show the plan, move nothing")
    p.add_argument("--target-host", metavar="H", help="move every server to this host (default: scheduler)")
    p.add_argument("--force", action="store_true", help="with --target-host: skip the scheduler's checks")
    add_wait_options(p, "follow the drain until every server is done", DRAIN_TIMEOUT)
    _host_arg(p)


def run_list(args: argparse.Namespace, c: ControllerClient) -> int:
    output.print_list(c.hypervisors(), HOST_COLUMNS, args.format)
    return 0


def run_show(args: argparse.Namespace, c: ControllerClient) -> int:
    output.print_record(c.hypervisor(args.host), args.format)
    return 0


def run_disable(args: argparse.Namespace, c: ControllerClient) -> int:
    output.print_record(c.set_service(args.host, enabled=False, reason=args.reason), args.format)
    return 0


def run_enable(args: argparse.Namespace, c: ControllerClient) -> int:
    output.print_record(c.set_service(args.host, enabled=True), args.format)
    return 0


def run_check(args: argparse.Namespace, c: ControllerClient) -> int:
    answer = c.check_destination(args.host, args.server)
    if args.format == "json":
        output.print_json(answer)
    else:
        output.print_list(answer["rules"], RULE_COLUMNS, "table")
    if answer["passes"]:
        output.note(f"host {args.host} passes every rule for server {args.server}")
        return 0
    why = next((r.get("reason") for r in answer["rules"] if r.get("name") == answer.get("failed")), None)
    return fail(f"host {args.host} does not pass for server {args.server}: rule {answer.get('failed')} failed"
                + (f": {why}" if why else ""))


# Drains ------------------------------------------------------------------------------------------

def run_drain(args: argparse.Namespace, c: ControllerClient) -> int:
    drain = c.drain(args.host, live=args.live, max_servers=args.max_servers, dry_run=args.dry_run,
                    target_host=args.target_host, force=args.force)
    return _report_drain(c, drain, args)


def run_drain_status(args: argparse.Namespace, c: ControllerClient) -> int:
    return _report_drain(c, c.drain_status(args.id), args)


def _report_drain(c: ControllerClient, drain: Row, args: argparse.Namespace) -> int:
    """Print the drain (after following it, with --wait); exit 1 if a server failed, the drain ended
    with an error of its own (servers still on the host, the host not answering) or it is still going."""
    waited = args.wait and not drain.get("dry_run")
    if waited:
        drain = wait_for_drain(c, drain, args.timeout)
    if args.format == "json":
        output.print_json(drain)
    else:
        output.console().print(drain_table(drain, DRAIN_COLUMNS))
    errors = [r for r in drain.get("rows", []) if r.get("status") == "error"]
    if errors:
        return fail(f"{len(errors)} of {len(drain['rows'])} servers could not be moved off {drain['host']}; "
                    "see the Error column" + (f"; and: {drain['error']}" if drain.get("error") else ""))
    if drain.get("error"):
        return fail(f"drain {drain['id']} of {drain['host']}: {drain['error']}")
    if waited and drain.get("status") != "done":
        return fail(f"drain {drain['id']} is still {drain.get('status')} after {args.timeout:g} s and goes on; "
                    f"follow it with: coldferry host drain-status --wait {drain['id']}")
    return 0


def drain_table(drain: Row, columns: tuple[Column, ...]) -> Table:
    table = output.build_table(drain.get("rows", []), columns, title=_drain_title(drain))
    table.caption = _totals(drain)
    return table


def _drain_title(drain: Row) -> str:
    if drain.get("dry_run"):
        return f"dry run of a drain of {drain.get('host')}: nothing moved"
    return f"drain {drain.get('id')} of {drain.get('host')}: {drain.get('status')}"


def _totals(drain: Row) -> str:
    totals: dict[str, Any] = drain.get("totals") or {}
    return ", ".join(f"{v} {k}" for k, v in totals.items() if v or k == "total")


def wait_for_drain(c: ControllerClient, drain: Row, timeout: float) -> Row:
    """Poll the drain until it is done or ``timeout`` passes; return the last answer."""
    did = drain["id"]
    screen = output.console()
    with drain_display(screen if screen.is_terminal else None) as show:
        return client.make_waiter().poll(lambda: c.drain_status(did), lambda d: d.get("status") == "done",
                                         timeout, show)


@contextlib.contextmanager
def drain_display(screen: Console | None) -> Iterator[Callable[[Row], None]]:
    """Yield a callback fed each polled drain: a live table on a terminal, else a line per change of totals."""
    if screen is None:
        yield output.on_change(_describe)
        return
    from rich.live import Live
    # Transient: the final table is printed once, after the wait, like without a terminal.
    with Live(console=screen, transient=True, refresh_per_second=4) as live:
        yield lambda d: live.update(drain_table(d, LIVE_COLUMNS))


def _describe(d: Row) -> str:
    return f"drain {d.get('id')} of {d.get('host')}: {d.get('status')}, {_totals(d)}"
