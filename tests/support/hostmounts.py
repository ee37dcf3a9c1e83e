"""Mounts over a lab host's instances path, made inside the host's mount namespace only.

- ``shared_instances``: one directory mounted over the instances path of several hosts,
  as an NFS export would be, so that they share one instances directory (Nova's
  shared instance storage);
- ``small_instances``: a tmpfs of a few MiB over one host's instances path, to fill up.

Nothing is mounted in the root namespace, so ``lab down`` finds no mount left behind
even after a crash (the host namespaces and their mounts vanish with the lab). The root
namespace reaches what a host sees through ``/proc/<pid>/root`` of a process inside the
host (``host_view``). Each context manager unmounts what it mounted, also on failure.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.labhost import INSTANCES_PATH

log = logging.getLogger(__name__)

TIMEOUT = 20.0


def _run(host: Any, argv: Sequence[str]) -> subprocess.CompletedProcess:
    return host.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def _mount(host: Any, argv: Sequence[str]) -> None:
    done = _run(host, argv)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {host.name} failed ({done.returncode}): {done.stderr.strip()}")


def unmount_instances(host: Any) -> None:
    """Take the topmost mount off the host's instances path (lazily when it is busy)."""
    done = _run(host, ["umount", str(INSTANCES_PATH)])
    if done.returncode != 0:
        log.warning("umount %s in %s: %s; detaching it lazily", INSTANCES_PATH, host.name, done.stderr.strip())
        _mount(host, ["umount", "--lazy", str(INSTANCES_PATH)])


def host_view(host: Any) -> Path:
    """The host's instances path as the host sees it, reached from the root namespace
    through its libvirtd's mount namespace."""
    return Path(f"/proc/{host.pids['libvirtd'].pid}/root") / INSTANCES_PATH.relative_to("/")


@contextmanager
def shared_instances(hosts: Sequence[Any], directory: Path) -> Iterator[Path]:
    """Mount ``directory`` (made if missing) over the instances path of every host in
    ``hosts``; yields ``directory``, which is what each of them now sees there."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted: list[Any] = []
    try:
        for host in hosts:
            log.info("sharing %s as %s of %s", directory, INSTANCES_PATH, host.name)
            _mount(host, ["mount", "--bind", str(directory), str(INSTANCES_PATH)])
            mounted.append(host)
        yield directory
    finally:
        for host in reversed(mounted):
            unmount_instances(host)


@contextmanager
def small_instances(host: Any, size_mib: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size_mib`` MiB over the host's instances path; yields the
    host's view of it (see ``host_view``)."""
    log.info("mounting a %d MiB tmpfs over %s of %s", size_mib, INSTANCES_PATH, host.name)
    _mount(host, ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "coldferry-small",
                  str(INSTANCES_PATH)])
    try:
        yield host_view(host)
    finally:
        unmount_instances(host)
