"""The sending end of a stream copy.

One copy is: read the source's allocation map; log in over SSH and start
the receiver; tell it what is coming; open the data streams it asks for;
let every stream pull the next block, read it, hash it, drop its zero runs
and send what is left; then compare both ends' image digests. A dropped
connection is retried with a fresh session that resumes from the
receiver's journal.
"""

from __future__ import annotations

import base64
import hmac
import logging
import mmap
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from . import seal, ssh, wire
from .ssh import paramiko
from .compress import Compressor
from .digest import DEFAULT_CHUNK, ImageDigest, sparse_hash
from .endpoint import Endpoint
from .errors import (ConnectionLost, DigestMismatch, InvalidArgument, ProtocolError, SourceError,
                     TransferError, from_remote)
from .extents import DIRECT_ALIGN, Block, nonzero_segments
from .options import CopyOptions
from .progress import ProgressCallback, ProgressMeter
from .ratelimit import RateLimit
from .result import CopyResult
from .source import Source

log = logging.getLogger(__name__)

ERROR_WAIT = 5.0
#: Threads that read, hash and pack blocks; they share the streams.
READERS = 4
#: Blocks whose data runs on from one to the next are read with one request of up to
#: this many blocks: 4 readers of 16 MiB read this disk at 1.23 GB/s, of 4 MiB at 0.84.
READ_BATCH = 4


@dataclass
class Counters:
    sent: int = 0
    wire: int = 0
    resumed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def stream_copy(src: str | Source, dest: Endpoint, options: CopyOptions = CopyOptions(), *,
                chunk_size: int = DEFAULT_CHUNK, overwrite: bool = False, resume: bool = True,
                progress: ProgressCallback | None = None,
                connect: Callable[[Endpoint], paramiko.SSHClient] = ssh.connect,
                sleep: Callable[[float], None] = time.sleep,
                clock: Callable[[], float] = time.monotonic) -> CopyResult:
    """Copy local file ``src`` to ``dest`` with the streaming copier.

    ``src`` is a path, or a ``Source`` the caller opened itself, e.g. to start its
    read-ahead before this module and its SSH client are loaded. The caller closes
    it, also when this fails: closing is what stops its read-ahead.

    :param options: streams, channel (``direct``: a TCP connection to the receiver, every
        frame sealed with AES-128-GCM under a one-time key handed over through SSH;
        ``tls``: a TLS connection to the receiver; ``ssh``: forwarded inside the SSH
        connection), compression, bandwidth limit (0: none), reconnect attempts and
        fsync; their method must be ``stream``.
    :param chunk_size: bytes per block; a ``Source`` must have been opened with it.
    :param overwrite: replace an existing destination file.
    :param resume: continue an interrupted copy of the same source; False starts over.
    :raises InvalidArgument: options of another method, or a Source of another block size.
    :raises TransferError: a subclass naming what failed; the source is never modified.
    """
    options.require("stream")
    if isinstance(src, Source):
        if src.chunk != chunk_size:
            raise InvalidArgument(what="chunk_size", value=chunk_size,
                                  reason=f"the source was opened with {src.chunk}-byte blocks")
        source, owned = src, False
    else:
        source, owned = Source.open(src, chunk_size, direct=True), True
    limiter = RateLimit(options.bwlimit, clock=clock, sleep=sleep) if options.bwlimit else None
    started = clock()
    attempts = 0
    try:
        if owned:
            source.prefetch()
        retrying = Retrying(stop=stop_after_attempt(options.retries + 1), reraise=True, sleep=sleep,
                            retry=retry_if_exception(lambda e: getattr(e, "retryable", False)),
                            wait=wait_exponential(multiplier=0.5, max=8),
                            before_sleep=lambda rs: log.warning("copy interrupted (%s); resuming",
                                                                rs.outcome.exception()))
        for attempt in retrying:
            with attempt:
                restart = not resume and attempts == 0
                attempts += 1
                session = Session(source, dest, options, overwrite, restart, limiter, progress, clock, connect)
                result = session.run()
        return CopyResult("stream", source.size, result.sent, result.wire,
                          source.size - result.sent - result.resumed, result.resumed,
                          clock() - started, session.digest.hexdigest())
    finally:
        if owned:
            source.close()


class Session:
    """One connection's worth of a copy: receiver, streams, digest exchange."""

    def __init__(self, source: Source, dest: Endpoint, opts: CopyOptions, overwrite: bool, restart: bool,
                 limiter: RateLimit | None, progress: ProgressCallback | None,
                 clock: Callable[[], float],
                 connect: Callable[[Endpoint], paramiko.SSHClient] = ssh.connect) -> None:
        self.connect = connect
        self.source = source
        self.dest = dest
        self.opts = opts
        self.chunk = source.chunk
        self.overwrite = overwrite
        self.restart = restart
        self.limiter = limiter
        self.progress = progress
        self.clock = clock
        self.digest = ImageDigest(source.size, source.chunk)
        self.counters = Counters()
        self.errors: list[TransferError] = []
        self.stop = threading.Event()
        self._next = 0  # index into source.blocks
        self._next_lock = threading.Lock()
        self._streams: list[_Stream] = []

    def run(self) -> Counters:
        client = self.connect(self.dest)
        remote = None
        socks: list[tuple[Any, seal.Sealer | None]] = []
        try:
            remote = ssh.RemoteProcess(client, self.dest.remote_command, self.dest.host)
            ready = self._handshake(remote)
            have = _unbitmap(ready["have"])
            socks = [self._open_stream(client, ready, i) for i in range(self.opts.streams)]
            self._send_all(socks, have)
            if self.errors:
                raise self._receiver_error(remote) or self.errors[0]
            remote.settimeout(None)
            wire.send_message(remote.stdin, "finish", digest=self.digest.hexdigest())
            done = self._reply(remote, "done")
            mine = self.digest.hexdigest()
            if not hmac.compare_digest(str(done.get("digest")), mine):
                raise DigestMismatch(path=self.dest.path, sender=mine, receiver=done.get("digest"))
            return self.counters
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise ConnectionLost(host=self.dest.host, reason=str(e) or type(e).__name__) from None
        finally:
            for s, _ in socks:
                s.close()
            if remote:
                remote.close()
            client.close()

    def _handshake(self, remote: ssh.RemoteProcess) -> dict[str, Any]:
        src = self.source
        remote.settimeout(ssh.CONNECT_TIMEOUT * 4)
        wire.send_message(remote.stdin, "hello", version=wire.VERSION, root=self.dest.root,
                          name=self.dest.name, size=src.size, chunk_size=self.chunk,
                          source=src.identity, mode=src.mode, streams=self.opts.streams, channel=self.opts.channel,
                          data_bytes=sum(sum(n for _, n in b.segments) for b in src.blocks),
                          overwrite=self.overwrite, restart=self.restart, fsync=self.opts.fsync)
        return self._reply(remote, "ready")

    def _reply(self, remote: ssh.RemoteProcess, op: str) -> dict[str, Any]:
        try:
            msg = wire.read_message(remote.stdout, op)
        except EOFError:
            raise remote.failed_to_start() if op == "ready" else ConnectionLost(
                host=self.dest.host, reason="the receiver ended without answering") from None
        if msg["op"] == "error":
            raise from_remote(msg.get("kind", ""), msg.get("message", "?"), self.dest.host)
        return msg

    def _open_stream(self, client: paramiko.SSHClient, ready: dict[str, Any],
                     index: int) -> tuple[Any, seal.Sealer | None]:
        port = int(ready["port"])
        if self.opts.channel == "direct":
            key = seal.parse_key(ready.get("key", ""))
            sock: Any = ssh.plain_connect(self.dest.host, port)
            sock.sendall(seal.hello(key, index))
            return sock, seal.Sealer(key, index, self.chunk + self.chunk // 128 + 65536)
        if self.opts.channel == "ssh":
            sock = ssh.forward(client, port, self.dest.host)
        else:
            from . import tls  # loaded only for this channel
            raw = ssh.plain_connect(self.dest.host, port)
            sock = tls.client_context().wrap_socket(raw)
            tls.check_peer(sock, ready["fingerprint"])
        sock.sendall(wire.STREAM_HELLO.pack(bytes.fromhex(ready["token"]), index))
        return sock, None

    def _send_all(self, socks: list[tuple[Any, seal.Sealer | None]], have: bytes) -> None:
        """Readers take blocks, read and pack them, then send each frame on whichever stream is free.

        More readers than streams keep several reads in flight, which O_DIRECT reads (no
        kernel readahead) need to keep the disk busy.
        """
        self.source.end_prefetch()  # from here on, what was asked for is read through the cache
        total = sum(sum(n for _, n in b.segments) for b in self.source.blocks if not _has(have, b.index))
        meter = ProgressMeter(total, self.progress, clock=self.clock)
        streams = [_Stream(sock, sealer) for sock, sealer in socks]
        self._streams = streams
        self._free: queue.SimpleQueue[_Stream] = queue.SimpleQueue()
        for st in streams:
            self._free.put(st)
        readers = max(READERS, len(streams))
        threads = [threading.Thread(target=self._reader, args=(have, meter), name=f"send-{i}", daemon=True)
                   for i in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not self.errors:
            self._guarded(self._send_ends)
        if not self.errors:
            meter.finish()

    def _take(self) -> list[Block]:
        """The next block, with up to READ_BATCH - 1 more whose data continues it (one read)."""
        blocks, src = self.source.blocks, self.source
        with self._next_lock:
            end = self._next
            while (end < len(blocks) and end - self._next < READ_BATCH
                   and (end == self._next or src.joins(blocks[end - 1], blocks[end]))):
                end += 1
            taken, self._next = blocks[self._next:end], end
        return taken

    def _reader(self, have: bytes, meter: ProgressMeter) -> None:
        self._guarded(lambda: self._send_blocks(have, meter))

    def _guarded(self, work: Callable[[], None]) -> None:
        try:
            work()
        except TransferError as e:
            self._fail(e)
        except (OSError, EOFError, paramiko.SSHException) as e:
            self._fail(ConnectionLost(host=self.dest.host, reason=str(e) or type(e).__name__))

    def _send_blocks(self, have: bytes, meter: ProgressMeter) -> None:
        chunk = self.chunk
        # Page-aligned (mmap) so that the source may be read with O_DIRECT into it.
        buf, gather = mmap.mmap(-1, READ_BATCH * chunk + DIRECT_ALIGN), bytearray(chunk)
        view, gview = memoryview(buf), memoryview(gather)
        comp = Compressor(self.opts.compress)
        while not self.stop.is_set():
            taken = self._take()
            if not taken:
                break
            if not self.source.read_blocks(taken, view):
                raise SourceError(path=self.source.path, reason="the file shrank during the copy")
            for k, block in enumerate(taken):
                if self.stop.is_set():
                    return
                self._send_block(block, view[k * chunk:k * chunk + block.length], have, meter, comp, gview)

    def _send_block(self, block: Block, content: memoryview, have: bytes, meter: ProgressMeter,
                    comp: Compressor, gview: memoryview) -> None:
        c = self.counters
        segs = nonzero_segments(content, block.segments)
        digest = sparse_hash([(off, content[off:off + n]) for off, n in segs], block.length)
        self.digest.set(block.index, digest)
        data_len = sum(n for _, n in block.segments)
        if _has(have, block.index):
            with c.lock:
                c.resumed += data_len
            return
        if segs:
            payload = _gather(content, segs, gview)
            packed, flags = comp.compress(payload)
            if self.limiter:
                self.limiter.take(len(packed))
            head = wire.pack_frame(flags, block.offset, block.length, digest, segs, packed)
            stream = self._free.get()
            try:
                stream.send(head, packed)
            finally:
                self._free.put(stream)
            with c.lock:
                c.sent += len(payload)
                c.wire += len(packed)
        meter.add(data_len)

    def _send_ends(self) -> None:
        for stream in self._streams:
            stream.end()

    def _fail(self, exc: TransferError) -> None:
        self.errors.append(exc)
        self.stop.set()
        for stream in self._streams:  # wakes readers blocked in a send
            try:
                stream.sock.close()
            except OSError:
                pass

    def _receiver_error(self, remote: ssh.RemoteProcess) -> TransferError | None:
        """The receiver's own account of a failure, when it sent one."""
        remote.settimeout(ERROR_WAIT)
        try:
            msg = wire.read_message(remote.stdout)
        except (OSError, EOFError, ProtocolError, socket.timeout):
            return None
        if msg.get("op") == "error":
            return from_remote(msg.get("kind", ""), msg.get("message", "?"), self.dest.host)
        return None


def _gather(content: memoryview, segs: list[tuple[int, int]], out: memoryview) -> memoryview:
    if len(segs) == 1:
        off, n = segs[0]
        return content[off:off + n]
    pos = 0
    for off, n in segs:
        out[pos:pos + n] = content[off:off + n]
        pos += n
    return out[:pos]


class _Stream:
    """One data connection: frames go out whole, sealed in order on the direct channel."""

    def __init__(self, sock: Any, sealer: seal.Sealer | None) -> None:
        self.sock = sock
        self.sealer = sealer
        self.frames = 0

    def send(self, head: bytes, payload: bytes | memoryview) -> None:
        self.sock.sendall(head)
        self.sock.sendall(self.sealer.seal(head, payload) if self.sealer else payload)
        self.frames += 1

    def end(self) -> None:
        end = wire.pack_end(self.frames)
        self.sock.sendall(end)
        if self.sealer:
            self.sock.sendall(self.sealer.seal(end, b""))


def _unbitmap(text: str) -> bytes:
    return base64.b64decode(text)


def _has(bits: bytes, index: int) -> bool:
    return index // 8 < len(bits) and bool(bits[index // 8] >> (index % 8) & 1)
