"""The receiver driven frame by frame over real loopback sockets (no SSH).

A test plays the sender: it speaks the control protocol over pipes and
writes hand-made frames, so it can send what a correct sender never would:
corrupted chunks, bad tokens, frames out of order.
"""

from __future__ import annotations

import errno
import os
import socket
import threading

import pytest

from transfer import wire
from transfer.digest import ImageDigest, block_hash
from transfer.errors import InvalidArgument
from transfer.options import MAX_STREAMS
from transfer.receiver import Receiver, serve

CHUNK = 1 << 20


class Peer:
    """A receiver running serve() in a thread, and the test's end of its control pipes."""

    def __init__(self, hello: dict, **serve_args) -> None:
        self._serve_args = serve_args
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        self.to_recv = os.fdopen(w1, "wb")
        self.from_recv = os.fdopen(r2, "rb")
        self._inp, self._out = os.fdopen(r1, "rb"), os.fdopen(w2, "wb")
        self.status: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wire.send_message(self.to_recv, "hello", **hello)

    def _run(self) -> None:
        try:
            self.status.append(serve(self._inp, self._out, "127.0.0.1", **self._serve_args))
        finally:
            self._out.close()

    def read(self) -> dict:
        return wire.read_message(self.from_recv)

    def connect(self, ready: dict, token: bytes | None = None, index: int = 0,
                source: str | None = None) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", ready["port"]), timeout=10,
                                     source_address=(source, 0) if source else None)
        s.sendall(wire.STREAM_HELLO.pack(token or bytes.fromhex(ready["token"]), index))
        return s

    def close(self) -> None:
        self.to_recv.close()
        self.thread.join(10)

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hello(root, name="disk.img", size=4 * CHUNK, **extra) -> dict:
    msg = dict(version=wire.VERSION, root=str(root), name=name, size=size, chunk_size=CHUNK,
               source="test-source", streams=1, channel="ssh", data_bytes=size, mode=0o640)
    msg.update(extra)
    return msg


def send_block(sock: socket.socket, offset: int, data: bytes, corrupt: bool = False) -> None:
    payload = bytearray(data)
    head = wire.pack_frame(0, offset, len(data), block_hash(data), [(0, len(data))], bytes(payload))
    if corrupt:
        payload[len(payload) // 2] ^= 0xFF
    sock.sendall(head + bytes(payload))


def finish_with(peer: Peer, sock: socket.socket, blocks: dict[int, bytes], size: int = 4 * CHUNK) -> dict:
    """Send ``blocks`` on ``sock``, end the stream and ask the receiver to finish; its answer."""
    for i, data in blocks.items():
        send_block(sock, i * CHUNK, data)
    sock.sendall(wire.pack_end(len(blocks)))
    expected = ImageDigest(size, CHUNK)
    for i, data in blocks.items():
        expected.set(i, block_hash(data))
    wire.send_message(peer.to_recv, "finish", digest=expected.hexdigest())
    return peer.read()


def test_blocks_in_any_order_make_the_image_and_digest(tmp_path):
    blocks = {i: os.urandom(CHUNK) for i in (3, 0, 2)}  # block 1 is a hole
    peer = Peer(hello(tmp_path))
    try:
        ready = peer.read()
        assert ready["op"] == "ready"
        sock = peer.connect(ready)
        done = finish_with(peer, sock, blocks)
        expected = ImageDigest(4 * CHUNK, CHUNK)
        for i, data in blocks.items():
            expected.set(i, block_hash(data))
        assert done["op"] == "done" and done["digest"] == expected.hexdigest()
        sock.close()
    finally:
        peer.close()
    target = tmp_path / "disk.img"
    content = target.read_bytes()
    assert content == blocks[0] + bytes(CHUNK) + blocks[2] + blocks[3]
    assert target.stat().st_blocks * 512 < 4 * CHUNK  # the hole stayed a hole
    assert target.stat().st_mode & 0o777 == 0o640
    assert not list(tmp_path.glob(".disk.img.*"))  # part file and journal are gone
    assert peer.status == [0]


def test_corrupted_chunk_is_detected_and_reported(tmp_path):
    peer = Peer(hello(tmp_path))
    try:
        ready = peer.read()
        sock = peer.connect(ready)
        send_block(sock, 0, os.urandom(CHUNK), corrupt=True)
        err = peer.read()
        assert err["op"] == "error" and err["kind"] == "ChunkCorrupted"
        assert "offset 0" in err["message"]
        sock.close()
    finally:
        peer.close()
    assert peer.status == [1]
    assert not (tmp_path / "disk.img").exists()


def test_wrong_block_hash_is_detected(tmp_path):
    peer = Peer(hello(tmp_path))
    try:
        sock = peer.connect(peer.read())
        data = os.urandom(CHUNK)
        head = wire.pack_frame(0, 0, CHUNK, block_hash(b"something else"), [(0, CHUNK)], data)
        sock.sendall(head + data)
        err = peer.read()
        assert err["kind"] == "ChunkCorrupted" and "block hash" in err["message"]
    finally:
        peer.close()


def test_digest_mismatch_removes_the_partial_copy(tmp_path):
    peer = Peer(hello(tmp_path))
    try:
        sock = peer.connect(peer.read())
        send_block(sock, 0, os.urandom(CHUNK))
        sock.sendall(wire.pack_end(1))
        wire.send_message(peer.to_recv, "finish", digest="cf1:" + "0" * 32)
        err = peer.read()
        assert err["kind"] == "DigestMismatch"
    finally:
        peer.close()
    assert not (tmp_path / "disk.img").exists()
    assert not list(tmp_path.glob(".disk.img.*"))


def test_connection_with_a_bad_token_is_refused(tmp_path):
    peer = Peer(hello(tmp_path))
    try:
        ready = peer.read()
        intruder = peer.connect(ready, token=b"x" * wire.TOKEN_SIZE)
        assert intruder.recv(1) == b""  # closed on us
        assert finish_with(peer, peer.connect(ready), {0: os.urandom(CHUNK)})["op"] == "done"
    finally:
        peer.close()


@pytest.mark.parametrize("name", ["../escape.img", "/etc/escape.img", "a/../../escape.img", "a//b"])
def test_names_outside_the_served_directory_are_refused(tmp_path, name):
    root = tmp_path / "root"
    root.mkdir()
    assert refused(hello(root, name=name))["kind"] == "PathRefused"
    assert list(tmp_path.iterdir()) == [root] and not list(root.iterdir())


def test_symlink_out_of_the_served_directory_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    assert refused(hello(root, name="link/disk.img"))["kind"] == "PathRefused"
    assert not list(outside.iterdir())


def test_existing_target_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "disk.img").write_bytes(b"keep me")
    err = refused(hello(tmp_path))
    assert err["kind"] == "TargetExists" and "--overwrite" in err["message"]
    assert (tmp_path / "disk.img").read_bytes() == b"keep me"


def test_no_space_is_refused_before_any_data(tmp_path):
    err = refused(hello(tmp_path, size=1 << 40, data_bytes=1 << 60))
    assert err["kind"] == "NoSpace" and "free" in err["message"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("streams, channel", [(0, "ssh"), (MAX_STREAMS + 1, "direct"), (1, "udp")])
def test_more_streams_than_a_sender_may_open_or_an_unknown_channel_is_refused(tmp_path, streams, channel):
    with pytest.raises(InvalidArgument, match=f"1-{MAX_STREAMS} streams over direct, tls, ssh"):
        Receiver(hello(tmp_path, streams=streams, channel=channel), "127.0.0.1")
    assert Receiver(hello(tmp_path, streams=MAX_STREAMS), "127.0.0.1").streams == MAX_STREAMS


def test_protocol_version_mismatch_is_explained(tmp_path):
    err = refused(hello(tmp_path, version=99))
    assert err["kind"] == "ProtocolError" and "same coldferry version" in err["message"]


def test_resume_reports_journalled_blocks_and_zeroes_torn_ones(tmp_path):
    first = os.urandom(CHUNK)
    peer = Peer(hello(tmp_path))
    try:
        sock = peer.connect(peer.read())
        send_block(sock, 0, first)
        # A torn write: half of block 2 landed but was never journalled.
        sock.close()
        assert peer.read()["kind"] == "ProtocolError"  # stream closed before its end frame
    finally:
        peer.close()
    part = tmp_path / ".disk.img.coldferry-part"
    with open(part, "r+b") as f:
        f.seek(2 * CHUNK)
        f.write(b"\xff" * (CHUNK // 2))
    peer = Peer(hello(tmp_path))
    try:
        ready = peer.read()
        import base64
        bits = base64.b64decode(ready["have"])
        assert bits[0] & 1 and not bits[0] & 4  # block 0 kept, block 2 not
        sock = peer.connect(ready)
        sock.sendall(wire.pack_end(0))
        expected = ImageDigest(4 * CHUNK, CHUNK)
        expected.set(0, block_hash(first))
        wire.send_message(peer.to_recv, "finish", digest=expected.hexdigest())
        assert peer.read()["op"] == "done"
    finally:
        peer.close()
    assert (tmp_path / "disk.img").read_bytes() == first + bytes(3 * CHUNK)


def test_corrupted_compressed_payload_is_caught_before_decompressing(tmp_path):
    import zstandard
    data = b"compressible " * (CHUNK // 13) + bytes(CHUNK % 13)
    packed = bytearray(zstandard.ZstdCompressor(level=1).compress(data))
    head = wire.pack_frame(wire.FLAG_ZSTD, 0, CHUNK, block_hash(data), [(0, CHUNK)], bytes(packed))
    packed[len(packed) // 2] ^= 0xFF
    peer = Peer(hello(tmp_path))
    try:
        sock = peer.connect(peer.read())
        sock.sendall(head + bytes(packed))
        err = peer.read()
        assert err["kind"] == "ChunkCorrupted" and "payload checksum" in err["message"], err
    finally:
        peer.close()


def test_listens_on_ipv6_when_ssh_came_in_over_ipv6(tmp_path):
    from transfer.receiver import Receiver
    recv = Receiver(hello(tmp_path, channel="tls"), "::1")
    try:
        ready = recv.prepare()
        assert recv.listener.family == socket.AF_INET6 and ready["port"] > 0
    finally:
        recv.listener.close()
        recv.close()


def _direct(fd: int) -> bool:
    import fcntl
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def test_aligned_pieces_bypass_the_page_cache_and_the_rest_go_through_it(tmp_path, monkeypatch):
    """Whole 4 KiB-aligned pieces are written with O_DIRECT; the file's ragged end is not."""
    size = 2 * CHUNK + 1000  # the last block ends off a 4 KiB boundary
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        pytest.skip(f"{tmp_path} has no O_DIRECT (tmpfs?)")
    os.unlink(tmp_path / "probe")
    writes: list[tuple[int, int, bool]] = []
    real = os.pwrite

    def pwrite(fd, data, at):
        writes.append((at, len(data), _direct(fd)))
        return real(fd, data, at)

    monkeypatch.setattr("transfer.receiver.os.pwrite", pwrite)
    blocks = {0: os.urandom(CHUNK), 2: os.urandom(1000)}
    peer = Peer(hello(tmp_path, size=size))
    try:
        sock = peer.connect(peer.read())
        assert finish_with(peer, sock, blocks, size)["op"] == "done"
        sock.close()
    finally:
        peer.close()
    assert (tmp_path / "disk.img").read_bytes() == blocks[0] + bytes(CHUNK) + blocks[2]
    assert sorted(writes) == [(0, CHUNK, True), (2 * CHUNK, 1000, False)]


def test_a_failed_write_is_reported_and_the_blocks_written_before_it_are_kept(tmp_path, monkeypatch):
    import errno
    real = os.pwrite

    def pwrite(fd, data, at):
        if at >= 2 * CHUNK:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, at)

    monkeypatch.setattr("transfer.receiver.os.pwrite", pwrite)
    first = os.urandom(CHUNK)
    peer = Peer(hello(tmp_path))
    try:
        sock = peer.connect(peer.read())
        send_block(sock, 0, first)
        send_block(sock, 2 * CHUNK, os.urandom(CHUNK))
        err = peer.read()
        assert err["op"] == "error" and "No space left on device" in err["message"]
        assert str(tmp_path / "disk.img") in err["message"]
        sock.close()
    finally:
        peer.close()
    assert peer.status == [1]
    monkeypatch.undo()
    peer = Peer(hello(tmp_path))  # the next attempt resumes: block 0 is there, block 2 is not
    try:
        import base64
        ready = peer.read()
        bits = base64.b64decode(ready["have"])
        assert bits[0] & 1 and not bits[0] & 4
        peer.connect(ready).close()  # lets the receiver stop waiting for its stream
        assert peer.read()["kind"] == "ProtocolError"
    finally:
        peer.close()


def refused(msg: dict, **serve_args) -> dict:
    """The receiver's answer to a hello it refuses; its session has ended when this returns."""
    with Peer(msg, **serve_args) as peer:
        err = peer.read()
    assert err["op"] == "error" and peer.status == [1], err
    return err


# -- the data listener under attack --------------------------------------------


def test_junk_connections_do_not_abort_the_copy(tmp_path):
    with Peer(hello(tmp_path)) as peer:
        ready = peer.read()
        for _ in range(12):  # more than any count of bad tokens that once aborted the copy
            intruder = peer.connect(ready, token=os.urandom(wire.TOKEN_SIZE))
            assert intruder.recv(1) == b""
            intruder.close()
        assert finish_with(peer, peer.connect(ready), {0: os.urandom(CHUNK)})["op"] == "done"
    assert peer.status == [0]


def test_a_silent_connection_does_not_hold_up_the_real_stream(tmp_path):
    with Peer(hello(tmp_path)) as peer:
        ready = peer.read()
        silent = socket.create_connection(("127.0.0.1", ready["port"]))
        assert finish_with(peer, peer.connect(ready), {0: os.urandom(CHUNK)})["op"] == "done"
        # The real stream got in while the silent one was still waited for (its hello
        # deadline had not passed), not after the receiver gave up on it.
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):
            silent.recv(1)
        silent.close()


def test_a_connection_from_another_address_than_the_ssh_client_is_refused(tmp_path):
    from tests.unit.test_listener import hung_up
    from transfer import seal
    # The ssh channel's streams come from the SSH server, on loopback: this is the direct one.
    with Peer(hello(tmp_path, channel="direct"), peer="127.0.0.1") as peer:
        ready = peer.read()
        key = bytes.fromhex(ready["key"])
        socks = [socket.create_connection(("127.0.0.1", ready["port"]), timeout=10, source_address=(src, 0))
                 for src in ("127.0.0.2", "127.0.0.1")]
        for s in socks:
            s.sendall(seal.hello(key, 0))  # the right key from both
        assert hung_up(socks[0])
        end = wire.pack_end(0)
        socks[1].sendall(end + bytes(seal.Sealer(key, 0, 16).seal(end, b"")))
        wire.send_message(peer.to_recv, "finish", digest=ImageDigest(4 * CHUNK, CHUNK).hexdigest())
        assert peer.read()["op"] == "done"


# -- refusals answered with a message, leaving nothing behind -----------------


def test_a_file_that_appears_at_the_destination_before_the_commit_is_kept(tmp_path):
    with Peer(hello(tmp_path)) as peer:
        sock = peer.connect(peer.read())
        (tmp_path / "disk.img").write_bytes(b"theirs")  # after the receiver's check
        err = finish_with(peer, sock, {0: os.urandom(CHUNK)})
        assert err["op"] == "error" and err["kind"] == "TargetExists", err
    assert (tmp_path / "disk.img").read_bytes() == b"theirs"
    assert peer.status == [1]


def test_a_size_beyond_the_limit_is_refused_with_a_message_and_nothing_left(tmp_path):
    err = refused(hello(tmp_path, size=2 ** 70, data_bytes=0))
    assert err["kind"] == "InvalidArgument" and "size" in err["message"], err
    assert list(tmp_path.iterdir()) == []


def test_a_size_the_file_system_cannot_hold_is_refused_and_nothing_left(tmp_path, monkeypatch):
    real = os.ftruncate

    def ftruncate(fd, length):
        if length == 4 * CHUNK:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        return real(fd, length)

    monkeypatch.setattr(os, "ftruncate", ftruncate)
    assert "File too large" in refused(hello(tmp_path))["message"]
    assert list(tmp_path.iterdir()) == []


def test_a_hard_linked_part_file_is_refused_and_the_other_file_untouched(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 1000)
    os.link(victim, root / ".disk.img.coldferry-part")
    err = refused(hello(root))
    assert err["kind"] == "UnsafeFile" and "2 links" in err["message"], err
    assert victim.read_bytes() == b"precious" * 1000
    assert sorted(os.listdir(root)) == [".disk.img.coldferry-part"]  # no journal left


@pytest.mark.parametrize("name", ["disk\n.img", "a\rb.img", "esc\x1b[2J.img", "del\x7f.img"])
def test_names_with_control_characters_are_refused(tmp_path, name):
    err = refused(hello(tmp_path, name=name))
    assert err["kind"] == "PathRefused" and "control character" in err["message"], err
    assert list(tmp_path.iterdir()) == []
