"""The direct channel's sealed frames: the cipher itself, and a receiver fed by hand.

The receiver half plays a sender over real loopback sockets, so it can send
what a correct sender never would: a hello made with another key, a frame
changed on the way, frames replayed or swapped, a stream index used twice.
"""

from __future__ import annotations

import os
import socket

import pytest

from transfer import seal, wire
from transfer.digest import ImageDigest, block_hash
from transfer.errors import ChunkCorrupted, ProtocolError
from tests.unit.test_receiver import CHUNK, Peer, hello


def test_hello_proves_the_key_and_names_the_stream():
    key = seal.new_key()
    assert seal.check_hello(key, seal.hello(key, 3)) == 3
    assert seal.check_hello(seal.new_key(), seal.hello(key, 3)) is None
    forged = bytearray(seal.hello(key, 3))
    forged[0] = 4  # the same tag claimed for another stream
    assert seal.check_hello(key, forged) is None


def test_a_frame_opens_only_with_its_key_stream_number_and_header():
    key = seal.new_key()
    head, payload = b"header+segments", os.urandom(1000)
    sealed = bytes(seal.Sealer(key, 0, 4096).seal(head, payload))
    assert len(sealed) == len(payload) + seal.TAG_SIZE and payload not in sealed
    out = bytearray(len(payload))
    seal.Opener(key, 0).open(head, memoryview(sealed), memoryview(out), 0)
    assert out == payload
    for opener, h, data in [(seal.Opener(seal.new_key(), 0), head, sealed),   # another copy's key
                            (seal.Opener(key, 1), head, sealed),              # another stream
                            (seal.Opener(key, 0), b"header+segmentz", sealed),  # header changed
                            (seal.Opener(key, 0), head, sealed[:-1] + bytes([sealed[-1] ^ 1]))]:
        with pytest.raises(ChunkCorrupted, match="authentication"):
            opener.open(h, memoryview(data), memoryview(bytearray(len(payload))), 0)


def test_frames_count_so_a_replayed_frame_fails():
    key = seal.new_key()
    sealer, opener = seal.Sealer(key, 0, 64), seal.Opener(key, 0)
    first = bytes(sealer.seal(b"h", b"one"))
    out = memoryview(bytearray(3))
    opener.open(b"h", memoryview(first), out, 0)
    with pytest.raises(ChunkCorrupted):
        opener.open(b"h", memoryview(first), out, 0)  # frame 1 again where frame 2 is due


def test_a_key_that_is_not_one_is_refused():
    with pytest.raises(ProtocolError, match="key"):
        seal.parse_key("abcd")
    assert seal.parse_key("00" * seal.KEY_SIZE) == bytes(seal.KEY_SIZE)


# -- a receiver on the direct channel ------------------------------------------


def connect(ready: dict, index: int = 0, key: bytes | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", ready["port"]))
    s.sendall(seal.hello(key or bytes.fromhex(ready["key"]), index))
    return s


def send_sealed(sock: socket.socket, sealer: seal.Sealer, offset: int, data: bytes) -> bytes:
    head = wire.pack_frame(0, offset, len(data), block_hash(data), [(0, len(data))], data)
    frame = head + bytes(sealer.seal(head, data))
    sock.sendall(frame)
    return frame


def send_end(sock: socket.socket, sealer: seal.Sealer, frames: int) -> None:
    end = wire.pack_end(frames)
    sock.sendall(end + bytes(sealer.seal(end, b"")))


def test_sealed_frames_make_the_image_and_nothing_travels_in_clear(tmp_path):
    blocks = {i: os.urandom(CHUNK) for i in (2, 0)}
    peer = Peer(hello(tmp_path, channel="direct", streams=2))
    try:
        ready = peer.read()
        assert "token" not in ready and len(ready["key"]) == 2 * seal.KEY_SIZE
        key = bytes.fromhex(ready["key"])
        socks = [connect(ready, i) for i in (1, 0)]
        sealers = [seal.Sealer(key, i, CHUNK) for i in (1, 0)]
        frame = send_sealed(socks[0], sealers[0], 2 * CHUNK, blocks[2])
        assert blocks[2][:4096] not in frame
        send_sealed(socks[1], sealers[1], 0, blocks[0])
        send_end(socks[0], sealers[0], 1)
        send_end(socks[1], sealers[1], 1)
        expected = ImageDigest(4 * CHUNK, CHUNK)
        for i, data in blocks.items():
            expected.set(i, block_hash(data))
        wire.send_message(peer.to_recv, "finish", digest=expected.hexdigest())
        assert peer.read()["digest"] == expected.hexdigest()
    finally:
        peer.close()
    assert (tmp_path / "disk.img").read_bytes() == blocks[0] + bytes(CHUNK) + blocks[2] + bytes(CHUNK)
    assert peer.status == [0]


def test_a_hello_with_another_key_or_a_reused_index_is_dropped(tmp_path):
    peer = Peer(hello(tmp_path, channel="direct", streams=2))
    try:
        ready = peer.read()
        key = bytes.fromhex(ready["key"])
        intruder = connect(ready, 0, key=seal.new_key())
        assert intruder.recv(1) == b""  # the receiver hung up on it
        first = connect(ready, 0)
        again = connect(ready, 0)  # stream 0 is taken
        assert again.recv(1) == b""
        second = connect(ready, 1)
        for i, s in enumerate((first, second)):
            send_end(s, seal.Sealer(key, i, 16), 0)
        wire.send_message(peer.to_recv, "finish", digest=ImageDigest(4 * CHUNK, CHUNK).hexdigest())
        assert peer.read()["op"] == "done"
    finally:
        peer.close()


def test_a_frame_changed_on_the_way_is_refused(tmp_path):
    peer = Peer(hello(tmp_path, channel="direct"))
    try:
        ready = peer.read()
        sock = connect(ready)
        data = os.urandom(CHUNK)
        head = wire.pack_frame(0, 0, CHUNK, block_hash(data), [(0, CHUNK)], data)
        sealed = bytearray(seal.Sealer(bytes.fromhex(ready["key"]), 0, CHUNK).seal(head, data))
        sealed[100] ^= 0x01
        sock.sendall(head + bytes(sealed))
        err = peer.read()
        assert err["kind"] == "ChunkCorrupted" and "authentication" in err["message"]
    finally:
        peer.close()
    assert not (tmp_path / "disk.img").exists()


def test_a_replayed_frame_is_refused(tmp_path):
    peer = Peer(hello(tmp_path, channel="direct"))
    try:
        ready = peer.read()
        sock = connect(ready)
        frame = send_sealed(sock, seal.Sealer(bytes.fromhex(ready["key"]), 0, CHUNK), 0, os.urandom(CHUNK))
        sock.sendall(frame)
        assert peer.read()["kind"] == "ChunkCorrupted"
    finally:
        peer.close()
