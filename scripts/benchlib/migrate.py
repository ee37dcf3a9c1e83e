"""scripts/bench-migrate: whole cold migrations on lab hosts, each with its timeline.

One lab of two hosts, agents and a controller (tests/support/stack.py). On
host1: for each data size, one shut-off test guest and one running test
guest (writeloop mode: it appends a synced record every --interval seconds),
each on a raw disk holding that much random data past its first MiB. Round 1
(stream copier): every guest migrates host1 -> host2 through the controller
(``coldferry server migrate --wait``) and is confirmed; round 2 (rsync): the
same guests go back, host2 -> host1. Pre-copy is the driver's default (on for
a running guest with at least precopy_threshold of data).

For each migration the controller's record gives the timeline: ``wall`` runs
from the request accepted (``scheduled`` starts) to the controller seeing the
destination's job end; ``copies`` sums the copy and pre-copy phases of the
disks' data (the domain definition's copy is overhead, not data);
``overhead = wall - copies``.

Checks: a running guest, booted on the target, verifies every record it
reported written before its shutdown (bench-downtime's check); a shut-off
guest's disk on the target has the source's digest.

With --downtime-sizes, bench-downtime then runs in its own lab (pre-copy on and
off) and its medians join the report with the downtime target.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.machinery
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MiB, GiB = 1 << 20, 1 << 30
METHODS = ("stream", "rsync")
STATES = ("shut-off", "running")
TARGET_OVERHEAD_S = 1.0     # shut-off instance, 64 MiB of data
TARGET_DOWNTIME_S = 1.5     # running guest with pre-copy, at 1 GiB and 8 GiB
#: Timeline columns of the phase table, in the order a migration passes them.
PHASES = ("scheduled", "source_job", "connect", "snapshot", "precopy", "shutdown", "copy", "copy_definition",
          "merge", "dest_job", "commit", "define", "start")
DEFINITION = "domain.xml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench-migrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64,1024,4096", help="MiB of data per guest, comma-separated "
                                                           "(default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="copiers, in order (default: %(default)s)")
    p.add_argument("--states", default=",".join(STATES), help="guests: shut-off, running (default: %(default)s)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between a running guest's records")
    p.add_argument("--poll-interval", type=float, default=1.0,
                   help="the controller's poll_interval (default: the shipped default, %(default)s)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one migration may take")
    p.add_argument("--downtime-sizes", default="1,8",
                   help="GiB sizes for bench-downtime afterwards, comma-separated; empty: skip it")
    p.add_argument("--downtime-runs", type=int, default=3, help="bench-downtime's --runs")
    p.add_argument("--out", default=str(REPO / "bench-results"), help="directory for the report")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        p.error(f"--sizes: not whole MiB: {args.sizes!r}")
    if not args.sizes or min(args.sizes) <= 0:
        p.error("--sizes: give positive sizes in MiB")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods or set(args.methods) - set(METHODS):
        p.error(f"--methods: choose from {', '.join(METHODS)}")
    args.states = [x.strip() for x in args.states.split(",") if x.strip()]
    if not args.states or set(args.states) - set(STATES):
        p.error(f"--states: choose from {', '.join(STATES)}")
    try:
        args.downtime_sizes = [float(x) for x in args.downtime_sizes.split(",") if x.strip()]
    except ValueError:
        p.error(f"--downtime-sizes: not numbers: {args.downtime_sizes!r}")
    if args.poll_interval <= 0 or args.downtime_runs < 1:
        p.error("--poll-interval must be above 0 and --downtime-runs at least 1")
    return args


def downtime_script() -> ModuleType:
    """scripts/bench-downtime as a module: its disk filling, guest checks and rounds are reused."""
    path = REPO / "scripts" / "bench-downtime"
    loader = importlib.machinery.SourceFileLoader("bench_downtime", str(path))
    spec = importlib.util.spec_from_loader("bench_downtime", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


# -- the figures of one migration -------------------------------------------------------


def phase_key(p: dict[str, Any]) -> str:
    """The phase-table column of a timeline phase (the definition's copy has its own)."""
    if p["phase"] in ("copy", "precopy") and p["detail"] == DEFINITION:
        return "copy_definition"
    return p["phase"]


def figures(timeline: list[dict[str, Any]]) -> dict[str, Any]:
    """Wall, copies and overhead of one migration's timeline, and its seconds per phase column."""
    if not timeline:
        return {"wall_s": None, "copies_s": None, "overhead_s": None, "phases_s": {}}
    wall = max(p["end"] for p in timeline) - min(p["start"] for p in timeline)
    copies = sum(p["seconds"] for p in timeline if phase_key(p) in ("copy", "precopy"))
    per: dict[str, float] = {}
    for p in timeline:
        per[phase_key(p)] = per.get(phase_key(p), 0.0) + p["seconds"]
    return {"wall_s": round(wall, 3), "copies_s": round(copies, 3), "overhead_s": round(wall - copies, 3),
            "phases_s": {k: round(v, 3) for k, v in per.items()}}


def migrate_shut_off(stack: Any, dom: Any, src: str, dst: str, digest: str, timeout: float) -> dict[str, Any]:
    """Migrate a shut-off guest through the controller, check its disk on ``dst``, confirm; one row."""
    from transfer import file_digest
    started = time.monotonic()
    run = stack.cli("server", "migrate", "--host", dst, "--wait", "--timeout", str(int(timeout)), "-f", "json",
                    dom.name, timeout=timeout + 60)
    total = time.monotonic() - started
    record = latest(stack, dom, dst)
    row = {"status": record["status"], "downtime_s": record["downtime_s"], "precopy": record["precopy"],
           "bytes_sent": record["bytes_sent"], "total_s": round(total, 2),
           "error": record["error"] or (run.stderr.strip() if run.returncode else None)}
    if record["status"] != "finished":
        return {**row, "verified": False, "verify": "not moved"}
    same = file_digest(str(stack.nodes[dst].dir(dom.uuid) / "disk")) == digest
    row.update(verified=same, verify="disk digest as on the source" if same else "disk digest differs")
    stack.cli("server", "migration", "confirm", str(record["id"]), check=True, timeout=300)
    stack.wait_migration(record["id"], ["confirmed"], timeout=300)
    return row


def latest(stack: Any, dom: Any, dst: str) -> dict[str, Any]:
    """The newest migration record of ``dom`` to ``dst``."""
    return [m for m in stack.migrations(dom.uuid) if m["dest_compute"] == dst][0]


def with_timeline(stack: Any, dom: Any, dst: str, row: dict[str, Any]) -> dict[str, Any]:
    record = latest(stack, dom, dst)
    shown = stack.cli_json("server", "migration", "show", str(record["id"]))
    return {**row, "migration_id": record["id"], "timeline": shown["timeline"], **figures(shown["timeline"])}


# -- the rounds -------------------------------------------------------------------------


def define_guests(stack: Any, bd: ModuleType, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The guests on host1, their disks filled; running ones started."""
    from transfer import file_digest
    guests = []
    for state in args.states:
        for mib in args.sizes:
            running = state == "running"
            dom = stack.define_domain("host1", disk_mib=mib + 1, mode="writeloop" if running else "check",
                                      interval=args.interval if running else None,
                                      stride=bd.STRIDE if running else None)
            disk = stack.nodes["host1"].dir(dom.uuid) / "disk"
            print(f"bench-migrate: {state} guest with {mib} MiB of random data", file=sys.stderr)
            bd.fill_random(disk, MiB, (mib + 1) * MiB)
            digest = "" if running else file_digest(str(disk))
            if running:
                conn = stack.lab.host("host1").connect()
                try:
                    conn.lookupByUUIDString(dom.uuid).create()
                finally:
                    conn.close()
            guests.append({"state": state, "data_mib": mib, "dom": dom, "digest": digest})
    return guests


def run_round(stack: Any, bd: ModuleType, guests: list[dict[str, Any]], method: str, src: str, dst: str,
              timeout: float) -> list[dict[str, Any]]:
    rows = []
    for g in guests:
        print(f"bench-migrate: {g['state']}, {g['data_mib']} MiB, {method}: {src} -> {dst}", file=sys.stderr)
        if g["state"] == "running":
            row = bd.move(stack, g["dom"], src, dst, timeout)
        else:
            row = migrate_shut_off(stack, g["dom"], src, dst, g["digest"], timeout)
        rows.append(with_timeline(stack, g["dom"], dst, {"state": g["state"], "data_mib": g["data_mib"],
                                                          "method": method, "from": src, "to": dst, **row}))
    return rows


def run_rounds(lab: Any, workdir: Path, bd: ModuleType, args: argparse.Namespace) -> tuple[list[dict], str]:
    """Every guest by each method in turn, back and forth; the rows and the lab's domain type."""
    from tests.support.stack import Stack
    rows: list[dict[str, Any]] = []
    guests: list[dict[str, Any]] = []
    domain_type = ""
    controller = {"poll_interval": args.poll_interval}
    hosts = ("host1", "host2")
    for n, method in enumerate(args.methods):
        stack = Stack.up(lab, workdir / method, driver_settings={"transfer_method": method},
                         controller_settings=controller)
        try:
            stack.domains.extend(g["dom"] for g in guests)   # removed if this round fails
            if not guests:
                domain_type = stack.domain_type
                guests = define_guests(stack, bd, args)
            src, dst = hosts if n % 2 == 0 else hosts[::-1]
            rows += run_round(stack, bd, guests, method, src, dst, args.timeout)
        except BaseException:
            stack.down()
            raise
        last = n == len(args.methods) - 1
        stack.down(remove_domains=last)
        if not last:
            stack.domains.clear()
    return rows, domain_type


# -- the report -------------------------------------------------------------------------


def num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def targets(rows: list[dict[str, Any]], downtime: dict[str, Any] | None) -> list[str]:
    """Each target as PASS or MISS with its figures."""
    out = []
    for r in rows:
        if r["state"] == "shut-off" and r["data_mib"] == 64:
            ok = r["overhead_s"] is not None and r["overhead_s"] <= TARGET_OVERHEAD_S
            out.append(f"shut-off instance, 64 MiB, {r['method']}: overhead {num(r['overhead_s'])} s "
                       f"<= {TARGET_OVERHEAD_S:g} s: {'PASS' if ok else 'MISS'}")
    for line in (downtime or {}).get("summary", []):
        if line["precopy_wanted"] and line["size_gib"] in (1, 8):
            d = line["downtime_s"]
            ok = d is not None and d <= TARGET_DOWNTIME_S
            out.append(f"running guest with pre-copy, {line['size_gib']:g} GiB: median downtime {num(d)} s "
                       f"<= {TARGET_DOWNTIME_S:g} s: {'PASS' if ok else 'MISS'}")
    return out or ["no migration of the target cases finished"]


def report(rows: list[dict[str, Any]], meta: dict[str, Any], downtime: dict[str, Any] | None) -> str:
    lines = [f"# coldferry migration benchmark, {meta['stamp']}", "",
             f"- {meta['machine']}; test guest under {meta['domain_type']}, raw disk of the data size + 1 MiB, "
             "random data past its first MiB",
             f"- controller poll_interval {meta['poll_interval']:g} s; driver defaults otherwise (stream: channel "
             f"{meta['channel']}, {meta['streams']} streams; pre-copy on at >= {meta['precopy_threshold_mib']} MiB "
             "of data for a running guest)",
             "- wall: the controller's timeline, request accepted to the destination's job seen ended; copies: "
             "copy and pre-copy phases of disk data; overhead = wall - copies; downtime: the record's "
             "(power-off on the source to running on the target); total: `coldferry server migrate --wait`", "",
             "| guest | data | copier | pre-copy | wall s | copies s | overhead s | downtime s | total s | "
             "MiB sent | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['state']} | {r['data_mib']} MiB | {r['method']} | {'on' if r['precopy'] else 'off'} | "
                     f"{num(r['wall_s'])} | {num(r['copies_s'])} | {num(r['overhead_s'])} | "
                     f"{num(r['downtime_s'])} | {num(r['total_s'], 1)} | {(r['bytes_sent'] or 0) / MiB:,.1f} | "
                     f"{'ok' if r['verified'] else 'FAILED'}: {r['verify']} |")
    lines += ["", "## Timeline phases, seconds", "",
              "source_job and dest_job include the controller's noticing their end; copy is the disks' data "
              "after the power-off, copy_definition the domain definition's copy.", "",
              "| guest | data | copier | " + " | ".join(PHASES) + " |",
              "|---|---|---|" + "---|" * len(PHASES)]
    for r in rows:
        per = r["phases_s"]
        lines.append(f"| {r['state']} | {r['data_mib']} MiB | {r['method']} | "
                     + " | ".join(num(per.get(k), 3) if k in per else "" for k in PHASES) + " |")
    if downtime:
        lines += ["", f"## Pre-copy downtime (scripts/bench-downtime, {downtime['stamp']})", "",
                  "| disk | pre-copy | downtime s (median [runs]) | MiB after power-off |", "|---|---|---|---|"]
        for x in downtime["summary"]:
            runs = ", ".join(f"{d:.2f}" for d in x["downtimes_s"])
            lines.append(f"| {x['size_gib']:g} GiB | {'on' if x['precopy'] else 'off'} | "
                         f"{num(x['downtime_s'])} [{runs}] | {x['bytes_after_power_off'] / MiB:,.1f} |")
    lines += ["", "## Targets", ""] + [f"- {t}" for t in targets(rows, downtime)]
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {r['state']}, {r['data_mib']} MiB, {r['method']}: {r['error']}"
                                          for r in errors]
    return "\n".join(lines) + "\n"


def run_downtime(bd: ModuleType, args: argparse.Namespace) -> dict[str, Any] | None:
    """bench-downtime at --downtime-sizes (its own lab); its JSON report, or None when skipped."""
    if not args.downtime_sizes:
        return None
    before = set(Path(args.out).glob("downtime-*.json"))
    bd.main(["--sizes", ",".join(f"{s:g}" for s in args.downtime_sizes), "--runs", str(args.downtime_runs),
             "--interval", str(args.interval), "--out", args.out])
    made = sorted(set(Path(args.out).glob("downtime-*.json")) - before)
    return json.loads(made[-1].read_text()) if made else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench-migrate: needs root (the lab makes namespaces and runs libvirtd)", file=sys.stderr)
        return 2
    from tests.support import guest
    from tests.support.lab import Lab
    from driver.libvirt.config import DriverConfig
    guest.ensure_built()
    bd = downtime_script()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lab = Lab.up_in_free_slot(2)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-migrate-") as tmp:
            rows, domain_type = run_rounds(lab, Path(tmp), bd, args)
    finally:
        lab.down()
    downtime = run_downtime(bd, args)
    u, defaults = os.uname(), DriverConfig()
    meta = {"stamp": stamp, "domain_type": domain_type, "poll_interval": args.poll_interval,
            "channel": defaults.transfer_channel, "streams": defaults.transfer_streams,
            "precopy_threshold_mib": defaults.precopy_threshold // MiB, "interval": args.interval,
            "machine": f"{u.nodename}, Linux {u.release}, {os.cpu_count()} CPUs"}
    text = report(rows, meta, downtime)
    (out / f"migrate-{stamp}.md").write_text(text)
    (out / f"migrate-{stamp}.json").write_text(json.dumps(
        {**meta, "rows": rows, "downtime": downtime, "targets": targets(rows, downtime)}, indent=2))
    print(text)
    print(f"bench-migrate: wrote {out / f'migrate-{stamp}.md'}", file=sys.stderr)
    ok = rows and all(r["verified"] for r in rows) and (downtime is None or all(
        r["verified"] for r in downtime["rows"]))
    return 0 if ok else 1
