"""The libvirt driver on shared storage: one instance directory both hosts see, and its marker.

Two drivers (hostA, the source, and hostB) on one real instances
directory, each with its own fake libvirtd.
"""

from __future__ import annotations

import json
import logging

import libvirt
import pytest

from driver.errors import PowerOffFailed
from driver.libvirt import DriverConfig, LibvirtDriver, sharing

from .fakes import FakeConn
from .test_libvirt_driver import MIGRATION, UUID, Env, make_env  # noqa: F401 (make_env is a fixture)


class Pair:
    """The source's Env on shared storage and the destination's driver on the same directory."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.conn = FakeConn(clock=env.clock)
        config = DriverConfig(instances_path=str(env.src), host_name="hostB")
        self.dest = LibvirtDriver(config, connect=lambda uri: self.conn, runner=env.qemu,
                                  remote_fs=env.target.remote_fs, sleep=env.clock.sleep, clock=env.clock)

    @property
    def marker(self):
        return self.env.inst_dir / sharing.MARKER

    def migrate_and_finish(self):
        inst, dom = self.env.add_instance()
        outcome = self.env.migrate(inst)
        assert outcome.shared is True
        self.dest.finish_migration(MIGRATION, inst, outcome.disk_info, [], {}, False)
        return inst, dom


@pytest.fixture
def pair(make_env) -> Pair:
    return Pair(make_env(shared=True))


def test_the_marker_is_there_before_the_guest_is_stopped(pair, monkeypatch):
    """A source agent killed right after the power-off must leave a marked directory: a rollback that
    never learnt the storage is shared then asks the destination to destroy with disks, and the
    marker is what keeps the one copy."""
    inst, _ = pair.env.add_instance()
    seen = []
    real = pair.env.driver.host.power_off
    monkeypatch.setattr(pair.env.driver.host, "power_off",
                        lambda *a: (seen.append(pair.marker.is_file()), real(*a))[1])
    pair.env.migrate(inst)
    assert seen == [True]
    pair.dest.destroy(inst, [], destroy_disks=True)  # the rollback's destroy, sharing unknown
    assert (pair.env.inst_dir / "disk").is_file()


def test_a_power_off_that_fails_takes_the_marker_back(pair, monkeypatch):
    inst, _ = pair.env.add_instance()

    def refuse(*a):
        raise PowerOffFailed(uuid=UUID, reason="the guest is stuck")
    monkeypatch.setattr(pair.env.driver.host, "power_off", refuse)
    with pytest.raises(PowerOffFailed):
        pair.env.migrate(inst)
    assert not pair.marker.exists()


def test_the_source_marks_the_shared_directory_before_the_copy_step(pair):
    inst, dom = pair.env.add_instance()
    pair.env.migrate(inst)
    note = json.loads(pair.marker.read_text())
    assert note == {**note, "source_host": "hostA", "dest": "hostB", "instance_uuid": UUID}
    assert not dom.isActive() and not pair.env.resize_dir.exists()


def test_the_destination_keeps_the_files_of_a_shared_migration_it_destroys(pair, caplog):
    pair.migrate_and_finish()
    caplog.set_level(logging.WARNING)
    pair.dest.destroy(pair.env.driver.get_instance(UUID), [], destroy_disks=True)
    assert UUID not in pair.conn.domains  # undefined there
    assert (pair.env.inst_dir / "disk").is_file() and pair.marker.is_file()
    assert "it is on shared storage and hostA's migration of it has not been confirmed" in caplog.text


def test_the_source_itself_keeps_the_files_while_its_shared_migration_is_open(pair):
    inst, _ = pair.migrate_and_finish()
    pair.env.driver.destroy(inst, [], destroy_disks=True)  # e.g. a clean-up of the source's old definition
    assert (pair.env.inst_dir / "disk").is_file() and pair.marker.is_file()


def test_revert_starts_the_source_from_the_same_directory_and_drops_the_marker(pair):
    inst, dom = pair.migrate_and_finish()
    pair.dest.destroy(inst, [], destroy_disks=True)
    pair.env.driver.finish_revert_migration(inst, [], MIGRATION)
    assert dom.isActive() and (pair.env.inst_dir / "disk").is_file()
    assert not pair.marker.exists()


def test_revert_after_the_source_domain_went_redefines_it_from_the_directory(pair):
    inst, dom = pair.migrate_and_finish()
    pair.env.conn.domains.pop(UUID)
    pair.env.driver.finish_revert_migration(inst, [], MIGRATION)
    assert pair.env.conn.domains[UUID].isActive() and pair.env.conn.defined
    assert not pair.marker.exists()


def test_revert_on_shared_storage_never_touches_a_stale_resize_directory_over_the_live_one(pair):
    inst, dom = pair.migrate_and_finish()
    pair.env.resize_dir.mkdir()
    pair.env.driver.finish_revert_migration(inst, [], MIGRATION)
    assert (pair.env.inst_dir / "disk").is_file() and pair.env.resize_dir.is_dir()


def test_confirm_undefines_the_source_and_leaves_the_directory_to_the_destination(pair):
    inst, dom = pair.migrate_and_finish()
    pair.env.driver.confirm_migration(MIGRATION, inst, [])
    assert UUID not in pair.env.conn.domains
    assert (pair.env.inst_dir / "disk").is_file() and not pair.marker.exists()
    assert pair.conn.domains[UUID].isActive()
    pair.dest.destroy(inst, [], destroy_disks=True)  # the destination owns it now
    assert not pair.env.inst_dir.exists()


def test_a_host_removes_only_its_own_marker(pair):
    pair.migrate_and_finish()
    sharing.unmark(pair.dest.layout, UUID, "hostB")
    assert pair.marker.is_file()
    sharing.unmark(pair.dest.layout, UUID, "hostA")
    assert not pair.marker.exists()


def test_an_unreadable_marker_still_keeps_the_files(pair):
    inst, _ = pair.env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    pair.marker.write_text("{not json")
    pair.env.driver.destroy(inst, [], destroy_disks=True)
    assert (pair.env.inst_dir / "disk").is_file()


def test_without_a_marker_destroy_removes_the_directory(pair):
    inst, _ = pair.env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    pair.env.driver.destroy(inst, [], destroy_disks=True)
    assert not pair.env.inst_dir.exists()
