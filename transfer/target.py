"""Where the receiver writes: a name confined to the directory it serves.

The name is walked one component at a time from the served root with
O_NOFOLLOW, the root itself included, so no symbolic link, inside the root
or pointing out of it, is ever followed; ``..``, absolute names, empty
components and control characters are refused. The remote-fs helper
confines its names with the same walk (``open_parent``). Data goes to a
hidden ``.NAME.coldferry-part`` file beside the target, which must be a
file of its own (one link), and is renamed into place only after both ends'
digests match; without ``--overwrite`` that rename never replaces a file.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat

from .errors import PathRefused, TargetExists, UnsafeFile

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
_RENAME_NOREPLACE = 1
_renameat2 = getattr(_libc, "renameat2", None)  # glibc 2.28 and later
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


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
        dir_fd, base = open_parent(root, name, create=True)
        return cls(root, name, dir_fd, base)

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.name)

    def check_writable(self, overwrite: bool) -> None:
        """Refuse a symlink at the target, a part file or journal with other links, and an
        existing file unless ``overwrite``."""
        for entry in (self.base, self.part, self.journal):
            st = self._lstat(entry)
            if st and not stat.S_ISREG(st.st_mode):
                raise PathRefused(name=self.name, root=self.root,
                                  reason=f"{entry!r} exists and is not a regular file")
            if st and entry != self.base:
                require_own(st, self.beside(entry))
        if self._lstat(self.base) and not overwrite:
            raise TargetExists(path=self.path)

    def has_part(self) -> bool:
        return self._lstat(self.part) is not None

    def part_allocated(self) -> int:
        st = self._lstat(self.part)
        return st.st_blocks * 512 if st else 0

    def beside(self, entry: str) -> str:
        """The full name of ``entry`` in the target's directory."""
        return os.path.join(os.path.dirname(self.path), entry)

    def open_part(self, size: int, fresh: bool) -> int:
        """The part file, open, ``size`` bytes long; emptied first if ``fresh``.

        :raises UnsafeFile: it is not a file of its own (checked before anything is written).
        """
        fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.dir_fd)
        try:
            require_own(os.fstat(fd), self.beside(self.part))
            if fresh:
                os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
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

    def commit(self, overwrite: bool) -> None:
        """Move the finished part file into place.

        :raises TargetExists: without ``overwrite``, a file that appeared at the target
            since ``check_writable``; it is left as it is, and so is the part file.
        """
        if overwrite:
            os.replace(self.part, self.base, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        else:
            try:
                rename_noreplace(self.part, self.base, self.dir_fd)
            except FileExistsError:
                raise TargetExists(path=self.path) from None
        os.fsync(self.dir_fd)

    def exists(self, entry: str) -> bool:
        return self._lstat(entry) is not None

    def discard(self, entries: tuple[str, ...] | None = None) -> None:
        """Remove the part file and journal, or those of them in ``entries``."""
        for entry in (self.part, self.journal) if entries is None else entries:
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


def require_own(st: os.stat_result, path: str) -> None:
    """Refuse to write a file that is not a regular file of one link: through a hard link,
    writing would change another file too.

    :raises UnsafeFile: naming ``path``.
    """
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(path=path, reason="it is not a regular file")
    if st.st_nlink != 1:
        raise UnsafeFile(path=path, reason=f"it has {st.st_nlink} links (a hard link to another file "
                                           "would be written through)")


def rename_noreplace(src: str, dst: str, dir_fd: int) -> None:
    """Rename ``src`` to ``dst``, both in ``dir_fd``, in one step that fails if ``dst`` exists.

    renameat2(RENAME_NOREPLACE) where the C library and file system have it, else a hard
    link (which never replaces either) and an unlink.

    :raises FileExistsError: ``dst`` exists.
    """
    if _renameat2 is not None:
        if _renameat2(dir_fd, os.fsencode(src), dir_fd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: a file system without the flag
            raise OSError(err, os.strerror(err), dst)
    os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    os.unlink(src, dir_fd=dir_fd)


def open_root(root: str, name: str = "") -> int:
    """The served directory ``root``, open; it may not itself be a symbolic link.

    :raises PathRefused: naming ``name``, the request it was opened for.
    """
    if not os.path.isabs(root):
        raise PathRefused(name=name, root=root, reason="the served directory must be an absolute path")
    try:
        return os.open(root, _DIR_FLAGS)
    except OSError as e:
        raise PathRefused(name=name, root=root, reason=f"the served directory{_why(e, root)}") from None


def open_parent(root: str, name: str, create: bool) -> tuple[int, str]:
    """The directory that holds ``name`` under ``root``, open, and the name's last component.

    Every component is opened with O_NOFOLLOW from the one before it, starting at the
    root, so nothing done through the descriptor can land outside the root, whatever
    is renamed or linked meanwhile.

    :param create: make missing directories on the way.
    :raises PathRefused: a name that is not a plain relative one, or a root or component
        that is a symbolic link or not a directory.
    :raises FileNotFoundError: a missing component, when not ``create``.
    """
    parts = split_name(root, name)
    fd = open_root(root, name)
    for part in parts[:-1]:
        try:
            nfd = _open_dir(fd, part, create, name, root)
        finally:
            os.close(fd)
        fd = nfd
    return fd, parts[-1]


def _open_dir(fd: int, part: str, create: bool, name: str, root: str) -> int:
    if create:
        try:
            os.mkdir(part, 0o755, dir_fd=fd)
        except FileExistsError:
            pass
        except OSError as e:
            raise PathRefused(name=name, root=root, reason=f"cannot create {part!r}: {e.strerror}") from None
    try:
        return os.open(part, _DIR_FLAGS, dir_fd=fd)
    except OSError as e:
        if e.errno == errno.ENOENT and not create:
            raise
        raise PathRefused(name=name, root=root, reason=f"component {part!r}{_why(e, part, fd)}") from None


def _why(e: OSError, entry: str, dir_fd: int | None = None) -> str:
    """Why a directory could not be opened with O_NOFOLLOW, in words."""
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        try:
            link = stat.S_ISLNK(os.lstat(entry, dir_fd=dir_fd).st_mode)
        except OSError:
            link = False
        return " is a symbolic link" if link else " is not a directory"
    return f": {e.strerror or e}"


def split_name(root: str, name: str) -> list[str]:
    """The components of ``name``, a plain relative name (``root`` only names it in a refusal)."""
    if _CONTROL.search(name):
        raise PathRefused(name=name, root=root,
                          reason="control characters (newlines, tabs, escapes) are not allowed in names")
    if not name or os.path.isabs(name):
        raise PathRefused(name=name, root=root, reason="give a relative name inside the served directory")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise PathRefused(name=name, root=root, reason="'..', '.' and empty components are not allowed")
        if len(os.fsencode(f".{part}{JOURNAL_SUFFIX}")) > 255:
            raise PathRefused(name=name, root=root, reason=f"component {part[:40]!r}... is too long")
    return parts
