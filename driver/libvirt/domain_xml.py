"""Reading and rewriting libvirt domain XML.

Only what migration needs: the file-backed disks, the bridge interfaces,
the sizes, and a rewrite of paths, memory and vcpus for the target.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

METADATA_NS = "https://coldferry.invalid/xmlns/instance/1"


@dataclass(frozen=True)
class DiskDevice:
    path: str
    format: str
    target: str


@dataclass(frozen=True)
class BridgeInterface:
    mac: str
    bridge: str


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)


def disks(root: ET.Element) -> list[DiskDevice]:
    """File-backed disks (not CD-ROMs), in device order."""
    out = []
    for disk in root.findall("./devices/disk"):
        source = disk.find("source")
        if disk.get("device", "disk") != "disk" or source is None or not source.get("file"):
            continue
        driver = disk.find("driver")
        target = disk.find("target")
        out.append(DiskDevice(source.get("file", ""), (driver.get("type") if driver is not None else None) or "raw",
                              target.get("dev", "") if target is not None else ""))
    return out


def bridges(root: ET.Element) -> list[BridgeInterface]:
    out = []
    for iface in root.findall("./devices/interface[@type='bridge']"):
        mac = iface.find("mac")
        source = iface.find("source")
        out.append(BridgeInterface(mac.get("address", "") if mac is not None else "",
                                   source.get("bridge", "") if source is not None else ""))
    return out


def memory_mb(root: ET.Element) -> int:
    mem = root.find("memory")
    if mem is None or not mem.text:
        return 0
    factor = {"b": 1 / 1024, "bytes": 1 / 1024, "KiB": 1, "k": 1, "MiB": 1024, "M": 1024, "GiB": 1024 ** 2,
              "G": 1024 ** 2}.get(mem.get("unit", "KiB"), 1)
    return int(int(mem.text) * factor) // 1024


def vcpus(root: ET.Element) -> int:
    vcpu = root.find("vcpu")
    return int(vcpu.text) if vcpu is not None and vcpu.text else 1


def flavor_metadata(root: ET.Element) -> dict[str, str]:
    node = root.find(f"./metadata/{{{METADATA_NS}}}flavor")
    return dict(node.attrib) if node is not None else {}


def rewrite(xml: str, old_dir: str, new_dir: str, memory_mb_: int | None = None, vcpus_: int | None = None,
            flavor: dict[str, str] | None = None) -> str:
    """Return ``xml`` with every path under ``old_dir`` moved under ``new_dir`` and new sizes."""
    root = parse(xml)
    old_prefix = old_dir.rstrip("/") + "/"
    for node in root.iter():
        for attr in ("file", "path"):
            value = node.get(attr)
            if value and value.startswith(old_prefix):
                node.set(attr, new_dir.rstrip("/") + "/" + value[len(old_prefix):])
    if memory_mb_:
        for tag in ("memory", "currentMemory"):
            node = root.find(tag)
            if node is not None:
                node.text = str(memory_mb_ * 1024)
                node.set("unit", "KiB")
    if vcpus_:
        node = root.find("vcpu")
        if node is None:
            node = ET.SubElement(root, "vcpu")
        node.text = str(vcpus_)
        current = node.get("current")
        if current is not None and int(current) > vcpus_:
            del node.attrib["current"]
    if flavor is not None:
        set_flavor_metadata(root, flavor)
    return ET.tostring(root, encoding="unicode")


def set_flavor_metadata(root: ET.Element, flavor: dict[str, str]) -> None:
    meta = root.find("metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    node = meta.find(f"{{{METADATA_NS}}}flavor")
    if node is None:
        node = ET.SubElement(meta, f"{{{METADATA_NS}}}flavor")
    node.attrib.clear()
    node.attrib.update({k: str(v) for k, v in flavor.items()})
