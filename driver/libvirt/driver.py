"""The libvirt/KVM driver: cold migration with real disk copies.

Source side: check the flavor and the target, power off, keep the instance
directory as ``<dir>_resize``, copy every disk (and backing files the
target's image cache lacks) with coldferry's copier. Any failure puts the
directory back, removes the target's partial copy and restarts the
instance if it was running. Destination side: grow disks, rewrite the
domain for this host, make sure its bridges exist, define and start.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid as uuidlib
from dataclasses import replace
from typing import Any, Callable

import libvirt
from tenacity import Retrying, stop_after_attempt, wait_fixed

import transfer
from transfer.progress import Progress
from transfer.remotefs import RemoteFS
from transfer.result import CopyResult
from transfer.units import format_size

from ..base import ComputeDriver
from ..errors import (DriverError, ImageError, InstanceNotFound, InsufficientSpace, InvalidInstanceState,
                      MigrationFailed, PowerOffFailed, ResizeDown, StartFailed)
from ..model import DiskInfo, Flavor, HostResources, Instance, Migration, PowerState, Vif
from . import bridges, domain_xml, images, live, power, precopy
from .config import DriverConfig

log = logging.getLogger(__name__)

GiB = 1 << 30
XML_FILE = "domain.xml"
CACHE_DIR = "_base"
RESIZE_SUFFIX = "_resize"

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: PowerState.NOSTATE, libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING, libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.SHUTDOWN, libvirt.VIR_DOMAIN_SHUTOFF: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.CRASHED, libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.SUSPENDED,
}

ProgressHook = Callable[[str, Progress], None]


class LibvirtDriver(ComputeDriver):
    hypervisor_type = "QEMU"

    def __init__(self, config: DriverConfig, connect: Callable[[str], Any] = libvirt.open,
                 runner: images.Runner = images.run, remote_fs: Callable[..., RemoteFS] = RemoteFS,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._connect = connect
        self._conn: Any = None
        self.runner = runner
        self.remote_fs = remote_fs
        self.sleep = sleep
        self.clock = clock
        #: Called with (file name, Progress) while disks are copied.
        self.on_progress: ProgressHook | None = None
        #: Figures of the last copy per instance uuid: CopyResults, shared, downtime start.
        self.last_transfer: dict[str, dict[str, Any]] = {}

    # -- libvirt plumbing ---------------------------------------------------

    @property
    def conn(self) -> Any:
        if self._conn is None or not self._conn.isAlive():
            try:
                self._conn = self._connect(self.config.libvirt_uri)
            except libvirt.libvirtError as e:
                raise DriverError(reason=f"cannot connect to libvirt at {self.config.libvirt_uri}: "
                                         f"{e.get_error_message()}") from None
        return self._conn

    def _domain(self, uuid: str) -> Any:
        try:
            return self.conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise InstanceNotFound(uuid=uuid, host=self.config.host_name) from None
            raise DriverError(reason=f"libvirt lookup of {uuid}: {e.get_error_message()}") from None

    def _state(self, dom: Any) -> PowerState:
        return _STATES.get(dom.state()[0], PowerState.NOSTATE)

    def _to_instance(self, dom: Any) -> Instance:
        root = domain_xml.parse(dom.XMLDesc(0))
        meta = domain_xml.flavor_metadata(root)
        disks = domain_xml.disks(root)
        root_gb = int(meta.get("root_gb", 0))
        if not meta and disks:
            try:
                root_gb = -(-images.info(disks[0].path, self.runner).virtual_size // GiB)
            except ImageError:
                root_gb = 0
        flavor = Flavor(meta.get("name", "custom"), domain_xml.vcpus(root), domain_xml.memory_mb(root),
                        root_gb, int(meta.get("ephemeral_gb", 0)))
        return Instance(dom.UUIDString(), dom.name(), flavor, self.config.host_name, self._state(dom))

    def instance_dir(self, uuid: str) -> str:
        return os.path.join(self.config.instances_path, uuid)

    # -- inventory and power ------------------------------------------------

    def list_instances(self) -> list[Instance]:
        return [self._to_instance(d) for d in self.conn.listAllDomains()]

    def get_instance(self, uuid: str) -> Instance:
        return self._to_instance(self._domain(uuid))

    def host_resources(self) -> HostResources:
        conn = self.conn
        _model, mem_mb, cpus, *_ = conn.getInfo()
        caps = domain_xml.parse(conn.getCapabilities())
        arch = caps.findtext("./host/cpu/arch") or os.uname().machine
        doms = [self._to_instance(d) for d in conn.listAllDomains()]
        st = os.statvfs(self.config.instances_path)
        return HostResources(
            hostname=self.config.host_name, arch=arch, hypervisor_type=self.hypervisor_type,
            hypervisor_version=conn.getVersion(), vcpus=cpus, vcpus_used=sum(i.flavor.vcpus for i in doms),
            memory_mb=mem_mb, memory_mb_used=sum(i.flavor.memory_mb for i in doms),
            disk_gb=st.f_blocks * st.f_frsize // GiB, disk_gb_used=(st.f_blocks - st.f_bavail) * st.f_frsize // GiB,
            instances=len(doms))

    def power_on(self, instance: Instance) -> None:
        dom = self._domain(instance.uuid)
        if not dom.isActive():
            try:
                dom.create()
            except libvirt.libvirtError as e:
                raise StartFailed(uuid=instance.uuid, host=self.config.host_name, reason=e.get_error_message()) from None
        self._wait_running(dom, instance.uuid)

    def power_off(self, instance: Instance, timeout: int = 0, retry_interval: int = 0) -> None:
        dom = self._domain(instance.uuid)

        def signal() -> None:
            try:
                dom.shutdown()
            except libvirt.libvirtError as e:
                if dom.isActive():  # not just a guest that stopped a moment ago
                    raise PowerOffFailed(uuid=instance.uuid, reason=e.get_error_message()) from None

        if timeout and power.clean_shutdown(lambda: not dom.isActive(), signal, timeout,
                                            retry_interval, self.sleep):
            return
        if dom.isActive():
            log.info("instance %s did not shut down within %d s; destroying it", instance.uuid, timeout)
            try:
                dom.destroy()
            except libvirt.libvirtError as e:
                if dom.isActive():
                    raise PowerOffFailed(uuid=instance.uuid, reason=e.get_error_message()) from None

    def _wait_running(self, dom: Any, uuid: str) -> None:
        deadline = self.clock() + self.config.start_timeout
        while self._state(dom) != PowerState.RUNNING:
            if self.clock() >= deadline:
                raise StartFailed(uuid=uuid, host=self.config.host_name,
                                  reason=f"still {self._state(dom).name} after {self.config.start_timeout:.0f} s")
            self.sleep(0.2)

    # -- migration: source side ---------------------------------------------

    def migrate_disk_and_power_off(self, instance: Instance, dest: str, flavor: Flavor, network_info: list[Vif],
                                   block_device_info: dict | None = None, timeout: int = 0,
                                   retry_interval: int = 0) -> str:
        inst_dir = self.instance_dir(instance.uuid)
        self._clear_leftover(inst_dir, inst_dir + RESIZE_SUFFIX)
        dom = self._domain(instance.uuid)
        state = self._state(dom)
        if state in (PowerState.PAUSED, PowerState.SUSPENDED):
            raise InvalidInstanceState(uuid=instance.uuid, state=state.name.lower(),
                                       reason="resume it or shut it off before migrating")
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        disk_info = self._disk_info(xml, inst_dir)
        precopy.refuse_leftover(disk_info)
        self._check_flavor(instance, flavor, disk_info)
        was_running = state == PowerState.RUNNING
        with self.remote_fs(self._endpoint(dest, "/"), self.config.instances_path) as rfs:
            shared = self._is_shared(rfs)
            cache_needed = [] if shared else self._backing_to_send(rfs, disk_info)
            if not shared:
                self._check_space(rfs, dest, instance, disk_info, cache_needed)
            stats: dict[str, Any] = {"shared": shared, "precopy": False, "powered_off_at": None, "copies": [],
                                     "bytes_before_power_off": 0, "bytes_after_power_off": 0}
            self.last_transfer[instance.uuid] = stats
            if precopy.applies(self, was_running, shared, disk_info):
                log.info("migrating %s to %s with pre-copy", instance.uuid, dest)
                stats["precopy"] = True
                run = precopy.PreCopy(self, instance, dest, disk_info, cache_needed, xml, stats)
                return DiskInfo.dumps(self._as_sent(run.run(rfs, timeout, retry_interval), shared))
            log.info("migrating %s to %s (%s storage)", instance.uuid, dest, "shared" if shared else "local")
            self.power_off(instance, timeout, retry_interval)
            stats["powered_off_at"] = time.time()
            sent: list[str] = []
            try:
                _write(os.path.join(inst_dir, XML_FILE), xml)
                if not shared:
                    rfs.mkdir(instance.uuid)
                    if cache_needed:
                        rfs.mkdir(CACHE_DIR)
                    self._copy_instance(instance.uuid, inst_dir, dest, disk_info, cache_needed, sent, stats)
            except BaseException as e:
                restored = self._rollback(instance, dest, inst_dir, shared, was_running, sent)
                raise MigrationFailed(uuid=instance.uuid, dest=dest, reason=str(e) or type(e).__name__,
                                      restored=restored) from e
            stats["bytes_after_power_off"] = sum(c.sent for c in stats["copies"])
        return DiskInfo.dumps(self._as_sent(disk_info, shared))

    def _as_sent(self, disk_info: list[DiskInfo], shared: bool) -> list[DiskInfo]:
        """The disks as the target has them: with backing = flatten, standalone qcow2 images."""
        if self.config.backing == "flatten" and not shared:
            return [replace(d, backing_file="", type="qcow2") if d.backing_file else d for d in disk_info]
        return disk_info

    def _disk_info(self, xml: str, inst_dir: str) -> list[DiskInfo]:
        out = []
        for disk in domain_xml.disks(domain_xml.parse(xml)):
            if os.path.dirname(disk.path) != inst_dir:
                raise ImageError(path=disk.path, reason=f"not in the instance directory {inst_dir}; "
                                                         "only disks there can be migrated")
            info = images.info(disk.path, self.runner)
            out.append(DiskInfo(type=info.format, path=disk.path, virt_disk_size=info.virtual_size,
                                backing_file=info.backing_file, disk_size=info.actual_size,
                                over_committed_disk_size=max(0, info.virtual_size - info.actual_size),
                                target=disk.target))
        return out

    def _check_flavor(self, instance: Instance, flavor: Flavor, disks: list[DiskInfo]) -> None:
        for disk in disks[:1]:
            current_gb = -(-disk.virt_disk_size // GiB)
            if flavor.root_gb and flavor.root_gb * GiB < disk.virt_disk_size:
                raise ResizeDown(flavor=flavor.name, disk=disk.target or disk.path, uuid=instance.uuid,
                                 current_gb=current_gb, wanted_gb=flavor.root_gb)
        if flavor.ephemeral_gb < instance.flavor.ephemeral_gb:
            raise ResizeDown(flavor=flavor.name, disk="ephemeral", uuid=instance.uuid,
                             current_gb=instance.flavor.ephemeral_gb, wanted_gb=flavor.ephemeral_gb)

    def _is_shared(self, rfs: RemoteFS) -> bool:
        """Write a marker through the target and look for it here (Nova's test)."""
        marker = f".coldferry-shared-{uuidlib.uuid4().hex}"
        rfs.touch(marker)
        try:
            return os.path.exists(os.path.join(self.config.instances_path, marker))
        finally:
            rfs.remove(marker)

    def _backing_to_send(self, rfs: RemoteFS, disks: list[DiskInfo]) -> list[str]:
        """Backing files the target's image cache lacks (only with backing = send)."""
        if self.config.backing != "send":
            return []
        cache = os.path.join(self.config.instances_path, CACHE_DIR)
        needed: list[str] = []
        for disk in disks:
            for layer in images.chain(disk.path, self.runner)[1:]:
                if os.path.dirname(layer.path) != cache:
                    raise ImageError(path=layer.path, reason=f"backing file outside the image cache {cache}; "
                                                              "set backing = flatten to migrate it")
                name = f"{CACHE_DIR}/{os.path.basename(layer.path)}"
                if layer.path in needed:
                    continue
                if not rfs.exists(name):
                    needed.append(layer.path)
                elif rfs.digest(name) != transfer.file_digest(layer.path):
                    raise ImageError(path=layer.path, reason="the target's image cache holds a different file "
                                                              "under this name; remove it there or rename the base")
        return needed

    def _check_space(self, rfs: RemoteFS, dest: str, instance: Instance, disks: list[DiskInfo],
                     cache_needed: list[str]) -> None:
        flatten = self.config.backing == "flatten"
        needed = sum(sum(layer.actual_size for layer in images.chain(d.path, self.runner))
                     if flatten and d.backing_file else d.disk_size for d in disks)
        needed += sum(os.stat(p).st_blocks * 512 for p in cache_needed)
        free = rfs.free()
        if needed > free:
            raise InsufficientSpace(host=dest, path=self.config.instances_path, uuid=instance.uuid,
                                    free_h=format_size(free), needed_h=format_size(needed))

    def _copy_instance(self, uuid: str, inst_dir: str, dest: str, disks: list[DiskInfo], cache_needed: list[str],
                       sent: list[str], stats: dict[str, Any]) -> None:
        resize_dir = inst_dir + RESIZE_SUFFIX
        os.rename(inst_dir, resize_dir)
        for path in cache_needed:
            name = f"{CACHE_DIR}/{os.path.basename(path)}"
            sent.append(name)  # before the copy: a failed copy leaves partial files to remove
            stats["copies"].append(self._copy(path, dest, os.path.join(self.config.instances_path, name)))
        for disk in disks:
            stats["copies"].append(self._copy_disk(os.path.join(resize_dir, os.path.basename(disk.path)), dest, disk))
        stats["copies"].append(self._copy(os.path.join(resize_dir, XML_FILE), dest,
                                          os.path.join(inst_dir, XML_FILE)))

    def _copy_disk(self, src: str, dest: str, disk: DiskInfo) -> CopyResult:
        """Copy one disk to its path on ``dest``; merged with its backing chain first with backing = flatten."""
        if disk.backing_file and self.config.backing == "flatten":
            flat = src + ".flat"
            images.flatten(src, flat, self.runner)
            try:
                return self._copy(flat, dest, disk.path)
            finally:
                os.unlink(flat)
        return self._copy(src, dest, disk.path)

    def _clear_leftover(self, inst_dir: str, resize_dir: str) -> None:
        """Deal with a ``_resize`` directory an earlier, failed try left behind."""
        if not os.path.exists(resize_dir):
            return
        if os.path.exists(inst_dir):
            log.warning("removing %s left by an earlier failed migration", resize_dir)
            shutil.rmtree(resize_dir)
        else:  # the rename happened but was never undone: the data lives there
            os.rename(resize_dir, inst_dir)

    def _copy(self, src: str, dest: str, dest_path: str) -> CopyResult:
        ep = self._endpoint(dest, dest_path)
        name = os.path.basename(dest_path)
        hook = self.on_progress
        bind = getattr(hook, "bind", None)
        if bind is not None:  # the copier reports from its own threads: pin this job's hook now
            hook = bind()
        progress = (lambda p: hook(name, p)) if hook else None
        c = self.config
        bwlimit = c.transfer_bwlimit or None
        if c.transfer_method == "rsync":
            return transfer.rsync_copy(src, ep, bwlimit=bwlimit, progress=progress, overwrite=True)
        return transfer.stream_copy(src, ep, streams=c.transfer_streams, channel=c.transfer_channel,
                                    compress=c.transfer_compress, retries=c.transfer_retries, bwlimit=bwlimit,
                                    fsync=c.transfer_fsync, overwrite=True, progress=progress, sleep=self.sleep)

    def _endpoint(self, host: str, path: str) -> transfer.Endpoint:
        c = self.config
        return transfer.Endpoint(host=host, path=path, user=c.ssh_user, port=c.ssh_port, identity=c.ssh_identity,
                                 known_hosts=c.ssh_known_hosts, remote_command=c.remote_command)

    def _rollback(self, instance: Instance, dest: str, inst_dir: str, shared: bool, was_running: bool,
                  sent: list[str]) -> str:
        """Undo a failed migration on both hosts; return how the source was left, for the message."""
        notes = []
        if not shared:
            notes.append(self._remove_on_dest(dest, [instance.uuid, *sent]))
            resize_dir = inst_dir + RESIZE_SUFFIX
            if os.path.exists(resize_dir) and not os.path.exists(inst_dir):
                os.rename(resize_dir, inst_dir)
        if was_running:
            try:
                self.power_on(instance)
                notes.insert(0, " and started again")
            except DriverError as e:
                notes.insert(0, f" but did not start again ({e})")
        return "".join(notes)

    def _remove_on_dest(self, dest: str, names: list[str]) -> str:
        """Remove ``names`` (under instances_path) and their partial copies on ``dest``.

        Returns "" or, when that failed, a note for the error message saying what to remove by hand.
        """
        try:
            with self.remote_fs(self._endpoint(dest, "/"), self.config.instances_path) as rfs:
                for name in names:
                    for leftover in (name, *transfer.partial_names(name)):
                        rfs.remove(leftover)
        except (transfer.TransferError, OSError) as e:
            log.error("could not remove the partial copy on %s: %s", dest, e)
            return f"; remove {', '.join(os.path.join(self.config.instances_path, n) for n in names)} on {dest} by hand"
        return ""

    # -- live migration ---------------------------------------------------------

    def live_migration(self, instance: Instance, dest: str) -> dict:
        """Move the running ``instance`` to ``dest``'s libvirtd with its disks (see live.py)."""
        return live.migrate(self, instance, dest)

    # -- migration: destination side ------------------------------------------

    def finish_migration(self, migration: Migration, instance: Instance, disk_info: str, network_info: list[Vif],
                         image_meta: dict, resize_instance: bool, block_device_info: dict | None = None,
                         power_on: bool = True) -> None:
        inst_dir = self.instance_dir(instance.uuid)
        try:
            with open(os.path.join(inst_dir, XML_FILE)) as f:
                xml = f.read()
        except OSError as e:
            raise DriverError(reason=f"the copied domain definition of {instance.uuid} is missing here: {e}") from None
        flavor = instance.flavor
        disks = DiskInfo.loads(disk_info)
        precopy.fold_overlays(disks, self.runner)
        if resize_instance:
            self._grow_disks(disks, flavor)
        root = domain_xml.parse(xml)
        bridges.ensure(domain_xml.bridges(root), network_info, self.config.create_bridges, self.config.host_name)
        new_xml = domain_xml.rewrite(xml, inst_dir, inst_dir, flavor.memory_mb, flavor.vcpus,
                                     {"name": flavor.name, "root_gb": flavor.root_gb,
                                      "ephemeral_gb": flavor.ephemeral_gb})
        try:
            dom = self.conn.defineXML(new_xml)
        except libvirt.libvirtError as e:
            raise DriverError(reason=f"libvirt refused the domain of {instance.uuid}: {e.get_error_message()}") from None
        if power_on:
            try:
                dom.create()
            except libvirt.libvirtError as e:
                raise StartFailed(uuid=instance.uuid, host=self.config.host_name, reason=e.get_error_message()) from None
            self._wait_running(dom, instance.uuid)

    def _grow_disks(self, disks: list[DiskInfo], flavor: Flavor) -> None:
        wanted = {"disk": flavor.root_gb, "disk.local": flavor.ephemeral_gb}
        for disk in disks:
            gb = wanted.get(os.path.basename(disk.path), 0)
            if gb and gb * GiB > disk.virt_disk_size:
                log.info("growing %s to %d GiB", disk.path, gb)
                images.resize(disk.path, disk.type, gb * GiB, self.runner)

    # -- confirm and revert ------------------------------------------------------

    def confirm_migration(self, migration: Migration, instance: Instance, network_info: list[Vif]) -> None:
        try:
            dom = self._domain(instance.uuid)
        except InstanceNotFound:
            dom = None
        if dom is not None and dom.isActive():
            raise InvalidInstanceState(uuid=instance.uuid, state="running here",
                                       reason="the source copy is running; refusing to remove it")
        resize_dir = self.instance_dir(instance.uuid) + RESIZE_SUFFIX
        if os.path.exists(resize_dir):
            for attempt in Retrying(stop=stop_after_attempt(5), wait=wait_fixed(1), sleep=self.sleep, reraise=True):
                with attempt:
                    shutil.rmtree(resize_dir)
        if dom is not None:
            self._libvirt(instance.uuid, "undefine the source copy", dom.undefine)

    def finish_revert_migration(self, instance: Instance, network_info: list[Vif], migration: Migration,
                                block_device_info: dict | None = None, power_on: bool = True) -> None:
        inst_dir = self.instance_dir(instance.uuid)
        resize_dir = inst_dir + RESIZE_SUFFIX
        if os.path.exists(resize_dir):
            if os.path.exists(inst_dir):
                shutil.rmtree(inst_dir)
            os.rename(resize_dir, inst_dir)
        try:
            dom = self._domain(instance.uuid)
        except InstanceNotFound:
            try:
                with open(os.path.join(inst_dir, XML_FILE)) as f:
                    xml = f.read()
            except OSError as e:
                raise DriverError(reason=f"instance {instance.uuid} is not defined here and its saved "
                                         f"definition cannot be read: {e}") from None
            dom = self._libvirt(instance.uuid, "define it again", self.conn.defineXML, xml)
        if power_on and not dom.isActive():
            try:
                dom.create()
            except libvirt.libvirtError as e:
                raise StartFailed(uuid=instance.uuid, host=self.config.host_name, reason=e.get_error_message()) from None
            self._wait_running(dom, instance.uuid)

    def destroy(self, instance: Instance, network_info: list[Vif], destroy_disks: bool = True) -> None:
        try:
            dom = self._domain(instance.uuid)
        except InstanceNotFound:
            dom = None
        if dom is not None:
            if dom.isActive():
                self._libvirt(instance.uuid, "stop it", dom.destroy)
            self._libvirt(instance.uuid, "undefine it", dom.undefine)
        if destroy_disks:
            shutil.rmtree(self.instance_dir(instance.uuid), ignore_errors=True)

    def _libvirt(self, uuid: str, what: str, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except libvirt.libvirtError as e:
            raise DriverError(reason=f"could not {what} (instance {uuid}): {e.get_error_message()}") from None


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
