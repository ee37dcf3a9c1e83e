"""The XenAPI calls the XenServer driver makes, as an abstract session.

Each method stands for one XenAPI call (named in its docstring) with typed
arguments and records instead of XML-RPC dictionaries; references are the
opaque strings XenAPI hands out (``OpaqueRef:...``). Failures raise
``XenAPIFailure`` carrying XenAPI's error details list, e.g.
``["UUID_INVALID", "VM", uuid]``.

No XenServer exists where coldferry is developed and tested: the only
implementation here is ``StubSession`` (stub_session.py), which keeps real
VHD files in an SR directory and its records in a JSON file. A session
speaking XML-RPC to a real pool would implement this same class.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

# XenAPI power states (VM.get_power_state).
HALTED = "Halted"
RUNNING = "Running"
PAUSED = "Paused"
SUSPENDED = "Suspended"


class XenAPIFailure(Exception):
    """A XenAPI call failed; ``details[0]`` is the error code, the rest its parameters."""

    def __init__(self, *details: str) -> None:
        self.details = list(details)
        super().__init__(", ".join(self.details))

    @property
    def code(self) -> str:
        return self.details[0] if self.details else ""


@dataclass
class VMRecord:
    """The fields of a VM record the driver uses (memory in MiB)."""

    uuid: str
    name_label: str
    memory_mb: int
    vcpus: int
    power_state: str = HALTED
    other_config: dict[str, str] = field(default_factory=dict)


@dataclass
class VDIRecord:
    """A virtual disk: one VHD file (``location``) in an SR.

    ``managed`` is False for the hidden, read-only parents a snapshot leaves
    behind (XenServer keeps them out of the VDI list users see).
    """

    uuid: str
    sr: str
    location: str
    virtual_size: int
    name_label: str = ""
    read_only: bool = False
    managed: bool = True
    is_a_snapshot: bool = False
    snapshot_of: str = ""


@dataclass
class VBDRecord:
    """A VM's attachment of a VDI as device ``userdevice`` ("0" is the first disk, xvda)."""

    vm: str
    vdi: str
    userdevice: str
    bootable: bool = False


@dataclass
class HostRecord:
    """The host the session is connected to (memory in MiB)."""

    name_label: str
    address: str
    cpu_count: int
    memory_total_mb: int
    software_version: dict[str, str] = field(default_factory=dict)


class Session(abc.ABC):
    """A connection to one XenServer host; every call may raise XenAPIFailure."""

    # -- host and SR ------------------------------------------------------------

    @abc.abstractmethod
    def host_get_record(self) -> HostRecord:
        """host.get_record of the host this session is logged in to."""

    @abc.abstractmethod
    def sr_get_default(self) -> str:
        """pool.get_default_SR: the SR new and incoming disks go to."""

    @abc.abstractmethod
    def sr_get_path(self, sr: str) -> str:
        """The directory a file-based SR is mounted on (``/var/run/sr-mount/<uuid>`` in dom0)."""

    @abc.abstractmethod
    def sr_get_space(self, sr: str) -> tuple[int, int]:
        """SR.get_physical_size and SR.get_physical_utilisation, in bytes."""

    @abc.abstractmethod
    def sr_scan(self, sr: str) -> None:
        """SR.scan: refresh the SR's VDIs; it also kicks the garbage collector, which
        removes unused hidden VHDs and coalesces chains that no longer need a parent."""

    # -- VM -----------------------------------------------------------------------

    @abc.abstractmethod
    def vm_get_all(self) -> list[str]:
        """VM.get_all (guests only: no templates, no control domain)."""

    @abc.abstractmethod
    def vm_get_by_uuid(self, uuid: str) -> str:
        """VM.get_by_uuid; fails with UUID_INVALID."""

    @abc.abstractmethod
    def vm_get_record(self, vm: str) -> VMRecord:
        """VM.get_record."""

    @abc.abstractmethod
    def vm_get_power_state(self, vm: str) -> str:
        """VM.get_power_state: Halted, Running, Paused or Suspended."""

    @abc.abstractmethod
    def vm_create(self, record: VMRecord) -> str:
        """VM.create, halted."""

    @abc.abstractmethod
    def vm_destroy(self, vm: str) -> None:
        """VM.destroy: the record and its VBDs go; its VDIs stay."""

    @abc.abstractmethod
    def vm_start(self, vm: str) -> None:
        """VM.start (not paused); returns when it runs."""

    @abc.abstractmethod
    def vm_clean_shutdown(self, vm: str) -> None:
        """VM.clean_shutdown: ask the guest; fails if it does not comply."""

    @abc.abstractmethod
    def vm_hard_shutdown(self, vm: str) -> None:
        """VM.hard_shutdown: power it off now."""

    @abc.abstractmethod
    def vm_get_vbds(self, vm: str) -> list[str]:
        """VM.get_VBDs."""

    @abc.abstractmethod
    def vm_add_to_other_config(self, vm: str, key: str, value: str) -> None:
        """VM.add_to_other_config (replacing an existing key)."""

    @abc.abstractmethod
    def vm_remove_from_other_config(self, vm: str, key: str) -> None:
        """VM.remove_from_other_config (no error if the key is absent)."""

    # -- VBD ----------------------------------------------------------------------

    @abc.abstractmethod
    def vbd_create(self, vm: str, vdi: str, userdevice: str, bootable: bool) -> str:
        """VBD.create: attach ``vdi`` to ``vm`` (plugged when the VM starts)."""

    @abc.abstractmethod
    def vbd_get_record(self, vbd: str) -> VBDRecord:
        """VBD.get_record."""

    # -- VDI ----------------------------------------------------------------------

    @abc.abstractmethod
    def vdi_get_by_uuid(self, uuid: str) -> str:
        """VDI.get_by_uuid; fails with UUID_INVALID."""

    @abc.abstractmethod
    def vdi_get_record(self, vdi: str) -> VDIRecord:
        """VDI.get_record."""

    @abc.abstractmethod
    def vdi_get_sm_config(self, vdi: str) -> dict[str, str]:
        """VDI.get_sm_config: ``vhd-parent`` holds the parent VDI's uuid for a differencing VHD."""

    @abc.abstractmethod
    def vdi_snapshot(self, vdi: str) -> str:
        """VDI.snapshot of a (possibly attached, running) disk; returns the snapshot VDI.

        On a file SR the disk's VHD becomes a hidden read-only parent with two
        new empty children: the disk itself (same VDI, writes go on here) and
        the snapshot.
        """

    @abc.abstractmethod
    def vdi_introduce(self, sr: str, uuid: str, location: str, managed: bool, name_label: str = "") -> str:
        """VDI.introduce: make a VHD file already in the SR directory a VDI."""

    @abc.abstractmethod
    def vdi_resize(self, vdi: str, size: int) -> None:
        """VDI.resize (grow only)."""

    @abc.abstractmethod
    def vdi_destroy(self, vdi: str) -> None:
        """VDI.destroy; a VDI others still descend from turns hidden until garbage-collected."""

    # -- built from the calls above -----------------------------------------------

    def vdi_get_parent_chain(self, vdi: str) -> list[str]:
        """The VDI and its parents, leaf first (following sm_config ``vhd-parent``)."""
        chain = [vdi]
        while parent := self.vdi_get_sm_config(chain[-1]).get("vhd-parent"):
            chain.append(self.vdi_get_by_uuid(parent))
        return chain

    def vm_get_disks(self, vm: str) -> list[tuple[VBDRecord, str]]:
        """(VBD, VDI ref) of each disk of ``vm``, by device number."""
        vbds = [self.vbd_get_record(v) for v in self.vm_get_vbds(vm)]
        return sorted(((b, b.vdi) for b in vbds), key=lambda p: int(p[0].userdevice))
