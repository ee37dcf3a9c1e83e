"""The image digest: equal for a file and every sparse or dense copy of it."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct

import pytest
import xxhash

from transfer.digest import PREFIX, ImageDigest, block_count, file_digest, sparse_hash, zero_hash

CHUNK = 256 * 1024
SIZE = 5 * CHUNK + 1234  # the last block is partial
WRITES = {0: b"head" * 1000, 2 * CHUNK + 77: os.urandom(3 * 4096), SIZE - 5: b"tail!"}


def write_sparse(path, size=SIZE, writes=WRITES) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes.items():
            f.seek(off)
            f.write(data)


def content(size=SIZE, writes=WRITES) -> bytes:
    buf = bytearray(size)
    for off, data in writes.items():
        buf[off:off + len(data)] = data
    return bytes(buf)


def expected_digest(data: bytes, chunk: int) -> str:
    """The digest as the format describes it, computed independently of the module."""
    h = hashlib.blake2b(struct.pack("<QI", len(data), chunk), digest_size=16)
    for off in range(0, len(data), chunk):
        h.update(xxhash.xxh3_128_digest(data[off:off + chunk]))
    return PREFIX + h.hexdigest()


@pytest.fixture
def sparse(tmp_path):
    path = tmp_path / "sparse.img"
    write_sparse(path)
    return path


def test_digest_matches_the_documented_format(sparse):
    assert file_digest(str(sparse), CHUNK) == expected_digest(content(), CHUNK)


def test_sparse_and_fully_allocated_copies_agree(sparse, tmp_path):
    dense = tmp_path / "dense.img"
    dense.write_bytes(content())  # explicit zeros, every block allocated
    assert os.stat(dense).st_blocks > os.stat(sparse).st_blocks  # the copies really differ on disk
    assert file_digest(str(dense), CHUNK) == file_digest(str(sparse), CHUNK)


def test_sparse_copy_with_other_layout_agrees(sparse, tmp_path):
    # Same content, but holes in different places: explicit zeros over one
    # of the original holes, and a shared file copy.
    other = tmp_path / "other.img"
    writes = dict(WRITES)
    writes[CHUNK] = bytes(CHUNK)
    write_sparse(other, writes=writes)
    copied = tmp_path / "copied.img"
    shutil.copyfile(sparse, copied)
    assert file_digest(str(other), CHUNK) == file_digest(str(sparse), CHUNK)
    assert file_digest(str(copied), CHUNK) == file_digest(str(sparse), CHUNK)


@pytest.mark.parametrize("offset", [0, CHUNK + 5, 2 * CHUNK + 100, SIZE - 1])
def test_one_changed_byte_changes_the_digest(sparse, offset):
    before = file_digest(str(sparse), CHUNK)
    with open(sparse, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0x01]))
    assert file_digest(str(sparse), CHUNK) != before


def test_different_sizes_differ_even_when_all_zero(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_sparse(a, size=CHUNK, writes={})
    write_sparse(b, size=CHUNK + 1, writes={})
    c = tmp_path / "c"
    write_sparse(c, size=2 * CHUNK, writes={})
    digests = {file_digest(str(p), CHUNK) for p in (a, b, c)}
    assert len(digests) == 3


def test_chunk_size_is_part_of_the_digest(sparse):
    assert file_digest(str(sparse), CHUNK) != file_digest(str(sparse), 2 * CHUNK)


def test_empty_file(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    digest = file_digest(str(empty), CHUNK)
    assert digest == expected_digest(b"", CHUNK)
    assert digest == ImageDigest(0, CHUNK).hexdigest()
    assert digest.startswith(PREFIX) and len(digest) == len(PREFIX) + 32


def test_all_hole_file_equals_a_fresh_image_digest(tmp_path):
    path = tmp_path / "holes"
    write_sparse(path, writes={})
    assert file_digest(str(path), CHUNK) == ImageDigest(SIZE, CHUNK).hexdigest()
    assert file_digest(str(path), CHUNK) == expected_digest(bytes(SIZE), CHUNK)


class TestImageDigest:
    def test_last_partial_block_uses_the_zero_hash_of_its_own_length(self):
        d = ImageDigest(2 * CHUNK + 100, CHUNK)
        assert block_count(d.size, CHUNK) == 3
        assert d.get(0) == d.get(1) == zero_hash(CHUNK)
        assert d.get(2) == zero_hash(100) == xxhash.xxh3_128_digest(bytes(100))
        assert d.get(2) != zero_hash(CHUNK)

    def test_exact_multiple_has_no_partial_block(self):
        d = ImageDigest(3 * CHUNK, CHUNK)
        assert [d.get(i) for i in range(3)] == [zero_hash(CHUNK)] * 3
        assert len(d.hashes) == 3 * 16

    def test_set_changes_only_its_block(self):
        d = ImageDigest(3 * CHUNK, CHUNK)
        before = d.hexdigest()
        d.set(1, b"\xab" * 16)
        assert d.get(1) == b"\xab" * 16
        assert d.get(0) == d.get(2) == zero_hash(CHUNK)
        assert d.hexdigest() != before

    def test_block_count(self):
        assert block_count(0, CHUNK) == 0
        assert block_count(1, CHUNK) == 1
        assert block_count(CHUNK, CHUNK) == 1
        assert block_count(CHUNK + 1, CHUNK) == 2


@pytest.mark.parametrize("length", [CHUNK, 3 * 1024 * 1024 + 17])
def test_sparse_hash_equals_the_hash_of_the_assembled_block(length):
    """Pieces fed with zeros between them hash like the whole block (zero runs past 1 MiB too)."""
    import random
    rng = random.Random(length)
    for _ in range(50):
        block, pieces, pos = bytearray(length), [], rng.randrange(0, 2 * 1024 * 1024)
        while pos < length:
            n = min(length - pos, rng.randrange(1, 300_000))
            data = os.urandom(n)
            block[pos:pos + n] = data
            pieces.append((pos, memoryview(data)))
            pos += n + rng.choice([0, 1, 4096, 1_500_000])
        assert sparse_hash(pieces, length) == xxhash.xxh3_128_digest(bytes(block))
    assert sparse_hash([], length) == zero_hash(length) == xxhash.xxh3_128_digest(bytes(length))
