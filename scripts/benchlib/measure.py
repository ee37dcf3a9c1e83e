"""One timed copy: a clean target, a cold page cache, the pipeline, a sync, the checks.

Each copy has two times. *Delivered*: from starting the copier to its exit,
when the data may still sit in the page cache. *Durable*: delivered plus a
``sync`` that makes the target durable, run as soon as the copier exits (and
before a tool's server, qemu-nbd, is stopped, so that nothing its shutdown
flushes escapes the timer). A migration must not drop its source before the
target is durable, so the durable time is the one compared.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .images import Source, allocated
from .tools import Peer, Tool, stop

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
#: How the target is made durable: ``file`` fsyncs the target and its directory
#: (``sync FILE DIR``), ``fs`` syncs the whole target file system (``sync -f``),
#: which also writes back whatever else is dirty on it.
SYNC_MODES = ("file", "fs")


@dataclass
class Outcome:
    """What a pipeline did: exit codes, wall time, its output."""

    returncodes: list[int]
    seconds: float
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)

    def error(self) -> str:
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s"
        lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
        return f"exit {self.returncodes}: {lines[-1].strip() if lines else 'no message'}"


@dataclass
class Run:
    """One measured copy and its verification."""

    seconds: float | None     # delivered: the copier's own run
    cmp_ok: bool
    digest_ok: bool | None     # None: coldferry checksum unavailable
    allocated: int
    summary: str               # the copier's last output line (coldferry's summary)
    error: str | None = None
    sync_seconds: float | None = None  # the sync after it

    @property
    def durable_seconds(self) -> float | None:
        """Delivered and made durable: the copier's run and the sync after it."""
        if self.seconds is None or self.sync_seconds is None:
            return None
        return self.seconds + self.sync_seconds

    @property
    def verified(self) -> bool:
        return self.error is None and self.cmp_ok and self.digest_ok is not False


def can_drop_caches() -> str | None:
    """None if the page cache can be dropped here, else why not."""
    try:
        settle(drop=True)
        return None
    except OSError as e:
        return e.strerror or str(e)


def settle(drop: bool) -> None:
    """Write back dirty pages and, with ``drop``, empty the page cache."""
    os.sync()
    if drop:
        DROP_CACHES.write_text("3\n")


def run_pipeline(stages: list[list[str]], timeout: float) -> Outcome:
    """Run ``stages`` connected by pipes; time from the first start to the last exit."""
    procs: list[subprocess.Popen] = []
    errs: list[IO[bytes]] = []
    out = tempfile.TemporaryFile()
    start = time.perf_counter()
    try:
        for i, argv in enumerate(stages):
            last = i == len(stages) - 1
            err = tempfile.TemporaryFile()
            errs.append(err)
            procs.append(subprocess.Popen(
                argv, stdin=procs[-1].stdout if procs else subprocess.DEVNULL,
                stdout=out if last else subprocess.PIPE, stderr=err))
            if i:
                procs[-2].stdout.close()  # so the writer sees EPIPE if the reader dies
        deadline = start + timeout
        timed_out = False
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        seconds = time.perf_counter() - start
    finally:
        for proc in procs:
            stop(proc, grace=2.0)
    stderr = "".join(_read(e) for e in errs)
    return Outcome([p.returncode for p in procs], seconds, _read(out), stderr, timed_out)


def sync_argv(target: Path, mode: str) -> list[str]:
    """The command that makes ``target`` durable, by ``mode`` (see SYNC_MODES)."""
    if mode == "fs":
        return ["sync", "-f", str(target)]
    return ["sync", str(target), str(target.parent)]


def make_durable(target: Path, mode: str, timeout: float) -> tuple[float, str | None]:
    """Seconds that ``sync`` took to make ``target`` durable, and an error if it failed."""
    outcome = run_pipeline([sync_argv(target, mode)], timeout)
    return outcome.seconds, None if outcome.ok else f"sync failed: {outcome.error()}"


def _read(f: IO[bytes]) -> str:
    f.seek(0)
    text = f.read().decode(errors="replace")
    f.close()
    return text


def digest(coldferry: Path, path: Path) -> str | None:
    """``coldferry checksum`` of ``path``, or None where it does not work."""
    try:
        done = subprocess.run([str(coldferry), "checksum", str(path)], capture_output=True,
                              text=True, timeout=3600)
    except OSError:
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    return done.stdout.split()[0]


def verify(source: Source, target: Path, source_digest: str | None, coldferry: Path) -> tuple[bool, bool | None]:
    """(cmp says identical, digests match or None) for a finished copy."""
    if not target.is_file():
        return False, None
    same = subprocess.run(["cmp", "-s", str(source.path), str(target)]).returncode == 0
    if source_digest is None:
        return same, None
    return same, digest(coldferry, target) == source_digest


def clean(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


def measure(tool: Tool, peer: Peer, source: Source, source_digest: str | None, dst_dir: Path,
            drop_caches: bool, timeout: float, sync_mode: str = "file") -> Run:
    """Copy ``source`` once with ``tool`` into an empty ``dst_dir``, make the target
    durable, and check the result."""
    clean(dst_dir)
    target = dst_dir / source.path.name
    settle(drop_caches)
    synced: tuple[float, str | None] = (0.0, None)
    try:
        with tool.prepare(peer, source.path, target, source.size) as stages:
            outcome = run_pipeline(stages, timeout)
            if outcome.ok:
                synced = make_durable(target, sync_mode, timeout)
    except (OSError, RuntimeError) as e:
        return Run(None, False, None, 0, "", f"set-up failed: {e}")
    last = (outcome.stdout.strip().splitlines() or [""])[-1]
    if not outcome.ok:
        return Run(outcome.seconds, False, None, 0, last, outcome.error())
    sync_seconds, sync_error = synced
    if sync_error:
        return Run(outcome.seconds, False, None, 0, last, sync_error, sync_seconds)
    cmp_ok, digest_ok = verify(source, target, source_digest, peer.coldferry)
    return Run(outcome.seconds, cmp_ok, digest_ok, allocated(target), last, None, sync_seconds)
