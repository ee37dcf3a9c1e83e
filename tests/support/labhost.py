"""One lab host: its names, its private directories, and running commands inside it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import libvirt

from tests.support import netns
from tests.support.procs import ProcRef

# The instances path: the same on every host (like Nova's instances_path), private to each.
INSTANCES_PATH = Path("/var/lib/coldferry/instances")

# Mount target inside a host -> its source below the host's private directory.
PRIVATE_DIRS: dict[str, str] = {
    "/run/libvirt": "run/libvirt",
    "/var/lib/libvirt": "lib/libvirt",
    "/etc/libvirt": "etc/libvirt",
    "/var/cache/libvirt": "cache/libvirt",
    "/var/log/libvirt": "log/libvirt",
    str(INSTANCES_PATH): "instances",
}


@dataclass
class Host:
    """One lab host. Its processes run through ``command``/``run``/``popen``."""

    index: int
    name: str
    ip: str
    netns: str
    mntns: Path
    utsns: Path
    dir: Path
    uuid: str
    pids: dict[str, ProcRef] = field(default_factory=dict)

    instances_path: ClassVar[Path] = INSTANCES_PATH

    @property
    def netns_path(self) -> Path:
        return netns.netns_path(self.netns)

    @property
    def libvirt_socket(self) -> Path:
        """The host's libvirtd read-write socket, as seen from the root namespace."""
        return self.dir / "run/libvirt/libvirt-sock"

    @property
    def libvirt_uri(self) -> str:
        """A libvirt URI that reaches this host's libvirtd from the root namespace (and from inside)."""
        return f"qemu+unix:///system?socket={self.libvirt_socket}"

    @property
    def instances_dir(self) -> Path:
        """The host's instances directory as seen from the root namespace."""
        return self.dir / "instances"

    def command(self, argv: Sequence[str], cwd: Path | str | None = None) -> list[str]:
        """``argv`` prefixed so that it runs inside this host (network, mount and UTS namespace).

        cwd: working directory inside the host; without it the command starts in /.
        """
        wd = [f"--wd={cwd}"] if cwd is not None else []
        return ["nsenter", f"--net={self.netns_path}", f"--mount={self.mntns}",
                f"--uts={self.utsns}", *wd, "--", *argv]

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """``subprocess.Popen`` of ``argv`` inside this host, in the caller's working directory
        unless ``cwd`` is given."""
        cwd = kw.pop("cwd", None) or os.getcwd()
        return subprocess.Popen(self.command(argv, cwd=cwd), **kw)

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``argv`` inside this host (same keywords)."""
        cwd = kw.pop("cwd", None) or os.getcwd()
        return subprocess.run(self.command(argv, cwd=cwd), **kw)

    def connect(self) -> libvirt.virConnect:
        """A libvirt connection to this host's libvirtd."""
        return libvirt.open(self.libvirt_uri)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "ip": self.ip, "netns": self.netns,
                "mntns": str(self.mntns), "utsns": str(self.utsns), "dir": str(self.dir),
                "uuid": self.uuid, "pids": {k: v.to_json() for k, v in self.pids.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Host":
        return cls(data["index"], data["name"], data["ip"], data["netns"], Path(data["mntns"]),
                   Path(data["utsns"]), Path(data["dir"]), data["uuid"],
                   {k: ProcRef.from_json(v) for k, v in data.get("pids", {}).items()})
