"""The coldferry demo: an operator cold-migrates a running guest between two hosts.

It brings up a lab of two hosts on this machine (network and mount
namespaces, each with its own libvirtd and sshd; see scripts/lab), starts a
coldferry agent inside each host and the controller beside them, all over
TLS with certificates of a CA made for the run (tests/support/stack.py), and
starts the test guest on host1 (it writes a record to its disk). Then it
runs, and prints, what an operator would type:

  coldferry host list
  coldferry server list
  coldferry server migrate --host host2 --wait <server>   clean shutdown on host1, disk
                                                          copied to host2, started there
  coldferry server migration list
  coldferry server migration confirm <id>                 host1 drops its kept copy
  coldferry server list

The guest boots on host2, verifies the record it wrote on host1 and writes
another. Everything (controller, agents, lab) is torn down at the end, also
on failure. Run it through scripts/demo, which sets the machine up first.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import guest  # noqa: E402  (needs the repo root on sys.path)
from tests.support.lab import Lab, LabError  # noqa: E402
from tests.support.stack import Stack, StackError  # noqa: E402

MiB = 1 << 20


def step(text: str) -> float:
    print(f"\n== {text}", flush=True)
    return time.monotonic()


def say(text: str) -> None:
    print(f"   {text}", flush=True)


def operator(stack: Stack, *args: str, expect: int = 0) -> str:
    """Run ``coldferry ARGS`` as the operator would type it, print the command and its output."""
    print(f"\n$ coldferry {shlex.join(args)}", flush=True)
    run = stack.cli(*args, merge_output=True)
    print(run.stdout.rstrip("\n"), flush=True)
    if run.returncode != expect:
        raise AssertionError(f"coldferry {shlex.join(args)} exited {run.returncode}, not {expect}")
    return run.stdout


def run(method: str, workdir: Path) -> None:
    started = time.monotonic()
    t = step("building the test guest (Debian cloud kernel + busybox initramfs; cached)")
    image = guest.ensure_built()
    domain_type = guest.detect_domain_type(image)
    say(f"kernel {image.version}; domain type '{domain_type}' ({time.monotonic() - t:.1f} s)")

    t = step("bringing up a lab of two hosts")
    with Lab.up_in_free_slot(2) as lab:
        for host in lab.hosts:
            say(f"{host.name}: {host.ip}, libvirt {host.libvirt_uri}")
        say(f"up in {time.monotonic() - t:.1f} s")

        t = step(f"starting a coldferry agent in each host and the controller (disks copied by {method})")
        with Stack.up(lab, workdir, driver_settings={"transfer_method": method}) as stack:
            for host in lab.hosts:
                say(f"agent of {host.name}: {stack.agent_url(host.name)} (log {workdir}/{host.name}-agent.log)")
            say(f"controller: {stack.url} (log {workdir}/controller.log, database {workdir}/controller.db)")
            say(f"TLS everywhere: the agents' and the controller's certificates are signed by the CA "
                f"{stack.ca_file} (coldferry tls make-ca / make-cert)")
            say(f"the commands below run with COLDFERRY_URL={stack.url}, COLDFERRY_CA_FILE={stack.ca_file} "
                "and COLDFERRY_TOKEN set")
            say(f"up in {time.monotonic() - t:.1f} s")

            t = step("starting the test guest on host1")
            dom = stack.define_domain("host1", name="demo-vm", disk_mib=256, data=[(128, 64)], mode="write",
                                      start=True)
            say(f"instance {dom.name} ({dom.uuid}): 256 MiB raw disk, 64 MiB of it data, the rest a hole")
            guest.wait_for(stack.console(dom, "host1"), r"CFGUEST ready", timeout=180)
            for line in guest.console_lines(stack.console(dom, "host1")):
                say(f"host1 guest: {line}")
            say(f"booted in {time.monotonic() - t:.1f} s")

            t = step("the operator migrates it to host2")
            operator(stack, "host", "list")
            operator(stack, "server", "list")
            operator(stack, "server", "migrate", "--host", "host2", "--wait", dom.name)
            operator(stack, "server", "migration", "list")
            migration_id = stack.server(dom.uuid)["migration_id"]
            if migration_id is None:
                raise AssertionError(f"{dom.name} is not waiting for confirmation: {stack.server(dom.uuid)}")
            operator(stack, "server", "migration", "confirm", str(migration_id))
            stack.wait_migration(migration_id, {"confirmed"}, timeout=120)
            operator(stack, "server", "list")
            say(f"({time.monotonic() - t:.1f} s)")

            t = step("the guest on host2")
            guest.wait_for(stack.console(dom, "host2"), r"CFGUEST wrote 1", timeout=180)
            lines = guest.console_lines(stack.console(dom, "host2"))
            for line in lines:
                say(f"host2 guest: {line}")
            if "verify ok 1" not in lines:
                raise AssertionError(f"the guest did not verify its record on host2: {lines}")
            records = guest.records_on_disk(stack.nodes["host2"].dir(dom.uuid) / "disk")
            if len(records) != 2 or not all(r.ok for r in records):
                raise AssertionError(f"the records on host2's disk are not two good ones: {records}")
            say(f"disk on host2: {len(records)} good records (boots {records[0].boot_id} on host1, "
                f"{records[1].boot_id} on host2)")
            where = stack.where(dom)
            say("where it is now: " + ", ".join(f"{h}: {w['state']}" for h, w in where.items()))
            if list(where) != ["host2"]:
                raise AssertionError(f"{dom.name} should be on host2 only, it is on {where}")

            step("stopping the controller and the agents, removing the instance")
        step("tearing the lab down")
    print(f"\ndemo: done in {time.monotonic() - started:.0f} s: the guest moved from host1 to host2 "
          "and found its data there")


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("stream", "rsync"), default="stream",
                        help="how the disks are copied (default: %(default)s)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("demo: the lab needs root (network namespaces, mounts): run it as root", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="coldferry-demo-") as tmp:
        try:
            run(args.method, Path(tmp))
        except (AssertionError, guest.GuestError, StackError, LabError) as e:
            print(f"demo: failed: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
