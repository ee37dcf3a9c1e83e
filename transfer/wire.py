"""The wire format of a stream copy.

Control messages travel as JSON lines over the SSH session that started the
receiver. Data travels over separate stream connections, each opened with
a one-time token, as frames:

    header   <BBHIQI16sQ   kind, flags, segment count, payload length,
                           block offset, block length, block hash (XXH3-128
                           of the whole block, zero runs included), payload
                           checksum (XXH3-64 of a compressed payload as sent,
                           checked before decompressing; 0 when the payload is
                           raw block data, which the block hash covers)
    segments <II * count   (offset in block, length) of each data run
    payload                the data runs back to back, compressed if flagged

Everything in a block outside its segments is zero. The receiver writes each
segment at block offset + segment offset, so frames from several streams
arrive in any order.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import IO, Any

import xxhash

from .errors import ProtocolError

VERSION = 1
KIND_DATA = 1
KIND_END = 2
FLAG_ZSTD = 1

HEADER = struct.Struct("<BBHIQI16sQ")
SEGMENT = struct.Struct("<II")
STREAM_HELLO = struct.Struct("<32sH")  # token, stream index
TOKEN_SIZE = 32
MAX_CONTROL_LINE = 4 * 1024 * 1024

payload_checksum = xxhash.xxh3_64_intdigest


@dataclass(frozen=True)
class Frame:
    kind: int
    flags: int
    nseg: int
    wire_len: int
    offset: int
    block_len: int
    block_hash: bytes
    checksum: int


def pack_frame(flags: int, offset: int, block_len: int, block_hash: bytes,
               segments: list[tuple[int, int]], payload: bytes | memoryview) -> bytes:
    """Header and segment table of a data frame (the payload follows separately)."""
    checksum = payload_checksum(payload) if flags & FLAG_ZSTD else 0
    head = HEADER.pack(KIND_DATA, flags, len(segments), len(payload), offset, block_len, block_hash, checksum)
    return head + b"".join(SEGMENT.pack(o, n) for o, n in segments)


def pack_end(frames: int) -> bytes:
    """The last frame of a stream; ``offset`` carries the number of data frames sent."""
    return HEADER.pack(KIND_END, 0, 0, 0, frames, 0, bytes(16), 0)


def unpack_header(data: bytes | memoryview) -> Frame:
    frame = Frame(*HEADER.unpack(data))
    if frame.kind not in (KIND_DATA, KIND_END):
        raise ProtocolError(reason=f"unknown frame kind {frame.kind}")
    return frame


def unpack_segments(data: bytes | memoryview, count: int, block_len: int) -> list[tuple[int, int]]:
    segs = [SEGMENT.unpack_from(data, i * SEGMENT.size) for i in range(count)]
    end = 0
    for off, n in segs:
        if off < end or n == 0 or off + n > block_len:
            raise ProtocolError(reason=f"bad segment ({off}, {n}) in a block of {block_len} bytes")
        end = off + n
    return segs


def send_message(out: IO[bytes], op: str, **fields: Any) -> None:
    out.write(json.dumps({"op": op, **fields}, separators=(",", ":")).encode() + b"\n")
    out.flush()


def read_message(inp: IO[bytes], expect: str | None = None) -> dict[str, Any]:
    """Read one control message; an ``error`` message is returned as is."""
    line = inp.readline(MAX_CONTROL_LINE)
    if not line:
        raise EOFError("control channel closed")
    if not line.endswith(b"\n"):
        raise ProtocolError(reason="control message too long or truncated")
    try:
        msg = json.loads(line)
    except ValueError as e:
        raise ProtocolError(reason=f"unreadable control message: {e}") from None
    if not isinstance(msg, dict) or "op" not in msg:
        raise ProtocolError(reason="control message without 'op'")
    if expect and msg["op"] not in (expect, "error"):
        raise ProtocolError(reason=f"expected {expect!r}, got {msg['op']!r}")
    return msg
