"""The agent's settings: the ``[agent]`` table of a TOML file, plus its driver's tables.

The ``[driver]`` table belongs to DriverConfig (driver/libvirt/config.py) and
``[xenserver]`` to XenServerSettings (driver/xenserver/config.py); this
module only adds where the agent listens, its token, the address other hosts
reach this one at, and which driver to serve. With ``driver = "xenserver"``
the ``[xenserver]`` table says where the (stubbed) host keeps its SR; the SSH
and transfer settings of ``[driver]`` serve its copier too. A relative
``token_file`` is relative to the configuration file's directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from driver.libvirt.config import DriverConfig
from driver.settings import SettingsError, load, one_of, read_toml, setting
from driver.xenserver.config import XenServerSettings

DRIVERS = ("libvirt", "memory", "xenserver")
DEFAULT_PORT = 8797

#: The agent's configuration errors are the settings loader's: one line naming the key and the fix.
ConfigError = SettingsError


@dataclass(frozen=True)
class AgentConfig:
    """Where the agent listens and what it serves.

    ``address`` is the data-plane address other hosts use to reach this one
    over SSH when they copy disks here (the controller hands it to the
    source agent as ``dest``).
    """

    token: str = setting(secret=True, hint="the bearer token every request must present")
    listen: str = setting("0.0.0.0", hint='an address to bind, e.g. "0.0.0.0"', check=bool)
    port: int = setting(DEFAULT_PORT, hint="a TCP port, 1-65535", check=range(1, 65536).__contains__)
    address: str = setting(default_factory=lambda: os.uname().nodename, check=bool,
                           hint="this host's address for other hosts' SSH (data plane)")
    driver: str = setting("libvirt", hint=f"one of: {', '.join(DRIVERS)}", check=one_of(*DRIVERS))
    driver_config: DriverConfig = field(default_factory=DriverConfig)
    xenserver: XenServerSettings = field(default_factory=XenServerSettings)

    @classmethod
    def load(cls, path: str) -> "AgentConfig":
        """Read ``[agent]``, ``[driver]`` and ``[xenserver]`` from a TOML file.

        :raises ConfigError: the file cannot be read or parsed, or a setting is
            unknown, missing or invalid.
        """
        return cls.from_dict(read_toml(path, "agent"), source=path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "configuration") -> "AgentConfig":
        """Build from a parsed TOML document (``{"agent": {...}, "driver": {...}}``); a relative
        ``token_file`` is read from the directory of ``source``.

        :raises ConfigError: as for ``load``.
        """
        driver_config = DriverConfig.from_dict(data.get("driver", {}), source)
        xenserver = XenServerSettings.from_dict(data.get("xenserver", {}), source)
        config = load(cls, data.get("agent", {}), "agent", source, driver_config=driver_config, xenserver=xenserver)
        if config.driver == "xenserver" and not xenserver.sr_path:
            raise ConfigError(problem='[agent] driver = "xenserver" but [xenserver] has no sr_path', source=source,
                              hint='the SR directory of VHD files, e.g. "/var/lib/coldferry/sr"')
        return config
