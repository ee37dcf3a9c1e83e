"""``coldferry driver CALL``: JSON in, JSON out, exit codes; the driver itself is patched.

``run`` imports LibvirtDriver and DriverConfig from ``driver.libvirt`` when a
call runs, so the tests patch them there.
"""

from __future__ import annotations

import argparse
import io
import json
from typing import Any

import libvirt
import pytest

import driver.libvirt
from coldferry import cli, driver_cmd
from driver.errors import InstanceNotFound, MigrationFailed
from driver.libvirt import DriverConfig, LibvirtDriver
from driver.model import (DiskInfo, FinishOutcome, Flavor, HostResources, Instance, LiveOutcome, MigrateOutcome,
                          Migration, PhaseName, PowerState, Vif)
from transfer.errors import HostKeyError
from transfer.result import CopyResult

from .fakes import FakeConn, FakeDomain, domain_xml

UUID = "6f1c3f9e-8a44-4d43-9a6e-0b1f3f7c2a10"
SMALL = Flavor("small", 1, 1024, 1, 0)
INST = Instance(UUID, "vm1", SMALL, "h1", PowerState.RUNNING)


@pytest.fixture
def config_file(tmp_path) -> str:
    p = tmp_path / "agent.toml"
    p.write_text(f'[driver]\ninstances_path = "{tmp_path}/instances"\nhost_name = "h1"\nshutdown_timeout = 45\n'
                 'shutdown_retry_interval = 5\n')
    return str(p)


@pytest.fixture
def drv(mocker):
    """The driver ``run`` builds: an autospec'd LibvirtDriver holding the real loaded config."""
    made: list[Any] = []

    def build(config: DriverConfig) -> Any:
        d = mocker.create_autospec(LibvirtDriver, instance=True)
        d.config = config
        d.get_instance.return_value = INST
        d.list_instances.return_value = []
        for name in ("power_on", "power_off", "confirm_migration", "finish_revert_migration", "destroy"):
            getattr(d, name).return_value = None  # as the real calls return
        d.migrate_disk_and_power_off.return_value = MigrateOutcome([])
        d.finish_migration.return_value = FinishOutcome(running_at=1700000100.25)
        made.append(d)
        return d
    mocker.patch.object(driver.libvirt, "LibvirtDriver", side_effect=build)
    build.made = made  # type: ignore[attr-defined]
    return build


def call(name: str, stdin: str, config_file: str, monkeypatch, capsys) -> tuple[int, dict[str, Any]]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = driver_cmd.run(argparse.Namespace(config=config_file, call=name))
    return rc, json.loads(capsys.readouterr().out)


@pytest.fixture
def run(config_file, monkeypatch, capsys):
    return lambda name, args=None, raw=None: call(name, raw if raw is not None else json.dumps(args or {}),
                                                  config_file, monkeypatch, capsys)


def the(drv) -> Any:
    [d] = drv.made
    return d


def test_the_driver_gets_the_loaded_configuration(drv, run):
    rc, out = run("list-instances", raw="")  # empty input: no arguments
    d = the(drv)
    assert rc == 0 and out == {"result": []}
    d.list_instances.assert_called_once_with()
    assert (d.config.host_name, d.config.shutdown_timeout, d.config.instances_path.endswith("/instances")) == (
        "h1", 45, True)


def test_list_instances_output(drv, run, mocker):
    mocker.patch.object(driver.libvirt, "LibvirtDriver",
                        side_effect=lambda cfg: mocker.Mock(config=cfg, list_instances=lambda: [INST]))
    rc, out = run("list-instances")
    assert (rc, out) == (0, {"result": [{"uuid": UUID, "name": "vm1", "host": "h1", "power_state": 1,
                                         "flavor": {"name": "small", "vcpus": 1, "memory_mb": 1024, "root_gb": 1,
                                                    "ephemeral_gb": 0}}]})


def test_get_instance(drv, run):
    rc, out = run("get-instance", {"uuid": UUID})
    assert rc == 0 and out["result"]["uuid"] == UUID and out["result"]["power_state"] == 1
    the(drv).get_instance.assert_called_once_with(UUID)


def test_host_resources(mocker, run):
    res = HostResources("h1", "x86_64", "QEMU", 8002000, 8, 2, 16000, 2048, 100, 10, 2, {"kvm": True})
    mocker.patch.object(driver.libvirt, "LibvirtDriver",
                        side_effect=lambda cfg: mocker.Mock(host_resources=lambda: res))
    rc, out = run("host-resources")
    assert rc == 0
    assert out["result"]["hypervisor_version"] == 8002000 and out["result"]["extra"] == {"kvm": True}


def test_power_on(drv, run):
    rc, out = run("power-on", {"uuid": UUID})
    assert (rc, out) == (0, {"result": None})
    the(drv).power_on.assert_called_once_with(INST)


def test_power_off_with_timeout(drv, run):
    rc, _ = run("power-off", {"uuid": UUID, "timeout": "30", "retry_interval": 5})
    assert rc == 0
    the(drv).power_off.assert_called_once_with(INST, 30, 5)


DISK = DiskInfo("qcow2", "/i/disk", 20 << 30, "", 1 << 30, 19 << 30, "vda")


def test_migrate_passes_arguments_and_reports_the_copies_and_precopy_figures(drv, run):
    def migrate(inst, dest, flavor, vifs, bdi, timeout, retry, timeline):
        timeline.add(PhaseName.SHUTDOWN, 1700000000.0, 1700000000.5)
        return MigrateOutcome([DISK], [CopyResult("stream", 10, 8, 6, 2, 0, 0.5, "xxh3:abc")], precopy=True,
                              was_running=True, powered_off_at=1700000000.5, bytes_before_power_off=7)
    driver.libvirt.LibvirtDriver.side_effect = _with(drv, migrate_disk_and_power_off=migrate)
    rc, out = run("migrate-disk-and-power-off", {
        "uuid": UUID, "dest": "h2", "timeout": 60, "retry_interval": 10,
        "flavor": {"name": "big", "vcpus": 2, "memory_mb": 2048, "root_gb": 20},
        "network_info": [{"address": "52:54:00:00:00:01", "bridge": "br0"}]})
    assert rc == 0
    assert out["result"] == {"disk_info": DiskInfo.dumps([DISK]), "shared": False, "precopy": True, "copies": [
        {"method": "stream", "size": 10, "sent": 8, "wire": 6, "skipped": 2, "resumed": 0, "seconds": 0.5,
         "digest": "xxh3:abc"}], "powered_off_at": 1700000000.5, "bytes_before_power_off": 7,
        "bytes_after_power_off": 1, "was_running": True, "bytes_sent": 8, "bytes_skipped": 2, "rate": 16.0,
        "digests": ["xxh3:abc"], "phases": [{"phase": "shutdown", "host": "", "start": 1700000000.0,
                                             "end": 1700000000.5, "seconds": 0.5, "detail": ""}]}
    args = the(drv).migrate_disk_and_power_off.call_args.args
    assert args == (INST, "h2", Flavor("big", 2, 2048, 20, 0), [Vif("52:54:00:00:00:01", "bridge", "br0")],
                    None, 60, 10)


def _with(drv, **methods: Any):
    """A LibvirtDriver side effect that builds the autospec'd driver with some methods replaced."""
    build = drv

    def make(config: DriverConfig) -> Any:
        d = build(config)
        for name, fn in methods.items():
            getattr(d, name).side_effect = fn
        return d
    return make


def test_migrate_keeps_the_flavor_without_one(drv, run):
    rc, out = run("migrate-disk-and-power-off", {"uuid": UUID, "dest": "h2"})
    assert rc == 0 and out["result"] == {"disk_info": "[]", "shared": False, "precopy": False, "copies": [],
                                         "powered_off_at": None, "bytes_before_power_off": 0,
                                         "bytes_after_power_off": 0, "was_running": False, "bytes_sent": 0,
                                         "bytes_skipped": 0, "rate": 0.0, "digests": [], "phases": []}
    assert the(drv).migrate_disk_and_power_off.call_args.args[2] == SMALL


def test_migrate_without_timeout_uses_the_configured_clean_shutdown(drv, run):
    run("migrate-disk-and-power-off", {"uuid": UUID, "dest": "h2"})
    assert the(drv).migrate_disk_and_power_off.call_args.args[5:] == (45, 5)


def test_finish_migration_builds_the_instance_from_the_arguments(drv, run):
    rc, out = run("finish-migration", {
        "uuid": UUID, "name": "vm1", "disk_info": DiskInfo.dumps([DISK]), "resize_instance": True,
        "power_on": False, "flavor": {"name": "big", "vcpus": 2, "memory_mb": 2048, "root_gb": 20, "ephemeral_gb": 5},
        "migration": {"id": "m-7", "source_host": "h0"}})
    assert (rc, out) == (0, {"result": {"running_at": 1700000100.25, "phases": []}})
    d = the(drv)
    d.get_instance.assert_not_called()
    mig, inst, disk_info, vifs, meta, resize, bdi, power_on = d.finish_migration.call_args.args
    assert mig == Migration("m-7", UUID, "h0", "h1")
    assert inst == Instance(UUID, "vm1", Flavor("big", 2, 2048, 20, 5), "h1")
    assert (disk_info, vifs, meta, resize, bdi, power_on) == ([DISK], [], {}, True, None, False)


def test_finish_migration_defaults(drv, run):
    rc, _ = run("finish-migration", {"uuid": UUID, "name": "vm1", "disk_info": "[]",
                                     "flavor": {"name": "s", "vcpus": 1, "memory_mb": 1, "root_gb": 1}})
    args = the(drv).finish_migration.call_args.args
    assert rc == 0 and args[0] == Migration("manual", UUID, "", "h1") and args[5] is False and args[7] is True


def test_finish_migration_with_a_bad_disk_info_exits_2(drv, run):
    rc, out = run("finish-migration", {"uuid": UUID, "name": "vm1", "disk_info": "[{oops",
                                       "flavor": {"name": "s", "vcpus": 1, "memory_mb": 1, "root_gb": 1}})
    assert rc == 2 and out["error"] == "BadArguments"
    the(drv).finish_migration.assert_not_called()


def test_live_migrate_prints_the_figures(drv, run):
    def live(inst, dest, timeline):
        timeline.add(PhaseName.LIVE_MIGRATE, 1700000000.0, 1700000003.75, detail="x")
        return LiveOutcome(downtime_s=0.04, job_s=3.5, memory_bytes=1 << 30, prepare_s=1.0, migration_s=3.75,
                           flags=["LIVE", "PEER2PEER"], copies=[CopyResult("stream", 10, 8, 8, 2, 0, 0.5, "x")])
    driver.libvirt.LibvirtDriver.side_effect = _with(drv, live_migration=live)
    rc, out = run("live-migrate", {"uuid": UUID, "dest": "h2"})
    assert (rc, out) == (0, {"result": {"downtime_s": 0.04, "shared": False, "job_s": 3.5, "memory_bytes": 1 << 30,
                                        "prepare_s": 1.0, "migration_s": 3.75, "flags": ["LIVE", "PEER2PEER"],
                                        "phases": [{"phase": "live_migrate", "host": "", "start": 1700000000.0,
                                                    "end": 1700000003.75, "seconds": 3.75, "detail": "x"}]}})
    assert the(drv).live_migration.call_args.args == (INST, "h2")


def test_confirm_migration(drv, run):
    rc, _ = run("confirm-migration", {"uuid": UUID})
    assert rc == 0
    mig, inst, vifs = the(drv).confirm_migration.call_args.args
    # Only the uuid matters: the source definition may already be gone.
    assert (mig.instance_uuid, inst.uuid, vifs) == (UUID, UUID, [])
    assert the(drv).get_instance.call_count == 0


def test_confirm_migration_is_idempotent(drv, run):
    def gone(config: DriverConfig) -> Any:
        d = drv(config)
        d.get_instance.side_effect = InstanceNotFound(uuid=UUID, host="h1")
        return d
    driver.libvirt.LibvirtDriver.side_effect = gone
    rc, out = run("confirm-migration", {"uuid": UUID})
    assert rc == 0
    the(drv).confirm_migration.assert_called_once()


def test_finish_revert_migration(drv, run):
    rc, _ = run("finish-revert-migration", {"uuid": UUID, "name": "vm1", "power_on": False})
    inst, vifs, mig, bdi, power_on = the(drv).finish_revert_migration.call_args.args
    assert rc == 0
    assert inst == Instance(UUID, "vm1", Flavor("", 0, 0, 0), "h1")
    assert (vifs, mig.instance_uuid, bdi, power_on) == ([], UUID, None, False)
    the(drv).get_instance.assert_not_called()


@pytest.mark.parametrize("args, destroy_disks", [({"uuid": UUID}, True),
                                                 ({"uuid": UUID, "destroy_disks": False}, False)])
def test_destroy(drv, run, args, destroy_disks):
    rc, _ = run("destroy", args)
    inst, vifs, dd = the(drv).destroy.call_args.args
    assert rc == 0 and inst.uuid == UUID and dd is destroy_disks
    the(drv).get_instance.assert_not_called()


def test_destroy_needs_only_the_uuid(drv, run):
    run("destroy", {"uuid": UUID, "name": "vm1"})
    inst = the(drv).destroy.call_args.args[0]
    assert (inst.uuid, inst.name) == (UUID, "vm1")
    assert the(drv).get_instance.call_count == 0


def test_driver_error_exits_1_with_kind_and_message(drv, run):
    err = MigrationFailed(uuid=UUID, dest="h2", reason="boom", restored=" and started again")
    driver.libvirt.LibvirtDriver.side_effect = _with(drv, migrate_disk_and_power_off=_raise(err))
    rc, out = run("migrate-disk-and-power-off", {"uuid": UUID, "dest": "h2"})
    assert (rc, out) == (1, {"error": "MigrationFailed", "message": str(err)})


def test_transfer_error_exits_1(drv, run):
    err = HostKeyError(host="h2", reason="unknown key", known_hosts="/root/.ssh/known_hosts")
    driver.libvirt.LibvirtDriver.side_effect = _with(drv, migrate_disk_and_power_off=_raise(err))
    rc, out = run("migrate-disk-and-power-off", {"uuid": UUID, "dest": "h2"})
    assert rc == 1 and out["error"] == "HostKeyError" and "never adds keys" in out["message"]


def _raise(err: BaseException):
    def f(*a: Any, **kw: Any) -> Any:
        raise err
    return f


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", '"uuid"'])
def test_bad_json_exits_2(drv, run, raw):
    rc, out = run("get-instance", raw=raw)
    assert rc == 2 and out["error"] == "BadArguments" and "get-instance" in out["message"]
    assert drv.made == []  # no driver was even built


def test_missing_argument_exits_2(drv, run):
    rc, out = run("migrate-disk-and-power-off", {"uuid": UUID})
    assert rc == 2 and "'dest'" in out["message"]


def test_bad_configuration_exits_1(drv, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[driver]\ntransfer_mehtod = "rsync"\n')
    rc, out = call("list-instances", "", str(bad), monkeypatch, capsys)
    # a DriverError: SettingsError where driver/settings.py reads the [driver] table
    assert rc == 1 and out["error"] in {"DriverError", "SettingsError"} and "transfer_mehtod" in out["message"]
    assert drv.made == []


def test_patched_config_loader_gets_the_path(mocker, config_file, monkeypatch, capsys):
    cfg = DriverConfig(instances_path="/srv/i", host_name="patched")
    loader = mocker.patch.object(driver.libvirt, "DriverConfig")
    loader.load.return_value = cfg
    built = mocker.patch.object(driver.libvirt, "LibvirtDriver")
    built.return_value.list_instances.return_value = []
    rc, out = call("list-instances", "", config_file, monkeypatch, capsys)
    assert (rc, out) == (0, {"result": []})
    loader.load.assert_called_once_with(config_file)
    built.assert_called_once_with(cfg)


def test_real_driver_on_fake_libvirt(mocker, run, tmp_path):
    """The whole path with the real LibvirtDriver: JSON of a real Instance, InstanceNotFound as exit 1."""
    conn = FakeConn(FakeDomain(UUID, "vm1", domain_xml(UUID, f"{tmp_path}/instances/{UUID}", [], vcpus=2,
                                                       flavor={"name": "m", "root_gb": 3}),
                               libvirt.VIR_DOMAIN_PAUSED))
    mocker.patch.object(driver.libvirt, "LibvirtDriver", side_effect=lambda cfg: LibvirtDriver(cfg, lambda uri: conn))
    rc, out = run("get-instance", {"uuid": UUID})
    assert rc == 0 and out["result"]["power_state"] == int(PowerState.PAUSED)
    assert out["result"]["flavor"] == {"name": "m", "vcpus": 2, "memory_mb": 1024, "root_gb": 3, "ephemeral_gb": 0}
    rc, out = run("get-instance", {"uuid": "00000000-0000-0000-0000-000000000000"})
    assert rc == 1 and out["error"] == "InstanceNotFound" and "(h1)" in out["message"]


def test_cli_wires_the_driver_command(drv, config_file, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"uuid": UUID})))
    assert cli.main(["driver", "--config", config_file, "get-instance"]) == 0
    assert json.loads(capsys.readouterr().out)["result"]["name"] == "vm1"


def test_cli_rejects_an_unknown_call(config_file, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["driver", "--config", config_file, "reboot"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_every_call_is_in_the_help():
    assert all(name in driver_cmd.HELP for name in driver_cmd.CALLS)
