"""Settings of the controller, read from ``[controller]``, ``[[hosts]]`` and ``[[users]]`` of a TOML file."""

from __future__ import annotations

import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import sqlalchemy.engine
import sqlalchemy.exc

from .errors import ControllerError
from .records import HostRecord

# Tables of the agent's own settings: one file may configure both on a host that runs both.
_SIBLING_TABLES = frozenset({"agent", "driver"})
# Host names appear in API paths and records; keep them to what a hostname may hold.
_HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Dashboard roles: an admin acts, a reader only looks.
ROLES = ("admin", "reader")
# A shorter session secret would make the signed cookie guessable.
_MIN_SECRET = 16


class ControllerConfigError(ControllerError):
    msg = "controller configuration {source}: {reason}"


@dataclass(frozen=True)
class HostConfig:
    """One compute host: its name, where its agent answers and its data-plane address."""

    name: str
    agent_url: str
    address: str
    agent_token: str = field(repr=False)

    def record(self) -> HostRecord:
        """The host as the store keeps it (enabled; the store keeps an existing status)."""
        return HostRecord(name=self.name, agent_url=self.agent_url, address=self.address)


@dataclass(frozen=True)
class UserConfig:
    """A dashboard user: a name, a password hash (controller/web/passwords.py) and a role in ROLES."""

    name: str
    password_hash: str = field(repr=False)
    role: str = "reader"


@dataclass(frozen=True)
class ControllerConfig:
    """What the controller listens on, where it keeps its records and how it schedules.

    ``token`` is the admin API token clients send as ``Authorization: Bearer``.
    The allocation ratios say how far the scheduler over-commits a host's
    vCPUs, RAM and disk. ``auto_confirm_seconds`` confirms a finished
    migration after that many seconds (0: wait for the user).
    ``users`` may log in to the dashboard; its session cookie is signed with
    ``session_secret`` (a new random one each start when None, which logs
    everyone out on restart) and lasts ``session_max_age`` seconds.
    """

    token: str = field(repr=False)
    listen: str = "127.0.0.1"
    port: int = 8798
    database: str = "sqlite:////var/lib/coldferry/controller.db"
    auto_confirm_seconds: int = 0
    cpu_allocation_ratio: float = 16.0
    ram_allocation_ratio: float = 1.5
    disk_allocation_ratio: float = 1.0
    agent_timeout: float = 10.0
    poll_interval: float = 1.0
    shutdown_timeout: int = 60
    shutdown_retry_interval: int = 10
    hosts: tuple[HostConfig, ...] = ()
    users: tuple[UserConfig, ...] = ()
    session_secret: str | None = field(default=None, repr=False)
    session_max_age: int = 12 * 3600

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name in _CHECKS:
                # Frozen: coerce an int ratio or timeout to float in place.
                object.__setattr__(self, f.name, _checked(f.name, getattr(self, f.name), "ControllerConfig()"))

    def host(self, name: str) -> HostConfig | None:
        """The configured host called ``name``, or None."""
        return next((h for h in self.hosts if h.name == name), None)

    @classmethod
    def load(cls, path: str) -> "ControllerConfig":
        """Read a TOML file. Raises ControllerConfigError naming the key and the fix."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ControllerConfigError(source=path, reason=f"cannot read it: {e}") from None
        return cls.from_dict(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "configuration",
                  base_dir: str | None = None) -> "ControllerConfig":
        """Build from parsed TOML. ``source`` names the file in errors; relative token
        files are read from ``base_dir`` (the current directory when None).

        Raises ControllerConfigError for unknown or missing keys, bad types or
        values, duplicate host names and bad URLs.
        """
        def fail(reason: str) -> ControllerConfigError:
            return ControllerConfigError(source=source, reason=reason)

        unknown = sorted(set(data) - {"controller", "hosts", "users"} - _SIBLING_TABLES)
        if unknown:
            raise fail(f"unknown table(s) {', '.join(unknown)}: the controller reads [controller], "
                       f"[[hosts]] and [[users]]")
        table = data.get("controller", {})
        if not isinstance(table, dict):
            raise fail("controller must be a table: write [controller] above its settings")
        known = set(_CHECKS) | {"token", "token_file", "session_secret", "session_secret_file"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise fail(f"unknown key(s) in [controller]: {', '.join(unknown)} "
                       f"(known: {', '.join(sorted(known))})")
        settings = {k: _checked(k, v, source) for k, v in table.items() if k in _CHECKS}
        token = _secret(table, "token", "[controller]", source, base_dir)
        session_secret = None
        if "session_secret" in table or "session_secret_file" in table:
            session_secret = _secret(table, "session_secret", "[controller]", source, base_dir)
            if len(session_secret) < _MIN_SECRET:
                raise fail(f"[controller] session_secret must be at least {_MIN_SECRET} characters; make one "
                           f"with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
        return cls(token=token, **settings, hosts=_hosts(data.get("hosts", []), source, base_dir),
                   users=_users(data.get("users", []), source), session_secret=session_secret)


def _positive(v: float) -> bool:
    return v > 0


def _database_ok(url: str) -> bool:
    try:
        sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return False
    return True


# key -> (type, check, what a good value looks like)
_CHECKS: dict[str, tuple[type, Any, str]] = {
    "listen": (str, bool, "an address to listen on, e.g. 127.0.0.1 or 0.0.0.0"),
    "port": (int, lambda v: 0 < v < 65536, "a TCP port, 1 to 65535"),
    "database": (str, _database_ok, "an SQLAlchemy URL such as sqlite:////var/lib/coldferry/controller.db "
                                    "or postgresql://coldferry@db.example/coldferry"),
    "auto_confirm_seconds": (int, lambda v: v >= 0, "seconds before a finished migration is confirmed "
                                                    "on its own, 0 to wait for the user"),
    "cpu_allocation_ratio": (float, _positive, "a number above 0, e.g. 16.0"),
    "ram_allocation_ratio": (float, _positive, "a number above 0, e.g. 1.5"),
    "disk_allocation_ratio": (float, _positive, "a number above 0, e.g. 1.0"),
    "agent_timeout": (float, _positive, "seconds above 0 to wait for an agent's answer"),
    "poll_interval": (float, _positive, "seconds above 0 between polls of an agent's job"),
    "shutdown_timeout": (int, _positive, "seconds above 0 for a clean guest shutdown"),
    "shutdown_retry_interval": (int, _positive, "seconds above 0 between shutdown requests"),
    "session_max_age": (int, _positive, "seconds above 0 a dashboard login lasts, e.g. 43200 (12 hours)"),
}


def _checked(key: str, value: Any, source: str) -> Any:
    """``value`` of setting ``key`` as its type (an int is a fine float, a bool is never a
    number), if it passes the setting's check; else ControllerConfigError with the hint."""
    expected, ok, hint = _CHECKS[key]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or isinstance(value, bool) or not ok(value):
        raise ControllerConfigError(source=source, reason=f"bad [controller] {key} = {value!r}: "
                                                          f"expected {expected.__name__}, {hint}")
    return value


def _secret(table: dict[str, Any], key: str, where: str, source: str, base_dir: str | None) -> str:
    """The value of ``key`` or the stripped content of ``key``_file; exactly one must be set."""
    file_key = f"{key}_file"
    if (key in table) == (file_key in table):
        which = f"both {key} and" if key in table else f"neither {key} nor"
        raise ControllerConfigError(source=source, reason=f"{where} has {which} {file_key}: set exactly one")
    if key in table:
        value = table[key]
        if not isinstance(value, str) or not value.strip():
            raise ControllerConfigError(source=source, reason=f"{where} {key} must be a non-empty string")
        return value.strip()
    path = table[file_key]
    if not isinstance(path, str) or not path:
        raise ControllerConfigError(source=source, reason=f"{where} {file_key} must be a file path")
    path = os.path.join(base_dir or os.getcwd(), path)
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as e:
        raise ControllerConfigError(source=source, reason=f"{where} {file_key}: cannot read {path}: "
                                                          f"{e.strerror}") from None
    if not value:
        raise ControllerConfigError(source=source, reason=f"{where} {file_key}: {path} is empty; "
                                                          f"write the token into it")
    return value


_HOST_KEYS = ("name", "agent_url", "address", "agent_token", "agent_token_file")


def _entries(entries: Any, table: str, what: str, keys: tuple[str, ...],
             source: str) -> Iterator[tuple[dict[str, Any], str, Callable[[str], ControllerConfigError]]]:
    """Each table of the ``[[table]]`` array, with the words naming it in errors and a ``fail``
    that makes such an error; an entry with unknown keys is refused."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ControllerConfigError(source=source, reason=f"{table} must be an array of tables: write "
                                                          f"[[{table}]] above each {what}'s keys")
    for i, entry in enumerate(entries, 1):
        where = f"[[{table}]] entry {i}" + (f" ({entry['name']!r})" if "name" in entry else "")

        def fail(reason: str, where: str = where) -> ControllerConfigError:
            return ControllerConfigError(source=source, reason=f"{where}: {reason}")

        unknown = sorted(set(entry) - set(keys))
        if unknown:
            raise fail(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(keys)})")
        yield entry, where, fail


def _hosts(entries: Any, source: str, base_dir: str | None) -> tuple[HostConfig, ...]:
    """The ``[[hosts]]`` array of tables, checked entry by entry."""
    hosts: list[HostConfig] = []
    for entry, where, fail in _entries(entries, "hosts", "host", _HOST_KEYS, source):
        for key in ("name", "agent_url", "address"):
            if key not in entry:
                raise fail(f"missing {key}: {_HOST_HINTS[key]}")
            if not isinstance(entry[key], str) or not entry[key].strip():
                raise fail(f"{key} must be a non-empty string: {_HOST_HINTS[key]}")
        name, address = entry["name"], entry["address"].strip()
        if not _HOST_NAME.match(name):
            raise fail(f"bad name {name!r}: use letters, digits, '.', '_' and '-'")
        if any(h.name == name for h in hosts):
            raise fail(f"duplicate host name {name!r}: each host must have its own name")
        if any(c.isspace() for c in address):
            raise fail(f"bad address {address!r}: {_HOST_HINTS['address']}")
        hosts.append(HostConfig(name=name, agent_url=_agent_url(entry["agent_url"], fail), address=address,
                                agent_token=_secret(entry, "agent_token", where, source, base_dir)))
    return tuple(hosts)


_HOST_HINTS = {
    "name": "the host's name as the agent reports it, e.g. compute1",
    "agent_url": "where the host's agent answers, e.g. http://192.0.2.11:8797",
    "address": "the address other hosts copy disks to, e.g. 192.0.2.11",
}


def _agent_url(url: str, fail: Callable[[str], ControllerConfigError]) -> str:
    """``url`` without a trailing slash, if it is a plain http(s) URL of a host."""
    parts = urllib.parse.urlsplit(url.strip())
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        raise fail(f"bad agent_url {url!r}: the port must be a number, 1 to 65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise fail(f"bad agent_url {url!r}: {_HOST_HINTS['agent_url']}")
    return url.strip().rstrip("/")


_USER_KEYS = ("name", "password_hash", "role")


def _users(entries: Any, source: str) -> tuple[UserConfig, ...]:
    """The ``[[users]]`` array of tables: dashboard logins, checked entry by entry."""
    # Imported here: the web package imports the conductor, which imports this module.
    from .web.passwords import InvalidHash, parse_hash

    users: list[UserConfig] = []
    for entry, _, fail in _entries(entries, "users", "user", _USER_KEYS, source):
        for key in ("name", "password_hash"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise fail(f"{key} must be a non-empty string")
        name, role = entry["name"].strip(), entry.get("role", "reader")
        if any(u.name == name for u in users):
            raise fail(f"duplicate user name {name!r}")
        if role not in ROLES:
            raise fail(f"bad role {role!r}: one of {', '.join(ROLES)}")
        try:
            parse_hash(entry["password_hash"].strip())
        except InvalidHash as e:
            raise fail(f"password_hash: {e}") from None
        users.append(UserConfig(name=name, password_hash=entry["password_hash"].strip(), role=role))
    return tuple(users)
