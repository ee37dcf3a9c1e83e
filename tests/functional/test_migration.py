"""Cold migration between two lab hosts, through the real driver on each host.

Every driver call runs inside its host (``coldferry driver`` in the host's
namespaces), against that host's own libvirtd, and the disks travel over
the lab network to the other host's sshd.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest

from tests.support import guest
from tests.support.drivernode import COLDFERRY, INSTANCES, DriverNode
from tests.support.procs import descendants
from transfer.digest import file_digest

MiB, GiB = 1 << 20, 1 << 30
SMALL = {"name": "small", "vcpus": 1, "memory_mb": 128, "root_gb": 1}


class Node(DriverNode):
    def sshd_children(self, needle: str) -> list[int]:
        return [pid for pid, argv in descendants(self.host.pids["sshd"].pid) if any(needle in a for a in argv)]


@pytest.fixture(scope="module")
def image():
    return guest.ensure_built()


@pytest.fixture(scope="module")
def domain_type(image):
    return guest.detect_domain_type(image)


@pytest.fixture
def nodes(lab, tmp_path):
    """Make (A, B) with driver settings; instances made on them are destroyed afterwards."""
    made: list[Node] = []

    def make(method: str = "stream", **settings: Any) -> tuple[Node, Node]:
        pair = []
        for host in lab.hosts[:2]:
            cfg = tmp_path / f"{host.name}-{method}-{len(made)}.toml"
            pair.append(Node.configure(lab, host, cfg, transfer_method=method, **settings))
        made.extend(pair)
        return pair[0], pair[1]

    make.instances = []  # type: ignore[attr-defined]
    yield make
    for uuid in make.instances:  # type: ignore[attr-defined]
        for node in made[:2]:  # wherever it ended up
            node.call("destroy", uuid=uuid)
            for suffix in ("", "_resize"):
                subprocess.run(["rm", "-rf", "--", str(node.dir(uuid, suffix))], check=False)


def create(make, node: Node, image, domain_type: str, kind: str, *, mode: str = "check",
           start: bool = False) -> tuple[str, str, str]:
    """Define an instance on ``node``; return (uuid, name, disk format)."""
    uuid = str(uuidlib.uuid4())
    name = f"cf-{uuid[:8]}"
    inst = node.dir(uuid)
    inst.mkdir(parents=True)
    disk = inst / "disk"
    fmt = "raw"
    if kind == "sparse-raw":
        with open(disk, "wb") as f:
            f.truncate(GiB)
            for off, n in ((256 * MiB, 4 * MiB), (900 * MiB, 2 * MiB)):
                f.seek(off)
                f.write(os.urandom(n))
    elif kind == "dense-raw":
        with open(disk, "wb") as f:
            f.truncate(2 * GiB)
            f.seek(MiB)
            f.write(os.urandom(48 * MiB))
    elif kind == "qcow2-backing":
        fmt = "qcow2"
        base_name = f"base-{uuid[:8]}.raw"
        (node.host.instances_dir / "_base").mkdir(exist_ok=True)
        with open(node.host.instances_dir / "_base" / base_name, "wb") as f:
            f.truncate(256 * MiB)
            f.seek(64 * MiB)
            f.write(os.urandom(8 * MiB))
        base_in_host = f"{INSTANCES}/_base/{base_name}"
        disk_in_host = f"{INSTANCES}/{uuid}/disk"
        for argv in (["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base_in_host, disk_in_host, "512M"],
                     ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 128M 4M", disk_in_host]):
            node.host.run(argv, check=True, capture_output=True, timeout=120)
    elif kind == "guest":
        guest.make_disk(disk, 64 * MiB)
    xml = guest.domain_xml(name, f"{INSTANCES}/{uuid}/disk", f"{INSTANCES}/{uuid}/console.log", image, uuid=uuid,
                           domain_type=domain_type, disk_format=fmt, mode=mode)
    conn = node.host.connect()
    try:
        dom = conn.defineXML(xml)
        if start:
            dom.create()
    finally:
        conn.close()
    make.instances.append(uuid)
    return uuid, name, fmt


def same_disk(a: Node, b: Node, uuid: str, fmt: str) -> bool:
    """qemu-img compare of the source's kept disk and the target's copy, run on the target."""
    run = b.host.run(["qemu-img", "compare", "-q", "-f", fmt, "-F", fmt, str(a.dir(uuid, "_resize") / "disk"),
                      f"{INSTANCES}/{uuid}/disk"], capture_output=True, text=True, timeout=300)
    return run.returncode == 0


def console(node: Node, uuid: str) -> Path:
    return node.dir(uuid) / "console.log"


def test_qcow2_with_backing_file_moves_grows_and_is_confirmed(nodes, image, domain_type):
    a, b = nodes("stream")
    uuid, name, fmt = create(nodes, a, image, domain_type, "qcow2-backing")
    bigger = {**SMALL, "name": "bigger", "root_gb": 2}
    result = a.ok("migrate-disk-and-power-off", uuid=uuid, dest=b.host.ip, flavor=bigger)
    disks = json.loads(result["disk_info"])
    assert [d["backing_file"] for d in disks] == [f"{INSTANCES}/_base/base-{uuid[:8]}.raw"]
    assert not result["shared"]
    assert (b.host.instances_dir / "_base" / f"base-{uuid[:8]}.raw").exists()  # sent into the image cache
    assert a.dir(uuid, "_resize").is_dir() and not a.dir(uuid).exists()
    assert same_disk(a, b, uuid, fmt)

    b.ok("finish-migration", uuid=uuid, name=name, flavor=bigger, disk_info=result["disk_info"],
         resize_instance=True, power_on=True)
    assert b.state(uuid) == "running"
    info = json.loads(b.host.run(["qemu-img", "info", "-U", "--output=json", f"{INSTANCES}/{uuid}/disk"],
                                 capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == 2 * GiB  # grown to the new flavor

    a.ok("confirm-migration", uuid=uuid)
    assert not a.dir(uuid, "_resize").exists()
    assert a.state(uuid) == "undefined"
    assert b.state(uuid) == "running"


@pytest.mark.parametrize("method", ["stream", "rsync"])
def test_guest_moves_and_reads_its_data_on_the_target(nodes, image, domain_type, method):
    a, b = nodes(method)
    uuid, name, fmt = create(nodes, a, image, domain_type, "guest", mode="write", start=True)
    guest.wait_for(console(a, uuid), r"CFGUEST ready", timeout=180)
    assert "wrote 0" in guest.console_lines(console(a, uuid))

    result = a.ok("migrate-disk-and-power-off", uuid=uuid, dest=b.host.ip, timeout=60, retry_interval=10)
    assert "poweroff" in guest.console_lines(a.dir(uuid, "_resize") / "console.log")  # clean ACPI shutdown
    assert same_disk(a, b, uuid, fmt)
    assert a.state(uuid) == "shut off"

    b.ok("finish-migration", uuid=uuid, name=name, flavor=SMALL, disk_info=result["disk_info"])
    guest.wait_for(console(b, uuid), r"CFGUEST verify ok 1", timeout=180)
    guest.wait_for(console(b, uuid), r"CFGUEST wrote 1", timeout=60)
    a.ok("confirm-migration", uuid=uuid)
    assert a.state(uuid) == "undefined" and b.state(uuid) == "running"


def test_revert_brings_the_source_back_as_it_was(nodes, image, domain_type):
    a, b = nodes("rsync")
    uuid, name, fmt = create(nodes, a, image, domain_type, "sparse-raw", start=True)
    guest.wait_for(console(a, uuid), r"CFGUEST ready", timeout=180)
    before = file_digest(str(a.dir(uuid) / "disk"))

    result = a.ok("migrate-disk-and-power-off", uuid=uuid, dest=b.host.ip)
    assert (b.dir(uuid) / "disk").stat().st_blocks * 512 < 64 * MiB  # the copy stayed sparse
    b.ok("finish-migration", uuid=uuid, name=name, flavor=SMALL, disk_info=result["disk_info"])
    assert b.state(uuid) == "running"

    b.ok("destroy", uuid=uuid)
    assert b.state(uuid) == "undefined" and not b.dir(uuid).exists()
    a.ok("finish-revert-migration", uuid=uuid)
    assert a.state(uuid) == "running"
    assert not a.dir(uuid, "_resize").exists()
    assert file_digest(str(a.dir(uuid) / "disk")) == before


@pytest.mark.parametrize("method,needle", [("stream", "receive"), ("rsync", "--server")])
def test_copy_killed_midway_leaves_the_source_as_it_was(nodes, image, domain_type, method, needle, tmp_path):
    a, b = nodes(method, transfer_bwlimit=8 * MiB, transfer_retries=0)
    uuid, name, fmt = create(nodes, a, image, domain_type, "dense-raw", start=True)
    guest.wait_for(console(a, uuid), r"CFGUEST ready", timeout=180)
    before = file_digest(str(a.dir(uuid) / "disk"))

    shrink = a.call("migrate-disk-and-power-off", uuid=uuid, dest=b.host.ip, flavor={**SMALL, "root_gb": 1})
    assert shrink["error"] == "ResizeDown" and "disks can only grow" in shrink["message"], shrink
    assert a.state(uuid) == "running"

    argv = [COLDFERRY, "driver", "--config", str(a.config), "migrate-disk-and-power-off"]
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"uuid": uuid, "dest": b.host.ip}))
    with open(args) as stdin:
        proc = a.host.popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: list[int] = []
    deadline = time.monotonic() + 120
    while not killed and time.monotonic() < deadline and proc.poll() is None:
        # The copy has begun once a partial file appears (.disk.coldferry-part, rsync's .disk.XXXXXX).
        if b.dir(uuid).is_dir() and any(p.name.startswith(".disk") for p in b.dir(uuid).iterdir()):
            for pid in b.sshd_children(needle):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.1)
    out, err = proc.communicate(timeout=300)
    assert killed, f"no copy process to kill was seen: {out} {err[-2000:]}"
    reply = json.loads(out)
    assert reply["error"] == "MigrationFailed" and "started again" in reply["message"], reply

    assert a.state(uuid) == "running"
    assert not a.dir(uuid, "_resize").exists()
    assert file_digest(str(a.dir(uuid) / "disk")) == before
    assert not b.dir(uuid).exists()
    assert b.state(uuid) == "undefined"


def test_missing_bridge_on_the_target_is_an_error_or_created(nodes, image, domain_type):
    a, b = nodes("stream")
    bridge = "cfbrtest0"
    a.host.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    try:
        uuid = str(uuidlib.uuid4())
        name = f"cf-{uuid[:8]}"
        a.dir(uuid).mkdir(parents=True)
        guest.make_disk(a.dir(uuid) / "disk", 16 * MiB)
        xml = guest.domain_xml(name, f"{INSTANCES}/{uuid}/disk", f"{INSTANCES}/{uuid}/console.log", image, uuid=uuid,
                               domain_type=domain_type, bridge=bridge)
        conn = a.host.connect()
        conn.defineXML(xml)
        conn.close()
        nodes.instances.append(uuid)
        result = a.ok("migrate-disk-and-power-off", uuid=uuid, dest=b.host.ip)

        refused = b.call("finish-migration", uuid=uuid, name=name, flavor=SMALL, disk_info=result["disk_info"],
                         power_on=False)
        assert refused["error"] == "BridgeMissing" and "create_bridges" in refused["message"], refused
        assert b.state(uuid) == "undefined"

        _, b_create = nodes("stream", create_bridges=True)
        b_create.ok("finish-migration", uuid=uuid, name=name, flavor=SMALL, disk_info=result["disk_info"],
                    power_on=False)
        assert b.host.run(["ip", "link", "show", bridge], capture_output=True).returncode == 0
        assert b.state(uuid) == "shut off"
    finally:
        a.host.run(["ip", "link", "del", bridge], check=False)
        b.host.run(["ip", "link", "del", bridge], check=False, capture_output=True)
