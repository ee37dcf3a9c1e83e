"""Settings of the controller, read from ``[controller]``, ``[[hosts]]`` and ``[[users]]`` of a TOML file.

The TLS files (the controller's own ``tls_cert``/``tls_key``, ``agent_ca`` and
the client certificate it shows the agents) are checked when the file is
read, with the agent's checks (agent/config.py); whether it may serve plain
HTTP or reach an agent over ``http://`` is checked when it starts
(``ControllerConfig.serving_tls``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

import sqlalchemy.engine
import sqlalchemy.exc

from agent.config import ServerTLS, check_key_pair, check_server_tls, read_certificates, serving_tls, tls_path
from driver.settings import SettingsError, check, load, not_negative, one_of, positive, read_toml, setting
from transfer.endpoint import is_host_address

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
# Settings the host's agent owns now: the controller no longer sends them with a migration.
_MOVED_TO_DRIVER = ("shutdown_timeout", "shutdown_retry_interval")
# The settings that name files, relative to the configuration file's directory.
_TLS_FILES = ("tls_cert", "tls_key", "agent_ca", "agent_client_cert", "agent_client_key")

log = logging.getLogger(__name__)


class ControllerConfigError(SettingsError, ControllerError):
    """The controller's configuration cannot be used: one line naming the key, the file and the fix."""


def _agent_url_ok(url: str) -> bool:
    """Whether ``url`` is a plain http(s) URL of a host."""
    parts = urllib.parse.urlsplit(url.strip())
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        raise ValueError("the port must be a number, 1 to 65535") from None
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query and not parts.fragment


def _address_ok(address: str) -> bool:
    """A host name or an IP address and nothing else: the agents refuse any other ``dest``."""
    return is_host_address(address.strip())


@dataclass(frozen=True)
class HostConfig:
    """One compute host: its name, where its agent answers and its data-plane address."""

    name: str = setting(hint="the host's name as the agent reports it, e.g. compute1 (letters, digits, "
                             "'.', '_' and '-')", check=_HOST_NAME.match)
    agent_url: str = setting(hint="where the host's agent answers, e.g. https://192.0.2.11:8797", check=_agent_url_ok)
    address: str = setting(hint="the address other hosts copy disks to: a host name or an IP address, e.g. 192.0.2.11",
                           check=_address_ok)
    agent_token: str = setting(secret=True, hint="the token of the host's agent")

    def __post_init__(self) -> None:
        object.__setattr__(self, "agent_url", self.agent_url.strip().rstrip("/"))
        object.__setattr__(self, "address", self.address.strip())

    def record(self) -> HostRecord:
        """The host as the store keeps it (enabled; the store keeps an existing status)."""
        return HostRecord(name=self.name, agent_url=self.agent_url, address=self.address)


def _password_hash_ok(text: str) -> bool:
    """Whether ``text`` is a hash controller/web/passwords.py made; ValueError (InvalidHash) says why not."""
    # Imported here: the web package imports the conductor, which imports this module.
    from .web.passwords import parse_hash

    parse_hash(text.strip())
    return True


@dataclass(frozen=True)
class UserConfig:
    """A dashboard user: a name, a password hash (controller/web/passwords.py) and a role in ROLES."""

    name: str = setting(hint="the user's login name, a non-empty string", check=str.strip)
    password_hash: str = setting(repr=False, check=_password_hash_ok,
                                 hint="a hash from: python -m controller.web.password_hash")
    role: str = setting("reader", hint=f"one of {', '.join(ROLES)}", check=one_of(*ROLES))

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.name.strip())
        object.__setattr__(self, "password_hash", self.password_hash.strip())


def _database_ok(url: str) -> bool:
    try:
        sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return False
    return True


@dataclass(frozen=True)
class ControllerConfig:
    """What the controller listens on, where it keeps its records and how it schedules.

    ``token`` is the admin API token clients send as ``Authorization: Bearer``.
    The allocation ratios say how far the scheduler over-commits a host's
    vCPUs, RAM and disk. ``auto_confirm_seconds`` confirms a finished
    migration after that many seconds (0: wait for the user).
    ``users`` may log in to the dashboard; its session cookie is signed with
    ``session_secret`` (a new random one each start when None) and lasts
    ``session_max_age`` seconds. Sessions are kept in the controller's
    memory, so a restart logs everyone out whatever the secret.
    How long a guest gets to shut down is each host's setting (the
    ``[driver]`` table of its agent), not the controller's.
    An agent call that cannot reach its agent is retried for
    ``agent_retry_seconds``; a host out of reach for ``agent_lost_seconds``
    during a migration step puts the migration in needs-recovery, which the
    controller re-examines every ``recovery_interval`` seconds (docs/safety.md).
    The API and the dashboard are served over TLS with ``tls_cert`` and
    ``tls_key`` (plain HTTP only with ``plain_http``); the agents' certificates
    are checked against ``agent_ca`` (default: the system's trust store), and
    the controller shows them ``agent_client_cert`` when they ask for one.
    """

    token: str = setting(secret=True, hint="the admin API token clients send as a Bearer token")
    listen: str = setting("127.0.0.1", hint="an address to listen on, e.g. 127.0.0.1 or 0.0.0.0", check=bool)
    port: int = setting(8798, hint="a TCP port, 1 to 65535", check=range(1, 65536).__contains__)
    database: str = setting("sqlite:////var/lib/coldferry/controller.db", check=_database_ok,
                            hint="an SQLAlchemy URL such as sqlite:////var/lib/coldferry/controller.db "
                                 "or postgresql://coldferry@db.example/coldferry")
    auto_confirm_seconds: int = setting(0, check=not_negative, hint="seconds before a finished migration is "
                                                                    "confirmed on its own, 0 to wait for the user")
    cpu_allocation_ratio: float = setting(16.0, hint="a number above 0, e.g. 16.0", check=positive)
    ram_allocation_ratio: float = setting(1.5, hint="a number above 0, e.g. 1.5", check=positive)
    disk_allocation_ratio: float = setting(1.0, hint="a number above 0, e.g. 1.0", check=positive)
    agent_timeout: float = setting(10.0, hint="seconds above 0 to wait for an agent's answer", check=positive)
    poll_interval: float = setting(1.0, hint="seconds above 0 between polls of an agent's job", check=positive)
    agent_retry_seconds: float = setting(15.0, check=not_negative,
                                         hint="seconds (0 or more) one agent call is retried, with backoff, "
                                              "while the agent cannot be reached, e.g. 15")
    agent_lost_seconds: float = setting(300.0, check=positive,
                                        hint="seconds above 0 a host may stay out of reach during a migration "
                                             "step before the migration goes to needs-recovery, e.g. 300")
    recovery_interval: float = setting(30.0, check=positive,
                                       hint="seconds above 0 between passes over migrations in needs-recovery, "
                                            "e.g. 30")
    lease_seconds: float = setting(60.0, check=positive,
                                   hint="seconds above 0 a controller's claim on a migration or a drain holds "
                                        "without renewal; another controller takes over after that, e.g. 60")
    hosts: tuple[HostConfig, ...] = ()
    users: tuple[UserConfig, ...] = ()
    session_secret: str | None = setting(None, secret=True, hint="signs the dashboard's session cookie")
    session_max_age: int = setting(12 * 3600, check=positive,
                                   hint="seconds above 0 a dashboard login lasts, e.g. 43200 (12 hours)")
    tls_cert: str | None = setting(None, hint="the controller's certificate for its API and dashboard, a PEM "
                                              "file (its chain may follow it), e.g. /etc/coldferry/tls/controller.pem")
    tls_key: str | None = setting(None, hint="the certificate's private key, an unencrypted PEM file, "
                                             "e.g. /etc/coldferry/tls/controller-key.pem")
    plain_http: bool = setting(False, hint="true serves plain HTTP and allows http:// agent URLs, the tokens "
                                           "crossing the network in the clear")
    agent_ca: str | None = setting(None, hint="the CA certificate (PEM) the agents' certificates must be signed "
                                              "by; default the system's trust store")
    agent_client_cert: str | None = setting(None, hint="the certificate (PEM) the controller shows agents that "
                                                       "set tls_client_ca, e.g. /etc/coldferry/tls/controller-client.pem")
    agent_client_key: str | None = setting(None, hint="that certificate's private key, an unencrypted PEM file")

    def __post_init__(self) -> None:
        check(self, "controller", error=ControllerConfigError)

    @property
    def tls(self) -> ServerTLS | None:
        """The TLS the API and the dashboard are served with, None without tls_cert."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return ServerTLS(self.tls_cert, self.tls_key)

    @property
    def agent_client_pair(self) -> tuple[str, str] | None:
        """The client certificate and key the controller shows agents, or None."""
        if self.agent_client_cert is None or self.agent_client_key is None:
            return None
        return self.agent_client_cert, self.agent_client_key

    def serving_tls(self, source: str) -> ServerTLS | None:
        """``tls``, checked when the controller starts: plain HTTP (None) and ``http://`` agent URLs
        only with ``plain_http = true``, with a warning.

        :raises ControllerConfigError: neither TLS nor plain_http; an http:// agent_url without plain_http.
        """
        tls = serving_tls("[controller]", self.tls, self.plain_http, source, ControllerConfigError)
        plain = [h.name for h in self.hosts if urllib.parse.urlsplit(h.agent_url).scheme == "http"]
        if plain and not self.plain_http:
            raise ControllerConfigError(problem=f"[[hosts]] {', '.join(plain)}: agent_url is http://", source=source,
                                        hint="use https:// (the agent's tls_cert, checked against agent_ca), or "
                                             "plain_http = true to send the agents' token in the clear")
        if plain:
            log.warning("the agents of %s are reached over plain HTTP: their token crosses the network in the "
                        "clear", ", ".join(plain))
        return tls

    def host(self, name: str) -> HostConfig | None:
        """The configured host called ``name``, or None."""
        return next((h for h in self.hosts if h.name == name), None)

    @classmethod
    def load(cls, path: str) -> "ControllerConfig":
        """Read a TOML file; relative token files are relative to its directory.

        :raises ControllerConfigError: naming the key and the fix.
        """
        data = read_toml(path, "controller", error=ControllerConfigError)
        return cls.from_dict(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "configuration",
                  base_dir: str | None = None) -> "ControllerConfig":
        """Build from parsed TOML. ``source`` names the file in errors; relative token
        files are read from ``base_dir`` (the current directory when None).

        :raises ControllerConfigError: unknown or missing keys, bad types or values,
            duplicate host names, bad URLs, and the settings that moved to the agents.
        """
        unknown = sorted(set(data) - {"controller", "hosts", "users"} - _SIBLING_TABLES)
        if unknown:
            raise ControllerConfigError(problem=f"unknown table(s) {', '.join(unknown)}", source=source,
                                        hint="the controller reads [controller], [[hosts]] and [[users]]")
        table = data.get("controller", {})
        moved = [key for key in _MOVED_TO_DRIVER if isinstance(table, dict) and key in table]
        if moved:
            raise ControllerConfigError(problem=f"[controller] sets {' and '.join(moved)}", source=source,
                                        hint="these moved to the [driver] table of each host's agent "
                                             "configuration (agent.toml); remove them here")
        config = load(cls, table, "controller", source, base_dir=base_dir or os.getcwd(), error=ControllerConfigError,
                      hosts=_hosts(data.get("hosts", []), source, base_dir),
                      users=_users(data.get("users", []), source))
        config = dataclasses.replace(config, **{key: tls_path(getattr(config, key), base_dir or os.getcwd())
                                                for key in _TLS_FILES})
        _check_tls_files(config, source)
        if config.session_secret is not None and len(config.session_secret) < _MIN_SECRET:
            raise ControllerConfigError(problem="[controller] session_secret is too short", source=source,
                                        hint=f"it must be at least {_MIN_SECRET} characters; make one with: "
                                             "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
        return config


def _check_tls_files(config: ControllerConfig, source: str) -> None:
    """The controller's TLS files, each readable and what its setting says it is."""
    error = ControllerConfigError
    check_server_tls("[controller]", config.tls_cert, config.tls_key, config.plain_http, source, error)
    if config.agent_ca is not None:
        read_certificates("[controller]", "agent_ca", config.agent_ca, source, error)
    check_key_pair("[controller]", "agent_client_cert", "agent_client_key", config.agent_client_cert,
                   config.agent_client_key, source, error)


def _array(entries: Any, table: str, what: str, source: str) -> list[tuple[dict[str, Any], str]]:
    """Each table of the ``[[table]]`` array with the words naming it in errors."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ControllerConfigError(problem=f"{table} must be an array of tables", source=source,
                                    hint=f"write [[{table}]] above each {what}'s keys")
    return [(entry, f"[[{table}]] entry {i}" + (f" ({entry['name']!r})" if "name" in entry else ""))
            for i, entry in enumerate(entries, 1)]


def _unique(items: list[Any], new: Any, where: str, what: str, source: str) -> None:
    """Refuse ``new`` if an item of ``items`` has its name."""
    if any(item.name == new.name for item in items):
        raise ControllerConfigError(problem=f"{where} has a duplicate {what} name {new.name!r}", source=source,
                                    hint=f"each {what} must have its own name")


def _hosts(entries: Any, source: str, base_dir: str | None) -> tuple[HostConfig, ...]:
    """The ``[[hosts]]`` array of tables, checked entry by entry."""
    hosts: list[HostConfig] = []
    for entry, where in _array(entries, "hosts", "host", source):
        host = load(HostConfig, entry, "hosts", source, base_dir=base_dir or os.getcwd(), label=where,
                    error=ControllerConfigError)
        _unique(hosts, host, where, "host", source)
        hosts.append(host)
    return tuple(hosts)


def _users(entries: Any, source: str) -> tuple[UserConfig, ...]:
    """The ``[[users]]`` array of tables: dashboard logins, checked entry by entry."""
    users: list[UserConfig] = []
    for entry, where in _array(entries, "users", "user", source):
        user = load(UserConfig, entry, "users", source, label=where, error=ControllerConfigError)
        _unique(users, user, where, "user", source)
        users.append(user)
    return tuple(users)
