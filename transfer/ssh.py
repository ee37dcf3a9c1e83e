"""SSH, the way in: paramiko with host keys from a known_hosts file only.

An unknown or changed host key is refused; keys are never added. The
receiver is started with a fixed argument list joined with shlex, never a
string built from user data: paths and options travel as JSON over its
standard input.
"""

from __future__ import annotations

import logging
import shlex
import socket
import sys
from typing import IO

# paramiko imports invoke (0.4 s of start-up here) only to run ssh_config's
# "Match exec", which coldferry never reads; without it paramiko works the same.
sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]
import paramiko  # noqa: E402

from .endpoint import Endpoint
from .errors import AuthenticationFailed, ConnectionLost, HostKeyError, RemoteCommandFailed

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0
WINDOW = 16 * 1024 * 1024
MAX_PACKET = 32768


def connect(ep: Endpoint, timeout: float = CONNECT_TIMEOUT) -> paramiko.SSHClient:
    """Log in to ``ep.host``; raise HostKeyError, AuthenticationFailed or ConnectionLost."""
    client = paramiko.SSHClient()
    client.load_host_keys(ep.known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(ep.host, port=ep.port, username=ep.user, key_filename=ep.identity,
                       look_for_keys=ep.identity is None, allow_agent=ep.identity is None,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout)
    except paramiko.BadHostKeyException:
        client.close()
        raise HostKeyError(host=ep.host, known_hosts=ep.known_hosts,
                           reason="it differs from the key in known_hosts (host reinstalled, or "
                                  "someone in between)") from None
    except paramiko.AuthenticationException as e:
        client.close()
        raise AuthenticationFailed(host=ep.host, user=ep.user, reason=str(e)) from None
    except paramiko.SSHException as e:
        client.close()
        if "not found in known_hosts" in str(e):
            raise HostKeyError(host=ep.host, known_hosts=ep.known_hosts,
                               reason="it is not in known_hosts") from None
        raise ConnectionLost(host=ep.host, reason=str(e)) from None
    except (OSError, EOFError) as e:
        client.close()
        raise ConnectionLost(host=ep.host, reason=getattr(e, "strerror", None) or str(e)) from None
    transport = client.get_transport()
    assert transport is not None
    transport.set_keepalive(15)
    return client


class RemoteProcess:
    """A command running on the remote host, its stdin/stdout as binary files."""

    def __init__(self, client: paramiko.SSHClient, argv: tuple[str, ...], host: str) -> None:
        self.argv = argv
        self.host = host
        transport = client.get_transport()
        assert transport is not None
        try:
            self.channel = transport.open_session(window_size=WINDOW, max_packet_size=MAX_PACKET)
            self.channel.exec_command(shlex.join(argv))
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise ConnectionLost(host=host, reason=f"cannot start {argv[0]}: {e}") from None
        self.stdin: IO[bytes] = self.channel.makefile_stdin("wb")
        self.stdout: IO[bytes] = self.channel.makefile("rb")

    def stderr_text(self, limit: int = 4000) -> str:
        data = b""
        while self.channel.recv_stderr_ready() and len(data) < limit:
            data += self.channel.recv_stderr(limit)
        return data.decode(errors="replace").strip()

    def failed_to_start(self) -> RemoteCommandFailed:
        """The error for a receiver that ended before answering."""
        status = self.channel.recv_exit_status() if self.channel.exit_status_ready() else None
        reason = self.stderr_text() or f"exit status {status}"
        return RemoteCommandFailed(host=self.host, command=shlex.join(self.argv), reason=reason[-800:])

    def settimeout(self, seconds: float | None) -> None:
        self.channel.settimeout(seconds)

    def close(self) -> None:
        self.channel.close()


def forward(client: paramiko.SSHClient, port: int, host: str) -> paramiko.Channel:
    """A channel to 127.0.0.1:``port`` on the remote host, through the SSH connection."""
    transport = client.get_transport()
    assert transport is not None
    try:
        return transport.open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0),
                                      window_size=WINDOW, max_packet_size=MAX_PACKET, timeout=CONNECT_TIMEOUT)
    except (paramiko.SSHException, OSError) as e:
        raise ConnectionLost(host=host, reason=f"SSH forwarding to the receiver refused: {e} "
                                               "(is AllowTcpForwarding off? use --channel direct)") from None


def plain_connect(host: str, port: int) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as e:
        raise ConnectionLost(host=host, reason=f"data connection to port {port}: {e.strerror or e} "
                                               "(a firewall? use --channel ssh)") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    return sock
