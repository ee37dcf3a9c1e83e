"""LibvirtDriver without daemons: every branch, failures included.

libvirt is ``fakes.FakeConn``/``FakeDomain`` (real ``libvirtError``s with
codes), qemu-img a runner answering JSON, the target host a second real
directory served by the real remote-fs operations, and the copier writes
files there. Time is a fake clock that moves only when the driver sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import pytest

import transfer
from driver.errors import (BridgeMissing, DriverError, HostError, ImageError, InstanceNotFound, InsufficientSpace,
                           InvalidInstanceState, MigrationFailed, PowerOffFailed, ResizeDown, StartFailed)
from driver.libvirt import DriverConfig, LibvirtDriver, bridges, domain_xml
from driver.libvirt import driver as driver_mod
from driver.model import DiskInfo, Flavor, Instance, MigrateOutcome, Migration, PowerState, Timeline, Vif
from transfer.options import CopyOptions
from transfer.errors import ConnectionLost, TransferError

from .fakes import GiB, FakeClock, FakeConn, FakeCopier, FakeDomain, FakeQemuImg, FakeTarget, libvirt_error
from .fakes import domain_xml as make_xml

UUID = "6f1c3f9e-8a44-4d43-9a6e-0b1f3f7c2a10"
SMALL = Flavor("small", 1, 1024, 1, 0)
ROOT_DATA = b"root disk data " * 4096
LOCAL_DATA = b"ephemeral data " * 1024
MIGRATION = Migration("m1", UUID, "hostA", "hostB", "198.18.0.2")
META_NS = "{https://coldferry.invalid/xmlns/instance/1}"


class Env:
    """One source host (``src``) with a driver, and one target host (``dst``)."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared: bool = False, **settings: Any):
        self.src = tmp_path / "hostA" / "instances"
        self.dst = self.src if shared else tmp_path / "hostB" / "instances"
        self.src.mkdir(parents=True)
        self.dst.mkdir(parents=True, exist_ok=True)
        self.clock = FakeClock()
        self.conn = FakeConn(clock=self.clock)
        self.qemu = FakeQemuImg()
        self.target = FakeTarget(str(self.dst))
        self.copier = FakeCopier(str(self.src), self.target)
        monkeypatch.setattr(transfer, "copy", self.copier.copy)
        self.config = DriverConfig(instances_path=str(self.src), host_name="hostA", **settings)
        self.connects: list[str] = []
        self.driver = LibvirtDriver(self.config, connect=self._connect, runner=self.qemu,
                                    remote_fs=self.target.remote_fs, sleep=self.clock.sleep, clock=self.clock)

    def _connect(self, uri: str) -> FakeConn:
        self.connects.append(uri)
        return self.conn

    @property
    def inst_dir(self) -> Path:
        return self.src / UUID

    @property
    def resize_dir(self) -> Path:
        return self.src / (UUID + "_resize")

    def add_instance(self, state: int = libvirt.VIR_DOMAIN_RUNNING, flavor: Flavor = SMALL,
                     root_size: int = GiB, local_size: int | None = None, backing: str = "",
                     extra_disks: list[tuple[str, str, str]] | None = None, meta: bool = True,
                     bridges_: list[tuple[str, str]] | None = None) -> tuple[Instance, FakeDomain]:
        d = self.inst_dir
        d.mkdir()
        (d / "disk").write_bytes(ROOT_DATA)
        self.qemu.add(str(d / "disk"), "qcow2", root_size, len(ROOT_DATA), backing=backing)
        disks = [("disk", "qcow2", "vda")]
        if local_size is not None:
            (d / "disk.local").write_bytes(LOCAL_DATA)
            self.qemu.add(str(d / "disk.local"), "raw", local_size, len(LOCAL_DATA))
            disks.append(("disk.local", "raw", "vdb"))
        disks += extra_disks or []
        (d / "console.log").write_text("boot log\n")
        fl = {"name": flavor.name, "root_gb": flavor.root_gb, "ephemeral_gb": flavor.ephemeral_gb} if meta else None
        xml = make_xml(UUID, str(d), disks, memory_kib=flavor.memory_mb * 1024, vcpus=flavor.vcpus, flavor=fl,
                       bridges=bridges_)
        dom = self.conn.add(FakeDomain(UUID, "vm1", xml, state, self.clock))
        return Instance(UUID, "vm1", flavor, "hostA"), dom

    def add_base(self, name: str = "base.img", data: bytes = b"base image " * 2048, backing: str = "") -> str:
        base = self.src / "_base"
        base.mkdir(exist_ok=True)
        path = base / name
        path.write_bytes(data)
        self.qemu.add(str(path), "qcow2", GiB, len(data), backing=backing)
        return str(path)

    def add_golden(self, data: bytes = b"golden") -> str:
        """A backing file outside the image cache (a golden image somewhere on the host)."""
        path = self.src.parent / "golden.qcow2"
        path.write_bytes(data)
        self.qemu.add(str(path), "qcow2", GiB, len(data))
        return str(path)

    def target_files(self) -> set[str]:
        return {str(p.relative_to(self.dst)) for p in self.dst.rglob("*") if p.is_file()}

    def migrate(self, instance: Instance, flavor: Flavor | None = None, **kw: Any) -> MigrateOutcome:
        return self.driver.migrate_disk_and_power_off(instance, "hostB", flavor or instance.flavor, [], None, **kw)


def data_calls(env: Env) -> list[tuple]:
    """The copier's calls but the domain definition's, which runs beside the others (in no set order)."""
    return [c for c in env.copier.calls if os.path.basename(c[1]) != "domain.xml"]


def data_sources(env: Env) -> list[str]:
    return [c[1] for c in data_calls(env)]


@pytest.fixture
def make_env(tmp_path, monkeypatch):
    made = []

    def make(**kw: Any) -> Env:
        env = Env(tmp_path / str(len(made)), monkeypatch, **kw)
        made.append(env)
        return env
    return make


@pytest.fixture
def env(make_env) -> Env:
    return make_env()


# -- connection and inventory -------------------------------------------------


def test_connects_once_to_the_configured_uri_and_again_when_the_connection_died(make_env):
    env = make_env(libvirt_uri="qemu+ssh://root@hostA/system")
    env.add_instance()
    env.driver.list_instances()
    env.driver.list_instances()
    assert env.connects == ["qemu+ssh://root@hostA/system"]
    env.conn.alive = False
    env.driver.list_instances()
    assert len(env.connects) == 2


def test_connection_failure_is_a_driver_error_naming_the_uri(env):
    def refuse(uri: str) -> Any:
        raise libvirt_error("Failed to connect socket to '/run/libvirt/libvirt-sock': No such file or directory",
                            libvirt.VIR_ERR_SYSTEM_ERROR)
    env.driver.host.connect = refuse
    with pytest.raises(DriverError) as e:
        env.driver.list_instances()
    assert "qemu:///system" in str(e.value)
    assert "No such file or directory" in str(e.value)


def test_unknown_uuid_is_instance_not_found(env):
    with pytest.raises(InstanceNotFound) as e:
        env.driver.get_instance(UUID)
    assert str(e.value) == f"instance {UUID} is not defined on this host (hostA)"


def test_other_lookup_errors_are_driver_errors_not_instance_not_found(env):
    env.conn.lookup_error = libvirt_error("internal error: connection closed", libvirt.VIR_ERR_INTERNAL_ERROR)
    with pytest.raises(DriverError) as e:
        env.driver.get_instance(UUID)
    assert not isinstance(e.value, InstanceNotFound)
    assert "connection closed" in str(e.value)


@pytest.mark.parametrize("vir_state, expected", [
    (libvirt.VIR_DOMAIN_NOSTATE, PowerState.NOSTATE),
    (libvirt.VIR_DOMAIN_RUNNING, PowerState.RUNNING),
    (libvirt.VIR_DOMAIN_BLOCKED, PowerState.RUNNING),
    (libvirt.VIR_DOMAIN_PAUSED, PowerState.PAUSED),
    (libvirt.VIR_DOMAIN_SHUTDOWN, PowerState.SHUTDOWN),
    (libvirt.VIR_DOMAIN_SHUTOFF, PowerState.SHUTDOWN),
    (libvirt.VIR_DOMAIN_CRASHED, PowerState.CRASHED),
    (libvirt.VIR_DOMAIN_PMSUSPENDED, PowerState.SUSPENDED),
    (99, PowerState.NOSTATE),
])
def test_power_state_of_every_libvirt_state(env, vir_state, expected):
    env.add_instance(state=vir_state)
    assert env.driver.get_instance(UUID).power_state == expected


def test_list_instances_reads_the_flavor_from_the_metadata(env):
    env.add_instance(flavor=Flavor("medium", 2, 2048, 20, 5))
    [inst] = env.driver.list_instances()
    assert inst.uuid == UUID and inst.name == "vm1" and inst.host == "hostA"
    assert inst.flavor == Flavor("medium", 2, 2048, 20, 5)
    assert env.qemu.calls == []  # the metadata is enough


def test_without_metadata_root_gb_is_the_first_disk_rounded_up(env):
    env.add_instance(meta=False, root_size=GiB + GiB // 2)
    inst = env.driver.get_instance(UUID)
    assert inst.flavor == Flavor("custom", 1, 1024, 2, 0)


def test_without_metadata_an_unreadable_disk_gives_root_gb_0(env):
    env.add_instance(meta=False)
    (env.inst_dir / "disk").unlink()
    assert env.driver.get_instance(UUID).flavor.root_gb == 0


def test_without_metadata_and_disks_root_gb_is_0(env):
    xml = make_xml(UUID, str(env.inst_dir), disks=[], memory_kib=512 * 1024, vcpus=3)
    env.conn.add(FakeDomain(UUID, "diskless", xml, libvirt.VIR_DOMAIN_SHUTOFF))
    assert env.driver.get_instance(UUID).flavor == Flavor("custom", 3, 512, 0, 0)
    assert env.qemu.calls == []


def test_host_resources(env):
    env.add_instance(flavor=Flavor("medium", 2, 2048, 20, 0))
    xml = make_xml("11111111-2222-3333-4444-555555555555", str(env.src / "other"), disks=[], vcpus=3,
                   memory_kib=512 * 1024, flavor={"name": "tiny", "root_gb": 1})
    env.conn.add(FakeDomain("11111111-2222-3333-4444-555555555555", "vm2", xml))
    res = env.driver.host_resources()
    st = os.statvfs(env.src)
    assert (res.hostname, res.arch, res.hypervisor_type, res.hypervisor_version) == ("hostA", "aarch64", "QEMU",
                                                                                     8_000_000)
    assert (res.vcpus, res.vcpus_used, res.memory_mb, res.memory_mb_used) == (8, 5, 15872, 2560)
    assert res.disk_gb == st.f_blocks * st.f_frsize // GiB
    assert res.disk_gb_used == (st.f_blocks - st.f_bavail) * st.f_frsize // GiB
    assert res.instances == 2


def test_host_resources_arch_falls_back_to_this_machine(env):
    env.conn.capabilities = "<capabilities><host/></capabilities>"
    res = env.driver.host_resources()
    assert res.arch == os.uname().machine
    assert res.instances == 0 and res.vcpus_used == 0


# -- power --------------------------------------------------------------------


def test_power_off_clean_shutdown(env):
    inst, dom = env.add_instance()
    dom.shutdown_takes = 3
    env.driver.power_off(inst, timeout=10, retry_interval=0)
    assert dom.calls == ["shutdown"]
    assert not dom.isActive()
    assert sum(env.clock.sleeps) == 3


def test_power_off_signals_again_every_retry_interval_then_destroys(env):
    inst, dom = env.add_instance()
    dom.shutdown_takes = None  # ignores ACPI
    start = env.clock.now
    env.driver.power_off(inst, timeout=10, retry_interval=3)
    assert [t - start for t in dom.shutdown_times] == [0, 3, 6, 9]
    assert dom.calls[-1] == "destroy"
    assert env.clock.now - start == 10
    assert not dom.isActive()


def test_power_off_without_retry_interval_signals_once(env):
    inst, dom = env.add_instance()
    dom.shutdown_takes = None
    env.driver.power_off(inst, timeout=5, retry_interval=0)
    assert dom.calls == ["shutdown", "destroy"]


def test_power_off_timeout_0_destroys_at_once(env):
    inst, dom = env.add_instance()
    env.driver.power_off(inst, timeout=0)
    assert dom.calls == ["destroy"]
    assert env.clock.sleeps == []
    assert not dom.isActive()


@pytest.mark.parametrize("timeout", [0, 30])
def test_power_off_of_a_stopped_instance_does_nothing(env, timeout):
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    env.driver.power_off(inst, timeout=timeout)
    assert dom.calls == []


def test_power_off_destroy_error_while_still_running_is_power_off_failed(env):
    inst, dom = env.add_instance()
    dom.fail["destroy"] = libvirt_error("Failed to terminate process 4242 with SIGKILL: Device or resource busy")
    with pytest.raises(PowerOffFailed) as e:
        env.driver.power_off(inst, timeout=0)
    assert "Device or resource busy" in str(e.value) and UUID in str(e.value)
    assert dom.isActive()


def test_power_off_destroy_error_after_the_guest_stopped_anyway_is_fine(env):
    inst, dom = env.add_instance()
    dom.fail["destroy"] = libvirt_error("Requested operation is not valid: domain is not running",
                                        libvirt.VIR_ERR_OPERATION_INVALID)
    dom.state_after_failed_destroy = libvirt.VIR_DOMAIN_SHUTOFF
    env.driver.power_off(inst, timeout=0)
    assert not dom.isActive()


def test_power_off_guest_stopping_just_before_the_acpi_signal(env):
    inst, dom = env.add_instance()

    def shutdown() -> int:
        dom._state = libvirt.VIR_DOMAIN_SHUTOFF  # it stopped by itself a moment ago
        raise libvirt_error("Requested operation is not valid: domain is not running",
                            libvirt.VIR_ERR_OPERATION_INVALID)
    dom.shutdown = shutdown
    env.driver.power_off(inst, timeout=30, retry_interval=5)
    assert not dom.isActive()


def test_power_on_starts_and_waits_until_running(env):
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    dom.start_state = libvirt.VIR_DOMAIN_PAUSED  # qemu starts paused, then runs

    def sleep(s: float) -> None:
        env.clock.sleep(s)
        if env.clock.sleeps == [0.2] * 3:
            dom._state = libvirt.VIR_DOMAIN_RUNNING
    env.driver.host.sleep = sleep
    env.driver.power_on(inst)
    assert dom.calls == ["create"]
    assert env.clock.sleeps == [0.2] * 3


def test_power_on_of_a_running_instance_does_not_create(env):
    inst, dom = env.add_instance()
    env.driver.power_on(inst)
    assert dom.calls == []


def test_power_on_times_out_with_start_failed(make_env):
    env = make_env(start_timeout=5)
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    dom.start_state = libvirt.VIR_DOMAIN_PAUSED
    start = env.clock.now
    with pytest.raises(StartFailed) as e:
        env.driver.power_on(inst)
    assert str(e.value) == f"instance {UUID} did not reach running on hostA: still PAUSED after 5 s"
    assert 5 <= env.clock.now - start < 5.3


def test_power_on_libvirt_error_is_start_failed(env):
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    dom.fail["create"] = libvirt_error("Cannot access storage file '/x/disk': No such file or directory")
    with pytest.raises(StartFailed) as e:
        env.driver.power_on(inst)
    assert "Cannot access storage file" in str(e.value)
    assert env.clock.sleeps == []


# -- migration, source side: refusals before power-off -------------------------


def _untouched(env: Env, dom: FakeDomain) -> None:
    """Nothing happened: still running, directory in place, nothing copied."""
    assert "shutdown" not in dom.calls and "destroy" not in dom.calls
    assert dom.isActive()
    assert env.inst_dir.is_dir() and not env.resize_dir.exists()
    assert env.copier.calls == []


@pytest.mark.parametrize("state, word", [(libvirt.VIR_DOMAIN_PAUSED, "paused"),
                                         (libvirt.VIR_DOMAIN_PMSUSPENDED, "suspended")])
def test_migrate_refuses_paused_or_suspended(env, state, word):
    inst, dom = env.add_instance(state=state)
    with pytest.raises(InvalidInstanceState) as e:
        env.migrate(inst)
    assert f"is {word}" in str(e.value) and "resume it" in str(e.value)
    assert dom.calls == []
    assert env.target.sessions == [] and env.copier.calls == []
    assert not env.resize_dir.exists()


def test_migrate_refuses_a_flavor_shrinking_the_root_disk_before_power_off(env):
    inst, dom = env.add_instance(flavor=Flavor("big", 1, 1024, 20), root_size=20 * GiB)
    with pytest.raises(ResizeDown) as e:
        env.migrate(inst, Flavor("small", 1, 1024, 10))
    assert str(e.value) == (f"flavor small would shrink disk vda of instance {UUID} from 20 GiB to 10 GiB; "
                            "disks can only grow, pick a flavor with root_gb >= 20")
    _untouched(env, dom)
    assert env.target.sessions == []


def test_migrate_with_root_gb_0_keeps_the_disk_size(env):
    inst, dom = env.add_instance(root_size=20 * GiB)
    env.migrate(inst, Flavor("any", 1, 1024, 0))
    assert (env.dst / UUID / "disk").read_bytes() == ROOT_DATA


def test_migrate_refuses_a_flavor_shrinking_the_ephemeral_disk(env):
    inst, dom = env.add_instance(flavor=Flavor("eph", 1, 1024, 1, 10), local_size=10 * GiB)
    with pytest.raises(ResizeDown) as e:
        env.migrate(inst, Flavor("eph-small", 1, 1024, 1, 5))
    assert "disk ephemeral" in str(e.value) and "from 10 GiB to 5 GiB" in str(e.value)
    _untouched(env, dom)


def test_migrate_refuses_a_full_target_before_power_off(env):
    inst, dom = env.add_instance(local_size=GiB)
    env.target.free = len(ROOT_DATA) + len(LOCAL_DATA) - 1
    with pytest.raises(InsufficientSpace) as e:
        env.migrate(inst)
    assert "host hostB has" in str(e.value) and str(env.src) in str(e.value)
    _untouched(env, dom)


def test_migrate_space_check_counts_allocated_bytes_not_virtual_size(env):
    inst, dom = env.add_instance(flavor=Flavor("huge", 1, 1024, 100, 1), root_size=100 * GiB, local_size=GiB)
    env.target.free = len(ROOT_DATA) + len(LOCAL_DATA)
    env.migrate(inst)
    assert (env.dst / UUID / "disk").exists()


def test_migrate_space_check_counts_backing_files_to_send(env):
    base = env.add_base()
    inst, dom = env.add_instance(backing=base)
    env.target.free = len(ROOT_DATA) + 4096  # room for the overlay, not for the base
    with pytest.raises(InsufficientSpace):
        env.migrate(inst)
    _untouched(env, dom)


def test_migrate_refuses_a_disk_outside_the_instance_directory(env, tmp_path):
    elsewhere = tmp_path / "elsewhere.img"
    elsewhere.write_bytes(b"x")
    inst, dom = env.add_instance(extra_disks=[(str(elsewhere), "raw", "vdc")])
    with pytest.raises(ImageError) as e:
        env.migrate(inst)
    assert str(elsewhere) in str(e.value) and "not in the instance directory" in str(e.value)
    _untouched(env, dom)


def test_migrate_power_off_failure_stops_before_anything_is_moved(env):
    inst, dom = env.add_instance()
    dom.fail["destroy"] = libvirt_error("Failed to terminate process: Device or resource busy")
    with pytest.raises(PowerOffFailed):
        env.migrate(inst)
    assert env.inst_dir.is_dir() and not env.resize_dir.exists()
    assert env.copier.calls == []


def test_migrate_power_off_failure_leaves_nothing_on_the_target(env):
    inst, dom = env.add_instance()
    dom.fail["destroy"] = libvirt_error("Failed to terminate process: Device or resource busy")
    with pytest.raises(PowerOffFailed):
        env.migrate(inst)
    assert not (env.dst / UUID).exists()


# -- migration, source side: the copy -------------------------------------------


def test_migrate_shared_storage_copies_nothing(make_env):
    env = make_env(shared=True)
    inst, dom = env.add_instance()
    outcome = env.migrate(inst)
    assert env.copier.calls == []
    assert env.inst_dir.is_dir() and not env.resize_dir.exists()
    assert not dom.isActive()
    assert (env.inst_dir / "domain.xml").read_text() == dom.xml
    assert not [p for p in os.listdir(env.src) if p.startswith(".coldferry-shared")]
    assert outcome.shared is True
    assert "mkdir" not in [op for op, _ in env.target.calls]
    assert [d.path for d in outcome.disk_info] == [str(env.inst_dir / "disk")]


def test_migrate_marker_is_removed_from_the_target(env):
    inst, _ = env.add_instance()
    env.migrate(inst)
    [marker] = env.target.ops("touch")
    assert marker.startswith(".coldferry-shared-")
    assert env.target.ops("remove") == [marker]
    assert not (env.dst / marker).exists()


def test_migrate_stream(make_env):
    env = make_env(transfer_streams=4, transfer_channel="ssh", transfer_compress="fast", transfer_retries=7,
                   transfer_fsync=False, ssh_user="ferry", ssh_port=2222, ssh_identity="/keys/id",
                   ssh_known_hosts="/keys/known_hosts", remote_command=("/opt/cf/bin/coldferry", "receive"))
    inst, dom = env.add_instance(local_size=2 * GiB)
    outcome = env.migrate(inst, timeout=0)

    assert not dom.isActive() and UUID in env.conn.domains  # off, still defined
    assert not env.inst_dir.exists()
    assert (env.resize_dir / "disk").read_bytes() == ROOT_DATA
    assert env.target_files() == {f"{UUID}/disk", f"{UUID}/disk.local", f"{UUID}/domain.xml"}
    assert (env.dst / UUID / "disk").read_bytes() == ROOT_DATA
    assert (env.dst / UUID / "disk.local").read_bytes() == LOCAL_DATA
    assert (env.dst / UUID / "domain.xml").read_text() == dom.xml
    assert libvirt.VIR_DOMAIN_XML_INACTIVE in dom.xml_flags

    assert data_sources(env) == [str(env.resize_dir / f) for f in ("disk", "disk.local")]
    assert str(env.resize_dir / "domain.xml") in env.copier.sources()  # beside the disks
    method, _src, ep, kw = data_calls(env)[0]
    assert method == "stream"
    assert (ep.host, ep.path, ep.user, ep.port, ep.identity, ep.known_hosts, ep.remote_command) == (
        "hostB", str(env.inst_dir / "disk"), "ferry", 2222, "/keys/id", "/keys/known_hosts",
        ("/opt/cf/bin/coldferry", "receive"))
    assert kw == {"options": CopyOptions(streams=4, channel="ssh", compress="fast", retries=7, fsync=False),
                  "overwrite": True, "progress": None, "sleep": env.clock.sleep}
    [(rfs_ep, rfs_root)] = env.target.sessions
    assert (rfs_ep.host, rfs_ep.path, rfs_ep.user, rfs_root) == ("hostB", "/", "ferry", str(env.src))
    assert env.target.closed == 1

    disks = json.loads(DiskInfo.dumps(outcome.disk_info))
    assert [set(d) >= {"type", "path", "virt_disk_size", "backing_file", "disk_size", "over_committed_disk_size"}
            for d in disks] == [True, True]
    assert disks[0] == {"type": "qcow2", "path": str(env.inst_dir / "disk"), "virt_disk_size": GiB,
                        "backing_file": "", "disk_size": len(ROOT_DATA),
                        "over_committed_disk_size": GiB - len(ROOT_DATA), "target": "vda"}
    assert (disks[1]["type"], disks[1]["virt_disk_size"], disks[1]["target"]) == ("raw", 2 * GiB, "vdb")
    assert outcome.shared is False and len(outcome.copies) == 3 and outcome.was_running
    assert outcome.copies[0].method == "stream" and outcome.bytes_before_power_off == 0
    assert outcome.bytes_sent == outcome.bytes_after_power_off == sum(c.sent for c in outcome.copies)


def test_migrate_rsync(make_env):
    env = make_env(transfer_method="rsync")
    inst, _ = env.add_instance()
    env.migrate(inst)
    assert [m for m, *_ in env.copier.calls] == ["rsync", "rsync"]
    assert data_calls(env)[0][3] == {"options": CopyOptions(method="rsync", fsync=True), "progress": None,
                                      "overwrite": True, "sleep": env.clock.sleep}
    assert env.target_files() == {f"{UUID}/disk", f"{UUID}/domain.xml"}


def test_migrate_reports_progress_per_file(env):
    inst, _ = env.add_instance()
    seen = []
    env.migrate(inst, progress=lambda name, p: seen.append((name, p.total)))
    assert sorted(seen) == [("disk", len(ROOT_DATA)), ("domain.xml", len(env.conn.domains[UUID].xml))]


def test_migrate_records_its_phases(env):
    inst, dom = env.add_instance(local_size=GiB)
    dom.shutdown_takes = 2
    timeline = Timeline()
    env.migrate(inst, timeout=60, retry_interval=10, timeline=timeline)
    assert [(p.name, p.detail) for p in timeline.phases if p.detail != "domain.xml"] == [
        ("connect", ""), ("shutdown", ""), ("copy", "disk"), ("copy", "disk.local")]
    [definition] = [p for p in timeline.phases if p.detail == "domain.xml"]
    assert definition.name == "copy" and definition.start >= timeline.phases[1].end  # after the shutdown
    ends = [p.end for p in timeline.phases]
    assert ends == sorted(ends) and all(p.start <= p.end for p in timeline.phases)


def test_a_failed_copy_leaves_the_phases_up_to_it(env):
    inst, _ = env.add_instance(local_size=GiB)
    env.copier.fail_on = "disk.local"
    timeline = Timeline()
    with pytest.raises(MigrationFailed):
        env.migrate(inst, timeline=timeline)
    assert [(p.name, p.detail) for p in timeline.phases if p.detail != "domain.xml"] == [
        ("connect", ""), ("shutdown", ""), ("copy", "disk"), ("copy", "disk.local")]


def test_migrate_clean_shutdown_with_timeout(env):
    inst, dom = env.add_instance()
    dom.shutdown_takes = 2
    env.migrate(inst, timeout=60, retry_interval=10)
    assert dom.calls == ["shutdown"]


def test_migrate_of_a_stopped_instance(env):
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    env.migrate(inst, timeout=60)
    assert dom.calls == []
    assert (env.dst / UUID / "disk").read_bytes() == ROOT_DATA


# -- backing files -----------------------------------------------------------------


def test_backing_file_missing_on_the_target_is_sent_first(env):
    base = env.add_base()
    inst, _ = env.add_instance(backing=base)
    outcome = env.migrate(inst)
    assert data_sources(env)[0] == base
    assert data_calls(env)[0][2].path == base  # same image cache path on the target
    assert (env.dst / "_base" / "base.img").read_bytes() == Path(base).read_bytes()
    assert outcome.disk_info[0].backing_file == base


def test_backing_chain_is_sent_whole_and_once_for_two_disks(env):
    base1 = env.add_base("base1.img")
    base2 = env.add_base("base2.img", data=b"second layer" * 100, backing=base1)
    inst, _ = env.add_instance(backing=base2, extra_disks=[("disk.swap", "qcow2", "vdc")])
    (env.inst_dir / "disk.swap").write_bytes(b"swap")
    env.qemu.add(str(env.inst_dir / "disk.swap"), "qcow2", GiB, 4, backing=base2)
    env.migrate(inst)
    assert data_sources(env)[:2] == [base2, base1]
    assert env.copier.sources().count(base2) == 1
    assert {"_base/base1.img", "_base/base2.img"} <= env.target_files()


def test_backing_file_already_on_the_target_is_not_sent(env):
    base = env.add_base()
    (env.dst / "_base").mkdir()
    shutil.copyfile(base, env.dst / "_base" / "base.img")
    inst, _ = env.add_instance(backing=base)
    env.migrate(inst)
    assert base not in env.copier.sources()
    assert env.target.ops("digest") == ["_base/base.img"]


def test_a_different_file_under_the_backing_name_on_the_target_is_refused(env):
    base = env.add_base()
    (env.dst / "_base").mkdir()
    (env.dst / "_base" / "base.img").write_bytes(b"some other image")
    inst, dom = env.add_instance(backing=base)
    with pytest.raises(ImageError) as e:
        env.migrate(inst)
    assert "holds a different file" in str(e.value) and base in str(e.value)
    _untouched(env, dom)


def test_backing_file_outside_the_image_cache_is_refused_with_send(env):
    base = env.add_golden()
    inst, dom = env.add_instance(backing=base)
    with pytest.raises(ImageError) as e:
        env.migrate(inst)
    assert "backing = flatten" in str(e.value)
    _untouched(env, dom)


def test_flatten_copies_the_merged_image_and_removes_it(make_env):
    env = make_env(backing="flatten")
    base = env.add_golden()  # outside _base: flatten does not care
    inst, _ = env.add_instance(backing=base)
    env.migrate(inst)
    src = str(env.resize_dir / "disk")
    assert env.qemu.commands("convert") == [["qemu-img", "convert", "-O", "qcow2", src, src + ".flat"]]
    assert data_sources(env)[0] == src + ".flat"
    assert data_calls(env)[0][2].path == str(env.inst_dir / "disk")
    assert (env.dst / UUID / "disk").read_bytes() == ROOT_DATA + b"+flattened"
    assert not os.path.exists(src + ".flat")
    assert base not in env.copier.sources()
    assert "_base" not in {p.split("/")[0] for p in env.target_files()}


def test_flatten_leaves_disks_without_backing_alone(make_env):
    env = make_env(backing="flatten")
    inst, _ = env.add_instance()
    env.migrate(inst)
    assert env.qemu.commands("convert") == []
    assert data_sources(env)[0] == str(env.resize_dir / "disk")


def test_flatten_space_check_counts_the_merged_image(make_env):
    env = make_env(backing="flatten")
    inst, dom = env.add_instance(backing=env.add_golden(b"g" * (1 << 20)))
    env.target.free = len(ROOT_DATA) + 4096  # room for the overlay alone, not for overlay + 1 MiB base
    with pytest.raises(InsufficientSpace):
        env.migrate(inst)


# -- leftovers of an earlier failed try ------------------------------------------------


def test_leftover_resize_dir_next_to_the_instance_dir_is_removed_first(env):
    inst, _ = env.add_instance()
    env.resize_dir.mkdir()
    (env.resize_dir / "stale").write_text("from an earlier try")
    env.migrate(inst)
    assert not (env.resize_dir / "stale").exists()
    assert (env.resize_dir / "disk").read_bytes() == ROOT_DATA


def test_clear_leftover_renames_a_lone_resize_dir_back(env):
    env.resize_dir.mkdir()
    (env.resize_dir / "disk").write_bytes(ROOT_DATA)
    env.driver._clear_leftover(UUID)
    assert (env.inst_dir / "disk").read_bytes() == ROOT_DATA
    assert not env.resize_dir.exists()


def test_lone_leftover_resize_dir_is_renamed_back_and_migrated(env):
    inst, _ = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    os.rename(env.inst_dir, env.resize_dir)  # an earlier try died after its rename
    env.migrate(inst)
    assert (env.dst / UUID / "disk").read_bytes() == ROOT_DATA


# -- failure during the copy ---------------------------------------------------------


def test_copy_failure_restores_the_source_and_starts_it_again(env):
    inst, dom = env.add_instance(local_size=GiB)
    env.copier.fail_on = "disk.local"
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    msg = str(e.value)
    assert msg == (f"migration of instance {UUID} to hostB failed: transfer failed: connection reset by peer. "
                   "The source instance was restored and started again")
    assert isinstance(e.value.__cause__, TransferError)
    assert env.inst_dir.is_dir() and not env.resize_dir.exists()
    assert (env.inst_dir / "disk").read_bytes() == ROOT_DATA
    assert (env.inst_dir / "disk.local").read_bytes() == LOCAL_DATA
    assert not (env.dst / UUID).exists()
    assert UUID in env.target.ops("remove")
    assert dom.isActive() and dom.calls[-1] == "create"


def test_the_definition_is_copied_while_the_disks_are(env, monkeypatch):
    inst, _ = env.add_instance(local_size=GiB)
    definition_started, overlapped = threading.Event(), []

    def copy(src: str, ep: Any, options: CopyOptions, **kw: Any) -> Any:
        if os.path.basename(src) == "domain.xml":
            definition_started.set()
        elif os.path.basename(src) == "disk":   # a long disk copy: the definition's starts meanwhile
            overlapped.append(definition_started.wait(10))
        return env.copier.copy(src, ep, options, **kw)

    monkeypatch.setattr(transfer, "copy", copy)
    outcome = env.migrate(inst)
    assert overlapped == [True]
    assert (env.dst / UUID / "domain.xml").read_text() == env.conn.domains[UUID].xml
    assert sorted(c.digest for c in outcome.copies) == ["digest-of-disk", "digest-of-disk.local",
                                                       "digest-of-domain.xml"]


def test_a_failed_definition_copy_fails_the_migration_and_restores_the_source(env):
    inst, dom = env.add_instance(local_size=GiB)
    env.copier.fail_on = "domain.xml"
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert isinstance(e.value.__cause__, TransferError)
    assert env.inst_dir.is_dir() and not env.resize_dir.exists()
    assert (env.inst_dir / "disk").read_bytes() == ROOT_DATA
    assert env.target_files() == set() and UUID in env.target.ops("remove")
    assert dom.isActive() and dom.calls[-1] == "create"


def test_a_failed_disk_copy_is_undone_only_after_the_definition_copy_ended(env, monkeypatch):
    inst, dom = env.add_instance()
    disk_failed, removes_when_definition_ended = threading.Event(), []

    def copy(src: str, ep: Any, options: CopyOptions, **kw: Any) -> Any:
        if os.path.basename(src) == "domain.xml":
            disk_failed.wait(10)
            time.sleep(0.05)   # the undoing, were it not waiting, would remove the target's files now
            result = env.copier.copy(src, ep, options, **kw)
            removes_when_definition_ended.append([n for n in env.target.ops("remove") if UUID in n])
            return result
        disk_failed.set()
        raise TransferError(reason="connection reset by peer")

    monkeypatch.setattr(transfer, "copy", copy)
    with pytest.raises(MigrationFailed):
        env.migrate(inst)
    assert removes_when_definition_ended == [[]]
    assert UUID in env.target.ops("remove") and env.target_files() == set()
    assert env.inst_dir.is_dir() and not env.resize_dir.exists() and dom.isActive()


def test_copy_failure_leaves_a_stopped_instance_stopped(env):
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    env.copier.fail_on = "disk"
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert str(e.value).endswith("The source instance was restored")
    assert "create" not in dom.calls and not dom.isActive()
    assert (env.inst_dir / "disk").read_bytes() == ROOT_DATA
    assert env.target_files() == set()


@pytest.mark.parametrize("method", ["stream", "rsync"])
def test_copy_failure_removes_the_partial_copy_on_the_target(make_env, method):
    env = make_env(transfer_method=method)
    inst, _ = env.add_instance()
    env.copier.fail_on = "disk"
    with pytest.raises(MigrationFailed):
        env.migrate(inst)
    assert not (env.dst / UUID).exists()
    assert env.target_files() == set()


@pytest.mark.parametrize("fail_on", [
    "disk",  # the backing file was sent whole before
    pytest.param("base.img"),
])
def test_copy_failure_leaves_nothing_in_the_target_cache(env, fail_on):
    base = env.add_base()
    inst, _ = env.add_instance(backing=base)
    env.copier.fail_on = fail_on
    with pytest.raises(MigrationFailed):
        env.migrate(inst)
    assert env.target_files() == set()
    assert Path(base).read_bytes() == b"base image " * 2048  # the source's cache is never touched


def test_failed_flatten_restores_the_source(make_env):
    env = make_env(backing="flatten")
    inst, dom = env.add_instance(backing=env.add_golden())
    env.qemu.fail["convert"] = ImageError(path="disk", reason="No space left on device")
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert "No space left on device" in str(e.value)
    assert env.inst_dir.is_dir() and not env.resize_dir.exists()
    assert dom.isActive()


def test_failed_flatten_copy_removes_the_flat_file(make_env):
    env = make_env(backing="flatten")
    inst, _ = env.add_instance(backing=env.add_golden())
    env.copier.fail_on = "disk.flat"
    with pytest.raises(MigrationFailed):
        env.migrate(inst)
    assert sorted(os.listdir(env.inst_dir)) == ["console.log", "disk", "domain.xml"]


def test_failed_remote_cleanup_tells_to_remove_by_hand(env):
    inst, dom = env.add_instance()
    env.copier.fail_on = "disk"
    env.target.fail[("remove", UUID)] = ConnectionLost(host="hostB", reason="No route to host")
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert str(e.value).endswith(f"restored and started again; remove {env.inst_dir} on hostB by hand")
    assert env.inst_dir.is_dir() and dom.isActive()


def test_unreachable_target_during_cleanup_tells_to_remove_by_hand(env):
    inst, _ = env.add_instance()
    env.copier.fail_on = "disk"
    real = env.target.remote_fs

    def second_session_fails(ep, root):
        if env.target.sessions:
            env.target.sessions.append((ep, root))
            raise OSError(113, "No route to host")
        return real(ep, root)
    env.driver.mover.remote_fs = second_session_fails
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert "by hand" in str(e.value)
    assert len(env.target.sessions) == 2
    assert env.inst_dir.is_dir()


def test_restart_failure_after_rollback_is_in_the_message(env):
    inst, dom = env.add_instance()
    env.copier.fail_on = "disk"
    dom.fail["create"] = libvirt_error("Cannot allocate memory")
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert "restored but did not start again (" in str(e.value)
    assert "Cannot allocate memory" in str(e.value)
    assert env.inst_dir.is_dir() and not dom.isActive()


def test_failure_without_a_message_names_the_exception(env):
    inst, _ = env.add_instance()
    env.copier.fail_on = "disk"
    env.copier.error = OSError()
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert "failed: OSError." in str(e.value)


def test_shared_storage_failure_only_restarts(make_env, mocker):
    env = make_env(shared=True)
    inst, dom = env.add_instance()
    mocker.patch.object(driver_mod, "write_atomic", side_effect=OSError(28, "No space left on device"))
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert str(e.value).endswith("No space left on device. The source instance was restored and started again")
    assert len(env.target.sessions) == 1  # no cleanup session on shared storage
    assert dom.isActive() and env.inst_dir.is_dir()


# -- finish_migration (destination side) ------------------------------------------------


@pytest.fixture
def dest(env, mocker):
    """``env`` as the destination: the copied directory is here, no domain defined yet."""
    env.inst_dir.mkdir()
    (env.inst_dir / "disk").write_bytes(ROOT_DATA)
    (env.inst_dir / "disk.local").write_bytes(LOCAL_DATA)
    xml = make_xml(UUID, str(env.inst_dir), [("disk", "qcow2", "vda"), ("disk.local", "raw", "vdb")],
                   flavor={"name": "small", "root_gb": 1, "ephemeral_gb": 1},
                   bridges=[("52:54:00:aa:bb:01", "br-ext")])
    (env.inst_dir / "domain.xml").write_text(xml)
    env.ensure = mocker.patch.object(bridges, "ensure", return_value=[])
    env.disk_info = ([
        DiskInfo("qcow2", str(env.inst_dir / "disk"), GiB, "", len(ROOT_DATA), 0, "vda"),
        DiskInfo("raw", str(env.inst_dir / "disk.local"), GiB, "", len(LOCAL_DATA), 0, "vdb")])
    return env


def _finish(env: Env, flavor: Flavor, resize: bool = True, power_on: bool = True,
            vifs: list[Vif] | None = None) -> None:
    env.driver.finish_migration(MIGRATION, Instance(UUID, "vm1", flavor, "hostB"), env.disk_info, vifs or [], {},
                                resize, None, power_on)


def test_finish_grows_disks_when_the_flavor_grew(dest):
    _finish(dest, Flavor("large", 4, 4096, 20, 5))
    assert dest.qemu.commands("resize") == [
        ["qemu-img", "resize", "-f", "qcow2", str(dest.inst_dir / "disk"), str(20 * GiB)],
        ["qemu-img", "resize", "-f", "raw", str(dest.inst_dir / "disk.local"), str(5 * GiB)]]


@pytest.mark.parametrize("flavor, resize", [(Flavor("same", 1, 1024, 1, 1), True),
                                            (Flavor("large", 1, 1024, 20, 5), False),
                                            (Flavor("noeph", 1, 1024, 1, 0), True)])
def test_finish_does_not_grow_disks(dest, flavor, resize):
    _finish(dest, flavor, resize=resize)
    assert dest.qemu.commands("resize") == []


def test_finish_defines_the_rewritten_domain_and_starts_it(dest):
    vifs = [Vif("52:54:00:aa:bb:02", "bridge", "br-two")]
    _finish(dest, Flavor("large", 4, 4096, 20, 5), vifs=vifs)
    [xml] = dest.conn.defined
    root = ET.fromstring(xml)
    assert root.find("memory").text == str(4096 * 1024) and root.find("memory").get("unit") == "KiB"
    assert root.find("currentMemory").text == str(4096 * 1024)
    assert root.find("vcpu").text == "4"
    assert root.find(f"./metadata/{META_NS}flavor").attrib == {"name": "large", "root_gb": "20",
                                                                "ephemeral_gb": "5"}
    assert [d.path for d in domain_xml.disks(root)] == [str(dest.inst_dir / "disk"),
                                                       str(dest.inst_dir / "disk.local")]
    assert root.find("./devices/serial/source").get("path") == str(dest.inst_dir / "console.log")
    dom = dest.conn.domains[UUID]
    assert dom.calls == ["create"] and dom.isActive()
    (interfaces, network_info, create, host), _ = dest.ensure.call_args
    assert interfaces == [domain_xml.BridgeInterface("52:54:00:aa:bb:01", "br-ext")]
    assert (network_info, create, host) == (vifs, False, "hostA")


def test_finish_passes_create_bridges(make_env, mocker):
    env = make_env(create_bridges=True)
    env.inst_dir.mkdir()
    (env.inst_dir / "domain.xml").write_text(make_xml(UUID, str(env.inst_dir), []))
    ensure = mocker.patch.object(bridges, "ensure", return_value=[])
    env.driver.finish_migration(MIGRATION, Instance(UUID, "vm1", SMALL), [], [], {}, False, None, False)
    assert ensure.call_args.args[2] is True


def test_finish_records_grow_define_and_start(dest):
    timeline = Timeline()
    dest.driver.finish_migration(MIGRATION, Instance(UUID, "vm1", Flavor("large", 4, 4096, 20, 5), "hostB"),
                                 dest.disk_info, [], {}, True, None, True, timeline=timeline)
    assert [p.name for p in timeline.phases] == ["grow", "define", "start"]


def test_finish_without_power_on_only_defines(dest):
    _finish(dest, SMALL, power_on=False)
    assert dest.conn.domains[UUID].calls == []
    assert len(dest.conn.defined) == 1


def test_finish_without_the_copied_domain_xml_is_a_driver_error(dest):
    (dest.inst_dir / "domain.xml").unlink()
    with pytest.raises(DriverError) as e:
        _finish(dest, SMALL)
    assert "copied domain definition" in str(e.value) and UUID in str(e.value)
    assert dest.conn.defined == [] and dest.qemu.calls == []


def test_finish_libvirt_refusing_the_domain_is_a_driver_error(dest):
    dest.conn.define_error = libvirt_error("XML error: unknown OS type hvm2", libvirt.VIR_ERR_XML_ERROR)
    with pytest.raises(DriverError) as e:
        _finish(dest, SMALL)
    assert "could not define the migrated domain" in str(e.value) and "unknown OS type" in str(e.value)


def test_finish_start_error_is_start_failed(dest, monkeypatch):
    def create(self: FakeDomain) -> int:
        raise libvirt_error("unsupported configuration: Domain requires KVM, but it is not available")
    monkeypatch.setattr(FakeDomain, "create", create)  # the domain defineXML makes
    with pytest.raises(StartFailed) as e:
        _finish(dest, SMALL)
    assert "requires KVM" in str(e.value) and "hostA" in str(e.value)
    assert UUID in dest.conn.domains  # defined, for the operator to look at


def test_finish_waits_bounded_for_running(dest, monkeypatch):
    monkeypatch.setattr(FakeDomain, "create", lambda self: setattr(self, "_state", libvirt.VIR_DOMAIN_PAUSED))
    with pytest.raises(StartFailed) as e:
        _finish(dest, SMALL)
    assert "still PAUSED after 60 s" in str(e.value)


def test_finish_missing_bridge_stops_before_define(dest):
    dest.ensure.side_effect = BridgeMissing(bridge="br-ext", mac="52:54:00:aa:bb:01", host="hostA")
    with pytest.raises(BridgeMissing):
        _finish(dest, SMALL)
    assert dest.conn.defined == []


# -- confirm and revert ---------------------------------------------------------------


def test_confirm_drops_the_kept_copy_and_the_definition(env):
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    os.rename(env.inst_dir, env.resize_dir)
    env.driver.confirm_migration(MIGRATION, inst, [])
    assert not env.resize_dir.exists()
    assert dom.calls == ["undefine"] and UUID not in env.conn.domains


def test_confirm_retries_removing_the_kept_copy(env, mocker):
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    os.rename(env.inst_dir, env.resize_dir)
    real = shutil.rmtree
    failures = [OSError(16, "Device or resource busy")]

    def flaky(path, *a, **kw):
        if failures:
            raise failures.pop()
        real(path, *a, **kw)
    rmtree = mocker.patch.object(driver_mod.shutil, "rmtree", side_effect=flaky)
    env.driver.confirm_migration(MIGRATION, inst, [])
    assert rmtree.call_count == 2
    assert env.clock.sleeps == [1.0]
    assert not env.resize_dir.exists()
    assert UUID not in env.conn.domains


def test_confirm_gives_up_after_five_tries(env, mocker):
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    os.rename(env.inst_dir, env.resize_dir)
    rmtree = mocker.patch.object(driver_mod.shutil, "rmtree", side_effect=OSError(16, "Device or resource busy"))
    with pytest.raises(HostError, match=r"could not confirm the migration on host hostA: \[Errno 16\] Device or "
                                        "resource busy"):
        env.driver.confirm_migration(MIGRATION, inst, [])
    assert rmtree.call_count == 5
    assert env.clock.sleeps == [1.0] * 4
    assert UUID in env.conn.domains


def test_confirm_refuses_to_undefine_a_running_source(env):
    inst, dom = env.add_instance()
    with pytest.raises(InvalidInstanceState) as e:
        env.driver.confirm_migration(MIGRATION, inst, [])
    assert "refusing to remove it" in str(e.value)
    assert "undefine" not in dom.calls and UUID in env.conn.domains


def test_confirm_without_a_domain_or_kept_copy_is_fine(env, mocker):
    rmtree = mocker.spy(driver_mod.shutil, "rmtree")
    env.driver.confirm_migration(MIGRATION, Instance(UUID, "vm1", SMALL), [])
    assert rmtree.call_count == 0


def test_confirm_without_a_domain_still_drops_the_kept_copy(env):
    env.resize_dir.mkdir()
    env.driver.confirm_migration(MIGRATION, Instance(UUID, "vm1", SMALL), [])
    assert not env.resize_dir.exists()


def test_revert_renames_the_kept_copy_back_and_starts(env):
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    os.rename(env.inst_dir, env.resize_dir)
    env.inst_dir.mkdir()
    (env.inst_dir / "stray").write_text("half a copy")
    env.driver.finish_revert_migration(inst, [], MIGRATION)
    assert not env.resize_dir.exists()
    assert sorted(os.listdir(env.inst_dir)) == ["console.log", "disk"]
    assert dom.calls == ["create"] and dom.isActive()


def test_revert_defines_from_domain_xml_when_the_domain_is_gone(env):
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    (env.inst_dir / "domain.xml").write_text(dom.xml)
    del env.conn.domains[UUID]
    os.rename(env.inst_dir, env.resize_dir)
    env.driver.finish_revert_migration(inst, [], MIGRATION)
    assert env.conn.defined == [dom.xml]
    assert env.conn.domains[UUID].isActive()


def test_revert_without_power_on_leaves_it_off(env):
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    os.rename(env.inst_dir, env.resize_dir)
    env.driver.finish_revert_migration(inst, [], MIGRATION, None, power_on=False)
    assert env.inst_dir.is_dir() and dom.calls == []


def test_revert_of_a_running_instance_does_not_start_it_twice(env):
    inst, dom = env.add_instance()
    env.driver.finish_revert_migration(inst, [], MIGRATION)
    assert dom.calls == []
    assert env.inst_dir.is_dir()


def test_revert_start_error_is_start_failed(env):
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    dom.fail["create"] = libvirt_error("Cannot allocate memory")
    with pytest.raises(StartFailed):
        env.driver.finish_revert_migration(inst, [], MIGRATION)


def test_destroy_stops_undefines_and_removes_disks(env):
    inst, dom = env.add_instance()
    env.driver.destroy(inst, [])
    assert dom.calls == ["destroy", "undefine"]
    assert UUID not in env.conn.domains and not env.inst_dir.exists()


def test_destroy_keeps_disks_when_asked(env):
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    env.driver.destroy(inst, [], destroy_disks=False)
    assert dom.calls == ["undefine"]
    assert (env.inst_dir / "disk").read_bytes() == ROOT_DATA


def test_destroy_without_a_domain_still_removes_disks(env):
    env.inst_dir.mkdir()
    (env.inst_dir / "disk").write_bytes(b"partial")
    env.driver.destroy(Instance(UUID, "", SMALL), [])
    assert not env.inst_dir.exists()


def test_failure_before_the_rename_leaves_the_directory_where_it_is(env, mocker):
    inst, dom = env.add_instance()
    mocker.patch.object(driver_mod, "write_atomic", side_effect=OSError(28, "No space left on device"))
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert "No space left on device" in str(e.value) and "started again" in str(e.value)
    assert (env.inst_dir / "disk").read_bytes() == ROOT_DATA and not env.resize_dir.exists()
    assert not (env.dst / UUID).exists() and env.copier.calls == []
    assert dom.isActive()
