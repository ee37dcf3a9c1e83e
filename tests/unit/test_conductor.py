"""The conductor's state machine over in-memory hosts behind real agent apps."""

from __future__ import annotations

from agent import schemas as s

import time
from pathlib import Path

import pytest

from controller.records import MigrationStatus, MigrationType
from controller.conductor import LostJob
from controller.errors import BadRequest, Conflict, NotFound, NoValidHost
from driver.errors import DriverError
from driver.model import Flavor, PowerState
from tests.unit.controller_env import Env

VM = "00000000-0000-4000-8000-00000000000a"
VM2 = "00000000-0000-4000-8000-00000000000b"
RUNNING, SHUTDOWN, PAUSED = int(PowerState.RUNNING), int(PowerState.SHUTDOWN), int(PowerState.PAUSED)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env.make(tmp_path, n=3)
    e.add("host1", VM, "web")
    return e


def test_cold_migration_to_a_named_host_finishes_then_confirms(env: Env) -> None:
    m = env.conductor.migrate("web", "host2")
    assert (m.status, m.source_compute, m.dest_compute, m.dest_address) == \
        (MigrationStatus.PRE_MIGRATING, "host1", "host2", "198.18.0.12")
    m = env.wait(m.id)
    assert m.status == MigrationStatus.FINISHED, m.error
    assert m.task_state is None and m.bytes_sent > 0 and m.digests and m.downtime_s is not None
    assert m.shared is False and m.old_power_state is PowerState.RUNNING
    server = env.ctl.conductor.inventory.find(VM)
    assert (server.host, server.status, server.power_state) == ("host2", "VERIFY_RESIZE", RUNNING)
    assert env.where(VM) == {"host1": SHUTDOWN, "host2": RUNNING}   # source kept until confirm

    env.conductor.confirm(m.id)
    m = env.wait(m.id, frozenset({MigrationStatus.CONFIRMED, MigrationStatus.ERROR}))
    assert m.status == MigrationStatus.CONFIRMED, m.error
    assert env.where(VM) == {"host2": RUNNING}
    assert env.drivers["host1"].kept_disks(VM) == {}


def test_stopped_server_stays_stopped_on_the_target(env: Env) -> None:
    env.add("host1", VM2, "db", PowerState.SHUTDOWN)
    m = env.wait(env.conductor.migrate(VM2, "host3").id)
    assert m.status == MigrationStatus.FINISHED and m.downtime_s is None
    assert env.where(VM2)["host3"] == SHUTDOWN


def test_scheduler_picks_the_host_with_most_free_ram(env: Env) -> None:
    env.add("host2", VM2, "big", flavor=Flavor("big", 2, 32768, 1))
    m = env.wait(env.conductor.migrate("web").id)
    assert m.dest_compute == "host3" and m.status == MigrationStatus.FINISHED


def test_failing_rule_refused_unless_forced(env: Env) -> None:
    env.ctl.store.set_service("host2", False, "maintenance")
    with pytest.raises(NoValidHost, match="service_enabled.*maintenance"):
        env.conductor.migrate("web", "host2")
    check = env.conductor.check_destination("web", "host2")
    assert check["passes"] is False and check["failed"] == "service_enabled"
    m = env.wait(env.conductor.migrate("web", "host2", force=True).id)
    assert m.status == MigrationStatus.FINISHED and m.forced


def test_no_host_passes_lists_every_host(env: Env) -> None:
    for h in ("host2", "host3"):
        env.ctl.store.set_service(h, False, "maintenance")
    with pytest.raises(NoValidHost) as e:
        env.conductor.migrate("web")
    assert "host2" in str(e.value) and "host3" in str(e.value)


@pytest.mark.parametrize("args, error, text", [
    (("web", None, True), BadRequest, "force needs a target host"),
    (("web", "host1", False), BadRequest, "target host host1 is the source host"),
    (("web", "nohost", False), BadRequest, "unknown host 'nohost'"),
    (("ghost", "host2", False), NotFound, "server ghost not found"),
])
def test_bad_migrate_requests(env: Env, args: tuple, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        env.conductor.migrate(*args)
    assert env.ctl.store.list_migrations() == []


def test_paused_server_and_second_migration_conflict(env: Env) -> None:
    env.add("host1", VM2, "paused", PowerState.PAUSED)
    with pytest.raises(Conflict, match="paused: unpause it"):
        env.conductor.migrate("paused", "host2")
    m = env.wait(env.conductor.migrate("web", "host2").id)
    with pytest.raises(Conflict, match=f"migration {m.id} in status finished; confirm or revert"):
        env.conductor.migrate("web", "host3")


def test_revert_brings_the_server_back(env: Env) -> None:
    m = env.wait(env.conductor.migrate("web", "host2").id)
    env.conductor.revert(m.id)
    m = env.wait(m.id, frozenset({MigrationStatus.REVERTED, MigrationStatus.ERROR}))
    assert m.status == MigrationStatus.REVERTED, m.error
    assert env.where(VM) == {"host1": RUNNING}
    assert env.drivers["host2"].disks(VM) == {}
    with pytest.raises(Conflict, match="only a finished migration"):
        env.conductor.confirm(m.id)


def test_copy_failure_restores_the_source(env: Env) -> None:
    env.drivers["host1"].fail("copy", OSError("connection reset"))
    m = env.wait(env.conductor.migrate("web", "host2").id)
    assert m.status == MigrationStatus.ERROR and "connection reset" in m.error
    assert env.where(VM) == {"host1": RUNNING}
    assert env.drivers["host2"].disks(VM) == {}


def test_finish_failure_on_the_target_rolls_back(env: Env) -> None:
    env.drivers["host2"].fail("finish_migration", DriverError(reason="bridge br9 missing"))
    m = env.wait(env.conductor.migrate("web", "host2").id)
    assert m.status == MigrationStatus.ERROR
    assert "bridge br9 missing" in m.error and "the source was restored" in m.error
    assert env.where(VM) == {"host1": RUNNING}
    assert env.drivers["host2"].disks(VM) == {}


def test_restarted_controller_finishes_a_migration_its_agent_kept_running(env: Env) -> None:
    # What a killed controller leaves: the record says migrating and names the source's job.
    store = env.ctl.store
    m = store.create_migration(server=VM, server_name="web", source_compute="host1", dest_compute="host2",
                               dest_address="198.18.0.12", status=MigrationStatus.MIGRATING,
                               task_state="resize_migrating", old_power_state=RUNNING,
                               flavor=env.drivers["host1"].get_instance(VM).to_dict()["flavor"])
    job = env.agents["host1"].start(VM, "migrate-disk-and-power-off", s.MigrateRequest(dest="198.18.0.12"))
    store.update_migration(m.id, source_job=job.id)
    env.start_controller()
    assert env.ctl.start() == [m.id]
    m = env.wait(m.id)
    assert m.status == MigrationStatus.FINISHED, m.error
    assert env.where(VM) == {"host1": SHUTDOWN, "host2": RUNNING}


def test_restarted_agent_that_lost_the_copy_job_is_rolled_back(env: Env) -> None:
    store = env.ctl.store
    job = env.agents["host1"].start(VM, "migrate-disk-and-power-off", s.MigrateRequest(dest="198.18.0.12"))
    env.agents["host1"].wait(job.id)
    m = store.create_migration(server=VM, server_name="web", source_compute="host1", dest_compute="host2",
                               dest_address="198.18.0.12", status=MigrationStatus.MIGRATING, old_power_state=RUNNING,
                               source_job=job.id)
    env.restart_agent("host1")
    env.start_controller().start()
    m = env.wait(m.id)
    assert m.status == MigrationStatus.ERROR and "restarted" in m.error and "source was restored" in m.error
    assert env.where(VM) == {"host1": RUNNING}
    # The lost job never said whether the storage is shared: the destination is asked to remove its copy
    # (a shared directory would carry the source's marker, which the destination's driver respects).
    assert env.drivers["host2"].disks(VM) == {} and "by hand" not in m.error


def test_auto_confirm_after_the_window(tmp_path: Path) -> None:
    env = Env.make(tmp_path, auto_confirm_seconds=60)
    env.add("host1", VM, "web")
    m = env.wait(env.conductor.migrate("web", "host2").id)
    assert env.conductor.auto_confirm() == []          # too early
    env.conductor.clock = lambda: time.time() + 61
    assert env.conductor.auto_confirm() == [m.id]
    assert env.wait(m.id, frozenset({MigrationStatus.CONFIRMED})).status == MigrationStatus.CONFIRMED


def test_live_migration_completes_without_confirm(env: Env) -> None:
    m = env.wait(env.conductor.migrate("web", "host2", live=True).id)
    assert (m.migration_type, m.status) == (MigrationType.LIVE, MigrationStatus.COMPLETED)
    assert env.where(VM) == {"host2": RUNNING}


def test_unknown_migration(env: Env) -> None:
    with pytest.raises(NotFound):
        env.conductor.confirm(999)


def test_failed_revert_leaves_the_migration_finished_so_it_can_be_retried(env: Env) -> None:
    m = env.wait(env.conductor.migrate("web", "host2").id)
    env.drivers["host2"].fail("destroy", DriverError(reason="libvirt is busy"))
    env.conductor.revert(m.id)
    m = env.wait(m.id, frozenset({MigrationStatus.FINISHED, MigrationStatus.REVERTED, MigrationStatus.ERROR}), timeout=10)
    deadline = time.monotonic() + 10
    while m.status != MigrationStatus.FINISHED or not m.error:
        assert time.monotonic() < deadline, m
        time.sleep(0.01)
        m = env.conductor.get(m.id)
    assert "libvirt is busy" in m.error and "revert again" in m.error
    assert env.where(VM) == {"host1": SHUTDOWN, "host2": RUNNING}
    env.conductor.revert(m.id)
    assert env.wait(m.id, frozenset({MigrationStatus.REVERTED, MigrationStatus.ERROR})).status == MigrationStatus.REVERTED
    assert env.where(VM) == {"host1": RUNNING}


@pytest.mark.parametrize("source, target, force, text", [
    ("host1", None, True, "force needs a target host"),
    ("host1", "host1", False, "target host host1 is the source host"),
    ("host1", "nohost", True, "unknown host 'nohost'; configured hosts: host1, host2, host3"),
    ("nohost", "host2", False, "unknown host 'nohost'"),
])
def test_check_target_refuses(env: Env, source: str, target: str | None, force: bool, text: str) -> None:
    with pytest.raises(BadRequest, match=text):
        env.conductor.check_target(source, target, force)


def test_check_target_gives_the_target_record_or_none(env: Env) -> None:
    assert env.conductor.check_target("host1", "host2", True).address == "198.18.0.12"
    assert env.conductor.check_target("host1", None, False) is None


def test_copy_asks_the_source_for_the_target_address_and_flavor_only(env: Env) -> None:
    bodies = []
    agent = env.agents["host1"]
    real = agent.start

    def start(uuid, op, body):
        bodies.append((op, body))
        return real(uuid, op, body)
    agent.start = start  # type: ignore[method-assign]
    m = env.wait(env.conductor.migrate("web", "host2").id)
    assert m.status == MigrationStatus.FINISHED, m.error
    op, request = bodies[0]
    body = request.model_dump(mode="json", exclude_unset=True)
    assert op == "migrate-disk-and-power-off" and set(body) == {"dest", "flavor", "job_id"}
    assert body["job_id"] == f"{m.uuid}-migrate-disk-and-power-off-1"
    assert body["dest"] == "198.18.0.12"   # the target's data-plane address, never its name


def test_a_job_the_agent_does_not_know_is_lost_not_waited_for(env: Env) -> None:
    # The agent answers 404 for the job: it restarted, so waiting for it to come back is pointless.
    with pytest.raises(LostJob, match="the agent of host1 no longer knows job j-lost"):
        env.conductor._wait_job("host1", "j-lost", lambda j: None)
