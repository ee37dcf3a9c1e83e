"""Persistent mount and UTS namespaces for lab hosts, and the mounts inside them.

``unshare --mount=FILE`` keeps a mount namespace alive after its last process
exits by bind-mounting ``/proc/<pid>/ns/mnt`` onto FILE. The kernel refuses that
bind mount when FILE sits on a shared mount (the namespace could end up
containing itself), so FILE's directory is first made a private bind mount of
itself, as ``ip netns`` does for /run/netns.

Inside the new namespace every mount is private: what the lab mounts there is
invisible to the machine and vanishes with the namespace.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

TIMEOUT = 20.0


def _unescape(field: str) -> str:
    """A mountinfo path field with its octal escapes (``\\040`` for a space) decoded."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode()


def mountpoints(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """Mount points of this process's mount namespace, in mount order."""
    return [_unescape(line.split()[4]) for line in mountinfo.read_text().splitlines()]


def is_mountpoint(path: Path | str) -> bool:
    return str(path) in mountpoints()


def mounts_under(top: Path | str) -> list[str]:
    """Mount points at or below ``top`` in this namespace, deepest (last mounted) first."""
    top = str(top).rstrip("/")
    return [m for m in reversed(mountpoints()) if m == top or m.startswith(top + "/")]


def _run(argv: Sequence[str]) -> None:
    log.debug("running %s", list(argv))
    done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with status {done.returncode}: "
                           f"{done.stderr.strip()}")


def make_private_dir(path: Path) -> None:
    """Create ``path`` and make it a private bind mount of itself (once)."""
    path.mkdir(parents=True, exist_ok=True)
    if not is_mountpoint(path):
        _run(["mount", "--bind", str(path), str(path)])
    _run(["mount", "--make-private", str(path)])


def create(mnt_file: Path, uts_file: Path, hostname: str) -> None:
    """A persistent mount namespace at ``mnt_file`` (all mounts private) and UTS namespace at
    ``uts_file`` whose hostname is ``hostname``."""
    for f in (mnt_file, uts_file):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch()
    log.info("creating mount namespace %s and UTS namespace %s", mnt_file, uts_file)
    _run(["unshare", f"--mount={mnt_file}", f"--uts={uts_file}", "--propagation", "private",
          "hostname", hostname])


def populate(enter: Sequence[str], binds: Sequence[tuple[Path, str]], detach: Sequence[str]) -> None:
    """Inside the namespaces ``enter`` leads into: lazily detach ``detach`` (copies of the
    machine's namespace mounts, which would pin those namespaces), bind-mount each
    (source, target) of ``binds``, and mount a fresh sysfs that shows the namespace's
    own network interfaces.

    enter: command prefix, e.g. ``["nsenter", "--net=...", "--mount=...", "--"]``.
    """
    for target in detach:
        probe = subprocess.run([*enter, "mountpoint", "-q", target], timeout=TIMEOUT)
        if probe.returncode == 0:
            _run([*enter, "umount", "--lazy", "--recursive", target])
    for source, target in binds:
        _run([*enter, "mount", "--bind", str(source), target])
    _run([*enter, "mount", "-t", "sysfs", "sysfs", "/sys"])


def unmount(path: Path) -> bool:
    """Detach ``path`` if it is a mount point in this namespace; True if it was one."""
    if not is_mountpoint(path):
        return False
    log.info("unmounting %s", path)
    _run(["umount", "--lazy", str(path)])
    return True
