"""The benchmark's source images, one per case, made from a seed.

Random bytes are an AES-128-CTR keystream (fast, incompressible, the same
for the same seed). Every size is multiplied by ``--scale`` and rounded to a
MiB; run lengths are not scaled.

  a  dense: the whole file is random data.
  b  sparse raw: a hole-filled file with 1/8 of its size as random data, in
     64 KiB-aligned runs of 128 KiB..8 MiB; one run per equal slot of the
     file, at a random aligned offset inside its slot.
  c  allocated, 75% zeros: every byte written (zeros explicitly, no holes);
     1/4 of the file is random data in 1 MiB-aligned runs of 1..16 MiB,
     placed like b's runs.
  d  qcow2: a qcow2 file whose guest data is 1/8 of its virtual size,
     random, in 64 KiB-aligned (cluster-aligned) runs of 64 KiB..4 MiB,
     made by ``qemu-img convert -O qcow2`` from a sparse raw scratch file.
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
WRITE_BUF = 16 * MiB
GRAIN = 64 * KiB  # zero-detection granularity for a source's "data" size

Extent = tuple[int, int]  # (offset, length)


@dataclass(frozen=True)
class Case:
    """One benchmark case; sizes are before scaling."""

    key: str
    title: str
    size: int            # apparent size (virtual size for qcow2)
    data: int            # random bytes to write
    min_run: int
    max_run: int
    align: int
    layout: str


CASES: dict[str, Case] = {c.key: c for c in (
    Case("a", "dense, incompressible", 2 * GiB, 2 * GiB, 0, 0, MiB,
         "random data over the whole file"),
    Case("b", "sparse raw, scattered data", 8 * GiB, 1 * GiB, 128 * KiB, 8 * MiB, 64 * KiB,
         "holes; 1/8 random data in 64 KiB-aligned runs of 128 KiB..8 MiB, one per equal slot"),
    Case("c", "allocated raw, 75% zeros", 4 * GiB, 1 * GiB, 1 * MiB, 16 * MiB, 1 * MiB,
         "fully allocated, zeros written; 1/4 random data in 1 MiB-aligned runs of 1..16 MiB, "
         "one per equal slot"),
    Case("d", "qcow2 image", 4 * GiB, 512 * MiB, 64 * KiB, 4 * MiB, 64 * KiB,
         "qcow2 of that virtual size; 1/8 random guest data in cluster-aligned runs of "
         "64 KiB..4 MiB (qemu-img convert from a sparse raw)"),
)}


@dataclass(frozen=True)
class Source:
    """A made source image and the figures every result is compared with."""

    case: Case
    path: Path
    size: int        # apparent size of the file
    data: int        # bytes of the file in 64 KiB grains that are not all zero
    allocated: int   # st_blocks * 512
    extents: int     # random runs written


class RandomBytes:
    """A seeded, incompressible byte stream."""

    def __init__(self, seed: int) -> None:
        key = random.Random(seed).randbytes(16)
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros = bytes(WRITE_BUF)

    def take(self, n: int) -> bytes:
        return self._enc.update(self._zeros[:n]) if n <= WRITE_BUF else self._enc.update(bytes(n))


def round_mib(n: float) -> int:
    return max(MiB, int(n) // MiB * MiB)


def scatter(size: int, data: int, min_run: int, max_run: int, align: int,
            rng: random.Random) -> list[Extent]:
    """Non-overlapping aligned runs totalling about ``data`` bytes, spread over ``size``."""
    runs: list[int] = []
    left = data
    while left > 0:  # each pass takes at least one aligned unit
        n = min(left, align * rng.randint(max(1, min_run // align), max(1, max_run // align)))
        runs.append(n)
        left -= n
    rng.shuffle(runs)
    slot = size // len(runs) // align * align
    extents = []
    for i, n in enumerate(runs):
        n = min(n, slot)
        extents.append((i * slot + align * rng.randint(0, (slot - n) // align), n))
    return extents


def write_random(fd: int, extents: list[Extent], rnd: RandomBytes) -> None:
    for offset, length in extents:
        pos = offset
        while pos < offset + length:
            n = min(WRITE_BUF, offset + length - pos)
            os.pwrite(fd, rnd.take(n), pos)
            pos += n


def write_zeros(fd: int, start: int, end: int) -> None:
    zeros = bytes(WRITE_BUF)
    pos = start
    while pos < end:
        n = min(WRITE_BUF, end - pos)
        os.pwrite(fd, zeros[:n], pos)
        pos += n


def make_raw(path: Path, size: int, extents: list[Extent], rnd: RandomBytes,
             allocate_zeros: bool) -> None:
    """A raw file of ``size`` with random data at ``extents``; zeros as holes or written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        if allocate_zeros:
            pos = 0
            for offset, length in sorted(extents):
                write_zeros(fd, pos, offset)
                pos = offset + length
            write_zeros(fd, pos, size)
        write_random(fd, extents, rnd)
        os.fsync(fd)
    finally:
        os.close(fd)


def make(case: Case, directory: Path, scale: float, seed: int) -> Source:
    """Create ``case``'s source image in ``directory``."""
    rng = random.Random(f"{seed}-{case.key}")
    rnd = RandomBytes(rng.getrandbits(64))
    size = round_mib(case.size * scale)
    data = min(size, round_mib(case.data * scale))
    if case.key == "a":
        extents = [(offset, min(WRITE_BUF, size - offset)) for offset in range(0, size, WRITE_BUF)]
    else:
        extents = scatter(size, data, case.min_run, case.max_run, case.align, rng)
    raw = directory / f"case-{case.key}.raw"
    make_raw(raw, size, extents, rnd, allocate_zeros=case.key == "c")
    path = raw
    if case.key == "d":
        path = directory / f"case-{case.key}.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                       check=True)
        raw.unlink()
    st = path.stat()
    return Source(case, path, st.st_size, data_bytes(path), st.st_blocks * 512,
                  1 if case.key == "a" else len(extents))


def data_bytes(path: Path) -> int:
    """Bytes in 64 KiB grains that hold data and are not all zeros (what needs sending)."""
    zero = bytes(GRAIN)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for start, length in data_extents(fd, size):
            pos = start
            while pos < start + length:
                buf = os.pread(fd, min(WRITE_BUF, start + length - pos), pos)
                if not buf:
                    break
                total += sum(len(g) for g in (buf[i:i + GRAIN] for i in range(0, len(buf), GRAIN))
                             if g != zero[:len(g)])
                pos += len(buf)
    finally:
        os.close(fd)
    return total


def data_extents(fd: int, size: int) -> list[Extent]:
    extents = []
    pos = 0
    while pos < size:  # each pass moves past one data extent
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end - start))
        pos = end
    return extents


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512
