"""Pre-copy: copy a running instance's disks before it is shut down (seed 003's sequence on KVM).

Source side, in order:

1. a disk-only external snapshot (no metadata, atomic) puts a qcow2 overlay
   ``<disk>.precopy`` next to each disk; the guest now writes there and the
   disks below are read-only;
2. copy those base images (and backing files the target's image cache lacks)
   while the guest keeps running;
3. power off (clean, then forced), as without pre-copy;
4. copy only the overlays: what the guest wrote during step 2;
5. merge each overlay back into its disk (``qemu-img commit``), define the
   domain again as it was and keep the directory as ``<dir>_resize``.

The domain XML (as it was before the snapshot) goes with the bases in step 2.

Downtime then grows with what the guest wrote during the copy, not with the
disk's size. Every failure removes the partial copy on the target and merges
the overlays back: while the guest runs with a libvirt active block commit
and pivot, once it is off with ``qemu-img commit``; the domain is defined
again with its original XML and started if it ran. A revert afterwards finds
the source's disks and definition exactly as they were before the migration.

Destination side (``fold_overlays``): each overlay arrived next to its copied
disk and points at it by the same absolute path (instances_path is the same
on every host); it is committed into that disk before the domain is defined.
"""

from __future__ import annotations

import logging
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from typing import Any, Callable

import libvirt

from transfer.result import CopyResult

from ..errors import DriverError, ImageError, MigrationFailed
from ..model import DiskInfo, Instance, MigrateOutcome, PhaseName, ProgressHook, Timeline
from . import domain_xml, images
from .config import DriverConfig
from .host import LibvirtHost, libvirt_reason
from .layout import CACHE_DIR, write_atomic
from .mover import Beside, DiskMover

log = logging.getLogger(__name__)

OVERLAY_SUFFIX = ".precopy"
SNAPSHOT_FLAGS = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                  | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
# libvirt's answers to a pivot asked for before the commit job is ready: try again shortly.
_NOT_READY = (libvirt.VIR_ERR_BLOCK_COPY_ACTIVE, libvirt.VIR_ERR_OPERATION_INVALID)
POLL = 0.2


def overlay_path(disk_path: str) -> str:
    return disk_path + OVERLAY_SUFFIX


def refuse_leftover(disks: list[DiskInfo]) -> None:
    """Refuse to migrate a domain still running on an overlay an interrupted pre-copy left.

    :raises ImageError: naming the overlay and how to merge it back.
    """
    for d in disks:
        if d.path.endswith(OVERLAY_SUFFIX):
            raise ImageError(path=d.path, reason="a pre-copy overlay left by an interrupted migration is still in "
                                                 f"use; merge it back first (virsh blockcommit DOMAIN {d.target} "
                                                 "--active --pivot --delete while it runs)")


def applies(config: DriverConfig, was_running: bool, shared: bool, disks: list[DiskInfo]) -> bool:
    """Whether to pre-copy: switched on, a running guest, local storage, enough data to matter."""
    data = sum(d.disk_size for d in disks)
    return config.precopy and was_running and not shared and bool(disks) and data >= config.precopy_threshold


def snapshot_xml(disks: list[DiskInfo], domain: str) -> str:
    """The disk-only snapshot: an external qcow2 overlay for each migrated disk, none for the others
    (CD-ROMs and other read-only devices cannot take one)."""
    snap = ET.Element("domainsnapshot")
    ET.SubElement(snap, "name").text = "coldferry-precopy"
    ET.SubElement(snap, "description").text = "coldferry pre-copy overlay; merged back after the copy"
    node = ET.SubElement(snap, "disks")
    migrated = {d.target for d in disks}
    for d in disks:
        disk = ET.SubElement(node, "disk", name=d.target, snapshot="external")
        ET.SubElement(disk, "driver", type="qcow2")
        ET.SubElement(disk, "source", file=overlay_path(d.path))
    for dev in domain_xml.parse(domain).findall("./devices/disk/target"):
        if dev.get("dev") and dev.get("dev") not in migrated:
            ET.SubElement(node, "disk", name=dev.get("dev", ""), snapshot="no")
    return ET.tostring(snap, encoding="unicode")


class PreCopy:
    """One pre-copy migration of one running instance; ``run`` does it all or undoes it all.

    :param host: the source host's libvirtd (domain, power, definitions).
    :param mover: copies to ``dest`` and removes partial copies there.
    :param xml: the domain's inactive XML before the snapshot: defined again at the end.
    :param progress: called as files are copied.
    :param timeline: records snapshot, precopy (each file copied while the guest runs),
        shutdown, copy (each overlay) and merge.
    """

    def __init__(self, host: LibvirtHost, mover: DiskMover, instance: Instance, dest: str, disks: list[DiskInfo],
                 cache_needed: list[str], xml: str, progress: ProgressHook | None = None,
                 timeline: Timeline | None = None) -> None:
        self.host = host
        self.mover = mover
        self.instance = instance
        self.uuid = instance.uuid
        self.dest = dest
        self.disks = disks
        self.cache_needed = cache_needed
        self.xml = xml
        self.progress = progress
        self.timeline = timeline or Timeline()
        self.definition = host.layout.definition(instance.uuid)
        self.inst_dir = host.layout.instance_dir(instance.uuid)
        self.resize_dir = host.layout.resize_dir(instance.uuid)
        self.sent: list[str] = []        # names under instances_path on the target, for the clean-up
        self.overlays: list[DiskInfo] = []  # disks whose overlay is in use and not merged back yet

    # -- the sequence --------------------------------------------------------------

    def run(self, rfs: Any, timeout: int, retry_interval: int) -> MigrateOutcome:
        """Snapshot, copy bases, power off, copy overlays, merge back; the disks for the target
        (each with its overlay) and the copies.

        :raises MigrationFailed: with the source restored (running on its own disks again).
        """
        dom = self.host.domain(self.uuid)
        tl = self.timeline
        try:
            write_atomic(self.definition, self.xml)
            rfs.mkdir(self.uuid)
            if self.cache_needed:
                rfs.mkdir(CACHE_DIR)
            with tl.phase(PhaseName.SNAPSHOT):
                self._snapshot(dom)
            log.info("pre-copy of %s: copying %d disk(s) while it runs", self.uuid, len(self.disks))
            # The definition is the one from before the snapshot: it can go now, not during the downtime,
            # beside the bases.
            with Beside(lambda: self._copy_file(self.definition, PhaseName.PRECOPY),
                        f"copy of {self.uuid}'s definition") as aside:
                bases = self._copy_bases()
            before = [aside.result(), *bases]
            with tl.phase(PhaseName.SHUTDOWN):
                self.host.power_off(self.instance, timeout, retry_interval)
            off = time.time()
            after = [self._copy_file(overlay_path(d.path), PhaseName.COPY) for d in self.overlays]
            copied_at = time.time()
            copied = [replace(d, overlay=overlay_path(d.path)) for d in self.overlays]
            with tl.phase(PhaseName.MERGE):
                self._merge_offline()
                self._define(self.xml)
                os.rename(self.inst_dir, self.resize_dir)
            log.info("pre-copy of %s after power-off: overlays copied in %.2f s, merged back in %.2f s", self.uuid,
                     copied_at - off, time.time() - copied_at)
        except BaseException as e:
            log.exception("pre-copy migration of %s to %s failed; restoring the source", self.uuid, self.dest)
            restored = self.rollback(dom)
            raise MigrationFailed(uuid=self.uuid, dest=self.dest, reason=str(e) or type(e).__name__,
                                  restored=restored) from e
        outcome = MigrateOutcome(copied, before + after, shared=False, precopy=True, was_running=True,
                                 powered_off_at=off, bytes_before_power_off=sum(c.sent for c in before))
        log.info("pre-copy of %s done: %d bytes before power-off, %d after", self.uuid,
                 outcome.bytes_before_power_off, outcome.bytes_after_power_off)
        return outcome

    def _snapshot(self, dom: Any) -> None:
        for d in self.disks:
            if os.path.lexists(overlay_path(d.path)):
                raise DriverError(reason=f"{overlay_path(d.path)} exists (left by an interrupted pre-copy?); "
                                         "remove it if no domain uses it, or set precopy = false")
        try:
            dom.snapshotCreateXML(snapshot_xml(self.disks, dom.XMLDesc(0)), SNAPSHOT_FLAGS)
        except libvirt.libvirtError as e:
            # ATOMIC: libvirt changed nothing, but an overlay file it made may be left.
            for d in self.disks:
                _unlink(overlay_path(d.path))
            raise DriverError(reason=f"disk-only snapshot of {self.uuid} failed: {e.get_error_message()} "
                                     "(set precopy = false in the driver configuration to migrate "
                                     "without pre-copy)") from None
        self.overlays = list(self.disks)

    def _copy_bases(self) -> list[CopyResult]:
        tl, running = self.timeline, PhaseName.PRECOPY
        out = self.mover.copy_cache(self.cache_needed, self.dest, self.sent, self.progress, tl, running)
        for d in self.disks:
            out.append(self.mover.copy_disk(d.path, self.dest, d, self.progress, tl, running))
        return out

    def _copy_file(self, path: str, phase: PhaseName) -> CopyResult:
        """Copy ``path`` to the same path on the target (it is under instances_path on both)."""
        self.sent.append(self.host.layout.relative(path))
        return self.mover.copy(path, self.dest, path, self.progress, self.timeline, phase)

    # -- merging back ------------------------------------------------------------------

    def _merge_offline(self) -> None:
        """The guest is off: commit each overlay into its disk and remove it."""
        while self.overlays:
            d = self.overlays[0]
            commit_offline(overlay_path(d.path), self.host.runner)
            self.overlays.pop(0)

    def _merge_running(self, dom: Any) -> None:
        """The guest runs: libvirt commits each overlay into its disk and pivots back to it."""
        while self.overlays:
            d = self.overlays[0]
            commit_active(dom, d.target, self.host.config.precopy_job_timeout, self.host.clock, self.host.sleep)
            _unlink(overlay_path(d.path))
            self.overlays.pop(0)
        live = {x.target: x.path for x in domain_xml.disks(domain_xml.parse(dom.XMLDesc(0)))}
        wrong = [f"{t}: {live.get(t)}" for t, p in ((d.target, d.path) for d in self.disks) if live.get(t) != p]
        if wrong:
            raise DriverError(reason=f"after the block commit the domain still uses {', '.join(wrong)}")

    def _define(self, xml: str) -> None:
        self.host.define(self.uuid, xml, "define it again with its own disks")

    # -- undoing --------------------------------------------------------------------

    def rollback(self, dom: Any) -> str:
        """Undo a failed pre-copy on both hosts; how the source was left, for the message."""
        notes = [self.mover.remove_on_dest(self.dest, [self.uuid, *self.sent])]
        if os.path.exists(self.resize_dir) and not os.path.exists(self.inst_dir):
            os.rename(self.resize_dir, self.inst_dir)
        merged = True
        if self.overlays:
            try:
                if dom.isActive():
                    self._merge_running(dom)
                else:
                    self._merge_offline()
            except (DriverError, libvirt.libvirtError, OSError) as e:
                merged = False
                log.error("could not merge the pre-copy overlays of %s back: %s", self.uuid, e)
                left = ", ".join(overlay_path(d.path) for d in self.overlays)
                notes.append(f"; its disks still run on the overlays {left} (a consistent chain): merge them "
                             f"back by hand ({libvirt_reason(e)})")
        if merged:
            try:
                self._define(self.xml)
            except DriverError as e:
                notes.append(f"; {e}")
        if dom.isActive():
            notes.insert(0, " (it kept running)")
        else:  # pre-copy only runs for a running guest: it must run again
            try:
                self.host.power_on(self.instance)
                notes.insert(0, " and started again")
            except DriverError as e:
                notes.insert(0, f" but did not start again ({e})")
        return "".join(notes)


# -- block commits ---------------------------------------------------------------------


def commit_offline(overlay: str, runner: images.Runner) -> None:
    """Commit ``overlay`` into its backing file and remove it (the domain is off).

    ``-d``: the overlay is removed afterwards, so emptying it would be wasted writes.
    """
    runner(["qemu-img", "commit", "-q", "-d", "-f", "qcow2", overlay])
    _unlink(overlay)


def commit_active(dom: Any, target: str, timeout: float, clock: Callable[[], float],
                  sleep: Callable[[float], None]) -> None:
    """Merge the active overlay of disk ``target`` into its backing file and pivot to it.

    The commit job copies the overlay down while the guest keeps writing; once it
    has caught up (cur == end) the pivot switches the guest to the base atomically.

    :raises DriverError: libvirt refused, or the job was not ready within ``timeout``
        seconds (it is cancelled then, and the guest stays on the overlay).
    """
    try:
        dom.blockCommit(target, None, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
    except libvirt.libvirtError as e:
        raise DriverError(reason=f"block commit of {target} refused: {e.get_error_message()}") from None
    deadline = clock() + timeout
    while True:
        info = dom.blockJobInfo(target, 0)
        if not info:
            raise DriverError(reason=f"the block commit job of {target} vanished before its pivot")
        if info.get("cur") == info.get("end"):
            try:
                dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                return
            except libvirt.libvirtError as e:
                if e.get_error_code() not in _NOT_READY:
                    raise DriverError(reason=f"pivot of {target} failed: {e.get_error_message()}") from None
        if clock() >= deadline:
            try:
                dom.blockJobAbort(target, 0)
            except libvirt.libvirtError as e:
                log.error("could not cancel the block commit of %s: %s", target, e.get_error_message())
            raise DriverError(reason=f"the block commit of {target} was not ready within {timeout:.0f} s "
                                     "(precopy_job_timeout)")
        sleep(POLL)


# -- destination side -------------------------------------------------------------------

# Keep or commit the overlay on the target? Measured here (qemu-img 7.2, 8 GiB raw base,
# overlays of 4 KiB records in separate MiB slots, as the test guest writes them):
# committing a 2.1 MiB overlay (30 records) takes 0.02 s, 13 MiB (200 records) 0.21 s,
# 64 MiB (1000 records) 0.53 s. Keeping it costs nothing now but leaves the instance on a
# qcow2-on-raw chain: its definition would name another file and format than on the
# source, every later migration would add a layer (and pre-copy would then snapshot an
# overlay of an overlay), and reads of unwritten clusters go through two images. The
# overlay holds only what the guest wrote during the copy, so the commit stays a small,
# size-independent part of the downtime: it is committed.
def fold_overlays(disks: list[DiskInfo], runner: images.Runner) -> None:
    """Commit each copied overlay into the copied disk below it (before the domain is defined here).

    :raises ImageError: an overlay is missing or qemu-img failed.
    """
    for d in disks:
        if d.overlay:
            commit_offline(d.overlay, runner)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
