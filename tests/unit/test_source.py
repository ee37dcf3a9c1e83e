"""The sender's source reads: data segments only, prefetched blocks through the page cache."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from transfer.digest import block_hash, sparse_hash
from transfer.extents import DIRECT_ALIGN, nonzero_segments
from transfer.source import Source

CHUNK = 1 << 20
ROOT = str(Path(__file__).resolve().parents[2])


@pytest.fixture
def image(tmp_path):
    """4 blocks: data at the start of block 0, a hole in block 1, a run from block 2 into
    block 3, and 8 KiB at the very end."""
    path = tmp_path / "disk.raw"
    runs = {0: os.urandom(256 * 1024), 2 * CHUNK + 64 * 1024: os.urandom(CHUNK), 4 * CHUNK - 8192: os.urandom(8192)}
    with open(path, "wb") as f:
        f.truncate(4 * CHUNK)
        for at, data in runs.items():
            f.seek(at)
            f.write(data)
    return path, path.read_bytes()


def read_all(source: Source) -> dict[int, bytes]:
    buf = mmap.mmap(-1, CHUNK + DIRECT_ALIGN)
    view = memoryview(buf)
    out = {}
    for block in source.blocks:
        assert source.read_block(block, view)
        pieces = [(off, bytes(view[off:off + n])) for off, n in nonzero_segments(view[:block.length], block.segments)]
        out[block.index] = sparse_hash(pieces, block.length)
    return out


@pytest.fixture
def reads(image, monkeypatch):
    """The image opened for direct reads, and the (offset, descriptor) of every read made."""
    path, _ = image
    source = Source.open(str(path), CHUNK, direct=True)
    if source.direct_fd < 0:
        source.close()
        pytest.skip("no O_DIRECT on this file system")
    used: list[tuple[int, int]] = []
    real = os.preadv

    def preadv(fd, bufs, at):
        used.append((at, fd))
        return real(fd, bufs, at)

    monkeypatch.setattr("transfer.source.os.preadv", preadv)
    yield source, used
    source.close()


def check(hashes: dict[int, bytes], content: bytes) -> None:
    assert hashes and all(h == block_hash(content[i * CHUNK:(i + 1) * CHUNK]) for i, h in hashes.items())


def test_prefetched_blocks_go_through_the_page_cache_and_the_rest_direct(image, reads):
    source, used = reads
    source.prefetch(300 * 1024, fork=False)  # block 0's 256 KiB, then block 2, whose data passes the limit
    source.end_prefetch(stop=False)
    assert source.cached_until == 2
    check(read_all(source), image[1])
    assert sorted(used) == [(0, source.fd), (2 * CHUNK + 64 * 1024, source.fd),
                            (3 * CHUNK, source.direct_fd), (4 * CHUNK - 8192, source.direct_fd)]


def test_without_prefetch_every_aligned_read_is_direct(image, reads):
    source, used = reads
    check(read_all(source), image[1])
    assert {fd for _, fd in used} == {source.direct_fd}


def test_a_stopped_prefetch_fixes_which_blocks_are_read_through_the_cache(image, reads, monkeypatch):
    source, used = reads
    asked: list[int] = []
    real = os.posix_fadvise

    def fadvise(fd, at, n, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            asked.append(at)
            if len(asked) == 1:
                source.stop_prefetch()  # the data phase starts while block 0 is asked for
        return real(fd, at, n, advice)

    monkeypatch.setattr("transfer.source.os.posix_fadvise", fadvise)
    source.prefetch(fork=False)  # in this process, where the calls are seen
    source.end_prefetch(stop=False)  # the patched call stops it; no race with the thread's start
    assert asked == [0, 128 * 1024] and source.cached_until == 0  # block 0 in 128 KiB calls
    check(read_all(source), image[1])
    assert [fd for at, fd in sorted(used)] == [source.fd] + [source.direct_fd] * 3


def test_prefetch_asks_for_at_most_an_eighth_of_the_available_memory(image, reads, monkeypatch):
    source, _ = reads
    monkeypatch.setattr("transfer.source.available_memory", lambda: 8 * 200 * 1024)
    source.prefetch(fork=False)  # 200 KiB allowed: block 0's 256 KiB passes it
    source.end_prefetch(stop=False)
    assert source.cached_until == 0


def test_stream_copy_refuses_a_source_opened_with_other_blocks(image, tmp_path):
    from transfer.endpoint import Endpoint
    from transfer.errors import InvalidArgument
    from transfer.sender import stream_copy
    (tmp_path / "known_hosts").write_text("")
    dest = Endpoint.parse("host:/srv/disk.raw", known_hosts=str(tmp_path / "known_hosts"))
    with Source.open(str(image[0]), CHUNK) as source:
        with pytest.raises(InvalidArgument, match="opened with 1048576-byte blocks"):
            stream_copy(source, dest, chunk_size=4 * CHUNK)
        assert source.fd >= 0  # the caller's to close


def test_stream_copy_refuses_options_of_the_rsync_method(image, tmp_path):
    from transfer.endpoint import Endpoint
    from transfer.errors import InvalidArgument
    from transfer.options import CopyOptions
    from transfer.sender import stream_copy
    (tmp_path / "known_hosts").write_text("")
    dest = Endpoint.parse("host:/srv/disk.raw", known_hosts=str(tmp_path / "known_hosts"))
    with pytest.raises(InvalidArgument, match="method") as e:
        stream_copy(str(image[0]), dest, CopyOptions(method="rsync"), connect=pytest.fail)
    assert e.value.what == "method"


def test_a_failing_read_ahead_ends_quietly_and_the_copy_reads_on(image, reads, monkeypatch, capsys):
    source, used = reads

    def fadvise(fd, at, n, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr("transfer.source.os.posix_fadvise", fadvise)
    source.prefetch(fork=False)  # the thread's log is this process's
    source.end_prefetch(stop=False)
    assert "Traceback" not in capsys.readouterr().err
    assert source.cached_until == 0  # the block asked for is read through the cache
    check(read_all(source), image[1])


def test_blocks_whose_data_runs_on_are_read_with_one_request(image, reads):
    source, used = reads
    b0, b2, b3 = source.blocks
    assert not source.joins(b0, b2)  # block 0's data stops short of its end; block 1 is a hole
    assert source.joins(b2, b3)      # block 2's run goes on into block 3
    view = memoryview(mmap.mmap(-1, 2 * CHUNK + DIRECT_ALIGN))
    assert source.read_blocks([b2, b3], view)
    assert used == [(2 * CHUNK + 64 * 1024, source.direct_fd)]  # one request, hole in block 3 included
    content = image[1]
    for k, block in enumerate((b2, b3)):
        got = view[k * CHUNK:(k + 1) * CHUNK]
        pieces = [(off, bytes(got[off:off + n])) for off, n in nonzero_segments(got, block.segments)]
        assert sparse_hash(pieces, block.length) == block_hash(content[block.offset:block.offset + CHUNK])


def test_no_read_spans_the_end_of_what_was_read_ahead(image, reads):
    source, _ = reads
    _, b2, b3 = source.blocks
    source.cached_until = 2  # block 2 through the cache, block 3 direct
    assert not source.joins(b2, b3)


def test_a_failing_allocation_map_is_a_clear_error_and_leaves_no_descriptor(image, monkeypatch):
    from transfer.errors import SourceError

    def fail(fd, size):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("transfer.source.data_extents", fail)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(SourceError, match="disk.raw: Input/output error"):
        Source.open(str(image[0]), CHUNK, direct=True)
    assert set(os.listdir("/proc/self/fd")) == before


# The read-ahead in a child process. Each case runs in a fresh interpreter, which has
# no other thread (as in `coldferry copy`); the test session itself may have some.
FORK_PROBE = """
import os, sys, threading
from transfer.source import Source
path, mode = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDONLY)
os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # nothing of the file in the page cache

def cached(at, n):
    try:
        return os.preadv(fd, [bytearray(n)], at, os.RWF_NOWAIT) == n
    except BlockingIOError:
        return False

source = Source.open(path, 1 << 20, direct=True)
if mode == "busy":  # another thread is running: the read-ahead must not fork
    threading.Thread(target=threading.Event().wait, args=(5,), daemon=True).start()
before = [cached(b.offset + off, n) for b in source.blocks for off, n in b.segments]
source.prefetch()
pid, thread = source._prefetch_pid, source._prefetcher is not None
source.end_prefetch(stop=False)
after = [cached(b.offset + off, n) for b in source.blocks for off, n in b.segments]
try:
    os.waitpid(pid, os.WNOHANG)
    reaped = False
except ChildProcessError:
    reaped = pid != 0
print(before, after, pid not in (0, os.getpid()), thread, reaped, source.cached_until)
"""


def probe(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_read_ahead_runs_in_a_child_process_and_fills_the_page_cache(image):
    result = probe(FORK_PROBE, str(image[0]), "alone")
    if result.startswith("[True"):
        pytest.skip("this file system keeps the file in memory")
    # every data segment read ahead, by a child that was reaped, and no thread
    assert result == "[False, False, False, False] [True, True, True, True] True False True 3"


def test_with_another_thread_running_the_read_ahead_is_a_thread(image):
    result = probe(FORK_PROBE, str(image[0]), "busy")
    if result.startswith("[True"):
        pytest.skip("this file system keeps the file in memory")
    assert result == "[False, False, False, False] [True, True, True, True] False True False 3"


def no_fork():
    raise BlockingIOError(11, "Resource temporarily unavailable")


def test_when_no_process_can_be_forked_a_thread_reads_ahead(image, reads, monkeypatch):
    source, _ = reads
    monkeypatch.setattr("transfer.source._only_thread", lambda: True)
    monkeypatch.setattr("transfer.source.os.fork", no_fork)
    source.prefetch()
    assert source._prefetcher is not None and source._prefetch_pid == 0
    source.end_prefetch(stop=False)
    assert source.cached_until == 3
    check(read_all(source), image[1])


def test_when_neither_a_process_nor_a_thread_can_start_there_is_no_read_ahead(image, reads, monkeypatch):
    source, used = reads

    class NoThread:
        def __init__(self, *a, **k):
            pass

        def start(self):
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr("transfer.source.os.fork", no_fork)
    monkeypatch.setattr("transfer.source._only_thread", lambda: True)
    monkeypatch.setattr("transfer.source.threading.Thread", NoThread)
    source.prefetch()  # no error: the read-ahead only saves time
    source.end_prefetch()
    assert source.cached_until == -1
    check(read_all(source), image[1])
    assert {fd for _, fd in used} == {source.direct_fd}  # every block read directly
    fds = source.fd, source.direct_fd
    source.close()
    assert not any(os.path.exists(f"/proc/self/fd/{fd}") for fd in fds)


SLOW_PROBE = """
import os, signal, sys, time
import transfer.source as source_mod
path, log, how = sys.argv[1], sys.argv[2], sys.argv[3]
real = os.pread

def slow(fd, n, at):  # every piece takes a while, and leaves a mark
    with open(log, "a") as f:
        f.write(f"{at}\\n")
    time.sleep(0.2)
    return real(fd, n, at)

source_mod.os.pread = slow
source = source_mod.Source.open(path, 1 << 20, direct=True)
source.prefetch()
pid = source._prefetch_pid
for _ in range(100):  # until the child has asked for its first piece
    if os.path.exists(log):
        break
    time.sleep(0.1)
if how == "orphan":
    print(pid, flush=True)
    os._exit(0)  # the copy dies without stopping its read-ahead
if how == "interrupt":  # Ctrl-C reaches the child too: it ends at once, running no Python code
    os.kill(pid, signal.SIGINT)
    _, status = os.waitpid(pid, 0)
    print(pid > 0, os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT)
else:
    source.end_prefetch()  # the data streams are open: stop after the piece being asked for
    asked = len(open(log).read().split())
    time.sleep(0.5)
    print(pid > 0, asked, len(open(log).read().split()), source.cached_until)
source.close()
"""


@pytest.fixture
def big(tmp_path):
    """32 blocks of 1 MiB, all data: one read-ahead piece per block."""
    path = tmp_path / "big.raw"
    with open(path, "wb") as f:
        for _ in range(32):
            f.write(os.urandom(1 << 20))
    return path


def test_a_read_ahead_child_stops_after_its_piece_when_asked(big, tmp_path):
    pid_ok, asked, later, cached_until = probe(SLOW_PROBE, str(big), str(tmp_path / "asked.log"), "stop").split()
    assert pid_ok == "True"
    assert 1 <= int(asked) < 32 and later == asked  # stopped well before the end, and nothing after
    assert int(cached_until) == int(asked) - 1  # one piece per 1 MiB block: the block being asked for


def test_an_interrupt_ends_the_read_ahead_child_at_once(big, tmp_path):
    assert probe(SLOW_PROBE, str(big), str(tmp_path / "asked.log"), "interrupt") == "True True"


def test_the_read_ahead_child_stops_when_the_copy_is_gone(big, tmp_path):
    log = tmp_path / "asked.log"
    # The child keeps the output pipe open, so this returns once the child has ended too.
    pid = int(probe(SLOW_PROBE, str(big), str(log), "orphan"))
    assert pid > 0
    asked = log.read_text().split()
    assert 1 <= len(asked) < 32  # it left after a piece or two, not at the end of the file
