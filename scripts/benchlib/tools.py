"""The copiers compared: coldferry's three ways and the peer tools.

Each tool turns (source, target) into a pipeline of argument lists; the
timer covers that pipeline and the sync after it (``measure``). nbdcopy's
qemu-nbd server is started (and its sparse target created) before the timer
and stopped after the sync, the way sshd is already running for the
SSH-based tools. coldferry's stream copies run with ``--fsync``, as
migrations do, so that their receiver makes the data durable itself.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

CIPHER = "aes128-gcm@openssh.com"
Pipeline = list[list[str]]


@dataclass(frozen=True)
class Peer:
    """How to reach the loopback sshd, and which coldferry to run."""

    host: str
    port: int
    user: str
    identity: Path
    known_hosts: Path
    coldferry: Path
    streams: int | None = None
    cipher: str = CIPHER

    def ssh_options(self) -> list[str]:
        """OpenSSH options shared by ssh, scp and rsync's ssh: strict host keys, one cipher."""
        return ["-F", "/dev/null", "-i", str(self.identity), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-c", self.cipher]

    def ssh(self) -> list[str]:
        return ["ssh", "-p", str(self.port), *self.ssh_options()]

    def remote(self, path: Path) -> str:
        return f"{self.user}@{self.host}:{path}"


@dataclass(frozen=True)
class Tool:
    """One copier. ``pipeline`` builds the timed command; ``prepare`` wraps it in set-up."""

    name: str
    label: str
    programs: tuple[str, ...]
    pipeline: Callable[[Peer, Path, Path, str], Pipeline]
    coldferry: bool = False
    server: Callable[[Path, int], contextlib.AbstractContextManager[str]] | None = field(default=None)

    @contextlib.contextmanager
    def prepare(self, peer: Peer, src: Path, dst: Path, size: int) -> Iterator[Pipeline]:
        if self.server is None:
            yield self.pipeline(peer, src, dst, "")
            return
        with self.server(dst, size) as address:
            yield self.pipeline(peer, src, dst, address)

    def missing(self, peer: Peer) -> list[str]:
        """Programs this tool needs that are not installed."""
        gone = [p for p in self.programs if shutil.which(p) is None]
        if self.coldferry and not peer.coldferry.exists():
            gone.append(str(peer.coldferry))
        return gone


def coldferry_copy(peer: Peer, src: Path, dst: Path, *options: str) -> list[str]:
    """``coldferry copy`` to the loopback sshd; ``options`` pick the method and its settings."""
    return [str(peer.coldferry), "copy", "--no-progress", "--ssh-port", str(peer.port),
            "--identity", str(peer.identity), "--known-hosts", str(peer.known_hosts),
            "--remote-command", shlex.join([str(peer.coldferry), "receive"]), *options,
            str(src), peer.remote(dst)]


def stream_options(peer: Peer, channel: str) -> list[str]:
    streams = ["--streams", str(peer.streams)] if peer.streams else []
    return ["--method", "stream", "--channel", channel, *streams]


def _stream(channel: str) -> Callable[[Peer, Path, Path, str], Pipeline]:
    # --no-resume: a timed run must never find a journal of an earlier one.
    # --fsync: the receiver flushes the file before it reports success, as in a migration.
    return lambda peer, src, dst, _: [coldferry_copy(peer, src, dst, *stream_options(peer, channel),
                                                     "--no-resume", "--fsync")]


def _coldferry_rsync(peer: Peer, src: Path, dst: Path, _: str) -> Pipeline:
    return [coldferry_copy(peer, src, dst, "--method", "rsync")]


def _rsync(peer: Peer, src: Path, dst: Path, _: str) -> Pipeline:
    return [["rsync", "--sparse", "-e", shlex.join(peer.ssh()), str(src), peer.remote(dst)]]


def _scp(peer: Peer, src: Path, dst: Path, _: str) -> Pipeline:
    # -O: the classic scp protocol; the SFTP one needs a Subsystem line the test sshd lacks.
    return [["scp", "-q", "-O", "-P", str(peer.port), *peer.ssh_options(), str(src), peer.remote(dst)]]


def _ssh_cat(peer: Peer, src: Path, dst: Path, _: str) -> Pipeline:
    return [["cat", str(src)],
            [*peer.ssh(), f"{peer.user}@{peer.host}", f"cat > {shlex.quote(str(dst))}"]]


def _nbdcopy(peer: Peer, src: Path, dst: Path, address: str) -> Pipeline:
    # The target is a fresh sparse file, so zero blocks need not be written at all.
    return [["nbdcopy", "--destination-is-zero", str(src), address]]


def _cp(peer: Peer, src: Path, dst: Path, _: str) -> Pipeline:
    return [["cp", "--sparse=always", str(src), str(dst)]]


@contextlib.contextmanager
def qemu_nbd(dst: Path, size: int, timeout: float = 10.0) -> Iterator[str]:
    """A writable qemu-nbd export of a new sparse ``dst`` on a loopback TCP port."""
    with open(dst, "wb") as f:
        f.truncate(size)
    port = free_port()
    # -e 4: allow nbdcopy's four multi-conn connections; -t: survive the probe below.
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-e", "4", "-b", "127.0.0.1",
                             "-p", str(port), str(dst)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening("127.0.0.1", port, proc, timeout)
        yield f"nbd://127.0.0.1:{port}"
    finally:
        stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {err.strip()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args[0]} did not listen on {host}:{port} within {timeout}s")


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End a process this benchmark started: TERM, then KILL after ``grace``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


TOOLS: dict[str, Tool] = {t.name: t for t in (
    Tool("cf-stream", "coldferry stream (direct)", (), _stream("direct"), coldferry=True),
    Tool("cf-stream-tls", "coldferry stream (tls)", (), _stream("tls"), coldferry=True),
    Tool("cf-stream-ssh", "coldferry stream (ssh)", (), _stream("ssh"), coldferry=True),
    Tool("cf-rsync", "coldferry rsync", ("rsync",), _coldferry_rsync, coldferry=True),
    Tool("rsync", "rsync --sparse -e ssh", ("rsync", "ssh"), _rsync),
    Tool("scp", "scp -O", ("scp",), _scp),
    Tool("ssh-cat", "cat | ssh 'cat > DST'", ("cat", "ssh"), _ssh_cat),
    Tool("nbdcopy", "nbdcopy -> qemu-nbd (tcp)", ("nbdcopy", "qemu-nbd"), _nbdcopy,
         server=qemu_nbd),
    Tool("cp", "cp --sparse=always (local)", ("cp",), _cp),
)}
BASELINE = "cf-stream"
