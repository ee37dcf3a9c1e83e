"""StubSession: an in-process stand-in for one XenServer host (no XenServer runs here).

It answers the Session calls from an SR directory of real VHD files
(``<vdi-uuid>.vhd``, as XenServer's file SRs name them) and a JSON file of
VM, VDI and VBD records, written after every change so a new StubSession
on the same files finds the same host. Disk operations are real: a
snapshot renames and creates VHDs, the garbage collector run by SR.scan
really coalesces, and a "running" guest's writes (``guest_write``) land
in its leaf VHD. What is simulated is the hypervisor itself: starting a VM
only checks that its disks' chains open and validate.
"""

from __future__ import annotations

import json
import os
import threading
import uuid as uuidlib
from dataclasses import asdict, replace
from typing import TypeVar

from ..errors import ImageError
from . import vhd
from .session import (HALTED, RUNNING, HostRecord, Session, VBDRecord, VDIRecord, VMRecord, XenAPIFailure)

SR_REF = "OpaqueRef:sr-local"
STATE_FILE = ".xapi-stub.json"


_Rec = TypeVar("_Rec", VMRecord, VDIRecord, VBDRecord)


def _ref() -> str:
    return f"OpaqueRef:{uuidlib.uuid4()}"


class StubSession(Session):
    """One stubbed XenServer host with one file SR.

    :param sr_path: the SR directory (created if missing).
    :param state_path: the JSON state file; ``<sr_path>/.xapi-stub.json`` if omitted.
    :param sr_size: the SR's physical size to report, in bytes.
    """

    def __init__(self, sr_path: str, host_name: str = "xenserver", address: str = "", *,
                 state_path: str | None = None, cpu_count: int = 8, memory_mb: int = 32768,
                 sr_size: int = 1 << 40) -> None:
        os.makedirs(sr_path, exist_ok=True)
        self.sr_path = sr_path
        self.state_path = state_path or os.path.join(sr_path, STATE_FILE)
        self.host = HostRecord(host_name, address or host_name, cpu_count, memory_mb,
                               {"product_brand": "XenServer (stub)", "xapi": "stub"})
        self.sr_size = sr_size
        #: When True, VM.clean_shutdown fails as for a guest that ignores the request.
        self.ignore_clean_shutdown = False
        self._failures: dict[str, BaseException] = {}
        self._lock = threading.RLock()
        self.vms: dict[str, VMRecord] = {}
        self.vdis: dict[str, VDIRecord] = {}
        self.vbds: dict[str, VBDRecord] = {}
        if os.path.exists(self.state_path):
            self._load()

    # -- state file ---------------------------------------------------------------

    def _load(self) -> None:
        with open(self.state_path) as f:
            state = json.load(f)
        self.vms = {r: VMRecord(**v) for r, v in state["vms"].items()}
        self.vdis = {r: VDIRecord(**v) for r, v in state["vdis"].items()}
        self.vbds = {r: VBDRecord(**v) for r, v in state["vbds"].items()}

    def _save(self) -> None:
        state = {k: {r: asdict(v) for r, v in getattr(self, k).items()} for k in ("vms", "vdis", "vbds")}
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1, sort_keys=True)
        os.replace(tmp, self.state_path)

    # -- test knobs -----------------------------------------------------------------

    def fail(self, call: str, exc: BaseException) -> None:
        """Make the next call of method ``call`` (e.g. ``"vdi_snapshot"``) raise ``exc``."""
        self._failures[call] = exc

    def _maybe_fail(self, call: str) -> None:
        exc = self._failures.pop(call, None)
        if exc is not None:
            raise exc

    def add_vm(self, uuid: str, name: str, disk_size: int, *, memory_mb: int = 1024, vcpus: int = 1,
               running: bool = True, block_size: int = vhd.DEFAULT_BLOCK_SIZE) -> str:
        """Create a VM with one empty dynamic VHD disk (xvda); returns the VM ref."""
        with self._lock:
            vdi_uuid = str(uuidlib.uuid4())
            vhd.create_dynamic(self._file(f"{vdi_uuid}.vhd"), disk_size, block_size)
            vdi = self.vdi_introduce(SR_REF, vdi_uuid, f"{vdi_uuid}.vhd", True, f"{name} root")
            vm = self.vm_create(VMRecord(uuid, name, memory_mb, vcpus))
            self.vbd_create(vm, vdi, "0", True)
            if running:
                self.vm_start(vm)
            return vm

    def guest_write(self, vm_uuid: str, offset: int, data: bytes, userdevice: str = "0") -> None:
        """What the running guest writes to its disk ``userdevice`` (lands in the leaf VHD)."""
        with self._lock, vhd.open_chain(self._disk_path(vm_uuid, userdevice, RUNNING), writable=True) as c:
            c.write(offset, data)

    def guest_read(self, vm_uuid: str, offset: int, length: int, userdevice: str = "0") -> bytes:
        """What the running guest reads from its disk ``userdevice``."""
        with self._lock, vhd.open_chain(self._disk_path(vm_uuid, userdevice, RUNNING)) as c:
            return c.read(offset, length)

    def _disk_path(self, vm_uuid: str, userdevice: str, state: str) -> str:
        vm = self.vm_get_by_uuid(vm_uuid)
        if self.vms[vm].power_state != state:
            raise XenAPIFailure("VM_BAD_POWER_STATE", vm, state, self.vms[vm].power_state)
        for vbd, vdi in self.vm_get_disks(vm):
            if vbd.userdevice == userdevice:
                return self._file(self.vdis[vdi].location)
        raise XenAPIFailure("VBD_NOT_FOUND", vm, userdevice)

    def _file(self, location: str) -> str:
        return os.path.join(self.sr_path, location)

    def _get(self, table: dict[str, _Rec], kind: str, ref: str) -> _Rec:
        self._maybe_fail(f"{kind.lower()}_get")
        try:
            return table[ref]
        except KeyError:
            raise XenAPIFailure("HANDLE_INVALID", kind, ref) from None

    # -- host and SR ------------------------------------------------------------------

    def host_get_record(self) -> HostRecord:
        return replace(self.host)

    def sr_get_default(self) -> str:
        return SR_REF

    def sr_get_path(self, sr: str) -> str:
        self._check_sr(sr)
        return self.sr_path

    def sr_get_space(self, sr: str) -> tuple[int, int]:
        self._check_sr(sr)
        with self._lock:
            used = sum(os.stat(self._file(v.location)).st_blocks * 512 for v in self.vdis.values())
        return self.sr_size, used

    def _check_sr(self, sr: str) -> None:
        if sr != SR_REF:
            raise XenAPIFailure("HANDLE_INVALID", "SR", sr)

    def sr_scan(self, sr: str) -> None:
        """Run the garbage collector once, synchronously (XenServer runs it in the background)."""
        self._maybe_fail("sr_scan")
        self._check_sr(sr)
        with self._lock:
            while self._collect_one():
                pass
            self._save()

    def _children(self, vdi: str) -> list[str]:
        uuid = self.vdis[vdi].uuid
        return [r for r in self.vdis if self.vdi_get_sm_config(r).get("vhd-parent") == uuid]

    def _collect_one(self) -> bool:
        """Remove one unused hidden VHD or leaf-coalesce one chain; False when nothing is left to do."""
        for ref, rec in list(self.vdis.items()):
            if rec.managed:
                continue
            children = self._children(ref)
            if not children:
                os.unlink(self._file(rec.location))
                del self.vdis[ref]
                return True
            if len(children) == 1 and not self._children(children[0]):
                self._leaf_coalesce(children[0], ref)
                return True
        return False

    def _leaf_coalesce(self, leaf: str, parent: str) -> None:
        """Merge ``leaf`` into its hidden ``parent``, which then takes the leaf's place and name.

        The merged file keeps the parent's VHD identity (footer unique id); no
        VHD refers to the leaf's, so nothing needs relinking.
        """
        leaf_path, parent_path = self._file(self.vdis[leaf].location), self._file(self.vdis[parent].location)
        vhd.coalesce(leaf_path)
        os.replace(parent_path, leaf_path)
        del self.vdis[parent]

    # -- VM -------------------------------------------------------------------------------

    def vm_get_all(self) -> list[str]:
        self._maybe_fail("vm_get_all")
        return list(self.vms)

    def vm_get_by_uuid(self, uuid: str) -> str:
        self._maybe_fail("vm_get_by_uuid")
        for ref, rec in self.vms.items():
            if rec.uuid == uuid:
                return ref
        raise XenAPIFailure("UUID_INVALID", "VM", uuid)

    def vm_get_record(self, vm: str) -> VMRecord:
        return replace(self._get(self.vms, "VM", vm), other_config=dict(self.vms[vm].other_config))

    def vm_get_power_state(self, vm: str) -> str:
        return self._get(self.vms, "VM", vm).power_state

    def vm_create(self, record: VMRecord) -> str:
        self._maybe_fail("vm_create")
        with self._lock:
            if any(r.uuid == record.uuid for r in self.vms.values()):
                raise XenAPIFailure("UUID_ALREADY_EXISTS", "VM", record.uuid)
            ref = _ref()
            self.vms[ref] = replace(record, power_state=HALTED, other_config=dict(record.other_config))
            self._save()
            return ref

    def vm_destroy(self, vm: str) -> None:
        self._maybe_fail("vm_destroy")
        with self._lock:
            self._require(vm, HALTED)
            for vbd in self.vm_get_vbds(vm):
                del self.vbds[vbd]
            del self.vms[vm]
            self._save()

    def _require(self, vm: str, state: str) -> VMRecord:
        rec = self._get(self.vms, "VM", vm)
        if rec.power_state != state:
            raise XenAPIFailure("VM_BAD_POWER_STATE", vm, state.lower(), rec.power_state.lower())
        return rec

    def vm_start(self, vm: str) -> None:
        self._maybe_fail("vm_start")
        with self._lock:
            rec = self._require(vm, HALTED)
            for _vbd, vdi in self.vm_get_disks(vm):
                try:  # what tapdisk would do first: open the whole chain
                    vhd.validate_chain(self._file(self.vdis[vdi].location))
                except Exception as e:
                    raise XenAPIFailure("SR_BACKEND_FAILURE_46", "", f"The VDI is not available: {e}") from None
            rec.power_state = RUNNING
            self._save()

    def vm_clean_shutdown(self, vm: str) -> None:
        self._maybe_fail("vm_clean_shutdown")
        with self._lock:
            rec = self._require(vm, RUNNING)
            if self.ignore_clean_shutdown:
                raise XenAPIFailure("VM_SHUTDOWN_TIMEOUT", vm, "1200")
            rec.power_state = HALTED
            self._save()

    def vm_hard_shutdown(self, vm: str) -> None:
        self._maybe_fail("vm_hard_shutdown")
        with self._lock:
            self._get(self.vms, "VM", vm).power_state = HALTED
            self._save()

    def vm_get_vbds(self, vm: str) -> list[str]:
        self._get(self.vms, "VM", vm)
        return [r for r, b in self.vbds.items() if b.vm == vm]

    def vm_add_to_other_config(self, vm: str, key: str, value: str) -> None:
        with self._lock:
            self._get(self.vms, "VM", vm).other_config[key] = value
            self._save()

    def vm_remove_from_other_config(self, vm: str, key: str) -> None:
        with self._lock:
            self._get(self.vms, "VM", vm).other_config.pop(key, None)
            self._save()

    # -- VBD --------------------------------------------------------------------------------

    def vbd_create(self, vm: str, vdi: str, userdevice: str, bootable: bool) -> str:
        self._maybe_fail("vbd_create")
        with self._lock:
            self._require(vm, HALTED)
            self._get(self.vdis, "VDI", vdi)
            if any(b.vm == vm and b.userdevice == userdevice for b in self.vbds.values()):
                raise XenAPIFailure("DEVICE_ALREADY_EXISTS", userdevice)
            ref = _ref()
            self.vbds[ref] = VBDRecord(vm, vdi, userdevice, bootable)
            self._save()
            return ref

    def vbd_get_record(self, vbd: str) -> VBDRecord:
        return replace(self._get(self.vbds, "VBD", vbd))

    # -- VDI --------------------------------------------------------------------------------

    def vdi_get_by_uuid(self, uuid: str) -> str:
        for ref, rec in self.vdis.items():
            if rec.uuid == uuid:
                return ref
        raise XenAPIFailure("UUID_INVALID", "VDI", uuid)

    def vdi_get_record(self, vdi: str) -> VDIRecord:
        return replace(self._get(self.vdis, "VDI", vdi))

    def vdi_get_sm_config(self, vdi: str) -> dict[str, str]:
        rec = self._get(self.vdis, "VDI", vdi)
        with vhd.VhdFile(self._file(rec.location)) as f:  # as SM does: ask the VHD itself
            if not f.is_differencing:
                return {"vdi_type": "vhd"}
            parent = os.path.basename(vhd.parent_path(f))
        return {"vdi_type": "vhd", "vhd-parent": parent.removesuffix(".vhd")}

    def vdi_snapshot(self, vdi: str) -> str:
        self._maybe_fail("vdi_snapshot")
        with self._lock:  # the guest's writes wait, as tapdisk pauses during a snapshot
            rec = self._get(self.vdis, "VDI", vdi)
            base_uuid, snap_uuid = str(uuidlib.uuid4()), str(uuidlib.uuid4())
            base_loc = f"{base_uuid}.vhd"
            os.rename(self._file(rec.location), self._file(base_loc))
            try:
                vhd.create_differencing(self._file(rec.location), self._file(base_loc))
            except BaseException:
                os.rename(self._file(base_loc), self._file(rec.location))
                raise
            vhd.create_differencing(self._file(f"{snap_uuid}.vhd"), self._file(base_loc))
            self.vdis[_ref()] = VDIRecord(base_uuid, rec.sr, base_loc, rec.virtual_size, rec.name_label,
                                          read_only=True, managed=False)
            snap = _ref()
            self.vdis[snap] = VDIRecord(snap_uuid, rec.sr, f"{snap_uuid}.vhd", rec.virtual_size, rec.name_label,
                                        read_only=True, is_a_snapshot=True, snapshot_of=vdi)
            self._save()
            return snap

    def vdi_introduce(self, sr: str, uuid: str, location: str, managed: bool, name_label: str = "") -> str:
        self._maybe_fail("vdi_introduce")
        self._check_sr(sr)
        with self._lock:
            if any(v.uuid == uuid for v in self.vdis.values()):
                raise XenAPIFailure("UUID_ALREADY_EXISTS", "VDI", uuid)
            try:
                size = vhd.info(self._file(location)).virtual_size
            except (OSError, ImageError) as e:
                raise XenAPIFailure("SR_BACKEND_FAILURE_65", "", f"cannot introduce {location}: {e}") from None
            ref = _ref()
            self.vdis[ref] = VDIRecord(uuid, sr, location, size, name_label, read_only=not managed, managed=managed)
            self._save()
            return ref

    def vdi_resize(self, vdi: str, size: int) -> None:
        self._maybe_fail("vdi_resize")
        with self._lock:
            rec = self._get(self.vdis, "VDI", vdi)
            with vhd.VhdFile(self._file(rec.location), writable=True) as f:
                f.grow(size)
            rec.virtual_size = size
            self._save()

    def vdi_destroy(self, vdi: str) -> None:
        self._maybe_fail("vdi_destroy")
        with self._lock:
            rec = self._get(self.vdis, "VDI", vdi)
            if any(b.vdi == vdi for b in self.vbds.values()):
                raise XenAPIFailure("VDI_IN_USE", vdi, "destroy")
            if self._children(vdi):
                rec.managed, rec.read_only = False, True  # hidden until its children are gone
            else:
                os.unlink(self._file(rec.location))
                del self.vdis[vdi]
            self._save()
