"""The rsync method against a real OpenSSH sshd and real rsync on both ends.

The sshd listens on loopback, so the "remote" target is a temp dir here.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

import transfer
from tests.conftest import coldferry_command
from transfer import rsync
from transfer.digest import file_digest
from transfer.endpoint import Endpoint
from transfer.errors import HostKeyError, TargetExists
from transfer.options import CopyOptions
from transfer.progress import Progress
from transfer.units import MiB


class Stop(Exception):
    pass


def endpoint(sshd, path: Path, **kw) -> Endpoint:
    settings = {"host": sshd.host, "port": sshd.port, "user": sshd.user, "identity": str(sshd.identity),
                "known_hosts": str(sshd.known_hosts), "remote_command": tuple(coldferry_command()), **kw}
    return Endpoint(path=str(path), **settings)


def sparse_image(path: Path) -> Path:
    """8 MiB apparent: 1 MiB of data in the middle, 512 KiB at the end, holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
        f.seek(8 * MiB - 512 * 1024)
        f.write(os.urandom(512 * 1024))
    return path


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


@pytest.fixture
def target(tmp_path) -> Path:
    d = tmp_path / "remote"
    d.mkdir()
    return d


def test_sparse_file_arrives_identical_and_sparse(sshd, tmp_path, target):
    src = sparse_image(tmp_path / "disk.img")
    dst = target / "disk.img"
    result = rsync.rsync_copy(str(src), endpoint(sshd, dst))
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == 8 * MiB
    assert dst.stat().st_blocks <= src.stat().st_blocks + 16  # a few blocks of slack
    assert dst.stat().st_blocks * 512 < 2 * MiB  # 1.5 MiB of data, not 8
    assert result.digest == file_digest(str(src)) == file_digest(str(dst))
    assert (result.method, result.size, result.resumed) == ("rsync", 8 * MiB, 0)
    assert result.sent == 8 * MiB  # rsync reads holes and sends them as literal zeros
    assert result.wire >= result.sent
    assert not (target / rsync.PARTIAL_DIR).exists()


def test_empty_file(sshd, tmp_path, target):
    src = tmp_path / "empty.img"
    src.write_bytes(b"")
    result = rsync.rsync_copy(str(src), endpoint(sshd, target / "empty.img"))
    assert (target / "empty.img").stat().st_size == 0
    assert (result.size, result.sent) == (0, 0)
    assert result.digest == file_digest(str(src))


def test_name_with_spaces_and_shell_metacharacters(sshd, tmp_path, target):
    name = "a b;$(touch x)'\"*[1] `touch y`.img"
    src = random_file(tmp_path / "src.img", 100_000)
    places = [Path.home(), target, Path.cwd(), tmp_path]
    assert not any((p / f).exists() for p in places for f in ("x", "y"))
    rsync.rsync_copy(str(src), endpoint(sshd, target / name))
    assert os.listdir(target) == [name]
    assert (target / name).read_bytes() == src.read_bytes()
    assert not any((p / f).exists() for p in places for f in ("x", "y")), "a shell ran part of the name"


def test_wrong_host_key_refused(sshd, tmp_path, target):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known_hosts = tmp_path / "known_hosts"
    kind, key = other.with_suffix(".pub").read_text().split()[:2]
    known_hosts.write_text(f"[{sshd.host}]:{sshd.port} {kind} {key}\n")
    src = random_file(tmp_path / "disk.img", 4096)
    with pytest.raises(HostKeyError) as e:
        rsync.rsync_copy(str(src), endpoint(sshd, target / "disk.img", known_hosts=str(known_hosts)))
    assert f"host key of {sshd.host} is not trusted" in str(e.value)
    assert str(known_hosts) in str(e.value)
    assert os.listdir(target) == []


def test_unknown_host_key_refused_not_added(sshd, tmp_path, target):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    src = random_file(tmp_path / "disk.img", 4096)
    with pytest.raises(HostKeyError, match="host key is known"):
        rsync.rsync_copy(str(src), endpoint(sshd, target / "disk.img", known_hosts=str(known_hosts)))
    assert known_hosts.read_text() == ""


def test_existing_target_refused_then_replaced_with_overwrite(sshd, tmp_path, target):
    src = random_file(tmp_path / "disk.img", 300_000)
    dst = target / "disk.img"
    dst.write_bytes(b"precious")
    with pytest.raises(TargetExists, match="--overwrite"):
        rsync.rsync_copy(str(src), endpoint(sshd, dst))
    assert dst.read_bytes() == b"precious"
    result = rsync.rsync_copy(str(src), endpoint(sshd, dst), overwrite=True)
    assert dst.read_bytes() == src.read_bytes()
    assert result.digest == file_digest(str(src))


def test_directory_named_like_the_target_is_not_copied_into(sshd, tmp_path, target):
    src = random_file(tmp_path / "disk.img", 4096)
    (target / "disk.img").mkdir()
    with pytest.raises(TargetExists):
        rsync.rsync_copy(str(src), endpoint(sshd, target / "disk.img"))
    assert os.listdir(target / "disk.img") == []


def test_bandwidth_limit_and_progress(sshd, tmp_path, target):
    src = random_file(tmp_path / "disk.img", 3 * MiB)
    seen: list[tuple[float, Progress]] = []
    # The libvirt driver's call.
    options = CopyOptions(method="rsync", bwlimit=MiB)
    result = transfer.copy(str(src), endpoint(sshd, target / "disk.img"), options, overwrite=True,
                           progress=lambda p: seen.append((time.monotonic(), p)), sleep=pytest.fail)
    assert result.digest == file_digest(str(src))
    snaps = [p for _, p in seen]
    assert len(snaps) >= 2
    assert all(p.total == 3 * MiB and 0 <= p.done <= p.total for p in snaps)
    assert [p.done for p in snaps] == sorted(p.done for p in snaps)
    assert all(p.rate >= 0 and (p.eta is None or p.eta >= 0) for p in snaps)
    assert snaps[-1].done == 3 * MiB and snaps[-1].eta == 0
    # rsync's own average over the run, and our clock: unlimited loopback would be ~100x faster.
    assert snaps[-1].rate < 1.5 * MiB
    assert seen[-1][0] - seen[0][0] > 1.0


def test_interrupted_copy_resumes_from_the_partial_file(sshd, tmp_path, target):
    src = random_file(tmp_path / "disk.img", 6 * MiB)
    dst = target / "disk.img"

    def stop_midway(p: Progress) -> None:
        if p.done >= 2 * MiB:
            raise Stop

    with pytest.raises(Stop):
        rsync.rsync_copy(str(src), endpoint(sshd, dst), CopyOptions(method="rsync", bwlimit=2 * MiB),
                         progress=stop_midway)
    partial = target / rsync.PARTIAL_DIR / "disk.img"
    deadline = time.monotonic() + 10  # the remote rsync notices the dropped connection
    while not partial.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert partial.exists() and not dst.exists()  # never a truncated file under the real name
    result = rsync.rsync_copy(str(src), endpoint(sshd, dst))
    assert result.resumed >= MiB
    assert result.sent + result.resumed == 6 * MiB
    assert dst.read_bytes() == src.read_bytes()
    assert not (target / rsync.PARTIAL_DIR).exists()


def test_cli_checksum_prints_the_image_digest(tmp_path):
    src = sparse_image(tmp_path / "disk.img")
    out = subprocess.run([*coldferry_command()[:-1], "checksum", str(src)], check=True,
                         capture_output=True, text=True).stdout
    assert out == f"{file_digest(str(src))}  {src}\n"


def test_cli_copy_with_rsync_method(sshd, tmp_path, target):
    src = sparse_image(tmp_path / "disk.img")
    dst = target / "disk.img"
    cmd = [*coldferry_command()[:-1], "copy", "--method", "rsync", "--no-progress",
           "--ssh-port", str(sshd.port), "--identity", str(sshd.identity),
           "--known-hosts", str(sshd.known_hosts), "--remote-command",
           shlex.join(coldferry_command()), "--bwlimit", "100M",
           str(src), f"{sshd.user}@{sshd.host}:{dst}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"digest {file_digest(str(src))}" in done.stdout
    assert dst.read_bytes() == src.read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 1
    assert "already exists on the receiving host; pass --overwrite" in again.stderr
