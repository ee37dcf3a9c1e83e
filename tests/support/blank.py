"""A domain without an operating system: firmware and one data disk.

It defines and starts in a fraction of a second, its disk changes only when a test
writes it (so a digest taken before a migration must match after), and nothing in
it answers the ACPI power button: a clean shutdown always runs into the driver's
timeout and ends forced, which is what a hung guest does too. ``acpi=False``
leaves the ACPI feature out altogether (a guest that cannot even be asked).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

MiB = 1 << 20


def domain_xml(name: str, uuid: str, disk: Path | str, *, domain_type: str = "qemu", acpi: bool = True,
               bridge: str | None = None, memory_mib: int = 64) -> str:
    """Libvirt XML of a firmware-only domain whose one virtio disk is the raw file ``disk``
    (a path inside the host); ``bridge`` adds a virtio interface on that bridge."""
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = uuid
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_, "boot", dev="hd")
    features = ET.SubElement(dom, "features")
    if acpi:
        ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        ET.SubElement(dom, event).text = action
    devices = ET.SubElement(dom, "devices")
    disk_el = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk_el, "driver", name="qemu", type="raw")
    ET.SubElement(disk_el, "source", file=str(disk))
    ET.SubElement(disk_el, "target", dev="vda", bus="virtio")
    if bridge:
        nic = ET.SubElement(devices, "interface", type="bridge")
        ET.SubElement(nic, "source", bridge=bridge)
        ET.SubElement(nic, "model", type="virtio")
    ET.SubElement(devices, "memballoon", model="none")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def make_disk(path: Path, size_mib: int, data_mib: int) -> None:
    """A sparse raw disk of ``size_mib`` MiB with ``data_mib`` MiB of random data from 1 MiB on
    (the first MiB, where a boot sector would be, stays zero)."""
    if data_mib + 1 > size_mib:
        raise ValueError(f"{data_mib} MiB of data do not fit a {size_mib} MiB disk after its first MiB")
    with open(path, "xb") as f:
        f.truncate(size_mib * MiB)
        f.seek(MiB)
        for _ in range(data_mib):
            f.write(os.urandom(MiB))
