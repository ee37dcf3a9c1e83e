"""The resume check: kill a stream copy half way, rerun it, see what it sends again."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .images import Source
from .measure import clean, run_pipeline, settle, verify
from .results import RESUME_LIMIT, ResumeCheck
from .tools import Peer, coldferry_copy, stop, stream_options

_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SENT = re.compile(r"\bsent ([\d.]+) (B|KiB|MiB|GiB|TiB)\b")
_THERE = re.compile(r"([\d.]+) (B|KiB|MiB|GiB|TiB) already there")
POLL = 0.01


def parse_size(match: re.Match | None) -> int | None:
    return int(float(match.group(1)) * _UNITS[match.group(2)]) if match else None


def dir_allocated(directory: Path) -> int:
    """Allocated bytes of every file in ``directory`` (the hidden part file included)."""
    total = 0
    with os.scandir(directory) as it:
        for entry in it:
            try:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def interrupt(argv: list[str], dst_dir: Path, half: int, timeout: float,
              check: ResumeCheck) -> bool:
    """Start the copy and SIGKILL it once ``half`` bytes are allocated on the target.

    False if the copy ended first. (No time-based kill: at small scales the SSH
    set-up takes most of the run, and a timer would kill it before any data.)
    """
    out = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    start = time.perf_counter()
    try:
        while proc.poll() is None and time.perf_counter() - start < timeout:
            alloc = dir_allocated(dst_dir)
            elapsed = time.perf_counter() - start
            if alloc >= half:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                check.killed_at_seconds, check.killed_at_allocated = elapsed, alloc
                return True
            time.sleep(POLL)
        return False
    finally:
        stop(proc)
        out.seek(0)
        check.first_summary = out.read().decode(errors="replace").strip()[-500:]
        out.close()


def run(peer: Peer, source: Source, source_digest: str | None, dst_dir: Path,
        drop_caches: bool, timeout: float) -> ResumeCheck:
    """Interrupt a stream (direct) copy of ``source`` at about half its data, then rerun it."""
    check = ResumeCheck(data=source.data)
    clean(dst_dir)
    target = dst_dir / source.path.name
    argv = coldferry_copy(peer, source.path, target, *stream_options(peer, "direct"))
    settle(drop_caches)
    if not interrupt(argv, dst_dir, source.data // 2, timeout, check):
        check.verdict = "n/a"
        check.note = f"the first run ended before it could be interrupted: {check.first_summary[-200:]}"
        return check
    time.sleep(0.5)  # let the receiver notice its sender is gone
    if target.exists():
        check.verdict = "n/a"
        check.note = ("the kill came too late: the receiver had already completed the target "
                      "(too small a copy at this --scale)")
        return check
    settle(drop_caches)
    outcome = run_pipeline([argv], timeout)
    check.second_summary = (outcome.stdout.strip().splitlines() or [""])[-1]
    if not outcome.ok:
        check.verdict, check.note = "MISS", f"second run failed: {outcome.error()}"
        return check
    check.sent = parse_size(_SENT.search(check.second_summary))
    check.already_there = parse_size(_THERE.search(check.second_summary)) or 0
    cmp_ok, digest_ok = verify(source, target, source_digest, peer.coldferry)
    check.verified = cmp_ok and digest_ok is not False
    if check.sent is None:
        check.verdict, check.note = "MISS", "could not read 'sent' from the summary line"
    elif not check.verified:
        check.verdict = "MISS"
        check.note = "the resumed result differs from the source"
    else:
        check.verdict = "PASS" if check.fraction <= RESUME_LIMIT else "MISS"
        check.note = "sizes read from the summary line (0.1 unit precision)"
    return check
