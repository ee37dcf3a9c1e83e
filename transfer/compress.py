"""Per-chunk compression: off, fast (zstd level 1 always) or auto.

``auto`` keeps a compressed chunk only where it saves at least 10%; after a
chunk that did not, it skips the next 1, 2, 4 ... 64 chunks before trying
again, so incompressible data costs almost nothing.
"""

from __future__ import annotations

from typing import Any

from .errors import ChunkCorrupted, InvalidArgument
from .options import COMPRESS_MODES
from .wire import FLAG_ZSTD

KEEP_RATIO = 0.9
MAX_BACKOFF = 64


class Compressor:
    """One per stream (zstd contexts are not shared between threads)."""

    def __init__(self, mode: str) -> None:
        if mode not in COMPRESS_MODES:
            raise InvalidArgument(what="compression", value=mode, reason=f"use {', '.join(COMPRESS_MODES)}")
        self.mode = mode
        self._zstd = None
        if mode != "off":
            import zstandard  # loaded only when compressing
            self._zstd = zstandard.ZstdCompressor(level=1)
        self._skip = 0
        self._backoff = 1

    def compress(self, data: bytes | memoryview) -> tuple[bytes | memoryview, int]:
        """Return (payload, flags) for ``data``."""
        if self._zstd is None:
            return data, 0
        if self.mode == "auto" and self._skip:
            self._skip -= 1
            return data, 0
        packed = self._zstd.compress(data)
        if self.mode == "fast" or len(packed) <= len(data) * KEEP_RATIO:
            self._backoff = 1
            return packed, FLAG_ZSTD
        self._skip = self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)
        return data, 0


class Decompressor:
    def __init__(self) -> None:
        self._zstd: Any = None  # loaded with the first compressed frame

    def decompress(self, payload: memoryview, flags: int, expected: int, offset: int) -> bytes | memoryview:
        if not flags & FLAG_ZSTD:
            return payload
        import zstandard
        if self._zstd is None:
            self._zstd = zstandard.ZstdDecompressor()
        try:
            data = self._zstd.decompress(payload, max_output_size=expected)
        except zstandard.ZstdError as e:
            raise ChunkCorrupted(offset=offset, length=expected, reason=f"cannot decompress: {e}") from None
        if len(data) != expected:
            raise ChunkCorrupted(offset=offset, length=expected,
                                 reason=f"decompressed to {len(data)} bytes")
        return data
