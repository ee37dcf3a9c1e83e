"""Chains of VHDs: a leaf, its differencing parents, down to a dynamic base.

A differencing disk names its parent three ways: the parent's unique id
and time stamp (which must match the parent's footer), its file name, and
parent locators holding the path. The parent is found through the
locators (relative ones first, so a chain copied to another directory under
the same names still resolves) and accepted only if the unique id matches:
a file that merely has the right name is not the right parent.

Reads fall through: a sector whose bit is clear in the leaf is read from
its parent, and so on; below the base, and past a parent's end, it reads
as zeros. Writes go to the leaf only (copy-on-write).
"""

from __future__ import annotations

import os
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass

from ...errors import ImageError
from .image import VhdFile, create
from .layout import DEFAULT_BLOCK_SIZE, MACX, SECTOR, W2KU, W2RU, Locator, encode_locator

MAX_DEPTH = 30  # XenServer refuses deeper chains too; a loop of locators ends here
_LOCATOR_ORDER = (MACX, W2RU, W2KU)  # relative before absolute
_WRITTEN_LOCATORS = (W2KU, W2RU, MACX)


@dataclass(frozen=True)
class Info:
    """What one VHD file says about itself."""

    path: str
    disk_type: int
    virtual_size: int
    physical_size: int
    block_size: int
    allocated_blocks: int
    unique_id: uuidlib.UUID
    parent_uuid: uuidlib.UUID | None
    parent_name: str


def create_dynamic(path: str, size: int, block_size: int = DEFAULT_BLOCK_SIZE,
                   unique_id: uuidlib.UUID | None = None) -> None:
    """Create an empty dynamic VHD of ``size`` bytes at ``path``."""
    create(path, size, block_size=block_size, unique_id=unique_id)


def create_differencing(path: str, parent_path: str, size: int | None = None) -> None:
    """Create an empty differencing VHD at ``path`` whose parent is ``parent_path``.

    The child gets the parent's block size and (unless ``size`` is larger)
    its virtual size, and W2ku, W2ru and MacX locators naming the parent.
    """
    with VhdFile(parent_path) as parent:
        name = os.path.basename(parent_path)
        locators = tuple((code, encode_locator(code, name, os.path.abspath(parent_path)))
                         for code in _WRITTEN_LOCATORS)
        create(path, max(size or 0, parent.size), block_size=parent.block_size, parent=parent,
               parent_locators=locators, parent_name=name)


def info(path: str) -> Info:
    """Footer and header facts of one VHD file (checksums verified)."""
    with VhdFile(path) as f:
        return Info(path, f.footer.disk_type, f.size, os.stat(path).st_blocks * 512, f.block_size,
                    f.allocated_blocks(), f.unique_id, f.header.parent_uuid if f.is_differencing else None,
                    f.header.parent_name if f.is_differencing else "")


def parent_path(f: VhdFile) -> str:
    """The file a differencing VHD's locators point at (the first that exists).

    :raises ImageError: no locator names an existing file.
    """
    here = os.path.dirname(os.path.abspath(f.path))
    tried = []
    by_code = {loc.code: loc for loc in f.header.locators}
    for code in _LOCATOR_ORDER:
        loc = by_code.get(code)
        if loc is None:
            continue
        named = loc.decode(f.locator_data(loc))
        candidate = os.path.normpath(os.path.join(here, named))
        if os.path.exists(candidate):
            return candidate
        tried.append(f"{code.decode()}={named}")
    raise ImageError(path=f.path, reason=f"parent {f.header.parent_name!r} not found (locators: "
                                         f"{', '.join(tried) or 'none'}); relink the child to the copied parent")


def open_chain(leaf: str, writable: bool = False) -> "Chain":
    """Open ``leaf`` and every parent, checking each parent's unique id and time stamp."""
    files: list[VhdFile] = []
    try:
        files.append(VhdFile(leaf, writable))
        while files[-1].is_differencing:
            if len(files) >= MAX_DEPTH:
                raise ImageError(path=leaf, reason=f"chain deeper than {MAX_DEPTH} (a locator loop?)")
            child = files[-1]
            parent = VhdFile(parent_path(child))
            files.append(parent)
            _check_link(child, parent)
        return Chain(files)
    except BaseException:
        for f in files:
            f.close()
        raise


def _check_link(child: VhdFile, parent: VhdFile) -> None:
    h = child.header
    if h.parent_uuid != parent.unique_id:
        raise ImageError(path=child.path, reason=f"parent UUID mismatch: the header names {h.parent_uuid}, "
                                                 f"{parent.path} is {parent.unique_id}")
    if h.parent_timestamp != parent.footer.timestamp:
        raise ImageError(path=child.path, reason=f"parent time stamp mismatch: the header says "
                                                 f"{h.parent_timestamp}, {parent.path} has {parent.footer.timestamp}")
    if h.block_size != parent.block_size:
        raise ImageError(path=child.path, reason=f"block size {h.block_size} differs from the parent's "
                                                 f"{parent.block_size}")


def validate_chain(leaf: str) -> list[Info]:
    """Check every file of the chain (checksums, BAT, parent UUIDs); return their facts, leaf first.

    :raises ImageError: naming the file and what is wrong with it.
    """
    with open_chain(leaf) as chain:
        return [info(f.path) for f in chain.files]


class Chain:
    """An open chain, leaf first; writes go to the leaf."""

    def __init__(self, files: Sequence[VhdFile]) -> None:
        self.files = list(files)

    def __enter__(self) -> "Chain":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for f in self.files:
            f.close()

    @property
    def size(self) -> int:
        return self.files[0].size

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the virtual disk at ``offset``, as the guest sees them."""
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"read of {length} bytes at {offset} is outside the disk (size {self.size})")
        return _read(self.files, offset, length)

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` into the leaf; partial sectors are completed from the chain."""
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"write of {len(data)} bytes at {offset} is outside the disk (size {self.size})")
        start = offset - offset % SECTOR
        end = -(-(offset + len(data)) // SECTOR) * SECTOR
        buf = bytearray(self.read(start, end - start)) if (start, end) != (offset, offset + len(data)) \
            else bytearray(len(data))
        buf[offset - start:offset - start + len(data)] = data
        self.files[0].write_sectors(start, bytes(buf))


def _read(files: Sequence[VhdFile], offset: int, length: int) -> bytes:
    """Read through ``files`` (leaf first): held sectors from the first file holding them."""
    if not files or length == 0:
        return bytes(length)
    top = files[0]
    out = bytearray(length)
    visible = max(0, min(length, top.size - offset))  # past a parent's end there are only zeros
    pos = offset
    while pos < offset + visible:
        block, within = divmod(pos, top.block_size)
        n = min(offset + visible - pos, top.block_size - within)
        cursor = pos
        for run in top.runs(block):
            lo, hi = max(run.offset, pos), min(run.offset + run.length, pos + n)
            if lo >= hi:
                continue
            if lo > cursor:
                out[cursor - offset:lo - offset] = _read(files[1:], cursor, lo - cursor)
            out[lo - offset:hi - offset] = top.read_held(lo, hi - lo)
            cursor = hi
        if cursor < pos + n:
            out[cursor - offset:pos + n - offset] = _read(files[1:], cursor, pos + n - cursor)
        pos += n
    return bytes(out)


def relink(child: str, new_parent: str) -> None:
    """Point ``child`` at ``new_parent`` (a copy of its parent under another name or directory).

    Rewrites the parent name and the locators; the parent UUID and time stamp
    stay, so the new parent must be the same VHD (its footer unchanged).

    :raises ImageError: ``new_parent`` is not the VHD the child was made from.
    """
    with VhdFile(child, writable=True) as c, VhdFile(new_parent) as p:
        if not c.is_differencing:
            raise ImageError(path=child, reason="a dynamic VHD has no parent to relink")
        _check_link(c, p)
        name = os.path.basename(new_parent)
        locators: list[Locator] = []
        for loc in c.header.locators:
            data = encode_locator(loc.code, name, os.path.abspath(new_parent))
            c.write_locator(loc, data)
            locators.append(Locator(loc.code, loc.data_space, len(data), loc.offset))
        c.rewrite_header(c.header.with_parent(name, tuple(locators)))


def coalesce(child: str) -> str:
    """Write every sector ``child`` holds into its parent; return the parent's path.

    Afterwards the parent reads as the child did and the child is redundant
    (the caller removes it, or renames the parent into its place).
    """
    with open_chain(child) as chain:
        parent = chain.paths[1] if len(chain.files) > 1 else None
    if parent is None:
        raise ImageError(path=child, reason="a dynamic VHD has no parent to coalesce into")
    with VhdFile(child) as c, VhdFile(parent, writable=True) as p:
        if c.size > p.size:
            p.grow(c.size)
        for block in range(len(c.bat)):
            for run in c.runs(block):
                p.write_sectors(run.offset, c.read_held(run.offset, run.length))
    return parent
