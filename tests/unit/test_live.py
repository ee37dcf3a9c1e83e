"""Live migration (driver/libvirt/live.py) without daemons: every branch, failures included.

libvirt is two ``fakes.FakeConn`` (this host and the destination) whose
domain can migrate3; qemu-img a runner; the destination a real directory
served by the real remote-fs operations; the copier writes files there.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import libvirt
import pytest

import transfer
from coldferry import driver_cmd
from driver.base import ComputeDriver
from driver.errors import DriverError, ImageError, InvalidInstanceState, MigrationFailed
from driver.libvirt import DriverConfig, LibvirtDriver, live
from driver.model import DiskInfo, Flavor, Instance, LiveOutcome, PowerState, Timeline

from .fakes import FakeClock, FakeConn, FakeCopier, FakeDomain, FakeQemuImg, FakeTarget, libvirt_error
from .fakes import domain_xml as make_xml

UUID = "0d5c7f4e-2b1a-4f7e-9c3d-5a6b7c8d9e0f"
MiB, GiB = 1 << 20, 1 << 30
SIZE = 4 * MiB  # virtual size of the disks (the fake copier writes them out whole)
DEST = "198.18.0.12"
STATS = {"downtime": 104, "time_elapsed": 972, "memory_processed": 91893320, "disk_total": 0}


class LiveDomain(FakeDomain):
    """A FakeDomain that migrates: to ``dest_conn``, or failing with ``migrate_error``."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.migrate_error: libvirt.libvirtError | None = None
        self.state_after_failure = libvirt.VIR_DOMAIN_RUNNING
        self.moves_anyway = False
        self.migrations: list[tuple[dict[str, Any], int]] = []
        self.stats: dict[str, Any] | None = None

    def migrate3(self, dconn: FakeConn, params: dict[str, Any], flags: int) -> "LiveDomain":
        self.migrations.append((params, flags))
        if self.migrate_error is not None:
            if self.moves_anyway:
                self._arrive(dconn)
            self._state = self.state_after_failure
            raise self.migrate_error
        arrived = self._arrive(dconn)
        arrived.stats = dict(STATS)
        if flags & libvirt.VIR_MIGRATE_UNDEFINE_SOURCE and self.conn is not None:
            self.conn.domains.pop(self.uuid)
        return arrived

    def _arrive(self, dconn: FakeConn) -> "LiveDomain":
        return dconn.add(LiveDomain(self.uuid, self._name, self.xml, libvirt.VIR_DOMAIN_RUNNING, self.clock))

    def resume(self) -> int:
        self.calls.append("resume")
        self._state = libvirt.VIR_DOMAIN_RUNNING
        return 0

    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        if self.stats is None:
            raise libvirt_error("no job statistics", libvirt.VIR_ERR_OPERATION_INVALID)
        return self.stats


class DestConn(FakeConn):
    """The destination's connection, which the driver closes after the migration."""

    closed = 0

    def close(self) -> int:
        self.closed += 1
        return 0


class QemuImgThatCreates(FakeQemuImg):
    """FakeQemuImg whose ``create`` writes a small file, as qemu-img does."""

    def __call__(self, argv: list[str] | tuple[str, ...]) -> str:
        out = super().__call__(argv)
        if argv[1] == "create":
            with open(argv[-2], "xb") as f:
                f.write(b"QFI\xfb blank")
        return out


class Env:
    """This host (``src``, with a driver and a running instance) and the destination (``dst``)."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared: bool = False,
                 state: int = libvirt.VIR_DOMAIN_RUNNING, fmt: str = "raw", with_base: bool = False,
                 **settings: Any) -> None:
        self.src = tmp_path / "hostA" / "instances"
        self.dst = self.src if shared else tmp_path / "hostB" / "instances"
        self.src.mkdir(parents=True)
        self.dst.mkdir(parents=True, exist_ok=True)
        self.clock = FakeClock()
        self.conn = FakeConn(clock=self.clock)
        self.dconn = DestConn(clock=self.clock)
        self.qemu = QemuImgThatCreates()
        self.target = FakeTarget(str(self.dst))
        self.copier = FakeCopier(str(self.src), self.target)
        monkeypatch.setattr(transfer, "copy", self.copier.copy)
        self.config = DriverConfig(instances_path=str(self.src), host_name="hostA", ssh_identity="/keys/id",
                                   ssh_known_hosts="/keys/known_hosts", **settings)
        self.connects: list[str] = []
        self.connect_error: libvirt.libvirtError | None = None
        self.driver = LibvirtDriver(self.config, connect=self._connect, runner=self.qemu,
                                    remote_fs=self.target.remote_fs, sleep=self.clock.sleep, clock=self.clock)
        self.inst_dir = self.src / UUID
        self.inst_dir.mkdir()
        disk = self.inst_dir / "disk"
        disk.write_bytes(b"guest data" * 1000)
        base = ""
        if with_base:
            (self.src / "_base").mkdir()
            base = str(self.src / "_base" / "base.raw")
            Path(base).write_bytes(b"base image" * 1000)
            self.qemu.add(base, "raw", SIZE)
        self.qemu.add(str(disk), fmt, SIZE, 10000, backing=base, backing_format="raw")
        self.dom = self.conn.add(LiveDomain(UUID, "vm1", make_xml(UUID, str(self.inst_dir), [("disk", fmt, "vda")]),
                                            state, self.clock))
        self.instance = Instance(UUID, "vm1", Flavor("small", 1, 1024, 1), "hostA", PowerState.RUNNING)

    def _connect(self, uri: str) -> FakeConn:
        self.connects.append(uri)
        if uri == self.config.libvirt_uri:
            return self.conn
        if self.connect_error is not None:
            raise self.connect_error
        return self.dconn

    def migrate(self) -> LiveOutcome:
        return self.driver.live_migration(self.instance, DEST)


@pytest.fixture
def env(tmp_path, monkeypatch):
    return Env(tmp_path, monkeypatch)


# -- the contract -------------------------------------------------------------------


def test_drivers_without_live_migration_refuse_it():
    xen = SimpleNamespace(hypervisor_type="xen")
    with pytest.raises(DriverError, match="live migration is not supported by the xen driver"):
        ComputeDriver.live_migration(xen, Instance(UUID, "vm1", Flavor("s", 1, 1, 1)), DEST)  # type: ignore[arg-type]


# -- URI, flags, parameters, figures --------------------------------------------------


def test_default_uri_is_libssh_with_strict_known_hosts_and_the_key():
    config = DriverConfig(ssh_identity="/keys/id", ssh_known_hosts="/keys/known hosts", ssh_port=2222)
    assert live.dest_uri(config, DEST) == (
        "qemu+libssh://root@198.18.0.12:2222/system?known_hosts=/keys/known+hosts&known_hosts_verify=normal"
        "&sshauth=privkey&keyfile=/keys/id")


def test_uri_template_settings_win_and_ipv6_gets_brackets():
    config = DriverConfig(live_migration_uri="qemu+libssh2://{dest}/system?known_hosts=/mine&sshauth=agent")
    assert live.dest_uri(config, "fd00::12") == (
        "qemu+libssh2://[fd00::12]/system?known_hosts=/mine&sshauth=agent&known_hosts_verify=normal")


def test_openssh_and_tls_transports_get_only_what_they_understand():
    ssh = DriverConfig(live_migration_uri="qemu+ssh://{dest}/system", ssh_identity="/keys/id")
    assert live.dest_uri(ssh, DEST) == "qemu+ssh://198.18.0.12/system?keyfile=/keys/id"
    tls = DriverConfig(live_migration_uri="qemu+tls://{dest}/system", ssh_identity="/keys/id")
    assert live.dest_uri(tls, DEST) == "qemu+tls://198.18.0.12/system"


@pytest.mark.parametrize("template", [
    "qemu+ssh://{dest}/system?no_verify=1",
    "qemu+libssh://{dest}/system?known_hosts_verify=auto",
    "qemu+libssh2://{dest}/system?known_hosts_verify=ignore",
    "qemu+ssh://host2/system",
    "qemu+ssh://{dest}/system?{oops}",
])
def test_uri_templates_that_skip_host_keys_or_the_destination_are_refused(template):
    with pytest.raises(DriverError, match="live_migration_uri"):
        DriverConfig(live_migration_uri=template)


def test_flags_and_params():
    base = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    assert live.flags(True, True) & base == base
    assert not live.flags(True, False) & (libvirt.VIR_MIGRATE_NON_SHARED_DISK | libvirt.VIR_MIGRATE_NON_SHARED_INC)
    assert live.flags(False, False) & libvirt.VIR_MIGRATE_NON_SHARED_DISK
    assert live.flag_names(live.flags(False, True))[-1] == "NON_SHARED_INC"
    disks = [DiskInfo("raw", "/i/u/disk", GiB, "", 1, 0, "vda"), DiskInfo("raw", "/i/u/disk.local", GiB, "", 1, 0,
                                                                           "vdb")]
    assert live.params("fd00::2", disks, False, 5 * MiB + 1) == {
        libvirt.VIR_MIGRATE_PARAM_URI: "tcp://[fd00::2]", libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda", "vdb"],
        libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 5}
    assert live.params(DEST, disks, True, 1000) == {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{DEST}",
                                                    libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 1}


def test_figures_in_seconds_or_none():
    assert live.figures(STATS) == {"downtime_s": 0.104, "job_s": 0.972, "memory_bytes": 91893320}
    assert live.figures({}) == {"downtime_s": None, "job_s": None, "memory_bytes": None}


# -- the migration ------------------------------------------------------------------------


def test_running_instance_moves_with_blank_disks_made_first(env):
    result = env.migrate()
    assert result.downtime_s == 0.104 and not result.shared
    assert result.flags == ["LIVE", "PERSIST_DEST", "UNDEFINE_SOURCE", "AUTO_CONVERGE", "NON_SHARED_DISK"]
    params, flags = env.dom.migrations[0]
    assert params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] == ["vda"]
    assert flags == live.flags(False, False)
    assert env.connects[-1].startswith(f"qemu+libssh://root@{DEST}:22/system?known_hosts=/keys/known_hosts")
    blank = env.dst / UUID / "disk"
    assert blank.stat().st_size == SIZE  # raw, of the virtual size
    assert UUID in env.dconn.domains and UUID not in env.conn.domains
    assert not env.inst_dir.exists()  # the stale copy here is dropped
    assert not [p for p in env.src.iterdir() if p.name.startswith(".coldferry-live-")]
    assert env.dconn.closed == 1


def test_the_blanks_count_as_copies_while_running_then_the_live_migration(env):
    timeline = Timeline()
    env.driver.live_migration(env.instance, DEST, timeline=timeline)
    assert [(p.name, p.detail) for p in timeline.phases] == [("connect", ""), ("precopy", "disk"),
                                                             ("live_migrate", "")]


def test_backing_file_is_sent_and_only_the_overlay_mirrored(tmp_path, monkeypatch):
    env = Env(tmp_path, monkeypatch, fmt="qcow2", with_base=True)
    result = env.migrate()
    assert "NON_SHARED_INC" in result.flags
    assert (env.dst / "_base" / "base.raw").read_bytes() == (env.src / "_base" / "base.raw").read_bytes()
    create = env.qemu.commands("create")[0]
    assert create[create.index("-b") + 1] == str(env.src / "_base" / "base.raw") and "-F" in create
    assert create[-1] == str(SIZE)
    assert (env.dst / UUID / "disk").read_bytes().startswith(b"QFI\xfb")


def test_flatten_mirrors_whole_disks_into_standalone_images(tmp_path, monkeypatch):
    env = Env(tmp_path, monkeypatch, fmt="qcow2", with_base=True, backing="flatten")
    result = env.migrate()
    assert "NON_SHARED_DISK" in result.flags
    assert "-b" not in env.qemu.commands("create")[0]
    assert not (env.dst / "_base").exists()


def test_shared_storage_copies_nothing_and_keeps_the_files(tmp_path, monkeypatch):
    env = Env(tmp_path, monkeypatch, shared=True)
    result = env.migrate()
    assert result.shared and "NON_SHARED_DISK" not in result.flags
    assert libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS not in env.dom.migrations[0][0]
    assert not env.copier.calls and (env.inst_dir / "disk").exists()


@pytest.mark.parametrize("state,word", [(libvirt.VIR_DOMAIN_PAUSED, "resume it"),
                                        (libvirt.VIR_DOMAIN_PMSUSPENDED, "resume it"),
                                        (libvirt.VIR_DOMAIN_SHUTOFF, "migrate a stopped one cold")])
def test_only_running_instances_move_live(tmp_path, monkeypatch, state, word):
    env = Env(tmp_path, monkeypatch, state=state)
    with pytest.raises(InvalidInstanceState, match=word):
        env.migrate()
    assert not env.target.sessions and not env.dom.migrations


def test_unsupported_disk_format_is_refused_before_anything(tmp_path, monkeypatch):
    env = Env(tmp_path, monkeypatch, fmt="vmdk")
    with pytest.raises(ImageError, match="raw and qcow2"):
        env.migrate()
    assert not env.target.sessions


def test_destination_libvirt_unreachable_touches_nothing(env):
    env.connect_error = libvirt_error("Cannot recv data: Connection reset by peer", libvirt.VIR_ERR_SYSTEM_ERROR)
    with pytest.raises(MigrationFailed, match="cannot connect to libvirt on 198.18.0.12.*kept running on hostA"):
        env.migrate()
    assert not env.target.sessions and os.listdir(env.dst) == []
    assert env.dom.isActive() and (env.inst_dir / "disk").exists()


def test_failed_migration_removes_what_was_made_there(env):
    env.dom.migrate_error = libvirt_error("operation failed: job 'migration out' unexpectedly failed")
    with pytest.raises(MigrationFailed, match="unexpectedly failed.*kept running on hostA$"):
        env.migrate()
    assert os.listdir(env.dst) == []
    assert env.dom.isActive() and UUID in env.conn.domains and (env.inst_dir / "disk").exists()
    assert "resume" not in env.dom.calls and env.dconn.closed == 1


def test_failed_migration_resumes_a_guest_left_paused(env):
    env.dom.migrate_error = libvirt_error("migration failed")
    env.dom.state_after_failure = libvirt.VIR_DOMAIN_PAUSED
    with pytest.raises(MigrationFailed):
        env.migrate()
    assert "resume" in env.dom.calls and env.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_failure_after_the_guest_moved_keeps_every_file(env):
    env.dom.migrate_error = libvirt_error("Connection reset by peer")
    env.dom.moves_anyway = True
    with pytest.raises(MigrationFailed, match=f"restored NOT: it runs on {DEST}"):
        env.migrate()
    assert (env.dst / UUID / "disk").exists() and (env.inst_dir / "disk").exists()


def test_leftover_on_the_destination_is_refused_and_kept(env):
    (env.dst / UUID).mkdir()
    (env.dst / UUID / "disk").write_bytes(b"someone's")
    with pytest.raises(MigrationFailed, match="already exists on 198.18.0.12"):
        env.migrate()
    assert (env.dst / UUID / "disk").read_bytes() == b"someone's"


def test_instance_already_defined_there_is_refused(env):
    env.dconn.add(FakeDomain(UUID, "vm1", env.dom.xml))
    with pytest.raises(MigrationFailed, match="already defined on 198.18.0.12"):
        env.migrate()
    assert os.listdir(env.dst) == [] and not env.dom.migrations


def test_failed_copy_of_a_blank_removes_partial_files(env):
    env.copier.fail_on = "disk"
    with pytest.raises(MigrationFailed, match="connection reset by peer"):
        env.migrate()
    assert os.listdir(env.dst) == [] and not env.dom.migrations


def test_missing_statistics_give_no_downtime(env, monkeypatch):
    monkeypatch.setattr(LiveDomain, "jobStats", lambda self, flags=0: (_ for _ in ()).throw(libvirt_error("no")))
    assert env.migrate().downtime_s is None


def test_source_still_defined_after_moving_keeps_its_files(env, monkeypatch):
    real = LiveDomain.migrate3

    def keep_source(self, dconn, params, flags):
        return real(self, dconn, params, flags & ~libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)

    monkeypatch.setattr(LiveDomain, "migrate3", keep_source)
    env.migrate()
    assert (env.inst_dir / "disk").exists()


def test_driver_command_live_migrate_passes_uuid_and_dest(env):
    timeline = Timeline()
    assert driver_cmd.CALLS["live-migrate"](env.driver, {"uuid": UUID, "dest": DEST}, timeline).downtime_s == 0.104
    assert UUID in env.dconn.domains
    assert "live_migrate" in [p.name for p in timeline.phases]


@pytest.mark.parametrize("dest", ["198.18.0.12/system?known_hosts_verify=ignore&known_hosts=/dev/null#",
                                  "198.18.0.12?command=/bin/sh", "root@198.18.0.12"])
def test_dest_uri_refuses_a_dest_that_could_add_uri_parameters(dest):
    with pytest.raises(DriverError, match="not a host name or an IP address"):
        live.dest_uri(DriverConfig(), dest)


def test_dest_uri_keeps_host_key_checking_forced_whatever_the_dest():
    uri = live.dest_uri(DriverConfig(live_migration_uri="qemu+libssh://{user}@{dest}:{port}/system?sshauth=agent"),
                        "h2.lab")
    assert uri.startswith("qemu+libssh://root@h2.lab:22/system?") and "known_hosts_verify=normal" in uri
    assert uri.count("known_hosts_verify") == 1 and "no_verify" not in uri
