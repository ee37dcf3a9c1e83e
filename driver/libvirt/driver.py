"""The libvirt/KVM driver: cold migration with real disk copies.

Source side: check the flavor and the target, power off, keep the instance
directory as ``<dir>_resize``, copy every disk (and backing files the
target's image cache lacks) with coldferry's copier. Any failure puts the
directory back, removes the target's partial copy and restarts the
instance if it was running. Destination side: grow disks, rewrite the
domain for this host, make sure its bridges exist, define and start.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from dataclasses import replace
from typing import Any, Callable, Concatenate, ParamSpec, TypeVar

import libvirt
from tenacity import Retrying, stop_after_attempt, wait_fixed

from transfer.remotefs import RemoteFS
from transfer.result import CopyResult

from ..base import ComputeDriver
from ..errors import (DriverError, InstanceNotFound, InstancesPathMissing, InvalidInstanceState, MigrationFailed,
                      ResizeDown)
from ..model import (DiskInfo, FinishOutcome, Flavor, HostResources, Instance, LiveOutcome, MigrateOutcome,
                     Migration, PhaseName, PowerState, ProgressHook, Timeline, Vif)
from . import bridges, domain_xml, images, live, precopy, sharing
from .config import DriverConfig
from .host import LibvirtHost, host_errors
from .layout import CACHE_DIR, Layout, write_atomic
from .mover import Beside, DiskMover

log = logging.getLogger(__name__)

GiB = 1 << 30
_P = ParamSpec("_P")
_R = TypeVar("_R")
_Method = Callable[Concatenate["LibvirtDriver", _P], _R]


def _host_errors(what: str) -> Callable[[_Method[_P, _R]], _Method[_P, _R]]:
    """A public method whose libvirt, OS and transfer errors become a HostError (see host_errors):
    the contract lets only DriverErrors out."""
    def wrap(method: _Method[_P, _R]) -> _Method[_P, _R]:
        @functools.wraps(method)
        def guarded(self: "LibvirtDriver", *args: _P.args, **kwargs: _P.kwargs) -> _R:
            with host_errors(what, self.config.host_name):
                return method(self, *args, **kwargs)
        return guarded
    return wrap


class LibvirtDriver(ComputeDriver):
    """The driver of one KVM host: its libvirtd (``host``) and the copy plumbing (``mover``),
    which pre-copy and live migration share with it."""

    hypervisor_type = "QEMU"

    def __init__(self, config: DriverConfig, connect: Callable[[str], Any] = libvirt.open,
                 runner: images.Runner = images.run, remote_fs: Callable[..., RemoteFS] = RemoteFS,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.layout = Layout(config.instances_path)
        self.host = LibvirtHost(config, connect, runner, sleep, clock)
        self.mover = DiskMover(config, remote_fs, runner, sleep)
        self.runner = runner
        self.sleep = sleep

    def instance_dir(self, uuid: str) -> str:
        return self.layout.instance_dir(uuid)

    # -- inventory and power ------------------------------------------------

    @_host_errors("list the instances")
    def list_instances(self) -> list[Instance]:
        return self.host.instances()

    @_host_errors("read the instance")
    def get_instance(self, uuid: str) -> Instance:
        try:
            return self.host.instance(self.host.domain(uuid))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:  # undefined while being read
                raise InstanceNotFound(uuid=uuid, host=self.config.host_name) from None
            raise

    @_host_errors("read the host's resources")
    def host_resources(self) -> HostResources:
        conn = self.host.conn
        _model, mem_mb, cpus, *_ = conn.getInfo()
        caps = domain_xml.parse(conn.getCapabilities())
        arch = caps.findtext("./host/cpu/arch") or os.uname().machine
        doms = self.host.instances()
        try:
            st = os.statvfs(self.config.instances_path)
        except FileNotFoundError:
            raise InstancesPathMissing(path=self.config.instances_path, host=self.config.host_name) from None
        return HostResources(
            hostname=self.config.host_name, arch=arch, hypervisor_type=self.hypervisor_type,
            hypervisor_version=conn.getVersion(), vcpus=cpus, vcpus_used=sum(i.flavor.vcpus for i in doms),
            memory_mb=mem_mb, memory_mb_used=sum(i.flavor.memory_mb for i in doms),
            disk_gb=st.f_blocks * st.f_frsize // GiB, disk_gb_used=(st.f_blocks - st.f_bavail) * st.f_frsize // GiB,
            instances=len(doms))

    @_host_errors("power on the instance")
    def power_on(self, instance: Instance) -> None:
        self.host.power_on(instance)

    @_host_errors("power off the instance")
    def power_off(self, instance: Instance, timeout: int = 0, retry_interval: int = 0) -> None:
        self.host.power_off(instance, timeout, retry_interval)

    # -- migration: source side ---------------------------------------------

    @_host_errors("migrate the instance")
    def migrate_disk_and_power_off(self, instance: Instance, dest: str, flavor: Flavor, network_info: list[Vif],
                                   block_device_info: dict | None = None, timeout: int = 0,
                                   retry_interval: int = 0, progress: ProgressHook | None = None,
                                   timeline: Timeline | None = None) -> MigrateOutcome:
        tl = timeline or Timeline()
        uuid = instance.uuid
        inst_dir = self.layout.instance_dir(uuid)
        self._clear_leftover(uuid)
        dom = self.host.domain(uuid)
        state = self.host.state(dom)
        if state in (PowerState.PAUSED, PowerState.SUSPENDED):
            raise InvalidInstanceState(uuid=uuid, state=state.label, reason="resume it or shut it off before migrating")
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        disk_info = self.host.disk_info(xml, inst_dir)
        precopy.refuse_leftover(disk_info)
        self._check_flavor(instance, flavor, disk_info)
        was_running = state == PowerState.RUNNING
        connecting = tl.now()
        with self.mover.remote(dest) as rfs:
            shared = self.mover.is_shared(rfs)
            cache_needed = [] if shared else self.mover.backing_to_send(rfs, disk_info)
            if not shared:
                self.mover.check_space(rfs, dest, uuid, disk_info, cache_needed)
            tl.add(PhaseName.CONNECT, connecting, tl.now())
            if precopy.applies(self.config, was_running, shared, disk_info):
                log.info("migrating %s to %s with pre-copy", uuid, dest)
                run = precopy.PreCopy(self.host, self.mover, instance, dest, disk_info, cache_needed, xml, progress,
                                      tl)
                outcome = run.run(rfs, timeout, retry_interval)
                return replace(outcome, disk_info=self._as_sent(outcome.disk_info, shared))
            log.info("migrating %s to %s (%s storage)", uuid, dest, "shared" if shared else "local")
            if shared:  # before anything changes: the directory stays the one copy both hosts see
                sharing.mark(self.layout, uuid, self.config.host_name, dest)
            try:
                with tl.phase(PhaseName.SHUTDOWN):
                    self.host.power_off(instance, timeout, retry_interval)
            except BaseException:
                if shared:
                    sharing.unmark(self.layout, uuid, self.config.host_name)
                raise
            powered_off_at = time.time()
            sent: list[str] = []
            copies: list[CopyResult] = []
            try:
                write_atomic(self.layout.definition(uuid), xml)
                if not shared:
                    rfs.mkdir(uuid)
                    if cache_needed:
                        rfs.mkdir(CACHE_DIR)
                    copies = self._copy_instance(uuid, dest, disk_info, cache_needed, sent, progress, tl)
            except BaseException as e:
                restored = self._rollback(instance, dest, shared, was_running, sent)
                raise MigrationFailed(uuid=uuid, dest=dest, reason=str(e) or type(e).__name__,
                                      restored=restored) from e
        return MigrateOutcome(self._as_sent(disk_info, shared), copies, shared=shared, was_running=was_running,
                              powered_off_at=powered_off_at)

    def _as_sent(self, disk_info: list[DiskInfo], shared: bool) -> list[DiskInfo]:
        """The disks as the target has them: with backing = flatten, standalone qcow2 images."""
        if self.config.backing == "flatten" and not shared:
            return [replace(d, backing_file="", type="qcow2") if d.backing_file else d for d in disk_info]
        return disk_info

    def _check_flavor(self, instance: Instance, flavor: Flavor, disks: list[DiskInfo]) -> None:
        for disk in disks[:1]:
            current_gb = -(-disk.virt_disk_size // GiB)
            if flavor.root_gb and flavor.root_gb * GiB < disk.virt_disk_size:
                raise ResizeDown(flavor=flavor.name, disk=disk.target or disk.path, uuid=instance.uuid,
                                 current_gb=current_gb, wanted_gb=flavor.root_gb)
        if flavor.ephemeral_gb < instance.flavor.ephemeral_gb:
            raise ResizeDown(flavor=flavor.name, disk="ephemeral", uuid=instance.uuid,
                             current_gb=instance.flavor.ephemeral_gb, wanted_gb=flavor.ephemeral_gb)

    def _copy_instance(self, uuid: str, dest: str, disks: list[DiskInfo], cache_needed: list[str],
                       sent: list[str], progress: ProgressHook | None, tl: Timeline) -> list[CopyResult]:
        """Keep the directory as ``_resize`` and copy from there: backing files and disks, and
        the definition beside them (a few KiB, but its copy costs a login and a receiver start
        like a disk's)."""
        inst_dir, resize_dir = self.layout.instance_dir(uuid), self.layout.resize_dir(uuid)
        os.rename(inst_dir, resize_dir)
        definition = self.layout.definition(uuid)
        kept_definition = os.path.join(resize_dir, os.path.basename(definition))
        with Beside(lambda: self.mover.copy(kept_definition, dest, definition, progress, tl),
                    f"copy of {uuid}'s definition") as aside:
            copies = self.mover.copy_cache(cache_needed, dest, sent, progress, tl)
            for disk in disks:
                copies.append(self.mover.copy_disk(os.path.join(resize_dir, os.path.basename(disk.path)), dest,
                                                   disk, progress, tl))
        copies.append(aside.result())
        return copies

    def _clear_leftover(self, uuid: str) -> None:
        """Deal with a ``_resize`` directory an earlier, failed try left behind."""
        inst_dir, resize_dir = self.layout.instance_dir(uuid), self.layout.resize_dir(uuid)
        if not os.path.exists(resize_dir):
            return
        if os.path.exists(inst_dir):
            log.warning("removing %s left by an earlier failed migration", resize_dir)
            shutil.rmtree(resize_dir)
        else:  # the rename happened but was never undone: the data lives there
            os.rename(resize_dir, inst_dir)

    def _rollback(self, instance: Instance, dest: str, shared: bool, was_running: bool, sent: list[str]) -> str:
        """Undo a failed migration on both hosts; return how the source was left, for the message."""
        notes = []
        if shared:
            sharing.unmark(self.layout, instance.uuid, self.config.host_name)
        else:
            notes.append(self.mover.remove_on_dest(dest, [instance.uuid, *sent]))
            inst_dir, resize_dir = self.layout.instance_dir(instance.uuid), self.layout.resize_dir(instance.uuid)
            if os.path.exists(resize_dir) and not os.path.exists(inst_dir):
                os.rename(resize_dir, inst_dir)
        if was_running:
            try:
                self.host.power_on(instance)
                notes.insert(0, " and started again")
            except DriverError as e:
                notes.insert(0, f" but did not start again ({e})")
        return "".join(notes)

    # -- live migration ---------------------------------------------------------

    @_host_errors("live-migrate the instance")
    def live_migration(self, instance: Instance, dest: str, progress: ProgressHook | None = None,
                       timeline: Timeline | None = None) -> LiveOutcome:
        """Move the running ``instance`` to ``dest``'s libvirtd with its disks (see live.py)."""
        return live.LiveMigration(self.host, self.mover, instance, dest, progress, timeline).run()

    # -- migration: destination side ------------------------------------------

    @_host_errors("finish the migration")
    def finish_migration(self, migration: Migration, instance: Instance, disk_info: list[DiskInfo],
                         network_info: list[Vif], image_meta: dict, resize_instance: bool,
                         block_device_info: dict | None = None, power_on: bool = True,
                         timeline: Timeline | None = None) -> FinishOutcome:
        tl = timeline or Timeline()
        uuid = instance.uuid
        inst_dir = self.layout.instance_dir(uuid)
        try:
            with open(self.layout.definition(uuid)) as f:
                xml = f.read()
        except OSError as e:
            raise DriverError(reason=f"the copied domain definition of {uuid} is missing here: {e}") from None
        flavor = instance.flavor
        if any(d.overlay for d in disk_info):
            with tl.phase(PhaseName.COMMIT):
                precopy.fold_overlays(disk_info, self.runner)
        if resize_instance:
            with tl.phase(PhaseName.GROW):
                self._grow_disks(disk_info, flavor)
        with tl.phase(PhaseName.DEFINE):
            root = domain_xml.parse(xml)
            bridges.ensure(domain_xml.bridges(root), network_info, self.config.create_bridges,
                           self.config.host_name)
            new_xml = domain_xml.rewrite(xml, inst_dir, inst_dir, flavor.memory_mb, flavor.vcpus,
                                         {"name": flavor.name, "root_gb": flavor.root_gb,
                                          "ephemeral_gb": flavor.ephemeral_gb})
            dom = self.host.define(uuid, new_xml, "define the migrated domain")
        if not power_on:
            return FinishOutcome()
        with tl.phase(PhaseName.START):
            self.host.start(dom, uuid)
        return FinishOutcome(running_at=time.time())

    def _grow_disks(self, disks: list[DiskInfo], flavor: Flavor) -> None:
        wanted = {"disk": flavor.root_gb, "disk.local": flavor.ephemeral_gb}
        for disk in disks:
            gb = wanted.get(os.path.basename(disk.path), 0)
            if gb and gb * GiB > disk.virt_disk_size:
                log.info("growing %s to %d GiB", disk.path, gb)
                images.resize(disk.path, disk.type, gb * GiB, self.runner)

    # -- confirm and revert ------------------------------------------------------

    @_host_errors("confirm the migration")
    def confirm_migration(self, migration: Migration, instance: Instance, network_info: list[Vif]) -> None:
        """Drop the kept ``_resize`` copy and the source's definition. On shared storage there is no
        kept copy: only the domain goes, the directory is the destination's now."""
        dom = self.host.domain_or_none(instance.uuid)
        if dom is not None and dom.isActive():
            raise InvalidInstanceState(uuid=instance.uuid, state="running here",
                                       reason="the source copy is running; refusing to remove it")
        resize_dir = self.layout.resize_dir(instance.uuid)
        if os.path.exists(resize_dir):
            for attempt in Retrying(stop=stop_after_attempt(5), wait=wait_fixed(1), sleep=self.sleep, reraise=True):
                with attempt:
                    shutil.rmtree(resize_dir)
        if dom is not None:
            self.host.call(instance.uuid, "undefine the source copy", dom.undefine)
        sharing.unmark(self.layout, instance.uuid, self.config.host_name)

    @_host_errors("revert the migration")
    def finish_revert_migration(self, instance: Instance, network_info: list[Vif], migration: Migration,
                                block_device_info: dict | None = None, power_on: bool = True) -> None:
        """Put the kept copy back and define and start from it. On shared storage (a marker, no
        ``_resize``) the directory never moved: define and start from it as it is."""
        uuid = instance.uuid
        inst_dir, resize_dir = self.layout.instance_dir(uuid), self.layout.resize_dir(uuid)
        shared = sharing.source_host(self.layout, uuid) is not None
        if os.path.exists(resize_dir) and not shared:
            if os.path.exists(inst_dir):
                shutil.rmtree(inst_dir)
            os.rename(resize_dir, inst_dir)
        dom = self.host.domain_or_none(uuid)
        if dom is None:
            try:
                with open(self.layout.definition(uuid)) as f:
                    xml = f.read()
            except OSError as e:
                raise DriverError(reason=f"instance {uuid} is not defined here and its saved "
                                         f"definition cannot be read: {e}") from None
            dom = self.host.define(uuid, xml, "define it again")
        if power_on:
            self.host.start(dom, uuid)
        sharing.unmark(self.layout, uuid, self.config.host_name)

    @_host_errors("destroy the instance")
    def destroy(self, instance: Instance, network_info: list[Vif], destroy_disks: bool = True) -> None:
        """Stop and undefine; with ``destroy_disks``, remove the directory too, unless a migration
        over shared storage still shares it (its marker, whichever host wrote it): then the other
        host may run from it, and the files stay until that migration is confirmed or reverted."""
        dom = self.host.domain_or_none(instance.uuid)
        if dom is not None:
            if dom.isActive():
                self.host.call(instance.uuid, "stop it", dom.destroy)
            self.host.call(instance.uuid, "undefine it", dom.undefine)
        if not destroy_disks:
            return
        inst_dir = self.layout.instance_dir(instance.uuid)
        owner = sharing.source_host(self.layout, instance.uuid)
        if owner is not None:
            log.warning("destroy of %s keeps %s: it is on shared storage and %s's migration of it has "
                        "not been confirmed or reverted (%s)", instance.uuid, inst_dir, owner, sharing.MARKER)
            return
        shutil.rmtree(inst_dir, ignore_errors=True)
