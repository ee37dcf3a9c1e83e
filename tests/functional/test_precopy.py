"""Pre-copy between two lab hosts: the test guest keeps writing while its disk is copied.

The guest runs in ``writeloop`` mode (a record every 0.2 s, each synced
before the guest counts it). Its disk carries random data beyond the
record log, sent at a limited rate so that the copy takes a few seconds
of guest writes. After it boots on the target the guest itself checks
every record it counted, including those written during the copy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from tests.support import guest
from tests.support.drivernode import COLDFERRY, INSTANCES, DriverNode
from tests.support.procs import descendants

MiB = 1 << 20
SMALL = {"name": "small", "vcpus": 1, "memory_mb": 128, "root_gb": 1}
DATA_AT, DATA = 256 * MiB, 96 * MiB   # past the records the guest writes in these tests
SETTINGS = {"precopy": True, "precopy_threshold": 0, "transfer_bwlimit": 24 * MiB, "transfer_retries": 0}


@pytest.fixture
def pair(lab, tmp_path):
    """(source, target) DriverNodes with pre-copy on; the instances made are removed afterwards."""
    a, b = (DriverNode.configure(lab, h, tmp_path / f"{h.name}.toml", **SETTINGS) for h in lab.hosts[:2])
    made: list[str] = []
    yield a, b, made
    for uuid in made:
        for node in (a, b):
            node.call("destroy", uuid=uuid)
            for suffix in ("", "_resize"):
                subprocess.run(["rm", "-rf", "--", str(node.dir(uuid, suffix))], check=False)


def start_writer(node: DriverNode, image: guest.GuestImage, domain_type: str, made: list[str]) -> str:
    """Define and start the writing guest on ``node`` with a 512 MiB raw disk holding random data."""
    uuid = str(uuidlib.uuid4())
    node.dir(uuid).mkdir(parents=True)
    disk = guest.make_disk(node.dir(uuid) / "disk", 512 * MiB)
    with open(disk, "r+b") as f:
        f.seek(DATA_AT)
        f.write(os.urandom(DATA))
    xml = guest.domain_xml(f"cf-{uuid[:8]}", f"{INSTANCES}/{uuid}/disk", f"{INSTANCES}/{uuid}/console.log", image,
                           uuid=uuid, domain_type=domain_type, mode="writeloop", interval=0.2)
    conn = node.host.connect()
    try:
        conn.defineXML(xml).create()
    finally:
        conn.close()
    made.append(uuid)
    guest.wait_for(node.dir(uuid) / "console.log", r"CFGUEST wrote 2\b", timeout=180)
    return uuid


def last_written(console: Any) -> int:
    """The highest record number the guest said it wrote (record and header synced)."""
    return max(int(m.group(1)) for line in guest.console_lines(console) if (m := re.match(r"wrote (\d+)$", line)))


def disk_sources(node: DriverNode, uuid: str, *flags: str) -> list[str]:
    run = node.host.run(["virsh", "dumpxml", *flags, uuid], capture_output=True, text=True, timeout=60, check=True)
    return [s.get("file", "") for s in ET.fromstring(run.stdout).findall("./devices/disk/source")]


def backing_of(node: DriverNode, path: str) -> str | None:
    run = node.host.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True,
                        timeout=60, check=True)
    return json.loads(run.stdout).get("backing-filename")


def test_writing_guest_moves_with_precopy_and_revert_finds_the_source_as_it_was(pair, image, domain_type):
    a, b, made = pair
    uuid = start_writer(a, image, domain_type, made)
    disk = f"{INSTANCES}/{uuid}/disk"

    result = a.ok("migrate-disk-and-power-off", uuid=uuid, dest=b.host.ip, timeout=60, retry_interval=10)
    [info] = json.loads(result["disk_info"])
    assert info["overlay"] == disk + ".precopy"
    xml, base, overlay = result["copies"]
    assert base["sent"] >= DATA and 0 < overlay["sent"] < 16 * MiB  # only what was written during the copy
    source_console = a.dir(uuid, "_resize") / "console.log"
    lines = guest.console_lines(source_console)
    assert lines[-1] == "poweroff"
    written = last_written(source_console)
    # The base copy took seconds at 24 MiB/s: the guest went on writing meanwhile.
    assert written >= 5, lines[-10:]
    # The source: one image again, no overlay, defined with its own disk.
    assert sorted(p.name for p in a.dir(uuid, "_resize").iterdir()) == ["console.log", "disk", "domain.xml"]
    assert disk_sources(a, uuid, "--inactive") == [disk]

    b.ok("finish-migration", uuid=uuid, name=f"cf-{uuid[:8]}", flavor=SMALL, disk_info=result["disk_info"])
    # The guest checks every record it counted before the shutdown, then writes on.
    target_console = b.dir(uuid) / "console.log"
    line = guest.wait_for(target_console, r"CFGUEST verify (ok|FAIL)", timeout=180)
    assert line == f"CFGUEST verify ok {written + 1}", guest.console_lines(target_console)
    guest.wait_for(target_console, rf"CFGUEST wrote {written + 2}\b", timeout=60)
    assert not (b.dir(uuid) / "disk.precopy").exists() and backing_of(b, disk) is None
    assert disk_sources(b, uuid) == [disk]

    b.ok("destroy", uuid=uuid)
    a.ok("finish-revert-migration", uuid=uuid)
    assert a.state(uuid) == "running"
    assert disk_sources(a, uuid) == [disk] and backing_of(a, disk) is None
    line = guest.wait_for(a.dir(uuid) / "console.log", r"CFGUEST verify (ok|FAIL)", timeout=180)
    assert line == f"CFGUEST verify ok {written + 1}"


def test_copy_killed_during_the_precopy_leaves_the_source_running_on_its_own_disk(pair, image, domain_type,
                                                                                   tmp_path):
    a, b, made = pair
    uuid = start_writer(a, image, domain_type, made)
    disk = f"{INSTANCES}/{uuid}/disk"
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"uuid": uuid, "dest": b.host.ip}))
    argv = [COLDFERRY, "driver", "--config", str(a.config), "migrate-disk-and-power-off"]
    with open(args) as stdin:
        proc = a.host.popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: list[int] = []
    deadline = time.monotonic() + 120
    while not killed and time.monotonic() < deadline and proc.poll() is None:
        if (a.dir(uuid) / "disk.precopy").exists() and b.dir(uuid).is_dir() and any(
                p.name.startswith(".disk") for p in b.dir(uuid).iterdir()):
            for pid, argv_ in descendants(b.host.pids["sshd"].pid):
                if any("receive" in x for x in argv_):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        time.sleep(0.1)
    out, err = proc.communicate(timeout=300)
    assert killed, f"no copy process to kill was seen: {out} {err[-2000:]}"
    reply = json.loads(out)
    assert reply["error"] == "MigrationFailed" and "(it kept running)" in reply["message"], reply

    assert a.state(uuid) == "running"
    assert disk_sources(a, uuid) == [disk] and disk_sources(a, uuid, "--inactive") == [disk]
    assert not (a.dir(uuid) / "disk.precopy").exists() and backing_of(a, disk) is None
    assert not b.dir(uuid).exists()
    # Still writing, to its own disk.
    after = last_written(a.dir(uuid) / "console.log")
    guest.wait_for(a.dir(uuid) / "console.log", rf"CFGUEST wrote {after + 2}\b", timeout=60)
