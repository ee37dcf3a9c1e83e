"""The stream copier end to end through a real OpenSSH sshd on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import transfer
from tests.conftest import coldferry_command
from tests.support.procs import descendants
from transfer.digest import file_digest
from transfer.options import CopyOptions
from transfer.units import MiB

CHUNK = 4 * MiB


def endpoint(sshd, path, **kw) -> transfer.Endpoint:
    return transfer.Endpoint(host=sshd.host, path=str(path), user=sshd.user, port=sshd.port,
                             identity=str(sshd.identity), known_hosts=str(sshd.known_hosts),
                             remote_command=tuple(coldferry_command()), **kw)


def make_file(path: Path, size: int, data: list[tuple[int, int]], zeros: list[tuple[int, int]] = ()) -> Path:
    """A sparse file of ``size`` with random data at (offset, length) and written zeros."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in data:
            f.seek(off)
            f.write(os.urandom(n))
        for off, n in zeros:
            f.seek(off)
            f.write(bytes(n))
    return path


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def assert_same(src: Path, dst: Path) -> None:
    assert dst.stat().st_size == src.stat().st_size
    assert subprocess.run(["cmp", str(src), str(dst)]).returncode == 0
    assert file_digest(str(src)) == file_digest(str(dst))


LAYOUTS = {
    "hole-at-start-data-at-end": (64 * MiB, [(60 * MiB, 4 * MiB)]),
    "data-in-last-partial-block": (10 * MiB + 12345, [(10 * MiB, 12345)]),
    "size-not-chunk-multiple": (9 * MiB + 4097, [(0, MiB), (5 * MiB - 100, 200), (9 * MiB, 4097)]),
    "dense": (9 * MiB, [(0, 9 * MiB)]),
}


@pytest.mark.parametrize("channel", ["direct", "tls", "ssh"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sparse_layouts_copy_exactly_and_stay_sparse(sshd, tmp_path, layout, channel):
    size, data = LAYOUTS[layout]
    src = make_file(tmp_path / "src.img", size, data)
    dst = tmp_path / "out" / "dst.img"
    dst.parent.mkdir()
    result = transfer.copy(str(src), endpoint(sshd, dst), CopyOptions(channel=channel))
    assert_same(src, dst)
    assert allocated(dst) <= allocated(src)
    assert result.digest == file_digest(str(src))
    # Data is found per file-system block, so a few bytes send their whole block.
    assert sum(n for _, n in data) <= result.sent <= allocated(src)
    assert result.skipped == size - result.sent


def test_zero_runs_inside_allocated_data_are_not_sent(sshd, tmp_path):
    src = make_file(tmp_path / "src.img", 16 * MiB, [(0, MiB), (8 * MiB, MiB)],
                    zeros=[(MiB, 7 * MiB), (9 * MiB, 7 * MiB)])
    assert allocated(src) >= 16 * MiB  # the zeros are really allocated
    dst = tmp_path / "dst.img"
    result = transfer.stream_copy(str(src), endpoint(sshd, dst))
    assert_same(src, dst)
    assert result.sent == 2 * MiB
    assert allocated(dst) <= 2 * MiB + 64 * 1024


def test_empty_file(sshd, tmp_path):
    src = tmp_path / "empty.img"
    src.touch()
    dst = tmp_path / "copy.img"
    result = transfer.stream_copy(str(src), endpoint(sshd, dst))
    assert dst.exists() and dst.stat().st_size == 0
    assert result.sent == 0


def test_name_with_spaces_and_shell_metacharacters(sshd, tmp_path):
    src = make_file(tmp_path / "src.img", 2 * MiB, [(0, MiB)])
    odd = tmp_path / "dir with space" / "a b;$(touch pwned)`id`'\"&|<>.img"
    odd.parent.mkdir()
    transfer.stream_copy(str(src), endpoint(sshd, odd))
    assert_same(src, odd)
    assert not (Path.cwd() / "pwned").exists() and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("compress", ["fast", "auto"])
def test_compression_round_trips(sshd, tmp_path, compress):
    src = tmp_path / "text.img"
    src.write_bytes(b"coldferry compresses text nicely\n" * 300000 + os.urandom(3 * MiB))
    dst = tmp_path / "dst.img"
    result = transfer.stream_copy(str(src), endpoint(sshd, dst), CopyOptions(compress=compress))
    assert_same(src, dst)
    assert result.wire < result.sent


def test_bandwidth_limit_and_progress(sshd, tmp_path):
    src = make_file(tmp_path / "src.img", 12 * MiB, [(0, 12 * MiB)])
    dst = tmp_path / "dst.img"
    seen = []
    result = transfer.stream_copy(str(src), endpoint(sshd, dst), CopyOptions(bwlimit=8 * MiB),
                                  progress=seen.append)
    assert_same(src, dst)
    # 12 MiB at 8 MiB/s cannot finish in much under 1 s (the first chunk goes at once).
    assert result.seconds >= 0.9
    assert seen and seen[-1].done == seen[-1].total == 12 * MiB
    assert all(a.done <= b.done for a, b in zip(seen, seen[1:]))


def test_unknown_host_key_is_refused(sshd, tmp_path):
    other = tmp_path / "known_hosts"
    other.write_text(f"[{sshd.host}]:{sshd.port} ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIHc2B3nVwW3ZrPjRJ8oG6Oqj1P3Vb2aW0h2n7yO6Y1Xk\n")
    src = make_file(tmp_path / "src.img", MiB, [(0, MiB)])
    dst = tmp_path / "dst.img"
    with pytest.raises(transfer.HostKeyError, match="known_hosts"):
        transfer.stream_copy(str(src), endpoint(sshd, dst, ).__class__(
            **{**endpoint(sshd, dst).__dict__, "known_hosts": str(other)}))
    assert not dst.exists()


def test_host_missing_from_known_hosts_is_refused(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    src = make_file(tmp_path / "src.img", MiB, [(0, MiB)])
    ep = endpoint(sshd, tmp_path / "dst.img")
    ep = transfer.Endpoint(**{**ep.__dict__, "known_hosts": str(empty)})
    with pytest.raises(transfer.HostKeyError, match="not in known_hosts"):
        transfer.stream_copy(str(src), ep)


def test_existing_target_refused_then_overwritten(sshd, tmp_path):
    src = make_file(tmp_path / "src.img", MiB, [(0, MiB)])
    dst = tmp_path / "dst.img"
    dst.write_bytes(b"precious")
    with pytest.raises(transfer.TargetExists):
        transfer.stream_copy(str(src), endpoint(sshd, dst))
    assert dst.read_bytes() == b"precious"
    transfer.stream_copy(str(src), endpoint(sshd, dst), overwrite=True)
    assert_same(src, dst)


def test_not_enough_space_is_refused_before_sending(sshd, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "coldferry-test", str(mnt)], check=True)
    try:
        src = make_file(tmp_path / "src.img", 64 * MiB, [(0, 16 * MiB)])
        with pytest.raises(transfer.NoSpace, match="16.0 MiB"):
            transfer.stream_copy(str(src), endpoint(sshd, mnt / "dst.img"))
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_receiver_not_installed_gives_a_clear_error(sshd, tmp_path):
    src = make_file(tmp_path / "src.img", MiB, [(0, MiB)])
    ep = transfer.Endpoint(**{**endpoint(sshd, tmp_path / "d.img").__dict__,
                              "remote_command": ("/nonexistent/coldferry", "receive")})
    with pytest.raises(transfer.TransferError, match="did not start.*--remote-command"):
        transfer.stream_copy(str(src), ep)


def receiver_pids(sshd) -> list[int]:
    """Pids of 'coldferry receive' processes below our own sshd."""
    return [pid for pid, argv in descendants(sshd.proc.pid) if "receive" in argv]


def receiver_killer(sshd, at: int) -> tuple[list[int], transfer.ProgressCallback]:
    """A progress callback that kills the receiver once ``at`` bytes are done, and the pids it killed."""
    killed: list[int] = []

    def kill(p: transfer.Progress) -> None:
        if not killed and p.done >= at:
            pids = receiver_pids(sshd)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed.extend(pids)

    return killed, kill


@pytest.mark.parametrize("channel", ["direct", "tls", "ssh"])
def test_connection_killed_mid_copy_resumes_automatically(sshd, tmp_path, channel):
    # Up to two streams' socket buffers (some 8 MiB each) may be in flight, counted as
    # sent but not yet written, when the receiver dies.
    size = 96 * MiB
    src = make_file(tmp_path / "src.img", size, [(0, size)])
    dst = tmp_path / "dst.img"
    killed, kill_receiver_halfway = receiver_killer(sshd, size // 2)
    # The libvirt driver's call.
    result = transfer.copy(str(src), endpoint(sshd, dst), CopyOptions(channel=channel, bwlimit=64 * MiB),
                           overwrite=True, progress=kill_receiver_halfway, sleep=lambda s: None)
    assert killed, "the receiver was never killed"
    assert_same(src, dst)
    assert result.resumed >= size // 8  # the second session skipped what had landed
    assert result.sent + result.resumed == size
    assert result.digest == file_digest(str(dst))
    assert not list(tmp_path.glob(".dst.img.*"))


def test_no_retries_gives_up_at_the_first_dropped_connection(sshd, tmp_path):
    size = 48 * MiB
    src = make_file(tmp_path / "src.img", size, [(0, size)])
    dst = tmp_path / "dst.img"
    killed, kill_receiver_halfway = receiver_killer(sshd, size // 2)
    with pytest.raises(transfer.TransferError):  # a retry would have resumed and finished the copy
        transfer.copy(str(src), endpoint(sshd, dst), CopyOptions(bwlimit=64 * MiB, retries=0),
                      progress=kill_receiver_halfway)
    assert killed and not dst.exists()


def test_rerun_after_killed_sender_sends_only_the_rest(sshd, tmp_path):
    size = 48 * MiB
    src = make_file(tmp_path / "src.img", size, [(0, size)])
    dst = tmp_path / "dst.img"
    ep = endpoint(sshd, dst)
    cmd = [str(Path(sys.executable).with_name("coldferry")), "copy", "--no-progress", "--bwlimit", "16M",
           "--ssh-port", str(sshd.port), "--identity", str(sshd.identity), "--known-hosts",
           str(sshd.known_hosts), "--remote-command", " ".join(coldferry_command()), str(src),
           f"{sshd.user}@{sshd.host}:{dst}"]
    part = tmp_path / ".dst.img.coldferry-part"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not part.exists() or allocated(part) < size // 2):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert part.exists() and not dst.exists()
    first = allocated(part)
    again = subprocess.run(cmd[:3] + cmd[5:], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "already there" in again.stdout
    assert_same(src, dst)
    sent_mib = float(again.stdout.split("sent ")[1].split(" MiB")[0])
    assert sent_mib * MiB <= size - first + 2 * CHUNK * 2  # at most the in-flight chunks again


def test_cli_reports_failure_with_a_message_and_exit_code(sshd, tmp_path):
    src = make_file(tmp_path / "src.img", MiB, [(0, MiB)])
    (tmp_path / "dst.img").write_bytes(b"x")
    cmd = [str(Path(sys.executable).with_name("coldferry")), "copy", "--ssh-port", str(sshd.port),
           "--identity", str(sshd.identity), "--known-hosts", str(sshd.known_hosts),
           "--remote-command", " ".join(coldferry_command()), str(src),
           f"{sshd.user}@{sshd.host}:{tmp_path / 'dst.img'}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "already exists" in run.stderr and "--overwrite" in run.stderr
    ok = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("stream: sent 1.0 MiB") and "digest cf1:" in ok.stdout


def test_unaligned_pieces_and_a_file_system_without_o_direct(sshd, tmp_path):
    """Both ends use O_DIRECT where they can; unaligned data and tmpfs go through the page cache."""
    mnt = tmp_path / "mem"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "coldferry-test", str(mnt)], check=True)
    try:
        for src_dir, dst_dir in ((tmp_path, mnt), (mnt, tmp_path)):
            size = 9 * MiB + 1234  # the last block ends off any sector boundary
            src = make_file(src_dir / "src.img", size, [(0, MiB), (4 * MiB + 4096, 512 * 1024), (9 * MiB, 1234)])
            dst = dst_dir / "dst.img"
            result = transfer.stream_copy(str(src), endpoint(sshd, dst))
            assert_same(src, dst)
            assert result.sent == MiB + 512 * 1024 + 1234
            src.unlink()
            dst.unlink()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def hung_up(sock: socket.socket) -> bool:
    """Whether the receiver closed ``sock`` (a reset when it closed with our bytes unread)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_the_receiver_lets_in_only_its_ssh_client_and_shrugs_off_junk(sshd, tmp_path):
    """A receiver started by sshd: the SSH client's address with the key gets in; another
    address with the key, and junk from anywhere, neither get in nor stop the copy."""
    from transfer import seal, ssh, wire
    from transfer.digest import ImageDigest
    dst = tmp_path / "dst.img"
    ep = endpoint(sshd, dst)
    client = ssh.connect(ep)
    remote = ssh.RemoteProcess(client, ep.remote_command, ep.host)
    try:
        remote.settimeout(30)
        wire.send_message(remote.stdin, "hello", version=wire.VERSION, root=ep.root, name=ep.name, size=MiB,
                          chunk_size=CHUNK, source="test", mode=0o600, streams=1, channel="direct",
                          data_bytes=0)
        ready = wire.read_message(remote.stdout, "ready")
        key, port = bytes.fromhex(ready["key"]), ready["port"]
        assert sshd.host == "127.0.0.1"  # so SSH_CONNECTION names 127.0.0.1 as the client
        other = socket.create_connection((sshd.host, port), timeout=10, source_address=("127.0.0.2", 0))
        other.sendall(seal.hello(key, 0))
        assert hung_up(other)
        for _ in range(10):
            junk = socket.create_connection((sshd.host, port), timeout=10)
            junk.sendall(os.urandom(seal.HELLO.size))
            assert hung_up(junk)
            junk.close()
        silent = socket.create_connection((sshd.host, port), timeout=10)
        good = socket.create_connection((sshd.host, port), timeout=10)
        good.sendall(seal.hello(key, 0))
        end = wire.pack_end(0)
        good.sendall(end + bytes(seal.Sealer(key, 0, 16).seal(end, b"")))
        started = time.monotonic()
        wire.send_message(remote.stdin, "finish", digest=ImageDigest(MiB, CHUNK).hexdigest())
        assert wire.read_message(remote.stdout)["op"] == "done"
        assert time.monotonic() - started < 1.5  # the silent connection held nothing up
        for s in (other, silent, good):
            s.close()
    finally:
        remote.close()
        client.close()
    assert dst.stat().st_size == MiB
