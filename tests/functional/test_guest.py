"""The test guest booted by qemu directly (TCG, no libvirt): it verifies and
writes its record log, powers off cleanly on the ACPI power button, and the
host reads what it wrote."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from tests.support import guest
from tests.support.guest import SECTOR, console_lines, make_disk, records_on_disk, start_qemu

MiB = 1 << 20
BOOT = 60.0  # a TCG boot to "ready" takes 5-10 s here
EXIT = 30.0  # power button to qemu's exit takes about a second


@pytest.fixture(scope="module")
def image() -> guest.GuestImage:
    return guest.ensure_built()


def boot_and_power_off(image: guest.GuestImage, workdir, disk, name: str, **kw) -> list[str]:
    """Boot, wait for ready, press the power button; the guest's console lines."""
    with start_qemu(image, workdir, disk, name=name, **kw) as vm:
        vm.wait_for(r"^CFGUEST ready$", BOOT)
        vm.powerdown()
        assert vm.wait_exit(EXIT) == 0
    lines = console_lines(vm.serial_log)
    assert lines[-1] == "poweroff"
    return lines


def test_write_verify_and_detect_corruption(image, tmp_path):
    disk = make_disk(tmp_path / "disk.raw", 64 * MiB)

    first = boot_and_power_off(image, tmp_path, disk, "boot1")
    assert "verify ok 0" in first and "wrote 0" in first
    second = boot_and_power_off(image, tmp_path, disk, "boot2")
    assert "verify ok 1" in second and "wrote 1" in second

    records = records_on_disk(disk)
    assert [(r.index, r.seq, r.ok) for r in records] == [(0, 0, True), (1, 1, True)]
    boot_ids = [line.split()[1] for line in first + second if line.startswith("boot ")]
    assert [r.boot_id for r in records] == boot_ids

    with open(disk, "r+b") as f:  # flip bytes in record 1's payload
        f.seek(records[1].offset + SECTOR + 100)
        data = f.read(16)
        f.seek(records[1].offset + SECTOR + 100)
        f.write(bytes(b ^ 0xFF for b in data))
    assert [r.ok for r in records_on_disk(disk)] == [True, False]

    with start_qemu(image, tmp_path, disk, name="boot3", mode="check") as vm:
        vm.wait_for(r"^CFGUEST ready$", BOOT)
    third = console_lines(vm.serial_log)
    assert "verify FAIL 1 bad-sha256" in third
    assert not any(line.startswith(("verify ok", "wrote")) for line in third)


def test_writeloop_every_printed_write_is_on_disk(image, tmp_path):
    disk = make_disk(tmp_path / "disk.raw", 64 * MiB)
    stride = 256 * 1024
    with start_qemu(image, tmp_path, disk, name="loop", mode="writeloop", interval=0.2, stride=stride) as vm:
        vm.wait_for(r"^CFGUEST wrote 5$", BOOT)
        vm.powerdown()
        assert vm.wait_exit(EXIT) == 0
    lines = console_lines(vm.serial_log)
    assert lines[-1] == "poweroff"
    printed = [int(line.split()[1]) for line in lines if line.startswith("wrote ")]
    assert printed == list(range(len(printed)))

    records = records_on_disk(disk)
    assert len(records) >= len(printed)
    assert all(r.ok for r in records)
    assert records[1].offset - records[0].offset == stride
    assert len({r.boot_id for r in records}) == 1


def test_qcow2_disk(image, tmp_path):
    disk = make_disk(tmp_path / "disk.qcow2", 64 * MiB, "qcow2")
    lines = boot_and_power_off(image, tmp_path, disk, "qcow2", disk_format="qcow2")
    assert "wrote 0" in lines
    assert [(r.index, r.ok) for r in records_on_disk(disk)] == [(0, True)]


def test_detect_domain_type_boots(image, tmp_path):
    domain_type = guest.detect_domain_type(image)
    assert domain_type in ("kvm", "qemu")
    accel = "kvm" if domain_type == "kvm" else "tcg"
    with start_qemu(image, tmp_path, None, name="probe", accel=accel, mode="probe") as vm:
        vm.wait_for(r"^CFGUEST probe ok$", BOOT)
        assert vm.wait_exit(EXIT) == 0


def test_domain_xml_is_valid_libvirt(image, tmp_path):
    xml = guest.domain_xml("cfguest-1", tmp_path / "disk.qcow2", tmp_path / "serial.log", image,
                           uuid="6f1e8a34-64a5-4c3e-9a8e-2f7f1d3b0c11", domain_type="kvm",
                           disk_format="qcow2", mode="writeloop", interval=0.5, bridge="cfbr0")
    root = ET.fromstring(xml)
    assert root.get("type") == "kvm"
    assert root.findtext("memory") == "128" and root.find("memory").get("unit") == "MiB"
    assert root.findtext("os/kernel") == str(image.kernel)
    assert "cfguest.mode=writeloop cfguest.interval=0.5" in root.findtext("os/cmdline")
    assert root.find("devices/disk/driver").get("type") == "qcow2"
    assert root.find("devices/serial/source").get("path") == str(tmp_path / "serial.log")
    assert root.find("devices/interface/source").get("bridge") == "cfbr0"
    assert root.find("features/acpi") is not None
    assert ET.fromstring(guest.domain_xml("n", "d", "s", image)).find("devices/interface") is None

    if not (shutil.which("virt-xml-validate") and shutil.which("xmllint")):
        pytest.fail("virt-xml-validate and xmllint are needed: install libvirt-clients and libxml2-utils")
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    result = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_records_on_disk_empty_and_foreign_header():
    assert records_on_disk(bytes(2 * MiB)) == []
    with pytest.raises(guest.GuestError, match="CFGUEST1"):
        records_on_disk(b"NOTAGUEST count=1 stride=4096\n".ljust(2 * MiB, b"\0"))


def test_wait_for_is_bounded(tmp_path):
    log = tmp_path / "serial.log"
    log.write_bytes(b"CFGUEST boot x\r\nCFGUEST rea")  # an unfinished line does not match
    with pytest.raises(guest.GuestTimeout, match="ready"):
        guest.wait_for(log, r"ready", timeout=0.3)
    assert guest.console_lines(log) == ["boot x"]
