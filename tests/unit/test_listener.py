"""The receiver's data listener on real loopback sockets: who gets in, and how long they may take."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from transfer.errors import ProtocolError
from transfer.listener import Deadline, Limits, Listener, Stream, allowed, ssh_addresses

GOOD = b"good"


def admit(conn: socket.socket, deadline: Deadline) -> Stream | None:
    """A toy hello: ``good`` and a stream index byte."""
    data = deadline.read(conn, 5)
    return Stream(conn, data[4]) if data[:4] == GOOD else None


def connect(listener: Listener, hello: bytes = b"", source: str | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", listener.port), timeout=10,
                                 source_address=(source, 0) if source else None)
    if hello:
        s.sendall(hello)
    return s


def hung_up(sock: socket.socket) -> bool:
    """Whether the other end closed ``sock`` (a reset when it closed with our bytes unread)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def accept_in_thread(listener: Listener, count: int) -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        try:
            out.append(listener.accept(count, admit))
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


class TestAddresses:
    def test_listen_where_ssh_came_in_and_let_in_the_ssh_client(self):
        env = {"SSH_CONNECTION": "192.0.2.7 50022 192.0.2.1 22", "SSH_CLIENT": "192.0.2.7 50022 22"}
        assert ssh_addresses(env) == ("192.0.2.1", "192.0.2.7")

    def test_ssh_client_alone_names_the_client(self):
        assert ssh_addresses({"SSH_CLIENT": "2001:db8::7 50022 22"}) == ("127.0.0.1", "2001:db8::7")

    @pytest.mark.parametrize("env", [{}, {"SSH_CONNECTION": "junk"}, {"SSH_CLIENT": "not-an-address 1 22"}])
    def test_a_local_run_listens_on_and_admits_loopback_only(self, env):
        assert ssh_addresses(env) == ("127.0.0.1", None)

    @pytest.mark.parametrize("peer, addr, ok", [
        ("192.0.2.7", "192.0.2.7", True),
        ("192.0.2.7", "192.0.2.8", False),
        ("192.0.2.7", "127.0.0.1", False),
        ("192.0.2.7", "::ffff:192.0.2.7", True),  # an IPv4 client seen on an IPv6 socket
        ("2001:db8::7", "2001:db8::7", True),
        ("fe80::1%eth0", "fe80::1%eth0", True),
        (None, "127.0.0.1", True),
        (None, "127.0.0.2", True),
        (None, "::1", True),
        (None, "192.0.2.7", False),
        ("192.0.2.7", "garbage", False),
    ])
    def test_only_the_ssh_client_or_without_one_loopback_is_allowed(self, peer, addr, ok):
        assert allowed(peer, addr) is ok


class TestAccept:
    def test_streams_come_back_in_index_order(self):
        listener = Listener("127.0.0.1", None)
        t, out = accept_in_thread(listener, 2)
        socks = [connect(listener, GOOD + bytes([i])) for i in (1, 0)]
        t.join(10)
        assert [s.index for s in out[0]] == [0, 1]
        for s in out[0] + socks:
            s.sock.close() if isinstance(s, Stream) else s.close()

    def test_junk_never_counts_against_the_copy(self):
        listener = Listener("127.0.0.1", None)
        t, out = accept_in_thread(listener, 1)
        for _ in range(40):
            junk = connect(listener, b"xxxxx")
            assert hung_up(junk)
            junk.close()
        good = connect(listener, GOOD + b"\0")
        t.join(10)
        assert [s.index for s in out[0]] == [0]
        assert listener.dropped == 40
        out[0][0].sock.close()
        good.close()

    def test_a_silent_connection_waits_beside_the_real_one_and_is_closed_at_its_deadline(self):
        listener = Listener("127.0.0.1", None, Limits(hello=0.5))
        t, out = accept_in_thread(listener, 1)
        silent = connect(listener)
        trickle = connect(listener, b"g")
        good = connect(listener, GOOD + b"\0")
        t.join(10)
        assert [s.index for s in out[0]] == [0]
        for s in (silent, trickle):
            s.settimeout(10)
            trickle.sendall(b"o")  # bytes that come in time do not extend a deadline
            assert hung_up(s)  # closed at its own deadline, long before the copy's
        out[0][0].sock.close()
        good.close()

    def test_the_hello_deadline_is_per_connection_and_bounds_the_whole_hello(self):
        now = [100.0]
        deadline = Deadline(2.0, clock=lambda: now[0])
        a, b = socket.socketpair()
        try:
            b.sendall(b"go")
            assert deadline.read(a, 2) == b"go"
            assert 1.9 < a.gettimeout() <= 2.0
            now[0] += 1.5
            b.sendall(b"o")
            deadline.read(a, 1)
            assert a.gettimeout() == pytest.approx(0.5)
            now[0] += 0.5
            with pytest.raises(TimeoutError):
                deadline.read(a, 1)
        finally:
            a.close()
            b.close()

    def test_a_connection_from_another_address_is_closed_unread(self):
        listener = Listener("127.0.0.1", "127.0.0.1")
        t, out = accept_in_thread(listener, 1)
        other = connect(listener, GOOD + b"\0", source="127.0.0.2")
        assert hung_up(other)
        good = connect(listener, GOOD + b"\0")
        t.join(10)
        assert [s.index for s in out[0]] == [0] and listener.dropped == 1
        out[0][0].sock.close()
        good.close()

    def test_an_index_out_of_range_or_taken_is_refused(self):
        listener = Listener("127.0.0.1", None)
        t, out = accept_in_thread(listener, 2)
        first = connect(listener, GOOD + b"\0")
        wrong = connect(listener, GOOD + b"\2")
        assert hung_up(wrong)
        again = connect(listener, GOOD + b"\0")
        assert hung_up(again)
        second = connect(listener, GOOD + b"\1")
        t.join(10)
        assert [s.index for s in out[0]] == [0, 1] and listener.dropped == 2
        for s in (first, second):
            s.close()
        for s in out[0]:
            s.sock.close()

    def test_streams_missing_at_the_overall_limit_end_the_copy_with_a_clear_message(self):
        listener = Listener("127.0.0.1", None, Limits(accept=0.3))
        t, out = accept_in_thread(listener, 2)
        good = connect(listener, GOOD + b"\0")
        junk = connect(listener, b"xxxxx")
        t.join(10)
        assert isinstance(out[0], ProtocolError)
        assert "1 of 2 streams" in str(out[0]) and "1 other connection" in str(out[0])
        assert hung_up(good)  # the admitted one is closed too
        with pytest.raises(OSError):  # and the port is closed
            connect(listener)
        junk.close()
        good.close()

    def test_connections_beyond_the_pending_limit_are_closed_at_once(self):
        listener = Listener("127.0.0.1", None, Limits(hello=1.0, pending=2))
        t, out = accept_in_thread(listener, 1)
        silent = [connect(listener) for _ in range(2)]
        time.sleep(0.2)  # the listener has taken both
        extra = connect(listener)
        assert hung_up(extra)
        for s in silent:
            assert hung_up(s)  # their deadline frees their places
        good = connect(listener, GOOD + b"\0")
        t.join(10)
        assert [s.index for s in out[0]] == [0] and listener.dropped == 3
        for s in [*silent, extra, good, out[0][0].sock]:
            s.close()
