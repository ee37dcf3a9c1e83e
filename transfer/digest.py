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


@functools.lru_cache(maxsize=8)
def zero_hash(length: int) -> bytes:
    """Hash of a block of ``length`` zero bytes."""
    return block_hash(bytes(length))


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
