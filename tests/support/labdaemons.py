"""Configuration and start-up of a lab host's libvirt daemons (virtlogd, libvirtd).

Both run inside the host's namespaces and see only its private /etc/libvirt,
/run/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt. Pid
files go to the private /run/libvirt (the defaults, /run/libvirtd.pid and
/run/virtlogd.pid, are the machine's own).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libvirt

from tests.support.procs import ProcRef

log = logging.getLogger(__name__)

# libvirtd probes each qemu binary once (about 4 s here) and caches the result, which
# it revalidates (qemu and libvirt binaries, kernel, microcode, CPU) before use. Every
# lab host runs on the same machine, so one host's cache is valid for all, and kept
# here it spares every later lab the probe.
CAPS_SEED = Path("/var/cache/coldferry-lab/qemu-capabilities")
CAPS_DIR = "cache/libvirt/qemu/capabilities"

# Unix sockets only (libvirtd listens on TCP only with --listen, which we never pass);
# no authentication on them: they live in the host's private /run/libvirt, root-only.
LIBVIRTD_CONF = """\
# coldferry lab host {name}: written by tests/support/lab.py
listen_tls = 0
listen_tcp = 0
unix_sock_group = "root"
unix_sock_ro_perms = "0770"
unix_sock_rw_perms = "0770"
auth_unix_ro = "none"
auth_unix_rw = "none"
# every lab host would otherwise report the machine's SMBIOS UUID
host_uuid = "{uuid}"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

QEMU_CONF = """\
# coldferry lab host {name}: written by tests/support/lab.py
# /dev/kvm is root-only on the lab machine.
user = "root"
group = "root"
# The lab host mounts its own sysfs over /sys (to show its own network interfaces),
# which hides /sys/fs/cgroup; with any controller enabled qemu fails to start with
# "Failed to create v1 controller cpu for group". There is no systemd to delegate to either.
cgroup_controllers = [ ]
# On a machine with AppArmor or SELinux active, libvirt would load a profile per
# domain into the kernel: a change to the machine, not to the lab host.
security_driver = "none"
# The lab host already is a private mount namespace; a per-qemu /dev needs mknod
# and adds nothing here.
namespaces = [ ]
# Owner-remembering xattrs would stay on images of a qemu killed at lab down and
# make the next start of the same image fail.
remember_owner = 0
"""

VIRTLOGD_CONF = """\
# coldferry lab host {name}: written by tests/support/lab.py
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
"""


def write_config(etc: Path, name: str, uuid: str) -> None:
    """Write libvirtd.conf, qemu.conf and virtlogd.conf of host ``name`` into ``etc``."""
    etc.mkdir(parents=True, exist_ok=True)
    for filename, template in (("libvirtd.conf", LIBVIRTD_CONF), ("qemu.conf", QEMU_CONF),
                               ("virtlogd.conf", VIRTLOGD_CONF)):
        (etc / filename).write_text(template.format(name=name, uuid=uuid))


def _read_pid(pid_file: Path, timeout: float, sleep: Callable[[float], None],
              clock: Callable[[], float]) -> int:
    deadline = clock() + timeout
    while True:
        try:
            text = pid_file.read_text().strip()
            if text:
                return int(text)
        except FileNotFoundError:
            pass
        if clock() >= deadline:
            raise RuntimeError(f"{pid_file} did not appear within {timeout} s")
        sleep(0.05)


def start_daemon(enter: Sequence[str], binary: str, root: Path, log_file: Path,
                 timeout: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> ProcRef:
    """Start ``binary`` (virtlogd or libvirtd) with ``--daemon`` inside a host; return its process.

    enter: the host's command prefix (nsenter ... --).
    root: the host's private directory on disk, as seen from here; its ``run/libvirt``
        is the host's /run/libvirt, where the pid file goes.
    log_file: where the daemon's early stdout and stderr go.
    Raises RuntimeError when it fails to start.
    """
    pid_inside = f"/run/libvirt/{binary}.pid"
    argv = [*enter, binary, "--daemon", "--pid-file", pid_inside,
            "--config", f"/etc/libvirt/{binary}.conf"]
    log.info("starting %s", binary)
    log.debug("running %s", argv)
    with open(log_file, "ab") as out:
        # --daemon: the parent exits once the child reports a successful start.
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                              timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{binary} failed to start (status {done.returncode}); see {log_file} "
                           f"and {root / 'log/libvirt'}")
    pid = _read_pid(root / "run/libvirt" / f"{binary}.pid", timeout, sleep, clock)
    proc = ProcRef.of(pid)
    if proc is None:
        raise RuntimeError(f"{binary} (pid {pid}) exited right after starting; see {root / 'log/libvirt'}")
    return proc


def wait_libvirt(uri: str, timeout: float = 30.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> str:
    """Wait until the libvirtd at ``uri`` answers; return the hostname it reports."""
    deadline = clock() + timeout
    while True:
        try:
            conn = libvirt.open(uri)
            try:
                return conn.getHostname()
            finally:
                conn.close()
        except libvirt.libvirtError as exc:
            if clock() >= deadline:
                raise RuntimeError(f"libvirtd at {uri} did not answer within {timeout} s: {exc}") from exc
        sleep(0.1)


def seed_capabilities(root: Path, seed: Path = CAPS_SEED) -> None:
    """Copy cached qemu capabilities from ``seed`` into the host at ``root`` (before its
    libvirtd starts)."""
    if not seed.is_dir():
        return
    target = root / CAPS_DIR
    target.mkdir(parents=True, exist_ok=True)
    for cached in seed.glob("*.xml"):
        shutil.copyfile(cached, target / cached.name)


def save_capabilities(root: Path, seed: Path = CAPS_SEED) -> None:
    """Keep the qemu capabilities the host at ``root`` has cached in ``seed`` (atomically)."""
    seed.mkdir(parents=True, exist_ok=True)
    for cached in (root / CAPS_DIR).glob("*.xml"):
        tmp = seed / f".{cached.name}.{os.getpid()}"
        shutil.copyfile(cached, tmp)
        os.replace(tmp, seed / cached.name)


def warm_up(uris: Sequence[str]) -> None:
    """Make each libvirtd load (or, without a valid cache, probe) its qemu capabilities,
    all at once, so that the first domain a test defines does not wait for it."""
    def probe(uri: str) -> None:
        conn = libvirt.open(uri)
        try:
            conn.getDomainCapabilities()
        finally:
            conn.close()

    with ThreadPoolExecutor(max_workers=max(1, len(uris))) as pool:
        list(pool.map(probe, uris))
