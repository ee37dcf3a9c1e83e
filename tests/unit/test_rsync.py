"""The rsync method without daemons: argument lists, rsync's output, exit codes.

Processes are faked by ``FakeRun``, which hands out scripted processes in
order and records the argument lists it was given.
"""

from __future__ import annotations

import io
import os
import shlex

import pytest

from transfer import rsync
from transfer.digest import file_digest
from transfer.endpoint import Endpoint
from transfer.errors import (AuthenticationFailed, DigestMismatch, HostKeyError, InvalidArgument,
                             ProtocolError, RemoteCommandFailed, RsyncFailed, SourceError,
                             TargetExists)
from transfer.options import CopyOptions
from transfer.progress import Progress
from transfer.units import KiB, MiB

NASTY = "a b;$(touch x)'\""

# Captured from rsync 3.5.0 (--info=progress2 --stats --no-human-readable --bwlimit=1024).
PROGRESS_OUT = (
    b"\r          32768   1%    0.00kB/s    0:00:00  \r        1212416  38%    1.00MB/s    0:00:01  "
    b"\r        2260992  71%    1.00MB/s    0:00:00  "
    b"\r        3145728 100%    1.03MB/s    0:00:02 (xfr#1, to-chk=0/1)"
    b"\r        3145728 100% 1014.01kB/s    0:00:02 (xfr#1, to-chk=0/1)\n\n")
STATS_OUT = (
    b"Number of files: 1 (reg: 1)\nNumber of created files: 1 (reg: 1)\nNumber of deleted files: 0\n"
    b"Number of regular files transferred: 1\nTotal file size: 3145728 bytes\n"
    b"Total transferred file size: 3145728 bytes\nLiteral data: 2097152 bytes\n"
    b"Matched data: 1048576 bytes\nFile list size: 0\nFile list generation time: 0.001 seconds\n"
    b"File list transfer time: 0.000 seconds\nTotal bytes sent: 2146569\nTotal bytes received: 35\n\n"
    b"sent 2146569 bytes  received 35 bytes  699245.33 bytes/sec\ntotal size is 3145728  speedup is 1.47\n")
# What rsync prints when --ignore-existing (or an up-to-date target) left the file alone.
SKIPPED_STATS = (
    b"\r              0   0%    0.00kB/s    0:00:00 (xfr#0, to-chk=0/1)\n\nNumber of files: 1 (reg: 1)\n"
    b"Number of created files: 0\nNumber of deleted files: 0\nNumber of regular files transferred: 0\n"
    b"Total file size: 3145728 bytes\nTotal transferred file size: 0 bytes\nLiteral data: 0 bytes\n"
    b"Matched data: 0 bytes\nFile list size: 0\nTotal bytes sent: 43\nTotal bytes received: 12\n")

HOST_KEY_CHANGED = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
Host key for [127.0.0.1]:46347 has changed and you have requested strict checking.
Host key verification failed.
rsync: connection unexpectedly closed (0 bytes received so far) [sender]
rsync error: unexplained error (code 255) at io.c(285) [sender=3.5.0]
""".splitlines()
HOST_KEY_UNKNOWN = [
    "No ED25519 host key is known for [127.0.0.1]:46347 and you have requested strict checking.",
    "Host key verification failed.",
    "rsync: connection unexpectedly closed (0 bytes received so far) [sender]",
    "rsync error: unexplained error (code 255) at io.c(285) [sender=3.5.0]"]


class FakeProc:
    """A finished process with scripted output."""

    def __init__(self, stdout: bytes = b"", stderr: bytes = b"", returncode: int = 0) -> None:
        self.stdout = io.BytesIO(stdout)
        self.stderr = io.BytesIO(stderr)
        self._code = returncode
        self.returncode: int | None = None
        self.terminated = False

    def wait(self) -> int:
        self.returncode = self._code
        return self._code

    def communicate(self) -> tuple[bytes, bytes]:
        self.wait()
        return self.stdout.read(), self.stderr.read()

    def terminate(self) -> None:
        self.terminated = True

    kill = terminate


class FakeRun:
    def __init__(self, *procs: FakeProc) -> None:
        self.procs = list(procs)
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kwargs: object) -> FakeProc:
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        assert "shell" not in kwargs
        self.calls.append(argv)
        return self.procs.pop(0)


def split_like_rsync(cmd: str) -> list[str]:
    """rsync's own splitting of -e (main.c do_cmd): spaces, quotes, doubled quotes, no backslashes."""
    args, cur, quote, i, started = [], "", "", 0, False
    while i < len(cmd):
        c = cmd[i]
        if quote:
            if c == quote and cmd[i + 1:i + 2] == quote:
                cur, i = cur + c, i + 2
                continue
            if c == quote:
                quote = ""
            else:
                cur += c
        elif c in "'\"":
            quote, started = c, True
        elif c == " ":
            if started:
                args.append(cur)
            cur, started = "", False
        else:
            cur, started = cur + c, True
        i += 1
    assert not quote, f"unbalanced quote in {cmd!r}"
    return args + [cur] if started else args


@pytest.fixture
def files(tmp_path):
    (tmp_path / "ssh dir").mkdir()
    known_hosts = tmp_path / "ssh dir" / "known hosts"
    known_hosts.write_text("")
    identity = tmp_path / "ssh dir" / "id key"
    identity.write_text("")
    src = tmp_path / "disk.img"
    src.write_bytes(os.urandom(3 * MiB))
    return {"known_hosts": str(known_hosts), "identity": str(identity), "src": str(src)}


def endpoint(files, **kw) -> Endpoint:
    settings = {"host": "host2", "path": f"/srv/images/{NASTY}", "user": "root", "port": 2222,
                "identity": files["identity"], "known_hosts": files["known_hosts"],
                "remote_command": ("/opt/cf venv/bin/coldferry", "receive"), **kw}
    return Endpoint(**settings)


def checksum_proc(path: str) -> FakeProc:
    return FakeProc(f"{file_digest(path)}  /srv/images/x\n".encode())


# -- argument construction ----------------------------------------------------------------------

def test_rsh_command_is_one_argument_rsync_splits_back_into_ssh_options(files):
    cmd = rsync.rsh_command(endpoint(files))
    assert split_like_rsync(cmd) == [
        "ssh", "-p", "2222", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f'UserKnownHostsFile="{files["known_hosts"]}"', "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "ConnectTimeout=30",
        "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
        "-i", files["identity"], "-o", "IdentitiesOnly=yes"]


def test_identities_only_only_with_an_identity(files):
    opts = rsync.ssh_options(endpoint(files, identity=None))
    assert "-i" not in opts and "IdentitiesOnly=yes" not in opts


@pytest.mark.parametrize("field", ["identity", "known_hosts"])
@pytest.mark.parametrize("char", ["'", '"', "\\", "%", "$"])
def test_paths_rsync_or_ssh_would_misread_are_refused(files, tmp_path, field, char):
    path = tmp_path / f"key{char}file"
    path.write_text("")
    with pytest.raises(InvalidArgument, match="not supported in this path"):
        rsync.rsync_argv(endpoint(files, **{field: str(path)}))


@pytest.mark.parametrize("field", ["host", "user"])
def test_option_like_host_or_user_refused(files, field):
    with pytest.raises(InvalidArgument, match="not start with '-'"):
        rsync.rsync_argv(endpoint(files, **{field: "-oProxyCommand=touch x"}))


def test_rsync_options(files):
    argv = rsync.rsync_argv(endpoint(files))
    assert argv[0] == "rsync" and argv[-1] == "--"
    for option in ("-s", "--sparse", "--partial-dir=.rsync-partial", "--info=progress2",
                   "--stats", "--no-human-readable", "--ignore-existing"):
        assert option in argv
    assert "--ignore-existing" not in rsync.rsync_argv(endpoint(files), overwrite=True)
    assert not any(a.startswith("--bwlimit") for a in argv)  # bwlimit 0: no limit


@pytest.mark.parametrize("limit, option", [(100 * MiB, "--bwlimit=102400"), (KiB, "--bwlimit=1"),
                                           (2047, "--bwlimit=1"), (50 * 1000 * 1000, "--bwlimit=48828")])
def test_bwlimit_bytes_per_second_become_whole_kib_rounded_down(files, limit, option):
    assert option in rsync.rsync_argv(endpoint(files), CopyOptions(method="rsync", bwlimit=limit))


def test_options_of_the_stream_method_refused(files):
    # A stream copy's limit may be below what rsync can express.
    options = CopyOptions(bwlimit=1000)
    with pytest.raises(InvalidArgument, match="method"):
        rsync.rsync_argv(endpoint(files), options)
    run = FakeRun()
    with pytest.raises(InvalidArgument, match="method"):
        rsync.rsync_copy(files["src"], endpoint(files), options, run=run)
    assert run.calls == []


def test_copy_runs_argument_lists_and_quotes_the_remote_checksum_command(files):
    dest = endpoint(files)
    run = FakeRun(FakeProc(PROGRESS_OUT + STATS_OUT), checksum_proc(files["src"]))
    rsync.rsync_copy(files["src"], dest, run=run)
    copy, check = run.calls
    assert copy[-1] == "root@host2:/srv/images/"
    assert os.path.basename(copy[-2]) == NASTY  # the staged link carries the target's name
    assert check[:2] == ["ssh", "-p"] and check[-3:-1] == ["--", "host2"]
    assert check[check.index("-l") + 1] == "root"
    # sshd runs the command through the user's shell: one string that splits back exactly.
    assert shlex.split(check[-1]) == ["/opt/cf venv/bin/coldferry", "checksum", dest.path]


def test_ipv6_host_is_bracketed_for_rsync(files):
    run = FakeRun(FakeProc(STATS_OUT), checksum_proc(files["src"]))
    rsync.rsync_copy(files["src"], endpoint(files, host="fd00::2"), run=run)
    assert run.calls[0][-1] == "root@[fd00::2]:/srv/images/"


def test_remote_command_must_end_with_receive(files):
    run = FakeRun()
    with pytest.raises(InvalidArgument, match="must end with 'receive'"):
        rsync.rsync_copy(files["src"], endpoint(files, remote_command=("coldferry", "serve")), run=run)
    assert run.calls == []  # refused before copying anything


@pytest.mark.parametrize("path", ["/srv/images/..", "/srv/."])
def test_target_must_name_a_file(files, path):
    with pytest.raises(InvalidArgument, match="name the destination file"):
        rsync.rsync_copy(files["src"], endpoint(files, path=path), run=FakeRun())


def test_missing_or_non_regular_source_refused(files, tmp_path):
    with pytest.raises(SourceError, match="No such file"):
        rsync.rsync_copy(str(tmp_path / "nope"), endpoint(files), run=FakeRun())
    with pytest.raises(SourceError, match="not a regular file"):
        rsync.rsync_copy(str(tmp_path), endpoint(files), run=FakeRun())


# -- rsync's output ------------------------------------------------------------------------------

def test_progress_lines_become_progress_callbacks(files):
    seen: list[Progress] = []
    run = FakeRun(FakeProc(PROGRESS_OUT + STATS_OUT), checksum_proc(files["src"]))
    rsync.rsync_copy(files["src"], endpoint(files), progress=seen.append, run=run)
    assert [p.done for p in seen] == [32768, 1212416, 2260992, 3145728, 3145728]
    assert all(p.total == 3 * MiB for p in seen)
    assert [p.eta for p in seen] == [None, 1, 0, 0.0, 0.0]  # no rate yet: ETA unknown
    assert seen[1].rate == pytest.approx(1.00 * MiB)
    assert seen[-1].rate == pytest.approx(1014.01 * KiB)


@pytest.mark.parametrize("line, done, rate, eta", [
    ("    1073741824  12%  112.50MB/s    0:01:05  ", 1073741824, 112.5 * MiB, 65),
    ("  549755813888  50%    1.20GB/s   12:34:56  ", 549755813888, 1.2 * 1024 * MiB, 45296),
    ("        524288  50%  512,50kB/s    0:00:01  ", 524288, 512.5 * KiB, 1),  # a comma locale
])
def test_parse_progress(line, done, rate, eta):
    p = rsync.parse_progress(line, 2 * done)
    assert (p.done, p.total, p.eta) == (done, 2 * done, eta)
    assert p.rate == pytest.approx(rate)


@pytest.mark.parametrize("line", ["", "Number of files: 1 (reg: 1)", "sent 43 bytes  received 12 bytes"])
def test_other_lines_are_not_progress(line):
    assert rsync.parse_progress(line, 10) is None


def test_result_figures_come_from_stats(files):
    ticks = iter([100.0, 102.5])
    run = FakeRun(FakeProc(PROGRESS_OUT + STATS_OUT), checksum_proc(files["src"]))
    result = rsync.rsync_copy(files["src"], endpoint(files), run=run, clock=lambda: next(ticks))
    assert result.method == "rsync"
    assert (result.size, result.sent, result.wire, result.resumed) == (3 * MiB, 2 * MiB, 2146569, MiB)
    assert result.skipped == 0
    assert result.seconds == 2.5
    assert result.digest == file_digest(files["src"])


def test_incomplete_stats_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="--stats"):
        rsync.parse_stats("Literal data: 5 bytes\n")


def test_skipped_existing_target_is_refused(files):
    run = FakeRun(FakeProc(SKIPPED_STATS))
    with pytest.raises(TargetExists, match="--overwrite"):
        rsync.rsync_copy(files["src"], endpoint(files), run=run)
    assert len(run.calls) == 1  # no checksum of someone else's file


def test_unchanged_target_with_overwrite_is_verified_not_refused(files):
    run = FakeRun(FakeProc(SKIPPED_STATS), checksum_proc(files["src"]))
    result = rsync.rsync_copy(files["src"], endpoint(files), overwrite=True, run=run)
    assert (result.sent, result.resumed, result.skipped) == (0, 3 * MiB, 0)
    assert result.digest == file_digest(files["src"])


def test_digest_mismatch_removes_the_target(files):
    wrong = FakeProc(b"cf1:00000000000000000000000000000000  x\n")
    run = FakeRun(FakeProc(STATS_OUT), wrong, FakeProc())
    with pytest.raises(DigestMismatch, match="cf1:0000"):
        rsync.rsync_copy(files["src"], endpoint(files), run=run)
    assert shlex.split(run.calls[2][-1]) == ["rm", "-f", "--", endpoint(files).path]


def test_checksum_command_missing_on_remote(files):
    run = FakeRun(FakeProc(STATS_OUT), FakeProc(stderr=b"sh: 1: coldferry: not found\n", returncode=127))
    with pytest.raises(RemoteCommandFailed, match="coldferry: not found"):
        rsync.rsync_copy(files["src"], endpoint(files), run=run)


def test_failing_progress_callback_stops_rsync(files):
    proc = FakeProc(PROGRESS_OUT + STATS_OUT)

    def stop(p: Progress) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rsync.rsync_copy(files["src"], endpoint(files), progress=stop, run=FakeRun(proc))
    assert proc.terminated


# -- exit codes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, meaning", [
    (1, "syntax or usage error"), (2, "protocol incompatibility"), (3, "selecting input/output files"),
    (5, "starting the client-server protocol"), (10, "socket I/O"), (11, "file I/O"),
    (12, "protocol data stream"), (20, "interrupted by a signal"), (23, "partial transfer"),
    (24, "vanished"), (30, "timeout in data send/receive"), (35, "daemon connection"),
    (127, "rsync is not installed on the remote host"), (99, "unknown exit code")])
def test_exit_codes_explained_with_stderr_tail(files, code, meaning):
    stderr = [f"line {i}" for i in range(10)]
    err = rsync.exit_error(code, stderr, endpoint(files))
    assert isinstance(err, RsyncFailed)
    assert str(err).startswith(f"rsync failed with exit code {code}: ")
    assert meaning in str(err)
    assert "line 9" in str(err) and "line 4" in str(err) and "line 3" not in str(err)


def test_exit_code_from_a_real_run_is_raised(files):
    stderr = b'rsync: [Receiver] mkdir "/srv/images" failed: No such file or directory (2)\n'
    run = FakeRun(FakeProc(PROGRESS_OUT, stderr, returncode=11))
    with pytest.raises(RsyncFailed, match=r"(?s)code 11: error in file I/O.*mkdir \"/srv/images\" failed"):
        rsync.rsync_copy(files["src"], endpoint(files), run=run)


@pytest.mark.parametrize("code", [255, 12])  # rsync reports ssh's failure as either
def test_unknown_host_key(files, code):
    err = rsync.exit_error(code, HOST_KEY_UNKNOWN, endpoint(files))
    assert isinstance(err, HostKeyError)
    assert "No ED25519 host key is known" in str(err)
    assert files["known_hosts"] in str(err) and "never adds keys" in str(err)


def test_changed_host_key(files):
    err = rsync.exit_error(255, HOST_KEY_CHANGED, endpoint(files))
    assert isinstance(err, HostKeyError)
    assert "different key than the one recorded" in str(err)


def test_login_refused(files):
    err = rsync.exit_error(255, ["root@host2: Permission denied (publickey).",
                                 "rsync: connection unexpectedly closed"], endpoint(files))
    assert isinstance(err, AuthenticationFailed)
    assert "as root: root@host2: Permission denied (publickey)" in str(err)


def test_file_permission_error_is_not_a_login_failure(files):
    err = rsync.exit_error(23, ['rsync: [receiver] mkstemp "/srv/images/.x.Ab12" failed: '
                                "Permission denied (13)"], endpoint(files))
    assert isinstance(err, RsyncFailed)
    assert "code 23: partial transfer" in str(err) and "Permission denied (13)" in str(err)


def test_host_unreachable(files):
    err = rsync.exit_error(255, ["ssh: connect to host host2 port 2222: Connection refused",
                                 "rsync: connection unexpectedly closed (0 bytes received so far)"],
                           endpoint(files))
    assert isinstance(err, RsyncFailed)
    assert "ssh could not reach host2 port 2222" in str(err) and "Connection refused" in str(err)
