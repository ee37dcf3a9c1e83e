"""Live migration between two lab hosts, through the real driver on the source host.

The test guest appends a record to its disk every half second and says so
on its serial console. It must go on doing so on the destination with the
same boot (no "boot" line there, the same boot id in every record), and
every record it wrote before the move must be on the destination's disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support import guest
from tests.support.drivernode import COLDFERRY, INSTANCES, DriverNode

MiB = 1 << 20
DISK_SIZE = 64 * MiB
STRIDE = 4096            # records side by side from 1 MiB on: room for thousands
BASE_DATA_AT = 48 * MiB  # where the backing file holds data the guest never writes over


@pytest.fixture(scope="module")
def image() -> guest.GuestImage:
    return guest.ensure_built()


@pytest.fixture(scope="module")
def domain_type(image: guest.GuestImage) -> str:
    return guest.detect_domain_type(image)


@pytest.fixture
def pair(lab, tmp_path) -> Iterator[tuple[DriverNode, DriverNode, list[str]]]:
    """(A, B) with default driver settings, and a list of instances to destroy afterwards."""
    a, b = (DriverNode.configure(lab, h, tmp_path / f"{h.name}.toml") for h in lab.hosts[:2])
    made: list[str] = []
    yield a, b, made
    for uuid in made:
        for node in (a, b):
            node.call("destroy", uuid=uuid)
            subprocess.run(["rm", "-rf", "--", str(node.dir(uuid))], check=False)
            subprocess.run(["rm", "-f", "--", str(node.host.instances_dir / "_base" / f"base-{uuid[:8]}.raw")],
                           check=False)


def boot_writeloop(node: DriverNode, image: guest.GuestImage, domain_type: str, made: list[str],
                   fmt: str = "raw") -> str:
    """Define and start a guest on ``node`` that appends a record every 0.5 s; its uuid.

    fmt: ``raw``, or ``qcow2`` for an overlay on a raw backing file in the image cache.
    """
    uuid = str(uuidlib.uuid4())
    node.dir(uuid).mkdir(parents=True)
    made.append(uuid)
    disk_in_host = f"{INSTANCES}/{uuid}/disk"
    if fmt == "raw":
        guest.make_disk(node.dir(uuid) / "disk", DISK_SIZE)
    else:
        cache = node.host.instances_dir / "_base"
        cache.mkdir(exist_ok=True)
        with open(cache / f"base-{uuid[:8]}.raw", "wb") as f:
            f.truncate(DISK_SIZE)
            f.seek(BASE_DATA_AT)
            f.write(os.urandom(4 * MiB))
        node.host.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                       f"{INSTANCES}/_base/base-{uuid[:8]}.raw", disk_in_host, str(DISK_SIZE)],
                      check=True, capture_output=True, timeout=60)
    xml = guest.domain_xml(f"cf-{uuid[:8]}", disk_in_host, f"{INSTANCES}/{uuid}/console.log", image, uuid=uuid,
                           domain_type=domain_type, disk_format=fmt, mode="writeloop", interval=0.5,
                           stride=STRIDE)
    conn = node.host.connect()
    try:
        conn.defineXML(xml).create()
    finally:
        conn.close()
    return uuid


def console(node: DriverNode, uuid: str) -> Path:
    return node.dir(uuid) / "console.log"


def last_written(node: DriverNode, uuid: str) -> int:
    numbers = [int(line.split()[1]) for line in guest.console_lines(console(node, uuid)) if line.startswith("wrote ")]
    return max(numbers, default=-1)


def wait_written(node: DriverNode, uuid: str, index: int, timeout: float = 60) -> None:
    """Wait until the guest on ``node`` reports record ``index`` (or a later one) written."""
    deadline = time.monotonic() + timeout
    while last_written(node, uuid) < index:
        assert time.monotonic() < deadline, (f"record {index} not written on {node.host.name} within {timeout} s: "
                                             f"{guest.console_lines(console(node, uuid))[-5:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def flat_disk(node: DriverNode, uuid: str, fmt: str) -> Iterator[Path]:
    """The instance's disk as raw bytes the guest sees; a qcow2 chain is read inside the host
    (its backing path is the host's)."""
    if fmt == "raw":
        yield node.dir(uuid) / "disk"
        return
    node.host.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", f"{INSTANCES}/{uuid}/disk",
                   f"{INSTANCES}/{uuid}/flat.raw"], check=True, capture_output=True, timeout=120)
    try:
        yield node.dir(uuid) / "flat.raw"
    finally:
        (node.dir(uuid) / "flat.raw").unlink()


def read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_running_guest_moves_live_and_keeps_writing(pair, image, domain_type, fmt):
    a, b, made = pair
    uuid = boot_writeloop(a, image, domain_type, made, fmt)
    boot = guest.wait_for(console(a, uuid), r"CFGUEST boot ", timeout=180).split()[-1]
    guest.wait_for(console(a, uuid), r"CFGUEST wrote 3$", timeout=120)
    with flat_disk(a, uuid, fmt) as disk:
        before = guest.records_on_disk(disk)
        base_data = read(disk, BASE_DATA_AT, 4 * MiB)

    started = time.monotonic()
    result = a.ok("live-migrate", uuid=uuid, dest=b.host.ip)
    took = time.monotonic() - started
    print(f"\nlive migration ({fmt}): {json.dumps(result)}; call took {took:.1f} s")

    assert a.state(uuid) == "undefined" and b.state(uuid) == "running"
    assert not a.dir(uuid).exists()  # the stale source copy is gone
    assert result["downtime_s"] is not None and 0 < result["downtime_s"] < 5
    assert ("NON_SHARED_INC" if fmt == "qcow2" else "NON_SHARED_DISK") in result["flags"]
    assert not result["shared"]

    # The same boot goes on writing on host2.
    seen = max(r.index for r in before)
    wait_written(b, uuid, seen + 3)
    lines = guest.console_lines(console(b, uuid))
    assert not [line for line in lines if line.startswith(("boot", "verify"))], lines
    with flat_disk(b, uuid, fmt) as disk:
        after = guest.records_on_disk(disk)
        assert read(disk, BASE_DATA_AT, 4 * MiB) == base_data  # what the backing file holds (zeros for raw)
    assert all(r.ok and r.boot_id == boot for r in after), [r for r in after if not r.ok or r.boot_id != boot]
    assert after[:len(before)] == before and len(after) > len(before)

    if fmt == "qcow2":  # only the overlay was mirrored: the backing file came into the image cache
        info = json.loads(b.host.run(["qemu-img", "info", "-U", "--output=json", f"{INSTANCES}/{uuid}/disk"],
                                     capture_output=True, text=True, check=True).stdout)
        assert info["backing-filename"] == f"{INSTANCES}/_base/base-{uuid[:8]}.raw"
        assert (b.host.instances_dir / "_base" / f"base-{uuid[:8]}.raw").read_bytes() == \
            (a.host.instances_dir / "_base" / f"base-{uuid[:8]}.raw").read_bytes()


def test_unreachable_destination_leaves_the_guest_running(pair, image, domain_type):
    a, b, made = pair
    uuid = boot_writeloop(a, image, domain_type, made)
    guest.wait_for(console(a, uuid), r"CFGUEST wrote 1$", timeout=180)
    nobody = b.host.ip.rsplit(".", 1)[0] + ".99"  # in the lab's subnet, no host there

    reply = a.call("live-migrate", uuid=uuid, dest=nobody)
    assert reply.get("error") == "MigrationFailed" and "kept running on host1" in reply["message"], reply

    assert a.state(uuid) == "running"
    wait_written(a, uuid, last_written(a, uuid) + 2)


def test_destination_qemu_killed_midway_leaves_the_guest_running(pair, image, domain_type, lab, tmp_path):
    a, b, made = pair
    slow = DriverNode.configure(lab, a.host, tmp_path / "slow.toml", transfer_bwlimit=4 * MiB)
    uuid = boot_writeloop(a, image, domain_type, made)
    guest.wait_for(console(a, uuid), r"CFGUEST wrote 1$", timeout=180)

    args = tmp_path / "args.json"
    args.write_text(json.dumps({"uuid": uuid, "dest": b.host.ip}))
    argv = [COLDFERRY, "driver", "--config", str(slow.config), "live-migrate"]
    with open(args) as stdin:
        proc = a.host.popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # libvirtd writes the incoming qemu's pid file when it starts it; memory then flows at 4 MiB/s.
    pid_file = b.host.dir / "run/libvirt/qemu" / f"cf-{uuid[:8]}.pid"
    killed = _kill_when_running(pid_file, proc, after=2.0)
    out, err = proc.communicate(timeout=300)
    assert killed, f"the destination's qemu never started: {out} {err[-2000:]}"
    reply = json.loads(out)
    assert reply.get("error") == "MigrationFailed" and "kept running on host1" in reply["message"], reply

    assert a.state(uuid) == "running" and b.state(uuid) == "undefined"
    assert not b.dir(uuid).exists()  # the blank disk made there was removed
    wait_written(a, uuid, last_written(a, uuid) + 2)


def _kill_when_running(pid_file: Path, proc: subprocess.Popen[Any], after: float, timeout: float = 120) -> bool:
    """SIGKILL the process named in ``pid_file`` ``after`` seconds after it appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        text = pid_file.read_text().strip() if pid_file.exists() else ""
        if re.fullmatch(r"\d+", text):
            time.sleep(after)
            try:
                os.kill(int(text), signal.SIGKILL)
            except ProcessLookupError:
                return False
            return True
        time.sleep(0.1)
    return False
