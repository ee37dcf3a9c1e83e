"""The lab: N KVM hosts on this machine, each in its own namespaces, for multi-host tests.

Host K (host1..hostN) has
- a network namespace ``cflab-hostK`` whose ``eth0`` is 198.18.0.(10+K)/24, cabled to a
  bridge that the root namespace reaches through ``cflab0`` (198.18.0.1), see netns.py;
- a persistent private mount namespace and UTS namespace (hostname ``hostK``) in which
  private directories under ``<base_dir>/hostK`` are mounted over /run/libvirt,
  /var/lib/libvirt, /etc/libvirt, /var/cache/libvirt, /var/log/libvirt and the instances
  path /var/lib/coldferry/instances (the same path on every host, like Nova's
  instances_path; hostmounts.py mounts one shared directory over it on several hosts,
  or a small tmpfs on one), with /etc/hosts naming all lab hosts and a sysfs of its own;
- its own virtlogd and libvirtd (see labdaemons.py) and an sshd on port 22 of its address.

One client key (``Lab.identity``) is authorized on every host, and ``Lab.known_hosts``
lists every host key under the host's address and name, so that ssh with strict host
key checking works between hosts and from the root namespace.

Everything the lab makes is recorded in ``<state_dir>/state.json`` before it is made,
so ``down`` cleans up after a crash too; ``down`` also finds processes, namespaces and
mounts by the lab's names and namespace inodes, and is idempotent.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from tests.support import labdaemons, labstate, mntns, netns
from tests.support.labhost import INSTANCES_PATH, PRIVATE_DIRS, Host
from tests.support.labstate import LabError, LabExists, locked
from tests.support.netns import LabNet
from tests.support.procs import ProcRef
from tests.support.sshd import Sshd

log = logging.getLogger(__name__)

STATE_DIR = Path("/run/coldferry-lab")
BASE_DIR = Path("/var/lib/coldferry-lab")
# Labs that can coexist on one machine (concurrent test runs); slot 0 is the default lab.
SLOTS = 8

__all__ = ["BASE_DIR", "STATE_DIR", "INSTANCES_PATH", "SLOTS", "Host", "Lab", "LabError",
           "LabExists", "LabNet", "down", "slot"]


def slot(k: int) -> tuple[LabNet, Path, Path]:
    """Names, state directory and base directory of lab slot ``k``.

    Slot 0 is the default lab (cflab0, cflab-hostK, 198.18.0.0/24, /run/coldferry-lab);
    slot k > 0 uses prefix cflab<k>, 198.18.<k>.0/24 and directories suffixed -<k>.
    """
    if not 0 <= k < SLOTS:
        raise LabError(f"lab slot {k} outside 0..{SLOTS - 1}")
    if k == 0:
        return LabNet(), STATE_DIR, BASE_DIR
    return (LabNet(prefix=f"cflab{k}", subnet=f"198.18.{k}.0/24"),
            STATE_DIR.with_name(f"{STATE_DIR.name}-{k}"), BASE_DIR.with_name(f"{BASE_DIR.name}-{k}"))


class Lab:
    """A running lab: ``Lab.up(2)``, ``lab.hosts[0]``, ``lab.down()``; also a context manager."""

    def __init__(self, state: dict[str, Any], state_dir: Path) -> None:
        self.state = state
        self.state_dir = state_dir
        self.net = LabNet(**state["net"])
        self.base_dir = Path(state["base_dir"])
        self.hosts = [Host.from_json(h) for h in state["hosts"]]
        self.closed = False

    @property
    def slot(self) -> int | None:
        """The slot this lab occupies (see ``slot``), None for a lab with its own names."""
        for k in range(SLOTS):
            if slot(k)[0] == self.net and slot(k)[1] == self.state_dir:
                return k
        return None

    @property
    def identity(self) -> Path:
        """The lab's client private key, authorized for root on every host."""
        return self.base_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        """known_hosts naming every host's key under its address and its name."""
        return self.base_dir / "known_hosts"

    @property
    def ssh_options(self) -> list[str]:
        """OpenSSH client options that reach any lab host as root with strict host key checking."""
        return ["-F", "/dev/null", "-i", str(self.identity), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "ConnectTimeout=10"]

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no lab host {name!r}; hosts are {[h.name for h in self.hosts]}")

    @classmethod
    def up(cls, n: int = 2, base_dir: Path = BASE_DIR, *, state_dir: Path = STATE_DIR,
           net: LabNet = LabNet(), force: bool = False, reclaim_stale: bool = False,
           wait: float = 0.0, persistent: bool = False) -> "Lab":
        """Build a lab of ``n`` hosts and return it.

        base_dir: where the hosts' private directories, keys and logs go.
        state_dir: where state.json and the namespace files go (a tmpfs-like /run path).
        net: names and subnet; two labs with different ``net`` and dirs can coexist.
        force: tear down an existing lab first, whoever made it.
        reclaim_stale: tear down an existing lab whose owner process is gone (a crash).
        wait: seconds to wait for a lab owned by another live process to go away.
        persistent: the lab outlives this process (``scripts/lab up``), so it is never stale.
        Raises LabExists when another lab is in the way, LabError when building fails
        (what was built is torn down again).
        """
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, mounts, /dev/kvm)")
        if not 1 <= n <= net.max_hosts:
            raise LabError(f"a lab has 1 to {net.max_hosts} hosts, not {n}")
        base_dir = labstate.check_base_dir(base_dir)
        labstate.wait_until_free(state_dir, net, wait, force=force, reclaim_stale=reclaim_stale,
                                 teardown=lambda: _down_locked(state_dir, net, False, base_dir))
        with locked(state_dir):
            state = labstate.new_state(n, base_dir, state_dir, net, persistent, _plan_host)
            labstate.refuse_if_exists(state_dir, net)
            labstate.save(state_dir, state)
            try:
                _build(state, state_dir, net)
            except BaseException as exc:
                log.error("building the lab failed (%s); tearing down what was built", exc)
                try:
                    _down_locked(state_dir, net, False, base_dir)
                except LabError as cleanup:
                    log.error("%s", cleanup)
                if isinstance(exc, Exception) and not isinstance(exc, LabError):
                    raise LabError(f"lab up failed: {exc}") from exc
                raise
        lab = cls(state, state_dir)
        log.info("lab up: %s", ", ".join(f"{h.name} {h.ip}" for h in lab.hosts))
        return lab

    @classmethod
    def up_in_free_slot(cls, n: int = 2, slots: range = range(SLOTS)) -> "Lab":
        """Build a lab of ``n`` hosts in the first free slot of ``slots`` (see ``slot``),
        first tearing down the labs of every slot whose owner process died.

        Raises LabExists when every slot is in use.
        """
        for k in range(SLOTS):
            net, state_dir, base_dir = slot(k)
            with locked(state_dir):
                if labstate.stale(state_dir, net):
                    log.warning("tearing down the stale lab of slot %d", k)
                    _down_locked(state_dir, net, False, base_dir)
        busy = []
        for k in slots:
            net, state_dir, base_dir = slot(k)
            try:
                return cls.up(n, base_dir, state_dir=state_dir, net=net, reclaim_stale=True)
            except LabExists as exc:
                busy.append(f"slot {k}: {exc}")
        raise LabExists("every lab slot is in use:\n  " + "\n  ".join(busy))

    @classmethod
    def attach(cls, state_dir: Path = STATE_DIR) -> "Lab":
        """The lab described by ``state_dir``/state.json (made by this or another process)."""
        state = labstate.load(state_dir)
        if state is None:
            raise LabError(f"no lab is up ({state_dir / 'state.json'} does not exist); "
                           "start one with scripts/lab up N")
        return cls(state, state_dir)

    def down(self, keep_files: bool = False) -> None:
        """Tear the lab down (idempotent). Raises LabError naming anything left behind."""
        down(self.state_dir, self.net, self.base_dir, keep_files=keep_files)
        self.closed = True

    def collect_logs(self, dest: Path) -> None:
        """Copy every host's daemon and qemu logs to ``dest/<host>/`` (for CI artifacts)."""
        for host in self.hosts:
            for log_file in [*host.dir.glob("log/**/*.log"), *host.dir.glob("log/*.out"),
                             host.dir / "ssh/sshd.log"]:
                if log_file.is_file():
                    target = dest / host.name / log_file.relative_to(host.dir)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(log_file, target)

    def status(self) -> dict[str, Any]:
        """Owner, hosts and whether each recorded daemon still runs."""
        owner = {**self.state["owner"], "alive": ProcRef.from_json(self.state["owner"]).alive()}
        return {"owner": owner, "base_dir": str(self.base_dir),
                "complete": bool(self.state.get("complete")),
                "hosts": [{"name": h.name, "ip": h.ip, "libvirt_uri": h.libvirt_uri,
                           "netns": h.netns, "netns_present": h.netns_path.exists(),
                           "mntns_mounted": mntns.is_mountpoint(h.mntns),
                           "daemons": {k: {"pid": p.pid, "alive": p.alive()} for k, p in h.pids.items()}}
                          for h in self.hosts]}

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def _plan_host(index: int, base_dir: Path, state_dir: Path, net: LabNet) -> dict[str, Any]:
    """The record of host ``index`` before anything of it exists."""
    name = f"host{index}"
    ns_dir = state_dir / name
    return Host(index, name, net.host_ip(index), net.host_ns(index), ns_dir / "mntns",
                ns_dir / "utsns", base_dir / name, str(uuidlib.uuid4())).to_json()


def _build(state: dict[str, Any], state_dir: Path, net: LabNet) -> None:
    """Make everything ``state`` plans, recording each daemon's pid as it starts."""
    base_dir = Path(state["base_dir"])
    hosts = [Host.from_json(h) for h in state["hosts"]]
    mntns.make_private_dir(state_dir)
    labstate.prepare_base_dir(base_dir, hosts)
    for target in PRIVATE_DIRS:
        labstate.make_dirs(Path(target))
    netns.create_switch(net)
    for host in hosts:
        netns.add_host(net, host.index)
        for source in PRIVATE_DIRS.values():
            (host.dir / source).mkdir(parents=True, exist_ok=True)
        labdaemons.write_config(host.dir / "etc/libvirt", host.name, host.uuid)
        labdaemons.seed_capabilities(host.dir)
        mntns.create(host.mntns, host.utsns, host.name)
        binds = [(host.dir / src, target) for target, src in PRIVATE_DIRS.items()]
        binds.append((base_dir / "hosts", "/etc/hosts"))
        # Copies of the machine's namespace mounts would keep those namespaces alive.
        mntns.populate(host.command([]), binds, detach=["/run/netns", *_lab_state_mounts()])
    for host in hosts:
        _start_daemons(host, base_dir, state, state_dir)
    known = [(h.dir / "ssh/known_hosts").read_text() for h in hosts]
    (base_dir / "known_hosts").write_text("".join(known))
    for host in hosts:
        reported = labdaemons.wait_libvirt(host.libvirt_uri)
        if reported != host.name:
            raise LabError(f"libvirtd of {host.name} reports hostname {reported!r}")
    started = time.monotonic()
    labdaemons.warm_up([h.libvirt_uri for h in hosts])
    labdaemons.save_capabilities(hosts[0].dir)
    log.info("qemu capabilities ready in %.1f s", time.monotonic() - started)
    state["complete"] = True
    labstate.save(state_dir, state)


def _lab_state_mounts() -> list[str]:
    """Mount points of every lab's state directory (/run/coldferry-lab*) in this namespace."""
    return [m for m in mntns.mountpoints() if m.startswith("/run/coldferry-lab")]


def _start_daemons(host: Host, base_dir: Path, state: dict[str, Any], state_dir: Path) -> None:
    """virtlogd, libvirtd and sshd of ``host``; each pid is saved in the state at once."""
    record = next(h for h in state["hosts"] if h["index"] == host.index)
    enter = host.command([])
    for daemon in ("virtlogd", "libvirtd"):
        proc = labdaemons.start_daemon(enter, daemon, host.dir, host.dir / f"log/{daemon}.out")
        record["pids"][daemon] = proc.to_json()
        labstate.save(state_dir, state)
    sshd = Sshd.start(host.dir / "ssh", host=host.ip, port=22, prefix=enter,
                      identity=base_dir / "id_ed25519", aliases=[host.name], new_session=True)
    assert sshd.proc is not None
    proc = ProcRef.of(sshd.proc.pid)
    if proc is None:
        raise LabError(f"sshd of {host.name} exited right after starting; see {sshd.workdir}/sshd.log")
    record["pids"]["sshd"] = proc.to_json()
    labstate.save(state_dir, state)


def down(state_dir: Path = STATE_DIR, net: LabNet | None = None, base_dir: Path | None = None,
         keep_files: bool = False) -> None:
    """Tear down the lab of ``state_dir`` (also half-made or crashed ones); idempotent.

    net, base_dir: the lab's names and files when the state does not record them
        (default: the default lab's).
    keep_files: leave the base directory (disks, logs, keys) in place.
    Raises LabError naming what could not be removed.
    """
    with locked(state_dir):
        _down_locked(state_dir, net, keep_files, base_dir)


def _down_locked(state_dir: Path, net: LabNet | None, keep_files: bool,
                 base_dir: Path | None = None) -> None:
    state = labstate.load(state_dir, tolerate_corrupt=True) or {}
    if "net" in state:
        net = LabNet(**state["net"])
    net = net or LabNet()
    if "base_dir" not in state and (base_dir or state_dir == STATE_DIR):
        state["base_dir"] = str(base_dir or BASE_DIR)
    log.info("lab down (%s)", state_dir)
    owner = state.get("owner")
    if owner and owner["pid"] != os.getpid() and ProcRef.from_json(owner).alive():
        log.warning("the lab is in use by pid %d (`%s`); tearing it down anyway",
                    owner["pid"], owner.get("command"))
    problems = labstate.stop_processes(state, state_dir, net)
    if problems:
        raise LabError("lab down stopped short, leaving namespaces and files for another try: "
                       + "; ".join(problems))
    for ns_file in sorted(state_dir.glob("host*/*ns")):
        try:
            mntns.unmount(ns_file)
        except RuntimeError as exc:
            problems.append(str(exc))
    for mount in mntns.mounts_under(state_dir):
        try:
            mntns.unmount(Path(mount))
        except RuntimeError as exc:
            problems.append(str(exc))
    problems += netns.remove(net, [h["netns"] for h in state.get("hosts", [])])
    if not problems:
        problems += labstate.remove_files(state, state_dir, keep_files)
    if problems:
        raise LabError("lab down left things behind:\n  " + "\n  ".join(problems))
    log.info("lab down: done")
