"""The XenServer driver's pre-copy through the real stream copier and a real OpenSSH sshd.

The two hosts are StubSessions (no XenServer exists here) over SR
directories on this machine; the VHDs cross a private sshd on loopback,
received by ``coldferry receive`` as on a real destination.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from driver.errors import MigrationFailed
from driver.model import Flavor, Instance, Migration
from driver.xenserver import vhd
from driver.xenserver.copier import StreamCopier
from driver.xenserver.driver import XenServerDriver
from driver.xenserver.session import HALTED, RUNNING, XenAPIFailure
from driver.xenserver.stub_session import StubSession
from tests.conftest import coldferry_command
from transfer.options import CopyOptions

MiB = 1 << 20
UUID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
FLAVOR = Flavor("small", 1, 1024, 1)


@pytest.fixture
def pair(sshd, tmp_path):
    sr1, sr2 = tmp_path / "sr1", tmp_path / "sr2"
    s1, s2 = StubSession(str(sr1), "h1"), StubSession(str(sr2), "h2")
    copier = StreamCopier(str(sr2), ssh_user=sshd.user, ssh_port=sshd.port, ssh_identity=str(sshd.identity),
                          ssh_known_hosts=str(sshd.known_hosts), remote_command=tuple(coldferry_command()),
                          options=CopyOptions(streams=3, compress="auto", fsync=True))
    src = XenServerDriver(s1, copier, "h1", coalesce_timeout=0)
    dst = XenServerDriver(s2, copier, "h2")
    s1.add_vm(UUID, "vm1", 128 * MiB)
    written = bytearray(128 * MiB)
    for offset in (0, 40 * MiB + 512, 100 * MiB):
        data = os.urandom(8 * MiB)
        s1.guest_write(UUID, offset, data)
        written[offset:offset + len(data)] = data
    return sshd, s1, s2, src, dst, sr2, written


def test_precopy_over_ssh(pair):
    sshd, s1, s2, src, dst, sr2, written = pair
    inst = src.get_instance(UUID)
    outcome = src.migrate_disk_and_power_off(inst, sshd.host, FLAVOR, [])
    finished = dst.finish_migration(Migration("m1", UUID, "h1", "h2"), Instance(UUID, "vm1", FLAVOR, "h2"),
                                    outcome.disk_info, [], {}, False)
    assert {c.method for c in outcome.copies} == {"stream"}
    assert outcome.bytes_before_power_off >= 24 * MiB
    assert outcome.bytes_after_power_off < 64 * 1024  # the empty leaf's metadata and the JSON file
    assert s1.vm_get_power_state(s1.vm_get_by_uuid(UUID)) == HALTED
    assert s2.vm_get_power_state(s2.vm_get_by_uuid(UUID)) == RUNNING
    assert s2.guest_read(UUID, 0, 128 * MiB) == bytes(written)
    leaf = s2.vdi_get_record(s2.vm_get_disks(s2.vm_get_by_uuid(UUID))[0][1]).location
    assert len(vhd.validate_chain(str(Path(sr2) / leaf))) == 2
    assert finished.running_at >= outcome.powered_off_at


def test_failure_after_the_base_copy_removes_it_on_the_target(pair):
    sshd, s1, _s2, src, _dst, sr2, written = pair
    s1.fail("vm_hard_shutdown", XenAPIFailure("INTERNAL_ERROR", "xenopsd"))
    with pytest.raises(MigrationFailed, match="kept running"):
        src.migrate_disk_and_power_off(src.get_instance(UUID), sshd.host, FLAVOR, [])
    assert [n for n in os.listdir(sr2) if n.startswith(("migrate-", ".migrate-"))] == []
    assert s1.guest_read(UUID, 0, 128 * MiB) == bytes(written)
    leaf = s1.vdi_get_record(s1.vm_get_disks(s1.vm_get_by_uuid(UUID))[0][1]).location
    assert len(vhd.validate_chain(str(Path(s1.sr_path) / leaf))) == 1
