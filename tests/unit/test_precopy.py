"""Pre-copy (driver/libvirt/precopy.py) without daemons: every phase, and every phase's failure.

libvirt is the driver tests' fake domain taught the calls pre-copy makes:
a disk-only snapshot that really creates the overlay files and points the
domain's disks at them, and an active block commit whose job advances each
time it is polled and pivots the disks back. qemu-img, the target host and
the copier are the driver tests' fakes (test_libvirt_driver.Env).
"""

from __future__ import annotations

import os
import threading
import xml.etree.ElementTree as ET
from typing import Any

import libvirt
import pytest

from driver.errors import DriverError, ImageError, MigrationFailed
from driver.libvirt import DriverConfig, precopy
from driver.libvirt.precopy import SNAPSHOT_FLAGS
from driver.model import DiskInfo, Timeline

from .fakes import GiB, FakeDomain, libvirt_error
from .test_libvirt_driver import LOCAL_DATA, MIGRATION, ROOT_DATA, SMALL, UUID, Env

OVERLAY_DATA = b"written during the copy " * 100


class SnapDomain(FakeDomain):
    """A FakeDomain with disk-only snapshots and active block commits.

    ``commit_steps``: polls of blockJobInfo until the job is ready (cur == end).
    ``pivot_keeps_overlay``: a pivot that reports success but leaves the disk on the overlay.
    ``events``: what happened, in order, shared with the copier and power calls of the test.
    """

    def setup(self, events: list[str]) -> "SnapDomain":
        self.events = events
        self.commit_steps = 2
        self.jobs: dict[str, dict[str, int]] = {}
        self.snapshot_error: libvirt.libvirtError | None = None
        self.snapshot_leaves_file = False
        self.pivot_error: libvirt.libvirtError | None = None
        self.pivot_keeps_overlay = False
        self.job_vanishes = False
        self.snapshots: list[tuple[str, int]] = []
        return self

    def _sources(self) -> list[ET.Element]:
        return [d for d in ET.fromstring(self.xml).findall("./devices/disk")]

    def _set_source(self, target: str, path: str, fmt: str) -> None:
        root = ET.fromstring(self.xml)
        for disk in root.findall("./devices/disk"):
            if disk.find("target").get("dev") == target:
                disk.find("source").set("file", path)
                disk.find("driver").set("type", fmt)
        self.xml = ET.tostring(root, encoding="unicode")

    def snapshotCreateXML(self, xml: str, flags: int = 0) -> Any:
        self.events.append("snapshot")
        self.snapshots.append((xml, flags))
        wanted = [(d.get("name"), d.find("source").get("file"))
                  for d in ET.fromstring(xml).findall("./disks/disk") if d.get("snapshot") == "external"]
        if self.snapshot_error is not None:
            if self.snapshot_leaves_file:
                open(wanted[0][1], "wb").close()
            raise self.snapshot_error
        self.bases = {}
        for target, overlay in wanted:
            with open(overlay, "wb") as f:
                f.write(OVERLAY_DATA)
            [base] = [d.find("source").get("file") for d in ET.fromstring(self.xml).findall("./devices/disk")
                      if d.find("target").get("dev") == target]
            self.bases[target] = base
            self._set_source(target, overlay, "qcow2")
        return None

    def blockCommit(self, disk: str, base: Any, top: Any, bandwidth: int = 0, flags: int = 0) -> int:
        self.events.append(f"blockCommit {disk} {flags}")
        self._maybe_fail("blockCommit")
        self.jobs[disk] = {"type": 4, "bandwidth": 0, "cur": 0, "end": self.commit_steps}
        return 0

    def blockJobInfo(self, disk: str, flags: int = 0) -> dict[str, int]:
        job = self.jobs.get(disk)
        if job is None or self.job_vanishes:
            return {}
        job["cur"] = min(job["end"], job["cur"] + 1)
        return dict(job)

    def blockJobAbort(self, disk: str, flags: int = 0) -> int:
        self.events.append(f"blockJobAbort {disk} {flags}")
        job = self.jobs.get(disk)
        if flags & libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT:
            if self.pivot_error is not None:
                raise self.pivot_error
            if job is None or job["cur"] < job["end"]:
                raise libvirt_error("block job 'commit' not ready for pivot yet", libvirt.VIR_ERR_BLOCK_COPY_ACTIVE)
            if not self.pivot_keeps_overlay:
                self._set_source(disk, self.bases[disk], "qcow2")
        self.jobs.pop(disk, None)
        return 0

    def shutdown(self) -> int:
        self.events.append("shutdown")
        return super().shutdown()

    def destroy(self) -> int:
        self.events.append("destroy")
        return super().destroy()

    def create(self) -> int:
        self.events.append("create")
        return super().create()


@pytest.fixture
def env(tmp_path, monkeypatch) -> Env:
    return Env(tmp_path, monkeypatch, precopy_threshold=0)


def running(env: Env, **kw: Any) -> tuple[Any, SnapDomain, list[str]]:
    """A running instance with pre-copy-capable libvirt; copies are logged into the same events."""
    inst, dom = env.add_instance(**kw)
    dom.__class__ = SnapDomain
    events: list[str] = []
    dom.setup(events)
    real = env.copier._copy

    def copy(method: str, src: str, ep: Any, kw: dict[str, Any]) -> Any:
        events.append(f"copy {os.path.basename(src)}")
        return real(method, src, ep, kw)
    env.copier._copy = copy  # type: ignore[method-assign]
    return inst, dom, events


def sources(dom: SnapDomain) -> list[str]:
    return [d.find("source").get("file") for d in ET.fromstring(dom.xml).findall("./devices/disk")]


def assert_source_as_it_was(env: Env, dom: SnapDomain, original_xml: str) -> None:
    """Its own disks again, no overlay file, the original definition, and running."""
    assert sources(dom)[:1] == [str(env.inst_dir / "disk")]
    assert not [p for p in os.listdir(env.inst_dir) if p.endswith(".precopy")]
    assert env.inst_dir.is_dir() and not env.resize_dir.exists()
    assert (env.inst_dir / "disk").read_bytes() == ROOT_DATA
    assert env.conn.defined[-1] == original_xml
    assert dom.isActive()
    assert env.target_files() == set()


# -- when it applies -------------------------------------------------------------------


DISK = DiskInfo("raw", "/i/u/disk", 8 * GiB, "", 2 * GiB, 6 * GiB, "vda")


@pytest.mark.parametrize("settings,running_,shared,disks,expected", [
    ({}, True, False, [DISK], True),                                  # default: 2 GiB of data >= 512 MiB
    ({"precopy": False}, True, False, [DISK], False),
    ({}, False, False, [DISK], False),                                # a stopped guest writes nothing
    ({}, True, True, [DISK], False),                                  # shared storage copies nothing
    ({"precopy_threshold": 3 * GiB}, True, False, [DISK], False),     # too little data to matter
    ({"precopy_threshold": 0}, True, False, [], False),
    ({"precopy_threshold": 2 * GiB}, True, False, [DISK], True),
])
def test_applies(settings, running_, shared, disks, expected):
    assert precopy.applies(DriverConfig(**settings), running_, shared, disks) is expected


def test_default_threshold_is_half_a_gib_of_data():
    c = DriverConfig()
    assert (c.precopy, c.precopy_threshold) == (True, 512 << 20)


@pytest.mark.parametrize("settings,word", [({"precopy_threshold": -1}, "precopy_threshold"),
                                           ({"precopy_job_timeout": 0}, "precopy_job_timeout"),
                                           ({"precopy": 1}, "precopy")])
def test_bad_precopy_settings_are_refused(settings, word):
    with pytest.raises(DriverError, match=rf"bad \[driver\] {word} ="):
        DriverConfig(**settings)


def test_small_disks_below_the_default_threshold_are_copied_after_power_off(tmp_path, monkeypatch):
    env = Env(tmp_path, monkeypatch)
    inst, dom, events = running(env)
    outcome = env.migrate(inst)
    assert "snapshot" not in events and events.index("destroy") < events.index("copy disk")
    assert outcome.precopy is False and outcome.bytes_before_power_off == 0
    assert outcome.bytes_after_power_off == sum(c.sent for c in outcome.copies) > 0


def test_snapshot_xml_names_an_overlay_per_migrated_disk_and_none_for_the_cdrom(env):
    disks = [DiskInfo("qcow2", "/i/u/disk", GiB, "", 1, 1, "vda"), DiskInfo("raw", "/i/u/disk.local", GiB, "", 1, 1,
                                                                               "vdb")]
    _, dom = env.add_instance(local_size=GiB)
    snap = ET.fromstring(precopy.snapshot_xml(disks, dom.xml))
    got = [(d.get("name"), d.get("snapshot"), d.findtext("driver") or (d.find("driver").get("type")
           if d.find("driver") is not None else None), d.find("source").get("file") if d.find("source") is not None
           else None) for d in snap.findall("./disks/disk")]
    assert got == [("vda", "external", "qcow2", "/i/u/disk.precopy"), ("vdb", "external", "qcow2",
                   "/i/u/disk.local.precopy"), ("sda", "no", None, None)]


# -- the sequence ------------------------------------------------------------------------


def test_precopy_copies_bases_while_running_then_only_overlays(env):
    inst, dom, events = running(env, local_size=GiB)
    original = dom.xml
    outcome = env.migrate(inst, timeout=0)
    disk_info = outcome.disk_info

    assert events == ["snapshot", "copy domain.xml", "copy disk", "copy disk.local", "destroy",
                      "copy disk.precopy", "copy disk.local.precopy"]
    [(_xml, flags)] = dom.snapshots
    assert flags == SNAPSHOT_FLAGS == (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                                       | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                                       | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
    # The target: bases, overlays and the definition from before the snapshot.
    assert env.target_files() == {f"{UUID}/{f}" for f in ("disk", "disk.local", "disk.precopy",
                                                         "disk.local.precopy", "domain.xml")}
    assert (env.dst / UUID / "disk").read_bytes() == ROOT_DATA
    assert (env.dst / UUID / "disk.precopy").read_bytes() == OVERLAY_DATA
    assert (env.dst / UUID / "domain.xml").read_text() == original
    assert [(d.target, d.overlay) for d in disk_info] == [("vda", str(env.inst_dir / "disk.precopy")),
                                                          ("vdb", str(env.inst_dir / "disk.local.precopy"))]
    # The source: overlays committed (offline, the guest is off) and removed, defined as before, kept aside.
    commits = env.qemu.commands("commit")
    assert commits == [["qemu-img", "commit", "-q", "-d", "-f", "qcow2", str(env.inst_dir / f)]
                       for f in ("disk.precopy", "disk.local.precopy")]
    assert sorted(os.listdir(env.resize_dir)) == ["console.log", "disk", "disk.local", "domain.xml"]
    assert not env.inst_dir.exists() and not dom.isActive()
    assert env.conn.defined[-1] == original
    assert outcome.precopy is True and outcome.powered_off_at is not None and outcome.was_running
    assert outcome.bytes_before_power_off == len(original) + len(ROOT_DATA) + len(LOCAL_DATA)
    assert outcome.bytes_after_power_off == 2 * len(OVERLAY_DATA)
    assert len(outcome.copies) == 5


def test_precopy_records_its_phases_copies_while_running_marked_precopy(env):
    inst, _dom, _events = running(env, local_size=GiB)
    timeline = Timeline()
    env.migrate(inst, timeout=0, timeline=timeline)
    # The definition goes beside the disks, so where it ends among them is not set.
    assert [(p.name, p.detail) for p in timeline.phases if p.detail != "domain.xml"] == [
        ("connect", ""), ("snapshot", ""), ("precopy", "disk"),
        ("precopy", "disk.local"), ("shutdown", ""), ("copy", "disk.precopy"), ("copy", "disk.local.precopy"),
        ("merge", "")]
    phase = {p.detail or p.name: p for p in timeline.phases}
    assert phase["snapshot"].end <= phase["domain.xml"].start <= phase["domain.xml"].end <= phase["shutdown"].start
    assert phase["domain.xml"].name == "precopy"
    ends = [p.end for p in timeline.phases]
    assert ends == sorted(ends) and all(p.start <= p.end for p in timeline.phases)


def test_backing_files_the_target_lacks_go_before_the_power_off(env):
    base = env.add_base()
    inst, _dom, events = running(env, backing=base)
    env.migrate(inst)
    assert [e for e in events if e != "copy domain.xml"][:3] == ["snapshot", "copy base.img", "copy disk"]
    assert events.index("snapshot") < events.index("copy domain.xml") < events.index("destroy")
    assert events.index("copy base.img") < events.index("destroy")
    assert "_base/base.img" in env.target_files()


def test_the_definition_goes_beside_the_bases_while_the_guest_runs(env):
    inst, _dom, events = running(env, local_size=GiB)
    definition_started, overlapped = threading.Event(), []
    logged = env.copier._copy

    def copy(method: str, src: str, ep: Any, kw: dict[str, Any]) -> Any:
        if os.path.basename(src) == "domain.xml":
            definition_started.set()
        elif os.path.basename(src) == "disk":   # a long base copy: the definition's starts meanwhile
            overlapped.append(definition_started.wait(10))
        return logged(method, src, ep, kw)
    env.copier._copy = copy  # type: ignore[method-assign]

    outcome = env.migrate(inst)
    assert overlapped == [True]
    assert events.index("copy domain.xml") < events.index("destroy")
    assert (env.dst / UUID / "domain.xml").exists()
    assert "digest-of-domain.xml" in [c.digest for c in outcome.copies]


# -- failures, phase by phase -------------------------------------------------------------


def test_a_failed_snapshot_leaves_the_guest_running_untouched(env):
    inst, dom, events = running(env)
    original = dom.xml
    dom.snapshot_error = libvirt_error("unsupported configuration: external snapshot of a raw disk")
    dom.snapshot_leaves_file = True
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert "disk-only snapshot" in str(e.value) and "precopy = false" in str(e.value)
    assert "(it kept running)" in str(e.value)
    assert not any(x.startswith("copy") for x in events) and "destroy" not in events
    assert_source_as_it_was(env, dom, original)


def test_a_leftover_overlay_file_is_refused_before_the_snapshot(env):
    inst, dom, events = running(env)
    (env.inst_dir / "disk.precopy").write_bytes(b"old")
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert "disk.precopy exists" in str(e.value)
    assert "snapshot" not in events and dom.isActive()
    assert (env.inst_dir / "disk.precopy").read_bytes() == b"old"  # not ours to remove


def test_a_domain_left_on_an_overlay_is_refused_before_anything(env):
    inst, dom, events = running(env)
    leftover = str(env.inst_dir / "disk.precopy")
    (env.inst_dir / "disk.precopy").write_bytes(OVERLAY_DATA)
    env.qemu.add(leftover, "qcow2", GiB, len(OVERLAY_DATA), backing=str(env.inst_dir / "disk"), backing_format="qcow2")
    dom._set_source("vda", leftover, "qcow2")
    with pytest.raises(ImageError, match="pre-copy overlay left by an interrupted migration .*blockcommit"):
        env.migrate(inst)
    assert events == [] and dom.isActive() and env.target.sessions == []


def test_a_failed_base_copy_merges_the_overlay_back_while_it_runs(env):
    inst, dom, events = running(env)
    original = dom.xml
    env.copier.fail_on = "disk"
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert str(e.value).endswith("The source instance was restored (it kept running)")
    assert events[-2:] == ["blockCommit vda 4", f"blockJobAbort vda {libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT}"]
    assert "destroy" not in events and env.qemu.commands("commit") == []
    assert UUID in env.target.ops("remove")
    assert_source_as_it_was(env, dom, original)


def test_the_pivot_waits_until_the_commit_job_is_ready(env):
    inst, dom, events = running(env)
    dom.commit_steps = 5
    env.copier.fail_on = "disk"
    with pytest.raises(MigrationFailed):
        env.migrate(inst)
    assert env.clock.sleeps.count(precopy.POLL) == 4
    assert events.count(f"blockJobAbort vda {libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT}") == 1
    assert sources(dom)[0] == str(env.inst_dir / "disk")


def test_a_pivot_refused_as_not_ready_is_tried_again(env):
    inst, dom, events = running(env)
    env.copier.fail_on = "disk"
    real = dom.blockJobAbort
    refusals = [libvirt_error("block job not ready", libvirt.VIR_ERR_OPERATION_INVALID)]

    def abort(disk, flags=0):
        if refusals:
            events.append("refused")
            raise refusals.pop()
        return real(disk, flags)
    dom.blockJobAbort = abort  # type: ignore[method-assign]
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert "(it kept running)" in str(e.value) and "refused" in events
    assert not (env.inst_dir / "disk.precopy").exists()


@pytest.mark.parametrize("breakage,words", [
    ("never_ready", "not ready within 600 s (precopy_job_timeout)"),
    ("refused", "block commit of vda refused: Operation not supported"),
    ("pivot_error", "pivot of vda failed: internal error: unable to execute QEMU command"),
    ("vanishes", "vanished before its pivot"),
    ("keeps_overlay", "the domain still uses vda: "),
])
def test_a_failed_merge_while_running_leaves_a_consistent_chain_and_says_so(env, breakage, words):
    inst, dom, events = running(env)
    original = dom.xml
    env.copier.fail_on = "disk"
    if breakage == "never_ready":
        dom.commit_steps = 10 ** 9
    elif breakage == "refused":
        dom.fail["blockCommit"] = libvirt_error("Operation not supported", libvirt.VIR_ERR_OPERATION_UNSUPPORTED)
    elif breakage == "pivot_error":
        dom.pivot_error = libvirt_error("internal error: unable to execute QEMU command")
    elif breakage == "vanishes":
        dom.job_vanishes = True
    else:
        dom.pivot_keeps_overlay = True
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    msg = str(e.value)
    assert "(it kept running)" in msg and words in msg
    assert "still run on the overlays" in msg and "merge them back by hand" in msg
    assert dom.isActive() and env.target_files() == set()
    if breakage == "never_ready":  # the job is cancelled, not left running
        assert events[-1] == "blockJobAbort vda 0"
        assert env.clock.now - 1000.0 >= 600
    if breakage != "keeps_overlay":  # the guest still runs on the overlay: its file must stay
        assert sources(dom)[0] == str(env.inst_dir / "disk.precopy")
        assert (env.inst_dir / "disk.precopy").exists()
        # Not defined back onto the base while the guest still writes to the overlay.
        assert original not in env.conn.defined


def test_a_failed_power_off_merges_back_while_it_runs(env):
    inst, dom, events = running(env)
    original = dom.xml
    dom.fail["destroy"] = libvirt_error("Failed to terminate process: Device or resource busy")
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert "could not power off" in str(e.value) and "(it kept running)" in str(e.value)
    assert "blockCommit vda 4" in events
    assert_source_as_it_was(env, dom, original)


def test_a_failed_overlay_copy_commits_offline_and_starts_the_guest_again(env):
    inst, dom, events = running(env)
    original = dom.xml
    env.copier.fail_on = "disk.precopy"
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert str(e.value).endswith("The source instance was restored and started again")
    assert env.qemu.commands("commit") == [["qemu-img", "commit", "-q", "-d", "-f", "qcow2",
                                            str(env.inst_dir / "disk.precopy")]]
    assert not any(x.startswith("blockCommit") for x in events)
    assert events[-1] == "create"
    dom.xml = env.conn.defined[-1]  # the fake's live XML follows the definition once restarted
    assert_source_as_it_was(env, dom, original)


def test_a_failed_commit_on_the_source_starts_the_guest_on_its_overlay_chain(env):
    inst, dom, events = running(env)
    env.qemu.fail["commit"] = ImageError(path="disk.precopy", reason="Permission denied")
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    msg = str(e.value)
    assert "and started again" in msg and "still run on the overlays" in msg and "Permission denied" in msg
    assert dom.isActive() and sources(dom)[0] == str(env.inst_dir / "disk.precopy")
    assert (env.inst_dir / "disk.precopy").exists() and env.target_files() == set()


def test_a_failure_after_the_merge_puts_the_directory_back(env, mocker):
    inst, dom, events = running(env)
    original = dom.xml
    real_rename = os.rename
    mocker.patch("driver.libvirt.precopy.os.rename", side_effect=OSError(13, "Permission denied"))
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert "Permission denied" in str(e.value) and "and started again" in str(e.value)
    assert len(env.qemu.commands("commit")) == 1 and not any(x.startswith("blockCommit") for x in events)
    mocker.patch("driver.libvirt.precopy.os.rename", real_rename)
    dom.xml = env.conn.defined[-1]
    assert_source_as_it_was(env, dom, original)


def test_a_guest_that_does_not_start_again_is_in_the_message(env):
    inst, dom, _ = running(env)
    env.copier.fail_on = "disk.precopy"
    dom.fail["create"] = libvirt_error("Cannot allocate memory")
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert "but did not start again (" in str(e.value) and "Cannot allocate memory" in str(e.value)
    assert not (env.inst_dir / "disk.precopy").exists()


def test_a_definition_libvirt_refuses_after_the_merge_is_in_the_message(env):
    inst, dom, _ = running(env)
    env.copier.fail_on = "disk"
    env.conn.define_error = libvirt_error("XML error: bad disk")
    with pytest.raises(MigrationFailed) as e:
        env.migrate(inst)
    assert "could not define" in str(e.value) and "XML error: bad disk" in str(e.value)
    assert sources(dom)[0] == str(env.inst_dir / "disk") and dom.isActive()


# -- destination side --------------------------------------------------------------------


def test_finish_commits_the_overlay_into_the_disk_before_defining(env, mocker):
    env.inst_dir.mkdir()
    (env.inst_dir / "disk").write_bytes(ROOT_DATA)
    (env.inst_dir / "disk.precopy").write_bytes(OVERLAY_DATA)
    xml_text = "<domain><name>vm1</name><uuid>%s</uuid><devices/></domain>" % UUID
    (env.inst_dir / "domain.xml").write_text(xml_text)
    overlay = str(env.inst_dir / "disk.precopy")
    disk_info = [DiskInfo("raw", str(env.inst_dir / "disk"), GiB, "", 1, 1, "vda", overlay)]
    mocker.patch("driver.libvirt.driver.bridges.ensure")
    timeline = Timeline()
    env.driver.finish_migration(MIGRATION, type("I", (), {"uuid": UUID, "flavor": SMALL})(), disk_info, [], {},
                                False, power_on=False, timeline=timeline)
    assert env.qemu.commands("commit") == [["qemu-img", "commit", "-q", "-d", "-f", "qcow2", overlay]]
    assert not os.path.exists(overlay) and len(env.conn.defined) == 1
    assert [p.name for p in timeline.phases] == ["commit", "define"]


def test_finish_stops_before_defining_when_the_commit_fails(env, mocker):
    env.inst_dir.mkdir()
    (env.inst_dir / "domain.xml").write_text("<domain><name>vm1</name><uuid>%s</uuid><devices/></domain>" % UUID)
    overlay = str(env.inst_dir / "disk.precopy")
    disk_info = [DiskInfo("raw", str(env.inst_dir / "disk"), GiB, "", 1, 1, "vda", overlay)]
    env.qemu.fail["commit"] = ImageError(path=overlay, reason="Could not open backing file")
    with pytest.raises(ImageError, match="Could not open backing file"):
        env.driver.finish_migration(MIGRATION, type("I", (), {"uuid": UUID, "flavor": SMALL})(), disk_info, [], {},
                                    False)
    assert env.conn.defined == []


def test_disk_info_carries_overlay_only_when_there_is_one():
    plain = DiskInfo("raw", "/i/u/disk", GiB, "", 1, 1, "vda")
    assert "overlay" not in DiskInfo.dumps([plain])
    with_overlay = DiskInfo.loads(DiskInfo.dumps([DiskInfo("raw", "/i/u/disk", GiB, "", 1, 1, "vda",
                                                           "/i/u/disk.precopy")]))
    assert with_overlay[0].overlay == "/i/u/disk.precopy" and DiskInfo.loads(DiskInfo.dumps([plain])) == [plain]
