"""What to send: data extents from the file's allocation, minus zero runs.

The file system tells where data is (SEEK_DATA / SEEK_HOLE); holes are never
read. Inside allocated data, runs of zeros are found by comparing against a
zero buffer (memcmp, which stops at the first non-zero byte, so dense data
costs nearly nothing) and are skipped as well.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Iterator

#: Granularity of zero-run detection inside a chunk: a target stays sparse
#: wherever the source has an aligned run of zeros at least this long.
ZERO_GRAIN = 64 * 1024
_ZERO_GRAIN_BYTES = bytes(ZERO_GRAIN)
#: What O_DIRECT reads and writes are aligned to (offset, length, buffer); anything
#: else goes through the page cache.
DIRECT_ALIGN = 4096

Segment = tuple[int, int]  # (offset relative to its block, length)


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of every data extent of an open file, in order.

    Falls back to one extent over the whole file where the file system does
    not report holes.
    """
    extents: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            if e.errno == errno.EINVAL:  # SEEK_DATA unsupported here
                return [(0, size)] if size else []
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end - start))
        pos = end
    return extents


@dataclass(frozen=True)
class Block:
    """One chunk-aligned block of the image that holds data."""

    index: int
    offset: int
    length: int
    segments: tuple[Segment, ...]  # data parts, relative to ``offset``


def data_blocks(extents: list[tuple[int, int]], size: int, chunk: int) -> Iterator[Block]:
    """The chunk-aligned blocks that touch data, each with its data segments."""
    current: int | None = None
    segs: list[Segment] = []
    for start, length in extents:
        end = start + length
        pos = start
        while pos < end:
            index = pos // chunk
            base = index * chunk
            stop = min(end, base + chunk)
            if index != current:
                if current is not None:
                    yield _block(current, chunk, size, segs)
                current, segs = index, []
            segs.append((pos - base, stop - pos))
            pos = stop
    if current is not None:
        yield _block(current, chunk, size, segs)


def _block(index: int, chunk: int, size: int, segs: list[Segment]) -> Block:
    offset = index * chunk
    return Block(index, offset, min(chunk, size - offset), tuple(segs))


def nonzero_segments(buf: memoryview, segments: tuple[Segment, ...]) -> list[Segment]:
    """Split ``segments`` of ``buf`` into runs that hold non-zero data.

    Zero runs are detected per ZERO_GRAIN-sized, grain-aligned piece; the
    result is merged so that adjacent data pieces form one segment.
    """
    out: list[Segment] = []
    for seg_off, seg_len in segments:
        seg_end = seg_off + seg_len
        pos = seg_off
        while pos < seg_end:
            stop = min(seg_end, (pos // ZERO_GRAIN + 1) * ZERO_GRAIN)
            piece = buf[pos:stop]
            if not _is_zero(piece):
                if out and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], stop - out[-1][0])
                else:
                    out.append((pos, stop - pos))
            pos = stop
    return out


def _is_zero(piece: memoryview) -> bool:
    # bytes.startswith takes the buffer as it is: one memcmp, no copy (a copy
    # first made the 75%-zeros case spend more time copying than comparing).
    return _ZERO_GRAIN_BYTES.startswith(piece)
