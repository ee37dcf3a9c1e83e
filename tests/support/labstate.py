"""The lab's record of itself: state.json, its lock, ownership, and the clean-up it drives.

state.json is written before anything it describes is made and again after each
daemon starts, so that ``lab down`` after a crash knows every name and pid. The
owner (pid and start time of the process that ran ``up``) tells a lab in use
from one left behind by a crash; a ``persistent`` lab (made by ``scripts/lab up``)
is never taken for a stale one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support import mntns, netns
from tests.support.netns import LabNet
from tests.support.procs import ProcRef, ancestors, in_namespaces, ns_id, terminate

log = logging.getLogger(__name__)

MARKER = ".coldferry-lab"
LOCK_DIR = Path("/run/lock")
VERSION = 1


class LabError(RuntimeError):
    """The lab could not be built or torn down; the message says what and what to do."""


class LabExists(LabError):
    """Another lab (or the remains of one) is in the way."""


@contextmanager
def locked(state_dir: Path, timeout: float = 300.0) -> Iterator[None]:
    """Hold the lab's lock (/run/lock/<state dir name>.lock) so that ups and downs take turns."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    lock_file = LOCK_DIR / f"{state_dir.name}.lock"
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LabError(f"{lock_file} stayed locked for {timeout:.0f} s: another "
                                   "lab up/down is running") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def save(state_dir: Path, state: dict[str, Any]) -> None:
    """Write state.json atomically."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, state_dir / "state.json")


def load(state_dir: Path, tolerate_corrupt: bool = False) -> dict[str, Any] | None:
    """The recorded state, None if there is none; a corrupt file raises LabError unless
    ``tolerate_corrupt``, which returns {}."""
    path = state_dir / "state.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        if tolerate_corrupt:
            log.warning("%s is unreadable (%s); cleaning up by names", path, exc)
            return {}
        raise LabError(f"{path} is unreadable ({exc}); run scripts/lab down") from exc


def new_state(n: int, base_dir: Path, state_dir: Path, net: LabNet, persistent: bool,
              plan_host: Callable[[int, Path, Path, LabNet], dict[str, Any]]) -> dict[str, Any]:
    me = ProcRef.of(os.getpid())
    assert me is not None
    return {"version": VERSION,
            "owner": {**me.to_json(), "persistent": persistent, "command": " ".join(sys.argv)[:300]},
            "created": time.time(), "base_dir": str(base_dir), "state_dir": str(state_dir),
            "net": dataclasses.asdict(net),
            # For the reader: down derives all of these from "net" and "hosts" again.
            "links": {"root_iface": net.root_iface, "switch_ns": net.switch_ns,
                      "bridge": net.bridge, "ports": [f"host{i}" for i in range(1, n + 1)]},
            "mounts": [str(state_dir)] + [str(state_dir / f"host{i}" / kind)
                                          for i in range(1, n + 1) for kind in ("mntns", "utsns")],
            "hosts": [plan_host(i, base_dir, state_dir, net) for i in range(1, n + 1)]}


def _existing(state_dir: Path, net: LabNet) -> dict[str, Any] | None:
    """The state of a lab in the way, {"leftovers": [...]} for remains without a state, or None."""
    state = load(state_dir, tolerate_corrupt=True)
    if state:
        return state
    leftovers = netns.leftovers(net) + ([str(state_dir)] if state_dir.exists() else [])
    return {"leftovers": leftovers} if leftovers else None


def _describe(found: dict[str, Any], state_dir: Path) -> tuple[str, bool, bool]:
    """(message, owner alive, persistent) of an existing lab."""
    if "owner" not in found:
        return (f"remains of a lab without a (readable) {state_dir}/state.json are in the way: "
                f"{', '.join(found.get('leftovers', []))}; run scripts/lab down", False, False)
    owner = found["owner"]
    alive = ProcRef.from_json(owner).alive()
    hosts = ", ".join(h["name"] for h in found.get("hosts", []))
    if owner.get("persistent"):
        return (f"a lab made by `{owner.get('command')}` is up ({hosts}); run scripts/lab down "
                "first, or scripts/lab up --force to replace it", alive, True)
    if alive:
        return (f"a lab of pid {owner['pid']} (`{owner.get('command')}`) is up ({hosts}); wait for "
                "it to finish, or run scripts/lab down if it is yours", True, False)
    return (f"a lab left behind by pid {owner['pid']} (`{owner.get('command')}`), which no longer "
            "runs, is in the way; run scripts/lab down", False, False)


def wait_until_free(state_dir: Path, net: LabNet, wait: float, force: bool, reclaim_stale: bool,
                    teardown: Callable[[], None], sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> None:
    """Return once no lab is in the way, tearing one down when ``force`` (any lab) or
    ``reclaim_stale`` (one whose owner died) allows, and waiting up to ``wait`` seconds
    for one whose owner is another live process. Raises LabExists otherwise."""
    deadline = clock() + wait
    while True:
        with locked(state_dir):
            found = _existing(state_dir, net)
            if found is None:
                return
            message, alive, persistent = _describe(found, state_dir)
            if force or (reclaim_stale and not alive and not persistent):
                log.warning("tearing down the existing lab: %s", message)
                teardown()
                return
            mine = found.get("owner", {}).get("pid") == os.getpid()
            if not alive or persistent or mine or clock() >= deadline:
                raise LabExists(message)
        log.info("waiting for another lab to go away: %s", message)
        sleep(min(2.0, max(0.0, deadline - clock())))


def stale(state_dir: Path, net: LabNet) -> bool:
    """True if a lab (or its remains) exists there and its owner, not persistent, is gone."""
    found = _existing(state_dir, net)
    if found is None:
        return False
    _, alive, persistent = _describe(found, state_dir)
    return not alive and not persistent


def refuse_if_exists(state_dir: Path, net: LabNet) -> None:
    found = _existing(state_dir, net)
    if found is not None:
        raise LabExists(_describe(found, state_dir)[0])


def check_base_dir(base_dir: Path) -> Path:
    """``base_dir`` made absolute; refuses / and directories that are not the lab's."""
    base_dir = Path(os.path.abspath(base_dir))
    if len(base_dir.parts) < 3:
        raise LabError(f"base directory {base_dir} is too close to / (the lab deletes it at down)")
    if base_dir.exists() and any(base_dir.iterdir()) and not (base_dir / MARKER).exists():
        raise LabError(f"{base_dir} exists, is not empty and is no lab directory (no {MARKER}); "
                       "choose another --base-dir")
    return base_dir


def prepare_base_dir(base_dir: Path, hosts: list[Any]) -> None:
    """Create ``base_dir`` with its marker, the lab client key and the hosts' /etc/hosts."""
    base_dir.mkdir(parents=True, exist_ok=True)
    (base_dir / MARKER).write_text("made by coldferry tests/support/lab.py; removed by lab down\n")
    identity = base_dir / "id_ed25519"
    if not identity.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "coldferry-lab",
                        "-f", str(identity)], check=True, timeout=30)
    machine = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
    lab = "".join(f"{h.ip}\t{h.name}\n" for h in hosts)
    (base_dir / "hosts").write_text(f"{machine.rstrip()}\n# coldferry lab\n{lab}")


def make_dirs(path: Path) -> None:
    """Create a mount point in the root namespace if it is missing.

    Never removed again: removing a directory that is a mount point in another
    lab's mount namespace would silently unmount it there.
    """
    if not path.exists():
        log.info("creating mount point %s", path)
        path.mkdir(parents=True)


def _qemu_pids(base_dir: Path) -> list[ProcRef]:
    """qemu processes named by the pid files of the lab's libvirtds."""
    found = []
    for pid_file in base_dir.glob("host*/run/libvirt/qemu/*.pid"):
        try:
            proc = ProcRef.of(int(pid_file.read_text().strip()))
            exe = os.readlink(f"/proc/{proc.pid}/exe") if proc else ""
        except (OSError, ValueError):
            continue
        if proc and os.path.basename(exe).startswith("qemu-system"):
            found.append(proc)
    return found


def stop_processes(state: dict[str, Any], state_dir: Path, net: LabNet) -> list[str]:
    """End every process of the lab: recorded daemons, qemu from pid files, and anything
    inside the lab's namespaces. Returns problems (survivors)."""
    hosts = state.get("hosts", [])
    ns_files = [netns.netns_path(n) for n in [h["netns"] for h in hosts] + net.namespaces()]
    ns_files += list(state_dir.glob("host*/*ns"))
    ids = {i for i in map(ns_id, ns_files) if i is not None}
    procs = in_namespaces(ids, exclude=ancestors())
    procs += [p for h in hosts for p in map(ProcRef.from_json, h.get("pids", {}).values()) if p.alive()]
    if "base_dir" in state:
        procs += _qemu_pids(Path(state["base_dir"]))
    if procs:
        log.info("stopping lab processes %s", sorted({p.pid for p in procs}))
    survivors = terminate(procs)
    return [f"pid {p.pid} survived SIGKILL" for p in survivors]


def remove_files(state: dict[str, Any], state_dir: Path, keep_files: bool) -> list[str]:
    """Delete the base directory (unless ``keep_files``) and the state directory."""
    problems = []
    base = Path(state["base_dir"]) if "base_dir" in state else None
    if base is not None and base.exists() and not keep_files:
        if not (base / MARKER).exists():
            problems.append(f"{base} has no {MARKER}; left in place")
        elif mntns.mounts_under(base):
            problems.append(f"mounts remain under {base}: {mntns.mounts_under(base)}")
        else:
            log.info("removing %s", base)
            shutil.rmtree(base)
    if state_dir.exists():
        if mntns.mounts_under(state_dir):
            problems.append(f"mounts remain under {state_dir}: {mntns.mounts_under(state_dir)}")
        else:
            shutil.rmtree(state_dir)
    return problems
