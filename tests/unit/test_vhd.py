"""VHD files: the format's fields and checksums, copy-on-write chains, and qemu-img reading them."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
import uuid as uuidlib
from pathlib import Path

import pytest

from driver.errors import ImageError
from driver.xenserver import vhd
from driver.xenserver.vhd.chain import Chain
from driver.xenserver.vhd.image import create
from driver.xenserver.vhd.layout import VHD_EPOCH, checksum, geometry

MiB = 1 << 20
BS = 2 * MiB


@pytest.fixture(scope="module")
def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        pytest.fail("qemu-img is not installed: run scripts/install (package qemu-utils)")
    return path


def qemu_info(qemu_img: str, path: Path) -> dict:
    out = subprocess.run([qemu_img, "info", "--output=json", "-f", "vpc", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def qemu_raw(qemu_img: str, path: Path) -> bytes:
    raw = path.with_suffix(".raw")
    subprocess.run([qemu_img, "convert", "-f", "vpc", "-O", "raw", str(path), str(raw)], check=True)
    return raw.read_bytes()


def be32(raw: bytes, at: int) -> int:
    return struct.unpack_from(">I", raw, at)[0]


def be64(raw: bytes, at: int) -> int:
    return struct.unpack_from(">Q", raw, at)[0]


def write(path: Path, offset: int, data: bytes) -> None:
    with vhd.open_chain(str(path), writable=True) as c:
        c.write(offset, data)


def read(path: Path, offset: int = 0, length: int | None = None) -> bytes:
    with vhd.open_chain(str(path)) as c:
        return c.read(offset, c.size - offset if length is None else length)


def flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.fixture
def base(tmp_path: Path) -> Path:
    p = tmp_path / "base.vhd"
    vhd.create_dynamic(str(p), 10 * MiB)
    return p


# -- footer, header, BAT, bitmaps --------------------------------------------------


def test_dynamic_footer_fields_and_checksum(base):
    raw = base.read_bytes()
    footer = raw[-512:]
    assert raw[:512] == footer  # the copy at offset 0
    assert footer[:8] == b"conectix"
    assert be32(footer, 8) == 2 and be32(footer, 12) == 0x00010000
    assert be64(footer, 16) == 512  # the dynamic header follows the footer copy
    assert footer[28:32] == b"tap\0"
    assert be64(footer, 40) == be64(footer, 48) == 10 * MiB
    assert struct.unpack_from(">HBB", footer, 56) == geometry(10 * MiB)
    assert be32(footer, 60) == vhd.DISK_DYNAMIC
    stored = be32(footer, 64)
    assert stored == ~(sum(footer[:64]) + sum(footer[68:])) & 0xFFFFFFFF == checksum(footer, 64)
    assert abs(be32(footer, 24) + VHD_EPOCH - time.time()) < 60
    assert uuidlib.UUID(bytes=footer[68:84]) == vhd.info(str(base)).unique_id


def test_dynamic_header_fields_and_empty_bat(base):
    raw = base.read_bytes()
    header = raw[512:1536]
    assert header[:8] == b"cxsparse"
    assert be64(header, 8) == 0xFFFFFFFFFFFFFFFF
    assert be64(header, 16) == 1536  # the BAT
    assert be32(header, 24) == 0x00010000
    assert be32(header, 28) == 5 and be32(header, 32) == BS  # 10 MiB in 2 MiB blocks
    assert be32(header, 36) == checksum(header, 36)
    assert raw[1536:1536 + 20] == b"\xff" * 20
    assert len(raw) == 512 + 1024 + 512 + 512  # footer copy, header, one sector of BAT, footer


def test_geometry_follows_the_spec_table():
    assert geometry(10 * MiB) == (301, 4, 17)
    assert geometry(1 << 30) == (2080, 16, 63)
    c, h, s = geometry(1 << 40)  # over the CHS limit: the maximum geometry
    assert (c, h, s) == (65535, 16, 255)


def test_write_allocates_a_block_and_sets_bitmap_bits(base):
    write(base, BS + 1024, b"A" * 1536)  # sectors 2..4 of block 1
    raw = base.read_bytes()
    bat = struct.unpack_from(">5I", raw, 1536)
    assert bat[0] == bat[2] == bat[3] == bat[4] == 0xFFFFFFFF
    block_at = bat[1] * 512
    assert block_at == 2048  # right after the BAT: where the footer was
    bitmap = raw[block_at:block_at + 512]
    assert bitmap[0] == 0b00111000 and bitmap[1:] == bytes(511)  # sector 0 is the high bit
    data = raw[block_at + 512:block_at + 512 + BS]
    assert data[1024:2560] == b"A" * 1536 and data[:1024] == bytes(1024)
    assert len(raw) == block_at + 512 + BS + 512
    assert raw[-512:] == raw[:512]


def test_unaligned_write_keeps_neighbouring_bytes(base):
    write(base, 100, b"x" * 1000)
    write(base, 600, b"y" * 10)
    got = read(base, 0, 2048)
    assert got[:100] == bytes(100) and got[100:600] == b"x" * 500 and got[600:610] == b"y" * 10
    assert got[610:1100] == b"x" * 490 and got[1100:] == bytes(948)


def test_write_and_read_outside_the_disk_are_refused(base):
    with pytest.raises(ValueError, match="outside the disk"):
        write(base, 10 * MiB - 10, b"z" * 20)
    with pytest.raises(ValueError, match="outside the disk"):
        read(base, 10 * MiB, 1)


def test_sizes_that_are_not_whole_sectors_are_refused(tmp_path):
    with pytest.raises(ImageError, match="whole number of sectors"):
        vhd.create_dynamic(str(tmp_path / "x.vhd"), 1000)


# -- differencing disks ----------------------------------------------------------------


def test_differencing_header_names_the_parent(tmp_path, base):
    child = tmp_path / "child.vhd"
    vhd.create_differencing(str(child), str(base))
    raw = child.read_bytes()
    parent = vhd.info(str(base))
    assert be32(raw[-512:], 60) == vhd.DISK_DIFFERENCING
    header = raw[512:1536]
    assert uuidlib.UUID(bytes=header[40:56]) == parent.unique_id
    assert be32(header, 56) == be32(base.read_bytes()[-512:], 24)  # the parent's time stamp
    assert header[64:64 + 16].decode("utf-16-be") == "base.vhd"
    locators = {}
    for i in range(8):
        code, space, length, _r, offset = struct.unpack_from(">4sIIIQ", header, 576 + 24 * i)
        if code != bytes(4):
            locators[code] = raw[offset:offset + length]
            assert space * 512 >= length and offset % 512 == 0
    assert locators[b"MacX"] == b"file://./base.vhd"
    assert locators[b"W2ru"].decode("utf-16-le") == ".\\base.vhd"
    assert locators[b"W2ku"].decode("utf-16-le") == str(base)
    info = vhd.info(str(child))
    assert (info.parent_uuid, info.parent_name, info.virtual_size) == (parent.unique_id, "base.vhd", 10 * MiB)


def test_reads_fall_through_to_the_parent_where_the_child_bitmap_is_clear(tmp_path, base):
    write(base, 0, b"P" * 4096)
    write(base, 5 * MiB, b"Q" * 512)
    child = tmp_path / "child.vhd"
    vhd.create_differencing(str(child), str(base))
    write(child, 1000, b"C" * 100)  # inside sectors 1 and 2: the rest of them comes from the parent
    got = read(child, 0, 4096)
    assert got == b"P" * 1000 + b"C" * 100 + b"P" * 2996
    assert read(child, 5 * MiB, 512) == b"Q" * 512
    assert read(base, 0, 4096) == b"P" * 4096  # copy-on-write: the parent is untouched
    with vhd.VhdFile(str(child)) as f:
        assert [(r.offset, r.length) for r in f.runs(0)] == [(512, 1024)]


def test_three_level_chain_and_a_child_larger_than_its_parent(tmp_path, base):
    write(base, 0, b"1" * 512)
    mid, leaf = tmp_path / "mid.vhd", tmp_path / "leaf.vhd"
    vhd.create_differencing(str(mid), str(base))
    write(mid, 512, b"2" * 512)
    vhd.create_differencing(str(leaf), str(mid), size=12 * MiB)
    write(leaf, 11 * MiB, b"3" * 512)
    assert read(leaf, 0, 1024) == b"1" * 512 + b"2" * 512
    assert read(leaf, 10 * MiB, 1 * MiB) == bytes(MiB)  # past the parents' end: zeros
    assert read(leaf, 11 * MiB, 512) == b"3" * 512
    infos = vhd.validate_chain(str(leaf))
    assert [Path(i.path).name for i in infos] == ["leaf.vhd", "mid.vhd", "base.vhd"]


def test_parent_uuid_mismatch_is_detected(tmp_path, base):
    child = tmp_path / "child.vhd"
    vhd.create_differencing(str(child), str(base))
    base.unlink()
    vhd.create_dynamic(str(base), 10 * MiB)  # same name, another disk
    with pytest.raises(ImageError, match="parent UUID mismatch"):
        vhd.validate_chain(str(child))


def test_parent_time_stamp_mismatch_is_detected(tmp_path, base):
    child = tmp_path / "child.vhd"
    vhd.create_differencing(str(child), str(base))
    uid = vhd.info(str(base)).unique_id
    base.unlink()
    create(str(base), 10 * MiB, unique_id=uid, timestamp=12345)
    with pytest.raises(ImageError, match="time stamp mismatch"):
        vhd.validate_chain(str(child))


@pytest.mark.parametrize("where,what", [(-512 + 100, "footer checksum"), (512 + 700, "dynamic disk header checksum"),
                                        (10, "footer copy at offset 0 differs")])
def test_corruption_is_detected(base, where, what):
    flip(base, where if where >= 0 else base.stat().st_size + where)
    with pytest.raises(ImageError, match=what):
        vhd.validate_chain(str(base))


def test_missing_parent_names_the_locators(tmp_path, base):
    child = tmp_path / "child.vhd"
    vhd.create_differencing(str(child), str(base))
    base.rename(tmp_path / "moved.vhd")
    with pytest.raises(ImageError, match="parent 'base.vhd' not found .*MacX=./base.vhd"):
        vhd.validate_chain(str(child))


def test_relink_to_a_copy_and_refuse_another_disk(tmp_path, base):
    write(base, 0, b"B" * 512)
    child = tmp_path / "child.vhd"
    vhd.create_differencing(str(child), str(base))
    other = tmp_path / "sr2"
    other.mkdir()
    shutil.copy(base, other / "new-parent-name.vhd")
    shutil.copy(child, other / "child.vhd")
    base.unlink()  # the W2ku locator's absolute path must not be what resolves it
    vhd.relink(str(other / "child.vhd"), str(other / "new-parent-name.vhd"))
    assert read(other / "child.vhd", 0, 512) == b"B" * 512
    assert vhd.info(str(other / "child.vhd")).parent_name == "new-parent-name.vhd"
    stranger = other / "stranger.vhd"
    vhd.create_dynamic(str(stranger), 10 * MiB)
    with pytest.raises(ImageError, match="parent UUID mismatch"):
        vhd.relink(str(other / "child.vhd"), str(stranger))


def test_coalesce_writes_the_child_into_its_parent(tmp_path, base):
    write(base, 0, os.urandom(3 * MiB))
    child = tmp_path / "child.vhd"
    vhd.create_differencing(str(child), str(base))
    write(child, 1000, os.urandom(5000))
    write(child, 7 * MiB + 3, os.urandom(100))
    before = read(child)
    assert vhd.coalesce(str(child)) == str(base)
    assert read(base) == before


def test_grow_within_and_beyond_the_bat(tmp_path, qemu_img):
    p = tmp_path / "g.vhd"
    vhd.create_dynamic(str(p), 4 * MiB)
    write(p, 0, b"g" * 4096)
    with vhd.VhdFile(str(p), writable=True) as f:
        f.grow(8 * MiB)  # 4 entries: still inside the BAT's sector
        f.grow(400 * MiB)  # 200 entries: the BAT moves to the end
    write(p, 399 * MiB, b"h" * 512)
    assert read(p, 0, 4096) == b"g" * 4096 and read(p, 399 * MiB, 512) == b"h" * 512
    assert qemu_info(qemu_img, p)["virtual-size"] == 400 * MiB
    raw = qemu_raw(qemu_img, p)
    assert raw[:4096] == b"g" * 4096 and raw[399 * MiB:399 * MiB + 512] == b"h" * 512


# -- qemu-img cross-checks ----------------------------------------------------------------


def test_qemu_img_reads_our_dynamic_vhd(base, qemu_img):
    write(base, 1000, os.urandom(10_000))
    write(base, 5 * MiB - 7, os.urandom(3 * MiB))
    info = qemu_info(qemu_img, base)
    assert (info["format"], info["virtual-size"], info["cluster-size"]) == ("vpc", 10 * MiB, BS)
    assert qemu_raw(qemu_img, base) == read(base)


def test_qemu_img_reads_a_differencing_vhd_without_its_parent(tmp_path, base, qemu_img):
    """qemu's vpc driver has no differencing support: it opens the child as a standalone
    dynamic disk (no backing file, the parent's data absent). So the chain is cross-checked
    through its parts: the child's own sectors, and the parent after a coalesce."""
    write(base, 0, os.urandom(4 * MiB))
    child = tmp_path / "child.vhd"
    vhd.create_differencing(str(child), str(base))
    write(child, 3 * MiB + 100, os.urandom(70_000))
    info = qemu_info(qemu_img, child)
    assert "backing-filename" not in info and info["virtual-size"] == 10 * MiB
    with vhd.VhdFile(str(child)) as alone:
        assert qemu_raw(qemu_img, child) == Chain([alone]).read(0, 10 * MiB)
    whole = read(child)
    assert qemu_raw(qemu_img, child) != whole  # what qemu misses: the parent's data
    vhd.coalesce(str(child))
    assert qemu_raw(qemu_img, base) == whole


@pytest.mark.parametrize("options", ["subformat=dynamic", "subformat=dynamic,force_size=on"])
def test_our_reader_reads_a_dynamic_vhd_qemu_img_wrote(tmp_path, qemu_img, options):
    raw = tmp_path / "src.raw"
    data = bytearray(9 * MiB)
    data[12345:12345 + 300_000] = os.urandom(300_000)
    data[7 * MiB:8 * MiB] = os.urandom(MiB)
    raw.write_bytes(bytes(data))
    out = tmp_path / "q.vhd"
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "vpc", "-o", options, str(raw), str(out)], check=True)
    size = qemu_info(qemu_img, out)["virtual-size"]  # qemu rounds up to a CHS geometry unless forced
    assert size >= len(data)
    got = read(out)
    assert len(got) == size and got[:len(data)] == bytes(data) and got[len(data):] == bytes(size - len(data))
    info = vhd.info(str(out))
    assert (info.disk_type, info.block_size) == (vhd.DISK_DYNAMIC, BS)
