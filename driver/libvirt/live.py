"""Live migration with a full copy of local disks (a host drain moves running guests live).

libvirt moves the guest's memory while qemu mirrors its disks over NBD
into images coldferry makes beforehand on the destination: libvirt makes
missing disk files only inside storage pools, and coldferry keeps disks in
plain instance directories. A disk whose backing file stays (``backing =
send``) gets an overlay on the same backing file, which is first sent into
the destination's image cache, and only the overlay is mirrored; every
other disk is mirrored whole into a blank image of its format and size.

The steps, in order: check the instance runs; connect to the destination's
libvirtd (fail early, before anything is made there); look for shared
storage; make the instance directory, the image cache entries and the blank
images there; migrate; then drop the source's now stale files. Any failure
leaves the guest running here and removes what was made on the destination.

It works through the host's libvirtd (host.py) and the copy plumbing
(mover.py) the driver hands it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import libvirt

import transfer
from transfer.endpoint import is_host_address
from transfer.remotefs import RemoteFS
from transfer.result import CopyResult

from ..errors import DriverError, ImageError, InstanceNotFound, InvalidInstanceState, MigrationFailed
from ..model import DiskInfo, Instance, LiveOutcome, PhaseName, PowerState, ProgressHook, Timeline
from . import images
from .config import DriverConfig
from .host import LibvirtHost, libvirt_reason
from .layout import CACHE_DIR
from .mover import DiskMover

log = logging.getLogger(__name__)

MiB = 1 << 20
SSH_TRANSPORTS = ("ssh", "libssh", "libssh2")
FORMATS = ("raw", "qcow2")
# Defined and running on the destination, gone from here; qemu throttles a guest
# that dirties memory faster than it can be sent, so that the copy converges.
BASE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
              | libvirt.VIR_MIGRATE_AUTO_CONVERGE)


# -- what to ask libvirt ------------------------------------------------------------


def uri_host(host: str) -> str:
    """``host`` as the host part of a URI (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


#: Query parameters that would switch host key checking off: never taken from the template.
_UNSAFE = ("no_verify", "known_hosts_verify")
_PLACEHOLDER = "coldferry-dest.invalid"


def dest_uri(config: DriverConfig, dest: str) -> str:
    """The libvirt URI of ``dest``'s libvirtd, from the ``live_migration_uri`` template.

    ``dest`` fills only the host part: the query is the template's own, so
    nothing in ``dest`` can add a parameter. For libssh and libssh2 the host
    key is checked against ``ssh_known_hosts`` (an unknown key is refused,
    never added): ``known_hosts_verify=normal`` is always forced, whatever the
    template says. ``ssh_identity`` is the key.

    :raises DriverError: ``dest`` is not a host name or an IP address.
    """
    if not is_host_address(dest):
        raise DriverError(reason=f"live migration destination {dest!r} is not a host name or an IP address")
    uri = config.live_migration_uri.format(dest=_PLACEHOLDER, user=config.ssh_user, port=config.ssh_port)
    parts = urlsplit(uri)
    netloc = parts.netloc.replace(_PLACEHOLDER, uri_host(dest))
    transport = parts.scheme.partition("+")[2]
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in _UNSAFE]
    have = {key for key, _ in query}
    add: list[tuple[str, str]] = []
    if transport in ("libssh", "libssh2"):
        add += [("known_hosts", config.ssh_known_hosts), ("known_hosts_verify", "normal")]
        if config.ssh_identity:
            add.append(("sshauth", "privkey"))
    if transport in SSH_TRANSPORTS and config.ssh_identity:
        add.append(("keyfile", config.ssh_identity))
    query += [(k, v) for k, v in add if k not in have]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="/,")))


def flags(shared: bool, keep_backing: bool) -> int:
    """Migration flags: disks mirrored whole, or only their top layer when backing files stay."""
    if shared:
        return BASE_FLAGS
    return BASE_FLAGS | (libvirt.VIR_MIGRATE_NON_SHARED_INC if keep_backing else libvirt.VIR_MIGRATE_NON_SHARED_DISK)


def flag_names(value: int) -> list[str]:
    """The names of the VIR_MIGRATE_* flags set in ``value`` (for reports and logs)."""
    return [name.removeprefix("VIR_MIGRATE_") for name in _FLAG_NAMES if value & getattr(libvirt, name)]


_FLAG_NAMES = ("VIR_MIGRATE_LIVE", "VIR_MIGRATE_PERSIST_DEST", "VIR_MIGRATE_UNDEFINE_SOURCE",
               "VIR_MIGRATE_AUTO_CONVERGE", "VIR_MIGRATE_NON_SHARED_DISK", "VIR_MIGRATE_NON_SHARED_INC")


def params(dest: str, disks: list[DiskInfo], shared: bool, bwlimit: int) -> dict[str, Any]:
    """Typed migration parameters: where qemu sends to, which disks to mirror, how fast.

    The migration URI names ``dest`` itself so that the source's qemu does not
    depend on how it resolves the name the destination's libvirtd reports.
    ``bwlimit`` is bytes per second (0: no limit); libvirt takes MiB/s and
    applies it to the memory stream and to each disk mirror.
    """
    out: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{uri_host(dest)}"}
    if not shared:
        out[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = [d.target for d in disks]
    if bwlimit:
        out[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = max(1, bwlimit // MiB)
    return out


def figures(stats: dict[str, Any]) -> dict[str, Any]:
    """What a completed migration job reports (LiveOutcome's fields), in seconds and bytes;
    missing figures are None."""
    def seconds(key: str) -> float | None:
        return stats[key] / 1000 if key in stats else None

    return {"downtime_s": seconds("downtime"), "job_s": seconds("time_elapsed"),
            "memory_bytes": stats.get("memory_processed")}


# -- the images made on the destination ---------------------------------------------


def make_blank(disk: DiskInfo, keep_backing: bool, out: str, runner: images.Runner) -> None:
    """Write at ``out`` an empty image for ``disk``: same format and virtual size, and the same
    backing file when ``keep_backing`` (an overlay the mirror fills with the top layer only)."""
    if disk.type == "raw":
        with open(out, "xb") as f:
            f.truncate(disk.virt_disk_size)  # sparse: the copier sends no bytes for it
        return
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if keep_backing and disk.backing_file:
        backing_format = images.info(disk.path, runner).backing_format or "raw"
        argv += ["-F", backing_format, "-b", disk.backing_file]
    runner([*argv, out, str(disk.virt_disk_size)])


class LiveMigration:
    """One live migration of ``instance`` to ``dest``; ``run`` moves it or leaves it running here.

    :param host: this host's libvirtd.
    :param mover: looks at and copies to the destination's instances directory.
    :param progress: called as the image cache entries and blank images are copied.
    :param timeline: records connect, precopy (each file made ahead on the destination) and
        live_migrate.
    """

    def __init__(self, host: LibvirtHost, mover: DiskMover, instance: Instance, dest: str,
                 progress: ProgressHook | None = None, timeline: Timeline | None = None) -> None:
        self.host = host
        self.mover = mover
        self.config = host.config
        self.instance = instance
        self.uuid = instance.uuid
        self.dest = dest
        self.progress = progress
        self.timeline = timeline or Timeline()
        self.made: list[str] = []   # names made under instances_path on dest, for the clean-up
        self.copies: list[CopyResult] = []

    def run(self) -> LiveOutcome:
        """Migrate (see the module docstring); the migration's figures.

        Raises InvalidInstanceState unless it runs, ImageError for disks that
        cannot move, MigrationFailed (it runs here still) for anything else.
        """
        host, uuid, dest = self.host, self.uuid, self.dest
        dom = host.domain(uuid)
        state = host.state(dom)
        if state != PowerState.RUNNING:
            hint = ("resume it before migrating it live" if state in (PowerState.PAUSED, PowerState.SUSPENDED)
                    else "live migration moves running instances; migrate a stopped one cold")
            raise InvalidInstanceState(uuid=uuid, state=state.label, reason=hint)
        inst_dir = host.layout.instance_dir(uuid)
        disks = host.disk_info(dom.XMLDesc(0), inst_dir)
        for disk in disks:
            if disk.type not in FORMATS:
                raise ImageError(path=disk.path, reason=f"format {disk.type} cannot be live-migrated; "
                                                        "raw and qcow2 can")
        keep_backing = self.config.backing == "send" and any(d.backing_file for d in disks)
        started = host.clock()
        tl = self.timeline
        log.info("live-migrating %s to %s", uuid, dest)
        try:
            connecting = tl.now()
            dconn = self._open()
            try:
                with self.mover.remote(dest) as rfs:
                    shared = self.mover.is_shared(rfs)
                    tl.add(PhaseName.CONNECT, connecting, tl.now())
                    if not shared:
                        _refuse_if_defined(dconn, uuid, dest)
                        self.prepare_dest(rfs, disks, keep_backing)
                copied = host.clock()
                with tl.phase(PhaseName.LIVE_MIGRATE):
                    new_dom = self._migrate(dom, dconn, disks, shared, keep_backing)
                done = host.clock()
                outcome = LiveOutcome(**figures(_job_stats(new_dom)), shared=shared, prepare_s=copied - started,
                                      migration_s=done - copied, flags=flag_names(flags(shared, keep_backing)),
                                      copies=self.copies)
            finally:
                _close(dconn)
        except (DriverError, transfer.TransferError, libvirt.libvirtError, OSError) as e:
            if isinstance(e, MigrationFailed):
                raise
            note = self.mover.remove_on_dest(dest, self.made) if self.made else ""
            raise MigrationFailed(uuid=uuid, dest=dest, reason=libvirt_reason(e),
                                  restored=f": it kept running on {self.config.host_name}{note}") from e
        if not shared:
            self._drop_source_files(inst_dir)
        log.info("live-migrated %s to %s in %.1f s (downtime %s s)", uuid, dest, outcome.migration_s,
                 outcome.downtime_s)
        return outcome

    def prepare_dest(self, rfs: RemoteFS, disks: list[DiskInfo], keep_backing: bool) -> None:
        """Make the instance directory, missing image cache entries and blank images on the destination.

        Every name made is added to ``made`` before it is made, so that a failure
        midway removes partial files too.
        """
        uuid, dest, mover = self.uuid, self.dest, self.mover
        if rfs.exists(uuid):
            raise DriverError(reason=f"{self.host.layout.instance_dir(uuid)} already exists on {dest}; "
                                     "remove it there if it is a leftover")
        cache_needed = mover.backing_to_send(rfs, disks) if keep_backing else []
        mover.check_space(rfs, dest, uuid, disks, cache_needed)
        self.made.append(uuid)
        rfs.mkdir(uuid)
        if cache_needed:
            rfs.mkdir(CACHE_DIR)
        tl, running = self.timeline, PhaseName.PRECOPY
        self.copies += mover.copy_cache(cache_needed, dest, self.made, self.progress, tl, running)
        # Made here and sent with the copier: coldferry runs no qemu-img on other hosts.
        with tempfile.TemporaryDirectory(prefix=".coldferry-live-", dir=self.config.instances_path) as tmp:
            for disk in disks:
                blank = os.path.join(tmp, os.path.basename(disk.path))
                make_blank(disk, keep_backing, blank, self.host.runner)
                self.copies.append(mover.copy(blank, dest, disk.path, self.progress, tl, running))

    def _open(self) -> Any:
        uri = dest_uri(self.config, self.dest)
        try:
            return self.host.connect(uri)
        except libvirt.libvirtError as e:
            raise DriverError(reason=f"cannot connect to libvirt on {self.dest} ({uri}): "
                                     f"{e.get_error_message()}") from None

    def _migrate(self, dom: Any, dconn: Any, disks: list[DiskInfo], shared: bool, keep_backing: bool) -> Any:
        """Run the libvirt migration; the domain on the destination.

        A failure that left the guest here (libvirt resumes it) is raised as
        libvirtError for the caller's clean-up. One that left it running on
        the destination after all is a MigrationFailed that keeps every file.
        """
        try:
            return dom.migrate3(dconn, params(self.dest, disks, shared, self.config.copy_options.bwlimit),
                                flags(shared, keep_backing))
        except libvirt.libvirtError as e:
            if _runs_on(dconn, dom.UUIDString()):
                raise MigrationFailed(uuid=dom.UUIDString(), dest=self.dest, reason=libvirt_reason(e),
                                      restored=f" NOT: it runs on {self.dest} now; check both hosts before "
                                               "removing any files") from e
            self._resume_if_paused(dom)
            raise

    def _resume_if_paused(self, dom: Any) -> None:
        """libvirt resumes a guest whose migration failed; make sure, since it must keep running here."""
        try:
            if self.host.state(dom) == PowerState.PAUSED:
                log.warning("instance %s stayed paused after the failed migration; resuming it", dom.UUIDString())
                dom.resume()
        except libvirt.libvirtError as e:
            log.error("could not resume %s after the failed migration: %s", dom.UUIDString(), e.get_error_message())

    def _drop_source_files(self, inst_dir: str) -> None:
        """Remove the instance directory here, now stale, once libvirt has undefined the domain here.

        Failing at this is logged, not raised: the guest has moved.
        """
        try:
            self.host.domain(self.uuid)
            log.warning("instance %s is still defined here after moving; keeping %s", self.uuid, inst_dir)
            return
        except InstanceNotFound:
            pass
        except DriverError as e:
            log.warning("cannot tell whether %s is still defined here (%s); keeping %s", self.uuid, e, inst_dir)
            return
        try:
            shutil.rmtree(inst_dir)
        except OSError as e:
            log.error("could not remove %s after the live migration: %s", inst_dir, e)


def _close(conn: Any) -> None:
    try:
        conn.close()
    except libvirt.libvirtError:
        pass  # a connection that broke during the migration has nothing left to close


def _refuse_if_defined(dconn: Any, uuid: str, dest: str) -> None:
    try:
        dconn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return
        raise
    raise DriverError(reason=f"instance {uuid} is already defined on {dest}; undefine it there if it is a leftover")


def _runs_on(dconn: Any, uuid: str) -> bool:
    try:
        return bool(dconn.lookupByUUIDString(uuid).isActive())
    except libvirt.libvirtError:
        return False


def _job_stats(dom: Any) -> dict[str, Any]:
    """The completed job's statistics, which the destination gets from the source; {} if none."""
    try:
        return dict(dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
    except libvirt.libvirtError as e:
        log.warning("no statistics of the finished migration: %s", e.get_error_message())
        return {}
