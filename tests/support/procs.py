"""Processes of the lab: identity across restarts, namespace membership, bounded termination.

A pid alone is not an identity: after a crash the pid may belong to someone else.
A ``ProcRef`` pairs it with the process start time from ``/proc/<pid>/stat``, and
``in_namespaces`` finds processes by the inode of a namespace the lab made, so that
``lab down`` ends exactly the lab's processes (daemons, qemu, ssh sessions) and no
others.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcRef:
    """A process: its pid and its start time (clock ticks after boot)."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> "ProcRef | None":
        """The running process ``pid``, or None if there is none (or only a zombie)."""
        stat = _stat_fields(pid)
        if stat is None or stat[0] == "Z":
            return None
        return cls(pid, int(stat[19]))

    def alive(self) -> bool:
        """True while this very process (same pid, same start time) runs and is no zombie."""
        return ProcRef.of(self.pid) == self

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start": self.start}

    @classmethod
    def from_json(cls, data: dict[str, int]) -> "ProcRef":
        return cls(int(data["pid"]), int(data["start"]))


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2:].split()


def ns_id(path: Path | str) -> tuple[int, int] | None:
    """(device, inode) of a namespace file (``/proc/<pid>/ns/net``, a bind-mounted nsfs file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def in_namespaces(namespaces: Iterable[tuple[int, int]], kinds: Iterable[str] = ("net", "mnt", "uts"),
                  exclude: Iterable[int] = ()) -> list[ProcRef]:
    """Every live process that is a member of one of ``namespaces``.

    namespaces: (device, inode) pairs as ``ns_id`` returns them.
    kinds: which /proc/<pid>/ns entries to compare.
    exclude: pids never returned (the caller and its ancestors).
    """
    wanted = set(namespaces)
    skip = set(exclude)
    found: list[ProcRef] = []
    if not wanted:
        return found
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        if any(ns_id(entry / "ns" / kind) in wanted for kind in kinds):
            ref = ProcRef.of(int(entry.name))
            if ref is not None:
                found.append(ref)
    return found


def ancestors(pid: int | None = None) -> set[int]:
    """``pid`` (default: this process) and all its ancestors."""
    chain: set[int] = set()
    current = os.getpid() if pid is None else pid
    while current > 0 and current not in chain:
        chain.add(current)
        fields = _stat_fields(current)
        if fields is None:
            break
        current = int(fields[1])
    return chain


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our own exited child, so it does not stay a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def terminate(procs: Iterable[ProcRef], term_timeout: float = 10.0, kill_timeout: float = 5.0,
              sleep: Callable[[float], None] = time.sleep,
              clock: Callable[[], float] = time.monotonic) -> list[ProcRef]:
    """SIGTERM ``procs``, wait up to ``term_timeout``, SIGKILL the rest, wait up to ``kill_timeout``.

    Only processes whose start time still matches are signalled. Returns the ones
    still alive at the end (normally none: a process stuck in the kernel survives SIGKILL).
    """
    pending = [p for p in dict.fromkeys(procs) if p.alive()]
    for sig, timeout in ((signal.SIGTERM, term_timeout), (signal.SIGKILL, kill_timeout)):
        if not pending:
            break
        for proc in pending:
            log.debug("sending %s to pid %d", sig.name, proc.pid)
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = clock() + timeout
        while pending:
            for proc in pending:
                _reap(proc.pid)
            pending = [p for p in pending if p.alive()]
            if not pending or clock() >= deadline:
                break
            sleep(0.05)
        if pending and sig == signal.SIGTERM:
            log.warning("pids %s ignored SIGTERM for %.0f s; killing them",
                        [p.pid for p in pending], timeout)
    if pending:
        log.error("pids %s survived SIGKILL", [p.pid for p in pending])
    return pending


def descendants(pid: int) -> list[tuple[int, list[str]]]:
    """(pid, argv) of every process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[tuple[int, list[str]]] = []
    todo = [pid]
    while todo and len(found) < 10000:
        for child in children.get(todo.pop(), []):
            try:
                raw = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            found.append((child, [a.decode(errors="replace") for a in raw.split(b"\0") if a]))
            todo.append(child)
    return found
