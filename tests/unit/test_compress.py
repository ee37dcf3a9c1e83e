"""Per-chunk compression: off, fast, and auto with its back-off on incompressible data."""

from __future__ import annotations

import os

import pytest
import zstandard

from transfer import compress
from transfer.compress import Compressor, Decompressor
from transfer.errors import ChunkCorrupted, InvalidArgument
from transfer.wire import FLAG_ZSTD

CHUNK = 64 * 1024
TEXT = (b"the quick brown fox jumps over the lazy dog " * 2000)[:CHUNK]


@pytest.fixture
def zstd_calls(monkeypatch):
    """Count the chunks that really go through zstd."""
    calls = []
    real = zstandard.ZstdCompressor

    class Counting:
        def __init__(self, **kwargs):
            self._inner = real(**kwargs)

        def compress(self, data):
            calls.append(len(data))
            return self._inner.compress(data)

    monkeypatch.setattr(zstandard, "ZstdCompressor", Counting)
    return calls


def test_off_returns_the_same_object_unflagged():
    data = memoryview(TEXT)
    payload, flags = Compressor("off").compress(data)
    assert payload is data
    assert flags == 0


def test_fast_round_trips_through_the_decompressor():
    c, d = Compressor("fast"), Decompressor()
    for data in (TEXT, os.urandom(CHUNK), bytes(CHUNK)):
        payload, flags = c.compress(data)
        assert flags == FLAG_ZSTD  # fast always compresses, even random data
        assert bytes(d.decompress(memoryview(payload), flags, len(data), 0)) == data


def test_unflagged_payload_passes_through_the_decompressor():
    payload = memoryview(TEXT)
    assert Decompressor().decompress(payload, 0, len(TEXT), 0) is payload


def test_auto_keeps_compressible_data_compressed():
    c, d = Compressor("auto"), Decompressor()
    for _ in range(20):
        payload, flags = c.compress(TEXT)
        assert flags == FLAG_ZSTD
        assert len(payload) < len(TEXT) * compress.KEEP_RATIO
        assert d.decompress(memoryview(payload), flags, len(TEXT), 0) == TEXT


def test_auto_backs_off_on_incompressible_data(zstd_calls):
    c = Compressor("auto")
    chunks = [os.urandom(CHUNK) for _ in range(200)]
    for data in chunks:
        payload, flags = c.compress(data)
        assert flags == 0
        assert payload is data  # sent as is
    # Tries at chunks 0, 2, 5, 10, 19, 36, 69, 134, 199: back-off 1, 2, 4 ... 64.
    assert len(zstd_calls) <= 12
    assert len(zstd_calls) >= 2  # it does keep trying


def test_auto_returns_to_compression_after_a_random_patch(zstd_calls):
    c = Compressor("auto")
    for _ in range(10):
        c.compress(os.urandom(CHUNK))
    flags = [c.compress(TEXT)[1] for _ in range(80)]
    # The back-off reached at most 64 skipped chunks; after that, compressible
    # data is compressed again, every time.
    assert flags[-1] == FLAG_ZSTD
    first = flags.index(FLAG_ZSTD)
    assert first <= compress.MAX_BACKOFF
    assert all(f == FLAG_ZSTD for f in flags[first:])


@pytest.mark.parametrize("corrupt", [
    lambda p: b"not a zstd frame at all",
    lambda p: p[:len(p) // 2],                      # truncated
    lambda p: p[:4] + bytes([p[4] ^ 0xFF]) + p[5:],  # frame header damaged
])
def test_corrupted_payload_raises_chunk_corrupted(corrupt):
    payload, flags = Compressor("fast").compress(TEXT)
    with pytest.raises(ChunkCorrupted, match="offset 8192"):
        Decompressor().decompress(memoryview(corrupt(bytes(payload))), flags, len(TEXT), 8192)


def test_wrong_expected_length_raises_chunk_corrupted():
    payload, flags = Compressor("fast").compress(TEXT)
    with pytest.raises(ChunkCorrupted):
        Decompressor().decompress(memoryview(payload), flags, len(TEXT) - 1, 0)
    with pytest.raises(ChunkCorrupted):
        Decompressor().decompress(memoryview(payload), flags, len(TEXT) + 1, 0)


@pytest.mark.parametrize("mode", ["", "gzip", "AUTO", None])
def test_invalid_mode_is_refused(mode):
    with pytest.raises(InvalidArgument, match="compression"):
        Compressor(mode)
