"""``coldferry driver``: one driver call on this host, JSON in and out.

The compute agent calls the driver in-process; this command runs the same
calls by hand on a host (and lets tests run them inside lab hosts). The
arguments come as one JSON object on standard input; the result is printed
as JSON. A failure prints ``{"error": kind, "message": ...}`` and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TYPE_CHECKING, Any, Callable

from driver.errors import DriverError
from driver.model import (DiskInfo, FinishOutcome, Flavor, Instance, LiveOutcome, MigrateOutcome, Migration, Timeline,
                          Vif)
from transfer.errors import TransferError

if TYPE_CHECKING:  # the driver (libvirt, pyroute2, paramiko) loads only when a call runs
    from driver.libvirt import LibvirtDriver

HELP = """\
Run one driver call on this host. Arguments are read as a JSON object on
standard input; the result is printed as JSON.

calls and their arguments:
  list-instances                   {}
  get-instance                     {"uuid"}
  host-resources                   {}
  power-on                         {"uuid"}
  power-off                        {"uuid", "timeout"?, "retry_interval"?}
  migrate-disk-and-power-off       {"uuid", "dest", "flavor"?, "network_info"?, "timeout"?, "retry_interval"?}
      copy the disks to host "dest" and power off; prints {"disk_info", "copies", "shared",
      "precopy", "was_running", "powered_off_at", "bytes_before_power_off", "bytes_after_power_off", ...}
  finish-migration                 {"uuid", "name", "flavor", "disk_info", "migration"?, "resize_instance"?, "power_on"?}
      define and start the copied instance here; prints {"running_at"}
  confirm-migration                {"uuid"}
  finish-revert-migration          {"uuid", "power_on"?}
  destroy                          {"uuid", "destroy_disks"?}
  live-migrate                     {"uuid", "dest"}
      move a running instance to host "dest" while it keeps running, its local
      disks copied along; prints {"downtime_s", "migration_s", ...}

example:
  echo '{"uuid": "…", "dest": "host2"}' | coldferry driver --config /etc/coldferry/agent.toml migrate-disk-and-power-off
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("driver", help="run one hypervisor driver call on this host (JSON in and out)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="TOML file with a [driver] table")
    p.add_argument("call", choices=sorted(CALLS), metavar="CALL", help="one of: " + ", ".join(sorted(CALLS)))
    p.set_defaults(func=run)


def _instance(drv: LibvirtDriver, args: dict[str, Any]) -> Instance:
    if "flavor" in args and "name" in args:
        return Instance(args["uuid"], args["name"], Flavor.from_dict(args["flavor"]), drv.config.host_name)
    return drv.get_instance(args["uuid"])


def _vifs(args: dict[str, Any]) -> list[Vif]:
    return [Vif(**v) for v in args.get("network_info", [])]


def _migration(drv: LibvirtDriver, args: dict[str, Any]) -> Migration:
    m = args.get("migration") or {}
    return Migration(id=m.get("id", "manual"), instance_uuid=args["uuid"], source_host=m.get("source_host", ""),
                     dest_host=m.get("dest_host", drv.config.host_name))


def _shutdown(drv: LibvirtDriver, a: dict[str, Any]) -> tuple[int, int]:
    """Clean-shutdown timeout and retry interval: from the call, else from the configuration."""
    return (int(a.get("timeout", drv.config.shutdown_timeout)),
            int(a.get("retry_interval", drv.config.shutdown_retry_interval)))


def _bare(drv: LibvirtDriver, a: dict[str, Any]) -> Instance:
    """An instance known only by uuid (it may no longer be defined here)."""
    return Instance(a["uuid"], a.get("name", ""), Flavor("", 0, 0, 0), drv.config.host_name)


def _migrate(drv: LibvirtDriver, a: dict[str, Any], timeline: Timeline) -> MigrateOutcome:
    inst = drv.get_instance(a["uuid"])
    flavor = Flavor.from_dict(a["flavor"]) if "flavor" in a else inst.flavor
    timeout, retry = _shutdown(drv, a)
    return drv.migrate_disk_and_power_off(inst, a["dest"], flavor, _vifs(a), None, timeout, retry, timeline=timeline)


def _finish(drv: LibvirtDriver, a: dict[str, Any], timeline: Timeline) -> FinishOutcome:
    return drv.finish_migration(_migration(drv, a), _instance(drv, a), DiskInfo.loads(a["disk_info"]), _vifs(a), {},
                                bool(a.get("resize_instance", False)), None, bool(a.get("power_on", True)),
                                timeline=timeline)


def _output(result: Any, timeline: Timeline) -> Any:
    """A call's result as JSON data; a driver outcome (with the phases it recorded) exactly as the
    agent's job result carries it."""
    if not isinstance(result, (MigrateOutcome, FinishOutcome, LiveOutcome)):
        return result
    from agent.schemas import dump_result  # the agent package brings FastAPI: load it only for an outcome
    return dump_result(result, timeline.phases)


#: Each call, given the driver, its arguments and the timeline its phases are recorded on.
CALLS: dict[str, Callable[[LibvirtDriver, dict[str, Any], Timeline], Any]] = {
    "list-instances": lambda d, a, t: [i.to_dict() for i in d.list_instances()],
    "get-instance": lambda d, a, t: d.get_instance(a["uuid"]).to_dict(),
    "host-resources": lambda d, a, t: dataclasses.asdict(d.host_resources()),
    "power-on": lambda d, a, t: d.power_on(d.get_instance(a["uuid"])),
    "power-off": lambda d, a, t: d.power_off(d.get_instance(a["uuid"]), *_shutdown(d, a)),
    "migrate-disk-and-power-off": _migrate,
    "finish-migration": _finish,
    "confirm-migration": lambda d, a, t: d.confirm_migration(_migration(d, a), _bare(d, a), _vifs(a)),
    "finish-revert-migration": lambda d, a, t: d.finish_revert_migration(_bare(d, a), _vifs(a), _migration(d, a), None,
                                                                      bool(a.get("power_on", True))),
    "live-migrate": lambda d, a, t: d.live_migration(d.get_instance(a["uuid"]), a["dest"], timeline=t),
    "destroy": lambda d, a, t: d.destroy(_bare(d, a), _vifs(a), bool(a.get("destroy_disks", True))),
}


def run(args: argparse.Namespace) -> int:
    try:
        raw = sys.stdin.read()
        call_args = json.loads(raw) if raw.strip() else {}
        if not isinstance(call_args, dict):
            raise ValueError("arguments must be a JSON object")
        from driver.libvirt import DriverConfig, LibvirtDriver
        drv = LibvirtDriver(DriverConfig.load(args.config))
        timeline = Timeline()
        result = _output(CALLS[args.call](drv, call_args, timeline), timeline)
    except (DriverError, TransferError) as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        return 1
    except (ValueError, KeyError) as e:
        print(json.dumps({"error": "BadArguments", "message": f"bad arguments for {args.call}: {e!r}"}))
        return 2
    print(json.dumps({"result": result}, default=str))
    return 0
