"""The objects the driver contract speaks of."""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from transfer.progress import Progress
from transfer.result import CopyResult

#: Called with (file name, Progress) while an operation copies; from the copier's threads too.
ProgressHook = Callable[[str, Progress], None]


class PowerState(enum.IntEnum):
    """Power states, numbered as Nova numbers them."""

    NOSTATE = 0
    RUNNING = 1
    PAUSED = 3
    SHUTDOWN = 4
    CRASHED = 6
    SUSPENDED = 7

    @property
    def label(self) -> str:
        """The lower-case name the APIs show (``running``, ``shutdown``)."""
        return self.name.lower()


#: States a cold migration moves; a paused or suspended guest must be resumed or stopped first.
MOVABLE_STATES = frozenset({PowerState.RUNNING, PowerState.SHUTDOWN, PowerState.CRASHED, PowerState.NOSTATE})


@dataclass(frozen=True)
class Flavor:
    """Sizes an instance runs with; disks in GiB, memory in MiB."""

    name: str
    vcpus: int
    memory_mb: int
    root_gb: int
    ephemeral_gb: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Flavor":
        return cls(**{k: d[k] for k in ("name", "vcpus", "memory_mb", "root_gb") }, ephemeral_gb=d.get("ephemeral_gb", 0))


@dataclass
class Instance:
    """A virtual machine as the driver knows it (``uuid`` is the libvirt domain UUID)."""

    uuid: str
    name: str
    flavor: Flavor
    host: str = ""
    power_state: PowerState = PowerState.NOSTATE

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Instance":
        return cls(d["uuid"], d["name"], Flavor.from_dict(d["flavor"]), d.get("host", ""),
                   PowerState(d.get("power_state", 0)))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "power_state": int(self.power_state)}


@dataclass
class Migration:
    """One migration of one instance from ``source_host`` to ``dest_host``."""

    id: str
    instance_uuid: str
    source_host: str
    dest_host: str
    dest_address: str = ""
    status: str = "pre-migrating"
    migration_type: str = "migration"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Migration":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class Vif:
    """A network interface; only bridge-type interfaces need anything on the target."""

    address: str
    type: str = "bridge"
    bridge: str = ""
    id: str = ""


@dataclass(frozen=True)
class DiskInfo:
    """One disk as migrate_disk_and_power_off reports it (Nova's disk_info keys).

    ``virt_disk_size`` and ``disk_size`` are bytes: the virtual size and the
    space the file takes; ``over_committed_disk_size`` is their difference.
    ``type`` is the image format (raw, qcow2), ``target`` the guest device (vda).
    ``overlay``, when set, is a qcow2 overlay on this disk that a pre-copy sent
    along (what the guest wrote during the copy); the destination commits it
    into the disk before defining the instance.
    """

    type: str
    path: str
    virt_disk_size: int
    backing_file: str
    disk_size: int
    over_committed_disk_size: int
    target: str = ""
    overlay: str = ""

    @staticmethod
    def dumps(disks: list["DiskInfo"]) -> str:
        """JSON; ``overlay`` only where there is one, so disk_info keeps Nova's keys otherwise."""
        return json.dumps([{k: v for k, v in asdict(d).items() if k != "overlay" or v} for d in disks])

    @staticmethod
    def loads(text: str) -> list["DiskInfo"]:
        return [DiskInfo(**d) for d in json.loads(text)]


@dataclass
class HostResources:
    """What a host has, for the scheduler."""

    hostname: str
    arch: str
    hypervisor_type: str
    hypervisor_version: int
    vcpus: int
    vcpus_used: int
    memory_mb: int
    memory_mb_used: int
    disk_gb: int
    disk_gb_used: int
    instances: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# -- what the migration calls return ---------------------------------------------------


@dataclass(frozen=True)
class MigrateOutcome:
    """What ``migrate_disk_and_power_off`` did: the disks as the destination has them, every
    copy made, and when the guest went off.

    ``shared``: the instance directory is on storage both hosts see; nothing was
    copied and neither side may delete that directory on a revert or rollback.
    ``precopy``: the disks were copied while the guest ran, then only what it wrote
    meanwhile. ``powered_off_at`` is epoch seconds (None when it never went off).
    ``bytes_before_power_off`` is data sent while the guest still ran; the rest of
    ``bytes_sent`` was sent during the downtime.
    """

    disk_info: list[DiskInfo]
    copies: list[CopyResult] = field(default_factory=list)
    shared: bool = False
    precopy: bool = False
    was_running: bool = False
    powered_off_at: float | None = None
    bytes_before_power_off: int = 0

    @property
    def bytes_sent(self) -> int:
        return sum(c.sent for c in self.copies)

    @property
    def bytes_after_power_off(self) -> int:
        return self.bytes_sent - self.bytes_before_power_off

    @property
    def bytes_skipped(self) -> int:
        return sum(c.skipped for c in self.copies)

    @property
    def rate(self) -> float:
        """Data bytes per second over all copies (0.0 with none)."""
        seconds = sum(c.seconds for c in self.copies)
        return self.bytes_sent / seconds if seconds > 0 else 0.0

    @property
    def digests(self) -> list[str]:
        return [c.digest for c in self.copies if c.digest]


@dataclass(frozen=True)
class FinishOutcome:
    """What ``finish_migration`` did: when the instance ran on the destination (epoch
    seconds; None when it was not started, ``power_on=False``)."""

    running_at: float | None = None


@dataclass(frozen=True)
class LiveOutcome:
    """What ``live_migration`` did. Figures the hypervisor does not report are None.

    ``downtime_s``: how long the guest was paused; ``job_s``: the hypervisor's job
    time; ``prepare_s``: making the disks on the destination; ``migration_s``: the
    migration itself; ``flags``: the hypervisor's migration flags, by name.
    """

    downtime_s: float | None = None
    shared: bool = False
    job_s: float | None = None
    memory_bytes: int | None = None
    prepare_s: float = 0.0
    migration_s: float = 0.0
    flags: list[str] = field(default_factory=list)
    copies: list[CopyResult] = field(default_factory=list)
