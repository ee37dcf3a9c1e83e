"""The direct data channel's protection: every frame sealed with AES-128-GCM.

The receiver makes a fresh 128-bit key for each copy and hands it to the
sender over the SSH session that started it (encrypted, and authenticated
by the host key the sender verified). Data streams are then plain TCP
connections on which every frame is sealed:

- the frame header and segment table travel in clear but are authenticated
  as associated data, so the receiver can size its reads before it decrypts;
- the payload is encrypted; a 16-byte tag follows it;
- the nonce is the stream's index (4 bytes) and the frame's number on that
  stream (8 bytes), counted by both ends, never sent. A frame replayed,
  dropped, reordered within a stream or moved to another stream fails its
  tag, and so does anything sent with another copy's key.

A stream opens with a hello that proves the key without revealing it: the
stream index and the tag of an empty message under frame number 0. Frames
count from 1.

Why not TLS here: a TLS record holds at most 16 KiB, so a 4 MiB block
costs Python 256 read calls and OpenSSL 256 writes; sealing the whole
frame in one call keeps both ends' CPU time near the cipher's own cost
(measured in the README's benchmark: direct vs tls).
"""

from __future__ import annotations

import secrets
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ChunkCorrupted, ProtocolError

KEY_SIZE = 16
TAG_SIZE = 16
NONCE = struct.Struct("<IQ")
HELLO = struct.Struct(f"<H{TAG_SIZE}s")  # stream index, tag of the empty hello message
_HELLO_AD = b"coldferry stream hello"


def new_key() -> bytes:
    return secrets.token_bytes(KEY_SIZE)


def parse_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except (TypeError, ValueError):
        key = b""
    if len(key) != KEY_SIZE:
        raise ProtocolError(reason="the receiver sent no usable data-channel key")
    return key


def hello(key: bytes, index: int) -> bytes:
    """What a sender writes first on stream ``index``."""
    tag = AESGCM(key).encrypt(NONCE.pack(index, 0), b"", _HELLO_AD + bytes([index & 0xFF]))
    return HELLO.pack(index, tag)


def check_hello(key: bytes, data: bytes | bytearray) -> int | None:
    """The stream index a hello proves, or None when it was not made with ``key``."""
    index, tag = HELLO.unpack(data)
    try:
        AESGCM(key).decrypt(NONCE.pack(index, 0), tag, _HELLO_AD + bytes([index & 0xFF]))
    except InvalidTag:
        return None
    return index


class Sealer:
    """The sending end of one stream: seals frame after frame."""

    def __init__(self, key: bytes, index: int, max_payload: int) -> None:
        self._aead = AESGCM(key)
        self._index = index
        self._count = 0
        self._out = bytearray(max_payload + TAG_SIZE)

    def seal(self, head: bytes, payload: bytes | memoryview) -> memoryview:
        """Ciphertext and tag of ``payload``, with ``head`` authenticated; valid until the next call."""
        self._count += 1
        n = len(payload) + TAG_SIZE
        out = memoryview(self._out)[:n]
        self._aead.encrypt_into(NONCE.pack(self._index, self._count), payload, head, out)
        return out


class Opener:
    """The receiving end of one stream: checks and decrypts frames in order."""

    def __init__(self, key: bytes, index: int) -> None:
        self._aead = AESGCM(key)
        self.index = index
        self._count = 0

    def open(self, head: bytes | bytearray | memoryview, sealed: memoryview, out: memoryview,
             offset: int) -> None:
        """Decrypt ``sealed`` (payload and tag) into ``out``; a bad tag is a corrupted frame."""
        self._count += 1
        try:
            self._aead.decrypt_into(NONCE.pack(self.index, self._count), sealed, bytes(head), out)
        except InvalidTag:
            raise ChunkCorrupted(offset=offset, length=len(out),
                                 reason="frame failed authentication (changed on the way, or not from "
                                        "the sender)") from None
