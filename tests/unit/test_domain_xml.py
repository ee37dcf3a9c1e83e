"""Reading and rewriting domain XML, on XML shaped the way libvirt writes it."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from driver.libvirt import domain_xml
from driver.libvirt.domain_xml import BridgeInterface, DiskDevice

NS = domain_xml.METADATA_NS
DIR = "/var/lib/coldferry/instances/6f1c3f9e-8a44-4d43-9a6e-0b1f3f7c2a10"

DOMAIN = f"""<domain type='kvm'>
  <name>vm1</name>
  <uuid>6f1c3f9e-8a44-4d43-9a6e-0b1f3f7c2a10</uuid>
  <metadata>
    <other:thing xmlns:other="https://example.invalid/other">keep me</other:thing>
  </metadata>
  <memory unit='KiB'>2097152</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-8.2'>hvm</type><kernel>{DIR}/kernel</kernel></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{DIR}/disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='{DIR}/disk.config'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/volume'><host name='ceph1' port='6789'/></source>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='{DIR}/disk.local'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <disk type='file' device='floppy'>
      <source file='{DIR}/floppy.img'/>
      <target dev='fda'/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:12:34:56'/>
      <source bridge='br-ext'/>
      <model type='virtio'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:12:34:57'/>
      <source network='default'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:12:34:58'/>
    </interface>
    <serial type='file'>
      <source path='{DIR}/console.log'/>
      <target port='0'/>
    </serial>
    <serial type='file'>
      <source path='/var/log/elsewhere/console.log'/>
    </serial>
  </devices>
</domain>"""


@pytest.fixture
def root() -> ET.Element:
    return domain_xml.parse(DOMAIN)


def test_disks_are_file_backed_disks_only_in_device_order(root):
    assert domain_xml.disks(root) == [DiskDevice(f"{DIR}/disk", "qcow2", "vda"),
                                      DiskDevice(f"{DIR}/disk.local", "raw", "vdb")]


def test_a_disk_without_driver_or_target_still_counts():
    root = domain_xml.parse("<domain><devices><disk><source file='/i/d'/></disk></devices></domain>")
    assert domain_xml.disks(root) == [DiskDevice("/i/d", "raw", "")]


def test_bridges_are_the_bridge_interfaces(root):
    assert domain_xml.bridges(root) == [BridgeInterface("52:54:00:12:34:56", "br-ext"),
                                        BridgeInterface("52:54:00:12:34:58", "")]


def test_no_devices_no_disks_no_bridges():
    root = domain_xml.parse("<domain type='kvm'><name>x</name></domain>")
    assert domain_xml.disks(root) == [] and domain_xml.bridges(root) == []


@pytest.mark.parametrize("memory, mb", [
    ("<memory unit='KiB'>2097152</memory>", 2048),
    ("<memory>1048576</memory>", 1024),
    ("<memory unit='k'>524288</memory>", 512),
    ("<memory unit='MiB'>4096</memory>", 4096),
    ("<memory unit='M'>300</memory>", 300),
    ("<memory unit='GiB'>2</memory>", 2048),
    ("<memory unit='G'>3</memory>", 3072),
    ("<memory unit='b'>1073741824</memory>", 1024),
    ("<memory unit='bytes'>536870912</memory>", 512),
    ("<memory unit='KiB'></memory>", 0),
    ("", 0),
])
def test_memory_units(memory, mb):
    assert domain_xml.memory_mb(domain_xml.parse(f"<domain>{memory}</domain>")) == mb


@pytest.mark.parametrize("vcpu, n", [("<vcpu placement='static'>4</vcpu>", 4), ("", 1), ("<vcpu/>", 1)])
def test_vcpus(vcpu, n):
    assert domain_xml.vcpus(domain_xml.parse(f"<domain>{vcpu}</domain>")) == n


def test_flavor_metadata_absent(root):
    assert domain_xml.flavor_metadata(root) == {}


def test_flavor_metadata_round_trip(root):
    domain_xml.set_flavor_metadata(root, {"name": "m1", "root_gb": 20})
    again = domain_xml.parse(ET.tostring(root, encoding="unicode"))
    assert domain_xml.flavor_metadata(again) == {"name": "m1", "root_gb": "20"}
    assert again.findtext("./metadata/{https://example.invalid/other}thing") == "keep me"


def test_set_flavor_metadata_replaces_old_attributes_and_creates_metadata():
    root = domain_xml.parse("<domain/>")
    domain_xml.set_flavor_metadata(root, {"name": "a", "ephemeral_gb": 5})
    domain_xml.set_flavor_metadata(root, {"name": "b"})
    assert domain_xml.flavor_metadata(root) == {"name": "b"}
    assert len(root.findall(f"./metadata/{{{NS}}}flavor")) == 1


def test_rewrite_moves_every_path_under_the_old_dir(root):
    new = "/srv/other/6f1c"
    out = domain_xml.parse(domain_xml.rewrite(DOMAIN, DIR, new))
    assert [d.path for d in domain_xml.disks(out)] == [f"{new}/disk", f"{new}/disk.local"]
    assert out.find("./devices/disk[@device='cdrom']/source").get("file") == f"{new}/disk.config"
    assert [s.get("path") for s in out.findall("./devices/serial/source")] == [
        f"{new}/console.log", "/var/log/elsewhere/console.log"]
    assert out.findtext("./os/kernel") == f"{DIR}/kernel"  # text, not a file= attribute: left alone
    assert out.find("./devices/disk[@type='network']/source").get("name") == "pool/volume"


def test_rewrite_matches_whole_directory_names_only():
    xml = f"<domain><devices><disk><source file='{DIR}_resize/disk'/></disk></devices></domain>"
    out = domain_xml.parse(domain_xml.rewrite(xml, DIR, "/new"))
    assert domain_xml.disks(out)[0].path == f"{DIR}_resize/disk"


def test_rewrite_accepts_trailing_slashes():
    xml = f"<domain><devices><disk><source file='{DIR}/disk'/></disk></devices></domain>"
    out = domain_xml.parse(domain_xml.rewrite(xml, DIR + "/", "/new/"))
    assert domain_xml.disks(out)[0].path == "/new/disk"


def test_rewrite_sets_memory_current_memory_vcpus_and_flavor(root):
    out = domain_xml.parse(domain_xml.rewrite(DOMAIN, DIR, DIR, 4096, 8, {"name": "big", "root_gb": 40}))
    for tag in ("memory", "currentMemory"):
        assert (out.find(tag).text, out.find(tag).get("unit")) == (str(4096 * 1024), "KiB")
    assert domain_xml.memory_mb(out) == 4096
    assert out.find("vcpu").text == "8" and out.find("vcpu").get("placement") == "static"
    assert domain_xml.flavor_metadata(out) == {"name": "big", "root_gb": "40"}
    assert domain_xml.disks(out) == domain_xml.disks(root)


def test_rewrite_converts_other_memory_units():
    xml = "<domain><memory unit='GiB'>1</memory><currentMemory unit='MiB'>512</currentMemory></domain>"
    out = domain_xml.parse(domain_xml.rewrite(xml, "/a", "/b", 2048))
    assert [(out.find(t).text, out.find(t).get("unit")) for t in ("memory", "currentMemory")] == [
        ("2097152", "KiB"), ("2097152", "KiB")]


def test_rewrite_without_sizes_changes_nothing_but_paths(root):
    out = domain_xml.parse(domain_xml.rewrite(DOMAIN, DIR, DIR))
    assert out.find("memory").text == "2097152" and out.find("currentMemory").text == "1048576"
    assert out.find("vcpu").text == "2"
    assert domain_xml.flavor_metadata(out) == {}


def test_rewrite_adds_a_missing_vcpu_element():
    out = domain_xml.parse(domain_xml.rewrite("<domain><name>x</name></domain>", "/a", "/b", None, 3))
    assert domain_xml.vcpus(out) == 3
    assert out.find("memory") is None


def test_rewrite_keeps_current_vcpus_within_the_new_count():
    xml = "<domain><vcpu placement='static' current='4'>8</vcpu></domain>"
    out = domain_xml.parse(domain_xml.rewrite(xml, "/a", "/b", None, 2))
    assert int(out.find("vcpu").get("current", "2")) <= 2
