"""Where a copy goes: ``[USER@]HOST:PATH`` plus how to reach the host over SSH."""

from __future__ import annotations

import getpass
import ipaddress
import os
import re
from dataclasses import dataclass, field, replace

from .errors import InvalidArgument

DEFAULT_REMOTE_COMMAND = ("coldferry", "receive")
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_SPEC = re.compile(r"^(?:(?P<user>[^@/:\s]+)@)?(?P<host>\[[0-9a-fA-F:.]+\]|[^@/:\s\[\]]+):(?P<path>.+)$")


def is_host_address(text: str) -> bool:
    """Whether ``text`` is a host name or an IP address and nothing else: no user, port, path,
    query or any character that could change a URI or a command line it is put into."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


@dataclass(frozen=True)
class Endpoint:
    """A remote destination file and the SSH settings to reach its host.

    ``path`` is the destination file on the remote host. ``known_hosts`` is
    the file host keys are verified against; an unknown key is refused.
    ``remote_command`` is the argument list that starts coldferry's receiver
    on the remote host.
    """

    host: str
    path: str
    user: str = field(default_factory=getpass.getuser)
    port: int = 22
    identity: str | None = None
    known_hosts: str = field(default_factory=lambda: os.path.expanduser("~/.ssh/known_hosts"))
    remote_command: tuple[str, ...] = DEFAULT_REMOTE_COMMAND

    @classmethod
    def parse(cls, spec: str, **settings: object) -> "Endpoint":
        """Parse ``[USER@]HOST:PATH``; ``settings`` fill the other fields."""
        m = _SPEC.match(spec)
        if not m:
            raise InvalidArgument(what="destination", value=spec,
                                  reason="expected [USER@]HOST:PATH, e.g. root@host2:/var/lib/coldferry/disk.img")
        given = {k: v for k, v in settings.items() if v is not None}
        host = m.group("host").strip("[]")
        ep = cls(host=host, path=m.group("path"), **given)
        if m.group("user"):
            ep = replace(ep, user=m.group("user"))
        ep.validate()
        return ep

    def validate(self) -> None:
        for what, value in (("SSH host", self.host), ("SSH user", self.user)):
            if not value or value.startswith("-"):
                raise InvalidArgument(what=what, value=value, reason="must be non-empty and not start with '-'")
        if not 0 < self.port < 65536:
            raise InvalidArgument(what="SSH port", value=self.port, reason="must be 1-65535")
        if not self.path.startswith("/"):
            raise InvalidArgument(what="destination path", value=self.path,
                                  reason="give an absolute path on the remote host")
        if self.path.endswith("/"):
            raise InvalidArgument(what="destination path", value=self.path,
                                  reason="name the destination file, not a directory")
        if self.identity and not os.path.isfile(self.identity):
            raise InvalidArgument(what="identity file", value=self.identity, reason="no such file")
        if not os.path.isfile(self.known_hosts):
            raise InvalidArgument(what="known_hosts file", value=self.known_hosts,
                                  reason="no such file; host keys must be known in advance")

    def command(self, sub: str) -> tuple[str, ...]:
        """The remote coldferry command for subcommand ``sub`` (``receive``'s sibling)."""
        base = self.remote_command[:-1] if self.remote_command[-1:] == ("receive",) else self.remote_command
        return (*base, sub)

    @property
    def root(self) -> str:
        """The directory the receiver is asked to serve: the destination's parent."""
        return os.path.dirname(self.path) or "/"

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.path}"
