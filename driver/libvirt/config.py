"""Settings of the libvirt driver, read from the ``[driver]`` table of a TOML file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from transfer.errors import InvalidArgument
from transfer.options import CopyOptions

from ..settings import SettingsError, check, load, not_negative, one_of, positive, read_toml, setting

def _uri_template_ok(template: str) -> bool:
    """Whether ``template`` names the destination and leaves SSH host key checking on."""
    if "{dest}" not in template:
        return False
    try:
        uri = template.format(dest="host", user="root", port=22)
    except (KeyError, IndexError, ValueError):
        return False
    query = dict(parse_qsl(urlsplit(uri).query))
    # Either setting would let an unknown or changed host key through (or add it).
    return query.get("no_verify", "0") in ("", "0") and query.get("known_hosts_verify", "normal") == "normal"


@dataclass(frozen=True)
class DriverConfig:
    """How this host's driver reaches libvirt, stores instances and copies disks.

    ``instances_path`` is the same on every host (as in Nova); an instance
    lives in ``<instances_path>/<uuid>/`` and backing files in the image
    cache ``<instances_path>/_base/``. ``backing`` says what happens to a
    qcow2 overlay's backing file the target lacks: ``send`` copies it into
    the target's image cache once, ``flatten`` merges the chain into one
    standalone image before the copy.

    The ``transfer_*`` settings are those of transfer.options.CopyOptions
    (``transfer_streams`` is its ``streams``), checked by it when the
    configuration is built; ``copy_options`` holds the result.
    ``shutdown_timeout`` and ``shutdown_retry_interval`` bound a clean guest
    shutdown when a request (the agent's, or ``coldferry driver``'s) names
    none.

    ``live_migration_uri`` is the destination libvirtd's URI for live
    migration, a template with ``{dest}`` (the destination's address),
    ``{user}`` and ``{port}`` (``ssh_user``, ``ssh_port``). For the libssh
    and libssh2 transports the driver adds ``known_hosts`` (``ssh_known_hosts``,
    verified strictly) and ``keyfile`` (``ssh_identity``) unless the template
    sets them; the default is libssh because OpenSSH's transport cannot be
    pointed at a known_hosts file. Templates that switch host key checking
    off are refused.
    """

    libvirt_uri: str = setting("qemu:///system", hint="a libvirt URI, e.g. qemu:///system")
    instances_path: str = setting("/var/lib/coldferry/instances", hint="an absolute path", check=os.path.isabs)
    host_name: str = setting(default_factory=lambda: os.uname().nodename, hint="this host's name")
    transfer_method: str = setting("stream", hint="stream or rsync")
    transfer_streams: int = setting(2, hint="parallel data streams, 1 to 16")
    transfer_channel: str = setting("direct", hint="direct, tls or ssh")
    transfer_compress: str = setting("off", hint="off, fast or auto")
    transfer_retries: int = setting(3, hint="reconnect attempts, 0 or more")
    transfer_fsync: bool = setting(True, hint="whether the receiver flushes each disk before it reports success")
    transfer_bwlimit: int = setting(0, hint="bytes/s over all streams, 0 for no limit")
    backing: str = setting("send", hint="use send or flatten", check=one_of("send", "flatten"))
    ssh_user: str = setting("root", hint="the user to log in as on other hosts")
    ssh_port: int = setting(22, hint="the SSH port of other hosts")
    ssh_identity: str | None = setting(None, hint="the path of the SSH private key")
    ssh_known_hosts: str = setting("/root/.ssh/known_hosts", hint="the path of the known_hosts file")
    remote_command: tuple[str, ...] = setting(("coldferry", "receive"),
                                              hint='the receiver\'s command line, e.g. ["coldferry", "receive"]')
    create_bridges: bool = setting(False, hint="whether a missing bridge is created")
    start_timeout: float = setting(60.0, hint="seconds to wait for a started guest to run")
    shutdown_timeout: int = setting(60, hint="seconds above 0 for a clean guest shutdown", check=positive)
    shutdown_retry_interval: int = setting(10, hint="seconds above 0 between shutdown requests", check=positive)
    live_migration_uri: str = setting(
        "qemu+libssh://{user}@{dest}:{port}/system", check=_uri_template_ok,
        hint="a libvirt URI template with {dest} (and optionally {user}, {port}) that keeps host key checking on")
    precopy: bool = setting(True, hint="whether a running guest's disks are copied before it stops")
    precopy_threshold: int = setting(512 << 20, hint="bytes of disk data, 0 to pre-copy every disk",
                                     check=not_negative)
    precopy_job_timeout: float = setting(600.0, hint="seconds, more than 0", check=positive)
    copy_options: CopyOptions = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check(self, "driver")
        try:
            options = CopyOptions.from_settings(vars(self), prefix="transfer_")
        except InvalidArgument as e:
            raise SettingsError(problem=f"bad [driver] {e.what} = {e.value!r}", source=f"{type(self).__name__}()",
                                hint=e.reason) from None
        object.__setattr__(self, "copy_options", options)

    @classmethod
    def load(cls, path: str) -> "DriverConfig":
        """Read ``[driver]`` from a TOML file; unknown keys are an error, not ignored.

        :raises SettingsError: the file cannot be read, or a setting is unknown or bad.
        """
        return cls.from_dict(read_toml(path, "driver").get("driver", {}), source=path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "configuration") -> "DriverConfig":
        """Build from the ``[driver]`` table; ``source`` names the file in errors.

        :raises SettingsError: a setting is unknown or bad.
        """
        return load(cls, data, "driver", source)
