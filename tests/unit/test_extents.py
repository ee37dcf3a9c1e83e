"""Which parts of a file are sent: data extents, chunk blocks, zero runs.

Sparse files are real files in tmp_path, made with truncate and pwrite, so
the file system's own SEEK_DATA / SEEK_HOLE answers are what is tested.
"""

from __future__ import annotations

import errno
import os

import pytest

from transfer import extents
from transfer.extents import ZERO_GRAIN, Block, data_blocks, data_extents, nonzero_segments

MiB = 1 << 20
FS_BLOCK = 4096


@pytest.fixture
def make_file(tmp_path):
    """Create a file of ``size`` bytes holding ``writes`` (offset -> bytes); yield an open fd."""
    fds = []

    def make(size: int, writes: dict[int, bytes] | None = None) -> int:
        path = tmp_path / f"f{len(fds)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fds.append(fd)
        os.truncate(fd, size)
        for off, data in (writes or {}).items():
            os.pwrite(fd, data, off)
        return fd

    yield make
    for fd in fds:
        os.close(fd)


@pytest.fixture(autouse=True)
def needs_holes(tmp_path):
    """These tests check exact extents: skip where the file system does not report holes."""
    fd = os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.truncate(fd, MiB)
        os.pwrite(fd, b"x", MiB - 1)
        if os.lseek(fd, 0, os.SEEK_DATA) == 0:
            pytest.skip("the file system under tmp_path does not report holes")
    finally:
        os.close(fd)
        os.unlink(tmp_path / "probe")


class TestDataExtents:
    def test_hole_at_start_data_only_at_end(self, make_file):
        size = 8 * MiB
        fd = make_file(size, {size - FS_BLOCK: b"\x01" * FS_BLOCK})
        assert data_extents(fd, size) == [(size - FS_BLOCK, FS_BLOCK)]

    def test_data_in_last_partial_block_is_clipped_to_size(self, make_file):
        size = 3 * MiB + 100  # not a multiple of any chunk or fs block
        fd = make_file(size, {size - 10: b"tail-bytes"})
        [(start, length)] = data_extents(fd, size)
        assert start + length == size
        assert size - 10 - FS_BLOCK < start <= size - 10

    def test_several_extents_in_order_and_hole_at_end(self, make_file):
        size = 4 * MiB
        fd = make_file(size, {0: b"a" * FS_BLOCK, MiB: b"b" * 2 * FS_BLOCK})
        assert data_extents(fd, size) == [(0, FS_BLOCK), (MiB, 2 * FS_BLOCK)]

    def test_empty_file_has_no_extents(self, make_file):
        fd = make_file(0)
        assert data_extents(fd, 0) == []

    def test_all_hole_file_has_no_extents(self, make_file):
        fd = make_file(5 * MiB)
        assert data_extents(fd, 5 * MiB) == []

    def test_dense_file_is_one_extent(self, make_file):
        size = MiB + 123
        fd = make_file(size, {0: os.urandom(size)})
        assert data_extents(fd, size) == [(0, size)]

    def test_size_argument_limits_the_scan(self, make_file):
        fd = make_file(2 * MiB, {MiB + FS_BLOCK: b"z" * FS_BLOCK})
        # Data past the given size is not reported.
        assert data_extents(fd, MiB) == []

    def test_falls_back_to_whole_file_without_seek_data(self, make_file, monkeypatch):
        fd = make_file(MiB, {0: b"x"})

        def no_seek_data(fd, pos, how):
            raise OSError(errno.EINVAL, "SEEK_DATA unsupported")

        monkeypatch.setattr(extents.os, "lseek", no_seek_data)
        assert data_extents(fd, MiB) == [(0, MiB)]
        assert data_extents(fd, 0) == []


class TestDataBlocks:
    def test_extent_spanning_several_blocks_is_cut_at_chunk_boundaries(self):
        blocks = list(data_blocks([(50, 300)], size=1000, chunk=100))
        assert blocks == [
            Block(0, 0, 100, ((50, 50),)),
            Block(1, 100, 100, ((0, 100),)),
            Block(2, 200, 100, ((0, 100),)),
            Block(3, 300, 100, ((0, 50),)),
        ]

    def test_several_extents_in_one_block_share_it(self):
        blocks = list(data_blocks([(10, 5), (30, 10), (90, 20)], size=250, chunk=100))
        assert blocks == [
            Block(0, 0, 100, ((10, 5), (30, 10), (90, 10))),
            Block(1, 100, 100, ((0, 10),)),
        ]

    def test_blocks_without_data_are_skipped(self):
        blocks = list(data_blocks([(5, 1), (705, 1)], size=1000, chunk=100))
        assert [b.index for b in blocks] == [0, 7]
        assert blocks[1].offset == 700 and blocks[1].segments == ((5, 1),)

    def test_last_block_is_shorter_when_size_is_not_a_multiple(self):
        [block] = data_blocks([(200, 50)], size=250, chunk=100)
        assert block == Block(2, 200, 50, ((0, 50),))

    def test_no_extents_no_blocks(self):
        assert list(data_blocks([], size=1000, chunk=100)) == []

    def test_segments_cover_exactly_the_extents(self):
        exts = [(3, 97), (150, 400), (999, 1)]
        covered = set()
        for b in data_blocks(exts, size=1000, chunk=128):
            for off, n in b.segments:
                assert 0 <= off and off + n <= b.length
                covered.update(range(b.offset + off, b.offset + off + n))
        assert covered == {i for s, n in exts for i in range(s, s + n)}


def grains(*pattern: int) -> memoryview:
    """A buffer of ZERO_GRAIN-sized pieces: 0 is all zeros, 1 is non-zero data."""
    return memoryview(b"".join(b"\x07" * ZERO_GRAIN if p else bytes(ZERO_GRAIN) for p in pattern))


class TestNonzeroSegments:
    def test_zero_grains_inside_data_are_dropped(self):
        buf = grains(1, 0, 1, 0)
        assert nonzero_segments(buf, ((0, len(buf)),)) == [(0, ZERO_GRAIN), (2 * ZERO_GRAIN, ZERO_GRAIN)]

    def test_adjacent_data_grains_are_merged(self):
        buf = grains(0, 1, 1, 1)
        assert nonzero_segments(buf, ((0, len(buf)),)) == [(ZERO_GRAIN, 3 * ZERO_GRAIN)]

    def test_adjacent_segments_with_data_are_merged(self):
        buf = grains(1, 1)
        segs = ((0, ZERO_GRAIN), (ZERO_GRAIN, ZERO_GRAIN))
        assert nonzero_segments(buf, segs) == [(0, 2 * ZERO_GRAIN)]

    def test_unaligned_segment_is_split_at_grain_boundaries(self):
        buf = bytearray(grains(0, 1))
        half = ZERO_GRAIN // 2
        # The segment's first piece (half a grain, zeros) is dropped; its
        # second piece, up to the segment's end, is data.
        assert nonzero_segments(memoryview(buf), ((half, ZERO_GRAIN),)) == [(ZERO_GRAIN, half)]
        buf[half + 1] = 1
        assert nonzero_segments(memoryview(buf), ((half, ZERO_GRAIN),)) == [(half, ZERO_GRAIN)]

    def test_small_segment_is_kept_exactly(self):
        buf = bytearray(ZERO_GRAIN)
        buf[100:110] = b"0123456789"
        assert nonzero_segments(memoryview(buf), ((100, 10),)) == [(100, 10)]
        assert nonzero_segments(memoryview(buf), ((200, 10),)) == []

    def test_all_zero_block_has_no_segments(self):
        buf = grains(0, 0, 0)
        assert nonzero_segments(buf, ((0, len(buf)),)) == []

    def test_data_after_a_zero_prefix_is_kept(self):
        buf = bytearray(2 * ZERO_GRAIN)
        buf[ZERO_GRAIN + 16] = 1  # the grain's first 16 bytes are zero
        assert nonzero_segments(memoryview(buf), ((0, len(buf)),)) == [(ZERO_GRAIN, ZERO_GRAIN)]

    def test_data_in_the_last_byte_of_a_grain_is_kept(self):
        buf = bytearray(ZERO_GRAIN)
        buf[-1] = 0xFF
        assert nonzero_segments(memoryview(buf), ((0, ZERO_GRAIN),)) == [(0, ZERO_GRAIN)]

    def test_segments_outside_the_given_ones_are_ignored(self):
        buf = grains(1, 1, 1)
        assert nonzero_segments(buf, ((2 * ZERO_GRAIN, ZERO_GRAIN),)) == [(2 * ZERO_GRAIN, ZERO_GRAIN)]
