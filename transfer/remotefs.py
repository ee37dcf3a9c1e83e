"""File operations on another host, confined to one directory, over SSH.

The driver needs a few things done on the destination before and after a
copy: make the instance directory, look for a shared-storage marker, check
free space, remove a partial copy. They go to ``coldferry remote-fs`` on
that host as JSON lines on its standard input, one process per session, so
no path ever reaches a remote shell, and the remote end refuses any name
outside the directory it was given: it walks every name from that directory
with O_NOFOLLOW the way the receiver does (``target.open_parent``) and works
on the last component through the directory it opened, so a symbolic link
is never followed, not even one made after any check.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
from typing import IO, Any, Callable

from .ssh import paramiko

from . import ssh, wire
from .digest import file_digest
from .endpoint import Endpoint
from .errors import ConnectionLost, TransferError, from_remote
from .target import open_parent, open_root

log = logging.getLogger(__name__)

OPS = ("mkdir", "remove", "exists", "touch", "free", "digest", "rename", "size")


class RemoteFS:
    """A session of file operations under ``root`` on ``ep.host``."""

    def __init__(self, ep: Endpoint, root: str) -> None:
        self.ep = ep
        self.root = root
        self._client: paramiko.SSHClient | None = None
        self._proc: ssh.RemoteProcess | None = None

    def _call(self, op: str, **args: Any) -> Any:
        if self._proc is None:
            self._client = ssh.connect(self.ep)
            self._proc = ssh.RemoteProcess(self._client, self.ep.command("remote-fs"), self.ep.host)
        try:
            wire.send_message(self._proc.stdin, op, root=self.root, **args)
            msg = wire.read_message(self._proc.stdout)
        except EOFError:
            raise self._proc.failed_to_start() from None
        except (OSError, paramiko.SSHException) as e:
            raise ConnectionLost(host=self.ep.host, reason=str(e)) from None
        if msg["op"] == "error":
            raise from_remote(msg.get("kind", ""), msg.get("message", "?"), self.ep.host)
        return msg.get("result")

    def mkdir(self, name: str) -> None:
        self._call("mkdir", name=name)

    def remove(self, name: str) -> bool:
        """Remove a file or a directory tree; False if there was nothing."""
        return bool(self._call("remove", name=name))

    def exists(self, name: str) -> bool:
        return bool(self._call("exists", name=name))

    def touch(self, name: str) -> None:
        self._call("touch", name=name)

    def rename(self, name: str, new: str) -> None:
        self._call("rename", name=name, new=new)

    def free(self) -> int:
        return int(self._call("free"))

    def size(self, name: str) -> int:
        return int(self._call("size", name=name))

    def digest(self, name: str) -> str:
        return str(self._call("digest", name=name))

    def close(self) -> None:
        if self._proc:
            self._proc.close()
            self._proc = None
        if self._client:
            self._client.close()
            self._client = None

    def __enter__(self) -> "RemoteFS":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def do(msg: dict[str, Any]) -> Any:
    """Carry out one operation on this host."""
    op, root = msg["op"], str(msg.get("root", ""))
    if op not in OPS:
        raise TransferError(reason=f"unknown remote-fs operation {op!r}")
    name = str(msg.get("name", ""))
    if op == "free":
        fd = open_root(root, name)
        try:
            st = os.fstatvfs(fd)
        finally:
            os.close(fd)
        return st.f_bavail * st.f_frsize
    try:
        dir_fd, base = open_parent(root, name, create=op == "mkdir")
    except FileNotFoundError:
        if op in ("exists", "remove"):
            return False  # nothing there
        raise
    try:
        return _OPS[op](dir_fd, base, msg)
    finally:
        os.close(dir_fd)


def _mkdir(dir_fd: int, base: str, msg: dict[str, Any]) -> None:
    try:
        os.mkdir(base, 0o755, dir_fd=dir_fd)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(base, dir_fd=dir_fd).st_mode):
            raise


def _exists(dir_fd: int, base: str, msg: dict[str, Any]) -> bool:
    try:
        os.lstat(base, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _touch(dir_fd: int, base: str, msg: dict[str, Any]) -> None:
    os.close(os.open(base, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=dir_fd))


def _size(dir_fd: int, base: str, msg: dict[str, Any]) -> int:
    return os.lstat(base, dir_fd=dir_fd).st_size


def _digest(dir_fd: int, base: str, msg: dict[str, Any]) -> str:
    fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return file_digest(f"/proc/self/fd/{fd}")  # the file just opened, not the name again
    finally:
        os.close(fd)


def _rename(dir_fd: int, base: str, msg: dict[str, Any]) -> None:
    new_fd, new_base = open_parent(str(msg["root"]), str(msg.get("new", "")), create=False)
    try:
        os.replace(base, new_base, src_dir_fd=dir_fd, dst_dir_fd=new_fd)
    finally:
        os.close(new_fd)


def _remove(dir_fd: int, base: str, msg: dict[str, Any]) -> bool:
    try:
        st = os.lstat(base, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(base, dir_fd=dir_fd)  # descends by descriptor, never through a link
    else:
        os.unlink(base, dir_fd=dir_fd)
    return True


_OPS: dict[str, Callable[[int, str, dict[str, Any]], Any]] = {
    "mkdir": _mkdir, "exists": _exists, "touch": _touch, "size": _size, "digest": _digest,
    "rename": _rename, "remove": _remove,
}


def serve(inp: IO[bytes], out: IO[bytes]) -> int:
    """Answer operations until the input ends."""
    while True:
        try:
            msg = wire.read_message(inp)
        except EOFError:
            return 0
        try:
            result = do(msg)
        except TransferError as e:
            wire.send_message(out, **e.to_dict())
            continue
        except OSError as e:
            err = TransferError(reason=f"{msg.get('op')} {msg.get('name', '')!r}: {e.strerror or e}")
            wire.send_message(out, **err.to_dict())
            continue
        wire.send_message(out, "ok", result=result)


def serve_stdio() -> int:
    return serve(sys.stdin.buffer, sys.stdout.buffer)
