"""The XenServer driver: cold migration that copies most of the disk while the VM runs.

Source side (seed 003's sequence): snapshot each disk, which freezes the
current VHD as a read-only base and sends new writes to a fresh leaf; copy
the base VHDs while the VM keeps running; shut the VM down; copy only the
leaves (what was written since the snapshot) and a small metadata file.
Downtime then grows with the writes made during the copy, not with the
disk's size. Any failure removes the partial copy, lets the SR coalesce the
leaf back into its base and restarts the VM if it ran.

Destination side: give the copied VHDs new VDI uuids, relink each child to
its copied parent, validate the chain (checksums, parent UUIDs), introduce
the VDIs, create the VM, attach the disks and start it.

The session is a XenAPI-like interface (session.py); here it is always a
StubSession, since no XenServer exists in this project's environment.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any, Callable

from transfer.result import CopyResult
from transfer.units import format_size

from ..base import ComputeDriver
from ..errors import (DriverError, InstanceNotFound, InsufficientSpace, InvalidInstanceState,
                      MigrationFailed, PowerOffFailed, ResizeDown, StartFailed)
from ..model import (MOVABLE_STATES, DiskInfo, FinishOutcome, Flavor, HostResources, Instance, MigrateOutcome,
                     Migration, PhaseName, PowerState, ProgressHook, Timeline, Vif)
from . import staging, vhd
from .copier import Copier
from .session import HALTED, PAUSED, RUNNING, SUSPENDED, Session, VMRecord, XenAPIFailure

log = logging.getLogger(__name__)

GiB = 1 << 30
MARKER = "coldferry-migration"  # VM other_config key: {vdi uuid: base uuid} until confirm or revert
FLAVOR_KEY = "coldferry-flavor"
_STATES = {HALTED: PowerState.SHUTDOWN, RUNNING: PowerState.RUNNING, PAUSED: PowerState.PAUSED,
           SUSPENDED: PowerState.SUSPENDED}


@dataclass
class _Done:
    """What the source has done so far: for the rollback, and the outcome's disks and copies;
    ``timeline`` records each step as it ends."""

    progress: ProgressHook | None
    timeline: Timeline = field(default_factory=Timeline)
    snapshots: list[str] = field(default_factory=list)
    bases: dict[str, str] = field(default_factory=dict)  # VM's vdi uuid -> base uuid the snapshot made
    sent: list[str] = field(default_factory=list)
    disks: list[DiskInfo] = field(default_factory=list)
    copies: list[CopyResult] = field(default_factory=list)


class XenServerDriver(ComputeDriver):
    """One XenServer host behind ``session``.

    :param copier: copies VHD files into another host's SR (copier.py).
    :param now: wall clock for the power-off and start times two hosts compare.
    :param clock, sleep: for the bounded wait on the SR's coalesce.
    """

    hypervisor_type = "xen"

    def __init__(self, session: Session, copier: Copier, host_name: str = "", *,
                 coalesce_timeout: float = 60.0, now: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 new_uuid: Callable[[], str] = lambda: str(uuidlib.uuid4())) -> None:
        self.session = session
        self.copier = copier
        self.host_name = host_name or session.host_get_record().name_label
        self.coalesce_timeout = coalesce_timeout
        self.now = now
        self.clock = clock
        self.sleep = sleep
        self.new_uuid = new_uuid

    # -- session plumbing ---------------------------------------------------------

    def _vm(self, uuid: str) -> str:
        try:
            return self.session.vm_get_by_uuid(uuid)
        except XenAPIFailure as e:
            if e.code == "UUID_INVALID":
                raise InstanceNotFound(uuid=uuid, host=self.host_name) from None
            raise DriverError(reason=f"XenAPI VM.get_by_uuid({uuid}): {e}") from None

    def _state(self, vm: str) -> PowerState:
        return _STATES.get(self.session.vm_get_power_state(vm), PowerState.NOSTATE)

    def _sr_path(self) -> str:
        return self.session.sr_get_path(self.session.sr_get_default())

    def _file(self, vdi: str) -> str:
        return os.path.join(self._sr_path(), self.session.vdi_get_record(vdi).location)

    def _to_instance(self, vm: str) -> Instance:
        rec = self.session.vm_get_record(vm)
        disks = self.session.vm_get_disks(vm)
        root = self.session.vdi_get_record(disks[0][1]).virtual_size if disks else 0
        flavor = Flavor(rec.other_config.get(FLAVOR_KEY, "custom"), rec.vcpus, rec.memory_mb, -(-root // GiB))
        return Instance(rec.uuid, rec.name_label, flavor, self.host_name, _STATES.get(rec.power_state,
                                                                                        PowerState.NOSTATE))

    # -- inventory and power --------------------------------------------------------

    def list_instances(self) -> list[Instance]:
        return [self._to_instance(vm) for vm in self.session.vm_get_all()]

    def get_instance(self, uuid: str) -> Instance:
        return self._to_instance(self._vm(uuid))

    def host_resources(self) -> HostResources:
        host = self.session.host_get_record()
        size, used = self.session.sr_get_space(self.session.sr_get_default())
        insts = self.list_instances()
        return HostResources(
            hostname=self.host_name, arch="x86_64", hypervisor_type=self.hypervisor_type, hypervisor_version=0,
            vcpus=host.cpu_count, vcpus_used=sum(i.flavor.vcpus for i in insts), memory_mb=host.memory_total_mb,
            memory_mb_used=sum(i.flavor.memory_mb for i in insts), disk_gb=size // GiB, disk_gb_used=-(-used // GiB),
            instances=len(insts), extra={"session": type(self.session).__name__})

    def power_on(self, instance: Instance) -> None:
        vm = self._vm(instance.uuid)
        if self._state(vm) != PowerState.RUNNING:
            try:
                self.session.vm_start(vm)
            except XenAPIFailure as e:
                raise StartFailed(uuid=instance.uuid, host=self.host_name, reason=str(e)) from None

    def power_off(self, instance: Instance, timeout: int = 0, retry_interval: int = 0) -> None:
        """Clean shutdown if ``timeout`` (XAPI bounds the wait itself), hard shutdown otherwise or after."""
        vm = self._vm(instance.uuid)
        if self._state(vm) == PowerState.SHUTDOWN:
            return
        if timeout:
            try:
                self.session.vm_clean_shutdown(vm)
                return
            except XenAPIFailure as e:
                log.info("instance %s did not shut down cleanly (%s); forcing it off", instance.uuid, e)
        try:
            self.session.vm_hard_shutdown(vm)
        except XenAPIFailure as e:
            raise PowerOffFailed(uuid=instance.uuid, reason=str(e)) from None

    # -- migration: source side -----------------------------------------------------

    def migrate_disk_and_power_off(self, instance: Instance, dest: str, flavor: Flavor, network_info: list[Vif],
                                   block_device_info: dict[str, Any] | None = None, timeout: int = 0,
                                   retry_interval: int = 0, progress: ProgressHook | None = None,
                                   timeline: Timeline | None = None) -> MigrateOutcome:
        uuid = instance.uuid
        vm = self._vm(uuid)
        state = self._state(vm)
        if state not in MOVABLE_STATES:
            raise InvalidInstanceState(uuid=uuid, state=state.label, reason="resume it or shut it off before migrating")
        disks = [(vbd.userdevice, vdi) for vbd, vdi in self.session.vm_get_disks(vm)]
        self._check_flavor(instance, flavor, disks)
        done = _Done(progress, timeline or Timeline())
        with done.timeline.phase(PhaseName.CONNECT):
            self._check_space(uuid, dest, disks)
        was_running = state == PowerState.RUNNING
        log.info("migrating %s to %s: copying base VHDs while it runs", uuid, dest)
        try:
            for device, vdi in disks:
                self._snapshot_and_copy_bases(uuid, vm, device, vdi, dest, done)
            before = sum(c.sent for c in done.copies)
            with done.timeline.phase(PhaseName.SHUTDOWN):
                self.power_off(instance, timeout, retry_interval)
            powered_off_at = self.now()
            for device, vdi in disks:
                self._copy_leaf(uuid, device, vdi, dest, done)
            self._send_metadata(uuid, dest, powered_off_at, done)
            # Only now: the snapshot kept the base from being coalesced while the leaf was pending.
            while done.snapshots:
                self.session.vdi_destroy(done.snapshots.pop())
        except BaseException as e:
            log.exception("migration of %s to %s failed; restoring the source", uuid, dest)
            restored = self._rollback(vm, dest, done, was_running)
            raise MigrationFailed(uuid=uuid, dest=dest, reason=str(e) or type(e).__name__, restored=restored) from e
        outcome = MigrateOutcome(done.disks, done.copies, precopy=True, was_running=was_running,
                                 powered_off_at=powered_off_at, bytes_before_power_off=before)
        log.info("migrated %s to %s: %d bytes before power-off, %d after", uuid, dest,
                 outcome.bytes_before_power_off, outcome.bytes_after_power_off)
        return outcome

    def _check_flavor(self, instance: Instance, flavor: Flavor, disks: list[tuple[str, str]]) -> None:
        for device, vdi in disks[:1]:
            size = self.session.vdi_get_record(vdi).virtual_size
            if flavor.root_gb and flavor.root_gb * GiB < size:
                raise ResizeDown(flavor=flavor.name, disk=staging.device_name(device), uuid=instance.uuid,
                                 current_gb=-(-size // GiB), wanted_gb=flavor.root_gb)

    def _check_space(self, uuid: str, dest: str, disks: list[tuple[str, str]]) -> None:
        needed = sum(os.stat(self._file(v)).st_blocks * 512
                     for _d, vdi in disks for v in self.session.vdi_get_parent_chain(vdi))
        free = self.copier.free(dest)
        if needed > free:
            raise InsufficientSpace(host=dest, path="its SR", uuid=uuid, free_h=format_size(free),
                                    needed_h=format_size(needed))

    def _snapshot_and_copy_bases(self, uuid: str, vm: str, device: str, vdi: str, dest: str, done: _Done) -> None:
        """Snapshot one disk and copy every VHD below its new leaf, the VM still running."""
        with done.timeline.phase(PhaseName.SNAPSHOT, detail=staging.device_name(device)):
            snap = self.session.vdi_snapshot(vdi)
        done.snapshots.append(snap)
        bases = self.session.vdi_get_parent_chain(snap)[1:]
        done.bases[self.session.vdi_get_record(vdi).uuid] = self.session.vdi_get_record(bases[0]).uuid
        self.session.vm_add_to_other_config(vm, MARKER, json.dumps(done.bases))
        for depth, base in enumerate(bases, 1):
            name = staging.staged_name(uuid, device, depth)
            backing = staging.staged_name(uuid, device, depth + 1) if depth < len(bases) else ""
            self._send(self._file(base), dest, name, done, PhaseName.PRECOPY)
            done.disks.append(self._disk_info(base, name, backing, ""))

    def _copy_leaf(self, uuid: str, device: str, vdi: str, dest: str, done: _Done) -> None:
        name = staging.staged_name(uuid, device, 0)
        self._send(self._file(vdi), dest, name, done)
        backing = staging.staged_name(uuid, device, 1)
        done.disks.insert(0, self._disk_info(vdi, name, backing, staging.device_name(device)))

    def _send_metadata(self, uuid: str, dest: str, powered_off_at: float, done: _Done) -> None:
        """Send what the destination needs besides disk_info: when the downtime began."""
        path = os.path.join(self._sr_path(), staging.metadata_name(uuid))
        staging.write_metadata(path, {"uuid": uuid, "source_host": self.host_name,
                                      "powered_off_at": powered_off_at})
        try:
            self._send(path, dest, staging.metadata_name(uuid), done)
        finally:
            os.unlink(path)

    def _send(self, src: str, dest: str, name: str, done: _Done, phase: PhaseName = PhaseName.COPY) -> None:
        done.sent.append(name)  # before the copy: a failed one may leave a partial file to remove
        progress = functools.partial(done.progress, name) if done.progress else None
        with done.timeline.phase(phase, detail=name):
            done.copies.append(self.copier.copy(src, dest, name, progress))

    def _disk_info(self, vdi: str, name: str, backing: str, target: str) -> DiskInfo:
        info = vhd.info(self._file(vdi))
        return DiskInfo(type="vhd", path=name, virt_disk_size=info.virtual_size, backing_file=backing,
                        disk_size=info.physical_size,
                        over_committed_disk_size=max(0, info.virtual_size - info.physical_size), target=target)

    def _rollback(self, vm: str, dest: str, done: _Done, was_running: bool) -> str:
        """Undo a failed migration on both hosts; return how the source was left, for the message."""
        notes = []
        for name in done.sent:
            try:
                self.copier.remove(dest, name)
            except Exception as e:  # the source matters more than the leftovers: go on, but say so
                log.error("could not remove %s on %s: %s", name, dest, e)
                notes.append(f"; remove {name} from the SR on {dest} by hand")
        for snap in done.snapshots:
            notes.append(_attempt(f"destroy snapshot {snap}", functools.partial(self.session.vdi_destroy, snap)))
        if done.bases:
            notes.append(_attempt("coalesce the disk chain back", lambda: self._coalesce_back(vm, done.bases)))
        if was_running and self.session.vm_get_power_state(vm) != RUNNING:
            try:
                self.session.vm_start(vm)
                notes.insert(0, " and started again")
            except XenAPIFailure as e:
                notes.insert(0, f" but did not start again ({e})")
        elif was_running:
            notes.insert(0, " (it kept running)")
        return "".join(notes)

    def _coalesce_back(self, vm: str, bases: dict[str, str]) -> None:
        """Have the SR merge each leaf into the base the snapshot made; wait until it has.

        :raises DriverError: a base is still in a chain after ``coalesce_timeout`` seconds.
        """
        sr = self.session.sr_get_default()
        deadline = self.clock() + self.coalesce_timeout
        while True:
            self.session.sr_scan(sr)
            left = [b for _d, vdi in self.session.vm_get_disks(vm)
                    for b in self._chain_uuids(vdi) if b in bases.values()]
            if not left:
                break
            if self.clock() >= deadline:
                raise DriverError(reason=f"the SR did not coalesce {', '.join(left)} within "
                                         f"{self.coalesce_timeout:.0f} s; run SR.scan and check its log")
            self.sleep(1.0)
        self.session.vm_remove_from_other_config(vm, MARKER)

    def _chain_uuids(self, vdi: str) -> list[str]:
        return [self.session.vdi_get_record(v).uuid for v in self.session.vdi_get_parent_chain(vdi)]

    # -- migration: destination side ------------------------------------------------

    def finish_migration(self, migration: Migration, instance: Instance, disk_info: list[DiskInfo],
                         network_info: list[Vif], image_meta: dict[str, Any], resize_instance: bool,
                         block_device_info: dict[str, Any] | None = None, power_on: bool = True,
                         timeline: Timeline | None = None) -> FinishOutcome:
        tl = timeline or Timeline()
        uuid = instance.uuid
        sr = self.session.sr_get_default()
        sr_path = self.session.sr_get_path(sr)
        meta = staging.read_metadata(sr_path, uuid)
        created: list[str] = []
        try:
            with tl.phase(PhaseName.DEFINE):
                vm = self.session.vm_create(VMRecord(uuid, instance.name, instance.flavor.memory_mb,
                                                     instance.flavor.vcpus,
                                                     other_config={FLAVOR_KEY: instance.flavor.name}))
            created.append(vm)
            for leaf in (d for d in disk_info if d.target):
                with tl.phase(PhaseName.COMMIT, detail=leaf.target):
                    vdi = staging.import_chain(self.session, sr, leaf, disk_info, self.new_uuid, created)
                device = staging.userdevice(leaf.target)
                if resize_instance and device == "0" and instance.flavor.root_gb * GiB > leaf.virt_disk_size:
                    with tl.phase(PhaseName.GROW, detail=leaf.target):
                        self.session.vdi_resize(vdi, instance.flavor.root_gb * GiB)
                self.session.vbd_create(vm, vdi, device, device == "0")
        except BaseException:
            self._undo_import(created)
            raise
        os.unlink(os.path.join(sr_path, staging.metadata_name(uuid)))
        if not power_on:
            return FinishOutcome()
        with tl.phase(PhaseName.START):
            self.power_on(instance)
        running_at = self.now()
        log.info("instance %s runs here after %.3f s of downtime", uuid, running_at - meta["powered_off_at"])
        return FinishOutcome(running_at=running_at)

    def _undo_import(self, created: list[str]) -> None:
        """Remove the VM and VDIs a failed finish_migration made (newest first)."""
        for ref in reversed(created):
            try:
                if ref in self.session.vm_get_all():
                    self.session.vm_destroy(ref)
                else:
                    self.session.vdi_destroy(ref)
            except XenAPIFailure as e:
                log.error("could not remove %s after a failed import: %s", ref, e)
        self.session.sr_scan(self.session.sr_get_default())

    # -- confirm and revert ---------------------------------------------------------

    def confirm_migration(self, migration: Migration, instance: Instance, network_info: list[Vif]) -> None:
        try:
            vm = self._vm(instance.uuid)
        except InstanceNotFound:
            return
        if self._state(vm) == PowerState.RUNNING:
            raise InvalidInstanceState(uuid=instance.uuid, state="running here",
                                       reason="the source copy is running; refusing to remove it")
        self._destroy_vm(vm, destroy_disks=True)

    def finish_revert_migration(self, instance: Instance, network_info: list[Vif], migration: Migration,
                                block_device_info: dict[str, Any] | None = None, power_on: bool = True) -> None:
        vm = self._vm(instance.uuid)
        marker = self.session.vm_get_record(vm).other_config.get(MARKER)
        if marker:
            self._coalesce_back(vm, json.loads(marker))
        if power_on:
            self.power_on(instance)

    def destroy(self, instance: Instance, network_info: list[Vif], destroy_disks: bool = True) -> None:
        try:
            vm = self._vm(instance.uuid)
        except InstanceNotFound:
            vm = ""
        if vm:
            if self._state(vm) != PowerState.SHUTDOWN:
                self.session.vm_hard_shutdown(vm)
            self._destroy_vm(vm, destroy_disks)
        if destroy_disks:  # copies that arrived but were never imported, and partial ones
            sr_path = self._sr_path()
            for name in os.listdir(sr_path):
                if staging.is_staged(name, instance.uuid):
                    os.unlink(os.path.join(sr_path, name))

    def _destroy_vm(self, vm: str, destroy_disks: bool) -> None:
        vdis = [vdi for _vbd, vdi in self.session.vm_get_disks(vm)]
        self.session.vm_destroy(vm)
        if destroy_disks:
            for vdi in vdis:
                self.session.vdi_destroy(vdi)
            self.session.sr_scan(self.session.sr_get_default())  # the collector removes the hidden bases


def _attempt(what: str, action: Callable[[], None]) -> str:
    """Run one rollback step; "" if it worked, else a note for the error message (and a log line)."""
    try:
        action()
    except Exception as e:
        log.exception("rollback: could not %s", what)
        return f"; could not {what}: {e}"
    return ""
