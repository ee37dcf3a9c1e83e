"""Frames and control messages: what goes over the wire, and what is refused."""

from __future__ import annotations

import io

import pytest
import xxhash

from transfer import wire
from transfer.errors import ProtocolError

HASH = bytes(range(16))


class TestFrames:
    def test_data_frame_round_trip(self):
        segs = [(0, 4), (10, 6), (100, 28)]
        payload = b"abcd" + b"efghij" + b"k" * 28
        data = wire.pack_frame(wire.FLAG_ZSTD, 1 << 40, 128, HASH, segs, payload)
        assert len(data) == wire.HEADER.size + len(segs) * wire.SEGMENT.size

        frame = wire.unpack_header(data[:wire.HEADER.size])
        assert frame == wire.Frame(kind=wire.KIND_DATA, flags=wire.FLAG_ZSTD, nseg=3,
                                   wire_len=len(payload), offset=1 << 40, block_len=128,
                                   block_hash=HASH, checksum=xxhash.xxh3_64_intdigest(payload))
        assert wire.unpack_segments(data[wire.HEADER.size:], frame.nseg, frame.block_len) == segs

    def test_payload_checksum_accepts_a_memoryview(self):
        payload = b"\x00\x01" * 100
        a = wire.pack_frame(0, 0, 200, HASH, [(0, 200)], payload)
        b = wire.pack_frame(0, 0, 200, HASH, [(0, 200)], memoryview(payload))
        assert a == b

    def test_end_frame_carries_the_frame_count(self):
        frame = wire.unpack_header(wire.pack_end(42))
        assert frame.kind == wire.KIND_END
        assert frame.offset == 42
        assert (frame.nseg, frame.wire_len, frame.flags) == (0, 0, 0)

    @pytest.mark.parametrize("kind", [0, 3, 255])
    def test_unknown_kind_is_a_protocol_error(self, kind):
        data = wire.HEADER.pack(kind, 0, 0, 0, 0, 0, HASH, 0)
        with pytest.raises(ProtocolError, match=f"unknown frame kind {kind}"):
            wire.unpack_header(data)

    @pytest.mark.parametrize("segs", [
        [(0, 10), (5, 10)],    # overlapping
        [(20, 5), (0, 5)],     # out of order
        [(90, 20)],            # past the block's end
        [(0, 10), (10, 0)],    # zero length
        [(100, 1)],            # starts at the block's end
    ])
    def test_bad_segments_are_a_protocol_error(self, segs):
        table = b"".join(wire.SEGMENT.pack(o, n) for o, n in segs)
        with pytest.raises(ProtocolError, match="bad segment"):
            wire.unpack_segments(table, len(segs), 100)

    def test_adjacent_segments_up_to_the_block_end_are_accepted(self):
        segs = [(0, 10), (10, 10), (90, 10)]
        table = b"".join(wire.SEGMENT.pack(o, n) for o, n in segs)
        assert wire.unpack_segments(table, 3, 100) == segs

    def test_no_segments(self):
        assert wire.unpack_segments(b"", 0, 100) == []


class TestControlMessages:
    def test_round_trip(self):
        buf = io.BytesIO()
        wire.send_message(buf, "hello", size=123, name="disk.img", nested={"a": [1, 2]})
        wire.send_message(buf, "ready", port=4000)
        assert buf.getvalue().count(b"\n") == 2
        buf.seek(0)
        assert wire.read_message(buf) == {"op": "hello", "size": 123, "name": "disk.img",
                                          "nested": {"a": [1, 2]}}
        assert wire.read_message(buf, expect="ready") == {"op": "ready", "port": 4000}
        with pytest.raises(EOFError):
            wire.read_message(buf)

    def test_eof_raises_eoferror(self):
        with pytest.raises(EOFError):
            wire.read_message(io.BytesIO(b""))

    def test_too_long_line_is_a_protocol_error(self):
        line = b'{"op":"x","pad":"' + b"a" * wire.MAX_CONTROL_LINE + b'"}\n'
        with pytest.raises(ProtocolError, match="too long"):
            wire.read_message(io.BytesIO(line))

    def test_truncated_line_is_a_protocol_error(self):
        with pytest.raises(ProtocolError, match="truncated"):
            wire.read_message(io.BytesIO(b'{"op":"done"}'))

    @pytest.mark.parametrize("line", [b"not json\n", b'{"op": \n', b"\xff\xfe\n"])
    def test_non_json_is_a_protocol_error(self, line):
        with pytest.raises(ProtocolError, match="unreadable control message"):
            wire.read_message(io.BytesIO(line))

    @pytest.mark.parametrize("line", [b'{"size": 1}\n', b'["op"]\n', b'"op"\n', b"42\n"])
    def test_message_without_op_is_a_protocol_error(self, line):
        with pytest.raises(ProtocolError, match="without 'op'"):
            wire.read_message(io.BytesIO(line))

    def test_unexpected_op_is_a_protocol_error(self):
        buf = io.BytesIO()
        wire.send_message(buf, "done")
        buf.seek(0)
        with pytest.raises(ProtocolError, match="expected 'ready', got 'done'"):
            wire.read_message(buf, expect="ready")

    def test_error_op_passes_through_expect(self):
        buf = io.BytesIO()
        wire.send_message(buf, "error", kind="NoSpace", message="full")
        buf.seek(0)
        msg = wire.read_message(buf, expect="ready")
        assert msg == {"op": "error", "kind": "NoSpace", "message": "full"}
