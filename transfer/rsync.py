"""The rsync method: one file copied with rsync over OpenSSH, then verified.

``--sparse`` keeps holes unwritten on the target (rsync still reads and sends
them as zeros); an interrupted copy waits in ``.rsync-partial/`` next to the
target, never under its name, and the next run resumes from it. The image
digest is then computed on both ends and compared.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shlex
import stat
import subprocess
import tempfile
import threading
import time
from typing import IO, Callable, Iterable, Iterator

from .digest import PREFIX, file_digest
from .endpoint import Endpoint
from .errors import (AuthenticationFailed, DigestMismatch, HostKeyError, InvalidArgument, ProtocolError,
                     RemoteCommandFailed, RemoteError, RsyncFailed, SourceError, TargetExists,
                     TransferError)
from .options import CopyOptions
from .progress import Progress, ProgressCallback
from .result import CopyResult
from .target import RSYNC_PARTIAL_DIR
from .units import KiB

log = logging.getLogger(__name__)

Run = Callable[..., "subprocess.Popen[bytes]"]

#: Relative, so rsync creates it next to the target and removes it once used.
PARTIAL_DIR = RSYNC_PARTIAL_DIR
#: What rsync's -e splitting, ssh's option parser or its %/${} expansion would interpret.
_RESERVED = re.compile(r"""['"\\%$\x00-\x1f]""")
_PLAIN = re.compile(r"[\w@+=:,./-]+")
_PROGRESS = re.compile(r"^\s*(\d+)\s+(\d+)%\s+([\d.,]+)([kMGT]?)B/s\s+(\S+)(\s+\(xfr#)?")
_STATS = re.compile(r"^(Number of regular files transferred|Literal data|Total bytes sent): (\d+)", re.M)
#: ssh's "Permission denied (publickey)."; rsync's file errors end in "(13)" instead.
_LOGIN_DENIED = re.compile(r"Permission denied \([a-z][\w,-]*\)")
_UNITS = {"": 1, "k": KiB, "M": KiB**2, "G": KiB**3, "T": KiB**4}  # rsync: 1024-based

EXIT_MEANINGS = {
    1: "syntax or usage error (is rsync here too old?)", 2: "protocol incompatibility",
    3: "error selecting input/output files or directories", 4: "action not supported by the remote rsync",
    5: "error starting the client-server protocol", 10: "error in socket I/O (the connection broke)",
    11: "error in file I/O (is the target directory there and writable, with free space?)",
    12: "error in the rsync protocol data stream (the connection broke?)", 13: "program diagnostics",
    14: "error in IPC code", 15: "an rsync process crashed", 16: "an rsync process was killed",
    19: "received SIGUSR1", 20: "interrupted by a signal; run the copy again to resume",
    21: "waitpid() failed", 22: "out of memory",
    23: "partial transfer due to an error (what arrived is kept for resuming)",
    24: "the source vanished during the copy", 30: "timeout in data send/receive",
    35: "timeout waiting for daemon connection",
    127: "rsync is not installed on the remote host (remote command not found)",
}


def rsync_copy(src: str, dest: Endpoint, options: CopyOptions = CopyOptions(method="rsync"), *,
               overwrite: bool = False, progress: ProgressCallback | None = None,
               run: Run = subprocess.Popen, clock: Callable[[], float] = time.monotonic) -> CopyResult:
    """Copy the local file ``src`` to ``dest`` with rsync over SSH and verify it.

    :param src: local file to copy.
    :param dest: remote target file and how to reach its host.
    :param options: their method must be ``rsync``; of the rest only the bandwidth limit
        applies (0: none).
    :param overwrite: replace an existing target instead of refusing.
    :param progress: called with a Progress (bytes of the file, holes included).
    :param run: starts a process like subprocess.Popen (injectable for tests).
    :param clock: monotonic seconds (injectable for tests).
    :raises InvalidArgument: bad endpoint settings, or options of another method.
    :raises SourceError: ``src`` is missing or not a regular file.
    :raises TargetExists: the target exists and ``overwrite`` is false.
    :raises HostKeyError, AuthenticationFailed: SSH refused the host or the login.
    :raises RsyncFailed: rsync failed; the message explains its exit code.
    :raises DigestMismatch: the digests differ (the target is then removed).
    """
    options.require("rsync")
    size = _source_size(src)
    argv = rsync_argv(dest, options, overwrite=overwrite)
    checksum = checksum_command(dest)
    if dest.name in (".", ".."):
        raise InvalidArgument(what="destination path", value=dest.path, reason="name the destination file")
    log.info("rsync %s (%d bytes) to %s", src, size, dest)
    start = clock()
    try:
        with tempfile.TemporaryDirectory(prefix="coldferry-rsync-") as stage:
            # rsync copies into an existing directory named like the target; copying a
            # link named like the target into its parent directory makes that a conflict.
            link = os.path.join(stage, dest.name)
            os.symlink(os.path.abspath(src), link)
            stats = _run_rsync([*argv, link, _rsync_target(dest)], dest, size, progress, run)
        if not overwrite and stats["Number of regular files transferred"] == 0:
            raise TargetExists(path=str(dest))  # --ignore-existing skipped it
        digest = _verify(src, dest, checksum, run)
    except TransferError as e:  # the caller reports it; logged here for -v, with traceback for -vv
        log.info("rsync of %s to %s failed: %s", src, dest, e, exc_info=log.isEnabledFor(logging.DEBUG))
        raise
    # sent: rsync's literal data, holes included (it reads and sends them as zeros, so
    # skipped is 0); resumed: what the target already had (partial file, old target).
    literal = stats["Literal data"]
    result = CopyResult(method="rsync", size=size, sent=literal, wire=stats["Total bytes sent"],
                        skipped=0, resumed=max(size - literal, 0), seconds=clock() - start,
                        digest=digest)
    log.info("rsync of %s to %s done: %s", src, dest, result.summary())
    return result


def ssh_options(dest: Endpoint) -> list[str]:
    """OpenSSH client options for ``dest``: strict host keys, no prompts, dead peers noticed."""
    dest.validate()
    # ssh splits -o values on spaces unless double-quoted.
    opts = ["-p", str(dest.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f'UserKnownHostsFile="{_ssh_path("known_hosts file", dest.known_hosts)}"',
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=30", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    if dest.identity:
        opts += ["-i", _ssh_path("identity file", dest.identity), "-o", "IdentitiesOnly=yes"]
    return opts


def rsh_command(dest: Endpoint) -> str:
    """The single ``-e`` argument; rsync splits it on spaces, honouring single quotes."""
    return " ".join(a if _PLAIN.fullmatch(a) else f"'{a}'" for a in ["ssh", *ssh_options(dest)])


def rsync_argv(dest: Endpoint, options: CopyOptions = CopyOptions(method="rsync"), *,
               overwrite: bool = False) -> list[str]:
    """rsync's options; the source and target arguments follow.

    :raises InvalidArgument: options of another method (their bwlimit may be below rsync's 1 KiB/s).
    """
    options.require("rsync")
    # -s (--secluded-args, formerly --protect-args): names travel in rsync's protocol, not
    # through the remote shell; the short form is the one every rsync >= 3.0 knows.
    argv = ["rsync", "-s", "--copy-links", "--sparse", f"--partial-dir={PARTIAL_DIR}",
            "--info=progress2", "--stats", "--no-human-readable", "-e", rsh_command(dest)]
    if not overwrite:
        # Decided by the receiving rsync at copy time: no shell, no window between check and copy.
        argv.append("--ignore-existing")
    if options.bwlimit:  # at least 1 KiB/s, as CopyOptions ensures for rsync
        argv.append(f"--bwlimit={options.bwlimit // KiB}")  # KiB/s, rounded down: never above the limit
    return [*argv, "--"]


def parse_progress(line: str, total: int) -> Progress | None:
    """A Progress from one ``--info=progress2`` line, or None for other lines."""
    m = _PROGRESS.match(line)
    if not m:
        return None
    rate = float(m.group(3).replace(",", ".")) * _UNITS[m.group(4)]  # locale may print 1,5
    if m.group(6):  # the closing line shows the elapsed time where the ETA was
        return Progress(int(m.group(1)), total, rate, 0.0)
    t = re.fullmatch(r"(\d+):(\d\d):(\d\d)", m.group(5))
    eta = int(t.group(1)) * 3600 + int(t.group(2)) * 60 + int(t.group(3)) if t and rate else None
    return Progress(int(m.group(1)), total, rate, eta)


def parse_stats(text: str) -> dict[str, int]:
    """The ``--stats`` figures coldferry uses (rsync ran with --no-human-readable)."""
    stats = {k: int(v) for k, v in _STATS.findall(text)}
    if len(stats) != 3:
        raise ProtocolError(reason=f"rsync printed no complete --stats report: {text[-500:]!r}")
    return stats


def exit_error(code: int, stderr: Iterable[str], dest: Endpoint) -> TransferError:
    """The error for rsync's (or ssh's) exit ``code``, using the last lines of its stderr.

    ssh's own failures are recognised by its messages: rsync reports them as
    code 255 or 12, depending on which it notices first.
    """
    lines = [line.strip() for line in stderr if line.strip()]
    text = "\n".join(lines)
    if "Host key verification failed" in text:
        reason = ("it offered a different key than the one recorded (if the host was reinstalled, "
                  "remove the old key with ssh-keygen -R)" if "HAS CHANGED" in text else
                  next((x for x in lines if "host key" in x.lower()), "no key is recorded for it"))
        return HostKeyError(host=dest.host, known_hosts=dest.known_hosts, reason=reason.rstrip("."))
    login = next((x for x in lines if _LOGIN_DENIED.search(x)), None)
    if login:
        return AuthenticationFailed(host=dest.host, user=dest.user, reason=login.rstrip("."))
    meaning = (f"ssh could not reach {dest.host} port {dest.port} or the connection broke" if code == 255
               else EXIT_MEANINGS.get(code, "unknown exit code"))
    return RsyncFailed(code=code, meaning=meaning, detail="".join(f"\n  {x}" for x in lines[-6:]))


def _ssh_path(what: str, path: str) -> str:
    path = os.path.abspath(path)  # no ~ expansion by ssh
    if _RESERVED.search(path):
        raise InvalidArgument(what=what, value=path, reason="quotes, backslashes, '%', '$' and control "
                              "characters are not supported in this path; move or link the file")
    return path


def _rsync_target(dest: Endpoint) -> str:
    host = f"[{dest.host}]" if ":" in dest.host else dest.host
    return f"{dest.user}@{host}:{dest.root.rstrip('/')}/"


def _source_size(src: str) -> int:
    try:
        st = os.stat(src)
    except OSError as e:
        raise SourceError(path=src, reason=e.strerror or str(e)) from e
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(path=src, reason="not a regular file")
    return st.st_size


def _run_rsync(argv: list[str], dest: Endpoint, total: int, progress: ProgressCallback | None,
               run: Run) -> dict[str, int]:
    log.debug("running %s", shlex.join(argv))
    try:
        proc = run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        raise TransferError(reason=f"cannot run rsync on this host: {e}") from e
    tail: collections.deque[str] = collections.deque(maxlen=20)
    reader = threading.Thread(target=_drain, args=(proc.stderr, tail), daemon=True)
    reader.start()
    other: list[str] = []
    try:
        for line in _records(proc.stdout):
            snapshot = parse_progress(line, total)
            if snapshot is None:
                other.append(line)
            elif progress:
                progress(snapshot)
        code = proc.wait()
    except BaseException:
        proc.terminate()  # rsync keeps what arrived in the partial dir
        proc.wait()
        raise
    finally:
        reader.join()
    if code != 0:
        raise exit_error(code, tail, dest)
    return parse_stats("\n".join(other))


def _records(stream: IO[bytes]) -> Iterator[str]:
    """Lines of rsync's stdout, split at \\r (progress updates) as well as \\n."""
    pending = b""
    while chunk := stream.read1(65536):
        *done, pending = re.split(rb"[\r\n]", pending + chunk)
        yield from (x.decode(errors="replace") for x in done)
    if pending:
        yield pending.decode(errors="replace")


def _drain(stream: IO[bytes], tail: collections.deque[str]) -> None:
    for raw in stream:
        tail.append(raw.decode(errors="replace").rstrip())


def checksum_command(dest: Endpoint) -> list[str]:
    """``coldferry checksum PATH`` as the remote host runs it, derived from its receive command."""
    command = list(dest.remote_command)
    if not command or command[-1] != "receive":
        raise InvalidArgument(what="remote command", value=shlex.join(command),
                              reason="must end with 'receive', e.g. 'coldferry receive'")
    return [*command[:-1], "checksum", dest.path]


def _verify(src: str, dest: Endpoint, checksum: list[str], run: Run) -> str:
    """Compare the image digests of ``src`` and the target; remove the target if they differ."""
    proc = _ssh(dest, checksum, run)
    try:
        local = file_digest(src)  # while the remote host computes its own
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    remote = (_ssh_output(dest, proc, checksum).split() or [""])[0]
    if not remote.startswith(PREFIX):
        raise ProtocolError(reason=f"{shlex.join(checksum)!r} on {dest.host} printed no digest")
    if remote != local:
        log.error("digest mismatch for %s: %s here, %s on %s; removing the target", src, local, remote, dest)
        rm = ["rm", "-f", "--", dest.path]
        _ssh_output(dest, _ssh(dest, rm, run), rm)
        raise DigestMismatch(path=src, sender=local, receiver=remote)
    return local


def _ssh(dest: Endpoint, remote_argv: list[str], run: Run) -> "subprocess.Popen[bytes]":
    # sshd hands the command to the remote user's shell, so every word is quoted for it.
    argv = ["ssh", *ssh_options(dest), "-l", dest.user, "--", dest.host, shlex.join(remote_argv)]
    log.debug("running %s", shlex.join(argv))
    return run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _ssh_output(dest: Endpoint, proc: "subprocess.Popen[bytes]", command: list[str]) -> str:
    out, err = proc.communicate()
    lines = err.decode(errors="replace").splitlines()
    if proc.returncode == 255:
        raise exit_error(255, lines, dest)
    if proc.returncode in (126, 127):
        raise RemoteCommandFailed(host=dest.host, command=shlex.join(command), reason=" ".join(lines[-3:]))
    if proc.returncode != 0:
        raise RemoteError(host=dest.host, message=" ".join(lines[-3:]) or f"exit code {proc.returncode}")
    return out.decode(errors="replace")
