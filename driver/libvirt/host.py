"""This host's libvirtd: the connection, domains, their power and their disks.

The driver, pre-copy and live migration share one ``LibvirtHost``; it is
the only place that turns libvirt's answers and errors into the driver's
model and errors.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import libvirt

from transfer.errors import TransferError

from ..errors import DriverError, HostError, ImageError, InstanceNotFound, PowerOffFailed, StartFailed
from ..model import DiskInfo, Flavor, Instance, PowerState
from . import domain_xml, images, power
from .config import DriverConfig
from .layout import Layout

log = logging.getLogger(__name__)

GiB = 1 << 30
_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: PowerState.NOSTATE, libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING, libvirt.VIR_DOMAIN_PAUSED: PowerState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.SHUTDOWN, libvirt.VIR_DOMAIN_SHUTOFF: PowerState.SHUTDOWN,
    libvirt.VIR_DOMAIN_CRASHED: PowerState.CRASHED, libvirt.VIR_DOMAIN_PMSUSPENDED: PowerState.SUSPENDED,
}


class LibvirtHost:
    """One libvirtd, reached at ``config.libvirt_uri`` (reconnected when the connection died).

    :param connect: opens a libvirt connection from a URI (``libvirt.open``; tests pass a fake).
    :param runner: runs qemu-img (images.run).
    :param sleep, clock: pace the bounded waits for a guest to start or stop.
    """

    def __init__(self, config: DriverConfig, connect: Callable[[str], Any], runner: images.Runner,
                 sleep: Callable[[float], None], clock: Callable[[], float]) -> None:
        self.config = config
        self.name = config.host_name
        self.layout = Layout(config.instances_path)
        self.connect = connect
        self.runner = runner
        self.sleep = sleep
        self.clock = clock
        self._conn: Any = None

    @property
    def conn(self) -> Any:
        if self._conn is None or not self._conn.isAlive():
            try:
                self._conn = self.connect(self.config.libvirt_uri)
            except libvirt.libvirtError as e:
                raise DriverError(reason=f"cannot connect to libvirt at {self.config.libvirt_uri}: "
                                         f"{e.get_error_message()}") from None
        return self._conn

    def domain(self, uuid: str) -> Any:
        """The domain; raises InstanceNotFound, or DriverError for other libvirt failures."""
        try:
            return self.conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise InstanceNotFound(uuid=uuid, host=self.name) from None
            raise DriverError(reason=f"libvirt lookup of {uuid}: {e.get_error_message()}") from None

    def instances(self) -> list[Instance]:
        """Every domain defined here; one undefined while being read is left out, not an error."""
        out = []
        for dom in self.conn.listAllDomains():
            try:
                out.append(self.instance(dom))
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                log.info("a domain went away while the instances were listed; left out (%s)", e.get_error_message())
        return out

    def domain_or_none(self, uuid: str) -> Any | None:
        try:
            return self.domain(uuid)
        except InstanceNotFound:
            return None

    @staticmethod
    def state(dom: Any) -> PowerState:
        return _STATES.get(dom.state()[0], PowerState.NOSTATE)

    def instance(self, dom: Any) -> Instance:
        """The domain as the driver's model describes it (flavor from its metadata, else its disk)."""
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
        return Instance(dom.UUIDString(), dom.name(), flavor, self.name, self.state(dom))

    def disk_info(self, xml: str, inst_dir: str) -> list[DiskInfo]:
        """The domain's file disks, each with its image's sizes and backing file.

        :raises ImageError: a disk lives outside the instance directory (only those can move).
        """
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

    # -- power ----------------------------------------------------------------------

    def start(self, dom: Any, uuid: str) -> None:
        """Start ``dom`` unless it runs, and wait (bounded by start_timeout) until it does."""
        if not dom.isActive():
            try:
                dom.create()
            except libvirt.libvirtError as e:
                raise StartFailed(uuid=uuid, host=self.name, reason=e.get_error_message()) from None
        self.wait_running(dom, uuid)

    def wait_running(self, dom: Any, uuid: str) -> None:
        deadline = self.clock() + self.config.start_timeout
        while self.state(dom) != PowerState.RUNNING:
            if self.clock() >= deadline:
                raise StartFailed(uuid=uuid, host=self.name,
                                  reason=f"still {self.state(dom).name} after {self.config.start_timeout:.0f} s")
            self.sleep(0.2)

    def power_on(self, instance: Instance) -> None:
        self.start(self.domain(instance.uuid), instance.uuid)

    def power_off(self, instance: Instance, timeout: int = 0, retry_interval: int = 0) -> None:
        """Clean shutdown for up to ``timeout`` seconds, then forced."""
        dom = self.domain(instance.uuid)

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

    # -- definitions ------------------------------------------------------------------

    def define(self, uuid: str, xml: str, what: str = "define it") -> Any:
        """Define (or redefine) a domain from ``xml``; the domain."""
        return self.call(uuid, what, self.conn.defineXML, xml)

    @staticmethod
    def call(uuid: str, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, a libvirt error becoming DriverError saying what could not be done."""
        try:
            return fn(*args)
        except libvirt.libvirtError as e:
            raise DriverError(reason=f"could not {what} (instance {uuid}): {e.get_error_message()}") from None


@contextmanager
def host_errors(what: str, host: str) -> Iterator[None]:
    """libvirt, OS and transfer errors raised inside become a HostError saying what could not be
    done, so a caller sees DriverErrors only (DriverErrors pass unchanged)."""
    try:
        yield
    except (libvirt.libvirtError, OSError, TransferError) as e:
        raise HostError(what=what, host=host, reason=libvirt_reason(e)) from e


def libvirt_reason(e: BaseException) -> str:
    """An exception as a reason in a message (libvirt's own message for its errors)."""
    if isinstance(e, libvirt.libvirtError):
        return f"libvirt: {e.get_error_message()}"
    return str(e) or type(e).__name__
