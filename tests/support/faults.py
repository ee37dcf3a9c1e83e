"""Faults for the lab, made from outside the way an operator's bad day makes them.

Every process is found and signalled by pid (an agent or the controller by the pid the
stack recorded, libvirtd by the lab's record, a receiver by walking /proc below the
host's sshd); every wait is bounded; every fault that leaves something changed is a
context manager that puts it back, also when the test fails:

- ``kill_agent`` / ``restart_agent``: SIGKILL a host's agent, start it again;
- ``kill_receivers``: SIGKILL ``coldferry receive`` below a host's sshd (a copy's far end);
- ``link_down``: a host's eth0 down in its network namespace (unreachable), up again after;
- ``frozen``: SIGSTOP a process (a hung libvirtd), SIGCONT after;
- ``kill_libvirtd`` / ``restart_libvirtd``: a libvirtd that died (its guests keep running);
- ``held_job_replies``: the host's agent starts jobs but its "202 Accepted" answers are
  dropped on the way out, so a caller is stuck between a job's start and knowing its id;
- ``fill``: take a filesystem's free space down to a few MiB with one preallocated file;
- ``leave_resize_dir``: an ``<uuid>_resize`` directory a failed earlier try left behind;
- ``wait_agent_job``, ``wait_partial_copy``: the outside signs that a step has begun.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.support import labdaemons, labstate
from tests.support.procs import ProcRef, descendants

log = logging.getLogger(__name__)

T = TypeVar("T")
MiB = 1 << 20
IFACE = "eth0"
# What the agent's job starts answer (agent/app.py: status_code 202), matched in the first bytes
# of a TCP segment leaving the agent's port.
JOB_STARTED = "HTTP/1.1 202"
RULE_COMMENT = "coldferry-fault-held-replies"


class FaultError(AssertionError):
    """A fault could not be made (or its sign did not appear in time); the message says which."""


def wait_until(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.05,
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``probe`` until it returns something other than None or False; that value.

    Raises FaultError naming ``what`` after ``timeout`` seconds.
    """
    deadline = clock() + timeout
    while True:
        found = probe()
        if found is not None and found is not False:
            return found
        if clock() >= deadline:
            raise FaultError(f"{what}: not seen within {timeout:g} s")
        sleep(interval)


def _signal(ref: ProcRef, sig: signal.Signals, what: str) -> None:
    if not ref.alive():
        raise FaultError(f"{what} (pid {ref.pid}) is not running")
    log.info("sending %s to %s (pid %d)", sig.name, what, ref.pid)
    os.kill(ref.pid, sig)


def _wait_gone(ref: ProcRef, what: str, timeout: float = 10.0) -> None:
    def gone() -> bool:
        try:
            os.waitpid(ref.pid, os.WNOHANG)   # our own child: reap it
        except ChildProcessError:
            pass
        return not ref.alive()
    wait_until(f"{what} (pid {ref.pid}) to end", gone, timeout)


# -- agents ------------------------------------------------------------------------

def kill_agent(stack: Any, host_name: str) -> int:
    """SIGKILL the agent of ``host_name`` (its running jobs die with it); its pid."""
    proc = stack.agents[host_name]
    assert proc.ref is not None
    _signal(proc.ref, signal.SIGKILL, proc.what)
    proc.popen.wait(10)
    return proc.ref.pid


def restart_agent(stack: Any, host_name: str, timeout: float = 60.0) -> None:
    """Start the agent of ``host_name`` again (when it is not running) and wait until it answers."""
    proc = stack.agents.get(host_name)
    if proc is None or not proc.alive():
        stack.start_agent(host_name, wait=True, timeout=timeout)


def agent_jobs(stack: Any, host_name: str, timeout: float = 2.0) -> list[dict[str, Any]] | None:
    """The agent's ``/v1/jobs`` (newest first), or None when it does not answer."""
    try:
        reply = httpx.get(f"{stack.agent_url(host_name)}/v1/jobs", timeout=timeout, trust_env=False,
                          headers={"Authorization": f"Bearer {stack.agent_token}"}, verify=stack.ssl_context())
    except httpx.HTTPError:
        return None
    return reply.json()["jobs"] if reply.status_code == 200 else None


def wait_agent_job(stack: Any, host_name: str, op: str, uuid: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll the agent of ``host_name`` until it has a job ``op`` for ``uuid``; that job."""
    def probe() -> dict[str, Any] | None:
        return next((j for j in agent_jobs(stack, host_name) or []
                     if j["op"] == op and j["instance_uuid"] == uuid), None)
    return wait_until(f"job {op} of {uuid} on {host_name}", probe, timeout)


@contextmanager
def held_job_replies(host: Any) -> Iterator[None]:
    """Inside ``host``: drop every TCP segment leaving the agent's port (8797) on eth0 that
    starts an "HTTP/1.1 202" answer. The agent starts the job; its caller never hears the
    job's id (it times out). Loopback and every other answer pass. Removed on exit."""
    rule = ["OUTPUT", "-o", IFACE, "-p", "tcp", "--sport", "8797", "-m", "string", "--string", JOB_STARTED,
            "--algo", "bm", "--to", "160", "-m", "comment", "--comment", RULE_COMMENT, "-j", "DROP"]
    done = host.run(["iptables", "-w", "5", "-I", *rule], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise FaultError(f"iptables in {host.name} failed: {done.stderr.strip()}")
    try:
        yield
    finally:
        host.run(["iptables", "-w", "5", "-D", *rule], capture_output=True, timeout=20)


def release_held_replies(host: Any) -> None:
    """Remove every rule ``held_job_replies`` put into ``host`` (after a crash of its caller)."""
    for _ in range(10):
        listed = host.run(["iptables", "-w", "5", "-S", "OUTPUT"], capture_output=True, text=True, timeout=20)
        rules = [line for line in listed.stdout.splitlines() if RULE_COMMENT in line and line.startswith("-A ")]
        if not rules:
            return
        for line in rules:
            host.run(["iptables", "-w", "5", "-D", *line.split()[1:]], capture_output=True, timeout=20)


# -- the copy's far end ----------------------------------------------------------------

def receivers(host: Any) -> list[int]:
    """Pids of ``coldferry receive`` processes below ``host``'s sshd."""
    return [pid for pid, argv in descendants(host.pids["sshd"].pid)
            if "receive" in argv and any("coldferry" in a for a in argv)]


def kill_receivers(host: Any, timeout: float = 30.0) -> list[int]:
    """Wait for a receiver below ``host``'s sshd and SIGKILL every one found; their pids."""
    pids = wait_until(f"coldferry receive on {host.name}", lambda: receivers(host) or None, timeout)
    for pid in pids:
        ref = ProcRef.of(pid)
        if ref is not None:
            _signal(ref, signal.SIGKILL, f"receiver on {host.name}")
    return pids


def partial_copy(instance_dir: Path, name: str = "disk") -> Path | None:
    """The partial file of a copy of ``name`` into ``instance_dir`` (a dot-file named after it)
    once it holds data, else None."""
    try:
        return next((p for p in instance_dir.iterdir() if p.name.startswith(f".{name}") and p.stat().st_blocks > 0),
                    None)
    except OSError:
        return None


def wait_partial_copy(instance_dir: Path, timeout: float = 60.0, name: str = "disk") -> Path:
    """Wait until a copy of ``name`` into ``instance_dir`` has begun; its partial file."""
    return wait_until(f"a partial copy in {instance_dir}", lambda: partial_copy(instance_dir, name), timeout)


# -- network ----------------------------------------------------------------------------

def set_link(host: Any, up: bool) -> None:
    done = host.run(["ip", "link", "set", IFACE, "up" if up else "down"], capture_output=True, text=True,
                    timeout=20)
    if done.returncode != 0:
        raise FaultError(f"ip link set {IFACE} in {host.name} failed: {done.stderr.strip()}")


@contextmanager
def link_down(host: Any) -> Iterator[None]:
    """``host``'s eth0 down (it answers nothing, and says nothing: no RST, no ICMP); up on exit."""
    log.info("cutting the link of %s", host.name)
    set_link(host, False)
    try:
        yield
    finally:
        set_link(host, True)
        log.info("the link of %s is back", host.name)


def cut_link(host: Any, seconds: float) -> None:
    """``host``'s eth0 down for ``seconds``, then up again."""
    with link_down(host):
        time.sleep(seconds)


# -- libvirtd ---------------------------------------------------------------------------

def libvirtd(lab: Any, host_name: str) -> ProcRef:
    return lab.host(host_name).pids["libvirtd"]


@contextmanager
def frozen(ref: ProcRef, what: str) -> Iterator[None]:
    """SIGSTOP ``ref`` (everything that asks it waits), SIGCONT on exit."""
    _signal(ref, signal.SIGSTOP, what)
    try:
        yield
    finally:
        if ref.alive():
            os.kill(ref.pid, signal.SIGCONT)
            log.info("sent SIGCONT to %s (pid %d)", what, ref.pid)


def kill_libvirtd(lab: Any, host_name: str) -> int:
    """SIGKILL the libvirtd of ``host_name``; its guests (qemu) keep running. Its pid."""
    ref = libvirtd(lab, host_name)
    _signal(ref, signal.SIGKILL, f"libvirtd of {host_name}")
    _wait_gone(ref, f"libvirtd of {host_name}")
    return ref.pid


def restart_libvirtd(lab: Any, host_name: str) -> ProcRef:
    """Start the libvirtd of ``host_name`` again (it takes its running guests back) and
    record its pid in the lab's state, for ``lab down``."""
    host = lab.host(host_name)
    (host.dir / "run/libvirt/libvirtd.pid").unlink(missing_ok=True)   # the dead one's
    ref = labdaemons.start_daemon(host.command([]), "libvirtd", host.dir, host.dir / "log/libvirtd.out")
    host.pids["libvirtd"] = ref
    with labstate.locked(lab.state_dir):
        record = next(h for h in lab.state["hosts"] if h["name"] == host_name)
        record["pids"]["libvirtd"] = ref.to_json()
        labstate.save(lab.state_dir, lab.state)
    labdaemons.wait_libvirt(host.libvirt_uri)
    return ref


# -- disks and directories ----------------------------------------------------------------

def fill(directory: Path, leave_mib: int) -> Path:
    """Preallocate one file in ``directory`` until its filesystem has at most ``leave_mib`` MiB
    free (or none: a copy may be writing there meanwhile); the file."""
    filler = directory / ".coldferry-filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        st = os.statvfs(directory)
        for offset in range(0, st.f_blocks * st.f_frsize, MiB):   # bounded by the filesystem's size
            st = os.statvfs(directory)
            if st.f_bavail * st.f_frsize <= leave_mib * MiB:
                break
            try:
                os.posix_fallocate(fd, offset, MiB)
            except OSError:   # ENOSPC: full already
                break
    finally:
        os.close(fd)
    return filler


def leave_resize_dir(instance_dir: Path, data_mib: int = 4) -> Path:
    """Next to ``instance_dir``, an ``<uuid>_resize`` with a disk of stale data, as a failed
    earlier migration would have left it; its path."""
    leftover = instance_dir.with_name(instance_dir.name + "_resize")
    leftover.mkdir()
    with open(leftover / "disk", "wb") as f:
        f.write(os.urandom(data_mib * MiB))
    return leftover


# -- putting the stack back -----------------------------------------------------------------

def heal(stack: Any) -> list[str]:
    """Undo whatever a failed test may have left: links up, libvirtds running and thawed,
    held replies released, agents and the controller running. What it had to fix."""
    fixed = []
    lab = stack.lab
    for host in stack.hosts:
        set_link(host, True)
        release_held_replies(host)
        ref = host.pids["libvirtd"]
        if ref.alive():
            os.kill(ref.pid, signal.SIGCONT)
        else:
            restart_libvirtd(lab, host.name)
            fixed.append(f"libvirtd of {host.name} restarted")
        proc = stack.agents.get(host.name)
        if proc is None or not proc.alive():
            restart_agent(stack, host.name)
            fixed.append(f"agent of {host.name} restarted")
    if stack.controller is None or not stack.controller.alive():
        stack.start_controller()
        fixed.append("controller restarted")
    return fixed
