"""The receiver's data listener: who may open a stream, and how long each may take to prove it.

Anyone who can reach the port can connect to it. A connection from another
address than the SSH client's (loopback only, when the receiver was not
started by sshd) is closed unread. The others' hellos are read side by
side, each in a thread of its own under a deadline of its own
(``Limits.hello``): a connection that is silent, slow or wrong is closed and
forgotten; it neither holds up the real streams nor counts towards failing
the copy. The copy fails only when its streams have not all arrived within
``Limits.accept``.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar, Union

from .errors import ProtocolError
from .seal import Opener

log = logging.getLogger(__name__)

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_Sock = TypeVar("_Sock", bound=socket.socket)


@dataclass(frozen=True)
class Limits:
    """How long streams may take to get in, and how many may be proving themselves at once.

    :param accept: seconds for all of a copy's streams to connect and prove the key.
    :param hello: seconds for one connection to prove it, TLS handshake included; the
        real sender does it in milliseconds.
    :param pending: hellos read at once; a connection beyond them is closed at once.
    """

    accept: float = 30.0
    hello: float = 2.0
    pending: int = 32


@dataclass
class Stream:
    """An admitted data connection, the stream index its hello named, and its frame opener
    (direct channel only)."""

    sock: socket.socket
    index: int
    opener: Opener | None = None


class Deadline:
    """One connection's time to prove itself: each blocking call gets what is left of it,
    so bytes that trickle in do not extend it."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at = clock() + seconds

    def arm(self, sock: _Sock) -> _Sock:
        """``sock``, set to time out when the deadline passes.

        :raises TimeoutError: the deadline has passed.
        """
        left = self._at - self._clock()
        if left <= 0:
            raise TimeoutError("the hello took too long")
        sock.settimeout(left)
        return sock

    def read(self, sock: socket.socket, size: int) -> bytearray:
        """Exactly ``size`` bytes from ``sock``.

        :raises TimeoutError: not within the deadline.
        :raises EOFError: the peer closed first.
        """
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            n = self.arm(sock).recv_into(view[got:])
            if not n:
                raise EOFError("closed during its hello")
            got += n
        return buf


#: Reads a connection's hello within the deadline: its Stream, or None (or an OSError or
#: EOFError) for one that did not prove the key; it closes what it refuses.
Admit = Callable[[socket.socket, Deadline], Union[Stream, None]]


def ssh_addresses(environ: Mapping[str, str]) -> tuple[str, str | None]:
    """Where to listen and whom to let in, from the environment sshd gives the receiver.

    Listens on the address the SSH connection came in on (``SSH_CONNECTION``) and lets
    in the SSH client's address (``SSH_CONNECTION``, else ``SSH_CLIENT``). Without them
    (a local run) it listens on loopback and lets in loopback only (``None``).
    """
    conn = environ.get("SSH_CONNECTION", "").split()
    client = environ.get("SSH_CLIENT", "").split()
    ok = len(conn) == 4 and _address(conn[0]) and _address(conn[2])
    bind = conn[2] if ok else "127.0.0.1"
    peer = conn[0] if ok else client[0] if len(client) == 3 and _address(client[0]) else None
    return bind, peer


def allowed(peer: str | None, addr: str) -> bool:
    """Whether a connection from ``addr`` may send a hello: from ``peer`` (the SSH
    client), or from loopback when there is none."""
    ip = _address(addr)
    if ip is None:
        return False
    return ip.is_loopback if peer is None else ip == _address(peer)


def _address(text: str) -> Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%")[0])  # a link-local address's zone is not part of it
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


class Listener:
    """The listening socket of one copy; ``accept`` takes its streams once, then it is closed."""

    def __init__(self, bind: str, peer: str | None, limits: Limits = Limits(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        """:param bind: the address to listen on (port chosen by the system).
        :param peer: the only address let in; None for loopback only.
        """
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self.sock = socket.create_server((bind, 0), family=family, backlog=limits.pending)
        self.peer = peer
        self.limits = limits
        self.dropped = 0
        self._clock = clock
        self._events: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def family(self) -> socket.AddressFamily:
        return self.sock.family

    def accept(self, count: int, admit: Admit) -> list[Stream]:
        """Streams 0 to ``count - 1``, each from the first connection whose hello claimed it.

        The listener is closed when this returns or raises.

        :raises ProtocolError: not all streams arrived within ``limits.accept``.
        """
        threading.Thread(target=self._accept_loop, name="listen", daemon=True).start()
        end = self._clock() + self.limits.accept
        claims: dict[int, tuple[int, Stream]] = {}  # index: (connection's turn, stream)
        pending = 0
        try:
            while len(claims) < count:
                left = end - self._clock()
                if left <= 0:
                    raise ProtocolError(reason=self._missing(len(claims), count))
                try:
                    kind, turn, conn, addr, stream = self._events.get(timeout=left)
                except queue.Empty:
                    continue
                if kind == "new":
                    if not allowed(self.peer, addr[0]):
                        self._drop(conn, addr, "not the address of the SSH client that started the receiver")
                    elif pending >= self.limits.pending:
                        self._drop(conn, addr, f"{pending} connections are already proving a key")
                    else:
                        pending += 1
                        threading.Thread(target=self._hello, args=(turn, conn, addr, admit),
                                         name="hello", daemon=True).start()
                    continue
                pending -= 1
                if stream is None or not 0 <= stream.index < count:
                    self._drop(conn, addr, "no valid hello")
                    continue
                held = claims.get(stream.index)
                if held and held[0] < turn:
                    self._drop(stream.sock, addr, f"stream {stream.index} is taken")
                    continue
                if held:  # an earlier connection claimed it too: the first one wins, whatever finished first
                    self._drop(held[1].sock, addr, f"stream {stream.index} is taken")
                claims[stream.index] = (turn, stream)
            return [claims[i][1] for i in range(count)]
        except BaseException:
            for _, stream in claims.values():
                stream.sock.close()
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Stop listening; a hello still being read is closed when it ends."""
        with self._lock:
            self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.sock.close()
        while True:
            try:
                _discard(self._events.get_nowait())
            except queue.Empty:
                return

    def _missing(self, have: int, count: int) -> str:
        others = (f"; {self.dropped} other connection{'s were' if self.dropped != 1 else ' was'} refused"
                  if self.dropped else "")
        return (f"only {have} of {count} streams connected within {self.limits.accept:g} s{others} "
                "(is a firewall between the hosts dropping the data port?)")

    def _accept_loop(self) -> None:
        turn = 0
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return  # closed
            turn += 1
            self._post(("new", turn, conn, addr, None))

    def _hello(self, turn: int, conn: socket.socket, addr: tuple, admit: Admit) -> None:
        try:
            stream = admit(conn, Deadline(self.limits.hello, self._clock))
        except (OSError, EOFError):  # timeouts and ssl errors are OSErrors
            stream = None
        except Exception:  # noqa: BLE001 - a bug must not stall the copy until its limit
            log.exception("checking a data connection's hello failed")
            stream = None
        self._post(("hello", turn, conn, addr, stream))

    def _post(self, event: tuple) -> None:
        with self._lock:
            if not self._closed:
                self._events.put(event)
                return
        _discard(event)

    def _drop(self, sock: socket.socket, addr: tuple, why: str) -> None:
        self.dropped += 1
        log.warning("refused a data connection from %s: %s", addr[0], why)
        sock.close()


def _discard(event: tuple) -> None:
    _, _, conn, _, stream = event
    conn.close()
    if stream is not None:
        stream.sock.close()
