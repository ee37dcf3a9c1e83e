"""How VHD files reach the destination host's SR directory.

The driver names files relative to the destination SR; a copier knows
where that SR is and how to get there. ``StreamCopier`` (the default) uses
coldferry's streaming copier over SSH; ``LocalCopier`` copies between
directories of this machine, for tests and demos with several stubbed
hosts. Both send only data (holes and zero runs are skipped), and both
verify the copy's digest before it takes the destination name.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import transfer
from transfer.digest import file_digest
from transfer.endpoint import DEFAULT_REMOTE_COMMAND
from transfer.extents import data_extents
from transfer.options import CopyOptions
from transfer.progress import Progress, ProgressCallback
from transfer.remotefs import RemoteFS
from transfer.result import CopyResult
from transfer.target import PART_SUFFIX

from ..errors import DriverError

class Copier(Protocol):
    """Copies files into the SR directory of a destination host."""

    def copy(self, src: str, dest: str, name: str, progress: ProgressCallback | None = None) -> CopyResult:
        """Copy local file ``src`` to ``name`` in ``dest``'s SR, replacing it; verified by digest.

        :param progress: called with a Progress as the copy goes on (possibly from other threads).
        """

    def remove(self, dest: str, name: str) -> None:
        """Remove ``name`` (and any partial copy of it) from ``dest``'s SR; no error if absent."""

    def free(self, dest: str) -> int:
        """Free bytes in ``dest``'s SR."""


@dataclass
class StreamCopier:
    """Copy with ``transfer.copy`` to an SR at the same path on every host.

    :param sr_path: the destination SR directory (``/var/run/sr-mount/<uuid>``).
    :param options: the copy's method and settings (the stream method by default).
    """

    sr_path: str
    ssh_user: str = "root"
    ssh_port: int = 22
    ssh_identity: str | None = None
    ssh_known_hosts: str = field(default_factory=lambda: os.path.expanduser("~/.ssh/known_hosts"))
    remote_command: tuple[str, ...] = DEFAULT_REMOTE_COMMAND
    options: CopyOptions = CopyOptions()

    def endpoint(self, dest: str, name: str) -> transfer.Endpoint:
        return transfer.Endpoint(host=dest, path=os.path.join(self.sr_path, name), user=self.ssh_user,
                                 port=self.ssh_port, identity=self.ssh_identity, known_hosts=self.ssh_known_hosts,
                                 remote_command=self.remote_command)

    def copy(self, src: str, dest: str, name: str, progress: ProgressCallback | None = None) -> CopyResult:
        return transfer.copy(src, self.endpoint(dest, name), self.options, overwrite=True, progress=progress)

    def remove(self, dest: str, name: str) -> None:
        with RemoteFS(self.endpoint(dest, "/"), self.sr_path) as rfs:
            for leftover in (name, *transfer.partial_names(name)):
                rfs.remove(leftover)

    def free(self, dest: str) -> int:
        with RemoteFS(self.endpoint(dest, "/"), self.sr_path) as rfs:
            return rfs.free()


@dataclass
class LocalCopier:
    """Copy into SR directories of this machine: ``dirs`` maps a host name to its SR directory.

    ``before_copy`` is called with the destination name before each copy
    (tests use it to fail a copy or to let the guest write meanwhile).
    """

    dirs: dict[str, str]
    before_copy: Callable[[str], None] | None = None
    clock: Callable[[], float] = time.monotonic
    chunk: int = 1 << 20

    def _dir(self, dest: str) -> str:
        try:
            return self.dirs[dest]
        except KeyError:
            raise DriverError(reason=f"cannot reach host {dest}: not among this copier's hosts "
                                     f"({', '.join(sorted(self.dirs))})") from None

    def copy(self, src: str, dest: str, name: str, progress: ProgressCallback | None = None) -> CopyResult:
        if self.before_copy:
            self.before_copy(name)
        target = os.path.join(self._dir(dest), name)
        part = os.path.join(self._dir(dest), f".{name}{PART_SUFFIX}")
        started = self.clock()
        sent = 0
        with open(src, "rb") as fin, open(part, "wb") as fout:
            size = os.fstat(fin.fileno()).st_size
            for offset, length in data_extents(fin.fileno(), size):
                for at in range(offset, offset + length, self.chunk):
                    data = os.pread(fin.fileno(), min(self.chunk, offset + length - at), at)
                    if data.count(0) != len(data):  # zero runs stay holes, as the stream copier leaves them
                        os.pwrite(fout.fileno(), data, at)
                        sent += len(data)
            fout.truncate(size)
        digest = file_digest(src)
        received = file_digest(part)
        if received != digest:
            os.unlink(part)
            raise transfer.DigestMismatch(path=target, sender=digest, receiver=received)
        os.replace(part, target)
        seconds = self.clock() - started
        if progress:
            progress(Progress(size, size, sent / seconds if seconds > 0 else 0.0, 0.0))
        return CopyResult("local", size, sent, sent, size - sent, 0, seconds, digest)

    def remove(self, dest: str, name: str) -> None:
        for leftover in (name, *transfer.partial_names(name)):
            try:
                os.unlink(os.path.join(self._dir(dest), leftover))
            except FileNotFoundError:
                pass

    def free(self, dest: str) -> int:
        st = os.statvfs(self._dir(dest))
        return st.f_bavail * st.f_frsize
