"""The receiving end of a stream copy.

Started over SSH as ``coldferry receive``; reads a ``hello`` on standard
input, checks the target (confined path, existing file, resume journal,
free space) before any data moves, answers ``ready`` with a one-time token
and a port, accepts exactly the announced number of stream connections (from
the SSH client's address only; see ``listener``), and writes each frame at
its offset. A refusal is answered on the control channel and leaves nothing
behind that this session made. On ``finish`` it compares its own image
digest with the sender's and moves the file into place.
"""

from __future__ import annotations

import base64
import errno
import functools
import hmac
import logging
import mmap
import os
import queue
import secrets
import socket
import sys
import threading
from dataclasses import dataclass
from typing import IO, Any, Callable

from . import seal, wire
from .compress import Decompressor
from .digest import ImageDigest, block_count, block_hash, sparse_hash
from .errors import (ChunkCorrupted, DigestMismatch, InvalidArgument, NoSpace, ProtocolError,
                     TransferError)
from .extents import DIRECT_ALIGN, ZERO_GRAIN, data_extents
from .journal import Journal
from .listener import Deadline, Limits, Listener, Stream, ssh_addresses
from .options import CHANNELS, MAX_STREAMS
from .target import Target, punch_hole
from .units import format_size

log = logging.getLogger(__name__)

MAX_CHUNK = 64 * 1024 * 1024
#: Blocks in one image (64 TiB of 4 MiB blocks): the resume bitmap must fit one control
#: message, and offsets stay far from what the system calls take (2**70 overflowed them).
MAX_BLOCKS = 1 << 24
#: Frame buffers per stream: one being received while the others wait to be written.
BUFFERS_PER_STREAM = 3
#: Threads writing received data. Writes bypass the page cache (O_DIRECT) where
#: aligned; several in flight keep the disk busy while the streams receive.
WRITERS = 4


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError("stream closed")
        got += n


class Receiver:
    """One copy being received. ``hello`` is the sender's first message."""

    def __init__(self, hello: dict[str, Any], bind: str, peer: str | None = None,
                 limits: Limits = Limits()) -> None:
        """:param bind: the address the data listener listens on.
        :param peer: the only address a data connection may come from (the SSH client's);
            None for loopback only.
        :raises TransferError: a hello to refuse (a subclass says why).
        """
        try:
            self.size = int(hello["size"])
            self.chunk = int(hello["chunk_size"])
            self.streams = int(hello["streams"])
            self.data_bytes = int(hello["data_bytes"])
            self.channel = hello["channel"]
            self.identity = {"source": str(hello["source"]), "size": self.size, "chunk": self.chunk}
            root, name = str(hello["root"]), str(hello["name"])
            self.overwrite = bool(hello.get("overwrite", False))
            self.restart = bool(hello.get("restart", False))
            self.fsync = bool(hello.get("fsync", False))
            self.mode = int(hello.get("mode", 0o600)) & 0o777
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(reason=f"bad hello message: {e!r}") from None
        if hello.get("version") != wire.VERSION:
            raise ProtocolError(reason=f"sender speaks protocol {hello.get('version')}, this receiver {wire.VERSION}; "
                                       "install the same coldferry version on both hosts")
        if not 0 < self.chunk <= MAX_CHUNK or self.chunk % ZERO_GRAIN:
            raise InvalidArgument(what="chunk size", value=self.chunk,
                                  reason=f"a multiple of {ZERO_GRAIN} up to {MAX_CHUNK}")
        if not 0 <= self.size <= MAX_BLOCKS * self.chunk:
            raise InvalidArgument(what="size", value=self.size,
                                  reason=f"0 to {format_size(MAX_BLOCKS * self.chunk)} "
                                         f"({MAX_BLOCKS} blocks of {format_size(self.chunk)})")
        if not 1 <= self.streams <= MAX_STREAMS or self.channel not in CHANNELS:
            raise InvalidArgument(what="streams or channel", value=(self.streams, self.channel),
                                  reason=f"1-{MAX_STREAMS} streams over {', '.join(CHANNELS)}")
        # The ssh channel arrives through the SSH server's port forwarding, from loopback.
        self.bind, self.peer = ("127.0.0.1", None) if self.channel == "ssh" else (bind, peer)
        self.limits = limits
        self.listener: Listener | None = None
        self.target = Target.resolve(root, name)
        self.fd = -1
        self.direct_fd = -1
        self._direct = False
        self.journal: Journal | None = None
        self.token = secrets.token_bytes(wire.TOKEN_SIZE)
        self.key = seal.new_key()
        self.errors: list[BaseException] = []
        self.frames = 0
        self.written = 0
        self._socks: list[socket.socket] = []
        self._openers: list[seal.Opener | None] = []
        self._threads: list[threading.Thread] = []
        self._writes: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._writers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.on_error = lambda exc: None

    # -- before any data -------------------------------------------------

    def prepare(self) -> dict[str, Any]:
        """Check everything that can fail before data moves; return the ``ready`` message.

        Nothing is created on the target until the path, the existing file,
        the journal and the free space have all been checked; if anything fails
        after that, what this session created is removed again.
        """
        t = self.target
        t.check_writable(self.overwrite)
        resuming = t.has_part() and not self.restart
        needed = max(0, self.data_bytes - (t.part_allocated() if resuming else 0))
        free = t.free_bytes()
        if needed > free:
            raise NoSpace(path=t.path, needed_h=format_size(needed), free_h=format_size(free))
        new = tuple(e for e in (t.part, t.journal) if not t.exists(e))
        try:
            have = self._open_files(resuming)
            self.listener = Listener(self.bind, self.peer, self.limits)
        except BaseException:
            t.discard(new)  # serve() closes what was opened
            raise
        fields: dict[str, Any] = {"port": self.listener.port, "token": self.token.hex(),
                                  "have": _bitmap(have, block_count(self.size, self.chunk)),
                                  "pid": os.getpid()}
        if self.channel == "tls":
            from . import tls  # loaded only for this channel: x509 and ssl take 30 ms to import
            self.tls_ctx, fields["fingerprint"] = tls.server_context()
        if self.channel == "direct":
            fields["key"] = self.key.hex()
            del fields["token"]  # the key itself guards the streams
        log.info("receiving %s (%s, %d blocks already here)", t.path, format_size(self.size), len(have))
        return fields

    def _open_files(self, resuming: bool) -> dict[int, bytes]:
        """Open the journal and the part file; the blocks already here when ``resuming``."""
        t = self.target
        try:
            self.journal = Journal.open(t.journal, self.identity, t.path, restart=not resuming,
                                        dir_fd=t.dir_fd)
            self.fd = t.open_part(self.size, fresh=not resuming)
            have = self._verify_journal() if resuming else {}
            self.direct_fd = t.open_direct(self.fd)
            self._direct = self.direct_fd >= 0
        except OSError as e:
            raise TransferError(reason=f"cannot write {t.path}: {e.strerror or e}") from None
        return have

    def _verify_journal(self) -> dict[int, bytes]:
        """Re-hash every journalled block; forget those that do not match; zero the rest."""
        assert self.journal is not None
        buf = bytearray(self.chunk)
        view = memoryview(buf)
        bad = []
        for index, digest in self.journal.entries.items():
            length = min(self.chunk, self.size - index * self.chunk)
            if length <= 0 or os.preadv(self.fd, [view[:length]], index * self.chunk) != length \
                    or block_hash(view[:length]) != digest:
                bad.append(index)
        if bad:
            log.warning("%d journalled blocks did not verify and will be sent again", len(bad))
            self.journal.forget(bad)
        # Blocks not journalled may hold a torn write: make them read as zeros again.
        have = self.journal.entries
        for start, length in data_extents(self.fd, self.size):
            first, last = start // self.chunk, (start + length - 1) // self.chunk
            for index in range(first, last + 1):
                if index not in have:
                    off = index * self.chunk
                    punch_hole(self.fd, off, min(self.chunk, self.size - off))
        return dict(have)

    # -- data ------------------------------------------------------------

    def accept_streams(self) -> None:
        """Accept the announced streams (see ``listener``) and start their threads."""
        assert self.listener is not None
        streams = self.listener.accept(self.streams, self._admit)
        self._socks = [st.sock for st in streams]
        self._openers = [st.opener for st in streams]
        for i in range(WRITERS):
            t = threading.Thread(target=self._writer, name=f"write-{i}", daemon=True)
            t.start()
            self._writers.append(t)
        for i, (sock, opener) in enumerate(zip(self._socks, self._openers)):
            t = threading.Thread(target=self._stream, args=(sock, opener), name=f"recv-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _admit(self, conn: socket.socket, deadline: Deadline) -> Stream | None:
        """The stream a connection's hello proves (token or key, and index), or None; within
        ``deadline``, TLS handshake included. What it refuses, it closes."""
        sock = conn
        try:
            if self.channel == "tls":
                sock = self.tls_ctx.wrap_socket(deadline.arm(conn), server_side=True)
            if self.channel == "direct":
                index = seal.check_hello(self.key, deadline.read(sock, seal.HELLO.size))
            else:
                token, index = wire.STREAM_HELLO.unpack(deadline.read(sock, wire.STREAM_HELLO.size))
                if not hmac.compare_digest(token, self.token):
                    index = None
            if index is None:
                sock.close()
                return None
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        except BaseException:
            sock.close()
            raise
        opener = seal.Opener(self.key, index) if self.channel == "direct" else None
        return Stream(sock, index, opener)

    def _stream(self, sock: socket.socket, opener: seal.Opener | None) -> None:
        try:
            self._receive(sock, opener)
        except EOFError:
            self._fail(ProtocolError(reason="a data stream closed before its end frame"))
        except BaseException as e:  # noqa: BLE001 - reported to the sender
            self._fail_on(e, "receiving data for")

    def _receive(self, sock: socket.socket, opener: seal.Opener | None) -> None:
        """Receive, check and hand over frames; writer threads write them while the next arrives."""
        chunk = self.chunk
        segmax = wire.SEGMENT.size * (chunk // ZERO_GRAIN)
        # Header and segment table side by side: sealed frames authenticate them together.
        headbuf = bytearray(wire.HEADER.size + segmax)
        hview = memoryview(headbuf)
        head, segtab = hview[:wire.HEADER.size], hview[wire.HEADER.size:]
        maxwire = chunk + chunk // 128 + 65536
        sealed = memoryview(bytearray(maxwire + seal.TAG_SIZE)) if opener else None
        # Page-aligned (mmap), so that aligned pieces can be written with O_DIRECT.
        free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(BUFFERS_PER_STREAM):
            free.put(memoryview(mmap.mmap(-1, maxwire)))
        decomp = Decompressor()
        while True:
            recv_exact(sock, head)
            f = wire.unpack_header(head)
            if f.kind == wire.KIND_END:
                if opener and sealed is not None:
                    recv_exact(sock, sealed[:seal.TAG_SIZE])
                    opener.open(head, sealed[:seal.TAG_SIZE], hview[:0], f.offset)
                return
            self._check_frame(f, maxwire)
            seglen = f.nseg * wire.SEGMENT.size
            recv_exact(sock, segtab[:seglen])
            segs = wire.unpack_segments(segtab, f.nseg, f.block_len)
            buf = free.get()  # back when its frame is written (also after a failure)
            try:
                payload = buf[:f.wire_len]
                if opener and sealed is not None:
                    recv_exact(sock, sealed[:f.wire_len + seal.TAG_SIZE])
                    opener.open(hview[:wire.HEADER.size + seglen], sealed[:f.wire_len + seal.TAG_SIZE],
                                payload, f.offset)
                else:
                    recv_exact(sock, payload)
                if f.flags & wire.FLAG_ZSTD and wire.payload_checksum(payload) != f.checksum:
                    raise ChunkCorrupted(offset=f.offset, length=f.block_len,
                                         reason="payload checksum mismatch")
                data_len = sum(n for _, n in segs)
                out = decomp.decompress(payload, f.flags, data_len, f.offset)
                raw = out is payload  # in the aligned buffer, not a decompressor's bytes
                data = memoryview(out)
                if len(data) != data_len:
                    raise ProtocolError(reason=f"frame at {f.offset}: payload does not match its segments")
                pieces, pos = [], 0
                for off, n in segs:
                    pieces.append((f.offset + off, data[pos:pos + n], raw and not pos % DIRECT_ALIGN))
                    pos += n
                # The block is checked as a whole (zeros between the pieces included) without
                # being put together: the pieces are hashed and written where they are.
                digest = sparse_hash([(at - f.offset, piece) for at, piece, _ in pieces], f.block_len)
                if digest != f.block_hash:
                    raise ChunkCorrupted(offset=f.offset, length=f.block_len, reason="block hash mismatch")
            except BaseException:
                free.put(buf)
                raise
            self._writes.put(_Write(f.offset // chunk, digest, pieces, functools.partial(free.put, buf)))

    def _writer(self) -> None:
        """Write frames' pieces, then journal their blocks; a frame's buffer is always given back."""
        while (job := self._writes.get()) is not None:
            try:  # a checked frame is written even after a failure elsewhere: a resume keeps it
                for at, piece, aligned in job.pieces:
                    self._write(piece, at, aligned)
                self.journal.record(job.index, job.digest)  # type: ignore[union-attr]
                with self._lock:
                    self.frames += 1
                    self.written += sum(len(p) for _, p, _ in job.pieces)
            except BaseException as e:  # noqa: BLE001 - reported to the sender
                self._fail_on(e, "writing")
            finally:
                job.release()

    def _fail_on(self, e: BaseException, doing: str) -> None:
        """Fail the copy with ``e`` as the sender should see it; anything unforeseen is logged."""
        if isinstance(e, TransferError):
            self._fail(e)
        elif isinstance(e, OSError):
            self._fail(TransferError(reason=f"{doing} {self.target.path}: {e.strerror or e}"))
        else:
            log.exception("receiver thread failed")
            self._fail(TransferError(reason=f"receiver bug: {e!r}"))

    def _write(self, data: memoryview, at: int, aligned: bool) -> None:
        # Aligned pieces skip the page cache: on a two-core host the kernel's copy into
        # fresh cache pages cost the receiver more CPU than anything else.
        if aligned and self._direct and not (at | len(data)) % DIRECT_ALIGN:
            try:
                n = os.pwrite(self.direct_fd, data, at)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                log.info("O_DIRECT write refused (%s); writing through the page cache", e.strerror)
                self._direct = False
            else:
                if n != len(data):
                    raise TransferError(reason=f"short write to {self.target.path} at {at}")
                return
        if os.pwrite(self.fd, data, at) != len(data):
            raise TransferError(reason=f"short write to {self.target.path} at {at}")

    def _check_frame(self, f: wire.Frame, maxwire: int) -> None:
        if f.offset % self.chunk or f.offset >= self.size:
            raise ProtocolError(reason=f"frame offset {f.offset} is not a block of this image")
        if f.block_len != min(self.chunk, self.size - f.offset):
            raise ProtocolError(reason=f"frame at {f.offset}: block length {f.block_len}")
        if f.wire_len > maxwire or f.nseg == 0 or f.nseg > self.chunk // ZERO_GRAIN:
            raise ProtocolError(reason=f"frame at {f.offset}: {f.nseg} segments, {f.wire_len} bytes")

    def _fail(self, exc: TransferError) -> None:
        with self._lock:
            first = not self.errors
            self.errors.append(exc)
        if first:
            log.error("%s", exc)
            self.on_error(exc)
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # -- the end -----------------------------------------------------------

    def finish(self, sender_digest: str) -> dict[str, Any]:
        for t in self._threads:
            t.join()
        self._stop_writers()
        if self.errors:
            raise self.errors[0]
        assert self.journal is not None
        digest = ImageDigest(self.size, self.chunk)
        for index, h in self.journal.entries.items():
            digest.set(index, h)
        mine = digest.hexdigest()
        if not hmac.compare_digest(mine, str(sender_digest)):
            self.target.discard()
            raise DigestMismatch(path=self.target.path, sender=sender_digest, receiver=mine)
        try:
            os.fchmod(self.fd, self.mode)
            if self.fsync:
                os.fdatasync(self.fd)
            self.target.commit(self.overwrite)
        except OSError as e:
            raise TransferError(reason=f"cannot put {self.target.path} in place: {e.strerror or e}") from None
        self.journal.remove(dir_fd=self.target.dir_fd)
        log.info("received %s: %s written, digest %s", self.target.path, format_size(self.written), mine)
        return {"digest": mine, "written": self.written, "frames": self.frames}

    def _stop_writers(self) -> None:
        """Let the writers finish what was handed to them, then end them."""
        for _ in self._writers:
            self._writes.put(None)
        for t in self._writers:
            t.join()
        self._writers = []

    def close(self) -> None:
        self._stop_writers()  # no write may outlive the descriptors closed below
        if self.listener:
            self.listener.close()
        for s in self._socks:
            s.close()
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.journal:
            self.journal.close()
        self.target.close()


@dataclass
class _Write:
    """A checked frame for the writers: its pieces (file offset, data, O_DIRECT-able)."""

    index: int
    digest: bytes
    pieces: list[tuple[int, memoryview, bool]]
    release: Callable[[], None]


class _Control:
    """Thread-safe writer of control messages."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, op: str, **fields: Any) -> None:
        with self._lock:
            wire.send_message(self._out, op, **fields)


def _bitmap(indexes: dict[int, bytes], count: int) -> str:
    bits = bytearray((count + 7) // 8)
    for i in indexes:
        bits[i // 8] |= 1 << (i % 8)
    return base64.b64encode(bytes(bits)).decode()


def serve(inp: IO[bytes], out: IO[bytes], bind: str, peer: str | None = None,
          limits: Limits = Limits()) -> int:
    """Run one receive session over a control channel; return an exit status.

    :param bind: the address the data listener listens on.
    :param peer: the only address data connections may come from; None for loopback only.
    """
    control = _Control(out)
    receiver: Receiver | None = None
    try:
        hello = wire.read_message(inp, "hello")
        receiver = Receiver(hello, bind, peer, limits)
        ready = receiver.prepare()
        receiver.on_error = lambda exc: control.send(**exc.to_dict())
        control.send("ready", **ready)
        receiver.accept_streams()
        msg = wire.read_message(inp, "finish")
        if msg["op"] == "error":
            return 1
        control.send("done", **receiver.finish(msg.get("digest", "")))
        return 0
    except TransferError as e:
        if not (receiver and e in receiver.errors):
            control.send(**e.to_dict())
        return 1
    except EOFError:
        log.warning("the sender went away; the partial copy is kept for resuming")
        return 1
    except Exception as e:  # noqa: BLE001 - the sender hears of it rather than of a closed channel
        log.exception("receiver failed")
        control.send(**TransferError(reason=f"the receiver failed: {e!r}").to_dict())
        return 1
    finally:
        if receiver:
            receiver.close()


def serve_stdio() -> int:
    """Entry point of ``coldferry receive``: control over stdin/stdout."""
    # Listen where the SSH connection came in, so the sender can reach us there, and
    # let in the SSH client only.
    bind, peer = ssh_addresses(os.environ)
    return serve(sys.stdin.buffer, sys.stdout.buffer, bind, peer)
