"""Where the receiver writes: a name confined to the directory it serves.

The name is walked one component at a time from the served root with
O_NOFOLLOW, so no symbolic link, inside the root or pointing out of it, is
ever followed; ``..``, absolute names and empty components are refused.
Data goes to a hidden ``.NAME.coldferry-part`` file beside the target and
is renamed into place only after both ends' digests match.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from .errors import PathRefused, TargetExists

PART_SUFFIX = ".coldferry-part"
JOURNAL_SUFFIX = ".coldferry-journal"
RSYNC_PARTIAL_DIR = ".rsync-partial"


def partial_names(name: str) -> list[str]:
    """What an interrupted copy to ``name`` (relative) may leave beside it, by either method."""
    head, base = os.path.split(name)
    return [os.path.join(head, f".{base}{PART_SUFFIX}"), os.path.join(head, f".{base}{JOURNAL_SUFFIX}"),
            os.path.join(head, RSYNC_PARTIAL_DIR, base)]
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class Target:
    """The destination of one copy, with its parent directory held open."""

    def __init__(self, root: str, name: str, dir_fd: int, base: str) -> None:
        self.root = root
        self.name = name
        self.dir_fd = dir_fd
        self.base = base
        self.part = f".{base}{PART_SUFFIX}"
        self.journal = f".{base}{JOURNAL_SUFFIX}"

    @classmethod
    def resolve(cls, root: str, name: str) -> "Target":
        """Validate ``name`` under ``root`` and open (creating) its parent directories."""
        parts = split_name(root, name)
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise PathRefused(name=name, root=root, reason=f"served directory: {e.strerror}") from None
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            except OSError as e:
                os.close(fd)
                raise PathRefused(name=name, root=root, reason=f"cannot create {part!r}: {e.strerror}") from None
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                why = e.strerror
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    link = stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode)
                    why = "is a symbolic link" if link else "is not a directory"
                os.close(fd)
                raise PathRefused(name=name, root=root, reason=f"component {part!r} {why}") from None
            os.close(fd)
            fd = nfd
        return cls(root, name, fd, parts[-1])

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.name)

    def check_writable(self, overwrite: bool) -> None:
        """Refuse a symlink at the target, and an existing file unless ``overwrite``."""
        for entry in (self.base, self.part, self.journal):
            st = self._lstat(entry)
            if st and not stat.S_ISREG(st.st_mode):
                raise PathRefused(name=self.name, root=self.root,
                                  reason=f"{entry!r} exists and is not a regular file")
        if self._lstat(self.base) and not overwrite:
            raise TargetExists(path=self.path)

    def has_part(self) -> bool:
        return self._lstat(self.part) is not None

    def part_allocated(self) -> int:
        st = self._lstat(self.part)
        return st.st_blocks * 512 if st else 0

    def open_part(self, size: int, fresh: bool) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        if fresh:
            flags |= os.O_TRUNC
        fd = os.open(self.part, flags, 0o600, dir_fd=self.dir_fd)
        os.ftruncate(fd, size)
        return fd

    def open_direct(self, fd: int) -> int:
        """A second, O_DIRECT descriptor of the part file open as ``fd``; -1 where the
        file system has no O_DIRECT (tmpfs) or the name no longer leads to that file."""
        try:
            dfd = os.open(self.part, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_DIRECT,
                          dir_fd=self.dir_fd)
        except OSError:
            return -1
        a, b = os.fstat(fd), os.fstat(dfd)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            os.close(dfd)
            return -1
        return dfd

    def free_bytes(self) -> int:
        st = os.fstatvfs(self.dir_fd)
        return st.f_bavail * st.f_frsize

    def commit(self) -> None:
        """Move the finished part file into place."""
        os.replace(self.part, self.base, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)

    def discard(self) -> None:
        for entry in (self.part, self.journal):
            try:
                os.unlink(entry, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def _lstat(self, entry: str) -> os.stat_result | None:
        try:
            return os.lstat(entry, dir_fd=self.dir_fd)
        except FileNotFoundError:
            return None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range so it reads as zeros; writes zeros where punching is unsupported."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))
    zeros = bytes(min(length, 1 << 20))
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, zeros[:end - offset], offset)


def split_name(root: str, name: str) -> list[str]:
    if not os.path.isabs(root):
        raise PathRefused(name=name, root=root, reason="the served directory must be an absolute path")
    if not name or "\0" in name or os.path.isabs(name):
        raise PathRefused(name=name, root=root, reason="give a relative name inside the served directory")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise PathRefused(name=name, root=root, reason="'..', '.' and empty components are not allowed")
        if len(os.fsencode(f".{part}{JOURNAL_SUFFIX}")) > 255:
            raise PathRefused(name=name, root=root, reason=f"component {part[:40]!r}... is too long")
    return parts
