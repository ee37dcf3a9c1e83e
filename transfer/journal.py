"""The receiver's resume journal: which blocks are already on disk.

A header line (JSON: size, chunk size, source identity) and then one fixed
record per completed block (index, XXH3-128 of its content), appended with
a single write() after the block's data is written, so a receiver killed at
any moment leaves a journal that only names blocks that were written. On
resume the receiver re-reads and re-hashes every journalled block before
trusting it; a block that does not match is sent again.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
import time

from .errors import StaleResume, TransferError
from .target import require_own

RECORD = struct.Struct("<Q16s")
LOCK_WAIT = 30.0


class Journal:
    """An open journal; ``entries`` maps block index to block hash."""

    def __init__(self, path: str, fd: int, entries: dict[int, bytes]) -> None:
        self.path = path
        self._fd = fd
        self.entries = entries
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str, identity: dict, target: str, restart: bool,
             dir_fd: int | None = None, lock_wait: float = LOCK_WAIT) -> "Journal":
        """Open or create the journal at ``path``.

        An existing journal for a different ``identity`` raises StaleResume
        unless ``restart``; with ``restart`` it is discarded. Waits up to
        ``lock_wait`` seconds for a previous receiver of the same target to
        let go of it. One with other links raises UnsafeFile before it is
        changed.
        """
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_APPEND | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        try:
            require_own(os.fstat(fd), os.path.join(os.path.dirname(target), path))
            _lock(fd, lock_wait, target)
            header = json.dumps(identity, sort_keys=True).encode() + b"\n"
            entries, valid = ({}, 0) if restart else _load(fd, header, target)
            if restart or valid == 0:
                os.ftruncate(fd, 0)
                os.write(fd, header)
            else:  # cut a torn last record off, or new records would be out of step
                os.ftruncate(fd, valid)
            return cls(path, fd, entries)
        except BaseException:
            os.close(fd)
            raise

    def record(self, index: int, digest: bytes) -> None:
        rec = RECORD.pack(index, digest)
        with self._lock:
            os.write(self._fd, rec)
            self.entries[index] = digest

    def forget(self, indexes: list[int]) -> None:
        """Drop entries that failed re-verification and rewrite the journal."""
        with self._lock:
            for i in indexes:
                self.entries.pop(i, None)
            os.lseek(self._fd, 0, os.SEEK_SET)
            header = _read_header(self._fd)
            os.ftruncate(self._fd, 0)
            os.write(self._fd, header + b"".join(RECORD.pack(i, h) for i, h in self.entries.items()))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self, dir_fd: int | None = None) -> None:
        self.close()
        try:
            os.unlink(self.path, dir_fd=dir_fd)
        except FileNotFoundError:
            pass


def _lock(fd: int, wait: float, target: str) -> None:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TransferError(reason=f"another copy to {target} is still running; "
                                           "wait for it to end or stop it") from None
            time.sleep(0.1)


def _read_header(fd: int) -> bytes:
    head = b""
    while not head.endswith(b"\n"):
        chunk = os.pread(fd, 4096, len(head))
        if not chunk:
            break
        nl = chunk.find(b"\n")
        head += chunk if nl < 0 else chunk[:nl + 1]
    return head


def _load(fd: int, header: bytes, target: str) -> tuple[dict[int, bytes], int]:
    """The entries of an existing journal and the length of its intact part."""
    size = os.fstat(fd).st_size
    if size == 0:
        return {}, 0
    found = _read_header(fd)
    if found != header:
        try:
            old, new = json.loads(found), json.loads(header)
            reason = ", ".join(f"{k} was {old.get(k)!r}" for k in sorted(old.keys() | new.keys())
                               if old.get(k) != new.get(k))
        except ValueError:
            reason = "unreadable journal"
        raise StaleResume(path=target, reason=reason or "different settings")
    body = os.pread(fd, size - len(found), len(found))
    whole = len(body) - len(body) % RECORD.size  # a torn last record is ignored
    return {i: h for i, h in RECORD.iter_unpack(body[:whole])}, len(found) + whole
