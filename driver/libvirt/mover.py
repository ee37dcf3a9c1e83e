"""Moving an instance's files to another host: the copy plumbing of the libvirt driver.

Cold migration, pre-copy and live migration all use one ``DiskMover``: it
looks at the target through a remote file system (shared storage, free
space, the image cache), copies files with the configured copier
(``transfer.copy`` with the driver's CopyOptions) and removes partial
copies when a migration is undone.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid as uuidlib
from contextlib import AbstractContextManager
from typing import Callable, Generic, TypeVar

import transfer
from transfer.remotefs import RemoteFS
from transfer.result import CopyResult
from transfer.units import format_size

from ..errors import ImageError, InsufficientSpace
from ..model import DiskInfo, PhaseName, ProgressHook, Timeline
from . import images
from .config import DriverConfig
from .layout import Layout

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class DiskMover:
    """Copies files of this host's instances directory to the same path on another host.

    :param remote_fs: opens a RemoteFS on a host (transfer.remotefs.RemoteFS; tests pass a fake).
    :param runner: runs qemu-img, to read backing chains and flatten images.
    :param sleep: the copier's pause between retries.
    """

    def __init__(self, config: DriverConfig, remote_fs: Callable[..., RemoteFS], runner: images.Runner,
                 sleep: Callable[[float], None]) -> None:
        self.config = config
        self.layout = Layout(config.instances_path)
        self.remote_fs = remote_fs
        self.runner = runner
        self.sleep = sleep

    def endpoint(self, host: str, path: str) -> transfer.Endpoint:
        c = self.config
        return transfer.Endpoint(host=host, path=path, user=c.ssh_user, port=c.ssh_port, identity=c.ssh_identity,
                                 known_hosts=c.ssh_known_hosts, remote_command=c.remote_command)

    def remote(self, host: str) -> AbstractContextManager[RemoteFS]:
        """The instances directory of ``host``, as a remote file system (a context manager)."""
        return self.remote_fs(self.endpoint(host, "/"), self.config.instances_path)

    # -- looking at the target ----------------------------------------------------------

    def is_shared(self, rfs: RemoteFS) -> bool:
        """Whether both hosts see one instances directory: write a marker there, look for it here."""
        marker = f".coldferry-shared-{uuidlib.uuid4().hex}"
        rfs.touch(marker)
        try:
            return os.path.exists(os.path.join(self.config.instances_path, marker))
        finally:
            rfs.remove(marker)

    def backing_to_send(self, rfs: RemoteFS, disks: list[DiskInfo]) -> list[str]:
        """Backing files the target's image cache lacks (only with backing = send).

        :raises ImageError: a backing file outside the image cache, or a different
            file under the same name in the target's cache.
        """
        if self.config.backing != "send":
            return []
        cache = self.layout.cache_dir()
        needed: list[str] = []
        for disk in disks:
            for layer in images.chain(disk.path, self.runner)[1:]:
                if os.path.dirname(layer.path) != cache:
                    raise ImageError(path=layer.path, reason=f"backing file outside the image cache {cache}; "
                                                              "set backing = flatten to migrate it")
                name = Layout.cache_name(layer.path)
                if layer.path in needed:
                    continue
                if not rfs.exists(name):
                    needed.append(layer.path)
                elif rfs.digest(name) != transfer.file_digest(layer.path):
                    raise ImageError(path=layer.path, reason="the target's image cache holds a different file "
                                                              "under this name; remove it there or rename the base")
        return needed

    def check_space(self, rfs: RemoteFS, dest: str, uuid: str, disks: list[DiskInfo],
                    cache_needed: list[str]) -> None:
        """:raises InsufficientSpace: the disks (flattened, with backing = flatten) and the
        backing files to send do not fit the target's free space."""
        flatten = self.config.backing == "flatten"
        needed = sum(sum(layer.actual_size for layer in images.chain(d.path, self.runner))
                     if flatten and d.backing_file else d.disk_size for d in disks)
        needed += sum(os.stat(p).st_blocks * 512 for p in cache_needed)
        free = rfs.free()
        if needed > free:
            raise InsufficientSpace(host=dest, path=self.config.instances_path, uuid=uuid,
                                    free_h=format_size(free), needed_h=format_size(needed))

    # -- copying ----------------------------------------------------------------------

    def copy(self, src: str, dest: str, dest_path: str, progress: ProgressHook | None = None,
             timeline: Timeline | None = None, phase: PhaseName = PhaseName.COPY) -> CopyResult:
        """Copy local ``src`` to ``dest_path`` on host ``dest``, replacing it; verified by digest.

        Recorded on ``timeline`` as ``phase`` (copy, or precopy while the guest runs) with the
        file's name as detail.
        """
        name = os.path.basename(dest_path)
        report = (lambda p: progress(name, p)) if progress else None
        with (timeline or Timeline()).phase(phase, detail=name):
            return transfer.copy(src, self.endpoint(dest, dest_path), self.config.copy_options, overwrite=True,
                                 progress=report, sleep=self.sleep)

    def copy_disk(self, src: str, dest: str, disk: DiskInfo, progress: ProgressHook | None = None,
                  timeline: Timeline | None = None, phase: PhaseName = PhaseName.COPY) -> CopyResult:
        """Copy one disk to its path on ``dest``; merged with its backing chain first with backing = flatten."""
        if disk.backing_file and self.config.backing == "flatten":
            flat = src + ".flat"
            with (timeline or Timeline()).phase(PhaseName.FLATTEN, detail=os.path.basename(disk.path)):
                images.flatten(src, flat, self.runner)
            try:
                return self.copy(flat, dest, disk.path, progress, timeline, phase)
            finally:
                os.unlink(flat)
        return self.copy(src, dest, disk.path, progress, timeline, phase)

    def copy_cache(self, paths: list[str], dest: str, sent: list[str], progress: ProgressHook | None = None,
                   timeline: Timeline | None = None, phase: PhaseName = PhaseName.COPY) -> list[CopyResult]:
        """Copy backing files into ``dest``'s image cache; each name goes on ``sent`` before
        its copy starts, so that a failed copy's partial file is removed too."""
        out = []
        for path in paths:
            name = Layout.cache_name(path)
            sent.append(name)
            out.append(self.copy(path, dest, os.path.join(self.config.instances_path, name), progress,
                                 timeline, phase))
        return out

    def remove_on_dest(self, dest: str, names: list[str]) -> str:
        """Remove ``names`` (under instances_path) and their partial copies on ``dest``.

        Returns "" or, when that failed, a note for the error message saying what to remove by hand.
        """
        try:
            with self.remote(dest) as rfs:
                for name in names:
                    for leftover in (name, *transfer.partial_names(name)):
                        rfs.remove(leftover)
        except (transfer.TransferError, OSError) as e:
            log.error("could not remove the partial copy on %s: %s", dest, e)
            return f"; remove {', '.join(os.path.join(self.config.instances_path, n) for n in names)} on {dest} by hand"
        return ""


class Beside(Generic[_T]):
    """Runs ``work`` in a thread beside the ``with`` block, e.g. a small file's copy beside the disks'.

    Leaving the block waits for the thread, also when the block raised: nothing is left
    copying when a failure is undone. ``result()`` then returns what ``work`` returned or
    raises what it raised; when the block itself raised, its error wins and the thread's
    outcome is only logged.
    """

    def __init__(self, work: Callable[[], _T], name: str = "beside") -> None:
        self._work = work
        self._result: _T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._result = self._work()
        except BaseException as e:  # handed to result(), in the caller's thread
            self._error = e

    def __enter__(self) -> "Beside[_T]":
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._thread.join()
        if exc is not None and self._error is not None:
            log.warning("%s failed too, beside the failure being handled: %s", self._thread.name, self._error)

    def result(self) -> _T:
        """What ``work`` returned (after the block); raises what it raised."""
        if self._thread.is_alive():
            raise RuntimeError("Beside.result() asked for inside its block")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]
