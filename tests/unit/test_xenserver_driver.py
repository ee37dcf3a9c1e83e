"""XenServerDriver between two stubbed hosts: pre-copy of the base VHD, leaf after power-off.

Each host is a StubSession over its own SR directory of real VHD files;
the copier copies between the two directories.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from driver.errors import InstanceNotFound, InvalidInstanceState, MigrationFailed, ResizeDown
from driver.model import FinishOutcome, Flavor, Instance, MigrateOutcome, Migration, Timeline
from driver.xenserver import vhd
from driver.xenserver.copier import LocalCopier
from driver.xenserver.driver import MARKER, XenServerDriver
from driver.xenserver.session import HALTED, PAUSED, RUNNING, XenAPIFailure
from driver.xenserver.stub_session import StubSession

MiB = 1 << 20
GiB = 1 << 30
UUID = "11111111-2222-3333-4444-555555555555"
SMALL = Flavor("small", 1, 1024, 1)
DISK = 64 * MiB
BEFORE = [(0, 4 * MiB), (20 * MiB + 5, 6 * MiB), (50 * MiB, 6 * MiB)]  # 16 MiB written before migrating
DURING = [(1 * MiB, 4096), (33 * MiB + 17, 1000)]  # written after the base copy, before shutdown


class Copier(LocalCopier):
    """The local copier, with the guest writing right after the base VHD was copied."""

    def __init__(self, dirs: dict[str, str], guest: "Host") -> None:
        super().__init__(dirs)
        self.guest = guest
        self.fail_on: str = ""
        self.names: list[str] = []

    def copy(self, src: str, dest: str, name: str, progress=None):  # type: ignore[no-untyped-def]
        self.names.append(name)
        if self.fail_on and name.endswith(self.fail_on):
            raise OSError(f"connection lost while copying {name}")
        result = super().copy(src, dest, name, progress)
        if name.endswith("-1.vhd") and state(self.guest) == RUNNING:
            for offset, length in DURING:
                self.guest.write(offset, bytes([0xD0 + offset % 7]) * length)
        return result


@dataclass
class Host:
    sr: Path
    session: StubSession
    driver: XenServerDriver
    expected: bytearray  # what the guest has written, as it should read back anywhere

    def write(self, offset: int, data: bytes) -> None:
        self.session.guest_write(UUID, offset, data)
        self.expected[offset:offset + len(data)] = data

    def leaf(self, uuid: str = UUID) -> str:
        s = self.session
        vdi = s.vm_get_disks(s.vm_get_by_uuid(uuid))[0][1]
        return str(self.sr / s.vdi_get_record(vdi).location)

    def chain(self) -> list[vhd.Info]:
        return vhd.validate_chain(self.leaf())

    def disk(self) -> bytes:
        with vhd.open_chain(self.leaf()) as c:
            return c.read(0, c.size)

    def vhds(self) -> list[str]:
        return sorted(n for n in os.listdir(self.sr) if not n.startswith(".xapi"))


@pytest.fixture
def hosts(tmp_path):
    expected = bytearray(DISK)
    sr1, sr2 = tmp_path / "sr1", tmp_path / "sr2"
    s1, s2 = StubSession(str(sr1), "h1"), StubSession(str(sr2), "h2")
    src = Host(sr1, s1, None, expected)  # type: ignore[arg-type]
    copier = Copier({"h1": str(sr1), "h2": str(sr2)}, src)
    src.driver = XenServerDriver(s1, copier, "h1", coalesce_timeout=0, sleep=lambda s: None)
    dst = Host(sr2, s2, XenServerDriver(s2, copier, "h2"), expected)
    s1.add_vm(UUID, "vm1", DISK)
    for offset, length in BEFORE:
        src.write(offset, os.urandom(length))
    return src, dst, copier


def migration() -> Migration:
    return Migration("m1", UUID, "h1", "h2")


def migrate(src: Host, dst: Host, flavor: Flavor = SMALL, **kw) -> tuple[MigrateOutcome, FinishOutcome]:
    inst = src.driver.get_instance(UUID)
    outcome = src.driver.migrate_disk_and_power_off(inst, "h2", flavor, [], **kw)
    finished = dst.driver.finish_migration(migration(), Instance(UUID, inst.name, flavor, "h2"), outcome.disk_info,
                                           [], {}, flavor != inst.flavor)
    return outcome, finished


def state(host: Host) -> str:
    s = host.session
    return s.vm_get_power_state(s.vm_get_by_uuid(UUID))


def assert_source_as_before(src: Host, original_id, vdi_uuid: str) -> None:
    """Running, one VHD with the disk's original identity, every write the guest made."""
    assert state(src) == RUNNING
    chain = src.chain()
    assert len(chain) == 1 and chain[0].unique_id == original_id
    assert Path(chain[0].path).name == f"{vdi_uuid}.vhd"
    assert src.disk() == bytes(src.expected)
    assert MARKER not in src.session.vm_get_record(src.session.vm_get_by_uuid(UUID)).other_config


def identity(src: Host) -> tuple:
    s = src.session
    vdi = s.vm_get_disks(s.vm_get_by_uuid(UUID))[0][1]
    return src.chain()[0].unique_id, s.vdi_get_record(vdi).uuid


# -- the whole sequence -------------------------------------------------------------


def test_precopy_sequence_moves_every_write_and_copies_only_the_leaf_after_power_off(hosts):
    src, dst, copier = hosts
    outcome, finished = migrate(src, dst)
    disk_info = outcome.disk_info
    # Bases first while running, then the leaf and the metadata once it is off.
    assert copier.names == [f"migrate-{UUID}-0-1.vhd", f"migrate-{UUID}-0-0.vhd", f"migrate-{UUID}.json"]
    leaf = disk_info[0]
    assert (leaf.type, leaf.target, leaf.backing_file) == ("vhd", "xvda", f"migrate-{UUID}-0-1.vhd")
    assert (disk_info[1].target, disk_info[1].backing_file) == ("", "")
    assert (outcome.precopy, outcome.shared, outcome.was_running) == (True, False, True)
    assert [c.method for c in outcome.copies] == ["local"] * 3  # base, leaf, metadata
    before, after = outcome.bytes_before_power_off, outcome.bytes_after_power_off
    assert before == outcome.copies[0].sent >= 16 * MiB  # every block the guest wrote before the snapshot
    # The sectors written during the copy (in file-system blocks), the leaf's header, BAT,
    # locators, bitmaps and footer, and the metadata file: tens of KiB, not the 16 MiB.
    assert after <= 64 * 1024
    print(f"\nbytes before power-off {before}, after {after}")
    assert state(src) == HALTED and state(dst) == RUNNING
    assert dst.session.guest_read(UUID, 0, DISK) == bytes(dst.expected)
    chain = dst.chain()  # relinked and validated on the target
    assert [c.disk_type for c in chain] == [vhd.DISK_DIFFERENCING, vhd.DISK_DYNAMIC]
    assert chain[0].parent_uuid == chain[1].unique_id
    assert not [n for n in dst.vhds() if n.startswith("migrate-")]
    assert outcome.powered_off_at is not None and finished.running_at is not None
    assert 0 <= finished.running_at - outcome.powered_off_at < 30
    hidden = [v for v in dst.session.vdis.values() if not v.managed]
    assert len(hidden) == 1 and hidden[0].read_only
    assert dst.driver.get_instance(UUID).flavor == Flavor("small", 1, 1024, 1)


def test_both_sides_record_their_phases(hosts):
    src, dst, _ = hosts
    inst = src.driver.get_instance(UUID)
    source, dest = Timeline(), Timeline()
    outcome = src.driver.migrate_disk_and_power_off(inst, "h2", SMALL, [], timeline=source)
    dst.driver.finish_migration(migration(), Instance(UUID, inst.name, SMALL, "h2"), outcome.disk_info, [], {},
                                False, timeline=dest)
    assert [(p.name, p.detail) for p in source.phases] == [
        ("connect", ""), ("snapshot", "xvda"), ("precopy", f"migrate-{UUID}-0-1.vhd"), ("shutdown", ""),
        ("copy", f"migrate-{UUID}-0-0.vhd"), ("copy", f"migrate-{UUID}.json")]
    assert [(p.name, p.detail) for p in dest.phases] == [("define", ""), ("commit", "xvda"), ("start", "")]


def test_progress_is_reported_per_file(hosts):
    src, dst, copier = hosts
    seen: list[tuple[str, int]] = []
    migrate(src, dst, progress=lambda name, p: seen.append((name, p.done)))
    assert [n for n, _ in seen] == copier.names
    assert all(done > 0 for _, done in seen)


def test_confirm_removes_the_source_vm_and_its_whole_chain(hosts):
    src, dst, _ = hosts
    migrate(src, dst)
    src.driver.confirm_migration(migration(), src.driver.get_instance(UUID), [])
    with pytest.raises(InstanceNotFound):
        src.driver.get_instance(UUID)
    assert src.vhds() == []
    assert state(dst) == RUNNING


def test_confirm_refuses_a_running_source(hosts):
    src, _, _ = hosts
    with pytest.raises(InvalidInstanceState, match="refusing to remove it"):
        src.driver.confirm_migration(migration(), src.driver.get_instance(UUID), [])


def test_revert_coalesces_the_source_chain_back(hosts):
    src, dst, _ = hosts
    original = identity(src)
    migrate(src, dst)
    assert len(src.chain()) == 2  # the leaf written during the copy, on its base
    inst = dst.driver.get_instance(UUID)
    dst.driver.destroy(inst, [])
    assert dst.vhds() == []
    src.driver.finish_revert_migration(inst, [], migration())
    assert_source_as_before(src, *original)
    src.write(2 * MiB, b"after revert" * 100)
    assert src.disk() == bytes(src.expected)


def test_resize_grows_the_leaf_on_the_target(hosts):
    src, dst, _ = hosts
    bigger = Flavor("medium", 2, 2048, 2)
    migrate(src, dst, bigger)
    assert dst.driver.get_instance(UUID).flavor.root_gb == 2
    assert dst.chain()[0].virtual_size == 2 * GiB
    assert dst.session.guest_read(UUID, 0, DISK) == bytes(dst.expected)
    assert dst.session.guest_read(UUID, 2 * GiB - 512, 512) == bytes(512)


def test_a_disk_with_a_parent_already_copies_both_bases_first(hosts):
    src, dst, copier = hosts
    s = src.session
    vm = s.vm_get_by_uuid(UUID)
    vdi = s.vm_get_disks(vm)[0][1]
    s.vdi_destroy(s.vdi_snapshot(vdi))  # the disk now sits on a hidden parent
    src.write(10 * MiB, b"on the second layer" * 50)
    migrate(src, dst)
    assert copier.names[:2] == [f"migrate-{UUID}-0-1.vhd", f"migrate-{UUID}-0-2.vhd"]
    assert len(dst.chain()) == 3
    assert dst.session.guest_read(UUID, 0, DISK) == bytes(dst.expected)


def test_a_vm_with_two_disks(hosts):
    src, dst, _ = hosts
    s = src.session
    vm = s.add_vm("two", "vm2", 8 * MiB, running=False)
    vhd.create_dynamic(str(src.sr / "data.vhd"), 16 * MiB)
    s.vbd_create(vm, s.vdi_introduce(s.sr_get_default(), "data", "data.vhd", True), "1", False)
    s.vm_start(vm)
    s.guest_write("two", 0, b"root" * 128)
    s.guest_write("two", 15 * MiB, b"data" * 128, userdevice="1")
    inst = src.driver.get_instance("two")
    disk_info = src.driver.migrate_disk_and_power_off(inst, "h2", SMALL, []).disk_info
    assert sorted(d.target for d in disk_info if d.target) == ["xvda", "xvdb"]
    dst.driver.finish_migration(migration(), Instance("two", "vm2", SMALL, "h2"), disk_info, [], {}, False)
    assert dst.session.guest_read("two", 0, 512) == b"root" * 128
    assert dst.session.guest_read("two", 15 * MiB, 512, userdevice="1") == b"data" * 128
    assert [d.bootable for d, _ in dst.session.vm_get_disks(dst.session.vm_get_by_uuid("two"))] == [True, False]


def test_a_halted_vm_was_not_running_and_stays_off_without_power_on(hosts):
    src, dst, _ = hosts
    s = src.session
    s.vm_hard_shutdown(s.vm_get_by_uuid(UUID))
    inst = src.driver.get_instance(UUID)
    outcome = src.driver.migrate_disk_and_power_off(inst, "h2", SMALL, [])
    assert outcome.was_running is False and outcome.bytes_before_power_off >= 16 * MiB
    finished = dst.driver.finish_migration(migration(), inst, outcome.disk_info, [], {}, False, power_on=False)
    assert finished.running_at is None and state(dst) == HALTED
    assert dst.disk() == bytes(dst.expected)


def test_refusals_before_anything_happens(hosts):
    src, _, copier = hosts
    src.session.add_vm("big", "vm2", 2 * GiB)
    with pytest.raises(ResizeDown, match="from 2 GiB to 1 GiB"):
        src.driver.migrate_disk_and_power_off(src.driver.get_instance("big"), "h2", SMALL, [])
    s = src.session
    s.vms[s.vm_get_by_uuid(UUID)].power_state = PAUSED
    with pytest.raises(InvalidInstanceState, match="paused"):
        src.driver.migrate_disk_and_power_off(src.driver.get_instance(UUID), "h2", SMALL, [])
    assert copier.names == [] and len(src.chain()) == 1


# -- failures in each phase leave the source running on a consistent chain --------------


def test_snapshot_failure(hosts):
    src, dst, _ = hosts
    original = identity(src)
    src.session.fail("vdi_snapshot", XenAPIFailure("SR_BACKEND_FAILURE_82", "", "snapshot failed"))
    with pytest.raises(MigrationFailed, match="snapshot failed.*restored \\(it kept running\\)"):
        migrate(src, dst)
    assert_source_as_before(src, *original)
    assert dst.vhds() == []


@pytest.mark.parametrize("phase,was_on", [("-1.vhd", True), ("-0.vhd", False), (".json", False)])
def test_copy_failure(hosts, phase, was_on):
    src, dst, copier = hosts
    original = identity(src)
    copier.fail_on = phase
    restored = "kept running" if was_on else "and started again"
    with pytest.raises(MigrationFailed, match=f"connection lost.*{restored}"):
        migrate(src, dst)
    assert_source_as_before(src, *original)
    assert dst.vhds() == []  # partial copies removed on the target
    assert not [n for n in src.vhds() if n.startswith("migrate-")]


def test_a_halted_vm_stays_halted_after_a_failure(hosts):
    src, dst, copier = hosts
    s = src.session
    s.vm_hard_shutdown(s.vm_get_by_uuid(UUID))
    copier.fail_on = "-0.vhd"
    with pytest.raises(MigrationFailed, match="connection lost") as err:
        migrate(src, dst)
    assert "started again" not in str(err.value) and "kept running" not in str(err.value)
    assert state(src) == HALTED and len(src.chain()) == 1 and dst.vhds() == []


def test_power_off_failure(hosts):
    src, dst, _ = hosts
    original = identity(src)
    src.session.fail("vm_hard_shutdown", XenAPIFailure("INTERNAL_ERROR", "xenopsd"))
    with pytest.raises(MigrationFailed, match="could not power off.*kept running"):
        migrate(src, dst)
    assert_source_as_before(src, *original)
    assert dst.vhds() == []


def test_clean_shutdown_refused_falls_back_to_hard_shutdown(hosts):
    src, dst, _ = hosts
    src.session.ignore_clean_shutdown = True
    migrate(src, dst, timeout=30)
    assert state(src) == HALTED and state(dst) == RUNNING


def test_restart_failure_is_reported(hosts):
    src, dst, copier = hosts
    copier.fail_on = "-0.vhd"
    src.session.fail("vm_start", XenAPIFailure("HOST_NOT_ENOUGH_FREE_MEMORY", "1073741824", "0"))
    with pytest.raises(MigrationFailed, match="did not start again .*HOST_NOT_ENOUGH_FREE_MEMORY"):
        migrate(src, dst)
    assert state(src) == HALTED and len(src.chain()) == 1 and src.disk() == bytes(src.expected)


def test_finish_failure_on_the_target_then_revert(hosts):
    src, dst, _ = hosts
    original = identity(src)
    dst.session.fail("vbd_create", XenAPIFailure("INTERNAL_ERROR", "vbd"))
    with pytest.raises(XenAPIFailure):
        migrate(src, dst)
    assert dst.session.vms == {} and dst.session.vdis == {}  # the half-made import was undone
    inst = src.driver.get_instance(UUID)
    dst.driver.destroy(inst, [])
    assert dst.vhds() == []
    src.driver.finish_revert_migration(inst, [], migration())
    assert_source_as_before(src, *original)


def test_a_corrupt_copy_is_refused_on_the_target(hosts):
    src, dst, _ = hosts
    inst = src.driver.get_instance(UUID)
    disk_info = src.driver.migrate_disk_and_power_off(inst, "h2", SMALL, []).disk_info
    base = dst.sr / f"migrate-{UUID}-0-1.vhd"
    with open(base, "r+b") as f:  # a different parent: the leaf's parent UUID no longer matches
        f.seek(base.stat().st_size - 512 + 68)
        f.write(b"\x42" * 16)
    raw = base.read_bytes()
    footer = bytearray(raw[-512:])
    footer[64:68] = bytes(4)
    footer[64:68] = (~sum(footer) & 0xFFFFFFFF).to_bytes(4, "big")
    with open(base, "r+b") as f:
        f.write(bytes(footer))
        f.seek(len(raw) - 512)
        f.write(bytes(footer))
    with pytest.raises(Exception, match="parent UUID mismatch"):
        dst.driver.finish_migration(migration(), inst, disk_info, [], {}, False)
    assert dst.session.vms == {}


def test_stub_state_survives_a_new_session(hosts):
    src, _, _ = hosts
    again = StubSession(str(src.sr), "h1")
    assert again.vm_get_record(again.vm_get_by_uuid(UUID)).name_label == "vm1"
    assert again.guest_read(UUID, 0, 4 * MiB) == bytes(src.expected[:4 * MiB])
    assert json.loads((src.sr / ".xapi-stub.json").read_text())["vms"]
