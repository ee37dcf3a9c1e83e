"""The coldferry demo: cold-migrate a running test guest between two hosts.

It brings up a lab of two hosts on this machine (network and mount
namespaces, each with its own libvirtd and sshd; see scripts/lab), starts
the test guest on host1 (it writes a record to its disk), and then runs the
migration as a compute agent would, each step on its own host:

  host1  migrate-disk-and-power-off   clean shutdown, disks copied to host2
  host2  finish-migration             domain defined and started on host2
  host1  confirm-migration            the kept copy and definition dropped

The guest boots on host2, verifies the record it wrote on host1 and writes
another. Everything is torn down at the end, also on failure.
Run it through scripts/demo, which sets the machine up first.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import guest  # noqa: E402  (needs the repo root on sys.path)
from tests.support.drivernode import INSTANCES, DriverNode  # noqa: E402
from tests.support.lab import Lab  # noqa: E402
from transfer.units import format_size  # noqa: E402

MiB = 1 << 20
FLAVOR = {"name": "demo", "vcpus": 1, "memory_mb": 128, "root_gb": 1}


def step(text: str) -> float:
    print(f"\n== {text}", flush=True)
    return time.monotonic()


def say(text: str) -> None:
    print(f"   {text}", flush=True)


def console(node: DriverNode, uuid: str, suffix: str = "") -> Path:
    return node.dir(uuid, suffix) / "console.log"


def run(method: str, workdir: Path) -> None:
    t = step("building the test guest (Debian cloud kernel + busybox initramfs; cached)")
    image = guest.ensure_built()
    domain_type = guest.detect_domain_type(image)
    say(f"kernel {image.version}; domain type '{domain_type}' ({time.monotonic() - t:.1f} s)")

    t = step("bringing up a lab of two hosts")
    with Lab.up_in_free_slot(2) as lab:
        host1, host2 = DriverNode.configure(lab, lab.hosts[0], workdir / "host1.toml", transfer_method=method), \
            DriverNode.configure(lab, lab.hosts[1], workdir / "host2.toml", transfer_method=method)
        for node in (host1, host2):
            say(f"{node.host.name}: {node.host.ip}, libvirt {node.host.libvirt_uri}")
        say(f"up in {time.monotonic() - t:.1f} s")

        uuid = str(uuidlib.uuid4())
        name = f"demo-{uuid[:8]}"
        t = step(f"starting instance {name} on host1")
        host1.dir(uuid).mkdir(parents=True)
        disk = guest.make_disk(host1.dir(uuid) / "disk", 256 * MiB)
        with open(disk, "r+b") as f:  # data beyond the guest's record log, so the copy has work to do
            f.seek(128 * MiB)
            f.write(os.urandom(64 * MiB))
        say("disk: 256 MiB raw, 64 MiB of it data, the rest a hole")
        conn = host1.host.connect()
        try:
            conn.defineXML(guest.domain_xml(name, f"{INSTANCES}/{uuid}/disk", f"{INSTANCES}/{uuid}/console.log",
                                            image, uuid=uuid, domain_type=domain_type, mode="write")).create()
        finally:
            conn.close()
        guest.wait_for(console(host1, uuid), r"CFGUEST ready", timeout=180)
        for line in guest.console_lines(console(host1, uuid)):
            say(f"host1 guest: {line}")
        say(f"host1: {host1.state(uuid)}, host2: {host2.state(uuid)}")

        t = step(f"host1: migrate-disk-and-power-off to {host2.host.ip} ({method})")
        result = host1.ok("migrate-disk-and-power-off", uuid=uuid, dest=host2.host.ip, timeout=60, retry_interval=10)
        for what, copy in zip(["disk", "domain.xml"], result["copies"]):
            say(f"{what}: sent {format_size(copy['sent'])} of {format_size(copy['size'])} in "
                f"{copy['seconds']:.2f} s, digest {copy['digest']} (same on both ends)")
        say(f"host1 guest: {guest.console_lines(console(host1, uuid, '_resize'))[-1]} (clean ACPI shutdown)")
        say(f"host1: {host1.state(uuid)}; kept copy in {INSTANCES}/{uuid}_resize ({time.monotonic() - t:.1f} s)")

        t = step("host2: finish-migration")
        host2.ok("finish-migration", uuid=uuid, name=name, flavor=FLAVOR, disk_info=result["disk_info"])
        guest.wait_for(console(host2, uuid), r"CFGUEST wrote 1", timeout=180)
        for line in guest.console_lines(console(host2, uuid)):
            say(f"host2 guest: {line}")
        say(f"host2: {host2.state(uuid)} ({time.monotonic() - t:.1f} s)")

        t = step("host1: confirm-migration")
        host1.ok("confirm-migration", uuid=uuid)
        say(f"host1: {host1.state(uuid)}, kept copy removed: {not host1.dir(uuid, '_resize').exists()}")
        say(f"host2: {host2.state(uuid)}")
        host2.ok("destroy", uuid=uuid)
        step("tearing the lab down")
    print("\ndemo: done: the guest moved from host1 to host2 and found its data there")


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("stream", "rsync"), default="stream",
                        help="how the disks are copied (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="coldferry-demo-") as tmp:
        try:
            run(args.method, Path(tmp))
        except (AssertionError, guest.GuestError) as e:
            print(f"demo: failed: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
