"""An in-memory hypervisor: the driver contract without libvirt, for unit tests and demos.

Several ``MemoryDriver`` hosts share one ``MemoryCloud``, which finds a
host by name or address the way SSH finds a real one. A disk is just a
size in bytes; "copying" it moves that size to the destination in steps,
reporting progress, optionally sleeping ``step_delay`` seconds per step.
The state machine mirrors the libvirt driver: the source keeps its disks
aside (the ``_resize`` directory) until confirm or revert, and every
failure after power-off restores the source's power state.

Hosts the cloud names together in ``shared_storage`` see one instances
directory, as on NFS: a migration between them copies nothing, marks the
directory with the source's name until confirm or revert, and while it is
marked a ``destroy`` on another host keeps the disks.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

from transfer.progress import Progress
from transfer.result import CopyResult
from transfer.units import format_size

from .base import ComputeDriver
from .errors import (DriverError, InstanceNotFound, InsufficientSpace, InvalidInstanceState, MigrationFailed,
                     ResizeDown)
from .model import (MOVABLE_STATES, DiskInfo, FinishOutcome, Flavor, HostResources, Instance, LiveOutcome,
                    MigrateOutcome, Migration, PhaseName, PowerState, ProgressHook, Timeline, Vif)

GiB = 1 << 30
ROOT_DISK = "disk"
EPHEMERAL_DISK = "disk.local"


class MemoryCloud:
    """The hosts that can reach each other, by host name and by address.

    :param shared_storage: groups of host names whose hosts see one instances
        directory (``[("host1", "host2")]``); every other host has its own.
    """

    def __init__(self, shared_storage: Iterable[Iterable[str]] = ()) -> None:
        self._hosts: dict[str, MemoryDriver] = {}
        self._lock = threading.Lock()
        self._storage: dict[str, _Storage] = {}
        for group in shared_storage:
            storage = _Storage()
            for name in group:
                self._storage[name] = storage

    def storage(self, host_name: str) -> "_Storage":
        """The instances directory host ``host_name`` sees: its group's, or a private one."""
        with self._lock:
            return self._storage.get(host_name) or _Storage()

    def register(self, driver: "MemoryDriver") -> None:
        """Make ``driver`` reachable under its host name and its address."""
        with self._lock:
            for key in {driver.host_name, driver.address}:
                self._hosts[key] = driver

    def lookup(self, host: str) -> "MemoryDriver":
        """The driver reached as ``host``; raises DriverError if no host answers to it."""
        with self._lock:
            found = self._hosts.get(host)
        if found is None:
            raise DriverError(reason=f"cannot reach host {host}: no such host in this memory cloud "
                                     f"(known: {', '.join(sorted(self._hosts)) or 'none'})")
        return found


@dataclass
class _Dir:
    """An instance directory: its disks (name -> bytes), the saved definition (domain.xml) and,
    on shared storage, the host whose migration of it is not confirmed or reverted yet."""

    disks: dict[str, int] = field(default_factory=dict)
    definition: Instance | None = None
    shared_by: str = ""


@dataclass
class _Storage:
    """One instances directory (uuid -> _Dir) and the lock of every host that sees it."""

    dirs: dict[str, _Dir] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)


class MemoryDriver(ComputeDriver):
    """One in-memory host.

    :param host_name: the name this host reports and is found by.
    :param cloud: the hosts it can migrate to; a private cloud if omitted.
    :param address: the data-plane address other hosts use; the host name if omitted.
    :param step_delay: seconds each copy step takes (sleeps through ``sleep``).
    :param copy_steps: how many progress steps one disk copy takes.
    :param clock: monotonic seconds, for the copies' durations and the live migration's pause.
    :param now: epoch seconds, for the power-off and start times two hosts compare.
    """

    hypervisor_type = "QEMU"

    def __init__(self, host_name: str, cloud: MemoryCloud | None = None, address: str = "", *,
                 vcpus: int = 16, memory_mb: int = 65536, disk_gb: int = 1000, arch: str = "x86_64",
                 hypervisor_type: str = "QEMU", hypervisor_version: int = 9000000, step_delay: float = 0.0,
                 copy_steps: int = 4, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, now: Callable[[], float] = time.time) -> None:
        self.host_name = host_name
        self.address = address or host_name
        self.cloud = cloud if cloud is not None else MemoryCloud()
        self.capacity = {"vcpus": vcpus, "memory_mb": memory_mb, "disk_gb": disk_gb, "arch": arch,
                         "hypervisor_version": hypervisor_version}
        self.hypervisor_type = hypervisor_type
        self.step_delay = step_delay
        self.copy_steps = max(1, copy_steps)
        self.sleep = sleep
        self.clock = clock
        self.now = now
        storage = self.cloud.storage(host_name)
        self._defined: dict[str, Instance] = {}
        self._dirs = storage.dirs
        self._kept: dict[str, _Dir] = {}   # the source's copy until confirm or revert
        self._failures: dict[str, BaseException] = {}
        self._lock = storage.lock
        self.cloud.register(self)

    # -- test knobs -------------------------------------------------------------

    def add_instance(self, uuid: str, name: str, flavor: Flavor, power_state: PowerState = PowerState.RUNNING,
                     disk_gb: int | None = None, disks: dict[str, int] | None = None) -> Instance:
        """Define an instance here with its disks.

        :param disk_gb: size of the root disk; the flavor's root_gb if omitted.
        :param disks: name -> size in bytes, replacing the disks derived from the flavor.
        :returns: the instance as ``get_instance`` reports it.
        """
        if disks is None:
            disks = {ROOT_DISK: (flavor.root_gb if disk_gb is None else disk_gb) * GiB}
            if flavor.ephemeral_gb:
                disks[EPHEMERAL_DISK] = flavor.ephemeral_gb * GiB
        with self._lock:
            self._defined[uuid] = Instance(uuid, name, flavor, self.host_name, PowerState(power_state))
            self._dirs[uuid] = _Dir(dict(disks))
        return self._copy_of(uuid)

    def fail(self, op_name: str, exc: BaseException) -> None:
        """Make the next call of ``op_name`` raise ``exc``.

        ``op_name`` is a public method name (raised on entry) or ``"copy"``:
        raised after the first step of a disk copy, once the source is off.
        """
        with self._lock:
            self._failures[op_name] = exc

    def disks(self, uuid: str) -> dict[str, int]:
        """The disks in the instance directory here (name -> bytes); empty if none."""
        with self._lock:
            d = self._dirs.get(uuid)
            return dict(d.disks) if d else {}

    def kept_disks(self, uuid: str) -> dict[str, int]:
        """The disks kept aside after migrating away, until confirm or revert."""
        with self._lock:
            d = self._kept.get(uuid)
            return dict(d.disks) if d else {}

    def shared_by(self, uuid: str) -> str:
        """The host whose migration marked the (shared) instance directory; "" if none."""
        with self._lock:
            d = self._dirs.get(uuid)
            return d.shared_by if d else ""

    def _shares_storage_with(self, other: "MemoryDriver") -> bool:
        return other._dirs is self._dirs

    def _maybe_fail(self, op_name: str) -> None:
        with self._lock:
            exc = self._failures.pop(op_name, None)
        if exc is not None:
            raise exc

    # -- inventory and power ------------------------------------------------------

    def list_instances(self) -> list[Instance]:
        self._maybe_fail("list_instances")
        with self._lock:
            return [replace(i) for i in self._defined.values()]

    def get_instance(self, uuid: str) -> Instance:
        self._maybe_fail("get_instance")
        return self._copy_of(uuid)

    def _copy_of(self, uuid: str) -> Instance:
        """A detached copy of the instance, so callers cannot change this host's state."""
        with self._lock:
            return replace(self._record(uuid))

    def _record(self, uuid: str) -> Instance:
        try:
            return self._defined[uuid]
        except KeyError:
            raise InstanceNotFound(uuid=uuid, host=self.host_name) from None

    def host_resources(self) -> HostResources:
        self._maybe_fail("host_resources")
        with self._lock:
            insts = list(self._defined.values())
            used = self._used_bytes()
        c = self.capacity
        return HostResources(
            hostname=self.host_name, arch=c["arch"], hypervisor_type=self.hypervisor_type,
            hypervisor_version=c["hypervisor_version"], vcpus=c["vcpus"],
            vcpus_used=sum(i.flavor.vcpus for i in insts), memory_mb=c["memory_mb"],
            memory_mb_used=sum(i.flavor.memory_mb for i in insts), disk_gb=c["disk_gb"],
            disk_gb_used=-(-used // GiB), instances=len(insts))

    def _used_bytes(self) -> int:
        return sum(sum(d.disks.values()) for d in [*self._dirs.values(), *self._kept.values()])

    def power_on(self, instance: Instance) -> None:
        self._maybe_fail("power_on")
        self._set_state(instance.uuid, PowerState.RUNNING)

    def power_off(self, instance: Instance, timeout: int = 0, retry_interval: int = 0) -> None:
        self._maybe_fail("power_off")
        self._set_state(instance.uuid, PowerState.SHUTDOWN)

    def _set_state(self, uuid: str, state: PowerState) -> None:
        with self._lock:
            self._record(uuid).power_state = state

    # -- migration: source side ---------------------------------------------------

    def migrate_disk_and_power_off(self, instance: Instance, dest: str, flavor: Flavor, network_info: list[Vif],
                                   block_device_info: dict | None = None, timeout: int = 0,
                                   retry_interval: int = 0, progress: ProgressHook | None = None,
                                   timeline: Timeline | None = None) -> MigrateOutcome:
        self._maybe_fail("migrate_disk_and_power_off")
        tl = timeline or Timeline()
        uuid = instance.uuid
        current = self._copy_of(uuid)
        if current.power_state not in MOVABLE_STATES:
            raise InvalidInstanceState(uuid=uuid, state=current.power_state.label,
                                       reason="resume it or shut it off before migrating")
        disks = self.disks(uuid)
        _check_flavor(current, flavor, disks)
        with tl.phase(PhaseName.CONNECT):
            target = self._target(dest)
            shared = self._shares_storage_with(target)
            if not shared:
                target._check_space(uuid, dest, sum(disks.values()))
        was_running = current.power_state == PowerState.RUNNING
        with tl.phase(PhaseName.SHUTDOWN):
            self.power_off(current, timeout, retry_interval)
        powered_off_at = self.now()
        disk_info = [_disk_info(uuid, name, size, i) for i, (name, size) in enumerate(disks.items())]
        with self._lock:
            self._dirs[uuid].definition = replace(current, power_state=PowerState.SHUTDOWN)
            if shared:  # the one copy both hosts see stays; marked as this host's migration
                self._dirs[uuid].shared_by = self.host_name
            else:  # the directory moves aside, as libvirt's becomes <uuid>_resize
                self._kept[uuid] = self._dirs.pop(uuid)
        if shared:
            return MigrateOutcome(disk_info, [], shared=True, was_running=was_running, powered_off_at=powered_off_at)
        try:
            target._receive_dir(uuid, replace(current, power_state=PowerState.SHUTDOWN))
            copies = [self._copy(uuid, name, size, target, progress, tl, PhaseName.COPY)
                      for name, size in disks.items()]
        except BaseException as e:
            restored = self._rollback(current, target, was_running)
            raise MigrationFailed(uuid=uuid, dest=dest, reason=str(e) or type(e).__name__,
                                  restored=restored) from e
        return MigrateOutcome(disk_info, copies, was_running=was_running, powered_off_at=powered_off_at)

    def _target(self, dest: str) -> "MemoryDriver":
        target = self.cloud.lookup(dest)
        if target is self:
            raise DriverError(reason=f"{dest} is this host ({self.host_name}); migrate to another host")
        return target

    def _check_space(self, uuid: str, dest: str, needed: int) -> None:
        """Raise InsufficientSpace if ``needed`` bytes do not fit on this host (as the source checks a target)."""
        with self._lock:
            free = self.capacity["disk_gb"] * GiB - self._used_bytes()
        if needed > free:
            raise InsufficientSpace(host=dest, path="memory", uuid=uuid, free_h=format_size(max(free, 0)),
                                    needed_h=format_size(needed))

    def _receive_dir(self, uuid: str, definition: Instance) -> None:
        """Start an incoming instance directory (the copied domain definition)."""
        with self._lock:
            self._dirs[uuid] = _Dir({}, definition)

    def _receive_disk(self, uuid: str, name: str, size: int) -> None:
        """Store (or grow) one incoming disk; the directory must have been started."""
        with self._lock:
            self._dirs[uuid].disks[name] = size

    def _copy(self, uuid: str, name: str, size: int, target: "MemoryDriver", progress: ProgressHook | None,
              timeline: Timeline, phase: PhaseName) -> CopyResult:
        """Move ``size`` bytes to ``target`` in steps, reporting progress after each; recorded as
        ``phase`` with the disk's name."""
        with timeline.phase(phase, detail=name):
            return self._copy_steps(uuid, name, size, target, progress)

    def _copy_steps(self, uuid: str, name: str, size: int, target: "MemoryDriver",
                    progress: ProgressHook | None) -> CopyResult:
        start = self.clock()
        done = 0
        for step in range(1, self.copy_steps + 1):
            done = size * step // self.copy_steps
            target._receive_disk(uuid, name, done)
            if self.step_delay:
                self.sleep(self.step_delay)
            elapsed = max(self.clock() - start, 1e-9)
            rate = done / elapsed
            if progress:
                progress(name, Progress(done, size, rate, (size - done) / rate if rate > 0 else None))
            if step == 1:
                self._maybe_fail("copy")
        digest = hashlib.blake2b(f"{uuid}/{name}:{size}".encode(), digest_size=16).hexdigest()
        return CopyResult("memory", size, size, size, 0, 0, self.clock() - start, digest)

    def _rollback(self, instance: Instance, target: "MemoryDriver", was_running: bool) -> str:
        """Drop the partial copy, put the directory back, restart if it ran; say how, for the message."""
        target._drop_dir(instance.uuid)
        with self._lock:
            self._dirs[instance.uuid] = self._kept.pop(instance.uuid)
        if not was_running:
            return ""
        try:
            self._set_state(instance.uuid, PowerState.RUNNING)
        except DriverError as e:
            return f" but did not start again ({e})"
        return " and started again"

    def _drop_dir(self, uuid: str) -> None:
        """Remove an instance directory here (a partial copy), if any."""
        with self._lock:
            self._dirs.pop(uuid, None)

    # -- migration: destination side ----------------------------------------------

    def finish_migration(self, migration: Migration, instance: Instance, disk_info: list[DiskInfo],
                         network_info: list[Vif], image_meta: dict, resize_instance: bool,
                         block_device_info: dict | None = None, power_on: bool = True,
                         timeline: Timeline | None = None) -> FinishOutcome:
        self._maybe_fail("finish_migration")
        tl = timeline or Timeline()
        uuid = instance.uuid
        with tl.phase(PhaseName.DEFINE), self._lock:
            d = self._dirs.get(uuid)
            if d is None or d.definition is None:
                raise DriverError(reason=f"the copied domain definition of {uuid} is missing here")
            if resize_instance:
                wanted = {ROOT_DISK: instance.flavor.root_gb, EPHEMERAL_DISK: instance.flavor.ephemeral_gb}
                for name, size in d.disks.items():
                    d.disks[name] = max(size, wanted.get(name, 0) * GiB)
            self._defined[uuid] = Instance(uuid, instance.name or d.definition.name, instance.flavor,
                                           self.host_name, PowerState.SHUTDOWN)
        if not power_on:
            return FinishOutcome()
        with tl.phase(PhaseName.START):
            self._set_state(uuid, PowerState.RUNNING)
        return FinishOutcome(running_at=self.now())

    # -- confirm and revert ---------------------------------------------------------

    def confirm_migration(self, migration: Migration, instance: Instance, network_info: list[Vif]) -> None:
        self._maybe_fail("confirm_migration")
        with self._lock:
            current = self._defined.get(instance.uuid)
            if current is not None and current.power_state == PowerState.RUNNING:
                raise InvalidInstanceState(uuid=instance.uuid, state="running here",
                                           reason="the source copy is running; refusing to remove it")
            self._kept.pop(instance.uuid, None)
            self._defined.pop(instance.uuid, None)
            self._unmark(instance.uuid)

    def finish_revert_migration(self, instance: Instance, network_info: list[Vif], migration: Migration,
                                block_device_info: dict | None = None, power_on: bool = True) -> None:
        self._maybe_fail("finish_revert_migration")
        uuid = instance.uuid
        with self._lock:
            if uuid in self._kept:
                self._dirs[uuid] = self._kept.pop(uuid)
            if uuid not in self._defined:
                d = self._dirs.get(uuid)
                if d is None or d.definition is None:
                    raise DriverError(reason=f"instance {uuid} is not defined here and its saved "
                                             "definition cannot be read")
                self._defined[uuid] = replace(d.definition, host=self.host_name)
        if power_on:
            self._set_state(uuid, PowerState.RUNNING)
        with self._lock:
            self._unmark(uuid)

    def _unmark(self, uuid: str) -> None:
        """End this host's shared-storage migration of ``uuid``: the directory is no longer marked."""
        d = self._dirs.get(uuid)
        if d is not None and d.shared_by == self.host_name:
            d.shared_by = ""

    def destroy(self, instance: Instance, network_info: list[Vif], destroy_disks: bool = True) -> None:
        """Undefine here; with ``destroy_disks`` drop the directory too, unless another host's
        migration marked it (shared storage): then the disks stay, for that host."""
        self._maybe_fail("destroy")
        with self._lock:
            self._defined.pop(instance.uuid, None)
            d = self._dirs.get(instance.uuid)
            if destroy_disks and d is not None and d.shared_by in ("", self.host_name):
                self._dirs.pop(instance.uuid)

    # -- live migration ---------------------------------------------------------------

    def live_migration(self, instance: Instance, dest: str, progress: ProgressHook | None = None,
                       timeline: Timeline | None = None) -> LiveOutcome:
        """Move a running instance to ``dest``, keeping it running; its disks are copied while it runs.

        :raises InvalidInstanceState: the instance is not running.
        :raises MigrationFailed: the copy failed; the source kept running.
        """
        self._maybe_fail("live_migration")
        tl = timeline or Timeline()
        uuid = instance.uuid
        current = self._copy_of(uuid)
        if current.power_state != PowerState.RUNNING:
            raise InvalidInstanceState(uuid=uuid, state=current.power_state.label,
                                       reason="live migration moves running instances; use a cold migration")
        disks = self.disks(uuid)
        target = self._target(dest)
        shared = self._shares_storage_with(target)
        started = self.clock()
        copies = [] if shared else self._copy_live(uuid, dest, disks, target, progress, tl)
        paused_at = self.clock()
        with tl.phase(PhaseName.LIVE_MIGRATE):
            target._adopt_running(replace(current, host=target.host_name))
            with self._lock:
                self._defined.pop(uuid, None)
                if not shared:
                    self._dirs.pop(uuid, None)
        done = self.clock()
        return LiveOutcome(downtime_s=done - paused_at, shared=shared, migration_s=done - started, copies=copies)

    def _copy_live(self, uuid: str, dest: str, disks: dict[str, int], target: "MemoryDriver",
                   progress: ProgressHook | None, timeline: Timeline) -> list[CopyResult]:
        """Copy the disks of a running instance to ``target``; on failure drop the partial copy."""
        target._check_space(uuid, dest, sum(disks.values()))
        target._receive_dir(uuid, self._copy_of(uuid))
        try:
            return [self._copy(uuid, name, size, target, progress, timeline, PhaseName.PRECOPY)
                    for name, size in disks.items()]
        except BaseException as e:
            target._drop_dir(uuid)
            raise MigrationFailed(uuid=uuid, dest=dest, reason=str(e) or type(e).__name__,
                                  restored=" (it kept running here)") from e

    def _adopt_running(self, instance: Instance) -> None:
        """Define an instance that arrived by live migration, running."""
        with self._lock:
            self._defined[instance.uuid] = replace(instance, power_state=PowerState.RUNNING)


def _check_flavor(instance: Instance, flavor: Flavor, disks: dict[str, int]) -> None:
    """Disks only grow: refuse a flavor smaller than the root disk or the ephemeral size."""
    root = disks.get(ROOT_DISK, 0)
    if flavor.root_gb and flavor.root_gb * GiB < root:
        raise ResizeDown(flavor=flavor.name, disk=ROOT_DISK, uuid=instance.uuid, current_gb=-(-root // GiB),
                         wanted_gb=flavor.root_gb)
    if flavor.ephemeral_gb < instance.flavor.ephemeral_gb:
        raise ResizeDown(flavor=flavor.name, disk="ephemeral", uuid=instance.uuid,
                         current_gb=instance.flavor.ephemeral_gb, wanted_gb=flavor.ephemeral_gb)


def _disk_info(uuid: str, name: str, size: int, index: int) -> DiskInfo:
    return DiskInfo(type="raw", path=f"/memory/{uuid}/{name}", virt_disk_size=size, backing_file="",
                    disk_size=size, over_committed_disk_size=0, target="vd" + chr(ord("a") + index))
