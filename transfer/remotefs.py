"""File operations on another host, confined to one directory, over SSH.

The driver needs a few things done on the destination before and after a
copy: make the instance directory, look for a shared-storage marker, check
free space, remove a partial copy. They go to ``coldferry remote-fs`` on
that host as JSON lines on its standard input, one process per session, so
no path ever reaches a remote shell, and the remote end refuses any name
outside the directory it was given.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from typing import IO, Any

from .ssh import paramiko

from . import ssh, wire
from .digest import file_digest
from .endpoint import Endpoint
from .errors import ConnectionLost, PathRefused, TransferError, from_remote
from .target import split_name

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


def _path(root: str, name: str) -> str:
    parts = split_name(root, name)
    path = root
    for part in parts[:-1]:
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise PathRefused(name=name, root=root, reason=f"component {part!r} is a symbolic link")
    return os.path.join(path, parts[-1])


def do(msg: dict[str, Any]) -> Any:
    """Carry out one operation on this host."""
    op, root = msg["op"], str(msg.get("root", ""))
    if op not in OPS:
        raise TransferError(reason=f"unknown remote-fs operation {op!r}")
    if not os.path.isabs(root) or not os.path.isdir(root):
        raise PathRefused(name="", root=root, reason="not an existing absolute directory")
    if op == "free":
        st = os.statvfs(root)
        return st.f_bavail * st.f_frsize
    path = _path(root, str(msg.get("name", "")))
    if op == "mkdir":
        os.makedirs(path, exist_ok=True)
    elif op == "exists":
        return os.path.lexists(path)
    elif op == "touch":
        with open(path, "ab"):
            pass
    elif op == "size":
        return os.lstat(path).st_size
    elif op == "digest":
        return file_digest(path)
    elif op == "rename":
        os.replace(path, _path(root, str(msg.get("new", ""))))
    elif op == "remove":
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
        else:
            return False
        return True
    return None


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
