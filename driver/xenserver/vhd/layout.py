"""The on-disk structures of a VHD file, as the Microsoft VHD specification lays them out.

Every VHD ends with a 512-byte footer; dynamic and differencing disks also
keep a copy of it at offset 0, followed by a 1024-byte dynamic disk header
that points at the block allocation table (BAT) and, for a differencing
disk, names its parent (its unique id, its time stamp, its file name, and
up to eight platform-specific parent locators). All integers are
big-endian. Footer and header each carry a checksum: the one's complement
of the byte sum of the structure with the checksum field taken as zero.
"""

from __future__ import annotations

import struct
import time
import uuid as uuidlib
from dataclasses import dataclass, field, replace

from ...errors import ImageError

SECTOR = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
DEFAULT_BLOCK_SIZE = 2 << 20
UNUSED = 0xFFFFFFFF  # a BAT entry of a block that has no data in this file
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF

FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
FORMAT_VERSION = 0x00010000
FEATURE_RESERVED = 0x00000002  # the spec says this bit is always set

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4

# blktap's creator id: XenServer's own VHDs carry it, and qemu takes the
# virtual size of such a file from the footer instead of the CHS geometry.
CREATOR_APP = b"tap\0"
CREATOR_VERSION = 0x00010003
CREATOR_HOST_OS = b"Wi2k"

# Parent locator platform codes (spec: "Platform Code").
MACX = b"MacX"   # file URL, UTF-8
W2KU = b"W2ku"   # absolute path, UTF-16 little-endian
W2RU = b"W2ru"   # path relative to the child, UTF-16 little-endian
LOCATOR_SLOTS = 8

VHD_EPOCH = 946684800  # 2000-01-01 00:00:00 UTC, where VHD time stamps count from

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")
_HEADER = struct.Struct(">8sQQIIII16sII512s")
_LOCATOR = struct.Struct(">4sIIIQ")
_CHECKSUM_AT_FOOTER = 64
_CHECKSUM_AT_HEADER = 36
_LOCATORS_AT = _HEADER.size  # 576: the eight locator entries follow the fixed fields

assert _FOOTER.size == FOOTER_SIZE and _HEADER.size + LOCATOR_SLOTS * _LOCATOR.size + 256 == HEADER_SIZE


def checksum(raw: bytes, at: int) -> int:
    """The spec's checksum of ``raw`` with the 4-byte field at ``at`` counted as zero."""
    total = sum(raw) - sum(raw[at:at + 4])
    return ~total & 0xFFFFFFFF


def vhd_time(unix: float | None = None) -> int:
    """A VHD time stamp (seconds since 2000-01-01 UTC) for ``unix`` time, now if None."""
    return max(0, int(time.time() if unix is None else unix) - VHD_EPOCH)


def geometry(size: int) -> tuple[int, int, int]:
    """Cylinders, heads and sectors per track for ``size`` bytes (the spec's CHS algorithm)."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


@dataclass(frozen=True)
class Footer:
    """The 512-byte footer (and its copy at offset 0 of dynamic disks)."""

    disk_type: int
    current_size: int
    original_size: int
    data_offset: int
    unique_id: uuidlib.UUID
    timestamp: int
    geometry: tuple[int, int, int]
    creator_app: bytes = CREATOR_APP
    creator_version: int = CREATOR_VERSION
    creator_os: bytes = CREATOR_HOST_OS
    features: int = FEATURE_RESERVED
    version: int = FORMAT_VERSION
    saved_state: int = 0

    def pack(self) -> bytes:
        """The footer's bytes, with its checksum."""
        c, h, s = self.geometry
        raw = _FOOTER.pack(FOOTER_COOKIE, self.features, self.version, self.data_offset, self.timestamp,
                           self.creator_app, self.creator_version, self.creator_os, self.original_size,
                           self.current_size, c, h, s, self.disk_type, 0, self.unique_id.bytes,
                           self.saved_state, bytes(427))
        return _with_checksum(raw, _CHECKSUM_AT_FOOTER)

    @classmethod
    def unpack(cls, raw: bytes, path: str) -> "Footer":
        """Parse a footer; raises ImageError for a wrong cookie or checksum."""
        if len(raw) != FOOTER_SIZE:
            raise ImageError(path=path, reason=f"file too short for a VHD footer ({len(raw)} bytes)")
        (cookie, features, version, data_offset, timestamp, app, app_version, app_os, original, current,
         cyl, heads, spt, disk_type, stored, uid, saved, _) = _FOOTER.unpack(raw)
        if cookie != FOOTER_COOKIE:
            raise ImageError(path=path, reason=f"no VHD footer (cookie {cookie!r}, expected {FOOTER_COOKIE!r})")
        _check(raw, _CHECKSUM_AT_FOOTER, stored, path, "footer")
        return cls(disk_type, current, original, data_offset, uuidlib.UUID(bytes=uid), timestamp,
                   (cyl, heads, spt), app, app_version, app_os, features, version, saved)


@dataclass(frozen=True)
class Locator:
    """One parent locator entry: where in the file the encoded parent path lies."""

    code: bytes
    data_space: int   # bytes reserved at ``offset`` (a whole number of sectors)
    data_length: int  # bytes of encoded path actually stored there
    offset: int

    def decode(self, data: bytes) -> str:
        """The path stored in ``data`` (this locator's bytes), as text."""
        if self.code == MACX:
            text = data.decode("utf-8")
            return text[len("file://"):] if text.startswith("file://") else text
        return data.decode("utf-16-le").replace("\\", "/")


def encode_locator(code: bytes, parent_name: str, parent_abspath: str) -> bytes:
    """The bytes a locator of platform ``code`` stores for a parent file.

    MacX and W2ru name the parent relative to the child (they sit in the
    same SR directory), W2ku by its absolute path, as blktap writes them.
    """
    if code == MACX:
        return f"file://./{parent_name}".encode("utf-8")
    if code == W2RU:
        return f".\\{parent_name}".encode("utf-16-le")
    if code == W2KU:
        return parent_abspath.encode("utf-16-le")
    raise ValueError(f"unknown parent locator platform code {code!r}")


@dataclass(frozen=True)
class Header:
    """The 1024-byte dynamic disk header (dynamic and differencing disks)."""

    table_offset: int
    max_table_entries: int
    block_size: int
    parent_uuid: uuidlib.UUID = uuidlib.UUID(int=0)
    parent_timestamp: int = 0
    parent_name: str = ""
    locators: tuple[Locator, ...] = field(default_factory=tuple)
    version: int = FORMAT_VERSION

    def pack(self) -> bytes:
        """The header's bytes, with its checksum."""
        name = self.parent_name.encode("utf-16-be")
        if len(name) > 512:
            raise ValueError(f"parent name {self.parent_name!r} is longer than 256 UTF-16 characters")
        raw = bytearray(_HEADER.pack(HEADER_COOKIE, NO_DATA_OFFSET, self.table_offset, self.version,
                                     self.max_table_entries, self.block_size, 0, self.parent_uuid.bytes,
                                     self.parent_timestamp, 0, name.ljust(512, b"\0")))
        for loc in self.locators:
            raw += _LOCATOR.pack(loc.code, loc.data_space // SECTOR, loc.data_length, 0, loc.offset)
        raw += bytes(HEADER_SIZE - len(raw))
        return _with_checksum(bytes(raw), _CHECKSUM_AT_HEADER)

    @classmethod
    def unpack(cls, raw: bytes, path: str) -> "Header":
        """Parse a header; raises ImageError for a wrong cookie or checksum."""
        if len(raw) != HEADER_SIZE:
            raise ImageError(path=path, reason="file too short for a dynamic disk header")
        (cookie, _data, table_offset, version, entries, block_size, stored, parent_uuid, parent_ts, _r,
         name) = _HEADER.unpack_from(raw)
        if cookie != HEADER_COOKIE:
            raise ImageError(path=path, reason=f"no dynamic disk header (cookie {cookie!r})")
        _check(raw, _CHECKSUM_AT_HEADER, stored, path, "dynamic disk header")
        locators = []
        for i in range(LOCATOR_SLOTS):
            code, space, length, _res, offset = _LOCATOR.unpack_from(raw, _LOCATORS_AT + i * _LOCATOR.size)
            if code != b"\0\0\0\0":
                # The spec counts the space in sectors; some writers store bytes. A value
                # below one sector's worth of sectors can only mean sectors.
                locators.append(Locator(code, space * SECTOR if space < SECTOR else space, length, offset))
        return cls(table_offset, entries, block_size, uuidlib.UUID(bytes=parent_uuid), parent_ts,
                   name.decode("utf-16-be", errors="replace").rstrip("\0"), tuple(locators), version)

    def with_parent(self, name: str, locators: tuple[Locator, ...]) -> "Header":
        """This header naming another parent file (same parent UUID and time stamp)."""
        return replace(self, parent_name=name, locators=locators)


def bitmap_size(block_size: int) -> int:
    """Bytes of a block's sector bitmap: one bit per sector, padded to whole sectors."""
    bits = block_size // SECTOR
    return -(-bits // 8 // SECTOR) * SECTOR


def bat_space(entries: int) -> int:
    """Bytes the BAT takes: four per entry, padded to whole sectors."""
    return -(-entries * 4 // SECTOR) * SECTOR


def _with_checksum(raw: bytes, at: int) -> bytes:
    return raw[:at] + struct.pack(">I", checksum(raw, at)) + raw[at + 4:]


def _check(raw: bytes, at: int, stored: int, path: str, what: str) -> None:
    expected = checksum(raw, at)
    if stored != expected:
        raise ImageError(path=path, reason=f"{what} checksum mismatch (stored {stored:#010x}, "
                                           f"computed {expected:#010x}): the file is corrupt")
