"""Settings of the libvirt driver, read from the ``[driver]`` table of a TOML file."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..errors import DriverError


@dataclass(frozen=True)
class DriverConfig:
    """How this host's driver reaches libvirt, stores instances and copies disks.

    ``instances_path`` is the same on every host (as in Nova); an instance
    lives in ``<instances_path>/<uuid>/`` and backing files in the image
    cache ``<instances_path>/_base/``. ``backing`` says what happens to a
    qcow2 overlay's backing file the target lacks: ``send`` copies it into
    the target's image cache once, ``flatten`` merges the chain into one
    standalone image before the copy.

    ``live_migration_uri`` is the destination libvirtd's URI for live
    migration, a template with ``{dest}`` (the destination's address),
    ``{user}`` and ``{port}`` (``ssh_user``, ``ssh_port``). For the libssh
    and libssh2 transports the driver adds ``known_hosts`` (``ssh_known_hosts``,
    verified strictly) and ``keyfile`` (``ssh_identity``) unless the template
    sets them; the default is libssh because OpenSSH's transport cannot be
    pointed at a known_hosts file. Templates that switch host key checking
    off are refused.
    """

    libvirt_uri: str = "qemu:///system"
    instances_path: str = "/var/lib/coldferry/instances"
    host_name: str = field(default_factory=lambda: os.uname().nodename)
    transfer_method: str = "stream"          # stream | rsync
    transfer_streams: int = 2
    transfer_channel: str = "direct"          # direct | tls | ssh
    transfer_compress: str = "off"
    transfer_retries: int = 3
    transfer_fsync: bool = True
    transfer_bwlimit: int = 0                 # bytes/s over all streams; 0 = no limit
    backing: str = "send"                     # send | flatten
    ssh_user: str = "root"
    ssh_port: int = 22
    ssh_identity: str | None = None
    ssh_known_hosts: str = "/root/.ssh/known_hosts"
    remote_command: tuple[str, ...] = ("coldferry", "receive")
    create_bridges: bool = False
    start_timeout: float = 60.0
    shutdown_timeout: int = 60
    shutdown_retry_interval: int = 10
    live_migration_uri: str = "qemu+libssh://{user}@{dest}:{port}/system"
    precopy: bool = True
    precopy_threshold: int = 512 << 20       # bytes of allocated disk data; 0 = always
    precopy_job_timeout: float = 600.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not _type_ok(value, f.type):
                raise DriverError(reason=f"bad driver setting {f.name} = {value!r}: expected {f.type}")
        checks = [
            (self.transfer_method in ("stream", "rsync"), "transfer_method", "use stream or rsync"),
            (self.transfer_channel in ("direct", "tls", "ssh"), "transfer_channel", "use direct, tls or ssh"),
            (self.backing in ("send", "flatten"), "backing", "use send or flatten"),
            (os.path.isabs(self.instances_path), "instances_path", "must be an absolute path"),
            (self.transfer_bwlimit >= 0, "transfer_bwlimit", "bytes per second, 0 for no limit"),
            (self.precopy_threshold >= 0, "precopy_threshold", "bytes of disk data, 0 to pre-copy every disk"),
            (self.precopy_job_timeout > 0, "precopy_job_timeout", "seconds, more than 0"),
            (_uri_template_ok(self.live_migration_uri), "live_migration_uri",
             "a libvirt URI template with {dest} (and optionally {user}, {port}) that keeps host key checking on"),
        ]
        for ok, name, hint in checks:
            if not ok:
                raise DriverError(reason=f"bad driver setting {name} = {getattr(self, name)!r}: {hint}")

    @classmethod
    def load(cls, path: str) -> "DriverConfig":
        """Read ``[driver]`` from a TOML file; unknown keys are an error, not ignored."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise DriverError(reason=f"cannot read driver configuration {path}: {e}") from None
        return cls.from_dict(data.get("driver", {}), source=path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "configuration") -> "DriverConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DriverError(reason=f"unknown driver settings in {source}: {', '.join(unknown)} "
                                     f"(known: {', '.join(sorted(known))})")
        if "remote_command" in data:
            data = {**data, "remote_command": tuple(data["remote_command"])}
        return cls(**data)


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
    "str | None": (str, type(None)), "tuple[str, ...]": (tuple,),
}


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


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits a field's annotation (a bool is not a number here)."""
    allowed = _TYPES.get(str(annotation), (object,))
    if isinstance(value, bool) and bool not in allowed:
        return False
    if isinstance(value, tuple) and tuple in allowed:
        return all(isinstance(v, str) for v in value)
    return isinstance(value, allowed)
