"""The sender's source reads: data segments only, prefetched blocks through the page cache."""

from __future__ import annotations

import mmap
import os

import pytest

from transfer.digest import block_hash, sparse_hash
from transfer.extents import DIRECT_ALIGN, nonzero_segments
from transfer.source import Source

CHUNK = 1 << 20


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
    source.prefetch(300 * 1024)  # block 0's 256 KiB and then block 2, whose data passes the limit
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
                source._prefetch_stop.set()  # the data phase starts while block 0 is asked for
        return real(fd, at, n, advice)

    monkeypatch.setattr("transfer.source.os.posix_fadvise", fadvise)
    source.prefetch()
    source.end_prefetch(stop=False)  # the patched call stops it; no race with the thread's start
    assert asked == [0, 128 * 1024] and source.cached_until == 0  # block 0 in 128 KiB calls
    check(read_all(source), image[1])
    assert [fd for at, fd in sorted(used)] == [source.fd] + [source.direct_fd] * 3


def test_prefetch_asks_for_at_most_an_eighth_of_the_available_memory(image, reads, monkeypatch):
    source, _ = reads
    monkeypatch.setattr("transfer.source.available_memory", lambda: 8 * 200 * 1024)
    source.prefetch()  # 200 KiB allowed: block 0's 256 KiB passes it
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


def test_a_failing_read_ahead_ends_quietly_and_the_copy_reads_on(image, reads, monkeypatch, capsys):
    source, used = reads

    def fadvise(fd, at, n, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr("transfer.source.os.posix_fadvise", fadvise)
    source.prefetch()
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
