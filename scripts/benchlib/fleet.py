"""``scripts/bench-fleet``: a fleet of in-memory hosts in front of one and two controllers on PostgreSQL.

For each fleet size (``--servers``, or every size of ``--scales``):

1. Lists. A fresh fleet with migration records present and one controller:
   host list, server list and migration list with filters, timed through the
   API and through the CLI; then one migration alone (the drain's yardstick);
   then a second controller on the same database, and the lists again with
   the requests alternating between the two.
2. Drains. For one and for two controllers, and for each ``--max-servers``: a
   fresh fleet, ``--drain-hosts`` hosts disabled and then drained at once
   (with two controllers, every other drain on the second), followed until
   every drain is done (or ``--drain-timeout``). Ideal: ceil(servers per host /
   max-servers) × one migration alone.

The report (markdown, and the figures as JSON) goes to
<out>/fleet-<timestamp>.{md,json}; it shows how each figure grows from one
size to the next and flags those that grow faster than linearly. Exit status
0 when every list answered and every drain ended without errors, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from . import fleet_hosts, fleet_measure, fleet_report
from .fleet_procs import REPO, Fleet, FleetError, fleet, note


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench-fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=200, help="in-memory hosts (default: %(default)s)")
    p.add_argument("--servers", type=int, default=5000, help="servers over all hosts (default: %(default)s)")
    p.add_argument("--scales", nargs="?", const="1000,5000,20000", default=None, metavar="N,N,...",
                   help="run these fleet sizes (servers) in one go instead of --servers; "
                        "without a value: 1000,5000,20000")
    p.add_argument("--records", type=int, default=None,
                   help="migration records present (default: a quarter of the servers, at least 300)")
    p.add_argument("--samples", type=int, default=20, help="API requests per list (default: %(default)s)")
    p.add_argument("--cli-samples", type=int, default=5, help="CLI runs per list (default: %(default)s)")
    p.add_argument("--migration-seconds", type=float, default=2.0,
                   help="how long one disk copy takes on the in-memory hosts (default: %(default)s)")
    p.add_argument("--one-migrations", type=int, default=3,
                   help="migrations alone timed per size, their median counts (default: %(default)s)")
    p.add_argument("--drain-hosts", type=int, default=20, help="hosts drained at once (default: %(default)s)")
    p.add_argument("--max-servers", default="1,4,16", help="drain concurrency per host (default: %(default)s)")
    p.add_argument("--controllers", default="1,2", help="controllers in the drain runs (default: %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=1200.0,
                   help="seconds one drain run is followed before it counts as unfinished (default: %(default)s)")
    p.add_argument("--no-drains", action="store_true", help="time the lists and one migration only")
    p.add_argument("--out", default=str(REPO / "bench-results"), help="directory for the report")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(x) for x in (args.scales or str(args.servers)).split(",") if x.strip()]
        args.max_servers = [int(x) for x in args.max_servers.split(",") if x.strip()]
        args.controllers = [int(x) for x in args.controllers.split(",") if x.strip()]
    except ValueError as e:
        p.error(f"not a whole number: {e}")
    if not args.sizes or min(args.sizes) < 1 or args.hosts < 2:
        p.error("--servers/--scales: at least 1 server; --hosts: at least 2")
    if not 1 <= args.drain_hosts < args.hosts:
        p.error("--drain-hosts: at least 1, and fewer than --hosts (the servers need somewhere to go)")
    if not args.max_servers or min(args.max_servers) < 1 or max(args.max_servers) > 64:
        p.error("--max-servers: 1 to 64 (the API's range)")
    if not args.controllers or min(args.controllers) < 1 or max(args.controllers) > 2:
        p.error("--controllers: 1 or 2")
    if min(args.samples, args.cli_samples, args.one_migrations) < 1:
        p.error("--samples, --cli-samples, --one-migrations: at least 1")
    return args


def records_for(args: argparse.Namespace, servers: int) -> int:
    return args.records if args.records is not None else max(300, servers // 4)


def time_lists(f: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"api": {}, "cli": {}}
    for q in fleet_measure.queries(f):
        out["api"][q.name] = fleet_measure.time_api(f, q, args.samples)
        out["cli"][q.name] = fleet_measure.time_cli(f, q, args.cli_samples)
        note(f"  {q.name}: API p50 {out['api'][q.name]['p50_s']:.3f} s, CLI p50 {out['cli'][q.name]['p50_s']:.3f} s")
    return out


def lists_phase(cluster: Any, work: Path, args: argparse.Namespace, servers: int) -> dict[str, Any]:
    """Step 1 of the module docstring at one size."""
    result: dict[str, Any] = {"lists": {}}
    with fleet(cluster, work / f"{servers}-lists", args.hosts, servers, args.migration_seconds,
               records_for(args, servers), controllers=1) as f:
        note(f"{servers} servers: lists, one controller")
        result["lists"]["1"] = time_lists(f, args)
        # The last servers: on the last hosts, never among the drained ones.
        runs = [fleet_measure.one_migration(f, f.controllers[0], fleet_hosts.server_name(servers - i))
                for i in range(args.one_migrations)]
        bad = [r for r in runs if r["status"] != "finished"]
        if bad:
            raise FleetError(f"a migration alone did not finish: {bad}")
        result["one_migration"] = {"median_s": statistics.median(r["seconds"] for r in runs), "runs": runs}
        note(f"{servers} servers: one migration alone {result['one_migration']['median_s']:.2f} s")
        if 2 in args.controllers:
            f.start_controller()
            note(f"{servers} servers: lists, two controllers")
            result["lists"]["2"] = time_lists(f, args)
    return result


def drain_phase(cluster: Any, work: Path, args: argparse.Namespace, servers: int,
                one: float) -> list[dict[str, Any]]:
    """Step 2 of the module docstring at one size."""
    runs = []
    for n in args.controllers:
        for k in args.max_servers:
            with fleet(cluster, work / f"{servers}-drain-{n}-{k}", args.hosts, servers, args.migration_seconds,
                       records_for(args, servers), controllers=n) as f:
                drained = f.host_names[:args.drain_hosts]
                with f.client(f.controllers[0]) as http:
                    for host in drained:
                        http.put(f"/v1/os-services/{host}", json={
                            "status": "disabled", "disabled_reason": "bench-fleet: rack maintenance"}
                                 ).raise_for_status()
                note(f"{servers} servers: draining {len(drained)} hosts, --max-servers {k}, {n} controller(s)")
                run = fleet_measure.drain_run(f, drained, k, args.drain_timeout)
            run["ideal_s"] = math.ceil(run["servers_per_host"] / k) * one
            note(f"  {run['done']}/{run['migrations']} done in {run['elapsed_s']:.1f} s "
                 f"(ideal {run['ideal_s']:.1f} s), {run['errors']} errors")
            runs.append(run)
    return runs


def postgres_version() -> str:
    from tests.pgcluster import pg_bin
    done = subprocess.run([str(pg_bin() / "postgres"), "--version"], capture_output=True, text=True)
    found = re.search(r"\d+(\.\d+)+", done.stdout)
    return found.group(0) if found else "?"


def write_report(out: Path, stamp: str, meta: dict[str, Any], scales: list[dict[str, Any]]) -> Path:
    text = fleet_report.render(meta, scales)
    md = out / f"fleet-{stamp}.md"
    md.write_text(text)
    growth = fleet_report.growth(scales)
    (out / f"fleet-{stamp}.json").write_text(json.dumps(
        {**meta, "scales": scales, "growth": growth,
         "superlinear": [name for name, g in growth.items() if g["superlinear"]]}, indent=2))
    print(text)
    return md


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from tests.pgcluster import PgCluster

    # A SIGTERM ends the run through the finally blocks, which stop every process started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    u = os.uname()
    meta = {"stamp": stamp, "machine": f"{u.nodename}, Linux {u.release}, {os.cpu_count()} CPUs",
            "postgres": postgres_version(), "hosts": args.hosts, "sizes": args.sizes,
            "migration_seconds": args.migration_seconds, "samples": args.samples, "cli_samples": args.cli_samples,
            "drain_hosts": args.drain_hosts, "max_servers": args.max_servers, "controllers": args.controllers}
    scales: list[dict[str, Any]] = []
    failed = False
    cluster = PgCluster.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
            os.chmod(tmp, 0o755)
            # Every size's lists first, then every size's drains: the drains take longest.
            for servers in args.sizes:
                scale = {"servers": servers, "hosts": args.hosts, "records": records_for(args, servers), "drains": []}
                scale.update(lists_phase(cluster, Path(tmp), args, servers))
                scales.append(scale)
                write_report(out, stamp, meta, scales)   # what is done so far survives a later failure
            for scale in scales if not args.no_drains else []:
                scale["drains"] = drain_phase(cluster, Path(tmp), args, scale["servers"],
                                              scale["one_migration"]["median_s"])
                write_report(out, stamp, meta, scales)
    except FleetError as e:
        note(f"error: {e}")
        failed = True
    finally:
        cluster.stop()
    if not scales:
        return 1
    md = write_report(out, stamp, meta, scales)
    note(f"wrote {md} and {md.with_suffix('.json')}")
    drains_ok = all(d["complete"] and not d["errors"] and not d["drain_errors"] for s in scales for d in s["drains"])
    return 0 if drains_ok and not failed else 1
