"""MemoryDriver: the in-memory hosts follow the libvirt driver's migration semantics."""

from __future__ import annotations

import pytest

from driver.errors import (DriverError, InstanceNotFound, InsufficientSpace, InvalidInstanceState,
                           MigrationFailed, ResizeDown)
from driver.memory import GiB, MemoryCloud, MemoryDriver
from driver.model import Flavor, Instance, MigrateOutcome, Migration, PowerState

SMALL = Flavor("small", 2, 1024, 10)
BIG = Flavor("big", 4, 4096, 20)
UUID = "11111111-2222-3333-4444-555555555555"


class Now:
    """Epoch seconds that advance ten seconds per reading."""

    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        self.t += 10
        return self.t


@pytest.fixture
def hosts():
    cloud = MemoryCloud()
    now = Now()
    src = MemoryDriver("h1", cloud, "198.18.0.11", now=now)
    dst = MemoryDriver("h2", cloud, "198.18.0.12", now=now)
    return src, dst


def migration() -> Migration:
    return Migration("m1", UUID, "h1", "h2")


def migrate(src: MemoryDriver, dst: MemoryDriver, flavor: Flavor = SMALL, power_on: bool = True) -> MigrateOutcome:
    inst = src.get_instance(UUID)
    outcome = src.migrate_disk_and_power_off(inst, dst.address, flavor, [])
    dst.finish_migration(migration(), Instance(UUID, inst.name, flavor, "h2"), outcome.disk_info, [], {},
                         flavor != inst.flavor, None, power_on)
    return outcome


def test_inventory_and_resources_sum_instances(hosts):
    src, _ = hosts
    src.add_instance(UUID, "vm1", SMALL)
    src.add_instance("other", "vm2", Flavor("e", 1, 512, 5, ephemeral_gb=3), PowerState.SHUTDOWN)
    res = src.host_resources()
    assert (res.vcpus_used, res.memory_mb_used, res.disk_gb_used, res.instances) == (3, 1536, 18, 2)
    assert (res.hostname, res.arch, res.hypervisor_type) == ("h1", "x86_64", "QEMU")
    assert src.disks("other") == {"disk": 5 * GiB, "disk.local": 3 * GiB}
    assert {i.uuid: i.power_state for i in src.list_instances()} == {UUID: PowerState.RUNNING,
                                                                     "other": PowerState.SHUTDOWN}


def test_configurable_capacity():
    drv = MemoryDriver("h", vcpus=8, memory_mb=2048, disk_gb=50, arch="aarch64", hypervisor_type="xen")
    res = drv.host_resources()
    assert (res.vcpus, res.memory_mb, res.disk_gb, res.arch, res.hypervisor_type) == (8, 2048, 50, "aarch64", "xen")


def test_get_instance_unknown_and_copies_are_detached(hosts):
    src, _ = hosts
    with pytest.raises(InstanceNotFound, match="not defined on this host"):
        src.get_instance("nope")
    src.add_instance(UUID, "vm1", SMALL)
    src.get_instance(UUID).power_state = PowerState.CRASHED  # a caller's copy, not the host's state
    assert src.get_instance(UUID).power_state == PowerState.RUNNING


def test_power_off_and_on(hosts):
    src, _ = hosts
    inst = src.add_instance(UUID, "vm1", SMALL)
    src.power_off(inst)
    assert src.get_instance(UUID).power_state == PowerState.SHUTDOWN
    src.power_on(inst)
    assert src.get_instance(UUID).power_state == PowerState.RUNNING


def test_cold_migration_and_confirm(hosts):
    src, dst = hosts
    src.add_instance(UUID, "vm1", SMALL)
    outcome = migrate(src, dst)
    assert [d.virt_disk_size for d in outcome.disk_info] == [10 * GiB]
    moved = dst.get_instance(UUID)
    assert (moved.host, moved.power_state, moved.name) == ("h2", PowerState.RUNNING, "vm1")
    assert dst.disks(UUID) == {"disk": 10 * GiB}
    # the source keeps its copy, shut off, until confirm
    assert src.get_instance(UUID).power_state == PowerState.SHUTDOWN
    assert src.kept_disks(UUID) == {"disk": 10 * GiB} and src.disks(UUID) == {}
    assert (outcome.shared, outcome.precopy, outcome.was_running, outcome.powered_off_at) == (
        False, False, True, 1_800_000_010.0)
    assert [c.sent for c in outcome.copies] == [10 * GiB]
    assert (outcome.bytes_before_power_off, outcome.bytes_after_power_off) == (0, 10 * GiB)
    src.confirm_migration(migration(), src.get_instance(UUID), [])
    assert src.list_instances() == [] and src.kept_disks(UUID) == {}
    assert src.host_resources().disk_gb_used == 0


def test_migration_to_host_name_grows_disk(hosts):
    src, dst = hosts
    src.add_instance(UUID, "vm1", SMALL)
    inst = src.get_instance(UUID)
    outcome = src.migrate_disk_and_power_off(inst, "h2", BIG, [])
    finished = dst.finish_migration(migration(), Instance(UUID, "vm1", BIG), outcome.disk_info, [], {}, True,
                                    power_on=False)
    assert finished.running_at is None
    assert dst.disks(UUID) == {"disk": 20 * GiB}
    assert dst.get_instance(UUID).power_state == PowerState.SHUTDOWN
    assert dst.get_instance(UUID).flavor == BIG


def test_revert_restores_source_and_destroy_cleans_dest(hosts):
    src, dst = hosts
    src.add_instance(UUID, "vm1", SMALL)
    migrate(src, dst)
    dst.destroy(dst.get_instance(UUID), [])
    assert dst.list_instances() == [] and dst.disks(UUID) == {}
    src.finish_revert_migration(src.get_instance(UUID), [], migration(), power_on=True)
    assert src.get_instance(UUID).power_state == PowerState.RUNNING
    assert src.disks(UUID) == {"disk": 10 * GiB} and src.kept_disks(UUID) == {}


def test_revert_without_power_on_leaves_it_off(hosts):
    src, dst = hosts
    src.add_instance(UUID, "vm1", SMALL)
    migrate(src, dst)
    src.finish_revert_migration(src.get_instance(UUID), [], migration(), power_on=False)
    assert src.get_instance(UUID).power_state == PowerState.SHUTDOWN


def test_confirm_refuses_a_running_source(hosts):
    src, _ = hosts
    inst = src.add_instance(UUID, "vm1", SMALL)
    with pytest.raises(InvalidInstanceState, match="refusing to remove it"):
        src.confirm_migration(migration(), inst, [])
    assert src.get_instance(UUID).power_state == PowerState.RUNNING


@pytest.mark.parametrize("state", [PowerState.PAUSED, PowerState.SUSPENDED])
def test_paused_or_suspended_is_refused(hosts, state):
    src, dst = hosts
    inst = src.add_instance(UUID, "vm1", SMALL, power_state=state)
    with pytest.raises(InvalidInstanceState, match=state.name.lower()):
        src.migrate_disk_and_power_off(inst, "h2", SMALL, [])
    assert src.get_instance(UUID).power_state == state and dst.disks(UUID) == {}


def test_shrinking_flavor_is_refused_before_power_off(hosts):
    src, _ = hosts
    inst = src.add_instance(UUID, "vm1", BIG)
    with pytest.raises(ResizeDown, match="root_gb >= 20"):
        src.migrate_disk_and_power_off(inst, "h2", SMALL, [])
    assert src.get_instance(UUID).power_state == PowerState.RUNNING


def test_full_destination_is_refused_before_power_off():
    cloud = MemoryCloud()
    src = MemoryDriver("h1", cloud)
    MemoryDriver("h2", cloud, disk_gb=5)
    inst = src.add_instance(UUID, "vm1", SMALL)
    with pytest.raises(InsufficientSpace, match="host h2 has 5.0 GiB free"):
        src.migrate_disk_and_power_off(inst, "h2", SMALL, [])
    assert src.get_instance(UUID).power_state == PowerState.RUNNING


def test_unknown_destination_and_self_are_errors(hosts):
    src, _ = hosts
    inst = src.add_instance(UUID, "vm1", SMALL)
    with pytest.raises(DriverError, match="cannot reach host h9"):
        src.migrate_disk_and_power_off(inst, "h9", SMALL, [])
    with pytest.raises(DriverError, match="is this host"):
        src.migrate_disk_and_power_off(inst, "198.18.0.11", SMALL, [])


@pytest.mark.parametrize("state", [PowerState.RUNNING, PowerState.SHUTDOWN])
def test_copy_failure_restores_source_power_state(hosts, state):
    src, dst = hosts
    inst = src.add_instance(UUID, "vm1", SMALL, power_state=state)
    src.fail("copy", OSError("link down"))
    with pytest.raises(MigrationFailed, match="link down") as exc:
        src.migrate_disk_and_power_off(inst, "h2", SMALL, [])
    assert ("started again" in str(exc.value)) == (state == PowerState.RUNNING)
    assert src.get_instance(UUID).power_state == state
    assert src.disks(UUID) == {"disk": 10 * GiB} and src.kept_disks(UUID) == {}
    assert dst.disks(UUID) == {} and dst.host_resources().disk_gb_used == 0


def test_fail_knob_hits_only_the_next_call(hosts):
    src, _ = hosts
    inst = src.add_instance(UUID, "vm1", SMALL)
    src.fail("power_off", DriverError(reason="stuck"))
    with pytest.raises(DriverError, match="stuck"):
        src.power_off(inst)
    src.power_off(inst)
    assert src.get_instance(UUID).power_state == PowerState.SHUTDOWN


def test_finish_without_copied_definition_is_an_error(hosts):
    _, dst = hosts
    with pytest.raises(DriverError, match="copied domain definition .* is missing"):
        dst.finish_migration(migration(), Instance(UUID, "vm1", SMALL), [], [], {}, False)


def test_progress_and_step_delay_with_injected_sleep():
    cloud = MemoryCloud()
    sleeps: list[float] = []
    src = MemoryDriver("h1", cloud, step_delay=0.5, copy_steps=4, sleep=sleeps.append)
    MemoryDriver("h2", cloud)
    inst = src.add_instance(UUID, "vm1", Flavor("e", 1, 512, 1, ephemeral_gb=1))
    seen: list[tuple[str, int, int]] = []
    src.migrate_disk_and_power_off(inst, "h2", inst.flavor, [], progress=lambda name, p: seen.append(
        (name, p.done, p.total)))
    assert sleeps == [0.5] * 8
    assert seen[:4] == [("disk", GiB * k // 4, GiB) for k in range(1, 5)]
    assert seen[-1] == ("disk.local", GiB, GiB)


def test_live_migration_keeps_it_running(hosts):
    src, dst = hosts
    inst = src.add_instance(UUID, "vm1", SMALL)
    seen: list[str] = []
    out = src.live_migration(inst, "h2", progress=lambda name, p: seen.append(name))
    assert out.migration_s >= out.downtime_s >= 0 and out.shared is False
    assert [c.sent for c in out.copies] == [10 * GiB] and seen == ["disk"] * 4
    assert dst.get_instance(UUID).power_state == PowerState.RUNNING and dst.disks(UUID) == {"disk": 10 * GiB}
    assert src.list_instances() == [] and src.disks(UUID) == {}


def test_live_migration_needs_a_running_instance_and_keeps_it_on_failure(hosts):
    src, dst = hosts
    off = src.add_instance("off", "vm0", SMALL, power_state=PowerState.SHUTDOWN)
    with pytest.raises(InvalidInstanceState, match="use a cold migration"):
        src.live_migration(off, "h2")
    inst = src.add_instance(UUID, "vm1", SMALL)
    src.fail("copy", OSError("broken pipe"))
    with pytest.raises(MigrationFailed, match="kept running"):
        src.live_migration(inst, "h2")
    assert src.get_instance(UUID).power_state == PowerState.RUNNING and dst.disks(UUID) == {}


def test_disk_info_names_disks_by_basename(hosts):
    src, dst = hosts
    src.add_instance(UUID, "vm1", SMALL, disks={"disk": 3 * GiB, "disk.local": GiB})
    info = migrate(src, dst).disk_info
    assert [(d.path.rsplit("/", 1)[1], d.target) for d in info] == [("disk", "vda"), ("disk.local", "vdb")]


def test_finish_reports_when_it_ran_and_a_stopped_source_was_not_running(hosts):
    src, dst = hosts
    src.add_instance(UUID, "vm1", SMALL, power_state=PowerState.SHUTDOWN)
    outcome = src.migrate_disk_and_power_off(src.get_instance(UUID), "h2", SMALL, [])
    assert outcome.was_running is False
    finished = dst.finish_migration(migration(), Instance(UUID, "vm1", SMALL, "h2"), outcome.disk_info, [], {}, False)
    assert finished.running_at == outcome.powered_off_at + 10  # the next reading of the shared clock


# -- shared storage -------------------------------------------------------------------------

@pytest.fixture
def shared():
    cloud = MemoryCloud(shared_storage=[("h1", "h2")])
    src, dst = MemoryDriver("h1", cloud, "198.18.0.11"), MemoryDriver("h2", cloud, "198.18.0.12")
    src.add_instance(UUID, "vm1", SMALL)
    return src, dst


def test_shared_storage_migration_copies_nothing_and_marks_the_directory(shared):
    src, dst = shared
    outcome = migrate(src, dst)
    assert outcome.shared is True and outcome.copies == [] and outcome.bytes_sent == 0
    assert [d.path for d in outcome.disk_info] == [f"/memory/{UUID}/disk"]
    assert src.kept_disks(UUID) == {} and src.disks(UUID) == dst.disks(UUID) == {"disk": 10 * GiB}
    assert src.shared_by(UUID) == dst.shared_by(UUID) == "h1"
    assert dst.get_instance(UUID).power_state == PowerState.RUNNING


def test_shared_storage_revert_keeps_the_disks_through_the_destinations_destroy(shared):
    src, dst = shared
    migrate(src, dst)
    dst.destroy(dst.get_instance(UUID), [], destroy_disks=True)
    assert dst.list_instances() == [] and src.disks(UUID) == {"disk": 10 * GiB}
    src.finish_revert_migration(src.get_instance(UUID), [], migration())
    assert src.get_instance(UUID).power_state == PowerState.RUNNING and src.shared_by(UUID) == ""


def test_shared_storage_confirm_only_undefines_the_source(shared):
    src, dst = shared
    migrate(src, dst)
    src.confirm_migration(migration(), src.get_instance(UUID), [])
    assert src.list_instances() == [] and dst.disks(UUID) == {"disk": 10 * GiB} and dst.shared_by(UUID) == ""
    dst.destroy(dst.get_instance(UUID), [], destroy_disks=True)  # the destination's own now
    assert dst.disks(UUID) == {}


def test_shared_storage_live_migration_moves_only_the_definition(shared):
    src, dst = shared
    outcome = src.live_migration(src.get_instance(UUID), "h2")
    assert outcome.shared is True and outcome.copies == []
    assert src.list_instances() == [] and dst.disks(UUID) == {"disk": 10 * GiB}
    assert dst.get_instance(UUID).power_state == PowerState.RUNNING


def test_hosts_outside_a_shared_group_keep_their_own_directory():
    cloud = MemoryCloud(shared_storage=[("h1", "h2")])
    h1, h3 = MemoryDriver("h1", cloud), MemoryDriver("h3", cloud)
    h1.add_instance(UUID, "vm1", SMALL)
    assert h3.disks(UUID) == {}
    assert h1.migrate_disk_and_power_off(h1.get_instance(UUID), "h3", SMALL, []).shared is False
