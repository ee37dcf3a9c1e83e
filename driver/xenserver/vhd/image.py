"""One VHD file: create it, open it, and read or write its sectors and bitmaps.

A dynamic or differencing VHD stores its data in blocks (2 MiB by default)
allocated on first write at the end of the file, where the footer moves
along. Each block starts with a sector bitmap: a set bit says "this file
holds the sector", a clear bit says "not here": zeros for a dynamic disk,
the parent's data for a differencing disk. Reading through a chain of
parents is chain.py's business; this module knows a single file.
"""

from __future__ import annotations

import os
import re
import struct
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO

from ...errors import ImageError
from .layout import (DEFAULT_BLOCK_SIZE, DISK_DIFFERENCING, DISK_DYNAMIC, FOOTER_SIZE, HEADER_SIZE, SECTOR, UNUSED,
                     Footer, Header, Locator, bat_space, bitmap_size, geometry, vhd_time)

# Room reserved per parent locator: a Windows MAX_PATH in UTF-16 fits, so a
# relink to a longer name on another host does not have to move data.
LOCATOR_SPACE = 1024


@dataclass(frozen=True)
class Run:
    """Consecutive sectors of one block that this file holds (bitmap bits set)."""

    offset: int  # byte offset in the virtual disk
    length: int  # bytes


class VhdFile:
    """An open dynamic or differencing VHD. Use as a context manager, or call close()."""

    def __init__(self, path: str, writable: bool = False) -> None:
        self.path = path
        self.writable = writable
        self._f: BinaryIO = open(path, "r+b" if writable else "rb")
        try:
            self._load()
        except BaseException:
            self._f.close()
            raise

    def _load(self) -> None:
        end = self._f.seek(0, os.SEEK_END)
        if end < FOOTER_SIZE * 2 + HEADER_SIZE:
            raise ImageError(path=self.path, reason=f"{end} bytes is too small for a dynamic VHD")
        raw_footer = self._pread(end - FOOTER_SIZE, FOOTER_SIZE)
        self.footer = Footer.unpack(raw_footer, self.path)
        if self.footer.disk_type not in (DISK_DYNAMIC, DISK_DIFFERENCING):
            raise ImageError(path=self.path, reason=f"disk type {self.footer.disk_type} is not dynamic (3) or "
                                                    "differencing (4); fixed VHDs are not used in an SR chain")
        if self._pread(0, FOOTER_SIZE) != raw_footer:
            raise ImageError(path=self.path, reason="the footer copy at offset 0 differs from the footer at the "
                                                    "end: the file is corrupt or was truncated")
        self.header = Header.unpack(self._pread(self.footer.data_offset, HEADER_SIZE), self.path)
        bs = self.header.block_size
        if bs < SECTOR or bs & (bs - 1):
            raise ImageError(path=self.path, reason=f"block size {bs} is not a power of two of at least 512")
        if self.header.max_table_entries * bs < self.footer.current_size:
            raise ImageError(path=self.path, reason="the BAT has fewer entries than the disk has blocks")
        raw = self._pread(self.header.table_offset, self.header.max_table_entries * 4)
        self.bat: list[int] = list(struct.unpack(f">{self.header.max_table_entries}I", raw))
        self._end = end - FOOTER_SIZE  # where the next block goes (the footer moves behind it)
        block_bytes = bitmap_size(bs) + bs
        for i, entry in enumerate(self.bat):
            if entry != UNUSED and entry * SECTOR + block_bytes > self._end:
                raise ImageError(path=self.path, reason=f"BAT entry {i} points past the end of the data")

    # -- plumbing ---------------------------------------------------------------

    def __enter__(self) -> "VhdFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._f.fileno(), length, offset)
        if len(data) != length:
            raise ImageError(path=self.path, reason=f"short read of {length} bytes at {offset}")
        return data

    def _pwrite(self, offset: int, data: bytes) -> None:
        if not self.writable:
            raise ImageError(path=self.path, reason="opened read-only")
        os.pwrite(self._f.fileno(), data, offset)

    # -- what the file says -------------------------------------------------------

    @property
    def size(self) -> int:
        """The virtual disk size in bytes."""
        return self.footer.current_size

    @property
    def block_size(self) -> int:
        return self.header.block_size

    @property
    def is_differencing(self) -> bool:
        return self.footer.disk_type == DISK_DIFFERENCING

    @property
    def unique_id(self) -> uuidlib.UUID:
        return self.footer.unique_id

    def locator_data(self, loc: Locator) -> bytes:
        """The encoded parent path a locator points at."""
        return self._pread(loc.offset, loc.data_length)

    def bitmap(self, block: int) -> bytes | None:
        """The sector bitmap of ``block``, or None when the block is not allocated here."""
        entry = self.bat[block] if block < len(self.bat) else UNUSED
        if entry == UNUSED:
            return None
        return self._pread(entry * SECTOR, bitmap_size(self.block_size))

    def runs(self, block: int) -> Iterator[Run]:
        """The runs of sectors of ``block`` this file holds, in order."""
        bits = self.bitmap(block)
        if bits is None:
            return
        sectors = min(self.block_size, self.size - block * self.block_size) // SECTOR
        # Sector 0 is the high bit of byte 0, so the bitmap read as one big-endian
        # number, printed in binary, lists the sectors in order.
        held = format(int.from_bytes(bits, "big"), f"0{len(bits) * 8}b")[:sectors]
        for m in re.finditer("1+", held):
            yield Run(block * self.block_size + m.start() * SECTOR, (m.end() - m.start()) * SECTOR)

    def read_held(self, offset: int, length: int) -> bytes:
        """Bytes of one block this file holds (a Run, or part of one)."""
        block, within = divmod(offset, self.block_size)
        base = self.bat[block] * SECTOR + bitmap_size(self.block_size)
        return self._pread(base + within, length)

    def allocated_blocks(self) -> int:
        return sum(1 for e in self.bat if e != UNUSED)

    # -- writing ------------------------------------------------------------------

    def write_sectors(self, offset: int, data: bytes) -> None:
        """Store whole sectors at ``offset`` in this file and mark them held in their bitmaps."""
        if offset % SECTOR or len(data) % SECTOR:
            raise ValueError("write_sectors takes whole sectors; chain.write handles partial ones")
        if offset + len(data) > self.size:
            raise ImageError(path=self.path, reason=f"write of {len(data)} bytes at {offset} is past the "
                                                    f"virtual size {self.size}")
        done = 0
        while done < len(data):
            block, within = divmod(offset + done, self.block_size)
            n = min(len(data) - done, self.block_size - within)
            start = self._block_start(block)
            self._pwrite(start + bitmap_size(self.block_size) + within, data[done:done + n])
            # Data before bitmap: a crash in between never shows unwritten sectors as held.
            self._set_bits(start, within // SECTOR, n // SECTOR)
            done += n

    def _block_start(self, block: int) -> int:
        """The file offset of ``block``'s bitmap, allocating the block at the end if needed."""
        if self.bat[block] != UNUSED:
            return self.bat[block] * SECTOR
        start = self._end
        self._end = start + bitmap_size(self.block_size) + self.block_size
        # The new block stays a hole (zeros) until written; the footer moves behind it
        # before the BAT points at it, so the BAT never points past the footer.
        self._pwrite(self._end, self.footer.pack())
        self._pwrite(start, bytes(bitmap_size(self.block_size)))
        self.bat[block] = start // SECTOR
        self._pwrite(self.header.table_offset + block * 4, struct.pack(">I", self.bat[block]))
        return start

    def _set_bits(self, start: int, first: int, count: int) -> None:
        size = bitmap_size(self.block_size)
        bits = int.from_bytes(self._pread(start, size), "big")
        bits |= ((1 << count) - 1) << (size * 8 - first - count)
        self._pwrite(start, bits.to_bytes(size, "big"))

    def rewrite_header(self, header: Header) -> None:
        """Replace the dynamic disk header (e.g. a new parent name and locators)."""
        self._pwrite(self.footer.data_offset, header.pack())
        self.header = header

    def write_locator(self, loc: Locator, data: bytes) -> None:
        """Store encoded parent path ``data`` in a locator's reserved space."""
        if len(data) > loc.data_space:
            raise ImageError(path=self.path, reason=f"parent path of {len(data)} bytes does not fit the "
                                                    f"{loc.data_space} bytes reserved by locator {loc.code!r}")
        self._pwrite(loc.offset, data.ljust(loc.data_space, b"\0"))

    def grow(self, new_size: int) -> None:
        """Make the virtual disk ``new_size`` bytes; data stays, new space reads from the parent or zeros."""
        if new_size % SECTOR or new_size < self.size:
            raise ImageError(path=self.path, reason=f"cannot resize from {self.size} to {new_size} bytes: "
                                                    "VHDs only grow, in whole sectors")
        entries = -(-new_size // self.block_size)
        header = replace(self.header, max_table_entries=entries)
        if bat_space(entries) > bat_space(len(self.bat)):
            # The BAT may sit anywhere: a larger one goes where the footer is now.
            header = replace(header, table_offset=self._end)
            self._end += bat_space(entries)
        self.bat += [UNUSED] * (entries - len(self.bat))
        self.footer = replace(self.footer, current_size=new_size, geometry=geometry(new_size))
        self._pwrite(header.table_offset, _bat_bytes(self.bat))
        self._pwrite(self._end, self.footer.pack())
        self._pwrite(0, self.footer.pack())
        self.rewrite_header(header)


def create(path: str, size: int, *, block_size: int = DEFAULT_BLOCK_SIZE, parent: VhdFile | None = None,
           parent_locators: tuple[tuple[bytes, bytes], ...] = (), parent_name: str = "",
           unique_id: uuidlib.UUID | None = None, timestamp: int | None = None) -> None:
    """Write a new, empty dynamic VHD at ``path`` (differencing when ``parent`` is given).

    :param size: virtual size in bytes, a whole number of sectors.
    :param parent: the open parent file; its unique id and time stamp go into the header.
    :param parent_locators: (platform code, encoded path) pairs naming the parent.
    :param parent_name: the parent's file name, stored in the header as UTF-16.
    :raises FileExistsError: ``path`` exists (nothing is overwritten).
    """
    if size <= 0 or size % SECTOR:
        raise ImageError(path=path, reason=f"virtual size {size} is not a positive whole number of sectors")
    if block_size < SECTOR or block_size & (block_size - 1):
        raise ImageError(path=path, reason=f"block size {block_size} is not a power of two of at least 512")
    entries = -(-size // block_size)
    table_offset = FOOTER_SIZE + HEADER_SIZE
    data_at = table_offset + bat_space(entries)
    locators = []
    for code, data in parent_locators:
        space = max(LOCATOR_SPACE, -(-len(data) // SECTOR) * SECTOR)
        locators.append(Locator(code, space, len(data), data_at))
        data_at += space
    footer = Footer(DISK_DIFFERENCING if parent else DISK_DYNAMIC, size, size, FOOTER_SIZE,
                    unique_id or uuidlib.uuid4(), vhd_time() if timestamp is None else timestamp, geometry(size))
    header = Header(table_offset, entries, block_size)
    if parent is not None:
        header = Header(table_offset, entries, block_size, parent.unique_id, parent.footer.timestamp,
                        parent_name, tuple(locators))
    with open(path, "xb") as f:
        f.write(footer.pack())
        f.write(header.pack())
        f.write(_bat_bytes([UNUSED] * entries).ljust(bat_space(entries), b"\xff"))
        for loc, (_code, data) in zip(locators, parent_locators, strict=True):
            f.write(data.ljust(loc.data_space, b"\0"))
        f.write(footer.pack())


def _bat_bytes(bat: list[int]) -> bytes:
    return struct.pack(f">{len(bat)}I", *bat)
