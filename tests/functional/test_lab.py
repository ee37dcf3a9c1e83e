"""The lab (tests/support/lab.py, scripts/lab): separate hosts with their own libvirtd and
sshd, real domains on them, and a teardown that leaves nothing behind, also after a crash.

Most tests use a lab of their own (in another lab slot: own names, subnet, state and
base directories), so that they can take it down while the session's ``lab`` fixture
stays up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.support import netns as labnet
from tests.support.lab import SLOTS, Host, Lab, LabExists, LabNet, down, slot
from tests.support.procs import ProcRef, in_namespaces, ns_id

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")


@pytest.fixture(scope="module")
def testlab() -> Iterator[Lab]:
    the_lab = Lab.up_in_free_slot(2, slots=range(1, SLOTS))
    try:
        yield the_lab
    finally:
        down(the_lab.state_dir, the_lab.net, the_lab.base_dir)


def domain_xml(host: Host, name: str, kind: str) -> str:
    """A 64 MiB domain with a blank raw disk in the instances path and a serial log."""
    disk = host.instances_dir / f"{name}.raw"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    inside = host.instances_path
    return f"""<domain type='{kind}'>
  <name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{inside}/{name}.raw'/><target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='{inside}/{name}.serial'/></serial>
  </devices>
</domain>"""


def start_domain(host: Host, name: str, kind: str) -> libvirt.virDomain:
    conn = host.connect()
    dom = conn.defineXML(domain_xml(host, name, kind))
    dom.create()
    return dom


def qemu_pid(host: Host, name: str) -> ProcRef:
    proc = ProcRef.of(int((host.dir / f"run/libvirt/qemu/{name}.pid").read_text()))
    assert proc is not None, f"qemu of {name} is not running"
    return proc


def lab_traces(state_dir: Path, net: LabNet, base_dir: Path) -> list[str]:
    """Whatever of a lab is still visible from the root namespace."""
    mounts = Path("/proc/self/mountinfo").read_text()
    traces = [line for line in mounts.splitlines()
              if str(state_dir) in line or f"/run/netns/{net.prefix}-" in line]
    netns_list = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    traces += [line for line in netns_list.splitlines() if line.startswith(f"{net.prefix}-")]
    traces += labnet.leftovers(net)
    traces += [str(p) for p in (state_dir, base_dir) if p.exists()]
    return traces


def processes_in(host: Host) -> list[ProcRef]:
    ids = {i for i in (ns_id(host.netns_path), ns_id(host.mntns)) if i is not None}
    return in_namespaces(ids)


def wait_for_process(host: Host, comm: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in processes_in(host):
            try:
                if Path(f"/proc/{proc.pid}/comm").read_text().strip() == comm:
                    return
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"no {comm} process in {host.name} after {timeout} s")


def test_hosts_have_their_own_network_and_name(testlab: Lab) -> None:
    for host in testlab.hosts:
        links = host.run(["ls", "/sys/class/net"], capture_output=True, text=True, check=True)
        assert links.stdout.split() == ["eth0", "lo"]
        addr = host.run(["ip", "-4", "-o", "addr", "show", "eth0"], capture_output=True, text=True,
                        check=True)
        assert f"{host.ip}/24" in addr.stdout
        name = host.run(["hostname"], capture_output=True, text=True, check=True)
        assert name.stdout.strip() == host.name
        mounts = host.run(["findmnt", "-n", "-o", "SOURCE", str(host.instances_path)],
                          capture_output=True, text=True, check=True)
        assert str(host.instances_dir) in mounts.stdout


def test_switch_bypasses_the_machine_firewall(testlab: Lab) -> None:
    # Bridged frames meet iptables only if bridge-nf-call-iptables is on in the bridge's
    # namespace; the switch namespace has it off (and empty tables), whatever the machine has.
    sysctl = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    switch = labnet.netns_path(testlab.net.switch_ns)
    done = subprocess.run(["nsenter", f"--net={switch}", "--", "cat", sysctl], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip("br_netfilter is not loaded")
    assert done.stdout.strip() == "0"


def test_each_host_has_its_own_libvirtd(testlab: Lab) -> None:
    h1, h2 = testlab.hosts
    c1, c2 = h1.connect(), h2.connect()
    assert (c1.getHostname(), c2.getHostname()) == ("host1", "host2")
    assert h1.pids["libvirtd"] != h2.pids["libvirtd"]
    xml = domain_xml(h1, "only-on-host1", "qemu")
    dom = c1.defineXML(xml)
    try:
        assert "only-on-host1" in c1.listDefinedDomains()
        assert "only-on-host1" not in c2.listDefinedDomains()
        # virsh inside a host talks to that host's daemon through the default socket.
        inside = h2.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                        capture_output=True, text=True, check=True)
        assert "only-on-host1" not in inside.stdout
    finally:
        dom.undefine()


def test_ssh_between_hosts_checks_host_keys(testlab: Lab, tmp_path: Path) -> None:
    h1, h2 = testlab.hosts
    for target in (h2.ip, h2.name):
        done = h1.run(["ssh", *testlab.ssh_options, f"root@{target}", "hostname"],
                      capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "host2"
    from_root = subprocess.run(["ssh", *testlab.ssh_options, f"root@{h1.ip}", "hostname"],
                               capture_output=True, text=True, timeout=30)
    assert from_root.stdout.strip() == "host1", from_root.stderr
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    options = [o if not o.startswith("UserKnownHostsFile=") else f"UserKnownHostsFile={empty}"
               for o in testlab.ssh_options]
    refused = h1.run(["ssh", *options, f"root@{h2.ip}", "hostname"], capture_output=True,
                     text=True, timeout=30)
    assert refused.returncode != 0
    assert "Host key verification failed" in refused.stderr


@pytest.mark.parametrize("kind", ["kvm", "qemu"])
def test_domain_starts_on_a_host(testlab: Lab, kind: str) -> None:
    if kind == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not usable here")
    host = testlab.hosts[0]
    dom = start_domain(host, f"tiny-{kind}", kind)
    try:
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert qemu_pid(host, f"tiny-{kind}").alive()
    finally:
        dom.destroy()
        dom.undefine()


def test_up_refuses_an_existing_lab(testlab: Lab) -> None:
    with pytest.raises(LabExists, match="is up"):
        Lab.up(2, testlab.base_dir, state_dir=testlab.state_dir, net=testlab.net)


def test_down_leaves_nothing(testlab: Lab) -> None:
    host = testlab.hosts[1]
    start_domain(host, "running-at-down", "qemu")
    procs = [qemu_pid(host, "running-at-down"), *[p for h in testlab.hosts for p in h.pids.values()]]
    sessions = subprocess.Popen(["ssh", *testlab.ssh_options, f"root@{host.ip}", "sleep 300"],
                                stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_process(host, "sleep")
        procs += [p for h in testlab.hosts for p in processes_in(h)]
        testlab.down()
        assert [p.pid for p in procs if p.alive()] == []
        assert lab_traces(testlab.state_dir, testlab.net, testlab.base_dir) == []
        testlab.down()  # idempotent
    finally:
        sessions.kill()
        sessions.wait()


def test_down_after_a_crash() -> None:
    """A lab whose owner died, whose libvirtd was killed and whose state file is gone."""
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]);"
            "from tests.support.lab import Lab, SLOTS;"
            "lab = Lab.up_in_free_slot(1, slots=range(1, SLOTS)); print(lab.slot, flush=True);"
            "os._exit(0)")
    done = subprocess.run([sys.executable, "-c", code, str(REPO)], check=True, timeout=120,
                          capture_output=True, text=True)
    net, state_dir, base_dir = slot(int(done.stdout))
    state = json.loads((state_dir / "state.json").read_text())
    pids = state["hosts"][0]["pids"]
    daemons = [ProcRef.from_json(p) for p in pids.values()]
    with pytest.raises(LabExists, match="no longer runs"):
        Lab.up(1, base_dir, state_dir=state_dir, net=net)
    os.kill(pids["libvirtd"]["pid"], signal.SIGKILL)
    (state_dir / "state.json").unlink()
    with pytest.raises(LabExists, match="without a"):
        Lab.up(1, base_dir, state_dir=state_dir, net=net)
    started = time.monotonic()
    down(state_dir, net, base_dir)
    assert time.monotonic() - started < 30
    assert [p.pid for p in daemons if p.alive()] == []
    assert lab_traces(state_dir, net, base_dir) == []


def test_session_fixture_and_cli_status(lab: Lab) -> None:
    assert [h.name for h in lab.hosts][:2] == ["host1", "host2"]
    for host in lab.hosts:
        assert host.connect().getHostname() == host.name
    cli = [str(REPO / "scripts/lab")]
    done = subprocess.run([*cli, "status", "--json", "--slot", str(lab.slot)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)
    assert status["healthy"] and status["owner"]["pid"] == os.getpid()
    refused = subprocess.run([*cli, "up", "2", "--slot", str(lab.slot)], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1 and "is up" in refused.stderr


def test_a_forked_helper_ended_by_sigterm_leaves_the_session_lab_alone(lab):
    """pyroute2 forks helpers from the test process and ends them with SIGTERM; one that
    still has the session's handler must end, not unwind a copy of the session."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the helper: the session's SIGTERM handler is still installed here
        os.write(ready_w, b"x")
        time.sleep(30)
        os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"  # past the fork (a signal that early is dropped)
    os.close(ready_r)
    time.sleep(0.2)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM
    for host in lab.hosts:  # the session's lab still stands
        assert host.connect().getHostname() == host.name
