"""``scripts/bench-transfer``: options, the work area, and the run over cases and tools."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

from . import images, measure, report, resume
from .images import GiB, MiB, Source
from .results import CaseResult, ResumeCheck, ToolResult, check_targets
from .tools import BASELINE, CIPHER, TOOLS, Peer, Tool

REPO = Path(__file__).resolve().parents[2]
SPACE_FACTOR = 3

DESCRIPTION = """\
Compare coldferry's copiers with rsync, scp, ssh+cat, nbdcopy and cp against a
private sshd on loopback. Every case is copied --runs times per tool (after
uncounted warm-ups); each result is compared byte for byte with the source
(cmp, and coldferry checksum digests), and the target's allocation is shown.
Results go to bench-results/transfer-<timestamp>.json and .md.

Times are durable for durable: each tool's time runs from its start until its
target is durable, i.e. its own run and then a sync of the target (see --sync),
since a migration may not drop its source before then. coldferry runs with
--fsync, as migrations do, so its receiver fdatasyncs the file itself. The
time to the tool's exit alone ("delivered", the data possibly still in the
page cache) is shown beside it. The page cache is dropped before every run.

cases: """ + "; ".join(f"{c.key} = {c.title} ({c.size // MiB} MiB)" for c in images.CASES.values()) + """
tools: """ + ", ".join(TOOLS) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench-transfer", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, metavar="N", help="timed runs per tool (default 3)")
    p.add_argument("--warmups", type=int, default=1, metavar="N",
                   help="uncounted warm-up runs per tool and case (default 1)")
    p.add_argument("--cases", default="a,b,c,d", help="cases to run, e.g. a,b (default a,b,c,d)")
    p.add_argument("--scale", type=float, default=1.0, metavar="F",
                   help="multiply every image size by F, e.g. 0.25 for a quick run (default 1)")
    p.add_argument("--tools", default=",".join(TOOLS), help="tools to compare (default: all)")
    p.add_argument("--streams", type=int, metavar="N", help="coldferry --streams (default: its own)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where images and targets go, on a real disk (default /var/tmp)")
    p.add_argument("--out", type=Path, default=REPO / "bench-results",
                   help="directory for the JSON and markdown results (default bench-results/)")
    p.add_argument("--coldferry", type=Path, default=REPO / ".venv" / "bin" / "coldferry",
                   help="coldferry executable, used locally and as the remote receiver")
    p.add_argument("--timeout", type=float, default=1800, metavar="S", help="limit for one copy")
    p.add_argument("--seed", type=int, default=1, help="seed of the random image data")
    p.add_argument("--no-drop-caches", action="store_true", help="keep the page cache between runs")
    p.add_argument("--sync", choices=measure.SYNC_MODES, default="file",
                   help="how a target is made durable after its tool ends: file = fsync the target "
                        "and its directory (sync FILE DIR); fs = sync its whole file system (sync -f), "
                        "which also writes back what others left dirty there (default file)")
    p.add_argument("--no-resume-check", action="store_true", help="skip the interrupted-copy check")
    p.add_argument("--keep", action="store_true", help="keep the work directory for inspection")
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    chosen = [t.strip() for t in args.tools.split(",") if t.strip()]
    args.tools = [t for t in TOOLS if t in chosen]  # always in the tables' order
    bad = [c for c in args.cases if c not in images.CASES] + [t for t in chosen if t not in TOOLS]
    if bad or not args.cases or not args.tools:
        p.error(f"unknown or missing case/tool {', '.join(bad) or ''}; cases: "
                f"{','.join(images.CASES)}; tools: {','.join(TOOLS)}")
    if args.runs < 1 or args.warmups < 0 or not 0 < args.scale <= 4:
        p.error("need --runs >= 1, --warmups >= 0 and 0 < --scale <= 4")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_space(workdir: Path, cases: list[str], scale: float) -> None:
    largest = max(images.round_mib(images.CASES[c].size * scale) for c in cases)
    free = shutil.disk_usage(workdir).free
    if free < SPACE_FACTOR * largest:
        raise SystemExit(f"bench-transfer: {workdir} has {free / GiB:.1f} GiB free; the largest case "
                         f"needs {SPACE_FACTOR}x {largest / GiB:.1f} GiB. Free space, pick smaller "
                         f"--cases/--scale, or point --workdir at a bigger disk.")


def version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return ((done.stdout or done.stderr).strip().splitlines() or ["?"])[0]


def machine() -> str:
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), "0")
    return (f"{platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs, "
            f"{int(mem) / (1 << 20):.1f} GiB RAM")


def metadata(args: argparse.Namespace, stamp: str, drop_note: str | None) -> dict[str, Any]:
    return {
        "timestamp": stamp,
        "machine": machine(),
        "settings": {"runs": args.runs, "warmups": args.warmups, "scale": args.scale,
                     "cases": args.cases, "tools": args.tools, "streams": args.streams,
                     "cipher": CIPHER, "drop_caches": drop_note is None,
                     "drop_caches_note": drop_note or "", "seed": args.seed, "sync": args.sync},
        "versions": {
            "coldferry": version(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
            "openssh": version(["ssh", "-V"]), "rsync": version(["rsync", "--version"]),
            "nbdcopy": version(["nbdcopy", "--version"]), "qemu-nbd": version(["qemu-nbd", "--version"]),
            "cp": version(["cp", "--version"]),
        },
    }


def start_peer(args: argparse.Namespace, work: Path, stack: ExitStack) -> Peer:
    sys.path.insert(0, str(REPO))
    from tests.support.sshd import Sshd
    sshd = Sshd.start(work / "sshd")
    stack.callback(sshd.stop)
    return Peer(sshd.host, sshd.port, sshd.user, sshd.identity, sshd.known_hosts,
                args.coldferry, args.streams)


def run_case(source: Source, tools: list[Tool], peer: Peer, args: argparse.Namespace,
             dst: Path, drop: bool) -> CaseResult:
    """Warm every tool up, then run the tools round-robin ``--runs`` times."""
    digest = measure.digest(args.coldferry, source.path)
    results = {t.name: ToolResult(t.name, t.label) for t in tools}
    once = lambda t: measure.measure(t, peer, source, digest, dst, drop, args.timeout,  # noqa: E731
                                     args.sync)
    for tool in tools:
        missing = tool.missing(peer)
        if missing:
            results[tool.name].unavailable = f"not installed: {', '.join(missing)}"
    for label, count, keep in (("warm-up", args.warmups, False), ("run", args.runs, True)):
        for i in range(count):
            for tool in tools:
                r = results[tool.name]
                if r.unavailable:
                    continue
                run = once(tool)
                if keep:
                    r.runs.append(run)
                else:
                    r.warmup = run
                    if run.error:  # a tool that cannot copy at all is left out, not timed
                        r.unavailable = run.error
                state = "ok" if run.verified else f"FAIL {run.error or 'verification'}"
                secs = f"{run.seconds:.2f} s" if run.seconds is not None else "-"
                if run.sync_seconds is not None:
                    secs += f" + sync {run.sync_seconds:.2f} s"
                log(f"  [{source.case.key}] {tool.name} {label} {i + 1}/{count}: {secs} {state}")
    measure.clean(dst)
    return CaseResult(source, digest, [results[t.name] for t in tools])


def benchmark(args: argparse.Namespace, work: Path,
              stack: ExitStack) -> tuple[list[CaseResult], ResumeCheck | None, str | None]:
    """Every chosen case with every chosen tool, and the resume check after case a."""
    src, dst = work / "src", work / "dst"
    src.mkdir()
    dst.mkdir()
    drop_note = measure.can_drop_caches() if not args.no_drop_caches else "--no-drop-caches"
    log("page cache: " + ("dropped before every run" if drop_note is None else f"not dropped ({drop_note})"))
    peer = start_peer(args, work, stack)
    tools = [TOOLS[name] for name in args.tools]
    cases: list[CaseResult] = []
    check: ResumeCheck | None = None
    for key in args.cases:
        log(f"case {key}: making the source image ...")
        source = images.make(images.CASES[key], src, args.scale, args.seed)
        result = run_case(source, tools, peer, args, dst, drop_note is None)
        cases.append(result)
        log(report.case_heading(result) + "\n" + report.text_table(report.case_rows(result, BASELINE)) + "\n")
        base = result.get(BASELINE)
        if key == "a" and not args.no_resume_check and base is not None:
            if base.unavailable or base.median is None:
                check = ResumeCheck(verdict="n/a", note=f"coldferry stream (direct): {base.status}")
            else:
                log("resume check: interrupting a stream copy of case a ...")
                check = resume.run(peer, source, result.source_digest, dst, drop_note is None,
                                   args.timeout)
            measure.clean(dst)
        source.path.unlink()
    return cases, check, drop_note


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    check_space(args.workdir, args.cases, args.scale)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path(tempfile.mkdtemp(prefix="coldferry-bench-", dir=args.workdir))
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with ExitStack() as stack:
            if not args.keep:
                stack.callback(shutil.rmtree, work, ignore_errors=True)
            cases, check, drop_note = benchmark(args, work, stack)
    except KeyboardInterrupt:
        log("bench-transfer: interrupted; processes stopped and the work directory removed")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    meta = metadata(args, stamp, drop_note)
    checks = check_targets({c.source.case.key: c for c in cases}, BASELINE)
    print(report.render_text(meta, cases, BASELINE, checks, check))
    jpath, mpath = report.write_files(
        args.out, stamp, report.to_json(meta, cases, checks, check),
        report.render_markdown(meta, cases, BASELINE, checks, check))
    print(f"\nwrote {jpath} and {mpath}" + (f"; kept {work}" if args.keep else ""))
    failed = [f"{c.source.case.key}/{r.tool}" for c in cases for r in c.tools
              if not r.unavailable and not r.verified]
    if failed:
        log(f"bench-transfer: results that failed verification: {', '.join(failed)}")
    return 1 if failed else 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
