"""The objects the driver contract speaks of."""

from __future__ import annotations

import enum
import json
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

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


# -- the migration timeline --------------------------------------------------------------


class PhaseName(enum.StrEnum):
    """The phases a migration's timeline records, the one list of their names.

    Controller (host: the agent's host it waited for, "" for its own):

    - ``scheduled``: the request accepted until the source agent was asked to start its job;
    - ``source_job``: the source agent's job (migrate-disk-and-power-off or live-migrate), from
      the request that started it until the controller saw it end (its polling included);
    - ``dest_job``: the destination agent's finish-migration job, the same way.

    Source agent:

    - ``connect``: reaching the destination (SSH) and looking at it: shared storage, image
      cache, free space;
    - ``snapshot``: the disk-only snapshot that lets a pre-copy read disks while the guest runs;
    - ``flatten``: a disk merged with its backing chain before its copy (backing = flatten);
    - ``precopy``: one file copied while the guest still runs (detail: its name);
    - ``shutdown``: the guest's shutdown requested until it was seen off (forced after the timeout);
    - ``copy``: one file copied after the power-off (detail: its name; ``disk.precopy`` is the
      overlay of what the guest wrote during a pre-copy);
    - ``merge``: pre-copy overlays merged back into the source's kept disks;
    - ``live_migrate``: the hypervisor's live migration (memory, and disks it mirrors).

    Destination agent:

    - ``commit``: copied disks made final (pre-copy overlays committed into their disks,
      imported disk chains attached);
    - ``grow``: disks grown to the new flavor;
    - ``define``: the instance defined here;
    - ``start``: the instance started, until it runs.
    """

    SCHEDULED = "scheduled"
    SOURCE_JOB = "source_job"
    CONNECT = "connect"
    SNAPSHOT = "snapshot"
    FLATTEN = "flatten"
    PRECOPY = "precopy"
    SHUTDOWN = "shutdown"
    COPY = "copy"
    MERGE = "merge"
    LIVE_MIGRATE = "live_migrate"
    DEST_JOB = "dest_job"
    COMMIT = "commit"
    GROW = "grow"
    DEFINE = "define"
    START = "start"


#: Phases that move data between the hosts, for a timeline's copy share.
COPY_PHASES = frozenset({PhaseName.PRECOPY, PhaseName.COPY})


@dataclass(frozen=True)
class Phase:
    """One phase of a migration: ``name`` (a PhaseName), its ``start`` and ``end`` in epoch
    seconds, the ``host`` it ran on ("" where the recorder is that host) and a ``detail``
    (the file a copy phase copied)."""

    name: str
    start: float
    end: float
    host: str = ""
    detail: str = ""

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)

    def to_dict(self) -> dict[str, Any]:
        """The phase as both APIs show it: ``{phase, host, start, end, seconds, detail}``."""
        return {"phase": self.name, "host": self.host, "start": self.start, "end": self.end,
                "seconds": round(self.seconds, 6), "detail": self.detail}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Phase":
        """The inverse of ``to_dict`` (``seconds`` is derived, so it is not read)."""
        return cls(str(d["phase"]), float(d["start"]), float(d["end"]), str(d.get("host") or ""),
                   str(d.get("detail") or ""))


class Timeline:
    """Records the phases of one operation as they end; any thread may record.

    ``with timeline.phase(PhaseName.COPY, detail="disk"):`` records the block's
    start and end, also when it raises: a failed operation shows where it got to.

    :param now: epoch seconds (time.time); tests pass a fake clock.
    """

    def __init__(self, now: Callable[[], float] = time.time, phases: Iterable[Phase] = ()) -> None:
        self.now = now
        self._phases = list(phases)
        self._lock = threading.Lock()

    @contextmanager
    def phase(self, name: str, detail: str = "", host: str = "") -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.add(name, start, self.now(), host=host, detail=detail)

    def add(self, name: str, start: float, end: float, host: str = "", detail: str = "") -> Phase:
        """Record a phase whose times are known already; returns it."""
        p = Phase(str(name), start, end, host, detail)
        with self._lock:
            self._phases.append(p)
        return p

    @property
    def phases(self) -> list[Phase]:
        """The phases recorded so far, in the order they ended (a copy)."""
        with self._lock:
            return list(self._phases)

    def copy(self) -> "Timeline":
        """A recorder holding the phases recorded so far, which this one's later phases do not reach."""
        return Timeline(self.now, self.phases)


def total_seconds(phases: Iterable[Phase]) -> float:
    """From the first phase's start to the last one's end (0.0 without phases)."""
    ps = list(phases)
    return max(p.end for p in ps) - min(p.start for p in ps) if ps else 0.0


def copy_seconds(phases: Iterable[Phase]) -> float:
    """The time spent copying (COPY_PHASES), summed."""
    return sum(p.seconds for p in phases if p.name in COPY_PHASES)
