"""The agent's settings: the ``[agent]`` table of a TOML file, plus the ``[driver]`` table.

The ``[driver]`` table belongs to DriverConfig and is read by it; this
module only adds where the agent listens, its token, the address other
hosts reach this one at, and which driver to serve. With ``driver =
"xenserver"`` a ``[xenserver]`` table says where the (stubbed) host keeps
its SR; the SSH and transfer settings of ``[driver]`` serve its copier too.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from driver.errors import DriverError
from driver.libvirt.config import DriverConfig

DRIVERS = ("libvirt", "memory", "xenserver")
DEFAULT_PORT = 8797

# key -> (accepted types, what to write); token and token_file are resolved into one token
_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "listen": ((str,), "an address to bind, e.g. \"0.0.0.0\""),
    "port": ((int,), "a TCP port, 1-65535"),
    "token": ((str,), "the bearer token, a non-empty string"),
    "token_file": ((str,), "the path of a file holding the bearer token"),
    "address": ((str,), "this host's address for other hosts' SSH (data plane)"),
    "driver": ((str,), f"one of: {', '.join(DRIVERS)}"),
}


class ConfigError(Exception):
    """The agent's configuration cannot be used; the message names the setting and the fix."""


@dataclass(frozen=True)
class XenServerSettings:
    """The ``[xenserver]`` table: the stubbed XenServer host this agent serves (driver/xenserver).

    ``sr_path`` is the SR directory of VHD files, the same path on every host
    (the copier sends into it); ``state_path`` the stub's JSON record file
    (default ``<sr_path>/.xapi-stub.json``); ``coalesce_timeout`` bounds the
    wait for the SR to merge a leaf back after a failure or a revert.
    """

    sr_path: str = ""
    state_path: str | None = None
    coalesce_timeout: float = 60.0

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "XenServerSettings":
        if not isinstance(data, dict):
            raise ConfigError(f"[xenserver] in {source} must be a table")
        hints = {"sr_path": ((str,), "an absolute directory path"),
                 "state_path": ((str,), "an absolute file path"),
                 "coalesce_timeout": ((int, float), "seconds, more than 0")}
        unknown = sorted(set(data) - set(hints))
        if unknown:
            raise ConfigError(f"unknown xenserver settings in {source}: {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(hints))})")
        for key, value in data.items():
            types, hint = hints[key]
            ok = not isinstance(value, bool) and isinstance(value, types)
            ok = ok and (value > 0 if key == "coalesce_timeout" else os.path.isabs(value))
            if not ok:
                raise ConfigError(f"bad xenserver setting {key} = {value!r} in {source}: expected {hint}")
        return cls(**data)


@dataclass(frozen=True)
class AgentConfig:
    """Where the agent listens and what it serves.

    ``address`` is the data-plane address other hosts use to reach this one
    over SSH when they copy disks here (the controller hands it to the
    source agent as ``dest``).
    """

    token: str = field(repr=False)
    listen: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    address: str = field(default_factory=lambda: os.uname().nodename)
    driver: str = "libvirt"
    driver_config: DriverConfig = field(default_factory=DriverConfig)
    xenserver: XenServerSettings = field(default_factory=XenServerSettings)

    @classmethod
    def load(cls, path: str) -> "AgentConfig":
        """Read ``[agent]`` and ``[driver]`` from a TOML file.

        :raises ConfigError: the file cannot be read or parsed, or a setting is
            unknown, missing or invalid.
        """
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read agent configuration {path}: {e}") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "configuration") -> "AgentConfig":
        """Build from a parsed TOML document (``{"agent": {...}, "driver": {...}}``).

        :raises ConfigError: as for ``load``.
        """
        agent = data.get("agent", {})
        if not isinstance(agent, dict):
            raise ConfigError(f"[agent] in {source} must be a table")
        _check_keys(agent, source)
        try:
            driver_config = DriverConfig.from_dict(data.get("driver", {}), source=source)
        except (DriverError, TypeError) as e:
            raise ConfigError(str(e)) from None
        settings = {k: v for k, v in agent.items() if k not in ("token", "token_file")}
        xenserver = XenServerSettings.from_dict(data.get("xenserver", {}), source)
        config = cls(token=_token(agent, source), driver_config=driver_config, xenserver=xenserver, **settings)
        _check_values(config, source)
        if config.driver == "xenserver" and not xenserver.sr_path:
            raise ConfigError(f"{source}: driver = \"xenserver\" needs sr_path in [xenserver] "
                              "(the SR directory of VHD files, e.g. \"/var/lib/coldferry/sr\")")
        return config


def _check_keys(agent: dict[str, Any], source: str) -> None:
    unknown = sorted(set(agent) - set(_KEYS))
    if unknown:
        raise ConfigError(f"unknown agent settings in {source}: {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(_KEYS))})")
    for key, value in agent.items():
        types, hint = _KEYS[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ConfigError(f"bad agent setting {key} = {value!r} in {source}: expected {hint}")


def _token(agent: dict[str, Any], source: str) -> str:
    """The bearer token, given inline or read from ``token_file`` (exactly one of them)."""
    if "token" in agent and "token_file" in agent:
        raise ConfigError(f"{source}: set either token or token_file in [agent], not both")
    if "token_file" in agent:
        path = agent["token_file"]
        try:
            with open(path) as f:
                token = f.read().strip()
        except OSError as e:
            raise ConfigError(f"cannot read token_file {path} (from {source}): {e}") from None
        if not token:
            raise ConfigError(f"token_file {path} (from {source}) is empty; put the agent's token in it")
        return token
    token = agent.get("token", "").strip()
    if not token:
        raise ConfigError(f"{source}: the agent needs a token: set token = \"...\" or token_file = \"/path\" "
                          "in [agent] (every request must present it as a bearer token)")
    return token


def _check_values(config: AgentConfig, source: str) -> None:
    checks = [
        (1 <= config.port <= 65535, "port", config.port, _KEYS["port"][1]),
        (config.driver in DRIVERS, "driver", config.driver, _KEYS["driver"][1]),
        (bool(config.listen), "listen", config.listen, _KEYS["listen"][1]),
        (bool(config.address), "address", config.address, _KEYS["address"][1]),
    ]
    for ok, key, value, hint in checks:
        if not ok:
            raise ConfigError(f"bad agent setting {key} = {value!r} in {source}: expected {hint}")
