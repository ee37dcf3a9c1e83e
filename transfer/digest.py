"""The image digest: the same value for a file and any sparse copy of it.

The image is cut into chunk-sized blocks; each block is hashed with
XXH3-128 over its full content (holes and zero runs read as zeros, so a
block that is all zeros has a known hash and is never read or sent). The
image digest is BLAKE2b-128 over the size, the chunk size and the block
hashes in order. Both ends compute it on their own: the sender from what it
reads, the receiver from what it received and wrote.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct

import xxhash

from .extents import data_blocks, data_extents

DEFAULT_CHUNK = 4 * 1024 * 1024
HASH_SIZE = 16
PREFIX = "cf1:"

block_hash = xxhash.xxh3_128_digest
_ZEROS = memoryview(bytes(1 << 20))


@functools.lru_cache(maxsize=8)
def zero_hash(length: int) -> bytes:
    """Hash of a block of ``length`` zero bytes."""
    return block_hash(bytes(length))


def sparse_hash(pieces: list[tuple[int, bytes | memoryview]], length: int) -> bytes:
    """``block_hash`` of a ``length``-byte block that is zero outside ``pieces``.

    ``pieces`` are (offset in the block, data), in order and not overlapping. The
    block is never put together: the hash is fed the pieces and shared zeros, which
    saves filling and copying a whole block around a short run of data.
    """
    if not pieces:
        return zero_hash(length)
    if len(pieces) == 1 and pieces[0][0] == 0 and len(pieces[0][1]) == length:
        return block_hash(pieces[0][1])
    h = xxhash.xxh3_128()
    pos = 0
    for off, data in pieces:
        _hash_zeros(h, off - pos)
        h.update(data)
        pos = off + len(data)
    _hash_zeros(h, length - pos)
    return h.digest()


def _hash_zeros(h: "xxhash.xxh3_128", n: int) -> None:
    while n > 0:
        step = min(n, len(_ZEROS))
        h.update(_ZEROS[:step])
        n -= step


def block_count(size: int, chunk: int) -> int:
    return (size + chunk - 1) // chunk


class ImageDigest:
    """Block hashes of one image, every block preset to the all-zero hash."""

    def __init__(self, size: int, chunk: int = DEFAULT_CHUNK) -> None:
        self.size = size
        self.chunk = chunk
        n = block_count(size, chunk)
        self.hashes = bytearray(zero_hash(chunk) * n)
        if n and size % chunk:
            self.set(n - 1, zero_hash(size % chunk))

    def set(self, index: int, digest: bytes) -> None:
        self.hashes[index * HASH_SIZE:(index + 1) * HASH_SIZE] = digest

    def get(self, index: int) -> bytes:
        return bytes(self.hashes[index * HASH_SIZE:(index + 1) * HASH_SIZE])

    def hexdigest(self) -> str:
        h = hashlib.blake2b(struct.pack("<QI", self.size, self.chunk), digest_size=16)
        h.update(self.hashes)
        return PREFIX + h.hexdigest()


def file_digest(path: str, chunk: int = DEFAULT_CHUNK) -> str:
    """The image digest of a local file, reading only its data extents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        digest = ImageDigest(size, chunk)
        buf = bytearray(chunk)
        view = memoryview(buf)
        for block in data_blocks(data_extents(fd, size), size, chunk):
            n = os.preadv(fd, [view[:block.length]], block.offset)
            if n != block.length:
                raise OSError(f"{path} changed size while hashing")
            digest.set(block.index, block_hash(view[:n]))
        return digest.hexdigest()
    finally:
        os.close(fd)
