"""A private OpenSSH sshd for tests, benchmarks and the demo.

It listens on a loopback port of its own, with a host key, client key,
authorized_keys and known_hosts generated in a directory of its own. It is
started and stopped by pid and never touches the machine's sshd.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Sshd:
    """A running sshd; ``stop()`` ends it. Use as a context manager."""

    workdir: Path
    host: str
    port: int
    user: str
    identity: Path
    known_hosts: Path
    host_key: Path
    proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, workdir: Path, host: str = "127.0.0.1", timeout: float = 10.0, *,
              port: int | None = None, prefix: Sequence[str] = (), identity: Path | None = None,
              aliases: Sequence[str] = (), new_session: bool = False) -> "Sshd":
        """Start an sshd and wait (at most ``timeout`` s) until it accepts connections.

        workdir: its keys, config, pid file, log and known_hosts go here.
        host: the address it listens on (and under which known_hosts names its key).
        port: the port; default a free loopback port (chosen in the caller's namespace).
        prefix: a command wrapper, e.g. ``nsenter --net=... --`` to run it in a lab host;
            readiness is still probed from the caller's namespace.
        identity: an existing client private key to authorize (its ``.pub`` next to it);
            default a key generated in ``workdir``.
        aliases: more names for its host key line in known_hosts.
        new_session: start it in a session of its own (a daemon that outlives a Ctrl-C).
        Raises RuntimeError when it exits early or does not listen in time.
        """
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        host_key = workdir / "ssh_host_ed25519_key"
        identity = Path(identity) if identity is not None else workdir / "id_ed25519"
        for key in (host_key, identity):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "coldferry-test",
                                "-f", str(key)], check=True)
        shutil.copyfile(f"{identity}.pub", workdir / "authorized_keys")
        if port is None:
            port = free_port(host)
        config = workdir / "sshd_config"
        config.write_text("\n".join([
            f"Port {port}",
            f"ListenAddress {host}",
            f"HostKey {host_key}",
            f"PidFile {workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {workdir / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "AllowTcpForwarding yes",
            "MaxSessions 64",
            "MaxStartups 64",
            "LogLevel ERROR",
        ]) + "\n")
        pubkey = Path(f"{host_key}.pub").read_text().split()
        known_hosts = workdir / "known_hosts"
        names = ",".join(n if port == 22 else f"[{n}]:{port}" for n in (host, *aliases))
        known_hosts.write_text(f"{names} {pubkey[0]} {pubkey[1]}\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        log = open(workdir / "sshd.log", "ab")
        proc = subprocess.Popen([*prefix, SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=new_session)
        log.close()
        user = os.environ.get("USER") or "root"
        sshd = cls(workdir, host, port, user, identity, known_hosts, host_key, proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {proc.returncode}: "
                                   f"{(workdir / 'sshd.log').read_text()[-2000:]}")
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    return sshd
            except OSError:
                time.sleep(0.05)
        sshd.stop()
        raise RuntimeError(f"sshd did not listen on {host}:{port} within {timeout}s")

    @property
    def ssh_args(self) -> list[str]:
        """OpenSSH client options that reach this sshd with strict host-key checking."""
        return ["-p", str(self.port), "-i", str(self.identity), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "IdentitiesOnly=yes"]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Sshd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
