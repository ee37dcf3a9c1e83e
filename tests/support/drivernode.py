"""Running the driver on a lab host: its configuration and ``coldferry driver`` calls."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLDFERRY = str(Path(sys.executable).with_name("coldferry"))
INSTANCES = "/var/lib/coldferry/instances"


@dataclass
class DriverNode:
    """A lab host and the driver configuration used on it."""

    host: Any
    config: Path
    # The host's instances directory as the root namespace reaches it, when something is
    # mounted over it inside the host (shared storage, a small filesystem; see hostmounts.py).
    root: Path | None = None

    @property
    def instances_dir(self) -> Path:
        """The host's instances directory as seen from the root namespace."""
        return self.root if self.root is not None else self.host.instances_dir

    @classmethod
    def configure(cls, lab: Any, host: Any, path: Path, **settings: Any) -> "DriverNode":
        """Write a driver configuration for ``host`` at ``path``; ``settings`` override defaults."""
        values = {"libvirt_uri": "qemu:///system", "instances_path": INSTANCES, "host_name": host.name,
                  "ssh_identity": str(lab.identity), "ssh_known_hosts": str(lab.known_hosts),
                  "remote_command": [COLDFERRY, "receive"], "shutdown_timeout": 60,
                  "shutdown_retry_interval": 10, "start_timeout": 60, **settings}
        path.write_text("[driver]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        return cls(host, path)

    def call(self, name: str, /, **args: Any) -> dict[str, Any]:
        """Run one driver call inside the host; the parsed JSON reply."""
        run = self.host.run([COLDFERRY, "driver", "--config", str(self.config), name],
                            input=json.dumps(args), capture_output=True, text=True, timeout=600)
        try:
            return json.loads(run.stdout)
        except ValueError:
            raise AssertionError(f"{name} on {self.host.name}: {run.stdout}\n{run.stderr[-3000:]}") from None

    def ok(self, name: str, /, **args: Any) -> Any:
        reply = self.call(name, **args)
        assert "result" in reply, f"{name} on {self.host.name} failed: {reply}"
        return reply["result"]

    def dir(self, uuid: str, suffix: str = "") -> Path:
        """An instance directory as seen from the root namespace."""
        return self.instances_dir / f"{uuid}{suffix}"

    def state(self, uuid: str) -> str:
        """What virsh on this host says of the domain ('running', 'shut off', 'undefined')."""
        run = self.host.run(["virsh", "-q", "domstate", uuid], capture_output=True, text=True, timeout=60)
        return run.stdout.strip() if run.returncode == 0 else "undefined"
